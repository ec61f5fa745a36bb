"""Batched report ingest: many status reports and metric batches per transaction.

Every HTTP handler and the MQTT bridge hands its report to one :class:`Ingestor` per process
and waits for the result. A single writer task takes whatever has queued up (up to
``max_batch``), stores it in one transaction and then answers each waiting caller, so a
report is acknowledged only after its commit: group commit, as databases do with their own
log. Under light load a batch is one report and nothing waits longer than before; under heavy
load the cost of a transaction is shared by hundreds of reports.

If a batch fails as a whole (a row that breaks a constraint, a database that went away), each
report is retried alone, so one bad report cannot fail the others and every caller gets its own
answer: stored, duplicate, or the error that says why not.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import BigInteger, Boolean, bindparam, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from control_plane.config import Retention
from control_plane.db.engine import Database
from control_plane.db.models import Agent, MetricBatch, MetricSeries, UTCDateTime
from control_plane.errors import NotFound
from control_plane.events.watch import note_failures
from control_plane.fleet import reports
from control_plane.fleet.status_order import StatusOrder, supersedes_stored
from protocol.reports import MetricsBatch, StatusReport

log = logging.getLogger("modelfleet.control_plane.ingest")

# Rows per INSERT statement; keeps every statement under SQLite's and asyncpg's bound-parameter
# limits (32,766) whatever the batch size.
ROWS_PER_STATEMENT = 1000


_agents = Agent.__table__
# Core executemany: the ORM's bulk UPDATE costs about as much per row as the database does.
# Conditional: a row changes only when the report is newer than what it holds (see
# control_plane/fleet/status_order.py), so a late report never replaces a newer one, whichever
# replica or transport stored that. last_seen_at is set for every report, stale or not, below.
STATUS_UPDATE = (
    update(_agents)
    .where(
        _agents.c.id == bindparam("b_id"),
        supersedes_stored(
            epoch=bindparam("b_epoch", type_=BigInteger),
            seq=bindparam("b_seq", type_=BigInteger),
            sent_at=bindparam("b_sent", type_=UTCDateTime),
            unordered=bindparam("b_unordered", type_=Boolean),
        ),
    )
    .values(
        status=bindparam("b_status"),
        reported_generation=bindparam("b_generation"),
        facts=bindparam("b_facts"),
        status_epoch=bindparam("b_epoch"),
        status_seq=bindparam("b_seq"),
        status_sent_at=bindparam("b_sent"),
    )
)

# What the last_seen_at update reads back: the order of the status each row holds.
SEEN_RETURNING = (
    _agents.c.id,
    _agents.c.status_epoch,
    _agents.c.status_seq,
    _agents.c.status_sent_at,
)


@dataclass
class _Item:
    report: StatusReport | MetricsBatch
    future: asyncio.Future[bool] = field(repr=False)
    queued_at: float = field(default_factory=time.monotonic)


def _not_found(agent_id: str) -> NotFound:
    return NotFound("agent_not_found", f"no agent {agent_id}", "agentId")


def status_values(facts: dict[str, Any], report: StatusReport) -> dict[str, Any]:
    """STATUS_UPDATE's parameters for one report, the values reports.store_status sets."""
    order = StatusOrder.of(report)
    return {
        "b_id": report.agent_id,
        "b_status": reports.status_document(report),
        "b_generation": report.generation,
        "b_facts": reports.merged_facts(facts, report),
        "b_epoch": order.epoch,
        "b_seq": order.seq,
        "b_sent": order.sent_at,
        "b_unordered": not order.ordered,
    }


