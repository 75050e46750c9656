#!/usr/bin/env bash
# detect.sh: agent death to `unknown`, as read from an instance (issue 3,
# target 3).
#
#   test/bench/detect.sh [--cns N] [--trials K] [--background B] [--interval-ms MS]
#
# Two cnapid: bench-1 (127.0.0.2) is the only one in DNS, so it owns every
# session; bench-2 (127.0.0.3) learns the status over the cnapi:status
# channel. B background sessions (default 5000) keep bench-1 busy as in
# production. Then K trials (default 5) of each kind, each with a fresh
# mockcloud of N CNs (default 200, its own uuid prefix, records seeded):
#   closed: kill -9 the mockcloud: the kernel closes its sockets (FIN);
#   silent: SIGSTOP the mockcloud: its sockets stay open and silent (a
#           cut-off: nothing is sent, nothing is closed); afterwards KILL+CONT.
# Each trial waits 8 s after the CNs are up (past the agents' stable mark),
# then polls GET /servers?uuids=<the N>&fields=uuid,status on both instances
# every MS (default 50) from 1 s before t0 (the signal) until all read
# unknown (bounded: 15 s). Detection per server = the first round that read
# unknown; reported as round end - t0 (an upper bound; round start - t0 is
# the lower bound), p50/p90/p99/max per instance and kind.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/sessions_lib.sh"
N=200 K=5 BG=5000 IV=50
while [ $# -gt 0 ]; do
  case "$1" in
    --cns) N=$2; shift 2 ;;
    --trials) K=$2; shift 2 ;;
    --background) BG=$2; shift 2 ;;
    --interval-ms) IV=$2; shift 2 ;;
    *) sed -n '2,21p' "$0"; exit 2 ;;
  esac
done
[ "$N" -le 1000 ] || { echo "--cns: at most 1000 (5 requests of 200 uuids a round)"; exit 2; }
bench_init bdetect
rm -f "$STATE"/poll-*.jsonl "$STATE"/detect-*.jsonl   # appended to: a previous run's are not this one's
start_cnapid 1
start_cnapid 2
wait_ready 1
wait_ready 2
"$ROOT/deploy/local/stack" dns-set "$STACK" 127.0.0.2 >/dev/null 2>&1
log "seeding $BG background + $((2 * K)) x $N trial server records"
[ "$BG" -gt 0 ] && seed_servers "$BG" cafe0000 2
for t in $(seq 1 $((2 * K))); do seed_servers "$N" "$(printf 'dead%04x' "$t")" 2; done
if [ "$BG" -gt 0 ]; then
  "$BUILD/mockcloud" --count "$BG" --prefix cafe0000 --amqp none --resolver "$CNAPI_DNS_SERVER" \
      --cnapi-port "$PORT" --stats --log-level warn >"$STATE/bg.stats" 2>"$STATE/bg.log" &
  PIDS+=($!)
  wait_connected "$STATE/bg.stats" "$BG" 180 >/dev/null || log "background: not all up"
fi
rm -f "$STATE"/detect-*.jsonl
for t in $(seq 1 $((2 * K))); do
  kind=closed
  [ $((t % 2)) = 0 ] && kind=silent
  prefix=$(printf 'dead%04x' "$t")
  $PY -c "import sys; [print('%s-0000-4000-8000-%012x' % (sys.argv[1], i)) for i in range(int(sys.argv[2]))]" \
      "$prefix" "$N" >"$STATE/uuids-$t"
  "$BUILD/mockcloud" --count "$N" --prefix "$prefix" --amqp none --resolver "$CNAPI_DNS_SERVER" \
      --cnapi-port "$PORT" --stats --log-level warn >"$STATE/t$t.stats" 2>"$STATE/t$t.log" &
  MC=$!
  PIDS+=($MC)
  wait_connected "$STATE/t$t.stats" "$N" 60 >/dev/null || log "trial $t: not all up"
  sleep 8
  $TOOL poll "http://127.0.0.2:$PORT" "http://127.0.0.3:$PORT" --uuids "$STATE/uuids-$t" \
      --out "$STATE/poll-$t.jsonl" --interval-ms "$IV" --max-s 16 >/dev/null &
  PP=$!
  PIDS+=($PP)
  sleep 1
  L=$(loadavg)
  T0=$(now_ms)
  if [ "$kind" = closed ]; then kill -KILL "$MC"; else kill -STOP "$MC"; fi
  reap "$PP"
  if [ "$kind" = silent ]; then kill -KILL "$MC"; kill -CONT "$MC" 2>/dev/null || true; fi
  reap "$MC"
  echo "== trial $t ($kind, $N CNs, load $L)"
  $TOOL detect --polls "$STATE/poll-$t.jsonl" --t0-ms "$T0" --uuids "$STATE/uuids-$t" \
      --json "$STATE/detect-$kind.jsonl"
done
echo "== all trials: detection time (round end - t0), per instance and kind"
$PY - "$STATE" "$PORT" <<'EOF'
import json, sys
state, port = sys.argv[1], sys.argv[2]
def pct(v, p):
    v = sorted(v); k = max(0, min(len(v) - 1, int(round(p / 100.0 * len(v) + 0.5)) - 1)); return v[k]
for kind in ("closed", "silent"):
    by = {}
    try:
        lines = [json.loads(l) for l in open("%s/detect-%s.jsonl" % (state, kind))]
    except OSError:
        continue
    for r in lines:
        e = by.setdefault(r["url"], ([], []))
        e[0].extend(r["ends"]); e[1].extend(r["starts"])
    for url, (ends, starts) in sorted(by.items()):
        if not ends:
            continue
        role = "owner" if url.startswith("http://127.0.0.2:") else "other instance"
        print("   %-6s %-14s n=%d  p50 %d ms, p90 %d, p99 %d, max %d   (round start - t0: p50 %d, p99 %d)"
              % (kind, role, len(ends), pct(ends, 50), pct(ends, 90), pct(ends, 99), max(ends),
                 pct(starts, 50), pct(starts, 99)))
EOF
