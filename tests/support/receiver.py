"""A real webhook receiver on loopback: it verifies every delivery's signature and can be told,
per path, to answer 200, fail a number of times first, hang, always fail, or answer 410."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from control_plane.events.signing import DELIVERY_HEADER, EVENT_HEADER, HEADER, verify


@dataclass
class Received:
    """One POST as it arrived."""

    path: str
    event: dict[str, Any]
    event_type: str
    delivery: str
    signed: bool


@dataclass
class Behaviour:
    """How one path answers: ``fail_first`` 500s (or hangs ``hang_s``), then ``status``."""

    status: int = 200
    fail_first: int = 0
    hang_s: float = 0.0


@dataclass
class Receiver:
    """The receiver's configuration (paths, secrets) and everything it received."""

    behaviours: dict[str, Behaviour] = field(default_factory=dict)
    secrets: dict[str, str] = field(default_factory=dict)
    received: list[Received] = field(default_factory=list)
    attempts: Counter[tuple[str, str]] = field(default_factory=Counter)  # (path, delivery)
    url: str = ""
    _runner: web.AppRunner | None = None

    def events(self, path: str, delivered: bool = True) -> list[Received]:
        """What arrived at ``path`` (only the answered-200 ones unless ``delivered`` False)."""
        out = [r for r in self.received if r.path == path]
        if not delivered:
            return out
        want = self.behaviours[path]
        return [r for r in out if want.status == 200 and self._ok(r)]

    def _ok(self, r: Received) -> bool:
        b = self.behaviours[r.path]
        return self.attempts[(r.path, r.delivery)] > b.fail_first

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        path = request.path
        secret = self.secrets.get(path, "")
        rec = Received(
            path=path,
            event=json.loads(body),
            event_type=request.headers.get(EVENT_HEADER, ""),
            delivery=request.headers.get(DELIVERY_HEADER, ""),
            signed=verify(secret, body, request.headers.get(HEADER)),
        )
        self.received.append(rec)
        self.attempts[(path, rec.delivery)] += 1
        b = self.behaviours.get(path, Behaviour(status=404))
        if self.attempts[(path, rec.delivery)] <= b.fail_first:
            if b.hang_s:
                await asyncio.sleep(b.hang_s)
            return web.Response(status=500, text="failing on purpose")
        return web.Response(status=b.status, text="ok")

    async def __aenter__(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
