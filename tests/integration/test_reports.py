"""Comparison reports, time series and the fleet overview, with exact arithmetic."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from control_plane.cli.operate import format_report
from protocol.reports import MetricsBatch, SeriesWindow
from protocol.timeutil import format_time
from tests.support.agents import eventually
from tests.support.bundles import Publisher, iris_bundle
from tests.support.control_plane import ControlPlane, assert_error, cp_config, start_control_plane
from tests.support.fleet import Fleet, Traffic


async def enroll(cp: ControlPlane, site: str, cost: float | None) -> dict[str, Any]:
    r = await cp.call("POST", "/enrollment-tokens", json={"labels": {"site": site}})
    token = (await r.json())["token"]
    facts: dict[str, Any] = {"cpuCount": 2, "arch": "x86_64", "accelerators": []}
    if cost is not None:
        facts["costPerHour"] = cost
    r = await cp.call("POST", "/agents/enroll", token="", json={"token": token, "facts": facts})
    return await r.json()


async def send(
    cp: ControlPlane,
    agent: dict,
    seq: int,
    start: datetime,
    samples: list[float],
    errors: int = 0,
    version: str = "1.0.0",
) -> None:
    s = SeriesWindow("iris", version, requests=len(samples), errors=errors)
    for v in samples:
        s.latency_ms.add(v)
    batch = MetricsBatch(agent["agentId"], seq, start, start + timedelta(seconds=10), (s,))
    r = await cp.call(
        "POST",
        f"/agents/{agent['agentId']}/metrics",
        token=agent["credential"],
        json=batch.to_json(),
    )
    assert r.status == 200, await r.text()


async def test_compare_matches_a_hand_computation(cp: ControlPlane, publisher: Publisher) -> None:
    await cp.push(iris_bundle(publisher.key))
    t0 = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=30)
    rng = random.Random(3)
    cloud = [await enroll(cp, "cloud", 3.0), await enroll(cp, "cloud", 1.0)]
    onprem = [await enroll(cp, "onprem", 0.5)]
    edge = [await enroll(cp, "edge", None)]
    raw: dict[str, list[float]] = {"cloud": [], "onprem": [], "edge": []}
    for i, agent in enumerate(cloud):
        for w in range(3):
            samples = [rng.lognormvariate(0.5, 0.4) for _ in range(400)]
            raw["cloud"] += samples
            await send(cp, agent, w + 1, t0 + timedelta(minutes=5 * w + i), samples, errors=4)
    for w in range(2):
        samples = [rng.lognormvariate(1.5, 0.3) for _ in range(500)]
        raw["onprem"] += samples
        await send(cp, onprem[0], w + 1, t0 + timedelta(minutes=7 * w), samples)
    raw["edge"] = [2.0] * 10
    await send(cp, edge[0], 1, t0 + timedelta(minutes=1), raw["edge"])
    # Outside the window: must not count.
    await send(cp, onprem[0], 9, t0 - timedelta(hours=2), [100.0] * 50)

    frm, to = t0, t0 + timedelta(minutes=20)
    q = f"?model=iris&from={format_time(frm)}&to={format_time(to)}"
    report = await (await cp.call("GET", f"/reports/compare{q}")).json()
    groups = {g["key"]["site"]: g for g in report["groups"]}
    assert set(groups) == {"cloud", "onprem", "edge"}
    hours = (to - frm).total_seconds() / 3600
    for site, samples in raw.items():
        g = groups[site]
        assert g["requests"] == len(samples)
        assert g["throughput_rps"] == pytest.approx(
            len(samples) / (to - frm).total_seconds(), rel=1e-3
        )
        for name, q_ in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99)):
            true = float(np.quantile(np.array(samples), q_, method="lower"))
            assert abs(g["latency_ms"][name] - true) <= 0.01 * true + 1e-3, (site, name)
    assert groups["cloud"]["errors"] == 24 and groups["cloud"]["agents"] == 2
    assert groups["cloud"]["error_rate"] == pytest.approx(24 / 2400, abs=1e-6)
    assert groups["cloud"]["cost_per_million"] == pytest.approx(
        (3.0 + 1.0) * hours / 2400 * 1e6, rel=1e-4
    )
    assert groups["onprem"]["cost_per_million"] == pytest.approx(0.5 * hours / 1000 * 1e6, rel=1e-4)
    assert groups["edge"]["cost_per_million"] is None  # no declared cost
    assert groups["cloud"]["hardware"] == {"2 cpu x86_64 cpu": 2}
    v = report["verdict"]
    assert v["fastest"]["group"] == "site=cloud" and v["fastest"]["runner_up"] == "site=onprem"
    assert v["cheapest"]["group"] == "site=onprem"
    assert v["too_few_requests"] == ["site=edge"]
    assert "fastest: site=cloud" in v["summary"] and "edge" in v["summary"]

    by_two = await (await cp.call("GET", f"/reports/compare{q}&by=site,version")).json()
    assert {tuple(g["key"].values()) for g in by_two["groups"]} == {
        ("cloud", "1.0.0"),
        ("edge", "1.0.0"),
        ("onprem", "1.0.0"),
    }
    by_agent = await (await cp.call("GET", f"/reports/compare{q}&by=agent")).json()
    assert len(by_agent["groups"]) == 4

    series = await (await cp.call("GET", f"/reports/timeseries{q}&bucket=5m")).json()
    cloud_points = next(s for s in series["series"] if s["key"] == {"site": "cloud"})["points"]
    assert sum(p["requests"] for p in cloud_points) == 2400 and len(cloud_points) == 3

    text = format_report(report, "table")
    assert "site=cloud" in text and "verdict: fastest: site=cloud" in text
    csv_text = format_report(report, "csv")
    assert csv_text.splitlines()[0].startswith("group,requests,errors")

    fleet = await (await cp.call("GET", "/fleet")).json()
    assert fleet["agents"] == 4 and set(fleet["sites"]) == {"cloud", "onprem", "edge"}


async def test_report_bad_queries(cp: ControlPlane, publisher: Publisher) -> None:
    await cp.push(iris_bundle(publisher.key))
    for query, field in [
        ("", "model"),
        ("?model=iris&since=forever", "since"),
        ("?model=iris&by=a,b,c", "by"),
        ("?model=iris&by=site,site", "by"),
        ("?model=iris&from=2026-01-02T00:00:00Z&to=2026-01-01T00:00:00Z", "to"),
        ("?model=Bad Name", "model"),
    ]:
        await assert_error(await cp.call("GET", f"/reports/compare{query}"), 400, field=field)
    await assert_error(await cp.call("GET", "/reports/compare?model=nope"), 404, field="model")
    r = await cp.call("GET", "/reports/timeseries?model=iris&since=720h&bucket=1m")
    await assert_error(r, 400, field="bucket")


@pytest.fixture
async def cp_fast(tmp_path: Path, publisher: Publisher) -> AsyncIterator[ControlPlane]:
    config = dataclasses.replace(
        cp_config(tmp_path, f"sqlite:///{tmp_path / 'cp.db'}", publisher), controller_interval_s=0.2
    )
    plane = await start_control_plane(config)
    try:
        yield plane
    finally:
        await plane.client.close()


@pytest.mark.slow
async def test_real_agents_on_two_sites_name_the_faster_and_the_cheaper(
    cp_fast: ControlPlane, publisher: Publisher, tmp_path: Path
) -> None:
    cp = cp_fast
    (tmp_path / "fleet").mkdir()
    fleet = Fleet(cp, tmp_path / "fleet")
    try:
        await cp.push(iris_bundle(publisher.key))
        await fleet.add(2, "cloud", facts={"cpuCount": 8, "costPerHour": 2.0})
        # On-prem boxes are cheap but slow: 20 ms more on every inference (a margin that a
        # loaded machine's scheduling noise on the cloud agents cannot close).
        await fleet.add(
            2,
            "onprem",
            facts={"cpuCount": 2, "costPerHour": 0.25},
            extra=("--added-latency-ms", "20"),
        )
        r = await cp.call("POST", "/rollouts", json={"model": "iris", "version": "1.0.0"})
        assert r.status == 201

        async def all_active() -> bool:
            agents = (await (await cp.call("GET", "/agents")).json())["agents"]
            return all(any(m["state"] == "active" for m in a["models"]) for a in agents)

        await eventually(all_active, 30)
        async with Traffic(fleet):

            async def enough() -> dict | None:
                rep = await (await cp.call("GET", "/reports/compare?model=iris&since=10m")).json()
                ok = len(rep["groups"]) == 2 and all(g["enough_requests"] for g in rep["groups"])
                return rep if ok else None

            report = await eventually(enough, 60)
    finally:
        await fleet.stop()
    v = report["verdict"]
    assert v["fastest"]["group"] == "site=cloud", report
    assert v["cheapest"]["group"] == "site=onprem", report
    groups = {g["key"]["site"]: g for g in report["groups"]}
    assert groups["onprem"]["latency_ms"]["p50"] > 20.0 > groups["cloud"]["latency_ms"]["p50"]


async def test_a_cost_label_that_is_not_a_finite_price_counts_as_no_cost(
    cp: ControlPlane, publisher: Publisher
) -> None:
    await cp.push(iris_bundle(publisher.key))
    t0 = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=5)
    for i, cost in enumerate(("nan", "inf", "-1", "0.5")):
        r = await cp.call(
            "POST", "/enrollment-tokens", json={"labels": {"site": f"s{i}", "cost-per-hour": cost}}
        )
        token = (await r.json())["token"]
        r = await cp.call("POST", "/agents/enroll", token="", json={"token": token})
        await send(cp, await r.json(), 1, t0, [1.0] * 10)
    r = await cp.call("GET", "/reports/compare?model=iris&since=1h")
    assert r.status == 200, await r.text()
    costs = {g["key"]["site"]: g["cost_per_million"] for g in (await r.json())["groups"]}
    assert costs["s0"] is None and costs["s1"] is None and costs["s2"] is None
    assert costs["s3"] is not None and costs["s3"] > 0


async def test_a_huge_declared_cost_cannot_make_compare_answer_500(
    cp: ControlPlane, publisher: Publisher
) -> None:
    # A finite but huge hourly price (1e308) times the window's hours was infinity, which the
    # strict JSON answer cannot write: /reports/compare answered 500 for the whole fleet.
    await cp.push(iris_bundle(publisher.key))
    refused = await enroll(cp, "agent", 1e308)  # facts are the agent's own: refused at the door
    assert refused["error"]["field"] == "facts.costPerHour", refused
    t0 = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=5)
    for site, cost in (("label", "1e308"), ("fine", "0.5")):  # a label is checked when read
        r = await cp.call(
            "POST", "/enrollment-tokens", json={"labels": {"site": site, "cost-per-hour": cost}}
        )
        r = await cp.call(
            "POST", "/agents/enroll", token="", json={"token": (await r.json())["token"]}
        )
        await send(cp, await r.json(), 1, t0, [1.0] * 10)
    r = await cp.call("GET", "/reports/compare?model=iris&since=2h")
    assert r.status == 200, await r.text()
    costs = {g["key"]["site"]: g["cost_per_million"] for g in (await r.json())["groups"]}
    assert costs["label"] is None and costs["fine"] is not None


async def test_a_group_whose_p95_is_zero_cannot_make_compare_answer_500(
    cp: ControlPlane, publisher: Publisher
) -> None:
    # Latencies at or below the sketch's MIN_VALUE count as zero: one agent reporting only
    # those (or enough of them to outweigh its site) made its group's p95 0.0, and "times
    # faster" divided by it: ZeroDivisionError, a 500.
    await cp.push(iris_bundle(publisher.key))
    t0 = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=5)
    zero, fine = await enroll(cp, "zero", None), await enroll(cp, "fine", None)
    await send(cp, zero, 1, t0, [0.0] * 200)
    await send(cp, fine, 1, t0, [2.0] * 200)
    r = await cp.call("GET", "/reports/compare?model=iris&since=2h")
    assert r.status == 200, await r.text()
    fastest = (await r.json())["verdict"]["fastest"]
    assert fastest["group"] == "site=zero" and fastest["p95_ms"] == 0.0, fastest
