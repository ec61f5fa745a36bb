"""Operator commands to agents (remote diagnostics): issue, hand over, take the answer once.

An agent only makes outbound connections, so a command waits here until the agent collects it
(its HTTP long-poll, or the MQTT bridge publishing it on the agent's topic), and the agent
uploads the answer. The command is the signed, expiring document of ``protocol/commands.py``;
this module keeps its life:

- **pending** (issued, not handed over) → **delivered** (handed to the agent by HTTP or MQTT)
  → **answered** (the answer stored, once) or **failed** (the agent said why it could not);
- **expired**: not answered by its ``expiresAt``; an answer after it is refused.

An answer is refused, with nothing stored, when its command is unknown, another agent's,
expired, already answered, or larger than the command's ``maxBytes`` (:func:`check_answer`,
pure). Answers are kept ``retention_s`` after they arrive (an expired command as long after
its expiry); the control plane's retention pass (beside the metric roll-up) and every issue
prune what is past it, and a read past it finds nothing. An agent
has at most ``max_pending`` commands waiting at once.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import and_, delete, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from control_plane.db.engine import Database
from control_plane.db.models import Agent, AgentCommand
from control_plane.errors import Conflict, Forbidden, NotFound, TooLarge
from protocol.commands import (
    KINDS,
    MAX_ANSWER_BYTES,
    MAX_ERROR_CHARS,
    MAX_SINCE_S,
    MAX_TTL,
    Command,
)
from protocol.digest import sha256_digest
from protocol.exceptions import InvalidMessage
from protocol.fields import check_plain, get_int, req_str
from protocol.timeutil import format_time

WAITING = ("pending", "delivered")
DONE = ("answered", "failed")
MIN_TTL_S = 10
DEFAULT_TTL_S = 300
DEFAULT_MAX_BYTES = 1024 * 1024
VIAS = ("http", "mqtt")


@dataclass(frozen=True, kw_only=True)
class CommandRequest:
    """What an operator asks of an agent, parsed at the edge."""

    kind: str
    since_s: int
    max_bytes: int
    ttl_s: int

    @classmethod
    def parse(cls, body: dict[str, Any]) -> CommandRequest:
        """Parse a JSON body; raises InvalidMessage naming the field."""
        kind = req_str(body, "kind", max_len=32)
        if kind not in KINDS:
            raise InvalidMessage(f"kind must be one of {', '.join(KINDS)}", "kind")
        return cls(
            kind=kind,
            since_s=get_int(body, "sinceSeconds", default=600, minimum=1, maximum=MAX_SINCE_S),
            max_bytes=get_int(
                body,
                "maxBytes",
                default=DEFAULT_MAX_BYTES,
                minimum=1024,
                maximum=MAX_ANSWER_BYTES,
            ),
            ttl_s=get_int(
                body,
                "ttlSeconds",
                default=DEFAULT_TTL_S,
                minimum=MIN_TTL_S,
                maximum=int(MAX_TTL.total_seconds()),
            ),
        )


@dataclass(frozen=True, kw_only=True)
class Limits:
    """How long answers are kept, and how many commands an agent may have waiting."""

    retention_s: float = 3600.0
    max_pending: int = 8


@dataclass(frozen=True, kw_only=True)
class CommandView:
    """What the answer rules look at of a stored command."""

    command_id: str
    agent_id: str
    state: str
    expires_at: datetime
    max_bytes: int


def check_answer(view: CommandView | None, agent_id: str, size: int, now: datetime) -> None:
    """Whether ``agent_id`` may answer this command with ``size`` bytes now.

    Raises NotFound (unknown), Forbidden (another agent's), Conflict (already answered, or
    expired) or TooLarge (over the command's maxBytes), each naming why.
    """
    if view is None:
        raise NotFound("unknown_command", "no such command", "commandId")
    if view.agent_id != agent_id:
        raise Forbidden("not_this_agents", "the command is for another agent", "commandId")
    if view.state in DONE:
        raise Conflict(
            "already_answered", f"command {view.command_id} is already answered", "commandId"
        )
    if view.state == "expired" or now >= view.expires_at:
        raise Conflict(
            "command_expired",
            f"command {view.command_id} expired at {format_time(view.expires_at)}",
            "commandId",
        )
    if size > view.max_bytes:
        raise TooLarge(
            "answer_too_large",
            f"the answer is over the command's maxBytes ({view.max_bytes})",
            "answer",
        )


def check_command_id(value: str) -> str:
    """A command id as sent by an agent (a UUID); raises InvalidMessage."""
    check_plain(value, "commandId")
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise InvalidMessage("commandId must be a UUID", "commandId") from None


def _view(row: AgentCommand | None) -> CommandView | None:
    if row is None:
        return None
    return CommandView(
        command_id=row.id,
        agent_id=row.agent_id,
        state=row.state,
        expires_at=row.expires_at,
        max_bytes=row.max_bytes,
    )


def command_json(row: AgentCommand, now: datetime) -> dict[str, Any]:
    """A command's state as the API shows it (never the answer itself)."""
    state = row.state
    if state in WAITING and now >= row.expires_at:
        state = "expired"
    out: dict[str, Any] = {
        "commandId": row.id,
        "agentId": row.agent_id,
        "kind": row.kind,
        "sinceSeconds": row.since_s,
        "maxBytes": row.max_bytes,
        "state": state,
        "issuedBy": row.issued_by,
        "issuedAt": format_time(row.issued_at),
        "expiresAt": format_time(row.expires_at),
        "deliveredAt": format_time(row.delivered_at) if row.delivered_at else None,
        "deliveredVia": row.delivered_via,
        "answeredAt": format_time(row.answered_at) if row.answered_at else None,
        "answeredVia": row.answered_via,
        "answerBytes": len(row.answer) if row.answer is not None else None,
        "answerDigest": row.answer_digest,
    }
    if row.error:
        out["error"] = row.error
    return out


async def _prune(session: AsyncSession, now: datetime, retention_s: float) -> None:
    """Mark waiting commands past their expiry, and drop what is past retention."""
    await session.execute(
        update(AgentCommand)
        .where(AgentCommand.state.in_(WAITING), AgentCommand.expires_at <= now)
        .values(state="expired")
    )
    cutoff = now - timedelta(seconds=retention_s)
    await session.execute(
        delete(AgentCommand).where(
            or_(
                and_(AgentCommand.answered_at.is_not(None), AgentCommand.answered_at < cutoff),
                and_(AgentCommand.answered_at.is_(None), AgentCommand.expires_at < cutoff),
            )
        )
    )


async def prune(db: Database, now: datetime, retention_s: float) -> None:
    """Mark the waiting commands past their expiry and delete what is past retention (the
    control plane's retention pass calls it, so answers go even when nobody issues again)."""
    async with db.write() as s:
        await _prune(s, now, retention_s)


async def issue(
    db: Database,
    key: Ed25519PrivateKey,
    agent_id: str,
    req: CommandRequest,
    *,
    now: datetime,
    issued_by: str,
    limits: Limits,
) -> dict[str, Any]:
    """Sign and store a command for an agent; its state as :func:`command_json` shows it.

    Raises NotFound (no such agent), Conflict (revoked, waiting for approval, or too many
    commands waiting).
    """
    cmd = Command(
        agent_id=agent_id,
        command_id=str(uuid.uuid4()),
        kind=req.kind,
        issued_at=now,
        expires_at=now + timedelta(seconds=req.ttl_s),
        since_s=req.since_s,
        max_bytes=req.max_bytes,
    )
    envelope = cmd.sign(key).to_bytes().decode()
    async with db.write() as s:
        await _prune(s, now, limits.retention_s)
        # The agent's row locked: concurrent issues for one agent count and insert one at a
        # time (on PostgreSQL, count-then-insert let a burst of 24 past a cap of 8).
        agent = await s.get(Agent, agent_id, with_for_update=True)
        if agent is None:
            raise NotFound("agent_not_found", f"no agent {agent_id}", "id")
        if agent.revoked_at is not None:
            raise Conflict("agent_revoked", f"agent {agent_id} is revoked", "id")
        if agent.pending:
            raise Conflict("agent_pending", f"agent {agent_id} waits for approval", "id")
        waiting = await s.scalar(
            select(func.count())
            .select_from(AgentCommand)
            .where(AgentCommand.agent_id == agent_id, AgentCommand.state.in_(WAITING))
        )
        if (waiting or 0) >= limits.max_pending:
            raise Conflict(
                "too_many_commands",
                f"agent {agent_id} already has {waiting} commands waiting",
                "id",
            )
        row = AgentCommand(
            id=cmd.command_id,
            agent_id=agent_id,
            kind=cmd.kind,
            envelope=envelope,
            since_s=cmd.since_s,
            max_bytes=cmd.max_bytes,
            issued_by=issued_by[:200],
            issued_at=cmd.issued_at,
            expires_at=cmd.expires_at,
            state="pending",
        )
        s.add(row)
        await s.flush()
        return command_json(row, now)


async def take_pending(
    db: Database, agent_ids: list[str], now: datetime, via: str
) -> dict[str, list[str]]:
    """The signed commands not yet handed over to these agents ({agent id: envelopes},
    oldest first), now marked delivered by ``via``."""
    assert via in VIAS
    if not agent_ids:
        return {}
    # A read first: a long-poll asks every few seconds, and most times there is nothing; the
    # write transaction (SQLite has one writer) only when there is.
    async with db.read() as s:
        waiting = await s.scalar(
            select(func.count())
            .select_from(AgentCommand)
            .where(
                AgentCommand.agent_id.in_(agent_ids),
                AgentCommand.state == "pending",
                AgentCommand.expires_at > now,
            )
        )
    if not waiting:
        return {}
    async with db.write() as s:
        rows = list(
            await s.scalars(
                select(AgentCommand)
                .where(
                    AgentCommand.agent_id.in_(agent_ids),
                    AgentCommand.state == "pending",
                    AgentCommand.expires_at > now,
                )
                .order_by(AgentCommand.issued_at)
                .with_for_update(skip_locked=not db.is_sqlite)
            )
        )
        out: dict[str, list[str]] = {}
        for row in rows:
            row.state, row.delivered_at, row.delivered_via = "delivered", now, via
            out.setdefault(row.agent_id, []).append(row.envelope)
        return out


async def waiting_envelopes(
    db: Database, agent_ids: list[str], now: datetime
) -> list[tuple[str, str, str]]:
    """(command id, agent id, signed envelope) of the commands not yet handed over to these
    agents, oldest first; nothing is marked (see :func:`mark_delivered`)."""
    if not agent_ids:
        return []
    async with db.read() as s:
        rows = await s.execute(
            select(AgentCommand.id, AgentCommand.agent_id, AgentCommand.envelope)
            .where(
                AgentCommand.agent_id.in_(agent_ids),
                AgentCommand.state == "pending",
                AgentCommand.expires_at > now,
            )
            .order_by(AgentCommand.issued_at)
        )
        return [(cid, aid, env) for cid, aid, env in rows]


async def mark_delivered(db: Database, command_ids: list[str], now: datetime, via: str) -> int:
    """Mark these commands handed over by ``via`` where they still wait, for agents the broker
    says are online (an agent that is not on MQTT collects them by HTTP); how many."""
    assert via in VIAS
    if not command_ids:
        return 0
    async with db.write() as s:
        rows = list(
            await s.execute(
                select(AgentCommand, Agent.status)
                .join(Agent, Agent.id == AgentCommand.agent_id)
                .where(AgentCommand.id.in_(command_ids), AgentCommand.state == "pending")
            )
        )
        marked = 0
        for row, status in rows:
            if via == "mqtt" and (status or {}).get("presence") != "online":
                continue
            row.state, row.delivered_at, row.delivered_via = "delivered", now, via
            marked += 1
        return marked


async def agents_with_pending(db: Database, now: datetime) -> list[str]:
    """Agents that have commands not yet handed over (the MQTT bridge sends them on connect)."""
    async with db.read() as s:
        found = await s.scalars(
            select(AgentCommand.agent_id)
            .where(AgentCommand.state == "pending", AgentCommand.expires_at > now)
            .distinct()
        )
        return list(found)


async def answer_terms(
    db: Database, agent_id: str, command_id: str, now: datetime
) -> tuple[int, datetime]:
    """The most bytes this agent's answer to this command may hold, and until when it may
    come; raises as check_answer."""
    async with db.read() as s:
        view = _view(await s.get(AgentCommand, command_id))
    check_answer(view, agent_id, 0, now)
    assert view is not None
    return view.max_bytes, view.expires_at


async def answer_limit(db: Database, agent_id: str, command_id: str, now: datetime) -> int:
    """The most bytes this agent's answer to this command may hold; raises as check_answer."""
    return (await answer_terms(db, agent_id, command_id, now))[0]


async def answered_with(
    db: Database, agent_id: str, command_id: str, *, digest: str, failed: bool
) -> bool:
    """Whether this agent's command is already answered with this very answer (the digest of
    its bytes, or its word that it could not): what another replica, which took the same MQTT
    chunks, has stored first. A different answer is not (it stays refused)."""
    async with db.read() as s:
        row = await s.get(AgentCommand, command_id)
    if row is None or row.agent_id != agent_id:
        return False
    if failed:
        return row.state == "failed"
    return row.state == "answered" and row.answer_digest == digest


async def store_answer(
    db: Database,
    agent_id: str,
    command_id: str,
    *,
    data: bytes,
    now: datetime,
    via: str,
    error: str | None = None,
) -> dict[str, Any]:
    """Store an agent's answer (or, with ``error``, its word that it could not), once.

    Raises as :func:`check_answer`; nothing is stored then.
    """
    assert via in VIAS
    async with db.write() as s:
        row = await s.get(AgentCommand, command_id, with_for_update=True)
        check_answer(_view(row), agent_id, len(data), now)
        assert row is not None
        row.answered_at, row.answered_via = now, via
        if error is not None:
            row.state, row.error = "failed", error[:MAX_ERROR_CHARS]
        else:
            row.state, row.answer, row.answer_digest = "answered", data, sha256_digest(data)
        await s.flush()
        return command_json(row, now)


async def _find(
    s: AsyncSession, agent_id: str, command_id: str, now: datetime, retention_s: float
) -> AgentCommand:
    row = await s.get(AgentCommand, command_id)
    if row is None or row.agent_id != agent_id:
        raise NotFound("unknown_command", f"agent {agent_id} has no command {command_id}", "cid")
    ended = row.answered_at or row.expires_at
    if now - ended > timedelta(seconds=retention_s):
        raise NotFound(
            "command_gone",
            f"command {command_id} ended over {retention_s:.0f}s ago and is no longer kept",
            "cid",
        )
    return row


async def get(
    db: Database, agent_id: str, command_id: str, now: datetime, retention_s: float
) -> dict[str, Any]:
    """A command's state; raises NotFound (unknown, another agent's, or past retention)."""
    async with db.read() as s:
        return command_json(await _find(s, agent_id, command_id, now, retention_s), now)


async def fetch_answer(
    db: Database, agent_id: str, command_id: str, now: datetime, retention_s: float
) -> tuple[dict[str, Any], bytes]:
    """A command's state and its answer; raises NotFound as :func:`get`, Conflict while
    there is no answer (still waiting, expired, or the agent could not)."""
    async with db.read() as s:
        row = await _find(s, agent_id, command_id, now, retention_s)
        view = command_json(row, now)
        if row.state != "answered" or row.answer is None:
            why = f": {row.error}" if row.error else ""
            raise Conflict(
                "no_answer", f"command {command_id} has no answer ({view['state']}{why})", "cid"
            )
        return view, bytes(row.answer)
