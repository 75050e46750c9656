#!/usr/bin/env bash
# tasks.sh: task dispatch and cross-instance waits (issue 4).
#
#   test/bench/tasks.sh [--cns N] [--rates "100 500 1000"] [--seconds S]
#                       [--threads T] [--waits "200@100 1000@500"] [--max-s S]
#                       [--per-agent P] [--mc-threads T] [--loadgen c|py]
#
# Three cnapid instances on 127.0.0.2 (A), 127.0.0.3 (B), 127.0.0.4 (C),
# one store, one Redis. DNS names only B while mockcloud starts, so every
# agent session is on B. One mockcloud (--count N, 10 VMs per CN,
# --vm-delay-ms 1000, --listen 127.0.0.1:<port>) publishes its own sysinfo
# (admin_ip, agent_port) through AMQP. All its CNs share that one endpoint,
# and tasks.per_agent caps requests in flight per endpoint: the instances
# run with tasks.per_agent P (default 128) so that 100 CNs are not modelled
# as one agent with 8 slots (each real CN has its own endpoint and cap).
# 1. Dispatch latency: task-load (test/bench/task_load.c; --loadgen py:
#    test/bench/tasks_tool.py dispatch, the same requests, pacing and output
#    at ~10x the CPU): POST
#    /servers/:uuid/vms/:vm/update ({}) on A at each rate for S seconds
#    (open loop, T threads with a keep-alive connection each). Each answer
#    comes after the record committed. Latency = the agent's `start` event
#    time (history[0] in the store: the agent's clock, 1 ms resolution, taken
#    when mockcloud runs the task) - the client's send time. The records are
#    read from the store after the run (psql).
# 2. Max sustainable rate: `max`, T closed-loop senders on A for --max-s
#    seconds; its ceiling, last (after 3.): `agent`, POST /tasks straight to
#    mockcloud for 3 s (T closed-loop senders, a connection per request as
#    the instances do).
# 3. Cross-instance waits: `waits`, K@R: K machine_reboot tasks (each takes
#    ~1 s on the agent) POSTed on A at R/s, a GET /tasks/:id/wait on C for each
#    right after its 200; latency = when the wait's answer was read - the
#    task's finished_at (the agent's task_end time); split at the row's
#    _mtime (B's clock when it wrote the end): agent end -> B's write, and
#    B's write -> publish -> C's read -> the answer.
# Load average before and after each run is printed with its figure.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/sessions_lib.sh"
CNS=100 RATES="100 500 1000" SECS=10 THREADS=16 WAITS="200@100 1000@500" MAXS=10 PER_AGENT=128
MCTHREADS=1 LOADGEN=c
while [ $# -gt 0 ]; do
  case "$1" in
    --cns) CNS=$2; shift 2 ;;
    --rates) RATES=$2; shift 2 ;;
    --seconds) SECS=$2; shift 2 ;;
    --threads) THREADS=$2; shift 2 ;;
    --waits) WAITS=$2; shift 2 ;;
    --max-s) MAXS=$2; shift 2 ;;
    --per-agent) PER_AGENT=$2; shift 2 ;;
    --mc-threads) MCTHREADS=$2; shift 2 ;;
    --loadgen) LOADGEN=$2; shift 2 ;;
    *) sed -n "2,35p" "$0"; exit 2 ;;
  esac
