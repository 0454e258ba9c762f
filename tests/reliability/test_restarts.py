"""A job's dependencies fail under it: Redis and PostgreSQL restarted mid-job, and a worker
stopped with SIGTERM mid-stage, on second instances (``scripts/fleet.py``) so the machine's own
services are untouched. Real workers and beat (Celery subprocesses, default lease and reaper
settings), the real tiny model under vLLM, a one-epoch tiny-kb job.

- SIGTERM (during the rollout, the first long stage) is Celery's warm shutdown: the worker
  finishes the stage it holds, then exits 0; a replacement takes the next stage.
- PostgreSQL is stopped as a crash would (``-m immediate``) while a later stage runs: every
  connection is cut; the worker's heartbeats fail until it is back.
- Redis runs without persistence: its restart right after (the job unfinished) loses every
  message, the one a worker holds and any queued; the reaper must send the next task again.
- ``/readyz`` answers 503 naming the dependency while it is down, 200 once all are back.

The job must succeed with every stage done and no event written twice.
"""

from __future__ import annotations

import collections
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from cotune.settings import Settings
from cotune.store import JobStore, StageStatus

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from fleet import (
    Fleet,
    PostgresServer,
    RedisServer,
    fleet_env,
    holder_pid,
    pg_database,
)

JOB_TIMEOUT = 900.0


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    server = PostgresServer()
    server.start()
    yield server
    server.remove()


def wait_until(what: str, check: Callable[[], Any], timeout: float = JOB_TIMEOUT) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"not within {timeout:.0f} s: {what}")


# The stages of a one-epoch job, in order. Which of them take long enough to be hit depends on
# the run (a stage with nothing to do takes milliseconds), so each fault is aimed at the first
# stage that runs at or after its target.
ORDER = ["baseline", "rollout", "credit", "verify", "synthesize", "train", "evaluate", "test"]


def running_from(store: JobStore, job_id: str, first: str, fleet: Fleet) -> Any:
    """A stage at or after ``first`` that a worker of the fleet holds now; fails at once if
    the job ended first."""
    later = ORDER[ORDER.index(first) :]
    for state in store.stage_states(job_id):
        held = holder_pid(state.lease_owner) in fleet.procs
        if state.stage.value in later and state.status == StageStatus.running and held:
            return state
    assert _ended(store, job_id) is None, f"the job ended before a stage from {first} ran"
    return None


def after(state: Any) -> str:
    """The stage after ``state``'s (the next fault's target)."""
    return ORDER[min(ORDER.index(state.stage.value) + 1, len(ORDER) - 1)]


def readyz(client: TestClient, expect: int) -> dict[str, str]:
    response = client.get("/readyz")
    assert response.status_code == expect, response.text
    return dict(response.json()["checks"])


def test_a_job_survives_redis_and_postgres_restarts_and_a_sigterm(
    redis: RedisServer, postgres: PostgresServer, tiny_model_dir: Path
) -> None:
    from celery import Celery

    from cotune.jobs.materialize import local_spec
    from cotune.jobs.queues import ADVANCE_JOB, GPU_QUEUE, message_conf
    from cotune.spec.job import parse_job
    from cotune.tiny import write_tiny_example
    from services.api.app import create_app
    from services.api.dispatch import CeleryDispatcher

    folder = Path(tempfile.mkdtemp(prefix="cotune-restarts-"))
    example = write_tiny_example(
        folder / "tiny-kb", splits=(16, 8, 8), model_path=str(tiny_model_dir)
    )
    spec = {
        "system": "system.yaml",
        "data": {"train": "train.jsonl", "val": "val.jsonl", "test": "test.jsonl"},
        "loop": {"epochs": 1, "rollout_batch": 16, "samples_per_component": 8, "seed": 0},
        "train": {"epochs": 1, "learning_rate": 5e-3, "lora_r": 4, "lora_alpha": 8},
    }  # fmt: skip
    job = parse_job(spec, base_dir=example)
    url = pg_database(postgres.admin_url)
    env = fleet_env(url, redis.url, folder)
    settings = Settings(
        database_url=url,
        broker_url=redis.url,
        broker_key_prefix=env["COTUNE_BROKER_KEY_PREFIX"],
        artifacts=env["COTUNE_ARTIFACTS"],
        migrate_on_start=False,
    )
    store = JobStore(url)
    fleet = Fleet(env, folder)
    app = create_app(settings, dispatcher=CeleryDispatcher(settings))
    sender = Celery("restarts")
    sender.conf.update(**message_conf(settings))
    try:
        fleet.beat()
        fleet.worker()
        with TestClient(app, raise_server_exceptions=False) as client:
            wait_until("a worker consumes the queues", lambda: _ready(client), timeout=120)
            job_id = store.create_job(job.system.name, local_spec(job))
            sender.send_task(ADVANCE_JOB, args=[job_id], queue=GPU_QUEUE)

            # SIGTERM while the rollout (or a later stage) runs: the worker finishes the
            # stage it holds, then exits 0; a replacement takes the stages after it.
            held = wait_until("rollout runs", lambda: running_from(store, job_id, "rollout", fleet))
            pid = holder_pid(held.lease_owner)
            assert pid is not None
            fleet.worker()
            assert fleet.terminate(pid, timeout=600) == 0
            done = store.stage(job_id, held.epoch, held.stage)
            assert done is not None and done.status == StageStatus.done, done
            assert done.attempts == 1, "a warm shutdown does not lose the stage it holds"

            # PostgreSQL dies while a later stage runs: every connection is cut.
            target = after(done)
            wait_until(f"{target} runs", lambda: running_from(store, job_id, target, fleet))
            postgres.stop()
            assert readyz(client, 503)["database"].startswith("unreachable")
            time.sleep(2)
            postgres.start()

            # Redis dies right after, the job unfinished: every message is gone (the one a
            # worker holds, any queued); the reaper sends the job's next task again.
            assert _ended(store, job_id) is None, "the job ended before Redis could die"
            redis.stop()
            assert readyz(client, 503)["broker"].startswith("unreachable")
            time.sleep(2)
            redis.start()

            record = wait_until("the job ends", lambda: _ended(store, job_id))
            assert record.status.value == "succeeded", record.error
            wait_until("ready again", lambda: _ready(client), timeout=120)
    finally:
        fleet.stop()
    states = store.stage_states(job_id)
    assert states and all(s.status == StageStatus.done for s in states), states
    messages = [e.message for e in store.events(job_id, limit=10_000)]
    repeated = {m: n for m, n in collections.Counter(messages).items() if n > 1}
    assert not {m for m in repeated if "re-queued" not in m and "queued again" not in m}, repeated
    store.close()
    shutil.rmtree(folder, ignore_errors=True)


def _ready(client: TestClient) -> bool:
    return client.get("/readyz").status_code == 200


def _ended(store: JobStore, job_id: str) -> Any:
    record = store.get_job(job_id)
    return (
        record if record and record.status.value in ("succeeded", "failed", "cancelled") else None
    )
