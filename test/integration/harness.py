"""harness: helpers for cnapi integration tests.

Run with Debian's /usr/bin/python3 (python3-pika, python3-psycopg2 and
python3-redis come from deploy/install-deps). The shared stack is the one
`deploy/local/stack up $STACK_DIR` started; see test/integration/run.py for
the test runner, which passes each test a `T` (below).

Nothing reaps killed processes on these machines except their parent: every
process started here is waited for after it is stopped or killed.
"""

import copy
import http.client
import itertools
import json
import os
import random
import shlex
import signal
import socket
import struct
import subprocess
import threading
import time
import urllib.parse
import uuid as uuidlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
STACK_SCRIPT = REPO / "deploy" / "local" / "stack"


def build_dir():
    # a relative CNAPI_BUILD is the repository's (children run elsewhere)
    return REPO / (os.environ.get("CNAPI_BUILD") or "build")


# ------------------------------------------------------------------ polling

def wait_until(fn, timeout=10.0, interval=0.05, desc=None):
    """Poll fn() until it returns a truthy value; return that value.

    Bounded by `timeout` seconds. An exception raised by fn counts as a
    falsy result (and is reported if it is the last one). On timeout raises
    AssertionError naming desc and the last value seen.
    """
    deadline = time.monotonic() + timeout
    last, last_exc, n = None, None, 0
    while True:
        n += 1
        try:
            last = fn()
            last_exc = None
            if last:
                return last
        except Exception as e:  # noqa: BLE001 - reported below
            last_exc = e
        if time.monotonic() >= deadline:
            what = desc or getattr(fn, "__name__", "condition")
            if last_exc is not None:
                raise AssertionError(
                    "timed out after %.1fs (%d tries) waiting for %s: last error %r"
                    % (timeout, n, what, last_exc))
            raise AssertionError(
                "timed out after %.1fs (%d tries) waiting for %s: last value %r"
                % (timeout, n, what, last))
        time.sleep(min(interval, max(0.0, deadline - time.monotonic())))


def free_port(address="127.0.0.1"):
    """A TCP port free on address right now (bind port 0)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind((address, 0))
        return s.getsockname()[1]
    finally:
        s.close()


def common_port(addresses, tries=50):
    """One TCP port free on every address right now (the instances of a
    test share one port on 127.0.0.2.., as DNS names no port)."""
    for _ in range(tries):
        port = free_port(addresses[0])
        ok = True
        for a in addresses[1:]:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                s.bind((a, port))
            except OSError:
                ok = False
            finally:
                s.close()
            if not ok:
                break
        if ok:
            return port
    raise AssertionError("no port free on all of %s" % addresses)


def port_open(address, port, timeout=0.5):
    try:
        with socket.create_connection((address, port), timeout=timeout):
            return True
    except OSError:
        return False


# ------------------------------------------------------------------ stack

def read_env_file(path):
    """Parse a shell file of `export K=V` lines (as stack.env) into a dict."""
    env = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith("export "):
                line = line[len("export "):]
            k, sep, v = line.partition("=")
            if not sep:
                continue
            vals = shlex.split(v) if v else [""]
            env[k.strip()] = vals[0] if vals else ""
    return env


class Stack:
    """The running local stack (deploy/local/stack) in DIR.

    stack.env's variables are in .env (a dict); the common ones are
    attributes: amqp_url, pg_conninfo, redis_url, dns_server, dns_name,
    amqp_port, pg_port, redis_port, dns_port.
    """

    def __init__(self, dir=None):
        dir = dir or os.environ.get("STACK_DIR")
        if not dir:
            raise RuntimeError("STACK_DIR is not set (run deploy/local/stack up DIR)")
        self.dir = Path(dir)
        self.reload()

    def reload(self):
        self.env = read_env_file(self.dir / "stack.env")
        e = self.env
        self.amqp_url = e["CNAPI_AMQP_URL"]
        self.pg_conninfo = e["CNAPI_POSTGRES_CONNINFO"]
        self.redis_url = e["CNAPI_REDIS_URL"]
        self.dns_server = e["CNAPI_DNS_SERVER"]
        self.dns_name = e["CNAPI_DNS_NAME"]
        self.datacenter_name = e.get("STACK_DC", "dc1")
        self.dns_domain = e.get("STACK_DOMAIN", "example.com")
        self.amqp_port = int(e["STACK_AMQP_PORT"])
        self.pg_port = int(e["STACK_PG_PORT"])
        self.redis_port = int(e["STACK_REDIS_PORT"])
        self.dns_port = int(e["STACK_DNS_PORT"])
        return self

    def __getitem__(self, k):
        return self.env[k]

    def run(self, *args, timeout=120, check=True):
        """Run deploy/local/stack SUBCOMMAND DIR ARGS...; returns CompletedProcess."""
        cmd = [str(STACK_SCRIPT), args[0], str(self.dir)] + [str(a) for a in args[1:]]
        p = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, timeout=timeout)
        if check and p.returncode != 0:
            raise RuntimeError("%s failed (%d): %s%s" % (" ".join(cmd), p.returncode,
                                                          p.stdout, p.stderr))
        return p

    def stop_service(self, name):
        """Stop postgres|rabbitmq|redis|dns (data kept; redis comes back empty)."""
        self.run("stop-service", name)

    def start_service(self, name):
        """Start it again on the same port."""
        self.run("start-service", name)

    def dns_set(self, *ips):
        """Serve one A record per IP for dns_name (no IPs: NXDOMAIN)."""
        if len(ips) == 1 and isinstance(ips[0], (list, tuple)):
            ips = tuple(ips[0])
        self.run("dns-set", *ips)

    def dns_lookup(self, name=None):
        """(rcode, [ip, ...]) for name (default dns_name) from the stack's dnsmasq."""
        return dns_query(self.dns_server, name or self.dns_name)

    def rabbitmqctl(self, *args, timeout=60):
        return self.run("rabbitmqctl", *args, timeout=timeout).stdout

    def pg_connect(self, dbname="postgres"):
        import psycopg2
        c = psycopg2.connect(conninfo_with(self.pg_conninfo, dbname=dbname))
        c.autocommit = True
        return c

    def redis(self, db=0):
        import redis
        return redis.Redis(host="127.0.0.1", port=self.redis_port, db=db,
                           socket_timeout=5, socket_connect_timeout=5)


