"""Download of a 200 MB blob: the agent's resumable downloader against a plain `curl` of the
same blob in the same run, straight from a `modelfleet server` and through a loopback proxy
that cuts the connection in the middle (the agent resumes with Range; curl is given `-C -`
the same way, the raw baseline of a resume).

Figures per case: seconds, MB/s, body bytes on the wire (counted by the proxy where there is
one), and whether the result matched the digest. Prints one JSON line; writes
bench/results/download.json.

    python -m bench.download [--mb 200]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from agent.client import ControlPlaneClient
from agent.exceptions import TransportError
from bench.devkit.models import iris_model
from bench.devkit.proxies import CuttingProxy
from bench.harness import Processes, machine, start_server, write_result
from control_plane.catalog.build import build_bundle
from protocol.dsse import generate_private_key, public_key_to_pem


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


async def agent_download(
    server: str, cred: str, agent_id: str, digest: str, size: int, dest: Path
) -> dict[str, Any]:
    """The agent's own downloader, retried until whole, as the agent's download loop does."""
    dest.unlink(missing_ok=True)
    attempts = 0
    t0 = time.monotonic()
    async with ControlPlaneClient(server, cred, agent_id) as c:
        while True:
            attempts += 1
            try:
                await c.download_blob(digest, size, dest)
                break
            except TransportError:
                if attempts > 5:
                    raise
    took = time.monotonic() - t0
    return {
        "seconds": round(took, 3),
        "mb_per_s": round(size / took / 1e6, 1),
        "attempts": attempts,
        "ok": sha256_file(dest) == digest,
    }


async def curl(url: str, cred: str, dest: Path, digest: str, resume: bool) -> dict[str, Any]:
    dest.unlink(missing_ok=True)
    t0 = time.monotonic()
    attempts = 0
    while True:
        attempts += 1
        args = ["curl", "-s", "-f", "-H", f"Authorization: Bearer {cred}", "-o", str(dest)]
        if resume and dest.exists():
            args[1:1] = ["-C", "-"]
        p = await asyncio.create_subprocess_exec(*args, url)
        if await p.wait() == 0 or not resume or attempts > 5:
            break
    took = time.monotonic() - t0
    size = dest.stat().st_size if dest.exists() else 0
    return {
        "seconds": round(took, 3),
        "mb_per_s": round(size / took / 1e6, 1),
        "attempts": attempts,
        "ok": dest.exists() and sha256_file(dest) == digest,
    }


async def main(mb: int) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp())
    key = generate_private_key()
    (tmp / "pub.pem").write_bytes(public_key_to_pem(key.public_key()))
    out: dict[str, Any] = {"blob_mb": mb}
    procs = Processes(tmp / "server.log", stop_within_s=30)
    try:
        server = await start_server(
            procs,
            tmp / "cp",
            "--trust-publisher",
            str(tmp / "pub.pem"),
            "--max-bundle-mb",
            str(mb + 64),
        )
        base = server.base
        # A real ONNX model with mb MB of random (incompressible, like trained) weights.
        blob = iris_model(pad_bytes=mb * 1_000_000)
        digest = "sha256:" + hashlib.sha256(blob).hexdigest()
        size = len(blob)
        bundle, _ = build_bundle(blob, "big", "1.0.0", [key])
        del blob
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as s:
            admin = server.auth
            async with s.post(f"{base}/api/v1/bundles", data=bundle, headers=admin) as r:
                assert r.status == 201, await r.text()
            del bundle
            async with s.post(f"{base}/api/v1/enrollment-tokens", headers=admin, json={}) as r:
                token = (await r.json())["token"]
            async with s.post(f"{base}/api/v1/agents/enroll", json={"token": token}) as r:
                agent = await r.json()
        cred, aid = agent["credential"], agent["agentId"]
        dest = tmp / "blob"
        if shutil.which("curl"):
            out["curl_direct"] = await curl(
                f"{base}/api/v1/blobs/{digest}", cred, dest, digest, False
            )
        out["agent_direct"] = await agent_download(base, cred, aid, digest, size, dest)
        for cut in (False, True):
            name = "cut" if cut else "proxied"
            async with CuttingProxy(base, size // 2 if cut else 10 * size) as proxy:
                out[f"agent_{name}"] = await agent_download(
                    proxy.url, cred, aid, digest, size, dest
                )
                out[f"agent_{name}"]["wire_bytes"] = proxy.blob_bytes_sent
                out[f"agent_{name}"]["wire_over_size"] = round(proxy.blob_bytes_sent / size, 4)
            if shutil.which("curl"):
                async with CuttingProxy(base, size // 2 if cut else 10 * size) as proxy:
                    out[f"curl_{name}"] = await curl(
                        f"{proxy.url}/api/v1/blobs/{digest}", cred, dest, digest, resume=True
                    )
                    out[f"curl_{name}"]["wire_bytes"] = proxy.blob_bytes_sent
    finally:
        procs.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--mb", type=int, default=200)
    a = ap.parse_args()
    figures = {
        "benchmark": "download",
        "machine": machine(),
        **asyncio.run(main(a.mb)),
    }
    write_result("download", figures)
