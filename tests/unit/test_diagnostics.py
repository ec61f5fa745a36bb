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


# ------------------------------------------------------------------ a hostile state directory
# The attacker's pass (issue 17): what lies in the state directory is hostile input too.
SECRET = "Sh0uldN3verLeave"


def bundle_of(state_dir: Path, **kw: object) -> dict[str, bytes]:
    data = support_bundle(
        state_dir=state_dir,
        log_lines=list(kw.get("log_lines", [])),  # type: ignore[call-overload]
        facts=kw.get("facts", {"agentId": "a1"}),  # type: ignore[arg-type]
        failures=list(kw.get("failures", [])),  # type: ignore[call-overload]
        max_bytes=256 * 1024,
    )
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]


@pytest.mark.parametrize("name", ["identity.json", "control-plane.pub", "status-epoch"])
def test_a_state_file_that_is_a_symlink_is_not_followed(tmp_path: Path, name: str) -> None:
    outside = tmp_path / "agent.key"  # what a link could point at: a key, /etc/shadow
    outside.write_text(f"root:{SECRET}:19000:0:99999:7:::\n")
    state = tmp_path / "state"
    state.mkdir()
    (state / name).symlink_to(outside)
    got = bundle_of(state)
    assert not any(SECRET.encode() in data for data in got.values())
    assert b"not a regular file" in got[f"support/state/{name}"]


def test_a_fifo_in_the_state_directory_does_not_hang_the_bundle(tmp_path: Path) -> None:
    import os
    import threading

    os.mkfifo(tmp_path / "state.json")
    done: list[dict[str, bytes]] = []
    worker = threading.Thread(target=lambda: done.append(bundle_of(tmp_path)), daemon=True)
    worker.start()
    worker.join(10)
    if not done:
        # Unblock the reader so the thread ends, then fail: the bundle hung on the FIFO.
        fd = os.open(tmp_path / "state.json", os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        worker.join(5)
        pytest.fail("the support bundle blocked on a FIFO in the state directory")
    assert b"not a regular file" in done[0]["support/state/state.json"]


def test_a_secret_in_every_place_the_agent_keeps_one_stays_out_of_the_bundle(
    tmp_path: Path,
) -> None:
    secret = f"mq77{SECRET}"
    (tmp_path / "identity.json").write_text(
        json.dumps(
            {
                "agent_id": "a1",
                "server": f"https://a1:{secret}@cp.example",
                "credential": f"mfc_{secret}",
                "name": "edge",
                "labels": {},
                "mqtt": {"url": "mqtts://b:8883", "username": "a1", "password": secret},
            }
        )
    )
    (tmp_path / "state.json").write_text(
        json.dumps({"generation": 3, "mqttToken": secret, "client_secret": secret})
    )
    (tmp_path / "keyset.json").write_text('{"note": "-----BEGIN PRIVATE KEY-----\\n' + secret)
    (tmp_path / "control-plane.pub").write_text(f"api_key={secret}\n")
    (tmp_path / "status-epoch").write_text(f"Authorization: Basic {secret}\n")
    (tmp_path / "agent.key").write_text(f"-----BEGIN PRIVATE KEY-----\n{secret}\n")
    ring = LogRing()
    logger = logging.getLogger("test-every-place")
    logger.addHandler(ring)
    try:
        try:
            raise ConnectionError(f"GET https://cp/api/v1/x?access_token={secret} refused")
        except ConnectionError:
            logger.exception("poll failed with X-Api-Key: %s", secret)
    finally:
        logger.removeHandler(ring)
    got = bundle_of(
        tmp_path,
        log_lines=ring.lines(3600),
        facts={
            "agentId": "a1",
            "env": {"AWS_SECRET_ACCESS_KEY": secret},
            "relay": f"https://edge:{secret}@relay.local/",
        },
        failures=[{"reason": f"fetch https://cdn/x?access_token={secret} 403"}],
    )
    assert "support/state/identity.json" in got and "support/logs.txt" in got
    assert b"ConnectionError" in got["support/logs.txt"]  # the traceback is there, masked
    for name, data in got.items():
        assert secret.encode() not in data, (name, data)


def test_a_huge_log_line_is_cut_before_it_is_redacted() -> None:
    import time

    ring = LogRing()
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "a-" * 8 * 1024 * 1024, None, None)
    started = time.perf_counter()
    ring.emit(record)
    assert time.perf_counter() - started < 2.0
    assert len(ring.lines(3600)[0]) <= 8192


def test_a_huge_state_file_is_left_out_not_read_whole(tmp_path: Path) -> None:
    (tmp_path / "state.json").write_bytes(b'{"token": "' + b"t" * (1024 * 1024) + b'"}')
    got = bundle_of(tmp_path)
    assert got["support/state/state.json"].startswith(b"(over ")
    assert b"tttt" not in b"".join(got.values())
