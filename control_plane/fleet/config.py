"""Configuration layers: scopes, precedence, merge, and validation against a bundle's schema.

Pure: values in, values or ``Invalid`` out. A model's configuration on one agent is, lowest
precedence first:

1. the defaults of the bundle's JSON Schema (``configSchema`` in the signed manifest),
2. the ``fleet`` layer (every agent),
3. the ``selector`` layers whose selector matches the agent: the less specific first (fewer
   requirements), equally specific ones in order of creation (the later wins), then by id,
4. the ``agent`` layer of that agent.

A layer carried by a configuration rollout is a selector layer that applies only to the agents
the rollout applies to (moved, or all matching once it completed; none once rolled back).
Objects merge key by key; any other value (a list included) replaces the one below it.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

from control_plane.errors import Invalid
from protocol.desired import check_config
from protocol.exceptions import InvalidMessage
from protocol.labels import Selector

SCOPES = ("fleet", "selector", "agent")
MAX_KEYS_PER_CHANGE = 128
MAX_KEY_DEPTH = 6
_STEP = r"[A-Za-z_][A-Za-z0-9_-]{0,63}"
KEY_RE = re.compile(rf"^{_STEP}(\.{_STEP}){{0,{MAX_KEY_DEPTH - 1}}}$")


@dataclass(frozen=True, kw_only=True)
class Layer:
    """One stored configuration layer of one model."""

    id: int
    model: str
    scope: str  # fleet, selector or agent
    selector: Selector | None = None  # the selector layer's (and a rollout's) selector
    agent_id: str | None = None  # the agent layer's agent
    values: Mapping[str, Any] = field(default_factory=dict, hash=False)
    created_at: datetime
    rollout_id: str | None = None  # carried by this configuration rollout

    def matches(
        self, agent_id: str, labels: Mapping[str, str], rollouts: Collection[str] = ()
    ) -> bool:
        """Whether the layer applies to this agent; ``rollouts`` are the ids of the
        configuration rollouts that apply to it."""
        if self.rollout_id is not None and self.rollout_id not in rollouts:
            return False
        if self.scope == "fleet":
            return True
        if self.scope == "agent":
            return self.agent_id == agent_id
        return self.selector is not None and self.selector.matches(labels)


def precedence(layer: Layer) -> tuple[int, int, datetime, int]:
    """Sort key: a layer later in this order wins over the ones before it."""
    specificity = len(layer.selector.requirements) if layer.selector is not None else 0
    return (SCOPES.index(layer.scope), specificity, layer.created_at, layer.id)


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``: objects merge key by key, anything else replaces."""
    out = dict(base)
    for k, v in over.items():
        below = out.get(k)
        if isinstance(v, Mapping) and isinstance(below, Mapping):
            out[k] = deep_merge(below, v)
        else:
            out[k] = v
    return out


def check_key(key: str, field_name: str = "set") -> tuple[str, ...]:
    """A dotted key as its steps; raises Invalid naming the field."""
    if not isinstance(key, str) or not KEY_RE.fullmatch(key):
        raise Invalid(
            "invalid_config_key",
            f"{field_name}: {key!r} is not a key (up to {MAX_KEY_DEPTH} dotted names of "
            "letters, digits, '_' and '-', each starting with a letter or '_')",
            field_name,
        )
    return tuple(key.split("."))


