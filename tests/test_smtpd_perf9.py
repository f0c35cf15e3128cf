"""Issue 8, acceptance CPU: inode reuse through spare/ (queue/store.py).

A finished message removed with ``remove(sync=False)`` (the qmgr's path) leaves
its file, emptied, in spare/; ``create()`` renames such a file back into
incoming/ instead of making a new one (ext4 without a journal walks every
recently freed inode on each allocation).  These tests hold the rules that
keep that safe: a reused file is empty, unmarked and freshly stamped before it
gets an id; a file with another name, of another owner, a symlink or a
directory is never reused; the spare count is bounded; an old queue without
spare/ works as before; two processes never get the same inode.
"""

from __future__ import annotations

import asyncio
import os
import stat

import pytest

from postwell.queue import QueueStore
from postwell.queue import store as store_mod
from postwell.queue.store import COMPLETE_MODE, INCOMPLETE_MODE, SPARE_DIR


@pytest.fixture(autouse=True)
def no_listing_pause(monkeypatch):
    # The "spare/ was empty a moment ago" pause is per store; tests use fresh stores.
    monkeypatch.setattr(store_mod, "_spare_clock", _Ticker())


class _Ticker:
    """A monotonic clock that moves 10 s per call: no throttle ever holds."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        self.now += 10.0
        return self.now


def _store(tmp_path, name="q") -> QueueStore:
    store = QueueStore(str(tmp_path / name))
    store.ensure_layout()
    return store


def _commit(store: QueueStore, body: bytes = b"Subject: x\n\nbody\n", rcpt="r@example.org"):
    m = store.create()
    m.set_sender("s@example.org")
    m.add_recipient(rcpt)
    m.write(body)
    m.commit()
    return m


def _inode(store, queue, qid) -> int:
    return os.stat(store.path(queue, qid)).st_ino


def _finish(store: QueueStore, qid: str) -> None:
    """What the qmgr does with a delivered message."""
    store.move(qid, "incoming", "active", sync=False)
    assert store.remove(qid, "active", sync=False, logs=False)


def test_layout_has_spare_dir(tmp_path):
    store = _store(tmp_path)
    st = os.stat(store.path(SPARE_DIR))
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700


def test_finished_message_leaves_an_empty_spare_and_its_inode_comes_back(tmp_path):
    store = _store(tmp_path)
    old = _commit(store, b"Subject: old\n\n" + b"x" * 10000 + b"\n")
    ino = _inode(store, "incoming", old.queue_id)
    _finish(store, old.queue_id)
    assert not os.path.exists(store.path("active", old.queue_id))
    spares = os.listdir(store.path(SPARE_DIR))
    assert spares == [old.queue_id]
    st = os.stat(store.path(SPARE_DIR, old.queue_id))
    assert st.st_ino == ino and st.st_size == 0          # blocks freed at removal

    m = store.create()
    path = store.path("incoming", m.queue_id)
    st = os.stat(path)
    # Reused, and before any content: empty, not marked complete, not a message yet.
    assert st.st_ino == ino
    assert st.st_size == 0 and stat.S_IMODE(st.st_mode) == INCOMPLETE_MODE
    assert store.scan("incoming") == []
    assert os.listdir(store.path(SPARE_DIR)) == []
    assert m.queue_id[5:] == format(ino, "X")           # the id names the inode as ever
    m.set_sender("new@example.org")
    m.add_recipient("rcpt@example.net")
    m.write(b"Subject: new\n\nshort\n")
    m.commit()
    assert stat.S_IMODE(os.stat(path).st_mode) == COMPLETE_MODE
    qm = store.open(m.queue_id)
    try:
        assert qm.sender == "new@example.org"
        assert [r.address for r in qm.recipients] == ["rcpt@example.net"]
        assert qm.read_content() == b"Subject: new\n\nshort\n"
    finally:
        qm.close()
    # Only the temporary and the id were ever in incoming/.
    assert os.listdir(store.path("incoming")) == [m.queue_id]


def test_reused_file_is_stamped_now(tmp_path):
    # purge_stale() removes incomplete files older than an hour: a spare that waited
    # long must not look old while its session is still writing.
    store = _store(tmp_path)
    old = _commit(store)
    _finish(store, old.queue_id)
    os.utime(store.path(SPARE_DIR, old.queue_id), (1000, 1000))
    m = store.create()
    assert os.stat(store.path("incoming", m.queue_id)).st_mtime > 1000
    assert store.purge_stale() == []
    m.abort()


def test_async_commit_of_a_reused_file(tmp_path):
    store = _store(tmp_path)
    old = _commit(store, b"x" * 70000 + b"\n")
    _finish(store, old.queue_id)

    async def main():
        m = store.create()
        m.set_sender("a@example.org")
        m.add_recipient("b@example.org")
        m.write(b"Subject: y\n\nbody\n")
        await m.commit_async()
        return m
    m = asyncio.run(main())
    assert store.scan("incoming") == [m.queue_id]
    qm = store.open(m.queue_id)
    try:
        assert qm.read_content() == b"Subject: y\n\nbody\n"
    finally:
        qm.close()


def test_leftover_content_in_a_spare_is_emptied(tmp_path):
    store = _store(tmp_path)
    # A spare whose truncate never happened (the remover died between the steps).
    p = store.path(SPARE_DIR, "LEFTOVER")
    with open(p, "wb") as f:
        f.write(b"old message bytes\n" * 1000)
    os.chmod(p, COMPLETE_MODE)
    ino = os.stat(p).st_ino
    m = _commit(store, b"Subject: z\n\nnew\n")
    assert _inode(store, "incoming", m.queue_id) == ino
    qm = store.open(m.queue_id)
    try:
        assert qm.read_content() == b"Subject: z\n\nnew\n"
    finally:
        qm.close()


def test_spare_with_a_second_name_is_never_reused(tmp_path):
    # A crash can bring back the removed name: the inode then has two names, and
    # a new message in it would show under the old one too.
    store = _store(tmp_path)
    old = _commit(store, b"Subject: keep\n\nkeep me\n")
    _finish(store, old.queue_id)
    spare = store.path(SPARE_DIR, old.queue_id)
    other = str(tmp_path / "q" / "corrupt" / "OTHER")
    with open(spare, "wb") as f:
        f.write(b"still readable\n")
    os.link(spare, other)
    m = store.create()
    assert os.stat(store.path("incoming", m.queue_id)).st_ino != os.stat(other).st_ino
    with open(other, "rb") as f:
        assert f.read() == b"still readable\n"          # never truncated
    assert os.listdir(store.path(SPARE_DIR)) == []       # dropped from spare/
    assert os.listdir(store.path("incoming")) == [m.queue_id]
    m.abort()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a file of another user")
def test_spare_of_another_user_is_not_reused(tmp_path):
    store = _store(tmp_path)
    p = store.path(SPARE_DIR, "THEIRS")
    with open(p, "wb") as f:
        f.write(b"their bytes\n")
    os.chown(p, 12345, 12345)
    keep = os.open(p, os.O_RDONLY)       # holds the inode: its number cannot come back
    try:
        m = store.create()
        st = os.stat(store.path("incoming", m.queue_id))
        assert st.st_ino != os.fstat(keep).st_ino and st.st_uid == os.geteuid()
        assert os.pread(keep, 100, 0) == b"their bytes\n"     # never truncated
    finally:
        os.close(keep)
    assert os.listdir(store.path(SPARE_DIR)) == []
    assert os.listdir(store.path("incoming")) == [m.queue_id]
    m.abort()


def test_symlink_and_directory_in_spare_are_not_followed(tmp_path):
    store = _store(tmp_path)
    target = tmp_path / "target"
    target.write_bytes(b"not yours\n")
    os.symlink(target, store.path(SPARE_DIR, "LINK"))
    os.mkdir(store.path(SPARE_DIR, "DIR"))
    msgs = [store.create() for _ in range(2)]
    assert target.read_bytes() == b"not yours\n"
    assert sorted(os.listdir(store.path("incoming"))) == sorted(m.queue_id for m in msgs)
    for m in msgs:
        assert stat.S_ISREG(os.lstat(store.path("incoming", m.queue_id)).st_mode)
        m.abort()


def test_spare_count_is_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(store_mod, "SPARE_LIMIT", 2)
    store = _store(tmp_path)
    creator = _store(tmp_path)     # another process's view would not see the removals
    ids = [_commit(creator, rcpt=f"r{i}@example.org").queue_id for i in range(5)]
    for qid in ids:
        _finish(store, qid)
    assert len(os.listdir(store.path(SPARE_DIR))) == 2
    for q in ("incoming", "active"):
        assert os.listdir(store.path(q)) == []


def test_synced_removal_unlinks(tmp_path):
    store = _store(tmp_path)
    m = _commit(store)
    assert store.remove(m.queue_id)
    assert os.listdir(store.path(SPARE_DIR)) == []
    assert store.find(m.queue_id) is None


def test_removal_of_a_missing_message_is_false(tmp_path):
    store = _store(tmp_path)
    assert not store.remove("ABCDE123", "active", sync=False)
    assert not store.remove("ABCDE123", sync=False)
    assert os.listdir(store.path(SPARE_DIR)) == []


def test_queue_without_spare_dir_works_as_before(tmp_path):
    store = _store(tmp_path)
    os.rmdir(store.path(SPARE_DIR))
    store = QueueStore(store.queue_directory)         # made before spare/ existed
    m = _commit(store)
    _finish(store, m.queue_id)
    assert store.find(m.queue_id) is None
    assert not os.path.exists(store.path(SPARE_DIR))
    m2 = _commit(store)
    assert store.scan("incoming") == [m2.queue_id]


def test_two_creators_never_share_an_inode(tmp_path):
    a = _store(tmp_path)
    b = QueueStore(a.queue_directory)
    old = _commit(a)
    _finish(a, old.queue_id)
    # Both list spare/ and see the same one name; only one rename can win.
    ma, mb = a.create(), b.create()
    inos = {_inode(a, "incoming", ma.queue_id), _inode(b, "incoming", mb.queue_id)}
    assert len(inos) == 2
    for m in (ma, mb):
        m.set_sender("s@example.org")
        m.add_recipient("r@example.org")
        m.write(b"Subject: q\n\n" + m.queue_id.encode() + b"\n")
        m.commit()
    for m in (ma, mb):
        qm = a.open(m.queue_id)
        try:
            assert qm.read_content().endswith(m.queue_id.encode() + b"\n")
        finally:
            qm.close()


def test_stale_listing_falls_back_to_a_new_file(tmp_path):
    store = _store(tmp_path)
    old = _commit(store)
    _finish(store, old.queue_id)
    store.create().abort()           # lists spare/ (one name) and takes it
    # A listing that names files gone meanwhile (another process took them).
    store._spares = ["GONE1", "GONE2"]
    m = store.create()
    assert os.listdir(store.path("incoming")) == [m.queue_id]
    m.abort()


def test_big_message_is_unlinked_not_kept(tmp_path):
    # Emptying a big file on the qmgr's event loop would stall it: left to the last close.
    store = _store(tmp_path)
    m = _commit(store, b"Subject: big\n\n" + b"y" * (store_mod.SPARE_MAX_SIZE + 1) + b"\n")
    _finish(store, m.queue_id)
    assert os.listdir(store.path(SPARE_DIR)) == []
    assert store.find(m.queue_id) is None


def test_two_creators_share_a_pool_without_sharing_an_inode(tmp_path):
    a = _store(tmp_path)
    b = QueueStore(a.queue_directory)
    olds = [_commit(a, rcpt=f"o{i}@example.org") for i in range(20)]
    pool = set()
    for m in olds:
        pool.add(_inode(a, "incoming", m.queue_id))
        _finish(a, m.queue_id)
    made = []
    for i in range(20):
        for store in (a, b):             # the two smtpd workers, turn about
            m = store.create()
            made.append((m, _inode(store, "incoming", m.queue_id)))
    inodes = [ino for _, ino in made]
    assert len(set(inodes)) == len(inodes)
    reused = pool & set(inodes)
    assert len(reused) >= 10                       # most of the pool came back
    assert len(os.listdir(a.path(SPARE_DIR))) == len(pool) - len(reused)
    assert sorted(os.listdir(a.path("incoming"))) == sorted(m.queue_id for m, _ in made)
    for m, _ in made:
        m.abort()
    assert os.listdir(a.path("incoming")) == []


def test_smtpd_takes_the_inode_of_a_delivered_message(tmp_path):
    # The whole path: the smtpd's cleanup creates through the store, the "qmgr"
    # removes the first message as finished, the next message reuses its inode.
    import smtplib

    from test_smtpd import Running

    (tmp_path / "s").mkdir()
    r = Running(tmp_path / "s")
    try:
        def send(n):
            with smtplib.SMTP("127.0.0.1", r.port, timeout=10) as c:
                c.sendmail("a@example.org", ["b@example.org"], f"Subject: {n}\r\n\r\nbody {n}\r\n")
        send(1)
        (first,) = r.queued()
        ino = _inode(r.store, "incoming", first)
        _finish(r.store, first)
        send(2)
        (second,) = r.queued()
        assert second != first
        assert _inode(r.store, "incoming", second) == ino
        qm = r.store.open(second)
        try:
            content = qm.read_content()
        finally:
            qm.close()
        assert b"Subject: 2\n" in content and b"body 2\n" in content and b"body 1" not in content
    finally:
        r.stop()


def test_old_names_are_durably_gone_before_an_inode_is_reused(tmp_path):
    """The remover does not fsync active/: the creator does, once per listing of
    spare/ and before it renames anything out of it, so a system crash cannot
    bring an old queue file name back onto the next message's content."""
    events = []
    store = QueueStore(str(tmp_path / "q"), fsync=lambda fd: events.append(
        ("fsync", os.readlink(f"/proc/self/fd/{fd}"))))
    store.ensure_layout()
    old = _commit(store)
    ino = _inode(store, "incoming", old.queue_id)
    _finish(store, old.queue_id)
    real_rename = os.rename

    def rename(src, dst, *, src_dir_fd=None, dst_dir_fd=None):
        events.append(("rename", src))
        return real_rename(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)
    events.clear()
    os_rename = store_mod.os.rename
    store_mod.os.rename = rename
    try:
        m = store.create()
    finally:
        store_mod.os.rename = os_rename
    assert _inode(store, "incoming", m.queue_id) == ino
    take = events.index(("rename", old.queue_id))
    synced = {path for kind, path in events[:take] if kind == "fsync"}
    assert store.path("active") in synced and store.path("deferred") in synced
    m.abort()


