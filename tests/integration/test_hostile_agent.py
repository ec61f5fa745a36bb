"""One enrolled agent sends whatever it likes (issue 13, "How it is shown").

Hypothesis generates status reports, metric batches, REST bodies and MQTT payloads, from near
valid to garbage, and the hostile agent sends them through the real HTTP validation and the real
MQTT bridge of one control plane whose rollout controller is running (one rollout of the hostile
agent is under way, so its gates read whatever got stored). Every answer is below 500 and every
MQTT message ends stored or malformed. After that, in the same control plane, a second,
well-behaved agent's rollout completes, its reports are stored, a roll-up pass goes through and
the reports answer.

Hypothesis runs in a worker thread and drives the control plane on the test's event loop, so the
control plane, the broker and the hostile rollout live through all the examples of a test.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from control_plane.config import Retention
from control_plane.metrics.rollup import rollup
from control_plane.mqtt.bridge import MAX_IN_FLIGHT
from control_plane.state import MQTT, STATE
from protocol.reports import MetricsBatch, ModelStatus, SeriesWindow, StatusReport
from protocol.sketch import DDSketch
from protocol.topics import agent_topic
from tests.support.agents import eventually
from tests.support.broker import Broker, mqtt_config
from tests.support.bundles import Publisher, iris_bundle
from tests.support.control_plane import ControlPlane, start_control_plane

pytestmark = pytest.mark.slow

SLOW_DATA = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example]
SETTINGS = settings(max_examples=30, deadline=None, database=None, suppress_health_check=SLOW_DATA)
GATES = {"min_requests": 5, "max_error_rate": 0.2}
SOAK = [{"percent": 100, "soak": "1s"}]

# ------------------------------------------------------------------------------ strategies

SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
    | st.sampled_from(
        [
            "iris",
            "1.0.0",
            "active",
            "failed",
            "2026-01-01T00:00:00Z",
            "sha256:" + "a" * 64,
            "\x00",
            "\u202e",
            "\ud800",
        ]
    )
)
JSON = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=6)
    ),
    max_leaves=25,
)
COUNTS = st.integers(0, 50) | st.integers(-(2**65), 2**65)
OFFSETS = st.integers(0, 600) | st.integers(-(10**6), 10**6)


def sketches() -> st.SearchStrategy[Any]:
    """Real sketches (of this control plane's accuracy or another), doctored ones, garbage."""
    real = st.builds(
        lambda acc, values: _sketch(acc, values).to_json(),
        st.sampled_from([0.01, 0.01, 0.02, 0.001]),
        st.lists(st.floats(0, 1e7), max_size=20),
    )
    doctored = st.fixed_dictionaries(
        {
            "relativeAccuracy": st.sampled_from([0.01, 0.02]) | st.floats(),
            "count": COUNTS,
            "zeroCount": COUNTS,
            "sum": st.floats(),
            "min": st.floats(),
            "max": st.floats(),
            "binKeys": st.lists(
                st.integers(-2000, 40_000) | st.integers(-(2**70), 2**70), max_size=4
            ),
            "binCounts": st.lists(COUNTS, max_size=4),
        }
    )
    return real | doctored | JSON


def _sketch(accuracy: float, values: list[float]) -> DDSketch:
    sk = DDSketch(relative_accuracy=accuracy)
    for v in values:
        sk.add(v)
    return sk


def times(base: datetime) -> st.SearchStrategy[Any]:
    """Times near ``base``, far from it, and strings that are not quite times."""
    return (
        OFFSETS.map(lambda s: (base + timedelta(seconds=s)).isoformat())
        | st.sampled_from(
            [
                "9999-12-31T23:59:59-23:59",
                "0001-01-01T00:00:00+23:59",
                "2026-13-01T00:00:00Z",
                "now",
            ]
        )
        | JSON
    )


def status_docs(agent_id: str, base: datetime) -> st.SearchStrategy[Any]:
    model = st.fixed_dictionaries(
        {
            "name": st.sampled_from(["iris", "other"]) | JSON,
            "version": st.just("1.0.0") | JSON,
            "manifestDigest": st.just("sha256:" + "0" * 64) | JSON,
            "state": st.sampled_from(["active", "failed", "refused", "loading", "??"]) | JSON,
        },
        optional={"reason": JSON, "variant": JSON},
    )
    doc = st.fixed_dictionaries(
        {
            "agentId": st.just(agent_id) | JSON,
            "generation": COUNTS | JSON,
            "sentAt": times(base),
            "models": st.lists(model | JSON, max_size=3) | JSON,
        },
        optional={
            "facts": st.dictionaries(st.text(max_size=12), JSON, max_size=5) | JSON,
            "lastError": JSON,
            "epoch": COUNTS,
            "seq": COUNTS,
        },
    )
    return doc | JSON


def metrics_docs(agent_id: str, base: datetime) -> st.SearchStrategy[Any]:
    series = st.fixed_dictionaries(
        {
            "model": st.just("iris") | JSON,
            "version": st.just("1.0.0") | JSON,
            "requests": COUNTS,
            "errors": COUNTS,
            "latencyMs": sketches(),
        },
        optional={
            "shadow": st.fixed_dictionaries(
                {"count": COUNTS, "driftSum": st.floats(), "argmaxAgree": COUNTS}
            )
            | JSON
        },
    )

    def batch(seq: int, offset: int, series: Any) -> dict[str, Any]:
        start = base + timedelta(seconds=offset)
        end = start + timedelta(seconds=10)
        return {
            "agentId": agent_id,
            "seq": seq,
            "windowStart": start.isoformat(),
            "windowEnd": end.isoformat(),
            "series": series,
        }

    # Valid series, so that some batches are stored and the gates have rows to read.
    valid = st.integers(1, 50).flatmap(
        lambda n: st.builds(
            lambda errors, values: {
                "model": "iris",
                "version": "1.0.0",
                "requests": n,
                "errors": errors,
                "latencyMs": _sketch(0.01, values).to_json(),
            },
            st.integers(0, n),
            st.lists(st.floats(0.001, 1e5), min_size=n, max_size=n),
        )
    )
    near = st.builds(
        batch,
        st.integers(1, 10**9) | COUNTS,
        st.integers(0, 600),
        st.lists(valid | series, min_size=1, max_size=3),
    )
    far = st.fixed_dictionaries(
        {
            "agentId": st.just(agent_id) | JSON,
            "seq": COUNTS | JSON,
            "windowStart": times(base),
            "windowEnd": times(base),
            "series": st.lists(series | JSON, max_size=3) | JSON,
        },
    )
    return near | far | JSON


def as_bytes(docs: st.SearchStrategy[Any]) -> st.SearchStrategy[bytes]:
    """Documents as JSON text (NaN and all), and arbitrary bytes."""
    return docs.map(lambda d: json.dumps(d).encode("utf-8", "surrogatepass")) | st.binary(
        max_size=300
    )


# ----------------------------------------------------------------------------------- scene


@dataclass
class Scene:
    """One control plane, its broker, a hostile agent and a well-behaved one."""

    cp: ControlPlane
    broker: Broker
    hostile: dict[str, Any]
    good: dict[str, Any]
    hostile_rollout: str
    started: datetime

    def run(self, coro: Coroutine[Any, Any, Any], loop: asyncio.AbstractEventLoop) -> Any:
        """From the Hypothesis thread: run ``coro`` on the test's loop and wait for it."""
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout=60)

    async def post(self, kind: str, body: bytes, agent: dict[str, Any] | None = None) -> int:
        """POST a body as the hostile agent (or ``agent``) to one of its report routes."""
        a = agent or self.hostile
        r = await self.cp.call(
            "POST",
            f"/agents/{a['agentId']}/{kind}",
            token=a["credential"],
            data=body,
            headers={"Content-Type": "application/json"},
        )
        await r.read()
        return r.status


