"""End to end, on both MTAs: a message relayed to smtp-sink that refuses the
recipient (5xx) bounces; the notice reaches the sender's virtual mailbox with
the same structure and the same log trail (sender non-delivery notification).
"""

from __future__ import annotations

import email
import email.policy
import os
import re
import subprocess

import pytest

import harness

BODY = ["From: alice@virtual.test", "To: u1@bad.test", "Subject: e2e bounce", "", "hello"]


@pytest.fixture
def sink():
    if not os.path.exists(harness.SMTP_SINK) or not harness.is_root():
        pytest.skip("smtp-sink needs root and the Postfix package")
    port = harness.free_port()
    proc = subprocess.Popen([harness.SMTP_SINK, "-u", "postfix", "-f", "RCPT", f"127.0.0.1:{port}", "10"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        harness.wait_port(port, 10)
        yield port
    finally:
        proc.kill()
        proc.wait(5)


@pytest.fixture(params=["postwell", "postfix"])
def mta(request, tmp_path, sink):
    extra = {"transport_maps": "texthash:$config_directory/transport"}
    if request.param == "postfix":
        if harness.reference_available():
            pytest.skip(harness.reference_available())
        inst = harness.ReferencePostfix(tmp_path, extra)
    else:
        inst = harness.PostwellInstance(tmp_path, extra, master_cf=None)
        inst.master_cf = harness.PostwellInstance.default_master_cf(inst) + \
            "smtp      unix  -       -       n       -       -       smtp\n"
        inst.write_config()
    (inst.config_dir / "transport").write_text(f"bad.test smtp:[127.0.0.1]:{sink}\n")
    try:
        inst.start()
        yield inst
    finally:
        inst.stop()
        inst.cleanup()


def test_bounce_reaches_sender(mta):
    replies = harness.dialogue(mta.port, [
        "EHLO client.test", "MAIL FROM:<alice@virtual.test> ENVID=e2e-1",
        "RCPT TO:<u1@bad.test> NOTIFY=FAILURE", "DATA", *BODY, ".", "QUIT"], timeout=10)
    assert [r.code for r in replies][:6] == [220, 250, 250, 250, 354, 250], replies
    qid = re.search(r"queued as (\w+)", replies[5].text).group(1)
    [path] = mta.wait_maildir("alice", 1, timeout=40)
    m = mta.wait_log(rf"postfix/bounce\[\d+\]: {qid}: sender non-delivery notification: (\w+)$", 10)
    notice_id = m.group(1)
    mta.wait_log(rf": {notice_id}: removed$", 20)
    log = mta.log_text()
    assert re.search(rf"{qid}: to=<u1@bad\.test>, relay=127\.0\.0\.1\[127\.0\.0\.1\]:\d+, .*"
                     r"dsn=5\.\d\.\d, status=bounced \(host 127\.0\.0\.1\[127\.0\.0\.1\] said: 5", log)
    assert re.search(rf"{notice_id}: from=<>, size=\d+, nrcpt=1 \(queue active\)$", log, re.M)
    mid = re.search(rf"{notice_id}: message-id=(<\d{{14}}\.{notice_id}@{re.escape(harness.HOSTNAME)}>)$",
                    log, re.M)
    assert mid, log[-3000:]
    msg = email.message_from_bytes(path.read_bytes(), policy=email.policy.compat32)
    assert msg["Return-Path"] == "<>"
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    assert msg["From"] == f"Mail Delivery System <MAILER-DAEMON@{harness.DOMAIN}>"
    assert msg["To"] == "alice@virtual.test" and msg["Auto-Submitted"] == "auto-replied"
    assert msg["Message-Id"] == mid.group(1)
    text, report, original = msg.get_payload()
    per_msg, rcpt = report.get_payload()
    assert per_msg["Original-Envelope-Id"] == "e2e-1" and per_msg["X-Postfix-Queue-ID"] == qid
    assert rcpt["Action"] == "failed" and rcpt["Remote-MTA"] == "dns; 127.0.0.1"
    assert rcpt["Diagnostic-Code"].startswith("smtp; 5")
    assert rcpt["Final-Recipient"] == "rfc822; u1@bad.test"
    assert original.get_content_type() == "message/rfc822"
    assert original.get_payload()[0]["Subject"] == "e2e bounce"


@pytest.fixture(params=["postwell", "postfix"])
def delaying_mta(request, tmp_path):
    closed = harness.free_port()       # nothing listens there: every attempt is deferred
    extra = {"transport_maps": "texthash:$config_directory/transport",
             "delay_warning_time": "1s"}
    if request.param == "postfix":
        if harness.reference_available():
            pytest.skip(harness.reference_available())
        inst = harness.ReferencePostfix(tmp_path, extra)
    else:
        inst = harness.PostwellInstance(tmp_path, extra)
        inst.master_cf = inst.default_master_cf() + \
            "smtp      unix  -       -       n       -       -       smtp\n"
        inst.write_config()
    (inst.config_dir / "transport").write_text(f"closed.test smtp:[127.0.0.1]:{closed}\n")
    try:
        inst.start()
        yield inst
    finally:
        inst.stop()
        inst.cleanup()


def test_one_delay_warning(delaying_mta):
    mta = delaying_mta
    replies = harness.dialogue(mta.port, [
        "EHLO client.test", "MAIL FROM:<alice@virtual.test>", "RCPT TO:<u5@closed.test>",
        "DATA", *BODY, ".", "QUIT"], timeout=10)
    qid = re.search(r"queued as (\w+)", replies[5].text).group(1)
    [path] = mta.wait_maildir("alice", 1, timeout=40)
    mta.wait_log(rf"postfix/bounce\[\d+\]: {qid}: sender delay notification: \w+$", 10)
    # Another deferral (minimal_backoff_time is 5s here): still one warning.
    mta.wait_log(rf"(?s)(?:{qid}: to=<u5@closed\.test>.*status=deferred.*){{2}}", 30)
    assert mta.log_text().count(f"{qid}: sender delay notification") == 1
    assert len(mta.maildir_messages("alice")) == 1
    msg = email.message_from_bytes(path.read_bytes(), policy=email.policy.compat32)
    assert msg["Subject"] == "Delayed Mail (still being retried)"
    rcpt = msg.get_payload()[1].get_payload()[1]
    assert rcpt["Action"] == "delayed" and rcpt["Status"].startswith("4.")
    assert rcpt["Will-Retry-Until"]
    assert msg.get_payload()[2].get_content_type() == "text/rfc822-headers"
