"""Facts that no request writes as a change, announced once each.

- ``activation.failed``: an agent reports a model failed or refused. Reports repeat (every
  heartbeat carries the same failure), so each failure is marked by agent, model, digest and
  desired-state generation, and announced the first time that mark is made: a new rollout of
  the same digest (a new generation) that fails again is announced again.
- ``agent.offline``: an agent's last sign of life is older than ``offline_after_s``. Nothing
  happens at that moment, so :class:`OfflineWatch` sweeps for it; each offline spell (agent and
  the time it was last seen) is marked once, whichever replica sweeps first.

Marks live in ``event_marks`` and are pruned with the delivery log.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from control_plane.db.engine import Database
from control_plane.db.models import Agent, EventMark
from control_plane.events.outbox import emit
from protocol.reports import StatusReport
from protocol.timeutil import format_time

log = logging.getLogger("modelfleet.events")
FAILED_STATES = ("failed", "refused")


async def mark_once(s: AsyncSession, key: str, now: datetime) -> bool:
    """Make a mark in the open transaction; True when it is new (announce), False when made
    before, by this replica or another."""
    dialect = s.bind.dialect.name if s.bind is not None else "sqlite"
    insert = sqlite.insert if dialect == "sqlite" else postgresql.insert
    made = await s.execute(
        insert(EventMark)
        .values(key=key[:300], at=now)
        .on_conflict_do_nothing()
        .returning(EventMark.key)
    )
    return made.first() is not None


async def note_failures(s: AsyncSession, reports: Iterable[StatusReport], now: datetime) -> int:
    """Announce each failed activation these status reports carry for the first time."""
    count = 0
    for r in reports:
        for m in r.models:
            if m.state not in FAILED_STATES:
                continue
            key = f"activation.failed:{r.agent_id}:{m.name}:{m.manifest_digest}:{r.generation}"
            if not await mark_once(s, key, now):
                continue
            data = {
                "agentId": r.agent_id,
                "model": m.name,
                "version": m.version,
                "manifestDigest": m.manifest_digest,
                "state": m.state,
                "reason": m.reason,
                "generation": r.generation,
            }
            emit(s, "activation.failed", f"agent/{r.agent_id}", data, now)
            count += 1
    return count


class OfflineWatch:
    """Sweeps for agents gone quiet; ``sweep`` is called by the delivery loop's app task."""

    def __init__(
        self,
        *,
        db: Database,
        clock: Callable[[], datetime],
        offline_after_s: float,
        lookback_s: float = 86400.0,
    ) -> None:
        self.db = db
        self.clock = clock
        self.offline_after = timedelta(seconds=offline_after_s)
        # Agents that went quiet while no control plane ran are announced at start, back to
        # this far; older silences are history, not news.
        self._since = clock() - timedelta(seconds=lookback_s)
        self.announced = 0

    async def sweep(self) -> int:
        """Announce agents whose silence began since the last sweep; returns how many."""
        now = self.clock()
        cutoff = now - self.offline_after
        count = 0
        # Read first: most sweeps find nobody, and a read does not take the write lock.
        async with self.db.read() as s:
            agents = list(
                await s.execute(
                    select(Agent.id, Agent.name, Agent.labels, Agent.last_seen_at).where(
                        Agent.revoked_at.is_(None),
                        Agent.pending.is_(False),
                        Agent.last_seen_at > self._since - timedelta(seconds=5),
                        Agent.last_seen_at <= cutoff,
                    )
                )
            )
        if not agents:
            self._since = cutoff
            return 0
        async with self.db.write() as s:
            for agent_id, name, labels, seen in agents:
                if not await mark_once(s, f"agent.offline:{agent_id}:{format_time(seen)}", now):
                    continue
                data = {
                    "agentId": agent_id,
                    "name": name,
                    "labels": labels,
                    "lastSeen": format_time(seen),
                    "offlineAfterSeconds": self.offline_after.total_seconds(),
                }
                emit(s, "agent.offline", f"agent/{agent_id}", data, now)
                count += 1
        self._since = cutoff
        self.announced += count
        return count
