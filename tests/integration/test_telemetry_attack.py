"""An attacker's pass over the control plane's tracing (issue 17): a caller's ``traceparent``
header on a route an agent or anyone may call must not decide the control plane's own trace
(graft its spans, and a desired state signed under them, into a trace the caller chose, or switch
their recording off with an unsampled flag); an operator's still parents its request."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.test_telemetry import CP_SERVICE, traced_control_plane
from tests.support.agents import eventually
from tests.support.bundles import Publisher
from tests.support.otlp import OtlpReceiver, SpanRecord

pytestmark = pytest.mark.slow
HOSTILE = "00-" + "a" * 32 + "-" + "b" * 16 + "-00"  # unsampled: "do not record me"
HOSTILE_SAMPLED = "00-" + "c" * 32 + "-" + "d" * 16 + "-01"
OPERATOR = "00-" + "e" * 32 + "-" + "f" * 16 + "-01"


async def test_agents_and_anonymous_callers_do_not_choose_the_control_planes_trace(
    tmp_path: Path, publisher: Publisher
) -> None:
    async with OtlpReceiver() as receiver:
        cp = await traced_control_plane(tmp_path, publisher, receiver)
        try:
            r = await cp.call("POST", "/enrollment-tokens", json={"labels": {}})
            token = (await r.json())["token"]
            r = await cp.call(
                "POST",
                "/agents/enroll",
                token="",
                json={"token": token, "labels": {}},
                headers={"traceparent": HOSTILE},
            )
            assert r.status == 201, await r.text()
            agent = await r.json()
            r = await cp.call(
                "GET",
                f"/agents/{agent['agentId']}/commands",
                agent["credential"],
                params={"wait": "0"},
                headers={"traceparent": HOSTILE_SAMPLED},
            )
            assert r.status == 204, await r.text()
            r = await cp.call("GET", "/agents", headers={"traceparent": OPERATOR})
            assert r.status == 200

            def span_of(name: str) -> SpanRecord | None:
                return next(iter(receiver.by_name(name, CP_SERVICE)), None)

            enroll = await eventually(lambda: span_of("POST /api/v1/agents/enroll"), 20)
            poll = await eventually(lambda: span_of("GET /api/v1/agents/{id}/commands"), 20)
            listed = await eventually(lambda: span_of("GET /api/v1/agents"), 20)
            # Recorded although the caller said "unsampled", in a trace of the control plane's
            # own; the caller's context is kept as an attribute for whoever wants to join them.
            assert enroll.trace_id != "a" * 32 and enroll.parent_id == ""
            assert enroll.attributes["modelfleet.caller.traceparent"] == HOSTILE
            assert poll.trace_id != "c" * 32 and poll.parent_id == ""
            # An operator's request stays a child of its caller.
            assert listed.trace_id == "e" * 32 and listed.parent_id == "f" * 16
        finally:
            await cp.client.close()
