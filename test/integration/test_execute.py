"""Ur execute (POST /servers/:uuid/execute, docs/ur.md): two cnapid instances
and one mockcloud whose CNs run the scripts for real on this host. Each
request goes to the other instance than the one before, so replies must find
the instance that asked. Real RabbitMQ, PostgreSQL and Redis from the stack."""

import itertools
import os
import threading
import time
import uuid as uuidlib

import harness

TIMEOUT = 120
SETUP_TIMEOUT = 120
N_CNS = 3
PREFIX = "e7ec0000"


def setup_module(ctx):
    stack = ctx.stack
    ctx.url = harness.fresh_vhost(stack)
    db, redis = harness.fresh_db(stack), harness.fresh_redis(stack)
    ctx.ds = []
    port = harness.free_port("127.0.0.2")      # agents use one port for every instance
    for i in (1, 2):
        d = harness.Cnapid(ctx.tmp, stack, name="cnapi-%d" % i, address="127.0.0.%d" % (i + 1),
                           port=port, amqp_url=ctx.url, pg_conninfo=db, redis_url=redis)
        ctx.ds.append(d)
        d.start()
    for d in ctx.ds:
        d.wait_ready()
    stack.dns_set(*[d.address for d in ctx.ds])
    ctx.mc = harness.Mockcloud(ctx.tmp, stack, count=N_CNS, prefix=PREFIX, amqp_url=ctx.url,
                               cnapi_port=ctx.ds[0].port)
    ctx.mc.start()
    ctx.uuids = ctx.mc.uuids()
    # the agents' Ur consumer is bound, and every server record exists
    ctx.mc.wait_stats(lambda s: s.get("ur", {}).get("ready"), timeout=30,
                      desc="mockcloud's Ur consumer ready")
    for d in ctx.ds:
        for u in ctx.uuids:
            harness.wait_until(lambda: d.get("/servers/" + u)[0] == 200, timeout=30,
                               desc="server %s known to %s" % (u, d.name))
    ctx.turn = itertools.count()


def teardown_module(ctx):
    rc = ctx.mc.stop()
    errs = []
    text = ctx.mc.log_text()
    marks = [m for m in harness.Cnapid.SANITIZER_MARKS if m in text]
    if marks or rc != 0:
        errs.append("mockcloud exit %s, sanitizer marks %s:\n%s" % (rc, marks,
                                                                   ctx.mc.log_tail(40)))
    for d in ctx.ds:
        try:
            d.stop()
        except AssertionError as e:
            errs.append(str(e))
    assert not errs, "\n".join(errs)


def _next(t):
    """The instance for the next request: they alternate."""
    return t.ctx.ds[next(t.ctx.turn) % len(t.ctx.ds)]


def _exec(t, body, server=None, d=None, timeout=30.0, raw=None):
    d = d or _next(t)
    u = server or t.ctx.uuids[0]
    r = d.request("POST", "/servers/%s/execute" % u, body=raw if raw is not None else body,
                  timeout=timeout)
    t.log("%s -> %s: %s %s" % (d.name, u[:8], r.status, str(r.body)[:120]))
    return r


def test_stdout_stderr_json(t):
    for i, u in enumerate(t.ctx.uuids):
        r = _exec(t, {"script": 'echo "hello $1 $FOO $#"; echo "warn $0" >&2',
                      "args": ["world", "x y"], "env": {"FOO": "bar-%d" % i}, "json": True},
                  server=u)
        assert r.status == 200, r
        assert r.body == {"exitCode": 0, "stdout": "hello world bar-%d 2\n" % i,
                          "stderr": "warn ur\n"}, r.body


def test_exit_codes_json(t):
    for code in (0, 1, 3, 255):
        r = _exec(t, {"script": "echo out; echo err >&2; exit %d" % code, "json": True})
        assert r.status == 200, r
        assert r.body["exitCode"] == code and r.body["stdout"] == "out\n", r.body
        assert r.body["stderr"] == "err\n", r.body
    # killed by a signal: 128 + n, as a shell reports it
    r = _exec(t, {"script": "kill -9 $$", "json": True})
    assert r.status == 200 and r.body["exitCode"] == 137, r


