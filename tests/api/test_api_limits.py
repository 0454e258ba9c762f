"""Rate limits on real PostgreSQL: a key over its rate and an address that keeps failing to
authenticate answer 429 with Retry-After (finding 8 of the outside probe: 10,102 requests from
50 clients got no 429, and 300 wrong secrets for a real key id met no back-off)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import fresh_pg_database
from fastapi.testclient import TestClient

from cotune.settings import Settings
from services.api.app import create_app
from services.api.limits import TokenBuckets, retry_after


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    with fresh_pg_database("cotune_limits") as url:
        yield url


def _client(pg_url: str, root: Path, **limits: Any) -> tuple[TestClient, dict[str, str]]:
    settings = Settings(
        database_url=pg_url,
        artifacts=str(root / "artifacts"),
        workdir=str(root / "work"),
        migrate_on_start=False,
        **limits,
    )
    app = create_app(settings)
    keys = {t: app.state.cotune.accounts.create_key(t)[1] for t in ("acme", "globex")}
    return TestClient(app, raise_server_exceptions=False), keys


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_a_key_over_its_rate_answers_429_with_retry_after(pg_url: str, tmp_path: Path) -> None:
    client, keys = _client(pg_url, tmp_path, rate_limit_burst=3, rate_limit_per_minute=60)
    with client:
        for _ in range(3):
            assert client.get("/v1/jobs", headers=_bearer(keys["acme"])).status_code == 200
        over = client.get("/v1/files", headers=_bearer(keys["acme"]))
        assert over.status_code == 429, over.text
        assert over.json()["error"]["code"] == "rate_limited"
        assert over.headers["Retry-After"] == "1"  # one token a second at 60 a minute
        # Another key has its own bucket; unauthenticated routes have none.
        assert client.get("/v1/jobs", headers=_bearer(keys["globex"])).status_code == 200
        assert client.get("/healthz").status_code == 200


def test_failed_authentication_backs_off_by_address(pg_url: str, tmp_path: Path) -> None:
    client, keys = _client(pg_url, tmp_path, auth_failure_burst=3, auth_failures_per_minute=6)
    real_id_wrong_secret = keys["acme"][:-4] + "xxxx"
    with client:
        for _ in range(3):
            response = client.get("/v1/jobs", headers=_bearer(real_id_wrong_secret))
            assert response.status_code == 401
        # The burst is spent: every authentication from this address waits, a right key too.
        for key in (real_id_wrong_secret, keys["acme"]):
            response = client.get("/v1/jobs", headers=_bearer(key))
            assert response.status_code == 429, response.text
            assert response.json()["error"]["code"] == "auth_backoff"
            assert response.headers["Retry-After"] == "10"  # 6 a minute: one every 10 s


def test_the_429_is_in_the_openapi_schema(pg_url: str, tmp_path: Path) -> None:
    client, _ = _client(pg_url, tmp_path)
    with client:
        paths = client.get("/openapi.json").json()["paths"]
    for path, method in (("/v1/jobs", "get"), ("/v1/files", "post"), ("/v1/models", "get")):
        documented = paths[path][method]["responses"]["429"]
        assert "Retry-After" in documented["headers"], (path, documented)


def test_token_buckets_refill_at_their_rate() -> None:
    now = [0.0]
    buckets = TokenBuckets(burst=2, per_minute=30, clock=lambda: now[0])  # one every 2 s
    assert buckets.take("k") is None and buckets.take("k") is None
    assert buckets.take("k") == pytest.approx(2.0)
    now[0] = 1.0
    assert buckets.wait("k") == pytest.approx(1.0)
    now[0] = 2.0
    assert buckets.take("k") is None and buckets.take("k") == pytest.approx(2.0)
    assert buckets.take("other") is None  # its own bucket
    assert [retry_after(s) for s in (0.01, 1.0, 1.2)] == ["1", "1", "2"]


# -- finding 9: one JSON log record per server error; a client that left is not a server error


def test_an_unexpected_error_is_logged_once_and_never_reaches_the_server(
    pg_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    from starlette.requests import ClientDisconnect

    client, _ = _client(pg_url, tmp_path)
    app = client.app

    def boom() -> None:
        raise RuntimeError("a bug")

    def gone() -> None:
        raise ClientDisconnect()

    app.add_api_route("/boom", boom)  # type: ignore[attr-defined]
    app.add_api_route("/gone", gone)  # type: ignore[attr-defined]
    # raise_server_exceptions=True: an exception re-raised past the app (which uvicorn then
    # logs a second time, as a plain traceback) would fail this request instead of answering.
    with TestClient(app, raise_server_exceptions=True) as strict, caplog.at_level(logging.INFO):
        response = strict.get("/boom")
        assert response.status_code == 500
        assert response.json()["error"]["code"] == "internal_error"
        assert "a bug" not in response.text
        # Nothing is sent to a client that left (the test client says so).
        with pytest.raises(AssertionError, match="did not receive any response"):
            strict.get("/gone")
        metrics = strict.get("/metrics").text
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.getMessage() for r in errors] == ["unhandled error on GET /boom: RuntimeError"]
    assert errors[0].exc_info is not None  # the traceback goes into the one JSON record
    assert 'route="/boom",status="500"' in metrics
    assert 'route="/gone",status="499"' in metrics and 'route="/gone",status="500"' not in metrics
