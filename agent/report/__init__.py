"""Reporting to the control plane: the status reporter, the metrics recorder, outbox and buffer."""
