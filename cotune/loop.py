"""The epoch loop: rollout -> credit -> verify -> synthesize -> train -> evaluate.

Read ``run_job`` top to bottom: that is the algorithm. Each stage is a function from typed
outputs (``cotune.records``) to a typed output, run through ``cotune.runner.run_stage``, which
stores it under a fixed key ``(job, epoch, stage)``: a stage that already finished is loaded,
not redone, so a job resumes after a crash and a redelivered task does nothing twice. The
embedded runner and the Celery workers call the same functions.
"""

from __future__ import annotations

import random
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cotune.data import Example
from cotune.feedback import fixed_traces
from cotune.paraphrase import Paraphrased
from cotune.records import (
    Candidate,
    ComponentTraining,
    CreditOut,
    EvalOut,
    EvaluateOut,
    JobReport,
    RolloutOut,
    Stage,
    SynthesizeOut,
    TestOut,
    TrainOut,
    VerifyOut,
)
from cotune.report import build_report, epoch_record
from cotune.runner import (
    BudgetExhausted,
    JobContext,
    check_budget,
    judge_calls_left,
    run_stage,
    stored_output,
)
from cotune.runtime import Runtime, Trace, mean_score
from cotune.scoring import Scorer
from cotune.synthesis import (
    Buffer,
    add_bootstrap,
    add_corrections,
    check_sources,
    given_rows,
    target_rows,
)

if TYPE_CHECKING:
    from cotune.verify import JointProposal, Proposal


class JobCancelled(Exception):
    pass


# -- the algorithm ----------------------------------------------------------------------------


def run_job(ctx: JobContext) -> JobReport:
    """Run (or resume) a job to the end and return its report."""
    job = ctx.job
    base = run_stage(ctx, 0, Stage.baseline, EvalOut, partial(baseline, ctx))
    best_val = base.score
    current: dict[str, str] = {}
    stop_reason = None
    for epoch in range(1, job.loop.epochs + 1):
        try:
            if ctx.store.cancel_requested(ctx.job_id):
                raise JobCancelled("cancel requested")
            if ctx.store.stage_done(ctx.job_id, epoch, Stage.rollout) is None:
                check_budget(ctx)  # only before new work: a resumed job keeps what it paid for
            traces = run_stage(
                ctx, epoch, Stage.rollout, RolloutOut, partial(rollout, ctx, epoch, current)
            )
            credit = run_stage(
                ctx, epoch, Stage.credit, CreditOut, partial(assign_credit, ctx, epoch, traces)
            )
            checked = run_stage(
                ctx,
                epoch,
                Stage.verify,
                VerifyOut,
                partial(verify_candidates, ctx, epoch, traces, credit, current),
            )
            buffer = run_stage(
                ctx,
                epoch,
                Stage.synthesize,
                SynthesizeOut,
                partial(synthesize, ctx, epoch, traces, checked, current),
            )
            trained = run_stage(
                ctx,
                epoch,
                Stage.train,
                TrainOut,
                partial(train_components, ctx, epoch, buffer, current),
            )
            evaluation = run_stage(
                ctx,
                epoch,
                Stage.evaluate,
                EvaluateOut,
                partial(evaluate_epoch, ctx, epoch, trained, best_val),
                # the epoch's record is rebuilt from its stored stages once they all are
                after=partial(_save_epoch, ctx, epoch),
            )
        except BudgetExhausted as stop:
            stop_reason = str(stop)
            ctx.event(f"budget exhausted before epoch {epoch} finished: {stop}", "warning")
            break
        if evaluation.kept:
            best_val, current = evaluation.score, trained.adapters
    final = run_stage(ctx, ctx.test_epoch, Stage.test, TestOut, partial(final_test, ctx, current))
    return build_report(ctx, base.score, best_val, final, stop_reason)


def _save_epoch(ctx: JobContext, epoch: int) -> None:
    ctx.store.save_epoch(ctx.job_id, epoch_record(ctx, epoch))


# -- stages -----------------------------------------------------------------------------------


def baseline(ctx: JobContext) -> EvalOut:
    """The base system on val: the bar the first epoch must clear. First, where the job's
    engines are real, its models must resolve here and fit this worker's GPUs (a GPU worker
    does not validate the job itself: the API checks against ``Settings.gpu_memory_gib``)."""
    if ctx.engines is None:
        from cotune.jobs.materialize import check_models_prepared
        from cotune.settings import get_settings

        check_models_prepared(ctx.job, ctx.settings or get_settings())
    ctx.feedback()  # a bad feedback file fails the job before anything is spent
    result = evaluate_split(ctx, "val", {})
    ctx.event(f"base system scores {result.score:.3f} on val")
    return result


