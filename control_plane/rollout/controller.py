"""The loop that drives rollouts: claim each due rollout under a row lock, observe the fleet,
run the state machine, write its decisions, and refresh the desired state of agents it moved.

On PostgreSQL the claim is ``SELECT ... FOR UPDATE SKIP LOCKED``, so any number of control plane
replicas may run this loop and a stage still moves once; on SQLite the single writer does it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from control_plane.db.engine import Database
from control_plane.db.models import (
    Agent,
    DesiredStateRow,
    Model,
    ModelVersion,
    Rollout,
    RolloutEvent,
    RolloutTarget,
)
from control_plane.events.outbox import emit
from control_plane.events.types import rollout_type
from control_plane.fleet.desired import DesiredSigner
from control_plane.fleet.notify import DesiredNotifier
from control_plane.metrics.series import SkippedRows, series_rows, usable
from control_plane.rollout.cohort import cohort_order
from control_plane.rollout.cron import parse_cron
from control_plane.rollout.gates import Aggregate
from control_plane.rollout.machine import Event, Observation, RolloutView, Step, Waiting, step
from control_plane.rollout.spec import RolloutSpec, spec_from_json
from control_plane.setaside import is_transient, reason_of
from control_plane.telemetry import OFF, Telemetry
from protocol.labels import selector_from_json
from protocol.timeutil import format_time, parse_time

log = logging.getLogger("modelfleet.rollouts")
DUE_STATES = ("pending", "running")
# Timeline events of the controller itself (not of the machine): a rollout it could not
# advance, and the same rollout moving again.
SET_ASIDE = "set_aside"
RECOVERED = "recovered"  # not "resumed": that kind is the operator's resume
MAX_STEPS_PER_TICK = 10


def view_of(r: Rollout) -> RolloutView:
    """The machine's view of a stored rollout."""
    stall = r.options.get("stall") or {}
    return RolloutView(
        r.id,
        spec_from_json(r.options["spec"]),
        r.state,
        r.stage_index,
        r.soak_started_at,
        r.promoted,
        parse_time(stall["since"], "since") if stall.get("since") else None,
        int(stall.get("mark", 0)),
    )


def store_view(r: Rollout, view: RolloutView, now: datetime) -> None:
    """Write the machine's view back into the row."""
    if (r.state, r.stage_index, r.soak_started_at, r.promoted) != (
        view.state,
        view.stage_index,
        view.soak_started_at,
        view.promoted,
    ):
        r.updated_at = now
    r.state, r.stage_index = view.state, view.stage_index
    r.soak_started_at, r.promoted = view.soak_started_at, view.promoted
    # The stall clock lives in the options JSON (no column of its own); a new dict, because
    # SQLAlchemy does not see changes made inside a JSON value.
    stall = (
        {"since": format_time(view.stalled_since), "mark": view.stall_mark}
        if view.stalled_since is not None
        else None
    )
    if r.options.get("stall") != stall:
        r.options = {**r.options, "stall": stall}


def add_events(s: AsyncSession, rollout_id: str, events: Iterable[Event], now: datetime) -> None:
    """Append timeline entries, each announced as a ``rollout.<kind>`` event."""
    for e in events:
        s.add(
            RolloutEvent(
                rollout_id=rollout_id,
                at=now,
                kind=e.kind,
                stage=e.stage,
                reason=e.reason,
                figures=e.figures,
            )
        )
        log.info("rollout %s: %s: %s", rollout_id[:8], e.kind, e.reason)
        data = {"rolloutId": rollout_id, "stage": e.stage, "reason": e.reason, "figures": e.figures}
        emit(s, rollout_type(e.kind), f"rollout/{rollout_id}", data, now)


def decision_spans(
    telemetry: Telemetry,
    rollout_id: str,
    *,
    model: str,
    version: str,
    events: Iterable[Event],
    state: str,
    moved: int = 0,
) -> str | None:
    """A span per decision (each timeline event: started, cohort, advanced, paused, failed,
    rolled back...), with the rollout's id, model, version and stage; returns the last one's
    ``traceparent``, which the desired states this decision changes carry (None when off)."""
    traceparent = None
    for e in events:
        attributes: dict[str, str | int] = {
            "modelfleet.rollout.id": rollout_id,
            "modelfleet.rollout.model": model,
            "modelfleet.rollout.version": version,
            "modelfleet.rollout.decision": e.kind,
            "modelfleet.rollout.state": state,
            "modelfleet.rollout.reason": e.reason,
            "modelfleet.rollout.agents_moved": moved,
        }
        if e.stage is not None:
            attributes["modelfleet.rollout.stage"] = e.stage + 1
        with telemetry.span(f"rollout.{e.kind}", attributes=attributes) as span:
            traceparent = span.traceparent()
    return traceparent


