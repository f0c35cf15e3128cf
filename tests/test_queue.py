"""Queue store: format, ids, durability rules, state moves, side logs."""

from __future__ import annotations

import asyncio
import errno
import os
import stat

import pytest

from postwell.queue import (CorruptQueueFile, QueueFileNotFound, QueueNoSpaceError, QueueStore,
                            QueueWriteError, is_queue_id, make_queue_id, notify_qmgr)
from postwell.queue import format as qf


class FakeClock:
    def __init__(self, t=1_800_000_000.123456):
        self.t = t

    def __call__(self):
        return self.t


@pytest.fixture
def store(tmp_path):
    s = QueueStore(str(tmp_path / "q"), clock=FakeClock())
    s.ensure_layout()
    return s


def queue_one(store, body=b"Subject: t\n\nhello\n", rcpts=("a@x.test", "b@x.test")):
    m = store.create()
    m.set_sender("s@x.test", ret="HDRS", envid="E1", smtputf8=True, body_type="8BITMIME")
    for r in rcpts:
        m.add_recipient(r, orig="O" + r, orcpt="rfc822;" + r, notify="SUCCESS,FAILURE")
    m.set_attribute("client_name", "localhost")
    m.set_attribute("client_address", "127.0.0.1")
    m.write(body)
    m.commit()
    return m


def test_layout_modes(store):
    for name in ("incoming", "active", "deferred", "hold", "corrupt", "maildrop", "defer",
                 "bounce", "public", "pid"):
        assert os.path.isdir(store.path(name))
    assert stat.S_IMODE(os.stat(store.path("incoming")).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(store.path("public")).st_mode) == 0o711
    store.ensure_layout()   # idempotent


def test_queue_id_format(store):
    m = store.create()
    ino = os.stat(store.path("incoming", m.queue_id)).st_ino
    assert m.queue_id == f"{123456:05X}{ino:X}"
    assert is_queue_id(m.queue_id)
    assert make_queue_id(5, 0xABC) == "00005ABC"
    assert not is_queue_id("tmp.1.2") and not is_queue_id("abc123")
    m.abort()
    assert os.listdir(store.path("incoming")) == []


def test_id_collision_in_other_queue_is_prevented_by_the_start_up_rename(store, monkeypatch):
    # A stray file carries the id this inode would get (restored backup...).  create()
    # looks only into incoming/ (issue 8); the qmgr's start-up renames any file whose
    # name does not carry its inode number, so no such clash is left for it to meet.
    stray = store.path("deferred", "1E240ABC")
    with open(stray, "wb") as f:
        f.write(b"restored")
    ino = os.stat(stray).st_ino
    assert ino != 0xABC
    new = make_queue_id(0x1E240, ino)
    assert store.rename_misnamed() == [("deferred", "1E240ABC", new)]
    assert store.rename_misnamed() == []
    with open(store.path("deferred", new), "rb") as f:
        assert f.read() == b"restored"

    class St:
        st_ino = 0xABC
        st_mode = stat.S_IFREG | 0o600
    real_fstat = os.fstat
    monkeypatch.setattr(os, "fstat", lambda fd: St())
    m = store.create()
    monkeypatch.setattr(os, "fstat", real_fstat)
    assert m.queue_id == "1E240ABC"
    assert not os.path.exists(stray)
    m.abort()


def test_link_never_replaces_existing_incoming_name(store, monkeypatch):
    real_link = os.link
    calls = []

    def link(src, dst):
        calls.append(dst)
        if len(calls) == 1:
            raise FileExistsError(errno.EEXIST, "exists", dst)
        return real_link(src, dst)
    monkeypatch.setattr(os, "link", link)
    m = store.create()
    assert len(calls) == 2
    assert calls[0] != calls[1]
    assert m.queue_id.startswith(f"{123457:05X}")
    assert sorted(os.listdir(store.path("incoming"))) == [m.queue_id]


