"""The control plane's GET /metrics, parsed by prometheus_client's own parser: requests by
route and status, ingest, rollouts, agents, the MQTT bridge, the pool, webhooks; its access
rule; and the separate listener without authentication."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from protocol.reports import ModelStatus, StatusReport
from tests.support.agents import eventually
from tests.support.broker import Broker, mqtt_config
from tests.support.bundles import Publisher, iris_bundle
from tests.support.control_plane import ControlPlane, assert_error, start_control_plane
from tests.support.fleet import free_port

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    """Every sample by (name, sorted labels), read by Prometheus' reference parser."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def scrape(cp: ControlPlane, token: str | None = None) -> Samples:
    r = await cp.client.get("/metrics", headers={"Authorization": f"Bearer {token or cp.token}"})
    assert r.status == 200, await r.text()
    assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return parse(await r.text())


async def test_metrics_count_requests_ingest_rollouts_and_agents(
    cp: ControlPlane, publisher: Publisher
) -> None:
    before = await scrape(cp)
    assert before[("modelfleet_agents", (("state", "online"),))] == 0
    assert before[("modelfleet_db_sessions_max", ())] >= 1

    agent = await cp.enroll({"site": "a"})
    agent_id, credential = agent["agentId"], agent["credential"]
    active = ModelStatus("iris", "1.0.0", "sha256:" + "e" * 64, "active")
    for seq in (1, 2):
        doc = StatusReport(agent_id, 1, datetime.now(UTC), (active,), epoch=1, seq=seq).to_json()
        r = await cp.call("POST", f"/agents/{agent_id}/status", token=credential, json=doc)
        assert r.status == 200
    r = await cp.call("POST", f"/agents/{agent_id}/status", token=credential, json={"x": 1})
    assert r.status == 400
    assert (await cp.push(iris_bundle(publisher.key))).status == 201
    rollout = await cp.rollout(selector="site=nowhere")

    async def rolled() -> Samples | None:
        m = await scrape(cp)
        return m if m.get(("modelfleet_rollouts", (("state", "completed"),))) == 1 else None

    m = await eventually(rolled, within_s=15)
    status_route = (("method", "POST"), ("route", "/api/v1/agents/{id}/status"))
    assert m[("modelfleet_http_requests_total", (*status_route, ("status", "200")))] == 2
    assert m[("modelfleet_http_requests_total", (*status_route, ("status", "400")))] == 1
    timed = ("method", "POST"), ("route", "/api/v1/agents/{id}/status")
    assert m[("modelfleet_http_request_duration_seconds_count", timed)] == 3
    # Route patterns, never raw paths: the agent's id is in no label.
    assert not any(agent_id in str(labels) for _, labels in m)
    assert m[("modelfleet_agents", (("state", "online"),))] == 1
    assert m[("modelfleet_rollout_transitions_total", (("kind", "created"),))] >= 1
    assert m[("modelfleet_rollout_transitions_total", (("kind", "completed"),))] == 1
    assert m[("modelfleet_ingest_reports_total", ())] >= 2
    assert m[("modelfleet_ingest_batch_size_count", ())] >= 1
    assert m[("modelfleet_ingest_lag_seconds_count", ())] >= 1
    assert m[("modelfleet_ingest_queued_reports", ())] == 0
    assert m[("modelfleet_webhook_deliveries", (("state", "pending"),))] == 0
    assert rollout["id"]


async def test_metrics_need_fleet_read_on_the_api_port(cp: ControlPlane) -> None:
    r = await cp.client.get("/metrics")
    await assert_error(r, 401, "unauthenticated")
    r = await cp.call("POST", "/tokens", json={"name": "ci", "scopes": ["models:write"]})
    writer = (await r.json())["token"]
    r = await cp.client.get("/metrics", headers={"Authorization": f"Bearer {writer}"})
    await assert_error(r, 403, "insufficient_scope")
    r = await cp.call("POST", "/tokens", json={"name": "prom", "scopes": ["fleet:read"]})
    reader = (await r.json())["token"]
    assert ("modelfleet_agents", (("state", "offline"),)) in await scrape(cp, reader)


async def test_metrics_listen_serves_without_a_token_and_counts_the_mqtt_bridge(
    tmp_path: Path, publisher: Publisher, broker: Broker
) -> None:
    port = free_port()
    config = dataclasses.replace(
        mqtt_config(tmp_path, publisher, broker), metrics_listen=("127.0.0.1", port)
    )
    cp = await start_control_plane(config)
    try:
        async with aiohttp.ClientSession() as http:

            async def connected() -> Samples | None:
                async with http.get(f"http://127.0.0.1:{port}/metrics") as r:
                    assert r.status == 200
                    m = parse(await r.text())
                return m if m.get(("modelfleet_mqtt_connected", ())) == 1 else None

            m = await eventually(connected, within_s=15)
            assert (
                "modelfleet_mqtt_messages_total",
                (("kind", "any"), ("outcome", "malformed")),
            ) in m
            async with http.get(f"http://127.0.0.1:{port}/api/v1/agents") as r:
                assert r.status == 404  # the listener serves /metrics and nothing else
        # On the API port it still needs a token.
        await assert_error(await cp.client.get("/metrics"), 401)
    finally:
        await cp.client.close()
