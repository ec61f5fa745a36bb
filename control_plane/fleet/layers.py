"""Configuration layers as stored: change one (checked against every agent it reaches), list
them, and an agent's effective configuration beside the digest it reports it applied.

The merge and validation rules are control_plane/fleet/config.py's; this module does the I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from control_plane.db.engine import Database
from control_plane.db.models import Agent, ConfigLayer, DesiredStateRow, Model, ModelVersion
from control_plane.errors import Invalid, NotFound
from control_plane.fleet.config import (
    Layer,
    config_errors,
    effective,
    parse_changes,
    precedence,
    set_values,
    unset_values,
    validate,
)
from control_plane.fleet.desired import (
    DesiredSigner,
    applying_rollouts,
    candidates_for_many,
    config_sources,
    desired_models,
    layer_of,
)
from protocol.exceptions import InvalidMessage
from protocol.fields import get_str
from protocol.labels import Selector, parse_selector
from protocol.manifest import check_name
from protocol.timeutil import format_time


@dataclass(frozen=True, kw_only=True)
class ConfigChange:
    """A change to one layer, parsed at the edge: keys to set and keys to unset."""

    model: str
    scope: str
    selector: Selector | None
    agent_id: str | None
    assignments: dict[str, Any]
    removals: tuple[str, ...]

    @property
    def target(self) -> str:
        """The layer's one string per model (the unique key of its row)."""
        if self.scope == "agent":
            return f"agent:{self.agent_id}"
        if self.scope == "selector":
            return f"selector:{self.selector}"
        return "fleet"

    @classmethod
    def parse(cls, body: dict[str, Any]) -> ConfigChange:
        """Parse a JSON body; raises Invalid or InvalidMessage naming the field."""
        model = check_name(get_str(body, "model") or "", "model")
        scope = get_str(body, "scope", optional=True) or ""
        selector = agent_id = None
        if scope == "selector":
            text = get_str(body, "selector", max_len=1024) or ""
            selector = parse_selector(text)
            if not selector.requirements:
                raise Invalid("invalid", "a selector layer needs a non-empty selector", "selector")
        elif scope == "agent":
            agent_id = get_str(body, "agent", max_len=36)
        elif scope != "fleet":
            raise Invalid("invalid", "scope must be fleet, selector or agent", "scope")
        assignments, removals = parse_changes(body)
        return cls(
            model=model,
            scope=scope,
            selector=selector,
            agent_id=agent_id,
            assignments=assignments,
            removals=removals,
        )


def layer_json(row: ConfigLayer) -> dict[str, Any]:
    """Public view of a stored layer."""
    layer = layer_of(row)
    return {
        "id": row.id,
        "model": row.model,
        "scope": row.scope,
        "selector": str(layer.selector) if layer.selector is not None else None,
        "agent": row.agent_id,
        "rollout": row.rollout_id,
        "values": row.values,
        "createdAt": format_time(row.created_at),
        "updatedAt": format_time(row.updated_at),
    }


async def _live_agents(s: AsyncSession) -> list[Agent]:
    rows = await s.scalars(select(Agent).order_by(Agent.enrolled_at, Agent.id))
    return [a for a in rows if not a.pending and a.revoked_at is None]


