"""Remote diagnostics end to end with a real control plane and a real agent: logs and a support
bundle fetched over HTTP, and from an agent reachable only through MQTT (its HTTP control plane
address is dead), redacted and size-capped; hostile commands refused by the agent, hostile
answers refused by the control plane, its MQTT bridge going on."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import logging
import os
import signal
import sys
import tarfile
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.daemon import Agent
from agent.storage.state import StateDir
from agent.storage.statefile import write_json
from control_plane.mqtt.bridge import MqttBridge
from control_plane.state import MQTT
from protocol.commands import Command, answer_chunks, chunk_properties
from protocol.dsse import generate_private_key, load_private_key
from protocol.topics import agent_topic
from tests.integration.test_access import make_token
from tests.support.agents import enroll_agent, eventually, running_agent
from tests.support.broker import CP_PASSWORD, Broker, mqtt_config
from tests.support.bundles import Publisher
from tests.support.control_plane import ControlPlane, assert_error, start_control_plane
from tests.support.fleet import MODELFLEET, free_port, run_cli

pytestmark = pytest.mark.slow

SECRET = "mfc_" + "s3cr3t" * 6
log = logging.getLogger("modelfleet.agent.test")


async def ask(
    cp: ControlPlane, agent_id: str, token: str, kind: str, **body: Any
) -> tuple[dict[str, Any], bytes | None]:
    """Issue a command, wait for its answer, fetch it: (final state, answer or None)."""
    r = await cp.call("POST", f"/agents/{agent_id}/commands", token, json={"kind": kind, **body})
    assert r.status == 202, await r.text()
    cid = (await r.json())["commandId"]
    base = f"/agents/{agent_id}/commands/{cid}"

    last: dict[str, Any] = {}

    async def answered() -> dict[str, Any] | None:
        r = await cp.call("GET", base, token, params={"wait": "5"})
        last.update(await r.json())
        return last if last["state"] not in ("pending", "delivered") else None

    try:
        state = await eventually(answered, 30)
    except AssertionError:
        raise AssertionError(f"no answer to {kind} {body}: {last}") from None
    if state["state"] != "answered":
        return state, None
    r = await cp.call("GET", f"{base}/answer", token)
    assert r.status == 200, await r.text()
    return state, await r.read()


def members(bundle: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(bundle)) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]


async def test_logs_and_a_bundle_over_http(
    tmp_path: Path, publisher: Publisher, cp: ControlPlane
) -> None:
    ident = await enroll_agent(cp, tmp_path / "a", {"site": "x"})
    diag = (await make_token(cp, ["agents:diagnose"]))["token"]
    async with running_agent(tmp_path / "a") as agent:
        log.warning("planted: Authorization: Bearer %s and password=hunter2 over http", SECRET)
        state, data = await ask(cp, ident.agent_id, diag, "logs", sinceSeconds=300)
        assert state["deliveredVia"] == "http" and state["answeredVia"] == "http"
        assert data is not None
        text = data.decode()
        assert "planted: Authorization:" in text and "over http" in text
        assert SECRET not in text and "hunter2" not in text and "[redacted]" in text

        state, bundle = await ask(cp, ident.agent_id, diag, "diagnose", maxBytes=64 * 1024)
        assert bundle is not None and len(bundle) <= 64 * 1024
        got = members(bundle)
        assert {"support/logs.txt", "support/facts.json", "support/host.json"} <= set(got)
        assert "support/state/identity.json" in got
        everything = b"".join(got.values())
        assert SECRET.encode() not in everything and ident.credential.encode() not in everything
        facts = json.loads(got["support/facts.json"])
        assert facts["agentId"] == ident.agent_id
        # The agent counts an answer once the upload's reply reaches it, which may be after
        # the operator has read the stored answer.
        await eventually(lambda: agent.commands.answered == 2, 10)
        assert agent.commands.refused == 0


@asynccontextmanager
async def mqtt_only_agent(
    tmp_path: Path, cp: ControlPlane, broker: Broker
) -> AsyncIterator[tuple[Agent, str]]:
    """An agent whose control plane is reachable only through the broker: its HTTP address
    is a closed loopback port (an agent behind NAT whose only way out is MQTT)."""
    ident = await enroll_agent(cp, tmp_path / "a", {"site": "x"})
    await broker.load_passwords(cp)
    dirs = StateDir(tmp_path / "a")
    dead = f"http://127.0.0.1:{free_port()}"
    write_json(dirs.identity_path, dataclasses.asdict(dataclasses.replace(ident, server=dead)))
    async with running_agent(tmp_path / "a", poll_interval_s=3600) as agent:
        await eventually(lambda: agent.mqtt is not None and agent.mqtt.connected, 15)
        yield agent, ident.agent_id


def bridge_of(cp: ControlPlane) -> MqttBridge:
    bridge = cp.client.app[MQTT]
    assert isinstance(bridge, MqttBridge)
    return bridge


async def test_logs_and_a_bundle_from_an_agent_reachable_only_through_mqtt(
    tmp_path: Path, publisher: Publisher, broker: Broker, db_url: str
) -> None:
    cp = await start_control_plane(mqtt_config(tmp_path, publisher, broker, db_url=db_url))
    try:
        diag = (await make_token(cp, ["agents:diagnose"]))["token"]
        reader = (await make_token(cp, ["fleet:read"]))["token"]
        async with mqtt_only_agent(tmp_path, cp, broker) as (agent, agent_id):
            await eventually(lambda: bridge_of(cp).connected.is_set(), 10)
            log.warning("planted over mqtt: token=%s", SECRET)
            # Enough lines that the answer travels in several chunks (warnings: the test
            # process logs nothing below, where the agent's command line sets INFO).
            for i in range(2500):
                log.warning("filler line %04d %s", i, "x" * 160)

            state, data = await ask(cp, agent_id, diag, "logs", maxBytes=300_000)
            assert state["deliveredVia"] == "mqtt" and state["answeredVia"] == "mqtt"
            assert data is not None and 200_000 < len(data) <= 300_000  # several chunks, capped
            text = data.decode()
            assert "filler line 2499" in text and SECRET not in text
            # The cap drops the oldest lines: the planted one is gone, the newest are there.
            state, data = await ask(cp, agent_id, diag, "logs", maxBytes=4096)
            assert data is not None and 0 < len(data) <= 4096

            log.warning("planted again over mqtt: password=%s", SECRET)
            state, bundle = await ask(cp, agent_id, diag, "diagnose", maxBytes=128 * 1024)
            assert state["answeredVia"] == "mqtt" and bundle is not None
            assert len(bundle) <= 128 * 1024
            got = members(bundle)
            assert (
                "planted again over mqtt: password=[redacted]" in got["support/logs.txt"].decode()
            )
            assert SECRET.encode() not in b"".join(got.values())
            identity = json.loads(got["support/state/identity.json"])
            assert identity["credential"] == "[redacted]"

            # A bundle that cannot fit is the agent's stated failure, not a truncated file.
            state, none = await ask(cp, agent_id, diag, "diagnose", maxBytes=1024)
            assert state["state"] == "failed" and "1024 bytes" in state["error"] and none is None

            # Without the scope: 403 naming it, and nothing issued.
            r = await cp.call("POST", f"/agents/{agent_id}/commands", reader, json={"kind": "logs"})
            body = await assert_error(r, 403, "insufficient_scope", "scope")
            assert "agents:diagnose" in body["error"]["message"]

            # Audited: each issue, each fetch, each answer that came over MQTT.
            events = (await (await cp.call("GET", "/audit")).json())["events"]
            actions = [e["action"] for e in events if e["outcome"] in (200, 202)]
            assert actions.count("POST /api/v1/agents/{id}/commands") == 4
            assert actions.count("GET /api/v1/agents/{id}/commands/{cid}/answer") == 3
            assert actions.count("MQTT commands/answer") == 4
            refused = [e for e in events if e["outcome"] == 403]
            assert refused and refused[-1]["action"] == "POST /api/v1/agents/{id}/commands"
            assert bridge_of(cp).malformed == 0 and agent.commands.refused == 0
    finally:
        await cp.client.close()


def signed(key: Any, agent_id: str, **kw: Any) -> bytes:
    now = datetime.now(UTC)
    fields: dict[str, Any] = {
        "agent_id": agent_id,
        "command_id": str(uuid.uuid4()),
        "kind": "logs",
        "issued_at": now,
        "expires_at": now + timedelta(minutes=5),
        "max_bytes": 4096,
        **kw,
    }
    return Command(**fields).sign(key).to_bytes()


async def test_hostile_commands_and_answers_over_mqtt(
    tmp_path: Path, publisher: Publisher, broker: Broker, db_url: str
) -> None:
    cp = await start_control_plane(mqtt_config(tmp_path, publisher, broker, db_url=db_url))
    try:
        cp_key = load_private_key((cp.config.data_dir / "control-plane.key").read_bytes())
        async with mqtt_only_agent(tmp_path, cp, broker) as (agent, agent_id):
            bridge = bridge_of(cp)
            await eventually(lambda: bridge.connected.is_set(), 10)
            state, first = await ask(cp, agent_id, cp.token, "logs")
            assert first is not None
            # What the broker or someone holding the control plane's broker password could
            # send the agent: each refused by the agent, none answered, the loop goes on.
            topic = agent_topic(agent_id, "commands", broker.prefix)
            now = datetime.now(UTC)
            hostile = [
                signed(generate_private_key(), agent_id),  # forged: not the control plane's key
                signed(
                    cp_key,
                    agent_id,
                    issued_at=now - timedelta(minutes=10),
                    expires_at=now - timedelta(minutes=1),
                ),  # expired
                signed(cp_key, str(uuid.uuid4())),  # another agent's
                b"{not json",
            ]
            repeat = signed(cp_key, agent_id)
            async with broker.client("modelfleet-control-plane", CP_PASSWORD) as c:
                for payload in hostile:
                    await c.publish(topic, payload, qos=1)
                await c.publish(topic, repeat, qos=1)
                await eventually(lambda: agent.commands.refused == 4, 10)
                await eventually(lambda: agent.commands.answered == 2, 10)  # `repeat` answered once
                await c.publish(topic, repeat, qos=1)  # replayed
                await eventually(lambda: agent.commands.refused == 5, 10)
            assert "already carried out" in (agent.commands.last_refusal or "")
            assert agent.commands.answered == 2

            # What a compromised agent could send the control plane on its own answer topic.
            mqtt = agent.identity.mqtt or {}
            answer_topic = agent_topic(agent_id, "commands/answer", broker.prefix)
            r = await cp.call(
                "POST", f"/agents/{agent_id}/commands", json={"kind": "logs", "maxBytes": 2048}
            )
            waiting = (await r.json())["commandId"]
            await eventually(lambda: _state(cp, agent_id, waiting, ("delivered", "answered")), 10)
            before = bridge.malformed
            async with broker.client(mqtt["username"], mqtt["password"]) as c:

                async def send(chunks: list[Any], payload: bytes | None = None) -> None:
                    for ch in chunks:
                        props = Properties(PacketTypes.PUBLISH)
                        props.UserProperty = chunk_properties(ch)
                        body = ch.data if payload is None else payload
                        await c.publish(answer_topic, body, qos=1, properties=props)

                await c.publish(answer_topic, b"no properties at all", qos=1)
                await send(answer_chunks(str(uuid.uuid4()), b"unsolicited"))
                await send(answer_chunks(waiting, b"y" * 5000))  # over its maxBytes (2048)
                await send(answer_chunks(waiting, b"right size"), payload=b"wrong size")  # digest
                await eventually(lambda: bridge.malformed >= before + 4, 10)
            # Nothing was stored for the command by the garbage; the bridge still works.
            r = await cp.call("GET", f"/agents/{agent_id}/commands/{waiting}")
            st = await r.json()
            assert st["answeredVia"] in (None, "mqtt")
            if st["state"] == "answered":  # the agent's own answer may have come first
                data = await (
                    await cp.call("GET", f"/agents/{agent_id}/commands/{waiting}/answer")
                ).read()
                assert b"wrong bytes" not in data and b"y" * 5000 not in data
            state, after = await ask(cp, agent_id, cp.token, "logs")
            assert state["answeredVia"] == "mqtt" and after is not None
    finally:
        await cp.client.close()


async def _state(cp: ControlPlane, agent_id: str, cid: str, states: tuple[str, ...]) -> bool:
    r = await cp.call("GET", f"/agents/{agent_id}/commands/{cid}")
    return (await r.json())["state"] in states


async def test_a_restart_does_not_reopen_a_replay(
    tmp_path: Path, publisher: Publisher, broker: Broker
) -> None:
    cp = await start_control_plane(mqtt_config(tmp_path, publisher, broker))
    try:
        cp_key = load_private_key((cp.config.data_dir / "control-plane.key").read_bytes())
        async with mqtt_only_agent(tmp_path, cp, broker) as (agent, agent_id):
            envelope = signed(cp_key, agent_id)
            topic = agent_topic(agent_id, "commands", broker.prefix)
            async with broker.client("modelfleet-control-plane", CP_PASSWORD) as c:
                await c.publish(topic, envelope, qos=1)
            await eventually(lambda: agent.commands.answered == 1, 10)
        async with running_agent(tmp_path / "a", poll_interval_s=3600) as again:
            await eventually(lambda: again.mqtt is not None and again.mqtt.connected, 15)
            async with broker.client("modelfleet-control-plane", CP_PASSWORD) as c:
                await c.publish(topic, envelope, qos=1)
            await eventually(lambda: again.commands.refused == 1, 10)
            assert "already carried out" in (again.commands.last_refusal or "")
            assert again.commands.answered == 0
    finally:
        await cp.client.close()


# Runs argv[1:] with SIGINT at its default disposition (see the --follow test).
WITH_SIGINT = (
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
    "os.execv(sys.argv[1], sys.argv[1:])"
)


async def test_the_cli_prints_logs_follows_them_and_writes_a_bundle(
    tmp_path: Path, publisher: Publisher, broker: Broker
) -> None:
    cp = await start_control_plane(mqtt_config(tmp_path, publisher, broker))
    try:
        diag = (await make_token(cp, ["agents:diagnose"]))["token"]
        reader = (await make_token(cp, ["fleet:read"]))["token"]
        silent = await cp.enroll()  # enrolled, never running: it cannot answer
        async with mqtt_only_agent(tmp_path, cp, broker) as (_, agent_id):
            log.warning("cli planted: Authorization: Bearer %s", SECRET)
            opts = ("--server", cp.url, "--token", diag)
            p = await run_cli("agents", "logs", agent_id, "--since", "5m", *opts)
            assert p.returncode == 0, p.stderr
            assert "cli planted: Authorization: [redacted]" in p.stdout and SECRET not in p.stdout

            out = tmp_path / "bundle.tar.gz"
            p = await run_cli("agents", "diagnose", agent_id, "--out", out, *opts)
            assert p.returncode == 0, p.stderr
            assert p.stdout.startswith(f"wrote {out}: ") and "via mqtt" in p.stdout
            assert "support/logs.txt" in p.stdout and "support/facts.json" in p.stdout
            assert "support/logs.txt" in members(out.read_bytes())

            # --follow prints new lines as they come, each once, until interrupted.
            # Ctrl-C as a terminal sends it. A test run started in the background by a
            # non-interactive shell (CI's may be) inherits SIGINT ignored, and so would the
            # CLI, which would then never see it: the CLI is started with SIGINT restored.
            follow = await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                WITH_SIGINT,
                MODELFLEET,
                *("agents", "logs", agent_id, "--since", "1m", "--follow", "--interval", "0.3"),
                *opts,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env={**os.environ, "PYTHONFAULTHANDLER": "1"},
            )
            assert follow.stdout is not None
            printed: list[str] = []

            async def until(marker: str) -> None:
                async with asyncio.timeout(30):
                    while not any(marker in line for line in printed):
                        printed.append((await follow.stdout.readline()).decode().rstrip("\n"))

            try:
                await until("cli planted")
                for i in range(3):
                    log.warning("followed line %d", i)
                    await until(f"followed line {i}")
                log.warning("followed line last")
                await until("followed line last")
            finally:
                # Interrupted, it exits; its pipes are read to the end meanwhile, so a CLI
                # that printed more than a pipe holds is never left blocked in a write.
                follow.send_signal(signal.SIGINT)
                try:
                    rest, _ = await asyncio.wait_for(follow.communicate(), 20)
                except TimeoutError:  # where it is stuck (PYTHONFAULTHANDLER), then fail
                    follow.send_signal(signal.SIGABRT)
                    _, err = await follow.communicate()
                    pytest.fail(f"agents logs --follow ignored SIGINT: {err.decode()[-4000:]}")
                finally:
                    if follow.returncode is None:
                        follow.kill()
            printed += rest.decode().splitlines()
            lines = [line for line in printed if line]
            assert len(lines) == len(set(lines)), [x for x in lines if lines.count(x) > 1]

            # An agent that does not answer: a clear error once the timeout passes.
            p = await run_cli("agents", "logs", silent["agentId"], "--timeout", "2", *opts)
            assert p.returncode == 1 and "did not answer within 2s" in p.stderr, p.stderr
            # A token without the scope: refused, the scope named.
            p = await run_cli("agents", "logs", agent_id, "--server", cp.url, "--token", reader)
            assert p.returncode == 1 and "agents:diagnose" in p.stderr, p.stderr
    finally:
        await cp.client.close()


async def test_two_replicas_store_an_mqtt_answer_once_and_neither_calls_it_malformed(
    tmp_path: Path, publisher: Publisher, broker: Broker, pg_url: str
) -> None:
    """Every replica takes every answer chunk (the chunks of one answer must meet in one
    replica), so each reassembles each answer: one stores it, and the others, finding it
    stored, must not count a healthy answer as a malformed message (an alert in /metrics)."""
    config = mqtt_config(tmp_path, publisher, broker, db_url=pg_url)
    first = await start_control_plane(config)
    second = await start_control_plane(dataclasses.replace(config, port=config.port + 1))
    try:
        diag = (await make_token(first, ["agents:diagnose"]))["token"]
        async with mqtt_only_agent(tmp_path, first, broker) as (agent, agent_id):
            bridges = [bridge_of(first), bridge_of(second)]
            await eventually(lambda: all(b.connected.is_set() for b in bridges), 10)
            for i in range(1500):
                log.warning("replica filler %04d %s", i, "x" * 160)
            for kind, body in (("logs", {"maxBytes": 300_000}), ("diagnose", {})):
                state, data = await ask(first, agent_id, diag, kind, **body)
                assert state["answeredVia"] == "mqtt" and data is not None
            # Both replicas have finished with both answers (each one's assemblies empty).
            await eventually(lambda: sum(b.answers_stored for b in bridges) == 2, 10)
            await eventually(lambda: not any(b.assemblies for b in bridges), 10)
            # ...and each answer was also found stored already, by the replica that lost.
            await eventually(lambda: sum(b.answers_found_stored for b in bridges) >= 2, 10)
            assert [b.malformed for b in bridges] == [0, 0]
            assert agent.commands.refused == 0
    finally:
        await second.client.close()
        await first.client.close()


async def test_a_command_issued_before_an_mqtt_only_agent_first_connects_reaches_it(
    tmp_path: Path, publisher: Publisher, broker: Broker
) -> None:
    """Published while the agent had no session on the broker, the command was lost there;
    the agent's presence coming online has the bridge publish what still waits for it."""
    cp = await start_control_plane(mqtt_config(tmp_path, publisher, broker))
    try:
        ident = await enroll_agent(cp, tmp_path / "a", {"site": "x"})
        await broker.load_passwords(cp)
        dirs = StateDir(tmp_path / "a")
        dead = f"http://127.0.0.1:{free_port()}"
        write_json(dirs.identity_path, dataclasses.asdict(dataclasses.replace(ident, server=dead)))
        await eventually(lambda: bridge_of(cp).connected.is_set(), 10)
        path = f"/agents/{ident.agent_id}/commands"
        r = await cp.call("POST", path, json={"kind": "logs", "ttlSeconds": 120})
        assert r.status == 202, await r.text()
        cid = (await r.json())["commandId"]
        async with running_agent(tmp_path / "a", poll_interval_s=3600) as agent:
            await eventually(lambda: _state(cp, ident.agent_id, cid, ("answered",)), 30)
            state = await (await cp.call("GET", f"{path}/{cid}")).json()
            assert state["deliveredVia"] in (None, "mqtt") and state["answeredVia"] == "mqtt"
            # The agent counts it once its publish is acknowledged, which may come after the
            # control plane stored the answer.
            await eventually(lambda: agent.commands.answered == 1, 10)
    finally:
        await cp.client.close()
