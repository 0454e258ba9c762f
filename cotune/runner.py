"""Running one stage of a job: what ``cotune.loop`` calls around each stage function.

``run_stage`` loads a stage's stored output if the stage finished before (a resumed job, a
redelivered task); otherwise it claims the stage's lease, renews it from a heartbeat thread
while the stage runs, stores the typed output under ``(job, epoch, stage)`` and records what
the stage cost. ``JobContext`` is everything a job runs with; the budget checks read the costs
recorded so far.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from cotune.data import Example
from cotune.engines import InferenceEngine, cached_engines, get_engine
from cotune.errors import DataError
from cotune.feedback import FeedbackRow
from cotune.openai_jobs import load_split
from cotune.records import (
    Event,
    Stage,
    StageOut,
    StageRecord,
    TestOut,
    TrainOut,
)
from cotune.runtime import Runtime, open_runtime
from cotune.scoring import ScoreCache, Scorer
from cotune.settings import DEFAULT_LEASE_SECONDS, Settings, get_settings
from cotune.spec.job import JobSpec
from cotune.store import ArtifactStore, JobStore
from cotune.tools import ToolContext

Progress = Callable[[str, int, int], None]  # (stage, done, total)
Out = TypeVar("Out", bound=StageOut)


class BudgetExhausted(Exception):
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
    lease_seconds: float = DEFAULT_LEASE_SECONDS
    progress: Progress | None = None
    engine_options: dict[str, Any] = field(default_factory=dict)
    # The device settings (GPUs, memory share, CPU engine release); None: the environment's.
    settings: Settings | None = None
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
    _feedback: list[FeedbackRow] | None = None
    # Judge scores (metric judge) by (inputs, gold, output): seeded from the stored stages
    # once, then shared by every stage this process runs.
    _score_cache: ScoreCache | None = None
    # A running stage's events, written when it finishes (run_stage): a stage that dies and
    # runs again on another worker leaves its events once, not once per attempt.
    _held_events: list[Event] | None = None

    def split(self, name: str) -> list[Example]:
        if name not in self._splits:
            self._splits[name] = load_split(self.job, name)  # type: ignore[arg-type]
        return self._splits[name]

    def feedback(self) -> list[FeedbackRow]:
        """The job's rated runs (``data.feedback``; none without one). A row's id may not be
        a val or test example's: a trace's example id is what keeps them out of training."""
        if self._feedback is None:
            from cotune.feedback import load_feedback

            path = self.job.data_path("feedback")
            rows = [] if path is None else load_feedback(path, self.job.system)
            held_out = {e.id for split in ("val", "test") for e in self.split(split)}
            for row in rows:
                if row.id in held_out:
                    raise DataError(
                        f"id {row.id!r} is also a val or test example's; a feedback row feeds "
                        "training, so it needs an id of its own",
                        path=str(path),
                        line=row.line,
                        field="id",
                    )
            self._feedback = rows
        return self._feedback

    def event(self, message: str, level: str = "info", **data: Any) -> None:
        event = Event(level=level, message=message, data=data, created_at=time.time())
        if self._held_events is not None:
            self._held_events.append(event)
        else:
            self.store.add_event(self.job_id, event)

    def runtime(self, adapter_keys: dict[str, str] | None = None) -> Runtime:
        adapters = {c: str(self.adapter_path(k)) for c, k in (adapter_keys or {}).items()}
        # A job's runs reach only what the deployment allows (COTUNE_HTTP_SEARCH_*).
        tools = self.tools or ToolContext.from_settings(
            self.job.system, self.settings or get_settings()
        )
        if self.engines is not None:
            return Runtime(self.job.system, self.engines, tools, adapters)
        return open_runtime(
            self.job.system,
            engine=self.job.engine,
            adapters=adapters,
            tools=tools,
            engine_options=self.local_engine_options(),
        )

    def scorer(self, *, capped: bool) -> Scorer:
        """The job's scorer for one stage: the task metric, or the judge under the rubric.
        ``capped`` keeps a judge within what ``budget.max_judge_calls`` has left; measuring
        (baseline, evaluate, test) is not capped, so a kept epoch is always measured."""
        from cotune.judge.score import SCORE_MAX_TOKENS
        from cotune.metrics import JUDGE
        from cotune.scoring import GoldScorer, JudgeScorer

        system, judge = self.job.system, self.job.judge
        if system.metric != JUDGE:
            return GoldScorer(system)
        assert judge is not None  # JobSpec requires one with metric judge
        return JudgeScorer(
            self.judge_engine(),
            system,
            samples=self.job.loop.judge_samples,
            temperature=judge.temperature,
            max_tokens=min(judge.max_tokens, SCORE_MAX_TOKENS),
            seed=self.job.loop.seed,
            cache=self._stored_scores(),
            max_calls=judge_calls_left(self) if capped else None,
        )

    def _stored_scores(self) -> ScoreCache:
        """The judge's scores in this job's stored stage outputs: a worker that runs one stage
        of a job per task judges no output another task judged."""
        from cotune.records import VerifyOut, stage_output_model
        from cotune.scoring import CachedScore, cache_key

        if self._score_cache is not None:
            return self._score_cache
        cache: ScoreCache = {}
        for state in self.store.stage_states(self.job_id):
            if state.status != "done" or not state.output_key or state.component:
                continue
            output = stage_output_model(state.stage).model_validate(
                self.artifacts.get_json(state.output_key)
            )
            traces = output.shown_traces()
            if isinstance(output, VerifyOut):
                traces = [*output.replays.values(), *output.originals]
            for trace in traces:
                if trace.score_samples is not None:
                    cache[cache_key(trace)] = CachedScore(trace.score_samples, trace.score_reason)
        self._score_cache = cache
        return cache

    def judge_engine(self) -> InferenceEngine:
        from cotune.models import resolve_judge

        judge, system = self.job.judge, self.job.system
        assert judge is not None
        if self.judge is not None:
            return self.judge
        if judge.engine == "openai":
            key = os.environ.get(judge.api_key_env) if judge.api_key_env else None
            return get_engine("openai", judge.model, url=judge.url, api_key=key)
        path = resolve_judge(system, judge.model, param="judge.model")
        return get_engine(self.job.engine, path, **self.local_engine_options())

    def local_engine_options(self) -> dict[str, Any]:
        """Options for this job's local engine: vLLM's LoRA limits must fit every component,
        and on a GPU the worker's memory share is split among the job's engines."""
        options: dict[str, Any] = {}
        if self.job.engine == "vllm":
            settings = self.settings or get_settings()
            options = {
                "max_lora_rank": max(self.job.train.lora_r, 16),
                "max_loras": max(len(self.job.system.trainable_components), 1),
                "gpu_memory_utilization": settings.gpu_memory_share / self.job.local_model_count(),
                "release_on_cpu": settings.release_cpu_engine,
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

    @property
    def test_epoch(self) -> int:
        """The epoch number the final test is stored under: after the last epoch."""
        return self.job.loop.epochs + 1


# -- stored outputs ---------------------------------------------------------------------------


def output_key(ctx: JobContext, epoch: int, stage: Stage) -> str:
    return f"{ctx.job_id}/epoch-{epoch}/{stage.value}.json"


def stored_output(ctx: JobContext, epoch: int, stage: Stage, model: type[Out]) -> Out | None:
    """The stage's stored output read into ``model``, or None if the stage has not finished."""
    if ctx.store.stage_done(ctx.job_id, epoch, stage) is None:
        return None
    return model.model_validate(ctx.artifacts.get_json(output_key(ctx, epoch, stage)))


