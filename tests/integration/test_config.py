"""Configuration layers and relabel against a real control plane (SQLite and PostgreSQL)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from protocol.desired import accept_desired, config_digest
from protocol.dsse import keyring, load_public_key
from tests.support.bundles import Publisher, iris_bundle
from tests.support.control_plane import ControlPlane, assert_error

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "threshold": {"type": "number", "minimum": 0, "maximum": 1, "default": 0.5},
        "maxBatch": {"type": "integer", "minimum": 1, "default": 8},
        "tags": {"type": "object", "properties": {"lang": {"type": "string", "default": "en"}}},
    },
    "additionalProperties": False,
}


async def desired_models(cp: ControlPlane, agent: dict[str, Any]) -> list[dict[str, Any]]:
    """The agent's signed desired state, verified as the agent verifies it."""
    r = await cp.call("GET", f"/agents/{agent['agentId']}/desired", token=agent["credential"])
    assert r.status == 200, await r.text()
    keys = keyring([load_public_key(agent["controlPlaneKey"].encode())])
    state = accept_desired(await r.read(), keys, agent["agentId"], 0, datetime.now(UTC))
    assert state is not None
    return [m.to_json() for m in state.models]


async def change(cp: ControlPlane, **body: Any) -> Any:
    return await cp.call("POST", "/config/layers", json=body)


async def config_of(cp: ControlPlane, agent: dict[str, Any]) -> dict[str, Any]:
    (m,) = await desired_models(cp, agent)
    assert m["configDigest"] == config_digest(m["config"])
    return m["config"]


@pytest.fixture
async def three(cp: ControlPlane, publisher: Publisher) -> list[dict[str, Any]]:
    assert (await cp.push(iris_bundle(publisher.key, "1.0.0", config_schema=SCHEMA))).status == 201
    agents = [
        await cp.enroll({"site": "a", "hw": "cpu"}, name="a1"),
        await cp.enroll({"site": "a", "hw": "gpu"}, name="a2"),
        await cp.enroll({"site": "b", "hw": "cpu"}, name="b1"),
    ]
    await cp.rollout("1.0.0")
    return agents


async def test_layers_merge_fleet_then_selectors_then_agent(
    cp: ControlPlane, three: list[dict[str, Any]]
) -> None:
    a1, a2, b1 = three
    # No layer yet: the schema's defaults, signed with their digest.
    assert await config_of(cp, a1) == {"threshold": 0.5, "maxBatch": 8, "tags": {"lang": "en"}}
    assert (await change(cp, model="iris", scope="fleet", set={"threshold": 0.7})).status == 200
    r = await change(cp, model="iris", scope="selector", selector="site=a", set={"maxBatch": 4})
    assert r.status == 200, await r.text()
    # More specific than site=a: wins where both match, whatever their order of creation.
    r = await change(
        cp, model="iris", scope="selector", selector="site=a,hw=gpu", set={"maxBatch": 2}
    )
    assert r.status == 200
    r = await change(cp, model="iris", scope="selector", selector="hw=cpu", set={"maxBatch": 3})
    assert r.status == 200  # as specific as site=a, created later: wins on a1
    r = await change(cp, model="iris", scope="agent", agent=b1["agentId"], set={"tags.lang": "fr"})
    assert r.status == 200
    assert (await r.json())["agentsChanged"] == 1
    assert await config_of(cp, a1) == {"threshold": 0.7, "maxBatch": 3, "tags": {"lang": "en"}}
    assert await config_of(cp, a2) == {"threshold": 0.7, "maxBatch": 2, "tags": {"lang": "en"}}
    assert await config_of(cp, b1) == {"threshold": 0.7, "maxBatch": 3, "tags": {"lang": "fr"}}

    # Unset: back to what the layers below give; an emptied layer goes.
    r = await change(cp, model="iris", scope="fleet", unset=["threshold"])
    assert (await r.json())["layer"] is None
    assert (await config_of(cp, a1))["threshold"] == 0.5
    layers = (await (await cp.call("GET", "/config/layers?model=iris")).json())["layers"]
    assert [x["scope"] for x in layers] == ["selector", "selector", "selector", "agent"]

    shown = await (await cp.call("GET", f"/config/agents/{b1['agentId']}")).json()
    (m,) = shown["models"]
    assert m["config"] == await config_of(cp, b1)
    assert m["appliedDigest"] is None and m["applied"] is False  # no agent process here


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"scope": "fleet", "set": {"threshold": 2}}, "threshold"),
        ({"scope": "fleet", "set": {"maxBatch": "8"}}, "maxBatch"),
        ({"scope": "fleet", "set": {"nosuch": 1}}, "set"),
        ({"scope": "selector", "selector": "site=b", "set": {"tags.lang": 3}}, "tags.lang"),
        ({"scope": "agent", "set": {"threshold": -1}}, "threshold"),
    ],
)
async def test_a_bad_value_is_refused_naming_its_path_and_nothing_is_stored(
    cp: ControlPlane, three: list[dict[str, Any]], body: dict[str, Any], field: str
) -> None:
    if body["scope"] == "agent":
        body = {**body, "agent": three[0]["agentId"]}
    before = [await desired_models(cp, a) for a in three]
    r = await change(cp, model="iris", **body)
    err = await assert_error(r, 400, "invalid_config", field)
    assert "a1" in err["error"]["message"] or body["scope"] == "selector"
    layers = (await (await cp.call("GET", "/config/layers")).json())["layers"]
    assert layers == []
    assert [await desired_models(cp, a) for a in three] == before


