"""Desired state: which versions each agent should run, signed and versioned by generation."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from control_plane.db.engine import Database
from control_plane.db.models import (
    Agent,
    ConfigLayer,
    DesiredStateRow,
    Model,
    ModelVersion,
    Rollout,
    RolloutTarget,
)
from control_plane.fleet.config import Layer, config_errors, effective, schema_defaults
from control_plane.telemetry import OFF, Telemetry
from protocol.desired import DesiredModel, DesiredState, Shadow, desired_from_json
from protocol.labels import Selector, selector_from_json
from protocol.timeutil import parse_time


@dataclass(frozen=True)
class Candidate:
    """A rollout as one agent sees it."""

    id: str
    model: str
    version: str
    manifest_digest: str
    selector: Selector
    created_at: datetime
    state: str
    moved: bool  # this rollout moved this agent
    join_later: bool = True
    rollback: bool = False
    shadow_sample: float | None = None  # set when the rollout shadow-scores


def _applies(c: Candidate, labels: dict[str, str]) -> bool:
    if c.state in ("pending", "rolled_back"):
        return False
    if c.moved:
        return True
    return c.state == "completed" and c.join_later and c.selector.matches(labels)


def desired_models(
    candidates: Sequence[Candidate], labels: dict[str, str]
) -> tuple[DesiredModel, ...]:
    """The versions an agent should run: per model, the newest rollout that applies to it.

    A rollout applies to the agents it moved, and, once completed, to every matching agent
    (unless it does not take agents that join later). A rolled-back rollout applies to none,
    and the version its agents fall back to is marked as an ordered rollback. A running
    shadow-scoring rollout names the version it replaces as the shadow.
    """
    ordered = sorted(candidates, key=lambda c: (c.created_at, c.id))
    out = []
    for model in sorted({c.model for c in ordered}):
        mine = [c for c in ordered if c.model == model]
        applying = [c for c in mine if _applies(c, labels)]
        if not applying:
            continue
        chosen = applying[-1]
        rolled_back_later = any(
            c.state == "rolled_back" and c.moved and c.created_at >= chosen.created_at for c in mine
        )
        shadow = None
        if chosen.shadow_sample and chosen.state in ("running", "paused") and len(applying) > 1:
            prev = applying[-2]
            if prev.manifest_digest != chosen.manifest_digest:
                shadow = Shadow(prev.version, prev.manifest_digest, chosen.shadow_sample)
        out.append(
            DesiredModel(
                chosen.model,
                chosen.version,
                chosen.manifest_digest,
                rollback=chosen.rollback or rolled_back_later,
                shadow=shadow,
            )
        )
    return tuple(out)


def applying_rollouts(candidates: Sequence[Candidate], labels: dict[str, str]) -> set[str]:
    """The ids of the rollouts that apply to an agent now (a configuration rollout's layer
    applies to the same agents as its version does)."""
    return {c.id for c in candidates if _applies(c, labels)}


@dataclass(frozen=True)
class ConfigSources:
    """What configuration is made of: every layer, and each version's schema by digest."""

    layers: tuple[Layer, ...] = ()
    schemas: Mapping[str, Mapping[str, Any] | None] = field(default_factory=dict)

    def schema(self, manifest_digest: str) -> Mapping[str, Any] | None:
        """The configuration schema a version declares (None: it declares none)."""
        return self.schemas.get(manifest_digest)


def configured(
    models: tuple[DesiredModel, ...],
    sources: ConfigSources,
    *,
    agent_id: str,
    labels: dict[str, str],
    rollouts: Collection[str],
) -> tuple[DesiredModel, ...]:
    """The desired models with their merged configuration.

    A model whose version declares no schema and has no layer gets none (documents stay as
    they were before configuration existed). A merge that does not meet the version's schema
    (a version with a stricter schema than the layers were checked against) is not signed:
    the agent gets the schema's defaults, and ``config show`` says why.
    """
    out = []
    for m in models:
        schema = sources.schema(m.manifest_digest)
        mine = [x for x in sources.layers if x.model == m.name]
        if schema is None and not mine:
            out.append(m)
            continue
        config = effective(mine, agent_id=agent_id, labels=labels, schema=schema, rollouts=rollouts)
        if config_errors(config, schema):
            config = schema_defaults(schema)
        out.append(replace(m, config=config))
    return tuple(out)


