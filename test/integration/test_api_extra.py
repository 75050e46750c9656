"""POST /capacity, GET /platforms and the boot parameters (docs/api.md):
codes, bodies, and that a write on one instance is what the other reads.

Two cnapid instances for the module on one fresh database, Redis database
and vhost; three servers registered in setup, with different platforms.
"""

import uuid as uuidlib

import harness

TIMEOUT = 120

P_OLD, P_NEW, P_LINUX = "20240101T000000Z", "20250505T050505Z", "20230303T030303Z"


def setup_module(ctx):
    ctx.db = harness.fresh_db(ctx.stack)
    ctx.redis_url = harness.fresh_redis(ctx.stack)
    ctx.vhost = harness.fresh_vhost(ctx.stack)
    ctx.a = harness.Cnapid(ctx.tmp, ctx.stack, name="x-1", amqp_url=ctx.vhost,
                           pg_conninfo=ctx.db, redis_url=ctx.redis_url)
    ctx.b = harness.Cnapid(ctx.tmp, ctx.stack, name="x-2", amqp_url=ctx.vhost,
                           pg_conninfo=ctx.db, redis_url=ctx.redis_url)
    for d in (ctx.a, ctx.b):
        d.start()
        d.wait_ready()
    ctx.uuids = sorted(str(uuidlib.uuid4()) for _ in range(3))
    plats = [(P_OLD, "SunOS"), (P_NEW, "SunOS"), (P_LINUX, "Linux")]
    for i, u in enumerate(ctx.uuids):
        si = harness.make_sysinfo(u, "cn-x-%d" % i, setup=True,
                                  fields={"Live Image": plats[i][0], "System Type": plats[i][1]})
        r = ctx.a.post("/servers/%s/sysinfo" % u, json={"sysinfo": si})
        assert r.status == 200, r


def teardown_module(ctx):
    try:
        ctx.a.stop()
        ctx.b.stop()
    finally:
        harness.drop_db(ctx.stack, ctx.db)


def test_capacity(t):
    a, uuids = t.ctx.a, t.ctx.uuids
    r = a.post("/capacity", json={"servers": uuids[:2]})
    assert r.status == 200, r
    caps = r.body["capacities"]
    assert sorted(caps) == uuids[:2], r
    for u in uuids[:2]:
        full = a.get("/servers/%s" % u).body
        assert caps[u]["cpu"] == full["unreserved_cpu"], (caps[u], full["unreserved_cpu"])
        assert caps[u]["ram"] == full["unreserved_ram"]
        assert caps[u]["ram"] > 0 and caps[u]["cpu"] > 0
    # no list: every server
    r = t.ctx.b.post("/capacity", json={})
    assert r.status == 200 and sorted(r.body["capacities"]) == uuids, r
    # unknown servers are left out
    r = a.post("/capacity", json={"servers": [str(uuidlib.uuid4())]})
    assert r.status == 200 and r.body["capacities"] == {}, r
    for bad in (["nope"], "x", [1]):
        r = a.post("/capacity", json={"servers": bad})
        assert r.status == 500 and r.body["code"] == "InvalidParameters", r
        assert r.body["errors"][0]["field"] == "servers"
    assert a.get("/capacity").status == 405


def test_platforms(t):
    a = t.ctx.a
    r = a.get("/platforms")
    assert r.status == 200, r
    assert r.body == {P_OLD: {}, P_NEW: {"latest": True}, P_LINUX: {}}, r
    r = a.get("/platforms?os=linux")
    assert r.body == {P_LINUX: {"latest": True}}, r
    r = a.get("/platforms?os=smartos")
    assert r.body == {P_OLD: {}, P_NEW: {"latest": True}}, r
    assert a.get("/platforms?os=plan9").body == {}


def test_boot_get(t):
    a, u = t.ctx.a, t.ctx.uuids[0]
    r = a.get("/boot/%s" % u)
    assert r.status == 200, r
    b = r.body
    assert b["platform"] == P_OLD
    assert b["kernel_args"]["hostname"] == "cn-x-0"
    assert b["kernel_args"]["rabbitmq"].count(":") == 3
    assert b["kernel_flags"] == {} and b["boot_modules"] == []
    assert b["default_console"] == "serial" and b["serial"] == "ttyb"
    r = a.get("/boot/default")
    assert r.status == 200 and r.body["platform"] == "latest", r
    r = a.get("/boot/not-a-uuid")
    assert r.status == 409 and r.body["code"] == "InvalidArgument", r
    r = a.get("/boot/%s" % uuidlib.uuid4())
    assert r.status == 404 and r.body["code"] == "ResourceNotFound", r


