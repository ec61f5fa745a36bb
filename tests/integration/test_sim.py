"""The fleet simulator against a real control plane: the interface scripts rely on."""

from __future__ import annotations

import asyncio
import json
import subprocess

import pytest

from tests.support.bundles import Publisher, iris_bundle
from tests.support.control_plane import ControlPlane
from tests.support.fleet import MODELFLEET


@pytest.mark.slow
async def test_sim_converges_and_fails_when_agents_fail(
    cp_sqlite: ControlPlane, publisher: Publisher
) -> None:
    cp = cp_sqlite
    await cp.push(iris_bundle(publisher.key, "1.0.0"))
    await cp.push(iris_bundle(publisher.key, "2.0.0", seed=1))

    async def sim(*extra: str) -> tuple[int, dict]:
        p = await asyncio.to_thread(
            subprocess.run,
            [MODELFLEET, "sim", "--server", cp.url, "--token", cp.token, *extra],
            capture_output=True,
            text=True,
            timeout=180,
        )
        return p.returncode, json.loads(p.stdout.strip().splitlines()[-1]) if p.stdout else {}

    code, out = await sim("--agents", "30", "--labels", "site=sim", "--rollout", "iris:1.0.0")
    assert code == 0, out
    assert out["agents"] == 30 and out["converged"] is True and out["active"] == 30
    assert 0 < out["p50_s"] <= out["p99_s"] <= out["converge_s"] < 60
    blob_bytes = out["bytes_fetched"]
    assert blob_bytes > 0  # fetched once, shared between the simulated agents

    code, out = await sim(
        "--agents",
        "10",
        "--labels",
        "site=sim2",
        "--rollout",
        "iris:2.0.0",
        "--failing",
        "0.5",
        "--timeout",
        "5",
    )
    assert code == 1 and out["converged"] is False and out["active"] < 10

    # Two worker processes sharing 20 agents, every report acknowledged before they exit.
    code, out = await sim(
        "--agents",
        "20",
        "--labels",
        "site=sim3",
        "--rollout",
        "iris:2.0.0",
        "--processes",
        "2",
        "--status-interval",
        "0.5",
    )
    assert code == 0, out
    assert out["processes"] == 2 and out["converged"] is True and out["active"] == 20
    assert out["metric_batches"] >= 20 and out["metric_batches_pending"] == 0
    assert out["metric_batches_stored"] + out["metric_batches_duplicate"] == out["metric_batches"]

    for bad in (
        ["--agents", "0"],
        ["--agents", "2", "--processes", "3"],
        ["--agents", "2", "--server", "ftp://x"],
    ):
        code, _ = await sim(*bad)
        assert code == 2, bad
    r = await cp.call("GET", "/fleet")
    assert (await r.json())["agents"] == 60
