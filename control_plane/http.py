"""The control plane's REST API: app factory, middleware, handlers and the route table.

Handlers are thin: they parse the request into typed values at this edge, call the service
modules (registry, fleet, rollouts) and render JSON. The route table also feeds the OpenAPI
document, so the two cannot drift apart.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import re
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import select

from control_plane import audit, credentials, fleet, keyset, registry, reports, rollouts, tokens
from control_plane.auth import AgentCaller, Operator, authenticate, ensure_admin_token
from control_plane.blobstore import BlobNotFound, BlobStore, open_blob_store
from control_plane.config import ServerConfig
from control_plane.db.engine import Database, PoolLimits
from control_plane.db.models import DesiredStateRow
from control_plane.desired import DesiredSigner
from control_plane.errors import ApiError, DatabaseBusy
from control_plane.files import ensure_private_dir
from control_plane.ingest import Ingestor
from control_plane.keys import load_or_create_signing_key, load_trusted_publishers
from control_plane.notify import DesiredNotifier
from control_plane.ratelimit import RateLimiter
from control_plane.rollout.controller import RolloutController
from protocol.bundle import BundleLimits
from protocol.digest import check_digest
from protocol.dsse import public_key_to_pem
from protocol.exceptions import InvalidMessage
from protocol.fields import load_json_object
from protocol.labels import parse_selector
from protocol.reports import metrics_from_json, status_from_json
from protocol.timeutil import parse_time

log = logging.getLogger("modelfleet.control_plane")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Clock = Callable[[], datetime]


@dataclass
class State:
    """What every handler may use; held in one AppKey."""

    config: ServerConfig
    db: Database
    store: BlobStore
    signer: DesiredSigner
    notifier: DesiredNotifier
    trusted: dict[str, Ed25519PublicKey]
    clock: Clock
    controller: RolloutController
    ingest: Ingestor
    limiter: RateLimiter | None = None
    # Unauthenticated refusals per source address (see source_limit_middleware).
    refusal_limiter: RateLimiter | None = None
    refusals: audit.RefusalLog | None = None
    # Set when SIGTERM's drain begins: long-polls answer at once instead of waiting.
    draining: asyncio.Event = field(default_factory=asyncio.Event)
    polling: dict[str, int] = field(default_factory=dict)  # agent id -> long-polls waiting

    def drain(self) -> None:
        """Begin draining: every waiting long-poll answers now, new ones at once."""
        self.draining.set()
        self.notifier.wake(list(self.polling))


STATE = web.AppKey("state", State)
MQTT = web.AppKey("mqtt", object)  # the MqttBridge when a broker is configured
PRINCIPAL = web.RequestKey("principal", object)
BLOB_CHUNK = 256 * 1024


def _utcnow() -> datetime:
    return datetime.now(UTC)


# ---------------------------------------------------------------------------------- helpers


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


async def read_json(request: web.Request) -> dict[str, Any]:
    """The request body as a JSON object; raises ApiError 413 or InvalidMessage."""
    limit = st(request).config.max_json_bytes
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(413, "body_too_large", f"request body is over {limit} bytes")
    data = bytearray()
    try:
        async with asyncio.timeout(st(request).config.body_timeout_s):
            # read() answers with what has arrived: read until the end of the body.
            while chunk := await request.content.read(limit + 1 - len(data)):
                data += chunk
                if len(data) > limit:
                    raise ApiError(413, "body_too_large", f"request body is over {limit} bytes")
    except TimeoutError:
        raise ApiError(408, "body_timeout", "the request body did not arrive in time") from None
    return load_json_object(bytes(data), "request body", max_bytes=limit)


def operator(request: web.Request) -> Operator:
    """The calling operator; raises ApiError 403 for an agent credential."""
    p = request.get(PRINCIPAL)
    if not isinstance(p, Operator):
        raise ApiError(403, "forbidden", "this route needs an operator API token")
    return p


def agent_or_operator(request: web.Request, agent_id: str, *, agent_only: bool = False) -> None:
    """Allow the agent named in the path (and operators unless ``agent_only``)."""
    p = request.get(PRINCIPAL)
    if isinstance(p, AgentCaller):
        if p.agent_id != agent_id:
            raise ApiError(403, "forbidden", "an agent credential only reaches its own routes")
        return
    if agent_only or not isinstance(p, Operator):
        raise ApiError(403, "forbidden", "this route needs the agent's own credential")


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


# ------------------------------------------------------------------------------- middleware

PUBLIC_PATHS = {"/api/v1/agents/enroll", "/api/v1/openapi.json", "/api/v1/health"}


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Render every refusal as ``{"error": {...}}``; never a traceback."""
    try:
        return await handler(request)
    except ApiError as exc:
        return error_response(exc)
    except InvalidMessage as exc:
        return json_response(ApiError(400, "invalid", str(exc), exc.field).to_json(), 400)
    except DatabaseBusy as exc:
        # Every connection is in use (or the server refuses more): the caller may retry.
        log.warning("%s %s: %s", request.method, request.path, exc)
        retry = {"Retry-After": RateLimiter.retry_after(exc.retry_after_s)}
        return error_response(
            ApiError(503, "database_busy", "the database is busy; retry shortly", headers=retry)
        )
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = exc.reason.lower().replace(" ", "_")
        return json_response(ApiError(exc.status, code, exc.reason).to_json(), exc.status)
    except Exception:
        # The boundary of every request: log it, answer 500, keep serving.
        log.exception("unhandled error on %s %s", request.method, request.path)
        return json_response(ApiError(500, "internal", "internal server error").to_json(), 500)


