"""Agent inference overhead against the raw runtimes, and the agent's footprint.

Prints one JSON line of figures (and writes bench/results/agent_overhead.json). Everything runs
on this machine, on loopback: a control plane and an agent as real processes, a 16 -> 32 -> 4
MLP made in code, timed with 1x16 inputs. Latencies are in milliseconds (five decimals: the
in-process ones are a few microseconds).

    python -m bench.agent_overhead [--requests 3000]
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from agent.report.metrics import MetricsRecorder
from agent.serving.runtime import OnnxRuntimeModel, TFLiteModel, check_feeds
from bench.devkit.models import mlp_onnx, mlp_tflite
from bench.harness import (
    Processes,
    create_rollout,
    free_port,
    machine,
    percentile_ms,
    proc_stats,
    push_bundles,
    start_agent,
    start_server,
    wait_http,
    write_result,
)
from control_plane.catalog.build import build_bundle
from protocol.dsse import generate_private_key, public_key_to_pem

DIGITS = 5  # milliseconds to the ten-nanosecond
X = np.random.default_rng(0).normal(size=(1, 16)).astype(np.float32)
BODY = {"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32", "data": X[0].tolist()}]}


def p50_p99(samples_s: list[float]) -> dict[str, float | None]:
    """p50 and p99 in milliseconds."""
    return {
        "p50_ms": percentile_ms(samples_s, 0.5, DIGITS),
        "p99_ms": percentile_ms(samples_s, 0.99, DIGITS),
    }


def time_calls(fn: Callable[[], object], n: int) -> list[float]:
    """Seconds each of ``n`` calls took, after a warm-up."""
    for _ in range(min(1000, n)):
        fn()
    out = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        fn()
        out.append((time.perf_counter_ns() - t0) / 1e9)
    return out


def in_process(n: int, tmp: Path) -> dict[str, Any]:
    """Raw runtime calls against the agent's wrapper (input checks + run + metrics)."""
    import onnxruntime as ort
    from ai_edge_litert.interpreter import Interpreter

    onnx_path, tfl_path = tmp / "mlp.onnx", tmp / "mlp.tflite"
    onnx_path.write_bytes(mlp_onnx())
    tfl_path.write_bytes(mlp_tflite())
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    it = Interpreter(model_path=str(tfl_path), num_threads=1)
    it.allocate_tensors()
    i_in, i_out = it.get_input_details()[0]["index"], it.get_output_details()[0]["index"]

    def raw_tflite() -> object:
        it.set_tensor(i_in, X)
        it.invoke()
        return it.get_tensor(i_out)

    rec = MetricsRecorder(datetime.now(UTC))
    feeds = {"x": X}

    def wrapped(model: Any) -> Callable[[], object]:
        def call() -> object:
            t0 = time.perf_counter()
            check_feeds(model, feeds)
            out = model.run(feeds)
            rec.record("mlp", "1", time.perf_counter() - t0, False)
            return out

        return call

    results: dict[str, Any] = {}
    for name, raw, wrap in (
        ("onnx", lambda: sess.run(["y"], feeds), wrapped(OnnxRuntimeModel(onnx_path))),
        ("tflite", raw_tflite, wrapped(TFLiteModel(tfl_path))),
    ):
        r, w = p50_p99(time_calls(raw, n)), p50_p99(time_calls(wrap, n))
        results[name] = {
            "raw": r,
            "agent_wrapper": w,
            "overhead_p50_ms": round(w["p50_ms"] - r["p50_ms"], DIGITS),  # type: ignore[operator]
            "overhead_p99_ms": round(w["p99_ms"] - r["p99_ms"], DIGITS),  # type: ignore[operator]
        }
    return results


async def http_latency(url: str, body: Any, n: int) -> dict[str, float | None]:
    async with aiohttp.ClientSession() as s:
        samples = []
        for i in range(n + 200):
            t0 = time.perf_counter()
            async with s.post(url, json=body) as r:
                await r.read()
                assert r.status == 200, await r.text()
            if i >= 200:
                samples.append(time.perf_counter() - t0)
    return p50_p99(samples)


async def http_throughput(url: str, body: Any, seconds: float, concurrency: int) -> float:
    done = 0
    stop = time.monotonic() + seconds

    async def worker(s: aiohttp.ClientSession) -> None:
        nonlocal done
        while time.monotonic() < stop:
            async with s.post(url, json=body) as r:
                await r.read()
            done += 1

    async with aiohttp.ClientSession() as s:
        t0 = time.monotonic()
        await asyncio.gather(*(worker(s) for _ in range(concurrency)))
        return round(done / (time.monotonic() - t0), 1)


async def paced(url: str, body: Any, rate: float, seconds: float) -> None:
    async with aiohttp.ClientSession() as s:
        start = time.monotonic()
        for i in range(int(rate * seconds)):
            await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
            async with s.post(url, json=body) as r:
                await r.read()


