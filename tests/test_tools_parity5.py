"""Postfix 3.7 parity of pickup, postsuper -r, postqueue flushes, DSN notices and
sendmail, each pinned by a side-by-side run against a real Postfix 3.7:

- pickup: a maildrop file over message_size_limit is bounced (cleanup's size
  refusal), not moved to corrupt/; the notice of a refused message returns the
  headers as cleanup had processed them (header_checks PREPEND/REPLACE up to the
  REJECT), its recipients virtual-alias expanded and logged in external form;
  a full-name From: follows Message-Id and Date.
- postsuper -r: the file goes to maildrop/ and pickup sends it through cleanup
  again (new queue id, ``orig_id=`` line, content_filter, checks, aliases).
- notices: bounce_template_file (bounce(5)) for failure, delay and success notices.
"""

from __future__ import annotations

import os
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import harness  # noqa: E402

from postwell.cli import postqueue, postsuper  # noqa: E402
from postwell.dsn.notice import DELAY, FAILURE, SUCCESS, DsnRecipient, render_notice  # noqa: E402
from postwell.queue import QueueStore  # noqa: E402
from test_pickup import cfg, pickup_root  # noqa: E402
from test_pickup import drop as pickup_drop  # noqa: E402
from test_pickup_reject import NOW, run  # noqa: E402
from test_pickup_reject import queued_files as incoming  # noqa: E402


@pytest.fixture
def inst(tmp_path):
    return pickup_root(tmp_path, "parity5",
                       "myhostname = mx.example.test\nmydomain = example.test\nmyorigin = example.test\n"
                       "message_size_limit = 20000\n"
                       "header_checks = regexp:{etc}/hc\n"
                       "virtual_alias_maps = inline:{a@example.com=b@example.com}\n",
                       hc="/^Subject: rejectme/ REJECT rejected by hc\n"
                          "/^X-Prep:/ PREPEND X-Prepended: yes\n"
                          "/^X-Rep:/ REPLACE X-Replaced: yes\n")


def add_main_cf(inst, text: str) -> None:
    with open(inst / "etc" / "main.cf", "a") as f:
        f.write(text)


def drop(inst, content: bytes, mtime: float = NOW - 4, **env_kw) -> str:
    env_kw.setdefault("sender", "alice@virtual.test")
    env_kw.setdefault("recipients", ["bob@virtual.test"])
    return pickup_drop(inst, content, mtime, **env_kw)


def returned_headers(content: bytes) -> bytes:
    part = content.split(b"Content-Type: text/rfc822-headers\n", 1)[1]
    return part.split(b"\n\n", 1)[1].split(b"\n\n--", 1)[0] + b"\n"


# ------------------------------------------------------------------ 1. size limit

def test_oversize_maildrop_file_is_bounced_not_corrupt(inst):
    # Postfix 3.7 (limit lowered to 20000 after a 36 KB drop): cleanup's
    # "queue file size limit exceeded", status=bounced (message file too big) per
    # recipient, a headers-only notice; nothing in corrupt/.
    body = b"Subject: big one\nX-Prep: 1\n\n" + (b"x" * 60 + b"\n") * 600
    drop(inst, body, recipients=["bob@virtual.test", "a@example.com"], fullname="root")
    logs = run(inst)
    assert os.listdir(inst / "queue" / "corrupt") == []
    assert os.listdir(inst / "queue" / "maildrop") == []
    cl = logs["cleanup"].lines
    qid = cl[0].split(":")[0]
    assert cl[0] == (f"{qid}: prepend: header X-Prep: 1 from local; from=<alice@virtual.test> "
                     "to=<a@example.com>: X-Prepended: yes")
    assert cl[1].startswith(f"{qid}: message-id=<")
    assert cl[2] == f"warning: {qid}: queue file size limit exceeded"
    assert cl[3] == (f"{qid}: to=<bob@virtual.test>, relay=none, delay=4, delays=4/0/0/0, "
                     "dsn=5.3.4, status=bounced (message file too big)")
    assert cl[4] == (f"{qid}: to=<b@example.com>, orig_to=<a@example.com>, relay=none, delay=4, "
                     "delays=4/0/0/0, dsn=5.3.4, status=bounced (message file too big)")
    [(nid, qm, content)] = incoming(inst)
    assert qm.sender == "" and [r.address for r in qm.recipients] == ["alice@virtual.test"]
    assert logs["bounce"].lines == [f"{qid}: sender non-delivery notification: {nid}"]
    text = content.decode()
    assert "<b@example.com> (expanded from <a@example.com>): message file too big" in text
    assert "Original-Recipient: rfc822;a@example.com\nAction: failed\nStatus: 5.3.4" in text
    head = returned_headers(content).decode()
    lines = head.splitlines()
    assert lines[0] == "Return-Path: <alice@virtual.test>"
    assert lines[3:6] == ["Subject: big one", "X-Prepended: yes", "X-Prep: 1"]
    assert lines[6].startswith("Message-Id: <") and lines[7].startswith("Date: ")
    assert lines[8] == "From: root <alice@virtual.test>" and len(lines) == 9
    assert "xxxx" not in text