# What an agent that waits for approval may do: be seen (status) and wait (long-poll).
PENDING_ROUTES = {"/api/v1/agents/{id}", "/api/v1/agents/{id}/desired",
                  "/api/v1/agents/{id}/status", "/api/v1/keyset"}  # fmt: skip


def scoped(route: Route) -> Handler:
    """The route's handler behind its scope check: an operator's token must carry the scope."""

    async def handler(request: web.Request) -> web.StreamResponse:
        p = request.get(PRINCIPAL)
        if isinstance(p, AgentCaller) and p.pending and route.path not in PENDING_ROUTES:
            raise ApiError(403, "pending_approval",
                           "this agent waits for an operator's approval", "agentId")  # fmt: skip
        if isinstance(p, Operator) and not p.allows(route.scope):
            raise ApiError(403, "insufficient_scope",
                           f"this API token lacks the {route.scope!r} scope this route needs",
                           "scope")  # fmt: skip
        return await route.handler(request)

    return handler


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
async def source_limit_middleware(request: web.Request, handler: Handler
                                  ) -> web.StreamResponse:  # fmt: skip
    """Bound what one source may spend on unauthenticated refusals: 429 once it is spent.

    A 401 anywhere, and any 4xx of a public route (enroll with a bad token or body), costs
    the source one token; authenticated callers have their own limit (auth_middleware) and
    are not charged for a 403. Health checks are never refused here.
    """
    limiter = st(request).refusal_limiter
    if limiter is None or not request.path.startswith("/api/v1/"):
        return await handler(request)
    source = source_of(request)
    if request.path != "/api/v1/health" and (wait := limiter.peek(source)):
        return error_response(ApiError(
            429, "too_many_refusals",
            f"too many refused requests from this address; retry in {wait:.1f}s",
            headers={"Retry-After": RateLimiter.retry_after(wait)},
        ))  # fmt: skip
    resp = await handler(request)
    if resp.status == 401 or (400 <= resp.status < 500 and request.path in PUBLIC_PATHS):
        limiter.take(source)
    return resp


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
    p = request.get(PRINCIPAL)
    if isinstance(p, Operator):
        actor = f"token:{p.token_id}:{p.name}"
    elif isinstance(p, AgentCaller):
        actor = f"agent:{p.agent_id}"
    else:
        actor = "anonymous"
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else None
    state = st(request)
    action = f"{request.method} {route or request.path}"
    try:
        if refused and state.refusals is not None:
            await state.refusals.record(state.clock(), actor, action, request.path, status,
                                        source_of(request), route)  # fmt: skip
        else:
            await audit.append(state.db, state.clock(), actor, action, request.path, status,
                               request.remote or "", {"route": route})  # fmt: skip
    except Exception:
        # The answer already happened; a lost audit row is logged loudly, never hidden.
        log.exception("could not append to the audit log: %s %s %s", actor, request.method,
                      request.path)  # fmt: skip
    return resp


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Resolve the bearer token of every /api/v1 route but the public ones."""
    if not request.path.startswith("/api/v1/") or request.path in PUBLIC_PATHS:
        return await handler(request)
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "unauthenticated", "missing 'Authorization: Bearer <token>' header")
    principal = await authenticate(st(request).db, token.strip())
    if principal is None:
        raise ApiError(401, "unauthenticated", "the bearer token is not valid")
    request[PRINCIPAL] = principal
    if isinstance(principal, AgentCaller) and principal.rotated:
        await credentials.promote(st(request).db, principal.agent_id, token.strip())
    elif isinstance(principal, AgentCaller) and principal.legacy:
        await credentials.upgrade(st(request).db, principal.agent_id, token.strip(),
                                  st(request).config.credential_cost)  # fmt: skip
    limiter = st(request).limiter
    if limiter is not None:
        key = ("token", principal.token_id) if isinstance(principal, Operator) else (
            "agent", principal.agent_id)  # fmt: skip
        wait = limiter.take(key)
        if wait:
            raise ApiError(429, "rate_limited",
                           f"too many requests from this {key[0]}; retry in {wait:.1f}s",
                           headers={"Retry-After": RateLimiter.retry_after(wait)})  # fmt: skip
    return await handler(request)


# --------------------------------------------------------------------------------- handlers


async def health(request: web.Request) -> web.Response:
    """Liveness plus a database round trip, the MQTT bridge's counters when there is one, and
    what the loops set aside to go on (control_plane/setaside.py)."""
    from control_plane.rollup import set_aside_count

    state = st(request)
    async with state.db.read() as s:
        await s.execute(select(1))
        held = await set_aside_count(s)
    ingest = state.ingest
    out: dict[str, Any] = {
        "status": "ok",
        "ingest": {"reports": ingest.reports, "transactions": ingest.transactions,
                   "largestBatch": ingest.largest_batch},
    }  # fmt: skip
    bridge = request.app.get(MQTT)
    if bridge is not None:
        out["mqtt"] = {
            "connected": bridge.connected.is_set(),  # type: ignore[attr-defined]
            "stored": bridge.stored,  # type: ignore[attr-defined]
            "malformed": bridge.malformed,  # type: ignore[attr-defined]
            "leftForRedelivery": bridge.redelivery,  # type: ignore[attr-defined]
        }
    controller = state.controller
    out["setAside"] = {
        "rollouts": controller.set_aside,  # a rollout set aside, once per distinct reason
        "rolloutsFailing": len(controller.failing),  # rollouts whose last advance failed
        "metricRows": controller.skipped_rows.count,  # rows gates and reports left out
        "rollupRows": held,  # rows held in metric_set_aside
        "mqttMalformed": bridge.malformed if bridge is not None else 0,  # type: ignore[attr-defined]
        "notify": state.notifier.set_aside,  # failed listeners and garbage notifications
    }
    return json_response(out)


async def openapi_json(request: web.Request) -> web.Response:
    """The OpenAPI document."""
    from control_plane.openapi import build_openapi

    return json_response(build_openapi(ROUTES))


async def post_bundle(request: web.Request) -> web.Response:
    """Upload a .mfb bundle; the body is the raw tar."""
    operator(request)
    state = st(request)
    limit = state.config.max_bundle_bytes
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(413, "bundle_too_large", f"bundle is over the {limit}-byte limit")
    tmp_dir = state.config.data_dir / "tmp"
    tmp_dir.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=tmp_dir, prefix="upload-", suffix=".mfb")
    path = Path(name)
    try:
        size = 0
        with os.fdopen(fd, "wb") as f:
            async for chunk in request.content.iter_chunked(BLOB_CHUNK):
                size += len(chunk)
                if size > limit:
                    raise ApiError(
                        413, "bundle_too_large", f"bundle is over the {limit}-byte limit"
                    )
                await asyncio.to_thread(f.write, chunk)
        if size == 0:
            raise ApiError(400, "invalid_bundle", "request body is empty")
        limits = BundleLimits(max_total_bytes=limit, max_member_bytes=limit)
        trust = await keyset.publisher_trust(state.db, state.trusted)
        result = await registry.ingest_bundle(state.db, state.store, trust, path, limits)
    finally:
        await asyncio.to_thread(path.unlink, missing_ok=True)
    log.info("push %s %s %s", result.name, result.version, "stored" if result.created else "same")
    return json_response(result.to_json(), 201 if result.created else 200)


async def get_models(request: web.Request) -> web.Response:
    """List models."""
    operator(request)
    return json_response({"models": await registry.list_models(st(request).db)})


async def get_versions(request: web.Request) -> web.Response:
    """List one model's versions."""
    operator(request)
    name = request.match_info["name"]
    return json_response({"versions": await registry.list_versions(st(request).db, name)})


