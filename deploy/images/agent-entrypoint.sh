#!/bin/sh
# The agent image's entry point: enroll once (when the state volume holds no identity yet), then
# run, serving the inference API on 0.0.0.0:8510 inside the container. Arguments go to
# `modelfleet agent run`.
set -eu
STATE=${MODELFLEET_AGENT_STATE_DIR:-/var/lib/modelfleet-agent}
if [ ! -s "$STATE/identity.json" ]; then
  : "${MODELFLEET_SERVER:?set MODELFLEET_SERVER to the URL of the control plane}"
  : "${MODELFLEET_ENROLL_TOKEN:?set MODELFLEET_ENROLL_TOKEN: the agent is not enrolled yet}"
  modelfleet agent enroll --server "$MODELFLEET_SERVER" --token "$MODELFLEET_ENROLL_TOKEN" \
    --state-dir "$STATE" --name "${MODELFLEET_AGENT_NAME:-$(hostname)}" \
    --labels "${MODELFLEET_AGENT_LABELS:-}" >/dev/null
fi
exec modelfleet agent run --state-dir "$STATE" --serve 0.0.0.0:8510 "$@"
