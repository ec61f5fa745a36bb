"""Typed configuration of the agent; only the command line reads env and files."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class AgentConfig:
    """Everything the agent daemon needs, with named defaults."""

    state_dir: Path
    serve_host: str = "127.0.0.1"
    serve_port: int = 8510
    trusted_publisher_files: tuple[Path, ...] = ()
    heartbeat_s: float = 15.0
    poll_wait_s: float = 30.0
    metrics_interval_s: float = 10.0
    max_pending_batches: int = 10_000
    inference_threads: int = max(2, os.cpu_count() or 2)
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    drain_s: float = 10.0
