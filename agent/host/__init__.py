"""This machine: its facts, systemd (notify protocol, unit, install) and crash-test failpoints."""
