"""Rollouts as a service: create (with overlap checks), show, list, and operator commands.

The controller (control_plane/rollout/controller.py) moves them; this module only records
what operators ask for and renders what happened.
"""

from __future__ import annotations

import math
import uuid
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select

from control_plane.db.engine import Database
from control_plane.db.models import (
    Agent,
    Model,
    ModelVersion,
    Rollout,
    RolloutEvent,
    RolloutTarget,
)
from control_plane.errors import Conflict, NotFound, Refused
from control_plane.fleet.desired import DesiredSigner
from control_plane.fleet.layers import add_rollout_layer
from control_plane.fleet.notify import DesiredNotifier
from control_plane.rollout.controller import (
    add_events,
    decision_spans,
    refresh_agents,
    selector_of,
    store_view,
    view_of,
)
from control_plane.rollout.machine import (
    ACTIVE_STATES,
    CommandError,
    Event,
    RolloutView,
    command,
)
from control_plane.rollout.spec import RolloutCommand, RolloutSpec
from control_plane.security.keyset import PublisherTrust
from protocol.dsse import MANIFEST_PAYLOAD_TYPE, parse_envelope, verify
from protocol.exceptions import ProtocolError
from protocol.timeutil import format_time


def _still_trusted(mv: ModelVersion, model: str, trust: PublisherTrust) -> None:
    """A version pushed under an older rule (a publisher since revoked, a lower threshold) is
    refused here, with the reason, rather than by every agent it would reach."""
    try:
        verify(
            parse_envelope(mv.envelope.encode()), trust.keys, MANIFEST_PAYLOAD_TYPE, trust.threshold
        )
    except ProtocolError as exc:
        rule = (
            f"key set version {trust.keyset_version}"
            if trust.keyset_version
            else "the trusted publisher keys"
        )
        raise Refused(
            "untrusted_signature",
            f"{model} {mv.version} no longer meets {rule}: {exc}; agents would refuse "
            "it (publish it again with the signatures now needed)",
            "version",
        ) from None


async def create_rollout(
    db: Database, spec: RolloutSpec, now: datetime, trust: PublisherTrust | None = None
) -> str:
    """Record a new rollout (pending until the controller starts it); return its id.

    ``spec`` is parsed at the edge (``rollout.spec.parse_spec``). Raises NotFound when the
    version is not published, Refused when its signatures no longer meet ``trust`` (agents
    would refuse it) and Conflict when it would touch agents an active rollout of the same
    model holds (unless it supersedes that one). A configuration rollout (``spec.config``)
    stores its layer, checked first: Invalid naming the path of a value the version's schema
    refuses.
    """
    rollout_id = str(uuid.uuid4())
    async with db.write() as s:
        mv = await s.scalar(
            select(ModelVersion)
            .join(Model)
            .where(Model.name == spec.model, ModelVersion.version == spec.version)
        )
        if mv is None:
            raise NotFound(
                "version_not_found", f"{spec.model} {spec.version} is not published", "version"
            )
        if trust is not None:
            _still_trusted(mv, spec.model, trust)
        agents = [
            a for a in await s.scalars(select(Agent)) if not a.pending and a.revoked_at is None
        ]
        mine = {a.id for a in agents if spec.selector.matches(a.labels)}
        active = await s.scalars(
            select(Rollout)
            .join(ModelVersion)
            .join(Model)
            .where(Model.name == spec.model, Rollout.state.in_(ACTIVE_STATES))
            .order_by(Rollout.created_at)
        )
        for other in active:
            theirs = {a.id for a in agents if selector_of(other).matches(a.labels)}
            if not (mine & theirs):
                continue
            if spec.supersedes != other.id:
                raise Conflict(
                    "rollout_overlaps",
                    f"rollout {other.id} of {spec.model} is {other.state} on {len(mine & theirs)} "
                    "of the same agents; wait for it, abort it, or pass supersedes",
                    "selector",
                )
            other.state = "superseded"
            other.updated_at = now
            add_events(
                s,
                other.id,
                [Event("superseded", f"superseded by rollout {rollout_id}", other.stage_index)],
                now,
            )
        s.add(
            Rollout(
                id=rollout_id,
                model_version_id=mv.id,
                selector=spec.selector.to_json(),
                stages=[st.to_json() for st in spec.stages],
                state="pending",
                options={"spec": spec.to_json()},
                created_at=now,
                updated_at=now,
            )
        )
        await s.flush()
        if spec.config is not None:
            await add_rollout_layer(
                s,
                rollout_id=rollout_id,
                model=spec.model,
                version=spec.version,
                manifest_digest=mv.manifest_digest,
                selector=spec.selector,
                values=dict(spec.config),
                agents=agents,
                now=now,
            )
        add_events(
            s,
            rollout_id,
            [
                Event(
                    "created",
                    f"{spec.model} {spec.version}"
                    + (" with configuration" if spec.config is not None else "")
                    + f" to {str(spec.selector) or 'every agent'}",
                    None,
                    {"matching_agents": len(mine)},
                )
            ],
            now,
        )
    return rollout_id


