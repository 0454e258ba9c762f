"""``/v1/files``: uploads checked at once (UTF-8, JSON per line, line size, field types; 422
naming the line and field; 413 past the size limit or the tenant's storage), listed, downloaded
and deleted, each scoped to the caller's tenant."""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterator
from pathlib import PurePosixPath, PureWindowsPath
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from starlette.datastructures import UploadFile

from cotune.errors import DataError
from cotune.store.accounts import PURPOSES, new_file_id
from services.api.auth import RATE_LIMITED, Tenant
from services.api.deps import After, IdempotencyKey, Limit, State, page, page_limit
from services.api.errors import ApiError, not_found
from services.api.policy import file_ids
from services.api.schemas import DeletedObject, ErrorResponse, FileObject, ListObject
from services.api.state import ApiState
from services.api.uploads import check_upload
from services.api.views import file_object

log = logging.getLogger("cotune.api")
router = APIRouter(tags=["files"], responses={404: {"model": ErrorResponse}, **RATE_LIMITED})
_CHUNK = 1 << 20

UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file", "purpose"],
                    "properties": {
                        "file": {"type": "string", "format": "binary"},
                        "purpose": {"type": "string", "enum": list(PURPOSES)},
                    },
                }
            }
        },
    }
}


def _filename(raw: str | None) -> str:
    """The client's file name without any folder part or control characters."""
    name = PureWindowsPath(PurePosixPath(raw or "upload.jsonl").name).name
    name = re.sub(r"[\x00-\x1f\x7f]", "", name).strip() or "upload.jsonl"
    return name[:255]


def _store_upload(
    state: ApiState, tenant: str, purpose: str, upload: UploadFile, idempotency_key: str | None
) -> FileObject:
    settings, accounts = state.settings, state.accounts
    filename = _filename(upload.filename)
    stream = upload.file
    stream.seek(0)
    digest, size = hashlib.sha256(), 0
    while chunk := stream.read(_CHUNK):
        digest.update(chunk)
        size += len(chunk)
        if size > settings.max_upload_bytes:
            raise ApiError(
                413,
                "file_too_large",
                f"{filename}: larger than the limit of {settings.max_upload_bytes} bytes",
            )
    sha256 = digest.hexdigest()
    if idempotency_key is not None:
        existing = accounts.file_for_idempotency_key(tenant, idempotency_key)
        if existing is not None:
            if existing.sha256 != sha256 or existing.purpose != purpose:
                raise ApiError(
                    409,
                    "idempotency_key_reused",
                    "this Idempotency-Key was used for a different upload",
                    "Idempotency-Key",
                )
            return file_object(existing)
    stream.seek(0)
    summary = check_upload(stream, purpose, filename, max_line_bytes=settings.max_line_bytes)
    _, max_storage = accounts.limits(tenant, settings)
    used = accounts.storage_used(tenant)
    if used + size > max_storage:
        raise ApiError(
            413,
            "storage_quota_exceeded",
            f"{filename}: {size} bytes would take your storage to {used + size} of "
            f"{max_storage} bytes; delete files you no longer need",
        )
    file_id = new_file_id()
    key = f"files/{tenant}/{file_id}"
    stream.seek(0)
    state.artifacts.put_bytes(key, stream.read())
    try:
        record = accounts.add_file(
            tenant,
            purpose,
            filename,
            size,
            sha256,
            key,
            summary.rows,
            summary.fields,
            file_id=file_id,
            idempotency_key=idempotency_key,
        )
    except BaseException:
        state.artifacts.delete(key)
        raise
    if record.id != file_id:  # a concurrent request with the same key won
        state.artifacts.delete(key)
    log.info("file uploaded", extra={"file_id": record.id, "tenant": tenant})
    return file_object(record)


