"""Agent labels (``site=onprem,hw=cpu``) and equality selectors over them."""

from __future__ import annotations

import re
from collections.abc import Mapping

from protocol.exceptions import InvalidMessage

_KEY_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._/-]{0,62})$")
_VALUE_RE = re.compile(r"^[A-Za-z0-9._-]{0,63}$")


def check_labels(labels: Mapping[str, str], field: str = "labels") -> dict[str, str]:
    """Return labels if every key and value is well formed; raises InvalidMessage otherwise."""
    for k, v in labels.items():
        if not _KEY_RE.match(k):
            raise InvalidMessage(f"{field}: label key {k!r} is not valid", field)
        if not isinstance(v, str) or not _VALUE_RE.match(v):
            raise InvalidMessage(f"{field}: label value {v!r} for {k!r} is not valid", field)
    return dict(labels)


def parse_labels(text: str, field: str = "labels") -> dict[str, str]:
    """Parse ``k=v,k2=v2``; raises InvalidMessage naming the bad pair."""
    labels: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep:
            raise InvalidMessage(f"{field}: {part!r} is not key=value", field)
        labels[key.strip()] = value.strip()
    return check_labels(labels, field)


def parse_selector(text: str) -> dict[str, str]:
    """Parse an equality selector ``k=v,...``; an empty selector matches every agent."""
    return parse_labels(text, "selector")


def matches(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    """Tell whether the labels satisfy every requirement of the selector."""
    return all(labels.get(k) == v for k, v in selector.items())
