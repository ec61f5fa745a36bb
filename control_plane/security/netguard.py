"""Connection limits for an aiohttp server: a header-read timeout, keep-alive and a cap.

aiohttp 3.14 on its own waits up to its keep-alive timeout (3630 s by default) for a request
head, lets a client trickle one byte at a time into it, and accepts connections until the
process runs out of file descriptors, after which nothing (not even ``/health``) answers.
:class:`GuardedSite` is a drop-in for ``web.TCPSite`` that closes those doors:

- **Header timeout.** A request's head (request line and headers) must be complete within
  ``header_timeout_s`` of the connection opening, or of its first byte on a kept-alive
  connection; otherwise the connection is closed. The body is the handler's to bound.
- **Keep-alive.** An idle kept-alive connection is closed after ``keepalive_timeout_s``.
- **Cap.** At most ``max_connections`` connections are open at once; one more is answered
  ``503`` with ``Retry-After`` and closed at once, before anything is read or allocated for
  it, so a flood costs a fixed amount per attempt and never grows memory. A long-poll holds a
  connection for as long as it waits, so it counts: size the cap from the clients that wait
  (see :func:`fd_budget` and the README's "Connection limits").
- **Malformed heads.** A head aiohttp's parser refuses (a line over 8 KiB, a bad header) is
  answered ``400`` (``431`` when a line is too long) with a fixed body and logged without its
  bytes: aiohttp's own answer and log line quote the first 100 bytes of the offending line,
  which for an ``Authorization`` header is the bearer token.
- With TLS, a handshake has the same ``header_timeout_s`` to finish (asyncio's default: 60 s).

Self-contained on purpose (aiohttp and the standard library only), so that another server
can take the same guard. It subclasses aiohttp's ``RequestHandler`` and reads three of its
private attributes (``_request_count``, ``_waiter``, ``Server._kwargs``), pinned by the tests
in ``tests/integration/test_server_limits.py``.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import LineTooLong
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

log = logging.getLogger("modelfleet.netguard")

# What a connection over the cap is told, written in one piece before it is closed.
_BUSY_BODY = b'{"error":{"code":"too_many_connections","message":"too many open connections"}}'
_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    b"Retry-After: 1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
) % (len(_BUSY_BODY), _BUSY_BODY)
# File descriptors kept back from the cap for the database, the broker, blobs and logs.
FD_RESERVE = 256


@dataclass(frozen=True)
class ConnectionLimits:
    """How long a client may take and how many may be connected at once."""

    header_timeout_s: float = 10.0
    keepalive_timeout_s: float = 30.0
    max_connections: int = 4096

    def check(self) -> None:
        """Raise ValueError naming the limit that is out of range."""
        if not 0 < self.header_timeout_s <= 3600:
            raise ValueError("header_timeout_s must be between 0 and 3600 seconds")
        if not 0 < self.keepalive_timeout_s <= 3600:
            raise ValueError("keepalive_timeout_s must be between 0 and 3600 seconds")
        if not 1 <= self.max_connections <= 1_000_000:
            raise ValueError("max_connections must be between 1 and 1000000")


def fd_budget(max_connections: int) -> int:
    """Raise the soft file-descriptor limit to the hard one; return the cap that fits in it.

    The cap is lowered (and a warning logged) when the limit cannot hold ``max_connections``
    plus :data:`FD_RESERVE`: a cap above the limit would not stop descriptor exhaustion.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, hard, exc)
    if soft == resource.RLIM_INFINITY or soft >= max_connections + FD_RESERVE:
        return max_connections
    fitted = max(1, soft - FD_RESERVE)
    log.warning(
        "the open-file limit (%d) cannot hold %d connections and %d other files: "
        "serving at most %d connections (raise LimitNOFILE / ulimit -n)",
        soft,
        max_connections,
        FD_RESERVE,
        fitted,
    )
    return fitted


