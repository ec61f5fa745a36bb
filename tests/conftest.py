"""Shared fixtures: publisher keys, bundles made in code, databases, a real control plane.

PostgreSQL comes from MODELFLEET_TEST_POSTGRES_URL (default postgresql://postgres@127.0.0.1:5432
/test); each test gets a fresh database of its own. When the server is unreachable the test
skips, except under CI (CI=true), where it fails.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import io
import os
import tarfile
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient, TestServer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy.engine import make_url

from control_plane.app import create_app
from control_plane.cli.publish import build_bundle
from control_plane.config import ServerConfig
from protocol.bundle import MEDIA_TYPE
from protocol.dsse import generate_private_key, private_key_to_pem, public_key_to_pem
from tests.modelgen import SMOKE_INPUT, iris_model, iris_reference

PG_URL = os.environ.get("MODELFLEET_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
IN_CI = os.environ.get("CI", "").lower() == "true"


def service_unavailable(reason: str) -> None:
    """Skip, or fail under CI where every service must be there."""
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: services must be running)")
    pytest.skip(reason)


# ------------------------------------------------------------------------------ keys, bundles


@dataclass
class Publisher:
    """A publisher key pair on disk."""

    key: Ed25519PrivateKey
    key_path: Path
    pub_path: Path


def make_publisher(directory: Path, name: str = "publisher") -> Publisher:
    """A fresh key pair written as NAME.key / NAME.pub."""
    directory.mkdir(parents=True, exist_ok=True)
    key = generate_private_key()
    kp, pp = directory / f"{name}.key", directory / f"{name}.pub"
    kp.write_bytes(private_key_to_pem(key))
    pp.write_bytes(public_key_to_pem(key.public_key()))
    return Publisher(key, kp, pp)


@pytest.fixture
def publisher(tmp_path: Path) -> Publisher:
    """The publisher the control plane trusts."""
    return make_publisher(tmp_path / "keys")


def npy(arr: np.ndarray) -> bytes:
    """An array as .npy bytes."""
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def iris_bundle(
    key: Ed25519PrivateKey,
    version: str = "1.0.0",
    seed: int = 0,
    smoke: bool = True,
    name: str = "iris",
    model: bytes | None = None,
    runtime: str = "onnx",
    smoke_rows: int = 2,
    **kw: Any,
) -> bytes:
    """A signed bundle of the tiny iris model, with a smoke test computed by numpy."""
    x = SMOKE_INPUT[:smoke_rows]
    s = (npy(x), npy(iris_reference(x, seed))) if smoke else None
    data, _ = build_bundle(
        model or iris_model(seed), name, version, [key], s, runtime=runtime, **kw
    )
    return data


def bundle_members(data: bytes) -> dict[str, bytes]:
    """The members of a bundle tar, by name."""
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        return {m.name: t.extractfile(m).read() for m in t.getmembers()}  # type: ignore[union-attr]


def tar_of(files: dict[str, bytes], extra: list[tarfile.TarInfo] | None = None) -> bytes:
    """A tar of these members (plus header-only ones), to build hostile bundles."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
        for info in extra or []:
            t.addfile(info)
    return buf.getvalue()


# ------------------------------------------------------------------------------- databases


async def _pg_admin() -> Any:
    import asyncpg

    u = make_url(PG_URL)
    return await asyncpg.connect(
        host=u.host,
        port=u.port or 5432,
        user=u.username,
        password=u.password,
        database=u.database,
        timeout=3,
    )


async def _pg_execute(sql: str) -> None:
    conn = await _pg_admin()
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def run_in_thread(coro: Any) -> Any:
    """Run a coroutine to completion on a loop of its own (safe from any fixture)."""
    with concurrent.futures.ThreadPoolExecutor(1) as ex:
        return ex.submit(asyncio.run, coro).result()


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for one test, dropped afterwards."""
    name = f"mf_test_{uuid.uuid4().hex[:12]}"
    try:
        run_in_thread(_pg_execute(f'CREATE DATABASE "{name}"'))
    except (OSError, TimeoutError, ImportError) as exc:
        service_unavailable(f"PostgreSQL at {PG_URL} is not reachable: {exc!r}")
    except Exception as exc:  # asyncpg's own errors: the server answered but refused
        service_unavailable(f"PostgreSQL at {PG_URL} refused to create a database: {exc!r}")
    try:
        yield make_url(PG_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        run_in_thread(_pg_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each test that takes this runs on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'cp.db'}"
    return request.getfixturevalue("pg_url")


# --------------------------------------------------------------------------- control plane


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
        rollup_interval_s=3600,  # tests that roll up call control_plane.rollup themselves
    )


@pytest.fixture
async def cp(tmp_path: Path, db_url: str, publisher: Publisher) -> AsyncIterator[ControlPlane]:
    """A control plane on SQLite or PostgreSQL that trusts ``publisher``."""
    plane = await start_control_plane(cp_config(tmp_path, db_url, publisher))
    try:
        yield plane
    finally:
        await plane.client.close()
        await asyncio.sleep(0)


@pytest.fixture
async def cp_sqlite(tmp_path: Path, publisher: Publisher) -> AsyncIterator[ControlPlane]:
    """A control plane on SQLite only, for agent behaviour that does not depend on the DB."""
    plane = await start_control_plane(
        cp_config(tmp_path, f"sqlite:///{tmp_path / 'cp.db'}", publisher)
    )
    try:
        yield plane
    finally:
        await plane.client.close()
