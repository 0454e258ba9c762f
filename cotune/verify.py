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
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

from cotune.engines.base import GenerationRequest
from cotune.records import Candidate
from cotune.runtime import Runtime, Span, Trace, parse_output
from cotune.scoring import GoldScorer, Scorer
from cotune.spec import Component, SystemSpec


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


def hindsight_writer(system: SystemSpec) -> Component | None:
    """The final writer when a gold answer may be its target: trainable, free text."""
    writer = system.writer_of(system.output)
    if writer is None or not writer.is_trainable or writer.json_schema is not None:
        return None
    return writer


def hindsight_target(span: Span, expected: Sequence[str] | None) -> str | None:
    """The gold answer as the final writer's target when the writer's own inputs admit it,
    else None. The rule (docs/algorithm.md): a gold value that occurs in the inputs as whole
    words is the target as spelled there; otherwise a gold value each of whose tokens (SQuAD
    normalisation: lowercase, no punctuation, no articles) occurs among the inputs' tokens is
    the target as the gold writes it. A gold value without tokens is never a target. So the
    target only puts together words the writer was shown: it teaches, it never leaks."""
    from cotune.metrics import normalize, shows_tokens
    from cotune.prompts import render_value

    golds = [g for g in expected or [] if normalize(g).split()]
    seen = " ".join(render_value(v) for v in span.inputs.values())
    for gold in golds:
        # Whole words only: "red" inside "feredi" was never shown as an answer.
        found = re.search(rf"(?<!\w){re.escape(gold.strip())}(?!\w)", seen, re.IGNORECASE)
        if found:
            return found.group(0)
    for gold in golds:
        if shows_tokens(seen, gold):
            return gold.strip()
    return None


def gold_proposals(system: SystemSpec, traces: Sequence[Trace]) -> list[Proposal]:
    """For a trainable final writer whose own inputs admit a gold answer it failed to give
    (``hindsight_target``), propose that answer. The writer could have known it, so the row
    teaches putting together what it was shown, not hindsight; replay still confirms it."""
    writer = hindsight_writer(system)
    if writer is None:
        return []
    proposals = []
    for trace in traces:
        span = trace.span(writer.name)
        target = hindsight_target(span, trace.expected)
        if target is not None and target != span.output:
            proposals.append(Proposal(trace, writer.name, target, "gold"))
    return proposals


def resample_proposals(
    runtime: Runtime,
    traces: Sequence[Trace],
    *,
    n: int,
    temperature: float,
    seed: int,
    components: Collection[str] | None = None,
) -> list[Proposal]:
    """``n`` sampled outputs per trainable LLM span of each trace (of ``components`` only,
    when given): one engine call per component for the whole batch. Outputs equal to the
    original are dropped."""
    system = runtime.system
    proposals: list[Proposal] = []
    if n <= 0:
        return proposals
    for component in system.trainable_components:
        if components is not None and component.name not in components:
            continue  # its seeds do not depend on the others', so skipping changes nothing else
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
        candidate = _candidate(
            proposal.trace,
            [run[i] for run in corrected_runs],
            [run[i] for run in baseline_runs],
            epoch=epoch,
            span_id=proposal.span_id,
            output=proposal.output,
        )
        candidate.source, candidate.critique = proposal.source, proposal.critique
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


# -- joint candidates -----------------------------------------------------------------------


@dataclass
class JointProposal:
    """Corrections of several upstream spans of one trace, replayed together. ``runs`` holds
    the replays with them already made (a refused single's, for downstream first)."""

    trace: Trace
    corrections: dict[str, Any]
    sources: dict[str, str]
    critiques: dict[str, str | None]
    runs: list[Trace] | None = None

    def key(self) -> str:
        return repr((self.trace.trace_id, sorted(self.corrections.items(), key=repr)))


def upstream_spans(system: SystemSpec) -> set[str]:
    """The trainable components whose fix must pass through others: all but the final
    writer, whose own output decides the score (a fixed one would make the others moot)."""
    writer = system.writer_of(system.output)
    return {c.name for c in system.trainable_components if writer is None or c is not writer}


def joint_proposals(
    system: SystemSpec, traces: Sequence[Trace], outcomes: Sequence[Any]
) -> list[JointProposal]:
    """Per judge verdict, its proposals for two or more upstream spans, together."""
    upstream = upstream_spans(system)
    by_id = {t.trace_id: t for t in traces}
    found: dict[str, JointProposal] = {}
    for outcome in outcomes:
        trace = by_id.get(outcome.trace_id)
        if trace is None:
            continue
        for fixes in outcome.verdict_proposals():
            chosen = {s: (o, c) for s, o, c in fixes if s in upstream}
            if len(chosen) < 2:
                continue
            joint = JointProposal(
                trace,
                {s: parse_output(system.component(s), o)[0] for s, (o, _) in chosen.items()},
                {s: "judge" for s in chosen},
                {s: c for s, (_, c) in chosen.items()},
            )
            found.setdefault(joint.key(), joint)
    return list(found.values())


