"""The validation boundary for what an agent sends: strict JSON, bounded sketches, 64-bit
integers, names without control characters, timestamps in range, and the facts schema.

A regression test per class of hostile input, then property tests: whatever arrives, the parsers
give a value or a ProtocolError, and what they accept can be merged, queried and written back
out as strict JSON."""

from __future__ import annotations

import copy
import json
import math
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.host.facts import gather_facts
from protocol.digest import check_digest
from protocol.exceptions import InvalidMessage, ProtocolError
from protocol.facts import MAX_ENCODED_BYTES, MAX_KEYS, check_facts, valid_facts
from protocol.fields import (
    INT64_MAX,
    INT64_MIN,
    MAX_JSON_DEPTH,
    check_json,
    get_int,
    get_number,
    get_str,
    load_json_object,
    loads_strict,
)
from protocol.labels import check_labels, parse_labels
from protocol.reports import (
    MAX_TEXT,
    MAX_WINDOW_COUNT,
    MetricsBatch,
    ModelStatus,
    SeriesWindow,
    StatusReport,
    metrics_from_json,
    status_from_json,
)
from protocol.sketch import MAX_KEY, MAX_VALUE, MIN_KEY, MIN_VALUE, DDSketch
from protocol.timeutil import parse_time
from tests.unit.test_properties import JSON, SETTINGS

NOW = datetime(2026, 11, 25, tzinfo=UTC)
DIGEST = "sha256:" + "b" * 64


def refused(fn: Any, *args: Any, **kwargs: Any) -> InvalidMessage:
    with pytest.raises(InvalidMessage) as info:
        fn(*args, **kwargs)
    return info.value


def status_doc(**facts: Any) -> dict[str, Any]:
    """A status report as the daemon builds it (agent/daemon.py status_report)."""
    models = (
        ModelStatus("iris", "1.0.0", DIGEST, "active", variant="cpu"),
        ModelStatus("iris", "2.0.0", DIGEST, "failed", "smoke test failed:\n\tshape (1, 3)"),
    )
    report = StatusReport(
        "a1",
        3,
        NOW,
        models,
        {**gather_facts(), "servePort": 8081, **facts},
        last_error="desired state refused: expired",
        extra={
            "metricsPending": 0,
            "metricsDropped": 0,
            "desiredState": "current",
            "desiredExpiresAt": "2026-11-26T00:00:00.000Z",
            "keysetVersion": 2,
        },
    )
    return report.to_json()


def metrics_doc() -> dict[str, Any]:
    s = SeriesWindow(
        "iris", "1.0.0", requests=4, errors=1, shadow_count=2, drift_sum=0.5, argmax_agree=1
    )
    for v in (0.0, 0.4, 3.0, 250.0):
        s.latency_ms.add(v)
    return MetricsBatch("a1", 7, NOW, NOW, (s,)).to_json()


# ------------------------------------------------------------------------------- strict JSON


@pytest.mark.parametrize(
    ("data", "field"),
    [
        (b'{"facts": {"costPerHour": NaN}}', "facts.costPerHour"),
        (b'{"x": [1, Infinity]}', "x[1]"),
        (b'{"x": -Infinity}', "x"),
        (b'{"sum": 1e999}', "sum"),
        (b'{"sum": -1e999}', "sum"),
        (b'{"seq": 9223372036854775808}', "seq"),
        (b'{"seq": -9223372036854775809}', "seq"),
        (b'{"seq": ' + b"9" * 5000 + b"}", "seq"),
        (b'{"name": "a\\ud800b"}', "name"),
        (b'{"a": {"b": ["\\udfff"]}}', "a.b[0]"),
        (b'{"facts": {"\\ud800": 1}}', "facts"),
        (b'{"x": {"gpus": [{"name": 1e400}]}}', "x.gpus[0].name"),
    ],
)
def test_strict_json_refuses_and_names_the_path(data: bytes, field: str) -> None:
    exc = refused(load_json_object, data, "request body")
    assert exc.field == field, exc