def test_non_empty_listings_are_paced(tmp_path, monkeypatch):
    """At most one listing (and its directory fsyncs) per 50 ms: between them a
    creator whose list ran dry makes a fresh file."""
    store = _store(tmp_path)
    olds = [_commit(store, rcpt=f"o{i}@example.org") for i in range(2)]
    for m in olds:
        _finish(store, m.queue_id)
    clock = [5000.0]
    monkeypatch.setattr(store_mod, "_spare_clock", lambda: clock[0])
    inos = {os.stat(store.path(SPARE_DIR, m.queue_id)).st_ino for m in olds}
    first = store.create()                           # lists both, takes one
    assert _inode(store, "incoming", first.queue_id) in inos
    store._spares = []                               # as if another worker took the other
    second = store.create()                          # no new listing within 50 ms
    assert _inode(store, "incoming", second.queue_id) not in inos
    clock[0] += 0.06
    third = store.create()                           # listed again: the spare left
    assert _inode(store, "incoming", third.queue_id) in inos
    for m in (first, second, third):
        m.abort()


def test_remover_empties_before_the_file_is_claimable(tmp_path, monkeypatch):
    """The remover truncates while the file still has its queue name: a truncate by
    name in spare/ could land on the next message once a creator took the inode.
    A remover dying between the steps leaves an unmarked, empty file that no scan
    takes for mail (not an empty "complete" one that would look corrupt)."""
    store = _store(tmp_path)
    old = _commit(store)
    store.move(old.queue_id, "incoming", "active", sync=False)
    path = store.path("active", old.queue_id)
    seen = []
    real_rename = os.rename

    class Died(BaseException):
        pass

    def rename(src, dst, *a, **kw):
        if dst.startswith(store.path(SPARE_DIR)):
            st = os.stat(src)
            seen.append((st.st_size, stat.S_IMODE(st.st_mode)))
            raise Died()
        return real_rename(src, dst, *a, **kw)
    monkeypatch.setattr(store_mod.os, "rename", rename)
    with pytest.raises(Died):
        store.remove(old.queue_id, "active", sync=False, logs=False)
    assert seen == [(0, INCOMPLETE_MODE)]
    assert os.path.exists(path) and store.scan("active") == []


