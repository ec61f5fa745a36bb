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

Readers use :func:`series_rows`, one UNION ALL statement over the tiers, so a roll-up that
commits while a report is read is seen either wholly before or wholly after, never twice.
Each pass moves rows in one transaction (insert or merge into the coarser tier, delete from the
finer), and on PostgreSQL takes a transaction-scoped advisory lock so that of several replicas
only one rolls up at a time.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Select, and_, delete, func, literal, or_, select, text, union_all
from sqlalchemy.ext.asyncio import AsyncSession

from control_plane.config import Retention
from control_plane.db.engine import Database
from control_plane.db.models import MetricBatch, MetricRollup, MetricSeries
from protocol.sketch import DDSketch

log = logging.getLogger("modelfleet.control_plane.rollup")

MINUTE = 60
HOUR = 3600
ADVISORY_LOCK_KEY = 0x6D66_726F  # "mfro": one roll-up at a time across replicas
CHUNK = 500


@dataclass
class SeriesRow:
    """One row of any tier, as readers see it."""

    agent_id: str
    version: str
    window_start: datetime
    requests: int
    errors: int
    latency_sketch: dict[str, Any]
    shadow_count: int
    drift_sum: float
    argmax_agree: int
    resolution_s: int  # 0 for raw rows


def _tier_selects(model: str) -> tuple[Select[Any], Select[Any]]:
    raw = select(
        MetricSeries.agent_id, MetricSeries.version, MetricSeries.window_start.label("start"),
        MetricSeries.requests, MetricSeries.errors, MetricSeries.latency_sketch,
        MetricSeries.shadow_count, MetricSeries.drift_sum, MetricSeries.argmax_agree,
        literal(0).label("resolution_s"),
    ).where(MetricSeries.model == model)  # fmt: skip
    rolled = select(
        MetricRollup.agent_id, MetricRollup.version, MetricRollup.bucket_start.label("start"),
        MetricRollup.requests, MetricRollup.errors, MetricRollup.latency_sketch,
        MetricRollup.shadow_count, MetricRollup.drift_sum, MetricRollup.argmax_agree,
        MetricRollup.resolution_s,
    ).where(MetricRollup.model == model)  # fmt: skip
    return raw, rolled


async def series_rows(
    s: AsyncSession,
    model: str,
    start: datetime,
    end: datetime | None = None,
    versions: Sequence[str] = (),
    exclude_version: str | None = None,
) -> list[SeriesRow]:
    """Rows of every tier for ``model`` whose window starts in [start, end)."""
    raw, rolled = _tier_selects(model)
    parts = []
    for q, col_start, col_version in (
        (raw, MetricSeries.window_start, MetricSeries.version),
        (rolled, MetricRollup.bucket_start, MetricRollup.version),
    ):
        q = q.where(col_start >= start)
        if end is not None:
            q = q.where(col_start < end)
        if versions:
            q = q.where(col_version.in_(list(versions)))
        if exclude_version is not None:
            q = q.where(col_version != exclude_version)
        parts.append(q)
    rows = await s.execute(union_all(*parts))
    out = []
    for r in rows:
        out.append(SeriesRow(r.agent_id, r.version, _aware(r.start), r.requests, r.errors,
                             r.latency_sketch, r.shadow_count, r.drift_sum, r.argmax_agree,
                             r.resolution_s))  # fmt: skip
    return out


def _aware(t: datetime | str) -> datetime:
    # A UNION's column is typed from its first part, but SQLite hands back what it stored.
    from datetime import UTC

    if isinstance(t, str):
        t = datetime.fromisoformat(t)
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)


def _bucket(t: datetime, resolution: int) -> datetime:
    epoch = int(t.timestamp())
    return datetime.fromtimestamp(epoch - epoch % resolution, t.tzinfo)


@dataclass
class _Merged:
    requests: int = 0
    errors: int = 0
    sketch: DDSketch = field(default_factory=DDSketch)
    shadow_count: int = 0
    drift_sum: float = 0.0
    argmax_agree: int = 0

    def add(self, requests: int, errors: int, sketch: dict[str, Any], shadow_count: int,
            drift_sum: float, argmax_agree: int) -> None:  # fmt: skip
        self.requests += requests
        self.errors += errors
        self.sketch.merge(DDSketch.from_json(sketch))
        self.shadow_count += shadow_count
        self.drift_sum += drift_sum
        self.argmax_agree += argmax_agree


Key = tuple[str, str, str, datetime]  # agent, model, version, bucket start


def _add(groups: dict[Key, _Merged], key: Key, r: MetricSeries | MetricRollup) -> None:
    groups.setdefault(key, _Merged()).add(
        r.requests, r.errors, r.latency_sketch, r.shadow_count, r.drift_sum, r.argmax_agree
    )


