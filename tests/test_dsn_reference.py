"""Our notices against real Postfix 3.7 notices, part by part.

A reference Postfix relays to smtp-sink rejecting RCPT (hard errors), so it
bounces to a virtual mailbox; we render the same bounce from the same facts
(its queue id, arrival, reason as logged) and compare the structure: header
names and order, MIME parts, the notification text, every delivery-status
field.  Skipped when the reference cannot run (not root, not installed).
"""

import email
import email.policy
import re
import subprocess

import pytest

import harness
from postwell.config.main import Config
from postwell.dsn import FAILURE, DsnRecipient, render_notice

pytestmark = pytest.mark.skipif(harness.reference_available() is not None or
                                not __import__("os").path.exists(harness.SMTP_SINK),
                                reason="reference Postfix or smtp-sink unavailable")

# Fields the delivering side adds (not part of the notice itself).
DELIVERY_ADDED = {"Return-Path", "X-Original-To", "Delivered-To", "Received", "Message-Id"}
BODY = ("From: alice@virtual.test\r\nTo: u1@bad.test\r\nSubject: dsn compare\r\n"
        "Message-ID: <cmp1@client.test>\r\n\r\nhello body\r\n")


@pytest.fixture
def sink():
    port = harness.free_port()
    proc = subprocess.Popen([harness.SMTP_SINK, "-u", "postfix", "-f", "RCPT",
                             f"127.0.0.1:{port}", "10"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        harness.wait_port(port, 10)
        yield port
    finally:
        proc.kill()
        proc.wait(5)


def _names(msg):
    return [k for k, _ in msg.items()]


def test_bounce_matches_real_postfix(reference_factory, sink):
    ref = reference_factory({"transport_maps": "texthash:$config_directory/transport",
                             "notify_classes": "bounce, resource, software",
                             "bounce_notice_recipient": "carol@virtual.test"})
    (ref.config_dir / "transport").write_text(f"bad.test smtp:[127.0.0.1]:{sink}\n")
    ref.start()
    replies = harness.dialogue(ref.port, [
        "EHLO client.test", "MAIL FROM:<alice@virtual.test> RET=FULL ENVID=cmp-env",
        "RCPT TO:<u1@bad.test> NOTIFY=FAILURE ORCPT=rfc822;orig1@bad.test",
        "DATA", *BODY.split("\r\n")[:-1], ".", "QUIT"], timeout=10)
    assert [r.code for r in replies][:6] == [220, 250, 250, 250, 354, 250], replies
    [path] = ref.wait_maildir("alice", 1, timeout=30)
    theirs = email.message_from_bytes(path.read_bytes(), policy=email.policy.compat32)
    log = ref.log_text()
    m = re.search(r"(\w+): to=<u1@bad\.test>, orig_to=<orig1@bad\.test>.*status=bounced \((.*)\)$|"
                  r"(\w+): to=<u1@bad\.test>.*status=bounced \((.*)\)$", log, re.M)
    assert m, log[-2000:]
    qid, reason = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
    status = re.search(rf"{qid}: to=<u1@bad\.test>.*dsn=(\d\.\d+\.\d+)", log).group(1)
    boundary = theirs.get_boundary()
    when = int(boundary.split(".")[1].split("/")[0])
    theirs_report = theirs.get_payload()[1].get_payload()
    arrival = email.utils.parsedate_to_datetime(theirs_report[0]["Arrival-Date"]).timestamp()

    cfg = Config(str(ref.root), {"myhostname": harness.HOSTNAME, "mydomain": harness.DOMAIN,
                                 "myorigin": "$mydomain"}, {}, [])
    content = BODY.replace("\r\n", "\n").encode()
    data = render_notice(cfg, kind=FAILURE, queue_id=qid, sender="alice@virtual.test",
                         arrival_time=arrival, now=when, envid="cmp-env", ret="FULL",
                         recipients=[DsnRecipient("u1@bad.test", status, reason,
                                                  orcpt="rfc822;orig1@bad.test")],
                         original=lambda: iter([content]), content_size=len(content))
    ours = email.message_from_bytes(data, policy=email.policy.compat32)

    # Top-level headers: same names, same order, same values where deterministic.
    assert [n for n in _names(theirs) if n not in DELIVERY_ADDED] == _names(ours)
    for name in ("From", "Subject", "To", "Auto-Submitted", "MIME-Version",
                 "Content-Transfer-Encoding"):
        assert ours[name] == theirs[name], name
    _same_date(ours, theirs)
    assert ours.get_content_type() == theirs.get_content_type() == "multipart/report"
    assert ours.get_param("report-type") == theirs.get_param("report-type")
    assert ours.get_boundary() == boundary
    assert ours.preamble == theirs.preamble

    # The parts: types, descriptions, headers.
    op, tp = ours.get_payload(), theirs.get_payload()
    assert len(op) == len(tp) == 3
    for a, b in zip(op, tp):
        assert a.items() == b.items()
    # Notification text, line for line (template, wrapping, recipient line).
    assert op[0].get_payload() == tp[0].get_payload()
    # Delivery status: every block, every field, in order.
    ours_report = op[1].get_payload()
    assert len(ours_report) == len(theirs_report) == 2
    for a, b in zip(ours_report, theirs_report):
        assert a.items() == b.items()
    # The returned message: Postfix's copy also carries its own Received and
    # Return-Path; the original's own headers and body are the same.
    inner_o, inner_t = op[2].get_payload()[0], tp[2].get_payload()[0]
    for name in ("From", "To", "Subject", "Message-ID"):
        assert inner_o[name] == inner_t[name]
    assert inner_o.get_payload() == inner_t.get_payload()

    # The postmaster copy (notify_classes has "bounce"): headers only, no template text.
    [pm_path] = ref.wait_maildir("carol", 1, timeout=30)
    theirs_pm = email.message_from_bytes(pm_path.read_bytes(), policy=email.policy.compat32)
    assert theirs_pm["Return-Path"] == f"<double-bounce@{harness.HOSTNAME}>"
    data = render_notice(cfg, kind=FAILURE, queue_id=qid, sender="alice@virtual.test",
                         arrival_time=arrival, now=when, envid="cmp-env", ret="FULL",
                         recipients=[DsnRecipient("u1@bad.test", status, reason,
                                                  orcpt="rfc822;orig1@bad.test")],
                         original=lambda: iter([content]), content_size=len(content),
                         to="carol@virtual.test", postmaster=True, full=False)
    op, tp = _compare(email.message_from_bytes(data, policy=email.policy.compat32), theirs_pm)
    for part in (op[2].get_payload(), tp[2].get_payload()):
        assert "Subject: dsn compare" in part and "hello body" not in part


def _same_date(ours, theirs):
    # Our notice is dated by the reference's MIME boundary stamp; Postfix's own Date
    # header is written a moment later and may fall in the next second.
    shape = re.compile(r"\d\d:\d\d:\d\d ")
    assert shape.sub("T ", ours["Date"]) == shape.sub("T ", theirs["Date"]), "Date"
    ours_t = email.utils.parsedate_to_datetime(ours["Date"]).timestamp()
    assert 0 <= email.utils.parsedate_to_datetime(theirs["Date"]).timestamp() - ours_t <= 1, "Date"


def _compare(ours, theirs):
    assert [n for n in _names(theirs) if n not in DELIVERY_ADDED] == _names(ours)
    for name in ("From", "Subject", "To", "Auto-Submitted"):
        assert ours[name] == theirs[name], name
    _same_date(ours, theirs)
    op, tp = ours.get_payload(), theirs.get_payload()
    assert len(op) == len(tp) == 3
    for a, b in zip(op, tp):
        assert a.items() == b.items()
    assert op[0].get_payload() == tp[0].get_payload()
    for a, b in zip(op[1].get_payload(), tp[1].get_payload()):
        assert a.items() == b.items()
    return op, tp


def test_delay_and_success_notices_match_real_postfix(reference_factory):
    closed = harness.free_port()       # nothing listens: connection refused
    ref = reference_factory({"transport_maps": "texthash:$config_directory/transport",
                             "delay_warning_time": "1s", "maximal_queue_lifetime": "1d"})
    (ref.config_dir / "transport").write_text(f"closed.test smtp:[127.0.0.1]:{closed}\n")
    ref.start()
    for rcpt in ("RCPT TO:<u5@closed.test>", "RCPT TO:<bob@virtual.test> NOTIFY=SUCCESS"):
        replies = harness.dialogue(ref.port, [
            "EHLO client.test", "MAIL FROM:<alice@virtual.test>", rcpt,
            "DATA", *BODY.split("\r\n")[:-1], ".", "QUIT"], timeout=10)
        assert [r.code for r in replies][:6] == [220, 250, 250, 250, 354, 250], replies
    paths = ref.wait_maildir("alice", 2, timeout=40)
    got = {}
    for p in paths:
        m = email.message_from_bytes(p.read_bytes(), policy=email.policy.compat32)
        got[m["Subject"]] = m
    cfg = Config(str(ref.root), {"myhostname": harness.HOSTNAME, "mydomain": harness.DOMAIN,
                                 "myorigin": "$mydomain", "delay_warning_time": "1s",
                                 "maximal_queue_lifetime": "1d"}, {}, [])
    content = BODY.replace("\r\n", "\n").encode()
    log = ref.log_text()
    for subject, kind, rcpt, action in (
            ("Delayed Mail (still being retried)", "delay", "u5@closed.test", "delayed"),
            ("Successful Mail Delivery Report", "success", "bob@virtual.test", "delivered")):
        theirs = got[subject]
        blocks = theirs.get_payload()[1].get_payload()
        qid = blocks[0]["X-Postfix-Queue-ID"]
        arrival = email.utils.parsedate_to_datetime(blocks[0]["Arrival-Date"]).timestamp()
        line = re.search(rf"{qid}: to=<{re.escape(rcpt)}>, relay=(\S+), .*dsn=(\S+), "
                         rf"status=\w+ \((.*)\)$", log, re.M)
        relay, status, reason = line.groups()
        if kind == "success":
            reason = f"delivery via {relay}: {reason}"
        when = int(theirs.get_boundary().split(".")[1].split("/")[0])
        data = render_notice(cfg, kind=kind, queue_id=qid, sender="alice@virtual.test",
                             arrival_time=arrival, now=when, original=lambda: iter([content]),
                             content_size=len(content),
                             recipients=[DsnRecipient(rcpt, status, reason, action,
                                                      orcpt=f"rfc822;{rcpt}")])
        _compare(email.message_from_bytes(data, policy=email.policy.compat32), theirs)
