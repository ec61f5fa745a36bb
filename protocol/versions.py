"""Ordering of version strings, for rollback protection.

``1.10.0`` sorts after ``1.9.0``; numeric parts compare as numbers, other parts as text, and a
release sorts after its pre-releases (``2.0.0`` > ``2.0.0-rc1``). Build metadata after ``+`` is
ignored, as in SemVer.
"""

from __future__ import annotations

import re

_PART = re.compile(r"\d+|[A-Za-z]+")


def _parts(text: str) -> tuple[tuple[int, int | str], ...]:
    return tuple((1, int(p)) if p.isdigit() else (0, p) for p in _PART.findall(text))


def version_key(version: str) -> tuple[object, ...]:
    """A sort key for ``version``: (core parts, release flag, pre-release parts)."""
    core, _, pre = version.split("+", 1)[0].partition("-")
    # A release outranks any pre-release of the same core.
    return (_parts(core), 0 if pre else 1, _parts(pre))


def compare_versions(a: str, b: str) -> int:
    """-1, 0 or 1 as ``a`` sorts before, with, or after ``b``."""
    ka, kb = version_key(a), version_key(b)
    return (ka > kb) - (ka < kb)
