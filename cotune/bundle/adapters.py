"""Adapter folders a bundle accepts: a plain PEFT LoRA, only the two adapter files, no links,
a safetensors header that parses. Nothing is unpickled."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from cotune.bundle.layout import SAFETENSORS_HEADER_LIMIT, BundleError
from cotune.training.rows import ADAPTER_FILES


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
