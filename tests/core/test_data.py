import copy
import io
import json
from pathlib import Path
from typing import Any

import pytest

from cotune.data import Example, iter_jsonl, load_corpus, load_examples, parse_examples
from cotune.errors import DataError
from cotune.spec import SystemSpec, parse_system
from cotune.tiny import TINY_SYSTEM


def system(metric: str = "exact_match", inputs: list[str] | None = None) -> SystemSpec:
    data = copy.deepcopy(TINY_SYSTEM)
    data["metric"] = metric
    if metric == "judge":
        data["rubric"] = "names the colour asked about"
    if inputs:
        data["inputs"] = inputs
        data["components"][0]["reads"] = inputs
        data["components"][0]["prompt"] = " ".join(f"{{{f}}}" for f in inputs)
    return parse_system(data)


def jsonl(tmp_path: Path, *rows: Any, name: str = "train.jsonl") -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def refused(path: Path, sys: SystemSpec | None = None, **kwargs: Any) -> DataError:
    with pytest.raises(DataError) as info:
        load_examples(path, sys or system(), **kwargs)
    assert str(path) in str(info.value)
    return info.value


# -- good files -------------------------------------------------------------------------------


def test_load_jsonl_examples(tmp_path: Path) -> None:
    path = jsonl(
        tmp_path,
        {"id": "q1", "question": "what is x?", "expected": "417", "note": "ignored"},
        "",
        {"question": "what is y?", "expected": ["12", "twelve"]},
    )
    examples = load_examples(path, system(), split="val")
    assert examples == [
        Example(id="q1", inputs={"question": "what is x?"}, expected=["417"]),
        Example(id="val-3", inputs={"question": "what is y?"}, expected=["12", "twelve"]),
    ]


def test_load_csv_examples(tmp_path: Path) -> None:
    path = tmp_path / "train.csv"
    path.write_text(
        'id,question,expected\nq1,"what is x, really?",417\n\n,what is y?,12\n', encoding="utf-8"
    )
    examples = load_examples(path, system())
    assert [e.id for e in examples] == ["q1", "train-4"]
    assert examples[0].inputs == {"question": "what is x, really?"}
    assert examples[1].expected == ["12"]


def test_judge_metric_needs_no_expected(tmp_path: Path) -> None:
    path = jsonl(tmp_path, {"question": "q?"})
    assert load_examples(path, system(metric="judge"))[0].expected is None


def test_integer_ids_become_strings(tmp_path: Path) -> None:
    path = jsonl(tmp_path, {"id": 7, "question": "q?", "expected": "a"})
    assert load_examples(path, system())[0].id == "7"


def test_parse_examples_checks_uploads_from_memory() -> None:
    upload = io.BytesIO(b'{"question": "q?", "expected": "a"}\n{"question": "r?"}\n')
    with pytest.raises(DataError) as info:
        parse_examples(iter_jsonl(upload, "upload.jsonl"), system(), source="upload.jsonl")
    assert (info.value.path, info.value.line, info.value.field) == ("upload.jsonl", 2, "expected")


# -- bad files --------------------------------------------------------------------------------


def test_missing_input_field_names_line_and_field(tmp_path: Path) -> None:
    path = jsonl(tmp_path, {"question": "a", "expected": "1"}, {"questoin": "b", "expected": "2"})
    err = refused(path)
    assert (err.line, err.field) == (2, "question")
    assert "line 2" in str(err) and "'question'" in str(err)


def test_null_input_counts_as_missing(tmp_path: Path) -> None:
    err = refused(jsonl(tmp_path, {"question": None, "expected": "1"}))
    assert (err.line, err.field) == (1, "question")


def test_second_input_field_missing(tmp_path: Path) -> None:
    path = jsonl(
        tmp_path,
        {"question": "a", "context": "c", "expected": "1"},
        {"question": "b", "expected": "2"},
    )
    err = refused(path, system(inputs=["question", "context"]))
    assert (err.line, err.field) == (2, "context")


def test_missing_expected_when_metric_needs_it(tmp_path: Path) -> None:
    err = refused(jsonl(tmp_path, {"question": "a"}), system(metric="f1"))
    assert (err.line, err.field) == (1, "expected")
    assert "metric 'f1'" in str(err)


@pytest.mark.parametrize("bad", [417, ["a", 1], [], {"a": 1}, True])
def test_expected_of_the_wrong_type(tmp_path: Path, bad: Any) -> None:
    err = refused(jsonl(tmp_path, {"question": "a", "expected": bad}))
    assert (err.line, err.field) == (1, "expected")
    assert "string or a non-empty list of strings" in str(err)


def test_duplicate_ids(tmp_path: Path) -> None:
    path = jsonl(
        tmp_path,
        {"id": "x", "question": "a", "expected": "1"},
        {"id": "y", "question": "b", "expected": "2"},
        {"id": "x", "question": "c", "expected": "3"},
    )
    err = refused(path)
    assert (err.line, err.field) == (3, "id")
    assert "also used on line 1" in str(err)


