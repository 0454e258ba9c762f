"""The FastAPI app factory: ``create_app(settings=None, dispatcher=None)``.

Routes (OpenAPI docs at ``/docs``, the schema at ``/openapi.json``):

- files: ``POST/GET /v1/files``, ``GET/DELETE /v1/files/{id}``, ``GET /v1/files/{id}/content``;
- jobs: ``POST /v1/jobs``, ``POST /v1/jobs/quote``, ``GET /v1/jobs``, ``GET/DELETE
  /v1/jobs/{id}``, ``POST /v1/jobs/{id}/cancel``, ``GET /v1/jobs/{id}/events`` (``?stream=true``
  for server-sent events), ``.../metrics``, ``.../checkpoints``, ``.../components``,
  ``.../traces``, ``.../adapters/{component}``, ``.../bundle``; the same under
  ``/v1/fine_tuning/jobs`` for the openai SDK;
- ``GET /v1/models``: the registry's models and the hosted judges, by name;
- ops: ``/healthz``, ``/readyz`` (database, broker), ``/metrics`` (Prometheus);
- the dashboard: ``GET /dashboard`` (job list, per-job charts, components, traces and a live
  event log; no key needed for the page, it asks for one and sends it on its own requests),
  its assets at ``/dashboard/static/{name}``; ``GET /`` redirects there.

``cotune serve [--embedded]`` calls ``serve()``: without a broker, jobs run in this process's
threads (``cotune.jobs.threads.ThreadDispatcher``); with one, the Celery workers run them
(``services/api/dispatch.py`` sends tasks by name).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cotune.jobs.threads import Dispatcher, ThreadDispatcher
from cotune.settings import Settings, get_settings
from cotune.store import ArtifactStore, JobStore
from cotune.store.accounts import AccountStore
from services.api import errors, openapi
from services.api.auth import TENANT_SCOPE_KEY, ensure_key
from services.api.errors import ApiError, error_body
from services.api.logs import configure_logging
from services.api.metrics import ApiMetrics
from services.api.schemas import ErrorResponse
from services.api.state import ApiState

log = logging.getLogger("cotune.api")

# Multipart framing around an upload (boundaries, part headers, the purpose field).
UPLOAD_OVERHEAD = 64 * 1024
UPLOAD_PATHS = ("/v1/files",)

DESCRIPTION = """\
cotune fine-tunes the open-weight models inside a compound AI system together.

