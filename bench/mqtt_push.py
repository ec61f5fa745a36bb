"""MQTT push latency and MQTT status ingest of one control plane process.

Starts a mosquitto and a `modelfleet server --mqtt` on loopback, enrolls simulated agents
(``control_plane.sim.fleet``'s, the agents of `modelfleet sim`: one MQTT connection each, subscribed
to their desired topics), then for groups of 1, 100 and 1,000 agents creates a one-stage
rollout and times, per agent, the gap from the rollout request to the signed desired state
arriving. Then it publishes status messages as fast as it can and reads how many per second
the control plane stored. Prints one JSON line (and writes bench/results/mqtt_push.json).

    python -m bench.mqtt_push [--groups 1,100,1000] [--status 5000]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import aiomqtt

from bench.devkit.models import mlp_onnx
from bench.harness import (
    PREFIX,
    Processes,
    machine,
    percentile_ms,
    raise_open_files_limit,
    start_mosquitto,
    start_server,
    write_result,
)
from control_plane.catalog.build import build_bundle
from control_plane.sim.fleet import Fleet, SimAgent, SimOptions
from protocol.dsse import generate_private_key, public_key_to_pem
from protocol.timeutil import format_time

SUBSCRIPTIONS = "$SYS/broker/subscriptions/count"


class PushTimedAgent(SimAgent):
    """`modelfleet sim`'s agent, noting when each signed document arrives (before verifying)."""

    def __init__(self, fleet: Fleet, enrolled: dict[str, Any]) -> None:
        super().__init__(fleet, enrolled, "ok")
        self.received: dict[int, float] = {}  # generation -> monotonic arrival

    async def on_desired(self, s: aiohttp.ClientSession, envelope: bytes, mqtt: Any) -> None:
        """Note the arrival, then do what the simulated agent does."""
        arrived = time.monotonic()
        try:
            generation = json.loads(base64.b64decode(json.loads(envelope)["payload"]))["generation"]
        except (ValueError, KeyError, TypeError):
            generation = None  # a cleared retained document, or garbage: the agent ignores it
        if generation is not None:
            self.received.setdefault(generation, arrived)
        await super().on_desired(s, envelope, mqtt)


async def subscriptions(port: int) -> int:
    """How many subscriptions the broker holds now (its $SYS count, published every second)."""
    async with aiomqtt.Client("127.0.0.1", port, identifier="bench-sys") as c:
        await c.subscribe(SUBSCRIPTIONS)
        async for m in c.messages:
            return int(bytes(m.payload))  # type: ignore[arg-type]
    raise SystemExit("the broker closed the $SYS subscription")


async def wait_subscribed(port: int, want: int, within_s: float = 120.0) -> None:
    """Until the broker holds ``want`` subscriptions; raises SystemExit when it does not."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if await subscriptions(port) >= want:
            return
        await asyncio.sleep(0.2)
    raise SystemExit(f"the simulated agents did not subscribe within {within_s}s")


async def settled(s: aiohttp.ClientSession, health_url: str, within_s: float = 60.0) -> None:
    """Until the control plane's count of stored MQTT status reports holds still for 1 s."""
    last = None
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        async with s.get(health_url) as r:
            now = (await r.json())["mqtt"]["stored"]["status"]
        if now == last:
            return
        last = now
        await asyncio.sleep(1.0)


async def main(groups: list[int], status_messages: int) -> dict[str, Any]:
    raise_open_files_limit()
    tmp = Path(tempfile.mkdtemp())
    key = generate_private_key()
    (tmp / "pub.pem").write_bytes(public_key_to_pem(key.public_key()))
    tasks: list[asyncio.Task[None]] = []
    with Processes(tmp / "bench.log") as procs:
        mqtt_port = await start_mosquitto(procs, tmp, extra="sys_interval 1\n")
        server = await start_server(
            procs,
            tmp / "cp",
            "--trust-publisher",
            str(tmp / "pub.pem"),
            "--controller-interval",
            "0.2",
            mqtt_port=mqtt_port,
        )
        base = server.base
        # No heartbeats: the figures are the push path's, with no report load beside it.
        opts = SimOptions(
            server=base,
            token=server.admin_token,
            agents=sum(groups),
            transport="mqtt",
            labels={},
            status_interval_s=3600,
        )
        fleet = Fleet(opts)
        results: dict[str, Any] = {}
        async with aiohttp.ClientSession(headers=server.auth) as s, aiohttp.ClientSession() as sim:
            try:
                agents: dict[int, list[PushTimedAgent]] = {}
                for n in groups:
                    async with s.post(
                        f"{base}/api/v1/enrollment-tokens",
                        json={"maxUses": n, "labels": {"group": f"g{n}"}},
                    ) as r:
                        et = (await r.json())["token"]
                    agents[n] = []
                    for _ in range(n):
                        async with s.post(f"{base}/api/v1/agents/enroll", json={"token": et}) as r:
                            agents[n].append(PushTimedAgent(fleet, await r.json()))
                everyone = [a for group in agents.values() for a in group]
                before = await subscriptions(mqtt_port)
                tasks = [asyncio.create_task(a.run(sim)) for a in everyone]
                await wait_subscribed(mqtt_port, before + len(everyone))
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
                        "p50_ms": percentile_ms(lat, 0.5),
                        "p99_ms": percentile_ms(lat, 0.99),
                        "max_ms": percentile_ms(lat, 1.0),
                    }
                # Status ingest: simulated agents' status messages, as fast as one client sends,
                # once the agents' own reports on their rollouts are stored (not counted here).
                await settled(s, f"{base}/api/v1/health")
                sample = everyone[: min(len(everyone), 200)]
                async with aiomqtt.Client(
                    "127.0.0.1",
                    mqtt_port,
                    identifier="sim-status",
                    protocol=aiomqtt.ProtocolVersion.V5,
                ) as c:
                    async with s.get(f"{base}/api/v1/health") as r:
                        before = (await r.json())["mqtt"]["stored"]["status"]
                    t0 = time.monotonic()
                    for i in range(status_messages):
                        a = sample[i % len(sample)]
                        doc = {
                            "agentId": a.id,
                            "generation": 1,
                            "models": [],
                            "sentAt": format_time(datetime.now(UTC)),
                        }
                        await c.publish(
                            f"{PREFIX}/agents/{a.id}/status", json.dumps(doc).encode(), qos=1
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
            finally:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        return results


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--groups", default="1,100,1000")
    ap.add_argument("--status", type=int, default=3000)
    args = ap.parse_args()
    figures = {
        "benchmark": "mqtt_push",
        "machine": machine(),
        **asyncio.run(main([int(x) for x in args.groups.split(",")], args.status)),
    }
    write_result("mqtt_push", figures)
