"""API keys on every endpoint but health: `Depends(scope("read"))` names what a route needs.

With OPTISERVE_AUTH=off every request passes (local development only; `optiserve serve`
warns loudly when that is combined with a non-loopback address).
"""

from __future__ import annotations

from fastapi import Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from optiserve.registry.keys import APIKey

_bearer = HTTPBearer(auto_error=False, description="An API key: osk_...")
_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="An API key: osk_...")


def scope(*any_of: str):
    """A dependency that lets a request through if its key has one of `any_of` (or admin)."""

    def check(request: Request,
              bearer: HTTPAuthorizationCredentials | None = Security(_bearer),
              header: str | None = Security(_header)) -> APIKey | None:
        if request.app.state.settings.auth == "off":
            return None
        token = bearer.credentials if bearer else header
        return request.app.state.registry.keys.verify(token, *any_of)

    return check
