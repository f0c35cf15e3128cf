"""Issue 8 (local(8) CPU per delivery): functional checks of the changes made
for speed, not timings.

- Maildir files written as unnamed files (O_TMPFILE) and linked into new/ once
  their data is on disk (delivery/local_exec.py deliver_maildir_unnamed): the
  same names, headers, limits and durability as deliver_maildir(), and the
  named tmp/ file when the kernel cannot do it.
- Deliveries into one new/ at once share its fsync (local_exec._sync_new,
  DirSyncGroup.ticket): never reported before an fsync that began after
  their own link.
"""

from __future__ import annotations

import errno
import os
import re

import pytest

from postwell.delivery import local_exec, virtual
from postwell.delivery.local_exec import Identity, LocalCopy, op_file, op_mailbox, run_as
from postwell.queue import store as store_mod

from test_delivery_workers import GID, MSG, UID, copy_for, mailroot, root_only  # noqa: F401


@pytest.fixture(autouse=True)
def fresh_state(monkeypatch):
    # Each test decides afresh whether unnamed files work (a process-wide memo).
    monkeypatch.setitem(local_exec._unnamed_state, "ok", None)


def _copy(path, limit=0) -> LocalCopy:
    return LocalCopy(path=str(path) + "/", maildir=True, sender="sender@example.test",
                     recipient="user@example.test", orig="orig@example.test",
                     delivered="user@example.test", limit=limit, lock_methods=[],
                     hostname="mx/1:a", want_orig=True, want_delivered=True)


def _content(*chunks):
    return lambda: iter(chunks)


def test_unnamed_maildir_file_lands_in_new_with_the_usual_name_and_text(tmp_path):
    box = tmp_path / "Maildir"
    res = op_mailbox(_copy(box), "user", os.geteuid(), False, None, _content(b"Subject: a\n", b"\nbody\n"))
    assert res == {"status": "sent", "dsn": "2.0.0", "reason": "delivered to maildir"}
    assert local_exec._unnamed_state["ok"] is True
    # Missing directories are made, as deliver_maildir() makes them.
    assert sorted(p.name for p in box.iterdir()) == ["cur", "new", "tmp"]
    assert list((box / "tmp").iterdir()) == []
    [path] = list((box / "new").iterdir())
    st = path.stat()
    # The Maildir name carries device and inode (unique while the file lives),
    # the host name with / and : escaped, as deliver_maildir() names it.
    assert re.fullmatch(rf"\d+\.V{st.st_dev:x}I{st.st_ino:x}M\d+\.mx\\0571\\072a", path.name), path.name
    assert st.st_mode & 0o777 == 0o600 and st.st_nlink == 1
    assert path.read_bytes() == (b"Return-Path: <sender@example.test>\nX-Original-To: orig@example.test\n"
                                 b"Delivered-To: user@example.test\nSubject: a\n\nbody\n")


def test_same_bytes_as_the_named_tmp_file_way(tmp_path, monkeypatch):
    op_mailbox(_copy(tmp_path / "a"), "user", 0, False, None, _content(MSG))
    monkeypatch.setitem(local_exec._unnamed_state, "ok", False)
    op_mailbox(_copy(tmp_path / "b"), "user", 0, False, None, _content(MSG))
    [a] = list((tmp_path / "a" / "new").iterdir())
    [b] = list((tmp_path / "b" / "new").iterdir())
    assert a.read_bytes() == b.read_bytes()
    assert a.name.split(".", 1)[1].split("M")[0] != b.name.split(".", 1)[1].split("M")[0]  # own inodes


def test_over_the_limit_leaves_nothing_behind(tmp_path):
    box = tmp_path / "Maildir"
    res = op_mailbox(_copy(box, limit=20), "user", 0, False, None, _content(MSG))
    assert res["status"] == "bounced" and res["dsn"] == "5.2.2", res
    assert list((box / "new").iterdir()) == [] and list((box / "tmp").iterdir()) == []


def test_file_destination_maildir_uses_it_too(tmp_path):
    box = tmp_path / "filebox"
    res = op_file(_copy(box), _content(MSG))
    assert res["status"] == "sent", res
    assert len(list((box / "new").iterdir())) == 1
    assert local_exec._unnamed_state["ok"] is True