def test_non_json_mode(t):
    # as the reference (restify's res.send (stdout.trim ())): a JSON string
    r = _exec(t, {"script": "printf '  line1\\nline2\\n\\n'"})
    assert r.status == 200, r
    assert r.headers["content-type"].startswith("application/json"), r.headers
    assert r.body == "line1\nline2", r.body
    # json=false explicitly, form-style string too
    r = _exec(t, {"script": "echo ok", "json": "false"})
    assert r.status == 200 and r.body == "ok", r
    r = _exec(t, {"script": "echo partial; echo broken >&2; exit 4"})
    assert r.status == 500, r
    assert r.body["code"] == "InternalError" and r.body["exitCode"] == 4, r.body
    assert r.body["stderr"] == "broken\n" and "status 4" in r.body["message"], r.body


def test_query_string_params(t):
    d = _next(t)
    r = d.request("POST", "/servers/%s/execute?script=echo%%20q&json=true" % t.ctx.uuids[1],
                  timeout=30)
    assert r.status == 200 and r.body["stdout"] == "q\n", r


def test_timeout_kills_the_group(t):
    pidfile = os.path.join(str(t.tmp), "pids")
    t0 = time.monotonic()
    r = _exec(t, {"script": 'sleep 30 & echo $! > "$1"; echo started; wait',
                  "args": [pidfile], "timeout": 1, "json": True})
    dt = time.monotonic() - t0
    assert r.status == 504, r
    assert r.body["code"] == "ExecuteTimeout" and r.body["exitCode"] is None, r.body
    assert r.body["stdout"] == "started\n", r.body
    assert "1 seconds" in r.body["message"], r.body
    assert dt < 10, dt
    # the background sleep (same process group) is dead too: gone or a zombie
    pid = int(open(pidfile).read().strip())

    def dead():
        try:
            with open("/proc/%d/stat" % pid) as f:
                return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
        except FileNotFoundError:
            return True
    harness.wait_until(dead, timeout=5, desc="the script's background child killed")
    # non-json mode: the same 504
    r = _exec(t, {"script": "sleep 30", "timeout": "0.5"})
    assert r.status == 504 and r.body["code"] == "ExecuteTimeout", r


def test_output_over_the_cap(t):
    r = _exec(t, {"script": "head -c 3000000 /dev/zero | tr '\\000' a; "
                            "head -c 1500000 /dev/zero | tr '\\000' b >&2; echo done >&2",
                  "json": True}, timeout=60)
    assert r.status == 200, (r.status, str(r.body)[:200])
    assert r.body["exitCode"] == 0
    assert r.body["truncated"] is True
    assert len(r.body["stdout"]) == 1024 * 1024 and set(r.body["stdout"]) == {"a"}
    assert len(r.body["stderr"]) == 1024 * 1024 and set(r.body["stderr"]) == {"b"}
    # under the cap: no marker
    r = _exec(t, {"script": "head -c 100000 /dev/zero | tr '\\000' c", "json": True})
    assert r.status == 200 and len(r.body["stdout"]) == 100000 and "truncated" not in r.body


def test_bad_script(t):
    r = _exec(t, {"script": "if then fi (", "json": True})
    assert r.status == 200, r
    assert r.body["exitCode"] == 2 and "syntax error" in r.body["stderr"].lower(), r.body
    r = _exec(t, {"script": "no-such-command-here"})
    assert r.status == 500 and r.body["exitCode"] == 127, r
    assert "not found" in r.body["stderr"], r.body
    # bytes that are not UTF-8 come back replaced, not as a broken reply
    r = _exec(t, {"script": "printf 'a\\377b'", "json": True})
    assert r.status == 200 and r.body["stdout"] == "a\ufffdb", r


