"""DSN rendering (RFC 3464 multipart/report): every notice kind parsed back
with Python's email package and checked field by field."""

import email
import email.utils
import email.policy

import pytest

from postwell.config.main import Config
from postwell.dsn import (
    DELAY, FAILURE, SUCCESS, DsnRecipient, diagnostic, double_bounce_address, is_double_bounce,
    render_notice, wants, wrap_line,
)

T0 = 1_800_000_000.0
ORIGINAL = (b"Received: from client.test\n\tby mx.demo.test with ESMTP id 4F1A;\n"
            b"From: alice@x.test\nTo: bob@y.test\nSubject: hello there\n"
            b"Message-ID: <m1@x.test>\n\nbody line 1\nbody line 2\n")
SMTP_REASON = ("host mx.far.test[192.0.2.7] said: 550 5.1.1 <u1@far.test>: Recipient address "
               "rejected: User unknown in virtual mailbox table (in reply to RCPT TO command)")


@pytest.fixture
def cfg(tmp_path):
    return Config(str(tmp_path), {"myhostname": "mx.demo.test", "mydomain": "demo.test",
                                  "myorigin": "$mydomain"}, {}, [])


def render(cfg, kind=FAILURE, rcpts=None, **kw):
    rcpts = rcpts or [DsnRecipient("u1@far.test", "5.1.1", SMTP_REASON, orcpt="rfc822;u1@far.test")]
    kw.setdefault("content_size", len(ORIGINAL))
    data = render_notice(cfg, kind=kind, queue_id="4F1A2B3C", sender="alice@x.test",
                         arrival_time=T0, recipients=rcpts, original=lambda: iter([ORIGINAL]),
                         now=T0 + 60, **kw)
    return data, email.message_from_bytes(data, policy=email.policy.compat32)


def parts(msg):
    assert msg.is_multipart()
    return msg.get_payload()


def test_failure_notice_headers_and_structure(cfg):
    data, msg = render(cfg, envid="env-1")
    assert data.endswith(b"--\n") and b"\r" not in data
    assert msg["From"] == "Mail Delivery System <MAILER-DAEMON@demo.test>"
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    assert msg["To"] == "alice@x.test"
    assert msg["Auto-Submitted"] == "auto-replied"           # RFC 3834
    assert msg["MIME-Version"] == "1.0"
    assert email.utils.parsedate_to_datetime(msg["Date"]).timestamp() == T0 + 60
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert msg.get_boundary() == f"4F1A2B3C.{int(T0 + 60)}/mx.demo.test"
    assert [k for k, _ in msg.items()] == ["Date", "From", "Subject", "To", "Auto-Submitted",
                                           "MIME-Version", "Content-Type",
                                           "Content-Transfer-Encoding"]
    text, report, original = parts(msg)
    assert text.get_content_type() == "text/plain" and text["Content-Description"] == "Notification"
    body = text.get_payload()
    assert body.startswith("This is the mail system at host mx.demo.test.\n\n"
                           "I'm sorry to have to inform you that your message could not\n")
    assert "                   The mail system\n\n<u1@far.test>: host mx.far.test[192.0.2.7] said:" in body
    assert all(len(line) <= 79 for line in body.splitlines())
    assert report.get_content_type() == "message/delivery-status"
    assert report["Content-Description"] == "Delivery report"
    per_msg, per_rcpt = report.get_payload()
    assert per_msg["Reporting-MTA"] == "dns; mx.demo.test"
    assert per_msg["Original-Envelope-Id"] == "env-1"
    assert per_msg["X-Postfix-Queue-ID"] == "4F1A2B3C"
    assert per_msg["X-Postfix-Sender"] == "rfc822; alice@x.test"
    assert email.utils.parsedate_to_datetime(per_msg["Arrival-Date"]).timestamp() == T0
    assert per_rcpt["Final-Recipient"] == "rfc822; u1@far.test"
    assert per_rcpt["Original-Recipient"] == "rfc822;u1@far.test"
    assert per_rcpt["Action"] == "failed" and per_rcpt["Status"] == "5.1.1"
    assert per_rcpt["Remote-MTA"] == "dns; mx.far.test"
    diag = " ".join(per_rcpt["Diagnostic-Code"].split())
    assert diag == ("smtp; 550 5.1.1 <u1@far.test>: Recipient address rejected: "
                    "User unknown in virtual mailbox table")
    assert per_rcpt["Will-Retry-Until"] is None
    # RET absent = FULL: the whole message as message/rfc822.
    assert original.get_content_type() == "message/rfc822"
    assert original["Content-Description"] == "Undelivered Message"
    inner = original.get_payload()[0]
    assert inner["Subject"] == "hello there" and inner.get_payload() == "body line 1\nbody line 2\n"


def test_ret_hdrs_returns_headers_only(cfg):
    data, msg = render(cfg, ret="HDRS")
    original = parts(msg)[2]
    assert original.get_content_type() == "text/rfc822-headers"
    assert original["Content-Description"] == "Undelivered Message Headers"
    assert b"Subject: hello there" in data and b"body line" not in data


