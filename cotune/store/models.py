"""The job store's tables (SQLAlchemy 2.0 typed ORM), portable across SQLite and PostgreSQL.

The schema is created by the Alembic revisions in ``cotune/store/migrations`` (never by
``create_all`` at runtime); a test checks that the revisions and these models agree.

- JSON columns use ``sqlalchemy.JSON`` (``json`` on PostgreSQL, text on SQLite), which keeps
  a user's key order when a spec is echoed back.
- Timestamps are timezone-aware UTC on the way in and out (``UTCDateTime``): ``timestamptz``
  on PostgreSQL, naive UTC text on SQLite.
- Rows that belong to a job reference ``jobs.id`` with ``ON DELETE CASCADE`` (SQLite enforces
  it with ``PRAGMA foreign_keys=ON``, which the store sets; ``JobStore.delete_job`` also deletes
  the children explicitly).
- ``tenants``, ``api_keys`` and ``files`` come with revision 0002 (appended at the end);
  ``stages.component`` (and the stage key that includes it) with revision 0003; ``models``
  (registered base models) with revision 0004.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    func,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator


def matchable(key: str) -> bool:
    """Whether ``key`` can name a row at all. PostgreSQL's text types refuse NUL (the query
    fails instead of matching nothing), and no id, key or cursor cotune issues holds one, so a
    lookup by such a key answers "none" without asking the database."""
    return "\x00" not in key


# Stable constraint names, so later migrations (and SQLite batch mode) can refer to them.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# An autoincrementing 64-bit id on PostgreSQL; SQLite only autoincrements INTEGER PRIMARY KEY.
BigId = BigInteger().with_variant(Integer(), "sqlite")


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every backend.

    Naive values given to it are taken to be UTC. SQLite has no time zones: it stores naive
    UTC, and values read back get ``tzinfo=UTC``.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        datetime: UTCDateTime(),
        dict[str, Any]: JSON(),
    }


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # job-<hex>
    tenant_id: Mapped[str | None] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(255))
    status: Mapped[str] = mapped_column(String(32), index=True)  # a JobStatus value
    spec: Mapped[dict[str, Any]] = mapped_column(JSON())
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON())
    error: Mapped[str | None] = mapped_column(Text)
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)

    __table_args__ = (
        # One job per (tenant, key); a NULL tenant (the embedded mode) is a tenant of its own.
        # An expression index, because a plain UNIQUE treats NULLs as distinct on both backends.
        Index(
            "uq_jobs_tenant_idempotency_key",
            func.coalesce(tenant_id, ""),
            idempotency_key,
            unique=True,
        ),
        # Cursor pagination: newest first within a tenant.
        Index("ix_jobs_tenant_created", tenant_id, created_at, id),
    )


class StageRow(Base):
    __tablename__ = "stages"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(64), ForeignKey("jobs.id", ondelete="CASCADE"))
    epoch: Mapped[int] = mapped_column(Integer)
    stage: Mapped[str] = mapped_column(String(32))  # a records.Stage value
    # The component a per-component stage is for; "" for the whole job's stage (revision 0003).
    component: Mapped[str] = mapped_column(String(64), server_default="")
    status: Mapped[str] = mapped_column(String(16), default="pending")  # a StageStatus
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(255))
    lease_expires_at: Mapped[datetime | None] = mapped_column()
    heartbeat_at: Mapped[datetime | None] = mapped_column()
    started_at: Mapped[datetime | None] = mapped_column()
    finished_at: Mapped[datetime | None] = mapped_column()
    record: Mapped[dict[str, Any] | None] = mapped_column(JSON())  # a records.StageRecord
    output_key: Mapped[str | None] = mapped_column(String(1024))
    error: Mapped[str | None] = mapped_column(Text)  # why the last attempt failed

    __table_args__ = (
        UniqueConstraint("job_id", "epoch", "stage", "component"),
        # The reaper's query: running stages whose lease ran out.
        Index("ix_stages_status_lease", status, lease_expires_at),
    )


class EventRow(Base):
    __tablename__ = "events"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(64), ForeignKey("jobs.id", ondelete="CASCADE"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    level: Mapped[str] = mapped_column(String(16), default="info")
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any]] = mapped_column(JSON())

    __table_args__ = (Index("ix_events_job_id_id", job_id, id),)


class EpochRow(Base):
    __tablename__ = "epochs"

    job_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
    )
    epoch: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    record: Mapped[dict[str, Any]] = mapped_column(JSON())  # a records.EpochRecord


class CandidateRow(Base):
    __tablename__ = "candidates"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(64), ForeignKey("jobs.id", ondelete="CASCADE"))
    epoch: Mapped[int] = mapped_column(Integer)
    trace_id: Mapped[str] = mapped_column(String(255))
    example_id: Mapped[str] = mapped_column(String(255))
    component: Mapped[str] = mapped_column(String(255))
    source: Mapped[str] = mapped_column(String(32))  # "judge" or "resample"
    accepted: Mapped[bool] = mapped_column(Boolean)
    data: Mapped[dict[str, Any]] = mapped_column(JSON())  # a records.Candidate

    __table_args__ = (Index("ix_candidates_job_id_epoch", job_id, epoch),)


class ArtifactRow(Base):
    __tablename__ = "artifacts"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(64), ForeignKey("jobs.id", ondelete="CASCADE"))
    epoch: Mapped[int | None] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(32))  # "adapter", "traces", "report", ...
    component: Mapped[str | None] = mapped_column(String(255))
    key: Mapped[str] = mapped_column(String(1024))  # an ArtifactStore key
    sha256: Mapped[str | None] = mapped_column(String(64))
    bytes: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    # A stage that runs twice records its artifact once.
    __table_args__ = (UniqueConstraint("job_id", "key"),)


# --------------------------------------------------------------------------- accounts (0002)


class Tenant(Base):
    """A customer: owns API keys, files and jobs (``jobs.tenant_id``). The limits override the
    server's per-tenant defaults when set."""

    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    max_running_jobs: Mapped[int | None] = mapped_column(Integer)
    max_storage_bytes: Mapped[int | None] = mapped_column(BigInteger)


