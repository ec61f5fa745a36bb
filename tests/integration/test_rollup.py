"""Metric roll-ups: raw → minute → hour keeps every count and every quantile; retention drops
what is past it; reports and gates read across the tiers; concurrent passes never double."""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, select

from control_plane.config import Retention
from control_plane.db.engine import Database
from control_plane.db.models import MetricBatch, MetricRollup, MetricSeries
from control_plane.metrics import reports
from control_plane.metrics.rollup import HOUR, MINUTE, rollup, table_sizes
from control_plane.metrics.series import series_rows
from control_plane.state import STATE
from protocol.reports import MetricsBatch, SeriesWindow
from tests.support.bundles import Publisher, iris_bundle
from tests.support.control_plane import ControlPlane

# Half past an hour, 30 s into a minute: which windows share a minute or an hour is fixed.
NOW = datetime.now(UTC).replace(minute=30, second=30, microsecond=0) - timedelta(hours=1)
RETENTION = Retention(raw_s=3600, minute_s=86400, hour_s=30 * 86400, batches_s=8 * 86400)
AGES = (  # window start, before NOW
    timedelta(minutes=5),
    timedelta(minutes=20),
    timedelta(hours=3),
    timedelta(hours=3, seconds=10),
    timedelta(hours=5),
    timedelta(days=3),
    timedelta(days=3, minutes=2),
    timedelta(days=6),
)


async def send_history(cp: ControlPlane, publisher: Publisher) -> list[dict[str, Any]]:
    await cp.push(iris_bundle(publisher.key))
    rng = random.Random(5)
    agents = [await cp.enroll({"site": site}) for site in ("cloud", "cloud", "onprem")]
    for a in agents:
        for seq, age in enumerate(AGES, start=1):
            s1 = SeriesWindow("iris", "1.0.0", requests=50, errors=seq % 3)
            s2 = SeriesWindow(
                "iris",
                "2.0.0",
                requests=20,
                errors=1,
                shadow_count=4,
                drift_sum=0.5,
                argmax_agree=3,
            )
            for _ in range(50):
                s1.latency_ms.add(rng.lognormvariate(0.3, 0.5))
            for _ in range(20):
                s2.latency_ms.add(rng.lognormvariate(1.0, 0.2))
            start = NOW - age
            b = MetricsBatch(a["agentId"], seq, start, start + timedelta(seconds=10), (s1, s2))
            r = await cp.call(
                "POST", f"/agents/{a['agentId']}/metrics", token=a["credential"], json=b.to_json()
            )
            assert r.status == 200 and (await r.json())["stored"], await r.text()
    return agents


async def report(db: Database, by: str = "site,version") -> Any:
    q = {
        "model": "iris",
        "from": (NOW - timedelta(days=10)).isoformat(),
        "to": NOW.isoformat(),
        "by": by,
    }
    out = await reports.compare(db, reports.parse_report_query(q, NOW))
    return [(g["key"], g["requests"], g["errors"], g["latency_ms"]) for g in out["groups"]]


async def test_rollup_keeps_counts_and_quantiles(cp: ControlPlane, publisher: Publisher) -> None:
    db = cp.client.app[STATE].db
    await send_history(cp, publisher)
    before = await report(db)
    # Buckets start on whole minutes, like the minute roll-ups.
    ts_query = {
        "model": "iris",
        "from": (NOW - timedelta(hours=24, seconds=30)).isoformat(),
        "to": NOW.isoformat(),
        "bucket": "1h",
        "by": "site",
    }
    before_ts = await reports.timeseries(db, reports.parse_report_query(ts_query, NOW, series=True))
    assert (await table_sizes(db))["metric_series"] == 3 * len(AGES) * 2

    done = await rollup(db, NOW, RETENTION)
    # Raw rows older than an hour went to minutes (6 of 8 ages), minute rows older than a day
    # to hours (3 ages; two of them share a bucket).
    assert done["raw_rolled"] == 3 * 6 * 2
    assert done["minutes_rolled"] > 0
    sizes = await table_sizes(db)
    assert sizes["metric_series"] == 3 * 2 * 2
    async with db.read() as s:
        minutes = await s.scalar(
            select(func.count())
            .select_from(MetricRollup)
            .where(MetricRollup.resolution_s == MINUTE)
        )
        hours = await s.scalar(
            select(func.count()).select_from(MetricRollup).where(MetricRollup.resolution_s == HOUR)
        )
        shadow = await series_rows(s, "iris", NOW - timedelta(days=10), versions=["2.0.0"])
    # 3 h and 3 h 10 s share a minute; 5 h has its own: 2 minute buckets x 3 agents x 2 versions.
    assert minutes == 2 * 3 * 2
    # 3 d and 3 d 2 min share an hour; 6 d has its own.
    assert hours == 2 * 3 * 2
    assert sum(r.shadow_count for r in shadow) == 3 * len(AGES) * 4
    assert sum(r.argmax_agree for r in shadow) == 3 * len(AGES) * 3

    assert await report(db) == before  # same counts, same quantiles (sketches merge exactly)
    after_ts = await reports.timeseries(db, reports.parse_report_query(ts_query, NOW, series=True))
    assert after_ts["series"] == before_ts["series"]

    again = await rollup(db, NOW, RETENTION)  # nothing left to move: a no-op
    assert again["raw_rolled"] == again["minutes_rolled"] == 0
    assert await report(db) == before


