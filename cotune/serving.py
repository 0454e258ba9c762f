"""Serving a bundle as the whole system, and keeping what production teaches.

``open_bundle(folder)`` opens a downloaded bundle (``cotune.bundle``) as a ``SystemServer``: the
system's runtime with the bundle's adapters on each base model (vLLM or transformers), its bm25
corpora read from the bundle, ``http_search`` limited to the settings' allow-list. Each request
is one run of the system over the given inputs; its trace is written to a ``TraceLog``.

``TraceLog`` is one SQLite file (``<folder>/traces.db``): per trace its id, the API tenant that
asked, when it was made, the trace as JSON and, once someone rated it, the feedback as JSON and
when it came. A trace is kept ``Settings.trace_retention_days`` days (expired rows are hidden
at once and deleted at start-up and then hourly).

``export_feedback`` writes the rated traces as a ``feedback`` data file, one JSON line per
trace (the format a job's ``data.feedback`` takes; pinned: the job side reads exactly this)::

    {"id": "<trace id>", "inputs": {...}, "output": <final output>,
     "feedback": {"rating": 0.0-1.0 | "up" | "down", "comment"?: text, "corrected_output"?: text},
     "spans": [<every Span exactly as Trace.model_dump(mode="json") gives it>]}

The faces are ``services/system/app.py`` (``cotune serve-system``: ``POST /v1/run``,
``GET /v1/runs/{id}``, ``POST /v1/runs/{id}/feedback``) and ``cotune feedback export``.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ValidationError

from cotune.errors import CotuneError
from cotune.feedback import GivenFeedback
from cotune.runtime import Runtime, Span, Trace

if TYPE_CHECKING:
    from cotune.settings import Settings
    from cotune.spec import SystemSpec

TRACE_DB = "traces.db"
DAY_SECONDS = 86_400.0
PRUNE_INTERVAL_SECONDS = 3600.0


class ServingError(CotuneError, ValueError):
    """A request the served system refuses; ``param`` names the field (``inputs.question``,
    ``rating``)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param = message, param


class TraceNotFound(CotuneError, KeyError):
    """No trace with this id (or it is another tenant's, or it expired)."""

    def __init__(self, trace_id: str) -> None:
        super().__init__(trace_id)
        self.message = f"no trace {trace_id!r} (unknown, expired or not yours)"

    def __str__(self) -> str:
        return self.message


# -- feedback -----------------------------------------------------------------------------------


def make_feedback(rating: Any, comment: Any = None, corrected_output: Any = None) -> GivenFeedback:
    """A checked ``Feedback``; ``ServingError`` naming the field (``rating``, ``comment``...)."""
    try:
        return GivenFeedback(rating=rating, comment=comment, corrected_output=corrected_output)
    except ValidationError as err:
        first = err.errors()[0]
        param = ".".join(str(part) for part in first["loc"]) or "feedback"
        raise ServingError(f"{param}: {first['msg']}", param=param) from None


class LoggedTrace(BaseModel):
    """One row of the trace log."""

    id: str
    tenant: str | None = None
    created_at: _dt.datetime
    trace: Trace
    feedback: GivenFeedback | None = None
    rated_at: _dt.datetime | None = None


class ExportedRow(BaseModel):
    """One line of an exported feedback file (the pinned format, see the module's doc; a job
    reads it back with ``cotune.feedback.parse_feedback``)."""

    id: str
    inputs: dict[str, Any]
    output: Any
    feedback: GivenFeedback
    spans: list[Span]

    @classmethod
    def of(cls, logged: LoggedTrace) -> ExportedRow:
        assert logged.feedback is not None
        trace = logged.trace
        return cls(
            id=logged.id,
            inputs=trace.inputs,
            output=trace.output,
            feedback=logged.feedback,
            spans=trace.spans,
        )

    def as_line(self) -> str:
        row = {
            "id": self.id,
            "inputs": self.inputs,
            "output": self.output,
            "feedback": self.feedback.as_json(),
            "spans": [span.model_dump(mode="json") for span in self.spans],
        }
        return json.dumps(row, ensure_ascii=False)


