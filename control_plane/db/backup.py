"""Backup and restore of a SQLite database with SQLite's online backup API.

A backup is consistent while the server runs; a restore replaces the database and wants the
server stopped. PostgreSQL has its own tools (``pg_dump``/``pg_restore``), so a database URL
of any other kind is refused with a ``BackupError`` saying so.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from sqlalchemy.engine import make_url

from control_plane.errors import ConfigError


class BackupError(ConfigError):
    """The backup or restore cannot be done; the message says why."""


def sqlite_path(database_url: str) -> Path:
    """The file of a SQLite database URL; raises BackupError for any other database."""
    url = make_url(database_url)
    if not url.drivername.startswith("sqlite") or not url.database:
        raise BackupError(
            "db backup/restore handle SQLite; for PostgreSQL use pg_dump / pg_restore "
            "(see README, Operations)"
        )
    return Path(url.database)


def backup(src: Path, out: Path) -> None:
    """Copy the live database ``src`` to a new file ``out`` (0600); raises BackupError."""
    if not src.is_file():
        raise BackupError(f"no database at {src}")
    if out.exists():
        raise BackupError(f"{out} exists; choose a new file")
    with sqlite3.connect(src) as source, sqlite3.connect(out) as dest:
        source.backup(dest)
    out.chmod(0o600)


def restore(backup_file: Path, dest: Path) -> None:
    """Replace ``dest`` with a modelfleet database ``backup_file``; raises BackupError."""
    try:
        with sqlite3.connect(f"file:{backup_file}?mode=ro", uri=True) as check:
            tables = {r[0] for r in check.execute("SELECT name FROM sqlite_master")}
    except sqlite3.DatabaseError as exc:
        raise BackupError(f"{backup_file} is not a SQLite database: {exc}") from None
    if "alembic_version" not in tables:
        raise BackupError(f"{backup_file} is not a modelfleet database (no alembic_version)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(backup_file) as source, sqlite3.connect(dest) as target:
        source.backup(target)
