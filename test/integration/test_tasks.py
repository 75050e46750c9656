"""Tasks across several cnapid instances (proto/tasks.md, API.md's client
flow): create / get / wait / load / stop / start / reboot / delete with
every step on a different instance, waits from any instance, the errors
(ServerNotRunning, bad input, agent down or paused), and kill -9 of the
dispatching instance while tasks run.

The compute nodes are one build/mockcloud process whose agent endpoint
(--listen) every CN reports in its sysinfo (admin_ip, agent_port), with
sessions to the instances behind the stack's DNS name. A raw session
(wsagent.py) stands in for a server whose agent is unreachable or mute.
Real RabbitMQ, PostgreSQL, Redis and dnsmasq from the local stack; each test
on a database, vhost and Redis database of its own."""

import json
import socket
import subprocess
import threading
import time
import uuid as uuidlib

import harness
import wsagent

TIMEOUT = 180
N_CNS = 3
# short timers so that failures and sweeps happen within a test's time
TASKS_CFG = {"tasks": {"agent_timeout_ms": 1500, "sweep_ms": 1000, "per_agent": 4}}


# ------------------------------------------------------------------ helpers

def _ctl(d, *args):
    out = subprocess.run([str(harness.build_dir() / "cnapictl"), "-e", d.admin_endpoint,
                          "-t", "15000", "-j"] + list(args),
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, "cnapictl %s: %s%s" % (" ".join(args), out.stderr, out.stdout)
    return json.loads(out.stdout)


def _tasks_status(d):
    return _ctl(d, "actors")["tasks"]


def _cluster(t, n, config=None):
    """n instances on 127.0.0.2.. sharing one port, store, vhost and Redis;
    the DNS name lists them all. Returns (amqp_url, conninfo, [Cnapid])."""
    url, db, redis = t.fresh_vhost(), t.fresh_db(), t.fresh_redis()
    addrs = ["127.0.0.%d" % (i + 2) for i in range(n)]
    port = harness.common_port(addrs)
    ds = [t.cnapid(name="cnapi-%d" % (i + 1), address=addrs[i], port=port, amqp_url=url,
                   pg_conninfo=db, redis_url=redis, config=config or TASKS_CFG)
          for i in range(n)]
    ips = [d.address for d in ds]
    t.stack.dns_set(*ips)
    harness.wait_until(lambda: t.stack.dns_lookup() == (0, sorted(ips)), timeout=10,
                       desc="DNS answering %s" % ips)
    return url, db, ds


def _mockcloud(t, url, port, count, prefix, vm_delay_ms=200, args=None):
    """A started mockcloud whose agent endpoint is 127.0.0.1:<free port>;
    returns (Mockcloud, agent_port)."""
    agent_port = harness.free_port("127.0.0.1")
    m = harness.Mockcloud(t.tmp, t.stack, count=count, prefix=prefix, amqp_url=url,
                          cnapi_port=port,
                          args=["--listen", "127.0.0.1:%d" % agent_port,
                                "--vm-delay-ms", str(vm_delay_ms)] + list(args or []))
    t.cleanup(m.stop)
    m.start()
    return m, agent_port


def _statuses(d):
    st, _h, body = d.get("/servers?limit=1000", timeout=10)
    assert st == 200 and isinstance(body, list), (st, body)
    return {s["uuid"]: s for s in body}


def _ready(ds, uuids, agent_port, timeout=60):
    """Every instance sees every server running with the agent endpoint."""
    def ok(d):
        s = _statuses(d)
        return all(u in s and s[u].get("status") == "running"
                   and s[u].get("admin_ip") == "127.0.0.1"
                   and s[u].get("agent_port") == agent_port for u in uuids) or None
    probe = str(uuidlib.uuid4())

    def tasks_ok(d):
        # the tasks service's own view (its status table): a VM load of an
        # unknown VM reaches the agent (404) only for a running server
        return all(d.get("/servers/%s/vms/%s" % (u, probe)).status == 404
                   for u in uuids) or None
    for d in ds:
        harness.wait_until(lambda: ok(d), timeout=timeout, interval=0.2,
                           desc="servers running with their agent through %s" % d.name)
        harness.wait_until(lambda: tasks_ok(d), timeout=timeout, interval=0.2,
                           desc="servers running for the tasks of %s" % d.name)


def _setup(t, n=3, count=N_CNS, prefix="face0001", vm_delay_ms=200, config=None):
    url, db, ds = _cluster(t, n, config)
    m, agent_port = _mockcloud(t, url, ds[0].port, count, prefix, vm_delay_ms)
    uuids = m.uuids()
    _ready(ds, uuids, agent_port)
    return url, db, ds, m, agent_port, uuids


def _db_rows(conninfo, bucket="cnapi_tasks"):
    import psycopg2
    c = psycopg2.connect(conninfo)
    try:
        with c.cursor() as cur:
            cur.execute("SELECT to_regclass(%s)", (bucket,))
            if cur.fetchone()[0] is None:
                return {}
            cur.execute("SELECT _key, _value FROM %s" % bucket)
            return {k: json.loads(v) for k, v in cur.fetchall()}
    finally:
        c.close()


def _db_put_task(conninfo, rec):
    """Insert a task record the way cn_moray does (for the sweep tests)."""
    import psycopg2
    import zlib
    value = json.dumps(rec, separators=(",", ":"))
    etag = "%08X" % (zlib.crc32(value.encode()) & 0xffffffff)
    c = psycopg2.connect(conninfo)
    try:
        with c.cursor() as cur:
            cur.execute("INSERT INTO cnapi_tasks (_key, _value, _etag, _mtime, _vnode, "
                        "server_uuid, status, instance) VALUES (%s, %s, %s, %s, 0, %s, %s, %s)",
                        (rec["id"], value, etag, int(time.time() * 1000), rec["server_uuid"],
                         rec["status"], rec["instance"]))
        c.commit()
    finally:
        c.close()


def _ok_task(r):
    assert r.status == 200, (r.status, r.body)
    assert isinstance(r.body, dict) and harness_uuid(r.body.get("id")), r.body
    return r.body["id"]


def harness_uuid(s):
    try:
        return str(uuidlib.UUID(s)) == s
    except (TypeError, ValueError, AttributeError):
        return False


def _wait(d, tid, timeout=60):
    """GET /tasks/:id/wait?timeout=N on d; the record."""
    r = d.get("/tasks/%s/wait?timeout=%d" % (tid, timeout), timeout=timeout + 10)
    assert r.status == 200, (d.name, r.status, r.body)
    return r.body


def _done(d, tid, want="complete", timeout=60):
    rec = _wait(d, tid, timeout)
    assert rec["status"] == want, (d.name, rec)
    return rec


def _create_on_new_server(d, su, body, tick=None):
    """POST /servers/su/vms on d once d's status table knows su's fresh
    session (GET /servers may say running a moment earlier, from the
    sysinfo's freshness); tick() runs between tries. The task id."""
    def attempt():
        if tick:
            tick()
        r = d.post("/servers/%s/vms" % su, json=body)
        if r.status == 409 and r.body.get("code") == "ServerNotRunning":
            return None
        return _ok_task(r)
    return harness.wait_until(attempt, timeout=15, interval=0.1,
                              desc="a task accepted for the new server %s" % su)


def _agent(agent_port, method, path, uuid, body=None):
    return harness.http_request("127.0.0.1", agent_port, method, path, body,
                                {"x-server-uuid": uuid}, timeout=5)


# ------------------------------------------------------------------ tests

def test_client_flow(t):
    """API.md's client flow, each step on another instance."""
    _url, db, ds, _m, _ap, uuids = _setup(t)
    d1, d2, d3 = ds
    cn = uuids[0]
    # create on d1
    r = d1.post("/servers/%s/vms" % cn, json={"brand": "joyent-minimal", "ram": 256,
                                               "alias": "flow"})
    tid = _ok_task(r)
    vm = r.body["vm_uuid"]
    assert harness_uuid(vm), r.body
    # get on d2 (committed before the answer: visible everywhere at once)
    g = d2.get("/tasks/%s" % tid)
    assert g.status == 200, g
    assert g.body["id"] == tid and g.body["task"] == "machine_create", g.body
    assert g.body["server_uuid"] == cn and g.body["vm_uuid"] == vm, g.body
    assert g.body["status"] in ("active", "complete"), g.body
    for hidden in ("params", "instance_boot", "last_seq"):
        assert hidden not in g.body, g.body
    # wait on d3
    rec = _done(d3, tid)
    assert rec["history"] and rec["history"][-1]["name"] == "end", rec
    assert rec["finished_at"], rec
    # load on d1: running
    v = d1.get("/servers/%s/vms/%s" % (cn, vm))
    assert v.status == 200, v
    assert v.body.get("uuid") == vm and v.body.get("state") == "running", v.body
    # stop / start / reboot, each created on one instance and waited on another
    for i, (action, state) in enumerate((("stop", "stopped"), ("start", "running"),
                                         ("reboot", "running"))):
        creator, waiter, loader = ds[i % 3], ds[(i + 1) % 3], ds[(i + 2) % 3]
        r = creator.post("/servers/%s/vms/%s/%s" % (cn, vm, action))
        tid = _ok_task(r)
        rec = _done(waiter, tid)
        assert rec["task"] == {"stop": "machine_shutdown", "start": "machine_boot",
                               "reboot": "machine_reboot"}[action], rec
        v = loader.get("/servers/%s/vms/%s" % (cn, vm))
        assert v.status == 200 and v.body.get("state") == state, (action, v)
    # update
    tid = _ok_task(d2.post("/servers/%s/vms/%s/update" % (cn, vm), json={"alias": "renamed"}))
    _done(d1, tid)
    v = d3.get("/servers/%s/vms/%s" % (cn, vm))
    assert v.status == 200 and v.body.get("alias") == "renamed", v
    # delete
    r = d3.request("DELETE", "/servers/%s/vms/%s" % (cn, vm))
    tid = _ok_task(r)
    rec = _done(d2, tid)
    assert rec["task"] == "machine_destroy", rec
    v = d1.get("/servers/%s/vms/%s" % (cn, vm))
    assert v.status == 404 and v.body["code"] == "VmNotFound", v
    # a task on a VM that is gone fails, with the agent's error
    tid = _ok_task(d1.post("/servers/%s/vms/%s/start" % (cn, vm)))
    rec = _done(d3, tid, want="failure")
    assert rec["error"]["code"] == "VmNotFound", rec
    # sysinfo-refresh
    tid = _ok_task(d2.post("/servers/%s/sysinfo-refresh" % cn))
    _done(d1, tid)
    # the store holds every record, none active
    rows = _db_rows(db)
    assert len(rows) == 8, len(rows)
    assert all(r["status"] != "active" for r in rows.values()), rows
    # every one reached the agent (dispatched, or ended by the agent's
    # frames before the 202 was even read)
    assert all(not (r.get("error") or {}).get("code", "").startswith("Agent")
               for r in rows.values()), rows
    assert sum(_tasks_status(d)["created"] for d in ds) == 8
    assert sum(_tasks_status(d)["dispatch_failures"] for d in ds) == 0


def test_waits_from_anywhere(t):
    """Many waiters on every instance for tasks created everywhere; a wait
    that times out answers the active record; an ended task answers at once."""
    _url, db, ds, _m, _ap, uuids = _setup(t, vm_delay_ms=1500)
    tids = []
    for i, cn in enumerate(uuids):
        r = ds[i % 3].post("/servers/%s/vms" % cn, json={"brand": "bhyve", "ram": 512})
        tids.append(_ok_task(r))
    results, errors = {}, []

    def waiter(d, tid):
        try:
            results[(d.name, tid)] = _wait(d, tid, 60)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
    # a wait that times out first (1 s, while the VM takes 1.5 s)
    short = ds[1].get("/tasks/%s/wait?timeout=1" % tids[0], timeout=10)
    threads = [threading.Thread(target=waiter, args=(d, tid)) for d in ds for tid in tids]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=90)
    assert not errors, errors
    assert len(results) == 9, results.keys()
    assert all(r["status"] == "complete" for r in results.values()), results
    assert short.status == 200, short
    assert short.body["status"] in ("active", "complete"), short.body
    # ended: answered at once, by every instance
    for d in ds:
        t0 = time.monotonic()
        assert _wait(d, tids[0], 3600)["status"] == "complete"
        assert time.monotonic() - t0 < 2
    assert sum(_tasks_status(d)["waits_total"] for d in ds) >= 9
    assert all(_tasks_status(d)["waits"] == 0 for d in ds)


