"""The status reporter: when a status report goes out, and its place in the order.

It owns the order of the agent's reports, (epoch, seq), and the wish to report: any part that
changed something the status shows calls ``changed()``; the loop sends a report at once then,
and as a heartbeat every ``heartbeat_s`` otherwise. A report that could not be sent is tried
again after a back-off.

(epoch, seq) only grows: the epoch is kept in the state dir and grows at every start
(StateDir.next_status_epoch: one fsync a start, none a report), seq counts reports since in
memory. The control plane stores a report only when it is newer than the one it holds, so one
delivered late (by a broker after an outage, after a newer one went over HTTP) changes
nothing; the agent does not resend a report it was told is stale.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from agent.exceptions import TransportError
from agent.storage.state import StateDir
from protocol.backoff import Backoff
from protocol.reports import StatusReport

log = logging.getLogger("modelfleet.agent")


class StatusReporter:
    """Numbers and sends the agent's status reports."""

    def __init__(
        self,
        *,
        report: Callable[[], StatusReport],
        send: Callable[[dict[str, Any]], Awaitable[None]],
        heartbeat_s: float,
        before_report: Callable[[], None],
    ) -> None:
        self._report = report  # builds the report now (numbered by next_number)
        self._send = send  # raises TransportError
        self._before_report = before_report
        self.heartbeat_s = heartbeat_s
        self._dirty = asyncio.Event()
        self._epoch = 0
        self._seq = 0

    async def open(self, dirs: StateDir) -> None:
        """Take this run's epoch from the state dir (before the first report)."""
        self._epoch = await asyncio.to_thread(dirs.next_status_epoch, time.time())

    def reconfigure(self, heartbeat_s: float) -> None:
        self.heartbeat_s = heartbeat_s

    def next_number(self) -> tuple[int, int]:
        """(epoch, seq) of the next report, after every one numbered before it."""
        self._seq += 1
        return self._epoch, self._seq

    def changed(self) -> None:
        """Something the status shows changed: report soon."""
        self._dirty.set()

    async def run(self) -> None:
        backoff = Backoff()
        while True:
            try:
                async with asyncio.timeout(self.heartbeat_s):
                    await self._dirty.wait()
            except TimeoutError:
                pass
            self._dirty.clear()
            self._before_report()
            try:
                await self._send(self._report().to_json())
                backoff.reset()
            except TransportError as exc:
                log.warning("status report failed: %s", exc)
                await asyncio.sleep(backoff.next_delay())
                self._dirty.set()
