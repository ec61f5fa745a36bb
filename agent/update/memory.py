"""The memory plan (pure): whether a version can be loaded beside those loaded already.

A version's weights are its model file and its external data; loading them takes about that much
memory, once. Beside the versions held now (live, on probation, shadows), a new one must fit
``limit`` (the memory the operator gives the agent's models, or a small host simulated by the
``memory_limit_mb`` setting) and what the kernel says is available, or it is refused with the
figures, instead of the agent being killed halfway through the load.
"""

from __future__ import annotations

from collections.abc import Iterable

from protocol.manifest import FileEntry, Manifest


def weight_bytes(manifest: Manifest, model: FileEntry) -> int:
    """Bytes a runtime loads for ``model``: the model file and its external data."""
    return sum(f.size for f in manifest.files_for(model) if f.role in ("model", "external-data"))


def memory_refusal(
    *, what: str, needed: int, loaded: Iterable[int], limit: int | None, available: int | None
) -> str | None:
    """Why ``what``, needing ``needed`` bytes, cannot be loaded beside versions taking
    ``loaded`` bytes each; None when it can. ``available`` is the host's available memory
    (None: unknown), which already counts what is loaded."""
    held = sum(loaded)
    if limit is not None and held + needed > limit:
        return (
            f"not enough memory to load {what}: it needs ~{human(needed)} beside the "
            f"{human(held)} loaded now, over the {human(limit)} memory limit"
        )
    if available is not None and needed > available:
        return (
            f"not enough memory to load {what}: it needs ~{human(needed)} and the host "
            f"has {human(available)} available"
        )
    return None


def human(n: int) -> str:
    """Bytes for a person: ``512 B``, ``300.0 KiB``, ``2.9 GiB``."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def parse_meminfo(text: str) -> int | None:
    """MemAvailable from /proc/meminfo's text, in bytes; None when absent."""
    for line in text.splitlines():
        if line.startswith("MemAvailable:"):
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                return int(parts[1]) * 1024
    return None
