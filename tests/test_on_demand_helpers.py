"""Memory (PSS), issue 8: the root delivery helpers (virtual, local, pipe) and
pickup run on demand, as Postfix's master runs its services.

The master owns each helper's unix socket under private/ (and pickup's FIFO
public/pickup), watches it while no process serves it and forks the service
when the qmgr connects (sendmail pokes the FIFO); the service leaves after
max_idle with nothing to do.  A request that arrives meanwhile waits in the
master's backlog (FIFO) for the next child, so no mail waits longer than a
fork.  The qmgr closes helper links idle for LINK_IDLE seconds, so the helper
never hangs up on a request already on its way.

Every wait here is bounded; sockets are unix sockets in private directories."""

from __future__ import annotations

import asyncio
import json
import os
import select
import signal
import socket
import stat
import subprocess
import sys
import threading
import time

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import harness  # noqa: E402

from postwell.config.main import Config  # noqa: E402
from postwell.config.master import parse_master_cf  # noqa: E402
from postwell.delivery import helper  # noqa: E402
from postwell.delivery.base import Recipient  # noqa: E402
from postwell.delivery.helper import HelperClient, HelperLinks, serve_unix_threaded  # noqa: E402
from postwell.log import NullLog  # noqa: E402
from postwell.master import daemon  # noqa: E402
from postwell.master.daemon import Master  # noqa: E402
from postwell.pickup import MaildropEnvelope, MaildropWriter, prepare_public  # noqa: E402
from postwell.queue import QueueStore  # noqa: E402

WAIT = 10.0


from test_local_perf import sockdir  # noqa: E402,F401  (a short socket directory)