def test_not_running_and_bad_input(t):
    """Documented errors, and nothing written for any of them."""
    _url, db, ds, _m, _ap, uuids = _setup(t, n=2, count=1)
    d1, d2 = ds
    cn = uuids[0]
    vm = str(uuidlib.uuid4())
    # a server with a record but no session anywhere: 409 ServerNotRunning
    lonely = str(uuidlib.uuid4())
    si = harness.make_sysinfo(lonely, "lonely", setup=True, admin_ip="127.0.0.1")
    r = d1.post("/servers/%s/sysinfo" % lonely, json={"sysinfo": si})
    assert r.status in (200, 204), r
    harness.wait_until(lambda: d2.get("/servers/%s" % lonely).status == 200, timeout=10)
    for method, path, body in (("POST", "/servers/%s/vms" % lonely, {"ram": 1}),
                               ("POST", "/servers/%s/vms/%s/start" % (lonely, vm), {}),
                               ("DELETE", "/servers/%s/vms/%s" % (lonely, vm), None),
                               ("GET", "/servers/%s/vms/%s" % (lonely, vm), None),
                               ("POST", "/servers/%s/sysinfo-refresh" % lonely, {})):
        r = d2.request(method, path, body)
        assert r.status == 409 and r.body["code"] == "ServerNotRunning", (path, r)
    unknown = str(uuidlib.uuid4())
    r = d1.post("/servers/%s/vms" % unknown, json={"ram": 1})
    assert r.status == 404 and r.body["code"] == "ResourceNotFound", r
    # bad server uuid
    for path in ("/servers/nope/vms", "/servers/nope/vms/%s/stop" % vm,
                 "/servers/nope/sysinfo-refresh"):
        r = d1.post(path, json={})
        assert r.status == 409 and r.body["code"] == "InvalidArgument", (path, r)
    # bad VM uuids
    for method, path in (("POST", "/servers/%s/vms/not-a-vm/start" % cn),
                         ("POST", "/servers/%s/vms/not-a-vm/kill" % cn),
                         ("DELETE", "/servers/%s/vms/1234" % cn),
                         ("GET", "/servers/%s/vms/1234" % cn)):
        r = d2.request(method, path, {} if method == "POST" else None)
        assert r.status == 409 and r.body["code"] == "InvalidArgument", (path, r)
    # bad VM payloads
    for body in ({"uuid": "nope"}, {"uuid": 7}, {"ram": "lots"}, {"brand": 5},
                 {"alias": ["a"]}):
        r = d1.post("/servers/%s/vms" % cn, json=body)
        assert r.status == 409 and r.body["code"] == "InvalidArgument", (body, r)
    for raw in (b"{not json", b"[1,2]", b'"text"'):
        r = d1.request("POST", "/servers/%s/vms" % cn, raw,
                       {"Content-Type": "application/json"})
        assert r.status == 400 and r.body["code"] == "InvalidContent", (raw, r)
    # unknown task routes and methods
    r = d1.get("/tasks/%s/nope" % vm)
    assert r.status == 404 and r.body["code"] == "ResourceNotFound", r
    r = d1.post("/tasks/%s" % vm, json={})
    assert r.status == 405, r
    r = d1.post("/servers/%s/vms/%s/explode" % (cn, vm), json={})
    assert r.status == 404, r
    # unknown / malformed task ids
    for tid in (str(uuidlib.uuid4()), "not-a-task", "x" * 80):
        for path in ("/tasks/%s" % tid, "/tasks/%s/wait?timeout=5" % tid):
            r = d2.get(path)
            assert r.status == 404 and r.body["code"] == "ResourceNotFound", (path, r)
    # bad timeouts (checked before the lookup)
    for q in ("0", "3601", "abc", "1.5", "-1", "", "10&timeout=20"):
        r = d1.get("/tasks/%s/wait?timeout=%s" % (vm, q))
        assert r.status == 409 and r.body["code"] == "InvalidArgument", (q, r)
    # nothing was written
    assert _db_rows(db) == {}, _db_rows(db)
    # while a real task works (and VM load 404s for an unknown VM)
    r = d2.get("/servers/%s/vms/%s" % (cn, vm))
    assert r.status == 404 and r.body["code"] == "VmNotFound", r
    tid = _ok_task(d2.post("/servers/%s/vms" % cn, json={"uuid": vm.upper(), "ram": 64}))
    rec = _done(d1, tid)
    assert rec["vm_uuid"] == vm, rec
    assert list(_db_rows(db)) == [tid]


