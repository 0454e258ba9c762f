"""Logic tests of the epoch loop with test doubles (no model, no vLLM, no TRL).

The job is the real tiny-kb task (real spec, data, bm25 tool, metric, job store and artifact
store); only the seams of ``JobContext`` are doubles: ``ScriptedEngine`` answers the prompts by
rule, ``ScriptedJudge`` writes verdicts by rule, ``FakeTrainer`` writes adapter-shaped folders
(see ``tests/doubles.py``). Each test scripts what the doubles do and checks what the loop
makes of it: which candidates are accepted, what reaches the training rows, which epoch is kept,
what a crash and a resume leave behind.
"""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
from doubles import (
    GARBAGE_QUERY,
    EngineCall,
    FakeTrainer,
    ScriptedEngine,
    ScriptedJudge,
    TrainerCrash,
    adapter_epoch,
    critique,
    is_hard,
    question_key,
    write_judged_tiny_example,
)

from cotune.data import load_examples
from cotune.loop import run_job
from cotune.records import (
    EPOCH_STAGES,
    CreditOut,
    EvaluateOut,
    JobReport,
    RolloutOut,
    Stage,
    StageOut,
    SynthesizeOut,
    TestOut,
    TrainOut,
    VerifyOut,
)
from cotune.runner import JobContext, StagePause, stored_output
from cotune.runtime import Runtime, Trace, score_traces
from cotune.spec.job import JobSpec, parse_job
from cotune.store import ArtifactStore, JobStore, migrate
from cotune.synthesis import check_sources
from cotune.tiny import make_world, write_tiny_example
from cotune.tools import ToolContext
from cotune.verify import Proposal, verify

MARKER = "CRITIQUE-MARKER-7f3a"
FACTS = make_world().facts  # the world write_tiny_example(seed=0) writes: key -> colour
SPLITS = (24, 12, 12)
Out = TypeVar("Out", bound=StageOut)


# -- building a job ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder that resolves as a model (config.json); no model is ever loaded from it."""
    folder = tmp_path_factory.mktemp("dummy-model")
    (folder / "config.json").write_text("{}")
    return folder


@pytest.fixture(scope="module")
def example_dir(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Path:
    return write_tiny_example(
        tmp_path_factory.mktemp("tiny-kb"), splits=SPLITS, model_path=str(model_dir)
    )


def make_job(
    folder: Path,
    *,
    judge: bool = True,
    test: bool = True,
    loop: dict[str, Any] | None = None,
    budget: dict[str, Any] | None = None,
) -> JobSpec:
    data: dict[str, Any] = {"train": "train.jsonl", "val": "val.jsonl"}
    if test:
        data["test"] = "test.jsonl"
    spec: dict[str, Any] = {
        "system": "system.yaml",
        "data": data,
        "loop": {
            "epochs": 1,
            "rollout_batch": 12,
            "samples_per_component": 8,
            "judge_samples": 1,
            "seed": 0,
            **(loop or {}),
        },
        "train": {"lora_r": 4, "lora_alpha": 8},
    }
    if judge:
        spec["judge"] = {"model": "tiny"}
    if budget is not None:
        spec["budget"] = budget
    return parse_job(spec, base_dir=folder)


def split_keys(folder: Path, split: str) -> list[str]:
    rows = [json.loads(line) for line in (folder / f"{split}.jsonl").read_text().splitlines()]
    return [question_key(r["question"]) for r in rows]


def split_ids(folder: Path, split: str) -> set[str]:
    return {json.loads(line)["id"] for line in (folder / f"{split}.jsonl").read_text().splitlines()}


@dataclass
class Harness:
    """One job in its own SQLite store and artifact folder, with its doubles; ``calls`` maps
    each stage run here to the engine calls made during it (from ``on_stage_done``)."""

    job: JobSpec
    store: JobStore
    artifacts: ArtifactStore
    job_id: str
    engine: ScriptedEngine
    judge: ScriptedJudge | None
    trainer: FakeTrainer
    calls: dict[tuple[int, str], list[EngineCall]] = field(default_factory=dict)
    judge_requests: dict[tuple[int, str], int] = field(default_factory=dict)
    _seen: tuple[int, int] = (0, 0)

    def context(self, **kwargs: Any) -> JobContext:
        return JobContext(
            job_id=self.job_id,
            job=self.job,
            store=self.store,
            artifacts=self.artifacts,
            engines={"tiny": self.engine},
            judge=self.judge,
            trainer=self.trainer,
            on_stage_done=self._stage_done,
            **kwargs,
        )

    def run(self) -> JobReport:
        return run_job(self.context())

    def _stage_done(self, record: Any) -> None:
        engine_seen, judge_seen = self._seen
        judged = len(self.judge.requests) if self.judge else 0
        key = (record.epoch, record.stage.value)
        self.calls[key] = self.engine.calls[engine_seen:]
        self.judge_requests[key] = judged - judge_seen
        self._seen = (len(self.engine.calls), judged)

    def output(self, epoch: int, stage: Stage, model: type[Out]) -> Out:
        """The stage's stored output, read as the loop reads it."""
        found = stored_output(self.context(), epoch, stage, model)
        assert found is not None, f"epoch {epoch} {stage.value} has not finished"
        return found

    def messages(self) -> list[str]:
        return [e.message for e in self.store.events(self.job_id, limit=1000)]


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Callable[..., Harness]]:
    stores: list[JobStore] = []

    def make(
        job: JobSpec,
        *,
        engine: ScriptedEngine | None = None,
        judge: ScriptedJudge | None = None,
        trainer: FakeTrainer | None = None,
        root: Path | None = None,
        job_id: str | None = None,
    ) -> Harness:
        root = root or tmp_path / f"run-{len(stores)}"
        root.mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{root}/db"
        migrate(url)
        store = JobStore(url)
        stores.append(store)
        if job_id is None:
            job_id = store.create_job(job.system.name, job.model_dump(mode="json"))
        return Harness(
            job=job,
            store=store,
            artifacts=ArtifactStore(str(root / "artifacts")),
            job_id=job_id,
            engine=engine or ScriptedEngine(),
            judge=judge,
            trainer=trainer or FakeTrainer(),
        )

    yield make
    for store in stores:
        store.close()


def fix_query(key: str, gold: str, index: int) -> list[dict[str, Any]]:
    """The judge blames the query writer and proposes the right query."""
    return [critique("query", f"color of {key}", f"{MARKER}: search for the key")]


def word_in(word: str, text: str) -> bool:
    return re.search(rf"\b{re.escape(word)}\b", text) is not None


# -- 1. verification --------------------------------------------------------------------------


@pytest.mark.parametrize("replays", [1, 3])
def test_verify_accepts_only_the_candidates_that_raise_the_score(
    example_dir: Path, replays: int
) -> None:
    job = make_job(example_dir)
    runtime = Runtime(job.system, {"tiny": ScriptedEngine()}, ToolContext.for_system(job.system))
    examples = load_examples(example_dir / "train.jsonl", job.system)
    traces = runtime.run(examples)
    score_traces(job.system, traces)
    failed = [t for t in traces if not t.passed]
    assert failed and len(failed) < len(traces), "the script passes some and fails some"
    assert all(t.span("query").output == GARBAGE_QUERY for t in failed)

    proposals = []
    for trace in failed:
        key = question_key(trace.inputs["question"])
        proposals.append(Proposal(trace, "query", f"color of {key}", "judge", "right"))
        proposals.append(Proposal(trace, "query", "still nothing useful", "judge", "useless"))
    candidates, replayed = verify(runtime, proposals, epoch=1, replays=replays, seed=5)

    assert len(candidates) == len(proposals)
    for candidate, proposal in zip(candidates, proposals, strict=True):
        assert candidate.original_score == 0.0
        assert len(candidate.replay_scores) == replays
        assert candidate.accepted == (proposal.critique == "right"), candidate
        assert candidate.accepted == (min(candidate.replay_scores) > candidate.original_score)
        if replays > 1:  # seeded replays of the unmodified span are the reference
            assert candidate.baseline_scores == [0.0] * replays
    for index, candidate in enumerate(candidates):
        assert replayed[index].replay_of == candidate.trace_id
        assert replayed[index].passed == candidate.accepted

    # The no-verification ablation (loop.verify_by_replay: false): the same replays, recorded,
    # and every candidate accepted.
    unverified, _ = verify(runtime, proposals, epoch=1, replays=replays, seed=5, require_gain=False)
    assert all(c.accepted for c in unverified)
    assert [c.verified for c in unverified] == [c.accepted for c in candidates]
    assert [c.replay_scores for c in unverified] == [c.replay_scores for c in candidates]


