"""Reading metric rows: every tier as one series, and which stored rows a reader may merge.

Readers (the rollout gates, the reports) use :func:`series_rows`, one UNION ALL statement over
the raw and rolled-up tiers (see ``metrics/rollup.py``), so a roll-up that commits while a report
is read is seen either wholly before or wholly after, never twice. A stored row nobody can use
(a sketch of other parameters or with bins past what a float holds, counts that are not counts)
is left out by :func:`usable` and counted once in a :class:`SkippedRows`; the roll-up sets such
rows aside with the same checks (:func:`checked_row`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Select, literal, select, union_all
from sqlalchemy.ext.asyncio import AsyncSession

from control_plane.db.models import MetricRollup, MetricSeries
from control_plane.setaside import SeenOnce, printable, reason_of
from protocol.exceptions import InvalidMessage
from protocol.sketch import DDSketch

log = logging.getLogger("modelfleet.control_plane.rollup")


# Bounds of a usable stored row. A count above 2**53 is not a real one (and floats still hold
# it exactly); merged totals are kept under it too, so no sum ever leaves a 64-bit column.
MAX_COUNT = 2**53


# Float sums (drift, a sketch's sum) stay far from overflow however many rows are added up.
MAX_FLOAT_SUM = 1e200


COUNTS = ("requests", "errors", "shadow_count", "argmax_agree")


class BadRow(ValueError):
    """A stored metric row that cannot be read or merged; the message says why."""


def checked_sketch(doc: object) -> DDSketch:
    """A stored latency sketch that merges with this control plane's; raises BadRow."""
    try:
        sketch = DDSketch.from_json(doc)
    except InvalidMessage as exc:
        # What from_json says of any JSON value it refuses (stored by an older version, or
        # by hand). Anything else it raises is a bug: caught here, it would set every row
        # aside as bad data instead of stopping the pass.
        raise BadRow(f"latency sketch: {reason_of(exc)}") from None
    # from_json took only the merged accuracy and bins in [MIN_KEY, MAX_KEY]; what it leaves
    # to its callers is how large a stored total may be.
    if sketch.count > MAX_COUNT or abs(sketch.sum) > MAX_FLOAT_SUM:
        raise BadRow("latency sketch has a count or sum past what a real window holds")
    return sketch


def checked_row(row: Any) -> DDSketch:
    """The latency sketch of a stored row of any tier once all its figures are usable.

    Raises BadRow naming the first figure that is not.
    """
    for name in COUNTS:
        value = getattr(row, name)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_COUNT:
            raise BadRow(f"{name} is not a count between 0 and 2**53")
    drift = row.drift_sum
    if (
        isinstance(drift, bool)
        or not isinstance(drift, int | float)
        or not math.isfinite(drift)
        or abs(drift) > MAX_FLOAT_SUM
    ):
        raise BadRow("drift_sum is not a finite number")
    return checked_sketch(row.latency_sketch)


@dataclass
class SeriesRow:
    """One row of any tier, as readers see it."""

    agent_id: str
    version: str
    window_start: datetime
    requests: int
    errors: int
    latency_sketch: dict[str, Any]
    shadow_count: int
    drift_sum: float
    argmax_agree: int
    resolution_s: int  # 0 for raw rows
    row_id: int = 0  # the row's id in its tier's table

    @property
    def where(self) -> str:
        """The row's table and id, for logs."""
        table = f"metric_rollups/{self.resolution_s}s" if self.resolution_s else "metric_series"
        return f"{table} #{self.row_id}"


