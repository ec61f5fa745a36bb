"""``modelfleet agent enroll`` and ``modelfleet agent run``; registered as a plug-in group."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

from agent.client import enroll
from agent.config import AgentConfig
from agent.exceptions import AgentError
from agent.facts import gather_facts
from agent.state import Identity, StateDir
from protocol.exceptions import InvalidMessage
from protocol.labels import parse_labels

log = logging.getLogger("modelfleet.agent")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the agent group to the ``modelfleet`` parser."""
    a = sub.add_parser("agent", help="run an agent on this machine")
    asub = a.add_subparsers(dest="agent_command", required=True)

    e = asub.add_parser("enroll", help="enroll with a control plane")
    e.add_argument("--server", required=True)
    e.add_argument("--token", required=True, help="enrollment token")
    e.add_argument("--state-dir", type=Path, required=True)
    e.add_argument("--name")
    e.add_argument("--labels", default="", help="k=v,k2=v2")
    e.set_defaults(func=cmd_enroll)

    r = asub.add_parser("run", help="run the agent daemon")
    r.add_argument("--state-dir", type=Path, required=True)
    r.add_argument("--serve", default="127.0.0.1:8510", help="HOST:PORT of the inference API")
    r.add_argument("--trust-publisher", type=Path, action="append", default=[], metavar="FILE")
    r.add_argument("--heartbeat", type=float, default=15.0, help="seconds between heartbeats")
    r.add_argument("--poll-wait", type=float, default=30.0, help="long-poll seconds")
    r.add_argument("--metrics-interval", type=float, default=10.0, help="seconds per batch")
    r.add_argument(
        "--max-download-rate",
        type=_rate,
        metavar="RATE",
        help="bytes per second for all downloads, e.g. 500k or 20M",
    )
    r.add_argument("--max-concurrent-downloads", type=int, default=2)
    r.add_argument("--disk-budget-mb", type=float, help="cap on the blob store's size")
    r.add_argument(
        "--keep-versions",
        type=int,
        default=1,
        help="old versions kept on disk per model for rollback",
    )
    r.add_argument(
        "--health-window",
        type=float,
        default=60.0,
        help="seconds a new version is watched after activation",
    )
    r.add_argument("--health-max-error-rate", type=float, default=0.2)
    r.add_argument("--no-cuda", action="store_true", help="never use the CUDA provider")
    r.set_defaults(func=cmd_run)


def _rate(text: str) -> float:
    """Parse ``500k``, ``20M``, ``1G`` or plain bytes per second."""
    mult = {"k": 1e3, "m": 1e6, "g": 1e9}.get(text[-1:].lower(), 1.0)
    number = text[:-1] if mult != 1.0 else text
    try:
        value = float(number) * mult
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a rate: {text!r} (try 500k or 20M)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("the rate must be positive")
    return value


def _fail(message: str, code: int = 1) -> int:
    print(f"modelfleet: error: {message}", file=sys.stderr)
    return code


def cmd_enroll(args: argparse.Namespace) -> int:
    """Enroll and write the identity to the state dir."""
    try:
        labels = parse_labels(args.labels)
    except InvalidMessage as exc:
        return _fail(f"--labels: {exc}", 2)
    dirs = StateDir(args.state_dir)
    if dirs.identity_path.exists():
        return _fail(f"{args.state_dir} already holds an enrolled agent", 2)
    try:
        out = asyncio.run(enroll(args.server, args.token, args.name, labels, gather_facts()))
        identity = Identity(
            agent_id=out["agentId"],
            server=args.server,
            credential=out["credential"],
            name=out["name"],
            labels=out["labels"],
        )
        dirs.save_enrollment(identity, out["controlPlaneKey"], out.get("trustedPublishers", []))
    except AgentError as exc:
        return _fail(str(exc))
    except (KeyError, TypeError) as exc:
        return _fail(f"the control plane's enrollment answer lacks {exc}")
    print(identity.agent_id)
    return 0


def _serve_address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"--serve must be HOST:PORT, got {text!r}")
    return host, int(port)


async def run_agent(config: AgentConfig) -> None:
    """Run until SIGINT/SIGTERM, then drain and stop; a second signal exits at once."""
    from agent.daemon import Agent

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        if stop.is_set():
            os._exit(1)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    async with Agent(config):
        await stop.wait()
        log.info("stopping: draining in-flight requests")


def cmd_run(args: argparse.Namespace) -> int:
    """Run the daemon."""
    try:
        host, port = _serve_address(args.serve)
    except ValueError as exc:
        return _fail(str(exc), 2)
    for name in ("heartbeat", "poll_wait", "metrics_interval", "health_window",
                 "max_concurrent_downloads"):  # fmt: skip
        if getattr(args, name) <= 0:
            return _fail(f"--{name.replace('_', '-')} must be positive", 2)
    if args.keep_versions < 0:
        return _fail("--keep-versions must be 0 or more", 2)
    if not 0 <= args.health_max_error_rate <= 1:
        return _fail("--health-max-error-rate must be between 0 and 1", 2)
    failpoints = tuple(filter(None, os.environ.get("MODELFLEET_FAILPOINTS", "").split(",")))
    config = AgentConfig(
        state_dir=args.state_dir,
        serve_host=host,
        serve_port=port,
        trusted_publisher_files=tuple(args.trust_publisher),
        heartbeat_s=args.heartbeat,
        poll_wait_s=args.poll_wait,
        metrics_interval_s=args.metrics_interval,
        max_download_rate=args.max_download_rate,
        max_concurrent_downloads=args.max_concurrent_downloads,
        disk_budget_bytes=int(args.disk_budget_mb * 1024 * 1024) if args.disk_budget_mb else None,
        keep_versions=args.keep_versions,
        health_window_s=args.health_window,
        health_max_error_rate=args.health_max_error_rate,
        allow_cuda=not args.no_cuda,
        failpoints=failpoints,
    )
    try:
        asyncio.run(run_agent(config))
    except (AgentError, ValueError) as exc:
        return _fail(str(exc))
    return 0
