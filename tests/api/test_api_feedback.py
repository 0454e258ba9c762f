"""Human feedback as data over HTTP: a ``feedback`` file of rated runs (ratings and comments)
uploaded with purpose ``feedback`` and named by ``data.feedback`` runs through ``POST /v1/jobs``
to a finished job, on real PostgreSQL with the real ``ThreadDispatcher``: the tiny model served
by vLLM runs the system, judges it (``metric: judge``) and is trained by TRL. A bad row answers
422 naming its line and field, and a spec the file cannot serve answers 422 naming the field;
neither writes a file or a job."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import tiny_job_spec
from doubles import JUDGED_RUBRIC, ScriptedEngine, write_judged_tiny_example
from fastapi.testclient import TestClient
from live_api import running_api

from cotune.data import Example
from cotune.jobs.threads import ThreadDispatcher
from cotune.runtime import Runtime
from cotune.spec import load_system
from cotune.store import JobStatus, JobStore
from cotune.store.accounts import AccountStore
from cotune.tiny import make_world
from cotune.tools import ToolContext

FACTS = make_world().facts
COMMENT = "it did not find the colour the question asked for"


@dataclass
class Live:
    client: TestClient
    headers: dict[str, str]
    dispatcher: ThreadDispatcher
    store: JobStore
    accounts: AccountStore
    folder: Path

    def upload(self, name: str, content: bytes, purpose: str) -> Any:
        return self.client.post(
            "/v1/files",
            headers=self.headers,
            files={"file": (name, content)},
            data={"purpose": purpose},
        )

    def uploaded(self, name: str, content: bytes, purpose: str) -> str:
        response = self.upload(name, content, purpose)
        assert response.status_code == 200, response.text
        assert response.json()["purpose"] == purpose
        return str(response.json()["id"])

    def counts(self) -> tuple[int, int]:
        files = len(self.accounts.list_files("acme", limit=10_000).data)
        return files, self.store.count_jobs("acme", list(JobStatus))


@pytest.fixture(scope="module")
def live(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """The API with the real ``ThreadDispatcher``; ``tiny`` in the models cache is the real
    tiny model; the judge-scored tiny-kb task (no gold anywhere) in ``folder``."""
    root = tmp_path_factory.mktemp("feedback-api")
    folder = write_judged_tiny_example(
        root / "task", model_path=str(tiny_model_dir), splits=(8, 4, 4)
    )
    with running_api(root, tiny_model_dir, "cotune_feedback") as api, TestClient(api.app) as client:
        headers = {"Authorization": f"Bearer {api.key}"}
        yield Live(client, headers, api.dispatcher, api.store, api.accounts, folder)


def feedback_rows(folder: Path) -> list[dict[str, Any]]:
    """Rated runs of the train split's questions, as an exporter writes them: two rated up
    (one with its whole trace, as ``cotune eval --out`` writes it), two rated down with a
    comment (one with a corrected output)."""
    keys = [
        json.loads(line)["question"].split()[-1].rstrip("?")
        for line in (folder / "train.jsonl").read_text().splitlines()
    ]
    system = load_system(folder / "system.yaml")
    engine = ScriptedEngine(query_ok=lambda key, adapter: True)  # the run came out right
    runtime = Runtime(system, {"tiny": engine}, ToolContext.for_system(system))
    [traced] = runtime.run(
        [Example(id="x", inputs={"question": f"what is the color of {keys[0]}?"})]
    )
    with_spans = json.loads(traced.model_dump_json())
    with_spans.update(id="r-traced", feedback={"rating": "up"})

    def row(key: str, output: str, feedback: dict[str, Any]) -> dict[str, Any]:
        question = f"what is the color of {key}?"
        return {
            "id": f"r-{key}",
            "inputs": {"question": question},
            "output": output,
            "feedback": feedback,
        }

    return [
        with_spans,
        row(keys[1], FACTS[keys[1]], {"rating": 1.0, "comment": "right"}),
        row(keys[2], "unknown", {"rating": "down", "comment": COMMENT}),
        row(
            keys[3],
            "unknown",
            {"rating": 0.1, "comment": COMMENT, "corrected_output": FACTS[keys[3]]},
        ),
    ]


def jsonl(rows: list[Any]) -> bytes:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows).encode()


def judged_spec(files: dict[str, str], **data: Any) -> dict[str, Any]:
    spec = tiny_job_spec(
        files,
        judge={"model": "tiny", "max_tokens": 256},
        loop={
            "epochs": 1,
            "samples_per_component": 8,
            "judge_samples": 1,
            "augment_rollouts": 0,
            "seed": 0,
        },
    )
    spec["system"].update(metric="judge", rubric=JUDGED_RUBRIC)
    spec["system"]["models"] = {"tiny": {"name": "tiny"}}
    spec["data"] = {"val": files["val"], **data}
    return spec


def test_a_feedback_upload_runs_through_post_v1_jobs_to_a_finished_job(live: Live) -> None:
    folder = live.folder
    rows = feedback_rows(folder)
    files = {
        "corpus": live.uploaded("corpus.jsonl", (folder / "corpus.jsonl").read_bytes(), "corpus"),
        "val": live.uploaded("val.jsonl", (folder / "val.jsonl").read_bytes(), "data"),
        "train": "unused",
        "test": "unused",
    }
    upload = live.upload("rated.jsonl", jsonl(rows), "feedback")
    assert upload.status_code == 200, upload.text
    assert upload.json()["rows"] == 4
    assert upload.json()["fields"]["feedback.comment"] == 3
    assert upload.json()["fields"]["inputs.question"] == 4
    assert upload.json()["fields"]["spans"] == 1
    spec = judged_spec(files, feedback=upload.json()["id"])

    quote = live.client.post("/v1/jobs/quote", json=spec, headers=live.headers)
    assert quote.status_code == 200, quote.text
    assert quote.json()["examples"]["feedback"] == 4
    created = live.client.post("/v1/jobs", json=spec, headers=live.headers)
    assert created.status_code == 200, created.text
    job_id = created.json()["id"]
    assert live.dispatcher.wait_idle(timeout=900), "the job did not finish"
    job = live.client.get(f"/v1/jobs/{job_id}", headers=live.headers).json()
    assert job["status"] == "succeeded", job

    metrics = live.client.get(f"/v1/jobs/{job_id}/metrics", headers=live.headers).json()
    stages = {(s["epoch"], s["stage"]): s for s in metrics["stages"]}
    assert set(stages) >= {(0, "baseline"), (1, "rollout"), (1, "credit"), (1, "verify")}
    assert set(stages) >= {(1, "synthesize"), (1, "train"), (1, "evaluate"), (2, "test")}
    rollout = stages[(1, "rollout")]["details"]
    assert rollout["feedback"] == rollout["traces"] == 4
    assert rollout["passed"] == 2  # the ratings, not a judge's scores
    assert stages[(1, "credit")]["details"]["failed"] == 2
    assert stages[(1, "credit")]["judge_calls"] > 0  # the comments went to the judge
    assert stages[(1, "verify")]["judge_calls"] > 0  # originals and replays judged alike
    # the rated-good runs bootstrap both components: the traced one its every span, the
    # other (its upstream spans reconstructed by a re-run) its final writer only
    assert stages[(1, "synthesize")]["details"]["samples"] >= 3
    assert stages[(1, "train")]["details"]["trained"] == 2

    traces = live.client.get(
        f"/v1/jobs/{job_id}/traces?stage=rollout&limit=100", headers=live.headers
    ).json()["data"]
    by_id = {t["example_id"]: t for t in traces}
    assert set(by_id) == {r["id"] for r in rows}
    for row in rows:
        trace = by_id[row["id"]]
        assert trace["output"] == row["output"]
        assert trace["feedback"]["comment"] == row["feedback"].get("comment")
    assert by_id["r-traced"]["score"] == 1.0 and by_id[rows[2]["id"]]["score"] == 0.0
    assert [s["reconstructed"] for s in by_id[rows[2]["id"]]["spans"]] == [True, True, False]


BAD_ROWS = [
    ({"inputs": {"question": "q"}, "output": "x", "feedback": {"rating": 2}}, "feedback.rating"),
    (
        {"inputs": {"question": "q"}, "output": "x", "feedback": {"rating": "meh"}},
        "feedback.rating",
    ),
    ({"inputs": "q", "output": "x", "feedback": {"rating": 1}}, "inputs"),
    ({"inputs": {"question": "q"}, "feedback": {"rating": 1}}, "output"),
    ({"inputs": {"question": "q"}, "output": "x"}, "feedback"),
    (
        {"inputs": {"question": "q"}, "output": "x", "feedback": {"rating": 0, "comment": 5}},
        "feedback.comment",
    ),
    (
        {
            "inputs": {"question": "q"},
            "output": "x",
            "feedback": {"rating": 0},
            "spans": [{"kind": "llm"}],
        },
        "spans[0].span_id",
    ),
    (
        '{"inputs": {"question": "q"}, "output": "x", "feedback": {"rating": NaN}}',
        "feedback.rating",
    ),
]


@pytest.mark.parametrize(("bad", "field"), BAD_ROWS)
def test_a_bad_feedback_row_answers_422_naming_line_and_field_and_writes_nothing(
    live: Live, bad: Any, field: str
) -> None:
    good = {"id": "ok", "inputs": {"question": "q"}, "output": "x", "feedback": {"rating": "up"}}
    before = live.counts()
    response = live.upload("rated.jsonl", jsonl([good, bad]), "feedback")
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_file" and error["param"] == f"line 2.{field}", error
    assert "line 2" in error["message"]
    assert live.counts() == before


def test_a_spec_the_feedback_file_cannot_serve_answers_422_and_writes_nothing(live: Live) -> None:
    folder = live.folder
    val = live.uploaded("val.jsonl", (folder / "val.jsonl").read_bytes(), "data")
    corpus = live.uploaded("corpus.jsonl", (folder / "corpus.jsonl").read_bytes(), "corpus")
    rated = live.uploaded(
        "rated.jsonl",
        jsonl([{"inputs": {"question": "q"}, "output": "x", "feedback": {"rating": "down"}}]),
        "feedback",
    )
    as_data = live.uploaded("rated-as-data.jsonl", (folder / "val.jsonl").read_bytes(), "data")
    files = {"val": val, "corpus": corpus, "train": "unused", "test": "unused"}
    exact = judged_spec(files, feedback=rated)
    exact["system"]["metric"] = "exact_match"
    del exact["system"]["rubric"]
    no_input = judged_spec(files, feedback=rated)
    no_input["system"] = json.loads(json.dumps(no_input["system"]).replace("question", "topic"))
    cases = [
        (judged_spec(files), "data.train"),  # neither train nor feedback
        (judged_spec(files, feedback=as_data), "data.feedback"),  # a file of purpose data
        (exact, "data.feedback"),  # only ratings, no corrected_output: needs metric judge
        (no_input, "data.feedback"),  # the rows lack the system's input
    ]
    before = live.counts()
    for spec, param in cases:
        response = live.client.post("/v1/jobs", json=spec, headers=live.headers)
        assert response.status_code == 422, response.text
        assert response.json()["error"]["param"] == param, response.json()
    assert live.counts() == before
