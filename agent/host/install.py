"""``modelfleet agent install``: config, keys, enrollment and the systemd unit, idempotently.

``deploy/install-agent.sh`` creates the system user and the virtualenv, installs the package,
then runs this from that virtualenv. Every path lives under ``--root`` (``/`` on a real box; a
temporary directory in tests). A second run upgrades in place and keeps identity, state and the
existing agent.toml.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pwd
import shutil
import subprocess
import sys
from pathlib import Path

from agent.enrollment import enroll_into
from agent.exceptions import AgentError
from agent.host.facts import gather_facts
from agent.host.units import GPU_DROP_IN, render_agent_unit
from agent.settings import load_file
from agent.storage.state import StateDir
from agent.storage.statefile import write_atomic
from agent.tls import client_context
from protocol.exceptions import InvalidMessage
from protocol.labels import parse_labels

USER = "modelfleet"
UNIT = "modelfleet-agent.service"


def register_install(asub: argparse._SubParsersAction) -> None:
    """Add ``agent install``."""
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


class Layout:
    """Where everything goes under a root."""

    def __init__(self, root: Path, venv: str) -> None:
        self.root = root
        self.etc = root / "etc/modelfleet"
        self.config = self.etc / "agent.toml"
        self.publishers = self.etc / "publishers"
        self.state = root / "var/lib/modelfleet"
        self.unit = root / "etc/systemd/system" / UNIT
        self.drop_in = root / "etc/systemd/system" / f"{UNIT}.d" / "gpu.conf"
        self.venv = root / venv.lstrip("/")
        self.opt = self.venv.parent


def _quote(value: str) -> str:
    """A TOML basic string."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_config(layout: Layout, args: argparse.Namespace, keys: list[Path]) -> str:
    """agent.toml for a fresh install."""
    lines = [
        "# modelfleet agent: written by `modelfleet agent install`; edit and `systemctl reload",
        "# modelfleet-agent` (SIGHUP) to apply trusted keys, intervals and limits.",
        f"state_dir = {_quote(str(layout.state))}",
        f"serve = {_quote(args.serve)}",
        "trust_publisher = [" + ", ".join(_quote(str(k)) for k in keys) + "]",
        "heartbeat = 15",
        "",
        "[enroll]",
        f"server = {_quote(args.server)}",
        f"token = {_quote(args.token)}",
        f"labels = {_quote(args.labels)}",
    ]
    if args.name:
        lines.append(f"name = {_quote(args.name)}")
    return "\n".join(lines) + "\n"


def _owner() -> tuple[int, int] | None:
    try:
        pw = pwd.getpwnam(USER)
    except KeyError:
        return None
    return pw.pw_uid, pw.pw_gid


def _systemctl(*args: str) -> None:
    subprocess.run(["systemctl", *args], check=True)


def install(args: argparse.Namespace) -> str:
    """Install or upgrade; return a summary. Raises AgentError or ValueError."""
    layout = Layout(args.root, args.venv)
    real = args.root.resolve() == Path("/")
    for d, mode in ((layout.etc, 0o750), (layout.publishers, 0o755), (layout.state, 0o700)):
        d.mkdir(parents=True, exist_ok=True)
        d.chmod(mode)
    keys = []
    for src in args.trust_publisher:
        dest = layout.publishers / src.name
        shutil.copyfile(src, dest)
        dest.chmod(0o644)
        keys.append(dest)
    first = not layout.config.exists()
    if first:
        if not args.server or not args.token:
            raise ValueError("a first install needs --server and --token")
        parse_labels(args.labels)
        keys = keys or sorted(layout.publishers.glob("*.pub"))
        write_atomic(layout.config, render_config(layout, args, keys).encode(), 0o600)
    settings = load_file(layout.config)
    state = StateDir(Path(settings.get("state_dir", layout.state)))
    enrolled = state.identity_path.exists()
    if not enrolled:
        table = settings.get("enroll", {})
        facts = gather_facts()
        if args.cost_per_hour is not None:
            facts["costPerHour"] = args.cost_per_hour
        labels = parse_labels(table.get("labels", ""))
        tls = client_context(
            settings.get("ca"), settings.get("client_cert"), settings.get("client_key")
        )
        asyncio.run(
            enroll_into(
                state,
                server=table["server"],
                token=table["token"],
                name=table.get("name"),
                labels=labels,
                facts=facts,
                ssl_context=tls,
            )
        )
    write_atomic(layout.unit, render_agent_unit(str(layout.venv), str(layout.etc)).encode(), 0o644)
    if args.gpu:
        write_atomic(layout.drop_in, GPU_DROP_IN.encode(), 0o644)
    owner = _owner() if real else None
    if owner is not None:
        for path in (layout.state, *layout.state.rglob("*")):
            os.chown(path, *owner)
        os.chown(layout.etc, 0, owner[1])
        os.chown(layout.config, *owner)
    if real and not args.no_start:
        _systemctl("daemon-reload")
        _systemctl("enable", UNIT)
        _systemctl("restart", UNIT)
    identity = state.load_identity()
    what = "installed" if first else "upgraded in place"
    return f"{what}: agent {identity.agent_id} ({identity.name}); config {layout.config}"


def uninstall(args: argparse.Namespace) -> str:
    """Remove the unit and the virtualenv; state and config stay unless --purge."""
    layout = Layout(args.root, args.venv)
    if args.root.resolve() == Path("/") and layout.unit.exists():
        subprocess.run(["systemctl", "disable", "--now", UNIT], check=False)
    layout.unit.unlink(missing_ok=True)
    if layout.drop_in.exists():
        shutil.rmtree(layout.drop_in.parent)
    if layout.opt.exists() and layout.opt.name == "modelfleet":
        shutil.rmtree(layout.opt)
    if args.purge:
        shutil.rmtree(layout.state, ignore_errors=True)
        shutil.rmtree(layout.etc, ignore_errors=True)
        return "uninstalled and purged state and configuration"
    return f"uninstalled; state kept in {layout.state}, configuration in {layout.etc}"


def cmd_install(args: argparse.Namespace) -> int:
    """Install, upgrade or uninstall."""
    if args.purge and not args.uninstall:
        print("modelfleet: error: --purge goes with --uninstall", file=sys.stderr)
        return 2
    if args.root.resolve() == Path("/") and os.geteuid() != 0:
        print("modelfleet: error: installing to / needs root", file=sys.stderr)
        return 2
    try:
        print(uninstall(args) if args.uninstall else install(args))
    except (AgentError, ValueError, InvalidMessage, KeyError) as exc:
        print(f"modelfleet: error: {exc}", file=sys.stderr)
        return 1
    except subprocess.CalledProcessError as exc:
        print(f"modelfleet: error: {' '.join(exc.cmd)} failed ({exc.returncode})", file=sys.stderr)
        return 1
    return 0
