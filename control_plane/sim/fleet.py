"""A fleet simulator: many agents in one process that speak the real protocol.

Each simulated agent enrolls with a real enrollment token, receives its signed desired state
by HTTP long-poll or by MQTT push (and verifies it, as an agent does), "downloads" the version
by fetching the real manifest and blobs (through a cache shared between simulated agents unless
told otherwise), and reports status and metric batches. Fractions of them can be told to be
offline, slow or failing. ``modelfleet sim`` rolls a version out to them and prints one JSON line.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp

from protocol.desired import accept_desired
from protocol.dsse import keyring, load_public_key
from protocol.exceptions import ProtocolError
from protocol.manifest import Manifest, parse_manifest
from protocol.reports import MetricsBatch, ModelStatus, SeriesWindow, StatusReport
from protocol.topics import agent_topic


class SimError(Exception):
    """The simulation cannot go on: a refusal from the control plane, a worker that died."""


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
    processes: int = 1
    stages: list[dict[str, Any]] | None = None  # None: one stage, 100%

    @property
    def servers(self) -> list[str]:
        """Every control plane URL given (comma-separated): agents spread over them."""
        return [u.strip().rstrip("/") for u in self.server.split(",") if u.strip()]


class Fleet:
    """The simulated agents of one process."""

    def __init__(self, opts: SimOptions) -> None:
        self.opts = opts
        self.cache: dict[str, asyncio.Task[None]] = {}
        self.manifests: dict[str, asyncio.Task[Manifest]] = {}
        self.fetched_bytes = 0
        self.active_at: dict[str, float] = {}
        self.progress = asyncio.Event()
        self.expected: tuple[str, str] | None = None  # (model, version) being rolled out
        # Reports: every metrics batch made is kept until a control plane acknowledged it.
        self.batches_made = 0
        self.batches_stored = 0
        self.batches_duplicate = 0
        self.batches_published = 0  # MQTT: acknowledged by the broker
        self.failovers = 0

    async def manifest(self, s: aiohttp.ClientSession, agent: SimAgent, digest: str) -> Manifest:
        """A version's signed manifest, once per fleet (shared cache) or once per agent."""

        async def get() -> Manifest:
            code, body = await agent.call(s, "GET", f"/manifests/{digest}")
            if code != 200:
                raise SimError(f"manifest {digest}: HTTP {code}")
            return parse_manifest(_payload(body))

        if not self.opts.shared_cache:
            return await get()
        task = self.manifests.get(digest)
        if task is None:
            task = self.manifests[digest] = asyncio.create_task(get())
        return await asyncio.shield(task)

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
        servers = self.opts.servers
        for attempt in range(20):
            server = servers[(hash(agent["agentId"]) + attempt) % len(servers)]
            try:
                async with s.get(f"{server}/api/v1/blobs/{digest}", headers=headers) as r:
                    r.raise_for_status()
                    async for chunk in r.content.iter_chunked(1 << 16):
                        self.fetched_bytes += len(chunk)
                return
            except (aiohttp.ClientError, TimeoutError):
                self.failovers += 1
                await asyncio.sleep(min(2.0, 0.1 * 2**attempt))
        raise RuntimeError(f"could not fetch {digest} from any control plane")


