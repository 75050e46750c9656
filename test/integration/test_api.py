"""The HTTP API (docs/api.md): every route's codes and bodies, the headers,
the error forms, and that bad requests change nothing and hurt nothing.

One cnapid for the module on a fresh database, Redis database and vhost; a
few servers registered through POST /servers/:uuid/sysinfo in setup. The
tests that only read or fail come first; a snapshot of the store taken in
setup must still hold after them; the tests that write come last.
"""

import http.client
import json
import re
import socket
import subprocess
import time
import uuid as uuidlib

import harness

TIMEOUT = 120

UUID4_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
MAX_BODY = 65536            # http.max_body for the module's daemon


def _version():
    text = (harness.REPO / "meson.build").read_text()
    return re.search(r"version\s*:\s*'([^']+)'", text).group(1)


def _register(d, u, hostname, **kw):
    si = harness.make_sysinfo(u, hostname, **kw)
    r = d.post("/servers/%s/sysinfo" % u, json={"sysinfo": si})
    assert r.status == 200, r
    return si


def _store_snapshot(conninfo):
    import psycopg2
    c = psycopg2.connect(conninfo, connect_timeout=5)
    try:
        with c.cursor() as cur:
            cur.execute("SELECT _key, _id, _etag FROM cnapi_servers ORDER BY _key")
            return cur.fetchall()
    finally:
        c.close()


def _raw(d, data, timeout=5.0):
    """Send raw bytes; return (status, headers dict, body bytes) of the first
    response, parsed by http.client."""
    s = socket.create_connection((d.address, d.port), timeout=timeout)
    try:
        s.sendall(data)
        r = http.client.HTTPResponse(s)
        r.begin()
        body = r.read()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, body
    finally:
        s.close()


def setup_module(ctx):
    ctx.db = harness.fresh_db(ctx.stack)
    ctx.redis_url = harness.fresh_redis(ctx.stack)
    ctx.vhost = harness.fresh_vhost(ctx.stack)
    ctx.d = harness.Cnapid(ctx.tmp, ctx.stack, name="api-1", amqp_url=ctx.vhost,
                           pg_conninfo=ctx.db, redis_url=ctx.redis_url,
                           config={"http": {"max_body": MAX_BODY}})
    ctx.d.start()
    ctx.d.wait_ready()
    ctx.uuids = sorted(str(uuidlib.uuid4()) for _ in range(3))
    for i, u in enumerate(ctx.uuids):
        _register(ctx.d, u, "cn-api-%d" % i, setup=(i == 0))
    ctx.snapshot = _store_snapshot(ctx.db)
    assert len(ctx.snapshot) == 3, ctx.snapshot


def teardown_module(ctx):
    try:
        ctx.d.stop()
    finally:
        harness.drop_db(ctx.stack, ctx.db)


# ------------------------------------------------------------------ reads

def test_ping(t):
    d = t.ctx.d
    # the listener's broker connection may come a moment after the port
    r = harness.wait_until(lambda: (lambda r: r if r.body.get("ready") else None)(d.get("/ping")),
                           timeout=20, desc="ping ready")
    assert r.status == 200
    assert r.body == {"ready": True,
                      "services": {"moray": "online", "amqp": "online", "redis": "online"}}
    assert r.headers["content-type"] == "application/json"


def test_headers(t):
    d = t.ctx.d
    for path in ("/ping", "/servers", "/servers/%s" % t.ctx.uuids[0], "/nope"):
        r = d.get(path)
        assert UUID4_RE.match(r.headers["x-request-id"]), (path, r.headers)
        assert re.match(r"^\d+$", r.headers["x-response-time"]), r.headers
        assert r.headers["x-server-name"] == "api-1"
        assert r.headers["server"] == "cnapi/%s" % _version()
    ids = {d.get("/ping").headers["x-request-id"] for _ in range(3)}
    assert len(ids) == 3


def test_request_id_echoed(t):
    d = t.ctx.d
    r = d.get("/servers", headers={"x-request-id": "my-req-42"})
    assert r.headers["x-request-id"] == "my-req-42"
    r = d.get("/ping", headers={"request-id": "other-7"})
    assert r.headers["x-request-id"] == "other-7"
    # on errors too
    r = d.get("/servers/not-a-uuid", headers={"x-request-id": "err-1"})
    assert r.status == 409 and r.headers["x-request-id"] == "err-1"