@pytest.mark.parametrize(
    "data",
    [
        b"[" * 100_000 + b"]" * 100_000,  # past the decoder's own recursion limit
        b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1),
        b'{"a": ' * (MAX_JSON_DEPTH + 1) + b"1" + b"}" * (MAX_JSON_DEPTH + 1),
        b'"\xed\xa0\x80"',  # a surrogate encoded as UTF-8 bytes
        b'{"a": "\xff"}',
        b"\xef\xbb\xbf{}",  # a byte-order mark
        b"{} {}",
        b"",
    ],
)
def test_strict_json_refuses_malformed_documents(data: bytes) -> None:
    refused(loads_strict, data, "payload")


def test_strict_json_accepts_the_limits_themselves() -> None:
    depth = MAX_JSON_DEPTH
    assert loads_strict(b"[" * depth + b"]" * depth, "p") is not None
    doc = load_json_object(
        b'{"a": 9223372036854775807, "b": -9223372036854775808, "c": 1.7e308, "d": "\\u00e9",'
        b' "e": "\\ud83d\\ude00", "f": [null, true, false, 0.0]}',
        "p",
    )
    assert doc["a"] == INT64_MAX and doc["b"] == INT64_MIN and doc["e"] == "\U0001f600"
    assert loads_strict("[1]", "p") == [1]
    refused(load_json_object, b"[1]", "p")


@pytest.mark.parametrize(
    ("value", "field"),
    [
        ({"x": [math.nan]}, "x[0]"),
        ({"x": 2**64}, "x"),
        ({"x": object()}, "x"),
        ({"x": {1: 2}}, "x"),
    ],
)
def test_check_json_refuses_values_built_in_code(value: object, field: str) -> None:
    assert refused(check_json, value, "v").field == field


def test_strict_json_out() -> None:
    with pytest.raises(ValueError):
        json.dumps({"x": math.nan}, allow_nan=False)
    from control_plane.api.request import json_response

    with pytest.raises(ValueError):
        json_response({"facts": {"costPerHour": math.inf}})
    assert json_response({"when": NOW}).text == json.dumps({"when": str(NOW)})


# ----------------------------------------------------------------------- integers and numbers


def test_integers_are_bounded_to_64_bits() -> None:
    assert get_int({"n": INT64_MAX}, "n") == INT64_MAX
    assert refused(get_int, {"n": INT64_MAX + 1}, "n", "x.").field == "x.n"
    assert refused(get_int, {"n": 11}, "n", maximum=10).field == "n"
    # math.isfinite(10**400) raises OverflowError; the reader must not.
    assert refused(get_number, {"n": 10**400}, "n").field == "n"
    assert refused(get_number, {"n": math.inf}, "n").field == "n"
    assert refused(get_number, {"n": 2.0}, "n", maximum=1.0).field == "n"


def test_series_counters_stay_far_under_64_bits() -> None:
    d = metrics_doc()
    d["series"][0]["requests"] = MAX_WINDOW_COUNT + 1
    assert refused(metrics_from_json, d).field == "series[0].requests"
    d = metrics_doc()
    d["series"][0]["shadow"]["driftSum"] = 1e300
    assert refused(metrics_from_json, d).field == "series[0].shadow.driftSum"


# ---------------------------------------------------------------------------------- sketches


def sketch_doc(**changes: Any) -> dict[str, Any]:
    sk = DDSketch()
    for v in (1.0, 2.0, 3.0):
        sk.add(v)
    return {**sk.to_json(), **changes}


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"relativeAccuracy": 0.02}, "relativeAccuracy"),
        ({"relativeAccuracy": 0.5}, "relativeAccuracy"),
        ({"binKeys": [MAX_KEY + 1], "binCounts": [3]}, "binKeys[0]"),
        ({"binKeys": [0, MIN_KEY - 1], "binCounts": [1, 2]}, "binKeys[1]"),
        ({"binKeys": [10**18], "binCounts": [3]}, "binKeys[0]"),
        ({"binKeys": [1], "binCounts": [2**63]}, "binCounts[0]"),
        ({"binKeys": [1, 2], "binCounts": [2**62, 2**62], "count": 2**63}, "count"),
        ({"zeroCount": 2**63}, "zeroCount"),
        ({"min": 5.0, "max": 4.0}, "max"),
        ({"max": MAX_VALUE * 2}, "max"),
        ({"min": -1.0}, "min"),
        ({"sum": 1e300}, "sum"),
        ({"sum": -1.0}, "sum"),
    ],
)
def test_sketch_parameters_and_ranges(changes: dict[str, Any], field: str) -> None:
    exc = refused(DDSketch.from_json, sketch_doc(**changes), "latencyMs.")
    assert exc.field == f"latencyMs.{field}", exc


