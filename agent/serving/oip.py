"""Open Inference Protocol JSON (and binary tensors): request bodies to arrays, answers to
bytes. No I/O.

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

Bodies are decoded with orjson (about 2.5x the standard library on tensor bodies, and ~30x
when encoding arrays); a body orjson refuses is decoded again by the standard library, which
says why in the terms above (or accepts what it may: an integer beyond 64 bits, a NaN that is
then refused by name). Inputs sent as binary tensors (``agent/serving/binary.py``) are views
of the body.

Very big bodies (``cooperative=True``) are decoded with Python-level number hooks and converted in
pieces, and answers are encoded in pieces: the C JSON decoder and encoder hold the GIL for a
whole document, and run in a worker thread they would still stop the event loop for seconds;
with the hooks and pieces that thread yields the GIL at every switch interval.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from agent.exceptions import InferenceInputError, InferenceLimitError
from agent.serving import binary as bin_ext
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


def _int(text: str) -> int | float:
    # An integer beyond 64 bits is a float, as orjson decodes it: both decoders agree, and
    # an integer datatype then refuses it as out of range (too many digits stay refused).
    value = int(text)
    return value if -(2**63) <= value < 2**64 else float(text)


def decode(body: bytes | bytearray | memoryview, *, cooperative: bool = False) -> Any:
    """Decode a JSON body; raises InferenceInputError for anything that is not JSON."""
    if not cooperative:
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            pass  # the standard library's decoder below says why, in this module's terms
    if isinstance(body, memoryview):
        body = body.tobytes()  # the standard library's decoder takes no memoryview
    hooks: dict[str, Any] = {"parse_constant": _non_finite, "parse_int": _int}
    if cooperative:
        hooks.update(parse_float=_float)
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
    binary_size: int | None = None  # bytes in the binary section (binary tensor extension)


def _parameters(t: dict[str, Any], what: str) -> dict[str, Any]:
    params = t.get("parameters")
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise InferenceInputError(f"{what}: parameters must be an object")
    return params


def _binary_size(name: str, t: dict[str, Any], binary: bool) -> int | None:
    size = _parameters(t, f"input {name!r}").get("binary_data_size")
    if size is None:
        return None
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise InferenceInputError(
            f"input {name!r}: parameters.binary_data_size must be a non-negative integer"
        )
    if not binary:
        raise InferenceInputError(
            f"input {name!r}: parameters.binary_data_size needs the {bin_ext.HEADER} header"
        )
    if "data" in t:
        raise InferenceInputError(
            f"input {name!r}: holds both data and parameters.binary_data_size"
        )
    return size


def _input(i: int, t: Any, binary: bool = False) -> _Input:
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
    return _Input(
        name,
        tuple(shape),
        datatype,
        dtype,
        math.prod(shape),
        t.get("data"),
        _binary_size(name, t, binary),
    )


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


def _bytes_array(inp: _Input) -> np.ndarray:
    """A BYTES input given as JSON: strings (nested as the shape, or flat), each as UTF-8."""
    data = inp.data
    if not isinstance(data, list):
        raise InferenceInputError(f"input {inp.name!r}: data must be a list")
    flat: list[Any] = []
    stack = [iter(data)]
    while stack:  # flattened in order without recursion: the nesting is the client's to choose
        for v in stack[-1]:
            if isinstance(v, list):
                stack.append(iter(v))
                break
            flat.append(v)
            if len(flat) > inp.count:
                raise _mismatch(inp, f"more than {inp.count}")
        else:
            stack.pop()
    out = np.empty(len(flat), dtype=object)
    for i, v in enumerate(flat):
        if not isinstance(v, str):
            raise InferenceInputError(f"input {inp.name!r}: BYTES data must be strings")
        try:
            out[i] = v.encode("utf-8")
        except UnicodeEncodeError:
            raise InferenceInputError(
                f"input {inp.name!r}: data holds a lone surrogate (not UTF-8)"
            ) from None
    if len(flat) != inp.count:
        raise _mismatch(inp, str(len(flat)))
    return _reshaped(inp, out)


def _reshaped(inp: _Input, out: np.ndarray) -> np.ndarray:
    try:
        return out.reshape(inp.shape)
    except ValueError:
        # No values (a dimension of 0), yet numpy still refuses dimensions whose product
        # overflows its index type.
        raise InferenceInputError(
            f"input {inp.name!r}: shape {list(inp.shape)} is larger than an array can be"
        ) from None


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
    return _reshaped(inp, out)


@dataclass(frozen=True)
class InferRequest:
    """An infer request, checked: its arrays, its id, and how the answer is wanted."""

    feeds: dict[str, np.ndarray]
    request_id: str | None = None
    # The outputs asked for, by name, in order (None: every output of the model) ...
    outputs: tuple[str, ...] | None = None
    # ... those of them to send as binary tensor data, and whether every output is.
    binary_outputs: frozenset[str] = frozenset()
    binary_all: bool = False

    def is_binary(self, output: str) -> bool:
        """Whether ``output`` goes back as binary tensor data."""
        return self.binary_all or output in self.binary_outputs


def _flag(params: dict[str, Any], key: str, what: str) -> bool:
    value = params.get(key, False)
    if not isinstance(value, bool):
        raise InferenceInputError(f"{what}parameters.{key} must be true or false")
    return value


def _requested(doc: dict[str, Any], binary: bool) -> tuple[tuple[str, ...] | None, set[str]]:
    """The request's ``outputs`` (names asked for) and those asked for as binary data."""
    raw = doc.get("outputs")
    if raw is None:
        return None, set()
    if not isinstance(raw, list) or len(raw) > MAX_RANK * 32:
        raise InferenceInputError("outputs must be a list of objects with a name")
    names: list[str] = []
    wanted_binary: set[str] = set()
    for i, o in enumerate(raw):
        name = o.get("name") if isinstance(o, dict) else None
        if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME:
            raise InferenceInputError(f"outputs[{i}].name must be a non-empty string")
        if name in names:
            raise InferenceInputError(f"output {name!r} is asked for twice")
        names.append(name)
        if _flag(_parameters(o, f"outputs[{i}]"), "binary_data", f"outputs[{i}]."):
            wanted_binary.add(name)
    return tuple(names), wanted_binary


