"""Status only moves forward: a report older than the stored one (in the agent's own order)
changes nothing but the agent's last-seen time, whatever the transport, the replica, the
database, or the order in which reports arrive.

``MODELFLEET_STATUS_ORDER_RUNS`` sets how many broker outages the outage test goes through in
one session (default 2; the issue's check is 20)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import random
from datetime import UTC, datetime
from itertools import pairwise
from pathlib import Path
from typing import Any, Self

import aiomqtt
import pytest
from sqlalchemy import select, update

from control_plane.db.engine import Database
from control_plane.db.models import Agent
from control_plane.fleet import reports
from control_plane.fleet.ingest import store_batch
from control_plane.fleet.status_order import StatusOrder
from control_plane.state import MQTT, STATE
from protocol.reports import ModelStatus, StatusReport
from protocol.topics import agent_topic
from tests.support.agents import (
    active_version,
    enroll_agent,
    eventually,
    resolves_to,
    running_agent,
    serving,
)
from tests.support.broker import Broker, mqtt_config
from tests.support.bundles import Publisher, iris_bundle
from tests.support.control_plane import ControlPlane, cp_config, start_control_plane
from tests.unit.test_status_order import CASES

pytestmark = pytest.mark.slow

DIGEST = "sha256:" + "c" * 64
EPOCH = 1_800_000_000
LONG_AGO = datetime(2000, 1, 1, tzinfo=UTC)


def report(agent_id: str, epoch: int, seq: int, version: str) -> dict[str, Any]:
    """A status report in the agent's order (epoch, seq) saying ``version`` serves."""
    serving = ModelStatus("iris", version, DIGEST, "active")
    return StatusReport(agent_id, 1, datetime.now(UTC), (serving,), epoch=epoch, seq=seq).to_json()


async def stored(db: Database, agent_id: str) -> Agent:
    """The agent's row as the database holds it now."""
    async with db.read() as s:
        row = await s.scalar(select(Agent).where(Agent.id == agent_id))
        assert row is not None
        return row


def versions(agent: Agent) -> list[str]:
    return [m["version"] for m in agent.status.get("models", [])]


async def age_last_seen(db: Database, agent_id: str) -> None:
    """Put last_seen_at far back, so that any report moving it shows."""
    async with db.write() as s:
        await s.execute(update(Agent).where(Agent.id == agent_id).values(last_seen_at=LONG_AGO))


class OrderWatcher:
    """Reads an agent's stored (epoch, seq) over and over while a test runs: every order seen."""

    def __init__(self, db: Database, agent_id: str) -> None:
        self.db, self.agent_id = db, agent_id
        self.seen: list[tuple[int, int]] = []
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    async def _run(self) -> None:
        while not self._stop.is_set():
            async with self.db.read() as s:
                row = (
                    await s.execute(
                        select(Agent.status_epoch, Agent.status_seq).where(
                            Agent.id == self.agent_id
                        )
                    )
                ).one()
            self.seen.append((row.status_epoch, row.status_seq))
            await asyncio.sleep(0.01)

    async def __aenter__(self) -> Self:
        self._task = asyncio.create_task(self._run(), name="order-watcher")
        await eventually(lambda: self.seen)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._stop.set()
        await self._task

    def went_back(self) -> list[tuple[tuple[int, int], tuple[int, int]]]:
        """Each (before, after) where the stored order went down."""
        return [(a, b) for a, b in pairwise(self.seen) if b < a]


