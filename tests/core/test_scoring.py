"""Scoring final outputs (``cotune.scoring``): the judge under a rubric, its cache, its samples,
repairs and budget; replays verified by it. Runs the real tiny-kb system (spec, bm25, data)
with test doubles for the engines (``tests/doubles.py``): no model is loaded."""

from __future__ import annotations

import copy
import json
from collections import Counter
from pathlib import Path

import pytest
from doubles import ScriptedEngine, ScriptedJudge, critique, question_key

from cotune.data import Example, load_examples
from cotune.judge.score import parse_score, score_messages, score_schema
from cotune.runtime import Runtime, Trace
from cotune.scoring import GoldScorer, JudgeScorer
from cotune.spec import SystemSpec, parse_system
from cotune.tiny import TINY_SYSTEM, make_world, write_tiny_example
from cotune.tools import ToolContext
from cotune.verify import Proposal, verify

FACTS = make_world().facts
RUBRIC = "names the colour asked about"


def right_colour(key: str, output: str) -> float:
    return float(output == FACTS[key])


def no_critique(key: str, gold: str, index: int) -> list[dict[str, object]]:
    return [critique("query", None, "unused")]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_example(tmp_path_factory.mktemp("tiny-kb"), splits=(12, 4, 4))


@pytest.fixture(scope="module")
def system(folder: Path) -> SystemSpec:
    data = copy.deepcopy(TINY_SYSTEM)
    data.update(metric="judge", rubric=RUBRIC)
    return parse_system(data, base_dir=folder)


def rollout(system: SystemSpec, folder: Path, *, gold: bool = False) -> tuple[Runtime, list[Trace]]:
    runtime = Runtime(system, {"tiny": ScriptedEngine()}, ToolContext.for_system(system))
    examples = load_examples(folder / "train.jsonl", system)
    if not gold:
        examples = [Example(id=e.id, inputs=e.inputs) for e in examples]
    return runtime, runtime.run(examples)


def scorer(system: SystemSpec, judge: ScriptedJudge, **kwargs: object) -> JudgeScorer:
    options: dict[str, object] = {"samples": 1, "temperature": 0.7, "max_tokens": 64, "seed": 9}
    options.update(kwargs)
    return JudgeScorer(judge, system, **options)  # type: ignore[arg-type]


def test_the_same_input_and_output_is_judged_once(system: SystemSpec, folder: Path) -> None:
    runtime, traces = rollout(system, folder)
    judge = ScriptedJudge(no_critique, score=right_colour)
    judged = scorer(system, judge)

    judged.score([*traces, *(t.model_copy(deep=True) for t in traces)])  # each one twice
    assert len(judge.score_requests) == len(traces) == judged.calls
    for trace in traces:
        expected = right_colour(question_key(trace.inputs["question"]), trace.output)
        assert trace.score == expected and trace.score_samples == [expected]
        assert trace.passed == (expected >= system.pass_threshold)
        assert trace.score_reason == f"scripted score of {question_key(trace.inputs['question'])}"

    # scored again, and replays that leave the final output as it was: nothing new is asked
    judged.score(traces)
    unchanged = runtime.replay_many([(t, "query", t.span("query").output) for t in traces])
    judged.score(unchanged)
    assert len(judge.score_requests) == len(traces)
    assert [t.score for t in unchanged] == [t.score for t in traces]
    # a scorer of another stage shares the job's cache
    scorer(system, judge, cache=judged.cache).score(traces)
    assert len(judge.score_requests) == len(traces)


def test_k_samples_are_seeded_and_averaged(system: SystemSpec, folder: Path) -> None:
    _, traces = rollout(system, folder)
    judge = ScriptedJudge(no_critique, score=lambda key, output: 0.5)
    scorer(system, judge, samples=3).score(traces[:2])
    requests = judge.score_requests
    assert len(requests) == 6
    assert Counter(r.seed for r in requests) == {9: 2, 10: 2, 11: 2}
    assert {r.temperature for r in requests} == {0.7}
    assert all(r.json_schema == score_schema() for r in requests)
    assert [t.score_samples for t in traces[:2]] == [[0.5] * 3] * 2
    # one sample is greedy
    greedy = ScriptedJudge(no_critique, score=lambda key, output: 0.5)
    scorer(system, greedy).score(traces[:1])
    assert [r.temperature for r in greedy.score_requests] == [0.0]


def test_gold_is_a_reference_when_a_row_has_it(system: SystemSpec, folder: Path) -> None:
    _, with_gold = rollout(system, folder, gold=True)
    _, without = rollout(system, folder)
    gold = with_gold[0].expected
    assert gold is not None
    shown = score_messages(system, with_gold[0])[-1]["content"]
    assert f"A reference answer (a guide, not the only right one): {gold[0]}" in shown
    assert "reference" not in score_messages(system, without[0])[-1]["content"]
    assert RUBRIC in score_messages(system, without[0])[0]["content"]
    # a metric judge never compares against gold by itself
    GoldScorer(system).score(with_gold)
    assert all(t.score is None for t in with_gold)


