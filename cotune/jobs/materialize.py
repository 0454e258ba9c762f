"""A stored job spec made runnable on this machine.

Over HTTP a spec names file ids, registry models and hosted judges, never a server path
(DESIGN.md §4 "Paths"; the API's rules are ``services/api/policy.py``). ``materialize`` copies a
job's files from the artifact store into a local folder (kept between tasks, checked by
SHA-256), points the spec at them and expands a hosted judge's name into the server-side
``{engine: openai, url, model, api_key_env}`` (the key stays in the server's environment, read
by name when the judge is called).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from cotune.errors import DataError, SpecError
from cotune.spec.job import JobSpec, parse_job
from cotune.spec.refs import FileRef, file_refs, is_file_id, map_refs

if TYPE_CHECKING:
    from cotune.model_records import RegisteredModel
    from cotune.settings import Settings
    from cotune.store import ArtifactStore, JobRecord
    from cotune.store.accounts import AccountStore, FileRecord

_CHUNK = 1 << 20

FileLookup = Callable[[str], "FileRecord | None"]


def is_csv(filename: str) -> bool:
    return filename.lower().endswith(".csv")


def lookup_files(files: Any, tenant: str | None) -> FileLookup:
    """A tenant-scoped ``file_id -> FileRecord | None`` from an ``AccountStore``, a mapping of
    records, or such a function."""
    if isinstance(files, Mapping):
        table = files

        def from_mapping(file_id: str) -> FileRecord | None:
            record = table.get(file_id)
            if record is None or (tenant is not None and record.tenant_id != tenant):
                return None
            return cast("FileRecord", record)

        return from_mapping
    if hasattr(files, "get_file"):
        store = files
        return lambda file_id: store.get_file(file_id, tenant)
    return cast(FileLookup, files)


def file_ref(value: Any, purpose: str, param: str, lookup: FileLookup) -> FileRecord:
    how = f"give a file id (file-...) from POST /v1/files with purpose {purpose!r}"
    if not isinstance(value, str):
        raise SpecError(f"{param}: {how}, got {value!r}", param=param)
    if not is_file_id(value):
        what = "a URL" if "://" in value else "a path" if ("/" in value or "." in value) else None
        raise SpecError(
            f"{param}: {how}; over HTTP a spec names no server "
            f"{'path or URL' if what is None else what.split()[-1]} (got {value!r})",
            param=param,
        )
    record = lookup(value)
    if record is None:
        raise SpecError(f"{param}: you have no file {value!r}", param=param)
    if record.purpose != purpose:
        raise SpecError(
            f"{param}: file {value!r} ({record.filename}) has purpose {record.purpose!r}, "
            f"not {purpose!r}",
            param=param,
        )
    return record


def judge_kind(
    name: str,
    spec: Mapping[str, Any],
    settings: Settings,
    registered: Mapping[str, RegisteredModel] | None = None,
) -> str | None:
    """Whether a judge's ``model`` names a model of the system (``alias``), a registry model
    (``registry``: a built-in or a ready registered one, see ``cotune.models.registry_names``)
    or a hosted judge (``hosted``); None if none of them."""
    from cotune.models import registry_names

    system = spec.get("system")
    models = system.get("models") if isinstance(system, Mapping) else None
    if isinstance(models, Mapping) and name in models:
        return "alias"
    if name in registry_names(registered):
        return "registry"
    if name in settings.judges:
        return "hosted"
    return None


def _copy_file(artifacts: ArtifactStore, record: FileRecord, target: Path) -> None:
    """Copy a stored file to ``target`` (kept if already there with the same SHA-256)."""
    if target.is_file() and _sha256(target) == record.sha256:
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    digest = hashlib.sha256()
    with artifacts.open_read(record.key) as src, open(partial, "wb") as dst:
        while chunk := src.read(_CHUNK):
            digest.update(chunk)
            dst.write(chunk)
    if digest.hexdigest() != record.sha256:
        partial.unlink(missing_ok=True)
        raise DataError(f"stored file {record.id} does not match its SHA-256", path=record.id)
    os.replace(partial, target)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def materialize(
    job_id: str,
    spec: Mapping[str, Any],
    tenant: str | None,
    files: Any,
    artifacts: ArtifactStore,
    settings: Settings,
    dest: Path | None = None,
) -> JobSpec:
    """Write the job's files into ``dest`` (default ``settings.work_dir()/<job_id>``), rewrite
    the spec to point at them (relative to ``dest``), expand a hosted judge's name, and parse
    it with ``dest`` as its base folder: a ``JobSpec`` that ``cotune.loop.run_job`` can run.
    ``dest/job.json`` holds the runnable spec (the judge key's variable name, never its value).
    """
    lookup = lookup_files(files, tenant)
    dest = Path(dest) if dest is not None else settings.work_dir() / job_id
    dest.mkdir(parents=True, exist_ok=True)

    def fetch(ref: FileRef) -> Any:
        if ref.purpose == "model":  # over HTTP a model is named, never a path (policy)
            return ref.value
        record = file_ref(ref.value, ref.purpose, ref.param, lookup)
        suffix = ".csv" if ref.purpose == "data" and is_csv(record.filename) else ".jsonl"
        relative = f"files/{record.id}{suffix}"
        _copy_file(artifacts, record, dest / relative)
        return relative

    spec = map_refs(spec, fetch)
    judge = spec.get("judge")
    name = judge.get("model") if isinstance(judge, dict) else None
    hosted_name = name if isinstance(name, str) else None
    if (
        isinstance(judge, dict)
        and hosted_name
        and judge_kind(hosted_name, spec, settings) == "hosted"
    ):
        hosted = settings.judges[hosted_name]
        judge.update(engine="openai", url=hosted.url, model=hosted.model)
        if hosted.api_key_env:
            judge["api_key_env"] = hosted.api_key_env
    (dest / "job.json").write_text(json.dumps(spec, indent=2), encoding="utf-8")
    return parse_job(dict(spec), base_dir=dest)


def fetch_corpora(
    spec: Mapping[str, Any], tenant: str | None, files: Any, artifacts: ArtifactStore, dest: Path
) -> dict[str, Path]:
    """A stored job's bm25 corpora that are uploaded files, copied into ``dest``, by component
    name (what ``cotune.bundle.build_bundle`` takes); a corpus given by a local path (a job
    without a tenant) is left to the bundle, which reads it where it is."""
    lookup = lookup_files(files, tenant)
    found: dict[str, Path] = {}
    for ref in file_refs(spec):
        if ref.purpose != "corpus" or not is_file_id(ref.value):
            continue
        record = file_ref(ref.value, ref.purpose, ref.param, lookup)
        target = Path(dest) / f"{record.id}.jsonl"
        _copy_file(artifacts, record, target)
        found[ref.owner] = target
    return found


def local_spec(job: JobSpec) -> dict[str, Any]:
    """``job`` as a stored spec whose paths are absolute: data splits, ``bm25`` corpora and
    models given by ``path`` (a worker has no base folder to resolve them against).

    Only the fields the job set are kept (``exclude_unset``): a full dump does not parse back
    (a tool component's llm-only defaults such as ``max_tokens`` are rejected once set)."""
    spec = job.model_dump(mode="json", exclude_unset=True, by_alias=True)
    return map_refs(spec, lambda ref: str(job.ref_path(ref).resolve()))


def load_record_spec(
    record: JobRecord,
    accounts: AccountStore | None,
    artifacts: ArtifactStore,
    settings: Settings,
    dest: Path | None = None,
) -> JobSpec:
    """A stored job's runnable spec: a tenant's job (file ids) is materialised into a local
    folder; a job without a tenant (the CLI path) already holds absolute local paths."""
    if record.tenant_id is None or accounts is None:
        return parse_job(dict(record.spec))
    return materialize(
        record.id, record.spec, record.tenant_id, accounts, artifacts, settings, dest
    )


def check_models_prepared(job: JobSpec, settings: Settings | None = None) -> None:
    """Each model the job needs resolves on this machine and, on a CUDA machine, fits its
    GPUs (``cotune.fit``; raises ``SpecError`` naming the model)."""
    from cotune.fit import check_job_fits, measured_budget
    from cotune.models import resolve_model

    system = job.system
    folders = {
        alias: resolve_model(ref, system.base_dir, param=f"system.models.{alias}")
        for alias, ref in system.models.items()
    }
    if settings is not None and settings.gpus != 0:
        budget = measured_budget(settings.gpus, settings.gpu_memory_share, settings.train_gpus)
        if budget is not None:
            check_job_fits(job, budget, lambda alias, _ref: folders[alias])
