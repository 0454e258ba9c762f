"""Handing a job to the Celery workers by task name: the API imports nothing from
``workers/`` (they may not even be installed beside it)."""

from __future__ import annotations

import threading
import time

from cotune.jobs.presence import consumers, redis_client
from cotune.jobs.queues import (
    CPU_QUEUE,
    GPU_QUEUE,
    QUEUES,
    VALIDATE_JOB,
    broker_url,
    message_conf,
)
from cotune.settings import Settings

# How long a count of the queues' consumers is trusted: /readyz is probed every few seconds.
CONSUMERS_TTL = 10.0


class CeleryDispatcher:
    """``cotune.jobs.threads.Dispatcher`` over a broker: ``dispatch`` sends ``validate_job``
    (idempotent: a duplicate finds the job no longer ``validating_files``); ``queue_depth``
    counts the messages waiting in the ``gpu`` queue (one per job waiting for its next stage),
    None if unknown."""

    def __init__(self, settings: Settings) -> None:
        from celery import Celery

        self.settings = settings
        self.app = Celery("cotune-api")
        self.app.conf.update(**message_conf(settings), task_ignore_result=True)
        self._lock = threading.Lock()
        self._consumers: dict[str, int] | None = None
        self._asked = 0.0

    def dispatch(self, job_id: str) -> None:
        self.app.send_task(VALIDATE_JOB, args=[job_id], queue=CPU_QUEUE)

    def queue_depth(self) -> int | None:
        client = redis_client(broker_url(self.settings))
        if client is None:
            return None
        try:
            return int(client.llen(self.settings.broker_key_prefix + GPU_QUEUE))
        except Exception:  # the broker is down: the metric says unknown
            return None

    def consumers(self) -> dict[str, int] | None:
        """How many workers consume each queue (their presence keys, or a broadcast answered
        within a second; the answer is kept for ``CONSUMERS_TTL`` seconds, so probes do not
        flood the broker). None when the broker cannot be asked."""
        with self._lock:
            if self._consumers is not None and time.monotonic() - self._asked < CONSUMERS_TTL:
                return self._consumers
        try:
            counts = self._count_consumers()
        except Exception:  # the broker is down: readyz says so under "broker"
            return None
        with self._lock:
            self._consumers, self._asked = counts, time.monotonic()
        return counts

    def _count_consumers(self) -> dict[str, int]:
        """From the workers' presence keys on a Redis broker (a busy solo-pool worker answers
        no broadcast: ``cotune.jobs.presence``); else from an ``inspect`` broadcast."""
        client = redis_client(broker_url(self.settings))
        if client is not None:
            return consumers(client, self.settings.broker_key_prefix)
        replies = self.app.control.inspect(timeout=1.0).active_queues() or {}
        counts = dict.fromkeys(QUEUES, 0)
        for queues in replies.values():
            for queue in queues or []:
                if queue.get("name") in counts:
                    counts[queue["name"]] += 1
        return counts

    def shutdown(self, wait: bool = False) -> None:
        self.app.close()
