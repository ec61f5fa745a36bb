"""Metric roll-ups and retention, so the metric tables stay bounded at fleet scale.

Three tiers, each per agent, model and version (reports group by any agent label, gates by
sets of agents, so the agent stays in the key):

- raw ``metric_series``: one row per metrics batch (about 10 s), kept ``raw_s``;
- ``metric_rollups`` at 60 s: raw rows older than that are merged (counts added, latency
  sketches merged, which DDSketch does without loss of its guarantee), kept ``minute_s``;
- ``metric_rollups`` at 3,600 s: minute rows older than that, kept ``hour_s``, then dropped.

The dedupe records of metric batches (``metric_batches``) are kept ``batches_s``; a batch
whose window ended before that horizon is no longer accepted (it is acknowledged and dropped),
so a very late retry can never be counted twice.

Readers use ``series_rows`` (``metrics/series.py``), one UNION ALL statement over the tiers,
so a roll-up that commits while a report is read is seen wholly before or wholly after.
Each pass moves rows in one transaction (insert or merge into the coarser tier, delete from the
finer), and on PostgreSQL takes a transaction-scoped advisory lock so that of several replicas
only one rolls up at a time.

A stored row nobody can use (a sketch of other parameters or with bins past what a float holds,
counts that are not counts: written by an older version, or by hand) must never stop a reader
or the roll-up. Readers (the rollout gates, the reports) leave it out with ``usable``,
counting it once in a ``SkippedRows``. The roll-up moves it, in the same transaction, to
``metric_set_aside`` with its reason: it is no longer read or merged, an operator can still see
it, and it is dropped with the hour tier's retention. Should merging still fail in a way these
checks did not foresee, the pass retries with fewer rows until the one row that fails is alone,
and sets that one aside: no row can stop roll-up and retention for good.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, delete, func, or_, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from control_plane.config import Retention
from control_plane.db.engine import Database
from control_plane.db.models import MetricBatch, MetricRollup, MetricSeries, MetricSetAside
from control_plane.metrics.series import (
    COUNTS,
    MAX_COUNT,
    MAX_FLOAT_SUM,
    BadRow,
    aware,
    checked_row,
)
from control_plane.setaside import is_transient, printable, reason_of
from protocol.sketch import DDSketch

log = logging.getLogger("modelfleet.control_plane.rollup")

MINUTE = 60
HOUR = 3600
ADVISORY_LOCK_KEY = 0x6D66_726F  # "mfro": one roll-up at a time across replicas
CHUNK = 500
# Rows one pass may set aside one by one after failures the checks did not foresee; past it
# the failure is not about rows (a bug, a schema out of step) and the pass stops instead.
MAX_ALONE_PER_PASS = 100


def _bucket(t: datetime, resolution: int) -> datetime:
    epoch = int(t.timestamp())
    return datetime.fromtimestamp(epoch - epoch % resolution, t.tzinfo)


@dataclass
class _Merged:
    """Figures of one bucket; every total kept within the bounds of a usable row."""

    requests: int = 0
    errors: int = 0
    shadow_count: int = 0
    argmax_agree: int = 0
    drift_sum: float = 0.0
    sketch: DDSketch = field(default_factory=DDSketch)

    @classmethod
    def of(cls, row: MetricSeries | MetricRollup) -> _Merged:
        """A stored row's figures; raises BadRow when they are not usable."""
        sketch = checked_row(row)
        return cls(
            requests=row.requests,
            errors=row.errors,
            shadow_count=row.shadow_count,
            argmax_agree=row.argmax_agree,
            drift_sum=float(row.drift_sum),
            sketch=sketch,
        )

    def add(self, other: _Merged) -> None:
        """Add ``other``; raises BadRow, changing nothing, when a total would pass the bounds."""
        counts = [getattr(self, n) + getattr(other, n) for n in COUNTS]
        if (
            max(*counts, self.sketch.count + other.sketch.count) > MAX_COUNT
            or abs(self.drift_sum + other.drift_sum) > MAX_FLOAT_SUM
            or abs(self.sketch.sum + other.sketch.sum) > MAX_FLOAT_SUM
        ):
            raise BadRow("merged totals would pass 2**53")
        for name, total in zip(COUNTS, counts, strict=True):
            setattr(self, name, total)
        self.drift_sum += other.drift_sum
        self.sketch.merge(other.sketch)

    def write(self, row: MetricRollup) -> None:
        """Store these figures in ``row``."""
        row.requests, row.errors = self.requests, self.errors
        row.shadow_count, row.argmax_agree = self.shadow_count, self.argmax_agree
        row.drift_sum, row.latency_sketch = self.drift_sum, self.sketch.to_json()


Key = tuple[str, str, str, datetime]  # agent, model, version, bucket start


@dataclass(frozen=True)
class _Step:
    """One roll-up step: rows of ``table`` matching ``conditions`` go to ``resolution``."""

    name: str
    table: type[MetricSeries] | type[MetricRollup]
    conditions: tuple[Any, ...]
    start: Any  # the column a row's bucket is taken from
    resolution: int


