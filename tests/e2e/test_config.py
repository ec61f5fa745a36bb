"""Configuration end to end: real agent processes, a real control plane, the real CLI.

Layers at fleet, site and agent level reach three agents, merged, and are applied without a
restart; a bad value is refused with nothing stored; a configuration rollout that breaks
inference is stopped and rolled back by its gates.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from protocol.desired import config_digest
from tests.support.agents import eventually
from tests.support.bundles import Publisher, iris_bundle
from tests.support.control_plane import ControlPlane, fast_control_plane
from tests.support.fleet import (
    ONE_ROW,
    TWO_ROWS,
    Fleet,
    FleetAgent,
    Traffic,
    run_cli,
    tolerant_fleet,
)

pytestmark = pytest.mark.slow

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "threshold": {"type": "number", "minimum": 0, "maximum": 1, "default": 0.5},
        "maxBatch": {"type": "integer", "minimum": 1, "default": 8},
        "tags": {"type": "object", "properties": {"lang": {"type": "string", "default": "en"}}},
    },
    "additionalProperties": False,
}
DEFAULTS = {"threshold": 0.5, "maxBatch": 8, "tags": {"lang": "en"}}


@pytest.fixture
async def cp(tmp_path: Path, publisher: Publisher) -> AsyncIterator[ControlPlane]:
    async with fast_control_plane(tmp_path, publisher) as plane:
        yield plane


@pytest.fixture
async def fleet(cp: ControlPlane, tmp_path: Path) -> AsyncIterator[Fleet]:
    # What stops a bad configuration in the rollout test is the rollout's gates.
    async with tolerant_fleet(cp, tmp_path / "fleet") as f:
        yield f


async def cli(cp: ControlPlane, *args: str) -> Any:
    return await run_cli(*args, "--server", cp.url, "--token", cp.token)


async def shown(cp: ControlPlane, agent: FleetAgent) -> dict[str, Any]:
    (m,) = (await (await cp.call("GET", f"/config/agents/{agent.agent_id}")).json())["models"]
    return m


async def applied(cp: ControlPlane, fleet: Fleet, want: list[dict[str, Any]]) -> None:
    """Every agent reports it applied the configuration ``want`` names for it."""

    got: list[dict[str, Any]] = []

    async def check() -> bool:
        got[:] = [await shown(cp, a) for a in fleet.agents]
        return all(
            m["applied"] and m["config"] == w and m["appliedDigest"] == config_digest(w)
            for m, w in zip(got, want, strict=True)
        )

    try:
        await eventually(check, 60, 0.2)
    except AssertionError:
        raise AssertionError(f"{got}\n{fleet.logs()}") from None


async def infer(agent: FleetAgent, body: dict[str, Any]) -> int:
    url = f"http://127.0.0.1:{agent.port}/v2/models/iris/infer"
    async with aiohttp.ClientSession() as s, s.post(url, json=body) as r:
        await r.read()
        return r.status


async def test_layers_reach_three_agents_merged_and_apply_without_a_restart(
    cp: ControlPlane, fleet: Fleet, publisher: Publisher
) -> None:
    await cp.push(iris_bundle(publisher.key, "1.0.0", config_schema=SCHEMA))
    a1, a2 = await fleet.add(2, "a")
    (b1,) = await fleet.add(1, "b")
    await cp.rollout("1.0.0")
    await applied(cp, fleet, [DEFAULTS] * 3)
    pids = [a.proc.pid for a in fleet.agents if a.proc is not None]
    assert all([await infer(a, TWO_ROWS) == 200 for a in fleet.agents])

    for args in (
        ("--fleet", "threshold=0.7"),
        ("--selector", "site=b", "maxBatch=1"),
        ("--agent", a2.agent_id, "tags.lang=fr", "maxBatch=2"),
    ):
        p = await cli(cp, "config", "set", "--model", "iris", *args)
        assert p.returncode == 0, p.stderr
    want_a1 = {**DEFAULTS, "threshold": 0.7}
    want_a2 = {"threshold": 0.7, "maxBatch": 2, "tags": {"lang": "fr"}}
    want_b1 = {**DEFAULTS, "threshold": 0.7, "maxBatch": 1}
    await applied(cp, fleet, [want_a1, want_a2, want_b1])
    # Applied in the running processes: the same ones, each serving by its new options.
    assert [a.proc.pid for a in fleet.agents if a.proc and a.proc.poll() is None] == pids
    assert [await infer(a, TWO_ROWS) for a in (a1, a2, b1)] == [200, 200, 400]
    assert await infer(b1, ONE_ROW) == 200
    p = await cli(cp, "config", "show", "--agent", b1.agent_id, "--json")
    assert p.returncode == 0, p.stderr
    (m,) = json.loads(p.stdout)["models"]
    assert m["config"] == want_b1 and m["applied"] and len(m["layers"]) == 2

    # A bad value: refused naming its path, nothing stored, nothing moves.
    before = (await (await cp.call("GET", "/config/layers")).json())["layers"]
    p = await cli(cp, "config", "set", "--model", "iris", "--selector", "site=a", "maxBatch=0")
    assert p.returncode == 1
    assert "HTTP 400" in p.stderr and "(field: maxBatch)" in p.stderr
    assert "maxBatch: 0 is less than the minimum of 1" in p.stderr
    assert (await (await cp.call("GET", "/config/layers")).json())["layers"] == before

    # Unset the site layer: b1 goes back to the default batch limit, still the same process.
    p = await cli(cp, "config", "unset", "--model", "iris", "--selector", "site=b", "maxBatch")
    assert p.returncode == 0, p.stderr
    await applied(cp, fleet, [want_a1, want_a2, {**DEFAULTS, "threshold": 0.7}])
    assert await infer(b1, TWO_ROWS) == 200
    assert [a.proc.pid for a in fleet.agents if a.proc and a.proc.poll() is None] == pids


async def test_a_configuration_rollout_that_breaks_inference_is_rolled_back_by_its_gates(
    cp: ControlPlane, fleet: Fleet, publisher: Publisher
) -> None:
    await cp.push(iris_bundle(publisher.key, "1.0.0", config_schema=SCHEMA))
    await fleet.add(4, "a")
    await cp.rollout("1.0.0")
    await applied(cp, fleet, [DEFAULTS] * 4)
    async with Traffic(fleet, TWO_ROWS):
        r = await cp.call(
            "POST",
            "/rollouts",
            json={
                "model": "iris",
                "version": "1.0.0",
                "config": {"maxBatch": 1},  # every two-row request now fails
                "stages": [{"percent": 50, "soak": "2s"}, {"percent": 100}],
                "gates": {"max_error_rate": 0.1, "min_requests": 5},
            },
        )
        assert r.status == 201, await r.text()
        rid = (await r.json())["id"]

        async def ended() -> dict[str, Any] | None:
            doc = await (await cp.call("GET", f"/rollouts/{rid}")).json()
            return doc if doc["state"] in ("rolled_back", "completed") else None

        done = await eventually(ended, 60, 0.2)
    assert done["state"] == "rolled_back", done["timeline"]
    failed = done["timeline"][-1]
    assert failed["kind"] == "failed" and "max_error_rate" in failed["reason"]
    new = failed["figures"]["new"]
    gate = next(g for g in failed["figures"]["gates"] if g["gate"] == "max_error_rate")
    assert gate["outcome"] == "fail" and gate["threshold"] == 0.1
    # The soak counts from the move; a moved agent may answer a request or two under the old
    # configuration before it applies the new one (docs/adr/0018). A failing gate ends the
    # stage before min_requests is reached, as for a version.
    assert new["errors"] >= 1 and gate["value"] == round(new["errors"] / new["requests"], 6)
    # The moved agents went back to the configuration they had, without a restart.
    await applied(cp, fleet, [DEFAULTS] * 4)
    assert all(a.proc is not None and a.proc.poll() is None for a in fleet.agents)
    assert all([await infer(a, TWO_ROWS) == 200 for a in fleet.agents])


async def test_the_agent_rolls_a_failing_configuration_back_by_itself(
    cp: ControlPlane, tmp_path: Path, publisher: Publisher
) -> None:
    # The agents' own health window (defaults: 20 requests, 20% errors) this time.
    fleet = Fleet(cp, tmp_path / "own")
    (tmp_path / "own").mkdir()
    try:
        await cp.push(iris_bundle(publisher.key, "1.0.0", config_schema=SCHEMA))
        (agent,) = await fleet.add(1, "a")
        await cp.rollout("1.0.0")
        await applied(cp, fleet, [DEFAULTS])
        body = {"model": "iris", "scope": "fleet", "set": {"maxBatch": 1}}
        assert (await cp.call("POST", "/config/layers", json=body)).status == 200
        bad = config_digest({**DEFAULTS, "maxBatch": 1})

        async def failed() -> dict[str, Any] | None:
            m = await shown(cp, agent)
            return m if m.get("failed") else None

        async with Traffic(fleet, TWO_ROWS):
            m = await eventually(failed, 60, 0.2)
        # Thrown out on the device: the configuration it had serves again, in the same process.
        assert m["configDigest"] == bad and m["appliedDigest"] == config_digest(DEFAULTS)
        assert "requests failed" in m["failed"] and "rolled back" in m["failed"]
        assert not m["applied"]
        assert await infer(agent, TWO_ROWS) == 200
        assert agent.proc is not None and agent.proc.poll() is None
        r = await cp.call("GET", f"/agents/{agent.agent_id}")
        states = {(x["state"], x.get("configDigest")) for x in (await r.json())["models"]}
        assert states == {("active", config_digest(DEFAULTS)), ("failed", bad)}
    finally:
        await fleet.stop()
