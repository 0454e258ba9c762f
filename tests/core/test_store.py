"""The job store on SQLite and PostgreSQL; the artifact store on a local folder, memory:// and
s3:// (moto's local S3-compatible server).

PostgreSQL: a database of its own per test session, created on the server at
``COTUNE_TEST_PG_URL`` (default ``postgresql+psycopg://postgres@127.0.0.1:5432/test``) and
dropped at the end; those tests skip when no server answers.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import PG_ADMIN_URL, fresh_pg_database
from sqlalchemy import Engine, create_engine, delete, text
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.engine import make_url

from cotune.records import (
    Candidate,
    ComponentEpochRecord,
    EpochRecord,
    Event,
    Stage,
    StageRecord,
)
from cotune.store import (
    MIGRATIONS_DIR,
    STAGE_TRANSITIONS,
    TRANSITIONS,
    ArtifactStore,
    IllegalTransition,
    JobNotFound,
    JobStatus,
    JobStore,
    StageKey,
    StageStatus,
    migrate,
)
from cotune.store.artifacts import validate_key
from cotune.store.models import Base, Job, StageRow
from cotune.store.status import LEASED, TERMINAL, stage_sources

REPO = Path(__file__).resolve().parents[2]

# --------------------------------------------------------------------------- fixtures


def _pg_admin_engine() -> Engine:
    return create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT", pool_pre_ping=True)


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database, migrated to head; dropped afterwards."""
    with fresh_pg_database("cotune_test") as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[JobStore]:
    """A migrated, empty JobStore on each backend."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'jobs.db'}"
        migrate(url)
    else:
        url = request.getfixturevalue("pg_url")
    s = JobStore(url)
    try:
        yield s
    finally:
        if request.param == "postgresql":  # one database for the session: empty it
            with s.engine.begin() as conn:
                for table in reversed(Base.metadata.sorted_tables):
                    conn.execute(delete(table))
        s.close()


def _job(store: JobStore, name: str = "j", **kw: object) -> str:
    return store.create_job(name, {"system": {"name": name}}, **kw)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- schema


def test_migrations_match_models(store: JobStore) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    with store.engine.connect() as conn, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SQLite cannot reflect expression indexes
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    # Expression indexes are skipped on SQLite and may be reported on PostgreSQL.
    diff = [d for d in diff if "uq_jobs_tenant_idempotency_key" not in repr(d)]
    assert diff == []


def test_alembic_command_line_uses_env_url(tmp_path: Path) -> None:
    db = tmp_path / "cli.db"
    env = {**os.environ, "COTUNE_DATABASE_URL": f"sqlite:///{db}"}
    subprocess.run(
        [sys.executable, "-m", "alembic", "-c", str(REPO / "alembic.ini"), "upgrade", "head"],
        check=True,
        env=env,
        cwd=tmp_path,
        capture_output=True,
    )
    with JobStore(f"sqlite:///{db}") as s:
        assert s.get_job(_job(s)) is not None
        with s.engine.connect() as conn:
            assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == (
                "0004_models"
            )


def test_migrate_is_idempotent_and_auto_migrate(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'x.db'}"
    migrate(url)
    migrate(url)
    with JobStore("sqlite://", auto_migrate=True) as mem:  # in-memory: same connection
        assert mem.get_job(_job(mem)) is not None


def test_concurrent_migrate_on_postgresql(pg_url: str) -> None:
    """Processes starting together migrate a fresh database once (an advisory lock)."""
    admin = _pg_admin_engine()
    name = f"cotune_mig_{uuid.uuid4().hex[:12]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(pg_url).set(database=name).render_as_string(hide_password=False)
    code = f"from cotune.store import migrate; migrate({url!r})"
    try:
        procs = [
            subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE) for _ in range(3)
        ]
        errors = [p.communicate(timeout=120)[1].decode() for p in procs]
        assert [p.returncode for p in procs] == [0, 0, 0], errors
        with JobStore(url) as s:
            assert s.get_job(_job(s)) is not None
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def _alembic_downgrade(url: str, revision: str) -> None:
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["url"] = url
    command.downgrade(cfg, revision)


def _schema_diff(url: str) -> list[Any]:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    engine = create_engine(url)
    try:
        with engine.connect() as conn, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    finally:
        engine.dispose()
    return [d for d in diff if "uq_jobs_tenant_idempotency_key" not in repr(d)]


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_stage_component_migration_keeps_stage_rows(backend: str, tmp_path: Path) -> None:
    """A database at 0002 with stage rows upgrades to head: every row is the whole job's
    stage (component ''), as it was; a downgrade drops per-component rows only."""
    with contextlib.ExitStack() as stack:
        if backend == "sqlite":
            url = f"sqlite:///{tmp_path / 'old.db'}"
            migrate(url, revision="0002_accounts")
        else:
            url = stack.enter_context(fresh_pg_database("cotune_mig3"))
            _alembic_downgrade(url, "0002_accounts")
        started = datetime(2025, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
        engine = create_engine(url)
        stack.callback(engine.dispose)
        with engine.begin() as conn:  # 0002's stages table: no component column
            assert "component" not in {c["name"] for c in sa_inspect(conn).get_columns("stages")}
            conn.execute(
                Job.__table__.insert().values(
                    id="job-old",
                    tenant_id=None,
                    name="old",
                    status=JobStatus.running.value,
                    spec={"system": {"name": "old"}},
                    created_at=started,
                    updated_at=started,
                    cancel_requested=False,
                )
            )
            old_rows = [
                dict(
                    stage=Stage.rollout.value,
                    status=StageStatus.done.value,
                    attempts=2,
                    lease_owner="w1",
                    started_at=started,
                    finished_at=started + timedelta(seconds=3),
                    record=_rec(1, Stage.rollout, seconds=3.0).model_dump(mode="json"),
                    output_key="job-old/e1/rollout.json",
                ),
                dict(
                    stage=Stage.credit.value,
                    status=StageStatus.running.value,
                    attempts=1,
                    lease_owner="w2",
                    lease_expires_at=started + timedelta(hours=1),
                    started_at=started,
                ),
            ]
            for row in old_rows:
                conn.execute(StageRow.__table__.insert().values(job_id="job-old", epoch=1, **row))
        if backend == "sqlite":  # the embedded mode migrates on open
            JobStore(url, auto_migrate=True).close()
        else:
            migrate(url)
        assert _schema_diff(url) == []
        with JobStore(url) as s:
            rollout, credit = s.stage_states("job-old")
            assert (rollout.stage, rollout.component, rollout.status) == (
                Stage.rollout,
                "",
                StageStatus.done,
            )
            assert rollout.record == _rec(1, Stage.rollout, seconds=3.0)
            assert rollout.attempts == 2 and rollout.lease_owner == "w1"
            assert rollout.started_at == started and rollout.output_key is not None
            assert s.stage_done("job-old", 1, Stage.rollout) == rollout.record
            assert (credit.component, credit.status, credit.lease_owner) == (
                "",
                StageStatus.running,
                "w2",
            )
            assert credit.lease_expires_at == started + timedelta(hours=1)
            # the old rows keep their key; components get rows of their own
            assert s.claim_stage("job-old", 1, Stage.rollout, "w9", 60) is False
            assert s.claim_stage("job-old", 1, Stage.rollout, "w9", 60, component="answer")
            assert s.heartbeat("job-old", 1, Stage.credit, "w2", 60)
            assert len(s.stage_states("job-old")) == 3
        _alembic_downgrade(url, "0002_accounts")
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT stage FROM stages ORDER BY stage")).scalars().all()
            assert rows == ["credit", "rollout"]  # the per-component row went
        migrate(url)
        assert _schema_diff(url) == []
        with JobStore(url) as s:
            assert [x.stage for x in s.stage_states("job-old")] == [Stage.rollout, Stage.credit]


def test_sqlite_pragmas(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'p.db'}"
    with JobStore(url) as s, s.engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
        assert conn.execute(text("PRAGMA busy_timeout")).scalar() == 30000


# --------------------------------------------------------------------------- jobs


def test_create_and_get_job(store: JobStore) -> None:
    job_id = store.create_job("kb-qa", {"system": {"name": "kb-qa"}, "loop": {"epochs": 2}})
    assert job_id.startswith("job-") and len(job_id) == 28
    job = store.get_job(job_id)
    assert job is not None
    assert job.name == "kb-qa" and job.status == JobStatus.queued
    assert job.spec == {"system": {"name": "kb-qa"}, "loop": {"epochs": 2}}
    assert job.created_at.tzinfo is not None and job.created_at.utcoffset() == timedelta(0)
    assert abs((datetime.now(UTC) - job.created_at).total_seconds()) < 60
    assert not job.cancel_requested and job.result is None
    assert store.get_job("job-nope") is None
    v = _job(store, status=JobStatus.validating_files)
    assert store.get_job(v).status == JobStatus.validating_files  # type: ignore[union-attr]


def test_idempotency_key(store: JobStore) -> None:
    a = _job(store, tenant_id="t1", idempotency_key="k1")
    assert _job(store, tenant_id="t1", idempotency_key="k1") == a
    assert _job(store, tenant_id="t2", idempotency_key="k1") != a  # another tenant
    assert _job(store, tenant_id="t1", idempotency_key="k2") != a
    none_tenant = _job(store, idempotency_key="k1")
    assert _job(store, idempotency_key="k1") == none_tenant  # no tenant is a tenant too
    assert _job(store) != _job(store)  # no key: always new
    assert store.count_jobs() == 6


def test_idempotency_key_race(store: JobStore) -> None:
    ids: list[str] = []
    barrier = threading.Barrier(4)

    def create() -> None:
        barrier.wait()
        ids.append(_job(store, tenant_id="t", idempotency_key="same"))

    threads = [threading.Thread(target=create) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(ids) == 4 and len(set(ids)) == 1
    assert store.count_jobs("t") == 1


def test_tenant_scoping(store: JobStore) -> None:
    a = _job(store, tenant_id="acme")
    b = _job(store, tenant_id="other")
    assert store.get_job(a, tenant_id="acme") is not None
    assert store.get_job(a, tenant_id="other") is None
    assert store.get_job(a) is not None  # unscoped (workers)
    assert [j.id for j in store.list_jobs("acme").data] == [a]
    assert [j.id for j in store.list_jobs("other").data] == [b]
    assert {j.id for j in store.list_jobs().data} == {a, b}
    with pytest.raises(JobNotFound):
        store.list_jobs("acme", after=b)  # a cursor from another tenant
    assert store.count_jobs("acme", [JobStatus.queued]) == 1
    assert store.count_jobs("acme", [JobStatus.running]) == 0


def test_list_jobs_cursor_pagination(store: JobStore) -> None:
    ids = [_job(store, f"j{i}", tenant_id="t") for i in range(7)]
    seen: list[str] = []
    after = None
    pages = 0
    while True:
        page = store.list_jobs("t", after=after, limit=3)
        seen += [j.id for j in page.data]
        pages += 1
        if not page.has_more:
            break
        after = page.data[-1].id
    assert pages == 3
    assert seen == list(reversed(ids))  # newest first, each once
    assert store.list_jobs("t", limit=7).has_more is False
    with pytest.raises(ValueError):
        store.list_jobs("t", limit=0)


def test_transitions_table() -> None:
    assert TRANSITIONS[JobStatus.validating_files] == {
        JobStatus.queued,
        JobStatus.failed,
        JobStatus.cancelled,
    }
    assert TRANSITIONS[JobStatus.queued] == {
        JobStatus.running,
        JobStatus.cancelled,
        JobStatus.failed,
    }
    assert TRANSITIONS[JobStatus.running] == {
        JobStatus.succeeded,
        JobStatus.failed,
        JobStatus.cancelled,
        JobStatus.queued,
    }
    assert {JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled} == TERMINAL
    # Succeeded and cancelled are final; a failed job has one way out, its owner resuming it
    # (``cotune run --resume``, through ``Lifecycle.resume``): no runner picks it up.
    assert not TRANSITIONS[JobStatus.succeeded] and not TRANSITIONS[JobStatus.cancelled]
    assert TRANSITIONS[JobStatus.failed] == {JobStatus.queued}
    assert [s.value for s in JobStatus] == [
        "validating_files",
        "queued",
        "running",
        "succeeded",
        "failed",
        "cancelled",
    ]


def test_transition_legal_and_illegal(store: JobStore) -> None:
    for src in JobStatus:
        for dst in JobStatus:
            job_id = _job(store)
            # walk the job to `src` along legal moves
            path = {
                JobStatus.validating_files: [],
                JobStatus.queued: [],
                JobStatus.running: [JobStatus.running],
                JobStatus.succeeded: [JobStatus.running, JobStatus.succeeded],
                JobStatus.failed: [JobStatus.failed],
                JobStatus.cancelled: [JobStatus.cancelled],
            }[src]
            if src == JobStatus.validating_files:
                job_id = _job(store, status=JobStatus.validating_files)
            for step in path:
                store.transition(job_id, step)
            if dst in TRANSITIONS[src]:
                job = store.transition(job_id, dst, error="boom" if dst == "failed" else None)
                assert job.status == dst
                if dst == JobStatus.failed:
                    assert job.error == "boom"
            else:
                with pytest.raises(IllegalTransition) as info:
                    store.transition(job_id, dst)
                assert (info.value.from_status, info.value.to_status) == (src, dst)
                assert info.value.job_id == job_id
                assert store.get_job(job_id).status == src  # type: ignore[union-attr]
    with pytest.raises(JobNotFound):
        store.transition("job-missing", JobStatus.running)


def test_a_transition_writes_its_event_in_the_same_transaction(store: JobStore) -> None:
    """A reader that sees a job succeeded must find its "succeeded" event too (an event
    stream ended between the two, missing the last event); a refused move writes nothing."""
    job_id = _job(store)
    moved = store.transition(
        job_id, JobStatus.cancelled, event=Event(message="cancelled between stages")
    )
    assert moved.status == JobStatus.cancelled
    assert [e.message for e in store.events(job_id)] == ["cancelled between stages"]
    with pytest.raises(IllegalTransition):
        store.transition(job_id, JobStatus.running, event=Event(message="running"))
    assert [e.message for e in store.events(job_id)] == ["cancelled between stages"]


def test_a_transition_from_an_expected_status_only(store: JobStore) -> None:
    """``only_from``: a step that read one status must not move a job someone else moved
    meanwhile (a late validation must not revive a job that failed in between)."""
    job_id = _job(store, status=JobStatus.validating_files)
    store.transition(job_id, JobStatus.failed, error="boom")
    with pytest.raises(IllegalTransition):
        store.transition(job_id, JobStatus.queued, only_from=JobStatus.validating_files)
    assert store.get_job(job_id).status == JobStatus.failed  # type: ignore[union-attr]
    assert store.transition(job_id, JobStatus.queued, only_from=JobStatus.failed).status == (
        JobStatus.queued
    )


def test_transition_cas_race(store: JobStore) -> None:
    """Many threads move the same queued job to running at once: exactly one wins."""
    n = 6
    for _ in range(3):
        job_id = _job(store)
        barrier = threading.Barrier(n)
        wins: list[str] = []
        losses: list[IllegalTransition] = []
        errors: list[BaseException] = []

        def go(
            job_id: str = job_id,
            barrier: threading.Barrier = barrier,
            wins: list[str] = wins,
            losses: list[IllegalTransition] = losses,
            errors: list[BaseException] = errors,
        ) -> None:
            barrier.wait()
            try:
                store.transition(job_id, JobStatus.running)
                wins.append("ok")
            except IllegalTransition as exc:
                losses.append(exc)
            except BaseException as exc:  # pragma: no cover - shows up in the assert
                errors.append(exc)

        threads = [threading.Thread(target=go) for _ in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert len(wins) == 1 and len(losses) == n - 1
        assert all(
            (e.from_status, e.to_status) == (JobStatus.running, JobStatus.running) for e in losses
        )


def test_requeue_after_lost_worker(store: JobStore) -> None:
    job_id = _job(store)
    store.transition(job_id, JobStatus.running)
    store.transition(job_id, JobStatus.queued)
    assert store.transition(job_id, JobStatus.running).status == JobStatus.running


def test_cancel(store: JobStore) -> None:
    queued = _job(store)
    job = store.request_cancel(queued)
    assert job.status == JobStatus.cancelled and job.cancel_requested
    running = _job(store)
    store.transition(running, JobStatus.running)
    job = store.request_cancel(running)
    assert job.status == JobStatus.running and job.cancel_requested  # the worker stops it
    assert store.cancel_requested(running) and not store.cancel_requested(_job(store))
    assert store.transition(running, JobStatus.cancelled).status == JobStatus.cancelled
    done = _job(store)
    store.transition(done, JobStatus.running)
    store.transition(done, JobStatus.succeeded)
    with pytest.raises(IllegalTransition) as info:
        store.request_cancel(done)
    assert info.value.from_status == JobStatus.succeeded
    assert not store.get_job(done).cancel_requested  # type: ignore[union-attr]
    assert store.request_cancel(queued).status == JobStatus.cancelled  # again: a no-op
    with pytest.raises(JobNotFound):
        store.request_cancel("job-missing")
    with pytest.raises(JobNotFound):
        store.cancel_requested("job-missing")


def test_result_and_delete(store: JobStore) -> None:
    job_id = _job(store)
    store.set_result(job_id, {"best_epoch": 2, "test_score": 0.5})
    assert store.get_job(job_id).result == {"best_epoch": 2, "test_score": 0.5}  # type: ignore[union-attr]
    with pytest.raises(JobNotFound):
        store.set_result("job-missing", {})
    store.claim_stage(job_id, 1, Stage.rollout, "w", 60)
    store.add_event(job_id, Event(message="hi"))
    store.save_epoch(job_id, EpochRecord(epoch=1))
    store.add_candidates(job_id, [_cand(1, True)])
    store.add_artifact(job_id, f"{job_id}/report.json", kind="report")
    assert store.delete_job(job_id) is True
    assert store.get_job(job_id) is None
    assert store.stage_states(job_id) == [] and store.events(job_id) == []
    assert store.epochs(job_id) == [] and store.candidates(job_id) == []
    assert store.artifacts(job_id) == []
    assert store.delete_job(job_id) is False


# --------------------------------------------------------------------------- stages


def _rec(epoch: int, stage: Stage, **kw: Any) -> StageRecord:
    return StageRecord(epoch=epoch, stage=stage, **kw)


def test_claim_finish_and_idempotence(store: JobStore) -> None:
    job_id = _job(store)
    assert store.stage_done(job_id, 1, Stage.rollout) is None
    assert store.claim_stage(job_id, 1, Stage.rollout, "w1", 60) is True
    assert store.claim_stage(job_id, 1, Stage.rollout, "w2", 60) is False  # live lease
    state = store.stage(job_id, 1, "rollout")
    assert state is not None and state.status == StageStatus.running
    assert state.lease_owner == "w1" and state.attempts == 1
    assert state.lease_expires_at is not None and state.lease_expires_at.tzinfo is not None
    assert store.heartbeat(job_id, 1, Stage.rollout, "w1", 60) is True
    assert store.heartbeat(job_id, 1, Stage.rollout, "w2", 60) is False

    rec = _rec(1, Stage.rollout, seconds=1.5, engine_calls=10, details={"traces": 4})
    assert store.finish_stage(job_id, 1, Stage.rollout, "w2", rec) is False  # not the holder
    assert store.finish_stage(job_id, 1, Stage.rollout, "w1", rec, "job/1/rollout.jsonl")
    assert store.stage_done(job_id, 1, Stage.rollout) == rec
    # idempotent: finishing again (or by a late duplicate) changes nothing
    other = _rec(1, Stage.rollout, seconds=99.0)
    assert store.finish_stage(job_id, 1, Stage.rollout, "w1", other) is True
    assert store.finish_stage(job_id, 1, Stage.rollout, "w9", other) is True
    assert store.stage_done(job_id, 1, Stage.rollout) == rec
    state = store.stage(job_id, 1, Stage.rollout)
    assert state is not None and state.status == StageStatus.done
    assert state.output_key == "job/1/rollout.jsonl" and state.record == rec
    assert store.claim_stage(job_id, 1, Stage.rollout, "w3", 60) is False  # done
    assert store.heartbeat(job_id, 1, Stage.rollout, "w1", 60) is False
    with pytest.raises(ValueError):
        store.finish_stage(job_id, 1, Stage.credit, "w1", rec)  # record of another stage
    with pytest.raises(JobNotFound):
        store.claim_stage("job-missing", 1, Stage.rollout, "w1", 60)


def test_lease_expiry_and_takeover(store: JobStore) -> None:
    job_id = _job(store)
    assert store.claim_stage(job_id, 2, Stage.train, "old", 0.3)
    assert store.expired_stages() == []
    future = datetime.now(UTC) + timedelta(seconds=5)
    assert store.expired_stages(now=future) == [(job_id, 2, Stage.train, "")]
    time.sleep(0.5)
    [key] = store.expired_stages()
    assert key.job_id == job_id and key.epoch == 2 and key.stage is Stage.train
    # the old owner can still heartbeat while nobody took over...
    assert store.heartbeat(job_id, 2, Stage.train, "old", 0.3)
    time.sleep(0.5)
    # ...but once another owner claims the expired lease, the old one is out
    assert store.claim_stage(job_id, 2, Stage.train, "new", 60)
    assert store.expired_stages() == []
    assert store.heartbeat(job_id, 2, Stage.train, "old", 60) is False
    rec = _rec(2, Stage.train, trained_tokens=1000)
    assert store.finish_stage(job_id, 2, Stage.train, "old", rec) is False
    assert store.fail_stage(job_id, 2, Stage.train, "old", "lost") is False
    state = store.stage(job_id, 2, Stage.train)
    assert state is not None and state.lease_owner == "new" and state.attempts == 2
    assert store.finish_stage(job_id, 2, Stage.train, "new", rec)
    assert store.stage_done(job_id, 2, Stage.train) == rec


def test_stalled_jobs_are_running_jobs_idle_between_stages(store: JobStore) -> None:
    job_id = _job(store)
    later = datetime.now(UTC) + timedelta(seconds=60)
    assert store.get_job(job_id).status == JobStatus.queued  # type: ignore[union-attr]
    assert store.stalled_jobs(30, now=later) == []  # queued: waiting for a worker is normal
    store.transition(job_id, JobStatus.running)
    assert store.stalled_jobs(30) == []  # it just started
    [(stalled, since)] = store.stalled_jobs(30, now=later)
    assert stalled == job_id and since <= datetime.now(UTC)
    assert store.claim_stage(job_id, 1, Stage.rollout, "w1", 0.1)
    time.sleep(0.2)
    # A running stage, even with its lease expired, is expired_stages()'s business.
    assert store.stalled_jobs(30, now=later) == []
    assert store.finish_stage(job_id, 1, Stage.rollout, "w1", _rec(1, Stage.rollout))
    [(_, finished)] = store.stalled_jobs(30, now=later)
    assert finished > since  # idle since the stage finished, not since the job started
    assert store.stalled_jobs(30, now=finished + timedelta(seconds=29)) == []
    store.transition(job_id, JobStatus.succeeded)
    assert store.stalled_jobs(30, now=later) == []


def test_stalled_jobs_in_other_statuses_when_asked(store: JobStore) -> None:
    """The reaper also looks at validating and queued jobs (their message may be lost too)."""
    unfinished = (JobStatus.validating_files, JobStatus.queued, JobStatus.running)
    later = datetime.now(UTC) + timedelta(seconds=60)
    checking = _job(store, status=JobStatus.validating_files)
    waiting = _job(store)
    done = _job(store)
    store.transition(done, JobStatus.cancelled)
    found = {job for job, _ in store.stalled_jobs(30, now=later, statuses=unfinished)}
    assert found == {checking, waiting}
    assert store.stalled_jobs(30, statuses=unfinished) == []  # nothing is idle yet


def test_claim_race(store: JobStore) -> None:
    job_id = _job(store)
    n = 6
    barrier = threading.Barrier(n)
    results: list[bool] = []

    def go(i: int) -> None:
        barrier.wait()
        results.append(store.claim_stage(job_id, 1, Stage.credit, f"w{i}", 60))

    threads = [threading.Thread(target=go, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False] * (n - 1) + [True]


def test_fail_and_retry(store: JobStore) -> None:
    job_id = _job(store)
    assert store.claim_stage(job_id, 1, Stage.verify, "w1", 60)
    assert store.fail_stage(job_id, 1, Stage.verify, "w1", "OOM")
    state = store.stage(job_id, 1, Stage.verify)
    assert state is not None and state.status == StageStatus.failed and state.error == "OOM"
    assert store.claim_stage(job_id, 1, Stage.verify, "w2", 60)  # retry
    state = store.stage(job_id, 1, Stage.verify)
    assert state is not None and state.attempts == 2 and state.error is None
    assert store.finish_stage(job_id, 1, Stage.verify, "w2", _rec(1, Stage.verify))


def test_stages_listing_order(store: JobStore) -> None:
    job_id = _job(store)
    for epoch, stage in [
        (1, Stage.train),
        (0, Stage.baseline),
        (1, Stage.rollout),
        (2, Stage.rollout),
        (1, Stage.credit),
    ]:
        store.claim_stage(job_id, epoch, stage, "w", 60)
    assert store.stages(job_id) == []  # none finished yet
    store.finish_stage(job_id, 1, Stage.credit, "w", _rec(1, Stage.credit, judge_calls=3))
    store.finish_stage(job_id, 0, Stage.baseline, "w", _rec(0, Stage.baseline))
    assert store.stages(job_id) == [_rec(0, Stage.baseline), _rec(1, Stage.credit, judge_calls=3)]
    assert [(s.epoch, s.stage) for s in store.stage_states(job_id)] == [
        (0, Stage.baseline),
        (1, Stage.rollout),
        (1, Stage.credit),
        (1, Stage.train),
        (2, Stage.rollout),
    ]


def test_stage_transitions_table() -> None:
    expected = {
        StageStatus.pending: {StageStatus.running},
        # the holder renewing, or a takeover of an expired lease; the holder finishing
        StageStatus.running: {StageStatus.running, StageStatus.done, StageStatus.failed},
        StageStatus.failed: {StageStatus.running},  # a retry
        StageStatus.done: set(),
    }
    assert expected == STAGE_TRANSITIONS
    assert stage_sources(StageStatus.running) == {
        StageStatus.pending,
        StageStatus.running,
        StageStatus.failed,
    }
    assert stage_sources("done") == stage_sources(StageStatus.failed) == {StageStatus.running}
    assert stage_sources(StageStatus.pending) == set()
    assert {StageStatus.running} == LEASED
    assert [s.value for s in StageStatus] == ["pending", "running", "done", "failed"]


def _stage_in(store: JobStore, status: StageStatus, epoch: int = 1) -> str:
    """A job with a verify stage row in ``status``, last held by "w1"."""
    job_id = _job(store)
    if status == StageStatus.pending:  # the store never writes one: put it there directly
        with store.engine.begin() as conn:
            conn.execute(
                StageRow.__table__.insert().values(
                    job_id=job_id,
                    epoch=epoch,
                    stage=Stage.verify.value,
                    status=StageStatus.pending.value,
                    attempts=0,
                    lease_owner="w1",  # so that only its status can refuse a move
                )
            )
        return job_id
    assert store.claim_stage(job_id, epoch, Stage.verify, "w1", 60)
    if status == StageStatus.done:
        assert store.finish_stage(job_id, epoch, Stage.verify, "w1", _rec(epoch, Stage.verify))
    elif status == StageStatus.failed:
        assert store.fail_stage(job_id, epoch, Stage.verify, "w1", "OOM")
    return job_id


def test_illegal_stage_moves_are_refused(store: JobStore) -> None:
    """Every move of a stage row, tried from every status by the row's last holder: the store
    makes the legal ones and refuses the rest, leaving the row as it was."""
    moves = {  # each method, the status it moves a stage to, and where it may do so from
        "claim": (StageStatus.running, {"pending", "running", "failed"}),
        "heartbeat": (StageStatus.running, {"running"}),  # the holder renewing only
        "finish": (StageStatus.done, {"running"}),
        "fail": (StageStatus.failed, {"running"}),
    }
    for name, (to, legal_from) in moves.items():
        assert legal_from <= stage_sources(to)  # the table allows every legal move
        for src in StageStatus:
            job_id = _stage_in(store, src)
            before = store.stage(job_id, 1, Stage.verify)
            assert before is not None and before.status == src
            answer = {
                "claim": lambda j: store.claim_stage(j, 1, Stage.verify, "w1", 60),
                "heartbeat": lambda j: store.heartbeat(j, 1, Stage.verify, "w1", 60),
                "finish": lambda j: store.finish_stage(
                    j, 1, Stage.verify, "w1", _rec(1, Stage.verify, seconds=9.0)
                ),
                "fail": lambda j: store.fail_stage(j, 1, Stage.verify, "w1", "again"),
            }[name](job_id)
            after = store.stage(job_id, 1, Stage.verify)
            assert after is not None
            if src.value in legal_from:
                assert answer is True, (name, src)
                assert after.status == to and after != before, (name, src)
            else:
                # finishing a done stage answers True (it is done), and changes nothing either
                assert answer is (name == "finish" and src == StageStatus.done), (name, src)
                assert after == before, (name, src)


def test_the_store_takes_stage_moves_from_the_table(
    store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Take moves out of ``STAGE_TRANSITIONS`` and the store no longer makes them."""
    failed = _stage_in(store, StageStatus.failed)
    running = _stage_in(store, StageStatus.running)
    monkeypatch.setitem(STAGE_TRANSITIONS, StageStatus.failed, set())  # no retry
    assert store.claim_stage(failed, 1, Stage.verify, "w2", 60) is False
    monkeypatch.setitem(STAGE_TRANSITIONS, StageStatus.running, {StageStatus.done})
    assert store.heartbeat(running, 1, Stage.verify, "w1", 60) is False  # no renewal
    assert store.claim_stage(running, 1, Stage.verify, "w1", 60) is False
    assert store.fail_stage(running, 1, Stage.verify, "w1", "x") is False
    monkeypatch.setitem(STAGE_TRANSITIONS, StageStatus.pending, set())
    fresh = _job(store)
    assert store.claim_stage(fresh, 1, Stage.verify, "w1", 60) is False  # no first claim
    assert store.stage_states(fresh) == []
    assert store.stage(failed, 1, Stage.verify).status == StageStatus.failed  # type: ignore[union-attr]
    assert store.finish_stage(running, 1, Stage.verify, "w1", _rec(1, Stage.verify))
    monkeypatch.undo()
    assert store.claim_stage(failed, 1, Stage.verify, "w2", 60)


