"""Checking a bundle folder against its manifest (``verify_bundle``); links are never
followed."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from cotune.bundle.layout import _CHUNK, MANIFEST


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
