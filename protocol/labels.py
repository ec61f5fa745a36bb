"""Agent labels (``site=onprem,hw=cpu``) and label selectors over them.

Selectors follow Kubernetes' set-based syntax: ``k=v`` (or ``k==v``), ``k!=v``,
``k in (a,b)``, ``k notin (a,b)``, ``k`` (the label exists) and ``!k`` (it does not), joined by
commas; every requirement must hold. An empty selector matches every agent.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from protocol.exceptions import InvalidMessage

# Used with fullmatch: "$" alone would let a trailing newline through.
_KEY_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._/-]{0,62})")
_VALUE_RE = re.compile(r"[A-Za-z0-9._-]{0,63}")
OPS = ("=", "!=", "in", "notin", "exists", "!exists")
# Labels of one agent, token or selector: an agent asks for its own at enrollment, so without
# a cap one body's worth of them would be stored, listed and matched on every pass.
MAX_LABELS = 64


def check_labels(labels: Mapping[str, str], field: str = "labels") -> dict[str, str]:
    """Return labels if every key and value is well formed; raises InvalidMessage otherwise."""
    if len(labels) > MAX_LABELS:
        raise InvalidMessage(f"{field}: more than {MAX_LABELS} labels", field)
    for k, v in labels.items():
        if not isinstance(k, str) or not _KEY_RE.fullmatch(k):
            raise InvalidMessage(f"{field}: label key {_shown(k)} is not valid", field)
        if not isinstance(v, str) or not _VALUE_RE.fullmatch(v):
            raise InvalidMessage(
                f"{field}: label value {_shown(v)} for {k!r} is not valid", f"{field}.{k}"
            )
    return dict(labels)


def _shown(value: object) -> str:
    """A refused value as an error message quotes it: escaped and cut short."""
    text = ascii(value)
    return text if len(text) <= 80 else text[:77] + "..."


def parse_labels(text: str, field: str = "labels") -> dict[str, str]:
    """Parse ``k=v,k2=v2``; raises InvalidMessage naming the bad pair."""
    labels: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep:
            raise InvalidMessage(f"{field}: {part!r} is not key=value", field)
        labels[key.strip()] = value.strip()
    return check_labels(labels, field)


@dataclass(frozen=True)
class Requirement:
    """One requirement of a selector."""

    key: str
    op: str
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        """Whether these labels meet it."""
        value = labels.get(self.key)
        if self.op == "=":
            return value == self.values[0]
        if self.op == "!=":
            return value != self.values[0]
        if self.op == "in":
            return value in self.values
        if self.op == "notin":
            return value not in self.values
        if self.op == "exists":
            return value is not None
        return value is None  # "!exists"

    def __str__(self) -> str:
        if self.op in ("=", "!="):
            return f"{self.key}{self.op}{self.values[0]}"
        if self.op in ("in", "notin"):
            return f"{self.key} {self.op} ({','.join(self.values)})"
        return self.key if self.op == "exists" else f"!{self.key}"


@dataclass(frozen=True)
class Selector:
    """A conjunction of requirements."""

    requirements: tuple[Requirement, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        """Whether an agent with these labels is selected."""
        return all(r.matches(labels) for r in self.requirements)

    def keys_with_values(self, key: str) -> tuple[str, ...] | None:
        """The values a selector allows for ``key`` when it pins them (``=`` or ``in``)."""
        for r in self.requirements:
            if r.key == key and r.op in ("=", "in"):
                return r.values
        return None

    def to_json(self) -> list[dict[str, object]]:
        """JSON form: a list of {key, op, values}."""
        return [{"key": r.key, "op": r.op, "values": list(r.values)} for r in self.requirements]

    def __str__(self) -> str:
        return ",".join(str(r) for r in self.requirements)


def _split_terms(text: str) -> list[str]:
    terms, depth, current = [], 0, []
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            terms.append("".join(current))
            current = []
        else:
            current.append(ch)
    terms.append("".join(current))
    return [t.strip() for t in terms if t.strip()]


_SET_RE = re.compile(r"^(\S+)\s+(in|notin)\s*\((.*)\)$")


def _value(v: str, term: str) -> str:
    if not _VALUE_RE.fullmatch(v):
        raise InvalidMessage(
            f"selector: value {_shown(v)} in {_shown(term)} is not valid", "selector"
        )
    return v


def _key(k: str, term: str) -> str:
    if not _KEY_RE.fullmatch(k):
        raise InvalidMessage(
            f"selector: key {_shown(k)} in {_shown(term)} is not valid", "selector"
        )
    return k


def parse_selector(text: str) -> Selector:
    """Parse a selector; raises InvalidMessage naming the bad term."""
    reqs = []
    for term in _split_terms(text):
        if m := _SET_RE.match(term):
            values = tuple(_value(v.strip(), term) for v in m.group(3).split(",") if v.strip())
            if not values:
                raise InvalidMessage(f"selector: {term!r} lists no values", "selector")
            reqs.append(Requirement(_key(m.group(1), term), m.group(2), values))
        elif "!=" in term:
            k, v = term.split("!=", 1)
            reqs.append(Requirement(_key(k.strip(), term), "!=", (_value(v.strip(), term),)))
        elif "=" in term:
            k, v = term.replace("==", "=", 1).split("=", 1)
            reqs.append(Requirement(_key(k.strip(), term), "=", (_value(v.strip(), term),)))
        elif term.startswith("!"):
            reqs.append(Requirement(_key(term[1:].strip(), term), "!exists"))
        elif " " not in term:
            reqs.append(Requirement(_key(term, term), "exists"))
        else:
            raise InvalidMessage(f"selector: {term!r} is not a requirement", "selector")
    return Selector(tuple(reqs))


def selector_from_json(doc: object) -> Selector:
    """Read a stored selector: the list form, or the older ``{key: value}`` form."""
    if isinstance(doc, dict):
        return Selector(tuple(Requirement(k, "=", (v,)) for k, v in sorted(doc.items())))
    if not isinstance(doc, list):
        raise InvalidMessage("selector must be a list of requirements", "selector")
    reqs = []
    for r in doc:
        if not isinstance(r, dict) or r.get("op") not in OPS or not isinstance(r.get("key"), str):
            raise InvalidMessage("selector requirement is malformed", "selector")
        reqs.append(Requirement(r["key"], r["op"], tuple(str(v) for v in r.get("values", []))))
    return Selector(tuple(reqs))


def matches(selector: Selector | Mapping[str, str], labels: Mapping[str, str]) -> bool:
    """Whether the labels satisfy the selector (a Selector, or a map of required values)."""
    if isinstance(selector, Selector):
        return selector.matches(labels)
    return all(labels.get(k) == v for k, v in selector.items())
