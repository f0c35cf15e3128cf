"""Issue 3 end to end: the admin's tools against a running postwell.

sendmail from an unprivileged user, sendmail -bs, mailq / postqueue -p -j -s,
postsuper -h / -H / -d with their log lines, postcat -q.  Real users (pwe*)
are created by the fixtures of test_issue3_local_e2e; everything needs root.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from harness import HOSTNAME, free_port, wait_for  # noqa: E402
from test_issue3_local_e2e import (TIMEOUT, e2e_users, queued_id, site, delivered_line,  # noqa: E402,F401
                                   owner_and_mode)
from test_sendmail import run as run_sendmail  # noqa: E402

from postwell.queue import QueueStore  # noqa: E402

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create real users")

HEADER = "-Queue ID-  --Size-- ----Arrival Time---- -Sender/Recipient-------"


def closed_port() -> int:
    """A loopback port nothing listens on: deliveries there are deferred."""
    return free_port()


def relay_params(port: int) -> dict:
    return {"relayhost": f"[127.0.0.1]:{port}", "minimal_backoff_time": "1h",
            "maximal_backoff_time": "2h", "queue_run_delay": "1h"}


def deferred_ids(s) -> list[str]:
    return QueueStore(str(s.inst.queue_dir)).scan("deferred")


def wait_deferred(s, qid: str) -> None:
    s.wait_log(rf"{qid}: to=<[^>]+>, relay=none, .*status=deferred \(")
    wait_for(lambda: qid in deferred_ids(s), TIMEOUT, what=f"{qid} in deferred/")


# ------------------------------------------------------------------ sendmail

def test_sendmail_t_from_unprivileged_user(site, e2e_users):
    s = site()
    submitter = e2e_users["pwe1"]
    rc, out, err = run_sendmail(["-C", str(s.inst.config_dir), "-t", "-i"],
                                f"To: pwe2@{HOSTNAME}\nSubject: from cron\n\nreport\n.\nmore\n".encode(),
                                user="pwe1")
    assert (rc, out, err) == (0, b"", b"")
    data = s.wait_mbox("pwe2")
    assert owner_and_mode(s.spool / "pwe2") == (e2e_users["pwe2"].pw_uid, 0o600)
    assert b"Return-Path: <pwe1@mx.example.test>\n" in data    # myorigin = $myhostname
    assert f"(postwell, from userid {submitter.pw_uid})".encode() in data
    assert b"\nreport\n.\nmore\n" in data      # -i: a lone dot is text
    m = s.wait_log(rf"postfix/pickup\[\d+\]: ([0-9A-F]+): uid={submitter.pw_uid} from=<pwe1>")
    qid = m.group(1)
    s.wait_log(delivered_line(qid, f"pwe2@{HOSTNAME}", "delivered to mailbox"))
    s.wait_log(rf"postfix/qmgr\[\d+\]: {qid}: from=<pwe1@mx\.example\.test>, size=\d+, nrcpt=1 \(queue active\)")
    # The user wrote only into the maildrop; nothing is left there.
    assert os.listdir(s.inst.queue_dir / "maildrop") == []


def test_sendmail_t_to_cc_bcc(site, e2e_users):
    s = site()
    msg = (f"To: Two <pwe2@{HOSTNAME}>\nCc: pwe3\nBcc: pwe1@{HOSTNAME}\nSubject: three\n\nhi\n").encode()
    rc, out, err = run_sendmail(["-C", str(s.inst.config_dir), "-t"], msg, user="pwe1")
    assert (rc, out, err) == (0, b"", b"")
    for user in ("pwe1", "pwe2", "pwe3"):
        data = s.wait_mbox(user)
        head = data.split(b"\n\n", 1)[0]
        assert b"\nBcc:" not in head, head        # cleanup drops Bcc (RFC 5322 3.6.3)
        # As Postfix 3.7 does it: X-Original-To keeps the recipient as submitted
        # (unqualified for "Cc: pwe3"); the header itself is qualified.
        orig = "pwe3" if user == "pwe3" else f"{user}@{HOSTNAME}"
        assert f"\nX-Original-To: {orig}\nDelivered-To: {user}@{HOSTNAME}\n".encode() in head, head
        assert f"\nCc: pwe3@{HOSTNAME}\n".encode() in head, head
    m = s.wait_log(r"postfix/pickup\[\d+\]: ([0-9A-F]+): uid=\d+ from=<pwe1>")
    qid = m.group(1)
    s.wait_log(rf"postfix/qmgr\[\d+\]: {qid}: from=<pwe1@mx\.example\.test>, size=\d+, nrcpt=3 ")
    s.wait_log(delivered_line(qid, f"pwe3@{HOSTNAME}", "delivered to mailbox", orig="pwe3"))


def test_sendmail_bs_transcript(site, e2e_users):
    s = site({"home_mailbox": "Maildir/"})
    script = (f"EHLO cron.example\r\nMAIL FROM:<pwe1@{HOSTNAME}>\r\nRCPT TO:<pwe3@{HOSTNAME}>\r\n"
              "DATA\r\nSubject: bs\r\n\r\nvia -bs\r\n.\r\nQUIT\r\n").encode()
    rc, out, err = run_sendmail(["-C", str(s.inst.config_dir), "-bs"], script, user="pwe1")
    assert (rc, err) == (0, b"")
    lines = out.decode().split("\r\n")
    assert lines[0] == f"220 {HOSTNAME} ESMTP postwell"
    assert lines[1] == f"250-{HOSTNAME}"
    ehlo_end = next(i for i, ln in enumerate(lines) if ln.startswith("250 ") and i > 1)
    assert lines[ehlo_end + 1:ehlo_end + 4] == ["250 2.1.0 Ok", "250 2.1.5 Ok",
                                                "354 End data with <CR><LF>.<CR><LF>"]
    assert lines[ehlo_end + 4].startswith("250 2.0.0 Ok: queued")
    assert lines[ehlo_end + 5:] == ["221 2.0.0 Bye", ""]
    [path] = s.wait_maildir("pwe3")
    data = path.read_bytes()
    assert data.startswith(b"Return-Path: <pwe1@mx.example.test>\n")
    assert b"Received: from cron.example" in data and data.endswith(b"\nvia -bs\n")


# ------------------------------------------------------------------ queue tools

def test_mailq_lists_every_queue(site, capsys):
    port = closed_port()
    s = site(relay_params(port), pickup=False)
    d1 = queued_id(s.smtp(["a@far.test", "b@far.test"], sender="s1@remote.test"))
    d2 = queued_id(s.smtp(["c@other.test"], sender=""))
    wait_deferred(s, d1)
    wait_deferred(s, d2)
    cp = s.inst.run("postsuper", "-h", d2)
    assert cp.returncode == 0, cp.stderr
    rc, _, err = run_sendmail(["-C", str(s.inst.config_dir), "-f", "pwe1@mx.example.test",
                               "x@far.test", "y@far.test"], b"Subject: md\n\nhello\n", user="pwe1")
    # No pickup service here: Postfix's postdrop warns about the missing trigger.
    assert (rc, err) == (0, b"postdrop: warning: unable to look up public/pickup: No such file or directory\n")
    store = QueueStore(str(s.inst.queue_dir))
    [drop_name] = os.listdir(s.inst.queue_dir / "maildrop")
    # Listed under a prefix of the file's name: the full name would let any user
    # who can run mailq open the file (the maildrop is 1733, the file 0644).
    drop = drop_name[:10].upper()
    cp = s.inst.run("postqueue", "-p", check=True)
    lines = cp.stdout.split("\n")
    reason = f"(connect to 127.0.0.1[127.0.0.1]:{port}: Connection refused)"

    def msg_line(qid, status, size, arrival, sender):
        stamp = time.strftime("%a %b %d %H:%M:%S", time.localtime(arrival))
        return f"{qid + status.strip():<11}{size:>8} {stamp}  {sender}"

    def info(qid, q):
        with store.open(qid, q, writable=False) as qm:
            # The size column is Postfix's (cleanup's postwell_size), as size= is.
            return int(qm.attributes.get("postwell_size", qm.content_size)), qm.arrival_time, \
                qm.content_size
    from postwell.cli.postqueue import collect_maildrop
    [md] = list(collect_maildrop(store))
    size1, t1, _ = info(d1, "deferred")
    size2, t2, content2 = info(d2, "hold")
    total_kb = (size1 + size2 + md["message_size"]) // 1024
    expected = [
        HEADER,
        # maildrop first (no status), as Postfix's showq orders the queues
        msg_line(drop, " ", md["message_size"], md["arrival_time"], "pwe1@mx.example.test"),
        " " * 41 + "x@far.test",
        " " * 41 + "y@far.test",
        "",
        msg_line(d1, " ", size1, t1, "s1@remote.test"),
        f"{reason:>78}",
        " " * 41 + "a@far.test",
        " " * 41 + "b@far.test",
        "",
        msg_line(d2, "!", size2, t2, "MAILER-DAEMON"),
        f"{reason:>78}",
        " " * 41 + "c@other.test",
        "",
        f"-- {total_kb} Kbytes in 3 Requests.",
        "",
    ]
    assert lines == expected, cp.stdout
    assert drop_name not in cp.stdout
    # mailq is the same listing
    from postwell.cli import postqueue
    capsys.readouterr()
    assert postqueue.mailq_main(["-c", str(s.inst.config_dir)]) == 0
    assert capsys.readouterr().out == cp.stdout
    # postqueue -j: one JSON object per line, Postfix 3.7's fields
    objs = [json.loads(x) for x in s.inst.run("postqueue", "-j", check=True).stdout.splitlines()]
    assert [(o["queue_name"], o["queue_id"]) for o in objs] == [("maildrop", drop), ("deferred", d1),
                                                                ("hold", d2)]
    for o in objs:
        assert list(o) == ["queue_name", "queue_id", "arrival_time", "message_size", "forced_expire",
                           "sender", "recipients"]
    assert objs[1]["recipients"] == [{"address": "a@far.test", "delay_reason": reason[1:-1]},
                                     {"address": "b@far.test", "delay_reason": reason[1:-1]}]
    assert objs[0]["recipients"] == [{"address": "x@far.test"}, {"address": "y@far.test"}]
    # postcat -q finds the maildrop file and the held message
    for given in (drop, drop.lower(), drop_name):
        cp = s.inst.run("postcat", "-q", given, check=True)
        assert cp.stdout.startswith(f"*** ENVELOPE RECORDS maildrop/{given} ***\n")
    assert "\nrecipient: x@far.test\nrecipient: y@far.test\n" in cp.stdout
    cp = s.inst.run("postcat", "-q", d2, check=True)
    out = cp.stdout.splitlines()
    assert out[0] == f"*** ENVELOPE RECORDS hold/{d2} ***"
    assert out[1].startswith("message_size: ") and int(out[1].split()[1]) == content2
    assert "sender: " in out and "recipient: c@other.test" in out
    assert out[-3:] == ["hello", f"*** HEADER EXTRACTED hold/{d2} ***", f"*** MESSAGE FILE END hold/{d2} ***"]
    contents = out.index(f"*** MESSAGE CONTENTS hold/{d2} ***")
    assert out[contents + 1].startswith("Received: from client.test")
    # postsuper -d takes the listed id of a maildrop file too
    cp = s.inst.run("postsuper", "-d", drop, "maildrop")
    assert (cp.returncode, cp.stderr) == (0, f"postsuper: {drop}: removed\n"
                                             "postsuper: Deleted: 1 message\n")
    assert os.listdir(s.inst.queue_dir / "maildrop") == []


def test_empty_queue(site):
    s = site()
    assert s.inst.run("postqueue", "-p", check=True).stdout == "Mail queue is empty\n"
    assert s.inst.run("postqueue", "-j", check=True).stdout == ""


def test_postsuper_hold_release_delete_logged(site):
    port = closed_port()
    s = site(relay_params(port))
    qid = queued_id(s.smtp(["z@far.test"]))
    wait_deferred(s, qid)
    cp = s.inst.run("postsuper", "-h", qid)
    assert (cp.returncode, cp.stderr) == (0, f"postsuper: {qid}: placed on hold\n"
                                             "postsuper: Placed on hold: 1 message\n")
    assert (s.inst.queue_dir / "hold" / qid).exists()
    assert s.inst.run("postqueue", "-p").stdout.split("\n")[1].startswith(f"{qid}!")
    cp = s.inst.run("postsuper", "-H", qid)
    assert (cp.returncode, cp.stderr) == (0, f"postsuper: {qid}: released from hold\n"
                                             "postsuper: Released from hold: 1 message\n")
    # As with Postfix 3.7, released mail goes back to deferred/ keeping its retry time.
    assert not (s.inst.queue_dir / "hold" / qid).exists()
    assert qid in deferred_ids(s)
    assert os.stat(s.inst.queue_dir / "deferred" / qid).st_mtime > time.time() + 600
    # -r: as Postfix's requeue, through pickup and cleanup under a new queue id
    # (pickup logs orig_id=), retried at once (deferred again: the relay is still down).
    cp = s.inst.run("postsuper", "-r", qid)
    assert (cp.returncode, cp.stderr) == (0, f"postsuper: {qid}: requeued\npostsuper: Requeued: 1 message\n")
    new = s.wait_log(rf"postfix/pickup\[\d+\]: ([0-9A-F]+): uid=\d+ from=<[^>]*> orig_id={qid}$").group(1)
    wait_for(lambda: s.log_lines(rf"{new}: to=<z@far\.test>.*status=deferred"), TIMEOUT,
             what="a retry after requeue")
    wait_for(lambda: new in deferred_ids(s), TIMEOUT, what="deferred again")
    cp = s.inst.run("postsuper", "-d", new)
    assert (cp.returncode, cp.stderr) == (0, f"postsuper: {new}: removed\npostsuper: Deleted: 1 message\n")
    assert s.inst.run("postqueue", "-p").stdout == "Mail queue is empty\n"
    cp = s.inst.run("postsuper", "-d", "ALL")
    assert cp.stderr == "postsuper: Deleted: 0 messages\n"
    # The same lines in the maillog, as Postfix writes them.
    for text in (f"{qid}: placed on hold", "Placed on hold: 1 message", f"{qid}: released from hold",
                 "Released from hold: 1 message", f"{qid}: requeued", "Requeued: 1 message",
                 f"{new}: removed", "Deleted: 1 message",
                 "Deleted: 0 messages"):
        s.wait_log(rf"^\w{{3}} [ \d]\d \d\d:\d\d:\d\d \S+ postfix/postsuper\[\d+\]: {re.escape(text)}$")


def test_postqueue_s_flushes_one_site(site):
    port = closed_port()
    params = relay_params(port)
    params["fast_flush_domains"] = "far.test"
    s = site(params)
    far = queued_id(s.smtp(["a@far.test"]))
    other = queued_id(s.smtp(["b@other.test"]))
    wait_deferred(s, far)
    wait_deferred(s, other)
    cp = s.inst.run("postqueue", "-s", "other.test")
    assert (cp.returncode, cp.stderr) == (69, 'postqueue: fatal: Flush service is not configured '
                                              'for destination "other.test"\n')
    cp = s.inst.run("postqueue", "-s", "far.test")
    assert (cp.returncode, cp.stderr) == (0, "")
    wait_for(lambda: len(s.log_lines(rf"{far}: to=<a@far\.test>.*status=deferred")) >= 2, TIMEOUT,
             what="a retry of the far.test message")
    wait_for(lambda: far in deferred_ids(s), TIMEOUT, what="deferred again")
    assert len(s.log_lines(rf"{other}: to=<b@other\.test>.*status=deferred")) == 1
    # postqueue -i: the same for one message; unknown ids are ignored silently.
    assert s.inst.run("postqueue", "-i", "ABCDEF123").returncode == 0
    cp = s.inst.run("postqueue", "-i", other)
    assert (cp.returncode, cp.stderr) == (0, "")
    wait_for(lambda: len(s.log_lines(rf"{other}: to=<b@other\.test>.*status=deferred")) >= 2, TIMEOUT,
             what="a retry of the other.test message")
    # postqueue -f: everything deferred is retried now.
    wait_for(lambda: set(deferred_ids(s)) == {far, other}, TIMEOUT, what="both deferred again")
    assert s.inst.run("postqueue", "-f").returncode == 0
    for qid, rcpt in ((far, r"a@far\.test"), (other, r"b@other\.test")):
        wait_for(lambda: len(s.log_lines(rf"{qid}: to=<{rcpt}>.*status=deferred")) >= 3, TIMEOUT,
                 what=f"a flush retry of {qid}")


# ------------------------------------------------------------------ unprivileged users

def run_as(user, func, *args) -> tuple[int, str, str]:
    """Run ``func(*args)`` in a forked child as ``user``; (exit status, stdout, stderr)."""
    import pwd
    import tempfile
    pw = pwd.getpwnam(user)
    with tempfile.TemporaryFile() as fout, tempfile.TemporaryFile() as ferr:
        pid = os.fork()
        if pid == 0:
            try:
                os.dup2(fout.fileno(), 1)
                os.dup2(ferr.fileno(), 2)
                sys.stdout = open(1, "w", closefd=False)
                sys.stderr = open(2, "w", closefd=False)
                os.setgroups([])
                os.setgid(pw.pw_gid)
                os.setuid(pw.pw_uid)
                rc = func(*args)
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
            return p == pid
        wait_for(done, TIMEOUT, what="the child")
        fout.seek(0)
        ferr.seek(0)
        return os.waitstatus_to_exitcode(status["st"]), fout.read().decode(), ferr.read().decode()


def _queue_one_deferred(site):
    port = closed_port()
    s = site(relay_params(port))
    qid = queued_id(s.smtp(["z@far.test"]))
    wait_deferred(s, qid)
    return s, qid


def test_mailq_as_unprivileged_user_fails_clearly(site, e2e_users):
    from postwell.cli import postqueue
    s, _ = _queue_one_deferred(site)
    rc, out, err = run_as("pwe1", postqueue.main, ["-c", str(s.inst.config_dir), "-i", "ABCDEF123"])
    assert rc == 69 and err.startswith("postqueue: fatal: Cannot flush mail queue - ")
    s.inst.stop()
    rc, out, err = run_as("pwe1", postqueue.main, ["-c", str(s.inst.config_dir), "-p"])
    # The mail system is down (no showq): never a traceback, never a false
    # "Mail queue is empty"; Postfix's words and EX_UNAVAILABLE.
    assert (rc, out) == (69, "")
    assert err.startswith("postqueue: fatal: Queue report unavailable - mail system is down "
                          "(Connect to the postwell showq service: ")


def test_mailq_as_unprivileged_user_lists_queue(site, e2e_users):
    from postwell.cli import postqueue
    s, qid = _queue_one_deferred(site)
    rc, out, _ = run_as("pwe1", postqueue.main, ["-c", str(s.inst.config_dir), "-p"])
    assert rc == 0 and out.split("\n")[1].startswith(qid)
