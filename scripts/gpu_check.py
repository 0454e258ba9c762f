"""The GPU check's Python part (``scripts/gpu_check.sh`` runs it; README "GPU").

``train``: cotune's own trainer (``cotune.training.train_adapter``) on the tiny model: bf16 SFT,
SFT then DPO, and 4-bit QLoRA SFT, then SFT and QLoRA SFT of a model with SmolLM2-135M's layer
sizes (random weights, the tiny tokenizer), each a row of tokens/s and peak GPU memory; then the
same two through ``train_adapter_fsdp`` (``accelerate launch --use_fsdp``, one process per GPU).
Each adapter is checked: every lora_B trained, the same tensors as the plain run's.
``speed``: ``train_adapter``'s SFT tokens/s against the plain TRL script of
``benchmarks/speed_train.py`` on the SmolLM2-135M-sized model.
``vllm``: CUDA vLLM rollouts through ``cotune.engines.vllm`` (base and the SFT adapter), then
``release()`` (sleep level 1) and ``reacquire()`` (wake up), the memory given back and whether
the outputs stayed the same; "not run" when vLLM does not import.

``--cpu`` runs the same code on a CPU at a tiny size (no QLoRA, no sleep mode): the test suite
uses it so the script does not rot.

    python scripts/gpu_check.py train --model DIR --out DIR [--cpu] [--rows N]
    python scripts/gpu_check.py speed --model DIR --out DIR [--cpu]
    python scripts/gpu_check.py vllm --model DIR --out DIR [--cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
import traceback
from pathlib import Path
from typing import Any

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

RESULTS = "gpu-check.json"  # each part adds its rows to this file in --out


def cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def peak_mib() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


def reset_peak() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def rows_and_pairs(count: int) -> tuple[list[Any], list[Any]]:
    """Tiny-kb answer rows teaching one colour, and DPO pairs preferring it."""
    from cotune.tiny import ANSWER_PROMPT, make_world
    from cotune.training import DPOPair, SFTRow

    world = make_world()
    keys = sorted(world.facts)[:count]
    rng = random.Random(0)
    rows, pairs = [], []
    for key in keys:
        others = rng.sample([k for k in world.facts if k != key], 2)
        passages = "\n".join(
            f"{i + 1}. the color of {k} is {world.facts[k]}." for i, k in enumerate([key, *others])
        )
        prompt = ANSWER_PROMPT.format(passages=passages, question=world.question(key))
        messages = [{"role": "user", "content": prompt}]
        rows.append(SFTRow(messages, "blue", source="bootstrap"))
        if world.facts[key] != "blue":
            pairs.append(DPOPair(messages, chosen="blue", rejected=world.facts[key]))
    return rows, pairs


# SmolLM2-135M's layer sizes with random weights and the tiny model's tokenizer: a size at which
# tokens/s and peak memory mean something. The CPU dry run builds a small stand-in instead.
WIDE = {
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
}
WIDE_CPU = {
    **WIDE,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 3,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
}


def random_model(tiny: Path, out: Path, sizes: dict[str, int]) -> Path:
    """The tiny model's config and tokenizer with other layer sizes, random weights."""
    if (out / "config.json").is_file():
        return out
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(tiny))
    for key, value in sizes.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    out.mkdir(parents=True)
    model.save_pretrained(str(out), safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tiny / name).is_file():
            shutil.copyfile(tiny / name, out / name)
    return out


