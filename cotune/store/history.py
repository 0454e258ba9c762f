"""What a job records as it runs: events, epochs, candidates and artifact keys.

Each write is one statement (or, for candidates, one transaction). Events are appended: their
ids only grow, so an id is the stream's cursor. The rest is written so that a stage that runs
twice records it once: an epoch's record is upserted (``ON CONFLICT DO UPDATE``), a stage's
candidates replace its epoch's in one transaction (``replace_epoch``), and an artifact key is
upserted per ``(job, key)``. A write for a job that does not exist raises ``JobNotFound``
(the foreign key).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from pydantic import BaseModel, ConfigDict
from sqlalchemy import delete, insert, select
from sqlalchemy.exc import IntegrityError

from cotune.records import Candidate, EpochRecord, Event
from cotune.store.base import StoreBase, to_datetime
from cotune.store.models import ArtifactRow, CandidateRow, EpochRow, EventRow, utcnow
from cotune.store.status import JobNotFound


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


class HistoryMixin(StoreBase):
    """Events, epochs, candidates and artifacts of ``JobStore``."""

    # ----------------------------------------------------------------------- events

    def add_event(self, job_id: str, ev: Event) -> int:
        """Store an event; returns its id (ids grow, so they are the stream's cursor)."""
        row = event_row(job_id, ev)
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


def event_row(job_id: str, ev: Event) -> EventRow:
    return EventRow(
        job_id=job_id,
        created_at=to_datetime(ev.created_at),
        level=ev.level,
        message=ev.message,
        data=ev.data,
    )
