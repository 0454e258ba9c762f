"""Graded verification (``loop.graded_verification``, ``cotune.verify``): with a binary task
metric a correction is also accepted when its replay moves the output strictly closer to gold
by the metric's graded companion (``cotune.metrics.companion_score``) and the task score does
not fall. Runs the real tiny-kb system with ``metric: list_equal`` and the scripted engine
(``tests/doubles.py``); the loop-level test is in ``test_loop_logic.py``."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
from doubles import ScriptedEngine

from cotune.data import load_examples
from cotune.records import Candidate
from cotune.runtime import Runtime, Trace, mean_score
from cotune.scoring import GoldScorer
from cotune.spec import SystemSpec, parse_system
from cotune.tiny import TINY_SYSTEM, write_tiny_example
from cotune.tools import ToolContext
from cotune.verify import Proposal, verify

GOLD = "red, blue, green"


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_example(tmp_path_factory.mktemp("tiny-kb"), splits=(6, 2, 2))


@pytest.fixture(scope="module")
def system(folder: Path) -> SystemSpec:
    data = copy.deepcopy(TINY_SYSTEM)
    data["metric"] = "list_equal"
    return parse_system(data, base_dir=folder)


def listing(system: SystemSpec, folder: Path, answer: str) -> tuple[Runtime, Trace]:
    """A rolled-out trace whose answer writer wrote ``answer`` for the gold list ``GOLD``,
    scored by the job's scorer."""
    runtime = Runtime(system, {"tiny": ScriptedEngine()}, ToolContext.for_system(system))
    trace = runtime.run(load_examples(folder / "train.jsonl", system)[:1])[0]
    trace.expected = [GOLD]
    trace.span("answer").output = trace.output = answer
    GoldScorer(system).score([trace])
    return runtime, trace


def test_a_correction_closer_to_gold_is_accepted_only_with_graded_verification(
    system: SystemSpec, folder: Path
) -> None:
    runtime, trace = listing(system, folder, "red, pink, gray")  # 1 of 3 right
    assert (trace.score, trace.graded_score) == (0.0, pytest.approx(1 / 3))
    proposals = [
        Proposal(trace, "answer", "red, blue, gray", "judge", "two right"),
        Proposal(trace, "answer", "gray, red, pink", "judge", "still one right"),
        Proposal(trace, "answer", "pink", "judge", "none right"),
        Proposal(trace, "answer", "green, red, blue", "judge", "all right"),
    ]

    graded, _ = verify(runtime, proposals, epoch=1, graded=True)
    binary, _ = verify(runtime, proposals, epoch=1, graded=False)

    assert [c.accepted_by for c in graded] == ["graded", None, None, "score"]
    assert [c.accepted_by for c in binary] == [None, None, None, "score"]
    assert [c.accepted for c in binary] == [c.verified for c in graded]
    two_right = graded[0]
    assert two_right.original_graded == pytest.approx(1 / 3)
    assert two_right.replay_graded == [pytest.approx(2 / 3)]
    assert two_right.replay_scores == [0.0], "the replay's score is still the task metric"


def test_the_task_score_may_not_fall_for_a_closer_output() -> None:
    """A correction is replayed on its own example only; what could make it worse is its
    task score falling below the reference (with R seeded replays: the unmodified span's)."""

    def candidate(**kwargs: object) -> Candidate:
        fields: dict[str, object] = {
            "epoch": 1,
            "trace_id": "t",
            "example_id": "e",
            "component": "answer",
            "source": "judge",
            "proposed_output": "x",
            "original_output": "y",
            "original_score": 0.0,
            "accepted": False,
        }
        return Candidate.model_validate(fields | kwargs)

    closer = candidate(replay_scores=[0.0, 0.0], replay_graded=[0.6, 0.6], original_graded=0.3)
    assert closer.closer and not closer.verified
    # the unmodified span's replays passed once: closer by the companion, worse by the metric
    worse = candidate(
        replay_scores=[0.0, 0.0],
        replay_graded=[0.6, 0.6],
        baseline_scores=[1.0, 0.0],
        baseline_graded=[1.0, 0.3],
    )
    assert not worse.closer and not worse.verified
    # no closer: equal is not closer; no graded scores (metric f1, judge) is no evidence
    assert not candidate(replay_scores=[0.0], replay_graded=[0.3], original_graded=0.3).closer
    assert not candidate(replay_scores=[0.0], original_graded=0.3).closer
    assert not candidate(replay_scores=[0.0], replay_graded=[0.6]).closer


def test_final_scores_stay_the_task_metric(system: SystemSpec, folder: Path) -> None:
    _, nearly = listing(system, folder, "red, blue")
    _, right = listing(system, folder, "blue, green, red")
    assert (nearly.score, nearly.passed, nearly.graded_score) == (0.0, False, pytest.approx(2 / 3))
    assert (right.score, right.passed, right.graded_score) == (1.0, True, 1.0)
    assert mean_score([nearly, right]) == 0.5
