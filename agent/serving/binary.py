"""The KServe v2 binary tensor data extension: raw tensor bytes after the JSON header. No I/O.

A request (or an answer) whose ``Inference-Header-Content-Length`` header is N holds N bytes of
JSON, then the tensors that declare ``parameters.binary_data_size``, back to back in the
order they are listed. Fixed-size datatypes are their elements in little-endian order;
BYTES elements are each a 4-byte little-endian length and that many bytes.

Every length is checked against what is there: a header longer than the body, a
``binary_data_size`` past the end, bytes left over, a size that does not match the shape, a
BYTES element whose length runs past its tensor: each is an ``InferenceInputError`` (400)
naming the field. Arrays are views of the body (no copy) when their bytes are aligned for
their type; ``aligned_offset`` tells a reader where to put a body so that they are.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import numpy as np

from agent.exceptions import InferenceInputError

HEADER = "Inference-Header-Content-Length"
ALIGN = 64  # bytes: the binary section starts here in a buffer laid out by aligned_offset
_LEN = struct.Struct("<I")


def aligned_offset(header_length: int) -> int:
    """Where to start a body in a buffer (aligned itself) so that the binary section after a
    header of ``header_length`` bytes starts on an ``ALIGN`` boundary."""
    return -header_length % ALIGN


def header_length(value: str | None, body_length: int) -> int | None:
    """The ``Inference-Header-Content-Length`` header's value, checked against the body;
    None when absent. Raises InferenceInputError naming the header."""
    if value is None:
        return None
    if not value.isdigit() or len(value) > 19:
        raise InferenceInputError(f"{HEADER} must be a non-negative integer, got {value[:32]!r}")
    n = int(value)
    if n > body_length:
        raise InferenceInputError(f"{HEADER} is {n}, longer than the body of {body_length} bytes")
    return n


def fixed_tensor(
    name: str, dtype: np.dtype, shape: tuple[int, ...], count: int, raw: memoryview
) -> np.ndarray:
    """A fixed-size tensor from its raw bytes (a view when aligned); raises
    InferenceInputError naming the input when the byte count does not match the shape."""
    want = count * dtype.itemsize
    if len(raw) != want:
        raise InferenceInputError(
            f"input {name!r}: parameters.binary_data_size is {len(raw)}, shape {list(shape)} "
            f"of {dtype.name} needs {want} bytes"
        )
    arr = np.frombuffer(raw, dtype=dtype.newbyteorder("<"), count=count)
    if not arr.flags.aligned:
        arr = arr.copy()
    return arr.astype(dtype, copy=False).reshape(shape)


def bytes_tensor(name: str, shape: tuple[int, ...], count: int, raw: memoryview) -> np.ndarray:
    """A BYTES tensor (an object array of ``bytes``) from its length-prefixed elements; raises
    InferenceInputError naming the input when the lengths and the shape disagree."""
    out = np.empty(count, dtype=object)
    at = 0
    for i in range(count):
        if at + 4 > len(raw):
            raise InferenceInputError(
                f"input {name!r}: parameters.binary_data_size of {len(raw)} bytes ends before "
                f"element {i} of {count}"
            )
        (n,) = _LEN.unpack_from(raw, at)
        at += 4
        if at + n > len(raw):
            raise InferenceInputError(
                f"input {name!r}: element {i} is {n} bytes long, past the end of its "
                f"binary_data_size ({len(raw)} bytes)"
            )
        out[i] = bytes(raw[at : at + n])
        at += n
    if at != len(raw):
        raise InferenceInputError(
            f"input {name!r}: parameters.binary_data_size is {len(raw)}, its {count} elements "
            f"take {at} bytes"
        )
    return out.reshape(shape)


def take_sections(binary: memoryview, sizes: Sequence[tuple[str, int]]) -> list[memoryview]:
    """Cut the binary section into each binary input's bytes (``sizes``: (input name,
    binary_data_size) in order); raises InferenceInputError when they do not add up."""
    out = []
    at = 0
    for name, size in sizes:
        if at + size > len(binary):
            raise InferenceInputError(
                f"input {name!r}: parameters.binary_data_size {size} runs past the end of the "
                f"body ({len(binary) - at} bytes left after the {HEADER})"
            )
        out.append(binary[at : at + size])
        at += size
    if at != len(binary):
        raise InferenceInputError(
            f"{HEADER}: {len(binary)} bytes follow the JSON header, the inputs' "
            f"binary_data_size add up to {at}"
        )
    return out


def tensor_bytes(arr: np.ndarray) -> memoryview:
    """An output's raw bytes as the extension lays them out (little-endian; BYTES length
    prefixed); a view of the array when it is already so laid out."""
    if arr.dtype.kind == "O" or arr.dtype.kind in "SU":
        return memoryview(serialize_bytes(arr))
    flat = np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<"), copy=False)
    return memoryview(flat).cast("B")


def serialize_bytes(arr: np.ndarray) -> bytes:
    """A BYTES tensor's elements, each a 4-byte little-endian length and its bytes (``str``
    elements as UTF-8)."""
    parts = []
    for v in arr.reshape(-1):
        b = v.encode("utf-8") if isinstance(v, str) else bytes(v)
        parts += (_LEN.pack(len(b)), b)
    return b"".join(parts)
