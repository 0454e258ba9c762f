"""The job routes: creating, pricing, listing, reading, cancelling and deleting jobs. With the
events, results and downloads routers they make the one job router, which the app includes at
``/v1/jobs`` and again at ``/v1/fine_tuning/jobs`` (the openai SDK's paths).

A create or quote body is a job spec with its system, or OpenAI's single-model job
(``cotune.openai_jobs`` turns either into the spec that is checked and stored)."""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Body

from cotune.errors import SpecError
from cotune.openai_jobs import BuiltJob, job_spec_from_request
from cotune.quote import quote_job
from cotune.spec.job import JobSpec
from cotune.store import IllegalTransition, JobNotFound, JobStatus
from cotune.store.status import TERMINAL
from services.api.auth import RATE_LIMITED, Tenant
from services.api.deps import After, IdempotencyKey, Limit, State, own_job, page, page_limit
from services.api.errors import ApiError
from services.api.openapi import JOB_SPEC_BODY
from services.api.policy import check_job_for_http, split_rows
from services.api.routes import job_downloads, job_events, job_results
from services.api.schemas import DeletedObject, ErrorResponse, JobObject, ListObject, QuoteObject
from services.api.state import ApiState
from services.api.views import job_object

log = logging.getLogger("cotune.api")
SpecBody = Annotated[
    dict[str, Any],
    Body(
        description="a job spec (DESIGN.md §4): the system inline, data and corpora as file "
        "ids, models and judges by registry name; or OpenAI's single-model job {model, "
        "training_file, validation_file, method, hyperparameters, suffix, seed}",
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
UNFINISHED = [JobStatus.validating_files, JobStatus.queued, JobStatus.running]

router = APIRouter(responses={404: {"model": ErrorResponse}, **RATE_LIMITED})


@router.post(
    "",
    response_model=JobObject,
    responses={409: {"model": ErrorResponse}, 422: {"model": ErrorResponse}},
    summary="Submit a job",
    openapi_extra=JOB_SPEC_BODY,
)
def create_job(
    body: SpecBody, tenant: Tenant, state: State, idempotency_key: IdempotencyKey = None
) -> JobObject:
    built = job_spec_from_request(body)
    spec = built.spec
    if idempotency_key is not None:
        existing = state.accounts.job_for_idempotency_key(tenant, idempotency_key)
        if existing is not None:
            return _same_job(state, tenant, existing, spec)
    job = _checked(built, tenant, state)
    _check_room(state, tenant)
    job_id = state.lifecycle.create(
        job.system.name, spec, tenant_id=tenant, idempotency_key=idempotency_key
    )
    if idempotency_key is not None and own_job(state, tenant, job_id).spec != spec:
        raise _reused_key()
    _dispatch(state, job_id)
    log.info("job created", extra={"job_id": job_id, "tenant": tenant})
    return job_object(own_job(state, tenant, job_id), state)


@router.post(
    "/quote",
    response_model=QuoteObject,
    responses={422: {"model": ErrorResponse}},
    summary="Price a job (engine requests, tokens, judge calls) without running it",
    openapi_extra=JOB_SPEC_BODY,
)
def quote(body: SpecBody, tenant: Tenant, state: State) -> QuoteObject:
    built = job_spec_from_request(body)
    job = _checked(built, tenant, state)
    rows = split_rows(built.spec, state.accounts, tenant)
    priced = quote_job(
        job,
        n_train=rows["train"],
        n_val=rows["val"],
        n_test=rows["test"],
        n_feedback=rows["feedback"],
    )
    return QuoteObject(**priced)


@router.get("", response_model=ListObject[JobObject], summary="List your jobs")
def list_jobs(
    tenant: Tenant, state: State, after: After = None, limit: Limit = 20
) -> ListObject[JobObject]:
    try:
        found = state.store.list_jobs(tenant, after=after, limit=page_limit(state, limit))
    except JobNotFound:
        raise ApiError(404, "not_found", f"after: you have no job {after!r}", "after") from None
    data = [job_object(r, state, with_spec=False) for r in found.data]
    return page(data, len(data), has_more=found.has_more)


@router.get("/{job_id}", response_model=JobObject, summary="A job")
def get_job(job_id: str, tenant: Tenant, state: State) -> JobObject:
    return job_object(own_job(state, tenant, job_id), state)


@router.post(
    "/{job_id}/cancel",
    response_model=JobObject,
    responses={409: {"model": ErrorResponse}},
    summary="Cancel a job (a running one stops at the next stage boundary)",
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
    summary="Delete a finished job and its artifacts",
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
    state.lifecycle.delete(job_id)
    log.info("job deleted", extra={"job_id": job_id, "tenant": tenant})
    return DeletedObject(id=job_id, object="fine_tuning.job")


router.include_router(job_events.router)
router.include_router(job_results.router)
router.include_router(job_downloads.router)


# -- helpers ------------------------------------------------------------------------------------


def _checked(built: BuiltJob, tenant: str, state: ApiState) -> JobSpec:
    """The built spec checked against the caller's files and the server's models; a
    ``SpecError`` names the body's own field (``training_file``, not ``data.train``)."""
    try:
        return check_job_for_http(
            built.spec, tenant, state.accounts, state.settings, state.registered()
        )
    except SpecError as err:
        raise built.renamed(err) from None


def _check_room(state: ApiState, tenant: str) -> None:
    """429 when the tenant already has as many unfinished jobs as it may."""
    max_running, _ = state.accounts.limits(tenant, state.settings)
    active = state.store.count_jobs(tenant, UNFINISHED)
    if active >= max_running:
        raise ApiError(
            429,
            "too_many_jobs",
            f"you have {active} unfinished jobs, the most allowed at once is {max_running}",
        )


def _dispatch(state: ApiState, job_id: str) -> None:
    """Hand the job to its runner; a 503 (and the job failed) when that is impossible."""
    try:
        state.dispatcher.dispatch(job_id)
    except IllegalTransition:
        pass  # a concurrent request with the same Idempotency-Key dispatched it first
    except Exception as err:
        log.error("could not dispatch: %s", type(err).__name__, extra={"job_id": job_id})
        state.lifecycle.dispatch_failed(job_id)
        raise ApiError(503, "dispatch_failed", "the job could not be queued; try again") from None


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