class BridgeSpy:
    """Records every MQTT payload the control plane's bridge has finished handling."""

    def __init__(self, cp: ControlPlane) -> None:
        self.bridge: Any = cp.client.server.app[MQTT]  # type: ignore[union-attr]
        self.handled: list[bytes] = []
        real = self.bridge.handle

        async def handle(topic: str, payload: bytes, properties: Any = None) -> None:
            await real(topic, payload, properties)
            self.handled.append(payload)

        self.bridge.handle = handle

    async def publish(self, broker: Broker, agent_id: str, password: str, doc: dict) -> None:
        """Publish ``doc`` on the agent's status topic, as the agent, and wait until handled."""
        payload = json.dumps(doc).encode()

        async def sent() -> bool:
            try:
                async with broker.client(agent_id, password) as c:
                    await c.publish(agent_topic(agent_id, "status", broker.prefix), payload, qos=1)
                return True
            except aiomqtt.MqttError:
                return False  # refused while the broker re-reads its password file: again

        await eventually(sent, 10)
        await eventually(lambda: payload in self.handled, 10)


async def post(cp: ControlPlane, agent_id: str, credential: str, doc: dict) -> dict[str, Any]:
    r = await cp.call("POST", f"/agents/{agent_id}/status", token=credential, json=doc)
    assert r.status == 200, await r.text()
    return await r.json()


# ------------------------------------------------------------------------------- the rule


async def test_the_database_applies_the_same_rule_as_the_comparison(
    tmp_path: Path, db_url: str, publisher: Publisher
) -> None:
    """Every case of the pure rule, stored through reports.store_status and the batched ingest:
    the conditional UPDATE stores exactly the reports StatusOrder.supersedes says."""
    cp = await start_control_plane(cp_config(tmp_path, db_url, publisher))
    db: Database = cp.client.app[STATE].db
    try:
        agent_id = (await cp.enroll({"site": "x"}))["agentId"]
        for i, (new, held, replaces) in enumerate(CASES):
            for path in ("store_status", "store_batch"):
                async with db.write() as s:
                    await s.execute(
                        update(Agent)
                        .where(Agent.id == agent_id)
                        .values(
                            status={"models": [], "marker": "held"},
                            status_epoch=held.epoch,
                            status_seq=held.seq,
                            status_sent_at=held.sent_at,
                        )
                    )
                assert new.sent_at is not None
                r = StatusReport(agent_id, 1, new.sent_at, (), epoch=new.epoch, seq=new.seq)
                now = datetime.now(UTC)
                if path == "store_status":
                    result = await reports.store_status(db, r, now)
                else:
                    async with db.write() as s:
                        [result] = await store_batch(s, [r], now, db.is_sqlite)
                row = await stored(db, agent_id)
                where = f"case {i} ({new} over {held}) by {path}"
                # True: the row holds this report now (a duplicate of the held one included).
                assert result is (replaces or new == held), where
                assert ("marker" not in row.status) is replaces, where
                want = new if replaces else held
                assert StatusOrder(row.status_epoch, row.status_seq, row.status_sent_at) == want
    finally:
        await cp.client.close()


async def test_in_one_batch_the_newest_report_of_an_agent_wins_not_the_last(
    cp: ControlPlane,
) -> None:
    state = cp.client.app[STATE]
    agent_id = (await cp.enroll({"site": "x"}))["agentId"]
    seqs = [3, 7, 5, 1, 6]  # 7 arrives second
    from protocol.reports import status_from_json

    results = await asyncio.gather(
        *(
            state.ingest.status(status_from_json(report(agent_id, EPOCH, q, f"1.0.{q}")))
            for q in seqs
        )
    )
    assert results == [q == 7 for q in seqs]
    row = await stored(state.db, agent_id)
    assert (row.status_epoch, row.status_seq, versions(row)) == (EPOCH, 7, ["1.0.7"])


# ------------------------------------------------------------------- transports and replicas


