"""Prometheus metrics on ``/metrics``, in a registry of the app's own.

- ``cotune_jobs{status}``: jobs by status, read from the job store at each scrape (every
  process that writes the store counts, Celery workers included);
- ``cotune_running_stages{stage}``: stages running now (from the store);
- ``cotune_queue_depth``: jobs waiting to run, from the dispatcher (or the store's ``queued``
  count when the dispatcher cannot tell);
- ``cotune_stage_seconds{stage}``: a histogram of finished stages' durations, observed where
  the stages run (this process's ``ThreadDispatcher``; a worker process calls
  ``observe_stage`` on its own registry);
- ``cotune_http_requests_total{method,route,status}`` and ``cotune_http_request_seconds``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from cotune.store import JobStatus
from cotune.store.models import Job, StageRow

if TYPE_CHECKING:
    from cotune.records import StageRecord
    from cotune.store import JobStore

log = logging.getLogger("cotune.api")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
STAGE_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, float("inf"))


class _StoreCollector(Collector):
    def __init__(self, store: JobStore, queue_depth: Callable[[], int | None]) -> None:
        self.store, self.queue_depth = store, queue_depth

    def collect(self) -> Iterator[Any]:
        jobs = GaugeMetricFamily("cotune_jobs", "Jobs by status", labels=["status"])
        stages = GaugeMetricFamily("cotune_running_stages", "Stages running now", labels=["stage"])
        counts: dict[str, int] = {s.value: 0 for s in JobStatus}
        running: dict[str, int] = {}
        try:
            with self.store.engine.connect() as conn:
                for status, n in conn.execute(
                    select(Job.status, func.count()).group_by(Job.status)
                ):
                    counts[str(status)] = int(n)
                for stage, n in conn.execute(
                    select(StageRow.stage, func.count())
                    .where(StageRow.status == "running")
                    .group_by(StageRow.stage)
                ):
                    running[str(stage)] = int(n)
        except Exception as err:  # the scrape still answers; /readyz reports the database
            log.warning("metrics: the job store is unreachable: %s", type(err).__name__)
            return
        for status, n in sorted(counts.items()):
            jobs.add_metric([status], n)
        for stage, n in sorted(running.items()):
            stages.add_metric([stage], n)
        yield jobs
        yield stages
        depth = self.queue_depth()
        if depth is None:
            depth = counts.get(JobStatus.queued.value, 0)
        queue = GaugeMetricFamily("cotune_queue_depth", "Jobs waiting to run")
        queue.add_metric([], depth)
        yield queue


class ApiMetrics:
    def __init__(self, store: JobStore, queue_depth: Callable[[], int | None]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "cotune_http_requests_total",
            "HTTP requests",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "cotune_http_request_seconds",
            "HTTP request latency",
            ["method", "route"],
            registry=self.registry,
        )
        self.stage_seconds = Histogram(
            "cotune_stage_seconds",
            "Seconds per finished stage",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_StoreCollector(store, queue_depth))

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(method, route).observe(seconds)

    def observe_stage(self, record: StageRecord) -> None:
        self.stage_seconds.labels(record.stage.value).observe(record.seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