def test_every_candidate_is_stored_with_its_replay_scores(
    example_dir: Path, harness: Callable[..., Harness]
) -> None:
    def right_then_useless(key: str, gold: str, index: int) -> list[dict[str, Any]]:
        proposed = f"color of {key}" if index == 0 else "still nothing useful"
        return [critique("query", proposed, f"{MARKER} sample {index}")]

    run = harness(
        make_job(example_dir, loop={"judge_samples": 2}), judge=ScriptedJudge(right_then_useless)
    )
    run.run()
    failed = [t for t in run.output(1, Stage.rollout, RolloutOut).traces if not t.passed]
    assert failed

    stored = run.store.candidates(run.job_id)
    assert len(stored) == 2 * len(failed)  # every proposal, accepted or not
    assert {c.trace_id for c in stored} == {t.trace_id for t in failed}
    for candidate in stored:
        assert candidate.source == "judge" and candidate.epoch == 1
        assert candidate.replay_scores, "the replay result is stored with the candidate"
        right = candidate.proposed_output.startswith("color of ")
        assert candidate.accepted == right
        assert candidate.replay_scores == ([1.0] if right else [0.0])
        assert candidate.original_output == GARBAGE_QUERY and candidate.original_score == 0.0
    assert len(run.store.candidates(run.job_id, accepted=True)) == len(failed)
    checked = run.output(1, Stage.verify, VerifyOut).candidates
    assert [c.proposed_output for c in checked] == [c.proposed_output for c in stored]
    [record] = run.store.epochs(run.job_id)
    query = next(c for c in record.components if c.component == "query")
    assert (query.candidates_proposed, query.candidates_verified) == (2 * len(failed), len(failed))


# -- 2. judge-free fallback -------------------------------------------------------------------


def test_without_a_judge_candidates_come_from_resampling(
    example_dir: Path, harness: Callable[..., Harness]
) -> None:
    run = harness(make_job(example_dir, judge=False, loop={"augment_rollouts": 0}))
    run.run()
    assert run.judge is None

    stored = run.store.candidates(run.job_id)
    assert stored and {c.source for c in stored} == {"resample"}
    accepted = [c for c in stored if c.accepted]
    assert accepted and len(accepted) < len(stored)  # odd seeds sample junk queries
    assert any(c.component == "query" for c in accepted)
    # re-sampling ran at the candidate temperature, seeded
    sampled = [c for c in run.calls[(1, "verify")] if c.temperature > 0]
    assert sampled and all(c.temperature == run.job.loop.candidate_temperature for c in sampled)

    buffer = run.output(1, Stage.synthesize, SynthesizeOut).buffer
    corrections = [r for r in buffer.sft["query"] if r.source == "correction"]
    assert corrections
    assert all(r.completion.startswith("color of ") for r in corrections)
    trained = {c.component: c for c in run.trainer.calls}
    assert any(r.source == "correction" for r in trained["query"].rows)
    assert trained["query"].pairs, "a verified correction also gives a DPO pair"


# -- 3. no leaks ------------------------------------------------------------------------------


def test_no_critique_no_unseen_gold_and_no_val_or_test_example_reaches_training(
    example_dir: Path, harness: Callable[..., Harness]
) -> None:
    def leaky_then_right(key: str, gold: str, index: int) -> list[dict[str, Any]]:
        # Sample 0 proposes a query that works only because it states the gold colour (the
        # query writer never sees it); sample 1 proposes the honest fix.
        proposed = f"color of {key} {gold}" if index == 0 else f"color of {key}"
        return [critique("query", proposed, f"{MARKER} the query should name {gold}")]

    job = make_job(
        example_dir,
        loop={"epochs": 2, "judge_samples": 2, "samples_per_component": 100, "augment_rollouts": 1},
    )
    run = harness(job, judge=ScriptedJudge(leaky_then_right))
    run.run()

    # The judge did write the marker and the leaky fix, and replay accepted the leaky fix ...
    stored = run.store.candidates(run.job_id)
    assert all(MARKER in (c.critique or "") for c in stored if c.source == "judge")
    leaky = [
        c
        for c in stored
        if c.accepted and c.proposed_output.endswith(" " + FACTS[c.proposed_output.split()[2]])
    ]
    assert leaky, "the leaky fix raises the score, so only synthesis can keep it out"

    # ... but no training row or pair holds a critique, or a gold the query writer did not see.
    train_keys = set(split_keys(example_dir, "train"))
    for epoch in (1, 2):
        buffer = run.output(epoch, Stage.synthesize, SynthesizeOut).buffer
        assert {r.source for r in buffer.sft["query"]} >= {"bootstrap", "correction", "augment"}
        for component, rows in buffer.sft.items():
            for row in rows:
                text = json.dumps(row.messages) + row.completion
                assert MARKER not in text
                key = question_key(row.messages[-1]["content"])
                assert key in train_keys, f"{component} row of a non-train example: {key}"
                if component == "query":
                    gold = FACTS[key]
                    assert not word_in(gold, row.messages[-1]["content"]), row
                    assert not word_in(gold, row.completion), row
        for component, pairs in buffer.dpo.items():
            for pair in pairs:
                assert MARKER not in json.dumps(pair.messages) + pair.chosen + pair.rejected
                if component == "query":
                    gold = FACTS[question_key(pair.messages[-1]["content"])]
                    assert not word_in(gold, pair.chosen)
    for call in run.trainer.calls:  # what the trainer got is what the buffer held
        for row in call.rows:
            assert MARKER not in json.dumps(row.messages) + row.completion

    # Only train examples were rolled out, replayed and proposed for.
    train_ids = split_ids(example_dir, "train")
    for epoch in (1, 2):
        rolled_out = run.output(epoch, Stage.rollout, RolloutOut).traces
        assert {t.example_id for t in rolled_out} <= train_ids
        replays = run.output(epoch, Stage.verify, VerifyOut).replays.values()
        assert {t.example_id for t in replays} <= train_ids
    assert {c.example_id for c in stored} <= train_ids


def test_check_sources_refuses_a_val_or_test_trace(example_dir: Path) -> None:
    train_ids = split_ids(example_dir, "train")
    check_sources([Trace(trace_id="t", example_id=sorted(train_ids)[0], inputs={})], train_ids)
    for split in ("val", "test"):
        outsider = sorted(split_ids(example_dir, split))[0]
        traces = [
            Trace(trace_id="t1", example_id=sorted(train_ids)[0], inputs={}),
            Trace(trace_id="t2", example_id=outsider, inputs={}),
        ]
        with pytest.raises(ValueError, match=rf"{outsider}.*not a train example"):
            check_sources(traces, train_ids)


def test_a_gold_inside_another_word_is_not_a_gold_candidate(example_dir: Path) -> None:
    from cotune.runtime import Span
    from cotune.verify import gold_proposals

    job = make_job(example_dir)
    question = "what is the color of feredi?"
    spans = [
        Span(
            span_id="query",
            component="query",
            kind="llm",
            writes="query",
            inputs={"question": question},
            output=GARBAGE_QUERY,
        ),
        Span(
            span_id="search",
            component="search",
            kind="tool",
            writes="passages",
            inputs={"query": GARBAGE_QUERY},
            output=[],
        ),
        Span(
            span_id="answer",
            component="answer",
            kind="llm",
            writes="answer",
            inputs={"question": question, "passages": []},
            output="unknown",
        ),
    ]
    trace = Trace(
        trace_id="t",
        example_id="q0",
        inputs={"question": question},
        expected=["red"],
        spans=spans,
        output="unknown",
        score=0.0,
        passed=False,
    )
    assert gold_proposals(job.system, [trace]) == []


# -- 3b. graded verification --------------------------------------------------------------------


class HalfRightAfterTraining(ScriptedEngine):
    """The base answer writer answers ``wrong``; with an adapter it names passage 1's colour
    followed by " one": closer to gold by token F1, never an exact match."""

    def __init__(self) -> None:
        super().__init__(answer_wrong=lambda adapter: adapter is None)

    def generate(self, requests: Any, adapter: str | None = None) -> Any:
        results = super().generate(requests, adapter)
        if self.calls[-1].component == "answer" and adapter is not None:
            for result in results:
                result.text = f"{result.text} one"
        return results


