"""LoRA training of one component: TRL SFT from the base model, then DPO on top of it.

``train_adapter`` turns a component's SFT rows (rendered prompt messages -> target output) and
DPO pairs into one PEFT LoRA adapter folder holding only ``adapter_config.json`` and
``adapter_model.safetensors`` (DESIGN.md §5):

- SFT always starts from the base model (the loop passes the cumulative buffer each epoch), with
  LoRA on all linear layers, on a conversational prompt-completion dataset, so that the loss
  covers the completion tokens only: the assistant text, its end-of-turn token and whatever the
  chat template renders after it (a newline for ChatML). ``completion_mask_preview`` shows the
  labels exactly as the trainer's collator builds them.
- DPO, when the method is ``sft+dpo`` and pairs exist, continues training the SFT adapter
  against a frozen copy of itself (DESIGN.md §7): the SFT adapter is loaded trainable as
  ``default``, ``DPOTrainer`` adds the frozen reference adapter ``ref``, and only ``default`` is
  saved. (An adapter may never be named ``train``: that clashes with ``nn.Module.train``.)

Without a GPU, bf16 and gradient checkpointing are off (TRL turns both on by default; on a CPU a
step took 64 s with them and 4.2 s without). QLoRA (``TrainConfig.qlora``) loads the base in
4-bit through bitsandbytes and needs a CUDA GPU; it cannot run on a CPU-only machine, so it is
not exercised by the CPU test suite.

Runs are deterministic for a seed on one machine with a fixed torch thread count (tests compare
adapters with atol 1e-5); a different thread count may change the last bits.

torch, transformers, datasets, peft and trl are imported inside the functions, so importing this
module costs nothing.
"""

from __future__ import annotations

import gc
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cotune.errors import CotuneError
from cotune.spec.job import TrainConfig

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
ADAPTER_NAME = "default"  # peft's default; never "train" (it clashes with nn.Module.train)

Progress = Callable[[str], None]


@dataclass
class SFTRow:
    """One training example for a component."""

    messages: list[dict[str, str]]  # the rendered prompt messages (system?/user)
    completion: str  # the target output
    source: str = ""  # "bootstrap" | "correction" | "downstream" | "augment"


@dataclass
class DPOPair:
    """One preference pair: the same prompt, a preferred and a dispreferred output."""

    messages: list[dict[str, str]]
    chosen: str
    rejected: str


@dataclass
class TrainResult:
    adapter_dir: Path
    sft_losses: list[float] = field(default_factory=list)
    dpo_losses: list[float] = field(default_factory=list)
    sft_steps: int = 0
    dpo_steps: int = 0
    trained_tokens: int = 0  # prompt + completion tokens the trainers processed, all epochs
    seconds: float = 0.0


# -- public API --------------------------------------------------------------------------------


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
    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        with _quiet():
            result = _train(
                base_model, sft_rows, dpo_pairs, config, work, seed=seed, gpu=gpu, say=say
            )
        _replace_dir(work / "adapter", out_dir)
    finally:
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
    _export_adapter(
        trainer.accelerator.unwrap_model(trainer.model),
        sft_dir,
        None if do_dpo else base_model.name,
    )
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
        sft_dir.rename(final)
    else:
        result.trained_tokens += config.epochs * _dpo_tokens(dpo.train_dataset, config)
        say(
            f"dpo: {len(dpo.train_dataset)} pairs, {config.epochs} epoch(s), "
            f"{dpo.args.per_device_train_batch_size} pair(s) per pass"
        )
        dpo.train()
        result.dpo_steps = int(dpo.state.global_step)
        _export_adapter(dpo.accelerator.unwrap_model(dpo.model), final, base_model.name)
    del dpo, model
    _free_memory(gpu)
    return result


def _free_memory(gpu: bool) -> None:
    """Trainers hold reference cycles; collect them so the next model fits (GPU memory), and
    hand freed heap pages back to the OS: glibc keeps them otherwise, and a CPU process that
    trained SmolLM2-135M once stayed 1.7 GB larger than it needed to (2.3 GB against 0.6)."""
    gc.collect()
    if gpu:
        import torch

        torch.cuda.empty_cache()
    _trim_heap()


def _trim_heap() -> None:
    import contextlib
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):  # not glibc (musl): nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


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


# -- pieces ------------------------------------------------------------------------------------


