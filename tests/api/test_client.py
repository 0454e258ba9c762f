"""The SDK (``cotune.client.Client``) against the real API app on PostgreSQL (test_api.py's
fixtures: a recording dispatcher, jobs finished by hand). The end-to-end runs with a real
worker are in test_workers.py and test_embedded_service.py."""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_api import (  # noqa: F401  (fixtures used by name)
    Api,
    api,
    done_job,
    env,
    finish,
    pg_url,
    settings,
    tiny_files,
)

from cotune.client import ApiError, Client
from cotune.errors import CotuneError
from cotune.tiny import write_tiny_example


@pytest.fixture()
def client(api: Api) -> Iterator[Client]:  # noqa: F811
    with Client("http://testserver", api_key=api.acme_key, http=api.client) as sdk:
        yield sdk


def job_folder(folder: Path, **job: Any) -> Path:
    """A job file beside its system, splits and corpus, all by relative path."""
    write_tiny_example(folder, splits=(12, 6, 6))
    spec = {
        "system": "system.yaml",
        "data": {"train": "train.jsonl", "val": "val.jsonl", "test": "test.jsonl"},
        "loop": {"epochs": 1, "rollout_batch": 12, "samples_per_component": 8},
        "train": {"lora_r": 4, "lora_alpha": 8},
        **job,
    }
    (folder / "job.yaml").write_text(yaml.safe_dump(spec))
    return folder / "job.yaml"


def test_submit_uploads_each_local_file_once_and_sends_ids(
    client: Client,
    api: Api,  # noqa: F811
    tmp_path: Path,
) -> None:
    path = job_folder(tmp_path / "job")
    spec = yaml.safe_load(path.read_text())
    spec["data"]["test"] = "val.jsonl"  # the same file twice: one upload
    path.write_text(yaml.safe_dump(spec))
    before = {f["id"] for f in client.list_files()}
    uploads: list[Path] = []
    job = client.submit(path, on_upload=lambda p, _f: uploads.append(p))
    assert sorted(p.name for p in uploads) == ["corpus.jsonl", "train.jsonl", "val.jsonl"]
    new = {f["id"]: f for f in client.list_files() if f["id"] not in before}
    assert sorted((f["filename"], f["purpose"]) for f in new.values()) == [
        ("corpus.jsonl", "corpus"),
        ("train.jsonl", "data"),
        ("val.jsonl", "data"),
    ]
    sent = job["spec"]
    assert sent["data"]["val"] == sent["data"]["test"] and set(sent["data"].values()) <= set(new)
    corpus = sent["system"]["components"][1]["args"]["corpus"]
    assert new[corpus]["purpose"] == "corpus"
    assert sent["system"]["name"] == "tiny-kb"  # the system went inline
    assert job["status"] == "queued" and client.get(job["id"])["id"] == job["id"]


def test_submit_uploads_a_feedback_file_with_purpose_feedback(
    client: Client,
    api: Api,  # noqa: F811
    tmp_path: Path,
) -> None:
    """A job on rated runs and no train split: the feedback file is uploaded (checked as
    rated runs), its id sent as data.feedback, and the job created."""
    path = job_folder(tmp_path / "job", data={"val": "val.jsonl", "feedback": "rated.jsonl"})
    rated = {
        "inputs": {"question": "what is the color of quta?"},
        "output": "unknown",
        "feedback": {"rating": "down", "comment": "no colour", "corrected_output": "blue"},
    }
    (path.parent / "rated.jsonl").write_text(json.dumps(rated) + "\n")
    before = {f["id"] for f in client.list_files()}
    job = client.submit(path)
    new = {f["id"]: f for f in client.list_files() if f["id"] not in before}
    sent = job["spec"]["data"]
    assert new[sent["feedback"]]["purpose"] == "feedback"
    assert new[sent["feedback"]]["filename"] == "rated.jsonl"
    assert new[sent["val"]]["purpose"] == "data" and "train" not in sent
    assert job["status"] == "queued"


