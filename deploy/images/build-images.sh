#!/usr/bin/env bash
# Build the product images from the wheel of this checkout:
#   modelfleet-control-plane:VERSION and modelfleet-agent:VERSION (also tagged :latest)
# The build context holds wheels only (the checkout's own in app/, its dependencies in deps/,
# made here with pip from whatever package index pip is set up for), so `docker build` needs no
# network. BASE (default python:3.11-slim) is the image to build on: on a machine with no
# registry, `BASE=$(deploy/images/build-base.sh | sed -n 's/^base=//p')`.
# Prints `control_plane=IMAGE` and `agent=IMAGE`.
#   [BASE=IMAGE] [PIP=.venv/bin/pip] deploy/images/build-images.sh
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
BASE=${BASE:-python:3.11-slim}
PIP=${PIP:-$ROOT/.venv/bin/pip}
DOCKER=${DOCKER:-docker}
[ -x "$PIP" ] || PIP="python3 -m pip"

CTX=$(mktemp -d "${TMPDIR:-/tmp}/modelfleet-images.XXXXXX")
trap 'rm -rf "$CTX"' EXIT
mkdir -p "$CTX/app" "$CTX/deps"
# The checkout's wheel is built from a copy, so the build leaves nothing in the checkout.
SRC=$CTX/src
mkdir -p "$SRC"
(cd "$ROOT" && cp -r pyproject.toml README.md protocol control_plane agent migrations "$SRC/")
find "$SRC" -name __pycache__ -prune -exec rm -rf {} +
$PIP wheel --quiet --no-deps --wheel-dir "$CTX/app" "$SRC" >&2
WHEEL=$(ls "$CTX"/app/*.whl)
$PIP wheel --quiet --wheel-dir "$CTX/deps" "$WHEEL" >&2
rm -f "$CTX"/deps/modelfleet-*.whl
cp "$HERE/agent-entrypoint.sh" "$CTX/"
VERSION=$(basename "$WHEEL" | cut -d- -f2)

export DOCKER_BUILDKIT=${DOCKER_BUILDKIT:-0}  # the legacy builder: no buildx plugin needed
for image in control-plane agent; do
  "$DOCKER" build --quiet --build-arg "BASE=$BASE" --label "modelfleet.image=$image" \
    -f "$HERE/$image.Dockerfile" -t "modelfleet-$image:$VERSION" -t "modelfleet-$image:latest" \
    "$CTX" >&2
done
# Each build of a new wheel leaves the previous image untagged: drop ours, nobody else's.
"$DOCKER" image prune --force --filter label=modelfleet.image >/dev/null
echo "control_plane=modelfleet-control-plane:$VERSION"
echo "agent=modelfleet-agent:$VERSION"
