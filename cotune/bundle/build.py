"""Writing the bundle folder (``build_bundle``): adapters and bm25 corpora copied and hashed,
the system spec (its corpora pointing at their copies), the adapter map, ``serve.sh`` and the
manifest, built beside the target and renamed into place."""

from __future__ import annotations

import datetime as _dt
import hashlib
import importlib.metadata
import json
import os
import shutil
import stat
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from cotune.bundle.layout import (
    _CHUNK,
    ADAPTERS_FILE,
    BUNDLE_FORMAT,
    CORPORA_DIR,
    LIBRARIES,
    MANIFEST,
    SERVE_SCRIPT,
    SYSTEM_FILE,
    BundleError,
)
from cotune.bundle.plan import _plan
from cotune.bundle.serve import render_serve_script
from cotune.spec import SystemSpec
from cotune.spec.refs import FileRef, is_file_id, map_refs
from cotune.training.rows import ADAPTER_FILES


def build_bundle(
    system: SystemSpec,
    adapters: dict[str, Path],
    out_dir: Path,
    *,
    base_models: dict[str, str],
    job_name: str,
    corpora: Mapping[str, Path] | None = None,
) -> Path:
    """Write the bundle folder ``out_dir`` (which must not exist, or be empty); return it.

    ``adapters`` maps component names to PEFT adapter folders. ``base_models`` maps the system's
    model aliases to a registry name (``smollm2-135m``: served from ``$COTUNE_HOME/models/<name>``)
    or a local model folder; an alias it leaves out falls back to the system's own ``models``
    entry. Each bm25 component's corpus is copied to ``corpora/<component>.jsonl`` and the
    bundle's ``system.yaml`` points at that copy, so the bundle runs the whole system
    (``cotune.serving``): ``corpora`` maps a component to its corpus file; one it leaves out
    is the spec's ``corpus`` path, resolved against the system's folder. The folder is built
    beside ``out_dir`` and renamed into place, so a failure never leaves half a bundle.
    """
    out_dir = Path(out_dir)
    if out_dir.is_symlink() or (out_dir.exists() and any(out_dir.iterdir())):
        raise BundleError(f"{out_dir} already exists and is not empty; choose another folder")
    if not adapters:
        raise BundleError("no adapters to bundle")

    plan = _plan(system, adapters, base_models)
    corpus_files = _corpus_files(system, corpora or {})
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.with_name(f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}")
    staging.mkdir()
    try:
        files: dict[str, dict[str, Any]] = {}
        for component, source in sorted(adapters.items()):
            target = staging / "adapters" / component
            target.mkdir(parents=True)
            for name in ADAPTER_FILES:
                files[f"adapters/{component}/{name}"] = _copy_file(source / name, target / name)

        bundled: dict[str, str] = {}
        for component, source in sorted(corpus_files.items()):
            relative = f"{CORPORA_DIR}/{component}.jsonl"
            (staging / CORPORA_DIR).mkdir(exist_ok=True)
            files[relative] = _copy_file(source, staging / relative)
            bundled[component] = relative

        def bundled_corpus(ref: FileRef) -> object:
            return bundled[ref.owner] if ref.purpose == "corpus" else ref.value

        dumped = system.model_dump(mode="json", by_alias=True, exclude_unset=True)
        system_text = yaml.safe_dump(
            map_refs({"system": dumped}, bundled_corpus)["system"],
            sort_keys=False,
            allow_unicode=True,
        )
        files[SYSTEM_FILE] = _write_text(staging / SYSTEM_FILE, system_text)
        mapping = {component: f"adapters/{component}" for component in sorted(adapters)}
        files[ADAPTERS_FILE] = _write_text(
            staging / ADAPTERS_FILE, json.dumps(mapping, indent=2) + "\n"
        )
        files[SERVE_SCRIPT] = _write_text(
            staging / SERVE_SCRIPT, render_serve_script(plan, job_name)
        )
        (staging / SERVE_SCRIPT).chmod(0o755)

        manifest = {
            "format": BUNDLE_FORMAT,
            "job": job_name,
            "system": system.name,
            "created_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "base_models": {alias: entry["manifest"] for alias, entry in plan.items()},
            "components": {
                component: {
                    "base_model": alias,
                    "adapter": f"adapters/{component}",
                    "lora_r": entry["ranks"][component],
                }
                for alias, entry in plan.items()
                for component in entry["components"]
            },
            "corpora": bundled,
            "libraries": library_versions(),
            "files": dict(sorted(files.items())),
        }
        _write_text(staging / MANIFEST, json.dumps(manifest, indent=2) + "\n")
        if out_dir.exists():
            out_dir.rmdir()  # empty, checked above
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def _corpus_files(system: SystemSpec, given: Mapping[str, Path]) -> dict[str, Path]:
    """Each bm25 component's corpus file: ``given``'s, else the spec's path (a file id, which
    only the API can read, must be given)."""
    found: dict[str, Path] = {}
    for component in system.components:
        if component.kind != "tool" or component.tool != "bm25":
            continue
        corpus = str(component.args["corpus"])
        source = given.get(component.name)
        if source is None:
            if is_file_id(corpus):
                raise BundleError(
                    f"component {component.name!r}: corpus {corpus!r} is an uploaded file; "
                    "give its local copy"
                )
            source = system.resolve_path(corpus)
        source = Path(source).resolve()
        if not source.is_file():
            raise BundleError(f"component {component.name!r}: corpus {source} is not a file")
        found[component.name] = source
    return found


def library_versions() -> dict[str, str | None]:
    """Installed versions of the libraries that trained and serve the adapters (None: absent)."""
    versions: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _copy_file(source: Path, target: Path) -> dict[str, Any]:
    """Copy one regular file without following links, hashing it on the way."""
    digest = hashlib.sha256()
    size = 0
    fd = os.open(source, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as reader, target.open("xb") as writer:
        if not stat.S_ISREG(os.fstat(reader.fileno()).st_mode):
            raise BundleError(f"{source} is not a regular file")
        while chunk := reader.read(_CHUNK):
            digest.update(chunk)
            writer.write(chunk)
            size += len(chunk)
    return {"sha256": digest.hexdigest(), "size": size}


def _write_text(path: Path, text: str) -> dict[str, Any]:
    data = text.encode("utf-8")
    path.write_bytes(data)
    return {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
