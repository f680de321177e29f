"""API keys: created and revoked with `optiserve keys`, checked by the server.

A key reads `osk_<id>_<secret>`. The id is public (lists, logs); only the sha256 of the secret
is stored, and it is compared in constant time. The secrets are 256 random bits, so a slow
password hash would add nothing but latency to every request.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import sessionmaker

from optiserve.core.errors import AuthError, ConfigError, ScopeError
from optiserve.registry.tables import KeyRow, utcnow

SCOPES = {
    "admin": "everything, including what the other scopes allow",
    "models:write": "register and delete models",
    "optimize": "start, follow and cancel optimizations; run benchmarks",
    "read": "list models, versions, artifacts and optimizations; download artifacts",
    "infer": "send inference requests to served models",
}
_PREFIX = "osk_"
_TOUCH_EVERY = timedelta(minutes=1)


@dataclass(frozen=True)
class APIKey:
    id: str
    name: str
    scopes: tuple[str, ...]
    created_at: datetime | None
    last_used_at: datetime | None
    revoked_at: datetime | None

    def allows(self, *any_of: str) -> bool:
        return "admin" in self.scopes or any(s in self.scopes for s in any_of)


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _info(row: KeyRow) -> APIKey:
    return APIKey(row.id, row.name, tuple(row.scopes), row.created_at, row.last_used_at,
                  row.revoked_at)


class Keys:
    def __init__(self, session: sessionmaker):
        self._session = session

    def create(self, name: str, scopes: list[str]) -> tuple[APIKey, str]:
        """A new key; the full token is returned once and never stored."""
        unknown = [s for s in scopes if s not in SCOPES]
        if unknown or not scopes:
            raise ConfigError(f"Unknown or missing scope {unknown or scopes}.",
                              hint=f"Scopes: {', '.join(SCOPES)}.")
        if not name or len(name) > 128:
            raise ConfigError("A key needs a name of 1 to 128 characters.")
        key_id, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
        row = KeyRow(id=key_id, name=name, secret_sha256=_digest(secret),
                     scopes=sorted(set(scopes)))
        with self._session.begin() as s:
            s.add(row)
            s.flush()
            info = _info(row)
        return info, f"{_PREFIX}{key_id}_{secret}"

    def list(self) -> list[APIKey]:
        with self._session() as s:
            return [_info(r) for r in s.scalars(select(KeyRow).order_by(KeyRow.created_at))]

    def revoke(self, id_or_name: str) -> list[APIKey]:
        """Revoke by id, or every active key with that name."""
        with self._session.begin() as s:
            rows = list(s.scalars(select(KeyRow).where(
                (KeyRow.id == id_or_name) | (KeyRow.name == id_or_name),
                KeyRow.revoked_at.is_(None))))
            if not rows:
                raise ConfigError(f"No active API key with id or name '{id_or_name}'.",
                                  hint="List them with: optiserve keys list")
            for r in rows:
                r.revoked_at = utcnow()
            return [_info(r) for r in rows]

    def verify(self, token: str | None, *any_of: str) -> APIKey:
        """The key behind a token, if it is valid and has one of the scopes (401 / 403)."""
        if not token:
            raise AuthError("This endpoint needs an API key.",
                            hint="Send 'Authorization: Bearer osk_...' (or X-API-Key); create "
                            "a key with: optiserve keys create NAME --scope read")
        key_id, _, secret = token.removeprefix(_PREFIX).partition("_")
        with self._session() as s:
            row = s.get(KeyRow, key_id) if token.startswith(_PREFIX) and secret else None
            if row is None or not hmac.compare_digest(row.secret_sha256, _digest(secret)):
                raise AuthError("The API key is not valid.",
                                hint="Check the token; keys are shown once, at creation.")
            if row.revoked_at is not None:
                raise AuthError(f"API key {row.id} ({row.name}) was revoked.",
                                hint="Create a new one with: optiserve keys create")
            key = _info(row)
        if not key.allows(*any_of):
            raise ScopeError(f"API key {key.id} ({key.name}) lacks the scope this needs: "
                             f"{' or '.join(any_of)}.",
                             hint=f"Its scopes: {', '.join(key.scopes)}. Create a key with "
                             "the scope, or use an admin key.")
        if key.last_used_at is None or utcnow() - key.last_used_at > _TOUCH_EVERY:
            with self._session.begin() as s:
                s.execute(update(KeyRow).where(KeyRow.id == key.id)
                          .values(last_used_at=utcnow()))
        return key