def train_part(model: Path, out: Path, *, cpu: bool, rows_count: int) -> list[dict[str, Any]]:
    from cotune.spec.job import TrainConfig
    from cotune.training import train_adapter

    rows, pairs = rows_and_pairs(rows_count)
    base = TrainConfig(method="sft", lora_r=8, lora_alpha=16, learning_rate=2e-3, epochs=2)
    dtype = "fp32" if cpu else "bf16"
    dpo = base.model_copy(update={"method": "sft+dpo"})
    qlora = base.model_copy(update={"qlora": True})
    wide = "3-layer stand-in" if cpu else "SmolLM2-135M layer sizes"
    fsdp = "FSDP (accelerate launch, 1 process per GPU)"
    runs = [
        (f"{dtype}-sft", f"{dtype} SFT", base, [], False, False),
        (f"{dtype}-dpo", f"{dtype} SFT then DPO", dpo, pairs, False, False),
        ("qlora-sft", "4-bit QLoRA SFT", qlora, [], False, False),
        (f"{dtype}-sft-wide", f"{dtype} SFT, {wide} (random)", base, [], True, False),
        ("qlora-sft-wide", f"4-bit QLoRA SFT, {wide} (random)", qlora, [], True, False),
        ("fsdp-sft-wide", f"bf16 SFT under {fsdp}, {wide}", base, [], True, True),
        ("fsdp-qlora-wide", f"4-bit QLoRA SFT under {fsdp}, {wide}", qlora, [], True, True),
    ]
    results = []
    for key, name, config, run_pairs, is_wide, sharded in runs:
        row: dict[str, Any] = {"part": "train", "run": name, "rows": len(rows)}
        if config.qlora and cpu:
            results.append({**row, "status": "not run: QLoRA needs CUDA (bitsandbytes)"})
            continue
        reset_peak()
        try:
            base_model = (
                random_model(model, out / "wide-model", WIDE_CPU if cpu else WIDE)
                if is_wide
                else model
            )
            started = time.perf_counter()
            if sharded:  # the ranks are other processes: their peak memory is not seen here
                import torch

                from cotune.training.fsdp import train_adapter_fsdp

                result = train_adapter_fsdp(
                    base_model, rows, run_pairs, config, out / "adapters" / key, seed=0,
                    gpus=max(1, torch.cuda.device_count()),
                )  # fmt: skip
            else:
                result = train_adapter(
                    base_model, rows, run_pairs, config, out / "adapters" / key, seed=0
                )
            seconds = time.perf_counter() - started
            reference = out / "adapters" / (f"{dtype}-sft-wide" if is_wide else f"{dtype}-sft")
            row.update(
                status=adapter_status(result.adapter_dir, reference),
                sft_steps=result.sft_steps,
                dpo_steps=result.dpo_steps,
                trained_tokens=result.trained_tokens,
                seconds=round(seconds, 2),
                tokens_per_second=round(result.trained_tokens / seconds, 1),
                sft_loss=[round(result.sft_losses[0], 3), round(result.sft_losses[-1], 3)],
                peak_mib=None if sharded else peak_mib(),
                adapter=str(result.adapter_dir),
            )
        except Exception as err:  # one failing run must not hide the others' numbers
            traceback.print_exc()
            row["status"] = f"failed: {type(err).__name__}: {str(err)[:200]}"
        results.append(row)
    return results


def speed_part(model: Path, out: Path, *, cpu: bool) -> list[dict[str, Any]]:
    """SFT throughput of ``train_adapter`` against the plain TRL script on the SmolLM2-135M-sized
    model, by ``benchmarks/speed_train.py``'s own comparison (``compare_sft``)."""
    from cotune.spec.job import TrainConfig

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from speed_train import compare_sft

    row: dict[str, Any] = {"part": "speed", "run": "SFT speed: train_adapter vs plain TRL"}
    rows, _ = rows_and_pairs(64)
    rows = rows * (2 if cpu else 16)
    config = TrainConfig(method="sft", epochs=1, batch_size=8, learning_rate=1e-4)
    try:
        base = random_model(model, out / "wide-model", WIDE_CPU if cpu else WIDE)
        (c_s, c_tok), (p_s, p_tok) = compare_sft(base, rows, config, out / "speed")
        row.update(
            status="ok",
            rows=len(rows),
            cotune_tokens_per_second=round(c_tok / c_s, 1),
            plain_tokens_per_second=round(p_tok / p_s, 1),
            ratio=round((c_tok / c_s) / (p_tok / p_s), 2),
            cotune_seconds=round(c_s, 2),
            plain_seconds=round(p_s, 2),
        )
    except Exception as err:
        traceback.print_exc()
        row["status"] = f"failed: {type(err).__name__}: {str(err)[:200]}"
    return [row]


def adapter_status(adapter: Path, reference: Path) -> str:
    """The adapter's row status: "ok" when every lora_B moved off its zero init and the tensor
    names and shapes are those of the plain bf16/fp32 run's adapter on the same base."""
    from cotune.training import adapter_weights

    weights = adapter_weights(adapter)
    untrained = [n for n, t in weights.items() if "lora_B" in n and not bool(t.abs().sum() > 0)]
    if not weights or untrained:
        return f"failed: {len(untrained)} of {len(weights)} tensors untrained (lora_B all zero)"
    if reference != adapter and (reference / "adapter_model.safetensors").is_file():
        expected = {n: tuple(t.shape) for n, t in adapter_weights(reference).items()}
        if {n: tuple(t.shape) for n, t in weights.items()} != expected:
            return f"failed: tensor names or shapes differ from {reference.name}'s"
    return "ok"