class SimAgent:
    """One simulated agent."""

    def __init__(
        self, fleet: Fleet, enrolled: dict[str, Any], behaviour: str, *, index: int = 0
    ) -> None:
        self.fleet = fleet
        self.e = enrolled
        self.id = enrolled["agentId"]
        self.behaviour = behaviour
        self.keys = keyring([load_public_key(enrolled["controlPlaneKey"].encode())])
        self.generation = 0
        self.models: list[ModelStatus] = []
        self.seq = 0
        self.headers = {"Authorization": f"Bearer {enrolled['credential']}"}
        self.server_index = index
        self.pending: list[dict[str, Any]] = []  # metrics batches not yet acknowledged
        self._sending = asyncio.Lock()  # heartbeats and desired-state reports take turns

    @property
    def server(self) -> str:
        servers = self.fleet.opts.servers
        return servers[self.server_index % len(servers)]

    def fail_over(self) -> None:
        """The control plane did not answer: the next request goes to the next one."""
        self.server_index += 1
        self.fleet.failovers += 1

    async def call(
        self, s: aiohttp.ClientSession, method: str, path: str, **kw: Any
    ) -> tuple[int, bytes]:
        """A request to this agent's control plane, failing over until one answers."""
        delay = 0.05
        while True:
            try:
                async with s.request(
                    method, f"{self.server}/api/v1{path}", headers=self.headers, **kw
                ) as r:
                    body = await r.read()
                    if r.status < 500:
                        return r.status, body
            except (aiohttp.ClientError, TimeoutError):
                pass
            self.fail_over()
            await asyncio.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(2.0, delay * 2)

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
            manifest = await self.fleet.manifest(s, self, m.manifest_digest)
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
            self.fleet.active_at.setdefault(self.id, time.time())
            self.fleet.progress.set()

    async def report(self, s: aiohttp.ClientSession, mqtt: Any) -> None:
        now = datetime.now(UTC)
        status = StatusReport(
            self.id, self.generation, now, tuple(self.models), {"simulated": True}
        ).to_json()
        self.seq += 1
        series = []
        for m in self.models:
            w = SeriesWindow(m.name, m.version, requests=10)
            for _ in range(10):
                w.latency_ms.add(random.uniform(0.5, 2.0))
            series.append(w)
        batch = MetricsBatch(
            self.id, self.seq, now - timedelta(seconds=10), now, tuple(series)
        ).to_json()
        self.fleet.batches_made += 1
        prefix = (self.e.get("mqtt") or {}).get("prefix", "")
        if mqtt is not None:
            # QoS 1: the broker acknowledges; the control plane stores once it acknowledges.
            await mqtt.publish(agent_topic(self.id, "status", prefix), json.dumps(status), qos=1)
            await mqtt.publish(agent_topic(self.id, "metrics", prefix), json.dumps(batch), qos=1)
            self.fleet.batches_published += 1
            return
        self.pending.append(batch)
        await self.call(s, "POST", f"/agents/{self.id}/status", json=status)
        await self.flush(s)

    async def flush(self, s: aiohttp.ClientSession) -> None:
        """Send every batch not yet acknowledged, oldest first; keep what is not."""
        async with self._sending:
            await self._flush(s)

    async def _flush(self, s: aiohttp.ClientSession) -> None:
        while self.pending:
            code, body = await self.call(
                s, "POST", f"/agents/{self.id}/metrics", json=self.pending[0]
            )
            if code != 200:
                raise RuntimeError(f"metrics refused ({code}): {body[:200]!r}")
            self.pending.pop(0)
            if json.loads(body).get("stored"):
                self.fleet.batches_stored += 1
            else:
                self.fleet.batches_duplicate += 1

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
            while True:
                params = {"after": str(self.generation), "wait": "30"}
                code, body = await self.call(s, "GET", f"/agents/{self.id}/desired", params=params)
                if code == 200 and body:
                    await self.on_desired(s, body, None)
        finally:
            beat.cancel()

    async def _run_mqtt(self, s: aiohttp.ClientSession) -> None:
        import aiomqtt

        from control_plane.mqtt.bridge import broker_address, tls_context

        creds = self.e.get("mqtt") or {}
        url = self.fleet.opts.mqtt or creds.get("url")
        if not url:
            raise SimError("--transport mqtt needs --mqtt or a control plane with a broker")
        host, port, tls = broker_address(url)
        async with aiomqtt.Client(
            host,
            port,
            username=creds.get("username"),
            password=creds.get("password"),
            identifier=f"sim-{self.id}",
            protocol=aiomqtt.ProtocolVersion.V5,
            tls_context=tls_context(tls, None),
        ) as c:
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


def _session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=120)
    )


async def _new_enrollment_token(s: aiohttp.ClientSession, opts: SimOptions) -> str:
    admin = {"Authorization": f"Bearer {opts.token}"}
    async with s.post(
        f"{opts.servers[0]}/api/v1/enrollment-tokens",
        headers=admin,
        json={"labels": opts.labels, "maxUses": opts.agents},
    ) as r:
        if r.status != 201:
            raise SimError(f"enrollment token refused ({r.status}): {await r.text()}")
        return (await r.json())["token"]


