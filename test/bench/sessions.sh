#!/usr/bin/env bash
# sessions.sh: how many agent sessions one instance holds, and what each costs
# (issue 3, target 1).
#
#   test/bench/sessions.sh [--sessions N] [--window S] [--mockclouds M] [--threads T]
#                          [--ramp-ms MS] [--perf] [--no-restart] [--floor]
#
# 1. One cnapid (bench-1 on 127.0.0.2), DNS pointing at it. N server records
#    are seeded through the real ingest path first (sysinfo-burst), so the
#    sessions find their records as in production.
# 2. Baseline: cnapid VmRSS (/proc/PID/status) of a fresh cnapid started
#    after the seeding (so every cache the sessions fill counts against
#    them); --no-restart keeps the process that ingested the records (the
#    marginal cost: the allocator reuses what the ingest freed).
# 3. M mockcloud processes (default 1) open N sessions at 1 s heartbeats
#    (--amqp none: nothing but sessions); time until all are up.
# 4. 10 s to settle (claims, VM state writes, first flushes), then a steady
#    window of S seconds (default 30): cnapid's CPU (utime + stime from
#    /proc/PID/stat) as % of one core, per thread too; the stack's
#    PostgreSQL and Redis CPU (the batched last_heartbeat flushes); the
#    sessions actor's counters (timeouts, reconnects must stay 0).
# 5. RSS at N: (RSS_N - RSS_0) / N per session; with --perf a 10 s
#    `perf record -g` of cnapid and its top symbols.
# 6. With --floor, then the floor on the same machine minutes later:
#    bare-hub (test/bench/bare_hub.c: the upgrade, welcome, hb answers and
#    nothing else) on 127.0.0.3 holding the same N agents of a fresh
#    mockcloud, measured the same way (ramp, 10 s, window).
# Prints one summary block; docs/benchmarks.md records the figures.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/sessions_lib.sh"
N=15000 WINDOW=30 MC=1 THREADS=1 RAMP=-1 PERF=0 RESTART=1 FLOOR=0
while [ $# -gt 0 ]; do
  case "$1" in
    --sessions) N=$2; shift 2 ;;
    --window) WINDOW=$2; shift 2 ;;
    --mockclouds) MC=$2; shift 2 ;;
    --threads) THREADS=$2; shift 2 ;;
    --ramp-ms) RAMP=$2; shift 2 ;;
    --perf) PERF=1; shift ;;
    --no-restart) RESTART=0; shift ;;
    --floor) FLOOR=1; shift ;;
    *) sed -n '2,29p' "$0"; exit 2 ;;
  esac
done
bench_init bsessions
rm -f "$STATE/perf.top"        # a previous run's profile is not this one's
start_cnapid 1
wait_ready 1
"$ROOT/deploy/local/stack" dns-set "$STACK" 127.0.0.2 >/dev/null 2>&1
PID=${CNAPID_PID[1]}

# M mockclouds: process m runs CNs 0..cnt-1 of prefix cafe<m-1>; each
# prefix's records are seeded before the baseline
PER=$(( (N + MC - 1) / MC ))
count_of() { if [ "$1" = "$MC" ]; then echo $((N - PER * (MC - 1))); else echo "$PER"; fi; }
log "seeding $N server records (sysinfo-burst -> ur.cnapi -> cnapid)"
for m in $(seq 1 "$MC"); do seed_servers "$(count_of "$m")" "$(printf 'cafe%04x' $((m - 1)))"; done
if [ "$RESTART" = 1 ]; then
  # a fresh process: the baseline holds none of the ingest's memory, so the
  # per-session figure includes every cache the sessions fill (conservative)
  kill -TERM "$PID"; reap "$PID"
  start_cnapid 1
  wait_ready 1
  PID=${CNAPID_PID[1]}
fi
sleep 3
RSS0=$(rss_kb "$PID")
log "baseline: cnapid RSS $RSS0 KiB ($([ "$RESTART" = 1 ] && echo "fresh process after seeding" || echo "same process that ingested the records")), load $(loadavg)"

# start_mockcloud COUNT PREFIX NAME: COUNT agents at 1 s heartbeats, nothing
# but sessions; stats in $STATE/NAME.stats; its PID in MC_PID
start_mockcloud() {
  local ramp=()
  [ "$RAMP" -ge 0 ] && ramp=(--ramp-ms "$RAMP")
  "$BUILD/mockcloud" --count "$1" --prefix "$2" --threads "$THREADS" --amqp none \
      --resolver "$CNAPI_DNS_SERVER" --cnapi-port "$PORT" --heartbeat-ms 1000 "${ramp[@]}" \
      --stats --log-level "${MC_LOG:-warn}" >"$STATE/$3.stats" 2>"$STATE/$3.log" &
  MC_PID=$!
  PIDS+=($!)
}