def test_new_directory_synced_when_names_are_not_ordered(tmp_path, monkeypatch):
    synced = []
    monkeypatch.setattr(local_exec, "_sync_new", lambda path: synced.append(path))
    monkeypatch.setattr(virtual, "maildir_name_ordered", lambda q, m: False)
    op_mailbox(_copy(tmp_path / "M"), "user", 0, False, None, _content(MSG))
    assert synced == [str(tmp_path / "M" / "new")]
    # Inside a worker's batch the new/ fsync is left to the batch.
    synced.clear()
    dirs = []
    virtual.defer_dir_syncs(dirs)
    try:
        op_mailbox(_copy(tmp_path / "M"), "user", 0, False, None, _content(MSG))
    finally:
        virtual.defer_dir_syncs(None)
    assert synced == [] and dirs == [str(tmp_path / "M" / "new")]


def test_no_new_directory_sync_when_the_file_system_orders_names(tmp_path, monkeypatch):
    synced = []
    monkeypatch.setattr(local_exec, "_sync_new", lambda path: synced.append(path))
    monkeypatch.setattr(virtual, "maildir_name_ordered", lambda q, m: True)
    op_mailbox(_copy(tmp_path / "M"), "user", 0, False, None, _content(MSG))
    assert synced == []


def test_a_failed_new_directory_sync_is_not_delivered(tmp_path, monkeypatch):
    def fail(path, fsync=None):
        raise OSError(errno.EIO, "Input/output error")
    monkeypatch.setattr(store_mod, "fsync_dir", fail)
    monkeypatch.setattr(virtual, "maildir_name_ordered", lambda q, m: False)
    res = op_mailbox(_copy(tmp_path / "M"), "user", 0, False, None, _content(MSG))
    assert res["status"] == "deferred" and res["dsn"] == "4.2.0", res


def test_no_o_tmpfile_falls_back_to_named_tmp_files(tmp_path, monkeypatch):
    real_open = os.open

    def no_tmpfile(path, flags, *a, **kw):
        if flags & os.O_TMPFILE == os.O_TMPFILE:
            raise OSError(errno.EOPNOTSUPP, "Operation not supported")
        return real_open(path, flags, *a, **kw)
    monkeypatch.setattr(local_exec.os, "open", no_tmpfile)
    res = op_mailbox(_copy(tmp_path / "M"), "user", 0, False, None, _content(MSG))
    assert res["status"] == "sent", res
    assert local_exec._unnamed_state["ok"] is False
    assert len(list((tmp_path / "M" / "new").iterdir())) == 1


def test_no_way_to_name_the_file_falls_back_and_redoes_it(tmp_path, monkeypatch):
    def refuse(fd, path):
        raise local_exec._CannotName("Operation not permitted")
    monkeypatch.setattr(local_exec, "_name_unnamed", refuse)
    box = tmp_path / "M"
    res = op_mailbox(_copy(box), "user", 0, False, None, _content(MSG))
    assert res["status"] == "sent", res
    assert local_exec._unnamed_state["ok"] is False
    [path] = list((box / "new").iterdir())
    assert path.read_bytes().endswith(MSG)
    assert list((box / "tmp").iterdir()) == []


def test_proc_link_is_the_second_way(tmp_path, monkeypatch):
    """Kernels before 6.10 refuse linkat(AT_EMPTY_PATH) to a thread without
    CAP_DAC_READ_SEARCH (ENOENT); /proc/thread-self/fd/N is tried next."""
    class Refuse:
        def __call__(self, *a):
            import ctypes
            ctypes.set_errno(errno.ENOENT)
            return -1
    monkeypatch.setitem(local_exec._unnamed_state, "linkat", Refuse())
    links = []
    real_link = os.link

    def link(src, dst, **kw):
        links.append(src)
        return real_link(src, dst, **kw)
    monkeypatch.setattr(local_exec.os, "link", link)
    box = tmp_path / "M"
    res = op_mailbox(_copy(box), "user", 0, False, None, _content(MSG))
    assert res["status"] == "sent", res
    assert links and links[0].startswith("/proc/thread-self/fd/")
    # Some sandboxes refuse /proc links across their mounts (EXDEV): then the
    # named tmp/ file did it.
    assert len(list((box / "new").iterdir())) == 1
    assert list((box / "tmp").iterdir()) == []


