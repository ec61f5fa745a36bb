"""PostgreSQL and Mosquitto from containers (the ``testcontainers`` package), and the rule for
when the suite uses them instead of the services the machine runs.

MODELFLEET_TEST_SERVICES chooses: ``local`` (the machine's PostgreSQL and mosquitto binary),
``containers`` (a Docker engine), or ``auto`` (the default: local services when they answer,
containers when they do not and a Docker engine does). Image names are settings:
MODELFLEET_TEST_POSTGRES_IMAGE and MODELFLEET_TEST_MOSQUITTO_IMAGE, e.g. ``postgres:16`` and
``eclipse-mosquitto:2`` where a registry is reachable; unset, both are the test-services image
that ``deploy/images/build-base.sh`` builds from Debian's packages (cached by a hash of its
inputs, so only the first run on a machine builds it). Every port is published on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import functools
import os
import shutil
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tests.support.broker import Broker
from tests.support.fleet import free_port
from tests.support.services import PG_URL, pg_execute, run_in_thread, service_unavailable

ROOT = Path(__file__).resolve().parents[2]
BUILD_BASE = ROOT / "deploy/images/build-base.sh"
SETTING = "MODELFLEET_TEST_SERVICES"
# Every container a test starts carries this label: `docker rm -f $(docker ps -aq --filter
# label=modelfleet.test)` clears what a killed test run left behind (Ryuk, testcontainers'
# reaper, is an image from a registry, so it is off).
LABEL = "modelfleet.test"
os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")

Source = Literal["local", "containers"]


def choose_source(setting: str, *, local_answers: bool, engine_answers: bool) -> Source:
    """Where a service comes from, given the setting and what answers on this machine.

    Raises ValueError for a setting that is none of local, containers, auto.
    """
    if setting == "local":
        return "local"
    if setting == "containers":
        return "containers"
    if setting != "auto":
        raise ValueError(f"{SETTING} must be local, containers or auto, not {setting!r}")
    return "containers" if engine_answers and not local_answers else "local"


def setting() -> str:
    """MODELFLEET_TEST_SERVICES, lower-cased (``auto`` when unset)."""
    return os.environ.get(SETTING, "auto").strip().lower() or "auto"


@functools.cache
def pg_source() -> Source:
    """Where this test process takes PostgreSQL from (asked once per process)."""
    return _source(lambda: _tcp_answers(PG_URL))


@functools.cache
def broker_source() -> Source:
    """Where this test process takes its mosquittos from (asked once per process)."""
    return _source(lambda: shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists())


def _source(local_answers: Any) -> Source:
    chosen = setting()
    if chosen == "auto" and local_answers():
        return "local"  # no need to ask the engine
    source = choose_source(chosen, local_answers=False, engine_answers=engine_answers())
    if source == "containers":
        require_engine()
    return source


def _tcp_answers(url: str) -> bool:
    from sqlalchemy.engine import make_url

    u = make_url(url)
    try:
        socket.create_connection((u.host or "127.0.0.1", u.port or 5432), timeout=2).close()
        return True
    except OSError:
        return False


def engine_answers() -> bool:
    """Whether a Docker engine answers a ping (DOCKER_HOST, or the local socket)."""
    try:
        import docker

        client = docker.from_env(timeout=3)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:  # docker's own errors, a missing socket, a missing package: no engine
        return False


def require_engine() -> None:
    """Skip (fail under CI) when no Docker engine answers."""
    if not engine_answers():
        service_unavailable(
            "no Docker engine answers (start dockerd, or set DOCKER_HOST); "
            "`pytest -m containers` and MODELFLEET_TEST_SERVICES=containers need one"
        )


@dataclass(frozen=True)
class Images:
    """The images the service containers run."""

    postgres: str
    mosquitto: str


@functools.cache
def built_images() -> dict[str, str]:
    """Build (or find, when cached) the local base and test-services images.

    Skips (fails under CI) when the build cannot run here, e.g. without root for debootstrap.
    """
    try:
        p = subprocess.run(
            ["bash", str(BUILD_BASE)], capture_output=True, text=True, timeout=1200, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        service_unavailable(f"{BUILD_BASE.name} did not run: {exc!r}")
    if p.returncode != 0:
        service_unavailable(f"{BUILD_BASE.name} failed ({p.returncode}): {p.stderr[-2000:]}")
    return dict(line.split("=", 1) for line in p.stdout.split() if "=" in line)


def service_images() -> Images:
    """Image names from the settings; the local test-services image where one is unset."""
    pg = os.environ.get("MODELFLEET_TEST_POSTGRES_IMAGE", "")
    mq = os.environ.get("MODELFLEET_TEST_MOSQUITTO_IMAGE", "")
    if not (pg and mq):
        local = built_images()["services"]
        pg, mq = pg or local, mq or local
    return Images(postgres=pg, mosquitto=mq)


def _container(image: str, command: str) -> Any:
    """A testcontainers container with the test label, not yet started."""
    from testcontainers.core.container import DockerContainer

    return DockerContainer(image, command=command, labels={LABEL: "1"})


def _publish(container: Any, port: int, host_port: int) -> None:
    """Publish ``port`` on 127.0.0.1 only (with_bind_ports would take every interface)."""
    container.ports[f"{port}/tcp"] = ("127.0.0.1", host_port)


class PostgresContainer:
    """A PostgreSQL server in a container, trust authentication, on a loopback port."""

    def __init__(self, image: str) -> None:
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        # fsync off: a test database is thrown away, and the suite's speed is its I/O.
        self.container = _container(image, "postgres -c fsync=off -c max_connections=300")
        self.container.with_env("POSTGRES_HOST_AUTH_METHOD", "trust")
        _publish(self.container, 5432, self.port)

    def start(self, within_s: float = 120) -> None:
        """Start it and wait until it takes a query; raises AssertionError with its log if not."""
        self.container.start()
        deadline = time.monotonic() + within_s
        while True:
            try:
                run_in_thread(pg_execute("SELECT 1", self.url))
                return
            except Exception as exc:  # still starting: refused, reset, or "starting up"
                if time.monotonic() > deadline:
                    raise AssertionError(f"{exc!r}\n{self.logs()}") from None
                time.sleep(0.3)

    def logs(self) -> str:
        out, err = self.container.get_logs()
        return (out + err).decode(errors="replace")[-4000:]

    def stop(self) -> None:
        self.container.stop()


class ContainerBroker(Broker):
    """The test's own mosquitto (password file, ACL, persistence) in a container.

    Same interface as ``Broker``: the files live in ``root`` on the host, mounted at
    /mosquitto/config; ``stop()`` stops the container as SIGTERM stops the process, ``kill()``
    kills it with SIGKILL, ``start()`` starts the same container again on the same port.
    """

    def __init__(self, root: Path, prefix: str, *, image: str, anonymous: bool = False) -> None:
        super().__init__(root, prefix, anonymous=anonymous)
        auth = (
            "allow_anonymous true\n"
            if anonymous
            else "allow_anonymous false\npassword_file /mosquitto/config/passwd\n"
            "acl_file /mosquitto/config/acl\n"
        )
        # `user root`: `modelfleet mqtt passwd` writes its file 0600 for the host's user, whom
        # the image's own mosquitto user cannot read as.
        (root / "mosquitto.conf").write_text(
            f"listener 1883\n{auth}persistence true\npersistence_location /mosquitto/data/\n"
            "user root\n"
        )
        self.container = _container(image, "mosquitto -c /mosquitto/config/mosquitto.conf")
        self.container.with_volume_mapping(str(root), "/mosquitto/config", "ro")
        _publish(self.container, 1883, self.port)
        self._created = False

    async def start(self) -> None:
        if not self._created:
            await asyncio.to_thread(self.container.start)
            self._created = True
        else:
            await asyncio.to_thread(self.container.get_wrapped_container().start)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            # docker-proxy accepts on the published port before mosquitto listens: only an
            # MQTT answer counts (CONNACK, whatever its code).
            if await _mqtt_answers(self.port):
                return
            await asyncio.sleep(0.1)
        raise AssertionError(self.logs())

    def stop(self) -> None:
        if self._created:
            self.container.get_wrapped_container().stop(timeout=10)

    def kill(self) -> None:
        """SIGKILL the broker: no persistence flush, no DISCONNECT to anyone."""
        self.container.get_wrapped_container().kill()

    def reload(self) -> None:
        self.container.get_wrapped_container().kill(signal="SIGHUP")

    def remove(self) -> None:
        """Remove the container (whatever its state)."""
        if self._created:
            self.container.stop()

    def logs(self) -> str:
        try:
            out, err = self.container.get_logs()
        except Exception as exc:  # the container may be gone: say so instead of its log
            return f"(no log: {exc!r})"
        return (out + err).decode(errors="replace")[-4000:]


async def _mqtt_answers(port: int) -> bool:
    """Whether something on 127.0.0.1:port answers an MQTT CONNECT with a CONNACK."""
    try:
        r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 2)
    except (OSError, TimeoutError):
        return False
    try:
        client_id = f"probe-{uuid.uuid4().hex[:8]}".encode()
        body = b"\x00\x04MQTT\x04\x02\x00\x05" + len(client_id).to_bytes(2, "big") + client_id
        w.write(bytes([0x10, len(body)]) + body)
        await w.drain()
        head = await asyncio.wait_for(r.readexactly(2), 2)
        return head[0] == 0x20
    except (OSError, TimeoutError, asyncio.IncompleteReadError):
        return False
    finally:
        w.close()
