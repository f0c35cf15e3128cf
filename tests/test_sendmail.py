"""sendmail(1): flags, input handling, maildrop writing, -bs, -bi, -bp, -q, -bv."""

from __future__ import annotations

import os
import pwd
import select
import stat
import sys
import tempfile

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import harness  # noqa: E402

from postwell.cli import sendmail as sm  # noqa: E402
from postwell.config import load_config  # noqa: E402
from postwell.log import NullLog  # noqa: E402
from postwell.pickup import maildrop as md  # noqa: E402
from postwell.pickup import pickup_once, prepare_public  # noqa: E402
from postwell.queue import QueueStore  # noqa: E402

SUBMIT_USER = "postwellsubmit"


# --------------------------------------------------------------------------- helpers

@pytest.fixture
def inst(tmp_path):
    """A config directory and a queue directory with the maildrop in place."""
    root = harness.instance_root(tmp_path, "sendmail")
    os.chmod(root, 0o755)
    etc = root / "etc"
    etc.mkdir()
    q = root / "queue"
    (etc / "main.cf").write_text(
        f"queue_directory = {q}\nmaillog_file = {root / 'maillog'}\n"
        "myhostname = mx.example.com\nmydomain = example.com\nmyorigin = example.com\n"
        "mydestination = $myhostname, localhost\n")
    os.chmod(etc, 0o755)
    store = QueueStore(str(q))
    store.ensure_layout()
    prepare_public(str(q))
    return root


def maildrop_names(root) -> list[str]:
    return sorted(os.listdir(root / "queue" / "maildrop"))


def read_drop(root, name):
    path = root / "queue" / "maildrop" / name
    fd = os.open(path, os.O_RDONLY)
    try:
        f = md.read_maildrop(fd, os.fstat(fd).st_size)
        content = b"".join(f.iter_content())
        return f.envelope, content
    finally:
        os.close(fd)


def _preload():
    # After setuid the child may not be able to read modules under /root: import first.
    import ctypes  # noqa: F401
    import postwell.cleanup.addresses  # noqa: F401
    import postwell.cli.postqueue  # noqa: F401
    import postwell.cli.postfix  # noqa: F401
    import postwell.policy  # noqa: F401
    import postwell.smtp.server  # noqa: F401
    import postwell.tables  # noqa: F401
    import postwell.tables.aliases  # noqa: F401
    import postwell.cleanup.service  # noqa: F401


def run(args, stdin=b"", **kw):
    """Run sendmail's main() in a forked child (optionally as ``user``) with the
    given stdin; returns (exit status, stdout, stderr)."""
    _preload()
    with tempfile.TemporaryFile() as fin, tempfile.TemporaryFile() as fout, tempfile.TemporaryFile() as ferr:
        fin.write(stdin)
        fin.flush()
        fin.seek(0)
        user = kw.get("user")
        env = kw.get("env")
        pid = os.fork()
        if pid == 0:
            try:
                if kw.get("stdin_dir"):
                    dfd = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
                    os.dup2(dfd, 0)
                else:
                    os.dup2(fin.fileno(), 0)
                os.dup2(fout.fileno(), 1)
                os.dup2(ferr.fileno(), 2)
                # pytest replaced sys.stdout/err: talk to the real descriptors.
                sys.stdout = open(1, "w", closefd=False)
                sys.stderr = open(2, "w", closefd=False)
                if env:
                    os.environ.update(env)
                if user is not None:
                    pw = pwd.getpwnam(user)
                    os.setgroups([])
                    os.setgid(pw.pw_gid)
                    os.setuid(pw.pw_uid)
                rc = sm.main(list(args), prog=kw.get("prog", "sendmail"))
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(rc)
            except BaseException as exc:  # noqa: BLE001
                os.write(2, f"child crashed: {exc!r}\n".encode())
                os._exit(99)
        status = {}

        def done():
            p, st = os.waitpid(pid, os.WNOHANG)
            if p == pid:
                status["st"] = st
                return True
            return False

        harness.wait_for(done, kw.get("timeout", 30.0), what="sendmail child")
        fout.seek(0)
        ferr.seek(0)
        return os.waitstatus_to_exitcode(status["st"]), fout.read(), ferr.read()


