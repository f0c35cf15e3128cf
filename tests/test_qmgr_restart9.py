"""H11: a broken transport ends the qmgr as Postfix's does, and the side logs
(defer/, bounce/) never outlive their message unnoticed.

Side by side with Postfix 3.7 (a transport whose master.cf service dies of
its -o, a short daemon_timeout): the qmgr logs "fatal: timeout connecting to
transport: xyz", exits 1 a second later ("warning: process .../qmgr pid N
exit status 1", no throttling: it ran longer than a start-up), and no qmgr
runs until the service is triggered -- new mail poking public/qmgr, or the
qmgr's wakeup timer (master.cf, 300 s) -- after which the new qmgr logs the
held message's "(queue active)" line again.  The mail stays in active/.

Queue ids are microseconds + inode, and inodes come back through spare/: a
log left without its message would be a later message's if nobody removed it.
remove() takes the logs before the file, the qmgr sweeps orphans at start-up
and takes back what it logged for a message deleted under it; create() still
removes a leftover log of its new id, because orphans also arise while smtpds
create (postsuper -r keeps the log, pickup frees the file's inode).
"""

import asyncio
import os
import select
import time
from types import SimpleNamespace

import pytest

from postwell.config.main import Config
from postwell.config.master import MasterService
from postwell.delivery.base import DeliveryAgent, RecipientResult
from postwell.log import NullLog
from postwell.master import daemon
from postwell.master.daemon import Master, Slot
from postwell.qmgr.manager import QueueManager
from postwell.queue import QueueStore


class FakeClock:
    def __init__(self, t=1_800_000_000.25):
        self.t = t

    def __call__(self):
        return self.t


class Resolver:
    def resolve(self, address):
        domain = address.rsplit("@", 1)[-1].lower()
        transport = {"broken.test": "xyz", "broken2.test": "zzz",
                     "tmp.test": "tmpfail"}.get(domain, "okay")
        return SimpleNamespace(address_class="virtual", transport=transport,
                               nexthop=domain, recipient=address)


class OkAgent(DeliveryAgent):
    """Delivers; ``gate`` (a callable) makes a delivery wait until it is true."""

    def __init__(self):
        self.calls = []
        self.gate = None
        self.gated = set()

    async def deliver(self, req):
        self.calls.append([r.address for r in req.recipients])
        if self.gate is not None and self.gated & {r.address for r in req.recipients}:
            for _ in range(200):
                if self.gate():
                    break
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.05)
        return [RecipientResult.sent(r, "delivered to maildir", "virtual") for r in req.recipients]


class TmpAgent(DeliveryAgent):
    def __init__(self):
        self.before = None

    async def deliver(self, req):
        if self.before is not None:
            self.before(req)
        return [RecipientResult.deferred(r, "mailbox busy", "virtual", "4.2.0")
                for r in req.recipients]


def _broken_service(cfg):
    # "xyz unix - - n - - smtp -o smtp_helo_name": the daemon dies of the -o
    cfg.services.append(MasterService("xyz", "unix", False, True, False, "-", None, "smtp",
                                      argv=["-o", "smtp_helo_name"]))


@pytest.fixture
def env(tmp_path):
    qdir = tmp_path / "queue"
    cfg = Config(str(tmp_path), {"queue_directory": str(qdir), "myhostname": "mx.demo.test",
                                 "daemon_timeout": "1s"}, {}, [])
    clock = FakeClock()
    store = QueueStore(str(qdir), clock=clock)
    store.ensure_layout()
    ok, tmp = OkAgent(), TmpAgent()
    qm_log = NullLog("qmgr")

    def make(config=cfg, **agents):
        return QueueManager(config, store, log=qm_log, clock=clock, resolver=Resolver(),
                            bounce_log=NullLog("bounce"),
                            agents={"okay": ok, "tmpfail": tmp, **agents},
                            agent_logs=lambda name: NullLog(name))
    return SimpleNamespace(cfg=cfg, store=store, clock=clock, ok=ok, tmp=tmp, make=make,
                           qm_log=qm_log, qdir=qdir)