def _source(row: MetricSeries | MetricRollup) -> str:
    if isinstance(row, MetricRollup):
        return f"metric_rollups/{row.resolution_s}s"
    return "metric_series"


def _snapshot(row: MetricSeries | MetricRollup) -> str:
    """The row as it was, as text: kept as a record, whatever it holds, never read back."""
    doc = {c.key: getattr(row, c.key) for c in row.__table__.columns}
    try:
        return json.dumps(doc, default=str, sort_keys=True)
    except (TypeError, ValueError, RecursionError):
        import reprlib

        return printable(reprlib.repr(doc), 20_000)


class _SetAside:
    """Rows one transaction sets aside; logs the first few of them and how many in all."""

    LOGGED = 10

    def __init__(self, s: AsyncSession, now: datetime) -> None:
        self.s = s
        self.now = now
        self.count = 0

    def add(self, row: MetricSeries | MetricRollup, reason: str) -> None:
        """Record ``row`` in metric_set_aside with ``reason`` (the caller removes it)."""
        reason = printable(reason)
        self.s.add(
            MetricSetAside(
                set_aside_at=self.now,
                source=_source(row),
                source_id=row.id,
                agent_id=printable(str(row.agent_id), 36),
                model=printable(str(row.model), 128),
                version=printable(str(row.version), 64),
                reason=reason,
                row=_snapshot(row),
            )
        )
        self.count += 1
        if self.count <= self.LOGGED:
            log.warning("metric roll-up set %s #%s aside: %s", _source(row), row.id, reason)

    def done(self) -> None:
        """Say how many were set aside beyond those logged one by one."""
        if self.count > self.LOGGED:
            log.warning("metric roll-up set %d rows aside in one pass", self.count)


async def _merge_into(
    s: AsyncSession, resolution: int, groups: dict[Key, _Merged], aside: _SetAside
) -> None:
    """Add ``groups`` to the rows of ``resolution``, creating the rows that are missing.

    An existing row that cannot take them (unusable itself, or its totals would pass the
    bounds) is set aside and its place taken by the group.
    """
    keys = list(groups)
    for i in range(0, len(keys), CHUNK):
        chunk = keys[i : i + CHUNK]
        cond = or_(
            *(
                and_(
                    MetricRollup.agent_id == a,
                    MetricRollup.model == m,
                    MetricRollup.version == v,
                    MetricRollup.bucket_start == b,
                )
                for a, m, v, b in chunk
            )
        )
        existing = {
            (r.agent_id, r.model, r.version, aware(r.bucket_start)): r
            for r in await s.scalars(
                select(MetricRollup).where(MetricRollup.resolution_s == resolution, cond)
            )
        }
        for key in chunk:
            g = groups[key]
            row = existing.get(key)
            if row is None:
                a, m, v, b = key
                row = MetricRollup(
                    resolution_s=resolution, bucket_start=b, agent_id=a, model=m, version=v
                )
                g.write(row)
                s.add(row)
                continue
            try:
                merged = _Merged.of(row)
                merged.add(g)
            except BadRow as exc:
                aside.add(row, f"{exc}; its bucket now holds only the rows merged after it")
                merged = g
            merged.write(row)
    await s.flush()


async def _roll(s: AsyncSession, step: _Step, limit: int, now: datetime) -> tuple[int, int]:
    """Move up to ``limit`` rows of ``step`` into its coarser tier, setting aside those that
    cannot be merged; return (rows moved, rows set aside)."""
    table = step.table
    rows = list(
        await s.scalars(select(table).where(*step.conditions).order_by(table.id).limit(limit))
    )
    if not rows:
        return 0, 0
    aside = _SetAside(s, now)
    groups: dict[Key, _Merged] = {}
    for r in rows:
        try:
            bucket = _bucket(aware(getattr(r, step.start.key)), step.resolution)
            figures = _Merged.of(r)
            key = (r.agent_id, r.model, r.version, bucket)
            group = groups.get(key)
            if group is None:
                groups[key] = figures
            else:
                group.add(figures)
        except (BadRow, TypeError, ValueError, OverflowError) as exc:
            aside.add(r, str(exc) if isinstance(exc, BadRow) else reason_of(exc))
    ids = [r.id for r in rows]
    for i in range(0, len(ids), CHUNK):
        await s.execute(delete(table).where(table.id.in_(ids[i : i + CHUNK])))
    await _merge_into(s, step.resolution, groups, aside)
    aside.done()
    return len(rows), aside.count


async def _set_aside_first(db: Database, step: _Step, reason: str, now: datetime) -> None:
    """Set aside the first row ``step`` would move, alone, with ``reason``.

    Should even recording it fail, the row is deleted and the reason logged: the pass must
    go on.
    """
    table = step.table
    first = select(table).where(*step.conditions).order_by(table.id).limit(1)
    try:
        async with db.write() as s:
            row = await s.scalar(first)
            if row is not None:
                _SetAside(s, now).add(row, f"roll-up failed on this row alone: {reason}")
                await s.execute(delete(table).where(table.id == row.id))
        return
    except Exception as exc:
        if is_transient(exc):
            raise
        # Deliberate boundary: the row cannot even be recorded; it goes, and the log says so.
        log.error(
            "metric roll-up could not record a row it sets aside (%s); deleting it: %s",
            reason_of(exc),
            reason,
        )
    async with db.write() as s:
        row_id = await s.scalar(
            select(table.id).where(*step.conditions).order_by(table.id).limit(1)
        )
        if row_id is not None:
            await s.execute(delete(table).where(table.id == row_id))


