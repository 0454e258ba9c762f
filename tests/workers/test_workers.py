"""The Celery workers end to end: a real worker process, PostgreSQL, Redis and the tiny model.

One PostgreSQL database and one Redis key prefix (in ``COTUNE_TEST_REDIS_URL``, default
db 7) per module; each test starts or reuses a worker subprocess
(``python -m celery -A workers.app worker -Q gpu,cpu --pool solo``) configured through the
environment, and every worker's process group is killed at teardown. Workers hold 5-second
leases, so a killed worker's stage is taken over within seconds. The module skips when
PostgreSQL or Redis does not answer.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import fresh_pg_database
from e2e import (
    JOB,
    JOB_TIMEOUT,
    PROCESS_ENV,
    check_downloads,
    cli,
    start_api,
    stop,
    write_job_folder,
)

from cotune.records import JobReport, Stage
from cotune.spec.job import parse_job
from cotune.store import ArtifactStore, JobRecord, JobStatus, JobStore, StageStatus
from cotune.store.status import TERMINAL

REPO = Path(__file__).resolve().parents[2]
REDIS_URL = os.environ.get("COTUNE_TEST_REDIS_URL", "redis://127.0.0.1:6379/7")
LEASE_SECONDS = 5
REAPER_INTERVAL = 2
STALL_SECONDS = 6

STAGES: list[tuple[int, Stage]] = [
    (0, Stage.baseline),
    (1, Stage.rollout),
    (1, Stage.credit),
    (1, Stage.verify),
    (1, Stage.synthesize),
    (1, Stage.train),
    (1, Stage.evaluate),
    (2, Stage.test),
]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database, migrated to head; dropped afterwards."""
    with fresh_pg_database("cotune_workers") as url:
        yield url


@pytest.fixture(scope="module")
def broker_prefix() -> Iterator[str]:
    """A key prefix of this module's own in the Redis database (``COTUNE_BROKER_KEY_PREFIX``),
    so that two runs of this file at once do not take each other's messages; its keys are
    deleted afterwards."""
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except Exception as exc:
        pytest.skip(f"Redis not reachable at {REDIS_URL}: {exc}")
    prefix = f"cotune-test-{uuid.uuid4().hex[:12]}:"
    try:
        yield prefix
    finally:
        for key in client.scan_iter(match=f"{prefix}*"):
            client.delete(key)
        client.close()


@dataclass
class Cluster:
    """The module's stores, a Celery client app and the worker subprocesses."""

    env: dict[str, str]
    store: JobStore
    artifacts: ArtifactStore
    folder: Path
    client: Any
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)
    with_beat: set[int] = field(default_factory=set)  # pids of the workers that run the reaper

    @property
    def worker(self) -> subprocess.Popen[bytes] | None:
        live = [w for w in self.workers if w.poll() is None]
        return live[-1] if live else None

    def start_worker(self, *, beat: bool = False) -> subprocess.Popen[bytes]:
        n = len(self.workers)
        log = self.folder / f"worker-{n}.log"
        cmd = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "workers.app",
            "worker",
            "-Q",
            "gpu,cpu",
            "--pool",
            "solo",
            "--concurrency",
            "1",
            "-l",
            "info",
            "-n",
            f"w{n}@%h",
            "--without-gossip",
            "--without-mingle",
        ]
        if beat:
            cmd += ["--beat", "--schedule-filename", str(self.folder / f"beat-{n}")]
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                cmd,
                cwd=REPO,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: killed whole at teardown
            )
        self.workers.append(proc)
        self.logs.append(log)
        if beat:
            self.with_beat.add(proc.pid)
        return proc

    def ensure_worker(self) -> subprocess.Popen[bytes]:
        return self.worker or self.start_worker()

    def kill_workers(self) -> None:
        for proc in self.workers:  # the whole group: beat's child too, even after an exit
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)

    def log_tail(self, chars: int = 6000) -> str:
        parts = []
        for log in self.logs:
            text_ = log.read_text(errors="replace") if log.exists() else ""
            parts.append(f"--- {log.name}\n{text_[-chars:]}")
        return "\n".join(parts)

    def submit(self, spec: dict[str, Any]) -> str:
        """Create the job as queued and send its first task, as the API would."""
        from cotune.jobs.queues import ADVANCE_JOB, GPU_QUEUE

        job_id = self.store.create_job("tiny-kb", spec)
        self.client.send_task(ADVANCE_JOB, args=[job_id], queue=GPU_QUEUE)
        return job_id

    def wait(
        self, what: str, check: Any, timeout: float = JOB_TIMEOUT, allow_exit: bool = False
    ) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = check()
            if value:
                return value
            if not allow_exit and self.worker is None and self.workers:
                pytest.fail(f"the worker exited while waiting for {what}\n{self.log_tail()}")
            time.sleep(0.2)
        pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{self.log_tail()}")

    def wait_done(self, job_id: str, allow_exit: bool = False) -> JobRecord:
        def terminal() -> JobRecord | None:
            record = self.store.get_job(job_id)
            return record if record is not None and record.status in TERMINAL else None

        record: JobRecord = self.wait(f"job {job_id} to end", terminal, allow_exit=allow_exit)
        return record

    def wait_running(self, job_id: str, epoch: int, stage: Stage) -> None:
        def running() -> bool:
            state = self.store.stage(job_id, epoch, stage)
            return state is not None and state.status == StageStatus.running

        self.wait(f"epoch {epoch} {stage.value} of {job_id} to run", running)


