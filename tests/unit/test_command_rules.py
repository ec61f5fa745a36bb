"""The control plane's rules for operator commands: what an operator may ask, what answer an
agent may give (control_plane/fleet/commands.py)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from control_plane.errors import Conflict, Forbidden, NotFound, TooLarge
from control_plane.fleet.commands import CommandRequest, CommandView, check_answer, check_command_id
from protocol.commands import MAX_ANSWER_BYTES
from protocol.exceptions import InvalidMessage

NOW = datetime(2026, 12, 1, 6, 0, tzinfo=UTC)
VIEW = CommandView(
    command_id="c1",
    agent_id="a1",
    state="delivered",
    expires_at=NOW + timedelta(minutes=5),
    max_bytes=4096,
)


def test_an_answer_within_the_rules_passes() -> None:
    check_answer(VIEW, "a1", 4096, NOW)
    check_answer(replace(VIEW, state="pending"), "a1", 0, NOW)  # answered before delivery marked


@pytest.mark.parametrize(
    ("view", "agent", "size", "at", "error", "code"),
    [
        (None, "a1", 10, NOW, NotFound, "unknown_command"),
        (VIEW, "a2", 10, NOW, Forbidden, "not_this_agents"),
        (replace(VIEW, state="answered"), "a1", 10, NOW, Conflict, "already_answered"),
        (replace(VIEW, state="failed"), "a1", 10, NOW, Conflict, "already_answered"),
        (replace(VIEW, state="expired"), "a1", 10, NOW, Conflict, "command_expired"),
        (VIEW, "a1", 10, NOW + timedelta(minutes=5), Conflict, "command_expired"),
        (VIEW, "a1", 4097, NOW, TooLarge, "answer_too_large"),
    ],
)
def test_refused_answers_name_why(
    view: CommandView | None,
    agent: str,
    size: int,
    at: datetime,
    error: type[Exception],
    code: str,
) -> None:
    with pytest.raises(error) as info:
        check_answer(view, agent, size, at)
    assert info.value.code == code  # type: ignore[attr-defined]


def test_another_agents_answer_is_refused_before_its_size_is_looked_at() -> None:
    with pytest.raises(Forbidden):
        check_answer(VIEW, "a2", 10**9, NOW)


def test_a_request_takes_defaults_and_bounds() -> None:
    req = CommandRequest.parse({"kind": "logs"})
    assert (req.kind, req.since_s, req.max_bytes, req.ttl_s) == ("logs", 600, 1024 * 1024, 300)
    req = CommandRequest.parse(
        {"kind": "diagnose", "sinceSeconds": 60, "maxBytes": 2048, "ttlSeconds": 900}
    )
    assert (req.kind, req.since_s, req.max_bytes, req.ttl_s) == ("diagnose", 60, 2048, 900)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "kind"),
        ({"kind": "shell"}, "kind"),
        ({"kind": "logs", "sinceSeconds": 0}, "sinceSeconds"),
        ({"kind": "logs", "sinceSeconds": True}, "sinceSeconds"),
        ({"kind": "logs", "maxBytes": 100}, "maxBytes"),
        ({"kind": "logs", "maxBytes": MAX_ANSWER_BYTES + 1}, "maxBytes"),
        ({"kind": "logs", "ttlSeconds": 5}, "ttlSeconds"),
        ({"kind": "logs", "ttlSeconds": 901}, "ttlSeconds"),
        ({"kind": "logs", "maxBytes": 1.5e6}, "maxBytes"),
    ],
)
def test_a_bad_request_names_its_field(body: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidMessage) as info:
        CommandRequest.parse(body)
    assert info.value.field == field


def test_command_ids_are_uuids() -> None:
    good = "6f1c1f7e-3c1a-4e0a-9d4b-2f0c2b9a1e55"
    assert check_command_id(good.upper()) == good
    for bad in ("x", "../answer", "6f1c1f7e\x00"):
        with pytest.raises(InvalidMessage):
            check_command_id(bad)
