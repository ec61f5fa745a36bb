"""A real control plane on a loopback port, driven through its HTTP API."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient, TestServer
from sqlalchemy import func, select

from control_plane.app import create_app
from control_plane.config import ServerConfig
from control_plane.db.engine import Database
from control_plane.db.models import MetricSeries
from protocol.bundle import MEDIA_TYPE
from tests.support.bundles import Publisher


@dataclass
class ControlPlane:
    """A real control plane on a loopback port, with its admin token."""

    client: TestClient
    token: str
    config: ServerConfig

    @property
    def url(self) -> str:
        return str(self.client.make_url("")).rstrip("/")

    async def call(
        self, method: str, path: str, token: str | None = None, **kw: Any
    ) -> ClientResponse:
        headers = kw.pop("headers", {})
        tok = self.token if token is None else token
        if tok:
            headers["Authorization"] = f"Bearer {tok}"
        return await self.client.request(method, f"/api/v1{path}", headers=headers, **kw)

    async def push(self, bundle: bytes, token: str | None = None) -> ClientResponse:
        return await self.call(
            "POST", "/bundles", token, data=bundle, headers={"Content-Type": MEDIA_TYPE}
        )

    async def enroll(
        self, labels: dict[str, str] | None = None, name: str | None = None
    ) -> dict[str, Any]:
        r = await self.call("POST", "/enrollment-tokens", json={"labels": labels or {}})
        assert r.status == 201, await r.text()
        token = (await r.json())["token"]
        body: dict[str, Any] = {"token": token, "labels": {}}
        if name:
            body["name"] = name
        r = await self.call("POST", "/agents/enroll", token="", json=body)
        assert r.status == 201, await r.text()
        return await r.json()

    async def rollout(
        self, version: str = "1.0.0", selector: str = "", model: str = "iris", **extra: Any
    ) -> dict[str, Any]:
        body = {"model": model, "version": version, "selector": selector, **extra}
        r = await self.call("POST", "/rollouts", json=body)
        assert r.status == 201, await r.text()
        return await r.json()


async def start_control_plane(config: ServerConfig, port: int | None = None) -> ControlPlane:
    """Start the app on 127.0.0.1 (a free port unless given) and read its admin token."""
    client = TestClient(TestServer(create_app(config), host="127.0.0.1", port=port))
    await client.start_server()
    token = (config.data_dir / "admin-token").read_text().strip()
    return ControlPlane(client, token, config)


def cp_config(tmp_path: Path, db_url: str, publisher: Publisher) -> ServerConfig:
    """Configuration of a test control plane that trusts ``publisher``."""
    return ServerConfig(
        data_dir=tmp_path / "cp",
        db_url=db_url,
        trusted_publisher_files=(publisher.pub_path,),
        long_poll_recheck_s=0.5,
        rollup_interval_s=3600,  # tests that roll up call control_plane.metrics.rollup themselves
    )


async def stop_controller_loop() -> None:
    """Cancel the running control plane's rollout-controller loop, for a test that ticks the
    controller itself on a clock it moves: a loop tick holding a rollout's row lock would make
    the test's own ticks skip it (PostgreSQL's SKIP LOCKED) and decide on the clock of before."""
    loops = [t for t in asyncio.all_tasks() if t.get_name() == "rollout-controller"]
    assert len(loops) == 1, f"expected one rollout-controller loop, found {len(loops)}"
    loops[0].cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await loops[0]


async def stored_requests(cp: ControlPlane) -> int:
    """How many inference requests the control plane has stored in its metric series."""
    db = Database(cp.config.database_url)
    try:
        async with db.read() as s:
            return int(await s.scalar(select(func.coalesce(func.sum(MetricSeries.requests), 0))))
    finally:
        await db.close()


async def assert_error(
    r: ClientResponse, status: int, code: str | None = None, field: str | None = None
) -> dict[str, Any]:
    """Assert an error answer: this status, the one error shape, and this code and field."""
    assert r.status == status, await r.text()
    body = await r.json()
    assert set(body) == {"error"} and body["error"]["message"]
    if code:
        assert body["error"]["code"] == code
    if field:
        assert body["error"].get("field") == field
    return body


@contextlib.asynccontextmanager
async def fast_control_plane(tmp_path: Path, publisher: Publisher) -> AsyncIterator[ControlPlane]:
    """A control plane on SQLite whose rollout controller looks five times a second."""
    config = dataclasses.replace(
        cp_config(tmp_path, f"sqlite:///{tmp_path / 'cp.db'}", publisher),
        controller_interval_s=0.2,
    )
    plane = await start_control_plane(config)
    try:
        yield plane
    finally:
        await plane.client.close()
