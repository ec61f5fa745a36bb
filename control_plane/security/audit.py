"""The audit log: every change and every refused attempt, append-only and hash-chained.

Each row records who (the token or agent, never the secret), what (method and route), when,
from where (the peer address), and the outcome (the HTTP status). Its ``hash`` is
``sha256(prev_hash || canonical JSON of the row's fields)``, and ``prev_hash`` is the hash of
the row before it (64 zeros for the first), so editing a row changes its hash and deleting one
breaks the link of the next: :func:`verify` finds the first row where the chain breaks.
Deleting the newest rows leaves a shorter valid chain; ``modelfleet audit verify`` prints the
head hash so that it can be compared with one recorded earlier (``--expect-head``).

Appends are serialised across replicas with a PostgreSQL advisory lock held for the
transaction (SQLite has one writer already), so the chain never forks.

Refusals repeated by one source are coalesced (:class:`RefusalLog`): the first is a row of
its own, the rest within a window one row with their count, so a flood of bad tokens cannot
grow the log faster than a few rows a minute per source.

Not recorded: reads (GET), and an agent's own successful reports (status, metrics) and
long-polls, which are data rather than changes and would drown the log; an agent's refused
report is recorded like any refusal.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select, text

from control_plane.db.engine import Database
from control_plane.db.models import AuditEvent
from protocol.timeutil import format_time

GENESIS = "0" * 64
ADVISORY_LOCK_KEY = 0x6D66_6175  # "mfau"
FIELDS = ("at", "actor", "action", "target", "outcome", "remote", "detail")


def event_fields(row: AuditEvent | dict[str, Any]) -> dict[str, Any]:
    """The hashed fields of a row (from the table or from the API's JSON)."""
    if isinstance(row, AuditEvent):
        return {
            "at": format_time(row.at),
            "actor": row.actor,
            "action": row.action,
            "target": row.target,
            "outcome": row.outcome,
            "remote": row.remote,
            "detail": row.detail,
        }
    return {k: row[k] for k in FIELDS}


def chain_hash(prev_hash: str, fields: dict[str, Any]) -> str:
    """The hash of a row whose predecessor's hash is ``prev_hash``."""
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(prev_hash.encode() + canonical.encode()).hexdigest()


async def append(
    db: Database,
    at: datetime,
    actor: str,
    action: str,
    target: str,
    outcome: int,
    remote: str,
    detail: dict[str, Any] | None = None,
) -> str:
    """Append one event and return its hash."""
    row = AuditEvent(
        at=at.replace(microsecond=at.microsecond // 1000 * 1000),
        actor=actor[:200],
        action=action[:200],
        target=target[:500],
        outcome=outcome,
        remote=remote[:100],
        detail=detail or {},
    )
    async with db.write() as s:
        if not db.is_sqlite:
            await s.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": ADVISORY_LOCK_KEY})
        last = await s.scalar(select(AuditEvent.hash).order_by(AuditEvent.id.desc()).limit(1))
        row.prev_hash = last or GENESIS
        row.hash = chain_hash(row.prev_hash, event_fields(row))
        s.add(row)
    return row.hash


NO_ROUTE = "(no route)"  # the kind of refusals on paths no route has, whatever the path


@dataclass
class _Run:
    """Refusals of one kind since the row that was written for the first of them."""

    started: datetime
    last: datetime
    route: str | None
    repeated: int = 0


class RefusalLog:
    """Refusals (401, 403, 429) coalesced per source, actor, outcome and route.

    The first refusal of a kind is appended at once, like any event; those that follow within
    ``window_s`` are only counted, and one more row says how many there were (``detail``:
    ``repeated``, ``first``, ``last``) when the window ends: at the next refusal of that kind
    after it, at :meth:`flush` (the server calls it every window) or at shutdown. A flood of
    refusals therefore costs at most two rows per kind per window, and every row is appended
    by :func:`append`, so the chain stays one verifiable chain. Memory is bounded by
    ``max_kinds``; past it, refusals are counted under the source ``*``.
    """

    def __init__(self, db: Database, window_s: float, max_kinds: int = 10_000) -> None:
        self.db = db
        self.window_s = window_s
        self.max_kinds = max_kinds
        self._runs: dict[tuple[str, str, int, str], _Run] = {}

    async def record(
        self,
        at: datetime,
        actor: str,
        action: str,
        target: str,
        outcome: int,
        remote: str,
        route: str | None,
    ) -> None:
        """Record one refusal: a row now, or a count in the open run of its kind."""
        # With no route, the action names the caller's own path (and method): a new one in
        # every request would make every refusal a kind of its own, and a row.
        key = (remote, actor, outcome, action if route is not None else NO_ROUTE)
        if key not in self._runs and len(self._runs) >= self.max_kinds:
            await self.flush(at)
            if len(self._runs) >= self.max_kinds:
                key = ("*", actor, outcome, action)
        run = self._runs.get(key)
        if run is not None and (at - run.started).total_seconds() < self.window_s:
            run.repeated += 1
            run.last = at
            return
        self._runs[key] = _Run(started=at, last=at, route=route)  # before any await: one row
        if run is not None and run.repeated:
            await self._summary(key, run)
        await append(self.db, at, actor, action, target, outcome, remote, {"route": route})

    async def flush(self, now: datetime | None = None) -> None:
        """Write the count of every run whose window has ended (every run when ``now`` is
        None, as at shutdown) and forget those runs."""
        ended = [
            (key, run)
            for key, run in self._runs.items()
            if now is None or (now - run.started).total_seconds() >= self.window_s
        ]
        for key, _ in ended:
            del self._runs[key]
        for key, run in ended:
            if run.repeated:
                await self._summary(key, run)

    async def _summary(self, key: tuple[str, str, int, str], run: _Run) -> None:
        remote, actor, outcome, action = key
        detail = {
            "route": run.route,
            "repeated": run.repeated,
            "first": format_time(run.started),
            "last": format_time(run.last),
        }
        await append(self.db, run.last, actor, action, run.route or action, outcome, remote, detail)


def event_json(row: AuditEvent) -> dict[str, Any]:
    """One event as the API shows it."""
    return {"id": row.id, **event_fields(row), "prevHash": row.prev_hash, "hash": row.hash}


async def list_events(db: Database, after: int, limit: int) -> dict[str, Any]:
    """Events with id > ``after``, oldest first, and the current head hash."""
    async with db.read() as s:
        rows = list(
            await s.scalars(
                select(AuditEvent).where(AuditEvent.id > after).order_by(AuditEvent.id).limit(limit)
            )
        )
        head = await s.scalar(select(AuditEvent.hash).order_by(AuditEvent.id.desc()).limit(1))
    return {"events": [event_json(r) for r in rows], "head": head or GENESIS}


@dataclass
class Verdict:
    """What :func:`verify` found."""

    ok: bool
    count: int
    head: str
    broken_at: int | None = None
    reason: str = ""


def verify(events: Iterable[dict[str, Any]]) -> Verdict:
    """Walk the chain (oldest first); the first row that does not follow breaks it."""
    prev, count = GENESIS, 0
    for e in events:
        count += 1
        if e["prevHash"] != prev:
            return Verdict(
                False,
                count,
                prev,
                e["id"],
                f"event {e['id']} does not follow the one before it: a row before it "
                "was deleted or changed",
            )
        if chain_hash(prev, event_fields(e)) != e["hash"]:
            return Verdict(
                False, count, prev, e["id"], f"event {e['id']} was changed after it was written"
            )
        prev = e["hash"]
    return Verdict(True, count, prev)
