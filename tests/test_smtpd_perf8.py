"""Issue 8, acceptance CPU: guards for speed work on the group commit.

The commit order of docs/architecture.md (fsync(file); fchmod(0700), the
"complete" marker; fsync(directory); only then the answer that allows a 250)
as commit_async() and its CommitBatcher thread keep it, including the paths a
faster hand-off between the thread and the event loop could get wrong: an
answer before the round's fsyncs, a marker before the data fsync, a failed
marker, a cancelled waiter, a round whose event loop has closed.
"""

from __future__ import annotations

import asyncio
import errno
import os
import stat
import threading

import pytest

from postwell.queue import QueueStore, QueueWriteError
from postwell.queue import store as store_mod
from postwell.queue.store import COMPLETE_MODE, CommitBatcher


class Recorder:
    """fsync stand-in: records (is_dir, thread, marker already set) per call."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.lock = threading.Lock()
        self.calls: list[tuple[bool, str, bool]] = []
        self.gate = gate

    def __call__(self, fd: int) -> None:
        if self.gate is not None and threading.current_thread().name == "qcommit":
            assert self.gate.wait(10)
        st = os.fstat(fd)
        with self.lock:
            self.calls.append((stat.S_ISDIR(st.st_mode), threading.current_thread().name,
                               bool(st.st_mode & stat.S_IXUSR)))
        os.fsync(fd)


def _store(tmp_path, fsync) -> QueueStore:
    store = QueueStore(str(tmp_path / "q"), fsync=fsync)
    store.ensure_layout()
    return store


def _message(store: QueueStore, i: int = 0):
    m = store.create()
    m.set_sender("s@example.org")
    m.add_recipient(f"r{i}@example.org")
    m.write(b"Subject: x\n\nbody\n")
    return m


def _mode(store: QueueStore, qid: str) -> int:
    return stat.S_IMODE(os.stat(store.path("incoming", qid)).st_mode)


def test_marker_between_file_and_directory_fsync_and_before_the_answer(tmp_path):
    rec = Recorder()
    store = _store(tmp_path, rec)
    rec.calls.clear()                  # ensure_layout's own directory fsyncs
    msgs = [_message(store, i) for i in range(3)]

    async def main():
        await asyncio.gather(*(m.commit_async() for m in msgs))
        # Answered: every file is marked by now.
        return [_mode(store, m.queue_id) for m in msgs]
    modes = asyncio.run(main())
    assert modes == [COMPLETE_MODE] * 3
    assert all(m.committed for m in msgs)
    calls = rec.calls
    assert {name for _, name, _ in calls} == {"qcommit"}
    # Each file fsync'd before its marker ...
    assert [marked for is_dir, _, marked in calls if not is_dir] == [False] * 3
    # ... and the directory fsync'd after the last file's, once per round.
    last_file = max(i for i, (is_dir, _, _) in enumerate(calls) if not is_dir)
    assert calls[-1][0] and last_file < len(calls) - 1
    assert len(store.scan("incoming")) == 3


def test_file_is_unmarked_until_the_round_answers(tmp_path):
    gate = threading.Event()
    store = _store(tmp_path, Recorder(gate))
    m = _message(store)

    async def main():
        task = asyncio.ensure_future(m.commit_async())
        for _ in range(5):
            await asyncio.sleep(0)
        # The round waits in its fsync: not durable, so neither marked nor answered.
        before = (_mode(store, m.queue_id), task.done())
        gate.set()
        await asyncio.wait_for(task, 10)
        return before, _mode(store, m.queue_id)
    before, after = asyncio.run(main())
    assert before == (0o600, False)
    assert after == COMPLETE_MODE
    assert store.scan("incoming") == [m.queue_id]


def test_marker_failure_fails_the_commit_and_leaves_no_file(tmp_path, monkeypatch):
    store = _store(tmp_path, Recorder())
    m = _message(store)

    def fchmod(fd, mode):
        raise OSError(errno.EIO, "Input/output error")
    monkeypatch.setattr(store_mod.os, "fchmod", fchmod)

    async def main():
        with pytest.raises(QueueWriteError):
            await m.commit_async()
    asyncio.run(main())
    assert not m.committed
    assert os.listdir(store.path("incoming")) == []


def test_cancelled_waiter_gets_no_marker_and_abort_removes_the_file(tmp_path):
    gate = threading.Event()
    store = _store(tmp_path, Recorder(gate))
    m = _message(store)

    async def main():
        task = asyncio.ensure_future(m.commit_async())
        for _ in range(5):
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        m.abort()                      # the session's clean-up after a lost client
        gate.set()
        # Let the round finish and its answer run in this loop.
        for _ in range(200):
            await asyncio.sleep(0.01)
            if store_mod._batchers and all(
                    not b._running or b._idle for b in store_mod._batchers.values()):
                break
        await asyncio.sleep(0.05)
    asyncio.run(main())
    assert os.listdir(store.path("incoming")) == []


def test_round_for_a_closed_loop_still_marks_its_durable_files(tmp_path):
    store = _store(tmp_path, Recorder())
    m = _message(store)
    m._write_all()
    fd, m._fd = m._fd, None
    loop = asyncio.new_event_loop()
    fut = loop.create_future()
    loop.close()
    batcher = CommitBatcher(store.path("incoming"), store._fsync)
    item = (fd, m.path, loop, fut, m._dir_fd, store)
    batcher._answer([item], batcher._round([item]))
    assert _mode(store, m.queue_id) == COMPLETE_MODE
    with pytest.raises(OSError):
        os.fstat(fd)                   # closed by the round


def test_sync_commit_path_unchanged(tmp_path):
    rec = Recorder()
    store = _store(tmp_path, rec)
    m = _message(store)
    m.commit()
    assert m.committed and _mode(store, m.queue_id) == COMPLETE_MODE
    q = store.open(m.queue_id)
    try:
        assert q.envelope.sender == "s@example.org"
    finally:
        q.close()
