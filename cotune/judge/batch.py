"""Judging a batch of traces (``judge_traces``): K samples each, one batched repair call, a
request budget; bad replies and engine errors are recorded as failures, never raised."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from cotune.engines.base import GenerationRequest, GenerationResult, InferenceEngine
from cotune.errors import EngineError
from cotune.judge.outcome import JudgeOutcome
from cotune.judge.parse import JudgeParseError, parse_verdict
from cotune.judge.prompt import cut_note, judge_messages, no_repair_reason, repair_request
from cotune.judge.schema import verdict_schema
from cotune.runtime import Trace
from cotune.spec import SystemSpec

BUDGET_EXHAUSTED = "budget exhausted"


@dataclass
class _Sample:
    outcome: JudgeOutcome
    trace: Trace
    index: int
    request: GenerationRequest
    text: str = ""


def _try_parse(
    sample: _Sample, text: str, system: SystemSpec, finish_reason: str | None
) -> str | None:
    """Record ``text`` as the sample's reply; keep its verdict, or return why it failed."""
    sample.text = text
    sample.outcome.calls += 1
    sample.outcome.raw.append(text)
    try:
        verdict = parse_verdict(text, system, sample.trace)
    except JudgeParseError as err:
        return cut_note(err.reason, finish_reason)
    sample.outcome.verdicts.append(verdict)
    return None


def generate_or_error(
    engine: InferenceEngine, requests: list[GenerationRequest]
) -> tuple[list[GenerationResult], str | None]:
    """The engine's replies, or why the call failed: an ``EngineError`` (a judge endpoint that
    is down, a request it refuses) fails the batch's samples instead of the job stage."""
    try:
        return engine.generate(requests), None
    except EngineError as err:
        return [], f"engine error: {err}"


def judge_traces(
    engine: InferenceEngine,
    system: SystemSpec,
    traces: Sequence[Trace],
    *,
    samples: int,
    temperature: float,
    max_tokens: int,
    seed: int,
    include_gold: bool = True,
    max_calls: int | None = None,
) -> list[JudgeOutcome]:
    """Judge ``traces`` with K = ``samples`` replies each; one outcome per trace, in order.

    Requests: one batched ``generate`` for every admitted trace × K (greedy when K == 1,
    otherwise ``temperature`` with seeds ``seed + i``), then at most one batched repair call
    for the replies that failed to parse (not for a reply cut at ``max_tokens`` in a loop:
    ``no_repair_reason``). ``max_calls`` caps the requests: a trace is admitted
    only if all K of its samples fit (traces past that get ``failures=["budget exhausted"]``);
    what is left of the budget pays for repairs, in order, and a reply that finds none left
    fails without one. Bad replies, and an ``EngineError`` from either call, are recorded as
    failures in their outcomes (a failed call still counts its requests); nothing here raises
    for them.
    """
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    outcomes = [JudgeOutcome.for_trace(t) for t in traces]
    budget = 2 * samples * len(traces) if max_calls is None else max(max_calls, 0)
    admitted = min(len(traces), budget // samples)
    for outcome in outcomes[admitted:]:
        outcome.failures.append(BUDGET_EXHAUSTED)
    budget -= admitted * samples

    use_schema = engine.supports_json_schema()
    sample_temperature = 0.0 if samples == 1 else temperature
    batch: list[_Sample] = []
    for outcome, trace in zip(outcomes[:admitted], traces[:admitted], strict=True):
        messages = judge_messages(system, trace, include_gold=include_gold)
        schema = verdict_schema(system, trace) if use_schema else None
        for i in range(samples):
            request = GenerationRequest(
                messages=messages,
                max_tokens=max_tokens,
                temperature=sample_temperature,
                seed=seed + i,
                json_schema=schema,
            )
            batch.append(_Sample(outcome, trace, i, request))
    if not batch:
        return outcomes

    results, error = generate_or_error(engine, [s.request for s in batch])
    if error is not None:
        for sample in batch:
            sample.outcome.calls += 1
            sample.outcome.failures.append(f"sample {sample.index}: {error}")
        return outcomes
    to_repair: list[tuple[_Sample, str]] = []
    for sample, result in zip(batch, results, strict=True):
        reason = _try_parse(sample, result.text, system, result.finish_reason)
        if reason is None:
            continue
        hopeless = no_repair_reason(result.text, result.finish_reason)
        if hopeless is not None:
            sample.outcome.failures.append(f"sample {sample.index}: {reason}; {hopeless}")
            continue
        if budget <= 0:
            sample.outcome.failures.append(
                f"sample {sample.index}: {reason}; no budget left for a repair"
            )
            continue
        budget -= 1
        to_repair.append((sample, reason))
    if not to_repair:
        return outcomes

    repairs = [repair_request(sample.request, sample.text, reason) for sample, reason in to_repair]
    results, error = generate_or_error(engine, repairs)
    if error is not None:
        for sample, reason in to_repair:
            sample.outcome.calls += 1
            sample.outcome.failures.append(f"sample {sample.index}: {reason}; repair: {error}")
        return outcomes
    for (sample, reason), result in zip(to_repair, results, strict=True):
        again = _try_parse(sample, result.text, system, result.finish_reason)
        if again is not None:
            sample.outcome.failures.append(
                f"sample {sample.index}: {reason}; after repair: {again}"
            )
    return outcomes
