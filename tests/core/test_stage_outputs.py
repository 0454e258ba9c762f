"""Typed stage outputs: what jobs stored before them still loads, resumes and reports
(``tests/core/data/stage-outputs-v1/``, captured from a tiny-model job of the code before), the
runner's load-or-run, and the per-component figures rebuilt from them (blame vs verified).

Runs with test doubles (``tests/doubles.py``) where a stage has to run: no model is loaded.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from doubles import FakeTrainer, ScriptedEngine, ScriptedJudge, adapter_epoch, critique

from cotune.judge import JudgeOutcome
from cotune.loop import run_job
from cotune.records import (
    ComponentEpochRecord,
    ComponentTraining,
    CreditOut,
    EpochRecord,
    EvalOut,
    EvaluateOut,
    JobReport,
    RolloutOut,
    Stage,
    StageRecord,
    SynthesizeOut,
    TestOut,
    TrainOut,
    VerifyOut,
    stage_output_model,
)
from cotune.report import epoch_record, write_outputs
from cotune.runner import JobContext, StageBusy, StagePause, final_output, run_stage
from cotune.runtime import Trace, mean_score
from cotune.spec.job import JobSpec, load_job, parse_job
from cotune.store import ArtifactStore, JobStore, migrate
from cotune.tiny import write_tiny_example
from cotune.training import DPOPair, SFTRow

FIXTURES = Path(__file__).parent / "data" / "stage-outputs-v1"
STORED = sorted(FIXTURES.glob("epoch-*/*.json"))
SPLITS = (16, 8, 8)  # the example the fixtures were captured on


def where(path: Path) -> tuple[int, Stage]:
    return int(path.parent.name.removeprefix("epoch-")), Stage(path.stem)


def raw(epoch: int, stage: Stage) -> dict[str, Any]:
    return dict(json.loads((FIXTURES / f"epoch-{epoch}" / f"{stage.value}.json").read_text()))


def old_metrics() -> dict[str, Any]:
    return dict(json.loads((FIXTURES / "metrics.json").read_text()))


def holds(stored: Any, dumped: Any) -> bool:
    """Every key and value of ``stored`` is in ``dumped`` (which may add new fields)."""
    if isinstance(stored, dict):
        return isinstance(dumped, dict) and all(
            k in dumped and holds(v, dumped[k]) for k, v in stored.items()
        )
    if isinstance(stored, list):
        return (
            isinstance(dumped, list)
            and len(stored) == len(dumped)
            and all(holds(a, b) for a, b in zip(stored, dumped, strict=True))
        )
    return bool(stored == dumped)


# -- loading what was stored ------------------------------------------------------------------


def test_the_fixtures_cover_every_stage() -> None:
    assert {where(p)[1] for p in STORED} == set(Stage)
    assert sum(p.stat().st_size for p in FIXTURES.rglob("*")) < 400_000


@pytest.mark.parametrize("path", STORED, ids=[f"{p.parent.name}-{p.stem}" for p in STORED])
def test_a_stored_stage_output_loads_into_its_model(path: Path) -> None:
    stored = json.loads(path.read_text())
    model = stage_output_model(where(path)[1])
    output = model.model_validate(stored)
    dumped = output.model_dump(mode="json")
    assert holds(stored, dumped), "a stored value was lost or changed"
    assert model.model_validate(json.loads(json.dumps(dumped))) == output
    assert output.details() and all(v >= 0 for v in output.details().values())


def test_stored_outputs_read_as_typed_objects() -> None:
    baseline = EvalOut.model_validate(raw(0, Stage.baseline))
    rollout = RolloutOut.model_validate(raw(1, Stage.rollout))
    for out in (baseline, rollout):
        assert out.traces and all(isinstance(t, Trace) for t in out.traces)
        assert out.score == mean_score(out.traces)
        assert out.shown_traces() == out.traces

    stored_credit = raw(1, Stage.credit)
    credit = CreditOut.model_validate(stored_credit)
    assert credit.failed == sum(not t.passed for t in rollout.traces) > 0
    assert credit.outcomes == [JudgeOutcome.from_json(o) for o in stored_credit["outcomes"]]
    assert all(o.ok for o in credit.outcomes) and credit.judge_failures == 0
    assert credit.judge_calls == sum(o.calls for o in credit.outcomes)
    assert credit.shown_traces() == []

    checked = VerifyOut.model_validate(raw(1, Stage.verify))
    assert checked.candidates and set(checked.replays) == set(range(len(checked.candidates)))
    for index, candidate in enumerate(checked.candidates):
        assert checked.replays[index].replay_of == candidate.trace_id

    synthesized = SynthesizeOut.model_validate(raw(1, Stage.synthesize))
    rows = [r for rs in synthesized.buffer.sft.values() for r in rs]
    pairs = [p for ps in synthesized.buffer.dpo.values() for p in ps]
    assert rows and all(isinstance(r, SFTRow) for r in rows)
    assert pairs and all(isinstance(p, DPOPair) for p in pairs)
    for name, count in synthesized.counts.items():
        assert count.samples == len(synthesized.buffer.sft.get(name, []))
        assert count.pairs == len(synthesized.buffer.dpo.get(name, []))

    trained = TrainOut.model_validate(raw(1, Stage.train))
    assert set(trained.components) == {"query", "answer"}
    assert all(isinstance(c, ComponentTraining) and c.trained for c in trained.components.values())
    assert trained.trained_tokens == sum(c.trained_tokens for c in trained.components.values())
    assert {c: trained.components[c].adapter for c in trained.adapters} == trained.adapters

    evaluation = EvaluateOut.model_validate(raw(1, Stage.evaluate))
    assert evaluation.kept is True and evaluation.score == mean_score(evaluation.traces)

    final = TestOut.model_validate(raw(2, Stage.test))
    assert final.adapters == trained.adapters and final.best == mean_score(final.traces)
    assert final.base is not None and final.shown_traces() == final.traces


def test_an_epoch_record_stored_before_verified_rate_moves_its_figure_over() -> None:
    [stored] = old_metrics()["epochs"]
    old = {c["component"]: c for c in stored["components"]}
    record = EpochRecord.model_validate(stored)
    for component in record.components:
        assert component.verified_rate == old[component.component]["blame_rate"]
        assert component.blame_rate is None  # the judge's blame was not recorded then
    assert record.components[1].verified_rate == 1.0  # the answer writer: 6 of 6 fixed
    # a record of today keeps both figures as they are
    today = ComponentEpochRecord(epoch=1, component="a", blame_rate=0.5, verified_rate=0.25)
    assert ComponentEpochRecord.model_validate(today.model_dump(mode="json")) == today


# -- a job stored before resumes --------------------------------------------------------------


@dataclass
class OldJob:
    ctx: JobContext
    engine: ScriptedEngine
    trainer: FakeTrainer
    stored: set[tuple[int, Stage]]


@pytest.fixture
def old_job(tmp_path: Path) -> Iterator[Any]:
    """A job whose store and artifacts hold the fixtures, as the code before left them: stage
    rows with their records, the epoch record, the outputs under the job's keys."""
    stores: list[JobStore] = []
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")  # resolves as a model; never loaded
    example = write_tiny_example(tmp_path / "tiny-kb", splits=SPLITS, model_path=str(model))
    (example / "job.yaml").write_text((FIXTURES / "job.yaml").read_text())
    job = load_job(example / "job.yaml")

    def make(*, without: set[Stage] | None = None) -> OldJob:
        root = tmp_path / f"run-{len(stores)}"
        root.mkdir()
        url = f"sqlite:///{root}/db"
        migrate(url)
        store = JobStore(url)
        stores.append(store)
        artifacts = ArtifactStore(str(root / "artifacts"))
        job_id = store.create_job(job.system.name, job.model_dump(mode="json"))
        metrics = old_metrics()
        stored = set()
        for data in metrics["stages"]:
            record = StageRecord.model_validate(data)
            if record.stage in (without or set()):
                continue
            key = f"{job_id}/epoch-{record.epoch}/{record.stage.value}.json"
            artifacts.put_json(key, raw(record.epoch, record.stage))
            assert store.claim_stage(job_id, record.epoch, record.stage, "old", 60)
            assert store.finish_stage(job_id, record.epoch, record.stage, "old", record, key)
            stored.add((record.epoch, record.stage))
        for data in metrics["epochs"]:
            store.save_epoch(job_id, EpochRecord.model_validate(data))
        engine, trainer = ScriptedEngine(), FakeTrainer()
        ctx = JobContext(
            job_id=job_id,
            job=job,
            store=store,
            artifacts=artifacts,
            engines={"tiny": engine},
            judge=ScriptedJudge(lambda key, gold, index: []),
            trainer=trainer,
        )
        return OldJob(ctx, engine, trainer, stored)

    yield make
    for store in stores:
        store.close()