def test_stages_per_component(store: JobStore) -> None:
    """Rows of one (job, epoch, stage) for several components, beside the whole job's."""
    job_id = _job(store)
    verify = Stage.verify
    assert store.claim_stage(job_id, 1, verify, "w0", 60)  # the whole job's stage
    assert store.claim_stage(job_id, 1, verify, "w1", 60, component="answer")
    assert store.claim_stage(job_id, 1, verify, "w2", 0.2, component="query")
    assert store.claim_stage(job_id, 1, verify, "w3", 60, component="answer") is False
    assert store.heartbeat(job_id, 1, verify, "w1", 60, component="answer")
    assert store.heartbeat(job_id, 1, verify, "w1", 60, component="query") is False
    assert store.heartbeat(job_id, 1, verify, "w1", 60) is False  # not w1's
    answer = _rec(1, verify, judge_calls=4, details={"verified": 3})
    assert store.finish_stage(job_id, 1, verify, "w1", answer, "k/answer", component="answer")
    assert store.stage_done(job_id, 1, verify, component="answer") == answer
    assert store.stage_done(job_id, 1, verify, component="query") is None
    assert store.stage_done(job_id, 1, verify) is None  # the whole job's: still running
    assert store.stage(job_id, 1, verify, component="other") is None
    # the query component's lease runs out: the reaper names the component
    future = datetime.now(UTC) + timedelta(seconds=5)
    assert store.expired_stages(now=future) == [StageKey(job_id, 1, verify, "query")]
    assert store.expired_stages(now=future)[0].component == "query"
    later = [k.component for k in store.expired_stages(now=future + timedelta(minutes=2))]
    assert later == ["query", ""]  # the answer component is done
    time.sleep(0.3)
    assert store.claim_stage(job_id, 1, verify, "w4", 60, component="query")  # a takeover
    assert store.fail_stage(job_id, 1, verify, "w2", "lost", component="query") is False
    assert store.fail_stage(job_id, 1, verify, "w4", "OOM", component="query")
    assert store.claim_stage(job_id, 1, verify, "w5", 60, component="query")  # a retry
    whole = _rec(1, verify, judge_calls=9)
    assert store.finish_stage(job_id, 1, verify, "w0", whole, "k/whole")
    states = store.stage_states(job_id)
    assert [(s.component, s.status, s.lease_owner, s.attempts) for s in states] == [
        ("", StageStatus.done, "w0", 1),
        ("answer", StageStatus.done, "w1", 1),
        ("query", StageStatus.running, "w5", 3),
    ]
    assert states[0].record == whole and states[0].output_key == "k/whole"
    assert states[1].record == answer and states[1].output_key == "k/answer"
    assert store.stage_done(job_id, 1, verify) == whole
    assert store.stage(job_id, 1, verify) == states[0]
    assert store.stage(job_id, 1, verify, component="answer") == states[1]
    assert store.stages(job_id) == [whole, answer]
    with pytest.raises(ValueError):
        store.claim_stage(job_id, 1, verify, "w1", 60, component="c" * 65)
    assert store.claim_stage(job_id, 1, verify, "w1", 60, component="c" * 64)


