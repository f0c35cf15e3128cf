"""Memory (PSS) of the running tree, issue 8: what the master does so the
process tree stays small.

- showq(8) runs on demand, as Postfix's master runs it: the master listens on
  public/showq and forks a showq child when a client connects; the child
  leaves after max_idle seconds without a request.  A quiet system has no
  showq process.
- The master preloads only modules some child can use (their pages are
  shared by every child, but they still count once in the tree's PSS).
- The master freezes its heap right before every fork, so a child's
  collector never walks (and so copies) the master's objects.
"""

from __future__ import annotations

import gc
import os
import socket
import subprocess
import sys
import threading
import time
import weakref

import pytest

from postwell import showq
from postwell.config import load_config
from postwell.config.main import Config
from postwell.config.master import parse_master_cf
from postwell.log import NullLog
from postwell.master.daemon import Master, Slot
from postwell.queue import QueueStore

sys.path.insert(0, os.path.dirname(__file__))

import harness  # noqa: E402

WAIT = 10.0


@pytest.fixture
def env(tmp_path):
    qdir = tmp_path / "queue"
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "main.cf").write_text(f"queue_directory = {qdir}\nmaillog_file = {tmp_path / 'maillog'}\n"
                                 "myhostname = mx.example.test\n")
    store = QueueStore(str(qdir))
    store.ensure_layout()
    return store, load_config(str(etc))


def put(store, sender="s@x.test", rcpt="r@far.test"):
    m = store.create()
    m.set_sender(sender)
    m.add_recipient(rcpt)
    m.write(b"Subject: t\n\nbody\n")
    m.commit()
    store.move(m.queue_id, "incoming", "deferred")
    return m.queue_id


class OnDemand:
    """showq.serve() on a listener the test owns (as the master does), in a thread."""

    def __init__(self, config, sock, max_idle):
        self.stop = threading.Event()
        self.errors = []
        self.thread = threading.Thread(target=self._run, args=(config, sock, max_idle), daemon=True)
        self.thread.start()

    def _run(self, config, sock, max_idle):
        try:
            showq.serve(config, self.stop, sock=sock, max_idle=max_idle)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.errors.append(exc)

    def finish(self):
        self.stop.set()
        self.thread.join(WAIT)
        assert not self.thread.is_alive() and not self.errors, self.errors


def test_on_demand_showq_answers_then_leaves_when_idle(env):
    store, cfg = env
    qid = put(store)
    path = showq.socket_path(cfg)
    sock, ino = showq.listen(path)
    try:
        svc = OnDemand(cfg, sock, max_idle=0.3)
        got = list(showq.query(store.queue_directory, timeout=WAIT))
        assert [m["queue_id"] for m in got] == [qid]
        # Nothing more to do: the child returns by itself ...
        svc.thread.join(WAIT)
        assert not svc.thread.is_alive() and not svc.errors
        # ... and leaves the name to its owner, the master.
        assert os.stat(path).st_ino == ino
        # A client that connects while no showq runs waits in the backlog; the
        # next child (started by the master on that connection) answers it.
        waiting = []
        client = threading.Thread(
            target=lambda: waiting.append(list(showq.query(store.queue_directory, timeout=WAIT))),
            daemon=True)
        client.start()
        time.sleep(0.2)
        assert not waiting
        svc = OnDemand(cfg, sock, max_idle=0.3)
        client.join(WAIT)
        assert [m["queue_id"] for m in waiting[0]] == [qid]
        svc.finish()
    finally:
        sock.close()
        os.unlink(path)


def test_on_demand_showq_stays_while_a_request_is_in_progress(env):
    store, cfg = env
    qid = put(store)
    path = showq.socket_path(cfg)
    sock, _ = showq.listen(path)
    try:
        svc = OnDemand(cfg, sock, max_idle=0.3)
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.settimeout(WAIT)
        c.connect(path)
        time.sleep(1.0)            # longer than max_idle, request not sent yet
        assert svc.thread.is_alive()
        c.sendall(showq.REQUEST)
        frames = showq._Frames(c)
        first = frames.next()
        assert qid.encode() in first
        c.close()
        svc.thread.join(WAIT)
        assert not svc.thread.is_alive() and not svc.errors
    finally:
        sock.close()
        os.unlink(path)


def test_stop_event_ends_an_on_demand_showq_at_once(env):
    _, cfg = env
    path = showq.socket_path(cfg)
    sock, _ = showq.listen(path)
    try:
        svc = OnDemand(cfg, sock, max_idle=3600)
        time.sleep(0.1)
        t0 = time.monotonic()
        svc.finish()
        assert time.monotonic() - t0 < 5
        assert os.path.exists(path)   # the master's name: not the child's to remove
    finally:
        sock.close()
        os.unlink(path)


