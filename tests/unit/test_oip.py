"""agent/serving/oip.py: any body is parsed or refused by name; answers round-trip."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.exceptions import InferenceInputError
from agent.serving import oip

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False),
    st.text(max_size=5),
)
json_values = st.recursive(
    scalars,
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=4), c),
    max_leaves=20,
)
tensor = st.fixed_dictionaries(
    {
        "name": st.one_of(st.just("x"), st.text(max_size=3), st.integers()),
        "shape": st.one_of(st.lists(st.integers(-2, 2**64), max_size=4), json_values),
        "datatype": st.sampled_from([*oip.DTYPES, "BYTES", "nope"]),
        "data": st.one_of(st.lists(scalars, max_size=8), json_values),
    }
)


@SETTINGS
@given(body=st.one_of(st.fixed_dictionaries({"inputs": st.lists(tensor, max_size=3)}), json_values))
@pytest.mark.parametrize("cooperative", [False, True])
def test_any_document_is_parsed_or_refused_by_name(body: Any, cooperative: bool) -> None:
    raw = json.dumps(body).encode()
    try:
        feeds = oip.parse_request(raw, max_elements=64, cooperative=cooperative).feeds
    except InferenceInputError:
        return
    for name, arr in feeds.items():
        spec = next(t for t in body["inputs"] if t["name"] == name)
        assert list(arr.shape) == spec["shape"] and arr.dtype == oip.DTYPES[spec["datatype"]]
        if arr.dtype.kind == "f":
            assert np.isfinite(arr).all()


@SETTINGS
@given(raw=st.binary(max_size=64))
def test_any_bytes_are_parsed_or_refused(raw: bytes) -> None:
    with contextlib.suppress(InferenceInputError):  # any other exception fails
        oip.parse_request(raw, max_elements=64)


@SETTINGS
@given(
    values=st.lists(st.floats(allow_nan=False, allow_infinity=False, width=32), max_size=50),
    piece=st.integers(1, 7),
)
def test_an_answer_in_pieces_is_the_same_json_as_in_one(values: list[float], piece: int) -> None:
    arr = np.array(values, dtype=np.float32).reshape(len(values), 1)
    head = {"model_name": "m", "model_version": "1", "id": "r"}
    streamed = b"".join(oip.answer_pieces(head, {"y": arr, "z": arr[:1]}, piece))
    whole = oip.answer_document(head, {"y": arr, "z": arr[:1]})
    assert json.loads(streamed) == whole


@pytest.mark.parametrize("cooperative", [False, True])
@pytest.mark.parametrize(
    "shape", [[0, 2**63 - 1], [2**62, 0], [0, *[2**40] * 5], [0, 2**61, 2**61]]
)
def test_an_empty_shape_too_big_for_an_array_is_refused_by_name(
    shape: list[int], cooperative: bool
) -> None:
    # No values, so the count (0) is under every limit; but numpy cannot make an array of that
    # shape, and its ValueError escaped parse_request: the server answered 500.
    body = {"inputs": [{"name": "x", "shape": shape, "datatype": "FP32", "data": []}]}
    with pytest.raises(InferenceInputError, match="'x'"):
        oip.parse_request(json.dumps(body).encode(), max_elements=64, cooperative=cooperative)


@pytest.mark.parametrize("cooperative", [False, True])
@pytest.mark.parametrize("where", ["id", "name"])
def test_an_id_or_input_name_past_the_cap_is_refused_without_echoing_it(
    where: str, cooperative: bool
) -> None:
    # The id is echoed in the answer and a name in every refusal, encoded on the event loop:
    # a 60 MiB one held it ~0.4 s for each such request, small requests waiting behind.
    long = "n" * (oip.MAX_NAME + 1)
    tensor = {
        "name": long if where == "name" else "x",
        "shape": [1],
        "datatype": "FP32",
        "data": [1.0],
    }
    body = {"id": long if where == "id" else "r1", "inputs": [tensor]}
    with pytest.raises(InferenceInputError) as exc:
        oip.parse_request(json.dumps(body).encode(), max_elements=64, cooperative=cooperative)
    assert len(str(exc.value)) < 200
    body["id"] = "r1"
    body["parameters"] = {long: {long: float("nan")}}  # a refusal names the path, cut short
    tensor["name"] = "x"
    with pytest.raises(InferenceInputError) as exc:
        oip.parse_request(json.dumps(body).encode(), max_elements=64, cooperative=cooperative)
    assert "NaN" in str(exc.value) and len(str(exc.value)) < 200
    del body["parameters"]
    tensor["name"], body["id"] = "n" * oip.MAX_NAME, "i" * oip.MAX_NAME
    parsed = oip.parse_request(json.dumps(body).encode(), max_elements=64)
    assert list(parsed.feeds) == ["n" * oip.MAX_NAME] and parsed.request_id == "i" * oip.MAX_NAME


@pytest.mark.parametrize("cooperative", [False, True])
def test_both_decoders_read_a_big_integer_as_a_float_and_integer_inputs_refuse_it(
    cooperative: bool,
) -> None:
    def body(datatype: str) -> bytes:
        x = {"name": "x", "shape": [2], "datatype": datatype, "data": [2**70, -(2**64)]}
        return json.dumps({"inputs": [x]}).encode()

    got = oip.parse_request(body("FP64"), max_elements=8, cooperative=cooperative).feeds["x"]
    assert got.tolist() == [2.0**70, -(2.0**64)]
    with pytest.raises(InferenceInputError, match="input 'x'"):
        oip.parse_request(body("INT64"), max_elements=8, cooperative=cooperative)