async def _locked(s: AsyncSession, is_sqlite: bool) -> bool:
    if is_sqlite:
        return True  # the Database's write lock already makes us the only writer
    return bool(
        await s.scalar(text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": ADVISORY_LOCK_KEY})
    )


class _Skipped(Exception):
    """Another replica holds the roll-up lock."""


async def _run_step(
    db: Database, step: _Step, limit: int, now: datetime, done: dict[str, int]
) -> None:
    """Move every row of ``step``, ``limit`` at a time; raises _Skipped.

    A transaction that fails in a way the row checks did not foresee is retried with half the
    rows, down to the one row it fails on, which is set aside; a passing failure of the
    database is raised.
    """
    size, alone = limit, 0
    while True:
        try:
            async with db.write() as s:
                if not await _locked(s, db.is_sqlite):
                    raise _Skipped
                moved, aside = await _roll(s, step, size, now)
        except _Skipped:
            raise
        except Exception as exc:
            if is_transient(exc):
                raise
            # Deliberate boundary: no row may stop the roll-up for good (see the docstring).
            if size > 1:
                size = max(1, size // 2)
                continue
            alone += 1
            if alone > MAX_ALONE_PER_PASS:
                raise
            await _set_aside_first(db, step, reason_of(exc), now)
            done["set_aside"] += 1
            size = limit
            continue
        done[step.name] += moved
        done["set_aside"] += aside
        if moved < size:
            return


async def rollup(
    db: Database, now: datetime, retention: Retention, limit: int = 20_000
) -> dict[str, int]:
    """One full pass: raw → minute → hour, then drop what is past retention.

    Each step runs in transactions of at most ``limit`` rows until nothing is left, and
    returns how many rows each step took from its tier or dropped, and how many of them (or of
    the coarser rows they were merged into) it set aside. Another
    replica holding the lock makes this pass a no-op (it returns ``{"skipped": 1}``).
    Raises the database's errors when it goes away.
    """
    done = {
        "raw_rolled": 0,
        "minutes_rolled": 0,
        "hours_dropped": 0,
        "batches_dropped": 0,
        "set_aside": 0,
        "set_aside_dropped": 0,
    }
    steps = (
        _Step(
            "raw_rolled",
            MetricSeries,
            (MetricSeries.window_start < now - timedelta(seconds=retention.raw_s),),
            MetricSeries.window_start,
            MINUTE,
        ),
        _Step(
            "minutes_rolled",
            MetricRollup,
            (
                MetricRollup.resolution_s == MINUTE,
                MetricRollup.bucket_start < now - timedelta(seconds=retention.minute_s),
            ),
            MetricRollup.bucket_start,
            HOUR,
        ),
    )
    try:
        for step in steps:
            await _run_step(db, step, limit, now, done)
    except _Skipped:
        return {"skipped": 1}
    async with db.write() as s:
        if not await _locked(s, db.is_sqlite):
            return {"skipped": 1}
        horizon = now - timedelta(seconds=retention.hour_s)
        res = await s.execute(
            delete(MetricRollup).where(
                MetricRollup.resolution_s == HOUR,
                MetricRollup.bucket_start < horizon,
            )
        )
        done["hours_dropped"] = res.rowcount or 0  # type: ignore[attr-defined]
        res = await s.execute(
            delete(MetricBatch).where(
                MetricBatch.window_end < now - timedelta(seconds=retention.batches_s)
            )
        )
        done["batches_dropped"] = res.rowcount or 0  # type: ignore[attr-defined]
        # Set-aside rows are kept as long as the longest tier would have kept them.
        res = await s.execute(delete(MetricSetAside).where(MetricSetAside.set_aside_at < horizon))
        done["set_aside_dropped"] = res.rowcount or 0  # type: ignore[attr-defined]
    if any(done.values()):
        log.info("metric roll-up: %s", done)
    return done


async def set_aside_count(s: AsyncSession) -> int:
    """How many metric rows the roll-up holds set aside (for /health)."""
    return await s.scalar(select(func.count()).select_from(MetricSetAside)) or 0


async def table_sizes(db: Database) -> dict[str, int]:
    """Row counts of the metric tables (for /health and benchmarks)."""
    async with db.read() as s:
        return {
            "metric_series": await s.scalar(select(func.count()).select_from(MetricSeries)) or 0,
            "metric_rollups": await s.scalar(select(func.count()).select_from(MetricRollup)) or 0,
            "metric_batches": await s.scalar(select(func.count()).select_from(MetricBatch)) or 0,
        }