@pytest.mark.parametrize("late_over", ["mqtt", "http"])
async def test_a_late_older_status_never_replaces_a_newer_one(
    tmp_path: Path, publisher: Publisher, broker: Broker, db_url: str, late_over: str
) -> None:
    """A newer report over one transport, then an older one over the other (MQTT after HTTP,
    as a broker delivers after an outage, and the reverse): the newer one stays, and the late
    one still counts as a sign of life."""
    config = dataclasses.replace(mqtt_config(tmp_path, publisher, broker), db_url=db_url)
    cp = await start_control_plane(config)
    try:
        db: Database = cp.client.app[STATE].db
        ident = await enroll_agent(cp, tmp_path / "a", {"site": "x"})
        assert ident.mqtt is not None
        await broker.load_passwords(cp)
        spy = BridgeSpy(cp)
        await eventually(spy.bridge.connected.is_set, 10)

        async def send(over: str, doc: dict) -> dict[str, Any] | None:
            if over == "http":
                return await post(cp, ident.agent_id, ident.credential, doc)
            assert ident.mqtt is not None
            await spy.publish(broker, ident.agent_id, ident.mqtt["password"], doc)
            return None

        older = report(ident.agent_id, EPOCH, 8, "1.0.0")  # built first, delivered last
        newer = report(ident.agent_id, EPOCH, 9, "2.0.0")
        answer = await send("mqtt" if late_over == "http" else "http", newer)
        assert answer in (None, {"stored": True, "stale": False})
        await age_last_seen(db, ident.agent_id)
        answer = await send(late_over, older)
        assert answer in (None, {"stored": False, "stale": True})
        row = await stored(db, ident.agent_id)
        assert (row.status_epoch, row.status_seq, versions(row)) == (EPOCH, 9, ["2.0.0"])
        assert row.last_seen_at is not None and row.last_seen_at > LONG_AGO
        assert await active_version(cp, ident.agent_id) == "2.0.0"
        # The agent restarted (its epoch grew): its first report is newer whatever its seq.
        answer = await send(late_over, report(ident.agent_id, EPOCH + 1, 1, "1.0.0"))
        assert answer in (None, {"stored": True, "stale": False})
        row = await stored(db, ident.agent_id)
        assert (row.status_epoch, row.status_seq, versions(row)) == (EPOCH + 1, 1, ["1.0.0"])
    finally:
        await cp.client.close()


async def _storm(
    cps: list[ControlPlane], db: Database, agent_id: str, credential: str, n: int
) -> list[dict[str, Any]]:
    """n reports of one agent, in shuffled order, all at once, spread over the replicas."""
    seqs = list(range(1, n + 1))
    random.Random(13).shuffle(seqs)
    async with OrderWatcher(db, agent_id) as watcher:
        answers = await asyncio.gather(
            *(
                post(
                    cps[i % len(cps)], agent_id, credential, report(agent_id, EPOCH, q, f"1.0.{q}")
                )
                for i, q in enumerate(seqs)
            )
        )
    assert watcher.went_back() == []
    assert dict(zip(seqs, answers, strict=True))[n] == {"stored": True, "stale": False}
    row = await stored(db, agent_id)
    # The order and the status it belongs to were written together.
    assert (row.status_epoch, row.status_seq, versions(row)) == (EPOCH, n, [f"1.0.{n}"])
    return answers


async def test_concurrent_reports_leave_the_newest(cp: ControlPlane) -> None:
    a = await cp.enroll({"site": "x"})
    await _storm([cp], cp.client.app[STATE].db, a["agentId"], a["credential"], 150)


async def test_two_replicas_on_one_postgres_keep_the_newest(
    tmp_path: Path, publisher: Publisher, pg_url: str
) -> None:
    """Two control planes on one database, each with its own ingest writer, take the same
    agent's reports at once: the database keeps the newest, whichever replica stored last."""
    config = cp_config(tmp_path, pg_url, publisher)
    a = await start_control_plane(config)
    b = await start_control_plane(config)
    try:
        agent = await a.enroll({"site": "x"})
        answers = await _storm(
            [a, b], a.client.app[STATE].db, agent["agentId"], agent["credential"], 150
        )
        assert any(not x["stored"] for x in answers)  # some did arrive late
    finally:
        await a.client.close()
        await b.client.close()


