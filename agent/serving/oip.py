"""Open Inference Protocol JSON: request bodies to arrays, answers to bytes. No I/O.

Everything in a request body is hostile until checked. Every refusal is an
``InferenceInputError`` (HTTP 400) naming the input or field, or an ``InferenceLimitError``
(413) naming the limit; nothing here raises anything else for any body.

- JSON is strict: ``NaN``/``Infinity``, numbers too large for a float (``1e999``), lone
  surrogates and nesting deeper than the decoder's recursion limit are refused.
- Shapes are lists of integers in [0, 2**63); their element counts are Python integers, so a
  shape of [2**40, 2**40] is a count over ``max_elements`` (413), never an overflow, and it is
  refused before any array is allocated.
- Data must be numbers of the input's datatype: integers in range for integer types, finite
  numbers that fit the float type, ``true``/``false`` for BOOL.

Big bodies (``cooperative=True``) are decoded with Python-level number hooks and converted in
pieces, and answers are encoded in pieces: the C JSON decoder and encoder hold the GIL for a
whole document, and run in a worker thread they would still stop the event loop for seconds;
with the hooks and pieces that thread yields the GIL at every switch interval.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from agent.exceptions import InferenceInputError, InferenceLimitError
from agent.serving.runtime import DATATYPE_OF, DTYPES

MAX_DIM = 2**63  # a dimension is a non-negative 64-bit integer
MAX_RANK = 32
# An input's name and the request's id are echoed (in refusals, and the id in the answer): on
# the event loop, as one JSON string. Uncapped, a 60 MiB one held the loop ~0.4 s a request.
MAX_NAME = 1024
PIECE_ELEMENTS = 2048  # values converted or encoded between two chances for the loop to run


class NonFiniteOutput(InferenceInputError):
    """The model answered NaN or Infinity for this input (HTTP 422)."""


class _NonFinite:
    """What the decoder makes of NaN and Infinity: refused wherever it is found."""

    def __init__(self, text: str) -> None:
        self.text = text


def _non_finite(text: str) -> _NonFinite:
    return _NonFinite(text)


# Python functions, not the C float and int: calling one runs bytecode, where the thread that
# decodes gives the GIL to the event loop when it asks for it.
def _float(text: str) -> float:
    return float(text)


def _int(text: str) -> int:
    return int(text)


def decode(body: bytes | bytearray, *, cooperative: bool = False) -> Any:
    """Decode a JSON body; raises InferenceInputError for anything that is not JSON."""
    hooks: dict[str, Any] = {"parse_constant": _non_finite}
    if cooperative:
        hooks.update(parse_float=_float, parse_int=_int)
    try:
        return json.loads(body, **hooks)
    except RecursionError:
        raise InferenceInputError("request body is not JSON we accept: nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise InferenceInputError(f"request body is not JSON: {exc}") from None


def _check_values(doc: Any, skip: set[int]) -> None:
    """Refuse NaN, Infinity, overflowed floats and lone surrogates anywhere but in ``skip``
    (the data lists, checked as arrays); raises InferenceInputError naming the field."""
    stack: list[tuple[str, Any]] = [("", doc)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, _NonFinite):
            raise InferenceInputError(f"{path or 'body'}: {value.text} is not a JSON number")
        if isinstance(value, float) and not math.isfinite(value):
            raise InferenceInputError(f"{path or 'body'}: a number too large for a float")
        if isinstance(value, str):
            _check_text(value, path or "body")
        elif isinstance(value, dict):
            for k, v in value.items():
                _check_text(k, f"{path or 'body'} key")
                k = k if len(k) <= 64 else k[:61] + "..."  # a path in a refusal stays short
                stack.append((f"{path}.{k}" if path else k, v))
        elif isinstance(value, list) and id(value) not in skip:
            stack.extend((f"{path}[{i}]", v) for i, v in enumerate(value))


def _check_text(text: str, field: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InferenceInputError(f"{field}: holds a lone surrogate (not UTF-8)") from None


@dataclass(frozen=True)
class _Input:
    name: str
    shape: tuple[int, ...]
    datatype: str
    dtype: np.dtype
    count: int
    data: Any


def _input(i: int, t: Any) -> _Input:
    if not isinstance(t, dict):
        raise InferenceInputError(f"inputs[{i}] must be an object")
    name, shape, datatype = t.get("name"), t.get("shape"), t.get("datatype")
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME:
        raise InferenceInputError(
            f"inputs[{i}].name must be a non-empty string of at most {MAX_NAME} characters"
        )
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_RANK
        or not all(
            isinstance(d, int) and not isinstance(d, bool) and 0 <= d < MAX_DIM for d in shape
        )
    ):
        raise InferenceInputError(
            f"input {name!r}: shape must be a list of at most {MAX_RANK} integers in [0, 2**63)"
        )
    dtype = DTYPES.get(datatype) if isinstance(datatype, str) else None
    if dtype is None:
        raise InferenceInputError(f"input {name!r}: datatype {datatype!r} is not supported")
    return _Input(name, tuple(shape), datatype, dtype, math.prod(shape), t.get("data"))


def _mismatch(inp: _Input, given: str) -> InferenceInputError:
    return InferenceInputError(
        f"input {inp.name!r}: {given} values given, shape {list(inp.shape)} needs {inp.count}"
    )


def _checked(inp: _Input, flat: np.ndarray) -> np.ndarray:
    """``flat`` as the input's dtype; raises InferenceInputError naming the input."""
    kind, want = flat.dtype.kind, inp.dtype.kind
    if flat.size == 0:
        return flat.astype(inp.dtype)
    if kind == "O":
        raise InferenceInputError(
            f"input {inp.name!r}: data holds something other than numbers of {inp.datatype} "
            "(NaN, Infinity, null, an object or an integer beyond 64 bits)"
        )
    if kind not in "biuf":
        raise InferenceInputError(f"input {inp.name!r}: data is not {inp.datatype} (not numbers)")
    if want == "b":
        if kind != "b":
            raise InferenceInputError(f"input {inp.name!r}: BOOL data must be true or false")
        return flat
    if kind == "b":
        raise InferenceInputError(f"input {inp.name!r}: data holds true/false, not {inp.datatype}")
    if want in "iu":
        if kind == "f":
            raise InferenceInputError(
                f"input {inp.name!r}: data holds non-integers, {inp.datatype} needs integers"
            )
        info = np.iinfo(inp.dtype)
        lo, hi = int(flat.min()), int(flat.max())
        if lo < info.min or hi > info.max:
            bad = lo if lo < info.min else hi
            raise InferenceInputError(
                f"input {inp.name!r}: data holds {bad}, out of range for {inp.datatype}"
            )
        return flat.astype(inp.dtype)
    if kind == "f" and not np.isfinite(flat).all():
        raise InferenceInputError(f"input {inp.name!r}: data holds a number too large for a float")
    with np.errstate(over="ignore"):
        cast = flat.astype(inp.dtype)
    if not np.isfinite(cast).all():
        raise InferenceInputError(
            f"input {inp.name!r}: data holds a number too large for {inp.datatype}"
        )
    return cast


