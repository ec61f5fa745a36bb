"""agent/update/disk.py: what to keep on disk, and whether a new version fits."""

from __future__ import annotations

from agent.update.disk import Room, prune_plan, room_for
from protocol.desired import DesiredModel, Shadow


def test_keeps_desired_shadows_held_and_recent_history() -> None:
    desired = [
        DesiredModel("a", "3", "a3", shadow=Shadow("1", "a1", 0.1)),
        DesiredModel("b", "1", "b1"),
    ]
    history = {"a": ["a3", "a2", "a1", "a0"], "c": ["c2", "c1"]}
    p = prune_plan(desired=desired, held={"x9"}, history=history, keep_versions=1)
    assert p.keep == {"a3", "a1", "b1", "x9", "a2", "c2", "c1"}
    assert p.history == {"a": ["a3", "a2"], "c": ["c2", "c1"]}
    assert history["a"] == ["a3", "a2", "a1", "a0"]  # the input is not changed


def test_keep_versions_zero_keeps_only_the_active_one() -> None:
    p = prune_plan(desired=[], held=(), history={"a": ["a2", "a1"]}, keep_versions=0)
    assert p.keep == {"a2"} and p.history == {"a": ["a2"]}


def test_a_version_bigger_than_the_free_disk_is_refused() -> None:
    room = room_for(needed=100, free=99, used=0, budget=None, pruned=False)
    assert room == Room(False, reason="needs 100 bytes of disk, 99 are free")


def test_without_a_budget_free_disk_is_enough() -> None:
    assert room_for(needed=100, free=100, used=10**12, budget=None, pruned=False).fits


def test_over_the_budget_prune_first_then_refuse() -> None:
    assert room_for(needed=50, free=1000, used=50, budget=100, pruned=False).fits
    room = room_for(needed=50, free=1000, used=60, budget=100, pruned=False)
    assert room == Room(False, prune=True)
    assert room_for(needed=50, free=1000, used=40, budget=100, pruned=True).fits
    room = room_for(needed=50, free=1000, used=60, budget=100, pruned=True)
    assert room == Room(False, reason="needs 50 bytes but the disk budget of 100 leaves 40")
