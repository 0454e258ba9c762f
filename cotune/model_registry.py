"""Registering base models: ``cotune models add | remove | list`` (rows: ``cotune.store.registry``).

``add`` records the model (``registered``), prepares it into the shared cache
(``cotune_home()/models/<name>``, built under a temporary name and renamed, like the built-ins:
``cotune.models.build_in_cache``), and marks it ``ready``, or ``failed`` with the error. Sources:

- ``hf``: ``REPO[@REVISION]`` through ``huggingface_hub.snapshot_download``; the revision is
  pinned to the commit it resolved to. Offline (``HF_HUB_OFFLINE=1``) it reads a hub-layout
  cache (``models--org--name/snapshots/<commit>/``, ``refs/<branch>``).
- ``path``: a local Hugging Face folder, copied.
- ``gguf``: a GGUF file, converted to float32 safetensors (``cotune.models.convert_gguf``).

Nothing is ever unpickled or run: a ``config.json`` asking for remote code (``auto_map``) and a
folder without safetensors weights are refused, and pickle files are never copied into the cache.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cotune.errors import CotuneError, SpecError
from cotune.models import (
    CHATML_EOS,
    REGISTRY,
    Progress,
    build_in_cache,
    convert_gguf,
    is_model_folder,
    models_dir,
    read_manifest,
    save_tokenizer,
)

if TYPE_CHECKING:
    from cotune.model_records import ModelOptions, RegisteredModel, SourceKind
    from cotune.store.registry import ModelStore

MODEL_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
# What a model folder may bring into the cache; pickles (*.bin, *.pt, ...) never.
ALLOWED_FILES = ("*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


class ModelInUse(CotuneError):
    """``remove`` of a model an unfinished job names."""


def add_model(
    store: ModelStore,
    name: str,
    kind: SourceKind,
    source: str,
    options: ModelOptions,
    *,
    progress: Progress | None = print,
) -> RegisteredModel:
    """Register ``name`` and prepare it; returns the ready row (raises after marking it failed)."""
    from cotune.model_records import ModelStatus

    say: Progress = progress or (lambda _message: None)
    check_new_name(name)
    if kind == "hf":
        parse_hf_source(source)  # a malformed source is refused before a row exists
    store.add(name, kind, source, options)
    store.set_status(name, ModelStatus.preparing)
    try:
        target = models_dir() / name
        if target.exists():  # left over by a removal that could not delete it
            shutil.rmtree(target)
        build = _builder(name, kind, source, options, say)
        folder = build_in_cache(name, build, description=f"{kind}: {source}", force=True, say=say)
    except BaseException as err:
        store.set_status(name, ModelStatus.failed, error=str(err) or type(err).__name__)
        raise
    pinned = read_manifest(folder).get("source", {}).get("pinned", source)
    store.set_status(name, ModelStatus.ready, source=pinned)
    found = store.get(name)
    assert found is not None
    return found


def remove_model(store: ModelStore, name: str) -> None:
    """Delete a registered model's row and prepared folder, unless an unfinished job names it."""
    if name in REGISTRY:
        raise CotuneError(f"model {name!r} is built in and cannot be removed")
    if store.get(name) is None:
        raise CotuneError(f"no registered model {name!r} (`cotune models list`)")
    using = store.jobs_using(name)
    if using:
        raise ModelInUse(
            f"model {name!r} is named by unfinished job(s) {', '.join(using)}; cancel them or "
            "wait until they finish"
        )
    store.delete(name)
    shutil.rmtree(models_dir() / name, ignore_errors=True)


def catalog(store: ModelStore | None) -> dict[str, RegisteredModel]:
    """The registered models by name ({} without a store), for ``resolve_model``'s
    ``registered`` and the API's checks."""
    return {} if store is None else {m.name: m for m in store.list_all()}


def check_new_name(name: str) -> None:
    if not re.match(MODEL_NAME, name):
        raise SpecError(
            f"model name {name!r} must be 1-64 letters, digits, '_', '.' or '-' (starting with "
            "a letter or digit)",
            param="name",
        )
    if name in REGISTRY:
        raise SpecError(f"model name {name!r} is a built-in model's", param="name")


