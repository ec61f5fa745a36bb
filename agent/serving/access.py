"""Who may use the inference port: bearer tokens, TLS and mutual TLS.

An agent that serves beyond loopback (a GPU node serving a cluster) can require a bearer token
on every request (any of the configured ones admits; compared in constant time) and serve
HTTPS, with client certificates signed by a given CA (mutual TLS). The health probes stay
open, so that an orchestrator's liveness and readiness checks need no secret. Refusals are
401 with ``WWW-Authenticate: Bearer``; the token is never logged or echoed.
"""

from __future__ import annotations

import hmac
import ssl
from collections.abc import Awaitable, Callable, Sequence

from aiohttp import web

from agent.exceptions import AgentConfigError

OPEN_PATHS = frozenset({"/v2/health/live", "/v2/health/ready"})
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Middleware = Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]


def token_admits(header: str | None, tokens: Sequence[str]) -> bool:
    """Whether an Authorization header carries one of ``tokens`` (every one is compared, so
    the time taken does not say which one came close)."""
    if header is None or not header.startswith("Bearer "):
        return False
    given = header[len("Bearer ") :].strip().encode()
    found = False
    for t in tokens:
        found |= hmac.compare_digest(given, t.encode())
    return found


def bearer_middleware(
    tokens: Sequence[str],
) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    """A middleware that answers 401 to requests without one of ``tokens`` (health open)."""
    kept = tuple(tokens)

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in OPEN_PATHS or token_admits(request.headers.get("Authorization"), kept):
            return await handler(request)
        return web.json_response(
            {"error": "this inference port needs a bearer token (Authorization: Bearer ...)"},
            status=401,
            headers={"WWW-Authenticate": 'Bearer realm="modelfleet-agent"'},
        )

    return check


def server_context(
    cert_file: str | None, key_file: str | None, client_ca_file: str | None
) -> ssl.SSLContext | None:
    """The serve port's TLS context (None: plain HTTP); with ``client_ca_file`` clients must
    present a certificate it signed. Raises AgentConfigError for unreadable files."""
    if not cert_file:
        return None
    try:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(cert_file, key_file)
        if client_ca_file:
            ctx.load_verify_locations(cafile=client_ca_file)
            ctx.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise AgentConfigError(f"serve port TLS files: {exc}") from None
    return ctx
