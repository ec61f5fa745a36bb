"""The Alembic migrations build exactly the schema the models describe, on both databases."""

from __future__ import annotations

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect

from control_plane.db.engine import Database, alembic_config
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


async def test_the_latest_migration_goes_down_and_up_again(db_url: str) -> None:
    """A release that has to be rolled back runs the newest migration's downgrade: it must
    leave the schema of the revision before it, and upgrading again must rebuild it whole."""
    db = Database(db_url)
    try:
        await db.migrate()

        def down_one(conn):  # type: ignore[no-untyped-def]
            cfg = alembic_config()
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, "-1")
            return MigrationContext.configure(conn).get_current_revision()

        def head() -> str | None:
            return ScriptDirectory.from_config(alembic_config()).get_current_head()

        def tables(conn):  # type: ignore[no-untyped-def]
            return set(inspect(conn).get_table_names())

        async with db.engine.begin() as conn:
            before = await conn.run_sync(down_one)
        assert before is not None and before != head()
        async with db.engine.connect() as conn:
            left = await conn.run_sync(tables)
        assert set(Base.metadata.tables) - left, "the downgrade dropped nothing"
        await db.migrate()

        def diff(conn):  # type: ignore[no-untyped-def]
            ctx = MigrationContext.configure(conn, opts={"compare_type": True})
            return compare_metadata(ctx, Base.metadata)

        async with db.engine.connect() as conn:
            assert set(Base.metadata.tables) | {"alembic_version"} == await conn.run_sync(tables)
            assert await conn.run_sync(diff) == []
    finally:
        await db.close()