async def refresh_agents(
    s: AsyncSession,
    signer: DesiredSigner,
    agent_ids: Iterable[str],
    now: datetime,
    *,
    trace: dict[str, str | None] | None = None,
) -> list[str]:
    """Recompute the desired state of these agents; return those whose generation moved.

    ``trace``: per agent, the ``traceparent`` of the decision that changed it."""
    ids = sorted(set(agent_ids))
    agents: list[Agent] = []
    for i in range(0, len(ids), 500):
        agents += list(await s.scalars(select(Agent).where(Agent.id.in_(ids[i : i + 500]))))
    return sorted(await signer.refresh_many(s, agents, now, trace=trace))


async def _aggregate(
    s: AsyncSession,
    model: str,
    since: datetime,
    agents: set[str],
    version: str,
    same: bool,
    skipped: SkippedRows | None = None,
) -> Aggregate:
    """Merge the metric series of ``version`` (or of every other version when not ``same``).

    Stored rows that cannot be merged are left out and counted in ``skipped``: one agent's bad
    data must not stop a gate from being computed.
    """
    agg = Aggregate()
    if not agents:
        return agg
    if same:
        rows = await series_rows(s, model, since, versions=[version], skipped=skipped)
    else:
        rows = await series_rows(s, model, since, exclude_version=version, skipped=skipped)
    mine = (row for row in rows if row.agent_id in agents)
    for row, sketch in usable(mine, skipped, "rollout gates"):
        agg.requests += row.requests
        agg.errors += row.errors
        agg.latency_ms.merge(sketch)
        agg.shadow_count += row.shadow_count
        agg.drift_sum += row.drift_sum
        agg.argmax_agree += row.argmax_agree
    return agg


def failed_on(agent: Agent, model: str, digest: str) -> bool:
    """Whether an agent reports this version of the model failed or refused."""
    return any(
        m.get("name") == model
        and m.get("manifestDigest") == digest
        and m.get("state") in ("failed", "refused")
        for m in agent.status.get("models", [])
    )


