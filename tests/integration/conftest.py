"""Fixtures shared by the integration test modules."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support.broker import Broker


@pytest.fixture
async def broker(tmp_path: Path) -> AsyncIterator[Broker]:
    """A mosquitto of the test's own (password file, ACL) with a topic prefix of its own."""
    b = Broker(tmp_path / "broker", f"test-{uuid.uuid4().hex[:8]}/v1")
    await b.start()
    try:
        yield b
    finally:
        b.stop()