def parse_hf_source(source: str) -> tuple[str, str | None]:
    """``(repo, revision or None)`` from ``org/name[@revision]``."""
    repo, _, revision = source.partition("@")
    if not re.match(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$", repo) or (_ and not revision):
        raise SpecError(
            f"--hf {source!r}: give a Hugging Face repository as ORG/NAME[@REVISION]", param="hf"
        )
    return repo, revision or None


# -- preparing each kind of source ---------------------------------------------------------------


def _builder(
    name: str, kind: SourceKind, source: str, options: ModelOptions, say: Progress
) -> Callable[[Path], dict[str, Any]]:
    def build(out: Path) -> dict[str, Any]:
        if kind == "hf":
            record = _from_hub(name, source, out, say)
        elif kind == "path":
            record = _from_folder(name, Path(source).expanduser(), out, say)
            record["pinned"] = str(Path(source).expanduser().resolve())
        elif kind == "gguf":
            record = _from_gguf(name, Path(source).expanduser(), out, say)
        else:
            raise SpecError(f"unknown source kind {kind!r}", param="kind")
        _apply_options(name, out, options)
        return {"source": {"kind": kind, **record}, "options": options.model_dump(mode="json")}

    return build


def _from_hub(name: str, source: str, out: Path, say: Progress) -> dict[str, Any]:
    from huggingface_hub import snapshot_download

    repo, revision = parse_hf_source(source)
    say(f"{name}: fetching {repo}@{revision or 'main'} (huggingface_hub)")
    try:
        # config.json first: a repository that asks for remote code is refused before its weights
        # are fetched.
        config_only = snapshot_download(repo, revision=revision, allow_patterns=["config.json"])
        check_config(name, Path(config_only))
        snapshot = Path(
            snapshot_download(repo, revision=revision, allow_patterns=list(ALLOWED_FILES))
        )
    except SpecError:
        raise
    except Exception as err:  # huggingface_hub's errors: not found, offline and not cached, ...
        raise CotuneError(f"model {name!r}: could not fetch {source!r}: {err}") from err
    _copy_folder(name, snapshot, out)
    commit = snapshot.name  # snapshots/<commit>: the revision, pinned
    return {"repo": repo, "revision": commit, "pinned": f"{repo}@{commit}"}


def _from_folder(name: str, folder: Path, out: Path, say: Progress) -> dict[str, Any]:
    if not folder.is_dir():
        raise SpecError(f"model {name!r}: --path {str(folder)!r} is not a folder", param="path")
    say(f"{name}: copying {folder}")
    _copy_folder(name, folder, out)
    return {"path": str(folder.resolve())}


def _from_gguf(name: str, gguf: Path, out: Path, say: Progress) -> dict[str, Any]:
    if not gguf.is_file() or gguf.suffix.lower() != ".gguf":
        raise SpecError(f"model {name!r}: --gguf {str(gguf)!r} is not a .gguf file", param="gguf")
    say(f"{name}: converting {gguf.name} -> float32 safetensors")
    convert_gguf(gguf.resolve(), out, name, chat_eos=None)
    digest = hashlib.sha256()
    with gguf.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    where = str(gguf.resolve())
    return {"file": where, "sha256": digest.hexdigest(), "pinned": where}


def check_config(name: str, folder: Path) -> dict[str, Any]:
    """The folder's ``config.json``, refused when it asks for remote code."""
    path = folder / "config.json"
    if not path.is_file():
        raise SpecError(f"model {name!r}: {folder} has no config.json", param="config.json")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise SpecError(f"model {name!r}: config.json is not JSON: {err}") from None
    if not isinstance(config, dict):
        raise SpecError(f"model {name!r}: config.json is not a JSON object")
    if "auto_map" in config:
        raise SpecError(
            f"model {name!r}: config.json has 'auto_map', i.e. the model needs its own Python "
            "code (trust_remote_code); cotune runs no code from a model",
            param="auto_map",
        )
    return config


def _copy_folder(name: str, folder: Path, out: Path) -> None:
    """Copy a Hugging Face folder's config, tokenizer and safetensors weights (following the
    hub cache's symlinks); refuse one whose weights are pickles only."""
    check_config(name, folder)
    if not any(folder.glob("*.safetensors")):
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        raise SpecError(
            f"model {name!r}: {folder} holds no safetensors weights"
            + (f" (only pickled ones: {pickles}, which cotune never loads)" if pickles else ""),
            param="safetensors",
        )
    for pattern in ALLOWED_FILES:
        for path in folder.glob(pattern):
            if path.is_file():
                shutil.copyfile(path, out / path.name)


def _apply_options(name: str, out: Path, options: ModelOptions) -> None:
    """Put a given chat template into the tokenizer; a model must end up with one."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(out))
    if options.chat_template is not None:
        tokenizer.chat_template = options.chat_template
        save_tokenizer(tokenizer, out)
    elif not getattr(tokenizer, "chat_template", None):
        raise SpecError(
            f"model {name!r} has no chat template; give one with --chat-template FILE "
            f"(e.g. ChatML, ending turns with {CHATML_EOS!r})",
            param="chat_template",
        )
    if not is_model_folder(out):
        raise SpecError(f"model {name!r}: no tokenizer files (tokenizer.json)", param="tokenizer")
