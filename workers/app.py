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

Settings come from ``cotune.settings.Settings``, the one settings class of the API and the
workers (``COTUNE_BROKER_URL``, ``COTUNE_BROKER_KEY_PREFIX``, ``COTUNE_DATABASE_URL``,
``COTUNE_ARTIFACTS``, ``COTUNE_LEASE_SECONDS``, ``COTUNE_REAPER_INTERVAL``,
``COTUNE_STALL_SECONDS``, ``COTUNE_VISIBILITY_TIMEOUT``, ``COTUNE_WORKDIR``). Queue and task
names are ``cotune.jobs.queues``: the API sends tasks by name, without importing this package.

Start a worker with ``celery -A workers.app worker -Q gpu,cpu --pool solo`` or
``workers.main.run_worker``; beat with ``celery -A workers.app beat``.
"""

from __future__ import annotations

import os

from celery import Celery
from kombu import Exchange, Queue

from cotune.jobs.queues import (
    CPU_QUEUE,
    QUEUES,
    REAP_EXPIRED_LEASES,
    message_conf,
)
from cotune.settings import Settings

# vLLM inside the worker process: no engine subprocess (see DESIGN.md §7). Set before any
# import of vllm; an explicit value in the environment wins.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def create_app(settings: Settings | None = None) -> Celery:
    """A Celery app for ``settings`` (the environment's, ``cotune.settings.get_settings()``,
    by default): the workers' one source of configuration."""
    from cotune.settings import get_settings

    settings = settings or get_settings()
    app = Celery("cotune", include=["workers.tasks", "workers.presence"])
    app.conf.update(
        **message_conf(settings),
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
        beat_schedule={
            "reap-expired-leases": {
                "task": REAP_EXPIRED_LEASES,
                "schedule": settings.reaper_interval,
                # A reaper message still queued after one interval is stale: drop it.
                "options": {"queue": CPU_QUEUE, "expires": settings.reaper_interval},
            }
        },
    )
    app.conf["cotune"] = settings
    return app


def app_settings(app: Celery) -> Settings:
    """The settings ``app`` was built from."""
    from cotune.settings import get_settings

    settings = app.conf.get("cotune")
    return settings if isinstance(settings, Settings) else get_settings()


app = create_app()