def rollout(ctx: JobContext, epoch: int, current: dict[str, str]) -> RolloutOut:
    """Run the system with the current adapters on this epoch's batch of train examples, then
    add the epoch's fixed traces of rated runs (``data.feedback``): every rated-bad row each
    epoch (credit assignment under the current adapters), the rated-good rows in epoch 1 only
    (bootstrapping: their rows stay in the cumulative buffer). A fixed trace's output is the
    rated one and its score the rating; rows without spans are run once to reconstruct them."""
    train = ctx.split("train")
    rng = random.Random(ctx.job.loop.seed * 1000 + epoch)
    batch = rng.sample(train, min(ctx.job.loop.rollout_batch, len(train)))
    runtime, scorer = ctx.runtime(current), ctx.scorer(capped=True)
    traces = _run_batched(ctx, runtime, batch, Stage.rollout, scorer)
    threshold = ctx.job.system.pass_threshold
    rows = [r for r in ctx.feedback() if epoch == 1 or r.feedback.rating < threshold]
    fixed = fixed_traces(rows, ctx.job.system, runtime) if rows else []
    score = mean_score(traces) if traces else mean_score(fixed)
    rated = ""
    if fixed:
        bad = sum(not t.passed for t in fixed)
        rated = f", with {len(fixed)} rated runs ({bad} rated below {threshold:g})"
    ctx.event(f"epoch {epoch}: rollout of {len(traces)} train examples scores {score:.3f}{rated}")
    return RolloutOut(
        traces=traces + fixed, score=score, judge_calls=scorer.calls, feedback=len(fixed)
    )


def assign_credit(ctx: JobContext, epoch: int, rollout_out: RolloutOut) -> CreditOut:
    """Ask the judge about every failed trace (if the job has a judge)."""
    from cotune.judge import judge_traces

    failed = [t for t in rollout_out.traces if not t.passed]
    judge = ctx.job.judge
    if judge is None or not failed:
        return CreditOut(failed=len(failed))
    remaining = judge_calls_left(ctx)
    outcomes = judge_traces(
        ctx.judge_engine(),
        ctx.job.system,
        failed,
        samples=ctx.job.loop.judge_samples,
        temperature=judge.temperature,
        max_tokens=judge.max_tokens,
        seed=ctx.job.loop.seed + epoch,
        max_calls=remaining,
    )
    failures = sum(len(o.failures) for o in outcomes)
    ctx.event(f"epoch {epoch}: judged {len(failed)} failed traces, {failures} judge failures")
    return CreditOut(
        outcomes=outcomes,
        failed=len(failed),
        judge_failures=failures,
        judge_calls=sum(o.calls for o in outcomes),
    )