def test_submit_with_one_idempotency_key_makes_one_job(client: Client, tmp_path: Path) -> None:
    path = job_folder(tmp_path / "job")
    first = client.submit(path, idempotency_key="client-test-1")
    spec = client.get(first["id"])["spec"]
    again = client._post_job(spec, "client-test-1")  # a retried POST of the same body
    assert again["id"] == first["id"]


def test_a_model_path_is_refused_before_any_upload(client: Client, tmp_path: Path) -> None:
    path = job_folder(tmp_path / "job")
    system = yaml.safe_load((tmp_path / "job" / "system.yaml").read_text())
    system["models"]["tiny"] = {"path": "/models/tiny"}
    (tmp_path / "job" / "system.yaml").write_text(yaml.safe_dump(system))
    before = len(client.list_files())
    with pytest.raises(CotuneError, match=r"system.models.tiny: a server runs registry models"):
        client.submit(path)
    assert len(client.list_files()) == before


def test_refusals_raise_api_error_with_code_and_param(client: Client, tmp_path: Path) -> None:
    path = job_folder(tmp_path / "job", loop={"epochs": 0})
    with pytest.raises(ApiError) as err:
        client.submit(path)
    assert err.value.status == 422 and err.value.param == "loop.epochs"
    assert "loop.epochs" in str(err.value)
    with pytest.raises(ApiError) as missing:
        client.get("job-000000000000000000000000")
    assert missing.value.status == 404 and missing.value.code == "not_found"
    with pytest.raises(CotuneError, match="no such file"):
        client.upload_file(tmp_path / "nope.jsonl", "data")


def test_a_wrong_key_is_401(api: Api) -> None:  # noqa: F811
    with (
        Client("http://testserver", api_key="ct_wrong", http=api.client) as sdk,
        pytest.raises(ApiError) as err,
    ):
        sdk.list_jobs()
    assert err.value.status == 401