def submit_user() -> str:
    try:
        pwd.getpwnam(SUBMIT_USER)
    except KeyError:
        if os.geteuid() != 0:
            pytest.skip("needs root to create the test submitter")
        import subprocess
        subprocess.run(["useradd", "-r", "-M", "-s", "/usr/sbin/nologin", SUBMIT_USER],
                       check=False, capture_output=True, timeout=30)
        pwd.getpwnam(SUBMIT_USER)
    return SUBMIT_USER


# --------------------------------------------------------------------------- flag parsing

def test_parse_defaults_and_common_flags():
    o = sm.parse_args(["-t", "-i", "-f", "me@x.org", "-F", "Full Name", "a@b", "c@d"])
    assert o.extract and not o.dot_ends and o.sender == "me@x.org" and o.full_name == "Full Name"
    assert o.mode == sm.MODE_ENQUEUE and o.recipients == ["a@b", "c@d"]
    o = sm.parse_args(["a@b"])
    assert o.dot_ends and not o.extract and o.sender is None and o.rewrite == "local"


def test_parse_clustered_and_attached_arguments():
    o = sm.parse_args(["-tif", "me", "-Fname", "-oi", "-oem", "-odb", "-G", "-U", "-L", "tag", "x"])
    assert o.extract and not o.dot_ends and o.sender == "me" and o.full_name == "name"
    assert o.rewrite == "remote" and o.recipients == ["x"]
    assert sm.parse_args(["-rold@x", "y"]).sender == "old@x"


def test_parse_options_stop_at_first_operand():
    o = sm.parse_args(["a@b", "-t"])
    assert not o.extract and o.recipients == ["a@b", "-t"]
    o = sm.parse_args(["--", "-odd"])
    assert o.recipients == ["-odd"]


def test_parse_dsn_options():
    o = sm.parse_args(["-N", "success,delay", "-R", "hdrs", "-V", "env-1", "-B", "8BITMIME"])
    assert (o.notify, o.ret, o.envid, o.body) == ("SUCCESS,DELAY", "HDRS", "env-1", "8BITMIME")
    assert sm.parse_args(["-N", "never"]).notify == "NEVER"
    o = sm.parse_args(["-N", "sometimes", "-R", "most", "-V", "a\tb"])
    assert o.notify is None and o.ret is None and o.envid is None
    assert o.warnings == ['unknown DSN NOTIFY command value "sometimes" in "sometimes"',
                          "bad -N option value -- ignored", "bad -R option value -- ignored",
                          "bad syntax in -V option value -- ignored"]
    # Postfix 3.7's allprint(): a space is printable (its DSN showed
    # "Original-Envelope-Id: a b"), a tab is not.
    o = sm.parse_args(["-V", "a b"])
    assert o.envid == "a b" and o.warnings == []
    with pytest.raises(sm.Fatal) as e:
        sm.parse_args(["-B", "9BIT"])
    assert e.value.text == "-B option needs 8BITMIME or 7BIT" and e.value.status == 64


def test_parse_modes():
    assert sm.parse_args(["-bs"]).mode == sm.MODE_USER
    assert sm.parse_args(["-bp"]).mode == sm.MODE_MAILQ
    assert sm.parse_args(["-bi"]).mode == sm.MODE_NEWALIAS
    assert sm.parse_args(["-I"]).mode == sm.MODE_NEWALIAS
    assert sm.parse_args(["-bm", "x"]).mode == sm.MODE_ENQUEUE
    assert sm.parse_args(["-bd"]).mode == sm.MODE_DAEMON
    assert sm.parse_args(["-bh"]).mode == sm.MODE_IGNORE
    assert sm.parse_args(["-q"]).mode == sm.MODE_FLUSHQ
    assert sm.parse_args(["-q30m"]).qtime == "30m"
    assert sm.parse_args(["-qRexample.com"]).site_to_flush == "example.com"
    assert sm.parse_args(["-qIABCDEF"]).id_to_flush == "ABCDEF"
    assert sm.parse_args(["-bv", "x"]).verify
    assert sm.parse_args([], "mailq").mode == sm.MODE_MAILQ
    assert sm.parse_args([], "newaliases").mode == sm.MODE_NEWALIAS
    assert sm.parse_args(["-oA/etc/other"]).alias_database == "/etc/other"
    assert sm.parse_args(["-C", "/x/y/main.cf"]).config_dir == "/x/y"
    assert sm.parse_args(["-C", "/x/y"]).config_dir == "/x/y"


