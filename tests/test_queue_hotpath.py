"""Queue create/commit/remove and the qmgr's first-pass path, fewer system calls
and thread hand-offs per message (issue 8), with the durability rules of
queue/format.py unchanged: no success before file, marker and directory are
fsync'd; no side log lost, none inherited by a new message."""

from __future__ import annotations

import asyncio
import os
import stat
import threading
import time

import pytest

from postwell.delivery.base import DeliveryAgent, RecipientResult
from postwell.queue import QueueStore, QueueWriteError
from postwell.queue import store as store_mod
from postwell.queue.format import make_queue_id
from postwell.queue.store import CommitBatcher, wake_qmgr_kept
from test_qmgr_perf import make_env, queue

T0 = 1_800_000_000.0
TIMEOUT = 30


def _run(coro, timeout: float = TIMEOUT):
    return asyncio.run(asyncio.wait_for(coro, timeout))


class SlowRecordingFsync:
    """(inode, is_dir, marker set) per fsync; each call waits a little so that
    submissions pile up while a round runs."""

    def __init__(self, delay: float = 0.0) -> None:
        self.lock = threading.Lock()
        self.calls: list[tuple[int, bool, bool]] = []
        self.delay = delay

    def __call__(self, fd: int) -> None:
        st = os.fstat(fd)
        with self.lock:
            self.calls.append((st.st_ino, stat.S_ISDIR(st.st_mode), bool(st.st_mode & stat.S_IXUSR)))
        if self.delay:
            time.sleep(self.delay)
        os.fsync(fd)


def _message(store: QueueStore, i: int):
    m = store.create()
    m.set_sender("s@example.org")
    m.add_recipient(f"r{i}@example.org")
    m.write(b"Subject: x\n\nbody\n")
    return m


# ---------------------------------------------------------------- create

def test_create_looks_into_no_other_queue_directory(tmp_path, monkeypatch):
    store = QueueStore(str(tmp_path / "q"))
    store.ensure_layout()
    store.create().abort()               # descriptors opened
    looked = []
    real_lstat, real_stat = os.lstat, os.stat
    monkeypatch.setattr(os, "lstat", lambda *a, **k: looked.append(a) or real_lstat(*a, **k))
    monkeypatch.setattr(os, "stat", lambda *a, **k: looked.append(a) or real_stat(*a, **k))
    m = store.create()
    monkeypatch.setattr(os, "lstat", real_lstat)
    monkeypatch.setattr(os, "stat", real_stat)
    assert looked == []
    assert os.listdir(store.path("incoming")) == [m.queue_id]
    m.abort()


def test_create_still_removes_a_leftover_log_of_its_id(tmp_path, monkeypatch):
    store = QueueStore(str(tmp_path / "q"), clock=lambda: T0)
    store.ensure_layout()
    probe = store.create()
    ino = os.stat(store.path("incoming", probe.queue_id)).st_ino
    probe.abort()

    class St:
        st_ino = ino
        st_mode = stat.S_IFREG | 0o600
    qid = make_queue_id(0, ino)
    for kind in ("defer", "bounce"):
        with open(store.path(kind, qid), "w") as f:
            f.write("stale")
    real_fstat = os.fstat
    monkeypatch.setattr(os, "fstat", lambda fd: St())
    m = store.create()
    monkeypatch.setattr(os, "fstat", real_fstat)
    assert m.queue_id == qid
    assert not os.path.exists(store.path("defer", qid))
    assert not os.path.exists(store.path("bounce", qid))
    m.abort()


def test_a_queue_directory_made_anew_is_found_again(tmp_path):
    import shutil
    store = QueueStore(str(tmp_path / "q"))
    store.ensure_layout()
    _run(_message(store, 1).commit_async())
    shutil.rmtree(store.queue_directory)
    store.ensure_layout()
    m = _message(store, 2)
    _run(m.commit_async())
    assert store.scan("incoming") == [m.queue_id]


