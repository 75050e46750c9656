"""tasks_tool.py: the load generator and the arithmetic of test/bench/tasks.sh
(issue 4). Standard library only; plain HTTP/1.1 keep-alive sockets, one per
sender (dispatch and max: each sender its own process).

  dispatch --url URL --prefix HEX8 --cns N --vms V --rate R --seconds S
           [--threads T] [--out FILE]
      POST /servers/:uuid/vms/:vm/update ({}) at R/s for S s (open loop:
      thread k sends requests k, k+T, ... at their scheduled times; a thread
      that is late sends at once and the lateness is counted). Writes one
      line per task: "<id> <send_ms> <answer_ms> <status>" (wall clock ms,
      float). Prints a JSON summary (achieved rate, answer latency).
  max      same with --threads T closed-loop senders and no pacing (R ignored)
  agent    --url http://127.0.0.1:AGENT_PORT --prefix HEX8 --seconds S --threads T
      the ceiling: POST /tasks straight to mockcloud (see cmd_agent)
  report   --sent FILE --records FILE
      records: one task record (JSON) per line, as the store holds them
      (psql -At "SELECT _value FROM cnapi_tasks"). Dispatch latency = the
      agent's `start` event time (history[0].timestamp, the agent's clock,
      1 ms resolution) - the client's send time. Prints a JSON summary.
  waits    --api URL_A --wait URL_C --prefix HEX8 --cns N --vms V --count K
           --rate R [--wait-timeout S]
      K machine_reboot tasks on distinct VMs, POSTed on A at R/s; right after
      each 200 a GET /tasks/:id/wait on C (its own connection and thread). The
      latency of a wait = when its answer was read - the task's finished_at
      in the answered record (the agent's task_end time). Only waits sent
      before that end count (the others were answered from the store read).
      --out FILE: "<id> <finished_ms> <answer_ms>" per counted wait.
  wsplit   --sent FILE (waits --out) --mtimes FILE (psql "_key|_mtime" lines)
      splits each wait's time at B's write of the end (the row's _mtime).
"""

import argparse
import datetime
import json
import os
import socket
import sys
import threading
import time
import urllib.parse


def now_ms():
    return time.time() * 1000.0


def iso_ms(s):
    # 2024-01-02T03:04:05.678Z
    d = datetime.datetime.strptime(s, "%Y-%m-%dT%H:%M:%S.%fZ").replace(
        tzinfo=datetime.timezone.utc)
    return d.timestamp() * 1000.0


def pct(xs, p):
    if not xs:
        return None
    xs = sorted(xs)
    k = min(len(xs) - 1, max(0, int(round(p / 100.0 * len(xs) + 0.5)) - 1))
    return round(xs[k], 2)


def summary(xs):
    return {"n": len(xs), "p50": pct(xs, 50), "p90": pct(xs, 90), "p99": pct(xs, 99),
            "max": round(max(xs), 2) if xs else None}


class Conn:
    """One keep-alive HTTP/1.1 connection; request() returns (status, body)."""

    def __init__(self, url, timeout=30):
        u = urllib.parse.urlsplit(url)
        self.host, self.port = u.hostname, u.port or 80
        self.timeout = timeout
        self.sock = None
        self.buf = b""

    def _connect(self):
        self.sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def close(self):
        if self.sock:
            self.sock.close()
        self.sock = None

    def send(self, method, path, body=None, headers=""):
        if self.sock is None:
            self._connect()
        data = body.encode() if body is not None else b""
        head = "%s %s HTTP/1.1\r\nHost: %s:%d\r\n%s" % (method, path, self.host, self.port,
                                                        headers)
        if body is not None:
            head += "Content-Type: application/json\r\nContent-Length: %d\r\n" % len(data)
        self.sock.sendall(head.encode() + b"\r\n" + data)

    def read(self):
        while b"\r\n\r\n" not in self.buf:
            c = self.sock.recv(65536)
            if not c:
                raise ConnectionError("closed")
            self.buf += c
        head, rest = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        n = 0
        close = False
        for ln in lines[1:]:
            k, _, v = ln.partition(":")
            k = k.strip().lower()
            if k == "content-length":
                n = int(v.strip())
            elif k == "connection" and v.strip().lower() == "close":
                close = True
        while len(rest) < n:
            c = self.sock.recv(65536)
            if not c:
                raise ConnectionError("closed")
            rest += c
        body, self.buf = rest[:n], rest[n:]
        if close:
            self.close()
        return status, body

    def request(self, method, path, body=None, headers=""):
        try:
            self.send(method, path, body, headers)
            return self.read()
        except (OSError, ConnectionError):
            self.close()
            raise


def server_uuid(prefix, i):
    return "%s-0000-4000-8000-%012x" % (prefix, i)


def vm_uuid(prefix, i, j):
    return "%s-%04x-4000-a000-%012x" % (prefix, j, i)


