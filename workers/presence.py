"""The worker's presence key (``cotune.jobs.presence``): set when the worker is ready to
consume, beaten by a thread while it runs stages, deleted as its shutdown begins. Imported with
the tasks (``workers.app``'s ``include``), which connects the two signal handlers."""

from __future__ import annotations

from typing import Any

from celery import signals

from cotune.jobs.presence import Presence, redis_client
from cotune.jobs.queues import broker_url

_running: list[Presence] = []


@signals.worker_ready.connect
def announce(sender: Any, **_: Any) -> None:
    """``sender``: the worker's consumer, which knows its app, hostname and queues."""
    from workers.app import app_settings

    settings = app_settings(sender.app)
    client = redis_client(broker_url(settings))
    if client is None or _running:  # not Redis: the API falls back to a broadcast
        return
    queues = sorted({queue.name for queue in sender.task_consumer.queues})
    presence = Presence(client, settings.broker_key_prefix, sender.hostname, queues)
    presence.start()
    _running.append(presence)


@signals.worker_shutting_down.connect
def leaving(**_: Any) -> None:
    """Warm or cold shutdown begins: a draining worker takes no new task, so it stops counting
    now (sent from the signal handler: only an event is set)."""
    for presence in _running:
        presence.request_stop()


@signals.worker_shutdown.connect
def withdraw(**_: Any) -> None:
    while _running:
        _running.pop().stop()
