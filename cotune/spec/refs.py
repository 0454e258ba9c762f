"""The one walker of the files a job spec names: data splits, a ``data.feedback`` file of rated
runs, tool args that name a file (a bm25 ``corpus``) and models given by ``path``.

It reads a raw mapping (a job file as loaded, a spec sent over HTTP or stored as JSON), before
or without any parse, so it never trusts a shape: what is not a mapping or a list where one is
expected is skipped, and ``parse_job`` says what is wrong with it. A reference's value is given
as found (a ``None`` is no reference: an unset ``data.test``).

    for ref in file_refs(spec):                  # check or collect
        ...ref.param, ref.purpose, ref.value...
    spec = map_refs(spec, lambda ref: new_value) # rewrite: a new spec, the input untouched

Its callers: the client (local path -> uploaded file id), the API's check (each is a file id
of the right purpose), materialisation (file id -> a file in the job's folder) and the
workers (relative path -> absolute).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any, Literal

from cotune.spec.tools import FILE_ARGS, Purpose

FILE_ID = re.compile(r"^file-[A-Za-z0-9]{1,59}$")
Split = Literal["train", "val", "test"]
SPLITS: tuple[Split, ...] = ("train", "val", "test")
FEEDBACK = "feedback"  # data.feedback: rated runs (cotune.feedback), not a split of examples
DATA_PURPOSES = ("data", "fine-tune", "feedback")  # the files under data.*, relative to the job


def is_file_id(value: Any) -> bool:
    """An uploaded file's id (``file-...``), as opposed to a path."""
    # fullmatch: with match, ``$`` also accepts a trailing newline.
    return isinstance(value, str) and FILE_ID.fullmatch(value) is not None


@dataclass(frozen=True)
class FileRef:
    """One file a spec names.

    ``param``: where, as errors name it (``data.val``, ``system.components.search.args.corpus``,
    ``system.models.small.path``); ``purpose``: ``data`` (``fine-tune`` for OpenAI-format
    splits), ``feedback`` (``data.feedback``), ``corpus`` or ``model``; ``owner``: the split
    (``feedback`` for ``data.feedback``), the component (its name, else its index) or the
    model alias it belongs to;
    ``value``: as found, usually a string (a path or a file id), anything in a bad spec."""

    param: str
    purpose: Purpose
    owner: str
    value: Any


# A reference and the mapping + key that hold it, so that map_refs can set it.
_Slot = tuple[FileRef, MutableMapping[str, Any], str]


def file_refs(spec: Mapping[str, Any]) -> list[FileRef]:
    """The files a job spec names, data splits first, then the inline system's (a ``system``
    given as a file name is not read: load it first)."""
    if not isinstance(spec, Mapping):
        return []
    return [ref for ref, _, _ in _slots(spec)]


def map_refs(spec: Mapping[str, Any], fn: Callable[[FileRef], Any]) -> dict[str, Any]:
    """A deep copy of ``spec`` with each reference's value replaced by ``fn(ref)``, in the
    order of ``file_refs``. ``fn`` may raise to refuse one; ``spec`` is left untouched."""
    copied = copy.deepcopy(dict(spec))
    for ref, holder, key in list(_slots(copied)):
        holder[key] = fn(ref)
    return copied


def _slots(spec: Mapping[str, Any]) -> Iterator[_Slot]:
    # Holders must be mutable (dicts, as YAML, JSON and pydantic give) for map_refs to set them.
    data = spec.get("data")
    if isinstance(data, MutableMapping):
        # OpenAI's fine-tuning JSONL is uploaded as OpenAI's SDK does, with purpose fine-tune.
        purpose: Purpose = "fine-tune" if data.get("format") == "openai" else "data"
        for split in SPLITS:
            if data.get(split) is not None:
                yield FileRef(f"data.{split}", purpose, split, data[split]), data, split
        if data.get(FEEDBACK) is not None:
            ref = FileRef(f"data.{FEEDBACK}", "feedback", FEEDBACK, data[FEEDBACK])
            yield ref, data, FEEDBACK
    system = spec.get("system")
    if isinstance(system, MutableMapping):
        yield from _system_slots(system, "system")


def _system_slots(system: MutableMapping[str, Any], prefix: str) -> Iterator[_Slot]:
    components = system.get("components")
    for i, component in enumerate(components if isinstance(components, list) else []):
        if not isinstance(component, Mapping):
            continue
        tool, args = component.get("tool"), component.get("args")
        if not isinstance(tool, str) or not isinstance(args, MutableMapping):
            continue
        name = component.get("name")
        owner = name if isinstance(name, str) and name else str(i)
        for arg, purpose in FILE_ARGS.get(tool, {}).items():
            if args.get(arg) is not None:
                param = f"{prefix}.components.{owner}.args.{arg}"
                yield FileRef(param, purpose, owner, args[arg]), args, arg
    models = system.get("models")
    if isinstance(models, Mapping):
        for alias, ref in models.items():
            if isinstance(ref, MutableMapping) and ref.get("path") is not None:
                param = f"{prefix}.models.{alias}.path"
                yield FileRef(param, "model", str(alias), ref["path"]), ref, "path"
