# sessions_lib.sh: shared by the session benchmarks (issue 3); sourced, not run.
#
#   . test/bench/sessions_lib.sh
#   bench_init NAME            build, stack up, fresh database NAME, empty Redis
#   start_cnapid I [JSON]      instance bench-I on 127.0.0.(I+1):$PORT (extra
#                              top-level config members in JSON, e.g. '"x": 1,')
#   wait_ready I               /ping answers (bounded: 20 s)
#   seed_servers N PREFIX      N server records through the real ingest path
#   load1                      the 1-minute load average
#   cpu_ticks PID              utime + stime in clock ticks
#   rss_kb PID                 VmRSS in KiB
#   reap PID                   wait for a child (killed processes are not
#                              reaped by anyone else here)
#
# Environment: CNAPI_BUILD (default build-bench, meson --buildtype=release),
# BENCH_DIR (state, default /tmp/cnapi-bench-sessions), BENCH_STACK (stack
# dir, default $BENCH_DIR/stack), KEEP_STACK=1 leaves the stack up.
# Every process is a child of the calling script and is killed by its PID.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
BUILD=${CNAPI_BUILD:-$ROOT/build-bench}
STATE=${BENCH_DIR:-/tmp/cnapi-bench-sessions}
STACK=${BENCH_STACK:-$STATE/stack}
PY=/usr/bin/python3
TOOL="$PY $ROOT/test/bench/sessions_tool.py"
PIDS=()
declare -A CNAPID_PID=()
HZ=$(getconf CLK_TCK)

log() { printf '%s %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
load1() { cut -d' ' -f1 /proc/loadavg; }
loadavg() { cut -d' ' -f1-3 /proc/loadavg; }
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
rss_kb() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }
# reap PID: wait for the child and forget it (its PID may be reused)
reap() {
  wait "$1" 2>/dev/null || true
  local keep=() p
  for p in "${PIDS[@]}"; do [ "$p" = "$1" ] || keep+=("$p"); done
  PIDS=("${keep[@]}")
}
now_ms() { echo $(( $(date +%s%N) / 1000000 )); }

# children of the stack's postmaster (its backends) plus the postmaster, and
# Redis: their CPU ticks, summed
stack_ticks() {
  local pm rd sum=0 p
  pm=$(head -n1 "$STACK_PG_PIDFILE" 2>/dev/null || echo 0)
  rd=$(cat "$STACK_REDIS_PIDFILE" 2>/dev/null || echo 0)
  for p in $(awk -v pm="$pm" '$4 == pm { print $1 }' /proc/[0-9]*/stat 2>/dev/null) "$pm"; do
    [ -r "/proc/$p/stat" ] && sum=$((sum + $(cpu_ticks "$p" 2>/dev/null || echo 0)))
  done
  echo "$sum $(cpu_ticks "$rd" 2>/dev/null || echo 0)"
}

bench_cleanup() {
  local p
  for p in "${PIDS[@]}"; do kill -CONT "$p" 2>/dev/null || true; kill -TERM "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do
    # bounded: a process that ignores TERM for 10 s gets KILL
    for _ in $(seq 1 100); do
      grep -qs '^State:.*[ZX]' "/proc/$p/status" && break
      [ -d "/proc/$p" ] || break
      sleep 0.1
    done
    kill -KILL "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
  done
  if [ -z "${KEEP_STACK:-}" ]; then "$ROOT/deploy/local/stack" down "$STACK" >/dev/null 2>&1 || true; fi
}