def test_roundtrip_envelope_and_content(store):
    m = queue_one(store)
    q = store.open(m.queue_id)
    assert q.queue_name == "incoming"
    assert q.sender == "s@x.test"
    assert [r.address for r in q.recipients] == ["a@x.test", "b@x.test"]
    r = q.recipients[0]
    assert (r.orig, r.orcpt, r.notify, r.done) == ("Oa@x.test", "rfc822;a@x.test", "SUCCESS,FAILURE", False)
    assert (q.ret, q.envid, q.smtputf8, q.body_type) == ("HDRS", "E1", True, "8BITMIME")
    assert q.attributes == {"client_name": "localhost", "client_address": "127.0.0.1"}
    assert q.arrival_time == pytest.approx(1_800_000_000.123456)
    assert q.read_content() == b"Subject: t\n\nhello\n"
    assert q.content_size == 18
    assert list(q.iter_content(chunk=5))[0] == b"Subje"
    q.close()


def test_null_sender_and_utf8(store):
    m = store.create()
    m.set_sender("")
    m.add_recipient("pelé@exämple.test")
    m.write(b"x\n")
    m.commit()
    q = store.open(m.queue_id)
    assert q.sender == "" and q.recipients[0].address == "pelé@exämple.test"


def test_incomplete_file_is_ignored(store):
    m = store.create()
    m.set_sender("s@x")
    m.add_recipient("a@x")
    m.write(b"data\n")
    assert store.scan("incoming") == []
    with pytest.raises(CorruptQueueFile):
        store.open(m.queue_id, "incoming")
    m.commit()
    assert store.scan("incoming") == [m.queue_id]
    assert stat.S_IMODE(os.stat(store.path("incoming", m.queue_id)).st_mode) == 0o700


def test_complete_marker_without_valid_header_is_corrupt(store):
    m = store.create()
    m.write(b"data\n")
    m._flush()
    os.chmod(store.path("incoming", m.queue_id), 0o700)   # marker but never committed
    with pytest.raises(CorruptQueueFile, match="magic"):
        store.open(m.queue_id)
    m.abort()


def test_truncation_at_every_offset_is_detected(store, tmp_path):
    m = queue_one(store, body=b"S: x\n\nb\n", rcpts=("a@x",))
    path = store.path("incoming", m.queue_id)
    data = open(path, "rb").read()
    for cut in range(len(data)):
        with open(path, "wb") as f:
            f.write(data[:cut])
        os.chmod(path, 0o700)
        with pytest.raises(CorruptQueueFile):
            store.open(m.queue_id).close()
    with open(path, "wb") as f:
        f.write(data)
    store.open(m.queue_id).close()


def test_corrupted_byte_in_envelope_is_detected(store):
    m = queue_one(store, rcpts=("a@x",))
    path = store.path("incoming", m.queue_id)
    data = bytearray(open(path, "rb").read())
    h = qf.unpack_header(bytes(data[:64]), len(data))
    bad = bytearray(data)
    bad[h.envelope_offset] = ord("Z")    # unknown record type
    open(path, "wb").write(bad)
    with pytest.raises(CorruptQueueFile, match="record type"):
        store.open(m.queue_id)
    bad = bytearray(data)
    bad[10] ^= 0xFF                      # header checksum
    open(path, "wb").write(bad)
    with pytest.raises(CorruptQueueFile, match="checksum"):
        store.open(m.queue_id)


def test_mark_done_survives_reopen_and_move(store):
    m = queue_one(store, rcpts=("a@x", "b@x", "c@x"))
    q = store.open(m.queue_id)
    store.move(m.queue_id, "incoming", "active")   # the open fd follows the file
    q.mark_done([q.recipients[1]])
    q.mark_done(["c@x"])
    q.close()
    q = store.open(m.queue_id)
    assert q.queue_name == "active"
    assert [r.done for r in q.recipients] == [False, True, True]
    assert [r.address for r in q.pending_recipients] == ["a@x"]
    q.mark_done([0])
    q.close()
    assert all(r.done for r in store.open(m.queue_id).recipients)


def test_mark_done_fsyncs(tmp_path):
    synced = []
    s = QueueStore(str(tmp_path / "q"), fsync=lambda fd: synced.append(fd) or os.fsync(fd))
    s.ensure_layout()
    m = queue_one(s, rcpts=("a@x",))
    synced.clear()
    with s.open(m.queue_id) as q:
        q.mark_done(q.recipients)
        assert len(synced) == 1
        q.mark_done(q.recipients)     # already done: nothing to sync
        assert len(synced) == 1


