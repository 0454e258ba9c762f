"""Helpers for the end-to-end tests: the tiny-kb job as a user writes it, ``cotune serve`` in a
subprocess, the ``cotune`` command as a user runs it, and the checks on what a user downloads."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
JOB_TIMEOUT = 240.0
# What every process a test starts (API, worker, CLI) runs with, besides its COTUNE_* settings:
# vLLM in-process on CPU with a small KV cache, two threads, nothing from the network.
sys.path.insert(0, str(REPO / "scripts"))
from fleet import PROCESS_ENV as PROCESS_ENV  # noqa: E402 - re-exported for the tests

# The tiny model's answer writer hedges ("teal i think") on seven of its ten colours, and the
# right passage is first whenever the query is right (cotune/tiny.py): the base system scores
# the known colours' share of a split (val 7/24 = 0.292) on any CPU, and a job whose answer
# writer learns from the verified gold corrections ("teal") lifts that by tens of points. The
# rates sit inside the range that learns it (measured with `cotune run` on USER_JOB: SFT alone
# at 3e-3, 5e-3 and 1e-2 all reach val 1.000 from 0.292, 2e-2 only 0.458; DPO after it at 5e-3
# undid it, at 1e-3 it keeps it), so neither job depends on a number measured on one machine.
TRAIN: dict[str, Any] = {
    "epochs": 3,
    "batch_size": 8,
    "learning_rate": 5.0e-3,
    "dpo_learning_rate": 1.0e-3,
    "lora_r": 8,
    "lora_alpha": 16,
}

JOB: dict[str, Any] = {
    "system": "system.yaml",
    "data": {"train": "train.jsonl", "val": "val.jsonl", "test": "test.jsonl"},
    "judge": {"model": "tiny", "max_tokens": 64},
    "loop": {
        "epochs": 1,
        "rollout_batch": 8,
        "samples_per_component": 8,
        "judge_samples": 1,
        "augment_rollouts": 0,
        "val_limit": 8,
        "seed": 0,
    },
    "train": TRAIN,
}

# The job a user submits in the end-to-end tests: it must keep an epoch, or there is nothing
# to download. No judge (gold and re-sampled candidates); the whole train split.
USER_JOB: dict[str, Any] = {
    "system": "system.yaml",
    "data": {"train": "train.jsonl", "val": "val.jsonl", "test": "test.jsonl"},
    "loop": {
        "epochs": 1,
        "rollout_batch": 48,
        "samples_per_component": 48,
        "augment_rollouts": 0,
        "seed": 0,
    },
    "train": TRAIN,
}


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_api(env: dict[str, str], log: Path, *extra: str) -> tuple[subprocess.Popen[bytes], str]:
    """``cotune serve`` in a subprocess on a free port; returns it once /healthz answers."""
    import httpx

    port = free_port()
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cotune.cli", "serve", "--port", str(port), *extra],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"cotune serve exited with {proc.returncode}\n{log.read_text()[-4000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return proc, url
        time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail(f"cotune serve did not answer in 120 s\n{log.read_text()[-4000:]}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def cli(env: dict[str, str], *args: str, timeout: float = JOB_TIMEOUT) -> str:
    """Run ``cotune ARGS`` as a user would; returns stdout, fails the test on a non-zero exit."""
    done = subprocess.run(
        [sys.executable, "-m", "cotune.cli", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, f"cotune {' '.join(args)}: {done.returncode}\n{done.stderr}"
    return done.stdout


def write_job_folder(folder: Path) -> Path:
    """The tiny-kb job as a user keeps it: job.yaml next to system.yaml (registry model
    ``tiny``), the splits and the corpus, all by relative path."""
    import yaml

    from cotune.tiny import write_tiny_example

    write_tiny_example(folder)
    (folder / "job.yaml").write_text(yaml.safe_dump(USER_JOB, sort_keys=False))
    return folder / "job.yaml"


def check_downloads(env: dict[str, str], url: str, key: str, job_id: str, out: Path) -> None:
    """``cotune download`` and the SDK fetch the bundle and an adapter; the bundle verifies
    and the adapter loads in peft over the tiny model."""
    from cotune.bundle import verify_bundle
    from cotune.client import Client

    client_env = {**env, "COTUNE_API_URL": url, "COTUNE_API_KEY": key}
    bundle = Path(cli(client_env, "download", job_id, "--out", str(out / "cli")).strip())
    assert (bundle / "serve.sh").is_file() and (bundle / "manifest.json").is_file()
    verify_bundle(bundle)
    adapter = Path(
        cli(client_env, "download", job_id, "--component", "answer", "--out", str(out)).strip()
    )
    assert adapter == out / "answer"
    assert sorted(p.name for p in adapter.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    # No server path in what was downloaded (the probe found the model folder here).
    for folder in (adapter, *(bundle / "adapters").iterdir()):
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == "tiny", config

    with Client(url, key) as sdk:
        sdk_bundle = sdk.download_bundle(job_id, out / "sdk")
        verify_bundle(sdk_bundle)
        query = sdk.download_adapter(job_id, "query", out / "sdk-adapters")
        assert (query / "adapter_config.json").is_file()
        checkpoints = sdk.checkpoints(job_id)
        assert checkpoints and all(c["fine_tuning_job_id"] == job_id for c in checkpoints)

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_dir = Path(env["COTUNE_HOME"]) / "models" / "tiny"
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter)
    lora = [n for n, _ in model.named_parameters() if "lora_B" in n]
    assert lora, "the downloaded adapter holds no LoRA weights"


@contextlib.contextmanager
def serving(bundle: Path, env: dict[str, str], log: Path) -> Any:
    """The bundle's ``serve.sh`` (vLLM's OpenAI server on CPU), yielding its ``/v1`` URL once
    healthy; the server's process group is stopped afterwards."""
    import httpx

    port = free_port()
    env = {k: v for k, v in env.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    env.update(PORT=str(port), PYTHON=sys.executable, VLLM_CPU_KVCACHE_SPACE="1")
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            ["bash", str(bundle / "serve.sh"), "--seed", "0"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 240
        while True:
            if proc.poll() is not None:
                pytest.fail(f"serve.sh exited with {proc.returncode}\n{log.read_text()[-4000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"serve.sh not healthy in 240 s\n{log.read_text()[-4000:]}")
            time.sleep(1)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        stop(proc)