def _target_state(agent: Agent, model: str, digest: str) -> tuple[str, str | None]:
    for m in agent.status.get("models", []):
        if m.get("name") == model and m.get("manifestDigest") == digest:
            return m.get("state", "pending"), m.get("reason")
    return "pending", None


def _waiting(r: Rollout, view: RolloutView) -> dict[str, Any] | None:
    """What the rollout waits on now (None once it has ended), and when the stall bound ends it."""
    if r.state == "pending":
        return {"on": "controller", "reason": "the controller has not started it yet"}
    if r.state == "paused":
        return {
            "on": "operator",
            "reason": "paused: resume, promote or abort it",
            "stage": view.stage_index + 1,
            "since": format_time(r.updated_at),
        }
    doc = r.options.get("waiting")
    if r.state != "running" or not doc:
        return None
    doc = dict(doc)
    if view.stalled_since is not None:
        doc["stalledSince"] = format_time(view.stalled_since)
        limit = view.spec.stall_limit_s
        if not math.isinf(limit):
            doc["failsAt"] = format_time(view.stalled_since + timedelta(seconds=limit))
    return doc


async def get_rollout(db: Database, rollout_id: str) -> dict[str, Any]:
    """A rollout: stages with cohort sizes, gate results, timeline, targets.

    Raises NotFound when unknown.
    """
    async with db.read() as s:
        found = (
            await s.execute(
                select(Rollout, ModelVersion, Model)
                .join(ModelVersion, Rollout.model_version_id == ModelVersion.id)
                .join(Model, ModelVersion.model_id == Model.id)
                .where(Rollout.id == rollout_id)
            )
        ).first()
        if found is None:
            raise NotFound("rollout_not_found", f"no rollout {rollout_id}", "id")
        r, mv, model = found
        view = view_of(r)
        spec = view.spec
        agents = list(await s.scalars(select(Agent).order_by(Agent.enrolled_at, Agent.id)))
        matching = [a for a in agents if spec.selector.matches(a.labels)]
        targets = {
            t.agent_id: t
            for t in await s.scalars(select(RolloutTarget).where(RolloutTarget.rollout_id == r.id))
        }
        events = list(
            await s.scalars(
                select(RolloutEvent)
                .where(RolloutEvent.rollout_id == r.id)
                .order_by(RolloutEvent.id)
            )
        )
    by_id = {a.id: a for a in agents}
    stages = []
    for i, st in enumerate(spec.stages):
        moved = sum(1 for t in targets.values() if t.stage <= i)
        if r.state == "completed" or i < view.stage_index:
            status = "done"
        elif i == view.stage_index and r.state in ("running", "paused"):
            status = "current"
        elif i == view.stage_index and r.state == "pending":
            status = "pending"
        else:
            status = "stopped" if i == view.stage_index else "pending"
        stages.append(
            {
                **st.to_json(),
                "target": st.size(len(matching)),
                "moved": moved,
                "status": status,
                "gates": (r.gate_results or {}).get(str(i)),
            }
        )
    rows = []
    for agent_id, t in sorted(targets.items(), key=lambda kv: (kv[1].moved_at, kv[0])):
        agent = by_id.get(agent_id)
        state, reason = (
            _target_state(agent, model.name, mv.manifest_digest) if agent else ("gone", None)
        )
        rows.append(
            {
                "agentId": agent_id,
                "name": agent.name if agent else None,
                "site": agent.labels.get("site") if agent else None,
                "stage": t.stage + 1,
                "movedAt": format_time(t.moved_at),
                "state": state,
                "reason": reason,
            }
        )
    active = sum(1 for row in rows if row["state"] == "active")
    failed = sum(1 for row in rows if row["state"] in ("failed", "refused"))
    return {
        "id": r.id,
        "model": model.name,
        "version": mv.version,
        "manifestDigest": mv.manifest_digest,
        "state": r.state,
        "stage": view.stage_index + 1,
        "selector": str(spec.selector),
        "spec": spec.to_json(),
        "stages": stages,
        "gates": spec.gates.to_json(),
        # The gates in force, defaults included (marked "default": true), and the stall bound.
        "effectiveGates": spec.gates.effective_json(),
        "maxStall": spec.max_stall_json(),
        "failedAgents": failed,
        "waiting": _waiting(r, view),
        "progress": {"matching": len(matching), "moved": len(targets), "active": active},
        "createdAt": format_time(r.created_at),
        "updatedAt": format_time(r.updated_at),
        "soakStartedAt": format_time(r.soak_started_at) if r.soak_started_at else None,
        "timeline": [
            {
                "at": format_time(e.at),
                "kind": e.kind,
                "stage": e.stage + 1 if e.stage is not None else None,
                "reason": e.reason,
                "figures": e.figures,
            }
            for e in events
        ],
        "targets": rows,
    }


