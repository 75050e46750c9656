"""Self-test of the local stack and of the harness: the servers really answer."""

import json
import uuid

import harness


def test_postgres_query(t):
    import psycopg2
    c = psycopg2.connect(t.stack.pg_conninfo, connect_timeout=5)
    try:
        with c.cursor() as cur:
            cur.execute("SELECT current_database(), 40 + 2")
            assert cur.fetchone() == ("cnapi", 42)
    finally:
        c.close()


def test_fresh_db_is_isolated(t):
    import psycopg2
    a, b = t.fresh_db(), t.fresh_db()
    assert a != b
    ca = psycopg2.connect(a, connect_timeout=5)
    cb = psycopg2.connect(b, connect_timeout=5)
    try:
        with ca, ca.cursor() as cur:
            cur.execute("CREATE TABLE only_here (k text PRIMARY KEY)")
        with cb.cursor() as cur:
            cur.execute("SELECT to_regclass('only_here')")
            assert cur.fetchone() == (None,)
    finally:
        ca.close()
        cb.close()


def test_redis_ping_and_db(t):
    import redis
    assert t.stack.redis().ping()
    url = t.fresh_redis()
    assert url.startswith(t.stack.redis_url + "/")
    r = redis.Redis.from_url(url, socket_timeout=5)
    r.set("harness:k", "v")
    assert r.get("harness:k") == b"v"
    assert t.stack.redis(db=0).get("harness:k") is None
    r.close()


def test_amqp_publish_and_get(t):
    import pika
    url = t.fresh_vhost()
    assert "/" in url[len("amqp://"):], url
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        ch = conn.channel()
        ch.queue_declare("ur.cnapi", durable=True)
        ch.queue_bind("ur.cnapi", "amq.topic", "ur.sysinfo.#")
        ch.queue_bind("ur.cnapi", "amq.topic", "ur.startup.#")
        sid = str(uuid.uuid4())
        si = harness.make_sysinfo(sid, "cn-%s" % sid[:8])
        body = json.dumps(si).encode()
        assert 1500 < len(body) < 8000, len(body)
        n = harness.amqp_publish_sysinfo(url, [
            ("ur.startup.%s" % sid, body, {"x-test": "1"}),
            ("ur.sysinfo.%s.1" % sid, si),
        ])
        assert n == 2
        assert harness.amqp_queue_depth(url, "ur.cnapi") == 2
        m, props, got = ch.basic_get("ur.cnapi", auto_ack=True)
        assert m.routing_key == "ur.startup.%s" % sid
        assert props.delivery_mode == 2
        assert props.headers == {"x-test": "1"}
        assert json.loads(got)["UUID"] == sid
        assert json.loads(got)["Setup"] == "false"
        m, props, got = ch.basic_get("ur.cnapi", auto_ack=True)
        assert m.routing_key == "ur.sysinfo.%s.1" % sid
    finally:
        conn.close()
    # The vhost is its own: the default vhost has no such queue.
    assert harness.amqp_queue_depth(t.stack.amqp_url, "ur.cnapi") is None


def test_dns_answers_after_dns_set(t):
    s = t.stack
    t.cleanup(s.dns_set)                    # leave no records behind
    s.dns_set("127.0.0.2", "127.0.0.3")
    assert harness.dns_query(s.dns_server, s.dns_name) == (0, ["127.0.0.2", "127.0.0.3"])
    s.dns_set("127.0.0.3")
    assert harness.dns_query(s.dns_server, s.dns_name) == (0, ["127.0.0.3"])
    s.dns_set()
    rcode, ips = harness.dns_query(s.dns_server, s.dns_name)
    assert ips == [] and rcode == 3, (rcode, ips)


def test_make_sysinfo_shape():
    sid = str(uuid.uuid4())
    si = harness.make_sysinfo(sid, "cn1", setup=True, admin_ip="10.0.0.9",
                              MiB_of_Memory="1024", fields={"Zpool": None})
    assert si["UUID"] == sid and si["Hostname"] == "cn1"
    assert si["Setup"] == "true"
    assert si["MiB of Memory"] == "1024"
    assert "Zpool" not in si
    assert isinstance(si["Boot Time"], str) and si["Boot Time"].isdigit()
    nics = si["Network Interfaces"]
    admin = [n for n in nics.values() if "admin" in n["NIC Names"]]
    assert admin and admin[0]["ip4addr"] == "10.0.0.9"


def test_wait_until_reports_last_value():
    n = [0]

    def grow():
        n[0] += 1
        return n[0] >= 3 and n[0]
    assert harness.wait_until(grow, timeout=2, interval=0.01) == 3
    try:
        harness.wait_until(lambda: "nope" == "yes", timeout=0.2, interval=0.05, desc="never")
    except AssertionError as e:
        assert "never" in str(e) and "False" in str(e), str(e)
    else:
        raise AssertionError("wait_until did not time out")
