"""What agents send back: status reports and metric batches."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from protocol.digest import check_digest
from protocol.exceptions import InvalidMessage
from protocol.facts import check_facts
from protocol.fields import (
    INT64_MAX,
    check_json,
    clean_text,
    extra_fields,
    get_int,
    get_list,
    get_number,
    get_str,
    req_str,
    require_object,
)
from protocol.manifest import check_name, check_version
from protocol.sketch import DDSketch
from protocol.timeutil import format_time, parse_time

# Per-model lifecycle on an agent.
MODEL_STATES = ("downloading", "loading", "active", "failed", "refused")
MAX_MODELS_PER_REPORT = 256
MAX_SERIES_PER_BATCH = 1024
MAX_TEXT = 2000  # characters of a reason or lastError
# A series' counters per window: 2**40 is a million requests a second for twelve days. Far
# under 64 bits, so roll-ups can sum millions of windows into one 64-bit column.
MAX_WINDOW_COUNT = 2**40
# Mean absolute output difference of one shadowed request, at most; bounds driftSum likewise.
MAX_DRIFT = 1e12
MAX_ORDER = INT64_MAX  # a status report's epoch and seq: a signed 64-bit column holds them
STATUS_FIELDS = ("agentId", "generation", "sentAt", "models", "facts", "lastError", "epoch", "seq")


@dataclass(frozen=True)
class ModelStatus:
    """One model on an agent, as the agent sees it."""

    name: str
    version: str
    manifest_digest: str
    state: str
    reason: str | None = None
    variant: str | None = None
    # The digest of the configuration applied (active) or tried (failed); None without one.
    config_digest: str | None = None

    def to_json(self) -> dict[str, Any]:
        """JSON form."""
        doc: dict[str, Any] = {
            "name": self.name,
            "version": self.version,
            "manifestDigest": self.manifest_digest,
            "state": self.state,
        }
        if self.config_digest:
            doc["configDigest"] = self.config_digest
        if self.reason:
            # Exception text from anywhere: made to pass the receiver's check, not refused whole.
            doc["reason"] = clean_text(self.reason, MAX_TEXT)
        if self.variant:
            doc["variant"] = self.variant
        return doc


@dataclass(frozen=True)
class StatusReport:
    """An agent's whole status: sent on every change and as a heartbeat."""

    agent_id: str
    generation: int
    sent_at: datetime
    models: tuple[ModelStatus, ...]
    facts: dict[str, Any] = field(default_factory=dict)
    last_error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)
    # The agent's own order of its reports: ``epoch`` grows at every agent start, ``seq`` with
    # every report since. (0, 0) is a report without an order (an agent older than the field).
    epoch: int = 0
    seq: int = 0

    def to_json(self) -> dict[str, Any]:
        """JSON form, unknown fields kept."""
        doc = {
            **self.extra,
            "agentId": self.agent_id,
            "generation": self.generation,
            "sentAt": format_time(self.sent_at),
            "models": [m.to_json() for m in self.models],
            "facts": self.facts,
            "epoch": self.epoch,
            "seq": self.seq,
        }
        if self.last_error:
            doc["lastError"] = clean_text(self.last_error, MAX_TEXT)
        return doc


def status_from_json(doc: object) -> StatusReport:
    """Validate a status report; raises InvalidMessage naming the bad field."""
    d = require_object(doc, "status")
    # Strict JSON whatever decoded it (an MQTT bridge, a test): no NaN, lone surrogate, depth.
    check_json(d, "status")
    raw_models = get_list(d, "models")
    if len(raw_models) > MAX_MODELS_PER_REPORT:
        raise InvalidMessage(f"models lists more than {MAX_MODELS_PER_REPORT}", "models")
    models = []
    for i, m in enumerate(raw_models):
        p = f"models[{i}]."
        md = require_object(m, p.rstrip("."))
        state = req_str(md, "state", p)
        if state not in MODEL_STATES:
            raise InvalidMessage(f"{p}state must be one of {', '.join(MODEL_STATES)}", f"{p}state")
        models.append(
            ModelStatus(
                name=check_name(req_str(md, "name", p), f"{p}name"),
                version=check_version(req_str(md, "version", p), f"{p}version"),
                manifest_digest=check_digest(md.get("manifestDigest"), f"{p}manifestDigest"),
                state=state,
                reason=get_str(md, "reason", p, optional=True, max_len=MAX_TEXT, text=True),
                variant=get_str(md, "variant", p, optional=True, max_len=64),
                config_digest=(
                    None
                    if md.get("configDigest") is None
                    else check_digest(md.get("configDigest"), f"{p}configDigest")
                ),
            )
        )
    facts = check_facts(d.get("facts"), "facts")
    extra = extra_fields(d, STATUS_FIELDS)
    # Kept in extra (older control planes did not know it), but shown in the agent's listing.
    get_str(d, "desiredState", optional=True, max_len=16)
    return StatusReport(
        agent_id=req_str(d, "agentId"),
        generation=get_int(d, "generation"),
        sent_at=parse_time(d.get("sentAt"), "sentAt"),
        models=tuple(models),
        facts=facts,
        last_error=get_str(d, "lastError", optional=True, max_len=MAX_TEXT, text=True),
        extra=extra,
        epoch=get_int(d, "epoch", default=0, maximum=MAX_ORDER),
        seq=get_int(d, "seq", default=0, maximum=MAX_ORDER),
    )