async def store_batch(
    s: AsyncSession, reports: list[StatusReport | MetricsBatch], now: datetime, is_sqlite: bool
) -> list[bool | NotFound]:
    """Store reports in the open transaction; one result per report, in order.

    A status gives True when it is the agent's stored status now (a duplicate of the stored
    one too), False when it is stale: older than the stored one, or than another of the same
    agent in this batch (the newest wins, not the last to arrive). A metrics batch gives True
    when stored and False when that (agent, seq) was stored before (or earlier in this same
    batch). An unknown agent gives NotFound for its report and leaves the others alone.
    Every report of a known agent, stale or not, moves its last_seen_at.
    """
    ids = {r.agent_id for r in reports}
    known: dict[str, dict[str, Any]] = {}
    id_list = sorted(ids)
    for i in range(0, len(id_list), ROWS_PER_STATEMENT):
        chunk = id_list[i : i + ROWS_PER_STATEMENT]
        for agent_id, facts in await s.execute(
            select(Agent.id, Agent.facts).where(Agent.id.in_(chunk), Agent.revoked_at.is_(None))
        ):
            known[agent_id] = facts
    results: list[bool | NotFound] = []
    latest_status: dict[str, StatusReport] = {}
    new_batches: dict[tuple[str, int], MetricsBatch] = {}
    for r in reports:
        if r.agent_id not in known:
            results.append(_not_found(r.agent_id))
        elif isinstance(r, StatusReport):
            held = latest_status.get(r.agent_id)
            if held is None or StatusOrder.of(r).supersedes(StatusOrder.of(held)):
                latest_status[r.agent_id] = r
            results.append(True)  # settled below once we know which is stored
        else:
            results.append(True)  # settled below once we know which were new
            new_batches.setdefault((r.agent_id, r.seq), r)

    if latest_status:
        rows = [status_values(known[a], r) for a, r in latest_status.items()]
        await s.execute(STATUS_UPDATE, rows)  # one executemany, no ORM bookkeeping per row
        await note_failures(s, latest_status.values(), now)  # webhooks: activation.failed

    inserted: set[tuple[str, int]] = set()
    if new_batches:
        dialect_insert = sqlite.insert if is_sqlite else postgresql.insert
        batch_rows = [
            {
                "agent_id": b.agent_id,
                "seq": b.seq,
                "window_start": b.window_start,
                "window_end": b.window_end,
                "received_at": now,
            }
            for b in new_batches.values()
        ]
        for i in range(0, len(batch_rows), ROWS_PER_STATEMENT):
            stmt = (
                dialect_insert(MetricBatch)
                .values(batch_rows[i : i + ROWS_PER_STATEMENT])
                .on_conflict_do_nothing()
                .returning(MetricBatch.agent_id, MetricBatch.seq)
            )
            inserted.update((a, q) for a, q in await s.execute(stmt))
        series_rows = [
            {
                "agent_id": b.agent_id,
                "seq": b.seq,
                "model": x.model,
                "version": x.version,
                "window_start": b.window_start,
                "window_end": b.window_end,
                "requests": x.requests,
                "errors": x.errors,
                "latency_sketch": x.latency_ms.to_json(),
                "shadow_count": x.shadow_count,
                "drift_sum": x.drift_sum,
                "argmax_agree": x.argmax_agree,
            }
            for key, b in new_batches.items()
            if key in inserted
            for x in b.series
        ]
        for i in range(0, len(series_rows), ROWS_PER_STATEMENT):
            await s.execute(insert(MetricSeries), series_rows[i : i + ROWS_PER_STATEMENT])

    # Every report is a sign of life. The same statement reads back the order each row holds
    # now (ours if our UPDATE applied: the row stays locked by this transaction), which says
    # which status reports were stored.
    stored_order: dict[str, StatusOrder] = {}
    seen = sorted(set(latest_status) | {a for a, _ in new_batches})
    for i in range(0, len(seen), ROWS_PER_STATEMENT):
        for agent_id, epoch, seq, sent_at in await s.execute(
            update(_agents)
            .where(_agents.c.id.in_(seen[i : i + ROWS_PER_STATEMENT]))
            .values(last_seen_at=now)
            .returning(*SEEN_RETURNING)
        ):
            stored_order[agent_id] = StatusOrder(epoch, seq, sent_at)

    # A status counts as stored when it is the one its agent's row holds now; a metrics batch
    # only for its first occurrence that was inserted.
    claimed: set[tuple[str, int]] = set()
    for i, r in enumerate(reports):
        if isinstance(r, StatusReport) and results[i] is True:
            newest = r is latest_status[r.agent_id]
            results[i] = newest and stored_order.get(r.agent_id) == StatusOrder.of(r)
        elif isinstance(r, MetricsBatch) and results[i] is True:
            key = (r.agent_id, r.seq)
            results[i] = key in inserted and key not in claimed
            claimed.add(key)
    return results


