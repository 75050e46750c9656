"""Agent sessions across several cnapid instances (proto/session.md,
ARCHITECTURE.md "Decisions": reconnect, ownership and fencing, status).

Simulated compute nodes come from one build/mockcloud process (harness.
Mockcloud) that finds the instances through the stack's DNS name, set to
every instance's address (127.0.0.2, .3, ...; one port for all). A raw agent
(wsagent.py) talks to one chosen instance when a test needs that. Real
RabbitMQ, PostgreSQL, Redis and dnsmasq from the local stack, each test on a
database, vhost and Redis database of its own.

While instances die, a Sampler thread reads every server's status through
every live instance, and a ChannelWatch thread records every status change
published on cnapi:status: neither may ever see `unknown` in a failover.
Tests are named short: the admin socket's ipc path (under the test's
directory) must fit a Unix socket name."""

import json
import signal
import subprocess
import threading
import time

import harness
import wsagent

TIMEOUT = 120
N_CNS = 300
# The agents share a DNS answer younger than this (cn_agents_cfg_t
# resolve_cache_ms, 1000 ms by default; mockcloud keeps the default).
RESOLVE_CACHE_S = 1.0


# ------------------------------------------------------------------ helpers

def _ctl(d, *args):
    """cnapictl -j ARGS against d's admin socket: the JSON reply."""
    out = subprocess.run([str(harness.build_dir() / "cnapictl"), "-e", d.admin_endpoint,
                          "-t", "5000", "-j"] + list(args),
                         capture_output=True, text=True, timeout=20)
    assert out.returncode == 0, "cnapictl %s: %s%s" % (" ".join(args), out.stderr, out.stdout)
    return json.loads(out.stdout)


def _sessions_actor(d):
    """The sessions actor's STATUS (sessions owned, boot_id, counters)."""
    return _ctl(d, "actors")["sessions"]


def _session_list(d):
    """{server_uuid: session} of the sessions d holds (cnapictl sessions)."""
    j = _ctl(d, "sessions", "0", "5000")
    assert "sessions" in j, j
    assert j["total"] == len(j["sessions"]), j
    return {s["server_uuid"]: s for s in j["sessions"]}


def _status_rows(conninfo):
    """Every row of the store's cnapi_status bucket: {uuid: value}."""
    import psycopg2
    c = psycopg2.connect(conninfo)
    try:
        with c.cursor() as cur:
            cur.execute("SELECT _key, _value FROM cnapi_status")
            return {k: json.loads(v) for k, v in cur.fetchall()}
    finally:
        c.close()


def _statuses(d, timeout=10.0):
    """{uuid: status} of every server, read through d's API."""
    st, _h, body = d.get("/servers?limit=1000", timeout=timeout)
    assert st == 200 and isinstance(body, list), (st, body)
    return {s["uuid"]: s.get("status") for s in body}


def _all_running(d, uuids):
    """True when every one of uuids reads running through d (else None)."""
    st = _statuses(d)
    return all(st.get(u) == "running" for u in uuids) or None


def _cluster(t, n, dns=None, config=None):
    """n instances on 127.0.0.2.. sharing one port, store, vhost and Redis
    (and config, when given); the DNS name lists them (or the instances in
    dns). Returns (amqp_url, conninfo, [Cnapid])."""
    url, db, redis = t.fresh_vhost(), t.fresh_db(), t.fresh_redis()
    t.cleanup(t.stack.dns_set)      # last: the name does not resolve again
    addrs = ["127.0.0.%d" % (i + 2) for i in range(n)]
    port = harness.common_port(addrs)
    ds = [t.cnapid(name="cnapi-%d" % (i + 1), address=addrs[i], port=port, amqp_url=url,
                   pg_conninfo=db, redis_url=redis, config=config) for i in range(n)]
    _dns(t, [d.address for d in (ds if dns is None else dns(ds))])
    return url, db, ds


def _dns(t, ips):
    t.stack.dns_set(*ips)
    harness.wait_until(lambda: t.stack.dns_lookup() == (0, sorted(ips)), timeout=10,
                       desc="DNS answering %s" % ips)


def _mockcloud(t, url, port, count, prefix, **kw):
    """A started harness.Mockcloud, stopped (and reaped) after the test."""
    m = harness.Mockcloud(t.tmp, t.stack, count=count, prefix=prefix, amqp_url=url,
                          cnapi_port=port, **kw)
    t.cleanup(m.stop)
    m.start()
    return m


