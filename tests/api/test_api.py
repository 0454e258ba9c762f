"""The HTTP API on real PostgreSQL: uploads, specs, tenants, keys, idempotency, the openai SDK,
secrets, downloads, ops routes, and one job run end to end by the real ``ThreadDispatcher``.

A database of its own per module, created on the server at ``COTUNE_TEST_PG_URL`` (default
``postgresql+psycopg://postgres@127.0.0.1:5432/test``), migrated with ``migrate(url)`` and
dropped at the end. Most tests hand jobs to ``RecordingDispatcher`` (a test double: it runs
nothing) and write the stores directly to stand for a finished run; the ``ThreadDispatcher``
test runs the real loop with the scripted engine, judge and trainer of ``tests/doubles.py``.
"""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import tarfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import fresh_pg_database, tiny_job_spec
from doubles import RecordingDispatcher, stub_registry_model
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from sqlalchemy import text

from cotune.jobs.materialize import materialize
from cotune.jobs.threads import ThreadDispatcher
from cotune.records import (
    ComponentEpochRecord,
    EpochRecord,
    Event,
    JobReport,
    Stage,
    StageRecord,
    stage_output_model,
)
from cotune.settings import HostedJudge, Settings
from cotune.store import ArtifactStore, JobStatus, JobStore
from cotune.store.accounts import AccountStore
from cotune.tiny import upload_tiny_example, write_tiny_example
from services.api.app import create_app

JUDGE_ENV = "COTUNE_TEST_HOSTED_JUDGE_KEY"
SECRET = f"sk-hosted-judge-{uuid.uuid4().hex}"
MAX_UPLOAD = 64 * 1024


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database, migrated to head; dropped afterwards."""
    with fresh_pg_database("cotune_api") as url:
        yield url


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """``COTUNE_HOME`` with a registry model ``tiny`` that resolves (never loaded: the run
    uses scripted engines) and the hosted judge's key in the server's environment."""
    home = tmp_path_factory.mktemp("cotune-home")
    stub_registry_model(home)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("COTUNE_HOME", str(home))
        mp.setenv(JUDGE_ENV, SECRET)
        yield home


@pytest.fixture(scope="module")
def settings(pg_url: str, env: Path, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    root = tmp_path_factory.mktemp("service")
    return Settings(
        database_url=pg_url,
        artifacts=str(root / "artifacts"),
        workdir=str(root / "work"),
        judges={
            "hosted-judge": HostedJudge(
                url="https://judge.example.com/v1", model="judge-large", api_key_env=JUDGE_ENV
            )
        },
        http_search_allowed_hosts=["search.example.com"],
        max_upload_bytes=MAX_UPLOAD,
        max_line_bytes=4096,
        events_poll_seconds=0.05,
        # This module sends ~70 bad keys on purpose (every route, four ways); the back-off on
        # failed authentication has its own test (tests/api/test_api_limits.py).
        auth_failure_burst=10_000,
        migrate_on_start=False,
    )


@dataclass
class Api:
    client: TestClient
    app: Any
    dispatcher: RecordingDispatcher
    settings: Settings
    acme: dict[str, str]
    globex: dict[str, str]
    acme_key: str
    responses: list[str] = field(default_factory=list)

    @property
    def store(self) -> JobStore:
        return self.app.state.cotune.store

    @property
    def artifacts(self) -> ArtifactStore:
        return self.app.state.cotune.artifacts

    @property
    def accounts(self) -> AccountStore:
        return self.app.state.cotune.accounts

    def request(self, method: str, url: str, **kwargs: Any) -> Any:
        response = self.client.request(method, url, **kwargs)
        self.responses.append(response.text)
        return response

    def upload(self, name: str, content: bytes, purpose: str = "data", headers: Any = None) -> Any:
        return self.request(
            "POST",
            "/v1/files",
            headers=headers or self.acme,
            files={"file": (name, content)},
            data={"purpose": purpose},
        )


@pytest.fixture(scope="module")
def api(settings: Settings) -> Iterator[Api]:
    dispatcher = RecordingDispatcher()
    app = create_app(settings, dispatcher=dispatcher)
    dispatcher.store = app.state.cotune.store
    accounts: AccountStore = app.state.cotune.accounts
    _, acme = accounts.create_key("acme", name="tests")
    _, globex = accounts.create_key("globex", name="tests")
    with TestClient(app, raise_server_exceptions=False) as client:
        yield Api(
            client=client,
            app=app,
            dispatcher=dispatcher,
            settings=settings,
            acme={"Authorization": f"Bearer {acme}"},
            globex={"X-API-Key": globex},
            acme_key=acme,
        )


@pytest.fixture(scope="module")
def tiny_files(api: Api, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The tiny-kb task's splits and corpus, uploaded by tenant acme: name -> file id."""
    folder = write_tiny_example(tmp_path_factory.mktemp("tiny-kb"), splits=(12, 6, 6))

    def upload(name: str, content: bytes, purpose: str) -> str:
        response = api.upload(name, content, purpose)
        assert response.status_code == 200, response.text
        return str(response.json()["id"])

    return upload_tiny_example(folder, upload)


def submit(api: Api, spec: dict[str, Any], headers: Any = None, **kwargs: Any) -> dict[str, Any]:
    response = api.request("POST", "/v1/jobs", json=spec, headers=headers or api.acme, **kwargs)
    assert response.status_code == 200, response.text
    return response.json()


def write_adapter(artifacts: ArtifactStore, key: str, rank: int = 4) -> None:
    import numpy as np
    from safetensors.numpy import save

    artifacts.put_text(
        f"{key}/adapter_config.json", json.dumps({"peft_type": "LORA", "r": rank, "lora_alpha": 8})
    )
    weights = {"base_model.model.layers.0.q_proj.lora_A.weight": np.ones((rank, 4), np.float32)}
    artifacts.put_bytes(f"{key}/adapter_model.safetensors", save(weights))


def finish(api: Api, job_id: str, *, kept: bool = True) -> None:
    """Stand for a finished run: stages with traces, two epochs (the first kept if
    ``kept``), events, the best adapters and the report, then ``succeeded``."""
    store, artifacts = api.store, api.artifacts
    store.transition(job_id, JobStatus.running)
    owner = "test"
    adapter_path = str(artifacts.local_path(f"{job_id}/epoch-1/adapters/query"))
    for epoch, stage in [(0, Stage.baseline), (1, Stage.rollout), (1, Stage.evaluate)]:
        key = f"{job_id}/epoch-{epoch}/{stage.value}.json"
        traces = [
            {
                "trace_id": f"t{i}",
                "example_id": f"train-{i}",
                "inputs": {"question": f"what is the color of k{i}?"},
                "expected": ["red"],
                "spans": [
                    {
                        "span_id": "query",
                        "component": "query",
                        "kind": "llm",
                        "writes": "query",
                        "inputs": {"question": "q"},
                        "output": "color of k",
                        "model": str(api.settings.work_dir() / "models" / "tiny"),
                        "adapter": adapter_path if stage != Stage.baseline else None,
                    }
                ],
                "output": "red",
                "score": float(i % 2),
                "passed": bool(i % 2),
            }
            for i in range(3)
        ]
        output: dict[str, Any] = {"score": 0.5, "traces": traces}
        if stage == Stage.evaluate:
            output["kept"] = kept
        # stored as the loop stores it: through the stage's typed output
        artifacts.put_json(
            key, stage_output_model(stage).model_validate(output).model_dump(mode="json")
        )
        assert store.claim_stage(job_id, epoch, stage, owner, 60)
        record = StageRecord(epoch=epoch, stage=stage, seconds=1.5, trained_tokens=7)
        assert store.finish_stage(job_id, epoch, stage, owner, record, key)
    for epoch in (1, 2):
        store.save_epoch(
            job_id,
            EpochRecord(
                epoch=epoch,
                train_score=0.5,
                val_score=0.6 if epoch == 1 else 0.4,
                kept=kept and epoch == 1,
                components=[
                    ComponentEpochRecord(
                        epoch=epoch,
                        component="query",
                        trained=True,
                        samples=8,
                        sft_losses=[1.0, 0.5],
                        adapter=f"{job_id}/epoch-{epoch}/adapters/query",
                    )
                ],
            ),
        )
    adapters = {}
    if kept:
        for component in ("query", "answer"):
            key = f"{job_id}/result/adapters/{component}"
            write_adapter(artifacts, key)
            adapters[component] = key
    for i in range(5):
        store.add_event(job_id, Event(message=f"step {i}", created_at=time.time()))
    report = JobReport(
        job_name="tiny-kb",
        status="succeeded",
        base_val_score=0.5,
        best_epoch=1 if kept else None,
        best_val_score=0.6 if kept else 0.5,
        stages=store.stages(job_id),
        epochs=store.epochs(job_id),
        adapters=adapters,
    )
    store.set_result(job_id, report.model_dump(mode="json"))
    store.transition(job_id, JobStatus.succeeded)


