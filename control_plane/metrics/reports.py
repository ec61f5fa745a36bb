"""Where does a model run best? Comparison reports, time series and the fleet overview.

Every latency figure comes from merged DDSketches (never an average of percentiles); cost per
million inferences is each agent's declared hourly cost over the window, summed per group and
divided by the requests the group served (so it is weighted by requests).

A stored row that cannot be merged (see metrics/rollup.py) is left out of a report, not
answered with a 500: the report says how many it left out (``skipped_rows``) and the rows are
counted once in the ``SkippedRows`` the caller passes (the control plane's, shown by /health).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select

from control_plane.db.engine import Database
from control_plane.db.models import Agent, Model, ModelVersion, Rollout
from control_plane.errors import NotFound
from control_plane.metrics.series import SeriesRow, SkippedRows, series_rows, usable
from control_plane.rollout.spec import parse_duration
from protocol.exceptions import InvalidMessage
from protocol.facts import MAX_COST_PER_HOUR, valid_facts
from protocol.manifest import check_name
from protocol.sketch import DDSketch
from protocol.timeutil import format_time, parse_time

DIMENSIONS_BUILTIN = ("site", "agent", "version")
MIN_REQUESTS_TO_JUDGE = 100


@dataclass(frozen=True)
class Window:
    """The time range of a report."""

    start: datetime
    end: datetime

    @property
    def seconds(self) -> float:
        """Its length."""
        return max((self.end - self.start).total_seconds(), 1e-9)


def parse_window(query: Mapping[str, str], now: datetime) -> Window:
    """``since=1h`` (default), or ``from``/``to`` RFC 3339; raises InvalidMessage."""
    if "from" in query:
        start = parse_time(query["from"], "from")
        end = parse_time(query["to"], "to") if "to" in query else now
    else:
        start = now - timedelta(seconds=parse_duration(query.get("since", "1h"), "since"))
        end = now
    if end <= start:
        raise InvalidMessage("the window must end after it starts", "to")
    return Window(start, end)


def parse_by(text: str) -> list[str]:
    """``site`` (default), any label key, ``agent``, ``version``, or two of them."""
    dims = [d.strip() for d in (text or "site").split(",") if d.strip()]
    if not 1 <= len(dims) <= 2 or len(set(dims)) != len(dims):
        raise InvalidMessage("by takes one or two distinct dimensions, e.g. site,version", "by")
    return dims


@dataclass(frozen=True, kw_only=True)
class ReportQuery:
    """What a comparison or a time series is asked for, checked: the model, the versions (none:
    all), the window, one or two dimensions to group by, and the bucket of a time series."""

    model: str
    versions: tuple[str, ...]
    window: Window
    by: tuple[str, ...]
    bucket_s: float = 60.0


def parse_report_query(
    query: Mapping[str, str], now: datetime, *, series: bool = False
) -> ReportQuery:
    """A report's query string (``model``, ``version``, ``since`` or ``from``/``to``, ``by``,
    and for a time series ``bucket``) as a ReportQuery; raises InvalidMessage naming the field."""
    if not query.get("model"):
        raise InvalidMessage("model is required", "model")
    model = check_name(query["model"], "model")
    window = parse_window(query, now)
    bucket = parse_duration(query.get("bucket", "1m"), "bucket") if series else 60.0
    if not 60 <= bucket <= 86400:
        raise InvalidMessage("bucket must be between 1m and 1d", "bucket")
    if window.seconds / bucket > 2000 and series:
        raise InvalidMessage("too many buckets: widen the bucket or shorten the window", "bucket")
    return ReportQuery(
        model=model,
        versions=tuple(v for v in query.get("version", "").split(",") if v),
        window=window,
        by=tuple(parse_by(query.get("by", "site"))),
        bucket_s=bucket,
    )


def cost_per_hour(agent: Agent) -> float | None:
    """Declared at enrollment (--cost-per-hour) or as a ``cost-per-hour`` label."""
    value = valid_facts(agent.facts).get("costPerHour", agent.labels.get("cost-per-hour"))
    try:
        cost = float(value) if value is not None else None
    except (TypeError, ValueError):
        return None
    # A label is any string: "nan", "inf" or "1e308" would poison every sum (a finite price
    # times hours overflows) and the JSON answer.
    return cost if cost is not None and 0 <= cost <= MAX_COST_PER_HOUR else None


def hardware(agent: Agent) -> str:
    """A short description of an agent's machine."""
    f = valid_facts(agent.facts)  # rows stored before the facts schema may hold anything
    accel = ",".join(f.get("accelerators") or []) or "cpu"
    return f"{f.get('cpuCount', '?')} cpu {f.get('arch', '?')} {accel}"


