"""agent/sync.py, the desired-state sync part, driven with small fakes of its neighbours.

What it decides on its own: which documents it adopts (and which it reports as refused without
touching the updater), when it asks the key ring for a newer key set, how imported versions
merge with the control plane's list, and that a failed poll is reported and later cleared.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.config import AgentConfig
from agent.exceptions import TransportError
from agent.sync import POLL_FAILED, DesiredSync
from protocol.desired import DesiredModel, DesiredState
from protocol.dsse import generate_private_key, keyring

IRIS = DesiredModel("iris", "1.0.0", "sha256:" + "a" * 64)
OLD_KEY = generate_private_key()
NEW_KEY = generate_private_key()


def signed(gen: int, key: Ed25519PrivateKey = OLD_KEY, agent: str = "a1") -> bytes:
    now = datetime.now(UTC)
    return DesiredState(agent, gen, now, now + timedelta(days=1), (IRIS,)).sign(key).to_bytes()


@dataclass
class _State:
    highest_generation: int = 0
    desired_envelope: str | None = None


@dataclass
class FakeUpdater:
    state: _State = field(default_factory=_State)
    adopted: list[tuple[tuple[DesiredModel, ...], int]] = field(default_factory=list)
    wanted: list[tuple[DesiredModel, ...]] = field(default_factory=list)

    async def adopt(
        self, models: tuple[DesiredModel, ...], *, generation: int, envelope: bytes
    ) -> None:
        self.adopted.append((models, generation))
        self.state.highest_generation = generation
        self.state.desired_envelope = envelope.decode()

    def want(self, models: tuple[DesiredModel, ...]) -> None:
        self.wanted.append(models)


class FakeKeyRing:
    """Trusts OLD_KEY; a refresh brings NEW_KEY in when ``rotated``."""

    def __init__(self, rotated: bool) -> None:
        self.cp_keys = keyring([OLD_KEY.public_key()])
        self.rotated = rotated
        self.refreshes = 0
        self.looks = 0

    async def refresh(self) -> int:
        self.refreshes += 1
        if not self.rotated:
            return 0
        self.cp_keys = keyring([OLD_KEY.public_key(), NEW_KEY.public_key()])
        return 1

    def look(self) -> None:
        self.looks += 1


class FakeClient:
    """Answers polls from a script: an envelope, None (nothing new) or an exception."""

    def __init__(self, answers: list[Any]) -> None:
        self.answers = answers
        self.polls: list[tuple[int, float]] = []
        self.done = asyncio.Event()

    async def poll_desired(self, after: int, wait_s: float) -> bytes | None:
        self.polls.append((after, wait_s))
        if not self.answers:
            self.done.set()
            await asyncio.Event().wait()  # a long-poll that never answers
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


@dataclass
class Harness:
    sync: DesiredSync
    updater: FakeUpdater
    keys: FakeKeyRing
    errors: list[str | None]
    changes: list[int]


def make(tmp_path: Path, *, client: Any = None, rotated: bool = False) -> Harness:
    updater, keys = FakeUpdater(), FakeKeyRing(rotated)
    errors: list[str | None] = []
    changes: list[int] = []
    sync = DesiredSync(
        config=AgentConfig(state_dir=tmp_path, poll_wait_s=0.01),
        agent_id="a1",
        client=client or FakeClient([]),  # type: ignore[arg-type]
        keyring=keys,  # type: ignore[arg-type]
        mqtt=None,
        updater=updater,  # type: ignore[arg-type]
        note_error=errors.append,
        last_error=lambda: next((e for e in reversed(errors)), None),
        on_polled=lambda: None,
        changed=lambda: changes.append(1),
    )
    return Harness(sync, updater, keys, errors, changes)


async def test_a_good_document_is_adopted_and_reported(tmp_path: Path) -> None:
    h = make(tmp_path)
    assert await h.sync.handle_desired(signed(3), via="mqtt")
    assert h.updater.adopted == [((IRIS,), 3)] and h.sync.adopted_via == "mqtt"
    assert h.errors == [None] and h.changes == [1] and h.keys.looks == 1
    assert h.sync.freshness()["desiredState"] == "current"


@pytest.mark.parametrize(
    ("envelope", "reason"),
    [
        (signed(3, key=generate_private_key()), "signature"),
        (signed(3, agent="a2"), "a2"),
        (b"{not json", "refused desired state"),
    ],
)
async def test_a_refused_document_never_reaches_the_updater(
    tmp_path: Path, envelope: bytes, reason: str
) -> None:
    h = make(tmp_path)
    assert not await h.sync.handle_desired(envelope, via="mqtt")
    assert h.updater.adopted == [] and h.changes == []
    assert h.errors[-1] is not None and h.errors[-1].startswith("refused desired state")
    assert reason in h.errors[-1]


async def test_an_older_generation_is_refused_as_a_replay(tmp_path: Path) -> None:
    h = make(tmp_path)
    assert await h.sync.handle_desired(signed(5), via="mqtt")
    assert not await h.sync.handle_desired(signed(4), via="mqtt")
    assert h.updater.adopted == [((IRIS,), 5)]
    assert h.errors[-1] is not None and "older" in h.errors[-1]


async def test_an_unknown_signer_makes_the_key_ring_look_for_a_newer_key_set(
    tmp_path: Path,
) -> None:
    rotated = make(tmp_path / "r", rotated=True)
    assert await rotated.sync.handle_desired(signed(2, key=NEW_KEY), via="mqtt")
    assert rotated.keys.refreshes == 1 and rotated.updater.adopted == [((IRIS,), 2)]
    stuck = make(tmp_path / "s", rotated=False)
    assert not await stuck.sync.handle_desired(signed(2, key=NEW_KEY), via="mqtt")
    assert stuck.keys.refreshes == 1 and stuck.updater.adopted == []


async def test_imported_versions_fill_in_models_the_control_plane_does_not_name(
    tmp_path: Path,
) -> None:
    h = make(tmp_path)
    h.sync.pins = {
        "iris": {"version": "0.9.0", "manifestDigest": "sha256:" + "b" * 64},
        "mnist": {"version": "2.0.0", "manifestDigest": "sha256:" + "c" * 64},
    }
    assert await h.sync.handle_desired(signed(1), via="mqtt")
    models, _ = h.updater.adopted[-1]
    assert models == (IRIS, DesiredModel("mnist", "2.0.0", "sha256:" + "c" * 64))


async def test_a_failed_poll_is_reported_then_cleared_by_the_next_good_one(
    tmp_path: Path,
) -> None:
    client = FakeClient([TransportError("connection refused"), signed(1)])
    h = make(tmp_path, client=client)
    task = asyncio.create_task(h.sync.run())
    try:
        async with asyncio.timeout(10):
            await client.done.wait()
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert h.errors[0] is not None and h.errors[0].startswith(POLL_FAILED)
    assert h.errors[-1] is None and h.updater.adopted == [((IRIS,), 1)]
    assert h.sync.adopted_via == "http"
    # Each poll asks for what is newer than the highest generation held.
    assert [after for after, _ in client.polls] == [0, 0, 1]
