"""The service's pure core: checking uploads and HTTP job specs, materialising a job's files for
a run, and running jobs in background threads (``cotune serve --embedded``).

Nothing here imports fastapi or celery; ``services/api`` and ``workers`` call it.

Over HTTP no spec names a server path, a URL or an environment variable (DESIGN.md §4 "Paths"):

- ``data.train|val|test`` are ``file-...`` ids of the caller's files with purpose ``data``;
- a ``bm25`` component's ``args.corpus`` is a ``file-...`` id with purpose ``corpus``;
- ``system.models.<alias>`` is ``{name: <registry name>}``; a ``path`` answers 422;
- ``judge.model`` names a model of the system, a registry model or a hosted judge from the
  server's settings; ``url``, ``api_key_env`` and ``engine`` answer 422;
- an ``http_search`` component's ``args.url`` must be on the server's host allow-list.

The stored spec keeps that form. ``materialize`` turns it into a runnable ``JobSpec`` for one
worker: it copies the files into a local folder, points the spec at them and expands a hosted
judge's name into the server-side ``{engine: openai, url, model, api_key_env}`` (the key stays
in the server's environment, read by name when the judge is called).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol, cast
from urllib.parse import urlsplit

from cotune.data import iter_csv, iter_jsonl, parse_corpus
from cotune.errors import CotuneError, DataError, SpecError
from cotune.jobspec import JobSpec, parse_job

if TYPE_CHECKING:
    from cotune.loop import JobContext
    from cotune.records import JobReport, StageRecord
    from cotune.settings import Settings
    from cotune.store import ArtifactStore, JobRecord, JobStore
    from cotune.store.accounts import AccountStore, FileRecord

log = logging.getLogger("cotune.service")

FILE_ID = re.compile(r"^file-[A-Za-z0-9]{1,59}$")
SPLITS = ("train", "val", "test")
RESULT_PREFIX = "result"
_CHUNK = 1 << 20

FileLookup = Callable[[str], "FileRecord | None"]
# Deepest nesting a spec or an uploaded row may have: real specs stay under 10 levels; without a
# bound a 500-level spec hit Python's recursion limit (a 500) while being copied.
MAX_JSON_DEPTH = 32


def json_problem(value: Any, path: str = "", depth: int = 0) -> tuple[str, str] | None:
    """``(dotted path, what is wrong)`` for the first part of a parsed JSON value that cannot be
    stored and sent back: a string (or key) holding a lone UTF-16 surrogate (valid JSON escape,
    not text: it cannot be encoded as UTF-8) or a NUL character (PostgreSQL refuses it), or
    nesting deeper than ``MAX_JSON_DEPTH``. None when the value is fine."""
    if depth > MAX_JSON_DEPTH:
        return path, f"nesting is deeper than {MAX_JSON_DEPTH} levels"
    if isinstance(value, str):
        return None if (what := _text_problem(value)) is None else (path, f"the string {what}")
    if isinstance(value, Mapping):
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)
            if isinstance(key, str) and (what := _text_problem(key)) is not None:
                return path, f"a field name {what}"
            found = json_problem(item, where, depth + 1)
            if found is not None:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = json_problem(item, f"{path}.{i}" if path else str(i), depth + 1)
            if found is not None:
                return found
    return None


def _text_problem(text: str) -> str | None:
    if "\x00" in text:
        return "holds a NUL character (\\u0000)"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        code = ord(text[err.start])
        return f"holds a lone surrogate \\u{code:04x} at position {err.start}, which is not text"
    return None


def _checked_rows(rows: Iterator[tuple[int, Any]], source: str) -> Iterator[tuple[int, Any]]:
    for line_no, row in rows:
        problem = json_problem(row)
        if problem is not None:
            raise DataError(problem[1], path=source, line=line_no, field=problem[0] or None)
        yield line_no, row


# -- uploads ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class UploadSummary:
    """What an upload holds: its row count and, per field, how many rows have a value."""

    rows: int
    fields: dict[str, int]


class _Lines:
    """The lines of a binary stream, refusing one longer than ``limit`` bytes (naming it)."""

    def __init__(self, stream: IO[bytes], limit: int, source: str) -> None:
        self.stream, self.limit, self.source = stream, limit, source

    def __iter__(self) -> Iterator[bytes]:
        line_no = 0
        while True:
            line = self.stream.readline(self.limit + 1)
            if not line:
                return
            line_no += 1
            if len(line) > self.limit and not line.endswith(b"\n"):
                raise DataError(
                    f"line is longer than {self.limit} bytes", path=self.source, line=line_no
                )
            yield line


def is_csv(filename: str) -> bool:
    return filename.lower().endswith(".csv")


def check_upload(
    stream: IO[bytes], purpose: str, filename: str, *, max_line_bytes: int = 1 << 20
) -> UploadSummary:
    """Check an uploaded file from its bytes: UTF-8, one JSON object per line (or CSV for
    data), line size, field types, unique ids. Raises ``DataError`` naming line and field.

    ``data``: ``expected`` is a string or a non-empty list of strings, ``id`` a non-empty
    string or integer, unique. Which input fields a job needs is checked at ``POST /v1/jobs``
    against ``fields``. ``corpus``: ``{id, text, title?}`` rows (``cotune.data.parse_corpus``).
    """
    source = filename
    lines = cast(IO[bytes], _Lines(stream, max_line_bytes, source))
    if purpose == "corpus":
        if is_csv(filename):
            raise DataError("a corpus must be JSONL rows of {id, text, title?}", path=source)
        passages = parse_corpus(_checked_rows(iter_jsonl(lines, source), source), source=source)
        fields: dict[str, int] = {"id": len(passages), "text": len(passages)}
        titled = sum(1 for p in passages if "title" in p)
        if titled:
            fields["title"] = titled
        return UploadSummary(rows=len(passages), fields=fields)
    if purpose != "data":
        raise DataError(f"purpose must be 'data' or 'corpus', got {purpose!r}", path=source)
    if is_csv(filename):
        # The CSV reader takes the whole stream; still refuse an over-long physical line.
        content = b"".join(_Lines(stream, max_line_bytes, source))
        import io

        rows = iter_csv(io.BytesIO(content), source)
    else:
        rows = iter_jsonl(lines, source)
    counts: dict[str, int] = {}
    seen: dict[str, int] = {}
    n = 0
    for line_no, row in _checked_rows(rows, source):
        n += 1
        expected = row.get("expected")
        if expected is not None and not (
            isinstance(expected, str)
            or (
                isinstance(expected, list)
                and expected
                and all(isinstance(item, str) for item in expected)
            )
        ):
            raise DataError(
                "field 'expected' must be a string or a non-empty list of strings, got "
                f'{expected!r} (quote numbers: "417")',
                path=source,
                line=line_no,
                field="expected",
            )
        raw_id = row.get("id")
        if raw_id is not None:
            if isinstance(raw_id, bool) or not isinstance(raw_id, str | int) or not str(raw_id):
                raise DataError(
                    f"field 'id' must be a non-empty string, got {raw_id!r}",
                    path=source,
                    line=line_no,
                    field="id",
                )
            if str(raw_id) in seen:
                raise DataError(
                    f"id {str(raw_id)!r} is also used on line {seen[str(raw_id)]}",
                    path=source,
                    line=line_no,
                    field="id",
                )
            seen[str(raw_id)] = line_no
        for name, value in row.items():
            if not isinstance(name, str) or not name or len(name) > 255:
                raise DataError(
                    f"field name {name!r} is empty or too long", path=source, line=line_no
                )
            if value is not None:
                counts[name] = counts.get(name, 0) + 1
    if n == 0:
        raise DataError("no rows", path=source)
    return UploadSummary(rows=n, fields=counts)


# -- checking a job spec that came over HTTP --------------------------------------------------


def _lookup(files: Any, tenant: str | None) -> FileLookup:
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


def _file_ref(value: Any, purpose: str, param: str, lookup: FileLookup) -> FileRecord:
    how = f"give a file id (file-...) from POST /v1/files with purpose {purpose!r}"
    if not isinstance(value, str):
        raise SpecError(f"{param}: {how}, got {value!r}", param=param)
    if not FILE_ID.match(value):
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


def _registry() -> set[str]:
    from cotune.models import REGISTRY

    return set(REGISTRY)


def judge_kind(name: str, spec: Mapping[str, Any], settings: Settings) -> str | None:
    """Whether a judge's ``model`` names a model of the system (``alias``), a registry model
    (``registry``) or a hosted judge (``hosted``); None if none of them."""
    system = spec.get("system")
    models = system.get("models") if isinstance(system, Mapping) else None
    if isinstance(models, Mapping) and name in models:
        return "alias"
    if name in _registry():
        return "registry"
    if name in settings.judges:
        return "hosted"
    return None


def check_job_for_http(spec: Any, tenant: str | None, files: Any, settings: Settings) -> JobSpec:
    """Validate a job spec sent over HTTP against the caller's files and the server's registry
    and settings; returns the parsed ``JobSpec`` (data still file ids, not runnable as is: see
    ``materialize``). Raises ``SpecError`` with ``param`` (the API answers 422)."""
    if not isinstance(spec, Mapping):
        raise SpecError("a job spec must be a JSON object")
    problem = json_problem(spec)
    if problem is not None:
        param, what = problem
        raise SpecError(f"{param or 'the spec'}: {what}", param=param or None)
    spec = copy.deepcopy(dict(spec))
    lookup = _lookup(files, tenant)

    system = spec.get("system")
    if not isinstance(system, Mapping):
        raise SpecError(
            "'system' must be given inline (a JSON object); over HTTP a spec names no server path",
            param="system",
        )
    registry = _registry()
    models = system.get("models")
    if isinstance(models, Mapping):
        for alias, ref in models.items():
            if not isinstance(ref, Mapping):
                continue
            if "path" in ref:
                raise SpecError(
                    f"system.models.{alias}: a model 'path' is not accepted over HTTP; name a "
                    f"registry model, e.g. {{name: {sorted(registry)[0]}}} "
                    f"(known: {sorted(registry)})",
                    param=f"system.models.{alias}.path",
                )
            name = ref.get("name")
            if isinstance(name, str) and name not in registry:
                raise SpecError(
                    f"system.models.{alias}: unknown model {name!r}; the server's registry "
                    f"knows {sorted(registry)}",
                    param=f"system.models.{alias}.name",
                )

    components = system.get("components")
    for i, component in enumerate(components if isinstance(components, list) else []):
        if not isinstance(component, Mapping) or component.get("kind") != "tool":
            continue
        where = f"system.components.{component.get('name') or i}"
        args = component.get("args")
        args = args if isinstance(args, Mapping) else {}
        if component.get("tool") == "bm25" and "corpus" in args:
            _file_ref(args["corpus"], "corpus", f"{where}.args.corpus", lookup)
        if component.get("tool") == "http_search" and "url" in args:
            check_search_url(args["url"], settings, f"{where}.args.url")

    judge = spec.get("judge")
    if isinstance(judge, Mapping):
        for key in ("url", "api_key_env", "engine"):
            if key in judge:
                raise SpecError(
                    f"judge.{key}: over HTTP a judge is named, not described: give "
                    "judge.model as a model of the system, a registry model or one of the "
                    f"server's hosted judges {sorted(settings.judges)}",
                    param=f"judge.{key}",
                )
        name = judge.get("model")
        if isinstance(name, str) and judge_kind(name, spec, settings) is None:
            raise SpecError(
                f"judge.model: {name!r} is neither a model of the system "
                f"({sorted(models) if isinstance(models, Mapping) else []}), a registry model "
                f"({sorted(registry)}) nor a hosted judge ({sorted(settings.judges)})",
                param="judge.model",
            )

    data = spec.get("data")
    if not isinstance(data, Mapping):
        raise SpecError(
            "'data' must map train, val (and optionally test) to file ids", param="data"
        )
    records: dict[str, FileRecord] = {}
    for split in SPLITS:
        value = data.get(split)
        if value is None and split == "test":
            continue
        if value is None:
            raise SpecError(f"data.{split}: a file id is required", param=f"data.{split}")
        records[split] = _file_ref(value, "data", f"data.{split}", lookup)

    job = parse_job(spec)
    check_data_fields(job, records)
    return job


def check_search_url(url: Any, settings: Settings, param: str) -> str:
    """An ``http_search`` URL is accepted only if its host is on the server's allow-list."""
    parts = urlsplit(url) if isinstance(url, str) else None
    host = (parts.hostname or "").lower() if parts else ""
    if parts is None or parts.scheme not in ("http", "https") or not host:
        raise SpecError(f"{param}: {url!r} is not an http(s) URL with a host", param=param)
    if host not in settings.http_search_allowed_hosts:
        raise SpecError(
            f"{param}: host {host!r} is not on the server's http_search allow-list "
            f"{sorted(settings.http_search_allowed_hosts)}",
            param=param,
        )
    return host


