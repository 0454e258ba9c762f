"""How a job scores a system's final outputs: one ``Scorer`` for rollouts, replays and evaluation.

Every stage that scores (baseline, rollout, verify's replays, augmentation, evaluate, test)
calls ``scorer.score(traces)``, which sets each trace's ``score`` and ``passed`` in place:

- ``GoldScorer``: the task metric against each row's ``expected`` (``cotune.metrics``); a
  trace without gold stays unscored. Where the metric is binary and has a graded companion
  (``exact_match``, ``contains``, ``list_equal``) it also sets ``graded_score``, which only
  graded verification reads (``cotune.verify``); ``score`` stays the task metric.
- ``JudgeScorer`` (``metric: judge``): the judge scores each final output 0-1 under the
  system's ``rubric`` (``cotune.judge.score``), K samples averaged; ``pass_threshold`` decides
  pass/fail. Scores are cached by (inputs, gold, output), shared by every scorer of a job's
  context and seeded from its stored stages (``JobContext.scorer``), so an output met again (a
  replay that changed nothing, an unchanged val output) is not judged twice. A trace whose
  samples all failed, or that the budget left unjudged, stays unscored (``score`` None): it
  counts as failed and a replay of it cannot be verified.

``calls`` is what this scorer spent in judge requests: the stage that used it records them,
so they count against ``budget.max_judge_calls`` like the credit stage's.

``judge_agreement`` checks a judge against gold where gold exists: how often its passes are
right by a gold metric (``cotune eval --judge --gold-metric``, ``benchmarks/traces_vs_gold.py``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from pydantic import BaseModel, Field, computed_field

from cotune.engines.base import InferenceEngine
from cotune.runtime import Trace, score_traces
from cotune.spec import SystemSpec


class Scorer(Protocol):
    calls: int

    def score(self, traces: Sequence[Trace]) -> None: ...


@dataclass
class GoldScorer:
    """The task metric against gold; never calls a judge."""

    system: SystemSpec
    calls: int = 0

    def score(self, traces: Sequence[Trace]) -> None:
        from cotune.metrics import companion_score, has_companion

        score_traces(self.system, traces)
        if has_companion(self.system.metric):
            for trace in traces:
                if trace.expected is not None:
                    trace.graded_score = companion_score(
                        self.system.metric, trace.output, trace.expected
                    )


@dataclass(frozen=True)
class CachedScore:
    samples: list[float]
    reason: str | None


ScoreCache = dict[str, CachedScore]


def cache_key(trace: Trace) -> str:
    """What a score depends on: the inputs, the gold shown as a reference, the output."""
    return json.dumps(
        [trace.inputs, trace.expected, trace.output],
        sort_keys=True,
        default=str,
        separators=(",", ":"),
    )


@dataclass
class JudgeScorer:
    """The judge under the rubric. ``max_calls`` caps this scorer's requests (None: no cap);
    a batch is judged only while its worst case (every sample repaired) fits."""

    engine: InferenceEngine
    system: SystemSpec
    samples: int
    temperature: float
    max_tokens: int
    seed: int
    cache: ScoreCache = field(default_factory=dict)
    max_calls: int | None = None
    calls: int = 0
    failures: int = 0  # outputs whose every sample failed

    def score(self, traces: Sequence[Trace]) -> None:
        from cotune.judge.score import judge_scores

        todo: dict[str, Trace] = {}
        for trace in traces:
            key = cache_key(trace)
            if key not in self.cache:
                todo.setdefault(key, trace)
        keys = list(todo)
        if self.max_calls is not None:
            keys = keys[: max(self.max_calls - self.calls, 0) // (2 * self.samples)]
        outcomes = judge_scores(
            self.engine,
            self.system,
            [todo[k] for k in keys],
            samples=self.samples,
            temperature=self.temperature,
            max_tokens=self.max_tokens,
            seed=self.seed,
        )
        for key, outcome in zip(keys, outcomes, strict=True):
            self.calls += outcome.calls
            self.failures += not outcome.scores
            reason = outcome.reasons[0] if outcome.reasons else "; ".join(outcome.failures)
            self.cache[key] = CachedScore(outcome.scores, reason or None)
        for trace in traces:
            cached = self.cache.get(cache_key(trace))
            if cached is None:  # left unjudged by the budget
                trace.score = trace.passed = None
                continue
            trace.score_samples, trace.score_reason = list(cached.samples), cached.reason
            if cached.samples:
                trace.score = sum(cached.samples) / len(cached.samples)
                trace.passed = trace.score >= self.system.pass_threshold
            else:
                trace.score = trace.passed = None


class JudgeAgreement(BaseModel):
    """A judge's passes against a gold metric's, over the traces that have gold."""

    gold_metric: str = Field(description="the metric that says right or wrong against gold")
    threshold: float = Field(description="a gold score at least this is right")
    pass_right: int = Field(0, description="judge passed, gold right")
    pass_wrong: int = Field(0, description="judge passed, gold wrong")
    fail_right: int = Field(0, description="judge failed, gold right")
    fail_wrong: int = Field(0, description="judge failed, gold wrong")
    unscored: int = Field(0, description="the judge gave no score (every sample failed)")

    @computed_field  # type: ignore[prop-decorator]
    @property
    def precision(self) -> float | None:
        """Of the outputs the judge passed, the share that are right (None: it passed none)."""
        passed = self.pass_right + self.pass_wrong
        return self.pass_right / passed if passed else None

    @computed_field  # type: ignore[prop-decorator]
    @property
    def recall(self) -> float | None:
        """Of the right outputs, the share the judge passed (None: none was right)."""
        right = self.pass_right + self.fail_right
        return self.pass_right / right if right else None


def judge_agreement(
    traces: Sequence[Trace],
    gold: Mapping[str, Sequence[str]],
    *,
    metric: str,
    threshold: float = 1.0,
) -> JudgeAgreement:
    """Count each judged trace whose example has answers in ``gold`` (example id -> answers)
    by the judge's pass and by ``metric``'s score of its output at ``threshold``."""
    from cotune.metrics import score

    counts = JudgeAgreement(gold_metric=metric, threshold=threshold)
    for trace in traces:
        answers = gold.get(trace.example_id)
        if not answers:
            continue
        if trace.passed is None:
            counts.unscored += 1
            continue
        right = score(metric, trace.output, list(answers)) >= threshold
        cell = f"{'pass' if trace.passed else 'fail'}_{'right' if right else 'wrong'}"
        setattr(counts, cell, getattr(counts, cell) + 1)
    return counts
