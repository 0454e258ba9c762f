"""``live``: one live API for the reliability campaign's request-level tests: PostgreSQL
migrated to head, two tenants, the tiny-kb files uploaded by each, and a job of each, so that
generated and bad requests can name real ids. The dispatcher runs nothing
(``RecordingDispatcher``)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import create_pg_database, drop_pg_database, tiny_job_spec
from doubles import RecordingDispatcher, stub_registry_model
from fastapi.testclient import TestClient

from cotune.settings import Settings
from cotune.store import JobStatus, JobStore
from cotune.store.accounts import AccountStore
from cotune.tiny import upload_tiny_example, write_tiny_example
from services.api.app import create_app

TENANTS = ("acme", "globex")


@dataclass
class Tenant:
    headers: dict[str, str]
    files: dict[str, str]  # train, val, test, corpus -> file id
    job: str


@dataclass
class LiveApi:
    client: TestClient
    app: Any
    dispatcher: RecordingDispatcher
    tenants: dict[str, Tenant]

    @property
    def store(self) -> JobStore:
        return self.app.state.cotune.store

    @property
    def accounts(self) -> AccountStore:
        return self.app.state.cotune.accounts

    def jobs_of(self, tenant: str) -> int:
        return self.store.count_jobs(tenant, list(JobStatus))

    def files_of(self, tenant: str) -> int:
        return len(self.accounts.list_files(tenant, limit=10_000).data)


def _upload(client: TestClient, headers: dict[str, str], folder: Path) -> dict[str, str]:
    def upload(name: str, content: bytes, purpose: str) -> str:
        response = client.post(
            "/v1/files", headers=headers, files={"file": (name, content)}, data={"purpose": purpose}
        )
        assert response.status_code == 200, response.text
        return str(response.json()["id"])

    return upload_tiny_example(folder, upload)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveApi]:
    home = tmp_path_factory.mktemp("cotune-home")
    stub_registry_model(home)
    url = create_pg_database("cotune_campaign")
    artifacts = tempfile.mkdtemp(prefix="cotune-campaign-")
    settings = Settings(
        database_url=url,
        artifacts=artifacts,
        workdir=str(tmp_path_factory.mktemp("work")),
        # Generated requests come fast and many from one key and many bad keys from one
        # address: the limits have their own tests (tests/api/test_api_limits.py).
        rate_limit_burst=1_000_000,
        auth_failure_burst=1_000_000,
        max_running_jobs_per_tenant=1_000_000,
        migrate_on_start=False,
    )
    dispatcher = RecordingDispatcher()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("COTUNE_HOME", str(home))
        app = create_app(settings, dispatcher=dispatcher)
        dispatcher.store = app.state.cotune.store
        folder = write_tiny_example(tmp_path_factory.mktemp("tiny-kb"), splits=(12, 6, 6))
        with TestClient(app, raise_server_exceptions=False) as client:
            tenants = {}
            for name in TENANTS:
                key = app.state.cotune.accounts.create_key(name)[1]
                headers = {"Authorization": f"Bearer {key}"}
                files = _upload(client, headers, folder)
                response = client.post("/v1/jobs", headers=headers, json=tiny_job_spec(files))
                assert response.status_code == 200, response.text
                tenants[name] = Tenant(headers=headers, files=files, job=response.json()["id"])
            yield LiveApi(client=client, app=app, dispatcher=dispatcher, tenants=tenants)
        app.state.cotune.store.close()
    drop_pg_database(url)
    shutil.rmtree(artifacts, ignore_errors=True)
