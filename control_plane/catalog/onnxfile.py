"""What a bundle needs from an ONNX file, read without loading its weights.

An ONNX model is a protobuf ``ModelProto``. Its weights are the bulk of the file (initializers'
``raw_data``) or live in external data files the initializers name. This reader walks the
protobuf's fields with seeks, reading only the graph's inputs and outputs and the few fields of
each tensor that say where its data lives, so a 2 GB model is read in a few kilobytes of
memory. The field numbers are onnx.proto's (stable since IR version 3); a file that is not a
well-formed protobuf raises :class:`OnnxFormatError`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from protocol.manifest import TensorSpec

# onnx.proto's TensorProto.DataType values, as Open Inference Protocol datatypes.
ELEM_TYPES = {
    1: "FP32",
    2: "UINT8",
    3: "INT8",
    4: "UINT16",
    5: "INT16",
    6: "INT32",
    7: "INT64",
    8: "BYTES",
    9: "BOOL",
    10: "FP16",
    11: "FP64",
    12: "UINT32",
    13: "UINT64",
}
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5
_MAX_SMALL = 1024 * 1024  # the most a name, value info or key/value entry may take
_MAX_DEPTH = 32  # subgraphs within subgraphs


class OnnxFormatError(ValueError):
    """The file is not an ONNX model this reader can walk."""


@dataclass(frozen=True)
class OnnxFacts:
    """A model's inputs and outputs, and the external data files its tensors name."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    external: tuple[str, ...]  # locations as written, relative to the model's directory