def test_bad_params(t):
    u = t.ctx.uuids[0]
    cases = [
        ({}, "script is required"),
        ({"script": 42}, "script must be a string"),
        ({"script": "true", "args": [1, 2]}, "args must be an array of strings"),
        ({"script": "true", "args": {"a": "b"}}, "args must be an array of strings"),
        ({"script": "true", "env": ["A=1"]}, "env must be an object of strings"),
        ({"script": "true", "env": {"A": 1}}, "env must be an object of strings"),
        ({"script": "true", "timeout": 0}, "timeout"),
        ({"script": "true", "timeout": "soon"}, "timeout"),
        ({"script": "true", "timeout": 99999}, "timeout"),
        ({"script": "true", "json": "maybe"}, "json must be a boolean"),
    ]
    for body, msg in cases:
        r = _exec(t, body, server=u)
        assert r.status == 409, (body, r)
        assert r.body["code"] == "InvalidArgument" and msg in r.body["message"], (body, r.body)
    r = _exec(t, {"script": "true"}, server="not-a-uuid")
    assert r.status == 409 and r.body["code"] == "InvalidArgument", r
    r = _exec(t, None, raw=b"{not json", server=u)
    assert r.status == 400 and r.body["code"] == "InvalidContent", r
    # GET is not a route
    r = _next(t).request("GET", "/servers/%s/execute" % u)
    assert r.status == 405, r


def test_unknown_server(t):
    for _ in range(2):
        u = str(uuidlib.uuid4())
        r = _exec(t, {"script": "echo never"}, server=u)
        assert r.status == 404 and r.body["code"] == "ResourceNotFound", r


def test_many_at_once(t):
    """Executes do not hold the service: 24 slow ones at once, on both
    instances, finish together."""
    results = {}

    def one(i):
        d = t.ctx.ds[i % 2]
        u = t.ctx.uuids[i % N_CNS]
        results[i] = d.request("POST", "/servers/%s/execute" % u,
                               body={"script": 'sleep 1; echo "$1"', "args": [str(i)],
                                     "json": True}, timeout=60)
    t0 = time.monotonic()
    ths = [threading.Thread(target=one, args=(i,)) for i in range(24)]
    for th in ths:
        th.start()
    for th in ths:
        th.join(timeout=60)
    dt = time.monotonic() - t0
    for i in range(24):
        r = results.get(i)
        assert r is not None and r.status == 200 and r.body["stdout"] == "%d\n" % i, (i, r)
    t.log("24 executes of 1 s each in %.1f s" % dt)


def test_status(t):
    for d in t.ctx.ds:
        a = harness.actors(d)
        ur = a["ur"]
        t.log("%s ur: %s" % (d.name, ur))
        assert ur["connected"] is True and ur["queue"].startswith("cnapi-ur.%s." % d.name), ur
        assert ur["requests"] > 0 and ur["replies"] > 0 and ur["pending"] == 0, ur
        assert ur["agent_timeouts"] >= 1 and ur["late_replies"] == 0, ur
    s = t.ctx.mc.stats()["ur"]
    assert s["completed"] > 0 and s["timed_out"] >= 2 and s["truncated"] >= 1, s


def test_broker_down_fails_pending_with_503(t):
    """Last: RabbitMQ goes away while an execute is pending; it fails 503,
    new executes fail 503 at once, and all works again once it is back."""
    d = t.ctx.ds[0]
    box = {}
    th = threading.Thread(target=lambda: box.setdefault("r", d.request(
        "POST", "/servers/%s/execute" % t.ctx.uuids[0],
        body={"script": "sleep 60", "timeout": 90}, timeout=120)))
    th.start()
    harness.wait_until(lambda: harness.actors(d)["ur"]["pending"] == 1, timeout=10,
                       desc="the execute pending")
    t.stack.stop_service("rabbitmq")
    try:
        th.join(timeout=30)
        r = box.get("r")
        assert r is not None and r.status == 503, r
        assert r.body["code"] == "ServiceUnavailable", r.body
        r = _exec(t, {"script": "echo x"}, d=t.ctx.ds[1])
        assert r.status == 503 and r.body["code"] == "ServiceUnavailable", r
    finally:
        t.stack.start_service("rabbitmq")
    for dd in t.ctx.ds:
        harness.wait_until(lambda: harness.actors(dd)["ur"]["connected"], timeout=60,
                           desc="%s ur reconnected" % dd.name)
    t.ctx.mc.wait_stats(lambda s: s["ur"]["ready"], timeout=60, desc="agent ur reconnected")
    for dd in t.ctx.ds:
        r = _exec(t, {"script": "echo back", "json": True}, d=dd)
        assert r.status == 200 and r.body["stdout"] == "back\n", r
