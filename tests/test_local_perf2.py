"""local(8) throughput, second round (issue 8): a root helper's request to a
user worker is one frame in one sendmsg (descriptor included), and small
mail reaches the worker inside that frame instead of as a queue file
descriptor.  Behaviour (the delivered copy, the answers) must not change."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from postwell.delivery import local_exec, local_helper
from postwell.delivery.base import QueueContent
from postwell.delivery.local_exec import InlineContent, Identity, LocalCopy, WorkerPool
from postwell.queue import QueueStore

from test_delivery_workers import GID, UID, mailroot, pool, queue_message, root_only  # noqa: F401

MSG = b"Subject: test\nFrom: a@example.test\n\nbody line\nFrom here\n"


@pytest.fixture
def store(tmp_path):
    s = QueueStore(str(tmp_path / "queue"))
    s.ensure_layout()
    return s


def copy_for(path: Path, maildir=True) -> LocalCopy:
    return LocalCopy(path=str(path) + ("/" if maildir else ""), maildir=maildir,
                     sender="sender@example.test", recipient="user@example.test",
                     orig="user@example.test", delivered="user@example.test", limit=0,
                     lock_methods=["fcntl"], hostname="host", want_orig=True, want_delivered=True)


HEADERS = (b"Return-Path: <sender@example.test>\nX-Original-To: user@example.test\n"
           b"Delivered-To: user@example.test\n")


def only_message(maildir: Path) -> bytes:
    [path] = list((maildir / "new").iterdir())
    assert path.stat().st_uid == UID
    return path.read_bytes()


# ------------------------------------------------------------ one frame per request

class _CountingSocket:
    """Counts the sending calls a UserWorker makes for one request."""

    def __init__(self, sock):
        self._sock, self.sends = sock, 0

    def sendmsg(self, *a, **kw):
        self.sends += 1
        return self._sock.sendmsg(*a, **kw)

    def sendall(self, *a, **kw):
        self.sends += 1
        return self._sock.sendall(*a, **kw)

    def __getattr__(self, name):
        return getattr(self._sock, name)


@root_only
def test_request_with_descriptor_is_sent_in_one_call(pool, store, mailroot):
    qm = store.open(queue_message(store, MSG), "active", writable=False)
    try:
        worker = pool._acquire(Identity(UID, GID))
        counting = worker.sock = _CountingSocket(worker.sock)
        try:
            fd, offset, size = QueueContent(qm).descriptor()
            try:
                res = worker.call("op_mailbox", [copy_for(mailroot / "Maildir"), "u", UID, False, None,
                                                 (local_exec._CONTENT, offset, size)], fd)
            finally:
                os.close(fd)
        finally:
            worker.sock = counting._sock
            pool._release(worker)
    finally:
        qm.close()
    assert res == {"status": "sent", "dsn": "2.0.0", "reason": "delivered to maildir"}
    # Header, payload and descriptor together: the worker wakes once.
    assert counting.sends == 1
    assert only_message(mailroot / "Maildir") == HEADERS + MSG


@root_only
def test_a_frame_bigger_than_the_socket_buffer_still_arrives_whole(pool, mailroot):
    big = b"Subject: big\n\n" + b"x" * 99 + b"\n"
    big = big + b"y" * 100 * 2400 + b"\n"          # about 240 KiB: more than one sendmsg takes
    assert len(big) <= local_exec.INLINE_MAX
    res = pool.run(Identity(UID, GID), "op_mailbox",
                   [copy_for(mailroot / "Maildir"), "u", UID, False, None, InlineContent(big)])
    assert res["status"] == "sent", res
    assert only_message(mailroot / "Maildir") == HEADERS + big


# ------------------------------------------------------------ small mail inline

@root_only
def test_inline_content_reaches_the_worker_for_maildir_and_mbox(pool, mailroot):
    ident = Identity(UID, GID)
    res = pool.run(ident, "op_mailbox",
                   [copy_for(mailroot / "Maildir"), "u", UID, False, None, InlineContent(MSG)])
    assert res == {"status": "sent", "dsn": "2.0.0", "reason": "delivered to maildir"}
    assert only_message(mailroot / "Maildir") == HEADERS + MSG
    res = pool.run(ident, "op_mailbox",
                   [copy_for(mailroot / "mbox", maildir=False), "u", UID, False, None, InlineContent(MSG)])
    assert res["status"] == "sent", res
    text = (mailroot / "mbox").read_bytes()
    assert text.startswith(b"From sender@example.test  ")
    # mboxo quoting and the blank line after the message, as before.
    assert text.endswith(HEADERS + MSG.replace(b"\nFrom here", b"\n>From here") + b"\n")


def test_oversized_inline_content_is_not_sent_to_a_worker():
    # Bounded frames: a caller with more than INLINE_MAX in memory gets None
    # (run_as then forks a child for it) before any worker is involved.
    p = WorkerPool()
    try:
        big = InlineContent(b"x" * (local_exec.INLINE_MAX + 1))
        assert p.run(Identity(UID, GID), "op_mailbox", ["copy", "u", UID, False, None, big]) is None
        assert p._total == 0
    finally:
        p.close()


class _Spy:
    """Stands for the agent: records the content source handle_request built."""

    def __init__(self):
        self.seen = []

    def expand_request(self, request):
        self.seen.append((request.open_content, b"".join(request.open_content()),
                          request.content_size))
        return [[] for _ in request.recipients]


@pytest.mark.parametrize("size, inline", [(100, True), (local_helper.INLINE_CONTENT, True),
                                          (local_helper.INLINE_CONTENT + 1, False),
                                          (200_000, False)])
def test_helper_hands_small_mail_inline_and_big_mail_by_descriptor(store, size, inline):
    content = b"Subject: s\n\n" + b"z" * (size - 13) + b"\n"
    assert len(content) == size
    qid = queue_message(store, content)
    spy = _Spy()
    out = local_helper.handle_request(spy, store, {"queue_id": qid, "sender": "s@example.test",
                                                   "nexthop": "h", "recipients": [["u@h", None]]})
    assert out == [[]]
    [(source, data, declared)] = spy.seen
    assert isinstance(source, InlineContent) is inline
    assert isinstance(source, QueueContent) is not inline
    assert data == content and declared == size


@root_only
def test_helper_request_delivers_inline_through_the_worker_pool(store, mailroot, monkeypatch):
    """End to end inside the helper: a small message goes inline to the user
    worker and is written there with the user's rights."""
    import pwd
    from postwell.config.main import Config
    from postwell.delivery.local import LocalAgent
    from postwell.log import NullLog

    name = "pwlp2"
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        pw = None
    if pw is None:
        import harness
        with harness.machine_lock("users-pwlp2"):
            subprocess.run(["useradd", "-M", "-d", str(mailroot), "-s", "/usr/sbin/nologin", name],
                           capture_output=True, timeout=30)
        try:
            pw = pwd.getpwnam(name)
        except KeyError:
            pytest.skip("cannot create a user")
    try:
        os.chown(mailroot, pw.pw_uid, pw.pw_gid)
        cfg = Config(str(mailroot.parent), {
            "myhostname": "mx.example.test", "mydestination": "mx.example.test",
            "alias_maps": "", "home_mailbox": "Maildir/", "queue_directory": store.queue_directory,
            "message_size_limit": "10240000"}, {}, [])
        agent = LocalAgent(cfg, log=NullLog("local"), store=store, helper_socket="")
        monkeypatch.setattr(local_exec, "_pool", WorkerPool())
        # The worker path (Maildir work otherwise runs in the helper's thread as the user).
        monkeypatch.setattr(local_exec, "THREAD_IDENTITIES", False)
        sent = []
        real = local_exec.WorkerPool.run

        def spy(self, ident, op, args):
            sent.append([type(a).__name__ for a in args])
            return real(self, ident, op, args)
        monkeypatch.setattr(local_exec.WorkerPool, "run", spy)
        try:
            qid = queue_message(store, MSG)
            out = local_helper.handle_request(agent, store, {
                "queue_id": qid, "sender": "sender@example.test", "nexthop": "mx.example.test",
                "recipients": [[f"{name}@mx.example.test", None]]})
        finally:
            local_exec._pool.close()
        assert out == [[[f"{name}@mx.example.test", f"{name}@mx.example.test", "sent", "2.0.0",
                         "delivered to maildir", None, None]]]
        assert sent and "InlineContent" in sent[0] and "QueueContent" not in sent[0]
        [path] = list((mailroot / "Maildir" / "new").iterdir())
        assert path.stat().st_uid == pw.pw_uid
        assert path.read_bytes().endswith(MSG)
    finally:
        import harness
        with harness.machine_lock("users-pwlp2"):
            subprocess.run(["userdel", name], capture_output=True, timeout=30)


