"""How long big inference requests hold up small ones, and what they cost the agent in memory.

A control plane and an agent run as real processes on loopback; the agent serves the
16 -> 32 -> 4 MLP of bench/devkit/models.py and an image-sized model made in code (x[N,3,224,224]
-> the same shape, so each answer is as big as its request). One client sends one-row MLP
requests back to back, first alone, then while another client sends ~60 MiB image requests
(20 images) in a loop. Prints one JSON line (and writes bench/results/inference_limits.json):
the small requests' p50/p99 latency in both phases, the big requests' latency and statuses,
the agent's resident memory idle and at its peak, and what decoding a body on the event loop
costs by size (the measure behind ``inline_json_bytes``).

    python -m bench.inference_limits [--seconds 20] [--images 20] [--agent-flag=--max-large-requests=2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from agent.serving import oip
from bench.devkit.models import mlp_onnx, tile_onnx
from bench.harness import (
    Processes,
    create_rollout,
    machine,
    proc_stats,
    push_bundles,
    start_agent,
    start_server,
    summary_ms,
    wait_http,
    write_result,
)
from control_plane.catalog.build import build_bundle
from protocol.dsse import generate_private_key, public_key_to_pem

SMALL = {
    "inputs": [
        {
            "name": "x",
            "shape": [1, 16],
            "datatype": "FP32",
            "data": np.random.default_rng(0).normal(size=16).astype(np.float32).tolist(),
        }
    ]
}


def image_body(images: int) -> bytes:
    x = np.random.default_rng(1).normal(size=(images, 3, 224, 224)).astype(np.float32)
    doc = {
        "inputs": [
            {"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}
        ]
    }
    return json.dumps(doc).encode()


def inline_decode_cost() -> dict[str, float]:
    """Milliseconds the event loop would spend decoding a one-input body of each size inline."""
    out = {}
    for kib in (16, 64, 128, 256, 1024):
        n = kib * 1024 // 21  # ~21 bytes per FP32 value as .tolist() writes them
        x = np.random.default_rng(2).normal(size=n).astype(np.float32)
        body = json.dumps(
            {"inputs": [{"name": "x", "shape": [n], "datatype": "FP32", "data": x.tolist()}]}
        ).encode()
        best = min(
            _timed(lambda b=body: oip.parse_request(b, max_elements=1 << 30)) for _ in range(5)
        )
        out[f"{kib}_kib_ms"] = round(best * 1000, 2)
    return out


def _timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


async def small_requests(url: str, seconds: float) -> list[float]:
    """One-row requests back to back for ``seconds``; their latencies."""
    out = []
    async with aiohttp.ClientSession() as s:
        stop = time.monotonic() + seconds
        while time.monotonic() < stop:
            t0 = time.perf_counter()
            async with s.post(url, json=SMALL) as r:
                await r.read()
                assert r.status == 200, await r.text()
            out.append(time.perf_counter() - t0)
    return out


class BigClient(threading.Thread):
    """Big requests in a loop, on a loop of its own (so reading 60 MiB answers does not delay
    the small client's measurements)."""

    def __init__(self, url: str, body: bytes, clients: int) -> None:
        super().__init__(daemon=True)
        self.url, self.body, self.clients = url, body, clients
        self.stop = threading.Event()
        self.latencies: list[float] = []
        self.statuses: dict[int, int] = {}
        self.answer_bytes = 0

    def run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        timeout = aiohttp.ClientTimeout(total=300)
        async with aiohttp.ClientSession(timeout=timeout) as s:
            await asyncio.gather(*(self._one(s) for _ in range(self.clients)))

    async def _one(self, s: aiohttp.ClientSession) -> None:
        headers = {"Content-Type": "application/json"}
        while not self.stop.is_set():
            t0 = time.perf_counter()
            async with s.post(self.url, data=self.body, headers=headers) as r:
                n = len(await r.read())
            self.latencies.append(time.perf_counter() - t0)
            self.statuses[r.status] = self.statuses.get(r.status, 0) + 1
            self.answer_bytes = max(self.answer_bytes, n)


async def peak_rss(pid: int, stop: asyncio.Event) -> int:
    peak = 0
    while not stop.is_set():
        peak = max(peak, proc_stats(pid)[1])
        await asyncio.sleep(0.02)
    return peak


async def run(tmp: Path, seconds: float, images: int, clients: int, flags: list[str]) -> dict:
    key = generate_private_key()
    (tmp / "pub.pem").write_bytes(public_key_to_pem(key.public_key()))
    with Processes(tmp / "bench.log") as procs:
        server = await start_server(procs, tmp / "cp", "--trust-publisher", str(tmp / "pub.pem"))
        await push_bundles(
            server,
            build_bundle(mlp_onnx(), "mlp", "1.0.0", [key])[0],
            build_bundle(tile_onnx(), "image", "1.0.0", [key])[0],
        )
        agent_proc = await start_agent(procs, server, tmp / "agent", *flags)
        agent = agent_proc.process
        for model in ("mlp", "image"):
            await create_rollout(server, model)
        agent_url = agent_proc.url
        for model in ("mlp", "image"):
            await wait_http(f"{agent_url}/v2/models/{model}/ready")

        small_url = f"{agent_url}/v2/models/mlp/infer"
        await small_requests(small_url, 1.0)  # warm up
        rss_idle = proc_stats(agent.pid)[1]
        alone = await small_requests(small_url, seconds / 2)

        body = await asyncio.to_thread(image_body, images)
        big = BigClient(f"{agent_url}/v2/models/image/infer", body, clients)
        stop = asyncio.Event()
        rss = asyncio.create_task(peak_rss(agent.pid, stop))
        big.start()
        try:
            together = await small_requests(small_url, seconds)
        finally:
            big.stop.set()
            await asyncio.to_thread(big.join)
            stop.set()
        return {
            "small_alone": summary_ms(alone),
            "small_with_big": summary_ms(together),
            "big": {
                "body_mib": round(len(body) / 2**20, 1),
                "answer_mib": round(big.answer_bytes / 2**20, 1),
                "clients": clients,
                "statuses": big.statuses,
                **summary_ms(big.latencies),
            },
            "agent_rss_mb": {
                "idle": round(rss_idle / 2**20, 1),
                "peak_with_big": round(await rss / 2**20, 1),
            },
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=20.0, help="with big requests (20)")
    ap.add_argument("--images", type=int, default=20, help="224x224x3 images per big request")
    ap.add_argument("--big-clients", type=int, default=2, help="concurrent big senders (2)")
    ap.add_argument("--agent-flag", action="append", default=[], help="passed to agent run")
    args = ap.parse_args()
    figures: dict[str, Any] = {
        "benchmark": "inference_limits",
        "machine": machine(processor=platform.machine()),
        "agent_flags": args.agent_flag,
        "inline_decode": inline_decode_cost(),
    }
    with tempfile.TemporaryDirectory() as d:
        figures.update(
            asyncio.run(run(Path(d), args.seconds, args.images, args.big_clients, args.agent_flag))
        )
    write_result("inference_limits", figures)


if __name__ == "__main__":
    main()