def test_agent_paused_or_down(t):
    """A paused agent, an agent nobody listens for and an agent that never
    answers: the task fails with a clear error in bounded time."""
    url, db, ds, _m, agent_port, uuids = _setup(t, n=2, count=1)
    d1, d2 = ds
    cn = uuids[0]
    # paused
    r = _agent(agent_port, "POST", "/pause", cn)
    assert r.status == 204, r
    t0 = time.monotonic()
    tid = _ok_task(d1.post("/servers/%s/vms" % cn, json={"ram": 64}))
    rec = _done(d2, tid, want="failure", timeout=30)
    assert rec["error"]["code"] == "AgentPaused", rec
    assert "paused" in rec["error"]["message"], rec
    assert not rec["dispatched"], rec
    assert time.monotonic() - t0 < 10
    r = _agent(agent_port, "POST", "/resume", cn)
    assert r.status == 204, r
    tid = _ok_task(d1.post("/servers/%s/vms" % cn, json={"ram": 64}))
    _done(d2, tid)

    # a server whose session is up (a raw agent) but whose agent endpoint
    # refuses connections, then one that accepts and never answers
    dead_port = harness.free_port("127.0.0.1")
    mute = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    mute.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    mute.bind(("127.0.0.1", 0))
    mute.listen(64)                      # never accepted, never answered
    t.cleanup(mute.close)
    for port, why in ((dead_port, "cannot reach"), (mute.getsockname()[1], "did not answer")):
        su = str(uuidlib.uuid4())
        si = harness.make_sysinfo(su, "raw-%d" % port, setup=True, admin_ip="127.0.0.1",
                                  fields={"CN Agent Port": port})
        r = d1.post("/servers/%s/sysinfo" % su, json={"sysinfo": si})
        assert r.status in (200, 204), r
        a = wsagent.Agent(d2.address, d2.port, su)
        t.cleanup(a.close)
        st, _h, _b = a.connect()
        assert st == 101, st
        a.hello(vms={})
        stop = threading.Event()

        def beat(a=a, stop=stop):
            seq = 0
            while not stop.wait(0.5):
                seq += 1
                try:
                    a.send_msg({"v": 1, "type": "hb", "seq": seq, "sent_ms": wsagent.now_ms()})
                except OSError:
                    return
        th = threading.Thread(target=beat, daemon=True)
        th.start()
        t.cleanup(stop.set)
        harness.wait_until(lambda: d1.get("/servers/%s" % su).body.get("status") == "running",
                           timeout=15, desc="raw server running")
        t0 = time.monotonic()
        tid = _create_on_new_server(d1, su, {"ram": 64})
        rec = _done(d2, tid, want="failure", timeout=30)
        assert rec["error"]["code"] == "AgentUnreachable", rec
        assert why in rec["error"]["message"], rec
        assert time.monotonic() - t0 < 10, time.monotonic() - t0
        # VM load: 500 for a refused connection, 504 for silence
        r = d2.get("/servers/%s/vms/%s" % (su, uuidlib.uuid4()), timeout=15)
        assert (r.status, r.body["code"]) == ((500, "AgentUnreachable") if port == dead_port
                                              else (504, "AgentTimeout")), r
    assert all(r["status"] != "active" for r in _db_rows(db).values())