# ------------------------------------------------------------------------ broker outages


def _order(doc: dict[str, Any]) -> tuple[int, int]:
    return doc["epoch"], doc["seq"]


async def test_status_never_regresses_through_broker_outages(
    tmp_path: Path, publisher: Publisher, broker: Broker
) -> None:
    """A real agent on MQTT; again and again the broker goes away while a report is in flight
    (the one the agent built just before), the agent reports over HTTP meanwhile (the first
    time while a rollout moves it from 1.0.0 to 2.0.0), the broker comes back and delivers
    the report it held, late. The stored status never goes back, at any moment."""
    runs = int(os.environ.get("MODELFLEET_STATUS_ORDER_RUNS", "2"))
    cp = await start_control_plane(mqtt_config(tmp_path, publisher, broker))
    try:
        db: Database = cp.client.app[STATE].db
        await cp.push(iris_bundle(publisher.key, "1.0.0"))
        await cp.push(iris_bundle(publisher.key, "2.0.0", seed=1))
        ident = await enroll_agent(cp, tmp_path / "a", {"site": "x"})
        assert ident.mqtt is not None
        password = ident.mqtt["password"]
        await broker.load_passwords(cp)
        spy = BridgeSpy(cp)
        async with running_agent(tmp_path / "a", heartbeat_s=0.3, poll_wait_s=1) as agent:
            mqtt = agent.mqtt
            assert mqtt is not None
            await eventually(lambda: mqtt.connected and spy.bridge.connected.is_set(), 10)
            await cp.rollout("1.0.0", "site=x")
            await eventually(lambda: resolves_to(active_version(cp, ident.agent_id), "1.0.0"))
            first = agent.status_report().to_json()  # 1.0.0 serving
            async with OrderWatcher(db, ident.agent_id) as watcher:
                for run in range(runs):
                    in_flight = agent.status_report().to_json()
                    broker.stop()
                    if run == 0:
                        await cp.rollout("2.0.0", "site=x")
                        await eventually(lambda: serving(agent, "iris", "2.0.0"))
                    # Built now: any report stored with a later order was built after it.
                    mark = agent.status_report().to_json()

                    async def reported_since(doc: dict[str, Any] = mark) -> bool:
                        row = await stored(db, ident.agent_id)
                        return (row.status_epoch, row.status_seq) > _order(doc)

                    await eventually(reported_since, 20)  # over HTTP
                    assert await active_version(cp, ident.agent_id) == "2.0.0"
                    await broker.start()
                    await eventually(lambda: mqtt.connected and spy.bridge.connected.is_set(), 20)
                    for late in (in_flight, first):
                        await spy.publish(broker, ident.agent_id, password, late)
                        row = await stored(db, ident.agent_id)
                        assert (row.status_epoch, row.status_seq) > _order(late), f"run {run}"
                        assert await active_version(cp, ident.agent_id) == "2.0.0", f"run {run}"
            assert watcher.went_back() == [], watcher.went_back()
            before = agent.status_report().epoch
        # The agent's next run (its epoch grew at start) is newer from its first report on; a
        # report of the run before, delivered late, is not.
        async with running_agent(tmp_path / "a", heartbeat_s=0.3, poll_wait_s=1) as agent:
            epoch = agent.status_report().epoch
            assert epoch > before
            await eventually(lambda: resolves_to(_stored_epoch(db, ident.agent_id), epoch))
            mqtt = agent.mqtt
            assert mqtt is not None
            await eventually(lambda: mqtt.connected, 20)
            await spy.publish(broker, ident.agent_id, password, first)
            assert await _stored_epoch(db, ident.agent_id) == epoch
            assert await active_version(cp, ident.agent_id) == "2.0.0"
    finally:
        await cp.client.close()


async def _stored_epoch(db: Database, agent_id: str) -> int:
    return (await stored(db, agent_id)).status_epoch
