"""pickup: maildrop files into the queue through cleanup; corrupt files aside; the service loop."""

from __future__ import annotations

import os
import signal
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import harness  # noqa: E402

from postwell.config import load_config  # noqa: E402
from postwell.log import NullLog  # noqa: E402
from postwell.pickup import MaildropEnvelope, MaildropWriter, Pickup, pickup_once, prepare_public  # noqa: E402
from postwell.pickup import maildrop as md  # noqa: E402
from postwell.pickup import service as svc  # noqa: E402
from postwell.queue import QueueStore  # noqa: E402


def pickup_root(tmp_path, name: str, main_cf: str, **files: str):
    """An instance directory with etc/ (main.cf after the queue and log lines, with
    "{etc}" standing for etc/'s path; other files by name) and a queue with public/."""
    root = harness.instance_root(tmp_path, name)
    etc = root / "etc"
    etc.mkdir()
    q = root / "queue"
    for fname, text in files.items():
        (etc / fname).write_text(text)
    (etc / "main.cf").write_text(f"queue_directory = {q}\nmaillog_file = {root / 'maillog'}\n"
                                 + main_cf.replace("{etc}", str(etc)))
    QueueStore(str(q)).ensure_layout()
    prepare_public(str(q))
    return root


@pytest.fixture
def inst(tmp_path):
    return pickup_root(tmp_path, "pickup",
                       "myhostname = mx.example.com\nmydomain = example.com\nmyorigin = example.com\n"
                       "message_size_limit = 100000\n")


def cfg(inst):
    return load_config(str(inst / "etc"))


def drop(inst, content: bytes, mtime: float | None = None, **env_kw) -> str:
    """A maildrop file from alice to bob@example.org unless env_kw says otherwise."""
    env_kw.setdefault("sender", "alice")
    env_kw.setdefault("recipients", ["bob@example.org"])
    w = MaildropWriter(str(inst / "queue" / "maildrop"))
    w.open()
    w.write(content)
    name = w.finish(MaildropEnvelope(**env_kw))
    if mtime is not None:
        os.utime(inst / "queue" / "maildrop" / name, (mtime, mtime))
    return name


def raw_drop(inst, name: str, data: bytes) -> None:
    with open(inst / "queue" / "maildrop" / name, "wb") as f:
        f.write(data)


def queued(inst):
    store = QueueStore(str(inst / "queue"))
    out = []
    for qid in store.scan("incoming"):
        with store.open(qid) as qm:
            out.append((qid, qm.sender, [(r.address, r.orig, r.notify) for r in qm.recipients],
                        dict(qm.attributes), dict(qm.params), qm.read_content()))
    return out


GOOD = b"Subject: hello\n\nbody line\n"


# --------------------------------------------------------------------------- format

def test_format_round_trip_and_escapes(inst):
    name = drop(inst, GOOD, sender="we%ird\nname", recipients=["a@x", "b c@y"], fullname="Ann\tB",
                notify="SUCCESS,FAILURE", ret="HDRS", envid="id1", body="8BITMIME", submit_time=12.5)
    path = inst / "queue" / "maildrop" / name
    data = path.read_bytes()
    assert data.startswith(md.MAGIC + b"size 00000000000000000026\n" + GOOD)
    assert b"sender we%25ird%0Aname\n" in data and data.endswith(b"rcpt b c@y\nend\n")
    fd = os.open(path, os.O_RDONLY)
    try:
        f = md.read_maildrop(fd, os.fstat(fd).st_size)
        assert b"".join(f.iter_content()) == GOOD
    finally:
        os.close(fd)
    e = f.envelope
    assert (e.sender, e.recipients, e.fullname, e.notify, e.ret, e.envid, e.body, e.submit_time) == \
        ("we%ird\nname", ["a@x", "b c@y"], "Ann\tB", "SUCCESS,FAILURE", "HDRS", "id1", "8BITMIME", 12.5)