def verify_candidates(
    ctx: JobContext,
    epoch: int,
    rollout_out: RolloutOut,
    credit: CreditOut,
    current: dict[str, str],
) -> VerifyOut:
    """Replay each proposal; keep those that raise the score or, with graded verification,
    move the output strictly closer to gold without lowering it. Without judge proposals for
    a trace, candidates come from re-sampling its trainable components. Then the joint
    candidates, downstream first (``replay_candidates``)."""
    from cotune.verify import gold_proposals, joint_proposals, judge_proposals, resample_proposals

    loop = ctx.job.loop
    failed = [t for t in rollout_out.traces if not t.passed]
    runtime, scorer = ctx.runtime(current), ctx.scorer(capped=True)
    # A fixed trace's score is a person's rating; its replays are scored by the scorer
    # (against corrected_output, or the judge under the rubric), so it must beat the rated
    # output scored the same way.
    originals = [_unscored(t) for t in failed if t.feedback is not None]
    scorer.score(originals)
    rescored = {t.trace_id: t for t in originals}
    failed = [rescored.get(t.trace_id, t) for t in failed]
    proposals = judge_proposals(ctx.job.system, failed, credit.outcomes)
    if loop.gold_candidates:
        proposals += gold_proposals(ctx.job.system, failed)
    proposed_for = {p.trace.trace_id for p in proposals if p.source == "judge"}
    without = [t for t in failed if t.trace_id not in proposed_for]
    proposals += resample_proposals(
        runtime,
        without,
        n=loop.resample_candidates,
        temperature=loop.candidate_temperature,
        seed=loop.seed * 7919 + epoch,
    )
    joints = joint_proposals(ctx.job.system, failed, credit.outcomes)
    candidates, replays = replay_candidates(
        ctx, runtime, scorer, proposals, joints, epoch=epoch, seed=loop.seed + epoch
    )
    ctx.store.add_candidates(ctx.job_id, candidates, replace_epoch=epoch)
    accepted = sum(c.accepted for c in candidates if c.kind == "single")
    singles = sum(c.kind == "single" for c in candidates)
    how = "verified by replay" if loop.verify_by_replay else "accepted unverified (ablation)"
    closer = sum(c.accepted_by == "graded" for c in candidates if c.kind == "single")
    graded = f" ({closer} of them closer to gold, not yet right)" if closer else ""
    ctx.event(f"epoch {epoch}: {accepted} of {singles} candidates {how}{graded}")
    joined = {c.joint_id for c in candidates if c.kind == "joint"}
    if joined:
        gained = {c.joint_id for c in candidates if c.kind == "joint" and c.needed is not None}
        needed = sum(c.accepted for c in candidates if c.kind == "joint")
        ctx.event(
            f"epoch {epoch}: {len(gained)} of {len(joined)} joint candidates verified by "
            f"replay, {needed} of their members needed (leave-one-out)"
        )
    return VerifyOut(
        candidates=candidates, replays=replays, originals=originals, judge_calls=scorer.calls
    )


def replay_candidates(
    ctx: JobContext,
    runtime: Runtime,
    scorer: Scorer,
    proposals: list[Proposal],
    joints: list[JointProposal],
    *,
    epoch: int,
    seed: int,
) -> tuple[list[Candidate], dict[int, Trace]]:
    """Verification in its order (docs/algorithm.md): every single-span proposal, replayed
    in one batch; then, with ``loop.joint_candidates`` (and verification on), the joint
    candidates downstream first: ``joints`` (a verdict's upstream fixes together) and every
    refused upstream single, each completed with the final writer's corrected output where
    the corrected inputs admit a gold target, accepted by the single rule and attributed by
    leave-one-out. Joint members follow the singles; replays are keyed by candidate index."""
    from cotune.verify import downstream_first, hindsight_writer, verify, verify_joint

    loop, system = ctx.job.loop, ctx.job.system
    candidates, replays = verify(
        runtime,
        proposals,
        epoch=epoch,
        replays=loop.replays,
        seed=seed,
        require_gain=loop.verify_by_replay,
        scorer=scorer,
        graded=loop.graded_verification,
    )
    if not (loop.joint_candidates and loop.verify_by_replay):
        return candidates, replays
    writer = hindsight_writer(system) if loop.gold_candidates else None
    if writer is not None:
        joints = joints + downstream_first(
            system, proposals, candidates, replays, reuse=loop.replays == 1
        )
    unique = list({j.key(): j for j in joints}.values())
    more, more_replays = verify_joint(
        runtime,
        unique,
        epoch=epoch,
        writer=writer.name if writer else None,
        replays=loop.replays,
        seed=seed + 1,
        scorer=scorer,
        graded=loop.graded_verification,
    )
    offset = len(candidates)
    replays.update({offset + i: trace for i, trace in more_replays.items()})
    return candidates + more, replays