@pytest.mark.parametrize("args,text", [
    (["-n"], "-n option not supported"),
    (["-z"], "usage: sendmail [options]"),
    (["-f"], "usage: sendmail [options]"),
    (["-bz"], "unsupported: -bz"),
    (["-qZ"], "-qZ is not implemented"),
    (["-qR"], "specify: -qRsitename"),
    (["-t", "-bp"], "-t can be used only in delivery mode"),
    (["-bv", "-t"], "-t option cannot be used with -bv"),
    (["-bv", "-N", "never"], "-N option cannot be used with -bv"),
    (["-oA"], "-oA requires pathname"),
    (["-Xq"], "unsupported: -Xq"),
])
def test_parse_errors_are_postfix_words(args, text):
    with pytest.raises(sm.Fatal) as e:
        sm.parse_args(args)
    assert e.value.text == text and e.value.status == 64


def test_address_lists():
    assert sm.parse_address_list('Bob <bob@x.org>, carol, "Dan X" <dan@y.org> (c)') == \
        ["bob@x.org", "carol", "dan@y.org"]
    assert sm.parse_address_list("undisclosed-recipients:;") == []
    assert sm.parse_address_list('team: a@x, b@y;, c@z') == ["a@x", "b@y", "c@z"]
    assert sm.parse_address_list('"odd user"@x.org') == ["odd user@x.org"]


# --------------------------------------------------------------------------- message input

def _copy(data: bytes, **kw) -> tuple[bytes, int]:
    out = bytearray()
    with tempfile.TemporaryFile() as f:
        f.write(data)
        f.flush()
        f.seek(0)
        n = sm.copy_message(f.fileno(), out.extend, **kw)
    return bytes(out), n


def test_dot_ends_input_unless_i():
    data = b"Subject: a\r\n\r\nline\r\n.\r\nafter\r\n"
    assert _copy(data, dot_ends=True)[0] == b"Subject: a\n\nline\n"
    assert _copy(data, dot_ends=False)[0] == b"Subject: a\n\nline\n.\nafter\n"
    # A dot with other text is data; "..": data too (no SMTP transparency here).
    assert _copy(b"a\n.x\n..\n", dot_ends=True)[0] == b"a\n.x\n..\n"


def test_line_endings_from_lines_and_missing_final_newline():
    out, n = _copy(b"From someone Sun Nov 29\n>From x\nSubject: s\r\r\n\nbody\nlast", dot_ends=True)
    assert out == b"Subject: s\n\nbody\nlast\n" and n == len(out)
    # A "From " line after the first real line is content.
    assert _copy(b"A: b\nFrom x\n", dot_ends=True)[0] == b"A: b\nFrom x\n"


def test_binary_and_long_lines_stream_in_pieces():
    big = bytes(range(256)).replace(b"\n", b"") * 1000   # one 255000-byte line
    out, _ = _copy(b"X: y\n\n" + big + b"\r\n.\n", dot_ends=True)
    assert out == b"X: y\n\n" + big + b"\n"


def test_size_limit_raises():
    with pytest.raises(sm.TooBig):
        _copy(b"x" * 5000 + b"\n", dot_ends=True, size_limit=1000)


def test_header_recipient_extraction():
    h = sm.HeaderRecipients()
    data = (b"To: a@x.org,\n\tb@x.org\nCc: Carl <c@x.org>\nBcc: d@x.org\nSubject: To: e@x.org\n"
            b"\nTo: body@x.org\n")
    _copy(data, dot_ends=True, headers=h)
    assert h.finish() == ["a@x.org", "b@x.org", "c@x.org", "d@x.org"]


