"""Disk full on the agent in the middle of a download: a clear status, the old version keeps
serving, and the space the download took is given back."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from bench.devkit.models import iris_model
from bench.devkit.proxies import LoopbackProxy
from tests.support.agents import enroll_agent, eventually, infer, running_agent, wait_active
from tests.support.bundles import Publisher, iris_bundle
from tests.support.control_plane import ControlPlane


class SlowBlobs(LoopbackProxy):
    """Passes everything through; blobs come 64 KiB every 20 ms, so a download takes a while."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream

    async def handle(self, request: web.Request) -> web.StreamResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() != "host"}
        async with (
            aiohttp.ClientSession(auto_decompress=False) as s,
            s.request(
                request.method,
                self.upstream + request.path_qs,
                headers=headers,
                data=await request.read(),
            ) as r,
        ):
            drop = ("transfer-encoding", "connection")
            resp = web.StreamResponse(
                status=r.status,
                headers={k: v for k, v in r.headers.items() if k.lower() not in drop},
            )
            await resp.prepare(request)
            async for chunk in r.content.iter_chunked(64 * 1024):
                await resp.write(chunk)
                if "/blobs/" in request.path:
                    await asyncio.sleep(0.02)
            await resp.write_eof()
            return resp


@pytest.fixture
def small_disk(tmp_path: Path) -> AsyncIterator[Path]:
    """A 6 MB tmpfs of our own (needs root, as on this project's machines and CI)."""
    d = tmp_path / "disk"
    d.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs to fill needs root")
    p = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(d)], capture_output=True, text=True
    )
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {p.stderr.strip()}")
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


def fill(path: Path) -> None:
    """Write zeros until the disk is full."""
    with path.open("wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass


async def test_disk_full_during_download(
    cp_sqlite: ControlPlane, publisher: Publisher, small_disk: Path
) -> None:
    cp = cp_sqlite
    await cp.push(iris_bundle(publisher.key))
    await cp.push(
        iris_bundle(publisher.key, "2.0.0", seed=1, model=iris_model(seed=1, pad_bytes=3_000_000))
    )
    state_dir = small_disk / "agent"
    async with SlowBlobs(cp.url) as proxy:
        ident = await enroll_agent(cp, state_dir, {"site": "x"}, server=proxy.url)
        async with running_agent(state_dir) as agent:
            await cp.rollout(selector="site=x")
            await wait_active(cp, ident.agent_id, "1.0.0")
            await cp.rollout("2.0.0", "site=x")

            def downloading() -> bool:
                return any(p.stat().st_size > 500_000 for p in (state_dir / "partial").iterdir())

            await eventually(downloading, 20)
            filler = small_disk / "filler"
            await asyncio.to_thread(fill, filler)  # someone else fills the disk

            async def reported() -> dict | None:
                a = await (await cp.call("GET", f"/agents/{ident.agent_id}")).json()
                return next(
                    (m for m in a["models"] if m["version"] == "2.0.0" and m["state"] == "failed"),
                    None,
                )

            m = await eventually(reported, 30)
            assert "disk full" in m["reason"] and "removed" in m["reason"], m
            status, out = await infer(agent.serve_port)
            assert status == 200 and out["model_version"] == "1.0.0"
            assert not list((state_dir / "partial").iterdir())  # space given back
            filler.unlink()