def check_data_fields(job: JobSpec, records: Mapping[str, FileRecord]) -> None:
    """Every row of each split's file holds the system's input fields (and ``expected`` when
    the metric compares against it); else a ``SpecError`` naming the file and the field."""
    from cotune.metrics import metric_needs_gold

    needed = list(job.system.inputs)
    if metric_needs_gold(job.system.metric):
        needed.append("expected")
    for split, record in records.items():
        for name in needed:
            have = int(record.fields.get(name, 0))
            if have < record.rows:
                why = (
                    f"metric {job.system.metric!r} compares the output against it"
                    if name == "expected"
                    else f"the system's inputs are {job.system.inputs}"
                )
                raise SpecError(
                    f"data.{split}: file {record.id} ({record.filename}) lacks field {name!r} "
                    f"in {record.rows - have} of {record.rows} rows ({why})",
                    param=f"data.{split}",
                )


def split_rows(spec: Mapping[str, Any], files: Any, tenant: str | None) -> dict[str, int]:
    """Row counts of a checked spec's data files (for quotes), by split."""
    lookup = _lookup(files, tenant)
    data = spec.get("data") or {}
    counts = {}
    for split in SPLITS:
        record = lookup(data[split]) if isinstance(data.get(split), str) else None
        counts[split] = record.rows if record is not None else 0
    return counts