@dataclass
class Group:
    """Accumulated figures of one group."""

    key: dict[str, str]
    agents: set[str] = field(default_factory=set)
    requests: int = 0
    errors: int = 0
    sketch: DDSketch = field(default_factory=DDSketch)

    def to_json(self, window: Window, by_id: dict[str, Agent]) -> dict[str, Any]:
        costs = [cost_per_hour(by_id[a]) for a in self.agents if a in by_id]
        hours = window.seconds / 3600
        known = [c for c in costs if c is not None]
        cost = sum(known) * hours if known and len(known) == len(costs) else None
        q = {k: self.sketch.quantile(v) for k, v in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99))}
        return {
            "key": self.key,
            "agents": len(self.agents),
            "requests": self.requests,
            "errors": self.errors,
            "error_rate": round(self.errors / self.requests, 6) if self.requests else 0.0,
            "throughput_rps": round(self.requests / window.seconds, 9),
            "latency_ms": {k: round(v, 4) if v is not None else None for k, v in q.items()},
            "cost": round(cost, 6) if cost is not None else None,
            "cost_per_million": (
                round(cost / self.requests * 1e6, 4) if cost is not None and self.requests else None
            ),
            "hardware": dict(Counter(hardware(by_id[a]) for a in self.agents if a in by_id)),
            "enough_requests": self.requests >= MIN_REQUESTS_TO_JUDGE,
        }


def _key_value(dim: str, agent: Agent | None, row: SeriesRow) -> str:
    if dim == "version":
        return row.version
    if dim == "agent":
        return agent.name if agent else row.agent_id
    if agent is None:
        return "unknown"
    return str(agent.labels.get(dim, "none"))


