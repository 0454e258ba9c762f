"""Errors as ``{"error": {"code", "message", "param"}}``, the OpenAI shape.

- ``SpecError`` -> 422 with its ``param``; ``DataError`` (an upload) -> 422 naming line/field;
  any other ``CotuneError`` -> 422;
- ``IllegalTransition`` -> 409; ``JobNotFound`` (or another tenant's id) -> 404;
- a missing, malformed or revoked key -> 401; an oversize body -> 413;
- request validation -> 422 naming the parameter; anything unexpected -> 500 without details
  (logged with its traceback).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from cotune.errors import CotuneError, DataError, SpecError
from cotune.store import IllegalTransition, JobNotFound

log = logging.getLogger("cotune.api")

_CODES = {
    400: "bad_request",
    401: "invalid_api_key",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "request_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "rate_limit_exceeded",
    500: "internal_error",
    501: "not_implemented",
    503: "unavailable",
}


class ApiError(StarletteHTTPException):
    """An error the API answers with on purpose. A Starlette ``HTTPException`` so that one
    raised while a body is read (the upload size limit) passes through FastAPI unchanged."""

    def __init__(
        self,
        status_code: int,
        code: str,
        message: str,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(status_code=status_code, detail=message, headers=headers)
        self.code, self.message, self.param = code, message, param


def error_body(code: str, message: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "param": param}}


def error_response(
    status: int,
    code: str,
    message: str,
    param: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(
        error_body(code, message, param),
        status_code=status,
        headers=dict(headers) if headers else None,
    )


def not_found(what: str, ident: str) -> ApiError:
    return ApiError(404, "not_found", f"no {what} {ident}")


def _loc_param(loc: Any) -> str | None:
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "query", "path", "header", "cookie"):
        parts = parts[1:]
    return ".".join(parts) or None


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route of the app serves at this request's path."""
    from starlette.routing import Match, Route

    methods: set[str] = set()
    for route in request.app.routes:
        if isinstance(route, Route) and route.methods:
            match, _ = route.matches({**request.scope, "method": "GET", "type": "http"})
            if match != Match.NONE:
                methods |= route.methods
    return sorted(methods)


def _clean(request: Request, text: str) -> str:
    """``text`` without server folders (the app's ``ApiState.redact``)."""
    state = getattr(request.app.state, "cotune", None)
    cleaned = state.redact(text) if state is not None else text
    return cleaned if cleaned is not None else text


def install(app: FastAPI) -> None:
    """Register the handlers on ``app``."""

    @app.exception_handler(ApiError)
    async def _api(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status_code, exc.code, exc.message, exc.param, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if isinstance(exc, ApiError):
            return error_response(exc.status_code, exc.code, exc.message, exc.param, exc.headers)
        code = _CODES.get(exc.status_code, "error")
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            # Starlette names the first route that matched the path; others may serve it too.
            headers["Allow"] = ", ".join(_allowed_methods(request))
        return error_response(exc.status_code, code, str(exc.detail), None, headers or None)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        # A body that is not JSON at all: its loc is the character offset, not a field.
        json_invalid = first.get("type") == "json_invalid"
        loc = tuple(first.get("loc", ()))
        if loc == ("body",) and isinstance(first.get("input"), bytes):
            # FastAPI hands over the raw bytes when the content type is not JSON.
            return error_response(
                415, "unsupported_media_type", "send the body as application/json", "body"
            )
        param = "body" if json_invalid or loc == ("body",) else _loc_param(loc)
        message = str(first.get("msg", "invalid request"))
        if param:
            message = f"{param}: {message}"
        return error_response(422, "invalid_request", message, param)

    @app.exception_handler(IllegalTransition)
    async def _conflict(request: Request, exc: IllegalTransition) -> JSONResponse:
        return error_response(409, exc.code, exc.message)

    @app.exception_handler(JobNotFound)
    async def _missing(request: Request, exc: JobNotFound) -> JSONResponse:
        return error_response(404, "not_found", exc.message)

    @app.exception_handler(SpecError)
    async def _spec(request: Request, exc: SpecError) -> JSONResponse:
        return error_response(422, "invalid_spec", _clean(request, exc.message), exc.param)

    @app.exception_handler(DataError)
    async def _data(request: Request, exc: DataError) -> JSONResponse:
        return error_response(422, "invalid_file", _clean(request, str(exc)), exc.param)

    @app.exception_handler(CotuneError)
    async def _cotune(request: Request, exc: CotuneError) -> JSONResponse:
        return error_response(422, "invalid_request", _clean(request, str(exc)))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error(
            "unhandled error on %s %s: %s",
            request.method,
            request.url.path,
            type(exc).__name__,
            exc_info=exc,
        )
        return error_response(500, "internal_error", "internal error; see the server's log")
