"""Memory (PSS) of the process tree, issue 8, ninth round.

- A child forked by the master keeps sharing the master's preloaded pages
  even through a full collection of its own (the master freezes its heap
  before forking): its private memory stays small.
- The master caps glibc's malloc arenas before its first fork (children
  inherit the cap: a threaded child does not grow one arena per thread) and
  hands the free heap back after preloading (compiling modules whose .pyc is
  stale leaves freed parse trees that every child would inherit).
- anvil(8) runs on demand, as Postfix's master runs it: the master owns
  private/anvil and forks anvil when an smtpd asks about a client; anvil
  leaves after max_idle (at least one anvil_rate_time_unit) without a
  connected smtpd, leaving the name to the master.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from postwell.config.main import Config
from postwell.config.master import parse_master_cf
from postwell.log import NullLog
from postwell.master import daemon
from postwell.master.daemon import Master

WAIT = 10.0


def _python(code: str, *args: str, env: dict | None = None, timeout: float = 60.0):
    cp = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                        timeout=timeout, env=env)
    assert cp.returncode == 0, cp.stderr
    return cp


# ---------------------------------------------------------------- a forked child's private memory

FORK_CHILD = r'''
import gc, os, sys, time
from postwell.master import daemon

def private_kib(pid):
    total = 0
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                total += int(line.split()[1])
    return total

daemon.limit_malloc_arenas()
daemon.preload_modules()          # as the master before its first fork
if sys.argv[1] == "thaw":
    gc.unfreeze()                 # the control: what the freeze saves
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    # A child's own full collection (any long-lived child has one sooner or later)
    # and a little work of its own.
    gc.collect()
    from postwell.anvil import AnvilTable
    table = AnvilTable(60.0)
    for i in range(200):
        table.connect(f"smtp:192.0.2.{i % 50}")
    os.write(w, b"x")
    time.sleep(30)
    os._exit(0)
try:
    os.read(r, 1)
    print(private_kib(pid))
finally:
    os.kill(pid, 9)
    os.waitpid(pid, 0)
'''


def _child_private_kib(mode: str) -> int:
    return int(_python(FORK_CHILD, mode).stdout.split()[-1])


def test_forked_child_stays_shared_through_its_own_full_collection():
    frozen = _child_private_kib("frozen")
    # Measured: ~1.4 MiB (stack, the pages every fresh child writes).  Without the
    # freeze the collection alone writes every preloaded object's GC header (~13 MiB).
    assert frozen < 6 * 1024, frozen
    thawed = _child_private_kib("thaw")
    assert thawed > frozen + 4 * 1024, (frozen, thawed)


# ---------------------------------------------------------------- glibc malloc

ARENAS = r'''
import ctypes, os, sys, threading
from postwell.master import daemon
print(daemon.limit_malloc_arenas(int(sys.argv[1])), flush=True)
pid = os.fork()       # the cap is inherited, as by the master's children
if pid == 0:
    gate = threading.Barrier(6)
    keep = []

    def work():
        gate.wait(timeout=10)
        keep.append([bytearray(1024) for _ in range(64)])   # glibc malloc, not pymalloc

    threads = [threading.Thread(target=work) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    ctypes.CDLL(None).malloc_stats()    # one "Arena N:" block per arena, on stderr
    os._exit(0)
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
'''


def _arenas(env_extra: dict, cap: int = 2) -> tuple[str, int]:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    env.update(env_extra)
    cp = _python(ARENAS, str(cap), env=env)
    return cp.stdout.strip(), cp.stderr.count("Arena ")


def test_master_caps_malloc_arenas_for_its_children():
    applied, arenas = _arenas({})
    if applied != "True":
        pytest.skip("no glibc mallopt")
    assert 1 <= arenas <= daemon.MALLOC_ARENAS


def test_malloc_arena_max_from_the_environment_wins():
    applied, arenas = _arenas({"MALLOC_ARENA_MAX": "1"}, cap=4)
    assert applied == "False"      # glibc already took the administrator's value
    assert arenas == 1


TRIM = r'''
from postwell.master import daemon

def anon_kib():
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("Anonymous:"):
                return int(line.split()[1])

# Freed chunks between live ones: glibc cannot shrink the heap's top, so they
# stay resident until trimmed (as the parse trees of modules compiled at start).
blocks = [bytearray(2048) for _ in range(16384)]
kept = blocks[::8]
del blocks
before = anon_kib()
assert daemon.release_free_heap()
print(before - anon_kib(), len(kept))
'''


def test_release_free_heap_returns_freed_pages():
    released, _ = map(int, _python(TRIM).stdout.split())
    # 14336 freed 2 KiB blocks, in runs of 14 KiB: most of their 28 MiB is whole pages.
    assert released > 8 * 1024, released


def test_preload_trims_the_heap_after_importing(monkeypatch):
    calls = []
    monkeypatch.setattr(daemon, "release_free_heap", lambda: calls.append(1) or True)
    monkeypatch.setattr(daemon, "_PRELOAD_STDLIB", ())
    import gc
    monkeypatch.setattr(gc, "freeze", lambda: None)   # not this test process's heap
    daemon.preload_modules()
    assert calls == [1]


# ---------------------------------------------------------------- what the master preloads

LAZY_SCAN = r"""
import ast, importlib.util, json, pathlib, sys
import postwell
from postwell.config.main import Config
from postwell.config.master import parse_master_cf
from postwell.master import daemon