def test_a_bad_reply_is_repaired_once_and_a_hopeless_one_leaves_the_output_unscored(
    system: SystemSpec, folder: Path
) -> None:
    _, traces = rollout(system, folder)
    asked: Counter[str] = Counter()

    def bad_first(key: str, output: str) -> float | str:
        asked[key] += 1
        return "a score of about 0.8" if asked[key] == 1 else 0.8

    judged = scorer(system, ScriptedJudge(no_critique, score=bad_first))
    judged.score(traces[:3])
    assert [t.score for t in traces[:3]] == [0.8] * 3 and judged.calls == 6

    hopeless = ScriptedJudge(no_critique, score=lambda key, output: '{"score": 2}')
    judged = scorer(system, hopeless)
    judged.score(traces[:2])
    assert all(t.score is None and t.passed is None for t in traces[:2])
    assert judged.failures == 2 and judged.calls == 4  # each: one reply, one repair
    assert traces[0].score_reason is not None and "after repair" in traces[0].score_reason
    judged.score(traces[:2])  # a failure is remembered too: not asked again
    assert judged.calls == 4 and len(hopeless.score_requests) == 4


def test_the_budget_leaves_the_rest_unscored(system: SystemSpec, folder: Path) -> None:
    _, traces = rollout(system, folder)
    judge = ScriptedJudge(no_critique, score=right_colour)
    judged = scorer(system, judge, samples=2, max_calls=9)  # room for two outputs' worst case
    judged.score(traces)
    assert len(judge.score_requests) == 4
    assert all(t.score is not None for t in traces[:2])
    assert all(t.score is None and t.passed is None for t in traces[2:])


def test_a_replay_is_verified_when_the_judge_scores_it_higher(
    system: SystemSpec, folder: Path
) -> None:
    runtime, traces = rollout(system, folder)
    judge = ScriptedJudge(no_critique, score=right_colour)
    judged = scorer(system, judge)
    judged.score(traces)
    failed = [t for t in traces if not t.passed]
    assert failed and len(failed) < len(traces)
    proposals = []
    for trace in failed:
        key = question_key(trace.inputs["question"])
        proposals.append(Proposal(trace, "query", f"color of {key}", "judge", "right"))
        proposals.append(Proposal(trace, "query", "still nothing", "judge", "useless"))
    candidates, _ = verify(runtime, proposals, epoch=1, scorer=judged)
    assert [c.accepted for c in candidates] == [p.critique == "right" for p in proposals]

    # an original the judge could not score has nothing to beat: no candidate verifies
    unscored = failed[0].model_copy(update={"score": None, "passed": None})
    key = question_key(unscored.inputs["question"])
    [candidate], _ = verify(
        runtime, [Proposal(unscored, "query", f"color of {key}", "judge")], epoch=1, scorer=judged
    )
    assert candidate.replay_scores == [] and not candidate.accepted


def test_parse_score_takes_the_object_and_refuses_a_score_out_of_range() -> None:
    assert parse_score('```json\n{"reason": "ok", "score": 1}\n```').score == 1.0
    with pytest.raises(ValueError, match="score"):
        parse_score(json.dumps({"reason": "too good", "score": 1.5}))


def test_judge_agreement_counts_each_judged_trace_with_gold_once() -> None:
    from cotune.scoring import judge_agreement

    def trace(example_id: str, output: str, passed: bool | None) -> Trace:
        return Trace(trace_id=example_id, example_id=example_id, inputs={}, output=output,
                     passed=passed, score=None if passed is None else float(passed))  # fmt: skip

    traces = [
        trace("a", "red", True),  # right, passed
        trace("b", "blue", True),  # wrong, passed
        trace("c", "gold", False),  # right, failed
        trace("d", "teal", False),  # wrong, failed
        trace("e", "teal", False),
        trace("f", "red", None),  # unscored
        trace("g", "red", True),  # no gold: not counted
    ]
    gold = {"a": ["red"], "b": ["red"], "c": ["gold", "golden"], "d": ["red"], "e": ["red"],
            "f": ["red"]}  # fmt: skip
    counts = judge_agreement(traces, gold, metric="exact_match")
    assert (counts.pass_right, counts.pass_wrong, counts.fail_right, counts.fail_wrong) == (
        1, 1, 1, 2)  # fmt: skip
    assert counts.unscored == 1 and counts.precision == 0.5 and counts.recall == 0.5
    partial = judge_agreement(traces, {"b": ["blue sky"]}, metric="f1", threshold=0.5)
    assert partial.pass_right == 1 and partial.precision == 1.0  # f1 0.667 >= 0.5
    nothing = judge_agreement(traces, {}, metric="exact_match")
    assert nothing.precision is None and nothing.recall is None
