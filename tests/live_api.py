"""Live APIs for tests. ``live``: one for the reliability campaign's request-level tests:
PostgreSQL migrated to head, two tenants, the tiny-kb files uploaded by each, and a job of each,
so that generated and bad requests can name real ids; its dispatcher runs nothing
(``RecordingDispatcher``). ``running_api``: one whose real ``ThreadDispatcher`` runs jobs on
the real tiny model, for the end-to-end API tests."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import create_pg_database, drop_pg_database, fresh_pg_database, tiny_job_spec
from doubles import RecordingDispatcher, stub_registry_model
from fastapi.testclient import TestClient

from cotune.jobs.threads import ThreadDispatcher
from cotune.settings import Settings
from cotune.store import ArtifactStore, JobStatus, JobStore
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


@dataclass
class RunningApi:
    app: Any
    key: str  # tenant acme's
    dispatcher: ThreadDispatcher
    store: JobStore
    accounts: AccountStore


@contextmanager
def running_api(root: Path, tiny_model_dir: Path, database: str) -> Iterator[RunningApi]:
    """The API on a fresh migrated PostgreSQL database (``database`` names it) with the real
    ``ThreadDispatcher``; ``tiny`` in the models cache under ``root`` is the real tiny model.
    The dispatcher is shut down (waiting for its jobs) and the database dropped after."""
    (root / "home" / "models").mkdir(parents=True)
    (root / "home" / "models" / "tiny").symlink_to(tiny_model_dir)
    with fresh_pg_database(database) as url, pytest.MonkeyPatch.context() as mp:
        mp.setenv("COTUNE_HOME", str(root / "home"))
        mp.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
        settings = Settings(
            database_url=url,
            artifacts=str(root / "artifacts"),
            workdir=str(root / "work"),
            migrate_on_start=False,
        )
        store = JobStore(url)
        accounts = AccountStore(store)
        dispatcher = ThreadDispatcher(store, accounts, ArtifactStore(settings.artifacts), settings)
        app = create_app(settings, dispatcher=dispatcher)
        _, key = app.state.cotune.accounts.create_key("acme", name="tests")
        try:
            yield RunningApi(app, key, dispatcher, store, accounts)
        finally:
            dispatcher.shutdown(wait=True)
            store.close()
