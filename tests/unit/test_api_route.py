"""The REST layer's pure parts: the Route type, check_access (the one place a route's auth and
scope are enforced), HTTP Range parsing, and the desired-state re-sign rule."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from control_plane.api.blobs import parse_range
from control_plane.api.errors import ApiError
from control_plane.api.request import PRINCIPAL
from control_plane.api.route import Auth, Route, check_access
from control_plane.api.routes import PUBLIC_PATHS, ROUTES
from control_plane.fleet.desired import expiring
from control_plane.security.auth import AgentCaller, Operator


async def _ok(request: web.Request) -> web.Response:
    return web.Response()


def _request(path: str, principal: object, match_info: dict[str, str]) -> web.Request:
    request = make_mocked_request("GET", path, match_info=match_info)
    if principal is not None:
        request[PRINCIPAL] = principal
    return request


def _refusal(route: Route, principal: object, agent_id: str = "a1") -> str | None:
    request = _request(route.path.replace("{id}", agent_id), principal, {"id": agent_id})
    try:
        check_access(route, request)
    except ApiError as exc:
        assert exc.status == 403
        return exc.code
    return None


def test_route_settings_are_keyword_only() -> None:
    with pytest.raises(TypeError):
        Route("GET", "/x", _ok, "summary", "none")  # type: ignore[misc]
    r = Route("GET", "/x", _ok, summary="s", auth="none")
    assert (r.body, r.responses, r.scope) == (None, (200,), "fleet:read")


def test_every_route_is_declared_once() -> None:
    keys = [(r.method, r.path) for r in ROUTES]
    assert len(keys) == len(set(keys))


ADMIN = Operator(1, "admin", ("admin",))
READER = Operator(2, "reader", ("fleet:read",))
WRITER = Operator(3, "writer", ("models:write",))
OWN = AgentCaller("a1")
OTHER = AgentCaller("a2")
PENDING = AgentCaller("a1", pending=True)


@pytest.mark.parametrize(
    ("auth", "principal", "refusal"),
    [
        ("none", None, None),
        ("any", OWN, None),
        ("any", READER, None),
        ("any", WRITER, "insufficient_scope"),
        ("operator", READER, None),
        ("operator", WRITER, "insufficient_scope"),
        ("operator", OWN, "forbidden"),
        ("agent", OWN, None),
        ("agent", OTHER, "forbidden"),
        ("agent", ADMIN, "forbidden"),
        ("agent-or-operator", OWN, None),
        ("agent-or-operator", OTHER, "forbidden"),
        ("agent-or-operator", READER, None),
        ("agent-or-operator", WRITER, "insufficient_scope"),
    ],
)
def test_check_access(auth: Auth, principal: object, refusal: str | None) -> None:
    route = Route("GET", "/api/v1/things/{id}", _ok, summary="s", auth=auth)
    assert _refusal(route, principal) == refusal


def test_a_pending_agent_reaches_only_what_it_may_while_it_waits() -> None:
    status = Route("POST", "/api/v1/agents/{id}/status", _ok, summary="s", auth="agent")
    metrics = Route("POST", "/api/v1/agents/{id}/metrics", _ok, summary="s", auth="agent")
    assert _refusal(status, PENDING) is None
    assert _refusal(metrics, PENDING) == "pending_approval"


def _range(header: str | None, size: int, if_range: str | None = None) -> tuple[int, int] | None:
    headers = {} if header is None else {"Range": header}
    if if_range is not None:
        headers["If-Range"] = if_range
    request = make_mocked_request(
        "GET", "/api/v1/blobs/d", headers=headers, match_info={"digest": "d"}
    )
    return parse_range(request, size)


def test_parse_range() -> None:
    assert _range(None, 10) is None
    assert _range("bytes=2-4", 10) == (2, 4)
    assert _range("bytes=5-", 10) == (5, 9)
    assert _range("bytes=-3", 10) == (7, 9)
    assert _range("bytes=2-100", 10) == (2, 9)
    assert _range("bytes=2-4", 10, if_range='"other"') is None
    assert _range("bytes=2-4", 10, if_range='"d"') == (2, 4)
    with pytest.raises(ApiError) as exc:
        _range("bytes=10-", 10)
    assert exc.value.status == 416
    with pytest.raises(ApiError) as exc:
        _range("lines=1-2", 10)
    assert exc.value.status == 416


def test_desired_state_is_re_signed_past_half_its_lifetime() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    ttl = timedelta(hours=1)
    doc = {"expiresAt": (now + timedelta(minutes=31)).isoformat().replace("+00:00", "Z")}
    assert not expiring(doc, now, ttl)
    assert expiring(doc, now + timedelta(minutes=1), ttl)
    assert expiring(doc, now + timedelta(hours=2), ttl)


def test_the_public_paths_are_the_routes_that_say_so() -> None:
    # The middlewares skip authentication on these; a public route with a path parameter
    # could not be matched by path and would be refused instead.
    assert {"/api/v1/agents/enroll", "/api/v1/health"} <= PUBLIC_PATHS
    assert not [p for p in PUBLIC_PATHS if "{" in p]