# ------------------------------------------------------------ new/ fsync only where needed

def fake_system(tmp_path, fstype, journal=None, name="vdq", dev=(254, 7)):
    """A /proc and /sys tree as metadata_in_order() reads them."""
    proc, sysfs = tmp_path / "proc", tmp_path / "sys"
    (proc / "self").mkdir(parents=True)
    maj, mnr = dev
    (proc / "self" / "mountinfo").write_text(
        "22 27 0:21 / /proc rw,relatime - proc proc rw\n"
        f"27 1 {maj}:{mnr} / / rw,relatime shared:1 - {fstype} /dev/{name} rw,discard\n")
    block = sysfs / "devices" / "virtual" / "block" / name
    block.mkdir(parents=True)
    (sysfs / "dev" / "block").mkdir(parents=True)
    (sysfs / "dev" / "block" / f"{maj}:{mnr}").symlink_to(block)
    if journal is not None:
        (sysfs / "fs" / "ext4" / name).mkdir(parents=True)
        (sysfs / "fs" / "ext4" / name / "journal_task").write_text(journal + "\n")
    return os.makedev(maj, mnr), str(proc), str(sysfs)


@pytest.mark.parametrize("fstype, journal, ordered", [
    ("ext4", "1234", True),          # journaled ext4: metadata commits in order
    ("ext4", "<none>", False),       # ext4 without a journal: directory blocks go out in any order
    ("ext3", "77", True),
    ("xfs", None, True),
    ("btrfs", None, False),          # its log tree can persist one directory without the other
    ("nfs4", None, False),
    ("tmpfs", None, False),
])
def test_which_file_systems_order_metadata(tmp_path, fstype, journal, ordered):
    from postwell.delivery.virtual import metadata_in_order
    dev, proc, sysfs = fake_system(tmp_path, fstype, journal)
    assert metadata_in_order(dev, proc, sysfs) is ordered


