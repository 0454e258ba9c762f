"""Checking proposed corrections by replaying the system.

The judge only proposes. A proposal is accepted when replaying the system with the corrected
span output raises the final score above the original trace's. With greedy components one
replay settles it; with sampling, R seeded replays of the corrected and of the unmodified span
are compared on their means. Without a judge, proposals come from re-sampling the component.
Replays are scored by the job's ``Scorer`` like every rollout: the task metric, or with
``metric: judge`` the judge's mean score over its K samples (cached, so an unchanged output is
not judged again). A replay the scorer left unscored is no evidence, and an unscored original
has nothing to beat: neither verifies a candidate.

A correction is replayed on its own example only, so nothing it does can lower another
example's score. Graded verification (``graded=True``, ``loop.graded_verification``) also
accepts a candidate that moves the output strictly closer to gold by the task metric's graded
companion while the task score does not fall (``Candidate.closer``); it applies where the
scorer sets ``graded_score`` (a binary gold metric, ``cotune.metrics.companion_score``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cotune.engines.base import GenerationRequest
from cotune.records import Candidate
from cotune.runtime import Runtime, Trace, parse_output
from cotune.scoring import GoldScorer, Scorer
from cotune.spec import SystemSpec


@dataclass
class Proposal:
    trace: Trace
    span_id: str
    output: Any
    source: str  # "judge" | "resample"
    critique: str | None = None


def judge_proposals(
    system: SystemSpec, traces: Sequence[Trace], outcomes: Sequence[Any]
) -> list[Proposal]:
    """The judge's ``should_have_output`` for trainable LLM spans, one proposal each."""
    trainable = {c.name for c in system.trainable_components}
    by_id = {t.trace_id: t for t in traces}
    proposals = []
    for outcome in outcomes:
        trace = by_id.get(outcome.trace_id)
        if trace is None:
            continue
        for span_id, output, critique in outcome.proposals():
            if span_id in trainable:
                component = system.component(span_id)
                value, _ = parse_output(component, output)
                proposals.append(Proposal(trace, span_id, value, "judge", critique))
    return proposals


def gold_proposals(system: SystemSpec, traces: Sequence[Trace]) -> list[Proposal]:
    """For a trainable final writer whose own inputs contain a gold answer it failed to give,
    propose that answer (as spelled in its inputs). The writer could have known it, so the
    row teaches extraction, not hindsight; replay still has to confirm it."""
    writer = system.writer_of(system.output)
    if writer is None or not writer.is_trainable or writer.json_schema is not None:
        return []
    from cotune.prompts import render_value

    proposals = []
    for trace in traces:
        if not trace.expected:
            continue
        span = trace.span(writer.name)
        seen = " ".join(render_value(v) for v in span.inputs.values())
        for gold in trace.expected:
            # Whole words only: "red" inside "feredi" was never shown as an answer.
            found = re.search(rf"(?<!\w){re.escape(gold.strip())}(?!\w)", seen, re.IGNORECASE)
            if gold.strip() and found:
                spelled = found.group(0)
                if spelled != span.output:
                    proposals.append(Proposal(trace, writer.name, spelled, "gold"))
                break
    return proposals


def resample_proposals(
    runtime: Runtime, traces: Sequence[Trace], *, n: int, temperature: float, seed: int
) -> list[Proposal]:
    """``n`` sampled outputs per trainable LLM span of each trace: one engine call per
    component for the whole batch. Outputs equal to the original are dropped."""
    system = runtime.system
    proposals: list[Proposal] = []
    if n <= 0:
        return proposals
    for component in system.trainable_components:
        assert component.model is not None
        work = [(t, t.span(component.name)) for t in traces]
        requests = [
            GenerationRequest(
                messages=span.messages or [],
                max_tokens=component.max_tokens,
                temperature=temperature,
                seed=seed + i * n + j,
                json_schema=component.json_schema,
            )
            for i, (_, span) in enumerate(work)
            for j in range(n)
        ]
        if not requests:
            continue
        results = runtime.engines[component.model].generate(
            requests, adapter=runtime.adapters.get(component.name)
        )
        for index, result in enumerate(results):
            trace, span = work[index // n]
            value, error = parse_output(component, result.text)
            seen = {
                repr(p.output)
                for p in proposals
                if p.trace is trace and p.span_id == component.name
            }
            if error is None and value != span.output and repr(value) not in seen:
                proposals.append(Proposal(trace, component.name, value, "resample"))
    return proposals


def verify(
    runtime: Runtime,
    proposals: Sequence[Proposal],
    *,
    epoch: int,
    replays: int = 1,
    seed: int = 0,
    require_gain: bool = True,
    scorer: Scorer | None = None,
    graded: bool = False,
) -> tuple[list[Candidate], dict[int, Trace]]:
    """Replay every proposal; return one Candidate each (accepted or not) and, by candidate
    index, the first replay trace (its downstream spans feed synthesis when it passed).
    ``require_gain=False`` (the no-verification ablation) accepts every candidate, whatever
    its replay showed; the replay scores are still recorded. ``scorer`` defaults to the
    task metric against gold. ``graded`` also accepts candidates that are ``closer``."""
    if not proposals:
        return [], {}
    scorer = scorer or GoldScorer(runtime.system)
    corrected_runs: list[list[Trace]] = []
    baseline_runs: list[list[Trace]] = []
    for r in range(replays):
        run_seed = None if replays == 1 else seed + r * len(proposals)
        corrected = runtime.replay_many(
            [(p.trace, p.span_id, p.output) for p in proposals], seed=run_seed
        )
        scorer.score(corrected)
        corrected_runs.append(corrected)
        if replays > 1:
            unchanged = runtime.replay_many(
                [(p.trace, p.span_id, p.trace.span(p.span_id).output) for p in proposals],
                seed=run_seed,
            )
            scorer.score(unchanged)
            baseline_runs.append(unchanged)

    candidates = []
    for i, proposal in enumerate(proposals):
        known = proposal.trace.score is not None
        # a replay counts where the scorer scored it; its graded score goes with it
        scored = [run[i] for run in corrected_runs if known and run[i].score is not None]
        original = proposal.trace.score or 0.0
        unchanged = [run[i] for run in baseline_runs if run[i].score is not None]
        base = [t.score for t in unchanged if t.score is not None] or [original]
        candidate = Candidate(
            epoch=epoch,
            trace_id=proposal.trace.trace_id,
            example_id=proposal.trace.example_id,
            component=proposal.span_id,
            source=proposal.source,
            proposed_output=proposal.output,
            original_output=proposal.trace.span(proposal.span_id).output,
            original_score=original,
            replay_scores=[t.score for t in scored if t.score is not None],
            baseline_scores=base if replays > 1 else [],
            accepted=False,
            critique=proposal.critique,
            original_graded=proposal.trace.graded_score,
            replay_graded=_graded(scored),
            baseline_graded=_graded(unchanged),
        )
        if candidate.verified:
            candidate.accepted_by = "score"
        elif graded and candidate.closer:
            candidate.accepted_by = "graded"
        elif not require_gain:
            candidate.accepted_by = "unverified"
        candidate.accepted = candidate.accepted_by is not None
        candidates.append(candidate)
    return candidates, {i: corrected_runs[0][i] for i in range(len(proposals))}


def _graded(traces: Sequence[Trace]) -> list[float]:
    """Every trace's graded score, or none if one lacks it (no companion for the metric)."""
    values = [t.graded_score for t in traces]
    return [v for v in values if v is not None] if None not in values else []
