"""Thin Celery tasks over the one job lifecycle (``cotune.jobs.lifecycle``): ids in,
everything else from the stores; each task calls one lifecycle step and enqueues what its
``Step`` says comes next.

``validate_job(job_id)`` (queue ``cpu``) materialises an HTTP job's files and queues it.
``advance_job(job_id)`` (queue ``gpu``) runs exactly one new stage of a job and enqueues
itself again (``Lifecycle.advance`` with ``stage_limit=1``: every finished stage is loaded from
the store, the next one runs under a lease renewed by heartbeats). When every stage is done,
``finalize_job(job_id)`` (queue ``cpu``) writes the report, metrics and the best adapters under
``<job_id>/result/`` in the artifact store (``cotune.jobs.results.export_job_result``, the
layout the embedded server writes), stores the report as the job's result and moves the job to
``succeeded``.

Between two stages a task checks ``cancel_requested`` and moves the job to ``cancelled``. A
stage that raises fails its attempt (``fail_stage``) and the job (``failed``, with the error,
server paths redacted). A task for a job that is already terminal, or whose next stage another
live worker holds, does nothing: duplicates of a message (a redelivery, a re-enqueue by the
reaper) are harmless, and a stage runs to completion once.

``reap_expired_leases()`` (queue ``cpu``, from beat, or called directly) re-sends the work of
dead workers: ``workers/reaper.py``.

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

import functools
import os
import socket
from typing import TYPE_CHECKING

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


# --------------------------------------------------------------------------- sending tasks


def enqueue_validate(job_id: str) -> None:
    app.send_task(VALIDATE_JOB, args=[job_id], queue=CPU_QUEUE)


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
    """Re-send the lost work of dead workers (``workers/reaper.py``); the re-sent job ids."""
    from workers.reaper import Reaper

    return Reaper(lifecycle(), settings(), enqueue_advance, enqueue_validate).reap()