MCPIDS=()
T0=$(now_ms)
for m in $(seq 1 "$MC"); do
  start_mockcloud "$(count_of "$m")" "$(printf 'cafe%04x' $((m - 1)))" "mc-$m"
  MCPIDS+=("$MC_PID")
done
T_UP=""
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
log "sessions up: ${c}/$N after ${T_UP:-timeout} ms; load $(loadavg)"
sleep 10
C_BEFORE=$(ctl 1 -j actors | $PY -c 'import json,sys; s=json.load(sys.stdin)["sessions"]; print(s["timeouts"], s["claims"], s["sessions"], s["lost_byes"], s["fenced"])')
LOAD_START=$(loadavg)
declare -A TT0=()
tticks() { awk '{ print $14 + $15 }' "/proc/$PID/task/$1/stat" 2>/dev/null || echo 0; }
for t in /proc/"$PID"/task/*; do TT0[${t##*/}]=$(tticks "${t##*/}"); done
CPU0=$(cpu_ticks "$PID") ST0=$(stack_ticks)
MC0=0; for p in "${MCPIDS[@]}"; do MC0=$((MC0 + $(cpu_ticks "$p"))); done
W0=$(now_ms)
sleep "$WINDOW"
W1=$(now_ms)
CPU1=$(cpu_ticks "$PID") ST1=$(stack_ticks)
MC1=0; for p in "${MCPIDS[@]}"; do MC1=$((MC1 + $(cpu_ticks "$p"))); done
LOAD_END=$(loadavg)
THREADS_CPU=""
for t in /proc/"$PID"/task/*; do
  tid=${t##*/}
  d=$(( $(tticks "$tid") - ${TT0[$tid]:-0} ))
  [ "$d" -gt 0 ] && THREADS_CPU="$THREADS_CPU $tid:$d"
done
RSS1=$(rss_kb "$PID")
C_AFTER=$(ctl 1 -j actors | $PY -c 'import json,sys; s=json.load(sys.stdin)["sessions"]; print(s["timeouts"], s["claims"], s["sessions"], s["lost_byes"], s["fenced"], s["last_flush_ms"], s["flush_rows"], s["hb_sent"], s["frames_in"])')
STATS_END=$(tail -n1 "$STATE/mc-1.stats")
if [ "$PERF" = 1 ]; then
  perf record -g -o "$STATE/perf.data" -p "$PID" -- sleep 10 >/dev/null 2>&1 || true
  {
    echo "-- by thread"
    # (perf's "pid" sort key is per thread: "TID:<thread name>")
    perf report -i "$STATE/perf.data" --no-children --sort pid --stdio -g none 2>/dev/null \
        | grep -v '^#' | grep '%' | head -6
    for tid in $(perf report -i "$STATE/perf.data" --no-children --sort pid --stdio -g none 2>/dev/null \
                 | grep -v '^#' | grep '%' | head -3 | grep -o '[0-9]*:[A-Za-z0-9_-]*' | cut -d: -f1); do
      echo "-- thread $tid: top symbols"
      perf report -i "$STATE/perf.data" --no-children --tid "$tid" --sort dso,symbol --stdio -g none 2>/dev/null \
          | grep -v '^#' | grep '%' | head -25
    done
  } >"$STATE/perf.top" || true
fi
for p in "${MCPIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
for p in "${MCPIDS[@]}"; do reap "$p"; done
sleep 5
RSS2=$(rss_kb "$PID")

$PY - "$N" "$WINDOW" "$HZ" "$RSS0" "$RSS1" "$RSS2" 0 0 "$CPU0" "$CPU1" "$W0" "$W1" \
    "$ST0" "$ST1" "$MC0" "$MC1" "$C_BEFORE" "$C_AFTER" "${T_UP:-0}" "$LOAD_START" "$LOAD_END" \
    "$THREADS_CPU" "$STATS_END" <<'EOF'
import json, sys
a = sys.argv[1:]
n, window, hz = int(a[0]), int(a[1]), int(a[2])
rss0, rss1, rss2, sock0, sock1 = map(int, a[3:8])
cpu0, cpu1, w0, w1 = map(int, a[8:12])
st0, st1 = list(map(int, a[12].split())), list(map(int, a[13].split()))
mc0, mc1 = int(a[14]), int(a[15])
cb, ca = a[16].split(), a[17].split()
t_up, load_start, load_end, threads, stats = int(a[18]), a[19], a[20], a[21], a[22]
secs = (w1 - w0) / 1000.0
core = lambda d: 100.0 * d / hz / secs
s = json.loads(stats)
print("== sessions: %d held by one instance at 1 s heartbeats (all up after %.1f s)" % (s["connected"], t_up / 1000.0))
print("   timeouts/claims/sessions/lost_byes/fenced before the window: %s; after: %s" % (" ".join(cb), " ".join(ca[:5])))
print("   mockcloud: reconnects %d, losses %d, failures %d" % (s["reconnects"], s["losses"], s["failures"]))
print("== memory: cnapid RSS %d KiB before, %d KiB at %d sessions: %.2f KiB per session; %d KiB after they closed"
      % (rss0, rss1, n, (rss1 - rss0) / n, rss2))
