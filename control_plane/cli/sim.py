"""``modelfleet sim``: run the fleet simulator against a control plane and print one JSON line."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from control_plane.cli.common import CliError
from control_plane.sim.fleet import SimError, SimOptions, simulate
from protocol.labels import parse_labels

SERVER_HELP = (
    "control plane URL; several, comma-separated, spread the agents over replicas (an agent "
    "fails over to the next one when its own does not answer)"
)


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``modelfleet sim``."""
    p = sub.add_parser("sim", help="simulate a fleet of agents against a control plane")
    p.add_argument("--server", required=True, help=SERVER_HELP)
    p.add_argument("--token", required=True, help="an operator API token")
    p.add_argument("--agents", type=int, required=True)
    p.add_argument("--transport", choices=("http", "mqtt"), default="http")
    p.add_argument("--mqtt", help="broker URL (default: the one enrollment hands out)")
    p.add_argument("--labels", default="site=sim")
    p.add_argument("--rollout", metavar="MODEL:VERSION")
    p.add_argument("--no-shared-cache", action="store_true")
    p.add_argument("--offline", type=float, default=0.0, help="fraction never connecting")
    p.add_argument("--slow", type=float, default=0.0, help="fraction reporting late")
    p.add_argument("--failing", type=float, default=0.0, help="fraction reporting failure")
    p.add_argument("--status-interval", type=float, default=15.0)
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument(
        "--stages",
        help="stages of the rollout, as for `rollout create` "
        "(10%%:30s,50%%:30s,100%%); default one stage of 100%%",
    )
    p.add_argument(
        "--processes",
        type=int,
        default=1,
        help="worker processes sharing the agents (use every core)",
    )
    p.set_defaults(func=cmd_sim)


def cmd_sim(args: argparse.Namespace) -> int:
    """Run the simulation and print one JSON line; exit 0 only if every agent converged."""
    if args.agents < 1:
        raise CliError("--agents must be at least 1")
    for name in ("offline", "slow", "failing"):
        if not 0 <= getattr(args, name) <= 1:
            raise CliError(f"--{name} must be a fraction between 0 and 1")
    if args.rollout and ":" not in args.rollout:
        raise CliError("--rollout takes MODEL:VERSION")
    stages = None
    if args.stages:
        from control_plane.rollout.spec import parse_stages_text
        from protocol.exceptions import InvalidMessage

        try:
            stages = parse_stages_text(args.stages)
        except InvalidMessage as exc:
            raise CliError(f"--stages: {exc}") from None
    if not 1 <= args.processes <= 256 or args.processes > args.agents:
        raise CliError("--processes must be between 1 and the number of agents")
    for url in args.server.split(","):
        if not url.strip().startswith(("http://", "https://")):
            raise CliError(f"--server takes http(s):// URLs, got {url.strip()!r}")
    opts = SimOptions(
        server=args.server.rstrip("/"),
        token=args.token,
        agents=args.agents,
        transport=args.transport,
        mqtt=args.mqtt,
        labels=parse_labels(args.labels),
        shared_cache=not args.no_shared_cache,
        offline=args.offline,
        slow=args.slow,
        failing=args.failing,
        status_interval_s=args.status_interval,
        timeout_s=args.timeout,
        processes=args.processes,
        stages=stages,
    )
    try:
        out = asyncio.run(simulate(opts, args.rollout))
    except SimError as exc:
        print(f"modelfleet sim: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(out))
    sys.stdout.flush()
    return 0 if out.get("converged", True) else 1
