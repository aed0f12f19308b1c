#!/usr/bin/env bash
# Start a throwaway PostgreSQL on 127.0.0.1 for the store tests; print its URL on stdout.
# Installs Debian's postgresql when it is missing and apt can reach the archive. Exits non-zero
# (printing the reason on stderr) when no server can be had: the tests then skip visibly.
set -euo pipefail
PORT="${DPFED_PG_PORT:-55432}"
DATA="${DPFED_PG_DIR:-/tmp/dpfed-ci-pg}"
find_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1; }
BIN="$(find_bin || true)"
if [ -z "$BIN" ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  echo "installing postgresql with apt-get" >&2
  (timeout 300 apt-get update -qq && DEBIAN_FRONTEND=noninteractive timeout 600 \
     apt-get install -y -qq postgresql >/dev/null) >&2 || true
  BIN="$(find_bin || true)"
fi
[ -n "$BIN" ] || { echo "no PostgreSQL server binaries and none could be installed" >&2; exit 1; }
RUNAS=()
if [ "$(id -u)" = 0 ]; then
  id postgres >/dev/null 2>&1 || useradd --system postgres
  RUNAS=(runuser -u postgres --)
fi
rm -rf "$DATA" && mkdir -p "$DATA" && chmod 700 "$DATA"
[ "$(id -u)" = 0 ] && chown postgres "$DATA"
"${RUNAS[@]}" "$BIN/initdb" -D "$DATA/db" -U dpfed --auth=trust -E UTF8 >/dev/null
"${RUNAS[@]}" "$BIN/pg_ctl" -D "$DATA/db" -l "$DATA/log" -w -t 60 \
  -o "-h 127.0.0.1 -p $PORT -k $DATA" start >/dev/null
"${RUNAS[@]}" "$BIN/createdb" -h 127.0.0.1 -p "$PORT" -U dpfed dpfed_test
echo "postgresql+psycopg://dpfed@127.0.0.1:$PORT/dpfed_test"
