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


def scope(*any_of: str, cached: bool = False):
    """A dependency that lets a request through if its key has one of `any_of` (or admin).
    `cached` checks through the server's KeyCache (inference routes: no database read per
    request; a revoked key stops working within the cache's TTL)."""

    def check(request: Request,
              bearer: HTTPAuthorizationCredentials | None = Security(_bearer),
              header: str | None = Security(_header)) -> APIKey | None:
        # bearer/header declare the security schemes in the OpenAPI document; the token is
        # read by token_of, the rule every face shares.
        if request.app.state.settings.auth == "off":
            return None
        token = token_of((k.decode("latin-1"), v.decode("latin-1"))
                         for k, v in request.headers.raw)
        keys = request.app.state.keys if cached else request.app.state.registry.keys
        return keys.verify(token, *any_of)

    return check


def token_of(headers) -> str | None:
    """The API key of a request's (name, value) header pairs, names in lower case. The one
    rule of every face (/api/v1, /v2 REST, gRPC): the token of `Authorization: Bearer osk_...`
    wins; without a Bearer token, `X-API-Key`. An Authorization header of another scheme
    (Basic, Token: a proxy's own) is not read."""
    token = None
    for name, value in headers:
        if name == "authorization" and value[:7].lower() == "bearer ":
            return value[7:].strip()
        if name == "x-api-key":
            token = value
    return token


class KeyCache:
    """Verified keys remembered for `ttl_s`, so the inference path (thousands of requests a
    second) does not read the database on each one. A revoked key stops working within
    `ttl_s`; failures are never remembered."""

    def __init__(self, keys, ttl_s: float = 5.0):
        import time

        self._keys, self._ttl, self._clock = keys, ttl_s, time.monotonic
        self._seen: dict[str, tuple[APIKey, float]] = {}

    def verify(self, token: str | None, *any_of: str) -> APIKey:
        hit = self._seen.get(token) if token else None
        if hit is not None and hit[1] > self._clock() and hit[0].allows(*any_of):
            return hit[0]
        key = self._keys.verify(token, *any_of)
        if len(self._seen) > 10_000:
            self._seen.clear()
        self._seen[token] = (key, self._clock() + self._ttl)
        return key
