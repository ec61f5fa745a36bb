"""``modelfleet webhook``: endpoints that receive signed events, and their delivery logs."""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any
from urllib.parse import quote, urlencode

from control_plane.cli.common import add_client_options, api_call


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``webhook create/list/delete/deliveries``."""
    w = sub.add_parser("webhook", help="webhook endpoints and their deliveries")
    wsub = w.add_subparsers(dest="webhook_command", required=True)
    c = wsub.add_parser("create", help="add an endpoint; prints its id and signing secret")
    c.add_argument("--url", required=True, help="http(s) URL that receives the POSTs")
    c.add_argument(
        "--event",
        action="append",
        required=True,
        metavar="TYPE",
        help="event type or pattern, repeatable: 'rollout.*', agent.offline, "
        "activation.failed, keyset.changed, '*'",
    )
    c.add_argument("--description", default="")
    add_client_options(c)
    c.set_defaults(func=cmd_webhook_create)
    ls = wsub.add_parser("list", help="endpoints and their deliveries by state")
    add_client_options(ls)
    ls.set_defaults(func=cmd_webhook_list)
    d = wsub.add_parser("delete", help="remove an endpoint and its delivery log")
    d.add_argument("id")
    add_client_options(d)
    d.set_defaults(func=cmd_webhook_delete)
    dl = wsub.add_parser("deliveries", help="an endpoint's delivery log, newest first")
    dl.add_argument("id")
    dl.add_argument("--state", choices=("pending", "delivered", "failed"))
    dl.add_argument("--limit", type=int, default=20)
    add_client_options(dl)
    dl.set_defaults(func=cmd_webhook_deliveries)


def _print(args: argparse.Namespace, body: Any, text: str) -> None:
    print(json.dumps(body, indent=2) if args.json else text)


def cmd_webhook_create(args: argparse.Namespace) -> int:
    """Create an endpoint; print its id and secret (shown this once)."""
    body = {"url": args.url, "events": args.event}
    if args.description:
        body["description"] = args.description
    _, out = asyncio.run(api_call(args, "POST", "/webhooks", json_body=body))
    _print(
        args,
        out,
        f"id: {out['id']}\nsecret: {out['secret']}\n"
        "(the secret signs every delivery: X-Modelfleet-Signature: sha256=<hex HMAC-SHA256 of "
        "the body>; it is not shown again)",
    )
    return 0


def cmd_webhook_list(args: argparse.Namespace) -> int:
    """Print the endpoints."""
    _, out = asyncio.run(api_call(args, "GET", "/webhooks"))
    rows = [["ID", "EVENTS", "URL", "DELIVERIES"]]
    for w in out["webhooks"]:
        counts = ",".join(f"{k}={v}" for k, v in sorted(w["deliveries"].items())) or "-"
        rows.append([w["id"], ",".join(w["events"]), w["url"], counts])
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    text = "\n".join(
        "  ".join(c.ljust(n) for c, n in zip(r, widths, strict=True)).rstrip() for r in rows
    )
    _print(args, out, text)
    return 0


def cmd_webhook_delete(args: argparse.Namespace) -> int:
    """Delete an endpoint."""
    _, out = asyncio.run(api_call(args, "DELETE", f"/webhooks/{quote(args.id, safe='')}"))
    _print(args, out, f"deleted {out['id']} ({out['url']})")
    return 0


def cmd_webhook_deliveries(args: argparse.Namespace) -> int:
    """Print an endpoint's delivery log."""
    query = {"limit": str(args.limit), **({"state": args.state} if args.state else {})}
    path = f"/webhooks/{quote(args.id, safe='')}/deliveries?{urlencode(query)}"
    _, out = asyncio.run(api_call(args, "GET", path))
    lines = []
    for d in out["deliveries"]:
        last = d["lastError"] or (f"HTTP {d['lastStatus']}" if d["lastStatus"] else "-")
        lines.append(
            f"{d['id']:>6}  {d['type']:<22} {d['state']:<9} attempts={d['attempts']}  "
            f"last={last}  at={d['createdAt']}"
        )
    _print(args, out, "\n".join(lines) or "no deliveries")
    return 0