async def given_in_thread(test: Callable[[], None]) -> None:
    """Run a Hypothesis test (a plain function) off the event loop, which it drives."""
    await asyncio.to_thread(test)


@pytest.fixture
async def scene(tmp_path: Path, publisher: Publisher, broker: Broker) -> AsyncIterator[Scene]:
    cp = await start_control_plane(mqtt_config(tmp_path, publisher, broker))
    try:
        await cp.push(iris_bundle(publisher.key, "1.0.0"))
        hostile, good = await cp.enroll({"site": "hostile"}), await cp.enroll({"site": "good"})
        await broker.load_passwords(cp)
        app = cp.client.app
        assert app is not None
        await eventually(lambda: app[MQTT].connected.is_set(), 10)  # type: ignore[attr-defined]
        # Under way while the garbage arrives, created first: every tick reads its gates first.
        r = await cp.rollout("1.0.0", "site=hostile", stages=SOAK, gates=GATES)
        yield Scene(cp, broker, hostile, good, r["id"], datetime.now(UTC))
    finally:
        await cp.client.close()


async def well_behaved_agent_completes(scene: Scene) -> None:
    """The good agent's rollout completes, its reports are stored, roll-up and reports work."""
    cp, good = scene.cp, scene.good
    app = cp.client.app
    assert app is not None
    state = app[STATE]
    r = await cp.rollout("1.0.0", "site=good", stages=SOAK, gates=GATES)
    doc = await (await cp.call("GET", f"/rollouts/{r['id']}")).json()
    now = datetime.now(UTC)
    # Newer than any status the good agent sent before (the MQTT test sends one at (1, 1)).
    status = StatusReport(
        good["agentId"],
        1,
        now,
        (ModelStatus("iris", "1.0.0", doc["manifestDigest"], "active"),),
        epoch=1,
        seq=1000,
    )
    assert await scene.post("status", json.dumps(status.to_json()).encode(), good) == 200
    w = SeriesWindow("iris", "1.0.0", requests=20)
    for i in range(20):
        w.latency_ms.add(1.0 + i)
    start = now + timedelta(seconds=1)  # inside the soak, which began at creation
    batch = MetricsBatch(good["agentId"], 1, start, start + timedelta(seconds=10), (w,))
    assert await scene.post("metrics", json.dumps(batch.to_json()).encode(), good) == 200

    async def completed() -> dict[str, Any] | None:
        d = await (await cp.call("GET", f"/rollouts/{r['id']}")).json()
        return d if d["state"] == "completed" else None

    done = await eventually(completed, 20)
    gates = {g["gate"]: g for g in done["stages"][0]["gates"]}
    assert gates["min_requests"]["value"] == 20  # its own metrics, stored and read
    agent = await (await cp.call("GET", f"/agents/{good['agentId']}")).json()
    assert [(m["version"], m["state"]) for m in agent["models"]] == [("1.0.0", "active")]

    # The other loops go through whatever the hostile agent got stored.
    later = datetime.now(UTC) + timedelta(days=2)
    done_pass = await rollup(state.db, later, Retention())
    assert "skipped" not in done_pass and done_pass["raw_rolled"] > 0
    q = {"model": "iris", "since": "24h", "by": "site"}
    for name in ("compare", "timeseries"):
        resp = await cp.call("GET", f"/reports/{name}", params=q)
        assert resp.status == 200, await resp.text()
    h = await (await cp.call("GET", "/health", token="")).json()
    assert h["status"] == "ok" and "setAside" in h


