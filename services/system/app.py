"""The served system (``cotune serve-system BUNDLE``): a downloaded bundle answering requests,
every trace logged, feedback taken (``cotune.serving`` does the work; this face parses and
answers).

- ``POST /v1/run {"inputs": {...}}`` -> ``{"id", "output"}``: one run of the whole system; 422
  naming ``inputs.<field>`` for a missing or unknown input field;
- ``GET /v1/runs/{id}``: the logged trace (every span) and its feedback;
- ``POST /v1/runs/{id}/feedback {"rating", "comment"?, "corrected_output"?}``: rate it (0-1,
  ``up`` or ``down``; a later rating replaces the earlier); 404 for an unknown id, 422 naming
  ``rating`` for a bad one;
- ``GET /healthz``: no key needed.

A body over ``COTUNE_MAX_JSON_BODY_BYTES`` answers 413.

API keys (``cotune keys create``, in ``COTUNE_DATABASE_URL``), rate limits and the
``http_search`` allow-list are the API's settings (``cotune.settings``), checked by the API's
own code (``services.api.auth.authenticate``). A tenant sees only its own traces.
"""

from __future__ import annotations

import datetime as _dt
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials
from pydantic import BaseModel, ConfigDict, Field
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cotune.errors import EngineError, ToolError
from cotune.runtime import Trace
from cotune.serving import GivenFeedback, LoggedTrace, ServingError, SystemServer, TraceNotFound
from cotune.settings import Settings, get_settings
from cotune.store import JobStore
from cotune.store.accounts import AccountStore
from services.api import errors
from services.api.auth import RATE_LIMITED, api_key_header, authenticate, bearer
from services.api.errors import ApiError, error_response
from services.api.limits import RateLimits
from services.api.policy import json_problem

log = logging.getLogger("cotune.system")


@dataclass
class SystemState:
    server: SystemServer
    accounts: AccountStore
    limits: RateLimits
    settings: Settings


def get_system(request: Request) -> SystemState:
    state: SystemState = request.app.state.system
    return state


State = Annotated[SystemState, Depends(get_system)]


def caller(
    request: Request,
    state: State,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    header_key: Annotated[str | None, Depends(api_key_header)],
) -> str:
    """The caller's tenant: the API's keys and rate limits (401, 429)."""
    key = credentials.credentials if credentials is not None else header_key
    return authenticate(request, key, state.accounts, state.limits)


Tenant = Annotated[str, Depends(caller)]


class RunRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    inputs: dict[str, Any] = Field(description="the system's input fields, e.g. {question: ...}")


class RunResponse(BaseModel):
    id: str = Field(description="the trace's id: GET /v1/runs/{id}, POST .../feedback")
    output: Any = Field(description="the system's final output")


class RunObject(BaseModel):
    object: Literal["system.run"] = "system.run"
    id: str
    created_at: _dt.datetime
    output: Any
    trace: Trace
    feedback: GivenFeedback | None = None
    rated_at: _dt.datetime | None = None

    @classmethod
    def of(cls, logged: LoggedTrace) -> RunObject:
        return cls(
            id=logged.id,
            created_at=logged.created_at,
            output=logged.trace.output,
            trace=logged.trace,
            feedback=logged.feedback,
            rated_at=logged.rated_at,
        )


def _checked(value: Any, param: str) -> None:
    """Text that cannot be stored and sent back (a NUL, a lone surrogate): 422 naming it."""
    problem = json_problem(value, param)
    if problem is not None:
        where, what = problem
        raise ApiError(422, "invalid_request", f"{where}: {what}", where)


