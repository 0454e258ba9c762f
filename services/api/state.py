"""What every request needs: settings, stores, the dispatcher, metrics (one per app)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fastapi import Request

from cotune.jobs.lifecycle import Lifecycle
from cotune.jobs.results import redact, server_roots
from cotune.jobs.threads import Dispatcher
from cotune.model_records import RegisteredModel
from cotune.settings import Settings
from cotune.store import ArtifactStore, JobStore
from cotune.store.accounts import AccountStore
from cotune.store.registry import ModelStore
from services.api.limits import RateLimits

if TYPE_CHECKING:
    from services.api.metrics import ApiMetrics


@dataclass
class ApiState:
    settings: Settings
    store: JobStore
    artifacts: ArtifactStore
    accounts: AccountStore
    dispatcher: Dispatcher
    metrics: ApiMetrics
    roots: list[str] = field(default_factory=list)
    streams: StreamSlots = field(default_factory=lambda: StreamSlots())
    limits: RateLimits = field(init=False)

    def __post_init__(self) -> None:
        self.limits = RateLimits.from_settings(self.settings)
        if not self.roots:
            self.roots = server_roots(self.settings, self.artifacts)

    @property
    def lifecycle(self) -> Lifecycle:
        """The one job lifecycle (creating and cancelling jobs go through it here too)."""
        return Lifecycle(self.store, self.artifacts, self.settings, accounts=self.accounts)

    @property
    def models(self) -> ModelStore:
        """The registered models (rows in the job store's database)."""
        return ModelStore(self.store)

    def registered(self) -> dict[str, RegisteredModel]:
        """The registered models by name, read now (for a job's validation)."""
        from cotune.model_registry import catalog

        return catalog(self.models)

    def redact(self, text: str | None) -> str | None:
        """``text`` without server folders, for anything sent over HTTP."""
        return redact(text, self.roots)


class StreamSlots:
    """Open event streams per tenant, so one tenant cannot hold every connection."""

    def __init__(self) -> None:
        # Reentrant: a slot's __del__ may run (garbage collection) while this thread holds it.
        self._lock = threading.RLock()
        self._open: dict[str, int] = {}

    def acquire(self, tenant: str, limit: int) -> StreamSlot | None:
        """A slot for one more stream of ``tenant``, or None when it holds ``limit``."""
        with self._lock:
            if self._open.get(tenant, 0) >= limit:
                return None
            self._open[tenant] = self._open.get(tenant, 0) + 1
        return StreamSlot(self, tenant)

    def open(self, tenant: str) -> int:
        with self._lock:
            return self._open.get(tenant, 0)

    def _release(self, tenant: str) -> None:
        with self._lock:
            left = self._open.get(tenant, 0) - 1
            if left > 0:
                self._open[tenant] = left
            else:
                self._open.pop(tenant, None)


class StreamSlot:
    """One held stream; released once, by the stream's end or, if the response never started
    (the client left first), when the stream's generator is collected."""

    def __init__(self, slots: StreamSlots, tenant: str) -> None:
        self._slots, self._tenant, self._held = slots, tenant, True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._slots._release(self._tenant)

    def __del__(self) -> None:
        self.release()


def get_state(request: Request) -> ApiState:
    state: ApiState = request.app.state.cotune
    return state
