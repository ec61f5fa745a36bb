"""The compose stack of deploy/compose run end to end, on images built from this checkout in the
same run: a control plane on PostgreSQL, Mosquitto with the password file and ACL that
`modelfleet mqtt passwd/acl` generate, two agent containers on sites a and b. From the host: a
bundle pushed, a rollout to both, inference through the published loopback ports, the compare
report counting both sites. Then `compose down` and `up` again: nothing lost."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from control_plane.mqtt.broker_auth import CONTROL_PLANE_USER
from tests.support.agents import eventually
from tests.support.bundles import Publisher, iris_bundle
from tests.support.compose import Compose, ProductImages, product_images
from tests.support.containers import ROOT, require_engine, service_images
from tests.support.fleet import MODELFLEET, ONE_ROW, free_port

pytestmark = pytest.mark.containers

SITES = ("a", "b")


def cli(env: dict[str, str], *args: str) -> str:
    """Run `modelfleet` on the host; its stdout. Raises AssertionError with stderr on failure."""
    p = subprocess.run(
        [MODELFLEET, *args], capture_output=True, text=True, timeout=60, env={**os.environ, **env}
    )
    assert p.returncode == 0, f"modelfleet {' '.join(args)}: {p.stderr}"
    return p.stdout


class Stack:
    """The host's view of the running stack: the API, the agents' ports, the broker's files."""

    def __init__(self, compose: Compose, root: Path, ports: dict[str, int], images: Any) -> None:
        self.compose = compose
        self.root = root
        self.ports = ports
        self.images = images
        self.server = f"http://127.0.0.1:{ports['cp']}"
        self.token = ""

    @property
    def env(self) -> dict[str, str]:
        return {"MODELFLEET_SERVER": self.server, "MODELFLEET_TOKEN": self.token}

    async def api(self, path: str) -> Any:
        async with (
            aiohttp.ClientSession() as s,
            s.get(
                f"{self.server}/api/v1{path}", headers={"Authorization": f"Bearer {self.token}"}
            ) as r,
        ):
            assert r.status == 200, await r.text()
            return await r.json()

    async def healthy(self) -> bool:
        try:
            async with (
                aiohttp.ClientSession() as s,
                s.get(f"{self.server}/api/v1/health", timeout=aiohttp.ClientTimeout(3)) as r,
            ):
                return r.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def read_admin_token(self) -> None:
        out = await self.compose.run(
            "exec", "-T", "control-plane", "cat", "/var/lib/modelfleet/admin-token"
        )
        self.token = out.strip()

    async def write_passwords(self) -> None:
        """`modelfleet mqtt passwd` from the control plane's database (run in its container),
        written in place for mosquitto's user, then SIGHUP."""
        out = await self.compose.run(
            "exec",
            "-T",
            "control-plane",
            "sh",
            "-c",
            'modelfleet mqtt passwd --db "$MODELFLEET_DB" --out /tmp/passwd >/dev/null'
            " && cat /tmp/passwd",
        )
        passwd = self.root / "compose/mqtt-passwd"
        passwd.write_text(out)  # in place: the file mount keeps its inode
        os.chown(passwd, self.images["mosquitto_uid"], -1)
        passwd.chmod(0o600)
        await self.compose.run("kill", "-s", "SIGHUP", "mosquitto")

    async def infer(self, site: str, n: int) -> list[Any]:
        """n inference requests to the agent of ``site`` through its published port."""
        url = f"http://127.0.0.1:{self.ports[site]}/v2/models/iris/infer"
        outs = []
        async with aiohttp.ClientSession() as s:
            for _ in range(n):
                async with s.post(url, json=ONE_ROW) as r:
                    assert r.status == 200, await r.text()
                    outs.append((await r.json())["outputs"])
        return outs

    async def compare(self) -> dict[str, int]:
        """Requests per site in the compare report of the last hour."""
        report = await self.api("/reports/compare?model=iris&since=1h&by=site")
        return {g["key"]["site"]: g["requests"] for g in report["groups"]}

    async def inspect(self, service: str) -> Any:
        cid = await self.compose.container_id(service)
        p = await asyncio.to_thread(
            subprocess.run, ["docker", "inspect", cid], capture_output=True, text=True
        )
        return json.loads(p.stdout)[0]


