"""The modelfleet control plane: registry, blob store, agents, rollouts, reports."""