def cmd_dispatch(a, closed=False):
    total = int(a.rate * a.seconds) if not closed else None
    t0 = now_ms() + 200.0
    end_ms = t0 + a.seconds * 1000.0
    out = [[] for _ in range(a.threads)]
    late = [0] * a.threads
    errors = [0] * a.threads

    def worker(k):
        c = Conn(a.url)
        n = k
        while True:
            if closed:
                if now_ms() >= end_ms:
                    break
            else:
                if n >= total:
                    break
                due = t0 + n * 1000.0 / a.rate
                d = due - now_ms()
                if d > 0:
                    time.sleep(d / 1000.0)
                elif d < -5:
                    late[k] += 1
            i = n % a.cns
            j = (n // a.cns) % a.vms
            path = "/servers/%s/vms/%s/update" % (server_uuid(a.prefix, i), vm_uuid(a.prefix, i, j))
            ts = now_ms()
            try:
                st, body = c.request("POST", path, "{}")
            except (OSError, ConnectionError):
                errors[k] += 1
                n += a.threads
                continue
            ta = now_ms()
            tid = "-"
            if st == 200:
                tid = json.loads(body)["id"]
            else:
                errors[k] += 1
            out[k].append((tid, ts, ta, st))
            n += a.threads
        c.close()

    # one process per sender: threads of one interpreter share its lock, and
    # a sender waiting for it (up to the 5 ms switch interval) would count
    # that wait as the server's latency
    kids = []
    for k in range(a.threads):
        rfd, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(rfd)
            code = 0
            try:
                worker(k)
                data = json.dumps({"rows": out[k], "late": late[k], "errors": errors[k]}).encode()
                with os.fdopen(wfd, "wb") as w:
                    w.write(data)
            except BaseException:
                code = 1
            os._exit(code)
        os.close(wfd)
        kids.append((pid, rfd))
    for k, (pid, rfd) in enumerate(kids):
        with os.fdopen(rfd, "rb") as r:
            data = r.read()
        os.waitpid(pid, 0)
        if data:
            d = json.loads(data)
            out[k] = [tuple(x) for x in d["rows"]]
            late[k] = d["late"]
            errors[k] = d["errors"]
        else:
            errors[k] += 1
    rows = sorted((r for o in out for r in o), key=lambda r: r[1])
    if a.out:
        with open(a.out, "w") as f:
            for r in rows:
                f.write("%s %.3f %.3f %d\n" % r)
    ok = [r for r in rows if r[3] == 200]
    span = (rows[-1][1] - rows[0][1]) / 1000.0 if len(rows) > 1 else 0
    print(json.dumps({
        "mode": "max" if closed else "paced", "target_rate": None if closed else a.rate,
        "threads": a.threads, "sent": len(rows), "ok": len(ok), "errors": sum(errors),
        "late_sends": sum(late),
        "achieved_rate": round(len(rows) / span, 1) if span else None,
        "answer_ms": summary([r[2] - r[1] for r in ok])}))


def cmd_agent(a):
    """The agent's own accept path (the ceiling of a dispatch): T closed-loop
    senders POST /tasks (machine_update, x-cnapi-task-id) straight to the
    mockcloud endpoint for S seconds, one connection per request as the
    instance's dispatcher does. The frames go to an instance that has no
    record of these ids: it acks them."""
    import uuid as uuidlib
    end_ms = now_ms() + a.seconds * 1000.0
    lat = [[] for _ in range(a.threads)]
    errs = [0] * a.threads

    def worker(k):
        n = k
        while now_ms() < end_ms:
            i = n % a.cns
            j = (n // a.cns) % a.vms
            body = json.dumps({"task": "machine_update",
                               "params": {"uuid": vm_uuid(a.prefix, i, j)}})
            hdr = "x-server-uuid: %s\r\nx-cnapi-task-id: %s\r\n" % (
                server_uuid(a.prefix, i), uuidlib.uuid4())
            c = Conn(a.url)
            ts = now_ms()
            try:
                st, _b = c.request("POST", "/tasks", body, hdr)
            except (OSError, ConnectionError):
                st = 0
            c.close()
            if st == 202:
                lat[k].append(now_ms() - ts)
            else:
                errs[k] += 1
            n += a.threads

    ths = [threading.Thread(target=worker, args=(k,)) for k in range(a.threads)]
    for t in ths:
        t.start()
    for t in ths:
        t.join()
    xs = [x for l in lat for x in l]
    print(json.dumps({"mode": "agent", "threads": a.threads, "accepted": len(xs),
                      "errors": sum(errs), "rate": round(len(xs) / a.seconds, 1),
                      "post_to_202_ms": summary(xs)}))


def cmd_wsplit(a):
    """Split each wait's end-to-answer time at the end's commit on B: the
    record's _mtime (B's clock when it wrote the end) - finished_at (agent)
    = the frame to B and B's write; answer - _mtime = the publish, C's read
    and the answer."""
    mt = {}
    with open(a.mtimes) as f:
        for ln in f:
            k, _, v = ln.strip().partition("|")
            if v:
                mt[k] = float(v)
    to_b, to_c = [], []
    with open(a.sent) as f:
        for ln in f:
            tid, fin, t = ln.split()
            if tid in mt:
                to_b.append(mt[tid] - float(fin))
                to_c.append(float(t) - mt[tid])
    print(json.dumps({"end_to_B_commit_ms": summary(to_b),
                      "B_commit_to_C_answer_ms": summary(to_c)}))


def cmd_report(a):
    sent = {}
    with open(a.sent) as f:
        for ln in f:
            tid, ts, ta, st = ln.split()
            if st == "200":
                sent[tid] = (float(ts), float(ta))
    lat, ans, missing, nostart = [], [], 0, 0
    ends = []
    seen = set()
    with open(a.records) as f:
        for ln in f:
            ln = ln.strip()
            if not ln:
                continue
            r = json.loads(ln)
            tid = r.get("id")
            if tid not in sent:
                continue
            seen.add(tid)
            h = r.get("history") or []
            st = [e for e in h if e.get("name") == "start"]
            if not st:
                nostart += 1
                continue
            ts, ta = sent[tid]
            lat.append(iso_ms(st[0]["timestamp"]) - ts)
            ans.append(ta - ts)
            if r.get("status") != "active":
                ends.append(r.get("status"))
    missing = len(sent) - len(seen)
    print(json.dumps({"tasks": len(sent), "records_missing": missing, "no_start_event": nostart,
                      "ended": len(ends), "complete": ends.count("complete"),
                      "dispatch_ms": summary(lat), "answer_ms": summary(ans)}))


def cmd_waits(a):
    results = []
    lock = threading.Lock()
    errors = []
    ths = []

    def waiter(tid, sent_at):
        c = Conn(a.wait, timeout=a.wait_timeout + 10)
        try:
            c.send("GET", "/tasks/%s/wait?timeout=%d" % (tid, a.wait_timeout))
            ws = now_ms()
            st, body = c.read()
            t = now_ms()
        except (OSError, ConnectionError) as e:
            with lock:
                errors.append(str(e))
            return
        finally:
            c.close()
        with lock:
            results.append((tid, ws, t, st, body))

    c = Conn(a.api)
    t0 = now_ms() + 100.0
    for n in range(a.count):
        due = t0 + n * 1000.0 / a.rate
        d = due - now_ms()
        if d > 0:
            time.sleep(d / 1000.0)
        i = n % a.cns
        j = (n // a.cns) % a.vms
        path = "/servers/%s/vms/%s/reboot" % (server_uuid(a.prefix, i), vm_uuid(a.prefix, i, j))
        st, body = c.request("POST", path, "{}")
        if st != 200:
            errors.append("POST %d %s" % (st, body[:200]))
            continue
        tid = json.loads(body)["id"]
        t = threading.Thread(target=waiter, args=(tid, now_ms()))
        t.start()
        ths.append(t)
    c.close()
    for t in ths:
        t.join(a.wait_timeout + 20)
    lat, early, statuses, kept = [], 0, {}, []
    for tid, ws, t, st, body in results:
        if st != 200:
            statuses[st] = statuses.get(st, 0) + 1
            continue
        r = json.loads(body)
        s = r.get("status")
        statuses[s] = statuses.get(s, 0) + 1
        if s == "active" or not r.get("finished_at"):
            continue
        fin = iso_ms(r["finished_at"])
        if ws >= fin:
            early += 1          # the wait came after the end: answered from the read
            continue
        lat.append(t - fin)
        kept.append((tid, fin, t))
    if a.out:
        with open(a.out, "w") as f:
            for tid, fin, t in kept:
                f.write("%s %.3f %.3f\n" % (tid, fin, t))
    print(json.dumps({"tasks": a.count, "rate": a.rate, "answers": len(results),
                      "errors": errors[:5], "n_errors": len(errors), "statuses": statuses,
                      "wait_sent_after_end": early, "end_to_answer_ms": summary(lat)}))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("cmd", choices=["dispatch", "max", "report", "waits", "agent", "wsplit"])
    p.add_argument("--url")
    p.add_argument("--api")
    p.add_argument("--wait")
    p.add_argument("--prefix")
    p.add_argument("--cns", type=int, default=100)
    p.add_argument("--vms", type=int, default=10)
    p.add_argument("--rate", type=float, default=100)
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--threads", type=int, default=16)
    p.add_argument("--out")
    p.add_argument("--sent")
    p.add_argument("--records")
    p.add_argument("--mtimes")
    p.add_argument("--count", type=int, default=200)
    p.add_argument("--wait-timeout", type=int, default=60)
    a = p.parse_args()
    if a.cmd == "dispatch":
        cmd_dispatch(a)
    elif a.cmd == "max":
        cmd_dispatch(a, closed=True)
    elif a.cmd == "report":
        cmd_report(a)
    elif a.cmd == "agent":
        cmd_agent(a)
    elif a.cmd == "wsplit":
        cmd_wsplit(a)
    else:
        cmd_waits(a)


if __name__ == "__main__":
    main()
