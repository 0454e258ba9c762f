"""Schemathesis over every operation of the API, bounded for the default suite.

The API runs on PostgreSQL (migrated to head) with a dispatcher that runs nothing; each
operation gets a fixed number of generated requests (``derandomize``: the same requests on
every machine, so a failure here reproduces anywhere) with a live key, and none may answer
5xx. Job specs are generated from the typed schema of ``POST /v1/jobs`` (finding 10). The long
form (thousands of cases, the probe's 3,072) is `schemathesis run` against a server; this is
the regression guard.
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from conftest import PG_ADMIN_URL
from doubles import RecordingDispatcher
from hypothesis import HealthCheck, settings

from cotune.settings import Settings
from services.api.app import create_app

EXAMPLES_PER_OPERATION = 12


def _database() -> str:
    """A fresh PostgreSQL database, migrated to head (the schema is loaded when this module
    is, so the app exists before any fixture; ``_drop`` removes it)."""
    from sqlalchemy import create_engine, make_url, text

    from cotune.store import migrate

    name = f"cotune_fuzz_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    url = make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    migrate(url)
    return url


URL = _database()
ARTIFACTS = tempfile.mkdtemp(prefix="cotune-fuzz-")
DISPATCHER = RecordingDispatcher()
APP = create_app(Settings(database_url=URL, artifacts=ARTIFACTS), dispatcher=DISPATCHER)
DISPATCHER.store = APP.state.cotune.store
HEADERS = {"Authorization": f"Bearer {APP.state.cotune.accounts.create_key('fuzz')[1]}"}
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


@pytest.fixture(scope="module", autouse=True)
def _drop() -> Iterator[None]:
    yield
    from sqlalchemy import create_engine, make_url, text

    APP.state.cotune.store.close()
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{make_url(URL).database}" WITH (FORCE)'))
    admin.dispose()
    shutil.rmtree(ARTIFACTS, ignore_errors=True)


@schema.parametrize()
@settings(
    max_examples=EXAMPLES_PER_OPERATION,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
def test_no_operation_answers_5xx(case: Any) -> None:
    response = case.call(headers=HEADERS)
    assert response.status_code < 500, (case.method, case.path, response.text[:500])
