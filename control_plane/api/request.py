"""Request helpers every handler uses: the state, the caller, JSON in and out, query numbers."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web

from control_plane.api.errors import ApiError
from control_plane.security.auth import AgentCaller, Operator
from control_plane.state import STATE, State
from protocol.exceptions import InvalidMessage
from protocol.fields import load_json_object

# The authenticated caller (an auth.Operator or auth.AgentCaller), set by auth_middleware.
PRINCIPAL = web.RequestKey("principal", object)


def st(request: web.Request) -> State:
    """The app's state."""
    return request.app[STATE]


def json_response(data: object, status: int = 200) -> web.Response:
    """A JSON response; strict JSON (a non-finite number raises ValueError, never ``NaN`` out)."""
    return web.json_response(
        data, status=status, dumps=lambda o: json.dumps(o, default=str, allow_nan=False)
    )


def error_response(err: ApiError) -> web.Response:
    """A refusal as ``{"error": {...}}`` with its headers (Retry-After and the like)."""
    resp = json_response(err.to_json(), err.status)
    resp.headers.update(err.headers)
    return resp


async def read_body(request: web.Request, limit: int, too_large: ApiError) -> bytes:
    """The request body, refused with ``too_large`` as soon as it is over ``limit`` bytes (by
    its Content-Length or as it arrives), and with 408 when it does not arrive in time."""
    if request.content_length is not None and request.content_length > limit:
        raise too_large
    data = bytearray()
    try:
        async with asyncio.timeout(st(request).config.body_timeout_s):
            # read() answers with what has arrived: read until the end of the body.
            while chunk := await request.content.read(limit + 1 - len(data)):
                data += chunk
                if len(data) > limit:
                    raise too_large
    except TimeoutError:
        raise ApiError(408, "body_timeout", "the request body did not arrive in time") from None
    return bytes(data)


async def read_json(request: web.Request) -> dict[str, Any]:
    """The request body as a JSON object; raises ApiError 413 or InvalidMessage."""
    limit = st(request).config.max_json_bytes
    too_large = ApiError(413, "body_too_large", f"request body is over {limit} bytes")
    data = await read_body(request, limit, too_large)
    return load_json_object(data, "request body", max_bytes=limit)


def query_number(request: web.Request, name: str, default: float, maximum: float) -> float:
    """A non-negative numeric query parameter; raises InvalidMessage when malformed."""
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise InvalidMessage(f"query parameter {name} must be a number", name) from None
    if not 0 <= value <= maximum or value != value:
        raise InvalidMessage(f"query parameter {name} must be between 0 and {maximum}", name)
    return value


def actor_of(request: web.Request) -> str:
    """Who calls, as the audit log names them (never the secret)."""
    p = request.get(PRINCIPAL)
    if isinstance(p, Operator):
        return f"token:{p.token_id}:{p.name}"
    if isinstance(p, AgentCaller):
        return f"agent:{p.agent_id}"
    return "anonymous"
