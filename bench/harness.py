"""What every benchmark needs: ports, waiting, processes, a broker, percentiles, result files.

Run a benchmark as a module from the top of the checkout (``python -m bench.ingest``), so that
``bench`` (with ``bench.devkit``) and the project's packages import without touching ``sys.path``.

Rules the benches keep:
- ``bench/`` imports nothing from ``tests/``. What both need has one home, ``bench/devkit/``
  (not shipped; the tests import it, the benches never import the tests): tiny models in
  ``bench.devkit.models``, loopback proxies in ``bench.devkit.proxies``. Bundles are built with ``control_plane.catalog.build.build_bundle``.
- Simulated agents are ``control_plane.sim.fleet``'s, the ones ``modelfleet sim`` runs.
- Every latency figure is in milliseconds (``percentile_ms``, ``summary_ms``): samples are
  taken in seconds and converted once, here.
- Every process a bench starts is stopped the same way (``Processes``): SIGTERM in reverse
  order of start, then a bounded wait, then SIGKILL.
"""

from __future__ import annotations

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
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
MODELFLEET = str(Path(sys.executable).parent / "modelfleet")
PREFIX = "bench/v1"  # MQTT topic prefix of every bench's control plane
PG_URL = os.environ.get("MODELFLEET_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


# ---------------------------------------------------------------------------------- numbers


def percentile_ms(samples_s: list[float], q: float, digits: int = 2) -> float | None:
    """The q-quantile (nearest rank, 0 <= q <= 1) of samples in seconds, in milliseconds."""
    if not samples_s:
        return None
    s = sorted(samples_s)
    return round(s[min(len(s) - 1, int(q * len(s)))] * 1000, digits)


def summary_ms(samples_s: list[float], digits: int = 2) -> dict[str, Any]:
    """Count, p50, p99 and max of samples in seconds, in milliseconds."""
    if not samples_s:
        return {"count": 0}
    return {
        "count": len(samples_s),
        "p50_ms": percentile_ms(samples_s, 0.5, digits),
        "p99_ms": percentile_ms(samples_s, 0.99, digits),
        "max_ms": percentile_ms(samples_s, 1.0, digits),
    }


async def closed_loop(
    send: Callable[[], Awaitable[object]], clients: int, seconds: float
) -> tuple[list[float], float]:
    """``clients`` clients each sending the next request when its answer is in, for
    ``seconds``: every request's time (s) and the wall time (s) the clients took."""
    end = time.monotonic() + seconds
    times: list[float] = []

    async def client() -> None:
        while time.monotonic() < end:
            t0 = time.perf_counter()
            await send()
            times.append(time.perf_counter() - t0)

    start = time.monotonic()
    await asyncio.gather(*(client() for _ in range(clients)))
    return times, time.monotonic() - start


def machine(**extra: Any) -> dict[str, Any]:
    """The facts of this machine that every result file carries."""
    return {"cpus": os.cpu_count(), "python": platform.python_version(), **extra}


def write_result(name: str, figures: dict[str, Any]) -> Path:
    """Print the figures as one JSON line and write them to bench/results/NAME.json."""
    print(json.dumps(figures))
    out = RESULTS / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"written to {out.relative_to(ROOT)}", file=sys.stderr)
    return out


def raise_open_files_limit() -> None:
    """Let this process (and the processes it starts) hold thousands of connections."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))


def proc_stats(pid: int) -> tuple[float, int]:
    """(CPU seconds used, resident bytes) of a process."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    return cpu, rss


# ------------------------------------------------------------------------------ the network


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def wait_http(url: str, status: int = 200, within_s: float = 60.0) -> None:
    """Wait until GET url answers ``status``; raises SystemExit when it does not in time."""
    await wait_json(url, lambda r, _: r == status, within_s, f"answer {status}")


async def wait_json(
    url: str,
    ready: Callable[[int, Any], bool],
    within_s: float = 60.0,
    what: str = "come up",
) -> Any:
    """Poll GET url until ``ready(status, json_or_None)``; its JSON body.

    Raises SystemExit when it is not ready within ``within_s``.
    """
    deadline = time.monotonic() + within_s
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < deadline:
            try:
                async with s.get(url) as r:
                    try:
                        doc = await r.json(content_type=None)
                    except ValueError:
                        doc = None
                    if ready(r.status, doc):
                        return doc
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise SystemExit(f"{url} did not {what} within {within_s}s")


async def new_database(db: str, tmp: Path) -> str:
    """A fresh database URL: a file under ``tmp`` for "sqlite", a new database on PG_URL else."""
    if db != "postgres":
        return f"sqlite:///{tmp / 'cp.db'}"
    import asyncpg
    from sqlalchemy.engine import make_url

    u = make_url(PG_URL)
    name = f"mf_bench_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(
        host=u.host, port=u.port or 5432, user=u.username, password=u.password, database=u.database
    )
    await conn.execute(f'CREATE DATABASE "{name}"')
    await conn.close()
    return u.set(database=name).render_as_string(hide_password=False)


# ------------------------------------------------------------------------------- processes