def _array(inp: _Input, piece: int | None) -> np.ndarray:
    """The input's data as an array of its shape, converted ``piece`` values at a time.

    The pieces are taken from the end and cut off the list as they are converted, so its
    Python numbers are freed a piece at a time (freeing millions at once holds the GIL too).
    """
    data = inp.data
    if not isinstance(data, list):
        raise InferenceInputError(f"input {inp.name!r}: data must be a list")
    nested = bool(data) and isinstance(data[0], list)
    if not nested and len(data) != inp.count:
        raise _mismatch(inp, str(len(data)))  # before anything is allocated
    out = np.empty(inp.count, dtype=inp.dtype)
    end = inp.count  # out[end:] is filled
    try:
        row = np.asarray(data[0]).size if nested else 1
        step = max(1, len(data) if piece is None else piece // max(1, row))
        for start in reversed(range(0, len(data), step)):
            flat = np.asarray(data[start:]).reshape(-1)
            del data[start:]
            if flat.size > end:
                raise _mismatch(inp, f"more than {inp.count}")
            out[end - flat.size : end] = _checked(inp, flat)
            end -= flat.size
    except (ValueError, TypeError) as exc:
        raise InferenceInputError(
            f"input {inp.name!r}: data is not a regular array of numbers: {exc}"
        ) from None
    if end:
        raise _mismatch(inp, str(inp.count - end))
    try:
        return out.reshape(inp.shape)
    except ValueError:
        # No values (a dimension of 0), yet numpy still refuses dimensions whose product
        # overflows its index type.
        raise InferenceInputError(
            f"input {inp.name!r}: shape {list(inp.shape)} is larger than an array can be"
        ) from None


def parse_request(
    body: bytes | bytearray, *, max_elements: int, cooperative: bool = False
) -> tuple[dict[str, np.ndarray], str | None]:
    """An infer request's named arrays and id; raises InferenceInputError (400) or
    InferenceLimitError (413, over ``max_elements`` values in all inputs together)."""
    doc = decode(body, cooperative=cooperative)
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list) or not doc["inputs"]:
        raise InferenceInputError("request must be an object with a non-empty 'inputs' list")
    if isinstance(doc.get("id"), str) and len(doc["id"]) > MAX_NAME:
        raise InferenceInputError(f"id is longer than {MAX_NAME} characters")
    inputs = [_input(i, t) for i, t in enumerate(doc["inputs"])]
    _check_values(doc, {id(inp.data) for inp in inputs if isinstance(inp.data, list)})
    names: set[str] = set()
    for inp in inputs:
        if inp.name in names:
            raise InferenceInputError(f"input {inp.name!r} is given twice")
        names.add(inp.name)
    total = sum(inp.count for inp in inputs)
    if total > max_elements:
        raise InferenceLimitError(
            f"the inputs hold {total} values, over the limit max_request_elements {max_elements}"
        )
    piece = PIECE_ELEMENTS if cooperative else None
    feeds = {inp.name: _array(inp, piece) for inp in inputs}
    request_id = doc.get("id") if isinstance(doc.get("id"), str) else None
    return feeds, request_id