def test_header_extraction_prefers_resent_headers():
    h = sm.HeaderRecipients()
    _copy(b"To: a@x.org\nResent-To: r@x.org\nCc: c@x.org\nResent-Bcc: s@x.org\n\nbody\n",
          dot_ends=True, headers=h)
    assert h.finish() == ["r@x.org", "s@x.org"]


# --------------------------------------------------------------------------- enqueue

def test_enqueue_writes_maildrop_file(inst):
    cfg = str(inst / "etc")
    rc, out, err = run(["-C", cfg, "-f", "alice", "-F", "Alice Smith", "-N", "failure", "-R", "full",
                        "-V", "E1", "bob@example.org, Carl <carl@example.org>"],
                       b"Subject: hi\r\n\r\nbody\r\n.\r\nnot this\r\n")
    assert (rc, err) == (0, b"")
    names = maildrop_names(inst)
    assert len(names) == 1 and md.NAME_RE.match(names[0])
    st = os.stat(inst / "queue" / "maildrop" / names[0])
    assert stat.S_IMODE(st.st_mode) == 0o644 and st.st_uid == os.getuid()
    env, content = read_drop(inst, names[0])
    assert content == b"Subject: hi\n\nbody\n"
    assert env.sender == "alice" and env.recipients == ["bob@example.org", "carl@example.org"]
    assert (env.fullname, env.notify, env.ret, env.envid, env.rewrite) == \
        ("Alice Smith", "FAILURE", "FULL", "E1", "local")


def test_enqueue_t_adds_header_recipients_to_command_line(inst):
    rc, _, err = run(["-C", str(inst / "etc"), "-t", "-i", "cmd@example.org"],
                     b"To: a@example.org\nBcc: hidden@example.org\n\n.\nmore\n")
    assert rc == 0, err
    env, content = read_drop(inst, maildrop_names(inst)[0])
    assert env.recipients == ["cmd@example.org", "a@example.org", "hidden@example.org"]
    assert content.endswith(b"\n.\nmore\n")
    assert env.sender == pwd.getpwuid(os.getuid()).pw_name


def test_no_recipients_is_usage_error_and_leaves_nothing(inst):
    name = pwd.getpwuid(os.getuid()).pw_name
    rc, _, err = run(["-C", str(inst / "etc")], b"Subject: x\n\nbody\n")
    assert rc == 75
    assert err == (f"sendmail: fatal: {name}({os.getuid()}): Recipient addresses must be specified "
                   f"on the command line or via the -t option\n").encode()
    rc, _, err = run(["-C", str(inst / "etc"), "-t", "-f", "s@x"], b"Subject: x\n\nbody\n")
    assert rc == 75
    assert err == f"sendmail: fatal: s@x({os.getuid()}): No recipient addresses found in message header\n".encode()
    assert maildrop_names(inst) == []


def test_size_limit_nothing_queued_and_temp_removed(inst):
    with open(inst / "etc" / "main.cf", "a") as f:
        f.write("message_size_limit = 20000\n")
    rc, _, err = run(["-C", str(inst / "etc"), "-f", "s@x", "r@example.org"], b"x" * 100 + b"\n" + b"y" * 30000)
    assert rc == 75
    # Postfix 3.7 side by side: its postdrop hits the file size limit first.
    assert err == (f"postdrop: warning: uid={os.getuid()}: File too large\n"
                   "sendmail: warning: mail_stream_cleanup: close error\n"
                   f"sendmail: fatal: s@x({os.getuid()}): message file too big\n").encode()
    assert maildrop_names(inst) == []
    rc, _, err = run(["-C", str(inst / "etc"), "r@example.org"], b"small\n")
    assert rc == 0 and len(maildrop_names(inst)) == 1


def test_missing_queue_directory(tmp_path):
    (tmp_path / "main.cf").write_text(f"queue_directory = {tmp_path / 'nope'}\n")
    rc, _, err = run(["-C", str(tmp_path), "a@b"], b"x\n")
    assert rc == 75 and err == f"sendmail: fatal: chdir {tmp_path / 'nope'}: No such file or directory\n".encode()