def test_ext4_journal_found_through_jbd2_on_older_kernels(tmp_path):
    from postwell.delivery.virtual import metadata_in_order
    dev, proc, sysfs = fake_system(tmp_path, "ext4")
    assert metadata_in_order(dev, proc, sysfs) is False
    (tmp_path / "proc" / "fs" / "jbd2" / "vdq-8").mkdir(parents=True)
    assert metadata_in_order(dev, proc, sysfs) is True


def test_unknown_device_is_not_ordered(tmp_path):
    from postwell.delivery.virtual import metadata_in_order
    _, proc, sysfs = fake_system(tmp_path, "ext4", "99")
    assert metadata_in_order(os.makedev(8, 1), proc, sysfs) is False


def test_new_dir_fsync_skipped_only_with_the_queue_on_an_ordered_file_system(tmp_path, monkeypatch):
    from postwell.delivery import virtual
    from postwell.queue import store as qstore
    synced = []
    real = qstore.fsync_dir
    monkeypatch.setattr(qstore, "fsync_dir", lambda path, fsync=os.fsync: (synced.append(path),
                                                                            real(path, fsync)))
    dev = os.stat(tmp_path).st_dev
    monkeypatch.setattr(virtual, "_ordered_devices", {})

    def deliver(box, queue_dev):
        d = copy_for(tmp_path / box)
        d.queue_dev = queue_dev
        virtual.deliver_maildir(d, InlineContent(MSG))
        [path] = list((tmp_path / box / "new").iterdir())
        assert path.read_bytes() == HEADERS + MSG
        assert not os.listdir(tmp_path / box / "tmp")

    virtual._ordered_devices[dev] = True
    deliver("same", dev)                     # queue and Maildir on one ordered file system
    assert synced == []
    deliver("other", dev + 1)                # the queue elsewhere: new/ must be synced
    deliver("unknown", None)                 # the agent does not know where the queue is
    assert synced == [str(tmp_path / "other" / "new"), str(tmp_path / "unknown" / "new")]
    virtual._ordered_devices[dev] = False    # e.g. ext4 without a journal (this test machine?)
    deliver("nojournal", dev)
    assert synced[-1] == str(tmp_path / "nojournal" / "new")


