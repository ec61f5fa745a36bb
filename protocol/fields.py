"""Strict JSON, and small typed readers for JSON objects that raise InvalidMessage naming a field.

Everything an agent or operator sends passes through here first, so the limits live here:

* JSON is RFC 8259 and nothing more: ``NaN``/``Infinity`` are refused, a number must fit a
  float (``1e999`` is not infinity) and an integer must fit signed 64 bits, strings hold no lone
  surrogates, bytes are UTF-8, and nesting stops at ``MAX_JSON_DEPTH``.
* Strings read with ``get_str`` are identifiers by default: no C0 or C1 control character and
  no DEL, so a name cannot forge a log line or hide in a table. Free text (``text=True``: reasons,
  errors) may keep newlines and tabs, nothing else.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from typing import Any

from protocol.exceptions import InvalidMessage

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
MAX_JSON_DEPTH = 32
# Longest decimal text of a 64-bit integer ("-9223372036854775808"); longer is refused before
# int() runs, which also keeps clear of Python's 4300-digit conversion limit.
_MAX_INT_DIGITS = 20
# C0 controls, DEL and C1 controls; and lone surrogates, which no encoder will write.
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
# The same, less newline and tab: what free text may hold.
_TEXT_CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")
_SURROGATE_RE = re.compile(r"[\ud800-\udfff]")


class _Refused:
    """A JSON token the decoder hooks refused; the walk after decoding reports it with its path."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _parse_int(text: str) -> int | _Refused:
    if len(text) > _MAX_INT_DIGITS:
        return _Refused("is an integer outside signed 64 bits")
    value = int(text)
    if not INT64_MIN <= value <= INT64_MAX:
        return _Refused("is an integer outside signed 64 bits")
    return value


def _parse_float(text: str) -> float | _Refused:
    value = float(text)
    if not math.isfinite(value):
        return _Refused("is a number too large for a float")
    return value


def _parse_constant(text: str) -> _Refused:
    return _Refused(f"is {text}, which JSON does not allow")


_DECODER = json.JSONDecoder(
    parse_int=_parse_int, parse_float=_parse_float, parse_constant=_parse_constant
)


_STEP_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _render(path: tuple | None) -> str:
    """``facts.gpus[1].name``; a key that is not a short plain word is quoted and cut short."""
    steps: list[str | int] = []
    while path is not None:
        path, step = path
        steps.append(step)
    out = ""
    for step in reversed(steps):
        if isinstance(step, int):
            out += f"[{step}]"
        elif _STEP_RE.fullmatch(step):
            out += f".{step}" if out else step
        else:
            out += f"[{step[:40]!a}]"
    return out


def check_json(doc: object, what: str, *, max_depth: int = MAX_JSON_DEPTH) -> None:
    """Check a decoded value is strict JSON; raises InvalidMessage naming the path.

    Refused: non-finite numbers, integers outside 64 bits, lone surrogates, nesting deeper than
    ``max_depth``. For values that did not come through ``loads_strict`` (built in code, or
    decoded elsewhere), so that they can be written back out with ``allow_nan=False``.
    """
    # Iterative, with the path as a linked (parent, step) pair built only as far as needed.
    stack: list[tuple[object, int, tuple | None]] = [(doc, 0, None)]
    while stack:
        value, depth, path = stack.pop()
        if isinstance(value, str):
            if _SURROGATE_RE.search(value):
                _refuse(what, path, "holds a lone surrogate")
        elif isinstance(value, _Refused):
            _refuse(what, path, value.reason)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            if not is_finite_number(value):
                _refuse(what, path, "is not a finite number within 64 bits")
        elif isinstance(value, dict | list):
            if depth >= max_depth:
                _refuse(what, path, f"nests deeper than {max_depth} levels")
            if isinstance(value, dict):
                for k, v in value.items():
                    if not isinstance(k, str) or _SURROGATE_RE.search(k):
                        _refuse(what, path, "has a key that is not a valid string")
                    stack.append((v, depth + 1, (path, k)))
            else:
                stack.extend((v, depth + 1, (path, i)) for i, v in enumerate(value))
        elif value is not None and not isinstance(value, bool):
            _refuse(what, path, "is not a JSON value")


def _refuse(what: str, path: tuple | None, reason: str) -> None:
    field = _render(path) or None
    where = f"{what}: {field}" if field else what
    raise InvalidMessage(f"{where} {reason}", field)


def loads_strict(
    data: bytes | str,
    what: str,
    *,
    max_bytes: int = 16 * 1024 * 1024,
    max_depth: int = MAX_JSON_DEPTH,
) -> Any:
    """Decode strict JSON (any value); raises InvalidMessage naming the path of what it refuses."""
    if len(data) > max_bytes:
        raise InvalidMessage(f"{what} is larger than {max_bytes} bytes")
    if isinstance(data, bytes | bytearray):
        try:
            data = bytes(data).decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidMessage(f"{what} is not UTF-8") from None
    try:
        doc = _DECODER.decode(data)
    except RecursionError:
        raise InvalidMessage(f"{what} nests deeper than {max_depth} levels") from None
    except ValueError as exc:
        raise InvalidMessage(f"{what} is not valid JSON: {exc}") from None
    check_json(doc, what, max_depth=max_depth)
    return doc


