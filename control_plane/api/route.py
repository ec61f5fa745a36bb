"""The Route type, and the one place a route's ``auth`` and ``scope`` are enforced.

Handlers never check who calls: ``guarded(route)`` wraps each one when the table is
registered, so what the OpenAPI document says of a route is what the server does.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import KW_ONLY, dataclass
from typing import Literal

from aiohttp import web

from control_plane.api.errors import ApiError
from control_plane.api.request import PRINCIPAL
from control_plane.security.auth import AgentCaller, Operator
from protocol.fields import check_plain

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# none: public. operator: an operator's API token. agent: the agent named in {id}, with its
# own credential. agent-or-operator: either. any: any valid credential.
Auth = Literal["none", "operator", "agent", "agent-or-operator", "any"]


@dataclass(frozen=True)
class Route:
    """One route and what the OpenAPI document says of it."""

    method: str
    path: str
    handler: Handler
    _: KW_ONLY
    summary: str
    auth: Auth
    body: str | None = None  # media type of the request body
    responses: tuple[int, ...] = (200,)
    scope: str = "fleet:read"  # what an operator's API token needs here (admin has all)


# What an agent that waits for approval may do: be seen (status) and wait (long-poll).
PENDING_ROUTES = frozenset(
    {
        "/api/v1/agents/{id}",
        "/api/v1/agents/{id}/desired",
        "/api/v1/agents/{id}/status",
        "/api/v1/keyset",
    }
)


def check_access(route: Route, request: web.Request) -> None:
    """Raise ApiError 403 unless the caller may use ``route``.

    In this order: an agent waiting for approval only reaches PENDING_ROUTES; an operator's
    token must carry the route's scope; then the route's ``auth``: an agent credential only
    reaches its own ``{id}``, and only routes that name an agent.
    """
    p = request.get(PRINCIPAL)
    if isinstance(p, AgentCaller) and p.pending and route.path not in PENDING_ROUTES:
        raise ApiError(
            403, "pending_approval", "this agent waits for an operator's approval", "agentId"
        )
    if isinstance(p, Operator) and not p.allows(route.scope):
        raise ApiError(
            403,
            "insufficient_scope",
            f"this API token lacks the {route.scope!r} scope this route needs",
            "scope",
        )
    if route.auth == "operator" and not isinstance(p, Operator):
        raise ApiError(403, "forbidden", "this route needs an operator API token")
    if route.auth in ("agent", "agent-or-operator"):
        if isinstance(p, AgentCaller):
            if p.agent_id != request.match_info["id"]:
                raise ApiError(403, "forbidden", "an agent credential only reaches its own routes")
        elif route.auth == "agent" or not isinstance(p, Operator):
            raise ApiError(403, "forbidden", "this route needs the agent's own credential")


def check_path_params(request: web.Request) -> None:
    """Raise InvalidMessage (400) naming a path parameter that holds a control character.

    Percent-decoded, a path can carry a NUL, which PostgreSQL refuses in any text it is
    given: a 500 for a lookup that should simply find nothing.
    """
    for name, value in request.match_info.items():
        check_plain(value, f"path parameter {name}")


def guarded(route: Route) -> Handler:
    """The route's handler behind its access check."""

    async def handler(request: web.Request) -> web.StreamResponse:
        check_access(route, request)
        check_path_params(request)
        return await route.handler(request)

    return handler
