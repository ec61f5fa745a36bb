"""``modelfleet agent install``: config, keys, enrollment and the systemd unit, idempotently.

``deploy/install-agent.sh`` creates the system user and the virtualenv, installs the package,
then runs this from that virtualenv. Every path lives under ``--root`` (``/`` on a real box; a
temporary directory in tests). A second run upgrades in place and keeps identity, state and the
existing agent.toml.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from agent.enrollment import enroll_into
from agent.host.facts import gather_facts
from agent.host.units import GPU_DROP_IN, render_agent_unit
from agent.settings import load_file
from agent.storage.state import StateDir
from agent.storage.statefile import write_atomic
from agent.tls import client_context
from protocol.labels import parse_labels

USER = "modelfleet"
UNIT = "modelfleet-agent.service"


@dataclass(frozen=True, kw_only=True)
class InstallOptions:
    """What ``agent install`` was asked for (agent/cli.py reads them from its flags)."""

    root: Path = Path("/")  # install prefix: "/" on a real box, a temporary directory in tests
    venv: str = "/opt/modelfleet/venv"  # the virtualenv, under root
    server: str | None = None  # the control plane's URL (a first install needs it)
    token: str | None = None  # an enrollment token (a first install needs it)
    name: str | None = None
    labels: str = ""
    serve: str = "127.0.0.1:8510"
    trust_publisher: tuple[Path, ...] = ()
    cost_per_hour: float | None = None
    gpu: bool = False  # add the drop-in for /dev/nvidia*
    start: bool = True  # on a real root: enable and (re)start the unit

    @property
    def real(self) -> bool:
        """Whether this installs into the machine itself (systemctl, chown) or a prefix."""
        return self.root.resolve() == Path("/")


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


def render_config(layout: Layout, opts: InstallOptions, keys: list[Path]) -> str:
    """agent.toml for a fresh install."""
    lines = [
        "# modelfleet agent: written by `modelfleet agent install`; edit and `systemctl reload",
        "# modelfleet-agent` (SIGHUP) to apply trusted keys, intervals and limits.",
        f"state_dir = {_quote(str(layout.state))}",
        f"serve = {_quote(opts.serve)}",
        "trust_publisher = [" + ", ".join(_quote(str(k)) for k in keys) + "]",
        "heartbeat = 15",
        "",
        "[enroll]",
        f"server = {_quote(opts.server or '')}",
        f"token = {_quote(opts.token or '')}",
        f"labels = {_quote(opts.labels)}",
    ]
    if opts.name:
        lines.append(f"name = {_quote(opts.name)}")
    return "\n".join(lines) + "\n"


def _owner() -> tuple[int, int] | None:
    try:
        pw = pwd.getpwnam(USER)
    except KeyError:
        return None
    return pw.pw_uid, pw.pw_gid


def _systemctl(*args: str) -> None:
    subprocess.run(["systemctl", *args], check=True)


def install(opts: InstallOptions) -> str:
    """Install or upgrade; return a summary. Raises AgentError or ValueError."""
    layout = Layout(opts.root, opts.venv)
    real = opts.real
    for d, mode in ((layout.etc, 0o750), (layout.publishers, 0o755), (layout.state, 0o700)):
        d.mkdir(parents=True, exist_ok=True)
        d.chmod(mode)
    keys = []
    for src in opts.trust_publisher:
        dest = layout.publishers / src.name
        shutil.copyfile(src, dest)
        dest.chmod(0o644)
        keys.append(dest)
    first = not layout.config.exists()
    if first:
        if not opts.server or not opts.token:
            raise ValueError("a first install needs --server and --token")
        parse_labels(opts.labels)
        keys = keys or sorted(layout.publishers.glob("*.pub"))
        write_atomic(layout.config, render_config(layout, opts, keys).encode(), 0o600)
    settings = load_file(layout.config)
    state = StateDir(Path(settings.get("state_dir", layout.state)))
    enrolled = state.identity_path.exists()
    if not enrolled:
        table = settings.get("enroll", {})
        facts = gather_facts()
        if opts.cost_per_hour is not None:
            facts["costPerHour"] = opts.cost_per_hour
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
    if opts.gpu:
        write_atomic(layout.drop_in, GPU_DROP_IN.encode(), 0o644)
    owner = _owner() if real else None
    if owner is not None:
        for path in (layout.state, *layout.state.rglob("*")):
            os.chown(path, *owner)
        os.chown(layout.etc, 0, owner[1])
        os.chown(layout.config, *owner)
    if real and opts.start:
        _systemctl("daemon-reload")
        _systemctl("enable", UNIT)
        _systemctl("restart", UNIT)
    identity = state.load_identity()
    what = "installed" if first else "upgraded in place"
    return f"{what}: agent {identity.agent_id} ({identity.name}); config {layout.config}"


def uninstall(opts: InstallOptions, *, purge: bool = False) -> str:
    """Remove the unit and the virtualenv; state and config stay unless ``purge``."""
    layout = Layout(opts.root, opts.venv)
    if opts.real and layout.unit.exists():
        subprocess.run(["systemctl", "disable", "--now", UNIT], check=False)
    layout.unit.unlink(missing_ok=True)
    if layout.drop_in.exists():
        shutil.rmtree(layout.drop_in.parent)
    if layout.opt.exists() and layout.opt.name == "modelfleet":
        shutil.rmtree(layout.opt)
    if purge:
        shutil.rmtree(layout.state, ignore_errors=True)
        shutil.rmtree(layout.etc, ignore_errors=True)
        return "uninstalled and purged state and configuration"
    return f"uninstalled; state kept in {layout.state}, configuration in {layout.etc}"
