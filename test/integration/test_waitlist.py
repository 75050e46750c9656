"""The waitlist (docs/waitlist.md): tickets per (server, scope, id) become
active strictly one at a time, in creation order, across two instances;
release, delete and expiry activate the next; held waits are answered from
either instance; bad input is refused and writes nothing.

Each test runs two cnapid instances on one fresh database, Redis database
and vhost, with a few servers registered through POST /servers/:uuid/sysinfo.
"""

import datetime
import threading
import uuid as uuidlib

import harness

TIMEOUT = 120


def _iso(seconds_from_now):
    t = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=seconds_from_now)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + "%03dZ" % (t.microsecond // 1000)


def _pair(t, nservers=1):
    db, redis_url, vhost = t.fresh_db(), t.fresh_redis(), t.fresh_vhost()
    a = t.cnapid("wl-1", pg_conninfo=db, redis_url=redis_url, amqp_url=vhost)
    b = t.cnapid("wl-2", pg_conninfo=db, redis_url=redis_url, amqp_url=vhost)
    servers = []
    for i in range(nservers):
        u = str(uuidlib.uuid4())
        si = harness.make_sysinfo(u, "cn-wl-%d" % i)
        r = a.post("/servers/%s/sysinfo" % u, json={"sysinfo": si})
        assert r.status == 200, r
        servers.append(u)
    return a, b, db, servers


def _create(d, server, scope="vm", id_="res-1", expires=600, **extra):
    body = {"scope": scope, "id": id_, "expires_at": _iso(expires), "action": "provision"}
    body.update(extra)
    r = d.post("/servers/%s/tickets" % server, json=body)
    assert r.status == 202, r
    return r.body


def _status(d, ticket):
    r = d.get("/tickets/%s" % ticket)
    assert r.status == 200, r
    return r.body["status"]


def _statuses(d, tickets):
    return [_status(d, x) for x in tickets]


def _ticket_rows(conninfo):
    import psycopg2
    c = psycopg2.connect(conninfo, connect_timeout=5)
    try:
        with c.cursor() as cur:
            cur.execute("SELECT to_regclass('cnapi_waitlist_tickets')")
            if cur.fetchone()[0] is None:
                return 0
            cur.execute("SELECT count(*) FROM cnapi_waitlist_tickets")
            return cur.fetchone()[0]
    finally:
        c.close()


class _Wait(threading.Thread):
    """GET /tickets/:t/wait in the background; .result when done."""

    def __init__(self, d, ticket, timeout_s=60):
        super().__init__(daemon=True)
        self.d, self.ticket, self.timeout_s = d, ticket, timeout_s
        self.result = None

    def run(self):
        self.result = self.d.get("/tickets/%s/wait?timeout=%d" % (self.ticket, self.timeout_s),
                                 timeout=self.timeout_s + 10)

    def done(self, timeout=30):
        self.join(timeout)
        assert not self.is_alive(), "wait on %s did not return" % self.ticket
        return self.result


def test_one_active_in_creation_order(t):
    a, b, db, (srv,) = _pair(t)
    ds = [a, b, a, b]
    made = [_create(d, srv) for d in ds]
    tickets = [m["uuid"] for m in made]
    # each answer's queue is the queue so far, in creation order
    for i, m in enumerate(made):
        assert [q["uuid"] for q in m["queue"]] == tickets[:i + 1], m
    assert made[0]["queue"][0]["status"] == "active"
    assert _statuses(b, tickets) == ["active", "queued", "queued", "queued"]
    # the Ticket object
    tk = a.get("/tickets/%s" % tickets[1]).body
    assert set(tk) >= {"uuid", "server_uuid", "scope", "id", "action", "extra", "reqid",
                       "expires_at", "created_at", "updated_at", "status"}, tk
    assert tk["server_uuid"] == srv and tk["scope"] == "vm" and tk["id"] == "res-1"
    assert "seq" not in tk and "queue" not in tk
    # the active one's wait answers at once, on either instance
    assert a.get("/tickets/%s/wait" % tickets[0]).status == 204
    assert b.get("/tickets/%s/wait" % tickets[0]).status == 204
    # release on one instance, the next becomes active; its wait, held on
    # the other instance, is answered
    for i in range(len(tickets) - 1):
        w = _Wait(ds[i + 1] is a and b or a, tickets[i + 1])
        w.start()
        assert _status(a, tickets[i + 1]) == "queued"
        rel = ds[i].put("/tickets/%s/release" % tickets[i])
        assert rel.status == 204, rel
        r = w.done()
        assert r.status == 204, r
        st = _statuses(a, tickets)
        assert st[:i + 1] == ["finished"] * (i + 1), st
        assert st[i + 1] == "active" and st.count("active") == 1, st
    assert b.put("/tickets/%s/release" % tickets[-1]).status == 204
    assert _statuses(b, tickets) == ["finished"] * 4
    # other queues are independent: another id, another scope
    x = _create(a, srv, id_="res-2")
    y = _create(b, srv, scope="image", id_="res-1")
    assert _status(a, x["uuid"]) == "active" and _status(b, y["uuid"]) == "active"
    lst = a.get("/servers/%s/tickets" % srv)
    assert lst.status == 200 and len(lst.body) == 6, lst
    assert [x["created_at"] for x in lst.body] == sorted(x["created_at"] for x in lst.body)


def test_concurrent_creates_one_active(t):
    a, b, db, (srv,) = _pair(t)
    out, lock = [], threading.Lock()

    def make(d):
        r = _create(d, srv, id_="hot")
        with lock:
            out.append(r["uuid"])

    threads = [threading.Thread(target=make, args=(d,)) for d in [a, b] * 6]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    assert len(out) == 12
    # the queue order: list sorted by creation
    order = [x["uuid"] for x in a.get("/servers/%s/tickets" % srv).body]
    assert sorted(order) == sorted(out)
    for i in range(len(order)):
        st = _statuses(b, order)
        assert st.count("active") == 1, st
        assert st[i] == "active" and st[:i] == ["finished"] * i, (i, st)
        assert [a, b][i % 2].put("/tickets/%s/release" % order[i]).status == 204
    assert _statuses(a, order) == ["finished"] * 12


def test_delete_activates_next(t):
    a, b, db, (srv,) = _pair(t)
    t1, t2, t3 = [_create(d, srv)["uuid"] for d in (a, b, a)]
    # deleting a queued one changes nothing else
    assert b.delete("/tickets/%s" % t2).status == 204
    assert a.get("/tickets/%s" % t2).status == 404
    w = _Wait(b, t3)
    w.start()
    assert a.delete("/tickets/%s" % t1).status == 204
    assert w.done().status == 204
    assert _status(a, t3) == "active"
    r = a.delete("/tickets/%s" % t1)
    assert r.status == 404 and r.body["code"] == "ResourceNotFound", r
    # a wait held on a ticket that is deleted is answered 404
    t4 = _create(b, srv)["uuid"]
    w = _Wait(a, t4)
    w.start()
    assert _status(b, t4) == "queued"
    assert b.delete("/tickets/%s" % t4).status == 204
    assert w.done().status == 404
    # delete all: needs force=true
    r = a.delete("/servers/%s/tickets" % srv)
    assert r.status == 412 and r.body["code"] == "PreconditionFailed", r
    assert a.delete("/servers/%s/tickets?force=true" % srv).status == 204
    assert a.get("/servers/%s/tickets" % srv).body == []


def test_expiry_frees_the_queue(t):
    a, b, db, (srv,) = _pair(t)
    first = _create(a, srv, expires=1.5)["uuid"]
    second = _create(b, srv, expires=600)["uuid"]
    assert _statuses(a, [first, second]) == ["active", "queued"]
    w = _Wait(a, second)
    w.start()
    r = w.done(timeout=20)
    assert r.status == 204, r
    assert _statuses(b, [first, second]) == ["expired", "active"]
    # waiting on an expired ticket is an error (as the reference)
    r = b.get("/tickets/%s/wait" % first)
    assert r.status == 500 and "expired" in r.body["message"], r
    # a queued ticket that expires while waited on: its wait ends in an error
    third = _create(a, srv, expires=1.0)["uuid"]
    assert _status(a, third) == "queued"
    w = _Wait(b, third)
    w.start()
    r = w.done(timeout=20)
    assert r.status == 500 and "expired" in r.body["message"], r
    assert _status(a, second) == "active"
    # a wait with a short timeout on a queued ticket
    fourth = _create(a, srv)["uuid"]
    r = b.get("/tickets/%s/wait?timeout=0.3" % fourth)
    assert r.status == 500 and "timed out" in r.body["message"], r
    assert _status(b, fourth) == "queued"


def test_bad_input_writes_nothing(t):
    a, b, db, (srv,) = _pair(t)
    good = {"scope": "vm", "id": "x", "expires_at": _iso(60)}
    r = a.post("/servers/not-a-uuid/tickets", json=good)
    assert r.status == 409 and r.body["code"] == "InvalidArgument", r
    r = a.post("/servers/%s/tickets" % uuidlib.uuid4(), json=good)
    assert r.status == 404 and r.body["code"] == "ResourceNotFound", r
    for missing in ("scope", "id", "expires_at"):
        body = dict(good)
        del body[missing]
        r = b.post("/servers/%s/tickets" % srv, json=body)
        assert r.status == 500 and r.body["code"] == "InvalidParameters", r
        assert [e["field"] for e in r.body["errors"]] == [missing], r
    for bad in ("tomorrow", "2026-13-01T00:00:00Z", 12345):
        r = a.post("/servers/%s/tickets" % srv, json=dict(good, expires_at=bad))
        assert r.status == 500 and r.body["errors"][0]["field"] == "expires_at", r
    r = a.post("/servers/%s/tickets" % srv, json=dict(good, extra="nope"))
    assert r.status == 500 and r.body["errors"][0]["field"] == "extra", r
    r = a.request("POST", "/servers/%s/tickets" % srv, body="{broken",
                  headers={"Content-Type": "application/json"})
    assert r.status == 400 and r.body["code"] == "InvalidContent", r
    assert _ticket_rows(db) == 0
    # unknown tickets
    nope = str(uuidlib.uuid4())
    for method, path in (("GET", "/tickets/%s"), ("DELETE", "/tickets/%s"),
                         ("PUT", "/tickets/%s/release"), ("GET", "/tickets/%s/wait"),
                         ("GET", "/tickets/not-a-uuid")):
        r = a.request(method, path % nope if "%s" in path else path)
        assert r.status == 404 and r.body["code"] == "ResourceNotFound", (method, path, r)
    r = a.get("/servers/not-a-uuid/tickets")
    assert r.status == 409, r
    assert _ticket_rows(db) == 0
    # "default" is a server for the waitlist
    d = _create(a, "default")
    assert _status(b, d["uuid"]) == "active"


def test_status_on_admin_socket(t):
    import json
    import subprocess
    a, b, db, (srv,) = _pair(t)
    tk = _create(a, srv)["uuid"]
    assert a.put("/tickets/%s/release" % tk).status == 204
    out = subprocess.run([str(harness.build_dir() / "cnapictl"), "-e", a.admin_endpoint, "-j", "-t", "30000",
                          "actors"], capture_output=True, timeout=60)
    assert out.returncode == 0, out
    out = out.stdout
    text = out.decode()
    assert '"waitlist"' in text, text
    doc = json.loads(text)
    found = []

    def walk(o):
        if isinstance(o, dict):
            if o.get("actor") == "waitlist":
                found.append(o)
            for v in o.values():
                walk(v)
        elif isinstance(o, list):
            for v in o:
                walk(v)
    walk(doc)
    assert found and found[0]["created"] == 1 and found[0]["released"] == 1, found
    assert found[0]["sub"] is True, found
