"""One adapter trained over several GPUs with accelerate FSDP (FSDP2).

RAN with ONE process only: on an H200 (bf16 and QLoRA, the same losses as a plain run: README
"GPU") and on a CPU (the test suite, through ``scripts/gpu_check.sh --cpu``). Never run over
several GPUs: no sharding across ranks, no gather of a sharded adapter has been seen to work.

``train_adapter_fsdp`` takes what ``train_adapter`` takes, writes it to a request file and runs
``accelerate launch --use_fsdp`` with one process per GPU, each running :func:`main`, i.e.
``train_adapter`` itself: the transformers ``Trainer`` picks accelerate's FSDP plugin up from the
launcher's environment and shards the base model, the LoRA parameters and the optimizer state.
Under the launcher every rank counts as distributed (``ranks.distributed``, one rank too): the
adapter's tensors (the trainable ones only, never the frozen base) are gathered in full on CPU
before rank 0 writes them (``adapter._export``); rank 0 also writes the result file read back
here. QLoRA under FSDP stores its 4-bit weights as bf16
(``bnb_4bit_quant_storage``) so FSDP can shard them (``base_model._load_base``).
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from cotune.errors import CotuneError
from cotune.spec.job import TrainConfig
from cotune.training.ranks import is_main_rank
from cotune.training.rows import DPOPair, Progress, SFTRow, TrainResult

RESULT_FILE = "result.json"


def launch_command(gpus: int, request: Path, port: int) -> list[str]:
    """``accelerate launch`` with FSDP over ``gpus`` processes running :func:`main`; the ranks
    meet on ``port`` (a free one: accelerate's fixed default would collide with a second run
    on the same machine)."""
    return [
        sys.executable, "-m", "accelerate.commands.launch",
        "--num_processes", str(gpus),
        "--num_machines", "1",
        "--main_process_port", str(port),
        "--dynamo_backend", "no",
        "--mixed_precision", "bf16",
        "--use_fsdp",
        # FSDP2, as TRL's own accelerate config: TRL's fused LM head gathers FSDP2's sharded
        # head, and FSDP1 failed on an H200 (its flat parameters need one dtype: peft's fp32
        # LoRA weights beside the bf16 base; and the tied head broke its reshard).
        "--fsdp_version", "2",
        "--fsdp_reshard_after_forward", "true",
        "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
        "--fsdp_state_dict_type", "FULL_STATE_DICT",
        "-m", "cotune.training.fsdp", str(request),
    ]  # fmt: skip


def train_adapter_fsdp(
    base_model: Path,
    sft_rows: list[SFTRow],
    dpo_pairs: list[DPOPair],
    config: TrainConfig,
    out_dir: Path,
    *,
    seed: int = 0,
    progress: Progress | None = None,
    gpus: int = 2,
) -> TrainResult:
    """``train_adapter`` over ``gpus`` GPUs (see the module's docstring: run with one only)."""
    say = progress or (lambda _message: None)
    with tempfile.TemporaryDirectory(prefix="cotune-fsdp-") as scratch:
        request = write_request(
            Path(scratch), base_model, sft_rows, dpo_pairs, config, out_dir, seed=seed
        )
        say(f"training over {gpus} GPUs with accelerate FSDP")
        done = subprocess.run(launch_command(gpus, request, free_port()), check=False)
        if done.returncode != 0:
            raise CotuneError(f"FSDP training over {gpus} GPUs exited with {done.returncode}")
        return read_result(Path(scratch))


def free_port() -> int:
    """A TCP port free on this machine now (the OS picks it)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("", 0))  # the rendezvous listens on every interface
        return int(probe.getsockname()[1])


def write_request(
    folder: Path,
    base_model: Path,
    sft_rows: list[SFTRow],
    dpo_pairs: list[DPOPair],
    config: TrainConfig,
    out_dir: Path,
    *,
    seed: int,
) -> Path:
    """The ranks' request file in ``folder``; :func:`main` reads it."""
    request = folder / "request.json"
    fields = {
        "base_model": str(base_model),
        "sft_rows": [dataclasses.asdict(r) for r in sft_rows],
        "dpo_pairs": [dataclasses.asdict(p) for p in dpo_pairs],
        "config": config.model_dump(mode="json"),
        "out_dir": str(out_dir),
        "seed": seed,
    }
    request.write_text(json.dumps(fields), encoding="utf-8")
    return request


def read_result(folder: Path) -> TrainResult:
    """What rank 0 wrote beside the request."""
    found = json.loads((folder / RESULT_FILE).read_text(encoding="utf-8"))
    found["adapter_dir"] = Path(found["adapter_dir"])
    return TrainResult(**found)


def main(request_path: str) -> None:
    """One rank: train from the request file; rank 0 writes the result beside it."""
    from cotune.training.adapter import train_adapter

    request: dict[str, Any] = json.loads(Path(request_path).read_text(encoding="utf-8"))
    result = train_adapter(
        Path(request["base_model"]),
        [SFTRow(**row) for row in request["sft_rows"]],
        [DPOPair(**pair) for pair in request["dpo_pairs"]],
        TrainConfig.model_validate(request["config"]),
        Path(request["out_dir"]),
        seed=int(request["seed"]),
    )
    if is_main_rank():
        found = dataclasses.asdict(result)
        found["adapter_dir"] = str(result.adapter_dir)
        (Path(request_path).parent / RESULT_FILE).write_text(json.dumps(found), encoding="utf-8")


if __name__ == "__main__":
    main(sys.argv[1])
