"""Agent credentials: rotation without downtime, and revocation that cuts an agent off.

Rotation: the agent asks for a new credential with its current one; the new one is stored as
``next_credential_hash`` (scrypt, control_plane/security/auth.py) beside the old, so the agent keeps
working with either while it writes the new one to disk and picks it up; the first request
made with the new one retires the old.
Revocation: both hashes are replaced by values no secret hashes to, the MQTT password hash is
dropped (the next ``modelfleet mqtt passwd`` leaves the agent out of the broker's password
file), the desired state is deleted (its retained MQTT copy is cleared), and the control plane
refuses the agent's reports on HTTP and MQTT from that moment.
"""

from __future__ import annotations

import asyncio
import secrets
from datetime import datetime

from sqlalchemy import delete, update

from control_plane.db.engine import Database
from control_plane.db.models import Agent, DesiredStateRow
from control_plane.errors import NotFound
from control_plane.fleet.desired import DesiredSigner
from control_plane.security.auth import (
    AGENT_CREDENTIAL_PREFIX,
    SCRYPT_LOG2_N,
    credential_lookup,
    hash_credential,
    is_legacy,
    new_secret,
)


async def rotate(db: Database, agent_id: str, cost: int = SCRYPT_LOG2_N) -> str:
    """A new credential for the agent (the old one stays valid until the new one is used)."""
    credential = new_secret(AGENT_CREDENTIAL_PREFIX)
    stored = await asyncio.to_thread(hash_credential, credential, cost)
    async with db.write() as s:
        agent = await s.get(Agent, agent_id)
        if agent is None or agent.revoked_at is not None:
            raise NotFound("agent_not_found", f"no agent {agent_id}", "id")
        agent.next_credential_hash = stored
        agent.next_credential_lookup = credential_lookup(credential)
    return credential


async def promote(db: Database, agent_id: str, token: str) -> None:
    """The rotated credential was used (the caller verified it): it becomes the only one."""
    async with db.write() as s:
        await s.execute(
            update(Agent)
            .where(Agent.id == agent_id, Agent.next_credential_lookup == credential_lookup(token))
            .values(
                credential_hash=Agent.next_credential_hash,
                credential_lookup=Agent.next_credential_lookup,
                next_credential_hash=None,
                next_credential_lookup=None,
            )
        )


async def upgrade(db: Database, agent_id: str, token: str, cost: int = SCRYPT_LOG2_N) -> None:
    """A credential stored as a bare sha256 by an older version was used (and verified):
    store it as scrypt from now on."""
    stored = await asyncio.to_thread(hash_credential, token, cost)
    async with db.write() as s:
        agent = await s.get(Agent, agent_id)
        if agent is not None and is_legacy(agent.credential_hash) and agent.revoked_at is None:
            agent.credential_hash = stored


async def revoke(db: Database, agent_id: str, now: datetime) -> None:
    """Cut the agent off at once; raises NotFound. Revoking twice keeps the first time."""
    async with db.write() as s:
        agent = await s.get(Agent, agent_id)
        if agent is None:
            raise NotFound("agent_not_found", f"no agent {agent_id}", "id")
        if agent.revoked_at is not None:
            return
        agent.revoked_at = now
        # Not a hex digest: no presented secret can ever hash to it.
        agent.credential_hash = "revoked:" + secrets.token_hex(24)
        agent.credential_lookup = None
        agent.next_credential_hash = None
        agent.next_credential_lookup = None
        agent.mqtt_password_hash = None
        agent.status = {**agent.status, "presence": "offline"}
        await s.execute(delete(DesiredStateRow).where(DesiredStateRow.agent_id == agent_id))


async def approve(db: Database, signer: DesiredSigner, agent_id: str, now: datetime) -> list[str]:
    """Let a pending agent in: it gets its desired state and its place in rollouts.

    Returns the agents whose desired state changed (to notify); raises NotFound.
    """
    async with db.write() as s:
        agent = await s.get(Agent, agent_id)
        if agent is None or agent.revoked_at is not None:
            raise NotFound("agent_not_found", f"no agent {agent_id}", "id")
        if not agent.pending:
            return []
        agent.pending = False
        changed = await signer.refresh(s, agent, now)
    return [agent_id] if changed is not None else []
