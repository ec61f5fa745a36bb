"""Labels, selectors and report parsing."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from protocol.exceptions import InvalidMessage
from protocol.labels import MAX_LABELS, check_labels, matches, parse_labels, parse_selector
from protocol.reports import (
    MetricsBatch,
    ModelStatus,
    SeriesWindow,
    StatusReport,
    metrics_from_json,
    status_from_json,
)

NOW = datetime(2026, 11, 25, tzinfo=UTC)
DIGEST = "sha256:" + "b" * 64


def test_labels_and_selectors() -> None:
    labels = parse_labels("site=onprem, hw=cpu")
    assert labels == {"site": "onprem", "hw": "cpu"}
    assert matches(parse_selector("site=onprem"), labels)
    assert not matches(parse_selector("site=cloud"), labels)
    assert matches(parse_selector(""), labels)


@pytest.mark.parametrize("text", ["site", "=x", "site=on prem", "s!te=x"])
def test_bad_labels(text: str) -> None:
    with pytest.raises(InvalidMessage):
        parse_labels(text)


def test_status_round_trip() -> None:
    r = StatusReport("a1", 3, NOW, (ModelStatus("iris", "1.0.0", DIGEST, "active"),), {"c": 1})
    back = status_from_json(r.to_json())
    assert back.models == r.models and back.generation == 3


def test_metrics_round_trip() -> None:
    s = SeriesWindow("iris", "1.0.0", requests=2, errors=1)
    s.latency_ms.add(1.5)
    s.latency_ms.add(2.5)
    b = MetricsBatch("a1", 7, NOW, NOW, (s,))
    back = metrics_from_json(b.to_json())
    assert back.seq == 7 and back.series[0].requests == 2 and back.series[0].latency_ms.count == 2


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda d: d.update(seq=0), "seq"),
        (lambda d: d.update(seq="1"), "seq"),
        (lambda d: d["series"][0].update(errors=5), "series[0].errors"),
        (lambda d: d["series"][0].update(model="Bad Name"), "series[0].model"),
        (lambda d: d.update(windowStart="yesterday"), "windowStart"),
        (lambda d: d.update(series="x"), "series"),
    ],
)
def test_bad_metrics_name_the_field(mutate, field: str) -> None:  # type: ignore[no-untyped-def]
    s = SeriesWindow("iris", "1.0.0", requests=2, errors=0)
    s.latency_ms.add(1.0)
    s.latency_ms.add(1.0)
    d = MetricsBatch("a1", 7, NOW, NOW, (s,)).to_json()
    mutate(d)
    with pytest.raises(InvalidMessage) as info:
        metrics_from_json(d)
    assert info.value.field == field


def test_bad_status_state() -> None:
    d = StatusReport("a1", 1, NOW, (ModelStatus("iris", "1", DIGEST, "active"),)).to_json()
    d["models"][0]["state"] = "exploded"
    with pytest.raises(InvalidMessage) as info:
        status_from_json(d)
    assert info.value.field == "models[0].state"


def test_labels_past_the_cap_are_refused_naming_the_field() -> None:
    # An agent asks for its own labels at enrollment: with no count cap one 1 MiB body stored
    # ~80,000 of them on its row, listed by GET /agents and matched by every selector.
    labels = {f"k{i}": "v" for i in range(MAX_LABELS)}
    assert check_labels(labels) == labels
    with pytest.raises(InvalidMessage) as exc:
        check_labels({**labels, "one-more": "v"})
    assert exc.value.field == "labels"