@pytest.mark.parametrize("graded", [True, False])
def test_graded_verification_accepts_closer_answers_and_scores_stay_exact_match(
    example_dir: Path, harness: Callable[..., Harness], graded: bool
) -> None:
    def closer(key: str, gold: str, index: int) -> list[dict[str, Any]]:
        return [critique("answer", f"{gold} one", f"{MARKER} name the colour")]

    job = make_job(
        example_dir,
        loop={"graded_verification": graded, "gold_candidates": False, "augment_rollouts": 0},
    )
    run = harness(job, engine=HalfRightAfterTraining(), judge=ScriptedJudge(closer))
    report = run.run()

    checked = run.output(1, Stage.verify, VerifyOut)
    assert checked.candidates and not any(c.verified for c in checked.candidates)
    for candidate in checked.candidates:  # "red one" against "red": F1 2/3 > 0, EM 0
        assert candidate.replay_scores == [0.0]
        assert candidate.replay_graded == [pytest.approx(2 / 3)]
        assert candidate.accepted_by == ("graded" if graded else None)
    assert checked.details()["accepted_graded"] == (len(checked.candidates) if graded else 0)
    stored = run.store.candidates(run.job_id, accepted=True)
    assert len(stored) == (len(checked.candidates) if graded else 0)
    answer_rows = run.output(1, Stage.synthesize, SynthesizeOut).buffer.sft.get("answer", [])
    assert bool(answer_rows) == graded
    assert any("closer to gold" in m for m in run.messages()) == graded

    # Final scores are the task metric: the trained writer's "red one" is closer, not right.
    evaluated = run.output(1, Stage.evaluate, EvaluateOut)
    assert evaluated.score == 0.0 and report.best_val_score == 0.0
    assert report.test_score == 0.0
    if graded:
        assert any(t.graded_score for t in evaluated.traces)


# -- 3c. joint candidates, downstream first, synthesis up to N ----------------------------------


def both_wrong() -> ScriptedEngine:
    """The base query writer is always wrong and the base answer writer answers ``wrong``:
    a right query alone leaves the answer wrong, and the answer writer's inputs (no passage)
    never admit the gold colour, so no single fix flips the answer."""
    return ScriptedEngine(query_ok=lambda key, adapter: False, answer_wrong=lambda a: a is None)


@pytest.mark.parametrize("joint", [True, False])
def test_when_both_components_are_wrong_only_the_joint_fix_teaches(
    example_dir: Path, harness: Callable[..., Harness], joint: bool
) -> None:
    job = make_job(example_dir, loop={"joint_candidates": joint, "augment_rollouts": 0})
    run = harness(job, engine=both_wrong(), judge=ScriptedJudge(fix_query))
    run.run()

    failed = run.output(1, Stage.rollout, RolloutOut).traces
    assert failed and not any(t.passed for t in failed)
    checked = run.output(1, Stage.verify, VerifyOut)
    singles = [c for c in checked.candidates if c.kind == "single"]
    assert singles and not any(c.accepted for c in singles), "no single fix flips it"
    assert {c.source for c in singles} == {"judge"}  # no gold in the answer writer's inputs
    members = [c for c in checked.candidates if c.kind == "joint"]
    buffer = run.output(1, Stage.synthesize, SynthesizeOut).buffer
    if not joint:
        assert members == [] and buffer.sft == {} and run.trainer.calls == []
        return

    # downstream first: each refused query fix, completed with the answer writer's gold
    # (the right query's passage shows it), is a joint of both; both are needed
    assert len(members) == 2 * len(failed)
    assert all(c.accepted and c.needed and c.replay_scores == [1.0] for c in members)
    for trace in failed:
        key, gold = (
            question_key(trace.inputs["question"]),
            FACTS[question_key(trace.inputs["question"])],
        )
        mine = {c.component: c for c in members if c.trace_id == trace.trace_id}
        assert (
            mine["query"].proposed_output == f"color of {key}" and mine["query"].source == "judge"
        )
        assert mine["answer"].proposed_output == gold and mine["answer"].source == "gold"
        assert mine["answer"].original_output == "wrong"  # what it said on the right passage
        assert mine["query"].without_scores == mine["answer"].without_scores == [0.0]
    details = checked.details()
    assert details["joint_candidates"] == details["joint_verified"] == len(failed)
    assert details["joint_members_needed"] == 2 * len(failed)
    stored = run.store.candidates(run.job_id, accepted=True)
    assert {(c.kind, c.component) for c in stored} == {("joint", "query"), ("joint", "answer")}

    # the rows: each needed member's correction, on the prompt its span had in the joint
    assert {r.source for rows in buffer.sft.values() for r in rows} == {"correction"}
    assert len(buffer.sft["query"]) == len(buffer.sft["answer"]) == len(failed)
    for row in buffer.sft["answer"]:
        key = question_key(row.messages[-1]["content"])
        assert row.completion == FACTS[key]
        assert word_in(FACTS[key], row.messages[-1]["content"]), "the prompt shows the gold"
    for row in buffer.sft["query"]:
        assert not word_in(FACTS[question_key(row.messages[-1]["content"])], row.completion)
    assert {c.component for c in run.trainer.calls} == {"query", "answer"}
    assert any("joint candidates verified by replay" in m for m in run.messages())


def test_a_joint_member_that_is_not_needed_gives_no_row(
    example_dir: Path, harness: Callable[..., Harness]
) -> None:
    """The easy keys' query was right and its passage showed the gold: the judge's other query
    is not needed (leave-one-out: the answer writer's gold on the original inputs passes too),
    so only the answer writer's correction is kept; the hard keys need both."""

    def other_query(key: str, gold: str, index: int) -> list[dict[str, Any]]:
        return [critique("query", f"what is the color of {key}", "ask it whole")]

    job = make_job(example_dir, loop={"augment_rollouts": 0})
    engine = ScriptedEngine(answer_wrong=lambda adapter: adapter is None)
    run = harness(job, engine=engine, judge=ScriptedJudge(other_query))
    run.run()

    checked = run.output(1, Stage.verify, VerifyOut)
    members = [c for c in checked.candidates if c.kind == "joint"]
    keys = {c.trace_id: c.proposed_output.split()[-1] for c in members if c.component == "query"}
    assert {is_hard(k) for k in keys.values()} == {True, False}, "both kinds of keys failed"
    for candidate in members:
        hard = is_hard(keys[candidate.trace_id])
        assert candidate.needed == (hard or candidate.component == "answer"), candidate
        assert candidate.accepted == candidate.needed
    # the easy keys' gold single passed on its own, the hard keys' could not be proposed
    gold = [c for c in checked.candidates if c.kind == "single" and c.source == "gold"]
    assert gold and all(c.accepted and not is_hard(keys[c.trace_id]) for c in gold)
    rows = run.output(1, Stage.synthesize, SynthesizeOut).buffer.sft["query"]
    corrected = {r.completion.split()[-1] for r in rows if r.source == "correction"}
    assert corrected == {k for k in keys.values() if is_hard(k)}


def test_augmentation_fills_up_to_n_from_verified_corrections(
    example_dir: Path, harness: Callable[..., Harness]
) -> None:
    """Few augmentation rollouts pass (the answer writer answers ``wrong`` unless a sampled
    seed names a colour); their failed traces' verified corrections fill the buffer."""
    loop = {"rollout_batch": 2, "samples_per_component": 8, "augment_rollouts": 2}
    engine = ScriptedEngine(query_ok=lambda key, adapter: False, answer_wrong=lambda a: True)
    run = harness(make_job(example_dir, judge=False, loop=loop), engine=engine)
    run.run()

    out = run.output(1, Stage.synthesize, SynthesizeOut)
    assert out.augment_corrections > 0 and out.augmented >= out.augment_corrections
    assert out.details()["augment_corrections"] == out.augment_corrections
    for component in ("query", "answer"):
        rows = out.buffer.sft[component]
        assert len(rows) >= 8, (component, len(rows))
        fresh = [r for r in rows if r.source.startswith("augment-")]
        assert len(fresh) > len([r for r in rows if r.source == "augment"])
    train_keys = set(split_keys(example_dir, "train"))
    for row in out.buffer.sft["query"]:  # no gold the query writer did not see
        key = question_key(row.messages[-1]["content"])
        assert key in train_keys and not word_in(FACTS[key], row.completion)
    for row in out.buffer.sft["answer"]:
        if row.source == "augment-correction":
            key = question_key(row.messages[-1]["content"])
            assert row.completion == FACTS[key]
            assert word_in(FACTS[key], row.messages[-1]["content"])
    assert any("verified corrections)" in m for m in run.messages())


