"""Event streams under load, on a real uvicorn server and real PostgreSQL: open streams hold no
server thread while they wait, so more of them than the thread pool has threads leave
``/healthz`` and other tenants answering; a tenant's streams beyond its cap answer 429.

Finding 2 of the outside probe: each waiting stream held one of the pool's 40 threads, and with
80 open streams other tenants' requests timed out.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from conftest import fresh_pg_database
from doubles import RecordingDispatcher, stub_registry_model
from e2e import free_port

from cotune.settings import Settings
from cotune.store import JobStatus
from cotune.tiny import TINY_SYSTEM
from services.api.app import create_app

# More than anyio's default thread pool (40 tokens), which serves every sync route.
STREAMS = 48
DEADLINE = 60.0  # how long a request may take before the test calls it stuck (not a speed check)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    import uvicorn

    home = tmp_path_factory.mktemp("home")
    stub_registry_model(home)
    root = tmp_path_factory.mktemp("service")
    with fresh_pg_database("cotune_streams") as url, pytest.MonkeyPatch.context() as mp:
        mp.setenv("COTUNE_HOME", str(home))
        settings = Settings(
            database_url=url,
            artifacts=str(root / "artifacts"),
            workdir=str(root / "work"),
            events_poll_seconds=0.2,
            max_streams_per_tenant=STREAMS,
            migrate_on_start=False,
        )
        dispatcher = RecordingDispatcher()  # queues, runs nothing: jobs never end
        app = create_app(settings, dispatcher=dispatcher)
        dispatcher.store = app.state.cotune.store
        state = app.state.cotune
        _, acme = state.accounts.create_key("acme")
        _, globex = state.accounts.create_key("globex")
        port = free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
        uv = uvicorn.Server(config)
        thread = threading.Thread(target=uv.run, daemon=True)
        thread.start()
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + DEADLINE
        while not uv.started:
            assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
            time.sleep(0.05)
        try:
            yield {"url": base, "port": port, "state": state, "acme": acme, "globex": globex}
        finally:
            uv.should_exit = True
            thread.join(timeout=30)


def _queued_job(server: dict[str, Any], tenant: str = "acme") -> str:
    """A job row that stays queued (its files are never read: nothing runs it)."""
    state = server["state"]
    spec = {"system": TINY_SYSTEM, "data": {"train": "file-x", "val": "file-y"}}
    job_id = state.store.create_job("tiny-kb", spec, tenant_id=tenant, status=JobStatus.queued)
    return str(job_id)


def _open_stream(port: int, key: str, job_id: str) -> socket.socket:
    """A raw HTTP/1.1 request for the stream, read until the server's first event line."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
    sock.sendall(
        f"GET /v1/jobs/{job_id}/events?stream=true HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer {key}\r\n\r\n".encode()
    )
    seen = b""
    while b"retry: 2000" not in seen:
        chunk = sock.recv(4096)
        assert chunk, f"the stream closed early: {seen!r}"
        seen += chunk
    assert seen.startswith(b"HTTP/1.1 200"), seen[:200]
    return sock


def test_open_streams_hold_no_thread_and_the_cap_answers_429(server: dict[str, Any]) -> None:
    job_id = _queued_job(server)
    state = server["state"]
    sockets: list[socket.socket] = []
    try:
        for _ in range(STREAMS):
            sockets.append(_open_stream(server["port"], server["acme"], job_id))
        assert state.streams.open("acme") == STREAMS

        # Every stream waits on a job that never ends; the server still answers.
        with httpx.Client(base_url=server["url"], timeout=DEADLINE) as client:
            assert client.get("/healthz").status_code == 200
            other = client.get("/v1/jobs", headers={"Authorization": f"Bearer {server['globex']}"})
            assert other.status_code == 200 and other.json()["data"] == []
            mine = client.get(
                f"/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {server['acme']}"}
            )
            assert mine.status_code == 200 and mine.json()["status"] == "queued"

            # One stream over the cap: 429, naming the parameter, and no slot taken.
            over = client.get(
                f"/v1/jobs/{job_id}/events",
                params={"stream": "true"},
                headers={"Authorization": f"Bearer {server['acme']}"},
            )
            assert over.status_code == 429, over.text
            error = over.json()["error"]
            assert error["code"] == "too_many_streams" and error["param"] == "stream"
            assert state.streams.open("acme") == STREAMS
            # The cap is per tenant: globex may still open one.
            theirs = _queued_job(server, "globex")
            with contextlib.closing(_open_stream(server["port"], server["globex"], theirs)):
                assert state.streams.open("globex") == 1
    finally:
        for sock in sockets:
            sock.close()

    # Closed streams give their slots back (the server notices at its next write or poll).
    deadline = time.monotonic() + DEADLINE
    while state.streams.open("acme") or state.streams.open("globex"):
        assert time.monotonic() < deadline, "closed streams kept their slots"
        time.sleep(0.2)


def test_a_finished_stream_gives_its_slot_back(server: dict[str, Any]) -> None:
    state = server["state"]
    job_id = _queued_job(server)
    state.store.transition(job_id, JobStatus.cancelled)
    with httpx.Client(base_url=server["url"], timeout=DEADLINE) as client:
        body = client.get(
            f"/v1/jobs/{job_id}/events",
            params={"stream": "true"},
            headers={"Authorization": f"Bearer {server['acme']}"},
        ).text
    assert '"status": "cancelled"' in body
    assert state.streams.open("acme") == 0
