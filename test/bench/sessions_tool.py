#!/usr/bin/env python3
"""sessions_tool.py: helpers of the session benchmarks (test/bench/*.sh).

  poll URL... --uuids FILE --out FILE [--interval-ms 50] [--max-s 20]
      Every interval, GET /servers?uuids=...&fields=uuid,status (at most 200
      uuids a request) from each URL (one thread per URL, keep-alive) and
      append one JSON line per round: {url, start_ms, end_ms, unknown:
      [uuids], n}. Ends when every uuid read unknown in one round on every
      URL, or after max-s.
  detect --polls FILE --t0-ms T --uuids FILE
      Per server and per URL: the first round that read unknown after T.
      Prints p50/p90/p99/max of (round end - T) and of (round start - T).
  sweep URL... --servers N --out FILE --seconds S
      Read every server's status (pages of 1000, fields=uuid,status) again
      and again from each URL for S seconds; one JSON line per sweep:
      {url, start_ms, end_ms, n, running, unknown, other, unknown_uuids}.
  failover --stats FILE... --t0-ms T --killed NAME [--logs FILE...]
           [--killed-addr IP] [--sweeps FILE]
      From mockcloud --stats lines: orphans, first line with every CN up and
      none on the killed instance (1 s resolution). From mockcloud debug logs
      (per-session lines): per orphan, t0 -> its next "session established"
      (ms). From sweeps: unknown seen by the survivors, and when every
      server read running again.
  rate --stats FILE --from-s A --to-s B
      mockcloud stats: VM events generated and AMQP confirms per second
      between A and B seconds after the first line.
"""
import argparse
import http.client
import json
import sys
import threading
import time
import urllib.parse


def now_ms():
    return int(time.time() * 1000)


def pct(v, p):
    if not v:
        return float("nan")
    v = sorted(v)
    k = max(0, min(len(v) - 1, int(round(p / 100.0 * len(v) + 0.5)) - 1))
    return v[k]


def dist(v, unit="ms"):
    if not v:
        return "no samples"
    return "n=%d p50 %d %s, p90 %d, p99 %d, max %d (min %d)" % (
        len(v), pct(v, 50), unit, pct(v, 90), pct(v, 99), max(v), min(v))


class Conn:
    def __init__(self, url):
        u = urllib.parse.urlparse(url)
        self.host, self.port = u.hostname, u.port
        self.c = None

    def get(self, path, timeout=5.0):
        for attempt in range(2):
            try:
                if self.c is None:
                    self.c = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
                self.c.request("GET", path)
                r = self.c.getresponse()
                body = r.read()
                return r.status, body
            except (OSError, http.client.HTTPException):
                try:
                    self.c.close()
                except Exception:
                    pass
                self.c = None
        return 0, b""


def cmd_poll(a):
    uuids = [l.strip() for l in open(a.uuids) if l.strip()]
    chunks = [uuids[i:i + 200] for i in range(0, len(uuids), 200)]
    out = open(a.out, "a")
    lock = threading.Lock()
    deadline = time.time() + a.max_s
    done = {}

    def run(url):
        c = Conn(url)
        nxt = time.time()
        rounds = 0
        while time.time() < deadline and rounds < 100000:
            rounds += 1
            start = now_ms()
            unknown, n, ok = [], 0, True
            for ch in chunks:
                st, body = c.get("/servers?fields=uuid,status&uuids=" + ",".join(ch))
                if st != 200:
                    ok = False
                    continue
                for s in json.loads(body):
                    n += 1
                    if s.get("status") != "running":
                        unknown.append(s["uuid"])
            end = now_ms()
            with lock:
                out.write(json.dumps({"url": url, "start_ms": start, "end_ms": end,
                                      "unknown": unknown, "n": n, "ok": ok}) + "\n")
                out.flush()
            if ok and n == len(uuids) and len(unknown) == n and n > 0:
                done[url] = True
                return
            nxt += a.interval_ms / 1000.0
            d = nxt - time.time()
            if d > 0:
                time.sleep(d)
            else:
                nxt = time.time()

    ts = [threading.Thread(target=run, args=(u,)) for u in a.url]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    print("poll: %d of %d URLs saw every server unknown" % (len(done), len(a.url)))