@pytest.fixture(scope="module")
def cluster(
    pg_url: str,
    broker_prefix: str,
    tiny_model_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Cluster]:
    from cotune.settings import Settings
    from workers.app import create_app

    folder = tmp_path_factory.mktemp("workers")
    artifacts_root = folder / "artifacts"
    # The registry model ``tiny``, prepared: what HTTP jobs name (they name no paths).
    home = folder / "home"
    (home / "models").mkdir(parents=True)
    (home / "models" / "tiny").symlink_to(tiny_model_dir)
    env = {
        **os.environ,
        "COTUNE_HOME": str(home),
        "COTUNE_DATABASE_URL": pg_url,
        "COTUNE_BROKER_URL": REDIS_URL,
        "COTUNE_BROKER_KEY_PREFIX": broker_prefix,
        "COTUNE_ARTIFACTS": str(artifacts_root),
        "COTUNE_WORKDIR": str(folder / "work"),
        "COTUNE_LEASE_SECONDS": str(LEASE_SECONDS),
        "COTUNE_REAPER_INTERVAL": str(REAPER_INTERVAL),
        "COTUNE_STALL_SECONDS": str(STALL_SECONDS),
        **PROCESS_ENV,
    }
    client = create_app(
        Settings(broker_url=REDIS_URL, database_url=pg_url, broker_key_prefix=broker_prefix)
    )
    store = JobStore(pg_url)
    c = Cluster(env, store, ArtifactStore(str(artifacts_root)), folder, client)
    try:
        yield c
    finally:
        c.kill_workers()
        client.close()
        store.close()


@pytest.fixture(scope="module")
def spec(tiny_example: Path) -> dict[str, Any]:
    """The tiny job as a stored spec: every path absolute, as a worker needs it."""
    from cotune.jobs.materialize import local_spec

    stored = local_spec(parse_job(JOB, base_dir=tiny_example))
    assert Path(stored["data"]["train"]).is_absolute()
    search = next(c for c in stored["system"]["components"] if c["name"] == "search")
    assert Path(search["args"]["corpus"]).is_absolute()
    reparsed = parse_job(stored)  # what a worker does, with no base folder
    assert reparsed.data_path("train").is_file()  # type: ignore[union-attr]
    return stored


@pytest.fixture(scope="module")
def small_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """The same job without a judge (candidates come from re-sampling): the judge's long
    prompts make its credit stage the slowest one, and the kill and cancel tests are about
    the stages around it."""
    return {k: v for k, v in spec.items() if k != "judge"}


