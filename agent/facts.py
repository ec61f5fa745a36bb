"""Facts about this machine, reported at enrollment and in status."""

from __future__ import annotations

import os
import platform
from typing import Any


def _memory_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def gather_facts() -> dict[str, Any]:
    """CPU, memory, OS, architecture and the inference runtimes with their providers."""
    facts: dict[str, Any] = {
        "cpuCount": os.cpu_count(),
        "memoryBytes": _memory_bytes(),
        "os": platform.system().lower(),
        "osRelease": platform.release(),
        "arch": platform.machine(),
        "python": platform.python_version(),
        "hostname": platform.node(),
    }
    try:
        import onnxruntime as ort

        providers = ort.get_available_providers()
        facts["runtimes"] = {"onnx": {"version": ort.__version__, "providers": providers}}
        facts["accelerators"] = ["cuda"] if "CUDAExecutionProvider" in providers else []
    except ImportError:
        facts["runtimes"] = {}
        facts["accelerators"] = []
    return facts
