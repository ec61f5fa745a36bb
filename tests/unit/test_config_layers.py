"""Configuration layers: precedence, merge, set/unset, validation (pure)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from control_plane.errors import Invalid
from control_plane.fleet.config import (
    Layer,
    check_schema,
    config_errors,
    deep_merge,
    effective,
    parse_assignment,
    parse_changes,
    schema_defaults,
    set_values,
    unset_values,
    validate,
)
from control_plane.rollout.spec import parse_spec, spec_from_json
from protocol.exceptions import InvalidMessage
from protocol.labels import parse_selector

T0 = datetime(2026, 12, 1, tzinfo=UTC)
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "threshold": {"type": "number", "minimum": 0, "maximum": 1, "default": 0.5},
        "batching": {
            "type": "object",
            "properties": {"maxBatchSize": {"type": "integer", "minimum": 1, "default": 4}},
        },
        "labels": {"type": "array", "items": {"type": "string"}},
    },
    "additionalProperties": False,
}


def layer(i: int, scope: str, values: dict[str, Any], **kw: Any) -> Layer:
    sel = kw.pop("selector", None)
    return Layer(
        id=i,
        model="iris",
        scope=scope,
        selector=parse_selector(sel) if sel else None,
        values=values,
        created_at=kw.pop("created_at", T0 + timedelta(seconds=i)),
        **kw,
    )


def test_defaults_come_from_the_schema_nested_objects_included() -> None:
    assert schema_defaults(SCHEMA) == {"threshold": 0.5, "batching": {"maxBatchSize": 4}}
    assert schema_defaults(None) == {}


def test_precedence_fleet_then_selectors_by_specificity_then_creation_then_agent() -> None:
    layers = [
        layer(1, "agent", {"threshold": 0.9}, agent_id="a1"),
        layer(2, "selector", {"threshold": 0.3, "labels": ["x"]}, selector="site=s,hw=cpu"),
        layer(3, "selector", {"threshold": 0.2}, selector="site=s"),  # less specific
        layer(4, "fleet", {"threshold": 0.1, "batching": {"maxBatchSize": 8}}),
        layer(5, "selector", {"labels": ["y"]}, selector="hw=cpu"),  # later than 3, same rank
        layer(6, "selector", {"labels": ["z"]}, selector="hw=cpu", created_at=T0),  # earliest
    ]
    labels = {"site": "s", "hw": "cpu"}
    got = effective(layers, agent_id="a1", labels=labels, schema=SCHEMA)
    assert got == {"threshold": 0.9, "batching": {"maxBatchSize": 8}, "labels": ["x"]}
    got = effective(layers, agent_id="a2", labels={"site": "s"}, schema=SCHEMA)
    assert got == {"threshold": 0.2, "batching": {"maxBatchSize": 8}}
    got = effective(layers, agent_id="a2", labels={"hw": "cpu"}, schema=SCHEMA)
    assert got["labels"] == ["y"]  # 5 was created after 6: it wins


def test_a_rollout_layer_applies_only_where_its_rollout_does() -> None:
    layers = [layer(1, "selector", {"threshold": 0.8}, selector="site=s", rollout_id="r1")]
    args = {"agent_id": "a", "labels": {"site": "s"}, "schema": SCHEMA}
    assert effective(layers, **args)["threshold"] == 0.5
    assert effective(layers, **args, rollouts={"r1"})["threshold"] == 0.8


def test_objects_merge_key_by_key_lists_and_scalars_replace() -> None:
    assert deep_merge({"a": {"b": 1, "c": 2}, "l": [1]}, {"a": {"c": 3}, "l": [2]}) == {
        "a": {"b": 1, "c": 3},
        "l": [2],
    }
    assert deep_merge({"a": {"b": 1}}, {"a": 5}) == {"a": 5}


def test_set_and_unset_dotted_keys() -> None:
    v = set_values({}, {"batching.maxBatchSize": 2, "threshold": 0.1})
    assert v == {"batching": {"maxBatchSize": 2}, "threshold": 0.1}
    assert unset_values(v, ["batching.maxBatchSize"]) == {"threshold": 0.1}
    assert unset_values(v, ["nosuch.key", "threshold"]) == {"batching": {"maxBatchSize": 2}}
    with pytest.raises(Invalid) as e:
        set_values({}, {"a..b": 1})
    assert e.value.code == "invalid_config_key"


def test_command_line_values_are_json_when_they_parse() -> None:
    assert parse_assignment("threshold=0.7") == ("threshold", 0.7)
    assert parse_assignment("name=abc") == ("name", "abc")
    assert parse_assignment('labels=["a","b"]') == ("labels", ["a", "b"])
    assert parse_assignment("x=") == ("x", "")
    with pytest.raises(ValueError):
        parse_assignment("novalue")


def test_validation_names_the_path() -> None:
    assert config_errors({"threshold": 0.1}, SCHEMA) == []
    with pytest.raises(Invalid) as e:
        validate({"batching": {"maxBatchSize": 0}}, SCHEMA, where="fleet layer")
    assert e.value.field == "batching.maxBatchSize" and "fleet layer" in e.value.message
    with pytest.raises(Invalid) as e:
        validate({"other": 1}, SCHEMA, where="w")
    assert e.value.field == "set"  # additionalProperties: the root
    assert config_errors({"x": 1}, None) == ["x: this version declares no configuration schema"]
    assert config_errors({}, {"type": 7})[0].startswith("(root): the version's configuration")


def test_schema_itself_is_checked() -> None:
    assert check_schema(SCHEMA) is SCHEMA
    with pytest.raises(Invalid):
        check_schema({"type": "nonsense"})
    with pytest.raises(Invalid):
        check_schema([1])


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"set": []},
        {"unset": "a"},
        {"set": {"a": float("nan")}},
        {"set": {f"k{i}": i for i in range(200)}},
        {"unset": ["bad key"]},
    ],
)
def test_bad_changes_are_refused(body: dict[str, Any]) -> None:
    with pytest.raises(Invalid):
        parse_changes(body)


def test_a_rollout_spec_carries_a_configuration_layer() -> None:
    body = {"model": "iris", "version": "1.0.0", "config": {"batching": {"maxBatchSize": 4}}}
    spec = parse_spec(body)
    assert spec.config == {"batching": {"maxBatchSize": 4}}
    assert spec_from_json(spec.to_json()) == spec
    assert "config" not in parse_spec({"model": "iris", "version": "1.0.0"}).to_json()
    for bad, field in (
        ({"config": {}}, "config"),
        ({"config": [1]}, "config"),
        ({"config": {"a": 1}, "shadow": True}, "shadow"),
    ):
        with pytest.raises(InvalidMessage) as e:
            parse_spec({"model": "iris", "version": "1.0.0", **bad})
        assert e.value.field == field