def _connected(m, count, names=None):
    """Wait for mockcloud to report every CN up, each session on one of names
    (when given)."""
    def ok(s):
        # every instance that ever welcomed a CN stays listed, maybe with 0
        inst = {k: v for k, v in s.get("instances", {}).items() if v}
        return (s["connected"] == count and sum(inst.values()) == count
                and (names is None or set(inst) <= set(names)))
    return m.wait_stats(ok, timeout=60, desc="%d CNs connected to %s" % (count, names or "any"))


def _wait_all_running(ds, uuids, timeout=60):
    for d in ds:
        harness.wait_until(lambda: _all_running(d, uuids), timeout=timeout, interval=0.2,
                           desc="all %d servers running through %s" % (len(uuids), d.name))


class Sampler:
    """A thread reading every server's status through every target instance,
    again and again, until stop(). A target is removed before it is killed;
    a read that was under way when its target was removed is discarded."""

    def __init__(self, uuids, targets):
        self.uuids = list(uuids)
        self.targets = list(targets)
        self.lock = threading.Lock()
        self.halt = threading.Event()
        self.samples = []       # (monotonic, instance name, servers read)
        self.bad = []           # (monotonic, instance name, uuid, status)
        self.errors = []        # (monotonic, instance name, repr(error))
        self.thread = threading.Thread(target=self._run, name="status-sampler", daemon=True)

    def start(self):
        self.thread.start()
        return self

    def remove(self, d):
        with self.lock:
            self.targets.remove(d)

    def add(self, d):
        with self.lock:
            self.targets.append(d)

    def _run(self):
        deadline = time.monotonic() + 600
        for _ in range(1000000):
            if self.halt.is_set() or time.monotonic() > deadline:
                return
            with self.lock:
                targets = list(self.targets)
            if not targets:
                self.halt.wait(0.05)
            for d in targets:
                now = time.monotonic()
                try:
                    st = _statuses(d)
                    err = None
                except Exception as e:  # noqa: BLE001 - recorded, asserted on
                    st, err = None, repr(e)
                with self.lock:
                    if d not in self.targets:
                        continue            # removed meanwhile: it may be dying
                    if err:
                        self.errors.append((now, d.name, err))
                        continue
                    self.samples.append((now, d.name, len(st)))
                    for u in self.uuids:
                        if st.get(u) != "running":
                            self.bad.append((now, d.name, u, st.get(u)))

    def stop(self):
        self.halt.set()
        self.thread.join(timeout=30)
        assert not self.thread.is_alive(), "the sampler did not stop"

    def count(self, since=None, until=None, name=None):
        with self.lock:
            return sum(1 for ts, n, _k in self.samples
                       if (since is None or ts >= since) and (until is None or ts <= until)
                       and (name is None or n == name))

    def max_gap(self, since, names):
        """The longest time between two reads through one of names after
        since (and from since to the first)."""
        with self.lock:
            gaps = []
            for name in names:
                ts = [since] + [x[0] for x in self.samples if x[1] == name and x[0] >= since]
                gaps += [b - a for a, b in zip(ts, ts[1:])]
            return max(gaps) if gaps else float("inf")

    def check(self):
        with self.lock:
            assert not self.errors, "reads failed on live instances: %s" % self.errors[:5]
            assert not self.bad, ("%d samples of a server not running (first: %s)"
                                  % (len(self.bad), self.bad[:5]))
            short = [s for s in self.samples if s[2] < len(self.uuids)]
            assert not short, "samples missing servers: %s" % short[:5]


class ChannelWatch:
    """A thread subscribed to the instances' status channel (cnapi:status:
    "<uuid> <running|unknown> <owner|-> <epoch> <version> <boot>", one per
    row change), keeping the messages about uuids. Every status change any
    instance writes is published there, so an "unknown" no sample happened
    to see still shows here."""

    def __init__(self, stack, uuids):
        self.uuids = set(uuids)
        self.redis = stack.redis()
        self.pubsub = self.redis.pubsub()
        self.pubsub.subscribe("cnapi:status")
        self.msgs = []          # (monotonic, uuid, status, owner, epoch)
        self.lock = threading.Lock()
        self.halt = threading.Event()
        self.thread = threading.Thread(target=self._run, name="status-channel", daemon=True)

    def start(self):
        # the subscription is confirmed before anything is asserted on
        harness.wait_until(lambda: self.pubsub.get_message(timeout=0.2), timeout=10,
                           desc="the cnapi:status subscription")
        self.thread.start()
        return self

    def _run(self):
        deadline = time.monotonic() + 600
        while not self.halt.is_set() and time.monotonic() < deadline:
            m = self.pubsub.get_message(timeout=0.2)
            if not m or m.get("type") != "message":
                continue
            f = m["data"].decode(errors="replace").split()
            if len(f) >= 4 and f[0] in self.uuids:
                with self.lock:
                    self.msgs.append((time.monotonic(), f[0], f[1], f[2], int(f[3])))

    def stop(self):
        if not self.halt.is_set():
            self.halt.set()
            self.thread.join(timeout=10)
            self.pubsub.close()
            self.redis.close()

    def since(self, t0):
        with self.lock:
            return [m for m in self.msgs if m[0] >= t0]

    def check_no_unknown(self):
        with self.lock:
            bad = [m for m in self.msgs if m[2] != "running"]
        assert not bad, "%d status changes to unknown published (first: %s)" % (len(bad), bad[:5])