def actors(d):
    """Every actor's STATUS from d's admin socket (cnapictl -j actors)."""
    import json
    import subprocess
    out = subprocess.run([str(build_dir() / "cnapictl"), "-e", d.admin_endpoint, "-j",
                          "actors"], capture_output=True, text=True, timeout=10)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def conninfo_with(conninfo, **kw):
    """Return a libpq key=value conninfo with some keys replaced."""
    parts = {}
    order = []
    for tok in shlex.split(conninfo):
        k, _, v = tok.partition("=")
        if k not in parts:
            order.append(k)
        parts[k] = v
    for k, v in kw.items():
        if k not in parts:
            order.append(k)
        parts[k] = str(v)

    def q(v):
        if v == "" or any(c in v for c in " '\\"):
            return "'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'"
        return v
    return " ".join("%s=%s" % (k, q(parts[k])) for k in order)


_counter = itertools.count(1)


def _unique(prefix):
    return "%s_%d_%d_%04x" % (prefix, os.getpid(), next(_counter), random.randrange(65536))


def fresh_db(stack, prefix="cnapi_t"):
    """CREATE a new empty database; return its conninfo."""
    name = _unique(prefix).lower()
    c = stack.pg_connect()
    try:
        with c.cursor() as cur:
            cur.execute('CREATE DATABASE "%s"' % name)
    finally:
        c.close()
    return conninfo_with(stack.pg_conninfo, dbname=name)


def drop_db(stack, conninfo):
    """Drop a database made by fresh_db (connections are terminated)."""
    name = dict(t.partition("=")[::2] for t in shlex.split(conninfo))["dbname"]
    c = stack.pg_connect()
    try:
        with c.cursor() as cur:
            cur.execute('DROP DATABASE IF EXISTS "%s" WITH (FORCE)' % name)
    finally:
        c.close()


_vhost_lock = threading.Lock()
_vhost_pool = []        # made in advance, not yet handed out
_vhost_used = []        # handed out, to delete with purge_vhosts
VHOST_BATCH = 8


def _erl_bins(names):
    return "[" + ", ".join('<<"%s">>' % n for n in names) + "]"


