"""A big model with external data, through `bundle build` -> `push` -> three agents active.

The model is made in code (``bench.devkit.models.write_external_iris``): the iris classifier
whose weights live in ONNX external data, padded to ``--gb`` over ``--shards`` weight files
that the runtime must load whole (each is read through a Gather), plus a labels file. Then, each
step a real process: `modelfleet bundle build DIR`, `modelfleet server`, `modelfleet push`, and
``--agents`` `modelfleet agent run`s that fetch, verify, lay out and load it.

Figures: wall time of each step; peak resident memory of the build and the push client (from
``wait4``), of the control plane (idle, and its high-water mark after the push and the
agents' downloads) and of each agent (idle, high-water mark, and resident once active); bytes
on disk (model directory, bundle, control plane blobs, each agent's state directory, every
file counted once by inode). The goals: build and push client <= 300 MB, control plane <= 150
MB above idle, whatever the size; agents ~ idle + the weights once. Prints one JSON line;
writes bench/results/big_model.json. The work directory is removed at the end.

    python -m bench.big_model [--gb 3] [--shards 6] [--agents 3] [--work DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from bench.devkit.models import write_external_iris
from bench.harness import (
    MODELFLEET,
    Processes,
    create_rollout,
    machine,
    start_agent,
    start_server,
    write_result,
)
from protocol.dsse import generate_private_key, private_key_to_pem, public_key_to_pem

MB = 1024 * 1024


def status_kb(pid: int, field: str) -> int:
    """A /proc/PID/status figure in bytes (VmRSS: resident now, VmHWM: its peak)."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def run_measured(*args: str) -> tuple[float, int, str]:
    """Run a command to its end: (seconds, peak resident bytes, output); raises SystemExit
    when it fails."""
    t0 = time.monotonic()
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    out = p.stdout.read().decode() if p.stdout else ""
    if p.returncode != 0:
        raise SystemExit(f"{args[1:3]} failed: {out}")
    return time.monotonic() - t0, usage.ru_maxrss * 1024, out.strip()


def disk_bytes(path: Path) -> int:
    """Bytes of the files below ``path``, each counted once however many links it has."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for root, _, names in os.walk(path):
        for n in names:
            st = os.lstat(os.path.join(root, n))
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


async def wait_active(base: str, auth: dict[str, str], n: int, within_s: float) -> None:
    deadline = time.monotonic() + within_s
    async with aiohttp.ClientSession(headers=auth) as s:
        while time.monotonic() < deadline:
            async with s.get(f"{base}/api/v1/agents") as r:
                agents = (await r.json())["agents"]
            states = [m["state"] for a in agents for m in a.get("models", [])]
            if states.count("active") >= n:
                return
            failed = [m.get("reason") for a in agents for m in a.get("models", [])]
            if any(m["state"] == "failed" for a in agents for m in a.get("models", [])):
                raise SystemExit(f"an agent failed the version: {failed}")
            await asyncio.sleep(0.5)
    raise SystemExit(f"the agents were not all active within {within_s:.0f}s")


async def infer_ok(url: str) -> bool:
    body = {
        "inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [5.1, 3.5, 1.4, 0.2]}]
    }
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"{url}/v2/models/iris/infer", json=body) as r,
    ):
        return r.status == 200


async def run(gb: float, shards: int, n_agents: int, work: Path) -> dict[str, Any]:
    figures: dict[str, Any] = {"model_gb": gb, "shards": shards, "agents": n_agents}
    src = work / "model"
    t0 = time.monotonic()
    write_external_iris(src, seed=1, pad_bytes=int(gb * 1024**3), shards=shards)
    (src / "labels.txt").write_text("setosa\nversicolor\nvirginica\n")
    figures["make_model_s"] = round(time.monotonic() - t0, 1)
    key = generate_private_key()
    (work / "publisher.key").write_bytes(private_key_to_pem(key))
    (work / "publisher.pub").write_bytes(public_key_to_pem(key.public_key()))
    bundle = work / "big.mfb"
    secs, rss, out = await asyncio.to_thread(
        run_measured,
        MODELFLEET,
        "bundle",
        "build",
        str(src),
        "--name",
        "iris",
        "--version",
        "1.0.0",
        "--key",
        str(work / "publisher.key"),
        "--out",
        str(bundle),
    )
    figures["build"] = {"s": round(secs, 1), "peak_rss_mb": round(rss / MB, 1), "out": out}
    with Processes(work / "processes.log") as procs:
        server = await start_server(
            procs,
            work / "cp",
            "--trust-publisher",
            str(work / "publisher.pub"),
            "--max-bundle-mb",
            str(int(gb * 1024) + 1024),
        )
        cp_pid = server.process.pid
        await asyncio.sleep(1.0)
        cp_idle = status_kb(cp_pid, "VmRSS")
        env_push = (
            MODELFLEET,
            "push",
            str(bundle),
            "--server",
            server.base,
            "--token",
            server.admin_token,
        )
        secs, rss, out = await asyncio.to_thread(run_measured, *env_push)
        figures["push"] = {"s": round(secs, 1), "peak_rss_mb": round(rss / MB, 1), "out": out}
        cp_after_push = status_kb(cp_pid, "VmHWM")
        agents = []
        for i in range(n_agents):
            agents.append(await start_agent(procs, server, work / f"agent-{i}", "--heartbeat", "1"))
        await asyncio.sleep(3.0)
        idle = [status_kb(a.process.pid, "VmRSS") for a in agents]
        t0 = time.monotonic()
        await create_rollout(server, "iris", "1.0.0")
        await wait_active(server.base, server.auth, n_agents, within_s=600 + 300 * gb)
        figures["rollout_to_all_active_s"] = round(time.monotonic() - t0, 1)
        ok = [await infer_ok(a.url) for a in agents]
        figures["control_plane"] = {
            "idle_rss_mb": round(cp_idle / MB, 1),
            "peak_rss_mb_after_push": round(cp_after_push / MB, 1),
            "peak_rss_mb_after_downloads": round(status_kb(cp_pid, "VmHWM") / MB, 1),
            "peak_above_idle_mb": round((status_kb(cp_pid, "VmHWM") - cp_idle) / MB, 1),
        }
        figures["agents_rss"] = [
            {
                "idle_mb": round(idle[i] / MB, 1),
                "active_mb": round(status_kb(a.process.pid, "VmRSS") / MB, 1),
                "peak_mb": round(status_kb(a.process.pid, "VmHWM") / MB, 1),
                "infer_ok": ok[i],
            }
            for i, a in enumerate(agents)
        ]
    weights = sum(p.stat().st_size for p in src.rglob("*.bin"))
    figures["weights_mb"] = round(weights / MB, 1)
    figures["disk_mb"] = {
        "model_dir": round(disk_bytes(src) / MB, 1),
        "bundle": round(bundle.stat().st_size / MB, 1),
        "control_plane_blobs": round(disk_bytes(work / "cp" / "blobs") / MB, 1),
        "agents": [round(disk_bytes(work / f"agent-{i}") / MB, 1) for i in range(n_agents)],
    }
    return figures


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--gb", type=float, default=3.0, help="weights, in GiB (3)")
    ap.add_argument("--shards", type=int, default=6, help="weight files (6)")
    ap.add_argument("--agents", type=int, default=3, help="agents (3)")
    ap.add_argument("--work", type=Path, help="work directory (default: a temp dir), removed after")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="big-model-", dir=a.work))
    try:
        figures = asyncio.run(run(a.gb, a.shards, a.agents, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_result("big_model", {**figures, "machine": machine()})


if __name__ == "__main__":
    main()