async def _start_agents(
    s: aiohttp.ClientSession, fleet: Fleet, token: str, count: int, first: int
) -> tuple[list[SimAgent], list[asyncio.Task[None]]]:
    """Enroll ``count`` agents (named from ``first``), 32 at a time, and start them."""
    opts = fleet.opts
    rng = random.Random(7 + first)
    sem = asyncio.Semaphore(32)

    async def enroll(i: int) -> SimAgent:
        async with sem:
            for attempt in range(10):
                server = opts.servers[(i + attempt) % len(opts.servers)]
                try:
                    async with s.post(
                        f"{server}/api/v1/agents/enroll", json={"token": token, "name": f"sim-{i}"}
                    ) as r:
                        if r.status == 201:
                            return SimAgent(fleet, await r.json(), behaviours[i - first], index=i)
                        if r.status < 500:
                            raise SimError(f"enrollment refused ({r.status}): {await r.text()}")
                except (aiohttp.ClientError, TimeoutError):
                    await asyncio.sleep(0.2 * (attempt + 1))
            raise SimError("no control plane answered the enrollment")

    behaviours = [_behaviour(rng.random(), opts) for _ in range(count)]
    sims = list(await asyncio.gather(*(enroll(first + i) for i in range(count))))
    return sims, [asyncio.create_task(a.run(s)) for a in sims]


async def _wait_active(fleet: Fleet, want: int, deadline: float) -> None:
    """Until ``want`` agents report the expected version active, or the wall-clock deadline."""
    while len(fleet.active_at) < want and time.time() < deadline:
        fleet.progress.clear()
        try:
            async with asyncio.timeout(max(0.0, deadline - time.time())):
                await fleet.progress.wait()
        except TimeoutError:
            break


async def _stop(
    s: aiohttp.ClientSession, sims: list[SimAgent], tasks: list[asyncio.Task[None]]
) -> None:
    """Stop the agents, then send what each still holds (no report is dropped at exit)."""
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    try:
        async with asyncio.timeout(60):
            await asyncio.gather(*(a.flush(s) for a in sims if a.pending))
    except TimeoutError:
        pass


def _figures(fleet: Fleet, sims: list[SimAgent]) -> dict[str, Any]:
    return {
        "bytes_fetched": fleet.fetched_bytes,
        "metric_batches": fleet.batches_made,
        "metric_batches_stored": fleet.batches_stored,
        "metric_batches_duplicate": fleet.batches_duplicate,
        "metric_batches_published": fleet.batches_published,
        "metric_batches_pending": sum(len(a.pending) for a in sims),
        "failovers": fleet.failovers,
    }


async def _create_rollout(s: aiohttp.ClientSession, opts: SimOptions, rollout: str) -> None:
    model, _, version = rollout.partition(":")
    selector = ",".join(f"{k}={v}" for k, v in opts.labels.items())
    admin = {"Authorization": f"Bearer {opts.token}"}
    body: dict[str, Any] = {"model": model, "version": version, "selector": selector}
    if opts.stages:
        body["stages"] = opts.stages
    async with s.post(f"{opts.servers[0]}/api/v1/rollouts", headers=admin, json=body) as r:
        if r.status != 201:
            raise SimError(f"rollout refused: {await r.text()}")


def _summary(opts: SimOptions, times: list[float], want: int) -> dict[str, Any]:
    return {
        "agents": opts.agents,
        "transport": opts.transport,
        "processes": opts.processes,
        "converged": len(times) == want,
        "active": len(times),
        "expected": want,
        "converge_s": round(max(times), 3) if times else None,
        "p50_s": _pct(times, 0.5),
        "p99_s": _pct(times, 0.99),
    }