class Ingestor:
    """Collects reports from concurrent callers and writes them in shared transactions."""

    def __init__(
        self,
        db: Database,
        clock: Callable[[], datetime],
        *,
        max_batch: int = 1000,
        max_age_s: float = Retention().batches_s,
    ) -> None:
        self.db = db
        self.clock = clock
        self.max_batch = max_batch
        # Metric batches older than this are past the dedupe horizon (metrics/rollup.py):
        # acknowledged and dropped, so a very late retry can never be counted twice.
        self.max_age = timedelta(seconds=max_age_s)
        self.too_old = 0
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        # Figures for /metrics and benchmarks: transactions and reports written.
        self.transactions = 0
        self.reports = 0
        self.largest_batch = 0
        # Called after each committed batch with its size and its lag (seconds from the oldest
        # report's arrival to the commit): control_plane/api/metrics.py turns them into
        # histograms, so this module knows nothing of Prometheus.
        self.observer: Callable[[int, float], None] | None = None

    @property
    def queued(self) -> int:
        """Reports waiting for the writer."""
        return self._queue.qsize()

    def start(self) -> None:
        """Start the writer task on the running loop."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="ingest-writer")

    async def close(self) -> None:
        """Stop the writer once what is queued has been written."""
        if self._task is None:
            return
        if not self._task.done():
            await self._queue.join()
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self._task = None

    async def status(self, report: StatusReport) -> bool:
        """Store a status report if it is newer than the stored one; False when stale.

        Raises NotFound for an unknown agent.
        """
        return await self._submit(report)

    async def metrics(self, batch: MetricsBatch) -> bool:
        """Store a metrics batch once; False when this (agent, seq) was stored before."""
        return await self._submit(batch)

    async def _submit(self, report: StatusReport | MetricsBatch) -> bool:
        if isinstance(report, MetricsBatch) and report.window_end < self.clock() - self.max_age:
            self.too_old += 1
            return False
        if self._task is None or self._task.done():
            # No writer (a tool or test using the functions directly): store it alone.
            return await self._store_one(report)
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Item(report, fut))
        return await fut

    async def _store_one(self, report: StatusReport | MetricsBatch) -> bool:
        now = self.clock()
        if isinstance(report, StatusReport):
            return await reports.store_status(self.db, report, now)
        return await reports.store_metrics(self.db, report, now)

    async def _run(self) -> None:
        while True:
            items = [await self._queue.get()]
            while len(items) < self.max_batch and not self._queue.empty():
                items.append(self._queue.get_nowait())
            try:
                await self._write(items)
            finally:
                for _ in items:
                    self._queue.task_done()

    async def _write(self, items: list[_Item]) -> None:
        now = self.clock()
        try:
            async with self.db.write() as s:
                results = await store_batch(s, [i.report for i in items], now, self.db.is_sqlite)
        except Exception as exc:  # every report is retried alone below
            if len(items) == 1:
                self._settle(items[0], exc)
                return
            log.warning("batch of %d reports failed (%s); storing them one by one", len(items), exc)
            for item in items:
                try:
                    self._settle(item, await self._store_one(item.report))
                except Exception as one_exc:  # handed to that caller
                    self._settle(item, one_exc)
            return
        self.transactions += 1
        self.reports += len(items)
        self.largest_batch = max(self.largest_batch, len(items))
        if self.observer is not None:
            self.observer(len(items), time.monotonic() - min(i.queued_at for i in items))
        for item, result in zip(items, results, strict=True):
            self._settle(item, result)

    @staticmethod
    def _settle(item: _Item, result: bool | BaseException) -> None:
        if item.future.done():  # the caller went away (client disconnected)
            return
        if isinstance(result, BaseException):
            item.future.set_exception(result)
        else:
            item.future.set_result(result)