def test_agents_tell_the_writer_where_the_queue_is(tmp_path):
    from postwell.config.main import Config
    from postwell.delivery.base import DeliveryRequest, Recipient
    from postwell.delivery.local import LocalAgent
    from postwell.delivery.virtual import VirtualAgent
    qdir = tmp_path / "queue"
    qdir.mkdir()
    cfg = Config(str(tmp_path), {"queue_directory": str(qdir), "myhostname": "mx.example.test",
                                 "alias_maps": "", "virtual_mailbox_base": str(tmp_path / "vmail"),
                                 "virtual_mailbox_maps": "inline:{u@v.test=u/}",
                                 "virtual_uid_maps": f"static:{os.geteuid()}",
                                 "virtual_gid_maps": f"static:{os.getegid()}",
                                 "virtual_minimum_uid": "0"}, {}, [])
    assert LocalAgent(cfg, store=QueueStore(str(qdir)), helper_socket="").queue_device \
        == os.stat(qdir).st_dev
    agent = VirtualAgent(cfg)
    req = DeliveryRequest(queue_id="4ABC12345", sender="s@example.test",
                          recipients=[Recipient("u@v.test")], transport="virtual", nexthop="v.test",
                          arrival_time=0.0, open_content=InlineContent(MSG), content_size=len(MSG))
    plan = agent.plan(req, req.recipients[0])
    assert plan.queue_dev == os.stat(qdir).st_dev
    missing = Config(str(tmp_path), {"queue_directory": str(tmp_path / "nowhere")}, {}, [])
    assert LocalAgent(missing, helper_socket="").queue_device is None


def test_ordered_delivery_in_a_worker_batch_owes_no_directory_sync(tmp_path, monkeypatch):
    from postwell.delivery import virtual
    dev = os.stat(tmp_path).st_dev
    monkeypatch.setattr(virtual, "_ordered_devices", {dev: True})
    owed = []
    virtual.defer_dir_syncs(owed)
    try:
        d = copy_for(tmp_path / "box")
        d.queue_dev = dev
        virtual.deliver_maildir(d, InlineContent(MSG))
        d = copy_for(tmp_path / "elsewhere")
        d.queue_dev = dev + 1
        virtual.deliver_maildir(d, InlineContent(MSG))
    finally:
        virtual.defer_dir_syncs(None)
    assert owed == [str(tmp_path / "elsewhere" / "new")]


def test_a_failing_file_system_probe_means_fsync(monkeypatch):
    from postwell.delivery import virtual
    monkeypatch.setattr(virtual, "_ordered_devices", {})

    def broken(dev):
        raise LookupError("no codec")        # anything at all: never skip the fsync on doubt
    monkeypatch.setattr(virtual, "metadata_in_order", broken)
    assert virtual.maildir_name_ordered(5, 5) is False
    assert virtual._ordered_devices == {5: False}
    assert virtual.maildir_name_ordered(None, 5) is False
    assert virtual.maildir_name_ordered(5, 6) is False
