"""A rollout's specification, parsed from the REST body (or the command line) into values."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from control_plane.rollout.cron import parse_cron
from protocol.desired import check_config
from protocol.exceptions import InvalidMessage
from protocol.fields import get_str, req_str
from protocol.labels import Selector, check_labels, parse_selector, selector_from_json
from protocol.manifest import check_name, check_version
from protocol.timeutil import format_time, parse_time

ON_FAILURE = ("rollback", "pause")
# When an operator names no max_failed_agents: more than a tenth of the moved agents reporting
# the new version failed or refused ends the rollout by its on_failure, because a version the
# agents themselves throw out is a failed rollout. A tenth rather than zero so that one broken
# device among hundreds does not undo the version everywhere; in a first stage of up to nine
# agents a single failure already trips it. An explicit "100%" tolerates any number.
DEFAULT_MAX_FAILED_PERCENT = 10.0
# When a rollout names no max_stall: a stage whose gates wait this long past the end of the soak
# with no new sample of the new version ends the rollout by its on_failure. Longer than the
# typical soak, short enough that a rollout nobody watches is not left half-way for a night.
DEFAULT_MAX_STALL_S = 1800.0
STALL_OFF = "off"
_DURATION_RE = re.compile(r"^(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?$")
MAX_STAGES = 20


def parse_duration(value: object, field_name: str) -> float:
    """Seconds from ``30s``, ``10m``, ``1h30m`` or a number; raises InvalidMessage."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and value and (m := _DURATION_RE.match(value.strip())):
        h, mi, s = (float(x) if x else 0.0 for x in m.groups())
        seconds = h * 3600 + mi * 60 + s
    else:
        raise InvalidMessage(f"{field_name} must be a duration like 30s, 10m or 1h", field_name)
    if not math.isfinite(seconds) or seconds < 0 or seconds > 30 * 86400:
        raise InvalidMessage(f"{field_name} must be between 0 and 30 days", field_name)
    return seconds


def format_duration(seconds: float) -> str:
    """``90`` -> ``1m30s``."""
    s = round(seconds)
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return "".join(f"{v}{u}" for v, u in ((h, "h"), (m, "m"), (sec, "s")) if v) or "0s"


@dataclass(frozen=True)
class Stage:
    """A stage: a share of the matching agents (or a count), then a soak."""

    percent: float | None = None
    count: int | None = None
    soak_s: float = 0.0

    def size(self, matching: int) -> int:
        """How many agents this stage's cohort holds when ``matching`` agents match."""
        if self.count is not None:
            return min(self.count, matching)
        assert self.percent is not None
        return min(matching, math.ceil(matching * self.percent / 100 - 1e-9))

    def to_json(self) -> dict[str, Any]:
        """JSON form."""
        doc: dict[str, Any] = (
            {"percent": self.percent} if self.percent is not None else {"count": self.count}
        )
        if self.soak_s:
            doc["soak"] = format_duration(self.soak_s)
        return doc

    def __str__(self) -> str:
        size = f"{self.percent:g}%" if self.percent is not None else f"{self.count}"
        return f"{size}:{format_duration(self.soak_s)}" if self.soak_s else size


@dataclass(frozen=True)
class FailedAgentsLimit:
    """``max_failed_agents``: a count, or a percentage of the cohort."""

    count: int | None = None
    percent: float | None = None

    def limit(self, cohort: int) -> float:
        """How many failed agents are tolerated in a cohort of this size."""
        if self.count is not None:
            return self.count
        assert self.percent is not None
        return cohort * self.percent / 100

    def to_json(self) -> int | str:
        """JSON form."""
        return self.count if self.count is not None else f"{self.percent:g}%"


DEFAULT_FAILED_AGENTS = FailedAgentsLimit(percent=DEFAULT_MAX_FAILED_PERCENT)


