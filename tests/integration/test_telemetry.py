"""OpenTelemetry end to end: a real control plane and real agents export OTLP/HTTP to a real
receiver on loopback, and one trace spans a rollout's decision to an agent's activation."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import pytest

from control_plane.db.engine import Database
from control_plane.db.models import DesiredStateRow
from control_plane.security.keys import load_or_create_signing_key
from protocol.desired import DesiredModel, DesiredState
from protocol.otlp import TelemetryConfig
from tests.support.agents import enroll_agent, eventually, infer, running_agent, serving
from tests.support.broker import Broker, mqtt_config
from tests.support.bundles import Publisher, iris_bundle
from tests.support.control_plane import ControlPlane, cp_config, start_control_plane
from tests.support.fleet import Fleet
from tests.support.otlp import OtlpReceiver, SpanRecord

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
CP_SERVICE = "cp-under-test"


def telemetry(receiver: OtlpReceiver, service: str, sample: float = 0.0) -> TelemetryConfig:
    return TelemetryConfig(
        endpoint=receiver.url,
        service_name=service,
        resource={"service.name": service},
        export_interval_s=0.2,
        inference_sample=sample,
    )


async def traced_control_plane(
    tmp_path: Path, publisher: Publisher, receiver: OtlpReceiver, base: object = None
) -> ControlPlane:
    config = base or cp_config(tmp_path, f"sqlite:///{tmp_path / 'cp.db'}", publisher)
    config = dataclasses.replace(
        config,  # type: ignore[type-var]
        controller_interval_s=0.2,
        telemetry=telemetry(receiver, CP_SERVICE),
    )
    return await start_control_plane(config)


def decision_of(receiver: OtlpReceiver, activation: SpanRecord) -> SpanRecord | None:
    """The control plane's rollout decision the activation descends from, if it arrived."""
    for span in receiver.ancestors(activation):
        if span.service == CP_SERVICE and span.name.startswith("rollout."):
            return span
    return None


