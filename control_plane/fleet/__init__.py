"""The fleet: agents and their enrollment, desired state and its wake-ups, status and ingest."""
