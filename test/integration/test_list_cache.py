"""GET /servers from the backends' list-view cache (lib/cn_listcache.c)
answers exactly the bytes of the uncached path.

Two instances on one store: `lc-on` with the list cache (the default) and
`lc-off` with list_cache_mb=0 (every row rendered from its value, the path
before the cache). Every comparison asks lc-on twice (the second answer comes
from views the first one cached) and lc-off once, and wants the three bodies
byte for byte equal: the default view with filters, limit and offset; after a
record changes (operator fields, new sysinfo, a delete); after a server's
status changes with no change to its record (the status table, the clock).
Queries with extras or fields are compared too (they take the uncached path
on both).
"""

import http.client
import json
import subprocess
import uuid as uuidlib

import harness
import wsagent

TIMEOUT = 120
N = 40


def _raw(d, path):
    """GET path: (status, body bytes), unparsed."""
    c = http.client.HTTPConnection(d.address, d.port, timeout=10)
    try:
        c.request("GET", path, headers={"Accept": "application/json"})
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def _same(ctx, path):
    """The list through both instances, lc-on twice: equal bytes. Returns
    the parsed body."""
    s1, a = _raw(ctx.on, path)
    s2, b = _raw(ctx.off, path)
    s3, c = _raw(ctx.on, path)
    assert s1 == s2 == s3, (path, s1, s2, s3)
    assert a == b, "%s: cached and uncached differ\n  on:  %.600s\n  off: %.600s" % (path, a, b)
    assert c == b, "%s: second cached answer differs\n  on:  %.600s\n  off: %.600s" % (path, c, b)
    return json.loads(a) if s1 == 200 else None


def _list_cache(d):
    """The gateway's list_cache_* counters (cnapictl actors)."""
    out = subprocess.run([str(harness.build_dir() / "cnapictl"), "-e", d.admin_endpoint,
                          "-t", "5000", "-j", "actors"], capture_output=True, text=True,
                         timeout=20)
    assert out.returncode == 0, out.stderr
    gw = json.loads(out.stdout)["gateway"]
    return {k: v for k, v in gw.items() if k.startswith("list_cache_")}


def _register(d, u, hostname, **kw):
    r = d.post("/servers/%s/sysinfo" % u, json={"sysinfo": harness.make_sysinfo(u, hostname, **kw)})
    assert r.status == 200, r


def setup_module(ctx):
    ctx.db = harness.fresh_db(ctx.stack)
    ctx.redis_url = harness.fresh_redis(ctx.stack)
    ctx.vhost = harness.fresh_vhost(ctx.stack)
    common = dict(amqp_url=ctx.vhost, pg_conninfo=ctx.db, redis_url=ctx.redis_url,
                  log_level="info")
    ctx.on = harness.Cnapid(ctx.tmp, ctx.stack, name="lc-on", **common)
    ctx.off = harness.Cnapid(ctx.tmp, ctx.stack, name="lc-off", config={"list_cache_mb": 0},
                             **common)
    for d in (ctx.on, ctx.off):
        d.start()
        d.wait_ready()
    ctx.uuids = sorted(str(uuidlib.uuid4()) for _ in range(N))
    for i, u in enumerate(ctx.uuids):
        _register(ctx.on, u, "cn-lc-%02d" % i, setup=(i % 3 == 0))
    # richer records: operator fields of every kind on some
    for i, u in enumerate(ctx.uuids[:8]):
        r = ctx.on.post("/servers/%s" % u, json={
            "reserved": i % 2 == 0, "comments": "rack \"%d\" \u00e9\\" % i,
            "traits": {"ssd": True, "tier": i}, "overprovision_ratios": {"cpu": 4, "ram": 1.5},
            "reservation_ratio": 0.25, "rack_identifier": "r%d" % i})
        assert r.status == 204, r


def teardown_module(ctx):
    try:
        for d in (ctx.on, ctx.off):
            d.stop()
    finally:
        harness.drop_db(ctx.stack, ctx.db)


def test_same_bytes_default_view(t):
    ctx = t.ctx
    body = _same(ctx, "/servers")
    assert [s["uuid"] for s in body] == ctx.uuids
    assert all(s["status"] == "running" for s in body)
    for s in body:
        for k in ("sysinfo", "vms", "agents", "last_heartbeat"):
            assert k not in s, k
    before = _list_cache(ctx.on)
    assert before["list_cache_entries"] == N, before
    _same(ctx, "/servers")
    after = _list_cache(ctx.on)
    # both lc-on requests took every row from the cache
    assert after["list_cache_hits"] - before["list_cache_hits"] == 2 * N, (before, after)
    assert after["list_cache_misses"] == before["list_cache_misses"], (before, after)
    assert _list_cache(ctx.off)["list_cache_entries"] == 0


