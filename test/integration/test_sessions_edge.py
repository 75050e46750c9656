"""Agent sessions, the edges (proto/session.md, ARCHITECTURE.md "Decisions"):
agents killed or cut off without a close, VM events on AMQP and in the store,
bad frames, and the status rules around cnapid restarts and deaths.

Real RabbitMQ, PostgreSQL, Redis and dnsmasq from the local stack; 2-3 cnapid
instances on 127.0.0.2-4 sharing one port (the agents dial every address the
DNS name gives on one port), agents are mockcloud / provisioner processes
(started here, killed only by their PID, always reaped) or wsagent.py.
"""

import json
import os
import select
import signal
import socket
import subprocess
import threading
import time
import uuid as uuidlib
from pathlib import Path

import harness
import wsagent

TIMEOUT = 90

# The instance declares a session dead after session.dead_after_ms (3000) of
# silence; a cut-off agent must read `unknown` within that plus this.
CUT_MARGIN_S = 0.75
# A closed socket: released after session.close_grace_ms (500) and published.
CLOSED_LIMIT_S = 1.5


# ------------------------------------------------------------------ helpers

def _cluster(t, n=3, session=None, dns=True, extra_addresses=("127.0.0.5",)):
    """n cnapid instances (cnapi-1 on 127.0.0.2, ...) on one port, sharing a
    vhost, a database and a Redis database; the DNS name lists them all."""
    url, db, redis = t.fresh_vhost(), t.fresh_db(), t.fresh_redis()
    addrs = ["127.0.0.%d" % (i + 2) for i in range(n)]
    port = harness.common_port(addrs + list(extra_addresses))
    cfg = {"session": dict(session or {})} if session else None
    ds = [t.cnapid(name="cnapi-%d" % (i + 1), address=addrs[i], port=port, amqp_url=url,
                   pg_conninfo=db, redis_url=redis, config=cfg, log_level="info")
          for i in range(n)]
    if dns:
        t.stack.dns_set(*addrs)
    return ds


def _pg(t, d):
    import psycopg2
    c = psycopg2.connect(d.config["postgres"]["conninfo"])
    c.autocommit = True
    t.cleanup(c.close)
    return c


def _status_rows(c, uuids):
    """{uuid: status row value} from cnapi_status."""
    with c.cursor() as cur:
        cur.execute("SELECT to_regclass('cnapi_status') IS NOT NULL")
        if not cur.fetchone()[0]:
            return {}
        cur.execute("SELECT _key, _value FROM cnapi_status WHERE _key = ANY(%s)", (list(uuids),))
        return {k: json.loads(v) for k, v in cur.fetchall()}


def _server_row(c, u):
    """(_id, _etag) of a server record, or None."""
    with c.cursor() as cur:
        cur.execute("SELECT to_regclass('cnapi_servers') IS NOT NULL")
        if not cur.fetchone()[0]:
            return None
        cur.execute("SELECT _id, _etag FROM cnapi_servers WHERE _key = %s", (u,))
        return cur.fetchone()


def _statuses(d, uuids):
    """{uuid: status} through one instance's API (servers without a record
    are absent)."""
    st, _h, body = d.get("/servers?uuids=%s&fields=uuid,status" % ",".join(uuids), timeout=3)
    assert st == 200, (d.name, st, body)
    return {s["uuid"]: s["status"] for s in body}


def _all_are(ds, uuids, want):
    """True when every instance answers `want` for every server."""
    for d in ds:
        st = _statuses(d, uuids)
        if any(st.get(u) != want for u in uuids):
            return False
    return True


def _first_all(ds, uuids, want, t0, timeout, desc):
    """Poll every instance until each has answered `want` for every server;
    returns {instance: seconds after t0 when it first did}."""
    first = {}

    def check():
        for d in ds:
            if d.name in first:
                continue
            st = _statuses(d, uuids)
            if all(st.get(u) == want for u in uuids):
                first[d.name] = time.monotonic() - t0
        return len(first) == len(ds)
    harness.wait_until(check, timeout=timeout, interval=0.02, desc=desc)
    return first


def _running_everywhere(t, ds, uuids, c, timeout=20, owners=None):
    """The sessions are up (status rows running, owned), and every instance
    answers running."""
    def rows_ok():
        rows = _status_rows(c, uuids)
        if len(rows) != len(uuids):
            return False
        for u in uuids:
            r = rows[u]
            if r.get("status") != "running" or not r.get("owner"):
                return False
            if owners is not None and r["owner"] not in owners:
                return False
        return True
    harness.wait_until(rows_ok, timeout=timeout, desc="status rows running")
    harness.wait_until(lambda: _all_are(ds, uuids, "running"), timeout=timeout,
                       desc="every instance answers running")


def _mockcloud(t, ds, count, prefix, name="mockcloud", args=None):
    m = harness.Mockcloud(t.tmp, t.stack, count=count, prefix=prefix, name=name,
                          amqp_url=ds[0].config["amqp"]["url"], cnapi_port=ds[0].port,
                          args=args)
    t.cleanup(m.stop)
    m.start()
    return m


