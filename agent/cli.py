"""``modelfleet agent enroll`` and ``modelfleet agent run``; registered as a plug-in group."""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from agent.config import AgentConfig
from agent.enrollment import enroll_into
from agent.exceptions import AgentConfigError, AgentError
from agent.host.facts import gather_facts
from agent.settings import SETTINGS, load_file, merge, parse_rate, to_config
from agent.storage.state import StateDir
from agent.tls import client_context
from protocol.exceptions import InvalidMessage
from protocol.labels import check_labels, parse_labels


def register(sub: argparse._SubParsersAction) -> None:
    """Add the agent group to the ``modelfleet`` parser."""
    a = sub.add_parser("agent", help="run an agent on this machine")
    asub = a.add_subparsers(dest="agent_command", required=True)

    e = asub.add_parser("enroll", help="enroll with a control plane (once)")
    e.add_argument("--config", type=Path, help="agent.toml; its [enroll] table fills the rest")
    e.add_argument("--server")
    e.add_argument("--token", help="enrollment token")
    e.add_argument("--state-dir", type=Path)
    e.add_argument("--name")
    e.add_argument("--labels", help="k=v,k2=v2")
    e.add_argument("--cost-per-hour", type=float, help="declared hourly cost of this machine")
    _tls_options(e)
    e.set_defaults(func=cmd_enroll)

    r = asub.add_parser("run", help="run the agent daemon")
    r.add_argument("--config", type=Path, help="agent.toml (re-read on SIGHUP)")
    r.add_argument("--state-dir", type=Path)
    r.add_argument("--serve", help="HOST:PORT of the inference API (default 127.0.0.1:8510)")
    r.add_argument("--trust-publisher", type=Path, action="append", default=[], metavar="FILE")
    r.add_argument("--heartbeat", type=float, help="seconds between heartbeats (15)")
    r.add_argument("--poll-wait", type=float, help="long-poll seconds (30)")
    r.add_argument("--metrics-interval", type=float, help="seconds per metrics batch (10)")
    r.add_argument(
        "--metrics-ack-timeout",
        type=float,
        help="resend a batch sent over MQTT the control plane has not acknowledged "
        "after this many seconds (30)",
    )
    r.add_argument(
        "--max-download-rate",
        type=_rate,
        metavar="RATE",
        help="bytes per second for all downloads, e.g. 500k or 20M",
    )
    r.add_argument(
        "--download-min-rate",
        type=_rate,
        metavar="RATE",
        help="abandon (and resume) a download slower than this on average (16k)",
    )
    r.add_argument("--max-concurrent-downloads", type=int, help="(2)")
    r.add_argument("--disk-budget-mb", type=float, help="cap on the blob store's size")
    r.add_argument(
        "--memory-limit-mb",
        type=float,
        help="memory the loaded models may take together; a version that would not fit beside "
        "those loaded is refused with the figures",
    )
    r.add_argument(
        "--keep-versions", type=int, help="old versions kept on disk per model for rollback (1)"
    )
    r.add_argument(
        "--health-window", type=float, help="seconds a new version is watched after activation (60)"
    )
    r.add_argument("--health-max-error-rate", type=float, help="(0.2)")
    r.add_argument(
        "--no-cuda", action="store_true", default=None, help="never use the CUDA provider"
    )
    r.add_argument("--mqtt", help="broker URL, mqtt://host:1883 (default: from enrollment)")
    r.add_argument("--mqtt-ca", help="CA file to verify an mqtts:// broker")
    r.add_argument(
        "--bundle-transport",
        choices=("http", "mqtt", "auto"),
        help="where blobs come from (http; auto: MQTT when HTTP fails)",
    )
    r.add_argument(
        "--poll-interval",
        type=float,
        help="seconds between HTTP polls while MQTT is connected (300)",
    )
    r.add_argument(
        "--otlp-endpoint",
        metavar="URL",
        help="export traces and metrics over OTLP/HTTP to this collector base URL (the otel "
        "extra; also OTEL_EXPORTER_OTLP_ENDPOINT, with OTEL_SERVICE_NAME and "
        "OTEL_RESOURCE_ATTRIBUTES)",
    )
    r.add_argument(
        "--otlp-interval",
        type=float,
        metavar="SECONDS",
        help="export metrics (and send finished spans) at least this often (10)",
    )
    r.add_argument(
        "--otlp-inference-sample",
        type=float,
        metavar="FRACTION",
        help="trace this fraction of inference requests, as children of a request's "
        "traceparent header when it has one (0: none)",
    )
    r.add_argument(
        "--added-latency-ms",
        type=float,
        help="demos and tests: delay every inference this much (a slower machine)",
    )
    limits = r.add_argument_group("inference limits and the serve port's connections")
    limits.add_argument(
        "--max-request-mb", type=float, help="largest inference request body, MiB (64); larger: 413"
    )
    limits.add_argument(
        "--max-request-elements",
        type=int,
        help="most values in one request, all inputs together (8388608); "
        "more: 413 before any array is built",
    )
    limits.add_argument(
        "--max-response-elements",
        type=int,
        help="most values in one answer (8388608); more: 413, not encoded",
    )
    limits.add_argument(
        "--max-large-requests",
        type=int,
        help="requests with big bodies or answers handled at once (1); "
        "the others wait, small requests never do",
    )
    limits.add_argument(
        "--header-timeout", type=float, help="seconds for a request's headers to arrive (10)"
    )
    limits.add_argument(
        "--keepalive-timeout", type=float, help="seconds an idle connection is kept open (15)"
    )
    limits.add_argument(
        "--body-timeout",
        type=float,
        help="seconds for a request body to arrive, or an answer to be sent (60)",
    )
    limits.add_argument(
        "--max-connections", type=int, help="open connections to the serve port (256); more: 503"
    )
    g = r.add_argument_group("gRPC Open Inference Protocol (the grpc extra)")
    g.add_argument("--grpc", metavar="HOST:PORT", help="serve gRPC OIP there (default: off)")
    g.add_argument(
        "--grpc-token-file",
        metavar="FILE",
        help="bearer tokens (one a line) a gRPC call must carry one of (default: none asked)",
    )
    g.add_argument("--grpc-cert", metavar="PEM", help="TLS certificate of the gRPC port")
    g.add_argument("--grpc-key", metavar="PEM", help="its private key")
    g.add_argument(
        "--grpc-client-ca", metavar="PEM", help="ask gRPC clients for certificates it signed"
    )
    access = r.add_argument_group("access to the inference port (health probes stay open)")
    access.add_argument(
        "--serve-token-file",
        help="file of bearer tokens, one a line; requests must carry one of them",
    )
    access.add_argument("--serve-cert", help="serve HTTPS with this certificate")
    access.add_argument("--serve-key", help="the certificate's private key")
    access.add_argument(
        "--serve-client-ca", help="mutual TLS: clients must present a certificate signed by this CA"
    )
    _tls_options(r)
    r.set_defaults(func=cmd_run)

    i = asub.add_parser("import", help="install a signed bundle with no route to the control plane")
    i.add_argument("bundle", type=Path)
    i.add_argument("--config", type=Path)
    i.add_argument("--state-dir", type=Path)
    i.add_argument("--trust-publisher", type=Path, action="append", default=[], metavar="FILE")
    i.set_defaults(func=cmd_import)

    rc = asub.add_parser(
        "rotate-credential", help="get a new credential from the control plane (no downtime)"
    )
    rc.add_argument("--config", type=Path)
    rc.add_argument("--state-dir", type=Path)
    _tls_options(rc)
    rc.set_defaults(func=cmd_rotate_credential)

    p = asub.add_parser("install", help="install this agent as a systemd service (run as root)")
    p.add_argument("--root", type=Path, default=Path("/"), help="install prefix (tests)")
    p.add_argument("--venv", default="/opt/modelfleet/venv", help="the virtualenv, under root")
    p.add_argument("--server", help="control plane URL")
    p.add_argument("--token", help="enrollment token")
    p.add_argument("--name")
    p.add_argument("--labels", default="")
    p.add_argument("--serve", default="127.0.0.1:8510")
    p.add_argument("--trust-publisher", type=Path, action="append", default=[], metavar="FILE")
    p.add_argument("--cost-per-hour", type=float)
    p.add_argument("--gpu", action="store_true", help="add the drop-in for /dev/nvidia*")
    p.add_argument("--no-start", action="store_true", help="write everything, start nothing")
    p.add_argument("--uninstall", action="store_true")
    p.add_argument("--purge", action="store_true", help="with --uninstall: state and config too")
    p.set_defaults(func=cmd_install)


