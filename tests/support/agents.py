"""Helpers to run a real agent in-process against a control plane, and a MITM proxy."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp

from agent.client import enroll
from agent.config import AgentConfig
from agent.daemon import Agent
from agent.storage.state import Identity, StateDir
from tests.support.control_plane import ControlPlane


async def resolves_to(awaitable: Awaitable[Any], want: Any) -> bool:
    """For ``eventually``: whether ``awaitable`` gives ``want``."""
    return await awaitable == want


def serving(agent: Agent, model: str, version: str) -> bool:
    """For ``eventually``: whether ``agent`` serves ``version`` of ``model`` (False, not a
    KeyError, while the model is not loaded yet)."""
    loaded = agent.models.get(model)
    return loaded is not None and loaded.version == version


async def eventually(
    check: Callable[[], Awaitable[Any] | Any], within_s: float = 15.0, interval: float = 0.05
) -> Any:
    """Poll ``check`` (plain or async) until it gives something truthy; fail with its last value."""
    deadline = time.monotonic() + within_s
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if inspect.isawaitable(last):
            last = await last
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"condition not met within {within_s}s; last value: {last!r}")


async def enroll_agent(
    cp: ControlPlane,
    state_dir: Path,
    labels: dict[str, str],
    server: str | None = None,
    facts: dict[str, Any] | None = None,
) -> Identity:
    """Enroll through the real API and write the state dir as ``agent enroll`` does."""
    r = await cp.call("POST", "/enrollment-tokens", json={"labels": labels})
    token = (await r.json())["token"]
    url = server or cp.url
    out = await enroll(url, token, None, {}, facts or {"cpuCount": 1})
    identity = Identity(
        out["agentId"], url, out["credential"], out["name"], out["labels"], out.get("mqtt")
    )
    StateDir(state_dir).save_enrollment(
        identity, out["controlPlaneKey"], out["trustedPublishers"], out.get("keyset")
    )
    return identity


@asynccontextmanager
async def running_agent(state_dir: Path, **overrides: Any) -> AsyncIterator[Agent]:
    """An agent daemon on a free loopback port with fast loops."""
    settings: dict[str, Any] = {
        "serve_port": 0,
        "heartbeat_s": 0.5,
        "poll_wait_s": 2.0,
        "metrics_interval_s": 0.3,
        "drain_s": 2.0,
    }
    config = AgentConfig(state_dir=state_dir, **{**settings, **overrides})
    async with Agent(config) as agent:
        yield agent


async def infer(port: int, model: str = "iris", body: Any = None) -> tuple[int, Any]:
    """POST an Open Inference Protocol request to an agent."""
    body = body or {
        "inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [5.1, 3.5, 1.4, 0.2]}]
    }
    async with aiohttp.ClientSession() as s:
        kw = {"data": body} if isinstance(body, bytes) else {"json": body}
        async with s.post(f"http://127.0.0.1:{port}/v2/models/{model}/infer", **kw) as r:
            return r.status, await r.json()


async def active_version(cp: ControlPlane, agent_id: str, model: str = "iris") -> str | None:
    """The version the control plane sees active on an agent."""
    a = await (await cp.call("GET", f"/agents/{agent_id}")).json()
    for m in a["models"]:
        if m["name"] == model and m["state"] == "active":
            return m["version"]
    return None


async def wait_active(cp: ControlPlane, agent_id: str, version: str, within_s: float = 15) -> None:
    """Wait until the control plane sees ``version`` of iris active on the agent."""

    async def check() -> bool:
        return await active_version(cp, agent_id) == version

    await eventually(check, within_s)


class Load:
    """Inference requests in a loop against one agent, counting what came back."""

    def __init__(self, port: int, body: Any = None, model: str = "iris") -> None:
        self.port = port
        self.body = body
        self.model = model
        self.statuses: dict[int, int] = {}
        self.versions: set[str] = set()
        self.failures: list[Any] = []
        self.transport_errors = 0
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        url = f"http://127.0.0.1:{self.port}/v2/models/{self.model}/infer"
        body = self.body or {
            "inputs": [
                {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [5.1, 3.5, 1.4, 0.2]}
            ]
        }
        async with aiohttp.ClientSession() as s:
            # Stops between requests, never inside one: every request sent is counted.
            while not self._stop.is_set():
                try:
                    async with s.post(url, json=body) as r:
                        out = await r.json()
                except aiohttp.ClientError:
                    self.transport_errors += 1
                    continue
                self.statuses[r.status] = self.statuses.get(r.status, 0) + 1
                if r.status == 200:
                    self.versions.add(out["model_version"])
                else:
                    self.failures.append(out)
                await asyncio.sleep(0.002)

    @property
    def ok(self) -> int:
        return self.statuses.get(200, 0)

    async def __aenter__(self) -> Load:
        self._task = asyncio.create_task(self._run(), name="test-load")
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._stop.set()
        await self._task