def _owners(conninfo):
    """{uuid: (owner, owner_boot, status, epoch)} from the store."""
    return {u: (v.get("owner"), v.get("owner_boot"), v.get("status"), v.get("epoch"))
            for u, v in _status_rows(conninfo).items()}


def _check_rows_live(conninfo, uuids, live):
    """Every status row names a live instance incarnation (live: {name:
    boot_id}) and says running; exactly the rows of uuids."""
    rows = _owners(conninfo)
    assert set(rows) == set(uuids), "status rows: %d, servers: %d" % (len(rows), len(uuids))
    wrong = {u: r for u, r in rows.items()
             if r[0] not in live or r[1] != live[r[0]] or r[2] != "running"}
    assert not wrong, "%d rows not owned by a live instance (e.g. %s); live: %s" % (
        len(wrong), list(wrong.items())[:3], live)
    return rows


def _held(ds):
    """{instance name: set of uuids} from each instance's session list."""
    return {d.name: set(_session_list(d)) for d in ds}


# ------------------------------------------------------------------ tests

def test_sessions_spread_over_three_instances(t):
    """300 CNs, 3 instances behind one name: every server running through
    every instance; the sessions spread over all three, each server held
    exactly once, and the store's owner is the instance holding it."""
    url, db, ds = _cluster(t, 3)
    m = _mockcloud(t, url, ds[0].port, N_CNS, "5e550001")
    uuids = m.uuids()
    stats = _connected(m, N_CNS, [d.name for d in ds])
    _wait_all_running(ds, uuids)

    # Where the sessions are, three ways: mockcloud's welcomes, each
    # instance's session list and its sessions actor, and the store.
    t.log("sessions per instance (mockcloud): %s" % stats["instances"])
    assert set(stats["instances"]) == {d.name for d in ds}, stats["instances"]
    assert all(v > 0 for v in stats["instances"].values()), stats["instances"]
    held = _held(ds)
    everywhere = set().union(*held.values())
    assert everywhere == set(uuids), "held: %d of %d" % (len(everywhere), len(uuids))
    assert sum(len(h) for h in held.values()) == N_CNS, "a server held twice: %s" % {
        k: len(v) for k, v in held.items()}
    for d in ds:
        a = _sessions_actor(d)
        assert a["sessions"] == len(held[d.name]) > 0, (d.name, a["sessions"], len(held[d.name]))
        assert a["claiming"] == 0 and a["claim_failures"] == 0, a
    live = {d.name: _sessions_actor(d)["boot_id"] for d in ds}
    rows = _check_rows_live(db, uuids, live)
    for name, us in held.items():
        assert all(rows[u][0] == name for u in us), "row owner differs from the holder"
    assert stats["failures"] == 0 and stats["losses"] == 0, stats


def _hb_ms(server):
    """A server view's last_heartbeat as ms since the epoch (None if null)."""
    import datetime
    v = server.get("last_heartbeat")
    if v is None:
        return None
    dt = datetime.datetime.strptime(v, "%Y-%m-%dT%H:%M:%S.%fZ")
    return int(dt.replace(tzinfo=datetime.timezone.utc).timestamp() * 1000)