def test_get_server(t):
    d, u = t.ctx.d, t.ctx.uuids[0]
    r = d.get("/servers/%s" % u)
    assert r.status == 200, r
    s = r.body
    assert s["uuid"] == u and s["hostname"] == "cn-api-0"
    assert s["status"] == "running"
    assert s["setup"] is True
    assert s["sysinfo"]["UUID"] == u
    for k in ("datacenter", "ram", "reservation_ratio", "traits", "vms", "agents",
              "last_heartbeat", "memory_total_bytes"):
        assert k in s, k
    assert s["reservation_ratio"] == 0.15
    # the same answer again (the second may come from the near cache),
    # and through an upper-case path
    for path in ("/servers/%s" % u, "/servers/%s" % u.upper()):
        again = d.get(path)
        assert again.status == 200 and again.body == s, path


def test_get_server_unknown_param(t):
    d, u = t.ctx.d, t.ctx.uuids[0]
    r = d.get("/servers/%s?foo=1" % u)
    assert r.status == 409
    assert r.body == {"code": "InvalidArgument",
                      "message": "foo is not an explicitly defined parameter"}


def test_list_servers(t):
    d, uuids = t.ctx.d, t.ctx.uuids
    r = d.get("/servers")
    assert r.status == 200, r
    got = [s["uuid"] for s in r.body]
    assert got == sorted(got) == uuids
    for s in r.body:
        assert "status" in s
        for k in ("sysinfo", "vms", "agents", "last_heartbeat"):
            assert k not in s, k
    # filters, paging, extras, fields
    r = d.get("/servers?uuids=%s,%s" % (uuids[2], uuids[0]))
    assert [s["uuid"] for s in r.body] == [uuids[0], uuids[2]]
    r = d.get("/servers?setup=true")
    assert [s["uuid"] for s in r.body] == [uuids[0]]
    r = d.get("/servers?hostname=cn-api-1")
    assert [s["uuid"] for s in r.body] == [uuids[1]]
    r = d.get("/servers?limit=2")
    assert [s["uuid"] for s in r.body] == uuids[:2]
    r = d.get("/servers?limit=2&offset=2")
    assert [s["uuid"] for s in r.body] == uuids[2:]
    r = d.get("/servers?extras=sysinfo&limit=1")
    assert r.body[0]["sysinfo"]["UUID"] == uuids[0]
    r = d.get("/servers?fields=uuid,hostname")
    assert r.body == [{"uuid": u, "hostname": "cn-api-%d" % i} for i, u in enumerate(uuids)]
    # parameters may come in a JSON body too
    r = d.request("GET", "/servers", body={"uuids": uuids[1]})
    assert [s["uuid"] for s in r.body] == [uuids[1]]


def test_list_bad_limit(t):
    d = t.ctx.d
    for bad in ("0", "1001", "-5"):
        r = d.get("/servers?limit=%s" % bad)
        assert r.status == 400, (bad, r)
        assert r.body["code"] == "InvalidParameters"
        assert r.body["errors"] == [{"field": "limit", "code": "Invalid",
                                     "message": "limit must be in the range 1-1000 (inclusive)"}]
    r = d.get("/servers?limit=abc")
    assert r.status == 500 and r.body["code"] == "InvalidParameters", r
    assert r.body["errors"][0]["field"] == "limit"


def test_list_unknown_param(t):
    r = t.ctx.d.get("/servers?bogus=1")
    assert r.status == 409
    assert r.body == {"code": "InvalidArgument",
                      "message": "bogus is not an explicitly defined parameter"}


# ------------------------------------------------------------------ errors

def test_bad_uuid_409(t):
    d = t.ctx.d
    for method, path, body in (("GET", "/servers/not-a-uuid", None),
                               ("POST", "/servers/not-a-uuid", {"reserved": True}),
                               ("DELETE", "/servers/not-a-uuid", None),
                               ("POST", "/servers/1234/sysinfo", {"sysinfo": {"UUID": "1234"}}),
                               ("GET", "/servers/%s0" % t.ctx.uuids[0], None)):
        r = d.request(method, path, body=body)
        assert r.status == 409, (method, path, r)
        assert r.body["code"] == "InvalidArgument"
        assert r.body["message"].startswith("Invalid server UUID"), r.body


def test_unknown_server_404(t):
    d = t.ctx.d
    u = str(uuidlib.uuid4())
    for method, body in (("GET", None), ("POST", {"reserved": True}), ("DELETE", None)):
        r = d.request(method, "/servers/%s" % u.upper(), body=body)
        assert r.status == 404, (method, r)
        assert r.body == {"code": "ResourceNotFound", "message": "Server %s not found" % u}