def fresh_vhost(stack, prefix="t"):
    """A new RabbitMQ vhost with full rights for guest; returns its URL
    (amqp://guest:guest@127.0.0.1:PORT/VHOST, the vhost URL-encoded).

    rabbitmqctl costs ~1 s a call, so vhosts are made VHOST_BATCH at a time
    in one call, and deleted together by purge_vhosts()."""
    with _vhost_lock:
        if not _vhost_pool:
            names = [_unique(prefix) for _ in range(VHOST_BATCH)]
            expr = ('[begin ok = rabbit_vhost:add(V, <<"harness">>), '
                    'ok = rabbit_auth_backend_internal:set_permissions(<<"guest">>, V, '
                    '<<".*">>, <<".*">>, <<".*">>, <<"harness">>) end || V <- %s].'
                    % _erl_bins(names))
            try:
                stack.rabbitmqctl("eval", expr)
            except RuntimeError:
                names = names[:1]
                stack.rabbitmqctl("add_vhost", names[0])
                stack.rabbitmqctl("set_permissions", "-p", names[0], "guest", ".*", ".*", ".*")
            _vhost_pool.extend(names)
        name = _vhost_pool.pop(0)
        _vhost_used.append(name)
    return "%s/%s" % (stack.amqp_url, urllib.parse.quote(name, safe=""))


def purge_vhosts(stack, include_pool=False):
    """Delete every vhost fresh_vhost handed out so far (one rabbitmqctl call);
    with include_pool, also those made in advance and not handed out."""
    with _vhost_lock:
        names = list(_vhost_used)
        del _vhost_used[:]
        if include_pool:
            names += _vhost_pool
            del _vhost_pool[:]
    if names:
        stack.rabbitmqctl("eval", '[rabbit_vhost:delete(V, <<"harness">>) || V <- %s].'
                          % _erl_bins(names))
    return names


_redis_lock = threading.Lock()
_redis_next = [1]
REDIS_DBS = 64          # deploy/local/stack starts redis with --databases 64


def fresh_redis(stack):
    """A Redis URL with a database number of its own (1..63, reused
    round-robin), flushed: redis://127.0.0.1:PORT/N."""
    with _redis_lock:
        n = _redis_next[0]
        _redis_next[0] = n % (REDIS_DBS - 1) + 1
    r = stack.redis(db=n)
    r.flushdb()
    r.close()
    return "%s/%d" % (stack.redis_url, n)


# ------------------------------------------------------------------ DNS

def dns_query(server, name, timeout=1.0):
    """Ask server ("host:port") for name's A records over UDP.

    Returns (rcode, [ip, ...]) with rcode 0 = NOERROR, 3 = NXDOMAIN;
    raises socket.timeout when nothing answers."""
    host, _, port = server.rpartition(":")
    qid = random.randrange(65536)
    q = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    for label in name.rstrip(".").split("."):
        q += bytes([len(label)]) + label.encode()
    q += b"\0" + struct.pack(">HH", 1, 1)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(timeout)
    try:
        s.sendto(q, (host, int(port)))
        while True:
            r, _ = s.recvfrom(4096)
            if len(r) >= 12 and struct.unpack(">H", r[:2])[0] == qid:
                break
    finally:
        s.close()
    _, flags, qd, an, _, _ = struct.unpack(">HHHHHH", r[:12])

    def skip(o):
        while True:
            n = r[o]
            if n == 0:
                return o + 1
            if n & 0xC0 == 0xC0:
                return o + 2
            o += n + 1
    o = 12
    for _ in range(qd):
        o = skip(o) + 4
    ips = []
    for _ in range(an):
        o = skip(o)
        typ, _cls, _ttl, rdl = struct.unpack(">HHIH", r[o:o + 10])
        o += 10
        if typ == 1 and rdl == 4:
            ips.append(socket.inet_ntoa(r[o:o + 4]))
        o += rdl
    return flags & 15, sorted(ips)


# ------------------------------------------------------------------ AMQP

def amqp_publish_sysinfo(url, messages, persistent=True, exchange="amq.topic",
                         mandatory=False, timeout=10):
    """Publish messages with publisher confirms; return how many were confirmed.

    messages: iterable of (routing_key, body, headers) or (routing_key, body);
    body is bytes, str, or a dict/list (sent as JSON); headers a dict or None.
    Raises (pika.exceptions.NackError / UnroutableError) when the broker
    refuses a message.
    """
    import pika
    params = pika.URLParameters(url)
    params.socket_timeout = timeout
    params.blocked_connection_timeout = timeout
    params.connection_attempts = 1
    conn = pika.BlockingConnection(params)
    n = 0
    try:
        ch = conn.channel()
        ch.confirm_delivery()
        for m in messages:
            rk, body = m[0], m[1]
            headers = m[2] if len(m) > 2 else None
            if isinstance(body, (dict, list)):
                body = json.dumps(body).encode()
            elif isinstance(body, str):
                body = body.encode()
            props = pika.BasicProperties(
                content_type="application/json",
                delivery_mode=2 if persistent else 1,
                headers=headers or None)
            ch.basic_publish(exchange=exchange, routing_key=rk, body=body,
                             properties=props, mandatory=mandatory)
            n += 1
    finally:
        try:
            conn.close()
        except Exception:  # noqa: BLE001
            pass
    return n