def test_last_heartbeat_follows_the_owner(t):
    """last_heartbeat is not written per session every few seconds: through
    every instance a running server's last_heartbeat is its owner's last
    sign of life (seen once a second), so it stays within seconds of now
    with the periodic flush pushed out to 10 minutes. When the agents go,
    the release writes the time each was last heard."""
    url, db, ds = _cluster(t, 2, config={"session": {"flush_ms": 600000}})
    n = 20
    m = _mockcloud(t, url, ds[0].port, n, "5e55000b")
    uuids = m.uuids()
    _connected(m, n, [d.name for d in ds])
    _wait_all_running(ds, uuids)

    def views(d):
        st, _h, body = d.get("/servers?limit=1000&extras=memory")  # any extra shows it
        assert st == 200, (st, body)
        return {s["uuid"]: s for s in body if s["uuid"] in uuids}

    def fresh_everywhere(since_ms):
        now = time.time() * 1000
        for d in ds:
            for u, v in views(d).items():
                hb = _hb_ms(v)
                if v["status"] != "running" or hb is None or hb < since_ms or hb > now + 1000:
                    raise AssertionError("%s via %s: %s, last_heartbeat %s (%s ms from now)" % (
                        u, d.name, v["status"], v.get("last_heartbeat"),
                        None if hb is None else hb - now))
        return True
    # twice, 3 s apart: it moves on (well past the claims' own writes)
    for _ in range(2):
        since = time.time() * 1000
        harness.wait_until(lambda: fresh_everywhere(since), timeout=10, interval=0.2,
                           desc="last_heartbeat past %d on both instances" % since)
        t0 = time.monotonic()
        harness.wait_until(lambda: time.monotonic() - t0 >= 3.0, timeout=5, interval=0.1,
                           desc="3 s")
    for d in ds:
        a = _sessions_actor(d)
        assert a["flush_rows"] == 0, a          # nothing written per session
    for d in ds:
        for u in uuids[:3]:
            st, _h, v = d.get("/servers/%s" % u)
            assert st == 200 and abs(_hb_ms(v) - time.time() * 1000) < 3000, v

    # the agents go (closed): released after the close grace, each row
    # with the time its agent was last heard
    stopped_ms = time.time() * 1000
    m.stop()
    harness.wait_until(lambda: all(v["status"] == "unknown" for d in ds
                                   for v in views(d).values()) or None,
                       timeout=20, interval=0.2, desc="all unknown after the agents left")
    rows = _status_rows(db)
    for u in uuids:
        v = rows[u]
        assert v["status"] == "unknown" and v["owner"] is None, v
        hb = _hb_ms(v)
        assert hb is not None and stopped_ms - 3000 <= hb <= stopped_ms + 1000, (v, stopped_ms)
    for d in ds:
        for v in views(d).values():
            assert _hb_ms(v) <= stopped_ms + 1000, v