def synthesize(
    ctx: JobContext,
    epoch: int,
    rollout_out: RolloutOut,
    checked: VerifyOut,
    current: dict[str, str],
) -> SynthesizeOut:
    """Cumulative buffer: last epoch's rows + bootstrapped + corrections + augmentation.
    Augmentation rounds run while a component is short of ``samples_per_component`` rows:
    sampled rollouts of the train split, whose passing spans become rows and whose failed
    traces get gold and re-sampled candidates, verified like the verify stage's
    (``replay_candidates``, joints included) and kept as ``augment-`` rows."""
    system, loop = ctx.job.system, ctx.job.loop
    if ctx.job.train.rows != "synthesized":  # the train split's own outputs or targets
        make_rows = given_rows if ctx.job.train.rows == "given" else target_rows
        buffer = make_rows(system, ctx.split("train"))
        counts = buffer.counts()
        shown = {name: count.model_dump() for name, count in counts.items()}
        what = "own outputs" if ctx.job.train.rows == "given" else "targets (teacher forcing)"
        ctx.event(f"epoch {epoch}: buffer {shown} (the train split's {what})")
        return SynthesizeOut(buffer=buffer.rows(), counts=counts)
    previous = stored_output(ctx, epoch - 1, Stage.synthesize, SynthesizeOut)
    buffer = Buffer.from_rows(previous.buffer) if previous else Buffer()
    traces = rollout_out.traces
    rated = [row.example() for row in ctx.feedback()]
    sources = {e.id for e in ctx.split("train")} | {e.id for e in rated}
    check_sources(traces, sources)
    add_bootstrap(buffer, system, traces)
    add_corrections(
        buffer,
        system,
        {t.trace_id: t for t in traces},
        checked.replays,
        checked.candidates,
        final_component=system.writer_of(system.output).name  # type: ignore[union-attr]
        if system.writer_of(system.output)
        else None,
    )
    augmented = corrected = 0
    runtime = None
    scorer = ctx.scorer(capped=True)
    paraphrases: Paraphrased | None = None
    for round_ in range(loop.augment_rollouts):
        room = {
            c.name: loop.samples_per_component - len(buffer.sft.get(c.name, []))
            for c in system.trainable_components
        }
        short = {name: left for name, left in room.items() if left > 0}
        if not short:
            break
        runtime = runtime or ctx.runtime(current)
        if paraphrases is None:  # once per epoch, when augmentation first runs
            paraphrases = paraphrase_train(ctx, epoch, scorer, rated)
            rewritten = {e.id for e in paraphrases.examples}
            sources |= rewritten
        extra = _run_batched(
            ctx,
            runtime,
            # a rated run's inputs, sampled anew, scored as usual; the paraphrases keep the
            # gold of the train example each rewrites
            ctx.split("train") + rated + paraphrases.examples,
            Stage.synthesize,
            scorer,
            temperature=loop.candidate_temperature,
            seed=loop.seed * 31 + epoch * 101 + round_,
        )
        check_sources(extra, sources)
        # Rows only for the components still short, up to what each lacks: a component that
        # has its rows would otherwise grow without bound while another stays short.
        with buffer.only(short):
            for source, traces_of in (("augment", False), ("augment-paraphrase", True)):
                of = [t for t in extra if (t.example_id in rewritten) is traces_of]
                augmented += sum(add_bootstrap(buffer, system, of, source=source).values())
            added = _augment_corrections(
                ctx, epoch, round_, runtime, scorer, buffer, extra, set(short)
            )
        corrected += added
        augmented += added
    counts = buffer.counts()
    shown = {name: count.model_dump() for name, count in counts.items()}
    ctx.event(
        f"epoch {epoch}: buffer {shown} ({augmented} rows from augmentation, {corrected} of "
        "them verified corrections)"
    )
    return SynthesizeOut(
        buffer=buffer.rows(),
        counts=counts,
        augmented=augmented,
        augment_corrections=corrected,
        paraphrases=len(paraphrases.examples) if paraphrases else 0,
        judge_calls=scorer.calls + (paraphrases.calls if paraphrases else 0),
    )


def paraphrase_train(
    ctx: JobContext, epoch: int, scorer: Scorer, rated: list[Example]
) -> Paraphrased:
    """``loop.paraphrases`` rewrites of each train example's text inputs by the judge
    (``cotune/paraphrase.py``: the kept ones, each under its example's gold). One judge budget
    per stage: with ``metric: judge`` the rounds' scoring of the train split and the rated runs
    is reserved first, and what the paraphrases spend comes off the scorer's cap."""
    from cotune.paraphrase import paraphrase_examples
    from cotune.scoring import JudgeScorer

    loop, judge = ctx.job.loop, ctx.job.judge
    if not loop.paraphrases or judge is None:
        return Paraphrased()
    train = ctx.split("train")
    left = judge_calls_left(ctx)
    if left is not None:
        left -= scorer.calls
        if isinstance(scorer, JudgeScorer):  # worst case: every sample repaired
            left -= 2 * loop.judge_samples * (len(train) + len(rated)) * loop.augment_rollouts
    # An id no example of any split or rated run has: a trace's example id is what keeps val
    # and test out of training (check_sources).
    taken = {e.id for name in ("train", "val", "test") for e in ctx.split(name)}
    taken |= {e.id for e in rated}
    out = paraphrase_examples(
        ctx.judge_engine(),
        ctx.job.system,
        train,
        n=loop.paraphrases,
        max_tokens=judge.max_tokens,
        temperature=loop.candidate_temperature,
        seed=loop.seed * 7 + epoch * 1013,
        max_calls=None if left is None else max(left, 0),
        taken=taken,
    )
    if isinstance(scorer, JudgeScorer) and scorer.max_calls is not None:
        scorer.max_calls = max(scorer.max_calls - out.calls, 0)
    why = ", ".join(f"{n} {reason}" for reason, n in out.dropped.most_common())
    ctx.event(
        f"epoch {epoch}: {len(out.examples)} paraphrases of {len(train)} train examples kept "
        f"of {out.calls} asked" + (f" (dropped: {why})" if why else ""),
        paraphrases=len(out.examples),
        paraphrase_calls=out.calls,
    )
    return out