async def get_manifest(request: web.Request) -> web.Response:
    """A version's signed manifest envelope, by manifest digest."""
    digest = check_digest(request.match_info["digest"], "digest")
    env = await registry.get_envelope(st(request).db, digest)
    return web.Response(body=env.encode(), content_type="application/json")


def _parse_range(request: web.Request, size: int) -> tuple[int, int] | None:
    """(start, end inclusive) of a satisfiable Range, None for the whole blob."""
    if "Range" not in request.headers:
        return None
    if_range = request.headers.get("If-Range")
    if if_range is not None and if_range != f'"{request.match_info["digest"]}"':
        return None
    try:
        rng = request.http_range
    except ValueError:
        raise ApiError(416, "bad_range", "Range header is malformed") from None
    start, stop = rng.start, rng.stop
    if start is None and stop is None:
        return None
    if start is None:
        start = 0
    if start < 0:  # suffix range: the last -start bytes
        start = max(0, size + start)
        stop = size
    stop = size if stop is None else min(stop, size)
    if start >= size or start >= stop:
        raise ApiError(416, "range_not_satisfiable", f"range outside a {size}-byte blob")
    return start, stop - 1


async def get_blob(request: web.Request) -> web.StreamResponse:
    """A blob, with Range, ETag and Content-Length so downloads resume."""
    digest = check_digest(request.match_info["digest"], "digest")
    store = st(request).store
    try:
        size = await asyncio.to_thread(store.size, digest)
    except BlobNotFound:
        raise ApiError(404, "blob_not_found", f"no blob {digest}", "digest") from None
    etag = f'"{digest}"'
    headers = {"ETag": etag, "Accept-Ranges": "bytes", "Cache-Control": "immutable"}
    if request.headers.get("If-None-Match") == etag:
        return web.Response(status=304, headers=headers)
    try:
        rng = _parse_range(request, size)
    except ApiError as exc:
        if exc.status == 416:
            headers["Content-Range"] = f"bytes */{size}"
            return web.json_response(exc.to_json(), status=416, headers=headers)
        raise
    start, end = rng if rng else (0, size - 1)
    length = end - start + 1 if size else 0
    resp = web.StreamResponse(status=206 if rng else 200, headers=headers)
    resp.content_type = "application/octet-stream"
    resp.content_length = length
    if rng:
        resp.headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    await resp.prepare(request)
    if request.method == "HEAD":
        return resp
    try:
        chunks = await asyncio.to_thread(store.open_range, digest, start, length)
    except BlobNotFound:  # removed between the size and the read: cut the response short
        return resp
    while (chunk := await asyncio.to_thread(next, chunks, None)) is not None:
        await resp.write(chunk)
    await resp.write_eof()
    return resp


