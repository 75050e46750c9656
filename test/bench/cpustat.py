#!/usr/bin/python3
"""cpustat.py: CPU time of processes and their threads, for benchmarks.

  cpustat.py snap OUT PID...        write {pid: {tid: [comm, ticks]}} of each
                                    PID (its threads) and, for a PostgreSQL
                                    postmaster, of all its children, to OUT;
                                    a PID that is not running is left out
  cpustat.py diff A B MESSAGES      CPU between snapshots A and B per message:
                                    one line per process group, one per thread
                                    name (the 6 busiest); threads or children
                                    that appeared after A count in full

Ticks are utime + stime from /proc (USER_HZ). The figures are CPU time, so
they hold on a noisy machine where wall-clock rates do not.
"""
import json
import os
import sys

HZ = os.sysconf("SC_CLK_TCK")


def _stat(path):
    with open(path) as f:
        s = f.read()
    comm = s[s.index("(") + 1:s.rindex(")")]
    rest = s[s.rindex(")") + 2:].split()
    # fields after comm: state(0) ... utime(11) stime(12)
    return comm, int(rest[11]) + int(rest[12])


def _children(pid):
    out = []
    for t in os.listdir("/proc/%d/task" % pid):
        try:
            with open("/proc/%d/task/%s/children" % (pid, t)) as f:
                out += [int(x) for x in f.read().split()]
        except OSError:
            pass
    return out


def snap(pids):
    res = {}
    for pid in pids:
        procs = {}
        try:
            _, _ = _stat("/proc/%d/stat" % pid)
            is_pg = "postgres" in open("/proc/%d/cmdline" % pid).read()
        except OSError:
            continue
        members = [pid] + (_children(pid) if is_pg else [])
        for m in members:
            try:
                if is_pg:
                    # a backend's comm is "postgres"; its cmdline names its role
                    with open("/proc/%d/cmdline" % m) as f:
                        role = f.read().replace("\0", " ").strip()
                    role = role.split(":", 1)[1].strip() if ":" in role else "postmaster"
                    role = role.split()[0] if role.split() else role
                    comm, ticks = _stat("/proc/%d/stat" % m)
                    procs[str(m)] = [role, ticks]
                else:
                    for t in os.listdir("/proc/%d/task" % m):
                        comm, ticks = _stat("/proc/%d/task/%s/stat" % (m, t))
                        procs[t] = [comm, ticks]
            except OSError:
                pass
        try:
            name = _stat("/proc/%d/stat" % pid)[0]
        except OSError:
            name = "?"
        res[str(pid)] = {"pg": is_pg, "name": name, "threads": procs}
    return res


def diff(a, b, messages):
    for pid, pb in b.items():
        pa = a.get(pid, {"threads": {}})["threads"]
        by = {}
        total = 0
        for tid, (name, ticks) in pb["threads"].items():
            d = ticks - pa.get(tid, [name, 0])[1]
            by[name] = by.get(name, 0) + d
            total += d
        label = "postgres" if pb["pg"] else "%s (pid %s)" % (pb.get("name", "?"), pid)
        us = lambda t: t * 1e6 / HZ / messages
        print("%s: %.1f us/msg (%.2f s)" % (label, us(total), total / HZ))
        for name, d in sorted(by.items(), key=lambda x: -x[1])[:6]:
            if d > 0:
                print("   %-16s %7.1f us/msg" % (name, us(d)))


def main():
    if len(sys.argv) >= 3 and sys.argv[1] == "snap":
        with open(sys.argv[2], "w") as f:
            json.dump(snap([int(p) for p in sys.argv[3:]]), f)
    elif len(sys.argv) == 5 and sys.argv[1] == "diff":
        with open(sys.argv[2]) as f:
            a = json.load(f)
        with open(sys.argv[3]) as f:
            b = json.load(f)
        diff(a, b, int(sys.argv[4]))
    else:
        print(__doc__.strip().split("\n\n")[0])
        sys.exit(2)


if __name__ == "__main__":
    main()
