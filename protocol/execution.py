"""How a model version asks to be run: dynamic batching, sessions, threads, providers, warm-up.

A manifest may hold an ``execution`` object (all of it optional)::

    "execution": {
        "batching": {"maxBatchSize": 8, "maxQueueDelayMs": 2, "preferredBatchSizes": [4, 8]},
        "instances": 2,            # sessions (ONNX Runtime) or interpreters (LiteRT)
        "intraOpThreads": 1,       # ONNX Runtime's pools per session (0: its default)
        "interOpThreads": 1,
        "providers": ["CUDAExecutionProvider", "CPUExecutionProvider"],
        "warmupRequests": 2,       # run at load, on zeros of the signature's shapes
        "litertThreads": 2         # LiteRT's interpreter threads
    }

An agent's configuration may override any of it per model (agent/settings.py); what the
agent then runs with is decided in agent/serving/execution.py. Pure: values in, values or
InvalidMessage (naming the field) out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields, replace
from typing import Any

from protocol.exceptions import InvalidMessage

MAX_BATCH_SIZE = 4096
MAX_QUEUE_DELAY_MS = 10_000.0
MAX_PREFERRED = 16
MAX_INSTANCES = 64
MAX_THREADS = 256
MAX_WARMUP = 100
MAX_PROVIDERS = 8
_PROVIDER_RE = re.compile(r"^[A-Za-z][A-Za-z0-9]{0,63}ExecutionProvider$")


@dataclass(frozen=True)
class Batching:
    """Dynamic batching: rows per runtime call, how long a request may wait for others,
    and the batch sizes that go at once. ``max_batch_size`` 0 turns batching off (an agent's
    override of a manifest that asks for it)."""

    max_batch_size: int
    max_queue_delay_ms: float = 0.0
    preferred_sizes: tuple[int, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """JSON form."""
        doc: dict[str, Any] = {
            "maxBatchSize": self.max_batch_size,
            "maxQueueDelayMs": self.max_queue_delay_ms,
        }
        if self.preferred_sizes:
            doc["preferredBatchSizes"] = list(self.preferred_sizes)
        return doc


@dataclass(frozen=True)
class Execution:
    """Execution settings; None: not said here (a default, or a lower layer, decides)."""

    batching: Batching | None = None
    instances: int | None = None
    intra_op_threads: int | None = None
    inter_op_threads: int | None = None
    providers: tuple[str, ...] | None = None
    warmup_requests: int | None = None
    litert_threads: int | None = None

    def over(self, lower: Execution) -> Execution:
        """These settings over ``lower``'s: each one said here wins."""
        said = {f.name: getattr(self, f.name) for f in fields(self)}
        return replace(lower, **{k: v for k, v in said.items() if v is not None})

    def to_json(self) -> dict[str, Any]:
        """JSON form (the manifest's names), unsaid settings left out."""
        doc: dict[str, Any] = {}
        if self.batching is not None:
            doc["batching"] = self.batching.to_json()
        for attr, key in _KEYS.items():
            value = getattr(self, attr)
            if value is not None:
                doc[key] = list(value) if isinstance(value, tuple) else value
        return doc


_KEYS = {
    "instances": "instances",
    "intra_op_threads": "intraOpThreads",
    "inter_op_threads": "interOpThreads",
    "providers": "providers",
    "warmup_requests": "warmupRequests",
    "litert_threads": "litertThreads",
}
_LIMITS = {
    "instances": (1, MAX_INSTANCES),
    "intra_op_threads": (0, MAX_THREADS),
    "inter_op_threads": (0, MAX_THREADS),
    "warmup_requests": (0, MAX_WARMUP),
    "litert_threads": (1, MAX_THREADS),
}


def _int(value: object, field: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidMessage(f"{field} must be an integer from {low} to {high}", field)
    return value


def parse_batching(doc: object, field: str, names: dict[str, str] | None = None) -> Batching:
    """A batching object; ``names`` maps the JSON names to others (agent.toml's); raises
    InvalidMessage naming the field."""
    n = names or {
        "max": "maxBatchSize",
        "delay": "maxQueueDelayMs",
        "preferred": "preferredBatchSizes",
    }
    if not isinstance(doc, dict):
        raise InvalidMessage(f"{field} must be an object", field)
    unknown = set(doc) - set(n.values())
    if unknown:
        bad = sorted(unknown)[0]
        raise InvalidMessage(f"{field} does not take {bad!r}", f"{field}.{bad}")
    if n["max"] not in doc:
        raise InvalidMessage(f"{field}.{n['max']} is required", f"{field}.{n['max']}")
    size = _int(doc[n["max"]], f"{field}.{n['max']}", 0, MAX_BATCH_SIZE)
    delay = doc.get(n["delay"], 0)
    if (
        isinstance(delay, bool)
        or not isinstance(delay, int | float)
        or not 0 <= delay <= MAX_QUEUE_DELAY_MS
    ):
        raise InvalidMessage(
            f"{field}.{n['delay']} must be a number from 0 to {MAX_QUEUE_DELAY_MS:g}",
            f"{field}.{n['delay']}",
        )
    preferred = doc.get(n["preferred"], [])
    pfield = f"{field}.{n['preferred']}"
    if not isinstance(preferred, list) or len(preferred) > MAX_PREFERRED:
        raise InvalidMessage(f"{pfield} must be a list of at most {MAX_PREFERRED} sizes", pfield)
    sizes = tuple(_int(p, f"{pfield}[{i}]", 1, max(1, size)) for i, p in enumerate(preferred))
    return Batching(size, float(delay), tuple(sorted(set(sizes))))


def parse_execution(doc: object, field: str = "execution") -> Execution:
    """A manifest's execution object; raises InvalidMessage naming the field."""
    if not isinstance(doc, dict):
        raise InvalidMessage(f"{field} must be an object", field)
    by_key = {key: attr for attr, key in _KEYS.items()}
    unknown = set(doc) - set(by_key) - {"batching"}
    if unknown:
        bad = sorted(unknown)[0]
        raise InvalidMessage(f"{field} does not take {bad!r}", f"{field}.{bad}")
    values: dict[str, Any] = {}
    if doc.get("batching") is not None:
        values["batching"] = parse_batching(doc["batching"], f"{field}.batching")
    for key, attr in by_key.items():
        if doc.get(key) is None:
            continue
        if attr == "providers":
            values[attr] = parse_providers(doc[key], f"{field}.{key}")
        else:
            values[attr] = _int(doc[key], f"{field}.{key}", *_LIMITS[attr])
    return Execution(**values)


def parse_providers(value: object, field: str) -> tuple[str, ...]:
    """ONNX Runtime provider names in order of preference; raises InvalidMessage."""
    if (
        not isinstance(value, list)
        or len(value) > MAX_PROVIDERS
        or not all(isinstance(p, str) and _PROVIDER_RE.fullmatch(p) for p in value)
    ):
        raise InvalidMessage(
            f"{field} must be a list of at most {MAX_PROVIDERS} names like 'CUDAExecutionProvider'",
            field,
        )
    return tuple(dict.fromkeys(value))