class _Gate:
    """The count of open connections of one site."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open = 0
        self.refused = 0


class _GuardedHandler(RequestHandler):
    """aiohttp's connection handler with a header timer and a place in the gate."""

    __slots__ = ("_admitted", "_gate", "_header_timeout", "_header_timer")

    def __init__(
        self, manager: web.Server, gate: _Gate, header_timeout_s: float, **kwargs: Any
    ) -> None:
        super().__init__(manager, **kwargs)
        self._gate = gate
        self._header_timeout = header_timeout_s
        self._header_timer: asyncio.TimerHandle | None = None
        self._admitted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._gate.open >= self._gate.limit:
            self._gate.refused += 1
            transport.write(_BUSY)  # type: ignore[attr-defined]
            transport.close()  # flushes the answer, reads nothing
            return
        self._gate.open += 1
        self._admitted = True
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self._admitted:
            return  # refused at the door: aiohttp never saw it
        self._admitted = False
        self._gate.open -= 1
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        parsed = self._request_count
        super().data_received(data)
        if self._request_count != parsed:
            self._disarm()  # a whole head arrived
        elif self._header_timer is None and data and self._awaiting_head():
            self._arm()  # the first bytes of a kept-alive connection's next request

    def _awaiting_head(self) -> bool:
        waiter = self._waiter
        return waiter is not None and not waiter.done()

    def _arm(self) -> None:
        self._header_timer = self._loop.call_later(self._header_timeout, self._head_late)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _head_late(self) -> None:
        self._header_timer = None
        if self._awaiting_head():
            log.debug(
                "closed a connection whose request head took over %.1fs", self._header_timeout
            )
            self.force_close()

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """A fixed answer and a log line that never quote the request's bytes."""
        if status >= 500:
            return super().handle_error(request, status, exc, None)
        too_long = isinstance(exc, LineTooLong)
        status = 431 if too_long else status
        what = "a request line or header is too long" if too_long else "malformed request"
        log.info(
            "refused a malformed request from %s (%d, %s)",
            request.remote,
            status,
            type(exc).__name__ if exc else "-",
        )
        body = f'{{"error":{{"code":"bad_request","message":"{what}"}}}}'
        resp = web.Response(status=status, text=body, content_type="application/json")
        resp.force_close()
        return resp


class GuardedSite(web.BaseSite):
    """``web.TCPSite`` with :class:`ConnectionLimits`; ``open_connections`` for figures."""

    __slots__ = ("_gate", "_host", "_limits", "_port")

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        *,
        limits: ConnectionLimits,
        ssl_context: Any = None,
        backlog: int = 1024,
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context, backlog=backlog)
        limits.check()
        self._host = host
        self._port = port
        self._limits = limits
        self._gate = _Gate(limits.max_connections)

    @property
    def name(self) -> str:
        """The URL it listens on."""
        scheme = "https" if self._ssl_context else "http"
        return f"{scheme}://{self._host}:{self.port}"

    @property
    def port(self) -> int:
        """The bound port (the one asked for until it starts)."""
        if self._server is not None and self._server.sockets:  # type: ignore[attr-defined]
            return int(self._server.sockets[0].getsockname()[1])  # type: ignore[attr-defined]
        return self._port

    @property
    def open_connections(self) -> int:
        """Connections open now."""
        return self._gate.open

    @property
    def refused_connections(self) -> int:
        """Connections answered 503 because the cap was reached."""
        return self._gate.refused

    def _protocol(self) -> _GuardedHandler:
        server = self._runner.server
        assert server is not None
        kwargs = {**server._kwargs, "keepalive_timeout": self._limits.keepalive_timeout_s}
        return _GuardedHandler(
            server,
            self._gate,
            self._limits.header_timeout_s,
            loop=asyncio.get_running_loop(),
            **kwargs,
        )

    async def start(self) -> None:
        """Listen."""
        await super().start()
        loop = asyncio.get_running_loop()
        tls: dict[str, Any] = {}
        if self._ssl_context is not None:
            tls = {"ssl": self._ssl_context, "ssl_handshake_timeout": self._limits.header_timeout_s}
        self._server = await loop.create_server(
            self._protocol,
            self._host,
            self._port,
            backlog=self._backlog,
            reuse_address=True,
            **tls,
        )