def vllm_part(model: Path, out: Path, *, cpu: bool) -> list[dict[str, Any]]:
    row: dict[str, Any] = {"part": "vllm", "run": "vLLM rollouts, sleep/wake"}
    try:
        import vllm  # noqa: F401
    except Exception as err:  # not installed (the usual case on the GPU machine), or broken
        return [{**row, "status": f"not run: vLLM does not import ({type(err).__name__})"}]
    if not cpu and not cuda():
        return [{**row, "status": "not run: no CUDA GPU"}]
    from cotune.engines.base import GenerationRequest
    from cotune.engines.vllm import VLLMEngine, VLLMSettings

    rows, _ = rows_and_pairs(64 if not cpu else 8)
    requests = [GenerationRequest(messages=r.messages, max_tokens=16) for r in rows]
    adapter = out / "adapters" / ("fp32-sft" if cpu else "bf16-sft")  # the train part's
    adapter_path = str(adapter) if (adapter / "adapter_model.safetensors").is_file() else None
    try:
        started = time.perf_counter()
        engine = VLLMEngine(model, VLLMSettings(max_lora_rank=16, release_on_cpu=cpu))
        start_seconds = time.perf_counter() - started
        started = time.perf_counter()
        base = [r.text for r in engine.generate(requests)]
        tuned = [r.text for r in engine.generate(requests, adapter=adapter_path)]
        rollout_seconds = time.perf_counter() - started
        before = device_used_mib()
        started = time.perf_counter()
        engine.release()
        release_seconds = time.perf_counter() - started
        freed = before - device_used_mib()
        started = time.perf_counter()
        engine.reacquire()
        reacquire_seconds = time.perf_counter() - started
        same = [r.text for r in engine.generate(requests)] == base and [
            r.text for r in engine.generate(requests, adapter=adapter_path)
        ] == tuned
        row.update(
            status="ok" if same else "failed: outputs changed across sleep/wake",
            requests=2 * len(requests),
            adapter=adapter_path is not None,
            start_seconds=round(start_seconds, 1),
            rollout_seconds=round(rollout_seconds, 2),
            release_seconds=round(release_seconds, 2),
            reacquire_seconds=round(reacquire_seconds, 2),
            freed_mib=round(freed),
        )
        engine.release()
    except Exception as err:
        traceback.print_exc()
        row["status"] = f"failed: {type(err).__name__}: {str(err)[:200]}"
    return [row]


def device_used_mib() -> float:
    """GPU memory in use on the device (all processes), or this process's RSS on a CPU."""
    import torch

    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        return (total - free) / 2**20
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def table(results: list[dict[str, Any]]) -> str:
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    lines = [
        f"GPU check on {device}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}",
        "",
        "| run | status | SFT/DPO steps | SFT loss first, last | trained tokens | "
        "seconds (load + train) | tokens/s | peak GPU MiB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        if r["part"] == "train":
            steps = f"{r.get('sft_steps', '')}/{r.get('dpo_steps', '')}" if "sft_steps" in r else ""
            peak = r.get("peak_mib")
            loss = ", ".join(str(x) for x in r.get("sft_loss", []))
            lines.append(
                f"| {r['run']} | {r['status']} | {steps} | {loss} | "
                f"{r.get('trained_tokens', '')} | "
                f"{r.get('seconds', '')} | {r.get('tokens_per_second', '')} | "
                f"{'' if peak is None else round(peak)} |"
            )
        elif r["part"] == "speed":
            detail = (
                f"{r['rows']} rows, 1 epoch, bf16 where the GPU has it: train_adapter "
                f"{r['cotune_tokens_per_second']} tokens/s ({r['cotune_seconds']} s), plain TRL "
                f"{r['plain_tokens_per_second']} ({r['plain_seconds']} s): {r['ratio']}x"
                if "ratio" in r
                else ""
            )
            lines.append(f"| {r['run']} | {r['status']} | {detail} | | | | | |")
        else:
            detail = (
                f"{r['requests']} chats in {r['rollout_seconds']} s (engine start "
                f"{r['start_seconds']} s); release {r['release_seconds']} s freed "
                f"{r['freed_mib']} MiB, reacquire {r['reacquire_seconds']} s"
                if "requests" in r
                else ""
            )
            lines.append(f"| {r['run']} | {r['status']} | {detail} | | | | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=["train", "speed", "vllm", "table"])
    parser.add_argument("--model", type=Path, required=False, help="the tiny model's folder")
    parser.add_argument("--out", type=Path, required=True, help="adapters and results go here")
    parser.add_argument("--cpu", action="store_true", help="dry run on a CPU at a tiny size")
    parser.add_argument("--rows", type=int, default=64, help="SFT rows per run")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    stored = args.out / RESULTS
    results: list[dict[str, Any]] = json.loads(stored.read_text()) if stored.is_file() else []
    if args.part != "table":
        if args.model is None:
            parser.error("--model is required")
        if not args.cpu and not cuda():
            print("no CUDA GPU: give --cpu for the dry run", file=sys.stderr)
            return 2
        part = {"train": train_part, "speed": speed_part, "vllm": vllm_part}[args.part]
        kwargs: dict[str, Any] = {"cpu": args.cpu}
        if args.part == "train":
            kwargs["rows_count"] = args.rows
        found = part(args.model, args.out, **kwargs)
        results = [r for r in results if r["part"] != args.part] + found
        stored.write_text(json.dumps(results, indent=2))
    print(table(results))
    return 0 if all(not r["status"].startswith("failed") for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
