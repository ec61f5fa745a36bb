"""Blobs by digest: downloads with ETag and HTTP Range so an interrupted download resumes;
uploads one by one, each addressed by its digest and streamed into the store while hashed,
and the "which of these do you lack" question that lets a push send only what is missing."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

from aiohttp import web

from control_plane.api.errors import ApiError
from control_plane.api.request import json_response, read_json, st
from control_plane.api.route import Route
from control_plane.catalog import registry
from control_plane.catalog.blobstore import BlobNotFound
from control_plane.errors import Refused
from protocol.digest import check_digest
from protocol.exceptions import DigestMismatch


def parse_range(request: web.Request, size: int) -> tuple[int, int] | None:
    """(start, end inclusive) of a satisfiable Range, None for the whole blob.

    An ``If-Range`` other than the blob's ETag asks for the whole blob; raises ApiError 416
    for a malformed or unsatisfiable range.
    """
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
    size = await asyncio.to_thread(store.size, digest)  # BlobNotFound: a NotFound, 404
    etag = f'"{digest}"'
    headers = {"ETag": etag, "Accept-Ranges": "bytes", "Cache-Control": "immutable"}
    if request.headers.get("If-None-Match") == etag:
        return web.Response(status=304, headers=headers)
    try:
        rng = parse_range(request, size)
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


def _body_chunks(
    request: web.Request, loop: asyncio.AbstractEventLoop, idle_s: float
) -> Iterator[bytes]:
    """The request body as it arrives, for a worker thread: each read runs on the loop; a
    body silent for ``idle_s`` raises TimeoutError (the store then keeps nothing)."""
    while True:
        read = asyncio.run_coroutine_threadsafe(request.content.readany(), loop)
        chunk = read.result(timeout=idle_s)
        if not chunk:
            return
        yield chunk


async def put_blob(request: web.Request) -> web.Response:
    """Upload one blob; the body is its bytes, streamed into the store while hashed."""
    digest = check_digest(request.match_info["digest"], "digest")
    state = st(request)
    size = request.content_length
    if size is None:
        raise ApiError(411, "length_required", "a blob upload needs a Content-Length")
    limit = state.config.max_bundle_bytes
    if size > limit:
        raise ApiError(413, "blob_too_large", f"blob is over the {limit}-byte limit")
    chunks = _body_chunks(request, asyncio.get_running_loop(), state.config.body_timeout_s)
    try:
        stored = await asyncio.to_thread(state.store.put_stream, digest, size, chunks)
    except DigestMismatch as exc:
        raise Refused("digest_mismatch", str(exc), "digest") from None
    except TimeoutError:
        raise ApiError(408, "body_timeout", "the blob stopped arriving") from None
    return json_response(
        {"digest": digest, "size": size, "created": stored}, 201 if stored else 200
    )


async def post_missing(request: web.Request) -> web.Response:
    """Which of these blobs the store lacks: a push uploads only those."""
    digests = registry.parse_digest_list(await read_json(request))
    return json_response({"missing": await registry.missing_blobs(st(request).store, digests)})


ROUTES = (
    Route(
        "GET",
        "/api/v1/blobs/{digest}",
        get_blob,
        summary="Download a blob (Range, ETag)",
        auth="any",
        responses=(200, 206, 304, 404, 416),
    ),
    Route(
        "POST",
        "/api/v1/blobs/missing",
        post_missing,
        summary="Which of these blobs the control plane lacks",
        auth="operator",
        body="application/json",
        responses=(200, 400, 413),
        scope="models:write",
    ),
    Route(
        "PUT",
        "/api/v1/blobs/{digest}",
        put_blob,
        summary="Upload one blob, addressed by its digest (streamed, hashed as stored)",
        auth="operator",
        body="application/octet-stream",
        responses=(200, 201, 400, 408, 411, 413, 422),
        scope="models:write",
    ),
)