def test_sweep_ends_orphans(t):
    """Active tasks left by a dead instance: never delivered -> DispatchLost;
    delivered and ended on the agent -> the agent's end."""
    url, db, ds, _m, agent_port, uuids = _setup(t, n=2, count=1)
    d1, d2 = ds
    cn = uuids[0]
    # a task the agent ran but whose result never reached the store: run it
    # on the agent directly (held request: no session frames), then record
    # it as an orphan of a dead instance
    vm = str(uuidlib.uuid4())
    ran = str(uuidlib.uuid4())
    lost = str(uuidlib.uuid4())
    r = _agent(agent_port, "POST", "/tasks", cn, {"task": "machine_create",
                                                   "params": {"uuid": vm, "ram": 64}})
    assert r.status == 200, r
    now = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
    base = {"req_id": "r", "server_uuid": cn, "vm_uuid": vm, "params": {"uuid": vm},
            "status": "active", "timestamp": now, "history": [], "instance": "cnapi-ghost",
            "instance_boot": str(uuidlib.uuid4()), "dispatched": True, "error": None,
            "result": None, "last_seq": 0, "finished_at": None}
    _db_put_task(db, dict(base, id=lost, task="machine_boot"))
    # an orphan the agent knows: dispatched with its id, then frames lost
    r = harness.http_request("127.0.0.1", agent_port, "POST", "/tasks",
                             {"task": "machine_shutdown", "params": {"uuid": vm}},
                             {"x-server-uuid": cn, "x-cnapi-task-id": ran}, timeout=5)
    assert r.status == 202, r
    # the agent's outbox frames reach an instance and find no record: acked
    harness.wait_until(lambda: _agent(agent_port, "GET", "/tasks/%s" % ran, cn).body
                       .get("status") == "complete", timeout=20)
    _db_put_task(db, dict(base, id=ran, task="machine_shutdown"))
    for tid, want, code in ((lost, "failure", "DispatchLost"), (ran, "complete", None)):
        rec = _done(ds[0], tid, want=want, timeout=40)
        if code:
            assert rec["error"]["code"] == code, rec
    assert sum(_tasks_status(d)["swept"] for d in ds) >= 2


