"""Issue 3 end to end: a running postwell delivering to real system users.

The recipe a Postfix admin follows: mydestination, local_transport = local,
alias_maps built with newaliases, Maildir in the home or mbox in the spool.
Users (pwe*) are created with useradd for the module and removed with
userdel -r afterwards, so everything here needs root.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import stat
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from harness import HOSTNAME, PostwellInstance, dialogue, wait_for  # noqa: E402
import harness  # noqa: E402

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("useradd"),
                                reason="needs root and useradd to create real users")

E2E_USERS = ("pwe1", "pwe2", "pwe3")
LOCAL_SERVICE = "local     unix  -       n       n       -       -       local\n"
PICKUP_SERVICE = "pickup    unix  n       -       n       60      1       pickup\n"
SMTP_SERVICE = "smtp      unix  -       -       n       -       -       smtp\n"
TIMEOUT = 30


# ------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def e2e_users():
    # The user names (and /tmp/pwe-shared of test_issue3_reference) are fixed:
    # another test run on this machine must not delete them underneath us.
    with harness.real_users(E2E_USERS, "users-pwe", "pwe-homes-") as made:
        yield made


def reset_homes(users) -> None:
    """Each test starts from empty homes (no Maildir, no .forward, no output files)."""
    for pw in users.values():
        home = Path(pw.pw_dir)
        if not home.is_dir():
            continue
        for p in home.iterdir():
            if p.name.startswith(".forward") or p.name in ("Maildir", "uid.txt", "out"):
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)


class LocalSite:
    """A postwell instance configured for local delivery, plus helpers."""

    def __init__(self, factory, users, params=None, aliases: str = "", pickup: bool = True,
                 services: str = SMTP_SERVICE):
        self.users = users
        self.inst: PostwellInstance = factory()
        root = self.inst.root
        self.spool = root / "spool"
        self.spool.mkdir()
        os.chown(self.spool, 0, 8)        # Debian's /var/mail: root:mail 2775
        os.chmod(self.spool, 0o2775)
        self.aliases = self.inst.config_dir / "aliases"
        self.aliases.write_text(aliases)
        p = {
            "myorigin": "$myhostname",
            "mydestination": "$myhostname, localhost",
            "local_transport": "local",
            "alias_maps": f"hash:{self.aliases}",
            "alias_database": f"hash:{self.aliases}",
            # Postfix's default: unknown users are refused at RCPT.
            "local_recipient_maps": "proxy:unix:passwd.byname $alias_maps",
            "mail_spool_directory": str(self.spool),
            "recipient_delimiter": "+",
        }
        p.update(params or {})
        self.inst.main_cf = p
        self.inst.master_cf = (self.inst.default_master_cf() + LOCAL_SERVICE + services
                               + (PICKUP_SERVICE if pickup else ""))
        self.inst.write_config()
        # The admin's way: newaliases reads alias_database from main.cf.
        from test_sendmail import run as run_sendmail
        self.inst.queue_dir.mkdir(exist_ok=True)     # sendmail/newaliases chdir there, as Postfix's do
        rc, out, err = run_sendmail(["-C", str(self.inst.config_dir)], b"", prog="newaliases")
        assert (rc, out, err) == (0, b"", b""), err
        assert (self.inst.config_dir / "aliases.db").exists() or not p["alias_database"]
        self.inst.start(timeout=60)    # the machine is shared: start-up can be slow

    def smtp(self, rcpts, body="Subject: e2e\r\n\r\nhello\r\n", sender="sender@remote.test"):
        lines = ["EHLO client.test", f"MAIL FROM:<{sender}>"]
        lines += [f"RCPT TO:<{r}>" for r in rcpts]
        lines += ["DATA", *body.rstrip("\r\n").split("\r\n"), ".", "QUIT"]
        return dialogue(self.inst.port, lines, timeout=TIMEOUT)

    def log_lines(self, regex: str) -> list[str]:
        return [ln for ln in self.inst.log_text().splitlines() if re.search(regex, ln)]

    def wait_log(self, regex: str, timeout: float = TIMEOUT) -> re.Match:
        return self.inst.wait_log(regex, timeout)

    def maildir_files(self, user: str) -> list[Path]:
        new = Path(self.users[user].pw_dir) / "Maildir" / "new"
        return sorted(new.iterdir()) if new.is_dir() else []

    def wait_maildir(self, user: str, count: int = 1) -> list[Path]:
        try:
            return wait_for(lambda: len(f := self.maildir_files(user)) >= count and f,
                            TIMEOUT, 0.05, f"{count} message(s) in {user}'s Maildir")
        except TimeoutError:
            raise AssertionError(self.inst.log_text()[-3000:]) from None

    def wait_mbox(self, user: str, count: int = 1) -> bytes:
        path = self.spool / user

        def complete():
            # each message ends with the empty line mbox delivery appends
            data = path.read_bytes() if path.exists() else b""
            return data.count(b"Return-Path: ") >= count and data.endswith(b"\n\n")
        try:
            wait_for(complete, TIMEOUT, 0.05, f"{count} message(s) in {user}'s mbox")
        except TimeoutError:
            raise AssertionError(self.inst.log_text()[-3000:]) from None
        return path.read_bytes()


@pytest.fixture
def site(postwell_factory, e2e_users):
    reset_homes(e2e_users)
    made = []

    def make(params=None, aliases="", **kw):
        s = LocalSite(postwell_factory, e2e_users, params, aliases, **kw)
        made.append(s)
        return s
    yield make
    reset_homes(e2e_users)


def owner_and_mode(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_uid, stat.S_IMODE(st.st_mode)


def delivered_line(qid: str, to: str, reason: str, orig: str | None = None) -> str:
    orig_part = rf", orig_to=<{re.escape(orig)}>" if orig else ""
    return (rf"postfix/local\[\d+\]: {qid}: to=<{re.escape(to)}>{orig_part}, relay=local, "
            rf"delay=[\d.]+, delays=[\d.]+/[\d.]+/[\d.]+/[\d.]+, dsn=2\.0\.0, "
            rf"status=sent \({re.escape(reason)}\)")


def queued_id(replies) -> str:
    m = re.search(r"queued as ([0-9A-Za-z]+)", str(replies[-2]))
    assert m, replies
    return m.group(1)


# ------------------------------------------------------------------ mailboxes

def test_maildir_delivery_through_smtp(site, e2e_users):
    s = site({"home_mailbox": "Maildir/"})
    replies = s.smtp([f"pwe1@{HOSTNAME}"], sender="sender@remote.test")
    qid = queued_id(replies)
    [path] = s.wait_maildir("pwe1")
    pw = e2e_users["pwe1"]
    assert owner_and_mode(path) == (pw.pw_uid, 0o600)
    maildir = Path(pw.pw_dir) / "Maildir"
    for sub in ("", "new", "cur", "tmp"):
        assert os.stat(maildir / sub).st_uid == pw.pw_uid
    data = path.read_bytes()
    # Postfix's local(8) prepends these three, in this order.
    assert data.startswith(b"Return-Path: <sender@remote.test>\n"
                           b"X-Original-To: pwe1@mx.example.test\n"
                           b"Delivered-To: pwe1@mx.example.test\n"), data[:300]
    assert data.endswith(b"\nhello\n")
    s.wait_log(delivered_line(qid, f"pwe1@{HOSTNAME}", "delivered to maildir"))
    s.wait_log(rf"postfix/qmgr\[\d+\]: {qid}: removed")


def test_mbox_delivery_through_smtp(site, e2e_users):
    s = site()
    qid = queued_id(s.smtp([f"pwe2@{HOSTNAME}"], body="Subject: mbox\r\n\r\nFrom here\r\nend\r\n"))
    data = s.wait_mbox("pwe2")
    assert owner_and_mode(s.spool / "pwe2") == (e2e_users["pwe2"].pw_uid, 0o600)
    first, rest = data.split(b"\n", 1)
    assert re.match(rb"From sender@remote\.test  \w{3} \w{3} [ \d]\d \d\d:\d\d:\d\d \d{4}$", first), first
    assert rest.startswith(b"Return-Path: <sender@remote.test>\nX-Original-To: pwe2@mx.example.test\n"
                           b"Delivered-To: pwe2@mx.example.test\n")
    assert b"\n>From here\nend\n\n" in data     # From_ quoting, blank line after the message
    s.wait_log(delivered_line(qid, f"pwe2@{HOSTNAME}", "delivered to mailbox"))
    assert not (s.spool / "pwe2.lock").exists()     # the dot-lock is gone once delivery is done


def test_unknown_user_rejected_at_rcpt(site):
    s = site()
    replies = dialogue(s.inst.port, ["EHLO client.test", "MAIL FROM:<sender@remote.test>",
                                     f"RCPT TO:<nosuchpwe@{HOSTNAME}>", "QUIT"], timeout=TIMEOUT)
    rcpt = replies[3]
    assert rcpt.code == 550, replies
    assert str(rcpt).startswith(f"550 5.1.1 <nosuchpwe@{HOSTNAME}>: Recipient address rejected: "
                                "User unknown in local recipient table"), rcpt
    s.wait_log(r"NOQUEUE: reject: RCPT from \S+: 550 5\.1\.1 <nosuchpwe@mx\.example\.test>: "
               r"Recipient address rejected: User unknown in local recipient table; "
               r"from=<sender@remote\.test> to=<nosuchpwe@mx\.example\.test> proto=ESMTP helo=<client\.test>")


# ------------------------------------------------------------------ aliases

def test_alias_list_and_include(site, e2e_users, tmp_path):
    include = Path(tempfile.mkdtemp(prefix="pwe-inc-")) / "members"
    try:
        os.chmod(include.parent, 0o755)
        include.write_text("pwe3\n# a comment\npwe1\n")
        s = site(aliases=f"team: pwe1, pwe2\nincl: :include:{include}\npostmaster: root\n")
        qid = queued_id(s.smtp([f"team@{HOSTNAME}"]))
        s.wait_mbox("pwe1")
        s.wait_mbox("pwe2")
        for user in ("pwe1", "pwe2"):
            s.wait_log(delivered_line(qid, f"{user}@{HOSTNAME}", "delivered to mailbox",
                                      orig=f"team@{HOSTNAME}"))
        # frozen_delivered_to = yes: Delivered-To names the alias the delivery started with
        mbox2 = (s.spool / "pwe2").read_bytes()
        assert b"X-Original-To: team@mx.example.test\nDelivered-To: team@mx.example.test\n" in mbox2
        queued_id(s.smtp([f"incl@{HOSTNAME}"]))
        s.wait_mbox("pwe3")
        s.wait_mbox("pwe1", 2)
        # The :include: members may be delivered under a new queue id (forwarded as ...).
        for user in ("pwe3", "pwe1"):
            s.wait_log(delivered_line(r"[0-9A-F]+", f"{user}@{HOSTNAME}", "delivered to mailbox",
                                      orig=f"incl@{HOSTNAME}"))
    finally:
        shutil.rmtree(include.parent, ignore_errors=True)


def test_root_redirected_to_someone(site, e2e_users):
    s = site({"home_mailbox": "Maildir/"}, aliases="postmaster: root\nroot: pwe2\n")
    cp = s.inst.run("postalias", "-q", "root", f"hash:{s.aliases}")
    assert (cp.returncode, cp.stdout) == (0, "pwe2\n")
    qid = queued_id(s.smtp([f"root@{HOSTNAME}"]))
    [path] = s.wait_maildir("pwe2")
    assert owner_and_mode(path) == (e2e_users["pwe2"].pw_uid, 0o600)
    # Postfix: to=<the user>, orig_to=<root@...>
    s.wait_log(delivered_line(qid, f"pwe2@{HOSTNAME}", "delivered to maildir", orig=f"root@{HOSTNAME}"))
    assert not (Path(pwd.getpwnam("root").pw_dir) / "Maildir" / "new").is_dir() or \
        not any(path.name in p.name for p in (Path(pwd.getpwnam("root").pw_dir) / "Maildir/new").iterdir())


def test_alias_command_records_uid_only_when_allowed(site, e2e_users):
    out_dir = Path(tempfile.mkdtemp(prefix="pwe-cmd-"))
    os.chmod(out_dir, 0o1777)     # default_privs (nobody) must be able to write here
    out = out_dir / "uid.txt"
    try:
        s = site(aliases=f'runit: "|/bin/sh -c \'id -u > {out}\'"\n')
        qid = queued_id(s.smtp([f"runit@{HOSTNAME}"]))
        wait_for(lambda: out.exists() and out.read_text().strip(), TIMEOUT, what="the command's output")
        # Commands from a root-owned aliases file run as default_privs (nobody), never root.
        assert out.read_text().strip() == str(pwd.getpwnam("nobody").pw_uid)
        s.wait_log(delivered_line(qid, f"runit@{HOSTNAME}",
                                  f"delivered to command: /bin/sh -c 'id -u > {out}'"))
        out.unlink()
        # allow_mail_to_commands = forward: the same alias bounces, nothing runs.
        s2 = site({"allow_mail_to_commands": "forward"},
                  aliases=f'runit: "|/bin/sh -c \'id -u > {out}\'"\n')
        qid = queued_id(s2.smtp([f"runit@{HOSTNAME}"]))
        s2.wait_log(rf"postfix/local\[\d+\]: {qid}: to=<runit@mx\.example\.test>, relay=local, .*"
                    r"dsn=5\.7\.1, status=bounced \(mail to command is restricted\)")
        assert not out.exists()
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)


# ------------------------------------------------------------------ .forward

def test_forward_command_runs_as_the_user(site, e2e_users):
    pw = e2e_users["pwe3"]
    home = Path(pw.pw_dir)
    fwd = home / ".forward"
    fwd.write_text(f'"|/bin/sh -c \'id -u > {home}/uid.txt\'"\n')
    os.chown(fwd, pw.pw_uid, pw.pw_gid)
    os.chmod(fwd, 0o644)
    s = site()
    qid = queued_id(s.smtp([f"pwe3@{HOSTNAME}"]))
    uid_file = home / "uid.txt"
    wait_for(lambda: uid_file.exists() and uid_file.read_text().strip(), TIMEOUT,
             what="the .forward command's output")
    assert uid_file.read_text().strip() == str(pw.pw_uid)
    assert os.stat(uid_file).st_uid == pw.pw_uid
    s.wait_log(delivered_line(qid, f"pwe3@{HOSTNAME}",
                              f"delivered to command: /bin/sh -c 'id -u > {home}/uid.txt'"))