def file_ids(spec: Mapping[str, Any]) -> set[str]:
    """Every file id a stored HTTP spec names (data splits and corpora)."""
    found: set[str] = set()

    def walk(value: Any) -> None:
        if isinstance(value, str) and FILE_ID.match(value):
            found.add(value)
        elif isinstance(value, Mapping):
            for item in value.values():
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    walk(spec.get("data"))
    system = spec.get("system")
    if isinstance(system, Mapping):
        for component in system.get("components") or []:
            if isinstance(component, Mapping):
                walk(component.get("args"))
    return found


# -- materialising a job for a run ------------------------------------------------------------


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
    lookup = _lookup(files, tenant)
    dest = Path(dest) if dest is not None else settings.work_dir() / job_id
    dest.mkdir(parents=True, exist_ok=True)
    spec = copy.deepcopy(dict(spec))

    def fetch(file_id: str, purpose: str, param: str) -> str:
        record = _file_ref(file_id, purpose, param, lookup)
        suffix = ".csv" if purpose == "data" and is_csv(record.filename) else ".jsonl"
        relative = f"files/{record.id}{suffix}"
        _copy_file(artifacts, record, dest / relative)
        return relative

    data = spec.get("data") or {}
    for split in SPLITS:
        if isinstance(data.get(split), str):
            data[split] = fetch(data[split], "data", f"data.{split}")
    system = spec.get("system")
    if isinstance(system, dict):
        for component in system.get("components") or []:
            if not isinstance(component, dict):
                continue
            args = component.get("args")
            if component.get("tool") == "bm25" and isinstance(args, dict) and "corpus" in args:
                param = f"system.components.{component.get('name')}.args.corpus"
                args["corpus"] = fetch(args["corpus"], "corpus", param)
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


