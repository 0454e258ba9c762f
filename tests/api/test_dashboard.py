"""The dashboard in a real browser: Debian's headless ``chromium`` against the API served by
uvicorn on 127.0.0.1, on real PostgreSQL, with one job run end to end by the real
``ThreadDispatcher`` and the scripted engine, judge and trainer of ``tests/doubles.py`` (test
doubles, as in ``test_api.py``'s end-to-end run).

Each page load is one ``chromium --headless=new`` with a fresh profile, driven over
``--remote-debugging-pipe``. The key comes in the URL fragment (``#key=...&/jobs/<id>``, never a
query string); the page marks ``<body data-ready="1">`` once every fetch of its view has settled
(on a finished job, the event stream included): the test waits for that mark, then reads the
DOM. (``--dump-dom`` with ``--virtual-time-budget`` does not wait for a streamed response body,
so under load it sometimes dumped a page still loading.) The static routes are checked with a
plain ``TestClient``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import shutil
import socket
import subprocess
import tarfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import fresh_pg_database, tiny_job_spec
from doubles import stub_registry_model
from fastapi.testclient import TestClient

from cotune.jobs.threads import ThreadDispatcher
from cotune.records import Event
from cotune.settings import Settings
from cotune.store import ArtifactStore, JobStatus, JobStore
from cotune.store.accounts import AccountStore
from cotune.tiny import write_tiny_example
from services.api.app import create_app
from services.api.routes.dashboard import ASSETS, FOLDER

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
BROWSER_TIMEOUT = 120


# --------------------------------------------------------------------------- the page's DOM


@dataclass
class Node:
    tag: str
    attrs: dict[str, str]
    children: list[Node | str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text for c in self.children)

    def cells(self) -> list[str]:
        return [c.text.strip() for c in self.all("td")]

    def all(self, tag: str | None = None, cls: str | None = None, **attrs: str) -> list[Node]:
        """Descendants by tag, class tokens (all of ``cls``) and attribute values."""
        found = []
        for child in self.children:
            if isinstance(child, str):
                continue
            classes = child.attrs.get("class", "").split()
            if (
                (tag is None or child.tag == tag)
                and all(token in classes for token in (cls or "").split())
                and all(child.attrs.get(k.replace("_", "-")) == v for k, v in attrs.items())
            ):
                found.append(child)
            found.extend(child.all(tag, cls, **attrs))
        return found

    def one(self, tag: str | None = None, cls: str | None = None, **attrs: str) -> Node:
        found = self.all(tag, cls, **attrs)
        assert len(found) == 1, f"{len(found)} <{tag} class={cls} {attrs}> elements"
        return found[0]


VOID = frozenset({"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta"})


class DomParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#document", {})
        self.stack = [self.root]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Node(tag, {k: v or "" for k, v in attrs})
        self.stack[-1].children.append(node)
        if tag not in VOID:
            self.stack.append(node)

    def handle_endtag(self, tag: str) -> None:
        for i in range(len(self.stack) - 1, 0, -1):
            if self.stack[i].tag == tag:
                del self.stack[i:]
                return

    def handle_data(self, data: str) -> None:
        self.stack[-1].children.append(data)


def parse(html: str) -> Node:
    parser = DomParser()
    parser.feed(html)
    parser.close()
    return parser.root


class Chromium:
    """Headless chromium driven over ``--remote-debugging-pipe`` (the DevTools protocol as
    NUL-terminated JSON: commands on its fd 3, answers on its fd 4), with a fresh profile."""

    def __init__(self, profile: Path) -> None:
        assert Path(CHROMIUM).exists(), "chromium is missing: run scripts/setup-test.sh as root"
        commands, self._to_browser = os.pipe()
        self._from_browser, answers = os.pipe()
        flags = [
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-background-networking",
            f"--user-data-dir={profile / uuid.uuid4().hex}",
            "--remote-debugging-pipe",
            "about:blank",
        ]
        # the shell puts the pipe ends on fds 3 and 4, then becomes chromium
        script = f'exec "$0" "$@" 3<&{commands} 4>&{answers}'
        self.proc = subprocess.Popen(
            ["bash", "-c", script, CHROMIUM, *flags],
            pass_fds=(commands, answers),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(commands)
        os.close(answers)
        self._buffer = b""
        self._next_id = 0
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)[
            "sessionId"
        ]

    def call(self, method: str, session: str | None = None, **params: Any) -> dict[str, Any]:
        answer = self._send(method, session, params)
        assert "error" not in answer, (method, answer["error"])
        return dict(answer["result"])

    def _send(self, method: str, session: str | None, params: dict[str, Any]) -> dict[str, Any]:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + BROWSER_TIMEOUT
        while True:
            while b"\0" not in self._buffer:
                left = deadline - time.monotonic()
                ready, _, _ = select.select([self._from_browser], [], [], max(left, 0))
                assert ready, f"chromium did not answer {method}"
                chunk = os.read(self._from_browser, 1 << 16)
                assert chunk, f"chromium exited (rc {self.proc.poll()}) during {method}"
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            answer = json.loads(raw)
            if answer.get("id") == self._next_id:  # anything else is an event: not needed
                return dict(answer)

    def evaluate(self, expression: str) -> Any:
        """The value of ``expression`` in the page; None while a navigation replaces it."""
        params = {"expression": expression, "returnByValue": True}
        answer = self._send("Runtime.evaluate", self.session, params)
        return answer.get("result", {}).get("result", {}).get("value")

    def wait_for(self, expression: str) -> None:
        """Poll until ``expression`` is true in the page (readiness: nothing asserts on speed)."""
        deadline = time.monotonic() + BROWSER_TIMEOUT
        while not self.evaluate(expression):
            assert time.monotonic() < deadline, f"never true in the page: {expression}"
            time.sleep(0.05)

    def dom(self) -> tuple[Node, str]:
        html = self.evaluate("document.documentElement.outerHTML")
        return parse(html).one("body"), html

    def open(self, url: str) -> tuple[Node, str]:
        """Load ``url``; the DOM once the page marks ``<body data-ready="1">``."""
        self.call("Page.navigate", self.session, url=url)
        self.wait_for("location.href.startsWith('http') && document.body?.dataset.ready === '1'")
        return self.dom()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.call("Browser.close")
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_browser)
        os.close(self._from_browser)


def browse(url: str, profile: Path) -> tuple[Node, str]:
    """Load ``url`` in a fresh headless chromium; the body once the page is done, and the HTML."""
    browser = Chromium(profile)
    try:
        return browser.open(url)
    finally:
        browser.close()


# --------------------------------------------------------------------------- the served API


@dataclass
class Served:
    url: str
    key: str
    job: dict[str, Any]
    metrics: dict[str, Any]
    components: list[dict[str, Any]]
    traces: list[dict[str, Any]]
    events: list[dict[str, Any]]


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """A fresh PostgreSQL database and a ``COTUNE_HOME`` with a registry model ``tiny`` that
    resolves (never loaded: the run uses the scripted engine)."""
    home = tmp_path_factory.mktemp("cotune-home")
    stub_registry_model(home)
    root = tmp_path_factory.mktemp("dashboard")
    with fresh_pg_database("cotune_dash") as url, pytest.MonkeyPatch.context() as mp:
        mp.setenv("COTUNE_HOME", str(home))
        yield Settings(
            database_url=url,
            artifacts=str(root / "artifacts"),
            workdir=str(root / "work"),
            events_poll_seconds=0.05,
            migrate_on_start=False,
        )


@pytest.fixture(scope="module")
def served(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """The app under uvicorn on a free port, with one job run to ``succeeded`` through it."""
    import uvicorn
    from doubles import scripted_context_options

    store = JobStore(settings.database_url)
    dispatcher = ThreadDispatcher(
        store,
        AccountStore(store),
        ArtifactStore(settings.artifacts),
        settings,
        context_options=scripted_context_options(),
    )
    app = create_app(settings, dispatcher=dispatcher)
    _, key = app.state.cotune.accounts.create_key("acme", name="dashboard")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:  # readiness, not timing: the assertions never depend on speed
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        headers = {"Authorization": f"Bearer {key}"}
        with httpx.Client(base_url=url, headers=headers, timeout=30) as client:
            folder = write_tiny_example(tmp_path_factory.mktemp("tiny-kb"), splits=(12, 6, 6))
            files = {}
            for name in ("train", "val", "test", "corpus"):
                purpose = "corpus" if name == "corpus" else "data"
                response = client.post(
                    "/v1/files",
                    files={"file": (f"{name}.jsonl", (folder / f"{name}.jsonl").read_bytes())},
                    data={"purpose": purpose},
                )
                assert response.status_code == 200, response.text
                files[name] = response.json()["id"]
            spec = tiny_job_spec(files, judge={"model": "tiny"})
            created = client.post("/v1/jobs", json=spec)
            assert created.status_code == 200, created.text
            job_id = created.json()["id"]
            assert dispatcher.wait_idle(timeout=120)
            job = client.get(f"/v1/jobs/{job_id}").json()
            assert job["status"] == "succeeded", job
            base = f"/v1/jobs/{job_id}"
            yield Served(
                url=url,
                key=key,
                job=job,
                metrics=client.get(f"{base}/metrics").json(),
                components=client.get(f"{base}/components").json()["data"],
                traces=client.get(f"{base}/traces?limit=10").json()["data"],
                events=client.get(f"{base}/events?limit=1000").json()["data"],
            )
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        dispatcher.shutdown(wait=True)
        store.close()


# --------------------------------------------------------------------------- in the browser


def test_the_job_list_shows_the_job(served: Served, tmp_path: Path) -> None:
    browser = Chromium(tmp_path)
    try:
        body, html = browser.open(f"{served.url}/dashboard#key={served.key}&/jobs")
        assert browser.evaluate("location.hash") == "#/jobs"  # the key left the URL at once
        assert browser.evaluate("localStorage.getItem('cotune.apiKey')") == served.key
    finally:
        browser.close()
    assert body.one(id="error").attrs.get("hidden") is not None, body.one(id="error").text
    job_id = served.job["id"]
    row = body.one("tr", data_job=job_id)
    assert row.one("a").text == job_id and row.one("a").attrs["href"] == f"#/jobs/{job_id}"
    assert row.one("span", "badge status-succeeded").text == "succeeded"
    result = served.job["result"]
    assert row.cells()[4] == f"{result['base_val_score']:.3f}"
    assert served.key not in html  # the key lives in localStorage, not in the page


def pct(rate: float | None) -> str:
    """A rate as the dashboard shows it (app.js ``pct``)."""
    return "—" if rate is None else f"{rate:.0%}"


def test_the_job_page_shows_charts_components_traces_and_events(
    served: Served, tmp_path: Path
) -> None:
    job_id = served.job["id"]
    body, _ = browse(f"{served.url}/dashboard#key={served.key}&/jobs/{job_id}", tmp_path)
    assert body.one(id="error").attrs.get("hidden") is not None, body.one(id="error").text
    summary = body.one("section", id="summary")
    assert summary.one("h1").one("span", "badge").text == "succeeded"
    assert job_id in summary.text
    assert not body.all("button", id="cancel")  # a finished job cannot be cancelled
    adapters = served.job["result"]["adapters"]
    downloads = {b.attrs["data-url"] for b in summary.all("button", "download")}
    expected = {f"/v1/jobs/{job_id}/adapters/{c}" for c in adapters}
    assert downloads == (expected | {f"/v1/jobs/{job_id}/bundle"} if adapters else set())

    # the score chart: one point per epoch for val (and train), the base as a dashed line
    epochs = served.metrics["epochs"]
    assert epochs
    chart = body.one("svg", id="score-chart")
    val_points = chart.all("circle", "pt val")
    assert [float(p.attrs["data-x"]) for p in val_points] == [e["epoch"] for e in epochs]
    assert [float(p.attrs["data-y"]) for p in val_points] == [e["val_score"] for e in epochs]
    assert len(chart.all("circle", "pt train")) == len(epochs)
    base = chart.one("line", "base")
    assert base.attrs["stroke-dasharray"] and served.metrics["base_val_score"] is not None
    # a loss chart per trained component: one point per SFT step over all epochs
    steps: dict[str, int] = {}
    for record in (c for e in epochs for c in e["components"]):
        steps[record["component"]] = steps.get(record["component"], 0) + len(record["sft_losses"])
    assert any(steps.values())
    for name, count in steps.items():
        if count:
            assert len(body.one("svg", id=f"loss-{name}").all("circle", "pt sft")) == count

    # the components table: a row per component and epoch, numbers as the API gives them
    table = body.one("table", id="components-table")
    for component in served.components:
        rows = table.all("tr", data_component=component["name"])
        assert len(rows) == max(1, len(component["epochs"]))
        assert rows[0].cells()[0] == component["name"]
        keys = ("candidates_proposed", "candidates_verified", "samples", "pairs")
        for row, record in zip(rows, component["epochs"], strict=False):
            cells = row.cells()
            assert cells[2] == str(record["epoch"])
            assert cells[3:5] == [pct(record["blame_rate"]), pct(record["verified_rate"])]
            assert cells[5:9] == [str(record[k]) for k in keys]
    assert any(c["epochs"] and c["epochs"][0]["candidates_proposed"] for c in served.components)

    # traces: the first page, each with its spans
    cards = body.one("section", id="traces").all("details", "trace")
    assert served.traces and [c.attrs["data-trace"] for c in cards] == [
        t["id"] for t in served.traces
    ]
    first = served.traces[0]
    spans = cards[0].all("tr", data_span=first["spans"][0]["span_id"])
    assert spans and spans[0].cells()[0] == first["spans"][0]["component"]
    assert str(first["inputs"]["question"]) in cards[0].text

    # the live event log read the stream to its end
    log = body.one("ol", id="event-log")
    messages = [li.one("span", "message").text for li in log.all("li")]
    assert messages == [e["message"] for e in served.events]
    assert messages[-1] == "succeeded"
    assert body.one(id="event-state").attrs["data-done"] == "succeeded"


def test_a_download_goes_through_the_page_with_the_key(served: Served, tmp_path: Path) -> None:
    """The download buttons fetch with the key header and save the blob under the server's
    file name."""
    adapters = served.job["result"]["adapters"]
    if not adapters:
        pytest.skip("the scripted run kept no epoch: no adapter to download")
    job_id, component = served.job["id"], adapters[0]
    folder = tmp_path / "downloads"
    folder.mkdir()
    browser = Chromium(tmp_path)
    try:
        browser.call("Browser.setDownloadBehavior", behavior="allow", downloadPath=str(folder))
        browser.open(f"{served.url}/dashboard#key={served.key}&/jobs/{job_id}")
        url = f"/v1/jobs/{job_id}/adapters/{component}"
        browser.evaluate(f"document.querySelector('button[data-url=\"{url}\"]').click()")
        saved = folder / f"{job_id}-{component}.tar.gz"
        deadline = time.monotonic() + BROWSER_TIMEOUT
        while not saved.exists():  # readiness: chromium renames the file when it is complete
            assert time.monotonic() < deadline, sorted(p.name for p in folder.iterdir())
            time.sleep(0.05)
    finally:
        browser.close()
    with tarfile.open(saved) as tar:
        names = tar.getnames()
    assert f"{component}/adapter_config.json" in names
    assert f"{component}/adapter_model.safetensors" in names


def test_a_wrong_key_shows_the_401_message(served: Served, tmp_path: Path) -> None:
    body, _ = browse(f"{served.url}/dashboard#key=not-a-key&/jobs", tmp_path)
    error = body.one(id="error")
    assert error.attrs.get("hidden") is None
    assert error.text == "HTTP 401: the API key is unknown or revoked"
    assert not body.all("tr", data_job=served.job["id"])


def _running_job(store: JobStore, served: Served) -> str:
    """A job in ``running`` written to the store directly: no dispatcher runs it, the test
    moves it on."""
    job_id = store.create_job("live", served.job["spec"], tenant_id="acme")
    store.transition(job_id, JobStatus.running)
    store.add_event(job_id, Event(message="running", created_at=time.time()))
    return job_id


def test_a_running_job_is_cancelled_and_its_page_follows_the_stream(
    served: Served, settings: Settings, tmp_path: Path
) -> None:
    store = JobStore(settings.database_url)
    browser = Chromium(tmp_path)
    try:
        job_id = _running_job(store, served)
        body, _ = browser.open(f"{served.url}/dashboard#key={served.key}&/jobs/{job_id}")
        assert body.one("section", id="summary").one("span", "badge").text == "running"
        browser.wait_for("document.querySelectorAll('#event-log li').length === 1")
        assert browser.evaluate("document.getElementById('event-state').textContent") == "live"
        browser.evaluate("document.getElementById('cancel').click()")
        browser.wait_for("document.querySelector('.action-note').textContent !== ''")
        note = browser.evaluate("document.querySelector('.action-note').textContent")
        assert note.startswith("cancel requested"), note
        record = store.get_job(job_id)
        assert record is not None and record.cancel_requested
        # its worker would stop at the next stage boundary: stand for it
        stopped = Event(message="stopped at a stage boundary", created_at=time.time())
        store.add_event(job_id, stopped)
        store.transition(job_id, JobStatus.cancelled)
        browser.wait_for(  # the stream's `done` re-renders the page
            "document.querySelector('#summary h1 .badge')?.textContent === 'cancelled'"
            " && document.body.dataset.ready === '1'"
        )
        body, _ = browser.dom()
        messages = [li.one("span", "message").text for li in body.one(id="event-log").all("li")]
        assert messages == ["running", "cancel requested", "stopped at a stage boundary"]
        assert body.one(id="event-state").attrs["data-done"] == "cancelled"
        assert not body.all("button", id="cancel")
    finally:
        browser.close()
        store.close()


def test_a_refused_cancel_shows_the_409_message(
    served: Served, settings: Settings, tmp_path: Path
) -> None:
    """The page still shows a job as running when it has finished meanwhile (its event stream
    is held back by the browser, so the page does not learn of it): the server refuses."""
    store = JobStore(settings.database_url)
    browser = Chromium(tmp_path)
    try:
        job_id = _running_job(store, served)
        patterns = [{"urlPattern": "*/events?*", "requestStage": "Request"}]
        browser.call("Fetch.enable", browser.session, patterns=patterns)  # never continued
        browser.open(f"{served.url}/dashboard#key={served.key}&/jobs/{job_id}")
        store.transition(job_id, JobStatus.failed, error="boom")
        browser.evaluate("document.getElementById('cancel').click()")
        browser.wait_for("document.querySelector('.action-note').textContent !== ''")
        note = browser.evaluate("document.querySelector('.action-note').textContent")
        headers = {"Authorization": f"Bearer {served.key}"}
        refused = httpx.post(f"{served.url}/v1/jobs/{job_id}/cancel", headers=headers)
        assert refused.status_code == 409
        assert note == f"HTTP 409: {refused.json()['error']['message']}"
        assert browser.evaluate("document.getElementById('cancel').disabled") is False
    finally:
        browser.close()
        store.close()


# --------------------------------------------------------------------------- static routes


def test_the_static_routes(settings: Settings) -> None:
    with TestClient(create_app(settings)) as client:
        for path in ("/dashboard", "/dashboard/"):
            page = client.get(path)  # no key needed: the page holds no data
            assert page.status_code == 200, page.text
            assert page.headers["content-type"] == "text/html; charset=utf-8"
            assert "/dashboard/static/app.js" in page.text
        kinds = {"app.js": "text/javascript", "style.css": "text/css", "index.html": "text/html"}
        for name, kind in kinds.items():
            asset = client.get(f"/dashboard/static/{name}")
            assert asset.status_code == 200
            assert asset.headers["content-type"].startswith(kind)
            assert asset.content == (FOLDER / name).read_bytes()
            csp = asset.headers["content-security-policy"]
            assert "default-src 'self'" in csp and "connect-src 'self'" in csp
            assert asset.headers["x-content-type-options"] == "nosniff"
        for name in ("secret.txt", "..%2Fapp.py", "%2e%2e%2f..%2fpyproject.toml", "APP.JS"):
            missing = client.get(f"/dashboard/static/{name}")
            assert missing.status_code == 404, name
            assert missing.json()["error"]["code"] == "not_found"
        root = client.get("/", follow_redirects=False)
        assert root.status_code in (302, 307) and root.headers["location"] == "/dashboard"
        assert client.get("/v1/jobs").status_code == 401  # the data routes keep their auth
    assert set(ASSETS) == {p.name for p in FOLDER.iterdir()}


def test_the_assets_reach_nothing_outside_and_never_parse_data_as_html() -> None:
    for name in ASSETS:
        source = (FOLDER / name).read_text()
        urls = set(re.findall(r"(?:https?:)?//[\w.-]+\.\w+[^\s\"')]*", source))
        assert urls <= {"http://www.w3.org/2000/svg"}, (name, urls)  # SVG's namespace only
    script = (FOLDER / "app.js").read_text()
    assert "innerHTML" not in script and "outerHTML" not in script
    assert "insertAdjacentHTML" not in script and "document.write" not in script
