"""The agent's diagnostics: secrets redacted everywhere, logs bounded, bundles size-capped."""

from __future__ import annotations

import io
import json
import logging
import tarfile
from pathlib import Path

import pytest

from agent.host.diagnostics import LogRing, capped_lines, redact, redact_json, support_bundle

SECRETS = ("mfc_s3cr3tCredential", "hunter2pass", "mfw_whsecret", "tok123456")


def test_redaction_of_log_text() -> None:
    text = (
        "Authorization: Bearer tok123456 credential=mfc_s3cr3tCredential "
        "mqtt://agent:hunter2pass@broker:1883 secret mfw_whsecret"
    )
    out = redact(text)
    assert not any(s in out for s in SECRETS), out
    assert "broker:1883" in out and "[redacted]" in out


def test_redaction_of_json_by_key_and_value() -> None:
    doc = {
        "agentId": "a1",
        "credential": "mfc_s3cr3tCredential",
        "mqtt": {"username": "a1", "password": "hunter2pass", "url": "mqtts://b:8883"},
        "notes": ["Bearer tok123456"],
    }
    out = json.dumps(redact_json(doc))
    assert not any(s in out for s in SECRETS), out
    assert '"agentId": "a1"' in out and "mqtts://b:8883" in out


def test_log_ring_keeps_recent_redacted_lines_within_its_bounds() -> None:
    ring = LogRing(max_lines=100, max_bytes=4000)
    log = logging.getLogger("test.diagnostics.ring")
    log.addHandler(ring)
    log.setLevel(logging.INFO)
    try:
        for i in range(300):
            log.info("line %d with credential=mfc_s3cr3tCredential", i)
    finally:
        log.removeHandler(ring)
    lines = ring.lines(since_s=3600)
    assert 0 < len(lines) <= 100 and sum(len(x) for x in lines) <= 4000
    assert lines[-1].endswith("line 299 with credential=[redacted]")
    assert ring.lines(since_s=3600, now=10**12) == []  # nothing is that recent


def test_capped_lines_keep_the_newest() -> None:
    lines = [f"l{i:03d}" for i in range(100)]
    assert capped_lines(lines, 50) == lines[-10:]  # 5 bytes each with the newline


def test_support_bundle_holds_redacted_state_and_fits_its_cap(tmp_path: Path) -> None:
    (tmp_path / "identity.json").write_text(
        json.dumps({"agentId": "a1", "credential": "mfc_s3cr3tCredential"})
    )
    (tmp_path / "state.json").write_text(json.dumps({"generation": 7}))
    (tmp_path / "agent.key").write_text("PRIVATE KEY never read")
    lines = [f"2026-12-01 line {i} token=tok123456 " + "x" * 80 for i in range(5000)]
    data = support_bundle(
        state_dir=tmp_path,
        log_lines=lines,
        facts={"os": "linux", "password": "hunter2pass"},
        failures=[{"model": "iris", "reason": "smoke failed with Bearer tok123456"}],
        max_bytes=16 * 1024,
    )
    assert len(data) <= 16 * 1024
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]
    names = set(members)
    assert {"support/logs.txt", "support/facts.json", "support/host.json"} <= names
    assert {"support/failures.json", "support/state/identity.json"} <= names
    assert not any("agent.key" in n for n in names)
    blob = b"".join(members.values()).decode()
    assert not any(s in blob for s in SECRETS)
    logs = members["support/logs.txt"].decode().splitlines()
    assert 0 < len(logs) < 5000 and logs[-1].startswith("2026-12-01 line 4999")
    assert json.loads(members["support/state/state.json"]) == {"generation": 7}
    with pytest.raises(ValueError):
        support_bundle(state_dir=tmp_path, log_lines=[], facts={}, failures=[], max_bytes=100)
