"""Corrupt queue files go to corrupt/ with a log line; the other mail still flows.

Through a running postwell: damaged files are planted in incoming/, active/
and deferred/ next to good ones, and a client keeps sending meanwhile.
"""

from __future__ import annotations

import os
import re
import smtplib
import struct

import pytest

import harness
from harness import VIRTUAL_DOMAIN as VD

from postwell.queue import CorruptQueueFile, QueueStore
from postwell.queue import format as qf


def _good(store: QueueStore, test_id: str, rcpt: str = f"alice@{VD}") -> str:
    msg = store.create()
    msg.set_sender("sender@example.org")
    msg.add_recipient(rcpt)
    msg.write(harness.make_message(test_id, 800, recipient=rcpt).replace(b"\r\n", b"\n"))
    msg.commit()
    return msg.queue_id


DAMAGE = {
    "truncated": lambda b: b[:len(b) // 2],
    "empty": lambda b: b"",
    "bad_magic": lambda b: b"XXXX" + b[4:],
    "bad_crc": lambda b: b[:56] + struct.pack("<I", (struct.unpack("<I", b[56:60])[0] ^ 1)) + b[60:],
    "envelope_garbage": lambda b: b[:-20] + b"\xff" * 20,
    "cut_end_record": lambda b: b[:-5],
    "appended": lambda b: b + b"trailing junk",
}


def _corrupt(store: QueueStore, test_id: str, how: str, uid: int, gid: int) -> str:
    """A damaged file, made in a staging queue on the same file system (so the
    running qmgr cannot grab it half-made) and renamed into incoming/ at once."""
    staging = QueueStore(os.path.join(os.path.dirname(store.queue_directory), "staging"))
    staging.ensure_layout()
    qid = _good(staging, test_id)
    path = staging.path("incoming", qid)
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(DAMAGE[how](data))
    os.chmod(path, 0o700)   # looks complete: the reader, not the scanner, must catch it
    os.chown(path, uid, gid)
    with pytest.raises(CorruptQueueFile):
        staging.open(qid, "incoming", writable=False).close()
    os.rename(path, store.path("incoming", qid))
    return qid


@pytest.mark.timeout(90)
def test_corrupt_files_are_moved_aside_and_others_delivered(postwell_factory):
    inst = postwell_factory()
    inst.start()
    inst.stop()
    store = QueueStore(str(inst.queue_dir))
    uid, gid = inst.uid, inst.gid

    def own(qid, queue):
        os.chown(store.path(queue, qid), uid, gid)

    planted: dict[str, str] = {}
    good: list[str] = []
    # Before the start: damaged files in active/ (recovered at start) and deferred/ (due now).
    for i, how in enumerate(("truncated", "bad_crc", "envelope_garbage")):
        qid = _corrupt(store, f"bad-a{i}", how, uid, gid)
        store.move(qid, "incoming", "active")
        planted[qid] = f"active/{how}"
        g = _good(store, f"good-a{i}")
        own(g, "incoming")
        store.move(g, "incoming", "active")
        good.append(f"good-a{i}")
    for i, how in enumerate(("bad_magic", "cut_end_record", "empty")):
        qid = _corrupt(store, f"bad-d{i}", how, uid, gid)
        store.move(qid, "incoming", "deferred")
        os.utime(store.path("deferred", qid), (0, 0))
        planted[qid] = f"deferred/{how}"
        g = _good(store, f"good-d{i}")
        own(g, "incoming")
        store.move(g, "incoming", "deferred")
        os.utime(store.path("deferred", g), (0, 0))
        good.append(f"good-d{i}")

    inst.start()
    # While running: damaged files appear in incoming/ between good SMTP mail.
    with smtplib.SMTP("127.0.0.1", inst.port, timeout=15) as s:
        for i, how in enumerate(("appended", "truncated", "bad_crc")):
            qid = _corrupt(store, f"bad-i{i}", how, uid, gid)
            planted[qid] = f"incoming/{how}"
            s.sendmail("sender@example.org", [f"alice@{VD}"], harness.make_message(f"smtp{i}"))
            good.append(f"smtp{i}")

    files = inst.wait_maildir("alice", len(good), timeout=30)
    delivered = sorted(harness.check_delivered(p) for p in files)
    assert delivered == sorted((g, True) for g in good)

    harness.wait_for(lambda: set(store.scan("corrupt")) | {
        p.name for p in (inst.queue_dir / "corrupt").iterdir()} >= set(planted), 20, 0.1,
        "the damaged files to reach corrupt/")
    corrupt_now = {p.name for p in (inst.queue_dir / "corrupt").iterdir()}
    assert corrupt_now == set(planted), (corrupt_now, planted)
    log = inst.log_text()
    for qid, where in planted.items():
        assert re.search(rf"warning: {qid}: .*corrupt", log), f"no log line for {qid} ({where})"
    harness.wait_for(lambda: not inst.queue_files(("incoming", "active", "deferred")), 20, 0.1,
                     "the queue to drain")
    # The qmgr stayed up through all of it.
    assert inst.processes()
    with smtplib.SMTP("127.0.0.1", inst.port, timeout=15) as s:
        s.sendmail("sender@example.org", [f"alice@{VD}"], harness.make_message("after"))
    inst.wait_maildir("alice", len(good) + 1, timeout=20)


def test_incomplete_file_without_marker_is_not_delivered_nor_corrupt(tmp_path):
    """A file without the complete marker is crash debris, not a message (unit level)."""
    store = QueueStore(str(tmp_path / "q"))
    store.ensure_layout()
    msg = store.create()
    msg.set_sender("s@example.org")
    msg.add_recipient("r@example.org")
    msg.write(b"Subject: x\n\nbody\n")
    assert store.scan("incoming") == []
    with pytest.raises(CorruptQueueFile):
        store.open(msg.queue_id, "incoming").close()
    msg.abort()
    assert qf.is_queue_id(msg.queue_id)
