"""Which of an agent's status reports is the newest: one rule for every path that stores one.

A status report can reach the control plane late: held by a broker through an outage and
delivered after a newer one came over HTTP, or stored by another replica. Every report carries
the agent's own order, ``(epoch, seq)`` (agent/report/status.py: the epoch grows at every
agent start and is kept in its state directory, ``seq`` counts reports since), and a report
replaces the stored status only when it is newer. The same rule is written twice here, as a
plain comparison (several reports of one agent in one ingest batch) and as the ``WHERE``
clause of the conditional ``UPDATE`` that stores one (HTTP, MQTT, any replica: the database
decides, never a read followed by a write).

Reports without an order (``(0, 0)``: an agent older than the fields) are ordered by the
agent's own ``sentAt`` instead, against the stored report's, whatever that one carried: so a
late report from before an agent's upgrade cannot replace a newer ordered one, and an agent
taken back to an older version keeps being stored (a newer ``sentAt``) instead of freezing its
last ordered status forever. An equal ``sentAt`` is stored (the last to arrive wins a tie, as
before orders existed).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, and_, or_

from control_plane.db.models import Agent
from protocol.reports import StatusReport

_agents = Agent.__table__


@dataclass(frozen=True)
class StatusOrder:
    """Where a status report stands in its agent's sequence (``sent_at`` None: none stored)."""

    epoch: int = 0
    seq: int = 0
    sent_at: datetime | None = None

    @classmethod
    def of(cls, report: StatusReport) -> StatusOrder:
        """The order a report carries."""
        return cls(report.epoch, report.seq, report.sent_at)

    @property
    def ordered(self) -> bool:
        """Whether it carries the agent's (epoch, seq), as every current agent sends."""
        return self.epoch > 0 or self.seq > 0

    def supersedes(self, stored: StatusOrder) -> bool:
        """Whether a report of this order replaces a stored one of order ``stored``."""
        if self.ordered:
            return (stored.epoch, stored.seq) < (self.epoch, self.seq)
        assert self.sent_at is not None  # every report has one; only a stored row may not
        return stored.sent_at is None or stored.sent_at <= self.sent_at


def supersedes_stored(epoch: Any, seq: Any, sent_at: Any, unordered: Any) -> ColumnElement[bool]:
    """:meth:`StatusOrder.supersedes` against the ``agents`` row, as SQL.

    Each argument is a value or a ``bindparam`` (for an executemany); ``unordered`` is whether
    the report has no (epoch, seq). Stored orders are never negative, so (0, 0) is never newer
    by the first arm.
    """
    c = _agents.c
    by_order = or_(c.status_epoch < epoch, and_(c.status_epoch == epoch, c.status_seq < seq))
    by_time = and_(unordered, or_(c.status_sent_at.is_(None), c.status_sent_at <= sent_at))
    return or_(by_order, by_time)


def newer_than_stored(report: StatusReport) -> ColumnElement[bool]:
    """SQL: whether ``report`` replaces the status the ``agents`` row holds."""
    o = StatusOrder.of(report)
    return supersedes_stored(o.epoch, o.seq, o.sent_at, not o.ordered)


def order_values(report: StatusReport) -> dict[str, Any]:
    """The agents-row columns that record a stored report's order."""
    return {
        "status_epoch": report.epoch,
        "status_seq": report.seq,
        "status_sent_at": report.sent_at,
    }
