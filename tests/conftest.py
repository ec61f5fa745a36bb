"""Shared fixtures: publisher keys, databases, a real control plane.

The helpers behind them live in ``tests/support``. Each test that takes ``pg_url`` gets a fresh
PostgreSQL database of its own; when the server is unreachable the test skips, except under CI
(CI=true), where it fails.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from tests.support.bundles import Publisher, make_publisher
from tests.support.containers import PostgresContainer, pg_source, service_images
from tests.support.control_plane import ControlPlane, cp_config, start_control_plane
from tests.support.services import PG_URL, pg_execute, run_in_thread, service_unavailable


@pytest.fixture
def publisher(tmp_path: Path) -> Publisher:
    """The publisher the control plane trusts."""
    return make_publisher(tmp_path / "keys")


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """The administrator URL of the PostgreSQL server: PG_URL, or a container of this session's
    own when tests/support/containers.py's rule says so."""
    if pg_source() == "local":
        yield PG_URL
        return
    server = PostgresContainer(service_images().postgres)
    try:
        server.start()
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def pg_url(pg_server: str) -> Iterator[str]:
    """A fresh PostgreSQL database for one test, dropped afterwards."""
    server = pg_server
    name = f"mf_test_{uuid.uuid4().hex[:12]}"
    try:
        run_in_thread(pg_execute(f'CREATE DATABASE "{name}"', server))
    except (OSError, TimeoutError, ImportError) as exc:
        service_unavailable(f"PostgreSQL at {server} is not reachable: {exc!r}")
    except Exception as exc:  # asyncpg's own errors: the server answered but refused
        service_unavailable(f"PostgreSQL at {server} refused to create a database: {exc!r}")
    try:
        yield make_url(server).set(database=name).render_as_string(hide_password=False)
    finally:
        run_in_thread(pg_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', server))


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each test that takes this runs on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'cp.db'}"
    return request.getfixturevalue("pg_url")


# --------------------------------------------------------------------------- control plane


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