# ---------------------------------------------------------------- misnamed files

def test_rename_misnamed_moves_the_side_logs_and_keeps_good_names(tmp_path):
    store = QueueStore(str(tmp_path / "q"))
    store.ensure_layout()
    good = _message(store, 1)
    good.commit()
    stray = store.path("hold", "00001ABC")
    with open(stray, "wb") as f:
        f.write(b"x")
    os.chmod(stray, 0o700)
    with open(store.path("defer", "00001ABC"), "w") as f:
        f.write("reason")
    ino = os.stat(stray).st_ino
    new = make_queue_id(1, ino)
    assert store.rename_misnamed() == [("hold", "00001ABC", new)]
    assert os.listdir(store.path("hold")) == [new]
    assert os.listdir(store.path("defer")) == [new]
    assert store.scan("incoming") == [good.queue_id]


def test_rename_misnamed_finishes_a_rename_cut_short_by_a_crash(tmp_path):
    store = QueueStore(str(tmp_path / "q"))
    store.ensure_layout()
    stray = store.path("deferred", "00002ABC")
    with open(stray, "wb") as f:
        f.write(b"x")
    new = make_queue_id(2, os.stat(stray).st_ino)
    os.link(stray, store.path("deferred", new))        # linked, then the crash
    assert store.rename_misnamed() == [("deferred", "00002ABC", new)]
    assert os.listdir(store.path("deferred")) == [new]  # no third name


# ---------------------------------------------------------------- group commit

def test_batcher_wakes_once_per_batch_and_fsyncs_the_linked_directory(tmp_path, monkeypatch):
    fs = SlowRecordingFsync(delay=0.003)
    store = QueueStore(str(tmp_path / "q"), fsync=fs)
    store.ensure_layout()
    opened = []
    real_open = os.open

    def spy_open(path, *a, **k):
        opened.append(path)
        return real_open(path, *a, **k)

    async def main():
        msgs = []
        for wave in range(4):
            batch = [_message(store, wave * 10 + i) for i in range(10)]
            msgs += batch
            for m in batch:
                asyncio.ensure_future(m.commit_async())
            await asyncio.sleep(0.005)
        while not all(m.committed for m in msgs):
            await asyncio.sleep(0.01)
        return msgs

    _message(store, 99).abort()          # descriptors opened before the spy
    fs.calls.clear()
    monkeypatch.setattr(os, "open", spy_open)
    msgs = _run(main())
    monkeypatch.setattr(os, "open", real_open)
    batcher = store_mod.commit_batcher(store.path("incoming"), fs)
    assert batcher.rounds < 40
    assert batcher.wakeups <= batcher.rounds
    assert [p for p in opened if not str(p).startswith("tmp.")] == []   # no open of incoming/
    inc_ino = os.stat(store.path("incoming")).st_ino
    dir_calls = [i for i, (ino, d, _) in enumerate(fs.calls) if d]
    assert dir_calls and all(fs.calls[i][0] == inc_ino for i in dir_calls)
    for m in msgs:
        ino = os.stat(store.path("incoming", m.queue_id)).st_ino
        mine = [(i, c) for i, (n, d, c) in enumerate(fs.calls) if n == ino and not d]
        assert [c for _, c in mine] == [False]     # data durable before the (unsynced) marker
        assert any(i > mine[0][0] for i in dir_calls)


def test_committed_files_are_closed_by_their_loop(tmp_path):
    store = QueueStore(str(tmp_path / "q"))
    store.ensure_layout()
    _message(store, 99).abort()          # the store's directory descriptors
    before = len(os.listdir("/proc/self/fd"))

    async def main():
        msgs = [_message(store, i) for i in range(20)]
        await asyncio.gather(*(m.commit_async() for m in msgs))
        return len(os.listdir("/proc/self/fd"))

    during = _run(main())
    assert during <= before + 4          # the loop's own; the 20 queue files are closed


