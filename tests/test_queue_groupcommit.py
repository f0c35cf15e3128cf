"""Group commit of directory fsyncs (queue.store.DirSyncGroup).

The property that matters (DESIGN.md 1): a caller returns only after an
fsync that *started after* its call has completed.  Sharing is the speed-up:
many callers at once cost far fewer fsyncs than callers.
"""

from __future__ import annotations

import os
import threading
import time

import pytest

from postwell.queue import QueueStore
from postwell.queue.store import DirSyncGroup


class SlowFsync:
    """Records each fsync's start/end order; slow enough that callers pile up."""

    def __init__(self, delay: float = 0.01, fail: set[int] | None = None) -> None:
        self.delay = delay
        self.lock = threading.Lock()
        self.seq = 0
        self.runs: list[tuple[int, int]] = []    # (start seq, end seq)
        self.fail = fail or set()

    def tick(self) -> int:
        with self.lock:
            self.seq += 1
            return self.seq

    def __call__(self, fd: int) -> None:
        start = self.tick()
        time.sleep(self.delay)
        n = len(self.runs)
        self.runs.append((start, self.tick()))
        if n in self.fail:
            raise OSError(5, "Input/output error")


def test_every_caller_waits_for_an_fsync_that_started_after_it(tmp_path):
    group = DirSyncGroup()
    fs = SlowFsync()
    results: list[tuple[int, int]] = []
    lock = threading.Lock()

    def caller():
        called = fs.tick()
        group.sync(str(tmp_path), fs)
        returned = fs.tick()
        with lock:
            results.append((called, returned))

    threads = [threading.Thread(target=caller) for _ in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 40
    for called, returned in results:
        # Some fsync began after the call and ended before the return.
        assert any(called < start and end < returned for start, end in fs.runs), (called, returned)
    # Never two at once, and shared: far fewer fsyncs than callers.
    for (s1, e1), (s2, _) in zip(fs.runs, fs.runs[1:]):
        assert e1 < s2
    assert len(fs.runs) < 40


def test_a_failed_fsync_reaches_every_caller_that_relied_on_it(tmp_path):
    group = DirSyncGroup()
    fs = SlowFsync(delay=0.05, fail={1})
    errors: list[BaseException | None] = []
    lock = threading.Lock()
    first = threading.Thread(target=lambda: group.sync(str(tmp_path), fs))
    first.start()
    time.sleep(0.02)       # the first fsync is running: these callers share the second

    def caller():
        try:
            group.sync(str(tmp_path), fs)
            err = None
        except OSError as exc:
            err = exc
        with lock:
            errors.append(err)

    threads = [threading.Thread(target=caller) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads + [first]:
        t.join(30)
    assert len(fs.runs) == 2
    assert len(errors) == 5 and all(isinstance(e, OSError) for e in errors)
    group.sync(str(tmp_path), fs)          # the next generation is a fresh try


def test_concurrent_commits_are_all_complete_and_share_fsyncs(tmp_path):
    synced: list[int] = []
    lock = threading.Lock()

    def counting_fsync(fd):
        with lock:
            synced.append(fd)
        os.fsync(fd)

    store = QueueStore(str(tmp_path / "q"), fsync=counting_fsync)
    store.ensure_layout()
    msgs = []
    for i in range(30):
        m = store.create()
        m.set_sender("s@x")
        m.add_recipient(f"r{i}@x")
        m.write(b"Subject: x\n\nbody\n")
        msgs.append(m)
    synced.clear()
    threads = [threading.Thread(target=m.commit) for m in msgs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert all(m.committed for m in msgs)
    assert sorted(store.scan("incoming")) == sorted(m.queue_id for m in msgs)
    # One file fsync each, plus at most one directory fsync each.
    assert 30 <= len(synced) <= 60


@pytest.mark.parametrize("n", [1, 3])
def test_mark_done_uses_datasync_and_survives_reopen(tmp_path, n):
    store = QueueStore(str(tmp_path / "q"))
    store.ensure_layout()
    m = store.create()
    m.set_sender("s@x")
    for i in range(n):
        m.add_recipient(f"r{i}@x")
    m.write(b"x\n")
    m.commit()
    with store.open(m.queue_id) as q:
        q.mark_done(q.recipients[:1])
    with store.open(m.queue_id) as q:
        assert [r.done for r in q.recipients] == [True] + [False] * (n - 1)


def _dir_fd(fd: int) -> bool:
    import stat
    return stat.S_ISDIR(os.fstat(fd).st_mode)


def test_commit_async_syncs_file_and_name_before_returning(tmp_path):
    import asyncio
    events = []

    def fsync(fd):
        events.append("dir" if _dir_fd(fd) else "file")
        os.fsync(fd)

    store = QueueStore(str(tmp_path / "q"), fsync=fsync)
    store.ensure_layout()
    m = store.create()
    m.set_sender("s@x")
    m.add_recipient("a@x")
    m.write(b"x\n")
    events.clear()
    asyncio.run(asyncio.wait_for(m.commit_async(), 10))
    assert m.committed
    assert sorted(events) == ["dir", "file"]
    assert store.scan("incoming") == [m.queue_id]


@pytest.mark.parametrize("failing", ["dir", "file"])
def test_commit_async_failure_leaves_no_file(tmp_path, failing):
    import asyncio
    from postwell.queue import QueueWriteError

    armed = []

    def fsync(fd):
        if armed and ("dir" if _dir_fd(fd) else "file") == failing:
            raise OSError(5, "Input/output error")
        os.fsync(fd)

    store = QueueStore(str(tmp_path / "q"), fsync=fsync)
    store.ensure_layout()
    armed.append(True)
    m = store.create()
    m.set_sender("s@x")
    m.add_recipient("a@x")
    m.write(b"x\n")
    with pytest.raises(QueueWriteError):
        asyncio.run(asyncio.wait_for(m.commit_async(), 10))
    assert not m.committed
    assert not os.path.exists(store.path("incoming", m.queue_id))


def test_scan_skips_known_ids(tmp_path):
    store = QueueStore(str(tmp_path / "q"))
    store.ensure_layout()
    ids = []
    for i in range(3):
        m = store.create()
        m.set_sender("s@x")
        m.add_recipient("a@x")
        m.write(b"x\n")
        m.commit()
        ids.append(m.queue_id)
    assert store.scan("incoming") == sorted(ids)
    assert store.scan("incoming", skip={ids[0]}) == sorted(ids[1:])


def test_dir_syncer_answers_each_request_after_a_later_fsync(tmp_path, monkeypatch):
    from postwell.queue.store import DirSyncer
    fs = SlowFsync(delay=0.005)
    syncer = DirSyncer(str(tmp_path), fs)
    monkeypatch.setattr(DirSyncer, "IDLE", 0.05)
    stamps = []
    futs = []
    for _ in range(50):
        stamps.append(fs.tick())
        futs.append(syncer.request())
        time.sleep(0.0005)
    for f in futs:
        f.result(10)
    done = fs.tick()
    for called in stamps:
        assert any(called < start and end < done for start, end in fs.runs)
    assert 1 <= len(fs.runs) < 50
    for (s1, e1), (s2, _) in zip(fs.runs, fs.runs[1:]):
        assert e1 < s2               # one at a time
    time.sleep(0.2)                  # the idle thread has ended; the next request starts one
    assert not syncer._running
    syncer.request().result(10)


def test_dir_syncer_error_reaches_the_batch(tmp_path):
    from postwell.queue.store import DirSyncer
    fs = SlowFsync(delay=0.0, fail={0})
    syncer = DirSyncer(str(tmp_path), fs)
    with pytest.raises(OSError):
        syncer.request().result(10)
    syncer.request().result(10)      # a fresh fsync, which works


def test_move_and_remove_without_sync(tmp_path):
    synced = []
    store = QueueStore(str(tmp_path / "q"), fsync=lambda fd: synced.append(fd) or os.fsync(fd))
    store.ensure_layout()
    m = store.create()
    m.set_sender("s@x")
    m.add_recipient("a@x")
    m.write(b"x\n")
    m.commit()
    synced.clear()
    store.move(m.queue_id, "incoming", "active", sync=False)
    assert store.scan("active") == [m.queue_id] and synced == []
    assert store.remove(m.queue_id, "active", sync=False) and synced == []
    assert store.scan("active") == []
