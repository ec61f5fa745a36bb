"""The binary tensor data extension (agent/serving/binary.py through oip.parse_request):
framing checked by name, tensors as views of the body, answers that parse back."""

from __future__ import annotations

import contextlib
import json
import struct
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.exceptions import InferenceInputError
from agent.serving import binary, oip


def framed(inputs: list[dict[str, Any]], raw: bytes, **extra: Any) -> tuple[bytes, int]:
    """A request body as tritonclient lays it out: JSON header, then the raw bytes."""
    header = json.dumps({**extra, "inputs": inputs}).encode()
    return header + raw, len(header)


def binary_input(name: str, arr: np.ndarray, datatype: str) -> tuple[dict[str, Any], bytes]:
    raw = bytes(binary.tensor_bytes(arr))
    spec = {
        "name": name,
        "shape": list(arr.shape),
        "datatype": datatype,
        "parameters": {"binary_data_size": len(raw)},
    }
    return spec, raw


def parse(body: bytes | memoryview, header: int | None) -> oip.InferRequest:
    return oip.parse_request(body, max_elements=1 << 20, header_length=header)


@pytest.mark.parametrize("datatype", ["FP32", "FP16", "FP64", "INT8", "UINT64", "BOOL"])
def test_a_binary_tensor_of_each_type_arrives_as_sent(datatype: str) -> None:
    arr = (np.arange(24).reshape(2, 3, 4) % 2).astype(oip.DTYPES[datatype])
    spec, raw = binary_input("x", arr, datatype)
    body, header = framed([spec], raw)
    got = parse(body, header).feeds["x"]
    assert got.dtype == arr.dtype and np.array_equal(got, arr)


def test_an_aligned_binary_tensor_is_a_view_of_the_body() -> None:
    arr = np.random.default_rng(0).normal(size=(1, 3, 8, 8)).astype(np.float32)
    spec, raw = binary_input("x", arr, "FP32")
    body, header = framed([spec], raw)
    # Laid out as the app reads a body: the binary section on an ALIGN boundary.
    buf = np.zeros(len(body) + 2 * binary.ALIGN, np.uint8)
    start = binary.aligned_offset(header) + (-buf.ctypes.data % binary.ALIGN)
    buf[start : start + len(body)] = np.frombuffer(body, np.uint8)
    got = parse(memoryview(buf)[start : start + len(body)], header).feeds["x"]
    assert np.array_equal(got, arr) and np.shares_memory(got, buf)


def test_bytes_tensors_in_both_encodings_are_the_same_array() -> None:
    words = np.array([b"cat", b"", "n\u00e9".encode(), b"\x00\xff"], dtype=object).reshape(2, 2)
    spec, raw = binary_input("s", words, "BYTES")
    body, header = framed([spec], raw)
    got = parse(body, header).feeds["s"]
    assert got.dtype == object and got.shape == (2, 2) and got.tolist() == words.tolist()
    as_json = {"name": "s", "shape": [2, 2], "datatype": "BYTES", "data": [["a", "b"], ["c", ""]]}
    parsed = parse(json.dumps({"inputs": [as_json]}).encode(), None).feeds["s"]
    assert parsed.tolist() == [[b"a", b"b"], [b"c", b""]]


def test_json_and_binary_inputs_mix_in_one_request() -> None:
    a = np.arange(4, dtype=np.int32)
    spec, raw = binary_input("a", a, "INT32")
    plain = {"name": "b", "shape": [2], "datatype": "FP32", "data": [1.5, 2.5]}
    body, header = framed([plain, spec], raw)
    feeds = parse(body, header).feeds
    assert np.array_equal(feeds["a"], a) and feeds["b"].tolist() == [1.5, 2.5]


ARR = np.arange(6, dtype=np.float32).reshape(2, 3)
SPEC, RAW = binary_input("x", ARR, "FP32")


def _with(size: Any = 24, datatype: str = "FP32", **extra: Any) -> dict[str, Any]:
    return {**SPEC, "datatype": datatype, "parameters": {"binary_data_size": size}, **extra}


