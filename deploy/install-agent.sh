#!/usr/bin/env bash
# Install (or upgrade, or remove) the modelfleet agent as a systemd service. Run as root.
#
#   install-agent.sh --server URL --token TOKEN [--labels site=onprem,hw=cpu] [--name NAME]
#                    [--serve 127.0.0.1:8510] [--trust-publisher FILE]... [--gpu]
#                    [--wheel FILE | --wheelhouse DIR] [--python python3] [--root DIR]
#   install-agent.sh --uninstall [--purge] [--root DIR]
#
# It creates the system user `modelfleet`, a virtualenv in /opt/modelfleet/venv, installs the
# agent (a wheel file, a wheelhouse directory for air-gapped sites, or the package index), then
# `modelfleet agent install` writes /etc/modelfleet/agent.toml, enrolls once and enables
# modelfleet-agent.service. Running it again upgrades in place and keeps identity and state.
# --root DIR installs under a prefix instead of / (tests); --no-user skips the user there.
set -euo pipefail

ROOT=/
PYTHON=python3
WHEEL=""
WHEELHOUSE=""
UNINSTALL=0
NO_USER=0
PASS=()

die() { echo "install-agent: $*" >&2; exit 2; }

while [ $# -gt 0 ]; do
  case "$1" in
    --root) ROOT="${2:?--root needs a directory}"; shift 2 ;;
    --python) PYTHON="${2:?--python needs an interpreter}"; shift 2 ;;
    --wheel) WHEEL="${2:?--wheel needs a file}"; shift 2 ;;
    --wheelhouse) WHEELHOUSE="${2:?--wheelhouse needs a directory}"; shift 2 ;;
    --no-user) NO_USER=1; shift ;;
    --uninstall) UNINSTALL=1; PASS+=("$1"); shift ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) PASS+=("$1"); shift ;;
  esac
done

ROOT="$(mkdir -p "$ROOT" && cd "$ROOT" && pwd)"
if [ "$ROOT" = / ]; then
  [ "$(id -u)" = 0 ] || die "run as root (or pass --root DIR)"
  [ "$NO_USER" = 0 ] || die "--no-user only goes with --root"
fi
VENV="$ROOT/opt/modelfleet/venv"

if [ "$UNINSTALL" = 1 ]; then
  if [ -x "$VENV/bin/modelfleet" ]; then
    "$VENV/bin/modelfleet" agent install --root "$ROOT" "${PASS[@]}"
  fi
  rm -rf "$ROOT/opt/modelfleet"
  exit 0
fi

[ -n "$WHEEL" ] && [ ! -f "$WHEEL" ] && die "--wheel $WHEEL: no such file"
[ -n "$WHEELHOUSE" ] && [ ! -d "$WHEELHOUSE" ] && die "--wheelhouse $WHEELHOUSE: no such directory"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || die "$PYTHON is older than Python 3.11"

if [ "$ROOT" = / ] && ! id modelfleet >/dev/null 2>&1; then
  useradd --system --home-dir /var/lib/modelfleet --no-create-home \
    --shell /usr/sbin/nologin modelfleet
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade)
if [ -n "$WHEELHOUSE" ]; then
  "${PIP[@]}" --no-index --find-links "$WHEELHOUSE" "${WHEEL:-modelfleet[tflite]}"
elif [ -n "$WHEEL" ]; then
  "${PIP[@]}" "$WHEEL"
else
  "${PIP[@]}" "modelfleet[tflite]"
fi

exec "$VENV/bin/modelfleet" agent install --root "$ROOT" "${PASS[@]}"
