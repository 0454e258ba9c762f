"""A finished job's outputs in the artifact store, and server folders kept out of what the
API sends."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cotune.records import JobReport
    from cotune.runner import JobContext
    from cotune.settings import Settings
    from cotune.store import ArtifactStore

RESULT_PREFIX = "result"


def export_job_result(ctx: JobContext, report: JobReport) -> str:
    """The embedded run's output folder (report, metrics, curves, test traces, the best
    adapters) written to ``<job_id>/result/`` in the artifact store and recorded as the job's
    artifacts; ``report.adapters`` becomes ``{component: "<job_id>/result/adapters/<c>"}``.
    The same layout as the Celery finalizer's."""
    import tempfile

    from cotune.report import copy_adapters, write_outputs

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