def final_output(ctx: JobContext) -> TestOut | None:
    """The final test's stored output (None until the job has run it)."""
    return stored_output(ctx, ctx.test_epoch, Stage.test, TestOut)


# -- running a stage --------------------------------------------------------------------------


def run_stage(
    ctx: JobContext,
    epoch: int,
    stage: Stage,
    model: type[Out],
    run: Callable[[], Out],
    *,
    after: Callable[[], None] | None = None,
) -> Out:
    """Run ``run()`` once: load its stored output if it finished before, else run it and
    store the output under the fixed key, recording its cost; then ``after()`` (only when it
    ran here)."""
    key = output_key(ctx, epoch, stage)
    if ctx.store.stage_done(ctx.job_id, epoch, stage) is not None:
        return model.model_validate(ctx.artifacts.get_json(key))
    if ctx.stage_limit is not None and ctx.stages_run >= ctx.stage_limit:
        raise StagePause(epoch, stage)
    ctx.stages_run += 1
    if not ctx.store.claim_stage(ctx.job_id, epoch, stage, ctx.owner, ctx.lease_seconds):
        raise StageBusy(f"stage {stage.value} of epoch {epoch} is held by another worker")
    before = _engine_counters(ctx)
    started = time.perf_counter()
    ctx._held_events = []
    try:
        with _heartbeat(ctx, epoch, stage):
            output = run()
        events = ctx._held_events
    finally:
        ctx._held_events = None
    ctx.artifacts.put_json(key, output.model_dump(mode="json"))
    after_counters = _engine_counters(ctx)
    record = StageRecord(
        epoch=epoch,
        stage=stage,
        seconds=round(time.perf_counter() - started, 3),
        engine_calls=after_counters["calls"] - before["calls"],
        prompt_tokens=after_counters["prompt_tokens"] - before["prompt_tokens"],
        completion_tokens=after_counters["completion_tokens"] - before["completion_tokens"],
        judge_calls=output.judge_calls,
        trained_tokens=output.trained_tokens if isinstance(output, TrainOut) else 0,
        details=output.details(),
    )
    if not ctx.store.finish_stage(ctx.job_id, epoch, stage, ctx.owner, record, key):
        # Our lease expired and another worker took the stage over: its result stands.
        raise StageBusy(f"lost the lease on stage {stage.value} of epoch {epoch}")
    for event in events:
        ctx.store.add_event(ctx.job_id, event)
    if ctx.on_stage_done is not None:
        ctx.on_stage_done(record)
    if after is not None:
        after()
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
    engines = {id(e): e for e in cached_engines()}
    for extra in [*(ctx.engines or {}).values(), ctx.judge]:
        if extra is not None:
            engines[id(extra)] = extra
    totals = {"calls": 0, "prompt_tokens": 0, "completion_tokens": 0}
    for engine in engines.values():
        totals["calls"] += engine.stats.calls
        totals["prompt_tokens"] += engine.stats.prompt_tokens
        totals["completion_tokens"] += engine.stats.completion_tokens
    return totals


# -- budget -----------------------------------------------------------------------------------


def _spent(ctx: JobContext) -> StageRecord:
    total = StageRecord(epoch=0, stage=Stage.baseline)
    for record in ctx.store.stages(ctx.job_id):
        total.judge_calls += record.judge_calls
        total.completion_tokens += record.completion_tokens
    return total


def judge_calls_left(ctx: JobContext) -> int | None:
    """What ``budget.max_judge_calls`` still allows (None: no limit)."""
    limit = ctx.job.budget.max_judge_calls
    return None if limit is None else max(limit - _spent(ctx).judge_calls, 0)


def check_budget(ctx: JobContext) -> None:
    """Raise ``BudgetExhausted`` if the job spent its generated tokens or judge calls."""
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
