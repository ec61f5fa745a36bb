"""The agent process's lifecycle (as ``control_plane/server.py`` is the control plane's): run
the daemon until SIGINT or SIGTERM, tell systemd each step (READY, RELOADING, STOPPING), re-read
the configuration on SIGHUP, and exit at once on a second signal.

``modelfleet agent run`` parses its options and calls :func:`run_agent`; it imports this module
only when it runs, so other commands never load the runtimes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Callable

from agent.config import AgentConfig
from agent.daemon import Agent
from agent.exceptions import AgentConfigError
from agent.host.systemd import Notifier

log = logging.getLogger("modelfleet.agent")


async def run_agent(config: AgentConfig, reload: Callable[[], AgentConfig] | None = None) -> None:
    """Run until SIGINT/SIGTERM, then drain and stop; a second signal exits at once.

    SIGHUP re-reads the configuration through ``reload``.
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    notifier = Notifier()

    def on_signal() -> None:
        if stop.is_set():
            os._exit(1)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    async with Agent(config, notifier) as agent:
        if reload is not None:

            def on_hup() -> None:
                notifier.reloading()
                try:
                    agent.reload(reload())
                except AgentConfigError as exc:
                    log.error("reload refused, keeping the running configuration: %s", exc)
                notifier.ready()

            loop.add_signal_handler(signal.SIGHUP, on_hup)
        notifier.ready()
        await stop.wait()
        notifier.stopping()
        log.info("stopping: draining in-flight requests")
