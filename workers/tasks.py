"""Thin Celery tasks over ``cotune.loop``: ids in, everything else from the stores.

``advance_job(job_id)`` (queue ``gpu``) runs exactly one new stage of a job and enqueues
itself again: ``run_job`` with ``stage_limit=1`` loads every finished stage from the store, runs
the next one under a lease (``claim_stage`` + heartbeats) and raises ``StagePause`` before the
one after. When ``run_job`` returns, every stage is done and ``finalize_job(job_id)`` (queue
``cpu``) writes the report, metrics and the best adapters under ``<job_id>/result/`` in the
artifact store (``cotune.service.export_job_result``, the layout the embedded server writes),
stores the report as the job's result and moves the job to ``succeeded``.

Between two stages a task checks ``cancel_requested`` and moves the job to ``cancelled``. A
stage that raises fails its attempt (``fail_stage``) and the job (``failed``, with the error,
server paths redacted). A task for a job that is already terminal, or whose next stage another
live worker holds, does nothing: duplicates of a message (a redelivery, a re-enqueue by the
reaper) are harmless, and a stage runs to completion once.

``reap_expired_leases()`` (queue ``cpu``, from beat, or called directly) finds running stages
whose lease expired (their worker died) and re-enqueues ``advance_job`` for their jobs; the new
task takes the stage over (``attempts`` + 1).

Job specs: each task rebuilds the ``JobSpec`` from the stored spec with
``cotune.service.load_record_spec``. A job without a tenant (created by the CLI/embedded path,
``submit_job``) holds absolute local paths (``local_spec``): every worker must be able to read
them. A tenant's job (over HTTP) names file ids: the worker materialises them from the artifact
store into ``<settings.work_dir()>/<job_id>/`` (kept between tasks, checked by SHA-256), so the
artifact store must be shared by the API and every worker (a shared volume or ``s3://``).

``CeleryDispatcher`` is the ``cotune.service.Dispatcher`` the API uses with a broker:
``dispatch(job_id)`` sends ``validate_job`` (``validating_files`` -> ``queued``, then
``advance_job``).
"""

from __future__ import annotations

import base64
import functools
import json
import os
import shutil
import socket
import time
from typing import TYPE_CHECKING, Any

from celery import Celery, Task
from celery.utils.log import get_task_logger

from workers.app import (
    ADVANCE_JOB,
    CPU_QUEUE,
    FINALIZE_JOB,
    GPU_QUEUE,
    REAP_EXPIRED_LEASES,
    VALIDATE_JOB,
    WorkerConfig,
    app,
    app_config,
)

if TYPE_CHECKING:
    from cotune.jobspec import JobSpec
    from cotune.loop import JobContext
    from cotune.settings import Settings
    from cotune.store import ArtifactStore, JobRecord, JobStore
    from cotune.store.accounts import AccountStore

log = get_task_logger(__name__)


# --------------------------------------------------------------------------- per-process state


def config() -> WorkerConfig:
    return app_config(app)


def settings() -> Settings:
    from cotune.settings import get_settings

    return get_settings()


@functools.cache
def _stores(database_url: str, artifacts_root: str) -> tuple[JobStore, ArtifactStore]:
    from cotune.store import ArtifactStore, JobStore

    return JobStore(database_url), ArtifactStore(artifacts_root)


def stores() -> tuple[JobStore, ArtifactStore]:
    """This process's job store and artifact store (one connection pool per process)."""
    cfg = config()
    return _stores(cfg.database_url, cfg.artifacts)


@functools.cache
def _accounts(database_url: str) -> AccountStore:
    from cotune.store.accounts import AccountStore

    return AccountStore(stores()[0])


def _owner(task: Task) -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{task.request.id or 'direct'}"


# --------------------------------------------------------------------------- job specs


def local_spec(job: JobSpec) -> dict[str, Any]:
    """``job`` as a stored spec whose paths are absolute: data splits, ``bm25`` corpora and
    models given by ``path`` (a worker has no base folder to resolve them against).

    Only the fields the job set are kept (``exclude_unset``): a full dump does not parse back
    (a tool component's llm-only defaults such as ``max_tokens`` are rejected once set)."""
    spec = job.model_dump(mode="json", exclude_unset=True, by_alias=True)
    for split in ("train", "val", "test"):
        path = job.data_path(split)
        if path is not None:
            spec["data"][split] = str(path.resolve())
    system = job.system
    for alias, ref in system.models.items():
        if ref.path is not None:
            spec["system"]["models"][alias]["path"] = str(system.resolve_path(ref.path).resolve())
    for raw, component in zip(spec["system"]["components"], system.components, strict=True):
        corpus = component.args.get("corpus") if component.kind == "tool" else None
        if isinstance(corpus, str):
            raw["args"]["corpus"] = str(system.resolve_path(corpus).resolve())
    return spec


