"""The reaper: work a dead worker took with it is sent again, so a job recovers within
``Settings.recovery_bound_seconds`` (under a minute with the defaults) instead of waiting for
the broker to redeliver its message (``visibility_timeout``, hours later).

Two cases, checked every ``reaper_interval`` seconds by beat:

- a stage whose lease expired (its worker died mid-stage): ``advance_job`` again; the new task
  takes the stage over (``attempts`` + 1);
- a job with no stage running and no progress for ``stall_seconds`` whose message is in no
  queue and held by no worker (its worker died between two steps, or the message was lost):
  ``validate_job`` again for a job still validating its files, ``advance_job`` for a queued or
  running one. A job whose message waits behind other jobs' work is only waiting, and is left
  alone; that is known only with a Redis broker, whose queues can be read (with another broker
  stalled jobs wait for the broker's own redelivery).

Each piece of lost work is re-sent once (a Redis ``SET NX`` keyed by the stage and its lease's
expiry, or by the job and its last activity), so reaper runs that pile up while the queues are
busy do not start parallel task chains for one job.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from cotune.jobs.lifecycle import Lifecycle
from cotune.jobs.presence import redis_client
from cotune.jobs.queues import CPU_QUEUE, GPU_QUEUE, broker_url
from cotune.settings import REAPER_SECOND_LOOK_SECONDS, Settings
from cotune.store import JobStatus, StageStatus
from cotune.store.status import TERMINAL

log = logging.getLogger("cotune.workers")
UNFINISHED = (JobStatus.validating_files, JobStatus.queued, JobStatus.running)

Send = Callable[[str], None]


@dataclass
class Reaper:
    lifecycle: Lifecycle
    settings: Settings
    advance: Send  # sends advance_job for a job
    validate: Send  # sends validate_job for a job
    requeued: list[str] = field(default_factory=list)

    def reap(self) -> list[str]:
        self.expired_leases()
        self.stalled_jobs()
        return self.requeued

    def expired_leases(self) -> None:
        store = self.lifecycle.store
        for key in store.expired_stages():
            record = store.get_job(key.job_id)
            if key.job_id in self.requeued or record is None or record.status in TERMINAL:
                continue
            state = store.stage(key.job_id, key.epoch, key.stage, component=key.component)
            if state is None or state.status != StageStatus.running or not state.lease_expires_at:
                continue
            where = f"epoch {key.epoch} {key.stage.value}" + (
                f" ({key.component})" if key.component else ""
            )
            token = f"reaped:{key.job_id}:{where}:{state.lease_expires_at.timestamp():.6f}"
            if not self._first_time(token):
                continue
            self.advance(key.job_id)
            self.requeued.append(key.job_id)
            self.lifecycle.event(
                key.job_id,
                f"{where}: its worker's lease expired; re-queued",
                "warning",
                epoch=key.epoch,
                stage=key.stage.value,
                attempts=state.attempts,
            )
            log.warning("job %s: %s re-queued", key.job_id, where)

    def stalled_jobs(self) -> None:
        store, idle = self.lifecycle.store, self.settings.stall_seconds
        for job_id, last in store.stalled_jobs(idle, statuses=UNFINISHED):
            if job_id in self.requeued or self._pending(job_id) is not False:
                continue  # its message waits or a worker holds it (or we cannot tell)
            # A worker may be between taking the message and recording it as unacknowledged.
            time.sleep(REAPER_SECOND_LOOK_SECONDS)
            record = store.get_job(job_id)
            if record is None or record.status in TERMINAL or self._pending(job_id) is not False:
                continue
            if not self._first_time(f"stalled:{job_id}:{last.timestamp():.6f}"):
                continue
            if record.status == JobStatus.validating_files:
                self.validate(job_id)
                what = "its file validation was lost"
            else:
                self.advance(job_id)
                what = "its next task was lost"
            self.requeued.append(job_id)
            self.lifecycle.event(
                job_id,
                f"no progress for {idle:.0f} s {_between(record.status)} ({what}); queued again",
                "warning",
            )
            log.warning("job %s: stalled while %s; re-sent", job_id, record.status.value)

    # -- the broker ------------------------------------------------------------------------

    def _pending(self, job_id: str) -> bool | None:
        """Whether a message for ``job_id`` waits in the gpu or cpu queue or is held
        (unacked) by a worker; None when the broker's queues cannot be read."""
        client = redis_client(broker_url(self.settings))
        if client is None:
            return None
        prefix, needle = self.settings.broker_key_prefix, job_id.encode()
        queued = [client.lrange(prefix + q, 0, -1) for q in (GPU_QUEUE, CPU_QUEUE)]
        held = client.hvals(prefix + "unacked")
        return any(mentions(raw, needle) for raws in [*queued, held] for raw in raws)

    def _first_time(self, token: str) -> bool:
        """True the first time ``token`` is seen (within ``visibility_timeout``), via Redis;
        always True with another broker (duplicates are then harmless, only wasteful)."""
        client = redis_client(broker_url(self.settings))
        if client is None:
            return True
        ttl = max(int(self.settings.visibility_timeout), 60)
        key = f"{self.settings.broker_key_prefix}cotune:{token}"
        return bool(client.set(key, "1", nx=True, ex=ttl))


def _between(status: JobStatus) -> str:
    return {
        JobStatus.validating_files: "while validating its files",
        JobStatus.queued: "while queued",
    }.get(status, "between stages")


def mentions(raw: bytes, needle: bytes) -> bool:
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
