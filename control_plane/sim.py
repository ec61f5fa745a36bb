"""A fleet simulator: many agents in one process that speak the real protocol.

Each simulated agent enrolls with a real enrollment token, receives its signed desired state
by HTTP long-poll or by MQTT push (and verifies it, as an agent does), "downloads" the version
by fetching the real manifest and blobs (through a cache shared between simulated agents unless
told otherwise), and reports status and metric batches. Fractions of them can be told to be
offline, slow or failing. ``modelfleet sim`` rolls a version out to them and prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp

from protocol.desired import accept_desired
from protocol.dsse import keyring, load_public_key
from protocol.exceptions import ProtocolError
from protocol.labels import parse_labels
from protocol.manifest import parse_manifest
from protocol.reports import MetricsBatch, ModelStatus, SeriesWindow, StatusReport
from protocol.topics import agent_topic


@dataclass
class SimOptions:
    """What the simulated fleet does."""

    server: str
    token: str
    agents: int
    transport: str = "http"
    mqtt: str | None = None
    labels: dict[str, str] = field(default_factory=lambda: {"site": "sim"})
    shared_cache: bool = True
    offline: float = 0.0
    slow: float = 0.0
    failing: float = 0.0
    slow_s: float = 2.0
    status_interval_s: float = 15.0
    timeout_s: float = 300.0


class Fleet:
    """The simulated agents of one process."""

    def __init__(self, opts: SimOptions) -> None:
        self.opts = opts
        self.cache: dict[str, asyncio.Task[None]] = {}
        self.fetched_bytes = 0
        self.active_at: dict[str, float] = {}
        self.progress = asyncio.Event()
        self.expected: tuple[str, str] | None = None  # (model, version) being rolled out

    async def fetch(self, s: aiohttp.ClientSession, agent: dict[str, Any], digest: str) -> None:
        """A blob, once per fleet (shared cache) or once per agent."""
        if self.opts.shared_cache:
            task = self.cache.get(digest)
            if task is None:
                task = self.cache[digest] = asyncio.create_task(self._get(s, agent, digest))
            await asyncio.shield(task)
        else:
            await self._get(s, agent, digest)

    async def _get(self, s: aiohttp.ClientSession, agent: dict[str, Any], digest: str) -> None:
        headers = {"Authorization": f"Bearer {agent['credential']}"}
        async with s.get(f"{self.opts.server}/api/v1/blobs/{digest}", headers=headers) as r:
            r.raise_for_status()
            async for chunk in r.content.iter_chunked(1 << 16):
                self.fetched_bytes += len(chunk)


class SimAgent:
    """One simulated agent."""

    def __init__(self, fleet: Fleet, enrolled: dict[str, Any], behaviour: str) -> None:
        self.fleet = fleet
        self.e = enrolled
        self.id = enrolled["agentId"]
        self.behaviour = behaviour
        self.keys = keyring([load_public_key(enrolled["controlPlaneKey"].encode())])
        self.generation = 0
        self.models: list[ModelStatus] = []
        self.seq = 0
        self.headers = {"Authorization": f"Bearer {enrolled['credential']}"}

    async def on_desired(self, s: aiohttp.ClientSession, envelope: bytes, mqtt: Any) -> None:
        try:
            ds = accept_desired(envelope, self.keys, self.id, self.generation, datetime.now(UTC))
        except ProtocolError:
            return
        if ds is None:
            return
        self.generation = ds.generation
        models = []
        for m in ds.models:
            async with s.get(f"{self.fleet.opts.server}/api/v1/manifests/{m.manifest_digest}",
                             headers=self.headers) as r:  # fmt: skip
                manifest = parse_manifest(_payload(await r.read()))
            await asyncio.gather(*(self.fleet.fetch(s, self.e, f.digest) for f in manifest.files))
            state = "failed" if self.behaviour == "failing" else "active"
            reason = "simulated failure" if state == "failed" else None
            models.append(ModelStatus(m.name, m.version, m.manifest_digest, state, reason))
        if self.behaviour == "slow":
            await asyncio.sleep(self.fleet.opts.slow_s)
        self.models = models
        await self.report(s, mqtt)
        if self.fleet.expected and any(
            (m.name, m.version, m.state) == (*self.fleet.expected, "active") for m in models
        ):
            self.fleet.active_at.setdefault(self.id, time.monotonic())
            self.fleet.progress.set()

    async def report(self, s: aiohttp.ClientSession, mqtt: Any) -> None:
        now = datetime.now(UTC)
        status = StatusReport(self.id, self.generation, now, tuple(self.models),
                              {"simulated": True}).to_json()  # fmt: skip
        self.seq += 1
        series = []
        for m in self.models:
            w = SeriesWindow(m.name, m.version, requests=10)
            for _ in range(10):
                w.latency_ms.add(random.uniform(0.5, 2.0))
            series.append(w)
        batch = MetricsBatch(self.id, self.seq, now - timedelta(seconds=10), now,
                             tuple(series)).to_json()  # fmt: skip
        prefix = (self.e.get("mqtt") or {}).get("prefix", "")
        if mqtt is not None:
            await mqtt.publish(agent_topic(self.id, "status", prefix), json.dumps(status), qos=1)
            await mqtt.publish(agent_topic(self.id, "metrics", prefix), json.dumps(batch), qos=1)
            return
        base = f"{self.fleet.opts.server}/api/v1/agents/{self.id}"
        async with s.post(f"{base}/status", json=status, headers=self.headers) as r:
            await r.read()
        async with s.post(f"{base}/metrics", json=batch, headers=self.headers) as r:
            await r.read()

    async def run(self, s: aiohttp.ClientSession) -> None:
        if self.behaviour == "offline":
            return
        if self.fleet.opts.transport == "mqtt":
            await self._run_mqtt(s)
        else:
            await self._run_http(s)

    async def _heartbeats(self, s: aiohttp.ClientSession, mqtt: Any) -> None:
        while True:
            await asyncio.sleep(self.fleet.opts.status_interval_s * random.uniform(0.8, 1.2))
            await self.report(s, mqtt)

    async def _run_http(self, s: aiohttp.ClientSession) -> None:
        beat = asyncio.create_task(self._heartbeats(s, None))
        try:
            url = f"{self.fleet.opts.server}/api/v1/agents/{self.id}/desired"
            while True:
                params = {"after": str(self.generation), "wait": "30"}
                async with s.get(url, params=params, headers=self.headers) as r:
                    body = await r.read() if r.status == 200 else None
                if body:
                    await self.on_desired(s, body, None)
        finally:
            beat.cancel()

    async def _run_mqtt(self, s: aiohttp.ClientSession) -> None:
        import aiomqtt

        from control_plane.mqtt import broker_address, tls_context

        creds = self.e.get("mqtt") or {}
        url = self.fleet.opts.mqtt or creds.get("url")
        if not url:
            raise SystemExit("--transport mqtt needs --mqtt or a control plane with a broker")
        host, port, tls = broker_address(url)
        async with aiomqtt.Client(
            host, port, username=creds.get("username"), password=creds.get("password"),
            identifier=f"sim-{self.id}", protocol=aiomqtt.ProtocolVersion.V5,
            tls_context=tls_context(tls, None),
        ) as c:  # fmt: skip
            await c.subscribe(agent_topic(self.id, "desired", creds.get("prefix", "")), qos=1)
            beat = asyncio.create_task(self._heartbeats(s, c))
            try:
                async for m in c.messages:
                    await self.on_desired(s, bytes(m.payload), c)  # type: ignore[arg-type]
            finally:
                beat.cancel()


def _payload(envelope: bytes) -> bytes:
    import base64

    return base64.b64decode(json.loads(envelope)["payload"])


def _behaviour(x: float, opts: SimOptions) -> str:
    """Which way a simulated agent misbehaves, from a uniform draw."""
    for name, share in (("offline", opts.offline), ("failing", opts.failing), ("slow", opts.slow)):
        if x < share:
            return name
        x -= share
    return "ok"


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return round(s[min(len(s) - 1, int(q * len(s)))], 3)


async def simulate(opts: SimOptions, rollout: str | None) -> dict[str, Any]:
    """Enroll, run the fleet, roll ``MODEL:VERSION`` out, and time the convergence."""
    fleet = Fleet(opts)
    admin = {"Authorization": f"Bearer {opts.token}"}
    rng = random.Random(7)
    conn = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as s:
        async with s.post(f"{opts.server}/api/v1/enrollment-tokens", headers=admin,
                          json={"labels": opts.labels, "maxUses": opts.agents}) as r:  # fmt: skip
            r.raise_for_status()
            enroll_token = (await r.json())["token"]
        sims = []
        for i in range(opts.agents):
            async with s.post(f"{opts.server}/api/v1/agents/enroll",
                              json={"token": enroll_token, "name": f"sim-{i}"}) as r:  # fmt: skip
                r.raise_for_status()
                behaviour = _behaviour(rng.random(), opts)
                sims.append(SimAgent(fleet, await r.json(), behaviour))
        tasks = [asyncio.create_task(a.run(s)) for a in sims]
        await asyncio.sleep(1.0)  # let connections settle
        out: dict[str, Any] = {"agents": opts.agents, "transport": opts.transport}
        try:
            if rollout:
                model, _, version = rollout.partition(":")
                fleet.expected = (model, version)
                selector = ",".join(f"{k}={v}" for k, v in opts.labels.items())
                t0 = time.monotonic()
                async with s.post(f"{opts.server}/api/v1/rollouts", headers=admin,
                                  json={"model": model, "version": version,
                                        "selector": selector}) as r:  # fmt: skip
                    if r.status != 201:
                        raise SystemExit(f"rollout refused: {await r.text()}")
                # Every agent must report the version active: offline or failing ones cannot, so
                # a run told to have them does not converge (and waits out its --timeout).
                want = len(sims)
                deadline = t0 + opts.timeout_s
                while len(fleet.active_at) < want and time.monotonic() < deadline:
                    fleet.progress.clear()
                    try:
                        async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                            await fleet.progress.wait()
                    except TimeoutError:
                        break
                times = [t - t0 for t in fleet.active_at.values()]
                out.update({
                    "converged": len(times) == want, "active": len(times), "expected": want,
                    "converge_s": round(max(times), 3) if times else None,
                    "p50_s": _pct(times, 0.5), "p99_s": _pct(times, 0.99),
                    "bytes_fetched": fleet.fetched_bytes,
                })  # fmt: skip
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    return out


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``modelfleet sim``."""
    p = sub.add_parser("sim", help="simulate a fleet of agents against a control plane")
    p.add_argument("--server", required=True)
    p.add_argument("--token", required=True, help="an operator API token")
    p.add_argument("--agents", type=int, required=True)
    p.add_argument("--transport", choices=("http", "mqtt"), default="http")
    p.add_argument("--mqtt", help="broker URL (default: the one enrollment hands out)")
    p.add_argument("--labels", default="site=sim")
    p.add_argument("--rollout", metavar="MODEL:VERSION")
    p.add_argument("--no-shared-cache", action="store_true")
    p.add_argument("--offline", type=float, default=0.0, help="fraction never connecting")
    p.add_argument("--slow", type=float, default=0.0, help="fraction reporting late")
    p.add_argument("--failing", type=float, default=0.0, help="fraction reporting failure")
    p.add_argument("--status-interval", type=float, default=15.0)
    p.add_argument("--timeout", type=float, default=300.0)
    p.set_defaults(func=cmd_sim)


def cmd_sim(args: argparse.Namespace) -> int:
    """Run the simulation and print one JSON line; exit 0 only if every agent converged."""
    from control_plane.cli.common import CliError

    if args.agents < 1:
        raise CliError("--agents must be at least 1")
    for name in ("offline", "slow", "failing"):
        if not 0 <= getattr(args, name) <= 1:
            raise CliError(f"--{name} must be a fraction between 0 and 1")
    if args.rollout and ":" not in args.rollout:
        raise CliError("--rollout takes MODEL:VERSION")
    opts = SimOptions(
        server=args.server.rstrip("/"), token=args.token, agents=args.agents,
        transport=args.transport, mqtt=args.mqtt, labels=parse_labels(args.labels),
        shared_cache=not args.no_shared_cache, offline=args.offline, slow=args.slow,
        failing=args.failing, status_interval_s=args.status_interval, timeout_s=args.timeout,
    )  # fmt: skip
    out = asyncio.run(simulate(opts, args.rollout))
    print(json.dumps(out))
    sys.stdout.flush()
    return 0 if out.get("converged", True) else 1