# ------------------------------------------------------------ 2. refused-message notice

def test_reject_notice_returns_processed_headers(inst):
    # Postfix 3.7: the headers before the rejected one went through the checks
    # (PREPEND, REPLACE), the rejected header is kept as written, cleanup's
    # missing headers follow; the queue file's Date: is the drop time.
    drop(inst, b"X-Prep: 1\nX-Rep: 2\nTo: a@example.com\nFrom: alice@virtual.test\n"
               b"Subject: rejectme\n\nbody\n",
         recipients=["bob@virtual.test", "a@example.com", "quoted user@virtual.test"])
    logs = run(inst)
    cl = logs["cleanup"].lines
    qid = cl[0].split(":")[0]
    assert [ln.split(": ", 2)[1] for ln in cl[:3]] == ["prepend", "replace", "reject"]
    assert cl[3].startswith(f"{qid}: message-id=<")
    assert cl[4:7] == [
        f"{qid}: to=<bob@virtual.test>, relay=none, delay=4, delays=4/0/0/0, dsn=5.7.1, "
        "status=bounced (rejected by hc)",
        f"{qid}: to=<b@example.com>, orig_to=<a@example.com>, relay=none, delay=4, "
        "delays=4/0/0/0, dsn=5.7.1, status=bounced (rejected by hc)",
        f'{qid}: to=<"quoted user"@virtual.test>, relay=none, delay=4, delays=4/0/0/0, '
        "dsn=5.7.1, status=bounced (rejected by hc)"]
    [(_nid, _qm, content)] = incoming(inst)
    text = content.decode()
    assert '<"quoted user"@virtual.test>: rejected by hc' in text
    assert 'Final-Recipient: rfc822; "quoted user"@virtual.test\n' \
           "Original-Recipient: rfc822;quoted user@virtual.test\n" in text
    head = returned_headers(content).decode().splitlines()
    assert head[3:9] == ["X-Prepended: yes", "X-Prep: 1", "X-Replaced: yes", "To: a@example.com",
                         "From: alice@virtual.test", "Subject: rejectme"]
    assert head[9] == f"Message-Id: <{time.strftime('%Y%m%d%H%M%S', time.localtime(NOW - 4))}" \
                      f".{qid}@mx.example.test>"
    assert head[10].startswith("Date: ") and len(head) == 11


def test_reject_first_header_leaves_later_headers_unchecked(inst):
    # Postfix 3.7: once a header is rejected no further check applies.
    drop(inst, b"Subject: rejectme\nX-Prep: 1\nX-Rep: 2\n\nbody\n")
    logs = run(inst)
    assert [ln.split(": ", 2)[1] for ln in logs["cleanup"].lines[:1]] == ["reject"]
    [(_nid, _qm, content)] = incoming(inst)
    head = returned_headers(content).decode().splitlines()
    assert head[3:6] == ["Subject: rejectme", "X-Prep: 1", "X-Rep: 2"]