def test_a_finished_job_stored_before_rebuilds_its_report_without_running_anything(
    old_job: Any, tmp_path: Path
) -> None:
    run: OldJob = old_job()
    report = run_job(run.ctx)
    assert run.engine.calls == [] and run.trainer.calls == []
    states = run.ctx.store.stage_states(run.ctx.job_id)
    assert {(s.epoch, s.stage) for s in states} == run.stored
    assert all(s.attempts == 1 for s in states)

    old = JobReport.model_validate(old_metrics())
    # The old report's adapters were the export folders; the job's are artifact keys.
    assert report.model_dump(exclude={"adapters"}) == old.model_dump(exclude={"adapters"})
    assert report.adapters == raw(2, Stage.test)["adapters"] and report.adapters.keys() == {
        "query",
        "answer",
    }

    out = tmp_path / "out"
    out.mkdir()
    write_outputs(run.ctx, report, out)
    lines = (out / "traces" / "test.jsonl").read_text().splitlines()
    # the traces as stored, plus any field added since (e.g. the judge's score samples)
    assert holds(raw(2, Stage.test)["traces"], [json.loads(line) for line in lines])
    assert JobReport.model_validate_json((out / "metrics.json").read_text()) == report
    assert "| verified rate |" in (out / "report.md").read_text()