# (what it is, body, header length, a fragment the error must hold)
MALFORMED: list[tuple[str, bytes, int | None, str]] = [
    ("size past the end", *framed([_with(size=28)], RAW), "binary_data_size 28 runs past"),
    ("bytes left over", *framed([_with(size=20)], RAW), binary.HEADER),
    ("size that does not match the shape", *framed([_with(size=20)], RAW[:20]), "needs 24 bytes"),
    ("negative size", *framed([_with(size=-1)], RAW), "binary_data_size must be"),
    ("size as text", *framed([_with(size="24")], RAW), "binary_data_size must be"),
    ("data as well", *framed([_with(data=[1] * 6)], RAW), "both data and"),
    ("no header", framed([_with()], b"")[0], None, binary.HEADER),
    ("header cut in the JSON", framed([_with()], RAW)[0], 10, "not JSON"),
    (
        "BYTES length past its tensor",
        *framed([_with(size=8, datatype="BYTES", shape=[1])], struct.pack("<I", 9) + b"abcd"),
        "element 0 is 9 bytes long",
    ),
    (
        "BYTES with too few elements",
        *framed([_with(size=5, datatype="BYTES", shape=[2])], struct.pack("<I", 1) + b"a"),
        "ends before element 1",
    ),
    (
        "BYTES bytes left over",
        *framed([_with(size=7, datatype="BYTES", shape=[1])], struct.pack("<I", 1) + b"abc"),
        "its 1 elements take 5 bytes",
    ),
]


@pytest.mark.parametrize(("what", "body", "header", "fragment"), MALFORMED)
def test_malformed_framing_is_refused_naming_the_field(
    what: str, body: bytes, header: int | None, fragment: str
) -> None:
    with pytest.raises(InferenceInputError) as exc:
        parse(body, header)
    assert fragment in str(exc.value), what


@pytest.mark.parametrize(("value", "length"), [("99", 10), ("-1", 10), ("1e3", 5000), ("", 3)])
def test_a_header_length_that_lies_is_refused_naming_the_header(value: str, length: int) -> None:
    with pytest.raises(InferenceInputError, match=binary.HEADER):
        binary.header_length(value, length)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tail=st.binary(max_size=64), size=st.integers(0, 80), n=st.integers(0, 4))
def test_any_binary_section_is_parsed_or_refused(tail: bytes, size: int, n: int) -> None:
    for datatype in ("FP32", "BYTES", "BOOL"):
        body, header = framed([_with(size=size, datatype=datatype, shape=[n])], tail)
        with contextlib.suppress(InferenceInputError):  # any other exception fails
            got = parse(body, header).feeds["x"]
            assert got.shape == (n,)


def test_an_answer_with_binary_outputs_parses_back() -> None:
    y = np.array([[0.5, np.nan]], np.float32)  # NaN: binary carries what JSON cannot
    z = np.array([1, 2], np.int64)
    request = oip.InferRequest({}, binary_outputs=frozenset({"y"}))
    oip.check_answer({"y": y, "z": z}, max_elements=10, request=request)
    pieces, header = oip.encode_answer({"model_name": "m"}, {"y": y, "z": z}, request)
    body = b"".join(pieces)
    assert header is not None
    doc = json.loads(body[:header])
    assert doc["outputs"][0] == {
        "name": "y",
        "datatype": "FP32",
        "shape": [1, 2],
        "parameters": {"binary_data_size": 8},
    }
    assert doc["outputs"][1]["data"] == [1, 2]
    got = np.frombuffer(body[header:], np.float32).reshape(1, 2)
    assert np.array_equal(got, y, equal_nan=True)
    with pytest.raises(oip.NonFiniteOutput, match="'y'"):
        oip.check_answer({"y": y}, max_elements=10, request=oip.InferRequest({}))


def test_outputs_asked_for_are_checked_selected_and_flagged() -> None:
    doc = {
        "inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}],
        "outputs": [{"name": "b", "parameters": {"binary_data": True}}, {"name": "a"}],
    }
    request = parse(json.dumps(doc).encode(), None)
    assert request.outputs == ("b", "a") and request.is_binary("b")
    assert not request.is_binary("a")
    oip.check_outputs(request, ["a", "b", "c"])
    with pytest.raises(InferenceInputError, match="output 'b' is not an output"):
        oip.check_outputs(request, ["a"])
    one = np.zeros(1)
    assert list(oip.select({"a": one, "b": one, "c": one}, request)) == ["b", "a"]
    doc["parameters"] = {"binary_data_output": "yes"}
    with pytest.raises(InferenceInputError, match="binary_data_output"):
        parse(json.dumps(doc).encode(), None)
