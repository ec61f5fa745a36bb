"""Control plane ingest: status heartbeats and metric batches stored per second by one
`modelfleet server` process, over HTTP and over MQTT, on SQLite and on PostgreSQL.

For each database:
- HTTP, offered-rate steps from a Python client: p50/p99 response time per rate; the knee is the
  first rate whose p99 passes 100 ms.
- HTTP, most it stores: `wrk` (when installed: it is C, so the load generator leaves the server
  most of the second core) drives 64 connections round-robin over 1,000 enrolled agents for a
  few seconds; stored/s is read from the server's own counter (`/api/v1/health` ingest.reports),
  with wrk's p50/p99.
- MQTT: a separate publisher process sends QoS 1 status (then metrics) messages for 1,000
  agents as fast as it can through a mosquitto on loopback; stored/s is read from the bridge's
  counters.
Raw baseline in the same run: `wrk` against `/api/v1/health` (one trivial database read per
request, no report) says what the HTTP stack alone gives on this machine.

Prints one JSON line; writes bench/results/ingest.json.

    python -m bench.ingest [--db sqlite,postgres] [--rates 200,400,800,1600,3200] [--seconds 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp

from bench.harness import (
    PREFIX,
    Processes,
    machine,
    new_database,
    percentile_ms,
    raise_open_files_limit,
    start_mosquitto,
    start_server,
    write_result,
)
from protocol.reports import MetricsBatch, SeriesWindow, StatusReport

AGENTS = 1000
SEQ_SENTINEL = 987654321


def status_doc(agent_id: str) -> dict[str, Any]:
    return StatusReport(agent_id, 1, datetime.now(UTC), ()).to_json()


def metrics_doc(agent_id: str, seq: int) -> dict[str, Any]:
    now = datetime.now(UTC)
    w = SeriesWindow("bench", "1.0.0", requests=100)
    for v in range(100):
        w.latency_ms.add(0.5 + v / 100)
    return MetricsBatch(agent_id, seq, now - timedelta(seconds=10), now, (w,)).to_json()


async def offered(
    s: aiohttp.ClientSession, base: str, agents: list[dict], kind: str, rate: float, seconds: float
) -> dict[str, Any]:
    """Send ``rate`` reports per second for ``seconds``; time each answer."""
    seqs = {a["agentId"]: int(time.time() * 1000) for a in agents}
    latencies: list[float] = []
    errors = 0
    start = time.monotonic()
    n = int(rate * seconds)

    async def one(i: int) -> None:
        nonlocal errors
        a = agents[i % len(agents)]
        if kind == "status":
            doc = status_doc(a["agentId"])
        else:
            seqs[a["agentId"]] += 1
            doc = metrics_doc(a["agentId"], seqs[a["agentId"]])
        t0 = time.monotonic()
        try:
            async with s.post(
                f"{base}/api/v1/agents/{a['agentId']}/{kind}",
                json=doc,
                headers={"Authorization": f"Bearer {a['credential']}"},
            ) as r:
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
    return {
        "offered_per_s": rate,
        "achieved_per_s": round(n / took, 1),
        "errors": errors,
        "p50_ms": percentile_ms(latencies, 0.5),
        "p99_ms": percentile_ms(latencies, 0.99),
    }


def lua_script(agents: list[dict], kind: str) -> str:
    """A wrk script: round-robin over the agents, a fresh seq for every metrics batch."""
    rows = ",".join(f'{{"{a["agentId"]}","{a["credential"]}"}}' for a in agents)
    if kind == "status":
        template = json.dumps(status_doc("%s")).replace("%", "%%").replace("%%s", "%s")
    else:
        template = json.dumps(metrics_doc("%s", SEQ_SENTINEL)).replace("%", "%%")
        template = template.replace("%%s", "%s").replace(str(SEQ_SENTINEL), "%d")
    lua_template = json.dumps(template)  # a JSON string is a valid Lua string literal here
    return f"""
local agents = {{{rows}}}
local template = {lua_template}
local kind = "{kind}"
local counter = 0
function setup(thread)
  counter = counter + 1
  thread:set("tid", counter)
