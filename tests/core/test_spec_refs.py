"""``cotune.spec.refs``: the one walker of the files a job spec names, on raw mappings."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from cotune.spec import (
    FILE_ID,
    SPLITS,
    FileRef,
    file_refs,
    is_file_id,
    load_job,
    map_refs,
    parse_job,
)
from cotune.spec.refs import FEEDBACK
from cotune.tiny import TINY_SYSTEM, write_tiny_example


def every_kind() -> dict[str, Any]:
    """A job naming every kind of file: three splits, two corpora (one component unnamed),
    a model by path; and things that are not files (a model by name, a URL, a function)."""
    system = copy.deepcopy(TINY_SYSTEM)
    system["models"]["local"] = {"path": "models/tiny"}
    system["components"].extend(
        [
            {
                "kind": "tool",
                "tool": "bm25",
                "reads": ["query"],
                "writes": "more",
                "args": {"corpus": "file-abc123", "k": 2},
            },
            {
                "name": "web",
                "kind": "tool",
                "tool": "http_search",
                "reads": ["query"],
                "writes": "hits",
                "args": {"url": "https://search.example/q"},
            },
            {
                "name": "count",
                "kind": "tool",
                "tool": "python",
                "reads": ["passages"],
                "writes": "n",
                "args": {"function": "count_lines"},
            },
        ]
    )
    return {
        "system": system,
        "data": {"train": "train.jsonl", "val": "file-v", "test": "../test.csv"},
        "loop": {"epochs": 1},
    }


def test_every_kind_of_reference_is_found_with_its_param_purpose_and_owner() -> None:
    refs = file_refs(every_kind())
    assert refs == [
        FileRef("data.train", "data", "train", "train.jsonl"),
        FileRef("data.val", "data", "val", "file-v"),
        FileRef("data.test", "data", "test", "../test.csv"),
        FileRef("system.components.search.args.corpus", "corpus", "search", "corpus.jsonl"),
        FileRef("system.components.3.args.corpus", "corpus", "3", "file-abc123"),
        FileRef("system.models.local.path", "model", "local", "models/tiny"),
    ]


def test_an_unset_test_split_and_a_model_by_name_are_no_references() -> None:
    spec = every_kind()
    spec["data"]["test"] = None
    del spec["system"]["models"]["local"]
    params = [ref.param for ref in file_refs(spec)]
    assert params == [
        "data.train",
        "data.val",
        "system.components.search.args.corpus",
        "system.components.3.args.corpus",
    ]


def test_map_refs_rewrites_a_raw_mapping_and_leaves_the_input_untouched() -> None:
    spec = every_kind()
    before = json.dumps(spec, sort_keys=True)
    seen: list[str] = []

    def rewrite(ref: FileRef) -> str:
        seen.append(ref.param)
        return f"{ref.purpose}:{ref.value}"

    out = map_refs(spec, rewrite)
    assert json.dumps(spec, sort_keys=True) == before
    assert seen == [ref.param for ref in file_refs(spec)]
    assert out["data"] == {
        "train": "data:train.jsonl",
        "val": "data:file-v",
        "test": "data:../test.csv",
    }
    components = {c.get("name"): c for c in out["system"]["components"]}
    assert components["search"]["args"] == {"corpus": "corpus:corpus.jsonl", "k": 3}
    assert components[None]["args"] == {"corpus": "corpus:file-abc123", "k": 2}
    assert components["web"]["args"] == {"url": "https://search.example/q"}
    assert out["system"]["models"] == {
        "tiny": {"name": "tiny"},
        "local": {"path": "model:models/tiny"},
    }
    assert out["loop"] == {"epochs": 1}
    # the rewritten values are what file_refs then finds
    assert [r.value for r in file_refs(out)] == [rewrite(r) for r in file_refs(spec)]


def test_a_refusal_raised_by_fn_leaves_the_input_untouched() -> None:
    spec = every_kind()
    before = copy.deepcopy(spec)

    def refuse_models(ref: FileRef) -> Any:
        if ref.purpose == "model":
            raise ValueError(f"{ref.param}: refused")
        return "changed"

    with pytest.raises(ValueError, match=r"system.models.local.path: refused"):
        map_refs(spec, refuse_models)
    assert spec == before


def test_relative_paths_made_absolute_parse_from_anywhere(tmp_path: Path) -> None:
    """What the workers' local_spec does: data relative to the job file, the corpus to the
    system file (another folder), made absolute so the job runs without its folders."""
    write_tiny_example(tmp_path / "system", splits=(4, 2, 2))
    (tmp_path / "job").mkdir()
    (tmp_path / "system" / "train.jsonl").rename(tmp_path / "job" / "train.jsonl")
    (tmp_path / "job" / "job.yaml").write_text(
        "system: ../system/system.yaml\ndata: {train: train.jsonl, val: ../system/val.jsonl}\n"
    )
    job = load_job(tmp_path / "job" / "job.yaml")
    spec = job.model_dump(mode="json", exclude_unset=True, by_alias=True)
    absolute = map_refs(spec, lambda ref: str(job.ref_path(ref).resolve()))
    moved = parse_job(absolute)  # no base_dir
    assert moved.data_path("train") == (tmp_path / "job" / "train.jsonl").resolve()
    assert moved.data_path("val") == (tmp_path / "system" / "val.jsonl").resolve()
    corpus = moved.system.component("search").args["corpus"]
    assert Path(corpus) == (tmp_path / "system" / "corpus.jsonl").resolve()
    assert all(Path(ref.value).is_file() for ref in file_refs(absolute))
    assert job.data_path("train") == job.ref_path(file_refs(spec)[0])


@pytest.mark.parametrize(
    ("spec", "params"),
    [
        ({}, []),
        ({"data": "train.jsonl", "system": "system.yaml"}, []),  # a system file is not read
        ({"data": None, "system": None}, []),
        ({"data": ["train.jsonl"], "system": ["x"]}, []),
        ({"data": {"train": {"nested": 1}, "extra": "x.jsonl"}}, ["data.train"]),
        ({"system": {"components": "search"}}, []),
        ({"system": {"components": [None, 3, "c", [], {"tool": "bm25"}]}}, []),
        ({"system": {"components": [{"tool": "bm25", "args": ["corpus.jsonl"]}]}}, []),
        ({"system": {"components": [{"tool": ["bm25"], "args": {"corpus": "c.jsonl"}}]}}, []),
        ({"system": {"components": [{"tool": "grep", "args": {"corpus": "c.jsonl"}}]}}, []),
        (
            {"system": {"components": [{"name": "", "tool": "bm25", "args": {"corpus": 1}}]}},
            ["system.components.0.args.corpus"],
        ),
        ({"system": {"models": ["tiny"]}}, []),
        ({"system": {"models": {"a": "tiny", "b": None, "c": {"path": None}}}}, []),
    ],
)
def test_odd_shapes_do_not_crash(spec: dict[str, Any], params: list[str]) -> None:
    before = copy.deepcopy(spec)
    assert [ref.param for ref in file_refs(spec)] == params
    out = map_refs(spec, lambda ref: "rewritten")
    assert spec == before
    assert [ref.value for ref in file_refs(out)] == ["rewritten"] * len(params)


def test_an_odd_value_is_given_as_found_and_an_int_alias_named() -> None:
    spec = {
        "data": {"train": 7, "val": {"nested": 1}},
        "system": {
            "models": {3: {"path": ["x"]}},
            "components": [{"tool": "bm25", "args": {"corpus": ""}}],
        },
    }
    assert file_refs(spec) == [
        FileRef("data.train", "data", "train", 7),
        FileRef("data.val", "data", "val", {"nested": 1}),
        FileRef("system.components.0.args.corpus", "corpus", "0", ""),
        FileRef("system.models.3.path", "model", "3", ["x"]),
    ]


def test_file_refs_of_something_not_a_mapping_is_empty() -> None:
    assert file_refs([]) == []  # type: ignore[arg-type]
    assert file_refs("job.yaml") == []  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("file-abc123", True),
        ("file-" + "a" * 59, True),
        ("file-" + "a" * 60, False),
        ("file-", False),
        ("file-ab_c", False),
        ("file-abc\n", False),
        ("train.jsonl", False),
        ("/srv/file-abc", False),
        (None, False),
        (123, False),
    ],
)
def test_is_file_id(value: Any, expected: bool) -> None:
    assert is_file_id(value) is expected
    assert (isinstance(value, str) and FILE_ID.fullmatch(value) is not None) is expected


def test_the_splits_are_the_job_specs_data_fields() -> None:
    from cotune.spec import DataSplits

    # every field but the splits' format names a file: the splits, then the rated runs
    assert tuple(f for f in DataSplits.model_fields if f != "format") == (*SPLITS, FEEDBACK)


def test_a_feedback_file_is_walked_with_purpose_feedback() -> None:
    spec = {"data": {"val": "file-b", "feedback": "fb.jsonl"}}
    assert [(r.param, r.purpose, r.owner) for r in file_refs(spec)] == [
        ("data.val", "data", "val"),
        ("data.feedback", "feedback", "feedback"),
    ]
    assert map_refs(spec, lambda r: f"<{r.purpose}>")["data"] == {
        "val": "<data>",
        "feedback": "<feedback>",
    }


def test_openai_format_splits_are_fine_tune_files() -> None:
    spec = {"data": {"train": "file-a", "val": "file-b", "format": "openai"}}
    assert [(r.param, r.purpose) for r in file_refs(spec)] == [
        ("data.train", "fine-tune"),
        ("data.val", "fine-tune"),
    ]