@pytest.mark.parametrize("n", [6, 12])
def test_augmentation_adds_rows_only_to_components_short_of_n_and_at_most_what_they_lack(
    example_dir: Path, harness: Callable[..., Harness], n: int
) -> None:
    """The query writer is right and the answer writer wrong (unless a sampled seed names a
    colour): verify's gold corrections give the answer writer a row per failed rollout and
    more (9 of 8 rollouts, joints included), the query writer none, so augmentation runs for
    the query writer. The answer writer takes augmentation rows only while it is short of
    ``n`` (12: the 3 it lacks), none at 6; before, every round added rows to both whatever
    their counts (measured with the old code: 16 rows at n = 6)."""
    loop = {"rollout_batch": 8, "samples_per_component": n, "augment_rollouts": 2}
    engine = ScriptedEngine(answer_wrong=lambda adapter: True)
    run = harness(make_job(example_dir, judge=False, loop=loop), engine=engine)
    run.run()

    out = run.output(1, Stage.synthesize, SynthesizeOut)
    answer = out.buffer.sft["answer"]
    verified = [r for r in answer if r.source == "correction"]
    assert len(verified) >= 8  # every failed rollout's gold answer (and joints'), from verify
    fresh = [r for r in answer if r.source.startswith("augment")]
    assert len(fresh) == max(0, n - len(verified))  # n = 12: what it lacked, all found
    assert len(out.buffer.dpo.get("answer", [])) <= len(verified) + len(fresh)
    assert any("rows from augmentation" in m for m in run.messages())


LEAK = "so it is"


def rewrite_by_key(fields: dict[str, str]) -> dict[str, str]:
    """The judge's paraphrases, by the key asked about: a reworded question (kept), one that
    states the gold colour by chance (dropped), one that adds a number (dropped)."""
    question = fields["question"]
    key = question_key(question)
    kind = zlib.crc32(key.encode()) % 3
    if kind == 1:
        return {"question": f"{question} {LEAK} {FACTS[key]}"}
    if kind == 2:
        return {"question": f"in 2 words, {question}"}
    return {"question": f"please, {question}"}


def test_paraphrased_train_inputs_keep_their_gold_and_never_show_an_unseen_one(
    example_dir: Path, harness: Callable[..., Harness]
) -> None:
    """``loop.paraphrases``: the judge rewrites each train question once per epoch; the kept
    rewrites roll out beside the train split in every augmentation round, scored against their
    example's gold, and their passing spans become ``augment-paraphrase`` rows. A rewrite that
    shows the gold colour (the judge never saw it: chance) or adds a number is dropped."""
    loop = {
        "rollout_batch": 4,
        "samples_per_component": 60,
        "augment_rollouts": 2,
        "paraphrases": 1,
    }
    judge = ScriptedJudge(lambda key, gold, i: [], paraphrase=rewrite_by_key)
    run = harness(make_job(example_dir, loop=loop), judge=judge)
    run.run()

    train_keys = split_keys(example_dir, "train")
    kinds = [zlib.crc32(k.encode()) % 3 for k in train_keys]
    assert 0 < kinds.count(0) < len(train_keys)  # the split has each kind
    out = run.output(1, Stage.synthesize, SynthesizeOut)
    assert out.paraphrases == kinds.count(0) == out.details()["paraphrases"]
    # asked once per epoch (not per round), one request per train example, gold never shown
    assert len(judge.paraphrase_requests) == len(train_keys)
    for request in judge.paraphrase_requests:
        key = question_key(request.messages[-1]["content"])
        assert not word_in(FACTS[key], json.dumps(request.messages))
    assert out.judge_calls == len(train_keys)  # the stage's judge calls count them (budget)
    message = next(m for m in run.messages() if "paraphrases of" in m)
    assert f"{kinds.count(0)} paraphrases of {len(train_keys)} train examples kept" in message
    assert f"{kinds.count(1)} it shows a gold answer the original does not" in message
    assert f"{kinds.count(2)} its numbers changed" in message

    # the kept rewrites were rolled out with the train split in both rounds, and taught rows
    batch = len(train_keys) + out.paraphrases
    rounds = [
        c for c in run.calls[(1, "synthesize")] if c.component == "query" and len(c.keys) == batch
    ]
    assert len(rounds) == 2 and all(c.temperature > 0 for c in rounds)
    rows = [r for rows in out.buffer.sft.values() for r in rows]
    taught = [r for r in rows if r.source == "augment-paraphrase"]
    assert taught and all(
        "please, what is the color of" in r.messages[-1]["content"] for r in taught
    )
    for row in rows:  # no dropped rewrite reached a row, and no query row shows its gold
        text = row.messages[-1]["content"]
        assert LEAK not in text and "in 2 words" not in text
        if row.messages[-1]["content"].startswith("Write a search query"):
            assert not word_in(FACTS[question_key(text)], text)


# -- 4. the best epoch ------------------------------------------------------------------------


def scripted_val_sequence(key: str, adapter: str | None) -> bool:
    """Base: the hard keys fail. Epoch-1 adapters: all right; epoch 2: all wrong; epoch 3: all
    right again (val 1.0, 0.0, 1.0)."""
    epoch = adapter_epoch(adapter)
    if epoch is None:
        return not is_hard(key)
    return epoch != 2


def test_best_epoch_is_the_last_one_at_least_as_good_as_the_best(
    example_dir: Path, harness: Callable[..., Harness]
) -> None:
    assert any(is_hard(k) for k in split_keys(example_dir, "val"))  # the base is below 1.0
    job = make_job(example_dir, loop={"epochs": 3})
    run = harness(
        job, engine=ScriptedEngine(query_ok=scripted_val_sequence), judge=ScriptedJudge(fix_query)
    )
    report = run.run()

    assert report.base_val_score is not None and report.base_val_score < 1.0
    assert [e.val_score for e in report.epochs] == [1.0, 0.0, 1.0]
    assert [e.kept for e in report.epochs] == [True, False, True]  # a tie is kept
    assert report.best_epoch == 3
    assert report.best_val_score == 1.0
    assert {c: adapter_epoch(k) for c, k in report.adapters.items()} == {"query": 3, "answer": 3}
    assert any("epoch 2: val 0.000, not kept" in m for m in run.messages())

    def adapters_used(epoch: int, stage: Stage) -> set[tuple[str, int | None]]:
        traces = run.output(epoch, stage, RolloutOut).traces
        return {
            (s.component, adapter_epoch(s.adapter))
            for t in traces
            for s in t.spans
            if s.kind == "llm"
        }

    assert adapters_used(1, Stage.rollout) == {("query", None), ("answer", None)}
    # epoch 2 was not kept: epoch 3 rolls out with epoch 1's adapters
    for epoch in (2, 3):
        assert adapters_used(epoch, Stage.rollout) == {("query", 1), ("answer", 1)}
    assert {adapter_epoch(c.adapter) for c in run.calls[(3, "rollout")]} == {1}
    # the final test evaluates the base and then the best epoch's adapters
    test_adapters = [adapter_epoch(c.adapter) for c in run.calls[(4, "test")]]
    assert set(test_adapters) == {None, 3}
    assert report.test_score == 1.0 and report.base_test_score is not None
    assert report.base_test_score < 1.0


# -- 5. edge outcomes -------------------------------------------------------------------------


