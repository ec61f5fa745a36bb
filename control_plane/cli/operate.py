"""Operator commands over REST: push, enroll-token, rollout, agents, models."""

from __future__ import annotations

import argparse
import asyncio
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from control_plane.cli.common import CliError, add_client_options, api_call
from protocol.bundle import MEDIA_TYPE
from protocol.exceptions import InvalidMessage
from protocol.labels import parse_labels
from protocol.timeutil import parse_time


def register(sub: argparse._SubParsersAction) -> None:
    """Add the operator commands."""
    p = sub.add_parser("push", help="upload a bundle to the control plane")
    p.add_argument("bundle", type=Path)
    add_client_options(p)
    p.set_defaults(func=cmd_push)

    et = sub.add_parser("enroll-token", help="enrollment tokens")
    etsub = et.add_subparsers(dest="et_command", required=True)
    c = etsub.add_parser("create", help="create a token and print it")
    c.add_argument("--labels", default="", help="labels granted to agents, k=v,k2=v2")
    c.add_argument("--max-uses", type=int, default=1)
    c.add_argument("--ttl", type=float, default=24 * 3600, help="seconds until it expires")
    add_client_options(c)
    c.set_defaults(func=cmd_enroll_token_create)

    r = sub.add_parser("rollout", help="rollouts")
    rsub = r.add_subparsers(dest="rollout_command", required=True)
    rc = rsub.add_parser("create", help="roll a version out to the agents a selector matches")
    rc.add_argument("--model", required=True)
    rc.add_argument("--version", required=True)
    rc.add_argument("--selector", default="", help="k=v,k2=v2 (empty: every agent)")
    rc.add_argument(
        "--rollback", action="store_true",
        help="allow agents to go down to this version (they refuse a lower one otherwise)",
    )  # fmt: skip
    add_client_options(rc)
    rc.set_defaults(func=cmd_rollout_create)
    rs = rsub.add_parser("status", help="show a rollout")
    rs.add_argument("id")
    add_client_options(rs)
    rs.set_defaults(func=cmd_rollout_status)

    a = sub.add_parser("agents", help="agents")
    asub = a.add_subparsers(dest="agents_command", required=True)
    al = asub.add_parser("list", help="table of agents and their models")
    add_client_options(al)
    al.set_defaults(func=cmd_agents_list)

    m = sub.add_parser("models", help="models")
    msub = m.add_subparsers(dest="models_command", required=True)
    ml = msub.add_parser("list", help="models and versions")
    add_client_options(ml)
    ml.set_defaults(func=cmd_models_list)


def _print(args: argparse.Namespace, body: Any, text: str) -> None:
    print(json.dumps(body, indent=2) if args.json else text)


def cmd_push(args: argparse.Namespace) -> int:
    """Upload a bundle."""
    try:
        data = args.bundle.read_bytes()
    except OSError as exc:
        raise CliError(f"{args.bundle}: {exc.strerror}") from None
    status, body = asyncio.run(
        api_call(args, "POST", "/bundles", data=data, content_type=MEDIA_TYPE)
    )
    what = "pushed" if status == 201 else "already present"
    _print(args, body, f"{what}: {body['name']} {body['version']} ({body['manifestDigest']})")
    return 0


def cmd_enroll_token_create(args: argparse.Namespace) -> int:
    """Create an enrollment token and print it."""
    try:
        labels = parse_labels(args.labels)
    except InvalidMessage as exc:
        raise CliError(f"--labels: {exc}") from None
    body = {"labels": labels, "maxUses": args.max_uses, "ttlSeconds": args.ttl}
    _, out = asyncio.run(api_call(args, "POST", "/enrollment-tokens", json_body=body))
    _print(args, out, out["token"])
    return 0


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    lines = [
        "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in [header, *rows]
    ]
    return "\n".join(lines)


def _ago(ts: str | None) -> str:
    if not ts:
        return "never"
    secs = (datetime.now(UTC) - parse_time(ts, "lastSeen")).total_seconds()
    return f"{secs:.0f}s ago" if secs < 120 else f"{secs / 60:.0f}m ago"


def format_agents(agents: list[dict[str, Any]]) -> str:
    """The fleet table."""
    rows = []
    for a in agents:
        labels = ",".join(f"{k}={v}" for k, v in sorted(a["labels"].items())) or "-"
        models = (
            ", ".join(f"{m['name']} {m['version']} {m['state']}" for m in a.get("models", []))
            or "-"
        )
        seen = _ago(a.get("lastSeen")) + ("" if a.get("online") else " (offline)")
        rows.append([a["id"][:8], a["name"], labels, seen, models])
    return _table(rows, ["ID", "NAME", "LABELS", "LAST SEEN", "MODELS"])


def cmd_agents_list(args: argparse.Namespace) -> int:
    """Print the fleet table."""
    _, body = asyncio.run(api_call(args, "GET", "/agents"))
    _print(args, body, format_agents(body["agents"]))
    return 0


def cmd_models_list(args: argparse.Namespace) -> int:
    """Print models."""
    _, body = asyncio.run(api_call(args, "GET", "/models"))
    rows = [[m["name"], str(m["versions"]), m["latest"] or "-"] for m in body["models"]]
    _print(args, body, _table(rows, ["MODEL", "VERSIONS", "LATEST"]))
    return 0


def format_rollout(r: dict[str, Any]) -> str:
    """A readable view of one rollout."""
    p = r["progress"]
    sel = ",".join(f"{k}={v}" for k, v in sorted(r["selector"].items())) or "(every agent)"
    lines = [
        f"rollout {r['id']}",
        f"  {r['model']} {r['version']} -> {sel}",
        f"  state: {r['state']}   active {p['active']}/{p['targets']}",
    ]
    for t in r["targets"]:
        reason = f"  ({t['reason']})" if t.get("reason") else ""
        lines.append(f"    {t['agentId'][:8]} {t['name']}: {t['state']}{reason}")
    return "\n".join(lines)


def cmd_rollout_create(args: argparse.Namespace) -> int:
    """Create a rollout and print its id."""
    body = {
        "model": args.model,
        "version": args.version,
        "selector": args.selector,
        "rollback": args.rollback,
    }
    _, out = asyncio.run(api_call(args, "POST", "/rollouts", json_body=body))
    _print(args, out, out["id"])
    return 0


def cmd_rollout_status(args: argparse.Namespace) -> int:
    """Show a rollout."""
    _, out = asyncio.run(api_call(args, "GET", f"/rollouts/{args.id}"))
    _print(args, out, format_rollout(out))
    return 0