def test_sketch_of_other_accuracy_is_refused_in_a_batch() -> None:
    d = metrics_doc()
    d["series"][0]["latencyMs"]["relativeAccuracy"] = 0.05
    assert refused(metrics_from_json, d).field == "series[0].latencyMs.relativeAccuracy"


def test_sketch_range_holds_every_value_an_agent_records() -> None:
    sk = DDSketch()
    for v in (0.0, MIN_VALUE, MIN_VALUE * 1.000001, 1.0, MAX_VALUE, MAX_VALUE * 10, 1e300):
        sk.add(v)
    assert min(sk.bins) == MIN_KEY and max(sk.bins) == MAX_KEY and sk.max == MAX_VALUE
    back = DDSketch.from_json(json.loads(json.dumps(sk.to_json(), allow_nan=False)))
    assert back.count == 7 and back.quantile(1.0) == pytest.approx(MAX_VALUE, rel=0.01)


def test_quantile_and_merge_survive_rows_stored_before_the_checks() -> None:
    """Older versions stored sketches with any bin index: reading them must not raise."""
    old = DDSketch(bins={10**6: 2, -(10**400): 1, 10**400: 1}, count=4, min=0.0, max=MAX_VALUE)
    merged = DDSketch()
    merged.merge(old)
    merged.merge(old)
    for q in (0.0, 0.5, 0.95, 0.99, 1.0):
        value = merged.quantile(q)
        assert value is not None and 0.0 <= value <= MAX_VALUE


# ------------------------------------------------------------------------- control characters


@pytest.mark.parametrize("bad", ["a\x00b", "\x1b[31mred", "a\x7f", "a\x85b", "a\nb", "a\rb"])
def test_identifiers_refuse_control_characters(bad: str) -> None:
    assert refused(get_str, {"name": bad}, "name").field == "name"


def test_free_text_keeps_newline_and_tab_only() -> None:
    assert get_str({"e": "line 1\n\tline 2"}, "e", text=True) == "line 1\n\tline 2"
    for bad in ("a\rb", "\x1b[2J", "nul\x00", "\x9b"):
        assert refused(get_str, {"e": bad}, "e", text=True).field == "e"


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda d: d.update(agentId="a1\n2026-01-01 INFO forged"), "agentId"),
        (lambda d: d["models"][0].update(name="iris\n"), "models[0].name"),
        (lambda d: d["models"][0].update(version="1.0.0\n"), "models[0].version"),
        (lambda d: d["models"][0].update(variant="cpu\x00"), "models[0].variant"),
        (lambda d: d["models"][0].update(manifestDigest=DIGEST + "\n"), "models[0].manifestDigest"),
        (lambda d: d["models"][1].update(reason="ok\r\nforged"), "models[1].reason"),
        (lambda d: d.update(lastError="\x1b]0;title\x07"), "lastError"),
        (lambda d: d.update(desiredState="current\n"), "desiredState"),
        (lambda d: d["facts"].update(hostname="box\x00"), "facts.hostname"),
    ],
)
def test_status_names_refuse_control_characters(mutate: Any, field: str) -> None:
    d = status_doc()
    mutate(d)
    assert refused(status_from_json, d).field == field


def test_labels_refuse_a_trailing_newline() -> None:
    assert check_labels({"site": "onprem"}) == {"site": "onprem"}
    refused(check_labels, {"site\n": "onprem"})
    assert refused(check_labels, {"site": "onprem\n"}).field == "labels.site"
    refused(parse_labels, "site=on\x00prem")
    refused(check_digest, DIGEST + "\n", "d")