@pytest.fixture(scope="module")
def done_job(api: Api, tiny_files: dict[str, str]) -> str:
    job = submit(api, tiny_job_spec(tiny_files))
    finish(api, job["id"])
    return str(job["id"])


# --------------------------------------------------------------------------- uploads


def test_upload_is_checked_listed_downloaded_and_deleted(api: Api) -> None:
    rows = b'{"question": "q1", "expected": "a"}\n\n{"question": "q2", "expected": ["b", "c"]}\n'
    response = api.upload("../../etc/train.jsonl", rows)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "file" and body["purpose"] == "data" and body["bytes"] == len(rows)
    assert body["filename"] == "train.jsonl"  # no folder part of the client's name is kept
    assert body["rows"] == 2 and body["fields"] == {"question": 2, "expected": 2}
    file_id = body["id"]

    csv = api.upload("val.csv", b"question,expected\nq1,a\nq2,\n")
    assert csv.status_code == 200 and csv.json()["fields"] == {"question": 2, "expected": 1}

    listed = api.request("GET", "/v1/files?purpose=data&limit=1", headers=api.acme).json()
    assert listed["object"] == "list" and listed["has_more"] is True and len(listed["data"]) == 1
    after = listed["data"][0]["id"]
    rest = api.request("GET", f"/v1/files?purpose=data&after={after}", headers=api.acme).json()
    assert file_id in [f["id"] for f in rest["data"]]

    content = api.request("GET", f"/v1/files/{file_id}/content", headers=api.acme)
    assert content.status_code == 200 and content.content == rows
    assert api.request("GET", f"/v1/files/{file_id}", headers=api.acme).json()["id"] == file_id
    deleted = api.request("DELETE", f"/v1/files/{file_id}", headers=api.acme)
    assert deleted.json() == {"id": file_id, "object": "file", "deleted": True}
    assert api.request("GET", f"/v1/files/{file_id}", headers=api.acme).status_code == 404


@pytest.mark.parametrize(
    ("name", "content", "purpose", "line", "param"),
    [
        (
            "a.jsonl",
            b'{"question": "q"}\n{"question": "x", "expected": 3}\n',
            "data",
            2,
            "line 2.expected",
        ),
        ("a.jsonl", b'{"question": "q"}\n{"id": "1"}\n{"id": "1"}\n', "data", 3, "line 3.id"),
        ("a.jsonl", b'{"question": "q"}\n{"question": "q",\n', "data", 2, "line 2"),
        ("a.jsonl", b'{"question": "q"}\n[1, 2]\n', "data", 2, "line 2"),
        ("a.jsonl", b'{"question": "q"}\n{"question": "\xff"}\n', "data", 2, "line 2"),
        ("a.jsonl", b'{"id": "p1", "text": "t"}\n{"id": "p2"}\n', "corpus", 2, "line 2.text"),
        ("a.jsonl", b'{"id": "p1", "text": "t", "title": 5}\n', "corpus", 1, "line 1.title"),
        ("a.jsonl", b'{"q": "' + b"x" * 5000 + b'"}\n', "data", 1, "line 1"),
        # valid JSON escapes that are not text: a lone surrogate, a NUL (PostgreSQL refuses it)
        ("a.jsonl", b'{"question": "q"}\n{"question": "a\\ud800"}\n', "data", 2, "line 2.question"),
        ("a.jsonl", b'{"id": "p1", "text": "t\\u0000"}\n', "corpus", 1, "line 1.text"),
        # nested past the decoder's recursion limit, and decodable but past MAX_JSON_DEPTH
        ("a.jsonl", b'{"q": ' + b"[" * 2000 + b"]" * 2000 + b"}\n", "data", 1, "line 1"),
        ("a.jsonl", b'{"q": ' + b"[" * 40 + b"]" * 40 + b"}\n", "data", 1, "line 1.q" + ".0" * 32),
    ],
)
def test_a_bad_upload_names_its_line_and_field(
    api: Api, name: str, content: bytes, purpose: str, line: int, param: str
) -> None:
    response = api.upload(name, content, purpose)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_file"
    assert f"line {line}" in error["message"] and error["message"].startswith(name)
    assert error["param"] == param