def test_kill9_failover_never_unknown(t):
    """kill -9 twice (once with the dead address still in DNS, once after
    the name dropped it) while every server's status is read through every
    live instance: never anything but running, every takeover published,
    nothing swept; in the end every status row names a live incarnation."""
    url, db, ds = _cluster(t, 3)
    a, b, c = ds
    m = _mockcloud(t, url, a.port, N_CNS, "5e550002")
    uuids = m.uuids()
    _connected(m, N_CNS, [d.name for d in ds])
    _wait_all_running(ds, uuids)
    held = _held(ds)
    assert all(held[d.name] for d in ds), {k: len(v) for k, v in held.items()}

    sampler = Sampler(uuids, ds).start()
    t.cleanup(sampler.stop)
    watch = ChannelWatch(t.stack, uuids)
    t.cleanup(watch.stop)
    watch.start()
    harness.wait_until(lambda: all(sampler.count(name=d.name) >= 2 for d in ds), timeout=30,
                       desc="the sampler reading every instance")

    # Round 1: A dies while the DNS name still lists it. Its agents find it
    # gone (EOF, then the quick retry refused), resolve the name (a fresh
    # query: the last one was at start), get all three addresses and move to
    # B and C, never back to A.
    queries = m.stats()["dns_queries"]
    sampler.remove(a)
    t1 = time.monotonic()
    a.kill9()
    harness.wait_until(lambda: all(o[0] != a.name for o in _owners(db).values()),
                       timeout=30, interval=0.02,
                       desc="no status row owned by the dead %s" % a.name)
    t1_done = time.monotonic()
    _connected(m, N_CNS, [b.name, c.name])
    s = m.wait_stats(lambda s: True, timeout=10)
    assert s["dns_queries"] > queries, "A's agents did not resolve the name"
    moved = _held([b, c])
    for d in (b, c):
        got = moved[d.name] & held[a.name]
        assert got, "%s took none of %s's agents" % (d.name, a.name)
    t.log("round 1 (DNS lists the dead %s): its %d agents re-owned in %.3f s, now %s;"
          " %d samples meanwhile"
          % (a.name, len(held[a.name]), t1_done - t1,
             {n: len(v & held[a.name]) for n, v in moved.items()},
             sampler.count(since=t1, until=t1_done)))

    # A comes back (a new incarnation, the same name and address): it must
    # read every server as running from its first answer on.
    a.start()
    a.wait_ready()
    sampler.add(a)

    # Round 2: the DNS name drops B first, then B dies: its agents resolve
    # again and find A and C only. The kill waits until every answer the
    # agents may hold (round 1's, A's restart is quick) has aged past the
    # cache, so the one they use is asked after the change.
    _dns(t, [a.address, c.address])
    t_dns = time.monotonic()
    held2 = _held([a, b, c])
    assert held2[a.name] == set(), "the restarted A took sessions: %d" % len(held2[a.name])
    harness.wait_until(lambda: time.monotonic() - t_dns > RESOLVE_CACHE_S + 0.2, timeout=5,
                       interval=0.05, desc="cached DNS answers expired")
    queries = m.stats()["dns_queries"]
    sampler.remove(b)
    t2 = time.monotonic()
    b.kill9()
    harness.wait_until(lambda: all(o[0] != b.name for o in _owners(db).values()),
                       timeout=30, interval=0.02,
                       desc="no status row owned by the dead %s" % b.name)
    t2_done = time.monotonic()
    _connected(m, N_CNS, [a.name, c.name])
    s = m.wait_stats(lambda s: True, timeout=10)
    assert s["dns_queries"] > queries, "B's agents did not resolve the name again"
    moved2 = _held([a, c])
    for d in (a, c):
        assert moved2[d.name] & held2[b.name], "%s took none of %s's agents" % (d.name, b.name)
    t.log("round 2 (DNS without %s): its %d agents re-owned in %.3f s, now %s;"
          " %d samples meanwhile"
          % (b.name, len(held2[b.name]), t2_done - t2,
             {n: len(v & held2[b.name]) for n, v in moved2.items()},
             sampler.count(since=t2, until=t2_done)))

    # Let the survivors' sweeps look at the dead owners a while longer than
    # the grace (5 s): nothing may go unknown late either.
    grace_end = t2 + 6.5
    harness.wait_until(lambda: time.monotonic() >= grace_end and sampler.count(
        since=grace_end) >= 2, timeout=30, desc="sampling past the owner grace")
    sampler.stop()
    watch.stop()
    t.log("%d samples in all, %d of them after a kill" % (sampler.count(), sampler.count(since=t1)))
    sampler.check()
    watch.check_no_unknown()
    # every takeover was announced: each moved server got a running message
    # naming its new owner
    for t_kill, dead, movedmap in ((t1, a.name, {n: v & held[a.name] for n, v in moved.items()}),
                                   (t2, b.name, {n: v & held2[b.name]
                                                 for n, v in moved2.items()})):
        seen = {(m[1], m[3]) for m in watch.since(t_kill) if m[2] == "running"}
        missing = [(u, n) for n, us in movedmap.items() for u in us if (u, n) not in seen]
        assert not missing, "takeovers from %s not published: %s" % (dead, missing[:5])
    # the reads went on through both failovers, without a pause
    gap = max(sampler.max_gap(t1, [b.name, c.name]), sampler.max_gap(t2, [a.name, c.name]))
    t.log("longest pause between two reads through one survivor: %.2f s" % gap)
    assert gap < 3.0, gap

    live = {d.name: _sessions_actor(d)["boot_id"] for d in (a, c)}
    _check_rows_live(db, uuids, live)
    _wait_all_running([a, c], uuids, timeout=10)
    for d in (a, c):
        assert _sessions_actor(d)["swept"] == 0, "%s marked servers unknown" % d.name