class Provisioner:
    """One provisioner process (one CN), configured by CNAPI_AGENT_* only;
    stopped and reaped in t.cleanup."""

    def __init__(self, t, server_uuid, amqp_url, cnapi_port, name="provisioner"):
        self.uuid = server_uuid
        self.name = name
        self.log_path = Path(t.tmp) / ("%s.log" % name)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("CNAPI_")}
        self.env.update({
            "CNAPI_AGENT_SERVER_UUID": server_uuid,
            "CNAPI_AGENT_RESOLVER": t.stack.dns_server,
            "CNAPI_AGENT_DATACENTER_NAME": t.stack.datacenter_name,
            "CNAPI_AGENT_DNS_DOMAIN": t.stack.dns_domain,
            "CNAPI_AGENT_CNAPI_PORT": str(cnapi_port),
            "CNAPI_AGENT_AMQP_URL": amqp_url,
            "CNAPI_AGENT_LISTEN": "none",
            "CNAPI_AGENT_SETUP": "1",
        })
        self.proc = None
        self._logf = None
        t.cleanup(self.stop)

    def start(self):
        self._logf = open(self.log_path, "ab")
        self._logf.write(("--- start %s\n" % time.strftime("%H:%M:%S")).encode())
        self._logf.flush()
        self.proc = subprocess.Popen([str(harness.build_dir() / "provisioner")],
                                     stdin=subprocess.DEVNULL, stdout=self._logf,
                                     stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=True)
        return self

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def _done(self):
        if self._logf:
            self._logf.close()
            self._logf = None

    def kill9(self):
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        self._done()
        return self.proc.returncode

    def stop(self):
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._done()
        return self.proc.returncode

    def log_tail(self, n=20):
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


class CutProxy:
    """A TCP proxy on loopback between agents and one instance. cut(): stop
    forwarding and stop reading, close nothing (connections made meanwhile
    are accepted and held the same way): traffic dropped silently.
    resume(): forward again. shutdown(): refuse new connections and close
    every connection. Every thread is bounded by max_life seconds."""

    def __init__(self, listen, target, max_life=150.0):
        self.target = target
        self.ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.ls.bind(listen)
        self.ls.listen(64)
        self.forwarding = threading.Event()
        self.forwarding.set()
        self.stopping = threading.Event()
        self.accepting = True
        self.deadline = time.monotonic() + max_life
        self.lock = threading.Lock()
        self.pairs = []
        self.threads = []
        self.accepted = 0
        th = threading.Thread(target=self._accept_loop, name="proxy-accept", daemon=True)
        th.start()
        self.threads.append(th)

    def _alive(self):
        return not self.stopping.is_set() and time.monotonic() < self.deadline

    def _accept_loop(self):
        try:
            while self._alive() and self.accepting:
                r, _, _ = select.select([self.ls], [], [], 0.05)
                if not r or not self.accepting:
                    continue
                c, _ = self.ls.accept()
                p = {"c": c, "u": None, "kill": False}
                th = threading.Thread(target=self._pump, args=(p,), name="proxy-pump",
                                      daemon=True)
                with self.lock:
                    self.pairs.append(p)
                    self.threads.append(th)
                    self.accepted += 1
                th.start()
        except OSError:
            pass
        finally:
            try:
                self.ls.close()
            except OSError:
                pass

    def _pump(self, p):
        try:
            while self._alive() and not p["kill"]:
                if not self.forwarding.is_set():
                    # cut: read nothing, write nothing, close nothing
                    self.forwarding.wait(0.05)
                    continue
                if p["u"] is None:
                    p["u"] = socket.create_connection(self.target, timeout=2)
                r, _, _ = select.select([p["c"], p["u"]], [], [], 0.05)
                if not self.forwarding.is_set():
                    continue
                for s in r:
                    data = s.recv(65536)
                    if not data:
                        return
                    (p["u"] if s is p["c"] else p["c"]).sendall(data)
        except OSError:
            pass
        finally:
            for k in ("c", "u"):
                if p[k] is not None:
                    try:
                        p[k].close()
                    except OSError:
                        pass

    def cut(self):
        self.forwarding.clear()

    def resume(self):
        self.forwarding.set()

    def shutdown(self):
        """Refuse new connections, close every connection (they see EOF)."""
        self.accepting = False
        with self.lock:
            for p in self.pairs:
                p["kill"] = True

    def stop(self):
        self.stopping.set()
        self.shutdown()
        with self.lock:
            threads = list(self.threads)
        for th in threads:
            th.join(timeout=5)


def _agent_vms(port, server_uuid):
    st, _h, body = harness.http_request("127.0.0.1", port, "GET", "/vms",
                                        headers={"x-server-uuid": server_uuid})
    assert st == 200, (st, body)
    return {v["uuid"]: v for v in body["vms"]}


def _api_vms(d, server_uuid):
    st, _h, body = d.get("/servers/" + server_uuid)
    assert st == 200, (d.name, st, body)
    return body.get("vms") or {}


def _vm_key(v):
    return (v.get("state"), v.get("alias"), v.get("ram"), v.get("seq"))


def _in_step(ds, port, uuids):
    """Every instance's vms of each server equal the agent's VMs (uuid set,
    and state / alias / ram / seq of each). (ok, description)."""
    for u in uuids:
        want = {k: _vm_key(v) for k, v in _agent_vms(port, u).items()}
        for d in ds:
            got = {k: _vm_key(v) for k, v in _api_vms(d, u).items()}
            if got != want:
                return False, "%s via %s: store %r, agent %r" % (u, d.name, got, want)
    return True, "ok"


def _agent_op(port, server_uuid, method, path, body=None, want=(200, 202)):
    st, _h, out = harness.http_request("127.0.0.1", port, method, path, body=body,
                                       headers={"x-server-uuid": server_uuid})
    assert st in want, (method, path, st, out)
    return out


def _amqp_queue(url, binding):
    """An exclusive queue on amq.topic bound to binding: (connection, channel, name)."""
    import pika
    conn = pika.BlockingConnection(pika.URLParameters(url))
    ch = conn.channel()
    q = ch.queue_declare(queue="", exclusive=True, auto_delete=True).method.queue
    ch.queue_bind(queue=q, exchange="amq.topic", routing_key=binding)
    return conn, ch, q


def _drain(ch, q, out, max_n=100000):
    """Move every message ready in q into out as (routing key, body dict)."""
    for _ in range(max_n):
        m, _props, body = ch.basic_get(queue=q, auto_ack=True)
        if m is None:
            return out
        out.append((m.routing_key, json.loads(body)))
    return out


