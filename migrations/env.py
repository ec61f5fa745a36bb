"""Alembic environment: async engine through ``run_sync``, batch mode on SQLite.

The server hands its own connection in ``config.attributes["connection"]``; the ``alembic``
command line goes through ``sqlalchemy.url`` (or ``MODELFLEET_DB``) instead.
"""

from __future__ import annotations

import asyncio
import os

from alembic import context
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from control_plane.db.models import Base

config = context.config
target_metadata = Base.metadata


def do_run_migrations(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        transaction_per_migration=True,
    )
    with context.begin_transaction():
        context.run_migrations()


async def run_async_migrations(url: str) -> None:
    engine = create_async_engine(url)
    async with engine.begin() as conn:
        await conn.run_sync(do_run_migrations)
    await engine.dispose()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        do_run_migrations(connection)
        return
    url = os.environ.get("MODELFLEET_DB") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise SystemExit("set MODELFLEET_DB or sqlalchemy.url to the database URL")
    asyncio.run(run_async_migrations(url))


if context.is_offline_mode():
    raise SystemExit("offline migrations are not supported; run them against a database")
run_migrations_online()
