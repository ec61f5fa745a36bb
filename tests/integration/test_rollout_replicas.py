"""Control plane processes and rollouts: a restart mid-rollout, and two replicas on one
PostgreSQL. Every stage moves exactly once."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.bundles import Publisher, iris_bundle
from tests.support.fleet import MODELFLEET, free_port

pytestmark = pytest.mark.slow


class Server:
    """One `modelfleet server` process."""

    def __init__(self, data_dir: Path, db: str, publisher: Publisher, name: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = [
            MODELFLEET,
            "server",
            "--data-dir",
            str(data_dir),
            "--port",
            str(self.port),
            "--db",
            db,
            "--trust-publisher",
            str(publisher.pub_path),
            "--controller-interval",
            "0.1",
            # These tests are about replicas, not credential storage: the cheapest
            # scrypt cost spares them 200 agents x 2 replicas of hashing.
            "--credential-cost",
            "10",
        ]
        self.log = data_dir.parent / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    async def start(self) -> None:
        self.proc = await asyncio.to_thread(
            subprocess.Popen, self.args, stdout=self.log.open("ab"), stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 30
        async with aiohttp.ClientSession() as s:
            while time.monotonic() < deadline:
                try:
                    async with s.get(f"{self.url}/api/v1/health") as r:
                        if r.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
        raise AssertionError(self.log.read_text())

    async def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                await asyncio.to_thread(self.proc.wait, 30)
            except subprocess.TimeoutExpired:
                self.proc.kill()  # open long-polls can hold a graceful stop up
                await asyncio.to_thread(self.proc.wait, 10)


async def call(
    url: str, token: str, method: str, path: str, body: Any = None, data: bytes | None = None
) -> Any:
    async with (
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as s,
        s.request(method, f"{url}/api/v1{path}", json=body, data=data) as r,
    ):
        assert r.status < 300, await r.text()
        return await r.json()


async def enroll(url: str, token: str, n: int) -> None:
    for _ in range(n):
        t = await call(url, token, "POST", "/enrollment-tokens", {"labels": {"site": "x"}})
        async with (
            aiohttp.ClientSession() as s,
            s.post(f"{url}/api/v1/agents/enroll", json={"token": t["token"]}) as r,
        ):
            assert r.status == 201


async def wait_done(url: str, token: str, rollout_id: str, within: float = 60) -> dict:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        r = await call(url, token, "GET", f"/rollouts/{rollout_id}")
        if r["state"] in ("completed", "rolled_back", "aborted"):
            return r
        await asyncio.sleep(0.2)
    raise AssertionError(r)


def assert_each_stage_once(r: dict, stages: int, agents: int) -> None:
    kinds = Counter(e["kind"] for e in r["timeline"])
    assert r["state"] == "completed", r["timeline"]
    assert kinds == {
        "created": 1,
        "started": 1,
        "cohort": stages,
        "advanced": stages - 1,
        "gates_passed": stages - 1,
        "completed": 1,
    }, kinds
    cohorts = [e["stage"] for e in r["timeline"] if e["kind"] == "cohort"]
    assert cohorts == list(range(1, stages + 1))
    assert r["progress"]["moved"] == agents == len({t["agentId"] for t in r["targets"]})


STAGED = {
    "model": "iris",
    "version": "1.0.0",
    "stages": [{"count": 2, "soak": "1s"}, {"count": 4, "soak": "1s"}, {"percent": 100}],
}


async def test_restart_mid_rollout_resumes_without_skipping_or_repeating(
    tmp_path: Path, publisher: Publisher
) -> None:
    server = Server(tmp_path / "cp", f"sqlite:///{tmp_path / 'cp.db'}", publisher, "cp")
    await server.start()
    try:
        token = (tmp_path / "cp" / "admin-token").read_text().strip()
        await call(server.url, token, "POST", "/bundles", data=iris_bundle(publisher.key))
        await enroll(server.url, token, 6)
        r = await call(server.url, token, "POST", "/rollouts", STAGED)
        await asyncio.sleep(0.5)  # stage 1 moved, soaking
        await server.stop(signal.SIGKILL)
        mid = r["id"]
        await asyncio.sleep(1.5)  # the soak runs out while nobody is there
        await server.start()
        done = await wait_done(server.url, token, mid)
        assert_each_stage_once(done, 3, 6)
    finally:
        await server.stop()


async def test_two_replicas_on_one_postgres_move_each_stage_once(
    tmp_path: Path, publisher: Publisher, pg_url: str
) -> None:
    data = tmp_path / "shared"  # the blob store and the signing key, shared like a volume
    a = Server(data, pg_url, publisher, "a")
    b = Server(data, pg_url, publisher, "b")
    await a.start()
    await b.start()
    try:
        token = (data / "admin-token").read_text().strip()
        await call(a.url, token, "POST", "/bundles", data=iris_bundle(publisher.key))
        await enroll(b.url, token, 8)
        r = await call(b.url, token, "POST", "/rollouts", STAGED)
        done = await wait_done(a.url, token, r["id"])
        assert_each_stage_once(done, 3, 8)
        # Both replicas serve the same desired state to an agent.
        agents = (await call(a.url, token, "GET", "/agents"))["agents"]
        assert {x["desiredGeneration"] for x in agents} == {1}
    finally:
        await a.stop()
        await b.stop()


async def test_a_long_poll_on_one_replica_wakes_on_a_change_made_by_another(
    tmp_path: Path, publisher: Publisher, pg_url: str
) -> None:
    data = tmp_path / "shared"
    a = Server(data, pg_url, publisher, "a")
    b = Server(data, pg_url, publisher, "b")
    await a.start()
    await b.start()
    try:
        token = (data / "admin-token").read_text().strip()
        await call(a.url, token, "POST", "/bundles", data=iris_bundle(publisher.key))
        t = await call(a.url, token, "POST", "/enrollment-tokens", {"labels": {"site": "x"}})
        async with (
            aiohttp.ClientSession() as s,
            s.post(f"{a.url}/api/v1/agents/enroll", json={"token": t["token"]}) as r,
        ):
            agent = await r.json()
        headers = {"Authorization": f"Bearer {agent['credential']}"}

        async def long_poll() -> tuple[int, float]:
            async with (
                aiohttp.ClientSession(headers=headers) as s,
                s.get(f"{b.url}/api/v1/agents/{agent['agentId']}/desired?after=0&wait=20") as r,
            ):
                await r.read()
                return r.status, time.monotonic()

        poll = asyncio.create_task(long_poll())
        await asyncio.sleep(0.5)  # the poll is waiting on replica b
        t0 = time.monotonic()
        await call(a.url, token, "POST", "/rollouts", {"model": "iris", "version": "1.0.0"})
        status, answered = await poll
        assert status == 200
        # Woken by NOTIFY, not by b's next database re-read (every 5 s).
        assert answered - t0 < 2.0
    finally:
        await a.stop()
        await b.stop()


async def test_replica_killed_mid_rollout_with_200_simulated_agents(
    tmp_path: Path, publisher: Publisher, pg_url: str
) -> None:
    """2 replicas + PostgreSQL + 200 simulated agents (2 processes) through a staged rollout;
    one replica is killed with SIGKILL mid-rollout and restarted. The rollout completes with
    every stage once, every agent converges, and every metrics batch the agents made is stored
    exactly once (agents fail over to the other replica and retry what was not acknowledged)."""
    import asyncpg
    from sqlalchemy.engine import make_url

    data = tmp_path / "shared"
    a = Server(data, pg_url, publisher, "a")
    b = Server(data, pg_url, publisher, "b")
    await a.start()
    await b.start()
    sim: asyncio.subprocess.Process | None = None
    try:
        token = (data / "admin-token").read_text().strip()
        await call(a.url, token, "POST", "/bundles", data=iris_bundle(publisher.key))
        sim = await asyncio.create_subprocess_exec(
            MODELFLEET,
            "sim",
            "--server",
            f"{a.url},{b.url}",
            "--token",
            token,
            "--agents",
            "200",
            "--processes",
            "2",
            "--labels",
            "site=sim",
            "--rollout",
            "iris:1.0.0",
            "--stages",
            "10%:2s,50%:2s,100%",
            "--status-interval",
            "1",
            "--timeout",
            "120",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        deadline = time.monotonic() + 90
        rollout: dict[str, Any] = {}
        while time.monotonic() < deadline:
            rollouts = (await call(b.url, token, "GET", "/rollouts"))["rollouts"]
            if rollouts:
                rollout = await call(b.url, token, "GET", f"/rollouts/{rollouts[0]['id']}")
                if rollout["progress"]["moved"] >= 20:
                    break
            await asyncio.sleep(0.1)
        assert rollout, "the simulator never created its rollout"
        await asyncio.sleep(0.5)  # the simulator has its answer to the create
        await a.stop(signal.SIGKILL)  # mid-rollout, with agents long-polling it
        await asyncio.sleep(2)
        await a.start()
        out_b, err_b = await asyncio.wait_for(sim.communicate(), 150)
        lines = out_b.decode().strip().splitlines()
        assert sim.returncode == 0 and lines, err_b.decode()[-3000:]
        out = json.loads(lines[-1])
        assert out["converged"] is True and out["active"] == 200
        assert out["failovers"] > 0  # the kill was felt
        assert out["metric_batches_pending"] == 0
        assert (
            out["metric_batches_stored"] + out["metric_batches_duplicate"]
            == (out["metric_batches"])
        )
        done = await wait_done(b.url, token, rollout["id"])
        assert_each_stage_once(done, 3, 200)
        u = make_url(pg_url)
        conn = await asyncpg.connect(
            host=u.host,
            port=u.port or 5432,
            user=u.username,
            password=u.password,
            database=u.database,
        )
        try:
            stored = await conn.fetchval("SELECT count(*) FROM metric_batches")
        finally:
            await conn.close()
        assert stored == out["metric_batches"]  # none lost, none twice
    finally:
        if sim is not None and sim.returncode is None:
            sim.kill()
            await sim.wait()
        await a.stop()
        await b.stop()
