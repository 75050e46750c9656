#!/usr/bin/env bash
# failover.sh: kill -9 one of three instances holding N agents together
# (issue 3, target 2).
#
#   test/bench/failover.sh [--agents N] [--mockclouds M] [--sweep-s S]
#
# 1. Three cnapid (bench-1..3 on 127.0.0.2-4, one port), all three in DNS.
#    N server records seeded through the real ingest path.
# 2. M mockcloud processes (default 2) run N CNs at 1 s heartbeats with
#    per-session log lines (--log-level debug: "session lost", "session
#    established", with ms times) and --stats lines (1 s); the agents pick an
#    instance at random, so each holds ~N/3. 8 s after all are up (past the
#    agents' 5 s "stable" mark), samplers start reading every server's status
#    from bench-2 and bench-3 (GET /servers?fields=uuid,status, pages of
#    1000, one thread each, back to back) for S seconds (default 25).
# 3. 2 s later bench-1 gets SIGKILL (t0). DNS keeps listing it (a crashed
#    host does not leave DNS by itself): the agents' quick retry to it is
#    refused and they pick another address.
# Reported: orphans; time from t0 until every CN is up again with none on
# bench-1 (stats lines: 1 s resolution); per orphan, t0 -> its next "session
# established" (ms, from the debug log), p50/p90/p99/max; what the survivors
# answered meanwhile: unknown per sweep (target 0) and when every server read
# running again.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/sessions_lib.sh"
N=10000 MC=2 SWEEP_S=25
while [ $# -gt 0 ]; do
  case "$1" in
    --agents) N=$2; shift 2 ;;
    --mockclouds) MC=$2; shift 2 ;;
    --sweep-s) SWEEP_S=$2; shift 2 ;;
    *) sed -n '2,24p' "$0"; exit 2 ;;
  esac
done
bench_init bfailover
for i in 1 2 3; do start_cnapid "$i"; done
for i in 1 2 3; do wait_ready "$i"; done
"$ROOT/deploy/local/stack" dns-set "$STACK" 127.0.0.2 127.0.0.3 127.0.0.4 >/dev/null 2>&1
PER=$(( (N + MC - 1) / MC ))
count_of() { if [ "$1" = "$MC" ]; then echo $((N - PER * (MC - 1))); else echo "$PER"; fi; }
log "seeding $N server records"
for m in $(seq 1 "$MC"); do seed_servers "$(count_of "$m")" "$(printf 'cafe%04x' $((m - 1)))" 3; done

MCPIDS=()
for m in $(seq 1 "$MC"); do
  "$BUILD/mockcloud" --count "$(count_of "$m")" --prefix "$(printf 'cafe%04x' $((m - 1)))" \
      --amqp none --resolver "$CNAPI_DNS_SERVER" --cnapi-port "$PORT" --heartbeat-ms 1000 \
      --stats --log-level debug >"$STATE/mc-$m.stats" 2>"$STATE/mc-$m.log" &
  MCPIDS+=($!)
  PIDS+=($!)
done
T_UP=""
T0=$(now_ms)
for _ in $(seq 1 1800); do           # bounded: 3 minutes
  c=0
  for m in $(seq 1 "$MC"); do
    c=$((c + $(tail -n1 "$STATE/mc-$m.stats" 2>/dev/null | $PY -c 'import json,sys
try: print(json.loads(sys.stdin.read())["connected"])
except Exception: print(0)')))
  done
  if [ "$c" -ge "$N" ]; then T_UP=$(( $(now_ms) - T0 )); break; fi
  sleep 0.1
done
log "agents up: $c/$N after ${T_UP:-timeout} ms; per instance: $(tail -n1 "$STATE/mc-1.stats" | $PY -c 'import json,sys; print(json.load(sys.stdin)["instances"])') (process 1); load $(loadavg)"
sleep 8
LOAD_BEFORE=$(loadavg)
rm -f "$STATE/sweeps.jsonl"
$TOOL sweep "http://127.0.0.3:$PORT" "http://127.0.0.4:$PORT" --servers "$N" \
    --out "$STATE/sweeps.jsonl" --seconds "$SWEEP_S" &
SW=$!
PIDS+=($SW)
sleep 2
K=$(now_ms)
kill -KILL "${CNAPID_PID[1]}"
reap "${CNAPID_PID[1]}"
log "bench-1 killed (SIGKILL) at $K; load $LOAD_BEFORE before"
reap "$SW"
LOAD_AFTER=$(loadavg)
sleep 1
echo "== failover: $N agents on 3 instances, bench-1 killed (kill -9); load before $LOAD_BEFORE, after $LOAD_AFTER"
STATS=() LOGS=()
for m in $(seq 1 "$MC"); do STATS+=("$STATE/mc-$m.stats"); LOGS+=("$STATE/mc-$m.log"); done
$TOOL failover --stats "${STATS[@]}" --t0-ms "$K" --killed bench-1 --killed-addr 127.0.0.2 \
    --logs "${LOGS[@]}" --sweeps "$STATE/sweeps.jsonl"
for i in 2 3; do
  ctl "$i" -j actors | $PY -c '
import json,sys; s=json.load(sys.stdin)["sessions"]
print("   bench-%s: claims %d, takeovers %d, swept %d, timeouts %d, fenced %d, claim_failures %d" % (sys.argv[1], s["claims"], s["takeovers"], s["swept"], s["timeouts"], s["fenced"], s["claim_failures"]))' "$i"
done
for p in "${MCPIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
for p in "${MCPIDS[@]}"; do reap "$p"; done