def _collect(ch, q, out, pred, timeout, desc):
    """Drain q into out until pred(out) (bounded)."""
    def done():
        _drain(ch, q, out)
        return pred(out)
    harness.wait_until(done, timeout=timeout, interval=0.1, desc=desc)
    return out


SANITIZER_MARKS = ("ERROR: AddressSanitizer", "ERROR: LeakSanitizer", "runtime error:")


def _stop_clean(proc):
    """SIGTERM an agent process (Mockcloud or Provisioner): exit 0 and no
    sanitizer report in its log since its last start."""
    rc = proc.stop()
    text = proc.log_path.read_text(errors="replace") if proc.log_path.exists() else ""
    text = text[text.rfind("--- start"):] if "--- start" in text else text
    marks = [m for m in SANITIZER_MARKS if m in text]
    assert not marks, "%s: sanitizer report:\n%s" % (proc.name, proc.log_tail(40))
    assert rc == 0, "%s exited with %s:\n%s" % (proc.name, rc, proc.log_tail(20))


def _sim_vm_uuid(prefix, j, i):
    return "%s-%04x-4000-a000-%012x" % (prefix, j, i)


# ------------------------------------------------------------------ 1. agent killed

def test_agent_killed_goes_unknown_everywhere(t):
    ds = _cluster(t, 3)
    c = _pg(t, ds[0])
    m = _mockcloud(t, ds, 4, "e1e10000")
    p = Provisioner(t, "e1e1ffff-0000-4000-8000-000000000001", ds[0].config["amqp"]["url"],
                    ds[0].port)
    p.start()
    uuids = m.uuids() + [p.uuid]
    m.wait_stats(lambda s: s["connected"] == 4, timeout=20, desc="4 sessions up")
    _running_everywhere(t, ds, uuids, c)
    owners = sorted({r["owner"] for r in _status_rows(c, uuids).values()})
    t.log("sessions held by %s" % owners)

    t0 = time.monotonic()
    assert m.kill9() == -signal.SIGKILL
    assert p.kill9() == -signal.SIGKILL
    first = _first_all(ds, uuids, "unknown", t0, 3.0,
                       "every instance answers unknown within 3 s of the kill")
    worst = max(first.values())
    t.log("kill -9 -> unknown: %s (worst %.2fs)" % (
        ", ".join("%s %.2fs" % kv for kv in sorted(first.items())), worst))
    assert worst <= CLOSED_LIMIT_S, "a closed socket should show within ~1 s: %r" % first
    rows = _status_rows(c, uuids)
    assert all(r["status"] == "unknown" and r.get("owner") in (None, "") for r in rows.values()), \
        rows

    # they come back
    t1 = time.monotonic()
    m.start()
    p.start()
    m.wait_stats(lambda s: s["connected"] == 4, timeout=20, desc="4 sessions up again")
    back = _first_all(ds, uuids, "running", t1, 20, "running again everywhere")
    t.log("agents restarted -> running everywhere after %.2fs" % max(back.values()))
    _running_everywhere(t, ds, uuids, c)
    assert p.running(), p.log_tail()
    _stop_clean(m)
    _stop_clean(p)


# ------------------------------------------------------------------ 2. agent cut off

def test_agent_cut_off_silently_goes_unknown(t):
    ds = _cluster(t, 3, dns=False)
    c = _pg(t, ds[0])
    port = ds[0].port
    proxy = CutProxy(("127.0.0.5", port), (ds[0].address, port))
    t.cleanup(proxy.stop)
    t.stack.dns_set("127.0.0.5")
    m = _mockcloud(t, ds, 3, "e2e20000")
    uuids = m.uuids()
    m.wait_stats(lambda s: s["connected"] == 3 and s["instances"].get("cnapi-1") == 3,
                 timeout=20, desc="3 sessions up on cnapi-1 through the proxy")
    _running_everywhere(t, ds, uuids, c, owners={"cnapi-1"})
    losses0 = m.stats()["losses"]

    # cut 1: the proxy swallows everything; nobody closes anything
    t0 = time.monotonic()
    proxy.cut()
    first = _first_all(ds, uuids, "unknown", t0, 3.0 + CUT_MARGIN_S + 2.0,
                       "every instance answers unknown after the cut")
    worst = max(first.values())
    t.log("cut #1 -> unknown: %s (worst %.2fs; dead_after 3 s)" % (
        ", ".join("%s %.2fs" % kv for kv in sorted(first.items())), worst))
    assert worst <= 3.0 + CUT_MARGIN_S, "cut off agent not unknown within 3 s: %r" % first
    rows = _status_rows(c, uuids)
    assert all(r["status"] == "unknown" for r in rows.values()), rows

    # the proxy forwards again: the agents come back through it
    t1 = time.monotonic()
    proxy.resume()
    back = _first_all(ds, uuids, "running", t1, 20, "running again after the proxy resumed")
    t.log("proxy resumed -> running everywhere after %.2fs" % max(back.values()))
    m.wait_stats(lambda s: s["connected"] == 3, timeout=20, desc="3 sessions up again")
    assert m.stats()["losses"] >= losses0 + 3, m.stats()
    _running_everywhere(t, ds, uuids, c, owners={"cnapi-1"})

    # cut 2: this time the agents find another instance
    t2 = time.monotonic()
    proxy.cut()
    first = _first_all(ds, uuids, "unknown", t2, 3.0 + CUT_MARGIN_S + 2.0,
                       "every instance answers unknown after the second cut")
    worst = max(first.values())
    t.log("cut #2 -> unknown: worst %.2fs" % worst)
    assert worst <= 3.0 + CUT_MARGIN_S, first
    t.stack.dns_set(ds[1].address)
    t3 = time.monotonic()
    proxy.shutdown()
    m.wait_stats(lambda s: s["connected"] == 3 and s["instances"].get("cnapi-2") == 3,
                 timeout=20, desc="3 sessions up on cnapi-2")
    back = _first_all(ds, uuids, "running", t3, 20, "running again via cnapi-2")
    t.log("reconnected elsewhere -> running everywhere after %.2fs" % max(back.values()))
    _running_everywhere(t, ds, uuids, c, owners={"cnapi-2"})