def test_master_plans_showq_on_demand(tmp_path):
    m = Master(str(tmp_path))
    m.log = NullLog("master")
    cfg = Config(str(tmp_path), {"queue_directory": str(tmp_path / "q")}, {},
                 parse_master_cf("qmgr unix n - n 300 1 qmgr\n"))
    slots = m._make_slots(cfg, {}, warn=True)
    [sq] = [s for s in slots if s.kind == "showq"]
    assert sq.on_demand and sq.nproc == 0 and not sq.sockets
    spawned = []
    m._spawn = spawned.append
    m.slots = [sq]
    m._start_missing()
    assert spawned == []        # nothing until a client connects
    # Listening: the socket is watched only while the service has no process.
    os.makedirs(tmp_path / "q" / "public")
    m._listen_on_demand(m.slots, {})
    try:
        assert sq.listen_path == showq.socket_path(cfg) and len(sq.sockets) == 1
        assert list(m._on_demand_watch().values()) == [sq]
        sq.children.add(12345)
        assert m._on_demand_watch() == {}
        sq.children.clear()
        sq.throttled_until = time.monotonic() + 60
        assert m._on_demand_watch() == {}
        sq.throttled_until = 0.0
        # A reload with the same name keeps the listener (a waiting client is not lost).
        new = [s for s in m._make_slots(cfg, {}, warn=True) if s.kind == "showq"]
        old_sock, path = sq.sockets[0], sq.listen_path
        m._listen_on_demand(new, {path: sq})
        assert new[0].sockets == [old_sock] and new[0].listen_path == path
        assert os.path.exists(path)
    finally:
        for s in m.slots + new:
            m._close_listener(s)
        old_sock.close()
    assert not os.path.exists(path)


def test_master_preload_leaves_out_what_no_child_uses():
    code = ("import sys\n"
            "from postwell.master import daemon\n"
            "daemon.preload_modules()\n"
            "print(sorted(m for m in ('multiprocessing', 'uuid', 'mimetypes') if m in sys.modules))\n"
            "print('postwell.showq' in sys.modules, 'asyncio' in sys.modules)\n")
    cp = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout.split("\n")[:2] == ["[]", "True True"]


def test_master_freezes_its_heap_right_before_each_fork(tmp_path, monkeypatch):
    class Cycle:
        pass
    m = Master(str(tmp_path))
    slot = m._make_slots(Config(str(tmp_path), {}, {}, parse_master_cf("")), {}, warn=False)[0]
    seen = []

    def fake_fork():
        # At the fork: a cycle made since the last freeze is collected (not kept
        # for good), and every object left is frozen (the child's collector skips it).
        seen.append((gc.get_count()[0], gone()))
        return 4242
    monkeypatch.setattr(os, "fork", fake_fork)
    gc.unfreeze()
    a = Cycle()
    a.self = a
    gone = weakref.ref(a)
    del a
    assert gone() is not None   # only the collector can free a cycle
    try:
        m._spawn(slot)
    finally:
        gc.unfreeze()
    [(young, cycle)] = seen
    assert cycle is None and young < 50
    assert m.children[4242].slot is slot


def _children(inst):
    return [p for p in inst.processes() if p != inst.master_pid()]


@pytest.mark.skipif(not harness.is_root(), reason="the instance runs its children as mail_owner")
def test_running_instance_starts_showq_only_when_asked(tmp_path):
    inst = harness.PostwellInstance(tmp_path, {"max_idle": "1s"})
    inst.start()
    try:
        path = os.path.join(inst.queue_dir, "public", "showq")
        assert harness.wait_for(lambda: os.path.exists(path), WAIT, 0.05, "public/showq")
        time.sleep(0.5)
        idle = set(_children(inst))
        ino = os.stat(path).st_ino
        # The first client starts showq (as mail_owner); it answers.
        assert list(showq.query(str(inst.queue_dir), timeout=WAIT)) == []
        extra = set(_children(inst)) - idle
        assert len(extra) == 1
        [child] = extra
        with open(f"/proc/{child}/status") as f:
            uid = [line for line in f if line.startswith("Uid:")][0].split()[1]
        assert uid == str(inst.uid)
        # max_idle later it is gone again, without a warning in the log.
        harness.wait_for(lambda: not harness.pid_alive(child) or _zombie(child), WAIT, 0.1, "showq exit")
        harness.wait_for(lambda: set(_children(inst)) == idle, WAIT, 0.1, "idle tree")
        # A reload keeps the listener; the next client starts a new showq.
        assert inst.cli("reload").returncode == 0
        harness.wait_for(lambda: "reload -- version" in inst.log_text(), WAIT, 0.05, "reload")
        assert os.stat(path).st_ino == ino
        assert list(showq.query(str(inst.queue_dir), timeout=WAIT)) == []
        log = inst.log_text()
        assert "warning" not in log and "fatal" not in log
    finally:
        inst.stop()
        inst.cleanup()
    assert not os.path.exists(path)


