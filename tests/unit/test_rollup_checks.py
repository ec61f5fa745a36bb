"""control_plane/rollup.py: which stored sketches a reader may merge (the one check left to it
once DDSketch.from_json took the accuracy and the bin range)."""

from __future__ import annotations

from typing import Any

import pytest

from control_plane.rollup import MAX_COUNT, BadRow, checked_sketch
from protocol.sketch import MAX_KEY, MIN_KEY, DDSketch


def stored(**change: Any) -> dict[str, Any]:
    sk = DDSketch()
    sk.add(2.0, 3)
    return {**sk.to_json(), **change}


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"relativeAccuracy": 0.02}, "relativeAccuracy"),  # stored by an older version
        ({"binKeys": [MAX_KEY + 1]}, "binKeys"),
        ({"binKeys": [MIN_KEY - 1]}, "binKeys"),
        ({"binKeys": [10**6]}, "binKeys"),  # gamma**k past a float: quantile would overflow
        ({"zeroCount": MAX_COUNT, "count": MAX_COUNT + 3}, "count"),
        ({"binCounts": "3"}, "binKeys"),
    ],
)
def test_a_stored_sketch_that_cannot_be_merged_is_a_bad_row(change: dict, why: str) -> None:
    with pytest.raises(BadRow, match=why):
        checked_sketch(stored(**change))


def test_a_stored_sketch_of_this_control_plane_is_merged() -> None:
    assert checked_sketch(stored()).count == 3
