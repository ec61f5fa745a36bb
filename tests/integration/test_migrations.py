"""The Alembic migrations build exactly the schema the models describe, on both databases."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from control_plane.db.engine import Database
from control_plane.db.models import Base


async def test_migrations_match_models_and_rerun_cleanly(db_url: str) -> None:
    db = Database(db_url)
    try:
        await db.migrate()
        await db.migrate()  # a second run is a no-op

        def diff(conn):  # type: ignore[no-untyped-def]
            ctx = MigrationContext.configure(conn, opts={"compare_type": True})
            return compare_metadata(ctx, Base.metadata)

        def tables(conn):  # type: ignore[no-untyped-def]
            return set(inspect(conn).get_table_names())

        async with db.engine.connect() as conn:
            assert await conn.run_sync(diff) == []
            assert set(Base.metadata.tables) | {"alembic_version"} == await conn.run_sync(tables)
    finally:
        await db.close()