async def test_one_trace_from_the_rollout_decision_to_the_agent_process_activation(
    tmp_path: Path, publisher: Publisher, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with OtlpReceiver() as receiver:
        cp = await traced_control_plane(tmp_path, publisher, receiver)
        # The agent process takes the standard variables (and --otlp-endpoint from its flags).
        monkeypatch.setenv("OTEL_SERVICE_NAME", "agent-under-test")
        monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=test,site=lab%201")
        fleet = Fleet(cp, tmp_path / "fleet", ("--otlp-endpoint", receiver.url))
        (tmp_path / "fleet").mkdir()
        try:
            r = await cp.push(iris_bundle(publisher.key, "1.0.0"))
            assert r.status in (200, 201), await r.text()
            [agent] = await fleet.add(1, "lab", extra=("--otlp-interval", "0.2"))
            rollout = await cp.rollout("1.0.0", "site=lab")

            def activation() -> SpanRecord | None:
                for span in receiver.by_name("update.activate", "agent-under-test"):
                    if decision_of(receiver, span) is not None:
                        return span
                return None

            try:
                span = await eventually(activation, 30)
            except AssertionError:
                names = sorted({(s.service, s.name) for s in receiver.spans})
                raise AssertionError(f"spans: {names}\n{fleet.logs()}") from None
            decision = decision_of(receiver, span)
            assert decision is not None
            print("\n" + receiver.tree(span.trace_id))
            # One trace: the decision (control plane) -> the desired state it signed (control
            # plane) -> the agent's activation (agent process), and verify/load below it.
            assert span.trace_id == decision.trace_id
            signed = receiver.span(span.parent_id)
            assert signed is not None and signed.name == "desired_state.sign"
            assert signed.service == CP_SERVICE
            assert signed.attributes["modelfleet.agent.id"] == agent.agent_id
            assert decision.attributes["modelfleet.rollout.id"] == rollout["id"]
            assert decision.attributes["modelfleet.rollout.version"] == "1.0.0"
            assert decision.attributes["modelfleet.rollout.stage"] == 1
            assert span.attributes["modelfleet.version"] == "1.0.0"
            children = {s.name for s in receiver.spans if s.parent_id == span.span_id}
            assert {"update.verify", "update.load"} <= children
            fetch = receiver.by_name("update.fetch", "agent-under-test")
            assert any(f.parent_id == signed.span_id for f in fetch)
            # The rollout's start is a decision span too, with the same attributes.
            started = receiver.by_name("rollout.started", CP_SERVICE)
            assert started and started[0].attributes["modelfleet.rollout.id"] == rollout["id"]

            # HTTP server spans are named by route pattern, never by the raw path.
            def http() -> set[str]:
                return {s.name for s in receiver.spans if s.kind == 2 and s.service == CP_SERVICE}

            # A long-poll's span ends (and is sent) when the poll answers.
            await eventually(lambda: "GET /api/v1/agents/{id}/desired" in http(), 20)
            assert not any(agent.agent_id in name for name in http())

            # Metrics from both: the agent's inference and update figures, the control plane's
            # requests, rollout transitions, agents by state and ingest.
            for _ in range(5):
                status, _ = await infer(agent.port)
                assert status == 200

            def agent_requests() -> float:
                points = receiver.metric("modelfleet_inference_requests", "agent-under-test")
                return max((p.value for p in points if p.attributes["model"] == "iris"), default=0)

            await eventually(lambda: agent_requests() >= 5, 20)
            point = receiver.metric("modelfleet_inference_requests", "agent-under-test")[-1]
            assert point.attributes == {"model": "iris", "version": "1.0.0"}
            assert point.resource["deployment.environment"] == "test"
            assert point.resource["site"] == "lab 1"
            updates = receiver.metric("modelfleet_agent_updates", "agent-under-test")
            assert any(p.attributes["outcome"] == "activated" for p in updates)
            buckets = receiver.metric(
                "modelfleet_inference_latency_seconds_bucket", "agent-under-test"
            )
            assert any(p.attributes["le"] == "+Inf" and p.value >= 5 for p in buckets)

            def cp_figures() -> bool:
                names = {p.metric for p in receiver.points if p.service == CP_SERVICE}
                return {
                    "modelfleet_http_requests",
                    "modelfleet_rollout_transitions",
                    "modelfleet_agents",
                    "modelfleet_ingest_transactions",
                    "http.server.request.duration",
                } <= names

            await eventually(cp_figures, 20)
            reqs = receiver.metric("modelfleet_http_requests", CP_SERVICE)
            assert any(
                p.attributes == {"method": "POST", "route": "/api/v1/rollouts", "status": "201"}
                for p in reqs
            )
            kinds = {
                p.attributes["kind"]
                for p in receiver.metric("modelfleet_rollout_transitions", CP_SERVICE)
            }
            assert "started" in kinds
            states = {
                p.attributes["state"]: p.value
                for p in receiver.metric("modelfleet_agents", CP_SERVICE)
            }
            assert set(states) >= {"online", "offline"}
            assert receiver.bad_requests == 0
        finally:
            await fleet.stop()
            await cp.client.close()


async def test_the_trace_reaches_an_agent_over_mqtt(
    tmp_path: Path, publisher: Publisher, broker: Broker
) -> None:
    async with OtlpReceiver() as receiver:
        cp = await traced_control_plane(
            tmp_path, publisher, receiver, mqtt_config(tmp_path, publisher, broker)
        )
        try:
            await cp.push(iris_bundle(publisher.key, "1.0.0"))
            await enroll_agent(cp, tmp_path / "a", {"site": "x"})
            await broker.load_passwords(cp)
            async with running_agent(
                tmp_path / "a",
                poll_interval_s=3600,  # pushed over MQTT, never polled
                telemetry=telemetry(receiver, "mqtt-agent"),
            ) as agent:
                await eventually(lambda: agent.mqtt is not None and agent.mqtt.connected, 10)
                await cp.rollout("1.0.0", "site=x")
                await eventually(lambda: serving(agent, "iris", "1.0.0"), 20)

                def activation() -> SpanRecord | None:
                    for span in receiver.by_name("update.activate", "mqtt-agent"):
                        if decision_of(receiver, span) is not None:
                            return span
                    return None

                span = await eventually(activation, 20)
                assert decision_of(receiver, span).trace_id == span.trace_id  # type: ignore[union-attr]
        finally:
            await cp.client.close()


async def test_a_malformed_traceparent_is_ignored_and_the_agent_still_activates(
    tmp_path: Path, publisher: Publisher
) -> None:
    async with OtlpReceiver() as receiver:
        cp = await traced_control_plane(tmp_path, publisher, receiver)
        try:
            r = await cp.push(iris_bundle(publisher.key, "1.0.0"))
            digest = (await r.json())["manifestDigest"]
            ident = await enroll_agent(cp, tmp_path / "a", {"site": "x"})
            # A document signed by the control plane's own key whose trace context is garbage:
            # the agent must take the order and drop only the trace context.
            key = load_or_create_signing_key(cp.config.data_dir / "control-plane.key")
            now = datetime.now(UTC)
            bad = "00-" + "Z" * 32 + "-" + "0" * 16 + "-01"
            model = DesiredModel("iris", "1.0.0", digest, traceparent=bad)
            db = Database(cp.config.database_url)
            try:
                async with db.write() as s:
                    row = await s.get(DesiredStateRow, ident.agent_id)
                    generation = (row.generation if row else 0) + 1
                    # The full lifetime, so the long-poll does not sign it again before answering.
                    ttl = timedelta(seconds=cp.config.desired_ttl_s)
                    state = DesiredState(ident.agent_id, generation, now, now + ttl, (model,))
                    assert state.to_json()["models"][0]["traceparent"] == bad
                    envelope = state.sign(key).to_bytes().decode()
                    if row is None:
                        s.add(
                            DesiredStateRow(
                                agent_id=ident.agent_id,
                                generation=generation,
                                document=state.to_json(),
                                envelope=envelope,
                                updated_at=now,
                            )
                        )
                    else:
                        row.generation, row.document, row.envelope = (
                            generation,
                            state.to_json(),
                            envelope,
                        )
            finally:
                await db.close()
            async with running_agent(
                tmp_path / "a", telemetry=telemetry(receiver, "plain-agent", sample=1.0)
            ) as agent:
                await eventually(lambda: serving(agent, "iris", "1.0.0"), 20)
                assert agent.last_error is None
                assert agent.state.highest_generation == generation  # ours, not a re-signed one
                span = await eventually(
                    lambda: next(iter(receiver.by_name("update.activate", "plain-agent")), None),
                    20,
                )
                # A trace of its own: not a child of the garbage, nor of anything else.
                assert span.parent_id == ""
                assert span.trace_id != "0" * 32
                # Every request traced (sample 1): a child of the caller's traceparent when well
                # formed, a trace of its own when not.
                caller = "00-" + "1" * 32 + "-" + "2" * 16 + "-01"
                for header in (caller, "00-garbage"):
                    async with aiohttp.ClientSession() as client:
                        url = f"http://127.0.0.1:{agent.serve_port}/v2/models/iris/infer"
                        body = {
                            "inputs": [
                                {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1] * 4}
                            ]
                        }
                        async with client.post(
                            url, json=body, headers={"traceparent": header}
                        ) as r:
                            assert r.status == 200, await r.text()

                def inference() -> list[SpanRecord]:
                    found = receiver.by_name("inference", "plain-agent")
                    return found if len(found) >= 2 else []

                spans = await eventually(inference, 20)
                child = [s for s in spans if s.trace_id == "1" * 32]
                assert len(child) == 1 and child[0].parent_id == "2" * 16
                assert child[0].attributes["modelfleet.version"] == "1.0.0"
                assert any(s.parent_id == "" for s in spans)
        finally:
            await cp.client.close()


