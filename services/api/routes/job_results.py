"""What a job learned: checkpoints, metrics, components and traces."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter

from cotune.records import JobReport, Stage
from services.api.auth import Tenant
from services.api.deps import After, Limit, State, job_system, own_job, page, page_limit
from services.api.errors import ApiError
from services.api.schemas import (
    CheckpointObject,
    ComponentObject,
    JobMetrics,
    ListObject,
    TraceObject,
)
from services.api.traces import TraceFilter, trace_page
from services.api.views import checkpoint_object, component_objects, report_of

router = APIRouter()


@router.get(
    "/{job_id}/checkpoints",
    response_model=ListObject[CheckpointObject],
    summary="One checkpoint per kept epoch, newest first",
)
def list_checkpoints(
    job_id: str, tenant: Tenant, state: State, after: After = None, limit: Limit = 10
) -> ListObject[CheckpointObject]:
    record = own_job(state, tenant, job_id)
    finished = {
        s.epoch: s.finished_at
        for s in state.store.stage_states(job_id)
        if s.stage == Stage.evaluate and not s.component and s.finished_at is not None
    }
    kept = [e for e in reversed(state.store.epochs(job_id)) if e.kept]
    items = [checkpoint_object(record, e, finished.get(e.epoch)) for e in kept]
    if after is not None:
        ids = [c.id for c in items]
        if after not in ids:
            raise ApiError(404, "not_found", f"after: no checkpoint {after}", "after")
        items = items[ids.index(after) + 1 :]
    return page(items, page_limit(state, limit))


@router.get(
    "/{job_id}/metrics",
    response_model=JobMetrics,
    summary="Per-epoch, per-component and per-stage numbers (metrics.json)",
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
    summary="The system's components and what each epoch did to them",
)
def list_components(job_id: str, tenant: Tenant, state: State) -> ListObject[ComponentObject]:
    record = own_job(state, tenant, job_id)
    data = component_objects(job_system(record), state.store.epochs(job_id))
    return ListObject[ComponentObject](data=data, has_more=False)


@router.get(
    "/{job_id}/traces",
    response_model=ListObject[TraceObject],
    summary="Traces from the stored stage outputs (baseline, rollout, evaluate, test)",
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
    wanted = TraceFilter(epoch=epoch, stage=stage, passed=passed)
    return trace_page(state, record, wanted, after, page_limit(state, limit))
