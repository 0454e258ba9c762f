"""The judge: prompts, schema, parsing, repair, merging and the batched calls.

Most tests drive ``judge_traces`` with ``ScriptedJudgeEngine``, a test double that returns
canned replies; the last one runs the real tiny model on vLLM under the verdict schema.
"""

from __future__ import annotations

import json
import string
from collections.abc import Sequence
from typing import Any

import pytest

from cotune.engines.base import EngineStats, GenerationRequest, GenerationResult
from cotune.errors import EngineError
from cotune.judge import (
    BUDGET_EXHAUSTED,
    ComponentCritique,
    JudgeOutcome,
    JudgeParseError,
    JudgeVerdict,
    judge_messages,
    judge_traces,
    parse_verdict,
    repair_messages,
    system_card,
    verdict_schema,
)
from cotune.judge.prompt import LOOP_UNIT, repetition_unit
from cotune.judge.schema import CRITIQUE_FIELDS
from cotune.judge.score import judge_scores
from cotune.runtime import Span, Trace
from cotune.spec import SystemSpec, parse_system

SYSTEM: dict[str, Any] = {
    "name": "kb-qa",
    "description": "Answer questions from a small knowledge base.",
    "inputs": ["question"],
    "output": "answer",
    "models": {"small": {"name": "tiny-llm"}},
    "components": [
        {
            "name": "query",
            "kind": "llm",
            "model": "small",
            "reads": ["question"],
            "writes": "query",
            "prompt": "Write a search query for: {question}",
        },
        {
            "name": "search",
            "kind": "tool",
            "tool": "bm25",
            "reads": ["query"],
            "writes": "passages",
            "args": {"corpus": "c.jsonl"},
        },
        {
            "name": "answer",
            "kind": "llm",
            "model": "small",
            "reads": ["question", "passages"],
            "writes": "answer",
            "prompt": "Passages:\n{passages}\nAnswer briefly: {question}",
            "trainable": False,
        },
    ],
    "metric": "exact_match",
}


class ScriptedJudgeEngine:
    """Test double for an inference engine: returns canned replies in order, records requests.

    Each ``generate`` call takes the next ``len(requests)`` replies from ``replies`` (an
    exception among them is raised instead, a ``GenerationResult`` returned as it is); every
    batch of requests it was given is kept in ``calls``.
    """

    kind = "vllm"
    model_id = "scripted-judge"

    def __init__(
        self, replies: Sequence[str | GenerationResult | Exception], *, json_schema: bool = True
    ) -> None:
        self.replies = list(replies)
        self.calls: list[list[GenerationRequest]] = []
        self.stats = EngineStats()
        self._json_schema = json_schema

    def supports_json_schema(self) -> bool:
        return self._json_schema

    def generate(
        self, requests: list[GenerationRequest], adapter: str | None = None
    ) -> list[GenerationResult]:
        assert adapter is None
        self.calls.append(list(requests))
        assert len(self.replies) >= len(requests), "the script ran out of replies"
        texts, self.replies = self.replies[: len(requests)], self.replies[len(requests) :]
        for text in texts:
            if isinstance(text, Exception):
                raise text
        results = [
            t
            if isinstance(t, GenerationResult)
            else GenerationResult(text=str(t), prompt_tokens=10, completion_tokens=5)
            for t in texts
        ]
        self.stats.add(results, 0.0)
        return results

    @property
    def requests(self) -> list[GenerationRequest]:
        return [r for call in self.calls for r in call]


@pytest.fixture(scope="module")
def system() -> SystemSpec:
    return parse_system(SYSTEM)


def make_trace(
    trace_id: str = "t1",
    *,
    question: str = "what is the color of zorpa?",
    query: str = "color of zorpa",
    passages: list[str] | None = None,
    answer: str = "blue",
    expected: list[str] | None = None,
) -> Trace:
    passages = passages or ["the color of zorpa is teal.", "the color of kalo is blue."]
    expected = ["teal"] if expected is None else expected
    spans = [
        Span(
            span_id="query",
            component="query",
            kind="llm",
            writes="query",
            inputs={"question": question},
            output=query,
        ),
        Span(
            span_id="search",
            component="search",
            kind="tool",
            writes="passages",
            inputs={"query": query},
            output=passages,
        ),
        Span(
            span_id="answer",
            component="answer",
            kind="llm",
            writes="answer",
            inputs={"question": question, "passages": passages},
            output=answer,
        ),
    ]
    score = 1.0 if answer in expected else 0.0
    return Trace(
        trace_id=trace_id,
        example_id=f"ex-{trace_id}",
        inputs={"question": question},
        expected=expected,
        spans=spans,
        output=answer,
        score=score,
        passed=score == 1.0,
    )


