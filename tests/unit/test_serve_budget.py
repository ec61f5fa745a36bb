"""The serve app's byte budget: bodies held at once never add up past it."""

from __future__ import annotations

import asyncio

from agent.serving.app import ByteBudget


async def test_a_body_waits_for_its_share_and_gets_it_when_one_is_given_back() -> None:
    budget = ByteBudget(100)
    assert await budget.take(60, within_s=1)
    assert not await budget.take(60, within_s=0.05)  # 120 > 100: waits, then gives up
    assert budget.free == 40
    waiting = asyncio.create_task(budget.take(60, within_s=5))
    await asyncio.sleep(0.01)
    assert not waiting.done()
    await budget.give(60)
    assert await waiting and budget.free == 40
    # A body larger than the whole budget takes all of it (it is under max_request_bytes).
    await budget.give(60)
    assert await budget.take(500, within_s=1) and budget.free == 0
    await budget.give(500)
    assert budget.free == 100
