"""What storing agent credentials as scrypt costs, against the sha256 it replaced.

In process: one sha256 (the raw baseline, what API tokens still use), one scrypt hash (what an
enrollment or a rotation pays), one scrypt check (an agent's first request to a process), and
a remembered check (every request after).
Over HTTP, one `modelfleet server` on SQLite per `--credential-cost` (10, 12 the default,
14): enrollments per second (16 at a time), and the response time of an agent's first request
(scrypt), of its next ones (remembered), and of the same route with an operator's API token
(sha256 lookup: the baseline in the same run).

Prints one JSON line; writes bench/results/credentials.json.

    python bench/credentials.py [--agents 200]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from control_plane.auth import (  # noqa: E402
    check_credential,
    hash_credential,
    hash_secret,
    verify_credential,
)
from tests.support.fleet import free_port  # noqa: E402

MODELFLEET = str(Path(sys.executable).parent / "modelfleet")


def per_call(fn: Any, n: int) -> float:
    """Mean seconds per call."""
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


async def in_process() -> dict[str, float]:
    secret = "mfc_" + "x" * 43
    stored = hash_credential(secret)
    await verify_credential(secret, stored)  # remembered from now on
    n = 2000
    t = time.perf_counter()
    for _ in range(n):
        await verify_credential(secret, stored)
    remembered = (time.perf_counter() - t) / n
    return {
        "sha256_us": per_call(lambda: hash_secret(secret), 20000) * 1e6,
        "scrypt_hash_ms": per_call(lambda: hash_credential(secret), 20) * 1e3,
        "scrypt_check_ms": per_call(lambda: check_credential(secret, stored), 20) * 1e3,
        "remembered_check_us": remembered * 1e6,
    }


async def over_http(agents: int, cost: int) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp())
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
            "--rate-limit",
            "0",
            "--credential-cost",
            str(cost),
        ],
        stdout=log,
        stderr=log,
    )
    base = f"http://127.0.0.1:{port}/api/v1"
    try:
        async with aiohttp.ClientSession() as s:
            for _ in range(300):
                try:
                    async with s.get(f"{base}/health") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
            admin = {"Authorization": f"Bearer {(tmp / 'cp' / 'admin-token').read_text().strip()}"}
            async with s.post(
                f"{base}/enrollment-tokens", headers=admin, json={"maxUses": agents}
            ) as r:
                et = (await r.json())["token"]
            sem = asyncio.Semaphore(16)

            async def enroll() -> dict:
                async with sem, s.post(f"{base}/agents/enroll", json={"token": et}) as r:
                    assert r.status == 201, await r.text()
                    return await r.json()

            t = time.perf_counter()
            enrolled = await asyncio.gather(*(enroll() for _ in range(agents)))
            enroll_s = time.perf_counter() - t

            async def timed(path: str, token: str) -> float:
                t = time.perf_counter()
                async with s.get(
                    f"{base}{path}", headers={"Authorization": f"Bearer {token}"}
                ) as r:
                    assert r.status == 200, await r.text()
                    await r.read()
                return time.perf_counter() - t

            first, again, operator = [], [], []
            for a in enrolled:  # one at a time: response times, not throughput
                path = f"/agents/{a['agentId']}"
                first.append(await timed(path, a["credential"]))
                again.append(await timed(path, a["credential"]))
                operator.append(await timed(path, admin["Authorization"][7:]))
    finally:
        proc.terminate()
        proc.wait(10)
    ms = 1e3
    return {
        "credential_cost_log2n": cost,
        "agents": agents,
        "enrollments_per_s": round(agents / enroll_s, 1),
        "agent_first_request_p50_ms": round(pct(first, 0.5) * ms, 2),
        "agent_next_requests_p50_ms": round(pct(again, 0.5) * ms, 2),
        "operator_token_p50_ms (baseline: sha256)": round(pct(operator, 0.5) * ms, 2),
    }


async def main(agents: int) -> dict[str, Any]:
    out: dict[str, Any] = {"in_process": await in_process()}
    for cost in (10, 12, 14):  # 12 is the default
        out[f"http_sqlite_cost_{cost}"] = await over_http(agents, cost)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--agents", type=int, default=200)
    a = ap.parse_args()
    figures = {
        "benchmark": "credentials",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        **asyncio.run(main(a.agents)),
    }
    print(json.dumps(figures))
    (ROOT / "bench" / "results" / "credentials.json").write_text(
        json.dumps(figures, indent=2) + "\n"
    )
