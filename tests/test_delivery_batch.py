"""Batched Maildir work in user workers, and local(8)'s one-call .forward
lookup + mailbox delivery (issue 8: delivery CPU per message)."""

from __future__ import annotations

import asyncio
import errno
import os
import pwd
import types
from pathlib import Path

import pytest

from postwell.config.main import Config
from postwell.delivery import local, local_exec, virtual
from postwell.delivery.base import DeliveryRequest, Recipient
from postwell.delivery.local import LocalAgent
from postwell.delivery.local_exec import AsyncWorkerPool, InlineContent, _run_batch
from postwell.delivery.virtual import Delivery
from postwell.log import NullLog
from postwell.queue import store

MSG = b"From: a@remote.test\nSubject: hi\n\nbody line\n"
FUNCS = {name: getattr(local_exec, name) for name in local_exec.WORKER_OPS}


def plan(path: Path, limit: int = 0) -> Delivery:
    return Delivery(path=str(path) + "/", maildir=True, uid=os.getuid(), gid=os.getgid(),
                    sender="s@example.test", recipient="r@example.test", orig=None, limit=limit,
                    lock_methods=[], hostname="h")


def messages(md: Path) -> list[Path]:
    return sorted((md / "new").iterdir()) if (md / "new").is_dir() else []


@pytest.fixture
def dir_syncs(monkeypatch, tmp_path):
    """Every directory fsync (also those of forked workers) as a line of a file."""
    log = tmp_path / "dirsyncs"
    log.write_text("")
    real = store.fsync_dir

    def counting(path, fsync=os.fsync):
        with open(log, "a") as f:
            f.write(path + "\n")
        real(path, fsync)
    monkeypatch.setattr(store, "fsync_dir", counting)
    return lambda: log.read_text().splitlines()


# ------------------------------------------------------------ one frame, many operations

def test_batch_syncs_each_new_dir_once_before_answering(tmp_path, dir_syncs):
    a, b = tmp_path / "a", tmp_path / "b"
    items = [("op_virtual_delivery", [plan(a), (local_exec._INLINE, MSG)]) for _ in range(5)]
    items += [("op_virtual_delivery", [plan(b), (local_exec._INLINE, MSG)]) for _ in range(3)]
    out = _run_batch(FUNCS, items)
    assert out == [["sent", "2.0.0", "delivered to maildir"]] * 8
    assert len(messages(a)) == 5 and len(messages(b)) == 3
    assert sorted(dir_syncs()) == [str(a / "new"), str(b / "new")]
    assert all(f.read_bytes().endswith(MSG) for f in messages(a) + messages(b))
    assert not os.listdir(a / "tmp")
    # Outside a batch every delivery syncs its own directory again.
    assert getattr(virtual._batch_state, "dirs", None) is None


def test_batch_failures_stay_with_their_operation(tmp_path, dir_syncs):
    a = tmp_path / "a"
    items = [("op_virtual_delivery", [plan(a), (local_exec._INLINE, MSG)]),
             ("op_virtual_delivery", [plan(a, limit=5), (local_exec._INLINE, MSG)]),
             ("no_such_op", []),
             ("op_virtual_delivery", [plan(a), (local_exec._INLINE, MSG)])]
    out = _run_batch(FUNCS, items)
    assert out[0] == out[3] == ["sent", "2.0.0", "delivered to maildir"]
    assert out[1] == ["bounced", "5.2.2", "maildir delivery failed: error writing message: File too large"]
    assert "error" in out[2]
    assert len(messages(a)) == 2
    assert dir_syncs() == [str(a / "new")]


