"""HTTPS for the control plane, the agent verifying it with a custom CA, and mutual TLS."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import ssl
import subprocess
import time
from pathlib import Path

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.client import ControlPlaneClient, enroll
from agent.exceptions import AgentConfigError, TransportError
from agent.tls import client_context
from tests.support.bundles import Publisher
from tests.support.fleet import MODELFLEET, free_port

pytestmark = pytest.mark.slow


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_pki(d: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("modelfleet test CA"))
        .issuer_name(_name("modelfleet test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    out = {"ca": d / "ca.pem"}
    out["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for who, ext in (
        (
            "server",
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
        ),
        ("client", None),
    ):
        key = ec.generate_private_key(ec.SECP256R1())
        b = (
            x509.CertificateBuilder()
            .subject_name(_name(f"modelfleet {who}"))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + dt.timedelta(days=1))
        )
        if ext is not None:
            b = b.add_extension(ext, critical=False)
        cert = b.sign(ca_key, hashes.SHA256())
        out[f"{who}_cert"] = d / f"{who}.pem"
        out[f"{who}_key"] = d / f"{who}.key"
        out[f"{who}_cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        out[f"{who}_key"].write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return out


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
