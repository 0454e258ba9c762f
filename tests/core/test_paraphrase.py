"""Paraphrased task inputs (``cotune/paraphrase.py``): which rewrites are kept, what the judge
is shown, the budget cap and a judge that is down."""

from __future__ import annotations

import json
from typing import Any

import pytest

from cotune.data import Example
from cotune.engines.base import EngineStats, GenerationRequest, GenerationResult
from cotune.errors import EngineError
from cotune.paraphrase import drop_reason, paraphrase_examples
from cotune.spec import SystemSpec, parse_system


@pytest.fixture
def system() -> SystemSpec:
    return parse_system(
        {
            "name": "counter",
            "description": "counts the things a question lists",
            "inputs": ["question", "meta"],
            "output": "answer",
            "models": {"m": {"path": "."}},
            "metric": "exact_match",
            "components": [
                {
                    "name": "answer",
                    "kind": "llm",
                    "model": "m",
                    "prompt": "{question}",
                    "reads": ["question"],
                    "writes": "answer",
                }
            ],
        }
    )


QUESTION = "I have two flutes, a piano and 3 drums. How many instruments do I have?"
EXAMPLE = Example(id="q1", inputs={"question": QUESTION, "meta": {"n": 1}}, expected=["6"])


@pytest.mark.parametrize(
    ("rewrite", "reason"),
    [
        ("Two flutes, a piano and 3 drums are mine. How many instruments?", None),
        ("I own 2 flutes, a piano and three drums. How many instruments?", None),  # same values
        ("I own four flutes, a piano and 3 drums. How many instruments?", "its numbers changed"),
        ("I own two flutes, two pianos and 3 drums. How many instruments?", "its numbers changed"),
        ("I own two flutes, a piano, 3 drums and 6 instruments in all. How many?", "its numbers"),
        ("I have two flutes, a piano and 3 drums.   How many instruments do I have?", "unchanged"),
        ("   ", "a field came back empty"),
        (QUESTION.replace("3 drums", "3kg of drums"), None),  # 3 is still 3
        (QUESTION.replace("3 drums", "4kg of drums"), "its numbers changed"),  # in a word too
        (QUESTION.replace("two flutes", "thirty flutes"), "its numbers changed"),
        (QUESTION.replace("?", "?,").upper(), "unchanged"),  # a copy, but for case and commas
        ("Two and 3: kapezu tasano lotape black brown pink?", "it keeps too few"),
    ],
)
def test_a_rewrite_keeps_its_numbers_and_says_something_new(
    system: SystemSpec, rewrite: str, reason: str | None
) -> None:
    got = drop_reason(system, EXAMPLE, {"question": rewrite})
    assert got == reason or (reason is not None and got is not None and got.startswith(reason))


def test_ordinals_and_digits_inside_words_are_numbers_by_value(system: SystemSpec) -> None:
    race = Example(id="r", inputs={"question": "Who came 3rd of the forty runners?"})
    kept = {"question": "Of the forty runners, who finished third?"}
    assert drop_reason(system, race, kept) is None
    moved = {"question": "Of the forty runners, who finished fourth?"}
    assert drop_reason(system, race, moved) == "its numbers changed"


def test_a_rewrite_may_not_show_a_gold_answer_the_original_hides(system: SystemSpec) -> None:
    colour = Example(id="c", inputs={"question": "What colour is the zorp?"}, expected=["teal"])
    leaky = {"question": "The zorp, which is teal: what colour is it?"}
    assert drop_reason(system, colour, leaky) == "it shows a gold answer the original does not"
    shown = Example(id="s", inputs={"question": "Is the zorp teal or red?"}, expected=["teal"])
    assert drop_reason(system, shown, {"question": "Is the zorp red or teal?"}) is None


class Scripted:
    """A judge engine answering each paraphrase request with ``replies`` in turn."""

    kind = "vllm"
    model_id = "scripted"

    def __init__(self, replies: list[str] | EngineError) -> None:
        self.replies = replies
        self.stats = EngineStats()
        self.requests: list[GenerationRequest] = []

    def supports_json_schema(self) -> bool:
        return True

    def generate(self, requests: list[GenerationRequest], adapter: Any = None) -> list[Any]:
        self.requests.extend(requests)
        if isinstance(self.replies, EngineError):
            raise self.replies
        return [
            GenerationResult(text=r, prompt_tokens=20, completion_tokens=5)
            for r in self.replies[: len(requests)]
        ]


