"""Master daemon and the postfix(1) command: start/stop/status/reload/abort,
privilege drop, supervision, end-to-end delivery through qmgr + virtual.

The master is started as a real daemon in a subprocess.  Parts built by others
(master.cf parsing, the SMTP server) are replaced by small stand-ins from
``pw_test_stubs`` only while the real ones are missing.
"""

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest

import harness

STUBS = r'''
import asyncio, signal, sys
import postwell.config.master as cm
from postwell.config.master import MasterService

def _parse(text, filename="master.cf"):
    out = []
    lines = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line[0].isspace() and lines:
            lines[-1] = (lines[-1][0], lines[-1][1] + " " + line.strip())
        else:
            lines.append((n, line.strip()))
    for n, line in lines:
        f = line.split()
        args, ov = f[8:], {}
        i = 0
        while i < len(args):
            if args[i] == "-o" and i + 1 < len(args):
                k, _, v = args[i + 1].partition("="); ov[k] = v; i += 2
            else:
                i += 1
        out.append(MasterService(f[0], f[1], f[2] != "n", f[3] != "n", f[4] == "y", f[5],
                                 None if f[6] == "-" else int(f[6]), f[7], args, ov, n))
    return out

try:
    cm.parse_master_cf("", "x")
except NotImplementedError:
    cm.parse_master_cf = _parse

import postwell.smtpd as smtpd_pkg
if not callable(getattr(smtpd_pkg, "serve", None)):
    def serve(config, service, sockets):
        async def session(reader, writer):
            writer.write(b"220 stub ESMTP\r\n")
            await writer.drain()
            while True:
                line = await reader.readline()
                if not line:
                    break
                if line.strip().upper() == b"QUIT":
                    writer.write(b"221 2.0.0 Bye\r\n")
                    await writer.drain()
                    break
                writer.write(b"250 ok\r\n")
                await writer.drain()
            writer.close()
        async def main():
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            loop.add_signal_handler(signal.SIGTERM, stop.set)
            servers = [await asyncio.start_server(session, sock=s, backlog=4096) for s in sockets]
            await stop.wait()
            for s in servers:
                s.close()
            await asyncio.sleep(1.0)   # let sessions in progress finish (drain)
        asyncio.run(main())
    smtpd_pkg.serve = serve
'''

RUNNER = "import sys, pw_test_stubs; from postwell.cli.postfix import main; sys.exit(main(sys.argv[1:]))"


def free_port():
    # Outside the ephemeral range: no outgoing connection can take it meanwhile.
    return harness.free_port()


def owner_name():
    if os.geteuid() != 0:
        return pwd.getpwuid(os.getuid()).pw_name
    try:
        pwd.getpwnam("postwelltest")
    except KeyError:
        subprocess.run(["useradd", "-r", "-M", "-s", "/usr/sbin/nologin", "postwelltest"],
                       check=False, capture_output=True)
    try:
        pwd.getpwnam("postwelltest")
        return "postwelltest"
    except KeyError:
        return "nobody"