def test_sigterm_agents_move_within_a_second(t):
    """SIGTERM: goaway "shutdown" to every agent, which go to the other
    instances at once: all re-owned and held elsewhere within 1 s of the
    signal, never unknown, the stopped instance exits cleanly."""
    url, db, ds = _cluster(t, 3)
    m = _mockcloud(t, url, ds[0].port, N_CNS, "5e550003")
    uuids = m.uuids()
    _connected(m, N_CNS, [d.name for d in ds])
    _wait_all_running(ds, uuids)
    held = _held(ds)
    victim = max(ds, key=lambda d: len(held[d.name]))
    survivors = [d for d in ds if d is not victim]
    n = len(held[victim.name])
    assert n > 0
    before = m.stats()
    sampler = Sampler(uuids, survivors).start()
    t.cleanup(sampler.stop)
    watch = ChannelWatch(t.stack, uuids)
    t.cleanup(watch.stop)
    watch.start()
    harness.wait_until(lambda: all(sampler.count(name=d.name) >= 1 for d in survivors),
                       timeout=30, desc="the sampler reading the survivors")

    import psycopg2
    conn = psycopg2.connect(db)
    conn.autocommit = True
    t.cleanup(conn.close)

    def victim_rows():
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM cnapi_status WHERE owner = %s", (victim.name,))
            return cur.fetchone()[0]
    assert victim_rows() == n

    t0 = time.monotonic()
    victim.signal(signal.SIGTERM)
    # every server of the victim re-owned by a survivor: the claim is
    # committed (the welcome follows at once)
    harness.wait_until(lambda: victim_rows() == 0, timeout=30, interval=0.01,
                       desc="no row owned by the stopping %s" % victim.name)
    moved_s = time.monotonic() - t0
    # and the survivors hold all of them, by their own session lists
    harness.wait_until(lambda: sum(len(h) for h in _held(survivors).values()) == N_CNS,
                       timeout=10, interval=0.02, desc="the survivors hold every session")
    held_s = time.monotonic() - t0
    t.log("SIGTERM of %s (%d sessions): re-owned in %.3f s, all held by the survivors at %.3f s"
          % (victim.name, n, moved_s, held_s))

    victim.proc.wait(timeout=20)
    victim.stop()                   # reaps; it exited by itself
    victim.check_clean_exit()       # status 0 and no sanitizer report

    s = _connected(m, N_CNS, [d.name for d in survivors])
    assert s["goaways"] - before["goaways"] >= n, (before["goaways"], s["goaways"], n)
    assert s["failovers"] - before["failovers"] >= n, (before["failovers"], s["failovers"], n)
    sampler.stop()
    watch.stop()
    sampler.check()
    watch.check_no_unknown()
    took = {m[1] for m in watch.since(t0) if m[2] == "running" and m[3] != victim.name}
    assert held[victim.name] <= took, "takeovers not published: %s" % sorted(
        held[victim.name] - took)[:5]
    live = {d.name: _sessions_actor(d)["boot_id"] for d in survivors}
    _check_rows_live(db, uuids, live)
    assert moved_s <= 1.0, "re-owned in %.3f s (limit 1 s)" % moved_s
    assert held_s <= 1.0, "held by the survivors after %.3f s (limit 1 s)" % held_s


def _pump(agents, seconds, hb_every=0.3):
    """Keep raw agents alive for `seconds`: send heartbeats, collect what
    comes in. Returns {agent: [("msg", m) | ("close", (code, reason)) |
    ("eof", None)]}; an agent stops being pumped at its close or EOF."""
    got = {ag: [] for ag in agents}
    done = set()
    deadline = time.monotonic() + seconds
    next_hb = 0.0
    for _ in range(100000):
        now = time.monotonic()
        if now >= deadline or len(done) == len(agents):
            break
        if now >= next_hb:
            for ag in agents:
                if ag not in done:
                    try:
                        ag.hb()
                    except OSError:
                        pass
            next_hb = now + hb_every
        for ag in agents:
            if ag in done:
                continue
            kind, data = ag.recv(timeout=0.02)
            if kind == "timeout":
                continue
            got[ag].append((kind, data))
            if kind in ("close", "eof"):
                done.add(ag)
    return got


def _fenced(events):
    """True when the events are a goaway "fenced" then close 4001."""
    msgs = [d for k, d in events if k == "msg"]
    closes = [d for k, d in events if k == "close"]
    return (any(x.get("type") == "goaway" and x.get("reason") == "fenced" for x in msgs)
            and closes and closes[0][0] == 4001)


