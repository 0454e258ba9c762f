"""Whether a job's models fit a worker's GPUs: an estimate from each model's ``config.json``.

Checked when a job is created (the API, with ``Settings.gpu_memory_gib``) and when a worker
validates a job it runs (its own GPUs, measured). The estimate is deliberately plain and errs
on the generous side: a refusal shows its numbers so an admin can judge them.

- Inference (vLLM): the weights in the registration's dtype plus one ``max_model_len`` sequence
  of KV cache plus a fixed overhead per GPU, against ``tensor_parallel`` GPUs x memory x the
  engine's share.
- Training (LoRA SFT/DPO, while the engines sleep): the weights in bf16 (QLoRA: the linear
  layers in 4-bit NF4, 4.5 bits a parameter, the rest bf16), the LoRA parameters with their
  gradients and Adam moments (16 bytes each, fp32), the activations of one micro-batch
  (``TrainConfig.micro_batch_tokens``; QLoRA checkpoints them) and the logits, against
  ``train_gpus`` GPUs (FSDP shards the rest; activations counted whole) x memory x the share.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from cotune.errors import SpecError
from cotune.spec.job import JobSpec, TrainConfig

if TYPE_CHECKING:
    from cotune.spec import ModelRef

GiB = float(1 << 30)
DTYPE_BYTES = {"float32": 4.0, "bfloat16": 2.0, "float16": 2.0}
NF4_BYTES = 4.5 / 8  # 4-bit values plus one fp32 absmax per 64 (bitsandbytes, no double quant)
LORA_STATE_BYTES = 16  # fp32 weight + gradient + Adam's two moments
ACTIVATION_BYTES = 34  # per token, hidden unit and layer in bf16 (Korthikanti et al. 2022)
OVERHEAD_GIB = 1.0  # CUDA context and allocator slack, per GPU


class DeviceBudget(BaseModel):
    """The GPUs a worker gives cotune."""

    model_config = ConfigDict(frozen=True)

    gpus: int = Field(ge=1, description="GPUs on the worker")
    memory_gib: float = Field(gt=0, description="memory of one GPU")
    share: float = Field(gt=0, le=1, description="the share of each GPU cotune may take")
    train_gpus: int = Field(default=1, ge=1, description="GPUs one adapter trains on (FSDP)")


class Shape(BaseModel):
    """What the estimate reads from ``config.json``."""

    hidden: int
    layers: int
    vocab: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    experts: int = 1
    tied: bool = False
    torch_dtype: str | None = None


class Estimate(BaseModel):
    """One model's estimated needs (GiB) against what the worker offers."""

    parameters: int
    inference_gib: float
    inference_available_gib: float
    training_gib: float
    training_available_gib: float

    @property
    def fits(self) -> bool:
        return (
            self.inference_gib <= self.inference_available_gib
            and self.training_gib <= self.training_available_gib
        )