@pytest.mark.parametrize("tail,reason", [
    (b"time 1\nsender a\nrcpt b\n", "missing end line"),
    (b"time 1\nrcpt b\nend\n", "no sender line"),
    (b"time 1\nsender a\nsender b\nrcpt b\nend\n", "duplicate sender line"),
    (b"time 1\nsender a\nbogus x\nend\n", "unknown envelope line"),
    (b"time 1\nsender a%zz\nend\n", "bad escape"),
    (b"time 1\nsender a\nnotify SOMETIMES\nend\n", "bad notify value"),
    (b"time x\nsender a\nend\n", "bad time value"),
    (b"time 1\nsender a\rb\nend\n", "unescaped control character"),
    (b"time 1\nsender a\nrcpt-notify NEVER\nrcpt b\nend\n", "misplaced rcpt-notify"),
    (b"time 1\nsender a\nrcpt b\nrcpt-orcpt x\nrcpt-orcpt y\nend\n", "misplaced rcpt-orcpt"),
    (b"time 1\nsender a\nrcpt b\nrcpt-notify SOON\nend\n", "bad notify value"),
])
def test_format_rejects(tail, reason):
    with pytest.raises(md.MaildropFormatError) as e:
        md.parse_envelope(tail)
    assert reason in e.value.reason


# --------------------------------------------------------------------------- pickup_once

def test_pickup_once_queues_message(inst):
    name = drop(inst, GOOD, recipients=["bob@example.org", "carol"], notify="NEVER", ret="FULL",
                envid="E1", submit_time=time.time())
    log = NullLog()
    assert pickup_once(cfg(inst), log) == 1
    assert os.listdir(inst / "queue" / "maildrop") == []
    [(qid, sender, rcpts, attrs, params, content)] = queued(inst)
    assert sender == "alice@example.com"
    assert rcpts == [("bob@example.org", "bob@example.org", "NEVER"), ("carol@example.com", "carol", "NEVER")]
    assert attrs["rewrite_context"] == "local" and attrs["log_ident"] == qid
    assert params == {"ret": "FULL", "envid": "E1"}
    lines = content.split(b"\n")
    assert lines[0] == f"Received: by mx.example.com (postwell, from userid {os.getuid()})".encode()
    assert lines[1].startswith(f"\tid {qid}; ".encode())
    assert b"Subject: hello\n" in content and content.endswith(b"\n\nbody line\n")
    assert b"\nFrom: alice@example.com\n" in content   # cleanup's missing From:, no full name
    assert log.lines[0] == f"{qid}: uid={os.getuid()} from=<alice>"
    assert f"{qid}: message-id=<" in log.lines[1]
    assert name not in os.listdir(inst / "queue" / "maildrop")


def test_full_name_from_header(inst):
    drop(inst, GOOD, fullname="Alice Q. Smith")
    drop(inst, b"From: other@x.org\nSubject: s\n\nb\n", fullname="Alice")
    drop(inst, b"Subject: headers only\n", fullname="Plain Name")
    drop(inst, b"Resent-To: r@x\nFrom: f@x\n\nb\n", fullname="Re Sender")
    assert pickup_once(cfg(inst), NullLog()) == 4
    contents = sorted((c for *_, c in queued(inst)), key=len)
    joined = b"\n====\n".join(contents)
    assert b'From: "Alice Q. Smith" <alice@example.com>\n' in joined
    assert b"From: other@x.org\n" in joined and b"From: Alice <" not in joined
    # Postfix 3.7 adds the full-name From: where cleanup adds a missing one: after
    # Message-Id and Date (it used to come right after the message's own headers).
    only = next(c for c in contents if b"headers only" in c)
    assert only.split(b"Subject: headers only\n")[1].split(b"\n")[2] == b"From: Plain Name <alice@example.com>"
    assert only.split(b"Subject: headers only\n")[1].startswith(b"Message-Id: <")
    assert b"Resent-From: Re Sender <alice@example.com>\n" in joined


def test_corrupt_file_moved_aside_and_pickup_continues(inst):
    bad = "0" * 32
    raw_drop(inst, bad, md.MAGIC + b"size 00000000000000000005\nabcdetime 1\nsender a\n")   # no end
    good = drop(inst, GOOD)
    raw_drop(inst, "not-a-maildrop-name", b"junk")
    log = NullLog()
    assert pickup_once(cfg(inst), log) == 1
    corrupt = sorted(os.listdir(inst / "queue" / "corrupt"))
    assert corrupt == ["maildrop." + bad, "maildrop.not-a-maildrop-name"]
    assert os.listdir(inst / "queue" / "maildrop") == []
    assert len(queued(inst)) == 1 and good
    assert any("maildrop/" + bad in line and "missing end line" in line and "moved to corrupt/" in line
               for line in log.lines)
    # The queue's own scanners never mistake these for queue files.
    assert QueueStore(str(inst / "queue")).scan("corrupt") == []


