"""Serving: the agent against the raw runtime and MLServer 1.7, same model files, same clients.

Prints one JSON line of figures (and writes bench/results/serving.json) and a table on stderr.
Everything runs on this machine, on loopback: a control plane and an agent (`agent run
--grpc`) as real processes, MLServer 1.7 with a small ONNX Runtime custom runtime
(bench/mlserver/ort_runtime.py, `parallel_workers: 0`) from its own venv, and the raw ONNX
Runtime session in this process. The models are made in code: an image classifier
(x[N,3,224,224] -> probs[N,1000]) and the 16 -> 32 -> 4 MLP.

Each cell: p50 and p99 of one client sending requests one after another, then requests per
second (and p99) with eight clients at once. Request bodies are built once, before timing, so
the figures are the servers' (and the clients' reading of answers), not the encoding of
requests; answers are read whole but not decoded. REST goes through one aiohttp session, gRPC
through Triton's client (`tritonclient.grpc.aio`), the same for the agent and MLServer.

Then dynamic batching: 32 single-image gRPC clients against the classifier, and against the
same file as a second model whose manifest asks for batching (throughput gain, p99 cost).

    make bench-mlserver            # once: MLServer 1.7 in bench/.venv-mlserver
    python -m bench.serving [--seconds 4] [--no-mlserver] [--rows MLP]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import tritonclient.grpc.aio as tgrpc

from bench.devkit.models import classifier_onnx, mlp_onnx
from bench.harness import (
    ROOT,
    Processes,
    closed_loop,
    create_rollout,
    free_port,
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

MLSERVER_VENV = ROOT / "bench" / ".venv-mlserver"
CLIENTS = 8
BATCH_CLIENTS = 32  # single-image clients for the dynamic batching figures
BATCH, DELAY_MS = 16, 2.0  # the batched model's policy
DIGITS = 3


@dataclass(frozen=True)
class Row:
    """One line of the table: a model and the input sent to it."""

    name: str
    model: str
    x: np.ndarray
    output: str


def rows() -> list[Row]:
    rng = np.random.default_rng(0)
    image = rng.random((1, 3, 224, 224), dtype=np.float32)
    return [
        Row("image 1x3x224x224", "classifier", image, "probs"),
        Row("image batch 8", "classifier", rng.random((8, 3, 224, 224), dtype=np.float32), "probs"),
        Row("MLP 16-32-4", "mlp", rng.normal(size=(1, 16)).astype(np.float32), "y"),
    ]


# ---------------------------------------------------------------------------------- timing

Send = Callable[[], Awaitable[object]]


async def measure(send: Send, seconds: float) -> dict[str, Any]:
    """One client for ``seconds / 2``, then CLIENTS clients for ``seconds``."""
    for _ in range(5):
        await send()
    one: list[float] = []
    end = time.monotonic() + seconds / 2
    while time.monotonic() < end and len(one) < 5000:
        t0 = time.perf_counter()
        await send()
        one.append(time.perf_counter() - t0)
    many, elapsed = await closed_loop(send, CLIENTS, seconds)
    return {
        "p50_ms": percentile_ms(one, 0.5, DIGITS),
        "p99_ms": percentile_ms(one, 0.99, DIGITS),
        "rps_8": round(len(many) / elapsed, 1),
        "p99_8_ms": percentile_ms(many, 0.99, DIGITS),
    }


def measure_raw(sess: Any, x: np.ndarray, seconds: float) -> dict[str, Any]:
    """The session alone: one thread, then CLIENTS threads calling run at once."""
    feeds = {"x": x}
    for _ in range(20):
        sess.run(None, feeds)
    one: list[float] = []
    end = time.monotonic() + seconds / 2
    while time.monotonic() < end and len(one) < 20000:
        t0 = time.perf_counter()
        sess.run(None, feeds)
        one.append(time.perf_counter() - t0)
    end = time.monotonic() + seconds

    def client() -> int:
        n = 0
        while time.monotonic() < end:
            sess.run(None, feeds)
            n += 1
        return n

    start = time.monotonic()
    with ThreadPoolExecutor(CLIENTS) as pool:
        done = sum(pool.map(lambda _: client(), range(CLIENTS)))
    return {
        "p50_ms": percentile_ms(one, 0.5, DIGITS),
        "p99_ms": percentile_ms(one, 0.99, DIGITS),
        "rps_8": round(done / (time.monotonic() - start), 1),
    }


# ------------------------------------------------------------------------- request bodies


def json_body(row: Row) -> bytes:
    x = row.x
    return json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "shape": list(x.shape),
                    "datatype": "FP32",
                    "data": x.ravel().tolist(),
                }
            ]
        }
    ).encode()


def binary_body(row: Row) -> tuple[bytes, int]:
    """The KServe binary tensor extension: a JSON header, then the raw values; the header's
    length. The answer is asked for in binary too."""
    x = row.x
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
            "outputs": [{"name": row.output, "parameters": {"binary_data": True}}],
        }
    ).encode()
    return head + x.tobytes(), len(head)


def rest_sender(
    session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str]
) -> Send:
    async def send() -> bytes:
        async with session.post(url, data=body, headers=headers) as r:
            out = await r.read()
            if r.status != 200:
                raise SystemExit(f"{url} answered {r.status}: {out[:300]!r}")
            return out

    return send


def grpc_sender(client: tgrpc.InferenceServerClient, row: Row) -> Send:
    tin = tgrpc.InferInput("x", list(row.x.shape), "FP32")
    tin.set_data_from_numpy(row.x)

    async def send() -> Any:
        return await client.infer(row.model, [tin])

    return send


async def extensions(base: str) -> list[str]:
    async with aiohttp.ClientSession() as s, s.get(f"{base}/v2") as r:
        return list((await r.json()).get("extensions", [])) if r.status == 200 else []


async def serve_cells(
    system: str,
    base: str,
    grpc_url: str,
    table: list[Row],
    seconds: float,
    check: dict[str, np.ndarray],
) -> list[dict[str, Any]]:
    """Every row over REST JSON, REST binary (when the server lists the extension) and gRPC.

    Each REST cell opens its own connections: one kept idle through the cells before (uvicorn
    closes them after 5 s) would fail the next big body with a broken pipe.
    """
    out: list[dict[str, Any]] = []
    binary = "binary_tensor_data" in await extensions(base)
    client = tgrpc.InferenceServerClient(grpc_url)
    try:
        for row in table:
            url = f"{base}/v2/models/{row.model}/infer"
            for transport in ("REST JSON", "REST binary", "gRPC"):
                cell: dict[str, Any] = {"row": row.name, "system": system, "transport": transport}
                if transport == "REST binary" and not binary:
                    out.append({**cell, "skipped": "binary_tensor_data not listed in GET /v2"})
                    continue
                async with aiohttp.ClientSession() as session:
                    if transport == "REST JSON":
                        hdr = {"Content-Type": "application/json"}
                        send = rest_sender(session, url, json_body(row), hdr)
                    elif transport == "REST binary":
                        body, n = binary_body(row)
                        hdr = {
                            "Inference-Header-Content-Length": str(n),
                            "Content-Type": "application/octet-stream",
                        }
                        send = rest_sender(session, url, body, hdr)
                    else:
                        send = grpc_sender(client, row)
                        got = (await send()).as_numpy(row.output)
                        cell["answer_matches_raw"] = bool(
                            got is not None
                            and np.allclose(got, check[row.name], rtol=1e-4, atol=1e-6)
                        )
                    cell.update(await measure(send, seconds))
                print(f"  {system:9} {row.name:18} {transport:11} {cell}", file=sys.stderr)
                out.append(cell)
    finally:
        await client.close()
    return out


# ------------------------------------------------------------------------------- the peers


async def run_agent(
    tmp: Path, table: list[Row], seconds: float, check: dict[str, np.ndarray]
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The agent's cells, and dynamic batching: the same classifier file as a second model
    whose manifest asks for batching."""
    key = generate_private_key()
    (tmp / "pub.pem").write_bytes(public_key_to_pem(key.public_key()))
    classifier = (tmp / "classifier.onnx").read_bytes()
    batched = Execution(batching=Batching(max_batch_size=BATCH, max_queue_delay_ms=DELAY_MS))
    with Processes(tmp / "agent.log") as procs:
        server = await start_server(procs, tmp / "cp", "--trust-publisher", str(tmp / "pub.pem"))
        await push_bundles(
            server,
            build_bundle(classifier, "classifier", "1.0.0", [key])[0],
            build_bundle(classifier, "classifier-batched", "1.0.0", [key], execution=batched)[0],
            build_bundle((tmp / "mlp.onnx").read_bytes(), "mlp", "1.0.0", [key])[0],
        )
        gport = free_port()
        agent = await start_agent(
            procs, server, tmp / "agent", "--grpc", f"127.0.0.1:{gport}", labels="site=bench"
        )
        models = ("classifier", "classifier-batched", "mlp")
        for model in models:
            await create_rollout(server, model)
        for model in models:
            await wait_http(f"{agent.url}/v2/models/{model}/ready", within_s=120)
        grpc_url = f"127.0.0.1:{gport}"
        cells = await serve_cells("agent", agent.url, grpc_url, table, seconds, check)
        image = next((r.x for r in table if r.model == "classifier" and len(r.x) == 1), None)
        if image is None:
            return cells, {"skipped": "no single-image row in this run (--rows)"}
        return cells, await batching(grpc_url, image, seconds)


