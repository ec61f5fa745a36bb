"""The scopes an operator's API token may carry (kept free of imports: the CLI reads it)."""

# ``admin`` may do everything; the others are least privilege for automation: a dashboard reads
# (fleet:read), a CI job pushes bundles (models:write), a release tool starts and steers
# rollouts (rollouts:write), a tuning tool changes configuration layers (config:write), a
# support engineer pulls an agent's logs and support bundle (agents:diagnose: they can hold
# what fleet:read does not show, redacted or not).
SCOPES = (
    "fleet:read",
    "models:write",
    "rollouts:write",
    "config:write",
    "agents:diagnose",
    "admin",
)
