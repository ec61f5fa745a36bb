"""The agent's trust rules for desired state: signature, addressee, generation, expiry."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from protocol.desired import DesiredModel, DesiredState, accept_desired
from protocol.dsse import generate_private_key, keyring
from protocol.exceptions import InvalidMessage, ReplayError, SignatureError

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
CP = generate_private_key()
KEYS = keyring([CP.public_key()])
M = DesiredModel("iris", "1.0.0", "sha256:" + "a" * 64)


def doc(gen: int, agent: str = "a1", expires: timedelta = timedelta(days=7)) -> bytes:
    return DesiredState(agent, gen, NOW, NOW + expires, (M,)).sign(CP).to_bytes()


def test_newer_generation_is_accepted() -> None:
    ds = accept_desired(doc(5), KEYS, "a1", 4, NOW)
    assert ds is not None and ds.generation == 5 and ds.models == (M,)


def test_same_generation_is_a_no_op() -> None:
    assert accept_desired(doc(5), KEYS, "a1", 5, NOW) is None


def test_older_generation_is_a_replay() -> None:
    with pytest.raises(ReplayError, match="older"):
        accept_desired(doc(3), KEYS, "a1", 5, NOW)


def test_expired_document() -> None:
    with pytest.raises(ReplayError, match="expired"):
        accept_desired(doc(6, expires=timedelta(seconds=1)), KEYS, "a1", 5, NOW + timedelta(1))


def test_document_for_another_agent() -> None:
    with pytest.raises(InvalidMessage, match="for agent"):
        accept_desired(doc(6, agent="a2"), KEYS, "a1", 5, NOW)


def test_forged_signature() -> None:
    forged = DesiredState("a1", 99, NOW, NOW + timedelta(1), (M,)).sign(generate_private_key())
    with pytest.raises(SignatureError):
        accept_desired(forged.to_bytes(), KEYS, "a1", 5, NOW)


def test_unknown_fields_survive() -> None:
    ds = DesiredState("a1", 1, NOW, NOW + timedelta(1), (M,), extra={"future": True})
    got = accept_desired(ds.sign(CP).to_bytes(), KEYS, "a1", 0, NOW)
    assert got is not None and got.to_json()["future"] is True
