"""HTTPS for the control plane, the agent verifying it with a custom CA, and mutual TLS."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
import time
from pathlib import Path

import aiohttp
import pytest

from agent.client import ControlPlaneClient, enroll
from agent.exceptions import AgentConfigError, TransportError
from agent.tls import client_context
from tests.support.bundles import Publisher
from tests.support.fleet import MODELFLEET, free_port
from tests.support.pki import make_pki

pytestmark = pytest.mark.slow


async def start_server(
    tmp: Path, publisher: Publisher, *extra: str
) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    log = (tmp / "server.log").open("wb")
    args = [
        MODELFLEET,
        "server",
        "--data-dir",
        str(tmp / "cp"),
        "--port",
        str(port),
        "--trust-publisher",
        str(publisher.pub_path),
        *extra,
    ]
    proc = await asyncio.to_thread(subprocess.Popen, args, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while not (tmp / "cp" / "admin-token").exists() or not _listening(port):
        assert proc.poll() is None, (tmp / "server.log").read_text()
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    return proc, f"https://127.0.0.1:{port}"


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


async def admin_call(
    url: str, tmp: Path, ctx: ssl.SSLContext, method: str, path: str, body: object = None
) -> dict:
    token = (tmp / "cp" / "admin-token").read_text().strip()
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as s,
        s.request(
            method, f"{url}/api/v1{path}", json=body, headers={"Authorization": f"Bearer {token}"}
        ) as r,
    ):
        assert r.status < 300, await r.text()
        return await r.json()


async def test_https_with_a_custom_ca(tmp_path: Path, publisher: Publisher) -> None:
    pki = make_pki(tmp_path)
    proc, url = await start_server(
        tmp_path,
        publisher,
        "--tls-cert",
        str(pki["server_cert"]),
        "--tls-key",
        str(pki["server_key"]),
    )
    try:
        ctx = client_context(str(pki["ca"]))
        assert ctx is not None
        et = await admin_call(url, tmp_path, ctx, "POST", "/enrollment-tokens", {})
        out = await enroll(url, et["token"], "tls-agent", {}, {}, ctx)
        async with ControlPlaneClient(url, out["credential"], out["agentId"], ctx) as c:
            assert await c.poll_desired(0, 0) is None  # authenticated, verified, nothing yet
        # Without the CA the agent refuses the server: it cannot be impersonated.
        et = await admin_call(url, tmp_path, ctx, "POST", "/enrollment-tokens", {})
        with pytest.raises(TransportError, match=r"CERTIFICATE_VERIFY_FAILED|certificate"):
            await enroll(url, et["token"], None, {}, {})
        # Plain HTTP to the HTTPS port gets nowhere.
        with pytest.raises(TransportError):
            await enroll(url.replace("https", "http"), et["token"], None, {}, {})
    finally:
        proc.terminate()
        await asyncio.to_thread(proc.wait, 20)


async def test_mutual_tls_requires_a_client_certificate(
    tmp_path: Path, publisher: Publisher
) -> None:
    pki = make_pki(tmp_path)
    proc, url = await start_server(
        tmp_path,
        publisher,
        "--tls-cert",
        str(pki["server_cert"]),
        "--tls-key",
        str(pki["server_key"]),
        "--tls-client-ca",
        str(pki["ca"]),
    )
    try:
        with_cert = client_context(str(pki["ca"]), str(pki["client_cert"]), str(pki["client_key"]))
        assert with_cert is not None
        et = await admin_call(url, tmp_path, with_cert, "POST", "/enrollment-tokens", {})
        out = await enroll(url, et["token"], None, {}, {}, with_cert)
        assert out["agentId"]
        without = client_context(str(pki["ca"]))
        et = await admin_call(url, tmp_path, with_cert, "POST", "/enrollment-tokens", {})
        with pytest.raises(TransportError):
            await enroll(url, et["token"], None, {}, {}, without)
    finally:
        proc.terminate()
        await asyncio.to_thread(proc.wait, 20)


def test_tls_settings_are_checked(tmp_path: Path) -> None:
    with pytest.raises(AgentConfigError, match="both"):
        client_context(None, str(tmp_path / "c.pem"), None)
    with pytest.raises(AgentConfigError, match="TLS files"):
        client_context(str(tmp_path / "missing.pem"))
    cases = [
        (["--tls-cert", "x.pem"], "go together"),
        (["--tls-client-ca", "ca.pem"], "needs tls_cert"),
        (["--tls-cert", "x.pem", "--tls-key", "y.pem"], "no such file"),
    ]
    for args, message in cases:
        p = subprocess.run(
            [MODELFLEET, "server", "--data-dir", str(tmp_path / "cp"), *args],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert p.returncode == 2 and message in p.stderr, (args, p.stderr)
