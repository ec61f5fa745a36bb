"""Fixtures shared by the integration test modules."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support.broker import Broker
from tests.support.containers import ContainerBroker, broker_source, service_images


@pytest.fixture
async def broker(tmp_path: Path) -> AsyncIterator[Broker]:
    """A mosquitto of the test's own (password file, ACL) with a topic prefix of its own: a
    process, or a container when tests/support/containers.py's rule says so."""
    root, prefix = tmp_path / "broker", f"test-{uuid.uuid4().hex[:8]}/v1"
    if broker_source() == "local":
        b = Broker(root, prefix)
        await b.start()
        try:
            yield b
        finally:
            b.stop()
        return
    c = ContainerBroker(root, prefix, image=service_images().mosquitto)
    try:
        await c.start()
        yield c
    finally:
        c.remove()
