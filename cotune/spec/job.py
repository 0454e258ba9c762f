"""The job spec: a system plus data, judge, loop, training and budget settings.

Every setting has a documented default; a bad value raises a ``SpecError`` whose message and
``param`` name the setting (``loop.epochs``) and the value given.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from cotune.errors import SpecError
from cotune.spec.refs import DATA_PURPOSES, FileRef, Split
from cotune.spec.system import (
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
    engine: Literal["openai"] | None = Field(
        default=None, description="openai: an OpenAI-compatible endpoint (embedded mode only)"
    )
    url: str | None = Field(
        default=None, description="the openai endpoint's base URL, e.g. http://host:8000/v1"
    )
    api_key_env: str | None = Field(
        default=None,
        description="the environment variable holding the endpoint's key (never the key)",
    )
    max_tokens: Int = Field(
        default=384, ge=16, le=8192, description="tokens a judge answer may take at most"
    )
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
    epochs: Int = Field(
        default=3, ge=1, le=100, description="rollout -> credit -> verify -> train rounds"
    )
    rollout_batch: Int = Field(
        default=36, ge=1, le=100_000, description="train examples rolled out per epoch"
    )
    samples_per_component: Int = Field(
        default=100,
        ge=1,
        le=1_000_000,
        description="SFT rows to aim for per component: augmentation adds rows only to a "
        "component short of it, and only what it lacks",
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
        description="propose the gold answer for the final writer when its own inputs admit "
        "it: it occurs in them, or each of its words does (verified by replay like any "
        "candidate; docs/algorithm.md)",
    )
    verify_by_replay: bool = Field(
        default=True,
        description="accept a candidate only when replaying the system with it raises the "
        "score; false accepts every candidate (an ablation: the replays still run and are "
        "recorded)",
    )
    graded_verification: bool = Field(
        default=True,
        description="with a binary metric (exact_match, contains, list_equal), also accept a "
        "candidate whose replay moves the output strictly closer to gold by the metric's "
        "graded companion (token F1, a number's distance, list items right) while its task "
        "score does not fall; final scores stay the task metric (docs/algorithm.md)",
    )
    joint_candidates: bool = Field(
        default=True,
        description="also replay a failed trace with corrections of several spans together: "
        "each judge verdict's fixes of the upstream components at once, and (downstream "
        "first) each refused upstream fix completed with the final writer's gold target where "
        "its corrected inputs admit it; an accepted joint keeps only the members leave-one-out "
        "finds needed (docs/algorithm.md); false: single-span candidates only (an ablation)",
    )
    candidate_temperature: Float = Field(
        default=0.8, gt=0.0, le=2.0, description="sampling temperature of re-sampled candidates"
    )
    augment_rollouts: Int = Field(
        default=2,
        ge=0,
        le=16,
        description="rounds of extra sampled rollouts of the train split while a component "
        "has fewer than samples_per_component rows: the spans of those that pass become rows, "
        "and those that fail get gold, re-sampled (and joint) candidates verified by replay",
    )
    paraphrases: Int = Field(
        default=0,
        ge=0,
        le=8,
        description="rewrites of each train example's text inputs by the judge, made once per "
        "epoch when augmentation runs and rolled out beside the train split in every round, "
        "the example's gold kept; a rewrite whose numbers differ, that keeps under half the "
        "original's words or shows a gold answer the original does not is dropped "
        "(cotune/paraphrase.py). 0: none; needs a judge",
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
    keep: Literal["best", "last"] = Field(
        default="best",
        description="best: an epoch's adapters become the result only when their val score "
        "is at least the best so far (the base system's included); last: every trained epoch's "
        "adapters do, their val score reported beside the base's (OpenAI-style jobs, whose "
        "result is the trained model)",
    )


class TrainConfig(_Strict):
    method: Literal["sft", "sft+dpo"] = Field(
        default="sft+dpo", description="sft alone, or sft then DPO on correction pairs"
    )
    lora_r: Int = Field(default=16, ge=1, le=256, description="LoRA rank")
    lora_alpha: Int = Field(default=32, ge=1, le=1024, description="LoRA scaling numerator")
    lora_dropout: Float = Field(default=0.0, ge=0.0, lt=1.0, description="LoRA dropout")
    learning_rate: Float = Field(default=1.0e-4, gt=0.0, lt=1.0, description="SFT learning rate")
    epochs: Int = Field(
        default=2, ge=1, le=100, description="passes over the rows, in SFT and in DPO"
    )
    batch_size: Int = Field(default=8, ge=1, le=1024, description="rows per optimiser step")
    dpo_beta: Float = Field(
        default=0.1, gt=0.0, le=10.0, description="DPO's beta: how far from the SFT adapter"
    )
    dpo_learning_rate: Float | None = Field(
        default=None, gt=0.0, lt=1.0, description="defaults to learning_rate / 2"
    )
    max_length: Int = Field(
        default=1024, ge=32, le=32_768, description="tokens per training row at most"
    )
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
    rows: Literal["synthesized", "given", "targets"] = Field(
        default="synthesized",
        description="synthesized: the loop makes the rows (passing traces, verified "
        "corrections); given: the train split's gold outputs are the SFT rows of the system's "
        "one component, its rejected outputs the DPO pairs (supervised and dpo jobs in OpenAI's "
        "shape: no judge, no replay); targets: teacher forcing on each train row's 'targets' "
        "(the ideal value of fields the components write; the output field's is the gold "
        "answer): every trainable component whose field has one gets an SFT row, its prompt "
        "rendered from the inputs and the ideal values it reads (an oracle for benchmarks: "
        "its prompts hold ideal upstream outputs no real job has)",
    )


class BudgetConfig(_Strict):
    max_judge_calls: Int | None = Field(
        default=1000, ge=0, description="judge calls in the whole job at most; null: no limit"
    )
    max_generated_tokens: Int | None = Field(
        default=2_000_000, ge=0, description="generated tokens in the whole job; null: no limit"
    )


_SPLIT_FILE = "a JSONL or CSV file (relative to the job file) or, over HTTP, a file id"


class DataSplits(_Strict):
    """The examples; the walker of these references is ``cotune.spec.refs``."""

    train: str | None = Field(
        default=None,
        description=f"train examples: {_SPLIT_FILE}; optional when 'feedback' is given",
    )
    val: str = Field(
        description="val examples (choose the best epoch; judge-scored or with 'expected'): "
        f"{_SPLIT_FILE}"
    )
    test: str | None = Field(
        default=None, description=f"test examples, scored once at the end: {_SPLIT_FILE}"
    )
    feedback: str | None = Field(
        default=None,
        description="rated runs of the system ({inputs, output, feedback: {rating, comment?, "
        "corrected_output?}, spans?} rows, cotune/feedback.py): a JSONL file (relative to the "
        "job file) or, over HTTP, a file id of purpose feedback",
    )
    format: Literal["rows", "openai"] = Field(
        default="rows",
        description="rows: a row per example, the system's inputs and 'expected'; openai: "
        "OpenAI's fine-tuning JSONL ({messages} chat rows, or {input, preferred_output, "
        "non_preferred_output} preference rows; uploaded with purpose fine-tune), an example "
        "per assistant turn, read into the system's one input 'messages' "
        "(cotune/openai_jobs.py)",
    )

    @model_validator(mode="after")
    def _train_or_feedback(self) -> DataSplits:
        if self.train is None and self.feedback is None:
            raise SpecError(
                "give train examples, a feedback file (data.feedback), or both",
                param="data.train",
            )
        if self.feedback is not None and self.format == "openai":
            raise SpecError(
                "data.feedback holds rated runs of a system; data.format openai takes none",
                param="data.feedback",
            )
        return self


class JobSpec(_Strict):
    system: SystemSpec = Field(
        description="the system: inline, or a file relative to the job file (not over HTTP)"
    )
    data: DataSplits = Field(description="the example files: train, val and optionally test")
    judge: JudgeSpec | None = Field(
        default=None, description="who assigns credit; required when the metric is 'judge'"
    )
    loop: LoopConfig = Field(default_factory=LoopConfig, description="the epochs' settings")
    train: TrainConfig = Field(default_factory=TrainConfig, description="LoRA SFT and DPO")
    budget: BudgetConfig = Field(default_factory=BudgetConfig, description="hard limits")
    engine: Literal["vllm", "transformers"] = Field(
        default="vllm", description="the inference engine of the system's models"
    )

    # Set by the loader, never serialised (a spec that sets it is refused).
    base_dir: Path | None = Field(
        default=None, exclude=True, description="where relative data paths resolve"
    )

    @model_validator(mode="after")
    def _check(self) -> JobSpec:
        if self.judge is None and self.system.metric == "judge":
            raise ValueError("the system's metric is 'judge', so the job needs a 'judge'")
        if not self.system.trainable_components:
            raise ValueError("the system has no trainable llm component")
        if self.loop.paraphrases and self.data.format == "openai":
            raise SpecError(
                "loop.paraphrases rewrites text inputs; data.format openai gives each example "
                "one input, 'messages', a conversation",
                param="loop.paraphrases",
            )
        if self.loop.paraphrases and self.judge is None:
            raise SpecError(
                f"loop.paraphrases is {self.loop.paraphrases}: the judge writes the "
                "paraphrases, and the job has no 'judge'",
                param="loop.paraphrases",
            )
        if self.data.format == "openai" and self.system.inputs != ["messages"]:
            raise SpecError(
                "data.format openai gives each example one input, 'messages'; the system's "
                f"inputs are {self.system.inputs}",
                param="system.inputs",
            )
        if self.data.feedback is not None and self.train.rows == "given":
            raise SpecError(
                "train.rows given trains on the train split's gold outputs only; a feedback "
                "file needs the loop's synthesized rows",
                param="data.feedback",
            )
        if self.train.rows == "given":
            writer = self.system.writer_of(self.system.output)
            names = [c.name for c in self.system.components]
            if len(names) != 1 or writer is None or writer.kind != "llm":
                raise SpecError(
                    "train.rows given trains the system's one llm component on the data's gold "
                    f"outputs; this system has components {names}",
                    param="train.rows",
                )
        return self

    def local_model_count(self) -> int:
        """How many base models the job serves in-process, one engine each: those of its LLM
        components, and the judge's unless it is an endpoint."""
        used = {c.model for c in self.system.llm_components if c.model is not None}
        if self.judge is not None and self.judge.engine != "openai":
            used.add(self.judge.model)
        return max(len(used), 1)

    def data_path(self, split: Split | Literal["feedback"]) -> Path | None:
        value = getattr(self.data, split)
        if value is None:
            return None
        path = Path(value)
        return path if path.is_absolute() or self.base_dir is None else self.base_dir / path

    def ref_path(self, ref: FileRef) -> Path:
        """Where a file the spec names (``cotune.spec.refs``) is: a data split relative to
        the job file's folder, a corpus or a model to the system file's."""
        if ref.purpose in DATA_PURPOSES:
            path = Path(str(ref.value))
            return path if path.is_absolute() or self.base_dir is None else self.base_dir / path
        return self.system.resolve_path(str(ref.value))


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
