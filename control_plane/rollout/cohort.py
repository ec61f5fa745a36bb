"""Cohort choice: a stable order of the matching agents, spread across sites. Pure.

Each agent gets a hash of (rollout, agent); within a site agents are ranked by it, and the
global order interleaves sites by each agent's relative position in its site. A stage's cohort
is the first N agents of the order not counting those already moved, so a later stage only
adds agents, and a 10% stage over two sites takes about 10% of each.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Sequence


def agent_hash(rollout_id: str, agent_id: str) -> str:
    """The stable position key of an agent within one rollout."""
    return hashlib.sha256(f"{rollout_id}:{agent_id}".encode()).hexdigest()


def cohort_order(rollout_id: str, agents: Sequence[tuple[str, str | None]]) -> list[str]:
    """Agent ids in the order stages take them; ``agents`` are (agent id, site label)."""
    by_site: dict[str | None, list[tuple[str, str]]] = defaultdict(list)
    for agent_id, site in agents:
        by_site[site].append((agent_hash(rollout_id, agent_id), agent_id))
    keyed = []
    for members in by_site.values():
        members.sort()
        n = len(members)
        keyed += [((i + 0.5) / n, h, agent_id) for i, (h, agent_id) in enumerate(members)]
    keyed.sort()
    return [agent_id for _, _, agent_id in keyed]
