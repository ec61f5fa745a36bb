"""An attacker's pass over the operator's CLI (issue 17): what a hostile agent answers reaches
the operator's terminal. Escape sequences in log lines or bundle member names must arrive
defused, and a bundle of endless members must not hold the CLI. The agent is played by its
own credential over HTTP against a real control plane; the CLI runs as a process."""

from __future__ import annotations

import asyncio
import io
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest

from protocol.dsse import parse_envelope
from tests.integration.test_commands_api import answer, poll
from tests.support.control_plane import ControlPlane
from tests.support.fleet import run_cli

pytestmark = pytest.mark.slow
HOSTILE = b"first line\n\x1b]0;owned\x07\x1b[2J\x1b[31mred\rover \xc2\x9b31m csi\n"


async def answered_by_agent(cp: ControlPlane, agent: dict[str, Any], data: bytes) -> None:
    """Wait for the command the CLI issues, as the agent, and answer it with ``data``."""
    async with asyncio.timeout(60):
        while not (envelopes := await poll(cp, agent, wait=5)):
            pass
    payload = json.loads(parse_envelope(envelopes[0].encode()).payload)
    r = await answer(cp, agent, payload["commandId"], data)
    assert r.status == 200, await r.text()


def tar_gz(members: dict[str, bytes], count: int = 0) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for i in range(count):
            tar.addfile(tarfile.TarInfo(f"filler/{i}"), io.BytesIO(b""))
    return buf.getvalue()


async def test_escape_sequences_from_an_agent_do_not_reach_the_terminal(
    tmp_path: Path, cp_sqlite: ControlPlane
) -> None:
    cp = cp_sqlite
    agent = await cp.enroll()
    opts = ("--server", cp.url, "--token", cp.token, "--timeout", "60")
    cli = asyncio.create_task(run_cli("agents", "logs", agent["agentId"], *opts))
    await answered_by_agent(cp, agent, HOSTILE)
    p = await cli
    assert p.returncode == 0, p.stderr
    assert "first line" in p.stdout and "red" in p.stdout and "csi" in p.stdout
    for control in ("\x1b", "\x07", "\r", "\x9b"):
        assert control not in p.stdout, repr(p.stdout)

    # A bundle whose member names carry escapes, and 200,000 empty members after them.
    bundle = tar_gz({"support/\x1b[2Jlogs.txt": b"x"}, count=200_000)
    assert len(bundle) < 8 * 1024 * 1024
    out = tmp_path / "b.tar.gz"
    cli = asyncio.create_task(
        run_cli(
            "agents",
            "diagnose",
            agent["agentId"],
            "--out",
            out,
            "--max-bytes",
            str(8 * 1024 * 1024),
            *opts,
        )
    )
    await answered_by_agent(cp, agent, bundle)
    p = await cli
    assert p.returncode == 0, p.stderr
    assert "\x1b" not in p.stdout and "logs.txt" in p.stdout
    assert "more members not listed" in p.stdout
    assert len(p.stdout.splitlines()) < 1100
    assert out.read_bytes() == bundle