class Processes:
    """The processes a bench starts, all logging to one file; stopped in reverse on exit."""

    def __init__(self, log_path: Path, *, stop_within_s: float = 15.0) -> None:
        self.log_path = log_path
        self.stop_within_s = stop_within_s
        self.procs: list[subprocess.Popen[bytes]] = []
        self._log: IO[bytes] | None = None

    def start(self, *args: str, cwd: Path | None = None) -> subprocess.Popen[bytes]:
        """Start one process, its output going to the log."""
        if self._log is None:
            self._log = self.log_path.open("wb")
        p = subprocess.Popen(list(args), stdout=self._log, stderr=self._log, cwd=cwd)
        self.procs.append(p)
        return p

    def stop(self) -> None:
        """SIGTERM every process, last started first; SIGKILL those still up after the wait."""
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(self.procs):
            try:
                p.wait(self.stop_within_s)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs.clear()
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


@dataclass(frozen=True)
class Server:
    """A `modelfleet server` process on loopback."""

    base: str  # http://127.0.0.1:PORT
    data_dir: Path
    process: subprocess.Popen[bytes]

    @property
    def admin_token(self) -> str:
        """The admin token the server wrote on first start."""
        return (self.data_dir / "admin-token").read_text().strip()

    @property
    def auth(self) -> dict[str, str]:
        """The admin's Authorization header."""
        return {"Authorization": f"Bearer {self.admin_token}"}


async def start_server(
    procs: Processes,
    data_dir: Path,
    *args: str,
    mqtt_port: int | None = None,
    cwd: Path | None = None,
) -> Server:
    """Start `modelfleet server` (extra ``args`` as given) and wait until it answers.

    With ``mqtt_port`` it is bridged to that broker under PREFIX, and the wait lasts until its
    health says the bridge is connected. Raises SystemExit when it does not come up.
    """
    port = free_port()
    cmd = [MODELFLEET, "server", "--data-dir", str(data_dir), "--port", str(port), *args]
    if mqtt_port is not None:
        cmd += ["--mqtt", f"mqtt://127.0.0.1:{mqtt_port}", "--mqtt-prefix", PREFIX]
    p = procs.start(*cmd, cwd=cwd)
    base = f"http://127.0.0.1:{port}"
    if mqtt_port is None:
        await wait_http(f"{base}/api/v1/health")
    else:
        await wait_json(
            f"{base}/api/v1/health",
            lambda _, doc: bool(doc and doc.get("mqtt", {}).get("connected")),
            what="connect to its broker",
        )
    return Server(base, data_dir if cwd is None else cwd / data_dir, p)


async def start_mosquitto(
    procs: Processes, conf_dir: Path, *, max_queued: int = 100_000, extra: str = ""
) -> int:
    """Start an anonymous mosquitto on a free loopback port; its port."""
    port = free_port()
    conf = conf_dir / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\n"
        f"max_queued_messages {max_queued}\n" + extra + ("user root\n" if os.geteuid() == 0 else "")
    )
    procs.start(shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(conf))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return port
        except OSError:
            await asyncio.sleep(0.05)
    raise SystemExit(f"mosquitto did not listen on {port}")


@dataclass(frozen=True)
class AgentProcess:
    """A `modelfleet agent run` process serving on loopback."""

    url: str  # http://127.0.0.1:PORT, its inference server
    process: subprocess.Popen[bytes]


async def push_bundles(server: Server, *bundles: bytes) -> None:
    """Upload signed bundles to the server's registry (each must be accepted)."""
    async with aiohttp.ClientSession(headers=server.auth) as s:
        for b in bundles:
            async with s.post(f"{server.base}/api/v1/bundles", data=b) as r:
                assert r.status == 201, await r.text()


async def create_rollout(server: Server, model: str, version: str = "1.0.0") -> None:
    """Roll ``model`` at ``version`` out to every agent (one stage)."""
    async with (
        aiohttp.ClientSession(headers=server.auth) as s,
        s.post(f"{server.base}/api/v1/rollouts", json={"model": model, "version": version}) as r,
    ):
        assert r.status == 201, await r.text()


async def start_agent(
    procs: Processes, server: Server, state_dir: Path, *flags: str, labels: str | None = None
) -> AgentProcess:
    """Enroll an agent with the `modelfleet agent enroll` command, then start it serving.

    ``flags`` go to `modelfleet agent run`. Raises CalledProcessError when enrollment fails.
    """
    async with (
        aiohttp.ClientSession(headers=server.auth) as s,
        s.post(f"{server.base}/api/v1/enrollment-tokens", json={}) as r,
    ):
        token = (await r.json())["token"]
    enroll = [MODELFLEET, "agent", "enroll", "--server", server.base, "--token", token]
    enroll += ["--state-dir", str(state_dir)]
    if labels is not None:
        enroll += ["--labels", labels]
    await asyncio.to_thread(subprocess.run, enroll, check=True, capture_output=True)
    port = free_port()
    p = procs.start(
        MODELFLEET,
        "agent",
        "run",
        "--state-dir",
        str(state_dir),
        "--serve",
        f"127.0.0.1:{port}",
        *flags,
    )
    return AgentProcess(f"http://127.0.0.1:{port}", p)