def layer_of(row: ConfigLayer) -> Layer:
    """A stored layer as the merge sees it."""
    return Layer(
        id=row.id,
        model=row.model,
        scope=row.scope,
        selector=selector_from_json(row.selector) if row.selector is not None else None,
        agent_id=row.agent_id,
        values=row.values,
        created_at=row.created_at,
        rollout_id=row.rollout_id,
    )


async def config_sources(session: AsyncSession, digests: Collection[str]) -> ConfigSources:
    """Every configuration layer, and the schemas of these versions."""
    layers = tuple(layer_of(r) for r in await session.scalars(select(ConfigLayer)))
    schemas: dict[str, Mapping[str, Any] | None] = {}
    for chunk in _chunks(sorted(digests)):
        found = await session.execute(
            select(ModelVersion.manifest_digest, ModelVersion.manifest).where(
                ModelVersion.manifest_digest.in_(chunk)
            )
        )
        for digest, manifest in found:
            schema = manifest.get("configSchema") if isinstance(manifest, dict) else None
            schemas[digest] = schema if isinstance(schema, dict) else None
    return ConfigSources(layers, schemas)


def _chunks(ids: list[str], size: int = 500) -> list[list[str]]:
    return [ids[i : i + size] for i in range(0, len(ids), size)]


async def candidates_for_many(
    session: AsyncSession, agent_ids: list[str]
) -> dict[str, list[Candidate]]:
    """Every started rollout as each of these agents sees it: a few queries for any number."""
    rows = (
        await session.execute(
            select(Rollout, ModelVersion.version, ModelVersion.manifest_digest, Model.name)
            .join(ModelVersion, Rollout.model_version_id == ModelVersion.id)
            .join(Model, ModelVersion.model_id == Model.id)
            .where(Rollout.state != "pending")
        )
    ).all()
    moved: set[tuple[str, str]] = set()
    for chunk in _chunks(agent_ids):
        found = await session.execute(
            select(RolloutTarget.rollout_id, RolloutTarget.agent_id).where(
                RolloutTarget.agent_id.in_(chunk)
            )
        )
        moved.update((r, a) for r, a in found)
    out: dict[str, list[Candidate]] = {a: [] for a in agent_ids}
    for r, version, digest, model in rows:
        spec = r.options.get("spec", {})
        selector = selector_from_json(r.selector)
        shadow = spec.get("shadow_sample", 0.05) if spec.get("shadow") else None
        for agent_id in agent_ids:
            out[agent_id].append(
                Candidate(
                    id=r.id,
                    model=model,
                    version=version,
                    manifest_digest=digest,
                    selector=selector,
                    created_at=r.created_at,
                    state=r.state,
                    moved=(r.id, agent_id) in moved,
                    join_later=bool(spec.get("join_later", True)),
                    rollback=bool(spec.get("rollback", r.options.get("rollback", False))),
                    shadow_sample=shadow,
                )
            )
    return out


def traced(
    models: tuple[DesiredModel, ...], before: tuple[DesiredModel, ...], traceparent: str | None
) -> tuple[DesiredModel, ...]:
    """The models with their trace context: an entry that carries one keeps it, an entry
    unchanged since ``before`` keeps the one it had (the order, and so its trace, is the same),
    and a new or changed entry takes ``traceparent`` (the span that signs this generation)."""
    old = {m.name: m for m in before}
    out = []
    for m in models:
        if m.traceparent is None:
            prev = old.get(m.name)
            kept = prev.traceparent if prev is not None and prev == m else None
            m = replace(m, traceparent=kept or traceparent)
        out.append(m)
    return tuple(out)