@dataclass(frozen=True)
class Gates:
    """Health gates evaluated at the end of each soak; None disables a gate."""

    max_error_rate: float | None = None
    max_p95_latency_ms: float | None = None
    max_p95_latency_ratio: float | None = None
    min_requests: int = 0
    max_failed_agents: FailedAgentsLimit | None = None
    max_mean_abs_output_drift: float | None = None

    @property
    def failed_agents_limit(self) -> FailedAgentsLimit:
        """The failed-agents limit in force: the operator's, or DEFAULT_FAILED_AGENTS."""
        if self.max_failed_agents is None:
            return DEFAULT_FAILED_AGENTS
        return self.max_failed_agents

    def effective_json(self) -> dict[str, dict[str, Any]]:
        """Every gate in force with its value, the defaulted ones marked ``"default": true``."""
        doc = {k: {"value": v, "default": False} for k, v in self.to_json().items()}
        if self.max_failed_agents is None:
            doc["max_failed_agents"] = {"value": DEFAULT_FAILED_AGENTS.to_json(), "default": True}
        return doc

    def to_json(self) -> dict[str, Any]:
        """JSON form (only the gates that are set)."""
        doc: dict[str, Any] = {}
        for name in (
            "max_error_rate",
            "max_p95_latency_ms",
            "max_p95_latency_ratio",
            "max_mean_abs_output_drift",
        ):
            if getattr(self, name) is not None:
                doc[name] = getattr(self, name)
        if self.min_requests:
            doc["min_requests"] = self.min_requests
        if self.max_failed_agents is not None:
            doc["max_failed_agents"] = self.max_failed_agents.to_json()
        return doc


@dataclass(frozen=True)
class RolloutSpec:
    """Everything a rollout was asked to do."""

    model: str
    version: str
    selector: Selector = field(default_factory=Selector)
    stages: tuple[Stage, ...] = (Stage(percent=100),)
    gates: Gates = field(default_factory=Gates)
    on_failure: str = "rollback"
    max_agents_per_minute: int | None = None
    deadline: datetime | None = None
    maintenance_window: str | None = None
    join_later: bool = True
    shadow: bool = False
    shadow_sample: float = 0.05
    rollback: bool = False
    supersedes: str | None = None
    max_stall_s: float | None = None  # None: DEFAULT_MAX_STALL_S; math.inf: never ("off")
    # A configuration rollout: this layer (values as in a configuration layer) applies to the
    # agents the rollout applies to, on the version named (docs/adr/0018).
    config: Mapping[str, Any] | None = field(default=None, hash=False)

    @property
    def stall_limit_s(self) -> float:
        """Seconds a stage may wait without progress before the rollout fails (inf: never)."""
        return DEFAULT_MAX_STALL_S if self.max_stall_s is None else self.max_stall_s

    def max_stall_json(self) -> dict[str, Any]:
        """The stall bound in force, ``{"value": "30m", "default": true}``."""
        s = self.stall_limit_s
        value = STALL_OFF if math.isinf(s) else format_duration(s)
        return {"value": value, "default": self.max_stall_s is None}

    def to_json(self) -> dict[str, Any]:
        """JSON form, the shape the REST body takes."""
        doc: dict[str, Any] = {
            "model": self.model,
            "version": self.version,
            "selector": str(self.selector),
            "stages": [s.to_json() for s in self.stages],
            "gates": self.gates.to_json(),
            "on_failure": self.on_failure,
            "join_later": self.join_later,
            "rollback": self.rollback,
            "shadow": self.shadow,
        }
        if self.shadow:
            doc["shadow_sample"] = self.shadow_sample
        if self.max_agents_per_minute is not None:
            doc["max_agents_per_minute"] = self.max_agents_per_minute
        if self.deadline is not None:
            doc["deadline"] = format_time(self.deadline)
        if self.maintenance_window:
            doc["maintenance_window"] = self.maintenance_window
        if self.supersedes:
            doc["supersedes"] = self.supersedes
        if self.max_stall_s is not None:
            doc["max_stall"] = self.max_stall_json()["value"]
        if self.config is not None:
            doc["config"] = dict(self.config)
        return doc


def _number(d: dict, key: str, prefix: str, lo: float, hi: float) -> float | None:
    value = d.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
        raise InvalidMessage(
            f"{prefix}{key} must be a number from {lo:g} to {hi:g}", f"{prefix}{key}"
        )
    return float(value)


def _bool(d: dict, key: str, default: bool) -> bool:
    value = d.get(key, default)
    if not isinstance(value, bool):
        raise InvalidMessage(f"{key} must be true or false", key)
    return value


