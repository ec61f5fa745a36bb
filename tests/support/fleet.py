"""A fleet of real agent processes on loopback, and traffic to drive through them."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from tests.support.agents import enroll_agent
from tests.support.control_plane import ControlPlane

MODELFLEET = str(Path(sys.executable).parent / "modelfleet")


async def run_cli(*args: object) -> subprocess.CompletedProcess[str]:
    """Run the ``modelfleet`` command with these arguments, capturing its output."""
    return await asyncio.to_thread(
        subprocess.run, [MODELFLEET, *map(str, args)], capture_output=True, text=True, timeout=60
    )


ONE_ROW = {
    "inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [5.1, 3.5, 1.4, 0.2]}]
}
TWO_ROWS = {
    "inputs": [
        {
            "name": "x",
            "shape": [2, 4],
            "datatype": "FP32",
            "data": [5.1, 3.5, 1.4, 0.2, 6.7, 3.0, 5.2, 2.3],
        }
    ]
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class FleetAgent:
    """One agent process."""

    agent_id: str
    name: str
    site: str
    state_dir: Path
    port: int
    proc: subprocess.Popen[bytes] | None = None


class Fleet:
    """Agent processes enrolled with one control plane."""

    def __init__(self, cp: ControlPlane, root: Path, extra_args: tuple[str, ...] = ()) -> None:
        self.cp = cp
        self.root = root
        self.extra_args = extra_args
        self.agents: list[FleetAgent] = []

    async def add(
        self,
        n: int,
        site: str,
        labels: dict[str, str] | None = None,
        server: str | None = None,
        facts: dict[str, Any] | None = None,
        extra: tuple[str, ...] = (),
    ) -> list[FleetAgent]:
        added = []
        for _ in range(n):
            i = len(self.agents)
            state_dir = self.root / f"agent-{i}"
            ident = await enroll_agent(
                self.cp, state_dir, {"site": site, **(labels or {})}, server=server, facts=facts
            )
            a = FleetAgent(ident.agent_id, ident.name, site, state_dir, free_port())
            self.agents.append(a)
            added.append(a)
        for a in added:
            self.start(a, extra)
        return added

    def start(self, a: FleetAgent, extra: tuple[str, ...] = ()) -> None:
        log = (self.root / f"{a.state_dir.name}.log").open("ab")
        a.proc = subprocess.Popen(
            [
                MODELFLEET,
                "agent",
                "run",
                "--state-dir",
                str(a.state_dir),
                "--serve",
                f"127.0.0.1:{a.port}",
                "--heartbeat",
                "0.5",
                "--poll-wait",
                "5",
                "--metrics-interval",
                "0.5",
                *self.extra_args,
                *extra,
            ],
            stdout=log,
            stderr=log,
            env={**os.environ, "MODELFLEET_FAILPOINTS": ""},
        )

    async def stop(self) -> None:
        for a in self.agents:
            if a.proc is not None and a.proc.poll() is None:
                a.proc.send_signal(signal.SIGTERM)
        for a in self.agents:
            if a.proc is not None:
                try:
                    await asyncio.to_thread(a.proc.wait, 20)
                except subprocess.TimeoutExpired:
                    a.proc.kill()

    async def versions(self) -> dict[str, str | None]:
        """agent id -> the iris version the control plane sees active on it."""
        r = await self.cp.call("GET", "/agents")
        out = {}
        for a in (await r.json())["agents"]:
            active = [m["version"] for m in a["models"] if m["state"] == "active"]
            out[a["id"]] = active[0] if active else None
        return out

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted(self.root.glob("*.log"))
        )


class Traffic:
    """Requests to every agent of a fleet, round robin, until stopped."""

    def __init__(self, fleet: Fleet, body: dict[str, Any] = ONE_ROW) -> None:
        self.fleet = fleet
        self.body = body
        self.sent = 0
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s:
            while not self._stop.is_set():
                for a in list(self.fleet.agents):
                    url = f"http://127.0.0.1:{a.port}/v2/models/iris/infer"
                    with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                        async with s.post(url, json=self.body) as r:
                            await r.read()
                            self.sent += 1
                await asyncio.sleep(0.01)

    async def __aenter__(self) -> Traffic:
        self._task = asyncio.create_task(self._run(), name="fleet-traffic")
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._stop.set()
        await self._task


@contextlib.asynccontextmanager
async def tolerant_fleet(cp: ControlPlane, root: Path) -> AsyncIterator[Fleet]:
    """Agent processes whose own health window tolerates errors: what stops a bad version or
    configuration is then the rollout's gates. Stopped on exit."""
    root.mkdir()
    fleet = Fleet(cp, root, ("--health-max-error-rate", "1.0"))
    try:
        yield fleet
    finally:
        await fleet.stop()