def check_answer(outputs: Mapping[str, np.ndarray], *, max_elements: int) -> int:
    """The answer's value count; raises InferenceLimitError over ``max_elements``, and
    InferenceInputError for an output JSON cannot carry (NaN or Infinity)."""
    total = sum(int(a.size) for a in outputs.values())
    if total > max_elements:
        raise InferenceLimitError(
            f"the answer would hold {total} values, over the limit max_response_elements "
            f"{max_elements}"
        )
    for name, arr in outputs.items():
        if arr.dtype.kind in "fc" and not np.isfinite(arr).all():
            raise NonFiniteOutput(f"output {name!r} holds NaN or Infinity, which JSON cannot carry")
    return total


def _head(name: str, arr: np.ndarray) -> dict[str, Any]:
    return {"name": name, "datatype": DATATYPE_OF.get(arr.dtype, "BYTES"), "shape": list(arr.shape)}


def answer_document(head: Mapping[str, Any], outputs: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """A small answer as one JSON-ready object (``check_answer`` first)."""
    return {
        **head,
        "outputs": [{**_head(n, a), "data": a.reshape(-1).tolist()} for n, a in outputs.items()],
    }


def answer_pieces(
    head: Mapping[str, Any], outputs: Mapping[str, np.ndarray], piece: int = PIECE_ELEMENTS
) -> Iterator[bytes]:
    """A large answer as pieces of one JSON document, ``piece`` values at a time, so no more
    than one piece of it is ever in memory as Python objects (``check_answer`` first)."""
    start = json.dumps(dict(head), allow_nan=False)[:-1]
    yield (start + (", " if head else "") + '"outputs": [').encode()
    for i, (name, arr) in enumerate(outputs.items()):
        yield ((", " if i else "") + json.dumps(_head(name, arr))[:-1] + ', "data": [').encode()
        flat = arr.reshape(-1)
        for at in range(0, flat.size, piece):
            text = json.dumps(flat[at : at + piece].tolist(), allow_nan=False)[1:-1]
            yield ((", " if at else "") + text).encode()
        yield b"]}"
    yield b"]}"


def take(pieces: Iterator[bytes], budget: int) -> bytes:
    """The next pieces, joined, up to about ``budget`` bytes; b"" when there are none left."""
    out: list[bytes] = []
    size = 0
    for p in pieces:
        out.append(p)
        size += len(p)
        if size >= budget:
            break
    return b"".join(out)