def amqp_queue_depth(url, queue):
    """Messages ready in queue (passive declare); None if it does not exist."""
    import pika
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        ch = conn.channel()
        try:
            ok = ch.queue_declare(queue=queue, passive=True)
        except pika.exceptions.ChannelClosedByBroker:
            return None
        return ok.method.message_count
    finally:
        try:
            conn.close()
        except Exception:  # noqa: BLE001
            pass


# ------------------------------------------------------------------ sysinfo

def _mac(seed, i):
    h = uuidlib.uuid5(uuidlib.NAMESPACE_OID, "%s/%d" % (seed, i)).bytes
    return "%02x:%02x:%02x:%02x:%02x:%02x" % ((h[0] & 0xFC) | 0x02, h[1], h[2], h[3], h[4], h[5])


def make_sysinfo(uuid, hostname, setup=False, admin_ip=None, datacenter="dc1",
                 headnode=False, ram_mib=262111, boot_time=None, fields=None,
                 **overrides):
    """A SmartOS-like sysinfo dict (about 3 KB of JSON) for a compute node.

    Modelled on SmartOS `sysinfo` output: "Setup" is the string "true" or
    "false", "MiB of Memory" and "Boot Time" are strings, core counts and
    "Zpool Creation" are numbers. Override any key with fields={"Key Name": v}
    or keyword arguments whose underscores stand for spaces
    (MiB_of_Memory="1024"); a value of None removes the key.
    """
    uuid = str(uuid)
    if admin_ip is None:
        h = uuidlib.uuid5(uuidlib.NAMESPACE_OID, uuid).bytes
        admin_ip = "10.99.%d.%d" % (h[0] % 250 + 1, h[1] % 250 + 2)
    if boot_time is None:
        boot_time = int(time.time()) - 3600
    mac0, mac1, mac2 = _mac(uuid, 0), _mac(uuid, 1), _mac(uuid, 2)
    si = {
        "Live Image": "20240926T000407Z",
        "System Type": "SunOS",
        "Boot Time": str(int(boot_time)),
        "Datacenter Name": datacenter,
        "SDC Version": "7.0",
        "Manufacturer": "Supermicro",
        "Product": "SSG-6029P-E1CR12L",
        "Serial Number": "S%s" % uuid.replace("-", "")[:12].upper(),
        "SKU Number": "To be filled by O.E.M.",
        "HW Version": "0123456789",
        "HW Family": "To be filled by O.E.M.",
        "Setup": "true" if setup else "false",
        "VM Capable": True,
        "Bhyve Capable": True,
        "Bhyve Max Vcpus": 64,
        "HVM API": True,
        "CPU Type": "Intel(R) Xeon(R) Gold 6130 CPU @ 2.10GHz",
        "CPU Virtualization": "vmx",
        "CPU Physical Cores": 2,
        "Admin NIC Tag": "admin",
        "Admin IP": admin_ip,
        "UUID": uuid,
        "Hostname": hostname,
        "CPU Total Cores": 64,
        "MiB of Memory": str(ram_mib),
        "Zpool": "zones",
        "Zpool Disks": ",".join("c1t%dd0" % i for i in range(8)),
        "Zpool Profile": "raidz2",
        "Zpool Creation": 1700000000 + (int(uuidlib.UUID(uuid)) % 10000000),
        "Zpool Size in GiB": 21403,
        "Disks": dict([("c1t%dd0" % i, {"Size in GB": 4000}) for i in range(8)]
                      + [("c2t0d0", {"Size in GB": 32})]),
        "Boot Parameters": {
            "rabbitmq": "guest:guest:rabbitmq.%s.example.com:5672" % datacenter,
            "rabbitmq_dns": "guest:guest:rabbitmq.%s.example.com:5672" % datacenter,
            "admin_nic": mac1,
            "console": "ttyb",
            "headnode": "true" if headnode else "false",
            "boot_args": "",
            "bootargs": "",
        },
        "SDC Agents": [
            {"name": "cn-agent", "version": "2.12.0",
             "image_uuid": "1b1a8c0e-5b3e-4a47-9c4e-0d2a6c1f7e01"},
            {"name": "config-agent", "version": "1.10.0",
             "image_uuid": "2c2b9d1f-6c4f-4b58-8d5f-1e3b7d208f12"},
            {"name": "net-agent", "version": "2.3.0",
             "image_uuid": "3d3cae20-7d50-4c69-9e60-2f4c8e319023"},
            {"name": "vm-agent", "version": "1.9.0",
             "image_uuid": "4e4dbf31-8e61-4d7a-8f71-305d9f42a134"},
            {"name": "amon-agent", "version": "1.0.1",
             "image_uuid": "5f5ec042-9f72-4e8b-9082-416ea053b245"},
            {"name": "amon-relay", "version": "1.0.1",
             "image_uuid": "6a6fd153-a083-4f9c-a193-527fb164c356"},
            {"name": "smartlogin", "version": "0.3.0",
             "image_uuid": "7b70e264-b194-409d-b2a4-6380c275d467"},
            {"name": "firewaller", "version": "1.6.2",
             "image_uuid": "8c81f375-c2a5-41ae-83b5-7491d386e578"},
        ],
        "Network Interfaces": {
            "ixgbe0": {
                "MAC Address": mac0,
                "ip4addr": "",
                "Link Status": "up",
                "NIC Names": ["external"],
            },
            "ixgbe1": {
                "MAC Address": mac1,
                "ip4addr": admin_ip,
                "Link Status": "up",
                "NIC Names": ["admin"],
            },
            "igb0": {
                "MAC Address": mac2,
                "ip4addr": "",
                "Link Status": "down",
                "NIC Names": [],
            },
        },
        "Virtual Network Interfaces": {
            "external0": {
                "MAC Address": _mac(uuid, 3),
                "ip4addr": "",
                "Link Status": "up",
                "Host Interface": "ixgbe0",
                "VLAN": "0",
            },
        },
        "Link Aggregations": {},
        "CN Agent Port": 5309,
    }
    upd = dict(fields or {})
    for k, v in overrides.items():
        upd[k.replace("_", " ")] = v
    for k, v in upd.items():
        if v is None:
            si.pop(k, None)
        else:
            si[k] = v
    return si


