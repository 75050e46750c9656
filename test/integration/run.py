#!/usr/bin/python3
"""run.py: the integration test runner (stdlib only; run with /usr/bin/python3).

    STACK_DIR=/tmp/stk test/integration/run.py [PATTERN...] [--keep-tmp] [--list]

Discovers test/integration/test_*.py and runs every function named test_* in
each, in file order. A PATTERN selects tests whose "module.function" name
contains it (or matches it as a glob). A module may define
setup_module(ctx) and teardown_module(ctx); ctx has .stack (harness.Stack),
.tmp (a directory for the module) and takes any attribute.

A test function takes no argument or one, `t`:
    t.name, t.tmp (its own directory), t.stack, t.ctx (the module's ctx)
    t.cleanup(fn, *args)          run after the test, last registered first
    t.fresh_db()                  conninfo of a new empty PostgreSQL database
    t.fresh_vhost()               AMQP URL of a new RabbitMQ vhost (deleted
                                  after the module)
    t.fresh_redis()               Redis URL with a database of its own, flushed
    t.cnapid(name=..., **kw)      a started, ready harness.Cnapid on fresh
                                  resources unless given (stopped afterwards)
    t.log(msg)                    print a line under the test's name
Each test has a time limit: fn.timeout, else the module's TIMEOUT, else 120 s.

Prints "ok NAME (1.2s)" or "not ok NAME (1.2s)" with the traceback (and the
tail of the logs of the cnapid processes the test started), then exactly
"N passed, N failed". Exit status 1 when anything failed.
"""

import fnmatch
import importlib.util
import inspect
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import harness  # noqa: E402

DEFAULT_TIMEOUT = 120


class TestTimeout(BaseException):
    """Raised in the test by SIGALRM; a BaseException so that polling loops
    catching Exception do not swallow it."""


def _on_alarm(signum, frame):
    raise TestTimeout("test exceeded its time limit")


class Ctx:
    def __init__(self, name, stack, tmp):
        self.name = name
        self.stack = stack
        self.tmp = tmp


class T:
    def __init__(self, name, ctx, tmp):
        self.name = name
        self.ctx = ctx
        self.stack = ctx.stack
        self.tmp = tmp
        self._cleanups = []
        self.started = []          # Cnapid instances made with t.cnapid

    def cleanup(self, fn, *args, **kw):
        self._cleanups.append((fn, args, kw))

    def log(self, msg):
        print("  [%s] %s" % (self.name, msg), flush=True)

    def fresh_db(self):
        ci = harness.fresh_db(self.stack)
        self.cleanup(_quiet, harness.drop_db, self.stack, ci)
        return ci

    def fresh_vhost(self):
        return harness.fresh_vhost(self.stack)     # deleted after the module

    def fresh_redis(self):
        return harness.fresh_redis(self.stack)

    def cnapid(self, name=None, ready=True, ready_timeout=20.0, **kw):
        name = name or "cnapi-%d" % (len(self.started) + 1)
        kw.setdefault("amqp_url", None)
        kw.setdefault("pg_conninfo", None)
        kw.setdefault("redis_url", None)
        if kw["amqp_url"] is None:
            kw["amqp_url"] = self.fresh_vhost()
        if kw["pg_conninfo"] is None:
            kw["pg_conninfo"] = self.fresh_db()
        if kw["redis_url"] is None:
            kw["redis_url"] = self.fresh_redis()
        d = harness.Cnapid(self.tmp, self.stack, name=name, **kw)
        self.started.append(d)
        self.cleanup(d.stop)
        d.start()
        if ready:
            d.wait_ready(ready_timeout)
        return d

    def run_cleanups(self):
        errors = []
        while self._cleanups:
            fn, args, kw = self._cleanups.pop()
            try:
                fn(*args, **kw)
            except Exception:  # noqa: BLE001
                errors.append(traceback.format_exc())
        return errors


def _quiet(fn, *args):
    try:
        fn(*args)
    except Exception:  # noqa: BLE001 - best-effort cleanup
        pass


def _indent(text, n=4):
    pad = " " * n
    return "\n".join(pad + line for line in text.rstrip().splitlines())


def discover():
    return sorted(HERE.glob("test_*.py"))