end
local i = 0
local seq = nil
function request()
  if seq == nil then seq = {int(time.time() * 1000)} + (tid or 0) * 100000000 end
  i = i + 1
  local a = agents[(i % #agents) + 1]
  local body
  if kind == "status" then body = string.format(template, a[1])
  else seq = seq + 1; body = string.format(template, a[1], seq) end
  return wrk.format("POST", "/api/v1/agents/" .. a[1] .. "/" .. kind,
    {{["Authorization"] = "Bearer " .. a[2], ["Content-Type"] = "application/json"}}, body)
end
"""


def parse_wrk(text: str) -> dict[str, Any]:
    def ms(v: str) -> float:
        m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", v)
        assert m, v
        return round(float(m[1]) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[m[2]], 2)

    out: dict[str, Any] = {}
    if m := re.search(r"Requests/sec:\s+([\d.]+)", text):
        out["requests_per_s"] = float(m[1])
    for q in ("50", "99"):
        if m := re.search(rf"^\s+{q}(?:\.000)?%\s+(\S+)", text, re.M):
            out[f"p{q}_ms"] = ms(m[1])
    if m := re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text):
        out["non_2xx"] = int(m[1])
    return out


async def health(s: aiohttp.ClientSession, base: str) -> dict[str, Any]:
    async with s.get(f"{base}/api/v1/health") as r:
        return await r.json()


async def wrk_run(
    s: aiohttp.ClientSession, base: str, tmp: Path, script: str | None, path: str, seconds: float
) -> dict[str, Any]:
    before = (await health(s, base))["ingest"]["reports"]
    args = ["wrk", "-t2", "-c64", f"-d{max(1, int(seconds))}s", "--latency"]
    if script is not None:
        (tmp / "load.lua").write_text(script)
        args += ["-s", str(tmp / "load.lua")]
    t0 = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        *args, base + path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    text = (await proc.communicate())[0].decode()
    took = time.monotonic() - t0
    out = parse_wrk(text)
    await asyncio.sleep(0.5)
    stored = (await health(s, base))["ingest"]["reports"] - before
    if script is not None:
        out["stored"] = stored
        out["stored_per_s"] = round(stored / took, 1)
    return out


PUBLISHER = r"""
import json, sys, time
import paho.mqtt.client as mqtt
port, prefix, kind, count, path = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
messages = json.load(open(path))
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-publisher",
                protocol=mqtt.MQTTv5)
c.max_inflight_messages_set(1000)
c.max_queued_messages_set(0)
c.connect("127.0.0.1", port)
c.loop_start()
t0 = time.monotonic()
infos = []
for i in range(count):
    topic, payload = messages[i % len(messages)]
    if kind == "metrics":
        payload = payload.replace("987654321", str(1000000 + i))
    infos.append(c.publish(topic, payload.encode(), qos=1))
for info in infos:
    info.wait_for_publish()
print(json.dumps({"published": count, "seconds": time.monotonic() - t0}))
c.disconnect()
c.loop_stop()
"""


async def mqtt_run(
    s: aiohttp.ClientSession,
    base: str,
    tmp: Path,
    port: int,
    agents: list[dict],
    kind: str,
    count: int,
) -> dict[str, Any]:
    if kind == "status":
        msgs = [
            (f"{PREFIX}/agents/{a['agentId']}/status", json.dumps(status_doc(a["agentId"])))
            for a in agents
        ]
    else:
        msgs = [
            (
                f"{PREFIX}/agents/{a['agentId']}/metrics",
                json.dumps(metrics_doc(a["agentId"], SEQ_SENTINEL)),
            )
            for a in agents
        ]
    (tmp / "msgs.json").write_text(json.dumps(msgs))
    before = (await health(s, base))["mqtt"]["stored"][kind]
    t0 = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        PUBLISHER,
        str(port),
        PREFIX,
        kind,
        str(count),
        str(tmp / "msgs.json"),
        stdout=subprocess.PIPE,
    )
    pub = json.loads((await proc.communicate())[0])
    stored = before
    while stored - before < count and time.monotonic() - t0 < 300:
        await asyncio.sleep(0.1)
        stored = (await health(s, base))["mqtt"]["stored"][kind]
    took = time.monotonic() - t0
    return {
        "messages": count,
        "stored": stored - before,
        "publish_per_s": round(count / pub["seconds"], 1),
        "stored_per_s": round((stored - before) / took, 1),
    }


async def run_db(db: str, rates: list[float], seconds: float, mqtt_messages: int) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp())
    url = await new_database(db, tmp)
    out: dict[str, Any] = {}
    with Processes(tmp / "bench.log", stop_within_s=20) as procs:
        mqtt_port = await start_mosquitto(
            procs, tmp, max_queued=1_000_000, extra="max_inflight_messages 0\n"
        )
        server = await start_server(procs, tmp / "cp", "--db", url, mqtt_port=mqtt_port)
        base = server.base
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256)) as s:
            async with s.post(
                f"{base}/api/v1/enrollment-tokens", headers=server.auth, json={"maxUses": AGENTS}
            ) as r:
                et = (await r.json())["token"]
            sem = asyncio.Semaphore(16)

            async def enroll() -> dict:
                async with sem, s.post(f"{base}/api/v1/agents/enroll", json={"token": et}) as r:
                    return await r.json()

            agents = await asyncio.gather(*(enroll() for _ in range(AGENTS)))
            if shutil.which("wrk"):
                out["http_baseline_health"] = await wrk_run(
                    s, base, tmp, None, "/api/v1/health", seconds
                )
            for kind in ("status", "metrics"):
                steps = []
                for rate in rates:
                    step = await offered(s, base, agents[:200], kind, rate, seconds)
                    steps.append(step)
                    if step["p99_ms"] is not None and step["p99_ms"] > 1000:
                        break  # far past the knee
                knee = next(
                    (
                        st["offered_per_s"]
                        for st in steps
                        if st["p99_ms"] is not None and st["p99_ms"] > 100
                    ),
                    None,
                )
                res: dict[str, Any] = {"steps": steps, "knee_per_s": knee}
                if shutil.which("wrk"):
                    res["wrk_max"] = await wrk_run(
                        s, base, tmp, lua_script(agents, kind), "/", seconds
                    )
                out[f"http_{kind}"] = res
                out[f"mqtt_{kind}"] = await mqtt_run(
                    s, base, tmp, mqtt_port, agents, kind, mqtt_messages
                )
            out["ingest_counters"] = (await health(s, base))["ingest"]
    return out


async def main(
    dbs: list[str], rates: list[float], seconds: float, mqtt_messages: int
) -> dict[str, Any]:
    raise_open_files_limit()
    return {db: await run_db(db, rates, seconds, mqtt_messages) for db in dbs}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--db", default="sqlite,postgres")
    ap.add_argument("--rates", default="200,400,800,1600,3200")
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--mqtt-messages", type=int, default=20000)
    a = ap.parse_args()
    figures = {
        "benchmark": "ingest",
        "machine": machine(wrk=bool(shutil.which("wrk"))),
        **asyncio.run(
            main(
                a.db.split(","), [float(r) for r in a.rates.split(",")], a.seconds, a.mqtt_messages
            )
        ),
    }
    write_result("ingest", figures)