# ------------------------------------------------------------------ cnapid

_live = []                    # Cnapid instances started and not yet stopped
_started = []                 # every Cnapid ever started (for failure reports)
_live_lock = threading.Lock()


def _deep_merge(a, b):
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(a.get(k), dict):
            _deep_merge(a[k], v)
        else:
            a[k] = v
    return a


class HTTPResult(tuple):
    """(status, headers, body) with attribute access too."""
    __slots__ = ()

    def __new__(cls, status, headers, body):
        return tuple.__new__(cls, (status, headers, body))

    status = property(lambda s: s[0])
    headers = property(lambda s: s[1])
    body = property(lambda s: s[2])


def http_request(address, port, method, path, body=None, headers=None, timeout=5.0):
    """One HTTP request; returns HTTPResult(status, headers (lower-case keys),
    body parsed as JSON when it is JSON, else text)."""
    hdrs = {"Accept": "application/json"}
    data = None
    if body is not None:
        if isinstance(body, (bytes, bytearray)):
            data = bytes(body)
        elif isinstance(body, str):
            data = body.encode()
        else:
            data = json.dumps(body).encode()
            hdrs["Content-Type"] = "application/json"
    hdrs.update(headers or {})
    c = http.client.HTTPConnection(address, port, timeout=timeout)
    try:
        c.request(method, path, body=data, headers=hdrs)
        r = c.getresponse()
        raw = r.read()
        rh = {k.lower(): v for k, v in r.getheaders()}
        text = raw.decode("utf-8", "replace")
        parsed = text
        if raw and ("json" in rh.get("content-type", "") or text[:1] in "{["):
            try:
                parsed = json.loads(text)
            except ValueError:
                parsed = text
        return HTTPResult(r.status, rh, parsed)
    finally:
        c.close()


