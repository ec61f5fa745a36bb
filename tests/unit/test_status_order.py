"""Status that only moves forward: the order a report carries, the rule that compares two, and
the agent's epoch that keeps growing across restarts."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from agent.storage.state import StateDir
from control_plane.fleet.status_order import StatusOrder
from protocol.exceptions import InvalidMessage
from protocol.reports import MAX_ORDER, StatusReport, status_from_json

T0 = datetime(2026, 11, 25, tzinfo=UTC)
LATER = T0 + timedelta(seconds=1)


def doc(**order: Any) -> dict[str, Any]:
    return {
        "agentId": "a1",
        "generation": 1,
        "sentAt": "2026-11-25T00:00:00Z",
        "models": [],
        **order,
    }


def test_order_round_trips_and_is_absent_as_zero() -> None:
    r = StatusReport("a1", 1, T0, (), epoch=1_800_000_000, seq=MAX_ORDER)
    back = status_from_json(r.to_json())
    assert (back.epoch, back.seq) == (1_800_000_000, MAX_ORDER)
    assert "epoch" not in back.extra and "seq" not in back.extra
    old = status_from_json(doc())  # an agent older than the fields
    assert (old.epoch, old.seq) == (0, 0)


@pytest.mark.parametrize(
    "order, field",
    [
        ({"seq": -1}, "seq"),
        ({"epoch": MAX_ORDER + 1}, "epoch"),
        ({"seq": 2**64}, "seq"),
        ({"seq": True}, "seq"),
        ({"epoch": 1.5}, "epoch"),
        ({"seq": "7"}, "seq"),
    ],
)
def test_order_outside_64_bits_or_not_an_integer_is_refused_by_name(
    order: dict[str, Any], field: str
) -> None:
    with pytest.raises(InvalidMessage) as e:
        status_from_json(doc(**order))
    assert e.value.field == field


# (new, stored, whether new replaces stored); tests/integration/test_status_order.py stores
# each through the database too.
CASES: list[tuple[StatusOrder, StatusOrder, bool]] = [
    # Ordered reports: (epoch, seq) decides, the agent's clock never does.
    (StatusOrder(5, 2, T0), StatusOrder(5, 1, LATER), True),
    (StatusOrder(5, 1, LATER), StatusOrder(5, 2, T0), False),
    (StatusOrder(5, 2, T0), StatusOrder(5, 2, T0), False),  # the same report again
    (StatusOrder(6, 1, T0), StatusOrder(5, 900, LATER), True),  # a restart: new epoch
    (StatusOrder(5, 900, LATER), StatusOrder(6, 1, T0), False),  # late, from before it
    (StatusOrder(1, 1, T0), StatusOrder(), True),  # first ever
    (StatusOrder(1, 1, T0), StatusOrder(0, 0, LATER), True),  # after an unordered one
    # Unordered reports (older agents): sentAt decides, against whatever is stored.
    (StatusOrder(0, 0, LATER), StatusOrder(0, 0, T0), True),
    (StatusOrder(0, 0, T0), StatusOrder(0, 0, LATER), False),
    (StatusOrder(0, 0, T0), StatusOrder(0, 0, T0), True),  # a tie: the last to arrive
    (StatusOrder(0, 0, T0), StatusOrder(), True),
    (StatusOrder(0, 0, T0), StatusOrder(7, 3, LATER), False),  # from before an upgrade
    (StatusOrder(0, 0, LATER), StatusOrder(7, 3, T0), True),  # after a downgrade
]


@pytest.mark.parametrize("new, stored, replaces", CASES)
def test_which_report_replaces_the_stored_one(
    new: StatusOrder, stored: StatusOrder, replaces: bool
) -> None:
    assert new.supersedes(stored) is replaces


def test_status_epoch_grows_at_every_start_whatever_the_clock(tmp_path: Path) -> None:
    d = StateDir(tmp_path)
    first = d.next_status_epoch(1_800_000_000.7)
    assert first == 1_800_000_000  # the clock is the floor on a first start
    assert d.next_status_epoch(1_800_000_000.9) == first + 1  # two starts in one second
    assert d.next_status_epoch(1_000.0) == first + 2  # a clock set back
    assert d.next_status_epoch(1_900_000_000.0) == 1_900_000_000
    assert StateDir(tmp_path).next_status_epoch(0) == 1_900_000_001  # kept on disk
    assert (tmp_path / "status-epoch").stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("content", [b"", b"garbage", b"-5", str(MAX_ORDER).encode(), b"\xff"])
def test_a_status_epoch_file_that_holds_no_epoch_falls_back_to_the_clock(
    tmp_path: Path, content: bytes
) -> None:
    (tmp_path / "status-epoch").write_bytes(content)
    assert StateDir(tmp_path).next_status_epoch(1_800_000_000) == 1_800_000_000