# -- the trace log ------------------------------------------------------------------------------


def _stamp(seconds: float) -> _dt.datetime:
    return _dt.datetime.fromtimestamp(seconds, _dt.UTC)


class TraceLog:
    """The served system's traces and their feedback: ``<folder>/traces.db`` (SQLite, WAL: the
    server writes while ``cotune feedback export`` reads). Thread-safe."""

    def __init__(
        self,
        folder: str | Path,
        retention_days: float,
        *,
        clock: Callable[[], float] = time.time,
        create: bool = True,
    ) -> None:
        if not retention_days > 0:
            raise ServingError(
                f"trace_retention_days must be above 0, got {retention_days}",
                param="trace_retention_days",
            )
        self.folder = Path(folder).expanduser()
        self.path = self.folder / TRACE_DB
        if not create and not self.path.is_file():
            raise ServingError(f"no trace log at {self.path}", param="traces")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.retention_days = retention_days
        self._clock = clock
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA busy_timeout=10000")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS traces (id TEXT PRIMARY KEY, tenant TEXT, "
                "created_at REAL NOT NULL, trace TEXT NOT NULL, feedback TEXT, rated_at REAL)"
            )
            self._db.execute("CREATE INDEX IF NOT EXISTS traces_created ON traces (created_at)")
        self._pruned_at = -math.inf

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _cutoff(self) -> float:
        return self._clock() - self.retention_days * DAY_SECONDS

    def prune(self) -> int:
        """Delete the traces older than the retention; how many went."""
        with self._lock:
            self._pruned_at = self._clock()
            done = self._db.execute("DELETE FROM traces WHERE created_at < ?", (self._cutoff(),))
        return done.rowcount

    def add(self, trace: Trace, tenant: str | None = None) -> LoggedTrace:
        """Log a served trace under its ``trace_id``; prunes at most hourly."""
        if self._clock() - self._pruned_at >= PRUNE_INTERVAL_SECONDS:
            self.prune()
        now = self._clock()
        with self._lock:
            self._db.execute(
                "INSERT INTO traces (id, tenant, created_at, trace) VALUES (?, ?, ?, ?)",
                (trace.trace_id, tenant, now, trace.model_dump_json()),
            )
        return LoggedTrace(id=trace.trace_id, tenant=tenant, created_at=_stamp(now), trace=trace)

    def get(self, trace_id: str, tenant: str | None = None) -> LoggedTrace:
        """The trace, or ``TraceNotFound`` (also for another tenant's or an expired one)."""
        with self._lock:
            row = self._db.execute(
                "SELECT id, tenant, created_at, trace, feedback, rated_at FROM traces "
                "WHERE id = ? AND created_at >= ?",
                (trace_id, self._cutoff()),
            ).fetchone()
        if row is None or (tenant is not None and row[1] != tenant):
            raise TraceNotFound(trace_id)
        return _logged(row)

    def record_feedback(
        self,
        trace_id: str,
        rating: Any,
        comment: Any = None,
        corrected_output: Any = None,
        *,
        tenant: str | None = None,
    ) -> LoggedTrace:
        """Rate a logged trace (a later rating replaces an earlier one). ``ServingError``
        naming the field for a bad value, ``TraceNotFound`` for an unknown id."""
        feedback = make_feedback(rating, comment, corrected_output)
        self.get(trace_id, tenant)
        now = self._clock()
        with self._lock:
            self._db.execute(
                "UPDATE traces SET feedback = ?, rated_at = ? WHERE id = ?",
                (feedback.model_dump_json(exclude_none=True), now, trace_id),
            )
        return self.get(trace_id, tenant)

    def rated(
        self,
        *,
        since: _dt.datetime | None = None,
        tenant: str | None = None,
        corrected_only: bool = False,
    ) -> Iterator[LoggedTrace]:
        """The rated traces, oldest first: rated at or after ``since``, of ``tenant`` if given,
        only those with a ``corrected_output`` if ``corrected_only``."""
        query = (
            "SELECT id, tenant, created_at, trace, feedback, rated_at FROM traces "
            "WHERE feedback IS NOT NULL AND created_at >= ?"
        )
        if corrected_only:
            query += " AND json_extract(feedback, '$.corrected_output') IS NOT NULL"
        args: list[Any] = [self._cutoff()]
        if since is not None:
            if since.tzinfo is None:
                since = since.replace(tzinfo=_dt.UTC)
            query += " AND rated_at >= ?"
            args.append(since.timestamp())
        if tenant is not None:
            query += " AND tenant = ?"
            args.append(tenant)
        with self._lock:
            rows = self._db.execute(query + " ORDER BY created_at, id", args).fetchall()
        for row in rows:
            yield _logged(row)