def test_events_wait_and_adapter_download_of_a_finished_job(
    client: Client,
    done_job: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    listed = list(client.events(done_job))
    streamed = list(client.events(done_job, follow=True))
    assert [e["id"] for e in streamed] == [e["id"] for e in listed] and listed
    later = list(client.events(done_job, after=listed[1]["id"]))
    assert [e["id"] for e in later] == [e["id"] for e in listed[2:]]

    seen: list[dict[str, Any]] = []
    job = client.wait(done_job, progress=seen.append, timeout=60)
    assert job["status"] == "succeeded" and len(seen) == len(listed)
    assert client.wait(done_job)["status"] == "succeeded"  # polling, no progress

    folder = client.download_adapter(done_job, "query", tmp_path / "adapters")
    assert folder == tmp_path / "adapters" / "query"
    assert sorted(p.name for p in folder.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert json.loads((folder / "adapter_config.json").read_text())["peft_type"] == "LORA"
    archive = client.download_adapter(done_job, "answer", tmp_path / "a.tar.gz", extract=False)
    with tarfile.open(archive) as tar:
        assert sorted(tar.getnames()) == [
            "answer/adapter_config.json",
            "answer/adapter_model.safetensors",
        ]
    assert not list(tmp_path.glob("**/*.partial"))
    with pytest.raises(ApiError) as err:
        client.download_adapter(done_job, "search", tmp_path / "x")
    assert err.value.status == 404 and err.value.param == "component"
    assert client.checkpoints(done_job)[0]["step_number"] == 1
    assert client.metrics(done_job)["best_epoch"] == 1


def test_prepare_resolves_data_from_the_job_file_and_corpora_from_the_system_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No server: uploads are recorded. The system lives in another folder than the job."""
    write_tiny_example(tmp_path / "system", splits=(4, 2, 2))
    (tmp_path / "job").mkdir()
    for split in ("train", "val"):
        (tmp_path / "system" / f"{split}.jsonl").rename(tmp_path / "job" / f"{split}.jsonl")
    spec = {
        "system": "../system/system.yaml",
        "data": {"train": "train.jsonl", "val": "val.jsonl", "test": None},
    }
    (tmp_path / "job" / "job.yaml").write_text(yaml.safe_dump(spec))
    uploaded: list[tuple[Path, str]] = []

    def upload_file(self: Client, path: Path, purpose: str) -> dict[str, Any]:
        uploaded.append((path, purpose))
        return {"id": f"file-{len(uploaded)}"}

    monkeypatch.setattr(Client, "upload_file", upload_file)
    with Client("http://unused", api_key="ct_x") as sdk:
        sent = sdk.prepare(tmp_path / "job" / "job.yaml")
    assert uploaded == [
        ((tmp_path / "job" / "train.jsonl").resolve(), "data"),
        ((tmp_path / "job" / "val.jsonl").resolve(), "data"),
        ((tmp_path / "system" / "corpus.jsonl").resolve(), "corpus"),
    ]
    assert sent["data"] == {"train": "file-1", "val": "file-2", "test": None}
    assert sent["system"]["components"][1]["args"] == {"corpus": "file-3", "k": 3}


def test_an_unreachable_server_is_a_clear_error() -> None:
    from e2e import free_port

    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with Client(url, api_key="ct_x", timeout=5) as sdk, pytest.raises(CotuneError) as err:
        sdk.get("job-1")
    assert str(err.value).startswith(f"GET {url}/v1/jobs/job-1: ")


def test_a_dropped_event_stream_resumes_after_the_last_event() -> None:
    """A scripted server (httpx.MockTransport, a double named as such): the first stream
    drops after one event, the next answers 503 (the API restarting), then the rest."""
    import httpx

    def sse(*events: str, done: bool = False) -> bytes:
        body = "".join(f"id: {e}\nevent: event\ndata: {json.dumps(ev(e))}\n\n" for e in events)
        return (body + ('event: done\ndata: {"status": "succeeded"}\n\n' if done else "")).encode()

    def ev(event_id: str) -> dict[str, Any]:
        return {"id": event_id, "message": f"m{event_id}", "created_at": 0, "level": "info"}

    seen: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.params.get("after"))
        assert request.headers["authorization"] == "Bearer ct_k"
        if len(seen) == 1:
            return httpx.Response(200, content=sse("1"))  # ends without "done"
        if len(seen) == 2:
            return httpx.Response(503, json={"error": {"code": "unavailable", "message": "x"}})
        return httpx.Response(200, content=sse("2", "3", done=True))

    http = httpx.Client(transport=httpx.MockTransport(handler), base_url="http://scripted")
    with Client("http://scripted", api_key="ct_k", http=http) as sdk:
        assert [e["id"] for e in sdk.events("job-1", follow=True)] == ["1", "2", "3"]
    assert seen == [None, "1", "1"]


def test_a_download_with_an_unsafe_entry_is_refused(tmp_path: Path) -> None:
    import io

    from cotune.client import _extract

    def archive(*entries: tuple[str, bytes | None], link: str | None = None) -> Path:
        path = tmp_path / f"a{len(list(tmp_path.glob('*.tar.gz')))}.tar.gz"
        with tarfile.open(path, "w:gz") as tar:
            for name, data in entries:
                info = tarfile.TarInfo(name)
                if data is None:
                    info.type = tarfile.SYMTYPE
                    info.linkname = link or "/etc/passwd"
                    tar.addfile(info)
                else:
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        return path

    out = tmp_path / "out"
    out.mkdir()
    for bad, why in [
        (archive(("answer/x", b"1"), ("answer/../../evil", b"2")), "unsafe entry"),
        (archive(("answer/x", b"1"), ("answer/link", None)), "unsafe entry"),
        (archive(("answer/x", b"1"), ("query/x", b"2")), "2 top folders"),
    ]:
        with pytest.raises(CotuneError, match=why):
            _extract(bad, out)
    assert list(out.iterdir()) == []
    good = archive(("answer/adapter_config.json", b"{}"))
    assert _extract(good, out) == out / "answer"
    assert (out / "answer" / "adapter_config.json").read_text() == "{}"
    with pytest.raises(CotuneError, match="already exists"):
        _extract(good, out)
    assert [p.name for p in out.iterdir()] == ["answer"]  # no scratch folder left behind