# --------------------------------------------------------------------------- events etc.


def test_events_pagination(store: JobStore) -> None:
    job_id = _job(store)
    other = _job(store)
    ids = [store.add_event(job_id, Event(message=f"m{i}", data={"i": i})) for i in range(25)]
    store.add_event(other, Event(message="elsewhere"))
    ts = time.time() - 100
    ids.append(store.add_event(job_id, Event(level="warning", message="old", created_at=ts)))
    assert ids == sorted(ids) and len(set(ids)) == 26
    first = store.events(job_id, limit=10)
    assert [e.message for e in first] == [f"m{i}" for i in range(10)]
    assert first[3].data == {"i": 3} and first[0].job_id == job_id
    assert first[0].created_at is not None and abs(first[0].created_at - time.time()) < 60
    rest = store.events(job_id, after_id=first[-1].id, limit=100)
    assert [e.id for e in rest] == ids[10:]
    assert rest[-1].level == "warning" and rest[-1].created_at == pytest.approx(ts, abs=1e-5)
    assert store.events(job_id, after_id=ids[-1]) == []
    with pytest.raises(JobNotFound):
        store.add_event("job-missing", Event(message="x"))


def test_epochs_upsert(store: JobStore) -> None:
    job_id = _job(store)
    store.save_epoch(job_id, EpochRecord(epoch=2, val_score=0.4))
    store.save_epoch(job_id, EpochRecord(epoch=1, val_score=0.3))
    comp = ComponentEpochRecord(epoch=1, component="answer", samples=12, sft_losses=[1.0, 0.5])
    store.save_epoch(job_id, EpochRecord(epoch=1, val_score=0.35, kept=True, components=[comp]))
    epochs = store.epochs(job_id)
    assert [e.epoch for e in epochs] == [1, 2]
    assert epochs[0].val_score == 0.35 and epochs[0].kept
    assert epochs[0].components == [comp]
    assert epochs[1].val_score == 0.4


