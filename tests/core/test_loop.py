"""The whole loop on the tiny model with the real vLLM engine and real TRL training."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from cotune.embedded import run_embedded
from cotune.records import EPOCH_STAGES, JobReport, Stage
from cotune.spec.job import JobSpec, load_job

JOB = """\
system: system.yaml
data: {train: train.jsonl, val: val.jsonl, test: test.jsonl}
judge: {model: tiny, max_tokens: 256}
loop: {epochs: 2, rollout_batch: 32, samples_per_component: 48, judge_samples: 1, seed: 0}
train: {epochs: 3, batch_size: 8, learning_rate: 5.0e-3, dpo_learning_rate: 1.0e-3,
        lora_r: 8, lora_alpha: 16}
"""


@pytest.fixture(scope="module")
def tiny_job(tiny_example: Path) -> JobSpec:
    (tiny_example / "job.yaml").write_text(JOB)
    return load_job(tiny_example / "job.yaml")


@pytest.fixture(scope="module")
def finished(
    tiny_job: JobSpec, vllm_engine: Any, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, JobReport]:
    out = tmp_path_factory.mktemp("run")
    return out, run_embedded(tiny_job, out, progress=False)


def test_job_writes_report_metrics_curves_and_traces(finished: tuple[Path, JobReport]) -> None:
    out, report = finished
    metrics = json.loads((out / "metrics.json").read_text())
    assert JobReport.model_validate(metrics) == report
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2]
    assert report.base_val_score is not None and report.test_score is not None
    text = (out / "report.md").read_text()
    assert "## Epochs" in text and "## Cost per stage" in text and "| query |" in text
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len((out / "traces" / "test.jsonl").read_text().splitlines()) == 24
    stages = {(s.epoch, s.stage) for s in report.stages}
    assert (1, Stage.train) in stages and (3, Stage.test) in stages
    assert report.totals()["engine_calls"] > 0 and report.totals()["trained_tokens"] > 0


def test_every_trainable_component_gets_a_learned_adapter(finished: tuple[Path, JobReport]) -> None:
    from safetensors.numpy import load_file

    out, report = finished
    for epoch in report.epochs:
        for record in epoch.components:
            assert record.trained, record
            assert record.sft_losses, "per-step SFT losses are recorded"
            assert record.samples > 0
    exported = out / "adapters"
    if report.best_epoch is None:
        pytest.fail("no epoch kept on the tiny task; the test needs trained adapters")
    for component in ("query", "answer"):
        folder = exported / component
        assert sorted(p.name for p in folder.iterdir()) == [
            "adapter_config.json",
            "adapter_model.safetensors",
        ]
        weights = load_file(folder / "adapter_model.safetensors")
        lora_b = [w for name, w in weights.items() if "lora_B" in name]
        assert lora_b and any(abs(w).max() > 0 for w in lora_b)  # B starts at zero


def test_no_pickled_file_in_the_output(finished: tuple[Path, JobReport]) -> None:
    out, _ = finished
    pickles = [
        p for p in out.rglob("*") if p.suffix in {".bin", ".pt", ".pkl", ".pickle", ".pth", ".ckpt"}
    ]
    assert pickles == []


def test_adapters_load_in_peft_and_vllm(
    finished: tuple[Path, JobReport], tiny_model_dir: Path, vllm_engine: Any
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from cotune.engines import GenerationRequest

    out, _ = finished
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = PeftModel.from_pretrained(base, out / "adapters" / "answer")
    assert "default" in model.peft_config
    request = GenerationRequest(
        messages=[
            {"role": "user", "content": "Write a search query for: what is the color of kalo?"}
        ]
    )
    [result] = vllm_engine.generate([request], adapter=str(out / "adapters" / "query"))
    assert result.completion_tokens > 0


def test_resume_does_not_redo_finished_stages(
    tiny_job: JobSpec, finished: tuple[Path, JobReport], tmp_path: Path
) -> None:
    from safetensors.numpy import load_file

    from cotune.embedded import open_output
    from cotune.loop import run_job
    from cotune.runner import JobContext

    class Interrupted(Exception):
        pass

    def crash_at_first_evaluate(stage: str, done: int, total: int) -> None:
        if stage == Stage.evaluate.value and calls.setdefault("evaluate", 0) == 1:
            raise Interrupted
        if stage == Stage.evaluate.value:
            calls["evaluate"] += 1

    calls: dict[str, int] = {}
    store, artifacts, job_id = open_output(tmp_path, tiny_job, resume=False)
    ctx = JobContext(
        job_id=job_id,
        job=tiny_job,
        store=store,
        artifacts=artifacts,
        progress=crash_at_first_evaluate,
    )
    with pytest.raises(Interrupted):  # the baseline evaluates once, then epoch 1's evaluate
        run_job(ctx)
    done_before = {(s.epoch, s.stage) for s in store.stage_states(job_id) if s.status == "done"}
    assert (1, "train") in done_before and (1, "evaluate") not in done_before

    resumed = run_job(JobContext(job_id=job_id, job=tiny_job, store=store, artifacts=artifacts))
    states = {(s.epoch, s.stage): s for s in store.stage_states(job_id)}
    for key in done_before:
        assert states[key].attempts == 1, f"{key} ran again"
    assert states[(1, "evaluate")].attempts == 2

    _, uninterrupted = finished
    assert resumed.best_val_score == uninterrupted.best_val_score
    assert resumed.test_score == uninterrupted.test_score
    for component, key in resumed.adapters.items():
        ours = load_file(artifacts.local_path(key) / "adapter_model.safetensors")
        theirs = load_file(Path(uninterrupted.adapters[component]) / "adapter_model.safetensors")
        assert ours.keys() == theirs.keys()
        for name in ours:  # same seeds, rows and thread count: equal within 1e-5
            assert abs(ours[name] - theirs[name]).max() <= 1e-5, name


def test_one_stage_per_call_reaches_the_same_result(
    tiny_job: JobSpec, finished: tuple[Path, JobReport], tmp_path: Path
) -> None:
    """How workers drive a job: each call runs one new stage and pauses before the next."""
    from cotune.embedded import open_output
    from cotune.loop import run_job
    from cotune.runner import JobContext, StagePause

    store, artifacts, job_id = open_output(tmp_path, tiny_job, resume=False)
    paused_at = []
    while True:
        ctx = JobContext(
            job_id=job_id, job=tiny_job, store=store, artifacts=artifacts, stage_limit=1
        )
        try:
            report = run_job(ctx)
            break
        except StagePause as pause:
            paused_at.append((pause.epoch, pause.stage.value))
    assert paused_at[:3] == [(1, "rollout"), (1, "credit"), (1, "verify")]
    assert len(paused_at) == 13  # baseline + 2 epochs x 6 stages + test = 14 stages
    assert all(s.attempts == 1 for s in store.stage_states(job_id))
    _, uninterrupted = finished
    assert report.best_val_score == uninterrupted.best_val_score
    assert report.test_score == uninterrupted.test_score


JUDGED_JOB = """\
system: system.yaml
data: {train: train.jsonl, val: val.jsonl, test: test.jsonl}
judge: {model: tiny, max_tokens: 256}
loop: {epochs: 1, rollout_batch: 8, samples_per_component: 8, judge_samples: 1,
       augment_rollouts: 0, seed: 0}
