"""``GET /v1/models``: what a job may name — the registry's base models and the server's
hosted judges, by name only (never a URL, a path or a key)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends

from cotune.models import REGISTRY
from services.api.auth import RATE_LIMITED, Tenant
from services.api.schemas import ListObject, ModelObject
from services.api.state import ApiState, get_state

router = APIRouter(tags=["models"], responses=RATE_LIMITED)


@router.get("/v1/models", response_model=ListObject[ModelObject], summary="Models jobs may name")
def list_models(
    tenant: Tenant, state: Annotated[ApiState, Depends(get_state)]
) -> ListObject[ModelObject]:
    data = [
        ModelObject(id=name, kind="base", description=entry.description)
        for name, entry in sorted(REGISTRY.items())
    ]
    data += [
        ModelObject(id=name, kind="judge", description=f"hosted judge ({judge.model})")
        for name, judge in sorted(state.settings.judges.items())
    ]
    return ListObject[ModelObject](data=data, has_more=False)