def test_fullname_from_after_message_id_and_date(inst):
    # Postfix 3.7 (sendmail -F 'Full Name'): Message-Id, Date, then From.
    drop(inst, b"Subject: order\n\nx\n", fullname="Full Name")
    run(inst)
    [(_qid, _qm, content)] = incoming(inst)
    head = content.split(b"\n\n", 1)[0].decode().splitlines()
    assert head[2] == "Subject: order"
    assert head[3].startswith("Message-Id: <") and head[4].startswith("Date: ")
    assert head[5] == "From: Full Name <alice@virtual.test>"


def test_arrival_time_is_the_drop_time(inst):
    # Postfix's pickup hands cleanup the maildrop file's time: the queue file's
    # arrival time and the Date: cleanup adds.
    drop(inst, b"Subject: late\n\nx\n", mtime=NOW - 600)
    run(inst)
    [(_qid, qm, content)] = incoming(inst)
    assert abs(qm.arrival_time - (NOW - 600)) < 1
    from postwell.dsn.notice import mail_date
    assert f"\nDate: {mail_date(NOW - 600)}\n".replace(" ", "") in \
        content.decode().replace(" ", "")


# ------------------------------------------------------------------ 4. postsuper -r

def _queued_message(store, rcpts, body: bytes, done=()):
    m = store.create()
    m.set_sender("alice@virtual.test")
    for r in rcpts:
        m.add_recipient(r, orig="a@example.com" if r == "b@example.com" else None)
    m.set_attribute("client_name", "unknown")
    m.set_attribute("client_address", "127.0.0.1")
    m.set_attribute("protocol_name", "ESMTP")
    m.set_attribute("helo_name", "vm")
    m.set_attribute("log_message_origin", "unknown[127.0.0.1]")
    m.set_attribute("rewrite_context", "local")
    m.write(body)
    m.commit()
    if done:
        with store.open(m.queue_id) as qm:
            qm.mark_done(list(done))
    return m.queue_id


def test_postsuper_requeue_goes_through_pickup(inst, capsys):
    store = QueueStore(str(inst / "queue"))
    old = _queued_message(store, ["bob@virtual.test", "b@example.com", "done@virtual.test"],
                          b"Received: from vm (unknown [127.0.0.1])\n\tby mx.example.test\n"
                          b"Subject: hello\nX-Prep: 1\n\nbody\n", done=["done@virtual.test"])
    arrival = store.open(old).arrival_time
    store.move(old, "incoming", "deferred")
    store.append_defer_log(old, "bob@virtual.test", "4.4.1", "connect failed")
    # Changed since the message was queued: a content filter and an alias.
    add_main_cf(inst, "content_filter = smtp:[127.0.0.1]:10024\n"
                      "virtual_alias_maps = inline:{b@example.com=carol@virtual.test}\n")
    assert postsuper.main(["-c", str(inst / "etc"), "-r", old]) == 0
    assert capsys.readouterr().err == f"postsuper: {old}: requeued\npostsuper: Requeued: 1 message\n"
    assert os.listdir(inst / "queue" / "maildrop") == [old]
    # Postfix 3.7 leaves the defer log (test_parity_gaps6.py, side by side).
    assert os.path.exists(store.path("defer", old))
    logs = run(inst, clock=time.time)
    assert os.listdir(inst / "queue" / "maildrop") == []
    [(new, qm, content)] = incoming(inst)
    assert new != old
    uid = os.stat(store.path("incoming", new)).st_uid
    assert logs["pickup"].lines == [f"{new}: uid={uid} from=<alice@virtual.test> orig_id={old}"]
    assert logs["cleanup"].lines[0] == (
        f"{new}: prepend: header X-Prep: 1 from unknown[127.0.0.1]; from=<alice@virtual.test> "
        "to=<b@example.com> proto=ESMTP helo=<vm>: X-Prepended: yes")
    assert [(r.address, r.orig) for r in qm.recipients] == [
        ("bob@virtual.test", "bob@virtual.test"), ("carol@virtual.test", "a@example.com")]
    attrs = qm.attributes
    assert attrs["postwell_filter"] == "smtp:[127.0.0.1]:10024"
    assert attrs["client_address"] == "127.0.0.1" and attrs["helo_name"] == "vm"
    assert abs(qm.arrival_time - arrival) < 0.001
    head = content.split(b"\n\n", 1)[0].decode().splitlines()
    assert head[0] == f"Received: by mx.example.test (postwell, from userid {uid})"
    assert head[1].startswith(f"\tid {new}; ")
    assert head[2] == "Received: from vm (unknown [127.0.0.1])"
    assert "X-Prepended: yes" in head