def critique(span_id: str, **overrides: Any) -> dict[str, Any]:
    item: dict[str, Any] = {
        "span_id": span_id,
        "component": span_id,
        "error_type": "wrong_content",
        "critique": f"{span_id} went wrong",
        "should_have_output": None,
        "blame": 0.5,
        "confidence": 0.8,
    }
    item.update(overrides)
    return item


def verdict_json(
    decisive: str | None = "answer", components: list[dict[str, Any]] | None = None
) -> str:
    if components is None:
        components = [critique("answer", blame=0.9, should_have_output="teal")]
    return json.dumps(
        {
            "system_correct": False,
            "failure_summary": "the answer ignored the first passage",
            "components": components,
            "decisive_span_id": decisive,
        }
    )


def judge(
    engine: ScriptedJudgeEngine, system: SystemSpec, traces: list[Trace], **kw: Any
) -> list[JudgeOutcome]:
    options: dict[str, Any] = dict(samples=1, temperature=0.7, max_tokens=256, seed=5)
    options.update(kw)
    return judge_traces(engine, system, traces, **options)


# -- parsing ----------------------------------------------------------------------------------


def test_valid_json_is_parsed(system: SystemSpec) -> None:
    trace = make_trace()
    engine = ScriptedJudgeEngine([verdict_json()])
    [outcome] = judge(engine, system, [trace])
    assert outcome.failures == [] and outcome.calls == 1 and len(engine.calls) == 1
    [verdict] = outcome.verdicts
    assert verdict.system_correct is False and verdict.decisive_span_id == "answer"
    assert verdict.components == [
        ComponentCritique(
            span_id="answer",
            component="answer",
            blame=0.9,
            error_type="wrong_content",
            critique="answer went wrong",
            should_have_output="teal",
            confidence=0.8,
        )
    ]
    [request] = engine.requests
    assert request.temperature == 0.0 and request.seed == 5 and request.max_tokens == 256
    assert request.json_schema == verdict_schema(system, trace)
    assert outcome.raw == [verdict_json()]


def test_json_in_a_fence_with_prose_is_parsed(system: SystemSpec) -> None:
    text = f"Here is my verdict:\n```json\n{verdict_json()}\n```\nHope this helps {{!}}"
    verdict = parse_verdict(text, system, make_trace())
    assert verdict.decisive_span_id == "answer"
    bare = f"Sure. {verdict_json()} That is all."
    assert parse_verdict(bare, system, make_trace()) == verdict


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "invalid JSON"),
        ("no json here", "invalid JSON"),
        ('{"system_correct": false, "failure', "invalid JSON"),
        ("[1, 2]", "invalid JSON"),
        ('{"system_correct": "maybe"}', "schema mismatch"),
        (verdict_json(components=[critique("answer", blame=1.5)]), "schema mismatch"),
        (verdict_json(components=[critique("answer", error_type="typo")]), "schema mismatch"),
        (verdict_json(components=[critique("rerank")]), "unknown span_id 'rerank'"),
        (verdict_json(decisive="rerank"), "unknown decisive_span_id 'rerank'"),
        (verdict_json(components=[critique("answer", component="query")]), "belongs to"),
    ],
)
def test_unusable_replies_raise_with_a_reason(system: SystemSpec, text: str, reason: str) -> None:
    with pytest.raises(JudgeParseError) as info:
        parse_verdict(text, system, make_trace())
    assert reason in info.value.reason


def test_tool_proposals_and_duplicates_are_dropped(system: SystemSpec) -> None:
    text = verdict_json(
        components=[
            critique("search", should_have_output="the color of zorpa is teal.", blame=0.4),
            critique("answer", should_have_output="  ", blame=0.7),
            critique("answer", should_have_output="teal", blame=0.1),
        ]
    )
    verdict = parse_verdict(text, system, make_trace())
    search, answer = verdict.components
    assert search.span_id == "search" and search.blame == 0.4  # blaming a tool is fine
    assert search.should_have_output is None  # but a tool's output is not proposed
    assert answer.blame == 0.7 and answer.should_have_output is None  # first critique kept