def connect(path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(WAIT)
    s.connect(path)
    return s


def request(s, rid, qid="4ABC12345"):
    s.sendall(json.dumps({"id": rid, "queue_id": qid, "sender": "",
                          "recipients": [["a@example.test", None]]}).encode() + b"\n")


def reply(s) -> dict:
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = s.recv(65536)
        if not chunk:
            raise EOFError("helper closed the connection")
        buf += chunk
    return json.loads(buf)


def wait_until(pred, what, timeout=WAIT):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _rcpts():
    return [Recipient("u@example.test")]


# ------------------------------------------------------------ the master's listener

def test_listen_binds_a_private_socket_for_the_qmgr_only(sockdir):
    path = os.path.join(sockdir, "private", "virtual")
    me = os.getuid(), os.getgid()
    sock, ino = helper.listen(path, *me)
    try:
        st = os.lstat(path)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        assert (st.st_uid, st.st_gid) == me and st.st_ino == ino
        assert os.listdir(os.path.dirname(path)) == ["virtual"]     # no temporary name left
        # A stale socket of an earlier run is replaced.
        sock2, ino2 = helper.listen(path, *me)
        sock2.close()
        assert os.stat(path).st_ino == ino2 != ino
    finally:
        sock.close()


class Threaded:
    """serve_unix_threaded() on a listener the test owns (as the master), in a thread."""

    def __init__(self, path, listener, answer, max_idle):
        self.stop = threading.Event()
        self.errors = []

        def run():
            try:
                # Its own descriptor, as a forked child has: closing it leaves ours.
                serve_unix_threaded(path, answer, NullLog("local"), stop=self.stop,
                                    sock=listener.dup(), max_idle=max_idle)
            except BaseException as exc:  # noqa: BLE001 - reported by the test
                self.errors.append(exc)
        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def join(self, timeout=WAIT):
        self.thread.join(timeout)
        assert not self.thread.is_alive() and not self.errors, self.errors

    def finish(self):
        self.stop.set()
        self.join()


def test_threaded_helper_leaves_once_idle_and_the_backlog_waits_for_the_next(sockdir):
    path = os.path.join(sockdir, "local")
    listener, ino = helper.listen(path)
    try:
        srv = Threaded(path, listener, lambda req: [["sent", req["queue_id"]]], max_idle=0.3)
        c = connect(path)
        request(c, 1)
        assert reply(c) == {"id": 1, "results": [["sent", "4ABC12345"]]}
        time.sleep(1.0)              # an open (idle) qmgr link keeps the helper
        assert srv.thread.is_alive()
        request(c, 2, "4ABC00002")
        assert reply(c)["results"] == [["sent", "4ABC00002"]]
        c.close()
        srv.join()                   # no link left: it returns by itself ...
        assert os.stat(path).st_ino == ino   # ... and leaves the name to the master
        # A qmgr connecting now waits in the master's backlog ...
        waiting = connect(path)
        request(waiting, 3, "4ABC00003")
        waiting.settimeout(0.3)
        with pytest.raises(socket.timeout):
            waiting.recv(1)
        # ... until the next helper (the master forks it on that connection) answers.
        waiting.settimeout(WAIT)
        srv = Threaded(path, listener, lambda req: [["again", req["queue_id"]]], max_idle=0.3)
        assert reply(waiting) == {"id": 3, "results": [["again", "4ABC00003"]]}
        waiting.close()
        srv.join()
    finally:
        listener.close()


def test_adopted_listener_is_what_the_helper_serves(sockdir):
    """The master hands its socket to the helper child (adopt_listener); the
    helper's serve() then neither binds nor removes the name."""
    path = os.path.join(sockdir, "local")
    listener, ino = helper.listen(path)
    try:
        helper.adopt_listener(path, listener.dup(), 0.3)
        stop = threading.Event()
        t = threading.Thread(target=serve_unix_threaded,
                             args=(path, lambda req: [["ok"]], NullLog("local")),
                             kwargs={"stop": stop}, daemon=True)
        t.start()
        c = connect(path)
        request(c, 1)
        assert reply(c)["results"] == [["ok"]]
        c.close()
        t.join(WAIT)
        assert not t.is_alive()
        assert os.stat(path).st_ino == ino
        assert path not in helper._ADOPTED      # used once
    finally:
        helper._ADOPTED.pop(path, None)
        listener.close()


def test_stop_still_ends_an_on_demand_helper_at_once(sockdir):
    path = os.path.join(sockdir, "local")
    listener, _ = helper.listen(path)
    try:
        srv = Threaded(path, listener, lambda req: [["ok"]], max_idle=3600)
        time.sleep(0.1)
        t0 = time.monotonic()
        srv.finish()
        assert time.monotonic() - t0 < 5
        assert os.path.exists(path)
    finally:
        listener.close()


ASYNC_HELPER = r"""
import socket, sys
from postwell.delivery import helper
from postwell.log import NullLog

path, fd, idle = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])

async def handle(reader, writer):
    async def answer(req, parsed):
        return [["sent", req["queue_id"], TAG]]
    await helper.answer_requests(reader, writer, answer, NullLog("virtual"))

TAG = sys.argv[4]
helper.adopt_listener(path, socket.socket(fileno=fd), idle)
helper.serve_unix(path, handle)
"""


def _async_helper(path, listener, idle, tag):
    """serve_unix() in a process of its own (it owns the signals, as a child of
    the master), on a copy of the test's listener."""
    return subprocess.Popen([sys.executable, "-c", ASYNC_HELPER, path, str(listener.fileno()),
                             str(idle), tag], pass_fds=[listener.fileno()],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_asyncio_helper_leaves_once_idle_and_the_backlog_waits_for_the_next(sockdir):
    path = os.path.join(sockdir, "virtual")
    listener, ino = helper.listen(path)
    procs = []
    try:
        procs.append(_async_helper(path, listener, 0.5, "one"))
        c = connect(path)
        request(c, 1)
        assert reply(c) == {"id": 1, "results": [["sent", "4ABC12345", "one"]]}
        time.sleep(1.2)                      # an open link keeps it
        assert procs[0].poll() is None
        request(c, 2)
        assert reply(c)["results"] == [["sent", "4ABC12345", "one"]]
        c.close()
        assert procs[0].wait(WAIT) == 0, procs[0].stderr.read()
        assert os.stat(path).st_ino == ino
        waiting = connect(path)
        request(waiting, 3)
        procs.append(_async_helper(path, listener, 0.5, "two"))
        assert reply(waiting) == {"id": 3, "results": [["sent", "4ABC12345", "two"]]}
        waiting.close()
        assert procs[1].wait(WAIT) == 0, procs[1].stderr.read()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(WAIT)
        listener.close()


def test_asyncio_helper_stops_on_sigterm_and_leaves_the_name(sockdir):
    path = os.path.join(sockdir, "virtual")
    listener, _ = helper.listen(path)
    p = _async_helper(path, listener, 3600, "one")
    try:
        c = connect(path)
        request(c, 1)
        assert reply(c)["id"] == 1
        p.send_signal(signal.SIGTERM)
        assert p.wait(WAIT) == 0
        assert os.path.exists(path)          # the master's name stays
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(WAIT)
        listener.close()


# ------------------------------------------------------------ the qmgr side

def test_links_close_when_idle_so_the_helper_can_leave(sockdir):
    path = os.path.join(sockdir, "local")
    listener, _ = helper.listen(path)
    try:
        srv = Threaded(path, listener, lambda req: [["sent", req["queue_id"]]], max_idle=0.3)

        async def main():
            links = HelperLinks(path, size=2, link_idle=0.2)
            got = await asyncio.wait_for(asyncio.gather(
                links.deliver("4ABC00001", "", "h", _rcpts()),
                links.deliver("4ABC00002", "", "h", _rcpts())), WAIT)
            assert links._open == 2 and len(links._idle) == 2
            await asyncio.sleep(0.5)
            assert links._open == 0 and links._idle == []      # closed by the qmgr side
            # The helper leaves; a later delivery waits for the next one.
            await asyncio.get_running_loop().run_in_executor(None, srv.join)
            nxt = Threaded(path, listener, lambda req: [["next", req["queue_id"]]], max_idle=0.3)
            more = await asyncio.wait_for(links.deliver("4ABC00003", "", "h", _rcpts()), WAIT)
            links.close()
            return got, more, nxt
        got, more, nxt = asyncio.run(main())
        assert [r[0][1] for r in got] == ["4ABC00001", "4ABC00002"]
        assert more == [["next", "4ABC00003"]]
        nxt.join()
    finally:
        listener.close()


def test_links_in_use_are_kept_busy_links_are_not_closed(sockdir):
    path = os.path.join(sockdir, "local")
    release = threading.Event()

    def slow(req):
        release.wait(WAIT)
        return [["sent"]]
    listener, _ = helper.listen(path)
    try:
        srv = Threaded(path, listener, slow, max_idle=0.2)

        async def main():
            links = HelperLinks(path, size=1, link_idle=0.1)
            task = asyncio.ensure_future(links.deliver("4ABC00001", "", "h", _rcpts()))
            await asyncio.sleep(0.6)          # longer than link_idle and max_idle
            assert srv.thread.is_alive() and not task.done()
            release.set()
            got = await asyncio.wait_for(task, WAIT)
            links.close()
            return got
        assert asyncio.run(main()) == [["sent"]]
        srv.join()
    finally:
        listener.close()


def test_single_link_client_closes_when_idle_and_reconnects(sockdir):
    """HelperClient (virtual and pipe): one connection, closed after
    link_idle with nothing in flight; the next request opens a new one."""
    path = os.path.join(sockdir, "virtual")
    listener, _ = helper.listen(path)
    try:
        srv = Threaded(path, listener, lambda req: [["sent", req["queue_id"]]], max_idle=0.3)

        async def main():
            client = HelperClient(path, link_idle=0.2)
            a = await asyncio.wait_for(client.deliver("4ABC00001", "", "h", _rcpts()), WAIT)
            b = await asyncio.wait_for(client.deliver("4ABC00002", "", "h", _rcpts()), WAIT)
            first = client._writer
            await asyncio.sleep(0.5)
            assert client._writer is None and first.is_closing()
            await asyncio.get_running_loop().run_in_executor(None, srv.join)
            nxt = Threaded(path, listener, lambda req: [["next", req["queue_id"]]], max_idle=0.3)
            c = await asyncio.wait_for(client.deliver("4ABC00003", "", "h", _rcpts()), WAIT)
            # The old connection's reader has finished by now: it must not have
            # dropped the new one.
            await asyncio.sleep(0.05)
            assert client._writer is not None and not client._writer.is_closing()
            d = await asyncio.wait_for(client.deliver("4ABC00004", "", "h", _rcpts()), WAIT)
            client._writer.close()
            return [a, b, c, d], nxt
        got, nxt = asyncio.run(main())
        assert got == [[["sent", "4ABC00001"]], [["sent", "4ABC00002"]],
                       [["next", "4ABC00003"]], [["next", "4ABC00004"]]]
        nxt.join()
    finally:
        listener.close()


def test_single_link_client_reconnect_right_after_idle_close(sockdir):
    """The idle close and the next request in the same loop turn: the old
    reader task's end (EOF) must not fail or clear the new connection."""
    path = os.path.join(sockdir, "virtual")
    srv_stop = threading.Event()
    t = threading.Thread(target=serve_unix_threaded,
                         args=(path, lambda req: [["sent", req["queue_id"]]], NullLog("v")),
                         kwargs={"stop": srv_stop}, daemon=True)
    t.start()
    wait_until(lambda: os.path.exists(path), "helper socket")
    try:
        async def main():
            client = HelperClient(path, link_idle=30)
            await asyncio.wait_for(client.deliver("4ABC00001", "", "h", _rcpts()), WAIT)
            client._last -= 60
            client._close_idle()              # as the timer would
            got = await asyncio.wait_for(client.deliver("4ABC00002", "", "h", _rcpts()), WAIT)
            await asyncio.sleep(0.1)          # the old reader sees its EOF
            again = await asyncio.wait_for(client.deliver("4ABC00003", "", "h", _rcpts()), WAIT)
            client._writer.close()
            return got, again
        got, again = asyncio.run(main())
        assert got == [["sent", "4ABC00002"]] and again == [["sent", "4ABC00003"]]
    finally:
        srv_stop.set()
        try:
            connect(path).close()
        except OSError:
            pass
        t.join(WAIT)


# ------------------------------------------------------------ pickup on demand

@pytest.fixture
def pickup_env(tmp_path):
    root = harness.instance_root(tmp_path, "odpickup")
    etc = root / "etc"
    etc.mkdir()
    q = root / "queue"
    (etc / "main.cf").write_text(
        f"queue_directory = {q}\nmaillog_file = {root / 'maillog'}\n"
        "myhostname = mx.example.com\nmydomain = example.com\nmyorigin = example.com\n")
    QueueStore(str(q)).ensure_layout()
    fifo = prepare_public(str(q))
    fd = os.open(fifo, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)    # the master's copy
    yield root, fd
    os.close(fd)


def _drop(root) -> str:
    w = MaildropWriter(str(root / "queue" / "maildrop"))
    w.open()
    w.write(b"Subject: on demand\n\nbody\n")
    return w.finish(MaildropEnvelope(sender="alice", recipients=["bob@example.org"]))


PICKUP = r"""
import sys
from postwell.config import load_config
from postwell.pickup import service
service.serve(load_config(sys.argv[1]), fifo_fd=int(sys.argv[2]), max_idle=float(sys.argv[3]))
"""


def _pickup(root, fd, idle):
    return subprocess.Popen([sys.executable, "-c", PICKUP, str(root / "etc"), str(fd), str(idle)],
                            pass_fds=[fd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _readable(fd) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


def test_pickup_on_the_masters_fifo_queues_then_leaves_when_idle(pickup_env):
    root, fd = pickup_env
    store = QueueStore(str(root / "queue"))
    _drop(root)
    os.write(fd, b"W")                         # sendmail's poke
    p = _pickup(root, fd, 0.5)
    try:
        # queued, then (durable) removed from maildrop/
        wait_until(lambda: len(store.scan("incoming")) == 1 and not [
            n for n in os.listdir(root / "queue" / "maildrop") if not n.startswith(".")],
            "the message queued")
        wait_until(lambda: not _readable(fd), "the poke taken")
        assert p.wait(WAIT) == 0, p.stderr.read()
        # The FIFO is the master's: it is still there, still the same.
        assert stat.S_ISFIFO(os.stat(root / "queue" / "public" / "pickup").st_mode)
        # A poke while no pickup runs stays in the FIFO for the master to see.
        os.write(fd, b"W")
        assert _readable(fd)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(WAIT)


def test_pickup_pokes_keep_it_and_sigterm_ends_it(pickup_env):
    root, fd = pickup_env
    store = QueueStore(str(root / "queue"))
    p = _pickup(root, fd, 3.0)
    try:
        for i in range(3):                     # activity more often than max_idle
            time.sleep(0.5)
            _drop(root)
            os.write(fd, b"W")
            wait_until(lambda: len(store.scan("incoming")) == i + 1, "the message queued")
        assert p.poll() is None
        p.send_signal(signal.SIGTERM)
        assert p.wait(WAIT) == 0, p.stderr.read()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(WAIT)


# ------------------------------------------------------------ the master's plan

def _master(tmp_path, text):
    m = Master(str(tmp_path))
    m.log = NullLog("master")
    m.owner = (os.getuid(), os.getgid(), "me")     # as if root: privileged helpers are planned
    cfg = Config(str(tmp_path), {"queue_directory": str(tmp_path / "q")}, {}, parse_master_cf(text))
    m.config = cfg
    return m, cfg


# No wakeup for pickup: on demand (a wakeup under max_idle keeps it resident).
MASTER_CF = ("pickup unix n - n - 1 pickup\n"
             "maildrop unix - n n - - pipe flags=DRhu user=vmail argv=/bin/true\n")


def test_master_plans_helpers_and_pickup_on_demand(tmp_path):
    m, cfg = _master(tmp_path, MASTER_CF)
    slots = m._make_slots(cfg, {}, warn=True)
    od = {s.kind: s for s in slots if s.on_demand}
    assert sorted(od) == ["anvil", "helper", "localhelper", "pickup", "pipehelper", "showq"]
    assert all(s.nproc == 0 and not s.sockets for s in od.values())
    spawned = []

    def spawn(slot):
        spawned.append(slot)
        slot.children.add(1000 + len(spawned))
    m._spawn = spawn
    m.slots = slots
    m._start_missing()
    assert sorted(s.kind for s in spawned) == ["qmgr"]   # nothing else until asked


@pytest.mark.parametrize("wakeup, idle, on_demand", [
    ("60", None, False),     # stock line: Postfix's wakeup keeps pickup running for good
    ("60?", None, False),
    ("-", None, True),       # no wakeup: it leaves after max_idle, a poke starts it again
    ("0", None, True),
    ("300", None, True),     # wakeup longer than max_idle (100 s)
    ("60", "30s", True),
])
def test_pickup_is_on_demand_as_postfix_wakeup_and_max_idle_make_it(tmp_path, wakeup, idle, on_demand):
    m, _ = _master(tmp_path, "")
    params = {"queue_directory": str(tmp_path / "q")}
    if idle:
        params["max_idle"] = idle
    cfg = Config(str(tmp_path), params, {}, parse_master_cf(f"pickup unix n - n {wakeup} 1 pickup\n"))
    [pk] = [s for s in m._make_slots(cfg, {}, warn=True) if s.kind == "pickup"]
    assert pk.on_demand is on_demand and pk.nproc == (0 if on_demand else 1)


def test_master_listens_for_the_helpers_and_keeps_the_pickup_fifo(tmp_path):
    m, cfg = _master(tmp_path, MASTER_CF)
    QueueStore(str(tmp_path / "q")).ensure_layout()
    m.slots = [s for s in m._make_slots(cfg, {}, warn=True) if s.on_demand]
    m._listen_on_demand(m.slots, {})
    new = []
    try:
        by = {s.kind: s for s in m.slots}
        q = tmp_path / "q"
        for kind, name in (("helper", "virtual"), ("localhelper", "local"), ("pipehelper", "pipe")):
            st = os.lstat(q / "private" / name)
            assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
            assert by[kind].listen_path == str(q / "private" / name) and len(by[kind].sockets) == 1
        fifo = q / "public" / "pickup"
        assert stat.S_ISFIFO(os.stat(fifo).st_mode) and stat.S_IMODE(os.stat(fifo).st_mode) == 0o622
        watch = m._on_demand_watch()
        assert sorted(s.kind for s in watch.values()) == sorted(by)
        # A poke (or a connection) is what the loop sees; a running child takes over.
        poke = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.write(poke, b"W")
        os.close(poke)
        fd = by["pickup"].sockets[0].fileno()
        assert select.select([fd], [], [], 0)[0] == [fd]
        by["pickup"].children.add(4242)
        assert by["pickup"] not in m._on_demand_watch().values()
        by["pickup"].children.clear()
        # After a reload the new pickup waits for the old one to exit.
        m.children[4343] = daemon.Child(4343, by["pickup"], time.monotonic())
        by["pickup"].blocked_by = {4343}
        assert by["pickup"] not in m._on_demand_watch().values()
        del m.children[4343]
        assert by["pickup"] in m._on_demand_watch().values()
        # A reload keeps every listener (same objects, same names).
        new = [s for s in m._make_slots(cfg, {}, warn=True) if s.on_demand]
        old = {s.listen_path: s for s in m.slots}
        m._listen_on_demand(new, old)
        for s in new:
            assert s.sockets == by[s.kind].sockets
        paths = [s.listen_path for s in new]
    finally:
        for s in m.slots + new:
            m._close_listener(s)
        for s in m.slots:
            for sock in s.sockets:
                sock.close()
    # On stop the sockets go; the FIFO stays for sendmail (it pokes it while we are down).
    assert [p for p in paths if os.path.exists(p)] == [str(fifo)]


def test_master_starts_pickup_when_maildrop_has_mail(tmp_path, monkeypatch):
    m, cfg = _master(tmp_path, MASTER_CF)
    QueueStore(str(tmp_path / "q")).ensure_layout()
    m.slots = m._make_slots(cfg, {}, warn=True)
    [pk] = [s for s in m.slots if s.kind == "pickup"]
    spawned = []
    m._spawn = spawned.append
    clock = [1000.0]
    # daemon's own name for the module only: the process-wide clock stays real.
    monkeypatch.setattr(daemon, "time", type("Clock", (), {"monotonic": staticmethod(lambda: clock[0])}))
    md = tmp_path / "q" / "maildrop"
    m._check_maildrop()
    assert spawned == [] and m._maildrop_due == 1060.0     # pickup's wakeup, 60 s
    (md / ".tmp-in-progress").write_bytes(b"x")            # sendmail still writing
    clock[0] = 1061.0
    m._check_maildrop()
    assert spawned == []
    (md / "0123456789abcdef0123456789abcdef").write_bytes(b"x")
    clock[0] = 1100.0
    m._check_maildrop()
    assert spawned == []                                   # not due yet
    clock[0] = 1121.0
    pk.children.add(77)
    m._check_maildrop()
    assert spawned == []                                   # running: it scans by itself
    pk.children.clear()
    m._maildrop_due = 0.0                                  # as _reap does when pickup exits
    m._check_maildrop()
    assert spawned == [pk]


def test_master_looks_into_maildrop_when_pickup_exits(tmp_path, monkeypatch):
    m, cfg = _master(tmp_path, MASTER_CF)
    m.slots = m._make_slots(cfg, {}, warn=True)
    [pk] = [s for s in m.slots if s.kind == "pickup"]
    m.children[4545] = daemon.Child(4545, pk, time.monotonic())
    pk.children.add(4545)
    m._maildrop_due = 1e12
    statuses = [(4545, 0), (0, 0)]
    monkeypatch.setattr(os, "waitpid", lambda pid, flags: statuses.pop(0))
    m._reap()
    assert not pk.children and m._maildrop_due == 0.0
    assert not [line for line in m.log.lines if "warning" in line]   # an idle exit is no error
    # A pickup that crashed is not started again at once for the same file
    # (the next poke or wakeup interval does it): no respawn loop.
    m.children[4646] = daemon.Child(4646, pk, time.monotonic() - 5)
    pk.children.add(4646)
    m._maildrop_due = 1e12
    statuses[:] = [(4646, 1 << 8), (0, 0)]
    m._reap()
    assert not pk.children and m._maildrop_due == 1e12
    assert any("exit status 1" in line for line in m.log.lines)


# ------------------------------------------------------------ a running instance

def _kids(inst):
    return [p for p in inst.processes() if p != inst.master_pid()]


def _uid(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            return int([line for line in f if line.startswith("Uid:")][0].split()[1])
    except (OSError, IndexError):
        return None


def _gone(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


@pytest.mark.skipif(not harness.is_root(), reason="the helpers exist only under a root master")
def test_running_instance_starts_pickup_and_helper_only_when_mail_comes(tmp_path):
    box = 65534      # a mailbox owner other than mail_owner: only the root helper writes as it
    inst = harness.PostwellInstance(
        tmp_path, {"max_idle": "2s", "service_throttle_time": "1s",
                   "virtual_uid_maps": f"static:{box}", "virtual_gid_maps": f"static:{box}"},
        master_cf=None)
    # no wakeup for pickup: on demand (see pickup_on_demand)
    inst.master_cf = inst.default_master_cf() + "pickup    unix  n       -       n       -       1       pickup\n"
    inst.write_config()
    os.chown(inst.mail_dir, box, box)
    inst.start()
    try:
        q = inst.queue_dir
        private = [q / "private" / "virtual", q / "private" / "local"]
        wait_until(lambda: all(os.path.exists(p) for p in private), "helper sockets")
        time.sleep(0.5)
        idle = set(_kids(inst))
        # 2 smtpd workers, qmgr: no root helper, no anvil, no pickup while nothing happens
        assert len(idle) == 3 and all(_uid(p) == inst.uid for p in idle)
        inos = [os.stat(p).st_ino for p in private]

        def submit(n):
            cp = inst.run("sendmail", "-f", "alice@example.test", f"bob@{harness.VIRTUAL_DOMAIN}",
                          input=f"Subject: on demand {n}\n\nhello\n")
            assert cp.returncode == 0, cp.stderr
            inst.wait_maildir("bob", n, timeout=20)

        submit(1)
        st = os.stat(inst.maildir_messages("bob")[0])
        assert (st.st_uid, st.st_gid) == (box, box)
        extra = set(_kids(inst)) - idle
        # pickup (mail_owner) and the virtual helper (root, with its worker that
        # became the mailbox owner) were started for it
        # (pickup may already have left again on a slow machine: max_idle after
        # its last message; the helper stays longer, the qmgr's link idles first)
        uids = [_uid(p) for p in extra]
        assert uids.count(0) == 1 and set(uids) <= {0, inst.uid, box}
        # The mailbox file is there before the qmgr logs the delivery line.
        inst.wait_log(r"postfix/virtual\[\d+\]: \w+: to=<bob@", timeout=20)
        assert "postfix/pickup[" in inst.log_text()
        # max_idle later both are gone again, with no warning.
        wait_until(lambda: set(p for p in _kids(inst) if not _gone(p)) == idle, "idle tree", 20)
        assert "warning" not in inst.log_text() and "fatal" not in inst.log_text()

        # A helper that dies is started again by the next delivery.
        submit(2)
        [root_helper] = [p for p in _kids(inst) if _uid(p) == 0 and not _gone(p)]
        time.sleep(1.2)          # past start-up (a death at start-up throttles the service)
        os.kill(root_helper, signal.SIGKILL)
        wait_until(lambda: _gone(root_helper), "helper killed")
        submit(3)
        assert f"pid {root_helper} killed by signal 9" in inst.log_text()

        # reload keeps the master's sockets; mail still flows through new children
        assert inst.cli("reload").returncode == 0
        inst.wait_log(r"reload -- version")
        assert [os.stat(p).st_ino for p in private] == inos
        submit(4)
        inst.stop()
        # The sockets go with the master; the FIFO stays for sendmail's pokes.
        assert not any(os.path.exists(p) for p in private)
        assert stat.S_ISFIFO(os.stat(q / "public" / "pickup").st_mode)
    finally:
        inst.stop()
        inst.cleanup()
