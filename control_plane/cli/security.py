"""Security commands over REST: API tokens with scopes, and the audit log's verification."""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

from control_plane.cli.common import CliError, add_client_options, api_call
from control_plane.security.scopes import SCOPES


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``token`` and ``audit``."""
    t = sub.add_parser("token", help="operator API tokens with scopes")
    tsub = t.add_subparsers(dest="token_command", required=True)
    c = tsub.add_parser("create", help="create a token and print its secret (shown once)")
    c.add_argument("--name", required=True)
    c.add_argument(
        "--scope", action="append", required=True, choices=SCOPES, help="repeat for several scopes"
    )
    c.add_argument("--ttl", type=float, help="seconds until it expires (default: never)")
    add_client_options(c)
    c.set_defaults(func=cmd_token_create)
    ls = tsub.add_parser("list", help="every token, without secrets")
    add_client_options(ls)
    ls.set_defaults(func=cmd_token_list)
    rv = tsub.add_parser("revoke", help="revoke a token at once")
    rv.add_argument("id", type=int)
    add_client_options(rv)
    rv.set_defaults(func=cmd_token_revoke)

    a = sub.add_parser("audit", help="the hash-chained audit log")
    asub = a.add_subparsers(dest="audit_command", required=True)
    v = asub.add_parser("verify", help="check that no audit row was edited or deleted")
    v.add_argument("--expect-head", help="a head hash recorded earlier: the chain must reach it")
    add_client_options(v)
    v.set_defaults(func=cmd_audit_verify)
    al = asub.add_parser("list", help="print audit events")
    al.add_argument("--after", type=int, default=0, help="events after this id")
    al.add_argument("--limit", type=int, default=100)
    add_client_options(al)
    al.set_defaults(func=cmd_audit_list)


def cmd_token_create(args: argparse.Namespace) -> int:
    """Create an API token and print it."""
    body: dict[str, Any] = {"name": args.name, "scopes": args.scope}
    if args.ttl is not None:
        body["ttlSeconds"] = args.ttl
    _, out = asyncio.run(api_call(args, "POST", "/tokens", json_body=body))
    print(json.dumps(out, indent=2) if args.json else out["token"])
    return 0


def cmd_token_list(args: argparse.Namespace) -> int:
    """List API tokens."""
    _, out = asyncio.run(api_call(args, "GET", "/tokens"))
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    for t in out["tokens"]:
        print(
            f"{t['id']:>4}  {t['state']:<8} {t['name']:<24} {','.join(t['scopes'])}"
            + (f"  expires {t['expiresAt']}" if t["expiresAt"] else "")
        )
    return 0


def cmd_token_revoke(args: argparse.Namespace) -> int:
    """Revoke an API token."""
    _, out = asyncio.run(api_call(args, "DELETE", f"/tokens/{args.id}"))
    print(json.dumps(out, indent=2) if args.json else f"token {out['id']} revoked")
    return 0


async def _all_events(args: argparse.Namespace) -> tuple[list[dict[str, Any]], str]:
    events: list[dict[str, Any]] = []
    after, head = 0, ""
    while True:
        _, page = await api_call(args, "GET", f"/audit?after={after}&limit=1000")
        events += page["events"]
        head = page["head"]
        if len(page["events"]) < 1000:
            return events, head
        after = page["events"][-1]["id"]


def cmd_audit_verify(args: argparse.Namespace) -> int:
    """Walk the whole chain; exit 1 when it is broken or does not reach --expect-head."""
    from control_plane.security.audit import verify  # SQLAlchemy stays out of the agent's process

    events, _ = asyncio.run(_all_events(args))
    v = verify(events)
    if not v.ok:
        raise CliError(f"audit log BROKEN at event {v.broken_at}: {v.reason}", 1)
    if args.expect_head and args.expect_head not in {e["hash"] for e in events}:
        raise CliError(
            f"audit log does not contain the expected head {args.expect_head}: "
            "rows were deleted from its end",
            1,
        )
    out = {"ok": True, "events": v.count, "head": v.head}
    print(json.dumps(out) if args.json else f"audit log intact: {v.count} events, head {v.head}")
    return 0


def cmd_audit_list(args: argparse.Namespace) -> int:
    """Print audit events."""
    if args.limit < 1:
        raise CliError("--limit must be at least 1")
    _, out = asyncio.run(
        api_call(args, "GET", f"/audit?after={args.after}&limit={min(args.limit, 1000)}")
    )
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    for e in out["events"]:
        print(
            f"{e['id']:>6} {e['at']} {e['outcome']} {e['actor']:<40} {e['action']} "
            f"from {e['remote']}"
        )
    return 0
