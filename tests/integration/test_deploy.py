"""Installing and running it for real: units, config files, systemd notification, reload,
drain, backups, air-gapped bundles, the compose file."""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
import yaml

from agent.host.units import GPU_DROP_IN, render_agent_unit
from agent.settings import load_file
from bench.devkit.models import iris_model
from control_plane.errors import SettingsError
from control_plane.mqtt.broker_auth import acl_file
from control_plane.settings import SETTINGS as SERVER_SETTINGS
from control_plane.settings import load_settings, server_config
from tests.support.agents import enroll_agent, eventually, wait_active
from tests.support.bundles import Publisher, iris_bundle, make_publisher
from tests.support.control_plane import ControlPlane
from tests.support.fleet import free_port, run_cli

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
BIN = Path(sys.executable).parent
MODELFLEET = str(BIN / "modelfleet")
HARDENING = (
    "NoNewPrivileges=yes",
    "ProtectSystem=strict",
    "ProtectHome=yes",
    "PrivateTmp=yes",
    "CapabilityBoundingSet=",
    "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
    "SystemCallFilter=@system-service",
)


def _systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("systemd-analyze is missing (.ci/run installs the systemd package)")
        pytest.skip("systemd-analyze is not installed")
    return path


@pytest.mark.parametrize("unit", ["modelfleet-agent.service", "modelfleet-control-plane.service"])
def test_units_verify_and_are_hardened(unit: str, tmp_path: Path) -> None:
    text = (DEPLOY / "systemd" / unit).read_text()
    for key in HARDENING:
        assert key in text.splitlines(), key
    # verify checks that ExecStart exists: point it at this checkout's virtualenv.
    local = tmp_path / unit
    local.write_text(text.replace("/opt/modelfleet/venv", str(BIN.parent)))
    p = subprocess.run(
        [_systemd_analyze(), "verify", str(local)], capture_output=True, text=True, timeout=60
    )
    assert p.returncode == 0 and p.stderr.strip() == "", p.stderr
    p = subprocess.run(
        [_systemd_analyze(), "security", "--offline=true", str(local)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    score = re.search(r"Overall exposure level for \S+: ([\d.]+)", p.stdout)
    assert score is not None and float(score.group(1)) <= 2.0, p.stdout[-500:]


def test_agent_unit_file_is_the_installed_one() -> None:
    assert (DEPLOY / "systemd/modelfleet-agent.service").read_text() == render_agent_unit()
    assert (DEPLOY / "systemd/modelfleet-agent.service.d/gpu.conf").read_text() == GPU_DROP_IN
    assert "Type=notify" in render_agent_unit() and "WatchdogSec=" in render_agent_unit()


def test_the_committed_mosquitto_acl_is_the_generated_one() -> None:
    """deploy/mosquitto/acl is `modelfleet mqtt acl`'s output: a topic the agents gain (the
    metrics acknowledgement once went missing from it) must reach the committed file too."""
    assert (DEPLOY / "mosquitto/acl").read_text() == acl_file()


def test_compose_file_names_only_what_exists() -> None:
    compose = DEPLOY / "compose/compose.yaml"
    doc = yaml.safe_load(compose.read_text())
    assert set(doc["services"]) == {"control-plane", "postgres", "mosquitto"}
    cp = doc["services"]["control-plane"]
    known = {var for var, _, _ in SERVER_SETTINGS.values()}
    assert set(cp["environment"]) <= known, set(cp["environment"]) - known
    # The product images come from deploy/images/build-images.sh, not from a build here.
    assert "build" not in cp and cp["image"].endswith("modelfleet-control-plane:latest}")
    assert (DEPLOY / "images/control-plane.Dockerfile").is_file()
    agents = yaml.safe_load((compose.parent / "compose.agents.yaml").read_text())
    assert {s["image"] for s in agents["services"].values()} == {
        "${MODELFLEET_AGENT_IMAGE:-modelfleet-agent:latest}"
    }
    for service in [*doc["services"].values(), *agents["services"].values()]:
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (compose.parent / source).exists(), volume
            else:
                assert source in doc["volumes"] or source in agents["volumes"], volume
        for dep in service.get("depends_on", {}):
            assert dep in doc["services"]
    # The settings the variables carry parse as the server would read them.
    args = argparse.Namespace(config=None, data_dir=None, db=None)
    env = {k: str(v) for k, v in cp["environment"].items()}
    s = load_settings(args, env)
    assert s["port"] == 8400 and s["db"].startswith("postgresql+asyncpg://")


def test_server_settings_precedence_and_errors(tmp_path: Path) -> None:
    cfg = tmp_path / "cp.toml"
    cfg.write_text('port = 9000\nhost = "0.0.0.0"\ntrust_publishers = ["/a.pub"]\n')
    args = argparse.Namespace(
        config=cfg,
        data_dir=None,
        db=None,
        host=None,
        port=None,
        trust_publisher=[],
        max_bundle_mb=None,
        controller_interval=None,
    )
    assert load_settings(args, {})["port"] == 9000
    assert load_settings(args, {"MODELFLEET_PORT": "9100"})["port"] == 9100
    args.port = 9200
    s = load_settings(args, {"MODELFLEET_PORT": "9100"})
    assert (
        s["port"] == 9200 and s["host"] == "0.0.0.0" and s["trust_publishers"] == [Path("/a.pub")]
    )
    for text, fragment in [
        ("port = 'x'\n", "port"),
        ("colour = 1\n", "colour"),
        ("port = \n", "TOML"),
    ]:
        cfg.write_text(text)
        with pytest.raises(SettingsError, match=fragment):
            load_settings(args, {})

    for text, fragment in [
        ("credential_cost = 9\n", "credential_cost: 9 is not between"),
        ("keyset = '/no/such.json'\n", "no such file"),
    ]:
        cfg.write_text(text)
        with pytest.raises(SettingsError, match=fragment):
            server_config(args)
    cfg.write_text("credential_cost = 12\n")
    assert server_config(args).credential_cost == 12


def test_agent_toml_errors_name_the_setting(tmp_path: Path) -> None:
    from agent.exceptions import AgentConfigError

    cfg = tmp_path / "agent.toml"
    for text, fragment in [
        ("heartbeat = -1\n", "heartbeat"),
        ("colour = 1\n", "colour"),
        ("[enroll]\nsecret = 1\n", "secret"),
        ("serve = [\n", "TOML"),
        ("max_download_rate = 'fast'\n", "max_download_rate"),
    ]:
        cfg.write_text(text)
        with pytest.raises(AgentConfigError, match=fragment):
            load_file(cfg)
    cfg.write_text('state_dir = "/x"\nmax-download-rate = "20M"\n[enroll]\nserver = "http://cp"\n')
    doc = load_file(cfg)
    assert doc["max_download_rate"] == 20e6 and doc["enroll"]["server"] == "http://cp"


class NotifySocket:
    """A datagram socket standing in for systemd's NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.messages: list[tuple[float, str]] = []

    async def collect(self, seconds: float) -> None:
        """Read for a while, stamping each message when it arrives."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.drain()
            await asyncio.sleep(0.05)

    def drain(self) -> list[str]:
        while True:
            try:
                self.messages.append((time.monotonic(), self.sock.recv(4096).decode()))
            except BlockingIOError:
                return [m for _, m in self.messages]


def start_agent(
    state_dir: Path, port: int, env: dict[str, str] | None = None, *extra: str
) -> subprocess.Popen[bytes]:
    log = (state_dir.parent / f"{state_dir.name}.log").open("ab")
    return subprocess.Popen(
        [
            MODELFLEET,
            "agent",
            "run",
            "--state-dir",
            str(state_dir),
            "--serve",
            f"127.0.0.1:{port}",
            "--heartbeat",
            "0.5",
            "--poll-wait",
            "2",
            *extra,
        ],
        env={**os.environ, **(env or {})},
        stdout=log,
        stderr=log,
    )


async def stop(p: subprocess.Popen[bytes]) -> int:
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
    try:
        return await asyncio.to_thread(p.wait, 20)
    except subprocess.TimeoutExpired:
        p.kill()
        return -9


async def test_watchdog_pings_while_healthy_and_stops_when_the_loop_is_stuck(
    cp_sqlite: ControlPlane, tmp_path: Path
) -> None:
    sock = NotifySocket(tmp_path / "notify.sock")
    env = {"NOTIFY_SOCKET": str(sock.path), "WATCHDOG_USEC": "400000"}
    await enroll_agent(cp_sqlite, tmp_path / "a", {"site": "x"})
    healthy = start_agent(tmp_path / "a", free_port(), env)
    # Eight pings (every 0.2 s) after READY; a loaded machine may take a while to start it.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        await sock.collect(0.25)
        msgs = sock.drain()
        ready = next((i for i, m in enumerate(msgs) if m == "READY=1\nSTATUS=serving"), None)
        if ready is not None and msgs[ready:].count("WATCHDOG=1") >= 8:
            break
    assert await stop(healthy) == 0
    assert "READY=1\nSTATUS=serving" in msgs
    assert msgs.count("WATCHDOG=1") >= 8
    # Within systemd's interval (WATCHDOG_USEC, 0.4 s): the agent pings at half of it.
    pings = [t for t, m in sock.messages if m == "WATCHDOG=1"]
    gaps = sorted(b - a for a, b in itertools.pairwise(pings))
    assert gaps[len(gaps) // 2] < 0.4, gaps
    assert "STOPPING=1" in sock.drain()

    sock.messages.clear()
    stuck = start_agent(
        tmp_path / "a", free_port(), {**env, "MODELFLEET_FAILPOINTS": "stall-event-loop"}
    )
    try:
        # The loop stalls two seconds after the agent is up, which under load may be well
        # after this point: wait for pings, then for a silence of 2 s (systemd's cue to
        # restart it), which a loop that kept pinging every 0.2 s would never give.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            await sock.collect(0.25)
            pings = [t for t, m in sock.messages if m == "WATCHDOG=1"]
            if pings and time.monotonic() - pings[-1] > 2.0:
                break
        assert pings, "no ping before the stall"
        assert time.monotonic() - pings[-1] > 2.0, "the watchdog kept pinging through a stall"
    finally:
        stuck.kill()
        stuck.wait()


async def test_sighup_reloads_trusted_keys_and_sigterm_drains(
    cp_sqlite: ControlPlane, publisher: Publisher, tmp_path: Path
) -> None:
    cp = cp_sqlite
    other = make_publisher(tmp_path / "keys2", "release2")
    # The control plane trusts both keys; the agent starts out trusting only the first.
    (cp.config.data_dir / "trusted-publishers").mkdir(exist_ok=True)
    shutil.copy(other.pub_path, cp.config.data_dir / "trusted-publishers/release2.pub")
    await cp.client.close()
    from tests.support.control_plane import start_control_plane

    cp = await start_control_plane(cp.config)
    try:
        ident = await enroll_agent(cp, tmp_path / "a", {"site": "x"})
        (tmp_path / "a" / "trusted").mkdir(exist_ok=True)
        for p in (tmp_path / "a" / "trusted").glob("*.pub"):
            p.unlink()  # keep only what the config names
        cfg = tmp_path / "agent.toml"
        port = free_port()
        cfg.write_text(
            f'state_dir = "{tmp_path / "a"}"\nserve = "127.0.0.1:{port}"\nheartbeat = 0.5\n'
            f'poll_wait = 2\ntrust_publisher = ["{publisher.pub_path}"]\n'
        )
        log = (tmp_path / "a.log").open("ab")
        agent = subprocess.Popen(
            [MODELFLEET, "agent", "run", "--config", str(cfg)], stdout=log, stderr=log
        )
        await cp.push(iris_bundle(publisher.key, "1.0.0"))
        await cp.rollout("1.0.0", "site=x")
        await wait_active(cp, ident.agent_id, "1.0.0")
        slow = iris_model(seed=0, slow=True)
        await cp.push(iris_bundle(other.key, "2.0.0", model=slow, smoke=False))
        await cp.rollout("2.0.0", "site=x")

        async def refused() -> bool:
            a = await (await cp.call("GET", f"/agents/{ident.agent_id}")).json()
            return any(m["version"] == "2.0.0" and m["state"] == "failed" for m in a["models"])

        await eventually(refused)
        cfg.write_text(
            cfg.read_text().replace(
                f'trust_publisher = ["{publisher.pub_path}"]',
                f'trust_publisher = ["{publisher.pub_path}", "{other.pub_path}"]',
            )
        )
        agent.send_signal(signal.SIGHUP)
        await wait_active(cp, ident.agent_id, "2.0.0")

        # SIGTERM while a long request runs: it is answered before the agent exits.
        rows = 1500
        body = {
            "inputs": [
                {
                    "name": "x",
                    "shape": [rows, 4],
                    "datatype": "FP32",
                    "data": [5.1, 3.5, 1.4, 0.2] * rows,
                }
            ]
        }

        async def long_request() -> int:
            async with (
                aiohttp.ClientSession() as s,
                s.post(f"http://127.0.0.1:{port}/v2/models/iris/infer", json=body) as r,
            ):
                await r.read()
                return r.status

        request = asyncio.create_task(long_request())
        await asyncio.sleep(0.3)
        agent.send_signal(signal.SIGTERM)
        assert await request == 200
        assert await asyncio.to_thread(agent.wait, 20) == 0
    finally:
        await cp.client.close()


async def test_sqlite_backup_and_restore(
    tmp_path: Path, cp_sqlite: ControlPlane, publisher: Publisher
) -> None:
    cp = cp_sqlite
    await cp.push(iris_bundle(publisher.key, "1.0.0"))
    db = f"sqlite:///{tmp_path / 'cp.db'}"
    backup = tmp_path / "backup.db"

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [MODELFLEET, "db", *args, "--db", db], capture_output=True, text=True, timeout=60
        )

    assert run("backup", "--out", str(backup)).returncode == 0  # while the server runs
    assert backup.stat().st_mode & 0o777 == 0o600
    await cp.push(iris_bundle(publisher.key, "2.0.0", seed=1))
    await cp.client.close()
    assert run("backup", "--out", str(backup)).returncode == 2  # never overwrites
    bad = tmp_path / "junk.db"
    bad.write_bytes(b"junk" * 100)
    r = run("restore", str(bad))
    assert r.returncode == 2 and "not a SQLite database" in r.stderr
    assert run("restore", str(backup)).returncode == 0
    with sqlite3.connect(tmp_path / "cp.db") as c:
        assert [v for (v,) in c.execute("select version from model_versions")] == ["1.0.0"]
    r = subprocess.run(
        [MODELFLEET, "db", "backup", "--out", "x", "--db", "postgresql://u@127.0.0.1/x"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "pg_dump" in r.stderr


async def test_air_gapped_export_and_import(
    cp_sqlite: ControlPlane, publisher: Publisher, tmp_path: Path
) -> None:
    cp = cp_sqlite
    await cp.push(iris_bundle(publisher.key, "1.0.0"))
    out = tmp_path / "iris.mfb"
    p = await asyncio.to_thread(
        subprocess.run,
        [
            MODELFLEET,
            "bundle",
            "export",
            "--model",
            "iris",
            "--version",
            "1.0.0",
            "--out",
            str(out),
            "--server",
            cp.url,
            "--token",
            cp.token,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 0, p.stderr
    v = await asyncio.to_thread(
        subprocess.run,
        [MODELFLEET, "bundle", "verify", str(out), "--trust", str(publisher.pub_path)],
        capture_output=True,
        text=True,
    )
    assert v.returncode == 0, v.stderr

    ident = await enroll_agent(cp, tmp_path / "a", {"site": "air"})
    tampered = tmp_path / "tampered.mfb"
    data = bytearray(out.read_bytes())
    model = iris_model(seed=0)
    idx = bytes(data).find(model)
    assert idx > 0
    data[idx + len(model) // 2] ^= 0xFF  # a byte inside the model file
    tampered.write_bytes(bytes(data))
    r = await asyncio.to_thread(
        subprocess.run,
        [MODELFLEET, "agent", "import", str(tampered), "--state-dir", str(tmp_path / "a")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 1 and "refused" in r.stderr
    stranger = make_publisher(tmp_path / "k3", "stranger")
    (tmp_path / "s.mfb").write_bytes(iris_bundle(stranger.key, "9.0.0"))
    r = await asyncio.to_thread(
        subprocess.run,
        [
            MODELFLEET,
            "agent",
            "import",
            str(tmp_path / "s.mfb"),
            "--state-dir",
            str(tmp_path / "a"),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 1 and "trusted" in r.stderr
    r = await asyncio.to_thread(
        subprocess.run,
        [MODELFLEET, "agent", "import", str(out), "--state-dir", str(tmp_path / "a")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr

    # The agent has no route to the control plane: it serves the imported version anyway ...
    identity = json.loads((tmp_path / "a/identity.json").read_text())
    real_server = identity["server"]
    identity["server"] = f"http://127.0.0.1:{free_port()}"
    (tmp_path / "a/identity.json").write_text(json.dumps(identity))
    port = free_port()
    agent = start_agent(tmp_path / "a", port)
    try:

        async def serving() -> bool:
            try:
                async with (
                    aiohttp.ClientSession() as s,
                    s.post(
                        f"http://127.0.0.1:{port}/v2/models/iris/infer",
                        json={
                            "inputs": [
                                {
                                    "name": "x",
                                    "shape": [1, 4],
                                    "datatype": "FP32",
                                    "data": [1, 2, 3, 4],
                                }
                            ]
                        },
                    ) as r,
                ):
                    return r.status == 200
            except aiohttp.ClientError:
                return False

        await eventually(serving, 30)
    finally:
        assert await stop(agent) == 0
    # ... and reports it when it next connects.
    identity["server"] = real_server
    (tmp_path / "a/identity.json").write_text(json.dumps(identity))
    agent = start_agent(tmp_path / "a", port)
    try:
        await wait_active(cp, ident.agent_id, "1.0.0")
    finally:
        await stop(agent)


@pytest.mark.slow
async def test_install_script_into_a_root_prefix(
    cp_sqlite: ControlPlane, publisher: Publisher, tmp_path: Path
) -> None:
    cp = cp_sqlite
    wheels = tmp_path / "wheels"
    p = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr
    wheel = next(wheels.glob("modelfleet-*.whl"))
    root = tmp_path / "root"
    r = await cp.call("POST", "/enrollment-tokens", json={"labels": {"site": "edge"}})
    token = (await r.json())["token"]
    port = free_port()
    cmd = [
        "bash",
        str(DEPLOY / "install-agent.sh"),
        "--root",
        str(root),
        "--no-user",
        "--wheel",
        str(wheel),
        "--python",
        sys.executable,
        "--server",
        cp.url,
        "--token",
        token,
        "--labels",
        "site=edge,hw=cpu",
        "--name",
        "edge-1",
        "--serve",
        f"127.0.0.1:{port}",
        "--trust-publisher",
        str(publisher.pub_path),
    ]
    first = await asyncio.to_thread(
        subprocess.run, cmd, capture_output=True, text=True, timeout=600
    )
    assert first.returncode == 0, first.stdout + first.stderr
    assert "installed: agent" in first.stdout
    venv = root / "opt/modelfleet/venv"
    config = root / "etc/modelfleet/agent.toml"
    state = root / "var/lib/modelfleet"
    unit = root / "etc/systemd/system/modelfleet-agent.service"
    assert (venv / "bin/modelfleet").is_file()
    assert config.stat().st_mode & 0o777 == 0o600
    assert state.stat().st_mode & 0o777 == 0o700
    assert (state / "identity.json").stat().st_mode & 0o777 == 0o600
    assert (root / "etc/modelfleet/publishers" / publisher.pub_path.name).is_file()
    assert unit.stat().st_mode & 0o777 == 0o644
    assert f"ExecStart={venv}/bin/modelfleet agent run --config {config}" in unit.read_text()
    settings = load_file(config)
    assert settings["state_dir"] == state and settings["serve"] == f"127.0.0.1:{port}"
    assert settings["enroll"]["labels"] == "site=edge,hw=cpu"
    identity = json.loads((state / "identity.json").read_text())
    assert identity["name"] == "edge-1" and identity["labels"]["site"] == "edge"
    before = {p: p.read_bytes() for p in (config, state / "identity.json")}

    second = await asyncio.to_thread(
        subprocess.run, cmd, capture_output=True, text=True, timeout=600
    )
    assert second.returncode == 0, second.stdout + second.stderr
    assert "upgraded in place" in second.stdout
    assert {p: p.read_bytes() for p in before} == before  # identity and config kept
    agents = (await (await cp.call("GET", "/agents")).json())["agents"]
    assert len(agents) == 1  # enrolled once

    # The installed agent, from the virtualenv the script made, enrolls and serves.
    await cp.push(iris_bundle(publisher.key, "1.0.0"))
    await cp.rollout("1.0.0", "site=edge")
    agent = subprocess.Popen(
        [
            str(venv / "bin/modelfleet"),
            "agent",
            "run",
            "--config",
            str(config),
            "--heartbeat",
            "0.5",
        ],
        stdout=(tmp_path / "installed.log").open("ab"),
        stderr=subprocess.STDOUT,
    )
    try:
        await wait_active(cp, identity["agent_id"], "1.0.0", 60)
    finally:
        assert await stop(agent) == 0

    gone = await asyncio.to_thread(
        subprocess.run,
        ["bash", str(DEPLOY / "install-agent.sh"), "--root", str(root), "--uninstall"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert gone.returncode == 0, gone.stderr
    assert not unit.exists() and not venv.exists() and (state / "identity.json").exists()


async def test_agent_install_names_a_publisher_key_it_cannot_read(tmp_path: Path) -> None:
    """A --trust-publisher file that is not there is an error naming it, not a traceback."""
    missing = tmp_path / "nowhere.pub"
    p = await run_cli(
        *("agent", "install", "--root", tmp_path / "root", "--no-start"),
        *("--server", "http://127.0.0.1:9", "--token", "mfe_x", "--trust-publisher", missing),
    )
    assert p.returncode == 1, p.stderr
    assert p.stderr.startswith(f"modelfleet: error: {missing}: ") and "Traceback" not in p.stderr
    assert not (tmp_path / "root/etc/modelfleet/agent.toml").exists()
