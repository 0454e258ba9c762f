"""What a job records, as one pydantic schema module for ``metrics.json``, the store and the API.

A job's cost lives in ``StageRecord`` (per epoch and stage); what was learned lives in
``ComponentEpochRecord`` (per epoch and component) and ``EpochRecord`` (per epoch).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import BaseModel, Field


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


class StageRecord(BaseModel):
    epoch: int
    stage: Stage
    seconds: float = 0.0
    engine_calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    judge_calls: int = 0
    trained_tokens: int = 0
    details: dict[str, Any] = Field(default_factory=dict)


class ComponentEpochRecord(BaseModel):
    epoch: int
    component: str
    blame_rate: float = 0.0  # share of failed traces whose decisive span was this component's
    candidates_proposed: int = 0
    candidates_verified: int = 0
    samples: int = 0  # SFT rows in the cumulative buffer used for training
    pairs: int = 0
    trained: bool = False
    skipped_reason: str | None = None
    sft_losses: list[float] = Field(default_factory=list)
    dpo_losses: list[float] = Field(default_factory=list)
    adapter: str | None = None


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


class Candidate(BaseModel):
    """A proposed output for a span and what replaying the system with it showed."""

    epoch: int
    trace_id: str
    example_id: str
    component: str
    source: str  # "judge", "gold" (the final writer's own inputs held it) or "resample"
    proposed_output: Any
    original_output: Any
    original_score: float
    replay_scores: list[float]
    baseline_scores: list[float] = Field(default_factory=list)
    accepted: bool
    critique: str | None = None

    @property
    def verified(self) -> bool:
        """Replaying with it raised the score: above the original trace's (one replay) or
        the mean of the seeded replays of the unmodified span. ``accepted`` is the same unless
        the job turned verification off (``loop.verify_by_replay: false``)."""
        if not self.replay_scores:
            return False
        reference = (
            sum(self.baseline_scores) / len(self.baseline_scores)
            if self.baseline_scores
            else self.original_score
        )
        return sum(self.replay_scores) / len(self.replay_scores) > reference


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
