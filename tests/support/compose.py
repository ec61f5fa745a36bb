"""The product images built from the checkout, and a compose project driven from a test.

The compose command is the Docker CLI's v2 plugin (``docker compose``) when it answers, else
``docker-compose`` (Debian's package, 1.29): both read deploy/compose's files.
"""

from __future__ import annotations

import asyncio
import functools
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.support.containers import ROOT, built_images
from tests.support.services import service_unavailable

BUILD_IMAGES = ROOT / "deploy/images/build-images.sh"


@dataclass(frozen=True)
class ProductImages:
    """The images of the product built from this checkout."""

    control_plane: str
    agent: str


@functools.cache
def product_images() -> ProductImages:
    """Build the control plane and agent images from the checkout's wheel on the local base.

    The layers of the dependencies are cached by docker, so a rebuild only installs the new
    wheel. Skips (fails under CI) when the build fails.
    """
    env = {**os.environ, "BASE": built_images()["base"]}
    p = subprocess.run(
        ["bash", str(BUILD_IMAGES)], capture_output=True, text=True, timeout=1200, env=env
    )
    if p.returncode != 0:
        service_unavailable(f"{BUILD_IMAGES.name} failed ({p.returncode}): {p.stderr[-3000:]}")
    out = dict(line.split("=", 1) for line in p.stdout.split() if "=" in line)
    return ProductImages(control_plane=out["control_plane"], agent=out["agent"])


@functools.cache
def compose_command() -> tuple[str, ...]:
    """The compose command this machine has; skips (fails under CI) when it has none."""
    docker = shutil.which("docker")
    plugin = docker and subprocess.run([docker, "compose", "version"], capture_output=True)
    if plugin and plugin.returncode == 0:
        return (docker, "compose")
    legacy = shutil.which("docker-compose")
    if legacy:
        return (legacy,)
    service_unavailable("neither `docker compose` nor `docker-compose` is installed")
    raise AssertionError("unreachable")  # service_unavailable raises


class Compose:
    """One compose project (its own name, so its containers, network and volumes are its own)."""

    def __init__(self, *, project: str, files: list[Path], env: dict[str, str]) -> None:
        self.project = project
        self.files = files
        self.env = {**os.environ, **env}

    def _argv(self, *args: str) -> list[str]:
        argv = [*compose_command(), "-p", self.project]
        for f in self.files:
            argv += ["-f", str(f)]
        return [*argv, *args]

    async def run(self, *args: str, timeout_s: float = 300, check: bool = True) -> str:
        """Run one compose command; its stdout. Raises AssertionError with stderr on failure."""
        p = await asyncio.to_thread(
            subprocess.run,
            self._argv(*args),
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env=self.env,
        )
        if check and p.returncode != 0:
            raise AssertionError(f"compose {' '.join(args)}: {p.returncode}\n{p.stderr[-3000:]}")
        return p.stdout

    async def container_id(self, service: str) -> str:
        """The id of the service's container."""
        return (await self.run("ps", "-q", service)).strip()
