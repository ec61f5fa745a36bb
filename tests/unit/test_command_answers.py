"""Answers to operator commands: chunks on MQTT and their assembly (protocol/commands.py),
the agent's seen ids and answers (agent/commands.py), and --follow's de-duplication."""

from __future__ import annotations

import io
import logging
import os
import tarfile
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from agent.commands import SeenCommands, build_answer
from agent.host.diagnostics import LogRing
from control_plane.cli.diagnose import follow_window
from protocol.commands import (
    ANSWER_CHUNK_BYTES,
    MAX_SINCE_S,
    AnswerAssembly,
    Command,
    answer_chunks,
    chunk_properties,
    parse_answer_chunk,
    unseen_lines,
)
from protocol.exceptions import InvalidMessage

NOW = datetime(2026, 12, 1, 6, 0, tzinfo=UTC)
CID = str(uuid.uuid4())


def roundtrip(data: bytes, error: str | None = None) -> list:
    return [
        parse_answer_chunk(dict(chunk_properties(c)), c.data)
        for c in answer_chunks(CID, data, error)
    ]


@pytest.mark.parametrize("size", [0, 1, ANSWER_CHUNK_BYTES, ANSWER_CHUNK_BYTES + 1, 300_000])
def test_an_answer_survives_chunking_in_any_order_with_repeats(size: int) -> None:
    data = bytes(i % 251 for i in range(size))
    chunks = roundtrip(data)
    assert all(len(c.data) <= ANSWER_CHUNK_BYTES for c in chunks)
    order = list(reversed(chunks)) + chunks[:1]
    assembly = AnswerAssembly(order[0], max_bytes=size or 1)
    results = [assembly.add(c) for c in order]
    assert results[len(chunks) - 1] == data
    assert all(r is None for r in results[: len(chunks) - 1])


def test_an_error_is_one_empty_chunk() -> None:
    (chunk,) = roundtrip(b"", "needs 3000 bytes")
    assert chunk.error == "needs 3000 bytes" and chunk.size == 0
    assert AnswerAssembly(chunk, 1024).add(chunk) == b""


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"commandId": "../x"}, "commandId"),
        ({"commandId": None}, "commandId"),
        ({"index": "-1"}, "index"),
        ({"index": "2"}, "index"),
        ({"count": "99999999999"}, "count"),
        ({"count": "3"}, "count"),
        ({"size": "9999999999"}, "size"),
        ({"digest": "md5:abc"}, "digest"),
        ({"error": "x" * 501}, "error"),
    ],
)
def test_a_malformed_chunk_header_is_refused_naming_its_field(
    change: dict[str, str | None], field: str
) -> None:
    chunk = answer_chunks(CID, b"a" * (ANSWER_CHUNK_BYTES + 5))[0]
    props: dict[str, str] = dict(chunk_properties(chunk))
    for k, v in change.items():
        if v is None:
            props.pop(k)
        else:
            props[k] = v
    with pytest.raises(InvalidMessage) as info:
        parse_answer_chunk(props, chunk.data)
    assert info.value.field == field


def test_an_oversized_chunk_payload_is_refused() -> None:
    chunk = answer_chunks(CID, b"a" * (ANSWER_CHUNK_BYTES + 5))[0]
    with pytest.raises(InvalidMessage, match="at most"):
        parse_answer_chunk(dict(chunk_properties(chunk)), chunk.data + b"x")


def test_assembly_refuses_what_does_not_fit() -> None:
    data = b"b" * (ANSWER_CHUNK_BYTES + 10)
    first, second = roundtrip(data)
    with pytest.raises(InvalidMessage, match="maxBytes"):
        AnswerAssembly(first, max_bytes=len(data) - 1)
    # A chunk of another answer (other digest) is refused, not mixed in.
    other = roundtrip(b"c" * (ANSWER_CHUNK_BYTES + 10))[1]
    assembly = AnswerAssembly(first, max_bytes=len(data))
    assert assembly.add(first) is None
    with pytest.raises(InvalidMessage, match="disagrees"):
        assembly.add(other)
    # Right header, wrong bytes: the digest does not check.
    forged = parse_answer_chunk(dict(chunk_properties(second)), b"X" * 10)
    with pytest.raises(InvalidMessage, match="digest"):
        assembly.add(forged)
    # A short chunk in the middle is refused as it comes.
    short = parse_answer_chunk(dict(chunk_properties(first)), first.data[:-1])
    with pytest.raises(InvalidMessage, match="must hold"):
        AnswerAssembly(first, len(data)).add(short)