def queue(store, sender, rcpts, body=b"Subject: t\n\nhello\n"):
    msg = store.create()
    msg.set_sender(sender)
    for r in rcpts:
        msg.add_recipient(r)
    msg.write(body)
    msg.commit()
    return msg.queue_id


def run(coro, timeout=15):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def pending(store, qid):
    msg = store.open(qid)
    try:
        return [r.address for r in msg.recipients if not r.done]
    finally:
        msg.close()


FATAL = "fatal: timeout connecting to transport: xyz"


# ------------------------------------------------------------------ 1. the qmgr ends

def test_broken_transport_ends_the_qmgr_after_its_deliveries(env):
    _broken_service(env.cfg)
    held = queue(env.store, "s@x.test", ["b@broken.test", "c@ok.test"])
    other = queue(env.store, "s@x.test", ["a@ok.test"])
    # a delivery still in flight when the watchdog fires
    env.ok.gate = lambda: FATAL in env.qm_log.lines
    env.ok.gated = {"a@ok.test"}
    qm = env.make()
    run(qm.run(None, asyncio.Event()))
    assert qm.fatal
    assert env.qm_log.lines.count(FATAL) == 1           # one fatal line, as Postfix's
    # the delivery in flight finished and was marked before the exit ...
    assert sorted(env.ok.calls) == [["a@ok.test"], ["c@ok.test"]]
    assert env.store.find(other) is None
    assert env.store.find(held) == "active"
    assert pending(env.store, held) == ["b@broken.test"]
    # ... so the next qmgr (master.cf fixed meanwhile) repeats nothing
    env.cfg.services.clear()
    env.ok.gate = None
    lines = len(env.qm_log.lines)
    qm2 = env.make(xyz=env.ok)
    stop = asyncio.Event()

    async def go():
        task = asyncio.ensure_future(qm2.run(None, stop))
        for _ in range(200):
            if env.store.find(held) is None:
                break
            await asyncio.sleep(0.02)
        stop.set()
        await task
    run(go())
    assert not qm2.fatal
    assert env.store.find(held) is None
    assert sorted(env.ok.calls) == [["a@ok.test"], ["b@broken.test"], ["c@ok.test"]]
    assert env.qm_log.lines[lines:lines + 1] == [
        f"{held}: from=<s@x.test>, size=18, nrcpt=2 (queue active)"]


def test_one_fatal_line_for_two_broken_transports(env):
    _broken_service(env.cfg)
    env.cfg.services.append(MasterService("zzz", "unix", False, True, False, "-", None, "smtp",
                                          argv=["-o", "smtp_helo_name"]))
    one = queue(env.store, "s@x.test", ["b@broken.test"])
    two = queue(env.store, "s@x.test", ["b@broken2.test"])
    qm = env.make()
    run(qm.run(None, asyncio.Event()))
    assert qm.fatal
    # whichever watchdog comes first ends the qmgr; the other never fires
    assert [line for line in env.qm_log.lines if line.startswith("fatal:")] in (
        ["fatal: timeout connecting to transport: xyz"],
        ["fatal: timeout connecting to transport: zzz"])
    assert env.store.find(one) == env.store.find(two) == "active"


def test_driven_without_run_the_qmgr_stays(env):
    # tests/test_qmgr_parity8 drive QueueManager directly: it acts as its own successor
    _broken_service(env.cfg)
    qid = queue(env.store, "s@x.test", ["b@broken.test"])
    qm = env.make()

    async def go():
        qm.scan_incoming()
        await qm.drain()
        for _ in range(100):
            if FATAL in env.qm_log.lines:
                break
            await asyncio.sleep(0.05)
        await qm.drain()
    run(go())
    assert FATAL in env.qm_log.lines and not qm.fatal
    assert env.store.find(qid) == "active"