root = pathlib.Path(postwell.__file__).parent
lazy = set()
for path in root.rglob("*.py"):
    part = path.relative_to(root).parts[0]
    if part in ("cli", "demo.py"):      # never run in a forked child
        continue
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for sub in ast.walk(node):
                if isinstance(sub, ast.Import):
                    lazy.update(a.name for a in sub.names)
                elif isinstance(sub, ast.ImportFrom) and sub.level == 0 and sub.module:
                    lazy.add(sub.module)
daemon.preload_modules()
before = sorted(n for n in ("argon2", "bcrypt", "email.mime.text", "email.policy", "shlex")
                if n in sys.modules)
daemon.preload_for_config(Config("/nonexistent", {}, {}, parse_master_cf(
    "submission inet n - n - - smtpd -o smtpd_sasl_auth_enable=yes\n")))
missing = []
for name in sorted(lazy):
    if name in sys.modules:
        continue
    try:
        available = importlib.util.find_spec(name) is not None
    except ImportError:
        available = False
    if available:
        missing.append(name)
print(json.dumps({"missing": missing, "before": before,
                  "sasl": [n for n in ("argon2", "bcrypt") if importlib.util.find_spec(n)]}))
"""


def test_every_lazy_import_of_a_child_is_preloaded_and_nothing_unused():
    """A child may not be able to read the Python installation after dropping
    privileges: every module a part imports inside a function must already be
    loaded by the master (a regression guard for the preload list)."""
    import json
    got = json.loads(_python(LAZY_SCAN).stdout)
    # ctypes.util: only where libc's symbols are not global (not glibc).
    assert [n for n in got["missing"] if n != "ctypes.util"] == []
    # Nothing is preloaded for MIME building (no part does it) nor for password
    # hashes unless some smtpd offers AUTH.
    assert got["before"] == []


def test_sasl_hash_modules_preloaded_only_when_auth_is_offered():
    cfg = Config("/nonexistent", {}, {}, parse_master_cf("smtp inet n - n - - smtpd\n"))
    assert not daemon.sasl_offered(cfg)
    assert daemon.sasl_offered(Config("/nonexistent", {"smtpd_sasl_auth_enable": "yes"}, {},
                                      parse_master_cf("smtp inet n - n - - smtpd\n")))
    assert daemon.sasl_offered(Config("/nonexistent", {}, {}, parse_master_cf(
        "smtp inet n - n - - smtpd\n"
        "submission inet n - n - - smtpd -o smtpd_sasl_auth_enable=yes\n")))
    assert not daemon.sasl_offered(Config("/nonexistent", {"smtpd_sasl_auth_enable": "yes"}, {},
                                          parse_master_cf(
        "smtp inet n - n - - smtpd -o smtpd_sasl_auth_enable=no\n")))


# ---------------------------------------------------------------- anvil on demand: the master

def _master(tmp_path, text=""):
    m = Master(str(tmp_path))
    m.log = NullLog("master")
    cfg = Config(str(tmp_path), {"queue_directory": str(tmp_path / "q")}, {}, parse_master_cf(text))
    m.config = cfg
    return m, cfg


def test_master_plans_anvil_on_demand_and_owns_its_socket(tmp_path):
    m, cfg = _master(tmp_path)
    slots = m._make_slots(cfg, {}, warn=True)
    anvil = next(s for s in slots if s.kind == "anvil")
    assert anvil.on_demand and anvil.nproc == 0 and anvil.svc.name == "anvil"
    m._listen_on_demand(slots, {})
    try:
        path = str(tmp_path / "q" / "private" / "anvil")
        assert anvil.listen_path == path and len(anvil.sockets) == 1
        assert oct(os.stat(path).st_mode & 0o777) == "0o600"
        spawned = []
        m._spawn = lambda slot: spawned.append(slot.kind) or slot.children.add(4242)
        m.slots = slots
        m._start_missing()
        assert "anvil" not in spawned            # nothing until an smtpd asks
        assert anvil.sockets[0].fileno() in m._on_demand_watch()
        anvil.children.add(4243)                 # running: it accepts by itself
        assert anvil.sockets[0].fileno() not in m._on_demand_watch()
    finally:
        m._cleanup()
    assert not os.path.exists(path)


def test_broken_anvil_gets_no_listener(tmp_path):
    m, cfg = _master(tmp_path, "anvil unix - - n - 1 anvil -x\n")
    slots = m._make_slots(cfg, {}, warn=True)
    anvil = next(s for s in slots if s.kind == "anvil")
    assert anvil.startup_error == "invalid option: x"
    assert not anvil.on_demand and anvil.nproc == 0
    m._listen_on_demand(slots, {})
    try:
        assert anvil.sockets == []
        assert not os.path.exists(tmp_path / "q" / "private" / "anvil")
    finally:
        m._cleanup()


# ---------------------------------------------------------------- anvil on demand: the child

ANVIL_CHILD = r"""
import socket, sys
from postwell import anvil
from postwell.config import load_config
sock = socket.socket(fileno=int(sys.argv[2]))          # the master's listener
anvil.serve(load_config(sys.argv[1]), sock=sock, max_idle=float(sys.argv[3]))
print("left", flush=True)
"""


@pytest.fixture
def on_demand_anvil(tmp_path):
    """The master's half in the test: it owns private/anvil; start(max_idle)
    runs the anvil child on that listener."""
    from postwell.delivery import helper
    qdir = tmp_path / "queue"
    (qdir / "private").mkdir(parents=True)
    etc = tmp_path / "etc"
    etc.mkdir()
    maillog = tmp_path / "maillog"
    (etc / "main.cf").write_text(f"queue_directory = {qdir}\nmaillog_file = {maillog}\n"
                                 "anvil_rate_time_unit = 1s\n")
    path = str(qdir / "private" / "anvil")
    listener, _ = helper.listen(path)
    procs = []

    def start(max_idle: float):
        fd = listener.fileno()
        p = subprocess.Popen([sys.executable, "-c", ANVIL_CHILD, str(etc), str(fd), str(max_idle)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             pass_fds=(fd,))
        procs.append(p)
        return p
    yield start, path, maillog
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(WAIT)
    listener.close()


def _client(path):
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.settimeout(WAIT)
    c.connect(path)
    return c


def _ask(c, line: bytes) -> bytes:
    c.sendall(line)
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = c.recv(512)
        assert chunk, buf
        buf += chunk
    return buf


def test_on_demand_anvil_answers_the_client_that_started_it(on_demand_anvil):
    """An smtpd connects before anvil runs (the master forks anvil on that
    connection): it waits in the listener's backlog and is served."""
    start, path, _ = on_demand_anvil
    c = _client(path)
    c.sendall(b"message smtp 192.0.2.7\n")
    proc = start(max_idle=0.1)
    assert _ask(c, b"recipient smtp 192.0.2.7\n") == b"ok 1\nok 1\n"
    c.close()
    assert proc.wait(WAIT) == 0


def test_on_demand_anvil_stays_while_an_smtpd_is_connected_then_leaves(on_demand_anvil):
    start, path, maillog = on_demand_anvil
    ino = os.stat(path).st_ino
    proc = start(max_idle=0.1)     # raised to anvil_rate_time_unit (1 s), as Postfix's
    c = _client(path)
    assert _ask(c, b"connect smtp 192.0.2.1\n") == b"ok 1 1\n"
    time.sleep(1.5)                # past max_idle and the time unit: a stream is open
    assert proc.poll() is None
    assert _ask(c, b"lookup smtp 192.0.2.1\n").startswith(b"ok 1 ")
    c.close()
    assert proc.wait(WAIT) == 0
    assert proc.stdout.readline() == "left\n"
    # The name is the master's: still there, the same socket.
    assert os.stat(path).st_ino == ino
    assert "statistics: max connection count 1 for (smtp:192.0.2.1)" in maillog.read_text()


def test_on_demand_anvil_does_not_leave_before_one_time_unit(on_demand_anvil):
    start, path, _ = on_demand_anvil
    t0 = time.monotonic()
    proc = start(max_idle=0.1)
    assert proc.wait(WAIT) == 0
    assert time.monotonic() - t0 >= 1.0