def test_a_component_without_samples_is_not_trained(
    example_dir: Path, harness: Callable[..., Harness]
) -> None:
    def blame_both_fix_answer(key: str, gold: str, index: int) -> list[dict[str, Any]]:
        return [
            critique("query", None, f"{MARKER} wrong query, no fix offered"),
            critique("answer", gold, f"{MARKER} should have said {gold}", blame=0.5),
        ]

    job = make_job(example_dir, loop={"resample_candidates": 0, "augment_rollouts": 0})
    run = harness(
        job,
        engine=ScriptedEngine(query_ok=lambda key, adapter: False),  # no trace ever passes
        judge=ScriptedJudge(blame_both_fix_answer),
    )
    report = run.run()

    assert run.output(1, Stage.rollout, RolloutOut).score == 0.0
    counts = run.output(1, Stage.synthesize, SynthesizeOut).counts
    assert "query" not in counts and counts["answer"].samples > 0
    assert [c.component for c in run.trainer.calls] == ["answer"]
    events = run.store.events(run.job_id, limit=1000)
    skipped = [e for e in events if e.message == "epoch 1: query not trained: no samples"]
    assert len(skipped) == 1 and skipped[0].level == "warning"
    [record] = report.epochs
    by_name = {c.component: c for c in record.components}
    assert not by_name["query"].trained and by_name["query"].skipped_reason == "no samples"
    assert by_name["query"].adapter is None and by_name["query"].samples == 0
    assert by_name["answer"].trained and by_name["answer"].adapter is not None


def test_the_cached_engines_step_aside_while_the_trainer_runs(
    example_dir: Path, harness: Callable[..., Harness], monkeypatch: pytest.MonkeyPatch
) -> None:
    import cotune.engines

    # Stands for the process's cached engine of the base model (a real one: test_engines.py).
    cached = ScriptedEngine()
    monkeypatch.setitem(cotune.engines._ENGINES, ("vllm", "cached-base"), cached)
    released_while_training: list[bool] = []

    class WatchingTrainer(FakeTrainer):
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            released_while_training.append(cached.released)
            return super().__call__(*args, **kwargs)

    run = harness(make_job(example_dir), judge=ScriptedJudge(fix_query), trainer=WatchingTrainer())
    run.run()

    assert released_while_training and all(released_while_training)
    assert not cached.released  # back before the epoch's evaluation
    trained = run.output(1, Stage.train, TrainOut)
    assert trained.release_seconds >= 0 and trained.reacquire_seconds >= 0
    assert any(m.startswith("epoch 1: engines stepped aside in") for m in run.messages())


def test_no_epoch_kept_means_the_base_system(
    example_dir: Path, harness: Callable[..., Harness]
) -> None:
    job = make_job(example_dir, loop={"epochs": 2})
    engine = ScriptedEngine(answer_wrong=lambda adapter: adapter is not None)
    run = harness(job, engine=engine, judge=ScriptedJudge(fix_query))
    report = run.run()

    assert report.base_val_score is not None and report.base_val_score > 0.0
    assert [e.kept for e in report.epochs] == [False, False]
    assert [e.val_score for e in report.epochs] == [0.0, 0.0]
    assert all(c.trained for e in report.epochs for c in e.components)  # trained, not kept
    assert report.best_epoch is None
    assert report.adapters == {}
    assert report.best_val_score == report.base_val_score
    events = run.store.events(run.job_id, limit=1000)
    base_event = [e for e in events if "the result is the base system" in e.message]
    assert len(base_event) == 1 and base_event[0].level == "warning"
    # epoch 2 rolled out the base system again, and the final test used no adapter at all
    spans = [s for t in run.output(2, Stage.rollout, RolloutOut).traces for s in t.spans]
    assert all(s.adapter is None for s in spans)
    final = run.output(3, Stage.test, TestOut)
    assert final.adapters == {}
    assert all(s.adapter is None for t in final.traces for s in t.spans)
    assert run.calls[(3, "test")] and all(c.adapter is None for c in run.calls[(3, "test")])
    assert report.test_score == report.base_test_score


def budget_job(folder: Path, calls: int) -> JobSpec:
    return make_job(folder, loop={"epochs": 3}, budget={"max_judge_calls": calls})


def budget_engine() -> ScriptedEngine:
    return ScriptedEngine(query_ok=lambda key, adapter: adapter is not None or not is_hard(key))


def test_the_loop_stops_when_the_judge_budget_runs_out(
    example_dir: Path, harness: Callable[..., Harness]
) -> None:
    run = harness(
        budget_job(example_dir, 4), engine=budget_engine(), judge=ScriptedJudge(fix_query)
    )
    report = run.run()

    failed = run.output(1, Stage.credit, CreditOut).failed
    assert failed > 4, "more failed traces than the budget allows judging"
    assert run.judge is not None and len(run.judge.requests) == 4
    assert sum(s.judge_calls for s in report.stages) == 4
    assert report.epochs[0].judge_failures == failed - 4  # the rest: "budget exhausted"
    assert report.stop_reason is not None and "max_judge_calls 4" in report.stop_reason
    assert any(
        "budget exhausted before epoch 2" in e.message and e.level == "warning"
        for e in run.store.events(run.job_id, limit=1000)
    )
    assert [e.epoch for e in report.epochs] == [1]
    assert run.store.stage(run.job_id, 2, Stage.rollout) is None  # nothing of epoch 2 ran
    # the best epoch so far is the result, and the final test used it
    assert report.best_epoch == 1 and report.epochs[0].kept
    assert {c: adapter_epoch(k) for c, k in report.adapters.items()} == {"query": 1, "answer": 1}
    assert {adapter_epoch(c.adapter) for c in run.calls[(4, "test")]} == {None, 1}


def test_a_resumed_job_keeps_the_epochs_it_paid_for(
    example_dir: Path, harness: Callable[..., Harness]
) -> None:
    job = budget_job(example_dir, 4)
    whole = harness(job, engine=budget_engine(), judge=ScriptedJudge(fix_query)).run()
    assert whole.best_epoch == 1

    stepped = harness(job, engine=budget_engine(), judge=ScriptedJudge(fix_query))
    while True:
        try:
            report = run_job(stepped.context(stage_limit=1))
            break
        except StagePause:
            continue
    assert report.best_epoch == whole.best_epoch
    assert report.stop_reason == whole.stop_reason
    assert report.adapters.keys() == whole.adapters.keys()


def test_a_job_without_test_data_still_returns_its_best_adapters(
    example_dir: Path, harness: Callable[..., Harness]
) -> None:
    job = make_job(example_dir, test=False)
    run = harness(job, engine=budget_engine(), judge=ScriptedJudge(fix_query))
    report = run.run()
    assert report.best_epoch == 1 and report.test_score is None
    assert {c: adapter_epoch(k) for c, k in report.adapters.items()} == {"query": 1, "answer": 1}


def test_an_epoch_that_trained_nothing_is_not_the_best_epoch(
    example_dir: Path, harness: Callable[..., Harness]
) -> None:
    job = make_job(example_dir, loop={"resample_candidates": 0, "augment_rollouts": 0})
    run = harness(
        job,
        engine=ScriptedEngine(query_ok=lambda key, adapter: False),
        judge=ScriptedJudge(lambda key, gold, index: []),
    )
    report = run.run()
    assert run.trainer.calls == []
    assert report.adapters == {}
    assert report.best_epoch is None


# -- 6. resume --------------------------------------------------------------------------------


def comparable(report: JobReport, job_id: str) -> dict[str, Any]:
    """The report without what differs between two runs of one job: ids and seconds."""
    data = json.loads(report.model_dump_json().replace(job_id, "JOB"))
    for stage in data["stages"]:
        stage.pop("seconds")
    return data


def test_a_crashed_job_resumes_without_redoing_finished_stages(
    example_dir: Path, harness: Callable[..., Harness], tmp_path: Path
) -> None:
    job = make_job(example_dir, loop={"epochs": 3, "augment_rollouts": 1})

    def start(**kwargs: Any) -> Harness:
        return harness(
            job,
            engine=ScriptedEngine(query_ok=scripted_val_sequence),
            judge=ScriptedJudge(fix_query),
            **kwargs,
        )

    whole = start()
    uninterrupted = whole.run()

    # The trainer crashes on its third call: epoch 2's train stage, after epoch 1 trained two.
    crashed = start(trainer=FakeTrainer(crash_on_call=3), root=tmp_path / "crash")
    with pytest.raises(TrainerCrash):
        crashed.run()
    done = {(s.epoch, s.stage.value) for s in crashed.store.stage_states(crashed.job_id)}
    assert (2, "synthesize") in done and (2, "evaluate") not in done
    assert crashed.store.stage_done(crashed.job_id, 2, Stage.train) is None

    # A fresh context (new doubles) on the same store and artifacts.
    resumed = start(root=tmp_path / "crash", job_id=crashed.job_id)
    report = resumed.run()

    states = {(s.epoch, s.stage.value): s for s in resumed.store.stage_states(resumed.job_id)}
    assert {k for k, s in states.items() if s.attempts == 2} == {(2, "train")}
    assert all(s.status == "done" for s in states.values())
    # Only the missing stages ran: epoch 2 from train on, epoch 3, the test.
    missing = {(2, "train"), (2, "evaluate"), (4, "test")}
    missing |= {(3, s.value) for s in EPOCH_STAGES}
    assert set(resumed.calls) == missing
    assert len(resumed.engine.calls) == sum(len(whole.calls[k]) for k in missing)
    assert resumed.engine.stats.requests == sum(
        len(c.keys) for k in missing for c in whole.calls[k]
    )
    assert resumed.judge is not None
    assert len(resumed.judge.requests) == sum(whole.judge_requests[k] for k in missing)
    assert [c.seed for c in resumed.trainer.calls] == [2, 2, 3, 3]  # seed = loop.seed + epoch
    # ... and trained on what the uninterrupted run trained on
    again = [(c.component, c.seed, c.rows, c.pairs) for c in resumed.trainer.calls]
    assert again == [(c.component, c.seed, c.rows, c.pairs) for c in whole.trainer.calls[2:]]

    assert comparable(report, crashed.job_id) == comparable(uninterrupted, whole.job_id)