def check_models_prepared(job: JobSpec) -> None:
    """Each model the job needs resolves on this machine (raises ``SpecError`` naming it)."""
    from cotune.models import resolve_model

    system = job.system
    for alias, ref in system.models.items():
        resolve_model(ref, system.base_dir, param=f"system.models.{alias}")


# -- results ----------------------------------------------------------------------------------


def export_job_result(ctx: JobContext, report: JobReport) -> str:
    """The embedded run's output folder (report, metrics, curves, test traces, the best
    adapters) written to ``<job_id>/result/`` in the artifact store and recorded as the job's
    artifacts; ``report.adapters`` becomes ``{component: "<job_id>/result/adapters/<c>"}``.
    The same layout as the Celery finalizer's."""
    import tempfile

    from cotune.loop import copy_adapters
    from cotune.report import write_outputs

    prefix = f"{ctx.job_id}/{RESULT_PREFIX}"
    with tempfile.TemporaryDirectory(prefix="cotune-result-") as scratch:
        out = Path(scratch)
        copy_adapters(ctx, report.adapters, out / "adapters")
        report.adapters = {c: f"{prefix}/adapters/{c}" for c in report.adapters}
        write_outputs(ctx, report, out)
        ctx.artifacts.put_dir(out, prefix)
    kinds = {
        "metrics.json": "metrics",
        "report.md": "report",
        "curves.png": "curves",
        "traces/test.jsonl": "traces",
    }
    for name, kind in kinds.items():
        key = f"{prefix}/{name}"
        if ctx.artifacts.isfile(key):
            ctx.store.add_artifact(
                ctx.job_id,
                key,
                kind=kind,
                sha256=ctx.artifacts.sha256(key),
                nbytes=ctx.artifacts.size(key),
            )
    for component, key in report.adapters.items():
        ctx.store.add_artifact(ctx.job_id, key, kind="adapter", component=component)
    return prefix


