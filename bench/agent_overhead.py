"""Agent inference overhead against the raw runtimes, and the agent's footprint.

Prints one JSON line of figures (and writes bench/results/agent_overhead.json). Everything runs
on this machine, on loopback: a control plane and an agent as real processes, a 16 -> 32 -> 4
MLP made in code, timed with 1x16 inputs.

    python bench/agent_overhead.py [--requests 3000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.metrics import MetricsRecorder  # noqa: E402
from agent.runtime import OnnxRuntimeModel, TFLiteModel, check_feeds  # noqa: E402
from control_plane.cli.publish import build_bundle  # noqa: E402
from protocol.dsse import generate_private_key, public_key_to_pem  # noqa: E402
from toymodels import mlp_onnx, mlp_tflite  # noqa: E402

MODELFLEET = str(Path(sys.executable).parent / "modelfleet")
X = np.random.default_rng(0).normal(size=(1, 16)).astype(np.float32)
BODY = {"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32", "data": X[0].tolist()}]}


def us(samples_ns: list[int]) -> dict[str, float]:
    """p50 and p99 in microseconds."""
    s = sorted(samples_ns)
    return {
        "p50_us": round(s[len(s) // 2] / 1000, 2),
        "p99_us": round(s[int(len(s) * 0.99)] / 1000, 2),
    }


def time_calls(fn: Callable[[], object], n: int) -> list[int]:
    for _ in range(min(1000, n)):
        fn()
    out = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        fn()
        out.append(time.perf_counter_ns() - t0)
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
        r, w = us(time_calls(raw, n)), us(time_calls(wrap, n))
        results[name] = {
            "raw": r,
            "agent_wrapper": w,
            "overhead_p50_us": round(w["p50_us"] - r["p50_us"], 2),
            "overhead_p99_us": round(w["p99_us"] - r["p99_us"], 2),
        }
    return results


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_stats(pid: int) -> tuple[float, int]:
    """(CPU seconds used, resident bytes) of a process."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    return cpu, rss


async def wait_http(url: str, status: int = 200, within: float = 60.0) -> None:
    deadline = time.monotonic() + within
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < deadline:
            try:
                async with s.get(url) as r:
                    if r.status == status:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    raise SystemExit(f"{url} did not answer {status} within {within}s")


async def http_latency(url: str, body: Any, n: int) -> dict[str, float]:
    async with aiohttp.ClientSession() as s:
        samples = []
        for i in range(n + 200):
            t0 = time.perf_counter_ns()
            async with s.post(url, json=body) as r:
                await r.read()
                assert r.status == 200, await r.text()
            if i >= 200:
                samples.append(time.perf_counter_ns() - t0)
    return us(samples)


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


async def rollout(base: str, auth: dict[str, str], model: str) -> None:
    async with (
        aiohttp.ClientSession(headers=auth) as s,
        s.post(f"{base}/api/v1/rollouts", json={"model": model, "version": "1.0.0"}) as r,
    ):
        assert r.status == 201, await r.text()


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
    cp_port, agent_port, raw_port = free_port(), free_port(), free_port()
    procs: list[subprocess.Popen[bytes]] = []
    log = (tmp / "bench.log").open("wb")

    def start(*args: str) -> subprocess.Popen[bytes]:
        p = subprocess.Popen(list(args), stdout=log, stderr=log, cwd=tmp)
        procs.append(p)
        return p

    try:
        start(
            MODELFLEET,
            "server",
            "--data-dir",
            "cp",
            "--port",
            str(cp_port),
            "--trust-publisher",
            "pub.pem",
        )
        base = f"http://127.0.0.1:{cp_port}"
        await wait_http(f"{base}/api/v1/health")
        token = (tmp / "cp" / "admin-token").read_text().strip()
        auth = {"Authorization": f"Bearer {token}"}
        onnx_bundle, _ = build_bundle(mlp_onnx(), "mlp", "1.0.0", [key])
        tfl_bundle, _ = build_bundle(mlp_tflite(), "mlp-lite", "1.0.0", [key], runtime="tflite")
        async with aiohttp.ClientSession(headers=auth) as s:
            for b in (onnx_bundle, tfl_bundle):
                async with s.post(f"{base}/api/v1/bundles", data=b) as r:
                    assert r.status == 201, await r.text()
            async with s.post(f"{base}/api/v1/enrollment-tokens", json={}) as r:
                enroll_token = (await r.json())["token"]
        enroll = [
            MODELFLEET,
            "agent",
            "enroll",
            "--server",
            base,
            "--token",
            enroll_token,
            "--state-dir",
            "agent",
            "--labels",
            "site=bench",
        ]
        await asyncio.to_thread(subprocess.run, enroll, cwd=tmp, check=True, capture_output=True)
        agent = start(
            MODELFLEET, "agent", "run", "--state-dir", "agent", "--serve", f"127.0.0.1:{agent_port}"
        )
        await rollout(base, auth, "mlp")
        agent_url = f"http://127.0.0.1:{agent_port}"
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

        start(sys.executable, "-c", RAW_SERVER, str(tmp / "raw.onnx"), str(raw_port))
        (tmp / "raw.onnx").write_bytes(mlp_onnx())
        await wait_http(f"http://127.0.0.1:{raw_port}/infer", status=405)

        await rollout(base, auth, "mlp-lite")
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
    finally:
        for p in reversed(procs):
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--requests", type=int, default=3000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        figures: dict[str, Any] = {
            "benchmark": "agent_overhead",
            "machine": {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "processor": platform.machine(),
            },
            "in_process": in_process(args.requests * 10, tmp),
        }
        http = asyncio.run(over_http(args.requests, tmp))
        raw_onnx_p50 = figures["in_process"]["onnx"]["raw"]["p50_us"]
        http["agent_http_onnx"]["overhead_vs_raw_session_run_p50_us"] = round(
            http["agent_http_onnx"]["p50_us"] - raw_onnx_p50, 1
        )
        http["agent_http_onnx"]["overhead_vs_raw_http_server_p50_us"] = round(
            http["agent_http_onnx"]["p50_us"] - http["raw_aiohttp_plus_session_run"]["p50_us"], 1
        )
        figures.update(http)
    line = json.dumps(figures)
    print(line)
    out = ROOT / "bench" / "results" / "agent_overhead.json"
    out.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"written to {out.relative_to(ROOT)}", file=sys.stderr)


if __name__ == "__main__":
    main()