def set_values(values: Mapping[str, Any], assignments: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` with each dotted key set (``a.b`` sets ``b`` inside the object ``a``)."""
    out: dict[str, Any] = json.loads(json.dumps(values))
    for key, value in assignments.items():
        steps = check_key(key, f"set.{key}")
        node = out
        for step in steps[:-1]:
            child = node.get(step)
            if not isinstance(child, dict):
                child = node[step] = {}
            node = child
        node[steps[-1]] = value
    return out


def unset_values(values: Mapping[str, Any], keys: Iterable[str]) -> dict[str, Any]:
    """``values`` without these dotted keys; objects left empty go too."""
    out: dict[str, Any] = json.loads(json.dumps(values))
    for key in keys:
        steps = check_key(key, "unset")
        trail = [out]
        for step in steps[:-1]:
            child = trail[-1].get(step)
            if not isinstance(child, dict):
                break
            trail.append(child)
        else:
            trail[-1].pop(steps[-1], None)
            for parent, step in zip(reversed(trail[:-1]), reversed(steps[:-1]), strict=True):
                if parent.get(step) == {}:
                    del parent[step]
    return out


def parse_assignment(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` from the command line: the value as JSON when it parses, else the text."""
    key, sep, raw = text.partition("=")
    if not sep:
        raise ValueError(f"{text!r} is not KEY=VALUE")
    try:
        value: Any = json.loads(raw)
    except ValueError:
        value = raw
    return key.strip(), value


def parse_changes(body: Mapping[str, Any]) -> tuple[dict[str, Any], tuple[str, ...]]:
    """The ``set`` object and ``unset`` list of a request, checked; raises Invalid."""
    assignments = body.get("set", {})
    if not isinstance(assignments, dict):
        raise Invalid("invalid", "set must be an object of dotted keys to values", "set")
    removals = body.get("unset", [])
    if not isinstance(removals, list) or not all(isinstance(k, str) for k in removals):
        raise Invalid("invalid", "unset must be a list of dotted keys", "unset")
    if not assignments and not removals:
        raise Invalid("invalid", "nothing to change: give set or unset", "set")
    if len(assignments) + len(removals) > MAX_KEYS_PER_CHANGE:
        raise Invalid("invalid", f"at most {MAX_KEYS_PER_CHANGE} keys per change", "set")
    for k in assignments:
        check_key(k, f"set.{k}")
    for k in removals:
        check_key(k, "unset")
    try:
        check_config(assignments, "set")
    except InvalidMessage as exc:
        raise Invalid("invalid", str(exc), exc.field) from None
    return assignments, tuple(removals)


def check_schema(schema: object, field_name: str = "configSchema") -> dict[str, Any]:
    """A bundle's configuration schema: a JSON Schema object; raises Invalid naming it."""
    if not isinstance(schema, dict):
        raise Invalid("invalid_config_schema", f"{field_name} must be a JSON Schema object")
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        where = "/".join(str(p) for p in exc.path) or "(root)"
        raise Invalid(
            "invalid_config_schema", f"{field_name} at {where}: {exc.message}", field_name
        ) from None
    return schema


def schema_defaults(schema: Mapping[str, Any] | None) -> dict[str, Any]:
    """The ``default`` of each property of an object schema, nested objects included."""
    if not schema:
        return {}
    out: dict[str, Any] = {}
    top = schema.get("default")
    if isinstance(top, dict):
        out.update(top)
    props = schema.get("properties")
    if not isinstance(props, dict):
        return out
    for name, sub in props.items():
        if not isinstance(sub, dict):
            continue
        if "default" in sub:
            out[name] = sub["default"]
        elif sub.get("type") == "object":
            nested = schema_defaults(sub)
            if nested:
                out[name] = nested
    return out


def effective(
    layers: Iterable[Layer],
    *,
    agent_id: str,
    labels: Mapping[str, str],
    schema: Mapping[str, Any] | None,
    rollouts: Collection[str] = (),
) -> dict[str, Any]:
    """One model's configuration on one agent: the schema's defaults, then each layer that
    applies, in precedence order."""
    merged = schema_defaults(schema)
    for layer in sorted(
        (x for x in layers if x.matches(agent_id, labels, rollouts)), key=precedence
    ):
        merged = deep_merge(merged, layer.values)
    return merged


@functools.lru_cache(maxsize=256)
def _validator(schema_json: str) -> Draft202012Validator | str:
    """A validator per schema, made once (a fleet's refresh checks every agent against the
    same few schemas); the schema's own error as text when it is not one."""
    schema = json.loads(schema_json)
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        return exc.message
    return Draft202012Validator(schema)


def config_errors(config: Mapping[str, Any], schema: Mapping[str, Any] | None) -> list[str]:
    """Why ``config`` does not meet ``schema``, as ``path: message`` (empty when it does).

    Without a schema a bundle takes no configuration: any key is an error.
    """
    if schema is None:
        return [f"{k}: this version declares no configuration schema" for k in sorted(config)]
    validator = _validator(json.dumps(schema, sort_keys=True))
    if isinstance(validator, str):
        return [f"(root): the version's configuration schema is not valid: {validator}"]
    out = []
    for err in sorted(validator.iter_errors(config), key=lambda e: list(map(str, e.path))):
        where = ".".join(str(p) for p in err.absolute_path) or "(root)"
        out.append(f"{where}: {err.message}")
    return out


def validate(config: Mapping[str, Any], schema: Mapping[str, Any] | None, *, where: str) -> None:
    """Raise Invalid naming the first bad path of ``config`` under ``schema``."""
    errors = config_errors(config, schema)
    if errors:
        path = errors[0].split(":", 1)[0]
        raise Invalid(
            "invalid_config",
            f"{where}: {errors[0]}" + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""),
            path if path != "(root)" else "set",
        )
