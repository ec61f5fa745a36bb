"""A mosquitto of a test's own (password file, pattern ACL, optional TLS), and a control plane
configuration that uses it."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import signal
import subprocess
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from control_plane.mqtt.broker_auth import (
    CONTROL_PLANE_USER,
    acl_file,
    mosquitto_hash,
    password_file,
)
from tests.support.bundles import Publisher
from tests.support.control_plane import ControlPlane, cp_config
from tests.support.fleet import MODELFLEET, free_port

CP_PASSWORD = "cp-broker-secret"


class Broker:
    """A mosquitto of our own: password file, pattern ACL, persistence, a free port."""

    def __init__(self, root: Path, prefix: str, tls: bool = False, anonymous: bool = False) -> None:
        self.root = root
        self.port = free_port()
        self.url = f"{'mqtts' if tls else 'mqtt'}://127.0.0.1:{self.port}"
        self.prefix = prefix
        self.proc: subprocess.Popen[bytes] | None = None
        root.mkdir(parents=True, exist_ok=True)
        (root / "acl").write_text(acl_file(prefix))
        (root / "passwd").write_text(
            password_file([(CONTROL_PLANE_USER, mosquitto_hash(CP_PASSWORD))])
        )
        tls_lines = _make_tls(root) if tls else ""
        closed = f"password_file {root / 'passwd'}\nacl_file {root / 'acl'}\n"
        auth = "allow_anonymous true\n" if anonymous else f"allow_anonymous false\n{closed}"
        (root / "mosquitto.conf").write_text(
            f"listener {self.port} 127.0.0.1\n{tls_lines}{auth}"
            f"persistence true\npersistence_location {root}/\n"
            # As root mosquitto would switch to its own user, who cannot read the test's files.
            + ("user root\n" if os.geteuid() == 0 else "")
        )

    async def start(self) -> None:
        mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not Path(mosquitto).exists():
            pytest.skip("mosquitto is not installed")
        log = (self.root / "mosquitto.log").open("ab")
        self.proc = subprocess.Popen(
            [mosquitto, "-c", str(self.root / "mosquitto.conf")], stdout=log, stderr=log
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                _, w = await asyncio.open_connection("127.0.0.1", self.port)
                w.close()
                return
            except OSError:
                await asyncio.sleep(0.05)
        raise AssertionError((self.root / "mosquitto.log").read_text())

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def kill(self) -> None:
        """SIGKILL the broker: no persistence flush, no DISCONNECT to anyone."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    async def load_passwords(self, cp: ControlPlane) -> None:
        """`modelfleet mqtt passwd` from the database, then SIGHUP so mosquitto re-reads it."""
        p = await asyncio.to_thread(
            subprocess.run,
            [
                MODELFLEET,
                "mqtt",
                "passwd",
                "--db",
                cp.config.database_url,
                "--out",
                str(self.root / "passwd"),
                "--control-plane-password",
                CP_PASSWORD,
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert p.returncode == 0, p.stderr
        self.reload()
        await asyncio.sleep(0.3)

    def reload(self) -> None:
        """Have mosquitto re-read its password file and ACL (SIGHUP)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGHUP)

    def client(self, username: str, password: str) -> aiomqtt.Client:
        return aiomqtt.Client(
            "127.0.0.1",
            self.port,
            username=username,
            password=password,
            identifier=f"test-{uuid.uuid4().hex[:8]}",
            protocol=aiomqtt.ProtocolVersion.V5,
        )


def _make_tls(root: Path) -> str:
    """A CA and a broker certificate for 127.0.0.1, made here; mosquitto config lines."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    now = datetime.now(UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("test CA"))
        .issuer_name(name("test CA"))
        .public_key(ca_key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    import ipaddress

    cert = (
        x509.CertificateBuilder()
        .subject_name(name("127.0.0.1"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(2)
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    (root / "ca.pem").write_bytes(ca.public_bytes(pem))
    (root / "cert.pem").write_bytes(cert.public_bytes(pem))
    (root / "key.pem").write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return f"cafile {root / 'ca.pem'}\ncertfile {root / 'cert.pem'}\nkeyfile {root / 'key.pem'}\n"


def mqtt_config(tmp_path: Path, publisher: Publisher, broker: Broker, **extra: object) -> Any:
    """A test control plane on SQLite that uses this broker."""
    return dataclasses.replace(
        cp_config(tmp_path, f"sqlite:///{tmp_path / 'cp.db'}", publisher),
        controller_interval_s=0.2,
        mqtt_url=broker.url,
        mqtt_password=CP_PASSWORD,
        mqtt_prefix=broker.prefix,
        **extra,
    )