Upload data and corpora with `POST /v1/files`, submit a job with `POST /v1/jobs` (its spec names
files by id and models by registry name), then follow it. Authenticate with
`Authorization: Bearer <key>`. Errors are `{"error": {"code", "message", "param"}}`. Job routes
are also served under `/v1/fine_tuning/jobs` in the OpenAI fine-tuning API's shapes.
"""


class ServiceMiddleware:
    """Per request: an id, body-size limits (413), Prometheus counters and one JSON access
    log line carrying the route, status, tenant and job id (never headers or bodies)."""

    def __init__(self, app: ASGIApp, state: ApiState) -> None:
        self.app, self.state = app, state

    def _limit(self, scope: Scope) -> int:
        settings = self.state.settings
        if scope["method"] == "POST" and scope["path"].rstrip("/") in UPLOAD_PATHS:
            return settings.max_upload_bytes + UPLOAD_OVERHEAD
        return settings.max_json_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        request_id = headers.get("x-request-id", "")[:64] or uuid.uuid4().hex[:16]
        status_holder = {"status": 500}
        limit = self._limit(scope)

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [
                    *message["headers"],
                    (b"x-request-id", request_id.encode("latin-1")),
                ]
            await send(message)

        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._too_large(scope, send_wrapper, limit)
            self._record(scope, started, request_id, status_holder["status"])
            return

        received = 0

        async def receive_wrapper() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise ApiError(413, *self._too_large_text(scope, limit))
            return message

        started_response = False

        async def send_tracked(message: Message) -> None:
            nonlocal started_response
            started_response = started_response or message["type"] == "http.response.start"
            await send_wrapper(message)

        try:
            await self.app(scope, receive_wrapper, send_tracked)
        except ClientDisconnect:
            status_holder["status"] = CLIENT_CLOSED  # not a server error
        except Exception as exc:
            # Logged here, once and as JSON; swallowed, so that the server's own error log does
            # not print it again as a plain traceback.
            log.error(
                "unhandled error on %s %s: %s",
                scope["method"],
                scope["path"],
                type(exc).__name__,
                exc_info=exc,
                extra={"request_id": request_id},
            )
            status_holder["status"] = 500
            if not started_response:
                await send_error(
                    send_wrapper, 500, "internal_error", "internal error; see the server's log"
                )
        finally:
            self._record(scope, started, request_id, status_holder["status"])

    def _too_large_text(self, scope: Scope, limit: int) -> tuple[str, str]:
        if scope["path"].rstrip("/") in UPLOAD_PATHS:
            most = self.state.settings.max_upload_bytes
            return "file_too_large", f"the upload is larger than the limit of {most} bytes"
        return "request_too_large", f"the request body is larger than the limit of {limit} bytes"

    async def _too_large(self, scope: Scope, send: Send, limit: int) -> None:
        code, message = self._too_large_text(scope, limit)
        await send_error(send, 413, code, message, close=True)

    def _record(self, scope: Scope, started: float, request_id: str, status: int) -> None:
        seconds = time.perf_counter() - started
        route = scope.get("route")
        template = getattr(route, "path", None) or "<unmatched>"
        path_params = scope.get("path_params") or {}
        self.state.metrics.observe_request(scope["method"], template, status, seconds)
        if template in ("/metrics", "/healthz", "/readyz"):
            return
        log.info(
            "%s %s %d",
            scope["method"],
            template,
            status,
            extra={
                "request_id": request_id,
                "method": scope["method"],
                "route": template,
                "status": status,
                "duration_ms": round(seconds * 1000, 1),
                "tenant": scope.get(TENANT_SCOPE_KEY),
                "job_id": path_params.get("job_id"),
                "file_id": path_params.get("file_id"),
            },
        )


CLIENT_CLOSED = 499  # nginx's "client closed request": counted apart from the server's errors


async def send_error(
    send: Send, status: int, code: str, message: str, *, close: bool = False
) -> None:
    """An error response written straight to ASGI, for the middleware (outside FastAPI)."""
    import json

    body = json.dumps(error_body(code, message)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _default_dispatcher(
    settings: Settings,
    store: JobStore,
    accounts: AccountStore,
    artifacts: ArtifactStore,
    metrics: ApiMetrics,
) -> Dispatcher:
    if settings.broker_url:
        from services.api.dispatch import CeleryDispatcher

        return CeleryDispatcher(settings)
    return ThreadDispatcher(
        store, accounts, artifacts, settings, on_stage_done=metrics.observe_stage
    )


def _sqlite_folder(url: str) -> None:
    """SQLite creates its file but not the folder it goes in."""
    from pathlib import Path

    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        Path(str(parsed.database)).expanduser().parent.mkdir(parents=True, exist_ok=True)


def create_app(settings: Settings | None = None, dispatcher: Dispatcher | None = None) -> FastAPI:
    """The API over the settings' database and artifact store; jobs go to ``dispatcher``
    (default: the Celery workers when the settings name a broker, else a ``ThreadDispatcher``)."""
    from services.api.routes import dashboard, files, jobs, models, ops

    settings = settings or get_settings()
    configure_logging(settings.log_level, settings.log_json)
    _sqlite_folder(settings.database_url)
    store = JobStore(settings.database_url, auto_migrate=settings.should_migrate)
    artifacts = ArtifactStore(settings.artifacts)
    accounts = AccountStore(store)
    holder: dict[str, Dispatcher] = {}
    metrics = ApiMetrics(store, lambda: holder["d"].queue_depth())
    holder["d"] = dispatcher or _default_dispatcher(settings, store, accounts, artifacts, metrics)
    state = ApiState(
        settings=settings,
        store=store,
        artifacts=artifacts,
        accounts=accounts,
        dispatcher=holder["d"],
        metrics=metrics,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        shutdown = getattr(state.dispatcher, "shutdown", None)
        if callable(shutdown):
            shutdown(wait=False)
        store.close()

    from importlib.metadata import PackageNotFoundError, version

    try:
        app_version = version("cotune")
    except PackageNotFoundError:  # pragma: no cover - running from a checkout
        app_version = "0"
    app = FastAPI(
        title="cotune",
        version=app_version,
        description=DESCRIPTION,
        lifespan=lifespan,
        responses={
            401: {"model": ErrorResponse, "description": "missing, unknown or revoked key"},
            422: {"model": ErrorResponse, "description": "invalid request or spec"},
        },
    )
    app.state.cotune = state
    errors.install(app)
    app.add_middleware(ServiceMiddleware, state=state)
    app.include_router(files.router)
    # One router, two prefixes: the openai SDK's paths serve the same routes.
    app.include_router(jobs.router, prefix="/v1/jobs", tags=["jobs"])
    app.include_router(
        jobs.router, prefix="/v1/fine_tuning/jobs", tags=["fine_tuning (OpenAI-compatible)"]
    )
    app.include_router(models.router)
    app.include_router(ops.router)
    app.include_router(dashboard.router)
    openapi.install(app)
    return app


def serve(
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    embedded: bool = False,
    settings: Settings | None = None,
) -> int:
    """Run the API with uvicorn (``cotune serve``). ``embedded``: jobs run in this process's
    threads; if the database holds no live key, one is created for tenant ``default`` and
    printed once on stderr."""
    import uvicorn

    settings = settings or get_settings()
    if embedded and settings.broker_url:
        raise RuntimeError("--embedded runs jobs in-process: unset COTUNE_BROKER_URL")
    app = create_app(settings)
    if embedded:
        dispatcher = app.state.cotune.dispatcher
        if isinstance(dispatcher, ThreadDispatcher):
            resumed = dispatcher.recover()
            if resumed:
                log.info("re-dispatched %d unfinished jobs", len(resumed))
        ensure_key(app.state.cotune.accounts, "embedded")
    uvicorn.run(app, host=host, port=port, access_log=False, log_level="info")
    return 0
