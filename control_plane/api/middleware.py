"""The middlewares every request passes: errors, per-source refusal limit, audit, auth.

The app installs them outermost first: audit, source limit, errors, auth.
"""

from __future__ import annotations

import ipaddress
import logging
import re

from aiohttp import web

from control_plane.api.errors import ApiError, to_api
from control_plane.api.request import PRINCIPAL, actor_of, error_response, json_response, st
from control_plane.api.route import Handler
from control_plane.api.routes import PUBLIC_PATHS
from control_plane.errors import DatabaseBusy, DomainError
from control_plane.security import audit, credentials
from control_plane.security.auth import AgentCaller, Operator, authenticate
from control_plane.security.ratelimit import RateLimiter
from protocol.exceptions import InvalidMessage

log = logging.getLogger("modelfleet.control_plane")


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Render every refusal as ``{"error": {...}}``; never a traceback."""
    try:
        return await handler(request)
    except ApiError as exc:
        return error_response(exc)
    except (DomainError, InvalidMessage) as exc:
        return error_response(to_api(exc))
    except DatabaseBusy as exc:
        # Every connection is in use (or the server refuses more): the caller may retry.
        log.warning("%s %s: %s", request.method, request.path, exc)
        return error_response(to_api(exc))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = exc.reason.lower().replace(" ", "_")
        return json_response(ApiError(exc.status, code, exc.reason).to_json(), exc.status)
    except Exception:
        # The boundary of every request: log it, answer 500, keep serving.
        log.exception("unhandled error on %s %s", request.method, request.path)
        return json_response(ApiError(500, "internal", "internal server error").to_json(), 500)


def source_of(request: web.Request) -> str:
    """The key of a request's source: its address, or its /64 for IPv6 (one host's share)."""
    remote = request.remote or ""
    try:
        addr = ipaddress.ip_address(remote)
    except ValueError:
        return remote
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.ip_network(f"{addr}/64", strict=False))
    return str(addr)


@web.middleware
async def source_limit_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Bound what one source may spend on unauthenticated refusals: 429 once it is spent.

    A 401 anywhere, and any 4xx of a public route (enroll with a bad token or body), costs
    the source one token; authenticated callers have their own limit (auth_middleware) and
    are not charged for a 403. Health checks are never refused here.

    A spent source still reaches the routes with a bearer credential: agents behind the same
    NAT, proxy or /64 as an attacker keep reporting, and a refused credential is answered 429
    rather than 401 (a credential costs one indexed lookup; scrypt runs only for a stored one).
    """
    limiter = st(request).refusal_limiter
    if limiter is None or not request.path.startswith("/api/v1/"):
        return await handler(request)
    source = source_of(request)
    wait = 0.0 if request.path == "/api/v1/health" else limiter.peek(source)
    credential = request.path not in PUBLIC_PATHS and request.headers.get(
        "Authorization", ""
    ).lower().startswith("bearer ")
    if wait and not credential:
        return _too_many_refusals(wait)
    resp = await handler(request)
    if resp.status == 401 or (400 <= resp.status < 500 and request.path in PUBLIC_PATHS):
        limiter.take(source)
        if wait:
            return _too_many_refusals(wait)
    return resp


def _too_many_refusals(wait: float) -> web.Response:
    return error_response(
        ApiError(
            429,
            "too_many_refusals",
            f"too many refused requests from this address; retry in {wait:.1f}s",
            headers={"Retry-After": RateLimiter.retry_after(wait)},
        )
    )


AUDIT_QUIET = re.compile(r"^/api/v1/agents/[^/]+/(status|metrics|desired)$")


@web.middleware
async def audit_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Record every change (any method but GET/HEAD) and every refusal (401, 403, 429)."""
    resp = await handler(request)
    status = resp.status
    refused = status in (401, 403, 429)
    change = request.method not in ("GET", "HEAD", "OPTIONS")
    if not request.path.startswith("/api/v1/") or not (refused or change):
        return resp
    if not refused and (AUDIT_QUIET.match(request.path) or status >= 500):
        return resp  # an agent's routine report (data, not a change), or nothing changed
    actor = actor_of(request)
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else None
    state = st(request)
    action = f"{request.method} {route or request.path}"
    try:
        if refused and state.refusals is not None:
            await state.refusals.record(
                state.clock(), actor, action, request.path, status, source_of(request), route
            )
        else:
            await audit.append(
                state.db,
                state.clock(),
                actor,
                action,
                request.path,
                status,
                request.remote or "",
                {"route": route},
            )
    except Exception:
        # The answer already happened; a lost audit row is logged loudly, never hidden.
        log.exception(
            "could not append to the audit log: %s %s %s", actor, request.method, request.path
        )
    return resp


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Resolve the bearer token of every /api/v1 route but the public ones, and /metrics."""
    guarded = request.path.startswith("/api/v1/") or request.path == "/metrics"
    if not guarded or request.path in PUBLIC_PATHS:
        return await handler(request)
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "unauthenticated", "missing 'Authorization: Bearer <token>' header")
    state = st(request)
    principal = await authenticate(state.db, token.strip())
    if principal is None:
        raise ApiError(401, "unauthenticated", "the bearer token is not valid")
    request[PRINCIPAL] = principal
    if isinstance(principal, AgentCaller) and principal.rotated:
        await credentials.promote(state.db, principal.agent_id, token.strip())
    elif isinstance(principal, AgentCaller) and principal.legacy:
        await credentials.upgrade(
            state.db, principal.agent_id, token.strip(), state.config.credential_cost
        )
    limiter = state.limiter
    if limiter is not None:
        key = (
            ("token", principal.token_id)
            if isinstance(principal, Operator)
            else ("agent", principal.agent_id)
        )
        wait = limiter.take(key)
        if wait:
            raise ApiError(
                429,
                "rate_limited",
                f"too many requests from this {key[0]}; retry in {wait:.1f}s",
                headers={"Retry-After": RateLimiter.retry_after(wait)},
            )
    return await handler(request)


# Outermost first: the audit sees every answer, errors become JSON before it does.
MIDDLEWARES = (audit_middleware, source_limit_middleware, error_middleware, auth_middleware)