async def batching(grpc_url: str, x: np.ndarray, seconds: float) -> dict[str, Any]:
    """BATCH_CLIENTS single-image clients over gRPC, unbatched then batched."""
    figures: dict[str, Any] = {
        "clients": BATCH_CLIENTS,
        "policy": {"max_batch_size": BATCH, "max_queue_delay_ms": DELAY_MS},
    }
    client = tgrpc.InferenceServerClient(grpc_url)

    async def load(model: str) -> dict[str, Any]:
        tin = tgrpc.InferInput("x", list(x.shape), "FP32")
        tin.set_data_from_numpy(x)
        for _ in range(20):
            await client.infer(model, [tin])
        samples: list[float] = []
        end = time.monotonic() + seconds

        async def one() -> None:
            while time.monotonic() < end:
                t0 = time.perf_counter()
                await client.infer(model, [tin])
                samples.append(time.perf_counter() - t0)

        start = time.monotonic()
        await asyncio.gather(*(one() for _ in range(BATCH_CLIENTS)))
        return {
            "rps": round(len(samples) / (time.monotonic() - start), 1),
            "p50_ms": percentile_ms(samples, 0.5, DIGITS),
            "p99_ms": percentile_ms(samples, 0.99, DIGITS),
        }

    try:
        for label, model in (("unbatched", "classifier"), ("batched", "classifier-batched")):
            figures[label] = await load(model)
            print(f"  batching  {label:10} {figures[label]}", file=sys.stderr)
    finally:
        await client.close()
    u, b = figures["unbatched"], figures["batched"]
    figures["throughput_gain"] = round(b["rps"] / u["rps"], 2)
    figures["p99_cost_ms"] = round(b["p99_ms"] - u["p99_ms"], DIGITS)
    return figures