@pytest.mark.parametrize("variant", ["size_mismatch", "bad_magic", "hardlink", "symlink", "no_rcpt", "fifo"])
def test_unsafe_or_malformed_files(inst, variant):
    d = inst / "queue" / "maildrop"
    name = "a" * 32
    if variant == "size_mismatch":
        raw_drop(inst, name, md.MAGIC + b"size 00000000000000099999\nabc" + b"time 1\nsender a\nrcpt b\nend\n")
    elif variant == "bad_magic":
        raw_drop(inst, name, b"POSTWELL-MAILDROP 9\n")
    elif variant == "hardlink":
        good = drop(inst, GOOD)
        os.link(d / good, inst / "queue" / "extra-link")
        name = good
    elif variant == "symlink":
        os.symlink("/etc/passwd", d / name)
    elif variant == "no_rcpt":
        name = drop(inst, GOOD, recipients=[])
    elif variant == "fifo":
        os.mkfifo(d / name)
    log = NullLog()
    assert pickup_once(cfg(inst), log) == 0
    assert os.listdir(d) == []
    assert os.listdir(inst / "queue" / "corrupt") == ["maildrop." + name]
    assert queued(inst) == []
    assert log.lines and "moved to corrupt/" in log.lines[-1]


def test_size_limit_enforced_by_pickup(inst):
    # Bigger than message_size_limit before cleanup (the limit was lowered after the
    # drop): as Postfix 3.7, cleanup refuses it and the sender gets a notice; the
    # file is not moved to corrupt/.
    drop(inst, b"Subject: big\n\n" + b"x" * 100001 + b"\n")
    log = NullLog()
    assert pickup_once(cfg(inst), log) == 0
    [(_qid, sender, rcpts, _a, _p, content)] = queued(inst)
    assert sender == "" and [r[0] for r in rcpts] == ["alice@example.com"]
    assert b"<bob@example.org>: message file too big" in content and b"xxxx" not in content
    assert os.listdir(inst / "queue" / "corrupt") == [] and os.listdir(inst / "queue" / "maildrop") == []
    assert any(ln.endswith("dsn=5.3.4, status=bounced (message file too big)") for ln in log.lines)


def test_temporary_files_ignored_then_purged(inst):
    d = inst / "queue" / "maildrop"
    (d / ".tmp.0123").write_bytes(b"partial")
    other = d / ".hidden"
    other.write_bytes(b"x")
    now = [time.time()]
    p = Pickup(cfg(inst), NullLog(), clock=lambda: now[0])
    assert p.run_once() == 0
    assert sorted(os.listdir(d)) == [".hidden", ".tmp.0123"]
    now[0] += 2 * 86400
    p.run_once()
    assert os.listdir(d) == [".hidden"]


def test_soft_cleanup_error_keeps_file(inst, monkeypatch):
    from postwell.cleanup.service import REPLY_WRITE_ERROR, CleanupSession
    name = drop(inst, GOOD)
    real = CleanupSession.finish_sync

    def failing(self):
        self.abort()
        return REPLY_WRITE_ERROR

    monkeypatch.setattr(CleanupSession, "finish_sync", failing)
    log = NullLog()
    assert pickup_once(cfg(inst), log) == 0
    assert os.listdir(inst / "queue" / "maildrop") == [name]
    assert "will try again later" in log.lines[-1]
    monkeypatch.setattr(CleanupSession, "finish_sync", real)
    assert pickup_once(cfg(inst), NullLog()) == 1
    assert os.listdir(inst / "queue" / "maildrop") == []


