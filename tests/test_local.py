"""local(8) delivery agent: real system users, real queue files.

The users (pwtl*) are created with useradd for the module and removed with
userdel -r afterwards; tests that need them are skipped when not root.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import stat
import tempfile
import time
from pathlib import Path

import pytest

from postwell.cleanup import Cleanup
from postwell.config.main import Config
from postwell.delivery.base import DeliveryRequest, Recipient
from postwell.delivery.local import LocalAgent, expand_template, split_tokens
from postwell.log import NullLog
from postwell.queue import QueueStore
from postwell.tables.aliases import build_aliases

HOST = "mx.example.test"
USERS = ("pwtl1", "pwtl2", "pwtl3")
MSG = b"From: a@remote.test\nSubject: hello\n\nline one\nFrom the start\nlast\n"

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create users")


# ------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def users():
    if os.geteuid() != 0 or not shutil.which("useradd"):
        pytest.skip("needs root and useradd")
    import harness
    # Fixed user names: another test run on this machine must not delete them
    # underneath us.
    with harness.real_users(USERS, "users-pwtl", "pwt-homes-") as made:
        yield made


class Env:
    def __init__(self, root: Path, users, params=None, aliases=""):
        self.root = root
        self.users = users
        self.spool = root / "spool"
        self.spool.mkdir()
        os.chown(self.spool, 0, 8)          # Debian's /var/mail: root:mail 2775
        os.chmod(self.spool, 0o2775)
        self.queue = root / "queue"
        self.alias_file = root / "aliases"
        self.alias_file.write_text(aliases)
        build_aliases("hash", str(self.alias_file))
        p = {"myhostname": HOST, "mydomain": "example.test", "mydestination": f"{HOST}, localhost",
             "alias_maps": f"hash:{self.alias_file}", "mail_spool_directory": str(self.spool),
             "queue_directory": str(self.queue), "recipient_delimiter": "+",
             "message_size_limit": "10240000"}
        p.update(params or {})
        self.cfg = Config(str(root), p, {}, [])
        self.store = QueueStore(str(self.queue))
        self.store.ensure_layout()
        self.log = NullLog("local")
        self.agent = LocalAgent(self.cfg, self.log, store=self.store, helper_socket="")

    def queue_message(self, rcpts, content=MSG, sender="sender@remote.test"):
        cleanup = Cleanup(self.cfg, self.store, NullLog("cleanup"))
        cs = cleanup.open(rewrite_local=False)
        cs.set_sender(sender)
        for r in rcpts:
            cs.add_recipient(r)
        cs.write(content)
        reply = asyncio.run(cs.finish())
        assert reply.code == 250
        return cs.queue_id

    def deliver(self, rcpts, content=MSG, sender="sender@remote.test", origs=None):
        qid = self.queue_message(rcpts, content, sender)
        qm = self.store.open(qid)
        try:
            recipients = [Recipient(r, orig=(origs or {}).get(r)) for r in rcpts]
            req = DeliveryRequest(queue_id=qid, sender=qm.sender, recipients=recipients,
                                  transport="local", nexthop=HOST, arrival_time=qm.arrival_time,
                                  open_content=lambda: qm.iter_content(),
                                  content_size=qm.content_size)
            return asyncio.run(asyncio.wait_for(self.agent.deliver(req), 60))
        finally:
            qm.close()

    def mbox(self, user) -> bytes:
        return (self.spool / user).read_bytes()

    def new_queue_files(self, exclude=()):
        return [q for q in self.store.scan("incoming") if q not in exclude]


@pytest.fixture
def env_factory(users, tmp_path_factory):
    made = []

    def make(params=None, aliases=""):
        root = Path(tempfile.mkdtemp(prefix="pwt-local-"))
        os.chmod(root, 0o755)
        made.append(root)
        return Env(root, users, params, aliases)
    yield make
    for r in made:
        shutil.rmtree(r, ignore_errors=True)


def home(users, name) -> Path:
    return Path(users[name].pw_dir)


def clean_home(users, name):
    h = home(users, name)
    for p in list(h.iterdir()):
        if p.name.startswith(".forward") or p.name in ("Maildir", "out", "uid.txt", "mbox"):
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()


def write_forward(users, name, text, mode=0o644, fname=".forward"):
    p = home(users, name) / fname
    p.write_text(text)
    os.chown(p, users[name].pw_uid, users[name].pw_gid)
    os.chmod(p, mode)
    return p


# ------------------------------------------------------------------ pure parts

def test_split_tokens():
    assert split_tokens('a, "b c"@x, |/usr/bin/foo -x, "|/bin/sh -c \'echo hi\'", /tmp/f, '
                        ':include:/tmp/inc, Name <n@x.test>, \\me') == [
        "a", '"b c"@x', "|/usr/bin/foo -x", "|/bin/sh -c 'echo hi'", "/tmp/f", ":include:/tmp/inc",
        "n@x.test", "\\me"]


def test_expand_template_conditionals():
    attrs = {"home": "/h/u", "extension": None, "recipient_delimiter": "+", "user": "u"}
    text, undef, _ = expand_template("$home/.forward${recipient_delimiter}${extension}", attrs, "abc")
    assert undef
    text, undef, used = expand_template("$home/.forward", attrs, "/.abcdefghijklmnopqrstuvwxyz")
    assert (text, undef) == ("/h/u/.forward", False)
    text, undef, _ = expand_template("${extension?x}${extension:y}${home?{a}:{b}}", attrs, "")
    assert (text, undef) == ("ya", False)
    # unsafe characters in values become "_"
    text, _, _ = expand_template("$user", {"user": "a;b"}, "ab")
    assert text == "a_b"


# ------------------------------------------------------------------ mailbox

@needs_root
def test_mbox_delivery_ownership_and_format(env_factory, users):
    env = env_factory()
    [res] = env.deliver([f"pwtl1@{HOST}"])
    assert (res.status, res.dsn, res.reason, res.relay) == ("sent", "2.0.0", "delivered to mailbox", "local")
    path = env.spool / "pwtl1"
    st = os.stat(path)
    assert st.st_uid == users["pwtl1"].pw_uid
    assert stat.S_IMODE(st.st_mode) == 0o600
    data = path.read_bytes()
    first, rest = data.split(b"\n", 1)
    assert first.startswith(b"From sender@remote.test  ")
    assert rest.startswith(b"Return-Path: <sender@remote.test>\nX-Original-To: pwtl1@mx.example.test\n"
                           b"Delivered-To: pwtl1@mx.example.test\n")
    assert b"\n>From the start\n" in data
    assert data.endswith(b"last\n\n")
    assert not (env.spool / "pwtl1.lock").exists()
    # a second message is appended after the first
    env.deliver([f"pwtl1@{HOST}"])
    assert path.read_bytes().count(b"\nFrom sender@remote.test  ") == 1
    assert path.read_bytes().startswith(data)


@needs_root
def test_maildir_home_mailbox(env_factory, users):
    clean_home(users, "pwtl2")
    env = env_factory({"home_mailbox": "Maildir/"})
    [res] = env.deliver([f"PwTl2@{HOST}"])
    assert (res.status, res.reason) == ("sent", "delivered to maildir")
    md = home(users, "pwtl2") / "Maildir"
    [name] = os.listdir(md / "new")
    f = md / "new" / name
    st = os.stat(f)
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (users["pwtl2"].pw_uid, 0o600)
    assert os.stat(md).st_uid == users["pwtl2"].pw_uid
    data = f.read_bytes()
    # both as given: Postfix 3.7 does not fold Delivered-To either
    assert b"X-Original-To: PwTl2@mx.example.test\nDelivered-To: PwTl2@mx.example.test\n" in data
    assert b"\nFrom the start\n" in data


@needs_root
def test_unknown_user_bounces(env_factory):
    env = env_factory()
    [res] = env.deliver([f"nosuchpwt@{HOST}"])
    assert (res.status, res.dsn, res.reason) == ("bounced", "5.1.1", 'unknown user: "nosuchpwt"')


@needs_root
def test_recipient_delimiter_extension(env_factory, users):
    env = env_factory()
    [res] = env.deliver([f"pwtl1+Folder@{HOST}"])
    assert (res.status, res.reason) == ("sent", "delivered to mailbox")
    assert b"Delivered-To: pwtl1+Folder@mx.example.test\n" in env.mbox("pwtl1")


@needs_root
def test_mailbox_size_limit_bounces_and_truncates(env_factory, users):
    env = env_factory({"mailbox_size_limit": "2000", "message_size_limit": "1500"})
    env.deliver([f"pwtl1@{HOST}"])
    before = env.mbox("pwtl1")
    big = b"Subject: big\n\n" + b"x" * 900 + b"\n" + b"y" * 60 + b"\n"
    [res] = env.deliver([f"pwtl1@{HOST}"], content=big)
    assert res.status == "sent"
    before = env.mbox("pwtl1")
    [res] = env.deliver([f"pwtl1@{HOST}"], content=big)
    assert (res.status, res.dsn) == ("bounced", "5.2.2")
    assert res.reason == (f"cannot update mailbox {env.spool}/pwtl1 for user pwtl1. "
                          "error writing message: File too large")
    data = env.mbox("pwtl1")
    assert data.startswith(before)
    assert len(data) <= 2000 and data.endswith(b"\n\n")   # no partial message left


def test_size_limit_smaller_than_message_limit_refused(tmp_path):
    cfg = Config(str(tmp_path), {"mailbox_size_limit": "100", "message_size_limit": "1000"}, {}, [])
    with pytest.raises(ValueError, match="mailbox_size_limit is smaller than message_size_limit"):
        LocalAgent(cfg)


@needs_root
def test_delivered_to_loop_bounces(env_factory):
    env = env_factory()
    content = b"Delivered-To: PWTL1@mx.example.test\nSubject: loop\n\nbody\n"
    [res] = env.deliver([f"pwtl1@{HOST}"], content=content)
    assert (res.status, res.dsn, res.reason) == (
        "bounced", "5.4.6", "mail forwarding loop for pwtl1@mx.example.test")
    assert not (env.spool / "pwtl1").exists()


@needs_root
def test_mailbox_command_runs_as_user_with_env(env_factory, users):
    clean_home(users, "pwtl1")
    out = home(users, "pwtl1") / "out"
    env = env_factory({"mailbox_command": f"/bin/sh -c 'id -u > {out}; env >> {out}; cat >> {out}'"})
    [res] = env.deliver([f"pwtl1+ext@{HOST}"], sender="we$ird;sender@remote.test")
    assert res.status == "sent", res.reason
    assert res.reason.startswith("delivered to command: /bin/sh -c")
    text = out.read_text()
    lines = text.splitlines()
    assert lines[0] == str(users["pwtl1"].pw_uid)
    assert "USER=pwtl1" in lines and "LOGNAME=pwtl1" in lines
    assert "EXTENSION=ext" in lines and "DOMAIN=mx.example.test" in lines
    assert "RECIPIENT=pwtl1+ext@mx.example.test" in lines
    assert "SENDER=we_ird_sender@remote.test" in lines     # envelope data filtered
    assert f"HOME={users['pwtl1'].pw_dir}" in lines
    assert "From we$ird;sender@remote.test  " in text and "\nFrom the start\n" in text


@needs_root
def test_mailbox_command_exit_codes(env_factory):
    env = env_factory({"mailbox_command": "/bin/sh -c 'echo oops; exit 75'"})
    [res] = env.deliver([f"pwtl1@{HOST}"])
    assert (res.status, res.dsn, res.reason) == ("deferred", "4.3.0",
                                                 "temporary failure. Command output: oops ")
    env = env_factory({"mailbox_command": "/bin/sh -c 'exit 67'"})
    [res] = env.deliver([f"pwtl1@{HOST}"])
    assert (res.status, res.dsn, res.reason) == ("bounced", "5.1.1", "user unknown")
    env = env_factory({"mailbox_command": "/bin/false"})
    [res] = env.deliver([f"pwtl1@{HOST}"])
    assert (res.status, res.dsn, res.reason) == ("bounced", "5.3.0",
                                                 'Command died with status 1: "/bin/false"')


@needs_root
def test_stale_dotlock_is_removed(env_factory, users):
    env = env_factory()
    lock = env.spool / "pwtl1.lock"
    lock.write_text("")
    old = time.time() - 3600
    os.utime(lock, (old, old))
    [res] = env.deliver([f"pwtl1@{HOST}"])
    assert res.status == "sent", res.reason
    assert not lock.exists()


@needs_root
def test_missing_home_directory_defers(env_factory, users):
    h = home(users, "pwtl3")
    moved = h.with_name("pwtl3.away")
    os.rename(h, moved)
    try:
        env = env_factory()
        [res] = env.deliver([f"pwtl3@{HOST}"])
        assert (res.status, res.dsn, res.reason) == (
            "deferred", "4.3.0", f"cannot access home directory {h}: No such file or directory")
    finally:
        os.rename(moved, h)


@needs_root
def test_root_mailbox_and_root_mailbox_command(env_factory, users):
    env = env_factory()
    [res] = env.deliver([f"root@{HOST}"])
    assert res.reason == "delivered to mailbox"
    st = os.stat(env.spool / "root")
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o600)
    out = env.root / "rootcmd"
    os.chmod(env.root, 0o777)
    try:
        env2 = env_factory({"mailbox_command": f"/bin/sh -c 'id -u > {out}'"})
        os.chmod(env2.root, 0o755)
        [res] = env2.deliver([f"root@{HOST}"])
        assert res.status == "sent", res.reason
        # local(8): a command for root runs with default_privs
        assert out.read_text().strip() == str(pwd.getpwnam("nobody").pw_uid)
    finally:
        os.chmod(env.root, 0o755)


@needs_root
def test_alias_database_owner_rights(env_factory, users):
    out = home(users, "pwtl2") / "out"
    env = env_factory(aliases=f'own: "|/bin/sh -c \'id -u > {out}\'"\n')
    for f in (env.alias_file, Path(str(env.alias_file) + ".db")):
        os.chown(f, users["pwtl2"].pw_uid, users["pwtl2"].pw_gid)
    env.agent._aliases = None
    [res] = env.deliver([f"own@{HOST}"])
    assert res.status == "sent", res.reason
    # an alias database owned by a user runs its commands as that user
    assert out.read_text().strip() == str(users["pwtl2"].pw_uid)
    clean_home(users, "pwtl2")


@needs_root
def test_propagate_unmatched_extension_to_alias(env_factory, users):
    env = env_factory({"propagate_unmatched_extensions": "canonical, virtual, alias"},
                      aliases="sales: far@remote.test\n")
    [res] = env.deliver([f"sales+eu@{HOST}"])
    new_id = res.reason.split()[-1]
    qm = env.store.open(new_id)
    try:
        assert [r.address for r in qm.recipients] == ["far+eu@remote.test"]
    finally:
        qm.close()