async def post_enrollment_token(request: web.Request) -> web.Response:
    """Create an enrollment token."""
    operator(request)
    state = st(request)
    body = await read_json(request)
    out = await fleet.create_enrollment_token(
        state.db, body, state.clock(), state.config.enrollment_token_ttl_s
    )
    return json_response(out, 201)


async def post_enroll(request: web.Request) -> web.Response:
    """Enroll an agent with an enrollment token; returns its credential and the keys it needs."""
    state = st(request)
    body = await read_json(request)
    agent, credential, mqtt_password = await fleet.enroll(
        state.db, state.signer, body, state.clock(), state.config.credential_cost
    )
    log.info("enrolled agent %s (%s) labels=%s", agent["agentId"], agent["name"], agent["labels"])
    found = await keyset.latest(state.db)
    trust = keyset.trust_of(found[0] if found else None, state.trusted)
    out = {
        **agent,
        "credential": credential,
        "controlPlaneKey": public_key_to_pem(state.signer.key.public_key()).decode(),
        "trustedPublishers": [public_key_to_pem(k).decode() for k in trust.keys.values()],
        "heartbeatSeconds": state.config.heartbeat_s,
    }
    if found is not None:
        out["keyset"] = found[1]  # the agent trusts it as it trusts this answer (TLS)
    cfg = state.config
    if cfg.mqtt_url:
        out["mqtt"] = {
            "url": cfg.mqtt_public_url or cfg.mqtt_url,
            "username": agent["agentId"],
            "password": mqtt_password,
            "prefix": cfg.mqtt_prefix,
        }
    return json_response(out, 201)


async def get_agents(request: web.Request) -> web.Response:
    """List agents."""
    operator(request)
    state = st(request)
    text = request.query.get("selector")
    selector = parse_selector(text) if text else None
    agents = await fleet.list_agents(
        state.db, state.clock(), state.config.offline_after_s, selector
    )
    return json_response({"agents": agents})


async def get_agent(request: web.Request) -> web.Response:
    """One agent."""
    agent_id = request.match_info["id"]
    agent_or_operator(request, agent_id)
    state = st(request)
    return json_response(
        await fleet.get_agent(state.db, agent_id, state.clock(), state.config.offline_after_s)
    )


async def _current_desired(state: State, agent_id: str) -> DesiredStateRow | None:
    async with state.db.read() as s:
        return await s.get(DesiredStateRow, agent_id)


async def _refresh_if_expiring(state: State, row: DesiredStateRow) -> DesiredStateRow:
    """Re-sign a document past half its lifetime, so a connected agent never holds a stale one."""
    now = state.clock()
    expires = parse_time(row.document.get("expiresAt"), "expiresAt")
    if expires - now > timedelta(seconds=state.config.desired_ttl_s / 2):
        return row
    from protocol.desired import desired_from_json

    async with state.db.write() as s:
        models = desired_from_json(row.document).models
        await state.signer.write(s, row.agent_id, models, now, force=True)
    fresh = await _current_desired(state, row.agent_id)
    assert fresh is not None
    return fresh


async def get_desired(request: web.Request) -> web.Response:
    """Long-poll for a desired state newer than ``after``; 204 when none came within ``wait``."""
    agent_id = request.match_info["id"]
    agent_or_operator(request, agent_id)
    state = st(request)
    after = int(query_number(request, "after", 0, 2**62))
    wait = query_number(request, "wait", 0, state.config.long_poll_max_s)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    while True:
        row = await _current_desired(state, agent_id)
        if row is not None:
            row = await _refresh_if_expiring(state, row)
            if row.generation > after:
                return web.Response(
                    body=row.envelope.encode(),
                    content_type="application/json",
                    headers={"X-Modelfleet-Generation": str(row.generation)},
                )
        remaining = deadline - loop.time()
        if remaining <= 0 or state.draining.is_set():
            return web.Response(status=204)  # draining: the agent asks again elsewhere / later
        # No session is open here: a waiting long-poll holds a connection, never a database one.
        state.polling[agent_id] = state.polling.get(agent_id, 0) + 1
        try:
            await state.notifier.wait(agent_id, min(remaining, state.config.long_poll_recheck_s))
        finally:
            state.polling[agent_id] -= 1
            if not state.polling[agent_id]:
                del state.polling[agent_id]


