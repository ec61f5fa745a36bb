"""Models: upload a signed bundle, list models and versions, a version's signed manifest."""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
from pathlib import Path

from aiohttp import web

from control_plane.api.errors import ApiError
from control_plane.api.request import json_response, st
from control_plane.api.route import Route
from control_plane.catalog import registry
from control_plane.security import keyset
from protocol.bundle import BundleLimits
from protocol.digest import check_digest

log = logging.getLogger("modelfleet.control_plane")

UPLOAD_CHUNK = 256 * 1024


async def post_bundle(request: web.Request) -> web.Response:
    """Upload a .mfb bundle; the body is the raw tar."""
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
            async for chunk in request.content.iter_chunked(UPLOAD_CHUNK):
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


async def post_manifest(request: web.Request) -> web.Response:
    """Publish a version from its signed manifest envelope, every blob it names pushed first."""
    state = st(request)
    limit = 1024 * 1024
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(413, "manifest_too_large", f"a manifest envelope is at most {limit} bytes")
    body = bytearray()
    try:
        async with asyncio.timeout(state.config.body_timeout_s):
            # read() answers with what has arrived: read until the end of the body.
            while chunk := await request.content.read(limit + 1 - len(body)):
                body += chunk
                if len(body) > limit:
                    raise ApiError(
                        413, "manifest_too_large", f"a manifest envelope is at most {limit} bytes"
                    )
    except TimeoutError:
        raise ApiError(408, "body_timeout", "the request body did not arrive in time") from None
    trust = await keyset.publisher_trust(state.db, state.trusted)
    result = await registry.register_manifest(state.db, state.store, trust, bytes(body))
    log.info("push %s %s %s", result.name, result.version, "stored" if result.created else "same")
    return json_response(result.to_json(), 201 if result.created else 200)


async def get_models(request: web.Request) -> web.Response:
    """List models."""
    return json_response({"models": await registry.list_models(st(request).db)})


async def get_versions(request: web.Request) -> web.Response:
    """List one model's versions."""
    name = request.match_info["name"]
    return json_response({"versions": await registry.list_versions(st(request).db, name)})


async def get_manifest(request: web.Request) -> web.Response:
    """A version's signed manifest envelope, by manifest digest."""
    digest = check_digest(request.match_info["digest"], "digest")
    env = await registry.get_envelope(st(request).db, digest)
    return web.Response(body=env.encode(), content_type="application/json")


ROUTES = (
    Route(
        "POST",
        "/api/v1/bundles",
        post_bundle,
        summary="Upload a signed .mfb bundle",
        auth="operator",
        body="application/vnd.modelfleet.bundle.v1+tar",
        responses=(200, 201, 400, 409, 413, 422),
        scope="models:write",
    ),
    Route(
        "POST",
        "/api/v1/manifests",
        post_manifest,
        summary="Publish a version from its signed manifest (its blobs uploaded first)",
        auth="operator",
        body="application/json",
        responses=(200, 201, 400, 408, 409, 413, 422),
        scope="models:write",
    ),
    Route("GET", "/api/v1/models", get_models, summary="List models", auth="operator"),
    Route(
        "GET",
        "/api/v1/models/{name}/versions",
        get_versions,
        summary="List a model's versions",
        auth="operator",
        responses=(200, 404),
    ),
    Route(
        "GET",
        "/api/v1/manifests/{digest}",
        get_manifest,
        summary="Signed manifest envelope by manifest digest",
        auth="any",
        responses=(200, 404),
    ),
)
