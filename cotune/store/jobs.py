"""The job store: jobs, their stages (with leases), events, epochs, candidates and artifacts.

One class over a SQLAlchemy engine, the same on SQLite (the embedded mode) and PostgreSQL (the
service). It returns pydantic records, never ORM objects, so callers hold no session.

Concurrency comes from single atomic statements, not from isolation levels:

- ``transition`` is a compare-and-set (``UPDATE jobs ... WHERE id = :id AND status = :seen``);
  of two racing callers exactly one wins, the other sees the new status and gets
  ``IllegalTransition`` when the table does not allow the move from it.
- ``claim_stage`` inserts the stage row (``ON CONFLICT DO NOTHING``) or takes it over with one
  conditional ``UPDATE`` (pending, failed, its lease expired, or already ours).
- ``heartbeat``, ``finish_stage`` and ``fail_stage`` only touch a row that is running and held
  by the caller. A lease that expired is lost only once another owner claims the stage: until
  then its holder may still heartbeat or finish it, so a slow worker wastes nothing and a stage
  still runs to completion once.

Times come from this process's clock (UTC): workers on several machines need synchronised
clocks, and leases should be much longer than any expected skew.

``tenant_id=None`` on a read means "no scoping" (workers, the embedded mode, admin tools); the
API always passes the caller's tenant. Tenant ids are non-empty strings.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple, cast

from pydantic import BaseModel, ConfigDict
from sqlalchemy import (
    CursorResult,
    Engine,
    Executable,
    and_,
    create_engine,
    delete,
    event,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

from cotune.records import Candidate, EpochRecord, Event, Stage, StageRecord
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
from cotune.store.status import (
    TERMINAL,
    TRANSITIONS,
    IllegalTransition,
    JobNotFound,
    JobStatus,
    StageStatus,
)

SQLITE_BUSY_TIMEOUT_S = 30
_STAGE_ORDER = {s: i for i, s in enumerate(Stage)}
_CHILD_TABLES = (StageRow, EventRow, EpochRow, CandidateRow, ArtifactRow)


# --------------------------------------------------------------------------- records


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


class StageKey(NamedTuple):
    job_id: str
    epoch: int
    stage: Stage


class StageState(BaseModel):
    """A stage row: its status, lease and, once done, its ``StageRecord``."""

    model_config = ConfigDict(from_attributes=True)

    job_id: str
    epoch: int
    stage: Stage
    status: StageStatus
    attempts: int
    lease_owner: str | None = None
    lease_expires_at: datetime | None = None
    heartbeat_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    record: StageRecord | None = None
    output_key: str | None = None
    error: str | None = None


class StoredEvent(Event):
    """An ``Event`` as stored: with its id (the ``after_id`` cursor) and job."""

    id: int
    job_id: str


class ArtifactRecord(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    job_id: str
    epoch: int | None = None
    kind: str
    component: str | None = None
    key: str
    sha256: str | None = None
    nbytes: int | None = None
    created_at: datetime


# --------------------------------------------------------------------------- helpers


def new_job_id() -> str:
    """``job-`` + 24 hex digits: milliseconds since the epoch, then 48 random bits."""
    return f"job-{int(time.time() * 1000):012x}{secrets.token_hex(6)}"


def _rowcount(session: Session, stmt: Executable) -> int:
    result = session.execute(stmt, execution_options={"synchronize_session": False})
    return cast(CursorResult[Any], result).rowcount


def _to_datetime(ts: float | None) -> datetime:
    return utcnow() if ts is None else datetime.fromtimestamp(ts, UTC)


def make_engine(url: str) -> Engine:
    """An engine for a store URL: SQLite gets WAL, a busy timeout, foreign keys and threads.
    ``hide_parameters``: a database error's message (which is logged) names the statement, not
    the values bound to it, which are users' specs and data and may hold secrets."""
    u = make_url(url)
    backend = u.get_backend_name()
    if backend == "sqlite":
        memory = u.database in (None, "", ":memory:")
        kwargs: dict[str, Any] = {
            "connect_args": {"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_S},
        }
        if memory:
            # One shared connection, or each checkout would see its own empty database.
            # Fine for a single thread (tests); use a file for anything concurrent.
            kwargs["poolclass"] = StaticPool
        engine = create_engine(url, hide_parameters=True, **kwargs)

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            if not memory:
                cursor.execute("PRAGMA journal_mode=WAL")
                cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_S * 1000}")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    if backend == "postgresql":
        return create_engine(url, pool_pre_ping=True, hide_parameters=True)
    raise ValueError(
        f"unsupported job store URL {u.render_as_string(hide_password=True)!r}: "
        "use sqlite:///path.db or postgresql+psycopg://..."
    )