@pytest.mark.parametrize("bad_id", ["", ["x"], 1.5, False])
def test_bad_id(tmp_path: Path, bad_id: Any) -> None:
    err = refused(jsonl(tmp_path, {"id": bad_id, "question": "a", "expected": "1"}))
    assert (err.line, err.field) == (1, "id")


def test_invalid_json_names_the_line(tmp_path: Path) -> None:
    path = jsonl(tmp_path, {"question": "a", "expected": "1"}, '{"question": "b", ')
    err = refused(path)
    assert err.line == 2 and "not valid JSON" in str(err)


def test_non_object_row(tmp_path: Path) -> None:
    err = refused(jsonl(tmp_path, '["question", "a"]'))
    assert err.line == 1 and "expected a JSON object, got list" in str(err)


def test_invalid_utf8_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_bytes(
        b'{"question": "a", "expected": "1"}\n{"question": "b\xff", "expected": "2"}\n'
    )
    err = refused(path)
    assert err.line == 2 and "UTF-8" in str(err)


def test_invalid_utf8_in_csv_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "train.csv"
    path.write_bytes(b"question,expected\na,1\nb\xfe,2\n")
    err = refused(path)
    assert err.line == 3 and "UTF-8" in str(err)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file(tmp_path: Path, content: str) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text(content)
    assert "no rows" in str(refused(path))


def test_csv_with_only_a_header_is_empty(tmp_path: Path) -> None:
    path = tmp_path / "train.csv"
    path.write_text("question,expected\n")
    assert "no rows" in str(refused(path))


def test_csv_row_with_too_many_cells(tmp_path: Path) -> None:
    path = tmp_path / "train.csv"
    path.write_text("question,expected\na,1\nb,2,oops\n")
    err = refused(path)
    assert err.line == 3 and "3 cells" in str(err)


def test_csv_missing_input_cell(tmp_path: Path) -> None:
    path = tmp_path / "train.csv"
    path.write_text("question,expected\n,1\n")
    err = refused(path)
    assert (err.line, err.field) == (2, "question")


def test_unsupported_suffix_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "train.txt"
    path.write_text("question\n")
    assert "unsupported file type '.txt'" in str(refused(path))
    assert "cannot open" in str(refused(tmp_path / "absent.jsonl"))


# -- corpora ----------------------------------------------------------------------------------


def test_load_corpus(tmp_path: Path) -> None:
    path = jsonl(
        tmp_path,
        {"id": "d1", "text": "t1", "title": "T", "extra": 1},
        "",
        {"id": "d2", "text": "t2", "title": None},
        name="kb.jsonl",
    )
    assert load_corpus(path) == [
        {"id": "d1", "text": "t1", "title": "T"},
        {"id": "d2", "text": "t2"},
    ]


@pytest.mark.parametrize(
    ("row", "field", "what"),
    [
        ({"text": "t"}, "id", "missing"),
        ({"id": 3, "text": "t"}, "id", "not a string"),
        ({"id": "d"}, "text", "missing"),
        ({"id": "d", "text": ["t"]}, "text", "not a string"),
        ({"id": "d", "text": "t", "title": 5}, "title", "not a string"),
    ],
)
def test_bad_corpus_rows(tmp_path: Path, row: dict[str, Any], field: str, what: str) -> None:
    path = jsonl(tmp_path, {"id": "ok", "text": "fine"}, row, name="kb.jsonl")
    with pytest.raises(DataError, match=f"kb.jsonl, line 2: field '{field}' is {what}") as info:
        load_corpus(path)
    assert (info.value.line, info.value.field) == (2, field)


def test_corpus_duplicate_ids(tmp_path: Path) -> None:
    path = jsonl(tmp_path, {"id": "d", "text": "a"}, {"id": "d", "text": "b"}, name="kb.jsonl")
    with pytest.raises(DataError, match="line 2: id 'd' is also used on line 1") as info:
        load_corpus(path)
    assert info.value.field == "id"


def test_corpus_empty_or_not_jsonl(tmp_path: Path) -> None:
    (tmp_path / "kb.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no rows"):
        load_corpus(tmp_path / "kb.jsonl")
    (tmp_path / "kb.csv").write_text("id,text\nd,t\n")
    with pytest.raises(DataError, match=r"kb.csv: a corpus must be a \.jsonl file"):
        load_corpus(tmp_path / "kb.csv")


def test_targets_are_ideal_values_of_written_fields(tmp_path: Path) -> None:
    ideal = {"query": "color of zorpa", "passages": ["the color of zorpa is teal."]}
    path = jsonl(tmp_path, {"question": "q?", "expected": "teal", "targets": ideal})
    assert load_examples(path, system())[0].targets == ideal
    for bad in ({"question": "an input, not a written field"}, {"nope": "x"}, ["query"]):
        path = jsonl(tmp_path, {"question": "q?", "expected": "teal", "targets": bad})
        error = refused(path)
        assert error.field == "targets" and error.line == 1