def _states(cluster: Cluster, job_id: str) -> dict[tuple[int, Stage], Any]:
    return {(s.epoch, s.stage): s for s in cluster.store.stage_states(job_id)}


# --------------------------------------------------------------------------- tests


def test_job_succeeds_and_a_duplicate_message_does_nothing_twice(
    cluster: Cluster, spec: dict[str, Any]
) -> None:
    from cotune.jobs.queues import ADVANCE_JOB, GPU_QUEUE

    cluster.ensure_worker()
    started = time.monotonic()
    job_id = cluster.submit(spec)
    # A second message for the job, as a redelivery would give: two task chains, which
    # still run every stage once and finalize once.
    cluster.client.send_task(ADVANCE_JOB, args=[job_id], queue=GPU_QUEUE)
    record = cluster.wait_done(job_id)
    assert record.status == JobStatus.succeeded, f"{record.error}\n{cluster.log_tail()}"
    seconds = {f"{r.epoch}:{r.stage.value}": r.seconds for r in cluster.store.stages(job_id)}
    print(f"job {job_id} succeeded in {time.monotonic() - started:.1f} s; stages {seconds}")

    states = _states(cluster, job_id)
    assert list(states) == STAGES
    for key, state in states.items():
        assert state.status == StageStatus.done and state.attempts == 1, (key, state)
    assert len(cluster.store.stages(job_id)) == len(STAGES)

    # The result: the report in the job row and the embedded run's files in the artifacts.
    assert record.result is not None
    report = JobReport.model_validate(record.result)
    assert report.status == "succeeded" and [e.epoch for e in report.epochs] == [1]
    prefix = f"{job_id}/result"
    metrics = JobReport.model_validate(cluster.artifacts.get_json(f"{prefix}/metrics.json"))
    assert metrics == report
    assert "## Epochs" in cluster.artifacts.get_text(f"{prefix}/report.md")
    assert cluster.artifacts.get_bytes(f"{prefix}/curves.png")[:4] == b"\x89PNG"
    assert len(cluster.artifacts.get_text(f"{prefix}/traces/test.jsonl").splitlines()) == 24
    kinds = {a.kind for a in cluster.store.artifacts(job_id)}
    assert {"metrics", "report", "curves", "traces"} <= kinds
    if report.best_epoch is not None:  # the epoch was kept: its adapters are exported
        assert set(report.adapters) == {"query", "answer"}
        for component, key in report.adapters.items():
            assert key == f"{prefix}/adapters/{component}"
            assert cluster.artifacts.list(key) == [
                f"{key}/adapter_config.json",
                f"{key}/adapter_model.safetensors",
            ]
        assert "adapter" in kinds
    else:
        assert report.adapters == {}
    messages = [e.message for e in cluster.store.events(job_id, limit=1000)]
    assert "running" in messages and messages[-1] == "succeeded"


def test_cli_submits_follows_and_downloads_through_the_api(
    cluster: Cluster, tmp_path: Path
) -> None:
    """The user's path end to end: ``cotune submit`` uploads the job's files to a real API
    (``cotune serve`` with Celery), a real worker runs it, ``cotune logs -f`` follows it to
    the end, ``cotune status`` shows the result, then the downloads."""
    from cotune.store.accounts import AccountStore

    _, key = AccountStore(cluster.store).create_key("acme", name="e2e")
    cluster.ensure_worker()
    api, url = start_api(cluster.env, tmp_path / "api.log")
    try:
        env = {**cluster.env, "COTUNE_API_URL": url, "COTUNE_API_KEY": key}
        job_file = write_job_folder(tmp_path / "job")
        job_id = cli(env, "submit", str(job_file)).strip()
        assert re.fullmatch(r"job-[0-9a-f]{24}", job_id), job_id
        stored = cluster.store.get_job(job_id)
        assert stored is not None and stored.tenant_id == "acme"
        for split in ("train", "val", "test"):  # rewritten to the uploaded files' ids
            assert stored.spec["data"][split].startswith("file-")
        search = next(c for c in stored.spec["system"]["components"] if c["name"] == "search")
        assert search["args"]["corpus"].startswith("file-")

        logs = cli(env, "logs", "-f", job_id, timeout=900)  # the whole job runs meanwhile
        record = cluster.store.get_job(job_id)
        assert record is not None and record.status == JobStatus.succeeded, (
            f"{record and record.error}\n{cluster.log_tail()}"
        )
        assert "files validated; queued" in logs and logs.rstrip().endswith("succeeded")
        status = cli(env, "status", job_id)
        assert f"{job_id}  tiny-kb  succeeded" in status and "base val" in status
        report = JobReport.model_validate(record.result)
        print(f"e2e job {job_id}: best epoch {report.best_epoch}; status:\n{status}")
        assert report.best_epoch == 1, "no epoch was kept: nothing to download"
        check_downloads(cluster.env, url, key, job_id, tmp_path / "downloads")
    finally:
        stop(api)


