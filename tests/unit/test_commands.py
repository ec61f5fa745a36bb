"""Operator commands: signed by the control plane, for one agent, expiring, carried out once."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from protocol.commands import Command, accept_command
from protocol.desired import DesiredState
from protocol.dsse import generate_private_key, keyring
from protocol.exceptions import InvalidMessage, ReplayError, SignatureError

NOW = datetime(2026, 12, 1, 4, 0, tzinfo=UTC)
KEY = generate_private_key()
KEYS = keyring([KEY.public_key()])


def command(**kw: object) -> Command:
    base = Command(
        agent_id="agent-1",
        command_id="c1",
        kind="logs",
        issued_at=NOW,
        expires_at=NOW + timedelta(minutes=5),
        since_s=600,
        max_bytes=65536,
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def test_a_good_command_is_accepted_with_unknown_fields_kept() -> None:
    cmd = command(extra={"future": 1})
    got = accept_command(cmd.sign(KEY).to_bytes(), KEYS, "agent-1", NOW + timedelta(seconds=1))
    assert got == cmd and got.extra == {"future": 1}


def test_refusals() -> None:
    good = command().sign(KEY).to_bytes()
    with pytest.raises(InvalidMessage, match="not 'agent-2'"):
        accept_command(good, KEYS, "agent-2", NOW)
    with pytest.raises(ReplayError, match="expired"):
        accept_command(good, KEYS, "agent-1", NOW + timedelta(minutes=5))
    with pytest.raises(ReplayError, match="already carried out"):
        accept_command(good, KEYS, "agent-1", NOW, seen={"c1"})
    with pytest.raises(ReplayError, match="future"):
        accept_command(good, KEYS, "agent-1", NOW - timedelta(minutes=6))
    other = generate_private_key()
    with pytest.raises(SignatureError):
        accept_command(command().sign(other).to_bytes(), KEYS, "agent-1", NOW)
    # A signed desired state is not a command, whatever it holds.
    desired = DesiredState("agent-1", 1, NOW, NOW + timedelta(days=1), ())
    with pytest.raises(SignatureError, match="payload type"):
        accept_command(desired.sign(KEY).to_bytes(), KEYS, "agent-1", NOW)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"kind": "shell"}, "kind"),
        ({"expires_at": NOW + timedelta(hours=1)}, "expiresAt"),
        ({"expires_at": NOW}, "expiresAt"),
        ({"since_s": 0}, "sinceSeconds"),
        ({"max_bytes": 10}, "maxBytes"),
        ({"max_bytes": 10**9}, "maxBytes"),
    ],
)
def test_malformed_commands_name_the_field(change: dict, field: str) -> None:
    with pytest.raises(InvalidMessage) as exc:
        accept_command(command(**change).sign(KEY).to_bytes(), KEYS, "agent-1", NOW)
    assert exc.value.field == field
