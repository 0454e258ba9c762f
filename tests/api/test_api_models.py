"""Registered models over HTTP: ``GET /v1/models`` lists them with their preparation status; a
job may name a ready one (per component or as the judge), and an unknown, removed, preparing or
failed one answers 422 naming the field; removing a model a queued job names is refused.

The rows are written with ``ModelStore`` directly: preparing a model for real is
``tests/core/test_model_registry.py``; here only the API's reading of the registry matters.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import fresh_pg_database
from doubles import RecordingDispatcher
from fastapi.testclient import TestClient

from cotune.model_records import ModelOptions, ModelStatus
from cotune.model_registry import ModelInUse, remove_model
from cotune.settings import Settings
from cotune.store.registry import ModelStore
from cotune.tiny import TINY_SYSTEM, write_tiny_example
from services.api.app import create_app


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    root = tmp_path_factory.mktemp("service")
    with fresh_pg_database("cotune_api_models") as url, pytest.MonkeyPatch.context() as mp:
        mp.setenv("COTUNE_HOME", str(root / "home"))
        settings = Settings(
            database_url=url,
            artifacts=str(root / "artifacts"),
            workdir=str(root / "work"),
            migrate_on_start=False,
        )
        dispatcher = RecordingDispatcher()
        app = create_app(settings, dispatcher=dispatcher)
        dispatcher.store = app.state.cotune.store
        yield app


@pytest.fixture(scope="module")
def client(app: Any) -> Iterator[TestClient]:
    with TestClient(app, raise_server_exceptions=False) as client:
        _, key = app.state.cotune.accounts.create_key("acme")
        client.headers["Authorization"] = f"Bearer {key}"
        yield client


@pytest.fixture(scope="module")
def models(app: Any) -> ModelStore:
    store = ModelStore(app.state.cotune.store)
    for name, status, error in [
        ("chat-ready", ModelStatus.ready, None),
        ("chat-warming", ModelStatus.preparing, None),
        ("chat-broken", ModelStatus.failed, "no safetensors weights in /srv/models/broken"),
    ]:
        store.add(name, "path", f"/srv/models/{name}", ModelOptions())
        store.set_status(name, status, error=error)
    return store


@pytest.fixture(scope="module")
def files(client: TestClient, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    folder = write_tiny_example(tmp_path_factory.mktemp("tiny-kb"), splits=(6, 4, 4))
    ids = {}
    for name, purpose in [("train", "data"), ("val", "data"), ("corpus", "corpus")]:
        content = (folder / f"{name}.jsonl").read_bytes()
        response = client.post(
            "/v1/files", files={"file": (f"{name}.jsonl", content)}, data={"purpose": purpose}
        )
        assert response.status_code == 200, response.text
        ids[name] = response.json()["id"]
    return ids


def spec(files: dict[str, str], model: str, judge: str | None = None) -> dict[str, Any]:
    system = json.loads(json.dumps(TINY_SYSTEM))
    system["models"]["tiny"] = {"name": model}
    system["components"][1]["args"]["corpus"] = files["corpus"]
    body: dict[str, Any] = {
        "system": system,
        "data": {"train": files["train"], "val": files["val"]},
    }
    if judge is not None:
        body["judge"] = {"model": judge}
    return body


def test_models_lists_built_in_and_registered_with_their_status(
    client: TestClient, models: ModelStore
) -> None:
    response = client.get("/v1/models")
    assert response.status_code == 200
    listed = {m["id"]: m for m in response.json()["data"]}
    assert response.json()["object"] == "list"
    assert {m["object"] for m in listed.values()} == {"model"}
    assert listed["tiny"]["status"] == "registered"  # built in, not prepared in this home
    assert listed["smollm2-135m"]["kind"] == "base"
    assert {
        name: listed[name]["status"] for name in ("chat-ready", "chat-warming", "chat-broken")
    } == {
        "chat-ready": "ready",
        "chat-warming": "preparing",
        "chat-broken": "failed",
    }
    assert listed["chat-ready"]["created"] > 0
    assert "/srv" not in response.text  # never a server path, not even in an error


@pytest.mark.parametrize(
    ("model", "judge", "param", "words"),
    [
        ("gpt-17", None, "system.models.tiny.name", "unknown model 'gpt-17'"),
        ("chat-warming", None, "system.models.tiny.name", "registered but preparing"),
        ("chat-broken", None, "system.models.tiny.name", "registered but failed"),
        ("chat-ready", "chat-broken", "judge.model", "registered but failed"),
    ],
)
def test_a_job_naming_a_model_that_is_not_ready_answers_422(
    client: TestClient,
    models: ModelStore,
    files: dict[str, str],
    model: str,
    judge: str | None,
    param: str,
    words: str,
) -> None:
    response = client.post("/v1/jobs", json=spec(files, model, judge))
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"], error


def test_remove_is_refused_while_a_job_names_the_model(
    client: TestClient, models: ModelStore, files: dict[str, str]
) -> None:
    job = client.post("/v1/jobs", json=spec(files, "tiny", judge="chat-ready"))
    assert job.status_code == 200, job.text
    with pytest.raises(ModelInUse) as info:
        remove_model(models, "chat-ready")
    assert job.json()["id"] in str(info.value)

    assert client.post(f"/v1/jobs/{job.json()['id']}/cancel").status_code == 200
    remove_model(models, "chat-ready")
    again = client.post("/v1/jobs", json=spec(files, "chat-ready"))
    assert again.status_code == 422
    assert again.json()["error"]["param"] == "system.models.tiny.name"
    assert "chat-ready" not in {m["id"] for m in client.get("/v1/models").json()["data"]}


def test_a_model_too_large_for_the_workers_gpus_answers_422_with_the_numbers(
    app: Any, client: TestClient, models: ModelStore, files: dict[str, str]
) -> None:
    from pathlib import Path

    from cotune.models import MANIFEST, models_dir

    configs = Path(__file__).resolve().parents[1] / "data" / "model-configs"
    folder = models_dir() / "chat-huge"  # a prepared folder: its config.json is what counts
    folder.mkdir(parents=True)
    (folder / "config.json").write_bytes((configs / "llama2-70b.json").read_bytes())
    (folder / "tokenizer.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    (folder / MANIFEST).write_text(json.dumps({"options": {"tensor_parallel": 4}}))
    models.add("chat-huge", "path", "/srv/models/huge", ModelOptions())
    models.set_status("chat-huge", ModelStatus.ready)
    state = app.state.cotune
    settings = state.settings
    try:
        state.settings = settings.model_copy(update={"gpus": 4, "gpu_memory_gib": 16.0})
        response = client.post("/v1/jobs", json=spec(files, "chat-huge"))
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["param"] == "system.models.tiny"
        assert "does not fit the worker's GPUs" in error["message"]
        assert "54.4 GiB = 4 GPU(s) x 16.0 GiB x share 0.85" in error["message"]
        # Eight such GPUs: served over four (its tensor_parallel), trained over all (FSDP).
        state.settings = settings.model_copy(
            update={"gpus": 8, "train_gpus": 8, "gpu_memory_gib": 80.0}
        )
        response = client.post("/v1/jobs", json=spec(files, "chat-huge"))
        assert response.status_code == 200, response.text
    finally:
        state.settings = settings