# -- redaction --------------------------------------------------------------------------------


def server_roots(settings: Settings, artifacts: ArtifactStore | None = None) -> list[str]:
    """Server folders that must not appear in anything sent over HTTP."""
    from cotune.models import cotune_home

    roots = {str(settings.work_dir()), str(cotune_home())}
    local = artifacts.local_path("x") if artifacts is not None else None
    if local is not None:
        roots.add(str(local.parent))
    if "://" not in settings.artifacts:
        roots.add(str(Path(settings.artifacts).expanduser().resolve()))
    expanded = {os.path.realpath(r) for r in roots} | roots
    return sorted(expanded, key=len, reverse=True)


def redact(text: str | None, roots: list[str]) -> str | None:
    """``text`` with server folders replaced by ``<server>``."""
    if text is None:
        return None
    for root in roots:
        if root and root != "/":
            text = text.replace(root, "<server>")
    return text


# -- dispatching jobs -------------------------------------------------------------------------


class Dispatcher(Protocol):
    """How the API hands a job over to be run.

    ``dispatch(job_id)`` takes a job the API just created in ``validating_files`` and owns its
    status from then on: ``queued`` once its files are materialised and it is in the queue,
    then ``running`` and a terminal status (or ``failed`` with an error if it cannot start).
    It must be idempotent (a duplicate call for one job does nothing more) and return quickly.
    ``queue_depth()`` is the number of jobs waiting to run, or None if unknown.
    """

    def dispatch(self, job_id: str) -> None: ...

    def queue_depth(self) -> int | None: ...


