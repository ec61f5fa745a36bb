"""What agents report, one at a time: a status (stored only when newer than the stored one,
ADR 12) and a metrics batch (stored once per batch). ``fleet/ingest.py`` batches the same
work; the HTTP and MQTT edges parse bodies with ``parse_report_body``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from control_plane.db.engine import Database
from control_plane.db.models import (
    Agent,
    MetricBatch,
    MetricSeries,
)
from control_plane.errors import Invalid, NotFound
from control_plane.events.watch import note_failures
from control_plane.fleet.status_order import StatusOrder, newer_than_stored, order_values
from protocol.fields import require_object
from protocol.reports import MetricsBatch, StatusReport
from protocol.timeutil import format_time

# Facts the control plane declared at enrollment (cost): a status report's facts never drop them.
DECLARED_FACTS = ("costPerHour",)


def status_document(report: StatusReport) -> dict[str, Any]:
    """What an agent's status report leaves in ``agents.status``."""
    return {
        "models": [m.to_json() for m in report.models],
        "lastError": report.last_error,
        "sentAt": format_time(report.sent_at),
        # A report is a sign of life, whatever the broker last said.
        "presence": "online",
        # The agent's own word on its desired state: current, or stale (expired, served).
        "desiredState": str(report.extra.get("desiredState", "unknown"))[:16],
        # The key set version the agent trusts (None: the fleet has none, or it has not one).
        "keysetVersion": _small_int(report.extra.get("keysetVersion")),
    }


def _small_int(value: object) -> int | None:
    ok = isinstance(value, int) and not isinstance(value, bool) and 0 < value < 2**31
    return value if ok else None  # type: ignore[return-value]


def merged_facts(stored: dict[str, Any], report: StatusReport) -> dict[str, Any]:
    """The agent's facts after a report: declared facts (the hourly cost) stay unless restated."""
    if not report.facts:
        return stored
    declared = {k: stored[k] for k in DECLARED_FACTS if k in stored}
    return {**declared, **report.facts}


async def store_status(db: Database, report: StatusReport, now: datetime) -> bool:
    """Keep an agent's status if it is newer than the stored one; False when it is stale.

    True means the agent's stored status is now this report (a duplicate of the stored one
    too). A stale report (control_plane/fleet/status_order.py) is still a sign of life: it moves
    ``last_seen_at`` and nothing else. Raises NotFound for an unknown or revoked agent.
    """
    async with db.write() as s:
        found = await s.execute(
            select(Agent.facts).where(Agent.id == report.agent_id, Agent.revoked_at.is_(None))
        )
        row = found.first()
        if row is None:
            raise NotFound("agent_not_found", f"no agent {report.agent_id}", "agentId")
        # Conditional: whatever another transaction (or replica) stored meanwhile, the
        # database keeps the newest; a read here would only race it.
        await s.execute(
            update(Agent)
            .where(Agent.id == report.agent_id, newer_than_stored(report))
            .values(
                status=status_document(report),
                facts=merged_facts(row.facts, report),
                reported_generation=report.generation,
                **order_values(report),
            )
        )
        await note_failures(s, [report], now)  # webhooks: activation.failed
        # A sign of life either way; what the row holds now says whether it is this report.
        held = await s.execute(
            update(Agent)
            .where(Agent.id == report.agent_id)
            .values(last_seen_at=now)
            .returning(Agent.status_epoch, Agent.status_seq, Agent.status_sent_at)
        )
        return StatusOrder(*held.one()) == StatusOrder.of(report)


async def store_metrics(db: Database, batch: MetricsBatch, now: datetime) -> bool:
    """Store a metrics batch once; return False when this (agent, seq) was stored before."""

    async def _insert(s: AsyncSession) -> bool:
        if await s.get(MetricBatch, (batch.agent_id, batch.seq)) is not None:
            return False
        s.add(
            MetricBatch(
                agent_id=batch.agent_id,
                seq=batch.seq,
                window_start=batch.window_start,
                window_end=batch.window_end,
                received_at=now,
            )
        )
        for series in batch.series:
            s.add(
                MetricSeries(
                    agent_id=batch.agent_id,
                    seq=batch.seq,
                    model=series.model,
                    version=series.version,
                    window_start=batch.window_start,
                    window_end=batch.window_end,
                    requests=series.requests,
                    errors=series.errors,
                    latency_sketch=series.latency_ms.to_json(),
                    shadow_count=series.shadow_count,
                    drift_sum=series.drift_sum,
                    argmax_agree=series.argmax_agree,
                )
            )
        agent = await s.get(Agent, batch.agent_id)
        if agent is None or agent.revoked_at is not None:
            raise NotFound("agent_not_found", f"no agent {batch.agent_id}", "agentId")
        agent.last_seen_at = now
        await s.flush()
        return True

    try:
        async with db.write() as s:
            return await _insert(s)
    except IntegrityError:
        # The same batch arrived twice at once (a retry racing its original): one is stored.
        return False


def parse_report_body(body: object, agent_id: str) -> dict[str, Any]:
    """Check a report is an object addressed from the agent in the path."""
    doc = require_object(body, "body")
    if doc.get("agentId") != agent_id:
        raise Invalid("invalid", "agentId does not match the agent in the path", "agentId")
    return doc


async def store_presence(db: Database, agent_id: str, presence: str, now: datetime) -> None:
    """The broker's word on an agent's link ("online" or "offline"); online is also a sign of
    life. Raises NotFound for an agent that is unknown or revoked."""
    async with db.write() as s:
        # Locked: the status is rewritten whole, so a status report stored between a plain
        # read and this write would be undone (PostgreSQL; SQLite writes one at a time).
        agent = await s.get(Agent, agent_id, with_for_update=True)
        if agent is None or agent.revoked_at is not None:
            raise NotFound("agent_not_found", f"no agent {agent_id}", "agentId")
        agent.status = {**agent.status, "presence": presence}
        if presence == "online":
            agent.last_seen_at = now
