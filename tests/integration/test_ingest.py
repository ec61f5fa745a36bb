"""Batched ingest: concurrent reports share transactions, each is stored exactly once."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, select

from control_plane.db.models import Agent, MetricBatch, MetricSeries
from control_plane.errors import NotFound
from control_plane.fleet.ingest import Ingestor
from control_plane.state import STATE
from protocol.reports import MetricsBatch, SeriesWindow, StatusReport
from protocol.timeutil import format_time
from tests.support.control_plane import ControlPlane


def batch(agent_id: str, seq: int, requests: int = 5) -> MetricsBatch:
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=10 * seq)
    s = SeriesWindow("iris", "1.0.0", requests=requests, errors=1)
    s.latency_ms.add(1.5)
    return MetricsBatch(agent_id, seq, start, start + timedelta(seconds=10), (s,))


def status(agent_id: str, generation: int) -> dict[str, Any]:
    return {
        "agentId": agent_id,
        "generation": generation,
        "sentAt": format_time(datetime.now(UTC)),
        "models": [],
        "facts": {"cpuCount": generation},
    }


async def test_concurrent_reports_share_transactions_and_are_stored_once(
    cp: ControlPlane,
) -> None:
    agents = [await cp.enroll({"site": "x"}) for _ in range(8)]
    calls = []
    for a in agents:
        aid, cred = a["agentId"], a["credential"]
        for seq in range(1, 16):
            body = batch(aid, seq).to_json()
            # Every batch twice at once: a retry racing its original.
            calls += [("metrics", aid, cred, body, seq), ("metrics", aid, cred, body, seq)]
        for gen in range(1, 6):
            calls.append(("status", aid, cred, status(aid, gen), gen))

    async def one(kind: str, aid: str, cred: str, body: dict, n: int) -> dict[str, Any]:
        r = await cp.call("POST", f"/agents/{aid}/{kind}", token=cred, json=body)
        assert r.status == 200, await r.text()
        return await r.json()

    state = cp.client.app[STATE]
    before = state.ingest.transactions
    answers = await asyncio.gather(*(one(*c) for c in calls))
    metric_answers = [a for c, a in zip(calls, answers, strict=True) if c[0] == "metrics"]
    assert sum(a["stored"] for a in metric_answers) == 8 * 15
    assert sum(a["duplicate"] for a in metric_answers) == 8 * 15
    # Fewer transactions than reports: they were batched.
    assert state.ingest.transactions - before < len(calls)
    assert state.ingest.largest_batch > 1
    async with state.db.read() as s:
        assert await s.scalar(select(func.count()).select_from(MetricBatch)) == 8 * 15
        assert await s.scalar(select(func.count()).select_from(MetricSeries)) == 8 * 15
        assert await s.scalar(select(func.sum(MetricSeries.requests))) == 8 * 15 * 5
        for a in await s.scalars(select(Agent)):
            assert a.last_seen_at is not None
            assert a.reported_generation >= 1


async def test_one_bad_report_does_not_fail_the_batch(cp: ControlPlane) -> None:
    state = cp.client.app[STATE]
    a = await cp.enroll({"site": "x"})
    aid = a["agentId"]
    ingest = Ingestor(state.db, state.clock)
    ingest.start()
    try:
        from protocol.reports import status_from_json

        results = await asyncio.gather(
            ingest.metrics(batch(aid, 1)),
            ingest.metrics(batch("00000000-0000-0000-0000-000000000000", 1)),
            ingest.status(status_from_json(status(aid, 7))),
            ingest.metrics(batch(aid, 1)),  # the same batch again in the same transaction
            ingest.status(status_from_json(status("00000000-0000-0000-0000-000000000001", 1))),
            # No epoch/seq (an older agent): the later sentAt wins, a tie the last to arrive.
            ingest.status(status_from_json(status(aid, 9))),
            return_exceptions=True,
        )
    finally:
        await ingest.close()
    assert results[0] is True
    assert isinstance(results[1], NotFound) and results[1].code == "agent_not_found"
    assert results[2] is False and results[5] is True  # 7 is stale beside 9
    assert results[3] is False
    assert isinstance(results[4], NotFound) and results[4].code == "agent_not_found"
    async with state.db.read() as s:
        agent = await s.get(Agent, aid)
        assert agent is not None
        assert agent.reported_generation == 9
        assert agent.facts["cpuCount"] == 9
        assert await s.scalar(select(func.count()).select_from(MetricBatch)) == 1


async def test_ingest_survives_a_batch_that_fails_as_a_whole(cp: ControlPlane) -> None:
    """A batch whose transaction fails is retried report by report; good ones are stored."""
    state = cp.client.app[STATE]
    a = await cp.enroll({"site": "x"})
    aid = a["agentId"]
    ingest = Ingestor(state.db, state.clock)
    ingest.start()
    # facts that JSON cannot encode make the whole UPDATE fail; alone, it fails by itself.
    bad = StatusReport(aid, 1, datetime.now(UTC), (), facts={"x": object()})
    try:
        results = await asyncio.gather(
            ingest.metrics(batch(aid, 1)),
            ingest.status(bad),
            ingest.metrics(batch(aid, 2)),
            return_exceptions=True,
        )
    finally:
        await ingest.close()
    assert results[0] is True and results[2] is True
    assert isinstance(results[1], Exception)
    async with state.db.read() as s:
        assert await s.scalar(select(func.count()).select_from(MetricBatch)) == 2