# -- the batch: repair, failures, budget ------------------------------------------------------


def test_broken_reply_is_repaired_once(system: SystemSpec) -> None:
    broken = '{"system_correct": false, "failure_summary": "cut'
    engine = ScriptedJudgeEngine([broken, verdict_json()])
    [outcome] = judge(engine, system, [make_trace()])
    assert len(outcome.verdicts) == 1 and outcome.failures == []
    assert outcome.calls == 2 and outcome.raw == [broken, verdict_json()]
    assert [len(call) for call in engine.calls] == [1, 1]
    first, repair = engine.requests
    assert repair.messages[: len(first.messages)] == first.messages
    assert repair.messages[-2] == {"role": "assistant", "content": broken}
    assert "invalid JSON" in repair.messages[-1]["content"]
    assert repair.json_schema == first.json_schema and repair.seed == first.seed


def test_garbage_twice_is_a_failure_and_the_batch_goes_on(system: SystemSpec) -> None:
    traces = [make_trace("bad"), make_trace("good"), make_trace("late")]
    engine = ScriptedJudgeEngine(
        [
            "I think the answer is wrong.",  # bad, first try
            verdict_json(),  # good
            '{"components": []}',  # late, first try: schema mismatch
            "still no json",  # bad, repair
            verdict_json(decisive="query"),  # late, repair
        ]
    )
    bad, good, late = judge(engine, system, traces)
    assert [len(call) for call in engine.calls] == [3, 2]  # one batch, one repair batch
    assert bad.verdicts == [] and len(bad.failures) == 1 and bad.calls == 2
    assert "invalid JSON" in bad.failures[0] and "after repair" in bad.failures[0]
    assert bad.raw == ["I think the answer is wrong.", "still no json"]
    assert len(good.verdicts) == 1 and good.calls == 1 and good.failures == []
    assert late.decisive_span() == "query" and late.calls == 2


def cut(text: str) -> GenerationResult:
    """A reply the engine stopped at ``max_tokens``."""
    return GenerationResult(
        text=text, prompt_tokens=10, completion_tokens=384, finish_reason="length"
    )


# What SmolLM2-135M wrote as a judge (object-count): a critique looping until the schema's
# maxLength closed it, then the next field cut at max_tokens.
LOOPING = (
    '{"system_correct": true, "failure_summary": "19", "components": [{"span_id": "search", '
    '"component": "search", "error_type": "wrong_content", "critique": "1.0.0.0.'
    + "1." * 130
    + '", "should_have_output": "1.0.0.0.1.1.1'
)


def test_a_reply_cut_inside_a_loop_is_not_repaired(system: SystemSpec) -> None:
    long_prose = '{"system_correct": false, "failure_summary": "' + " ".join(
        f"the search step returned passage {i} about a different colour" for i in range(20)
    )
    engine = ScriptedJudgeEngine([cut(LOOPING), cut(long_prose), verdict_json()])
    looping, cut_short = judge(engine, system, [make_trace("a"), make_trace("b")])
    assert [len(call) for call in engine.calls] == [2, 1]  # only the second is repaired
    assert engine.requests[2].messages[-2]["content"].startswith(long_prose[:100])
    assert looping.verdicts == [] and looping.calls == 1
    [failure] = looping.failures
    assert (
        failure.startswith("sample 0: invalid JSON")
        and "(the reply was cut at max_tokens)" in failure
    )
    assert failure.endswith("; not repaired: it loops on '.1'")
    assert len(cut_short.verdicts) == 1 and cut_short.calls == 2


def test_a_complete_object_then_a_loop_is_repaired(system: SystemSpec) -> None:
    # Without a schema (an HF engine) the object may close before the loop: only a field is
    # wrong, which the repair can fix.
    wrong = verdict_json(components=[critique("planner")]) + " 1." * 60
    engine = ScriptedJudgeEngine([cut(wrong), verdict_json()])
    [outcome] = judge(engine, system, [make_trace()])
    assert len(outcome.verdicts) == 1 and [len(call) for call in engine.calls] == [1, 1]


