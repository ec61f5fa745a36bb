"""Open Inference Protocol over gRPC: request messages to arrays, arrays to answers. No I/O.

Everything in a request is hostile until checked. Every refusal is an ``InferenceInputError``
(INVALID_ARGUMENT) naming the field, or an ``InferenceLimitError`` (RESOURCE_EXHAUSTED)
naming the limit; nothing here raises anything else for any message.

- Raw contents (``raw_input_contents``, one entry per input) are the values flattened in
  row-major order, little-endian; their byte count must be exactly what the shape and datatype
  need, and they become arrays without a copy (read-only views of the message's bytes).
- Typed contents (``contents.fp32_contents`` and the like) are accepted for every datatype but
  FP16 (which has no typed field); the request uses one form or the other, never both.
- Shapes are checked and their element counts summed before any array is made, so a shape of
  [2**40, 2**40] is a count over ``max_request_elements``, never an allocation.
- Answers always carry raw contents (``raw_output_contents``), as Triton's server does: the
  values are copied once into the message, whatever their number.
"""

from __future__ import annotations

import hmac
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from agent.exceptions import InferenceInputError, InferenceLimitError
from agent.serving.oip import MAX_NAME, MAX_RANK
from agent.serving.proto import grpc_predict_v2_pb2 as pb
from agent.serving.runtime import DATATYPE_OF, DTYPES

# Datatype -> the typed-contents field that carries it (FP16 has none: raw only).
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}


@dataclass(frozen=True)
class InferCall:
    """A checked ModelInfer request: what to run and what to send back."""

    model: str
    version: str | None  # None: the version serving now
    request_id: str
    feeds: dict[str, np.ndarray]
    outputs: tuple[str, ...]  # requested output names; () for every output


@dataclass(frozen=True)
class _Input:
    index: int
    name: str
    datatype: str
    dtype: np.dtype
    shape: tuple[int, ...]
    count: int


def _input(i: int, t: pb.ModelInferRequest.InferInputTensor) -> _Input:
    field = f"inputs[{i}]"
    if not 0 < len(t.name) <= MAX_NAME:
        raise InferenceInputError(
            f"{field}.name must be a non-empty string of at most {MAX_NAME} characters"
        )
    dtype = DTYPES.get(t.datatype)
    if dtype is None:
        raise InferenceInputError(
            f"{field}.datatype: {t.datatype[:64]!r} is not supported (one of {', '.join(DTYPES)})"
        )
    shape = tuple(t.shape)
    if len(shape) > MAX_RANK or any(d < 0 for d in shape):
        raise InferenceInputError(
            f"{field}.shape must be at most {MAX_RANK} dimensions, none negative; got {list(shape)}"
        )
    # A Python integer: a product of huge dimensions is a count over the limit, not an overflow.
    return _Input(i, t.name, t.datatype, dtype, shape, math.prod(shape))


def _from_raw(inp: _Input, raw: bytes) -> np.ndarray:
    need = inp.count * inp.dtype.itemsize
    if len(raw) != need:
        raise InferenceInputError(
            f"raw_input_contents[{inp.index}]: {len(raw)} bytes for input {inp.name!r}, "
            f"whose shape {list(inp.shape)} of {inp.datatype} needs {need}"
        )
    arr = np.frombuffer(raw, dtype=inp.dtype.newbyteorder("<"))
    if inp.datatype == "BOOL" and arr.size and arr.view(np.uint8).max() > 1:
        raise InferenceInputError(
            f"raw_input_contents[{inp.index}]: BOOL bytes of input {inp.name!r} must be 0 or 1"
        )
    return arr.astype(inp.dtype, copy=False).reshape(inp.shape)


def _from_contents(inp: _Input, contents: pb.InferTensorContents) -> np.ndarray:
    field = CONTENTS_FIELD.get(inp.datatype)
    where = f"inputs[{inp.index}].contents"
    if field is None:
        raise InferenceInputError(
            f"{where}: {inp.datatype} has no typed contents; send it in raw_input_contents"
        )
    given = [f.name for f, _ in contents.ListFields() if f.name != field]
    if given:
        raise InferenceInputError(
            f"{where}.{given[0]} does not carry {inp.datatype} (use {where}.{field})"
        )
    values = getattr(contents, field)
    if len(values) != inp.count:
        raise InferenceInputError(
            f"{where}.{field}: {len(values)} values for input {inp.name!r}, "
            f"whose shape {list(inp.shape)} needs {inp.count}"
        )
    wide = np.array(values, dtype=DTYPES[_WIDE[field]])
    if inp.dtype.kind in "iu" and wide.size and inp.dtype.itemsize < wide.dtype.itemsize:
        info = np.iinfo(inp.dtype)
        lo, hi = int(wide.min()), int(wide.max())
        if lo < info.min or hi > info.max:
            raise InferenceInputError(
                f"{where}.{field}: holds {lo if lo < info.min else hi}, "
                f"out of range for {inp.datatype}"
            )
    return wide.astype(inp.dtype, copy=False).reshape(inp.shape)