def load_job_spec(record: JobRecord) -> JobSpec:
    """The stored job's runnable spec (module doc: local paths, or an HTTP job's files
    materialised into this worker's work folder)."""
    from cotune.service import load_record_spec

    _, artifacts = stores()
    accounts = _accounts(config().database_url) if record.tenant_id is not None else None
    return load_record_spec(record, accounts, artifacts, settings())


def _drop_workdir(job_id: str) -> None:
    """Remove this machine's copy of a finished job's files (other machines keep theirs
    until their own cleanup; they are only caches of the artifact store)."""
    shutil.rmtree(settings().work_dir() / job_id, ignore_errors=True)


def submit_job(job: JobSpec, *, name: str | None = None) -> str:
    """Store a locally loaded ``job`` (absolute paths, no tenant) as ``queued`` and enqueue
    its first task; returns its id (the CLI's path to a Celery deployment)."""
    store, _ = stores()
    job_id = store.create_job(name or job.system.name, local_spec(job))
    enqueue_advance(job_id)
    return job_id


def enqueue_advance(job_id: str, celery: Celery | None = None) -> None:
    (celery or app).send_task(ADVANCE_JOB, args=[job_id], queue=GPU_QUEUE)


def enqueue_finalize(job_id: str) -> None:
    app.send_task(FINALIZE_JOB, args=[job_id], queue=CPU_QUEUE)


def _context(job_id: str, job: JobSpec, owner: str, stage_limit: int) -> JobContext:
    from cotune.loop import JobContext

    store, artifacts = stores()
    return JobContext(
        job_id=job_id,
        job=job,
        store=store,
        artifacts=artifacts,
        owner=owner,
        lease_seconds=config().lease_seconds,
        stage_limit=stage_limit,
    )


# --------------------------------------------------------------------------- status helpers


def _event(store: JobStore, job_id: str, message: str, level: str = "info", **data: Any) -> None:
    from cotune.errors import CotuneError
    from cotune.records import Event

    try:
        store.add_event(
            job_id, Event(level=level, message=message, data=data, created_at=time.time())
        )
    except CotuneError as err:  # the job was deleted meanwhile
        log.info("job %s: event not stored: %s", job_id, err)


def _try_transition(store: JobStore, job_id: str, to: str, error: str | None = None) -> bool:
    """Move the job to ``to``; False (and no error) if someone else already moved it."""
    from cotune.store import IllegalTransition, JobNotFound, JobStatus

    try:
        store.transition(job_id, JobStatus(to), error=error)
    except (IllegalTransition, JobNotFound) as err:
        log.info("job %s: not moved to %s (%s)", job_id, to, err)
        return False
    return True


def _cancel(store: JobStore, job_id: str) -> None:
    if _try_transition(store, job_id, "cancelled"):
        _event(store, job_id, "cancelled between stages", "warning")
    _drop_workdir(job_id)


def _public(err: BaseException) -> str:
    """The error as the API may show it: server folders replaced by ``<server>``."""
    from cotune.service import redact, server_roots

    text = f"{type(err).__name__}: {err}"
    return redact(text, server_roots(settings(), stores()[1])) or text


def _fail(store: JobStore, job_id: str, owner: str, err: BaseException) -> None:
    """Fail the stage this owner was running (if any) and the job, with the error."""
    from cotune.store import StageStatus

    message = _public(err)
    for state in store.stage_states(job_id):
        if state.status == StageStatus.running and state.lease_owner == owner:
            store.fail_stage(job_id, state.epoch, state.stage, owner, message)
    if _try_transition(store, job_id, "failed", error=message):
        _event(store, job_id, f"failed: {message}", "error")
    _drop_workdir(job_id)


def _held_elsewhere(store: JobStore, job_id: str, owner: str) -> bool:
    """Whether a stage of the job runs under another owner's live lease."""
    from datetime import UTC, datetime

    from cotune.store import StageStatus

    now = datetime.now(UTC)
    return any(
        s.status == StageStatus.running
        and s.lease_owner != owner
        and s.lease_expires_at is not None
        and s.lease_expires_at > now
        for s in store.stage_states(job_id)
    )