def test_unwritable_maildrop_is_tempfail(inst):
    user = submit_user()
    os.chmod(inst / "queue" / "maildrop", 0o1730)
    rc, _, err = run(["-C", str(inst / "etc"), "a@example.org"], b"x\n", user=user)
    assert rc == 75
    assert err.startswith(f"sendmail: fatal: {user}({pwd.getpwnam(user).pw_uid}): mail_queue_enter: "
                          "create file maildrop/".encode())
    assert err.rstrip().endswith(b"Permission denied")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch users")
def test_unprivileged_user_submits_but_cannot_look(inst):
    user = submit_user()
    uid = pwd.getpwnam(user).pw_uid
    rc, _, err = run(["-C", str(inst / "etc"), "bob@example.org"], b"Subject: from a user\n\nhi\n", user=user)
    assert (rc, err) == (0, b"")
    names = maildrop_names(inst)
    assert len(names) == 1 and os.stat(inst / "queue" / "maildrop" / names[0]).st_uid == uid

    # The user can neither list the maildrop nor touch the real queue.
    pid = os.fork()
    if pid == 0:
        r = 1
        try:
            fd = os.open(os.devnull, os.O_WRONLY)
            os.setgroups([])
            os.setgid(pwd.getpwnam(user).pw_gid)
            os.setuid(uid)
            res = []
            for fn in (lambda: os.listdir(inst / "queue" / "maildrop"),
                       lambda: os.listdir(inst / "queue" / "incoming"),
                       lambda: open(inst / "queue" / "incoming" / "X", "wb"),
                       lambda: open(inst / "queue" / "active" / "Y", "wb")):
                try:
                    fn()
                    res.append(False)
                except PermissionError:
                    res.append(True)
            r = 0 if all(res) else 1
            os.close(fd)
        finally:
            os._exit(r)
    _, st = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(st) == 0

    # pickup (here: root standing in for mail_owner) queues it with the user's uid.
    log = NullLog()
    assert pickup_once(load_config(str(inst / "etc")), log) == 1
    assert any(line.endswith(f"uid={uid} from=<{user}>") for line in log.lines)
    store = QueueStore(str(inst / "queue"))
    (qid,) = store.scan("incoming")
    with store.open(qid) as qm:
        assert qm.sender == f"{user}@example.com"
        assert qm.read_content().startswith(f"Received: by mx.example.com (postwell, from userid {uid})".encode())


# --------------------------------------------------------------------------- other modes

def test_bs_transcript_and_maildrop(inst):
    dialogue = (b"EHLO client.example\r\nMAIL FROM:<u@example.org> RET=HDRS ENVID=e1\r\n"
                b"RCPT TO:<w@example.net> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;W@example.net\r\n"
                b"RCPT TO:<v@example.net>\r\n"
                b"DATA\r\nSubject: t\r\n\r\nhello\r\n..dot\r\n.\r\nQUIT\r\n")
    rc, out, err = run(["-C", str(inst / "etc"), "-bs"], dialogue)
    assert (rc, err) == (0, b"")
    lines = out.decode().split("\r\n")
    assert lines[0] == "220 mx.example.com ESMTP postwell"
    assert "250 2.1.0 Ok" in lines and "250 2.1.5 Ok" in lines
    assert "354 End data with <CR><LF>.<CR><LF>" in lines
    assert f"250 2.0.0 Ok: queued as {maildrop_names(inst)[0]}" in lines
    assert lines[-2] == "221 2.0.0 Bye"
    env, content = read_drop(inst, maildrop_names(inst)[0])
    assert env.sender == "u@example.org" and env.recipients == ["w@example.net", "v@example.net"]
    assert (env.ret, env.envid) == ("HDRS", "e1")
    assert env.rcpt_notify == {0: "SUCCESS,FAILURE"} and env.rcpt_orcpt == {0: "rfc822;W@example.net"}
    assert env.protocol == "ESMTP" and env.helo == "client.example"
    assert content.startswith(b"Received: from client.example (localhost [127.0.0.1])\n\tby mx.example.com")
    assert content.endswith(b"Subject: t\n\nhello\n.dot\n")


