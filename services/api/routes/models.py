"""``GET /v1/models``: what a job may name — the built-in and registered base models, with
their preparation status, and the server's hosted judges, by name only (never a URL, a path or
a key)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends

from cotune.models import REGISTRY, is_model_folder, models_dir
from services.api.auth import RATE_LIMITED, Tenant
from services.api.schemas import ListObject, ModelObject
from services.api.state import ApiState, get_state

router = APIRouter(tags=["models"], responses=RATE_LIMITED)


@router.get("/v1/models", response_model=ListObject[ModelObject], summary="Models jobs may name")
def list_models(
    tenant: Tenant, state: Annotated[ApiState, Depends(get_state)]
) -> ListObject[ModelObject]:
    # A built-in that is not prepared yet is still accepted (a worker prepares it on request);
    # it shows as "registered".
    data = [
        ModelObject(
            id=name,
            kind="base",
            description=entry.description,
            status="ready" if is_model_folder(models_dir() / name) else "registered",
        )
        for name, entry in sorted(REGISTRY.items())
    ]
    data += [
        ModelObject(
            id=model.name,
            created=int(model.created_at.timestamp()),
            kind="base",
            description=model.description,
            status=model.status.value,
            # The error may name server paths: the admin reads it with `cotune models list`.
            error="preparation failed (see `cotune models list` on the server)"
            if model.status == "failed"
            else None,
        )
        for model in state.models.list_all()
    ]
    data += [
        ModelObject(id=name, kind="judge", description=f"hosted judge ({judge.model})")
        for name, judge in sorted(state.settings.judges.items())
    ]
    return ListObject[ModelObject](data=data, has_more=False)