def _augment_corrections(
    ctx: JobContext,
    epoch: int,
    round_: int,
    runtime: Runtime,
    scorer: Scorer,
    buffer: Buffer,
    extra: list[Trace],
    short: set[str],
) -> int:
    """Rows from the failed traces of one augmentation round: gold (``loop.gold_candidates``)
    and re-sampled candidates (``loop.resample_candidates`` per trainable span) of the
    ``short`` components, replayed like the verify stage's; the accepted ones become
    ``augment-correction`` rows (and the passing replays' downstream spans
    ``augment-downstream`` rows)."""
    from cotune.verify import gold_proposals, resample_proposals

    system, loop = ctx.job.system, ctx.job.loop
    failed = [t for t in extra if t.passed is False]
    if not failed:
        return 0
    seed = loop.seed * 131 + epoch * 1009 + round_ * 17
    proposals = gold_proposals(system, failed) if loop.gold_candidates else []
    proposals += resample_proposals(
        runtime,
        failed,
        n=loop.resample_candidates,
        temperature=loop.candidate_temperature,
        seed=seed,
        components=short,
    )
    proposals = [p for p in proposals if p.span_id in short]  # gold: only a short writer's
    if not proposals:
        return 0
    candidates, replays = replay_candidates(
        ctx, runtime, scorer, proposals, [], epoch=epoch, seed=seed
    )
    writer = system.writer_of(system.output)
    added = add_corrections(
        buffer,
        system,
        {t.trace_id: t for t in failed},
        replays,
        candidates,
        final_component=writer.name if writer else None,
        prefix="augment-",
    )
    return sum(added.values())


def train_components(
    ctx: JobContext, epoch: int, synthesized: SynthesizeOut, current: dict[str, str]
) -> TrainOut:
    """One LoRA adapter per trainable component: SFT from the base, then DPO."""
    from cotune.engines import stepped_aside

    # The engines step aside while the trainer runs (on a GPU: they sleep, DESIGN.md §7).
    with stepped_aside() as switch:
        adapters, results = _train_each(ctx, epoch, synthesized, current)
    ctx.event(
        f"epoch {epoch}: engines stepped aside in {switch.release_seconds:.1f} s and came "
        f"back in {switch.reacquire_seconds:.1f} s",
        release_seconds=round(switch.release_seconds, 3),
        reacquire_seconds=round(switch.reacquire_seconds, 3),
    )
    return TrainOut(
        adapters=adapters,
        components=results,
        trained_tokens=sum(r.trained_tokens for r in results.values()),
        release_seconds=round(switch.release_seconds, 3),
        reacquire_seconds=round(switch.reacquire_seconds, 3),
    )


