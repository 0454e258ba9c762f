"""Alembic environment for the job store.

The database URL comes from, in order: ``config.attributes["connection"]`` (an open
connection, from ``cotune.store.migrate(url, engine=...)``), ``config.attributes["url"]``
(``cotune.store.migrate(url)``), the ``COTUNE_DATABASE_URL`` environment variable, then
``sqlalchemy.url`` in the ini file.
"""

from __future__ import annotations

import os
from logging.config import fileConfig

from alembic import context
from sqlalchemy import Connection, pool, text
from sqlalchemy.engine import create_engine

from cotune.store.models import Base

config = context.config
_PG_LOCK_ID = 0x636F74756E65  # "cotune"
target_metadata = Base.metadata

if config.config_file_name is not None and not config.attributes.get("url"):
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def _url() -> str:
    url = (
        config.attributes.get("url")
        or os.environ.get("COTUNE_DATABASE_URL")
        or config.get_main_option("sqlalchemy.url")
    )
    if not url:
        raise RuntimeError(
            "no database URL: set COTUNE_DATABASE_URL (e.g. sqlite:///cotune.db or "
            "postgresql+psycopg://user@host:5432/cotune)"
        )
    return str(url)


def run_migrations_offline() -> None:
    context.configure(
        url=_url(),
        target_metadata=target_metadata,
        render_as_batch=True,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


def _run(connection: Connection) -> None:
    # render_as_batch: SQLite cannot ALTER most things, so later revisions rewrite tables.
    context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            # Several processes may migrate at start-up: one at a time (released at commit).
            connection.execute(text(f"SELECT pg_advisory_xact_lock({_PG_LOCK_ID})"))
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = create_engine(_url(), poolclass=pool.NullPool)
    try:
        with engine.connect() as conn:
            _run(conn)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