async def post_status(request: web.Request) -> web.Response:
    """An agent's status report."""
    agent_id = request.match_info["id"]
    agent_or_operator(request, agent_id, agent_only=True)
    state = st(request)
    body = fleet.parse_report_body(await read_json(request), agent_id)
    # Stale (older than the stored status, control_plane/status_order.py): a 200 all the
    # same, so the agent does not send it again; its next report is newer.
    stored = await state.ingest.status(status_from_json(body))
    return json_response({"stored": stored, "stale": not stored})


async def post_metrics(request: web.Request) -> web.Response:
    """A metrics batch; stored once per (agent, seq), so retries are safe."""
    agent_id = request.match_info["id"]
    agent_or_operator(request, agent_id, agent_only=True)
    state = st(request)
    batch = metrics_from_json(fleet.parse_report_body(await read_json(request), agent_id))
    stored = await state.ingest.metrics(batch)
    return json_response({"stored": stored, "duplicate": not stored, "seq": batch.seq})


async def post_rollout(request: web.Request) -> web.Response:
    """Create a rollout; the controller starts it at once."""
    operator(request)
    state = st(request)
    body = await read_json(request)
    trust = await keyset.publisher_trust(state.db, state.trusted)
    rollout_id = await rollouts.create_rollout(state.db, body, state.clock(), trust)
    await state.controller.advance_one(rollout_id)
    return json_response(await rollouts.get_rollout(state.db, rollout_id), 201)


async def get_rollouts(request: web.Request) -> web.Response:
    """List rollouts, newest first."""
    operator(request)
    return json_response({"rollouts": await rollouts.list_rollouts(st(request).db)})


async def get_rollout(request: web.Request) -> web.Response:
    """One rollout: stages, cohort sizes, gate results, timeline, targets."""
    operator(request)
    return json_response(await rollouts.get_rollout(st(request).db, request.match_info["id"]))


async def post_rollout_command(request: web.Request) -> web.Response:
    """pause, resume, promote or abort (body ``{"rollback": false}`` keeps moved agents)."""
    operator(request)
    state = st(request)
    action = request.match_info["action"]
    if action not in ("pause", "resume", "promote", "abort"):
        raise ApiError(404, "unknown_command", f"no rollout command {action!r}", "action")
    body = await read_json(request) if request.can_read_body else {}
    rollback = body.get("rollback", True)
    if not isinstance(rollback, bool):
        raise ApiError(400, "invalid", "rollback must be true or false", "rollback")
    rollout_id = request.match_info["id"]
    await rollouts.run_command(state.db, state.signer, state.notifier, rollout_id, action,
                               rollback, state.clock())  # fmt: skip
    state.controller.kick()
    return json_response(await rollouts.get_rollout(state.db, rollout_id))


async def get_compare(request: web.Request) -> web.Response:
    """Compare where a model runs best: groups by site (or a label, agent, version), with
    merged latency percentiles, throughput, error rate and cost per million inferences."""
    operator(request)
    state = st(request)
    report = await reports.compare(
        state.db, dict(request.query), state.clock(), skipped=state.controller.skipped_rows
    )
    return json_response(report)


async def get_timeseries(request: web.Request) -> web.Response:
    """Requests, errors and p95 per group per time bucket, for charts."""
    operator(request)
    state = st(request)
    report = await reports.timeseries(
        state.db, dict(request.query), state.clock(), skipped=state.controller.skipped_rows
    )
    return json_response(report)


async def get_fleet(request: web.Request) -> web.Response:
    """Agents by site and state, versions deployed per model, active rollouts."""
    operator(request)
    state = st(request)
    return json_response(await reports.fleet(state.db, state.clock(), state.config.offline_after_s))


# ------------------------------------------------------------------------------ route table


async def post_credential(request: web.Request) -> web.Response:
    """A new credential for the calling agent; the old one works until the new one is used."""
    agent_id = request.match_info["id"]
    agent_or_operator(request, agent_id, agent_only=True)
    credential = await credentials.rotate(
        st(request).db, agent_id, st(request).config.credential_cost
    )
    return json_response({"agentId": agent_id, "credential": credential})


async def post_approve(request: web.Request) -> web.Response:
    """Approve an agent that enrolled with a token requiring approval."""
    operator(request)
    state = st(request)
    agent_id = request.match_info["id"]
    changed = await credentials.approve(state.db, state.signer, agent_id, state.clock())
    state.notifier.notify(changed)
    return json_response({"agentId": agent_id, "approved": True})


async def post_revoke(request: web.Request) -> web.Response:
    """Revoke an agent: its credential, its broker password and its desired state go at once."""
    operator(request)
    state = st(request)
    agent_id = request.match_info["id"]
    await credentials.revoke(state.db, agent_id, state.clock())
    state.notifier.notify([agent_id])  # wakes its long-poll; the MQTT bridge clears its topic
    return json_response({"agentId": agent_id, "revoked": True})


