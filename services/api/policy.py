"""The API's rules for what a spec and an upload may hold (DESIGN.md §4 "Paths").

- ``data.train|val|test`` are ``file-...`` ids of the caller's files with purpose ``data``
  (``fine-tune`` when ``data.format`` is ``openai``: chat rows for a supervised job, preference
  rows for a dpo one); ``data.feedback`` (rated runs) is one with purpose ``feedback``, and
  ``data.train`` may then be left out;
- a ``bm25`` component's ``args.corpus`` is a ``file-...`` id with purpose ``corpus``;
- ``system.models.<alias>`` is ``{name: <registry name>}``: a built-in model or a registered
  one that is ready (an unknown, removed, preparing or failed one answers 422); a ``path``
  answers 422;
- ``judge.model`` names a model of the system, a registry model or a hosted judge from the
  server's settings; ``url``, ``api_key_env`` and ``engine`` answer 422;
- an ``http_search`` component's ``args.url`` must be on the server's host allow-list.

The stored spec keeps that form; ``cotune.jobs.materialize`` makes it runnable for a worker.
Pure functions: no fastapi here, the routes call them.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from cotune.errors import SpecError
from cotune.jobs.materialize import file_ref, judge_kind, lookup_files
from cotune.models import check_model_name, registry_names
from cotune.spec.job import JobSpec, parse_job
from cotune.spec.refs import FEEDBACK, SPLITS, FileRef, file_refs, is_file_id

if TYPE_CHECKING:
    from cotune.model_records import RegisteredModel
    from cotune.settings import Settings
    from cotune.store.accounts import FileRecord


# Deepest nesting a spec or an uploaded row may have: real specs stay under 10 levels; without a
# bound a 500-level spec hit Python's recursion limit (a 500) while being copied.
MAX_JSON_DEPTH = 32


def json_problem(value: Any, path: str = "", depth: int = 0) -> tuple[str, str] | None:
    """``(dotted path, what is wrong)`` for the first part of a parsed JSON value that cannot be
    stored and sent back: a string (or key) holding a lone UTF-16 surrogate (valid JSON escape,
    not text: it cannot be encoded as UTF-8) or a NUL character (PostgreSQL refuses it), or
    NaN or an infinity (not JSON), or nesting deeper than ``MAX_JSON_DEPTH``. None when the value
    is fine."""
    if depth > MAX_JSON_DEPTH:
        return path, f"nesting is deeper than {MAX_JSON_DEPTH} levels"
    if isinstance(value, str):
        return None if (what := _text_problem(value)) is None else (path, f"the string {what}")
    if isinstance(value, float) and not math.isfinite(value):
        # Python's decoder takes NaN and Infinity; JSON has no such numbers (nor has JSONB).
        return path, f"{value} is not a JSON number"
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


def check_job_for_http(
    spec: Any,
    tenant: str | None,
    files: Any,
    settings: Settings,
    registered: Mapping[str, RegisteredModel] | None = None,
) -> JobSpec:
    """Validate a job spec sent over HTTP against the caller's files and the server's registry
    (``registered``: the job store's registered models) and settings; returns the parsed
    ``JobSpec`` (data still file ids, not runnable as is: see ``materialize``). Raises
    ``SpecError`` with ``param`` (the API answers 422)."""
    if not isinstance(spec, Mapping):
        raise SpecError("a job spec must be a JSON object")
    problem = json_problem(spec)
    if problem is not None:
        param, what = problem
        raise SpecError(f"{param or 'the spec'}: {what}", param=param or None)
    spec = copy.deepcopy(dict(spec))
    lookup = lookup_files(files, tenant)
    refs = file_refs(spec)

    def refs_of(purpose: str) -> list[FileRef]:
        return [r for r in refs if r.purpose == purpose]

    system = spec.get("system")
    if not isinstance(system, Mapping):
        raise SpecError(
            "'system' must be given inline (a JSON object); over HTTP a spec names no server path",
            param="system",
        )
    registry = registry_names(registered)
    for model in refs_of("model"):
        raise SpecError(
            f"system.models.{model.owner}: a model 'path' is not accepted over HTTP; name a "
            f"registry model, e.g. {{name: {sorted(registry)[0]}}} (known: {sorted(registry)})",
            param=model.param,
        )
    models = system.get("models")
    if isinstance(models, Mapping):
        for alias, ref in models.items():
            if not isinstance(ref, Mapping):
                continue
            name = ref.get("name")
            if isinstance(name, str):
                where = f"system.models.{alias}.name"
                try:
                    check_model_name(name, where, registered)
                except SpecError as err:
                    raise SpecError(f"{where}: {err.message}", param=where) from None

    components = system.get("components")
    for i, component in enumerate(components if isinstance(components, list) else []):
        if not isinstance(component, Mapping) or component.get("kind") != "tool":
            continue
        where = f"system.components.{component.get('name') or i}"
        args = component.get("args")
        args = args if isinstance(args, Mapping) else {}
        if component.get("tool") == "http_search" and "url" in args:
            check_search_url(args["url"], settings, f"{where}.args.url")

    for ref in refs_of("corpus"):
        file_ref(ref.value, "corpus", ref.param, lookup)

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
        if isinstance(name, str) and judge_kind(name, spec, settings, registered) is None:
            if registered is not None and name in registered:  # registered, not ready
                check_model_name(name, "judge.model", registered)
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
    for split in ("train", "val"):
        if data.get(split) is None and not (split == "train" and data.get(FEEDBACK) is not None):
            extra = " (or give data.feedback, a file of rated runs)" if split == "train" else ""
            raise SpecError(f"data.{split}: a file id is required{extra}", param=f"data.{split}")
    records = {
        r.owner: file_ref(r.value, r.purpose, r.param, lookup)
        for r in refs
        if r.param.startswith("data.")
    }

    job = parse_job(spec)
    check_data_fields(job, records)
    check_gpu_fit(job, settings)
    return job


def check_gpu_fit(job: JobSpec, settings: Settings) -> None:
    """With ``gpu_memory_gib`` set, refuse a model that does not fit the workers' GPUs
    (``cotune.fit``), for the models prepared in this machine's cache."""
    if settings.gpu_memory_gib is None or settings.gpus == 0:
        return
    from cotune.fit import DeviceBudget, check_job_fits
    from cotune.models import is_model_folder, models_dir

    budget = DeviceBudget(
        gpus=settings.gpus or 1,
        memory_gib=settings.gpu_memory_gib,
        share=settings.gpu_memory_share,
        train_gpus=settings.train_gpus,
    )

    def folder(_alias: str, ref: Any) -> Path | None:
        found = models_dir() / ref.name if ref.name else None
        return found if found is not None and is_model_folder(found) else None

    check_job_fits(job, budget, folder)


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

    if job.data.format == "openai":
        _check_openai_kinds(job, records)
        return
    needed = list(job.system.inputs)
    if metric_needs_gold(job.system.metric):
        needed.append("expected")
    if FEEDBACK in records:
        _check_feedback_fields(job, records[FEEDBACK])
    for split, record in records.items():
        if split == FEEDBACK:
            continue
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


def _check_feedback_fields(job: JobSpec, record: FileRecord) -> None:
    """Every rated run holds the system's inputs, and a ``corrected_output`` unless the metric
    is ``judge`` (``cotune.feedback``); else a ``SpecError`` naming the file and the field."""
    from cotune.metrics import metric_needs_gold

    needed = [f"inputs.{name}" for name in job.system.inputs]
    if metric_needs_gold(job.system.metric):
        needed.append("feedback.corrected_output")
    for name in needed:
        have = int(record.fields.get(name, 0))
        if have < record.rows:
            why = (
                f"metric {job.system.metric!r} scores a rated run's replays against it; rows "
                "that carry only a rating need system.metric judge"
                if name.startswith("feedback.")
                else f"the system's inputs are {job.system.inputs}"
            )
            raise SpecError(
                f"data.feedback: file {record.id} ({record.filename}) lacks field {name!r} in "
                f"{record.rows - have} of {record.rows} rows ({why})",
                param="data.feedback",
            )


def _check_openai_kinds(job: JobSpec, records: Mapping[str, FileRecord]) -> None:
    """A job trained on given rows takes chat rows for SFT, preference rows for DPO."""
    from cotune.openai_jobs import KIND_FIELD

    if job.train.rows != "given":
        return
    kind = "preference" if job.train.method == "sft+dpo" else "chat"
    shape = (
        "{input, preferred_output, non_preferred_output}" if kind == "preference" else "{messages}"
    )
    for split, record in records.items():
        if int(record.fields.get(KIND_FIELD[kind], 0)) < record.rows:
            method = "dpo" if kind == "preference" else "supervised"
            raise SpecError(
                f"data.{split}: file {record.id} ({record.filename}) does not hold {kind} rows "
                f"{shape}, which a {method} job trains and is scored on",
                param=f"data.{split}",
            )


def split_rows(spec: Mapping[str, Any], files: Any, tenant: str | None) -> dict[str, int]:
    """Row counts of a checked spec's data files (for quotes), by split (and ``feedback``)."""
    lookup = lookup_files(files, tenant)
    data = spec.get("data") or {}
    counts: dict[str, int] = {}
    for split in (*SPLITS, FEEDBACK):
        record = lookup(data[split]) if isinstance(data.get(split), str) else None
        counts[split] = record.rows if record is not None else 0
    return counts


def file_ids(spec: Mapping[str, Any]) -> set[str]:
    """Every file id a stored HTTP spec names (data splits, feedback and corpora)."""
    return {r.value for r in file_refs(spec) if is_file_id(r.value)}
