"""The on-disk buffer of metric batches, so reports survive a lost link and a restart.

A SQLite file in the state directory. Each batch takes its sequence number in the same
transaction that stores it, so a number is never used twice, even across a crash. When the
buffer is full the oldest batches go first, and the drop is counted and reported. Blocking:
call the methods from a worker thread.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any


class MetricsBuffer:
    """Pending metric batches, oldest first."""

    def __init__(self, path: Path, max_batches: int) -> None:
        self.max_batches = max_batches
        # One connection, called from worker threads: an append is several statements in one
        # transaction, so calls never interleave (an ack between them would join it).
        self._lock = threading.RLock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("CREATE TABLE IF NOT EXISTS batches (seq INTEGER PRIMARY KEY, body TEXT)")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)"
        )
        self._db.execute("INSERT OR IGNORE INTO meta VALUES ('next_seq', 1), ('dropped', 0)")

    def _meta(self, key: str) -> int:
        return int(self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()[0])

    def append(self, make: Callable[[int, int], dict[str, Any]]) -> int:
        """Store ``make(seq, dropped_so_far)`` under the next seq; return the seq."""
        with self._lock:
            with self._db:  # one transaction: seq taken, batch stored, overflow dropped
                self._db.execute("BEGIN IMMEDIATE")
                seq = self._meta("next_seq")
                body = make(seq, self._meta("dropped"))
                self._db.execute("INSERT INTO batches VALUES (?, ?)", (seq, json.dumps(body)))
                self._db.execute("UPDATE meta SET value=? WHERE key='next_seq'", (seq + 1,))
                overflow = self.pending() - self.max_batches
                if overflow > 0:
                    self._db.execute(
                        "DELETE FROM batches WHERE seq IN "
                        "(SELECT seq FROM batches ORDER BY seq LIMIT ?)",
                        (overflow,),
                    )
                    self._db.execute(
                        "UPDATE meta SET value=value+? WHERE key='dropped'", (overflow,)
                    )
            return seq

    def oldest(self) -> tuple[int, dict[str, Any]] | None:
        """The oldest pending batch, or None."""
        with self._lock:
            row = self._db.execute("SELECT seq, body FROM batches ORDER BY seq LIMIT 1").fetchone()
            return (row[0], json.loads(row[1])) if row else None

    def batch(self, limit: int) -> list[tuple[int, dict[str, Any]]]:
        """Up to ``limit`` pending batches, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, body FROM batches ORDER BY seq LIMIT ?", (limit,)
            ).fetchall()
            return [(seq, json.loads(body)) for seq, body in rows]

    def ack(self, seq: int) -> None:
        """Forget a batch the control plane has stored."""
        with self._lock:
            self._db.execute("DELETE FROM batches WHERE seq=?", (seq,))

    def pending(self) -> int:
        """How many batches wait to be sent."""
        with self._lock:
            return int(self._db.execute("SELECT count(*) FROM batches").fetchone()[0])

    def dropped(self) -> int:
        """How many batches were dropped because the buffer was full."""
        with self._lock:
            return self._meta("dropped")

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()
