"""The one job lifecycle (``cotune.jobs.lifecycle``) and its three callers.

The same job, run by the thread dispatcher (``cotune serve --embedded``), by the Celery tasks
(called in this process, their next task taken from a recorded queue instead of a broker) and
by ``cotune run`` (``run_embedded``), leaves the same job record, the same events and the same
stages, once ids, times and lease owners are masked. The job is the real tiny-kb task on real
stores; its engine, judge and trainer are the scripted doubles of ``tests/doubles.py``.
"""

from __future__ import annotations

import re
from collections import deque
from pathlib import Path
from typing import Any

import pytest
from doubles import scripted_context_options

from cotune.jobs.lifecycle import CREATED, QUEUED, RUNNING, SUCCEEDED, Lifecycle, Step
from cotune.jobs.threads import ThreadDispatcher
from cotune.settings import Settings
from cotune.spec.job import JobSpec, parse_job
from cotune.store import ArtifactStore, JobStatus, JobStore, migrate
from cotune.tiny import write_tiny_example

SPLITS = (24, 12, 12)


@pytest.fixture(scope="module")
def example(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = tmp_path_factory.mktemp("dummy-model")
    (model / "config.json").write_text("{}")  # resolves as a model; none is ever loaded
    return write_tiny_example(
        tmp_path_factory.mktemp("tiny-kb"), splits=SPLITS, model_path=str(model)
    )


def tiny_job(example: Path) -> JobSpec:
    return parse_job(
        {
            "system": "system.yaml",
            "data": {"train": "train.jsonl", "val": "val.jsonl", "test": "test.jsonl"},
            "judge": {"model": "tiny"},
            "loop": {"epochs": 1, "rollout_batch": 12, "samples_per_component": 8, "seed": 0},
            "train": {"lora_r": 4, "lora_alpha": 8},
        },
        base_dir=example,
    )


def stores(root: Path) -> tuple[Lifecycle, Settings]:
    root.mkdir(parents=True, exist_ok=True)
    settings = Settings(
        database_url=f"sqlite:///{root / 'jobs.db'}",
        artifacts=str(root / "artifacts"),
        workdir=str(root / "work"),
    )
    migrate(settings.database_url)
    store = JobStore(settings.database_url)
    life = Lifecycle(
        store,
        ArtifactStore(settings.artifacts),
        settings,
        context_options=scripted_context_options(),
    )
    return life, settings


_ID = re.compile(r"(job|ftevent|file)-[A-Za-z0-9]+")
_DURATION = re.compile(r"\d+\.\d+ s\b")  # "engines stepped aside in 0.0 s": a duration
_MASKED = ("seconds", "created_at", "adapters", "adapter")


def _mask(value: Any) -> Any:
    """Ids, times, durations and where adapters were written taken out of a record."""
    if isinstance(value, dict):
        return {
            k: "<masked>" if k in _MASKED or k.endswith("_seconds") else _mask(v)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_mask(v) for v in value]
    if isinstance(value, str):
        return _DURATION.sub("<t> s", _ID.sub(r"\1-<id>", value))
    return value


def observed(life: Lifecycle, job_id: str) -> dict[str, Any]:
    """What a client and an operator see of a job, masked."""
    record = life.store.get_job(job_id)
    assert record is not None
    return {
        "status": record.status.value,
        "error": record.error,
        "result": _mask(record.result),
        "events": [
            (e.level, _mask(e.message), _mask(e.data))
            for e in life.store.events(job_id, limit=1000)
        ],
        "stages": [
            (s.epoch, s.stage.value, s.status.value, s.attempts)
            for s in life.store.stage_states(job_id)
        ],
    }


def by_threads(job: JobSpec, root: Path) -> dict[str, Any]:
    from cotune.jobs.materialize import local_spec

    life, settings = stores(root)
    dispatcher = ThreadDispatcher(
        life.store,
        None,
        life.artifacts,
        settings,
        context_options=life.context_options,
    )
    try:
        job_id = life.create(job.system.name, local_spec(job))
        dispatcher.dispatch(job_id)
        assert dispatcher.wait_idle(timeout=120)
        return observed(life, job_id)
    finally:
        dispatcher.shutdown(wait=True)


def by_celery_tasks(job: JobSpec, root: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The tasks' own code, each next task taken from a recorded queue (no broker)."""
    import workers.tasks as tasks
    from cotune.jobs.materialize import local_spec

    life, _ = stores(root)
    queue: deque[tuple[Any, str]] = deque()
    monkeypatch.setattr(tasks, "lifecycle", lambda: life)
    monkeypatch.setattr(
        tasks,
        "enqueue_advance",
        lambda job_id: queue.append((tasks.advance_job, job_id)),
    )
    monkeypatch.setattr(
        tasks, "enqueue_finalize", lambda job_id: queue.append((tasks.finalize_job, job_id))
    )
    job_id = life.create(job.system.name, local_spec(job))
    returned = [tasks.validate_job.run(job_id)]
    while queue:
        task, queued_id = queue.popleft()
        returned.append(task.run(queued_id))
    # One stage per advance_job: baseline, six of the epoch, test; then finalize.
    assert returned == ["queued", *["paused"] * 7, "finished", "succeeded"]
    return observed(life, job_id)


def by_cli(job: JobSpec, root: Path) -> dict[str, Any]:
    from cotune.embedded import local_lifecycle, run_embedded

    run_embedded(job, root, progress=False, context_options=scripted_context_options())
    life = local_lifecycle(root)
    [record] = life.store.list_jobs(None, limit=10).data
    return observed(life, record.id)


def test_threads_celery_tasks_and_the_cli_leave_the_same_job(
    example: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = tiny_job(example)
    threads = by_threads(job, tmp_path / "threads")
    celery = by_celery_tasks(job, tmp_path / "celery", monkeypatch)
    cli = by_cli(job, tmp_path / "cli")

    assert threads["status"] == "succeeded", threads["error"]
    messages = [m for _, m, _ in threads["events"]]
    assert messages[:3] == [CREATED, QUEUED, RUNNING] and messages[-1] == SUCCEEDED
    assert len(threads["stages"]) == 8 and all(s[2:] == ("done", 1) for s in threads["stages"])
    assert celery == threads
    assert cli == threads


def test_a_failed_stage_fails_the_job_once_on_every_path(
    example: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A trainer that raises: the stage and the job fail with the error (one event), the CLI
    raises it, and the job can be resumed by its owner only through ``resume``."""
    from doubles import FakeTrainer, TrainerCrash

    options = {**scripted_context_options(), "trainer": FakeTrainer(crash_on_call=1)}
    job = tiny_job(example)
    life, _ = stores(tmp_path / "threads")
    life.context_options = options
    job_id = life.create(job.system.name, job.model_dump(mode="json"))
    assert life.validate(job_id, "me", job=job).step == Step.queued
    done = life.advance(job_id, "me", job=job)
    assert done.step == Step.failed and isinstance(done.error, TrainerCrash)
    record = life.store.get_job(job_id)
    assert record is not None and record.status == JobStatus.failed
    assert record.error is not None and record.error.startswith("TrainerCrash")
    failed = [e for e in life.store.events(job_id, limit=100) if e.level == "error"]
    assert len(failed) == 1 and failed[0].message == f"failed: {record.error}"
    train = life.store.stage(job_id, 1, "train")
    assert train is not None and train.status.value == "failed"

    # Nothing moves a failed job on by itself; its owner's resume does, once.
    assert life.advance(job_id, "me", job=job).step == Step.skipped
    assert life.resume(job_id) and not life.resume(job_id)
    life.context_options = scripted_context_options()
    assert life.advance(job_id, "me", job=job).step == Step.finished

    from cotune.embedded import run_embedded

    options = {**scripted_context_options(), "trainer": FakeTrainer(crash_on_call=1)}
    with pytest.raises(TrainerCrash):
        run_embedded(job, tmp_path / "cli", progress=False, context_options=options)
    # --resume carries the failed local job on from its last finished stage.
    report = run_embedded(
        job,
        tmp_path / "cli",
        resume=True,
        progress=False,
        context_options=scripted_context_options(),
    )
    assert report.status == "succeeded"


def test_a_cancel_between_stages_ends_the_job_on_the_next_step(
    example: Path, tmp_path: Path
) -> None:
    job = tiny_job(example)
    life, _ = stores(tmp_path)
    job_id = life.create(job.system.name, job.model_dump(mode="json"))
    assert life.validate(job_id, "me", job=job).step == Step.queued
    assert life.advance(job_id, "me", stage_limit=1, job=job).step == Step.paused
    assert life.request_cancel(job_id).cancel_requested
    life.request_cancel(job_id)  # a second request writes no second event
    assert life.advance(job_id, "me", stage_limit=1, job=job).step == Step.skipped
    record = life.store.get_job(job_id)
    assert record is not None and record.status == JobStatus.cancelled
    messages = [e.message for e in life.store.events(job_id, limit=100)]
    assert messages.count("cancel requested") == 1
    assert messages[-1] == "cancelled between stages"


def test_a_duplicate_validation_queues_once(example: Path, tmp_path: Path) -> None:
    job = tiny_job(example)
    life, _ = stores(tmp_path)
    job_id = life.create(job.system.name, job.model_dump(mode="json"))
    assert life.validate(job_id, "a", job=job).step == Step.queued
    assert life.validate(job_id, "b", job=job).step == Step.skipped
    messages = [e.message for e in life.store.events(job_id, limit=100)]
    assert messages == [CREATED, QUEUED]
