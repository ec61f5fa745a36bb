# Two set-up commands: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Test processes: the suite mostly waits on I/O, so more workers than cores pays.
TEST_WORKERS ?= 3

.PHONY: venv demo test test-containers soak bench bench-mlserver lint clean proto

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "modelfleet needs Python 3.11+"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

venv: $(BIN)/.installed

demo: venv
	PATH="$(CURDIR)/$(BIN):$$PATH" bash deploy/demo.sh

test: venv
	$(BIN)/ruff check .
	$(BIN)/pytest -q -n $(TEST_WORKERS) -m "not containers"

# Needs a Docker engine: the tests marked `containers` (they build the images they run; the
# builds are cached), then a representative set of integration tests with PostgreSQL and every
# mosquitto in containers instead of the machine's services.
CONTAINER_SET ?= tests/integration/test_fleet_api.py tests/integration/test_rollouts.py \
	tests/integration/test_mqtt.py
# The images are built (or found in the cache) first, outside any test's timeout.
test-containers: venv
	bash deploy/images/build-base.sh
	BASE=modelfleet-base:bookworm bash deploy/images/build-images.sh
	$(BIN)/pytest -q -n 2 -m containers tests/containers
	MODELFLEET_TEST_SERVICES=containers $(BIN)/pytest -q -n 2 $(CONTAINER_SET)

# The agent killed with -9 at 200 random moments of its update (20 in `make test`).
soak: venv
	MODELFLEET_SOAK_RUNS=200 $(BIN)/pytest -q tests/integration/test_agent_crash.py -k soak

# MLServer 1.7, the peer bench/serving.py runs beside the agent, in a venv of its own so that
# its pins (FastAPI, uvloop, protobuf...) never touch the project's.
MLSERVER := bench/.venv-mlserver
$(MLSERVER)/bin/mlserver:
	$(PYTHON) -m venv $(MLSERVER)
	$(MLSERVER)/bin/pip install --quiet 'mlserver==1.7.1' onnxruntime numpy

bench-mlserver: $(MLSERVER)/bin/mlserver

bench: venv bench-mlserver
	$(BIN)/python -m bench.serving
	$(BIN)/python -m bench.agent_overhead
	$(BIN)/python -m bench.mqtt_push
	$(BIN)/python -m bench.ingest
	$(BIN)/python -m bench.convergence
	$(BIN)/python -m bench.download
	$(BIN)/python -m bench.credentials
	$(BIN)/python -m bench.inference_limits
	$(BIN)/python -m bench.rest_paths
	$(BIN)/python -m bench.trace_overhead
	$(BIN)/python -c 'import json, pathlib; r = pathlib.Path("bench/results"); \
	  out = {p.stem: json.loads(p.read_text()) for p in sorted(r.glob("*.json")) if p.stem != "latest"}; \
	  (r / "latest.json").write_text(json.dumps(out, indent=2) + "\n"); print("wrote", r / "latest.json")'

# The gRPC OIP messages from agent/serving/proto/grpc_predict_v2.proto (see the README there).
# grpcio-tools is pinned: the protobuf release it embeds is the oldest runtime the module loads
# on (the grpc extra's protobuf floor).
PROTO := agent/serving/proto
proto: venv
	$(BIN)/pip install --quiet 'grpcio-tools==1.76.0'
	$(BIN)/python -m grpc_tools.protoc -I$(PROTO) --python_out=$(PROTO) --pyi_out=$(PROTO) \
	  $(PROTO)/grpc_predict_v2.proto
	sed -i 's/_descriptor_pool.Default()/_descriptor_pool.DescriptorPool()/' \
	  $(PROTO)/grpc_predict_v2_pb2.py

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) $(MLSERVER) demo-run .pytest_cache .ruff_cache