# --------------------------------------------------------------------------- the store


class JobStore:
    """Jobs and everything a job records, over SQLite or PostgreSQL.

    ``auto_migrate=True`` brings the schema to the latest revision first (the embedded mode);
    the service runs ``cotune.store.migrate`` (or ``alembic upgrade head``) at deploy time.
    """

    def __init__(self, url: str, *, auto_migrate: bool = False) -> None:
        self.url = url
        self.engine = make_engine(url)
        self.dialect = self.engine.dialect.name
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        if auto_migrate:
            from cotune.store import migrate

            migrate(url, engine=self.engine)

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> JobStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _tx(self) -> Iterator[Session]:
        with self._sessions.begin() as session:
            yield session

    def _insert(self, model: Any) -> Any:
        """A dialect insert, for ``on_conflict_do_nothing`` / ``on_conflict_do_update``."""
        return pg_insert(model) if self.dialect == "postgresql" else sqlite_insert(model)

    # ----------------------------------------------------------------------- jobs

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
    ) -> JobRecord:
        """Move a job to ``to`` if the table allows it from its current status (and that
        status is ``only_from``, when given), atomically.

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
                if _rowcount(s, stmt.values(**values)) == 1:
                    break
            # Someone moved the job between the read and the update: look again.
        else:  # pragma: no cover - needs 16 lost races in a row
            raise RuntimeError(f"job {job_id}: too much contention on its status")
        job = self.get_job(job_id)
        if job is None:  # pragma: no cover - deleted right after the transition
            raise JobNotFound(job_id)
        return job

    def request_cancel(self, job_id: str) -> JobRecord:
        """Ask a job to stop. One that no worker holds yet (``validating_files``, ``queued``)
        is cancelled at once; a running one keeps ``cancel_requested`` set, and its worker
        moves it to ``cancelled`` at the next stage boundary. Cancelling a cancelled job is a
        no-op; a succeeded or failed one raises ``IllegalTransition``."""
        now = utcnow()
        terminal = [s.value for s in TERMINAL]
        not_started = [JobStatus.validating_files.value, JobStatus.queued.value]
        with self._tx() as s:
            flagged = _rowcount(
                s,
                update(Job)
                .where(
                    Job.id == job_id,
                    Job.status.not_in(terminal),
                )
                .values(cancel_requested=True, updated_at=now),
            )
            if flagged:
                _rowcount(
                    s,
                    update(Job)
                    .where(
                        Job.id == job_id,
                        Job.status.in_(not_started),
                    )
                    .values(status=JobStatus.cancelled.value, updated_at=now),
                )
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
            n = _rowcount(
                s, update(Job).where(Job.id == job_id).values(result=result, updated_at=utcnow())
            )
        if n == 0:
            raise JobNotFound(job_id)

    def delete_job(self, job_id: str) -> bool:
        """Delete a job and every row it owns (not its files in the artifact store)."""
        with self._tx() as s:
            for model in _CHILD_TABLES:
                s.execute(delete(model).where(model.job_id == job_id))
            return _rowcount(s, delete(Job).where(Job.id == job_id)) == 1

    # ----------------------------------------------------------------------- stages

    @staticmethod
    def _stage_where(job_id: str, epoch: int, stage: Stage | str) -> Any:
        return and_(
            StageRow.job_id == job_id,
            StageRow.epoch == epoch,
            StageRow.stage == Stage(stage).value,
        )

    def stage(self, job_id: str, epoch: int, stage: Stage | str) -> StageState | None:
        with self._sessions() as s:
            row = s.scalar(select(StageRow).where(self._stage_where(job_id, epoch, stage)))
            return None if row is None else StageState.model_validate(row)

    def stage_done(self, job_id: str, epoch: int, stage: Stage | str) -> StageRecord | None:
        """The stage's record if it finished, else None (then run it)."""
        with self._sessions() as s:
            record = s.scalar(
                select(StageRow.record).where(
                    self._stage_where(job_id, epoch, stage),
                    StageRow.status == StageStatus.done.value,
                )
            )
        return None if record is None else StageRecord.model_validate(record)

    def claim_stage(
        self, job_id: str, epoch: int, stage: Stage | str, owner: str, lease_seconds: float
    ) -> bool:
        """Take the stage's lease: True if ``owner`` now holds it.

        A new stage is inserted as running; a pending or failed one, one whose lease expired
        or one ``owner`` already holds is taken over (``attempts`` counts the claims). A done
        stage, or one running under someone else's live lease, answers False.
        """
        stage = Stage(stage)
        now = utcnow()
        expires = now + timedelta(seconds=lease_seconds)
        held = {
            "status": StageStatus.running.value,
            "lease_owner": owner,
            "lease_expires_at": expires,
            "heartbeat_at": now,
            "started_at": now,
        }
        try:
            with self._tx() as s:
                ins = (
                    self._insert(StageRow)
                    .values(
                        job_id=job_id,
                        epoch=epoch,
                        stage=stage.value,
                        attempts=1,
                        **held,
                    )
                    .on_conflict_do_nothing(index_elements=["job_id", "epoch", "stage"])
                )
                # RETURNING, not rowcount: psycopg reports no rowcount for this statement.
                if s.execute(ins.returning(StageRow.id)).first() is not None:
                    return True
        except IntegrityError as exc:  # the foreign key: no such job
            raise JobNotFound(job_id) from exc
        with self._tx() as s:
            takeover = (
                update(StageRow)
                .where(
                    self._stage_where(job_id, epoch, stage),
                    or_(
                        StageRow.status.in_([StageStatus.pending.value, StageStatus.failed.value]),
                        and_(
                            StageRow.status == StageStatus.running.value,
                            or_(StageRow.lease_expires_at < now, StageRow.lease_owner == owner),
                        ),
                    ),
                )
                .values(attempts=StageRow.attempts + 1, finished_at=None, error=None, **held)
            )
            return _rowcount(s, takeover) == 1

    def heartbeat(
        self, job_id: str, epoch: int, stage: Stage | str, owner: str, lease_seconds: float
    ) -> bool:
        """Renew ``owner``'s lease; False if another owner took the stage (stop working)."""
        now = utcnow()
        with self._tx() as s:
            return (
                _rowcount(
                    s,
                    update(StageRow)
                    .where(
                        self._stage_where(job_id, epoch, stage),
                        StageRow.status == StageStatus.running.value,
                        StageRow.lease_owner == owner,
                    )
                    .values(
                        lease_expires_at=now + timedelta(seconds=lease_seconds), heartbeat_at=now
                    ),
                )
                == 1
            )

    def finish_stage(
        self,
        job_id: str,
        epoch: int,
        stage: Stage | str,
        owner: str,
        record: StageRecord,
        output_key: str | None = None,
    ) -> bool:
        """Mark the stage done with its record. True if done now or already (idempotent);
        False if ``owner`` does not hold it (its lease went to another owner)."""
        stage = Stage(stage)
        if record.epoch != epoch or record.stage != stage:
            raise ValueError(
                f"record is for epoch {record.epoch} {record.stage.value}, "
                f"not epoch {epoch} {stage.value}"
            )
        with self._tx() as s:
            done = _rowcount(
                s,
                update(StageRow)
                .where(
                    self._stage_where(job_id, epoch, stage),
                    StageRow.status == StageStatus.running.value,
                    StageRow.lease_owner == owner,
                )
                .values(
                    status=StageStatus.done.value,
                    record=record.model_dump(mode="json"),
                    output_key=output_key,
                    finished_at=utcnow(),
                    lease_expires_at=None,
                ),
            )
            if done:
                return True
            status = s.scalar(
                select(StageRow.status).where(self._stage_where(job_id, epoch, stage))
            )
        return status == StageStatus.done.value

    def fail_stage(
        self, job_id: str, epoch: int, stage: Stage | str, owner: str, error: str
    ) -> bool:
        """Record that ``owner``'s attempt failed (a later claim may retry). False if
        ``owner`` does not hold the stage."""
        with self._tx() as s:
            return (
                _rowcount(
                    s,
                    update(StageRow)
                    .where(
                        self._stage_where(job_id, epoch, stage),
                        StageRow.status == StageStatus.running.value,
                        StageRow.lease_owner == owner,
                    )
                    .values(
                        status=StageStatus.failed.value,
                        error=error,
                        finished_at=utcnow(),
                        lease_expires_at=None,
                    ),
                )
                == 1
            )

    def expired_stages(self, now: datetime | None = None) -> list[StageKey]:
        """Running stages whose lease ran out (their worker is presumed lost): re-queue them."""
        now = now or utcnow()
        with self._sessions() as s:
            rows = s.execute(
                select(StageRow.job_id, StageRow.epoch, StageRow.stage)
                .where(
                    StageRow.status == StageStatus.running.value,
                    StageRow.lease_expires_at < now,
                )
                .order_by(StageRow.lease_expires_at)
            ).all()
        return [StageKey(job_id, epoch, Stage(stage)) for job_id, epoch, stage in rows]

    def stalled_jobs(
        self, idle_seconds: float, now: datetime | None = None
    ) -> list[tuple[str, datetime]]:
        """Running jobs with no stage running and nothing done for ``idle_seconds`` (no stage
        claimed or finished, no status change): the message for their next stage was lost, as
        when a worker dies between finishing a stage and queueing the next. Returns each job id
        with its last activity."""
        now = now or utcnow()
        cutoff = now - timedelta(seconds=idle_seconds)
        stalled = []
        with self._sessions() as s:
            jobs = s.execute(
                select(Job.id, Job.updated_at).where(
                    Job.status == JobStatus.running.value, Job.updated_at < cutoff
                )
            ).all()
            for job_id, updated_at in jobs:
                rows = s.execute(
                    select(StageRow.status, StageRow.started_at, StageRow.finished_at).where(
                        StageRow.job_id == job_id
                    )
                ).all()
                if any(status == StageStatus.running.value for status, _, _ in rows):
                    continue  # a lease covers it: expired_stages() handles a lost worker
                times = [t for _, *pair in rows for t in pair if t is not None]
                last = max([updated_at, *times])
                if last < cutoff:
                    stalled.append((job_id, last))
        return stalled

    def stage_states(self, job_id: str) -> list[StageState]:
        """The job's stage rows (status, lease, attempts), by epoch then in loop order."""
        with self._sessions() as s:
            rows = [
                StageState.model_validate(r)
                for r in s.scalars(select(StageRow).where(StageRow.job_id == job_id))
            ]
        return sorted(rows, key=lambda r: (r.epoch, _STAGE_ORDER[r.stage]))

    def stages(self, job_id: str) -> list[StageRecord]:
        """The records of the job's finished stages (its cost), by epoch then in loop order."""
        return [
            r.record
            for r in self.stage_states(job_id)
            if r.status == StageStatus.done and r.record is not None
        ]

    # ----------------------------------------------------------------------- events

    def add_event(self, job_id: str, ev: Event) -> int:
        """Store an event; returns its id (ids grow, so they are the stream's cursor)."""
        row = EventRow(
            job_id=job_id,
            created_at=_to_datetime(ev.created_at),
            level=ev.level,
            message=ev.message,
            data=ev.data,
        )
        try:
            with self._tx() as s:
                s.add(row)
                s.flush()
                return row.id
        except IntegrityError as exc:
            raise JobNotFound(job_id) from exc

    def events(
        self, job_id: str, after_id: int | None = None, limit: int = 100
    ) -> list[StoredEvent]:
        """Oldest first, those with an id above ``after_id``."""
        q = select(EventRow).where(EventRow.job_id == job_id)
        if after_id is not None:
            q = q.where(EventRow.id > after_id)
        with self._sessions() as s:
            rows = s.scalars(q.order_by(EventRow.id).limit(limit)).all()
            return [
                StoredEvent(
                    id=r.id,
                    job_id=r.job_id,
                    level=r.level,
                    message=r.message,
                    data=r.data,
                    created_at=r.created_at.timestamp(),
                )
                for r in rows
            ]

    # ----------------------------------------------------------------------- epochs

    def save_epoch(self, job_id: str, record: EpochRecord) -> None:
        """Insert or replace the epoch's record."""
        ins = self._insert(EpochRow).values(
            job_id=job_id, epoch=record.epoch, record=record.model_dump(mode="json")
        )
        ins = ins.on_conflict_do_update(
            index_elements=["job_id", "epoch"], set_={"record": ins.excluded.record}
        )
        try:
            with self._tx() as s:
                s.execute(ins)
        except IntegrityError as exc:
            raise JobNotFound(job_id) from exc

    def epochs(self, job_id: str) -> list[EpochRecord]:
        with self._sessions() as s:
            records = s.scalars(
                select(EpochRow.record).where(EpochRow.job_id == job_id).order_by(EpochRow.epoch)
            ).all()
        return [EpochRecord.model_validate(r) for r in records]

    # ----------------------------------------------------------------------- candidates

    def add_candidates(
        self, job_id: str, candidates: Sequence[Candidate], *, replace_epoch: int | None = None
    ) -> int:
        """Store candidates; returns how many. ``replace_epoch``: first delete that epoch's
        candidates, in the same transaction, so a stage that runs twice writes them once."""
        if replace_epoch is not None:
            stray = {c.epoch for c in candidates} - {replace_epoch}
            if stray:
                raise ValueError(
                    f"candidates of epochs {sorted(stray)} given to replace epoch {replace_epoch}"
                )
        rows = [
            {
                "job_id": job_id,
                "epoch": c.epoch,
                "trace_id": c.trace_id,
                "example_id": c.example_id,
                "component": c.component,
                "source": c.source,
                "accepted": c.accepted,
                "data": c.model_dump(mode="json"),
            }
            for c in candidates
        ]
        try:
            with self._tx() as s:
                if replace_epoch is not None:
                    s.execute(
                        delete(CandidateRow).where(
                            CandidateRow.job_id == job_id, CandidateRow.epoch == replace_epoch
                        )
                    )
                if rows:
                    s.execute(insert(CandidateRow), rows)
        except IntegrityError as exc:
            raise JobNotFound(job_id) from exc
        return len(rows)

    def candidates(
        self,
        job_id: str,
        epoch: int | None = None,
        accepted: bool | None = None,
        component: str | None = None,
    ) -> list[Candidate]:
        q = select(CandidateRow.data).where(CandidateRow.job_id == job_id)
        if epoch is not None:
            q = q.where(CandidateRow.epoch == epoch)
        if accepted is not None:
            q = q.where(CandidateRow.accepted == accepted)
        if component is not None:
            q = q.where(CandidateRow.component == component)
        with self._sessions() as s:
            data = s.scalars(q.order_by(CandidateRow.id)).all()
        return [Candidate.model_validate(d) for d in data]

    # ----------------------------------------------------------------------- artifacts

    def add_artifact(
        self,
        job_id: str,
        key: str,
        *,
        kind: str,
        epoch: int | None = None,
        component: str | None = None,
        sha256: str | None = None,
        nbytes: int | None = None,
    ) -> int:
        """Record an artifact-store key for the job; the same ``(job, key)`` is updated, not
        duplicated. Returns the artifact's id."""
        fields = {
            "epoch": epoch,
            "kind": kind,
            "component": component,
            "sha256": sha256,
            "bytes": nbytes,
            "created_at": utcnow(),
        }
        ins = self._insert(ArtifactRow).values(job_id=job_id, key=key, **fields)
        ins = ins.on_conflict_do_update(index_elements=["job_id", "key"], set_=fields)
        try:
            with self._tx() as s:
                return int(s.execute(ins.returning(ArtifactRow.id)).scalar_one())
        except IntegrityError as exc:
            raise JobNotFound(job_id) from exc

    def artifacts(
        self, job_id: str, kind: str | None = None, epoch: int | None = None
    ) -> list[ArtifactRecord]:
        q = select(ArtifactRow).where(ArtifactRow.job_id == job_id)
        if kind is not None:
            q = q.where(ArtifactRow.kind == kind)
        if epoch is not None:
            q = q.where(ArtifactRow.epoch == epoch)
        with self._sessions() as s:
            rows = s.scalars(q.order_by(ArtifactRow.id)).all()
            return [
                ArtifactRecord(
                    id=r.id,
                    job_id=r.job_id,
                    epoch=r.epoch,
                    kind=r.kind,
                    component=r.component,
                    key=r.key,
                    sha256=r.sha256,
                    nbytes=r.bytes,
                    created_at=r.created_at,
                )
                for r in rows
            ]
