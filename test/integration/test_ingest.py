"""Sysinfo ingest (design note step #1): several cnapid instances share the
queue ur.cnapi, write what they receive to the store and ack after the commit.
Real RabbitMQ, PostgreSQL and Redis from the local stack."""

import json
import subprocess
import threading
import time

import harness

TIMEOUT = 240


def _uuid(prefix, i):
    return "%s-0000-4000-8000-%012x" % (prefix, i)


def _publish(url, prefix, servers, rounds, start_round=1):
    """rounds messages per server, round-robin, Burst Sequence = round."""
    msgs = []
    for k in range(start_round, start_round + rounds):
        for i in range(servers):
            u = _uuid(prefix, i)
            si = harness.make_sysinfo(u, "cn-%d" % i, fields={"Burst Sequence": k})
            sent = int(time.time() * 1000)
            msgs.append(("ur.sysinfo.%s.%d" % (u, k), si, {"sent_ms": sent + k}))
    return harness.amqp_publish_sysinfo(url, msgs)


def _burst(t, url, prefix, servers, messages):
    out = subprocess.run(
        [str(harness.build_dir() / "sysinfo-burst"), "--url", url, "--servers", str(servers),
         "--messages", str(messages), "--prefix", prefix],
        capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr + out.stdout
    t.log(out.stdout.strip().splitlines()[-1] if out.stdout.strip() else "published")


def _list_all(d, extras=None):
    """Every server through one instance's API, paging like sdc-clients."""
    out, offset = [], 0
    for _ in range(100):
        path = "/servers?limit=1000&offset=%d" % offset
        if extras:
            path += "&extras=" + extras
        st, _h, body = d.get(path, timeout=30)
        assert st == 200, (st, body)
        out.extend(body)
        if len(body) < 1000:
            return out
        offset += 1000
    raise AssertionError("too many pages")


def _all_latest(d, prefix, servers, seq):
    """True when d lists exactly `servers` servers of prefix, each at sysinfo
    sequence seq; otherwise raises AssertionError saying what is missing
    (harness.wait_until reports the last one on timeout)."""
    got = _list_all(d, extras="sysinfo")
    mine = {s["uuid"]: s for s in got if s["uuid"].startswith(prefix)}
    if len(mine) != servers:
        raise AssertionError("%d of %d servers" % (len(mine), servers))
    behind = [u for u, s in mine.items() if s["sysinfo"].get("Burst Sequence") != seq]
    if behind:
        raise AssertionError("%d servers not at sequence %d (e.g. %s)"
                             % (len(behind), seq, behind[0]))
    return True


def _writers(a):
    """The writer shards' STATUS (writer-0, writer-1, ...), in shard order."""
    return [a[k] for k in sorted(k for k in a if k.startswith("writer-"))]


def _writer(a):
    """The writer shards' counters summed (numbers only)."""
    out = {}
    for w in _writers(a):
        for k, v in w.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out[k] = out.get(k, 0) + v
    return out


def _queue_counts(stack, url, queue="ur.cnapi"):
    vhost = url.rsplit("/", 1)[1]
    from urllib.parse import unquote
    out = stack.rabbitmqctl("list_queues", "-p", unquote(vhost), "name", "messages_ready",
                            "messages_unacknowledged")
    text = out.stdout if hasattr(out, "stdout") else str(out)
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == queue:
            return int(parts[1]), int(parts[2])
    return None


def _consuming(d):
    """Wait until d's listener is connected and consuming (GET /ping says
    amqp online only after the queue is declared and consumed): a message
    published before that to a fresh vhost has no queue and is dropped."""
    d.wait_ready(timeout=30, until=lambda r: r.body["services"]["amqp"] == "online")
    return d


def _three(t, **kw):
    url, db, redis = t.fresh_vhost(), t.fresh_db(), t.fresh_redis()
    ds = [t.cnapid(name="cnapi-%d" % i, address="127.0.0.%d" % (i + 1), amqp_url=url,
                   pg_conninfo=db, redis_url=redis, **kw) for i in (1, 2, 3)]
    for d in ds:
        _consuming(d)
    return url, db, redis, ds


def test_three_instances_share_the_queue(t):
    url, db, redis, ds = _three(t)
    prefix = "a1a10000"
    _burst(t, url, prefix, 1000, 3000)
    for d in ds:
        harness.wait_until(lambda: _all_latest(d, prefix, 1000, 3), timeout=90,
                           desc="every server at its latest sysinfo through %s" % d.name)
    shares = []
    for d in ds:
        a = harness.actors(d)
        shares.append(a["listener"]["acked"])
        assert a["listener"]["rejected"] == 0, a["listener"]
        # every shard of every instance wrote its servers' share
        assert len(_writers(a)) == 2, sorted(a)
        assert all(w["batches"] > 0 for w in _writers(a)), _writers(a)
    t.log("acked per instance: %s" % shares)
    assert sum(shares) >= 3000, shares
    assert all(s > 0 for s in shares), "every instance should take a share: %s" % shares
    harness.wait_until(lambda: _queue_counts(t.stack, url) == (0, 0), timeout=30,
                       desc="queue drained and nothing unacked")
    # One server through each instance: the same record.
    u = _uuid(prefix, 7)
    bodies = [d.get("/servers/" + u)[2] for d in ds]
    assert all(b["uuid"] == u and b["hostname"] == "cn-7" for b in bodies), bodies
    assert bodies[0]["sysinfo"] == bodies[1]["sysinfo"] == bodies[2]["sysinfo"]
    assert all(b["status"] == "running" for b in bodies)


def test_kill9_mid_stream_loses_nothing(t):
    url, db, redis, ds = _three(t)
    prefix = "b2b20000"
    # Publishing with a confirm per message takes seconds: the kill lands
    # while messages are still being published and consumed.
    pub = threading.Thread(target=_publish, args=(url, prefix, 600, 3))
    pub.start()
    # kill one instance once it has written something, while publishing goes on
    harness.wait_until(lambda: _writer(harness.actors(ds[0]))["rows_written"] > 0, timeout=60,
                       desc="cnapi-1 writing")
    ds[0].kill9()
    pub.join(timeout=120)
    assert not pub.is_alive()
    for d in ds[1:]:
        harness.wait_until(lambda: _all_latest(d, prefix, 600, 3), timeout=90,
                           desc="all servers at latest via %s" % d.name)
    harness.wait_until(lambda: _queue_counts(t.stack, url) == (0, 0), timeout=30,
                       desc="nothing left in the queue")


def test_postgres_then_rabbitmq_restart_mid_stream(t):
    url, db, redis, ds = _three(t)
    prefix = "c3c30000"
    _publish(url, prefix, 300, 1)
    harness.wait_until(lambda: _all_latest(ds[0], prefix, 300, 1), timeout=60)
    # PostgreSQL goes away while messages keep coming
    t.stack.stop_service("postgres")
    try:
        _publish(url, prefix, 300, 1, start_round=2)
        # nothing can be written: messages wait unacked or ready in the queue
        harness.wait_until(lambda: (_queue_counts(t.stack, url) or (0, 0)) != (0, 0),
                           timeout=10, desc="messages held while the store is down")
    finally:
        t.stack.start_service("postgres")
    for d in ds:
        harness.wait_until(lambda: _all_latest(d, prefix, 300, 2), timeout=90,
                           desc="recovered after the PostgreSQL restart via %s" % d.name)
    # Now RabbitMQ restarts mid-stream.
    pub = threading.Thread(target=_publish, args=(url, prefix, 300, 1),
                           kwargs={"start_round": 3})
    pub.start()
    pub.join(timeout=60)
    t.stack.stop_service("rabbitmq")
    t.stack.start_service("rabbitmq")
    _publish(url, prefix, 300, 1, start_round=4)
    for d in ds:
        harness.wait_until(lambda: _all_latest(d, prefix, 300, 4), timeout=120,
                           desc="recovered after the RabbitMQ restart via %s" % d.name)
        harness.wait_until(lambda: harness.actors(d)["listener"]["connection"] == "connected",
                           timeout=30, desc="%s's listener reconnected" % d.name)
    assert all(d.running() for d in ds)


def test_redis_down_reads_fall_back_to_postgres(t):
    url, db, redis_url, ds = _three(t)
    d = ds[0]
    u = _uuid("d4d40000", 1)
    harness.amqp_publish_sysinfo(url, [("ur.sysinfo.%s.1" % u, harness.make_sysinfo(u, "cn-r"),
                                        {"sent_ms": int(time.time() * 1000)})])
    harness.wait_until(lambda: d.get("/servers/" + u)[0] == 200, timeout=30)
    import redis
    r = redis.Redis.from_url(redis_url, socket_timeout=5)
    assert r.exists("cnapi:server:" + u), "the write went through to the cache"
    t.stack.stop_service("redis")
    try:
        for inst in ds:
            st, _h, body = inst.get("/servers/" + u)
            assert st == 200 and body["uuid"] == u, (st, body)
            st, _h, body = inst.get("/servers")
            assert st == 200 and any(s["uuid"] == u for s in body)
        st, _h, ping = d.get("/ping")
        assert ping["services"]["redis"] == "offline", ping
        # writes keep flowing while the cache is down
        u2 = _uuid("d4d40000", 2)
        harness.amqp_publish_sysinfo(url, [("ur.sysinfo.%s.1" % u2,
                                            harness.make_sysinfo(u2, "cn-r2"),
                                            {"sent_ms": int(time.time() * 1000)})])
        harness.wait_until(lambda: d.get("/servers/" + u2)[0] == 200, timeout=30)
    finally:
        t.stack.start_service("redis")
    # Redis is back (empty: it has no persistence): reads fill it again
    r = redis.Redis.from_url(redis_url, socket_timeout=5)

    def cached():
        d.get("/servers/" + u)
        return bool(r.exists("cnapi:server:" + u))
    harness.wait_until(cached, timeout=30, desc="the cache is used again")
    harness.wait_until(lambda: d.get("/ping")[2]["services"]["redis"] == "online", timeout=30)


def test_bad_sysinfo_is_rejected_and_nothing_written(t):
    d = _consuming(t.cnapid())
    url = d.config["amqp"]["url"]
    good = _uuid("e5e50000", 1)
    other = _uuid("e5e50000", 2)
    si = harness.make_sysinfo(good, "cn-good")
    text = json.dumps(si)
    bad = [
        ("ur.sysinfo.%s.1" % good, b"this is not json"),
        ("ur.sysinfo.%s.2" % good, text[: len(text) // 2].encode()),          # truncated
        ("ur.sysinfo.%s.3" % good, json.dumps([si]).encode()),               # not an object
        ("ur.sysinfo.%s.4" % good, json.dumps(dict(si, Hostname=42)).encode()),  # wrong type
        ("ur.sysinfo.%s.5" % good, json.dumps({k: v for k, v in si.items()
                                               if k != "UUID"}).encode()),     # no UUID
        ("ur.sysinfo.%s.6" % good, json.dumps(dict(si, UUID="not-a-uuid")).encode()),
        ("ur.sysinfo.%s.7" % other, text.encode()),                          # UUID mismatch
        ("ur.sysinfo.%s.8" % good, json.dumps(dict(si, Padding="x" * (5 << 20))).encode()),
        ("ur.sysinfo.not-a-uuid.9", text.encode()),                          # bad key
    ]
    harness.amqp_publish_sysinfo(url, bad)
    harness.wait_until(lambda: harness.actors(d)["listener"]["rejected"] >= len(bad), timeout=30,
                       desc="every bad message rejected")
    # a good message after them still goes through: the consumer did not stop
    harness.amqp_publish_sysinfo(url, [("ur.sysinfo.%s.10" % good, text.encode(),
                                        {"sent_ms": int(time.time() * 1000)})])
    harness.wait_until(lambda: d.get("/servers/" + good)[0] == 200, timeout=30)
    st, _h, body = d.get("/servers/" + other)
    assert st == 404, (st, body)
    st, _h, body = d.get("/servers")
    assert [s["uuid"] for s in body] == [good], body
    assert body[0]["hostname"] == "cn-good"
    assert _queue_counts(t.stack, url) == (0, 0)
    assert d.running()
    log = d.log_text()
    assert "sysinfo rejected" in log


def test_redelivered_sysinfo_is_harmless(t):
    d = _consuming(t.cnapid())
    url = d.config["amqp"]["url"]
    u = _uuid("f6f60000", 1)
    si = harness.make_sysinfo(u, "cn-same")
    sent = int(time.time() * 1000)
    harness.amqp_publish_sysinfo(url, [("ur.sysinfo.%s.1" % u, si, {"sent_ms": sent})])
    harness.wait_until(lambda: d.get("/servers/" + u)[0] == 200, timeout=30)
    import psycopg2
    c = psycopg2.connect(d.config["postgres"]["conninfo"])
    try:
        with c.cursor() as cur:
            cur.execute("SELECT _id, _etag, _mtime FROM cnapi_servers WHERE _key = %s", (u,))
            before = cur.fetchone()
        harness.amqp_publish_sysinfo(url, [("ur.sysinfo.%s.1" % u, si, {"sent_ms": sent})] * 3)
        harness.wait_until(lambda: _writer(harness.actors(d))["unchanged"] >= 3, timeout=30)
        with c.cursor() as cur:
            cur.execute("SELECT _id, _etag, _mtime FROM cnapi_servers WHERE _key = %s", (u,))
            assert cur.fetchone() == before, "the same sysinfo again wrote nothing"
        # an older sysinfo arriving late is ignored
        old = dict(si, Hostname="cn-older")
        harness.amqp_publish_sysinfo(url, [("ur.sysinfo.%s.0" % u, old, {"sent_ms": sent - 5000})])
        harness.wait_until(lambda: _writer(harness.actors(d))["stale"] >= 1, timeout=30)
        assert d.get("/servers/" + u)[2]["hostname"] == "cn-same"
    finally:
        c.close()
