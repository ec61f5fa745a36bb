"""The README walk-through, for real: the `modelfleet` command, a server process, agent processes.

Runs on SQLite and on PostgreSQL. Every process listens on 127.0.0.1 only.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.devkit.models import write_iris
from tests.support.fleet import free_port

MODELFLEET = str(Path(sys.executable).parent / "modelfleet")


class Cli:
    """Runs `modelfleet` in a working directory with the server and token in its env."""

    def __init__(self, cwd: Path) -> None:
        self.cwd = cwd
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.procs: list[tuple[subprocess.Popen[bytes], Path]] = []

    def run(self, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
        p = subprocess.run(
            [MODELFLEET, *args],
            cwd=self.cwd,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if ok:
            assert p.returncode == 0, f"{args}: {p.stdout}\n{p.stderr}"
        return p

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        log = self.cwd / f"{name}.log"
        f = log.open("wb")
        p = subprocess.Popen([MODELFLEET, *args], cwd=self.cwd, env=self.env, stdout=f, stderr=f)
        self.procs.append((p, log))
        return p

    def stop_all(self) -> list[int]:
        codes = []
        for p, _ in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
            try:
                codes.append(p.wait(timeout=20))
            except subprocess.TimeoutExpired:
                p.kill()
                codes.append(-9)
        return codes

    def logs(self) -> str:
        return "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for _, log in self.procs)


def wait_for(check: Any, within_s: float = 30.0) -> Any:
    deadline = time.monotonic() + within_s
    last = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except (OSError, urllib.error.URLError, ValueError) as exc:
            last = exc
        time.sleep(0.2)
    raise AssertionError(f"not within {within_s}s: {last!r}")


def http_json(url: str, body: Any = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method="POST" if data else "GET")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


@pytest.fixture
def cli(tmp_path: Path) -> Iterator[Cli]:
    c = Cli(tmp_path)
    yield c
    c.stop_all()


@pytest.mark.slow
def test_walkthrough(cli: Cli, db_url: str, tmp_path: Path) -> None:
    port = free_port()
    paths = write_iris(tmp_path / "model")
    cli.run("keys", "generate", "--out", "publisher")
    assert (tmp_path / "publisher.key").stat().st_mode & 0o777 == 0o600
    cli.run(
        "bundle",
        "build",
        str(paths["model"]),
        "--name",
        "iris",
        "--version",
        "1.0.0",
        "--key",
        "publisher.key",
        "--out",
        "iris-1.0.0.mfb",
        "--smoke-input",
        str(paths["smoke_in"]),
        "--smoke-output",
        str(paths["smoke_out"]),
    )
    out = json.loads(
        cli.run("bundle", "verify", "iris-1.0.0.mfb", "--trust", "publisher.pub").stdout
    )
    assert out["name"] == "iris" and out["signedBy"]

    # A key the bundle was not signed with: exit 1 and the reason.
    cli.run("keys", "generate", "--out", "stranger")
    bad = cli.run("bundle", "verify", "iris-1.0.0.mfb", "--trust", "stranger.pub", ok=False)
    assert bad.returncode == 1 and "trusted" in bad.stderr

    server = cli.start(
        "server",
        "server",
        "--data-dir",
        "cp",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--db",
        db_url,
        "--trust-publisher",
        "publisher.pub",
    )
    base = f"http://127.0.0.1:{port}"
    wait_for(lambda: http_json(f"{base}/api/v1/health")[0] == 200)
    token = (tmp_path / "cp" / "admin-token").read_text().strip()
    assert (tmp_path / "cp" / "admin-token").stat().st_mode & 0o777 == 0o600
    cli.env.update(MODELFLEET_SERVER=base, MODELFLEET_TOKEN=token)

    assert "pushed" in cli.run("push", "iris-1.0.0.mfb").stdout
    assert "already present" in cli.run("push", "iris-1.0.0.mfb").stdout
    et = cli.run(
        "enroll-token", "create", "--labels", "fleet=demo", "--max-uses", "2"
    ).stdout.strip()
    agents = {}
    for site in ("cloud", "onprem"):
        agent_id = cli.run(
            "agent",
            "enroll",
            "--server",
            base,
            "--token",
            et,
            "--state-dir",
            f"a-{site}",
            "--labels",
            f"site={site},hw=cpu",
            "--name",
            f"{site}-1",
        ).stdout.strip()
        serve_port = free_port()
        cli.start(
            f"agent-{site}",
            "agent",
            "run",
            "--state-dir",
            f"a-{site}",
            "--serve",
            f"127.0.0.1:{serve_port}",
            "--heartbeat",
            "1",
            "--metrics-interval",
            "1",
            "--poll-wait",
            "5",
        )
        agents[site] = (agent_id, serve_port)
    used_up = cli.run(
        "agent", "enroll", "--server", base, "--token", et, "--state-dir", "a-third", ok=False
    )
    assert used_up.returncode == 1 and "used" in used_up.stderr

    rollout_id = cli.run(
        "rollout", "create", "--model", "iris", "--version", "1.0.0", "--selector", "fleet=demo"
    ).stdout.strip()

    def all_active() -> bool:
        fleet = json.loads(cli.run("agents", "list", "--json").stdout)["agents"]
        return len(fleet) == 2 and all(
            any(m["state"] == "active" and m["version"] == "1.0.0" for m in a["models"])
            for a in fleet
        )

    try:
        wait_for(all_active, 60)
    except AssertionError:
        raise AssertionError(cli.logs()) from None
    table = cli.run("agents", "list").stdout
    assert "cloud-1" in table and "onprem-1" in table and "iris 1.0.0 active" in table
    assert "completed" in cli.run("rollout", "status", rollout_id).stdout

    request = {
        "inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [5.1, 3.5, 1.4, 0.2]}]
    }
    for _, serve_port in agents.values():
        status, body = http_json(f"http://127.0.0.1:{serve_port}/v2/models/iris/infer", request)
        assert status == 200 and body["model_version"] == "1.0.0"
        status, body = http_json(
            f"http://127.0.0.1:{serve_port}/v2/models/iris/infer",
            {"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [1, 2]}]},
        )
        assert status == 400 and "shape" in body["error"]
        assert http_json(f"http://127.0.0.1:{serve_port}/v2/health/ready")[0] == 200

    # Bad command-line input: clear message, exit 2, nothing started.
    bad = cli.run("agent", "run", "--state-dir", "a-cloud", "--serve", "nonsense", ok=False)
    assert bad.returncode == 2 and "--serve" in bad.stderr
    bad = cli.run("rollout", "create", "--model", "iris", "--version", "9.9.9", ok=False)
    assert bad.returncode == 1 and "not published" in bad.stderr

    codes = cli.stop_all()
    assert codes == [0, 0, 0], cli.logs()
    assert server.returncode == 0