def test_an_unrepaired_loop_leaves_its_repair_budget_to_the_next_reply(
    system: SystemSpec,
) -> None:
    engine = ScriptedJudgeEngine([cut(LOOPING), "oops", verdict_json()])
    looping, bad = judge(engine, system, [make_trace("a"), make_trace("b")], max_calls=3)
    assert [len(call) for call in engine.calls] == [2, 1]  # the one repair left went to "oops"
    assert looping.failures[0].endswith("it loops on '.1'") and looping.calls == 1
    assert len(bad.verdicts) == 1 and bad.calls == 2


def test_a_loop_is_repaired_when_the_reply_was_not_cut(system: SystemSpec) -> None:
    engine = ScriptedJudgeEngine([LOOPING, verdict_json()])  # ended by itself: worth a repair
    [outcome] = judge(engine, system, [make_trace()])
    assert len(outcome.verdicts) == 1 and [len(call) for call in engine.calls] == [1, 1]


def test_repetition_unit() -> None:
    assert repetition_unit("x" * 95) is None  # too short to call a loop
    assert repetition_unit("prefix " + "ab" * 60) == "ab"
    assert repetition_unit("prefix " + " " * 100) == " "
    assert repetition_unit("ab" * 60 + ' and the rest of the reply"}') == "ab"  # not at the end
    assert repetition_unit("prefix: " + "cat sat. " * 12) == " cat sat."  # where the run starts
    assert repetition_unit("x" * 96) == "x"  # exactly LOOP_TAIL characters
    assert repetition_unit("prefix" + "abcdefghijkl" * 8) == "abcdefghijkl"  # LOOP_UNIT long
    assert repetition_unit("prefix" + "abcdefghijklm" * 8) is None  # one longer: not a loop
    prose = "The search step returned the passage about zorpa, but the answer named a colour "
    assert repetition_unit(prose + "that the passage never mentions at all.") is None
    unit = string.ascii_letters[:30]  # a unit longer than LOOP_UNIT: not taken for a loop
    assert len(unit) > LOOP_UNIT and repetition_unit(unit * 5) is None
    # loops that count on, as SmolLM2-135M wrote them in kb-qa's judge replies (the unit is
    # given with each number as "#", from where the run starts)
    counting = ", ".join(f"No.{i}" for i in range(48))
    assert repetition_unit('"critique":"A: ' + counting) == " No.#,"
    assert repetition_unit("error{<100>} 1000, " + ", ".join(map(str, range(54)))) == ", #"
    assert repetition_unit("A: " + "; ".join(map(str, range(13, 60)))) == " #;"
    # lists whose numbers do not rise are not taken for counting on (repairs still asked)
    assert repetition_unit(", ".join(f"{i / 7:.2f}" for i in range(40))) is None  # 0.00, 0.14
    assert repetition_unit(", ".join(f"2021-01-{i:02d}" for i in range(1, 29))) is None
    assert repetition_unit(", ".join(f"doc_{(i * 37) % 97}" for i in range(40))) is None
    # a few numbers in prose, or too short a count, are not a loop
    assert (
        repetition_unit("In 1998 the fund paid 62 euros a day, 75 in 2004 and 80 in 2010.") is None
    )
    assert repetition_unit(", ".join(map(str, range(20)))) is None  # masked: 57 chars < LOOP_TAIL


def test_a_reply_cut_while_counting_on_is_not_repaired(system: SystemSpec) -> None:
    counting = ", ".join(f"No.{i}" for i in range(48))
    engine = ScriptedJudgeEngine([cut('{"system_correct": false, "failure_summary": "' + counting)])
    [outcome] = judge(engine, system, [make_trace()])
    assert [len(call) for call in engine.calls] == [1] and outcome.verdicts == []
    assert outcome.failures[0].endswith("not repaired: it loops on 'No.#, '")


def test_score_replies_cut_inside_a_loop_are_not_repaired(system: SystemSpec) -> None:
    engine = ScriptedJudgeEngine(
        [cut('{"reason": "' + "ok " * 60), "no json", '{"reason": "fine", "score": 1}']
    )
    looping, bad = judge_scores(
        engine, system, [make_trace("a"), make_trace("b")], samples=1, temperature=0.7,
        max_tokens=160, seed=0,
    )  # fmt: skip
    assert [len(call) for call in engine.calls] == [2, 1]
    assert looping.scores == [] and looping.failures[0].endswith("it loops on 'ok '")
    assert bad.scores == [1.0] and bad.failures == []


