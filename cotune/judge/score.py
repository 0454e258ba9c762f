"""The judge as the metric (``metric: judge``): a 0-1 score of a final output under the rubric.

One reply is ``{"reason": ..., "score": 0-1}``, decoded under ``score_schema`` where the engine
supports it and checked like a verdict (``extract_json``, then the pydantic model); a reply that
fails gets one batched repair, like the critique's. Gold, where the row has it, is shown as a
reference, never required. ``judge_scores`` scores a batch with K samples each (greedy when
K == 1, else seeded ``seed + i`` for sample i, so the same output always gets the same
requests) and never raises for bad replies or a failing endpoint: they are recorded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cotune.engines.base import GenerationRequest, InferenceEngine, Message
from cotune.judge.batch import generate_or_error
from cotune.judge.parse import JudgeParseError, extract_json, pydantic_reason
from cotune.judge.prompt import (
    INPUT_CHARS,
    SPAN_CHARS,
    clip,
    cut_note,
    no_repair_reason,
    render_text,
    repair_request,
)
from cotune.judge.schema import MAX_TEXT
from cotune.runtime import Trace
from cotune.spec import SystemSpec

SCORE_MAX_TOKENS = 160  # a reason of MAX_TEXT characters and a number fit
OUTPUT_LINE = "Output to score"  # starts the user message's output line (doubles read it)


class JudgeScore(BaseModel):
    model_config = ConfigDict(extra="ignore")

    reason: str
    score: float = Field(ge=0.0, le=1.0)


def score_schema() -> dict[str, Any]:
    """The reason before the number: a model that writes its reason first scores steadier."""
    return {
        "type": "object",
        "properties": {
            "reason": {"type": "string", "maxLength": MAX_TEXT},
            "score": {"type": "number", "minimum": 0, "maximum": 1},
        },
        "required": ["reason", "score"],
        "additionalProperties": False,
    }


def score_messages(system: SystemSpec, trace: Trace) -> list[Message]:
    """The prompt for one final output: rubric, task input, the gold reference if any."""
    about = f"System {system.name!r}" + (f": {system.description}" if system.description else "")
    instructions = (
        "You score the final output of an AI system against a rubric. Give a score in [0, 1]: "
        "1 when the output fully meets the rubric, 0 when it does not meet it at all, in "
        "between for partly. Write a short reason first, then the score.\n"
        'Return only JSON, with no prose and no code fence: {"reason": "...", "score": 0.0-1.0}'
        f"\n\n{about}\nRubric: {system.rubric}"
    )
    parts = ["Task input:"]
    for name, value in trace.inputs.items():
        parts.append(f"{name}: {clip(render_text(value), INPUT_CHARS)}")
    if trace.expected:
        reference = " | ".join(clip(g, INPUT_CHARS) for g in trace.expected[:5])
        parts.append(f"A reference answer (a guide, not the only right one): {reference}")
    parts.append(f"{OUTPUT_LINE} ({system.output}): {clip(render_text(trace.output), SPAN_CHARS)}")
    parts.append("Return the JSON score now.")
    return [
        {"role": "system", "content": instructions},
        {"role": "user", "content": "\n".join(parts)},
    ]


def parse_score(text: str) -> JudgeScore:
    """A reply as a checked score; ``JudgeParseError`` says why one cannot be used."""
    data = extract_json(text)
    try:
        return JudgeScore.model_validate(data)
    except ValidationError as err:
        raise JudgeParseError(pydantic_reason(err)) from None


@dataclass
class ScoreOutcome:
    """Every sample for one output: the valid scores, a reason, why the others failed."""

    scores: list[float] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    calls: int = 0

    @property
    def mean(self) -> float | None:
        return sum(self.scores) / len(self.scores) if self.scores else None


@dataclass
class _Sample:
    outcome: ScoreOutcome
    index: int
    request: GenerationRequest
    text: str = ""

    def take(self, text: str, finish_reason: str | None) -> str | None:
        """Record ``text``; keep its score, or return why it failed."""
        self.text = text
        self.outcome.calls += 1
        try:
            parsed = parse_score(text)
        except JudgeParseError as err:
            return cut_note(err.reason, finish_reason)
        self.outcome.scores.append(parsed.score)
        self.outcome.reasons.append(parsed.reason)
        return None


def judge_scores(
    engine: InferenceEngine,
    system: SystemSpec,
    traces: Sequence[Trace],
    *,
    samples: int,
    temperature: float,
    max_tokens: int,
    seed: int,
) -> list[ScoreOutcome]:
    """One outcome per trace, in order: one batched call for every trace × K samples, then at
    most one batched repair call for the replies that failed to parse (not for one cut at
    ``max_tokens`` in a loop: ``no_repair_reason``). The caller budgets:
    a batch costs at most ``2 * samples * len(traces)`` requests."""
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    outcomes = [ScoreOutcome() for _ in traces]
    schema = score_schema() if engine.supports_json_schema() else None
    sample_temperature = 0.0 if samples == 1 else temperature
    batch = [
        _Sample(
            outcome,
            i,
            GenerationRequest(
                messages=score_messages(system, trace),
                max_tokens=max_tokens,
                temperature=sample_temperature,
                seed=seed + i,
                json_schema=schema,
            ),
        )
        for outcome, trace in zip(outcomes, traces, strict=True)
        for i in range(samples)
    ]
    if not batch:
        return outcomes
    results, error = generate_or_error(engine, [s.request for s in batch])
    if error is not None:
        for sample in batch:
            sample.outcome.calls += 1
            sample.outcome.failures.append(f"sample {sample.index}: {error}")
        return outcomes
    to_repair = []
    for sample, result in zip(batch, results, strict=True):
        reason = sample.take(result.text, result.finish_reason)
        if reason is None:
            continue
        hopeless = no_repair_reason(result.text, result.finish_reason)
        if hopeless is not None:
            sample.outcome.failures.append(f"sample {sample.index}: {reason}; {hopeless}")
        else:
            to_repair.append((sample, reason))
    if not to_repair:
        return outcomes
    repairs = [repair_request(s.request, s.text, reason) for s, reason in to_repair]
    results, error = generate_or_error(engine, repairs)
    for i, (sample, reason) in enumerate(to_repair):
        if error is not None:
            sample.outcome.calls += 1
            sample.outcome.failures.append(f"sample {sample.index}: {reason}; repair: {error}")
            continue
        again = sample.take(results[i].text, results[i].finish_reason)
        if again is not None:
            sample.outcome.failures.append(
                f"sample {sample.index}: {reason}; after repair: {again}"
            )
    return outcomes