def test_qmgr_start_clears_a_cut_short_removal(tmp_path, monkeypatch):
    """What a remover killed between emptying and renaming leaves (an empty,
    unmarked file under its queue id) is removed at the qmgr's start; messages,
    even an unmarked non-empty one (a commit whose marker a crash took), stay."""
    store = _store(tmp_path)
    keep = _commit(store)
    store.move(keep.queue_id, "incoming", "active", sync=False)
    old = _commit(store)
    store.move(old.queue_id, "incoming", "active", sync=False)

    class Died(BaseException):
        pass
    real_rename = os.rename

    def rename(src, dst, *a, **kw):
        if dst.startswith(store.path(SPARE_DIR)):
            raise Died()
        return real_rename(src, dst, *a, **kw)
    monkeypatch.setattr(store_mod.os, "rename", rename)
    with pytest.raises(Died):
        store.remove(old.queue_id, "active", sync=False, logs=False)
    monkeypatch.undo()
    unmarked = _commit(store)
    store.move(unmarked.queue_id, "incoming", "deferred", sync=False)
    os.chmod(store.path("deferred", unmarked.queue_id), INCOMPLETE_MODE)

    from postwell.qmgr.manager import QueueManager
    from postwell.config.main import Config
    qm = QueueManager(Config(str(tmp_path), {}, {}, []), store)
    qm._start_up_checks()
    assert not os.path.exists(store.path("active", old.queue_id))
    assert store.scan("active") == [keep.queue_id]
    assert os.path.getsize(store.path("deferred", unmarked.queue_id)) > 0
    assert store.clear_retired() == []
