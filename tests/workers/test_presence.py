"""Workers' presence keys (``cotune.jobs.presence``) on the machine's real Redis, each test
under its own key prefix: what ``/readyz`` counts instead of a broadcast that a busy solo-pool
worker never answers (the end-to-end case: ``test_workers.py``'s HTTP job, asked while busy)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from cotune.jobs.presence import Presence, consumers, presence_key, redis_client

BROKER = "redis://127.0.0.1:6379/0"


@pytest.fixture
def client() -> Iterator[Any]:
    found = redis_client(BROKER)
    assert found is not None
    yield found


def test_each_live_worker_counts_once_per_queue_it_consumes(client: Any) -> None:
    prefix = f"cotune-presence-{uuid.uuid4().hex[:8]}:"
    assert consumers(client, prefix) == {"gpu": 0, "cpu": 0}
    both = Presence(client, prefix, "gpu-1@host", ["gpu", "cpu", "gpu"], ttl=30)
    cpu = Presence(client, prefix, "cpu-1@host", ["cpu", "other"], ttl=30)
    both.start()
    cpu.start()
    try:
        assert consumers(client, prefix) == {"gpu": 1, "cpu": 2}
        # A worker that dies stops renewing: its key lives at most the ttl.
        assert 0 < client.ttl(presence_key(prefix, "gpu-1@host")) <= 30
    finally:
        both.stop()
    assert consumers(client, prefix) == {"gpu": 0, "cpu": 1}  # a warm shutdown deletes it
    cpu.stop()
    assert not client.exists(presence_key(prefix, "cpu-1@host"))


def test_a_prefix_is_matched_literally(client: Any) -> None:
    """A key prefix with glob characters counts its own workers, not its neighbours'."""
    tag = uuid.uuid4().hex[:8]
    globby, plain = f"c[ab]*-{tag}:", f"ca-x-{tag}:"
    neighbour = Presence(client, plain, "w@host", ["gpu"], ttl=30)
    neighbour.start()
    try:
        assert consumers(client, globby) == {"gpu": 0, "cpu": 0}
        assert consumers(client, plain) == {"gpu": 1, "cpu": 0}
    finally:
        neighbour.stop()


def test_no_client_without_a_redis_broker() -> None:
    assert redis_client("memory://") is None


def test_a_worker_started_while_redis_is_down_announces_itself_later() -> None:
    """The first beat failing (the broker is not up yet) must not stop the beating thread."""
    calls: list[str] = []

    class Flaky:
        def set(self, key: str, value: str, ex: int) -> None:
            calls.append(key)
            if len(calls) == 1:
                raise ConnectionError("redis is starting")

        def delete(self, key: str) -> None:
            pass

    presence = Presence(Flaky(), "p:", "w@host", ["gpu"], ttl=0.03)
    presence.start()
    try:
        deadline = time.monotonic() + 10  # a liveness bound, not a speed claim
        while len(calls) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        presence.stop()
    assert len(calls) >= 2, calls