def test_unknown_span_id_is_a_failure(system: SystemSpec) -> None:
    wrong = verdict_json(components=[critique("planner")])
    engine = ScriptedJudgeEngine([wrong, wrong])
    [outcome] = judge(engine, system, [make_trace()])
    assert outcome.verdicts == [] and outcome.calls == 2
    assert "unknown span_id 'planner'" in outcome.failures[0]
    assert "unknown span_id 'planner'" in engine.requests[1].messages[-1]["content"]


def test_engine_errors_are_failures(system: SystemSpec) -> None:
    down = EngineError("POST http://judge/v1/chat/completions failed with HTTP 503")
    engine = ScriptedJudgeEngine([down, "x"])
    a, b = judge(engine, system, [make_trace("a"), make_trace("b")])
    assert a.calls == b.calls == 1 and len(engine.calls) == 1
    assert a.failures == [f"sample 0: engine error: {down}"] and b.failures == a.failures

    engine = ScriptedJudgeEngine(["broken", verdict_json(), down])
    a, b = judge(engine, system, [make_trace("a"), make_trace("b")])
    assert a.calls == 2 and a.verdicts == [] and len(b.verdicts) == 1
    assert a.failures[0].endswith(f"; repair: engine error: {down}")


def test_samples_use_temperature_and_seeds(system: SystemSpec) -> None:
    engine = ScriptedJudgeEngine([verdict_json()] * 6)
    outcomes = judge(engine, system, [make_trace("a"), make_trace("b")], samples=3, seed=10)
    assert [len(call) for call in engine.calls] == [6]
    assert [r.seed for r in engine.requests] == [10, 11, 12, 10, 11, 12]
    assert {r.temperature for r in engine.requests} == {0.7}
    assert [o.calls for o in outcomes] == [3, 3]
    assert all(len(o.verdicts) == 3 for o in outcomes)


def test_no_schema_when_the_engine_cannot_decode_with_one(system: SystemSpec) -> None:
    engine = ScriptedJudgeEngine([verdict_json()], json_schema=False)
    [outcome] = judge(engine, system, [make_trace()])
    assert outcome.verdicts and engine.requests[0].json_schema is None


def test_budget_caps_the_requests(system: SystemSpec) -> None:
    traces = [make_trace("a"), make_trace("b"), make_trace("c")]
    engine = ScriptedJudgeEngine([verdict_json(), "oops", verdict_json(), verdict_json()] * 2)
    a, b, c = judge(engine, system, traces, samples=2, max_calls=5)
    assert len(engine.requests) == 5  # 2 traces × 2 samples, and one repair
    assert [len(call) for call in engine.calls] == [4, 1]
    assert len(a.verdicts) == 2 and a.calls == 3  # its repair used the last call
    assert b.calls == 2 and len(b.verdicts) == 2
    assert c.verdicts == [] and c.failures == [BUDGET_EXHAUSTED] and c.calls == 0

    engine = ScriptedJudgeEngine(["oops", verdict_json()])
    a, b, c = judge(engine, system, traces, samples=2, max_calls=2)
    assert len(engine.calls) == 1  # no budget left for the repair
    assert a.failures == [
        "sample 0: invalid JSON: the reply holds no JSON object; no budget left for a repair"
    ]
    assert b.failures == c.failures == [BUDGET_EXHAUSTED]

    engine = ScriptedJudgeEngine([])
    outcomes = judge(engine, system, traces, max_calls=0)
    assert engine.calls == [] and all(o.failures == [BUDGET_EXHAUSTED] for o in outcomes)


# -- merging ----------------------------------------------------------------------------------


