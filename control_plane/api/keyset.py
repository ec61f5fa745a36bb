"""The signed key set: read it (any caller), install the next version (admin)."""

from __future__ import annotations

import json
import logging
from typing import Any

from aiohttp import web

from control_plane.api.request import json_response, query_number, read_json, st
from control_plane.api.route import Route
from control_plane.security import keyset

log = logging.getLogger("modelfleet.control_plane")


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
    state = st(request)
    body = await read_json(request)
    envelope = json.dumps(body, sort_keys=True).encode()
    ks = await keyset.install(state.db, envelope, state.signer.key.public_key(), state.clock())
    log.info("key set version %d installed", ks.version)
    return json_response({"keyset": ks.summary()})


ROUTES = (
    Route(
        "GET",
        "/api/v1/keyset",
        get_keyset,
        summary="The signed key set: trusted publishers (k-of-n), control plane keys, root keys",
        auth="any",
        responses=(200, 400),
    ),
    Route(
        "PUT",
        "/api/v1/keyset",
        put_keyset,
        summary="Install the next key set version, signed by the current root keys",
        auth="operator",
        body="application/json",
        responses=(200, 400, 409, 422),
        scope="admin",
    ),
)