def test_serve_exits_1_after_the_fatal_error(tmp_path, monkeypatch):
    import postwell.qmgr as qmgr_pkg

    class Fatal:
        def __init__(self, *a, **kw):
            self.fatal = False

        async def run(self, fifo, stop, freeze_gc=False):
            self.fatal = True

        def flush(self):
            pass
    monkeypatch.setattr(qmgr_pkg, "QueueManager", Fatal)
    monkeypatch.setattr(qmgr_pkg, "FATAL_EXIT_DELAY", 0.0)
    qdir = tmp_path / "queue"
    cfg = Config(str(tmp_path), {"queue_directory": str(qdir),
                                 "maillog_file": str(tmp_path / "maillog")}, {}, [])
    QueueStore(str(qdir)).ensure_layout()
    with pytest.raises(SystemExit) as exc:
        qmgr_pkg.serve(cfg)
    assert exc.value.code == 1


# ------------------------------------------------------------------ 2. the master restarts it later

class Clock:
    def __init__(self):
        self.t = 1000.0

    def monotonic(self):
        return self.t

    def __getattr__(self, name):
        return getattr(time, name)


def _master(tmp_path, monkeypatch, wakeup="300"):
    clock = Clock()
    monkeypatch.setattr(daemon, "time", clock)
    qdir = tmp_path / "queue"
    QueueStore(str(qdir)).ensure_layout()
    os.mkfifo(qdir / "public" / "qmgr", 0o622)
    m = Master(str(tmp_path))
    m.config = Config(str(tmp_path), {"service_throttle_time": "60s",
                                      "queue_directory": str(qdir)}, {}, [])
    m.log = NullLog("master")
    m._pipe_r, m._pipe_w = os.pipe()
    svc = MasterService("qmgr", "unix", False, True, False, wakeup, 1, "qmgr", [], {}, 1)
    slot = Slot("qmgr", svc, m.config, [], 1, key=("qmgr",))
    m.slots = [slot]
    m._child_main = lambda _slot: (_ for _ in ()).throw(SystemExit(1))
    return m, slot, clock, qdir


def _reap(m):
    deadline = time.monotonic() + 5
    while m.children and time.monotonic() < deadline:
        m._reap()
        time.sleep(0.01)
    assert not m.children


def test_master_starts_a_dead_qmgr_again_at_its_wakeup(tmp_path, monkeypatch):
    m, slot, clock, _ = _master(tmp_path, monkeypatch)
    m._start_missing()
    pid = next(iter(slot.children))
    clock.t += 130                      # it ran (the fatal came at daemon_timeout)
    _reap(m)
    assert m.log.lines == [f"warning: process /usr/lib/postfix/sbin/qmgr pid {pid} exit status 1"]
    m._start_missing()
    assert not slot.children            # not at once, and no throttling line
    clock.t += 169
    m._start_missing()
    assert not slot.children
    clock.t += 1                        # the wakeup timer's tick: 300 s after the first start
    m._start_missing()
    assert len(slot.children) == 1
    _reap(m)


def test_master_starts_a_dead_qmgr_when_poked(tmp_path, monkeypatch):
    m, slot, clock, qdir = _master(tmp_path, monkeypatch)
    m._start_missing()
    clock.t += 20
    _reap(m)
    watch = m._on_demand_watch()
    assert list(watch.values()) == [slot]
    fd = next(iter(watch))
    assert not select.select([fd], [], [], 0)[0]
    # new mail: the smtpd's poke finds a reader and is kept for the next qmgr
    w = os.open(qdir / "public" / "qmgr", os.O_WRONLY | os.O_NONBLOCK)
    os.write(w, b"A")
    os.close(w)
    assert select.select([fd], [], [], 1)[0] == [fd]
    m._spawn(watch[fd])                 # what the master's loop does with a ready listener
    assert len(slot.children) == 1 and not m._on_demand_watch()
    assert os.read(fd, 16) == b"A"      # still there for the new qmgr to read
    _reap(m)
    # that one died at once: Postfix's start-up throttling, not a wait for a poke
    assert any("bad command startup -- throttling" in line for line in m.log.lines)


def test_no_wakeup_means_only_a_poke_starts_it(tmp_path, monkeypatch):
    m, slot, clock, _ = _master(tmp_path, monkeypatch, wakeup="-")
    m._start_missing()
    clock.t += 20
    _reap(m)
    clock.t += 100_000
    m._start_missing()
    assert not slot.children and m._on_demand_watch()


