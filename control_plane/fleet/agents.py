"""Agents: enrollment tokens, enrollment, listing and reading agents, relabelling."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update

from control_plane.db.engine import Database
from control_plane.db.models import (
    Agent,
    DesiredStateRow,
    EnrollmentToken,
)
from control_plane.errors import Forbidden, Invalid, NotFound, Unauthenticated
from control_plane.fleet.desired import DesiredSigner
from control_plane.metrics.reports import agent_state
from control_plane.mqtt.broker_auth import mosquitto_hash, new_password
from control_plane.security.auth import (
    AGENT_CREDENTIAL_PREFIX,
    ENROLLMENT_TOKEN_PREFIX,
    SCRYPT_LOG2_N,
    credential_lookup,
    hash_credential,
    hash_secret,
    new_secret,
)
from protocol.exceptions import InvalidMessage
from protocol.facts import check_facts, valid_facts
from protocol.fields import get_int, get_number, get_str, get_str_map
from protocol.labels import Selector, check_labels
from protocol.timeutil import format_time

MAX_ENROLLMENT_USES = 100_000
MAX_TOKEN_TTL_S = 365 * 24 * 3600


@dataclass(frozen=True, kw_only=True)
class EnrollmentTokenRequest:
    """A request for an enrollment token, parsed at the edge."""

    labels: dict[str, str]
    max_uses: int
    ttl_s: float
    require_approval: bool
    lock_labels: bool = False

    @classmethod
    def parse(cls, body: dict[str, Any], default_ttl_s: float) -> EnrollmentTokenRequest:
        """Parse a JSON body; raises InvalidMessage or Invalid naming the field."""
        labels = check_labels(get_str_map(body, "labels"))
        max_uses = get_int(body, "maxUses", default=1, minimum=1)
        if max_uses > MAX_ENROLLMENT_USES:
            raise Invalid("invalid", f"maxUses must be <= {MAX_ENROLLMENT_USES}", "maxUses")
        ttl = get_number(body, "ttlSeconds", default=default_ttl_s, minimum=1)
        if ttl > MAX_TOKEN_TTL_S:
            raise Invalid("invalid", f"ttlSeconds must be <= {MAX_TOKEN_TTL_S}", "ttlSeconds")
        approval = body.get("requireApproval", False)
        if not isinstance(approval, bool):
            raise Invalid("invalid", "requireApproval must be true or false", "requireApproval")
        lock = body.get("lockLabels", False)
        if not isinstance(lock, bool):
            raise Invalid("invalid", "lockLabels must be true or false", "lockLabels")
        return cls(
            labels=labels,
            max_uses=max_uses,
            ttl_s=ttl,
            require_approval=approval,
            lock_labels=lock,
        )


async def create_enrollment_token(
    db: Database, req: EnrollmentTokenRequest, now: datetime
) -> dict[str, Any]:
    """Create an enrollment token."""
    labels, max_uses, ttl, approval = req.labels, req.max_uses, req.ttl_s, req.require_approval
    token = new_secret(ENROLLMENT_TOKEN_PREFIX)
    expires = now + timedelta(seconds=ttl)
    async with db.write() as s:
        row = EnrollmentToken(
            token_hash=hash_secret(token),
            labels=labels,
            max_uses=max_uses,
            uses=0,
            expires_at=expires,
            created_at=now,
            require_approval=approval,
            lock_labels=req.lock_labels,
        )
        s.add(row)
        await s.flush()
        token_id = row.id
    return {
        "id": token_id,
        "token": token,
        "labels": labels,
        "maxUses": max_uses,
        "expiresAt": format_time(expires),
        "requireApproval": approval,
        "lockLabels": req.lock_labels,
    }


@dataclass(frozen=True, kw_only=True)
class EnrollRequest:
    """An agent's enrollment, parsed at the edge."""

    token: str
    name: str | None
    labels: dict[str, str]
    facts: dict[str, Any]

    @classmethod
    def parse(cls, body: dict[str, Any]) -> EnrollRequest:
        """Parse a JSON body; raises InvalidMessage naming the field."""
        token = get_str(body, "token")
        assert token is not None
        name = get_str(body, "name", optional=True, max_len=128)
        labels = check_labels(get_str_map(body, "labels"))
        facts = check_facts(body.get("facts"), "facts")
        return cls(token=token, name=name, labels=labels, facts=facts)


