#!/usr/bin/env bash
# ingest.sh: durable sysinfo ingest benchmark (issue: foundation).
#
#   test/bench/ingest.sh [--instances N] [--messages M] [--servers S] [--rate R] [--seconds D]
#                        [--shards K]
#
# 1. Throughput: M persistent ~3 KB sysinfo messages (every one a real change:
#    "Burst Sequence" grows) are queued on ur.cnapi BEFORE any cnapid runs;
#    then N instances start and drain it, each message acked only after its
#    write committed. Rate = M / (time from start to the last ack).
# 2. Latency: the instances keep running; sysinfo-burst publishes at R msg/s
#    for D seconds; each writer reports publish-to-commit p50/p99 over its last
#    8192 messages (sent_ms header -> commit), read through cnapictl.
# 3. Baselines on the same machine: the raw RabbitMQ publish/consume rate of
#    3 KB persistent messages (sysinfo-burst --bench-raw) and the batched
#    PostgreSQL write rate of the store (bench-moray).
# With the throughput figure it prints the CPU time spent during the drain per
# message: each cnapid thread's and that of the stack's PostgreSQL, RabbitMQ and Redis
# (test/bench/cpustat.py; CPU time holds on a noisy machine, rates do not).
# --shards K sets each instance's writer.shards (default: the config's, 2).
# Prints one summary block; docs/benchmarks.md records the figures.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
INSTANCES=1 MESSAGES=60000 SERVERS=10000 RATE=2000 SECONDS_=20 SHARDS=""
while [ $# -gt 0 ]; do
  case "$1" in
    --instances) INSTANCES=$2; shift 2 ;;
    --messages) MESSAGES=$2; shift 2 ;;
    --servers) SERVERS=$2; shift 2 ;;
    --rate) RATE=$2; shift 2 ;;
    --seconds) SECONDS_=$2; shift 2 ;;
    --shards) SHARDS=$2; shift 2 ;;
    *) sed -n '2,22p' "$0"; exit 2 ;;
  esac
done
BUILD=${CNAPI_BUILD:-$ROOT/build}
STATE=${BENCH_DIR:-/tmp/cnapi-bench}
PY=/usr/bin/python3
"$ROOT/deploy/install-deps" >/dev/null
[ -f "$BUILD/build.ninja" ] || meson setup "$BUILD" -Dbuildtype=release >/dev/null
ninja -C "$BUILD" cnapid cnapictl sysinfo-burst bench-moray >/dev/null
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

# fresh database, vhost-free queue, empty cache
"$ROOT/deploy/local/stack" psql "$STATE/stack" -qc "DROP DATABASE IF EXISTS bench" >/dev/null
"$ROOT/deploy/local/stack" psql "$STATE/stack" -qc "CREATE DATABASE bench" >/dev/null
"$ROOT/deploy/local/stack" rabbitmqctl "$STATE/stack" delete_queue ur.cnapi >/dev/null 2>&1 || true
"$ROOT/deploy/local/stack" redis-cli "$STATE/stack" FLUSHALL >/dev/null
PG="${CNAPI_POSTGRES_CONNINFO/dbname=cnapi/dbname=bench}"

echo "== machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB, $(uname -r)"
echo "== prefill: $MESSAGES messages for $SERVERS servers"
"$BUILD/sysinfo-burst" --url "$CNAPI_AMQP_URL" --servers "$SERVERS" --messages "$MESSAGES" --queue ur.cnapi

acked_total() {
  local sum=0 n
  for i in $(seq 1 "$INSTANCES"); do
    n=$("$BUILD/cnapictl" -e "ipc://$STATE/bench-$i.sock" -j actors 2>/dev/null \
        | $PY -c 'import json,sys; print(json.load(sys.stdin)["listener"]["acked"])' 2>/dev/null || echo 0)
    sum=$((sum + n))
  done
  echo "$sum"
}