async def check_layers(
    s: AsyncSession, model: str, changed: Layer, agents: list[Agent], where: str
) -> None:
    """Raise Invalid unless every agent ``changed`` reaches meets its version's schema with
    ``changed`` in place of the stored layer of the same id (0: a new layer).

    When it reaches no agent that runs the model, its values over the newest version's
    defaults are checked against that version's schema, so a typo is caught before an agent
    ever matches.
    """
    candidates = await candidates_for_many(s, [a.id for a in agents])
    digests = {c.manifest_digest for cs in candidates.values() for c in cs}
    newest = await s.scalar(
        select(ModelVersion.manifest_digest)
        .join(Model)
        .where(Model.name == model)
        .order_by(ModelVersion.created_at.desc(), ModelVersion.id.desc())
        .limit(1)
    )
    if newest is not None:
        digests.add(newest)
    sources = await config_sources(s, digests)
    layers = [x for x in sources.layers if x.model == model and x.id != changed.id]
    if changed.values:
        layers.append(changed)
    checked = 0
    for agent in agents:
        rollouts = applying_rollouts(candidates[agent.id], agent.labels)
        if not changed.matches(agent.id, agent.labels, rollouts | {changed.rollout_id or ""}):
            continue
        for m in desired_models(candidates[agent.id], agent.labels):
            if m.name != model:
                continue
            schema = sources.schema(m.manifest_digest)
            config = effective(
                layers, agent_id=agent.id, labels=agent.labels, schema=schema, rollouts=rollouts
            )
            validate(config, schema, where=f"{where} on agent {agent.name} ({m.version})")
            checked += 1
    if not checked and changed.values:
        if newest is None:
            raise NotFound("model_not_found", f"no version of {model} is published", "model")
        schema = sources.schema(newest)
        alone = effective([changed], agent_id="", labels={}, schema=schema, rollouts=["*"])
        # Alone, a layer may lack what another layer would give: only its own keys count.
        errors = [e for e in config_errors(alone, schema) if e.split(":")[0].split(".")[0] in alone]
        if errors:
            path = errors[0].split(":", 1)[0]
            raise Invalid("invalid_config", f"{where}: {errors[0]}", path)


async def change_layer(
    db: Database, signer: DesiredSigner, change: ConfigChange, now: datetime
) -> tuple[dict[str, Any] | None, list[str]]:
    """Apply a change to one layer, checked first; return the layer (None once empty) and
    the agents whose desired state moved.

    Raises NotFound for an unknown model or agent and Invalid naming the path of a value the
    schema refuses on any agent the layer reaches; nothing is stored then.
    """
    async with db.write() as s:
        if await s.scalar(select(Model.id).where(Model.name == change.model)) is None:
            raise NotFound("model_not_found", f"no model {change.model}", "model")
        if change.agent_id is not None and await s.get(Agent, change.agent_id) is None:
            raise NotFound("agent_not_found", f"no agent {change.agent_id}", "agent")
        row = await s.scalar(
            select(ConfigLayer)
            .where(ConfigLayer.model == change.model, ConfigLayer.target == change.target)
            .with_for_update()
        )
        old = row.values if row is not None else {}
        try:
            values = unset_values(set_values(old, change.assignments), change.removals)
        except InvalidMessage as exc:
            raise Invalid("invalid", str(exc), exc.field) from None
        layer = Layer(
            id=row.id if row is not None else 0,
            model=change.model,
            scope=change.scope,
            selector=change.selector,
            agent_id=change.agent_id,
            values=values,
            created_at=row.created_at if row is not None else now,
        )
        agents = await _live_agents(s)
        await check_layers(s, change.model, layer, agents, f"{change.scope} layer")
        if row is None and values:
            row = ConfigLayer(
                model=change.model,
                scope=change.scope,
                target=change.target,
                selector=change.selector.to_json() if change.selector is not None else None,
                agent_id=change.agent_id,
                values=values,
                created_at=now,
                updated_at=now,
            )
            s.add(row)
        elif row is not None and values:
            row.values = values
            row.updated_at = now
        elif row is not None:
            await s.delete(row)
            row = None
        await s.flush()
        out = layer_json(row) if row is not None else None
        changed = await signer.refresh_many(s, agents, now)
    return out, sorted(changed)


async def list_layers(db: Database, model: str | None = None) -> list[dict[str, Any]]:
    """Every layer (of one model), in precedence order within each model."""
    async with db.read() as s:
        q = select(ConfigLayer)
        if model is not None:
            q = q.where(ConfigLayer.model == model)
        rows = list(await s.scalars(q))
    rows.sort(key=lambda r: (r.model, precedence(layer_of(r))))
    return [layer_json(r) for r in rows]


