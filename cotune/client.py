"""The Python SDK for a cotune server: ``Client``.

    from cotune.client import Client

    client = Client("http://127.0.0.1:8000", api_key="ck-...")   # or COTUNE_API_URL / _KEY
    job = client.submit("examples/kb-qa/job.yaml")   # uploads its local files first
    job = client.wait(job["id"], progress=True)       # follows the events until it ends
    client.download_bundle(job["id"], "bundle/")      # every adapter, serve.sh, manifest

A job spec file is the same one ``cotune run`` takes. Over HTTP a spec names no server path
(DESIGN.md §4), so ``submit`` rewrites the local files it names into file ids: each of
``data.train|val|test`` is uploaded with purpose ``data``, ``data.feedback`` with purpose
``feedback``, each bm25 ``args.corpus`` with
purpose ``corpus`` (a file named twice is uploaded once), and ``system: system.yaml`` is read
and sent inline. Values that already are ``file-...`` ids are left alone. Models stay
registry names; a model ``path`` is refused before anything is uploaded.

Every non-2xx answer raises ``ApiError`` with the server's ``code``, ``message`` and
``param``. Only httpx is needed (no server-side packages).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tarfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx

from cotune.errors import CotuneError
from cotune.spec.refs import DATA_PURPOSES, FileRef, file_refs, is_file_id, map_refs
from cotune.store.status import TERMINAL

DEFAULT_URL = "http://127.0.0.1:8000"
RETRY_STATUSES = frozenset({502, 503, 504})
# Downloads stream: no limit on the whole, but a server silent for this long is given up on.
# (connect, read, write, pool) as a plain tuple: a client passed in may be another httpx
# flavour (Starlette's TestClient on httpx2 >= 2.17 refuses an httpx.Timeout object).
DOWNLOAD_TIMEOUT = (60.0, 600.0, 60.0, 60.0)

Job = dict[str, Any]
Progress = Callable[[dict[str, Any]], None]


class ApiError(CotuneError):
    """The server refused a request: ``status`` (HTTP), ``code``, ``message``, ``param``."""

    def __init__(self, status: int, code: str, message: str, param: str | None = None) -> None:
        where = f" ({param})" if param else ""
        super().__init__(f"HTTP {status} {code}{where}: {message}")
        self.status, self.code, self.message, self.param = status, code, message, param


class Client:
    """A cotune server's API. ``base_url`` defaults to ``COTUNE_API_URL`` (else
    ``http://127.0.0.1:8000``), ``api_key`` to ``COTUNE_API_KEY``."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 60.0,
        http: httpx.Client | None = None,
    ) -> None:
        self.base_url = (base_url or os.environ.get("COTUNE_API_URL") or DEFAULT_URL).rstrip("/")
        key = api_key if api_key is not None else os.environ.get("COTUNE_API_KEY")
        # Sent with every request rather than set on the httpx client, so that a given
        # ``http`` client (tests pass the app's TestClient) is used as it is.
        self._headers = {"user-agent": "cotune-client"}
        if key:
            self._headers["authorization"] = f"Bearer {key}"
        self._owns_http = http is None
        self._http = http or httpx.Client(base_url=self.base_url, timeout=timeout)

    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- requests -------------------------------------------------------------------------

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, headers=self._headers, **kwargs)
        except httpx.HTTPError as err:
            raise CotuneError(f"{method} {self.base_url}{path}: {err}") from None
        _raise_for_error(response)
        return response.json()

    # -- files ----------------------------------------------------------------------------

    def upload_file(self, path: str | Path, purpose: str) -> dict[str, Any]:
        """Upload a data file (JSONL/CSV, purpose ``data``), rated runs (JSONL, ``feedback``)
        or a corpus (``corpus``). The
        server checks it at once; a bad line answers 422 naming the line and field."""
        path = Path(path)
        if not path.is_file():
            raise CotuneError(f"{path}: no such file")
        with open(path, "rb") as stream:
            result: dict[str, Any] = self._request(
                "POST",
                "/v1/files",
                data={"purpose": purpose},
                files={"file": (path.name, stream)},
            )
        return result

    def list_files(self) -> list[dict[str, Any]]:
        return list(self._pages("/v1/files"))

    def delete_file(self, file_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._request("DELETE", f"/v1/files/{file_id}")
        return result

    # -- jobs -----------------------------------------------------------------------------

    def prepare(
        self,
        job: str | Path | Mapping[str, Any],
        *,
        base_dir: str | Path | None = None,
        on_upload: Callable[[Path, dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """The job spec as the server takes it: the system inline and every local file
        uploaded and replaced by its id. ``job`` is a spec file or a mapping (relative paths
        from ``base_dir``, default the file's folder or the current one)."""
        spec, job_folder, system_folder = _read_job(job, base_dir)
        for ref in file_refs(spec):  # all refused before anything is uploaded
            if ref.purpose == "model":
                raise CotuneError(
                    f"system.models.{ref.owner}: a server runs registry models only; replace "
                    f"path: {ref.value} by name: <a registry model> (see GET /v1/models)"
                )
        uploads: dict[tuple[Path, str], str] = {}

        def upload(ref: FileRef) -> str:
            if is_file_id(ref.value):
                return str(ref.value)
            if not isinstance(ref.value, str) or not ref.value:
                raise CotuneError(
                    f"{ref.param}: expected a local file or a file id, got {ref.value!r}"
                )
            # Data files are relative to the job file, corpora to the system file.
            folder = job_folder if ref.purpose in DATA_PURPOSES else system_folder
            path = Path(ref.value).expanduser()
            path = (path if path.is_absolute() else folder / path).resolve()
            if not path.is_file():
                raise CotuneError(f"{ref.param}: {path} is not a file")
            if (path, ref.purpose) not in uploads:
                uploaded = self.upload_file(path, ref.purpose)
                uploads[(path, ref.purpose)] = uploaded["id"]
                if on_upload is not None:
                    on_upload(path, uploaded)
            return uploads[(path, ref.purpose)]

        return map_refs(spec, upload)

    def submit(
        self,
        job: str | Path | Mapping[str, Any],
        *,
        base_dir: str | Path | None = None,
        idempotency_key: str | None = None,
        on_upload: Callable[[Path, dict[str, Any]], None] | None = None,
    ) -> Job:
        """Upload the job's local files and create the job; returns the job object. One
        ``Idempotency-Key`` per call (or the one given), so a retried POST makes one job."""
        spec = self.prepare(job, base_dir=base_dir, on_upload=on_upload)
        key = idempotency_key or uuid.uuid4().hex
        return self._post_job(spec, key)

    def _post_job(self, spec: Mapping[str, Any], key: str) -> Job:
        for attempt in range(3):
            try:
                response = self._http.post(
                    "/v1/jobs", json=spec, headers={**self._headers, "idempotency-key": key}
                )
            except httpx.TransportError as err:  # the same key: a retry cannot make two jobs
                if attempt == 2:
                    raise CotuneError(f"POST {self.base_url}/v1/jobs: {err}") from None
                time.sleep(1 + attempt)
                continue
            _raise_for_error(response)
            result: Job = response.json()
            return result
        raise AssertionError("unreachable")

    def quote(
        self, job: str | Path | Mapping[str, Any], *, base_dir: str | Path | None = None
    ) -> dict[str, Any]:
        """What the job would cost (engine requests, tokens, judge calls); uploads its files."""
        spec = self.prepare(job, base_dir=base_dir)
        result: dict[str, Any] = self._request("POST", "/v1/jobs/quote", json=spec)
        return result

    def get(self, job_id: str) -> Job:
        result: Job = self._request("GET", f"/v1/jobs/{job_id}")
        return result

    def list_jobs(self, limit: int | None = None) -> list[Job]:
        return list(self._pages("/v1/jobs", limit=limit))

    def cancel(self, job_id: str) -> Job:
        result: Job = self._request("POST", f"/v1/jobs/{job_id}/cancel")
        return result

    def delete(self, job_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._request("DELETE", f"/v1/jobs/{job_id}")
        return result

    def metrics(self, job_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._request("GET", f"/v1/jobs/{job_id}/metrics")
        return result

    def checkpoints(self, job_id: str) -> list[dict[str, Any]]:
        return list(self._pages(f"/v1/jobs/{job_id}/checkpoints"))

    # -- events ---------------------------------------------------------------------------

    def events(
        self, job_id: str, *, after: str | None = None, follow: bool = False
    ) -> Iterator[dict[str, Any]]:
        """The job's events, oldest first. ``follow``: keep the stream open (server-sent
        events) until the job ends; a dropped connection resumes after the last event."""
        if not follow:
            yield from self._pages(f"/v1/jobs/{job_id}/events", after=after)
            return
        last, state = after, {"failures": 0}
        while True:
            # A stream that drops, ends without its ``done`` event, or meets a 502/503/504 (the
            # API restarting) is resumed after the last event received; six failures in a row
            # without the stream opening give up.
            error = "the stream ended early"
            try:
                for event in self._stream(job_id, last, state):
                    if event is None:
                        return
                    last = event["id"]
                    yield event
            except httpx.TransportError as err:
                error = str(err)
            except ApiError as err:
                if err.status not in RETRY_STATUSES:
                    raise
                error = str(err)
            state["failures"] += 1
            if state["failures"] > 5:
                raise CotuneError(f"lost the event stream of {job_id}: {error}")
            time.sleep(min(5.0, 0.5 * state["failures"]))

    def _stream(
        self, job_id: str, after: str | None, state: dict[str, int]
    ) -> Iterator[dict[str, Any] | None]:
        params = {"stream": "true", **({"after": after} if after else {})}
        with self._http.stream(
            "GET",
            f"/v1/jobs/{job_id}/events",
            params=params,
            headers=self._headers,
            timeout=None,
        ) as response:
            if response.status_code >= 400:
                response.read()
                _raise_for_error(response)
            state["failures"] = 0  # the stream is open: a later drop is a new failure
            kind, lines = "message", []
            for line in response.iter_lines():
                if line.startswith("event:"):
                    kind = line[6:].strip()
                elif line.startswith("data:"):
                    lines.append(line[5:].strip())
                elif line == "":
                    if lines:
                        if kind == "done":
                            yield None
                            return
                        yield json.loads("\n".join(lines))
                    kind, lines = "message", []

    def wait(
        self,
        job_id: str,
        *,
        timeout: float | None = None,
        progress: bool | Progress = False,
    ) -> Job:
        """Follow the job until it is ``succeeded``, ``failed`` or ``cancelled``; returns the
        job. ``progress``: True prints each event, a callable gets each event object."""
        show: Progress | None = None
        if progress is True:
            show = print_event
        elif callable(progress):
            show = progress
        deadline = None if timeout is None else time.monotonic() + timeout
        if show is None:
            while True:
                job = self.get(job_id)
                if job["status"] in TERMINAL:
                    return job
                if deadline is not None and time.monotonic() > deadline:
                    raise CotuneError(f"job {job_id} still {job['status']} after {timeout} s")
                time.sleep(2.0)
        # The stream ends when the job does; a timeout is checked between events.
        for event in self.events(job_id, follow=True):
            show(event)
            if deadline is not None and time.monotonic() > deadline:
                raise CotuneError(f"job {job_id} not finished after {timeout} s")
        return self.get(job_id)

    # -- downloads ------------------------------------------------------------------------

    def download_adapter(
        self, job_id: str, component: str, dest: str | Path, *, extract: bool = True
    ) -> Path:
        """The best epoch's PEFT adapter of ``component``: ``dest/<component>/`` (extracted)
        or the ``.tar.gz`` at ``dest`` (``extract=False``)."""
        return self._download(f"/v1/jobs/{job_id}/adapters/{component}", Path(dest), extract)

    def download_bundle(self, job_id: str, dest: str | Path, *, extract: bool = True) -> Path:
        """Every adapter, the system spec, ``serve.sh`` and a manifest: the bundle's folder
        under ``dest`` (extracted) or the ``.tar.gz`` at ``dest`` (``extract=False``)."""
        return self._download(f"/v1/jobs/{job_id}/bundle", Path(dest), extract)

    def _download(self, path: str, dest: Path, extract: bool) -> Path:
        dest.parent.mkdir(parents=True, exist_ok=True)
        if extract:
            dest.mkdir(parents=True, exist_ok=True)
        archive = dest if not extract else dest / f".cotune-{uuid.uuid4().hex[:8]}.tar.gz"
        partial = archive.with_name(archive.name + ".partial")
        try:
            with self._http.stream(
                "GET", path, headers=self._headers, timeout=DOWNLOAD_TIMEOUT
            ) as response:
                if response.status_code >= 400:
                    response.read()
                    _raise_for_error(response)
                with open(partial, "wb") as out:
                    for chunk in response.iter_bytes(1 << 20):
                        out.write(chunk)
            partial.replace(archive)
        except httpx.HTTPError as err:
            raise CotuneError(f"GET {self.base_url}{path}: {err}") from None
        finally:
            partial.unlink(missing_ok=True)
        if not extract:
            return archive
        try:
            return _extract(archive, dest)
        finally:
            archive.unlink(missing_ok=True)

    # -- pagination -----------------------------------------------------------------------

    def _pages(
        self, path: str, *, after: str | None = None, limit: int | None = None
    ) -> Iterator[dict[str, Any]]:
        seen = 0
        while True:
            params: dict[str, Any] = {"limit": 100}
            if after:
                params["after"] = after
            page = self._request("GET", path, params=params)
            for item in page["data"]:
                yield item
                seen += 1
                if limit is not None and seen >= limit:
                    return
            if not page.get("has_more") or not page["data"]:
                return
            after = page["data"][-1]["id"]


def _extract(archive: Path, dest: Path) -> Path:
    """Extract a downloaded archive of one top folder (an adapter or a bundle) into
    ``dest/<top>``; refuses anything but plain files and folders under that one top folder,
    and a ``dest/<top>`` that already exists (a download never overwrites)."""
    with tarfile.open(archive, "r:gz") as tar:
        members = tar.getmembers()
        tops = {m.name.split("/", 1)[0] for m in members}
        if len(tops) != 1:
            raise CotuneError(f"the download holds {len(tops)} top folders, expected one")
        top = tops.pop()
        for m in members:
            parts = m.name.split("/")
            if not (m.isfile() or m.isdir()) or m.name.startswith("/") or ".." in parts:
                raise CotuneError(f"the download holds an unsafe entry {m.name!r}; not extracted")
        if top in ("", ".", "..") or not members[0].name:
            raise CotuneError("the download's top folder has no name; not extracted")
        target = dest / top
        if target.exists():
            raise CotuneError(f"{target} already exists; remove it or choose another --out")
        scratch = dest / f".{top}.partial-{uuid.uuid4().hex[:8]}"
        try:
            for m in members:
                m.mode = 0o755 if m.isdir() else 0o644
            tar.extractall(scratch, members=members)  # checked above: files and folders only
            (scratch / top).replace(target)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return target


def _raise_for_error(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        error = response.json()["error"]
        code, message, param = error["code"], error["message"], error.get("param")
    except (ValueError, KeyError, TypeError):
        code, message, param = "http_error", response.text[:500] or response.reason_phrase, None
    raise ApiError(response.status_code, code, message, param)


def _read_job(
    job: str | Path | Mapping[str, Any], base_dir: str | Path | None
) -> tuple[dict[str, Any], Path, Path]:
    """The job mapping with its system inline, the folder its data paths are relative to and
    the one the system's are (the system file's, when the system is a file)."""
    from cotune.spec.system import read_mapping

    if isinstance(job, Mapping):
        spec = copy.deepcopy(dict(job))
        folder = Path(base_dir) if base_dir is not None else Path.cwd()
    else:
        path = Path(job)
        spec = read_mapping(path)
        folder = Path(base_dir) if base_dir is not None else path.resolve().parent
    system = spec.get("system")
    if isinstance(system, str):
        system_path = Path(system).expanduser()
        system_path = system_path if system_path.is_absolute() else folder / system_path
        spec["system"] = read_mapping(system_path)
        return spec, folder, system_path.resolve().parent
    if isinstance(system, Mapping):
        spec["system"] = dict(system)
        return spec, folder, folder
    raise CotuneError("system: give the system spec's file or the spec itself")


def print_event(event: dict[str, Any]) -> None:
    stamp = time.strftime("%H:%M:%S", time.localtime(event.get("created_at", time.time())))
    level = event.get("level", "info")
    print(f"{stamp} {'' if level == 'info' else level.upper() + ' '}{event['message']}", flush=True)


__all__ = ["ApiError", "Client"]