class ThreadDispatcher:
    """Runs jobs in this process's threads with ``cotune.loop.run_job`` (``cotune serve
    --embedded``): a validation pool materialises each job's files and checks its models
    (``validating_files`` -> ``queued``), then a run pool of ``workers`` threads (one by
    default: engines are cached per process and one job uses the accelerator at a time) runs
    it (``running`` -> ``succeeded`` / ``failed`` / ``cancelled``).

    ``context_options``: extra ``JobContext`` fields (tests pass scripted engines and a
    trainer). ``on_stage_done``: called with each finished stage's record (metrics).
    """

    def __init__(
        self,
        store: JobStore,
        accounts: AccountStore | None,
        artifacts: ArtifactStore,
        settings: Settings,
        *,
        workers: int = 1,
        context_options: Mapping[str, Any] | None = None,
        on_stage_done: Callable[[StageRecord], None] | None = None,
        keep_workdir: bool = False,
    ) -> None:
        self.store, self.accounts, self.artifacts, self.settings = (
            store,
            accounts,
            artifacts,
            settings,
        )
        self.context_options = dict(context_options or {})
        self.on_stage_done = on_stage_done
        self.keep_workdir = keep_workdir
        # One embedded server per host and database: a restarted process takes its own
        # stages' leases over at once (``recover``) instead of waiting for them to expire.
        self.owner = f"thread:{socket.gethostname()}"
        self._validate = ThreadPoolExecutor(max_workers=2, thread_name_prefix="cotune-validate")
        self._run = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cotune-run")
        self._lock = threading.Lock()
        self._seen: set[str] = set()
        self._waiting = 0
        self._idle = threading.Condition(self._lock)
        self._busy = 0

    # -- the protocol

    def dispatch(self, job_id: str) -> None:
        with self._lock:
            if job_id in self._seen:
                return
            self._seen.add(job_id)
            self._busy += 1
        self._validate.submit(self._guard, self._validate_job, job_id)

    def queue_depth(self) -> int | None:
        with self._lock:
            return self._waiting

    def recover(self) -> list[str]:
        """Dispatch again the jobs a previous process left unfinished (an embedded server
        restarting): running ones go back to ``queued`` and resume from their last finished
        stage. Call it once at start-up, only where this dispatcher is the only runner."""
        from cotune.store import IllegalTransition, JobStatus

        unfinished = []
        after = None
        while True:
            page = self.store.list_jobs(None, after=after, limit=100)
            unfinished += [
                r
                for r in page.data
                if r.status in (JobStatus.validating_files, JobStatus.queued, JobStatus.running)
            ]
            if not page.has_more or not page.data:
                break
            after = page.data[-1].id
        for record in reversed(unfinished):  # oldest first
            if record.status == JobStatus.running:
                with contextlib.suppress(IllegalTransition):
                    self.store.transition(record.id, JobStatus.queued)
                self._event(record.id, "server restarted; re-queued", "warning")
            self.dispatch(record.id)
        return [r.id for r in unfinished]

    # -- lifecycle

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until every dispatched job has finished (tests, shutdown)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._idle:
            while self._busy:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._idle.wait(left)
        return True

    def shutdown(self, wait: bool = False) -> None:
        self._validate.shutdown(wait=wait, cancel_futures=not wait)
        self._run.shutdown(wait=wait, cancel_futures=not wait)

    # -- the work

    def _guard(self, work: Callable[..., bool], *args: Any) -> None:
        """Run ``work``; unless it handed the job on (True), the job is no longer busy here."""
        handed_on = False
        try:
            handed_on = work(*args)
        except BaseException:  # pragma: no cover - the steps catch their own errors
            log.exception("dispatcher step failed", extra={"job_id": args[0] if args else None})
        finally:
            if not handed_on:
                with self._idle:
                    self._busy -= 1
                    self._idle.notify_all()

    def _event(self, job_id: str, message: str, level: str = "info", **data: Any) -> None:
        from cotune.records import Event

        with contextlib.suppress(CotuneError):
            self.store.add_event(
                job_id, Event(level=level, message=message, data=data, created_at=time.time())
            )

    def _move(self, job_id: str, to: str, error: str | None = None) -> bool:
        from cotune.store import IllegalTransition, JobNotFound, JobStatus

        try:
            self.store.transition(job_id, JobStatus(to), error=error)
        except (IllegalTransition, JobNotFound) as err:
            log.info("job not moved to %s: %s", to, err, extra={"job_id": job_id})
            return False
        log.info("job %s", to, extra={"job_id": job_id, "status": to})
        return True

    def _public(self, err: BaseException) -> str:
        text = f"{type(err).__name__}: {err}"
        return redact(text, server_roots(self.settings, self.artifacts)) or text

    def _fail(self, job_id: str, err: BaseException) -> None:
        from cotune.store import StageStatus

        message = self._public(err)
        for state in self.store.stage_states(job_id):
            if state.status == StageStatus.running and state.lease_owner == self.owner:
                self.store.fail_stage(job_id, state.epoch, state.stage, self.owner, message)
        if self._move(job_id, "failed", error=message):
            self._event(job_id, f"failed: {message}", "error")
        log.warning("job failed: %s", message, extra={"job_id": job_id})

    def _workdir(self, job_id: str) -> Path:
        return self.settings.work_dir() / job_id

    def _validate_job(self, job_id: str) -> bool:
        from cotune.store import JobStatus

        record = self.store.get_job(job_id)
        if record is None or record.status not in (JobStatus.validating_files, JobStatus.queued):
            return False
        try:
            job = load_record_spec(
                record, self.accounts, self.artifacts, self.settings, self._workdir(job_id)
            )
            check_models_prepared(job)
        except Exception as err:
            self._fail(job_id, err)
            self._cleanup(job_id)
            return False
        if record.status == JobStatus.validating_files:
            if not self._move(job_id, "queued"):
                self._cleanup(job_id)
                return False
            self._event(job_id, "files validated; queued")
        with self._lock:
            self._waiting += 1
        self._run.submit(self._guard, self._run_job, job_id, job)
        return True

    def _run_job(self, job_id: str, job: JobSpec) -> bool:
        from cotune.loop import JobCancelled, JobContext, run_job

        with self._lock:
            self._waiting -= 1
        try:
            record = self.store.get_job(job_id)
            if record is None or not self._move(job_id, "running"):
                return False
            self._event(job_id, "running")
            options = dict(self.context_options)
            if self.on_stage_done is not None and "on_stage_done" not in options:
                options["on_stage_done"] = self.on_stage_done
            ctx = JobContext(
                job_id=job_id,
                job=job,
                store=self.store,
                artifacts=self.artifacts,
                owner=self.owner,
                lease_seconds=self.settings.lease_seconds,
                **options,
            )
            try:
                report = run_job(ctx)
            except JobCancelled:
                if self._move(job_id, "cancelled"):
                    self._event(job_id, "cancelled between stages", "warning")
                return False
            except Exception as err:
                self._fail(job_id, err)
                return False
            try:
                export_job_result(ctx, report)
                self.store.set_result(job_id, report.model_dump(mode="json"))
            except Exception as err:
                self._fail(job_id, err)
                return False
            if self._move(job_id, "succeeded"):
                self._event(job_id, "succeeded")
            return False
        finally:
            self._cleanup(job_id)

    def _cleanup(self, job_id: str) -> None:
        if not self.keep_workdir:
            shutil.rmtree(self._workdir(job_id), ignore_errors=True)