def _cand(epoch: int, accepted: bool, component: str = "answer", **kw: object) -> Candidate:
    base: dict[str, object] = dict(
        epoch=epoch,
        trace_id=f"tr-{uuid.uuid4().hex[:6]}",
        example_id="ex-1",
        component=component,
        source="judge",
        proposed_output={"answer": "Paris"},
        original_output="Lyon",
        original_score=0.0,
        replay_scores=[1.0],
        accepted=accepted,
    )
    base.update(kw)
    return Candidate.model_validate(base)


def test_candidates_filter(store: JobStore) -> None:
    job_id = _job(store)
    c = [
        _cand(1, True),
        _cand(1, False),
        _cand(1, True, "query"),
        _cand(2, False),
        _cand(2, True, critique="wrong city"),
    ]
    assert store.add_candidates(job_id, c) == 5
    assert store.candidates(job_id) == c
    assert store.candidates(job_id, epoch=1) == c[:3]
    assert store.candidates(job_id, accepted=True) == [c[0], c[2], c[4]]
    assert store.candidates(job_id, epoch=2, accepted=False) == [c[3]]
    assert store.candidates(job_id, component="query") == [c[2]]
    # a stage that runs twice: replace its epoch's candidates
    again = [_cand(1, False)]
    store.add_candidates(job_id, again, replace_epoch=1)
    assert store.candidates(job_id, epoch=1) == again
    assert store.candidates(job_id, epoch=2) == c[3:]
    with pytest.raises(ValueError):
        store.add_candidates(job_id, [_cand(2, True)], replace_epoch=1)
    assert store.add_candidates(job_id, []) == 0