# ------------------------------------------------------------------------------------ tests


async def test_hostile_status_reports_over_http(scene: Scene) -> None:
    loop = asyncio.get_running_loop()
    docs = status_docs(scene.hostile["agentId"], scene.started)

    @SETTINGS
    @given(body=as_bytes(docs))
    def example(body: bytes) -> None:
        code = scene.run(scene.post("status", body), loop)
        assert code < 500, body

    await given_in_thread(example)
    await well_behaved_agent_completes(scene)


async def test_hostile_metric_batches_over_http(scene: Scene) -> None:
    loop = asyncio.get_running_loop()
    docs = metrics_docs(scene.hostile["agentId"], scene.started)

    @SETTINGS
    @given(body=as_bytes(docs))
    def example(body: bytes) -> None:
        code = scene.run(scene.post("metrics", body), loop)
        assert code < 500, body

    await given_in_thread(example)
    await well_behaved_agent_completes(scene)


async def test_hostile_rest_bodies_and_queries(scene: Scene) -> None:
    loop = asyncio.get_running_loop()
    hid, cred = scene.hostile["agentId"], scene.hostile["credential"]

    async def desired(after: str) -> int:
        r = await scene.cp.call(
            "GET", f"/agents/{hid}/desired", token=cred, params={"after": after, "wait": "0"}
        )
        await r.read()
        return r.status

    @SETTINGS
    @given(
        route=st.sampled_from(["status", "metrics", "desired"]),
        body=st.binary(max_size=500) | as_bytes(JSON),
        text=st.text(max_size=30),
    )
    def example(route: str, body: bytes, text: str) -> None:
        if route == "desired":
            code = scene.run(desired(text), loop)
        else:
            code = scene.run(scene.post(route, body), loop)
        assert code < 500, (route, body, text)

    await given_in_thread(example)
    await well_behaved_agent_completes(scene)


