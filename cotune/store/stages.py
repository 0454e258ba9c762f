"""The job store's stages: one row per ``(job, epoch, stage, component)``, with a lease.

``component`` is ``""`` for the whole job's stage (every stage of the loop today); a stage that
runs once per component keeps one row for each, claimed, finished and read on its own.

What may happen to a row is ``STAGE_TRANSITIONS`` (``cotune.store.status``): every ``UPDATE``
here takes its allowed source statuses from that table (``stage_sources``), and the lease adds
who may make the move. Each write is one atomic statement:

- ``claim_stage`` inserts the stage row (``ON CONFLICT DO NOTHING``) or takes it over with one
  conditional ``UPDATE``: from a status the table lets become running (pending, failed, or
  running, the latter only if its lease expired or is already ours). Of racing claimers
  exactly one wins.
- ``heartbeat``, ``finish_stage`` and ``fail_stage`` only touch a row that is running and held
  by the caller. A lease that expired is lost only once another owner claims the stage: until
  then its holder may still heartbeat or finish it, so a slow worker wastes nothing and a stage
  still runs to completion once.

Times come from this process's clock (UTC): workers on several machines need synchronised
clocks, and leases should be much longer than any expected skew.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from pydantic import BaseModel, ConfigDict
from sqlalchemy import ColumnElement, and_, or_, select, update
from sqlalchemy.exc import IntegrityError

from cotune.records import Stage, StageRecord
from cotune.store.base import StoreBase, rowcount
from cotune.store.models import Job, StageRow, utcnow
from cotune.store.status import LEASED, JobNotFound, JobStatus, StageStatus, stage_sources

STAGE_ORDER = {s: i for i, s in enumerate(Stage)}
COMPONENT_MAX_CHARS = 64  # stages.component is a String(64)


class StageKey(NamedTuple):
    job_id: str
    epoch: int
    stage: Stage
    component: str = ""


class StageState(BaseModel):
    """A stage row: its status, lease and, once done, its ``StageRecord``."""

    model_config = ConfigDict(from_attributes=True)

    job_id: str
    epoch: int
    stage: Stage
    component: str = ""
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


def _component(component: str) -> str:
    """``component``, if a stage row can hold it (the same on both backends)."""
    if len(component) > COMPONENT_MAX_CHARS or "\x00" in component:
        raise ValueError(f"not a stage component: {component!r}")
    return component


def _stage_where(job_id: str, epoch: int, stage: Stage | str, component: str) -> Any:
    return and_(
        StageRow.job_id == job_id,
        StageRow.epoch == epoch,
        StageRow.stage == Stage(stage).value,
        StageRow.component == _component(component),
    )


def _status_in(statuses: Iterable[StageStatus]) -> ColumnElement[bool]:
    return StageRow.status.in_(sorted(s.value for s in statuses))


def _held_may_become(to: StageStatus, owner: str) -> ColumnElement[bool]:
    """The row is leased to ``owner`` and ``STAGE_TRANSITIONS`` lets its status become ``to``."""
    return and_(_status_in(stage_sources(to) & LEASED), StageRow.lease_owner == owner)


class StageMixin(StoreBase):
    """Stages of ``JobStore``: leases, records, the reaper's and the watchdog's queries."""

    def stage(
        self, job_id: str, epoch: int, stage: Stage | str, *, component: str = ""
    ) -> StageState | None:
        with self._sessions() as s:
            row = s.scalar(select(StageRow).where(_stage_where(job_id, epoch, stage, component)))
            return None if row is None else StageState.model_validate(row)

    def stage_done(
        self, job_id: str, epoch: int, stage: Stage | str, *, component: str = ""
    ) -> StageRecord | None:
        """The stage's record if it finished, else None (then run it)."""
        with self._sessions() as s:
            record = s.scalar(
                select(StageRow.record).where(
                    _stage_where(job_id, epoch, stage, component),
                    StageRow.status == StageStatus.done.value,
                )
            )
        return None if record is None else StageRecord.model_validate(record)

    def claim_stage(
        self,
        job_id: str,
        epoch: int,
        stage: Stage | str,
        owner: str,
        lease_seconds: float,
        *,
        component: str = "",
    ) -> bool:
        """Take the stage's lease: True if ``owner`` now holds it.

        A new stage is inserted as running; a pending or failed one, one whose lease expired
        or one ``owner`` already holds is taken over (``attempts`` counts the claims). A done
        stage, or one running under someone else's live lease, answers False.
        """
        stage = Stage(stage)
        running = StageStatus.running
        sources = stage_sources(running)
        now = utcnow()
        expires = now + timedelta(seconds=lease_seconds)
        held = {
            "status": running.value,
            "lease_owner": owner,
            "lease_expires_at": expires,
            "heartbeat_at": now,
            "started_at": now,
        }
        # A stage with no row yet is pending: the insert is its first move, pending -> running.
        if StageStatus.pending in sources:
            try:
                with self._tx() as s:
                    ins = (
                        self._insert(StageRow)
                        .values(
                            job_id=job_id,
                            epoch=epoch,
                            stage=stage.value,
                            component=_component(component),
                            attempts=1,
                            **held,
                        )
                        .on_conflict_do_nothing(
                            index_elements=["job_id", "epoch", "stage", "component"]
                        )
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
                    _stage_where(job_id, epoch, stage, component),
                    _status_in(sources),
                    # A leased row only once its lease expired, or by its holder.
                    or_(
                        StageRow.status.not_in(sorted(x.value for x in LEASED)),
                        StageRow.lease_expires_at < now,
                        StageRow.lease_owner == owner,
                    ),
                )
                .values(attempts=StageRow.attempts + 1, finished_at=None, error=None, **held)
            )
            return rowcount(s, takeover) == 1

    def heartbeat(
        self,
        job_id: str,
        epoch: int,
        stage: Stage | str,
        owner: str,
        lease_seconds: float,
        *,
        component: str = "",
    ) -> bool:
        """Renew ``owner``'s lease; False if another owner took the stage (stop working)."""
        now = utcnow()
        with self._tx() as s:
            return (
                rowcount(
                    s,
                    update(StageRow)
                    .where(
                        _stage_where(job_id, epoch, stage, component),
                        _held_may_become(StageStatus.running, owner),
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
        *,
        component: str = "",
    ) -> bool:
        """Mark the stage done with its record. True if done now or already (idempotent: the
        record first stored stays); False if ``owner`` does not hold it (its lease went to
        another owner, or the stage is not running)."""
        stage = Stage(stage)
        if record.epoch != epoch or record.stage != stage:
            raise ValueError(
                f"record is for epoch {record.epoch} {record.stage.value}, "
                f"not epoch {epoch} {stage.value}"
            )
        where = _stage_where(job_id, epoch, stage, component)
        with self._tx() as s:
            done = rowcount(
                s,
                update(StageRow)
                .where(where, _held_may_become(StageStatus.done, owner))
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
            status = s.scalar(select(StageRow.status).where(where))
        return status == StageStatus.done.value

    def fail_stage(
        self,
        job_id: str,
        epoch: int,
        stage: Stage | str,
        owner: str,
        error: str,
        *,
        component: str = "",
    ) -> bool:
        """Record that ``owner``'s attempt failed (a later claim may retry). False if
        ``owner`` does not hold the stage."""
        with self._tx() as s:
            return (
                rowcount(
                    s,
                    update(StageRow)
                    .where(
                        _stage_where(job_id, epoch, stage, component),
                        _held_may_become(StageStatus.failed, owner),
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
                select(StageRow.job_id, StageRow.epoch, StageRow.stage, StageRow.component)
                .where(
                    StageRow.status == StageStatus.running.value,
                    StageRow.lease_expires_at < now,
                )
                .order_by(StageRow.lease_expires_at)
            ).all()
        return [
            StageKey(job_id, epoch, Stage(stage), component)
            for job_id, epoch, stage, component in rows
        ]

    def stalled_jobs(
        self,
        idle_seconds: float,
        now: datetime | None = None,
        *,
        statuses: Sequence[JobStatus] = (JobStatus.running,),
    ) -> list[tuple[str, datetime]]:
        """Jobs in ``statuses`` (running ones by default) with no stage running and nothing
        done for ``idle_seconds`` (no stage claimed or finished, no status change): the message
        for their next step may be lost, as when a worker dies between finishing a stage and
        queueing the next. A queued or validating job may also just wait behind others: the
        reaper asks the broker before it re-sends anything. Returns each job id with its last
        activity."""
        now = now or utcnow()
        cutoff = now - timedelta(seconds=idle_seconds)
        stalled = []
        with self._sessions() as s:
            jobs = s.execute(
                select(Job.id, Job.updated_at).where(
                    Job.status.in_([JobStatus(x).value for x in statuses]),
                    Job.updated_at < cutoff,
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
        """The job's stage rows (status, lease, attempts), by epoch then in loop order (the
        whole job's stage before its per-component rows, those by component)."""
        with self._sessions() as s:
            rows = [
                StageState.model_validate(r)
                for r in s.scalars(select(StageRow).where(StageRow.job_id == job_id))
            ]
        return sorted(rows, key=lambda r: (r.epoch, STAGE_ORDER[r.stage], r.component))

    def stages(self, job_id: str) -> list[StageRecord]:
        """The records of the job's finished stages (its cost), by epoch then in loop order."""
        return [
            r.record
            for r in self.stage_states(job_id)
            if r.status == StageStatus.done and r.record is not None
        ]