# ------------------------------------------------------------------ 3. VM events

def test_vm_events_routing_and_store_in_step(t):
    ds = _cluster(t, 2, extra_addresses=())
    c = _pg(t, ds[0])
    url = ds[0].config["amqp"]["url"]
    pa, pb = "e3e30000", "e3e3bbbb"
    one = harness.mockcloud_uuid(pa, 1)
    c1, ch_one, q_one = _amqp_queue(url, "vm.event.%s.*" % one)
    c2, ch_all, q_all = _amqp_queue(url, "vm.event.#")
    for conn in (c1, c2):
        t.cleanup(conn.close)

    lp = harness.free_port("127.0.0.1")
    a = _mockcloud(t, ds, 3, pa, name="mockcloud-a",
                   args=["--vms-per-cn", "2", "--listen", "127.0.0.1:%d" % lp])
    ua = a.uuids()
    a.wait_stats(lambda s: s["connected"] == 3, timeout=20, desc="3 sessions up")
    _running_everywhere(t, ds, ua, c)
    # the hello's VM state reaches the store
    harness.wait_until(lambda: _in_step(ds, lp, ua)[0], timeout=20, desc="hello VM state stored")
    for i, u in enumerate(ua):
        assert set(_api_vms(ds[0], u)) == {_sim_vm_uuid(pa, j, i) for j in range(2)}

    # VM operations through the agent endpoint, one CN after another
    new0 = str(uuidlib.uuid4())
    _agent_op(lp, ua[0], "POST", "/vms", {"uuid": new0, "alias": "fresh", "ram": 512})
    stop1 = _sim_vm_uuid(pa, 0, 1)
    _agent_op(lp, ua[1], "POST", "/vms/%s/stop" % stop1)
    gone1 = _sim_vm_uuid(pa, 1, 1)
    _agent_op(lp, ua[1], "DELETE", "/vms/%s" % gone1)
    upd2 = _sim_vm_uuid(pa, 0, 2)
    _agent_op(lp, ua[2], "POST", "/vms/%s" % upd2, {"alias": "renamed", "ram": 2048})
    new2 = str(uuidlib.uuid4())
    _agent_op(lp, ua[2], "POST", "/vms", {"uuid": new2, "state": "stopped"})

    def ops_landed():
        for d in ds:
            v0, v1, v2 = (_api_vms(d, u) for u in ua)
            if new0 not in v0 or v0[new0].get("alias") != "fresh":
                return False
            if v1.get(stop1, {}).get("state") != "stopped" or gone1 in v1:
                return False
            if v2.get(upd2, {}).get("alias") != "renamed" or v2.get(upd2, {}).get("ram") != 2048:
                return False
            if v2.get(new2, {}).get("state") != "stopped":
                return False
        return True
    harness.wait_until(ops_landed, timeout=15,
                       desc="create / stop / destroy / update seen through every instance")
    ok, why = _in_step(ds, lp, ua)
    assert ok, why
    # a destroyed VM stays gone; a stopped one starts again
    _agent_op(lp, ua[1], "POST", "/vms/%s/start" % stop1)
    harness.wait_until(lambda: all(_api_vms(d, ua[1]).get(stop1, {}).get("state") == "running"
                                   for d in ds), timeout=15, desc="started VM running")
    _agent_op(lp, ua[0], "DELETE", "/vms/%s" % new0)
    harness.wait_until(lambda: all(new0 not in _api_vms(d, ua[0]) for d in ds), timeout=15,
                       desc="destroyed VM gone")
    harness.wait_until(lambda: _in_step(ds, lp, ua)[0], timeout=15, desc="still in step")

    a_events = a.wait_stats(lambda s: s["amqp"]["confirmed"] >= s["amqp"]["sent"]
                            and s["vm_events"] >= 7, timeout=15,
                            desc="A's events confirmed")["vm_events"]

    # random changes at a steady rate on a second set of CNs
    b = _mockcloud(t, ds, 4, pb, name="mockcloud-b",
                   args=["--vms-per-cn", "3", "--event-rate", "40"])
    ub = b.uuids()
    b.wait_stats(lambda s: s["connected"] == 4 and s["vm_events"] >= 80, timeout=20,
                 desc="B up and changing VMs")
    harness.wait_until(lambda: all(_statuses(d, ub).keys() == set(ub) for d in ds),
                       timeout=20, desc="B's server records")
    _stop_clean(b)
    fin = b.final
    assert fin and fin["amqp"]["confirmed"] >= fin["amqp"]["sent"], fin
    b_events = fin["vm_events"]
    t.log("events: A %d (operations), B %d (random, 40/s)" % (a_events, b_events))

    # the bus: all CNs on one binding, one CN on another
    every, only = [], []

    def ev_key(m):
        return (m[1]["server_uuid"], m[1]["vm_uuid"], m[1]["seq"])

    def seen(prefix):
        return lambda out: len({ev_key(m) for m in out if m[1]["server_uuid"].startswith(prefix)})
    _collect(ch_all, q_all, every, lambda out: seen(pa)(out) >= a_events
             and seen(pb)(out) >= b_events, 20, "every event on vm.event.#")
    _collect(ch_one, q_one, only, lambda out: len(out) >= 1, 10, "the one CN's events")
    _drain(ch_one, q_one, only)
    for rk, body in every:
        assert rk == "vm.event.%s.%s" % (body["server_uuid"], body["vm_uuid"]), (rk, body)
        assert body["event"] in ("create", "state", "update", "destroy"), body
        assert ("vm" in body) == (body["event"] != "destroy"), body
    assert seen(pa)(every) == a_events and seen(pb)(every) == b_events, \
        (seen(pa)(every), a_events, seen(pb)(every), b_events)
    assert {m[1]["server_uuid"] for m in every} == set(ua) | set(ub)
    assert only, "nothing for the one CN"
    assert all(rk.startswith("vm.event.%s." % one) and body["server_uuid"] == one
               for rk, body in only), [m for m in only if m[1]["server_uuid"] != one][:3]
    want_one = {ev_key(m) for m in every if m[1]["server_uuid"] == one}
    assert {ev_key(m) for m in only} == want_one, "the one-CN queue got other or fewer events"
    t.log("vm.event.#: %d messages; vm.event.%s.*: %d" % (len(every), one, len(only)))

    # B's store state is what its last events say (agent stopped: nothing moves)
    last = {}
    for _rk, body in every:
        if not body["server_uuid"].startswith(pb):
            continue
        k = (body["server_uuid"], body["vm_uuid"])
        if k not in last or body["seq"] > last[k]["seq"]:
            last[k] = body

    def b_in_step():
        for i, u in enumerate(ub):
            want = {}
            for j in range(3):
                want[_sim_vm_uuid(pb, j, i)] = None      # as the hello had it
            for (su, vu), body in last.items():
                if su != u:
                    continue
                if body["event"] == "destroy":
                    want.pop(vu, None)
                else:
                    want[vu] = (body["vm"]["state"], body["seq"])
            for d in ds:
                got = _api_vms(d, u)
                if set(got) != set(want):
                    return False, "%s via %s: VMs %s, expected %s" % (u, d.name, sorted(got),
                                                                     sorted(want))
                for vu, w in want.items():
                    if w is not None and (got[vu].get("state"), got[vu].get("seq")) != w:
                        return False, "%s %s via %s: %r, expected %r" % (
                            u, vu, d.name, (got[vu].get("state"), got[vu].get("seq")), w)
        return True, "ok"
    harness.wait_until(lambda: b_in_step()[0], timeout=20,
                       desc="B's stored VMs match its last events")

    # The owner also consumes its servers' events from the bus: an event
    # published only there lands; a stale one changes nothing; a body that
    # is not JSON, or that names another server than its routing key, is
    # rejected and the consumer goes on. (In queue order per server: the
    # last create proves the ones before it were handled.)
    now = int(time.time() * 1000)
    before = _api_vms(ds[0], ua[1])[stop1]
    bus_a, bus_b = str(uuidlib.uuid4()), str(uuidlib.uuid4())

    def ev(u, vu, event, seq, vm=None, rk_server=None):
        body = {"server_uuid": u, "vm_uuid": vu, "event": event, "seq": seq, "time_ms": now}
        if vm is not None:
            body["vm"] = dict(vm, uuid=vu, seq=seq)
        return ("vm.event.%s.%s" % (rk_server or u, vu), body)
    vm0 = {"brand": "joyent", "state": "running", "ram": 128, "alias": "bus"}
    harness.amqp_publish_sysinfo(url, [
        ev(ua[1], stop1, "state", 1, dict(before, state="provisioning")),     # stale
        ("vm.event.%s.%s" % (ua[1], bus_b), b"{not json"),
        ev(ua[0], bus_b, "create", 1, vm0, rk_server=ua[1]),                  # wrong key
        ev(ua[0], bus_a, "create", 1, vm0),
        ev(ua[1], bus_b, "create", 1, dict(vm0, alias="bus-b")),
    ])
    harness.wait_until(lambda: all(_api_vms(d, ua[0]).get(bus_a, {}).get("alias") == "bus"
                                   and _api_vms(d, ua[1]).get(bus_b, {}).get("alias") == "bus-b"
                                   for d in ds), timeout=15,
                       desc="events published only on the bus stored")
    for d in ds:
        assert bus_b not in _api_vms(d, ua[0]), "a mismatched routing key was applied"
        got = _api_vms(d, ua[1])[stop1]
        assert (got["state"], got["seq"]) == (before["state"], before["seq"]), (got, before)
    harness.amqp_publish_sysinfo(url, [ev(ua[0], bus_a, "destroy", 2),
                                       ev(ua[1], bus_b, "destroy", 2)])
    harness.wait_until(lambda: all(bus_a not in _api_vms(d, ua[0])
                                   and bus_b not in _api_vms(d, ua[1]) for d in ds),
                       timeout=15, desc="destroys published only on the bus applied")
    _stop_clean(a)