async def enroll(
    db: Database,
    signer: DesiredSigner,
    req: EnrollRequest,
    now: datetime,
    credential_cost: int = SCRYPT_LOG2_N,
) -> tuple[dict[str, Any], str, str]:
    """Enroll an agent with an enrollment token; return (agent fields, credential).

    Raises Unauthenticated for an unknown token, Forbidden for an expired or used-up one.
    """
    token, name, wanted, facts = req.token, req.name, req.labels, req.facts
    agent_id = str(uuid.uuid4())
    credential = new_secret(AGENT_CREDENTIAL_PREFIX)
    mqtt_password = new_password()
    # scrypt costs ~50 ms: only for a token that exists, and outside the write transaction.
    async with db.read() as s:
        known = await s.scalar(
            select(EnrollmentToken.id).where(EnrollmentToken.token_hash == hash_secret(token))
        )
    stored = (
        await asyncio.to_thread(hash_credential, credential, credential_cost)
        if known
        else "unknown"
    )
    async with db.write() as s:
        et = await s.scalar(
            select(EnrollmentToken).where(EnrollmentToken.token_hash == hash_secret(token))
        )
        if et is None:
            raise Unauthenticated(
                "invalid_enrollment_token", "enrollment token is not known", "token"
            )
        if now >= et.expires_at:
            raise Forbidden(
                "enrollment_token_expired",
                f"enrollment token expired at {format_time(et.expires_at)}",
                "token",
            )
        # Conditional increment: two agents racing for the last use cannot both win.
        res = await s.execute(
            update(EnrollmentToken)
            .where(EnrollmentToken.id == et.id, EnrollmentToken.uses < EnrollmentToken.max_uses)
            .values(uses=EnrollmentToken.uses + 1)
        )
        if res.rowcount != 1:  # type: ignore[attr-defined]
            raise Forbidden(
                "enrollment_token_used_up",
                f"enrollment token has been used {et.max_uses} time(s), its limit",
                "token",
            )
        # Labels the token grants win over labels the agent asks for.
        labels = {**wanted, **et.labels}
        agent = Agent(
            id=agent_id,
            name=name or f"agent-{agent_id[:8]}",
            labels=labels,
            facts=facts,
            credential_hash=stored,
            credential_lookup=credential_lookup(credential),
            enrolled_at=now,
            last_seen_at=now,
            reported_generation=0,
            status={},
            mqtt_password_hash=mosquitto_hash(mqtt_password),
            pending=et.require_approval,
            locked_labels=sorted(et.labels) if et.lock_labels else [],
        )
        s.add(agent)
        await s.flush()
        await signer.refresh(s, agent, now)
    return (
        {"agentId": agent_id, "name": agent.name, "labels": labels, "pending": agent.pending},
        credential,
        mqtt_password,
    )


def agent_json(
    agent: Agent, desired_generation: int, now: datetime, offline_after_s: float
) -> dict:
    """Public view of an agent; facts stored before their schema show only their valid part."""
    online = agent_state(agent, now, offline_after_s) != "offline"
    try:
        facts = check_facts(agent.facts)
    except InvalidMessage:
        # A row from before facts had a schema (NaN, huge lists): one agent must not make the
        # whole listing unencodable, so it shows what still meets the schema.
        facts = valid_facts(agent.facts)
    return {
        "id": agent.id,
        "name": agent.name,
        "labels": agent.labels,
        "facts": facts,
        "enrolledAt": format_time(agent.enrolled_at),
        "lastSeen": format_time(agent.last_seen_at) if agent.last_seen_at else None,
        "online": online,
        "desiredGeneration": desired_generation,
        "reportedGeneration": agent.reported_generation,
        "models": agent.status.get("models", []),
        "lastError": agent.status.get("lastError"),
        "desiredState": agent.status.get("desiredState", "unknown"),
        "keysetVersion": agent.status.get("keysetVersion"),
        "state": agent_state(agent, now, offline_after_s),
        "lockedLabels": list(agent.locked_labels or []),
    }


