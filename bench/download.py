"""Download of a 200 MB blob: the agent's resumable downloader against a plain `curl` of the
same blob in the same run, straight from a `modelfleet server` and through a loopback proxy
that cuts the connection in the middle (the agent resumes with Range; curl is given `-C -`
the same way, the raw baseline of a resume).

Figures per case: seconds, MB/s, body bytes on the wire (counted by the proxy where there is
one), and whether the result matched the digest. Prints one JSON line; writes
bench/results/download.json.

    python bench/download.py [--mb 200]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.client import ControlPlaneClient  # noqa: E402
from agent.exceptions import TransportError  # noqa: E402
from control_plane.cli.publish import build_bundle  # noqa: E402
from protocol.dsse import generate_private_key, public_key_to_pem  # noqa: E402
from tests.support.agents import CuttingProxy  # noqa: E402
from tests.support.fleet import free_port  # noqa: E402
from toymodels import iris_model  # noqa: E402

MODELFLEET = str(Path(sys.executable).parent / "modelfleet")


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
    port = free_port()
    log = (tmp / "server.log").open("wb")
    proc = subprocess.Popen(
        [
            MODELFLEET,
            "server",
            "--data-dir",
            str(tmp / "cp"),
            "--port",
            str(port),
            "--trust-publisher",
            str(tmp / "pub.pem"),
            "--max-bundle-mb",
            str(mb + 64),
        ],
        stdout=log,
        stderr=log,
    )
    base = f"http://127.0.0.1:{port}"
    out: dict[str, Any] = {"blob_mb": mb}
    try:
        # A real ONNX model with mb MB of random (incompressible, like trained) weights.
        blob = iris_model(pad_bytes=mb * 1_000_000)
        digest = "sha256:" + hashlib.sha256(blob).hexdigest()
        size = len(blob)
        bundle, _ = build_bundle(blob, "big", "1.0.0", [key])
        del blob
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as s:
            for _ in range(300):
                try:
                    async with s.get(f"{base}/api/v1/health") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    await asyncio.sleep(0.1)
            admin = {"Authorization": "Bearer " + (tmp / "cp" / "admin-token").read_text().strip()}
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
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        shutil.rmtree(tmp, ignore_errors=True)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--mb", type=int, default=200)
    a = ap.parse_args()
    figures = {
        "benchmark": "download",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        **asyncio.run(main(a.mb)),
    }
    print(json.dumps(figures))
    (ROOT / "bench" / "results" / "download.json").write_text(json.dumps(figures, indent=2) + "\n")
