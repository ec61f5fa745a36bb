"""MQTT push latency and MQTT status ingest of one control plane process.

Starts a mosquitto and a `modelfleet server --mqtt` on loopback, enrolls simulated agents
(lightweight MQTT clients subscribed to their desired topics, one connection each), then for
groups of 1, 100 and 1,000 agents creates a one-stage rollout and times, per agent, the gap
from the rollout request to the signed desired state arriving. Then it publishes status
messages as fast as it can and reads how many per second the control plane stored.
Prints one JSON line (and writes bench/results/mqtt_push.json).

    python bench/mqtt_push.py [--groups 1,100,1000] [--status 5000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import aiomqtt

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from control_plane.cli.publish import build_bundle  # noqa: E402
from protocol.dsse import generate_private_key, public_key_to_pem  # noqa: E402
from protocol.timeutil import format_time  # noqa: E402
from toymodels import mlp_onnx  # noqa: E402

MODELFLEET = str(Path(sys.executable).parent / "modelfleet")
PREFIX = "bench/v1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return round(s[min(len(s) - 1, int(q * len(s)))] * 1000, 2)


async def wait_http(url: str) -> None:
    async with aiohttp.ClientSession() as s:
        for _ in range(300):
            try:
                async with s.get(url) as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise SystemExit(f"{url} did not come up")


class SimAgent:
    """A simulated agent: one MQTT connection, subscribed to its desired topic."""

    def __init__(self, agent_id: str, port: int) -> None:
        self.agent_id = agent_id
        self.port = port
        self.received: dict[int, float] = {}  # generation -> monotonic arrival
        self.ready = asyncio.Event()

    async def run(self) -> None:
        async with aiomqtt.Client(
            "127.0.0.1",
            self.port,
            identifier=f"sim-{self.agent_id}",
            protocol=aiomqtt.ProtocolVersion.V5,
        ) as c:
            await c.subscribe(f"{PREFIX}/agents/{self.agent_id}/desired", qos=1)
            self.ready.set()
            async for m in c.messages:
                doc = json.loads(m.payload)  # type: ignore[arg-type]
                import base64

                payload = json.loads(base64.b64decode(doc["payload"]))
                self.received.setdefault(payload["generation"], time.monotonic())


async def main(groups: list[int], status_messages: int) -> dict[str, Any]:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))
    tmp = Path(tempfile.mkdtemp())
    mqtt_port, cp_port = free_port(), free_port()
    (tmp / "m.conf").write_text(
        f"listener {mqtt_port} 127.0.0.1\nallow_anonymous true\n"
        f"max_queued_messages 100000\n" + ("user root\n" if os.geteuid() == 0 else "")
    )
    key = generate_private_key()
    (tmp / "pub.pem").write_bytes(public_key_to_pem(key.public_key()))
    log = (tmp / "bench.log").open("wb")
    procs = [
        subprocess.Popen(
            [shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(tmp / "m.conf")],
            stdout=log,
            stderr=log,
        )
    ]
    await asyncio.sleep(0.5)
    procs.append(
        subprocess.Popen(
            [
                MODELFLEET,
                "server",
                "--data-dir",
                str(tmp / "cp"),
                "--port",
                str(cp_port),
                "--trust-publisher",
                str(tmp / "pub.pem"),
                "--mqtt",
                f"mqtt://127.0.0.1:{mqtt_port}",
                "--mqtt-prefix",
                PREFIX,
                "--controller-interval",
                "0.2",
            ],
            stdout=log,
            stderr=log,
        )
    )
    base = f"http://127.0.0.1:{cp_port}"
    sims: list[asyncio.Task[None]] = []
    try:
        await wait_http(f"{base}/api/v1/health")
        token = (tmp / "cp" / "admin-token").read_text().strip()
        auth = {"Authorization": f"Bearer {token}"}
        results: dict[str, Any] = {}
        async with aiohttp.ClientSession(headers=auth) as s:
            agents: dict[int, list[SimAgent]] = {}
            for n in groups:
                async with s.post(
                    f"{base}/api/v1/enrollment-tokens",
                    json={"maxUses": n, "labels": {"group": f"g{n}"}},
                ) as r:
                    et = (await r.json())["token"]
                agents[n] = []
                for _ in range(n):
                    async with s.post(f"{base}/api/v1/agents/enroll", json={"token": et}) as r:
                        agents[n].append(SimAgent((await r.json())["agentId"], mqtt_port))
            everyone = [a for group in agents.values() for a in group]
            sims = [asyncio.create_task(a.run()) for a in everyone]
            await asyncio.wait_for(asyncio.gather(*(a.ready.wait() for a in everyone)), 120)
            for i, n in enumerate(groups):
                bundle, _ = build_bundle(mlp_onnx(), "mlp", f"1.0.{i}", [key])
                async with s.post(f"{base}/api/v1/bundles", data=bundle) as r:
                    assert r.status == 201, await r.text()
                t0 = time.monotonic()
                async with s.post(
                    f"{base}/api/v1/rollouts",
                    json={"model": "mlp", "version": f"1.0.{i}", "selector": f"group=g{n}"},
                ) as r:
                    assert r.status == 201, await r.text()
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline and not all(a.received for a in agents[n]):
                    await asyncio.sleep(0.01)
                lat = [min(a.received.values()) - t0 for a in agents[n] if a.received]
                results[f"push_{n}_agents"] = {
                    "delivered": len(lat),
                    "p50_ms": pct(lat, 0.5),
                    "p99_ms": pct(lat, 0.99),
                    "max_ms": pct(lat, 1.0),
                }
            # Status ingest: simulated agents' status messages, as fast as one client sends.
            sample = everyone[: min(len(everyone), 200)]
            async with aiomqtt.Client(
                "127.0.0.1", mqtt_port, identifier="sim-status", protocol=aiomqtt.ProtocolVersion.V5
            ) as c:
                async with s.get(f"{base}/api/v1/health") as r:
                    before = (await r.json())["mqtt"]["stored"]["status"]
                t0 = time.monotonic()
                for i in range(status_messages):
                    a = sample[i % len(sample)]
                    doc = {
                        "agentId": a.agent_id,
                        "generation": 1,
                        "models": [],
                        "sentAt": format_time(datetime.now(UTC)),
                    }
                    await c.publish(
                        f"{PREFIX}/agents/{a.agent_id}/status", json.dumps(doc).encode(), qos=1
                    )
                sent_s = time.monotonic() - t0
                stored = before
                while stored - before < status_messages and time.monotonic() - t0 < 300:
                    await asyncio.sleep(0.2)
                    async with s.get(f"{base}/api/v1/health") as r:
                        stored = (await r.json())["mqtt"]["stored"]["status"]
                took = time.monotonic() - t0
            results["status_ingest"] = {
                "messages": status_messages,
                "stored": stored - before,
                "publish_seconds": round(sent_s, 2),
                "stored_per_second": round((stored - before) / took, 1),
            }
        return results
    finally:
        for t in sims:
            t.cancel()
        await asyncio.gather(*sims, return_exceptions=True)
        for p in reversed(procs):
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--groups", default="1,100,1000")
    ap.add_argument("--status", type=int, default=3000)
    args = ap.parse_args()
    figures = {
        "benchmark": "mqtt_push",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        **asyncio.run(main([int(x) for x in args.groups.split(",")], args.status)),
    }
    print(json.dumps(figures))
    (ROOT / "bench" / "results" / "mqtt_push.json").write_text(json.dumps(figures, indent=2) + "\n")