def test_unseen_lines_prints_each_line_once() -> None:
    assert unseen_lines([], ["a", "b"]) == ["a", "b"]
    assert unseen_lines(["a", "b", "c"], ["b", "c", "d"]) == ["d"]
    assert unseen_lines(["a", "b"], ["a", "b"]) == []
    assert unseen_lines(["a", "b"], ["x", "y"]) == ["x", "y"]  # a gap: all of it is new
    # The longest overlap wins when lines repeat.
    assert unseen_lines(["x", "x", "x"], ["x", "x", "x", "y"]) == ["y"]


@pytest.mark.parametrize(("elapsed", "interval"), [(60.2, 60.0), (2.1, 2.0), (0.4, 0.3)])
def test_follow_reaches_back_past_the_previous_answer_whatever_since_was(
    elapsed: float, interval: float
) -> None:
    """`logs --since 30s --follow --interval 60` asked for 30 s each time: the 30 s before
    them were never printed. The window covers the time since the previous answer came, with
    room for the time that answer took."""
    window = follow_window(elapsed, interval)
    assert window >= elapsed + interval and window <= MAX_SINCE_S


def cmd(kind: str, max_bytes: int = 4096, **kw: object) -> Command:
    return Command(
        agent_id="a1",
        command_id=str(uuid.uuid4()),
        kind=kind,
        issued_at=NOW,
        expires_at=NOW + timedelta(minutes=5),
        since_s=600,
        max_bytes=max_bytes,
        **kw,  # type: ignore[arg-type]
    )


def test_seen_ids_persist_until_their_command_expires(tmp_path: Path) -> None:
    seen = SeenCommands(tmp_path / "seen.json")
    c = cmd("logs")
    seen.add(c, NOW)
    again = SeenCommands(tmp_path / "seen.json")  # a restart
    assert c.command_id in again.ids(NOW)
    assert again.ids(c.expires_at) == set()
    (tmp_path / "bad.json").write_text('{"x": 5, "y": "not a time"')
    assert SeenCommands(tmp_path / "bad.json").ids(NOW) == set()  # damaged: starts empty


def test_answers_are_redacted_and_within_max_bytes(tmp_path: Path) -> None:
    ring = LogRing()
    logger = logging.getLogger("test-answers")
    logger.addHandler(ring)
    logger.setLevel(logging.INFO)
    try:
        for i in range(400):
            logger.info("line %d Authorization: Bearer mfc_topsecret%d", i, i)
    finally:
        logger.removeHandler(ring)
    logs = build_answer(cmd("logs", 2048), ring=ring, state_dir=tmp_path, facts={}, failures=[])
    assert 0 < len(logs.data) <= 2048 and b"topsecret" not in logs.data
    last = logs.data.decode().splitlines()[-1]
    assert "line 399 Authorization: " in last and last.endswith("[redacted]")
    bundle = build_answer(
        cmd("diagnose", 8192),
        ring=ring,
        state_dir=tmp_path,
        facts={"hostname": "h", "apiToken": "mfa_x"},
        failures=[{"model": "iris", "reason": "boom"}],
    )
    assert bundle.error is None and len(bundle.data) <= 8192
    with tarfile.open(fileobj=io.BytesIO(bundle.data)) as tar:
        names = tar.getnames()
        assert {"support/logs.txt", "support/facts.json", "support/failures.json"} <= set(names)
        facts = tar.extractfile("support/facts.json").read()  # type: ignore[union-attr]
        assert b"mfa_x" not in facts
    too_small = build_answer(
        cmd("diagnose", 1024),
        ring=ring,
        state_dir=tmp_path,
        facts={"x": os.urandom(4000).hex()},
        failures=[],
    )
    assert too_small.error and "needs more than 1024 bytes" in too_small.error


def test_counts_are_ascii_digits_only() -> None:
    chunk = answer_chunks(CID, b"abc")[0]
    props = dict(chunk_properties(chunk))
    for bad in ("²", "1²", "+3", " 3", "3.0", "0x3"):
        with pytest.raises(InvalidMessage):
            parse_answer_chunk({**props, "size": bad}, chunk.data)