def test_update_unknown_param_409(t):
    d, u = t.ctx.d, t.ctx.uuids[1]
    r = d.post("/servers/%s" % u, json={"reserved": True, "bogus": 1})
    assert r.status == 409
    assert r.body == {"code": "InvalidArgument",
                      "message": "bogus is not an explicitly defined parameter"}
    # from the query string as well
    r = d.post("/servers/%s?nope=x" % u, json={})
    assert r.status == 409
    assert r.body["message"] == "nope is not an explicitly defined parameter"


def test_update_bad_values_500(t):
    d, u = t.ctx.d, t.ctx.uuids[1]
    r = d.post("/servers/%s" % u, json={"reserved": "yes"})
    assert r.status == 500, r
    assert r.body["code"] == "InvalidParameters"
    assert r.body["message"] == "Request parameters failed validation"
    assert r.body["errors"] == [{"field": "reserved", "code": "Invalid",
                                 "message": "value was not true or false"}]
    r = d.post("/servers/%s" % u, json={"comments": " padded ", "traits": []})
    assert r.status == 500
    fields = sorted(e["field"] for e in r.body["errors"])
    assert fields == ["comments", "traits"], r.body
    assert all(e["code"] == "Invalid" for e in r.body["errors"])


def test_bad_json_400(t):
    d, u = t.ctx.d, t.ctx.uuids[1]
    for raw in (b'{"reserved": ', b"not json", b'{"a":1}}'):
        r = d.request("POST", "/servers/%s" % u, body=raw,
                      headers={"Content-Type": "application/json"})
        assert r.status == 400, (raw, r)
        assert r.body["code"] == "InvalidContent"
        assert r.body["message"].startswith("Invalid JSON: "), r.body
    r = d.request("POST", "/servers/%s" % u, body=b"[1,2]",
                  headers={"Content-Type": "application/json"})
    assert r.status == 400 and r.body["code"] == "InvalidContent"
    # checked before the route's own checks (as restify's bodyParser is)
    r = d.request("POST", "/servers/not-a-uuid", body=b"{",
                  headers={"Content-Type": "application/json"})
    assert r.status == 400


def test_oversized_body_413(t):
    d, u = t.ctx.d, t.ctx.uuids[1]
    big = b'{"comments": "' + b"x" * (MAX_BODY + 10) + b'"}'
    r = d.request("POST", "/servers/%s" % u, body=big,
                  headers={"Content-Type": "application/json"})
    assert r.status == 413, r
    assert r.headers["content-type"] == "application/json"
    assert r.body["code"] == "RequestEntityTooLarge"
    assert str(MAX_BODY) in r.body["message"]
    assert UUID4_RE.match(r.headers["x-request-id"])
    assert r.headers["x-server-name"] == "api-1"
    # chunked: no Content-Length to refuse early, the limit still holds
    chunk = b"x" * 16384
    n = MAX_BODY // len(chunk) + 2
    req = (b"POST /servers/%s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
           b"Transfer-Encoding: chunked\r\n\r\n" % u.encode())
    req += (b"%x\r\n" % len(chunk) + chunk + b"\r\n") * n + b"0\r\n\r\n"
    status, headers, body = _raw(d, req)
    assert status == 413, (status, body)
    assert json.loads(body)["code"] == "RequestEntityTooLarge"
    # just under the limit is fine (and answered by the route: unknown param)
    ok = b'{"bogus": "' + b"y" * (MAX_BODY - 100) + b'"}'
    r = d.request("POST", "/servers/%s" % u, body=ok,
                  headers={"Content-Type": "application/json"})
    assert r.status == 409, r


def test_unknown_route_404(t):
    d, u = t.ctx.d, t.ctx.uuids[0]
    for path in ("/nope", "/servers/%s/nope" % u, "/servers/%s/sysinfo/x/y" % u, "/"):
        r = d.get(path)
        assert r.status == 404, (path, r)
        assert r.body == {"code": "ResourceNotFound", "message": "%s does not exist" % path}
    r = d.get("/nope?a=1")
    assert r.body["message"] == "/nope?a=1 does not exist"


