"""Facts about this machine, reported at enrollment and in status."""

from __future__ import annotations

import os
import platform
from importlib import metadata
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
    runtimes: dict[str, Any] = {}
    accelerators: list[str] = []
    try:
        import onnxruntime as ort

        providers = ort.get_available_providers()
        runtimes["onnx"] = {"version": ort.__version__, "providers": providers}
        if "CUDAExecutionProvider" in providers:
            accelerators.append("cuda")
    except ImportError:
        pass
    # Looked up, not imported: LiteRT's libraries cost tens of MB of memory, paid only when a
    # TFLite model is loaded.
    for package in ("ai-edge-litert", "tflite-runtime"):
        try:
            runtimes["tflite"] = {"package": package, "version": metadata.version(package)}
            break
        except metadata.PackageNotFoundError:
            continue
    facts["runtimes"] = runtimes
    facts["gpus"] = _nvml_gpus()
    if facts["gpus"] and "cuda" not in accelerators and "onnx" in runtimes:
        facts["cudaProviderMissing"] = True  # a GPU, but onnxruntime-gpu is not installed
    facts["accelerators"] = accelerators
    return facts


def _nvml_gpus() -> list[dict[str, Any]]:
    """GPUs NVML sees (when pynvml and a driver are present), else an empty list."""
    try:
        import pynvml  # type: ignore[import-not-found]
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except Exception:  # NVML raises its own error type when no driver is loaded
        return []
    try:
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h).total
            gpus.append(
                {
                    "name": name.decode() if isinstance(name, bytes) else name,
                    "memoryBytes": int(mem),
                }
            )
        return gpus
    finally:
        pynvml.nvmlShutdown()
