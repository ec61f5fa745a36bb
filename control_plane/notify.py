"""Wakes long-polls when an agent's desired state changes in this process."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable


class DesiredNotifier:
    """One condition per agent id that is waited on; notify wakes every waiter of those ids."""

    def __init__(self) -> None:
        self._events: dict[str, asyncio.Event] = {}
        self._waiters: dict[str, int] = {}
        self.listeners: list[Callable[[list[str]], None]] = []  # e.g. the MQTT publisher

    async def wait(self, agent_id: str, max_wait_s: float) -> bool:
        """Wait up to ``max_wait_s`` seconds for a change; True when notified."""
        event = self._events.setdefault(agent_id, asyncio.Event())
        self._waiters[agent_id] = self._waiters.get(agent_id, 0) + 1
        try:
            async with asyncio.timeout(max_wait_s):
                await event.wait()
            return True
        except TimeoutError:
            return False
        finally:
            self._waiters[agent_id] -= 1
            if not self._waiters[agent_id]:
                del self._waiters[agent_id]
                self._events.pop(agent_id, None)

    def notify(self, agent_ids: Iterable[str]) -> None:
        """This replica changed these agents: tell the listeners and wake the waiters."""
        agent_ids = list(agent_ids)
        for listener in self.listeners:
            listener(agent_ids)
        self.wake(agent_ids)

    def wake(self, agent_ids: Iterable[str]) -> None:
        """Wake the waiters of these agents only (a change another replica made)."""
        for agent_id in agent_ids:
            event = self._events.pop(agent_id, None)
            if event is not None:
                event.set()
