"""A bundle folder as a ``.tar.gz`` (``write_bundle_tar``): regular files and folders only,
owners and times normalised, each file streamed from disk."""

from __future__ import annotations

import os
import tarfile
import uuid
from pathlib import Path

from cotune.bundle.layout import BundleError


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