def test_a_job_stored_before_resumes_at_its_missing_stage(old_job: Any) -> None:
    run: OldJob = old_job(without={Stage.test})
    assert final_output(run.ctx) is None
    report = run_job(run.ctx)

    states = {(s.epoch, s.stage): s for s in run.ctx.store.stage_states(run.ctx.job_id)}
    assert set(states) == run.stored | {(2, Stage.test)}
    assert all(s.attempts == 1 and s.status == "done" for s in states.values())
    assert run.trainer.calls == []
    # only the final test ran: the base system, then epoch 1's kept adapters (stored keys)
    assert run.engine.calls and {adapter_epoch(c.adapter) for c in run.engine.calls} == {None, 1}
    final = final_output(run.ctx)
    assert final is not None and final.adapters == raw(1, Stage.train)["adapters"]
    assert len(final.traces) == SPLITS[2]
    assert report.test_score == final.best and report.base_test_score == final.base
    assert report.best_epoch == 1 and report.base_val_score == old_metrics()["base_val_score"]
    record = states[(2, Stage.test)].record
    assert record is not None
    assert record.details == {"traces": SPLITS[2], "passed": sum(t.passed for t in final.traces)}
    assert record.engine_calls == len(run.engine.calls)


def test_an_epoch_record_rebuilt_from_stored_outputs_matches_the_stored_one(
    old_job: Any,
) -> None:
    run: OldJob = old_job()
    rebuilt = epoch_record(run.ctx, 1)
    [stored] = run.ctx.store.epochs(run.ctx.job_id)
    # the judge named no decisive span in these verdicts: nothing is blamed
    assert [c.blame_rate for c in rebuilt.components] == [0.0, 0.0]
    for component in (*rebuilt.components, *stored.components):
        component.blame_rate = None
    assert rebuilt == stored


# -- the runner -------------------------------------------------------------------------------


def test_run_stage_loads_a_finished_stage_and_runs_no_stage_it_may_not(old_job: Any) -> None:
    run: OldJob = old_job(without={Stage.test})
    ctx, after = run.ctx, []

    def must_not_run() -> Any:
        raise AssertionError("the stage ran")

    loaded = run_stage(ctx, 0, Stage.baseline, EvalOut, must_not_run, after=lambda: after.append(1))
    assert isinstance(loaded, EvalOut) and loaded == EvalOut.model_validate(raw(0, Stage.baseline))
    assert after == []  # only after a stage ran here

    paused = JobContext(ctx.job_id, ctx.job, ctx.store, ctx.artifacts, stage_limit=0)
    with pytest.raises(StagePause):  # the context's stage limit comes before any claim
        run_stage(paused, 2, Stage.test, TestOut, must_not_run)
    assert ctx.store.stage(ctx.job_id, 2, Stage.test) is None

    assert ctx.store.claim_stage(ctx.job_id, 2, Stage.test, "another worker", 60)
    with pytest.raises(StageBusy):
        run_stage(ctx, 2, Stage.test, TestOut, must_not_run)


def test_run_stage_stores_the_typed_output_and_its_cost(old_job: Any) -> None:
    run: OldJob = old_job(without={Stage.test})
    ctx, after = run.ctx, []
    out = TestOut(base=0.5, best=0.75, adapters={"answer": "key"})
    assert run_stage(ctx, 2, Stage.test, TestOut, lambda: out, after=lambda: after.append(1)) == out
    assert after == [1]
    assert final_output(ctx) == out
    record = ctx.store.stage_done(ctx.job_id, 2, Stage.test)
    assert record is not None and record.details == {"traces": 0, "passed": 0}


