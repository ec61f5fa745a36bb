"""A fleet simulator: many agents in one process that speak the real protocol."""
