"""Registered base models (table ``models``, revision ``0004_models``).

An admin registers a model with ``cotune models add`` (``cotune.model_registry``); its row
records where it comes from, its options and how far its preparation got: ``registered`` ->
``preparing`` -> ``ready`` or ``failed`` (with the error). The two built-in models
(``cotune.models.REGISTRY``) are code and have no row.

Races: a name is the primary key, so of two ``add`` calls one wins (the other gets
``ModelExists``). ``remove`` checks the unfinished jobs first and then deletes; a job created
in between still fails cleanly later (its worker no longer finds the model).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError

from cotune.errors import CotuneError
from cotune.model_records import ModelOptions, ModelStatus, RegisteredModel, SourceKind
from cotune.store.base import SideStore
from cotune.store.models import Job, ModelRow, matchable, utcnow
from cotune.store.status import TERMINAL


class ModelExists(CotuneError):
    """``add`` of a name that is already registered."""


def spec_names_model(spec: dict[str, Any], name: str) -> bool:
    """Whether a stored job spec names the model ``name`` for a component's model or the
    judge."""
    system = spec.get("system")
    models = system.get("models") if isinstance(system, dict) else None
    if isinstance(models, dict):
        for ref in models.values():
            if isinstance(ref, dict) and ref.get("name") == name:
                return True
    judge = spec.get("judge")
    return isinstance(judge, dict) and judge.get("model") == name


class ModelStore(SideStore):
    """Registered models over the job store's database (SQLite or PostgreSQL)."""

    def add(
        self, name: str, kind: SourceKind, source: str, options: ModelOptions
    ) -> RegisteredModel:
        """A new row in ``registered``; a failed registration of the same name is replaced."""
        now = utcnow()
        row = ModelRow(
            name=name,
            kind=kind,
            source=source,
            options=options.model_dump(mode="json"),
            status=ModelStatus.registered.value,
            created_at=now,
            updated_at=now,
        )
        try:
            with self._tx() as s:
                s.execute(
                    delete(ModelRow).where(
                        ModelRow.name == name, ModelRow.status == ModelStatus.failed.value
                    )
                )
                s.add(row)
        except IntegrityError:
            found = self.get(name)
            status = found.status.value if found else "registered"
            raise ModelExists(
                f"model {name!r} is already registered ({status}); `cotune models remove "
                f"{name}` first"
            ) from None
        return RegisteredModel.model_validate(row)

    def get(self, name: str) -> RegisteredModel | None:
        if not matchable(name):
            return None
        with self._sessions() as s:
            row = s.get(ModelRow, name)
            return None if row is None else RegisteredModel.model_validate(row)

    def list_all(self) -> list[RegisteredModel]:
        with self._sessions() as s:
            rows = s.scalars(select(ModelRow).order_by(ModelRow.name)).all()
            return [RegisteredModel.model_validate(r) for r in rows]

    def set_status(
        self,
        name: str,
        status: ModelStatus,
        *,
        error: str | None = None,
        source: str | None = None,
    ) -> None:
        """Record a preparation step; ``source``: the pinned source once it is known."""
        now = utcnow()
        values: dict[str, Any] = {"status": status.value, "error": error, "updated_at": now}
        if source is not None:
            values["source"] = source
        if status is ModelStatus.ready:
            values["prepared_at"] = now
        with self._tx() as s:
            s.execute(update(ModelRow).where(ModelRow.name == name).values(**values))

    def delete(self, name: str) -> bool:
        with self._tx() as s:
            result = s.execute(delete(ModelRow).where(ModelRow.name == name))
            return bool(getattr(result, "rowcount", 0))

    def jobs_using(self, name: str) -> list[str]:
        """Ids of the unfinished jobs (created, queued, running, ...) that name ``name``."""
        done = [status.value for status in TERMINAL]
        with self._sessions() as s:
            rows = s.execute(select(Job.id, Job.spec).where(Job.status.not_in(done))).all()
        return [job_id for job_id, spec in rows if spec_names_model(dict(spec), name)]
