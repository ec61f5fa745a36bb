"""The validation boundary at the HTTP edge: what an agent sends at enrollment, in status and in
metrics is answered 400 naming the field when it is hostile, and nothing stored changes; rows
stored before the checks do not make the agent listing unencodable."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import update

from control_plane.db.models import Agent
from control_plane.state import STATE
from protocol.reports import MetricsBatch, ModelStatus, SeriesWindow, StatusReport
from tests.support.control_plane import ControlPlane, assert_error

DIGEST = "sha256:" + "c" * 64


async def new_token(cp: ControlPlane) -> str:
    r = await cp.call("POST", "/enrollment-tokens", json={"maxUses": 1})
    assert r.status == 201, await r.text()
    return (await r.json())["token"]


async def post_raw(cp: ControlPlane, path: str, body: bytes, token: str = "") -> Any:
    headers = {"Content-Type": "application/json"}
    return await cp.call("POST", path, token=token, data=body, headers=headers)


async def test_hostile_enrollment_is_400_naming_the_field_and_uses_nothing(
    cp: ControlPlane,
) -> None:
    token = await new_token(cp)
    t = json.dumps(token).encode()
    cases: list[tuple[bytes, str | None]] = [
        (b'{"token": %s, "facts": {"costPerHour": NaN}}' % t, "facts.costPerHour"),
        (b'{"token": %s, "facts": {"memoryBytes": 1e999}}' % t, "facts.memoryBytes"),
        (b'{"token": %s, "facts": {"cpuCount": 99999999999999999999}}' % t, "facts.cpuCount"),
        (b'{"token": %s, "name": "box\\ud800"}' % t, "name"),
        (b'{"token": %s, "facts": %s}' % (t, b"[" * 5000 + b"]" * 5000), None),
        (b'{"token": %s, "name": "box\\n2026-01-01 INFO forged"}' % t, "name"),
        (b'{"token": %s, "name": "\\u001b[31mred"}' % t, "name"),
        (b'{"token": %s, "labels": {"site": "onprem\\n"}}' % t, "labels.site"),
    ]
    for body, field in cases:
        r = await post_raw(cp, "/agents/enroll", body)
        await assert_error(r, 400, "invalid", field)
    facts: dict[str, Any] = {"gpus": [{"name": "ok"}, {"name": "x" * 300}]}
    r = await cp.call("POST", "/agents/enroll", token="", json={"token": token, "facts": facts})
    await assert_error(r, 400, "invalid", "facts.gpus[1].name")
    facts = {f"k{i}": "v" for i in range(65)}
    r = await cp.call("POST", "/agents/enroll", token="", json={"token": token, "facts": facts})
    await assert_error(r, 400, "invalid", "facts")
    # No agent was made and the token's only use is still there.
    assert (await (await cp.call("GET", "/agents")).json())["agents"] == []
    r = await cp.call("POST", "/agents/enroll", token="", json={"token": token, "facts": {}})
    assert r.status == 201, await r.text()


async def test_hostile_reports_are_400_and_change_nothing(cp: ControlPlane) -> None:
    a = await cp.enroll()
    aid, cred = a["agentId"], a["credential"]
    now = datetime.now(UTC)
    status = StatusReport(
        aid, 1, now, (ModelStatus("iris", "1.0.0", DIGEST, "active"),), {"cpuCount": 2}
    ).to_json()
    r = await cp.call("POST", f"/agents/{aid}/status", token=cred, json=status)
    assert r.status == 200, await r.text()

    def status_with(**changes: Any) -> bytes:
        return json.dumps({**status, "generation": 2, **changes}).encode()

    cases = [
        (status_with(facts={"costPerHour": "__NAN__"}), "facts.costPerHour"),
        (status_with(sentAt="9999-12-31T23:59:59-23:59"), "sentAt"),
        (status_with(lastError="\u001b]0;owned\u0007"), "lastError"),
        (status_with(facts={"gpus": [{"name": "a"}, {"name": "b\u0000"}]}), "facts.gpus[1].name"),
    ]
    for body, field in cases:
        body = body.replace(b'"__NAN__"', b"NaN")
        r = await post_raw(cp, f"/agents/{aid}/status", body, token=cred)
        await assert_error(r, 400, "invalid", field)

    s = SeriesWindow("iris", "1.0.0", requests=3, errors=0)
    for v in (1.0, 2.0, 3.0):
        s.latency_ms.add(v)
    batch = MetricsBatch(aid, 1, now, now, (s,)).to_json()
    sketch = batch["series"][0]["latencyMs"]
    bad_sketches = [
        ({**sketch, "relativeAccuracy": 0.02}, "series[0].latencyMs.relativeAccuracy"),
        ({**sketch, "binKeys": [10**9, 1, 2]}, "series[0].latencyMs.binKeys[0]"),
        # Past 64 bits: refused by the JSON reader itself, which names the path as well.
        ({**sketch, "binCounts": [2**63, 1, 1]}, "series[0].latencyMs.binCounts[0]"),
    ]
    for bad, field in bad_sketches:
        doc = {**batch, "series": [{**batch["series"][0], "latencyMs": bad}]}
        r = await cp.call("POST", f"/agents/{aid}/metrics", token=cred, json=doc)
        await assert_error(r, 400, "invalid", field)

    # Nothing moved: the first status stands, and the good batch is still seq 1's first copy.
    agent = await (await cp.call("GET", f"/agents/{aid}")).json()
    assert agent["reportedGeneration"] == 1 and agent["lastError"] is None
    assert agent["facts"] == {"cpuCount": 2}
    r = await cp.call("POST", f"/agents/{aid}/metrics", token=cred, json=batch)
    assert (await r.json())["stored"] is True


async def test_agents_listing_stays_json_over_rows_stored_before_the_schema(
    cp: ControlPlane,
) -> None:
    a = await cp.enroll()
    old_facts: dict[str, Any] = {"cpuCount": 4, "gpus": [[[]]], "os": "x" * 5000, "arch": "arm64"}
    if cp.config.database_url.startswith("sqlite"):
        # As an older version stored them: SQLite's JSON column writes NaN as it is (PostgreSQL
        # refuses it, so there the other invalid facts stand in).
        old_facts["costPerHour"] = float("nan")
    db = cp.client.app[STATE].db  # type: ignore[index]
    async with db.write() as s:
        await s.execute(update(Agent).where(Agent.id == a["agentId"]).values(facts=old_facts))
    r = await cp.call("GET", "/agents")
    assert r.status == 200, await r.text()
    listed = json.loads(await r.text(), parse_constant=lambda c: 1 / 0)
    assert listed["agents"][0]["facts"] == {"cpuCount": 4, "arch": "arm64"}


async def test_a_path_parameter_with_a_control_character_is_400_not_500(cp: ControlPlane) -> None:
    # Percent-decoded, a path carries a NUL to the handler, and PostgreSQL refuses it in any
    # text it is given: an operator's lookup of /agents/%00 (and of a model, a rollout, a
    # desired state) answered 500 instead of finding nothing.
    for method, path, param in (
        ("GET", "/agents/%00", "id"),
        ("GET", "/agents/%00/desired", "id"),
        ("GET", "/models/%00/versions", "name"),
        ("GET", "/rollouts/%00", "id"),
        ("POST", "/rollouts/%00/pause", "id"),
        ("GET", "/agents/a%1b%5b2J", "id"),
    ):
        r = await cp.call(method, path)
        await assert_error(r, 400, "invalid", f"path parameter {param}")
