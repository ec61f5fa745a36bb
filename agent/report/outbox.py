"""The metrics outbox: windows of the metrics recorder, numbered batches on disk, delivery.

Every ``metrics_interval_s`` the recorder's window is cut into a batch with a sequence number
persisted before use (agent/report/buffer.py), and the buffered batches are sent oldest first.

Over HTTP a batch goes when the control plane answers that it stored it. Over MQTT the
broker's PUBACK is not enough (a broker restart can lose what it had in flight to the control
plane): the batch stays until the control plane's metrics/ack names it (``acked``), and is
sent again (by MQTT or HTTP) if that does not come within metrics_ack_timeout_s, or when the
link changes (``link_changed``). Its seq makes every resend harmless.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from agent.config import AgentConfig
from agent.exceptions import TransportError
from agent.report.buffer import MetricsBuffer
from agent.report.metrics import MetricsRecorder
from protocol.backoff import Backoff
from protocol.reports import MetricsBatch

log = logging.getLogger("modelfleet.agent")


class MetricsOutbox:
    """Cuts, buffers and delivers the agent's metrics batches."""

    def __init__(
        self,
        *,
        agent_id: str,
        config: AgentConfig,
        recorder: MetricsRecorder,
        buffer: MetricsBuffer,
        publish: Callable[[str, dict[str, Any]], Awaitable[bool]],
        post: Callable[[dict[str, Any]], Awaitable[None]],
        on_counts: Callable[[int, int], None],
    ) -> None:
        self.agent_id = agent_id
        self.config = config  # intervals and the ack timeout: a reload replaces it
        self.recorder = recorder
        self.buffer = buffer
        self._publish = publish  # over MQTT: False when the link cannot take it
        self._post = post  # over HTTP: raises TransportError
        self._on_counts = on_counts  # (pending, dropped) after every change
        self.in_flight: dict[int, float] = {}  # seq -> when published over MQTT, unacked
        self.pending = 0
        self._writing: asyncio.Future[int] | None = None  # a cut window on its way to disk

    def reconfigure(self, config: AgentConfig) -> None:
        self.config = config

    def link_changed(self) -> None:
        """The MQTT link went down or up: what was in flight may never be acknowledged (a
        broker gone, or restarted): send every unacknowledged batch again at the next flush,
        over HTTP while the broker is away."""
        self.in_flight.clear()

    async def cut(self) -> None:
        """Close the recorder's window into a numbered batch on disk (none when empty)."""
        window = self.recorder.take_window(datetime.now(UTC))
        if window is None:
            return

        def make(seq: int, dropped: int) -> dict[str, Any]:
            batch = MetricsBatch(
                self.agent_id,
                seq,
                window.start,
                window.end,
                window.series,
                extra={"droppedBatches": dropped},
            )
            return batch.to_json()

        # The window has left the recorder: it must reach the disk even if this task is
        # cancelled now (the agent stopping), or its requests are lost. A cancelled to_thread
        # that had not started yet never runs; shielded, it does, and drain() waits for it.
        self._writing = asyncio.ensure_future(asyncio.to_thread(self.buffer.append, make))
        await asyncio.shield(self._writing)
        await self._count()

    async def _count(self) -> None:
        pending, dropped = await asyncio.to_thread(
            lambda: (self.buffer.pending(), self.buffer.dropped())
        )
        self.pending = pending
        self._on_counts(pending, dropped)

    async def acked(self, seq: int) -> None:
        """The control plane stored batch ``seq`` (said over MQTT): forget it."""
        self.in_flight.pop(seq, None)
        await asyncio.to_thread(self.buffer.ack, seq)
        await self._count()

    async def flush(self) -> None:
        """Send buffered batches oldest first; raises TransportError when the link fails."""
        try:
            now = time.monotonic()
            for seq, body in await asyncio.to_thread(self.buffer.batch, 200):
                sent = self.in_flight.get(seq)
                if sent is not None and now - sent < self.config.metrics_ack_timeout_s:
                    continue  # on its way; the acknowledgement will let it go
                if await self._publish("metrics", body):
                    self.in_flight[seq] = time.monotonic()
                    continue
                await self._post(body)
                self.in_flight.pop(seq, None)
                await asyncio.to_thread(self.buffer.ack, seq)
        finally:
            await self._count()

    async def run(self) -> None:
        backoff = Backoff()
        while True:
            await asyncio.sleep(self.config.metrics_interval_s)
            await self.cut()
            try:
                await self.flush()
                backoff.reset()
            except TransportError as exc:
                log.warning("metrics report failed (%d buffered): %s", self.pending, exc)
                await asyncio.sleep(backoff.next_delay())

    async def drain(self, within_s: float) -> None:
        """At shutdown: cut the last window and try once to send everything."""
        if self._writing is not None:
            await self._writing  # a window the stopped loop was writing to disk
        await self.cut()
        try:
            async with asyncio.timeout(within_s):
                await self.flush()
        except (TimeoutError, TransportError):
            log.warning("%d metrics batch(es) stay buffered on disk", self.buffer.pending())