async def advance(
    s: AsyncSession,
    r: Rollout,
    model: str,
    mv: ModelVersion,
    now: datetime,
    skipped: SkippedRows | None = None,
    *,
    telemetry: Telemetry = OFF,
    trace: dict[str, str | None] | None = None,
) -> tuple[RolloutView, set[str]]:
    """Run the machine on one locked rollout; return its new view and the agents to refresh.

    Each decision is a span (``decision_spans``); ``trace`` is filled with, per agent to
    refresh, the ``traceparent`` of the decision that concerns it."""
    trace = {} if trace is None else trace
    view = view_of(r)
    spec: RolloutSpec = view.spec
    # Pending (not approved) and revoked agents take no part in rollouts.
    agents = [a for a in await s.scalars(select(Agent)) if not a.pending and a.revoked_at is None]
    matching = [a for a in agents if spec.selector.matches(a.labels)]
    order = tuple(cohort_order(r.id, [(a.id, a.labels.get("site")) for a in matching]))
    moved = {
        t.agent_id: t.moved_at
        for t in await s.scalars(select(RolloutTarget).where(RolloutTarget.rollout_id == r.id))
    }
    by_id = {a.id: a for a in agents}
    window = parse_cron(spec.maintenance_window) if spec.maintenance_window else None
    touched: set[str] = set()
    waiting: Waiting | None = None
    ending: str | None = None  # the decision that completed or rolled the rollout back
    desired = await s.execute(select(DesiredStateRow.agent_id, DesiredStateRow.generation))
    generations = {agent_id: generation for agent_id, generation in desired}

    def failed_now(agent_id: str) -> bool:
        # A failure counts once the agent reports on the desired state that moved it: until
        # then its "failed" is about an earlier order (a version it threw out in an earlier
        # rollout, to be tried again now), and would fail a retry before it began.
        a = by_id.get(agent_id)
        return (
            a is not None
            and moved[agent_id] < now
            and a.reported_generation >= generations.get(agent_id, 0)
            and failed_on(a, model, mv.manifest_digest)
        )

    def active_on(a: Agent) -> bool:
        return any(
            m.get("name") == model
            and m.get("manifestDigest") == mv.manifest_digest
            and m.get("state") == "active"
            for m in a.status.get("models", [])
        )

    for _ in range(MAX_STEPS_PER_TICK):
        failed = sum(1 for a in moved if failed_now(a))
        active = sum(1 for a in moved if a in by_id and active_on(by_id[a]))
        new = baseline = Aggregate()
        stage = spec.stages[view.stage_index]
        if view.state == "running" and stage.soak_s > 0 and view.soak_started_at is not None:
            cohort = set(moved)
            others = {a.id for a in matching} - cohort
            new = await _aggregate(
                s, model, view.soak_started_at, cohort, mv.version, True, skipped
            )
            # A configuration rollout keeps the version: its baseline is the same version on
            # the agents not moved (under the configuration they had), not other versions.
            same = spec.config is not None
            baseline = await _aggregate(
                s, model, view.soak_started_at, others, mv.version, same, skipped
            )
        obs = Observation(
            now,
            order,
            dict(moved),
            failed_agents=failed,
            new=new,
            baseline=baseline,
            window_open=window.matches(now) if window else True,
            active=active,
        )
        st: Step = step(view, obs)
        waiting = st.waiting
        decided = decision_spans(
            telemetry,
            r.id,
            model=model,
            version=spec.version,
            events=st.events,
            state=st.view.state,
            moved=len(st.move),
        )
        trace.update(dict.fromkeys(st.move, decided))
        if st.view.state != view.state and st.view.state in ("completed", "rolled_back"):
            ending = decided  # the step that ended it, not a later idle one
        for agent_id in st.move:
            s.add(
                RolloutTarget(
                    rollout_id=r.id, agent_id=agent_id, stage=st.view.stage_index, moved_at=now
                )
            )
            moved[agent_id] = now
            touched.add(agent_id)
        add_events(s, r.id, st.events, now)
        if st.gate_results is not None:
            results = dict(r.gate_results or {})
            results[str(view.stage_index)] = [g.to_json() for g in st.gate_results]
            r.gate_results = results
        if st.view == view and not st.changed:
            break
        view = st.view
    if view.state == "completed" and r.state != "completed":
        touched |= {a.id for a in matching}  # agents that joined late get it too
        trace.update(dict.fromkeys((a.id for a in matching), ending))
    if view.state == "rolled_back":
        touched |= set(moved)
        trace.update(dict.fromkeys(moved, ending))
    store_view(r, view, now)
    # What a running stage waits on, kept in the options JSON (shown by GET /rollouts/{id}),
    # with since when it has waited on that.
    old, doc = r.options.get("waiting"), None
    if waiting is not None and view.state == "running":
        doc = {**waiting.to_json(), "stage": view.stage_index + 1, "since": format_time(now)}
        if old and (old.get("on"), old.get("stage")) == (doc["on"], doc["stage"]):
            doc["since"] = old.get("since", doc["since"])
    if doc != old:
        r.options = {**r.options, "waiting": doc}
    return view, touched