def test_requeue_from_hold_is_not_held_again(inst, capsys):
    store = QueueStore(str(inst / "queue"))
    old = _queued_message(store, ["bob@virtual.test"], b"Subject: s\n\nb\n")
    with store.open(old) as qm:
        assert qm.attributes.get("postwell_hold") is None
    store.move(old, "incoming", "hold")
    assert postsuper.main(["-c", str(inst / "etc"), "-r", "ALL"]) == 0
    assert capsys.readouterr().err == "postsuper: Requeued: 1 message\n"
    run(inst, clock=time.time)
    [(new, qm, _c)] = incoming(inst)
    assert new != old and "postwell_hold" not in qm.attributes
    assert os.listdir(store.path("hold")) == []


def test_user_dropped_queue_file_lookalike_is_set_aside(inst):
    """A file named like a queue id that a user (not the mail owner) put into the
    world-writable maildrop/ is never sent as a requeued message."""
    if not harness.is_root():
        pytest.skip("needs root to create a file of another user")
    store = QueueStore(str(inst / "queue"))
    old = _queued_message(store, ["bob@virtual.test"], b"Subject: s\n\nb\n")
    store.move(old, "incoming", "maildrop")
    user = harness.ensure_test_user()
    import pwd
    os.chown(store.path("maildrop", old), pwd.getpwnam(user).pw_uid, -1)
    logs = run(inst, clock=time.time)
    assert incoming(inst) == []
    assert os.listdir(inst / "queue" / "corrupt") == ["maildrop." + old]
    assert logs["pickup"].lines == [f"warning: maildrop/{old}: unexpected file name"]


def test_requeue_with_every_recipient_done_is_dropped(inst):
    store = QueueStore(str(inst / "queue"))
    old = _queued_message(store, ["bob@virtual.test"], b"Subject: s\n\nb\n", done=["bob@virtual.test"])
    store.move(old, "incoming", "maildrop")
    run(inst, clock=time.time)
    assert incoming(inst) == [] and os.listdir(inst / "queue" / "maildrop") == []


def test_requeue_rejected_by_checks_is_bounced(inst):
    store = QueueStore(str(inst / "queue"))
    old = _queued_message(store, ["bob@virtual.test"], b"Subject: rejectme\n\nb\n")
    store.move(old, "incoming", "maildrop")
    logs = run(inst, clock=time.time)
    [(nid, qm, content)] = incoming(inst)
    assert qm.sender == "" and b"<bob@virtual.test>: rejected by hc" in content
    assert any(ln.endswith(f"sender non-delivery notification: {nid}") for ln in logs["bounce"].lines)
    assert os.listdir(inst / "queue" / "maildrop") == []


# ------------------------------------------------------------------ 3. flush and defer log

def test_postqueue_i_keeps_defer_log_for_the_qmgr(inst):
    """Postfix's flush(8) only moves the file to incoming/ with a fresh time stamp;
    the defer log is reset by the qmgr when the message becomes active (and the
    one delay warning stays sent: qmgr keeps that mark)."""
    store = QueueStore(str(inst / "queue"))
    qid = _queued_message(store, ["bob@virtual.test"], b"Subject: s\n\nb\n")
    store.move(qid, "incoming", "deferred")
    store.append_defer_log(qid, "bob@virtual.test", "4.4.1", "connect failed")
    store.set_next_attempt(qid, time.time() + 3600)
    assert postqueue.schedule(store, qid)      # postqueue -i's work (the flush service's)
    assert store.find(qid) == "incoming"
    assert [e["reason"] for e in store.read_defer_log(qid)] == ["connect failed"]
    assert os.stat(store.path("incoming", qid)).st_mtime <= time.time() + 1


# ------------------------------------------------------------------ 5. bounce templates

