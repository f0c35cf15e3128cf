"""local(8)'s Maildir file work in the root helper's own thread, as the user
(delivery/local_exec.py: per-thread credentials through the raw system calls,
Postfix's seteuid() model), and what still goes to the user workers."""

from __future__ import annotations

import os
import pwd
import subprocess
import threading

import pytest

from postwell.delivery import local_exec, local_helper
from postwell.delivery.base import QueueContent
from postwell.delivery.local_exec import Identity, WorkerPool, op_mailbox, op_read_file, run_as
from postwell.queue import QueueStore

from test_delivery_workers import GID, MSG, UID, copy_for, mailroot, messages, queue_message, root_only  # noqa: F401

pytestmark = [root_only, pytest.mark.skipif(not local_exec._thread_creds_available(),
                                            reason="no per-thread credentials on this platform")]


@pytest.fixture
def helper_pool(monkeypatch):
    """A root helper's set-up (use_worker_pool) with a spy on the workers."""
    pool = WorkerPool()
    calls = []
    real = WorkerPool.run

    def spy(self, ident, name, args):
        calls.append(name)
        return real(self, ident, name, args)
    monkeypatch.setattr(WorkerPool, "run", spy)
    monkeypatch.setattr(local_exec, "_pool", pool)
    monkeypatch.setattr(local_exec, "THREAD_IDENTITIES", True)
    yield calls
    pool.close()


def _creds():
    return os.geteuid(), os.getegid(), sorted(os.getgroups()), os.getuid()


def test_op_runs_as_the_user_in_this_thread_and_comes_back(helper_pool):
    before = _creds()
    seen = {}
    inside, release = threading.Event(), threading.Event()

    def op():
        seen["creds"] = _creds()
        inside.set()
        release.wait(10)
        return {"status": "sent"}
    t = threading.Thread(target=lambda: seen.setdefault("res", local_exec._run_in_thread(
        Identity(UID, GID, groups=[GID, GID + 1]), op)))
    t.start()
    assert inside.wait(10)
    # Another thread of the process keeps root's credentials meanwhile.
    assert _creds() == before
    release.set()
    t.join(10)
    assert seen["res"] == {"status": "sent"}
    # Effective ids and groups are the user's; the real uid stays root (the way back).
    assert seen["creds"] == (UID, GID, [GID, GID + 1], 0)
    assert _creds() == before


def test_failure_inside_is_an_answer_and_credentials_come_back(helper_pool):
    before = _creds()

    def op():
        raise OSError(13, "Permission denied")
    assert local_exec._run_in_thread(Identity(UID, GID), op) == {
        "error": "PermissionError: [Errno 13] Permission denied"}
    assert _creds() == before