def parse_request(
    body: bytes | bytearray | memoryview,
    *,
    max_elements: int,
    cooperative: bool = False,
    header_length: int | None = None,
) -> InferRequest:
    """An infer request's named arrays, id and answer options; raises InferenceInputError
    (400) or InferenceLimitError (413, over ``max_elements`` values in all inputs together).

    ``header_length``: the body uses the binary tensor extension, its first
    ``header_length`` bytes are the JSON (checked against the body by the caller:
    ``binary.header_length``) and the rest the binary inputs, which become views of ``body``.
    """
    view = memoryview(body)
    binary = header_length is not None
    doc = decode(view[:header_length] if binary else body, cooperative=cooperative)
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list) or not doc["inputs"]:
        raise InferenceInputError("request must be an object with a non-empty 'inputs' list")
    if isinstance(doc.get("id"), str) and len(doc["id"]) > MAX_NAME:
        raise InferenceInputError(f"id is longer than {MAX_NAME} characters")
    inputs = [_input(i, t, binary) for i, t in enumerate(doc["inputs"])]
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
    params = _parameters(doc, "request")
    binary_all = _flag(params, "binary_data_output", "")
    outputs, binary_outputs = _requested(doc, binary)
    sections = iter(
        bin_ext.take_sections(
            view[header_length:] if binary else memoryview(b""),
            [(inp.name, inp.binary_size) for inp in inputs if inp.binary_size is not None],
        )
    )
    piece = PIECE_ELEMENTS if cooperative else None
    feeds = {}
    for inp in inputs:
        if inp.binary_size is not None:
            raw = next(sections)
            feeds[inp.name] = (
                bin_ext.bytes_tensor(inp.name, inp.shape, inp.count, raw)
                if inp.datatype == "BYTES"
                else bin_ext.fixed_tensor(inp.name, inp.dtype, inp.shape, inp.count, raw)
            )
        elif inp.datatype == "BYTES":
            feeds[inp.name] = _bytes_array(inp)
        else:
            feeds[inp.name] = _array(inp, piece)
    request_id = doc.get("id") if isinstance(doc.get("id"), str) else None
    return InferRequest(feeds, request_id, outputs, frozenset(binary_outputs), binary_all)