def test_same_bytes_filters_limit_offset(t):
    ctx = t.ctx
    u = ctx.uuids
    paths = [
        "/servers?limit=5", "/servers?limit=5&offset=3", "/servers?offset=%d" % (N - 2),
        "/servers?offset=%d" % (N + 5), "/servers?limit=1000&offset=0",
        "/servers?setup=true", "/servers?setup=false&limit=4&offset=2",
        "/servers?reserved=true", "/servers?hostname=cn-lc-07",
        "/servers?uuids=%s,%s,%s" % (u[9], u[1], u[30]),
        "/servers?uuids=%s&setup=false" % u[3],
        "/servers?headnode=false&limit=3",
        "/servers?extras=status",                 # ignored word: the default view
        # the other paths (no cache) answer alike on both instances
        "/servers?extras=sysinfo&limit=2", "/servers?extras=capacity&limit=3",
        "/servers?extras=all&limit=2&offset=5", "/servers?fields=uuid,status,hostname",
        "/servers?fields=status&setup=true",
        # errors too
        "/servers?limit=0", "/servers?limit=abc", "/servers?bogus=1",
    ]
    for p in paths:
        body = _same(ctx, p)
        t.log("%-60s %s" % (p, "%d rows" % len(body) if body is not None else "error"))
    assert [s["uuid"] for s in _same(ctx, "/servers?limit=5&offset=3")] == u[3:8]
    assert [s["uuid"] for s in _same(ctx, "/servers?setup=true")] == u[::3]


def test_same_bytes_after_record_changes(t):
    ctx = t.ctx
    u = ctx.uuids
    _same(ctx, "/servers")
    # an operator change, a new sysinfo (hostname), a delete, a new server
    r = ctx.on.post("/servers/%s" % u[5], json={"comments": "changed", "reserved": True})
    assert r.status == 204, r
    _register(ctx.off, u[6], "cn-lc-renamed", setup=True)
    assert ctx.on.delete("/servers/%s" % u[7]).status == 200
    new = "00000000-0000-4000-8000-%012x" % 77
    _register(ctx.on, new, "cn-lc-new")
    before = _list_cache(ctx.on)
    body = _same(ctx, "/servers")
    after = _list_cache(ctx.on)
    by = {s["uuid"]: s for s in body}
    assert by[u[5]]["comments"] == "changed" and by[u[5]]["reserved"] is True
    assert by[u[6]]["hostname"] == "cn-lc-renamed" and by[u[6]]["setup"] is True
    assert u[7] not in by and new in by
    assert [s["uuid"] for s in body] == sorted([new] + u[:7] + u[8:])
    # only the changed and the new records were rendered again (once: the
    # second request found them cached)
    assert after["list_cache_misses"] - before["list_cache_misses"] == 3, (before, after)
    _same(ctx, "/servers?setup=true")
    _same(ctx, "/servers?limit=3&offset=4")


def test_same_bytes_after_status_changes(t):
    """status changes without a record change: from the status table (an
    agent session ends) and from the clock (sysinfo goes stale)."""
    ctx = t.ctx
    d_on = t.cnapid(name="lc-fresh-on", pg_conninfo=ctx.db, redis_url=ctx.redis_url,
                    amqp_url=ctx.vhost, sysinfo_freshness_s=3, log_level="info")
    d_off = t.cnapid(name="lc-fresh-off", pg_conninfo=ctx.db, redis_url=ctx.redis_url,
                     amqp_url=ctx.vhost, sysinfo_freshness_s=3, log_level="info",
                     config={"list_cache_mb": 0})

    class C:
        on, off = d_on, d_off

    a, b = ctx.uuids[10], ctx.uuids[11]
    path = "/servers?uuids=%s,%s" % (a, b)

    def statuses(d):
        return [s["status"] for s in json.loads(_raw(d, path)[1])]

    # fresh sysinfo: running on both
    _register(d_on, a, "cn-lc-10")
    _register(d_on, b, "cn-lc-11")
    harness.wait_until(lambda: statuses(d_on) == statuses(d_off) == ["running", "running"],
                       timeout=10, desc="both running")
    _same(C, path)

    # the clock: 3 s without sysinfo and both read unknown, records unchanged
    harness.wait_until(lambda: statuses(d_on) == statuses(d_off) == ["unknown", "unknown"],
                       timeout=15, interval=0.2, desc="both unknown (stale sysinfo)")
    body = _same(C, path)
    assert [s["status"] for s in body] == ["unknown", "unknown"]

    # the status table: an agent session for a (running from its row), then
    # it ends (unknown from its row, while b is running on fresh sysinfo)
    agent = wsagent.Agent(d_on.address, d_on.port, a)
    t.cleanup(agent.abort)
    assert agent.connect()[0] == 101
    agent.hello()
    harness.wait_until(lambda: statuses(d_on)[0] == statuses(d_off)[0] == "running",
                       timeout=10, desc="a running from its session")
    _same(C, path)
    agent.close()
    harness.wait_until(lambda: statuses(d_on)[0] == statuses(d_off)[0] == "unknown",
                       timeout=15, interval=0.2, desc="a unknown after its session")
    _register(d_on, b, "cn-lc-11")          # b fresh again (for 3 s)
    body = _same(C, path)
    assert [s["status"] for s in body] == ["unknown", "running"]
    # a rebooting server (a record change: the new view shows it)
    r = d_on.post("/servers/%s" % a, json={"transitional_status": "rebooting"})
    assert r.status == 204, r
    harness.wait_until(lambda: statuses(d_on)[0] == statuses(d_off)[0] == "rebooting",
                       timeout=10, desc="a rebooting")
    _same(C, path)
