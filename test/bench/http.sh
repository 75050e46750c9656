#!/usr/bin/env bash
# http.sh: HTTP read benchmarks (issue: foundation).
#
#   test/bench/http.sh [--servers N] [--seconds D] [--connections C]
#
# Seeds N servers through the real ingest path (sysinfo-burst -> ur.cnapi ->
# cnapid), then measures with wrk on loopback, one wrk thread:
#   1. bare-h2o: a fixed JSON answer as long as cnapid's answer for one of the
#      servers, driven by the same wrk script (the ceiling on this machine);
#   2. GET /servers/:uuid on cnapid, cycling over all N uuids (wrk Lua);
#   3. GET /servers (the default page of 1000 servers, as sdc-clients asks);
#   4. GET /servers?offset=K for every page K = 0, 1000, ... (the whole list,
#      as a client paging through it reads it).
# Prints wrk's own summary for each; docs/benchmarks.md records the figures.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
SERVERS=10000 SECS=10 CONNS=100
while [ $# -gt 0 ]; do
  case "$1" in
    --servers) SERVERS=$2; shift 2 ;;
    --seconds) SECS=$2; shift 2 ;;
    --connections) CONNS=$2; shift 2 ;;
    *) sed -n '2,12p' "$0"; exit 2 ;;
  esac
