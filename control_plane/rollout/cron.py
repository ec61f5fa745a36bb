"""Maintenance windows as cron expressions: the minutes an expression matches are open.

Five fields, minute hour day-of-month month day-of-week (0 or 7 = Sunday), each ``*``, a
number, a range ``a-b``, a list ``a,b`` and a step ``*/n`` or ``a-b/n``. Times are UTC.
``* 22-23,0-4 * * 1-5`` opens weekday nights from 22:00 to 04:59.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from protocol.exceptions import InvalidMessage

_BOUNDS = ((0, 59), (0, 23), (1, 31), (1, 12), (0, 7))
_NAMES = ("minute", "hour", "day of month", "month", "day of week")


@dataclass(frozen=True)
class Cron:
    """The parsed sets of each field."""

    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday
    days_any: bool
    weekdays_any: bool

    def matches(self, t: datetime) -> bool:
        """Whether minute ``t`` (UTC) is inside the window."""
        weekday = (t.weekday() + 1) % 7  # Python: Monday 0; cron: Sunday 0
        if t.minute not in self.minutes or t.hour not in self.hours:
            return False
        if t.month not in self.months:
            return False
        day_ok = t.day in self.days
        wd_ok = weekday in self.weekdays
        # Classic cron: when both day fields are restricted, either may match.
        if self.days_any or self.weekdays_any:
            return day_ok and wd_ok
        return day_ok or wd_ok


def _field(text: str, index: int) -> tuple[frozenset[int], bool]:
    lo, hi = _BOUNDS[index]
    values: set[int] = set()
    for part in text.split(","):
        base, _, step_text = part.partition("/")
        try:
            step = int(step_text) if step_text else 1
            if base == "*":
                a, b = lo, hi
            elif "-" in base:
                a, b = (int(x) for x in base.split("-", 1))
            else:
                a = b = int(base)
        except ValueError:
            raise InvalidMessage(
                f"maintenance_window: {part!r} is not valid in the {_NAMES[index]} field",
                "maintenance_window",
            ) from None
        if step < 1 or not lo <= a <= b <= hi:
            raise InvalidMessage(
                f"maintenance_window: {part!r} is outside {lo}-{hi} for the {_NAMES[index]} field",
                "maintenance_window",
            )
        values.update(range(a, b + 1, step))
    if index == 4 and 7 in values:
        values = (values - {7}) | {0}
    return frozenset(values), text == "*"


def parse_cron(text: str) -> Cron:
    """Parse a five-field expression; raises InvalidMessage naming the bad field."""
    fields = text.split()
    if len(fields) != 5:
        raise InvalidMessage(
            "maintenance_window must have 5 fields: minute hour day month weekday",
            "maintenance_window",
        )
    parsed = [_field(f, i) for i, f in enumerate(fields)]
    return Cron(
        minutes=parsed[0][0],
        hours=parsed[1][0],
        days=parsed[2][0],
        months=parsed[3][0],
        weekdays=parsed[4][0],
        days_any=parsed[2][1],
        weekdays_any=parsed[4][1],
    )
