"""Services the tests reach (PostgreSQL), and the rule for when one is missing.

PostgreSQL comes from MODELFLEET_TEST_POSTGRES_URL (default postgresql://postgres@127.0.0.1:5432
/test), or from a container (``tests/support/containers.py`` says when). When a service is
unreachable the test skips, except under CI (CI=true), where it fails.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
from typing import Any

import pytest
from sqlalchemy.engine import make_url

PG_URL = os.environ.get("MODELFLEET_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
IN_CI = os.environ.get("CI", "").lower() == "true"


def service_unavailable(reason: str) -> None:
    """Skip, or fail under CI where every service must be there."""
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: services must be running)")
    pytest.skip(reason)


async def _pg_admin(url: str) -> Any:
    import asyncpg

    u = make_url(url)
    return await asyncpg.connect(
        host=u.host,
        port=u.port or 5432,
        user=u.username,
        password=u.password,
        database=u.database,
        timeout=3,
    )


async def pg_execute(sql: str, url: str = PG_URL) -> None:
    """Run one statement on the database of ``url`` (PG_URL unless given) as its administrator."""
    conn = await _pg_admin(url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def run_in_thread(coro: Any) -> Any:
    """Run a coroutine to completion on a loop of its own (safe from any fixture)."""
    with concurrent.futures.ThreadPoolExecutor(1) as ex:
        return ex.submit(asyncio.run, coro).result()