def test_kill9_dispatcher(t):
    """kill -9 of the instance that dispatched 100 running tasks: every task
    ends complete or failure, none stays active, waits on the survivors
    return."""
    url, db, ds, m, agent_port, uuids = _setup(t, count=10, vm_delay_ms=3000)
    d1, d2, d3 = ds
    tids = []
    # 100 tasks running (each VM takes 3 s to create) when d1 dies
    for i, cn in enumerate(uuids):
        for k in range(10):
            r = d1.post("/servers/%s/vms" % cn, json={"ram": 64, "alias": "k%d" % k})
            tids.append(_ok_task(r))
    results, errors = {}, []

    def waiter(d, tid):
        try:
            results[tid] = _wait(d, tid, 90)
        except Exception as e:  # noqa: BLE001
            errors.append(e)
    threads = [threading.Thread(target=waiter, args=(ds[1 + i % 2], tid))
               for i, tid in enumerate(tids)]
    for th in threads:
        th.start()
    d1.kill9()
    for th in threads:
        th.join(timeout=120)
    assert not errors, errors
    assert len(results) == len(tids)
    assert all(r["status"] in ("complete", "failure") for r in results.values()), results
    rows = _db_rows(db)
    assert all(rows[tid]["status"] in ("complete", "failure") for tid in tids), rows
    # the agents' sessions moved to the survivors, which recorded the ends
    ok = sum(1 for r in results.values() if r["status"] == "complete")
    t.log("after kill -9: %d complete, %d failed (%s)" % (
        ok, len(tids) - ok, sorted({(r.get("error") or {}).get("code") for r in
                                    results.values() if r["status"] == "failure"})))
    for r in results.values():
        if r["status"] == "failure":
            assert r["error"]["code"] in ("DispatchLost", "AgentUnreachable"), r
    # a new task from a survivor still works end to end
    tid = _ok_task(d2.post("/servers/%s/vms" % uuids[0], json={"ram": 64}))
    _done(d3, tid)


