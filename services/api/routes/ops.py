"""``/healthz`` (the process answers), ``/readyz`` (the database and the broker answer and,
with a broker, a worker consumes each queue) and ``/metrics`` (Prometheus). No key needed;
nothing here names a URL or a secret."""

from __future__ import annotations

import logging
import socket
from typing import Annotated
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, Response
from fastapi.responses import JSONResponse
from sqlalchemy import text

from services.api.metrics import CONTENT_TYPE
from services.api.schemas import HealthObject
from services.api.state import ApiState, get_state

log = logging.getLogger("cotune.api")
router = APIRouter(tags=["ops"])
State = Annotated[ApiState, Depends(get_state)]


def ping_database(state: ApiState) -> str:
    try:
        with state.store.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as err:
        log.warning("readyz: database unreachable: %s", type(err).__name__)
        return f"unreachable ({type(err).__name__})"
    return "ok"


def ping_broker(url: str | None, timeout: float = 2.0) -> str:
    """``skipped`` without a broker; Redis answers PING; another broker a TCP connect."""
    if not url:
        return "skipped"
    try:
        if url.startswith(("redis://", "rediss://", "unix://")):
            import redis

            client = redis.Redis.from_url(
                url, socket_timeout=timeout, socket_connect_timeout=timeout
            )
            try:
                client.ping()
            finally:
                client.close()
        else:
            parts = urlsplit(url)
            with socket.create_connection(
                (parts.hostname or "localhost", parts.port or 5672), timeout
            ):
                pass
    except Exception as err:
        log.warning("readyz: broker unreachable: %s", type(err).__name__)
        return f"unreachable ({type(err).__name__})"
    return "ok"


def workers_check(state: ApiState) -> str:
    """``ok`` when every queue has a worker consuming it: a job sent to a queue nobody reads
    would wait for ever. ``unknown`` if the dispatcher cannot tell (not a broker's)."""
    consumers = getattr(state.dispatcher, "consumers", None)
    counts = consumers() if callable(consumers) else None
    if counts is None:
        return "unknown"
    idle = sorted(q for q, n in counts.items() if n == 0)
    return "ok" if not idle else f"no worker consumes the {', '.join(idle)} queue"


@router.get("/healthz", response_model=HealthObject, summary="Liveness")
def healthz() -> HealthObject:
    return HealthObject(status="ok")


@router.get(
    "/readyz",
    response_model=HealthObject,
    responses={503: {"model": HealthObject}},
    summary="Readiness: the database and the broker answer, and a worker reads each queue",
)
def readyz(state: State) -> JSONResponse:
    checks = {"database": ping_database(state), "broker": ping_broker(state.settings.broker_url)}
    if checks["broker"] == "ok":
        checks["workers"] = workers_check(state)
    ok = all(v in ("ok", "skipped") for v in checks.values())
    body = HealthObject(status="ready" if ok else "unavailable", checks=checks)
    return JSONResponse(body.model_dump(), status_code=200 if ok else 503)


@router.get("/metrics", response_class=Response, summary="Prometheus metrics")
def metrics(state: State) -> Response:
    return Response(state.metrics.render(), media_type=CONTENT_TYPE)
