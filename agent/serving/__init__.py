"""Serving: the table of loaded models, the OIP app over it, and /metrics from snapshots."""