def mlserver_repository(tmp: Path, http: int, grpc: int, metrics: int) -> Path:
    repo = tmp / "mlserver"
    repo.mkdir()
    (repo / "settings.json").write_text(
        json.dumps(
            {
                "host": "127.0.0.1",
                "http_port": http,
                "grpc_port": grpc,
                "metrics_port": metrics,
                "metrics_endpoint": None,
                "debug": False,  # its default logs every request
                "grpc_max_message_length": 64 * 2**20,  # the agent's max_request_bytes
                # 1 (the default) crashed at start with uvloop 0.23 here (shared/NOTES.md).
                "parallel_workers": 0,
            }
        )
    )
    runtime = ROOT / "bench" / "mlserver" / "ort_runtime.py"
    shutil.copy(runtime, repo / runtime.name)
    for model in ("classifier", "mlp"):
        d = repo / model
        d.mkdir()
        shutil.copy(tmp / f"{model}.onnx", d / "model.onnx")
        shutil.copy(runtime, d / runtime.name)
        (d / "model-settings.json").write_text(
            json.dumps(
                {
                    "name": model,
                    "implementation": "ort_runtime.OnnxRuntime",
                    "parameters": {"uri": "./model.onnx", "version": "1.0.0"},
                }
            )
        )
    return repo


async def run_mlserver(
    tmp: Path, table: list[Row], seconds: float, check: dict[str, np.ndarray]
) -> list[dict[str, Any]]:
    http, grpc, metrics = free_port(), free_port(), free_port()
    repo = mlserver_repository(tmp, http, grpc, metrics)
    with Processes(tmp / "mlserver.log") as procs:
        procs.start(str(MLSERVER_VENV / "bin" / "mlserver"), "start", str(repo), cwd=repo)
        base = f"http://127.0.0.1:{http}"
        for model in ("classifier", "mlp"):
            await wait_http(f"{base}/v2/models/{model}/ready", within_s=180)
        cells = await serve_cells("MLServer", base, f"127.0.0.1:{grpc}", table, seconds, check)
    for cell in cells:
        if cell["transport"] == "REST binary":
            cell["skipped"] = "MLServer's REST path answers the binary tensor extension with a 500"
    return cells


