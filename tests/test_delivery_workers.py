"""Persistent user workers of the root helpers (delivery.local_exec), the
content hand-over by descriptor (delivery.base), the helpers' shared socket
server (delivery.helper) and the Maildir writer's fast paths (virtual)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

import pytest

from postwell.delivery import local_exec
from postwell.delivery.base import FileContent, QueueContent, iter_lines
from postwell.delivery.helper import answer_requests
from postwell.delivery.local_exec import Identity, LocalCopy, WorkerPool, op_mailbox, run_as
from postwell.delivery.virtual import Delivery, deliver_as_owner, deliver_maildir, delivered_to_headers
from postwell.log import NullLog
from postwell.queue import QueueStore

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch users")

# A uid/gid without a passwd entry: a worker can become it all the same.
UID = GID = 54321
MSG = b"Subject: test\nFrom: a@example.test\n\nbody line\n"


def queue_message(store, content: bytes) -> str:
    """One message from sender@ to user@example.test, committed and in active."""
    msg = store.create()
    msg.set_sender("sender@example.test")
    msg.add_recipient("user@example.test")
    msg.write(content)
    msg.commit()
    store.move(msg.queue_id, "incoming", "active")
    return msg.queue_id


@pytest.fixture
def queued(tmp_path):
    store = QueueStore(str(tmp_path / "queue"))
    store.ensure_layout()

    def make(content=MSG):
        return store.open(queue_message(store, content), "active", writable=False)
    return make


@pytest.fixture
def mailroot():
    # Not under pytest's tmp_path: its parents are root-only, and the workers
    # are the user.
    base = Path(tempfile.mkdtemp(prefix="pw-workers-"))
    os.chmod(base, 0o755)
    box = base / "home"
    box.mkdir()
    if os.geteuid() == 0:
        os.chown(box, UID, GID)
    yield box
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def pool():
    p = WorkerPool()
    yield p
    p.close()


def copy_for(path: Path) -> LocalCopy:
    return LocalCopy(path=str(path) + "/", maildir=True, sender="sender@example.test",
                     recipient="user@example.test", orig="user@example.test",
                     delivered="user@example.test", limit=0, lock_methods=[], hostname="host",
                     want_orig=True, want_delivered=True)


def messages(maildir: Path) -> list[Path]:
    return sorted((maildir / "new").iterdir())


def proc_uid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError("no Uid line")


def deliver_once(pool: WorkerPool, queued, mailroot: Path) -> dict:
    qm = queued()
    try:
        return pool.run(Identity(UID, GID), "op_mailbox",
                        [copy_for(mailroot / "Maildir"), "someone", UID, False, None, QueueContent(qm)])
    finally:
        qm.close()


def live_workers(pool: WorkerPool) -> list:
    return [w for ws in pool._idle.values() for w in ws]


# ------------------------------------------------------------ content hand-over

def test_queue_content_descriptor_reads_the_same_content(queued):
    qm = queued(MSG * 5000)      # beyond the store's small-file cache
    try:
        content = QueueContent(qm)
        assert b"".join(content()) == qm.read_content()
        fd, offset, size = content.descriptor()
        try:
            assert b"".join(FileContent(fd, offset, size, chunk=1000)()) == qm.read_content()
        finally:
            os.close(fd)
    finally:
        qm.close()


def test_queue_content_refuses_a_replaced_file(queued):
    qm = queued()
    try:
        data = Path(qm.path).read_bytes()
        os.unlink(qm.path)
        Path(qm.path).write_bytes(data)          # same name, another inode
        with pytest.raises(OSError):
            QueueContent(qm).descriptor()
    finally:
        qm.close()


# ------------------------------------------------------------ user workers

@root_only
def test_worker_delivers_as_the_user_and_is_reused(queued, mailroot, pool, monkeypatch):
    monkeypatch.setattr(local_exec, "_pool", pool)
    # Maildir work otherwise runs in the calling thread (tests/test_local_threads7.py).
    monkeypatch.setattr(local_exec, "THREAD_IDENTITIES", False)
    ident = Identity(UID, GID, "someone")
    pids = set()
    for _ in range(3):
        qm = queued()
        try:
            res = run_as(ident, op_mailbox, copy_for(mailroot / "Maildir"), "someone", UID, False,
                         None, QueueContent(qm))
        finally:
            qm.close()
        assert res == {"status": "sent", "dsn": "2.0.0", "reason": "delivered to maildir"}
        pids.update(w.pid for w in live_workers(pool))
    assert len(pids) == 1, "one worker serves consecutive deliveries"
    worker_pid = pids.pop()
    assert proc_uid(worker_pid) == UID
    got = messages(mailroot / "Maildir")
    assert len(got) == 3
    for path in got:
        assert path.stat().st_uid == UID
        data = path.read_bytes()
        assert data.startswith(b"Return-Path: <sender@example.test>\nX-Original-To: user@example.test\n"
                               b"Delivered-To: user@example.test\n")
        assert data.endswith(MSG)
    assert not list((mailroot / "Maildir" / "tmp").iterdir())


@root_only
def test_worker_keeps_no_descriptor_of_the_helper(queued, mailroot, pool, tmp_path):
    secret = os.open(str(tmp_path / "secret"), os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        deliver_once(pool, queued, mailroot)
        [worker] = live_workers(pool)
        fds = os.listdir(f"/proc/{worker.pid}/fd")
        # stdin/stdout/stderr and the channel to the helper, nothing else.
        assert len([fd for fd in fds if int(fd) > 2]) == 1, fds
    finally:
        os.close(secret)


@root_only
def test_dead_worker_is_replaced(queued, mailroot, pool):
    ident = Identity(UID, GID)
    args = lambda qm: [copy_for(mailroot / "Maildir"), "someone", UID, False, None, QueueContent(qm)]
    qm = queued()
    try:
        assert pool.run(ident, "op_mailbox", args(qm))["status"] == "sent"
        [worker] = live_workers(pool)
        os.kill(worker.pid, signal.SIGKILL)
        time.sleep(0.1)
        assert pool.run(ident, "op_mailbox", args(qm)) == {"error": "delivery child died unexpectedly"}
        assert pool._total == 0
        assert pool.run(ident, "op_mailbox", args(qm))["status"] == "sent"
        [fresh] = live_workers(pool)
        assert fresh.pid != worker.pid
    finally:
        qm.close()
    assert len(messages(mailroot / "Maildir")) == 2


@root_only
def test_foreign_content_source_goes_to_a_forked_child(mailroot, pool, monkeypatch):
    monkeypatch.setattr(local_exec, "_pool", pool)
    res = run_as(Identity(UID, GID), op_mailbox, copy_for(mailroot / "Maildir"), "someone", UID,
                 False, None, lambda: iter([MSG]))
    assert res["status"] == "sent"
    assert not live_workers(pool)
    assert messages(mailroot / "Maildir")[0].read_bytes().endswith(MSG)


@root_only
def test_idle_workers_are_retired(queued, mailroot):
    now = [1000.0]
    pool = WorkerPool(reuse=60.0, clock=lambda: now[0])
    try:
        deliver_once(pool, queued, mailroot)
        [worker] = live_workers(pool)
        now[0] += 59
        pool.retire_idle()
        assert live_workers(pool) == [worker]
        now[0] += 2
        pool.retire_idle()
        assert not live_workers(pool) and pool._total == 0
        with pytest.raises(ChildProcessError):
            os.waitpid(worker.pid, os.WNOHANG)      # already reaped
    finally:
        pool.close()


@root_only
def test_per_identity_limit_serialises_and_total_limit_evicts(queued, mailroot):
    pool = WorkerPool(per_identity=1, limit=1)
    try:
        qm = queued()
        results = []

        def deliver(uid):
            results.append(pool.run(Identity(uid, uid), "op_mailbox",
                                    [copy_for(mailroot / f"Maildir{uid}"), "u", uid, False, None,
                                     QueueContent(qm)]))
        try:
            threads = [threading.Thread(target=deliver, args=(UID,)) for _ in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
            assert [r["status"] for r in results] == ["sent"] * 4
            assert pool._total == 1
            # Another identity takes the only slot: the idle worker is closed.
            os.chown(mailroot, 0, 0)
            deliver(0)
            assert results[-1]["status"] == "sent"
            assert [w.key[0] for w in live_workers(pool)] == [0]
        finally:
            qm.close()
    finally:
        pool.close()
    assert len(messages(mailroot / f"Maildir{UID}")) == 4


@root_only
def test_virtual_delivery_as_owner_through_a_worker(queued, mailroot, pool, monkeypatch):
    monkeypatch.setattr(local_exec, "_pool", pool)
    d = Delivery(path=str(mailroot / "vbox") + "/", maildir=True, uid=UID, gid=GID,
                 sender="s@example.test", recipient="User@Example.test", orig="user@example.test",
                 limit=0, lock_methods=[], hostname="host")
    qm = queued()
    try:
        assert deliver_as_owner(d, QueueContent(qm)) == ("sent", "2.0.0", "delivered to maildir")
        d.limit = 10
        assert deliver_as_owner(d, QueueContent(qm)) == (
            "bounced", "5.2.2", "maildir delivery failed: error writing message: File too large")
    finally:
        qm.close()
    [worker] = live_workers(pool)
    assert proc_uid(worker.pid) == UID
    [msg] = messages(mailroot / "vbox")
    assert msg.stat().st_uid == UID
    # The recipient's case, as Postfix 3.7's virtual(8) (tests/test_delivery_gaps7.py).
    assert b"Delivered-To: User@Example.test\n" in msg.read_bytes()
    assert not list((mailroot / "vbox" / "tmp").iterdir())


# ------------------------------------------------------------ Maildir writer

def test_maildir_file_name_and_no_tmp_leftovers(tmp_path):
    d = Delivery(path=str(tmp_path / "md") + "/", maildir=True, uid=os.getuid(), gid=os.getgid(),
                 sender="", recipient="r@example.test", orig="r@example.test", limit=0,
                 lock_methods=[], hostname="mx/a:b")
    deliver_maildir(d, lambda: iter([b"Subject: x\n", b"\nbody\n"]))
    [msg] = messages(tmp_path / "md")
    st = msg.stat()
    assert re.fullmatch(rf"\d+\.V{st.st_dev:x}I{st.st_ino:x}M\d+\.mx\\057a\\072b", msg.name)
    assert msg.read_bytes() == (b"Return-Path: <>\nX-Original-To: r@example.test\n"
                                b"Delivered-To: r@example.test\nSubject: x\n\nbody\n")
    assert not list((tmp_path / "md" / "tmp").iterdir())
    assert (tmp_path / "md" / "cur").is_dir()


def test_maildir_failure_leaves_nothing_behind(tmp_path):
    d = Delivery(path=str(tmp_path / "md") + "/", maildir=True, uid=os.getuid(), gid=os.getgid(),
                 sender="", recipient="r@example.test", orig=None, limit=0, lock_methods=[],
                 hostname="h")

    def broken():
        yield b"Subject: x\n"
        raise OSError(5, "Input/output error")
    with pytest.raises(OSError):
        deliver_maildir(d, broken)
    assert not list((tmp_path / "md" / "tmp").iterdir())
    assert not list((tmp_path / "md" / "new").iterdir())


def _reference_delivered_to(open_content, limit=1 << 20):
    """The line-by-line scan delivered_to_headers() replaced."""
    found, seen = set(), 0
    for line in iter_lines(open_content()):
        seen += len(line)
        if line in (b"\n", b"\r\n") or seen > limit:
            break
        if line[:13].lower() == b"delivered-to:":
            found.add(line[13:].strip().decode("utf-8", "replace").lower())
    return found


@pytest.mark.parametrize("content", [
    b"Delivered-To: A@x\nSubject: s\n\nDelivered-To: body@x\n",
    b"delivered-to:a@x\r\nDELIVERED-TO:  B@Y  \r\n\r\nDelivered-To: c@x\r\n",
    b"\nDelivered-To: body@x\n",
    b"\r\nDelivered-To: body@x\n",
    b"Subject: no body\nDelivered-To: last@x",
    b"X-Delivered-To: no@x\n Delivered-To: folded@x\nDelivered-To: yes@x\n\n",
    b"Delivered-To: caf\xc3\xa9@x\nDelivered-To: bad\xff@x\n\n",
    b"",
])
@pytest.mark.parametrize("chunk", [1, 3, 7, 65536])
def test_delivered_to_headers_matches_the_line_scan(content, chunk):
    def open_content():
        return iter([content[i:i + chunk] for i in range(0, len(content), chunk)])
    assert delivered_to_headers(open_content) == _reference_delivered_to(open_content)


@pytest.mark.parametrize("limit", [10, 24, 25, 26, 40])
def test_delivered_to_headers_limit_matches_the_line_scan(limit):
    content = b"Delivered-To: a@x\nDelivered-To: b@x\nDelivered-To: c@x\n\n"

    def open_content():
        return iter([content[i:i + 5] for i in range(0, len(content), 5)])
    assert delivered_to_headers(open_content, limit) == _reference_delivered_to(open_content, limit)


# ------------------------------------------------------------ helper request reader

def test_answer_requests_answers_concurrently_and_stops_on_garbage():
    async def main():
        log = NullLog("test")
        done = asyncio.Event()
        order = []

        async def answer(req, parsed):
            if req["id"] == 1:
                await done.wait()      # the first request finishes last
            order.append(req["id"])
            if req["id"] == 2:
                done.set()
            return [["sent", req["queue_id"]]]

        async def handle(reader, writer):
            await answer_requests(reader, writer, answer, log, wait=10)

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10)
        for rid in (1, 2):
            writer.write(json.dumps({"id": rid, "queue_id": f"Q{rid}", "recipients": []}).encode()
                         + b"\n")
        writer.write(b"[1, 2]\n")            # not a request: the connection ends
        replies = [json.loads(await asyncio.wait_for(reader.readline(), 10)) for _ in range(2)]
        assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()
        server.close()
        await server.wait_closed()
        assert order == [2, 1]
        assert replies == [{"id": 2, "results": [["sent", "Q2"]]},
                           {"id": 1, "results": [["sent", "Q1"]]}]
        assert any("malformed request from qmgr" in line for line in log.lines)
    asyncio.run(main())


# ------------------------------------------------------------ workers for an event loop

def test_async_pool_writes_and_reuses_workers(tmp_path):
    from postwell.delivery.local_exec import AsyncWorkerPool, InlineContent

    def plan(limit=0):
        return Delivery(path=str(tmp_path / "md") + "/", maildir=True, uid=os.getuid(),
                        gid=os.getgid(), sender="s@example.test", recipient="r@example.test",
                        orig=None, limit=limit, lock_methods=[], hostname="h")

    async def main():
        pool = AsyncWorkerPool(size=2)
        try:
            got = await asyncio.wait_for(asyncio.gather(*(
                pool.run("op_virtual_delivery", [plan(), InlineContent(MSG)]) for _ in range(5))), 30)
            assert got == [["sent", "2.0.0", "delivered to maildir"]] * 5
            assert pool._count == 2 and len(pool._idle) == 2
            # A content source it cannot carry: the caller falls back.
            assert await pool.run("op_virtual_delivery", [plan(), lambda: iter([MSG])]) is None
            big = InlineContent(b"x" * (local_exec.INLINE_MAX + 1))
            assert await pool.run("op_virtual_delivery", [plan(), big]) is None
            assert await asyncio.wait_for(pool.run("op_virtual_delivery",
                                                   [plan(limit=5), InlineContent(MSG)]), 30) == [
                "bounced", "5.2.2", "maildir delivery failed: error writing message: File too large"]
            os.kill(pool._idle[0].pid, signal.SIGKILL)
            time.sleep(0.1)
            results = [await asyncio.wait_for(pool.run("op_virtual_delivery",
                                                        [plan(), InlineContent(MSG)]), 30)
                       for _ in range(3)]
            assert {"error": "delivery child died unexpectedly"} in results or \
                results == [["sent", "2.0.0", "delivered to maildir"]] * 3
            assert pool._count <= 2
            # Idle workers leave by themselves after a while.
            first = pool._idle[0]
            for w in pool._idle:
                w.idle_since -= local_exec.WORKER_REUSE
            pool._retire_idle()
            assert not pool._idle and pool._count == 0
            with pytest.raises(ChildProcessError):
                os.waitpid(first.pid, os.WNOHANG)
        finally:
            pool.close()
    asyncio.run(main())
    files = messages(tmp_path / "md")
    assert len(files) >= 7
    assert all(f.read_bytes().endswith(MSG) for f in files)


def test_worker_dies_with_its_parent(tmp_path):
    """A worker whose parent is killed stops at once (no delivery finishes
    behind a dead qmgr's back)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child: the "qmgr"
        try:
            worker = local_exec.UserWorker(Identity(os.getuid(), os.getgid()))
            os.write(w, str(worker.pid).encode())
            time.sleep(60)
        finally:
            os._exit(0)
    os.close(w)
    try:
        worker_pid = int(os.read(r, 20) or 0)
    finally:
        os.close(r)
    assert worker_pid
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{worker_pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            break
        if state == "Z":
            break
        time.sleep(0.02)
    else:
        pytest.fail("the worker outlived its parent")
