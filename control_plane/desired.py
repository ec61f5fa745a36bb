"""Desired state: which versions each agent should run, signed and versioned by generation."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from control_plane.db.models import DesiredStateRow, Model, ModelVersion, Rollout
from protocol.desired import DesiredModel, DesiredState, desired_from_json
from protocol.labels import matches

ACTIVE_ROLLOUT_STATES = ("running", "completed")


@dataclass(frozen=True)
class TargetingRollout:
    """What desired-state computation needs to know of a rollout."""

    id: str
    model: str
    version: str
    manifest_digest: str
    selector: dict[str, str]
    created_at: datetime
    rollback: bool = False


def desired_models(
    rollouts: Sequence[TargetingRollout], labels: dict[str, str]
) -> tuple[DesiredModel, ...]:
    """The versions an agent with ``labels`` should run: per model, the newest matching rollout."""
    chosen: dict[str, TargetingRollout] = {}
    for r in sorted(rollouts, key=lambda r: (r.created_at, r.id)):
        if matches(r.selector, labels):
            chosen[r.model] = r
    return tuple(
        DesiredModel(r.model, r.version, r.manifest_digest, rollback=r.rollback)
        for r in sorted(chosen.values(), key=lambda r: r.model)
    )


async def active_rollouts(session: AsyncSession) -> list[TargetingRollout]:
    """Every rollout that currently places versions on agents."""
    rows = await session.execute(
        select(Rollout, ModelVersion, Model)
        .join(ModelVersion, Rollout.model_version_id == ModelVersion.id)
        .join(Model, ModelVersion.model_id == Model.id)
        .where(Rollout.state.in_(ACTIVE_ROLLOUT_STATES))
    )
    return [
        TargetingRollout(
            r.id,
            m.name,
            v.version,
            v.manifest_digest,
            r.selector,
            r.created_at,
            rollback=bool(r.options.get("rollback")),
        )
        for r, v, m in rows
    ]


class DesiredSigner:
    """Signs desired-state documents with the control plane's key."""

    def __init__(self, key: Ed25519PrivateKey, ttl: timedelta) -> None:
        self.key = key
        self.ttl = ttl

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
        if row is not None and not force:
            current = desired_from_json(row.document)
            if current.models == models:
                return None
        if row is None and not models and not force:
            return None
        generation = (row.generation if row else 0) + 1
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
        await session.flush()
        return generation