def test_the_judge_sees_the_text_inputs_never_the_gold_and_the_kept_keep_it(
    system: SystemSpec,
) -> None:
    kept = json.dumps({"question": "Three drums, a piano and two flutes: how many instruments?"})
    engine = Scripted([kept, "not json", json.dumps({"question": QUESTION})])
    out = paraphrase_examples(
        engine, system, [EXAMPLE], n=3, max_tokens=64, temperature=0.8, seed=5
    )
    assert out.calls == 3 and [r.seed for r in engine.requests] == [5, 6, 7]
    for request in engine.requests:
        shown = json.dumps(request.messages)
        assert "flutes" in shown and "6" not in shown.replace(QUESTION, "")
        assert request.json_schema is not None
        assert list(request.json_schema["properties"]) == ["question"]  # text inputs only
    [example] = out.examples
    assert example.id == "q1~p0" and example.expected == ["6"]
    assert example.inputs == {"question": json.loads(kept)["question"], "meta": {"n": 1}}
    assert out.dropped == {"unreadable": 1, "unchanged": 1}


def test_the_budget_caps_the_requests_and_a_judge_that_is_down_drops_them(
    system: SystemSpec,
) -> None:
    engine = Scripted([json.dumps({"question": "x"})] * 4)
    out = paraphrase_examples(
        engine, system, [EXAMPLE], n=4, max_tokens=64, temperature=0.8, seed=0, max_calls=2
    )
    assert len(engine.requests) == 2 and out.calls == 2
    assert out.dropped["not asked: over the judge budget"] == 2
    assert (
        paraphrase_examples(
            engine, system, [EXAMPLE], n=4, max_tokens=64, temperature=0.8, seed=0, max_calls=0
        ).calls
        == 0
    )
    down = Scripted(EngineError("HTTP 503"))
    out = paraphrase_examples(down, system, [EXAMPLE], n=2, max_tokens=64, temperature=0.8, seed=0)
    assert out.examples == [] and out.calls == 2
    assert list(out.dropped.values()) == [2] and "HTTP 503" in next(iter(out.dropped))


def test_the_real_engine_decodes_paraphrases_under_their_schema(
    system: SystemSpec, vllm_engine: Any
) -> None:
    """The tiny model writes garbage, but under the schema every reply is a JSON object with
    the text fields: each is kept or dropped by a stated reason, none is unreadable."""
    examples = [
        EXAMPLE,
        Example(id="q2", inputs={"question": "What colour is the zorp?"}, expected=["teal"]),
    ]
    out = paraphrase_examples(
        vllm_engine, system, examples, n=2, max_tokens=48, temperature=0.8, seed=0
    )
    assert out.calls == 4 and len(out.examples) + sum(out.dropped.values()) == 4
    assert vllm_engine.supports_json_schema() and "unreadable" not in out.dropped, out.dropped
    for example in out.examples:
        assert example.id.split("~p")[0] in {"q1", "q2"} and example.expected in (["6"], ["teal"])


def test_copies_taken_ids_and_long_inputs_are_dropped_and_counted(system: SystemSpec) -> None:
    rewrite = json.dumps({"question": "Two flutes, a piano, 3 drums: how many instruments?"})
    engine = Scripted([rewrite, rewrite.replace(",", ";"), rewrite])
    long = Example(id="long", inputs={"question": "word " * 100}, expected=["x"])
    out = paraphrase_examples(
        engine,
        system,
        [EXAMPLE, long],
        n=3,
        max_tokens=64,  # 3 x 64 = 192 characters at most: the long one (500) is not asked
        temperature=0.8,
        seed=0,
        taken={"q1~p2"},
    )
    assert len(engine.requests) == 3 and [e.id for e in out.examples] == ["q1~p0"]
    assert out.dropped == {
        "a duplicate": 1,  # the same words as q1~p0, but for punctuation
        "its id is another example's": 1,
        "not asked: longer than max_tokens can rewrite": 3,
    }
