"""Least privilege (DESIGN.md property 3), read from /proc of a running postwell.

Only the master (and the local-delivery helper, which forks and drops to the
recipient per delivery, like local(8)) keep root.  The smtpd workers and the
qmgr run as mail_owner with real, effective, saved and file-system uids all
non-zero and no capabilities, so setuid(0) fails for them.  The queue
directories are 0700 mail_owner; maildrop lets any user drop, not list.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

import harness
from harness import VIRTUAL_DOMAIN as VD

pytestmark = pytest.mark.skipif(not harness.is_root(), reason="privilege dropping needs root")

def _status(pid: int) -> dict[str, list[str]]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            out[k] = v.split()
    return out


def _socket_inodes(pid: int) -> set[str]:
    out = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                out.add(target[8:-1])
    except OSError:
        pass
    return out


def _listening_inode(port: int) -> str:
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and int(local.split(":")[1], 16) == port:
                return inode
    raise AssertionError(f"nothing listens on {port}")


def _fifo_holders(path: str) -> list[int]:
    want = os.stat(path)
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            for fd in os.listdir(f"/proc/{entry}/fd"):
                try:
                    st = os.stat(f"/proc/{entry}/fd/{fd}")
                except OSError:
                    continue
                if (st.st_dev, st.st_ino) == (want.st_dev, want.st_ino):
                    out.append(int(entry))
                    break
        except OSError:
            continue
    return out


def _assert_unprivileged(pid: int, uid: int, gid: int, what: str) -> None:
    st = _status(pid)
    uids = [int(x) for x in st["Uid"]]
    gids = [int(x) for x in st["Gid"]]
    groups = [int(x) for x in st.get("Groups", [])]
    assert uids == [uid] * 4, f"{what} pid {pid}: Uid real/eff/saved/fs = {uids}"
    assert gids == [gid] * 4, f"{what} pid {pid}: Gid = {gids}"
    assert 0 not in groups and set(groups) <= {gid}, f"{what} pid {pid}: Groups = {groups}"
    # No capability left, so setuid(0) (or any privileged call) fails with EPERM.
    for cap in ("CapPrm", "CapEff", "CapAmb"):
        if cap in st:
            assert int(st[cap][0], 16) == 0, f"{what} pid {pid}: {cap} = {st[cap][0]}"
    assert st.get("NoNewPrivs", ["0"])[0] in ("0", "1")


def test_children_run_as_mail_owner(postwell_factory):
    inst = postwell_factory().start()
    # A session in progress, so a worker is busy with client data while we look.
    conn = harness.SmtpConnection(inst.port)
    try:
        assert conn.reply().code == 220
        master = inst.master_pid()
        children = [p for p in inst.processes() if p != master]
        listen = _listening_inode(inst.port)
        smtpd = [p for p in children if listen in _socket_inodes(p)]
        qmgr = [p for p in _fifo_holders(str(inst.queue_dir / "public" / "qmgr")) if p in children]
        assert smtpd, "no smtpd worker holds the listening socket"
        assert qmgr, "no qmgr holds public/qmgr"
        for pid in smtpd:
            _assert_unprivileged(pid, inst.uid, inst.gid, "smtpd")
        for pid in qmgr:
            _assert_unprivileged(pid, inst.uid, inst.gid, "qmgr")
        # Whatever stays root must not touch the network: no listening socket, and
        # it is not the process holding our client connection.
        for pid in children:
            if int(_status(pid)["Uid"][1]) == 0:
                assert listen not in _socket_inodes(pid), f"root child {pid} holds the listener"
    finally:
        conn.close()


def test_setuid_zero_fails_in_a_worker_like_process(tmp_path):
    """What 'all uids non-zero' buys: after the master's drop, setuid(0) is EPERM."""
    name, uid, gid = harness.mail_owner_ids()
    code = ("import os, sys\n"
            "from postwell.master.daemon import drop_privileges\n"
            f"drop_privileges(({uid}, {gid}, {name!r}))\n"
            "try:\n    os.setuid(0)\nexcept PermissionError:\n    sys.exit(0)\nsys.exit(3)\n")
    cp = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert cp.returncode == 0, cp.stderr