class DesiredSigner:
    """Signs desired-state documents with the control plane's key.

    With telemetry on, each new generation is signed in a ``desired_state.sign`` span, a child
    of the decision that caused it (a rollout's, or the request's), and the entries it changes
    carry that span's ``traceparent`` to the agent (docs/adr/0023-opentelemetry.md).
    """

    def __init__(
        self, key: Ed25519PrivateKey, ttl: timedelta, *, telemetry: Telemetry = OFF
    ) -> None:
        self.key = key
        self.ttl = ttl
        self.telemetry = telemetry

    async def refresh(self, session: AsyncSession, agent: Agent, now: datetime) -> int | None:
        """Recompute one agent's desired state; return the new generation when it changed."""
        changed = await self.refresh_many(session, [agent], now)
        return changed.get(agent.id)

    async def refresh_many(
        self,
        session: AsyncSession,
        agents: list[Agent],
        now: datetime,
        *,
        trace: Mapping[str, str | None] | None = None,
    ) -> dict[str, int]:
        """Recompute these agents' desired states together; return {agent id: new generation}
        for those that changed. ``trace``: per agent, the ``traceparent`` of the decision that
        changed it (else the current span is the parent)."""
        ids = [a.id for a in agents]
        candidates = await candidates_for_many(session, ids)
        rows: dict[str, DesiredStateRow] = {}
        for chunk in _chunks(ids):
            found = await session.scalars(
                select(DesiredStateRow).where(DesiredStateRow.agent_id.in_(chunk)).with_for_update()
            )
            rows.update((r.agent_id, r) for r in found)
        digests = {c.manifest_digest for cs in candidates.values() for c in cs}
        sources = await config_sources(session, digests)
        changed = {}
        for agent in agents:
            if agent.pending or agent.revoked_at is not None:
                models: tuple[DesiredModel, ...] = ()  # not approved, or cut off: nothing
            else:
                mine = candidates[agent.id]
                models = configured(
                    desired_models(mine, agent.labels),
                    sources,
                    agent_id=agent.id,
                    labels=agent.labels,
                    rollouts=applying_rollouts(mine, agent.labels),
                )
            parent = (trace or {}).get(agent.id)
            generation = self._apply(
                session, agent.id, models, now, rows.get(agent.id), parent=parent
            )
            if generation is not None:
                changed[agent.id] = generation
        await session.flush()
        return changed

    async def write(
        self,
        session: AsyncSession,
        agent_id: str,
        models: tuple[DesiredModel, ...],
        now: datetime,
        force: bool = False,
    ) -> int | None:
        """Store a new generation when ``models`` changed (or ``force``); return it, else None."""
        row = await session.get(DesiredStateRow, agent_id, with_for_update=True)
        generation = self._apply(session, agent_id, models, now, row, force)
        await session.flush()
        return generation

    def _apply(
        self,
        session: AsyncSession,
        agent_id: str,
        models: tuple[DesiredModel, ...],
        now: datetime,
        row: DesiredStateRow | None,
        force: bool = False,
        *,
        parent: str | None = None,
    ) -> int | None:
        before = desired_from_json(row.document).models if row is not None else ()
        if row is not None and not force and before == models:
            return None
        if row is None and not models and not force:
            return None
        generation = (row.generation if row else 0) + 1
        with self.telemetry.span(
            "desired_state.sign",
            parent=parent,
            attributes={
                "modelfleet.agent.id": agent_id,
                "modelfleet.desired.generation": generation,
            },
        ) as span:
            models = traced(models, before, span.traceparent())
            state = DesiredState(agent_id, generation, now, now + self.ttl, models)
            envelope = state.sign(self.key).to_bytes().decode()
        if row is None:
            session.add(
                DesiredStateRow(
                    agent_id=agent_id,
                    generation=generation,
                    document=state.to_json(),
                    envelope=envelope,
                    updated_at=now,
                )
            )
        else:
            row.generation = generation
            row.document = state.to_json()
            row.envelope = envelope
            row.updated_at = now
        return generation


async def current(db: Database, agent_id: str) -> DesiredStateRow | None:
    """The agent's stored desired state, if it has one."""
    async with db.read() as s:
        return await s.get(DesiredStateRow, agent_id)


def expiring(document: dict[str, Any], now: datetime, ttl: timedelta) -> bool:
    """Whether a signed document is past half its lifetime ``ttl``."""
    return parse_time(document.get("expiresAt"), "expiresAt") - now <= ttl / 2


async def refresh_if_expiring(
    db: Database, signer: DesiredSigner, row: DesiredStateRow, now: datetime
) -> DesiredStateRow:
    """Re-sign a document past half its lifetime, so a connected agent never holds a stale one.

    The long-poll calls this before it answers; the models stay, the generation moves on.
    """
    if not expiring(row.document, now, signer.ttl):
        return row
    async with db.write() as s:
        models = desired_from_json(row.document).models
        await signer.write(s, row.agent_id, models, now, force=True)
    fresh = await current(db, row.agent_id)
    assert fresh is not None
    return fresh