# ------------------------------------------------------------------ 4. bad frames

def _send_oversized(a, fragmented=False):
    """A binary message over 1 MiB, sent from a thread (the instance stops
    reading it after the header); returns the thread."""
    def send():
        try:
            if fragmented:
                a.send_frame(wsagent.OP_BINARY, b"\x80" + b"\0" * (600 << 10), fin=False)
                a.send_frame(wsagent.OP_CONT, b"\0" * (600 << 10), fin=True)
            else:
                a.send_frame(wsagent.OP_BINARY, b"\0" * ((1 << 20) + 1))
        except OSError:
            pass
    th = threading.Thread(target=send, daemon=True)
    th.start()
    return th


def test_bad_frames_close_with_the_documented_code(t):
    ds = _cluster(t, 1, extra_addresses=())
    d = ds[0]
    c = _pg(t, d)
    url = d.config["amqp"]["url"]
    pre = "e4e40000-0000-4000-8000-000000000001"      # bad before hello
    post = "e4e40000-0000-4000-8000-000000000002"     # bad after welcome
    other = "e4e40000-0000-4000-8000-000000000003"    # named by a lying hello
    good = "e4e40000-0000-4000-8000-000000000004"
    odd = "e4e40000-0000-4000-8000-000000000005"      # strings that are not UTF-8
    now = int(time.time() * 1000)
    harness.amqp_publish_sysinfo(url, [("ur.sysinfo.%s.1" % u,
                                        harness.make_sysinfo(u, "cn-%d" % k, setup=True),
                                        {"sent_ms": now})
                                       for k, u in enumerate((pre, post, other, good, odd))])
    harness.wait_until(lambda: all(d.get("/servers/" + u)[0] == 200
                                   for u in (pre, post, other, good, odd)), timeout=20,
                       desc="server records")
    rec_pre, rec_other = _server_row(c, pre), _server_row(c, other)
    assert rec_pre and rec_other

    def no_trace(u, rec):
        assert _status_rows(c, [u]) == {}, "a status row for %s: %r" % (u, _status_rows(c, [u]))
        assert _server_row(c, u) == rec, "the record of %s changed" % u

    def expect_close(a, code, words, desc):
        got = a.wait_close(timeout=5)
        a.abort()
        assert isinstance(got, tuple) and got[0] == code, "%s: %r" % (desc, got)
        assert got[1] and all(w in got[1].lower() for w in words), "%s: reason %r" % (desc, got)
        return got

    hello_ok = {"v": 1, "type": "hello", "agent": "wsagent/0.1", "heartbeat_ms": 1000,
                "vms": {}}
    # (description, header uuid, frames to send, close code, words of the reason)
    before = [
        ("malformed msgpack", pre, [(wsagent.OP_BINARY, b"\xc1\xff\x00\x13")], 1002,
         ["malformed"]),
        ("truncated msgpack", pre, [(wsagent.OP_BINARY, b"\x82\xa1v\x01\xa4ty")], 1002,
         ["malformed"]),
        ("not a map", pre, [(wsagent.OP_BINARY, wsagent.mp_pack([1, "hello"]))], 1002, []),
        ("unknown type first", pre,
         [(wsagent.OP_BINARY, wsagent.mp_pack({"v": 1, "type": "bogus"}))], 1002, []),
        ("text frame", pre, [(wsagent.OP_TEXT, json.dumps(dict(hello_ok, server_uuid=pre))
                              .encode())], 1002, ["text"]),
        ("hello without vms", pre,
         [(wsagent.OP_BINARY, wsagent.mp_pack({"v": 1, "type": "hello", "server_uuid": pre,
                                                "agent": "x", "heartbeat_ms": 1000}))],
         1002, ["vms"]),
        ("hello naming another server", pre,
         [(wsagent.OP_BINARY, wsagent.mp_pack(dict(hello_ok, server_uuid=other)))], 1008,
         ["another server"]),
        ("hello with a VM key that is not a uuid", pre,
         [(wsagent.OP_BINARY, wsagent.mp_pack(dict(hello_ok, server_uuid=pre,
                                                   vms={"x" * 300: {"state": "running"}})))],
         1002, ["vm uuids"]),
        ("oversized frame", pre, "oversized", 1009, ["1 mib"]),
        ("oversized fragmented message", pre, "oversized-fragmented", 1009, ["1 mib"]),
        # the WebSocket layer itself
        ("unmasked frame", pre, [(wsagent.OP_BINARY, wsagent.mp_pack(hello_ok),
                                  {"mask": False})], 1002, ["masked"]),
        ("reserved bit set", pre, [(wsagent.OP_BINARY, wsagent.mp_pack(hello_ok),
                                    {"rsv": 4})], 1002, ["reserved"]),
        ("unknown opcode", pre, [(3, b"x")], 1002, ["opcode"]),
        ("continuation first", pre, [(wsagent.OP_CONT, b"x")], 1002, ["continuation"]),
        ("ping over 125 bytes", pre, [(wsagent.OP_PING, b"p" * 126)], 1002, ["control"]),
    ]
    for desc, hdr, frames, code, words in before:
        a = wsagent.Agent(d.address, d.port, hdr)
        st, _h, _b = a.connect()
        assert st == 101, (desc, st)
        th = None
        if frames == "oversized":
            th = _send_oversized(a)
        elif frames == "oversized-fragmented":
            th = _send_oversized(a, fragmented=True)
        else:
            for f in frames:
                a.send_frame(f[0], f[1], **(f[2] if len(f) > 2 else {}))
        got = expect_close(a, code, words, desc)
        if th:
            th.join(timeout=10)
        t.log("%-30s -> %d %r" % (desc, got[0], got[1]))
        no_trace(pre, rec_pre)
        no_trace(other, rec_other)
        assert d.get("/ping")[0] == 200

    # after a welcome: the session is closed, the bad frame's content lands
    # nowhere, and the server is released (unknown, no owner)
    evil_vm = str(uuidlib.uuid4())
    second_vm = str(uuidlib.uuid4())
    first_vm = str(uuidlib.uuid4())
    vm_obj = {"uuid": first_vm, "brand": "joyent", "state": "running", "ram": 256, "seq": 1}
    after = [
        ("unknown type", [(wsagent.OP_BINARY, wsagent.mp_pack({"v": 1, "type": "bogus"}))],
         1002, ["unknown"]),
        ("malformed msgpack", [(wsagent.OP_BINARY, b"\xc1\xc1")], 1002, ["malformed"]),
        ("text frame", [(wsagent.OP_TEXT, b'{"type":"hb"}')], 1002, ["text"]),
        ("vm_event with an empty vm_uuid", [(wsagent.OP_BINARY, wsagent.mp_pack(
            {"v": 1, "type": "vm_event", "vm_uuid": "", "event": "create", "seq": 1,
             "time_ms": now, "vm": dict(vm_obj, uuid=evil_vm)}))], 1002, ["vm_uuid"]),
        ("vm_event without seq", [(wsagent.OP_BINARY, wsagent.mp_pack(
            {"v": 1, "type": "vm_event", "vm_uuid": evil_vm, "event": "create",
             "time_ms": now, "vm": dict(vm_obj, uuid=evil_vm)}))], 1002, ["seq"]),
        ("oversized frame", "oversized", 1009, ["1 mib"]),
        ("second hello", [(wsagent.OP_BINARY, wsagent.mp_pack(
            dict(hello_ok, server_uuid=post, vms={second_vm: dict(vm_obj, uuid=second_vm)})))],
         1008, ["second hello"]),
    ]
    last_epoch = 0
    for desc, frames, code, words in after:
        a = wsagent.Agent(d.address, d.port, post)
        assert a.connect()[0] == 101
        w = a.hello(vms={first_vm: vm_obj})
        assert w["epoch"] > last_epoch, w
        last_epoch = w["epoch"]
        harness.wait_until(lambda: _status_rows(c, [post]).get(post, {}).get("status")
                           == "running", timeout=5, desc="claimed")
        th = None
        if frames == "oversized":
            th = _send_oversized(a)
        else:
            for op, payload in frames:
                a.send_frame(op, payload)
        got = expect_close(a, code, words, "after welcome: " + desc)
        if th:
            th.join(timeout=10)
        t.log("after welcome: %-17s -> %d %r" % (desc, got[0], got[1]))
        harness.wait_until(lambda: d.get("/servers/" + post)[2].get("status") == "unknown",
                           timeout=5, desc="released after: " + desc)
        row = _status_rows(c, [post])[post]
        assert row["status"] == "unknown" and not row.get("owner"), row

    # msgpack that decodes but has no JSON form: a bin value, a str that is
    # not UTF-8 (in the hello's vms, then in a vm_event). cnapid aborted on
    # this (json_dumps of the converted VM state failed). Either the session
    # is refused (1002) or the values are stored as null; the instance lives.
    odd_vm = str(uuidlib.uuid4())
    a = wsagent.Agent(d.address, d.port, odd)
    assert a.connect()[0] == 101
    hello = wsagent.mp_pack({"v": 1, "type": "hello", "server_uuid": odd, "agent": "x",
                             "heartbeat_ms": 1000, "vms": {odd_vm: dict(
                                 vm_obj, uuid=odd_vm, alias="@@@@", image_uuid=b"\xff\x00")}})
    a.send_frame(wsagent.OP_BINARY, hello.replace(b"@@@@", b"\xff\xfe\xfd\xfc"))
    kind, data = a.recv_type("welcome", timeout=5)
    if kind == "msg":
        ev = wsagent.mp_pack({"v": 1, "type": "vm_event", "vm_uuid": odd_vm, "event": "update",
                              "seq": 2, "time_ms": now, "vm": dict(vm_obj, uuid=odd_vm, seq=2,
                                                                   alias="@@@@", ram=1024)})
        a.send_frame(wsagent.OP_BINARY, ev.replace(b"@@@@", b"\xc3\x28\xa0\xa1"))
        harness.wait_until(lambda: _api_vms(d, odd).get(odd_vm, {}).get("ram") == 1024,
                           timeout=5, desc="the odd VM stored")
        vm = _api_vms(d, odd)[odd_vm]
        assert vm.get("alias") is None and vm.get("image_uuid") is None, vm
        a.close()
        t.log("undecodable strings -> welcome; stored as null")
    else:
        assert kind == "close" and data[0] == 1002, (kind, data)
        t.log("undecodable strings -> %d %r" % data)
    assert d.running() and d.get("/ping")[0] == 200, d.log_tail()
    assert d.get("/servers?extras=vms")[0] == 200

    # the plain HTTP requests on the session path
    for desc, headers in [("no upgrade", {"x-server-uuid": pre}),
                          ("no upgrade, no uuid", {}),
                          ("upgrade without x-server-uuid", None),
                          ("upgrade with a bad x-server-uuid", None)]:
        if headers is not None:
            r = d.get("/agent/session", headers=headers)
        else:
            a = wsagent.Agent(d.address, d.port, pre,
                              header_uuid="" if "without" in desc else "not-a-uuid")
            st, hh, body = a.connect()
            a.abort()
            r = harness.HTTPResult(st, hh, json.loads(body) if body else body)
        assert r.status == 400, (desc, r)
        assert "json" in r.headers.get("content-type", ""), (desc, r.headers)
        assert r.body["code"] == "BadRequest" and r.body["message"], (desc, r.body)
        t.log("%-33s -> 400 %r" % (desc, r.body["message"]))

    # the instance is fine: another agent connects, and every message sent
    # before its hello has been handled by then
    # (its hello arrives a byte at a time: frames split anywhere are fine)
    g = wsagent.Agent(d.address, d.port, good)
    assert g.connect()[0] == 101
    g.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sent = []
    real_sock = g.sock

    class _Capture:
        def sendall(self, data):
            sent.append(data)
    g.sock = _Capture()
    g.hello(vms={first_vm: dict(vm_obj, uuid=first_vm)}, wait=False)
    g.sock = real_sock
    for byte in b"".join(sent):
        g.send_raw(bytes([byte]))
    kind, w = g.recv_type("welcome", timeout=5)
    assert kind == "msg" and w["instance"] == "cnapi-1", (kind, w)
    g.hb()
    harness.wait_until(lambda: d.get("/servers/" + good)[2].get("status") == "running", timeout=5)
    kind, data = g.recv_type("hb", timeout=3)
    assert kind == "msg" and data["type"] == "hb", (kind, data)
    g.close()
    no_trace(pre, rec_pre)
    no_trace(other, rec_other)
    vms = _api_vms(d, post)
    assert evil_vm not in vms and second_vm not in vms, vms
    assert first_vm in vms, vms
    st, _h, ping = d.get("/ping")
    assert st == 200, ping
    assert d.running()