def cmd_detect(a):
    uuids = set(l.strip() for l in open(a.uuids) if l.strip())
    first = {}          # (url, uuid) -> (start - t0, end - t0)
    before = {}         # url -> unknown count in the last round before t0
    rounds = {}
    for l in open(a.polls):
        r = json.loads(l)
        url = r["url"]
        rounds.setdefault(url, []).append(r["end_ms"] - r["start_ms"])
        if r["end_ms"] <= a.t0_ms:
            before[url] = len([u for u in r["unknown"] if u in uuids])
            continue
        for u in r["unknown"]:
            if u in uuids and (url, u) not in first:
                first[(url, u)] = (r["start_ms"] - a.t0_ms, r["end_ms"] - a.t0_ms)
    for url in sorted(rounds):
        ends = [v[1] for k, v in first.items() if k[0] == url]
        starts = [v[0] for k, v in first.items() if k[0] == url]
        rt = rounds[url]
        print("   %s: %d/%d servers went unknown (unknown before the kill: %d); round %d-%d ms"
              % (url, len(ends), len(uuids), before.get(url, 0), min(rt), max(rt)))
        print("      detection (round end - t0):   %s" % dist(ends))
        print("      detection (round start - t0): %s" % dist(starts))
        if a.json:
            with open(a.json, "a") as f:
                f.write(json.dumps({"url": url, "ends": ends, "starts": starts}) + "\n")


def cmd_sweep(a):
    out = open(a.out, "a")
    deadline = time.time() + a.seconds

    def run(url):
        c = Conn(url)
        for _ in range(100000):
            if time.time() >= deadline:
                return
            start = now_ms()
            n = running = unknown = other = 0
            uu = []
            ok = True
            for off in range(0, a.servers, 1000):
                st, body = c.get("/servers?fields=uuid,status&limit=1000&offset=%d" % off)
                if st != 200:
                    ok = False
                    continue
                for s in json.loads(body):
                    n += 1
                    if s.get("status") == "running":
                        running += 1
                    elif s.get("status") == "unknown":
                        unknown += 1
                        uu.append(s["uuid"])
                    else:
                        other += 1
            out.write(json.dumps({"url": url, "start_ms": start, "end_ms": now_ms(), "n": n,
                                  "running": running, "unknown": unknown, "other": other,
                                  "ok": ok, "unknown_uuids": uu[:50]}) + "\n")
            out.flush()

    ts = [threading.Thread(target=run, args=(u,)) for u in a.url]
    for t in ts:
        t.start()
    for t in ts:
        t.join()


def cmd_failover(a):
    t0 = a.t0_ms
    total_cns = 0
    orphans = 0
    t_all = []
    for f in a.stats:
        lines = [json.loads(l) for l in open(f) if l.startswith("{")]
        lines = [l for l in lines if l.get("type") == "stats"]
        pre = [l for l in lines if l["time_ms"] <= t0]
        post = [l for l in lines if l["time_ms"] > t0]
        if not pre:
            continue
        cns = pre[-1]["cns"]
        total_cns += cns
        orphans += pre[-1]["instances"].get(a.killed, 0)
        ok = [l for l in post if l["connected"] >= cns and l["instances"].get(a.killed, 0) == 0]
        t_all.append(ok[0]["time_ms"] - t0 if ok else None)
        lmin = min((l["connected"] for l in post), default=cns)
        print("   %s: %d CNs, %d on %s before the kill; fewest connected after: %d; all up "
              "and none on %s at the first stats line %s ms after the kill"
              % (f, cns, pre[-1]["instances"].get(a.killed, 0), a.killed, lmin, a.killed,
                 ok[0]["time_ms"] - t0 if ok else "never"))
    if t_all:
        worst = None if None in t_all else max(t_all)
        print("== stats lines (1 s resolution): %d orphans of %d CNs; every CN up again <= %s ms "
              "after the kill" % (orphans, total_cns, worst if worst is not None else "never"))
    if a.logs:
        lost, est, fails = {}, {}, {}
        for f in a.logs:
            for l in open(f):
                if not l.startswith("{"):
                    continue
                try:
                    d = json.loads(l)
                except ValueError:
                    continue
                u = d.get("server_uuid")
                if not u:
                    continue
                t = d.get("time")
                if not t:
                    continue
                ms = iso_ms(t)
                if ms < t0 - 50:
                    continue
                m = d.get("msg")
                if (m == "session lost" and u not in lost
                        and (not a.killed_addr or d.get("address", "").startswith(a.killed_addr + ":"))):
                    lost[u] = ms
                elif m == "session established" and u in lost and u not in est:
                    est[u] = ms
                elif m == "session attempt failed" and u in lost and u not in est:
                    fails[u] = fails.get(u, 0) + 1
        rec = [est[u] - t0 for u in lost if u in est]
        after_loss = [est[u] - lost[u] for u in lost if u in est]
        detect = [lost[u] - t0 for u in lost]
        print("== per-agent (mockcloud debug log, ms): %d sessions lost, %d re-established"
              % (len(lost), len(rec)))
        print("   kill -> agent noticed:         %s" % dist(detect))
        print("   kill -> re-established:        %s" % dist(rec))
        print("   noticed -> re-established:     %s" % dist(after_loss))
        fl = list(fails.values())
        print("   failed attempts per orphan: mean %.2f, max %d"
              % (sum(fl) / max(1, len(lost)), max(fl) if fl else 0))
    if a.sweeps:
        sw = [json.loads(l) for l in open(a.sweeps)]
        post = [s for s in sw if s["start_ms"] >= t0 - 100]
        seen = set()
        worst = 0
        for s in post:
            seen.update(s["unknown_uuids"])
            worst = max(worst, s["unknown"])
        print("== status from the survivors during the failover: %d sweeps of all servers "
              "(%d-%d ms each); most unknown in one sweep: %d; servers ever unknown: %d%s"
              % (len(post), min((s["end_ms"] - s["start_ms"] for s in post), default=0),
                 max((s["end_ms"] - s["start_ms"] for s in post), default=0), worst, len(seen),
                 " (first 50 per sweep listed)" if worst > 50 else ""))
        by = {}
        for s in post:
            by.setdefault(s["url"], []).append(s)
        for url, ss in sorted(by.items()):
            allrun = [s for s in ss if s["ok"] and s["running"] == s["n"] and s["n"] > 0]
            print("   %s: %d sweeps, unknown per sweep max %d; first sweep with all %d running "
                  "started %s ms after the kill"
                  % (url, len(ss), max(s["unknown"] for s in ss), ss[-1]["n"],
                     allrun[0]["start_ms"] - t0 if allrun else "never"))