done
BUILD=${CNAPI_BUILD:-$ROOT/build}
STATE=${BENCH_DIR:-/tmp/cnapi-bench-http}
PY=/usr/bin/python3
"$ROOT/deploy/install-deps" >/dev/null
[ -f "$BUILD/build.ninja" ] || meson setup "$BUILD" -Dbuildtype=release >/dev/null
ninja -C "$BUILD" cnapid cnapictl sysinfo-burst bare-h2o >/dev/null
mkdir -p "$STATE"
"$ROOT/deploy/local/stack" up "$STATE/stack" >/dev/null 2>&1
. "$STATE/stack/stack.env"
# cnapid reads CNAPI_* as overrides of its config file: start it without the
# stack's (they would point it at the stack's default database)
NO_CNAPI_ENV=$(compgen -e | grep '^CNAPI_' | sed 's/^/-u /' | tr '\n' ' ')
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  if [ -z "${KEEP_STACK:-}" ]; then "$ROOT/deploy/local/stack" down "$STATE/stack" >/dev/null 2>&1 || true; fi
}
trap cleanup EXIT
"$ROOT/deploy/local/stack" psql "$STATE/stack" -qc "DROP DATABASE IF EXISTS benchhttp" >/dev/null 2>&1
"$ROOT/deploy/local/stack" psql "$STATE/stack" -qc "CREATE DATABASE benchhttp" >/dev/null
"$ROOT/deploy/local/stack" redis-cli "$STATE/stack" FLUSHALL >/dev/null
PG="${CNAPI_POSTGRES_CONNINFO/dbname=cnapi/dbname=benchhttp}"
PORT=$($PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.2",0)); print(s.getsockname()[1])')
cat > "$STATE/c.json" <<JSON
{"instance": "bench-http", "log_level": "warn", "http": {"address": "127.0.0.2", "port": $PORT},
 "admin": {"endpoint": "ipc://$STATE/a.sock"}, "amqp": {"url": "$CNAPI_AMQP_URL"},
 "postgres": {"conninfo": "$PG"}, "redis": {"url": "$CNAPI_REDIS_URL"}}
JSON
env $NO_CNAPI_ENV ${CNAPID_ENV:-} "$BUILD/cnapid" -c "$STATE/c.json" >"$STATE/cnapid.log" 2>&1 &
PIDS+=($!)
CNAPID=$!
"$BUILD/sysinfo-burst" --url "$CNAPI_AMQP_URL" --servers "$SERVERS" --messages "$SERVERS" --prefix beef0001 --queue ur.cnapi >/dev/null
for n in $(seq 1 1200); do
  c=$(curl -fsS "http://127.0.0.2:$PORT/servers?limit=1000&offset=$((SERVERS - 1000))" 2>/dev/null \
      | $PY -c 'import json,sys; print(len(json.load(sys.stdin)))' 2>/dev/null || echo 0)
  [ "$c" -ge 1000 ] && break
  sleep 0.1
done
echo "== machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB; $SERVERS servers seeded"
# the ceiling answers as many bytes as cnapid does, to the same wrk script
BODY=$(curl -fsS "http://127.0.0.2:$PORT/servers/beef0001-0000-4000-8000-000000000001" | wc -c)
BPORT=$($PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.3",0)); print(s.getsockname()[1])')
"$BUILD/bare-h2o" 127.0.0.3 "$BPORT" "$BODY" >/dev/null 2>&1 &
PIDS+=($!)
BARE=$!
for n in $(seq 1 100); do curl -fsS -o /dev/null "http://127.0.0.3:$BPORT/x" 2>/dev/null && break; sleep 0.05; done
cat > "$STATE/uuids.lua" <<LUA
local n = $SERVERS
local i = 0
request = function()
  i = (i + 1) % n
  return wrk.format("GET", string.format("/servers/beef0001-0000-4000-8000-%012x", i))
end
LUA
echo "== bare h2o (ceiling), $BODY-byte answers, the same wrk script: wrk -t1 -c$CONNS -d${SECS}s"
# CPU per request (utime + stime of the server process over the run / the
# requests wrk counted): the figure that other load on the machine disturbs
# least
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
wrk_cpu() {   # PID wrk-args...: wrk's summary, then the server's CPU per request
  local pid=$1 c0 c1 out
  shift
  c0=$(cpu_ticks "$pid")
  out=$(wrk "$@")
  c1=$(cpu_ticks "$pid")
  echo "$out" | sed 's/^/   /'
  echo "$out" | $PY -c '
import re,sys
t=sys.stdin.read(); n=int(re.search(r"(\d+) requests in", t).group(1))
ticks=int(sys.argv[1]); hz=int(sys.argv[2])
print("   server CPU: %.2f s for %d requests = %.2f us per request" % (ticks/hz, n, ticks/hz*1e6/n))' "$((c1 - c0))" "$(getconf CLK_TCK)"
}
wrk_cpu "$BARE" -t1 -c"$CONNS" -d"${SECS}s" --latency -s "$STATE/uuids.lua" "http://127.0.0.3:$BPORT"
echo "== warm the near cache (one pass over every uuid)"
wrk -t1 -c"$CONNS" -d2s -s "$STATE/uuids.lua" "http://127.0.0.2:$PORT" >/dev/null
echo "== GET /servers/:uuid over $SERVERS uuids ($BODY-byte answers): wrk -t1 -c$CONNS -d${SECS}s"
wrk_cpu "$CNAPID" -t1 -c"$CONNS" -d"${SECS}s" --latency -s "$STATE/uuids.lua" "http://127.0.0.2:$PORT"
echo "== GET /servers (default page: 1000 of $SERVERS): wrk -t1 -c4 -d${SECS}s"
wrk_cpu "$CNAPID" -t1 -c4 -d"${SECS}s" --latency "http://127.0.0.2:$PORT/servers"
cat > "$STATE/pages.lua" <<LUA
local page = 0
request = function()
  local path = "/servers?offset=" .. (page * 1000)
  page = (page + 1) % $(( (SERVERS + 999) / 1000 ))
  return wrk.format(nil, path)
end
LUA
echo "== GET /servers?offset=K, every page of $SERVERS in turn: wrk -t1 -c4 -d${SECS}s"
wrk_cpu "$CNAPID" -t1 -c4 -d"${SECS}s" --latency -s "$STATE/pages.lua" "http://127.0.0.2:$PORT"
"$BUILD/cnapictl" -e "ipc://$STATE/a.sock" actors | sed 's/^/   /'