# ------------------------------------------------------------------ 5. status rules

def _sweep_bound(grace_ms, dead_after_ms=3000):
    """Seconds after an instance dies by which the survivors' sweep (every
    second) has marked its servers unknown: its liveness key lasts
    dead_after_ms; its instance row is seen changing up to 1 s late and
    counts as alive for dead_after_ms after that; the death is noticed at
    the next sweep, and the grace ends on a sweep too. Plus 0.5 s."""
    return (dead_after_ms + grace_ms) / 1000.0 + 1.0 + 1.0 + 1.0 + 0.5


class Watcher:
    """Polls every instance for the servers' status (a thread, bounded by
    max_life); records every answer other than running."""

    def __init__(self, ds, uuids, max_life=120.0):
        self.ds = ds
        self.uuids = uuids
        self.bad = []
        self.polls = {d.name: 0 for d in ds}
        self.stop_ev = threading.Event()
        self.deadline = time.monotonic() + max_life
        self.t0 = time.monotonic()
        self.th = threading.Thread(target=self._run, daemon=True)
        self.th.start()

    def _run(self):
        while not self.stop_ev.is_set() and time.monotonic() < self.deadline:
            for d in self.ds:
                try:
                    st = _statuses(d, self.uuids)
                except Exception:  # noqa: BLE001 - an instance that is down
                    continue
                self.polls[d.name] += 1
                for u in self.uuids:
                    if st.get(u) != "running":
                        self.bad.append((round(time.monotonic() - self.t0, 2), d.name, u,
                                         st.get(u)))
            self.stop_ev.wait(0.05)

    def stop(self):
        self.stop_ev.set()
        self.th.join(timeout=10)


