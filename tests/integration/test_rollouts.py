"""Staged rollouts with real agent processes and a real control plane."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from bench.devkit.models import iris_model
from control_plane.state import STATE
from protocol.desired import accept_desired
from protocol.dsse import keyring, load_public_key
from protocol.reports import ModelStatus, StatusReport
from protocol.timeutil import format_time, parse_time
from tests.support.agents import eventually
from tests.support.bundles import Publisher, iris_bundle
from tests.support.control_plane import (
    ControlPlane,
    cp_config,
    fast_control_plane,
    start_control_plane,
    stop_controller_loop,
)
from tests.support.fleet import TWO_ROWS, Fleet, Traffic, run_cli, tolerant_fleet

pytestmark = pytest.mark.slow


@pytest.fixture
async def cp(tmp_path: Path, publisher: Publisher) -> AsyncIterator[ControlPlane]:
    """A control plane whose controller looks at rollouts five times a second."""
    async with fast_control_plane(tmp_path, publisher) as plane:
        yield plane


@pytest.fixture
async def fleet(cp: ControlPlane, tmp_path: Path) -> AsyncIterator[Fleet]:
    async with tolerant_fleet(cp, tmp_path / "fleet") as f:
        yield f


async def rollout(cp: ControlPlane, body: dict[str, Any]) -> dict[str, Any]:
    r = await cp.call("POST", "/rollouts", json=body)
    assert r.status == 201, await r.text()
    return await r.json()


async def show(cp: ControlPlane, rollout_id: str) -> dict[str, Any]:
    return await (await cp.call("GET", f"/rollouts/{rollout_id}")).json()


async def until_state(cp: ControlPlane, rollout_id: str, *states: str, within: float = 60) -> dict:
    async def check() -> dict | None:
        r = await show(cp, rollout_id)
        return r if r["state"] in states else None

    return await eventually(check, within)


async def all_on(fleet: Fleet, version: str, within: float = 30) -> None:
    async def check() -> bool:
        versions = await fleet.versions()
        return len(versions) == len(fleet.agents) and set(versions.values()) == {version}

    try:
        await eventually(check, within)
    except AssertionError:
        raise AssertionError(f"{await fleet.versions()}\n{fleet.logs()}") from None


async def baseline(
    cp: ControlPlane,
    fleet: Fleet,
    publisher: Publisher,
    n: int,
    sites: tuple[str, ...] = ("onprem",),
) -> None:
    """Everyone on 1.0.0 first."""
    await cp.push(iris_bundle(publisher.key, "1.0.0"))
    for i in range(n):
        await fleet.add(1, sites[i % len(sites)])
    await rollout(cp, {"model": "iris", "version": "1.0.0"})
    await all_on(fleet, "1.0.0")


async def test_three_stages_over_ten_agents(
    cp: ControlPlane, fleet: Fleet, publisher: Publisher
) -> None:
    await baseline(cp, fleet, publisher, 10, ("onprem", "cloud"))
    await cp.push(iris_bundle(publisher.key, "2.0.0", seed=1))
    async with Traffic(fleet):
        r = await rollout(
            cp,
            {
                "model": "iris",
                "version": "2.0.0",
                "selector": "site in (onprem,cloud)",
                "stages": [
                    {"percent": 10, "soak": "2s"},
                    {"percent": 50, "soak": "2s"},
                    {"percent": 100},
                ],
                "gates": {"max_error_rate": 0.05, "max_p95_latency_ms": 1000, "min_requests": 5},
            },
        )
        done = await until_state(cp, r["id"], "completed", "rolled_back", "paused")
    assert done["state"] == "completed", done["timeline"]
    await all_on(fleet, "2.0.0")
    assert [(s["target"], s["moved"]) for s in done["stages"]] == [(1, 1), (5, 5), (10, 10)]
    # No agent moved before its stage began.
    began = {1: parse_time(done["timeline"][1]["at"], "at")}
    for e in done["timeline"]:
        if e["kind"] == "advanced":
            began[e["stage"]] = parse_time(e["at"], "at")
    stages = sorted(t["stage"] for t in done["targets"])
    assert stages == [1, 2, 2, 2, 2, 3, 3, 3, 3, 3]
    for t in done["targets"]:
        assert parse_time(t["movedAt"], "movedAt") >= began[t["stage"]]
    # The 50% cohort holds both sites.
    assert {t["site"] for t in done["targets"] if t["stage"] <= 2} == {"onprem", "cloud"}
    passed = [e for e in done["timeline"] if e["kind"] == "gates_passed"]
    assert len(passed) == 2
    for e in passed:
        gates = {g["gate"]: g for g in e["figures"]["gates"]}
        assert gates["max_error_rate"]["outcome"] == "pass"
        assert gates["min_requests"]["value"] >= 5
    kinds = [e["kind"] for e in done["timeline"]]
    assert kinds == [
        "created",
        "started",
        "cohort",
        "gates_passed",
        "advanced",
        "cohort",
        "gates_passed",
        "advanced",
        "cohort",
        "completed",
    ]


async def test_errors_stop_the_rollout_at_the_first_gate_and_roll_back(
    cp: ControlPlane, fleet: Fleet, publisher: Publisher
) -> None:
    await baseline(cp, fleet, publisher, 4)
    bad = iris_model(seed=1, fail_on_batches=True)  # passes a one-row smoke test
    await cp.push(iris_bundle(publisher.key, "2.0.0", seed=1, model=bad, smoke_rows=1))
    async with Traffic(fleet, TWO_ROWS):
        r = await rollout(
            cp,
            {
                "model": "iris",
                "version": "2.0.0",
                "stages": [{"percent": 50, "soak": "2s"}, {"percent": 100}],
                "gates": {"max_error_rate": 0.1, "min_requests": 5},
                "on_failure": "rollback",
            },
        )
        done = await until_state(cp, r["id"], "rolled_back", "completed")
    assert done["state"] == "rolled_back"
    failed = done["timeline"][-1]
    assert failed["kind"] == "failed" and "max_error_rate" in failed["reason"]
    gate = next(g for g in failed["figures"]["gates"] if g["gate"] == "max_error_rate")
    assert gate["outcome"] == "fail" and gate["value"] == 1.0 and gate["threshold"] == 0.1
    assert failed["figures"]["new"]["errors"] == failed["figures"]["new"]["requests"] >= 5
    assert done["stages"][1]["moved"] == 2  # stage 2 never ran
    await all_on(fleet, "1.0.0")  # the moved agents went back by themselves


async def test_a_slower_version_is_stopped_by_the_latency_ratio(
    cp: ControlPlane, fleet: Fleet, publisher: Publisher
) -> None:
    await baseline(cp, fleet, publisher, 4)
    await cp.push(iris_bundle(publisher.key, "2.0.0", model=iris_model(seed=0, slow=True)))
    async with Traffic(fleet):
        r = await rollout(
            cp,
            {
                "model": "iris",
                "version": "2.0.0",
                "stages": [{"percent": 50, "soak": "3s"}, {"percent": 100}],
                "gates": {"max_p95_latency_ratio": 1.5, "min_requests": 20},
            },
        )
        done = await until_state(cp, r["id"], "rolled_back", "completed")
    assert done["state"] == "rolled_back", done["timeline"]
    gate = next(
        g for g in done["timeline"][-1]["figures"]["gates"] if g["gate"] == "max_p95_latency_ratio"
    )
    assert gate["outcome"] == "fail" and gate["value"] > 1.5
    await all_on(fleet, "1.0.0")


async def test_shadow_scoring_stops_a_version_that_answers_differently(
    cp: ControlPlane, fleet: Fleet, publisher: Publisher
) -> None:
    await baseline(cp, fleet, publisher, 4)
    await cp.push(iris_bundle(publisher.key, "2.0.0", seed=7))  # fast, error-free, different
    async with Traffic(fleet):
        r = await rollout(
            cp,
            {
                "model": "iris",
                "version": "2.0.0",
                "shadow": True,
                "shadow_sample": 1.0,
                "stages": [{"percent": 50, "soak": "2s"}, {"percent": 100}],
                "gates": {
                    "max_error_rate": 0.01,
                    "max_mean_abs_output_drift": 0.01,
                    "min_requests": 5,
                },
            },
        )
        done = await until_state(cp, r["id"], "rolled_back", "completed")
    assert done["state"] == "rolled_back", done["timeline"]
    figures = done["timeline"][-1]["figures"]
    gates = {g["gate"]: g for g in figures["gates"]}
    assert gates["max_error_rate"]["outcome"] == "pass"
    assert gates["max_mean_abs_output_drift"]["outcome"] == "fail"
    assert figures["new"]["shadow_samples"] >= 5 and figures["new"]["mean_abs_drift"] > 0.01
    await all_on(fleet, "1.0.0")


async def test_agents_enrolling_mid_rollout_get_their_cohort_position(
    cp: ControlPlane, fleet: Fleet, publisher: Publisher
) -> None:
    await baseline(cp, fleet, publisher, 3)
    await cp.push(iris_bundle(publisher.key, "2.0.0", seed=1))
    # The first stage soaks until promoted, so the late agents' first install cannot race it.
    r = await rollout(
        cp,
        {
            "model": "iris",
            "version": "2.0.0",
            "stages": [{"count": 1, "soak": "1h"}, {"percent": 100}],
        },
    )
    late = await fleet.add(2, "onprem")
    # Not in the first cohort (one agent): the late agents run what completed rollouts give.
    versions = await fleet.versions()
    await eventually(lambda: _on(fleet, [a.agent_id for a in late], "1.0.0"))
    first = await show(cp, r["id"])
    assert first["progress"]["moved"] == 1 and versions
    promoted = await cp.call("POST", f"/rollouts/{r['id']}/promote", json={})
    assert promoted.status == 200, await promoted.text()
    done = await until_state(cp, r["id"], "completed")
    assert done["progress"] == {"matching": 5, "moved": 5, "active": done["progress"]["active"]}
    await all_on(fleet, "2.0.0")
    assert {t["stage"] for t in done["targets"] if t["agentId"] in {a.agent_id for a in late}} == {
        2
    }


async def _on(fleet: Fleet, ids: list[str], version: str) -> bool:
    versions = await fleet.versions()
    return all(versions.get(i) == version for i in ids)


async def test_pause_resume_promote_abort_and_overlap(
    cp: ControlPlane, fleet: Fleet, publisher: Publisher
) -> None:
    await baseline(cp, fleet, publisher, 2)
    await cp.push(iris_bundle(publisher.key, "2.0.0", seed=1))
    await cp.push(iris_bundle(publisher.key, "3.0.0", seed=2))
    r = await rollout(
        cp,
        {
            "model": "iris",
            "version": "2.0.0",
            "stages": [{"count": 1, "soak": "1h"}, {"percent": 100}],
        },
    )
    clash = await cp.call("POST", "/rollouts", json={"model": "iris", "version": "3.0.0"})
    assert clash.status == 409 and r["id"] in (await clash.json())["error"]["message"]

    async def cmd(action: str, status: int = 200, **body: Any) -> dict:
        resp = await cp.call("POST", f"/rollouts/{r['id']}/{action}", json=body)
        assert resp.status == status, await resp.text()
        return await resp.json()

    assert (await cmd("pause"))["state"] == "paused"
    await cmd("pause", 409)
    assert (await cmd("resume"))["state"] == "running"
    await cmd("promote")  # skip the hour-long soak
    done = await until_state(cp, r["id"], "completed")
    assert [e["kind"] for e in done["timeline"]].count("promoted") == 1
    await all_on(fleet, "2.0.0")
    await cmd("abort", 409)  # completed: nothing to abort
    await cmd("launch", 404)

    r2 = await rollout(
        cp,
        {
            "model": "iris",
            "version": "3.0.0",
            "stages": [{"count": 1, "soak": "1h"}, {"percent": 100}],
        },
    )
    r3 = await rollout(cp, {"model": "iris", "version": "3.0.0", "supersedes": r2["id"]})
    assert (await show(cp, r2["id"]))["state"] == "superseded"
    await until_state(cp, r3["id"], "completed")
    await all_on(fleet, "3.0.0")
    resp = await cp.call("POST", f"/rollouts/{r3['id']}/abort", json={"rollback": "yes"})
    assert resp.status == 400


async def test_rollout_cli_shows_progress_bars(
    cp: ControlPlane, fleet: Fleet, publisher: Publisher, tmp_path: Path
) -> None:
    await baseline(cp, fleet, publisher, 2)
    r = (await (await cp.call("GET", "/rollouts")).json())["rollouts"][0]
    proc = await asyncio.create_subprocess_exec(
        str(Path(__import__("sys").executable).parent / "modelfleet"),
        "rollout",
        "status",
        r["id"],
        "--server",
        cp.url,
        "--token",
        cp.token,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    text = out.decode()
    assert proc.returncode == 0, err
    assert "state: COMPLETED" in text and "[####################] 2/2" in text
    assert "timeline:" in text and "completed" in text


# ------------------------------------------ rollouts that always end or say why they wait (#13)


@pytest.fixture
async def cp_any(tmp_path: Path, db_url: str, publisher: Publisher) -> AsyncIterator[ControlPlane]:
    """The module's quick controller, on SQLite and on PostgreSQL (the stall clock and what a
    stage waits on live in the rollout's JSON options)."""
    config = dataclasses.replace(cp_config(tmp_path, db_url, publisher), controller_interval_s=0.2)
    plane = await start_control_plane(config)
    try:
        yield plane
    finally:
        await plane.client.close()