def _ready(store: JobStore, job_id: str, what: str) -> JobRecord | None:
    """The job if a task should work on it now (running, after moving it from queued);
    None if it is missing, terminal, not yet validated, or cancelled here."""
    from cotune.store import JobStatus
    from cotune.store.status import TERMINAL

    record = store.get_job(job_id)
    if record is None:
        log.warning("%s %s: no such job", what, job_id)
        return None
    if record.status in TERMINAL:
        log.info("%s %s: already %s", what, job_id, record.status.value)
        return None
    if record.status == JobStatus.validating_files:
        log.warning("%s %s: its files are not validated yet (validate_job queues it)", what, job_id)
        return None
    if record.cancel_requested:
        _cancel(store, job_id)
        return None
    if record.status == JobStatus.queued and _try_transition(store, job_id, "running"):
        _event(store, job_id, "running")
    record = store.get_job(job_id)
    if record is None or record.status != JobStatus.running:
        return None
    return record


# --------------------------------------------------------------------------- tasks


@app.task(name=VALIDATE_JOB, bind=True)
def validate_job(self: Task, job_id: str) -> str:
    """``validating_files`` -> ``queued``: the job's files materialise (present, SHA-256 as
    uploaded), then its first ``advance_job`` is sent. Models are checked where they run
    (the gpu worker's first stage fails the job, naming the model, if one is missing)."""
    from cotune.store import JobStatus

    store, _ = stores()
    record = store.get_job(job_id)
    if record is None or record.status != JobStatus.validating_files:
        return "skipped"
    try:
        load_job_spec(record)
    except Exception as err:
        _fail(store, job_id, _owner(self), err)
        return "failed"
    if not _try_transition(store, job_id, "queued"):
        return "skipped"  # cancelled meanwhile, or a duplicate message won
    _event(store, job_id, "files validated; queued")
    enqueue_advance(job_id)
    return "queued"


@app.task(name=ADVANCE_JOB, bind=True)
def advance_job(self: Task, job_id: str) -> str:
    """Run the job's next stage (one), then enqueue the next task or the finalizer."""
    from cotune.loop import JobCancelled, StagePause, run_job

    store, _ = stores()
    record = _ready(store, job_id, "advance_job")
    if record is None:
        return "skipped"
    owner = _owner(self)
    try:
        job = load_job_spec(record)
    except Exception as err:
        _fail(store, job_id, owner, err)
        raise
    try:
        run_job(_context(job_id, job, owner, stage_limit=1))
    except StagePause as pause:
        if store.cancel_requested(job_id):
            _cancel(store, job_id)
            return "cancelled"
        log.info("job %s: next is epoch %d %s", job_id, pause.epoch, pause.stage.value)
        enqueue_advance(job_id)
        return "paused"
    except JobCancelled:
        _cancel(store, job_id)
        return "cancelled"
    except Exception as err:
        if isinstance(err, RuntimeError) and _held_elsewhere(store, job_id, owner):
            # A duplicate message: the holder's own task chain carries the job on.
            log.info("job %s: next stage held by another worker; nothing to do", job_id)
            return "held"
        _fail(store, job_id, owner, err)
        raise
    enqueue_finalize(job_id)
    return "finished"


@app.task(name=FINALIZE_JOB, bind=True)
def finalize_job(self: Task, job_id: str) -> str:
    """Write report, metrics and the best adapters under ``<job_id>/result/``; succeed."""
    from cotune.loop import StagePause, run_job
    from cotune.service import export_job_result

    store, _ = stores()
    record = _ready(store, job_id, "finalize_job")
    if record is None:
        return "skipped"
    owner = _owner(self)
    try:
        # stage_limit=0: every stage must be done already; the report is rebuilt from them
        # (no engine, no data: only stored outputs are read).
        ctx = _context(job_id, load_job_spec(record), owner, stage_limit=0)
        try:
            report = run_job(ctx)
        except StagePause:
            enqueue_advance(job_id)  # not finished after all: carry on
            return "not finished"
        export_job_result(ctx, report)
        store.set_result(job_id, report.model_dump(mode="json"))
    except Exception as err:
        _fail(store, job_id, owner, err)
        raise
    if _try_transition(store, job_id, "succeeded"):
        _event(store, job_id, "succeeded")
    _drop_workdir(job_id)
    return "succeeded"


