"""``modelfleet agents logs`` and ``agents diagnose``: ask an agent, wait for its answer.

Each call issues a signed command (``POST /agents/{id}/commands``, the ``agents:diagnose``
scope), waits for the agent to answer over whichever transport reaches it, checks the answer's
digest and prints or writes it. ``logs --follow`` asks again every few seconds for the lines
since the last answer and prints only those it has not printed (protocol/commands.py,
``unseen_lines``).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import math
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

from control_plane.cli.common import CliError, add_client_options, api_bytes, api_call
from protocol.commands import MAX_ANSWER_BYTES, MAX_SINCE_S, MAX_TTL, unseen_lines
from protocol.digest import sha256_digest
from protocol.exceptions import InvalidMessage
from protocol.fields import clean_text

MiB = 1024 * 1024
MAX_MEMBERS = 1000  # a bundle holds about ten
MAX_MEMBER_BYTES = 256 * 1024 * 1024
MAX_SHOWN_CHARS = 16 * 1024
FOLLOW_KEEP = 5000  # lines of the previous answer kept to recognise what was printed


def register(asub: argparse._SubParsersAction) -> None:
    """Add ``agents logs`` and ``agents diagnose`` to the ``agents`` group."""
    lg = asub.add_parser(
        "logs", help="an agent's recent log lines, redacted (MQTT or HTTP, whichever reaches it)"
    )
    lg.add_argument("id", help="the agent's id")
    lg.add_argument("--since", default="10m", help="how far back: 30s, 10m, 1h (default 10m)")
    lg.add_argument("--follow", "-f", action="store_true", help="keep printing new lines")
    lg.add_argument(
        "--interval", type=float, default=5.0, help="--follow: seconds between asks (default 5)"
    )
    lg.add_argument("--max-bytes", type=int, default=MiB, help="cap of one answer (default 1 MiB)")
    _timeout(lg)
    add_client_options(lg)
    lg.set_defaults(func=cmd_agents_logs)
    dg = asub.add_parser(
        "diagnose", help="fetch an agent's support bundle (.tar.gz: logs, facts, state, failures)"
    )
    dg.add_argument("id", help="the agent's id")
    dg.add_argument("--out", required=True, type=Path, help="where to write the .tar.gz")
    dg.add_argument("--since", default="1h", help="log lines from how far back (default 1h)")
    dg.add_argument(
        "--max-bytes", type=int, default=4 * MiB, help="cap of the bundle (default 4 MiB)"
    )
    _timeout(dg)
    add_client_options(dg)
    dg.set_defaults(func=cmd_agents_diagnose)


def _timeout(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        help="seconds to wait for the agent's answer (default 60)",
    )


def _seconds(text: str, flag: str) -> int:
    from control_plane.rollout.spec import parse_duration

    try:
        seconds = int(parse_duration(text, flag))
    except InvalidMessage as exc:
        raise CliError(str(exc)) from None
    if seconds < 1:
        raise CliError(f"{flag} must be at least 1s")
    return seconds


def _check(args: argparse.Namespace) -> None:
    if not 1024 <= args.max_bytes <= MAX_ANSWER_BYTES:
        raise CliError(f"--max-bytes must be between 1024 and {MAX_ANSWER_BYTES}")
    if not 1 <= args.timeout <= MAX_TTL.total_seconds():
        raise CliError(f"--timeout must be between 1 and {MAX_TTL.total_seconds():.0f} seconds")


async def ask(
    args: argparse.Namespace, kind: str, since_s: int, max_bytes: int
) -> tuple[dict[str, Any], bytes]:
    """Issue a command, wait up to ``args.timeout`` for its answer, return (state, answer).

    Raises CliError when the agent does not answer in time, or says it could not.
    """
    ttl = int(min(MAX_TTL.total_seconds(), max(10.0, args.timeout + 30)))
    body = {"kind": kind, "sinceSeconds": since_s, "maxBytes": max_bytes, "ttlSeconds": ttl}
    _, out = await api_call(args, "POST", f"/agents/{args.id}/commands", json_body=body, ok=(202,))
    path = f"/agents/{args.id}/commands/{out['commandId']}"
    deadline = time.monotonic() + args.timeout
    state = out
    while state["state"] in ("pending", "delivered"):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise CliError(
                f"agent {args.id} did not answer within {args.timeout:g}s (command "
                f"{out['commandId']} is {state['state']}: is the agent online?)",
                1,
            )
        _, state = await api_call(args, "GET", f"{path}?wait={min(remaining, 30):.1f}")
    if state["state"] != "answered":
        why = f": {state['error']}" if state.get("error") else ""
        raise CliError(f"agent {args.id} did not carry the command out ({state['state']}{why})", 1)
    data = await api_bytes(args, f"{path}/answer")
    if sha256_digest(data) != state["answerDigest"]:
        raise CliError("the answer does not match the digest the control plane stored", 1)
    return state, data


def _lines(data: bytes) -> list[str]:
    return data.decode("utf-8", "replace").splitlines()


def cmd_agents_logs(args: argparse.Namespace) -> int:
    """Print an agent's recent log lines; with --follow, keep printing new ones."""
    _check(args)
    if not 0.1 <= args.interval <= 3600:
        raise CliError("--interval must be between 0.1 and 3600 seconds")
    since = _seconds(args.since, "--since")
    return asyncio.run(_logs(args, since))