def test_merge_of_three_verdicts(system: SystemSpec) -> None:
    trace = make_trace(query="zorpa", answer="blue")
    replies = [
        verdict_json(
            "answer",
            [
                critique("query", blame=0.3, should_have_output="color of zorpa"),
                critique("answer", blame=0.9, should_have_output="teal"),
            ],
        ),
        verdict_json(
            "answer",
            [
                critique("answer", blame=0.6, should_have_output=" teal\n"),  # same, stripped
                critique("search", blame=0.3, should_have_output="a passage"),  # tool: dropped
            ],
        ),
        verdict_json(
            "query",
            [
                critique("query", blame=0.9, should_have_output="zorpa"),  # the original output
                critique("answer", blame=0.0, should_have_output="Teal"),
            ],
        ),
    ]
    engine = ScriptedJudgeEngine(replies)
    [outcome] = judge(engine, system, [trace], samples=3)
    assert len(outcome.verdicts) == 3
    blame = outcome.merged_blame()
    assert list(blame) == ["query", "search", "answer"]
    assert blame["query"] == pytest.approx(0.4)  # (0.3 + 0 + 0.9) / 3
    assert blame["search"] == pytest.approx(0.1)
    assert blame["answer"] == pytest.approx(0.5)
    assert outcome.decisive_span() == "answer"  # two votes of three
    assert outcome.proposals() == [
        ("query", "color of zorpa", "query went wrong"),
        ("answer", "teal", "answer went wrong"),
        ("answer", "Teal", "answer went wrong"),
    ]

    again = JudgeOutcome.from_json(json.loads(json.dumps(outcome.to_json())))
    assert again == outcome


def test_decisive_span_ties() -> None:
    def verdict(decisive: str | None, **blames: float) -> JudgeVerdict:
        return JudgeVerdict(
            system_correct=decisive is None,
            failure_summary="",
            decisive_span_id=decisive,
            components=[
                ComponentCritique.model_validate(critique(s, blame=b)) for s, b in blames.items()
            ],
        )

    spans = ["query", "search", "answer"]
    tie = JudgeOutcome(
        "t", [verdict("answer", answer=0.2), verdict("query", query=0.8)], span_ids=spans
    )
    assert tie.decisive_span() == "query"  # higher mean blame
    even = JudgeOutcome(
        "t", [verdict("answer", answer=0.5), verdict("query", query=0.5)], span_ids=spans
    )
    assert even.decisive_span() == "query"  # then the earlier span
    nothing = JudgeOutcome(
        "t", [verdict(None), verdict(None), verdict("answer", answer=1.0)], span_ids=spans
    )
    assert nothing.decisive_span() is None  # "nothing failed" wins a majority
    half = JudgeOutcome("t", [verdict(None), verdict("answer", answer=1.0)], span_ids=spans)
    assert half.decisive_span() == "answer"  # but loses a tie
    empty = JudgeOutcome("t", failures=["x"], span_ids=spans)
    assert empty.decisive_span() is None and empty.merged_blame() == {}
    assert empty.proposals() == []


# -- prompt and schema ------------------------------------------------------------------------


def test_gold_is_in_the_prompt_only_when_asked(system: SystemSpec) -> None:
    trace = make_trace(expected=["turquoise"])
    with_gold = judge_messages(system, trace, include_gold=True)
    without = judge_messages(system, trace, include_gold=False)
    assert [m["role"] for m in with_gold] == ["system", "user"]
    assert "turquoise" in with_gold[1]["content"] and "Score: 0" in with_gold[1]["content"]
    assert all("turquoise" not in m["content"] for m in without)
    assert "Score" not in without[1]["content"]
    for messages in (with_gold, without):
        system_text, user = messages[0]["content"], messages[1]["content"]
        assert "Return only JSON following the schema" in system_text
        assert system_card(system) in system_text
        assert trace.inputs["question"] in user and "Final output (answer): blue" in user
        positions = [user.index(f"span_id={s}") for s in ("query", "search", "answer")]
        assert positions == sorted(positions)
        # inputs that are earlier outputs are referenced, not repeated
        assert "passages = (output of span search)" in user


def test_engine_batches_send_the_gold_as_asked(system: SystemSpec) -> None:
    engine = ScriptedJudgeEngine([verdict_json()])
    judge(engine, system, [make_trace(expected=["turquoise"])], include_gold=False)
    assert "turquoise" not in json.dumps(engine.requests[0].messages)


def test_system_card(system: SystemSpec) -> None:
    card = system_card(system)
    assert (
        "- query [llm: model small (tiny-llm); trainable]: reads question -> writes query" in card
    )
    assert (
        "- search [tool: bm25 (corpus=c.jsonl); not trainable]: reads query -> writes passages"
        in card
    )
    assert "- answer [llm: model small (tiny-llm); not trainable]" in card
    assert "reads question, passages -> writes answer; output: text" in card
    assert "Final output: field 'answer' (written by 'answer')" in card
    assert "Metric: exact_match" in card


