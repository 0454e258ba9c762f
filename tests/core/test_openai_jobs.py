"""OpenAI's fine-tuning JSONL read as examples, its create body turned into a job spec, the
chat component, and the given training rows (``cotune/openai_jobs.py``)."""

from __future__ import annotations

from typing import Any

import pytest

from cotune.errors import DataError, SpecError
from cotune.openai_jobs import (
    COMPONENT,
    job_spec_from_request,
    read_openai_rows,
    row_examples,
)
from cotune.prompts import render_messages
from cotune.spec.job import parse_job
from cotune.synthesis import given_rows

CHAT = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "bye"},
        {"role": "assistant", "content": "ciao", "weight": 0},
        {"role": "user", "content": "again?"},
        {"role": "assistant", "content": "bye"},
    ]
}
PREFERENCE = {
    "input": {"messages": [{"role": "user", "content": "2+2?"}]},
    "preferred_output": [{"role": "assistant", "content": "4"}],
    "non_preferred_output": [{"role": "assistant", "content": "5"}],
}
BODY = {"model": "tiny", "training_file": "file-a", "validation_file": "file-b"}


def test_a_chat_row_is_an_example_per_weighted_assistant_turn() -> None:
    kind, examples = row_examples(3, CHAT, "train.jsonl")
    assert kind == "chat"
    assert [e.expected for e in examples] == [["hello"], ["bye"]]  # weight 0 is context only
    assert [len(e.inputs["messages"]) for e in examples] == [2, 6]
    assert examples[1].inputs["messages"][4] == {"role": "assistant", "content": "ciao"}
    assert len({e.id for e in examples}) == 2


def test_a_preference_row_is_one_example_with_a_rejected_output() -> None:
    kind, (example,) = row_examples(1, PREFERENCE, "prefs.jsonl")
    assert kind == "preference"
    assert example.expected == ["4"] and example.rejected == "5"


@pytest.mark.parametrize(
    ("row", "field"),
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "assistant", "content": "x"}]}, "messages.0"),
        ({"messages": [{"role": "user", "content": "q", "weight": 1}]}, "messages.0.weight"),
        (
            {"messages": [{"role": "user", "content": "q", "tool_calls": []}]},
            "messages.0.tool_calls",
        ),
        ({**CHAT, "tools": []}, "tools"),
        ({**PREFERENCE, "input": {"messages": [], "tools": []}}, "input.tools"),
        (
            {**PREFERENCE, "preferred_output": [{"role": "user", "content": "4"}]},
            "preferred_output.0.role",
        ),
        ({"prompt": "q", "completion": "a"}, "messages"),
    ],
)
def test_a_bad_row_names_its_line_and_field(row: dict[str, Any], field: str) -> None:
    with pytest.raises(DataError) as refused:
        row_examples(4, row, "f.jsonl")
    assert refused.value.param == f"line 4.{field}", str(refused.value)


def test_a_file_holds_one_kind_of_row() -> None:
    with pytest.raises(DataError) as refused:
        read_openai_rows([(1, CHAT), (2, PREFERENCE)], "mixed.jsonl")
    assert refused.value.param == "line 2.preferred_output"
    assert read_openai_rows([(1, CHAT), (2, CHAT)], "f").rows == 2


def test_a_supervised_body_is_the_one_component_chat_system() -> None:
    body = {
        **BODY,
        "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 3}}},
        "suffix": "v1",
        "seed": 4,
    }
    job = parse_job(job_spec_from_request(body).spec)
    assert job.system.name == "tiny-v1" and job.system.inputs == ["messages"]
    (component,) = job.system.components
    assert component.name == COMPONENT and component.chat
    assert job.data.format == "openai" and job.data.train == "file-a"
    assert (job.train.method, job.train.rows, job.train.epochs) == ("sft", "given", 3)
    assert (job.loop.epochs, job.loop.keep, job.loop.seed) == (1, "last", 4)


def test_dpo_hyperparameters_map_to_the_train_settings() -> None:
    hyper = {"beta": 0.3, "batch_size": 2, "learning_rate_multiplier": 0.5}
    body = {**BODY, "method": {"type": "dpo", "dpo": {"hyperparameters": hyper}}}
    train = parse_job(job_spec_from_request(body).spec).train
    assert (train.method, train.dpo_beta, train.batch_size) == ("sft+dpo", 0.3, 2)
    assert train.learning_rate == pytest.approx(5e-5)


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"validation_file": None}, "validation_file"),
        ({"method": {"type": "supervised", "dpo": {}}}, "method.dpo"),
        (
            {
                "hyperparameters": {},
                "method": {"type": "supervised", "supervised": {"hyperparameters": {}}},
            },
            "hyperparameters",
        ),
        ({"hyperparameters": {"batch_size": 0}}, "hyperparameters.batch_size"),
        ({"metadata": {"team": "a"}}, "metadata"),
        ({"seed": -1}, "seed"),
    ],
)
def test_a_bad_body_names_the_body_field(change: dict[str, Any], param: str) -> None:
    with pytest.raises(SpecError) as refused:
        job_spec_from_request({**BODY, **change})
    assert refused.value.param == param, refused.value.message


def test_a_spec_body_passes_through_and_openai_fields_fill_it() -> None:
    spec = {"system": {"name": "s"}, "data": {"test": "file-c"}}
    assert job_spec_from_request(spec).spec == spec
    built = job_spec_from_request({**spec, "training_file": "file-a", "seed": 2}).spec
    assert built["data"] == {"test": "file-c", "train": "file-a"} and built["loop"] == {"seed": 2}
    with pytest.raises(SpecError) as refused:
        job_spec_from_request({**spec, "data": {"train": "file-z"}, "training_file": "file-a"})
    assert refused.value.param == "training_file"


def test_a_chat_component_sends_its_conversation_and_takes_no_template() -> None:
    spec = job_spec_from_request(BODY).spec
    job = parse_job(spec)
    messages = [{"role": "user", "content": "hi"}]
    assert render_messages(job.system.components[0], {"messages": messages}) == messages
    component = spec["system"]["components"][0]
    for extra, field in [({"prompt": "{messages}"}, "prompt"), ({"reads": ["a", "b"]}, "reads")]:
        bad = {**spec, "system": {**spec["system"], "components": [{**component, **extra}]}}
        with pytest.raises(SpecError) as refused:
            parse_job(bad)
        assert refused.value.param == f"system.components.{COMPONENT}.{field}"


def test_given_rows_are_the_sft_rows_and_the_dpo_pairs() -> None:
    job = parse_job(job_spec_from_request({**BODY, "method": {"type": "dpo"}}).spec)
    _, chat = row_examples(1, CHAT, "f")
    _, preference = row_examples(2, PREFERENCE, "f")
    buffer = given_rows(job.system, chat + preference)
    sft, pairs = buffer.sft[COMPONENT], buffer.dpo[COMPONENT]
    assert [r.completion for r in sft] == ["hello", "bye", "4"]
    assert sft[0].messages == CHAT["messages"][:2] and {r.source for r in sft} == {"given"}
    assert [(p.chosen, p.rejected) for p in pairs] == [("4", "5")]


def test_given_rows_need_a_one_component_system() -> None:
    spec = job_spec_from_request(BODY).spec
    spec["system"]["components"].append(
        {**spec["system"]["components"][0], "name": "second", "writes": "other"}
    )
    with pytest.raises(SpecError) as refused:
        parse_job(spec)
    assert refused.value.param == "train.rows"