done
TT="$PY $ROOT/test/bench/tasks_tool.py"
PREFIX=7a5c0001
bench_init btasks
# mockcloud serves every CN on one endpoint (127.0.0.1:port), and the
# tasks actor's in-flight cap is per agent endpoint: with the default 8 it
# would model 100 CNs sharing one agent's 8 slots. A real CN has its own.
for i in 1 2 3; do start_cnapid "$i" "\"tasks\": {\"per_agent\": $PER_AGENT},"; done
for i in 1 2 3; do wait_ready "$i"; done
"$ROOT/deploy/local/stack" dns-set "$STACK" 127.0.0.3 >/dev/null
AGENT_PORT=$($PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$BUILD/mockcloud" --count "$CNS" --threads "$MCTHREADS" --prefix "$PREFIX" --vms-per-cn 10 --vm-delay-ms 1000 \
    --listen "127.0.0.1:$AGENT_PORT" --amqp "$CNAPI_AMQP_URL" --resolver "$CNAPI_DNS_SERVER" \
    --cnapi-port "$PORT" --no-ur --stats --log-level warn >"$STATE/mc.stats" 2>"$STATE/mc.log" &
PIDS+=($!)
wait_connected "$STATE/mc.stats" "$CNS" 60 >/dev/null
A=http://127.0.0.2:$PORT B=http://127.0.0.3:$PORT C=http://127.0.0.4:$PORT
# every instance sees every server running with its agent endpoint: a VM
# load of an unknown VM reaches the agent (404) only then
probe=00000000-0000-4000-8000-000000000000
for u in "$B" "$A" "$C"; do
  for _ in $(seq 1 600); do           # bounded: 60 s
    last=$(printf '%s-0000-4000-8000-%012x' "$PREFIX" $((CNS - 1)))
    first=$(printf '%s-0000-4000-8000-%012x' "$PREFIX" 0)
    s1=$(curl -s -o /dev/null -w '%{http_code}' "$u/servers/$first/vms/$probe")
    s2=$(curl -s -o /dev/null -w '%{http_code}' "$u/servers/$last/vms/$probe")
    [ "$s1" = 404 ] && [ "$s2" = 404 ] && break
    sleep 0.1
  done
done
log "ready: 3 instances, $CNS CNs with sessions on B; load $(loadavg)"

records() {
  "$ROOT/deploy/local/stack" psql "$STACK" -d btasks -At \
      -c "SELECT _value FROM cnapi_tasks" >"$STATE/records.jsonl"
}
# drain: until no task is active in the store (bounded: 120 s); prints the seconds
drain() {
  local t0 n
  t0=$(now_ms)
  for _ in $(seq 1 1200); do
    n=$("$ROOT/deploy/local/stack" psql "$STACK" -d btasks -At \
        -c "SELECT count(*) FROM cnapi_tasks WHERE _value LIKE '%\"status\":\"active\"%'")
    [ "$n" = 0 ] && break
    sleep 0.1
  done
  echo "$(( ($(now_ms) - t0) / 1000 )).$(( ($(now_ms) - t0) % 1000 / 100 ))s (active left: $n)"
}
cnapid_cpu() { local i s=""; for i in 1 2 3; do s+="$(cpu_ticks "${CNAPID_PID[$i]}") "; done; echo "$s"; }

# load: dispatch|max, then tasks_tool.py's options (--url URL --prefix ...)
ninja -C "$BUILD" task-load >/dev/null
load() {
  local mode=$1
  shift
  if [ "$LOADGEN" = py ]; then $TT "$mode" "$@"; return; fi
  local args=() url=""
  while [ $# -gt 0 ]; do
    case "$1" in
      --url) url=$2; shift 2 ;;
      *) args+=("$1"); shift ;;
    esac
  done
  local hp=${url#http://}
  [ "$mode" = max ] && args+=(--closed)
  "$BUILD/task-load" --host "${hp%:*}" --port "${hp##*:}" "${args[@]}"
}

for r in $RATES; do
  # warm-up (connections, caches) then the run
  load dispatch --url "$A" --prefix "$PREFIX" --cns "$CNS" --rate 100 --seconds 1 \
      --threads "$THREADS" >/dev/null
  l0=$(loadavg); c0=$(cnapid_cpu)
  echo "== dispatch on A, sessions on B: $r tasks/s for ${SECS}s, $THREADS threads (load before $l0)"
  load dispatch --url "$A" --prefix "$PREFIX" --cns "$CNS" --rate "$r" --seconds "$SECS" \
      --threads "$THREADS" --out "$STATE/sent-$r.txt" | sed 's/^/   client: /'
  c1=$(cnapid_cpu)
  echo "   all ended after the run: $(drain)"
  records
  $TT report --sent "$STATE/sent-$r.txt" --records "$STATE/records.jsonl" | sed 's/^/   store: /'
  $PY - "$c0" "$c1" "$SECS" "$HZ" <<'EOF'
import sys
a, b = [list(map(int, s.split())) for s in sys.argv[1:3]]
secs, hz = float(sys.argv[3]), int(sys.argv[4])
print("   cnapid CPU A/B/C: " + " / ".join("%.0f%%" % (100.0 * (y - x) / hz / secs) for x, y in zip(a, b)))
EOF
  echo "   load after: $(loadavg)"
done

l0=$(loadavg)
echo "== max: $THREADS closed-loop senders on A for ${MAXS}s (load before $l0)"
load max --url "$A" --prefix "$PREFIX" --cns "$CNS" --seconds "$MAXS" --threads "$THREADS" \
    --out "$STATE/sent-max.txt" | sed 's/^/   client: /'
echo "   all ended after the run: $(drain)"
records
$TT report --sent "$STATE/sent-max.txt" --records "$STATE/records.jsonl" | sed 's/^/   store: /'
echo "   load after: $(loadavg)"
sleep 1

for w in $WAITS; do
  k=${w%@*} r=${w#*@}
  echo "== waits on C for $k reboots dispatched on A at $r/s, sessions on B (load before $(loadavg))"
  $TT waits --api "$A" --wait "$C" --prefix "$PREFIX" --cns "$CNS" --count "$k" --rate "$r" \
      --out "$STATE/waits-$k.txt" | sed 's/^/   /'
  "$ROOT/deploy/local/stack" psql "$STACK" -d btasks -At -c "SELECT _key, _mtime FROM cnapi_tasks" \
      >"$STATE/mtimes.txt"
  $TT wsplit --sent "$STATE/waits-$k.txt" --mtimes "$STATE/mtimes.txt" | sed 's/^/   split at B: /'
  echo "   load after: $(loadavg)"
  drain >/dev/null
  sleep 2
done
ctl 1 -j actors | $PY -c 'import json,sys; t=json.load(sys.stdin)["tasks"]; print("   A tasks actor:", {k: t.get(k) for k in ("created","dispatched","dispatch_failures","store_failures","conflicts","address_hits","create_batch_avg","create_read_ms_avg","create_check_ms_avg","create_commit_ms_avg","last_error")})' || true
ctl 2 -j actors | $PY -c 'import json,sys; t=json.load(sys.stdin)["tasks"]; print("   B tasks actor:", {k: t.get(k) for k in ("frames","acks","frames_pending","completed","failed","conflicts")})' || true
ctl 2 -j actors | $PY -c 'import json,sys
a=json.load(sys.stdin)
for n in sorted(k for k in a if k.startswith("writer-")):
    t=a[n]; print("   B %s:" % n, {k: t.get(k) for k in ("received","batches","rows_written","unchanged","stale","stale_from_memory","avg_batch")})' || true
# last: its frames (ids no instance knows) keep B busy acking for a while
echo "== ceiling: the agent alone, $THREADS closed-loop senders POST /tasks to mockcloud for 3s (load before $(loadavg))"
$TT agent --url "http://127.0.0.1:$AGENT_PORT" --prefix "$PREFIX" --cns "$CNS" --seconds 3 \
    --threads "$THREADS" | sed 's/^/   /'
echo "   load after: $(loadavg)"