def test_bs_submission_attributes(inst):
    drop(inst, b"Received: from c (localhost [127.0.0.1])\n\tby mx; date\nSubject: s\n\nb\n",
         sender="u@example.org", protocol="ESMTP", helo="client.example",
         recipients=["a@example.org", "b@example.org"], rcpt_notify={1: "DELAY"},
         rcpt_orcpt={1: "rfc822;B@example.org"})
    assert pickup_once(cfg(inst), NullLog()) == 1
    [(_, _, rcpts, attrs, _, _)] = queued(inst)
    assert rcpts == [("a@example.org", "a@example.org", None), ("b@example.org", "b@example.org", "DELAY")]
    store = QueueStore(str(inst / "queue"))
    with store.open(store.scan("incoming")[0]) as qm:
        # Postfix's stand-alone smtpd records "rfc822;" + the address as typed when
        # the client gave no ORCPT (the maildrop file implies it).
        assert [r.orcpt for r in qm.recipients] == ["rfc822;a@example.org", "rfc822;B@example.org"]
    assert attrs["protocol_name"] == "ESMTP" and attrs["helo_name"] == "client.example"
    assert attrs["client_address"] == "127.0.0.1"


def test_prepare_public_modes(inst):
    q = inst / "queue"
    os.chmod(q / "maildrop", 0o700)
    os.chmod(q / "public", 0o710)
    os.unlink(q / "public" / "pickup")
    fifo = prepare_public(str(q))
    import stat as st
    assert st.S_IMODE(os.stat(q / "maildrop").st_mode) == 0o1733
    assert st.S_IMODE(os.stat(q / "public").st_mode) & 0o711 == 0o711
    assert st.S_ISFIFO(os.stat(fifo).st_mode) and st.S_IMODE(os.stat(fifo).st_mode) == 0o622


# --------------------------------------------------------------------------- the service

def test_serve_picks_up_on_poke_and_stops_on_sigterm(inst):
    import postwell.cleanup.service  # noqa: F401  (loaded before fork)
    first = drop(inst, GOOD)
    assert first
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            svc.serve(cfg(inst), log=NullLog(), wakeup=3600)
            code = 0
        finally:
            os._exit(code)
    try:
        # The scan at start queues the first message.
        harness.wait_for(lambda: len(queued(inst)) == 1, 10, what="scan at start")
        # A later message is picked up on the FIFO poke, long before the hour-long wakeup.
        drop(inst, GOOD, sender="second")
        md.poke_pickup(str(inst / "queue"))
        harness.wait_for(lambda: len(queued(inst)) == 2, 10, what="pickup after poke")
        assert os.listdir(inst / "queue" / "maildrop") == []
        os.kill(pid, signal.SIGTERM)
        status = {}

        def exited():
            p, s = os.waitpid(pid, os.WNOHANG)
            if p == pid:
                status["s"] = s
                return True
            return False

        harness.wait_for(exited, 10, what="pickup exit")
        assert os.waitstatus_to_exitcode(status["s"]) == 0
        pid = None
    finally:
        if pid:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


def test_obsolete_header_from_format(inst):
    with open(inst / "etc" / "main.cf", "a") as f:
        f.write("header_from_format = obsolete\n")
    drop(inst, GOOD, fullname="Ann (the) Admin")
    assert pickup_once(cfg(inst), NullLog()) == 1
    [(*_, content)] = queued(inst)
    assert b"From: alice@example.com (Ann \\(the\\) Admin)\n" in content


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch users")
def test_prepare_public_replaces_foreign_fifo(inst):
    import pwd
    from test_sendmail import submit_user
    user = submit_user()
    pw = pwd.getpwnam(user)
    q = inst / "queue"
    for sub in ("public", "maildrop"):
        os.chown(q / sub, pw.pw_uid, pw.pw_gid)
    os.chmod(q / "maildrop", 0o700)
    assert os.stat(q / "public" / "pickup").st_uid == 0
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setgroups([])
            os.setgid(pw.pw_gid)
            os.setuid(pw.pw_uid)
            fifo = prepare_public(str(q))
            fd = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)   # what serve() does
            os.close(fd)
            code = 0
        finally:
            os._exit(code)
    _, st = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(st) == 0
    assert os.stat(q / "public" / "pickup").st_uid == pw.pw_uid
    assert os.stat(q / "maildrop").st_mode & 0o7777 == 0o1733