def test_bs_rejects_recipients_and_eof(inst):
    rc, out, _ = run(["-C", str(inst / "etc"), "-bs", "x@y"], b"")
    assert rc == 75
    rc, out, _ = run(["-C", str(inst / "etc"), "-bs"], b"HELO a\r\n")
    assert rc == 0 and out.startswith(b"220 ") and b"250 mx.example.com\r\n" in out



def test_bs_applies_command_filter_and_footer_maps(inst):
    """sendmail -bs runs Postfix's smtpd, so smtpd_command_filter and
    smtpd_reject_footer_maps apply there too."""
    etc = inst / "etc"
    (etc / "filter").write_text("/^FROB( .*)?$/ NOOP\n")
    (etc / "footer").write_text("/^500 / see the FAQ\n")
    with open(etc / "main.cf", "a") as f:
        f.write(f"smtpd_command_filter = regexp:{etc / 'filter'}\n"
                f"smtpd_reject_footer_maps = regexp:{etc / 'footer'}\n")
    rc, out, _ = run(["-C", str(etc), "-bs"], b"HELO a\r\nFROB x\r\nWIBBLE\r\nQUIT\r\n")
    lines = out.decode().split("\r\n")
    assert rc == 0
    assert lines[2] == "250 2.0.0 Ok"                     # FROB x became NOOP
    assert lines[3:5] == ["500-5.5.2 Error: command not recognized", "500 5.5.2 see the FAQ"]

def test_bi_builds_alias_database(inst):
    aliases = inst / "etc" / "aliases"
    aliases.write_text("postmaster: root\nabuse: root\n")
    with open(inst / "etc" / "main.cf", "a") as f:
        f.write(f"alias_database = hash:{aliases}\nalias_maps = hash:{aliases}\n")
    rc, _, err = run(["-C", str(inst / "etc"), "-bi"])
    assert (rc, err) == (0, b"")
    assert (inst / "etc" / "aliases.db").exists()
    os.unlink(inst / "etc" / "aliases.db")
    rc, _, err = run(["-C", str(inst / "etc")], prog="newaliases")
    assert rc == 0 and (inst / "etc" / "aliases.db").exists()
    rc, _, err = run(["-C", str(inst / "etc"), "-bi", "x@y"])
    assert rc == 75 and b"alias initialization mode requires no recipient" in err


def test_bp_lists_queue(inst):
    rc, out, _ = run(["-C", str(inst / "etc"), "-bp"])
    assert rc == 0 and out == b"Mail queue is empty\n"
    rc, out, err = run(["-C", str(inst / "etc"), "-bp", "x"])
    assert rc == 75 and err == b"sendmail: fatal: display queue mode requires no recipient\n"


def test_q_sends_flush_request(inst):
    fifo = inst / "queue" / "public" / "qmgr"
    os.mkfifo(fifo, 0o622)
    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        rc, _, err = run(["-C", str(inst / "etc"), "-q"])
        assert (rc, err) == (0, b"")
        select.select([fd], [], [], 5)
        assert os.read(fd, 10) == b"F"
        assert run(["-C", str(inst / "etc"), "-q1h"])[0] == 0
    finally:
        os.close(fd)


def test_bv_queues_a_verification_request(inst):
    # As Postfix's: no message is read; the drop carries the recipients, the
    # generated probe headers and the verify flag (the report is mailed later).
    rc, out, _ = run(["-C", str(inst / "etc"), "-f", "s@example.test", "-bv", "root@localhost",
                      "u@example.org"], stdin=b"Subject: not read\n\nbody\n")
    assert (rc, out) == (0, b"Mail Delivery Status Report will be mailed to <s@example.test>.\n")
    [name] = maildrop_names(inst)
    env, content = read_drop(inst, name)
    assert env.verify == "user" and env.recipients == ["root@localhost", "u@example.org"]
    assert content == (b"From: s@example.test\nSubject: probe\n"
                       b"To:\troot@localhost,\n\tu@example.org\n")