def test_bounce_size_limit_returns_headers_only(cfg):
    cfg.params["bounce_size_limit"] = "100"
    data, msg = render(cfg, ret="FULL")
    assert parts(msg)[2].get_content_type() == "text/rfc822-headers"
    assert b"body line" not in data and b"Message-ID: <m1@x.test>" in data
    cfg.params["bounce_size_limit"] = str(len(ORIGINAL))     # exactly the limit: still whole
    data, msg = render(cfg, ret="FULL")
    assert parts(msg)[2].get_content_type() == "message/rfc822" and b"body line 2" in data


def test_local_reason_and_expansion(cfg):
    r = DsnRecipient("bob@v.test", "5.1.1", "user unknown", orig="info@v.test")
    data, msg = render(cfg, rcpts=[r, DsnRecipient("c@v.test", "5.2.2", "mailbox full")])
    body = parts(msg)[0].get_payload()
    assert "\n<bob@v.test> (expanded from <info@v.test>): user unknown\n\n<c@v.test>: mailbox full\n" in body
    blocks = parts(msg)[1].get_payload()
    assert len(blocks) == 3
    # No ORCPT: the original recipient in the form of the ORCPT Postfix's cleanup
    # records for it ("rfc822;addr", no blank; 3.7 side by side).
    assert blocks[1]["Original-Recipient"] == "rfc822;info@v.test"
    assert blocks[1]["Diagnostic-Code"] == "X-Postfix; user unknown"
    assert blocks[1]["Remote-MTA"] is None
    assert blocks[2]["Original-Recipient"] is None and blocks[2]["Status"] == "5.2.2"


def test_delay_warning(cfg):
    cfg.params["delay_warning_time"] = "4h"
    r = DsnRecipient("u@far.test", "4.4.1", "connect to mx.far.test[192.0.2.7]:25: Connection refused",
                     action="delayed")
    data, msg = render(cfg, kind=DELAY, rcpts=[r], ret="FULL")
    assert msg["Subject"] == "Delayed Mail (still being retried)"
    text, report, original = parts(msg)
    assert "# THIS IS A WARNING ONLY.  YOU DO NOT NEED TO RESEND YOUR MESSAGE. #" in text.get_payload()
    assert "for more than 4 hour(s).\nIt will be retried until it is 5 day(s) old." in text.get_payload()
    block = report.get_payload()[1]
    assert block["Action"] == "delayed" and block["Status"] == "4.4.1"
    assert email.utils.parsedate_to_datetime(block["Will-Retry-Until"]).timestamp() == T0 + 5 * 86400
    # Delay warnings never return the body, whatever RET says.
    assert original.get_content_type() == "text/rfc822-headers"
    assert original["Content-Description"] == "Undelivered Message Headers"


def test_success_report(cfg):
    r = DsnRecipient("bob@v.test", "2.0.0", "delivery via virtual: delivered to maildir",
                     action="delivered")
    data, msg = render(cfg, kind=SUCCESS, rcpts=[r])
    assert msg["Subject"] == "Successful Mail Delivery Report"
    text, report, original = parts(msg)
    assert "Your message was successfully delivered to the destination(s)" in text.get_payload()
    assert "<bob@v.test>: delivery via virtual: delivered to maildir" in text.get_payload()
    block = report.get_payload()[1]
    assert block["Action"] == "delivered" and block["Status"] == "2.0.0"
    assert original["Content-Description"] == "Message Headers"
    assert original.get_content_type() == "text/rfc822-headers"
    # RET=FULL changes nothing: Postfix 3.7 returns only the headers with a
    # success notice (checked side by side with sendmail -N success -R full).
    data, msg = render(cfg, kind=SUCCESS, rcpts=[r], ret="FULL")
    assert parts(msg)[2].get_content_type() == "text/rfc822-headers"
    assert parts(msg)[2]["Content-Description"] == "Message Headers"
    assert b"body line" not in data


def test_postmaster_copy(cfg):
    data, msg = render(cfg, to="postmaster", postmaster=True, full=False)
    assert msg["Subject"] == "Postmaster Copy: Undelivered Mail"
    assert msg["Auto-Submitted"] == "auto-generated"
    assert msg["To"] == "postmaster"
    text = parts(msg)[0].get_payload()
    assert text.startswith("\n<u1@far.test>:") and "mail system" not in text
    assert parts(msg)[2].get_content_type() == "text/rfc822-headers"


def test_null_sender_shown_as_mailer_daemon(cfg):
    data = render_notice(cfg, kind=FAILURE, queue_id="ABC123", sender="", arrival_time=T0,
                         recipients=[DsnRecipient("a@b.test", "5.0.0", "x")], to="postmaster",
                         original=lambda: iter([ORIGINAL]), postmaster=True, full=True, now=T0)
    assert b"X-Postfix-Sender: rfc822; MAILER-DAEMON@mx.demo.test\n" in data


