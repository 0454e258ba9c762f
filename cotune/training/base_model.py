"""The base model on this machine: the device check (QLoRA needs CUDA), loading the base and its
tokenizer, the LoRA config, quiet progress bars, and freeing memory between trainers."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cotune.errors import CotuneError
from cotune.spec.job import TrainConfig


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

        from cotune.training.ranks import distributed

        sharded = distributed()
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.bfloat16,
            # FSDP shards only floating-point storage (training/fsdp.py; ran on one H200).
            **({"bnb_4bit_quant_storage": torch.bfloat16} if sharded else {}),
        )
        if not sharded:  # under FSDP, accelerate places the shards
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


def _free_memory(gpu: bool) -> None:
    """Trainers hold reference cycles; collect them so the next model fits (GPU memory), and
    hand freed heap pages back to the OS: glibc keeps them otherwise, and a CPU process that
    trained SmolLM2-135M once stayed 1.7 GB larger than it needed to (2.3 GB against 0.6)."""
    gc.collect()
    if gpu:
        import torch

        torch.cuda.empty_cache()
    trim_heap()


def trim_heap() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them otherwise)."""
    import contextlib
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):  # not glibc (musl): nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)