async def post_token(request: web.Request) -> web.Response:
    """Create an API token."""
    operator(request)
    state = st(request)
    return json_response(await tokens.create_token(state.db, await read_json(request),
                                                   state.clock()), 201)  # fmt: skip


async def get_tokens(request: web.Request) -> web.Response:
    """List API tokens."""
    operator(request)
    state = st(request)
    return json_response({"tokens": await tokens.list_tokens(state.db, state.clock())})


async def delete_token(request: web.Request) -> web.Response:
    """Revoke an API token."""
    operator(request)
    state = st(request)
    raw = request.match_info["id"]
    if not raw.isdigit() or len(raw) > 18:
        raise ApiError(400, "invalid", "token id must be a number", "id")
    return json_response(await tokens.revoke_token(state.db, int(raw), state.clock()))


async def get_audit(request: web.Request) -> web.Response:
    """Audit events after ``after`` (an id), at most ``limit`` (1000)."""
    operator(request)
    after = int(query_number(request, "after", 0, 2**62))
    limit = int(query_number(request, "limit", 1000, 1000)) or 1
    return json_response(await audit.list_events(st(request).db, after, limit))


async def get_keyset(request: web.Request) -> web.Response:
    """The newest key set (summary and envelope); with ``after``, every version after it."""
    state = st(request)
    found = await keyset.latest(state.db)
    out: dict[str, Any] = {
        "keyset": found[0].summary() if found else None,
        "envelope": found[1] if found else None,
    }
    if "after" in request.query:
        after = int(query_number(request, "after", 0, 2**31))
        out["chain"] = await keyset.chain_after(state.db, after)
    return json_response(out)


async def put_keyset(request: web.Request) -> web.Response:
    """Install the next key set version: the stored version's root keys must have signed it."""
    operator(request)
    state = st(request)
    body = await read_json(request)
    envelope = json.dumps(body, sort_keys=True).encode()
    ks = await keyset.install(state.db, envelope, state.signer.key.public_key(), state.clock())
    log.info("key set version %d installed", ks.version)
    return json_response({"keyset": ks.summary()})


@dataclass(frozen=True)
class Route:
    """One route and what the OpenAPI document says of it."""

    method: str
    path: str
    handler: Handler
    summary: str
    auth: str  # "none" | "operator" | "agent" | "agent-or-operator" | "any"
    body: str | None = None  # media type of the request body
    responses: tuple[int, ...] = (200,)
    scope: str = "fleet:read"  # what an operator's API token needs here (admin has all)


