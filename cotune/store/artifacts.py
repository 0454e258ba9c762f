"""The artifact store: files keyed by relative paths under one root, over fsspec.

The root is a local directory (a plain path or ``file://...``) or any fsspec URL
(``s3://bucket/prefix``, ``memory://name``, ...). Keys are ``/``-separated relative paths such
as ``job-1/epoch-2/adapters/answer``; they are validated, never joined blindly: no empty key,
no absolute path, no ``.`` or ``..`` segment, no empty segment, no backslash, no NUL.

On local disk every write is atomic: a file is written to a temporary sibling, flushed and
renamed over its key (``os.replace``); ``put_dir`` copies the folder next to its key and swaps it
in. A crash leaves either the old content or the new one, never half a file. On object stores a
single PUT is already all-or-nothing; a ``put_dir`` there uploads file by file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import fsspec
from fsspec.implementations.local import LocalFileSystem
from pydantic import BaseModel

_CHUNK = 1 << 20
_TMP_MARK = ".cotune-tmp-"


def validate_key(key: str, *, allow_root: bool = False) -> str:
    """Return ``key`` if it is a safe relative key, else raise ``ValueError``."""
    if not isinstance(key, str):
        raise ValueError(f"artifact key must be a string, got {type(key).__name__}")
    if key == "" and allow_root:
        return key
    if not key:
        raise ValueError("artifact key is empty")
    if "\\" in key or "\x00" in key:
        raise ValueError(f"artifact key {key!r} contains a backslash or NUL")
    if key.startswith("/") or "://" in key or (len(key) > 1 and key[1] == ":"):
        raise ValueError(f"artifact key {key!r} is absolute; keys are relative to the root")
    for part in key.split("/"):
        if part in ("", ".", ".."):
            raise ValueError(f"artifact key {key!r} has an empty, '.' or '..' segment")
        if part.startswith(_TMP_MARK):
            raise ValueError(f"artifact key {key!r} uses a reserved name")
    return key


class ArtifactStore:
    """Bytes, JSON, text and folders (adapters) under one root."""

    def __init__(self, root: str, **storage_options: Any) -> None:
        self.root = root
        if "://" in root and not root.startswith("file://"):
            fs, path = fsspec.core.url_to_fs(root, **storage_options)
            self.fs = fs
            self._local_root: Path | None = None
            self._base = path.rstrip("/")
        else:
            local = root.removeprefix("file://")
            self._local_root = Path(local).expanduser().resolve()
            self._local_root.mkdir(parents=True, exist_ok=True)
            self.fs = LocalFileSystem()
            self._base = self._local_root.as_posix()
        self.is_local = self._local_root is not None

    def _fresh(self) -> Any:
        """The filesystem with its listing cache dropped: s3fs caches listings per process,
        and another process (a worker, the API) may have written since."""
        if not self.is_local:
            self.fs.invalidate_cache()
        return self.fs

    def __repr__(self) -> str:
        return f"ArtifactStore({self.root!r})"

    # ----------------------------------------------------------------------- paths

    def _path(self, key: str, *, allow_root: bool = False) -> str:
        key = validate_key(key, allow_root=allow_root)
        if not key:
            return self._base
        return f"{self._base}/{key}" if self._base else key

    def _local(self, key: str) -> Path:
        assert self._local_root is not None
        return self._local_root / validate_key(key)

    def _key_of(self, path: str) -> str:
        path = path.rstrip("/")
        base = self._base.rstrip("/")
        if base:
            # fsspec may or may not keep a leading "/" (memory://) on what it lists.
            for b in (base, base.lstrip("/"), "/" + base.lstrip("/")):
                if path.startswith(b + "/"):
                    return path[len(b) + 1 :]
            raise ValueError(f"{path!r} is not under the store's root {base!r}")
        return path.lstrip("/")

    def local_path(self, key: str) -> Path | None:
        """The key's path on local disk (whether or not it exists yet), or None when the
        root is remote: lets engines read an adapter in place instead of copying it."""
        return self._local(key) if self._local_root is not None else None

    # ----------------------------------------------------------------------- files

    def put_bytes(self, key: str, data: bytes) -> None:
        if self._local_root is not None:
            self._atomic_write(self._local(key), data)
        else:
            # Object stores need no folders; one PUT is all-or-nothing.
            self.fs.pipe_file(self._path(key), data)

    def get_bytes(self, key: str) -> bytes:
        """The key's content; ``FileNotFoundError`` if there is none."""
        if self._local_root is not None:
            path = self._local(key)
            if not path.is_file():
                raise FileNotFoundError(f"no artifact {key!r}")
            return path.read_bytes()
        path_s = self._path(key)
        if not self._fresh().isfile(path_s):
            raise FileNotFoundError(f"no artifact {key!r}")
        return bytes(self.fs.cat_file(path_s))

    def put_text(self, key: str, text: str) -> None:
        self.put_bytes(key, text.encode("utf-8"))

    def get_text(self, key: str) -> str:
        return self.get_bytes(key).decode("utf-8")

    def put_json(self, key: str, obj: Any) -> None:
        """Write JSON (a pydantic model is dumped in JSON mode first)."""
        if isinstance(obj, BaseModel):
            obj = obj.model_dump(mode="json")
        self.put_bytes(key, json.dumps(obj, ensure_ascii=False, indent=2).encode("utf-8"))

    def get_json(self, key: str) -> Any:
        return json.loads(self.get_bytes(key))

    @contextlib.contextmanager
    def open_read(self, key: str) -> Iterator[IO[bytes]]:
        """A binary file object for streaming a large artifact (downloads)."""
        if not self.isfile(key):
            raise FileNotFoundError(f"no artifact {key!r}")
        with self.fs.open(self._path(key), "rb") as f:
            yield f

    def exists(self, key: str) -> bool:
        """True if the key is a file or a folder."""
        if self._local_root is not None:
            return self._local(key).exists()
        return bool(self._fresh().exists(self._path(key)))

    def isfile(self, key: str) -> bool:
        if self._local_root is not None:
            return self._local(key).is_file()
        return bool(self._fresh().isfile(self._path(key)))

    def size(self, key: str) -> int:
        return int(self._fresh().size(self._path(key)))

    def sha256(self, key: str) -> str:
        """The hex SHA-256 of a file's content."""
        h = hashlib.sha256()
        with self.open_read(key) as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
        return h.hexdigest()

    # ----------------------------------------------------------------------- folders

    def put_dir(self, local_dir: str | os.PathLike[str], key: str) -> None:
        """Copy a local folder (e.g. an adapter) to ``key``, replacing what was there.

        Symlinks inside it are copied as the files they point to.
        """
        src = Path(local_dir)
        if not src.is_dir():
            raise NotADirectoryError(f"{src} is not a folder")
        if self._local_root is not None:
            dest = self._local(key)
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f"{_TMP_MARK}{dest.name}-{secrets.token_hex(4)}")
            try:
                shutil.copytree(src, tmp, symlinks=False)
                self._swap_in(tmp, dest)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            return
        self.delete(key)
        for file in sorted(p for p in src.rglob("*") if p.is_file()):
            rel = file.relative_to(src).as_posix()
            self.put_bytes(f"{key}/{rel}", file.read_bytes())

    def get_dir(self, key: str, local_dir: str | os.PathLike[str]) -> Path:
        """Copy the folder at ``key`` into ``local_dir`` (created); returns it."""
        dest = Path(local_dir)
        keys = self.list(key)
        if not keys or self.isfile(key):
            raise FileNotFoundError(f"no artifact folder {key!r}")
        dest.mkdir(parents=True, exist_ok=True)
        prefix = key + "/"
        for k in keys:
            rel = k[len(prefix) :]
            validate_key(rel)  # never write outside local_dir
            target = dest.joinpath(*rel.split("/"))
            target.parent.mkdir(parents=True, exist_ok=True)
            self._atomic_write(target, self.get_bytes(k))
        return dest

    def list(self, prefix: str = "") -> list[str]:
        """Keys of the files at or under the folder key ``prefix`` (all with ``""``), sorted."""
        path = self._path(prefix, allow_root=True)
        if not self._fresh().exists(path):
            return []
        if self.fs.isfile(path):
            return [prefix]
        keys = [self._key_of(p) for p in self.fs.find(path)]
        return sorted(
            k for k in keys if not any(part.startswith(_TMP_MARK) for part in k.split("/"))
        )

    def delete(self, prefix: str) -> None:
        """Delete the file or folder at ``prefix`` (nothing there: nothing to do)."""
        if self._local_root is not None:
            path = self._local(prefix)
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
            return
        path_s = self._path(prefix)
        if self._fresh().exists(path_s):
            self.fs.rm(path_s, recursive=True)

    # ----------------------------------------------------------------------- local atomics

    @staticmethod
    def _atomic_write(path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{_TMP_MARK}{path.name}-{secrets.token_hex(4)}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise

    @staticmethod
    def _swap_in(new: Path, dest: Path) -> None:
        """Put the folder ``new`` at ``dest``; a folder already there is replaced."""
        if not dest.exists():
            os.replace(new, dest)
            return
        old = dest.with_name(f"{_TMP_MARK}{dest.name}-old-{secrets.token_hex(4)}")
        os.replace(dest, old)
        try:
            os.replace(new, dest)
        except BaseException:
            os.replace(old, dest)
            raise
        shutil.rmtree(old, ignore_errors=True)