def parse_stage(doc: object, i: int) -> Stage:
    """One stage object; raises InvalidMessage naming the field."""
    p = f"stages[{i}]."
    if not isinstance(doc, dict):
        raise InvalidMessage(f"stages[{i}] must be an object", f"stages[{i}]")
    unknown = set(doc) - {"percent", "count", "soak"}
    if unknown:
        raise InvalidMessage(
            f"{p}{sorted(unknown)[0]} is not a stage field", f"{p}{sorted(unknown)[0]}"
        )
    percent = _number(doc, "percent", p, 0.001, 100)
    count = doc.get("count")
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
        raise InvalidMessage(f"{p}count must be a whole number >= 1", f"{p}count")
    if (percent is None) == (count is None):
        raise InvalidMessage(f"stages[{i}] needs exactly one of percent or count", f"stages[{i}]")
    soak = parse_duration(doc.get("soak", 0), f"{p}soak")
    return Stage(percent, count, soak)


def parse_stages_text(text: str) -> list[dict[str, Any]]:
    """The command line's ``1%:10m,10%:30m,100%`` (or ``5:10m`` for a count) as stage objects."""
    out = []
    for i, part in enumerate(p.strip() for p in text.split(",") if p.strip()):
        size, _, soak = part.partition(":")
        stage: dict[str, Any] = {}
        try:
            if size.endswith("%"):
                stage["percent"] = float(size[:-1])
            else:
                stage["count"] = int(size)
        except ValueError:
            raise InvalidMessage(f"stages: {part!r} is not N% or a count", f"stages[{i}]") from None
        if soak:
            stage["soak"] = soak
        out.append(stage)
    return out


def _gates(doc: object) -> Gates:
    if doc is None:
        return Gates()
    if not isinstance(doc, dict):
        raise InvalidMessage("gates must be an object", "gates")
    known = {
        "max_error_rate",
        "max_p95_latency_ms",
        "max_p95_latency_ratio",
        "min_requests",
        "max_failed_agents",
        "max_mean_abs_output_drift",
    }
    for key in doc:
        if key not in known:
            raise InvalidMessage(f"gates.{key} is not a gate", f"gates.{key}")
    p = "gates."
    min_requests = doc.get("min_requests", 0)
    if isinstance(min_requests, bool) or not isinstance(min_requests, int) or min_requests < 0:
        raise InvalidMessage("gates.min_requests must be a whole number >= 0", "gates.min_requests")
    failed = doc.get("max_failed_agents")
    limit = None
    if failed is not None:
        if isinstance(failed, str) and failed.endswith("%"):
            try:
                pct = float(failed[:-1])
            except ValueError:
                pct = -1
            if not 0 <= pct <= 100:
                raise InvalidMessage(
                    "gates.max_failed_agents must be a count or 'N%'", "gates.max_failed_agents"
                )
            limit = FailedAgentsLimit(percent=pct)
        elif isinstance(failed, int) and not isinstance(failed, bool) and failed >= 0:
            limit = FailedAgentsLimit(count=failed)
        else:
            raise InvalidMessage(
                "gates.max_failed_agents must be a count or 'N%'", "gates.max_failed_agents"
            )
    return Gates(
        max_error_rate=_number(doc, "max_error_rate", p, 0, 1),
        max_p95_latency_ms=_number(doc, "max_p95_latency_ms", p, 0, 1e7),
        max_p95_latency_ratio=_number(doc, "max_p95_latency_ratio", p, 0, 1e6),
        min_requests=min_requests,
        max_failed_agents=limit,
        max_mean_abs_output_drift=_number(doc, "max_mean_abs_output_drift", p, 0, 1e12),
    )


def _max_stall(value: object) -> float | None:
    if value is None:
        return None
    if value == STALL_OFF:
        return math.inf
    seconds = parse_duration(value, "max_stall")
    if seconds < 1:
        raise InvalidMessage("max_stall must be at least 1s, or 'off'", "max_stall")
    return seconds