class Instance:
    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="pw-master-")
        os.chmod(self.dir, 0o755)
        self.etc = os.path.join(self.dir, "etc")
        os.mkdir(self.etc)
        self.stubdir = os.path.join(self.dir, "stubs")
        os.mkdir(self.stubdir)
        with open(os.path.join(self.stubdir, "pw_test_stubs.py"), "w") as f:
            f.write(STUBS)
        self.owner = pwd.getpwnam(owner_name())
        self.port = free_port()
        self.mail = os.path.join(self.dir, "mail")
        os.mkdir(self.mail, 0o755)
        # As root the mailboxes belong to another account than mail_owner (nobody),
        # which only the privileged virtual helper can write as.
        self.box_uid, self.box_gid = ((65534, 65534) if os.geteuid() == 0
                                      else (self.owner.pw_uid, self.owner.pw_gid))
        if os.geteuid() == 0:
            os.chown(self.mail, self.box_uid, self.box_gid)
        self.write_main()
        self.write_master([f"127.0.0.1:{self.port} inet n - n - 2 smtpd"])

    def write_main(self, extra=""):
        text = textwrap.dedent(f"""\
            queue_directory = {self.dir}/queue
            data_directory = {self.dir}/data
            maillog_file = {self.dir}/maillog
            mail_owner = {self.owner.pw_name}
            myhostname = mx.demo.test
            mydestination =
            virtual_mailbox_domains = demo.test
            virtual_mailbox_maps = inline:{{alice@demo.test=alice/}}
            virtual_mailbox_base = {self.mail}
            virtual_uid_maps = static:{self.box_uid}
            virtual_gid_maps = static:{self.box_gid}
            virtual_minimum_uid = 1
            """) + extra
        with open(os.path.join(self.etc, "main.cf"), "w") as f:
            f.write(text)

    def write_master(self, lines):
        with open(os.path.join(self.etc, "master.cf"), "w") as f:
            f.write("\n".join(lines + ["qmgr unix n - n 300 1 qmgr",
                                       "cleanup unix n - n - 0 cleanup",
                                       "virtual unix - n n - - virtual",
                                       "maildrop unix - n n - - pipe flags=DRhu user=vmail argv=/bin/true",
                                       "postlog unix-dgram n - n - 1 postlogd",
                                       "policyd unix - n n - 0 spawn user=nobody argv=/bin/true"]) + "\n")

    def run(self, *args, timeout=60):
        env = dict(os.environ, PYTHONPATH=self.stubdir + os.pathsep + os.environ.get("PYTHONPATH", ""))
        return subprocess.run([sys.executable, "-c", RUNNER, "-c", self.etc, *args], env=env,
                              capture_output=True, text=True, timeout=timeout)

    def run_tty(self, *args, timeout=60):
        """stderr of a postfix(1) command whose stderr is a terminal (a pty)."""
        env = dict(os.environ, PYTHONPATH=self.stubdir + os.pathsep + os.environ.get("PYTHONPATH", ""))
        return harness.stderr_on_tty([sys.executable, "-c", RUNNER, "-c", self.etc, *args], env, timeout)

    def log(self):
        try:
            with open(os.path.join(self.dir, "maillog")) as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def master_pid(self):
        with open(os.path.join(self.dir, "queue", "pid", "master.pid")) as f:
            return int(f.read().strip())

    def children(self):
        pid = self.master_pid()
        out = []
        for p in os.listdir("/proc"):
            if p.isdigit():
                try:
                    with open(f"/proc/{p}/stat") as f:
                        fields = f.read().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                if int(fields[1]) == pid and fields[0] != "Z":
                    out.append(int(p))
        return sorted(out)

    def cleanup(self):
        try:
            pid = self.master_pid()
            os.kill(pid, signal.SIGQUIT)
            time.sleep(0.5)
        except (OSError, ValueError):
            pass
        shutil.rmtree(self.dir, ignore_errors=True)


