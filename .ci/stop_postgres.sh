#!/usr/bin/env bash
# Stop the server .ci/start_postgres.sh started (no-op when there is none).
DATA="${DPFED_PG_DIR:-/tmp/dpfed-ci-pg}"
BIN="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)"
[ -n "$BIN" ] && [ -d "$DATA/db" ] || exit 0
if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$BIN/pg_ctl" -D "$DATA/db" -m fast stop >/dev/null 2>&1
else "$BIN/pg_ctl" -D "$DATA/db" -m fast stop >/dev/null 2>&1; fi
exit 0
