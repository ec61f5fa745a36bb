#!/usr/bin/env bash
# Build modelfleet's base images from Debian's packages, with no image registry:
#   modelfleet-base:bookworm-HASH           Debian bookworm + Python 3.11 (python3, venv)
#   modelfleet-test-services:bookworm-HASH  the same + PostgreSQL 15 + Mosquitto 2.0, whose
#                                           entry point mimics postgres:16 / eclipse-mosquitto:2
# Each is a debootstrap root filesystem turned into an image by `docker import`. HASH is a
# content hash of everything that goes in (this script, the entry point, suite, mirror, package
# lists), so a run whose inputs have not changed finds its images and builds nothing; the
# un-hashed tags (modelfleet-base:bookworm, ...) point at the latest build.
# Prints `base=IMAGE` and `services=IMAGE`. Needs root (debootstrap), docker and debootstrap.
#   deploy/images/build-base.sh [--print-only]
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
SUITE=bookworm
MIRROR=${MODELFLEET_DEBIAN_MIRROR:-http://deb.debian.org/debian}
BASE_PACKAGES=python3,python3-venv,ca-certificates
SERVICES_PACKAGES=$BASE_PACKAGES,postgresql,mosquitto
DOCKER=${DOCKER:-docker}

HASH=$( { cat "$0" "$HERE/services-entrypoint.sh"; echo "$SUITE $MIRROR"; } \
  | sha256sum | cut -c1-12)
BASE=modelfleet-base:$SUITE-$HASH
SERVICES=modelfleet-test-services:$SUITE-$HASH
if [ "${1:-}" = --print-only ]; then
  echo "base=$BASE"; echo "services=$SERVICES"; exit 0
fi

have() { "$DOCKER" image inspect "$1" >/dev/null 2>&1; }

# One build at a time on a machine (parallel test workers all ask for the images).
LOCK=${TMPDIR:-/tmp}/modelfleet-build-base.lock
exec 9>"$LOCK"
flock 9

# build TAG PACKAGES CHANGES...: debootstrap into a temporary root, then docker import.
build() {
  local tag=$1 packages=$2; shift 2
  local root
  root=$(mktemp -d "${TMPDIR:-/var/tmp}/modelfleet-rootfs.XXXXXX")
  trap 'rm -rf "$root"' RETURN
  echo "build-base: debootstrap $SUITE with $packages" >&2
  debootstrap --variant=minbase --include="$packages" "$SUITE" "$root" "$MIRROR" >&2
  # Leave no package lists or caches in the image: they are large and stale at once.
  rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/* "$root"/usr/share/doc/* \
    "$root"/usr/share/man/* "$root"/usr/share/locale/*
  if [ -x "$root/usr/sbin/mosquitto" ]; then
    install -m 0755 "$HERE/services-entrypoint.sh" "$root/usr/local/bin/services-entrypoint"
    # The layout of eclipse-mosquitto:2, so one container spec serves both images.
    mkdir -p "$root"/mosquitto/{config,data,log}
    chroot "$root" chown -R mosquitto: /mosquitto
  fi
  local args=()
  for change in "$@"; do args+=(--change "$change"); done
  tar -C "$root" --numeric-owner -c . | "$DOCKER" import "${args[@]}" - "$tag" >/dev/null
  echo "build-base: imported $tag" >&2
}

ENV_PATH='ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'
have "$BASE" || build "$BASE" "$BASE_PACKAGES" "$ENV_PATH" 'ENV LANG=C.UTF-8' 'CMD ["python3"]'
have "$SERVICES" || build "$SERVICES" "$SERVICES_PACKAGES" "$ENV_PATH" 'ENV LANG=C.UTF-8' \
  'ENTRYPOINT ["/usr/local/bin/services-entrypoint"]' 'CMD ["postgres"]' \
  'ENV PGDATA=/var/lib/postgresql/data'
"$DOCKER" tag "$BASE" "modelfleet-base:$SUITE"
"$DOCKER" tag "$SERVICES" "modelfleet-test-services:$SUITE"
echo "base=$BASE"
echo "services=$SERVICES"
