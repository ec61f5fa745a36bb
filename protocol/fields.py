"""Small typed readers for JSON objects; each raises InvalidMessage naming the field."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from typing import Any

from protocol.exceptions import InvalidMessage


def load_json_object(data: bytes | str, what: str, max_bytes: int = 16 * 1024 * 1024) -> dict:
    """Decode JSON that must be an object; raises InvalidMessage when it is not."""
    if len(data) > max_bytes:
        raise InvalidMessage(f"{what} is larger than {max_bytes} bytes")
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidMessage(f"{what} is not valid JSON: {exc}") from None
    return require_object(doc, what)


def require_object(doc: object, field: str) -> dict[str, Any]:
    """Return ``doc`` if it is a JSON object; raises InvalidMessage otherwise."""
    if not isinstance(doc, dict):
        raise InvalidMessage(f"{field} must be a JSON object", field)
    return doc


def get_str(
    doc: dict, key: str, prefix: str = "", *, optional: bool = False, max_len: int = 1024
) -> str | None:
    """Read a string field; raises InvalidMessage when absent (unless optional) or wrong."""
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
    return value


def req_str(doc: dict, key: str, prefix: str = "", max_len: int = 1024) -> str:
    """Read a required string field."""
    value = get_str(doc, key, prefix, max_len=max_len)
    assert value is not None
    return value


def get_int(
    doc: dict, key: str, prefix: str = "", *, default: int | None = None, minimum: int = 0
) -> int:
    """Read an integer field (bools refused); raises InvalidMessage when absent or wrong."""
    field = f"{prefix}{key}"
    value = doc.get(key, default)
    if value is None:
        raise InvalidMessage(f"{field} is required", field)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidMessage(f"{field} must be an integer", field)
    if value < minimum:
        raise InvalidMessage(f"{field} must be >= {minimum}", field)
    return value


def get_number(
    doc: dict, key: str, prefix: str = "", *, default: float | None = None, minimum: float = 0.0
) -> float:
    """Read a finite number field; raises InvalidMessage when absent or wrong."""
    field = f"{prefix}{key}"
    value = doc.get(key, default)
    if value is None:
        raise InvalidMessage(f"{field} is required", field)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidMessage(f"{field} must be a finite number", field)
    if value < minimum:
        raise InvalidMessage(f"{field} must be >= {minimum}", field)
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