def test_a_finished_job_runs_nothing_again(
    example_dir: Path, harness: Callable[..., Harness], tmp_path: Path
) -> None:
    job = make_job(example_dir, loop={"epochs": 2})
    first = harness(job, judge=ScriptedJudge(fix_query), root=tmp_path / "same")
    report = first.run()
    candidates = first.store.candidates(first.job_id)
    assert candidates
    again = harness(
        job, judge=ScriptedJudge(fix_query), root=tmp_path / "same", job_id=first.job_id
    )
    assert again.run() == report
    assert again.engine.calls == [] and again.trainer.calls == []
    assert again.judge is not None and again.judge.requests == []
    assert again.store.candidates(first.job_id) == candidates  # written once
    assert all(s.attempts == 1 for s in again.store.stage_states(first.job_id))


# -- 7. the quote -----------------------------------------------------------------------------


def test_quote_prices_every_stage(example_dir: Path) -> None:
    from cotune.quote import format_quote, quote_job

    job = make_job(example_dir, loop={"epochs": 2, "judge_samples": 2})
    quote = quote_job(job)
    assert quote["examples"] == dict(zip(("train", "val", "test"), SPLITS, strict=True))
    assert all(v > 0 for v in quote["total"].values()), quote["total"]
    assert set(quote["per_stage"]) == {s.value for s in Stage}
    table = format_quote(quote)
    for stage in Stage:
        assert re.search(rf"^\| {stage.value} \| (job|epoch) \|", table, re.MULTILINE), stage
    assert re.search(r"^\| total \| job \| [1-9]", table, re.MULTILINE)

    no_judge = quote_job(make_job(example_dir, judge=False))
    assert no_judge["total"]["judge_calls"] == 0 and no_judge["total"]["engine_requests"] > 0


def test_quote_prices_judge_scoring(tmp_path: Path, model_dir: Path) -> None:
    from cotune.quote import quote_job

    judged = make_job(
        write_judged_tiny_example(tmp_path / "judged", model_path=str(model_dir), splits=SPLITS),
        loop={"judge_samples": 2},
    )
    quote = quote_job(judged, n_train=24, n_val=12, n_test=12)
    per = quote["per_stage"]
    # each scored output: K = 2 samples, each with room for one repair
    assert per["baseline"]["judge_calls"] == 12 * 2 * 2
    assert per["test"]["judge_calls"] == 2 * 12 * 2 * 2
    assert per["rollout"]["judge_calls"] == 12 * 2 * 2
    assert per["verify"]["judge_calls"] > 0 and per["synthesize"]["judge_calls"] > 0
    # the budget caps learning, not measuring
    capped = judged.model_copy(
        update={"budget": judged.budget.model_copy(update={"max_judge_calls": 10})}
    )
    measuring = per["baseline"]["judge_calls"] + per["test"]["judge_calls"]
    measuring += judged.loop.epochs * per["evaluate"]["judge_calls"]
    total = quote_job(capped, n_train=24, n_val=12, n_test=12)["total"]
    assert total["judge_calls"] == measuring + 10


def test_the_loop_stops_when_the_token_budget_runs_out(
    example_dir: Path, harness: Callable[..., Harness]
) -> None:
    job = make_job(example_dir, loop={"epochs": 3}, budget={"max_generated_tokens": 1})
    run = harness(job, judge=ScriptedJudge(fix_query))
    report = run.run()
    baseline = next(s for s in report.stages if s.stage == Stage.baseline)
    assert baseline.engine_calls == len(run.calls[(0, "baseline")]) > 0
    assert baseline.completion_tokens > 0
    assert report.stop_reason is not None and "max_generated_tokens 1" in report.stop_reason
    assert [e.epoch for e in report.epochs] == []


# -- 8. metric judge: no gold anywhere --------------------------------------------------------


def rarely_easy(key: str) -> bool:
    """The few keys the base query writer gets right (about one in five)."""
    import zlib

    return zlib.crc32(key.encode()) % 5 == 0


def right_colour(key: str, output: str) -> float:
    """The scripted judge's rule: it knows the world, the data holds no gold."""
    return float(output == FACTS[key])


def judged_run(folder: Path, harness: Callable[..., Harness], **loop: Any) -> Harness:
    """The judge-scored tiny-kb job: the base query writer is rarely right; an adapter trained
    on verified corrections always is. The scripted judge scores by ``right_colour``."""
    trainer = FakeTrainer()

    def learned(adapter: str | None) -> bool:
        epoch = adapter_epoch(adapter)
        return any(
            call.component == "query"
            and call.seed == epoch
            and any(r.source == "correction" for r in call.rows)
            for call in trainer.calls
        )

    engine = ScriptedEngine(query_ok=lambda key, adapter: learned(adapter) or rarely_easy(key))
    judge = ScriptedJudge(fix_query, score=right_colour)
    return harness(make_job(folder, loop=loop), engine=engine, judge=judge, trainer=trainer)


def test_a_judge_scored_job_without_gold_learns_and_keeps_an_epoch(
    tmp_path: Path, model_dir: Path, harness: Callable[..., Harness]
) -> None:
    folder = write_judged_tiny_example(
        tmp_path / "judged", model_path=str(model_dir), splits=SPLITS
    )
    run = judged_run(folder, harness)
    judge, trainer = run.judge, run.trainer
    assert judge is not None
    assert run.job.system.metric == "judge" and run.job.system.pass_threshold == 0.5
    assert all(e.expected is None for s in ("train", "val", "test") for e in run.context().split(s))
    report = run.run()

    # the base rarely meets the rubric; the trained epoch meets it on every val example
    assert report.base_val_score is not None and report.base_val_score < 0.5
    assert [e.val_score for e in report.epochs] == [1.0]
    assert report.epochs[0].kept and report.best_epoch == 1
    assert report.test_score == 1.0 and report.base_test_score is not None
    assert report.base_test_score < 1.0

    # every trace was scored by the judge, never against gold
    rollout = run.output(1, Stage.rollout, RolloutOut)
    assert all(t.expected is None and t.score_samples is not None for t in rollout.traces)
    assert all(t.score_reason and "scripted score" in t.score_reason for t in rollout.traces)
    # corrections were verified by the judge scoring the replayed output higher
    accepted = run.store.candidates(run.job_id, accepted=True)
    assert accepted and {c.source for c in accepted} == {"judge"}
    assert all(c.original_score == 0.0 and c.replay_scores == [1.0] for c in accepted)
    [query] = [c for c in trainer.calls if c.component == "query"]
    assert any(r.source == "correction" for r in query.rows)
    # the scoring requests were spent by the stages that scored, and counted as judge calls
    spent = {s.stage: s.judge_calls for s in report.stages}
    for stage in (Stage.baseline, Stage.rollout, Stage.verify, Stage.evaluate, Stage.test):
        assert spent[stage] > 0, stage
    assert sum(spent.values()) == len(judge.requests)
    # the credit judge saw why each failed output scored low
    credit = [r for r in judge.requests if r not in judge.score_requests]
    assert credit and all("Why it got that score:" in r.messages[-1]["content"] for r in credit)