class HttpAgent:
    """An enrolled agent simulated over HTTP: reads its signed desired state, reports status."""

    def __init__(self, cp: ControlPlane, enrolled: dict[str, Any]) -> None:
        self.cp = cp
        self.id: str = enrolled["agentId"]
        self.credential: str = enrolled["credential"]
        self.keys = keyring([load_public_key(enrolled["controlPlaneKey"].encode())])
        self.seq = itertools.count(1)
        self.generation = 0  # of the last desired state it read

    async def desired(self) -> tuple[int, dict[str, str]]:
        """(generation, model -> version) of the signed desired state it is given now."""
        path = f"/agents/{self.id}/desired?after=0&wait=0"
        r = await self.cp.call("GET", path, token=self.credential)
        assert r.status == 200, await r.text()
        ds = accept_desired(await r.read(), self.keys, self.id, 0, datetime.now(UTC))
        assert ds is not None
        self.generation = ds.generation
        return ds.generation, {m.name: m.version for m in ds.models}

    async def report(self, *models: ModelStatus) -> None:
        """Report these models on the desired state it read last, in its own order."""
        report = StatusReport(
            agent_id=self.id,
            generation=self.generation,
            sent_at=datetime.now(UTC),
            models=models,
            epoch=1,
            seq=next(self.seq),
        )
        path = f"/agents/{self.id}/status"
        r = await self.cp.call("POST", path, token=self.credential, json=report.to_json())
        assert r.status < 300, await r.text()