def _train_each(
    ctx: JobContext, epoch: int, synthesized: SynthesizeOut, current: dict[str, str]
) -> tuple[dict[str, str], dict[str, ComponentTraining]]:
    from cotune.models import resolve_model

    trainer = ctx.trainer or _default_trainer(ctx)
    system, buffer = ctx.job.system, synthesized.buffer
    adapters = dict(current)
    results: dict[str, ComponentTraining] = {}
    for component in system.trainable_components:
        rows = buffer.sft.get(component.name, [])
        if not rows:
            results[component.name] = ComponentTraining(trained=False, skipped_reason="no samples")
            ctx.event(f"epoch {epoch}: {component.name} not trained: no samples", "warning")
            continue
        assert component.model is not None
        base = resolve_model(system.models[component.model], system.base_dir)
        key = f"{ctx.job_id}/epoch-{epoch}/adapters/{component.name}"
        with tempfile.TemporaryDirectory() as scratch:
            out = Path(scratch) / component.name
            result = trainer(
                base,
                rows,
                buffer.dpo.get(component.name, []),
                ctx.job.train,
                out,
                seed=ctx.job.loop.seed + epoch,
            )
            ctx.artifacts.put_dir(out, key)
        adapters[component.name] = key
        results[component.name] = ComponentTraining(
            trained=True,
            adapter=key,
            sft_losses=result.sft_losses,
            dpo_losses=result.dpo_losses,
            trained_tokens=result.trained_tokens,
            samples=len(rows),
            pairs=len(buffer.dpo.get(component.name, [])),
            sft_steps=result.sft_steps,
            dpo_steps=result.dpo_steps,
            seconds=round(result.seconds, 2),
        )
        ctx.event(f"epoch {epoch}: trained {component.name} on {len(rows)} rows")
    return adapters, results


def _default_trainer(ctx: JobContext) -> Callable[..., Any]:
    """``train_adapter``, or its FSDP launcher when the worker trains on several GPUs."""
    from cotune.settings import get_settings
    from cotune.training import train_adapter

    gpus = (ctx.settings or get_settings()).train_gpus
    if gpus > 1:
        from cotune.training.fsdp import train_adapter_fsdp

        return partial(train_adapter_fsdp, gpus=gpus)
    return train_adapter


def evaluate_epoch(ctx: JobContext, epoch: int, trained: TrainOut, best_val: float) -> EvaluateOut:
    """Score the epoch's adapters on val; keep them if they are at least as good. An epoch
    that trained nothing has nothing new to keep."""
    result = evaluate_split(ctx, "val", trained.adapters)
    trained_any = any(c.trained for c in trained.components.values())
    kept = trained_any and (ctx.job.loop.keep == "last" or result.score >= best_val)
    if not trained_any:
        verdict = "not kept (no component was trained)"
    elif ctx.job.loop.keep == "last":
        verdict = f"kept (loop.keep last; best so far {best_val:.3f})"
    else:
        verdict = "kept" if kept else f"not kept (best so far {best_val:.3f})"
    ctx.event(f"epoch {epoch}: val {result.score:.3f}, {verdict}")
    return EvaluateOut(
        score=result.score, traces=result.traces, kept=kept, judge_calls=result.judge_calls
    )


def final_test(ctx: JobContext, current: dict[str, str]) -> TestOut:
    """The base system and the best epoch's adapters, once each, on test."""
    if not current:
        ctx.event("no epoch beat the base system: the result is the base system", "warning")
    if ctx.job.data.test is None:
        return TestOut(base=None, best=None, adapters=current)
    base = evaluate_split(ctx, "test", {})
    best = evaluate_split(ctx, "test", current) if current else base
    calls = base.judge_calls + (best.judge_calls if current else 0)
    return TestOut(
        base=base.score, best=best.score, adapters=current, traces=best.traces, judge_calls=calls
    )


def evaluate_split(ctx: JobContext, split: str, adapter_keys: dict[str, str]) -> EvalOut:
    examples = ctx.split(split)
    if split == "val" and ctx.job.loop.val_limit:
        examples = examples[: ctx.job.loop.val_limit]
    scorer = ctx.scorer(capped=False)  # measuring what an epoch is worth is never cut short
    traces = _run_batched(ctx, ctx.runtime(adapter_keys), examples, Stage.evaluate, scorer)
    return EvalOut(score=mean_score(traces), traces=traces, judge_calls=scorer.calls)


# -- helpers --------------------------------------------------------------------------------


def _unscored(trace: Trace) -> Trace:
    """A copy of ``trace`` for a scorer to score afresh."""
    copied = trace.model_copy(deep=True)
    copied.score = copied.passed = copied.score_samples = copied.score_reason = None
    copied.graded_score = None
    return copied


def _run_batched(
    ctx: JobContext,
    runtime: Runtime,
    examples: list[Example],
    stage: Stage,
    scorer: Scorer,
    batch: int = 64,
    **kwargs: Any,
) -> list[Trace]:
    traces: list[Trace] = []
    for start in range(0, len(examples), batch):
        chunk = runtime.run(examples[start : start + batch], **kwargs)
        scorer.score(chunk)
        traces.extend(chunk)
        if ctx.progress:
            ctx.progress(stage.value, len(traces), len(examples))
    return traces
