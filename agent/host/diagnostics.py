"""What an agent sends when an operator asks (protocol/commands.py): recent logs and a support
bundle, redacted and size-capped.

What is a secret, and how it is masked, is protocol/redaction.py's, shared with the control
plane's log filter: log lines and text are redacted by shape; in state files, the values of
keys that name a secret are replaced whole.

- :class:`LogRing` is a logging handler that keeps the newest records (bounded by count and
  bytes), redacted as they arrive;
- :func:`support_bundle` builds a ``.tar.gz`` of logs, facts, host figures (disk, memory,
  load), the last failures and the state files, cut to a byte budget (the oldest log lines go
  first), never holding a secret. A state file is read only when it is a regular file (a
  symlink is not followed, a FIFO or device not opened: the directory is hostile input).
"""

from __future__ import annotations

import collections
import errno
import io
import json
import logging
import os
import shutil
import stat
import tarfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from protocol.redaction import redact, redact_json

# State files worth a look, by name; key material (private keys) is never read.
STATE_FILES = ("identity.json", "state.json", "keyset.json", "control-plane.pub", "status-epoch")
MAX_STATE_FILE = 256 * 1024
MAX_LINE_CHARS = 8192


class LogRing(logging.Handler):
    """The newest log records as redacted lines, at most ``max_lines`` and ``max_bytes``."""

    def __init__(self, *, max_lines: int = 5000, max_bytes: int = 2 * 1024 * 1024) -> None:
        super().__init__(level=logging.DEBUG)
        self.max_bytes = max_bytes
        self._lines: collections.deque[tuple[float, str]] = collections.deque(maxlen=max_lines)
        self._bytes = 0
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            # Cut before redacting too: a huge record costs no more than a long line.
            line = redact(self.format(record)[: 8 * MAX_LINE_CHARS])[:MAX_LINE_CHARS]
        except Exception:  # a logging handler must never raise into the caller
            self.handleError(record)
            return
        if len(self._lines) == self._lines.maxlen:
            self._bytes -= len(self._lines[0][1])
        self._lines.append((record.created, line))
        self._bytes += len(line)
        while self._bytes > self.max_bytes and self._lines:
            self._bytes -= len(self._lines.popleft()[1])

    def lines(self, since_s: float, now: float | None = None) -> list[str]:
        """Lines logged within the last ``since_s`` seconds, oldest first."""
        cutoff = (time.time() if now is None else now) - since_s
        return [line for at, line in list(self._lines) if at >= cutoff]


def capped_lines(lines: list[str], max_bytes: int) -> list[str]:
    """The newest lines that fit in ``max_bytes`` (with their newlines), oldest first."""
    out: list[str] = []
    used = 0
    for line in reversed(lines):
        used += len(line.encode()) + 1
        if used > max_bytes:
            break
        out.append(line)
    out.reverse()
    return out


def host_figures(state_dir: Path) -> dict[str, Any]:
    """Disk of the state directory, memory and load of the host (what can be read here)."""
    out: dict[str, Any] = {}
    try:
        du = shutil.disk_usage(state_dir)
        out["disk"] = {"path": str(state_dir), "totalBytes": du.total, "freeBytes": du.free}
    except OSError as exc:
        out["disk"] = {"error": str(exc)}
    try:
        mem = {}
        for line in Path("/proc/meminfo").read_text().splitlines()[:40]:
            key, _, rest = line.partition(":")
            if key in ("MemTotal", "MemAvailable", "SwapTotal", "SwapFree"):
                mem[key] = int(rest.split()[0]) * 1024
        out["memoryBytes"] = mem
    except (OSError, ValueError, IndexError):
        out["memoryBytes"] = None
    try:
        out["loadAverage"] = list(os.getloadavg())
    except OSError:
        out["loadAverage"] = None
    return out


def _read_regular(path: Path, limit: int) -> bytes | None:
    """Up to ``limit`` bytes of a regular file; None when missing. Raises ValueError for
    anything else (a symlink, a FIFO, a device): the state directory is hostile input, and a
    link to a private key or /etc/shadow must not be followed, a FIFO must not block."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # O_NOFOLLOW on a symlink
            raise ValueError("not a regular file (a symlink): left out") from None
        return None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise ValueError("not a regular file: left out")
        return f.read(limit)


def _state_file(path: Path) -> bytes | None:
    try:
        data = _read_regular(path, MAX_STATE_FILE + 1)
    except ValueError as exc:
        return f"({exc})\n".encode()
    except OSError:
        return None
    if data is None:
        return None
    if len(data) > MAX_STATE_FILE:
        return f"(over {MAX_STATE_FILE} bytes: left out)\n".encode()
    if path.suffix == ".json":
        try:
            doc = json.loads(data)
        except ValueError:
            return redact(data.decode("utf-8", "replace")).encode()
        return (json.dumps(redact_json(doc), indent=2, sort_keys=True) + "\n").encode()
    return redact(data.decode("utf-8", "replace")).encode()


def support_bundle(
    *,
    state_dir: Path,
    log_lines: list[str],
    facts: Mapping[str, Any],
    failures: Iterable[Mapping[str, Any]],
    max_bytes: int,
    now: float | None = None,
) -> bytes:
    """A ``.tar.gz`` of the agent's diagnostics within ``max_bytes``: a missing state file is
    left out, the log is cut from its oldest lines to fit. Raises ValueError when even without
    a log it would be over ``max_bytes``."""
    mtime = int(time.time() if now is None else now)
    fixed: dict[str, bytes] = {
        "facts.json": (
            json.dumps(redact_json(dict(facts)), indent=2, sort_keys=True) + "\n"
        ).encode(),
        "host.json": (
            json.dumps(host_figures(state_dir), indent=2, sort_keys=True) + "\n"
        ).encode(),
        "failures.json": (
            json.dumps(redact_json(list(failures)), indent=2, sort_keys=True) + "\n"
        ).encode(),
    }
    for name in STATE_FILES:
        data = _state_file(state_dir / name)
        if data is not None:
            fixed[f"state/{name}"] = data
    budget = max_bytes - sum(len(v) + 1024 for v in fixed.values()) - 2048
    # Redacted again: lines may come from elsewhere than a LogRing (a journal, a file).
    logs = capped_lines([redact(line) for line in log_lines], max(budget, 0))
    while True:
        members = {**fixed, "logs.txt": ("\n".join(logs) + "\n").encode() if logs else b""}
        data = _tar_gz(members, mtime)
        if len(data) <= max_bytes:
            return data
        if not logs:
            raise ValueError(f"a support bundle needs more than {max_bytes} bytes")
        logs = logs[len(logs) // 4 + 1 :]  # over after compression headers: drop the oldest


def _tar_gz(members: Mapping[str, bytes], mtime: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in sorted(members.items()):
            info = tarfile.TarInfo(f"support/{name}")
            info.size = len(data)
            info.mtime = mtime
            info.mode = 0o600
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()