@root_only
@pytest.mark.skipif(not local_exec._thread_creds_available(), reason="no per-thread credentials")
def test_unnamed_file_as_the_user_in_a_helper_thread(mailroot, monkeypatch):
    monkeypatch.setattr(local_exec, "_pool", local_exec.WorkerPool())
    try:
        res = run_as(Identity(UID, GID), op_mailbox, copy_for(mailroot / "Maildir"), "someone", UID,
                     False, None, _content(MSG))
    finally:
        local_exec._pool.close()
    assert res["status"] == "sent", res
    assert local_exec._unnamed_state["ok"] is True
    [path] = list((mailroot / "Maildir" / "new").iterdir())
    st = path.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (UID, GID, 0o600)
    assert path.read_bytes().endswith(MSG)


def test_deliveries_into_one_new_dir_share_its_fsync(tmp_path, monkeypatch):
    """The first to link waits (briefly) for the other still writing; one
    fsync, started after both links, covers both."""
    import threading
    monkeypatch.setattr(virtual, "maildir_name_ordered", lambda q, m: False)
    monkeypatch.setattr(local_exec, "NEW_SYNC_LINGER", 5.0)
    syncs = []
    real_fsync_dir = store_mod.fsync_dir

    def counting(path, fsync=os.fsync):
        syncs.append((path, sorted(os.listdir(path))))
        return real_fsync_dir(path, fsync)
    monkeypatch.setattr(store_mod, "fsync_dir", counting)
    box = tmp_path / "M"
    op_mailbox(_copy(box), "user", 0, False, None, _content(MSG))     # makes the directories
    syncs.clear()
    second_writing, release = threading.Event(), threading.Event()

    def slow_content():
        second_writing.set()
        release.wait(10)
        yield MSG
    results = {}
    second = threading.Thread(target=lambda: results.setdefault(
        "second", op_mailbox(_copy(box), "user", 0, False, None, slow_content)))
    second.start()
    assert second_writing.wait(10)
    first = threading.Thread(target=lambda: results.setdefault(
        "first", op_mailbox(_copy(box), "user", 0, False, None, _content(MSG))))
    first.start()
    # The first has linked and waits for the second (still writing): no fsync yet.
    for _ in range(200):
        if len(os.listdir(box / "new")) == 2:
            break
        threading.Event().wait(0.01)
    assert len(os.listdir(box / "new")) == 2 and syncs == [] and "first" not in results
    release.set()
    first.join(10)
    second.join(10)
    assert results["first"]["status"] == results["second"]["status"] == "sent"
    # One fsync of new/, and it saw all three names.
    assert len(syncs) == 1 and len(syncs[0][1]) == 3, syncs


def test_linger_is_bounded(tmp_path, monkeypatch):
    """A delivery still writing (a big message) holds the other's answer only
    for NEW_SYNC_LINGER."""
    import threading
    import time
    monkeypatch.setattr(virtual, "maildir_name_ordered", lambda q, m: False)
    monkeypatch.setattr(local_exec, "NEW_SYNC_LINGER", 0.05)
    box = tmp_path / "M"
    op_mailbox(_copy(box), "user", 0, False, None, _content(MSG))
    writing, release = threading.Event(), threading.Event()

    def stuck():
        writing.set()
        release.wait(10)
        yield MSG
    t = threading.Thread(target=op_mailbox, args=(_copy(box), "user", 0, False, None, stuck))
    t.start()
    try:
        assert writing.wait(10)
        t0 = time.monotonic()
        res = op_mailbox(_copy(box), "user", 0, False, None, _content(MSG))
        took = time.monotonic() - t0
    finally:
        release.set()
        t.join(10)
    assert res["status"] == "sent"
    assert 0.04 <= took < 5, took
    assert local_exec._writers == {}


def test_ticket_joins_an_fsync_that_started_after_the_change(tmp_path):
    """DirSyncGroup.ticket(): a caller that waited after its change is covered
    by an fsync another thread began meanwhile (no second fsync)."""
    import threading
    d = tmp_path / "d"
    d.mkdir()
    group = store_mod.DirSyncGroup()
    calls = []
    entered, go = threading.Event(), threading.Event()

    def fsync(fd):
        calls.append(fd)
        entered.set()
        go.wait(10)
    ticket = group.ticket()          # our change is made before this
    other = threading.Thread(target=group.sync, args=(str(d), fsync))
    other.start()                    # another thread's fsync starts after our ticket
    assert entered.wait(10)
    go.set()
    group.sync(str(d), fsync, ticket)
    other.join(10)
    assert len(calls) == 1
    # Without a ticket, a sync asked for now needs a new fsync.
    group.sync(str(d), fsync)
    assert len(calls) == 2
