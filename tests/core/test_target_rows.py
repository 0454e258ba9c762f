"""``train.rows: targets``: teacher-forced SFT rows from each train row's ideal values (the
quality benchmark's oracle), on the tiny world's data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cotune.data import Example, load_examples, parse_examples
from cotune.errors import SpecError
from cotune.prompts import render_messages
from cotune.spec import load_system
from cotune.spec.job import parse_job
from cotune.synthesis import target_rows
from cotune.tiny import make_world, write_tiny_example


def with_targets(folder: Path) -> list[Example]:
    """The tiny train rows, each with its ideal query and the one fact it needs retrieved."""
    world = make_world()
    fact = dict(zip(world.facts, (row["text"] for row in world.corpus), strict=True))
    rows = [json.loads(line) for line in (folder / "train.jsonl").read_text().splitlines()]
    for row in rows:
        key = key_of(row["question"])
        row["targets"] = {"query": world.query(key), "passages": [fact[key]]}
    system = load_system(folder / "system.yaml")
    return parse_examples(enumerate(rows, start=1), system)


def key_of(question: str) -> str:
    return question.removeprefix("what is the color of ").rstrip("?")


def test_each_component_learns_its_ideal_output_from_ideal_inputs(tmp_path: Path) -> None:
    folder = write_tiny_example(tmp_path, splits=(6, 2, 2))
    system = load_system(folder / "system.yaml")
    examples = with_targets(folder)
    world = make_world()
    buffer = target_rows(system, examples)
    assert {c: n.samples for c, n in buffer.counts().items()} == {"query": 6, "answer": 6}
    for example, query, answer in zip(
        examples, buffer.sft["query"], buffer.sft["answer"], strict=True
    ):
        key = key_of(example.inputs["question"])
        assert query.completion == world.query(key) and query.source == "target"
        # the writer's prompt holds the ideal passage, never a real upstream output
        fact = f"the color of {key} is {world.facts[key]}."
        values = {"question": example.inputs["question"], "passages": [fact]}
        assert answer.messages == render_messages(system.component("answer"), values)
        assert example.expected and answer.completion == example.expected[0] == world.facts[key]


def test_a_component_reading_a_field_without_an_ideal_value_gets_no_row(tmp_path: Path) -> None:
    folder = write_tiny_example(tmp_path, splits=(4, 2, 2))  # rows without targets
    system = load_system(folder / "system.yaml")
    examples = load_examples(folder / "train.jsonl", system)
    assert target_rows(system, examples).counts() == {}  # no ideal query, no ideal passages
    examples[0].targets = {"query": "color of x"}
    assert {c: n.samples for c, n in target_rows(system, examples).counts().items()} == {"query": 1}


def test_the_setting_is_checked(tmp_path: Path) -> None:
    folder = write_tiny_example(tmp_path, splits=(4, 2, 2))
    job = {"system": "system.yaml", "data": {"train": "train.jsonl", "val": "val.jsonl"}}
    assert parse_job({**job, "train": {"rows": "targets"}}, folder).train.rows == "targets"
    with pytest.raises(SpecError, match=r"train\.rows") as refused:
        parse_job({**job, "train": {"rows": "ideal"}}, folder)
    assert refused.value.param == "train.rows"