def read_shape(model_dir: Path) -> Shape | None:
    """The model's shape, or None when ``config.json`` lacks what the estimate needs."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    text: dict[str, Any] = config.get("text_config") or config
    try:
        hidden = int(text["hidden_size"])
        heads = int(text["num_attention_heads"])
        return Shape(
            hidden=hidden,
            layers=int(text["num_hidden_layers"]),
            vocab=int(text["vocab_size"]),
            intermediate=int(text.get("intermediate_size") or 4 * hidden),
            heads=heads,
            kv_heads=int(text.get("num_key_value_heads") or heads),
            head_dim=int(text.get("head_dim") or hidden // heads),
            experts=int(text.get("num_local_experts") or text.get("num_experts") or 1),
            tied=bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
            torch_dtype=config.get("torch_dtype") or config.get("dtype") or text.get("dtype"),
        )
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None


def _linear_sizes(s: Shape) -> list[tuple[int, int, int]]:
    """(inputs, outputs, copies) of each linear layer of one decoder layer."""
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    return [
        (s.hidden, q, 1),
        (s.hidden, kv, 2),
        (q, s.hidden, 1),
        (s.hidden, s.intermediate, 2 * s.experts),  # gate, up
        (s.intermediate, s.hidden, s.experts),  # down
    ]


def estimate(
    s: Shape,
    train: TrainConfig,
    budget: DeviceBudget,
    *,
    dtype: str = "auto",
    tensor_parallel: int = 1,
    max_model_len: int = 4096,
    engine_share: float | None = None,
) -> Estimate:
    """The needs of one model; ``engine_share``: its engine's share of a GPU (default: all of
    ``budget.share``)."""
    linear = s.layers * sum(i * o * n for i, o, n in _linear_sizes(s))
    embeddings = s.vocab * s.hidden * (1 if s.tied else 2)
    other = (2 * s.layers + 1) * s.hidden  # norms
    parameters = linear + embeddings + other
    lora = s.layers * sum(train.lora_r * (i + o) * n for i, o, n in _linear_sizes(s))

    served = s.torch_dtype if dtype == "auto" else dtype
    serve_bytes = DTYPE_BYTES.get(str(served), 4.0)
    kv_cache = 2 * s.layers * s.kv_heads * s.head_dim * serve_bytes * max_model_len
    inference = (parameters * serve_bytes + kv_cache) / GiB + OVERHEAD_GIB * tensor_parallel

    tokens = train.micro_batch_tokens
    if train.qlora:
        weights = linear * NF4_BYTES + (embeddings + other) * 2
        # Gradient checkpointing: each layer's input kept, one layer's activations live.
        activations = tokens * s.hidden * 2 * s.layers + tokens * s.hidden * ACTIVATION_BYTES
    else:
        weights = parameters * 2.0
        activations = tokens * s.hidden * ACTIVATION_BYTES * s.layers
    logits = tokens * s.vocab * (2 + 4 + 4)  # bf16 logits, their fp32 copy and its gradient
    training_gpus = min(budget.train_gpus, budget.gpus)
    training = (weights + lora * LORA_STATE_BYTES + activations + logits) / GiB
    training += OVERHEAD_GIB * training_gpus
    share = budget.share if engine_share is None else engine_share
    return Estimate(
        parameters=parameters,
        inference_gib=round(inference, 2),
        inference_available_gib=round(tensor_parallel * budget.memory_gib * share, 2),
        training_gib=round(training, 2),
        training_available_gib=round(training_gpus * budget.memory_gib * budget.share, 2),
    )


def check_fits(
    model_dir: Path,
    train: TrainConfig,
    budget: DeviceBudget,
    *,
    param: str,
    engines: int = 1,
) -> Estimate | None:
    """Refuse (``SpecError`` on ``param``) a model whose estimate exceeds the worker's GPUs, or
    whose registration asks for more GPUs than the worker has; None when ``config.json`` does
    not tell enough to estimate. ``engines``: how many engines share the GPUs."""
    from cotune.engines.vllm import model_context_length, model_options

    options = model_options(str(model_dir))
    tensor_parallel = int(options.get("tensor_parallel") or 1)
    if tensor_parallel > budget.gpus:
        raise SpecError(
            f"{param}: the model is registered with tensor_parallel {tensor_parallel}, but the "
            f"worker has {budget.gpus} GPU(s)",
            param=param,
        )
    shape = read_shape(model_dir)
    if shape is None:
        return None
    found = estimate(
        shape,
        train,
        budget,
        dtype=str(options.get("dtype") or "auto"),
        tensor_parallel=tensor_parallel,
        max_model_len=min(4096, model_context_length(str(model_dir))),
        engine_share=budget.share / max(engines, 1),
    )
    if not found.fits:
        raise SpecError(
            f"{param}: the model does not fit the worker's GPUs: about "
            f"{found.parameters / 1e9:.2f} B parameters need ~{found.inference_gib} GiB to "
            f"serve (available: {found.inference_available_gib} GiB = {tensor_parallel} GPU(s) x "
            f"{budget.memory_gib} GiB x share {budget.share / max(engines, 1):.2f}) and "
            f"~{found.training_gib} GiB to train{' in 4-bit' if train.qlora else ' in bf16'} "
            f"(available: {found.training_available_gib} GiB = "
            f"{min(budget.train_gpus, budget.gpus)} GPU(s) x {budget.memory_gib} GiB x share "
            f"{budget.share}); use a smaller model, train.qlora, a smaller "
            "train.micro_batch_tokens or a worker with more GPU memory",
            param=param,
        )
    return found


def measured_budget(gpus: int | None, share: float, train_gpus: int = 1) -> DeviceBudget | None:
    """This machine's CUDA GPUs (``gpus``: how many to use, None: all); None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    count = torch.cuda.device_count() if gpus is None else min(gpus, torch.cuda.device_count())
    if count < 1:
        return None
    memory = min(torch.cuda.get_device_properties(i).total_memory for i in range(count)) / GiB
    return DeviceBudget(
        gpus=count, memory_gib=round(memory, 2), share=share, train_gpus=min(train_gpus, count)
    )


def check_job_fits(
    job: JobSpec, budget: DeviceBudget, folder: Callable[[str, ModelRef], Path | None]
) -> None:
    """``check_fits`` for each model the job's LLM components use; ``folder(alias, ref)`` is
    the model's local folder (None: not on this machine, not checked)."""
    system = job.system
    for alias in sorted({c.model for c in system.llm_components if c.model is not None}):
        found = folder(alias, system.models[alias])
        if found is not None:
            check_fits(
                found,
                job.train,
                budget,
                param=f"system.models.{alias}",
                engines=job.local_model_count(),
            )