ROUTES: tuple[Route, ...] = (
    Route("GET", "/api/v1/health", health, "Liveness and database check", "none"),
    Route("GET", "/api/v1/openapi.json", openapi_json, "This OpenAPI document", "none"),
    Route(
        "POST",
        "/api/v1/bundles",
        post_bundle,
        "Upload a signed .mfb bundle",
        "operator",
        "application/vnd.modelfleet.bundle.v1+tar",
        (200, 201, 400, 409, 413, 422),
        scope="models:write",
    ),
    Route("GET", "/api/v1/models", get_models, "List models", "operator"),
    Route(
        "GET",
        "/api/v1/models/{name}/versions",
        get_versions,
        "List a model's versions",
        "operator",
        None,
        (200, 404),
    ),
    Route(
        "GET",
        "/api/v1/keyset",
        get_keyset,
        "The signed key set: trusted publishers (k-of-n), control plane keys, root keys",
        "any",
        None,
        (200, 400),
    ),
    Route(
        "PUT",
        "/api/v1/keyset",
        put_keyset,
        "Install the next key set version, signed by the current root keys",
        "operator",
        "application/json",
        (200, 400, 409, 422),
        scope="admin",
    ),
    Route(
        "GET",
        "/api/v1/manifests/{digest}",
        get_manifest,
        "Signed manifest envelope by manifest digest",
        "any",
        None,
        (200, 404),
    ),
    Route(
        "GET",
        "/api/v1/blobs/{digest}",
        get_blob,
        "Download a blob (Range, ETag)",
        "any",
        None,
        (200, 206, 304, 404, 416),
    ),
    Route(
        "POST",
        "/api/v1/enrollment-tokens",
        post_enrollment_token,
        "Create an enrollment token",
        "operator",
        "application/json",
        (201, 400),
        scope="admin",
    ),
    Route(
        "POST",
        "/api/v1/agents/enroll",
        post_enroll,
        "Enroll an agent",
        "none",
        "application/json",
        (201, 400, 401, 403),
    ),
    Route("GET", "/api/v1/agents", get_agents, "List agents", "operator"),
    Route(
        "GET",
        "/api/v1/agents/{id}",
        get_agent,
        "One agent",
        "agent-or-operator",
        None,
        (200, 403, 404),
    ),
    Route(
        "GET",
        "/api/v1/agents/{id}/desired",
        get_desired,
        "Long-poll the agent's signed desired state",
        "agent-or-operator",
        None,
        (200, 204, 403),
    ),
    Route(
        "POST",
        "/api/v1/agents/{id}/status",
        post_status,
        "Report the agent's status",
        "agent",
        "application/json",
        (200, 400, 403),
    ),
    Route(
        "POST",
        "/api/v1/agents/{id}/metrics",
        post_metrics,
        "Report a metrics batch",
        "agent",
        "application/json",
        (200, 400, 403),
    ),
    Route(
        "POST",
        "/api/v1/rollouts",
        post_rollout,
        "Create a staged rollout",
        "operator",
        "application/json",
        (201, 400, 404, 409, 422),
        scope="rollouts:write",
    ),
    Route("GET", "/api/v1/rollouts", get_rollouts, "List rollouts", "operator"),
    Route(
        "GET",
        "/api/v1/reports/compare",
        get_compare,
        "Compare groups of agents",
        "operator",
        None,
        (200, 400, 404),
    ),
    Route(
        "GET",
        "/api/v1/reports/timeseries",
        get_timeseries,
        "Metrics per group over time",
        "operator",
        None,
        (200, 400, 404),
    ),
    Route("GET", "/api/v1/fleet", get_fleet, "Fleet overview", "operator"),
    Route(
        "GET",
        "/api/v1/rollouts/{id}",
        get_rollout,
        "A rollout: stages, cohorts, gate results, timeline",
        "operator",
        None,
        (200, 404),
    ),
    Route(
        "POST",
        "/api/v1/rollouts/{id}/{action}",
        post_rollout_command,
        "Pause, resume, promote or abort a rollout",
        "operator",
        "application/json",
        (200, 400, 404, 409),
        scope="rollouts:write",
    ),
    Route(
        "POST",
        "/api/v1/agents/{id}/credential",
        post_credential,
        "Rotate the agent's credential (its own credential only)",
        "agent",
        "application/json",
        (200, 403, 404),
    ),
    Route(
        "POST",
        "/api/v1/agents/{id}/approve",
        post_approve,
        "Approve an agent waiting for approval",
        "operator",
        "application/json",
        (200, 404),
        scope="admin",
    ),
    Route(
        "POST",
        "/api/v1/agents/{id}/revoke",
        post_revoke,
        "Revoke an agent at once",
        "operator",
        "application/json",
        (200, 404),
        scope="admin",
    ),
    Route(
        "POST",
        "/api/v1/tokens",
        post_token,
        "Create an API token with scopes (the secret is shown once)",
        "operator",
        "application/json",
        (201, 400),
        scope="admin",
    ),
    Route(
        "GET",
        "/api/v1/tokens",
        get_tokens,
        "List API tokens (never their secrets)",
        "operator",
        scope="admin",
    ),
    Route(
        "DELETE",
        "/api/v1/tokens/{id}",
        delete_token,
        "Revoke an API token at once",
        "operator",
        None,
        (200, 404),
        scope="admin",
    ),
    Route(
        "GET",
        "/api/v1/audit",
        get_audit,
        "The hash-chained audit log, oldest first",
        "operator",
        None,
        (200, 400),
        scope="admin",
    ),
)


# ------------------------------------------------------------------------------ dashboard