class _Reader:
    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        f.seek(0, 2)
        self.size = f.tell()

    def varint(self, end: int) -> int:
        shift = result = 0
        while True:
            if self.f.tell() >= end or shift > 63:
                raise OnnxFormatError("malformed varint")
            byte = self.f.read(1)[0]
            result |= (byte & 0x7F) << shift
            if byte < 0x80:
                return result
            shift += 7

    def fields(self, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
        """(field number, wire type, value or payload offset, payload length) of a message."""
        if end > self.size:
            raise OnnxFormatError("message runs past the end of the file")
        pos = start
        while pos < end:
            self.f.seek(pos)
            key = self.varint(end)
            number, wire = key >> 3, key & 7
            if wire == _VARINT:
                value, length = self.varint(end), 0
            elif wire == _LEN:
                length = self.varint(end)
                value = self.f.tell()
                if value + length > end:
                    raise OnnxFormatError("field runs past its message")
            elif wire in (_I64, _I32):
                value, length = self.f.tell(), 8 if wire == _I64 else 4
            else:
                raise OnnxFormatError(f"unsupported wire type {wire}")
            pos = (value + length) if wire != _VARINT else self.f.tell()
            if pos > end:
                raise OnnxFormatError("field runs past its message")
            yield number, wire, value, length

    def small(self, offset: int, length: int) -> bytes:
        if length > _MAX_SMALL:
            raise OnnxFormatError(f"a {length}-byte field where a small one was expected")
        self.f.seek(offset)
        return self.f.read(length)


def read_onnx(f: BinaryIO) -> OnnxFacts:
    """Inputs, outputs and external data locations of the ONNX model in ``f`` (seekable);
    raises OnnxFormatError."""
    r = _Reader(f)
    graph = None
    for number, wire, value, length in r.fields(0, r.size):
        if number == 7 and wire == _LEN:  # ModelProto.graph
            graph = (value, value + length)
    if graph is None:
        raise OnnxFormatError("no graph in the file: not an ONNX model")
    external: list[str] = []
    inits: set[str] = set()
    inputs: list[TensorSpec] = []
    outputs: list[TensorSpec] = []
    for number, wire, value, length in r.fields(*graph):
        if wire != _LEN:
            continue
        if number == 11:  # GraphProto.input
            inputs.append(_value_info(r, value, value + length))
        elif number == 12:  # GraphProto.output
            outputs.append(_value_info(r, value, value + length))
        elif number == 5:  # GraphProto.initializer
            inits.add(_tensor(r, value, value + length, external))
    _graph_tensors(r, *graph, external, depth=0)
    # Graph inputs that are also initializers are constants with defaults, not model inputs
    # (ONNX Runtime leaves them out the same way).
    return OnnxFacts(
        tuple(t for t in inputs if t.name not in inits),
        tuple(outputs),
        tuple(dict.fromkeys(external)),
    )


def _graph_tensors(r: _Reader, start: int, end: int, external: list[str], depth: int) -> None:
    """External data named anywhere below a graph but its own initializers (read already at
    depth 0): sparse initializers, node attributes, subgraphs."""
    if depth > _MAX_DEPTH:
        raise OnnxFormatError("subgraphs nested too deep")
    for number, wire, value, length in r.fields(start, end):
        if wire != _LEN:
            continue
        if number == 5 and depth:  # initializers of a subgraph
            _tensor(r, value, value + length, external)
        elif number == 15:  # GraphProto.sparse_initializer
            _sparse(r, value, value + length, external)
        elif number == 1:  # GraphProto.node
            for n, w, v, ln in r.fields(value, value + length):
                if n == 5 and w == _LEN:  # NodeProto.attribute
                    _attribute(r, v, v + ln, external, depth)


def _attribute(r: _Reader, start: int, end: int, external: list[str], depth: int) -> None:
    for number, wire, value, length in r.fields(start, end):
        if wire != _LEN:
            continue
        if number in (5, 10):  # AttributeProto.t, .tensors
            _tensor(r, value, value + length, external)
        elif number in (6, 11):  # AttributeProto.g, .graphs
            _graph_tensors(r, value, value + length, external, depth + 1)
        elif number in (22, 23):  # AttributeProto.sparse_tensor, .sparse_tensors
            _sparse(r, value, value + length, external)


def _sparse(r: _Reader, start: int, end: int, external: list[str]) -> None:
    for number, wire, value, length in r.fields(start, end):
        if number in (1, 2) and wire == _LEN:  # SparseTensorProto.values, .indices
            _tensor(r, value, value + length, external)


def _tensor(r: _Reader, start: int, end: int, external: list[str]) -> str:
    """A tensor's name; its external data location, if any, goes to ``external``."""
    name = ""
    location = None
    data_location = 0
    for number, wire, value, length in r.fields(start, end):
        if number == 8 and wire == _LEN:  # TensorProto.name
            name = r.small(value, length).decode("utf-8", "replace")
        elif number == 13 and wire == _LEN:  # TensorProto.external_data (key/value)
            key = val = ""
            for n, w, v, ln in r.fields(value, value + length):
                if w == _LEN and n in (1, 2):
                    text = r.small(v, ln).decode("utf-8", "replace")
                    key, val = (text, val) if n == 1 else (key, text)
            if key == "location":
                location = val
        elif number == 14 and wire == _VARINT:  # TensorProto.data_location
            data_location = value
    if data_location == 1:  # EXTERNAL
        if not location:
            raise OnnxFormatError(f"tensor {name!r} has external data but no location")
        external.append(location)
    return name


def _value_info(r: _Reader, start: int, end: int) -> TensorSpec:
    name, datatype, shape = "", "BYTES", ()
    for number, wire, value, length in r.fields(start, end):
        if number == 1 and wire == _LEN:  # ValueInfoProto.name
            name = r.small(value, length).decode("utf-8", "replace")
        elif number == 2 and wire == _LEN:  # ValueInfoProto.type -> TypeProto.tensor_type
            for n, w, v, ln in r.fields(value, value + length):
                if n == 1 and w == _LEN:
                    datatype, shape = _tensor_type(r, v, v + ln)
    return TensorSpec(name, datatype, shape)


def _tensor_type(r: _Reader, start: int, end: int) -> tuple[str, tuple[int, ...]]:
    datatype, dims = "BYTES", []
    for number, wire, value, length in r.fields(start, end):
        if number == 1 and wire == _VARINT:  # TypeProto.Tensor.elem_type
            datatype = ELEM_TYPES.get(value, "BYTES")
        elif number == 2 and wire == _LEN:  # TypeProto.Tensor.shape
            for n, w, v, ln in r.fields(value, value + length):
                if n == 1 and w == _LEN:  # TensorShapeProto.dim
                    dim = -1
                    for dn, dw, dv, _ in r.fields(v, v + ln):
                        if dn == 1 and dw == _VARINT and dv < 2**63:  # dim_value
                            dim = dv
                    dims.append(dim)
                    if len(dims) > 64:
                        raise OnnxFormatError("a tensor with more than 64 dimensions")
    return datatype, tuple(dims)
