"""Rollouts: a model version placed on the agents a selector matches.

For now a rollout has one stage at 100%: creating it writes the desired state of every matching
agent at once, and agents that enroll later and match get it too. Staged rollouts with gates
build on this table.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import select

from control_plane.db.engine import Database
from control_plane.db.models import Agent, Model, ModelVersion, Rollout
from control_plane.desired import DesiredSigner, active_rollouts, desired_models
from control_plane.errors import ApiError
from control_plane.notify import DesiredNotifier
from protocol.exceptions import InvalidMessage
from protocol.fields import req_str
from protocol.labels import check_labels, matches, parse_selector
from protocol.manifest import check_name, check_version
from protocol.timeutil import format_time


def parse_stages(raw: object) -> list[dict[str, Any]]:
    """Accept the one stage supported so far; raises InvalidMessage for anything else."""
    if raw is None:
        return [{"percent": 100}]
    ok = (
        isinstance(raw, list)
        and len(raw) == 1
        and isinstance(raw[0], dict)
        and raw[0].get("percent") == 100
        and set(raw[0]) <= {"percent", "soak"}
    )
    if not ok:
        raise InvalidMessage(
            'stages: only a single 100% stage ([{"percent": 100}]) is supported', "stages"
        )
    return [{"percent": 100}]


def parse_selector_field(raw: object) -> dict[str, str]:
    """A selector given as ``"k=v,..."`` or as an object of strings."""
    if raw is None or raw == "":
        return {}
    if isinstance(raw, str):
        return parse_selector(raw)
    if isinstance(raw, dict) and all(isinstance(v, str) for v in raw.values()):
        return check_labels(raw, "selector")
    raise InvalidMessage("selector must be a string like 'site=onprem' or an object", "selector")


async def create_rollout(
    db: Database,
    signer: DesiredSigner,
    notifier: DesiredNotifier,
    body: dict[str, Any],
    now: datetime,
) -> dict[str, Any]:
    """Create a rollout and write every matching agent's desired state.

    Raises InvalidMessage for a bad body, ApiError 404 when the version is not published.
    """
    name = check_name(req_str(body, "model"), "model")
    version = check_version(req_str(body, "version"))
    selector = parse_selector_field(body.get("selector"))
    stages = parse_stages(body.get("stages"))
    rollback = body.get("rollback", False)
    if not isinstance(rollback, bool):
        raise InvalidMessage("rollback must be true or false", "rollback")
    rollout_id = str(uuid.uuid4())
    changed: list[str] = []
    async with db.write() as s:
        mv = await s.scalar(
            select(ModelVersion)
            .join(Model)
            .where(Model.name == name, ModelVersion.version == version)
        )
        if mv is None:
            raise ApiError(
                404, "version_not_found", f"{name} {version} is not published", "version"
            )
        s.add(
            Rollout(
                id=rollout_id,
                model_version_id=mv.id,
                selector=selector,
                stages=stages,
                state="running",
                options={"rollback": rollback},
                created_at=now,
                updated_at=now,
            )
        )
        await s.flush()
        rollouts = await active_rollouts(s)
        for agent in await s.scalars(select(Agent).order_by(Agent.id)):
            if not matches(selector, agent.labels):
                continue
            models = desired_models(rollouts, agent.labels)
            if await signer.write(s, agent.id, models, now) is not None:
                changed.append(agent.id)
    notifier.notify(changed)
    return await get_rollout(db, rollout_id, now)


async def get_rollout(db: Database, rollout_id: str, now: datetime) -> dict[str, Any]:
    """A rollout with its targets' progress; a running one whose targets all report the version
    active is marked completed. Raises ApiError 404 when unknown."""
    async with db.write() as s:
        row = await s.execute(
            select(Rollout, ModelVersion, Model)
            .join(ModelVersion, Rollout.model_version_id == ModelVersion.id)
            .join(Model, ModelVersion.model_id == Model.id)
            .where(Rollout.id == rollout_id)
        )
        found = row.first()
        if found is None:
            raise ApiError(404, "rollout_not_found", f"no rollout {rollout_id}", "id")
        rollout, mv, model = found
        targets = []
        for agent in await s.scalars(select(Agent).order_by(Agent.enrolled_at, Agent.id)):
            if not matches(rollout.selector, agent.labels):
                continue
            state = "pending"
            reason = None
            for m in agent.status.get("models", []):
                if m.get("name") == model.name and m.get("manifestDigest") == mv.manifest_digest:
                    state, reason = m.get("state", "pending"), m.get("reason")
            targets.append(
                {"agentId": agent.id, "name": agent.name, "state": state, "reason": reason}
            )
        active = sum(1 for t in targets if t["state"] == "active")
        if rollout.state == "running" and targets and active == len(targets):
            rollout.state = "completed"
            rollout.updated_at = now
        return {
            "id": rollout.id,
            "model": model.name,
            "version": mv.version,
            "manifestDigest": mv.manifest_digest,
            "selector": rollout.selector,
            "stages": rollout.stages,
            "rollback": bool(rollout.options.get("rollback")),
            "state": rollout.state,
            "createdAt": format_time(rollout.created_at),
            "updatedAt": format_time(rollout.updated_at),
            "progress": {"targets": len(targets), "active": active},
            "targets": targets,
        }
