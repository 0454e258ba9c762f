"""The job store (SQLAlchemy: PostgreSQL in the service, SQLite embedded) and the artifact
store (fsspec: a local folder, ``s3://``, ...).

The schema is owned by Alembic; its scripts live in ``cotune/store/migrations`` so that an
installed package can migrate a database (``migrate(url)``) without the repository. The
repository's ``alembic.ini`` points at the same folder for the ``alembic`` command.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from cotune.store.artifacts import ArtifactStore
from cotune.store.history import ArtifactRecord, StoredEvent
from cotune.store.jobs import JobPage, JobRecord, JobStore
from cotune.store.stages import StageKey, StageState
from cotune.store.status import (
    STAGE_TRANSITIONS,
    TRANSITIONS,
    IllegalTransition,
    JobNotFound,
    JobStatus,
    StageStatus,
)

if TYPE_CHECKING:
    from sqlalchemy import Engine

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

__all__ = [
    "MIGRATIONS_DIR",
    "STAGE_TRANSITIONS",
    "TRANSITIONS",
    "ArtifactRecord",
    "ArtifactStore",
    "IllegalTransition",
    "JobNotFound",
    "JobPage",
    "JobRecord",
    "JobStatus",
    "JobStore",
    "StageKey",
    "StageState",
    "StageStatus",
    "StoredEvent",
    "create_database",
    "migrate",
]


def migrate(url: str, *, revision: str = "head", engine: Engine | None = None) -> None:
    """Bring the database at ``url`` to ``revision`` (``alembic upgrade head``).

    ``engine``: run on this engine's connection instead of a new one (needed for an in-memory
    SQLite database, which exists only on its own connection). On PostgreSQL, processes that
    migrate at once take turns (an advisory lock); within one process, call it from one thread
    at a time (Alembic's context is global).
    """
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    # Passed as an attribute, not an ini option: a URL's "%" would trip ini interpolation.
    cfg.attributes["url"] = url
    if engine is None:
        command.upgrade(cfg, revision)
        return
    with engine.begin() as connection:
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, revision)


def create_database(admin_url: str, prefix: str) -> str:
    """A new PostgreSQL database ``<prefix>_<random>`` on the server of ``admin_url``, migrated
    to head; its URL (for tests and the chaos scripts: one database per run)."""
    import uuid

    from sqlalchemy import create_engine, make_url, text

    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    finally:
        admin.dispose()
    url = make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    migrate(url)
    return url
