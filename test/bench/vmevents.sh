#!/usr/bin/env bash
# vmevents.sh: VM events through AMQP with publisher confirms (issue 3,
# target 4).
#
#   test/bench/vmevents.sh [--messages M] [--rate R] [--cns C] [--seconds S]
#                          [--instances-only]
#
# A durable classic queue bench.vmevents is bound to vm.event.# (a consumer
# of every CN's events, as VMAPI would bind), so each event is routed and
# stored by the broker; it is not consumed during the runs and is deleted
# after each one.
# 1. Ceiling: sysinfo-burst --bench-raw: M persistent messages straight to a
#    queue with confirms (window 1000), at the VM events' size.
# 2. The publisher library alone: bench-publisher (one cn_publisher, window
#    1000, the agent's own event generation: lib/cn_vmdummy.c changes ->
#    docs/vm-events.md messages), M events, rate = M / (first send .. last
#    confirm); again with --pregen (events made before the clock starts: the
#    library and the broker only), and with --pregen and no queue bound (the
#    broker confirms without storing: the library's own limit).
# 3. mockcloud --count C --vms-per-cn 10 --event-rate R --amqp: the whole
#    agent path; the confirmed rate from its --stats lines over S seconds
#    (after 5 s of warm-up). No cnapid runs (DNS has no address: the agents'
#    sessions stay down, their events are still published), so the figure is
#    the agent's AMQP path alone.
# 4. As three cnapid instances consume them: three non-durable queues, each
#    bound per server to the servers its instance owns, drained while the
#    events are published (bench-publisher --instances 3 --consume), by 1, 2
#    and 4 publishers (each its own connection, as each CN has its own);
#    the rate is every confirm (and every delivery) over one clock.
# --instances-only runs part 4 alone.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/sessions_lib.sh"
M=200000 RATE=25000 CNS=1000 SECS=20 ONLY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --messages) M=$2; shift 2 ;;
    --rate) RATE=$2; shift 2 ;;
    --cns) CNS=$2; shift 2 ;;
    --seconds) SECS=$2; shift 2 ;;
    --instances-only) ONLY=1; shift ;;
    *) sed -n '2,28p' "$0"; exit 2 ;;
  esac
done
bench_init bvmevents
ninja -C "$BUILD" bench-publisher >/dev/null
"$ROOT/deploy/local/stack" dns-set "$STACK" >/dev/null 2>&1
Q=bench.vmevents
"$BUILD/bench-publisher" --url "$CNAPI_AMQP_URL" --delete-only --queue "$Q" 2>/dev/null || true

instances() {
  for p in 1 2 4; do
    echo "== 3 instance queues, consumed; $p publisher(s): bench-publisher --instances 3 --consume --publishers $p (load $(loadavg))"
    "$BUILD/bench-publisher" --url "$CNAPI_AMQP_URL" --messages "$M" --queue "$Q" --instances 3 \
        --consume --publishers "$p" 2>>"$STATE/bench-publisher.log" | sed 's/^/   /'
  done
}
if [ "$ONLY" = 1 ]; then instances; exit 0; fi

echo "== the publisher library: bench-publisher --messages $M (load $(loadavg))"
OUT=$("$BUILD/bench-publisher" --url "$CNAPI_AMQP_URL" --messages "$M" --queue "$Q" 2>>"$STATE/bench-publisher.log")
echo "   $OUT"
SIZE=$(echo "$OUT" | $PY -c 'import json,sys; print(int(json.load(sys.stdin)["avg_body"]))')
echo "== the same, events made first (--pregen: the library and the broker only) (load $(loadavg))"
echo "   $("$BUILD/bench-publisher" --url "$CNAPI_AMQP_URL" --messages "$M" --queue "$Q" --pregen 2>>"$STATE/bench-publisher.log")"
echo "== the same, --pregen with no queue bound (unroutable: confirmed without being stored) (load $(loadavg))"
echo "   $("$BUILD/bench-publisher" --url "$CNAPI_AMQP_URL" --messages "$M" --queue "" --pregen 2>>"$STATE/bench-publisher.log")"

echo "== ceiling: sysinfo-burst --bench-raw --messages $M --size $SIZE --confirm-window 1000 (load $(loadavg))"
"$BUILD/sysinfo-burst" --url "$CNAPI_AMQP_URL" --bench-raw --messages "$M" --size "$SIZE" \
    --confirm-window 1000 | sed 's/^/   /'

echo "== mockcloud --count $CNS --vms-per-cn 10 --event-rate $RATE (load $(loadavg))"
"$BUILD/bench-publisher" --url "$CNAPI_AMQP_URL" --declare-only --queue "$Q"
"$BUILD/mockcloud" --count "$CNS" --vms-per-cn 10 --event-rate "$RATE" --amqp "$CNAPI_AMQP_URL" \
    --resolver "$CNAPI_DNS_SERVER" --cnapi-port 9 --stats --run-for $((SECS + 6)) --log-level warn \
    >"$STATE/mc.stats" 2>"$STATE/mc.log" &
MC=$!
PIDS+=($MC)
reap "$MC"
$TOOL rate --stats "$STATE/mc.stats" --from-s 5 --to-s $((SECS + 5))
echo "   load at the end: $(loadavg)"
"$BUILD/bench-publisher" --url "$CNAPI_AMQP_URL" --delete-only --queue "$Q"
instances