@dataclass
class SeriesWindow:
    """Counts and latency of one model version over one window."""

    model: str
    version: str
    requests: int = 0
    errors: int = 0
    latency_ms: DDSketch = field(default_factory=DDSketch)
    # Shadow scoring: requests also scored by the replaced version, the sum of their mean
    # absolute output differences, and how many agreed on the argmax.
    shadow_count: int = 0
    drift_sum: float = 0.0
    argmax_agree: int = 0

    def to_json(self) -> dict[str, Any]:
        """JSON form."""
        doc: dict[str, Any] = {
            "model": self.model,
            "version": self.version,
            "requests": self.requests,
            "errors": self.errors,
            "latencyMs": self.latency_ms.to_json(),
        }
        if self.shadow_count:
            doc["shadow"] = {
                "count": self.shadow_count,
                "driftSum": self.drift_sum,
                "argmaxAgree": self.argmax_agree,
            }
        return doc


@dataclass(frozen=True)
class MetricsBatch:
    """One window of metrics from one agent; ``seq`` makes resending it safe."""

    agent_id: str
    seq: int
    window_start: datetime
    window_end: datetime
    series: tuple[SeriesWindow, ...]
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def to_json(self) -> dict[str, Any]:
        """JSON form, unknown fields kept."""
        return {
            **self.extra,
            "agentId": self.agent_id,
            "seq": self.seq,
            "windowStart": format_time(self.window_start),
            "windowEnd": format_time(self.window_end),
            "series": [s.to_json() for s in self.series],
        }


def metrics_from_json(doc: object) -> MetricsBatch:
    """Validate a metrics batch; raises InvalidMessage naming the bad field."""
    d = require_object(doc, "metrics")
    check_json(d, "metrics")
    raw = get_list(d, "series")
    if len(raw) > MAX_SERIES_PER_BATCH:
        raise InvalidMessage(f"series lists more than {MAX_SERIES_PER_BATCH}", "series")
    series = []
    for i, s in enumerate(raw):
        p = f"series[{i}]."
        sd = require_object(s, p.rstrip("."))
        requests = get_int(sd, "requests", p, maximum=MAX_WINDOW_COUNT)
        errors = get_int(sd, "errors", p, maximum=MAX_WINDOW_COUNT)
        if errors > requests:
            raise InvalidMessage(f"{p}errors exceeds {p}requests", f"{p}errors")
        sketch = DDSketch.from_json(sd.get("latencyMs"), f"{p}latencyMs.")
        if sketch.count > MAX_WINDOW_COUNT:
            raise InvalidMessage(
                f"{p}latencyMs.count must be <= {MAX_WINDOW_COUNT}", f"{p}latencyMs.count"
            )
        shadow = sd.get("shadow") or {}
        if not isinstance(shadow, dict):
            raise InvalidMessage(f"{p}shadow must be an object", f"{p}shadow")
        sp = f"{p}shadow."
        shadow_count = get_int(shadow, "count", sp, default=0, maximum=MAX_WINDOW_COUNT)
        argmax_agree = get_int(shadow, "argmaxAgree", sp, default=0, maximum=MAX_WINDOW_COUNT)
        if shadow_count > requests or argmax_agree > shadow_count:
            raise InvalidMessage(f"{sp}count exceeds the requests it samples", f"{sp}count")
        series.append(
            SeriesWindow(
                model=check_name(req_str(sd, "model", p), f"{p}model"),
                version=check_version(req_str(sd, "version", p), f"{p}version"),
                requests=requests,
                errors=errors,
                latency_ms=sketch,
                shadow_count=shadow_count,
                drift_sum=get_number(
                    shadow, "driftSum", sp, default=0.0, maximum=shadow_count * MAX_DRIFT
                ),
                argmax_agree=argmax_agree,
            )
        )
    start = parse_time(d.get("windowStart"), "windowStart")
    end = parse_time(d.get("windowEnd"), "windowEnd")
    if end < start:
        raise InvalidMessage("windowEnd is before windowStart", "windowEnd")
    extra = extra_fields(d, ("agentId", "seq", "windowStart", "windowEnd", "series"))
    return MetricsBatch(
        agent_id=req_str(d, "agentId"),
        seq=get_int(d, "seq", minimum=1),
        window_start=start,
        window_end=end,
        series=tuple(series),
        extra=extra,
    )