def test_a_stage_that_runs_again_writes_its_events_once(old_job: Any) -> None:
    """Finding 3: a stage that died after its events were written wrote them again when it
    reran. A stage's events are now written when it finishes, by the attempt that finished."""
    run: OldJob = old_job(without={Stage.test})
    ctx = run.ctx
    out = TestOut(base=0.5, best=0.75, adapters={})

    def dies_after_its_event() -> TestOut:
        ctx.event("epoch 2: scored the test split")
        raise RuntimeError("the worker died")

    def finishes() -> TestOut:
        ctx.event("epoch 2: scored the test split")
        return out

    before = len(ctx.store.events(ctx.job_id, limit=1000))
    with pytest.raises(RuntimeError):
        run_stage(ctx, 2, Stage.test, TestOut, dies_after_its_event)
    assert len(ctx.store.events(ctx.job_id, limit=1000)) == before  # nothing of the dead attempt
    ctx.event("between stages")  # outside a stage, written at once
    assert run_stage(ctx, 2, Stage.test, TestOut, finishes) == out
    messages = [e.message for e in ctx.store.events(ctx.job_id, limit=1000)][before:]
    assert messages == ["between stages", "epoch 2: scored the test split"]
    assert ctx.store.stage(ctx.job_id, 2, Stage.test).attempts == 2  # type: ignore[union-attr]


# -- blame and verified rates -----------------------------------------------------------------


def test_blame_rate_is_the_judges_and_verified_rate_counts_verified_fixes(
    tmp_path: Path,
) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    example = write_tiny_example(tmp_path / "tiny-kb", splits=(24, 12, 12), model_path=str(model))

    def blame_by_key(key: str, gold: str, index: int) -> list[dict[str, Any]]:
        # some keys the judge blames on the answer writer (without a fix), the rest on the query
        if sum(map(ord, key)) % 2:
            return [critique("answer", None, "the answer is wrong")]
        return [critique("query", f"color of {key}", "search for the key")]

    job: JobSpec = parse_job(
        {
            "system": "system.yaml",
            "data": {"train": "train.jsonl", "val": "val.jsonl"},
            "judge": {"model": "tiny"},
            "loop": {"epochs": 1, "rollout_batch": 12, "judge_samples": 1, "seed": 0},
            "train": {"lora_r": 4, "lora_alpha": 8},
        },
        base_dir=example,
    )
    url = f"sqlite:///{tmp_path}/db"
    migrate(url)
    store = JobStore(url)
    job_id = store.create_job(job.system.name, job.model_dump(mode="json"))
    ctx = JobContext(
        job_id=job_id,
        job=job,
        store=store,
        artifacts=ArtifactStore(str(tmp_path / "artifacts")),
        engines={"tiny": ScriptedEngine()},
        judge=ScriptedJudge(blame_by_key),
        trainer=FakeTrainer(),
    )
    try:
        report = run_job(ctx)
        [epoch] = report.epochs
        credit = CreditOut.model_validate(ctx.artifacts.get_json(f"{job_id}/epoch-1/credit.json"))
        candidates = store.candidates(job_id)
        failed = {o.trace_id for o in credit.outcomes}
    finally:
        store.close()
    assert credit.failed == len(failed) > 0
    on_answer = sum(o.decisive_span() == "answer" for o in credit.outcomes)
    assert 0 < on_answer < credit.failed, "the script blames both components"
    by_name = {c.component: c for c in epoch.components}
    assert by_name["answer"].blame_rate == round(on_answer / credit.failed, 4)
    assert by_name["query"].blame_rate == round(1 - on_answer / credit.failed, 4)
    for name, record in by_name.items():
        fixed = {c.trace_id for c in candidates if c.component == name and c.verified}
        assert record.verified_rate == round(len(fixed) / credit.failed, 4)
    # the judge blamed the answer writer without proposing a fix: blamed, never verified
    assert by_name["answer"].blame_rate > 0 and by_name["answer"].verified_rate == 0.0
    assert by_name["query"].verified_rate > 0
    stages = {s.stage: s for s in report.stages}
    assert stages[Stage.credit].details == {
        "failed": credit.failed,
        "judged": credit.failed,
        "judge_failures": 0,
    }
    assert stages[Stage.verify].details["candidates"] == len(candidates)
