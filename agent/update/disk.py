"""The disk plan (pure): which stored versions to keep, and whether a new one fits.

Per model the agent keeps the active version and ``keep_versions`` before it (its history,
newest first), every version the desired state names (live or as a shadow) and every version
loaded now; everything else may be pruned. A new version fits when the disk has room for the
bytes it still lacks and, under a disk budget, the store stays within it (after pruning).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from protocol.desired import DesiredModel


@dataclass(frozen=True)
class PrunePlan:
    keep: frozenset[str]  # manifest digests not to be pruned
    history: dict[str, list[str]]  # per model, the history trimmed to what is kept


def prune_plan(
    *,
    desired: Iterable[DesiredModel],
    held: Iterable[str],
    history: Mapping[str, Sequence[str]],
    keep_versions: int,
) -> PrunePlan:
    """What to keep: the desired versions (and their shadows), those ``held`` loaded, and per
    model the newest ``1 + keep_versions`` of its history."""
    keep: set[str] = set(held)
    for m in desired:
        keep.add(m.manifest_digest)
        if m.shadow is not None:
            keep.add(m.shadow.manifest_digest)
    trimmed = {name: list(h[: 1 + keep_versions]) for name, h in history.items()}
    for h in trimmed.values():
        keep.update(h)
    return PrunePlan(frozenset(keep), trimmed)


@dataclass(frozen=True)
class Room:
    """Whether a version fits: ``prune`` means prune, measure again and ask again."""

    fits: bool
    prune: bool = False
    reason: str | None = None  # why it does not fit


def room_for(*, needed: int, free: int, used: int, budget: int | None, pruned: bool) -> Room:
    """Does a version that still lacks ``needed`` bytes fit, with ``free`` bytes free on the
    disk and ``used`` bytes in the store under ``budget`` (None: no budget)?"""
    if needed > free:
        return Room(False, reason=f"needs {needed} bytes of disk, {free} are free")
    if budget is None or used + needed <= budget:
        return Room(True)
    if not pruned:
        return Room(False, prune=True)
    return Room(
        False, reason=f"needs {needed} bytes but the disk budget of {budget} leaves {budget - used}"
    )
