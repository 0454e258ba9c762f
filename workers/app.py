"""The Celery app: Redis broker, two queues, late acks, JSON only.

- ``gpu``: ``cotune.advance_job``, one stage of one job per task (engines and training).
  Consume it with the ``solo`` pool (or ``threads`` with concurrency 1): vLLM runs in-process
  (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) and prefork children are daemonic, so they may not
  start the processes vLLM and torch want. The engines are cached per process
  (``cotune.engines.get_engine``), so a long-lived worker loads a base model once for all
  stages, epochs and jobs.
- ``cpu``: ``cotune.validate_job`` (an HTTP job's files: ``validating_files`` -> ``queued``),
  ``cotune.finalize_job`` (report, metrics, adapters export) and
  ``cotune.reap_expired_leases`` (from beat, every ``reaper_interval`` seconds). Any pool.

Delivery: ``task_acks_late`` + ``task_reject_on_worker_lost`` + prefetch 1, so a worker holds
at most the message it runs, and a message is acknowledged only once its task returned. A
worker killed mid-stage (OOM, SIGKILL, a lost node) leaves its stage ``running`` in the job
store with a lease that stops being renewed; ``reap_expired_leases`` re-enqueues the job once
the lease expires, and the next task takes the stage over. (Redis would also redeliver the
unacknowledged message itself, but only after ``visibility_timeout``; the duplicate then finds
its stage done or held and does nothing.)

Shutdown: SIGTERM is Celery's warm shutdown: the worker stops taking messages, lets the task it
runs finish (the current stage, which then enqueues the job's next task for another worker)
and exits. Give it a grace period longer than the longest stage (Kubernetes
``terminationGracePeriodSeconds``); a second SIGTERM, SIGQUIT or SIGKILL stops it at once and
the lease + reaper path above takes over.

Settings come from ``cotune.settings.get_settings()`` (``COTUNE_BROKER_URL``,
``COTUNE_DATABASE_URL``, ``COTUNE_ARTIFACTS``, ``COTUNE_LEASE_SECONDS``,
``COTUNE_REAPER_INTERVAL``, ``COTUNE_VISIBILITY_TIMEOUT``, ``COTUNE_WORKDIR``) plus
``COTUNE_BROKER_KEY_PREFIX`` (a prefix for every broker key in Redis).

Start a worker with ``celery -A workers.app worker -Q gpu,cpu --pool solo`` or
``workers.main.run_worker``; beat with ``celery -A workers.app beat``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from celery import Celery
from kombu import Exchange, Queue

# vLLM inside the worker process: no engine subprocess (see DESIGN.md §7). Set before any
# import of vllm; an explicit value in the environment wins.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

GPU_QUEUE = "gpu"
CPU_QUEUE = "cpu"
QUEUES = (GPU_QUEUE, CPU_QUEUE)

ADVANCE_JOB = "cotune.advance_job"
FINALIZE_JOB = "cotune.finalize_job"
REAP_EXPIRED_LEASES = "cotune.reap_expired_leases"
VALIDATE_JOB = "cotune.validate_job"

ROUTES = {
    VALIDATE_JOB: {"queue": CPU_QUEUE},
    ADVANCE_JOB: {"queue": GPU_QUEUE},
    FINALIZE_JOB: {"queue": CPU_QUEUE},
    REAP_EXPIRED_LEASES: {"queue": CPU_QUEUE},
}


@dataclass(frozen=True)
class WorkerConfig:
    """What the workers need from the service's settings."""

    broker_url: str = "redis://127.0.0.1:6379/0"
    database_url: str = "postgresql+psycopg://postgres@127.0.0.1:5432/cotune"
    artifacts: str = "./artifacts"
    lease_seconds: float = 600.0
    # How often beat runs the reaper; a dead worker's stage restarts within
    # lease_seconds + reaper_interval (plus the time its queue is busy).
    reaper_interval: float = 30.0
    # A running job idle this long between stages lost its next message: re-queued.
    stall_seconds: float = 300.0
    # Redis redelivers an unacknowledged message after this long; longer than any stage.
    visibility_timeout: float = 6 * 3600.0
    # A prefix for every Redis key of the broker: several deployments (or test runs) can
    # share one Redis database without taking each other's messages.
    broker_key_prefix: str = ""


def worker_config() -> WorkerConfig:
    """The workers' settings, from ``cotune.settings.get_settings()`` (``COTUNE_*`` variables)
    and ``COTUNE_BROKER_KEY_PREFIX``."""
    from cotune.settings import get_settings

    settings = get_settings()
    base = WorkerConfig()
    return WorkerConfig(
        broker_url=settings.broker_url or base.broker_url,
        database_url=settings.database_url,
        artifacts=settings.artifacts,
        lease_seconds=settings.lease_seconds,
        reaper_interval=settings.reaper_interval,
        stall_seconds=settings.stall_seconds,
        visibility_timeout=settings.visibility_timeout,
        broker_key_prefix=os.environ.get("COTUNE_BROKER_KEY_PREFIX", ""),
    )


def create_app(config: WorkerConfig | None = None) -> Celery:
    """A Celery app for ``config`` (the environment's settings by default)."""
    config = config or worker_config()
    transport: dict[str, Any] = {"visibility_timeout": config.visibility_timeout}
    if config.broker_key_prefix:
        transport["global_keyprefix"] = config.broker_key_prefix
    app = Celery("cotune", include=["workers.tasks"])
    app.conf.update(
        broker_url=config.broker_url,
        broker_connection_retry_on_startup=True,
        broker_transport_options=transport,
        # JSON only: a message never unpickles anything.
        task_serializer="json",
        result_serializer="json",
        event_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        # Tasks report through the job store, not a result backend.
        task_ignore_result=True,
        # Delivery: see the module docstring.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # A broker blip must not abort a stage that may have run for an hour: the stage goes
        # on, its message is redelivered later and then finds the stage done.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        # Each queue with its own direct exchange and key (a bare Queue(name) would be bound
        # to the default queue's exchange and key).
        task_queues=tuple(Queue(q, Exchange(q, type="direct"), routing_key=q) for q in QUEUES),
        task_default_queue=CPU_QUEUE,
        task_create_missing_queues=False,
        task_routes=ROUTES,
        beat_schedule={
            "reap-expired-leases": {
                "task": REAP_EXPIRED_LEASES,
                "schedule": config.reaper_interval,
                # A reaper message still queued after one interval is stale: drop it.
                "options": {"queue": CPU_QUEUE, "expires": config.reaper_interval},
            }
        },
    )
    app.conf["cotune"] = config
    return app


def app_config(app: Celery) -> WorkerConfig:
    config = app.conf.get("cotune")
    return config if isinstance(config, WorkerConfig) else worker_config()


app = create_app()