def mlserver_version() -> str | None:
    py = MLSERVER_VENV / "bin" / "python"
    if not py.exists():
        return None
    p = subprocess.run(
        [str(py), "-c", "import mlserver; print(mlserver.__version__)"],
        capture_output=True,
        text=True,
    )
    return p.stdout.strip() or None


def import_cost() -> dict[str, Any]:
    """What the gRPC server module adds to an agent process: milliseconds to import it after
    the daemon, and peak resident memory before and after (best of five fresh processes)."""
    # VmHWM, not ru_maxrss: the latter carries the parent's peak across exec.
    code = (
        "import time, pathlib\n"
        "def hwm():\n"
        "    s = pathlib.Path('/proc/self/status').read_text().splitlines()\n"
        "    return int([ln for ln in s if ln.startswith('VmHWM')][0].split()[1])\n"
        "t = time.perf_counter(); import agent.daemon; t1 = time.perf_counter(); a = hwm()\n"
        "import agent.serving.grpc; t2 = time.perf_counter()\n"
        "print(t1 - t, a, t2 - t1, hwm())\n"
    )
    runs = []
    for _ in range(5):
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        runs.append([float(v) for v in p.stdout.split()])
    daemon_s, rss_kb, grpc_s, rss_grpc_kb = (min(col) for col in zip(*runs, strict=True))
    return {
        "agent_import_ms": round(daemon_s * 1000),
        "agent_peak_rss_mb": round(rss_kb / 1024, 1),
        "grpc_import_ms_added": round(grpc_s * 1000),
        "with_grpc_peak_rss_mb": round(rss_grpc_kb / 1024, 1),
    }


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--seconds", type=float, default=4.0, help="per cell, eight clients (one: half)"
    )
    ap.add_argument("--no-mlserver", action="store_true", help="leave MLServer out")
    ap.add_argument("--rows", help="only the rows whose name holds this (e.g. MLP)")
    args = ap.parse_args()
    import onnxruntime as ort

    table = [r for r in rows() if args.rows is None or args.rows in r.name]
    figures: dict[str, Any] = {"benchmark": "serving", "machine": machine(), "clients": CLIENTS}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        (tmp / "classifier.onnx").write_bytes(classifier_onnx())
        (tmp / "mlp.onnx").write_bytes(mlp_onnx())
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = opts.inter_op_num_threads = 1
        sessions = {
            m: ort.InferenceSession(
                str(tmp / f"{m}.onnx"), opts, providers=["CPUExecutionProvider"]
            )
            for m in ("classifier", "mlp")
        }
        check = {r.name: sessions[r.model].run(None, {"x": r.x})[0] for r in table}
        cells: list[dict[str, Any]] = []
        for row in table:
            cell = {"row": row.name, "system": "raw ONNX Runtime", "transport": "session.run"}
            cell.update(measure_raw(sessions[row.model], row.x, args.seconds))
            print(f"  {'raw':9} {row.name:18} {'run':11} {cell}", file=sys.stderr)
            cells.append(cell)
        agent_cells, figures["batching"] = await run_agent(tmp, table, args.seconds, check)
        cells += agent_cells
        version = mlserver_version()
        if args.no_mlserver:
            figures["mlserver"] = "left out (--no-mlserver)"
        elif version is None:
            figures["mlserver"] = (
                f"not installed in {MLSERVER_VENV.relative_to(ROOT)} (make bench-mlserver)"
            )
        else:
            figures["mlserver"] = version
            cells += await run_mlserver(tmp, table, args.seconds, check)
    figures["cells"] = cells
    figures["footprint"] = import_cost()
    figures["bench_peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print_table(cells)
    write_result("serving", figures)


def print_table(cells: list[dict[str, Any]]) -> None:
    """The cells as the README's Markdown table, on stderr."""
    print(
        "| model | server | transport | p50 ms | p99 ms | req/s @8 | p99 ms @8 |", file=sys.stderr
    )
    print("|---|---|---|---|---|---|---|", file=sys.stderr)
    for c in cells:
        if "skipped" in c:
            continue
        print(
            f"| {c['row']} | {c['system']} | {c['transport']} | {c['p50_ms']} | {c['p99_ms']} "
            f"| {c['rps_8']:,} | {c.get('p99_8_ms', '')} |",
            file=sys.stderr,
        )


if __name__ == "__main__":
    asyncio.run(main())