def mosquitto_uid(image: str) -> int:
    """The uid of the mosquitto user in ``image`` (it must read the password file)."""
    p = subprocess.run(
        ["docker", "run", "--rm", "--entrypoint", "id", image, "-u", "mosquitto"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 0, p.stderr
    return int(p.stdout)


@pytest.fixture
async def stack(tmp_path: Path) -> Any:
    """The compose files copied to tmp_path (publisher key, generated broker files beside
    them), under a project name of the test's own; `down -v` afterwards."""
    require_engine()
    services = service_images()
    product: ProductImages = product_images()
    shutil.copytree(ROOT / "deploy/compose", tmp_path / "compose")
    shutil.copytree(ROOT / "deploy/mosquitto", tmp_path / "mosquitto")
    ports = {"cp": free_port(), "mqtt": free_port(), "a": free_port(), "b": free_port()}
    env = {
        "MODELFLEET_POSTGRES_IMAGE": services.postgres,
        "MODELFLEET_MOSQUITTO_IMAGE": services.mosquitto,
        "MODELFLEET_CONTROL_PLANE_IMAGE": product.control_plane,
        "MODELFLEET_AGENT_IMAGE": product.agent,
        "MODELFLEET_CP_PORT": str(ports["cp"]),
        "MODELFLEET_MQTT_PORT": str(ports["mqtt"]),
        "MODELFLEET_AGENT_A_PORT": str(ports["a"]),
        "MODELFLEET_AGENT_B_PORT": str(ports["b"]),
        "MODELFLEET_MQTT_PASSWORD": uuid.uuid4().hex,
    }
    compose = Compose(
        project=f"mf-{uuid.uuid4().hex[:8]}",
        files=[tmp_path / "compose/compose.yaml", tmp_path / "compose/compose.agents.yaml"],
        env=env,
    )
    images = {"mosquitto_uid": mosquitto_uid(services.mosquitto)}
    s = Stack(compose, tmp_path, ports, images)
    try:
        yield s
    finally:
        logs = await compose.run("logs", "--no-color", "--tail", "60", check=False)
        (tmp_path / "compose.log").write_text(logs)
        await compose.run("down", "-v", "--remove-orphans", check=False)


# Five stacks' worth of containers started twice, on a loaded two-core machine: minutes, not
# a hang (the default timeout is 300 s; the images are built before, see make test-containers).
@pytest.mark.timeout(900)
async def test_the_compose_stack_end_to_end_and_down_up_loses_nothing(
    stack: Stack, publisher: Publisher, tmp_path: Path
) -> None:
    compose = stack.compose
    shutil.copy(publisher.pub_path, tmp_path / "compose/publishers/publisher.pub")
    cli({}, "mqtt", "acl", "--out", str(tmp_path / "mosquitto/acl"))

    # The control plane, its database and the broker; the broker's users from its database.
    await compose.run("up", "-d", "control-plane")
    await eventually(stack.healthy, 120, 0.5)
    await stack.read_admin_token()
    await stack.write_passwords()

    bundle = tmp_path / "iris-1.0.0.mfb"
    bundle.write_bytes(iris_bundle(publisher.key, "1.0.0"))
    cli(stack.env, "push", str(bundle))
    token = cli(stack.env, "enroll-token", "create", "--max-uses", "2").strip()

    # Two agents enroll over HTTP, then become broker users too.
    compose.env["MODELFLEET_ENROLL_TOKEN"] = token
    await compose.run("up", "-d", "agent-a", "agent-b")

    async def enrolled() -> bool:
        return len((await stack.api("/agents"))["agents"]) == 2

    await eventually(enrolled, 120, 0.5)
    await stack.write_passwords()
    agents = {a["labels"]["site"]: a["id"] for a in (await stack.api("/agents"))["agents"]}
    assert set(agents) == set(SITES)

    rollout = cli(
        stack.env,
        "rollout",
        "create",
        "--model",
        "iris",
        "--version",
        "1.0.0",
        "--selector",
        "fleet=compose",
    ).strip()

    async def completed() -> bool:
        return (await stack.api(f"/rollouts/{rollout}"))["state"] == "completed"

    await eventually(completed, 120, 0.5)

    # Inference from the host through each agent's published loopback port.
    for site in SITES:
        outs = await stack.infer(site, 40)
        assert len(outs) == 40 and outs[0] == outs[-1]

    async def counted(want: dict[str, int]) -> bool:
        per_site = await stack.compare()
        return set(per_site) == set(SITES) and all(per_site[s] >= want[s] for s in SITES)

    await eventually(lambda: counted({"a": 40, "b": 40}), 60, 0.5)
    before = await stack.compare()

    # The control plane and the agents talk to the broker under their own names (the generated
    # file let them in; the agents come back on their reconnect back-off).
    async def on_the_broker() -> bool:
        log = await compose.run("logs", "--no-color", "mosquitto")
        return all(f"u'{user}'" in log for user in [CONTROL_PLANE_USER, *agents.values()])

    await eventually(on_the_broker, 120, 1)

    # What the images promise: not root, read-only root filesystem, a health check that passes.
    for service in ("control-plane", "agent-a", "agent-b"):
        info = await stack.inspect(service)
        assert info["HostConfig"]["ReadonlyRootfs"] is True
        assert info["Config"]["User"] not in ("", "0", "root")

        async def healthy(service: str = service) -> bool:
            return (await stack.inspect(service))["State"]["Health"]["Status"] == "healthy"

        await eventually(healthy, 90, 1)

    # Down (containers and network gone, volumes kept) and up again: nothing lost.
    await compose.run("down")
    assert (await compose.run("ps", "-q")).strip() == ""
    compose.env["MODELFLEET_ENROLL_TOKEN"] = ""  # they must not need it any more
    await compose.run("up", "-d")
    await eventually(stack.healthy, 120, 0.5)
    again = {a["labels"]["site"]: a["id"] for a in (await stack.api("/agents"))["agents"]}
    assert again == agents
    assert (await stack.api(f"/rollouts/{rollout}"))["state"] == "completed"
    assert await stack.compare() == before

    async def serving(site: str) -> bool:
        try:
            return len(await stack.infer(site, 1)) == 1
        except (aiohttp.ClientError, AssertionError):
            return False

    for site in SITES:
        await eventually(lambda site=site: serving(site), 90, 0.5)
        await stack.infer(site, 20)
    await eventually(lambda: counted({s: before[s] + 20 for s in SITES}), 60, 0.5)
