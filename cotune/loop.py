"""The epoch loop: rollout -> credit -> verify -> synthesize -> train -> evaluate.

Read ``run_job`` top to bottom: that is the algorithm. Each stage is a function with typed
inputs and outputs, run through ``_stage``, which stores its output under a fixed key
``(job, epoch, stage)``: a stage that already finished is loaded, not redone, so a job resumes
after a crash and a redelivered task does nothing twice. The embedded runner and the Celery
workers call the same functions.
"""

from __future__ import annotations

import random
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cotune.data import Example, load_examples
from cotune.engines import InferenceEngine, get_engine
from cotune.jobspec import JobSpec
from cotune.records import (
    Candidate,
    ComponentEpochRecord,
    EpochRecord,
    Event,
    JobReport,
    Stage,
    StageRecord,
)
from cotune.runtime import Runtime, Trace, mean_score, open_runtime, score_traces
from cotune.store import ArtifactStore, JobStore
from cotune.synthesis import Buffer, add_bootstrap, add_corrections, check_sources
from cotune.tools import ToolContext

Progress = Callable[[str, int, int], None]  # (stage, done, total)


class BudgetExhausted(Exception):
    pass


class JobCancelled(Exception):
    pass


class StageBusy(RuntimeError):
    """Another worker holds the stage's lease (or took it over): this one must stop."""


class StagePause(Exception):
    """Raised before a new stage when the context's ``stage_limit`` is reached: a worker runs
    one stage per task and re-enqueues the job; the next task resumes from the store."""

    def __init__(self, epoch: int, stage: Stage) -> None:
        super().__init__(f"paused before epoch {epoch} {stage.value}")
        self.epoch, self.stage = epoch, stage


@dataclass
class JobContext:
    job_id: str
    job: JobSpec
    store: JobStore
    artifacts: ArtifactStore
    owner: str = "embedded"
    lease_seconds: float = 600.0
    progress: Progress | None = None
    engine_options: dict[str, Any] = field(default_factory=dict)
    # Seams for logic tests (scripted doubles): engines by model alias, the judge's engine,
    # and the trainer. None means the real ones.
    engines: dict[str, InferenceEngine] | None = None
    judge: InferenceEngine | None = None
    trainer: Callable[..., Any] | None = None
    # What tools may reach (the service passes its http_search allow-list).
    tools: ToolContext | None = None
    on_stage_done: Callable[[StageRecord], None] | None = None
    # Run at most this many new stages, then raise StagePause (None: run to the end).
    stage_limit: int | None = None
    stages_run: int = 0
    _splits: dict[str, list[Example]] = field(default_factory=dict)

    def split(self, name: str) -> list[Example]:
        if name not in self._splits:
            path = self.job.data_path(name)  # type: ignore[arg-type]
            self._splits[name] = (
                [] if path is None else load_examples(path, self.job.system, split=name)
            )
        return self._splits[name]

    def event(self, message: str, level: str = "info", **data: Any) -> None:
        self.store.add_event(
            self.job_id, Event(level=level, message=message, data=data, created_at=time.time())
        )

    def runtime(self, adapter_keys: dict[str, str] | None = None) -> Runtime:
        adapters = {c: str(self.adapter_path(k)) for c, k in (adapter_keys or {}).items()}
        tools = self.tools or ToolContext.for_system(self.job.system)
        if self.engines is not None:
            return Runtime(self.job.system, self.engines, tools, adapters)
        return open_runtime(
            self.job.system,
            engine=self.job.engine,
            adapters=adapters,
            tools=tools,
            engine_options=self.local_engine_options(),
        )

    def local_engine_options(self) -> dict[str, Any]:
        """Options for this job's local engine: vLLM's LoRA limits must fit every component."""
        options: dict[str, Any] = {}
        if self.job.engine == "vllm":
            options = {
                "max_lora_rank": max(self.job.train.lora_r, 16),
                "max_loras": max(len(self.job.system.trainable_components), 1),
            }
        return {**options, **self.engine_options}

    def adapter_path(self, key: str) -> Path:
        local = self.artifacts.local_path(key)
        if local is not None:
            return local
        cache = Path(tempfile.gettempdir()) / "cotune-adapters" / self.job_id / key
        if not (cache / "adapter_model.safetensors").exists():
            self.artifacts.get_dir(key, cache)
        return cache