bench_init() {
  local db=$1
  "$ROOT/deploy/install-deps" >/dev/null
  [ -f "$BUILD/build.ninja" ] || meson setup "$BUILD" --buildtype=release >/dev/null
  ninja -C "$BUILD" cnapid cnapictl mockcloud sysinfo-burst >/dev/null
  mkdir -p "$STATE"
  "$ROOT/deploy/local/stack" up "$STACK" >/dev/null 2>&1
  # shellcheck disable=SC1091
  . "$STACK/stack.env"
  trap bench_cleanup EXIT
  "$ROOT/deploy/local/stack" psql "$STACK" -qc "DROP DATABASE IF EXISTS $db" >/dev/null 2>&1
  "$ROOT/deploy/local/stack" psql "$STACK" -qc "CREATE DATABASE $db" >/dev/null
  "$ROOT/deploy/local/stack" rabbitmqctl "$STACK" delete_queue ur.cnapi >/dev/null 2>&1 || true
  "$ROOT/deploy/local/stack" redis-cli "$STACK" FLUSHALL >/dev/null
  PG="${CNAPI_POSTGRES_CONNINFO/dbname=cnapi/dbname=$db}"
  # one port free on 127.0.0.2-4 (the instances share it, as in deploy/demo)
  PORT=$($PY -c '
import socket
for _ in range(200):
    a = socket.socket(); a.bind(("127.0.0.2", 0)); p = a.getsockname()[1]
    ok = True
    for ip in ("127.0.0.3", "127.0.0.4"):
        b = socket.socket()
        try: b.bind((ip, p))
        except OSError: ok = False
        b.close()
    if ok: print(p); break')
  # mockcloud holds thousands of sockets: take the hard limit
  ulimit -n "$(ulimit -Hn)"
  BUILDTYPE=$(meson introspect --buildoptions "$BUILD" 2>/dev/null \
      | $PY -c 'import json,sys; print([o["value"] for o in json.load(sys.stdin) if o["name"] == "buildtype"][0])' 2>/dev/null || echo "?")
  log "machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB, nofile $(ulimit -n); build $BUILD ($BUILDTYPE); load $(loadavg)"
}

start_cnapid() {
  local i=$1 extra=${2:-}
  cat > "$STATE/cnapid-$i.json" <<JSON
{"instance": "bench-$i", "datacenter_name": "$STACK_DC", "dns_domain": "$STACK_DOMAIN",
 "log_level": "${CNAPID_LOG:-warn}", $extra
 "http": {"address": "127.0.0.$((i + 1))", "port": $PORT},
 "admin": {"endpoint": "ipc://$STATE/cnapid-$i.sock"},
 "amqp": {"url": "$CNAPI_AMQP_URL"}, "postgres": {"conninfo": "$PG"},
 "redis": {"url": "$CNAPI_REDIS_URL"}}
JSON
  # CNAPI_* variables override the file (stack.env exports the stack's
  # database): point this one at the benchmark's own database
  CNAPI_POSTGRES_CONNINFO="$PG" "$BUILD/cnapid" -c "$STATE/cnapid-$i.json" >>"$STATE/cnapid-$i.log" 2>&1 &
  CNAPID_PID[$i]=$!
  PIDS+=($!)
}

wait_ready() {
  local i=$1
  for _ in $(seq 1 400); do
    curl -fsS -o /dev/null "http://127.0.0.$((i + 1)):$PORT/ping" 2>/dev/null && return 0
    sleep 0.05
  done
  log "cnapid bench-$i did not come up; see $STATE/cnapid-$i.log"
  return 1
}

ctl() { local i=$1; shift; "$BUILD/cnapictl" -e "ipc://$STATE/cnapid-$i.sock" "$@"; }

# acked sysinfo messages over instances 1..$1
acked_total() {
  local sum=0 n i
  for i in $(seq 1 "$1"); do
    n=$(ctl "$i" -j actors 2>/dev/null | $PY -c 'import json,sys; print(json.load(sys.stdin)["listener"]["acked"])' 2>/dev/null || echo 0)
    sum=$((sum + n))
  done
  echo "$sum"
}

# seed_servers N PREFIX [INSTANCES]: server records for mockcloud's CNs
seed_servers() {
  local n=$1 prefix=$2 inst=${3:-1} base
  base=$(acked_total "$inst")
  "$BUILD/sysinfo-burst" --url "$CNAPI_AMQP_URL" --servers "$n" --messages "$n" --prefix "$prefix" \
      --startup --setup --queue ur.cnapi >/dev/null
  for _ in $(seq 1 1200); do           # bounded: 2 minutes
    [ "$(acked_total "$inst")" -ge $((base + n)) ] && return 0
    sleep 0.1
  done
  log "seeding: only $(acked_total "$inst") of $((base + n)) acked"
  return 1
}

# wait_connected FILE N SECONDS: until mockcloud's last --stats line in FILE
# says connected >= N; prints the seconds it took (or "timeout")
wait_connected() {
  local f=$1 n=$2 secs=$3 t0 c
  t0=$(now_ms)
  for _ in $(seq 1 $((secs * 10))); do
    c=$(tail -n1 "$f" 2>/dev/null | $PY -c 'import json,sys
try: print(json.loads(sys.stdin.read())["connected"])
except Exception: print(0)')
    if [ "$c" -ge "$n" ]; then echo "$(( ($(now_ms) - t0) ))"; return 0; fi
    sleep 0.1
  done
  echo timeout
  return 1
}