def test_same_server_on_two_instances(t):
    """One server uuid with a session on two instances: exactly one keeps
    it (the last hello), the other side gets goaway "fenced" and close 4001;
    the store's owner and epoch are the survivor's."""
    url, db, ds = _cluster(t, 2, dns=lambda ds: ds[:1])     # the name lists A only
    a, b = ds
    u = harness.mockcloud_uuid("5e550004", 0)

    # 1. Two raw agents say hello for the same server at once, one to each
    # instance: one session survives, the other is fenced, and the store
    # names the survivor's instance at the survivor's epoch.
    wa, wb = wsagent.Agent(a.address, a.port, u), wsagent.Agent(b.address, b.port, u)
    for w in (wa, wb):
        t.cleanup(w.abort)
        st, _h, _b = w.connect()
        assert st == 101, st
    wa.hello(wait=False)
    wb.hello(wait=False)
    welcomes, early = {}, {wa: [], wb: []}
    for w in (wa, wb):
        kind, data = w.recv_type("welcome", timeout=10)
        if kind == "msg":
            welcomes[w] = data
        else:
            early[w].append((kind, data))       # closed before any welcome
    assert welcomes, "no welcome at all: %s" % early
    got = _pump([w for w in (wa, wb) if not early[w]], 6)
    for w in (wa, wb):
        got[w] = early[w] + got.get(w, [])
    fenced = [w for w in (wa, wb) if _fenced(got[w])]
    alive = [w for w in (wa, wb) if not any(k in ("close", "eof") for k, _d in got[w])]
    assert len(fenced) == 1 and len(alive) == 1, {
        "a": got[wa], "b": got[wb], "welcomes": list(welcomes.values())}
    winner, loser = alive[0], fenced[0]
    win_d = a if winner is wa else b
    lose_d = b if winner is wa else a
    row = _status_rows(db)[u]
    assert row["owner"] == win_d.name and row["status"] == "running", row
    assert row["epoch"] == welcomes[winner]["epoch"], (row, welcomes[winner])
    if loser in welcomes:
        assert welcomes[loser]["epoch"] < row["epoch"], (welcomes[loser], row)
    assert u in _session_list(win_d) and u not in _session_list(lose_d)
    t.log("race: %s kept the session at epoch %d, %s's side was fenced"
          % (win_d.name, row["epoch"], lose_d.name))
    winner.close()
    loser.abort()

    # 2. A mockcloud CN (the name lists A only) and a raw agent on B with the
    # same uuid: whoever says hello last owns the server; the other side is
    # told goaway "fenced" and closed 4001.
    harness.wait_until(lambda: _status_rows(db)[u]["status"] == "unknown", timeout=10,
                       desc="the closed session released")
    wr = wsagent.Agent(b.address, b.port, u)
    t.cleanup(wr.abort)
    assert wr.connect()[0] == 101
    w1 = wr.hello()
    assert _status_rows(db)[u]["owner"] == b.name
    m = _mockcloud(t, url, a.port, 1, "5e550004")
    got = _pump([wr], 15)
    assert _fenced(got[wr]), "the raw agent on %s was not fenced: %s" % (b.name, got[wr])
    s = _connected(m, 1, [a.name])
    row = _status_rows(db)[u]
    assert row["owner"] == a.name and row["epoch"] > w1["epoch"], (row, w1)
    assert u in _session_list(a) and u not in _session_list(b)
    assert s["goaways"] == 0, s

    # ... and back: a new hello on B takes it over, the mockcloud CN is
    # fenced, goes to A again at once (the only address) and takes it back;
    # the raw agent is fenced in turn. One owner at every step.
    wr2 = wsagent.Agent(b.address, b.port, u)
    t.cleanup(wr2.abort)
    assert wr2.connect()[0] == 101
    w2 = wr2.hello()
    assert w2["epoch"] > row["epoch"], (w2, row)
    got = _pump([wr2], 15)
    assert _fenced(got[wr2]), "the second raw agent was not fenced: %s" % got[wr2]
    s = m.wait_stats(lambda s: s["goaways"] >= 1 and s["connected"] == 1, timeout=15,
                     desc="the mockcloud CN fenced once and back")
    row = _status_rows(db)[u]
    assert row["owner"] == a.name and row["epoch"] > w2["epoch"] and row["status"] == "running"
    held = _held([a, b])
    assert held == {a.name: {u}, b.name: set()}, held
    t.log("mockcloud vs raw agent: final epoch %d on %s, mockcloud goaways %d"
          % (row["epoch"], a.name, s["goaways"]))


