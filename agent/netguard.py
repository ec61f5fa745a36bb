"""Connection limits for the agent's serve port: header-read timeout, keep-alive, a cap.

aiohttp's own keep-alive timer (3630 s by default) is the only deadline it keeps on an idle
connection, and it keeps no count of them: a few thousand idle or trickling sockets would hold
the agent's file descriptors. ``GuardedSite`` listens through a small protocol wrapper that

- refuses a connection beyond ``max_connections`` with a 503 and closes it (no file descriptor
  is held, and the client learns why);
- closes a connection whose request head (request line and headers) is not complete within
  ``header_timeout_s`` of the connection opening, or of the first byte after a finished
  request. A head is complete when its blank line has arrived (seen in the bytes as they come,
  so a busy event loop that runs the handler late does not turn a timely head into a closed
  connection); the ``middleware`` tells it when a request starts and when it is done;
- leaves the idle time between requests to aiohttp's keep-alive timer, set from
  ``keepalive_timeout_s`` (``handler_kwargs``).

The control plane has its own guard for its API; agent and control plane share no code but
``protocol/``, which holds no sockets.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

log = logging.getLogger("modelfleet.agent.netguard")


@dataclass(frozen=True)
class ConnectionLimits:
    """Deadlines and the cap of one listening port."""

    header_timeout_s: float = 10.0
    keepalive_timeout_s: float = 15.0
    max_connections: int = 256

    def handler_kwargs(self) -> dict[str, Any]:
        """What aiohttp's request handler takes from these limits (for ``AppRunner``)."""
        return {"keepalive_timeout": self.keepalive_timeout_s}


def _refusal(max_connections: int) -> bytes:
    body = json.dumps(
        {"error": f"too many connections (max_connections {max_connections}); try again"}
    ).encode()
    head = (
        "HTTP/1.1 503 Service Unavailable\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Retry-After: 1\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode() + body


class _GuardedConnection(asyncio.Protocol):
    """One accepted connection: aiohttp's handler inside, a head deadline around it."""

    def __init__(self, guard: ConnectionGuard, inner: asyncio.Protocol) -> None:
        self.guard = guard
        self.inner = inner
        self.transport: asyncio.Transport | None = None
        self.in_request = False
        self.head_seen = False  # the blank line ending the current request's head has arrived
        self._tail = b""  # the last bytes of a head not yet complete (a CRLFCRLF split in two)
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        if not self.guard.admit(self, transport):
            transport.write(_refusal(self.guard.limits.max_connections))
            transport.close()
            return
        self.transport = transport
        self._arm()  # the first request's head is due from the start
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self.transport is None:
            return  # refused: whatever it sends is dropped with the connection
        if not self.in_request and not self.head_seen:
            if self._deadline is None:
                self._arm()  # the first byte of a new request head
            seen = self._tail + data
            if b"\r\n\r\n" in seen:
                self.head_seen = True  # in time, however late the handler runs
                self._tail = b""
                self._disarm()
            else:
                self._tail = seen[-3:]
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received() if self.transport is not None else None

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is None:
            return  # refused: aiohttp never saw it
        self._disarm()
        self.guard.release(self.transport)
        self.inner.connection_lost(exc)

    def request_started(self) -> None:
        self.in_request = True
        self._disarm()

    def request_done(self) -> None:
        self.in_request = False
        self.head_seen = False
        self._tail = b""

    def _arm(self) -> None:
        loop = asyncio.get_running_loop()
        self._deadline = loop.call_later(self.guard.limits.header_timeout_s, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if self.transport is not None and not self.in_request:
            self.guard.timed_out += 1
            self.transport.close()


class ConnectionGuard:
    """Counts and deadlines for the connections of one port; see the module docstring."""

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self._open: dict[asyncio.Transport, _GuardedConnection] = {}
        self.refused = 0
        self.timed_out = 0

    @property
    def open_connections(self) -> int:
        """Connections accepted and not yet closed."""
        return len(self._open)

    def admit(self, conn: _GuardedConnection, transport: asyncio.Transport) -> bool:
        """Count a new connection in, or say it is over the cap."""
        if len(self._open) >= self.limits.max_connections:
            self.refused += 1
            if self.refused == 1 or self.refused % 1000 == 0:
                log.warning(
                    "serve port at max_connections (%d): %d connection(s) refused",
                    self.limits.max_connections,
                    self.refused,
                )
            return False
        self._open[transport] = conn
        return True

    def release(self, transport: asyncio.Transport) -> None:
        """A connection closed."""
        self._open.pop(transport, None)

    def protocol_factory(self, inner: Callable[[], asyncio.Protocol]) -> Callable[[], Any]:
        """Wrap aiohttp's protocol factory (the runner's server)."""
        return lambda: _GuardedConnection(self, inner())

    @web.middleware
    async def middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """Tell the connection its request head is complete, and when the request is done."""
        conn = self._open.get(request.transport) if request.transport is not None else None
        if conn is not None:
            conn.request_started()
        try:
            return await handler(request)
        finally:
            if conn is not None:
                conn.request_done()


class GuardedSite(web.BaseSite):
    """A TCP site whose connections pass through a ``ConnectionGuard``."""

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        *,
        guard: ConnectionGuard,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context)
        self._host = host
        self._port = port
        self.guard = guard

    @property
    def name(self) -> str:
        scheme = "https" if self._ssl_context else "http"
        return f"{scheme}://{self._host}:{self.port}"

    @property
    def port(self) -> int:
        """The bound port (the real one when 0 was asked for)."""
        if self._server is None or not self._server.sockets:
            return self._port
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        """Listen; raises OSError when the address cannot be bound."""
        await super().start()
        server = self._runner.server
        assert server is not None
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self.guard.protocol_factory(server),
            self._host,
            self._port,
            backlog=self._backlog,
            ssl=self._ssl_context,
        )
