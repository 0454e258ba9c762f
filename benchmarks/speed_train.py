"""The training and loop-overhead parts of ``speed.py`` (see its docstring)."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

# -- training: cotune's train_adapter vs a plain TRL SFTTrainer script --------------------------


def sft_rows_of(traces: list[Any], component: str) -> list[Any]:
    """The component's spans as SFT rows (its rendered messages -> its output)."""
    from cotune.training import SFTRow

    return [
        SFTRow(list(t.span(component).messages), t.span(component).output)
        for t in traces
        if t.span(component) is not None and t.span(component).output
    ]


def training_speed(system: Any, traces: list[Any], *, epochs: int = 2) -> list[dict[str, Any]]:
    from cotune.models import resolve_model
    from cotune.spec.job import TrainConfig

    component = system.trainable_components[-1]  # the answer writer: the longest prompts
    base = resolve_model(system.models[component.model], system.base_dir)
    rows = sft_rows_of(traces, component.name)
    config = TrainConfig(method="sft", epochs=epochs, batch_size=8, learning_rate=1e-4)
    with tempfile.TemporaryDirectory(prefix="cotune-speed-") as scratch:
        (cotune_s, cotune_tokens), (plain_s, plain_tokens) = compare_sft(
            base, rows, config, Path(scratch)
        )
    return [
        {
            "trainer": f"cotune train_adapter (SFT, {component.name})",
            "rows": len(rows),
            "seconds": cotune_s,
            "tokens": cotune_tokens,
        },
        {
            "trainer": "plain TRL SFTTrainer script",
            "rows": len(rows),
            "seconds": plain_s,
            "tokens": plain_tokens,
        },
    ]


def compare_sft(
    base: Path, rows: list[Any], config: Any, scratch: Path
) -> tuple[tuple[float, int], tuple[float, int]]:
    """(seconds, trained tokens) of cotune's ``train_adapter`` and of the plain TRL script on
    the same rows: a warm-up (imports, first kernels) outside the timings, then each trainer
    twice in alternating order; the faster of its two runs counts."""
    from cotune.training import train_adapter

    warm = config.model_copy(update={"epochs": 1})
    train_adapter(base, rows[:8], [], warm, scratch / "warm", seed=0)
    cotune_runs, plain_runs = [], []
    for i in range(2):
        for which in ("cotune", "plain") if i == 0 else ("plain", "cotune"):
            out = scratch / f"{which}-{i}"
            started = time.perf_counter()
            if which == "cotune":
                result = train_adapter(base, rows, [], config, out, seed=0)
                cotune_runs.append((time.perf_counter() - started, result.trained_tokens))
            else:
                plain_runs.append(_plain_trl_sft(base, rows, config, out))
    return min(cotune_runs), min(plain_runs)