class _Daemon:
    """What Cnapid and Mockcloud share: a child process (self.proc, or None
    before start) writing its log to self.log_path, named self.name.
    Subclasses define _forget(): drop it from the live list, close what the
    harness holds for it (log file, reader thread)."""

    SANITIZER_MARKS = ("ERROR: AddressSanitizer", "ERROR: LeakSanitizer", "runtime error:")

    @property
    def pid(self):
        return self.proc.pid if self.proc else None

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def log_text(self):
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, n=30):
        return "\n".join(self.log_text().splitlines()[-n:])

    def _forget(self):
        raise NotImplementedError

    def _terminate(self, timeout):
        """SIGTERM and wait up to timeout, then SIGKILL. True when it was
        running (a stop, not the reaping of a process already gone)."""
        terminated = self.proc.poll() is None
        if terminated:
            try:
                self.proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return terminated

    def check_clean_exit(self):
        """After a SIGTERM stop: exit status 0 and no sanitizer report in
        this run's log (ASan, LSan, UBSan), else AssertionError."""
        text = self.log_text()
        text = text[text.rfind("--- start"):] if "--- start" in text else text
        marks = [m for m in self.SANITIZER_MARKS if m in text]
        if marks:
            raise AssertionError("%s: sanitizer report at exit (%s):\n%s"
                                 % (self.name, ", ".join(marks), self.log_tail(40)))
        if self.proc.returncode != 0:
            raise AssertionError("%s exited with status %s after SIGTERM:\n%s"
                                 % (self.name, self.proc.returncode, self.log_tail(20)))

    def kill9(self):
        """SIGKILL and reap. Returns the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            try:
                self.proc.kill()
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=10)
        self._forget()
        return self.proc.returncode


class Cnapid(_Daemon):
    """One cnapid process with its own JSON config in tmpdir.

        d = Cnapid(tmp, stack, name="cnapi-1", amqp_url=fresh_vhost(stack),
                   pg_conninfo=fresh_db(stack), redis_url=fresh_redis(stack))
        d.start().wait_ready()
        status, headers, body = d.get("/servers")
        d.stop()

    The child's environment has no CNAPI_* variables (they would override the
    config file) except those given in env=.
    """

    def __init__(self, tmpdir, stack=None, name="cnapi-1", address="127.0.0.2",
                 port=None, amqp_url=None, pg_conninfo=None, redis_url=None,
                 queue="ur.cnapi", prefetch=None, log_level="debug",
                 datacenter_name=None, dns_domain=None, sysinfo_freshness_s=None,
                 config=None, env=None, binary=None, args=None):
        self.tmpdir = Path(tmpdir)
        self.tmpdir.mkdir(parents=True, exist_ok=True)
        self.stack = stack
        self.name = name
        self.address = address
        self.port = port or free_port(address)
        self.binary = Path(binary) if binary else build_dir() / "cnapid"
        self.config_path = self.tmpdir / ("%s.json" % name)
        self.log_path = self.tmpdir / ("%s.log" % name)
        sock = self.tmpdir / ("%s.sock" % name)
        if len(str(sock)) > 96:
            # a Unix socket path holds at most 107 bytes: a long test name
            # would make the admin socket unbindable
            sock = Path("/tmp") / ("cnapi-adm-%s.sock" % uuidlib.uuid4().hex[:12])
        self.admin_endpoint = "ipc://%s" % sock
        cfg = {
            "instance": name,
            "datacenter_name": datacenter_name or (stack.datacenter_name if stack else "dc1"),
            "dns_domain": dns_domain or (stack.dns_domain if stack else "example.com"),
            "log_level": log_level,
            "http": {"address": address, "port": self.port},
            "admin": {"endpoint": self.admin_endpoint},
            "amqp": {"url": amqp_url or (stack.amqp_url if stack else None),
                     "queue": queue},
            "postgres": {"conninfo": pg_conninfo or (stack.pg_conninfo if stack else None),
                         "timeout_ms": 5000},
            "redis": {"url": redis_url or (stack.redis_url if stack else None),
                      "timeout_ms": 500},
        }
        if prefetch is not None:
            cfg["amqp"]["prefetch"] = prefetch
        if sysinfo_freshness_s is not None:
            cfg["sysinfo_freshness_s"] = sysinfo_freshness_s
        for sect in ("amqp", "postgres", "redis"):
            cfg[sect] = {k: v for k, v in cfg[sect].items() if v is not None}
        self.config = _deep_merge(cfg, copy.deepcopy(config or {}))
        self.extra_env = dict(env or {})
        self.args = list(args or [])
        self.proc = None
        self._logf = None

    # -- lifecycle

    def write_config(self):
        self.config_path.write_text(json.dumps(self.config, indent=2) + "\n")

    def start(self):
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError("%s already running" % self.name)
        if not os.access(str(self.binary), os.X_OK):
            raise AssertionError("no cnapid binary at %s (build first, or set CNAPI_BUILD)"
                                 % self.binary)
        self.write_config()
        env = {k: v for k, v in os.environ.items() if not k.startswith("CNAPI_")}
        env.update(self.extra_env)
        self._logf = open(self.log_path, "ab")
        self._logf.write(("--- start %s\n" % time.strftime("%H:%M:%S")).encode())
        self._logf.flush()
        try:
            self.proc = subprocess.Popen(
                [str(self.binary), "-c", str(self.config_path)] + self.args,
                stdin=subprocess.DEVNULL, stdout=self._logf, stderr=subprocess.STDOUT,
                env=env, cwd=str(self.tmpdir), start_new_session=True)
        except OSError:
            self._logf.close()
            self._logf = None
            raise
        with _live_lock:
            _live.append(self)
            if self not in _started:
                _started.append(self)
        return self

    @property
    def url(self):
        return "http://%s:%d" % (self.address, self.port)

    @property
    def returncode(self):
        return self.proc.poll() if self.proc else None

    def wait_ready(self, timeout=20.0, until=None):
        """Poll GET /ping until it answers HTTP at all (any status), or, with
        until=fn, until fn(result) is true (e.g. lambda r: r.body["ready"]).
        Returns the last /ping result."""
        def ready():
            if not self.running():
                raise AssertionError("%s exited with %s before answering; log:\n%s"
                                     % (self.name, self.returncode, self.log_tail()))
            try:
                r = self.request("GET", "/ping", timeout=1.0)
            except (OSError, http.client.HTTPException):
                return None
            if until is not None:
                try:
                    if not until(r):
                        return None
                except (KeyError, TypeError, AttributeError, IndexError):
                    return None
            return r
        deadline = time.monotonic() + timeout
        while True:
            r = ready()
            if r is not None:
                return r
            if time.monotonic() >= deadline:
                raise AssertionError("%s not answering on %s after %.0fs; log:\n%s"
                                     % (self.name, self.url, timeout, self.log_tail()))
            time.sleep(0.05)

    def _forget(self):
        with _live_lock:
            if self in _live:
                _live.remove(self)
        if self._logf:
            self._logf.close()
            self._logf = None

    def stop(self, timeout=10.0):
        """SIGTERM, wait for exit and the HTTP port to close (deadline), then
        SIGKILL. Returns the exit status (negative: killed by a signal)."""
        if self.proc is None:
            return None
        terminated = self._terminate(timeout)
        deadline = time.monotonic() + 5
        while port_open(self.address, self.port, 0.2) and time.monotonic() < deadline:
            time.sleep(0.05)
        self._forget()
        if terminated:      # not for a process that was already gone (kill9)
            self.check_clean_exit()
        return self.proc.returncode

    def signal(self, sig):
        self.proc.send_signal(sig)

    def __enter__(self):
        if not self.running():
            self.start()
        return self

    def __exit__(self, *exc):
        self.stop()
        return False

    # -- HTTP

    def request(self, method, path, body=None, headers=None, timeout=5.0):
        return http_request(self.address, self.port, method, path, body, headers, timeout)

    def get(self, path, **kw):
        return self.request("GET", path, **kw)

    def post(self, path, json=None, **kw):  # noqa: A002 - mirrors requests
        return self.request("POST", path, body=json if json is not None else {}, **kw)

    def put(self, path, json=None, **kw):  # noqa: A002
        return self.request("PUT", path, body=json if json is not None else {}, **kw)

    def delete(self, path, **kw):
        return self.request("DELETE", path, **kw)

    def __repr__(self):
        return "<Cnapid %s pid=%s %s>" % (self.name, self.pid, self.url)


# ------------------------------------------------------------------ mockcloud

_live_mc = []                 # Mockcloud processes started and not yet reaped


def mockcloud_uuid(prefix, i):
    """The server uuid of mockcloud's CN i (cn_sysinfo_gen_uuid)."""
    return "%s-0000-4000-8000-%012x" % (prefix, i)


