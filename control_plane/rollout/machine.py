"""The rollout state machine. Pure: a view of the rollout and an observation of the fleet in,
the next state, the agents to move, the timeline events and what a running stage waits on out.

States::

    pending -> running(stage k) -> completed
                 |   ^                         a gate fails: rolled_back (on_failure=rollback)
                 v   |                                       or paused (on_failure=pause)
               paused                          operator: pause / resume / promote / abort
    terminal: completed, aborted, rolled_back, superseded

A running rollout also fails (by on_failure) when more moved agents report the new version
failed or refused than ``gates.max_failed_agents`` allows (a default applies: see spec.py),
checked on every step, and when a stage makes no progress for ``max_stall``. Progress is
defined in ``_stall_clock``: only a wait on gates counts toward a stall; a soak, a closed
maintenance window and a rate limit are waits by design and never do.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from control_plane.rollout.gates import Aggregate, GateResult, evaluate
from control_plane.rollout.spec import RolloutSpec, format_duration
from protocol.timeutil import format_time

ACTIVE_STATES = ("pending", "running", "paused")
TERMINAL_STATES = ("completed", "aborted", "rolled_back", "superseded")


@dataclass(frozen=True)
class RolloutView:
    """The parts of a rollout the machine decides on."""

    id: str
    spec: RolloutSpec
    state: str
    stage_index: int = 0
    soak_started_at: datetime | None = None
    promoted: bool = False  # an operator skipped this stage's soak and gates
    # The stall clock: since when the stage has waited without progress in a wait that counts
    # (None: it is not stalled), and how many samples of the new version it had then.
    stalled_since: datetime | None = None
    stall_mark: int = 0


@dataclass(frozen=True)
class Observation:
    """The fleet as the controller sees it now."""

    now: datetime
    order: tuple[str, ...]  # matching agents, in cohort order
    moved: Mapping[str, datetime]  # agents this rollout has moved, and when
    failed_agents: int = 0  # moved agents reporting the new version failed or refused
    new: Aggregate = field(default_factory=Aggregate)  # new version, cohort, since soak start
    baseline: Aggregate = field(default_factory=Aggregate)  # old version, others, same window
    window_open: bool = True
    active: int = 0  # moved agents reporting the new version active (for the waiting reason)


@dataclass(frozen=True)
class Event:
    """A timeline entry: what happened, why, and the figures behind it."""

    kind: str
    reason: str
    stage: int | None = None
    figures: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Waiting:
    """Why a running stage does not move on now."""

    on: str  # "window" | "rate_limit" | "soak" | "gates"
    reason: str
    stalls: bool = False  # whether time spent waiting so counts toward max_stall

    def to_json(self) -> dict[str, Any]:
        """JSON form."""
        return {"on": self.on, "reason": self.reason}


@dataclass(frozen=True)
class Step:
    """What the machine decided."""

    view: RolloutView
    move: tuple[str, ...] = ()
    events: tuple[Event, ...] = ()
    gate_results: tuple[GateResult, ...] | None = None
    waiting: Waiting | None = None

    @property
    def changed(self) -> bool:
        """Whether anything is to be written."""
        return bool(self.move or self.events)


def _fail(
    view: RolloutView,
    reason: str,
    figures: dict[str, Any],
    results: tuple[GateResult, ...] | None = None,
    before: tuple[Event, ...] = (),
) -> Step:
    state = "rolled_back" if view.spec.on_failure == "rollback" else "paused"
    action = "rolling back every moved agent" if state == "rolled_back" else "pausing"
    event = Event("failed", f"{reason}; {action}", view.stage_index, figures)
    view = replace(view, state=state, stalled_since=None, stall_mark=0)
    return Step(view, (), (*before, event), results)


def _activity(obs: Observation, spec: RolloutSpec) -> str:
    failed = f", {obs.failed_agents} failed" if obs.failed_agents else ""
    return f"{obs.active} of {len(obs.moved)} moved agents active on {spec.version}{failed}"


def _gate_wait(r: GateResult, version: str) -> str:
    if r.gate == "min_requests":
        return f"min_requests: {r.value} of {r.threshold:g} requests on {version} since the soak"
    return f"{r.gate}: {r.note or 'waiting'}"


def step(view: RolloutView, obs: Observation) -> Step:
    """Decide the next move of a pending or running rollout; others are left as they are."""
    if view.state not in ("pending", "running"):
        return Step(view)
    return _stall_clock(_decide(view, obs), obs)


def _stall_clock(st: Step, obs: Observation) -> Step:
    """Fail a stage that has waited on its gates for max_stall with nothing moving.

    Progress is a move, a timeline event (a cohort filled, a stage passed) or a new sample of
    the new version (a request or a shadow score) while the gates wait for traffic. Only a wait
    on gates counts: it is the wait that never ends by itself (the cohort threw the version out,
    or nobody sends it traffic). A soak ends by the clock; a closed maintenance window opens
    again (the deadline bounds calendar time); a rate limit lets agents through every minute.
    """
    view, waiting = st.view, st.waiting
    if view.state != "running" or waiting is None or not waiting.stalls:
        if view.stalled_since is None:
            return st
        return replace(st, view=replace(view, stalled_since=None, stall_mark=0))
    samples = obs.new.requests + obs.new.shadow_count
    if view.stalled_since is None or st.move or st.events or samples > view.stall_mark:
        return replace(st, view=replace(view, stalled_since=obs.now, stall_mark=samples))
    stalled_s = (obs.now - view.stalled_since).total_seconds()
    limit = view.spec.max_stall_json()
    if stalled_s < view.spec.stall_limit_s:
        return st
    default = " by default" if limit["default"] else ""
    figures = {
        "cause": "max_stall",
        "waiting": waiting.to_json(),
        "max_stall": limit,
        "stalled_since": format_time(view.stalled_since),
    }
    reason = (
        f"stage {view.stage_index + 1} made no progress for {format_duration(stalled_s)} "
        f"(max_stall {limit['value']}{default}) waiting on {waiting.reason}"
    )
    return _fail(view, reason, figures, st.gate_results)


def _decide(view: RolloutView, obs: Observation) -> Step:
    spec = view.spec
    events: list[Event] = []
    if view.state == "pending":
        view = replace(view, state="running", stage_index=0, soak_started_at=None)
        events.append(
            Event(
                "started",
                f"stage 1 of {len(spec.stages)}: {spec.stages[0]}",
                0,
                {"matching_agents": len(obs.order)},
            )
        )
    if spec.deadline is not None and obs.now > spec.deadline:
        reason = f"deadline {format_time(spec.deadline)} passed before completion"
        return _fail(view, reason, {}, before=tuple(events))
    cohort = len(obs.moved)
    limit = spec.gates.failed_agents_limit
    if obs.failed_agents > limit.limit(cohort):
        default = spec.gates.max_failed_agents is None
        figures = {
            "cause": "max_failed_agents",
            "failed_agents": obs.failed_agents,
            "cohort": cohort,
            "max_failed_agents": {"value": limit.to_json(), "default": default},
        }
        reason = (
            f"{obs.failed_agents} of {cohort} moved agents failed to activate {spec.version} "
            f"(max_failed_agents {limit.to_json()}{' by default' if default else ''})"
        )
        return _fail(view, reason, figures, before=tuple(events))
    k = view.stage_index
    stage = spec.stages[k]
    target = stage.size(len(obs.order))
    in_cohort = sum(1 for a in obs.order if a in obs.moved)
    need = target - in_cohort
    if need > 0:
        if not obs.window_open:
            why = (
                f"maintenance window '{spec.maintenance_window}' closed: {need} of {target} "
                f"agents of stage {k + 1} still to move"
            )
            return Step(view, (), tuple(events), waiting=Waiting("window", why))
        allowance = need
        if spec.max_agents_per_minute is not None:
            recent = sum(1 for t in obs.moved.values() if t > obs.now - timedelta(minutes=1))
            allowance = min(need, max(0, spec.max_agents_per_minute - recent))
        move = tuple(a for a in obs.order if a not in obs.moved)[:allowance]
        if len(move) == need:
            view = replace(view, soak_started_at=obs.now)
            events.append(
                Event(
                    "cohort",
                    f"stage {k + 1}: {target} of {len(obs.order)} agents on {spec.version}",
                    k,
                    {"cohort": target, "matching_agents": len(obs.order)},
                )
            )
            return Step(view, move, tuple(events))
        why = (
            f"rate limit: max_agents_per_minute {spec.max_agents_per_minute}; "
            f"{need - len(move)} of {target} agents of stage {k + 1} still to move"
        )
        return Step(view, move, tuple(events), waiting=Waiting("rate_limit", why))
    if view.soak_started_at is None:
        view = replace(view, soak_started_at=obs.now)
    results = None
    if view.promoted:
        view = replace(view, promoted=False)
    elif stage.soak_s > 0:
        soak_end = view.soak_started_at + timedelta(seconds=stage.soak_s)  # type: ignore[operator]
        if obs.now < soak_end:
            why = f"stage {k + 1} soaks until {format_time(soak_end)}; {_activity(obs, spec)}"
            return Step(view, (), tuple(events), waiting=Waiting("soak", why))
        verdict, results = evaluate(spec.gates, obs.new, obs.baseline, obs.failed_agents, cohort)
        figures = {
            "new": obs.new.summary(),
            "baseline": obs.baseline.summary(),
            "gates": [r.to_json() for r in results],
        }
        if verdict == "fail":
            failing = ", ".join(
                f"{r.gate} {r.value} > {r.threshold:g}" for r in results if r.outcome == "fail"
            )
            reason = f"stage {k + 1} gates failed: {failing}"
            return _fail(view, reason, figures, results, tuple(events))
        if verdict == "wait":
            waits = "; ".join(_gate_wait(r, spec.version) for r in results if r.outcome == "wait")
            why = f"stage {k + 1} gates wait: {waits} ({_activity(obs, spec)})"
            return Step(view, (), tuple(events), results, Waiting("gates", why, stalls=True))
        events.append(
            Event(
                "gates_passed",
                f"stage {k + 1} passed its gates after {stage.soak_s:g}s",
                k,
                figures,
            )
        )
    if k == len(spec.stages) - 1:
        view = replace(view, state="completed")
        events.append(
            Event("completed", f"all {len(obs.order)} matching agents on {spec.version}", k)
        )
    else:
        view = replace(view, stage_index=k + 1, soak_started_at=None)
        events.append(
            Event("advanced", f"stage {k + 2} of {len(spec.stages)}: {spec.stages[k + 1]}", k + 1)
        )
    return Step(view, (), tuple(events), results)


class CommandError(Exception):
    """An operator command that does not apply in the rollout's state."""


