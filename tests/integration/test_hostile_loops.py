"""Loops that survive a bad item (issue 13, findings 1 and 2).

Bad rows are planted straight in the database, as an older version (or a hand edit) could have
left them, on SQLite and PostgreSQL: sketches of other parameters, bin indexes past what a float
holds, counts past 64 bits once added up, shapes that are not sketches at all. Then: another
rollout still advances and completes, a rollout whose own data breaks is set aside with its
reason once, roll-up passes go on and retention still drops old rows, reports answer 200 and
leave the rows out, the MQTT bridge counts bad payloads as malformed and stores another agent's
good reports right after, and the notify paths shrug off a raising listener and garbage.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from control_plane.config import Retention
from control_plane.db.engine import Database
from control_plane.db.models import (
    MetricRollup,
    MetricSeries,
    MetricSetAside,
    Rollout,
    RolloutEvent,
)
from control_plane.fleet.notify import DesiredNotifier
from control_plane.metrics import rollup as rollup_module
from control_plane.metrics.rollup import HOUR, MINUTE, rollup
from control_plane.mqtt.bridge import MAX_IN_FLIGHT
from control_plane.state import MQTT, STATE
from protocol.reports import MetricsBatch, SeriesWindow, StatusReport
from protocol.sketch import DDSketch
from protocol.topics import agent_topic
from tests.support.agents import eventually
from tests.support.broker import Broker, mqtt_config
from tests.support.bundles import Publisher, iris_bundle
from tests.support.control_plane import ControlPlane, cp_config, start_control_plane

pytestmark = pytest.mark.slow


def _sketch(accuracy: float = 0.01, values: tuple[float, ...] = (1.0, 2.0, 3.0)) -> DDSketch:
    sk = DDSketch(relative_accuracy=accuracy)
    for v in values:
        sk.add(v)
    return sk


def _good_sketch_json() -> dict[str, Any]:
    return _sketch().to_json()


def _huge_bin() -> dict[str, Any]:
    doc = _good_sketch_json()
    doc.update(binKeys=[10**6], binCounts=[3], zeroCount=0, count=3)
    return doc


# (what it is, the fields of a planted row that differ from a good one)
BAD_ROWS: list[tuple[str, dict[str, Any]]] = [
    ("other relativeAccuracy", {"latency_sketch": _sketch(0.02).to_json()}),
    ("bin index past a float", {"latency_sketch": _huge_bin()}),
    ("not a sketch", {"latency_sketch": ["binKeys", 1]}),
    ("count off the bins", {"latency_sketch": {**_good_sketch_json(), "count": 99}}),
    ("bins of strings", {"latency_sketch": {**_good_sketch_json(), "binKeys": "abc"}}),
    ("counts past 64 bits once added", {"requests": 2**62, "errors": 2**62}),
]


def _row(
    agent_id: str, start: datetime, version: str = "1.0.0", model: str = "iris", **fields: Any
) -> MetricSeries:
    values: dict[str, Any] = {
        "agent_id": agent_id,
        "seq": 0,
        "model": model,
        "version": version,
        "window_start": start,
        "window_end": start + timedelta(seconds=10),
        "requests": 10,
        "errors": 0,
        "latency_sketch": _good_sketch_json(),
        "shadow_count": 0,
        "drift_sum": 0.0,
        "argmax_agree": 0,
    }
    values.update(fields)
    return MetricSeries(**values)


async def plant_bad(db: Database, agent_id: str, start: datetime, model: str = "iris") -> int:
    """One bad row of each kind in ``metric_series``; returns how many."""
    async with db.write() as s:
        for i, (_, fields) in enumerate(BAD_ROWS):
            s.add(_row(agent_id, start + timedelta(seconds=i), model=model, seq=1000 + i, **fields))
    return len(BAD_ROWS)


async def send_metrics(
    cp: ControlPlane,
    agent: dict[str, Any],
    seq: int,
    start: datetime,
    requests: int = 20,
    model: str = "iris",
    version: str = "1.0.0",
) -> None:
    w = SeriesWindow(model, version, requests=requests)
    for i in range(requests):
        w.latency_ms.add(1.0 + i / 10)
    batch = MetricsBatch(agent["agentId"], seq, start, start + timedelta(seconds=10), (w,))
    r = await cp.call(
        "POST",
        f"/agents/{agent['agentId']}/metrics",
        token=agent["credential"],
        json=batch.to_json(),
    )
    assert r.status == 200, await r.text()


async def health(cp: ControlPlane) -> dict[str, Any]:
    return await (await cp.call("GET", "/health", token="")).json()


async def show(cp: ControlPlane, rollout_id: str) -> dict[str, Any]:
    return await (await cp.call("GET", f"/rollouts/{rollout_id}")).json()


async def events(db: Database, rollout_id: str) -> list[tuple[str, str]]:
    async with db.read() as s:
        rows = await s.scalars(
            select(RolloutEvent)
            .where(RolloutEvent.rollout_id == rollout_id)
            .order_by(RolloutEvent.id)
        )
        return [(e.kind, e.reason) for e in rows]


@pytest.fixture
async def fast_cp(tmp_path: Path, db_url: str, publisher: Publisher) -> AsyncIterator[ControlPlane]:
    """A control plane (SQLite or PostgreSQL) whose controller ticks five times a second."""
    config = dataclasses.replace(cp_config(tmp_path, db_url, publisher), controller_interval_s=0.2)
    plane = await start_control_plane(config)
    try:
        yield plane
    finally:
        await plane.client.close()


# ------------------------------------------------------------------------ rollout controller


async def test_bad_rows_and_a_broken_rollout_leave_the_other_rollouts_moving(
    fast_cp: ControlPlane, publisher: Publisher
) -> None:
    cp = fast_cp
    app = cp.client.app
    assert app is not None
    db, controller = app[STATE].db, app[STATE].controller
    await cp.push(iris_bundle(publisher.key, "1.0.0"))
    await cp.push(iris_bundle(publisher.key, "1.0.0", name="other"))
    bad = await cp.enroll({"site": "bad"})
    await cp.enroll({"site": "third"})
    good = await cp.enroll({"site": "good"})
    gates = {"min_requests": 5, "max_error_rate": 0.5}
    soak = [{"percent": 100, "soak": "1s"}]

    # The hostile agent's rollout, with rows its gates cannot merge: it waits for good data.
    hostile = await cp.rollout("1.0.0", "site=bad", stages=soak, gates=gates)
    planted = await plant_bad(db, bad["agentId"], datetime.now(UTC) + timedelta(seconds=5))
    # A rollout whose stored spec no longer parses: set aside, not a stopped controller.
    broken = await cp.rollout("1.0.0", "site=third", stages=[{"percent": 100, "soak": "1h"}])
    async with db.write() as s:
        row = await s.get(Rollout, broken["id"])
        assert row is not None
        spec = row.options["spec"]
        row.options = {**row.options, "spec": {**spec, "stages": "all at once"}}

    # Created last, so every tick reaches it after the other two.
    r = await cp.rollout("1.0.0", "site=good", model="other", stages=soak, gates=gates)
    await send_metrics(cp, good, 1, datetime.now(UTC) + timedelta(seconds=1), model="other")

    async def completed() -> dict[str, Any] | None:
        doc = await show(cp, r["id"])
        return doc if doc["state"] == "completed" else None

    done = await eventually(completed, 30)
    assert [e["kind"] for e in done["timeline"]][-2:] == ["gates_passed", "completed"]

    # The hostile rollout still runs, its gates computed without the rows they cannot use.
    doc = await show(cp, hostile["id"])
    assert doc["state"] == "running"
    assert controller.skipped_rows.count == planted  # each counted once, however many ticks

    # The broken one is set aside with its reason, once, however many ticks go by. (Read from
    # the table: GET /rollouts/{id} needs the spec this rollout no longer has.)
    for _ in range(3):
        await controller.tick()
    timeline = await events(db, broken["id"])
    aside = [reason for kind, reason in timeline if kind == "set_aside"]
    assert len(aside) == 1, timeline
    assert "could not advance" in aside[0] and "all at once" in aside[0]
    h = (await health(cp))["setAside"]
    assert h["rollouts"] == 1 and h["rolloutsFailing"] == 1
    assert h["metricRows"] == planted

    # Repaired, it moves again and says so.
    async with db.write() as s:
        row = await s.get(Rollout, broken["id"])
        assert row is not None
        row.options = {**row.options, "spec": spec}

    # The controller's own loop ticks too: a tick of ours finds the rollout claimed by one
    # that read the broken spec, so wait for the loop rather than trust a single tick.
    async def recovered() -> list[str] | None:
        await controller.tick()
        kinds = [e["kind"] for e in (await show(cp, broken["id"]))["timeline"]]
        return kinds if "recovered" in kinds else None

    kinds = await eventually(recovered, 30)
    assert kinds[-2:] == ["set_aside", "recovered"], kinds
    assert (await health(cp))["setAside"]["rolloutsFailing"] == 0


# --------------------------------------------------------------------------------- roll-up

NOW = datetime.now(UTC).replace(minute=30, second=30, microsecond=0) - timedelta(hours=1)
RETENTION = Retention(raw_s=3600, minute_s=86400, hour_s=30 * 86400, batches_s=8 * 86400)


async def count(db: Database, table: Any, *where: Any) -> int:
    async with db.read() as s:
        return await s.scalar(select(func.count()).select_from(table).where(*where)) or 0


def rollup_row(resolution_s: int, start: datetime, agent_id: str, *, sketch: Any) -> MetricRollup:
    """A one-request roll-up row of iris 1.0.0 holding ``sketch`` as its latency sketch."""
    return MetricRollup(
        resolution_s=resolution_s,
        bucket_start=start,
        agent_id=agent_id,
        model="iris",
        version="1.0.0",
        requests=1,
        errors=0,
        latency_sketch=sketch,
        shadow_count=0,
        drift_sum=0.0,
        argmax_agree=0,
    )


async def test_rollup_sets_bad_rows_aside_and_retention_goes_on(
    cp: ControlPlane, publisher: Publisher
) -> None:
    app = cp.client.app
    assert app is not None
    db = app[STATE].db
    await cp.push(iris_bundle(publisher.key))
    bad, good = await cp.enroll({"site": "bad"}), await cp.enroll({"site": "good"})
    old = NOW - timedelta(hours=3)
    await send_metrics(cp, good, 1, old)
    await send_metrics(cp, good, 2, old + timedelta(seconds=15))
    planted = await plant_bad(db, bad["agentId"], old)
    async with db.write() as s:
        # A bad minute row where good raw rows are about to be merged, and a bad hour row
        # past retention (dropped whatever it holds).
        s.add(rollup_row(MINUTE, old.replace(second=0), good["agentId"], sketch=_huge_bin()))
        s.add(rollup_row(HOUR, NOW - timedelta(days=40), bad["agentId"], sketch=["x"]))

    done = await rollup(db, NOW, RETENTION)
    assert done["set_aside"] == planted + 1  # the bad raw rows and the bad minute row
    assert done["raw_rolled"] == planted + 2
    assert done["hours_dropped"] == 1
    assert await count(db, MetricSeries) == 0
    # The good agent's minute holds exactly its two good windows.
    async with db.read() as s:
        minute = (
            await s.scalars(select(MetricRollup).where(MetricRollup.agent_id == good["agentId"]))
        ).one()
    assert (minute.requests, DDSketch.from_json(minute.latency_sketch).count) == (40, 40)
    async with db.read() as s:
        aside = list(await s.scalars(select(MetricSetAside).order_by(MetricSetAside.id)))
    assert {a.source for a in aside} == {"metric_series", "metric_rollups/60s"}
    reasons = " | ".join(a.reason for a in aside)
    assert all(a.reason for a in aside)
    for needle in ("relativeAccuracy", "2**53", "latency sketch"):
        assert needle in reasons, reasons
    assert all(json.loads(a.row)["agent_id"] in (bad["agentId"], good["agentId"]) for a in aside)
    assert (await health(cp))["setAside"]["rollupRows"] == planted + 1

    # The next passes go on: nothing left to move, and the set-aside rows expire with the
    # hour tier's retention.
    again = await rollup(db, NOW, RETENTION)
    assert again["set_aside"] == again["raw_rolled"] == 0
    later = NOW + timedelta(days=31)
    dropped = await rollup(db, later, RETENTION)
    assert dropped["set_aside_dropped"] == planted + 1
    assert await count(db, MetricSetAside) == 0


async def test_a_failure_no_check_foresaw_costs_only_its_row(
    cp: ControlPlane, publisher: Publisher, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = cp.client.app
    assert app is not None
    db = app[STATE].db
    await cp.push(iris_bundle(publisher.key))
    agents = [await cp.enroll({"site": "x"}) for _ in range(3)]
    old = NOW - timedelta(hours=3)
    for i, a in enumerate(agents):
        for seq in range(1, 4):
            await send_metrics(cp, a, seq, old + timedelta(minutes=seq, seconds=i))
    cursed = agents[1]["agentId"]
    merge_into = rollup_module._merge_into

    async def flaky(s: Any, resolution: int, groups: dict[Any, Any], aside: Any) -> None:
        if any(key[0] == cursed for key in groups):
            raise RuntimeError("a failure the row checks did not foresee")
        await merge_into(s, resolution, groups, aside)

    monkeypatch.setattr(rollup_module, "_merge_into", flaky)
    done = await rollup(db, NOW, RETENTION, limit=4)
    assert done["set_aside"] == 3  # the cursed agent's rows, one by one
    async with db.read() as s:
        aside = list(await s.scalars(select(MetricSetAside)))
        moved = list(await s.scalars(select(MetricRollup)))
    assert {a.agent_id for a in aside} == {cursed}
    assert all("did not foresee" in a.reason for a in aside)
    assert sorted(r.agent_id for r in moved) == sorted(
        a["agentId"] for a in agents if a["agentId"] != cursed for _ in range(3)
    )
    assert await count(db, MetricSeries) == 0


# --------------------------------------------------------------------------------- reports


async def test_reports_leave_bad_rows_out_and_answer_200(
    cp: ControlPlane, publisher: Publisher
) -> None:
    app = cp.client.app
    assert app is not None
    db = app[STATE].db
    await cp.push(iris_bundle(publisher.key))
    bad, good = await cp.enroll({"site": "bad"}), await cp.enroll({"site": "good"})
    t0 = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=20)
    await send_metrics(cp, good, 1, t0)
    await send_metrics(cp, bad, 1, t0 + timedelta(minutes=1), requests=7)
    # A minute row too: readers go through every tier.
    async with db.write() as s:
        s.add(rollup_row(MINUTE, t0.replace(second=0), bad["agentId"], sketch=_huge_bin()))
    window = {
        "model": "iris",
        "from": (t0 - timedelta(minutes=5)).isoformat(),
        "to": (t0 + timedelta(minutes=30)).isoformat(),
        "by": "site",
    }
    queries = {"compare": window, "timeseries": {**window, "bucket": "5m"}}
    # The minute row counts: a bad row in it is left out too (compare it after planting).
    before: dict[str, Any] = {}
    for name, q in queries.items():
        r = await cp.call("GET", f"/reports/{name}", params=q)
        assert r.status == 200, await r.text()
        before[name] = await r.json()
    assert before["compare"]["skipped_rows"] == 1

    planted = await plant_bad(db, bad["agentId"], t0 + timedelta(minutes=2))
    for name, q in queries.items():
        r = await cp.call("GET", f"/reports/{name}", params=q)
        assert r.status == 200, await r.text()
        after = await r.json()
        assert after["skipped_rows"] == planted + 1
        key = "groups" if name == "compare" else "series"
        assert after[key] == before[name][key]  # same figures: the bad rows are left out
    assert (await health(cp))["setAside"]["metricRows"] == planted + 1  # once each


# ------------------------------------------------------------------------------ MQTT bridge


async def test_mqtt_bridge_sets_bad_messages_aside_and_stores_the_next_agent_at_once(
    tmp_path: Path, publisher: Publisher, broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    cp = await start_control_plane(mqtt_config(tmp_path, publisher, broker))
    try:
        app = cp.client.app
        assert app is not None
        bridge = app[MQTT]
        await eventually(lambda: bridge.connected.is_set(), 10)  # type: ignore[attr-defined]
        hostile, good = await cp.enroll({"site": "x"}), await cp.enroll({"site": "y"})
        await broker.load_passwords(cp)
        # An unexpected failure from the storage path (what a status of an unexpected shape
        # raised before): the hostile agent's reports only.
        status = bridge.ingest.status  # type: ignore[attr-defined]

        async def surprising(report: StatusReport) -> bool:
            if report.agent_id == hostile["agentId"]:
                raise KeyError("models")
            return await status(report)

        monkeypatch.setattr(bridge.ingest, "status", surprising)  # type: ignore[attr-defined]
        now = datetime.now(UTC)
        hid = hostile["agentId"]
        ok_status = StatusReport(hid, 0, now, ()).to_json()
        payloads = [
            ("status", json.dumps(ok_status).encode()),  # raises KeyError in storage
            ("status", b'{"agentId": "' + hid.encode() + b'", "generation": NaN}'),
            ("status", b"[" * 5000 + b"]" * 5000),
            ("status", b"\xff\xfe not utf-8"),
            ("metrics", json.dumps({"agentId": hid, "seq": 2**70}).encode()),
            ("metrics", b'{"agentId": "' + hid.encode() + b'", "seq": 1e999}'),
            ("presence", b"\x00"),
            ("blobs/request", b"{}"),
        ]
        creds = hostile["mqtt"]
        async with broker.client(creds["username"], creds["password"]) as c:
            for kind, payload in payloads:
                await c.publish(agent_topic(hid, kind, broker.prefix), payload, qos=1)

        # Right after, without a restart: the other agent's status and metrics are stored.
        gid = good["agentId"]
        w = SeriesWindow("iris", "1.0.0", requests=3)
        batch = MetricsBatch(gid, 1, now - timedelta(seconds=10), now, (w,))
        creds = good["mqtt"]
        async with broker.client(creds["username"], creds["password"]) as c:
            await c.publish(
                agent_topic(gid, "status", broker.prefix),
                json.dumps(StatusReport(gid, 0, now, ()).to_json()),
                qos=1,
            )
            await c.publish(
                agent_topic(gid, "metrics", broker.prefix), json.dumps(batch.to_json()), qos=1
            )

        async def settled() -> dict[str, Any] | None:
            h = await health(cp)
            m = h["mqtt"]
            ended = m["malformed"] + m["stored"]["status"] + m["stored"]["metrics"]
            return h if ended == len(payloads) + 2 else None

        h = await eventually(settled, 15)
        assert h["mqtt"]["malformed"] == len(payloads)
        assert h["mqtt"]["stored"]["status"] == h["mqtt"]["stored"]["metrics"] == 1
        assert h["mqtt"]["leftForRedelivery"] == 0
        assert h["setAside"]["mqttMalformed"] == len(payloads)
        agent = await (await cp.call("GET", f"/agents/{gid}")).json()
        assert agent["lastSeen"] is not None
        assert await count(app[STATE].db, MetricSeries, MetricSeries.agent_id == gid) == 1
        # Every handler gave its place back.
        await eventually(lambda: bridge._in_flight._value == MAX_IN_FLIGHT, 5)  # type: ignore[attr-defined]
    finally:
        await cp.client.close()


# ----------------------------------------------------------------------------------- notify


async def test_a_raising_listener_breaks_neither_the_caller_nor_the_waiters() -> None:
    notifier = DesiredNotifier()
    heard: list[list[str]] = []

    def broken(ids: list[str]) -> None:
        raise RuntimeError("listener bug")

    notifier.listeners += [broken, heard.append]
    waiter = asyncio.create_task(notifier.wait("a1", 10))
    await asyncio.sleep(0)
    notifier.notify(["a1"])  # does not raise
    assert await waiter is True
    assert heard == [["a1"]]
    assert notifier.set_aside == 1


@pytest.mark.postgres
async def test_garbage_notifications_leave_the_listener_listening(pg_url: str) -> None:
    import asyncpg

    from control_plane.fleet.pgnotify import CHANNEL, PgNotifyBridge

    notifier = DesiredNotifier()
    bridge = PgNotifyBridge(pg_url, notifier)
    task = asyncio.create_task(bridge.run(), name="pg-notify")
    conn = await asyncpg.connect(pg_url)

    async def heard(agent_id: str) -> None:
        """Notify until a waiter of ``agent_id`` wakes (the listener may still be connecting)."""
        waiter = asyncio.create_task(notifier.wait(agent_id, 15))

        async def woken() -> bool:
            if not waiter.done():
                await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, agent_id)
            return waiter.done()

        await eventually(woken, 15, 0.2)
        assert waiter.result() is True

    try:
        await heard(str(uuid.uuid4()))
        garbage = ("not,agent;ids", "\x01" * 50, str(uuid.uuid4()) + ",DROP TABLE x", "x" * 7000)
        for payload in garbage:
            await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, payload)
        # One connection's notifications arrive in order: once this one is heard, the garbage
        # before it has been handled.
        await heard(str(uuid.uuid4()))
        assert notifier.set_aside == len(garbage)
        assert not task.done()
    finally:
        await conn.close()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