def test_restarted_instance_marks_nothing_unknown(t):
    grace = 2000
    ds = _cluster(t, 3, session={"owner_grace_ms": grace}, dns=False)
    c = _pg(t, ds[0])
    t.stack.dns_set(ds[0].address)
    m = _mockcloud(t, ds, 6, "e5e50000")
    uuids = m.uuids()
    m.wait_stats(lambda s: s["connected"] == 6, timeout=20, desc="6 sessions up")
    _running_everywhere(t, ds, uuids, c, owners={"cnapi-1"})
    t.stack.dns_set(*[d.address for d in ds])
    w = Watcher(ds, uuids)
    t.cleanup(w.stop)

    # SIGTERM: goaway, the agents move at once; then it starts again
    t0 = time.monotonic()
    ds[0].stop()
    moved = m.wait_stats(lambda s: s["connected"] == 6 and not s["instances"].get("cnapi-1"),
                         timeout=10, desc="sessions moved off cnapi-1")
    t.log("SIGTERM: sessions moved in %.2fs: %s" % (time.monotonic() - t0, moved["instances"]))
    ds[0].start()
    ds[0].wait_ready()
    n0 = w.polls["cnapi-1"]
    horizon = t0 + _sweep_bound(grace)
    harness.wait_until(lambda: time.monotonic() >= horizon and w.polls["cnapi-1"] >= n0 + 20,
                       timeout=20, desc="observed past the owner grace")
    assert not w.bad, "unknown after a SIGTERM restart: %r" % w.bad[:10]

    # kill -9 of the instance holding the most sessions, started again at once
    inst = m.stats()["instances"]
    victim = next(d for d in ds if d.name == max(inst, key=lambda k: inst[k]))
    t.log("kill -9 %s (holding %d sessions)" % (victim.name, inst[victim.name]))
    t1 = time.monotonic()
    victim.kill9()
    victim.start()
    victim.wait_ready()
    t.log("%s answering again %.2fs after the kill" % (victim.name, time.monotonic() - t1))
    m.wait_stats(lambda s: s["connected"] == 6, timeout=10, desc="6 sessions up again")
    n1 = w.polls[victim.name]
    horizon = t1 + _sweep_bound(grace)
    harness.wait_until(lambda: time.monotonic() >= horizon and w.polls[victim.name] >= n1 + 20,
                       timeout=20, desc="observed past the owner grace")
    w.stop()
    t.log("observations: %s" % w.polls)
    assert not w.bad, "unknown after a kill -9 restart: %r" % w.bad[:10]
    _running_everywhere(t, ds, uuids, c)
    _stop_clean(m)