RAW_SERVER = """
import sys, numpy as np, onnxruntime as ort
from aiohttp import web
opts = ort.SessionOptions(); opts.intra_op_num_threads = opts.inter_op_num_threads = 1
sess = ort.InferenceSession(sys.argv[1], opts, providers=["CPUExecutionProvider"])
async def infer(request):
    doc = await request.json()
    x = np.asarray(doc["inputs"][0]["data"], dtype=np.float32).reshape(doc["inputs"][0]["shape"])
    y = sess.run(["y"], {"x": x})[0]
    return web.json_response({"outputs": [{"name": "y", "datatype": "FP32",
                                           "shape": list(y.shape), "data": y.ravel().tolist()}]})
app = web.Application(); app.router.add_post("/infer", infer)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[2]), print=None)
"""


async def over_http(n: int, tmp: Path) -> dict[str, Any]:
    key = generate_private_key()
    (tmp / "pub.pem").write_bytes(public_key_to_pem(key.public_key()))
    with Processes(tmp / "bench.log") as procs:
        server = await start_server(procs, tmp / "cp", "--trust-publisher", str(tmp / "pub.pem"))
        await push_bundles(
            server,
            build_bundle(mlp_onnx(), "mlp", "1.0.0", [key])[0],
            build_bundle(mlp_tflite(), "mlp-lite", "1.0.0", [key], runtime="tflite")[0],
        )
        agent_proc = await start_agent(procs, server, tmp / "agent", labels="site=bench")
        agent = agent_proc.process
        await create_rollout(server, "mlp")
        agent_url = agent_proc.url
        await wait_http(f"{agent_url}/v2/models/mlp/ready")

        # Footprint: idle with one tiny ONNX model loaded.
        await asyncio.sleep(5)
        cpu0, _ = proc_stats(agent.pid)
        await asyncio.sleep(20)
        cpu1, rss_idle = proc_stats(agent.pid)
        idle_cpu = (cpu1 - cpu0) / 20 * 100
        cpu0, _ = proc_stats(agent.pid)
        await paced(f"{agent_url}/v2/models/mlp/infer", BODY, 100, 10)
        cpu1, rss_loaded = proc_stats(agent.pid)
        loaded_cpu = (cpu1 - cpu0) / 10 * 100

        raw_port = free_port()
        procs.start(sys.executable, "-c", RAW_SERVER, str(tmp / "raw.onnx"), str(raw_port))
        (tmp / "raw.onnx").write_bytes(mlp_onnx())
        await wait_http(f"http://127.0.0.1:{raw_port}/infer", status=405)

        await create_rollout(server, "mlp-lite")
        await wait_http(f"{agent_url}/v2/models/mlp-lite/ready")

        results: dict[str, Any] = {
            "footprint": {
                "idle_rss_mb": round(rss_idle / 2**20, 1),
                "idle_cpu_percent": round(idle_cpu, 2),
                "rss_mb_at_100rps": round(rss_loaded / 2**20, 1),
                "cpu_percent_at_100rps": round(loaded_cpu, 1),
            }
        }
        raw_http = await http_latency(f"http://127.0.0.1:{raw_port}/infer", BODY, n)
        results["raw_aiohttp_plus_session_run"] = {
            **raw_http,
            "rps_8_clients": await http_throughput(
                f"http://127.0.0.1:{raw_port}/infer", BODY, 3, 8
            ),
        }
        for model in ("mlp", "mlp-lite"):
            url = f"{agent_url}/v2/models/{model}/infer"
            lat = await http_latency(url, BODY, n)
            results[f"agent_http_{'onnx' if model == 'mlp' else 'tflite'}"] = {
                **lat,
                "rps_8_clients": await http_throughput(url, BODY, 3, 8),
            }
        return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--requests", type=int, default=3000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        figures: dict[str, Any] = {
            "benchmark": "agent_overhead",
            "machine": machine(processor=platform.machine()),
            "in_process": in_process(args.requests * 10, tmp),
        }
        http = asyncio.run(over_http(args.requests, tmp))
        raw_onnx_p50 = figures["in_process"]["onnx"]["raw"]["p50_ms"]
        agent_onnx = http["agent_http_onnx"]
        agent_onnx["overhead_vs_raw_session_run_p50_ms"] = round(
            agent_onnx["p50_ms"] - raw_onnx_p50, DIGITS
        )
        agent_onnx["overhead_vs_raw_http_server_p50_ms"] = round(
            agent_onnx["p50_ms"] - http["raw_aiohttp_plus_session_run"]["p50_ms"], DIGITS
        )
        figures.update(http)
    write_result("agent_overhead", figures)


if __name__ == "__main__":
    main()