async def test_retention_drops_old_tiers_and_old_batches(
    cp: ControlPlane, publisher: Publisher
) -> None:
    db = cp.client.app[STATE].db
    agents = await send_history(cp, publisher)
    short = Retention(raw_s=3600, minute_s=3 * 3600, hour_s=4 * 86400, batches_s=4 * 86400)
    done = await rollup(db, NOW, short)
    assert done["hours_dropped"] == 3 * 2  # the 6-day-old windows, one hour row each version
    assert done["batches_dropped"] == 3  # their dedupe records
    async with db.read() as s:
        oldest = await s.scalar(select(func.min(MetricRollup.bucket_start)))
        assert oldest is not None and oldest >= NOW - timedelta(days=4, hours=1)
        assert await s.scalar(select(func.count()).select_from(MetricBatch)) == 3 * 7
    # A batch past the server's dedupe horizon (8 days by default here: 7) is acknowledged and
    # dropped, never stored.
    a = agents[0]
    old = NOW - timedelta(days=9)
    b = MetricsBatch(
        a["agentId"],
        99,
        old,
        old + timedelta(seconds=10),
        (SeriesWindow("iris", "1.0.0", requests=5),),
    )
    r = await cp.call(
        "POST", f"/agents/{a['agentId']}/metrics", token=a["credential"], json=b.to_json()
    )
    assert r.status == 200 and (await r.json())["stored"] is False
    async with db.read() as s:
        assert await s.get(MetricBatch, (a["agentId"], 99)) is None


async def test_concurrent_rollups_never_double(
    cp: ControlPlane, publisher: Publisher, db_url: str
) -> None:
    """Two replicas rolling up at once (two engines on one database): totals stay exact."""
    db = cp.client.app[STATE].db
    await send_history(cp, publisher)
    before = await report(db)
    # SQLite serves one replica: its passes are serialised by the one Database's write lock.
    other = db if db_url.startswith("sqlite") else Database(cp.config.database_url)
    try:
        await asyncio.gather(
            rollup(db, NOW, RETENTION, limit=7), rollup(other, NOW, RETENTION, limit=7)
        )
        await rollup(db, NOW, RETENTION)  # whatever a skipped pass left
    finally:
        if other is not db:
            await other.close()
    assert await report(db) == before
    async with db.read() as s:
        assert await s.scalar(select(func.sum(MetricSeries.requests))) == 3 * 2 * 70


async def test_gates_read_rolled_up_windows(cp: ControlPlane, publisher: Publisher) -> None:
    """The controller's aggregate over a long soak sees raw and rolled-up rows alike."""
    from control_plane.rollout.controller import _aggregate

    db = cp.client.app[STATE].db
    agents = await send_history(cp, publisher)
    ids = {a["agentId"] for a in agents}
    since = NOW - timedelta(hours=6)
    async with db.read() as s:
        before = await _aggregate(s, "iris", since, ids, "2.0.0", same=True)
        base_before = await _aggregate(s, "iris", since, ids, "2.0.0", same=False)
    await rollup(db, NOW, RETENTION)
    async with db.read() as s:
        after = await _aggregate(s, "iris", since, ids, "2.0.0", same=True)
        base_after = await _aggregate(s, "iris", since, ids, "2.0.0", same=False)
    assert (after.requests, after.errors, after.shadow_count) == (
        before.requests,
        before.errors,
        before.shadow_count,
    )
    assert after.requests == 3 * 5 * 20
    assert after.latency_ms.quantile(0.95) == before.latency_ms.quantile(0.95)
    assert base_after.requests == base_before.requests == 3 * 5 * 50
