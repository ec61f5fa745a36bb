"""PostgreSQL restarted under ingest load: the control plane reconnects, the agent's reports
are retried, and every request served is stored exactly once."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.agents import Load, enroll_agent, eventually, resolves_to, running_agent
from tests.support.bundles import Publisher, iris_bundle
from tests.support.control_plane import cp_config, start_control_plane, stored_requests
from tests.support.fleet import free_port

PG_BIN = Path("/usr/lib/postgresql/15/bin")
pytestmark = pytest.mark.slow


class PrivatePostgres:
    """A PostgreSQL cluster of the test's own (the machine's is shared by the whole suite)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.data = root / "data"

    def _ctl(self, *args: str) -> None:
        opts = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1"
        subprocess.run(
            [
                "runuser",
                "-u",
                "postgres",
                "--",
                str(PG_BIN / "pg_ctl"),
                "-D",
                str(self.data),
                "-o",
                opts,
                "-l",
                str(self.root / "log"),
                "-w",
                *args,
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )

    def start(self) -> None:
        self._ctl("start")

    def stop(self) -> None:
        self._ctl("-m", "fast", "stop")

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"


@pytest.fixture
def private_pg() -> Iterator[PrivatePostgres]:
    if os.geteuid() != 0 or not (PG_BIN / "initdb").exists() or not shutil.which("runuser"):
        pytest.skip("a private PostgreSQL cluster needs root, runuser and PostgreSQL 15's initdb")
    # Not under pytest's own (root-only) temp directory: the postgres user must reach it.
    root = Path(tempfile.mkdtemp(prefix="modelfleet-pg-"))
    shutil.chown(root, "postgres")
    subprocess.run(
        [
            "runuser",
            "-u",
            "postgres",
            "--",
            str(PG_BIN / "initdb"),
            "-D",
            str(root / "data"),
            "-A",
            "trust",
            "-U",
            "postgres",
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    pg = PrivatePostgres(root)
    pg.start()
    try:
        yield pg
    finally:
        pg.stop()
        shutil.rmtree(root, ignore_errors=True)


async def test_postgres_restarted_under_ingest_load_loses_nothing(
    tmp_path: Path, publisher: Publisher, private_pg: PrivatePostgres
) -> None:
    cp = await start_control_plane(cp_config(tmp_path, private_pg.url, publisher))
    try:
        await cp.push(iris_bundle(publisher.key))
        await enroll_agent(cp, tmp_path / "a", {"site": "x"})
        async with running_agent(tmp_path / "a", metrics_interval_s=0.2, heartbeat_s=0.3) as agent:
            await cp.rollout(selector="site=x")
            await eventually(lambda: "iris" in agent.models, 15)
            async with Load(agent.serve_port) as load:  # type: ignore[arg-type]
                await asyncio.sleep(1.0)
                await asyncio.to_thread(private_pg.stop)  # under load, reports in flight
                # The control plane answers 5xx meanwhile; the agent holds its batches.
                await eventually(lambda: agent.counters["pending_batches"] >= 2, 15)
                await asyncio.to_thread(private_pg.start)
                await asyncio.sleep(1.0)
            assert load.failures == [] and load.transport_errors == 0  # inference never stops
            served = load.ok
            # Reports that failed while the database was away were kept and sent again.
            await eventually(lambda: agent.counters["pending_batches"] == 0, 30)
        await eventually(lambda: resolves_to(stored_requests(cp), served), 20)
        r = await cp.call("GET", "/health")
        assert r.status == 200  # the control plane reconnected
    finally:
        await cp.client.close()
