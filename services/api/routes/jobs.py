"""Job routes, mounted at ``/v1/jobs`` and again at ``/v1/fine_tuning/jobs`` (the openai SDK's
paths). Every route with an id looks the job up within the caller's tenant: another tenant's id
answers 404 exactly like a missing one."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Depends, Header, Query
from fastapi.responses import StreamingResponse

from cotune.errors import CotuneError
from cotune.quote import quote_job
from cotune.records import EPOCH_STAGES, JobReport, Stage, stage_output_model
from cotune.spec import SystemSpec, parse_system
from cotune.store import IllegalTransition, JobNotFound, JobRecord, JobStatus
from cotune.store.status import TERMINAL
from services.api.auth import RATE_LIMITED, Tenant
from services.api.errors import ApiError
from services.api.policy import check_job_for_http, split_rows
from services.api.schemas import (
    CheckpointObject,
    ComponentObject,
    DeletedObject,
    ErrorResponse,
    EventObject,
    JobMetrics,
    JobObject,
    ListObject,
    QuoteObject,
    TraceObject,
)
from services.api.state import ApiState, StreamSlot, get_state
from services.api.views import (
    checkpoint_object,
    event_id,
    event_object,
    job_object,
    parse_event_cursor,
    report_of,
)

log = logging.getLogger("cotune.api")
State = Annotated[ApiState, Depends(get_state)]
IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        max_length=255,
        description="the same key (per tenant) returns the same job instead of a new one",
    ),
]
Limit = Annotated[int, Query(ge=1, le=10_000, description="page size (capped by the server)")]
After = Annotated[str | None, Query(description="the last id of the previous page")]
SpecBody = Annotated[
    dict[str, Any],
    Body(
        description="a job spec (DESIGN.md §4): the system inline, data and corpora as file "
        "ids, models and judges by registry name",
        examples=[
            {
                "system": {
                    "name": "kb-qa",
                    "inputs": ["question"],
                    "output": "answer",
                    "models": {"small": {"name": "smollm2-135m"}},
                    "components": [
                        {
                            "name": "answer",
                            "kind": "llm",
                            "model": "small",
                            "reads": ["question"],
                            "writes": "answer",
                            "prompt": "Answer briefly: {question}",
                        }
                    ],
                },
                "data": {"train": "file-...", "val": "file-..."},
                "loop": {"epochs": 2},
            }
        ],
    ),
]
_TRACE_STAGES = (Stage.baseline, Stage.rollout, Stage.evaluate, Stage.test)
_STAGE_ORDER = {s: i for i, s in enumerate([Stage.baseline, *EPOCH_STAGES, Stage.test])}
_CHUNK = 1 << 20


def _page_limit(state: ApiState, limit: int) -> int:
    return min(limit, state.settings.max_page_size)


def own_job(state: ApiState, tenant: str, job_id: str) -> JobRecord:
    record = state.store.get_job(job_id, tenant)
    if record is None:
        raise JobNotFound(job_id)
    return record


def _system(record: JobRecord) -> SystemSpec:
    return parse_system(dict(record.spec["system"]))


def _result(record: JobRecord, what: str) -> JobReport:
    if record.status != JobStatus.succeeded:
        raise ApiError(
            409,
            "job_not_succeeded",
            f"job {record.id} is {record.status.value}; {what} can be downloaded once it succeeded",
        )
    report = report_of(record)
    if report is None:
        raise ApiError(409, "job_not_succeeded", f"job {record.id} has no result yet")
    return report


def _no_epoch_kept(record: JobRecord, report: JobReport, what: str) -> ApiError:
    base = "" if report.base_val_score is None else f" ({report.base_val_score:.3f} on val)"
    return ApiError(
        404,
        "no_adapter",
        f"job {record.id}: no epoch beat the base system{base}, so the result is the base "
        f"system and there is {what}",
    )


def _tar_stream(build: Any, scratch: Path) -> Iterator[bytes]:
    """Stream a finished archive, then delete its scratch folder."""
    try:
        with open(build, "rb") as f:
            while chunk := f.read(_CHUNK):
                yield chunk
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def build_router(*, openai_alias: bool = False) -> APIRouter:
    """The job routes; ``openai_alias``: the copy under ``/v1/fine_tuning/jobs``."""
    router = APIRouter(responses={404: {"model": ErrorResponse}, **RATE_LIMITED})
    suffix = " (OpenAI-compatible path)" if openai_alias else ""

    # -- creating -------------------------------------------------------------------------

    @router.post(
        "",
        response_model=JobObject,
        responses={409: {"model": ErrorResponse}, 422: {"model": ErrorResponse}},
        summary="Submit a job" + suffix,
    )
    def create_job(
        spec: SpecBody, tenant: Tenant, state: State, idempotency_key: IdempotencyKey = None
    ) -> JobObject:
        store, settings = state.store, state.settings
        if idempotency_key is not None:
            existing = state.accounts.job_for_idempotency_key(tenant, idempotency_key)
            if existing is not None:
                return _same_job(state, tenant, existing, spec)
        job = check_job_for_http(spec, tenant, state.accounts, settings)
        max_running, _ = state.accounts.limits(tenant, settings)
        active = store.count_jobs(
            tenant, [JobStatus.validating_files, JobStatus.queued, JobStatus.running]
        )
        if active >= max_running:
            raise ApiError(
                429,
                "too_many_jobs",
                f"you have {active} unfinished jobs, the most allowed at once is {max_running}",
            )
        job_id = state.lifecycle.create(
            job.system.name, spec, tenant_id=tenant, idempotency_key=idempotency_key
        )
        record = own_job(state, tenant, job_id)
        if idempotency_key is not None and record.spec != spec:
            raise _reused_key()
        try:
            state.dispatcher.dispatch(job_id)
        except IllegalTransition:
            pass  # a concurrent request with the same Idempotency-Key dispatched it first
        except Exception as err:
            log.error("could not dispatch: %s", type(err).__name__, extra={"job_id": job_id})
            state.lifecycle.dispatch_failed(job_id)
            raise ApiError(
                503, "dispatch_failed", "the job could not be queued; try again"
            ) from None
        log.info("job created", extra={"job_id": job_id, "tenant": tenant})
        return job_object(own_job(state, tenant, job_id), state)

    @router.post(
        "/quote",
        response_model=QuoteObject,
        responses={422: {"model": ErrorResponse}},
        summary="Price a job (engine requests, tokens, judge calls) without running it" + suffix,
    )
    def quote(spec: SpecBody, tenant: Tenant, state: State) -> QuoteObject:
        job = check_job_for_http(spec, tenant, state.accounts, state.settings)
        rows = split_rows(spec, state.accounts, tenant)
        priced = quote_job(job, n_train=rows["train"], n_val=rows["val"], n_test=rows["test"])
        return QuoteObject(**priced)

    # -- reading --------------------------------------------------------------------------

    @router.get("", response_model=ListObject[JobObject], summary="List your jobs" + suffix)
    def list_jobs(
        tenant: Tenant, state: State, after: After = None, limit: Limit = 20
    ) -> ListObject[JobObject]:
        try:
            page = state.store.list_jobs(tenant, after=after, limit=_page_limit(state, limit))
        except JobNotFound:
            raise ApiError(404, "not_found", f"after: you have no job {after!r}", "after") from None
        data = [job_object(r, state, with_spec=False) for r in page.data]
        return ListObject[JobObject](
            data=data,
            has_more=page.has_more,
            first_id=data[0].id if data else None,
            last_id=data[-1].id if data else None,
        )

    @router.get("/{job_id}", response_model=JobObject, summary="A job" + suffix)
    def get_job(job_id: str, tenant: Tenant, state: State) -> JobObject:
        return job_object(own_job(state, tenant, job_id), state)

    @router.post(
        "/{job_id}/cancel",
        response_model=JobObject,
        responses={409: {"model": ErrorResponse}},
        summary="Cancel a job (a running one stops at the next stage boundary)" + suffix,
    )
    def cancel_job(job_id: str, tenant: Tenant, state: State) -> JobObject:
        own_job(state, tenant, job_id)
        record = state.lifecycle.request_cancel(job_id)
        log.info("job cancel requested", extra={"job_id": job_id, "tenant": tenant})
        return job_object(record, state)

    @router.delete(
        "/{job_id}",
        response_model=DeletedObject,
        responses={409: {"model": ErrorResponse}},
        summary="Delete a finished job and its artifacts" + suffix,
    )
    def delete_job(job_id: str, tenant: Tenant, state: State) -> DeletedObject:
        record = own_job(state, tenant, job_id)
        if record.status not in TERMINAL:
            raise ApiError(
                409,
                "job_not_finished",
                f"job {job_id} is {record.status.value}; cancel it (and wait until it is "
                "cancelled) before deleting it",
            )
        state.artifacts.delete(job_id)
        state.store.delete_job(job_id)
        shutil.rmtree(state.settings.work_dir() / job_id, ignore_errors=True)
        log.info("job deleted", extra={"job_id": job_id, "tenant": tenant})
        return DeletedObject(id=job_id, object="fine_tuning.job")

    @router.get(
        "/{job_id}/events",
        response_model=ListObject[EventObject],
        responses={
            200: {"content": {"text/event-stream": {}}},
            429: {"model": ErrorResponse, "description": "too many open streams"},
        },
        summary="A job's events, oldest first; ?stream=true for server-sent events" + suffix,
    )
    def list_events(
        job_id: str,
        tenant: Tenant,
        state: State,
        after: After = None,
        limit: Limit = 20,
        stream: bool = False,
        last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
    ) -> Any:
        own_job(state, tenant, job_id)
        cursor = (
            parse_event_cursor(after)
            if after
            else parse_event_cursor(last_event_id, "Last-Event-ID")
        )
        if stream:
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
        limit = _page_limit(state, limit)
        events = state.store.events(job_id, after_id=cursor, limit=limit + 1)
        data = [event_object(e, state) for e in events[:limit]]
        return ListObject[EventObject](
            data=data,
            has_more=len(events) > limit,
            first_id=data[0].id if data else None,
            last_id=data[-1].id if data else None,
        )

    @router.get(
        "/{job_id}/checkpoints",
        response_model=ListObject[CheckpointObject],
        summary="One checkpoint per kept epoch, newest first" + suffix,
    )
    def list_checkpoints(
        job_id: str, tenant: Tenant, state: State, after: After = None, limit: Limit = 10
    ) -> ListObject[CheckpointObject]:
        record = own_job(state, tenant, job_id)
        finished = {
            s.epoch: s.finished_at
            for s in state.store.stage_states(job_id)
            if s.stage == Stage.evaluate and s.finished_at is not None
        }
        kept = [e for e in reversed(state.store.epochs(job_id)) if e.kept]
        items = [checkpoint_object(record, e, finished.get(e.epoch)) for e in kept]
        if after is not None:
            ids = [c.id for c in items]
            if after not in ids:
                raise ApiError(404, "not_found", f"after: no checkpoint {after}", "after")
            items = items[ids.index(after) + 1 :]
        limit = _page_limit(state, limit)
        data = items[:limit]
        return ListObject[CheckpointObject](
            data=data,
            has_more=len(items) > limit,
            first_id=data[0].id if data else None,
            last_id=data[-1].id if data else None,
        )

    @router.get(
        "/{job_id}/metrics",
        response_model=JobMetrics,
        summary="Per-epoch, per-component and per-stage numbers (metrics.json)" + suffix,
    )
    def job_metrics(job_id: str, tenant: Tenant, state: State) -> JobMetrics:
        record = own_job(state, tenant, job_id)
        report = report_of(record) or JobReport(
            job_name=record.name,
            status=record.status.value,
            epochs=state.store.epochs(job_id),
            stages=state.store.stages(job_id),
        )
        report.status = record.status.value
        report.adapters = {c: f"/v1/jobs/{job_id}/adapters/{c}" for c in report.adapters}
        return JobMetrics(**report.model_dump(), job_id=job_id, cost=report.totals())

    @router.get(
        "/{job_id}/components",
        response_model=ListObject[ComponentObject],
        summary="The system's components and what each epoch did to them" + suffix,
    )
    def list_components(job_id: str, tenant: Tenant, state: State) -> ListObject[ComponentObject]:
        record = own_job(state, tenant, job_id)
        system = _system(record)
        per: dict[str, list[Any]] = {}
        for epoch in state.store.epochs(job_id):
            for c in epoch.components:
                per.setdefault(c.component, []).append(c)
        data = []
        for component in system.components:
            ref = system.models.get(component.model or "")
            data.append(
                ComponentObject(
                    id=component.name,
                    name=component.name,
                    kind=component.kind,
                    model=ref.name if ref is not None else None,
                    tool=component.tool,
                    trainable=component.is_trainable,
                    reads=component.reads,
                    writes=component.writes,
                    epochs=per.get(component.name, []),
                )
            )
        return ListObject[ComponentObject](data=data, has_more=False)

    @router.get(
        "/{job_id}/traces",
        response_model=ListObject[TraceObject],
        summary="Traces from the stored stage outputs (baseline, rollout, evaluate, test)" + suffix,
    )
    def list_traces(
        job_id: str,
        tenant: Tenant,
        state: State,
        epoch: int | None = None,
        stage: Literal["baseline", "rollout", "evaluate", "test"] | None = None,
        passed: bool | None = None,
        after: After = None,
        limit: Limit = 20,
    ) -> ListObject[TraceObject]:
        record = own_job(state, tenant, job_id)
        system = _system(record)
        limit = _page_limit(state, limit)
        states = sorted(
            (
                s
                for s in state.store.stage_states(job_id)
                if s.stage in _TRACE_STAGES
                and s.status == "done"
                and s.output_key
                and (epoch is None or s.epoch == epoch)
                and (stage is None or s.stage.value == stage)
            ),
            key=lambda s: (s.epoch, _STAGE_ORDER[s.stage]),
        )
        after_pos = _trace_cursor(after) if after else None
        data: list[TraceObject] = []
        more = False
        for s in states:
            position = (s.epoch, _STAGE_ORDER[s.stage])
            if after_pos is not None and position < after_pos[:2]:
                continue
            if after_pos is not None and position > after_pos[:2]:
                after_pos = None  # the cursor's trace is gone: carry on after its stage
            try:
                stored = state.artifacts.get_json(str(s.output_key))
            except FileNotFoundError:
                continue
            output = stage_output_model(s.stage).model_validate(stored)
            for trace in output.shown_traces():
                tid = f"{s.epoch}:{s.stage.value}:{trace.trace_id}"
                if after_pos is not None:
                    if tid == after:
                        after_pos = None
                    continue
                if passed is not None and trace.passed is not passed:
                    continue
                if len(data) == limit:
                    more = True
                    break
                shown = trace.model_dump(mode="json")
                data.append(
                    _trace_object(state, job_id, system, s.epoch, s.stage.value, tid, shown)
                )
            if more:
                break
        return ListObject[TraceObject](
            data=data,
            has_more=more,
            first_id=data[0].id if data else None,
            last_id=data[-1].id if data else None,
        )

    # -- downloads ------------------------------------------------------------------------

    @router.get(
        "/{job_id}/adapters/{component}",
        response_class=StreamingResponse,
        responses={
            200: {"content": {"application/gzip": {}}},
            404: {"model": ErrorResponse},
            409: {"model": ErrorResponse},
        },
        summary="The best epoch's PEFT adapter of a component, as a .tar.gz" + suffix,
    )
    def download_adapter(
        job_id: str, component: str, tenant: Tenant, state: State
    ) -> StreamingResponse:
        record = own_job(state, tenant, job_id)
        system = _system(record)
        names = [c.name for c in system.trainable_components]
        if component not in names:
            raise ApiError(
                404,
                "not_found",
                f"job {job_id} has no trainable component {component!r} (it has {names})",
                "component",
            )
        report = _result(record, "adapters")
        if report.best_epoch is None or component not in report.adapters:
            raise _no_epoch_kept(record, report, f"no adapter for {component!r}")
        key = report.adapters[component]
        files = [k for k in state.artifacts.list(key) if k.endswith((".json", ".safetensors"))]
        if not files:
            raise ApiError(404, "not_found", f"the adapter of {component!r} is gone")
        import tarfile

        scratch = Path(tempfile.mkdtemp(prefix="cotune-adapter-"))
        archive = scratch / f"{component}.tar.gz"
        try:
            with tarfile.open(archive, "w:gz") as tar:
                for k in files:
                    data = state.artifacts.get_bytes(k)
                    info = tarfile.TarInfo(f"{component}/{k[len(key) + 1 :]}")
                    info.size, info.mode, info.mtime = len(data), 0o644, 0
                    import io

                    tar.addfile(info, io.BytesIO(data))
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise
        return StreamingResponse(
            _tar_stream(archive, scratch),
            media_type="application/gzip",
            headers={
                "content-disposition": f'attachment; filename="{job_id}-{component}.tar.gz"',
                "content-length": str(archive.stat().st_size),
            },
        )

    @router.get(
        "/{job_id}/bundle",
        response_class=StreamingResponse,
        responses={
            200: {"content": {"application/gzip": {}}},
            404: {"model": ErrorResponse},
            409: {"model": ErrorResponse},
        },
        summary="Every adapter, the system, serve.sh and a manifest, as a .tar.gz" + suffix,
    )
    def download_bundle(job_id: str, tenant: Tenant, state: State) -> StreamingResponse:
        from cotune.bundle import build_bundle, write_bundle_tar

        record = own_job(state, tenant, job_id)
        report = _result(record, "the bundle")
        if report.best_epoch is None or not report.adapters:
            raise _no_epoch_kept(record, report, "no bundle of adapters")
        system = _system(record)
        scratch = Path(tempfile.mkdtemp(prefix="cotune-bundle-"))
        try:
            adapters = {
                c: state.artifacts.get_dir(key, scratch / "adapters" / c)
                for c, key in report.adapters.items()
            }
            base_models = {a: ref.name for a, ref in system.models.items() if ref.name}
            folder = build_bundle(
                system,
                adapters,
                scratch / f"{record.name}-{job_id}",
                base_models=base_models,
                job_name=f"{record.name}:{job_id}",
            )
            archive = write_bundle_tar(folder)
        except CotuneError as err:
            shutil.rmtree(scratch, ignore_errors=True)
            message = str(err).replace(str(scratch), "<bundle>")
            log.error("bundle failed: %s", message, extra={"job_id": job_id})
            raise ApiError(500, "bundle_failed", state.redact(message) or message) from None
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise
        return StreamingResponse(
            _tar_stream(archive, scratch),
            media_type="application/gzip",
            headers={
                "content-disposition": f'attachment; filename="{archive.name}"',
                "content-length": str(archive.stat().st_size),
            },
        )

    return router


# -- helpers ------------------------------------------------------------------------------------


def _reused_key() -> ApiError:
    return ApiError(
        409,
        "idempotency_key_reused",
        "this Idempotency-Key was used for a different job spec",
        "Idempotency-Key",
    )


def _same_job(state: ApiState, tenant: str, job_id: str, spec: dict[str, Any]) -> JobObject:
    record = own_job(state, tenant, job_id)
    if record.spec != spec:
        raise _reused_key()
    return job_object(record, state)


def _trace_cursor(after: str) -> tuple[int, int, str]:
    epoch, _, rest = after.partition(":")
    stage, _, trace_id = rest.partition(":")
    try:
        return int(epoch), _STAGE_ORDER[Stage(stage)], trace_id
    except (ValueError, KeyError):
        raise ApiError(
            422, "invalid_request", f"after: {after!r} is not a trace id", "after"
        ) from None


def _trace_object(
    state: ApiState,
    job_id: str,
    system: SystemSpec,
    epoch: int,
    stage: str,
    tid: str,
    trace: dict[str, Any],
) -> TraceObject:
    """A stored trace with server paths taken out of its spans: the model becomes its registry
    name and an adapter its artifact key within the job."""
    spans = []
    for span in trace.get("spans") or []:
        span = dict(span)
        try:
            component = system.component(str(span.get("component")))
        except KeyError:
            component = None
        if span.get("model") is not None:
            ref = system.models.get(component.model or "") if component is not None else None
            span["model"] = ref.name if ref is not None and ref.name else None
        adapter = span.get("adapter")
        if isinstance(adapter, str):
            marker = f"{job_id}/"
            span["adapter"] = (
                adapter[adapter.index(marker) + len(marker) :] if marker in adapter else None
            )
        spans.append(span)
    fields = {k: v for k, v in trace.items() if k != "spans"}
    return TraceObject(id=tid, epoch=epoch, stage=stage, spans=spans, **fields)


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


__all__ = ["build_router", "own_job"]