async def simulate(opts: SimOptions, rollout: str | None) -> dict[str, Any]:
    """Enroll, run the fleet, roll ``MODEL:VERSION`` out, and time the convergence.

    Every agent must report the version active: offline or failing ones cannot, so a run told
    to have them does not converge (and waits out its timeout).
    """
    if opts.processes > 1:
        return await asyncio.to_thread(_simulate_in_processes, opts, rollout)
    fleet = Fleet(opts)
    if rollout:  # agents already on it when the rollout starts count as converged at once
        fleet.expected = tuple(rollout.split(":", 1))  # type: ignore[assignment]
    async with _session() as s:
        token = await _new_enrollment_token(s, opts)
        sims, tasks = await _start_agents(s, fleet, token, opts.agents, 0)
        await asyncio.sleep(1.0)  # let connections settle
        out: dict[str, Any] = {"agents": opts.agents, "transport": opts.transport}
        try:
            if rollout:
                t0 = time.time()
                await _create_rollout(s, opts, rollout)
                await _wait_active(fleet, len(sims), t0 + opts.timeout_s)
                times = [max(0.0, t - t0) for t in fleet.active_at.values()]
                out = _summary(opts, times, len(sims))
        finally:
            await _stop(s, sims, tasks)
        out.update(_figures(fleet, sims))
    return out


# ------------------------------------------------------------------ several processes
# The parent makes the enrollment token and the rollout; each worker process enrolls and runs
# its share of the agents on its own event loop and sends back, over a pipe, when each of them
# reported the version active (wall clock, comparable across processes on one machine).


def _worker(
    opts: SimOptions, token: str, count: int, first: int, rollout: str | None, conn: Any
) -> None:
    async def main() -> None:
        fleet = Fleet(opts)
        if rollout:  # known before any desired state can arrive
            fleet.expected = tuple(rollout.split(":", 1))  # type: ignore[assignment]
        loop = asyncio.get_running_loop()
        async with _session() as s:
            sims, tasks = await _start_agents(s, fleet, token, count, first)
            conn.send(("ready", count))
            go = await loop.run_in_executor(None, conn.recv)
            try:
                if go[0] == "go":
                    await _wait_active(fleet, count, go[1])
                    conn.send(("done", list(fleet.active_at.values())))
                    await loop.run_in_executor(None, conn.recv)  # "stop"
            finally:
                await _stop(s, sims, tasks)
            conn.send(("figures", _figures(fleet, sims)))

    asyncio.run(main())


def _simulate_in_processes(opts: SimOptions, rollout: str | None) -> dict[str, Any]:
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")

    async def token() -> str:
        async with _session() as s:
            return await _new_enrollment_token(s, opts)

    tok = asyncio.run(token())
    shares = [
        opts.agents // opts.processes + (i < opts.agents % opts.processes)
        for i in range(opts.processes)
    ]
    pipes, procs, first = [], [], 0
    for share in shares:
        parent, child = ctx.Pipe()
        p = ctx.Process(target=_worker, args=(opts, tok, share, first, rollout, child), daemon=True)
        p.start()
        pipes.append(parent)
        procs.append(p)
        first += share
    try:
        for c in pipes:
            if not c.poll(opts.timeout_s) or c.recv()[0] != "ready":
                raise SimError("a simulator process did not start")
        time.sleep(1.0)  # let connections settle
        out: dict[str, Any] = {
            "agents": opts.agents,
            "transport": opts.transport,
            "processes": opts.processes,
        }
        if rollout:
            t0 = time.time()

            async def create() -> None:
                async with _session() as s:
                    await _create_rollout(s, opts, rollout)

            asyncio.run(create())
            for c in pipes:
                c.send(("go", t0 + opts.timeout_s))
            times: list[float] = []
            for c in pipes:
                if c.poll(opts.timeout_s + 30):
                    times += [max(0.0, t - t0) for t in c.recv()[1]]
            out = _summary(opts, times, opts.agents)
        for c in pipes:
            c.send(("stop",))
        totals: dict[str, Any] = {}
        for c in pipes:
            while c.poll(90):
                kind, figures = c.recv()
                if kind == "figures":
                    for k, v in figures.items():
                        totals[k] = totals.get(k, 0) + v
                    break
        out.update(totals)
        return out
    except (EOFError, BrokenPipeError) as exc:
        raise SimError(f"a simulator process died: {exc!r}") from None
    finally:
        for c in pipes:
            c.close()  # a worker still waiting for orders sees EOF and ends
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
