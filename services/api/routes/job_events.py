"""A job's events: a page of them, or a server-sent stream until the job ends."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header
from fastapi.responses import StreamingResponse

from cotune.store import JobRecord
from cotune.store.status import TERMINAL
from services.api.auth import Tenant
from services.api.deps import After, Limit, State, own_job, page, page_limit
from services.api.errors import ApiError
from services.api.schemas import ErrorResponse, EventObject, ListObject
from services.api.state import ApiState, StreamSlot
from services.api.views import event_id, event_object, parse_event_cursor

router = APIRouter()
LastEventId = Annotated[str | None, Header(alias="Last-Event-ID")]


@router.get(
    "/{job_id}/events",
    response_model=ListObject[EventObject],
    responses={
        200: {"content": {"text/event-stream": {}}},
        429: {"model": ErrorResponse, "description": "too many open streams"},
    },
    summary="A job's events, oldest first; ?stream=true for server-sent events",
)
def list_events(
    job_id: str,
    tenant: Tenant,
    state: State,
    after: After = None,
    limit: Limit = 20,
    stream: bool = False,
    last_event_id: LastEventId = None,
) -> Any:
    own_job(state, tenant, job_id)
    cursor = (
        parse_event_cursor(after) if after else parse_event_cursor(last_event_id, "Last-Event-ID")
    )
    if stream:
        return _open_stream(state, tenant, job_id, cursor)
    limit = page_limit(state, limit)
    events = state.store.events(job_id, after_id=cursor, limit=limit + 1)
    return page([event_object(e, state) for e in events], limit)


def _open_stream(
    state: ApiState, tenant: str, job_id: str, cursor: int | None
) -> StreamingResponse:
    """A stream in one of the tenant's stream slots; 429 when they are all taken."""
    limit = state.settings.max_streams_per_tenant
    slot = state.streams.acquire(tenant, limit)
    if slot is None:
        raise ApiError(
            429,
            "too_many_streams",
            f"you have {limit} event streams open, the most allowed at once; close "
            "one, or poll without stream=true",
            "stream",
        )
    return StreamingResponse(
        _event_stream(state, tenant, job_id, cursor, slot),
        media_type="text/event-stream",
        headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
    )


async def _event_stream(
    state: ApiState, tenant: str, job_id: str, cursor: int | None, slot: StreamSlot
) -> AsyncIterator[bytes]:
    """Server-sent events until the job is terminal and every event was sent; a comment
    every 15 s keeps proxies from closing an idle stream. Async: each poll borrows a worker
    thread for its two queries only, and the wait between polls holds none, so open streams
    cannot starve the routes (and ``/healthz``) that share the thread pool."""
    from anyio import sleep, to_thread

    poll = state.settings.events_poll_seconds
    last_beat = time.monotonic()

    def read(after: int | None) -> tuple[JobRecord | None, list[Any]]:
        return state.store.get_job(job_id, tenant), state.store.events(
            job_id, after_id=after, limit=100
        )

    try:
        yield b"retry: 2000\n\n"
        while True:
            record, events = await to_thread.run_sync(read, cursor)
            for e in events:
                cursor = e.id
                body = event_object(e, state).model_dump_json()
                yield f"id: {event_id(e)}\nevent: event\ndata: {body}\n\n".encode()
            if events:
                continue
            if record is None:
                yield b'event: done\ndata: {"status": "deleted"}\n\n'
                return
            if record.status in TERMINAL:
                status = json.dumps({"status": record.status.value, "id": record.id})
                yield f"event: done\ndata: {status}\n\n".encode()
                return
            if time.monotonic() - last_beat > 15:
                last_beat = time.monotonic()
                yield b": keepalive\n\n"
            await sleep(poll)
    finally:
        slot.release()
