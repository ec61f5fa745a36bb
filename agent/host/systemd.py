"""systemd's notification protocol: READY, STOPPING, RELOADING and WATCHDOG datagrams to the
socket named by $NOTIFY_SOCKET (a path, or an abstract name starting with '@')."""

from __future__ import annotations

import os
import socket
import time


class Notifier:
    """Sends state changes to systemd; a no-op outside a ``Type=notify`` service."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        env = dict(os.environ) if env is None else env
        address = env.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):
            address = "\0" + address[1:]
        self.address = address or None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        mine = not pid or pid == str(os.getpid())
        self.watchdog_s = int(usec) / 1e6 if usec.isdigit() and int(usec) > 0 and mine else None

    def send(self, message: str) -> None:
        """Send one datagram; errors are ignored, as sd_notify(3) does."""
        if self.address is None:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.connect(self.address)
                s.sendall(message.encode())
        except OSError:
            pass

    def ready(self) -> None:
        """The service is up."""
        self.send("READY=1\nSTATUS=serving")

    def stopping(self) -> None:
        """The service is shutting down."""
        self.send("STOPPING=1")

    def reloading(self) -> None:
        """A reload started; ``ready`` ends it."""
        self.send(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")

    def watchdog(self) -> None:
        """The main loop is alive."""
        self.send("WATCHDOG=1")
