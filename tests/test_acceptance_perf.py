"""The acceptance fast path: group commit of queue files (queue.store.CommitBatcher),
one write per small queue file, one qmgr wake-up per loop turn, cheap log lines.

The property that matters most (DESIGN.md 1) is checked first: commit_async()
returns only after its file was fsync'd before and after the complete marker
and the directory was fsync'd after the name was linked; a failure anywhere
leaves no file behind and never a success.
"""

from __future__ import annotations

import asyncio
import errno
import os
import stat
import threading
import time

import pytest

from postwell.queue import QueueStore, QueueWriteError
from postwell.queue import store as store_mod
from postwell.queue.store import CommitBatcher


class RecordingFsync:
    """Records (inode, is_dir, complete marker set) per fsync; optional failures."""

    def __init__(self, fail_ino: set[int] | None = None, fail_dir: bool = False,
                 delay: float = 0.0) -> None:
        self.lock = threading.Lock()
        self.calls: list[tuple[int, bool, bool]] = []
        self.fail_ino = fail_ino or set()
        self.fail_dir = fail_dir
        self.delay = delay

    def __call__(self, fd: int) -> None:
        st = os.fstat(fd)
        is_dir = stat.S_ISDIR(st.st_mode)
        with self.lock:
            self.calls.append((st.st_ino, is_dir, bool(st.st_mode & stat.S_IXUSR)))
        if self.delay:
            time.sleep(self.delay)
        if (is_dir and self.fail_dir) or (not is_dir and st.st_ino in self.fail_ino):
            raise OSError(errno.EIO, "Input/output error")
        os.fsync(fd)


def _message(store: QueueStore, i: int, body: bytes = b"Subject: x\n\nbody\n"):
    m = store.create()
    m.set_sender("s@example.org")
    m.add_recipient(f"r{i}@example.org")
    m.write(body)
    return m


def _ino(store: QueueStore, m) -> int:
    return os.stat(store.path("incoming", m.queue_id)).st_ino