@app.task(name=REAP_EXPIRED_LEASES)
def reap_expired_leases() -> list[str]:
    """Re-enqueue ``advance_job`` for every job with a running stage whose lease expired, and
    for every running job stalled between stages for ``stall_seconds`` (the worker that
    finished its last stage died before queueing the next: without this, the job would wait
    for the broker to redeliver that task, ``visibility_timeout`` later).

    Each expired lease is re-enqueued once (a Redis ``SET NX`` keyed by the stage and its
    lease's expiry, when the broker is Redis), so reaper runs that pile up while the queue is
    busy do not start parallel task chains for one job. Returns the re-enqueued job ids.
    """
    from cotune.store import StageStatus
    from cotune.store.status import TERMINAL

    store, _ = stores()
    requeued: list[str] = []
    for key in store.expired_stages():
        if key.job_id in requeued:
            continue
        record = store.get_job(key.job_id)
        if record is None or record.status in TERMINAL:
            continue
        state = store.stage(key.job_id, key.epoch, key.stage)
        if state is None or state.status != StageStatus.running or not state.lease_expires_at:
            continue
        token = (
            f"cotune:reaped:{key.job_id}:{key.epoch}:{key.stage.value}:"
            f"{state.lease_expires_at.timestamp():.6f}"
        )
        if not _first_time(token):
            continue
        enqueue_advance(key.job_id)
        requeued.append(key.job_id)
        _event(
            store,
            key.job_id,
            f"epoch {key.epoch} {key.stage.value}: its worker's lease expired; re-queued",
            "warning",
            epoch=key.epoch,
            stage=key.stage.value,
            attempts=state.attempts,
        )
        log.warning("job %s: epoch %d %s re-queued", key.job_id, key.epoch, key.stage.value)
    idle = config().stall_seconds
    # Only with a Redis broker, whose queues can be read: a job waiting behind other jobs'
    # stages is then told apart from one whose message is gone.
    for job_id, last in store.stalled_jobs(idle):
        if job_id in requeued or _message_pending(job_id) is not False:
            continue  # its message waits in a queue or a worker holds it (or we cannot tell)
        time.sleep(0.5)  # a worker may have been between taking it and recording it unacked
        if _message_pending(job_id) is not False:
            continue
        if not _first_time(f"cotune:stalled:{job_id}:{last.timestamp():.6f}"):
            continue
        enqueue_advance(job_id)
        requeued.append(job_id)
        _event(
            store,
            job_id,
            f"no progress for {idle:.0f} s between stages (its next task was lost); queued again",
            "warning",
        )
        log.warning("job %s: stalled between stages; re-queued", job_id)
    return requeued


def _message_pending(job_id: str) -> bool | None:
    """Whether a message for ``job_id`` waits in the gpu or cpu queue or is held (unacked) by a
    worker; None when the broker is not Redis and its queues cannot be read. A job whose stage
    is queued behind other jobs' work is not stalled, only waiting."""
    cfg = config()
    client = _redis(cfg.broker_url)
    if client is None:
        return None
    needle = job_id.encode()
    queued = [client.lrange(cfg.broker_key_prefix + q, 0, -1) for q in (GPU_QUEUE, CPU_QUEUE)]
    held = client.hvals(cfg.broker_key_prefix + "unacked")
    return any(_mentions(raw, needle) for raws in [*queued, held] for raw in raws)


def _mentions(raw: bytes, needle: bytes) -> bool:
    """A kombu message (or an unacked ``[message, exchange, routing key]``) naming ``needle``
    in its headers' ``argsrepr`` or in its base64 body's arguments."""
    if needle in raw:
        return True
    try:
        message = json.loads(raw)
        if isinstance(message, list):
            message = message[0]
        return needle in base64.b64decode(message.get("body", ""))
    except (ValueError, TypeError, AttributeError):
        return False


def _first_time(token: str) -> bool:
    """True the first time ``token`` is seen (within ``visibility_timeout``), via Redis;
    always True with another broker (duplicates are then harmless, only wasteful)."""
    cfg = config()
    client = _redis(cfg.broker_url)
    if client is None:
        return True
    ttl = max(int(cfg.visibility_timeout), 60)
    return bool(client.set(cfg.broker_key_prefix + token, "1", nx=True, ex=ttl))


@functools.cache
def _redis(url: str) -> Any:
    if not url.startswith(("redis://", "rediss://", "unix://")):
        return None
    import redis

    return redis.Redis.from_url(url)


# --------------------------------------------------------------------------- the API's side


class CeleryDispatcher:
    """``cotune.service.Dispatcher`` over Celery, for ``services.api.create_app(dispatcher=)``
    when a broker is configured: ``dispatch`` sends ``validate_job`` (idempotent: a duplicate
    finds the job no longer ``validating_files``); ``queue_depth`` counts the messages waiting
    in the ``gpu`` queue (one per job that waits for its next stage), None if unknown."""

    def __init__(self, celery: Celery | None = None) -> None:
        self.app = celery or app

    def dispatch(self, job_id: str) -> None:
        self.app.send_task(VALIDATE_JOB, args=[job_id], queue=CPU_QUEUE)

    def queue_depth(self) -> int | None:
        cfg = app_config(self.app)
        client = _redis(cfg.broker_url)
        if client is None:
            return None
        try:
            return int(client.llen(cfg.broker_key_prefix + GPU_QUEUE))
        except Exception:  # the broker is down: the metric says unknown
            return None

    def shutdown(self, wait: bool = False) -> None:
        return None
