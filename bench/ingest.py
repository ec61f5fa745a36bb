"""Control plane ingest: status heartbeats and metric batches stored per second over HTTP, on
SQLite and on PostgreSQL, with response-time percentiles at rising offered rates (the knee is
the first rate whose p99 passes 100 ms). Prints one JSON line; writes bench/results/ingest.json.

    python bench/ingest.py [--db sqlite,postgres] [--rates 100,200,400,800,1600] [--seconds 5]
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
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from protocol.reports import MetricsBatch, SeriesWindow, StatusReport  # noqa: E402

MODELFLEET = str(Path(sys.executable).parent / "modelfleet")
PG = os.environ.get("MODELFLEET_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return round(s[min(len(s) - 1, int(q * len(s)))] * 1000, 2)


async def offered(s: aiohttp.ClientSession, base: str, agents: list[dict], kind: str,
                  rate: float, seconds: float) -> dict[str, Any]:  # fmt: skip
    """Send ``rate`` reports per second for ``seconds``; time each answer."""
    seqs = {a["agentId"]: int(time.time() * 1000) for a in agents}
    latencies: list[float] = []
    errors = 0
    start = time.monotonic()
    n = int(rate * seconds)

    async def one(i: int) -> None:
        nonlocal errors
        a = agents[i % len(agents)]
        now = datetime.now(UTC)
        if kind == "status":
            doc = StatusReport(a["agentId"], 1, now, ()).to_json()
        else:
            seqs[a["agentId"]] += 1
            w = SeriesWindow("bench", "1.0.0", requests=100)
            for v in range(100):
                w.latency_ms.add(0.5 + v / 100)
            doc = MetricsBatch(a["agentId"], seqs[a["agentId"]], now - timedelta(seconds=10),
                               now, (w,)).to_json()  # fmt: skip
        t0 = time.monotonic()
        try:
            async with s.post(f"{base}/api/v1/agents/{a['agentId']}/{kind}", json=doc,
                              headers={"Authorization": f"Bearer {a['credential']}"}) as r:  # fmt: skip
                await r.read()
                if r.status != 200:
                    errors += 1
        except aiohttp.ClientError:
            errors += 1
        latencies.append(time.monotonic() - t0)

    tasks = []
    for i in range(n):
        await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
        tasks.append(asyncio.create_task(one(i)))
    await asyncio.gather(*tasks)
    took = time.monotonic() - start
    return {"offered_per_s": rate, "achieved_per_s": round(n / took, 1), "errors": errors,
            "p50_ms": pct(latencies, 0.5), "p99_ms": pct(latencies, 0.99)}  # fmt: skip


async def run_db(db: str, rates: list[float], seconds: float) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp())
    if db == "postgres":
        import asyncpg
        from sqlalchemy.engine import make_url

        u = make_url(PG)
        name = f"mf_bench_{uuid.uuid4().hex[:8]}"
        conn = await asyncpg.connect(host=u.host, port=u.port or 5432, user=u.username,
                                     password=u.password, database=u.database)  # fmt: skip
        await conn.execute(f'CREATE DATABASE "{name}"')
        await conn.close()
        url = u.set(database=name).render_as_string(hide_password=False)
    else:
        url = f"sqlite:///{tmp / 'cp.db'}"
    port = free_port()
    proc = subprocess.Popen([MODELFLEET, "server", "--data-dir", str(tmp / "cp"), "--port",
                             str(port), "--db", url], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    out: dict[str, Any] = {}
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256)) as s:
            for _ in range(300):
                try:
                    async with s.get(f"{base}/api/v1/health") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    await asyncio.sleep(0.1)
            token = (tmp / "cp" / "admin-token").read_text().strip()
            admin = {"Authorization": f"Bearer {token}"}
            async with s.post(f"{base}/api/v1/enrollment-tokens", headers=admin,
                              json={"maxUses": 200}) as r:  # fmt: skip
                et = (await r.json())["token"]
            agents = []
            for _ in range(200):
                async with s.post(f"{base}/api/v1/agents/enroll", json={"token": et}) as r:
                    agents.append(await r.json())
            for kind in ("status", "metrics"):
                steps = []
                for rate in rates:
                    step = await offered(s, base, agents, kind, rate, seconds)
                    steps.append(step)
                    if step["p99_ms"] is not None and step["p99_ms"] > 1000:
                        break  # far past the knee
                knee = next((st["offered_per_s"] for st in steps
                             if st["p99_ms"] is not None and st["p99_ms"] > 100), None)  # fmt: skip
                out[kind] = {"steps": steps, "knee_per_s": knee,
                             "max_achieved_per_s": max(st["achieved_per_s"] for st in steps)}  # fmt: skip
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
    return out


async def main(dbs: list[str], rates: list[float], seconds: float) -> dict[str, Any]:
    return {db: await run_db(db, rates, seconds) for db in dbs}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--db", default="sqlite,postgres")
    ap.add_argument("--rates", default="100,200,400,800,1600")
    ap.add_argument("--seconds", type=float, default=5.0)
    a = ap.parse_args()
    figures = {
        "benchmark": "ingest_http",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        **asyncio.run(main(a.db.split(","), [float(r) for r in a.rates.split(",")], a.seconds)),
    }
    print(json.dumps(figures))
    (ROOT / "bench" / "results" / "ingest.json").write_text(json.dumps(figures, indent=2) + "\n")