# -- the algorithm ----------------------------------------------------------------------------


def run_job(ctx: JobContext) -> JobReport:
    """Run (or resume) a job to the end and return its report."""
    job = ctx.job
    base = _stage(ctx, 0, Stage.baseline, baseline, ctx)
    best_val: float = base["score"]
    current: dict[str, str] = {}
    stop_reason = None
    for epoch in range(1, job.loop.epochs + 1):
        try:
            _check_cancel(ctx)
            if ctx.store.stage_done(ctx.job_id, epoch, Stage.rollout) is None:
                _check_budget(ctx)  # only before new work: a resumed job keeps what it paid for
            traces = _stage(ctx, epoch, Stage.rollout, rollout, ctx, epoch, current)
            credit = _stage(ctx, epoch, Stage.credit, assign_credit, ctx, epoch, traces)
            checked = _stage(
                ctx, epoch, Stage.verify, verify_candidates, ctx, epoch, traces, credit, current
            )
            buffer = _stage(
                ctx, epoch, Stage.synthesize, synthesize, ctx, epoch, traces, checked, current
            )
            trained = _stage(ctx, epoch, Stage.train, train_components, ctx, epoch, buffer, current)
            evaluation = _stage(
                ctx, epoch, Stage.evaluate, evaluate_epoch, ctx, epoch, trained, best_val
            )
        except BudgetExhausted as stop:
            stop_reason = str(stop)
            ctx.event(f"budget exhausted before epoch {epoch} finished: {stop}", "warning")
            break
        if evaluation["kept"]:
            best_val, current = evaluation["score"], trained["adapters"]
    final = _stage(ctx, job.loop.epochs + 1, Stage.test, final_test, ctx, current)
    return build_report(ctx, base["score"], best_val, final, stop_reason)


# -- stages -----------------------------------------------------------------------------------


def baseline(ctx: JobContext) -> dict[str, Any]:
    """The base system on val: the bar the first epoch must clear."""
    result = evaluate_split(ctx, "val", {})
    ctx.event(f"base system scores {result['score']:.3f} on val")
    return result


def rollout(ctx: JobContext, epoch: int, current: dict[str, str]) -> dict[str, Any]:
    """Run the system with the current adapters on this epoch's batch of train examples."""
    train = ctx.split("train")
    rng = random.Random(ctx.job.loop.seed * 1000 + epoch)
    batch = rng.sample(train, min(ctx.job.loop.rollout_batch, len(train)))
    runtime = ctx.runtime(current)
    traces = _run_batched(ctx, runtime, batch, Stage.rollout)
    score = mean_score(traces)
    ctx.event(f"epoch {epoch}: rollout of {len(traces)} train examples scores {score:.3f}")
    return {"traces": [t.model_dump(mode="json") for t in traces], "score": score}