async def test_bad_requests_name_the_field(cp: ControlPlane, three: list[dict[str, Any]]) -> None:
    await assert_error(await change(cp, model="iris", scope="nope", set={"a": 1}), 400, "invalid")
    await assert_error(await change(cp, model="iris", scope="fleet"), 400, "invalid", "set")
    r = await change(cp, model="iris", scope="fleet", set={"a..b": 1})
    await assert_error(r, 400, "invalid_config_key")
    r = await change(cp, model="nosuch", scope="fleet", set={"threshold": 0.1})
    await assert_error(r, 404, "model_not_found", "model")
    r = await change(cp, model="iris", scope="agent", agent="nope", set={"threshold": 0.1})
    await assert_error(r, 404, "agent_not_found", "agent")


async def test_relabel_moves_selector_layers_and_locked_labels_stay(
    cp: ControlPlane, publisher: Publisher
) -> None:
    assert (await cp.push(iris_bundle(publisher.key, "1.0.0", config_schema=SCHEMA))).status == 201
    r = await cp.call(
        "POST", "/enrollment-tokens", json={"labels": {"site": "a"}, "lockLabels": True}
    )
    token = (await r.json())["token"]
    r = await cp.call(
        "POST", "/agents/enroll", token="", json={"token": token, "labels": {"hw": "cpu"}}
    )
    agent = await r.json()
    await cp.rollout("1.0.0")
    r = await change(cp, model="iris", scope="selector", selector="hw=gpu", set={"maxBatch": 2})
    assert r.status == 200
    assert (await config_of(cp, agent))["maxBatch"] == 8

    path = f"/agents/{agent['agentId']}/labels"
    r = await cp.call("POST", path, json={"set": {"hw": "gpu", "rack": "r1"}})
    assert r.status == 200, await r.text()
    assert (await r.json()) == {
        "agentId": agent["agentId"],
        "labels": {"site": "a", "hw": "gpu", "rack": "r1"},
        "desiredChanged": True,
    }
    assert (await config_of(cp, agent))["maxBatch"] == 2
    r = await cp.call("POST", path, json={"remove": ["rack"]})
    assert (await r.json())["desiredChanged"] is False

    # The token pinned site=a and locked it.
    await assert_error(
        await cp.call("POST", path, json={"set": {"site": "b"}}), 403, "label_locked", "set.site"
    )
    await assert_error(
        await cp.call("POST", path, json={"remove": ["site"]}), 403, "label_locked", "remove"
    )
    await assert_error(await cp.call("POST", path, json={}), 400, "invalid", "set")
    await assert_error(
        await cp.call("POST", path, json={"set": {"bad key": "x"}}), 400, field="set"
    )
    r = await cp.call("GET", f"/agents/{agent['agentId']}")
    body = await r.json()
    assert body["labels"] == {"site": "a", "hw": "gpu"} and body["lockedLabels"] == ["site"]
    r = await cp.call("POST", "/agents/nope/labels", json={"set": {"a": "b"}})
    await assert_error(r, 404, "agent_not_found")

    audit = await (await cp.call("GET", "/audit")).json()
    actions = json.dumps(audit)
    assert "POST /api/v1/agents/{id}/labels" in actions
    assert "POST /api/v1/config/layers" in actions


async def test_a_configuration_rollout_with_a_bad_value_stores_nothing(
    cp: ControlPlane, three: list[dict[str, Any]]
) -> None:
    before = (await (await cp.call("GET", "/rollouts")).json())["rollouts"]
    body = {"model": "iris", "version": "1.0.0", "selector": "site=a", "config": {"maxBatch": 0}}
    r = await cp.call("POST", "/rollouts", json={**body, "supersedes": before[0]["id"]})
    err = await assert_error(r, 400, "invalid_config", "maxBatch")
    assert "configuration rollout of iris 1.0.0 on agent a1" in err["error"]["message"]
    assert (await (await cp.call("GET", "/rollouts")).json())["rollouts"] == before
    assert (await (await cp.call("GET", "/config/layers")).json())["layers"] == []
    r = await cp.call("POST", "/rollouts", json={**body, "config": {}})
    await assert_error(r, 400, field="config")

    # A good one: its layer is listed with its rollout.
    r = await cp.call(
        "POST",
        "/rollouts",
        json={**body, "config": {"maxBatch": 2}, "supersedes": before[0]["id"]},
    )
    assert r.status == 201, await r.text()
    rid = (await r.json())["id"]
    (layer,) = (await (await cp.call("GET", "/config/layers")).json())["layers"]
    assert layer["rollout"] == rid and layer["selector"] == "site=a"