@dataclasses.dataclass
class HttpFleet:
    """Agents on iris 1.0.0, and 2.0.0 published: ModelStatus of either in a given state."""

    agents: list[HttpAgent]
    digests: dict[str, str]

    def iris(self, version: str, state: str, reason: str | None = None) -> ModelStatus:
        return ModelStatus("iris", version, self.digests[version], state, reason)


async def http_fleet(cp: ControlPlane, publisher: Publisher, n: int) -> HttpFleet:
    """n agents that took 1.0.0 and report it active; 2.0.0 published."""
    digests = {}
    for version, seed in (("1.0.0", 0), ("2.0.0", 1)):
        pushed = await cp.push(iris_bundle(publisher.key, version, seed=seed))
        digests[version] = (await pushed.json())["manifestDigest"]
    fleet = HttpFleet([HttpAgent(cp, await cp.enroll({"site": "x"})) for _ in range(n)], digests)
    first = await cp.rollout("1.0.0", "site=x")
    await until_state(cp, first["id"], "completed")
    for a in fleet.agents:
        assert (await a.desired())[1] == {"iris": "1.0.0"}
        await a.report(fleet.iris("1.0.0", "active"))
    return fleet


async def waiting_on(cp: ControlPlane, rollout_id: str, on: str, text: str = "") -> dict:
    async def check() -> dict | None:
        r = await show(cp, rollout_id)
        w = r["waiting"]
        return r if w and w["on"] == on and text in w["reason"] else None

    return await eventually(check, 30)


