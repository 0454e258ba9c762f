"""Feedback files (``cotune.feedback``): rated runs read as rows, refused naming line and field,
and turned into fixed traces (spans as given, or reconstructed by a re-run)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from doubles import ScriptedEngine

from cotune.data import Example
from cotune.errors import DataError
from cotune.feedback import (
    COMMENT_MAX,
    GivenFeedback,
    fixed_traces,
    load_feedback,
    parse_feedback,
)
from cotune.runtime import Runtime
from cotune.spec import SystemSpec, load_system, parse_system
from cotune.tiny import TINY_SYSTEM, make_world, write_tiny_example
from cotune.tools import ToolContext

FACTS = make_world().facts


def system(metric: str = "judge") -> SystemSpec:
    data = copy.deepcopy(TINY_SYSTEM)
    data["metric"] = metric
    if metric == "judge":
        data["rubric"] = "names the colour asked about"
    return parse_system(data)


def rows(*given: Any) -> list[tuple[int, Any]]:
    return [(i, row) for i, row in enumerate(given, start=1)]


def row(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "id": "r1",
        "inputs": {"question": "what is the color of quta?"},
        "output": "blue",
        "feedback": {"rating": "up"},
    }
    for key, value in changes.items():
        if value is None:
            base.pop(key, None)
        else:
            base[key] = value
    return base


@pytest.fixture(scope="module")
def example(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny")
    (folder / "model").mkdir()
    (folder / "model" / "config.json").write_text("{}")
    return write_tiny_example(folder, splits=(8, 4, 4), model_path=str(folder / "model"))


@pytest.fixture(scope="module")
def tiny(example: Path) -> SystemSpec:
    return load_system(example / "system.yaml")


def eval_lines(system: SystemSpec, keys: list[str]) -> list[dict[str, Any]]:
    """What ``cotune eval --out`` writes in traces.jsonl for these keys, as JSON objects."""
    runtime = Runtime(system, {"tiny": ScriptedEngine()}, ToolContext.for_system(system))
    examples = [
        Example(id=f"k-{k}", inputs={"question": f"what is the color of {k}?"}) for k in keys
    ]
    return [json.loads(t.model_dump_json()) for t in runtime.run(examples)]


# -- good rows --------------------------------------------------------------------------------


def test_ratings_comments_and_corrections_are_read() -> None:
    read = parse_feedback(
        rows(
            row(),
            row(id=None, feedback={"rating": "down", "comment": "wrong colour"}),
            row(id=7, feedback={"rating": 0.25, "corrected_output": "green"}),
        ),
        system(),
    )
    assert [r.id for r in read] == ["r1", "feedback-2", "7"]
    assert [r.feedback.rating for r in read] == [1.0, 0.0, 0.25]
    assert read[1].feedback.comment == "wrong colour"
    assert read[2].expected == ["green"] and read[0].expected is None
    assert read[2].example() == Example(
        id="7", inputs={"question": "what is the color of quta?"}, expected=["green"]
    )


def test_a_line_of_eval_traces_plus_feedback_is_a_row(tiny: SystemSpec) -> None:
    [line] = eval_lines(tiny, ["quta"])
    assert {"trace_id", "example_id", "score", "spans"} <= set(line)
    line["feedback"] = {"rating": "down", "comment": "too vague", "corrected_output": "blue"}
    [read] = parse_feedback(rows(line), tiny)
    assert read.spans is not None and [s.component for s in read.spans] == [
        "query",
        "search",
        "answer",
    ]
    assert read.output == line["output"] and read.id == "feedback-1"


# -- bad rows: each names its line and field --------------------------------------------------


def spans_of(tiny: SystemSpec) -> list[dict[str, Any]]:
    return eval_lines(tiny, ["quta"])[0]["spans"]


BAD: list[tuple[str, Any, str]] = [
    ("no inputs", row(inputs=None), "inputs"),
    ("inputs not an object", row(inputs=["q"]), "inputs"),
    ("input field missing", row(inputs={"query": "x"}), "inputs.question"),
    ("no output", row(output=None), "output"),
    ("no feedback", row(feedback=None), "feedback"),
    ("feedback not an object", row(feedback="up"), "feedback"),
    ("no rating", row(feedback={"comment": "meh"}), "feedback.rating"),
    ("rating above 1", row(feedback={"rating": 1.5}), "feedback.rating"),
    ("rating a word", row(feedback={"rating": "meh"}), "feedback.rating"),
    ("rating a boolean", row(feedback={"rating": True}), "feedback.rating"),
    ("rating NaN", row(feedback={"rating": float("nan")}), "feedback.rating"),
    ("comment a number", row(feedback={"rating": 0, "comment": 3}), "feedback.comment"),
    (
        "empty correction",
        row(feedback={"rating": 0, "corrected_output": " "}),
        "feedback.corrected_output",
    ),
    ("unknown feedback field", row(feedback={"rating": 0, "coment": "x"}), "feedback.coment"),
    ("id a boolean", row(id=False), "id"),
    ("spans not a list", row(spans={"query": {}}), "spans"),
]


@pytest.mark.parametrize(("bad", "field"), [pytest.param(r, f, id=c) for c, r, f in BAD])
def test_a_bad_row_names_its_line_and_field(bad: dict[str, Any], field: str) -> None:
    with pytest.raises(DataError) as info:
        parse_feedback(rows(row(id="ok"), bad), system(), source="fb.jsonl")
    assert (info.value.line, info.value.field) == (2, field)
    assert info.value.param == f"line 2.{field}"
    assert str(info.value).startswith("fb.jsonl, line 2: ")


@pytest.mark.parametrize(
    "given",
    [
        {"rating": 1.5},
        {"rating": "meh"},
        {"rating": True},
        {"rating": float("nan")},
        {"rating": 0, "comment": 3},
        {"rating": 0, "comment": "x" * (COMMENT_MAX + 1)},
        {"rating": 0, "corrected_output": " "},
        {"rating": 0, "coment": "x"},
    ],
)
def test_a_file_row_and_the_served_system_refuse_the_same_feedback(given: dict[str, Any]) -> None:
    """One check (``GivenFeedback``) for a feedback file's rows and the served system's
    feedback body: what one refuses the other refuses, naming the same field."""
    from pydantic import ValidationError

    with pytest.raises(DataError) as in_file:
        parse_feedback(rows(row(feedback=given)), system())
    with pytest.raises(ValidationError) as served:  # services/system/app.py's body model
        GivenFeedback.model_validate(given)
    where = ".".join(str(part) for part in served.value.errors()[0]["loc"])
    assert in_file.value.field == f"feedback.{where}"


def test_a_duplicate_id_names_the_first_line() -> None:
    with pytest.raises(DataError) as info:
        parse_feedback(rows(row(), row()), system())
    assert info.value.param == "line 2.id" and "line 1" in info.value.message


@pytest.mark.parametrize(
    ("change", "field"),
    [
        pytest.param(lambda s: s[2].pop("output"), "spans[2].output", id="span output missing"),
        pytest.param(lambda s: s[2].update(output="red"), "spans[2].output", id="other output"),
        pytest.param(lambda s: s[1].update(inputs=3), "spans[1].inputs", id="inputs a number"),
        pytest.param(lambda s: s[0].update(component="writer"), "spans[0].component", id="unknown"),
        pytest.param(lambda s: s.append(dict(s[0])), "spans[3].component", id="twice"),
        pytest.param(lambda s: s[1].update(kind="llm"), "spans[1].kind", id="kind"),
        pytest.param(lambda s: s[0].update(writes="answer"), "spans[0].writes", id="writes"),
        pytest.param(lambda s: s.pop(1), "spans", id="a component without a span"),
        pytest.param(lambda s: s.__setitem__(0, "query"), "spans[0]", id="not an object"),
    ],
)
def test_a_bad_span_names_its_index_and_field(tiny: SystemSpec, change: Any, field: str) -> None:
    spans = spans_of(tiny)
    line = eval_lines(tiny, ["quta"])[0]
    line["feedback"] = {"rating": "up", "corrected_output": "blue"}
    change(spans)
    line["spans"] = spans
    with pytest.raises(DataError) as info:
        parse_feedback(rows(line), tiny)
    assert info.value.param == f"line 1.{field}"


def test_a_gold_metric_needs_a_corrected_output_on_every_row() -> None:
    with pytest.raises(DataError) as info:
        parse_feedback(
            rows(row(feedback={"rating": "down", "comment": "wrong"})), system("exact_match")
        )
    assert info.value.param == "line 1.feedback.corrected_output"
    assert "metric judge" in info.value.message
    # the same row needs none under metric judge, nor when checked without a system (upload)
    assert parse_feedback(rows(row(feedback={"rating": "down"})), system())
    assert parse_feedback(rows(row(feedback={"rating": "down"})), None)


def test_a_feedback_file_is_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "fb.csv"
    path.write_text("question,output\nq,a\n")
    with pytest.raises(DataError, match="JSONL"):
        load_feedback(path, system())


# -- fixed traces -----------------------------------------------------------------------------


def test_fixed_traces_keep_given_spans_and_reconstruct_missing_ones(tiny: SystemSpec) -> None:
    given, bare = eval_lines(tiny, ["quta", "ferosa"])
    given["feedback"] = {"rating": "up", "corrected_output": given["output"]}
    given["spans"][0]["messages"] = [{"role": "user", "content": "a prompt from elsewhere"}]
    bare = {
        "id": "b",
        "inputs": bare["inputs"],
        "output": "rated answer",
        "feedback": {"rating": 0.0, "comment": "no", "corrected_output": FACTS["ferosa"]},
    }
    engine = ScriptedEngine()
    runtime = Runtime(tiny, {"tiny": engine}, ToolContext.for_system(tiny))
    with_spans, rebuilt = fixed_traces(parse_feedback(rows(given, bare), tiny), tiny, runtime)

    assert with_spans.output == given["output"] and with_spans.score == 1.0
    assert with_spans.passed and with_spans.feedback is not None
    assert not any(s.reconstructed for s in with_spans.spans)
    # an llm span's prompt is the job's, rendered from the trace's own fields
    query = with_spans.span("query")
    assert query.messages is not None
    assert query.messages[-1]["content"] == "Write a search query for: what is the color of quta?"

    assert rebuilt.output == "rated answer" and rebuilt.score == 0.0 and not rebuilt.passed
    assert rebuilt.expected == [FACTS["ferosa"]]
    assert [s.reconstructed for s in rebuilt.spans] == [True, True, False]
    answer = rebuilt.span("answer")
    assert answer.output == "rated answer" and answer.replaced
    assert [c.keys for c in engine.calls] == [["ferosa"], ["ferosa"]]  # the bare row, once