def test_a_failed_file_still_fails_alone_and_is_removed(tmp_path):
    bad_ino = set()

    def fsync(fd):
        if os.fstat(fd).st_ino in bad_ino:
            raise OSError(5, "Input/output error")
        os.fsync(fd)
    store = QueueStore(str(tmp_path / "q"), fsync=fsync)
    store.ensure_layout()
    msgs = [_message(store, i) for i in range(3)]
    bad_ino.add(os.stat(store.path("incoming", msgs[1].queue_id)).st_ino)

    async def main():
        return await asyncio.gather(*(m.commit_async() for m in msgs), return_exceptions=True)

    res = _run(main())
    assert res[0] is None and res[2] is None and isinstance(res[1], QueueWriteError)
    assert sorted(os.listdir(store.path("incoming"))) == sorted([msgs[0].queue_id, msgs[2].queue_id])


def test_batcher_thread_leaves_when_idle_and_a_later_submit_starts_it(tmp_path, monkeypatch):
    monkeypatch.setattr(CommitBatcher, "IDLE", 0.05)
    store = QueueStore(str(tmp_path / "q"), fsync=SlowRecordingFsync())
    store.ensure_layout()
    for i in range(3):
        m = _message(store, i)
        _run(m.commit_async())
        assert m.committed
        batcher = store_mod.commit_batcher(store.path("incoming"), store._fsync)
        deadline = time.monotonic() + 5
        while batcher._running and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not batcher._running


# ---------------------------------------------------------------- qmgr wake-up

def test_kept_fifo_descriptor_finds_a_new_qmgr(tmp_path):
    qdir = str(tmp_path / "q")
    QueueStore(qdir).ensure_layout()
    path = os.path.join(qdir, "public", "qmgr")
    wake_qmgr_kept(qdir)                 # no FIFO: ignored
    os.mkfifo(path)
    wake_qmgr_kept(qdir)                 # no reader: ignored
    r = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        wake_qmgr_kept(qdir)
        wake_qmgr_kept(qdir)
        assert os.read(r, 10) == b"II"
        kept = store_mod._kept_fifo
        assert kept is not None and kept[1] == qdir
    finally:
        os.close(r)
    # The qmgr went away and its FIFO was made anew: found at the next wake-up.
    os.unlink(path)
    os.mkfifo(path)
    r = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        wake_qmgr_kept(qdir)             # EPIPE on the old one, then the new name
        assert os.read(r, 10) == b"I"
    finally:
        os.close(r)


def test_kept_fifo_never_blocks_when_full(tmp_path):
    qdir = str(tmp_path / "q")
    QueueStore(qdir).ensure_layout()
    path = os.path.join(qdir, "public", "qmgr")
    os.mkfifo(path)
    r = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        t0 = time.monotonic()
        for _ in range(70000):           # more than a pipe holds
            wake_qmgr_kept(qdir)
        assert time.monotonic() - t0 < 20
    finally:
        os.close(r)


# ---------------------------------------------------------------- qmgr side logs

class CountingStore(QueueStore):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.bounce_reads = 0
        self.removes = []

    def read_bounce_log(self, queue_id):
        self.bounce_reads += 1
        return super().read_bounce_log(queue_id)

    def remove(self, queue_id, queue_name=None, *, sync=True, logs=True):
        self.removes.append(logs)
        return super().remove(queue_id, queue_name, sync=sync, logs=logs)


class Agent(DeliveryAgent):
    def __init__(self):
        self.fail = set()

    async def deliver(self, req):
        return [RecipientResult.bounced(r, "5.1.1", "no such user", "none")
                if r.address in self.fail else
                RecipientResult.sent(r, "delivered", "virtual") for r in req.recipients]


def _env(tmp_path):
    return make_env(tmp_path, CountingStore, Agent())


def _pass(env):
    async def go():
        env.qm._start_up_checks()
        env.qm.scan_incoming()
        await env.qm.drain()
    _run(go())


