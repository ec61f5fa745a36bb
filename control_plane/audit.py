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
        return {"at": format_time(row.at), "actor": row.actor, "action": row.action,
                "target": row.target, "outcome": row.outcome, "remote": row.remote,
                "detail": row.detail}  # fmt: skip
    return {k: row[k] for k in FIELDS}


def chain_hash(prev_hash: str, fields: dict[str, Any]) -> str:
    """The hash of a row whose predecessor's hash is ``prev_hash``."""
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(prev_hash.encode() + canonical.encode()).hexdigest()


async def append(
    db: Database, at: datetime, actor: str, action: str, target: str, outcome: int,
    remote: str, detail: dict[str, Any] | None = None,
) -> str:  # fmt: skip
    """Append one event and return its hash."""
    row = AuditEvent(at=at.replace(microsecond=at.microsecond // 1000 * 1000), actor=actor[:200],
                     action=action[:200], target=target[:500], outcome=outcome,
                     remote=remote[:100], detail=detail or {})  # fmt: skip
    async with db.write() as s:
        if not db.is_sqlite:
            await s.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": ADVISORY_LOCK_KEY})
        last = await s.scalar(select(AuditEvent.hash).order_by(AuditEvent.id.desc()).limit(1))
        row.prev_hash = last or GENESIS
        row.hash = chain_hash(row.prev_hash, event_fields(row))
        s.add(row)
    return row.hash


def event_json(row: AuditEvent) -> dict[str, Any]:
    """One event as the API shows it."""
    return {"id": row.id, **event_fields(row), "prevHash": row.prev_hash, "hash": row.hash}


async def list_events(db: Database, after: int, limit: int) -> dict[str, Any]:
    """Events with id > ``after``, oldest first, and the current head hash."""
    async with db.read() as s:
        rows = list(await s.scalars(
            select(AuditEvent).where(AuditEvent.id > after).order_by(AuditEvent.id).limit(limit)
        ))  # fmt: skip
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
            return Verdict(False, count, prev, e["id"],
                           f"event {e['id']} does not follow the one before it: a row before it "
                           "was deleted or changed")  # fmt: skip
        if chain_hash(prev, event_fields(e)) != e["hash"]:
            return Verdict(False, count, prev, e["id"],
                           f"event {e['id']} was changed after it was written")  # fmt: skip
        prev = e["hash"]
    return Verdict(True, count, prev)
