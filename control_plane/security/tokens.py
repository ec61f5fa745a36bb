"""Operator API tokens: create with scopes and an expiry, list (never the secret), revoke."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select

from control_plane.db.engine import Database
from control_plane.db.models import ApiToken
from control_plane.errors import Invalid, NotFound
from control_plane.security.auth import API_TOKEN_PREFIX, hash_secret, new_secret
from control_plane.security.scopes import SCOPES
from protocol.fields import get_number, get_str
from protocol.timeutil import format_time

MAX_TTL_S = 2 * 365 * 86400.0


def token_json(row: ApiToken, now: datetime) -> dict[str, Any]:
    """Public view of a token: never the secret."""
    if row.revoked_at is not None:
        state = "revoked"
    elif row.expires_at is not None and now >= row.expires_at:
        state = "expired"
    else:
        state = "active"
    return {
        "id": row.id,
        "name": row.name,
        "scopes": list(row.scopes),
        "createdAt": format_time(row.created_at),
        "expiresAt": format_time(row.expires_at) if row.expires_at else None,
        "revokedAt": format_time(row.revoked_at) if row.revoked_at else None,
        "state": state,
    }


def parse_scopes(value: object) -> list[str]:
    """A non-empty list of known scopes; raises Invalid naming ``scopes``."""
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise Invalid("invalid", f"scopes must be a non-empty list of {SCOPES}", "scopes")
    unknown = [v for v in value if v not in SCOPES]
    if unknown:
        raise Invalid("invalid", f"unknown scope {unknown[0]!r}; known: {SCOPES}", "scopes")
    return sorted(set(value))


@dataclass(frozen=True, kw_only=True)
class TokenRequest:
    """A request for an operator API token, parsed at the edge."""

    name: str
    scopes: list[str]
    ttl_s: float | None = None

    @classmethod
    def parse(cls, body: dict[str, Any]) -> TokenRequest:
        """Parse a JSON body; raises InvalidMessage or Invalid naming the field."""
        name = get_str(body, "name", max_len=128)
        assert name is not None
        scopes = parse_scopes(body.get("scopes"))
        raw_ttl = body.get("ttlSeconds")
        ttl = get_number(body, "ttlSeconds", minimum=60) if raw_ttl is not None else None
        if ttl is not None and ttl > MAX_TTL_S:
            raise Invalid("invalid", f"ttlSeconds must be <= {MAX_TTL_S:.0f}", "ttlSeconds")
        return cls(name=name, scopes=scopes, ttl_s=ttl)


async def create_token(db: Database, req: TokenRequest, now: datetime) -> dict[str, Any]:
    """Create a token; the secret is in this answer only."""
    name, scopes, ttl = req.name, req.scopes, req.ttl_s
    secret = new_secret(API_TOKEN_PREFIX)
    expires = now + timedelta(seconds=ttl) if ttl is not None else None
    row = ApiToken(
        name=name, token_hash=hash_secret(secret), scopes=scopes, created_at=now, expires_at=expires
    )
    async with db.write() as s:
        s.add(row)
        await s.flush()
    return {**token_json(row, now), "token": secret}


async def list_tokens(db: Database, now: datetime) -> list[dict[str, Any]]:
    """Every token, oldest first."""
    async with db.read() as s:
        return [token_json(r, now) for r in await s.scalars(select(ApiToken).order_by(ApiToken.id))]


async def revoke_token(db: Database, token_id: int, now: datetime) -> dict[str, Any]:
    """Revoke a token at once; raises NotFound. Revoking twice keeps the first time."""
    async with db.write() as s:
        row = await s.get(ApiToken, token_id)
        if row is None:
            raise NotFound("token_not_found", f"no API token {token_id}", "id")
        if row.revoked_at is None:
            row.revoked_at = now
        return token_json(row, now)