def test_batch_dir_sync_failure_reports_nothing_delivered(tmp_path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    real = store.fsync_dir

    def failing(path, fsync=os.fsync):
        if path.startswith(str(a)):
            raise OSError(errno.EIO, "Input/output error")
        real(path, fsync)
    monkeypatch.setattr(store, "fsync_dir", failing)
    items = [("op_virtual_delivery", [plan(a), (local_exec._INLINE, MSG)]),
             ("op_virtual_delivery", [plan(b), (local_exec._INLINE, MSG)]),
             ("op_virtual_delivery", [plan(a, limit=5), (local_exec._INLINE, MSG)])]
    out = _run_batch(FUNCS, items)
    # The name may not be durable: deferred (a retry may duplicate, never lose).
    assert out[0] == ["deferred", "4.2.0", f"maildir delivery failed: Input/output error: {a}/new"]
    assert out[1] == ["sent", "2.0.0", "delivered to maildir"]
    assert out[2][:2] == ["bounced", "5.2.2"]        # never written: its own answer stands
    # An operation of another shape gets a plain error answer.
    assert "error" in local_exec._dir_sync_failed({"status": "sent"}, str(a), OSError(errno.EIO, "x"))


def test_async_pool_batches_queued_requests(tmp_path, dir_syncs):
    md = tmp_path / "md"

    async def main():
        pool = AsyncWorkerPool(size=1)
        try:
            got = await asyncio.wait_for(asyncio.gather(*(
                pool.run("op_virtual_delivery", [plan(md), InlineContent(MSG)]) for _ in range(12))), 60)
            assert got == [["sent", "2.0.0", "delivered to maildir"]] * 12
            assert pool._count == 1 and len(pool._idle) == 1 and not pool._queue
            # A caller that gave up while queued is skipped, the others go on.
            worker_busy = pool.run("op_virtual_delivery", [plan(md), InlineContent(MSG)])
            first = asyncio.ensure_future(worker_busy)
            await asyncio.sleep(0)
            gone = asyncio.ensure_future(pool.run("op_virtual_delivery", [plan(md), InlineContent(MSG)]))
            await asyncio.sleep(0)
            gone.cancel()
            last = await asyncio.wait_for(
                pool.run("op_virtual_delivery", [plan(md), InlineContent(MSG)]), 30)
            assert await asyncio.wait_for(first, 30) == last == ["sent", "2.0.0", "delivered to maildir"]
        finally:
            pool.close()
    asyncio.run(main())
    assert len(messages(md)) == 14
    # The first request went alone, the eleven queued behind it shared one frame
    # (and one fsync of new/); then two more single requests.
    syncs = dir_syncs()
    assert set(syncs) == {str(md / "new")}
    assert len(syncs) <= 4


def test_async_pool_batch_bounded_by_count_and_bytes():
    pool = AsyncWorkerPool(size=1)
    loop = asyncio.new_event_loop()
    try:
        futs = [loop.create_future() for _ in range(local_exec.BATCH_MAX + 5)]
        pool._queue = [("op", [], 10, f) for f in futs]
        assert len(pool._take()) == local_exec.BATCH_MAX
        assert len(pool._queue) == 5
        big = local_exec.BATCH_BYTES // 2 + 1
        pool._queue = [("op", [], big, loop.create_future()) for _ in range(3)]
        assert len(pool._take()) == 1           # a second one would pass BATCH_BYTES
        done = loop.create_future()
        done.cancel()
        pool._queue = [("op", [], 1, done), ("op", [], 1, loop.create_future())]
        assert len(pool._take()) == 1 and not pool._queue
    finally:
        loop.close()


def test_async_pool_default_size_follows_cores():
    assert AsyncWorkerPool().size == max(2, min(4, os.cpu_count() or 2))
    assert AsyncWorkerPool(size=3).size == 3


# ------------------------------------------------------------ local: one worker call per message

class FakePwd:
    """getpwnam for one made-up user that is us, with a home under tmp_path."""

    def __init__(self, home: Path):
        me = pwd.getpwuid(os.getuid())
        self.entry = types.SimpleNamespace(pw_name="alice", pw_uid=me.pw_uid, pw_gid=me.pw_gid,
                                           pw_dir=str(home), pw_shell="/bin/sh")

    def getpwnam(self, name):
        return self.entry if name == "alice" else pwd.getpwnam(name)

    def getpwuid(self, uid):
        return pwd.getpwuid(uid)


@pytest.fixture
def local_env(tmp_path, monkeypatch):
    home = tmp_path / "alice"
    home.mkdir()
    monkeypatch.setattr(local, "pwd", FakePwd(home))
    calls = []

    def run_as(ident, func, *args):      # in-process: records which operation ran
        calls.append(func.__name__)
        return func(*args)
    monkeypatch.setattr(local, "run_as", run_as)

    def make(**params):
        p = {"myhostname": "mx.example.test", "mydestination": "mx.example.test",
             "alias_maps": "", "home_mailbox": "Maildir/", "queue_directory": str(tmp_path / "q"),
             "recipient_delimiter": "+"}
        p.update(params)
        agent = LocalAgent(Config(str(tmp_path), p, {}, []), NullLog("local"), helper_socket="")
        return agent
    return types.SimpleNamespace(home=home, calls=calls, make=make)


def deliver(agent, address="alice@mx.example.test"):
    req = DeliveryRequest(queue_id="ABC123", sender="s@remote.test",
                          recipients=[Recipient(address)], transport="local",
                          nexthop="mx.example.test", arrival_time=0,
                          open_content=lambda: iter((MSG,)), content_size=len(MSG))
    return agent.expand_request(req)[0]


def test_no_forward_file_one_call_writes_the_mailbox(local_env):
    agent = local_env.make()
    leaves = deliver(agent)
    assert [(l.status, l.reason) for l in leaves] == [("sent", "delivered to maildir")]
    assert local_env.calls == ["op_forward_or_mailbox"]
    [f] = messages(local_env.home / "Maildir")
    assert f.read_bytes().endswith(MSG)
    assert b"Delivered-To: alice@mx.example.test\n" in f.read_bytes()


def test_forward_file_found_mailbox_untouched(local_env):
    (local_env.home / ".forward").write_text("\\alice, bob@remote.test\n")
    agent = local_env.make()
    leaves = deliver(agent)
    # The combined call read the .forward and wrote nothing; \alice then gets
    # the mailbox in a call of its own, bob is forwarded.
    assert local_env.calls == ["op_forward_or_mailbox", "op_mailbox"]
    assert sorted((l.address, l.status) for l in leaves) == [
        ("alice@mx.example.test", "sent"), ("bob@remote.test", "pending")]
    assert len(messages(local_env.home / "Maildir")) == 1


def test_empty_forward_file_delivers_once(local_env):
    (local_env.home / ".forward").write_text("# nothing\n")
    agent = local_env.make()
    leaves = deliver(agent)
    assert local_env.calls == ["op_forward_or_mailbox", "op_mailbox"]
    assert [(l.status, l.reason) for l in leaves] == [("sent", "delivered to maildir")]
    assert len(messages(local_env.home / "Maildir")) == 1


def test_missing_home_defers_without_writing(local_env):
    agent = local_env.make()
    os.rmdir(local_env.home)
    leaves = deliver(agent)
    assert local_env.calls == ["op_forward_or_mailbox"]
    assert [(l.status, l.dsn) for l in leaves] == [("deferred", "4.3.0")]
    assert "cannot access home directory" in leaves[0].reason


def test_mailbox_command_keeps_separate_lookup(local_env, monkeypatch):
    agent = local_env.make(mailbox_command="/bin/true")
    ran = []
    monkeypatch.setattr(local.Expansion, "run_command",
                        lambda self, b, ident, command, pw=None: ran.append(command))
    deliver(agent)
    assert local_env.calls == ["op_forward_lookup"]
    assert ran == ["/bin/true"]


def test_mailbox_write_error_in_combined_call(local_env):
    agent = local_env.make()
    (local_env.home / "Maildir").write_text("not a directory")
    leaves = deliver(agent)
    assert local_env.calls == ["op_forward_or_mailbox"]
    assert [(l.status, l.dsn) for l in leaves] == [("deferred", "4.2.0")]
    assert leaves[0].reason.startswith("maildir delivery failed: create maildir file ")


def test_batch_runs_only_maildir_work_side_by_side(tmp_path, dir_syncs):
    """mbox appends lock with fcntl, which does not exclude threads of one
    process: in a batch they run one after the other in the calling thread."""
    import threading
    md, mbox = tmp_path / "md", tmp_path / "mbox"
    where = []
    real = local_exec.op_virtual_delivery

    def recording(d, content):
        where.append((d.maildir, threading.current_thread() is threading.main_thread()))
        return real(d, content)
    funcs = dict(FUNCS, op_virtual_delivery=recording)
    box = Delivery(path=str(mbox), maildir=False, uid=os.getuid(), gid=os.getgid(),
                   sender="s@example.test", recipient="r@example.test", orig=None, limit=0,
                   lock_methods=["fcntl"], hostname="h")
    items = []
    for _ in range(4):
        items.append(("op_virtual_delivery", [plan(md), (local_exec._INLINE, MSG)]))
        items.append(("op_virtual_delivery", [box, (local_exec._INLINE, MSG)]))
    out = _run_batch(funcs, items)
    assert out == [["sent", "2.0.0", "delivered to maildir"], ["sent", "2.0.0", "delivered to mailbox"]] * 4
    assert sorted(where) == [(False, True)] * 4 + [(True, False)] * 4
    assert mbox.read_bytes().count(b"\nFrom s@example.test  ") + mbox.read_bytes().startswith(b"From ") == 4
    assert len(messages(md)) == 4 and dir_syncs() == [str(md / "new")]


# ------------------------------------------------------------ the root helper's owner pools

@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch uid")
def test_root_helper_writes_through_owner_pools(monkeypatch):
    import shutil
    import stat
    import tempfile

    from postwell.delivery.virtual import VirtualAgent
    base = Path(tempfile.mkdtemp(prefix="pw-batch-"))
    try:
        os.chmod(base, 0o755)
        (base / "mail").mkdir(mode=0o755)
        os.chown(base / "mail", 65534, 65534)
        cfg = Config(str(base), {
            "myhostname": "mx.demo.test", "virtual_mailbox_base": str(base / "mail"),
            "virtual_mailbox_maps": "inline:{alice@demo.test=alice/, bob@demo.test=bob}",
            "virtual_uid_maps": "static:65534", "virtual_gid_maps": "static:65534"}, {}, [])
        monkeypatch.setattr(local_exec, "_pool", local_exec.WorkerPool())   # as in a root helper
        agent = VirtualAgent(cfg, NullLog("virtual"))

        def req(rcpt):
            return DeliveryRequest(queue_id="ABCDE1", sender="s@x.test", recipients=[Recipient(rcpt)],
                                   transport="virtual", nexthop="demo.test", arrival_time=0.0,
                                   open_content=lambda: iter((MSG,)), content_size=len(MSG))

        async def main():
            try:
                return await asyncio.wait_for(asyncio.gather(
                    *(agent.deliver(req("alice@demo.test")) for _ in range(6)),
                    agent.deliver(req("bob@demo.test"))), 60)
            finally:
                pools = dict(agent._owner_pools)
                agent.close()
                assert list(pools) == [(65534, 65534)]
                assert all(not p._idle for p in pools.values())
        results = asyncio.run(main())
        assert [r.status for [r] in results] == ["sent"] * 7
        files = messages(base / "mail" / "alice")
        assert len(files) == 6
        st = os.stat(files[0])
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (65534, 65534, 0o600)
        assert (base / "mail" / "bob").read_bytes().count(MSG) == 1
    finally:
        local_exec._pool.close() if local_exec._pool is not None else None
        shutil.rmtree(base, ignore_errors=True)