def test_a_stopping_master_restarts_nothing(tmp_path, monkeypatch):
    m, slot, clock, _ = _master(tmp_path, monkeypatch)
    m._start_missing()
    clock.t += 20
    m.stopping = True
    _reap(m)
    assert not m.log.lines and not m._qmgr_waiting and slot.throttled_until == 0


# ------------------------------------------------------------------ 3. side logs

def _logs(store, qid):
    return [k for k in ("defer", "bounce") if os.path.exists(store.path(k, qid))]


def _write_logs(store, qid):
    store.append_defer_log(qid, "x@y.test", "4.2.0", "old reason")
    store.append_bounce_log(qid, "x@y.test", "5.1.1", "old bounce")


def test_remove_takes_the_logs_before_the_file(env, monkeypatch):
    qid = queue(env.store, "s@x.test", ["a@ok.test"])
    _write_logs(env.store, qid)
    seen = []
    real_unlink, real_rename = os.unlink, os.rename
    import postwell.queue.store as store_mod

    def unlink(path, *a, **kw):
        seen.append(("unlink", str(path)))
        return real_unlink(path, *a, **kw)

    def rename(src, dst, *a, **kw):
        seen.append(("rename", str(src)))
        return real_rename(src, dst, *a, **kw)
    monkeypatch.setattr(store_mod.os, "unlink", unlink)
    monkeypatch.setattr(store_mod.os, "rename", rename)
    env.store.remove(qid, "incoming", sync=False)
    monkeypatch.undo()
    touched = [p.rsplit("/", 2)[-2] for _, p in seen if p.endswith(qid)]
    assert touched == ["defer", "bounce", "incoming"]
    assert env.store.find(qid) is None and _logs(env.store, qid) == []


def test_a_process_dying_inside_remove_leaves_no_orphan_log(env, monkeypatch):
    qid = queue(env.store, "s@x.test", ["a@ok.test"])
    _write_logs(env.store, qid)

    def die(*a, **kw):
        raise KeyboardInterrupt       # killed between the logs and the file
    monkeypatch.setattr(env.store, "_retire", die)
    with pytest.raises(KeyboardInterrupt):
        env.store.remove(qid, "incoming", sync=False)
    assert env.store.find(qid) == "incoming" and _logs(env.store, qid) == []


def test_a_reused_id_never_sees_the_old_logs(env, monkeypatch):
    # The window: a finished message's inode waits in spare/, and the next
    # message made in the same microsecond gets the very same id.
    import itertools
    import postwell.queue.store as store_mod
    steps = itertools.count()
    monkeypatch.setattr(store_mod, "_spare_clock", lambda: float(next(steps)))
    old = queue(env.store, "s@x.test", ["a@ok.test"])
    _write_logs(env.store, old)
    # a log left without its message (what a crash or postsuper -r + pickup leave)
    assert env.store.remove(old, "incoming", sync=False, logs=False)
    assert _logs(env.store, old) == ["defer", "bounce"]
    new = queue(env.store, "t@x.test", ["b@ok.test"])
    assert new == old                                   # same inode, same microsecond
    assert _logs(env.store, new) == []
    assert env.store.read_defer_log(new) == [] and env.store.read_bounce_log(new) == []


@pytest.mark.parametrize("many", [0, 12])      # a look per id; one listing per queue
def test_start_up_sweep_removes_orphan_logs_only(env, many):
    live = {q: queue(env.store, "s@x.test", [f"{q}@ok.test"]) for q in
            ("deferred", "hold", "maildrop", "incoming")}
    for q, qid in live.items():
        _write_logs(env.store, qid)
        if q != "incoming":
            env.store.move(qid, "incoming", q)
    orphans = [queue(env.store, "s@x.test", ["g@ok.test"]) for _ in range(many + 1)]
    for gone in orphans:
        _write_logs(env.store, gone)
        os.unlink(env.store.path("incoming", gone))      # a crash after the file went
    with open(env.store.path("defer", live["deferred"] + ".tmp"), "wb"):
        pass                                             # a reset cut short
    qm = env.make()
    qm._start_up_checks()
    for gone in orphans:
        assert _logs(env.store, gone) == [] and gone not in qm._log_ids
    for qid in live.values():
        assert _logs(env.store, qid) == ["defer", "bounce"] and qid in qm._log_ids
    assert sorted(os.listdir(env.store.path("defer"))) == sorted(live.values())


