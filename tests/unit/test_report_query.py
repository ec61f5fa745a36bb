"""A report's query string is checked once, at the edge, into a ReportQuery."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from control_plane.metrics.reports import parse_report_query
from protocol.exceptions import InvalidMessage

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def test_defaults_are_the_last_hour_by_site_every_version() -> None:
    q = parse_report_query({"model": "iris"}, NOW)
    assert (q.model, q.versions, q.by) == ("iris", (), ("site",))
    assert (q.window.start, q.window.end) == (NOW - timedelta(hours=1), NOW)


def test_versions_window_and_two_dimensions() -> None:
    q = parse_report_query(
        {
            "model": "iris",
            "version": "1.0.0,2.0.0",
            "from": "2026-11-20T00:00:00Z",
            "to": "2026-11-30T00:00:00Z",
            "by": "site, version",
        },
        NOW,
    )
    assert q.versions == ("1.0.0", "2.0.0")
    assert q.by == ("site", "version")
    assert q.window.seconds == 10 * 86400


def test_a_comparison_over_ten_days_needs_no_bucket() -> None:
    # Only a time series is cut into buckets; a long comparison is not "too many buckets".
    q = parse_report_query({"model": "iris", "since": "240h", "bucket": "nonsense"}, NOW)
    assert q.window.seconds == 10 * 86400


def test_a_series_bucket_is_read_and_bounded() -> None:
    q = parse_report_query({"model": "iris", "since": "24h", "bucket": "5m"}, NOW, series=True)
    assert q.bucket_s == 300


@pytest.mark.parametrize(
    ("query", "series", "field"),
    [
        ({}, False, "model"),
        ({"model": "../etc"}, False, "model"),
        ({"model": "iris", "since": "forever"}, False, "since"),
        ({"model": "iris", "from": "yesterday"}, False, "from"),
        ({"model": "iris", "from": "2026-12-01T13:00:00Z"}, False, "to"),
        ({"model": "iris", "by": "site,site"}, False, "by"),
        ({"model": "iris", "by": "a,b,c"}, False, "by"),
        ({"model": "iris", "bucket": "10s"}, True, "bucket"),
        ({"model": "iris", "since": "720h", "bucket": "1m"}, True, "bucket"),
    ],
)
def test_a_bad_query_names_its_field(query: dict[str, str], series: bool, field: str) -> None:
    with pytest.raises(InvalidMessage) as err:
        parse_report_query(query, NOW, series=series)
    assert err.value.field == field