class _StubAgent:
    """A tiny agent endpoint that accepts every POST /tasks with 202 (the
    results then come over a raw session the test drives)."""

    def __init__(self):
        import http.server

        received = self.received = []

        class H(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                n = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(n)
                received.append(self.headers.get("x-cnapi-task-id"))
                body = json.dumps({"id": self.headers.get("x-cnapi-task-id")}).encode()
                self.send_response(202)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a):
                pass
        self.srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.port = self.srv.server_address[1]
        self.th = threading.Thread(target=self.srv.serve_forever, daemon=True)
        self.th.start()

    def close(self):
        self.srv.shutdown()
        self.srv.server_close()


def _raw_server(t, d_api, d_sess, agent_port):
    """A server whose agent endpoint is agent_port and whose session is a
    raw wsagent on d_sess (heartbeats from a thread). Returns (uuid, agent)."""
    su = str(uuidlib.uuid4())
    si = harness.make_sysinfo(su, "raw", setup=True, admin_ip="127.0.0.1",
                              fields={"CN Agent Port": agent_port})
    r = d_api.post("/servers/%s/sysinfo" % su, json={"sysinfo": si})
    assert r.status in (200, 204), r
    a = wsagent.Agent(d_sess.address, d_sess.port, su)
    t.cleanup(a.close)
    st, _h, _b = a.connect()
    assert st == 101, st
    a.hello(vms={})
    def running():
        a.hb()
        return d_api.get("/servers/%s" % su).body.get("status") == "running"
    harness.wait_until(running, timeout=15, interval=0.2, desc="raw server running")
    return su, a