def _logged(row: tuple[Any, ...]) -> LoggedTrace:
    trace_id, tenant, created_at, trace, feedback, rated_at = row
    return LoggedTrace(
        id=trace_id,
        tenant=tenant,
        created_at=_stamp(created_at),
        trace=Trace.model_validate_json(trace),
        feedback=None if feedback is None else GivenFeedback.model_validate_json(feedback),
        rated_at=None if rated_at is None else _stamp(rated_at),
    )


def export_feedback(
    log: TraceLog,
    out: str | Path,
    *,
    since: _dt.datetime | None = None,
    tenant: str | None = None,
    corrected_only: bool = False,
) -> int:
    """Write the rated traces to ``out`` as a feedback file (JSONL, the pinned format); how many.
    ``corrected_only``: only those with a ``corrected_output`` (what a job under a gold metric
    takes: the corrected output is the row's gold; rating-only rows need ``metric: judge``).
    The file appears whole or not at all; with no such trace nothing is written and
    ``ServingError`` says so."""
    rated = log.rated(since=since, tenant=tenant, corrected_only=corrected_only)
    rows = [ExportedRow.of(logged) for logged in rated]
    if not rows:
        scope = " with a corrected_output" if corrected_only else ""
        scope += "" if since is None else f" since {since.isoformat()}"
        scope += "" if tenant is None else f" of tenant {tenant!r}"
        raise ServingError(f"no rated traces{scope} in {log.path}: nothing to export")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(partial, "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(row.as_line() + "\n")
        os.replace(partial, out)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return len(rows)


# -- the served system --------------------------------------------------------------------------


def check_inputs(system: SystemSpec, inputs: Any) -> dict[str, Any]:
    """The request's inputs: exactly the system's input fields, each given (not null)."""
    if not isinstance(inputs, Mapping):
        raise ServingError(
            f"inputs must be an object of the system's input fields {system.inputs}",
            param="inputs",
        )
    for name in inputs:
        if name not in system.inputs:
            raise ServingError(
                f"inputs.{name}: unknown input field (the system's inputs: {system.inputs})",
                param=f"inputs.{name}",
            )
    for name in system.inputs:
        if inputs.get(name) is None:
            raise ServingError(
                f"inputs.{name}: missing input field (the system's inputs: {system.inputs})",
                param=f"inputs.{name}",
            )
    return {name: inputs[name] for name in system.inputs}


@dataclass
class SystemServer:
    """A bundle's system, ready to answer: one run per request (runs take turns: one engine
    call batch at a time), each trace logged. A logged span names no folder of this machine:
    its ``model`` is the base model's registry name (else its alias) and its ``adapter`` the
    adapter's folder within the bundle (``adapters/<component>``)."""

    bundle: Path
    runtime: Runtime
    log: TraceLog
    model_names: dict[str, str] = field(default_factory=dict)  # model alias -> shown name
    adapter_names: dict[str, str] = field(default_factory=dict)  # component -> in the bundle
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def system(self) -> SystemSpec:
        return self.runtime.system

    def run(self, inputs: Any, *, tenant: str | None = None) -> LoggedTrace:
        """Run the system on one request's inputs; the logged trace (its id answers)."""
        from cotune.data import Example

        values = check_inputs(self.system, inputs)
        with self._lock:
            trace = self.runtime.run([Example(id="served", inputs=values)])[0]
        trace.example_id = trace.trace_id
        for span in trace.spans:
            if span.kind == "llm":
                alias = self.system.component(span.component).model or ""
                span.model = self.model_names.get(alias, alias)
                span.adapter = self.adapter_names.get(span.component)
        return self.log.add(trace, tenant)

    def close(self) -> None:
        self.log.close()


def open_bundle(
    folder: str | Path,
    *,
    engine: Literal["vllm", "transformers"] = "vllm",
    traces: str | Path | None = None,
    settings: Settings | None = None,
) -> SystemServer:
    """A bundle folder as a ``SystemServer``. The bundle must match its manifest. A base model
    is ``$COTUNE_MODEL_<ALIAS>`` if set (as for ``serve.sh``), else the manifest's (a registry
    model prepared in ``$COTUNE_HOME/models``, or the folder it was built from). ``traces``:
    the trace log's folder (default ``settings.traces_dir()``)."""
    from cotune.bundle import ADAPTERS_FILE, MANIFEST, SYSTEM_FILE, BundleError, verify_bundle
    from cotune.bundle.plan import _vllm_rank
    from cotune.runtime import open_runtime
    from cotune.settings import get_settings
    from cotune.spec import load_system
    from cotune.tools import ToolContext

    settings = settings or get_settings()
    folder = Path(folder).expanduser().resolve()
    problems = verify_bundle(folder)
    if problems:
        raise BundleError(f"{folder} is not an intact bundle: " + "; ".join(problems[:5]))
    manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    system = load_system(folder / SYSTEM_FILE)
    for component in system.components:
        if component.tool == "bm25" and not system.resolve_path(component.args["corpus"]).is_file():
            raise BundleError(
                f"component {component.name!r}: its corpus {component.args['corpus']!r} is not "
                "in the bundle (built before corpora travelled in bundles: download it again)"
            )
    mapping = json.loads((folder / ADAPTERS_FILE).read_text(encoding="utf-8"))
    adapters = {component: str(folder / relative) for component, relative in mapping.items()}
    names = {
        alias: ref.name if ref.name is not None else alias for alias, ref in system.models.items()
    }
    names.update(
        (alias, info["name"])
        for alias, info in manifest.get("base_models", {}).items()
        if info.get("kind") == "registry"
    )
    system = system.model_copy(update={"models": _model_folders(system, manifest)})

    options: dict[str, Any] = {}
    if engine == "vllm":
        ranks = [int(c["lora_r"]) for c in manifest.get("components", {}).values()]
        options = {
            "max_lora_rank": _vllm_rank(max(ranks, default=1), "bundle"),
            "max_loras": max(len(adapters), 1),
        }
    tools = ToolContext.from_settings(system, settings)
    runtime = open_runtime(
        system, engine=engine, adapters=adapters, tools=tools, engine_options=options
    )
    log = TraceLog(traces or settings.traces_dir(), settings.trace_retention_days)
    log.prune()
    return SystemServer(folder, runtime, log, names, dict(mapping))


def _model_folders(system: SystemSpec, manifest: Mapping[str, Any]) -> dict[str, Any]:
    """Each model alias as a ``ModelRef`` to a local folder (see ``open_bundle``)."""
    from cotune.bundle import env_name
    from cotune.models import resolve_model
    from cotune.spec.system import ModelRef

    described = manifest.get("base_models", {})
    used = {c.model for c in system.llm_components}
    models: dict[str, Any] = {}
    for alias, ref in system.models.items():
        if alias not in used:
            models[alias] = ref
            continue
        override = os.environ.get(env_name(alias))
        info = described.get(alias, {})
        if override:
            ref = ModelRef(path=override)
        elif info.get("kind") == "registry":
            ref = ModelRef(name=info["name"])
        elif info.get("kind") == "path":
            ref = ModelRef(path=info["path"])
        folder = resolve_model(ref, system.base_dir, param=f"models.{alias}")
        models[alias] = ModelRef(path=str(folder))
    return models