def load_json_object(data: bytes | str, what: str, max_bytes: int = 16 * 1024 * 1024) -> dict:
    """Decode strict JSON that must be an object; raises InvalidMessage when it is not."""
    return require_object(loads_strict(data, what, max_bytes=max_bytes), what)


def require_object(doc: object, field: str) -> dict[str, Any]:
    """Return ``doc`` if it is a JSON object; raises InvalidMessage otherwise."""
    if not isinstance(doc, dict):
        raise InvalidMessage(f"{field} must be a JSON object", field)
    return doc


def has_control(value: str, *, text: bool = False) -> bool:
    """Whether ``value`` holds a control character or lone surrogate (``text``: newline, tab
    allowed)."""
    return bool((_TEXT_CONTROL_RE if text else _CONTROL_RE).search(value))


def check_plain(value: str, field: str, *, text: bool = False) -> str:
    """Return ``value`` if free of control characters; raises InvalidMessage naming the field."""
    if has_control(value, text=text):
        allowed = " (other than newline and tab)" if text else ""
        raise InvalidMessage(
            f"{field} holds a control character{allowed} or a lone surrogate", field
        )
    return value


def clean_text(value: str, max_len: int) -> str:
    """Free text made sendable: control characters (bar newline, tab) replaced, length capped."""
    value = _TEXT_CONTROL_RE.sub("\ufffd", value)
    return value if len(value) <= max_len else value[: max_len - 1] + "\u2026"


def get_str(
    doc: dict,
    key: str,
    prefix: str = "",
    *,
    optional: bool = False,
    max_len: int = 1024,
    text: bool = False,
) -> str | None:
    """Read a non-empty string field free of control characters (``text``: newline, tab allowed).

    Raises InvalidMessage when absent (unless optional) or wrong.
    """
    field = f"{prefix}{key}"
    value = doc.get(key)
    if value is None:
        if optional:
            return None
        raise InvalidMessage(f"{field} is required", field)
    if not isinstance(value, str) or not value:
        raise InvalidMessage(f"{field} must be a non-empty string", field)
    if len(value) > max_len:
        raise InvalidMessage(f"{field} is longer than {max_len} characters", field)
    return check_plain(value, field, text=text)


def req_str(doc: dict, key: str, prefix: str = "", max_len: int = 1024) -> str:
    """Read a required string field free of control characters; raises InvalidMessage."""
    value = get_str(doc, key, prefix, max_len=max_len)
    assert value is not None
    return value


def get_int(
    doc: dict,
    key: str,
    prefix: str = "",
    *,
    default: int | None = None,
    minimum: int = 0,
    maximum: int = INT64_MAX,
) -> int:
    """Read an integer field (bools refused) in [minimum, maximum]; raises InvalidMessage."""
    field = f"{prefix}{key}"
    value = doc.get(key, default)
    if value is None:
        raise InvalidMessage(f"{field} is required", field)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidMessage(f"{field} must be an integer", field)
    if value < minimum:
        raise InvalidMessage(f"{field} must be >= {minimum}", field)
    if value > maximum:
        raise InvalidMessage(f"{field} must be <= {maximum}", field)
    return value


def is_finite_number(value: object) -> bool:
    """A JSON number (not a bool) that a float holds finitely."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        # math.isfinite raises OverflowError for an int too large for a float.
        return INT64_MIN <= value <= INT64_MAX
    return isinstance(value, float) and math.isfinite(value)


def get_number(
    doc: dict,
    key: str,
    prefix: str = "",
    *,
    default: float | None = None,
    minimum: float = 0.0,
    maximum: float = math.inf,
) -> float:
    """Read a finite number in [minimum, maximum]; raises InvalidMessage when absent or wrong."""
    field = f"{prefix}{key}"
    value = doc.get(key, default)
    if value is None:
        raise InvalidMessage(f"{field} is required", field)
    if not is_finite_number(value):
        raise InvalidMessage(f"{field} must be a finite number", field)
    if value < minimum:
        raise InvalidMessage(f"{field} must be >= {minimum}", field)
    if value > maximum:
        raise InvalidMessage(f"{field} must be <= {maximum}", field)
    return float(value)


def get_list(doc: dict, key: str, prefix: str = "", *, optional: bool = False) -> list:
    """Read a list field; raises InvalidMessage when absent (unless optional) or wrong."""
    field = f"{prefix}{key}"
    value = doc.get(key)
    if value is None and optional:
        return []
    if not isinstance(value, list):
        raise InvalidMessage(f"{field} must be a list", field)
    return value


def get_str_map(doc: dict, key: str, prefix: str = "") -> dict[str, str]:
    """Read an optional object of string to string (labels and the like)."""
    field = f"{prefix}{key}"
    value = doc.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise InvalidMessage(f"{field} must be an object of strings", field)
    return dict(value)


def extra_fields(doc: dict, known: Iterable[str]) -> dict[str, Any]:
    """Fields a reader does not know: kept so a newer peer's additions survive a round trip."""
    known_set = set(known)
    return {k: v for k, v in doc.items() if k not in known_set}
