"""Joint candidates, leave-one-out attribution and hindsight targets (``cotune.verify``,
docs/algorithm.md), on a three-LLM chain whose engine is a test double (``ChainEngine``: each
component answers by a fixed rule, no model) and the real runtime, metric and spec. The
loop-level tests on tiny-kb are in ``test_loop_logic.py``.

The chain: ``first`` and ``second`` read the question, ``aside`` too; ``writer`` joins what
``first`` and ``second`` wrote (``aside`` it reads but ignores). Gold is ``ok good``: the base
writes ``bad bad``, so ``first`` and ``second`` are both wrong and no single fix of either
flips exact match; both together do, and ``aside`` never matters.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from doubles import StepsAside

from cotune.data import Example
from cotune.engines.base import EngineStats, GenerationRequest, GenerationResult
from cotune.judge import JudgeOutcome
from cotune.judge.schema import ComponentCritique, JudgeVerdict
from cotune.records import Candidate
from cotune.runtime import Runtime, Span, Trace
from cotune.scoring import GoldScorer
from cotune.spec import SystemSpec, parse_system
from cotune.synthesis import Buffer, add_corrections
from cotune.tools import ToolContext
from cotune.verify import (
    JointProposal,
    Proposal,
    gold_proposals,
    hindsight_target,
    joint_proposals,
    verify,
    verify_joint,
)

GOLD = "ok good"


class ChainEngine(StepsAside):
    """Test double for an engine on the chain: ``first``, ``second`` and ``aside`` answer
    ``bad``; ``writer`` answers what its prompt shows for ``first`` and ``second``, joined."""

    kind = "vllm"
    model_id = "scripted-chain"

    def __init__(self) -> None:
        self.stats = EngineStats()
        self.prompts: list[str] = []

    def supports_json_schema(self) -> bool:
        return False

    def generate(
        self, requests: list[GenerationRequest], adapter: str | None = None
    ) -> list[GenerationResult]:
        texts = []
        for request in requests:
            prompt = request.messages[-1]["content"]
            self.prompts.append(prompt)
            if prompt.startswith("Write:"):
                shown = dict(line.split("=", 1) for line in prompt.splitlines()[1:])
                texts.append(f"{shown['first']} {shown['second']}")
            else:
                texts.append("bad")
        results = [GenerationResult(text=t, prompt_tokens=5, completion_tokens=2) for t in texts]
        self.stats.add(results, 0.0)
        return results


def llm(name: str, reads: list[str], prompt: str) -> dict[str, Any]:
    return {
        "name": name,
        "kind": "llm",
        "model": "m",
        "reads": reads,
        "writes": name,
        "prompt": prompt,
    }


@pytest.fixture
def system(tmp_path: Path) -> SystemSpec:
    (tmp_path / "config.json").write_text("{}")
    return parse_system(
        {
            "name": "chain",
            "inputs": ["question"],
            "output": "writer",
            "models": {"m": {"path": str(tmp_path)}},
            "components": [
                llm("first", ["question"], "First: {question}"),
                llm("second", ["question"], "Second: {question}"),
                llm("aside", ["question"], "Aside: {question}"),
                llm(
                    "writer",
                    ["first", "second", "aside", "question"],
                    "Write: {question}\nfirst={first}\nsecond={second}\naside={aside}",
                ),
            ],
            "metric": "exact_match",
        }
    )


def rolled_out(system: SystemSpec) -> tuple[Runtime, Trace]:
    runtime = Runtime(system, {"m": ChainEngine()}, ToolContext.for_system(system))
    [trace] = runtime.run([Example(id="e1", inputs={"question": "q1"}, expected=[GOLD])])
    GoldScorer(system).score([trace])
    assert trace.output == "bad bad" and trace.score == 0.0
    return runtime, trace


def test_a_multi_span_replay_keeps_each_given_output_and_reruns_what_is_downstream(
    system: SystemSpec,
) -> None:
    runtime, trace = rolled_out(system)
    [replay] = runtime.replay_joint([(trace, {"first": "ok", "second": "good"})])
    assert replay.output == GOLD and replay.replay_of == trace.trace_id
    spans = {s.span_id: s for s in replay.spans}
    assert (spans["first"].output, spans["first"].replaced) == ("ok", True)
    assert (spans["second"].output, spans["second"].replaced) == ("good", True)
    assert not spans["aside"].rerun and not spans["aside"].replaced  # not downstream
    assert spans["writer"].rerun and not spans["writer"].replaced
    assert spans["first"].messages == trace.span("first").messages  # its own prompt


def verdict(*fixes: tuple[str, str]) -> JudgeVerdict:
    return JudgeVerdict(
        system_correct=False,
        failure_summary="both wrong",
        decisive_span_id=fixes[0][0],
        components=[
            ComponentCritique(
                span_id=span,
                component=span,
                blame=0.5,
                error_type="wrong_content",
                critique=f"fix {span}",
                should_have_output=output,
                confidence=0.5,
            )
            for span, output in fixes
        ],
    )


def test_no_single_fix_flips_it_the_joint_does_and_leave_one_out_keeps_the_needed(
    system: SystemSpec,
) -> None:
    runtime, trace = rolled_out(system)
    outcome = JudgeOutcome.for_trace(trace)
    # one verdict fixes all three upstream spans (and the writer, which a joint leaves to
    # re-run: its fixed output would decide the score alone); another fixes one span only
    outcome.verdicts = [
        verdict(("first", "ok"), ("second", "good"), ("aside", "fine"), ("writer", "x")),
        verdict(("first", "ok")),
    ]
    joints = joint_proposals(system, [trace], [outcome])
    assert [j.corrections for j in joints] == [{"first": "ok", "second": "good", "aside": "fine"}]

    singles = [
        Proposal(trace, span, output, "judge")
        for span, output in (("first", "ok"), ("second", "good"), ("aside", "fine"))
    ]
    single, _ = verify(runtime, singles, epoch=1)
    assert not any(c.accepted for c in single), "no single fix flips exact match"

    candidates, replays = verify_joint(runtime, joints, epoch=1, writer="writer", graded=True)
    assert [c.component for c in candidates] == ["first", "second", "aside"]
    assert {c.kind for c in candidates} == {"joint"} and len({c.joint_id for c in candidates}) == 1
    for candidate in candidates:
        assert candidate.replay_scores == [1.0] and candidate.original_score == 0.0
        assert candidate.members == ["first", "second", "aside"]
        assert candidate.source == "judge" and candidate.critique == f"fix {candidate.component}"
    needed = {c.component: c.needed for c in candidates}
    assert needed == {"first": True, "second": True, "aside": False}
    assert {c.component: c.without_scores for c in candidates} == {
        "first": [0.0],
        "second": [0.0],
        "aside": [1.0],
    }
    assert [c.component for c in candidates if c.accepted] == ["first", "second"]
    assert all(c.accepted_by == "score" for c in candidates if c.accepted)
    assert replays[0].output == GOLD

    # the rows: exactly the needed members', each on its own span's prompt
    buffer = Buffer()
    added = add_corrections(
        buffer, system, {trace.trace_id: trace}, replays, candidates, final_component="writer"
    )
    assert added == {"first": 1, "second": 1, "writer": 1}  # writer: the passing replay's span
    assert set(buffer.sft) == {"first", "second", "writer"}
    assert buffer.sft["first"][0].messages == trace.span("first").messages
    assert buffer.sft["first"][0].completion == "ok" and buffer.sft["first"][0].source == (
        "correction"
    )
    assert buffer.sft["writer"][0].source == "downstream"
    assert "aside" not in buffer.sft and "aside" not in buffer.dpo


def test_a_refused_joint_is_recorded_without_attribution(system: SystemSpec) -> None:
    runtime, trace = rolled_out(system)
    joint = JointProposal(
        trace,
        {"first": "no", "aside": "fine"},
        {"first": "judge", "aside": "judge"},
        {},
    )
    candidates, _ = verify_joint(runtime, [joint], epoch=1, writer="writer")
    assert [c.component for c in candidates] == ["first", "aside"]
    assert all(not c.accepted and c.needed is None for c in candidates)
    assert all(c.without_scores == [] for c in candidates)


# -- hindsight targets ------------------------------------------------------------------------


def writer_span(**inputs: Any) -> Span:
    return Span(
        span_id="writer",
        component="writer",
        kind="llm",
        writes="writer",
        inputs=inputs,
        output="bad bad",
        messages=[{"role": "user", "content": repr(inputs)}],
    )


@pytest.mark.parametrize(
    ("inputs", "expected", "target"),
    [
        ({"first": "OK then", "second": "good"}, ["ok good"], "ok good"),  # every token shown
        ({"first": "good", "second": "ok"}, ["ok good"], "ok good"),  # in any order
        ({"passages": ["the color of x is Red."]}, ["red"], "Red"),  # verbatim: as spelled
        ({"first": "ok", "second": "bad"}, ["ok good"], None),  # "good" never shown
        ({"first": "okay", "second": "goodness"}, ["ok good"], None),  # not inside other words
        ({"first": "the", "second": "a"}, ["The"], None),  # no tokens: never a target
        ({"first": "ok"}, None, None),  # no gold
    ],
)
def test_hindsight_target_only_from_tokens_the_writer_was_shown(
    inputs: dict[str, Any], expected: list[str] | None, target: str | None
) -> None:
    assert hindsight_target(writer_span(**inputs), expected) == target


def test_a_prompt_whose_inputs_lack_gold_tokens_never_gets_a_gold_target(
    system: SystemSpec,
) -> None:
    _, trace = rolled_out(system)
    assert gold_proposals(system, [trace]) == []  # "ok good": neither word was shown

    shown = trace.model_copy(deep=True)
    shown.span("writer").inputs.update(first="ok", second="good")
    [proposal] = gold_proposals(system, [shown])
    assert (proposal.span_id, proposal.output, proposal.source) == ("writer", GOLD, "gold")

    # synthesis refuses a gold target on a prompt whose inputs do not admit it, whatever a
    # candidate says: here the accepted candidate claims gold for the unshown trace
    claimed = Candidate(
        epoch=1,
        trace_id=trace.trace_id,
        example_id=trace.example_id,
        component="writer",
        source="gold",
        proposed_output=GOLD,
        original_output="bad bad",
        original_score=0.0,
        replay_scores=[1.0],
        accepted=True,
        accepted_by="score",
    )
    buffer = Buffer()
    traces = {trace.trace_id: trace}
    assert add_corrections(buffer, system, traces, {}, [claimed], "writer") == {}
    assert buffer.sft == {} and buffer.dpo == {}
    traces = {shown.trace_id: shown}
    assert add_corrections(buffer, system, traces, {}, [claimed], "writer") == {"writer": 1}


def test_with_seeded_replays_the_joint_is_compared_to_the_unmodified_runs(
    system: SystemSpec,
) -> None:
    runtime, trace = rolled_out(system)
    joint = JointProposal(
        trace, {"first": "ok", "second": "good"}, {"first": "judge", "second": "resample"}, {}
    )
    candidates, _ = verify_joint(runtime, [joint], epoch=2, writer="writer", replays=3, seed=9)
    assert [c.component for c in candidates] == ["first", "second"]
    for candidate in candidates:
        assert candidate.replay_scores == [1.0] * 3 and candidate.baseline_scores == [0.0] * 3
        assert candidate.without_scores == [0.0] * 3 and candidate.needed
        assert candidate.accepted and candidate.accepted_by == "score"
    assert [c.source for c in candidates] == ["judge", "resample"]


@pytest.mark.parametrize("graded", [True, False])
def test_a_joint_closer_to_gold_is_attributed_by_the_companion(
    system: SystemSpec, graded: bool
) -> None:
    """``first`` fixed and ``aside`` changed: the writer says ``ok bad``, half of ``ok good``
    by token F1 and still wrong by exact match; without ``first`` it is ``bad bad`` again."""
    runtime, trace = rolled_out(system)
    joint = JointProposal(
        trace, {"first": "ok", "aside": "fine"}, {"first": "judge", "aside": "judge"}, {}
    )
    candidates, _ = verify_joint(runtime, [joint], epoch=1, writer="writer", graded=graded)
    by_name = {c.component: c for c in candidates}
    assert by_name["first"].replay_scores == [0.0]
    assert by_name["first"].replay_graded == [pytest.approx(0.5)]
    if not graded:  # not right, so refused, and not attributed
        assert all(not c.accepted and c.needed is None for c in candidates)
        return
    assert (by_name["first"].needed, by_name["aside"].needed) == (True, False)
    assert by_name["first"].without_graded == [0.0]
    assert by_name["aside"].without_graded == [pytest.approx(0.5)]
    assert [c.accepted_by for c in candidates] == ["graded", None]