class Mockcloud(_Daemon):
    """One mockcloud process (build/mockcloud --stats): `count` simulated CNs
    holding agent sessions to the instances behind the stack's DNS name.

        m = Mockcloud(tmp, stack, count=300, amqp_url=vhost_url, cnapi_port=port)
        m.start()
        m.wait_stats(lambda s: s["connected"] == 300, timeout=30)
        m.stats()            # the latest --stats line (a dict), or None
        m.stop()             # SIGTERM, wait (reaped); m.final: the "final" line
        m.kill9()            # or SIGKILL, reaped

    A reader thread parses the one-JSON-line-a-second --stats output from
    stdout (every line is kept in .history as (monotonic time, dict));
    stderr (the logs) goes to NAME.log in tmpdir. The child's environment has
    no CNAPI_* variables. Killed only by its own PID.
    """

    def __init__(self, tmpdir, stack=None, count=1, prefix="cafe0000", name="mockcloud",
                 amqp_url=None, resolver=None, cnapi_port=8080, log_level="info",
                 args=None, env=None, binary=None):
        self.tmpdir = Path(tmpdir)
        self.tmpdir.mkdir(parents=True, exist_ok=True)
        self.stack = stack
        self.name = name
        self.count = count
        self.prefix = prefix
        self.amqp_url = amqp_url
        self.resolver = resolver or (stack.dns_server if stack else None)
        self.cnapi_port = cnapi_port
        self.log_level = log_level
        self.args = list(args or [])
        self.extra_env = dict(env or {})
        self.binary = Path(binary) if binary else build_dir() / "mockcloud"
        self.log_path = self.tmpdir / ("%s.log" % name)
        self.proc = None
        self.final = None
        self.history = []
        self._latest = None
        self._cond = threading.Condition()
        self._reader = None
        self._logf = None

    def uuid(self, i):
        return mockcloud_uuid(self.prefix, i)

    def uuids(self):
        return [self.uuid(i) for i in range(self.count)]

    def command(self):
        cmd = [str(self.binary), "--count", str(self.count), "--prefix", self.prefix,
               "--cnapi-port", str(self.cnapi_port), "--amqp", self.amqp_url or "none",
               "--log-level", self.log_level, "--stats"]
        if self.resolver:
            cmd += ["--resolver", self.resolver]
        return cmd + self.args

    def start(self):
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError("%s already running" % self.name)
        if not os.access(str(self.binary), os.X_OK):
            raise AssertionError("no mockcloud binary at %s (build first, or set CNAPI_BUILD)"
                                 % self.binary)
        env = {k: v for k, v in os.environ.items() if not k.startswith("CNAPI_")}
        env.update(self.extra_env)
        self._logf = open(self.log_path, "ab")
        self._logf.write(("--- start %s %s\n" % (time.strftime("%H:%M:%S"),
                                                  " ".join(self.command()))).encode())
        self._logf.flush()
        self.final = None
        self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=self._logf, env=env,
                                     cwd=str(self.tmpdir), start_new_session=True)
        with _live_lock:
            _live_mc.append(self)
        self._reader = threading.Thread(target=self._read, args=(self.proc,),
                                        name="%s-stats" % self.name, daemon=True)
        self._reader.start()
        return self

    def _read(self, proc):
        for raw in proc.stdout:
            try:
                o = json.loads(raw)
            except ValueError:
                continue
            if not isinstance(o, dict):
                continue
            with self._cond:
                self.history.append((time.monotonic(), o))
                self._latest = o
                if o.get("type") == "final":
                    self.final = o
                self._cond.notify_all()
        proc.stdout.close()

    def stats(self):
        """The latest stats line (a dict), or None before the first."""
        with self._cond:
            return self._latest

    def wait_stats(self, pred, timeout=30.0, desc=None):
        """Wait (bounded) for a stats line newer than the call for which
        pred(line) is true; return it. Raises AssertionError on timeout or
        when the process exits first."""
        deadline = time.monotonic() + timeout
        with self._cond:
            seen = len(self.history)
            while True:
                for _t, o in self.history[seen:]:
                    if pred(o):
                        return o
                seen = len(self.history)
                left = deadline - time.monotonic()
                if left <= 0 or not self.running():
                    raise AssertionError(
                        "%s: no stats line satisfying %s within %.0fs (running: %s); last: %r;"
                        " log:\n%s" % (self.name, desc or "the condition", timeout,
                                       self.running(), self._latest, self.log_tail(15)))
                self._cond.wait(min(left, 0.5))

    def _forget(self):
        if self._reader is not None:
            self._reader.join(timeout=10)
        with _live_lock:
            if self in _live_mc:
                _live_mc.remove(self)
        if self._logf:
            self._logf.close()
            self._logf = None

    def stop(self, timeout=15.0):
        """SIGTERM (sessions close 1000, AMQP flushed), wait; SIGKILL after
        timeout. Reaped either way. Then, when it was running, as Cnapid:
        exit status 0 and no sanitizer report, else AssertionError. Returns
        the exit status."""
        if self.proc is None:
            return None
        terminated = self._terminate(timeout)
        self._forget()
        if terminated:
            self.check_clean_exit()
        return self.proc.returncode

    def __repr__(self):
        return "<Mockcloud %s pid=%s count=%d>" % (self.name, self.pid, self.count)


def reap_all():
    """Kill (SIGKILL) and reap every Cnapid and Mockcloud still running;
    return their names."""
    with _live_lock:
        left = list(_live)
        left_mc = list(_live_mc)
    names = []
    for d in left + left_mc:
        if d.running():
            names.append(d.name)
        d.kill9()
    return names