def test_diagnostic_parsing():
    assert diagnostic(SMTP_REASON)[0] == "mx.far.test"
    assert diagnostic("host h.test[10.0.0.1]:2525 said: 554 5.7.1 no (in reply to end of DATA command)") \
        == ("h.test", "smtp; 554 5.7.1 no")
    assert diagnostic("host h.test[10.0.0.1] refused to talk to me: 554 go away") == \
        ("h.test", "smtp; 554 go away")
    # Success reports (facts from a real Postfix 3.7 "relayed" report).
    assert diagnostic("delivery via 127.0.0.1[127.0.0.1]:48827: 250 2.0.0 Ok") == \
        ("127.0.0.1", "smtp; 250 2.0.0 Ok")
    assert diagnostic("delivery via virtual: delivered to maildir") == \
        (None, "X-Postfix; delivery via virtual: delivered to maildir")
    assert diagnostic("connect to h[1.2.3.4]:25: Connection refused") == \
        (None, "X-Postfix; connect to h[1.2.3.4]:25: Connection refused")


def test_wrap_line_matches_postfix():
    # The shape of a real Postfix 3.7 bounce line.
    line = ("<u3@bad.test>: host 127.0.0.1[127.0.0.1] said: 500 5.3.0 Error: command failed "
            "(in reply to RCPT TO command)")
    assert wrap_line(line) == ["<u3@bad.test>: host 127.0.0.1[127.0.0.1] said: 500 5.3.0 Error: command failed",
                               "    (in reply to RCPT TO command)"]
    assert wrap_line("Diagnostic-Code: X-Postfix; connect to 127.0.0.1[127.0.0.1]:43769: Connection refused") == \
        ["Diagnostic-Code: X-Postfix; connect to 127.0.0.1[127.0.0.1]:43769: Connection", "    refused"]
    long_word = "x" * 120
    assert wrap_line(f"a {long_word} b") == ["a", f"    {long_word}", "    b"]
    assert all(len(l) <= 79 for l in wrap_line(" ".join(["word"] * 60)))


@pytest.mark.parametrize("notify,failure,delay,success", [
    (None, True, True, False),
    ("NEVER", False, False, False),
    ("SUCCESS", False, False, True),
    ("FAILURE", True, False, False),
    ("DELAY", False, True, False),
    ("SUCCESS,FAILURE", True, False, True),
    ("success, delay", False, True, True),
])
def test_notify_variants(notify, failure, delay, success):
    assert wants(notify, "FAILURE") is failure
    assert wants(notify, "DELAY") is delay
    assert wants(notify, "SUCCESS") is success


def test_double_bounce_address(cfg):
    assert double_bounce_address(cfg) == "double-bounce@mx.demo.test"
    assert is_double_bounce(cfg, "double-bounce@mx.demo.test")
    assert is_double_bounce(cfg, "Double-Bounce@demo.test")
    assert not is_double_bounce(cfg, "") and not is_double_bounce(cfg, "alice@x.test")


def test_relayed_report_and_several_recipients_as_postfix_writes_them(cfg):
    """Texts of a real Postfix 3.7 success report and a three-recipient bounce."""
    relayed = DsnRecipient("p1@plain.test", "2.0.0", "delivery via 127.0.0.1[127.0.0.1]:48827: 250 2.0.0 Ok",
                           action="relayed", orcpt="rfc822;p1@plain.test")
    data, msg = render(cfg, kind=SUCCESS, rcpts=[relayed])
    assert "\n<p1@plain.test>: delivery via 127.0.0.1[127.0.0.1]:48827: 250 2.0.0 Ok\n" in \
        parts(msg)[0].get_payload()
    assert (b"Final-Recipient: rfc822; p1@plain.test\nOriginal-Recipient: rfc822;p1@plain.test\n"
            b"Action: relayed\nStatus: 2.0.0\nRemote-MTA: dns; 127.0.0.1\n"
            b"Diagnostic-Code: smtp; 250 2.0.0 Ok\n") in data
    said = "host 127.0.0.1[127.0.0.1] said: 500 5.3.0 Error: command failed (in reply to RCPT TO command)"
    rcpts = [DsnRecipient("x1@err.test", "5.1.1", "no such user here", orig="info@virtual.test",
                          orcpt="rfc822;info@virtual.test"),
             DsnRecipient("u1@bad.test", "5.3.0", said, orcpt="rfc822;u1@bad.test"),
             DsnRecipient("u2@bad.test", "5.3.0", said, orcpt="rfc822;u2@bad.test")]
    data, msg = render(cfg, rcpts=rcpts)
    assert parts(msg)[0].get_payload().endswith(
        "                   The mail system\n\n"
        "<x1@err.test> (expanded from <info@virtual.test>): no such user here\n\n"
        "<u1@bad.test>: host 127.0.0.1[127.0.0.1] said: 500 5.3.0 Error: command failed\n"
        "    (in reply to RCPT TO command)\n\n"
        "<u2@bad.test>: host 127.0.0.1[127.0.0.1] said: 500 5.3.0 Error: command failed\n"
        "    (in reply to RCPT TO command)\n")
    assert (b"\n\nFinal-Recipient: rfc822; x1@err.test\nOriginal-Recipient: rfc822;info@virtual.test\n"
            b"Action: failed\nStatus: 5.1.1\nDiagnostic-Code: X-Postfix; no such user here\n\n"
            b"Final-Recipient: rfc822; u1@bad.test\n") in data