def check_outputs(request: InferRequest, model_outputs: Iterable[str]) -> None:
    """Raise InferenceInputError naming an output asked for that the model does not have."""
    known = set(model_outputs)
    for name in request.outputs or ():
        if name not in known:
            raise InferenceInputError(
                f"output {name!r} is not an output of the model; it has {', '.join(sorted(known))}"
            )


def select(outputs: Mapping[str, np.ndarray], request: InferRequest) -> dict[str, np.ndarray]:
    """The outputs the request asked for, in its order (all when it named none)."""
    if request.outputs is None:
        return dict(outputs)
    return {n: outputs[n] for n in request.outputs if n in outputs}


def check_answer(
    outputs: Mapping[str, np.ndarray],
    *,
    max_elements: int,
    request: InferRequest | None = None,
) -> int:
    """The answer's value count; raises InferenceLimitError over ``max_elements``, and
    NonFiniteOutput for an output to go as JSON that JSON cannot carry (NaN or Infinity,
    BYTES that are not UTF-8). Binary outputs carry anything."""
    total = sum(int(a.size) for a in outputs.values())
    if total > max_elements:
        raise InferenceLimitError(
            f"the answer would hold {total} values, over the limit max_response_elements "
            f"{max_elements}"
        )
    for name, arr in outputs.items():
        if request is not None and request.is_binary(name):
            continue
        if arr.dtype.kind in "fc" and not np.isfinite(arr).all():
            raise NonFiniteOutput(f"output {name!r} holds NaN or Infinity, which JSON cannot carry")
        if arr.dtype.kind in "OS":
            try:
                _texts(arr)
            except (UnicodeDecodeError, TypeError):
                raise NonFiniteOutput(
                    f"output {name!r} holds bytes that are not UTF-8 text, which JSON cannot "
                    "carry; ask for it as binary data"
                ) from None
    return total


def _texts(arr: np.ndarray) -> list[str]:
    return [v if isinstance(v, str) else bytes(v).decode("utf-8") for v in arr.reshape(-1)]


def _json_data(arr: np.ndarray) -> Any:
    if arr.dtype.kind in "OSU":
        return _texts(arr)
    return np.ascontiguousarray(arr).reshape(-1)


def encode_answer(
    head: Mapping[str, Any], outputs: Mapping[str, np.ndarray], request: InferRequest
) -> tuple[list[bytes | memoryview], int | None]:
    """The answer's body in pieces, and the length of its JSON header when some outputs go as
    binary tensor data (None: the body is plain JSON). ``check_answer`` first."""
    described = []
    raw: list[bytes | memoryview] = []
    for name, arr in outputs.items():
        if request.is_binary(name):
            data = bin_ext.tensor_bytes(arr)
            raw.append(data)
            described.append({**_head(name, arr), "parameters": {"binary_data_size": len(data)}})
        else:
            described.append({**_head(name, arr), "data": _json_data(arr)})
    header = orjson.dumps({**head, "outputs": described}, option=orjson.OPT_SERIALIZE_NUMPY)
    return [header, *raw], (len(header) if raw else None)


def _head(name: str, arr: np.ndarray) -> dict[str, Any]:
    return {"name": name, "datatype": DATATYPE_OF.get(arr.dtype, "BYTES"), "shape": list(arr.shape)}


def answer_document(head: Mapping[str, Any], outputs: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """A small answer as one JSON-ready object (``check_answer`` first)."""
    return {
        **head,
        "outputs": [
            {**_head(n, a), "data": _texts(a) if a.dtype.kind in "OSU" else a.reshape(-1).tolist()}
            for n, a in outputs.items()
        ],
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
        texts = arr.dtype.kind in "OSU"
        for at in range(0, flat.size, piece):
            part = flat[at : at + piece]
            text = json.dumps(_texts(part) if texts else part.tolist(), allow_nan=False)[1:-1]
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