def load_module(path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def tests_of(mod):
    fns = []
    for name, fn in vars(mod).items():
        if name.startswith("test_") and inspect.isfunction(fn) and fn.__module__ == mod.__name__:
            fns.append(fn)
    fns.sort(key=lambda f: f.__code__.co_firstlineno)
    return fns


def selected(full, patterns):
    if not patterns:
        return True
    return any(p in full or fnmatch.fnmatch(full, p) for p in patterns)


def main(argv):
    patterns, keep, list_only = [], False, False
    for a in argv:
        if a == "--keep-tmp":
            keep = True
        elif a == "--list":
            list_only = True
        elif a in ("-h", "--help"):
            print(__doc__)
            return 0
        else:
            patterns.append(a)

    root = os.environ.get("CNAPI_TEST_TMP")
    if root:
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
    else:
        root = Path(tempfile.mkdtemp(prefix="cnapi-it-"))

    passed = failed = 0
    stack = None
    stack_err = None
    try:
        stack = harness.Stack()
    except Exception as e:  # noqa: BLE001
        stack_err = "no stack: %s" % e

    signal.signal(signal.SIGALRM, _on_alarm)
    t_all = time.monotonic()
    any_selected = False
    kept = []

    try:
        for path in discover():
            modname = path.stem
            try:
                mod = load_module(path)
            except Exception:  # noqa: BLE001
                if selected(modname, patterns) or any(p.startswith(modname) for p in patterns):
                    any_selected = True
                    failed += 1
                    print("not ok %s (import)" % modname, flush=True)
                    print(_indent(traceback.format_exc()), flush=True)
                continue
            fns = [f for f in tests_of(mod) if selected("%s.%s" % (modname, f.__name__), patterns)]
            if not fns:
                continue
            any_selected = True
            if list_only:
                for f in fns:
                    print("%s.%s" % (modname, f.__name__))
                continue

            mtmp = root / modname
            mtmp.mkdir(parents=True, exist_ok=True)
            ctx = Ctx(modname, stack, mtmp)
            setup_err = stack_err
            setup_ok = False
            if setup_err is None and hasattr(mod, "setup_module"):
                try:
                    signal.alarm(getattr(mod, "SETUP_TIMEOUT", DEFAULT_TIMEOUT))
                    mod.setup_module(ctx)
                    setup_ok = True
                except BaseException as e:  # noqa: BLE001
                    if isinstance(e, KeyboardInterrupt):
                        raise
                    setup_err = "setup_module failed:\n" + traceback.format_exc()
                finally:
                    signal.alarm(0)
            elif setup_err is None:
                setup_ok = True

            mod_failed = False
            for fn in fns:
                full = "%s.%s" % (modname, fn.__name__)
                if setup_err is not None:
                    failed += 1
                    mod_failed = True
                    print("not ok %s (0.0s)" % full, flush=True)
                    print(_indent(setup_err), flush=True)
                    continue
                ttmp = mtmp / fn.__name__
                if ttmp.exists():
                    shutil.rmtree(ttmp, ignore_errors=True)
                ttmp.mkdir(parents=True)
                t = T(full, ctx, ttmp)
                n_started = len(harness._started)
                limit = int(getattr(fn, "timeout", getattr(mod, "TIMEOUT", DEFAULT_TIMEOUT)))
                err = None
                t0 = time.monotonic()
                try:
                    signal.alarm(limit)
                    if len(inspect.signature(fn).parameters) >= 1:
                        fn(t)
                    else:
                        fn()
                except TestTimeout:
                    err = "timed out after %ds\n%s" % (limit, traceback.format_exc())
                except KeyboardInterrupt:
                    raise
                except BaseException:  # noqa: BLE001
                    err = traceback.format_exc()
                finally:
                    signal.alarm(0)
                try:
                    signal.alarm(60)
                    cerrs = t.run_cleanups()
                finally:
                    signal.alarm(0)
                if cerrs and err is None:
                    err = "cleanup failed:\n" + "\n".join(cerrs)
                # cnapid processes this test started and left running (those
                # of setup_module live on until the module ends).
                for d in harness._started[n_started:]:
                    if d.running():
                        d.kill9()
                dt = time.monotonic() - t0
                if err is None:
                    passed += 1
                    print("ok %s (%.1fs)" % (full, dt), flush=True)
                    if not keep:
                        shutil.rmtree(ttmp, ignore_errors=True)
                else:
                    failed += 1
                    mod_failed = True
                    print("not ok %s (%.1fs)" % (full, dt), flush=True)
                    print(_indent(err), flush=True)
                    for d in harness._started[n_started:]:
                        tail = d.log_tail(25)
                        if tail:
                            print("    --- %s log (%s), last lines:" % (d.name, d.log_path), flush=True)
                            print(_indent(tail, 6), flush=True)
                    kept.append(ttmp)

            if setup_ok and hasattr(mod, "teardown_module"):
                try:
                    signal.alarm(getattr(mod, "SETUP_TIMEOUT", DEFAULT_TIMEOUT))
                    mod.teardown_module(ctx)
                except KeyboardInterrupt:
                    raise
                except BaseException:  # noqa: BLE001
                    failed += 1
                    mod_failed = True
                    print("not ok %s.teardown_module" % modname, flush=True)
                    print(_indent(traceback.format_exc()), flush=True)
                finally:
                    signal.alarm(0)
            harness.reap_all()
            if stack is not None:
                _quiet(harness.purge_vhosts, stack)
            if not mod_failed and not keep:
                shutil.rmtree(mtmp, ignore_errors=True)
    except KeyboardInterrupt:
        harness.reap_all()
        print("interrupted", flush=True)
        print("%d passed, %d failed" % (passed, failed + 1), flush=True)
        return 130

    if list_only:
        return 0
    if stack is not None:
        _quiet(harness.purge_vhosts, stack, True)
    if not any_selected:
        print("warning: no test matched %s" % (" ".join(patterns) or "(all)"),
              file=sys.stderr, flush=True)
    if kept:
        print("# files of failed tests kept under %s" % root, flush=True)
    elif not keep and not os.environ.get("CNAPI_TEST_TMP"):
        shutil.rmtree(root, ignore_errors=True)
    print("# integration: %.1fs" % (time.monotonic() - t_all), flush=True)
    print("%d passed, %d failed" % (passed, failed), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