def downstream_first(
    system: SystemSpec,
    proposals: Sequence[Proposal],
    candidates: Sequence[Candidate],
    replays: dict[int, Trace],
    *,
    reuse: bool,
) -> list[JointProposal]:
    """Every upstream single candidate its replay did not verify, as a joint to complete
    with the final writer's corrected output (``verify_joint``). ``reuse``: its replay (one
    greedy replay) stands as the joint's first step; else the joint replays it again."""
    upstream = upstream_spans(system)
    joints = []
    for index, (proposal, candidate) in enumerate(zip(proposals, candidates, strict=True)):
        if proposal.span_id not in upstream or candidate.verified:
            continue
        joints.append(
            JointProposal(
                proposal.trace,
                {proposal.span_id: proposal.output},
                {proposal.span_id: proposal.source},
                {proposal.span_id: proposal.critique},
                runs=[replays[index]] if reuse else None,
            )
        )
    return joints


def verify_joint(
    runtime: Runtime,
    joints: Sequence[JointProposal],
    *,
    epoch: int,
    writer: str | None,
    replays: int = 1,
    seed: int = 0,
    scorer: Scorer | None = None,
    graded: bool = False,
) -> tuple[list[Candidate], dict[int, Trace]]:
    """Replay each joint; complete it downstream first; accept it by the single rule; then
    attribute an accepted one by leave-one-out. One ``Candidate`` per member (``kind:
    joint``) and, by candidate index, the joint's first replay.

    Downstream first: where ``writer`` (the final writer, ``hindsight_writer``) re-ran on
    the corrected inputs and still failed, and those inputs admit a gold answer
    (``hindsight_target``), the writer's corrected output, that answer, is spliced in and
    the writer becomes a member. A joint with fewer than two members is a single candidate
    already verified, and is dropped. A member is ``needed`` when the joint without it scores
    lower (by the task score, or with ``graded`` by the companion at an equal task score):
    dropping it loses (some of) the gain. Only needed members are accepted."""
    if not joints:
        return [], {}
    scorer = scorer or GoldScorer(runtime.system)
    fresh = [j for j in joints if j.runs is None]
    made: dict[int, list[Trace]] = {id(j): list(j.runs) for j in joints if j.runs is not None}
    for r in range(replays):
        run_seed = None if replays == 1 else seed + r * len(fresh)
        traces = runtime.replay_joint([(j.trace, j.corrections) for j in fresh], seed=run_seed)
        scorer.score(traces)
        for joint, trace in zip(fresh, traces, strict=True):
            made.setdefault(id(joint), []).append(trace)
    partial = [made[id(j)] for j in joints]  # the corrections alone
    whole = _complete(runtime, partial, writer, scorer, rerun_only=True)
    kept = [
        i
        for i, joint in enumerate(joints)
        if len(joint.corrections) + _writer_joined(whole[i][0], writer) >= 2
    ]
    joints = [joints[i] for i in kept]
    partial, whole = [partial[i] for i in kept], [whole[i] for i in kept]
    unchanged = _unchanged(runtime, joints, replays, seed, scorer)

    drafts = []
    for joint, runs, base in zip(joints, whole, unchanged, strict=True):
        draft = _candidate(joint.trace, runs, base, epoch=epoch, span_id=None, output=None)
        drafts.append(draft.verified or (graded and draft.closer))

    # leave one out: each accepted joint without each of its members
    without: dict[tuple[int, str], list[Trace]] = {}
    items: list[tuple[int, str, dict[str, Any]]] = []
    for i, joint in enumerate(joints):
        if not drafts[i]:
            continue
        if _writer_joined(whole[i][0], writer):
            assert writer is not None
            without[(i, writer)] = partial[i]
        for span_id in joint.corrections:
            rest = {s: o for s, o in joint.corrections.items() if s != span_id}
            if rest:
                items.append((i, span_id, rest))
            else:  # the trace as it was, completed like the joint (its own gold, if any)
                original = unchanged[i] or [joint.trace]
                [done] = _complete(runtime, [original], writer, scorer, rerun_only=False)
                without[(i, span_id)] = done
    left: list[list[Trace]] = [[] for _ in items]
    for r in range(replays):
        run_seed = None if replays == 1 else seed + 7 * (r + 1) * max(len(items), 1)
        traces = runtime.replay_joint(
            [(joints[i].trace, rest) for i, _, rest in items], seed=run_seed
        )
        scorer.score(traces)
        for runs, trace in zip(left, traces, strict=True):
            runs.append(trace)
    for (i, span_id, _), runs in zip(
        items, _complete(runtime, left, writer, scorer, rerun_only=False), strict=True
    ):
        without[(i, span_id)] = runs

    candidates: list[Candidate] = []
    replayed: dict[int, Trace] = {}
    for i, joint in enumerate(joints):
        first = whole[i][0]
        members = dict(joint.corrections)
        if _writer_joined(first, writer):
            assert writer is not None
            members[writer] = first.span(writer).output
        for span_id, output in members.items():
            candidate = _candidate(
                joint.trace, whole[i], unchanged[i], epoch=epoch, span_id=span_id, output=output
            )
            if span_id == writer and span_id not in joint.corrections:
                # the writer's target was set against its inputs in the joint's replay
                candidate.source = "gold"
                candidate.original_output = partial[i][0].span(span_id).output
            else:
                candidate.source = joint.sources[span_id]
                candidate.critique = joint.critiques.get(span_id)
            candidate.kind = "joint"
            candidate.joint_id = f"{joint.trace.trace_id}/joint-{i}"
            candidate.members = list(members)
            if drafts[i]:
                runs = without[(i, span_id)]
                candidate.without_scores = [t.score for t in runs if t.score is not None]
                candidate.without_graded = _graded(runs)
                candidate.needed = _needed(candidate, graded)
            if candidate.verified:
                candidate.accepted_by = "score"
            elif graded and candidate.closer:
                candidate.accepted_by = "graded"
            candidate.accepted = candidate.accepted_by is not None
            replayed[len(candidates)] = first
            candidates.append(candidate)
    return candidates, replayed