def iso_ms(t):
    # 2026-11-30T17:44:01.804Z
    import calendar
    base, frac = t.rstrip("Z").split(".")
    return calendar.timegm(time.strptime(base, "%Y-%m-%dT%H:%M:%S")) * 1000 + int(frac[:3].ljust(3, "0"))


def cmd_rate(a):
    lines = [json.loads(l) for l in open(a.stats) if l.startswith("{")]
    lines = [l for l in lines if l.get("type") == "stats"]
    if not lines:
        print("no stats lines")
        return
    t_first = lines[0]["time_ms"]
    w = [l for l in lines if a.from_s * 1000 <= l["time_ms"] - t_first <= a.to_s * 1000]
    if len(w) < 2:
        print("window too short")
        return
    x, y = w[0], w[-1]
    secs = (y["time_ms"] - x["time_ms"]) / 1000.0
    ev = (y["vm_events"] - x["vm_events"]) / secs
    conf = (y["amqp"]["confirmed"] - x["amqp"]["confirmed"]) / secs
    print("   over %.1f s: VM events generated %.0f/s, AMQP confirmed %.0f/s; at the end: "
          "buffered %d, inflight %d, dropped %d, nacked %d, republished %d"
          % (secs, ev, conf, y["amqp"]["buffered"], y["amqp"]["inflight"],
             y["amqp"]["dropped"], y["amqp"]["nacked"], y["amqp"]["republished"]))


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("poll")
    s.add_argument("url", nargs="+")
    s.add_argument("--uuids", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--interval-ms", type=int, default=50)
    s.add_argument("--max-s", type=float, default=20)
    s = sub.add_parser("detect")
    s.add_argument("--polls", required=True)
    s.add_argument("--t0-ms", type=int, required=True)
    s.add_argument("--uuids", required=True)
    s.add_argument("--json")
    s = sub.add_parser("sweep")
    s.add_argument("url", nargs="+")
    s.add_argument("--servers", type=int, required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--seconds", type=float, required=True)
    s = sub.add_parser("failover")
    s.add_argument("--stats", nargs="+", required=True)
    s.add_argument("--t0-ms", type=int, required=True)
    s.add_argument("--killed", required=True)
    s.add_argument("--logs", nargs="*")
    s.add_argument("--killed-addr", help="the killed instance's IP (sessions lost elsewhere are ignored)")
    s.add_argument("--sweeps")
    s = sub.add_parser("rate")
    s.add_argument("--stats", required=True)
    s.add_argument("--from-s", type=float, default=5)
    s.add_argument("--to-s", type=float, default=25)
    a = p.parse_args()
    {"poll": cmd_poll, "detect": cmd_detect, "sweep": cmd_sweep, "failover": cmd_failover,
     "rate": cmd_rate}[a.cmd](a)


if __name__ == "__main__":
    main()
