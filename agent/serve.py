"""Open Inference Protocol (KServe v2) REST on the agent's serve address."""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

import numpy as np
from aiohttp import web

from agent.exceptions import InferenceInputError
from agent.runtime import DTYPES

if TYPE_CHECKING:
    from agent.daemon import Agent

log = logging.getLogger("modelfleet.agent.serve")
AGENT = web.AppKey("agent", object)
MAX_REQUEST_BYTES = 64 * 1024 * 1024
PLATFORMS = {"onnx": "onnxruntime_onnx", "tflite": "tflite"}


def _agent(request: web.Request) -> Agent:
    return request.app[AGENT]  # type: ignore[return-value]


def _error(status: int, message: str) -> web.Response:
    # The protocol's error body is {"error": "<message>"}.
    return web.json_response({"error": message}, status=status)


def parse_infer_request(body: bytes) -> tuple[dict[str, np.ndarray], str | None]:
    """Turn an OIP infer request into named arrays; raises InferenceInputError."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InferenceInputError(f"request body is not JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list) or not doc["inputs"]:
        raise InferenceInputError("request must be an object with a non-empty 'inputs' list")
    feeds: dict[str, np.ndarray] = {}
    for i, t in enumerate(doc["inputs"]):
        if not isinstance(t, dict):
            raise InferenceInputError(f"inputs[{i}] must be an object")
        name, shape, datatype = t.get("name"), t.get("shape"), t.get("datatype")
        if not isinstance(name, str) or not name:
            raise InferenceInputError(f"inputs[{i}].name must be a non-empty string")
        if name in feeds:
            raise InferenceInputError(f"input {name!r} is given twice")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise InferenceInputError(f"input {name!r}: shape must be a list of integers >= 0")
        dtype = DTYPES.get(datatype) if isinstance(datatype, str) else None
        if dtype is None:
            raise InferenceInputError(f"input {name!r}: datatype {datatype!r} is not supported")
        try:
            arr = np.asarray(t.get("data"), dtype=dtype).reshape(-1)
        except (ValueError, TypeError) as exc:
            raise InferenceInputError(f"input {name!r}: data is not {datatype}: {exc}") from None
        expected = int(np.prod(shape)) if shape else 1
        if arr.size != expected:
            raise InferenceInputError(
                f"input {name!r}: {arr.size} values given, shape {shape} needs {expected}"
            )
        feeds[name] = arr.reshape(shape)
    request_id = doc.get("id") if isinstance(doc.get("id"), str) else None
    return feeds, request_id


def _output(name: str, arr: np.ndarray) -> dict[str, Any]:
    from agent.runtime import DATATYPE_OF

    return {
        "name": name,
        "datatype": DATATYPE_OF.get(arr.dtype, "BYTES"),
        "shape": list(arr.shape),
        "data": arr.reshape(-1).tolist(),
    }


async def infer(request: web.Request) -> web.Response:
    """POST /v2/models/{name}/infer."""
    agent = _agent(request)
    name = request.match_info["name"]
    if name not in agent.models:
        return _error(404, f"model {name!r} is not loaded on this agent")
    body = await request.read()
    try:
        feeds, request_id = parse_infer_request(body)
        lm, outputs = await agent.infer(name, feeds)
    except InferenceInputError as exc:
        return _error(400, str(exc))
    except KeyError:
        return _error(404, f"model {name!r} is not loaded on this agent")
    except Exception as exc:
        # The runtime's failures are the model's, not the server's: answer and keep serving.
        log.warning("inference on %s failed: %s", name, exc)
        return _error(500, f"inference failed: {exc}")
    resp: dict[str, Any] = {
        "model_name": lm.name,
        "model_version": lm.version,
        "outputs": [_output(n, a) for n, a in outputs.items()],
    }
    if request_id is not None:
        resp["id"] = request_id
    return web.json_response(resp)


async def model_metadata(request: web.Request) -> web.Response:
    """GET /v2/models/{name}."""
    agent = _agent(request)
    lm = agent.models.get(request.match_info["name"])
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
    ok = request.match_info["name"] in _agent(request).models
    return web.json_response({"ready": ok}, status=200 if ok else 503)


async def live(request: web.Request) -> web.Response:
    """GET /v2/health/live."""
    return web.json_response({"live": True})


async def ready(request: web.Request) -> web.Response:
    """GET /v2/health/ready: every desired model has a version serving."""
    ok = _agent(request).ready()
    return web.json_response({"ready": ok}, status=200 if ok else 503)


async def prometheus(request: web.Request) -> web.Response:
    """GET /metrics: Prometheus text exposition."""
    from agent.prom import render

    return web.Response(
        text=render(_agent(request)), content_type="text/plain", charset="utf-8",
        headers={"X-Content-Type-Options": "nosniff"},
    )  # fmt: skip


async def server_metadata(request: web.Request) -> web.Response:
    """GET /v2."""
    return web.json_response({"name": "modelfleet-agent", "version": "0.1.0", "extensions": []})


def create_serve_app(agent: Agent) -> web.Application:
    """The inference app of one agent."""
    app = web.Application(client_max_size=MAX_REQUEST_BYTES)
    app[AGENT] = agent
    app.router.add_get("/v2", server_metadata)
    app.router.add_get("/v2/health/live", live)
    app.router.add_get("/v2/health/ready", ready)
    app.router.add_get("/v2/models/{name}", model_metadata)
    app.router.add_get("/v2/models/{name}/ready", model_ready)
    app.router.add_post("/v2/models/{name}/infer", infer)
    app.router.add_get("/metrics", prometheus)
    return app