def test_paraphrases_share_the_stages_judge_budget_with_its_scoring(
    tmp_path: Path, model_dir: Path, harness: Callable[..., Harness]
) -> None:
    """With ``metric: judge`` the paraphrases get what the budget leaves after the worst case of
    the augmentation rounds' scoring, and what they spend comes off the scorer's cap: the
    stages never spend more than ``max_judge_calls`` (before, they could spend it twice)."""
    folder = write_judged_tiny_example(
        tmp_path / "judged", model_path=str(model_dir), splits=SPLITS
    )

    def run_with(budget: int | None) -> tuple[Harness, JobReport]:
        judge = ScriptedJudge(
            fix_query, score=right_colour, paraphrase=lambda f: {"question": "so, " + f["question"]}
        )
        loop = {"paraphrases": 2, "samples_per_component": 100}
        job = make_job(folder, loop=loop, budget={"max_judge_calls": budget})
        run = harness(job, engine=ScriptedEngine(), judge=judge)
        return run, run.run()

    free, report = run_with(None)
    earlier = {Stage.baseline, Stage.rollout, Stage.credit, Stage.verify}  # before synthesize
    before = sum(s.judge_calls for s in report.stages if s.stage in earlier)
    rounds, n_train = free.job.loop.augment_rollouts, SPLITS[0]
    reserve = 2 * free.job.loop.judge_samples * n_train * rounds
    assert free.judge is not None and len(free.judge.paraphrase_requests) == 2 * n_train

    run, report = run_with(before + reserve + 5)  # room for 5 paraphrases
    assert run.judge is not None and len(run.judge.paraphrase_requests) == 5
    synthesize = run.output(1, Stage.synthesize, SynthesizeOut)
    assert before + synthesize.judge_calls <= before + reserve + 5
    # every judge request of the stage (paraphrases and scoring) is counted in it
    assert synthesize.judge_calls == run.judge_requests[(1, "synthesize")] > 5
    assert any(f"{2 * n_train - 5} not asked: over the judge budget" in m for m in run.messages())


def test_a_job_run_one_stage_per_call_judges_no_output_twice(
    tmp_path: Path, model_dir: Path, harness: Callable[..., Harness]
) -> None:
    """How workers drive a job (a new context per stage): the judge's scores stored with the
    finished stages seed each new context's cache, so the whole job asks the judge exactly
    what one uninterrupted run asks."""
    folder = write_judged_tiny_example(
        tmp_path / "judged", model_path=str(model_dir), splits=SPLITS
    )
    whole = judged_run(folder, harness, epochs=2)
    expected = whole.run()
    assert whole.judge is not None and whole.judge.score_requests

    stepped = judged_run(folder, harness, epochs=2)
    while True:
        try:
            report = run_job(stepped.context(stage_limit=1))
            break
        except StagePause:
            continue
    assert stepped.judge is not None
    assert len(stepped.judge.score_requests) == len(whole.judge.score_requests)
    assert report.best_val_score == expected.best_val_score
    assert report.test_score == expected.test_score


# -- 9. human feedback as data: rated runs as fixed traces --------------------------------------

COMMENT = "FEEDBACK-COMMENT-5d1e: it never found the thing's colour"


def rated_lines(
    job: JobSpec, keys: list[str], *, right: bool, feedback: dict[str, Any], spans: bool
) -> list[dict[str, Any]]:
    """Feedback rows for ``keys``: with spans, lines of ``cotune eval --out``'s traces.jsonl
    (a run whose query writer is always ``right``, or never) plus ``feedback``; without, the
    inputs and the output such a run gives."""
    from cotune.data import Example

    engine = ScriptedEngine(query_ok=lambda key, adapter: right)
    runtime = Runtime(job.system, {"tiny": engine}, ToolContext.for_system(job.system))
    examples = [
        Example(id=f"fb-{k}", inputs={"question": f"what is the color of {k}?"}) for k in keys
    ]
    lines = []
    for trace in runtime.run(examples):
        line = json.loads(trace.model_dump_json())
        line["feedback"] = dict(feedback)
        if "corrected_output" in feedback:  # a correction is the right colour of its key
            line["feedback"]["corrected_output"] = FACTS[question_key(trace.inputs["question"])]
        if not spans:
            line = {k: line[k] for k in ("inputs", "output", "feedback")}
        line["id"] = trace.example_id
        lines.append(line)
    return lines