def _writer_joined(trace: Trace, writer: str | None) -> bool:
    """The final writer's output in this joint replay is a spliced-in target."""
    return writer is not None and any(s.span_id == writer and s.replaced for s in trace.spans)


def _complete(
    runtime: Runtime,
    runs: Sequence[list[Trace]],
    writer: str | None,
    scorer: Scorer,
    *,
    rerun_only: bool,
) -> list[list[Trace]]:
    """Each replay whose final writer failed and whose inputs admit a gold answer, with that
    answer spliced into the writer (nothing but scoring runs after the final writer's output).
    ``rerun_only``: only where the writer re-ran, on inputs the corrections changed."""
    if writer is None:
        return [list(r) for r in runs]
    todo: list[tuple[int, int, Trace, str]] = []
    for i, traces in enumerate(runs):
        for r, trace in enumerate(traces):
            if trace.score is None or trace.passed:
                continue
            span = next((s for s in trace.spans if s.span_id == writer), None)
            if span is None or span.replaced or (rerun_only and not span.rerun):
                continue
            target = hindsight_target(span, trace.expected)
            if target is not None and target != span.output:
                todo.append((i, r, trace, target))
    done = [list(r) for r in runs]
    if todo:
        spliced = runtime.replay_joint([(t, {writer: target}) for _, _, t, target in todo])
        scorer.score(spliced)
        for (i, r, _, _), trace in zip(todo, spliced, strict=True):
            done[i][r] = trace
    return done


def _unchanged(
    runtime: Runtime, joints: Sequence[JointProposal], replays: int, seed: int, scorer: Scorer
) -> list[list[Trace]]:
    """With R > 1: R seeded replays of each joint's trace with its spans' own outputs (the
    reference, as for a single); with one replay, none (the original trace is)."""
    if replays == 1 or not joints:
        return [[] for _ in joints]
    runs: list[list[Trace]] = [[] for _ in joints]
    for r in range(replays):
        items = [(j.trace, {s: j.trace.span(s).output for s in j.corrections}) for j in joints]
        traces = runtime.replay_joint(items, seed=seed + r * len(joints))
        scorer.score(traces)
        for bucket, trace in zip(runs, traces, strict=True):
            bucket.append(trace)
    return runs


def _candidate(
    trace: Trace,
    runs: Sequence[Trace],
    unchanged: Sequence[Trace],
    *,
    epoch: int,
    span_id: str | None,
    output: Any,
) -> Candidate:
    """A candidate with the scores of ``runs`` against the trace (or, with R > 1, against
    its unmodified runs). A replay counts where the scorer scored it (its graded score goes
    with it); an unscored original has nothing to beat."""
    scored = [t for t in runs if trace.score is not None and t.score is not None]
    kept = [t for t in unchanged if t.score is not None]
    base = [t.score for t in kept if t.score is not None] or [trace.score or 0.0]
    return Candidate(
        epoch=epoch,
        trace_id=trace.trace_id,
        example_id=trace.example_id,
        component=span_id or "",
        source="",
        proposed_output=output,
        original_output=trace.span(span_id).output if span_id else None,
        original_score=trace.score or 0.0,
        replay_scores=[t.score for t in scored if t.score is not None],
        baseline_scores=base if unchanged else [],
        accepted=False,
        original_graded=trace.graded_score,
        replay_graded=_graded(scored),
        baseline_graded=_graded(kept),
    )


def _needed(candidate: Candidate, graded: bool) -> bool:
    """Without this member the joint scores lower: by the task score, or (graded) by the
    companion at an equal task score. No scored replay without it is no evidence it was not."""
    if not candidate.without_scores:
        return True
    joint, alone = _avg(candidate.replay_scores), _avg(candidate.without_scores)
    if alone != joint:
        return alone < joint
    if graded and candidate.replay_graded and candidate.without_graded:
        return _avg(candidate.without_graded) < _avg(candidate.replay_graded)
    return False


def _avg(values: Sequence[float]) -> float:
    return sum(values) / len(values)