@router.post(
    "/v1/files",
    response_model=FileObject,
    openapi_extra=UPLOAD_BODY,
    responses={413: {"model": ErrorResponse}, 422: {"model": ErrorResponse}},
    summary="Upload a data file (JSONL or CSV) or a corpus (JSONL), checked at once",
)
async def upload_file(
    request: Request, tenant: Tenant, state: State, idempotency_key: IdempotencyKey = None
) -> FileObject:
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise ApiError(
            415,
            "unsupported_media_type",
            "send multipart/form-data with a 'file' part and a 'purpose' field",
        )
    form = await request.form(max_files=1, max_fields=8)
    try:
        purpose = form.get("purpose")
        upload = form.get("file")
        if not isinstance(purpose, str) or purpose not in PURPOSES:
            raise ApiError(
                422,
                "invalid_request",
                f"purpose: must be one of {list(PURPOSES)}, got {purpose!r}",
                "purpose",
            )
        if not isinstance(upload, UploadFile):
            raise ApiError(422, "invalid_request", "file: a file part is required", "file")
        try:
            return await run_in_threadpool(
                _store_upload, state, tenant, purpose, upload, idempotency_key
            )
        except DataError as err:
            raise ApiError(422, "invalid_file", str(err), err.param) from None
    finally:
        await form.close()


@router.get("/v1/files", response_model=ListObject[FileObject], summary="List your files")
def list_files(
    tenant: Tenant,
    state: State,
    purpose: Annotated[str | None, Query(pattern="^(data|fine-tune|feedback|corpus)$")] = None,
    after: After = None,
    limit: Limit = 20,
) -> ListObject[FileObject]:
    limit = page_limit(state, limit)
    try:
        found = state.accounts.list_files(tenant, purpose=purpose, after=after, limit=limit)
    except LookupError:
        raise ApiError(404, "not_found", f"after: no file {after}", "after") from None
    data = [file_object(r) for r in found.data]
    return page(data, len(data), has_more=found.has_more)


def _own_file(state: ApiState, tenant: str, file_id: str) -> Any:
    record = state.accounts.get_file(file_id, tenant)
    if record is None:
        raise not_found("file", file_id)
    return record


@router.get("/v1/files/{file_id}", response_model=FileObject, summary="A file's details")
def get_file(file_id: str, tenant: Tenant, state: State) -> FileObject:
    return file_object(_own_file(state, tenant, file_id))


@router.get(
    "/v1/files/{file_id}/content",
    response_class=StreamingResponse,
    summary="Download a file you uploaded",
)
def file_content(file_id: str, tenant: Tenant, state: State) -> StreamingResponse:
    record = _own_file(state, tenant, file_id)
    if not state.artifacts.isfile(record.key):
        raise ApiError(404, "not_found", f"the content of file {file_id} is gone")

    def chunks() -> Iterator[bytes]:
        with state.artifacts.open_read(record.key) as f:
            while chunk := f.read(_CHUNK):
                yield chunk

    return StreamingResponse(
        chunks(),
        media_type="text/csv" if record.filename.lower().endswith(".csv") else "application/jsonl",
        headers={
            "content-disposition": f"attachment; filename*=UTF-8''{quote(record.filename)}",
            "content-length": str(record.bytes),
        },
    )


@router.delete("/v1/files/{file_id}", response_model=DeletedObject, summary="Delete a file")
def delete_file(file_id: str, tenant: Tenant, state: State) -> DeletedObject:
    record = _own_file(state, tenant, file_id)
    users = [
        job_id
        for job_id, spec in state.accounts.unfinished_jobs(tenant)
        if file_id in file_ids(spec)
    ]
    if users:
        raise ApiError(
            409,
            "file_in_use",
            f"file {file_id} is used by unfinished job(s) {users}; cancel them or wait",
        )
    state.accounts.delete_file(file_id, tenant)
    state.artifacts.delete(record.key)
    log.info("file deleted", extra={"file_id": file_id, "tenant": tenant})
    return DeletedObject(id=file_id, object="file")
