"""Execution settings: the manifest's section, the agent's overrides, the plan (pure), the
inference port's tokens."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.exceptions import AgentConfigError
from agent.serving.access import token_admits
from agent.serving.batching import BatchPolicy
from agent.serving.execution import choose_providers, plan_execution
from agent.settings import load_file, merge, read_tokens, to_config
from protocol.exceptions import InvalidMessage
from protocol.execution import Batching, Execution
from protocol.manifest import TensorSpec, manifest_from_json

CPU, CUDA, TRT, OV = (
    "CPUExecutionProvider",
    "CUDAExecutionProvider",
    "TensorrtExecutionProvider",
    "OpenVINOExecutionProvider",
)
FREE = (TensorSpec("x", "FP32", (-1, 16)),)
FIXED = (TensorSpec("x", "FP32", (1, 16)),)


def _manifest(execution: object) -> dict[str, object]:
    return {
        "name": "m",
        "version": "1.0.0",
        "runtime": "onnx",
        "created": "2026-01-01T00:00:00Z",
        "files": [
            {
                "path": "model.onnx",
                "digest": "sha256:" + "0" * 64,
                "size": 1,
                "role": "model",
                "mediaType": "application/vnd.onnx.model+protobuf",
            }
        ],
        "signature": {
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 16]}],
            "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 4]}],
        },
        "execution": execution,
    }


def test_the_manifest_section_round_trips() -> None:
    doc = {
        "batching": {"maxBatchSize": 8, "maxQueueDelayMs": 2.5, "preferredBatchSizes": [8, 4]},
        "instances": 2,
        "intraOpThreads": 0,
        "providers": [CUDA, CPU],
        "warmupRequests": 3,
    }
    m = manifest_from_json(_manifest(doc))
    assert m.execution == Execution(
        batching=Batching(8, 2.5, (4, 8)),
        instances=2,
        intra_op_threads=0,
        providers=(CUDA, CPU),
        warmup_requests=3,
    )
    assert manifest_from_json(m.to_json()) == m
    assert "execution" not in m.extra


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        ({"instances": 0}, "execution.instances"),
        ({"instances": True}, "execution.instances"),
        ({"intraOpThreads": 1000}, "execution.intraOpThreads"),
        ({"providers": ["cuda"]}, "execution.providers"),
        ({"threads": 2}, "execution.threads"),
        ({"batching": {"maxQueueDelayMs": 1}}, "execution.batching.maxBatchSize"),
        (
            {"batching": {"maxBatchSize": 4, "maxQueueDelayMs": -1}},
            "execution.batching.maxQueueDelayMs",
        ),
        (
            {"batching": {"maxBatchSize": 4, "preferredBatchSizes": [8]}},
            "execution.batching.preferredBatchSizes[0]",
        ),
        ([], "execution"),
    ],
)
def test_a_bad_setting_is_refused_naming_its_field(doc: object, field: str) -> None:
    with pytest.raises(InvalidMessage) as exc:
        manifest_from_json(_manifest(doc))
    assert exc.value.field == field


def test_providers_are_the_wanted_ones_this_build_has_cpu_last() -> None:
    have = [TRT, CUDA, CPU]
    assert choose_providers([TRT, CUDA, CPU], have, allow_cuda=True) == (TRT, CUDA, CPU)
    assert choose_providers([OV, CUDA], have, allow_cuda=True) == (CUDA, CPU)  # no OpenVINO
    assert choose_providers([CUDA, TRT], have, allow_cuda=False) == (CPU,)  # --no-cuda
    assert choose_providers([CPU, CUDA], have, allow_cuda=True) == (CUDA, CPU)
    assert choose_providers([CUDA], [CPU], allow_cuda=True) == (CPU,)  # CPU-only build


def test_overrides_win_in_order_and_batching_needs_a_free_first_dimension() -> None:
    manifest = Execution(batching=Batching(8, 2.0, (4,)), instances=2, providers=(CUDA,))
    every = Execution(intra_op_threads=4, instances=3)
    mine = Execution(instances=1, batching=Batching(16, 5.0))
    plan = plan_execution(
        manifest,
        [every, mine],
        inputs=FREE,
        default_providers=[CPU],
        available_providers=[CUDA, CPU],
        allow_cuda=True,
    )
    assert (plan.instances, plan.intra_op_threads, plan.inter_op_threads) == (1, 4, 1)
    assert plan.providers == (CUDA, CPU)
    assert plan.batching == BatchPolicy(max_batch_size=16, max_queue_delay_s=0.005)
    off = plan_execution(
        manifest,
        [Execution(batching=Batching(0))],
        inputs=FREE,
        default_providers=[CPU],
        available_providers=[CPU],
        allow_cuda=True,
    )
    assert off.batching is None and off.providers == (CPU,)
    fixed = plan_execution(
        manifest,
        [],
        inputs=FIXED,
        default_providers=[CPU],
        available_providers=[CPU],
        allow_cuda=True,
    )
    assert fixed.batching is None and fixed.note and "'x'" in fixed.note
    assert plan_execution(
        None,
        [],
        inputs=FREE,
        default_providers=[CUDA, CPU],
        available_providers=[CUDA, CPU],
        allow_cuda=True,
    ).providers == (CUDA, CPU)


def test_agent_toml_models_tables_become_overrides(tmp_path: Path) -> None:
    alice, bob = "A" + "a" * 20, "b" * 21
    (tmp_path / "tokens").write_text(f"# inference clients\n{alice}\n\n{bob}\n")
    toml = tmp_path / "agent.toml"
    toml.write_text(
        f'state_dir = "{tmp_path}"\nserve_token_file = "{tmp_path / "tokens"}"\n'
        '[models."*"]\nintra_op_threads = 2\n'
        "[models.resnet]\nmax_batch_size = 8\nmax_queue_delay_ms = 2\n"
        'preferred_batch_sizes = [4, 8]\ninstances = 2\nproviders = ["CPUExecutionProvider"]\n'
    )
    config = to_config(merge({}, load_file(toml)))
    assert config.model_execution["*"] == Execution(intra_op_threads=2)
    assert config.model_execution["resnet"] == Execution(
        batching=Batching(8, 2.0, (4, 8)), instances=2, providers=(CPU,)
    )
    assert config.serve_tokens == (alice, bob)
    toml.write_text('[models.resnet]\nmax_batch_size = "8"\n')
    with pytest.raises(AgentConfigError, match=r"models\.resnet\.max_batch_size"):
        load_file(toml)
    toml.write_text("[models.resnet]\nthreads = 8\n")
    with pytest.raises(AgentConfigError, match="'threads'"):
        load_file(toml)


def test_tokens_are_checked_and_compared_whole(tmp_path: Path) -> None:
    f = tmp_path / "tokens"
    f.write_text("short\n")
    with pytest.raises(AgentConfigError, match=r"serve-token-file .* 16 or more"):
        read_tokens(str(f), "serve-token-file")
    f.write_text("\n# none\n")
    with pytest.raises(AgentConfigError, match="holds no token"):
        read_tokens(str(f))
    tokens = ("t" * 20, "u" * 20)
    assert token_admits("Bearer " + "u" * 20, tokens)
    assert not token_admits("Bearer " + "u" * 19, tokens)
    assert not token_admits("Basic " + "u" * 20, tokens)
    assert not token_admits(None, tokens)
