"""What a job records, as one pydantic schema module for ``metrics.json``, the store and the API.

A job's cost lives in ``StageRecord`` (per epoch and stage); what was learned lives in
``ComponentEpochRecord`` (per epoch and component) and ``EpochRecord`` (per epoch). What each
stage hands the next is a typed ``StageOut`` (``EvalOut``, ``RolloutOut``, ...), stored as JSON
under ``(job, epoch, stage)`` and read back through ``stage_output_model``.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, Field, model_validator

from cotune.judge import JudgeOutcome
from cotune.runtime import Trace
from cotune.training import DPOPair, SFTRow


class Stage(StrEnum):
    baseline = "baseline"  # epoch 0: the base system on val, the bar epoch 1 must clear
    rollout = "rollout"
    credit = "credit"
    verify = "verify"
    synthesize = "synthesize"
    train = "train"
    evaluate = "evaluate"
    test = "test"  # the best epoch (or the base) on test, once


EPOCH_STAGES = [
    Stage.rollout,
    Stage.credit,
    Stage.verify,
    Stage.synthesize,
    Stage.train,
    Stage.evaluate,
]


def stage_order(stage: Stage) -> int:
    """Where a stage runs within its epoch (``Stage`` is declared in the loop's order)."""
    return list(Stage).index(Stage(stage))


class StageRecord(BaseModel):
    epoch: int
    stage: Stage
    seconds: float = 0.0
    engine_calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    judge_calls: int = 0
    trained_tokens: int = 0
    details: dict[str, int | float] = Field(
        default_factory=dict,
        description="what the stage produced, in counts (its output's ``details()``: traces and "
        "passed, failed and judged, candidates and verified, samples and pairs, ...)",
    )


class ComponentEpochRecord(BaseModel):
    epoch: int
    component: str
    blame_rate: float | None = Field(
        None,
        description="share of the judged failed traces whose decisive span the judge put on "
        "this component; None when no failed trace was judged (no judge, or none answered)",
    )
    verified_rate: float = Field(
        0.0, description="share of the failed traces with a verified fix for this component"
    )
    candidates_proposed: int = 0
    candidates_verified: int = 0
    samples: int = 0  # SFT rows in the cumulative buffer used for training
    pairs: int = 0
    trained: bool = False
    skipped_reason: str | None = None
    sft_losses: list[float] = Field(default_factory=list)
    dpo_losses: list[float] = Field(default_factory=list)
    adapter: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _stored_before_verified_rate(cls, data: Any) -> Any:
        """Records stored before ``verified_rate`` existed called it ``blame_rate``: move it
        over (the judge's own blame of those epochs was not recorded). A stored record holds
        every field, so one with ``candidates_verified`` but no ``verified_rate`` is old."""
        if (
            isinstance(data, dict)
            and "verified_rate" not in data
            and "candidates_verified" in data
            and "blame_rate" in data
        ):
            data = {**data, "verified_rate": data["blame_rate"], "blame_rate": None}
        return data


class EpochRecord(BaseModel):
    epoch: int
    train_score: float | None = None
    val_score: float | None = None
    kept: bool = False  # its adapters became the current ones
    judge_failures: int = 0
    components: list[ComponentEpochRecord] = Field(default_factory=list)


class Event(BaseModel):
    level: str = "info"
    message: str
    data: dict[str, Any] = Field(default_factory=dict)
    created_at: float | None = None


# Why a candidate was accepted: its replay raised the task score ("score"), graded verification
# found it strictly closer to gold ("graded"), or verification was off ("unverified").
AcceptedBy = Literal["score", "graded", "unverified"]
# A single span's correction, or one member of a joint correction: several spans' outputs
# replayed together, each member attributed by leave-one-out (docs/algorithm.md).
CandidateKind = Literal["single", "joint"]


class Candidate(BaseModel):
    """A proposed output for a span and what replaying the system with it showed."""

    epoch: int
    trace_id: str
    example_id: str
    component: str
    # "judge", "gold" (the final writer's own inputs admitted it: cotune.verify.hindsight_target)
    # or "resample"
    source: str
    proposed_output: Any
    original_output: Any
    original_score: float
    replay_scores: list[float]
    baseline_scores: list[float] = Field(default_factory=list)
    accepted: bool
    critique: str | None = None
    # graded verification (loop.graded_verification): the task metric's graded companion of
    # the original trace, of each replay and of each unmodified replay; empty without one
    original_graded: float | None = None
    replay_graded: list[float] = Field(default_factory=list)
    baseline_graded: list[float] = Field(default_factory=list)
    accepted_by: AcceptedBy | None = None  # None: refused (or stored before this existed)
    # joint corrections (loop.joint_candidates): this record is one member of the joint
    # ``joint_id`` of spans ``members``; its replay scores are the joint's; ``without_scores``
    # (and ``without_graded``) are the replays with every member but this one, and ``needed``
    # says whether the gain went (in part) away without it. None: not attributed (refused).
    kind: CandidateKind = "single"
    joint_id: str | None = None
    members: list[str] = Field(default_factory=list)
    without_scores: list[float] = Field(default_factory=list)
    without_graded: list[float] = Field(default_factory=list)
    needed: bool | None = None

    @property
    def verified(self) -> bool:
        """Replaying with it raised the score: above the original trace's (one replay) or
        the mean of the seeded replays of the unmodified span. ``accepted`` is the same unless
        the job turned verification off (``loop.verify_by_replay: false``) or on graded
        verification accepted it as ``closer``. A joint member is verified only when the
        joint raised the score and the member was ``needed``."""
        if not self.replay_scores or not self._attributed:
            return False
        return _mean(self.replay_scores) > self._reference_score

    @property
    def closer(self) -> bool:
        """Graded verification's rule: the replays' graded companion is strictly above the
        reference's (the original trace's, or the unmodified replays' mean) while their task
        score is not below the reference's. Without graded scores it is False."""
        if not self.replay_scores or not self.replay_graded or not self._attributed:
            return False
        reference = _mean(self.baseline_graded) if self.baseline_graded else self.original_graded
        if reference is None:
            return False
        return (
            _mean(self.replay_graded) > reference
            and _mean(self.replay_scores) >= self._reference_score
        )

    @property
    def _attributed(self) -> bool:
        """A single candidate stands alone; a joint member counts only where it was needed."""
        return self.kind == "single" or bool(self.needed)

    @property
    def _reference_score(self) -> float:
        return _mean(self.baseline_scores) if self.baseline_scores else self.original_score


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


class JobReport(BaseModel):
    """``metrics.json``: everything a dashboard or a benchmark needs about a finished job."""

    job_name: str
    status: str
    base_val_score: float | None = None
    best_epoch: int | None = None  # None: no epoch beat the base system
    best_val_score: float | None = None
    base_test_score: float | None = None
    test_score: float | None = None
    stop_reason: str | None = None
    epochs: list[EpochRecord] = Field(default_factory=list)
    stages: list[StageRecord] = Field(default_factory=list)
    component_test_scores: dict[str, Any] = Field(default_factory=dict)
    adapters: dict[str, str] = Field(default_factory=dict)

    def totals(self) -> dict[str, float]:
        keys = [
            "seconds",
            "engine_calls",
            "prompt_tokens",
            "completion_tokens",
            "judge_calls",
            "trained_tokens",
        ]
        return {k: round(sum(getattr(s, k) for s in self.stages), 3) for k in keys}


# -- stage outputs ----------------------------------------------------------------------------
# What each stage of ``cotune.loop`` returns and the next reads; stored as JSON under
# ``(job, epoch, stage)``. Jobs stored before these models existed hold the same JSON
# (tests/core/data/stage-outputs-v1/): a field added here needs a default.


class StageOut(BaseModel):
    """A stage's output."""

    judge_calls: int = Field(
        0,
        description="judge requests spent, repairs included: the credit stage's, the "
        "synthesize stage's paraphrases (loop.paraphrases), and with metric judge every "
        "stage's scoring",
    )

    def details(self) -> dict[str, int | float]:
        """Counts of what the stage produced, for its ``StageRecord``."""
        return {}

    def shown_traces(self) -> list[Trace]:
        """The traces the stage keeps for people to read (the API lists them)."""
        return []


def _passed(traces: list[Trace]) -> int:
    return sum(bool(t.passed) for t in traces)


class EvalOut(StageOut):
    """The system on a split: ``baseline`` (base on val) and each evaluation."""

    score: float = Field(description="mean score of the scored traces (0.0 when none is)")
    traces: list[Trace] = Field(default_factory=list, description="one trace per example")

    def details(self) -> dict[str, int | float]:
        return {"traces": len(self.traces), "passed": _passed(self.traces)}

    def shown_traces(self) -> list[Trace]:
        return self.traces


class RolloutOut(EvalOut):
    """The system with the current adapters on the epoch's seeded batch of train examples,
    then the epoch's fixed traces of rated runs (``data.feedback``, ``cotune.feedback``)."""

    feedback: int = Field(
        0, description="fixed traces (rated runs) among ``traces``, after the generated ones"
    )

    def details(self) -> dict[str, int | float]:
        return {**super().details(), "feedback": self.feedback}


class EvaluateOut(EvalOut):
    """The epoch's adapters on val."""

    kept: bool = Field(description="the adapters became the current ones (val >= best so far)")

    def details(self) -> dict[str, int | float]:
        return {**super().details(), "kept": int(self.kept)}


class CreditOut(StageOut):
    failed: int = Field(description="failed traces of the rollout")
    outcomes: list[JudgeOutcome] = Field(
        default_factory=list, description="the judge's samples per judged trace (no judge: none)"
    )
    judge_failures: int = Field(0, description="judge samples that gave no valid verdict")

    def details(self) -> dict[str, int | float]:
        return {
            "failed": self.failed,
            "judged": sum(o.ok for o in self.outcomes),
            "judge_failures": self.judge_failures,
        }


class VerifyOut(StageOut):
    candidates: list[Candidate] = Field(
        default_factory=list, description="every proposal, accepted or not, in proposal order"
    )
    replays: dict[int, Trace] = Field(
        default_factory=dict, description="the replayed trace of each candidate, by its index"
    )
    originals: list[Trace] = Field(
        default_factory=list,
        description="fixed traces (rated runs) scored by the job's scorer, the score their "
        "replays must beat (the rating is a person's, not the scorer's)",
    )

    def details(self) -> dict[str, int | float]:
        singles = [c for c in self.candidates if c.kind == "single"]
        members = [c for c in self.candidates if c.kind == "joint"]
        return {
            "candidates": len(singles),
            "verified": sum(c.verified for c in singles),
            "accepted_graded": sum(c.accepted_by == "graded" for c in singles),
            "joint_candidates": len({c.joint_id for c in members}),
            "joint_verified": len({c.joint_id for c in members if c.needed is not None}),
            "joint_members_needed": sum(c.accepted for c in members),
        }


class BufferRows(BaseModel):
    """The cumulative training rows of a job, per component (``synthesis.Buffer`` holds them
    while a stage adds to them)."""

    sft: dict[str, list[SFTRow]] = Field(default_factory=dict)
    dpo: dict[str, list[DPOPair]] = Field(default_factory=dict)


class BufferCount(BaseModel):
    samples: int = Field(0, description="SFT rows")
    pairs: int = Field(0, description="DPO pairs")


class SynthesizeOut(StageOut):
    buffer: BufferRows = Field(default_factory=BufferRows)
    counts: dict[str, BufferCount] = Field(
        default_factory=dict, description="rows per component (only those with any)"
    )
    augmented: int = Field(0, description="rows this epoch added from augmentation rollouts")
    augment_corrections: int = Field(
        0,
        description="of those, rows from verified corrections of the augmentation rollouts "
        "that failed",
    )
    paraphrases: int = Field(
        0,
        description="paraphrased train examples (loop.paraphrases) kept and rolled out in "
        "every augmentation round",
    )

    def details(self) -> dict[str, int | float]:
        return {
            "samples": sum(c.samples for c in self.counts.values()),
            "pairs": sum(c.pairs for c in self.counts.values()),
            "augmented": self.augmented,
            "augment_corrections": self.augment_corrections,
            "paraphrases": self.paraphrases,
        }


class ComponentTraining(BaseModel):
    """One component's training in one epoch."""

    trained: bool
    skipped_reason: str | None = Field(None, description="why it was not trained")
    adapter: str | None = Field(None, description="the adapter's artifact key")
    sft_losses: list[float] = Field(default_factory=list, description="per SFT step")
    dpo_losses: list[float] = Field(default_factory=list, description="per DPO step")
    trained_tokens: int = 0
    samples: int = Field(0, description="SFT rows trained on")
    pairs: int = Field(0, description="DPO pairs trained on")
    sft_steps: int = 0
    dpo_steps: int = 0
    seconds: float = 0.0


class TrainOut(StageOut):
    adapters: dict[str, str] = Field(
        description="component -> adapter key: this epoch's, else the current one"
    )
    components: dict[str, ComponentTraining] = Field(default_factory=dict)
    trained_tokens: int = 0
    release_seconds: float = Field(
        default=0.0, description="how long the engines took to step aside for the trainer"
    )
    reacquire_seconds: float = Field(
        default=0.0, description="how long the engines took to come back after training"
    )

    def details(self) -> dict[str, int | float]:
        return {
            "trained": sum(c.trained for c in self.components.values()),
            "release_seconds": self.release_seconds,
            "reacquire_seconds": self.reacquire_seconds,
        }


class TestOut(StageOut):
    """The base system and the best epoch's adapters on test, once each."""

    __test__: ClassVar[bool] = False  # a stage's output, not a pytest class to collect

    base: float | None = Field(description="the base system's test score (None: no test data)")
    best: float | None = Field(description="the best adapters' test score (the base's if none)")
    adapters: dict[str, str] = Field(
        default_factory=dict, description="the best epoch's adapter keys (empty: the base)"
    )
    traces: list[Trace] = Field(
        default_factory=list, description="the test traces of the best system"
    )

    def details(self) -> dict[str, int | float]:
        return {"traces": len(self.traces), "passed": _passed(self.traces)}

    def shown_traces(self) -> list[Trace]:
        return self.traces


STAGE_OUTPUTS: dict[Stage, type[StageOut]] = {
    Stage.baseline: EvalOut,
    Stage.rollout: RolloutOut,
    Stage.credit: CreditOut,
    Stage.verify: VerifyOut,
    Stage.synthesize: SynthesizeOut,
    Stage.train: TrainOut,
    Stage.evaluate: EvaluateOut,
    Stage.test: TestOut,
}


def stage_output_model(stage: Stage) -> type[StageOut]:
    """The model of what ``stage`` stores."""
    return STAGE_OUTPUTS[stage]
