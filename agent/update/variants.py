"""Which of a bundle's model variants this machine runs, and with which providers. Pure."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from agent.exceptions import UpdateError
from protocol.manifest import FileEntry, Manifest

CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"


def unmet(requires: Mapping[str, Any], facts: Mapping[str, Any]) -> list[str]:
    """The requirements these facts do not meet; an unknown requirement is never met."""
    missing = []
    for key, want in requires.items():
        if key == "accelerator":
            ok = want in (facts.get("accelerators") or [])
        elif key == "arch":
            ok = facts.get("arch") == want
        elif key == "os":
            ok = facts.get("os") == want
        elif key == "minMemoryBytes":
            ok = isinstance(want, int) and (facts.get("memoryBytes") or 0) >= want
        else:
            ok = False
        if not ok:
            missing.append(f"{key}={want}")
    return missing


def choose_variant(manifest: Manifest, facts: Mapping[str, Any]) -> FileEntry:
    """The first model file, in the manifest's order of preference, that these facts support.

    Raises UpdateError naming what each variant lacks when none fits.
    """
    reasons = []
    for f in manifest.model_files():
        missing = unmet(f.requires, facts)
        if not missing:
            return f
        reasons.append(f"{f.variant or f.path} needs {', '.join(missing)}")
    raise UpdateError("no model variant fits this machine: " + "; ".join(reasons))


def providers_for(entry: FileEntry, facts: Mapping[str, Any], allow_cuda: bool) -> list[str]:
    """ONNX Runtime providers for a variant: CUDA first when present and allowed."""
    if allow_cuda and "cuda" in (facts.get("accelerators") or []):
        return [CUDA_PROVIDER, CPU_PROVIDER]
    return [CPU_PROVIDER]