def test_wrong_method_405(t):
    d, u = t.ctx.d, t.ctx.uuids[0]
    for method, path, allow in (("PUT", "/servers/%s" % u, "GET, POST, DELETE"),
                                ("POST", "/ping", "GET"),
                                ("DELETE", "/servers", "GET"),
                                ("GET", "/servers/%s/sysinfo" % u, "POST")):
        r = d.request(method, path, body={} if method in ("PUT", "POST") else None)
        assert r.status == 405, (method, path, r)
        assert r.headers["allow"] == allow
        assert r.body == {"code": "MethodNotAllowed", "message": "%s is not allowed" % method}


def test_sysinfo_errors(t):
    d, u = t.ctx.d, t.ctx.uuids[2]
    other = str(uuidlib.uuid4())
    si = harness.make_sysinfo(other, "cn-wrong")
    r = d.post("/servers/%s/sysinfo" % u, json={"sysinfo": si})
    assert r.status == 409, r
    assert r.body["code"] == "InvalidArgument" and other in r.body["message"]
    r = d.post("/servers/%s/sysinfo" % u, json={"sysinfo": "text"})
    assert r.status == 500
    assert r.body["errors"] == [{"field": "sysinfo", "code": "Invalid",
                                 "message": "value is not an object. (was: [object String])"}]
    r = d.post("/servers/%s/sysinfo" % u, json={})
    assert r.status == 500 and r.body["errors"][0]["field"] == "sysinfo"
    r = d.post("/servers/%s/sysinfo" % u,
               json={"sysinfo": harness.make_sysinfo(u, "cn-api-2"), "extra": 1})
    assert r.status == 409
    assert r.body["message"] == "extra is not an explicitly defined parameter"


def test_errors_wrote_nothing(t):
    d = t.ctx.d
    assert d.running(), d.log_tail()
    assert d.get("/ping").status == 200
    assert _store_snapshot(t.ctx.db) == t.ctx.snapshot
    # nor did they leave the gateway with requests hanging
    for u in t.ctx.uuids:
        assert d.get("/servers/%s" % u).status == 200


# ------------------------------------------------------------------ writes

def test_update_server(t):
    d, u = t.ctx.d, t.ctx.uuids[1]
    before = d.get("/servers/%s" % u).body          # fills the near cache
    assert before["reserved"] is False
    r = d.post("/servers/%s" % u, json={"reserved": True, "comments": "rack 7",
                                        "traits": {"ssd": True}})
    assert r.status == 204, r
    assert r.body == ""
    assert "content-length" not in r.headers or r.headers["content-length"] == "0"
    # read your write at once, on the same instance
    s = d.get("/servers/%s" % u).body
    assert s["reserved"] is True and s["comments"] == "rack 7" and s["traits"] == {"ssd": True}
    # query string wins over the body for the same name
    r = d.post("/servers/%s?comments=from-query" % u, json={"comments": "from-body"})
    assert r.status == 204
    assert d.get("/servers/%s" % u).body["comments"] == "from-query"


def test_sysinfo_creates_and_updates(t):
    d = t.ctx.d
    u = str(uuidlib.uuid4())
    assert d.get("/servers/%s" % u).status == 404
    _register(d, u, "cn-new")
    s = d.get("/servers/%s" % u).body
    assert s["hostname"] == "cn-new" and s["status"] == "running"
    _register(d, u, "cn-renamed")
    assert d.get("/servers/%s" % u).body["hostname"] == "cn-renamed"
    assert u in [x["uuid"] for x in d.get("/servers").body]
    t.ctx.created = u


def test_delete_server(t):
    d = t.ctx.d
    u = t.ctx.created
    r = d.delete("/servers/%s" % u)
    assert r.status == 200 and r.body == "", r
    r = d.get("/servers/%s" % u)
    assert r.status == 404 and r.body["message"] == "Server %s not found" % u
    assert u not in [x["uuid"] for x in d.get("/servers").body]
    assert d.delete("/servers/%s" % u).status == 404
    assert u not in [k for k, _, _ in _store_snapshot(t.ctx.db)]


def test_other_instance_sees_writes(t):
    """A write through instance 2 reaches instance 1's near cache."""
    d1, u = t.ctx.d, t.ctx.uuids[2]
    d2 = t.cnapid(name="api-2", amqp_url=t.ctx.vhost, pg_conninfo=t.ctx.db,
                  redis_url=t.ctx.redis_url)
    for _ in range(3):
        assert d1.get("/servers/%s" % u).body["comments"] == ""
    r = d2.post("/servers/%s" % u, json={"comments": "via api-2"})
    assert r.status == 204
    harness.wait_until(lambda: d1.get("/servers/%s" % u).body["comments"] == "via api-2",
                       timeout=5, desc="instance 1 sees the write")
    assert d2.get("/servers/%s" % u).body["comments"] == "via api-2"