def test_boot_errors_write_nothing(t):
    a, u = t.ctx.a, t.ctx.uuids[1]
    before = a.get("/boot/%s" % u).body
    r = a.put("/boot/%s" % uuidlib.uuid4(), json={"platform": P_NEW})
    assert r.status == 404, r
    r = a.post("/boot/%s" % u, json={"kernel_args": "nope", "platform": 7})
    assert r.status == 500 and r.body["code"] == "InvalidParameters", r
    assert sorted(e["field"] for e in r.body["errors"]) == ["kernel_args", "platform"], r
    r = a.put("/boot/%s" % u, json={"platform": "19990101T000000Z"})
    assert r.status == 500 and r.body["message"] == \
        "Platform '19990101T000000Z' does not exist", r
    r = a.put("/boot/%s" % u, json={"boot_modules": [{"path": "/x", "content": "!!"}]})
    assert r.status == 409 and r.body["code"] == "InvalidArgument", r
    assert "must be base64 encoded" in r.body["message"]
    r = a.put("/boot/default", json={"platform": "19990101T000000Z"})
    assert r.status == 500, r
    assert a.get("/boot/%s" % u).body == before
    assert a.get("/boot/default").body["platform"] == "latest"


def test_boot_put_post(t):
    a, b, u = t.ctx.a, t.ctx.b, t.ctx.uuids[0]
    # PUT replaces (on one instance; the other reads it)
    r = a.put("/boot/%s" % u, json={"platform": P_NEW,
                                     "kernel_args": {"foo": "bar", "smt_enabled": True},
                                     "kernel_flags": {"noimport": True},
                                     "boot_modules": [{"path": "/etc/x", "content": "aGk="}]})
    assert r.status == 204, r
    g = b.get("/boot/%s" % u).body
    assert g["platform"] == P_NEW
    assert g["kernel_args"]["foo"] == "bar" and g["kernel_args"]["smt_enabled"] is True
    assert g["kernel_flags"] == {"noimport": True}
    assert g["boot_modules"] == [{"path": "/etc/x", "content": "aGk=", "type": "base64"}]
    # the server object shows it too (through the cache, on both instances)
    # (near caches hear of the change on cnapi:invalidate: poll with a deadline)
    for d in (a, b):
        harness.wait_until(
            lambda: (lambda s: s["boot_platform"] == P_NEW
                     and s["boot_params"].get("foo") == "bar")(d.get("/servers/%s" % u).body),
            timeout=10, desc="server view shows the boot write")
    # POST merges; null deletes a key
    r = b.post("/boot/%s" % u, json={"kernel_args": {"baz": "1", "foo": None},
                                      "serial": "ttya"})
    assert r.status == 204, r
    g = a.get("/boot/%s" % u).body
    assert "foo" not in g["kernel_args"] and g["kernel_args"]["baz"] == "1"
    assert g["kernel_args"]["smt_enabled"] is True and g["serial"] == "ttya"
    assert g["platform"] == P_NEW and g["kernel_flags"] == {"noimport": True}
    # PUT without a platform: the latest
    assert a.put("/boot/%s" % u, json={}).status == 204
    g = b.get("/boot/%s" % u).body
    assert g["platform"] == P_NEW and g["kernel_args"] == {
        "hostname": "cn-x-0", "rabbitmq": g["kernel_args"]["rabbitmq"]}, g
    assert g["serial"] == "ttyb" and g["boot_modules"] == []


def test_boot_default(t):
    a, b = t.ctx.a, t.ctx.b
    r = a.put("/boot/default", json={"platform": P_OLD, "kernel_args": {"k": "v"},
                                      "default_console": "vga"})
    assert r.status == 204, r
    g = b.get("/boot/default").body
    assert g["platform"] == P_OLD and g["kernel_args"]["k"] == "v", g
    assert g["default_console"] == "vga"
    assert b.post("/boot/default", json={"kernel_args": {"k2": "v2"}}).status == 204
    g = a.get("/boot/default").body
    assert g["kernel_args"]["k"] == "v" and g["kernel_args"]["k2"] == "v2", g
    assert g["platform"] == P_OLD
