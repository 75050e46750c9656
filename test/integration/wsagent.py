"""wsagent: a minimal agent-side session client for tests (stdlib only).

RFC 6455 framing by hand and a small msgpack codec, so a test can speak the
session protocol (proto/session.md) exactly, including the malformed frames
a real agent never sends.

    a = wsagent.Agent(d.address, d.port, server_uuid)
    status, headers = a.connect()            # 101 expected
    welcome = a.hello(vms={...})             # {"type": "welcome", "epoch": ...}
    a.send_msg({"v": 1, "type": "hb", "seq": 1, "sent_ms": now_ms()})
    kind, data = a.recv(timeout=2)           # ("msg", dict) | ("close", (code, reason)) | ("eof", None)
    a.close()
"""

import base64
import os
import socket
import struct
import time


def now_ms():
    return int(time.time() * 1000)


# ------------------------------------------------------------------ msgpack

def mp_pack(o):
    out = bytearray()
    _pack(o, out)
    return bytes(out)


def _pack(o, out):
    if o is None:
        out.append(0xc0)
    elif o is True:
        out.append(0xc3)
    elif o is False:
        out.append(0xc2)
    elif isinstance(o, int):
        if 0 <= o < 128:
            out.append(o)
        elif -32 <= o < 0:
            out.append(o & 0xff)
        elif 0 <= o < 2 ** 64:
            out.append(0xcf)
            out += struct.pack(">Q", o)
        else:
            out.append(0xd3)
            out += struct.pack(">q", o)
    elif isinstance(o, float):
        out.append(0xcb)
        out += struct.pack(">d", o)
    elif isinstance(o, str):
        b = o.encode()
        if len(b) < 32:
            out.append(0xa0 | len(b))
        elif len(b) < 256:
            out += bytes([0xd9, len(b)])
        elif len(b) < 65536:
            out.append(0xda)
            out += struct.pack(">H", len(b))
        else:
            out.append(0xdb)
            out += struct.pack(">I", len(b))
        out += b
    elif isinstance(o, (bytes, bytearray)):
        out.append(0xc6)
        out += struct.pack(">I", len(o))
        out += o
    elif isinstance(o, (list, tuple)):
        out.append(0xdd)
        out += struct.pack(">I", len(o))
        for x in o:
            _pack(x, out)
    elif isinstance(o, dict):
        out.append(0xdf)
        out += struct.pack(">I", len(o))
        for k, v in o.items():
            _pack(k, out)
            _pack(v, out)
    else:
        raise TypeError("cannot pack %r" % type(o))


def mp_unpack(b):
    v, off = _unpack(b, 0)
    if off != len(b):
        raise ValueError("trailing bytes")
    return v


def _unpack(b, i):
    t = b[i]
    i += 1
    if t < 0x80:
        return t, i
    if t >= 0xe0:
        return t - 256, i
    if 0x80 <= t <= 0x8f:
        return _map(b, i, t & 0x0f)
    if 0x90 <= t <= 0x9f:
        return _arr(b, i, t & 0x0f)
    if 0xa0 <= t <= 0xbf:
        n = t & 0x1f
        return b[i:i + n].decode(), i + n
    if t == 0xc0:
        return None, i
    if t == 0xc2:
        return False, i
    if t == 0xc3:
        return True, i
    fixed = {0xcc: ">B", 0xcd: ">H", 0xce: ">I", 0xcf: ">Q",
             0xd0: ">b", 0xd1: ">h", 0xd2: ">i", 0xd3: ">q",
             0xca: ">f", 0xcb: ">d"}
    if t in fixed:
        fmt = fixed[t]
        n = struct.calcsize(fmt)
        return struct.unpack(fmt, b[i:i + n])[0], i + n
    if t in (0xd9, 0xda, 0xdb, 0xc4, 0xc5, 0xc6):
        fmt = {0xd9: ">B", 0xda: ">H", 0xdb: ">I", 0xc4: ">B", 0xc5: ">H", 0xc6: ">I"}[t]
        ln = struct.calcsize(fmt)
        n = struct.unpack(fmt, b[i:i + ln])[0]
        i += ln
        raw = b[i:i + n]
        return (raw.decode() if t in (0xd9, 0xda, 0xdb) else bytes(raw)), i + n
    if t in (0xdc, 0xdd):
        fmt = ">H" if t == 0xdc else ">I"
        ln = struct.calcsize(fmt)
        return _arr(b, i + ln, struct.unpack(fmt, b[i:i + ln])[0])
    if t in (0xde, 0xdf):
        fmt = ">H" if t == 0xde else ">I"
        ln = struct.calcsize(fmt)
        return _map(b, i + ln, struct.unpack(fmt, b[i:i + ln])[0])
    raise ValueError("unsupported msgpack type 0x%02x" % t)


