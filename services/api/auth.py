"""API keys: ``Authorization: Bearer <key>`` (what the openai SDK sends) or ``X-API-Key``.

Keys are stored hashed and compared in constant time (``cotune.store.accounts``). The caller's
tenant scopes every query; the key itself is never logged or echoed.
"""

from __future__ import annotations

import sys
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from cotune.store.accounts import AccountStore
from services.api.errors import ApiError
from services.api.limits import RateLimits, key_fingerprint, retry_after
from services.api.schemas import ErrorResponse
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
    """The caller's tenant, or 401; 429 while the key is over its rate or the client's
    address has failed to authenticate too often (``services.api.limits``)."""
    key = credentials.credentials if credentials is not None else header_key
    return authenticate(request, key, state.accounts, state.limits)


def authenticate(
    request: Request, key: str | None, accounts: AccountStore, limits: RateLimits
) -> str:
    """The tenant of ``key`` (``current_tenant``'s work, for any app holding the accounts and
    the rate limits: the API, the served system of ``services/system``)."""
    if not key:
        raise ApiError(
            401,
            "missing_api_key",
            "no API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
            headers=_CHALLENGE,
        )
    address = request.client.host if request.client is not None else "unknown"
    wait = limits.auth_failures.wait(address)
    if wait is not None:
        raise _too_many("auth_backoff", "too many failed authentications from your address", wait)
    tenant = accounts.verify_key(key)
    if tenant is None:
        limits.auth_failures.take(address)
        raise ApiError(
            401, "invalid_api_key", "the API key is unknown or revoked", headers=_CHALLENGE
        )
    wait = limits.requests.take(key_fingerprint(key))
    if wait is not None:
        raise _too_many("rate_limited", "this API key is over its request rate", wait)
    request.scope[TENANT_SCOPE_KEY] = tenant
    return tenant


def ensure_key(accounts: AccountStore, name: str) -> None:
    """If the database holds no live key, create one for tenant ``default`` and print it once on
    stderr (``cotune serve --embedded`` and ``cotune serve-system``)."""
    if not any(k.active for k in accounts.list_keys()):
        key_id, plaintext = accounts.create_key("default", name=name)
        print(
            f"cotune: created API key {key_id} for tenant 'default' (shown once):\n  {plaintext}",
            file=sys.stderr,
        )


def _too_many(code: str, what: str, wait: float) -> ApiError:
    after = retry_after(wait)
    return ApiError(429, code, f"{what}; retry after {after} s", headers={"Retry-After": after})


# Documented on every key-authenticated route.
RATE_LIMITED: dict[int | str, dict[str, Any]] = {
    429: {
        "model": ErrorResponse,
        "description": "over the key's request rate, or too many failed authentications from "
        "the client's address",
        "headers": {
            "Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}}
        },
    }
}


Tenant = Annotated[str, Depends(current_tenant)]