def test_duplicate_agents_do_not_take_turns(t):
    """Two real agents (two mockcloud processes, so two boot ids) with the
    same server uuid, on two instances: the first keeps the server, the
    second is refused (close 4003) and backs off instead of fencing the
    first over and over; no takeover, the epoch stays put. When the first
    agent goes away, the second gets the server."""
    url, db, ds = _cluster(t, 2)
    a, b = ds
    prefix = "5e550005"
    u = harness.mockcloud_uuid(prefix, 0)
    m1 = _mockcloud(t, url, a.port, 1, prefix, name="first")
    _connected(m1, 1)
    first = _status_rows(db)[u]
    assert first["status"] == "running" and first.get("agent_boot"), first
    m2 = _mockcloud(t, url, a.port, 1, prefix, name="second")
    # the second agent tries (and is refused) a few times: both instances
    # are in DNS, so it meets the owner's instance and the other one
    m2.wait_stats(lambda s: s["failures"] >= 3, timeout=30,
                  desc="the duplicate agent refused a few times")
    row = _status_rows(db)[u]
    assert row["owner"] == first["owner"] and row["epoch"] == first["epoch"], (first, row)
    assert row["agent_boot"] == first["agent_boot"], (first, row)
    s1, s2 = m1.stats(), m2.stats()
    assert s1["connected"] == 1 and s1["goaways"] == 0 and s1["losses"] == 0, s1
    assert s2["connected"] == 0, s2
    dups = sum(_sessions_actor(d)["duplicates"] for d in ds)
    assert dups >= 3, dups
    t.log("duplicate refused %d times (second agent: %d failed attempts), epoch stayed %d"
          % (dups, s2["failures"], row["epoch"]))
    # the first one leaves: the second takes the server (its backoff is
    # capped at 5 s; the first's session is released on its close)
    m1.stop()
    _connected(m2, 1)
    row = harness.wait_until(
        lambda: (lambda r: r if r["status"] == "running" and r["agent_boot"] != first["agent_boot"]
                 else None)(_status_rows(db)[u]),
        timeout=15, desc="the second agent owning the server")
    assert row["epoch"] > first["epoch"], (first, row)


def test_frozen_instance_fenced_when_it_wakes(t):
    """SIGSTOP: the instance's sockets stay open but it says nothing (a hung
    process, a partition). Its agents notice the silence (3 heartbeats) and
    move to the others well within the owner grace, so nothing reads
    unknown; when it wakes (SIGCONT), with its stale view of who owns what,
    every one of its conditional writes fails: it closes its stale side and
    writes nothing."""
    url, db, ds = _cluster(t, 3)
    m = _mockcloud(t, url, ds[0].port, N_CNS, "5e550005")
    uuids = m.uuids()
    _connected(m, N_CNS, [d.name for d in ds])
    _wait_all_running(ds, uuids)
    held = _held(ds)
    victim = ds[1]
    others = [d for d in ds if d is not victim]
    n = len(held[victim.name])
    assert n > 0
    sampler = Sampler(uuids, others).start()
    t.cleanup(sampler.stop)
    watch = ChannelWatch(t.stack, uuids)
    t.cleanup(watch.stop)
    watch.start()

    def thaw():
        if victim.running():
            victim.signal(signal.SIGCONT)
    t.cleanup(thaw)             # runs before its stop (registered later)
    t0 = time.monotonic()
    victim.signal(signal.SIGSTOP)
    harness.wait_until(lambda: all(o[0] != victim.name for o in _owners(db).values()),
                       timeout=20, interval=0.05,
                       desc="no status row owned by the frozen %s" % victim.name)
    moved_s = time.monotonic() - t0
    s = _connected(m, N_CNS, [d.name for d in others])
    t.log("%s frozen with %d sessions: re-owned elsewhere in %.2f s" % (victim.name, n, moved_s))
    # past the owner grace (5 s) counted from when it stopped answering
    harness.wait_until(lambda: time.monotonic() - t0 >= 9.0, timeout=15, interval=0.1,
                       desc="frozen past the owner grace")

    victim.signal(signal.SIGCONT)
    t1 = time.monotonic()
    # awake: its reads say running from the first (its stale view has the
    # servers running, as its own); it drops its stale sessions without
    # writing and learns the new owners (channel, resync)
    sampler.add(victim)
    harness.wait_until(lambda: _sessions_actor(victim)["sessions"] == 0, timeout=15,
                       desc="the woken %s holding nothing" % victim.name)
    harness.wait_until(lambda: sampler.count(name=victim.name) >= 3, timeout=15,
                       desc="samples from the woken instance")
    a = _sessions_actor(victim)
    t.log("woken %s after %.1f s: fenced %d, releases %d, swept %d, lost_byes %d, timeouts %d"
          % (victim.name, t1 - t0, a["fenced"], a["releases"], a["swept"], a["lost_byes"],
             a["timeouts"]))
    sampler.stop()
    watch.stop()
    sampler.check()
    watch.check_no_unknown()
    assert moved_s < 5.0, "re-owned after %.2f s: past the owner grace" % moved_s
    assert a["releases"] == 0 and a["swept"] == 0, a
    live = {d.name: _sessions_actor(d)["boot_id"] for d in others}
    _check_rows_live(db, uuids, live)
    for d in others:
        assert _sessions_actor(d)["swept"] == 0, "%s marked servers unknown" % d.name
    s = m.stats()
    assert s["connected"] == N_CNS, s
