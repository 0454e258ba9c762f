"""What the job routes share: their parameters, the caller's job and its result, and a page."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, TypeVar

from fastapi import Depends, Header, Query

from cotune.records import JobReport
from cotune.spec import SystemSpec, parse_system
from cotune.store import JobNotFound, JobRecord, JobStatus
from services.api.errors import ApiError
from services.api.schemas import ListObject
from services.api.state import ApiState, get_state
from services.api.views import report_of

T = TypeVar("T")

State = Annotated[ApiState, Depends(get_state)]
IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        max_length=255,
        # Printable ASCII: what HTTP allows in a header value, and nothing PostgreSQL refuses.
        pattern=r"^[\x20-\x7e]+$",
        description="the same key (per tenant) returns the same job or file instead of a new one",
    ),
]
Limit = Annotated[int, Query(ge=1, le=10_000, description="page size (capped by the server)")]
After = Annotated[str | None, Query(description="the last id of the previous page")]


def page_limit(state: ApiState, limit: int) -> int:
    return min(limit, state.settings.max_page_size)


def page(items: Sequence[T], limit: int, has_more: bool | None = None) -> ListObject[T]:
    """The first ``limit`` items as a list page (more exist if there were more items)."""
    data = list(items[:limit])
    return ListObject[T](
        data=data,
        has_more=len(items) > limit if has_more is None else has_more,
        first_id=getattr(data[0], "id", None) if data else None,
        last_id=getattr(data[-1], "id", None) if data else None,
    )


def own_job(state: ApiState, tenant: str, job_id: str) -> JobRecord:
    """The caller's job: another tenant's id answers 404 exactly like a missing one."""
    record = state.store.get_job(job_id, tenant)
    if record is None:
        raise JobNotFound(job_id)
    return record


def job_system(record: JobRecord) -> SystemSpec:
    return parse_system(dict(record.spec["system"]))


def job_result(record: JobRecord, what: str) -> JobReport:
    """A succeeded job's report; 409 naming ``what`` cannot be had before."""
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


def no_epoch_kept(record: JobRecord, report: JobReport, what: str) -> ApiError:
    base = "" if report.base_val_score is None else f" ({report.base_val_score:.3f} on val)"
    return ApiError(
        404,
        "no_adapter",
        f"job {record.id}: no epoch beat the base system{base}, so the result is the base "
        f"system and there is {what}",
    )
