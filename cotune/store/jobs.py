"""The job store: ``JobStore``, and its jobs (their status, spec, result and cancellation).

``JobStore`` is composed of parts over one base (``cotune.store.base``: the engine, sessions,
pydantic records out, never ORM objects): the jobs here, their stages and leases
(``cotune.store.stages``), and their events, epochs, candidates and artifacts
(``cotune.store.history``). Each part says how its writes race.

Concurrency of the jobs' writes comes from single atomic statements, not isolation levels:

- ``transition`` is a compare-and-set (``UPDATE jobs ... WHERE id = :id AND status = :seen``);
  of two racing callers exactly one wins, the other sees the new status and gets
  ``IllegalTransition`` when the table does not allow the move from it.
- ``request_cancel`` flags any job not yet terminal, then cancels it at once only if it is
  still one that no worker holds (``validating_files``, ``queued``), in one transaction.

``tenant_id=None`` on a read means "no scoping" (workers, the embedded mode, admin tools); the
API always passes the caller's tenant. Tenant ids are non-empty strings.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict
from sqlalchemy import and_, delete, func, or_, select, update
from sqlalchemy.exc import IntegrityError

from cotune.records import Event
from cotune.store.base import make_engine, rowcount
from cotune.store.history import ArtifactRecord, HistoryMixin, StoredEvent, event_row
from cotune.store.models import (
    ArtifactRow,
    CandidateRow,
    EpochRow,
    EventRow,
    Job,
    StageRow,
    matchable,
    utcnow,
)
from cotune.store.stages import StageKey, StageMixin, StageState
from cotune.store.status import (
    TERMINAL,
    TRANSITIONS,
    IllegalTransition,
    JobNotFound,
    JobStatus,
)

# Importable from here too, as before the store was split in parts.
__all__ = [
    "ArtifactRecord",
    "JobPage",
    "JobRecord",
    "JobStore",
    "StageKey",
    "StageState",
    "StoredEvent",
    "make_engine",
    "new_job_id",
]

_CHILD_TABLES = (StageRow, EventRow, EpochRow, CandidateRow, ArtifactRow)


class JobRecord(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    tenant_id: str | None
    name: str
    status: JobStatus
    spec: dict[str, Any]
    result: dict[str, Any] | None = None
    error: str | None = None
    idempotency_key: str | None = None
    created_at: datetime
    updated_at: datetime
    cancel_requested: bool = False


@dataclass(frozen=True)
class JobPage:
    """One page of ``list_jobs``: newest first; pass the last id as ``after`` for the next."""

    data: list[JobRecord]
    has_more: bool


def new_job_id() -> str:
    """``job-`` + 24 hex digits: milliseconds since the epoch, then 48 random bits."""
    return f"job-{int(time.time() * 1000):012x}{secrets.token_hex(6)}"


class JobStore(StageMixin, HistoryMixin):
    """Jobs and everything a job records, over SQLite or PostgreSQL.

    ``auto_migrate=True`` brings the schema to the latest revision first (the embedded mode);
    the service runs ``cotune.store.migrate`` (or ``alembic upgrade head``) at deploy time.
    """

    def create_job(
        self,
        name: str,
        spec: dict[str, Any],
        *,
        tenant_id: str | None = None,
        status: JobStatus = JobStatus.queued,
        idempotency_key: str | None = None,
    ) -> str:
        """A new job's id; with an ``idempotency_key`` already used by this tenant, that job's."""
        if idempotency_key is not None:
            existing = self._job_for_key(tenant_id, idempotency_key)
            if existing is not None:
                return existing
        job_id = new_job_id()
        now = utcnow()
        try:
            with self._tx() as s:
                s.add(
                    Job(
                        id=job_id,
                        tenant_id=tenant_id,
                        name=name,
                        status=JobStatus(status).value,
                        spec=spec,
                        idempotency_key=idempotency_key,
                        created_at=now,
                        updated_at=now,
                        cancel_requested=False,
                    )
                )
        except IntegrityError:
            # A concurrent request with the same key won the insert.
            existing = self._job_for_key(tenant_id, idempotency_key) if idempotency_key else None
            if existing is None:
                raise
            return existing
        return job_id

    def _job_for_key(self, tenant_id: str | None, key: str) -> str | None:
        with self._sessions() as s:
            return s.scalar(
                select(Job.id).where(
                    func.coalesce(Job.tenant_id, "") == (tenant_id or ""),
                    Job.idempotency_key == key,
                )
            )

    def get_job(self, job_id: str, tenant_id: str | None = None) -> JobRecord | None:
        """The job, or None if there is none (or it belongs to another tenant)."""
        if not matchable(job_id):
            return None
        with self._sessions() as s:
            q = select(Job).where(Job.id == job_id)
            if tenant_id is not None:
                q = q.where(Job.tenant_id == tenant_id)
            job = s.scalar(q)
            return None if job is None else JobRecord.model_validate(job)

    def list_jobs(
        self, tenant_id: str | None = None, after: str | None = None, limit: int = 20
    ) -> JobPage:
        """Newest first (by ``created_at``, then id). ``after``: the last id of the previous
        page; an id this tenant cannot see raises ``JobNotFound``."""
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        with self._sessions() as s:
            q = select(Job)
            if tenant_id is not None:
                q = q.where(Job.tenant_id == tenant_id)
            if after is not None:
                if not matchable(after):
                    raise JobNotFound(after)
                cq = select(Job.created_at).where(Job.id == after)
                if tenant_id is not None:
                    cq = cq.where(Job.tenant_id == tenant_id)
                created = s.scalar(cq)
                if created is None:
                    raise JobNotFound(after)
                q = q.where(
                    or_(
                        Job.created_at < created,
                        and_(Job.created_at == created, Job.id < after),
                    )
                )
            q = q.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)
            rows = list(s.scalars(q))
        return JobPage(
            data=[JobRecord.model_validate(j) for j in rows[:limit]],
            has_more=len(rows) > limit,
        )

    def count_jobs(
        self, tenant_id: str | None = None, statuses: Sequence[JobStatus] | None = None
    ) -> int:
        """How many jobs (of a tenant, in some statuses): for per-tenant limits."""
        q = select(func.count()).select_from(Job)
        if tenant_id is not None:
            q = q.where(Job.tenant_id == tenant_id)
        if statuses is not None:
            q = q.where(Job.status.in_([JobStatus(x).value for x in statuses]))
        with self._sessions() as s:
            return int(s.scalar(q) or 0)

    def transition(
        self,
        job_id: str,
        to: JobStatus,
        *,
        error: str | None = None,
        only_from: JobStatus | None = None,
        event: Event | None = None,
    ) -> JobRecord:
        """Move a job to ``to`` if the table allows it from its current status (and that
        status is ``only_from``, when given), atomically, with ``event`` stored in the same
        transaction: whoever reads the new status can read the event.

        Raises ``IllegalTransition`` (from the status it found) or ``JobNotFound``.
        """
        to = JobStatus(to)
        for _ in range(16):
            with self._tx() as s:
                seen = s.scalar(select(Job.status).where(Job.id == job_id))
                if seen is None:
                    raise JobNotFound(job_id)
                current = JobStatus(seen)
                if to not in TRANSITIONS[current] or only_from not in (None, current):
                    raise IllegalTransition(current, to, job_id)
                values: dict[str, Any] = {"status": to.value, "updated_at": utcnow()}
                if error is not None:
                    values["error"] = error
                stmt = update(Job).where(Job.id == job_id, Job.status == current.value)
                if rowcount(s, stmt.values(**values)) == 1:
                    if event is not None:
                        s.add(event_row(job_id, event))
                    break
            # Someone moved the job between the read and the update: look again.
        else:  # pragma: no cover - needs 16 lost races in a row
            raise RuntimeError(f"job {job_id}: too much contention on its status")
        job = self.get_job(job_id)
        if job is None:  # pragma: no cover - deleted right after the transition
            raise JobNotFound(job_id)
        return job

    def request_cancel(self, job_id: str, *, event: Event | None = None) -> JobRecord:
        """Ask a job to stop. One that no worker holds yet (``validating_files``, ``queued``)
        is cancelled at once; a running one keeps ``cancel_requested`` set, and its worker
        moves it to ``cancelled`` at the next stage boundary. Cancelling a cancelled job is a
        no-op; a succeeded or failed one raises ``IllegalTransition``. ``event`` is stored in
        the same transaction, and only by the request that changed something."""
        now = utcnow()
        terminal = [s.value for s in TERMINAL]
        not_started = [JobStatus.validating_files.value, JobStatus.queued.value]
        live = and_(Job.id == job_id, Job.status.not_in(terminal))
        with self._tx() as s:
            first = rowcount(
                s,
                update(Job)
                .where(live, Job.cancel_requested.is_(False))
                .values(cancel_requested=True, updated_at=now),
            )
            flagged = first or s.scalar(select(Job.id).where(live)) is not None
            stopped = flagged and rowcount(
                s,
                update(Job)
                .where(Job.id == job_id, Job.status.in_(not_started))
                .values(status=JobStatus.cancelled.value, updated_at=now),
            )
            if event is not None and (first or stopped):
                s.add(event_row(job_id, event))
        job = self.get_job(job_id)
        if job is None:
            raise JobNotFound(job_id)
        if not flagged and job.status != JobStatus.cancelled:
            raise IllegalTransition(job.status, JobStatus.cancelled, job_id)
        return job

    def cancel_requested(self, job_id: str) -> bool:
        """Whether someone asked the job to stop (workers check it between stages)."""
        with self._sessions() as s:
            flag = s.scalar(select(Job.cancel_requested).where(Job.id == job_id))
        if flag is None:
            raise JobNotFound(job_id)
        return bool(flag)

    def set_result(self, job_id: str, result: dict[str, Any]) -> None:
        with self._tx() as s:
            n = rowcount(
                s, update(Job).where(Job.id == job_id).values(result=result, updated_at=utcnow())
            )
        if n == 0:
            raise JobNotFound(job_id)

    def delete_job(self, job_id: str) -> bool:
        """Delete a job and every row it owns (not its files in the artifact store)."""
        with self._tx() as s:
            for model in _CHILD_TABLES:
                s.execute(delete(model).where(model.job_id == job_id))
            return rowcount(s, delete(Job).where(Job.id == job_id)) == 1