def _tls_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ca", help="CA file that signed an https:// control plane's certificate")
    p.add_argument("--client-cert", help="client certificate for mutual TLS")
    p.add_argument("--client-key", help="its private key")


def _rate(text: str) -> float:
    try:
        return parse_rate(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _fail(message: str, code: int = 1) -> int:
    print(f"modelfleet: error: {message}", file=sys.stderr)
    return code


def _file_settings(path: Path | None) -> dict[str, Any]:
    return load_file(path) if path is not None else {}


def cmd_enroll(args: argparse.Namespace) -> int:
    """Enroll and write the identity to the state dir."""
    try:
        file = _file_settings(args.config)
    except AgentConfigError as exc:
        return _fail(str(exc), 2)
    table = file.get("enroll", {})
    server = args.server or table.get("server")
    token = args.token or table.get("token")
    state_dir = args.state_dir or file.get("state_dir")
    name = args.name or table.get("name")
    labels_text = args.labels if args.labels is not None else table.get("labels", "")
    for flag, value in (("--server", server), ("--token", token), ("--state-dir", state_dir)):
        if not value:
            return _fail(f"{flag} is required (or set it in --config)", 2)
    try:
        if isinstance(labels_text, dict):
            labels = check_labels({str(k): str(v) for k, v in labels_text.items()})
        else:
            labels = parse_labels(labels_text)
    except InvalidMessage as exc:
        return _fail(f"labels: {exc}", 2)
    dirs = StateDir(Path(state_dir))
    if dirs.identity_path.exists():
        return _fail(f"{state_dir} already holds an enrolled agent", 2)
    facts = gather_facts()
    if args.cost_per_hour is not None:
        if args.cost_per_hour < 0:
            return _fail("--cost-per-hour must be >= 0", 2)
        facts["costPerHour"] = args.cost_per_hour
    try:
        tls = client_context(
            args.ca or file.get("ca"),
            args.client_cert or file.get("client_cert"),
            args.client_key or file.get("client_key"),
        )
        identity = asyncio.run(
            enroll_into(
                dirs,
                server=server,
                token=token,
                name=name,
                labels=labels,
                facts=facts,
                ssl_context=tls,
            )
        )
    except AgentError as exc:
        return _fail(str(exc))
    print(identity.agent_id)
    return 0


def _cli_settings(args: argparse.Namespace) -> dict[str, Any]:
    return {name: getattr(args, name, None) for name in SETTINGS}


def cmd_run(args: argparse.Namespace) -> int:
    """Run the daemon."""
    failpoints = tuple(filter(None, os.environ.get("MODELFLEET_FAILPOINTS", "").split(",")))
    cli = _cli_settings(args)

    def build() -> AgentConfig:
        return to_config(merge(cli, _file_settings(args.config)), failpoints, os.environ)

    try:
        config = build()
    except AgentConfigError as exc:
        return _fail(str(exc), 2)
    from agent.server import run_agent  # here: loading the runtimes is this command's alone

    try:
        asyncio.run(run_agent(config, build if args.config else None))
    except (AgentError, ValueError) as exc:
        return _fail(str(exc))
    return 0


def cmd_rotate_credential(args: argparse.Namespace) -> int:
    """Ask for a new credential, write it to identity.json; the daemon takes it on SIGHUP.

    The old credential keeps working until the new one is first used, so a running agent is
    never locked out, whichever order things happen in.
    """
    from agent.client import rotate_credential
    from agent.storage.statefile import write_json

    try:
        s = merge(_cli_settings(args), _file_settings(args.config))
        if s["state_dir"] is None:
            return _fail("--state-dir is required (or set state_dir in --config)", 2)
        dirs = StateDir(Path(s["state_dir"]))
        ident = dirs.load_identity()
        tls = client_context(s["ca"], s["client_cert"], s["client_key"])
        new = asyncio.run(rotate_credential(ident.server, ident.credential, ident.agent_id, tls))
        write_json(dirs.identity_path, {**asdict(ident), "credential": new})
    except AgentError as exc:
        return _fail(str(exc))
    print("credential rotated; reload the agent (systemctl reload modelfleet-agent) to use it")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    """Verify a bundle against the agent's trusted publishers and install it offline."""
    from agent.storage.offline import import_bundle

    try:
        s = merge(_cli_settings(args), _file_settings(args.config))
        if s["state_dir"] is None:
            return _fail("--state-dir is required (or set state_dir in --config)", 2)
        name, version = import_bundle(
            Path(s["state_dir"]), args.bundle, tuple(Path(p) for p in s["trust_publisher"])
        )
    except AgentError as exc:
        return _fail(str(exc))
    print(f"imported {name} {version}: the agent serves it at its next start or SIGHUP")
    return 0


def cmd_install(args: argparse.Namespace) -> int:
    """Install, upgrade or uninstall (agent/host/install.py does the work)."""
    from agent.host.install import InstallOptions, install, uninstall

    if args.purge and not args.uninstall:
        return _fail("--purge goes with --uninstall", 2)
    opts = InstallOptions(
        root=args.root,
        venv=args.venv,
        server=args.server,
        token=args.token,
        name=args.name,
        labels=args.labels,
        serve=args.serve,
        trust_publisher=tuple(args.trust_publisher),
        cost_per_hour=args.cost_per_hour,
        gpu=args.gpu,
        start=not args.no_start,
    )
    if opts.real and os.geteuid() != 0:
        return _fail("installing to / needs root", 2)
    try:
        print(uninstall(opts, purge=args.purge) if args.uninstall else install(opts))
    except (AgentError, ValueError, InvalidMessage, KeyError) as exc:
        return _fail(str(exc))
    except subprocess.CalledProcessError as exc:
        return _fail(f"{' '.join(exc.cmd)} failed ({exc.returncode})")
    except OSError as exc:  # a --trust-publisher file or the prefix: unreadable, unwritable
        return _fail(f"{exc.filename or args.root}: {exc.strerror}")
    return 0
