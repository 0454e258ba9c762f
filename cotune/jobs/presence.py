"""Which workers consume which queues: one key per worker in the broker's Redis, with a time to
live, renewed by a thread in the worker; ``/readyz`` counts them.

Why not Celery's ``inspect`` broadcast: a solo-pool worker (the ``gpu`` queue's, see
``workers/app.py``) answers no control message while it runs a task, and a stage runs for
minutes to hours, so ``/readyz`` said "no worker consumes the gpu queue", and took the API out
of its load balancer, whenever the GPU worker was busy. A thread keeps beating through a task,
as the stage lease's heartbeat does (``cotune.runner``). A worker that dies stops renewing and
its key expires within ``PRESENCE_TTL`` seconds. No celery here; ``redis`` only when a client
is made.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import threading
from typing import Any

from cotune.jobs.queues import QUEUES

log = logging.getLogger(__name__)

PRESENCE_TTL = 30.0  # seconds a worker counts after its last beat; it beats every third of it
_NAME = "cotune-worker:"


@functools.cache
def redis_client(url: str) -> Any:
    """A Redis client for the broker at ``url``, or None when the broker is not Redis."""
    if not url.startswith(("redis://", "rediss://", "unix://")):
        return None
    import redis

    # Timeouts: a half-open connection must not block a beat, a probe or a shutdown for good.
    return redis.Redis.from_url(
        url,
        socket_timeout=5,
        socket_connect_timeout=5,
        socket_keepalive=True,
        health_check_interval=30,
    )


def presence_key(prefix: str, hostname: str) -> str:
    """The worker's key, under the broker's key prefix (``COTUNE_BROKER_KEY_PREFIX``)."""
    return f"{prefix}{_NAME}{hostname}"


def _glob_escaped(text: str) -> str:
    """``text`` matched literally by a Redis ``SCAN MATCH`` pattern."""
    return "".join(f"\\{c}" if c in "*?[]\\" else c for c in text)


def consumers(client: Any, prefix: str) -> dict[str, int]:
    """How many live workers consume each queue (a key that expired between the scan and the
    read counts for nothing)."""
    counts = dict.fromkeys(QUEUES, 0)
    # A set: SCAN may return a key twice (while Redis rehashes).
    for key in set(client.scan_iter(match=_glob_escaped(prefix + _NAME) + "*", count=100)):
        raw = client.get(key)
        if raw is None:
            continue
        for queue in set(json.loads(raw).get("queues", [])):
            if queue in counts:
                counts[queue] += 1
    return counts


class Presence:
    """A worker's key, beaten every third of ``ttl`` by a daemon thread from ``start()`` until
    ``request_stop()`` or ``stop()``; the thread deletes it as it ends (a shutdown leaves no
    ghost behind), so a signal handler only sets an event and never waits on Redis."""

    def __init__(
        self, client: Any, prefix: str, hostname: str, queues: list[str], ttl: float = PRESENCE_TTL
    ) -> None:
        self.client, self.key, self.ttl = client, presence_key(prefix, hostname), ttl
        self.value = json.dumps({"queues": sorted(queues), "pid": os.getpid()})
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cotune-presence", daemon=True)
        self._warned = False

    def beat(self) -> None:
        self.client.set(self.key, self.value, ex=math.ceil(self.ttl))

    def _try(self, action: Any) -> None:
        try:
            action()
        except Exception as err:  # a broker blip: the next beat tries again
            if not self._warned:  # once: an ACL or auth error would fail every beat
                log.warning("worker presence %s: %s: %s", self.key, type(err).__name__, err)
                self._warned = True

    def _run(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            self._try(self.beat)
        self._try(lambda: self.client.delete(self.key))

    def start(self) -> None:
        # Counted from the first moment, not a third of the ttl later; a broker down at start
        # is tried again by the thread.
        self._try(self.beat)
        self._thread.start()

    def request_stop(self) -> None:
        """Stop beating and delete the key, without waiting (safe in a signal handler)."""
        self._stop.set()

    def stop(self) -> None:
        """``request_stop()`` and wait (bounded) for the key to be deleted."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.ttl)
