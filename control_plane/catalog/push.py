"""Pushing a bundle to a control plane blob by blob, as OCI registries do.

The client reads the tar's index (member offsets, no file bytes), asks the control plane which
blobs it lacks (``POST /api/v1/blobs/missing``), uploads each of those with
``PUT /api/v1/blobs/{digest}`` streamed from its slice of the tar, and publishes the version with
``POST /api/v1/manifests``. Memory stays at a chunk whatever the model's size; a push cut
halfway, run again, sends only what the control plane still lacks. A control plane that predates
blob uploads (404 on the question) gets the whole bundle streamed to ``POST /api/v1/bundles``.

Library code: ``modelfleet push`` parses its arguments and calls :func:`push_bundle`. Raises
:class:`PushError` with the server's message, or for a bundle that is not one.
"""

from __future__ import annotations

import asyncio
import json
import tarfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from protocol.bundle import MEDIA_TYPE
from protocol.dsse import parse_envelope
from protocol.exceptions import ProtocolError
from protocol.manifest import Manifest, parse_manifest

CHUNK = 1024 * 1024


class PushError(Exception):
    """The push failed: a refusal by the control plane, the link, or a bad bundle file."""


@dataclass(frozen=True)
class BundleIndex:
    """A bundle file's envelope, manifest, and where each file's bytes lie in the tar."""

    envelope: bytes
    manifest: Manifest
    slices: dict[str, tuple[int, int]]  # manifest path -> (offset, size) in the tar


@dataclass(frozen=True)
class PushOutcome:
    """What a push did: the server's answer and how much travelled."""

    status: int  # 201 created, 200 the identical version was there
    body: dict[str, Any]
    sent_files: int
    sent_bytes: int
    held_files: int  # blobs the control plane already had


def index_bundle(path: Path) -> BundleIndex:
    """Read a bundle's head and member offsets without reading its files; raises PushError."""
    try:
        with tarfile.open(path, mode="r:") as tar:
            slices: dict[str, tuple[int, int]] = {}
            head: dict[str, bytes] = {}
            for m in tar:
                if not m.isreg():
                    raise PushError(f"{path}: member {m.name!r} is not a regular file")
                if m.name in ("manifest.json", "manifest.dsse.json"):
                    f = tar.extractfile(m)
                    head[m.name] = f.read(1024 * 1024 + 1) if f else b""
                else:
                    slices[m.name] = (m.offset_data, m.size)
    except (OSError, tarfile.TarError) as exc:
        raise PushError(f"{path}: not a readable bundle ({exc})") from None
    if "manifest.dsse.json" not in head:
        raise PushError(f"{path}: no manifest.dsse.json: not a bundle")
    try:
        manifest = parse_manifest(parse_envelope(head["manifest.dsse.json"]).payload)
    except ProtocolError as exc:
        raise PushError(f"{path}: {exc}") from None
    for f in manifest.files:
        if slices.get(f.path, (0, -1))[1] != f.size:
            raise PushError(f"{path}: {f.path!r} is missing or not {f.size} bytes")
    return BundleIndex(head["manifest.dsse.json"], manifest, slices)


async def _slice(path: Path, offset: int, size: int) -> AsyncIterator[bytes]:
    f = await asyncio.to_thread(path.open, "rb")
    try:
        await asyncio.to_thread(f.seek, offset)
        left = size
        while left > 0:
            chunk = await asyncio.to_thread(f.read, min(CHUNK, left))
            if not chunk:
                raise PushError(f"{path} shrank while it was pushed")
            left -= len(chunk)
            yield chunk
    finally:
        await asyncio.to_thread(f.close)


async def _answer(resp: aiohttp.ClientResponse, ok: tuple[int, ...]) -> dict[str, Any]:
    text = await resp.text()
    try:
        body = json.loads(text) if text else {}
    except ValueError:
        body = {}
    if resp.status not in ok:
        err = body.get("error", {}) if isinstance(body, dict) else {}
        field = f" (field: {err['field']})" if err.get("field") else ""
        raise PushError(f"HTTP {resp.status}: {err.get('message', text)}{field}")
    return body if isinstance(body, dict) else {}


async def push_bundle(
    server: str,
    token: str,
    path: Path,
    *,
    session: aiohttp.ClientSession | None = None,
    on_file: Callable[[str, int], None] | None = None,
) -> PushOutcome:
    """Push the bundle at ``path``; raises PushError. ``on_file(path, size)`` is told of each
    file as its upload completes."""
    index = await asyncio.to_thread(index_bundle, path)
    api = f"{server.rstrip('/')}/api/v1"
    headers = {"Authorization": f"Bearer {token}"}
    own = session is None
    s = session or aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_read=600))
    try:
        digests = [f.digest for f in index.manifest.files]
        async with s.post(
            f"{api}/blobs/missing", json={"digests": digests}, headers=headers
        ) as resp:
            if resp.status in (404, 405):
                return await _push_whole(s, api, headers, path)
            missing = set((await _answer(resp, (200,)))["missing"])
        sent_files = sent_bytes = 0
        done: set[str] = set()
        for f in index.manifest.files:
            if f.digest not in missing or f.digest in done:
                continue
            offset, size = index.slices[f.path]
            async with s.put(
                f"{api}/blobs/{f.digest}",
                data=_slice(path, offset, size),
                headers={
                    **headers,
                    "Content-Type": "application/octet-stream",
                    "Content-Length": str(size),
                },
            ) as resp:
                await _answer(resp, (200, 201))
            done.add(f.digest)
            sent_files += 1
            sent_bytes += size
            if on_file is not None:
                on_file(f.path, size)
        async with s.post(
            f"{api}/manifests",
            data=index.envelope,
            headers={**headers, "Content-Type": "application/json"},
        ) as resp:
            body = await _answer(resp, (200, 201))
            status = resp.status
        held = len(set(digests)) - len(missing)
        return PushOutcome(status, body, sent_files, sent_bytes, held)
    except aiohttp.ClientError as exc:
        raise PushError(f"cannot reach {server}: {exc}") from None
    finally:
        if own:
            await s.close()


async def _push_whole(
    s: aiohttp.ClientSession, api: str, headers: dict[str, str], path: Path
) -> PushOutcome:
    """An older control plane: the whole bundle, streamed, to POST /bundles."""
    size = (await asyncio.to_thread(path.stat)).st_size
    async with s.post(
        f"{api}/bundles",
        data=_slice(path, 0, size),
        headers={**headers, "Content-Type": MEDIA_TYPE, "Content-Length": str(size)},
    ) as resp:
        body = await _answer(resp, (200, 201))
        return PushOutcome(resp.status, body, 1, size, 0)
