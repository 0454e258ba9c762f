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
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from conftest import create_pg_database, drop_pg_database
from doubles import RecordingDispatcher
from hypothesis import HealthCheck, settings

from cotune.settings import Settings
from services.api.app import create_app

EXAMPLES_PER_OPERATION = 12


# The schema is loaded when this module is, so the app (and its database) exist before any
# fixture; ``_drop`` removes the database.
URL = create_pg_database("cotune_fuzz")
ARTIFACTS = tempfile.mkdtemp(prefix="cotune-fuzz-")
DISPATCHER = RecordingDispatcher()
APP = create_app(Settings(database_url=URL, artifacts=ARTIFACTS), dispatcher=DISPATCHER)
DISPATCHER.store = APP.state.cotune.store
HEADERS = {"Authorization": f"Bearer {APP.state.cotune.accounts.create_key('fuzz')[1]}"}
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


@pytest.fixture(scope="module", autouse=True)
def _drop() -> Iterator[None]:
    yield
    APP.state.cotune.store.close()
    drop_pg_database(URL)
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