def _map(b, i, n):
    d = {}
    for _ in range(n):
        k, i = _unpack(b, i)
        v, i = _unpack(b, i)
        d[k] = v
    return d, i


def _arr(b, i, n):
    a = []
    for _ in range(n):
        v, i = _unpack(b, i)
        a.append(v)
    return a, i


# ------------------------------------------------------------------ the client

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0, 1, 2, 8, 9, 10


class Agent:
    def __init__(self, address, port, server_uuid, header_uuid=None, timeout=5.0):
        self.address = address
        self.port = port
        self.uuid = server_uuid
        self.header_uuid = server_uuid if header_uuid is None else header_uuid
        self.timeout = timeout
        self.sock = None
        self.buf = b""
        self.hb_seq = 0

    # -- opening

    def connect(self, headers=None, upgrade=True):
        """Send the upgrade request; return (status, headers dict, body bytes)."""
        self.sock = socket.create_connection((self.address, self.port), timeout=self.timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        lines = ["GET /agent/session HTTP/1.1",
                 "Host: %s:%d" % (self.address, self.port)]
        if upgrade:
            lines += ["Connection: Upgrade", "Upgrade: websocket",
                      "Sec-WebSocket-Version: 13", "Sec-WebSocket-Key: %s" % key]
        if self.header_uuid:
            lines.append("x-server-uuid: %s" % self.header_uuid)
        for k, v in (headers or {}).items():
            lines.append("%s: %s" % (k, v))
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed before the response")
            self.buf += chunk
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        first, *rest = head.decode("latin-1").split("\r\n")
        status = int(first.split()[1])
        hdrs = {}
        for line in rest:
            k, _, v = line.partition(":")
            hdrs[k.strip().lower()] = v.strip()
        body = b""
        if status != 101:
            n = int(hdrs.get("content-length", "0"))
            while len(self.buf) < n:
                chunk = self.sock.recv(65536)
                if not chunk:
                    break
                self.buf += chunk
            body, self.buf = self.buf[:n], self.buf[n:]
        return status, hdrs, body

    # -- frames

    def send_frame(self, opcode, payload=b"", fin=True, mask=True, rsv=0):
        b0 = (0x80 if fin else 0) | (rsv << 4) | opcode
        n = len(payload)
        mbit = 0x80 if mask else 0
        if n < 126:
            head = bytes([b0, mbit | n])
        elif n < 65536:
            head = bytes([b0, mbit | 126]) + struct.pack(">H", n)
        else:
            head = bytes([b0, mbit | 127]) + struct.pack(">Q", n)
        if mask:
            key = os.urandom(4)
            payload = bytes(c ^ key[i & 3] for i, c in enumerate(payload)) \
                if n < 100000 else _mask_fast(payload, key)
            head += key
        self.sock.sendall(head + payload)

    def send_msg(self, obj):
        self.send_frame(OP_BINARY, mp_pack(obj))

    def send_raw(self, data):
        self.sock.sendall(data)

    def _read_some(self, deadline):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise socket.timeout()
        self.sock.settimeout(remaining)
        chunk = self.sock.recv(65536)
        if not chunk:
            raise EOFError()
        self.buf += chunk

    def recv_frame(self, timeout=None):
        """(opcode, payload) of the next frame; EOFError on a closed socket,
        socket.timeout when nothing came in time."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            if len(self.buf) >= 2:
                b0, b1 = self.buf[0], self.buf[1]
                n = b1 & 0x7f
                off = 2
                if n == 126 and len(self.buf) >= 4:
                    n = struct.unpack(">H", self.buf[2:4])[0]
                    off = 4
                elif n == 127 and len(self.buf) >= 10:
                    n = struct.unpack(">Q", self.buf[2:10])[0]
                    off = 10
                if (b1 & 0x7f) < 126 or off > 2:
                    if len(self.buf) >= off + n:
                        payload = self.buf[off:off + n]
                        self.buf = self.buf[off + n:]
                        return b0 & 0x0f, payload
            self._read_some(deadline)

    def recv(self, timeout=None):
        """("msg", dict) for a binary message, ("close", (code, reason)) for a
        close frame, ("eof", None) when the socket closed, ("timeout", None)."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            try:
                op, payload = self.recv_frame(max(0.0, deadline - time.monotonic()))
            except EOFError:
                return "eof", None
            except (socket.timeout, TimeoutError):
                return "timeout", None
            except OSError:
                return "eof", None
            if op == OP_BINARY:
                return "msg", mp_unpack(payload)
            if op == OP_CLOSE:
                code = struct.unpack(">H", payload[:2])[0] if len(payload) >= 2 else 1005
                return "close", (code, payload[2:].decode(errors="replace"))
            if op == OP_PING:
                self.send_frame(OP_PONG, payload)
            # pongs and others: skip

    def recv_type(self, want, timeout=None):
        """Skip messages until one of type `want` (or a close / eof / timeout)."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            kind, data = self.recv(max(0.0, deadline - time.monotonic()))
            if kind != "msg" or data.get("type") == want:
                return kind, data

    def wait_close(self, timeout=None):
        """Skip messages until the close frame; return (code, reason), or
        ("eof", None) / ("timeout", None)."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        seen = []
        while True:
            kind, data = self.recv(max(0.0, deadline - time.monotonic()))
            if kind == "msg":
                seen.append(data)
                continue
            self.seen_before_close = seen
            return (kind, data) if kind != "close" else data

    # -- protocol

    def hello(self, vms=None, agent="wsagent/0.1", heartbeat_ms=1000, server_uuid=None,
              wait=True, **extra):
        m = {"v": 1, "type": "hello", "server_uuid": server_uuid or self.uuid,
             "agent": agent, "heartbeat_ms": heartbeat_ms, "vms": vms or {}}
        m.update(extra)
        self.send_msg(m)
        if not wait:
            return None
        kind, data = self.recv_type("welcome")
        if kind != "msg":
            raise AssertionError("no welcome: %s %r" % (kind, data))
        return data

    def hb(self):
        self.hb_seq += 1
        self.send_msg({"v": 1, "type": "hb", "seq": self.hb_seq, "sent_ms": now_ms()})

    def vm_event(self, vm_uuid, event, seq, vm=None):
        m = {"v": 1, "type": "vm_event", "vm_uuid": vm_uuid, "event": event, "seq": seq,
             "time_ms": now_ms()}
        if vm is not None:
            m["vm"] = vm
        self.send_msg(m)

    def close(self, code=1000, reason=""):
        try:
            self.send_frame(OP_CLOSE, struct.pack(">H", code) + reason.encode())
        except OSError:
            pass
        self.abort()

    def abort(self):
        if self.sock:
            try:
                self.sock.close()
            except OSError:
                pass
            self.sock = None


def _mask_fast(payload, key):
    n = len(payload)
    k = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(k, "big")).to_bytes(n, "big")