def test_commit_order_data_fsync_before_marker(tmp_path):
    events = []
    s = QueueStore(str(tmp_path / "q"))
    s.ensure_layout()

    def fsync(fd):
        st = os.fstat(fd)
        events.append(("dir" if stat.S_ISDIR(st.st_mode) else "file", bool(st.st_mode & stat.S_IXUSR)))
        os.fsync(fd)
    s._fsync = fsync
    m = s.create()
    m.set_sender("s@x")
    m.add_recipient("a@x")
    m.write(b"x\n")
    m.commit()
    # The data is durable before the marker goes on; the marker is not fsync'd
    # itself (QueueStore.recover_unmarked puts back one a crash took).
    assert events == [("file", False), ("dir", True)]
    assert os.stat(s.path("incoming", m.queue_id)).st_mode & stat.S_IXUSR


class FailingWriter:
    """Stands in for os.write: fails with ENOSPC after ``budget`` bytes."""

    def __init__(self, budget, err=errno.ENOSPC):
        self.budget, self.err = budget, err

    def __call__(self, fd, data):
        if len(data) > self.budget:
            raise OSError(self.err, os.strerror(self.err))
        self.budget -= len(data)
        return os.write(fd, data)


@pytest.mark.parametrize("budget", [0, 100, 70000])
def test_enospc_raises_and_leaves_no_file(tmp_path, budget):
    s = QueueStore(str(tmp_path / "q"), write=FailingWriter(budget))
    s.ensure_layout()
    m = s.create()
    m.set_sender("s@x")
    m.add_recipient("a@x")
    with pytest.raises(QueueNoSpaceError):
        for _ in range(4):
            m.write(b"y" * 40000)
        m.commit()
    with pytest.raises(QueueWriteError):
        m.commit()
    m.abort()
    assert os.listdir(s.path("incoming")) == []


def test_eio_on_fsync_removes_file(tmp_path):
    def bad_fsync(fd):
        raise OSError(errno.EIO, "I/O error")
    s = QueueStore(str(tmp_path / "q"))
    s.ensure_layout()
    s._fsync = bad_fsync
    m = s.create()
    m.set_sender("s@x")
    m.add_recipient("a@x")
    m.write(b"x\n")
    with pytest.raises(QueueWriteError) as ei:
        m.commit()
    assert ei.value.errno == errno.EIO
    assert os.listdir(s.path("incoming")) == []


def test_commit_async_many_in_flight(store):
    async def main():
        msgs = []
        for i in range(20):
            m = store.create()
            m.set_sender("s@x")
            m.add_recipient(f"r{i}@x")
            m.write(b"x\n")
            msgs.append(m)
        await asyncio.wait_for(asyncio.gather(*(m.commit_async() for m in msgs)), 30)
        return msgs
    msgs = asyncio.run(main())
    assert sorted(store.scan("incoming")) == sorted(m.queue_id for m in msgs)


def test_move_find_remove_scan(store):
    m = queue_one(store)
    qid = m.queue_id
    assert store.find(qid) == "incoming"
    store.move(qid, "incoming", "deferred")
    assert store.find(qid) == "deferred"
    assert store.scan("deferred") == [qid] and store.scan("incoming") == []
    store.append_defer_log(qid, "a@x.test", "4.4.1", "connect to x: Connection refused")
    store.append_bounce_log(qid, "b@x.test", "5.1.1", "no such user")
    assert store.remove(qid)
    assert store.find(qid) is None
    assert not os.path.exists(store.path("defer", qid))
    assert not os.path.exists(store.path("bounce", qid))
    with pytest.raises(QueueFileNotFound):
        store.open(qid)
    assert not store.remove(qid)
    assert store.find("../etc") is None


def test_scan_ignores_temporaries_and_garbage(store):
    queue_one(store)
    open(store.path("incoming", "tmp.1.2"), "wb").close()
    os.chmod(store.path("incoming", "tmp.1.2"), 0o700)
    open(store.path("incoming", "notes.txt"), "wb").close()
    assert len(store.scan("incoming")) == 1
    assert store.scan("nonexistent") == []


def test_next_attempt_in_mtime(store):
    m = queue_one(store)
    store.move(m.queue_id, "incoming", "deferred")
    store.set_next_attempt(m.queue_id, 1_900_000_000)
    assert store.next_attempt(m.queue_id) == 1_900_000_000
    store.move(m.queue_id, "deferred", "active")
    assert store.next_attempt(m.queue_id, "active") == 1_900_000_000   # rename keeps mtime