def parse_spec(body: dict[str, Any]) -> RolloutSpec:
    """Validate a rollout body; raises InvalidMessage naming the bad field."""
    known = {
        "model",
        "version",
        "selector",
        "stages",
        "gates",
        "on_failure",
        "join_later",
        "max_agents_per_minute",
        "deadline",
        "maintenance_window",
        "shadow",
        "shadow_sample",
        "rollback",
        "supersedes",
        "max_stall",
        "config",
    }
    for key in body:
        if key not in known:
            raise InvalidMessage(f"{key} is not a rollout field", key)
    raw_sel = body.get("selector")
    if raw_sel is None or raw_sel == "":
        selector = Selector()
    elif isinstance(raw_sel, str):
        selector = parse_selector(raw_sel)
    elif isinstance(raw_sel, dict) and all(isinstance(v, str) for v in raw_sel.values()):
        selector = selector_from_json(check_labels(raw_sel, "selector"))
    else:
        raise InvalidMessage("selector must be a string like 'site=onprem'", "selector")
    raw_stages = body.get("stages")
    if raw_stages is None:
        stages: tuple[Stage, ...] = (Stage(percent=100),)
    else:
        if isinstance(raw_stages, str):
            raw_stages = parse_stages_text(raw_stages)
        if not isinstance(raw_stages, list) or not 1 <= len(raw_stages) <= MAX_STAGES:
            raise InvalidMessage(f"stages must list 1 to {MAX_STAGES} stages", "stages")
        stages = tuple(parse_stage(s, i) for i, s in enumerate(raw_stages))
        last = stages[-1]
        if last.percent != 100 and last.count is None:
            raise InvalidMessage("the last stage must reach 100% (or name a count)", "stages")
        for i in range(1, len(stages)):
            a, b = stages[i - 1], stages[i]
            if a.percent is not None and b.percent is not None and b.percent < a.percent:
                raise InvalidMessage("stages must not shrink", f"stages[{i}].percent")
            if a.count is not None and b.count is not None and b.count < a.count:
                raise InvalidMessage("stages must not shrink", f"stages[{i}].count")
    on_failure = body.get("on_failure", "rollback")
    if on_failure not in ON_FAILURE:
        raise InvalidMessage("on_failure must be 'rollback' or 'pause'", "on_failure")
    rate = body.get("max_agents_per_minute")
    if rate is not None and (isinstance(rate, bool) or not isinstance(rate, int) or rate < 1):
        raise InvalidMessage(
            "max_agents_per_minute must be a whole number >= 1", "max_agents_per_minute"
        )
    deadline = parse_time(body["deadline"], "deadline") if body.get("deadline") else None
    window = get_str(body, "maintenance_window", optional=True, max_len=200)
    if window:
        parse_cron(window)
    sample = _number(body, "shadow_sample", "", 0.0001, 1)
    supersedes = get_str(body, "supersedes", optional=True, max_len=36)
    config = None
    if body.get("config") is not None:
        config = check_config(body["config"], "config")
        if not config:
            raise InvalidMessage("config must set at least one key", "config")
        if _bool(body, "shadow", False):
            raise InvalidMessage("a configuration rollout cannot shadow-score", "shadow")
    return RolloutSpec(
        model=check_name(req_str(body, "model"), "model"),
        version=check_version(req_str(body, "version")),
        selector=selector,
        stages=stages,
        gates=_gates(body.get("gates")),
        on_failure=on_failure,
        max_agents_per_minute=rate,
        deadline=deadline,
        maintenance_window=window,
        join_later=_bool(body, "join_later", True),
        shadow=_bool(body, "shadow", False),
        shadow_sample=sample if sample is not None else 0.05,
        rollback=_bool(body, "rollback", False),
        supersedes=supersedes,
        max_stall_s=_max_stall(body.get("max_stall")),
        config=config,
    )


def spec_from_json(doc: dict[str, Any]) -> RolloutSpec:
    """Read back a stored spec (the JSON form)."""
    return parse_spec(doc)


COMMANDS = ("pause", "resume", "promote", "abort")


@dataclass(frozen=True)
class RolloutCommand:
    """An operator's command to a rollout; ``rollback`` (abort only) moves agents back."""

    action: str
    rollback: bool = True


def parse_command(action: str, body: object) -> RolloutCommand:
    """The command named in the URL with its body; raises InvalidMessage naming the field."""
    if action not in COMMANDS:
        raise InvalidMessage(
            f"no rollout command {action!r}: one of {', '.join(COMMANDS)}", "action"
        )
    if not isinstance(body, dict):
        raise InvalidMessage("the body must be a JSON object", "body")
    unknown = sorted(set(body) - {"rollback"})
    if unknown:
        raise InvalidMessage(f"{unknown[0]} is not a field of a rollout command", unknown[0])
    rollback = body.get("rollback", True)
    if not isinstance(rollback, bool):
        raise InvalidMessage("rollback must be true or false", "rollback")
    return RolloutCommand(action, rollback)