TEMPLATE_FILE = """\
failure_template = <<EOF
Charset: us-ascii
From: Custom Daemon <MAILER-DAEMON>
Subject: Custom failure subject
Postmaster-Subject: Custom pm subject

Custom failure text on $myhostname, limit $message_size_limit.
Days: $maximal_queue_lifetime_days
EOF

delay_template = <<EOF
Subject: Custom delay subject

Custom delay text, $delay_warning_time_minutes minutes.
EOF

success_template = <<EOF
Charset: iso-8859-1
Subject: Custom success

Delivered.
EOF
"""


def _notice(config, kind, **kw):
    action = {FAILURE: "failed", DELAY: "delayed", SUCCESS: "delivered"}[kind]
    return render_notice(config, kind=kind, queue_id="ABC", sender="alice@virtual.test",
                         arrival_time=NOW, now=NOW,
                         recipients=[DsnRecipient("bob@virtual.test", "5.0.0", "nope", action)],
                         original=lambda: [b"Subject: x\n\nbody\n"], **kw).decode()


def test_notices_use_bounce_template_file(inst):
    (inst / "etc" / "tpl.cf").write_text(TEMPLATE_FILE)
    add_main_cf(inst, f"bounce_template_file = {inst / 'etc' / 'tpl.cf'}\ndelay_warning_time = 1m\n")
    config = cfg(inst)
    # As Postfix 3.7 sent them (side by side): the From: label's bare address
    # qualified with $myorigin, the subject, the expanded text, then the reasons.
    text = _notice(config, FAILURE)
    assert "\nFrom: Custom Daemon <MAILER-DAEMON@example.test>\nSubject: Custom failure subject\n" in text
    assert ("Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\n\n"
            "Custom failure text on mx.example.test, limit 20000.\nDays: 5\n\n"
            "<bob@virtual.test>: nope\n") in text
    assert "Subject: Custom pm subject\n" in _notice(config, FAILURE, postmaster=True)
    text = _notice(config, DELAY)
    assert "\nFrom: Mail Delivery System <MAILER-DAEMON@example.test>\n" in text
    assert "Subject: Custom delay subject\n" in text
    assert "\n\nCustom delay text, 1 minutes.\n\n<bob@virtual.test>: nope\n" in text
    text = _notice(config, SUCCESS)
    assert "Subject: Custom success\n" in text and "charset=iso-8859-1" in text
    assert "\n\nDelivered.\n\n<bob@virtual.test>: nope\n" in text


def test_bad_template_file_falls_back_to_builtin(inst):
    add_main_cf(inst, f"bounce_template_file = {inst / 'etc' / 'missing.cf'}\n")
    warnings = []
    text = render_notice(cfg(inst), kind=FAILURE, queue_id="ABC", sender="a@x", arrival_time=NOW,
                         now=NOW, recipients=[DsnRecipient("b@y", "5.0.0", "nope")],
                         original=lambda: [b"S: x\n\n"], warn=warnings.append).decode()
    assert "Subject: Undelivered Mail Returned to Sender" in text
    assert "I'm sorry to have to inform you" in text
    assert warnings == [f"open {inst / 'etc' / 'missing.cf'}: No such file or directory "
                        "-- using the built-in templates"]


def test_pickup_bounce_uses_template(inst):
    (inst / "etc" / "tpl.cf").write_text(TEMPLATE_FILE)
    add_main_cf(inst, f"bounce_template_file = {inst / 'etc' / 'tpl.cf'}\n")
    drop(inst, b"Subject: rejectme\n\nx\n")
    run(inst)
    [(_nid, _qm, content)] = incoming(inst)
    assert b"Subject: Custom failure subject\n" in content
    assert b"\nCustom failure text on mx.example.test, limit 20000.\n" in content


def test_will_retry_until_day_is_space_padded(inst):
    # Postfix's mail_date(): "Fri,  4 Dec 2026" (seen in a 3.7 delay notice).
    from postwell.dsn.notice import mail_date
    when = time.mktime((2026, 12, 4, 18, 3, 0, 0, 0, -1))
    assert mail_date(when).startswith("Fri,  4 Dec 2026 18:03:00 ")


# ------------------------------------------------------------------ live instance