def test_artifacts_records(store: JobStore) -> None:
    job_id = _job(store)
    a = store.add_artifact(
        job_id,
        f"{job_id}/e1/answer",
        kind="adapter",
        epoch=1,
        component="answer",
        sha256="ab" * 32,
        nbytes=10,
    )
    b = store.add_artifact(job_id, f"{job_id}/report.json", kind="report")
    again = store.add_artifact(
        job_id,
        f"{job_id}/e1/answer",
        kind="adapter",
        epoch=1,
        component="answer",
        sha256="cd" * 32,
        nbytes=20,
    )
    assert again == a and b != a
    arts = store.artifacts(job_id)
    assert [x.key for x in arts] == [f"{job_id}/e1/answer", f"{job_id}/report.json"]
    assert arts[0].sha256 == "cd" * 32 and arts[0].nbytes == 20 and arts[0].component == "answer"
    assert [x.kind for x in store.artifacts(job_id, kind="report")] == ["report"]
    assert len(store.artifacts(job_id, epoch=1)) == 1


# --------------------------------------------------------------------------- artifact store


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """moto's S3-compatible server on a free local port, with a bucket ``cotune``; s3fs finds
    it through ``AWS_ENDPOINT_URL``, as the service's workers find MinIO (docker-compose.yml)."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ENDPOINT_URL", endpoint)
        mp.setenv("AWS_ACCESS_KEY_ID", "cotune-test")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "cotune-test-secret")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        import fsspec

        fsspec.filesystem("s3", skip_instance_cache=True).mkdir("cotune")
        try:
            yield endpoint
        finally:
            server.stop()


@pytest.fixture(params=["local", "memory", "s3"])
def artifacts(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ArtifactStore]:
    if request.param == "local":
        yield ArtifactStore(str(tmp_path / "artifacts"))
    elif request.param == "s3":
        request.getfixturevalue("s3_endpoint")
        yield ArtifactStore(f"s3://cotune/test-{uuid.uuid4().hex[:8]}")
    else:
        root = f"memory://cotune-test-{uuid.uuid4().hex[:8]}/arts"
        store = ArtifactStore(root)
        yield store
        if store.fs.exists(store._base):
            store.fs.rm(store._base, recursive=True)


def test_artifacts_roundtrip(artifacts: ArtifactStore) -> None:
    a = artifacts
    a.put_bytes("job-1/raw.bin", b"\x00\x01\x02")
    assert a.get_bytes("job-1/raw.bin") == b"\x00\x01\x02"
    a.put_text("job-1/notes.txt", "héllo")
    assert a.get_text("job-1/notes.txt") == "héllo"
    a.put_json("job-1/e1/metrics.json", {"score": 0.5, "names": ["é"]})
    assert a.get_json("job-1/e1/metrics.json") == {"score": 0.5, "names": ["é"]}
    a.put_json("job-1/e1/epoch.json", EpochRecord(epoch=1, val_score=0.2))
    assert EpochRecord.model_validate(a.get_json("job-1/e1/epoch.json")).val_score == 0.2
    a.put_bytes("job-1/raw.bin", b"new")  # overwrite
    assert a.get_bytes("job-1/raw.bin") == b"new"
    assert a.exists("job-1/raw.bin") and a.exists("job-1/e1") and not a.exists("job-2")
    assert a.isfile("job-1/raw.bin") and not a.isfile("job-1/e1")
    assert a.size("job-1/raw.bin") == 3
    import hashlib

    assert a.sha256("job-1/raw.bin") == hashlib.sha256(b"new").hexdigest()
    with a.open_read("job-1/raw.bin") as f:
        assert f.read() == b"new"
    assert a.list("job-1") == [
        "job-1/e1/epoch.json",
        "job-1/e1/metrics.json",
        "job-1/notes.txt",
        "job-1/raw.bin",
    ]
    assert a.list("job-1/e1") == ["job-1/e1/epoch.json", "job-1/e1/metrics.json"]
    assert a.list("job-1/raw.bin") == ["job-1/raw.bin"]
    assert a.list("nothing") == []
    assert len(a.list()) == 4
    with pytest.raises(FileNotFoundError):
        a.get_bytes("job-1/missing")
    with pytest.raises(FileNotFoundError):
        a.get_bytes("job-1/e1")  # a folder is not a file
    a.delete("job-1/e1")
    assert a.list("job-1") == ["job-1/notes.txt", "job-1/raw.bin"]
    a.delete("job-1/raw.bin")
    a.delete("job-1/raw.bin")  # nothing there: fine
    assert a.list("job-1") == ["job-1/notes.txt"]
    if a.is_local:
        p = a.local_path("job-1/notes.txt")
        assert p is not None and p.read_text(encoding="utf-8") == "héllo"
    else:
        assert a.local_path("job-1/notes.txt") is None


def _adapter_dir(root: Path, marker: str) -> Path:
    d = root / f"adapter-{marker}"
    (d / "sub").mkdir(parents=True)
    (d / "adapter_config.json").write_text('{"r": 16}')
    (d / "adapter_model.safetensors").write_bytes(marker.encode() * 100)
    (d / "sub" / "extra.txt").write_text(marker)
    return d


def test_artifacts_put_get_dir(artifacts: ArtifactStore, tmp_path: Path) -> None:
    a = artifacts
    src = _adapter_dir(tmp_path, "one")
    a.put_dir(src, "job-1/e1/adapters/answer")
    assert a.list("job-1/e1/adapters/answer") == [
        "job-1/e1/adapters/answer/adapter_config.json",
        "job-1/e1/adapters/answer/adapter_model.safetensors",
        "job-1/e1/adapters/answer/sub/extra.txt",
    ]
    out = a.get_dir("job-1/e1/adapters/answer", tmp_path / "out")
    assert (out / "adapter_config.json").read_text() == '{"r": 16}'
    assert (out / "adapter_model.safetensors").read_bytes() == b"one" * 100
    assert (out / "sub" / "extra.txt").read_text() == "one"
    # replacing a folder leaves only the new content
    src2 = tmp_path / "adapter-two"
    src2.mkdir()
    (src2 / "adapter_config.json").write_text('{"r": 32}')
    a.put_dir(src2, "job-1/e1/adapters/answer")
    assert a.list("job-1/e1/adapters/answer") == ["job-1/e1/adapters/answer/adapter_config.json"]
    assert a.get_json("job-1/e1/adapters/answer/adapter_config.json") == {"r": 32}
    if a.is_local:
        p = a.local_path("job-1/e1/adapters/answer")
        assert p is not None and (p / "adapter_config.json").is_file()
        assert not any(x.name.startswith(".cotune-tmp-") for x in p.parent.iterdir())
    with pytest.raises(FileNotFoundError):
        a.get_dir("job-1/none", tmp_path / "out2")
    with pytest.raises(NotADirectoryError):
        a.put_dir(tmp_path / "no-such-dir", "job-1/x")


@pytest.mark.parametrize(
    "key",
    [
        "",
        "/etc/passwd",
        "../escape",
        "a/../../b",
        "a/./b",
        "a//b",
        "a/",
        "a\\b",
        "..",
        "C:/windows",
        "s3://bucket/x",
        "a\x00b",
        ".cotune-tmp-x",
    ],
)
def test_artifact_keys_refused(artifacts: ArtifactStore, key: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        validate_key(key)
    a = artifacts
    with pytest.raises(ValueError):
        a.put_bytes(key, b"x")
    with pytest.raises(ValueError):
        a.get_bytes(key)
    with pytest.raises(ValueError):
        a.exists(key)
    with pytest.raises(ValueError):
        a.delete(key)
    with pytest.raises(ValueError):
        a.put_dir(tmp_path, key)
    assert not (tmp_path.parent / "escape").exists()


def test_artifact_keys_accepted() -> None:
    for key in ["a", "job-1/e1/adapters/answer", "x.y/z-1_2.json", "..a/b..", "a/.hidden"]:
        assert validate_key(key) == key


def test_atomic_write_leaves_no_partial_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = ArtifactStore(str(tmp_path / "root"))
    a.put_bytes("job-1/model.bin", b"old content")

    def crash(*args: object, **kwargs: object) -> None:
        raise OSError("disk died before the rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk died"):
        a.put_bytes("job-1/model.bin", b"new content that never lands")
    with pytest.raises(OSError, match="disk died"):
        a.put_bytes("job-1/fresh.bin", b"never")
    src = _adapter_dir(tmp_path, "x")
    with pytest.raises(OSError, match="disk died"):
        a.put_dir(src, "job-1/adapter")
    monkeypatch.undo()
    assert a.get_bytes("job-1/model.bin") == b"old content"
    assert not a.exists("job-1/fresh.bin") and not a.exists("job-1/adapter")
    leftovers = [p for p in (tmp_path / "root").rglob("*") if ".cotune-tmp-" in p.name]
    assert leftovers == []
    assert a.list("job-1") == ["job-1/model.bin"]


def test_file_url_root(tmp_path: Path) -> None:
    a = ArtifactStore(f"file://{tmp_path / 'r'}")
    assert a.is_local
    a.put_text("k/v.txt", "x")
    assert (tmp_path / "r" / "k" / "v.txt").read_text() == "x"


def test_s3_store_sees_another_process_writes(s3_endpoint: str) -> None:
    """Two stores with their own s3fs instances (as the API and a worker have): a listing
    taken before the other one's write does not hide it afterwards."""
    root = f"s3://cotune/shared-{uuid.uuid4().hex[:8]}"
    api = ArtifactStore(root, skip_instance_cache=True)
    worker = ArtifactStore(root, skip_instance_cache=True)
    assert api.fs is not worker.fs
    assert api.list("job-1") == [] and not api.exists("job-1/result/metrics.json")
    worker.put_json("job-1/result/metrics.json", {"ok": True})
    assert api.list("job-1") == ["job-1/result/metrics.json"]
    assert api.exists("job-1/result/metrics.json")
    assert api.get_json("job-1/result/metrics.json") == {"ok": True}
    worker.delete("job-1")
    assert api.list("job-1") == []
