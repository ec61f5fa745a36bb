"""The rollout state machine, gates, cohorts, spec parsing and maintenance windows, driven with
values and an injected clock: a 30-minute soak is a test of microseconds."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from control_plane.rollout.cohort import cohort_order
from control_plane.rollout.cron import parse_cron
from control_plane.rollout.gates import Aggregate
from control_plane.rollout.machine import (
    CommandError,
    Event,
    Observation,
    RolloutView,
    Step,
    Waiting,
    command,
    step,
)
from control_plane.rollout.spec import (
    DEFAULT_MAX_STALL_S,
    RolloutCommand,
    parse_command,
    parse_duration,
    parse_spec,
    parse_stages_text,
)
from protocol.exceptions import InvalidMessage
from protocol.sketch import DDSketch

T0 = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
AGENTS = tuple(f"a{i:02d}" for i in range(10))
BODY = {
    "model": "iris",
    "version": "2.0.0",
    "selector": "site=onprem,hw in (cpu,gpu)",
    "stages": [{"percent": 10, "soak": "30m"}, {"percent": 50, "soak": "30m"}, {"percent": 100}],
    "gates": {
        "max_error_rate": 0.02,
        "max_p95_latency_ms": 50,
        "max_p95_latency_ratio": 1.5,
        "min_requests": 50,
        "max_failed_agents": "10%",
    },
    "on_failure": "rollback",
    "max_agents_per_minute": 600,
}


def agg(requests: int, errors: int = 0, latency_ms: float = 5.0) -> Aggregate:
    a = Aggregate(requests=requests, errors=errors)
    for _ in range(requests):
        a.latency_ms.add(latency_ms)
    return a


class Sim:
    """Drives the machine like the controller does: repeat steps, apply moves."""

    def __init__(self, body: dict | None = None, agents: tuple[str, ...] = AGENTS) -> None:
        self.view = RolloutView("r1", parse_spec(body or BODY), "pending")
        self.order = agents
        self.moved: dict[str, datetime] = {}
        self.now = T0
        self.events: list = []
        self.new = agg(100)
        self.baseline = agg(100)
        self.failed = 0
        self.active = 0
        self.window_open = True
        self.waiting: Waiting | None = None

    def tick(self) -> list[Step]:
        steps = []
        for _ in range(10):
            obs = Observation(
                self.now,
                self.order,
                dict(self.moved),
                self.failed,
                self.new,
                self.baseline,
                self.window_open,
                self.active,
            )
            s = step(self.view, obs)
            steps.append(s)
            self.waiting = s.waiting
            for a in s.move:
                self.moved[a] = self.now
            self.events += s.events
            if s.view == self.view and not s.changed:
                break
            self.view = s.view
        return steps

    def advance(self, minutes: float) -> None:
        self.now += timedelta(minutes=minutes)
        self.tick()

    def kinds(self) -> list[str]:
        return [e.kind for e in self.events]


def test_three_stages_complete_with_cohorts_that_only_grow() -> None:
    sim = Sim()
    sim.tick()
    assert sim.view.state == "running" and len(sim.moved) == 1
    first = set(sim.moved)
    sim.advance(29)
    assert len(sim.moved) == 1 and sim.view.stage_index == 0  # still soaking
    sim.advance(1.01)
    assert sim.view.stage_index == 1 and len(sim.moved) == 5 and first <= set(sim.moved)
    second = set(sim.moved)
    sim.advance(30.01)
    assert sim.view.state == "completed" and len(sim.moved) == 10 and second <= set(sim.moved)
    assert sim.kinds() == [
        "started",
        "cohort",
        "gates_passed",
        "advanced",
        "cohort",
        "gates_passed",
        "advanced",
        "cohort",
        "completed",
    ]
    passed = next(e for e in sim.events if e.kind == "gates_passed")
    assert {g["gate"] for g in passed.figures["gates"]} >= {"max_error_rate", "min_requests"}


def test_error_rate_gate_rolls_back_with_figures() -> None:
    sim = Sim()
    sim.tick()
    sim.new = agg(100, errors=10)
    sim.advance(30.01)
    assert sim.view.state == "rolled_back"
    failed = sim.events[-1]
    assert failed.kind == "failed" and "max_error_rate 0.1 > 0.02" in failed.reason
    gate = next(g for g in failed.figures["gates"] if g["gate"] == "max_error_rate")
    assert gate == {"gate": "max_error_rate", "value": 0.1, "threshold": 0.02, "outcome": "fail"}


def test_latency_ratio_gate_and_pause_on_failure() -> None:
    sim = Sim({**BODY, "on_failure": "pause", "gates": {"max_p95_latency_ratio": 1.5}})
    sim.tick()
    sim.new, sim.baseline = agg(100, latency_ms=30), agg(100, latency_ms=10)
    sim.advance(30.01)
    assert sim.view.state == "paused"
    assert "max_p95_latency_ratio" in sim.events[-1].reason


def test_min_requests_holds_the_stage_until_traffic_comes() -> None:
    sim = Sim()
    sim.tick()
    sim.new = agg(10)
    sim.advance(31)
    assert sim.view.state == "running" and sim.view.stage_index == 0
    sim.new = agg(60)
    sim.advance(1)
    assert sim.view.stage_index == 1


def test_failed_agents_stop_a_rollout_at_once() -> None:
    sim = Sim({**BODY, "gates": {"max_failed_agents": 0}})
    sim.tick()
    sim.failed = 1
    sim.advance(0.1)
    assert sim.view.state == "rolled_back" and "failed to activate" in sim.events[-1].reason


def test_rate_limit_and_maintenance_window() -> None:
    sim = Sim({**BODY, "stages": [{"percent": 100}], "max_agents_per_minute": 3})
    sim.tick()
    assert len(sim.moved) == 3
    sim.advance(0.5)
    assert len(sim.moved) == 3
    sim.advance(0.6)
    assert len(sim.moved) == 6
    sim.window_open = False
    sim.advance(5)
    assert len(sim.moved) == 6 and sim.view.state == "running"
    sim.window_open = True
    sim.advance(1.1)
    sim.advance(1.1)
    assert len(sim.moved) == 10 and sim.view.state == "completed"


def test_deadline() -> None:
    sim = Sim({**BODY, "deadline": "2026-11-25T12:10:00Z"})
    sim.tick()
    sim.advance(11)
    assert sim.view.state == "rolled_back" and "deadline" in sim.events[-1].reason


def test_agents_joining_mid_rollout_take_their_cohort_position() -> None:
    sim = Sim(agents=AGENTS[:5])
    sim.tick()
    assert len(sim.moved) == 1
    sim.order = cohort_order("r1", [(a, None) for a in AGENTS])
    sim.advance(1)  # 10% of 10 is still 1: nobody else moves during the soak
    assert len(sim.moved) == 1
    sim.advance(30)
    assert len(sim.moved) == 5


def test_commands() -> None:
    sim = Sim()
    sim.tick()
    paused = command(sim.view, "pause")
    assert paused.view.state == "paused"
    with pytest.raises(CommandError):
        command(paused.view, "pause")
    sim.view = paused.view
    sim.advance(60)
    assert sim.view.stage_index == 0  # a paused rollout does not move
    sim.view = command(sim.view, "resume").view
    sim.tick()
    assert sim.view.soak_started_at == sim.now  # the soak starts again
    sim.view = command(sim.view, "promote").view
    sim.tick()
    assert sim.view.stage_index == 1 and len(sim.moved) == 5
    assert command(sim.view, "abort", rollback=False).view.state == "aborted"
    done = command(sim.view, "abort", rollback=True).view
    assert done.state == "rolled_back"
    with pytest.raises(CommandError):
        command(done, "resume")


def test_terminal_and_paused_states_do_not_move() -> None:
    for state in ("paused", "completed", "aborted", "rolled_back", "superseded"):
        view = replace(RolloutView("r", parse_spec(BODY), "running"), state=state)
        s = step(view, Observation(T0, AGENTS, {}))
        assert s.view == view and not s.changed


def test_cohorts_are_stable_and_spread_across_sites() -> None:
    agents = [(f"on{i}", "onprem") for i in range(8)] + [(f"cl{i}", "cloud") for i in range(8)]
    order = cohort_order("r1", agents)
    assert order == cohort_order("r1", list(reversed(agents)))
    assert order != cohort_order("r2", agents)
    half = order[:8]
    assert sum(a.startswith("on") for a in half) == 4
    assert {a[:2] for a in order[:2]} == {"on", "cl"}


def test_spec_parsing_and_errors() -> None:
    spec = parse_spec(BODY)
    assert [s.percent for s in spec.stages] == [10, 50, 100]
    assert spec.stages[0].soak_s == 1800 and spec.gates.max_failed_agents.limit(20) == 2  # type: ignore[union-attr]
    assert spec.to_json()["selector"] == "site=onprem,hw in (cpu,gpu)"
    assert parse_spec(spec.to_json()) == spec
    assert parse_stages_text("1%:10m,10%:30m,100%") == [
        {"percent": 1.0, "soak": "10m"},
        {"percent": 10.0, "soak": "30m"},
        {"percent": 100.0},
    ]
    assert parse_duration("1h30m", "x") == 5400
    for body, field in [
        ({**BODY, "stages": [{"percent": 50}]}, "stages"),
        (
            {**BODY, "stages": [{"percent": 50}, {"percent": 10}, {"percent": 100}]},
            "stages[1].percent",
        ),
        ({**BODY, "stages": [{"percent": 10, "count": 2}, {"percent": 100}]}, "stages[0]"),
        ({**BODY, "stages": [{"percent": 10, "soak": "soon"}, {"percent": 100}]}, "stages[0].soak"),
        ({**BODY, "gates": {"max_error_rate": 2}}, "gates.max_error_rate"),
        ({**BODY, "gates": {"max_failed_agents": "lots"}}, "gates.max_failed_agents"),
        ({**BODY, "gates": {"max_latency": 1}}, "gates.max_latency"),
        ({**BODY, "on_failure": "panic"}, "on_failure"),
        ({**BODY, "selector": "site in ()"}, "selector"),
        ({**BODY, "maintenance_window": "* * *"}, "maintenance_window"),
        ({**BODY, "maintenance_window": "* 25 * * *"}, "maintenance_window"),
        ({**BODY, "max_agents_per_minute": 0}, "max_agents_per_minute"),
        ({**BODY, "colour": "blue"}, "colour"),
    ]:
        with pytest.raises(InvalidMessage) as info:
            parse_spec(body)
        assert info.value.field == field, body


def test_cron_windows() -> None:
    nights = parse_cron("* 22-23,0-4 * * 1-5")
    wednesday_23h = datetime(2026, 11, 25, 23, 30, tzinfo=UTC)
    wednesday_noon = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
    saturday_23h = datetime(2026, 11, 28, 23, 0, tzinfo=UTC)
    assert nights.matches(wednesday_23h)
    assert not nights.matches(wednesday_noon) and not nights.matches(saturday_23h)
    assert parse_cron("*/15 * * * *").matches(datetime(2026, 1, 1, 3, 45, tzinfo=UTC))
    assert parse_cron("0 0 * * 0").matches(datetime(2026, 11, 29, 0, 0, tzinfo=UTC))  # Sunday
    assert parse_cron("0 0 * * 7").matches(datetime(2026, 11, 29, 0, 0, tzinfo=UTC))


# ----------------------------------------------- rollouts that always end or say why they wait

NO_FAILED_LIMIT = {k: v for k, v in BODY["gates"].items() if k != "max_failed_agents"}


def failed_event(sim: Sim) -> Event:
    assert sim.events[-1].kind == "failed", sim.kinds()
    return sim.events[-1]


def test_the_default_failed_agents_limit_fails_a_version_the_cohort_throws_out() -> None:
    sim = Sim({**BODY, "gates": NO_FAILED_LIMIT})
    assert sim.view.spec.gates.max_failed_agents is None
    sim.tick()
    assert len(sim.moved) == 1 and sim.view.state == "running"
    sim.failed = 1  # the one agent of stage 1 rolled back by itself: "failed" for 2.0.0
    sim.advance(0.1)  # promptly: mid-soak, not at its end
    assert sim.view.state == "rolled_back"
    e = failed_event(sim)
    assert "1 of 1 moved agents failed to activate 2.0.0" in e.reason
    assert "max_failed_agents 10% by default" in e.reason and "rolling back" in e.reason
    assert e.figures["cause"] == "max_failed_agents"
    assert e.figures["max_failed_agents"] == {"value": "10%", "default": True}


def test_the_default_limit_is_a_tenth_of_the_moved_agents() -> None:
    body = {**BODY, "gates": {}, "stages": [{"percent": 100, "soak": "1h"}]}
    sim = Sim(body)
    sim.tick()
    assert len(sim.moved) == 10
    sim.failed = 1  # one broken device in ten is tolerated
    sim.advance(1)
    assert sim.view.state == "running"
    sim.failed = 2
    sim.advance(1)
    assert sim.view.state == "rolled_back" and "2 of 10" in failed_event(sim).reason
    pause = Sim({**body, "on_failure": "pause"})
    pause.tick()
    pause.failed = 2
    pause.advance(1)
    assert pause.view.state == "paused" and "pausing" in failed_event(pause).reason


def test_an_explicit_failed_agents_limit_is_respected() -> None:
    body = {**BODY, "gates": {"max_failed_agents": 3}, "stages": [{"percent": 100, "soak": "1h"}]}
    sim = Sim(body)
    sim.tick()
    sim.failed = 3
    sim.advance(1)
    assert sim.view.state == "running"
    sim.failed = 4
    sim.advance(1)
    e = failed_event(sim)
    assert sim.view.state == "rolled_back" and "max_failed_agents 3)" in e.reason
    assert e.figures["max_failed_agents"] == {"value": 3, "default": False}
    # "100%" tolerates any number: the operator takes failures on themselves.
    anyway = Sim({**body, "gates": {"max_failed_agents": "100%"}})
    anyway.tick()
    anyway.failed = 10
    anyway.advance(61)
    assert anyway.view.state == "completed"


def test_effective_gates_mark_the_default() -> None:
    gates = parse_spec({**BODY, "gates": {"max_error_rate": 0.02}}).gates
    assert gates.effective_json() == {
        "max_error_rate": {"value": 0.02, "default": False},
        "max_failed_agents": {"value": "10%", "default": True},
    }
    assert "max_failed_agents" not in gates.to_json()  # the stored spec keeps it unset
    explicit = parse_spec(BODY).gates.effective_json()["max_failed_agents"]
    assert explicit == {"value": "10%", "default": False}


def test_the_default_limit_is_reported_with_the_gates() -> None:
    sim = Sim({**BODY, "gates": {"min_requests": 5}})
    sim.tick()
    sim.advance(30.01)
    passed = next(e for e in sim.events if e.kind == "gates_passed")
    gate = next(g for g in passed.figures["gates"] if g["gate"] == "max_failed_agents")
    assert (gate["value"], gate["threshold"], gate["outcome"]) == (0, 0.1, "pass")
    assert gate["note"] == "the default limit"


def test_a_stage_says_what_it_waits_on() -> None:
    window = "* 22-23 * * *"
    sim = Sim({**BODY, "stages": [{"percent": 100}], "maintenance_window": window})
    sim.view = replace(sim.view, spec=replace(sim.view.spec, max_agents_per_minute=3))
    sim.window_open = False
    sim.tick()
    why = f"maintenance window '{window}' closed: 10 of 10 agents of stage 1 still to move"
    assert sim.waiting == Waiting("window", why)
    sim.window_open = True
    sim.advance(1)
    assert len(sim.moved) == 3 and sim.waiting is not None and sim.waiting.on == "rate_limit"
    assert sim.waiting.reason == (
        "rate limit: max_agents_per_minute 3; 7 of 10 agents of stage 1 still to move"
    )

    soaking = Sim()
    soaking.tick()
    soaking.active = 1
    soaking.advance(1)
    why = "stage 1 soaks until 2026-11-25T12:30:00.000Z; 1 of 1 moved agents active on 2.0.0"
    assert soaking.waiting == Waiting("soak", why)
    soaking.new = agg(12)
    soaking.advance(30)
    w = soaking.waiting
    assert w is not None and w.on == "gates" and w.stalls
    assert w.reason == (
        "stage 1 gates wait: min_requests: 12 of 50 requests on 2.0.0 since the soak "
        "(1 of 1 moved agents active on 2.0.0)"
    )
    soaking.new = agg(60)
    soaking.advance(1)
    assert soaking.view.stage_index == 1
    # Terminal: nothing to wait on.
    soaking.advance(31)
    soaking.advance(31)
    assert soaking.view.state == "completed" and soaking.waiting is None


def test_gates_waiting_past_max_stall_end_the_rollout() -> None:
    sim = Sim()
    assert sim.view.spec.stall_limit_s == DEFAULT_MAX_STALL_S == 1800
    sim.tick()
    sim.new = agg(10)  # never reaches min_requests 50
    sim.advance(30)  # the soak ends; the gates wait
    since = sim.now
    assert sim.view.stalled_since == since and sim.view.state == "running"
    sim.advance(29)
    assert sim.view.state == "running"
    sim.advance(1)
    assert sim.view.state == "rolled_back"
    e = failed_event(sim)
    assert e.reason.startswith(
        "stage 1 made no progress for 30m (max_stall 30m by default) "
        "waiting on stage 1 gates wait: min_requests: 10 of 50"
    )
    assert e.figures["cause"] == "max_stall" and e.figures["waiting"]["on"] == "gates"
    assert e.figures["max_stall"] == {"value": "30m", "default": True}
    assert sim.view.stalled_since is None and sim.waiting is None


def test_max_stall_per_rollout_and_off() -> None:
    sim = Sim({**BODY, "max_stall": "10m", "on_failure": "pause"})
    sim.tick()
    sim.new = agg(0)
    sim.advance(30)
    sim.advance(10)
    assert sim.view.state == "paused" and "(max_stall 10m)" in failed_event(sim).reason
    off = Sim({**BODY, "max_stall": "off"})
    off.tick()
    off.new = agg(0)
    for _ in range(48):
        off.advance(60)
    assert off.view.state == "running" and off.view.stage_index == 0


def test_a_long_soak_a_closed_window_and_trickling_traffic_are_not_stalls() -> None:
    stages = [{"percent": 10, "soak": "3h"}, {"percent": 100}]
    sim = Sim({**BODY, "max_stall": "10m", "stages": stages})
    sim.tick()
    sim.new = agg(0)
    for _ in range(17):
        sim.advance(10)  # 2h50m of soak: a soak is a wait by design
    assert sim.view.state == "running" and sim.view.stalled_since is None
    sim.advance(10.01)  # the soak is over: the gates wait for traffic
    assert sim.view.stalled_since == sim.now
    for n in range(1, 7):  # one new request every 9 minutes is progress, however slow
        sim.new = agg(n)
        sim.advance(9)
        assert sim.view.state == "running", sim.events[-1]
    sim.advance(10)  # and ten minutes with none is a stall
    assert sim.view.state == "rolled_back" and failed_event(sim).figures["cause"] == "max_stall"

    closed = Sim({**BODY, "max_stall": "10m"})
    closed.tick()
    closed.window_open = False
    closed.advance(30.01)  # stage 1 passed; stage 2 waits for the window
    for _ in range(12):
        closed.advance(10)  # two hours outside the window
    assert closed.view.state == "running" and closed.view.stage_index == 1
    assert closed.waiting is not None and closed.waiting.on == "window"
    assert not closed.waiting.stalls and closed.view.stalled_since is None


def test_a_paused_rollout_does_not_stall_fail() -> None:
    sim = Sim({**BODY, "max_stall": "10m"})
    sim.tick()
    sim.new = agg(0)
    sim.advance(30)
    sim.advance(9)  # nine of ten minutes stalled
    sim.view = command(sim.view, "pause").view
    sim.advance(120)  # paused: the machine does not step, nothing fails
    assert sim.view.state == "paused"
    sim.view = command(sim.view, "resume").view
    assert sim.view.stalled_since is None  # the stall clock starts again
    sim.tick()
    sim.advance(29)  # the soak runs again; the earlier nine minutes do not count
    assert sim.view.state == "running"
    sim.advance(1.01)
    sim.advance(9)
    assert sim.view.state == "running"
    sim.advance(1)
    assert sim.view.state == "rolled_back" and failed_event(sim).figures["cause"] == "max_stall"


def test_finding_5_every_cohort_agent_drops_the_new_version() -> None:
    """The agents of stage 1 roll back on the device and report 2.0.0 failed: the rollout ends
    (by the default limit, promptly), and with failures tolerated, by the stall bound."""
    stages = [{"percent": 30, "soak": "5m"}, {"percent": 100}]
    sim = Sim({**BODY, "gates": {"min_requests": 50}, "stages": stages})
    sim.tick()
    assert len(sim.moved) == 3
    sim.new = agg(0)  # nobody serves 2.0.0
    sim.failed = 3
    sim.advance(1)
    assert sim.view.state == "rolled_back" and sim.view.stage_index == 0
    assert "3 of 3 moved agents failed" in failed_event(sim).reason

    tolerant = {"min_requests": 50, "max_failed_agents": "100%"}
    tolerated = Sim({**BODY, "gates": tolerant, "stages": stages})
    tolerated.tick()
    tolerated.new, tolerated.failed = agg(0), 3
    tolerated.advance(5)
    tolerated.advance(30)
    assert tolerated.view.state == "rolled_back"
    assert failed_event(tolerated).figures["cause"] == "max_stall"


def test_max_stall_parsing() -> None:
    assert parse_spec({**BODY, "max_stall": "10m"}).max_stall_s == 600
    assert parse_spec({**BODY, "max_stall": 90}).to_json()["max_stall"] == "1m30s"
    off = parse_spec({**BODY, "max_stall": "off"})
    assert off.stall_limit_s == math.inf
    assert off.max_stall_json() == {"value": "off", "default": False}
    assert parse_spec(off.to_json()) == off
    assert "max_stall" not in parse_spec(BODY).to_json()
    for bad in ("0s", 0, "soon", "-1m", True, "31d", "OFF"):
        with pytest.raises(InvalidMessage) as info:
            parse_spec({**BODY, "max_stall": bad})
        assert info.value.field == "max_stall", bad


def test_a_baseline_p95_below_the_sketch_resolution_gives_no_infinite_ratio() -> None:
    # A sketch the boundary takes (one bin, min = max = 5e-324) from the one agent left on the
    # old version made the baseline's p95 5e-324: 30 ms over it is infinity, a figure strict
    # JSON cannot write (the rollout's timeline then answered 500, or PostgreSQL refused it).
    tiny = DDSketch.from_json(
        {"count": 100, "sum": 0.0, "min": 5e-324, "max": 5e-324, "binKeys": [0], "binCounts": [100]}
    )
    sim = Sim({**BODY, "gates": {"max_p95_latency_ratio": 1.5}})
    sim.tick()
    sim.new, sim.baseline = agg(100, latency_ms=30), Aggregate(requests=100, latency_ms=tiny)
    sim.advance(30.01)
    for event in sim.events:
        json.dumps(event.figures, allow_nan=False)
    gates = [g for e in sim.events for g in (e.figures or {}).get("gates", [])]
    ratio = [g for g in gates if g["gate"] == "max_p95_latency_ratio"]
    assert ratio and all(g["value"] is None and g["outcome"] == "pass" for g in ratio), ratio


@pytest.mark.parametrize(
    ("action", "body", "field"),
    [
        ("explode", {}, "action"),
        ("abort", [], "body"),
        ("abort", {"rollback": "yes"}, "rollback"),
        ("pause", {"rollback": True, "force": True}, "force"),
    ],
)
def test_a_rollout_command_is_parsed_at_the_edge(action: str, body: object, field: str) -> None:
    with pytest.raises(InvalidMessage) as err:
        parse_command(action, body)
    assert err.value.field == field


def test_a_rollout_command_rolls_back_unless_told_not_to() -> None:
    assert parse_command("abort", {}) == RolloutCommand("abort", rollback=True)
    assert parse_command("abort", {"rollback": False}).rollback is False