def test_agent_side_text_is_made_sendable() -> None:
    """An exception's text can hold anything: the report carries it cleaned, not refused."""
    raw = "onnx said \x1b[31mno\x1b[0m\r\n" + "x" * 5000
    model = ModelStatus("iris", "2.0.0", DIGEST, "failed", raw)
    doc = StatusReport("a1", 1, NOW, (model,), last_error=raw + "\ud800").to_json()
    back = status_from_json(loads_strict(json.dumps(doc), "status"))
    assert back.last_error is not None and len(back.last_error) <= MAX_TEXT
    assert back.models[0].reason is not None and back.models[0].reason.startswith("onnx said")
    assert "\x1b" not in back.models[0].reason and "\r" not in back.last_error


# -------------------------------------------------------------------------------- timestamps


@pytest.mark.parametrize(
    "value",
    [
        "9999-12-31T23:59:59-23:59",  # the offset moves it past year 9999
        "0001-01-01T00:00:00+05:00",  # before year 1
        "2026-01-01T00:00:00+99:00",
        "2026-02-30T00:00:00Z",
        "2026-01-01T24:00:00Z",
        "1900-01-01T00:00:00Z",
        "5000-01-01T00:00:00Z",
        "2026-01-01",
        "2026-01-01T00:00:00",  # no zone
        "2026-01-01T00:00:00Z\n",
        "2026-01-01T00:00:00Z" + " " * 10_000,
        "+2026-01-01T00:00:00Z",
    ],
)
def test_timestamps_out_of_range_are_refused(value: str) -> None:
    assert refused(parse_time, value, "sentAt").field == "sentAt"
    d = metrics_doc()
    d["windowStart"] = value
    assert refused(metrics_from_json, d).field == "windowStart"


def test_timestamps_in_rfc3339_forms_are_read() -> None:
    assert parse_time("2026-11-25T01:00:00+01:00", "t") == NOW
    assert parse_time("2026-11-25t00:00:00.000000001z", "t") == NOW
    assert parse_time("1970-01-01T00:00:00Z", "t").year == 1970


# ------------------------------------------------------------------------------------- facts

GPU_FACTS = {
    "cpuCount": 64,
    "memoryBytes": 512 * 2**30,
    "os": "linux",
    "osRelease": "6.8.0-45-generic",
    "arch": "x86_64",
    "python": "3.11.7",
    "hostname": "gpu-node-17.example.internal",
    "runtimes": {
        "onnx": {
            "version": "1.20.1",
            "providers": ["CUDAExecutionProvider", "CPUExecutionProvider"],
        },
        "tflite": {"package": "ai-edge-litert", "version": "1.2.0"},
    },
    "gpus": [{"name": "NVIDIA H200", "memoryBytes": 150_754_820_096}] * 8,
    "accelerators": ["cuda"],
    "cudaProviderMissing": False,
    "costPerHour": 12.5,
    "servePort": 8081,
    "site": "eu-west",
    "rack": 7,
    "simulated": True,
    "note": None,
}


