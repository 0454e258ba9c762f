"""Training one adapter (``train_adapter``: SFT, then DPO), exporting it as the two adapter
files, and what tests and tools read back (``completion_mask_preview``, ``adapter_weights``)."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from cotune.errors import CotuneError
from cotune.spec.job import TrainConfig
from cotune.training.base_model import (
    _check_device,
    _free_memory,
    _load_base,
    _load_tokenizer,
    _lora_config,
    _quiet,
)
from cotune.training.ranks import distributed, is_main_rank
from cotune.training.rows import (
    ADAPTER_FILES,
    ADAPTER_NAME,
    DPOPair,
    Progress,
    SFTRow,
    TrainResult,
)
from cotune.training.trainers import _dpo_tokens, _dpo_trainer, _loss_callback, _sft_trainer


def train_adapter(
    base_model: Path,
    sft_rows: list[SFTRow],
    dpo_pairs: list[DPOPair],
    config: TrainConfig,
    out_dir: Path,
    *,
    seed: int = 0,
    progress: Progress | None = None,
) -> TrainResult:
    """Train one LoRA adapter for a component and write it to ``out_dir``.

    SFT from ``base_model`` on ``sft_rows``, then, if ``config.method == "sft+dpo"`` and
    ``dpo_pairs`` is non-empty, DPO continuing that adapter against a frozen copy of it.
    ``out_dir`` ends holding only ``adapter_config.json`` and ``adapter_model.safetensors``
    (no pickles, no tokenizer, no checkpoints); everything is built in a temporary sibling
    folder and renamed into place at the end, so a crash never leaves half an adapter, and an
    existing ``out_dir`` is replaced.

    Deterministic for a given ``seed``, rows and config on one machine. ``config.qlora`` needs a
    CUDA GPU (4-bit base through bitsandbytes) and raises ``CotuneError`` before loading
    anything otherwise.
    """
    started = time.perf_counter()
    if not sft_rows:
        raise CotuneError("train_adapter needs at least one SFT row")
    base_model = Path(base_model)
    out_dir = Path(out_dir)
    gpu = _check_device(config)
    say = progress or (lambda _message: None)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    if distributed():  # one rank of an FSDP run (training/fsdp.py): rank 0 writes, all read
        work = out_dir.parent / f".{out_dir.name}.partial-fsdp"
        work.mkdir(exist_ok=True)
    else:
        work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        with _quiet():
            result = _train(
                base_model, sft_rows, dpo_pairs, config, work, seed=seed, gpu=gpu, say=say
            )
        if is_main_rank():
            _replace_dir(work / "adapter", out_dir)
    finally:
        if is_main_rank():
            shutil.rmtree(work, ignore_errors=True)
    result.adapter_dir = out_dir
    result.seconds = time.perf_counter() - started
    say(f"adapter written to {out_dir} in {result.seconds:.1f}s")
    return result


def _train(
    base_model: Path,
    sft_rows: list[SFTRow],
    dpo_pairs: list[DPOPair],
    config: TrainConfig,
    work: Path,
    *,
    seed: int,
    gpu: bool,
    say: Progress,
) -> TrainResult:
    """SFT (then DPO) inside the scratch folder ``work``; the adapter ends in ``work/adapter``."""
    result = TrainResult(adapter_dir=work / "adapter")
    final = work / "adapter"

    # -- SFT, from the base model --------------------------------------------------------------
    model = _load_base(base_model, config, gpu)
    trainer = _sft_trainer(
        model,
        _load_tokenizer(base_model),
        sft_rows,
        config,
        work / "sft-run",
        seed=seed,
        gpu=gpu,
        peft_config=_lora_config(config),
        callbacks=[_loss_callback(result.sft_losses, "sft", say)],
    )
    if len(trainer.train_dataset) == 0:
        raise CotuneError(
            f"no SFT row leaves a completion token within max_length={config.max_length}; "
            "raise train.max_length or shorten the prompts"
        )
    result.trained_tokens += config.epochs * sum(
        len(ids) for ids in trainer.train_dataset["input_ids"]
    )
    say(
        f"sft: {len(trainer.train_dataset)} rows, {config.epochs} epoch(s), "
        f"{trainer.args.per_device_train_batch_size} row(s) per pass"
    )
    trainer.train()
    result.sft_steps = int(trainer.state.global_step)

    do_dpo = config.method == "sft+dpo" and bool(dpo_pairs)
    sft_dir = work / "sft" if do_dpo else final
    # The SFT adapter DPO continues keeps peft's path to the base (peft reads it on load and
    # save); only the adapter that leaves training names the base without a path.
    _export(trainer, sft_dir, None if do_dpo else base_model.name)
    del trainer, model
    _free_memory(gpu)
    if not do_dpo:
        return result

    # -- DPO, continuing the SFT adapter against a frozen copy of it ----------------------------
    from peft import PeftModel

    model = PeftModel.from_pretrained(
        _load_base(base_model, config, gpu), str(sft_dir), is_trainable=True
    )
    dpo = _dpo_trainer(
        model,
        _load_tokenizer(base_model),
        dpo_pairs,
        config,
        work / "dpo-run",
        seed=seed,
        gpu=gpu,
        callbacks=[_loss_callback(result.dpo_losses, "dpo", say)],
    )
    if len(dpo.train_dataset) == 0:  # every prompt fills max_length: keep the SFT adapter
        say(f"dpo: skipped, no pair's prompt fits max_length={config.max_length}")
        if is_main_rank():  # the ranks share the folder (FSDP): one moves it
            sft_dir.rename(final)
    else:
        result.trained_tokens += config.epochs * _dpo_tokens(dpo.train_dataset, config)
        say(
            f"dpo: {len(dpo.train_dataset)} pairs, {config.epochs} epoch(s), "
            f"{dpo.args.per_device_train_batch_size} pair(s) per pass"
        )
        dpo.train()
        result.dpo_steps = int(dpo.state.global_step)
        _export(dpo, final, base_model.name)
    del dpo, model
    _free_memory(gpu)
    return result


def completion_mask_preview(
    base_model: Path, rows: list[SFTRow], *, max_length: int = 1024
) -> list[tuple[list[int], list[int]]]:
    """``(input_ids, labels)`` per row, exactly as the SFT trainer's collator hands them over.

    Built with the same ``SFTTrainer`` dataset preparation and collator that ``train_adapter``
    uses (no reimplementation), so a test can check that labels are ``-100`` on every prompt
    token and equal to the input ids on the completion tokens. Rows that TRL drops (all their
    completion truncated away by ``max_length``) are left out.
    """
    config = TrainConfig(max_length=max_length, epochs=1, batch_size=1)
    tokenizer = _load_tokenizer(Path(base_model))
    model = _load_base(Path(base_model), config, gpu=False)
    with _quiet(), tempfile.TemporaryDirectory(prefix="cotune-preview-") as scratch:
        trainer = _sft_trainer(model, tokenizer, rows, config, Path(scratch), seed=0, gpu=False)
        out = []
        for example in trainer.train_dataset:
            batch = trainer.data_collator([example])
            out.append((batch["input_ids"][0].tolist(), batch["labels"][0].tolist()))
    return out


def adapter_weights(adapter_dir: Path) -> dict[str, Any]:
    """The adapter's tensors by name (safetensors; never unpickles)."""
    from safetensors.torch import load_file

    return dict(load_file(str(Path(adapter_dir) / "adapter_model.safetensors")))