# The typed field's own type: narrower datatypes are range-checked down from it.
_WIDE = {
    "bool_contents": "BOOL",
    "int_contents": "INT32",
    "int64_contents": "INT64",
    "uint_contents": "UINT32",
    "uint64_contents": "UINT64",
    "fp32_contents": "FP32",
    "fp64_contents": "FP64",
}


def check_name(field: str, name: str) -> None:
    """Raise InferenceInputError unless ``name`` is 1 to MAX_NAME characters (it is echoed)."""
    if not 0 < len(name) <= MAX_NAME:
        raise InferenceInputError(f"{field} must be 1 to {MAX_NAME} characters")


def parse_infer(req: pb.ModelInferRequest, *, max_elements: int) -> InferCall:
    """A ModelInfer request's model, arrays and requested outputs; raises
    InferenceInputError naming the field, or InferenceLimitError over ``max_elements`` values
    in all inputs together."""
    check_name("model_name", req.model_name)
    if len(req.id) > MAX_NAME:
        raise InferenceInputError(f"id is longer than {MAX_NAME} characters")
    if not req.inputs:
        raise InferenceInputError("inputs: the request has none")
    inputs = [_input(i, t) for i, t in enumerate(req.inputs)]
    names: set[str] = set()
    for inp in inputs:
        if inp.name in names:
            raise InferenceInputError(
                f"inputs[{inp.index}].name: input {inp.name!r} is given twice"
            )
        names.add(inp.name)
    total = sum(inp.count for inp in inputs)
    if total > max_elements:
        raise InferenceLimitError(
            f"the inputs hold {total} values, over the limit max_request_elements {max_elements}"
        )
    raw = req.raw_input_contents
    if raw:
        if len(raw) != len(inputs):
            raise InferenceInputError(
                f"raw_input_contents has {len(raw)} entries for {len(inputs)} inputs"
            )
        typed = [inp.index for inp in inputs if req.inputs[inp.index].HasField("contents")]
        if typed:
            raise InferenceInputError(
                f"inputs[{typed[0]}].contents is given with raw_input_contents (one or the other)"
            )
        feeds = {inp.name: _from_raw(inp, raw[inp.index]) for inp in inputs}
    else:
        feeds = {inp.name: _from_contents(inp, req.inputs[inp.index].contents) for inp in inputs}
    wanted = tuple(o.name for o in req.outputs)
    if len(set(wanted)) != len(wanted):
        raise InferenceInputError("outputs: an output is requested twice")
    return InferCall(req.model_name, req.model_version or None, req.id, feeds, wanted)


def check_outputs(
    outputs: Mapping[str, np.ndarray], wanted: tuple[str, ...], *, max_elements: int
) -> dict[str, np.ndarray]:
    """The outputs to send (``wanted``, or all), in order; raises InferenceInputError for an
    output the model does not have, InferenceLimitError over ``max_elements`` values."""
    for i, name in enumerate(wanted):
        if name not in outputs:
            raise InferenceInputError(
                f"outputs[{i}].name: the model has no output {name[:MAX_NAME]!r} "
                f"(it has {', '.join(outputs)})"
            )
    chosen = {n: outputs[n] for n in wanted} if wanted else dict(outputs)
    total = sum(int(a.size) for a in chosen.values())
    if total > max_elements:
        raise InferenceLimitError(
            f"the answer would hold {total} values, over the limit max_response_elements "
            f"{max_elements}"
        )
    return chosen


def answer(
    model: str, version: str, request_id: str, outputs: Mapping[str, np.ndarray]
) -> pb.ModelInferResponse:
    """The ModelInfer answer, raw contents; raises TypeError for an output of a datatype the
    protocol cannot carry (strings, objects)."""
    resp = pb.ModelInferResponse(model_name=model, model_version=version, id=request_id)
    for name, arr in outputs.items():
        datatype = DATATYPE_OF.get(arr.dtype)
        if datatype is None:
            raise TypeError(f"output {name!r} is {arr.dtype}, which has no numeric datatype")
        resp.outputs.add(name=name, datatype=datatype, shape=arr.shape)
        resp.raw_output_contents.append(
            np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()
        )
    return resp


def bearer_token(metadata: Iterable[tuple[str, str | bytes]]) -> str | None:
    """The token of an ``authorization: Bearer <token>`` metadata entry, if there is one."""
    for key, value in metadata:
        if key.lower() == "authorization" and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


def token_accepted(given: str | None, tokens: Iterable[str]) -> bool:
    """Whether ``given`` is one of ``tokens`` (compared in constant time, each of them)."""
    if given is None:
        return False
    ok = False
    for t in tokens:
        ok |= hmac.compare_digest(given.encode(), t.encode())
    return ok
