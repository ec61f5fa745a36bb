"""The agent's side of configuration: options read, applied to a runtime, and the keys that
tell versions under different configurations apart (pure, a real tiny ONNX model)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from agent.exceptions import InferenceInputError, UpdateError
from agent.serving.batching import BatchPolicy
from agent.serving.runtime import LoadedModel, load_model
from agent.update.config import as_loaded, config_of, configure, model_options, serving_key
from agent.update.plan import plan
from bench.devkit.models import iris_model
from protocol.desired import DesiredModel, config_digest, desired_from_json
from protocol.exceptions import InvalidMessage

D = "sha256:" + "a" * 64


@pytest.fixture
def loaded(tmp_path: Path) -> LoadedModel:
    path = tmp_path / "m.onnx"
    path.write_bytes(iris_model(0))
    return LoadedModel("iris", "1.0.0", D, load_model("onnx", path))


def test_options_are_checked() -> None:
    assert model_options(None).max_batch is None
    assert model_options({"maxBatch": 2, "other": "kept"}).max_batch == 2
    b = model_options({"batching": {"maxBatchSize": 8, "maxQueueDelayMs": 2}}).batching
    assert b == BatchPolicy(max_batch_size=8, max_queue_delay_s=0.002)
    for bad in (
        {"maxBatch": 0},
        {"maxBatch": True},
        {"outputs": []},
        {"batching": {"maxBatchSize": 0}},
        {"batching": {"maxBatchSize": 2, "maxQueueDelayMs": -1}},
    ):
        with pytest.raises(UpdateError):
            model_options(bad)


def test_configure_wraps_without_loading_and_unwraps(loaded: LoadedModel) -> None:
    cfg = {"maxBatch": 1, "threshold": 0.3}
    lm = configure(loaded, cfg)
    assert lm.config_digest == config_digest(cfg) and config_of(lm) == cfg
    assert serving_key(lm) == DesiredModel("iris", "1.0.0", D, config=cfg).serving_key
    x = np.ones((1, 4), np.float32)
    assert lm.runtime.run({"x": x}).keys() == loaded.runtime.run({"x": x}).keys()
    with pytest.raises(InferenceInputError, match="maxBatch"):
        lm.runtime.run({"x": np.ones((2, 4), np.float32)})
    again = configure(lm, {"maxBatch": 4, "batching": {"maxBatchSize": 4}})
    assert as_loaded(again)[0] is loaded.runtime  # shared, never reloaded
    assert again.batching == BatchPolicy(max_batch_size=4)
    back = configure(again, None)
    assert back.runtime is loaded.runtime and back.batching is None
    assert serving_key(back) == D and config_of(back) is None
    with pytest.raises(UpdateError, match="nosuch"):
        configure(loaded, {"outputs": ["nosuch"]})


def test_the_plan_reapplies_a_running_version_under_a_new_configuration() -> None:
    old = DesiredModel("iris", "1.0.0", D, config={"maxBatch": 2})
    new = DesiredModel("iris", "1.0.0", D, config={"maxBatch": 4})
    running = {"iris": old.serving_key}
    assert plan([old], {D}, running, {}).empty
    p = plan([new], {D}, running, {})
    assert p.activate == (new,) and p.fetch == ()
    assert plan([new], {D}, running, {new.serving_key: "failed"}).activate == ()


def test_desired_config_round_trips_and_a_wrong_digest_is_refused() -> None:
    m = DesiredModel("iris", "1.0.0", D, config={"a": {"b": [1, 2]}})
    doc = {
        "agentId": "x",
        "generation": 1,
        "issuedAt": "2026-12-01T00:00:00Z",
        "expiresAt": "2026-12-02T00:00:00Z",
        "models": [m.to_json()],
    }
    assert desired_from_json(doc).models == (m,)
    doc["models"][0]["configDigest"] = "sha256:" + "0" * 64
    with pytest.raises(InvalidMessage, match="configDigest"):
        desired_from_json(doc)
    doc["models"][0]["config"] = {"deep": {"a": {"b": {"c": {"d": {"e": {"f": {"g": 1}}}}}}}}
    with pytest.raises(InvalidMessage, match="config"):
        desired_from_json(doc)