def test_killed_worker_stage_is_taken_over_once(
    cluster: Cluster, small_spec: dict[str, Any]
) -> None:
    cluster.ensure_worker()
    started = time.monotonic()
    job_id = cluster.submit(small_spec)
    cluster.wait_running(job_id, 1, Stage.train)
    cluster.kill_workers()  # SIGKILL mid-stage: no ack, no fail_stage, the lease just stops
    killed = cluster.store.stage(job_id, 1, Stage.train)
    assert killed is not None and killed.status == StageStatus.running and killed.attempts == 1
    assert cluster.store.get_job(job_id).status == JobStatus.running  # type: ignore[union-attr]

    # A new worker with beat: the reaper re-enqueues the job once the lease expired.
    cluster.start_worker(beat=True)
    record = cluster.wait_done(job_id)
    assert record.status == JobStatus.succeeded, f"{record.error}\n{cluster.log_tail()}"
    print(f"job {job_id} survived the kill in {time.monotonic() - started:.1f} s")

    states = _states(cluster, job_id)
    assert list(states) == STAGES
    for key, state in states.items():
        assert state.status == StageStatus.done
        assert state.attempts == (2 if key == (1, Stage.train) else 1), (key, state)
        assert state.lease_owner is not None
    assert states[(1, Stage.train)].lease_owner != killed.lease_owner

    # One record per stage, and every output written under its one key.
    records = cluster.store.stages(job_id)
    assert sorted((r.epoch, r.stage.value) for r in records) == sorted(
        (e, s.value) for e, s in STAGES
    )
    keys = cluster.artifacts.list(job_id)
    assert len(keys) == len(set(keys))
    assert [k for k in keys if k.endswith("/train.json")] == [f"{job_id}/epoch-1/train.json"]
    for component in ("query", "answer"):
        adapter = f"{job_id}/epoch-1/adapters/{component}"
        assert cluster.artifacts.list(adapter) == [
            f"{adapter}/adapter_config.json",
            f"{adapter}/adapter_model.safetensors",
        ]
    requeued = [e for e in cluster.store.events(job_id, limit=1000) if "re-queued" in e.message]
    assert len(requeued) == 1, requeued


def _upload(cluster: Cluster, tenant: str, path: Path, purpose: str) -> str:
    """What ``POST /v1/files`` stores: the bytes in the artifact store and a file row."""
    import hashlib

    from cotune.store.accounts import AccountStore, new_file_id
    from services.api.uploads import check_upload

    data = path.read_bytes()
    with open(path, "rb") as stream:
        summary = check_upload(stream, purpose, path.name)
    file_id = new_file_id()
    key = f"files/{tenant}/{file_id}"
    cluster.artifacts.put_bytes(key, data)
    AccountStore(cluster.store).add_file(
        tenant,
        purpose,
        path.name,
        len(data),
        hashlib.sha256(data).hexdigest(),
        key,
        summary.rows,
        summary.fields,
        file_id=file_id,
    )
    return file_id