OFF_SCRIPT = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path

    from agent.config import AgentConfig
    from agent.daemon import Agent
    from control_plane.config import ServerConfig
    from tests.support.agents import enroll_agent, eventually, infer, serving
    from tests.support.bundles import iris_bundle, make_publisher
    from tests.support.control_plane import start_control_plane

    async def main(root: Path) -> None:
        publisher = make_publisher(root)
        cp = await start_control_plane(
            ServerConfig(
                data_dir=root / "cp",
                trusted_publisher_files=(publisher.pub_path,),
                controller_interval_s=0.2,
                long_poll_recheck_s=0.5,
            )
        )
        try:
            await cp.push(iris_bundle(publisher.key, "1.0.0"))
            await enroll_agent(cp, root / "a", {"site": "x"})
            config = AgentConfig(state_dir=root / "a", serve_port=0, poll_wait_s=2.0, drain_s=2.0)
            async with Agent(config) as agent:
                await cp.rollout("1.0.0", "site=x")
                await eventually(lambda: serving(agent, "iris", "1.0.0"), 20)
                status, _ = await infer(agent.serve_port)
                assert status == 200
        finally:
            await cp.client.close()
        loaded = sorted(m for m in sys.modules if m.split(".")[0] == "opentelemetry")
        print("opentelemetry modules:", loaded)
        assert not loaded

    asyncio.run(main(Path(sys.argv[1])))
    """
)


def test_telemetry_off_imports_nothing_of_opentelemetry(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    done = subprocess.run(
        [sys.executable, "-c", OFF_SCRIPT, str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "opentelemetry modules: []" in done.stdout


async def test_operator_decisions_are_spans_and_a_rollback_carries_its_own_trace(
    tmp_path: Path, publisher: Publisher
) -> None:
    async with OtlpReceiver() as receiver:
        cp = await traced_control_plane(tmp_path, publisher, receiver)
        try:
            await cp.push(iris_bundle(publisher.key, "1.0.0"))
            await cp.push(iris_bundle(publisher.key, "2.0.0", seed=1))
            agents = [(await cp.enroll({"site": "x"}))["agentId"] for _ in range(2)]
            await cp.rollout("1.0.0", "site=x")
            r = await cp.rollout(
                "2.0.0", "site=x", stages=[{"count": 1, "soak": "1h"}, {"percent": 100}]
            )

            async def command(action: str, **body: object) -> None:
                resp = await cp.call("POST", f"/rollouts/{r['id']}/{action}", json=body)
                assert resp.status == 200, await resp.text()

            await command("pause")
            await command("abort", rollback=True)

            def decision(kind: str) -> SpanRecord | None:
                return next(
                    (
                        s
                        for s in receiver.by_name(f"rollout.{kind}", CP_SERVICE)
                        if s.attributes["modelfleet.rollout.id"] == r["id"]
                    ),
                    None,
                )

            paused = await eventually(lambda: decision("paused"), 20)
            assert paused.attributes["modelfleet.rollout.stage"] == 1
            assert paused.attributes["modelfleet.rollout.state"] == "paused"
            aborted = await eventually(lambda: decision("aborted"), 20)
            assert aborted.attributes["modelfleet.rollout.state"] == "rolled_back"
            # Operator decisions are children of the request that made them.
            request = receiver.span(aborted.parent_id)
            assert request is not None
            assert request.name == "POST /api/v1/rollouts/{id}/{action}"

            # The one moved agent goes back to 1.0.0 under the abort's trace; the other agent's
            # document did not change, so it was not signed again.
            def signed() -> list[SpanRecord]:
                return [
                    s
                    for s in receiver.by_name("desired_state.sign")
                    if s.parent_id == aborted.span_id
                ]

            [sign] = await eventually(signed, 20)
            assert sign.attributes["modelfleet.agent.id"] in agents
            assert sign.trace_id == aborted.trace_id
        finally:
            await cp.client.close()
