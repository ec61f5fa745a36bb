"""kill -9 of a real agent process at each point of an update, then a restart.

After every crash the agent serves the last good version or the new verified one, its state
files parse, and every blob in its store matches its digest.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from agent.host.failpoints import KILL_POINTS
from bench.devkit.models import iris_model
from tests.support.agents import enroll_agent, eventually, infer, resolves_to, wait_active
from tests.support.bundles import Publisher, iris_bundle
from tests.support.control_plane import ControlPlane
from tests.support.fleet import free_port

MODELFLEET = str(Path(sys.executable).parent / "modelfleet")


def start_agent(state_dir: Path, port: int, failpoint: str | None = None) -> subprocess.Popen:
    env = {**os.environ, "MODELFLEET_FAILPOINTS": failpoint or ""}
    log = (state_dir.parent / f"agent-{failpoint or 'clean'}.log").open("ab")
    return subprocess.Popen(
        [
            MODELFLEET,
            "agent",
            "run",
            "--state-dir",
            str(state_dir),
            "--serve",
            f"127.0.0.1:{port}",
            "--heartbeat",
            "0.5",
            "--poll-wait",
            "2",
            "--metrics-interval",
            "0.5",
        ],
        env=env,
        stdout=log,
        stderr=log,
    )


def check_store(state_dir: Path) -> None:
    json.loads((state_dir / "state.json").read_text())
    for blob in (state_dir / "blobs" / "sha256").iterdir():
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name, blob
    for manifest in (state_dir / "manifests").iterdir():
        json.loads(manifest.read_bytes())


async def serving_version(port: int) -> str | None:
    try:
        status, out = await infer(port)
    except OSError:
        return None
    return out["model_version"] if status == 200 else None


@pytest.mark.slow
@pytest.mark.parametrize("failpoint", sorted(KILL_POINTS))
async def test_kill_9_during_update(
    cp_sqlite: ControlPlane, publisher: Publisher, tmp_path: Path, failpoint: str
) -> None:
    cp = cp_sqlite
    await cp.push(iris_bundle(publisher.key, "1.0.0"))
    # 2.0.0 is large enough that "download-midway" falls between chunks.
    await cp.push(
        iris_bundle(publisher.key, "2.0.0", seed=1, model=iris_model(seed=1, pad_bytes=2_000_000))
    )
    state_dir = tmp_path / "a"
    ident = await enroll_agent(cp, state_dir, {"site": "x"})
    port = free_port()

    agent = start_agent(state_dir, port)
    try:
        await cp.rollout("1.0.0", "site=x")
        await wait_active(cp, ident.agent_id, "1.0.0")
    finally:
        agent.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(agent.wait, 20) == 0

    agent = start_agent(state_dir, port, failpoint)
    await cp.rollout("2.0.0", "site=x")
    code = await asyncio.to_thread(agent.wait, 30)
    assert code == -signal.SIGKILL, f"agent did not die at {failpoint} (exit {code})"
    check_store(state_dir)

    agent = start_agent(state_dir, port)
    try:
        # Straight after the restart it serves a whole version, old or new ...
        first = await eventually(lambda: serving_version(port), 20)
        assert first in ("1.0.0", "2.0.0")
        # ... and it finishes the update.
        await wait_active(cp, ident.agent_id, "2.0.0", 30)
        assert await serving_version(port) == "2.0.0"
    finally:
        agent.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(agent.wait, 20) == 0
    check_store(state_dir)
    assert not list((state_dir / "partial").iterdir())


SOAK_RUNS = int(os.environ.get("MODELFLEET_SOAK_RUNS", "20"))


@pytest.mark.slow
async def test_kill_9_at_random_moments_soak(
    cp_sqlite: ControlPlane, publisher: Publisher, tmp_path: Path
) -> None:
    """SOAK_RUNS times (20 in `make test`, 200 in `make soak`): start the agent, check it serves
    a whole verified version, start a rollout to the other version (up, or an explicit rollback
    down), and kill -9 it at a random moment of the update; the store is never corrupt."""
    import random

    cp = cp_sqlite
    await cp.push(iris_bundle(publisher.key, "1.0.0"))
    await cp.push(
        iris_bundle(publisher.key, "2.0.0", seed=1, model=iris_model(seed=1, pad_bytes=500_000))
    )
    state_dir = tmp_path / "a"
    ident = await enroll_agent(cp, state_dir, {"site": "x"})
    port = free_port()
    rng = random.Random(int(os.environ.get("MODELFLEET_SOAK_SEED", "7")))
    rollout = await cp.rollout("1.0.0", "site=x")
    target, seen = "1.0.0", set()
    for run in range(SOAK_RUNS):
        agent = start_agent(state_dir, port)
        try:
            version = await eventually(lambda: serving_version(port), 20)
            assert version in ("1.0.0", "2.0.0"), (run, version)
            seen.add(version)
            target = "2.0.0" if target == "1.0.0" else "1.0.0"
            rollout = await cp.rollout(
                target, "site=x", supersedes=rollout["id"], rollback=target == "1.0.0"
            )
            await asyncio.sleep(rng.uniform(0.0, 0.8))
        finally:
            agent.send_signal(signal.SIGKILL)
            await asyncio.to_thread(agent.wait, 20)
        check_store(state_dir)
    agent = start_agent(state_dir, port)
    try:
        # Straight after the last restart it serves a whole version, then finishes the update.
        assert await eventually(lambda: serving_version(port), 20) in ("1.0.0", "2.0.0")
        await eventually(lambda: resolves_to(serving_version(port), target), 30)
        await wait_active(cp, ident.agent_id, target, 30)
    finally:
        agent.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(agent.wait, 20) == 0
    check_store(state_dir)
    assert seen == {"1.0.0", "2.0.0"} or SOAK_RUNS < 4
