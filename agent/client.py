"""HTTP client for the control plane; the only place the agent meets aiohttp's client errors."""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp

from agent.exceptions import HttpStatusError, TransportError
from protocol.dsse import MAX_ENVELOPE_BYTES

CHUNK = 256 * 1024
# Called after each chunk is written with (chunk length, bytes on disk so far).
OnChunk = Callable[[int, int], Awaitable[None]]


class ControlPlaneClient:
    """Talks to one control plane with this agent's credential."""

    def __init__(
        self, server: str, credential: str, agent_id: str, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        self.server = server.rstrip("/")
        self.ssl_context = ssl_context
        self.agent_id = agent_id
        self._headers = {"Authorization": f"Bearer {credential}"}
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> ControlPlaneClient:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=self.ssl_context or True),
            headers=self._headers,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "use the client as an async context manager"
        return self._session

    def _url(self, path: str) -> str:
        return f"{self.server}/api/v1{path}"

    async def poll_desired(self, after: int, wait: float) -> bytes | None:
        """Long-poll for a desired-state envelope newer than ``after``; None when none came.

        Raises TransportError.
        """
        url = self._url(f"/agents/{self.agent_id}/desired")
        try:
            async with self.session.get(
                url,
                params={"after": str(after), "wait": str(wait)},
                timeout=aiohttp.ClientTimeout(total=wait + 15),
            ) as resp:
                if resp.status == 204:
                    return None
                if resp.status != 200:
                    raise HttpStatusError(resp.status, await resp.text(), "desired state")
                return await _read_capped(resp, MAX_ENVELOPE_BYTES, "desired state")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise TransportError(f"desired state: {exc!r}") from exc

    async def get_keyset_chain(self, after: int) -> list[bytes]:
        """The signed key set versions after ``after``, oldest first; raises TransportError."""
        try:
            async with self.session.get(
                self._url("/keyset"),
                params={"after": str(after)},
                timeout=aiohttp.ClientTimeout(total=30),
            ) as resp:
                if resp.status != 200:
                    raise HttpStatusError(resp.status, await resp.text(), "key set")
                raw = await _read_capped(resp, 4 * MAX_ENVELOPE_BYTES, "key set")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise TransportError(f"key set: {exc!r}") from exc
        return _envelopes(raw, "chain", "key set")

    async def get_manifest(self, digest: str) -> bytes:
        """The signed manifest envelope of a version; raises TransportError."""
        try:
            async with self.session.get(
                self._url(f"/manifests/{digest}"), timeout=aiohttp.ClientTimeout(total=30)
            ) as resp:
                if resp.status != 200:
                    raise HttpStatusError(resp.status, await resp.text(), f"manifest {digest}")
                return await _read_capped(resp, MAX_ENVELOPE_BYTES, "manifest")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise TransportError(f"manifest {digest}: {exc!r}") from exc

    async def download_blob(
        self, digest: str, size: int, dest: Path, on_chunk: OnChunk | None = None
    ) -> None:
        """Append the missing bytes of a blob to ``dest``, resuming with Range.

        Never writes past ``size``. Raises TransportError; the caller verifies the digest.
        """
        have = await asyncio.to_thread(partial_size, dest, size)
        if have == size:
            return
        headers = {"Range": f"bytes={have}-", "If-Range": f'"{digest}"'} if have else {}
        try:
            async with self.session.get(
                self._url(f"/blobs/{digest}"),
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=None, sock_read=60),
            ) as resp:
                if resp.status == 200:
                    have = 0  # the server sent the whole blob: start over
                elif resp.status != 206:
                    raise HttpStatusError(resp.status, await resp.text(), f"blob {digest}")
                with dest.open("r+b" if have else "wb") as f:
                    f.seek(have)
                    f.truncate()
                    async for chunk in resp.content.iter_chunked(CHUNK):
                        if have + len(chunk) > size:
                            raise TransportError(
                                f"blob {digest}: server sent more than the {size} bytes declared"
                            )
                        await asyncio.to_thread(f.write, chunk)
                        have += len(chunk)
                        if on_chunk is not None:
                            await on_chunk(len(chunk), have)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise TransportError(f"blob {digest}: {exc!r}") from exc
        if have != size:
            raise TransportError(f"blob {digest}: connection ended at {have} of {size} bytes")

    async def poll_commands(self, wait: float) -> list[bytes]:
        """Long-poll for operator commands (signed envelopes, unchecked); [] when none came.

        Raises TransportError (HttpStatusError for a refusal).
        """
        url = self._url(f"/agents/{self.agent_id}/commands")
        try:
            async with self.session.get(
                url, params={"wait": str(wait)}, timeout=aiohttp.ClientTimeout(total=wait + 15)
            ) as resp:
                if resp.status == 204:
                    return []
                if resp.status != 200:
                    raise HttpStatusError(resp.status, await resp.text(), "commands")
                raw = await _read_capped(resp, 64 * MAX_ENVELOPE_BYTES, "commands")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise TransportError(f"commands: {exc!r}") from exc
        return _envelopes(raw, "commands", "commands")

    async def post_command_answer(self, command_id: str, data: bytes) -> None:
        """Upload the answer to a command; raises TransportError (HttpStatusError on refusal)."""
        url = self._url(f"/agents/{self.agent_id}/commands/{command_id}/answer")
        try:
            async with self.session.post(
                url,
                data=data,
                headers={"Content-Type": "application/octet-stream"},
                timeout=aiohttp.ClientTimeout(total=120),
            ) as resp:
                if resp.status != 200:
                    raise HttpStatusError(resp.status, await resp.text(), "command answer")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise TransportError(f"command answer: {exc!r}") from exc

    async def post_command_failure(self, command_id: str, error: str) -> None:
        """Say why a command could not be carried out; raises TransportError."""
        await self._post(
            f"/agents/{self.agent_id}/commands/{command_id}/failure",
            {"error": error},
            "command failure",
        )

    def set_credential(self, credential: str) -> None:
        """Use a rotated credential from the next request on."""
        self._headers["Authorization"] = f"Bearer {credential}"
        if self._session is not None:
            self._session.headers["Authorization"] = f"Bearer {credential}"

    async def _post(self, path: str, doc: dict[str, Any], what: str) -> dict[str, Any]:
        try:
            async with self.session.post(
                self._url(path), json=doc, timeout=aiohttp.ClientTimeout(total=30)
            ) as resp:
                if resp.status != 200:
                    raise HttpStatusError(resp.status, await resp.text(), what)
                return await resp.json()
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise TransportError(f"{what}: {exc!r}") from exc

    async def post_status(self, doc: dict[str, Any]) -> None:
        """Send a status report; raises TransportError."""
        await self._post(f"/agents/{self.agent_id}/status", doc, "status")

    async def post_metrics(self, doc: dict[str, Any]) -> dict[str, Any]:
        """Send a metrics batch; raises TransportError."""
        return await self._post(f"/agents/{self.agent_id}/metrics", doc, "metrics")


