"""What an agent may declare about its machine: the facts schema, one check for every path.

An agent sends facts at enrollment and in every status report (``agent/host/facts.py`` gathers
them, the daemon adds ``servePort``, enrollment may add ``costPerHour``). The control plane
stores them, lists them and uses a few (cost, hardware), so they are held to a flat, bounded
shape:

* Known keys have fixed types (``KNOWN``). ``runtimes`` maps a runtime name to a small object;
  ``gpus`` and ``serving`` (each model's execution settings) are lists of small objects;
  ``accelerators`` a list of short names.
* Any other key must be a plain name (``[A-Za-z][A-Za-z0-9_.-]{0,63}``) with a flat scalar value:
  a string of at most ``MAX_STRING`` characters free of control characters, a finite number, a
  boolean or null. Nested objects of unknown keys (in a runtime, a GPU) follow the same rule.
* At most ``MAX_KEYS`` keys at the top, and ``MAX_ENCODED_BYTES`` of compact JSON in all.

Every refusal is an InvalidMessage whose field is the path (``facts.gpus[1].name``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from protocol.exceptions import InvalidMessage
from protocol.fields import INT64_MAX, has_control, is_finite_number

MAX_KEYS = 64
MAX_ENCODED_BYTES = 16 * 1024
MAX_STRING = 256
MAX_LIST = 32  # GPUs, accelerators, a runtime's providers
MAX_NESTED_KEYS = 16  # keys of one runtime or one GPU
# An hourly price, at most. Reports multiply it by hours and add it up over agents: a finite
# 1e308 overflowed to infinity there, which strict JSON out cannot write (a 500).
MAX_COST_PER_HOUR = 1e6
_KEY_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,63}")

Check = Callable[[object, str], None]


def _fail(field: str, what: str) -> InvalidMessage:
    return InvalidMessage(f"{field} must be {what}", field)


def _string(value: object, field: str) -> None:
    if value is None:
        return
    if not isinstance(value, str) or len(value) > MAX_STRING or has_control(value):
        raise _fail(field, f"a string of at most {MAX_STRING} characters, no control characters")


def _scalar(value: object, field: str) -> None:
    """A flat scalar: short plain string, finite number, boolean or null."""
    if value is None or isinstance(value, bool) or is_finite_number(value):
        return
    if isinstance(value, str):
        _string(value, field)
        return
    raise _fail(field, "a string, a finite number, true, false or null")


def _count(value: object, field: str) -> None:
    """A non-negative 64-bit integer or null (``os.cpu_count()`` may be None)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= INT64_MAX:
        raise _fail(field, "a non-negative integer within 64 bits, or null")


def _port(value: object, field: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
        raise _fail(field, "a port number (0-65535) or null")


def _flag(value: object, field: str) -> None:
    if value is not None and not isinstance(value, bool):
        raise _fail(field, "true, false or null")


def _cost(value: object, field: str) -> None:
    if value is None:
        return
    if not is_finite_number(value) or not 0 <= value <= MAX_COST_PER_HOUR:  # type: ignore[operator]
        raise _fail(field, f"a number between 0 and {MAX_COST_PER_HOUR:g}")


def _strings(value: object, field: str) -> None:
    """A short list of plain strings."""
    if not isinstance(value, list) or len(value) > MAX_LIST:
        raise _fail(field, f"a list of at most {MAX_LIST} strings")
    for i, item in enumerate(value):
        if item is None:
            raise _fail(f"{field}[{i}]", "a string")
        _string(item, f"{field}[{i}]")


def _object(known: dict[str, Check]) -> Check:
    """A small object: ``known`` keys typed, any other key a flat scalar."""

    def check(value: object, field: str) -> None:
        if not isinstance(value, dict) or len(value) > MAX_NESTED_KEYS:
            raise _fail(field, f"an object of at most {MAX_NESTED_KEYS} keys")
        _keys(value, field, known)

    return check


_RUNTIME = _object({"version": _string, "package": _string, "providers": _strings})
_GPU = _object({"name": _string, "memoryBytes": _count})


_SERVING = _object({"model": _string, "providers": _strings})


def _serving(value: object, field: str) -> None:
    """What each serving model runs with (agent/serving/execution.py): sessions, threads,
    providers, batching, one small object per model."""
    if not isinstance(value, list) or len(value) > MAX_LIST:
        raise _fail(field, f"a list of at most {MAX_LIST} models")
    for i, model in enumerate(value):
        _SERVING(model, f"{field}[{i}]")


def _runtimes(value: object, field: str) -> None:
    if not isinstance(value, dict) or len(value) > MAX_NESTED_KEYS:
        raise _fail(field, f"an object of at most {MAX_NESTED_KEYS} runtimes")
    for name, runtime in value.items():
        sub = _path(field, name)
        _RUNTIME(runtime, sub)


def _gpus(value: object, field: str) -> None:
    if not isinstance(value, list) or len(value) > MAX_LIST:
        raise _fail(field, f"a list of at most {MAX_LIST} GPUs")
    for i, gpu in enumerate(value):
        _GPU(gpu, f"{field}[{i}]")


KNOWN: dict[str, Check] = {
    "cpuCount": _count,
    "memoryBytes": _count,
    "os": _string,
    "osRelease": _string,
    "arch": _string,
    "python": _string,
    "hostname": _string,
    "runtimes": _runtimes,
    "gpus": _gpus,
    "accelerators": _strings,
    "cudaProviderMissing": _flag,
    "costPerHour": _cost,
    "servePort": _port,
    "serving": _serving,
}


def _path(field: str, key: object) -> str:
    """The field of ``key`` under ``field``; raises InvalidMessage when it is not a plain name."""
    if not isinstance(key, str) or not _KEY_RE.fullmatch(key):
        shown = ascii(key)[:40]
        raise InvalidMessage(
            f"{field} has a key {shown} that is not a plain name "
            "(a letter, then up to 63 of letters, digits, '.', '_', '-')",
            field,
        )
    return f"{field}.{key}"


def _keys(doc: dict, field: str, known: dict[str, Check]) -> None:
    for key, value in doc.items():
        sub = _path(field, key)
        known.get(key, _scalar)(value, sub)


def check_facts(value: object, field: str = "facts") -> dict[str, Any]:
    """Return the facts if they meet the schema (absent is ``{}``); raises InvalidMessage."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _fail(field, "an object")
    if len(value) > MAX_KEYS:
        raise InvalidMessage(f"{field} has more than {MAX_KEYS} keys", field)
    _keys(value, field, KNOWN)
    # The pieces are bounded, but a sum of bounded pieces is still a lot of rows x bytes.
    size = len(json.dumps(value, separators=(",", ":"), allow_nan=False).encode())
    if size > MAX_ENCODED_BYTES:
        raise InvalidMessage(f"{field} is {size} bytes of JSON, over {MAX_ENCODED_BYTES}", field)
    return dict(value)


def valid_facts(value: object) -> dict[str, Any]:
    """The keys of stored facts that meet the schema on their own (for rows stored before it)."""
    if not isinstance(value, dict):
        return {}
    kept: dict[str, Any] = {}
    for key, item in list(value.items())[:MAX_KEYS]:
        try:
            kept.update(check_facts({key: item}))
        except InvalidMessage:
            continue
    try:
        return check_facts(kept)
    except InvalidMessage:  # over the size cap in all: none rather than an arbitrary part
        return {}