class RolloutController:
    """Owns the background loop; ``kick`` runs it at once after a change.

    Each rollout is advanced in a transaction and an error boundary of its own. One whose
    advance fails (its stored spec, an agent's stored status, a bug: anything but the database
    going away) is set aside: the others keep moving, it is tried again every tick, and its
    timeline says why, once per distinct reason (``set_aside``), and when it moves again
    (``resumed``). Metric rows its gates cannot merge are left out and counted in
    ``skipped_rows``.
    """

    def __init__(
        self,
        *,
        db: Database,
        signer: DesiredSigner,
        notifier: DesiredNotifier,
        clock: Callable[[], datetime],
        interval_s: float = 1.0,
    ) -> None:
        self.db = db
        self.signer = signer
        self.notifier = notifier
        self.clock = clock
        self.interval_s = interval_s
        self._wake = asyncio.Event()
        self.skipped_rows = SkippedRows()
        self.set_aside = 0  # times a rollout was set aside for a reason new to it
        self.failing: dict[str, str] = {}  # rollout id -> why its last advance failed

    def kick(self) -> None:
        """Run the loop now rather than at the next interval."""
        self._wake.set()

    async def run(self) -> None:
        """Tick forever."""
        while True:
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:
                # The loop's boundary: a failing tick (a lost database connection) is logged
                # and retried; the control plane keeps serving. One rollout's failure stops
                # at advance_one and never gets here.
                log.exception("rollout controller tick failed")
            try:
                async with asyncio.timeout(self.interval_s):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()

    async def tick(self) -> None:
        """Advance every due rollout once; raises only when the database fails."""
        async with self.db.read() as s:
            ids = list(
                await s.scalars(
                    select(Rollout.id)
                    .where(Rollout.state.in_(DUE_STATES))
                    .order_by(Rollout.created_at)
                )
            )
        for gone in set(self.failing) - set(ids):  # ended or paused meanwhile
            del self.failing[gone]
        for rollout_id in ids:
            await self.advance_one(rollout_id)

    async def advance_one(self, rollout_id: str) -> None:
        """Claim one rollout (skipping it when another replica holds it) and advance it.

        A failure of this rollout sets it aside (see the class); raises only the database's
        own failures (connection, timeout), which are not this rollout's.
        """
        try:
            changed = await self._advance(rollout_id)
        except Exception as exc:
            if is_transient(exc):
                raise
            # Deliberate boundary: whatever one rollout's data or decision raises stays with
            # that rollout, so every other rollout keeps moving.
            await self._set_aside(rollout_id, exc)
            return
        if changed is None:
            return
        if rollout_id in self.failing:
            await self._recovered(rollout_id)
        self.notifier.notify(changed)

    async def _advance(self, rollout_id: str) -> list[str] | None:
        """Advance one rollout; the agents whose desired state moved, None when not claimed."""
        async with self.db.write() as s:
            found = (
                await s.execute(
                    select(Rollout, ModelVersion, Model)
                    .join(ModelVersion, Rollout.model_version_id == ModelVersion.id)
                    .join(Model, ModelVersion.model_id == Model.id)
                    .where(Rollout.id == rollout_id, Rollout.state.in_(DUE_STATES))
                    .with_for_update(skip_locked=True, of=Rollout)
                )
            ).first()
            if found is None:
                return None
            r, mv, model = found
            now = self.clock()
            trace: dict[str, str | None] = {}
            _, touched = await advance(
                s,
                r,
                model.name,
                mv,
                now,
                self.skipped_rows,
                telemetry=self.signer.telemetry,
                trace=trace,
            )
            return await refresh_agents(s, self.signer, touched, now, trace=trace)

    async def _set_aside(self, rollout_id: str, exc: Exception) -> None:
        """Record why this rollout could not advance, once per distinct reason."""
        reason = f"the controller could not advance this rollout: {reason_of(exc)}"
        if self.failing.get(rollout_id) == reason:
            log.debug("rollout %s still set aside: %s", rollout_id[:8], reason)
            return
        self.failing[rollout_id] = reason
        self.set_aside += 1
        log.error("rollout %s set aside; the others go on", rollout_id[:8], exc_info=exc)
        await self._record(rollout_id, SET_ASIDE, reason, {"error": type(exc).__name__})

    async def _recovered(self, rollout_id: str) -> None:
        reason = self.failing.pop(rollout_id)
        log.info("rollout %s advances again", rollout_id[:8])
        await self._record(rollout_id, RECOVERED, f"advances again after: {reason}", {})

    async def _record(
        self, rollout_id: str, kind: str, reason: str, figures: dict[str, Any]
    ) -> None:
        """Add a timeline event unless the last set_aside/resumed event already says it
        (another replica, or this process before a restart)."""
        try:
            async with self.db.write() as s:
                last = await s.scalar(
                    select(RolloutEvent)
                    .where(
                        RolloutEvent.rollout_id == rollout_id,
                        RolloutEvent.kind.in_((SET_ASIDE, RECOVERED)),
                    )
                    .order_by(RolloutEvent.id.desc())
                    .limit(1)
                )
                if last is not None and (last.kind, last.reason) == (kind, reason):
                    return
                if kind == RECOVERED and last is None:
                    return  # nothing was ever recorded as set aside
                r = await s.get(Rollout, rollout_id)
                if r is None:
                    return
                add_events(
                    s, rollout_id, [Event(kind, reason, r.stage_index, figures)], self.clock()
                )
        except Exception as exc:
            if is_transient(exc):
                raise
            # Deliberate boundary: a timeline entry that cannot be written must not stop the
            # loop; the reason is in the log and the counters.
            log.error("rollout %s: could not record %s: %s", rollout_id[:8], kind, reason_of(exc))


def selector_of(r: Rollout) -> Any:
    """The stored selector as a Selector."""
    return selector_from_json(r.selector)
