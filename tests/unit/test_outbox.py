"""agent/report/outbox.py: a cut window reaches the disk even when the agent stops mid-cut."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agent.config import AgentConfig
from agent.report.buffer import MetricsBuffer
from agent.report.metrics import MetricsRecorder
from agent.report.outbox import MetricsOutbox


async def test_a_window_cut_as_the_agent_stops_is_still_sent(tmp_path: Path) -> None:
    # The loop's cut takes the window from the recorder, then writes it in a worker thread. A
    # busy pool has not started that write when the stopping agent cancels the loop: the
    # window must still reach the disk, and drain() must send it (it once lost ~80 requests).
    loop = asyncio.get_running_loop()
    pool = ThreadPoolExecutor(1)
    loop.set_default_executor(pool)
    recorder = MetricsRecorder(datetime.now(UTC))
    for _ in range(80):
        recorder.record("iris", "1.0.0", 0.001, error=False)
    sent: list[dict[str, Any]] = []

    async def post(body: dict[str, Any]) -> None:
        sent.append(body)

    async def no_mqtt(kind: str, body: dict[str, Any]) -> bool:
        return False

    outbox = MetricsOutbox(
        agent_id="a1",
        config=AgentConfig(state_dir=tmp_path),
        recorder=recorder,
        buffer=MetricsBuffer(tmp_path / "metrics-buffer.db", max_batches=100),
        publish=no_mqtt,
        post=post,
        on_counts=lambda pending, dropped: None,
    )
    busy = threading.Event()
    blocker = loop.run_in_executor(pool, busy.wait, 10)  # the one worker is taken
    cut = asyncio.create_task(outbox.cut())
    await asyncio.sleep(0.05)  # the window is out of the recorder, its write queued
    cut.cancel()
    busy.set()
    await blocker
    await outbox.drain(5)
    requests = sum(s["requests"] for body in sent for s in body["series"])
    assert requests == 80
    assert outbox.buffer.pending() == 0