UI_DIR = Path(__file__).resolve().parent / "ui"
UI_HEADERS = {
    # Everything the page loads comes from here: no CDN, no inline script.
    "Content-Security-Policy": "default-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


async def ui_index(request: web.Request) -> web.StreamResponse:
    """The dashboard's single page."""
    if request.path == "/ui":
        raise web.HTTPFound("/ui/")
    return web.FileResponse(UI_DIR / "index.html", headers=UI_HEADERS)


def add_ui_routes(app: web.Application) -> None:
    """The dashboard: static files served by the control plane, no build step."""
    app.router.add_get("/ui", ui_index)
    app.router.add_get("/ui/", ui_index)
    app.router.add_static("/ui/static/", UI_DIR, show_index=False, follow_symlinks=False)


# ------------------------------------------------------------------------------ the app


async def _rollup_loop(state: State) -> None:
    """Roll metric windows up (raw → minute → hour) and drop what is past retention."""
    from control_plane.rollup import rollup

    while True:
        await asyncio.sleep(state.config.rollup_interval_s)
        try:
            await rollup(state.db, state.clock(), state.config.retention)
        except asyncio.CancelledError:
            raise
        except Exception:
            # The loop's boundary: a failed pass (the database went away) is retried next time.
            log.exception("metric roll-up failed")


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    await state.db.migrate()
    async with state.db.write() as s:
        token_file = state.config.data_dir / "admin-token"
        if await ensure_admin_token(s, token_file):
            log.warning("empty database: wrote an admin API token to %s", token_file)
    ks = await keyset.at_start(state.db, state.config.keyset_file,
                               state.signer.key.public_key(), state.clock())  # fmt: skip
    if ks is not None:
        if state.config.trusted_publisher_files:
            log.warning("key set version %d decides which publishers are trusted: the "
                        "--trust-publisher files are not used", ks.version)  # fmt: skip
    elif not state.trusted:
        log.warning("no trusted publisher keys: every bundle push will be refused")
    state.ingest.start()
    tasks = [
        asyncio.create_task(state.controller.run(), name="rollout-controller"),
        asyncio.create_task(_rollup_loop(state), name="metric-rollup"),
        asyncio.create_task(_audit_flush_loop(state), name="audit-flush"),
    ]
    if not state.db.is_sqlite:
        from control_plane.pgnotify import PgNotifyBridge

        pg = PgNotifyBridge(state.db.url, state.notifier)
        state.notifier.listeners.append(pg.send)
        tasks.append(asyncio.create_task(pg.run(), name="pg-notify"))
    if state.config.mqtt_url:
        from control_plane.mqtt import MqttBridge

        bridge = MqttBridge(state.config, state.db, state.clock, state.store, state.ingest)
        app[MQTT] = bridge
        state.notifier.listeners.append(bridge.notify)
        tasks.append(asyncio.create_task(bridge.run(), name="mqtt-bridge"))
    yield
    await _stop(state, tasks)


async def _stop(state: State, tasks: list[asyncio.Task[None]]) -> None:
    """The end of a drain: background tasks (the MQTT bridge disconnects from the broker),
    then what ingest has queued is committed, refusals counted, the pool closed. Each step
    gets a quarter of ``drain_s`` (the runner gives requests the other half), so a broker or
    database that does not answer cannot hold the exit."""
    state.drain()  # also when the app is closed without the runner's shutdown signal
    budget = state.config.drain_s / 4
    for task in tasks:
        task.cancel()
    _, late = await asyncio.wait(tasks, timeout=budget)
    for task in late:
        log.warning("%s did not stop within %.1fs; left behind", task.get_name(), budget)
        task.cancel()
    for task in tasks:
        if task.done() and not task.cancelled() and task.exception() is not None:
            log.error("%s ended with an error", task.get_name(), exc_info=task.exception())
    try:
        async with asyncio.timeout(budget):
            await state.ingest.close()
            if state.refusals is not None:
                await state.refusals.flush()
    except TimeoutError:
        log.error("reports still queued after %.1fs were not stored", budget)
    except Exception:
        # Shutdown's boundary: the database is gone; say so and still close the pool.
        log.exception("could not store the last reports and audit counts")
    await state.db.close()


async def _audit_flush_loop(state: State) -> None:
    """Write the counts of coalesced refusals whose window has ended."""
    if state.refusals is None:
        return
    while True:
        await asyncio.sleep(state.config.audit_coalesce_s)
        try:
            await state.refusals.flush(state.clock())
        except asyncio.CancelledError:
            raise
        except Exception:
            # The loop's boundary: the counts stay in memory and are written next time.
            log.exception("could not write coalesced audit refusals")


def create_app(config: ServerConfig, clock: Clock = _utcnow) -> web.Application:
    """Build the control plane app; migrations and the admin token run at startup.

    Raises ConfigError for unreadable keys.
    """
    ensure_private_dir(config.data_dir)
    key_file = config.signing_key_file or config.data_dir / "control-plane.key"
    db = Database(config.database_url, pool=PoolLimits(config.db_pool_size, config.db_wait_s))
    signer = DesiredSigner(
        load_or_create_signing_key(key_file), timedelta(seconds=config.desired_ttl_s)
    )
    notifier = DesiredNotifier()
    state = State(
        config=config,
        db=db,
        store=open_blob_store(config.blob_store_url, config.blob_dir),
        signer=signer,
        notifier=notifier,
        trusted=load_trusted_publishers(
            config.trusted_publisher_files, config.data_dir / "trusted-publishers"
        ),
        clock=clock,
        controller=RolloutController(db, signer, notifier, clock, config.controller_interval_s),
        ingest=Ingestor(db, clock, max_age_s=config.retention.batches_s),
        limiter=RateLimiter(config.rate_limit_per_s, config.rate_limit_burst)
        if config.rate_limit_per_s > 0
        else None,
        refusal_limiter=RateLimiter(config.refusal_rate_per_s, config.refusal_burst)
        if config.refusal_rate_per_s > 0
        else None,
        refusals=audit.RefusalLog(db, config.audit_coalesce_s),
    )
    app = web.Application(
        middlewares=[audit_middleware, source_limit_middleware, error_middleware, auth_middleware],
        client_max_size=config.max_json_bytes,
    )
    app[STATE] = state
    for r in ROUTES:
        app.router.add_route(r.method, r.path, scoped(r))
    add_ui_routes(app)
    app.cleanup_ctx.append(_lifecycle)
    app.on_shutdown.append(_begin_drain)
    return app


async def _begin_drain(app: web.Application) -> None:
    # The runner's shutdown: the listener is closed and idle connections with it; answer the
    # waiting long-polls now, so that only real work is left for the drain time.
    app[STATE].drain()