def test_facts_real_agents_send_are_accepted() -> None:
    facts = {**gather_facts(), "servePort": 8081, "costPerHour": 0.25}
    assert check_facts(facts) == facts
    assert check_facts(GPU_FACTS) == GPU_FACTS
    assert check_facts(None) == {} and check_facts({"cpuCount": None, "memoryBytes": None})
    assert status_from_json(status_doc(costPerHour=1)).facts["servePort"] == 8081


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"gpus": [{"name": "ok"}, {"name": "x" * 300}]}, "facts.gpus[1].name"),
        ({"gpus": [{"name": "ok"}, {"name": "a\nb"}]}, "facts.gpus[1].name"),
        ({"gpus": [{"name": "ok", "extra": {"deep": 1}}]}, "facts.gpus[0].extra"),
        ({"gpus": [{}] * 33}, "facts.gpus"),
        ({"gpus": {"name": "x"}}, "facts.gpus"),
        ({"runtimes": {"onnx": {"providers": ["CPU", 3]}}}, "facts.runtimes.onnx.providers[1]"),
        ({"runtimes": {"onnx": "1.20"}}, "facts.runtimes.onnx"),
        ({"runtimes": {"on nx": {}}}, "facts.runtimes"),
        ({"costPerHour": math.nan}, "facts.costPerHour"),
        ({"costPerHour": -1}, "facts.costPerHour"),
        ({"costPerHour": 1e308}, "facts.costPerHour"),  # times hours: infinity in reports
        ({"costPerHour": "cheap"}, "facts.costPerHour"),
        ({"cpuCount": 2**64}, "facts.cpuCount"),
        ({"cpuCount": 1.5}, "facts.cpuCount"),
        ({"servePort": 70000}, "facts.servePort"),
        ({"cudaProviderMissing": "yes"}, "facts.cudaProviderMissing"),
        ({"accelerators": ["cuda", None]}, "facts.accelerators[1]"),
        ({"custom": [1, 2]}, "facts.custom"),
        ({"custom": {"a": 1}}, "facts.custom"),
        ({"custom": math.inf}, "facts.custom"),
        ({"custom": "\x1b[2J"}, "facts.custom"),
        ({"os": "linux\ud800"}, "facts.os"),
        ({"bad key": 1}, "facts"),
        ({"x\n": 1}, "facts"),
        ({f"k{i}": 1 for i in range(MAX_KEYS + 1)}, "facts"),
        ({f"k{i}": "x" * 256 for i in range(MAX_KEYS - 1)}, "facts"),  # over the size cap
    ],
)
def test_facts_schema_names_the_path(change: dict[str, Any], field: str) -> None:
    exc = refused(check_facts, {"cpuCount": 2, **change})
    assert exc.field == field, exc
    d = status_doc()
    d["facts"] = {"cpuCount": 2, **change}
    assert refused(status_from_json, d).field == field


def test_stored_facts_from_before_the_schema_keep_their_valid_part() -> None:
    old = {"cpuCount": 4, "costPerHour": math.nan, "gpus": [[[]]], "arch": "arm64"}
    assert valid_facts(old) == {"cpuCount": 4, "arch": "arm64"}
    assert valid_facts({f"k{i}": "x" * 256 for i in range(MAX_KEYS)}) == {}
    assert valid_facts("junk") == {}


# --------------------------------------------------------------------------- property tests

HOSTILE = st.sampled_from(
    [
        math.nan,
        math.inf,
        -math.inf,
        1e308,
        -1.0,
        0,
        2**63,
        -(2**63) - 1,
        2**64,
        10**30,
        1.5,
        True,
        None,
        "",
        "\x00",
        "a\nb",
        "\ud800",
        "x" * 3000,
        [],
        {},
        [[[[1]]]],
        {"a": {"b": 1}},
        "9999-12-31T23:59:59-23:59",
        "0001-01-01T00:00:00+01:00",
        "2026-01-01T00:00:00Z",
        MIN_KEY - 1,
        MAX_KEY + 1,
        MAX_KEY,
        0.02,
        0.01,
        MAX_VALUE,
        MAX_WINDOW_COUNT + 1,
        "sha256:" + "a" * 64,
        "iris",
        "1.0.0",
        "active",
        "failed",
    ]
)
VALUES = HOSTILE | JSON


def _slots(doc: Any) -> list[tuple[Any, Any]]:
    """Every (container, key) in a document, to replace one value with another."""
    out: list[tuple[Any, Any]] = []
    stack = [doc]
    while stack:
        node = stack.pop()
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for k, v in items:
            out.append((node, k))
            if isinstance(v, dict | list) and v:
                stack.append(v)
    return out


def mutated(data: st.DataObject, doc: dict[str, Any]) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    for _ in range(data.draw(st.integers(1, 3))):
        node, key = data.draw(st.sampled_from(_slots(doc)))
        if isinstance(node, dict) and data.draw(st.booleans()):
            key = data.draw(st.sampled_from(["relativeAccuracy", "zeroCount", "facts", "x"]))
        # A copy: sampled_from hands out its own objects, and a later step may mutate inside.
        node[key] = copy.deepcopy(data.draw(VALUES))
    return doc


