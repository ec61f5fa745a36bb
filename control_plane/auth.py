"""Bearer tokens: operators' API tokens and agents' credentials.

Secrets are 256-bit random strings, so a plain sha256 is enough to store them (no password
stretching is needed for a secret nobody chose). Lookups go by that hash.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from control_plane.db.models import Agent, ApiToken
from control_plane.files import write_private

API_TOKEN_PREFIX = "mfa_"
AGENT_CREDENTIAL_PREFIX = "mfc_"
ENROLLMENT_TOKEN_PREFIX = "mfe_"


def new_secret(prefix: str) -> str:
    """A fresh secret with a prefix that says what it is for."""
    return prefix + secrets.token_urlsafe(32)


def hash_secret(secret: str) -> str:
    """The stored form of a secret."""
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class Operator:
    """A caller holding an API token."""

    token_id: int
    name: str
    scopes: tuple[str, ...]

    def allows(self, scope: str) -> bool:
        """Whether this token carries ``scope`` (admin carries every scope)."""
        return "admin" in self.scopes or scope in self.scopes


@dataclass(frozen=True)
class AgentCaller:
    """A caller holding an agent credential."""

    agent_id: str
    # Authenticated with its pending rotated credential: its first use retires the old one.
    rotated: bool = False
    pending: bool = False  # enrolled, not approved yet


Principal = Operator | AgentCaller


async def resolve(session: AsyncSession, token: str, now: datetime | None = None
                  ) -> Principal | None:  # fmt: skip
    """Find who holds ``token``, or None (also for an expired or revoked API token)."""
    now = now or datetime.now(UTC)
    h = hash_secret(token)
    if token.startswith(AGENT_CREDENTIAL_PREFIX):
        row = (await session.execute(
            select(Agent.id, Agent.credential_hash, Agent.pending).where(
                or_(Agent.credential_hash == h, Agent.next_credential_hash == h),
                Agent.revoked_at.is_(None),
            )
        )).first()  # fmt: skip
        return AgentCaller(row[0], rotated=row[1] != h, pending=row[2]) if row else None
    row = await session.scalar(select(ApiToken).where(ApiToken.token_hash == h))
    if row is None or row.revoked_at is not None:
        return None
    if row.expires_at is not None and now >= row.expires_at:
        return None
    return Operator(row.id, row.name, tuple(row.scopes))


async def ensure_admin_token(session: AsyncSession, token_file: Path) -> bool:
    """On an empty database, create an admin token and write it to ``token_file`` (0600).

    Returns True when a token was created.
    """
    count = await session.scalar(select(func.count()).select_from(ApiToken))
    if count:
        return False
    token = new_secret(API_TOKEN_PREFIX)
    session.add(ApiToken(name="admin", token_hash=hash_secret(token), scopes=["admin"]))
    await session.flush()
    write_private(token_file, (token + "\n").encode())
    return True
