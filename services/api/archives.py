"""Building the archives a job's downloads stream: each in a scratch folder that is deleted
once the response has been sent (or the build failed)."""

from __future__ import annotations

import io
import logging
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

from fastapi.responses import StreamingResponse

from cotune.errors import CotuneError
from cotune.spec import SystemSpec
from cotune.store import JobRecord
from services.api.errors import ApiError
from services.api.state import ApiState

log = logging.getLogger("cotune.api")
_CHUNK = 1 << 20


def adapter_archive(state: ApiState, component: str, key: str) -> Path:
    """``<component>/`` with the adapter's JSON and safetensors files, as a .tar.gz."""
    files = [k for k in state.artifacts.list(key) if k.endswith((".json", ".safetensors"))]
    if not files:
        raise ApiError(404, "not_found", f"the adapter of {component!r} is gone")
    scratch = Path(tempfile.mkdtemp(prefix="cotune-adapter-"))
    archive = scratch / f"{component}.tar.gz"
    try:
        with tarfile.open(archive, "w:gz") as tar:
            for k in files:
                data = state.artifacts.get_bytes(k)
                info = tarfile.TarInfo(f"{component}/{k[len(key) + 1 :]}")
                info.size, info.mode, info.mtime = len(data), 0o644, 0
                tar.addfile(info, io.BytesIO(data))
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    return archive


def bundle_archive(
    state: ApiState, record: JobRecord, system: SystemSpec, adapters: dict[str, str]
) -> Path:
    """The job's bundle (``cotune.bundle``), its bm25 corpora included, as a .tar.gz; a
    failure answers 500 without server paths."""
    from cotune.bundle import build_bundle, write_bundle_tar
    from cotune.jobs.materialize import fetch_corpora

    scratch = Path(tempfile.mkdtemp(prefix="cotune-bundle-"))
    try:
        folders = {
            c: state.artifacts.get_dir(key, scratch / "adapters" / c) for c, key in adapters.items()
        }
        folder = build_bundle(
            system,
            folders,
            scratch / f"{record.name}-{record.id}",
            base_models={a: ref.name for a, ref in system.models.items() if ref.name},
            job_name=f"{record.name}:{record.id}",
            corpora=fetch_corpora(
                record.spec, record.tenant_id, state.accounts, state.artifacts, scratch / "corpora"
            ),
        )
        return write_bundle_tar(folder)
    except CotuneError as err:
        shutil.rmtree(scratch, ignore_errors=True)
        message = str(err).replace(str(scratch), "<bundle>")
        log.error("bundle failed: %s", message, extra={"job_id": record.id})
        raise ApiError(500, "bundle_failed", state.redact(message) or message) from None
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise


def archive_response(archive: Path, filename: str) -> StreamingResponse:
    """Stream ``archive``, then delete the scratch folder it was built in (its parent)."""
    return StreamingResponse(
        _stream(archive),
        media_type="application/gzip",
        headers={
            "content-disposition": f'attachment; filename="{filename}"',
            "content-length": str(archive.stat().st_size),
        },
    )


def _stream(archive: Path) -> Iterator[bytes]:
    try:
        with open(archive, "rb") as f:
            while chunk := f.read(_CHUNK):
                yield chunk
    finally:
        shutil.rmtree(archive.parent, ignore_errors=True)
