"""A full queue file system: 4xx, never 250; nothing queued is damaged; recovery.

DESIGN.md property 1.  The queue lives on a small tmpfs the test mounts
(skipped where mounting is not permitted), a filler file eats the space,
clients must get a temporary error (452 4.3.1 at MAIL from the space check,
or 451 4.3.0 when the queue write fails), mail already queued keeps its
content and envelope, and after the filler is gone mail flows again.  An
injected EIO/ENOSPC in the queue writer is checked below the SMTP server too.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import smtplib
import socket
import subprocess
import threading
import time

import pytest

import harness
from harness import VIRTUAL_DOMAIN as VD

TMPFS_SIZE = "8m"
SLOW = "slow.test"     # a relay domain whose next hop never answers: its mail stays deferred


def _mount_tmpfs(path) -> str | None:
    """Mount a small tmpfs on ``path``; the reason when that is not possible."""
    if not harness.is_root():
        return "mounting a tmpfs needs root"
    path.mkdir(parents=True, exist_ok=True)
    cp = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE},mode=0755", "tmpfs",
                         str(path)], capture_output=True, text=True, timeout=30)
    if cp.returncode != 0:
        return f"mount -t tmpfs not permitted here: {cp.stderr.strip()}"
    return None


def _umount(path) -> None:
    for _ in range(20):
        cp = subprocess.run(["umount", str(path)], capture_output=True, timeout=30)
        if cp.returncode == 0 or not os.path.ismount(path):
            return
        time.sleep(0.2)
    subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


def _fill(directory, leave: int) -> int:
    """Fill the file system of ``directory`` until ``leave`` bytes are free; returns free bytes."""
    filler = os.path.join(directory, "filler")
    block = b"\0" * 65536
    with open(filler, "ab") as f:
        while True:
            sv = os.statvfs(directory)
            free = sv.f_bavail * sv.f_frsize
            if free <= leave:
                break
            try:
                f.write(block[:max(4096, min(len(block), free - leave))])
                f.flush()
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                break
    sv = os.statvfs(directory)
    return sv.f_bavail * sv.f_frsize


def _send(port: int, test_id: str, rcpt: str, size: int) -> tuple[str, int, bytes]:
    """One transaction; (stage, code, text) of the first non-2xx/3xx reply or of the final one."""
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:
        s.ehlo("disk.example.org")
        code, text = s.mail("sender@example.org")
        if code != 250:
            return "MAIL", code, text
        code, text = s.rcpt(rcpt)
        if code != 250:
            return "RCPT", code, text
        code, text = s.data(harness.make_message(test_id, size, recipient=rcpt))
        return "DATA", code, text


@pytest.fixture
def tmpfs_postwell(postwell_factory, tmp_path):
    dead_port = harness.free_port()      # nothing listens there: the slow domain defers
    inst = postwell_factory({
        "relay_domains": SLOW,
        "transport_maps": f"inline:{{{SLOW}=smtp:[127.0.0.1]:{dead_port}}}",
        "message_size_limit": "1000000",
        "smtp_connect_timeout": "1s",
    }, name="diskfull")
    reason = _mount_tmpfs(inst.queue_dir)
    if reason:
        pytest.skip(reason)
    try:
        yield inst
    finally:
        inst.stop()
        _umount(inst.queue_dir)


@pytest.mark.timeout(120)
def test_full_queue_filesystem_never_250(tmpfs_postwell):
    inst = tmpfs_postwell
    inst.start()
    # Mail that stays queued (deferred) while the disk fills up.
    held = {}
    for i in range(3):
        stage, code, text = _send(inst.port, f"held{i}", f"u{i}@{SLOW}", 20000)
        assert (stage, code) == ("DATA", 250), (stage, code, text)
        held[f"held{i}"] = harness.QUEUED_RE.search(text.decode()).group(1)
    harness.wait_for(lambda: len(inst.queue_files(("deferred",))) == 3, 30, 0.1,
                     "the held mail to be deferred")
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
              for p in inst.queue_files(("deferred",))}

    free = _fill(str(inst.queue_dir), leave=64 * 1024)
    assert free <= 128 * 1024
    outcomes = []
    for i in range(4):
        stage, code, text = _send(inst.port, f"full{i}", f"alice@{VD}", 200_000)
        outcomes.append((stage, code, text.decode("latin-1")))
    for stage, code, text in outcomes:
        assert code != 250, f"250 on a full disk: {outcomes}"
        assert 400 <= code < 500, f"not a temporary error: {outcomes}"
        if stage == "MAIL":
            assert (code, text) == (452, "4.3.1 Insufficient system storage"), outcomes
        else:
            assert code == 451 and text.startswith("4.3.0"), outcomes
    assert not any((harness.check_delivered(p)[0] or "").startswith("full")
                   for p in inst.maildir_messages("alice"))
    print(outcomes)

    # Nothing already queued was damaged: same bytes, and it still parses.
    from postwell.queue import QueueStore
    store = QueueStore(str(inst.queue_dir))
    for name, digest in before.items():
        q = store.find(name)
        assert q in ("deferred", "active"), (name, q)
        with store.open(name, q, writable=False) as qm:
            assert qm.recipients and qm.read_content()
        if q == "deferred":   # a retry in progress may hold it in active/ right now
            data = (inst.queue_dir / q / name).read_bytes()
            assert hashlib.sha256(data).hexdigest() == digest, f"{name} changed on a full disk"
    queued = set(store.scan("deferred") + store.scan("active"))
    assert set(held.values()) <= queued
    # Anything else is the smtpd's notify_classes notice (the default "resource, software":
    # queue file write errors are mailed to postmaster, as Postfix's smtpd does).
    for name in queued - set(held.values()):
        q = store.find(name)
        with store.open(name, q, writable=False) as qm:
            assert qm.sender.startswith("double-bounce@"), (name, qm.sender)
            assert [r.address.split("@")[0] for r in qm.recipients] == ["postmaster"], name
    assert not store.scan("corrupt")

    # Space returns: mail is accepted and delivered again.
    os.unlink(inst.queue_dir / "filler")
    stage, code, text = _send(inst.port, "after0", f"alice@{VD}", 200_000)
    assert (stage, code) == ("DATA", 250), (stage, code, text)
    files = inst.wait_maildir("alice", 1, timeout=20)
    assert [harness.check_delivered(p) for p in files] == [("after0", True)]
    # No queue file debris from the refused transactions is left behind.
    harness.wait_for(lambda: not inst.queue_files(("incoming", "active")), 10, 0.1,
                     "incoming/ to be empty")


@pytest.mark.timeout(60)
def test_full_queue_filesystem_refused_at_mail_from(tmpfs_postwell):
    """Postfix 3.7 (checked on the same tmpfs): free space below 1.5 x message_size_limit
    refuses MAIL FROM with 452 4.3.1, with or without SIZE=."""
    inst = tmpfs_postwell
    inst.start()
    _fill(str(inst.queue_dir), leave=64 * 1024)
    stage, code, text = _send(inst.port, "full-mail", f"alice@{VD}", 1000)
    assert (stage, code, text) == ("MAIL", 452, b"4.3.1 Insufficient system storage")
    with smtplib.SMTP("127.0.0.1", inst.port, timeout=20) as s:
        s.ehlo("disk.example.org")
        assert s.mail("sender@example.org", ["SIZE=1000"]) == (452, b"4.3.1 Insufficient system storage")
    os.unlink(inst.queue_dir / "filler")
    stage, code, text = _send(inst.port, "space-back", f"alice@{VD}", 1000)
    assert (stage, code) == ("DATA", 250), (stage, code, text)


# ---------------------------------------------------------------- below the SMTP server

class _InProcessSmtpd:
    """An SmtpdServer on its own loop thread over a queue whose writer fails on demand."""

    def __init__(self, tmp_path, fail_fsync=None, fail_write=None):
        from postwell.cleanup import Cleanup
        from postwell.config import load_config
        from postwell.log import NullLog
        from postwell.queue import QueueStore
        from postwell.smtpd import SmtpdServer
        etc = tmp_path / "etc"
        etc.mkdir(parents=True, exist_ok=True)
        queue = tmp_path / "queue"
        params = {"queue_directory": str(queue), "myhostname": "mx.example.test",
                  "mydestination": "$myhostname, localhost", "mynetworks": "127.0.0.0/8",
                  "smtpd_peername_lookup": "no", "smtpd_error_sleep_time": "0",
                  "compatibility_level": "3.6", "alias_maps": "", "local_recipient_maps": ""}
        (etc / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in params.items()))
        config = load_config(str(etc))
        kw = {}
        if fail_fsync:
            kw["fsync"] = fail_fsync
        if fail_write:
            kw["write"] = fail_write
        self.store = QueueStore(str(queue), **kw)
        self.store.ensure_layout()
        self.log = NullLog("smtpd")
        cleanup = Cleanup(config, self.store, self.log)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run():
            asyncio.set_event_loop(self.loop)

            async def main():
                self.server = SmtpdServer(config, log=self.log, cleanup=cleanup)
                await self.server.start([self.sock])
                ready.set()
            self.loop.run_until_complete(main())
            self.loop.run_forever()
        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert ready.wait(10)

    def stop(self):
        fut = asyncio.run_coroutine_threadsafe(self.server.drain(1.0), self.loop)
        with contextlib.suppress(Exception):
            fut.result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.mark.parametrize("fault", ["fsync-eio", "fsync-enospc", "write-eio", "write-enospc"])
def test_injected_queue_write_failure_gives_4xx(tmp_path, fault):
    kind, err = fault.split("-")
    code = {"eio": errno.EIO, "enospc": errno.ENOSPC}[err]
    armed = threading.Event()

    def bad_fsync(fd):
        if armed.is_set():
            raise OSError(code, os.strerror(code))
        os.fsync(fd)

    def bad_write(fd, data):
        if armed.is_set():
            raise OSError(code, os.strerror(code))
        return os.write(fd, data)

    srv = _InProcessSmtpd(tmp_path, fail_fsync=bad_fsync if kind == "fsync" else None,
                          fail_write=bad_write if kind == "write" else None)
    try:
        armed.set()
        # A body larger than the writer's buffer, so a write() failure happens mid-stream.
        stage, code_, text = _send(srv.port, f"inj-{fault}", "alice@mx.example.test", 200_000)
        assert code_ != 250, (stage, code_, text)
        assert (stage, code_) == ("DATA", 451) and text.startswith(b"4.3.0"), (stage, code_, text)
        assert srv.store.scan("incoming") == []
        assert [n for n in os.listdir(srv.store.path("incoming"))] == []
        # The fault goes away: the next message is accepted and durable.
        armed.clear()
        stage, code_, text = _send(srv.port, "inj-ok", "alice@mx.example.test", 2000)
        assert (stage, code_) == ("DATA", 250), (stage, code_, text)
        assert len(srv.store.scan("incoming")) == 1
    finally:
        srv.stop()


def test_commit_failure_leaves_no_committed_file(tmp_path):
    """Unit level: any failure in commit() removes the file; the caller never sees success."""
    from postwell.queue import QueueStore, QueueWriteError
    calls = []

    def fsync(fd):
        calls.append(fd)
        if len(calls) == 2:   # the fsync after the complete marker
            raise OSError(errno.EIO, "I/O error")
        os.fsync(fd)
    store = QueueStore(str(tmp_path / "q"), fsync=fsync)
    store.ensure_layout()
    calls.clear()
    msg = store.create()
    msg.set_sender("s@example.org")
    msg.add_recipient("r@example.org")
    msg.write(b"Subject: x\n\nbody\n")
    with pytest.raises(QueueWriteError):
        msg.commit()
    assert store.scan("incoming") == []
    assert os.listdir(store.path("incoming")) == []