def test_logs_of_a_message_deleted_during_its_pass_go_with_it(env):
    qid = queue(env.store, "s@x.test", ["a@tmp.test"])
    qm = env.make()
    qm._start_up_checks()
    # postsuper -d while the attempt runs: the deferral's log entry comes after
    env.tmp.before = lambda req: env.store.remove(qid)

    async def go():
        qm.scan_incoming()
        await qm.drain()
    run(go())
    assert env.store.find(qid) is None
    assert _logs(env.store, qid) == [] and qid not in qm._log_ids


def test_logs_of_a_message_held_during_its_pass_stay(env):
    qid = queue(env.store, "s@x.test", ["a@tmp.test"])
    qm = env.make()
    qm._start_up_checks()
    env.tmp.before = lambda req: env.store.move(qid, "active", "hold")   # postsuper -h

    async def go():
        qm.scan_incoming()
        await qm.drain()
    run(go())
    assert env.store.find(qid) == "hold"
    assert _logs(env.store, qid) == ["defer"]
    assert [e["reason"] for e in env.store.read_defer_log(qid)] == ["mailbox busy"]


# ------------------------------------------------------------------ side by side with Postfix 3.7

try:
    import harness
except Exception:     # noqa: BLE001 - no reference tooling: the side-by-side case skips
    harness = None

_BROKEN = "xyz unix - - n - - smtp -o smtp_helo_name\n"
_MAIN = {"daemon_timeout": "3s", "ipc_timeout": "1s", "service_throttle_time": "60s",
         "transport_maps": "inline:{broken.test=xyz:}"}


def _send(port, rcpt):
    import smtplib
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        s.sendmail("s@x.test", [rcpt], b"Subject: t\n\nhi\n")


def _story(inst):
    """qmgr lines and the master's lines about the qmgr, with ids and pids
    named by order of appearance."""
    import re
    ids, pids, out = {}, {}, []
    for line in inst.log_text().splitlines():
        m = re.match(r"\S+ +\d+ [\d:]+ \S+ postfix/(qmgr|master)\[(\d+)\]: (.*)$", line)
        if not m or "daemon started" in m.group(3):
            continue
        who, pid, text = m.groups()
        if who == "master" and "/qmgr" not in text:
            # the broken service's own daemon: Postfix forks it (fatal, exit 1,
            # throttling) while its qmgr connects; postwell's agents are in-process
            continue
        text = re.sub(r"\b[0-9A-F]{10,}\b", lambda q: ids.setdefault(q.group(), f"ID{len(ids)}"), text)
        text = re.sub(r"pid (\d+)", lambda q: "pid " + pids.setdefault(q.group(1), f"P{len(pids)}"),
                      text)
        if who == "qmgr":
            who = "qmgr:" + pids.setdefault(pid, f"P{len(pids)}")
        out.append(f"{who}: {text}")
    return out


def _play(inst):
    inst.start()
    try:
        _send(inst.port, "b@broken.test")
        inst.wait_log(r"postfix/master\[\d+\]: warning: process \S+/qmgr pid \d+ exit status 1",
                      timeout=20)
        time.sleep(1.5)                # no qmgr comes back by itself (wakeup 300 s)
        quiet = _story(inst)
        _send(inst.port, "c@broken.test")
        inst.wait_log(r"(queue active)(?s:.*)(queue active)(?s:.*)(queue active)", timeout=20)
        time.sleep(0.5)
        return quiet, _story(inst)
    finally:
        inst.stop()


@pytest.mark.postfix
@pytest.mark.skipif(harness is None or harness.reference_available() is not None,
                    reason="no reference Postfix")
