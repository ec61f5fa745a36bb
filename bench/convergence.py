"""Rollout convergence: time from `rollout create` (one stage, 100%) until every simulated
agent reports the version active, for 100, 1,000 and 10,000 agents, over HTTP long-poll and
over MQTT push, against one `modelfleet server` on PostgreSQL (SQLite with --db sqlite) and a
mosquitto on loopback. The agents are `modelfleet sim` (two worker processes, the real
protocol: enroll, signed desired state verified, manifest and blobs fetched, status and metric
reports). Raw baseline in the same run: the same broker delivering one retained message to
every simulated agent's topic from a plain publisher (what MQTT alone costs for N agents).

Prints one JSON line; writes bench/results/convergence.json.

    python -m bench.convergence [--agents 100,1000,10000] [--transports http,mqtt] [--db postgres]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from bench.devkit.models import mlp_onnx
from bench.harness import (
    MODELFLEET,
    Processes,
    machine,
    new_database,
    raise_open_files_limit,
    start_mosquitto,
    start_server,
    write_result,
)
from control_plane.catalog.build import build_bundle
from protocol.dsse import generate_private_key, public_key_to_pem

RAW_MQTT = r"""
import json, sys, time
import paho.mqtt.client as mqtt
port, n = int(sys.argv[1]), int(sys.argv[2])
got = set()
t_sent = {}
def on_message(c, u, m):
    got.add(m.topic)
sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="raw-sub", protocol=mqtt.MQTTv5)
sub.on_message = on_message
sub.connect("127.0.0.1", port)
sub.subscribe("raw/+/desired", qos=1)
sub.loop_start()
time.sleep(0.5)
pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="raw-pub", protocol=mqtt.MQTTv5)
pub.max_inflight_messages_set(1000)
pub.connect("127.0.0.1", port)
pub.loop_start()
payload = b"x" * 700  # about the size of a signed desired-state document
t0 = time.monotonic()
for i in range(n):
    pub.publish(f"raw/{i}/desired", payload, qos=1, retain=True)
while len(got) < n and time.monotonic() - t0 < 120:
    time.sleep(0.005)
print(json.dumps({"agents": n, "delivered": len(got), "seconds": round(time.monotonic() - t0, 3)}))
"""


async def run(agents: list[int], transports: list[str], db: str) -> dict[str, Any]:
    raise_open_files_limit()  # children inherit it
    tmp = Path(tempfile.mkdtemp())
    url = await new_database(db, tmp)
    key = generate_private_key()
    (tmp / "pub.pem").write_bytes(public_key_to_pem(key.public_key()))
    out: dict[str, Any] = {"db": db}
    with Processes(tmp / "bench.log", stop_within_s=30) as procs:
        mqtt_port = await start_mosquitto(procs, tmp)
        server = await start_server(
            procs,
            tmp / "cp",
            "--db",
            url,
            "--trust-publisher",
            str(tmp / "pub.pem"),
            "--controller-interval",
            "0.2",
            "--rate-limit",
            "0",
            mqtt_port=mqtt_port,
        )
        base, token, auth = server.base, server.admin_token, server.auth
        async with aiohttp.ClientSession() as s:
            n_versions = 0
            for transport in transports:
                for n in agents:
                    n_versions += 1
                    version = f"1.0.{n_versions}"
                    bundle, _ = build_bundle(mlp_onnx(), "mlp", version, [key])
                    async with s.post(f"{base}/api/v1/bundles", data=bundle, headers=auth) as r:
                        assert r.status == 201, await r.text()
                    t0 = time.monotonic()
                    p = await asyncio.create_subprocess_exec(
                        MODELFLEET,
                        "sim",
                        "--server",
                        base,
                        "--token",
                        token,
                        "--agents",
                        str(n),
                        "--transport",
                        transport,
                        "--labels",
                        f"group={transport}-{n}",
                        "--rollout",
                        f"mlp:{version}",
                        "--processes",
                        "2" if n >= 1000 else "1",
                        # One process takes about 400 authenticated report POSTs/s
                        # (bench/ingest.py): 10,000 HTTP agents heartbeat every 100 s here.
                        "--status-interval",
                        str(max(30, n // 100)),
                        "--timeout",
                        "240",
                        stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE,
                    )
                    stdout, stderr = await p.communicate()
                    lines = stdout.decode().strip().splitlines()
                    res = json.loads(lines[-1]) if lines else {"error": stderr.decode()[-500:]}
                    res["wall_s_including_enrollment"] = round(time.monotonic() - t0, 1)
                    out[f"{transport}_{n}"] = res
                    print(transport, n, json.dumps(res), file=sys.stderr)
                    # A case that did not converge must not leave a running rollout behind.
                    async with s.get(f"{base}/api/v1/rollouts", headers=auth) as r:
                        for ro in (await r.json())["rollouts"]:
                            if ro["state"] in ("running", "paused", "pending"):
                                async with s.post(
                                    f"{base}/api/v1/rollouts/{ro['id']}/abort",
                                    headers=auth,
                                    json={},
                                ) as r2:
                                    await r2.read()
        for n in agents:
            p = await asyncio.create_subprocess_exec(
                sys.executable, "-c", RAW_MQTT, str(mqtt_port), str(n), stdout=subprocess.PIPE
            )
            out[f"raw_mqtt_retained_{n}"] = json.loads((await p.communicate())[0])
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--agents", default="100,1000,10000")
    ap.add_argument("--transports", default="http,mqtt")
    ap.add_argument("--db", default="postgres")
    a = ap.parse_args()
    figures = {
        "benchmark": "convergence",
        "machine": machine(),
        **asyncio.run(run([int(x) for x in a.agents.split(",")], a.transports.split(","), a.db)),
    }
    write_result("convergence", figures)