def test_defer_log_roundtrip_and_escaping(store):
    m = queue_one(store)
    store.append_defer_log(m.queue_id, "a@x.test", "4.4.1", "line1\nline2 \\ back")
    store.append_defer_log(m.queue_id, "b@x.test", "4.2.0", "busy")
    entries = store.read_defer_log(m.queue_id)
    assert [(e["recipient"], e["status"], e["reason"], e["action"]) for e in entries] == [
        ("a@x.test", "4.4.1", "line1\nline2 \\ back", "delayed"), ("b@x.test", "4.2.0", "busy", "delayed")]
    # A torn last entry (crash mid-append) is dropped, the rest kept.
    with open(store.path("defer", m.queue_id), "ab") as f:
        f.write(b"recipient=c@x\nstatus=4.")
    assert len(store.read_defer_log(m.queue_id)) == 2
    assert store.read_defer_log("NOSUCH") == []


def test_purge_stale(store):
    clock = store.clock
    stale = store.create()                     # never committed
    fresh = store.create()
    done = queue_one(store)
    tmp = store.path("incoming", "tmp.99.1")
    open(tmp, "wb").close()
    old = clock.t - 7200
    for p in (store.path("incoming", stale.queue_id), tmp, store.path("incoming", done.queue_id)):
        os.utime(p, (old, old))
    os.utime(store.path("incoming", fresh.queue_id), (clock.t, clock.t))
    removed = store.purge_stale()
    assert sorted(removed) == sorted([stale.queue_id, "tmp.99.1"])
    assert sorted(os.listdir(store.path("incoming"))) == sorted([fresh.queue_id, done.queue_id])
    stale.abort()
    fresh.abort()


def test_space_ok(tmp_path):
    s = QueueStore(str(tmp_path / "q"), message_size_limit=10_240_000)
    s.ensure_layout()
    assert s.space_ok(0)
    sv = os.statvfs(s.queue_directory)
    free = sv.f_bavail * sv.f_frsize
    assert not s.space_ok(free)
    s2 = QueueStore(str(tmp_path / "q"), queue_minfree=free + 1)
    assert not s2.space_ok(0)


def test_notify_qmgr_never_blocks(store):
    notify_qmgr(store.queue_directory)                       # no FIFO: ignored
    fifo = store.path("public", "qmgr")
    os.mkfifo(fifo, 0o622)
    notify_qmgr(store.queue_directory)                       # no reader: ENXIO ignored
    rfd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        for _ in range(70000):                               # more than the pipe holds: EAGAIN ignored
            notify_qmgr(store.queue_directory)
        assert os.read(rfd, 1) == b"I"
    finally:
        os.close(rfd)


def test_streaming_large_content_bounded_memory(store):
    import tracemalloc
    m = store.create()
    m.set_sender("s@x")
    m.add_recipient("a@x")
    chunk = b"z" * 65535 + b"\n"
    tracemalloc.start()
    for _ in range(320):           # 20 MB
        m.write(chunk)
    m.commit()
    _cur, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 2_000_000
    with store.open(m.queue_id) as q:
        assert q.content_size == 320 * 65536
        n = 0
        for part in q.iter_content():
            n += len(part)
        assert n == q.content_size


_CHILD = r"""
import sys, os, time
from postwell.queue import QueueStore
s = QueueStore(sys.argv[1])
done = s.create()
done.set_sender("s@x"); done.add_recipient("a@x"); done.write(b"committed\n"); done.commit()
m = s.create()
m.set_sender("s@x"); m.add_recipient("b@x")
m.write(b"x" * 200000)
print(done.queue_id, m.queue_id, flush=True)
time.sleep(30)
"""


def test_kill_9_mid_write_leaves_only_committed_mail(store):
    import subprocess
    import sys
    p = subprocess.Popen([sys.executable, "-c", _CHILD, store.queue_directory],
                         stdout=subprocess.PIPE, text=True)
    try:
        line = p.stdout.readline()
    finally:
        p.kill()
        p.wait(timeout=10)
    committed, partial = line.split()
    assert store.scan("incoming") == [committed]
    with store.open(committed) as q:
        assert q.read_content() == b"committed\n"
    with pytest.raises(CorruptQueueFile):
        store.open(partial)
    store.clock.t += 7200
    os.utime(store.path("incoming", partial), (store.clock.t - 7200, store.clock.t - 7200))
    assert store.purge_stale() == [partial]
    assert store.scan("incoming") == [committed]
