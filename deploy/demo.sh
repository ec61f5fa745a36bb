#!/usr/bin/env bash
# `make demo`: a control plane on SQLite, two agents (cloud and on-prem), a tiny model made in
# code, built, signed, pushed and rolled out, a few inference requests to each agent, the fleet
# table, then everything stopped. Everything listens on 127.0.0.1 only.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WORK=$ROOT/demo-run
rm -rf "$WORK" && mkdir -p "$WORK" && cd "$WORK"

free_port() { python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT
# HTTP without curl: a fresh machine is only promised Python.
http() {  # http METHOD URL [JSON]
  python - "$@" <<'PY'
import sys, urllib.request, urllib.error
method, url = sys.argv[1], sys.argv[2]
data = sys.argv[3].encode() if len(sys.argv) > 3 else None
req = urllib.request.Request(url, data=data, method=method)
try:
    with urllib.request.urlopen(req, timeout=10) as r:
        print(r.read().decode())
except urllib.error.HTTPError as e:
    print(e.code, e.read().decode())
except OSError as e:
    sys.exit(f"{url}: {e}")
PY
}
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "a tiny ONNX model made in code (4 -> 3 classifier) and its smoke test"
python "$ROOT/bench/devkit/models.py" model

step "publisher key, signed bundle, verification"
modelfleet keys generate --out publisher
modelfleet bundle build model/model.onnx --name iris --version 1.0.0 --key publisher.key \
  --smoke-input model/smoke-in.npy --smoke-output model/smoke-out.npy --out iris-1.0.0.mfb
modelfleet bundle verify iris-1.0.0.mfb --trust publisher.pub >/dev/null && echo "verified against publisher.pub"

step "control plane on SQLite"
CP_PORT=$(free_port)
modelfleet server --data-dir ./cp --host 127.0.0.1 --port "$CP_PORT" \
  --trust-publisher publisher.pub > server.log 2>&1 &
PIDS+=($!)
export MODELFLEET_SERVER=http://127.0.0.1:$CP_PORT
for _ in $(seq 1 100); do
  [ -s cp/admin-token ] && http GET "$MODELFLEET_SERVER/api/v1/health" >/dev/null 2>&1 && break
  sleep 0.2
done
export MODELFLEET_TOKEN=$(cat cp/admin-token)
echo "listening on $MODELFLEET_SERVER (admin token in cp/admin-token)"

step "push"
modelfleet push iris-1.0.0.mfb

step "two agents: one in the cloud, one on-prem"
TOKEN=$(modelfleet enroll-token create --labels hw=cpu --max-uses 2)
declare -A SERVE COST EXTRA
COST[cloud]=1.20; COST[onprem]=0.15
# The on-prem box is cheaper but (made) 2 ms slower, so the comparison has something to say.
EXTRA[cloud]=""; EXTRA[onprem]="--added-latency-ms 2"
for site in cloud onprem; do
  modelfleet agent enroll --server "$MODELFLEET_SERVER" --token "$TOKEN" \
    --state-dir "./agent-$site" --labels "site=$site" --name "$site-1" \
    --cost-per-hour "${COST[$site]}" >/dev/null
  SERVE[$site]=$(free_port)
  # shellcheck disable=SC2086
  modelfleet agent run --state-dir "./agent-$site" --serve "127.0.0.1:${SERVE[$site]}" \
    --heartbeat 2 --metrics-interval 2 ${EXTRA[$site]} > "agent-$site.log" 2>&1 &
  PIDS+=($!)
  echo "$site-1 serving on 127.0.0.1:${SERVE[$site]}"
done

step "rollout of iris 1.0.0 to every agent with hw=cpu"
ROLLOUT=$(modelfleet rollout create --model iris --version 1.0.0 --selector hw=cpu)
for _ in $(seq 1 150); do
  status=$(modelfleet rollout status "$ROLLOUT")
  grep -qi "state: completed" <<<"$status" && break
  sleep 0.2
done
modelfleet rollout status "$ROLLOUT"

step "inference on each agent (Open Inference Protocol v2)"
for site in cloud onprem; do
  for x in "5.1,3.5,1.4,0.2" "6.7,3.0,5.2,2.3" "5.9,3.0,4.2,1.5"; do
    printf '%-7s x=[%s] -> ' "$site" "$x"
    http POST "http://127.0.0.1:${SERVE[$site]}/v2/models/iris/infer" \
      "{\"inputs\":[{\"name\":\"x\",\"shape\":[1,4],\"datatype\":\"FP32\",\"data\":[$x]}]}"
  done
done
printf 'bad input -> '
http POST "http://127.0.0.1:${SERVE[cloud]}/v2/models/iris/infer" \
  '{"inputs":[{"name":"y","shape":[1,4],"datatype":"FP32","data":[1,2,3,4]}]}'

step "a staged rollout of iris 2.0.0, gated on live error rate and latency"
python "$ROOT/bench/devkit/models.py" model2 --seed 1 >/dev/null
modelfleet bundle build model2/model.onnx --name iris --version 2.0.0 --key publisher.key \
  --smoke-input model2/smoke-in.npy --smoke-output model2/smoke-out.npy --out iris-2.0.0.mfb
modelfleet push iris-2.0.0.mfb
STAGED=$(modelfleet rollout create --model iris --version 2.0.0 --selector hw=cpu \
  --stages 50%:4s,100% --max-error-rate 0.05 --max-p95-latency-ms 100 --min-requests 10)
# Traffic while the first stage soaks, so the gate has figures to judge.
for _ in $(seq 1 60); do
  for site in cloud onprem; do
    http POST "http://127.0.0.1:${SERVE[$site]}/v2/models/iris/infer" \
      '{"inputs":[{"name":"x","shape":[1,4],"datatype":"FP32","data":[5.1,3.5,1.4,0.2]}]}' >/dev/null
  done
  status=$(modelfleet rollout status "$STAGED")
  grep -qiE "state: (completed|rolled_back|paused)" <<<"$status" && break
  sleep 0.2
done
for _ in $(seq 1 50); do
  status=$(modelfleet rollout status "$STAGED")
  grep -qiE "state: (completed|rolled_back|paused)" <<<"$status" && break
  sleep 0.2
done
modelfleet rollout status "$STAGED"

step "where does iris run best (300 requests to each site, then the report)"
python - "${SERVE[cloud]}" "${SERVE[onprem]}" <<'PY'
import json, sys, urllib.request
body = json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32",
                               "data": [5.1, 3.5, 1.4, 0.2]}]}).encode()
for port in sys.argv[1:]:
    for _ in range(300):
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v2/models/iris/infer", data=body)
        urllib.request.urlopen(req, timeout=10).read()
PY
sleep 2.5  # one metrics batch
modelfleet report compare --model iris --since 10m

step "the fleet"
modelfleet agents list
step "done: stopping everything (logs and state under demo-run/)"
