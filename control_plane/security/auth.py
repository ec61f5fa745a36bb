"""Bearer tokens: operators' API tokens and agents' credentials.

Agent credentials are stored as scrypt hashes (``scrypt$log2N$r$p$salt$hash``), so a copy of
the database does not hand out working credentials even to someone with a large budget for
guessing. A salted hash cannot be searched for, so each agent row also keeps a lookup key: the
first 16 hex digits of the credential's sha256, which says nothing usable about a 256-bit
secret. A credential that verified once is remembered in memory (by its stored hash and a
digest of it), so only an agent's first request to a process pays for scrypt; a rotation or a
revocation changes the stored hash or the row, and the memory no longer matches.
Credentials stored by older versions as a bare sha256 still work and are re-stored as scrypt
at their first use. API tokens and enrollment tokens keep a sha256 (looked up by it).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import secrets
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Row, func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from control_plane.db.models import Agent, ApiToken
from control_plane.security.files import write_private

if TYPE_CHECKING:
    from control_plane.db.engine import Database

API_TOKEN_PREFIX = "mfa_"
AGENT_CREDENTIAL_PREFIX = "mfc_"
ENROLLMENT_TOKEN_PREFIX = "mfe_"
WEBHOOK_SECRET_PREFIX = "mfw_"  # signs webhook deliveries (control_plane/events/)


def new_secret(prefix: str) -> str:
    """A fresh secret with a prefix that says what it is for."""
    return prefix + secrets.token_urlsafe(32)


def hash_secret(secret: str) -> str:
    """The stored form of an API or enrollment token (a sha256, looked up by)."""
    return hashlib.sha256(secret.encode()).hexdigest()


# scrypt cost: N = 2^12, r = 8, p = 1 (4 MiB, about 13 ms on one core here), the default of
# `modelfleet server --credential-cost` (log2 N). The secrets are 256 random bits, so the cost
# is defence in depth, not what keeps them from being guessed; what it costs is paid again by
# every agent's first request after a restart (10,000 agents: ~130 s of CPU at 2^12, ~500 s at
# 2^14) and in memory per verification in flight. Stored with each hash, so a changed cost
# applies to credentials made from then on without breaking those stored.
SCRYPT_LOG2_N, SCRYPT_R, SCRYPT_P = 12, 8, 1
CREDENTIAL_COSTS = range(10, 21)
_VERIFIED_MAX = 100_000
_verified: OrderedDict[tuple[str, bytes], None] = OrderedDict()


def credential_lookup(secret: str) -> str:
    """The lookup key of an agent credential (not a verifier: scrypt is)."""
    return hashlib.sha256(secret.encode()).hexdigest()[:16]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


def _scrypt(secret: str, salt: bytes, log2_n: int, r: int, p: int) -> bytes:
    n = 1 << log2_n
    return hashlib.scrypt(
        secret.encode(), salt=salt, n=n, r=r, p=p, dklen=32, maxmem=256 * n * r + 1024 * 1024
    )


def hash_credential(secret: str, log2_n: int = SCRYPT_LOG2_N) -> str:
    """The stored form of an agent credential: scrypt with a fresh salt (CPU bound: call it
    in a thread from async code)."""
    salt = secrets.token_bytes(16)
    dk = _scrypt(secret, salt, log2_n, SCRYPT_R, SCRYPT_P)
    return f"scrypt${log2_n}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(dk)}"


def is_legacy(stored: str) -> bool:
    """A credential stored by an older version as a bare sha256."""
    return not stored.startswith("scrypt$")


def check_credential(secret: str, stored: str) -> bool:
    """Whether ``secret`` is the credential ``stored`` was made from (constant time)."""
    if stored.startswith("scrypt$"):
        try:
            _, log2_n, r, p, salt, dk = stored.split("$")
            if int(log2_n) not in CREDENTIAL_COSTS or int(r) != SCRYPT_R or int(p) != SCRYPT_P:
                return False  # not parameters this version writes: never an unbounded cost
            got = _scrypt(secret, _unb64(salt), int(log2_n), int(r), int(p))
            return hmac.compare_digest(got, _unb64(dk))
        except (ValueError, TypeError):
            return False  # not a hash this version wrote
    if len(stored) == 64:  # legacy sha256 hex
        return hmac.compare_digest(hash_secret(secret), stored)
    return False  # revoked: no secret matches


async def verify_credential(secret: str, stored: str) -> bool:
    """:func:`check_credential`, remembered after the first success; scrypt in a thread."""
    key = (stored, hashlib.sha256(secret.encode()).digest())
    if key in _verified:
        _verified.move_to_end(key)
        return True
    if not await asyncio.to_thread(check_credential, secret, stored):
        return False
    _verified[key] = None
    if len(_verified) > _VERIFIED_MAX:
        _verified.popitem(last=False)
    return True


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
    legacy: bool = False  # stored as a bare sha256 by an older version: re-store as scrypt


Principal = Operator | AgentCaller


def _plausible(token: str) -> bool:
    """Whether ``token`` could be one of ours (printable ASCII, as every secret here is).

    A header's bytes that are not UTF-8 reach us as lone surrogates, which hashing (UTF-8)
    cannot encode: such a token is simply not valid, never an error.
    """
    return token.isascii() and token.isprintable()


async def authenticate(db: Database, token: str) -> Principal | None:
    """:func:`resolve` that holds a database session only for the lookup: scrypt (a worker
    thread, which may be queued behind others) runs after the session is back in the pool."""
    if not _plausible(token):
        return None
    async with db.read() as s:
        if not token.startswith(AGENT_CREDENTIAL_PREFIX):
            return await resolve(s, token)
        row = await _agent_row(s, token)
    return None if row is None else await _verify_agent(row, token)


async def resolve(
    session: AsyncSession, token: str, now: datetime | None = None
) -> Principal | None:
    """Find who holds ``token``, or None (also for an expired or revoked API token)."""
    if not _plausible(token):
        return None
    now = now or datetime.now(UTC)
    if token.startswith(AGENT_CREDENTIAL_PREFIX):
        row = await _agent_row(session, token)
        return None if row is None else await _verify_agent(row, token)
    h = hash_secret(token)
    row = await session.scalar(select(ApiToken).where(ApiToken.token_hash == h))
    if row is None or row.revoked_at is not None:
        return None
    if row.expires_at is not None and now >= row.expires_at:
        return None
    return Operator(row.id, row.name, tuple(row.scopes))


async def _agent_row(session: AsyncSession, token: str) -> Row[Any] | None:
    lookup = credential_lookup(token)
    return (
        await session.execute(
            select(
                Agent.id,
                Agent.pending,
                Agent.credential_lookup,
                Agent.credential_hash,
                Agent.next_credential_lookup,
                Agent.next_credential_hash,
            ).where(
                or_(Agent.credential_lookup == lookup, Agent.next_credential_lookup == lookup),
                Agent.revoked_at.is_(None),
            )
        )
    ).first()


async def _verify_agent(row: Row[Any], token: str) -> AgentCaller | None:
    lookup = credential_lookup(token)
    agent_id, pending, cur_lookup, cur_hash, next_lookup, next_hash = row
    if cur_lookup == lookup and await verify_credential(token, cur_hash):
        return AgentCaller(agent_id, pending=pending, legacy=is_legacy(cur_hash))
    if next_lookup == lookup and next_hash and await verify_credential(token, next_hash):
        return AgentCaller(agent_id, rotated=True, pending=pending)
    return None


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