def assign_credit(ctx: JobContext, epoch: int, rollout_out: dict[str, Any]) -> dict[str, Any]:
    """Ask the judge about every failed trace (if the job has a judge)."""
    from cotune.judge import judge_traces

    traces = _traces(rollout_out)
    failed = [t for t in traces if not t.passed]
    judge = ctx.job.judge
    if judge is None or not failed:
        return {"outcomes": [], "failed": len(failed)}
    remaining = _judge_calls_left(ctx)
    outcomes = judge_traces(
        judge_engine(ctx),
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
    return {
        "outcomes": [o.to_json() for o in outcomes],
        "failed": len(failed),
        "judge_failures": failures,
        "judge_calls": sum(o.calls for o in outcomes),
    }


def verify_candidates(
    ctx: JobContext,
    epoch: int,
    rollout_out: dict[str, Any],
    credit: dict[str, Any],
    current: dict[str, str],
) -> dict[str, Any]:
    """Replay each proposal; keep those that raise the score. Without judge proposals for a
    trace, candidates come from re-sampling its trainable components."""
    from cotune.judge import JudgeOutcome
    from cotune.verify import gold_proposals, judge_proposals, resample_proposals, verify

    loop = ctx.job.loop
    traces = _traces(rollout_out)
    failed = [t for t in traces if not t.passed]
    outcomes = [JudgeOutcome.from_json(o) for o in credit["outcomes"]]
    runtime = ctx.runtime(current)
    proposals = judge_proposals(ctx.job.system, failed, outcomes)
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
    candidates, replays = verify(
        runtime,
        proposals,
        epoch=epoch,
        replays=loop.replays,
        seed=loop.seed + epoch,
        require_gain=loop.verify_by_replay,
    )
    ctx.store.add_candidates(ctx.job_id, candidates, replace_epoch=epoch)
    accepted = sum(c.accepted for c in candidates)
    how = "verified by replay" if loop.verify_by_replay else "accepted unverified (ablation)"
    ctx.event(f"epoch {epoch}: {accepted} of {len(candidates)} candidates {how}")
    return {
        "candidates": [c.model_dump(mode="json") for c in candidates],
        "replays": {str(i): t.model_dump(mode="json") for i, t in replays.items()},
    }


def synthesize(
    ctx: JobContext,
    epoch: int,
    rollout_out: dict[str, Any],
    checked: dict[str, Any],
    current: dict[str, str],
) -> dict[str, Any]:
    """Cumulative buffer: last epoch's rows + bootstrapped + corrections + augmentation."""
    system, loop = ctx.job.system, ctx.job.loop
    previous = _stage_output(ctx, epoch - 1, Stage.synthesize)
    buffer = Buffer.from_json(previous["buffer"]) if previous else Buffer()
    traces = _traces(rollout_out)
    train_ids = {e.id for e in ctx.split("train")}
    check_sources(traces, train_ids)
    candidates = [Candidate.model_validate(c) for c in checked["candidates"]]
    replays = {int(i): Trace.model_validate(t) for i, t in checked["replays"].items()}
    add_bootstrap(buffer, system, traces)
    add_corrections(
        buffer,
        system,
        {t.trace_id: t for t in traces},
        replays,
        candidates,
        final_component=system.writer_of(system.output).name  # type: ignore[union-attr]
        if system.writer_of(system.output)
        else None,
    )
    augmented = 0
    runtime = None
    for round_ in range(loop.augment_rollouts):
        short = [
            c.name
            for c in system.trainable_components
            if len(buffer.sft.get(c.name, [])) < loop.samples_per_component
        ]
        if not short:
            break
        runtime = runtime or ctx.runtime(current)
        extra = _run_batched(
            ctx,
            runtime,
            ctx.split("train"),
            Stage.synthesize,
            temperature=loop.candidate_temperature,
            seed=loop.seed * 31 + epoch * 101 + round_,
        )
        check_sources(extra, train_ids)
        augmented += sum(add_bootstrap(buffer, system, extra, source="augment").values())
    counts = buffer.counts()
    ctx.event(f"epoch {epoch}: buffer {counts} ({augmented} rows from augmentation)")
    return {"buffer": buffer.to_json(), "counts": counts, "augmented": augmented}


def train_components(
    ctx: JobContext, epoch: int, synthesized: dict[str, Any], current: dict[str, str]
) -> dict[str, Any]:
    """One LoRA adapter per trainable component: SFT from the base, then DPO."""
    from cotune.models import resolve_model
    from cotune.training import train_adapter

    trainer = ctx.trainer or train_adapter
    system, buffer = ctx.job.system, Buffer.from_json(synthesized["buffer"])
    adapters = dict(current)
    results: dict[str, Any] = {}
    for component in system.trainable_components:
        rows = buffer.sft.get(component.name, [])
        if not rows:
            results[component.name] = {"trained": False, "skipped_reason": "no samples"}
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
        results[component.name] = {
            "trained": True,
            "adapter": key,
            "sft_losses": result.sft_losses,
            "dpo_losses": result.dpo_losses,
            "trained_tokens": result.trained_tokens,
            "samples": len(rows),
            "pairs": len(buffer.dpo.get(component.name, [])),
            "sft_steps": result.sft_steps,
            "dpo_steps": result.dpo_steps,
            "seconds": round(result.seconds, 2),
        }
        ctx.event(f"epoch {epoch}: trained {component.name} on {len(rows)} rows")
    return {
        "adapters": adapters,
        "components": results,
        "trained_tokens": sum(r.get("trained_tokens", 0) for r in results.values()),
    }


def evaluate_epoch(
    ctx: JobContext, epoch: int, trained: dict[str, Any], best_val: float
) -> dict[str, Any]:
    """Score the epoch's adapters on val; keep them if they are at least as good. An epoch
    that trained nothing has nothing new to keep."""
    result = evaluate_split(ctx, "val", trained["adapters"])
    trained_any = any(c.get("trained") for c in trained["components"].values())
    kept = trained_any and result["score"] >= best_val
    if not trained_any:
        verdict = "not kept (no component was trained)"
    else:
        verdict = "kept" if kept else f"not kept (best so far {best_val:.3f})"
    ctx.event(f"epoch {epoch}: val {result['score']:.3f}, {verdict}")
    return {**result, "kept": kept}


def final_test(ctx: JobContext, current: dict[str, str]) -> dict[str, Any]:
    """The base system and the best epoch's adapters, once each, on test."""
    if not current:
        ctx.event("no epoch beat the base system: the result is the base system", "warning")
    if ctx.job.data.test is None:
        return {"base": None, "best": None, "adapters": current}
    base = evaluate_split(ctx, "test", {})
    best = evaluate_split(ctx, "test", current) if current else base
    return {
        "base": base["score"],
        "best": best["score"],
        "adapters": current,
        "traces": best["traces"],
    }


def evaluate_split(ctx: JobContext, split: str, adapter_keys: dict[str, str]) -> dict[str, Any]:
    examples = ctx.split(split)
    if split == "val" and ctx.job.loop.val_limit:
        examples = examples[: ctx.job.loop.val_limit]
    traces = _run_batched(ctx, ctx.runtime(adapter_keys), examples, Stage.evaluate)
    return {"score": mean_score(traces), "traces": [t.model_dump(mode="json") for t in traces]}


# -- plumbing ---------------------------------------------------------------------------------


def judge_engine(ctx: JobContext) -> InferenceEngine:
    import os

    from cotune.models import resolve_model
    from cotune.spec import ModelRef

    judge, system = ctx.job.judge, ctx.job.system
    assert judge is not None
    if ctx.judge is not None:
        return ctx.judge
    if judge.engine == "openai":
        key = os.environ.get(judge.api_key_env) if judge.api_key_env else None
        return get_engine("openai", judge.model, url=judge.url, api_key=key)
    ref = system.models.get(judge.model) or ModelRef(name=judge.model)
    path = resolve_model(ref, system.base_dir, param="judge.model")
    return get_engine(ctx.job.engine, path, **ctx.local_engine_options())


def _run_batched(
    ctx: JobContext,
    runtime: Runtime,
    examples: list[Example],
    stage: Stage,
    batch: int = 64,
    **kwargs: Any,
) -> list[Trace]:
    traces: list[Trace] = []
    for start in range(0, len(examples), batch):
        chunk = runtime.run(examples[start : start + batch], **kwargs)
        score_traces(runtime.system, chunk)
        traces.extend(chunk)
        if ctx.progress:
            ctx.progress(stage.value, len(traces), len(examples))
    return traces


def _traces(output: dict[str, Any]) -> list[Trace]:
    return [Trace.model_validate(t) for t in output["traces"]]


def _output_key(ctx: JobContext, epoch: int, stage: Stage) -> str:
    return f"{ctx.job_id}/epoch-{epoch}/{stage.value}.json"


def _stage_output(ctx: JobContext, epoch: int, stage: Stage) -> dict[str, Any] | None:
    if epoch < 1 or ctx.store.stage_done(ctx.job_id, epoch, stage) is None:
        return None
    return ctx.artifacts.get_json(_output_key(ctx, epoch, stage))


def _stage(ctx: JobContext, epoch: int, stage: Stage, run: Callable[..., Any], *args: Any) -> Any:
    """Run ``run(*args)`` once: load its stored output if it finished before, else run it and
    store the output under the fixed key, recording its cost."""
    key = _output_key(ctx, epoch, stage)
    if ctx.store.stage_done(ctx.job_id, epoch, stage) is not None:
        return ctx.artifacts.get_json(key)
    if ctx.stage_limit is not None and ctx.stages_run >= ctx.stage_limit:
        raise StagePause(epoch, stage)
    ctx.stages_run += 1
    if not ctx.store.claim_stage(ctx.job_id, epoch, stage, ctx.owner, ctx.lease_seconds):
        raise StageBusy(f"stage {stage.value} of epoch {epoch} is held by another worker")
    before = _engine_counters(ctx)
    started = time.perf_counter()
    with _heartbeat(ctx, epoch, stage):
        output = run(*args)
    ctx.artifacts.put_json(key, output)
    after = _engine_counters(ctx)
    record = StageRecord(
        epoch=epoch,
        stage=stage,
        seconds=round(time.perf_counter() - started, 3),
        engine_calls=after["calls"] - before["calls"],
        prompt_tokens=after["prompt_tokens"] - before["prompt_tokens"],
        completion_tokens=after["completion_tokens"] - before["completion_tokens"],
        judge_calls=int(output.get("judge_calls", 0)) if isinstance(output, dict) else 0,
        trained_tokens=int(output.get("trained_tokens", 0)) if isinstance(output, dict) else 0,
    )
    if not ctx.store.finish_stage(ctx.job_id, epoch, stage, ctx.owner, record, key):
        # Our lease expired and another worker took the stage over: its result stands.
        raise StageBusy(f"lost the lease on stage {stage.value} of epoch {epoch}")
    if ctx.on_stage_done is not None:
        ctx.on_stage_done(record)
    if epoch >= 1 and stage == Stage.evaluate:
        ctx.store.save_epoch(ctx.job_id, epoch_record(ctx, epoch))
    return output


@contextmanager
def _heartbeat(ctx: JobContext, epoch: int, stage: Stage) -> Iterator[None]:
    """Renew the stage's lease every third of its length while it runs, so a live worker
    keeps it and a dead one's lease expires and the stage is re-queued."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(ctx.lease_seconds / 3):
            ctx.store.heartbeat(ctx.job_id, epoch, stage, ctx.owner, ctx.lease_seconds)

    thread = threading.Thread(target=beat, name=f"lease-{ctx.job_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _engine_counters(ctx: JobContext) -> dict[str, int]:
    """Counters of every engine this job may use: the process cache and injected ones."""
    from cotune.engines import _ENGINES

    engines = {id(e): e for e in _ENGINES.values()}
    for extra in [*(ctx.engines or {}).values(), ctx.judge]:
        if extra is not None:
            engines[id(extra)] = extra
    totals = {"calls": 0, "prompt_tokens": 0, "completion_tokens": 0}
    for engine in engines.values():
        totals["calls"] += engine.stats.calls
        totals["prompt_tokens"] += engine.stats.prompt_tokens
        totals["completion_tokens"] += engine.stats.completion_tokens
    return totals


def _spent(ctx: JobContext) -> StageRecord:
    total = StageRecord(epoch=0, stage=Stage.baseline)
    for record in ctx.store.stages(ctx.job_id):
        total.judge_calls += record.judge_calls
        total.completion_tokens += record.completion_tokens
    return total


def _judge_calls_left(ctx: JobContext) -> int | None:
    limit = ctx.job.budget.max_judge_calls
    return None if limit is None else max(limit - _spent(ctx).judge_calls, 0)


def _check_cancel(ctx: JobContext) -> None:
    if ctx.store.cancel_requested(ctx.job_id):
        raise JobCancelled("cancel requested")


def _check_budget(ctx: JobContext) -> None:
    budget, spent = ctx.job.budget, _spent(ctx)
    if budget.max_generated_tokens is not None and (
        spent.completion_tokens >= budget.max_generated_tokens
    ):
        raise BudgetExhausted(
            f"{spent.completion_tokens} generated tokens of "
            f"max_generated_tokens {budget.max_generated_tokens}"
        )
    if (
        budget.max_judge_calls is not None
        and ctx.job.judge is not None
        and (spent.judge_calls >= budget.max_judge_calls)
    ):
        raise BudgetExhausted(
            f"{spent.judge_calls} judge calls of max_judge_calls {budget.max_judge_calls}"
        )


def epoch_record(ctx: JobContext, epoch: int) -> EpochRecord:
    """Per-epoch and per-component numbers, rebuilt from the stored stage outputs."""
    rollout_out = _stage_output(ctx, epoch, Stage.rollout) or {}
    credit = _stage_output(ctx, epoch, Stage.credit) or {}
    checked = _stage_output(ctx, epoch, Stage.verify) or {"candidates": []}
    synthesized = _stage_output(ctx, epoch, Stage.synthesize) or {"counts": {}}
    trained = _stage_output(ctx, epoch, Stage.train) or {"components": {}}
    evaluation = _stage_output(ctx, epoch, Stage.evaluate) or {}
    candidates = [Candidate.model_validate(c) for c in checked["candidates"]]
    failed = max(int(credit.get("failed", 0)), 1)
    components = []
    for component in ctx.job.system.trainable_components:
        mine = [c for c in candidates if c.component == component.name]
        blamed = {c.trace_id for c in mine if c.verified}
        info = trained["components"].get(component.name, {})
        counts = synthesized["counts"].get(component.name, {})
        components.append(
            ComponentEpochRecord(
                epoch=epoch,
                component=component.name,
                blame_rate=round(len(blamed) / failed, 4),
                candidates_proposed=len(mine),
                candidates_verified=sum(c.verified for c in mine),
                samples=counts.get("samples", 0),
                pairs=counts.get("pairs", 0),
                trained=bool(info.get("trained")),
                skipped_reason=info.get("skipped_reason"),
                sft_losses=info.get("sft_losses", []),
                dpo_losses=info.get("dpo_losses", []),
                adapter=info.get("adapter"),
            )
        )
    return EpochRecord(
        epoch=epoch,
        train_score=rollout_out.get("score"),
        val_score=evaluation.get("score"),
        kept=bool(evaluation.get("kept")),
        judge_failures=int(credit.get("judge_failures", 0)),
        components=components,
    )


def build_report(
    ctx: JobContext,
    base_val: float,
    best_val: float,
    final: dict[str, Any],
    stop_reason: str | None,
) -> JobReport:
    epochs = [r for r in ctx.store.epochs(ctx.job_id)]
    kept = [e.epoch for e in epochs if e.kept]
    best_epoch = kept[-1] if kept else None
    return JobReport(
        job_name=ctx.job.system.name,
        status="succeeded",
        base_val_score=base_val,
        best_epoch=best_epoch,
        best_val_score=best_val,
        base_test_score=final.get("base"),
        test_score=final.get("best"),
        stop_reason=stop_reason,
        epochs=epochs,
        stages=ctx.store.stages(ctx.job_id),
        adapters=final.get("adapters") or {},
    )


def copy_adapters(ctx: JobContext, adapters: dict[str, str], out: Path) -> dict[str, str]:
    """Export the best adapters to ``out/<component>/``."""
    written = {}
    for component, key in adapters.items():
        target = out / component
        shutil.rmtree(target, ignore_errors=True)
        ctx.artifacts.get_dir(key, target)
        written[component] = str(target)
    return written
