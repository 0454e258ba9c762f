"""A finished job's downloads: one component's adapter, or the whole bundle."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from services.api.archives import adapter_archive, archive_response, bundle_archive
from services.api.auth import Tenant
from services.api.deps import State, job_result, job_system, no_epoch_kept, own_job
from services.api.errors import ApiError
from services.api.schemas import ErrorResponse

router = APIRouter()
ARCHIVE_RESPONSES: dict[int | str, dict[str, object]] = {
    200: {"content": {"application/gzip": {}}},
    404: {"model": ErrorResponse},
    409: {"model": ErrorResponse},
}


@router.get(
    "/{job_id}/adapters/{component}",
    response_class=StreamingResponse,
    responses=ARCHIVE_RESPONSES,
    summary="The best epoch's PEFT adapter of a component, as a .tar.gz",
)
def download_adapter(
    job_id: str, component: str, tenant: Tenant, state: State
) -> StreamingResponse:
    record = own_job(state, tenant, job_id)
    names = [c.name for c in job_system(record).trainable_components]
    if component not in names:
        raise ApiError(
            404,
            "not_found",
            f"job {job_id} has no trainable component {component!r} (it has {names})",
            "component",
        )
    report = job_result(record, "adapters")
    if report.best_epoch is None or component not in report.adapters:
        raise no_epoch_kept(record, report, f"no adapter for {component!r}")
    archive = adapter_archive(state, component, report.adapters[component])
    return archive_response(archive, f"{job_id}-{component}.tar.gz")


@router.get(
    "/{job_id}/bundle",
    response_class=StreamingResponse,
    responses=ARCHIVE_RESPONSES,
    summary="Every adapter, the system, serve.sh and a manifest, as a .tar.gz",
)
def download_bundle(job_id: str, tenant: Tenant, state: State) -> StreamingResponse:
    record = own_job(state, tenant, job_id)
    report = job_result(record, "the bundle")
    if report.best_epoch is None or not report.adapters:
        raise no_epoch_kept(record, report, "no bundle of adapters")
    archive = bundle_archive(state, record, job_system(record), report.adapters)
    return archive_response(archive, archive.name)
