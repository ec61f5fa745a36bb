"""Desired-state changes across replicas through PostgreSQL LISTEN/NOTIFY.

A replica that changes agents' desired state sends their ids on one channel; every replica
listening wakes its own long-polls at once, rather than at its next database re-read.

Anyone who can connect to the database can NOTIFY on the channel: a payload that is not a list
of agent ids is counted and dropped, and nothing a notification or the connection does ends the
listener loop (it reconnects with back-off). A lost notification costs only latency: every
long-poll re-reads the database at its own interval.
"""

from __future__ import annotations

import asyncio
import logging
import re

import asyncpg
from sqlalchemy.engine import make_url

from control_plane.fleet.notify import DesiredNotifier
from control_plane.setaside import is_transient, printable, reason_of
from protocol.backoff import Backoff

log = logging.getLogger("modelfleet.control_plane.pgnotify")
CHANNEL = "modelfleet_desired"
MAX_PAYLOAD = 7000  # NOTIFY payloads must stay under 8,000 bytes
_AGENT_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


class PgNotifyBridge:
    """Sends this replica's changes and wakes its waiters on everyone's."""

    def __init__(self, url: str, notifier: DesiredNotifier) -> None:
        u = make_url(url)
        self.connect_args = {
            "host": u.host,
            "port": u.port or 5432,
            "user": u.username,
            "password": u.password,
            "database": u.database,
        }
        self.notifier = notifier
        self.outbox: asyncio.Queue[list[str]] = asyncio.Queue()
        self.received = 0

    def send(self, agent_ids: list[str]) -> None:
        """A notifier listener: queue these ids for the other replicas."""
        if agent_ids:
            self.outbox.put_nowait(list(agent_ids))

    def _on_notify(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        self.received += 1
        try:
            ids = ids_of(payload)
            self.notifier.wake(ids)
        except Exception as exc:
            # Deliberate boundary: asyncpg calls this from its protocol; whatever a payload
            # does, the connection and the loop stay up.
            self.notifier.count_set_aside("NOTIFY payload", reason_of(exc))

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
            try:
                await conn.add_listener(CHANNEL, self._on_notify)
                backoff.reset()
                while True:
                    ids = await self.outbox.get()
                    for payload in _payloads(ids):
                        await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, payload)
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("LISTEN connection lost: %s", exc)
            except Exception as exc:
                if is_transient(exc):
                    log.warning("LISTEN connection lost: %s", exc)
                else:
                    # Deliberate boundary: this loop is the only way other replicas' changes
                    # reach this one at once; it reconnects rather than ends.
                    log.exception("LISTEN loop failed; reconnecting")
            finally:
                await _close(conn)
            await asyncio.sleep(backoff.next_delay())


def ids_of(payload: object) -> list[str]:
    """The agent ids of a NOTIFY payload; raises ValueError for anything else."""
    if not isinstance(payload, str) or len(payload) > 8000:
        raise ValueError("the payload is not a short string")
    ids = [p for p in payload.split(",") if p]
    bad = [p for p in ids if not _AGENT_ID.fullmatch(p)]
    if bad:
        raise ValueError(f"not agent ids: {printable(bad[0], 60)!s} ({len(bad)} of {len(ids)})")
    return ids


async def _close(conn: asyncpg.Connection) -> None:
    try:
        await conn.close(timeout=5)
    except Exception as exc:
        # Deliberate boundary: a connection that will not close cleanly is dropped anyway.
        log.debug("closing the LISTEN connection: %s", reason_of(exc))
        conn.terminate()


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
