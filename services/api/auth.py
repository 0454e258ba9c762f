"""API keys: ``Authorization: Bearer <key>`` (what the openai SDK sends) or ``X-API-Key``.

Keys are stored hashed and compared in constant time (``cotune.store.accounts``). The caller's
tenant scopes every query; the key itself is never logged or echoed.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from services.api.errors import ApiError
from services.api.state import ApiState, get_state

bearer = HTTPBearer(auto_error=False, description="an API key from `cotune keys create`")
api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False)

TENANT_SCOPE_KEY = "cotune.tenant"
_CHALLENGE = {"WWW-Authenticate": "Bearer"}


def current_tenant(
    request: Request,
    state: Annotated[ApiState, Depends(get_state)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    header_key: Annotated[str | None, Depends(api_key_header)],
) -> str:
    """The caller's tenant, or 401."""
    key = credentials.credentials if credentials is not None else header_key
    if not key:
        raise ApiError(
            401,
            "missing_api_key",
            "no API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
            headers=_CHALLENGE,
        )
    tenant = state.accounts.verify_key(key)
    if tenant is None:
        raise ApiError(
            401, "invalid_api_key", "the API key is unknown or revoked", headers=_CHALLENGE
        )
    request.scope[TENANT_SCOPE_KEY] = tenant
    return tenant


Tenant = Annotated[str, Depends(current_tenant)]