def _check_device(config: TrainConfig) -> bool:
    """Whether training runs on a CUDA GPU; refuses QLoRA without one (before loading)."""
    import torch

    gpu = bool(torch.cuda.is_available())
    if config.qlora:
        if not gpu:
            raise CotuneError(
                "qlora needs a CUDA GPU (bitsandbytes 4-bit); set train.qlora: false to train "
                "a LoRA adapter on this machine"
            )
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as err:
            raise CotuneError(
                "qlora needs the bitsandbytes package (pip install 'cotune[gpu]')"
            ) from err
    return gpu


@contextmanager
def _quiet() -> Iterator[None]:
    """No progress bars from datasets' map and transformers' weight loading while training;
    progress goes through the ``progress`` callback instead. Restores the previous state."""
    import datasets
    from transformers.utils import logging as hf_logging

    datasets_bars = datasets.is_progress_bar_enabled()
    hf_bars = hf_logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if datasets_bars:
            datasets.enable_progress_bars()
        if hf_bars:
            hf_logging.enable_progress_bar()


def _without_printer(trainer: Any) -> Any:
    """Drop the callback that prints every log dict to stdout (``disable_tqdm`` adds it)."""
    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    return trainer


def _use_bf16(gpu: bool) -> bool:
    import torch

    return gpu and bool(torch.cuda.is_bf16_supported())


def _load_tokenizer(base_model: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(base_model))