def _recv_ack(a, timeout=10):
    """The next task_ack on the raw session (heartbeats skipped)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        kind, data = a.recv(max(0.0, deadline - time.monotonic()))
        if kind != "msg":
            raise AssertionError("no task_ack: %s %r" % (kind, data))
        if data.get("type") == "task_ack":
            return data
    raise AssertionError("no task_ack within %ss" % timeout)


def test_task_frames(t):
    """task_event / task_end over a session: written, then acked; repeats
    and stale seqs change nothing; a frame for an unknown task is acked; a
    malformed one closes the session 1002."""
    _url, db, ds, _m, _ap, _uuids = _setup(t, n=2, count=1)
    d1, d2 = ds
    stub = _StubAgent()
    t.cleanup(stub.close)
    su, a = _raw_server(t, d1, d2, stub.port)
    tid = _create_on_new_server(d1, su, {"ram": 64}, tick=a.hb)

    def delivered():
        a.hb()                  # the main thread is the only sender
        return tid in stub.received or None
    harness.wait_until(delivered, timeout=10, interval=0.2, desc="the stub accepted the task")
    # "dispatched" is written with the agent's first frame, not on the 202
    assert _db_rows(db)[tid]["dispatched"] is False
    now = wsagent.now_ms()
    ev = {"v": 1, "type": "task_event", "id": tid, "seq": 1, "name": "start",
          "event": {"pct": 0}, "time_ms": now}
    a.send_msg(ev)
    assert _recv_ack(a) == {"v": 1, "type": "task_ack", "id": tid, "seq": 1}
    assert _db_rows(db)[tid]["dispatched"] is True  # acked after the commit
    a.send_msg(ev)                                  # again: acked, not applied
    assert _recv_ack(a)["seq"] == 1
    a.send_msg({"v": 1, "type": "task_end", "id": tid, "seq": 2, "status": "complete",
                "result": {"ok": True}, "time_ms": now + 5})
    assert _recv_ack(a)["seq"] == 2
    rec = _done(d2, tid, timeout=10)
    assert [h["name"] for h in rec["history"]] == ["start", "end"], rec
    assert rec["result"] == {"ok": True}, rec
    # a late end after the task ended: acked, nothing changes
    a.send_msg({"v": 1, "type": "task_end", "id": tid, "seq": 3, "status": "failure",
                "error": {"code": "X", "message": "late"}, "time_ms": now + 9})
    assert _recv_ack(a)["seq"] == 3
    assert d1.get("/tasks/%s" % tid).body == rec
    # a frame for a task nobody has: acked (a bogus id cannot pin the outbox)
    ghost = str(uuidlib.uuid4())
    a.send_msg({"v": 1, "type": "task_end", "id": ghost, "seq": 1, "status": "complete",
                "time_ms": now})
    assert _recv_ack(a) == {"v": 1, "type": "task_ack", "id": ghost, "seq": 1}
    assert ghost not in _db_rows(db)
    # malformed: close 1002
    a.send_msg({"v": 1, "type": "task_event", "id": tid, "name": "x", "time_ms": now})
    code, reason = a.wait_close(timeout=10)
    assert code == 1002, (code, reason)


def test_waits_without_redis(t):
    """Redis down: a wait on another instance still returns (the store is
    polled every second), and tasks still run end to end."""
    _url, db, ds, _m, _ap, uuids = _setup(t, n=2, count=1, vm_delay_ms=500)
    d1, d2 = ds
    cn = uuids[0]
    t.stack.stop_service("redis")
    t.cleanup(t.stack.start_service, "redis")

    t0 = time.monotonic()
    r = d1.post("/servers/%s/vms" % cn, json={"ram": 64}, timeout=15)
    tid = _ok_task(r)
    rec = _done(d2, tid, timeout=30)
    took = time.monotonic() - t0
    assert took < 10, took
    vm = rec["vm_uuid"]
    # a wait that started before the end, answered by the poll
    tid = _ok_task(d2.post("/servers/%s/vms/%s/stop" % (cn, vm), timeout=15))
    rec = _done(d1, tid, timeout=30)
    assert rec["task"] == "machine_shutdown", rec
    assert _tasks_status(d1)["publish_failures"] >= 1 or _tasks_status(d2)["publish_failures"] >= 1
    t.stack.start_service("redis")
    for d in ds:
        harness.wait_until(lambda: _tasks_status(d)["subscription"] or None, timeout=30,
                           interval=0.2, desc="%s subscribed again" % d.name)
    tid = _ok_task(d1.post("/servers/%s/vms/%s/start" % (cn, vm)))
    _done(d2, tid)
