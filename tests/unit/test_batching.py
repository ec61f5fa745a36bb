"""Dynamic batching: the plan (pure), joining and splitting, and the batcher on real models."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from agent.config import AgentConfig
from agent.exceptions import ModelNotLoaded
from agent.report.metrics import MetricsRecorder
from agent.serving.batching import (
    Batcher,
    BatchPolicy,
    BatchRunError,
    batch_key,
    join,
    plan_batch,
    split,
)
from agent.serving.execution import ExecutionPlan
from agent.serving.runtime import LoadedModel, OnnxRuntimeModel
from agent.serving.table import ServingTable
from bench.devkit.models import lookup_onnx, mlp_onnx

D = "sha256:" + "0" * 64


def test_a_full_batch_goes_at_once_and_a_partial_one_waits_for_its_delay() -> None:
    p = BatchPolicy(max_batch_size=8, max_queue_delay_s=0.01)
    assert plan_batch([], policy=p, expired=True) == 0
    assert plan_batch([1, 1, 1], policy=p, expired=False) == 0
    assert plan_batch([1, 1, 1], policy=p, expired=True) == 3
    assert plan_batch([4, 4, 1], policy=p, expired=False) == 2  # 8 rows: full
    assert plan_batch([4, 3, 2], policy=p, expired=True) == 2  # 9 would be over the max
    assert plan_batch([12, 1], policy=p, expired=False) == 1  # too big for a batch: alone


def test_a_preferred_size_goes_before_the_delay_the_largest_one_formable() -> None:
    p = BatchPolicy(max_batch_size=16, max_queue_delay_s=1.0, preferred_sizes=(2, 4))
    assert plan_batch([1], policy=p, expired=False) == 0
    assert plan_batch([1, 1], policy=p, expired=False) == 2
    assert plan_batch([1, 1, 1], policy=p, expired=False) == 2
    assert plan_batch([1, 1, 1, 1, 1], policy=p, expired=False) == 4
    assert plan_batch([3, 3], policy=p, expired=False) == 0  # 3 and 6 are not preferred
    assert plan_batch([3, 3], policy=p, expired=True) == 2


def test_requests_join_only_when_all_but_their_rows_agree() -> None:
    a = {"x": np.zeros((2, 16), np.float32)}
    assert batch_key(a) == batch_key({"x": np.ones((5, 16), np.float32)})
    assert batch_key(a) != batch_key({"x": np.zeros((2, 8), np.float32)})
    assert batch_key(a) != batch_key({"x": np.zeros((2, 16), np.float64)})
    assert batch_key({"x": np.float32(1.0)}) is None  # type: ignore[dict-item]
    assert batch_key({"a": np.zeros((2, 1)), "b": np.zeros((3, 1))}) is None


def test_a_joined_answer_splits_back_by_rows_or_not_at_all() -> None:
    reqs = [{"x": np.arange(n * 2).reshape(n, 2)} for n in (1, 3, 2)]
    joined = join(reqs)
    assert joined["x"].shape == (6, 2)
    parts = split({"y": joined["x"] * 2}, [1, 3, 2])
    assert parts is not None
    for req, part in zip(reqs, parts, strict=True):
        assert np.array_equal(part["y"], req["x"] * 2)
    assert split({"y": np.zeros((5, 2))}, [1, 3, 2]) is None  # not one row per input row
    assert split({"y": np.float32(0)}, [1, 3, 2]) is None  # type: ignore[dict-item]


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(2) as p:
        yield p


def _onnx(tmp_path: Path, data: bytes, name: str) -> OnnxRuntimeModel:
    path = tmp_path / f"{name}.onnx"
    path.write_bytes(data)
    return OnnxRuntimeModel(path)


async def test_batched_answers_are_those_of_each_request_alone(
    tmp_path: Path, pool: ThreadPoolExecutor
) -> None:
    model = _onnx(tmp_path, mlp_onnx(), "mlp")
    rng = np.random.default_rng(1)
    requests = [
        {"x": rng.normal(size=(n, 16)).astype(np.float32)} for n in (1, 2, 1, 3, 1, 1, 4, 1)
    ]
    alone = [model.run(r) for r in requests]
    policy = BatchPolicy(max_batch_size=8, max_queue_delay_s=0.2)
    async with Batcher(run=model.run, policy=policy, executor=pool) as batcher:
        results = await asyncio.gather(*(batcher.submit(r) for r in requests))
    for want, got in zip(alone, results, strict=True):
        assert np.array_equal(want["y"], got.outputs["y"])
    # 14 rows, at most 8 a call: no request ran alone.
    assert all(r.batch_size > r.outputs["y"].shape[0] for r in results)
    assert {r.batch_size for r in results} <= {8, 6, 7}
    assert all(r.batch_size <= 8 for r in results)


async def test_one_bad_request_fails_alone_and_the_rest_of_its_batch_is_answered(
    tmp_path: Path, pool: ThreadPoolExecutor
) -> None:
    model = _onnx(tmp_path, lookup_onnx(rows=10), "lookup")
    good = [np.array([i, 9 - i], np.int64) for i in range(4)]
    bad = np.array([3, 99], np.int64)  # 99: out of the table, the joined call fails
    policy = BatchPolicy(max_batch_size=32, max_queue_delay_s=0.2)
    async with Batcher(run=model.run, policy=policy, executor=pool) as batcher:
        results = await asyncio.gather(
            *(batcher.submit({"idx": idx}) for idx in [*good[:2], bad, *good[2:]]),
            return_exceptions=True,
        )
    assert isinstance(results[2], BatchRunError)
    assert "indices" in str(results[2].error).lower()
    for idx, got in zip(good, [*results[:2], *results[3:]], strict=True):
        assert not isinstance(got, BaseException), got
        assert np.array_equal(got.outputs["y"], model.run({"idx": idx})["y"])


async def test_the_table_batches_counts_and_refuses_a_version_not_serving(
    tmp_path: Path, pool: ThreadPoolExecutor
) -> None:
    model = _onnx(tmp_path, mlp_onnx(), "mlp")
    policy = BatchPolicy(max_batch_size=4, max_queue_delay_s=0.2)
    async with ServingTable(
        config=AgentConfig(state_dir=tmp_path),
        executor=pool,
        metrics=MetricsRecorder(datetime.now(UTC)),
        on_rolled_back=lambda _: None,
    ) as table:
        table.restore(LoadedModel("mlp", "1.0.0", D, model, plan=ExecutionPlan(batching=policy)))
        x = np.ones((1, 16), np.float32)
        done = await asyncio.gather(*(table.infer("mlp", {"x": x}) for _ in range(4)))
        assert [d.batch_size for d in done] == [4] * 4
        assert all(np.array_equal(d.outputs["y"], model.run({"x": x})["y"]) for d in done)
        one = await table.infer("mlp", {"x": x}, version="1.0.0")
        assert one.model.version == "1.0.0"
        with pytest.raises(ModelNotLoaded, match=r"'2\.0\.0'"):
            await table.infer("mlp", {"x": x}, version="2.0.0")
        stats = table.stats.models[("mlp", "1.0.0")]
        assert stats.batch_size.count == 5
        assert stats.batch_size.total == 4 * 4 + 1
        assert table.metrics.totals[("mlp", "1.0.0")].requests == 5