def test_dead_instance_unknown_after_grace(t):
    grace = 1500
    ds = _cluster(t, 3, session={"owner_grace_ms": grace}, dns=False)
    c = _pg(t, ds[0])
    t.stack.dns_set(ds[0].address)
    m = _mockcloud(t, ds, 4, "e6e60000")
    uuids = m.uuids()
    m.wait_stats(lambda s: s["connected"] == 4, timeout=20, desc="4 sessions up")
    _running_everywhere(t, ds, uuids, c, owners={"cnapi-1"})
    t.stack.dns_set(*[d.address for d in ds])

    # the agents freeze (no reconnect), their instance dies, then they do
    m.proc.send_signal(signal.SIGSTOP)
    t0 = time.monotonic()
    ds[0].kill9()
    m.kill9()
    survivors = ds[1:]
    first = _first_all(survivors, uuids, "unknown", t0, 15,
                       "the dead instance's servers unknown on the survivors")
    worst, best = max(first.values()), min(first.values())
    limit = _sweep_bound(grace)
    t.log("kill -9 of instance and agents -> unknown: %s (grace %d ms, limit %.1fs)" % (
        ", ".join("%s %.2fs" % kv for kv in sorted(first.items())), grace, limit))
    assert best >= grace / 1000.0, "unknown before the owner grace: %r" % first
    assert worst <= limit, first
    rows = _status_rows(c, uuids)
    assert all(r["status"] == "unknown" and not r.get("owner") for r in rows.values()), rows

    # nobody holds on to a stale running: not the survivors, not the dead
    # instance started again
    ds[0].start()
    ds[0].wait_ready()
    assert _all_are(ds, uuids, "unknown"), [(d.name, _statuses(d, uuids)) for d in ds]
    w = Watcher(ds, uuids)
    t.cleanup(w.stop)
    harness.wait_until(lambda: all(n >= 10 for n in w.polls.values()), timeout=10,
                       desc="a second of observations")
    w.stop()
    assert all(b[3] == "unknown" for b in w.bad) and len(w.bad) >= 10 * len(ds) * len(uuids), \
        w.bad[:10]