def partial_size(dest: Path, size: int) -> int:
    """Bytes already downloaded; a partial file longer than the blob is discarded."""
    try:
        have = dest.stat().st_size
    except FileNotFoundError:
        return 0
    if have > size:
        dest.unlink()
        return 0
    return have


async def _read_capped(resp: aiohttp.ClientResponse, cap: int, what: str) -> bytes:
    data = await resp.content.read(cap + 1)
    if len(data) > cap:
        raise TransportError(f"{what}: response is larger than {cap} bytes")
    return data


async def enroll(
    server: str,
    token: str,
    name: str | None,
    labels: dict[str, str],
    facts: dict[str, Any],
    ssl_context: ssl.SSLContext | None = None,
) -> dict[str, Any]:
    """Enroll with an enrollment token; returns the control plane's answer.

    Raises TransportError (HttpStatusError for a refusal).
    """
    body: dict[str, Any] = {"token": token, "labels": labels, "facts": facts}
    if name:
        body["name"] = name
    try:
        async with (
            aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=30),
                connector=aiohttp.TCPConnector(ssl=ssl_context or True),
            ) as s,
            s.post(f"{server.rstrip('/')}/api/v1/agents/enroll", json=body) as resp,
        ):
            if resp.status != 201:
                raise HttpStatusError(resp.status, await resp.text(), "enroll")
            return await resp.json()
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        raise TransportError(f"enroll: {exc!r}") from exc


async def rotate_credential(
    server: str, credential: str, agent_id: str, ssl_context: ssl.SSLContext | None = None
) -> str:
    """A new credential for this agent; raises TransportError (HttpStatusError on refusal)."""
    async with ControlPlaneClient(server, credential, agent_id, ssl_context) as c:
        out = await c._post(f"/agents/{agent_id}/credential", {}, "rotate credential")
    new = out.get("credential")
    if not isinstance(new, str) or not new.startswith("mfc_"):
        raise TransportError("rotate credential: the control plane sent no credential")
    return new


def _envelopes(raw: bytes, key: str, what: str) -> list[bytes]:
    """The list of signed envelopes (strings) under ``key`` of a JSON object; a body of any
    other shape raises HttpStatusError (a 200 that is not what the route answers)."""
    try:
        found = json.loads(raw).get(key)
    except (ValueError, AttributeError):
        found = None
    if not isinstance(found, list) or not all(isinstance(e, str) for e in found):
        raise HttpStatusError(200, raw[:200].decode(errors="replace"), what)
    return [e.encode() for e in found]