PG_POSTMASTER=$(head -n1 "$( . "$STATE/stack/state.env"; echo "${PG_BASE:-$STATE/stack/postgres}")/data/postmaster.pid")
OTHERS=$(for f in rabbitmq/rabbitmq.pid redis/redis.pid; do head -n1 "$STATE/stack/$f" 2>/dev/null; echo; done)
$PY "$ROOT/test/bench/cpustat.py" snap "$STATE/cpu0.json" "$PG_POSTMASTER" $OTHERS
WRITER_CONF=""
[ -n "$SHARDS" ] && WRITER_CONF=", \"writer\": {\"shards\": $SHARDS}"
T0=$(date +%s%N)
for i in $(seq 1 "$INSTANCES"); do
  cat > "$STATE/bench-$i.json" <<JSON
{"instance": "bench-$i", "log_level": "warn",
 "http": {"address": "127.0.0.$((i + 1))", "port": 0},
 "admin": {"endpoint": "ipc://$STATE/bench-$i.sock"},
 "amqp": {"url": "$CNAPI_AMQP_URL"}, "postgres": {"conninfo": "$PG"},
 "redis": {"url": "$CNAPI_REDIS_URL"}$WRITER_CONF}
JSON
  env $NO_CNAPI_ENV "$BUILD/cnapid" -c "$STATE/bench-$i.json" >"$STATE/bench-$i.log" 2>&1 &
  PIDS+=($!)
done
for n in $(seq 1 6000); do      # bounded: 10 minutes at 0.1 s
  a=$(acked_total)
  [ "$a" -ge "$MESSAGES" ] && break
  for p in "${PIDS[@]}"; do
    if ! kill -0 "$p" 2>/dev/null; then
      echo "ingest.sh: cnapid $p exited; its log:" >&2; tail -3 "$STATE"/bench-*.log >&2; exit 1
    fi
  done
  sleep 0.1
done
T1=$(date +%s%N)
$PY "$ROOT/test/bench/cpustat.py" snap "$STATE/cpu1.json" "$PG_POSTMASTER" $OTHERS "${PIDS[@]}"
SECS=$($PY -c "print('%.3f' % (($T1 - $T0) / 1e9))")
RATE_IN=$($PY -c "print(int($MESSAGES / $SECS))")
echo "== drained $a of $MESSAGES in ${SECS}s with $INSTANCES instance(s): $RATE_IN msg/s (start to last ack)"
for i in $(seq 1 "$INSTANCES"); do
  "$BUILD/cnapictl" -e "ipc://$STATE/bench-$i.sock" -j actors | $PY -c '
import json,sys; a=json.load(sys.stdin); l=a["listener"]
print("   bench-%s: acked %d" % (sys.argv[1], l["acked"]))
for k in sorted(k for k in a if k.startswith("writer-")):
    w = a[k]
    print("      %s: received %d, batches %d, avg batch %.1f, max batch %d, last commit %.1f ms" % (k, w["received"], w["batches"], w["avg_batch"], w["max_batch"], w["last_commit_ms"]))' "$i"
done
echo "== CPU during the drain, per message (load average $(cut -d' ' -f1-3 /proc/loadavg))"
$PY "$ROOT/test/bench/cpustat.py" diff "$STATE/cpu0.json" "$STATE/cpu1.json" "$MESSAGES" | sed 's/^/   /'

TOTAL=$((RATE * SECONDS_))
echo "== latency: $TOTAL messages at $RATE msg/s"
"$BUILD/sysinfo-burst" --url "$CNAPI_AMQP_URL" --servers "$SERVERS" --messages "$TOTAL" --rate "$RATE" --prefix beef0000
WANT=$((MESSAGES + TOTAL))
for n in $(seq 1 3000); do
  a=$(acked_total)
  [ "$a" -ge "$WANT" ] && break
  sleep 0.1
done
for i in $(seq 1 "$INSTANCES"); do
  "$BUILD/cnapictl" -e "ipc://$STATE/bench-$i.sock" -j actors | $PY -c '
import json,sys; a=json.load(sys.stdin)
for k in sorted(k for k in a if k.startswith("writer-")):
    w = a[k]
    print("   bench-%s %s: publish-to-commit p50 %.1f ms, p99 %.1f ms over %d messages (all along: %d batches, avg %.1f)" % (sys.argv[1], k, w["publish_to_commit_p50_ms"], w["publish_to_commit_p99_ms"], w["latency_samples"], w["batches"], w["avg_batch"]))' "$i"
done

echo "== baselines on this machine"
"$BUILD/sysinfo-burst" --url "$CNAPI_AMQP_URL" --bench-raw --messages 30000 | sed 's/^/   raw rabbitmq: /'
"$BUILD/bench-moray" "$PG" 20000 3000 2>&1 | sed 's/^/   bench-moray: /'