def command(view: RolloutView, name: str, rollback: bool = True) -> Step:
    """pause, resume, promote or abort; raises CommandError when it does not apply."""
    state = view.state
    if state in TERMINAL_STATES:
        raise CommandError(f"rollout is {state}; {name} does not apply")
    if name == "pause":
        if state == "paused":
            raise CommandError("rollout is already paused")
        return Step(
            replace(view, state="paused"),
            (),
            (Event("paused", "paused by operator", view.stage_index),),
        )
    if name == "resume":
        if state != "paused":
            raise CommandError(f"rollout is {state}, not paused")
        # The stage's soak starts again: the window before the pause may hold bad figures; the
        # stall clock starts again too (time spent paused is the operator's, not a stall).
        return Step(
            replace(view, state="running", soak_started_at=None, stalled_since=None),
            (),
            (Event("resumed", "resumed by operator; the stage soaks again", view.stage_index),),
        )
    if name == "promote":
        return Step(
            replace(view, state="running", promoted=True),
            (),
            (
                Event(
                    "promoted",
                    f"stage {view.stage_index + 1} promoted by operator: soak and gates skipped",
                    view.stage_index,
                ),
            ),
        )
    if name == "abort":
        new_state = "rolled_back" if rollback else "aborted"
        what = "moved agents go back" if rollback else "moved agents keep the new version"
        event = Event("aborted", f"aborted by operator; {what}", view.stage_index)
        return Step(replace(view, state=new_state), (), (event,))
    raise CommandError(f"unknown command {name!r}")
