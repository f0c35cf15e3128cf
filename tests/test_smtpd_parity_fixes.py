"""smtpd behaviours found by the side-by-side sweeps against Postfix 3.7
(tests/test_parity_dialogues3.py, tests/test_xclient.py), pinned without the reference:

- any 421 or 521 reply ends the session (Postfix's hang-up flag), logged only as
  "disconnect from";
- an smtpd_end_of_data_restrictions reject keeps the envelope until RSET/HELO/EHLO;
- the client restrictions that run again after XCLIENT say "XCLIENT from";
- XCLIENT works before STARTTLS when TLS is required;
- a half-applied XCLIENT leaves the client's name[addr] in replies and logs as it was;
- a session with an error of a class in notify_classes is mailed to the postmaster
  (Postfix's smtpd_chat_notify transcript).
"""

from __future__ import annotations

import socket

import pytest

from postwell.policy.state import SessionState
from postwell.smtp.reply import Reply
from postwell.smtp.server import (ConnectionClosed, DataEnd, Ehlo, Mail, Rcpt, ServerConfig,
                                  ServerConnection)

from test_smtp_engine import Driver
from test_smtpd import WAIT, smtpd  # noqa: F401  (the fixture)

CFG = ServerConfig(hostname="mx.example.com")
MESSAGE = b"DATA\r\n", b"Subject: t\r\n\r\nhello\r\n.\r\n"