def _load_base(base_model: Path, config: TrainConfig, gpu: bool) -> Any:
    """The base model: fp32 on CPU, bf16 on a bf16 GPU, 4-bit NF4 for QLoRA (GPU only)."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": torch.bfloat16 if _use_bf16(gpu) else torch.float32}
    if config.qlora:
        # Only reachable with CUDA and bitsandbytes (checked by _check_device); the CPU test
        # suite cannot run this path.
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    model = AutoModelForCausalLM.from_pretrained(str(base_model), **kwargs)
    if config.qlora:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    return model


def _lora_config(config: TrainConfig) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )


def rows_per_pass(config: TrainConfig, longest: int, sequences_per_row: int = 1) -> int:
    """Rows per forward pass: the largest divisor of ``batch_size`` whose padded tokens fit
    ``micro_batch_tokens`` (at least one). Activations grow with rows x length (and attention
    with length squared): eight 800-token rows took 19 GiB in one SFT pass of SmolLM2-135M on a
    CPU. A divisor keeps every step at ``batch_size`` rows, as without accumulation."""
    padded = min(longest, config.max_length) * sequences_per_row
    fitting = [
        rows
        for rows in range(1, config.batch_size + 1)
        if config.batch_size % rows == 0 and rows * padded <= config.micro_batch_tokens
    ]
    return max(fitting, default=1)


def _longest_conversation(tokenizer: Any, conversations: list[list[dict[str, str]]]) -> int:
    """Tokens of the longest conversation, as the chat template renders it."""
    texts = [tokenizer.apply_chat_template(c, tokenize=False) for c in conversations]
    if not texts:
        return 0
    return max(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])


def _trainer_args(
    config: TrainConfig,
    run_dir: Path,
    *,
    seed: int,
    gpu: bool,
    learning_rate: float,
    per_pass: int,
) -> dict[str, Any]:
    """Arguments shared by SFTConfig and DPOConfig."""
    return dict(
        output_dir=str(run_dir),
        num_train_epochs=config.epochs,
        per_device_train_batch_size=per_pass,
        gradient_accumulation_steps=config.batch_size // per_pass,
        learning_rate=learning_rate,
        max_length=config.max_length,
        seed=seed,
        data_seed=seed,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        # TRL defaults to bf16 and gradient checkpointing: on a CPU both make a step ~15x slower
        # (DESIGN.md §7). On a GPU, bf16 where supported; checkpointing only for QLoRA, whose
        # point is fitting a large base in little memory.
        bf16=_use_bf16(gpu),
        fp16=False,
        gradient_checkpointing=bool(gpu and config.qlora),
        use_cpu=not gpu,
    )


def _sft_trainer(
    model: Any,
    tokenizer: Any,
    rows: list[SFTRow],
    config: TrainConfig,
    run_dir: Path,
    *,
    seed: int,
    gpu: bool,
    peft_config: Any = None,
    callbacks: list[Any] | None = None,
) -> Any:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    # Conversational prompt-completion: TRL tokenises the prompt with the generation prompt
    # and the prompt+completion, and masks everything before the completion (labels -100).
    dataset = Dataset.from_list(
        [
            {
                "prompt": [dict(m) for m in row.messages],
                "completion": [{"role": "assistant", "content": row.completion}],
            }
            for row in rows
        ]
    )
    longest = _longest_conversation(
        tokenizer,
        [[*row.messages, {"role": "assistant", "content": row.completion}] for row in rows],
    )
    args = SFTConfig(
        **_trainer_args(
            config,
            run_dir,
            seed=seed,
            gpu=gpu,
            learning_rate=config.learning_rate,
            per_pass=rows_per_pass(config, longest),
        ),
        completion_only_loss=True,  # explicit: loss on completion tokens only
        assistant_only_loss=False,  # needs {% generation %} markers; the completion mask suffices
        packing=False,
        shuffle_dataset=False,  # the Trainer's seeded sampler shuffles each epoch
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks,
    )
    trainer.train_dataset = _no_loss_after_end_of_turn(trainer.train_dataset, tokenizer)
    return _without_printer(trainer)


END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


def _end_of_turn_ids(tokenizer: Any) -> set[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    vocab = tokenizer.get_vocab()
    return ids | {vocab[t] for t in END_OF_TURN_TOKENS if t in vocab}


def _no_loss_after_end_of_turn(dataset: Any, tokenizer: Any) -> Any:
    """Labels -100 after the completion's first end-of-turn token. Chat templates render a
    turn as ``...<|im_end|>\n``; generation stops at the end-of-turn token, so what follows it
    is never generated, and a model that never saw it there (a small or base model) would
    spend the loss on it."""
    stops = _end_of_turn_ids(tokenizer)

    def mask(example: dict[str, Any]) -> dict[str, Any]:
        labels = list(example["labels"])
        for i, label in enumerate(labels):
            if label != -100 and label in stops:
                labels[i + 1 :] = [-100] * (len(labels) - i - 1)
                break
        return {"labels": labels}

    if "labels" not in dataset.column_names:  # another TRL layout: leave it as TRL made it
        return dataset
    return dataset.map(mask, desc="Masking what follows the end of turn")


def _dpo_trainer(
    model: Any,
    tokenizer: Any,
    pairs: list[DPOPair],
    config: TrainConfig,
    run_dir: Path,
    *,
    seed: int,
    gpu: bool,
    callbacks: list[Any] | None = None,
) -> Any:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    dataset = Dataset.from_list(
        [
            {
                "prompt": [dict(m) for m in pair.messages],
                "chosen": [{"role": "assistant", "content": pair.chosen}],
                "rejected": [{"role": "assistant", "content": pair.rejected}],
            }
            for pair in pairs
        ]
    )
    learning_rate = config.dpo_learning_rate or config.learning_rate / 2
    longest = _longest_conversation(
        tokenizer,
        [
            [*pair.messages, {"role": "assistant", "content": answer}]
            for pair in pairs
            for answer in (pair.chosen, pair.rejected)
        ],
    )
    args = DPOConfig(
        **_trainer_args(
            config,
            run_dir,
            seed=seed,
            gpu=gpu,
            learning_rate=learning_rate,
            per_pass=rows_per_pass(config, longest, sequences_per_row=2),
        ),
        beta=config.dpo_beta,
    )
    # No ref_model and no peft_config: TRL copies the loaded `default` adapter into a frozen
    # `ref` adapter and trains `default` only (DESIGN.md §7).
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    return _without_printer(trainer)


def _dpo_tokens(dataset: Any, config: TrainConfig) -> int:
    """Tokens of prompt+chosen and prompt+rejected per pair, truncated as the collator does."""
    total = 0
    for example in dataset:
        prompt = len(example["prompt_ids"])
        for key in ("chosen_ids", "rejected_ids"):
            total += min(prompt + len(example[key]), config.max_length)
    return total


def _loss_callback(losses: list[float], stage: str, say: Progress) -> Any:
    from transformers import TrainerCallback

    class _Losses(TrainerCallback):
        def on_log(
            self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any
        ) -> None:
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))
                say(f"{stage}: step {state.global_step}/{state.max_steps} loss {logs['loss']:.4f}")

    return _Losses()


def _export_adapter(model: Any, dest: Path, base_name: str | None) -> None:
    """Save the ``default`` adapter as safetensors and keep only the two adapter files.

    peft records the base model's folder in ``base_model_name_or_path``; an adapter leaves the
    machine (downloads, bundles), so it names the base by its folder's name instead, which for
    a registry model is its registry name, never a server path. ``base_name`` None: as peft
    wrote it (an intermediate adapter that is loaded again here)."""
    import json

    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(dest), selected_adapters=[ADAPTER_NAME], safe_serialization=True)
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
