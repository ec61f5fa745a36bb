"""Desired-state changes across replicas through PostgreSQL LISTEN/NOTIFY.

A replica that changes agents' desired state sends their ids on one channel; every replica
listening wakes its own long-polls at once, rather than at its next database re-read.
"""

from __future__ import annotations

import asyncio
import logging

import asyncpg
from sqlalchemy.engine import make_url

from control_plane.notify import DesiredNotifier
from protocol.backoff import Backoff

log = logging.getLogger("modelfleet.control_plane.pgnotify")
CHANNEL = "modelfleet_desired"
MAX_PAYLOAD = 7000  # NOTIFY payloads must stay under 8,000 bytes


class PgNotifyBridge:
    """Sends this replica's changes and wakes its waiters on everyone's."""

    def __init__(self, url: str, notifier: DesiredNotifier) -> None:
        u = make_url(url)
        self.connect_args = {
            "host": u.host, "port": u.port or 5432, "user": u.username,
            "password": u.password, "database": u.database,
        }  # fmt: skip
        self.notifier = notifier
        self.outbox: asyncio.Queue[list[str]] = asyncio.Queue()
        self.received = 0

    def send(self, agent_ids: list[str]) -> None:
        """A notifier listener: queue these ids for the other replicas."""
        if agent_ids:
            self.outbox.put_nowait(list(agent_ids))

    def _on_notify(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        self.received += 1
        self.notifier.wake(filter(None, payload.split(",")))

    async def run(self) -> None:
        """Listen and send; reconnect with jittered back-off when the connection drops."""
        backoff = Backoff()
        while True:
            try:
                conn = await asyncpg.connect(**self.connect_args, timeout=10)
            except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
                delay = backoff.next_delay()
                log.warning("LISTEN connection failed (%s); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                continue
            backoff.reset()
            try:
                await conn.add_listener(CHANNEL, self._on_notify)
                while True:
                    ids = await self.outbox.get()
                    for payload in _payloads(ids):
                        await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, payload)
            except (OSError, asyncpg.PostgresError) as exc:
                log.warning("LISTEN connection lost: %s", exc)
            finally:
                await conn.close(timeout=5)


def _payloads(ids: list[str]) -> list[str]:
    out, current = [], ""
    for agent_id in ids:
        if current and len(current) + len(agent_id) + 1 > MAX_PAYLOAD:
            out.append(current)
            current = ""
        current = f"{current},{agent_id}" if current else agent_id
    if current:
        out.append(current)
    return out