def test_spans_are_truncated(system: SystemSpec) -> None:
    long_passages = ["x" * 5000, "y" * 5000]
    trace = make_trace(passages=long_passages, answer="z" * 5000)
    user = judge_messages(system, trace, include_gold=True)[1]["content"]
    assert len(user) < 3000
    assert "more chars]" in user


def test_schema_restricts_span_ids(system: SystemSpec) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    trace = make_trace()
    schema = verdict_schema(system, trace)
    jsonschema.Draft202012Validator.check_schema(schema)
    branches = schema["properties"]["components"]["items"]["anyOf"]
    # one branch per span, each allowing only that span's component
    assert [b["properties"]["span_id"]["enum"] for b in branches] == [
        ["query"],
        ["search"],
        ["answer"],
    ]
    assert [b["properties"]["component"]["enum"] for b in branches] == [
        ["query"],
        ["search"],
        ["answer"],
    ]
    assert all(list(b["properties"]) == list(CRITIQUE_FIELDS) for b in branches)
    assert schema["properties"]["components"]["maxItems"] == 3
    assert branches[0]["properties"]["critique"]["maxLength"] == 300
    validator = jsonschema.Draft202012Validator(schema)
    assert validator.is_valid(json.loads(verdict_json()))
    assert validator.is_valid(json.loads(verdict_json(decisive=None)))
    assert not validator.is_valid(json.loads(verdict_json(components=[critique("rerank")])))
    assert not validator.is_valid(json.loads(verdict_json(decisive="rerank")))
    swapped = critique("answer", component="query")  # a pairing the old schema let through
    assert not validator.is_valid(json.loads(verdict_json(components=[swapped])))
    one = trace.model_copy(update={"spans": trace.spans[-1:]})  # one span: one branch, same shape
    [branch] = verdict_schema(system, one)["properties"]["components"]["items"]["anyOf"]
    assert branch["properties"]["component"]["enum"] == ["answer"]
    too_many = [critique(s) for s in ("query", "search", "answer", "answer")]
    assert not validator.is_valid(json.loads(verdict_json(components=too_many)))


def test_repair_messages() -> None:
    original = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    messages = repair_messages(original, "x" * 10_000, "invalid JSON: oops")
    assert messages[:2] == original and messages[2]["role"] == "assistant"
    assert len(messages[2]["content"]) < 2000
    assert "invalid JSON: oops" in messages[3]["content"] and messages[3]["role"] == "user"


# -- the real tiny model ----------------------------------------------------------------------


class RecordingEngine:
    """Passes requests to a real engine and keeps them (not a double: the replies are real)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.kind = engine.kind
        self.model_id = engine.model_id
        self.stats = engine.stats
        self.requests: list[GenerationRequest] = []

    def supports_json_schema(self) -> bool:
        return bool(self.engine.supports_json_schema())

    def generate(
        self, requests: list[GenerationRequest], adapter: str | None = None
    ) -> list[GenerationResult]:
        self.requests.extend(requests)
        return list(self.engine.generate(requests, adapter=adapter))


def test_real_engine_judges_without_raising(system: SystemSpec, vllm_engine: Any) -> None:
    traces = [make_trace("real-1"), make_trace("real-2", answer="teal")]
    engine = RecordingEngine(vllm_engine)
    outcomes = judge_traces(
        engine, system, traces, samples=1, temperature=0.7, max_tokens=96, seed=0
    )
    assert [o.trace_id for o in outcomes] == ["real-1", "real-2"]
    assert engine.requests and engine.requests[0].json_schema == verdict_schema(system, traces[0])
    assert all(r.json_schema is not None for r in engine.requests)
    for outcome in outcomes:
        assert 1 <= outcome.calls <= 2 and len(outcome.raw) == outcome.calls
        # the schema ties each critique's component to its span: no reply pairs them wrongly
        assert not any("belongs to component" in f for f in outcome.failures), outcome.failures
        assert len(outcome.verdicts) + len(outcome.failures) == 1
        for verdict in outcome.verdicts:
            JudgeVerdict.model_validate(verdict.model_dump())
            known = {s.span_id for s in traces[0].spans}
            assert {c.span_id for c in verdict.components} <= known