class ApiKey(Base):
    """An API key: only a salted hash of its secret is stored (``cotune.store.accounts``)."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # key-<hex>
    tenant_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("tenants.id", ondelete="CASCADE"), index=True
    )
    name: Mapped[str | None] = mapped_column(String(255))
    salt: Mapped[str] = mapped_column(String(64))
    secret_hash: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column()
    revoked_at: Mapped[datetime | None] = mapped_column()


class FileRow(Base):
    """An uploaded data file or corpus, checked at upload; its bytes live in the artifact
    store under ``key``. ``fields``: how many rows hold each field (non-null)."""

    __tablename__ = "files"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # file-<hex>
    tenant_id: Mapped[str] = mapped_column(String(64), ForeignKey("tenants.id", ondelete="CASCADE"))
    purpose: Mapped[str] = mapped_column(String(16))  # "data", "fine-tune", "feedback" or "corpus"
    filename: Mapped[str] = mapped_column(String(255))
    bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    key: Mapped[str] = mapped_column(String(1024))
    rows: Mapped[int] = mapped_column(Integer)
    fields: Mapped[dict[str, Any]] = mapped_column(JSON())
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (
        # One file per (tenant, key); NULL keys (no Idempotency-Key) never collide.
        UniqueConstraint("tenant_id", "idempotency_key"),
        Index("ix_files_tenant_created", tenant_id, created_at, id),
    )


# --------------------------------------------------------------------------- models (0004)


class ModelRow(Base):
    """A base model an admin registered (``cotune models add``); the two built-in models are
    code (``cotune.models.REGISTRY``) and have no row. ``options`` is a
    ``cotune.store.registry.ModelOptions``; ``status`` a ``ModelStatus``."""

    __tablename__ = "models"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))  # "hf", "path" or "gguf"
    source: Mapped[str] = mapped_column(String(1024))  # repo@revision, a folder or a file
    options: Mapped[dict[str, Any]] = mapped_column(JSON())
    status: Mapped[str] = mapped_column(String(16))
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    prepared_at: Mapped[datetime | None] = mapped_column()
