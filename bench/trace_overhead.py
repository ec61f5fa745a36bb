"""What OpenTelemetry costs the agent's inference entry point (ServingTable.infer).

Prints one JSON line (and writes bench/results/trace_overhead.json): p50 and p99 of one
``infer`` call on a 16 -> 32 -> 4 MLP in this process, with telemetry off (what every agent
without ``--otlp-endpoint`` runs), on without inference sampling (the default when on: the
figures are read from the recorder's totals at export, nothing per request), and on with every
request traced (``--otlp-inference-sample 1``), spans sent to a loopback OTLP sink.

    python -m bench.trace_overhead [--requests 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from aiohttp import web

from agent.config import AgentConfig
from agent.report.metrics import MetricsRecorder
from agent.serving.runtime import LoadedModel, OnnxRuntimeModel
from agent.serving.table import ServingTable
from agent.telemetry import OFF, Telemetry
from agent.telemetry import start as start_telemetry
from bench.devkit.models import mlp_onnx
from bench.harness import machine, percentile_ms, write_result
from protocol.otlp import TelemetryConfig

DIGITS = 5
X = np.random.default_rng(0).normal(size=(1, 16)).astype(np.float32)


async def sink() -> tuple[web.AppRunner, str]:
    """An OTLP/HTTP endpoint on loopback that takes everything and answers 200."""

    async def take(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(content_type="application/x-protobuf")

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/traces", take)
    app.router.add_post("/v1/metrics", take)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


async def timed(table: ServingTable, n: int) -> dict[str, float | None]:
    feeds = {"x": X}
    for _ in range(min(1000, n)):
        await table.infer("mlp", feeds)
    samples = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        await table.infer("mlp", feeds)
        samples.append((time.perf_counter_ns() - t0) / 1e9)
    return {
        "p50_ms": percentile_ms(samples, 0.5, DIGITS),
        "p99_ms": percentile_ms(samples, 0.99, DIGITS),
    }


async def main(n: int) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="trace-overhead-"))
    path = tmp / "mlp.onnx"
    path.write_bytes(mlp_onnx())
    runner, url = await sink()
    executor = ThreadPoolExecutor(2)
    results: dict[str, Any] = {}
    try:
        for mode, sample in (("off", None), ("on_unsampled", 0.0), ("on_every_request", 1.0)):
            telemetry: Telemetry = OFF
            config = AgentConfig(state_dir=tmp)
            if sample is not None:
                tc = TelemetryConfig(url, "bench-agent", inference_sample=sample)
                config = AgentConfig(state_dir=tmp, telemetry=tc)
                telemetry = start_telemetry(tc)
            table = ServingTable(
                config=config,
                executor=executor,
                metrics=MetricsRecorder(datetime.now(UTC)),
                on_rolled_back=lambda event: None,
                telemetry=telemetry,
            )
            telemetry.watch_inference(lambda t=table: t.metrics.totals)
            table.restore(LoadedModel("mlp", "1", "sha256:" + "0" * 64, OnnxRuntimeModel(path)))
            results[mode] = await timed(table, n)
            await telemetry.aclose()
    finally:
        executor.shutdown()
        await runner.cleanup()
    off = results["off"]
    for mode in ("on_unsampled", "on_every_request"):
        results[mode]["added_p50_ms"] = round(results[mode]["p50_ms"] - off["p50_ms"], DIGITS)
    return {"requests": n, "infer": results, "machine": machine()}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20000)
    args = parser.parse_args()
    write_result("trace_overhead", asyncio.run(main(args.requests)))
