"""Named points where a test can have the agent killed with SIGKILL, to prove crash safety.

Armed only through ``AgentConfig.failpoints`` (the command line reads MODELFLEET_FAILPOINTS),
in the manner of FreeBSD's fail points; unarmed, a point costs one set lookup.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Iterable

log = logging.getLogger("modelfleet.agent.failpoints")

KILL_POINTS = frozenset(
    {
        "download-midway",  # half a blob written to partial/
        "blob-committed",  # a verified blob renamed into the store
        "before-manifest-saved",  # all blobs in place, version not yet marked installed
        "model-loaded",  # new version loaded and smoke-tested, not yet swapped in
        "before-state-saved",  # swapped in, state.json not yet rewritten
    }
)
# Two seconds after start, block the event loop (watchdog tests).
STALL_POINTS = frozenset({"stall-event-loop"})
POINTS = KILL_POINTS | STALL_POINTS


class Failpoints:
    """The armed points of one agent."""

    def __init__(self, armed: Iterable[str] = ()) -> None:
        self.armed = frozenset(armed)
        unknown = self.armed - POINTS
        if unknown:
            raise ValueError(f"unknown failpoint(s): {', '.join(sorted(unknown))}")

    def hit(self, name: str) -> None:
        """Die here, at once and without cleanup, when ``name`` is armed."""
        if name in self.armed:
            log.warning("failpoint %s: SIGKILL", name)
            logging.shutdown()
            os.kill(os.getpid(), signal.SIGKILL)

    def stall(self, name: str, uptime_s: float) -> None:
        """Block the calling thread (the event loop) for an hour when armed and up 2 s."""
        if name in self.armed and uptime_s > 2.0:
            log.warning("failpoint %s: the event loop stops here", name)
            time.sleep(3600)
