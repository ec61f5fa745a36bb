"""Open Inference Protocol (KServe v2) REST on the agent's serve address.

Inference requests are held to the limits of the agent's config (read at each request, so a
reload changes them): a body over ``max_request_bytes`` or with more than
``max_request_elements`` values is answered 413, and so is an answer over
``max_response_elements``, before it is encoded. Small bodies (up to ``inline_json_bytes``)
and answers (up to ``inline_json_elements`` values) are decoded and encoded on the event loop,
where that costs a few milliseconds at most; larger ones are handled by at most
``max_large_requests`` requests at a time, in a worker thread and in pieces (agent/serving/oip.py),
so one-row requests keep being answered while a big one is decoded or encoded. A body (with
the wait for a large-request slot) and a streamed answer must each be through within
``body_timeout_s``.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from aiohttp import web

from agent.exceptions import InferenceInputError, InferenceLimitError, ModelNotLoaded
from agent.netguard import ConnectionGuard, ConnectionLimits, GuardedSite
from agent.serving import oip
from agent.serving.prom import Gauges, render
from agent.serving.table import ServingTable

log = logging.getLogger("modelfleet.agent.serve")
TABLE = web.AppKey("table", ServingTable)
GAUGES = web.AppKey("gauges", Callable[[], Gauges])
LARGE_SLOTS = web.AppKey("large_slots", asyncio.Semaphore)
PLATFORMS = {"onnx": "onnxruntime_onnx", "tflite": "tflite"}
STREAM_BUDGET = 1 << 20  # answer bytes encoded per trip to the worker thread
_dumps = functools.partial(json.dumps, allow_nan=False)


def _table(request: web.Request) -> ServingTable:
    return request.app[TABLE]


def _error(status: int, message: str, headers: Mapping[str, str] | None = None) -> web.Response:
    # The protocol's error body is {"error": "<message>"}.
    return web.json_response({"error": message}, status=status, headers=headers)


async def _read_body(request: web.Request, cap: int) -> bytearray:
    """The whole body, however many pieces it arrives in; raises InferenceLimitError over cap."""
    body = bytearray()
    while chunk := await request.content.readany():
        body += chunk
        if len(body) > cap:
            raise InferenceLimitError(f"request body is over the limit max_request_bytes {cap}")
    return body


class _Slot:
    """A large-request slot, taken at most once per request and given back at its end."""

    def __init__(self, slots: asyncio.Semaphore) -> None:
        self.slots = slots
        self.held = False

    async def take(self, within_s: float) -> bool:
        if not self.held:
            try:
                async with asyncio.timeout(within_s):
                    await self.slots.acquire()
            except TimeoutError:
                return False
            self.held = True
        return True

    def give_back(self) -> None:
        if self.held:
            self.slots.release()
            self.held = False


def _busy(within_s: float) -> web.Response:
    return _error(
        503,
        f"other large requests held every slot (max_large_requests) for {within_s:g}s",
        headers={"Retry-After": "1"},
    )


async def infer(request: web.Request) -> web.StreamResponse:
    """POST /v2/models/{name}/infer."""
    table = _table(request)
    name = request.match_info["name"]
    if name not in table:
        return _error(404, f"model {name!r} is not loaded on this agent")
    cfg = table.config
    length = request.content_length
    if length is not None and length > cfg.max_request_bytes:
        return _error(
            413,
            f"request body of {length} bytes is over the limit "
            f"max_request_bytes {cfg.max_request_bytes}",
        )
    slot = _Slot(request.app[LARGE_SLOTS])
    try:
        return await _infer(request, table, name, slot)
    finally:
        slot.give_back()


async def _infer(
    request: web.Request, table: ServingTable, name: str, slot: _Slot
) -> web.StreamResponse:
    cfg = table.config
    loop = asyncio.get_running_loop()
    deadline = loop.time() + cfg.body_timeout_s
    large = request.content_length is None or request.content_length > cfg.inline_json_bytes
    if large and not await slot.take(cfg.body_timeout_s):
        return _busy(cfg.body_timeout_s)
    try:
        async with asyncio.timeout_at(deadline):
            body = await _read_body(request, cfg.max_request_bytes)
    except TimeoutError:
        return _error(
            408, f"request body not received within body_timeout_s {cfg.body_timeout_s:g}"
        )
    except InferenceLimitError as exc:
        return _error(413, str(exc))
    parse = functools.partial(oip.parse_request, body, max_elements=cfg.max_request_elements)
    try:
        feeds, request_id = await asyncio.to_thread(parse, cooperative=True) if large else parse()
        del body, parse
        done = await table.infer(name, feeds)
        lm, outputs = done.model, done.outputs
        values = oip.check_answer(outputs, max_elements=cfg.max_response_elements)
    except InferenceLimitError as exc:
        return _error(413, str(exc))
    except oip.NonFiniteOutput as exc:
        return _error(422, str(exc))
    except InferenceInputError as exc:
        return _error(400, str(exc))
    except ModelNotLoaded as exc:
        return _error(404, str(exc))
    except Exception as exc:
        # The runtime's failures are the model's, not the server's: answer and keep serving.
        log.warning("inference on %s failed: %s", name, exc)
        return _error(500, f"inference failed: {exc}")
    head: dict[str, Any] = {"model_name": lm.name, "model_version": lm.version}
    if request_id is not None:
        head["id"] = request_id
    if values <= cfg.inline_json_elements:
        return web.json_response(oip.answer_document(head, outputs), dumps=_dumps)
    # A big answer (perhaps to a small request): encoded under a slot, in pieces, off the loop.
    if not await slot.take(cfg.body_timeout_s):
        return _busy(cfg.body_timeout_s)
    return await _stream(request, head, outputs, cfg.body_timeout_s)


async def _stream(
    request: web.Request, head: dict[str, Any], outputs: dict[str, np.ndarray], within_s: float
) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "application/json"})
    pieces = oip.answer_pieces(head, outputs)
    try:
        async with asyncio.timeout(within_s):
            await resp.prepare(request)
            while chunk := await asyncio.to_thread(oip.take, pieces, STREAM_BUDGET):
                await resp.write(chunk)
            await resp.write_eof()
    except TimeoutError:
        # A client that does not read its answer must not hold it (and its arrays) for ever;
        # the status is sent already, so the only way to say so is to close.
        log.info("answer not taken within body_timeout_s %gs: connection closed", within_s)
        if request.transport is not None:
            request.transport.close()
    return resp


async def model_metadata(request: web.Request) -> web.Response:
    """GET /v2/models/{name}."""
    lm = _table(request).get(request.match_info["name"])
    if lm is None:
        return _error(404, f"model {request.match_info['name']!r} is not loaded on this agent")
    return web.json_response(
        {
            "name": lm.name,
            "versions": [lm.version],
            "platform": PLATFORMS.get(lm.runtime_name, lm.runtime_name),
            "variant": lm.variant,
            "inputs": [t.to_json() for t in lm.runtime.inputs],
            "outputs": [t.to_json() for t in lm.runtime.outputs],
        }
    )


async def model_ready(request: web.Request) -> web.Response:
    """GET /v2/models/{name}/ready."""
    ok = request.match_info["name"] in _table(request)
    return web.json_response({"ready": ok}, status=200 if ok else 503)


async def live(request: web.Request) -> web.Response:
    """GET /v2/health/live."""
    return web.json_response({"live": True})


async def ready(request: web.Request) -> web.Response:
    """GET /v2/health/ready: every desired model has a version serving."""
    ok = _table(request).ready()
    return web.json_response({"ready": ok}, status=200 if ok else 503)


async def prometheus(request: web.Request) -> web.Response:
    """GET /metrics: Prometheus text exposition."""
    return web.Response(
        text=render(_table(request), request.app[GAUGES]()),
        content_type="text/plain",
        charset="utf-8",
        headers={"X-Content-Type-Options": "nosniff"},
    )


async def server_metadata(request: web.Request) -> web.Response:
    """GET /v2."""
    return web.json_response({"name": "modelfleet-agent", "version": "0.1.0", "extensions": []})


def create_serve_app(
    table: ServingTable, gauges: Callable[[], Gauges], guard: ConnectionGuard | None = None
) -> web.Application:
    """The inference app over one serving table; ``gauges`` snapshots the agent's counters for
    /metrics; ``guard`` sees each request start and end."""
    app = web.Application(
        client_max_size=table.config.max_request_bytes,
        middlewares=[guard.middleware] if guard is not None else [],
    )
    app[TABLE] = table
    app[GAUGES] = gauges
    app[LARGE_SLOTS] = asyncio.Semaphore(table.config.max_large_requests)
    app.router.add_get("/v2", server_metadata)
    app.router.add_get("/v2/health/live", live)
    app.router.add_get("/v2/health/ready", ready)
    app.router.add_get("/v2/models/{name}", model_metadata)
    app.router.add_get("/v2/models/{name}/ready", model_ready)
    app.router.add_post("/v2/models/{name}/infer", infer)
    app.router.add_get("/metrics", prometheus)
    return app


async def start_serving(
    table: ServingTable, gauges: Callable[[], Gauges]
) -> tuple[web.AppRunner, int]:
    """Listen on the serve address (of the table's config) behind its connection guard; the
    runner (cleaned up by the caller) and the bound port. Connection limits are taken here,
    once: a reload does not change them. Raises OSError when the address cannot be bound."""
    cfg = table.config
    limits = ConnectionLimits(
        header_timeout_s=cfg.header_timeout_s,
        keepalive_timeout_s=cfg.keepalive_timeout_s,
        max_connections=cfg.max_connections,
    )
    guard = ConnectionGuard(limits)
    runner = web.AppRunner(
        create_serve_app(table, gauges, guard),
        access_log=None,
        shutdown_timeout=cfg.drain_s,
        **limits.handler_kwargs(),
    )
    await runner.setup()
    site = GuardedSite(runner, cfg.serve_host, cfg.serve_port, guard=guard)
    try:
        await site.start()
    except OSError:
        await runner.cleanup()
        raise
    return runner, site.port
