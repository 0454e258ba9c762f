"""Thin Celery tasks over the one job lifecycle (``cotune.jobs.lifecycle``): ids in,
everything else from the stores; each task calls one lifecycle step and enqueues what its
``Step`` says comes next.

``advance_job(job_id)`` (queue ``gpu``) runs exactly one new stage of a job and enqueues
itself again: ``run_job`` with ``stage_limit=1`` loads every finished stage from the store, runs
the next one under a lease (``claim_stage`` + heartbeats) and raises ``StagePause`` before the
one after. When ``run_job`` returns, every stage is done and ``finalize_job(job_id)`` (queue
``cpu``) writes the report, metrics and the best adapters under ``<job_id>/result/`` in the
artifact store (``cotune.jobs.results.export_job_result``, the layout the embedded server
writes),
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
``Lifecycle.load_spec``. A job without a tenant holds absolute local paths
(``cotune.jobs.materialize.local_spec``): every worker must be able to read them. A tenant's
job (over HTTP) names file ids: the worker materialises them from the artifact store into
``<settings.work_dir()>/<job_id>/`` (kept between tasks, checked by SHA-256), so the
artifact store must be shared by the API and every worker (a shared volume or ``s3://``).

The API sends ``validate_job`` by name (``services/api/dispatch.py``); it imports nothing
from here.
"""

from __future__ import annotations

import base64
import functools
import json
import os
import socket
import time
from typing import TYPE_CHECKING, Any

from celery import Task
from celery.utils.log import get_task_logger

from cotune.jobs.lifecycle import Lifecycle, Step
from cotune.jobs.queues import (
    ADVANCE_JOB,
    CPU_QUEUE,
    FINALIZE_JOB,
    GPU_QUEUE,
    REAP_EXPIRED_LEASES,
    VALIDATE_JOB,
    broker_url,
)
from workers.app import app, app_settings

if TYPE_CHECKING:
    from cotune.settings import Settings
    from cotune.store import ArtifactStore, JobStore
    from cotune.store.accounts import AccountStore

log = get_task_logger(__name__)


# --------------------------------------------------------------------------- per-process state


def settings() -> Settings:
    """This worker's settings: the ones its Celery app was built from."""
    return app_settings(app)


@functools.cache
def _stores(database_url: str, artifacts_root: str) -> tuple[JobStore, ArtifactStore]:
    from cotune.store import ArtifactStore, JobStore

    return JobStore(database_url), ArtifactStore(artifacts_root)


def stores() -> tuple[JobStore, ArtifactStore]:
    """This process's job store and artifact store (one connection pool per process)."""
    cfg = settings()
    return _stores(cfg.database_url, cfg.artifacts)


@functools.cache
def _accounts(database_url: str) -> AccountStore:
    from cotune.store.accounts import AccountStore

    return AccountStore(stores()[0])


def _owner(task: Task) -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{task.request.id or 'direct'}"


# --------------------------------------------------------------------------- job specs


def enqueue_advance(job_id: str) -> None:
    app.send_task(ADVANCE_JOB, args=[job_id], queue=GPU_QUEUE)


def enqueue_finalize(job_id: str) -> None:
    app.send_task(FINALIZE_JOB, args=[job_id], queue=CPU_QUEUE)


# --------------------------------------------------------------------------- tasks


def lifecycle() -> Lifecycle:
    """This process's view of the one job lifecycle (``cotune.jobs.lifecycle``)."""
    from cotune.jobs.lifecycle import Lifecycle

    store, artifacts = stores()
    return Lifecycle(store, artifacts, settings(), accounts=_accounts(settings().database_url))


@app.task(name=VALIDATE_JOB, bind=True)
def validate_job(self: Task, job_id: str) -> str:
    """``validating_files`` -> ``queued``: the job's files materialise (present, SHA-256 as
    uploaded), then its first ``advance_job`` is sent. Models are checked where they run
    (the gpu worker's first stage fails the job, naming the model, if one is missing)."""
    step = lifecycle().validate(job_id, _owner(self)).step
    if step == Step.queued:
        enqueue_advance(job_id)
    return step.value


@app.task(name=ADVANCE_JOB, bind=True)
def advance_job(self: Task, job_id: str) -> str:
    """Run the job's next stage (one), then enqueue the next task or the finalizer."""
    done = lifecycle().advance(job_id, _owner(self), stage_limit=1)
    if done.step == Step.paused:
        enqueue_advance(job_id)
    elif done.step == Step.finished:
        enqueue_finalize(job_id)
    elif done.error is not None:
        raise done.error
    return done.step.value


@app.task(name=FINALIZE_JOB, bind=True)
def finalize_job(self: Task, job_id: str) -> str:
    """Write report, metrics and the best adapters under ``<job_id>/result/``; succeed."""
    done = lifecycle().finalize(job_id, _owner(self))
    if done.step == Step.paused:
        enqueue_advance(job_id)  # not finished after all: carry on
    elif done.error is not None:
        raise done.error
    return done.step.value


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
        lifecycle().event(
            key.job_id,
            f"epoch {key.epoch} {key.stage.value}: its worker's lease expired; re-queued",
            "warning",
            epoch=key.epoch,
            stage=key.stage.value,
            attempts=state.attempts,
        )
        log.warning("job %s: epoch %d %s re-queued", key.job_id, key.epoch, key.stage.value)
    idle = settings().stall_seconds
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
        lifecycle().event(
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
    cfg = settings()
    client = _redis(broker_url(cfg))
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
    cfg = settings()
    client = _redis(broker_url(cfg))
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