def test_the_kernel_checks_the_users_rights(helper_pool, tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("root only\n")
    os.chmod(secret, 0o600)
    res = run_as(Identity(UID, GID), op_read_file, str(secret), UID, "forward")
    assert helper_pool == []
    assert "root only" not in str(res)
    # Root itself still reads it afterwards.
    assert secret.read_text() == "root only\n"


def test_maildir_delivery_in_the_thread_writes_as_the_user(helper_pool, mailroot):
    store = QueueStore(str(mailroot.parent / "queue"))
    store.ensure_layout()
    qm = store.open(queue_message(store, MSG), "active", writable=False)
    try:
        res = run_as(Identity(UID, GID), op_mailbox, copy_for(mailroot / "Maildir"), "someone", UID,
                     False, None, QueueContent(qm))
    finally:
        qm.close()
    assert res == {"status": "sent", "dsn": "2.0.0", "reason": "delivered to maildir"}
    assert helper_pool == [], "no worker for a Maildir"
    [path] = messages(mailroot / "Maildir")
    st = path.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (UID, GID, 0o600)
    assert path.read_bytes().endswith(MSG)
    assert (mailroot / "Maildir" / "tmp").stat().st_uid == UID


def test_maildir_the_user_cannot_write_is_refused(helper_pool, mailroot):
    locked = mailroot / "locked"
    locked.mkdir()
    os.chown(locked, 0, 0)
    os.chmod(locked, 0o755)
    res = run_as(Identity(UID, GID), op_mailbox, copy_for(locked / "Maildir"), "someone", UID,
                 False, None, lambda: iter([MSG]))
    assert res["status"] == "deferred" and "Permission denied" in res["reason"], res
    assert not (locked / "Maildir").exists()


def test_mbox_and_commands_still_go_to_user_processes(helper_pool, mailroot):
    box = copy_for(mailroot / "mbox")
    box.path, box.maildir = str(mailroot / "mbox"), False
    res = run_as(Identity(UID, GID), op_mailbox, box, "someone", UID, False, None, lambda: iter([MSG]))
    # A callable content source cannot travel to a worker: a forked child took it.
    assert res["status"] == "sent", res
    assert (mailroot / "mbox").stat().st_uid == UID
    assert helper_pool == ["op_mailbox"], "offered to a worker, never run in the thread"
    assert not local_exec._thread_identity_ok(op_mailbox, [box, "someone", UID, False, None, None])
    assert not local_exec._thread_identity_ok(local_exec.op_command, ["true"])


def test_no_way_back_to_root_ends_the_process(tmp_path):
    """A thread that cannot return to root must not serve anything else."""
    code = (
        "import os\n"
        "from postwell.delivery import local_exec as le\n"
        "real = le._set_thread_creds\n"
        "def fake(groups, gid, uid):\n"
        "    if uid == 0:\n"
        "        raise OSError(1, 'refused')\n"
        "    real(groups, gid, uid)\n"
        "le._set_thread_creds = fake\n"
        f"le._run_in_thread(le.Identity({UID}, {GID}), lambda: {{}})\n"
        "print('went on')\n")
    proc = subprocess.run(["python3", "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 70
    assert "went on" not in proc.stdout
    assert "cannot return to root credentials" in proc.stderr


def test_helper_request_for_a_maildir_user_needs_no_worker(helper_pool, mailroot, tmp_path):
    """The whole helper request (passwd, .forward check, Maildir) for a real user."""
    from postwell.config import Config
    from postwell.delivery.local import LocalAgent
    from postwell.log import NullLog
    import harness
    name = "pwlt7"
    with harness.machine_lock("users-pwlt7"):
        subprocess.run(["userdel", name], capture_output=True, timeout=30)
        subprocess.run(["useradd", "-M", "-d", str(mailroot), "-s", "/usr/sbin/nologin", name],
                       capture_output=True, timeout=30, check=True)
    try:
        pw = pwd.getpwnam(name)
        os.chown(mailroot, pw.pw_uid, pw.pw_gid)
        store = QueueStore(str(tmp_path / "queue"))
        store.ensure_layout()
        cfg = Config(str(tmp_path), {
            "myhostname": "mx.example.test", "mydestination": "mx.example.test",
            "alias_maps": "", "home_mailbox": "Maildir/", "queue_directory": store.queue_directory,
            "message_size_limit": "10240000"}, {}, [])
        agent = LocalAgent(cfg, log=NullLog("local"), store=store, helper_socket="")
        out = local_helper.handle_request(agent, store, {
            "queue_id": queue_message(store, MSG), "sender": "sender@example.test",
            "nexthop": "mx.example.test", "recipients": [[f"{name}@mx.example.test", None]]})
        assert out == [[[f"{name}@mx.example.test", f"{name}@mx.example.test", "sent", "2.0.0",
                         "delivered to maildir", None, None]]]
        assert helper_pool == []
        [path] = messages(mailroot / "Maildir")
        assert path.stat().st_uid == pw.pw_uid
        # A .forward is read as the user too, and followed.
        (mailroot / ".forward").write_text("other@example.org\n")
        os.chown(mailroot / ".forward", pw.pw_uid, pw.pw_gid)
        out = local_helper.handle_request(agent, store, {
            "queue_id": queue_message(store, MSG), "sender": "sender@example.test",
            "nexthop": "mx.example.test", "recipients": [[f"{name}@mx.example.test", None]]})
        assert [leaf[0] for leaf in out[0]] == ["other@example.org"], out
        assert helper_pool == []
    finally:
        with harness.machine_lock("users-pwlt7"):
            subprocess.run(["userdel", name], capture_output=True, timeout=30)