def test_queue_directories_private_to_mail_owner(postwell_factory):
    inst = postwell_factory().start()
    for name in ("incoming", "active", "deferred", "hold", "corrupt", "defer", "bounce"):
        st = os.stat(inst.queue_dir / name)
        assert stat.S_IMODE(st.st_mode) == 0o700, f"{name}: {oct(stat.S_IMODE(st.st_mode))}"
        assert st.st_uid == inst.uid, f"{name} owned by uid {st.st_uid}"
    # A committed queue file is readable by mail_owner only.
    with _smtp(inst.port) as s:
        s.sendmail("s@example.org", [f"alice@{VD}"], harness.make_message("priv"))
    inst.wait_maildir("alice", 1)
    for p in inst.maildir_messages("alice"):
        st = os.stat(p)
        assert st.st_uid == inst.uid and not stat.S_IMODE(st.st_mode) & 0o077, oct(st.st_mode)


def _smtp(port):
    import smtplib
    return smtplib.SMTP("127.0.0.1", port, timeout=15)


def _as_user(uid: int, gid: int, code: str) -> subprocess.CompletedProcess:
    wrapper = (f"import os\nos.setgroups([])\nos.setgid({gid})\nos.setuid({uid})\n" + code)
    return subprocess.run([sys.executable, "-c", wrapper], capture_output=True, text=True,
                          timeout=30)


def test_maildrop_drop_but_not_list(postwell_factory):
    try:
        import postwell.pickup  # noqa: F401
    except ImportError:
        pytest.skip("pickup/maildrop is not built yet")
    inst = postwell_factory(master_cf=None)
    inst.master_cf = inst.default_master_cf() + "pickup    unix  n       -       n       60      1       pickup\n"
    inst.write_config()
    inst.start()
    if "command pickup is not implemented" in inst.log_text():
        pytest.skip("the master does not run pickup yet")
    maildrop = inst.queue_dir / "maildrop"
    harness.wait_for(lambda: stat.S_IMODE(os.stat(maildrop).st_mode) & 0o003 == 0o003, 10, 0.1,
                     "maildrop to be opened for drops")
    st = os.stat(maildrop)
    mode = stat.S_IMODE(st.st_mode)
    assert st.st_uid == inst.uid
    assert mode & stat.S_ISVTX, "no sticky bit: users could remove each other's drops"
    assert not mode & 0o004, f"maildrop listable by others: {oct(mode)}"
    nobody = 65534
    cp = _as_user(nobody, nobody, f"import os, sys\n"
                  f"try:\n    os.listdir({str(maildrop)!r})\n    sys.exit(5)\n"
                  f"except PermissionError:\n    pass\n"
                  f"fd = os.open({str(maildrop / '.tmp.probe-by-nobody')!r}, os.O_CREAT|os.O_EXCL|os.O_WRONLY, 0o644)\n"
                  f"os.close(fd)\n")
    assert cp.returncode == 0, f"rc {cp.returncode}: {cp.stderr}"
    assert os.stat(maildrop / ".tmp.probe-by-nobody").st_uid == nobody
    # pickup reads what users drop: it runs as mail_owner, not root.  It runs
    # on demand (the master holds public/pickup and forks it when poked).
    master = inst.master_pid()
    fifo = str(inst.queue_dir / "public" / "pickup")
    poke = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    os.write(poke, b"W")
    os.close(poke)

    def holders():
        return [p for p in _fifo_holders(fifo) if p in inst.processes() and p != master]
    harness.wait_for(holders, 10, 0.05, "pickup to start")
    pickup = holders()
    assert pickup, "no pickup process holds public/pickup"
    for pid in pickup:
        _assert_unprivileged(pid, inst.uid, inst.gid, "pickup")
    # ...and that user cannot look into the real queue.
    cp = _as_user(nobody, nobody, f"import os\nos.listdir({str(inst.queue_dir / 'incoming')!r})\n")
    assert cp.returncode != 0 and "PermissionError" in cp.stderr