def test_first_pass_message_is_removed_without_looking_for_logs(tmp_path):
    env = _env(tmp_path)
    qid = queue(env.store, "s@x.test", ["a@ok.test"])
    _pass(env)
    assert env.store.find(qid) is None
    assert env.store.bounce_reads == 0
    assert env.store.removes == [False]


def test_a_log_present_at_start_up_is_still_read_and_removed(tmp_path):
    env = _env(tmp_path)
    qid = queue(env.store, "s@x.test", ["a@ok.test"])
    # An earlier qmgr recorded a failure but could not queue the notice.
    env.store.append_bounce_log(qid, "old@ok.test", "5.1.1", "no such user")
    _pass(env)
    assert env.store.bounce_reads >= 1
    assert env.store.find(qid) is None
    assert not os.path.exists(env.store.path("bounce", qid))
    assert any("sender non-delivery notification" in line for line in env.logs["bounce"].lines)
    assert env.store.removes and all(env.store.removes)


def test_a_log_written_in_this_pass_is_read_for_the_notice(tmp_path):
    env = _env(tmp_path)
    env.agent.fail.add("b@ok.test")
    qid = queue(env.store, "s@x.test", ["a@ok.test", "b@ok.test"])
    _pass(env)
    assert env.store.find(qid) is None
    assert not os.path.exists(env.store.path("bounce", qid))
    assert any(f"{qid}: sender non-delivery notification" in line
               for line in env.logs["bounce"].lines)
    assert qid not in env.qm._log_ids     # removed with its logs: forgotten


def test_without_start_up_checks_every_message_looks_for_logs(tmp_path):
    env = _env(tmp_path)
    qid = queue(env.store, "s@x.test", ["a@ok.test"])

    async def go():
        env.qm.scan_incoming()
        await env.qm.drain()
    _run(go())
    assert env.store.find(qid) is None
    assert env.store.bounce_reads == 1 and env.store.removes == [True]


def test_too_many_logged_ids_fall_back_to_looking(tmp_path, monkeypatch):
    from postwell.qmgr import manager as qmgr_manager
    monkeypatch.setattr(qmgr_manager, "LOG_ID_LIMIT", 2)
    env = _env(tmp_path)
    for i in range(3):
        env.store.append_defer_log(f"ABCDE{i}", "x@ok.test", "4.0.0", "later")
    qid = queue(env.store, "s@x.test", ["a@ok.test"])
    _pass(env)
    assert env.qm._log_ids is None
    assert env.store.find(qid) is None and env.store.bounce_reads == 1


def test_remove_without_logs_leaves_them(tmp_path):
    store = QueueStore(str(tmp_path / "q"))
    store.ensure_layout()
    qid = queue(store, "s@x.test", ["a@ok.test"])
    store.append_defer_log(qid, "a@ok.test", "4.0.0", "later")
    assert store.remove(qid, "incoming", logs=False)
    assert os.path.exists(store.path("defer", qid))
    assert not store.remove(qid)
    assert not os.path.exists(store.path("defer", qid))


@pytest.mark.parametrize("n", [1, 5])
def test_commit_order_unchanged_per_file(tmp_path, n):
    fs = SlowRecordingFsync()
    store = QueueStore(str(tmp_path / "q"), fsync=fs)
    store.ensure_layout()
    msgs = [_message(store, i) for i in range(n)]

    async def main():
        await asyncio.gather(*(m.commit_async() for m in msgs))
    _run(main())
    for m in msgs:
        ino = os.stat(store.path("incoming", m.queue_id)).st_ino
        idx = [i for i, (x, d, _) in enumerate(fs.calls) if x == ino and not d]
        marks = [fs.calls[i][2] for i in idx]
        assert marks == [False]
        assert any(d and i > idx[0] for i, (_, d, _) in enumerate(fs.calls))
        assert os.stat(store.path("incoming", m.queue_id)).st_mode & 0o100