async def test_hostile_mqtt_payloads(scene: Scene) -> None:
    loop = asyncio.get_running_loop()
    app = scene.cp.client.app
    assert app is not None
    bridge = app[MQTT]
    hid, base = scene.hostile["agentId"], scene.started
    payloads = {
        "status": as_bytes(status_docs(hid, base)),
        "metrics": as_bytes(metrics_docs(hid, base)),
        "presence": st.sampled_from([b"online", b"offline"]) | st.binary(max_size=20),
        "blobs/request": as_bytes(JSON),
    }
    kinds = st.sampled_from(sorted(payloads))
    sent = 0
    creds = scene.hostile["mqtt"]
    async with scene.broker.client(creds["username"], creds["password"]) as client:

        async def publish(kind: str, payload: bytes) -> None:
            await client.publish(agent_topic(hid, kind, scene.broker.prefix), payload, qos=1)

        @SETTINGS
        @given(data=st.data())
        def example(data: st.DataObject) -> None:
            nonlocal sent
            kind = data.draw(kinds)
            scene.run(publish(kind, data.draw(payloads[kind])), loop)
            sent += 1

        await given_in_thread(example)

    def ended() -> tuple[int, dict[str, int], int]:
        stored, malformed = bridge.stored, bridge.malformed  # type: ignore[attr-defined]
        return malformed + sum(stored.values()), stored, malformed

    # Every message ends stored or malformed (the tuple says which when it does not).
    await eventually(lambda: ended()[0] == sent, 15)
    assert bridge.redelivery == 0  # type: ignore[attr-defined]
    await eventually(lambda: bridge._in_flight._value == MAX_IN_FLIGHT, 5)  # type: ignore[attr-defined]

    # Right after, the good agent's report over MQTT is stored too.
    gid, creds = scene.good["agentId"], scene.good["mqtt"]
    before = bridge.stored["status"]  # type: ignore[attr-defined]
    report = StatusReport(gid, 0, datetime.now(UTC), (), epoch=1, seq=1)
    async with scene.broker.client(creds["username"], creds["password"]) as client:
        await client.publish(
            agent_topic(gid, "status", scene.broker.prefix), json.dumps(report.to_json()), qos=1
        )
    await eventually(lambda: bridge.stored["status"] == before + 1, 10)  # type: ignore[attr-defined]
    await well_behaved_agent_completes(scene)


def test_strategies_reach_valid_reports() -> None:
    """The strategies are not all garbage: some examples pass validation and get stored."""
    from hypothesis import find

    from protocol.reports import metrics_from_json, status_from_json

    base = datetime.now(UTC)
    aid = str(uuid.uuid4())

    def parses(parse: Callable[[Any], Any]) -> Callable[[Any], bool]:
        def ok(doc: Any) -> bool:
            try:
                parse(doc)
            except Exception:  # any refusal: we look for acceptance
                return False
            return True

        return ok

    find(status_docs(aid, base), parses(status_from_json), settings=settings(database=None))
    find(
        metrics_docs(aid, base),
        lambda d: parses(metrics_from_json)(d) and bool(d["series"]),
        settings=settings(database=None),
    )
