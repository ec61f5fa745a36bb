"""The rollout state machine. Pure: a view of the rollout and an observation of the fleet in,
the next state, the agents to move and the timeline events out.

States::

    pending -> running(stage k) -> completed
                 |   ^                         a gate fails: rolled_back (on_failure=rollback)
                 v   |                                       or paused (on_failure=pause)
               paused                          operator: pause / resume / promote / abort
    terminal: completed, aborted, rolled_back, superseded
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from control_plane.rollout.gates import Aggregate, GateResult, evaluate
from control_plane.rollout.spec import RolloutSpec
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


@dataclass(frozen=True)
class Event:
    """A timeline entry: what happened, why, and the figures behind it."""

    kind: str
    reason: str
    stage: int | None = None
    figures: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Step:
    """What the machine decided."""

    view: RolloutView
    move: tuple[str, ...] = ()
    events: tuple[Event, ...] = ()
    gate_results: tuple[GateResult, ...] | None = None

    @property
    def changed(self) -> bool:
        """Whether anything is to be written."""
        return bool(self.move or self.events)


def _fail(view: RolloutView, reason: str, figures: dict[str, Any],
          results: tuple[GateResult, ...] | None = None) -> Step:  # fmt: skip
    state = "rolled_back" if view.spec.on_failure == "rollback" else "paused"
    action = "rolling back every moved agent" if state == "rolled_back" else "pausing"
    event = Event("failed", f"{reason}; {action}", view.stage_index, figures)
    return Step(replace(view, state=state), (), (event,), results)


def step(view: RolloutView, obs: Observation) -> Step:
    """Decide the next move of a pending or running rollout; others are left as they are."""
    if view.state not in ("pending", "running"):
        return Step(view)
    spec = view.spec
    events: list[Event] = []
    if view.state == "pending":
        view = replace(view, state="running", stage_index=0, soak_started_at=None)
        events.append(Event("started", f"stage 1 of {len(spec.stages)}: {spec.stages[0]}", 0,
                            {"matching_agents": len(obs.order)}))  # fmt: skip
    if spec.deadline is not None and obs.now > spec.deadline:
        return _fail(view, f"deadline {format_time(spec.deadline)} passed before completion", {})
    cohort = len(obs.moved)
    limit = spec.gates.max_failed_agents
    if limit is not None and obs.failed_agents > limit.limit(cohort):
        return _fail(
            view,
            f"{obs.failed_agents} of {cohort} moved agents failed to activate "
            f"(limit {limit.to_json()})",
            {"failed_agents": obs.failed_agents, "cohort": cohort},
        )
    k = view.stage_index
    stage = spec.stages[k]
    target = stage.size(len(obs.order))
    in_cohort = sum(1 for a in obs.order if a in obs.moved)
    need = target - in_cohort
    if need > 0:
        if not obs.window_open:
            return Step(view, (), tuple(events))
        allowance = need
        if spec.max_agents_per_minute is not None:
            recent = sum(1 for t in obs.moved.values() if t > obs.now - timedelta(minutes=1))
            allowance = min(need, max(0, spec.max_agents_per_minute - recent))
        move = tuple(a for a in obs.order if a not in obs.moved)[:allowance]
        if len(move) == need:
            view = replace(view, soak_started_at=obs.now)
            events.append(Event("cohort", f"stage {k + 1}: {target} of {len(obs.order)} agents "
                                f"on {spec.version}", k,
                                {"cohort": target, "matching_agents": len(obs.order)}))  # fmt: skip
        return Step(view, move, tuple(events))
    if view.soak_started_at is None:
        view = replace(view, soak_started_at=obs.now)
    results = None
    if view.promoted:
        view = replace(view, promoted=False)
    elif stage.soak_s > 0:
        if obs.now < view.soak_started_at + timedelta(seconds=stage.soak_s):  # type: ignore[operator]
            return Step(view, (), tuple(events))
        verdict, results = evaluate(spec.gates, obs.new, obs.baseline, obs.failed_agents, cohort)
        figures = {"new": obs.new.summary(), "baseline": obs.baseline.summary(),
                   "gates": [r.to_json() for r in results]}  # fmt: skip
        if verdict == "fail":
            failing = ", ".join(
                f"{r.gate} {r.value} > {r.threshold:g}" for r in results if r.outcome == "fail"
            )
            return _fail(view, f"stage {k + 1} gates failed: {failing}", figures, results)
        if verdict == "wait":
            return Step(view, (), tuple(events), results)
        events.append(Event("gates_passed", f"stage {k + 1} passed its gates after "
                            f"{stage.soak_s:g}s", k, figures))  # fmt: skip
    if k == len(spec.stages) - 1:
        view = replace(view, state="completed")
        events.append(Event("completed", f"all {len(obs.order)} matching agents on "
                            f"{spec.version}", k))  # fmt: skip
    else:
        view = replace(view, stage_index=k + 1, soak_started_at=None)
        events.append(Event("advanced", f"stage {k + 2} of {len(spec.stages)}: "
                            f"{spec.stages[k + 1]}", k + 1))  # fmt: skip
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
        return Step(replace(view, state="paused"), (), (Event("paused", "paused by operator",
                                                              view.stage_index),))  # fmt: skip
    if name == "resume":
        if state != "paused":
            raise CommandError(f"rollout is {state}, not paused")
        # The stage's soak starts again: the window before the pause may hold bad figures.
        return Step(replace(view, state="running", soak_started_at=None),
                    (), (Event("resumed", "resumed by operator; the stage soaks again",
                               view.stage_index),))  # fmt: skip
    if name == "promote":
        return Step(replace(view, state="running", promoted=True), (),
                    (Event("promoted", f"stage {view.stage_index + 1} promoted by operator: "
                           "soak and gates skipped", view.stage_index),))  # fmt: skip
    if name == "abort":
        new_state = "rolled_back" if rollback else "aborted"
        what = "moved agents go back" if rollback else "moved agents keep the new version"
        event = Event("aborted", f"aborted by operator; {what}", view.stage_index)
        return Step(replace(view, state=new_state), (), (event,))
    raise CommandError(f"unknown command {name!r}")
