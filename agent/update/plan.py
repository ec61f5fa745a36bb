"""The agent's decision: from (desired, installed, running, failed) to a plan. Pure."""

from __future__ import annotations

from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass

from protocol.desired import DesiredModel


@dataclass(frozen=True)
class Plan:
    """What to do next, in this order: fetch, activate, unload."""

    fetch: tuple[DesiredModel, ...] = ()
    activate: tuple[DesiredModel, ...] = ()
    unload: tuple[str, ...] = ()
    blocked: tuple[tuple[DesiredModel, str], ...] = ()  # failed before; not retried

    @property
    def empty(self) -> bool:
        """Nothing to do."""
        return not (self.fetch or self.activate or self.unload)


def plan(
    desired: Sequence[DesiredModel],
    installed: Set[str],
    running: Mapping[str, str],
    failed: Mapping[str, str],
) -> Plan:
    """Decide what to fetch, activate and unload.

    ``installed`` holds manifest digests fully present and verified on disk; ``running`` maps a
    model name to the serving key (manifest digest, plus the configuration's digest when it
    has one: ``DesiredModel.serving_key``) serving it; ``failed`` maps a serving key to the
    reason it failed, and such a version (under that configuration) is not tried again until
    the desired state changes (the caller clears ``failed`` on a new generation). The same
    version under another configuration is activated again, without a fetch.
    """
    fetch: list[DesiredModel] = []
    activate: list[DesiredModel] = []
    blocked: list[tuple[DesiredModel, str]] = []
    for m in desired:
        if running.get(m.name) == m.serving_key:
            continue
        if m.serving_key in failed:
            blocked.append((m, failed[m.serving_key]))
            continue
        if m.manifest_digest not in installed:
            fetch.append(m)
        activate.append(m)
    wanted = {m.name for m in desired}
    unload = tuple(sorted(name for name in running if name not in wanted))
    return Plan(tuple(fetch), tuple(activate), unload, tuple(blocked))
