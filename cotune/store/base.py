"""What every part of the job store shares: the engine, sessions and dialect-aware inserts.

The store is one class (``JobStore``, in ``cotune.store.jobs``) composed of parts over this
base: the jobs themselves (``jobs``), their stages and leases (``stages``), and what a job
records as it runs: events, epochs, candidates and artifacts (``history``). It is the same on
SQLite (the embedded mode) and PostgreSQL (the service), and returns pydantic records, never
ORM objects, so callers hold no session.

Concurrency comes from single atomic statements (a conditional ``UPDATE``, an
``INSERT ... ON CONFLICT``), not from isolation levels; each part says how its writes race.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Self, cast

from sqlalchemy import CursorResult, Engine, Executable, create_engine, event
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

from cotune.store.models import utcnow

SQLITE_BUSY_TIMEOUT_S = 30


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
        elif u.database is not None and not u.database.startswith("file:"):
            # A first command on a new machine (``cotune models list``, ``cotune keys``) finds
            # no folder under COTUNE_HOME yet: SQLite makes the file, not its folder.
            Path(u.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
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


def rowcount(session: Session, stmt: Executable) -> int:
    """How many rows an ``UPDATE`` or ``DELETE`` touched."""
    result = session.execute(stmt, execution_options={"synchronize_session": False})
    return cast(CursorResult[Any], result).rowcount


def to_datetime(ts: float | None) -> datetime:
    """A UNIX timestamp as an aware UTC datetime; None: now."""
    return utcnow() if ts is None else datetime.fromtimestamp(ts, UTC)


class Sessions:
    """Transactions over an engine: what every store over the database shares."""

    engine: Engine

    def _bind(self, engine: Engine) -> None:
        self.engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)

    @contextmanager
    def _tx(self) -> Iterator[Session]:
        with self._sessions.begin() as session:
            yield session


class SideStore(Sessions):
    """A store beside the job store, over its database (accounts, registered models): given
    the database's URL, an engine, or a store whose engine it shares."""

    def __init__(self, db: str | Engine | Sessions) -> None:
        if isinstance(db, Sessions):
            self._bind(db.engine)
        else:
            self._bind(make_engine(db) if isinstance(db, str) else db)


class StoreBase(Sessions):
    """The engine and sessions the store's parts share.

    ``auto_migrate=True`` brings the schema to the latest revision first (the embedded mode);
    the service runs ``cotune.store.migrate`` (or ``alembic upgrade head``) at deploy time.
    """

    def __init__(self, url: str, *, auto_migrate: bool = False) -> None:
        self.url = url
        self._bind(make_engine(url))
        self.dialect = self.engine.dialect.name
        if auto_migrate:
            from cotune.store import migrate

            migrate(url, engine=self.engine)

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _insert(self, model: Any) -> Any:
        """A dialect insert, for ``on_conflict_do_nothing`` / ``on_conflict_do_update``."""
        return pg_insert(model) if self.dialect == "postgresql" else sqlite_insert(model)