class BodyLimit:
    """Refuse a request body over ``limit`` bytes (``COTUNE_MAX_JSON_BODY_BYTES``) with 413,
    declared or streamed, before any of it is parsed."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        from services.api.app import send_error

        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        message = f"the request body is larger than the limit of {self.limit} bytes"
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            await send_error(send, 413, "request_too_large", message, close=True)
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            got = await receive()
            if got["type"] == "http.request":
                received += len(got.get("body", b""))
                if received > self.limit:
                    raise ApiError(413, "request_too_large", message)
            return got

        await self.app(scope, limited, send)


def create_system_app(server: SystemServer, settings: Settings | None = None) -> FastAPI:
    """The served system's app over ``server``; keys from ``settings.database_url``."""
    from services.api.app import _sqlite_folder

    settings = settings or get_settings()
    _sqlite_folder(settings.database_url)
    store = JobStore(settings.database_url, auto_migrate=settings.should_migrate)
    state = SystemState(
        server=server,
        accounts=AccountStore(store),
        limits=RateLimits.from_settings(settings),
        settings=settings,
    )
    system = server.system
    app = FastAPI(
        title=f"cotune system {system.name}",
        description=f"The trained system {system.name!r} (inputs {system.inputs}, output "
        f"{system.output!r}) served from its bundle; every run is logged and can be rated.",
        responses={401: {"description": "missing, unknown or revoked key"}, **RATE_LIMITED},
    )
    app.state.system = state
    errors.install(app)
    app.add_middleware(BodyLimit, limit=settings.max_json_body_bytes)

    @app.exception_handler(ServingError)
    async def _refused(request: Request, exc: ServingError) -> JSONResponse:
        return error_response(422, "invalid_request", exc.message, exc.param)

    @app.exception_handler(TraceNotFound)
    async def _missing(request: Request, exc: TraceNotFound) -> JSONResponse:
        return error_response(404, "not_found", exc.message)

    @app.exception_handler(ToolError)
    async def _tool(request: Request, exc: ToolError) -> JSONResponse:
        log.error("tool failed: %s", exc)
        message = str(exc).replace(str(server.bundle), "<bundle>")
        return error_response(502, "tool_failed", message)

    @app.exception_handler(EngineError)
    async def _engine(request: Request, exc: EngineError) -> JSONResponse:
        log.error("engine failed: %s", exc)
        return error_response(503, "engine_failed", "the model engine failed; see the log")

    @app.get("/healthz", tags=["ops"])
    def healthz() -> dict[str, Any]:
        return {
            "status": "ok",
            "system": system.name,
            "inputs": system.inputs,
            "adapters": sorted(server.runtime.adapters),
        }

    @app.post("/v1/run", response_model=RunResponse, tags=["system"])
    def run(body: RunRequest, tenant: Tenant, state: State) -> RunResponse:
        """Run the whole system on ``inputs``; the answer and the trace's id."""
        _checked(body.inputs, "inputs")
        logged = state.server.run(body.inputs, tenant=tenant)
        return RunResponse(id=logged.id, output=logged.trace.output)

    @app.get("/v1/runs/{run_id}", response_model=RunObject, tags=["system"])
    def get_run(run_id: str, tenant: Tenant, state: State) -> RunObject:
        """The run's trace (every component's inputs and output) and its feedback."""
        return RunObject.of(state.server.log.get(run_id, tenant))

    @app.post("/v1/runs/{run_id}/feedback", response_model=RunObject, tags=["system"])
    def feedback(run_id: str, body: GivenFeedback, tenant: Tenant, state: State) -> RunObject:
        """Rate a run: ``rating`` 0-1, ``up`` or ``down``; ``comment`` and
        ``corrected_output`` optional. ``cotune feedback export`` turns ratings into data."""
        _checked(body.model_dump(exclude_none=True), "")
        logged = state.server.log.record_feedback(
            run_id, body.rating, body.comment, body.corrected_output, tenant=tenant
        )
        return RunObject.of(logged)

    return app


def serve_system(
    bundle: Path,
    host: str = "127.0.0.1",
    port: int = 8100,
    *,
    engine: Literal["vllm", "transformers"] = "vllm",
    traces: Path | None = None,
    settings: Settings | None = None,
) -> int:
    """Open the bundle (the engine starts here), then serve it with uvicorn
    (``cotune serve-system``). With no live API key in the database, one is created for tenant
    ``default`` and printed once on stderr."""
    import uvicorn

    from cotune.serving import open_bundle
    from services.api.auth import ensure_key
    from services.api.logs import configure_logging

    settings = settings or get_settings()
    configure_logging(settings.log_level, settings.log_json)
    server = open_bundle(bundle, engine=engine, traces=traces, settings=settings)
    try:
        app = create_system_app(server, settings)
        ensure_key(app.state.system.accounts, "serve-system")
        log.info(
            "serving system %s from %s; traces in %s",
            server.system.name,
            server.bundle,
            server.log.path,
        )
        uvicorn.run(app, host=host, port=port, access_log=False, log_level="info")
    finally:
        server.close()
    return 0
