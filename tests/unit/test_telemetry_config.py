"""Trace context as hostile input, the OTLP settings, and telemetry off by default."""

from __future__ import annotations

import sys

import pytest

from agent.exceptions import AgentConfigError
from agent.settings import SETTINGS, to_config
from protocol.desired import DesiredModel, desired_from_json
from protocol.otlp import parse_resource_attributes, telemetry_config
from protocol.tracecontext import checked_traceparent, parse_traceparent

GOOD = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
DIGEST = "sha256:" + "a" * 64


def test_a_well_formed_traceparent_is_read() -> None:
    tp = parse_traceparent(GOOD)
    assert tp is not None and tp.sampled
    assert tp.trace_id == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert checked_traceparent(GOOD) == GOOD
    # A later version is read as 00 (its first four fields); its extra fields are dropped.
    assert checked_traceparent("01" + GOOD[2:] + "-what-follows") == GOOD


@pytest.mark.parametrize(
    "bad",
    [
        None,
        42,
        "",
        GOOD.upper(),
        GOOD + "-extra",  # version 00 has exactly four fields
        "ff" + GOOD[2:],
        "00-" + "0" * 32 + "-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-" + "0" * 16 + "-01",
        "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
        "00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
        "01-" + "a" * 32 + "-" + "b" * 16 + "-01-" + "x" * 300,
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\n",
        "00-\uff14bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  # a wide digit
    ],
)
def test_a_malformed_traceparent_is_ignored(bad: object) -> None:
    assert parse_traceparent(bad) is None


def test_the_desired_state_keeps_a_good_traceparent_and_drops_a_bad_one() -> None:
    def doc(tp: object) -> dict:
        m = {"name": "iris", "version": "1.0.0", "manifestDigest": DIGEST, "traceparent": tp}
        return {
            "agentId": "a",
            "generation": 1,
            "issuedAt": "2026-01-01T00:00:00Z",
            "expiresAt": "2026-01-02T00:00:00Z",
            "models": [m],
        }

    [good] = desired_from_json(doc(GOOD)).models
    assert good.traceparent == GOOD and good.to_json()["traceparent"] == GOOD
    [bad] = desired_from_json(doc({"not": "a string"})).models
    assert bad.traceparent is None and "traceparent" not in bad.extra
    assert "traceparent" not in bad.to_json()
    # Not part of what the entry means: the same order with another trace is the same order.
    assert good == bad == DesiredModel("iris", "1.0.0", DIGEST)


def test_otlp_settings_from_the_standard_variables() -> None:
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318",
        "OTEL_RESOURCE_ATTRIBUTES": "service.name=ignored,site=lab%201, rack=7",
        "OTEL_SERVICE_NAME": "box-17",
    }
    c = telemetry_config(endpoint=None, env=env, default_service="modelfleet-agent")
    assert c is not None
    assert c.traces_url == "http://127.0.0.1:4318/v1/traces"
    assert c.metrics_url == "http://127.0.0.1:4318/v1/metrics"
    assert c.service_name == "box-17"
    assert c.resource == {"service.name": "box-17", "site": "lab 1", "rack": "7"}
    # The option wins over the variable; nothing configured is off; OTEL_SDK_DISABLED wins.
    c = telemetry_config(endpoint="http://127.0.0.1:9/otlp/", env=env, default_service="x")
    assert c is not None and c.traces_url == "http://127.0.0.1:9/otlp/v1/traces"
    assert telemetry_config(endpoint=None, env={}, default_service="x") is None
    off = {**env, "OTEL_SDK_DISABLED": "true"}
    assert telemetry_config(endpoint="http://127.0.0.1:9", env=off, default_service="x") is None


@pytest.mark.parametrize(
    ("endpoint", "env", "message"),
    [
        ("127.0.0.1:4318", {}, "otlp endpoint must be an http:// or https:// URL"),
        ("ftp://127.0.0.1", {}, "otlp endpoint must be an http:// or https:// URL"),
        ("http://127.0.0.1:4318?x=1", {}, "without query"),
        ("http://127.0.0.1:4318", {"OTEL_RESOURCE_ATTRIBUTES": "novalue"}, "OTEL_RESOURCE"),
    ],
)
def test_bad_otlp_settings_are_named(endpoint: str, env: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        telemetry_config(endpoint=endpoint, env=env, default_service="x")


def test_resource_attributes_are_bounded() -> None:
    with pytest.raises(ValueError, match="more than 64"):
        parse_resource_attributes(",".join(f"k{i}=v" for i in range(65)))


def _agent_settings(**over: object) -> dict:
    s = {name: default for name, (_, default) in SETTINGS.items()}
    return {**s, "state_dir": "/tmp/x", **over}


def test_the_agent_takes_otlp_from_its_option_or_the_environment() -> None:
    assert to_config(_agent_settings()).telemetry is None
    c = to_config(_agent_settings(otlp_endpoint="http://127.0.0.1:4318", otlp_interval=2.0))
    assert c.telemetry is not None and c.telemetry.export_interval_s == 2.0
    assert c.telemetry.service_name == "modelfleet-agent"
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}
    assert to_config(_agent_settings(), env=env).telemetry is not None
    with pytest.raises(AgentConfigError, match="otlp endpoint"):
        to_config(_agent_settings(otlp_endpoint="localhost:4318"))
    url = "http://127.0.0.1:4318"
    c = to_config(_agent_settings(otlp_endpoint=url, otlp_inference_sample=0.25))
    assert c.telemetry is not None and c.telemetry.inference_sample == 0.25
    with pytest.raises(AgentConfigError, match="otlp-inference-sample must be between 0 and 1"):
        to_config(_agent_settings(otlp_endpoint=url, otlp_inference_sample=1.5))


def test_configured_without_the_extra_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from agent.telemetry import start as agent_start
    from control_plane.errors import ConfigError
    from control_plane.telemetry import start as cp_start

    config = telemetry_config(endpoint="http://127.0.0.1:4318", env={}, default_service="x")
    # As if the otel extra were not installed: importing the SDK fails.
    for name in [m for m in sys.modules if m.split(".")[0] == "opentelemetry"]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "opentelemetry", None)
    for name in ("agent.telemetry.otel", "control_plane.telemetry.otel"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    with pytest.raises(AgentConfigError, match=r"pip install 'modelfleet\[otel\]'"):
        agent_start(config)
    with pytest.raises(ConfigError, match=r"pip install 'modelfleet\[otel\]'"):
        cp_start(config)
    assert agent_start(None).enabled is False
