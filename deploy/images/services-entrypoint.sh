#!/bin/sh
# Entry point of the local test-services image. It answers the same interface as the official
# images, so a test or the compose file switches between them by image name alone:
#   `postgres [ARGS]`  like postgres:16 (POSTGRES_USER, POSTGRES_PASSWORD, POSTGRES_DB,
#                      POSTGRES_HOST_AUTH_METHOD, data in $PGDATA)
#   anything else      run as given, e.g. `mosquitto -c /mosquitto/config/mosquitto.conf`
#                      like eclipse-mosquitto:2
set -eu
if [ "${1:-}" != postgres ]; then
  exec "$@"
fi
shift
BIN=/usr/lib/postgresql/15/bin
PGDATA=${PGDATA:-/var/lib/postgresql/data}
USER_NAME=${POSTGRES_USER:-postgres}
mkdir -p "$PGDATA" /var/run/postgresql
chown postgres:postgres "$PGDATA" /var/run/postgresql
chmod 700 "$PGDATA"
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  METHOD=${POSTGRES_HOST_AUTH_METHOD:-scram-sha-256}
  PWFILE=/var/run/postgresql/pwfile
  printf '%s\n' "${POSTGRES_PASSWORD:-}" > "$PWFILE"
  chown postgres "$PWFILE"
  PW_ARG=""
  [ -n "${POSTGRES_PASSWORD:-}" ] && PW_ARG="--pwfile=$PWFILE"
  runuser -u postgres -- "$BIN/initdb" -D "$PGDATA" -U "$USER_NAME" --auth-local=trust \
    --auth-host="$METHOD" $PW_ARG >/dev/null
  rm -f "$PWFILE"
  echo "host all all all $METHOD" >> "$PGDATA/pg_hba.conf"
  if [ -n "${POSTGRES_DB:-}" ] && [ "$POSTGRES_DB" != postgres ]; then
    runuser -u postgres -- "$BIN/postgres" --single -D "$PGDATA" postgres \
      <<SQL >/dev/null
CREATE DATABASE "$POSTGRES_DB" OWNER "$USER_NAME";
SQL
  fi
fi
exec runuser -u postgres -- "$BIN/postgres" -D "$PGDATA" -c listen_addresses='*' "$@"