async def test_finding_5_a_version_every_moved_agent_drops_is_rolled_back(
    cp_any: ControlPlane, publisher: Publisher
) -> None:
    """Every agent of stage 1 activates 2.0.0, then its health window rolls it back on the
    device: it reports 1.0.0 active and 2.0.0 failed. With no max_failed_agents given, the
    rollout fails by the default limit (mid-soak, not an hour later), and every moved agent's
    desired state goes back to 1.0.0."""
    cp = cp_any
    fleet = await http_fleet(cp, publisher, 4)
    stages = [{"percent": 50, "soak": "1h"}, {"percent": 100}]
    r = await cp.rollout("2.0.0", "site=x", stages=stages, gates={"min_requests": 10})
    soaking = await waiting_on(cp, r["id"], "soak", "0 of 2 moved agents active on 2.0.0")
    assert soaking["effectiveGates"] == {
        "min_requests": {"value": 10, "default": False},
        "max_failed_agents": {"value": "10%", "default": True},
    }
    assert soaking["maxStall"] == {"value": "30m", "default": True}
    assert soaking["state"] == "running" and soaking["failedAgents"] == 0
    moved = {t["agentId"] for t in soaking["targets"]}
    cohort = [a for a in fleet.agents if a.id in moved]
    others = [a for a in fleet.agents if a.id not in moved]
    assert len(cohort) == 2
    generations = {}
    for a in cohort:
        generations[a.id], versions = await a.desired()
        assert versions == {"iris": "2.0.0"}
        await a.report(fleet.iris("1.0.0", "active"), fleet.iris("2.0.0", "active"))
    await waiting_on(cp, r["id"], "soak", "2 of 2 moved agents active on 2.0.0")
    status = await run_cli("rollout", "status", r["id"], "--server", cp.url, "--token", cp.token)
    assert status.returncode == 0, status.stderr
    assert "max_failed_agents 10% (default)" in status.stdout
    assert "max stall: 30m (default)" in status.stdout
    assert "waiting on soak since" in status.stdout, status.stdout

    thrown_out = fleet.iris("2.0.0", "failed", "health window: error rate 1 > 0.05")
    for a in cohort:  # the health window saw errors: back to 1.0.0 on the device
        await a.report(fleet.iris("1.0.0", "active"), thrown_out)
    done = await until_state(cp, r["id"], "rolled_back", "completed", "paused", within=30)
    assert done["state"] == "rolled_back", done["timeline"]
    failed = done["timeline"][-1]
    assert failed["kind"] == "failed" and failed["stage"] == 1
    # The first failure of two already trips the limit (1 > 10% of 2), whichever comes first.
    assert " of 2 moved agents failed to activate 2.0.0" in failed["reason"]
    assert failed["figures"]["cause"] == "max_failed_agents"
    assert failed["figures"]["max_failed_agents"] == {"value": "10%", "default": True}
    assert done["waiting"] is None and done["failedAgents"] == 2
    assert [s["moved"] for s in done["stages"]] == [2, 2]  # stage 2 never ran
    for a in cohort:
        generation, versions = await a.desired()
        assert versions == {"iris": "1.0.0"} and generation > generations[a.id]
    for a in others:
        assert (await a.desired())[1] == {"iris": "1.0.0"}
    listed = (await (await cp.call("GET", "/rollouts")).json())["rollouts"]
    assert next(x for x in listed if x["id"] == r["id"])["waiting"] is None

    # A retry of 2.0.0 (its cause fixed, say): the stored "failed" of the first cohort is about
    # the earlier order, and counts only once an agent reports on the desired state that moved
    # it again.
    retry = await cp.rollout("2.0.0", "site=x", stages=[{"percent": 100, "soak": "1h"}])
    await waiting_on(cp, retry["id"], "soak")
    assert cp.client.app is not None
    for _ in range(2):  # ticks that see the stale reports
        await cp.client.app[STATE].controller.tick()
    assert (await show(cp, retry["id"]))["state"] == "running"
    for a in cohort:
        assert (await a.desired())[1] == {"iris": "2.0.0"}
        await a.report(fleet.iris("1.0.0", "active"), thrown_out)
    again = await until_state(cp, retry["id"], "rolled_back", "completed", "paused", within=30)
    assert again["state"] == "rolled_back", again["timeline"]
    assert again["timeline"][-1]["figures"]["cause"] == "max_failed_agents"


