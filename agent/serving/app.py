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

from agent.exceptions import (
    AgentConfigError,
    InferenceInputError,
    InferenceLimitError,
    ModelNotLoaded,
)
from agent.netguard import ConnectionGuard, ConnectionLimits, GuardedSite
from agent.serving import binary, oip
from agent.serving.access import bearer_middleware, server_context
from agent.serving.prom import Gauges, render
from agent.serving.runtime import LoadedModel
from agent.serving.table import ServingTable

log = logging.getLogger("modelfleet.agent.serve")
TABLE = web.AppKey("table", ServingTable)
GAUGES = web.AppKey("gauges", Callable[[], Gauges])
LARGE_SLOTS = web.AppKey("large_slots", asyncio.Semaphore)
BODY_BUDGET = web.AppKey("body_budget", "ByteBudget")
EXTENSIONS = ["binary_tensor_data"]
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


class ByteBudget:
    """Bytes of request bodies held at once: a body waits (unread) for its share."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.free = total
        self._changed = asyncio.Condition()

    async def take(self, n: int, within_s: float) -> bool:
        """Wait up to ``within_s`` for ``n`` bytes (at most the whole budget); whether had."""
        n = min(n, self.total)
        try:
            async with asyncio.timeout(within_s), self._changed:
                await self._changed.wait_for(lambda: self.free >= n)
                self.free -= n
        except TimeoutError:
            return False
        return True

    async def give(self, n: int) -> None:
        async with self._changed:
            self.free += min(n, self.total)
            self._changed.notify_all()


async def _read_aligned(request: web.Request, length: int, header: int) -> memoryview:
    """A body of known ``length`` read straight into a buffer laid out so that the binary
    section after a ``header``-byte JSON header is aligned (its tensors become views)."""
    pad = binary.aligned_offset(header)
    buf = np.empty(pad + length + binary.ALIGN, dtype=np.uint8)
    start = pad + (-buf.ctypes.data % binary.ALIGN)
    view = memoryview(buf)[start : start + length]
    at = 0
    while chunk := await request.content.readany():
        if at + len(chunk) > length:
            raise InferenceInputError("the body is longer than its Content-Length")
        view[at : at + len(chunk)] = chunk
        at += len(chunk)
    if at != length:
        raise InferenceInputError("the body is shorter than its Content-Length")
    return view


def _version(request: web.Request) -> str | None:
    return request.match_info.get("version")


def _not_serving(table: ServingTable, request: web.Request) -> web.Response | None:
    """404 for a model (or version) not serving; None when it is."""
    try:
        table.serving(request.match_info["name"], _version(request))
    except ModelNotLoaded as exc:
        return _error(404, str(exc))
    return None


async def infer(request: web.Request) -> web.StreamResponse:
    """POST /v2/models/{name}[/versions/{version}]/infer: JSON, or binary tensor data."""
    table = _table(request)
    if (missing := _not_serving(table, request)) is not None:
        return missing
    cfg = table.config
    length = request.content_length
    if length is not None and length > cfg.max_request_bytes:
        return _error(
            413,
            f"request body of {length} bytes is over the limit "
            f"max_request_bytes {cfg.max_request_bytes}",
        )
    held = length if length is not None else cfg.max_request_bytes
    budget = request.app[BODY_BUDGET]
    if not await budget.take(held, cfg.body_timeout_s):
        return _error(
            503,
            f"request bodies held the whole body_budget_bytes for {cfg.body_timeout_s:g}s",
            headers={"Retry-After": "1"},
        )
    slot = _Slot(request.app[LARGE_SLOTS])
    try:
        return await _infer(request, table, slot)
    finally:
        slot.give_back()
        await budget.give(held)


async def _parse(
    request: web.Request, table: ServingTable, slot: _Slot
) -> oip.InferRequest | web.Response:
    """The request read and decoded (big decodes off the loop), or the answer refusing it."""
    cfg = table.config
    loop = asyncio.get_running_loop()
    deadline = loop.time() + cfg.body_timeout_s
    length = request.content_length
    header_text = request.headers.get(binary.HEADER)
    # JSON over json_thread_max_bytes (or of unknown length) is decoded in pieces, one such
    # request at a time; below it orjson decodes it in a thread, or on the loop when small.
    huge = header_text is None and (length is None or length > cfg.json_thread_max_bytes)
    if huge and not await slot.take(cfg.body_timeout_s):
        return _busy(cfg.body_timeout_s)
    try:
        async with asyncio.timeout_at(deadline):
            if header_text is not None and length is not None:
                first = binary.header_length(header_text, length)
                body: Any = await _read_aligned(request, length, first or 0)
            else:
                body = await _read_body(request, cfg.max_request_bytes)
    except TimeoutError:
        return _error(
            408, f"request body not received within body_timeout_s {cfg.body_timeout_s:g}"
        )
    except InferenceLimitError as exc:
        return _error(413, str(exc))
    except InferenceInputError as exc:
        return _error(400, str(exc))
    try:
        header = binary.header_length(header_text, len(body))
        parse = functools.partial(
            oip.parse_request,
            body,
            max_elements=cfg.max_request_elements,
            header_length=header,
            cooperative=huge,
        )
        # Binary tensors are views of the body, but BYTES elements and the checks still cost
        # per value: any body past inline_json_bytes is handled in a thread.
        if huge or len(body) > cfg.inline_json_bytes:
            return await asyncio.to_thread(parse)
        return parse()
    except InferenceLimitError as exc:
        return _error(413, str(exc))
    except InferenceInputError as exc:
        return _error(400, str(exc))


async def _infer(request: web.Request, table: ServingTable, slot: _Slot) -> web.StreamResponse:
    cfg = table.config
    name = request.match_info["name"]
    parsed = await _parse(request, table, slot)
    if isinstance(parsed, web.Response):
        return parsed
    slot.give_back()  # decoded: the arrays are what the rest holds
    try:
        lm = table.serving(name, _version(request))
        oip.check_outputs(parsed, (t.name for t in lm.runtime.outputs))
        done = await table.infer(
            name,
            parsed.feeds,
            version=_version(request),
            traceparent=request.headers.get("traceparent") if table.trace_sample else None,
        )
        lm = done.model
        outputs = oip.select(done.outputs, parsed)
        values = oip.check_answer(outputs, max_elements=cfg.max_response_elements, request=parsed)
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
    if parsed.request_id is not None:
        head["id"] = parsed.request_id
    in_json = sum(int(a.size) for n, a in outputs.items() if not parsed.is_binary(n))
    if in_json <= cfg.json_thread_max_elements or in_json < values:
        encode = functools.partial(oip.encode_answer, head, outputs, parsed)
        pieces, header = (
            await asyncio.to_thread(encode) if in_json > cfg.inline_json_elements else encode()
        )
        headers = {"Content-Type": "application/json"}
        if header is not None:
            headers = {"Content-Type": "application/octet-stream", binary.HEADER: str(header)}
        return web.Response(body=b"".join(pieces), headers=headers)
    # A very big JSON answer (perhaps to a small request): encoded under a slot, in pieces,
    # off the loop (an answer with binary outputs never comes here).
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


def model_config_document(lm: LoadedModel) -> dict[str, Any]:
    """What a version serves with: signature, dynamic batching (Triton's names), instances."""
    doc: dict[str, Any] = {
        "name": lm.name,
        "version": lm.version,
        "platform": PLATFORMS.get(lm.runtime_name, lm.runtime_name),
        "variant": lm.variant,
        "inputs": [t.to_json() for t in lm.runtime.inputs],
        "outputs": [t.to_json() for t in lm.runtime.outputs],
        "max_batch_size": lm.batching.max_batch_size if lm.batching else 0,
        "instance_count": lm.instances,
    }
    if lm.batching is not None:
        doc["dynamic_batching"] = {
            "max_queue_delay_microseconds": round(lm.batching.max_queue_delay_s * 1e6),
            "preferred_batch_size": list(lm.batching.preferred_sizes),
        }
    return doc


async def model_metadata(request: web.Request) -> web.Response:
    """GET /v2/models/{name}[/versions/{version}]."""
    table = _table(request)
    try:
        lm = table.serving(request.match_info["name"], _version(request))
    except ModelNotLoaded as exc:
        return _error(404, str(exc))
    doc: dict[str, Any] = {
        "name": lm.name,
        "versions": [lm.version],
        "platform": PLATFORMS.get(lm.runtime_name, lm.runtime_name),
        "variant": lm.variant,
        "inputs": [t.to_json() for t in lm.runtime.inputs],
        "outputs": [t.to_json() for t in lm.runtime.outputs],
    }
    if lm.aux_files:  # what a client's pre- or post-processing must match
        doc["files"] = [{"path": f.path, "digest": f.digest, "size": f.size} for f in lm.aux_files]
    return web.json_response(doc)


async def model_config(request: web.Request) -> web.Response:
    """GET /v2/models/{name}[/versions/{version}]/config: the signature, batching and
    execution settings the version serves with."""
    table = _table(request)
    try:
        lm = table.serving(request.match_info["name"], _version(request))
    except ModelNotLoaded as exc:
        return _error(404, str(exc))
    return web.json_response(model_config_document(lm))


async def model_ready(request: web.Request) -> web.Response:
    """GET /v2/models/{name}[/versions/{version}]/ready."""
    ok = _not_serving(_table(request), request) is None
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
    return web.json_response(
        {"name": "modelfleet-agent", "version": "0.1.0", "extensions": EXTENSIONS}
    )


def create_serve_app(
    table: ServingTable, gauges: Callable[[], Gauges], guard: ConnectionGuard | None = None
) -> web.Application:
    """The inference app over one serving table; ``gauges`` snapshots the agent's counters for
    /metrics; ``guard`` sees each request start and end."""
    middlewares: list[Any] = [guard.middleware] if guard is not None else []
    if table.config.serve_tokens:
        middlewares.append(bearer_middleware(table.config.serve_tokens))
    app = web.Application(client_max_size=table.config.max_request_bytes, middlewares=middlewares)
    app[TABLE] = table
    app[GAUGES] = gauges
    app[LARGE_SLOTS] = asyncio.Semaphore(table.config.max_large_requests)
    cfg = table.config
    app[BODY_BUDGET] = ByteBudget(max(cfg.body_budget_bytes, cfg.max_request_bytes))
    app.router.add_get("/v2", server_metadata)
    app.router.add_get("/v2/health/live", live)
    app.router.add_get("/v2/health/ready", ready)
    for model in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        app.router.add_get(model, model_metadata)
        app.router.add_get(model + "/ready", model_ready)
        app.router.add_get(model + "/config", model_config)
        app.router.add_post(model + "/infer", infer)
    app.router.add_get("/metrics", prometheus)
    return app


async def start_serving(
    table: ServingTable, gauges: Callable[[], Gauges]
) -> tuple[web.AppRunner, int]:
    """Listen on the serve address (of the table's config) behind its connection guard, with
    its TLS and tokens; the runner (cleaned up by the caller) and the bound port. Connection
    limits, tokens and TLS are taken here, once: a reload does not change them. Raises OSError
    when the address cannot be bound, AgentConfigError for unreadable TLS files."""
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
    try:
        tls = server_context(cfg.serve_cert_file, cfg.serve_key_file, cfg.serve_client_ca_file)
    except AgentConfigError:
        await runner.cleanup()
        raise
    site = GuardedSite(runner, cfg.serve_host, cfg.serve_port, guard=guard, ssl_context=tls)
    try:
        await site.start()
    except OSError:
        await runner.cleanup()
        raise
    return runner, site.port