def _run(coro, timeout: float = 20.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def test_group_commit_syncs_every_file_once_and_the_directory_after(tmp_path):
    fs = RecordingFsync(delay=0.002)     # slow enough that later files join a round
    store = QueueStore(str(tmp_path / "q"), fsync=fs)
    store.ensure_layout()
    msgs = [_message(store, i) for i in range(30)]
    inos = {m.queue_id: _ino(store, m) for m in msgs}
    fs.calls.clear()

    async def main():
        await asyncio.gather(*(m.commit_async() for m in msgs))

    _run(main())
    assert all(m.committed for m in msgs)
    assert sorted(store.scan("incoming")) == sorted(inos)
    for qid, ino in inos.items():
        mine = [(i, c) for i, (n, d, c) in enumerate(fs.calls) if n == ino and not d]
        # DESIGN.md 1: data durable before the marker; the marker itself is not
        # fsync'd (a crash that takes it: QueueStore.recover_unmarked).
        assert [c for _, c in mine] == [False], qid
        assert os.stat(store.path("incoming", qid)).st_mode & 0o100, qid
        dirs_after = [i for i, (_, d, _) in enumerate(fs.calls) if d and i > mine[0][0]]
        assert dirs_after, qid          # a directory fsync started after the file's first one
    dir_syncs = sum(1 for _, d, _ in fs.calls if d)
    assert 1 <= dir_syncs < 30           # shared: far fewer directory fsyncs than files
    with store.open(msgs[0].queue_id) as q:
        assert q.read_content() == b"Subject: x\n\nbody\n"


def test_a_failed_file_fails_alone(tmp_path):
    fs = RecordingFsync()
    store = QueueStore(str(tmp_path / "q"), fsync=fs)
    store.ensure_layout()
    msgs = [_message(store, i) for i in range(5)]
    bad = msgs[2]
    fs.fail_ino = {_ino(store, bad)}

    async def main():
        return await asyncio.gather(*(m.commit_async() for m in msgs), return_exceptions=True)

    results = _run(main())
    assert isinstance(results[2], QueueWriteError) and results[2].errno == errno.EIO
    assert [r for i, r in enumerate(results) if i != 2] == [None] * 4
    assert not bad.committed
    assert sorted(store.scan("incoming")) == sorted(m.queue_id for m in msgs if m is not bad)
    assert bad.queue_id not in os.listdir(store.path("incoming"))


def test_a_failed_directory_fsync_fails_the_round_and_leaves_no_file(tmp_path):
    fs = RecordingFsync()
    store = QueueStore(str(tmp_path / "q"), fsync=fs)
    store.ensure_layout()
    msgs = [_message(store, i) for i in range(4)]
    fs.fail_dir = True

    async def main():
        return await asyncio.gather(*(m.commit_async() for m in msgs), return_exceptions=True)

    results = _run(main())
    assert all(isinstance(r, QueueWriteError) for r in results)
    assert not any(m.committed for m in msgs)
    assert os.listdir(store.path("incoming")) == []
    fs.fail_dir = False                  # the fault goes away: the next message is fine
    m = _message(store, 9)
    _run(m.commit_async())
    assert store.scan("incoming") == [m.queue_id]


def test_a_cancelled_commit_never_reports_success_and_abort_cleans_up(tmp_path):
    fs = RecordingFsync(delay=0.05)
    store = QueueStore(str(tmp_path / "q"), fsync=fs)
    store.ensure_layout()
    m = _message(store, 1)

    async def main():
        task = asyncio.ensure_future(m.commit_async())
        await asyncio.sleep(0.01)        # the round is running
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        m.abort()
        await asyncio.sleep(0.3)         # the round ends; its fd was the batcher's to close

    _run(main())
    assert not m.committed
    assert os.listdir(store.path("incoming")) == []


def test_small_message_is_one_write_and_large_one_reads_back(tmp_path):
    writes: list[int] = []

    def counting_write(fd, data):
        writes.append(len(data))
        return os.write(fd, data)

    store = QueueStore(str(tmp_path / "q"), write=counting_write)
    store.ensure_layout()
    small = _message(store, 1)
    writes.clear()
    _run(small.commit_async())
    assert len(writes) == 1               # header + content + envelope together
    big_body = b"Subject: big\n\n" + b"y" * 99 + b"\n"
    big = store.create()
    big.set_sender("s@example.org")
    big.add_recipient("r@example.org")
    for _ in range(2000):                 # 200 kB: several buffer flushes, then the header
        big.write(big_body[14:] if _ else big_body)
    _run(big.commit_async())
    with store.open(big.queue_id) as q:
        data = q.read_content()
        assert data.startswith(b"Subject: big\n\n") and len(data) == big.content_size
        assert [r.address for r in q.recipients] == ["r@example.org"]
    with store.open(small.queue_id) as q:
        assert q.read_content() == b"Subject: x\n\nbody\n"
        assert q.sender == "s@example.org"


def test_sync_commit_keeps_its_order_after_the_buffered_header(tmp_path):
    fs = RecordingFsync()
    store = QueueStore(str(tmp_path / "q"), fsync=fs)
    store.ensure_layout()
    m = _message(store, 1)
    fs.calls.clear()
    m.commit()
    assert [(d, c) for _, d, c in fs.calls] == [(False, False), (True, True)]
    with store.open(m.queue_id) as q:
        assert q.read_content() == b"Subject: x\n\nbody\n"


def test_envelope_changes_after_sizing_are_stored(tmp_path):
    store = QueueStore(str(tmp_path / "q"))
    store.ensure_layout()
    m = _message(store, 1)
    before = len(m.packed_envelope())
    m.add_recipient("late@example.org")
    m.set_attribute("helo_name", "client.example")
    assert len(m.packed_envelope()) > before
    _run(m.commit_async())
    with store.open(m.queue_id) as q:
        assert [r.address for r in q.recipients] == ["r1@example.org", "late@example.org"]
        assert q.attributes["helo_name"] == "client.example"


def test_batcher_thread_ends_when_idle_and_comes_back(tmp_path, monkeypatch):
    monkeypatch.setattr(CommitBatcher, "IDLE", 0.05)
    store = QueueStore(str(tmp_path / "q"), fsync=RecordingFsync())
    store.ensure_layout()
    m = _message(store, 1)
    _run(m.commit_async())
    batcher = store_mod.commit_batcher(store.path("incoming"), store._fsync)
    deadline = time.monotonic() + 5
    while batcher._running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not batcher._running
    m2 = _message(store, 2)
    _run(m2.commit_async())
    assert m2.committed


def test_commits_from_two_event_loops_are_answered_in_their_own_loop(tmp_path):
    store = QueueStore(str(tmp_path / "q"), fsync=RecordingFsync(delay=0.005))
    store.ensure_layout()
    results: dict[str, list] = {}

    def run(name):
        msgs = [_message(store, i) for i in range(5)]

        async def main():
            await asyncio.gather(*(m.commit_async() for m in msgs))
            return [m.committed for m in msgs]
        results[name] = asyncio.run(main())

    threads = [threading.Thread(target=run, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert results == {"a": [True] * 5, "b": [True] * 5}
    assert len(store.scan("incoming")) == 10


# ---------------------------------------------------------------- qmgr wake-ups

def _fifo_reader(queue_dir: str) -> int:
    path = os.path.join(queue_dir, "public", "qmgr")
    os.mkfifo(path)
    return os.open(path, os.O_RDONLY | os.O_NONBLOCK)


def _drain(fd: int) -> bytes:
    try:
        return os.read(fd, 100)
    except BlockingIOError:
        return b""


def test_wake_qmgr_sends_one_byte_per_loop_turn(tmp_path):
    from postwell.cleanup.service import wake_qmgr
    store = QueueStore(str(tmp_path / "q"))
    store.ensure_layout()
    rfd = _fifo_reader(store.queue_directory)
    try:
        async def main():
            for _ in range(5):
                wake_qmgr(store.queue_directory)
            assert _drain(rfd) == b""          # not yet: at the end of this turn
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            first = _drain(rfd)
            wake_qmgr(store.queue_directory)   # a later turn wakes again
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            return first, _drain(rfd)

        assert asyncio.run(main()) == (b"I", b"I")
        wake_qmgr(store.queue_directory)       # no loop: at once
        assert _drain(rfd) == b"I"
    finally:
        os.close(rfd)


def test_smtpd_style_commits_wake_the_qmgr_after_the_commit(tmp_path):
    from postwell.cleanup import Cleanup
    from postwell.config import load_config
    from postwell.log import NullLog
    etc = tmp_path / "etc"
    etc.mkdir()
    queue = tmp_path / "q"
    (etc / "main.cf").write_text(f"queue_directory = {queue}\nmyhostname = mx.example.test\n")
    config = load_config(str(etc))
    store = QueueStore(str(queue))
    store.ensure_layout()
    rfd = _fifo_reader(str(queue))
    log = NullLog("cleanup")
    cleanup = Cleanup(config, store, log)
    try:
        async def main():
            sessions = []
            for i in range(6):
                cs = cleanup.open()
                cs.set_sender("s@example.org")
                cs.add_recipient(f"r{i}@example.org")
                cs.write(b"Subject: hi\r\n\r\nbody\r\n")
                sessions.append(cs)
            replies = await asyncio.gather(*(cs.finish() for cs in sessions))
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            return replies

        replies = asyncio.run(main())
        assert [r.code for r in replies] == [250] * 6
        woken = _drain(rfd)
        assert 1 <= len(woken) <= 6 and set(woken) == {ord("I")}
        assert len(store.scan("incoming")) == 6
    finally:
        os.close(rfd)


# ---------------------------------------------------------------- log lines

def test_log_lines_carry_the_pid_of_a_forked_child(tmp_path):
    from postwell.log import MailLog
    path = tmp_path / "maillog"
    log = MailLog("smtpd", maillog_file=str(path), hostname="mx.example.test")
    log.info("parent before")
    pid = os.fork()
    if pid == 0:
        try:
            log.info("child")
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    log.info("parent after")
    lines = path.read_text().splitlines()
    me = os.getpid()
    assert lines[0].endswith(f"mx postfix/smtpd[{me}]: parent before")
    assert lines[1].endswith(f"mx postfix/smtpd[{pid}]: child")
    assert lines[2].endswith(f"mx postfix/smtpd[{me}]: parent after")
    log.program = "postfix/submission/smtpd"      # a changed name shows at once
    log.info("renamed")
    assert path.read_text().splitlines()[3].endswith(f"postfix/submission/smtpd[{me}]: renamed")


def test_mail_date_cache_follows_the_clock_and_the_zone(monkeypatch):
    from postwell.cleanup.service import mail_date
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    try:
        assert mail_date(86400.2) == "Fri,  2 Jan 1970 00:00:00 +0000 (UTC)"
        assert mail_date(86400.9) == "Fri,  2 Jan 1970 00:00:00 +0000 (UTC)"
        assert mail_date(86401.0) == "Fri,  2 Jan 1970 00:00:01 +0000 (UTC)"
        monkeypatch.setenv("TZ", "EST5")
        time.tzset()
        assert mail_date(86401.0) == "Thu,  1 Jan 1970 19:00:01 -0500 (EST)"
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