def test_unreadable_stdin_is_dataerr(inst):
    rc, _, err = run(["-C", str(inst / "etc"), "-f", "s@x", "a@example.org"], stdin_dir=True)
    assert rc == 75
    assert err == f"sendmail: fatal: s@x({os.getuid()}): error reading input: Is a directory\n".encode()
    assert maildrop_names(inst) == []


def test_usage_error_output_matches_postfix(inst):
    rc, _, err = run(["-C", str(inst / "etc"), "-z"])
    assert rc == 75
    assert err == (b"sendmail: invalid option -- 'z'\n" * 2) + b"sendmail: fatal: usage: sendmail [options]\n"
    rc, _, err = run(["-C", str(inst / "etc"), "-t", "-bp"])
    assert rc == 75 and err == b"sendmail: fatal: -t can be used only in delivery mode\n"


def test_null_sender_and_gateway_context(inst):
    rc, _, err = run(["-C", str(inst / "etc"), "-f", "<>", "-G", "-B", "7BIT", "a@example.org"], b"x\n")
    assert (rc, err) == (0, b"")
    env, _ = read_drop(inst, maildrop_names(inst)[0])
    assert env.sender == "" and env.rewrite == "remote" and env.body == "7BIT"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch users")
def test_authorized_submit_users(inst):
    user = submit_user()
    uid = pwd.getpwnam(user).pw_uid
    with open(inst / "etc" / "main.cf", "a") as f:
        f.write("authorized_submit_users = root\n")
    rc, _, err = run(["-C", str(inst / "etc"), "a@example.org"], b"x\n", user=user)
    assert rc == 75 and err == f"sendmail: fatal: User {user}({uid}) is not allowed to submit mail\n".encode()
    assert maildrop_names(inst) == []
    assert run(["-C", str(inst / "etc"), "a@example.org"], b"x\n")[0] == 0
    # A file dropped by hand (bypassing sendmail) is refused by pickup on its owner.
    w = md.MaildropWriter(str(inst / "queue" / "maildrop"))
    w.open()
    w.write(b"x\n")
    name = w.finish(md.MaildropEnvelope(sender=user, recipients=["a@example.org"]))
    os.chown(inst / "queue" / "maildrop" / name, uid, -1)
    log = NullLog()
    assert pickup_once(load_config(str(inst / "etc")), log) == 1     # root's message only
    assert os.listdir(inst / "queue" / "corrupt") == ["maildrop." + name]
    assert any(f"User {user}({uid}) is not allowed to submit mail" in line for line in log.lines)


def test_sigterm_while_reading_removes_partial_file(inst):
    import signal as sig
    _preload()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(w)
            os.dup2(r, 0)
            nul = os.open(os.devnull, os.O_WRONLY)
            os.dup2(nul, 1)
            os.dup2(nul, 2)
            sys.stdout = open(1, "w", closefd=False)
            sys.stderr = open(2, "w", closefd=False)
            os._exit(sm.main(["-C", str(inst / "etc"), "a@example.org"], prog="sendmail"))
        except BaseException:  # noqa: BLE001
            os._exit(99)
    os.close(r)
    try:
        os.write(w, b"Subject: partial\n\n" + b"x" * 100000)
        harness.wait_for(lambda: bool(maildrop_names(inst)), 10, what="temporary maildrop file")
        assert maildrop_names(inst)[0].startswith(".tmp.")
        os.kill(pid, sig.SIGTERM)
        _, st = os.waitpid(pid, 0)
        pid = None
        assert os.waitstatus_to_exitcode(st) == 75
        assert maildrop_names(inst) == []
    finally:
        os.close(w)
        if pid:
            os.kill(pid, sig.SIGKILL)
            os.waitpid(pid, 0)


def test_bi_failure_reported_as_postalias(inst):
    rc, _, err = run(["-C", str(inst / "etc"), "-bi", f"-oAhash:{inst}/missing/aliases"])
    assert rc == 1
    assert err == f"postalias: fatal: open {inst}/missing/aliases: No such file or directory\n".encode()