class SkippedRows:
    """Stored metric rows that readers left out: each counted and logged once.

    ``count`` is the number of distinct rows seen (about: the memory of rows already seen is
    bounded, and a row forgotten and met again counts again); ``skips`` counts every time a
    row was left out. With a ``parent`` (the process's own), each skip is passed on to it and
    only the parent logs.
    """

    def __init__(self, capacity: int = 10_000, parent: SkippedRows | None = None) -> None:
        self.count = 0
        self.skips = 0
        self.parent = parent
        self._seen = SeenOnce(capacity)

    def skip(self, row: SeriesRow, reason: str, reader: str) -> None:
        """Count ``row`` as left out by ``reader``; log it the first time."""
        self.skips += 1
        if self.parent is not None:
            self.parent.skip(row, reason, reader)
        if not self._seen.first((row.resolution_s, row.row_id)):
            return
        self.count += 1
        if self.parent is None:
            log.warning(
                "%s left out %s (agent %s, version %s): %s",
                reader,
                row.where,
                printable(str(row.agent_id), 64),
                printable(str(row.version), 64),
                printable(reason),
            )


def usable(
    rows: Iterable[SeriesRow], skipped: SkippedRows | None, reader: str
) -> Iterator[tuple[SeriesRow, DDSketch]]:
    """Each row that can be merged, with its parsed sketch; the others go to ``skipped``."""
    for row in rows:
        try:
            sketch = checked_row(row)
        except BadRow as exc:
            if skipped is not None:
                skipped.skip(row, str(exc), reader)
            continue
        yield row, sketch


def _tier_selects(model: str) -> tuple[Select[Any], Select[Any]]:
    raw = select(
        MetricSeries.agent_id,
        MetricSeries.version,
        MetricSeries.window_start.label("start"),
        MetricSeries.requests,
        MetricSeries.errors,
        MetricSeries.latency_sketch,
        MetricSeries.shadow_count,
        MetricSeries.drift_sum,
        MetricSeries.argmax_agree,
        literal(0).label("resolution_s"),
        MetricSeries.id,
    ).where(MetricSeries.model == model)
    rolled = select(
        MetricRollup.agent_id,
        MetricRollup.version,
        MetricRollup.bucket_start.label("start"),
        MetricRollup.requests,
        MetricRollup.errors,
        MetricRollup.latency_sketch,
        MetricRollup.shadow_count,
        MetricRollup.drift_sum,
        MetricRollup.argmax_agree,
        MetricRollup.resolution_s,
        MetricRollup.id,
    ).where(MetricRollup.model == model)
    return raw, rolled


async def series_rows(
    s: AsyncSession,
    model: str,
    start: datetime,
    end: datetime | None = None,
    versions: Sequence[str] = (),
    exclude_version: str | None = None,
    skipped: SkippedRows | None = None,
) -> list[SeriesRow]:
    """Rows of every tier for ``model`` whose window starts in [start, end).

    A row whose start cannot be read as a time is left out (and counted in ``skipped``).
    """
    raw, rolled = _tier_selects(model)
    parts = []
    for q, col_start, col_version in (
        (raw, MetricSeries.window_start, MetricSeries.version),
        (rolled, MetricRollup.bucket_start, MetricRollup.version),
    ):
        q = q.where(col_start >= start)
        if end is not None:
            q = q.where(col_start < end)
        if versions:
            q = q.where(col_version.in_(list(versions)))
        if exclude_version is not None:
            q = q.where(col_version != exclude_version)
        parts.append(q)
    rows = await s.execute(union_all(*parts))
    out = []
    for r in rows:
        row = SeriesRow(
            r.agent_id,
            r.version,
            datetime.min.replace(tzinfo=UTC),
            r.requests,
            r.errors,
            r.latency_sketch,
            r.shadow_count,
            r.drift_sum,
            r.argmax_agree,
            r.resolution_s,
            r.id,
        )
        try:
            row.window_start = aware(r.start)
        except (TypeError, ValueError, OverflowError) as exc:
            if skipped is not None:
                skipped.skip(row, f"window start: {reason_of(exc)}", "metric reader")
            continue
        out.append(row)
    return out


def aware(t: datetime | str) -> datetime:
    """A stored time as an aware UTC datetime; raises ValueError for text that is not one."""
    # A UNION's column is typed from its first part, but SQLite hands back what it stored.
    if isinstance(t, str):
        t = datetime.fromisoformat(t)
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)