print("== CPU over a %.1f s steady window (load %s -> %s)" % (secs, load_start, load_end))
print("   cnapid: %.2f%% of one core (%.2f us per session-second)" % (core(cpu1 - cpu0), (cpu1 - cpu0) / hz / secs / n * 1e6))
print("   cnapid threads (ticks): %s" % threads.strip())
print("   postgres (stack): %.2f%%, redis: %.2f%%, mockcloud: %.2f%%"
      % (core(st1[0] - st0[0]), core(st1[1] - st0[1]), core(mc1 - mc0)))
print("   last flush: %s ms; hb sent %s, frames in %s" % (ca[5], ca[7], ca[8]))
# The same agents cost mockcloud the same work every run: its CPU tells how
# fast the machine was (docs/benchmarks.md, "Sixth round"). On a quiet
# machine of this kind it is ~8.5 us per agent-second (12.6-13.1% at 15,000).
mc_us = (mc1 - mc0) / hz / secs / n * 1e6
print("   machine yardstick: mockcloud %.2f us per agent-second (quiet machine ~8.5)%s"
      % (mc_us, "" if mc_us < 9.5 else ": SLOW, compare builds side by side only"))
EOF
if [ -s "$STATE/perf.top" ]; then echo "== perf (cnapid, 10 s, top symbols)"; sed 's/^/   /' "$STATE/perf.top"; fi

[ "$FLOOR" = 1 ] || exit 0

# The floor: bare-hub with the same agents (a fresh mockcloud, as above)
ninja -C "$BUILD" bare-hub >/dev/null
kill -TERM "$PID"; reap "$PID"
"$BUILD/bare-hub" 127.0.0.3 "$PORT" 1000 2>"$STATE/bare-hub.log" &
BPID=$!
PIDS+=($!)
"$ROOT/deploy/local/stack" dns-set "$STACK" 127.0.0.3 >/dev/null 2>&1
start_mockcloud "$N" cafeffff mc-floor
FMC=$MC_PID
F_UP=$(wait_connected "$STATE/mc-floor.stats" "$N" 180) || true
log "floor: sessions up after ${F_UP} ms; load $(loadavg)"
sleep 10
B0=$(cpu_ticks "$BPID") M0=$(cpu_ticks "$FMC") W0=$(now_ms)
sleep "$WINDOW"
B1=$(cpu_ticks "$BPID") M1=$(cpu_ticks "$FMC") W1=$(now_ms)
FSTATS=$(tail -n1 "$STATE/mc-floor.stats")
if [ "$PERF" = 1 ]; then
  perf record -g -o "$STATE/perf-floor.data" -p "$BPID" -- sleep 10 >/dev/null 2>&1 || true
  perf report -i "$STATE/perf-floor.data" --no-children --sort dso,symbol --stdio -g none 2>/dev/null \
      | grep -v '^#' | grep '%' | head -25 >"$STATE/perf-floor.top" || true
fi
kill -TERM "$FMC" "$BPID" 2>/dev/null || true
reap "$FMC"; reap "$BPID"
$PY - "$N" "$HZ" "$B0" "$B1" "$M0" "$M1" "$W0" "$W1" "$FSTATS" <<'EOF'
import json, sys
a = sys.argv[1:]
n, hz = int(a[0]), int(a[1])
b0, b1, m0, m1, w0, w1 = map(int, a[2:8])
s = json.loads(a[8])
secs = (w1 - w0) / 1000.0
print("== floor: bare-hub holding %d of %d agents (reconnects %d, losses %d, failures %d)"
      % (s["connected"], n, s["reconnects"], s["losses"], s["failures"]))
print("   bare-hub: %.2f%% of one core (%.2f us per session-second) over %.1f s"
      % (100.0 * (b1 - b0) / hz / secs, (b1 - b0) / hz / secs / n * 1e6, secs))
print("   machine yardstick: mockcloud %.2f us per agent-second" % ((m1 - m0) / hz / secs / n * 1e6))
EOF
if [ "$PERF" = 1 ] && [ -s "$STATE/perf-floor.top" ]; then echo "== perf (bare-hub, 10 s, top symbols)"; sed 's/^/   /' "$STATE/perf-floor.top"; fi