async def test_gates_that_wait_past_max_stall_end_the_rollout(
    cp_any: ControlPlane, publisher: Publisher
) -> None:
    """Failures tolerated ("100%"): the cohort sends 2.0.0 no traffic, min_requests is never
    reached, and the stall bound ends the rollout by its on_failure (pause), naming the wait.
    The controller runs on a clock the test moves, so no window has to be caught in time."""
    cp = cp_any
    fleet = await http_fleet(cp, publisher, 2)
    assert cp.client.app is not None
    controller = cp.client.app[STATE].controller
    clock = [datetime.now(UTC)]
    controller.clock = lambda: clock[0]

    async def ticks(minutes: float) -> None:
        clock[0] += timedelta(minutes=minutes)
        for _ in range(2):
            await controller.tick()

    r = await cp.rollout(
        "2.0.0",
        "site=x",
        stages=[{"count": 1, "soak": "1m"}, {"percent": 100}],
        gates={"min_requests": 10, "max_failed_agents": "100%"},
        max_stall="10m",
        on_failure="pause",
    )
    soaking = await waiting_on(cp, r["id"], "soak")
    await stop_controller_loop()  # from here only the test's ticks, each on the clock it set
    moved = soaking["targets"][0]["agentId"]
    thrown_out = fleet.iris("2.0.0", "failed", "health window: error rate 1 > 0.05")
    for a in fleet.agents:
        if a.id == moved:  # tolerated by the limit, and sends 2.0.0 no traffic
            await a.desired()
            await a.report(fleet.iris("1.0.0", "active"), thrown_out)
    await ticks(1.01)  # the soak is over; the gates wait for traffic that will not come
    stalled = await show(cp, r["id"])
    assert stalled["state"] == "running", stalled["timeline"]
    w = stalled["waiting"]
    assert w["on"] == "gates" and "min_requests: 0 of 10 requests on 2.0.0" in w["reason"]
    assert w["stalledSince"] == format_time(clock[0])
    assert w["failsAt"] == format_time(clock[0] + timedelta(minutes=10))
    assert stalled["maxStall"] == {"value": "10m", "default": False}
    assert stalled["effectiveGates"]["max_failed_agents"] == {"value": "100%", "default": False}
    assert stalled["failedAgents"] == 1
    await ticks(9.9)
    assert (await show(cp, r["id"]))["state"] == "running"
    await ticks(0.1)
    done = await show(cp, r["id"])
    assert done["state"] == "paused", done["timeline"]
    failed = done["timeline"][-1]
    assert failed["kind"] == "failed" and failed["figures"]["cause"] == "max_stall"
    assert failed["figures"]["waiting"]["on"] == "gates"
    assert "(max_stall 10m) waiting on stage 1 gates wait: min_requests" in failed["reason"]
    assert done["waiting"]["on"] == "operator"

    # Paused, nothing fails; resumed, the stage soaks again and its stall clock starts afresh.
    await ticks(60)
    resumed = await cp.call("POST", f"/rollouts/{r['id']}/resume", json={})
    assert resumed.status == 200
    await ticks(0)
    assert (await show(cp, r["id"]))["waiting"]["on"] == "soak"
    await ticks(1.01)
    stalled_again = clock[0]
    await ticks(10)
    again = await show(cp, r["id"])
    kinds = [e["kind"] for e in again["timeline"]]
    assert again["state"] == "paused" and kinds.count("failed") == 2
    assert again["timeline"][-1]["figures"]["stalled_since"] == format_time(stalled_again)