def test_side_by_side_broken_transport_restart(tmp_path):
    from concurrent.futures import ThreadPoolExecutor
    ref = harness.ReferencePostfix(tmp_path, main_cf_extra=_MAIN, name="ref",
                                   master_cf_extra=_BROKEN)
    pw = harness.PostwellInstance(tmp_path, main_cf=_MAIN, name="pw")
    pw.master_cf = pw.default_master_cf() + _BROKEN
    pw.write_config()
    with ThreadPoolExecutor(2) as pool:
        got = dict(zip(("postfix", "postwell"), pool.map(_play, (ref, pw))))
    (ref_quiet, ref_all), (pw_quiet, pw_all) = got["postfix"], got["postwell"]
    assert ref_quiet == [
        "qmgr:P0: ID0: from=<s@x.test>, size=307, nrcpt=1 (queue active)",
        "qmgr:P0: fatal: timeout connecting to transport: xyz",
        "master: warning: process /usr/lib/postfix/sbin/qmgr pid P0 exit status 1"], ref_all
    sizes = {"size=307": "size=N", "size=308": "size=N"}

    def norm(lines):
        out = []
        for line in lines:
            for a, b in sizes.items():
                line = line.replace(a, b)
            out.append(line)
        return out
    assert norm(pw_quiet) == norm(ref_quiet)
    # The poke of the next message starts a new qmgr, which takes both up (in
    # no fixed order: Postfix's new qmgr moves active/ back to incoming/ and
    # scans that).
    why = "\n".join(["postfix:", *ref_all, "postwell:", *pw_all])
    assert norm(pw_all[:3]) == norm(ref_all[:3]), why
    assert sorted(norm(pw_all[3:])) == sorted(norm(ref_all[3:])), why
    assert len(ref_all) == 5, why


def test_a_flush_starts_a_dead_qmgr(tmp_path, monkeypatch):
    m, slot, clock, _ = _master(tmp_path, monkeypatch)
    m._start_missing()
    clock.t += 20
    _reap(m)
    m._flush()                          # postfix flush (SIGUSR1 to the master)
    watch = m._on_demand_watch()
    fd = next(iter(watch))
    assert select.select([fd], [], [], 1)[0] == [fd]
    assert os.read(fd, 16) == b"F"      # what the next qmgr reads: retry deferred mail now


def test_a_poke_while_the_qmgr_was_dying_starts_the_next_at_once(tmp_path, monkeypatch):
    m, slot, clock, qdir = _master(tmp_path, monkeypatch)
    m._start_missing()                  # the master holds public/qmgr from now on
    w = os.open(qdir / "public" / "qmgr", os.O_WRONLY | os.O_NONBLOCK)
    os.write(w, b"A")                   # new mail while the qmgr drains, not reading
    os.close(w)
    clock.t += 20
    _reap(m)
    fd = next(iter(m._on_demand_watch()))
    assert select.select([fd], [], [], 1)[0] == [fd]


def test_a_stopped_qmgr_leaves_held_mail_without_a_fatal_line(env):
    _broken_service(env.cfg)
    qid = queue(env.store, "s@x.test", ["b@broken.test"])
    qm = env.make()
    stop = asyncio.Event()

    async def go():
        task = asyncio.ensure_future(qm.run(None, stop))
        for _ in range(500):
            if env.qm_log.lines and qm.__dict__.get("_held"):
                break
            await asyncio.sleep(0.01)
        stop.set()                      # postfix stop before daemon_timeout
        await task
        await asyncio.sleep(1.2)        # the watchdog's time has come and gone
    run(go())
    assert not qm.fatal and FATAL not in env.qm_log.lines
    assert env.store.find(qid) == "active"


def test_a_service_whose_command_is_no_agent_is_a_broken_transport(env):
    # "xyz unix - - n - - nosuchdaemon": Postfix's master cannot exec it, its qmgr
    # waits for the transport until daemon_timeout (side by side with 3.7)
    env.cfg.services.append(MasterService("xyz", "unix", False, True, False, "-", None,
                                          "nosuchdaemon", []))
    qid = queue(env.store, "s@x.test", ["b@broken.test"])
    qm = env.make()
    run(qm.run(None, asyncio.Event()))
    assert qm.fatal and FATAL in env.qm_log.lines
    assert env.store.find(qid) == "active" and _logs(env.store, qid) == []
    assert not [line for line in env.qm_log.lines if "transport unavailable" in line]
