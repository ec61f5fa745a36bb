"""Reporting to the control plane: the status reporter (and, later, the metrics outbox)."""