def verdict(groups: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Name the best group on latency (p95) and on cost, and by how much."""
    judged = [g for g in groups if g["enough_requests"]]
    label = lambda g: ",".join(f"{k}={v}" for k, v in g["key"].items())  # noqa: E731
    out: dict[str, Any] = {
        "too_few_requests": [label(g) for g in groups if not g["enough_requests"]],
        "min_requests": MIN_REQUESTS_TO_JUDGE,
    }
    lat = sorted(
        (g for g in judged if g["latency_ms"]["p95"] is not None),
        key=lambda g: g["latency_ms"]["p95"],
    )
    if lat:
        best = lat[0]
        out["fastest"] = {"group": label(best), "p95_ms": best["latency_ms"]["p95"]}
        # A p95 of 0 (latencies at or below the sketch's MIN_VALUE) is no "times faster".
        if len(lat) > 1 and best["latency_ms"]["p95"] > 0:
            nxt = lat[1]["latency_ms"]["p95"]
            out["fastest"]["runner_up"] = label(lat[1])
            out["fastest"]["times_faster"] = round(nxt / best["latency_ms"]["p95"], 3)
    cost = sorted(
        (g for g in judged if g["cost_per_million"] is not None),
        key=lambda g: g["cost_per_million"],
    )
    if cost:
        best = cost[0]
        out["cheapest"] = {"group": label(best), "cost_per_million": best["cost_per_million"]}
        if len(cost) > 1 and best["cost_per_million"] > 0:
            out["cheapest"]["runner_up"] = label(cost[1])
            out["cheapest"]["times_cheaper"] = round(
                cost[1]["cost_per_million"] / best["cost_per_million"], 3
            )
    parts = []
    if "fastest" in out:
        f = out["fastest"]
        parts.append(
            f"fastest: {f['group']} (p95 {f['p95_ms']:.3g} ms"
            + (f", {f['times_faster']}x faster than {f['runner_up']})" if "runner_up" in f else ")")
        )
    if "cheapest" in out:
        c = out["cheapest"]
        parts.append(
            f"cheapest: {c['group']} ({c['cost_per_million']:.4g} per million"
            + (
                f", {c['times_cheaper']}x cheaper than {c['runner_up']})"
                if "runner_up" in c
                else ")"
            )
        )
    if out["too_few_requests"]:
        parts.append(
            f"too few requests to judge (< {MIN_REQUESTS_TO_JUDGE}): "
            + ", ".join(out["too_few_requests"])
        )
    out["summary"] = "; ".join(parts) or "no traffic in this window"
    return out


@dataclass
class _Read:
    """The usable rows of a report's window, its agents, and how many rows it left out."""

    rows: list[tuple[SeriesRow, DDSketch]]
    agents: dict[str, Agent]
    skipped: int


async def _rows(
    db: Database, model: str, versions: list[str], window: Window, skipped: SkippedRows | None
) -> _Read:
    mine = SkippedRows(parent=skipped)  # this report's own count; the shared one logs
    async with db.read() as s:
        if await s.scalar(select(Model.id).where(Model.name == model)) is None:
            raise NotFound("model_not_found", f"no model named {model!r}", "model")
        stored = await series_rows(s, model, window.start, window.end, versions, skipped=mine)
        agents = {a.id: a for a in await s.scalars(select(Agent))}
    return _Read(list(usable(stored, mine, "reports")), agents, mine.skips)


async def compare(
    db: Database, query: ReportQuery, skipped: SkippedRows | None = None
) -> dict[str, Any]:
    """The comparison report; raises InvalidMessage or NotFound.

    Stored rows that cannot be merged are left out, counted in the answer and in ``skipped``.
    """
    model, versions, window, by = query.model, list(query.versions), query.window, query.by
    read = await _rows(db, model, versions, window, skipped)
    agents = read.agents
    groups: dict[tuple[str, ...], Group] = {}
    for row, sketch in read.rows:
        agent = agents.get(row.agent_id)
        key = tuple(_key_value(d, agent, row) for d in by)
        g = groups.get(key)
        if g is None:
            g = groups[key] = Group(dict(zip(by, key, strict=True)))
        g.agents.add(row.agent_id)
        g.requests += row.requests
        g.errors += row.errors
        g.sketch.merge(sketch)
    out = [groups[k].to_json(window, agents) for k in sorted(groups)]
    return {
        "model": model,
        "versions": versions or sorted({r.version for r, _ in read.rows}),
        "by": by,
        "window": {
            "from": format_time(window.start),
            "to": format_time(window.end),
            "seconds": round(window.seconds, 3),
        },
        "relative_accuracy": DDSketch().relative_accuracy,
        "groups": out,
        "verdict": verdict(out),
        "skipped_rows": read.skipped,
    }


async def timeseries(
    db: Database, query: ReportQuery, skipped: SkippedRows | None = None
) -> dict[str, Any]:
    """Requests, errors and p95 per group per bucket; raises InvalidMessage or NotFound.

    Stored rows that cannot be merged are left out, counted in the answer and in ``skipped``.
    """
    model, versions, window, by = query.model, list(query.versions), query.window, query.by
    bucket = query.bucket_s
    read = await _rows(db, model, versions, window, skipped)
    series: dict[tuple[str, ...], dict[int, Group]] = defaultdict(dict)
    for row, sketch in read.rows:
        key = tuple(_key_value(d, read.agents.get(row.agent_id), row) for d in by)
        slot = int((row.window_start - window.start).total_seconds() // bucket)
        g = series[key].get(slot)
        if g is None:
            g = series[key][slot] = Group(dict(zip(by, key, strict=True)))
        g.requests += row.requests
        g.errors += row.errors
        g.sketch.merge(sketch)
    out = []
    for key in sorted(series):
        points = []
        for slot in sorted(series[key]):
            g = series[key][slot]
            p50, p95, p99 = (g.sketch.quantile(q) for q in (0.5, 0.95, 0.99))
            points.append(
                {
                    "t": format_time(window.start + timedelta(seconds=slot * bucket)),
                    "requests": g.requests,
                    "errors": g.errors,
                    "throughput_rps": round(g.requests / bucket, 4),
                    "p50_ms": round(p50, 4) if p50 is not None else None,
                    "p95_ms": round(p95, 4) if p95 is not None else None,
                    "p99_ms": round(p99, 4) if p99 is not None else None,
                }
            )
        out.append({"key": dict(zip(by, key, strict=True)), "points": points})
    return {
        "model": model,
        "by": by,
        "bucket_seconds": bucket,
        "window": {"from": format_time(window.start), "to": format_time(window.end)},
        "series": out,
        "skipped_rows": read.skipped,
    }


def agent_state(agent: Agent, now: datetime, offline_after_s: float) -> str:
    """online, offline, updating, failed, stale (its desired state expired), pending (waits
    for approval), or revoked."""
    if agent.revoked_at is not None:
        return "revoked"
    if agent.pending:
        return "pending"
    states = {m.get("state") for m in agent.status.get("models", [])}
    if states & {"failed", "refused"}:
        return "failed"
    if states & {"downloading", "loading"}:
        return "updating"
    if agent.status.get("presence") == "offline":  # the broker delivered its Last Will
        return "offline"
    seen = agent.last_seen_at
    if seen is None or (now - seen).total_seconds() > offline_after_s:
        return "offline"
    if agent.status.get("desiredState") == "stale":  # serving, on an expired desired state
        return "stale"
    return "online"


async def fleet(db: Database, now: datetime, offline_after_s: float) -> dict[str, Any]:
    """Agents by site and state, versions deployed per model, active rollouts."""
    async with db.read() as s:
        agents = list(await s.scalars(select(Agent)))
        active = (
            await s.execute(
                select(Rollout, ModelVersion.version, Model.name)
                .join(ModelVersion, Rollout.model_version_id == ModelVersion.id)
                .join(Model, ModelVersion.model_id == Model.id)
                .where(Rollout.state.in_(("pending", "running", "paused")))
                .order_by(Rollout.created_at)
            )
        ).all()
    sites: dict[str, Counter[str]] = defaultdict(Counter)
    deployed: dict[str, Counter[str]] = defaultdict(Counter)
    for a in agents:
        sites[a.labels.get("site", "none")][agent_state(a, now, offline_after_s)] += 1
        for m in a.status.get("models", []):
            if m.get("state") == "active":
                deployed[m["name"]][m["version"]] += 1
    return {
        "agents": len(agents),
        "sites": {site: dict(c) for site, c in sorted(sites.items())},
        "models": {name: dict(c) for name, c in sorted(deployed.items())},
        "rollouts": [
            {
                "id": r.id,
                "model": name,
                "version": version,
                "state": r.state,
                "stage": r.stage_index + 1,
                "stages": len(r.stages),
            }
            for r, version, name in active
        ],
    }