def test_a_job_whose_next_task_was_lost_is_queued_again(
    cluster: Cluster, small_spec: dict[str, Any]
) -> None:
    """A worker that dies after finishing a stage, before queueing the next, leaves a running
    job with no message anywhere: the reaper finds it idle between stages and queues it
    again, well before the broker's visibility timeout would."""
    worker = cluster.worker
    if worker is None or worker.pid not in cluster.with_beat:
        cluster.kill_workers()
        cluster.start_worker(beat=True)
    job_id = cluster.store.create_job("tiny-kb", small_spec)
    cluster.store.transition(job_id, JobStatus.running)  # as if a stage's worker had died
    record = cluster.wait_done(job_id)
    assert record.status == JobStatus.succeeded, f"{record.error}\n{cluster.log_tail()}"
    messages = [e.message for e in cluster.store.events(job_id, limit=1000)]
    stalled = [m for m in messages if "between stages" in m]
    assert stalled == [
        f"no progress for {STALL_SECONDS} s between stages (its next task was lost); queued again"
    ]
    assert all(s.attempts == 1 for s in cluster.store.stage_states(job_id))


def test_validating_and_queued_jobs_whose_message_was_lost_are_sent_again(
    cluster: Cluster, small_spec: dict[str, Any]
) -> None:
    """Finding 3: a worker killed while validating a job's files left it validating for good
    (the reaper looked at running jobs only). A job that waits in a state whose message is in
    no queue is sent again: ``validate_job`` while validating, ``advance_job`` when queued."""
    worker = cluster.worker
    if worker is None or worker.pid not in cluster.with_beat:
        cluster.kill_workers()
        cluster.start_worker(beat=True)
    validating = cluster.store.create_job("tiny-kb", small_spec, status=JobStatus.validating_files)
    queued = cluster.store.create_job("tiny-kb", small_spec)  # queued, its message lost

    def moved_on(job_id: str) -> bool:
        record = cluster.store.get_job(job_id)
        return record is not None and record.status == JobStatus.running

    for job_id, where, what in (
        (validating, "while validating its files", "its file validation was lost"),
        (queued, "while queued", "its next task was lost"),
    ):
        cluster.wait(f"{job_id} to be sent again", lambda job_id=job_id: moved_on(job_id))
        messages = [e.message for e in cluster.store.events(job_id, limit=1000)]
        assert f"no progress for {STALL_SECONDS} s {where} ({what}); queued again" in messages
        cluster.store.request_cancel(job_id)
    for job_id in (validating, queued):
        assert cluster.wait_done(job_id).status == JobStatus.cancelled


