"""What every request needs: settings, stores, the dispatcher, metrics (one per app)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fastapi import Request

from cotune.service import Dispatcher, redact, server_roots
from cotune.settings import Settings
from cotune.store import ArtifactStore, JobStore
from cotune.store.accounts import AccountStore

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

    def __post_init__(self) -> None:
        if not self.roots:
            self.roots = server_roots(self.settings, self.artifacts)

    def redact(self, text: str | None) -> str | None:
        """``text`` without server folders, for anything sent over HTTP."""
        return redact(text, self.roots)


def get_state(request: Request) -> ApiState:
    state: ApiState = request.app.state.cotune
    return state