def accepted_status_round_trips(doc: object) -> None:
    try:
        report = status_from_json(doc)
    except ProtocolError:
        return
    again = json.dumps(report.to_json(), allow_nan=False)
    assert status_from_json(loads_strict(again, "status")) == report
    assert len(json.dumps(report.facts, separators=(",", ":")).encode()) <= MAX_ENCODED_BYTES


def accepted_metrics_merge_and_answer(doc: object) -> None:
    try:
        batch = metrics_from_json(doc)
    except ProtocolError:
        return
    json.dumps(batch.to_json(), allow_nan=False)
    merged = DDSketch()
    for s in batch.series:
        merged.merge(s.latency_ms)
        merged.merge(DDSketch.from_json(s.latency_ms.to_json()))
    for q in (0.5, 0.95, 0.99):
        value = merged.quantile(q)
        assert value is None or 0.0 <= value <= MAX_VALUE


@SETTINGS
@given(st.data())
def test_mutated_status_reports_give_a_report_or_a_protocol_error(data: st.DataObject) -> None:
    accepted_status_round_trips(mutated(data, status_doc()))


@SETTINGS
@given(st.data())
def test_mutated_metric_batches_merge_and_answer(data: st.DataObject) -> None:
    accepted_metrics_merge_and_answer(mutated(data, metrics_doc()))


@SETTINGS
@given(VALUES)
def test_any_value_gives_a_value_or_a_protocol_error(doc: Any) -> None:
    accepted_status_round_trips(doc)
    accepted_metrics_merge_and_answer(doc)
    try:
        facts = check_facts(doc)
    except ProtocolError:
        return
    assert loads_strict(json.dumps(facts, allow_nan=False), "facts") == facts


@SETTINGS
@given(st.data())
def test_mutated_facts_give_facts_or_a_protocol_error(data: st.DataObject) -> None:
    facts = mutated(data, GPU_FACTS)
    try:
        out = check_facts(facts)
    except ProtocolError:
        return
    text = json.dumps(out, separators=(",", ":"), allow_nan=False)
    assert len(text) <= MAX_ENCODED_BYTES and loads_strict(text, "facts") == out


JSON_TEXT = st.sampled_from(
    [
        "NaN",
        "Infinity",
        "-Infinity",
        "1e999",
        "-1e999",
        "9223372036854775808",
        "1" * 5000,
        '"\\ud800"',
        '"\\udc00\\ud800"',
        "[" * 40 + "]" * 40,
        '{"a":' * 40 + "1" + "}" * 40,
        "0",
        "-0.0",
        "1.5e308",
        '"\\u0000"',
        "true",
        "null",
        '"x"',
        "[]",
        "{}",
    ]
)
JSON_DOCS = st.recursive(
    JSON_TEXT,
    lambda inner: (
        st.lists(inner, max_size=4).map(lambda xs: "[" + ",".join(xs) + "]")
        | st.dictionaries(st.sampled_from(['"a"', '"\\ud800"', '"seq"']), inner, max_size=3).map(
            lambda d: "{" + ",".join(f"{k}:{v}" for k, v in d.items()) + "}"
        )
    ),
    max_leaves=20,
)


@SETTINGS
@given(JSON_DOCS | st.binary(max_size=200).map(lambda b: b.decode("latin-1")))
def test_strict_json_gives_strict_json_or_a_protocol_error(text: str) -> None:
    for data in (text, text.encode("utf-8", "surrogatepass")):
        try:
            doc = loads_strict(data, "payload")
        except ProtocolError:
            continue
        # What is accepted writes back out as strict JSON and reads back the same.
        assert loads_strict(json.dumps(doc, allow_nan=False), "payload") == doc
        # The MQTT bridge's path: bytes to a report or our error, nothing else.
        accepted_status_round_trips(doc)
        accepted_metrics_merge_and_answer(doc)
