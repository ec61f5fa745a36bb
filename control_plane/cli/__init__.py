"""The ``modelfleet`` command line.

Groups of commands live beside the code they drive; packages other than the control plane
(the agent) add theirs through the ``modelfleet.cli`` entry point group, so this package never
imports them.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points

from control_plane.cli import config, operate, publish, security, serve, sim, webhook
from control_plane.cli.common import CliError
from control_plane.errors import ConfigError
from control_plane.security import redact

Command = Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    """The whole parser, with plug-in groups."""
    parser = argparse.ArgumentParser(
        prog="modelfleet", description="Deploy signed ML models to a mixed fleet."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve.register(sub)
    publish.register(sub)
    operate.register(sub)
    config.register(sub)
    security.register(sub)
    sim.register(sub)
    webhook.register(sub)
    for ep in entry_points(group="modelfleet.cli"):
        ep.load()(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    redact.install()  # no secret in any log line, whoever writes it
    if not args.verbose:
        # Alembic narrates every migration step and plugin at INFO; keep only its warnings.
        logging.getLogger("alembic").setLevel(logging.WARNING)
    func: Command = args.func
    try:
        return func(args)
    except KeyboardInterrupt:
        return 130
    except CliError as exc:
        print(f"modelfleet: error: {exc}", file=sys.stderr)
        return exc.code
    except ConfigError as exc:  # settings, a backup refused, ...: the input, named
        print(f"modelfleet: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