async def list_agents(
    db: Database, now: datetime, offline_after_s: float, selector: Selector | None = None
) -> list[dict]:
    """Every agent the selector matches (all without one), oldest enrollment first."""
    async with db.read() as s:
        rows = await s.execute(
            select(Agent, DesiredStateRow.generation)
            .outerjoin(DesiredStateRow, DesiredStateRow.agent_id == Agent.id)
            .order_by(Agent.enrolled_at, Agent.id)
        )
        return [
            agent_json(a, g or 0, now, offline_after_s)
            for a, g in rows
            if selector is None or selector.matches(a.labels)
        ]


async def get_agent(db: Database, agent_id: str, now: datetime, offline_after_s: float) -> dict:
    """One agent; raises NotFound when unknown."""
    async with db.read() as s:
        agent = await s.get(Agent, agent_id)
        if agent is None:
            raise NotFound("agent_not_found", f"no agent {agent_id}", "id")
        row = await s.get(DesiredStateRow, agent_id)
        return agent_json(agent, row.generation if row else 0, now, offline_after_s)


@dataclass(frozen=True, kw_only=True)
class RelabelRequest:
    """A change to an agent's labels, parsed at the edge: labels to set, keys to remove."""

    set: dict[str, str]
    remove: tuple[str, ...]

    @classmethod
    def parse(cls, body: dict[str, Any]) -> RelabelRequest:
        """Parse a JSON body; raises InvalidMessage or Invalid naming the field."""
        to_set = check_labels(get_str_map(body, "set"), "set")
        remove = body.get("remove", [])
        if not isinstance(remove, list) or not all(isinstance(k, str) for k in remove):
            raise Invalid("invalid", "remove must be a list of label keys", "remove")
        if not to_set and not remove:
            raise Invalid("invalid", "nothing to change: give set or remove", "set")
        both = sorted(set(to_set) & set(remove))
        if both:
            raise Invalid("invalid", f"label {both[0]!r} is both set and removed", "remove")
        check_labels({k: "x" for k in remove}, "remove")
        return cls(set=to_set, remove=tuple(remove))


async def relabel(
    db: Database, signer: DesiredSigner, agent_id: str, req: RelabelRequest, now: datetime
) -> tuple[dict[str, str], bool]:
    """Change an agent's labels; return them and whether its desired state moved.

    Raises NotFound for an unknown or revoked agent and Forbidden for a label its enrollment
    token locked. Selector-based objects follow: the desired state is recomputed here (completed
    rollouts that take late joiners, configuration layers); running rollouts match by labels
    at every step.
    """
    async with db.write() as s:
        agent = await s.get(Agent, agent_id, with_for_update=True)
        if agent is None or agent.revoked_at is not None:
            raise NotFound("agent_not_found", f"no agent {agent_id}", "id")
        locked = set(agent.locked_labels or [])
        for key in [*req.set, *req.remove]:
            if key in locked and (key in req.remove or agent.labels.get(key) != req.set[key]):
                field = "remove" if key in req.remove else f"set.{key}"
                raise Forbidden(
                    "label_locked",
                    f"label {key!r} was pinned by the agent's enrollment token and is locked",
                    field,
                )
        labels = {k: v for k, v in agent.labels.items() if k not in req.remove}
        labels = check_labels({**labels, **req.set})
        agent.labels = labels
        await s.flush()
        moved = await signer.refresh(s, agent, now)
    return labels, moved is not None