async def _logs(args: argparse.Namespace, since: int) -> int:
    _, data = await ask(args, "logs", since, args.max_bytes)
    shown = _lines(data)
    _print_lines(args, shown)
    while args.follow:
        sys.stdout.flush()
        asked = time.monotonic()
        await asyncio.sleep(args.interval)
        window = follow_window(time.monotonic() - asked, args.interval)
        _, data = await ask(args, "logs", window, args.max_bytes)
        current = _lines(data)
        new = unseen_lines(shown, current)
        _print_lines(args, new)
        shown = (shown + new)[-FOLLOW_KEEP:]
    return 0


def follow_window(elapsed_s: float, interval_s: float) -> int:
    """How far back ``--follow``'s next ask reaches: past the previous answer (``elapsed_s``
    since it came, plus the interval and 10 s for the time it took to come), so no line falls
    between two answers; what overlaps is printed once (``unseen_lines``). Not capped by
    ``--since``, which is only the first answer's window: an interval longer than it would
    have skipped the lines between."""
    return min(MAX_SINCE_S, math.ceil(elapsed_s + interval_s + 10))


def _print_lines(args: argparse.Namespace, lines: list[str]) -> None:
    if args.json:
        print(json.dumps({"lines": lines}))  # JSON escapes control characters itself
    else:
        for line in lines:
            print(_shown(line))


def _shown(text: str) -> str:
    """What an agent sent, safe for the operator's terminal: its control characters (escape
    sequences that retitle, clear or rewrite the screen, carriage returns) replaced."""
    return clean_text(text, MAX_SHOWN_CHARS)


def _members(data: bytes) -> tuple[list[tuple[str, int]], bool]:
    """The bundle's members (name, size), at most MAX_MEMBERS and while their sizes add up to
    at most MAX_MEMBER_BYTES: an agent's tar of a million headers, or of a member that inflates
    to gigabytes, must not hold the operator's CLI. True when the listing was cut short.
    Raises tarfile.TarError."""
    out: list[tuple[str, int]] = []
    total = 0
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        while (member := tar.next()) is not None:
            total += max(member.size, 0)
            if len(out) == MAX_MEMBERS or total > MAX_MEMBER_BYTES:
                return out, True
            out.append((member.name, member.size))
    return out, False


def cmd_agents_diagnose(args: argparse.Namespace) -> int:
    """Fetch an agent's support bundle into --out; print its size and members."""
    _check(args)
    since = _seconds(args.since, "--since")
    state, data = asyncio.run(ask(args, "diagnose", since, args.max_bytes))
    try:
        members, cut = _members(data)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise CliError(f"the agent's bundle is not a .tar.gz: {exc}", 1) from None
    try:
        args.out.write_bytes(data)
    except OSError as exc:
        raise CliError(f"--out {args.out}: {exc.strerror}") from None
    if args.json:
        doc = {
            **state,
            "out": str(args.out),
            "members": [{"name": n, "size": z} for n, z in members],
            "membersCut": cut,
        }
        print(json.dumps(doc, indent=2))
        return 0
    via = state["answeredVia"]
    print(f"wrote {args.out}: {len(data):,} bytes via {via}, {state['answerDigest']}")
    for name, size in members:
        print(f"  {size:>9,}  {_shown(name)}")
    if cut:
        print(f"  (more members not listed: over {MAX_MEMBERS} or {MAX_MEMBER_BYTES:,} bytes)")
    return 0
