"""The REST data plane's two choices, measured: the JSON library, and dynamic batching.

1. JSON: the standard library against orjson on real tensor bodies (1x3x224x224 FP32, ~3 MB,
   and batch 8, ~24 MB), decoding to numpy and encoding an answer, in this process; beside
   them what the agent's own parser (agent/serving/oip.py) costs on the same body as JSON and
   as binary tensors. Milliseconds, the best of five.
2. Dynamic batching: one agent process (and its control plane) serves the image classifier of
   bench/devkit/models.py twice, unbatched and with the manifest's batching (max batch 8, 2 ms
   delay); 32 clients each send single-image binary requests back to back. Requests per second
   and p50/p99 latency for each.

Prints one JSON line (and writes bench/results/rest_paths.json).

    python -m bench.rest_paths [--seconds 6] [--clients 32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import orjson

from agent.serving import oip
from bench.devkit.models import classifier_onnx
from bench.harness import (
    Processes,
    closed_loop,
    create_rollout,
    machine,
    percentile_ms,
    push_bundles,
    start_agent,
    start_server,
    wait_http,
    write_result,
)
from control_plane.catalog.build import build_bundle
from protocol.dsse import generate_private_key, public_key_to_pem
from protocol.execution import Batching, Execution

BATCHING = Execution(batching=Batching(8, 2.0), instances=1)


def _best_ms(fn: Callable[[], object], runs: int = 5) -> float:
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return round(best * 1000, 2)


def json_body(x: np.ndarray) -> bytes:
    doc = {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32"}]}
    doc["inputs"][0]["data"] = x.ravel().tolist()
    return json.dumps(doc).encode()


def binary_body(x: np.ndarray, output: str = "probs") -> tuple[bytes, int]:
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "shape": list(x.shape),
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": x.nbytes},
                }
            ],
            "outputs": [{"name": output, "parameters": {"binary_data": True}}],
        }
    ).encode()
    return head + x.tobytes(), len(head)


def json_costs() -> list[dict[str, Any]]:
    """Decode and encode costs by library and body, in milliseconds."""
    rng = np.random.default_rng(0)
    out = []
    for name, shape in (
        ("image 1x3x224x224", (1, 3, 224, 224)),
        ("image batch 8", (8, 3, 224, 224)),
    ):
        x = rng.random(shape, dtype=np.float32)
        body = json_body(x)
        binary, header = binary_body(x)
        flat = x.ravel()
        out.append(
            {
                "body": name,
                "json_mb": round(len(body) / 2**20, 1),
                "json.loads + np.asarray": _best_ms(
                    lambda b=body: np.asarray(json.loads(b)["inputs"][0]["data"], np.float32)
                ),
                "orjson.loads + np.asarray": _best_ms(
                    lambda b=body: np.asarray(orjson.loads(b)["inputs"][0]["data"], np.float32)
                ),
                "oip.parse_request JSON": _best_ms(
                    lambda b=body: oip.parse_request(b, max_elements=1 << 30)
                ),
                "oip.parse_request JSON, in pieces": _best_ms(
                    lambda b=body: oip.parse_request(
                        bytearray(b), max_elements=1 << 30, cooperative=True
                    ),
                    runs=2,
                ),
                "oip.parse_request binary": _best_ms(
                    lambda b=binary, h=header: oip.parse_request(
                        b, max_elements=1 << 30, header_length=h
                    )
                ),
                "json.dumps(tolist) answer": _best_ms(
                    lambda f=flat: json.dumps({"data": f.tolist()}), runs=2
                ),
                "orjson.dumps(numpy) answer": _best_ms(
                    lambda f=flat: orjson.dumps({"data": f}, option=orjson.OPT_SERIALIZE_NUMPY)
                ),
            }
        )
        print(f"  {out[-1]}", file=sys.stderr)
    return out


async def clients_against(url: str, clients: int, seconds: float) -> dict[str, Any]:
    """``clients`` clients sending one image each, back to back, for ``seconds``."""
    x = np.random.default_rng(1).random((1, 3, 224, 224), dtype=np.float32)
    body, header = binary_body(x)
    headers = {
        "Inference-Header-Content-Length": str(header),
        "Content-Type": "application/octet-stream",
    }
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients + 4)) as session:

        async def send() -> None:
            async with session.post(url, data=body, headers=headers) as r:
                data = await r.read()
                if r.status != 200:
                    raise SystemExit(f"{url} answered {r.status}: {data[:300]!r}")

        for _ in range(clients):
            await send()
        times, elapsed = await closed_loop(send, clients, seconds)
    return {
        "rps": round(len(times) / elapsed, 1),
        "p50_ms": percentile_ms(times, 0.5),
        "p99_ms": percentile_ms(times, 0.99),
    }


async def mean_batch(base: str, model: str) -> float | None:
    """The mean batch size the agent counted for ``model`` (its /metrics)."""
    async with aiohttp.ClientSession() as s, s.get(f"{base}/metrics") as r:
        text = await r.text()
    total = count = 0.0
    for line in text.splitlines():
        if line.startswith("modelfleet_inference_batch_size_sum") and f'model="{model}"' in line:
            total = float(line.rsplit(" ", 1)[1])
        if line.startswith("modelfleet_inference_batch_size_count") and f'model="{model}"' in line:
            count = float(line.rsplit(" ", 1)[1])
    return round(total / count, 2) if count else None


async def batching(tmp: Path, clients: int, seconds: float) -> list[dict[str, Any]]:
    key = generate_private_key()
    (tmp / "pub.pem").write_bytes(public_key_to_pem(key.public_key()))
    model = classifier_onnx()
    with Processes(tmp / "agent.log") as procs:
        server = await start_server(procs, tmp / "cp", "--trust-publisher", str(tmp / "pub.pem"))
        await push_bundles(
            server,
            build_bundle(model, "classifier", "1.0.0", [key])[0],
            build_bundle(model, "classifier-batched", "1.0.0", [key], execution=BATCHING)[0],
        )
        agent = await start_agent(procs, server, tmp / "agent", labels="site=bench")
        names = ("classifier", "classifier-batched")
        for name in names:
            await create_rollout(server, name)
        for name in names:
            await wait_http(f"{agent.url}/v2/models/{name}/ready", within_s=120)
        out = []
        for name in names:
            cell = {
                "model": name,
                "batching": BATCHING.batching.to_json() if "batched" in name else None,
                "clients": clients,
                **await clients_against(f"{agent.url}/v2/models/{name}/infer", clients, seconds),
                "mean_batch": await mean_batch(agent.url, name),
            }
            print(f"  {cell}", file=sys.stderr)
            out.append(cell)
        return out


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=6.0, help="per batching cell")
    ap.add_argument("--clients", type=int, default=32)
    args = ap.parse_args()
    figures: dict[str, Any] = {"benchmark": "rest_paths", "machine": machine()}
    figures["json_ms"] = json_costs()
    with tempfile.TemporaryDirectory() as d:
        figures["batching"] = await batching(Path(d), args.clients, args.seconds)
    print(json.dumps(figures))
    write_result("rest_paths", figures)


if __name__ == "__main__":
    asyncio.run(main())