def feedback_job(folder: Path, *, judge: bool) -> tuple[JobSpec, dict[str, list[str]]]:
    """A job on rated runs of train-split questions (no train split): rated-good rows with and
    without spans, rated-bad rows with comments (with and without spans), and under metric
    judge one rated-bad row with only a corrected_output; under exact_match every row has one
    (its gold). Returns the job and its keys by kind of row."""
    keys = split_keys(folder, "train")
    kinds = {
        "good": keys[0:3],
        "good_bare": keys[3:5],
        "bad": keys[5:9],
        "bad_bare": keys[9:11],
        "corrected": keys[11:12],
    }
    data: dict[str, Any] = {"val": "val.jsonl", "test": "test.jsonl", "feedback": "fb.jsonl"}
    spec: dict[str, Any] = {
        "system": "system.yaml",
        "data": data,
        "loop": {"epochs": 1, "samples_per_component": 8, "judge_samples": 1, "seed": 0},
        "train": {"lora_r": 4, "lora_alpha": 8},
    }
    if judge:
        spec["judge"] = {"model": "tiny"}
    job = parse_job(spec, base_dir=folder)
    gold = {} if judge else {"corrected_output": ""}
    up, down = {"rating": "up", **gold}, {"rating": 0.0, "comment": COMMENT, **gold}
    lines = [
        *rated_lines(job, kinds["good"], right=True, feedback=up, spans=True),
        *rated_lines(
            job, kinds["good_bare"], right=True, feedback={**up, "rating": 0.9}, spans=False
        ),
        *rated_lines(job, kinds["bad"], right=False, feedback=down, spans=True),
        *rated_lines(job, kinds["bad_bare"], right=False, feedback=down, spans=False),
        *rated_lines(
            job,
            kinds["corrected"],
            right=False,
            feedback={"rating": "down", "corrected_output": ""},
            spans=True,
        ),
    ]
    (folder / "fb.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return job, kinds


def test_rated_runs_make_bootstrap_rows_and_verified_corrections(
    tmp_path: Path, model_dir: Path, harness: Callable[..., Harness]
) -> None:
    folder = write_judged_tiny_example(tmp_path / "fb", model_path=str(model_dir), splits=SPLITS)
    job, kinds = feedback_job(folder, judge=True)
    trainer = FakeTrainer()

    def learned(adapter: str | None) -> bool:
        epoch = adapter_epoch(adapter)
        return any(
            c.component == "query"
            and c.seed == epoch
            and any(r.source == "correction" for r in c.rows)
            for c in trainer.calls
        )

    engine = ScriptedEngine(query_ok=lambda key, adapter: learned(adapter) or rarely_easy(key))
    judge = ScriptedJudge(fix_query, score=right_colour)
    run = harness(job, engine=engine, judge=judge, trainer=trainer)
    assert job.data.train is None and run.context().split("train") == []
    report = run.run()

    # every row is a fixed trace: the rated output, scored by its rating
    rollout = run.output(1, Stage.rollout, RolloutOut)
    rated = {t.example_id: t for t in rollout.traces}
    assert rollout.feedback == len(rollout.traces) == sum(len(k) for k in kinds.values())
    good = kinds["good"] + kinds["good_bare"]
    for key in good:
        assert rated[f"fb-{key}"].passed and rated[f"fb-{key}"].output == FACTS[key]
    for key in kinds["bad"] + kinds["bad_bare"] + kinds["corrected"]:
        trace = rated[f"fb-{key}"]
        assert trace.score == 0.0 and not trace.passed and trace.output != FACTS[key]
    for key in kinds["good_bare"] + kinds["bad_bare"]:  # reconstructed, the output pinned
        trace = rated[f"fb-{key}"]
        assert [s.reconstructed for s in trace.spans] == [True, True, False]
    assert rated[f"fb-{kinds['corrected'][0]}"].expected == [FACTS[kinds["corrected"][0]]]

    # the credit judge read each comment as system-level feedback
    credit = [r.messages[-1]["content"] for r in judge.requests if r not in judge.score_requests]
    commented = [m for m in credit if f"Their comment on it: {COMMENT}" in m]
    assert len(commented) == len(kinds["bad"]) + len(kinds["bad_bare"])

    # each original was judged the way its replays were (0.0), the replays higher (1.0)
    verify_out = run.output(1, Stage.verify, VerifyOut)
    assert {t.example_id for t in verify_out.originals} == {
        f"fb-{k}" for k in kinds["bad"] + kinds["bad_bare"] + kinds["corrected"]
    }
    assert all(t.score_samples == [0.0] for t in verify_out.originals)
    accepted = run.store.candidates(run.job_id, accepted=True)
    assert {c.example_id for c in accepted} == {t.example_id for t in verify_out.originals}
    assert all(c.original_score == 0.0 and c.replay_scores == [1.0] for c in accepted)
    corrected = kinds["corrected"][0]
    reference = [
        r for r in judge.score_requests if f"color of {corrected}?" in r.messages[-1]["content"]
    ]
    assert reference and all("A reference answer" in r.messages[-1]["content"] for r in reference)

    # rated-good rows bootstrap (never from a reconstructed span), corrections train the query
    buffer = run.output(1, Stage.synthesize, SynthesizeOut).buffer
    sources = {r.source for r in buffer.sft["query"]}
    assert {"bootstrap", "correction"} <= sources
    booted = {
        question_key(r.messages[-1]["content"])
        for r in buffer.sft["query"]
        if r.source == "bootstrap"
    }
    assert booted == set(kinds["good"])
    answers = {
        question_key(r.messages[-1]["content"]): r.completion
        for r in buffer.sft["answer"]
        if r.source == "bootstrap"
    }
    assert set(answers) == set(good) and all(answers[k] == FACTS[k] for k in good)
    # nothing of val or test, and no comment, reached a training row
    rows = [r for rows in buffer.sft.values() for r in rows]
    assert all(COMMENT not in json.dumps(r.messages) + r.completion for r in rows)
    held_out = set(split_keys(folder, "val")) | set(split_keys(folder, "test"))
    assert not {question_key(r.messages[-1]["content"]) for r in rows} & held_out

    assert report.epochs[0].kept and report.best_epoch == 1
    assert report.base_val_score is not None and report.base_val_score < 0.5
    assert [e.val_score for e in report.epochs] == [1.0]
    verify_record = next(s for s in report.stages if s.stage == Stage.verify)
    assert verify_record.judge_calls > 0  # scoring the originals and replays is paid for


def test_under_a_gold_metric_corrected_outputs_are_the_gold_replays_are_scored_against(
    tmp_path: Path, model_dir: Path, harness: Callable[..., Harness]
) -> None:
    folder = write_tiny_example(tmp_path / "fb", splits=SPLITS, model_path=str(model_dir))
    job, kinds = feedback_job(folder, judge=False)
    run = harness(job)
    run.run()
    accepted = run.store.candidates(run.job_id, accepted=True)
    bad = {f"fb-{k}" for k in kinds["bad"] + kinds["bad_bare"] + kinds["corrected"]}
    assert accepted and {c.example_id for c in accepted} <= bad
    assert all(c.original_score == 0.0 and c.replay_scores == [1.0] for c in accepted)
    assert {c.source for c in accepted} <= {"resample", "gold"}
    buffer = run.output(1, Stage.synthesize, SynthesizeOut).buffer
    assert any(r.source == "correction" for rows in buffer.sft.values() for r in rows)


def test_a_feedback_row_may_not_take_a_val_examples_id(
    tmp_path: Path, model_dir: Path, harness: Callable[..., Harness]
) -> None:
    from cotune.errors import DataError

    folder = write_judged_tiny_example(tmp_path / "fb", model_path=str(model_dir), splits=SPLITS)
    job, _ = feedback_job(folder, judge=True)
    lines = (folder / "fb.jsonl").read_text().splitlines()
    taken = sorted(split_ids(folder, "val"))[0]
    lines[1] = json.dumps({**json.loads(lines[1]), "id": taken})
    (folder / "fb.jsonl").write_text("\n".join(lines) + "\n")
    run = harness(job, judge=ScriptedJudge(fix_query, score=right_colour))
    with pytest.raises(DataError) as info:
        run.run()
    assert info.value.param == "line 2.id" and "val or test" in info.value.message
    assert run.judge is not None and run.judge.requests == [] and run.engine.calls == []


def test_a_feedback_job_run_one_stage_per_call_judges_no_output_twice(
    tmp_path: Path, model_dir: Path, harness: Callable[..., Harness]
) -> None:
    """The originals of rated runs, judged in verify, are stored with the stage: a worker
    that runs one stage per task asks the judge what one uninterrupted run asks."""
    folder = write_judged_tiny_example(tmp_path / "fb", model_path=str(model_dir), splits=SPLITS)
    job, _ = feedback_job(folder, judge=True)
    job.loop.epochs = 2

    def judged() -> Harness:
        return harness(job, judge=ScriptedJudge(fix_query, score=right_colour))

    whole = judged()
    whole.run()
    stepped = judged()
    while True:
        try:
            run_job(stepped.context(stage_limit=1))
            break
        except StagePause:
            continue
    assert whole.judge is not None and stepped.judge is not None
    assert whole.judge.score_requests
    assert len(stepped.judge.score_requests) == len(whole.judge.score_requests)


def test_quote_prices_rated_runs(tmp_path: Path, model_dir: Path) -> None:
    from cotune.quote import quote_job

    folder = write_judged_tiny_example(tmp_path / "fb", model_path=str(model_dir), splits=SPLITS)
    job, kinds = feedback_job(folder, judge=True)
    rated = sum(len(k) for k in kinds.values())
    with_joints = quote_job(job)["per_stage"]["verify"]
    # the joints' replays are priced by their own test; here, what rated runs cost alone
    job.loop = job.loop.model_copy(update={"joint_candidates": False})
    quote = quote_job(job)
    assert with_joints["judge_calls"] > quote["per_stage"]["verify"]["judge_calls"]
    assert quote["examples"] == {"train": 0, "val": 12, "test": 12, "feedback": rated}
    stages = quote["per_stage"]
    # each rated run: reconstructed in rollout (two llm calls), judged once with a repair
    # in credit, and its original scored in verify (K = 1 sample, repaired once)
    assert stages["rollout"]["engine_requests"] == rated * 2
    assert stages["rollout"]["judge_calls"] == 0
    assert stages["credit"]["judge_calls"] == rated * 2
    # verify: 4 candidates a run (2 trainable components x 2 re-samples) and the original,
    # each scored with one sample and one repair
    assert stages["verify"]["judge_calls"] == rated * (4 + 1) * 2


def test_quote_prices_joint_candidates_and_augmentation_corrections(example_dir: Path) -> None:
    from cotune.quote import quote_job

    def per_stage(**loop: Any) -> dict[str, dict[str, int]]:
        return quote_job(make_job(example_dir, loop=loop))["per_stage"]

    joint, single = per_stage(), per_stage(joint_candidates=False)
    assert joint["verify"]["engine_requests"] > single["verify"]["engine_requests"]
    assert joint["synthesize"]["engine_requests"] > single["synthesize"]["engine_requests"]
    assert joint["rollout"] == single["rollout"]
    # verification off: no joints (their attribution is by replay)
    unverified = per_stage(verify_by_replay=False)
    assert (
        unverified["verify"] == per_stage(verify_by_replay=False, joint_candidates=False)["verify"]
    )
    # augmentation's corrections: more than its rollouts alone
    rollouts_only = quote_job(make_job(example_dir, loop={"resample_candidates": 0}))["per_stage"]
    assert (
        single["synthesize"]["engine_requests"] > rollouts_only["synthesize"]["engine_requests"] > 0
    )

    # paraphrases: n per train example asked of the judge once per epoch, each rolled out (and
    # corrected) in every augmentation round like a train example
    def synthesize(paraphrases: int, **more: Any) -> dict[str, int]:
        job = make_job(example_dir, loop={"paraphrases": paraphrases, **more})
        return dict(quote_job(job)["per_stage"]["synthesize"])

    plain, twice = synthesize(0), synthesize(2)
    n_train, rounds = SPLITS[0], make_job(example_dir).loop.augment_rollouts
    assert twice["judge_calls"] - plain["judge_calls"] == 2 * n_train
    assert twice["engine_requests"] - plain["engine_requests"] > 2 * n_train * rounds
    assert synthesize(2, augment_rollouts=0) == synthesize(0, augment_rollouts=0)
