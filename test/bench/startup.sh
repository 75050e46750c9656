#!/usr/bin/env bash
# startup.sh: N agents connecting to one fresh instance at once, sampled
# every 0.5 s (issue 3: the start-up storm of docs/benchmarks.md).
#
#   test/bench/startup.sh [--agents N] [--samples K] [--threads T] [--ramp-ms MS]
#
# N server records are seeded, cnapid is restarted (a fresh process), then one
# mockcloud starts N CNs (mockcloud's own ramp unless --ramp-ms). Every 0.5 s
# (K samples, default 60) one line: the load, PostgreSQL's transaction count
# for the benchmark database, cnapid's CPU ticks, the sessions actor's
# counters (hellos, claims, timeouts, releases, ...; "ctl-timeout" when the
# actor did not answer its control socket within 2 s) and mockcloud's
# connected / attempts / failures / states. Converged = connected reaches N.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/sessions_lib.sh"
N=15000 SAMPLES=60 THREADS=1 RAMP=-1
while [ $# -gt 0 ]; do
  case "$1" in
    --agents) N=$2; shift 2 ;;
    --samples) SAMPLES=$2; shift 2 ;;
    --threads) THREADS=$2; shift 2 ;;
    --ramp-ms) RAMP=$2; shift 2 ;;
    *) sed -n '2,13p' "$0"; exit 2 ;;
  esac
done
bench_init bstartup
start_cnapid 1
wait_ready 1
"$ROOT/deploy/local/stack" dns-set "$STACK" 127.0.0.2 >/dev/null 2>&1
seed_servers "$N" cafe0000
kill -TERM "${CNAPID_PID[1]}"; reap "${CNAPID_PID[1]}"
start_cnapid 1
wait_ready 1
PID=${CNAPID_PID[1]}
xacts() {
  psql -X -h 127.0.0.1 -p "$STACK_PG_PORT" -U postgres -d postgres -Atc \
      "select xact_commit + xact_rollback from pg_stat_database where datname = 'bstartup'"
}
ramp=()
[ "$RAMP" -ge 0 ] && ramp=(--ramp-ms "$RAMP")
"$BUILD/mockcloud" --count "$N" --threads "$THREADS" --amqp none --resolver "$CNAPI_DNS_SERVER" \
    --cnapi-port "$PORT" "${ramp[@]}" --stats --log-level warn >"$STATE/mc.stats" 2>"$STATE/mc.log" &
MC=$!
PIDS+=($MC)
for _ in $(seq 1 "$SAMPLES"); do
  echo "$(date +%T.%N | cut -c1-12) load $(load1) xacts $(xacts) cpu $(cpu_ticks "$PID") $(ctl 1 -t 2000 -j actors 2>/dev/null \
      | $PY -c 'import json,sys; s=json.load(sys.stdin)["sessions"]; print(" ".join("%s=%s" % (k, s[k]) for k in ("hellos", "claims", "claiming", "sessions", "sockets", "timeouts", "releases", "lingering")))' 2>/dev/null \
      || echo ctl-timeout) | mc $(tail -n1 "$STATE/mc.stats" | $PY -c 'import json,sys; s=json.load(sys.stdin); print(s["connected"], s["attempts"], s["failures"], s["states"])' 2>/dev/null)"
  sleep 0.5
done
kill -TERM "$MC"; reap "$MC"
