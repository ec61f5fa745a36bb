"""metrics/rollup.py: which stored sketches a reader may merge (the one check left to it
once DDSketch.from_json took the accuracy and the bin range)."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from control_plane.metrics.series import MAX_COUNT, BadRow, checked_sketch
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


stored_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=3),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=3), c, max_size=3),
    max_leaves=10,
)
sketch_fields = st.sampled_from(
    ["relativeAccuracy", "count", "sum", "min", "max", "zeroCount", "binKeys", "binCounts"]
)


@settings(max_examples=500, deadline=None)
@given(
    doc=st.one_of(stored_values, st.dictionaries(sketch_fields, stored_values)),
    base=st.booleans(),
)
def test_any_stored_value_is_a_sketch_or_a_bad_row(doc: Any, base: bool) -> None:
    # The roll-up catches only BadRow here: any other exception is a bug, which must stop the
    # pass (MAX_ALONE_PER_PASS) rather than set every row aside as if its data were bad.
    if base and isinstance(doc, dict):
        doc = {**stored(), **doc}
    with contextlib.suppress(BadRow):  # any other exception fails
        checked_sketch(doc)