train: {method: sft, epochs: 1, batch_size: 4, learning_rate: 5.0e-3, lora_r: 4, lora_alpha: 8}
"""


def test_the_tiny_model_as_judge_scores_a_job_without_gold(
    tiny_model_dir: Path, vllm_engine: Any, tmp_path: Path
) -> None:
    """End to end with the real tiny model as judge (``metric: judge``, no gold anywhere): every
    stage runs and the judge's scores are recorded. What it scores is not asserted: the tiny
    model is no judge of colours."""
    from doubles import write_judged_tiny_example

    from cotune.records import EvaluateOut, RolloutOut

    folder = write_judged_tiny_example(
        tmp_path / "judged", model_path=str(tiny_model_dir), splits=(8, 4, 4)
    )
    (folder / "job.yaml").write_text(JUDGED_JOB)
    job = load_job(folder / "job.yaml")
    assert job.system.metric == "judge"
    report = run_embedded(job, tmp_path / "run", progress=False)

    ran = {(s.epoch, s.stage) for s in report.stages}
    assert {(0, Stage.baseline), (2, Stage.test)} <= ran
    assert {(1, stage) for stage in EPOCH_STAGES} <= ran
    spent = {s.stage: s.judge_calls for s in report.stages}
    # new outputs cost judge calls; epoch 1's val outputs may all be cached from the baseline
    for stage in (Stage.baseline, Stage.rollout, Stage.test):
        assert spent[stage] > 0, f"{stage}: the judge scored nothing"
    stored = tmp_path / "run"
    for path, model in (
        ("epoch-1/rollout.json", RolloutOut),
        ("epoch-1/evaluate.json", EvaluateOut),
    ):
        [found] = list(stored.rglob(path))
        out = model.model_validate_json(found.read_text())
        for trace in out.traces:
            assert trace.expected is None and trace.score_reason, trace
            assert trace.score_samples is not None  # empty when the judge's reply was unusable
            assert all(0.0 <= s <= 1.0 for s in trace.score_samples)
        assert any(t.score_samples for t in out.traces), "no reply of the tiny judge was usable"