def test_http_job_is_validated_then_cancelled_between_stages_and_sigterm_drains(
    cluster: Cluster, small_spec: dict[str, Any]
) -> None:
    """A tenant's job names file ids (the HTTP path): ``CeleryDispatcher.dispatch`` validates
    it on the cpu queue (its files materialised from the artifact store), then it runs until
    it is cancelled while training, and the worker, told to stop at the same moment, finishes
    that stage first."""
    from services.api.dispatch import CeleryDispatcher
    from workers.app import app_settings

    tenant = "acme"
    spec = json.loads(json.dumps(small_spec))
    for split in ("train", "val", "test"):
        spec["data"][split] = _upload(cluster, tenant, Path(spec["data"][split]), "data")
    search = next(c for c in spec["system"]["components"] if c["name"] == "search")
    search["args"]["corpus"] = _upload(cluster, tenant, Path(search["args"]["corpus"]), "corpus")
    job_id = cluster.store.create_job(
        "tiny-kb", spec, tenant_id=tenant, status=JobStatus.validating_files
    )
    dispatcher = CeleryDispatcher(app_settings(cluster.client))
    worker = cluster.ensure_worker()
    dispatcher.dispatch(job_id)
    dispatcher.dispatch(job_id)  # idempotent
    assert isinstance(dispatcher.queue_depth(), int)
    # /readyz's check, asked while the solo-pool worker is busy with the job (it answers no
    # broadcast then: the job ran to its end before this passed, and the test failed, until
    # workers counted by their presence keys).
    cluster.wait(
        "the worker to report its queues",
        # At least: a worker an earlier test killed keeps its key up to PRESENCE_TTL.
        lambda: all(n >= 1 for n in (dispatcher.consumers() or {"gpu": 0}).values()),
    )

    cluster.wait_running(job_id, 1, Stage.train)
    workdir = cluster.folder / "work" / job_id
    ids = [spec["data"][s] for s in ("train", "val", "test")] + [search["args"]["corpus"]]
    assert sorted(p.name for p in (workdir / "files").iterdir()) == sorted(
        f"{i}.jsonl" for i in ids
    )
    assert cluster.store.request_cancel(job_id).status == JobStatus.running
    worker.send_signal(signal.SIGTERM)  # warm shutdown: the running stage finishes first
    record = cluster.wait_done(job_id, allow_exit=True)
    assert record.status == JobStatus.cancelled, f"{record.error}\n{cluster.log_tail()}"
    assert record.result is None
    assert worker.wait(timeout=60) == 0, cluster.log_tail()

    # The running stage finished (drained, not abandoned); none after it started.
    states = _states(cluster, job_id)
    assert list(states) == STAGES[: STAGES.index((1, Stage.train)) + 1]
    assert all(s.status == StageStatus.done and s.attempts == 1 for s in states.values())
    assert not cluster.artifacts.exists(f"{job_id}/result")
    assert not workdir.exists()  # this machine's copy of the files is removed
    messages = [e.message for e in cluster.store.events(job_id, limit=1000)]
    assert messages.count("files validated; queued") == 1
    assert messages[-1] == "cancelled between stages"


# --------------------------------------------------------------------------- configuration


def test_app_configuration() -> None:
    from cotune.settings import Settings
    from workers.app import create_app

    conf = create_app(Settings(broker_url="redis://127.0.0.1:6379/15")).conf
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 1
    assert conf.accept_content == ["json"] and conf.task_serializer == "json"
    assert conf.result_accept_content == ["json"] and conf.result_serializer == "json"
    assert {(q.name, q.exchange.name, q.routing_key) for q in conf.task_queues} == {
        ("gpu", "gpu", "gpu"),
        ("cpu", "cpu", "cpu"),
    }
    assert conf.task_routes["cotune.advance_job"] == {"queue": "gpu"}
    for task in ("cotune.validate_job", "cotune.finalize_job", "cotune.reap_expired_leases"):
        assert conf.task_routes[task] == {"queue": "cpu"}
    reaper = conf.beat_schedule["reap-expired-leases"]
    assert reaper["task"] == "cotune.reap_expired_leases" and reaper["options"]["queue"] == "cpu"


def test_a_pending_message_is_found_in_queued_and_unacked_forms() -> None:
    import base64

    from workers.reaper import mentions as _mentions

    body = base64.b64encode(json.dumps([["job-7"], {}, {}]).encode()).decode()
    queued = json.dumps({"body": body, "headers": {"argsrepr": "['job-7']"}}).encode()
    unacked = json.dumps([{"body": body, "headers": {}}, "gpu", "gpu"]).encode()
    assert _mentions(queued, b"job-7") and _mentions(unacked, b"job-7")
    assert not _mentions(unacked, b"job-8") and not _mentions(b"not json", b"job-8")


def test_worker_arguments() -> None:
    from workers.main import worker_argv

    assert worker_argv() == [
        "worker",
        "-Q",
        "gpu,cpu",
        "--pool",
        "solo",
        "--concurrency",
        "1",
        "--loglevel",
        "info",
    ]
    assert worker_argv(["cpu"], "prefork", 4)[2:6] == ["cpu", "--pool", "prefork", "--concurrency"]
    with pytest.raises(ValueError, match="solo or threads"):
        worker_argv(["gpu"], "prefork", 1)
    with pytest.raises(ValueError, match="one stage at a time"):
        worker_argv(["gpu", "cpu"], "threads", 2)
    with pytest.raises(ValueError, match="queues must be among"):
        worker_argv(["default"])
