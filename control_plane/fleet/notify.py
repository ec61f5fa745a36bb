"""Wakes long-polls when an agent's desired state changes in this process.

A listener that raises (the MQTT publisher, the PostgreSQL NOTIFY sender) is logged and
counted; it never breaks the caller that changed the desired state, nor the other listeners,
nor the waking of this process's own long-polls.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable

from control_plane.setaside import printable, reason_of

log = logging.getLogger("modelfleet.control_plane.notify")


class DesiredNotifier:
    """One condition per agent id that is waited on; notify wakes every waiter of those ids."""

    def __init__(self) -> None:
        self._events: dict[str, asyncio.Event] = {}
        self._waiters: dict[str, int] = {}
        self.listeners: list[Callable[[list[str]], None]] = []  # e.g. the MQTT publisher
        self.set_aside = 0  # listeners that raised and notifications that were garbage

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
            try:
                listener(agent_ids)
            except Exception as exc:
                # Deliberate boundary: the change is committed whatever a listener does, and
                # the waiters here and the other listeners must still hear of it.
                self.count_set_aside(
                    f"listener {getattr(listener, '__qualname__', listener)}", reason_of(exc)
                )
        self.wake(agent_ids)

    def count_set_aside(self, what: str, reason: str) -> None:
        """Count and log a notification that could not be passed on."""
        self.set_aside += 1
        log.warning(
            "desired-state notification set aside: %s: %s", printable(what, 200), printable(reason)
        )

    def wake_all(self) -> None:
        """Wake every waiter (the server drains)."""
        self.wake(list(self._events))

    def wake(self, agent_ids: Iterable[str]) -> None:
        """Wake the waiters of these agents only (a change another replica made)."""
        for agent_id in agent_ids:
            event = self._events.pop(agent_id, None)
            if event is not None:
                event.set()