async def _merge_into(s: AsyncSession, resolution: int, groups: dict[Key, _Merged]) -> None:
    """Add ``groups`` to the rows of ``resolution``, creating the rows that are missing."""
    keys = list(groups)
    for i in range(0, len(keys), CHUNK):
        chunk = keys[i : i + CHUNK]
        cond = or_(*(and_(MetricRollup.agent_id == a, MetricRollup.model == m,
                          MetricRollup.version == v, MetricRollup.bucket_start == b)
                     for a, m, v, b in chunk))  # fmt: skip
        existing = {
            (r.agent_id, r.model, r.version, _aware(r.bucket_start)): r
            for r in await s.scalars(
                select(MetricRollup).where(MetricRollup.resolution_s == resolution, cond)
            )
        }
        for key in chunk:
            g = groups[key]
            row = existing.get(key)
            if row is None:
                a, m, v, b = key
                s.add(MetricRollup(
                    resolution_s=resolution, bucket_start=b, agent_id=a, model=m, version=v,
                    requests=g.requests, errors=g.errors, latency_sketch=g.sketch.to_json(),
                    shadow_count=g.shadow_count, drift_sum=g.drift_sum,
                    argmax_agree=g.argmax_agree,
                ))  # fmt: skip
            else:
                sketch = DDSketch.from_json(row.latency_sketch)
                sketch.merge(g.sketch)
                row.requests += g.requests
                row.errors += g.errors
                row.latency_sketch = sketch.to_json()
                row.shadow_count += g.shadow_count
                row.drift_sum += g.drift_sum
                row.argmax_agree += g.argmax_agree
    await s.flush()


async def _roll(s: AsyncSession, table: type[MetricSeries] | type[MetricRollup],
                conditions: list[Any], start: Any, resolution: int, limit: int) -> int:  # fmt: skip
    """Move up to ``limit`` rows of ``table`` matching ``conditions`` into ``resolution``
    buckets (``start`` is the column their bucket is taken from); return how many moved."""
    rows = list(await s.scalars(
        select(table).where(*conditions).order_by(table.id).limit(limit)
    ))  # fmt: skip
    if not rows:
        return 0
    groups: dict[Key, _Merged] = {}
    for r in rows:
        bucket = _bucket(_aware(getattr(r, start.key)), resolution)
        _add(groups, (r.agent_id, r.model, r.version, bucket), r)
    ids = [r.id for r in rows]
    for i in range(0, len(ids), CHUNK):
        await s.execute(delete(table).where(table.id.in_(ids[i : i + CHUNK])))
    await _merge_into(s, resolution, groups)
    return len(rows)


async def _raw_to_minutes(s: AsyncSession, cutoff: datetime, limit: int) -> int:
    return await _roll(s, MetricSeries, [MetricSeries.window_start < cutoff],
                       MetricSeries.window_start, MINUTE, limit)  # fmt: skip


async def _minutes_to_hours(s: AsyncSession, cutoff: datetime, limit: int) -> int:
    conditions = [MetricRollup.resolution_s == MINUTE, MetricRollup.bucket_start < cutoff]
    return await _roll(s, MetricRollup, conditions, MetricRollup.bucket_start, HOUR, limit)


async def _locked(s: AsyncSession, is_sqlite: bool) -> bool:
    if is_sqlite:
        return True  # the Database's write lock already makes us the only writer
    return bool(await s.scalar(text("SELECT pg_try_advisory_xact_lock(:k)"),
                               {"k": ADVISORY_LOCK_KEY}))  # fmt: skip


async def rollup(
    db: Database, now: datetime, retention: Retention, limit: int = 20_000
) -> dict[str, int]:
    """One full pass: raw → minute → hour, then drop what is past retention.

    Each step runs in transactions of at most ``limit`` rows until nothing is left, and
    returns how many rows each step moved or dropped. Another replica holding the lock
    makes this pass a no-op (it returns ``{"skipped": 1}``).
    """
    done = {"raw_rolled": 0, "minutes_rolled": 0, "hours_dropped": 0, "batches_dropped": 0}
    steps = (
        ("raw_rolled", lambda s: _raw_to_minutes(s, now - timedelta(seconds=retention.raw_s),
                                                 limit)),
        ("minutes_rolled", lambda s: _minutes_to_hours(
            s, now - timedelta(seconds=retention.minute_s), limit)),
    )  # fmt: skip
    for name, step in steps:
        while True:
            async with db.write() as s:
                if not await _locked(s, db.is_sqlite):
                    return {"skipped": 1}
                n = await step(s)
            done[name] += n
            if n < limit:
                break
    async with db.write() as s:
        if not await _locked(s, db.is_sqlite):
            return {"skipped": 1}
        res = await s.execute(delete(MetricRollup).where(
            MetricRollup.resolution_s == HOUR,
            MetricRollup.bucket_start < now - timedelta(seconds=retention.hour_s),
        ))  # fmt: skip
        done["hours_dropped"] = res.rowcount or 0  # type: ignore[attr-defined]
        res = await s.execute(delete(MetricBatch).where(
            MetricBatch.window_end < now - timedelta(seconds=retention.batches_s)
        ))  # fmt: skip
        done["batches_dropped"] = res.rowcount or 0  # type: ignore[attr-defined]
    if any(done.values()):
        log.info("metric roll-up: %s", done)
    return done


async def table_sizes(db: Database) -> dict[str, int]:
    """Row counts of the metric tables (for /health and benchmarks)."""
    async with db.read() as s:
        return {
            "metric_series": await s.scalar(select(func.count()).select_from(MetricSeries)) or 0,
            "metric_rollups": await s.scalar(select(func.count()).select_from(MetricRollup)) or 0,
            "metric_batches": await s.scalar(select(func.count()).select_from(MetricBatch)) or 0,
        }
