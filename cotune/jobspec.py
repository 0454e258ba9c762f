"""The job spec: a system plus data, judge, loop, training and budget settings.

Every setting has a documented default; a bad value raises a ``SpecError`` whose message and
``param`` name the setting (``loop.epochs``) and the value given.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from cotune.errors import SpecError
from cotune.spec import (
    Float,
    Int,
    SystemSpec,
    _Strict,
    load_system,
    parse_system,
    read_mapping,
    refuse_loader_fields,
    spec_error_from,
)


class JudgeSpec(_Strict):
    """Who assigns credit: a model of the system (by alias), a registry model, or, in the
    embedded mode, an OpenAI-compatible endpoint whose key is read from ``api_key_env``."""

    model: str = Field(
        description="a model alias of the system, a registry name, or the "
        "served model name of an openai endpoint"
    )
    engine: Literal["openai"] | None = None
    url: str | None = None
    api_key_env: str | None = None
    max_tokens: Int = Field(default=384, ge=16, le=8192)
    temperature: Float = Field(
        default=0.7, ge=0.0, le=2.0, description="used when judge_samples > 1; one sample is greedy"
    )

    @model_validator(mode="after")
    def _openai_needs_url(self) -> JudgeSpec:
        if self.engine == "openai" and not self.url:
            raise ValueError("an openai judge needs 'url' (e.g. http://host:8000/v1)")
        if self.engine is None and (self.url or self.api_key_env):
            raise ValueError("'url' and 'api_key_env' go with engine: openai")
        return self


class LoopConfig(_Strict):
    epochs: Int = Field(default=3, ge=1, le=100)
    rollout_batch: Int = Field(
        default=36, ge=1, le=100_000, description="train examples rolled out per epoch"
    )
    samples_per_component: Int = Field(
        default=100, ge=1, le=1_000_000, description="SFT rows to aim for per component"
    )
    judge_samples: Int = Field(default=3, ge=1, le=16, description="K judge samples per trace")
    replays: Int = Field(
        default=1, ge=1, le=16, description="R replays per candidate (1 is enough when greedy)"
    )
    resample_candidates: Int = Field(
        default=2,
        ge=0,
        le=16,
        description="re-sampled outputs per failing span when the judge proposes none",
    )
    gold_candidates: bool = Field(
        default=True,
        description="propose the gold answer for the final writer when its own inputs "
        "contain it (verified by replay like any candidate)",
    )
    verify_by_replay: bool = Field(
        default=True,
        description="accept a candidate only when replaying the system with it raises the "
        "score; false accepts every candidate (an ablation: the replays still run and are "
        "recorded)",
    )
    candidate_temperature: Float = Field(default=0.8, gt=0.0, le=2.0)
    augment_rollouts: Int = Field(
        default=2, ge=0, le=16, description="extra sampled rollouts to fill up to N samples"
    )
    val_limit: Int | None = Field(
        default=None, ge=1, description="evaluate on at most this many val rows"
    )
    seed: Int = Field(
        default=0,
        ge=0,
        le=2**31 - 1,
        description="seeds rollout sampling, judge samples, shuffling and training",
    )


class TrainConfig(_Strict):
    method: Literal["sft", "sft+dpo"] = "sft+dpo"
    lora_r: Int = Field(default=16, ge=1, le=256)
    lora_alpha: Int = Field(default=32, ge=1, le=1024)
    lora_dropout: Float = Field(default=0.0, ge=0.0, lt=1.0)
    learning_rate: Float = Field(default=1.0e-4, gt=0.0, lt=1.0)
    epochs: Int = Field(default=2, ge=1, le=100)
    batch_size: Int = Field(default=8, ge=1, le=1024)
    dpo_beta: Float = Field(default=0.1, gt=0.0, le=10.0)
    dpo_learning_rate: Float | None = Field(
        default=None, gt=0.0, lt=1.0, description="defaults to learning_rate / 2"
    )
    max_length: Int = Field(default=1024, ge=32, le=32_768)
    micro_batch_tokens: Int = Field(
        default=512,
        ge=32,
        le=1_048_576,
        description="padded tokens per forward pass: a step's batch_size rows go through in "
        "micro-batches of at most this many tokens, gradients accumulated (one row at least). "
        "Memory, not results: the same rows per step. On a CPU, SmolLM2-135M's kb-qa training "
        "peaked 1.8 GB above the process at 512, 2.8 GB at 1024, at the same speed; a GPU "
        "with memory to spare trains faster with more",
    )
    qlora: bool = Field(default=False, description="4-bit base (bitsandbytes; GPU only)")


class BudgetConfig(_Strict):
    max_judge_calls: Int | None = Field(default=1000, ge=0)
    max_generated_tokens: Int | None = Field(default=2_000_000, ge=0)


class DataSplits(_Strict):
    train: str
    val: str
    test: str | None = None


class JobSpec(_Strict):
    system: SystemSpec
    data: DataSplits
    judge: JudgeSpec | None = None
    loop: LoopConfig = Field(default_factory=LoopConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    budget: BudgetConfig = Field(default_factory=BudgetConfig)
    engine: Literal["vllm", "transformers"] = "vllm"

    base_dir: Path | None = Field(default=None, exclude=True)

    @model_validator(mode="after")
    def _check(self) -> JobSpec:
        if self.judge is None and self.system.metric == "judge":
            raise ValueError("the system's metric is 'judge', so the job needs a 'judge'")
        if not self.system.trainable_components:
            raise ValueError("the system has no trainable llm component")
        return self

    def data_path(self, split: Literal["train", "val", "test"]) -> Path | None:
        value = getattr(self.data, split)
        if value is None:
            return None
        path = Path(value)
        return path if path.is_absolute() or self.base_dir is None else self.base_dir / path


def parse_job(data: dict[str, Any], base_dir: Path | None = None) -> JobSpec:
    """Validate a job mapping; ``system`` may be inline or a path relative to ``base_dir``."""
    refuse_loader_fields(data)  # an inline system's is refused by parse_system
    data = dict(data)
    system = data.get("system")
    if isinstance(system, str):
        path = Path(system) if base_dir is None else base_dir / system
        data["system"] = load_system(path)
    elif isinstance(system, dict):
        try:
            data["system"] = parse_system(system, base_dir=base_dir)
        except SpecError as err:
            raise SpecError(f"system: {err.message}", param=f"system.{err.param}") from None
    try:
        job = JobSpec.model_validate(data)
    except ValidationError as err:
        raise spec_error_from(err) from None
    job.base_dir = base_dir
    return job


def load_job(path: str | Path) -> JobSpec:
    path = Path(path)
    return parse_job(read_mapping(path), base_dir=path.resolve().parent)