@pytest.mark.skipif(not harness.is_root(), reason="needs root (master drops to mail_owner)")
def test_live_requeue_through_pickup_applies_new_content_filter(tmp_path):
    """A running postwell: a deferred message requeued with postsuper -r comes
    back under a new queue id (pickup's ``orig_id=`` line) and goes to main.cf's
    content_filter, which the smtpd had turned off (Postfix 3.7 side by side: the
    requeued copy went to the filter, the old id was never seen again)."""
    relay, filt = harness.free_port(), harness.free_port()     # nothing listens on either
    # main.cf's content_filter applies to pickup; the smtpd turns it off (-o), so
    # only the requeued copy can reach the filter.
    inst = harness.PostwellInstance(tmp_path, main_cf={
        "relayhost": f"[127.0.0.1]:{relay}", "minimal_backoff_time": "1h",
        "maximal_backoff_time": "2h", "queue_run_delay": "1h",
        "content_filter": f"smtp:[127.0.0.1]:{filt}"})
    first, rest = inst.default_master_cf().split("\n", 1)
    (inst.config_dir / "master.cf").write_text(
        first + "\n  -o content_filter=\n" + rest
        + "pickup    unix  n       -       n       60      1       pickup\n"
        + "smtp      unix  -       -       n       -       -       smtp\n")
    with inst:
        replies = harness.dialogue(inst.port, ["EHLO client.test", "MAIL FROM:<s@remote.test>",
                                               "RCPT TO:<z@far.test>", "DATA", "Subject: rq", "",
                                               "hello", ".", "QUIT"], timeout=15)
        old = replies[-2].text.rsplit(" ", 1)[-1]
        inst.wait_log(rf"{old}: to=<z@far\.test>, relay=none, .*status=deferred "
                      rf"\(connect to 127\.0\.0\.1\[127\.0\.0\.1\]:{relay}: ", 30)
        harness.wait_for(lambda: os.path.exists(inst.queue_dir / "deferred" / old), 30)
        cp = inst.run("postsuper", "-r", old)
        assert (cp.returncode, cp.stderr) == (0, f"postsuper: {old}: requeued\n"
                                                 "postsuper: Requeued: 1 message\n")
        m = inst.wait_log(rf"postfix/pickup\[\d+\]: ([0-9A-F]+): uid=\d+ from=<s@remote\.test> "
                          rf"orig_id={old}$", 30)
        new = m.group(1)
        assert new != old
        inst.wait_log(rf"{new}: to=<z@far\.test>, relay=none, .*status=deferred "
                      rf"\(connect to 127\.0\.0\.1\[127\.0\.0\.1\]:{filt}: Connection refused\)", 30)
        assert not os.path.exists(inst.queue_dir / "deferred" / old)
        assert os.listdir(inst.queue_dir / "maildrop") == []


# ------------------------------------------------------------------ 6. sendmail

def _sendmail(inst, args, data: bytes):
    import subprocess
    cp = subprocess.run([sys.executable, "-m", "postwell.cli.sendmail", "-C", str(inst / "etc"), *args],
                        input=data, capture_output=True, timeout=60)
    return cp.returncode, cp.stdout, cp.stderr


def test_sendmail_bs_etrn_refused_as_postfix(inst):
    # Postfix 3.7's smtpd in "sendmail -bs" mode: syntax first, then 458 and a warning.
    rc, out, _err = _sendmail(inst, ["-bs"], b"HELO x\r\nETRN x\r\nETRN\r\nETRN a..b\r\n"
                                             b"MAIL FROM:<a@virtual.test>\r\nETRN x\r\nQUIT\r\n")
    assert rc == 0
    assert out.decode().splitlines()[1:] == [
        "250 mx.example.test", "458 Unable to queue messages", "500 Syntax: ETRN domain",
        "501 Error: invalid parameter syntax", "250 2.1.0 Ok",
        "503 Error: MAIL transaction in progress", "221 2.0.0 Bye"]
    assert 'warning: do not use ETRN in "sendmail -bs" mode' in (inst / "maillog").read_text()


