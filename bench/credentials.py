"""What storing agent credentials as scrypt costs, against the sha256 it replaced.

In process: one sha256 (the raw baseline, what API tokens still use), one scrypt hash (what an
enrollment or a rotation pays), one scrypt check (an agent's first request to a process), and
a remembered check (every request after).
Over HTTP, one `modelfleet server` on SQLite per `--credential-cost` (10, 12 the default,
14): enrollments per second (16 at a time), and the response time of an agent's first request
(scrypt), of its next ones (remembered), and of the same route with an operator's API token
(sha256 lookup: the baseline in the same run).

Prints one JSON line; writes bench/results/credentials.json.

    python -m bench.credentials [--agents 200]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from bench.harness import Processes, machine, percentile_ms, start_server, write_result
from control_plane.security.auth import (
    check_credential,
    hash_credential,
    hash_secret,
    verify_credential,
)


def per_call(fn: Any, n: int) -> float:
    """Mean seconds per call."""
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n


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
    with Processes(tmp / "server.log", stop_within_s=10) as procs:
        server = await start_server(
            procs, tmp / "cp", "--rate-limit", "0", "--credential-cost", str(cost)
        )
        base = f"{server.base}/api/v1"
        async with aiohttp.ClientSession() as s:
            admin = server.auth
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
    return {
        "credential_cost_log2n": cost,
        "agents": agents,
        "enrollments_per_s": round(agents / enroll_s, 1),
        "agent_first_request_p50_ms": percentile_ms(first, 0.5),
        "agent_next_requests_p50_ms": percentile_ms(again, 0.5),
        "operator_token_p50_ms (baseline: sha256)": percentile_ms(operator, 0.5),
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
        "machine": machine(),
        **asyncio.run(main(a.agents)),
    }
    write_result("credentials", figures)
