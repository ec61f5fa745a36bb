"""The systemd unit of the agent, rendered for an install prefix.

``deploy/systemd/modelfleet-agent.service`` is this template rendered for ``/``; a test keeps
the two identical.
"""

from __future__ import annotations

AGENT_UNIT = """\
[Unit]
Description=modelfleet agent: signed ML model bundles, served locally
Documentation=https://github.com/modelfleet/modelfleet
Wants=network-online.target
After=network-online.target

[Service]
Type=notify
NotifyAccess=main
ExecStart={venv}/bin/modelfleet agent run --config {etc}/agent.toml
ExecReload=/bin/kill -HUP $MAINPID
User=modelfleet
Group=modelfleet
Restart=on-failure
RestartSec=5s
WatchdogSec=30s
TimeoutStopSec=30s
KillMode=mixed
StateDirectory=modelfleet
StateDirectoryMode=0700
ConfigurationDirectory=modelfleet
ConfigurationDirectoryMode=0750
Environment=PYTHONUNBUFFERED=1

# Hardening: the agent needs its state directory, outbound TCP and a loopback port.
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
ProtectProc=invisible
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
MemoryDenyWriteExecute=no
RemoveIPC=yes
UMask=0077
CapabilityBoundingSet=
AmbientCapabilities=
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallFilter=~@privileged
SystemCallErrorNumber=EPERM

[Install]
WantedBy=multi-user.target
"""

# For GPU nodes: /etc/systemd/system/modelfleet-agent.service.d/gpu.conf
GPU_DROP_IN = """\
# GPU nodes: let the agent open the NVIDIA devices (the CUDA execution provider needs them).
[Service]
PrivateDevices=no
DeviceAllow=/dev/nvidiactl rw
DeviceAllow=/dev/nvidia-uvm rw
DeviceAllow=/dev/nvidia-uvm-tools rw
DeviceAllow=char-nvidia-frontend rw
DeviceAllow=char-nvidia-uvm rw
DevicePolicy=closed
SupplementaryGroups=video render
"""


def render_agent_unit(venv: str = "/opt/modelfleet/venv", etc: str = "/etc/modelfleet") -> str:
    """The unit with its paths."""
    return AGENT_UNIT.format(venv=venv, etc=etc)