def _private_redis(t):
    """A Redis of the test's own (to pause or kill it); (url, port, stop)."""
    port = harness.free_port()
    rdir = t.tmp / "redis"
    rdir.mkdir()
    proc = subprocess.Popen(["redis-server", "--bind", "127.0.0.1", "--port", str(port),
                             "--save", "", "--appendonly", "no", "--dir", str(rdir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            stdin=subprocess.DEVNULL, start_new_session=True)

    def stop_redis():
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
    t.cleanup(stop_redis)
    harness.wait_until(lambda: harness.port_open("127.0.0.1", port), timeout=10,
                       desc="redis up")
    return "redis://127.0.0.1:%d" % port, port, stop_redis


def _writes_during_pause(t, prefix, timeout_ms, pause_ms, suffix):
    """Two instances on a private Redis with redis.timeout_ms; for two
    servers, a write through instance 1 while Redis holds back writes
    (CLIENT PAUSE WRITE, reads still served), then reads on both instances.
    Returns (instance 1, the Redis client, [(uuid, wanted comments)])."""
    import redis
    url, port, _ = _private_redis(t)
    cfg = {"redis": {"timeout_ms": timeout_ms}}
    d1 = t.cnapid(name=prefix + "-1", pg_conninfo=t.ctx.db, redis_url=url, config=cfg)
    d2 = t.cnapid(name=prefix + "-2", pg_conninfo=t.ctx.db, redis_url=url, config=cfg)
    rc = redis.Redis(host="127.0.0.1", port=port, socket_timeout=5)
    done = []
    for u in t.ctx.uuids[:2]:
        before = d1.get("/servers/%s" % u).body["comments"]
        harness.wait_until(lambda: rc.hget("cnapi:server:%s" % u, "j"), timeout=10,
                           desc="the record in the shared cache")
        want = before + suffix
        assert rc.execute_command("CLIENT", "PAUSE", pause_ms, "WRITE")
        t0 = time.monotonic()
        r = d1.post("/servers/%s" % u, json={"comments": want}, timeout=30)
        held = time.monotonic() - t0
        assert r.status == 204, r
        assert d2.get("/servers/%s" % u).body["comments"] == want
        assert d1.get("/servers/%s" % u).body["comments"] == want
        t.log("write answered %.0f ms into a %d ms pause" % (held * 1000, pause_ms))
        done.append((u, want))
    return d1, rc, done


def test_write_answered_after_the_cache(t):
    """A write is answered only once the shared Redis cache holds it: while
    Redis holds back writes, the answer waits, and the reads right after
    it, on this instance and on another one, find the new record, not the
    cached old one. (Each round takes a server instance 2 has not read: an
    entry in its near cache is dropped by the invalidation notice, which is
    asynchronous.)"""
    d1, rc, done = _writes_during_pause(t, "rw", 10000, 1500, "+held")
    for u, want in done:
        assert json.loads(rc.hget("cnapi:server:%s" % u, "j"))["comments"] == want
    assert sum(w.get("http_held_total", 0) for k, w in harness.actors(d1).items()
               if k.startswith("writer-")) >= 2


def test_write_answered_after_a_failed_cache_write_is_dropped(t):
    """When the write-through to Redis fails (here: slower than
    redis.timeout_ms, because Redis holds back writes), Redis keeps the
    previous version until the cache writer drops it. The answer waits for
    that drop (bounded by CN_CACHE_HOLD_MS, 3 s, longer than this pause), so
    a read right after it on another instance, which still reaches Redis,
    finds the new record: from Redis if the late write landed, else from
    PostgreSQL."""
    d1, rc, done = _writes_during_pause(t, "rd", 200, 1000, "+dropped")
    for u, want in done:
        cached = rc.hget("cnapi:server:%s" % u, "j")
        assert cached is None or json.loads(cached)["comments"] == want, cached
    writers = [w for k, w in harness.actors(d1).items() if k.startswith("writer-")]
    assert sum(w.get("cache_failures", 0) for w in writers) >= 2     # the path under test
    assert "redis entries not dropped in time" not in d1.log_text()


def test_writes_answered_while_redis_is_down(t):
    """A Redis that stays away does not hold writes: the first answer waits
    for the drop at most CN_CACHE_HOLD_MS, the next ones not at all, and
    reads come from PostgreSQL."""
    url, port, stop_redis = _private_redis(t)
    d = t.cnapid(name="rdown-1", pg_conninfo=t.ctx.db, redis_url=url)
    u = t.ctx.uuids[2]
    before = d.get("/servers/%s" % u).body["comments"]
    stop_redis()
    for i in range(3):
        r = d.post("/servers/%s" % u, json={"comments": "%s+down%d" % (before, i)}, timeout=30)
        assert r.status == 204, r
    assert d.get("/servers/%s" % u).body["comments"] == before + "+down2"
    assert "redis entries not dropped in time" in d.log_text()


def test_near_cache_off_without_redis(t):
    """With its Redis gone an instance cannot hear other instances' writes:
    it must not answer from its near cache then."""
    url, port, stop_redis = _private_redis(t)
    d1 = t.cnapid(name="nc-1", pg_conninfo=t.ctx.db, redis_url=url)
    d2 = t.cnapid(name="nc-2", pg_conninfo=t.ctx.db, redis_url=t.ctx.redis_url)
    u = t.ctx.uuids[0]
    for _ in range(3):
        first = d1.get("/servers/%s" % u).body["comments"]
    stop_redis()
    # instance 1 notices (its subscription breaks), then a write elsewhere
    harness.wait_until(lambda: "invalidation subscription lost" in d1.log_text(),
                       timeout=10, desc="subscription lost")
    r = d2.post("/servers/%s" % u, json={"comments": first + "+changed"})
    assert r.status == 204
    s = d1.get("/servers/%s" % u)
    assert s.status == 200 and s.body["comments"] == first + "+changed", s
    assert d1.get("/ping").body["services"]["redis"] == "offline"


def test_status_computed_per_response(t):
    """status depends on the time: a cached answer must not freeze it."""
    d = t.cnapid(name="fresh-1", sysinfo_freshness_s=2)
    u = str(uuidlib.uuid4())
    _register(d, u, "cn-fresh")
    for _ in range(3):                      # the later ones from the near cache
        assert d.get("/servers/%s" % u).body["status"] == "running"
    harness.wait_until(lambda: d.get("/servers/%s" % u).body["status"] == "unknown",
                       timeout=10, desc="status goes unknown")
    assert [s["status"] for s in d.get("/servers").body] == ["unknown"]
    _register(d, u, "cn-fresh")             # fresh sysinfo: running again
    assert d.get("/servers/%s" % u).body["status"] == "running"


def test_shutdown_with_open_connections(t):
    """SIGTERM with idle keep-alive connections and a request in flight:
    the daemon exits cleanly and promptly."""
    d = t.cnapid(name="stop-1")
    conns = []
    for _ in range(5):
        c = http.client.HTTPConnection(d.address, d.port, timeout=5)
        c.request("GET", "/ping")
        c.getresponse().read()
        conns.append(c)                     # kept open (keep-alive)
    t0 = time.monotonic()
    rc = d.stop(timeout=15)
    assert rc == 0, (rc, d.log_tail())
    assert time.monotonic() - t0 < 10
    for c in conns:
        c.close()


def test_store_unreachable(t):
    """PostgreSQL gone: lists fail with 500 saying so, /ping says offline,
    a server the shared cache holds is still served."""
    d = t.cnapid(name="nostore-1")
    u = str(uuidlib.uuid4())
    _register(d, u, "cn-nostore")
    assert d.get("/servers/%s" % u).status == 200
    # the same data and cache, but a store address where nothing listens
    dead = harness.conninfo_with(d.config["postgres"]["conninfo"], port=harness.free_port())
    d2 = t.cnapid(name="nostore-2", pg_conninfo=dead, redis_url=d.config["redis"]["url"],
                  config={"postgres": {"timeout_ms": 500}})
    r = d2.get("/servers")
    assert r.status == 500, r
    assert r.body["code"] == "InternalError" and "unreachable" in r.body["message"], r.body
    r = d2.get("/servers/%s" % str(uuidlib.uuid4()))
    assert r.status == 500 and "unreachable" in r.body["message"], r
    r = d2.get("/ping")
    assert r.status == 200 and r.body["ready"] is False
    assert r.body["services"]["moray"] == "offline"
    r = d2.get("/servers/%s" % u)                 # from the Redis cache
    assert r.status == 200 and r.body["hostname"] == "cn-nostore", r
    r = d2.post("/servers/%s" % u, json={"comments": "x"})
    assert r.status in (500, 503), r
    assert d2.running()