def _export(trainer: Any, dest: Path, base_name: str | None) -> None:
    """Export the trainer's adapter; under FSDP the full state dict is gathered on every rank
    (a collective), rank 0 writes it and the others wait for the folder."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    if not distributed():
        _export_adapter(model, dest, base_name)
        return
    state = _gathered_adapter_state(trainer)
    if is_main_rank():
        _export_adapter(model, dest, base_name, state)
    trainer.accelerator.wait_for_everyone()


def _gathered_adapter_state(trainer: Any) -> dict[str, Any]:
    """The trainable (LoRA) tensors, gathered in full on CPU: never the frozen base, which
    would need ~2 bytes a parameter of host memory on rank 0 just to save the adapter. FSDP2
    through torch's state-dict API; other wrappers through accelerate's own gather."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    model = trainer.model
    if getattr(trainer.accelerator, "is_fsdp2", False):
        options = StateDictOptions(
            full_state_dict=True, cpu_offload=True, ignore_frozen_params=True
        )
        return dict(get_model_state_dict(model, options=options))
    state: dict[str, Any] = trainer.accelerator.get_state_dict(model)
    return state


def _export_adapter(
    model: Any, dest: Path, base_name: str | None, state_dict: dict[str, Any] | None = None
) -> None:
    """Save the ``default`` adapter as safetensors and keep only the two adapter files.

    peft records the base model's folder in ``base_model_name_or_path``; an adapter leaves the
    machine (downloads, bundles), so it names the base by its folder's name instead, which for
    a registry model is its registry name, never a server path. ``base_name`` None: as peft
    wrote it (an intermediate adapter that is loaded again here)."""
    import json

    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(
        str(dest),
        selected_adapters=[ADAPTER_NAME],
        safe_serialization=True,
        **({} if state_dict is None else {"state_dict": state_dict}),
    )
    for path in dest.iterdir():
        if path.name not in ADAPTER_FILES:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
    missing = [name for name in ADAPTER_FILES if not (dest / name).is_file()]
    if missing:
        raise CotuneError(f"saving the adapter to {dest} did not write {', '.join(missing)}")
    if base_name is None:
        return
    config_path = dest / "adapter_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = base_name
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _replace_dir(src: Path, dest: Path) -> None:
    """Move ``src`` to ``dest``, replacing a previous ``dest``; ``dest`` is never half-written."""
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{time.time_ns()}")
        dest.rename(old)
        src.rename(dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        src.rename(dest)
