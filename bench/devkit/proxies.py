"""Reverse proxies on a free loopback port, between an agent and its control plane.

``MitmProxy`` replaces desired-state answers (an attacker); ``CuttingProxy`` cuts the first blob
midway and counts the body bytes it sends (a link that drops); ``UploadCuttingProxy`` drops a
push's connection once so many upload bytes went through.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, Self

import aiohttp
from aiohttp import web


class LoopbackProxy:
    """A reverse proxy on a free loopback port; subclasses define ``handle``."""

    runner: web.AppRunner | None = None
    url = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.runner is not None
        await self.runner.cleanup()


class MitmProxy(LoopbackProxy):
    """A reverse proxy on loopback that can replace desired-state answers (an attacker)."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.replacement: bytes | None = None
        self.seen_desired: list[bytes] = []

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.path.endswith("/desired") and self.replacement is not None:
            await asyncio.sleep(0.05)
            return web.Response(body=self.replacement, content_type="application/json")
        async with (
            aiohttp.ClientSession() as s,
            s.request(
                request.method,
                self.upstream + request.path_qs,
                headers={k: v for k, v in request.headers.items() if k.lower() != "host"},
                data=await request.read(),
            ) as r,
        ):
            body = await r.read()
            if request.path.endswith("/desired") and r.status == 200:
                self.seen_desired.append(body)
            headers = {
                k: v
                for k, v in r.headers.items()
                if k.lower()
                not in ("content-length", "transfer-encoding", "content-encoding", "connection")
            }
            return web.Response(status=r.status, body=body, headers=headers)


class CuttingProxy(LoopbackProxy):
    """A reverse proxy on loopback that streams blobs and cuts the first one midway.

    It counts the body bytes it sends for each blob, so a test can see what resuming cost.
    """

    def __init__(self, upstream: str, cut_after: int) -> None:
        self.upstream = upstream
        self.cut_after = cut_after
        self.cuts = 0
        self.blob_bytes_sent = 0
        self.blob_requests: list[str | None] = []  # the Range header of each blob request
        self.inflight = 0
        self.max_inflight = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() != "host"}
        is_blob = "/blobs/" in request.path
        if not is_blob:
            return await self._forward(request, headers, False)
        self.blob_requests.append(request.headers.get("Range"))
        self.inflight += 1
        self.max_inflight = max(self.max_inflight, self.inflight)
        try:
            return await self._forward(request, headers, True)
        finally:
            self.inflight -= 1

    async def _forward(
        self, request: web.Request, headers: dict[str, str], is_blob: bool
    ) -> web.StreamResponse:
        async with (
            aiohttp.ClientSession(auto_decompress=False) as s,
            s.request(
                request.method,
                self.upstream + request.path_qs,
                headers=headers,
                data=await request.read(),
            ) as r,
        ):
            passthrough = {
                k: v
                for k, v in r.headers.items()
                if k.lower() not in ("transfer-encoding", "connection")
            }
            resp = web.StreamResponse(status=r.status, headers=passthrough)
            await resp.prepare(request)
            sent = 0
            async for chunk in r.content.iter_chunked(64 * 1024):
                if is_blob and self.cuts == 0 and sent + len(chunk) > self.cut_after:
                    self.cuts += 1
                    assert request.transport is not None
                    request.transport.close()  # the link drops mid-blob
                    return resp
                await resp.write(chunk)
                sent += len(chunk)
                if is_blob:
                    self.blob_bytes_sent += len(chunk)
            await resp.write_eof()
            return resp


class UploadCuttingProxy(LoopbackProxy):
    """A reverse proxy on loopback that forwards requests and, once ``cut_after`` bytes of
    upload bodies went through, drops the connection in the middle of the upload (a push cut
    halfway). ``uploads`` counts the uploads that reached the upstream whole."""

    def __init__(self, upstream: str, cut_after: int) -> None:
        self.upstream = upstream.rstrip("/")
        self.cut_after = cut_after
        self.forwarded = 0
        self.cut = False
        self.uploads = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if self.cut:
            raise web.HTTPServiceUnavailable()
        headers = {
            k: v
            for k, v in request.headers.items()
            if k.lower() not in ("host", "transfer-encoding")
        }

        async def body() -> AsyncIterator[bytes]:
            async for chunk in request.content.iter_chunked(64 * 1024):
                if self.forwarded + len(chunk) > self.cut_after:
                    self.cut = True
                    raise ConnectionResetError("cut by the proxy")
                self.forwarded += len(chunk)
                yield chunk

        data: Any = body() if request.method == "PUT" else await request.read()
        try:
            async with (
                aiohttp.ClientSession() as s,
                s.request(
                    request.method, self.upstream + request.path_qs, headers=headers, data=data
                ) as r,
            ):
                payload = await r.read()
                if request.method == "PUT":
                    self.uploads += 1
                return web.Response(
                    status=r.status,
                    body=payload,
                    headers={"Content-Type": r.headers.get("Content-Type", "application/json")},
                )
        except (aiohttp.ClientError, ConnectionResetError):
            if request.transport is not None:
                request.transport.close()  # the client sees its connection drop
            raise web.HTTPServiceUnavailable() from None