def wait_for(pred, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return False


def smtp_banner(port, timeout=5.0):
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        return s.recv(512)


@pytest.fixture
def inst():
    i = Instance()
    yield i
    i.cleanup()


def test_start_status_stop(inst):
    r = inst.run("start")
    assert r.returncode == 0, r.stderr
    # The listener is bound when start returns.
    assert smtp_banner(inst.port).startswith(b"220 ")
    r = inst.run("status")
    pid = inst.master_pid()
    assert r.returncode == 0
    # postfix-script's words go to the maillog, and to stderr only on a terminal.
    assert r.stderr == ""
    assert f"the Postfix mail system is running: PID: {pid}" in inst.log()
    err = inst.run_tty("status")
    assert f"postfix/postfix-script: the Postfix mail system is running: PID: {pid}" in err
    log = inst.log()
    assert "postfix/postfix-script[" in log and "starting the Postfix mail system" in log
    assert "postfix/master[" in log and "daemon started -- version" in log
    # no "not implemented" warning for the spawn(8) service, the mapped internals,
    # pipe(8) or postlogd
    assert "command spawn" not in log and "service cleanup" not in log
    assert "service maildrop" not in log and "service postlog" not in log
    # 2 smtpd + qmgr + the spawn(8) supervisor (anvil, showq and, as root, the
    # virtual, local and pipe helpers run on demand)
    assert wait_for(lambda: len(inst.children()) == 4)
    if os.geteuid() == 0:
        uids = []
        for child in inst.children():
            with open(f"/proc/{child}/status") as f:
                uids.append(set([l for l in f if l.startswith("Uid:")][0].split()[1:]))
        assert uids.count({"0"}) == 1                     # only spawn (helpers: on demand)
        assert uids.count({str(inst.owner.pw_uid)}) == 3  # smtpd x2, qmgr as mail_owner
    r = inst.run("start")
    assert r.returncode == 1 and "fatal: the Postfix mail system is already running" in inst.log()
    r = inst.run("stop")
    assert r.returncode == 0, r.stderr
    assert not os.path.exists(os.path.join(inst.dir, "queue", "pid", "master.pid"))
    r = inst.run("status")
    assert r.returncode == 1 and "]: the Postfix mail system is not running" in inst.log()
    assert "terminating on signal 15" in inst.log()
    r = inst.run("stop")
    assert r.returncode == 1 and "fatal: the Postfix mail system is not running" in inst.log()
    assert inst.run_tty("stop") == "postfix/postfix-script: fatal: the Postfix mail system is not running\n"


def test_port_in_use_fails(inst):
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", inst.port))
    blocker.listen(1)
    try:
        r = inst.run("start")
    finally:
        blocker.close()
    assert r.returncode == 1 and r.stderr == ""
    # As Postfix: the master logs why, postfix-script that start-up failed.
    log = inst.log()
    assert "postfix/master[" in log
    assert f"fatal: bind 127.0.0.1 port {inst.port}: Address already in use" in log
    assert "postfix/postfix-script[" in log and "fatal: mail system startup failed" in log
    assert not os.path.exists(os.path.join(inst.dir, "queue", "pid", "master.pid"))


def test_bad_config_fails(inst):
    with open(os.path.join(inst.etc, "main.cf"), "a") as f:
        f.write("this line is bad\n")
    r = inst.run("start")
    assert r.returncode == 1 and r.stderr == ""
    assert inst.run_tty("start").startswith("postfix: fatal: ")
    r = inst.run("check")
    assert r.returncode == 1


def test_reload_keeps_sessions_and_binds_new_services(inst):
    assert inst.run("start").returncode == 0
    old = socket.create_connection(("127.0.0.1", inst.port), timeout=5)
    try:
        assert old.recv(512).startswith(b"220")
        port2 = free_port()
        inst.write_master([f"127.0.0.1:{inst.port} inet n - n - 1 smtpd",
                           f"127.0.0.1:{port2} inet n - n - 1 smtpd"])
        r = inst.run("reload")
        assert r.returncode == 0, r.stderr
        assert wait_for(lambda: "reload -- version" in inst.log())
        assert wait_for(lambda: _connects(port2))
        assert smtp_banner(inst.port).startswith(b"220")
        # The session opened before the reload still works (old worker drains).
        old.sendall(b"QUIT\r\n")
        assert old.recv(512).startswith(b"221")
    finally:
        old.close()
    assert inst.run("stop").returncode == 0


def _connects(port):
    try:
        return smtp_banner(port, 2).startswith(b"220")
    except OSError:
        return False


def test_crashed_child_is_restarted(inst):
    assert inst.run("start").returncode == 0
    n = 4   # 2 smtpd, qmgr, spawn (anvil and the root helpers run on demand)
    assert wait_for(lambda: len(inst.children()) == n)
    time.sleep(1.2)   # a child dying right at start-up would throttle the service instead
    victim = inst.children()[0]
    os.kill(victim, signal.SIGKILL)
    assert wait_for(lambda: victim not in inst.children() and len(inst.children()) == n)
    assert f"pid {victim} killed by signal 9" in inst.log()
    assert smtp_banner(inst.port).startswith(b"220")
    assert inst.run("abort").returncode == 0
    assert wait_for(lambda: not os.path.exists(os.path.join(inst.dir, "queue", "pid", "master.pid")))


def test_end_to_end_virtual_delivery(inst):
    from postwell.queue import QueueStore, notify_qmgr
    assert inst.run("start").returncode == 0
    store = QueueStore(os.path.join(inst.dir, "queue"))
    msg = store.create()
    msg.set_sender("bob@remote.test")
    msg.add_recipient("alice@demo.test")
    msg.write(b"Subject: e2e\n\nhello\n")
    msg.commit()
    if os.geteuid() == 0:
        os.chown(os.path.join(inst.dir, "queue", "incoming", msg.queue_id),
                 inst.owner.pw_uid, inst.owner.pw_gid)
    notify_qmgr(os.path.join(inst.dir, "queue"))
    new = os.path.join(inst.mail, "alice", "new")
    assert wait_for(lambda: os.path.isdir(new) and os.listdir(new), 20), inst.log()
    assert wait_for(lambda: f"{msg.queue_id}: removed" in inst.log())
    log = inst.log()
    assert f"postfix/qmgr[" in log and f"{msg.queue_id}: from=<bob@remote.test>, size=20, nrcpt=1 (queue active)" in log
    assert "postfix/virtual[" in log and f"{msg.queue_id}: to=<alice@demo.test>, relay=virtual, delay=" in log
    assert "status=sent (delivered to maildir)" in log
    st = os.stat(os.path.join(new, os.listdir(new)[0]))
    assert (st.st_uid, st.st_gid) == (inst.box_uid, inst.box_gid)
    assert inst.run("stop").returncode == 0


def test_children_exit_when_master_is_killed(inst):
    assert inst.run("start").returncode == 0
    n = 4   # 2 smtpd, qmgr, spawn (anvil and the root helpers run on demand)
    assert wait_for(lambda: len(inst.children()) == n)
    children = inst.children()
    os.kill(inst.master_pid(), signal.SIGKILL)

    def gone():
        for c in children:
            try:
                with open(f"/proc/{c}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                        return False
            except OSError:
                continue
        return True
    assert wait_for(gone, 70), [(c, open(f"/proc/{c}/status").read()[:300]) for c in children
                                if os.path.exists(f"/proc/{c}")]
    # A fresh start works: no orphan holds the port, the stale pid file is ignored.
    r = inst.run("start")
    assert r.returncode == 0, r.stderr
    assert smtp_banner(inst.port).startswith(b"220")
    assert inst.run("stop").returncode == 0
