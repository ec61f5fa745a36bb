"""``modelfleet config``: set, unset and show configuration layers and what agents run."""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any
from urllib.parse import urlencode

from control_plane.cli.common import CliError, add_client_options, api_call
from control_plane.fleet.config import parse_assignment


def _scope_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True)
    scope = p.add_mutually_exclusive_group(required=True)
    scope.add_argument("--fleet", action="store_true", help="the fleet layer (every agent)")
    scope.add_argument("--selector", help="the layer of this label selector ('site=onprem')")
    scope.add_argument("--agent", help="the layer of one agent (its id)")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the configuration commands."""
    c = sub.add_parser("config", help="configuration layers of models (fleet, selector, agent)")
    csub = c.add_subparsers(dest="config_command", required=True)
    s = csub.add_parser("set", help="set keys of a layer: KEY=VALUE (VALUE as JSON, else text)")
    _scope_options(s)
    s.add_argument("assignments", nargs="+", metavar="KEY=VALUE")
    add_client_options(s)
    s.set_defaults(func=cmd_config_set)
    u = csub.add_parser("unset", help="remove keys from a layer")
    _scope_options(u)
    u.add_argument("keys", nargs="+", metavar="KEY")
    add_client_options(u)
    u.set_defaults(func=cmd_config_unset)
    g = csub.add_parser("get", help="the layers, in precedence order (lowest first)")
    g.add_argument("--model")
    add_client_options(g)
    g.set_defaults(func=cmd_config_get)
    sh = csub.add_parser("show", help="an agent's configuration per model, and what it applied")
    sh.add_argument("--agent", required=True, help="the agent's id")
    add_client_options(sh)
    sh.set_defaults(func=cmd_config_show)


def _scope(args: argparse.Namespace) -> dict[str, Any]:
    if args.fleet:
        return {"model": args.model, "scope": "fleet"}
    if args.selector is not None:
        return {"model": args.model, "scope": "selector", "selector": args.selector}
    return {"model": args.model, "scope": "agent", "agent": args.agent}


def _change(args: argparse.Namespace, body: dict[str, Any]) -> int:
    _, out = asyncio.run(api_call(args, "POST", "/config/layers", json_body=body))
    layer = out["layer"]
    if args.json:
        print(json.dumps(out, indent=2))
    elif layer is None:
        print(f"layer emptied and removed; {out['agentsChanged']} agent(s) get a new desired state")
    else:
        values = json.dumps(layer["values"], sort_keys=True)
        print(
            f"layer {layer['id']} ({_where(layer)}) of {layer['model']}: {values}; "
            f"{out['agentsChanged']} agent(s) get a new desired state"
        )
    return 0


def cmd_config_set(args: argparse.Namespace) -> int:
    """Set keys of one layer."""
    assignments = {}
    for text in args.assignments:
        try:
            key, value = parse_assignment(text)
        except ValueError as exc:
            raise CliError(str(exc)) from None
        assignments[key] = value
    return _change(args, {**_scope(args), "set": assignments})


def cmd_config_unset(args: argparse.Namespace) -> int:
    """Remove keys from one layer."""
    return _change(args, {**_scope(args), "unset": list(args.keys)})


def _where(layer: dict[str, Any]) -> str:
    if layer["scope"] == "fleet":
        where = "fleet"
    elif layer["scope"] == "agent":
        where = f"agent {layer['agent']}"
    else:
        where = f"selector {layer['selector']}"
    return where + (f", rollout {layer['rollout'][:8]}" if layer.get("rollout") else "")


def cmd_config_get(args: argparse.Namespace) -> int:
    """Print the layers."""
    query = f"?{urlencode({'model': args.model})}" if args.model else ""
    _, body = asyncio.run(api_call(args, "GET", f"/config/layers{query}"))
    if args.json:
        print(json.dumps(body, indent=2))
        return 0
    for layer in body["layers"]:
        values = json.dumps(layer["values"], sort_keys=True)
        print(f"{layer['id']:>4}  {layer['model']:<16} {_where(layer):<40} {values}")
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    """Print an agent's configuration per model."""
    _, body = asyncio.run(api_call(args, "GET", f"/config/agents/{args.agent}"))
    if args.json:
        print(json.dumps(body, indent=2))
        return 0
    print(f"agent {body['name']} ({body['agentId']})")
    for m in body["models"]:
        applied = "applied" if m["applied"] else f"agent reports {m['appliedDigest'] or 'none'}"
        print(f"  {m['model']} {m['version']}  config {m['configDigest'] or 'none'}  ({applied})")
        print(f"    {json.dumps(m['config'], sort_keys=True)}")
        if m.get("invalid"):
            print(f"    not signed (the version's defaults run): {'; '.join(m['invalid'])}")
        if m.get("failed"):
            print(f"    failed on the agent: {m['failed']}")
    return 0