def test_sendmail_leading_dash_recipient_is_accepted(inst):
    """Postfix 3.7's sendmail takes "-- -bad@x" (its qmgr/trivial-rewrite bounce it
    later with allow_min_user = no); only options before the first operand count."""
    rc, _out, err = _sendmail(inst, ["-f", "alice@virtual.test", "bob@virtual.test", "-bad@virtual.test"],
                              b"Subject: t\n\nx\n")
    assert (rc, err) == (0, b"")
    rc, _out, err = _sendmail(inst, ["-f", "alice@virtual.test", "--", "-bad@virtual.test"],
                              b"Subject: t\n\nx\n")
    assert (rc, err) == (0, b"")
    logs = run(inst, clock=time.time)
    assert [ln.split(": ", 1)[1] for ln in logs["pickup"].lines] == [
        f"uid={os.getuid()} from=<alice@virtual.test>"] * 2
    rcpts = sorted(r.address for _q, qm, _c in incoming(inst) for r in qm.recipients)
    assert rcpts == ["-bad@virtual.test", "-bad@virtual.test", "bob@virtual.test"]


def test_sendmail_too_big_prints_postdrop_warnings(inst):
    rc, _out, err = _sendmail(inst, ["-f", "s@x", "r@example.org"], b"x" * 100 + b"\n" + b"y" * 30000)
    assert rc == 75
    assert err == (f"postdrop: warning: uid={os.getuid()}: File too large\n"
                   "sendmail: warning: mail_stream_cleanup: close error\n"
                   f"sendmail: fatal: s@x({os.getuid()}): message file too big\n").encode()
    log = (inst / "maillog").read_text()
    assert "postfix/postdrop[" in log and "warning: mail_stream_cleanup: close error" in log


def test_pickup_logs_sender_in_external_form(inst):
    # Postfix 3.7: sendmail -f '"a b"@virtual.test' -> pickup's from=<"a b"@virtual.test>.
    rc, _out, err = _sendmail(inst, ["-f", '"a b"@virtual.test', "bob@virtual.test"], b"Subject: q\n\nx\n")
    assert (rc, err) == (0, b"")
    logs = run(inst, clock=time.time)
    assert logs["pickup"].lines[0].endswith(f': uid={os.getuid()} from=<"a b"@virtual.test>')
    [(_qid, qm, _c)] = incoming(inst)
    assert qm.sender == "a b@virtual.test"


def test_requeue_by_name_dates_the_file_now(inst, capsys):
    """Postfix's requeue_one() resets the file's time stamps (pickup's Received:
    shows the requeue time); "-r ALL" leaves them (a deferred file: its retry time)."""
    store = QueueStore(str(inst / "queue"))
    one = _queued_message(store, ["bob@virtual.test"], b"Subject: s\n\nb\n")
    every = _queued_message(store, ["bob@virtual.test"], b"Subject: t\n\nb\n")
    for qid in (one, every):
        store.move(qid, "incoming", "deferred")
        store.set_next_attempt(qid, NOW + 3600)
    assert postsuper.main(["-c", str(inst / "etc"), "-r", one]) == 0
    assert abs(os.stat(store.path("maildrop", one)).st_mtime - time.time()) < 60
    assert postsuper.main(["-c", str(inst / "etc"), "-r", "ALL"]) == 0
    assert os.stat(store.path("maildrop", every)).st_mtime == NOW + 3600
    capsys.readouterr()


def test_requeued_file_can_be_deleted_and_shown_by_id(inst, capsys):
    # Until pickup takes it, Postfix's postsuper -d ID maildrop and postcat -q ID
    # find a requeued file by its queue id.
    from postwell.cli import postcat
    store = QueueStore(str(inst / "queue"))
    qid = _queued_message(store, ["bob@virtual.test"], b"Subject: shown\n\nb\n")
    assert postsuper.main(["-c", str(inst / "etc"), "-r", qid]) == 0
    capsys.readouterr()
    assert postcat.main(["-c", str(inst / "etc"), "-q", qid]) == 0
    assert "Subject: shown" in capsys.readouterr().out
    assert postsuper.main(["-c", str(inst / "etc"), "-d", qid, "maildrop"]) == 0
    assert capsys.readouterr().err == f"postsuper: {qid}: removed\npostsuper: Deleted: 1 message\n"
    assert os.listdir(inst / "queue" / "maildrop") == []