def test_an_oversize_upload_answers_413(api: Api) -> None:
    big = b'{"question": "q"}\n' * (MAX_UPLOAD // 18 + 10)
    response = api.upload("big.jsonl", big)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "file_too_large"
    # Streamed without a Content-Length: counted while it is read.
    chunks = iter([big[i : i + 8192] for i in range(0, len(big), 8192)])
    boundary = "cotuneboundary"
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\ndata\r\n'.encode(),
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="b.jsonl"\r\n'
        "Content-Type: application/jsonl\r\n\r\n".encode(),
        *chunks,
        f"\r\n--{boundary}--\r\n".encode(),
    ]
    streamed = api.client.post(
        "/v1/files",
        content=iter(parts),
        headers={**api.acme, "Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    assert streamed.status_code == 413, streamed.text


def test_storage_per_tenant_is_limited(api: Api) -> None:
    rows = b'{"question": "q"}\n' * 20
    used = api.accounts.storage_used("globex")
    api.accounts.set_limits("globex", max_storage_bytes=used + len(rows) + 10)
    try:
        first = api.upload("a.jsonl", rows, headers=api.globex)
        assert first.status_code == 200, first.text
        assert api.accounts.storage_used("globex") == used + len(rows)
        second = api.upload("b.jsonl", rows, headers=api.globex)
        assert second.status_code == 413
        assert second.json()["error"]["code"] == "storage_quota_exceeded"
        api.request("DELETE", f"/v1/files/{first.json()['id']}", headers=api.globex)
        assert api.upload("b.jsonl", rows, headers=api.globex).status_code == 200
    finally:
        api.accounts.set_limits("globex")


# --------------------------------------------------------------------------- auth and tenants


def _routes_with_ids(api: Api) -> list[tuple[str, str]]:
    found = []
    for route in api.app.routes:
        if isinstance(route, APIRoute) and "{" in route.path:
            for method in sorted(route.methods - {"HEAD"}):
                found.append((method, route.path))
    return found


def test_every_route_needs_a_live_key(api: Api, done_job: str) -> None:
    key_id, plaintext = api.accounts.create_key("acme", name="revoked soon")
    revoked = {"Authorization": f"Bearer {plaintext}"}
    assert api.request("GET", "/v1/jobs", headers=revoked).status_code == 200
    assert api.accounts.revoke_key(key_id)
    assert key_id in [k.id for k in api.accounts.list_keys("acme") if not k.active]
    routes = [
        (m, r.path)
        for r in api.app.routes
        if isinstance(r, APIRoute) and r.path.startswith("/v1/")
        for m in sorted(r.methods - {"HEAD"})
    ]
    assert len(routes) > 20
    wrong = {"Authorization": f"Bearer {plaintext[:-2]}xx"}
    for headers in ({}, revoked, wrong, {"Authorization": "Bearer nonsense"}):
        for method, path in routes:
            url = path.replace("{job_id}", done_job).replace("{file_id}", "file-x")
            url = url.replace("{component}", "query")
            response = api.request(method, url, headers=headers)
            assert response.status_code == 401, (method, url, headers, response.text)
            assert response.json()["error"]["code"] in ("missing_api_key", "invalid_api_key")


def test_keys_are_stored_hashed(api: Api) -> None:
    key_id, plaintext = api.accounts.create_key("acme")
    with api.store.engine.connect() as conn:
        row = (
            conn.execute(text("SELECT * FROM api_keys WHERE id = :id"), {"id": key_id})
            .mappings()
            .one()
        )
    assert plaintext not in json.dumps({k: str(v) for k, v in row.items()})
    assert plaintext.split("_", 2)[2] not in str(dict(row))
    assert api.accounts.verify_key(plaintext) == "acme"
    assert api.accounts.verify_key(plaintext + "x") is None


def test_another_tenants_ids_answer_404_on_every_route(
    api: Api, done_job: str, tiny_files: dict[str, str]
) -> None:
    routes = _routes_with_ids(api)
    assert len(routes) == 23  # files 3, jobs 10 under each of the two prefixes
    for method, path in routes:
        url = path.replace("{job_id}", done_job).replace("{file_id}", tiny_files["train"])
        url = url.replace("{component}", "query")
        response = api.request(method, url, headers=api.globex)
        assert response.status_code == 404, (method, url, response.text)
        assert response.json()["error"]["code"] == "not_found"
        assert done_job in response.text or tiny_files["train"] in response.text
    # Lists show nothing of acme's; a cursor of acme's is unknown to globex.
    theirs = api.request("GET", "/v1/jobs?limit=100", headers=api.globex).json()["data"]
    assert done_job not in [j["id"] for j in theirs]
    theirs = api.request("GET", "/v1/files?limit=100", headers=api.globex).json()["data"]
    assert not set(tiny_files.values()) & {f["id"] for f in theirs}
    assert api.request("GET", f"/v1/jobs?after={done_job}", headers=api.globex).status_code == 404
    # A spec naming acme's files is refused for globex as if they did not exist.
    response = api.request("POST", "/v1/jobs", json=tiny_job_spec(tiny_files), headers=api.globex)
    error = response.json()["error"]
    assert response.status_code == 422 and error["param"] == "system.components.search.args.corpus"
    assert "you have no file" in error["message"]


# --------------------------------------------------------------------------- specs


def _mutate(files: dict[str, str], how: str) -> dict[str, Any]:
    spec = tiny_job_spec(files)
    system = spec["system"]
    if how == "data path":
        spec["data"]["train"] = "/srv/data/train.jsonl"
    elif how == "data url":
        spec["data"]["val"] = "https://example.com/val.jsonl"
    elif how == "corpus path":
        system["components"][1]["args"]["corpus"] = "corpus.jsonl"
    elif how == "corpus purpose":
        system["components"][1]["args"]["corpus"] = files["train"]
    elif how == "data purpose":
        spec["data"]["train"] = files["corpus"]
    elif how == "model path":
        system["models"]["tiny"] = {"path": "/models/tiny"}
    elif how == "model name":
        system["models"]["tiny"] = {"name": "gpt-17"}
    elif how == "system path":
        spec["system"] = "/etc/cotune/system.yaml"
    elif how == "judge url":
        spec["judge"] = {"model": "judge-large", "engine": "openai", "url": "http://10.0.0.1/v1"}
    elif how == "judge env":
        spec["judge"] = {"model": "hosted-judge", "api_key_env": "AWS_SECRET_ACCESS_KEY"}
    elif how == "judge unknown":
        spec["judge"] = {"model": "somebody-elses-judge"}
    elif how == "search host":
        system["components"][1] = {
            "name": "search",
            "kind": "tool",
            "tool": "http_search",
            "reads": ["query"],
            "writes": "passages",
            "args": {"url": "http://169.254.169.254/latest/meta-data"},
        }
    elif how == "missing field":
        system["inputs"] = ["question", "context"]
        system["components"][0]["reads"] = ["question", "context"]
    elif how == "bad loop":
        spec["loop"]["epochs"] = 0
    return spec


@pytest.mark.parametrize(
    ("how", "param"),
    [
        ("data path", "data.train"),
        ("data url", "data.val"),
        ("corpus path", "system.components.search.args.corpus"),
        ("corpus purpose", "system.components.search.args.corpus"),
        ("data purpose", "data.train"),
        ("model path", "system.models.tiny.path"),
        ("model name", "system.models.tiny.name"),
        ("system path", "system"),
        ("judge url", "judge.url"),
        ("judge env", "judge.api_key_env"),
        ("judge unknown", "judge.model"),
        ("search host", "system.components.search.args.url"),
        ("missing field", "data.train"),
        ("bad loop", "loop.epochs"),
    ],
)
def test_a_spec_naming_server_things_answers_422(
    api: Api, tiny_files: dict[str, str], how: str, param: str
) -> None:
    before = len(api.dispatcher.dispatched)
    for url in ("/v1/jobs", "/v1/jobs/quote"):
        response = api.request("POST", url, json=_mutate(tiny_files, how), headers=api.acme)
        assert response.status_code == 422, (how, response.text)
        error = response.json()["error"]
        assert error["code"] == "invalid_spec" and error["param"] == param, error
    assert len(api.dispatcher.dispatched) == before
    if how == "missing field":
        assert tiny_files["train"] in error["message"] and "'context'" in error["message"]


def _raw_spec(files: dict[str, str], where: str, escaped: str) -> bytes:
    """A job spec as JSON text with ``escaped`` (a JSON escape such as ``\\ud800``) spliced into
    one string: the client sent it that way, Python's json would have refused to write it."""
    spec = tiny_job_spec(files)
    marker = "SPLICE-HERE"
    if where == "system.name":
        spec["system"]["name"] = f"kb{marker}"
    elif where == "system.components.2.prompt":
        spec["system"]["components"][2]["prompt"] += marker
    elif where == "loop.<key>":
        spec["loop"][f"k{marker}"] = 1
    return json.dumps(spec).replace(marker, escaped).encode()


@pytest.mark.parametrize(
    ("where", "escaped", "what"),
    [
        ("system.name", "\\ud800", "lone surrogate \\ud800"),
        ("system.components.2.prompt", "\\udfff", "lone surrogate \\udfff"),
        ("system.name", "\\u0000", "NUL character"),
        ("loop.<key>", "\\ud800", "a field name"),
    ],
)
def test_a_spec_with_text_that_cannot_be_stored_answers_422_and_writes_nothing(
    api: Api, tiny_files: dict[str, str], where: str, escaped: str, what: str
) -> None:
    """Finding 1 of the probe: one lone surrogate made POST /v1/jobs answer 500 after it had
    created and dispatched the job, and broke the tenant's job list for good."""
    jobs_before = api.store.count_jobs("acme", list(JobStatus))
    dispatched = len(api.dispatcher.dispatched)
    body = _raw_spec(tiny_files, where, escaped)
    headers = {**api.acme, "content-type": "application/json"}
    for url in ("/v1/jobs", "/v1/jobs/quote", "/v1/fine_tuning/jobs"):
        response = api.request("POST", url, content=body, headers=headers)
        assert response.status_code == 422, (url, response.text)
        error = response.json()["error"]
        param = where.removesuffix(".<key>")
        assert error["code"] == "invalid_spec" and error["param"] == param, error
        assert what in error["message"], error
    assert api.store.count_jobs("acme", list(JobStatus)) == jobs_before
    assert len(api.dispatcher.dispatched) == dispatched
    assert api.request("GET", "/v1/jobs?limit=100", headers=api.acme).status_code == 200


def test_a_spec_nested_too_deeply_answers_422(api: Api, tiny_files: dict[str, str]) -> None:
    """A spec 600 levels deep reached copy.deepcopy and Python's recursion limit (a 500)."""
    body = json.dumps(tiny_job_spec(tiny_files)).replace(
        '"loop": {', '"loop": {"deep": ' + "[" * 600 + "]" * 600 + ", ", 1
    )
    for url in ("/v1/jobs", "/v1/jobs/quote"):
        response = api.request(
            "POST", url, content=body, headers={**api.acme, "content-type": "application/json"}
        )
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["param"].startswith("loop.deep.0") and "deeper than" in error["message"]


@pytest.mark.parametrize(
    ("path", "headers", "status", "param"),
    [
        ("/v1/jobs/job-%00", {}, 404, None),
        ("/v1/fine_tuning/jobs/%00/events", {}, 404, None),
        ("/v1/files/file-%00x", {}, 404, None),
        ("/v1/jobs?after=job-%00", {}, 404, "after"),
        ("/v1/jobs?after=job-nope", {}, 404, "after"),  # finding 10: param was null
        ("/v1/files?after=%00", {}, 404, "after"),
        ("/v1/jobs/{done}/events?after=ftevent-%00", {}, 422, "after"),
        ("/v1/jobs/{done}/events?after=ftevent-%C2%B2", {}, 422, "after"),  # "²" isdigit()
        ("/v1/jobs/{done}/events?after=ftevent-99999999999999999999999", {}, 422, "after"),
        ("/v1/jobs/{done}/events", {"Last-Event-ID": "ftevent-99999999999999999999"}, 422, None),
        ("/v1/jobs/{done}/events", {"Last-Event-ID": ""}, 200, None),  # an EventSource's first
    ],
)
def test_ids_and_cursors_that_match_nothing_answer_4xx_not_500(
    api: Api, done_job: str, path: str, headers: dict[str, str], status: int, param: str | None
) -> None:
    """Finding 4 of the probe: a NUL reached PostgreSQL (500), "²" reached int() (500), a
    cursor past bigint reached the database (500; as Last-Event-ID the stream died)."""
    response = api.request("GET", path.format(done=done_job), headers={**api.acme, **headers})
    assert response.status_code == status, response.text
    if status == 422:
        expected = param or "Last-Event-ID"
        assert response.json()["error"]["param"] == expected, response.text
    elif status == 404:
        assert response.json()["error"]["param"] == param, response.text


def test_a_body_that_is_not_json_names_the_body(api: Api) -> None:
    """Finding 10: the error's param was the character offset ("11")."""
    response = api.request(
        "POST",
        "/v1/jobs",
        content=b'{"system": {nope',
        headers={**api.acme, "content-type": "application/json"},
    )
    assert response.status_code == 422, response.text
    assert response.json()["error"]["param"] == "body"


def test_a_database_error_does_not_carry_the_values_it_was_given(api: Api) -> None:
    """Finding 9: a 256-character name's error was logged with the whole spec (SQL
    parameters); a secret in a spec would have landed in the log. (Short, so that SQLAlchemy's
    own truncation of long values would not hide it.)"""
    secret = f"sk-{uuid.uuid4().hex[:8]}"
    with pytest.raises(Exception) as raised:
        api.store.create_job("n" * 300, {"key": secret}, tenant_id="acme")
    assert "value too long" in str(raised.value) and secret not in str(raised.value)


def test_an_allowed_search_host_and_a_hosted_judge_are_accepted(
    api: Api, tiny_files: dict[str, str]
) -> None:
    spec = _mutate(tiny_files, "search host")
    spec["system"]["components"][1]["args"]["url"] = "https://search.example.com/q"
    spec["judge"] = {"model": "hosted-judge"}
    quote = api.request("POST", "/v1/jobs/quote", json=spec, headers=api.acme)
    assert quote.status_code == 200, quote.text
    body = quote.json()
    assert body["object"] == "job.quote" and body["examples"] == {"train": 12, "val": 6, "test": 6}
    assert body["total"]["judge_calls"] > 0


# --------------------------------------------------------------------------- jobs


def test_idempotency_key_creates_one_job(api: Api, tiny_files: dict[str, str]) -> None:
    spec = tiny_job_spec(tiny_files)
    key = f"idem-{uuid.uuid4().hex}"
    first = submit(api, spec, headers={**api.acme, "Idempotency-Key": key})
    assert first["status"] == "queued"  # validating_files, then queued by the dispatcher
    second = submit(api, spec, headers={**api.acme, "Idempotency-Key": key})
    assert second["id"] == first["id"]
    assert api.dispatcher.dispatched.count(first["id"]) == 1
    with api.store.engine.connect() as conn:
        count = conn.execute(
            text("SELECT count(*) FROM jobs WHERE idempotency_key = :k"), {"k": key}
        ).scalar()
    assert count == 1
    other = dict(spec, loop={"epochs": 2})
    reused = api.request(
        "POST", "/v1/jobs", json=other, headers={**api.acme, "Idempotency-Key": key}
    )
    assert reused.status_code == 409 and reused.json()["error"]["code"] == "idempotency_key_reused"
    # Another tenant's same key is its own.
    files = {
        n: api.upload(f"{n}.jsonl", api.artifacts.get_bytes(_key(api, i)), p, api.globex).json()[
            "id"
        ]
        for n, i, p in [
            ("train", tiny_files["train"], "data"),
            ("val", tiny_files["val"], "data"),
            ("test", tiny_files["test"], "data"),
            ("corpus", tiny_files["corpus"], "corpus"),
        ]
    }
    theirs = submit(api, tiny_job_spec(files), headers={**api.globex, "Idempotency-Key": key})
    assert theirs["id"] != first["id"] and theirs["organization_id"] == "globex"
    # Files too.
    a = api.upload("x.jsonl", b'{"question": "q"}\n', headers={**api.acme, "Idempotency-Key": key})
    b = api.upload("x.jsonl", b'{"question": "q"}\n', headers={**api.acme, "Idempotency-Key": key})
    assert a.status_code == 200 and a.json()["id"] == b.json()["id"]


def _key(api: Api, file_id: str) -> str:
    record = api.accounts.get_file(file_id)
    assert record is not None
    return record.key


def test_cancel_delete_and_illegal_transitions(
    api: Api, tiny_files: dict[str, str], done_job: str
) -> None:
    job = submit(api, tiny_job_spec(tiny_files))
    refused = api.request("DELETE", f"/v1/jobs/{job['id']}", headers=api.acme)
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "job_not_finished"
    in_use = api.request("DELETE", f"/v1/files/{tiny_files['corpus']}", headers=api.acme)
    assert in_use.status_code == 409 and in_use.json()["error"]["code"] == "file_in_use"
    cancelled = api.request("POST", f"/v1/jobs/{job['id']}/cancel", headers=api.acme)
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"

    conflict = api.request("POST", f"/v1/jobs/{done_job}/cancel", headers=api.acme)
    assert conflict.status_code == 409
    assert conflict.json()["error"]["code"] == "illegal_transition"
    assert "succeeded" in conflict.json()["error"]["message"]

    gone = submit(api, tiny_job_spec(tiny_files))
    finish(api, gone["id"])
    assert api.artifacts.list(gone["id"])
    deleted = api.request("DELETE", f"/v1/fine_tuning/jobs/{gone['id']}", headers=api.acme)
    assert deleted.json() == {"id": gone["id"], "object": "fine_tuning.job", "deleted": True}
    assert api.request("GET", f"/v1/jobs/{gone['id']}", headers=api.acme).status_code == 404
    assert api.artifacts.list(gone["id"]) == []


def test_running_jobs_per_tenant_are_limited(api: Api, tiny_files: dict[str, str]) -> None:
    api.accounts.set_limits("acme", max_running_jobs=1)
    try:
        with api.store.engine.begin() as conn:
            active = conn.execute(
                text(
                    "SELECT count(*) FROM jobs WHERE tenant_id = 'acme' AND status IN "
                    "('validating_files', 'queued', 'running')"
                )
            ).scalar()
        if not active:
            submit(api, tiny_job_spec(tiny_files))
        response = api.request("POST", "/v1/jobs", json=tiny_job_spec(tiny_files), headers=api.acme)
        assert response.status_code == 429 and response.json()["error"]["code"] == "too_many_jobs"
    finally:
        api.accounts.set_limits("acme")
        for job in api.request("GET", "/v1/jobs?limit=100", headers=api.acme).json()["data"]:
            if job["status"] in ("queued", "validating_files"):
                api.request("POST", f"/v1/jobs/{job['id']}/cancel", headers=api.acme)


def test_job_views_of_a_finished_job(api: Api, done_job: str) -> None:
    job = api.request("GET", f"/v1/jobs/{done_job}", headers=api.acme).json()
    assert job["object"] == "fine_tuning.job" and job["status"] == "succeeded"
    assert job["model"] == "tiny" and job["organization_id"] == "acme"
    assert job["fine_tuned_model"] == f"tiny-kb:{done_job}" and job["trained_tokens"] == 21
    assert job["result"]["best_epoch"] == 1 and job["finished_at"] >= job["created_at"]

    checkpoints = api.request("GET", f"/v1/jobs/{done_job}/checkpoints", headers=api.acme).json()
    assert [c["step_number"] for c in checkpoints["data"]] == [1]  # only the kept epoch
    assert checkpoints["data"][0]["metrics"]["val_score"] == 0.6
    assert checkpoints["data"][0]["metrics"]["train_loss"] == 0.5

    metrics = api.request("GET", f"/v1/jobs/{done_job}/metrics", headers=api.acme).json()
    assert metrics["best_epoch"] == 1 and [e["epoch"] for e in metrics["epochs"]] == [1, 2]
    assert metrics["cost"]["seconds"] == 4.5
    assert metrics["adapters"]["query"] == f"/v1/jobs/{done_job}/adapters/query"

    components = api.request("GET", f"/v1/jobs/{done_job}/components", headers=api.acme).json()
    by_name = {c["name"]: c for c in components["data"]}
    assert by_name["search"]["kind"] == "tool" and not by_name["search"]["trainable"]
    assert by_name["query"]["model"] == "tiny" and len(by_name["query"]["epochs"]) == 2

    first = api.request("GET", f"/v1/jobs/{done_job}/traces?limit=4", headers=api.acme).json()
    assert first["has_more"] and [t["stage"] for t in first["data"]] == ["baseline"] * 3 + [
        "rollout"
    ]
    rest = api.request(
        "GET", f"/v1/jobs/{done_job}/traces?limit=50&after={first['last_id']}", headers=api.acme
    ).json()
    assert len(rest["data"]) == 5 and not rest["has_more"]
    assert (
        len(
            api.request(
                "GET", f"/v1/jobs/{done_job}/traces?stage=rollout&passed=true", headers=api.acme
            ).json()["data"]
        )
        == 1
    )
    span = rest["data"][0]["spans"][0]
    assert span["model"] == "tiny" and span["adapter"] == "epoch-1/adapters/query"
    for text_ in (json.dumps(first), json.dumps(rest)):
        assert api.settings.artifacts not in text_ and str(api.settings.work_dir()) not in text_


def test_events_list_and_stream(api: Api, done_job: str, tiny_files: dict[str, str]) -> None:
    page = api.request("GET", f"/v1/jobs/{done_job}/events?limit=3", headers=api.acme).json()
    assert page["has_more"] and len(page["data"]) == 3
    assert page["data"][0]["object"] == "fine_tuning.job.event"
    rest = api.request(
        "GET", f"/v1/jobs/{done_job}/events?after={page['last_id']}&limit=100", headers=api.acme
    ).json()
    assert rest["data"][-1]["message"] == "step 4"

    with api.client.stream(
        "GET", f"/v1/jobs/{done_job}/events?stream=true", headers=api.acme
    ) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        body = "".join(stream.iter_text())
    assert body.count("event: event\n") == len(page["data"]) + len(rest["data"])
    assert body.rstrip().endswith('data: {"status": "succeeded", "id": "' + done_job + '"}')

    # A live job: the stream follows it until it is terminal.
    job = submit(api, tiny_job_spec(tiny_files))

    def later() -> None:
        time.sleep(0.3)
        api.store.add_event(job["id"], Event(message="late news", created_at=time.time()))
        api.request("POST", f"/v1/jobs/{job['id']}/cancel", headers=api.acme)

    threading.Thread(target=later).start()
    with api.client.stream(
        "GET", f"/v1/fine_tuning/jobs/{job['id']}/events?stream=true", headers=api.acme
    ) as stream:
        body = "".join(stream.iter_text())
    assert "late news" in body and '"status": "cancelled"' in body


def test_adapter_and_bundle_downloads(api: Api, done_job: str, tiny_files: dict[str, str]) -> None:
    response = api.request("GET", f"/v1/jobs/{done_job}/adapters/query", headers=api.acme)
    assert response.status_code == 200 and response.headers["content-type"] == "application/gzip"
    with tarfile.open(fileobj=io.BytesIO(response.content)) as tar:
        assert sorted(tar.getnames()) == [
            "query/adapter_config.json",
            "query/adapter_model.safetensors",
        ]
    missing = api.request("GET", f"/v1/jobs/{done_job}/adapters/search", headers=api.acme)
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "component"

    bundle = api.request("GET", f"/v1/jobs/{done_job}/bundle", headers=api.acme)
    assert bundle.status_code == 200, bundle.text
    with tarfile.open(fileobj=io.BytesIO(bundle.content)) as tar:
        names = tar.getnames()
        manifest = json.loads(
            tar.extractfile(next(n for n in names if n.endswith("/manifest.json"))).read()  # type: ignore[union-attr]
        )
    assert any(n.endswith("adapters/answer/adapter_model.safetensors") for n in names)
    assert manifest["base_models"]["tiny"]["kind"] == "registry"

    base_only = submit(api, tiny_job_spec(tiny_files))
    finish(api, base_only["id"], kept=False)
    for route in ("adapters/query", "bundle"):
        response = api.request("GET", f"/v1/jobs/{base_only['id']}/{route}", headers=api.acme)
        assert response.status_code == 404 and response.json()["error"]["code"] == "no_adapter"
        assert "no epoch beat the base system" in response.json()["error"]["message"]
    running = submit(api, tiny_job_spec(tiny_files))
    response = api.request("GET", f"/v1/jobs/{running['id']}/adapters/query", headers=api.acme)
    assert response.status_code == 409
    api.request("POST", f"/v1/jobs/{running['id']}/cancel", headers=api.acme)


# --------------------------------------------------------------------------- the openai SDK


@pytest.fixture(scope="module")
def server(api: Api) -> Iterator[str]:
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = uvicorn.Config(
        api.app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"
    )
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not uv.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    uv.should_exit = True
    thread.join(5)


def test_the_openai_sdk_lists_retrieves_and_cancels(
    api: Api, server: str, done_job: str, tiny_files: dict[str, str]
) -> None:
    import openai
    from openai.types.fine_tuning import FineTuningJob, FineTuningJobEvent
    from openai.types.fine_tuning.jobs import FineTuningJobCheckpoint

    client = openai.OpenAI(base_url=f"{server}/v1", api_key=api.acme_key, max_retries=0)
    queued = submit(api, tiny_job_spec(tiny_files))["id"]

    jobs = list(client.fine_tuning.jobs.list(limit=2))  # pages through with `after`
    ids = [j.id for j in jobs]
    assert done_job in ids and queued in ids and len(ids) == len(set(ids))
    assert all(isinstance(j, FineTuningJob) for j in jobs)

    job = client.fine_tuning.jobs.retrieve(done_job)
    assert job.status == "succeeded" and job.organization_id == "acme"
    assert job.hyperparameters.n_epochs == 1 and job.training_file == tiny_files["train"]
    assert job.created_at > 0 and job.seed == 0

    events = list(client.fine_tuning.jobs.list_events(done_job, limit=2))
    assert [e.message for e in events][-5:] == [f"step {i}" for i in range(5)]
    assert all(isinstance(e, FineTuningJobEvent) and e.level == "info" for e in events)

    checkpoints = list(client.fine_tuning.jobs.checkpoints.list(done_job))
    assert len(checkpoints) == 1 and isinstance(checkpoints[0], FineTuningJobCheckpoint)
    assert checkpoints[0].step_number == 1 and checkpoints[0].fine_tuning_job_id == done_job
    assert checkpoints[0].metrics.train_loss == 0.5

    cancelled = client.fine_tuning.jobs.cancel(queued)
    assert cancelled.status == "cancelled"
    with pytest.raises(openai.ConflictError) as conflict:
        client.fine_tuning.jobs.cancel(done_job)
    assert conflict.value.code == "illegal_transition"

    other = openai.OpenAI(base_url=f"{server}/v1", api_key="ct_0000", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        other.fine_tuning.jobs.list()


def test_the_openai_sdk_creates_a_compound_job_through_extra_body(
    api: Api, server: str, tiny_files: dict[str, str]
) -> None:
    """A system goes in ``extra_body``; OpenAI's fields fill the spec's data and seed, or
    must agree with them (422 naming the OpenAI field otherwise)."""
    import openai

    client = openai.OpenAI(base_url=f"{server}/v1", api_key=api.acme_key, max_retries=0)
    spec = tiny_job_spec(tiny_files)
    data = spec.pop("data")
    job = client.fine_tuning.jobs.create(
        model="tiny",
        training_file=data["train"],
        validation_file=data["val"],
        seed=5,
        extra_body={**spec, "data": {"test": data["test"]}},
    )
    assert job.training_file == data["train"] and job.validation_file == data["val"]
    assert job.seed == 5 and job.model == "tiny"
    stored = api.store.get_job(job.id).spec
    assert stored["data"] == data and stored["loop"]["seed"] == 5 and "model" not in stored
    client.fine_tuning.jobs.cancel(job.id)
    for given, param in [
        ({"model": "smollm2-135m"}, "model"),
        ({"training_file": tiny_files["val"]}, "training_file"),
        ({"hyperparameters": {"n_epochs": 2}}, "hyperparameters"),
        ({"suffix": "x"}, "suffix"),
    ]:
        body = {"model": "tiny", "training_file": data["train"], **given}
        with pytest.raises(openai.UnprocessableEntityError) as refused:
            client.fine_tuning.jobs.create(**body, extra_body={**spec, "data": data})
        assert refused.value.param == param, refused.value.message


# --------------------------------------------------------------------------- secrets and ops


def test_a_hosted_judges_key_never_leaves_the_server(
    api: Api, tiny_files: dict[str, str], caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    assert os.environ[JUDGE_ENV] == SECRET
    with caplog.at_level(logging.DEBUG), caplog.at_level(logging.DEBUG, logger="cotune"):
        spec = tiny_job_spec(tiny_files, judge={"model": "hosted-judge"})
        job = submit(api, spec, headers={**api.acme, "Idempotency-Key": "judge-job"})
        job_id = job["id"]
        for method, url in [
            ("GET", f"/v1/jobs/{job_id}"),
            ("GET", "/v1/jobs"),
            ("GET", f"/v1/fine_tuning/jobs/{job_id}/events"),
            ("GET", f"/v1/jobs/{job_id}/metrics"),
            ("GET", f"/v1/jobs/{job_id}/components"),
            ("GET", "/v1/models"),
            ("GET", "/openapi.json"),
            ("GET", "/metrics"),
            ("GET", "/readyz"),
        ]:
            assert api.request(method, url, headers=api.acme).status_code == 200, url
        api.request("POST", "/v1/jobs/quote", json=spec, headers=api.acme)
        api.request(
            "POST",
            "/v1/jobs",
            json=dict(spec, judge={"model": "hosted-judge", "api_key_env": JUDGE_ENV}),
            headers=api.acme,
        )
        # What a worker runs: the judge expanded server-side, its key still only named.
        record = api.store.get_job(job_id)
        assert record is not None
        runnable = materialize(
            job_id, record.spec, "acme", api.accounts, api.artifacts, api.settings, tmp_path / "m"
        )
        assert runnable.judge is not None and runnable.judge.api_key_env == JUDGE_ENV
        assert runnable.judge.url == "https://judge.example.com/v1"
        assert (
            runnable.data_path("train") == tmp_path / "m" / "files" / f"{tiny_files['train']}.jsonl"
        )
        written = (tmp_path / "m" / "job.json").read_text()
        api.request("POST", f"/v1/jobs/{job_id}/cancel", headers=api.acme)
    assert SECRET not in written
    assert caplog.records, "the API logs requests"
    for line in caplog.records:
        assert SECRET not in line.getMessage() and SECRET not in str(line.__dict__)
    assert SECRET not in caplog.text
    for body in api.responses:
        assert SECRET not in body
        assert "judge.example.com" not in body  # the hosted judge's URL is not echoed either
    logged = [r for r in caplog.records if getattr(r, "job_id", None) == job_id]
    assert logged, "log lines carry the job id"
    models = api.request("GET", "/v1/models", headers=api.acme).json()["data"]
    assert {"id": "hosted-judge", "kind": "judge"}.items() <= next(
        m for m in models if m["id"] == "hosted-judge"
    ).items()


def test_ops_routes(api: Api, done_job: str) -> None:
    assert api.request("GET", "/healthz").json() == {"status": "ok", "checks": {}}
    ready = api.request("GET", "/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"database": "ok", "broker": "skipped"}
    metrics = api.request("GET", "/metrics").text
    assert 'cotune_jobs{status="succeeded"}' in metrics
    assert "cotune_queue_depth" in metrics and "cotune_http_requests_total" in metrics
    assert api.request("GET", "/docs").status_code == 200
    paths = api.request("GET", "/openapi.json").json()["paths"]
    assert "/v1/fine_tuning/jobs/{job_id}/checkpoints" in paths and "/v1/files" in paths


def test_readyz_reports_an_unreachable_broker(settings: Settings) -> None:
    broken = settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"})
    app = create_app(broken, dispatcher=RecordingDispatcher())
    with TestClient(app) as client:
        response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["checks"]["broker"].startswith("unreachable")
    assert "127.0.0.1:1" not in response.text


def test_readyz_is_unavailable_while_no_worker_reads_the_queues(settings: Settings) -> None:
    """Finding 9: /readyz said ready with a broker nobody consumed from. The broker here is
    the machine's real Redis, under a key prefix no worker of this run listens on."""
    from services.api.dispatch import CeleryDispatcher

    lonely = settings.model_copy(
        update={
            "broker_url": "redis://127.0.0.1:6379/0",
            "broker_key_prefix": f"cotune-readyz-{uuid.uuid4().hex[:8]}:",
        }
    )
    dispatcher = CeleryDispatcher(lonely)
    assert dispatcher.consumers() == {"gpu": 0, "cpu": 0}
    app = create_app(lonely, dispatcher=dispatcher)
    with TestClient(app) as client:
        response = client.get("/readyz")
    assert response.status_code == 503, response.text
    checks = response.json()["checks"]
    assert checks["broker"] == "ok" and checks["database"] == "ok"
    assert checks["workers"] == "no worker consumes the cpu, gpu queue"


def test_readyz_counts_a_busy_worker_by_its_presence_key(settings: Settings) -> None:
    """A solo-pool GPU worker answers no broadcast while it runs a stage (minutes to hours):
    /readyz said 503 then and took the API out of its load balancer. Presence keys, beaten by
    a thread in the worker, count it all the same."""
    from cotune.jobs.presence import Presence, redis_client
    from services.api.dispatch import CeleryDispatcher

    prefix = f"cotune-readyz-{uuid.uuid4().hex[:8]}:"
    busy = settings.model_copy(
        update={"broker_url": "redis://127.0.0.1:6379/0", "broker_key_prefix": prefix}
    )
    worker = Presence(redis_client(busy.broker_url), prefix, "gpu-1@host", ["gpu", "cpu"])
    worker.start()
    try:
        app = create_app(busy, dispatcher=CeleryDispatcher(busy))
        with TestClient(app) as client:
            response = client.get("/readyz")
    finally:
        worker.stop()
    assert response.status_code == 200, response.text
    assert response.json()["checks"]["workers"] == "ok"


def test_a_dead_worker_is_recovered_within_a_minute_by_default() -> None:
    """Finding 3: with the old defaults (600 s leases) a killed worker's job waited ~10.5 min.
    The bound is built from the settings themselves, so it holds on any machine."""
    defaults = Settings()
    assert defaults.recovery_bound_seconds < 60, defaults.recovery_bound_seconds


def test_settings_refuse_unsafe_production_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COTUNE_HOME", "/var/lib/cotune")  # only computed, never created
    with pytest.raises(ValueError, match="COTUNE_DATABASE_URL is SQLite"):
        Settings(environment="production", artifacts=str(tmp_path / "a"))
    with pytest.raises(ValueError, match="COTUNE_ARTIFACTS is in a temporary folder"):
        Settings(
            environment="production",
            database_url="postgresql+psycopg://db/cotune",
            artifacts="/tmp/cotune-artifacts",
        )
    with pytest.raises(ValueError, match="COTUNE_ARTIFACTS is the development default"):
        Settings(environment="production", database_url="postgresql+psycopg://db/cotune")
    ok = Settings(
        environment="production",
        database_url="postgresql+psycopg://db/cotune",
        artifacts="s3://bucket/cotune",
    )
    assert not ok.is_development and not ok.should_migrate


def test_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COTUNE_HTTP_SEARCH_ALLOWED_HOSTS", "Search.Example.com, wiki.example.org")
    monkeypatch.setenv(
        "COTUNE_JUDGES",
        json.dumps({"big": {"url": "https://j.example.com/v1", "model": "m", "api_key_env": "K"}}),
    )
    monkeypatch.setenv("COTUNE_MAX_UPLOAD_BYTES", "1234")
    monkeypatch.setenv("K", "the-key")
    s = Settings()
    assert s.http_search_allowed_hosts == ["search.example.com", "wiki.example.org"]
    assert s.max_upload_bytes == 1234 and s.judges["big"].api_key() == "the-key"
    assert "the-key" not in repr(s) and "the-key" not in s.model_dump_json()


# --------------------------------------------------------------------------- a real run


def test_the_thread_dispatcher_runs_a_job_end_to_end(
    api: Api, settings: Settings, tiny_files: dict[str, str]
) -> None:
    """The real ``ThreadDispatcher``: files materialised, models resolved, the loop run with
    the scripted engine, judge and trainer (test doubles), the result exported; then the
    job's views and downloads over HTTP."""
    from doubles import scripted_context_options

    store = JobStore(settings.database_url)
    artifacts = ArtifactStore(settings.artifacts)
    stage_seconds: list[StageRecord] = []
    dispatcher = ThreadDispatcher(
        store,
        AccountStore(store),
        artifacts,
        settings,
        context_options=scripted_context_options(),
        on_stage_done=stage_seconds.append,
    )
    app = create_app(settings, dispatcher=dispatcher)
    try:
        with TestClient(app) as client:
            spec = tiny_job_spec(tiny_files, judge={"model": "tiny"})
            created = client.post("/v1/jobs", json=spec, headers=api.acme)
            assert created.status_code == 200, created.text
            job_id = created.json()["id"]
            assert created.json()["status"] in ("validating_files", "queued", "running")
            assert dispatcher.wait_idle(timeout=60)
            job = client.get(f"/v1/jobs/{job_id}", headers=api.acme).json()
            assert job["status"] == "succeeded", job
            events = client.get(f"/v1/jobs/{job_id}/events?limit=100", headers=api.acme).json()
            messages = [e["message"] for e in events["data"]]
            assert messages[:3] == [
                "job created; validating its files",
                "files validated; queued",
                "running",
            ]
            assert messages[-1] == "succeeded"
            assert {r.stage for r in stage_seconds} >= {Stage.baseline, Stage.train, Stage.test}
            metrics = client.get(f"/v1/jobs/{job_id}/metrics", headers=api.acme).json()
            assert metrics["status"] == "succeeded" and len(metrics["epochs"]) == 1
            if job["result"]["best_epoch"] is not None:
                adapter = client.get(f"/v1/jobs/{job_id}/adapters/query", headers=api.acme)
                assert adapter.status_code == 200
            assert not (settings.work_dir() / job_id).exists()  # materialised files cleaned up
            assert artifacts.isfile(f"{job_id}/result/metrics.json")
    finally:
        dispatcher.shutdown(wait=True)
        store.close()


def test_a_judge_scored_job_without_gold_runs_over_http(
    api: Api, settings: Settings, tiny_files: dict[str, str], tmp_path: Path
) -> None:
    """``metric: judge`` with a rubric, data without ``expected``: accepted, run by the real
    ``ThreadDispatcher`` with the scripted engine, judge (scoring by rule) and trainer, and
    the judge's scores listed with the traces."""
    from doubles import (
        JUDGED_RUBRIC,
        FakeTrainer,
        ScriptedEngine,
        ScriptedJudge,
        critique,
        write_judged_tiny_example,
    )

    from cotune.tiny import make_world

    facts = make_world().facts
    folder = write_judged_tiny_example(tmp_path / "judged", model_path="unused", splits=(12, 6, 6))
    files = dict(tiny_files)
    for split in ("train", "val"):
        uploaded = api.upload(f"{split}.jsonl", (folder / f"{split}.jsonl").read_bytes(), "data")
        assert uploaded.status_code == 200, uploaded.text
        files[split] = uploaded.json()["id"]
    spec = tiny_job_spec(files, judge={"model": "tiny"})
    del spec["data"]["test"]
    spec["system"].update(metric="judge", rubric=JUDGED_RUBRIC)

    judge = ScriptedJudge(
        lambda key, gold, i: [critique("query", f"color of {key}", "search the key")],
        score=lambda key, output: float(output == facts[key]),
    )
    store = JobStore(settings.database_url)
    dispatcher = ThreadDispatcher(
        store,
        AccountStore(store),
        ArtifactStore(settings.artifacts),
        settings,
        context_options={
            "engines": {"tiny": ScriptedEngine()},
            "judge": judge,
            "trainer": FakeTrainer(),
        },
    )
    app = create_app(settings, dispatcher=dispatcher)
    try:
        with TestClient(app) as client:
            created = client.post("/v1/jobs", json=spec, headers=api.acme)
            assert created.status_code == 200, created.text
            job_id = created.json()["id"]
            assert dispatcher.wait_idle(timeout=60)
            job = client.get(f"/v1/jobs/{job_id}", headers=api.acme).json()
            assert job["status"] == "succeeded", job
            traces = client.get(
                f"/v1/jobs/{job_id}/traces?stage=rollout&limit=100", headers=api.acme
            ).json()["data"]
            assert traces and all(t["expected"] is None for t in traces)
            assert all(t["score_samples"] and t["score_reason"] for t in traces)
            assert judge.score_requests
    finally:
        dispatcher.shutdown(wait=True)
        store.close()


def test_a_restarted_embedded_server_resumes_unfinished_jobs(
    env: Path, tmp_path: Path, tiny_files: dict[str, str], api: Api
) -> None:
    """``ThreadDispatcher.recover``: a job left running (its baseline stage still leased by the
    dead process on this host) is re-queued and finished by the next process. On SQLite, as
    ``cotune serve --embedded`` runs by default."""
    from doubles import scripted_context_options

    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'embedded.db'}",
        artifacts=str(tmp_path / "artifacts"),
        workdir=str(tmp_path / "work"),
    )
    first = RecordingDispatcher()
    app = create_app(settings, dispatcher=first)
    first.store = app.state.cotune.store
    _, key = app.state.cotune.accounts.create_key("solo")
    headers = {"Authorization": f"Bearer {key}"}
    with TestClient(app) as client:
        files = {}
        for name, file_id in tiny_files.items():
            purpose = "corpus" if name == "corpus" else "data"
            content = api.artifacts.get_bytes(_key(api, file_id))
            response = client.post(
                "/v1/files",
                headers=headers,
                files={"file": (f"{name}.jsonl", content)},
                data={"purpose": purpose},
            )
            files[name] = response.json()["id"]
        job_id = client.post("/v1/jobs", json=tiny_job_spec(files), headers=headers).json()["id"]
    store = JobStore(settings.database_url)
    store.transition(job_id, JobStatus.running)
    dispatcher = ThreadDispatcher(
        store,
        AccountStore(store),
        ArtifactStore(settings.artifacts),
        settings,
        context_options=scripted_context_options(with_judge=False),
    )
    try:
        assert store.claim_stage(job_id, 0, Stage.baseline, dispatcher.owner, 600)
        assert dispatcher.recover() == [job_id]
        assert dispatcher.wait_idle(timeout=60)
        record = store.get_job(job_id)
        assert record is not None and record.status == JobStatus.succeeded, record
        baseline = store.stage(job_id, 0, Stage.baseline)
        assert baseline is not None and baseline.attempts == 2
        messages = [e.message for e in store.events(job_id, limit=100)]
        assert "server restarted; re-queued" in messages
    finally:
        dispatcher.shutdown(wait=True)
        store.close()


def test_the_openapi_job_body_is_the_typed_spec(api: Api, tiny_files: dict[str, str]) -> None:
    """Finding 10: the body of POST /v1/jobs was an untyped object in the schema. A job the
    API accepts validates against the documented schema, and one the schema refuses is not
    accepted either."""
    import jsonschema

    document = api.request("GET", "/openapi.json").json()
    for path in (
        "/v1/jobs",
        "/v1/jobs/quote",
        "/v1/fine_tuning/jobs",
        "/v1/fine_tuning/jobs/quote",
    ):
        body = document["paths"][path]["post"]["requestBody"]["content"]["application/json"]
        assert body["schema"]["$ref"] == "#/components/schemas/JobCreate", path
    schemas = document["components"]["schemas"]
    job = schemas["SpecJobSpec"]
    assert {"system", "data"} <= set(job["required"]) and "base_dir" not in job["properties"]
    assert {"system", "data"} <= set(schemas["CompoundJobCreate"]["required"])
    assert {"model", "training_file"} <= set(schemas["OpenAIJobCreate"]["required"])
    root = {**document, "$ref": "#/components/schemas/JobCreate"}
    validator = jsonschema.Draft202012Validator(root)
    spec = tiny_job_spec(tiny_files)
    validator.validate(spec)
    validator.validate({**spec, "model": "tiny", "training_file": tiny_files["train"]})
    validator.validate({**spec, "training_file": "file-a", "data": {"val": "file-b"}})
    single = {"model": "tiny", "training_file": "file-a", "validation_file": "file-b"}
    validator.validate({**single, "method": {"type": "dpo", "dpo": {"hyperparameters": {}}}})
    assert not validator.is_valid({**single, "method": {"type": "reinforcement"}})
    validator.validate({**single, "system": spec["system"], "data": spec["data"]})
    # a system with OpenAI's single-model settings is neither branch
    assert not validator.is_valid({**single, "suffix": "x", "system": spec["system"]})
    assert submit(api, spec)["status"] in ("validating_files", "queued")
    bad = {**spec, "loop": {"epochs": "many"}}
    assert not validator.is_valid(bad)
    response = api.request("POST", "/v1/jobs", json=bad, headers=api.acme)
    assert response.status_code == 422 and response.json()["error"]["param"] == "loop.epochs"


def test_405_names_every_method_the_path_serves(api: Api, done_job: str) -> None:
    """Finding 10: ``Allow: GET`` was sent for a path that DELETE serves too."""
    response = api.request("PUT", f"/v1/jobs/{done_job}", headers=api.acme)
    assert response.status_code == 405
    allowed = {m.strip() for m in response.headers["Allow"].split(",")}
    assert {"GET", "DELETE"} <= allowed and "PUT" not in allowed
    assert response.json()["error"]["code"] == "method_not_allowed"


def test_job_lists_leave_the_spec_out(api: Api, tiny_files: dict[str, str]) -> None:
    """Finding 10: list items embedded whole specs (a 100-job page was 4.4 MB)."""
    spec = tiny_job_spec(tiny_files)
    spec["system"]["description"] = "d" * 50_000
    job = submit(api, spec)
    assert job["spec"] == spec  # the job itself still shows it
    for url in ("/v1/jobs?limit=100", "/v1/fine_tuning/jobs?limit=100"):
        page = api.request("GET", url, headers=api.acme)
        item = next(j for j in page.json()["data"] if j["id"] == job["id"])
        assert item["spec"] is None and item["name"] == "tiny-kb"
        assert "d" * 1000 not in page.text
    assert api.request("GET", f"/v1/jobs/{job['id']}", headers=api.acme).json()["spec"] == spec
    api.request("POST", f"/v1/jobs/{job['id']}/cancel", headers=api.acme)