async def list_rollouts(db: Database) -> list[dict[str, Any]]:
    """Every rollout, newest first, in brief."""
    async with db.read() as s:
        rows = await s.execute(
            select(Rollout, ModelVersion.version, Model.name)
            .join(ModelVersion, Rollout.model_version_id == ModelVersion.id)
            .join(Model, ModelVersion.model_id == Model.id)
            .order_by(Rollout.created_at.desc())
        )
        return [
            {
                "id": r.id,
                "model": name,
                "version": version,
                "state": r.state,
                "stage": r.stage_index + 1,
                "stages": len(r.stages),
                "createdAt": format_time(r.created_at),
                "waiting": (
                    (r.options.get("waiting") or {}).get("reason") if r.state == "running" else None
                ),
            }
            for r, version, name in rows
        ]


async def run_command(
    db: Database,
    signer: DesiredSigner,
    notifier: DesiredNotifier,
    rollout_id: str,
    cmd: RolloutCommand,
    now: datetime,
) -> None:
    """Run ``cmd`` on the rollout; raises NotFound, or Conflict (not in a state for it)."""
    changed: list[str] = []
    async with db.write() as s:
        r = await s.scalar(select(Rollout).where(Rollout.id == rollout_id).with_for_update())
        if r is None:
            raise NotFound("rollout_not_found", f"no rollout {rollout_id}", "id")
        try:
            st = command(view_of(r), cmd.action, cmd.rollback)
        except CommandError as exc:
            raise Conflict("invalid_state", str(exc)) from None
        add_events(s, r.id, st.events, now)
        store_view(r, st.view, now)
        spec = st.view.spec
        decided = decision_spans(
            signer.telemetry,
            r.id,
            model=spec.model,
            version=spec.version,
            events=st.events,
            state=st.view.state,
        )
        if st.view.state == "rolled_back":
            moved = list(
                await s.scalars(
                    select(RolloutTarget.agent_id).where(RolloutTarget.rollout_id == r.id)
                )
            )
            changed = await refresh_agents(
                s, signer, moved, now, trace=dict.fromkeys(moved, decided)
            )
    notifier.notify(changed)