def _zombie(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


# ---------------------------------------------------------------- anvil without an event loop

class AnvilProcess:
    """anvil.serve() in its own interpreter (it owns the signals, as in a child of the master)."""

    def __init__(self, tmp_path):
        qdir = tmp_path / "queue"
        (qdir / "private").mkdir(parents=True)
        etc = tmp_path / "etc"
        etc.mkdir()
        self.maillog = tmp_path / "maillog"
        (etc / "main.cf").write_text(f"queue_directory = {qdir}\nmaillog_file = {self.maillog}\n")
        self.path = str(qdir / "private" / "anvil")
        code = ("import sys\nfrom postwell import anvil\nfrom postwell.config import load_config\n"
                "anvil.serve(load_config(sys.argv[1]), ready=lambda: print('ready', flush=True))\n")
        self.proc = subprocess.Popen([sys.executable, "-c", code, str(etc)], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline() == "ready\n", self.proc.stderr.read()

    def client(self):
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.settimeout(WAIT)
        c.connect(self.path)
        return c

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
        self.proc.wait(WAIT)


def _lines(c, n):
    buf = b""
    while buf.count(b"\n") < n:
        chunk = c.recv(65536)
        if not chunk:
            break
        buf += chunk
    return buf.split(b"\n")[:n]


@pytest.fixture
def anvil_proc(tmp_path):
    a = AnvilProcess(tmp_path)
    yield a
    a.stop()


def test_anvil_answers_pipelined_and_split_requests_in_order(anvil_proc):
    c = anvil_proc.client()
    c.sendall(b"connect smtp 1.2.3.4\nconnect smtp 1.2.3.4\nmessage smtp 1.2.3.4\nlook")
    time.sleep(0.05)
    c.sendall(b"up smtp 1.2.3.4\n")
    assert _lines(c, 4) == [b"ok 1 1", b"ok 2 2", b"ok 1", b"ok 2 2 1 0 0 0"]
    c.sendall(b"disconnect smtp 1.2.3.4\nlookup smtp 1.2.3.4\n")   # disconnect has no reply
    assert _lines(c, 1) == [b"ok 1 2 1 0 0 0"]
    c.close()


def test_anvil_releases_what_a_gone_worker_held(anvil_proc):
    a, b = anvil_proc.client(), anvil_proc.client()
    a.sendall(b"connect smtp 10.0.0.1\nconnect smtp 10.0.0.1\n")
    assert _lines(a, 2) == [b"ok 1 1", b"ok 2 2"]
    a.close()
    assert harness.wait_for(lambda: (b.sendall(b"lookup smtp 10.0.0.1\n"), _lines(b, 1))[1][0]
                            .startswith(b"ok 0 "), WAIT, 0.05, "release")
    b.close()


def test_anvil_drops_a_bad_request_and_a_client_that_never_reads(anvil_proc):
    bad = anvil_proc.client()
    bad.sendall(b"frobnicate\n")
    assert _lines(bad, 1) == [b"error bad request"]
    assert bad.recv(100) == b""          # closed after the error
    bad.close()
    # A client that writes and never reads costs at most MAX_PENDING of replies,
    # then it is dropped; others are answered all along.
    deaf = anvil_proc.client()
    other = anvil_proc.client()
    deaf.settimeout(2.0)
    line = b"lookup smtp 10.9.9.9\n"
    dropped = False
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        try:
            deaf.sendall(line * 4096)
        except (BrokenPipeError, ConnectionResetError):
            dropped = True
            break
        except socket.timeout:
            pass
        other.sendall(b"lookup smtp 10.9.9.9\n")
        assert _lines(other, 1) == [b"ok 0 0 0 0 0 0"]
    assert dropped
    deaf.close()
    other.close()


def test_anvil_stops_on_sigterm_logs_statistics_and_removes_its_socket(anvil_proc):
    c = anvil_proc.client()
    c.sendall(b"connect smtp 1.2.3.4\n")
    assert _lines(c, 1) == [b"ok 1 1"]
    anvil_proc.proc.terminate()
    assert anvil_proc.proc.wait(WAIT) == 0
    assert not os.path.exists(anvil_proc.path)
    log = anvil_proc.maillog.read_text()
    assert "statistics: max connection rate 1/60s for (smtp:1.2.3.4)" in log
    assert "statistics: max connection count 1 for (smtp:1.2.3.4)" in log
    c.close()


def test_master_builds_what_children_share_before_the_first_fork(tmp_path):
    m = Master(str(tmp_path))
    m.log = NullLog("master")
    cfg = Config(str(tmp_path), {}, {}, parse_master_cf(""))
    smtpd = Slot("smtpd", None, cfg, [], 2, key=("smtpd",))
    m.slots = [Slot("anvil", None, cfg, [], 1, key=("anvil",)), smtpd,
               Slot("qmgr", None, cfg, [], 1, key=("qmgr",))]
    events = []
    m._smtpd_preload = lambda slot: events.append(("preload", slot.kind)) or {"ctx": 1}

    def fake_spawn(slot):
        events.append(("fork", slot.kind))
        slot.children.add(len(events))
    m._spawn = fake_spawn
    m._start_missing()
    assert events == [("preload", "smtpd"), ("fork", "anvil"), ("fork", "smtpd"), ("fork", "smtpd"),
                      ("fork", "qmgr")]
    assert smtpd.preloaded == {"ctx": 1}
