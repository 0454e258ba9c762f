"""The names the API and the workers share to hand work over a broker: queues, task names
and the message settings both sides must agree on. Plain data: no celery import here (the API
sends tasks by name, ``services/api/dispatch.py``; the workers define them, ``workers/``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cotune.settings import Settings

GPU_QUEUE = "gpu"  # one stage of one job per task: engines and training
CPU_QUEUE = "cpu"  # validation, finalising, the reaper
QUEUES = (GPU_QUEUE, CPU_QUEUE)

VALIDATE_JOB = "cotune.validate_job"
ADVANCE_JOB = "cotune.advance_job"
FINALIZE_JOB = "cotune.finalize_job"
REAP_EXPIRED_LEASES = "cotune.reap_expired_leases"

ROUTES = {
    VALIDATE_JOB: {"queue": CPU_QUEUE},
    ADVANCE_JOB: {"queue": GPU_QUEUE},
    FINALIZE_JOB: {"queue": CPU_QUEUE},
    REAP_EXPIRED_LEASES: {"queue": CPU_QUEUE},
}

DEFAULT_BROKER_URL = "redis://127.0.0.1:6379/0"


def broker_url(settings: Settings) -> str:
    return settings.broker_url or DEFAULT_BROKER_URL


def message_conf(settings: Settings) -> dict[str, Any]:
    """Celery settings that a sender and a worker must share: the broker, its key prefix and
    redelivery timeout, and JSON only (a message never unpickles anything)."""
    transport: dict[str, Any] = {"visibility_timeout": settings.visibility_timeout}
    if settings.broker_key_prefix:
        transport["global_keyprefix"] = settings.broker_key_prefix
    return {
        "broker_url": broker_url(settings),
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": transport,
        "task_serializer": "json",
        "result_serializer": "json",
        "event_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "task_routes": ROUTES,
    }
