"""DDSketch accuracy, merging and its JSON form."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from protocol.exceptions import InvalidMessage
from protocol.sketch import DDSketch


def test_quantiles_within_relative_accuracy() -> None:
    rng = random.Random(7)
    values = [rng.lognormvariate(1.0, 1.2) for _ in range(20_000)]
    sk = DDSketch(0.01)
    for v in values:
        sk.add(v)
    arr = np.array(values)
    for q in (0.5, 0.9, 0.95, 0.99):
        true = float(np.quantile(arr, q, method="lower"))
        assert abs(sk.quantile(q) - true) <= 0.01 * true * 1.0001, q  # type: ignore[operator]


def test_merge_equals_one_sketch_of_everything() -> None:
    a, b, both = DDSketch(), DDSketch(), DDSketch()
    for i in range(1, 1000):
        (a if i % 3 else b).add(i / 10)
        both.add(i / 10)
    a.merge(b)
    assert a.count == both.count
    for q in (0.5, 0.95, 0.99):
        assert a.quantile(q) == both.quantile(q)


def test_zero_and_empty() -> None:
    sk = DDSketch()
    assert sk.quantile(0.5) is None
    sk.add(0.0)
    sk.add(0.0)
    sk.add(5.0)
    assert sk.quantile(0.5) == 0.0
    assert sk.quantile(1.0) == pytest.approx(5.0, rel=0.01)


def test_json_round_trip() -> None:
    sk = DDSketch()
    for v in (0.1, 1, 10, 100):
        sk.add(v)
    back = DDSketch.from_json(json.loads(json.dumps(sk.to_json())))
    assert back.count == 4 and back.quantile(0.5) == sk.quantile(0.5)


def test_cannot_merge_different_accuracy() -> None:
    with pytest.raises(ValueError):
        DDSketch(0.01).merge(DDSketch(0.02))


@pytest.mark.parametrize(
    "doc",
    [
        {"count": 1, "binKeys": [1], "binCounts": []},
        {"count": 5, "binKeys": [1], "binCounts": [1]},
        {"count": 1, "binKeys": ["a"], "binCounts": [1]},
        {"count": 1, "binKeys": [1], "binCounts": [-1]},
        {"count": 1, "binKeys": [1], "binCounts": [1], "relativeAccuracy": 2},
        {"count": 1, "binKeys": list(range(5000)), "binCounts": [0] * 5000},
        "not an object",
    ],
)
def test_bad_json(doc: object) -> None:
    with pytest.raises(InvalidMessage):
        DDSketch.from_json(doc)