def _plain_trl_sft(base: Path, rows: list[Any], config: Any, out: Path) -> tuple[float, int]:
    """What a user would write with TRL alone: the same LoRA, hyperparameters, device and
    precision as cotune picks (on a CPU fp32 and no gradient checkpointing: TRL's bf16 +
    checkpointing defaults are ~15x slower there), and the same per-step logging."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from cotune.training.base_model import _use_bf16

    gpu = torch.cuda.is_available()
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(base)
    dtype = torch.bfloat16 if _use_bf16(gpu) else torch.float32
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    dataset = Dataset.from_list(
        [
            {
                "prompt": [dict(m) for m in r.messages],
                "completion": [{"role": "assistant", "content": r.completion}],
            }
            for r in rows
        ]
    )
    args = SFTConfig(
        output_dir=str(out),
        num_train_epochs=config.epochs,
        per_device_train_batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        max_length=config.max_length,
        seed=0,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        bf16=_use_bf16(gpu),
        gradient_checkpointing=False,
        use_cpu=not gpu,
    )
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=lora
    )
    trainer.train()
    trainer.model.save_pretrained(out)
    seconds = time.perf_counter() - started
    tokens = sum(len(e["input_ids"]) for e in trainer.train_dataset) * config.epochs
    return seconds, tokens


def format_training(rows: list[dict[str, Any]]) -> str:
    plain = rows[1]["tokens"] / rows[1]["seconds"]
    lines = [
        f"Training speed: SFT of one LoRA adapter on {rows[0]['rows']} rows, from loading the "
        "base model to the adapter written",
        "",
        "| trainer | seconds | trained tokens | tokens/s | vs plain TRL |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        rate = r["tokens"] / r["seconds"]
        lines.append(
            f"| {r['trainer']} | {r['seconds']:.2f} | {r['tokens']} | {rate:.1f} | "
            f"{rate / plain:.2f}x |"
        )
    return "\n".join(lines)


# -- loop overhead: one epoch, time outside engines and trainers ------------------------------


def loop_overhead(system_path: Path, *, limit: int = 32) -> dict[str, Any]:
    """One epoch of the loop (judge = the system's own model) on the system's train/val
    files: stage seconds, seconds inside engine calls and trainers, base-model loads."""
    import cotune.engines as engines_module
    import cotune.training.adapter as training_module  # train_adapter looks _load_base up here
    from cotune.embedded import open_output
    from cotune.loop import run_job
    from cotune.records import Stage
    from cotune.runner import JobContext
    from cotune.spec.job import parse_job

    folder = Path(system_path).resolve().parent
    alias = next(iter(_system_models(system_path)))
    job = parse_job(
        {
            "system": str(system_path),
            "data": {"train": str(folder / "train.jsonl"), "val": str(folder / "val.jsonl")},
            "judge": {"model": alias},
            "loop": {
                "epochs": 1,
                "rollout_batch": limit,
                "samples_per_component": limit,
                "judge_samples": 1,
                "augment_rollouts": 0,
                "val_limit": 16,
            },
            "train": {"epochs": 1, "batch_size": 8},
        }
    )
    engines_before = {id(e) for e in engines_module.cached_engines()}
    trainer_seconds: dict[str, float] = {}
    loads = {"hf": 0}
    real_load = training_module._load_base

    def counted_load(*args: Any, **kwargs: Any) -> Any:
        loads["hf"] += 1
        return real_load(*args, **kwargs)

    def timed_trainer(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return training_module.train_adapter(*args, **kwargs)
        finally:
            trainer_seconds[str(args[4])] = time.perf_counter() - started

    engine_seconds: dict[str, float] = {}

    def engine_total() -> float:
        return sum(e.stats.seconds for e in engines_module.cached_engines())

    last = {"seconds": engine_total()}

    def on_stage_done(record: Any) -> None:
        now = engine_total()
        engine_seconds[f"{record.epoch}:{record.stage.value}"] = now - last["seconds"]
        last["seconds"] = now

    with tempfile.TemporaryDirectory(prefix="cotune-speed-loop-") as scratch:
        store, artifacts, job_id = open_output(Path(scratch), job, resume=False)
        ctx = JobContext(
            job_id=job_id,
            job=job,
            store=store,
            artifacts=artifacts,
            trainer=timed_trainer,
            on_stage_done=on_stage_done,
        )
        training_module._load_base = counted_load
        try:
            started = time.perf_counter()
            run_job(ctx)
            wall = time.perf_counter() - started
        finally:
            training_module._load_base = real_load
        stages = [r for r in store.stages(job_id) if r.epoch == 1]
        states = [s for s in store.stage_states(job_id) if s.epoch == 1]
        store.close()
    # The epoch's wall time, first claim to last finish: it holds what the stage records do
    # not (storing outputs, claiming and finishing stages, the gaps between stages).
    epoch_seconds = (
        max(s.finished_at for s in states if s.finished_at)
        - min(s.started_at for s in states if s.started_at)
    ).total_seconds()
    in_engines = sum(engine_seconds.get(f"1:{r.stage.value}", 0.0) for r in stages)
    in_trainers = sum(trainer_seconds.values())
    rows = [
        {
            "stage": r.stage.value,
            "seconds": r.seconds,
            "engines": engine_seconds.get(f"1:{r.stage.value}", 0.0),
            "trainers": in_trainers if r.stage == Stage.train else 0.0,
        }
        for r in stages
    ]
    return {
        "system": job.system.name,
        "wall": wall,
        "rows": rows,
        "epoch_seconds": epoch_seconds,
        "engine_seconds": in_engines,
        "trainer_seconds": in_trainers,
        "engines_created": len({id(e) for e in engines_module.cached_engines()} - engines_before),
        "engines_in_process": len(engines_module.cached_engines()),
        "hf_loads": loads["hf"],
        "trained_adapters": len(trainer_seconds),
    }


def _system_models(system_path: Path) -> dict[str, Any]:
    from cotune.spec import load_system

    return dict(load_system(system_path).models)


def format_loop(result: dict[str, Any]) -> str:
    overhead = result["epoch_seconds"] - result["engine_seconds"] - result["trainer_seconds"]
    share = overhead / result["epoch_seconds"] if result["epoch_seconds"] else 0.0
    judge = sum(r["seconds"] for r in result["rows"] if r["stage"] == "credit")
    judge_share = judge / result["epoch_seconds"] if result["epoch_seconds"] else 0.0
    lines = [
        f"Loop overhead: one epoch of {result['system']} (judge = the same model), "
        f"{result['wall']:.1f} s for the whole job",
        "",
        "| epoch-1 stage | seconds | in engine calls | in trainers | outside both |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in result["rows"]:
        outside = r["seconds"] - r["engines"] - r["trainers"]
        lines.append(
            f"| {r['stage']} | {r['seconds']:.2f} | {r['engines']:.2f} | {r['trainers']:.2f} | "
            f"{outside:.2f} |"
        )
    lines += [
        f"| **epoch** (first claim to last finish) | {result['epoch_seconds']:.2f} | "
        f"{result['engine_seconds']:.2f} | {result['trainer_seconds']:.2f} | "
        f"{overhead:.2f} ({share:.1%}) |",
        "",
        f"The judge (the credit stage) took {judge:.2f} s, {judge_share:.1%} of the epoch.",
        "",
        f"Base-model loads: {result['engines_created']} vLLM engine(s) created by the job "
        f"({result['engines_in_process']} in the process, shared by rollouts, judge and "
        f"replays); {result['hf_loads']} HF copies loaded for training "
        f"({result['trained_adapters']} adapters trained).",
    ]
    return "\n".join(lines)