class Talk:
    """A loopback SMTP client that reads exactly one reply per command (bounded waits)."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
        self.sock.settimeout(WAIT)
        self.buf = b""
        self.greeting = self.reply()

    def reply(self) -> str:
        lines = []
        while True:
            while b"\r\n" not in self.buf:
                data = self.sock.recv(4096)
                if not data:
                    raise EOFError(b"".join(lines) + self.buf)
                self.buf += data
            line, self.buf = self.buf.split(b"\r\n", 1)
            lines.append(line)
            if line[3:4] != b"-":
                return b"\n".join(lines).decode()

    def cmd(self, *chunks: bytes) -> str:
        for c in chunks:
            self.sock.sendall(c if c.endswith(b"\n") else c + b"\r\n")
        return self.reply()

    def at_eof(self) -> bool:
        """True when the server closed the connection (before WAIT runs out)."""
        return self.buf == b"" and self.sock.recv(4096) == b""

    def close(self):
        self.sock.close()


def _reply_to(code_text: str):
    code, rest = code_text.split(" ", 1)
    enh, text = rest.split(" ", 1)
    return Reply(int(code), text, enh)


# ---------------------------------------------------------------- 1. 421/521 hang up

def test_engine_hangs_up_after_421_to_rcpt_without_reading_on():
    d = Driver(CFG, replies={Rcpt: _reply_to("421 4.7.0 closing now")})
    out = d.feed(b"EHLO c\r\nMAIL FROM:<a@b.example>\r\n")
    assert out.endswith("250 2.1.0 Ok\r\n")
    # Pipelined commands after the refused RCPT are never looked at.
    out = d.feed(b"RCPT TO:<x@y.example>\r\nNOOP\r\nQUIT\r\n")
    assert out == "421 4.7.0 closing now\r\n"
    assert d.events[-1] == ConnectionClosed("hangup")
    assert d.conn.closed
    assert d.conn.counters_text() == "ehlo=1 mail=1 rcpt=0/1 commands=2/3"


def test_engine_hangs_up_after_521_and_after_421_to_other_commands():
    d = Driver(CFG, replies={Mail: _reply_to("521 5.7.1 go away")})
    assert d.feed(b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nQUIT\r\n").endswith(
        "521 5.7.1 go away\r\n")
    assert d.events[-1] == ConnectionClosed("hangup")
    d = Driver(CFG, replies={Ehlo: _reply_to("421 4.7.0 helo later")})
    assert d.feed(b"EHLO c\r\n") == "421 4.7.0 helo later\r\n"
    assert d.events[-1] == ConnectionClosed("hangup")
    d = Driver(CFG, replies={DataEnd: _reply_to("421 4.7.0 eod later")})
    out = d.feed(b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<x@y.example>\r\n", *MESSAGE)
    assert out.endswith("421 4.7.0 eod later\r\n")
    assert d.events[-1] == ConnectionClosed("hangup")
    # Other codes go on as before.
    d = Driver(CFG, replies={Rcpt: _reply_to("450 4.7.1 later")})
    d.feed(b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<x@y.example>\r\n")
    assert not d.conn.closed
    assert d.feed(b"NOOP\r\n") == "250 2.0.0 Ok\r\n"


def test_engine_hangs_up_after_refusing_421_greeting_of_denied_client():
    # smtpd_delay_reject = no: the connect-level reject is the greeting; a 421 one
    # also ends the session (a 554 one leaves only QUIT working).
    conn = ServerConnection(CFG, client="unknown[192.0.2.1]")
    conn.deny_access()
    conn.send_greeting(_reply_to("421 4.7.0 client go away"))
    conn.receive_data(b"EHLO c\r\n")
    assert conn.next_event() == ConnectionClosed("hangup")
    assert conn.data_to_send() == b"421 4.7.0 client go away\r\n"
    conn = ServerConnection(CFG, client="unknown[192.0.2.1]")
    conn.deny_access()
    conn.send_greeting(_reply_to("554 5.7.1 no"))
    conn.receive_data(b"EHLO c\r\n")
    assert conn.next_event() is not None and not conn.closed


def test_smtpd_logs_only_disconnect_after_421(smtpd):  # noqa: F811
    r = smtpd({"smtpd_recipient_restrictions":
               "check_recipient_access inline:{{c421@example.test=421 closing now}}, permit"})
    t = Talk(r.port)
    try:
        t.cmd(b"EHLO c")
        t.cmd(b"MAIL FROM:<a@b.example>")
        assert t.cmd(b"RCPT TO:<c421@example.test>") == \
            "421 4.7.1 <c421@example.test>: Recipient address rejected: closing now"
        assert t.at_eof()
    finally:
        t.close()
    line = r.wait_log(r"^disconnect from ")
    assert line == "disconnect from unknown[127.0.0.1] ehlo=1 mail=1 rcpt=0/1 commands=2/3"
    assert not [ln for ln in r.lines() if ln.startswith("lost connection")]
    assert not r.queued()


# ---------------------------------------------------------------- 2. end-of-data reject

def test_engine_reject_keeping_transaction_keeps_the_envelope():
    d = Driver(CFG)
    d.feed(b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<x@y.example>\r\n", MESSAGE[0])
    d.conn.receive_data(MESSAGE[1])
    ev = d.conn.next_event()
    while not isinstance(ev, DataEnd):
        ev = d.conn.next_event()
    d.conn.reject_keeping_transaction(_reply_to("554 5.7.1 at eod"))
    assert d.conn.sender == "a@b.example" and d.conn.recipients == ["x@y.example"]
    assert d.conn.data_to_send() == b"554 5.7.1 at eod\r\n"
    assert d.feed(b"MAIL FROM:<c@d.example>\r\n") == "503 5.5.1 Error: nested MAIL command\r\n"
    assert d.feed(b"RCPT TO:<z@y.example>\r\n") == "250 2.1.5 Ok\r\n"
    assert d.conn.recipients == ["x@y.example", "z@y.example"]
    assert d.feed(b"RSET\r\nMAIL FROM:<c@d.example>\r\n") == "250 2.0.0 Ok\r\n250 2.1.0 Ok\r\n"
    assert d.conn.recipients == []


def test_engine_reject_keeping_transaction_needs_a_data_end():
    d = Driver(CFG, replies={Mail: None})
    with pytest.raises(RuntimeError):
        d.conn.reject_keeping_transaction(_reply_to("554 5.7.1 x"))


EOD = {"smtpd_end_of_data_restrictions":
       "check_sender_access inline:{{eod-rej@b.example=REJECT at eod}, "
       "{eod-450@b.example=450 4.7.1 eod later}}",
       "smtpd_recipient_restrictions": "permit"}


def test_smtpd_end_of_data_reject_keeps_transaction_as_postfix(smtpd):  # noqa: F811
    # Checked against Postfix 3.7: the envelope stays (MAIL is "nested"), the queue
    # file goes, a later RCPT opens a new one; RSET ends it all.
    r = smtpd(EOD)
    t = Talk(r.port)
    try:
        t.cmd(b"EHLO c")
        t.cmd(b"MAIL FROM:<eod-rej@b.example>")
        t.cmd(b"RCPT TO:<x@example.test>")
        assert t.cmd(*MESSAGE).startswith("354")
        assert t.reply() == "554 5.7.1 <eod-rej@b.example>: Sender address rejected: at eod"
        assert t.cmd(b"MAIL FROM:<a@b.example>") == "503 5.5.1 Error: nested MAIL command"
        assert t.cmd(b"XFORWARD NAME=x") == "503 5.5.1 Error: MAIL transaction in progress"
        assert t.cmd(b"RCPT TO:<y@example.test>") == "250 2.1.5 Ok"
        assert t.cmd(*MESSAGE).startswith("354")
        assert t.reply() == "554 5.7.1 <eod-rej@b.example>: Sender address rejected: at eod"
        assert t.cmd(b"RSET") == "250 2.0.0 Ok"
        assert t.cmd(b"MAIL FROM:<a@b.example>") == "250 2.1.0 Ok"
        assert t.cmd(b"QUIT").startswith("221")
    finally:
        t.close()
    r.wait_log(r"^disconnect from ")
    lines = r.lines()
    clients = [ln.split(":")[0] for ln in lines if ": client=" in ln]
    rejects = [ln for ln in lines if "reject: END-OF-MESSAGE" in ln]
    assert len(clients) == 2 and clients[0] != clients[1]
    # With two recipients the second reject names none (Postfix: rcpt_count > 1).
    assert rejects[0].startswith(f"{clients[0]}: reject: END-OF-MESSAGE from unknown[127.0.0.1]")
    assert "to=<x@example.test>" in rejects[0]
    assert rejects[1].startswith(f"{clients[1]}: ") and "to=<" not in rejects[1]
    assert lines[-1] == ("disconnect from unknown[127.0.0.1] ehlo=1 xforward=0/1 mail=2/3 "
                         "rcpt=2 data=0/2 rset=1 quit=1 commands=7/11")
    assert not r.queued()


def test_smtpd_end_of_data_defer_keeps_transaction_and_old_queue_id(smtpd):  # noqa: F811
    r = smtpd({**EOD, "smtpd_recipient_restrictions":
               "check_recipient_access inline:{{rej@example.test=REJECT}}, permit"})
    t = Talk(r.port)
    try:
        t.cmd(b"EHLO c")
        t.cmd(b"MAIL FROM:<eod-450@b.example>")
        t.cmd(b"RCPT TO:<x@example.test>")
        t.cmd(*MESSAGE)
        assert t.reply() == "450 4.7.1 <eod-450@b.example>: Sender address rejected: eod later"
        # Until a new RCPT opens a queue file, log lines name the old queue id (3.7).
        assert t.cmd(b"RCPT TO:<rej@example.test>").startswith("554 5.7.1")
        # DATA without a queue file: Postfix 3.7's smtpd crashes; postwell answers 451.
        assert t.cmd(b"DATA") == "451 4.3.0 Error: queue file write error"
        assert t.cmd(b"EHLO c").startswith("250-")
        assert t.cmd(b"MAIL FROM:<a@b.example>") == "250 2.1.0 Ok"
        t.cmd(b"QUIT")
    finally:
        t.close()
    r.wait_log(r"^disconnect from ")
    lines = r.lines()
    qid = [ln for ln in lines if ": client=" in ln][0].split(":")[0]
    assert [ln for ln in lines if "reject: RCPT" in ln][0].startswith(f"{qid}: reject: RCPT")


# ---------------------------------------------------------------- 3. XCLIENT reruns client checks

def test_smtpd_client_checks_after_xclient_say_xclient(smtpd):  # noqa: F811
    r = smtpd({"smtpd_delay_reject": "no", "smtpd_authorized_xclient_hosts": "127.0.0.0/8",
               "smtpd_client_restrictions":
               "check_client_access inline:{{192.0.2.9=WARN client watch}}"})
    t = Talk(r.port)
    try:
        t.cmd(b"EHLO c")
        assert t.cmd(b"XCLIENT ADDR=192.0.2.9").startswith("220 ")
        t.cmd(b"QUIT")
    finally:
        t.close()
    r.wait_log(r"^disconnect from ")
    assert "NOQUEUE: warn: XCLIENT from unknown[192.0.2.9]: client watch; proto=SMTP" \
        in r.lines()


# ---------------------------------------------------------------- 4. XCLIENT before STARTTLS

def test_engine_takes_xclient_before_starttls_when_tls_is_required():
    cfg = ServerConfig(hostname="h", starttls_offered=True, tls_required=True)
    d = Driver(cfg)
    d.feed(b"EHLO x\r\n")
    # Not authorized here: Postfix's 550, not the 530 of the commands that need TLS.
    assert d.feed(b"XCLIENT NAME=a.example\r\n") == \
        "550 5.7.0 Error: insufficient authorization\r\n"
    assert d.feed(b"MAIL FROM:<a@b>\r\n") == "530 5.7.0 Must issue a STARTTLS command first\r\n"
    d = Driver(cfg)
    d.conn.xclient_allowed = True
    d.feed(b"EHLO x\r\n")
    assert d.feed(b"XCLIENT NAME=a.example\r\n").startswith("220 ")


# ---------------------------------------------------------------- 5. name[addr] after XCLIENT

def test_state_shows_pinned_namaddr():
    st = SessionState(client_name="unknown", client_addr="127.0.0.1")
    assert st.namaddr == "unknown[127.0.0.1]"
    st.shown_namaddr = st.namaddr
    st.client_name, st.client_addr = "a.example", "192.0.2.50"
    assert st.namaddr == "unknown[127.0.0.1]"
    st.shown_namaddr = None
    assert st.namaddr == "a.example[192.0.2.50]"


def test_smtpd_half_applied_xclient_keeps_old_namaddr(smtpd):  # noqa: F811
    # Checked against Postfix 3.7 (test_xclient.py partial_addr): NAME and ADDR are
    # applied, PORT fails; the relay check sees the new address, the log the old name.
    r = smtpd({"smtpd_authorized_xclient_hosts": "127.0.0.0/8", "mynetworks": "127.0.0.0/8"})
    t = Talk(r.port)
    try:
        t.cmd(b"EHLO client.example.org")
        assert t.cmd(b"XCLIENT NAME=a.example ADDR=192.0.2.50 PORT=x") == \
            "501 5.5.4 Bad PORT syntax: x"
        t.cmd(b"MAIL FROM:<sender@example.org>")
        assert t.cmd(b"RCPT TO:<x@far.example>") == "454 4.7.1 <x@far.example>: Relay access denied"
        # A complete command renames the client.
        assert t.cmd(b"XCLIENT PORT=25").startswith("503 ")    # transaction in progress
        t.cmd(b"RSET")
        assert t.cmd(b"XCLIENT PORT=25").startswith("220 ")
        t.cmd(b"EHLO client.example.org")
        t.cmd(b"MAIL FROM:<sender@example.org>")
        t.cmd(b"RCPT TO:<x@far.example>")
        t.cmd(b"QUIT")
    finally:
        t.close()
    r.wait_log(r"^disconnect from ")
    rejects = [ln for ln in r.lines() if "reject: RCPT" in ln]
    assert rejects[0].startswith("NOQUEUE: reject: RCPT from unknown[127.0.0.1]: 454 4.7.1")
    assert rejects[1].startswith("NOQUEUE: reject: RCPT from a.example[192.0.2.50]: 454 4.7.1")
    assert r.lines()[-1].startswith("disconnect from a.example[192.0.2.50] ")


# ---------------------------------------------------------------- 6. notify_classes notice

def test_wrap_transcript_line_as_postfix_line_wrap():
    from postwell.smtpd.server import wrap_transcript_line as wrap
    assert wrap("Out: 250 2.0.0 Ok") == ["Out: 250 2.0.0 Ok"]
    words = "In:  RCPT TO:<" + "a" * 51 + "@example.com> NOTIFY=NEVER " + "c " * 40
    out = wrap(words)
    assert out[0] == "In:  RCPT TO:<" + "a" * 51 + "@example.com>"      # 78 characters
    assert wrap("In:  RCPT TO:<" + "a" * 52 + "@example.com>") == [
        "In:  RCPT", "    TO:<" + "a" * 52 + "@example.com>"]
    assert all(ln.startswith("    ") and len(ln) <= 78 for ln in out[1:])
    assert " ".join(ln.strip() for ln in out).split() == words.split()
    assert wrap("x" * 100 + " y") == ["x" * 100, "    y"]     # a long word stays whole


def test_engine_keeps_transcript_only_when_asked():
    d = Driver(CFG)
    d.feed(b"EHLO c\r\nNOOP\r\n")
    assert d.conn.transcript is None
    d = Driver(ServerConfig(hostname="mx.example.com", junk_command_limit=10 ** 6))
    d.conn.transcript = []
    d.feed(b"HELO c\r\nBOGUS x\r\n")
    assert d.conn.transcript == ["HELO c", b"250 mx.example.com\r\n", "BOGUS x",
                                 b"500 5.5.2 Error: command not recognized\r\n"]
    from postwell.smtp.server import TRANSCRIPT_LIMIT
    d.feed(b"NOOP\r\n" * TRANSCRIPT_LIMIT)
    assert len(d.conn.transcript) == TRANSCRIPT_LIMIT           # bounded


NOTICE = {"smtpd_recipient_restrictions":
          "check_recipient_access inline:{{unk@example.test=FROBNICATE}}, permit"}


def test_smtpd_mails_transcript_to_postmaster_after_software_error(smtpd):  # noqa: F811
    r = smtpd(NOTICE)          # notify_classes: the default "resource, software"
    t = Talk(r.port)
    try:
        t.cmd(b"EHLO c")
        t.cmd(b"MAIL FROM:<a@b.example>")
        assert t.cmd(b"RCPT TO:<unk@example.test>") == "451 4.3.5 Server configuration error"
        t.cmd(b"QUIT")
    finally:
        t.close()
    r.wait_log(r"^disconnect from ")
    lines = r.lines()
    # Queued (cleanup's message-id line) before the session's disconnect line.
    notice_at = next(i for i, ln in enumerate(lines) if ": message-id=<" in ln)
    assert lines[notice_at + 1].startswith("disconnect from ")
    [qid] = r.queued()
    qm = r.store.open(qid)
    assert qm.sender == "double-bounce@mx.example.test"
    assert [rc.address if hasattr(rc, "address") else rc for rc in qm.recipients][0] \
        .startswith("postmaster")
    text = b"".join(qm.iter_content()).decode()
    assert "Subject: postwell SMTP server: errors from unknown[127.0.0.1]\n" in text
    assert "From: Mail Delivery System <MAILER-DAEMON@mx.example.test>\n" in text
    body = text.split("\n\n", 1)[1]
    assert body.startswith("Transcript of session follows.\n\n Out: 220 ")
    assert (" In:  EHLO c\n Out: 250-mx.example.test\n" in body)
    assert (" In:  RCPT TO:<unk@example.test>\n Out: 451 4.3.5 Server configuration error\n"
            " In:  QUIT\n Out: 221 2.0.0 Bye\n\n\nFor other details, see the local mail "
            "logfile\n") in body


def test_smtpd_sends_no_notice_without_matching_class(smtpd):  # noqa: F811
    for extra in ({"notify_classes": ""}, {"notify_classes": "policy"}):
        r = smtpd({**NOTICE, **extra})
        t = Talk(r.port)
        try:
            t.cmd(b"EHLO c")
            t.cmd(b"MAIL FROM:<a@b.example>")
            assert t.cmd(b"RCPT TO:<unk@example.test>").startswith("451 4.3.5")
            t.cmd(b"QUIT")
        finally:
            t.close()
        r.wait_log(r"^disconnect from ")
        assert not r.queued()
        assert not [ln for ln in r.lines() if "message-id=" in ln]


def test_smtpd_notice_names_abort_reason_when_client_vanishes(smtpd):  # noqa: F811
    r = smtpd(NOTICE)
    t = Talk(r.port)
    try:
        t.cmd(b"EHLO c")
        t.cmd(b"MAIL FROM:<a@b.example>")
        t.cmd(b"RCPT TO:<unk@example.test>")
    finally:
        t.close()
    r.wait_log(r"^disconnect from ")
    [qid] = r.queued()
    text = b"".join(r.store.open(qid).iter_content()).decode()
    assert text.endswith("\nSession aborted, reason: lost connection\n\n"
                         "For other details, see the local mail logfile\n")