async def agent_config(db: Database, agent_id: str) -> dict[str, Any]:
    """An agent's configuration per model: what was signed for it, with its digest, and the
    digest the agent reports it applied. Raises NotFound for an unknown agent."""
    async with db.read() as s:
        agent = await s.get(Agent, agent_id)
        if agent is None:
            raise NotFound("agent_not_found", f"no agent {agent_id}", "id")
        row = await s.get(DesiredStateRow, agent_id)
        candidates = (await candidates_for_many(s, [agent_id]))[agent_id]
        sources = await config_sources(s, {c.manifest_digest for c in candidates})
    reported = {
        m.get("name"): m
        for m in agent.status.get("models", [])
        if isinstance(m, dict) and m.get("state") == "active"
    }
    failed = {
        m.get("name"): m
        for m in agent.status.get("models", [])
        if isinstance(m, dict) and m.get("state") in ("failed", "refused")
    }
    rollouts = applying_rollouts(candidates, agent.labels)
    models = []
    for m in row.document.get("models", []) if row is not None else []:
        name = m.get("name")
        layers = [
            x
            for x in sources.layers
            if x.model == name and x.matches(agent_id, agent.labels, rollouts)
        ]
        schema = sources.schema(m.get("manifestDigest", ""))
        merged = effective(
            layers, agent_id=agent_id, labels=agent.labels, schema=schema, rollouts=rollouts
        )
        errors = config_errors(merged, schema) if (layers or schema) else []
        active = reported.get(name) or {}
        entry = {
            "model": name,
            "version": m.get("version"),
            "config": m.get("config"),
            "configDigest": m.get("configDigest"),
            "appliedDigest": active.get("configDigest"),
            "applied": active.get("configDigest") == m.get("configDigest")
            and active.get("manifestDigest") == m.get("manifestDigest"),
            "layers": [x.id for x in layers],
        }
        if errors:
            entry["invalid"] = errors  # not signed: the agent runs the schema's defaults
        bad = failed.get(name)
        if bad is not None and bad.get("configDigest") == m.get("configDigest"):
            entry["failed"] = bad.get("reason") or bad.get("state")
        models.append(entry)
    return {"agentId": agent_id, "name": agent.name, "labels": agent.labels, "models": models}


async def add_rollout_layer(
    s: AsyncSession,
    *,
    rollout_id: str,
    model: str,
    version: str,
    manifest_digest: str,
    selector: Selector,
    values: dict[str, Any],
    agents: list[Agent],
    now: datetime,
) -> None:
    """Store the layer a configuration rollout carries, checked first on every agent its
    selector matches (on the rollout's version, with the stored layers of the model).

    Raises Invalid naming the path of a value the version's schema refuses; the caller's
    transaction then stores nothing.
    """
    layer = Layer(
        id=0,
        model=model,
        scope="selector",
        selector=selector,
        values=values,
        created_at=now,
        rollout_id=rollout_id,
    )
    sources = await config_sources(s, {manifest_digest})
    schema = sources.schema(manifest_digest)
    layers = [*(x for x in sources.layers if x.model == model and x.rollout_id is None), layer]
    where = f"configuration rollout of {model} {version}"
    targets = [a for a in agents if selector.matches(a.labels)]
    for a in targets:
        config = effective(
            layers, agent_id=a.id, labels=a.labels, schema=schema, rollouts={rollout_id}
        )
        validate(config, schema, where=f"{where} on agent {a.name}")
    if not targets:
        validate(
            effective([layer], agent_id="", labels={}, schema=schema, rollouts={rollout_id}),
            schema,
            where=where,
        )
    s.add(
        ConfigLayer(
            model=model,
            scope="selector",
            target=f"rollout:{rollout_id}",
            selector=selector.to_json(),
            rollout_id=rollout_id,
            values=values,
            created_at=now,
            updated_at=now,
        )
    )
