"""The dashboard: ``GET /dashboard`` (and ``/dashboard/``) serves the page, its assets are at
``/dashboard/static/{name}``, and ``GET /`` redirects to it.

The page and its assets hold no data, so they need no key: the page asks for one and sends it
as ``Authorization: Bearer <key>`` on its own requests to the ``/v1`` routes, which keep their
auth. Assets come from ``services/api/dashboard/`` by a fixed allow-list of names: each has a
route of its own, so nothing from the URL ever reaches the filesystem and any other name is a
404. Every response forbids external sources with a Content-Security-Policy.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import RedirectResponse, Response

FOLDER = Path(__file__).resolve().parent.parent / "dashboard"
ASSETS = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)
HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-cache",
}

router = APIRouter(include_in_schema=False)


def _asset(name: str) -> Response:
    return Response((FOLDER / name).read_bytes(), media_type=ASSETS[name], headers=HEADERS)


@router.get("/")
def root() -> RedirectResponse:
    return RedirectResponse("/dashboard", status_code=307)


@router.get("/dashboard")
@router.get("/dashboard/")
def page() -> Response:
    """The single page; it routes by the URL fragment (``#/jobs/<id>``)."""
    return _asset("index.html")


def _serve(name: str) -> Callable[[], Response]:
    def serve_asset() -> Response:
        return _asset(name)

    return serve_asset


for _name in ASSETS:
    router.add_api_route(f"/dashboard/static/{_name}", _serve(_name), methods=["GET"])


__all__ = ["ASSETS", "CSP", "router"]
