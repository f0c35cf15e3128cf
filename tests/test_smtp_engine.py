"""The sans-IO SMTP server engine.  Reply texts were checked against Postfix 3.7."""

from __future__ import annotations

import pytest

from postwell.smtp.reply import Reply
from postwell.smtp.server import (NEED_DATA, PAUSED, Auth, AuthAborted, AuthResponse, Bdat, BdatChunkEnd,
                                  ConnectionClosed, Data, DataChunk, DataEnd, Ehlo, Etrn, Helo,
                                  Info, Rejected, Mail, Rcpt, Rset, ServerConfig, ServerConnection, StartTls,
                                  Vrfy, Warning, _SyntaxError, decode_xtext,
                                  extract_address, parse_path)

CFG = ServerConfig(hostname="mx.example.com", error_sleep_time=0)


class Driver:
    """Feeds bytes, accepts every event (unless told otherwise), collects output."""

    def __init__(self, cfg=CFG, replies=None, **kw):
        self.conn = ServerConnection(cfg, client="unknown[127.0.0.1]", **kw)
        self.conn.send_greeting(Reply(220, "mx.example.com ESMTP postwell"))
        self.replies = replies or {}
        self.events = []
        self.greeting = self.conn.data_to_send()

    def feed(self, *chunks: bytes) -> str:
        out = []
        for ch in chunks:
            self.conn.receive_data(ch)
            out.append(self._run())
        return b"".join(out).decode()

    def close(self) -> str:
        self.conn.receive_data(b"")
        return self._run().decode()

    def _run(self) -> bytes:
        out = []
        while True:
            ev = self.conn.next_event()
            if ev is NEED_DATA:
                out.append(self.conn.data_to_send())
                break
            assert ev is not PAUSED
            self.events.append(ev)
            if isinstance(ev, ConnectionClosed):
                out.append(self.conn.data_to_send())
                break
            if ev.needs_reply:
                r = self.replies.get(type(ev))
                self.conn.send_reply(r(ev) if callable(r) else r)
        return b"".join(out)

    def content(self) -> bytes:
        return b"".join(e.data for e in self.events if isinstance(e, DataChunk))

    def of(self, cls):
        return [e for e in self.events if isinstance(e, cls)]


def lines(text: str) -> list[str]:
    return [l for l in text.split("\r\n") if l]


def one(cmd: bytes, setup: bytes = b"", **kw) -> str:
    d = Driver(**kw)
    if setup:
        d.feed(setup)
    return d.feed(cmd)


# ------------------------------------------------------------------ greeting and EHLO

def test_ehlo_order_and_helo():
    d = Driver()
    assert d.greeting == b"220 mx.example.com ESMTP postwell\r\n"
    assert lines(d.feed(b"EHLO client\r\n")) == [
        "250-mx.example.com", "250-PIPELINING", "250-SIZE 10240000", "250-VRFY", "250-ETRN",
        "250-ENHANCEDSTATUSCODES", "250-8BITMIME", "250-DSN", "250-SMTPUTF8", "250 CHUNKING"]
    assert d.feed(b"HELO client\r\n") == "250 mx.example.com\r\n"
    assert d.feed(b"HELO\r\n") == "501 Syntax: HELO hostname\r\n"
    assert d.feed(b"EHLO\r\n") == "501 Syntax: EHLO hostname\r\n"


def test_ehlo_options():
    cfg = ServerConfig(hostname="h", message_size_limit=0, disable_vrfy=True,
                       discard_ehlo_keywords=frozenset({"CHUNKING", "DSN"}),
                       starttls_offered=True, auth_mechanisms=("PLAIN", "LOGIN"))
    assert lines(Driver(cfg).feed(b"EHLO c\r\n")) == [
        "250-h", "250-PIPELINING", "250-SIZE", "250-ETRN", "250-STARTTLS", "250-AUTH PLAIN LOGIN",
        "250-ENHANCEDSTATUSCODES", "250-8BITMIME", "250 SMTPUTF8"]


# ------------------------------------------------------------------ sequence errors

@pytest.mark.parametrize("cmd,setup,reply", [
    (b"RCPT TO:<a@b>", b"", "503 5.5.1 Error: need MAIL command"),
    (b"DATA", b"", "503 5.5.1 Error: need RCPT command"),
    (b"DATA", b"MAIL FROM:<a@b>\r\n", "554 5.5.1 Error: no valid recipients"),
    (b"BDAT 0 LAST", b"MAIL FROM:<a@b>\r\n", "554 5.5.1 Error: no valid recipients"),
    (b"BDAT 0 LAST", b"", "503 5.5.1 Error: need RCPT command"),
    (b"MAIL FROM:<a@b>", b"MAIL FROM:<a@b>\r\n", "503 5.5.1 Error: nested MAIL command"),
    (b"DATA x", b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n", "501 5.5.4 Syntax: DATA"),
    (b"FOO", b"", "500 5.5.2 Error: command not recognized"),
    (b"HELP", b"", "500 5.5.2 Error: command not recognized"),
    (b"", b"", "500 5.5.2 Error: bad syntax"),
    (b"  ", b"", "500 5.5.2 Error: bad syntax"),
    (b"RSET x", b"", "501 5.5.4 Syntax: RSET"),
    (b"RSET", b"", "250 2.0.0 Ok"),
    (b"NOOP x", b"", "250 2.0.0 Ok"),
    (b"QUIT x", b"", "221 2.0.0 Bye"),
    (b"VRFY", b"", "501 5.5.4 Syntax: VRFY address [SMTPUTF8]"),
    (b"VRFY foo@bar", b"", "252 2.0.0 foo@bar"),
    (b"VRFY <a@b>", b"", "252 2.0.0 <a@b>"),
    (b"VRFY a@b SMTPUTF8", b"", "252 2.0.0 a@b"),
    (b"VRFY a b", b"", "501 5.1.3 Bad recipient address syntax"),
    (b"STARTTLS x", b"", "501 5.5.4 Syntax: STARTTLS"),
    (b"ETRN", b"", "500 Syntax: ETRN domain"),
    (b"ETRN x", b"MAIL FROM:<a@b>\r\n", "503 Error: MAIL transaction in progress"),
    (b"ETRN example.com", b"", "459 <example.com>: service unavailable"),
    (b"ETRN @example.com", b"", "459 <example.com>: service unavailable"),
    (b"ETRN a b", b"", "500 Syntax: ETRN domain"),
    (b"XCLIENT", b"", "501 5.5.4 Syntax: XCLIENT attribute=value..."),
    (b"XCLIENT ADDR=192.0.2.1", b"", "550 5.7.0 Error: insufficient authorization"),
    (b"XFORWARD ADDR=192.0.2.1", b"", "550 5.7.0 Error: insufficient authorization"),
    (b"STARTTLS", b"", "502 5.5.1 Error: command not implemented"),
    (b"AUTH PLAIN", b"", "503 5.5.1 Error: authentication not enabled"),
    (b"mail from:<a@b>", b"", "250 2.1.0 Ok"),     # no HELO needed (smtpd_helo_required=no)
    (b"MAIL FROM:<a\x00b@c>", b"", "501 5.1.7 Bad sender address syntax"),   # NUL ends the line
    (b"NOOP\x00x", b"", "250 2.0.0 Ok"),
    (b"NOOP\xff", b"", "500 5.5.2 Error: bad UTF-8 syntax"),
    (b"HELO \xff", b"", "500 5.5.2 Error: bad UTF-8 syntax"),
    (b"RCPT\tTO:<a@b>", b"MAIL FROM:<a@b>\r\n", "250 2.1.5 Ok"),
])
def test_single_command(cmd, setup, reply):
    assert one(cmd + b"\r\n", setup) == reply + "\r\n"


@pytest.mark.parametrize("cmd", [b"Subject: x", b"GET / HTTP/1.0", b"get x", b".", b"From: a",
                                 b"X-Foo: b", b"1", b"CONNECT x", b"post"])
def test_non_smtp_commands(cmd):
    d = Driver()
    d.feed(b"EHLO x\r\n")
    assert d.feed(cmd + b"\r\nNOOP\r\n") == "221 2.7.0 Error: I can break rules, too. Goodbye.\r\n"
    assert d.conn.closed
    assert d.of(Warning)[-1].text == f"non-SMTP command from unknown[127.0.0.1]: {cmd.decode()}"
    assert d.conn.counters_text() == "ehlo=1 unknown=0/1 commands=1/2"


def test_vrfy_disabled():
    cfg = ServerConfig(disable_vrfy=True)
    assert one(b"VRFY a\r\n", cfg=cfg) == "502 5.5.1 VRFY command is disabled\r\n"


# ------------------------------------------------------------------ MAIL / RCPT parameters

@pytest.mark.parametrize("arg,reply", [
    (b"FROM:<a@b>", "250 2.1.0 Ok"),
    (b"FROM: <a@b>", "250 2.1.0 Ok"),
    (b"FROM:a@b", "250 2.1.0 Ok"),
    (b"FROM:<>", "250 2.1.0 Ok"),
    (b"FROM:<@x,@y:a@b>", "250 2.1.0 Ok"),
    (b'FROM:<"a b"@c>', "250 2.1.0 Ok"),
    (b"FROM:<a b>", "501 5.1.7 Bad sender address syntax"),
    (b"FROM:<a@b", "501 5.1.7 Bad sender address syntax"),
    (b"FROM:<a@b>x", "501 5.1.7 Bad sender address syntax"),
    (b"TO:<a>", "501 5.5.4 Syntax: MAIL FROM:<address>"),
    (b"", "501 5.5.4 Syntax: MAIL FROM:<address>"),
    (b"FROM:", "501 5.5.4 Syntax: MAIL FROM:<address>"),
    (b"FROM:<a@b> SIZE=99999999999", "552 5.3.4 Message size exceeds fixed limit"),
    (b"FROM:<a@b> SIZE=abc", "501 5.5.4 Bad message size syntax"),
    (b"FROM:<a@b> SIZE=10240000 BODY=7bit", "250 2.1.0 Ok"),
    (b"FROM:<a@b> FOO=bar", "555 5.5.4 Unsupported option: FOO=bar"),
    (b"FROM:<a@b>  x", "555 5.5.4 Unsupported option: x"),
    (b"FROM:<a@b> BODY=BINARYMIME", "555 5.5.4 Unsupported option: BODY=BINARYMIME"),
    (b"FROM:<a@b> BODY=FOO", "555 5.5.4 Unsupported option: BODY=FOO"),
    (b"FROM:<a@b> RET=FOO", "501 5.5.4 Bad RET parameter syntax"),
    (b"FROM:<a@b> RET=FULL RET=HDRS", "501 5.5.4 Bad RET parameter syntax"),
    (b"FROM:<a@b> ENVID=", "501 5.5.4 Bad ENVID parameter syntax"),
    (b"FROM:<a@b> ENVID=a+ZZ", "501 5.5.4 Bad ENVID parameter syntax"),
    (b"FROM:<a@b> ENVID=x ENVID=y", "501 5.5.4 Bad ENVID parameter syntax"),
    (b"FROM:<a@b> SMTPUTF8=x", "555 5.5.4 Unsupported option: SMTPUTF8=x"),
    (b"FROM:<a@b> BODY=8BITMIME RET=HDRS ENVID=abc+2B SMTPUTF8 AUTH=<>", "250 2.1.0 Ok"),
])
def test_mail(arg, reply):
    assert one(b"MAIL " + arg + b"\r\n") == reply + "\r\n"


def test_mail_event_fields():
    d = Driver()
    d.feed(b"MAIL FROM:<@r:a@b> BODY=8bitmime RET=hdrs ENVID=abc+2Bd SMTPUTF8 SIZE=5\r\n")
    (m,) = d.of(Mail)
    assert (m.sender, m.body, m.ret, m.envid, m.smtputf8, m.size) == \
        ("a@b", "8BITMIME", "HDRS", "abc+d", True, 5)


@pytest.mark.parametrize("arg,reply", [
    (b"TO:<c@d>", "250 2.1.5 Ok"),
    (b"TO:c@d", "250 2.1.5 Ok"),
    (b"TO:<postmaster>", "250 2.1.5 Ok"),
    (b"TO:<@x,@y:c@d>", "250 2.1.5 Ok"),
    (b'TO:<"a b"@d>', "250 2.1.5 Ok"),
    (b"TO:<>", "501 5.1.3 Bad recipient address syntax"),
    (b"TO:<a b@c>", "501 5.1.3 Bad recipient address syntax"),
    (b"TO:<a@b>x", "501 5.1.3 Bad recipient address syntax"),
    (b"TO:", "501 5.5.4 Syntax: RCPT TO:<address>"),
    (b"", "501 5.5.4 Syntax: RCPT TO:<address>"),
    (b"TO:<c@d> NOTIFY=FOO", "501 5.5.4 Error: Bad NOTIFY parameter syntax"),
    (b"TO:<c@d> NOTIFY=NEVER,SUCCESS", "501 5.5.4 Error: Bad NOTIFY parameter syntax"),
    (b"TO:<c@d> NOTIFY=SUCCESS NOTIFY=FAILURE", "501 5.5.4 Error: Bad NOTIFY parameter syntax"),
    (b"TO:<c@d> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;a+2Bb@c", "250 2.1.5 Ok"),
    (b"TO:<c@d> ORCPT=foo", "501 5.5.4 Error: Bad ORCPT parameter syntax"),
    (b"TO:<c@d> ORCPT=rfc822;a+ZZ", "501 5.5.4 Error: Bad ORCPT parameter syntax"),
    (b"TO:<c@d> ORCPT=rfc822;x ORCPT=rfc822;z", "501 5.5.4 Error: Bad ORCPT parameter syntax"),
    (b"TO:<c@d> SIZE=1", "555 5.5.4 Unsupported option: SIZE=1"),
    (b"TO:<a@b> <c@d>", "555 5.5.4 Unsupported option: <c@d>"),
])
def test_rcpt(arg, reply):
    assert one(b"RCPT " + arg + b"\r\n", b"MAIL FROM:<a@b>\r\n") == reply + "\r\n"


def test_rcpt_event_fields():
    d = Driver()
    d.feed(b"MAIL FROM:<>\r\nRCPT TO:<c@d> NOTIFY=success,delay ORCPT=rfc822;a+2Bb@c\r\n")
    (r,) = d.of(Rcpt)
    assert (r.recipient, r.notify, r.orcpt) == ("c@d", "SUCCESS,DELAY", "rfc822;a+b@c")


def test_xtext_and_paths():
    assert decode_xtext("a+2Bb+3D") == "a+b="
    for bad in ("", "a+2", "a+zz", "a b", "a=b"):
        with pytest.raises(ValueError):
            decode_xtext(bad)
    assert parse_path("<a@b> X=1\tY", False) == ("a@b", ["X=1", "Y"])
    assert parse_path('<"x>y"@b>', False) == ('x>y@b', [])     # internal (unquoted) form
    assert parse_path('<a\\@b@c>', False) == ('a@b@c', [])
    assert parse_path('<""@b>', False) == ('@b', [])
    # Postfix's tolerance (checked against 3.7)
    for ok, want in [("<<a@b>>", "a@b"), ("a@b>", "a@b"), ("<a(comment)@b>", "a@b"),
                     ("<@x,@y:a@b>", "a@b"), ("<[1.2.3.4]>", "[1.2.3.4]"),
                     ("<a@[1.2.3.4]>", "a@[1.2.3.4]"), ('<"a b"@c>', '"a b"@c'),
                     ("<a:b@c>", "a:b@c"), ("<a : b@c>", "a:b@c"), ("<a:@c>", "a:@c"), ("<a@b(>", "a@b"), ("<\xe9@b>", "\xe9@b")]:
        assert extract_address(ok, False) == want, ok
    for bad in ["<a b: c@d>", "<<a@b>", "<a@b", "<a>b", "<a@>", "<@>", '<"">', "<a;b@c>", "<a,b@c>", "<@x,a@b>",
                "<a@b)>", '<"a>', "<a\tb@c>", "<a@b\x7f>", "<a@[1.2]x>", "<a@b>X=1"]:
        with pytest.raises(_SyntaxError):
            extract_address(bad, False)


def test_recipient_limit_and_overshoot():
    cfg = ServerConfig(recipient_limit=2, recipient_overshoot_limit=1, error_sleep_time=0)
    d = Driver(cfg)
    out = d.feed(b"MAIL FROM:<a@b>\r\n" + b"".join(b"RCPT TO:<r%d@d>\r\n" % i for i in range(5)))
    assert lines(out) == ["250 2.1.0 Ok", "250 2.1.5 Ok", "250 2.1.5 Ok",
                          "452 4.5.3 Error: too many recipients",
                          "452 4.5.3 Error: too many recipients",
                          "452 4.5.3 Error: too many recipients"]
    assert d.conn.error_count == 2          # only the overshoot beyond limit+1 counts
    # Postfix counts the 452s within the overshoot allowance as successes, the rest as failures.
    assert "rcpt=3/5" in d.conn.counters_text()


# ------------------------------------------------------------------ policy replies

def test_rejected_rcpt_and_counters():
    d = Driver(replies={Rcpt: lambda ev: Reply(554, f"<{ev.recipient}>: Relay access denied", "5.7.1")
                        if ev.recipient.endswith("@other") else None})
    out = d.feed(b"EHLO x\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@other>\r\nDATA\r\nQUIT\r\n")
    assert lines(out)[-4:] == ["250 2.1.0 Ok", "554 5.7.1 <x@other>: Relay access denied",
                               "554 5.5.1 Error: no valid recipients", "221 2.0.0 Bye"]
    assert d.conn.counters_text() == "ehlo=1 mail=1 rcpt=0/1 data=0/1 quit=1 commands=3/5"


def test_access_denied_at_connect():
    c = ServerConnection(CFG, client="unknown[127.0.0.1]")
    c.deny_access()
    c.send_greeting(Reply(554, "<unknown[127.0.0.1]>: Client host rejected: Access denied", "5.7.1"))
    c.receive_data(b"EHLO x\r\nMAIL FROM:<a@b>\r\nFOO\r\nQUIT\r\n")
    while not isinstance(c.next_event(), ConnectionClosed):
        pass
    assert lines(c.data_to_send().decode()) == [
        "554 5.7.1 <unknown[127.0.0.1]>: Client host rejected: Access denied"] + \
        ["503 5.7.0 Error: access denied for unknown[127.0.0.1]"] * 3 + ["221 2.0.0 Bye"]
    assert c.counters_text() == "ehlo=0/1 mail=0/1 quit=1 unknown=0/1 commands=1/4"


# ------------------------------------------------------------------ DATA

def start_data(d: Driver) -> None:
    assert lines(d.feed(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n"))[-1] == \
        "354 End data with <CR><LF>.<CR><LF>"


def test_data_unstuff_and_end():
    d = Driver()
    start_data(d)
    out = d.feed(b"Subject: x\r\n\r\n..dot\r\n", b"...two\r\n.x\r\n.\r\nNOOP\r\n")
    assert lines(out) == ["250 2.0.0 Ok", "250 2.0.0 Ok"]
    assert d.content() == b"Subject: x\r\n\r\n.dot\r\n..two\r\nx\r\n"
    (end,) = d.of(DataEnd)
    assert end.size == len(d.content()) and not end.too_big


def test_data_end_split_across_packets():
    d = Driver()
    start_data(d)
    assert d.feed(b"a\r\n.") == ""
    assert d.feed(b"\r") == ""
    assert d.feed(b"\nQUIT\r\n") == "250 2.0.0 Ok\r\n221 2.0.0 Bye\r\n"
    assert d.content() == b"a\r\n"


@pytest.mark.parametrize("body", [
    b"x\n.\nMAIL FROM:<e@x>\r\n",          # LF . LF
    b"x\r.\rMAIL FROM:<e@x>\r\n",          # CR . CR
    b"x\r\n.\nMAIL FROM:<e@x>\r\n",        # CRLF . LF
    b"x\n.\r\nMAIL FROM:<e@x>\r\n",        # LF . CRLF
    b"x\r\n.\x00\r\nMAIL FROM:<e@x>\r\n",  # NUL after the dot
    b"x\r\n .\r\nMAIL FROM:<e@x>\r\n",
])
def test_smuggling_variants_stay_content(body):
    d = Driver()
    start_data(d)
    out = d.feed(body + b"end\r\n.\r\n")
    assert out == "250 2.0.0 Ok\r\n"          # exactly one message, no MAIL reply
    assert len(d.of(Mail)) == 1 and len(d.of(DataEnd)) == 1
    assert b"MAIL FROM:<e@x>" in d.content()


@pytest.mark.parametrize("body,content", [
    (b"a\n.\nMAIL\r\n", b"a\r\nMAIL\r\n"),            # the stray "." line vanishes (as Postfix)
    (b"a\r\n.\nMAIL\r\n", b"a\r\nMAIL\r\n"),
    (b"a\n.\r\nMAIL\r\n", b"a\r\nMAIL\r\n"),
    (b"a\r\n.\x00\r\nMAIL\r\n", b"a\r\n\x00\r\nMAIL\r\n"),
])
def test_smuggling_content_as_postfix(body, content):
    d = Driver()
    start_data(d)
    d.feed(body + b".\r\n")
    assert d.content() == content


def test_commands_after_final_dot_are_commands():
    d = Driver()
    start_data(d)
    out = d.feed(b"x\r\n.\r\nMAIL FROM:<n@x>\r\nRCPT TO:<c@d>\r\nDATA\r\ny\r\n.\r\n")
    assert lines(out) == ["250 2.0.0 Ok", "250 2.1.0 Ok", "250 2.1.5 Ok",
                          "354 End data with <CR><LF>.<CR><LF>", "250 2.0.0 Ok"]
    assert len(d.of(DataEnd)) == 2


def test_bare_lf_normalized():
    d = Driver()
    start_data(d)
    d.feed(b"a\nb\rc\r\n.\r\n")
    assert d.content() == b"a\r\nb\rc\r\n"


def test_bare_lf_reject():
    # As Postfix 3.7.11: read to the end, refuse the message, keep the session.
    d = Driver(forbid_bare_newline="reject")
    start_data(d)
    out = d.feed(b"a\nb\r\n.\r\nNOOP\r\n")
    assert out == "550 5.5.2 mx.example.com Error: bare <LF> received\r\n250 2.0.0 Ok\r\n"
    (end,) = d.of(DataEnd)
    assert end.bare_lf and d.content() == b""
    assert "data=0/1" in d.conn.counters_text()


def test_bare_lf_reject_in_command():
    d = Driver(forbid_bare_newline="reject")
    assert d.feed(b"EHLO x\nNOOP\r\n") == "550 5.5.2 mx.example.com Error: bare <LF> received\r\n"
    assert d.conn.closed
    (rej,) = d.of(Rejected)
    assert (rej.command, rej.text) == ("CONNECT", "bare <LF> received")
    assert d.conn.counters_text() == "commands=0/0"


def test_data_too_big_discards_rest():
    cfg = ServerConfig(message_size_limit=100, error_sleep_time=0)
    d = Driver(cfg)
    start_data(d)
    out = d.feed(b"x" * 60 + b"\r\n", b"y" * 60 + b"\r\n", b"z" * 5000 + b"\r\n.\r\nNOOP\r\n")
    assert lines(out) == ["552 5.3.4 Error: message file too big", "250 2.0.0 Ok"]
    (end,) = d.of(DataEnd)
    assert end.too_big
    assert len(d.content()) <= 100


def test_long_data_line_in_pieces_and_bounded():
    d = Driver()
    start_data(d)
    for _ in range(200):
        d.feed(b"A" * 10000)
        assert d.conn.buffered <= CFG.line_length_limit
    d.feed(b"\r\n.\r\n")
    assert d.content() == b"A" * 2000000 + b"\r\n"


def test_long_command_truncated():
    d = Driver()
    out = d.feed(b"NOOP " + b"a" * 5000 + b"\r\n")
    assert out == "250 2.0.0 Ok\r\n"
    assert any("request longer than 2048" in w.text for w in d.of(Warning))
    out = d.feed(b"MAIL FROM:<" + b"a" * 3000 + b"@b>\r\n")
    assert out == "501 5.1.7 Bad sender address syntax\r\n"


def test_huge_command_without_newline_bounded():
    d = Driver()
    for _ in range(1000):
        d.feed(b"x" * 100000)
        assert d.conn.buffered <= CFG.line_length_limit
    assert d.feed(b"\r\nNOOP\r\n") == "500 5.5.2 Error: command not recognized\r\n250 2.0.0 Ok\r\n"


def test_where_and_lost_during_data():
    d = Driver()
    start_data(d)
    d.feed(b"partial\r\n")
    assert d.conn.where == "DATA (9 bytes)"
    d.close()
    assert d.of(ConnectionClosed) == [ConnectionClosed("lost")]
    assert "data=0/1" in d.conn.counters_text()


# ------------------------------------------------------------------ BDAT (RFC 3030)

def test_bdat_chunks():
    d = Driver()
    out = d.feed(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nBDAT 5\r\nhel", b"loBDAT 3 LAST\r\n\r\nx")
    assert lines(out)[-2:] == ["250 2.0.0 Ok: 5 bytes", "250 2.0.0 Ok"]
    assert d.content() == b"hello\r\nx\r\n"       # CRLF added to the unterminated last line
    (end,) = d.of(DataEnd)
    assert end.bdat and end.size == 10
    assert len(d.of(Bdat)) == 1 and len(d.of(BdatChunkEnd)) == 1


def test_bdat_content_not_unstuffed_and_dot_not_end():
    d = Driver()
    d.feed(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n")
    d.feed(b"BDAT 12 LAST\r\n.\r\nMAIL x\r\n")
    assert d.content() == b".\r\nMAIL x\r\n"


def test_bdat_sequence_errors():
    d = Driver()
    out = d.feed(b"BDAT 4\r\nMAILNOOP\r\nMAIL FROM:<a@b>\r\nRCPT TO:<a@b>\r\nDATA x\r\n")
    assert lines(out) == ["503 5.5.1 Error: need RCPT command", "250 2.0.0 Ok",
                          "503 5.5.1 Error: MAIL after BDAT", "503 5.5.1 Error: need MAIL command",
                          "503 5.5.1 Error: DATA after BDAT"]
    assert d.of(Mail) == []


def test_bdat_then_data_refused():
    d = Driver()
    out = d.feed(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nBDAT 3\r\nabcDATA\r\nBDAT 0 LAST\r\n")
    assert lines(out)[-3:] == ["250 2.0.0 Ok: 3 bytes", "503 5.5.1 Error: DATA after BDAT",
                               "250 2.0.0 Ok"]
    assert d.conn.counters_text() == "mail=1 rcpt=1 data=0/1 bdat=2 commands=4/5"


@pytest.mark.parametrize("cmd", [b"BDAT x", b"BDAT", b"BDAT 1 FOO", b"BDAT -1"])
def test_bdat_syntax_closes(cmd):
    d = Driver()
    out = d.feed(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n" + cmd + b"\r\nNOOP\r\n")
    assert lines(out)[-1] == "521 5.5.4 Syntax: BDAT count [LAST]"
    assert d.conn.closed


def test_bdat_chunk_over_limit_skipped():
    cfg = ServerConfig(message_size_limit=100, error_sleep_time=0)
    d = Driver(cfg)
    out = d.feed(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nBDAT 150\r\n" + b"x" * 150 +
                 b"BDAT 1 LAST\r\nxRSET\r\nQUIT\r\n")
    assert lines(out)[-4:] == ["552 5.3.4 Chunk exceeds message size limit",
                               "551 5.0.0 Discarded 1 bytes after earlier error",
                               "250 2.0.0 Ok", "221 2.0.0 Bye"]
    assert d.content() == b"" and d.of(DataEnd) == [] and d.of(Bdat) == []


def test_bdat_rejected_by_policy():
    d = Driver(replies={Bdat: Reply(554, "Error: data rejected", "5.7.1")})
    out = d.feed(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nBDAT 3\r\nabcBDAT 2 LAST\r\nxyNOOP\r\n")
    assert lines(out)[-3:] == ["554 5.7.1 Error: data rejected",
                               "551 5.0.0 Discarded 2 bytes after earlier error", "250 2.0.0 Ok"]
    assert d.content() == b""


# ------------------------------------------------------------------ PIPELINING, STARTTLS, AUTH

def test_pipelined_replies_grouped():
    d = Driver()
    d.conn.receive_data(b"EHLO x\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n")
    seen = []
    while True:
        ev = d.conn.next_event()
        if ev is NEED_DATA:
            break
        seen.append(ev)
        # Nothing is flushable until every buffered command is answered.
        if ev.needs_reply:
            d.conn.send_reply(None)
    assert [type(e) for e in seen] == [Info, Ehlo, Mail, Rcpt]
    assert seen[0].text == ("improper command pipelining after EHLO from unknown[127.0.0.1]: "
                            "MAIL FROM:<a@b>\\r\\nRCPT TO:<c@d>\\r\\n")
    assert d.conn.pipelining_violation
    assert d.conn.data_to_send().count(b"\r\n") == 12


def test_proper_pipelining_not_flagged():
    d = Driver()
    d.feed(b"EHLO x\r\n", b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n", b"x\r\n.\r\n")
    assert d.of(Info) == [] and not d.conn.pipelining_violation


def test_size_reject_is_logged_as_reject():
    d = Driver()
    d.feed(b"MAIL FROM:<a@b> SIZE=999999999\r\n")
    assert d.of(Rejected) == [Rejected("MAIL", Reply(552, "Message size exceeds fixed limit", "5.3.4"),
                                       "a@b")]


def test_paused_until_reply():
    c = ServerConnection(CFG)
    c.send_greeting(Reply(220, "x"))
    c.receive_data(b"MAIL FROM:<a@b>\r\nNOOP\r\n")
    assert isinstance(c.next_event(), Info)   # no EHLO: no PIPELINING (logged by Postfix)
    assert isinstance(c.next_event(), Mail)
    assert c.next_event() is PAUSED
    c.send_reply(Reply(451, "try later", "4.3.0"))
    assert c.next_event() is NEED_DATA
    assert c.data_to_send() == b"220 x\r\n451 4.3.0 try later\r\n250 2.0.0 Ok\r\n"
    with pytest.raises(RuntimeError):
        c.send_reply(None)


def test_starttls_discards_pipelined_plaintext():
    cfg = ServerConfig(starttls_offered=True)
    d = Driver(cfg)
    out = d.feed(b"EHLO x\r\nSTARTTLS\r\nMAIL FROM:<evil@x>\r\n")
    assert lines(out)[-1] == "220 2.0.0 Ready to start TLS"
    d.feed(b"RCPT TO:<evil@y>\r\n")   # still plaintext, before tls_started()
    assert d.of(Mail) == [] and d.of(StartTls)
    d.conn.tls_started()
    assert d.conn.helo_name is None
    assert d.feed(b"MAIL FROM:<ok@x>\r\n") == "250 2.1.0 Ok\r\n"
    assert lines(d.feed(b"EHLO x\r\n"))[-1] == "250 CHUNKING"
    assert "STARTTLS" not in d.feed(b"EHLO x\r\n")
    assert d.feed(b"STARTTLS\r\n") == "554 5.5.1 Error: TLS already active\r\n"


def test_auth_continuation():
    cfg = ServerConfig(auth_mechanisms=("PLAIN", "LOGIN"))
    d = Driver(cfg, replies={Auth: Reply(334, "VXNlcm5hbWU6"),
                             AuthResponse: Reply(235, "Authentication successful", "2.7.0")})
    # Postfix 3.7 takes AUTH before HELO/EHLO (checked against the reference).
    assert d.feed(b"AUTH LOGIN\r\n") == "334 VXNlcm5hbWU6\r\n"
    assert d.feed(b"*\r\n") == "501 5.7.0 Authentication aborted\r\n"
    assert d.of(AuthAborted)
    d.feed(b"EHLO x\r\n")
    assert d.feed(b"AUTH LOGIN\r\n") == "334 VXNlcm5hbWU6\r\n"
    assert d.feed(b"dXNlcg==\r\n") == "235 2.7.0 Authentication successful\r\n"
    assert d.of(AuthResponse)[0].data == "dXNlcg=="
    assert d.feed(b"AUTH PLAIN\r\n") == "503 5.5.1 Error: already authenticated\r\n"
    assert "auth=1/3" in d.conn.counters_text()


def test_auth_cancel():
    cfg = ServerConfig(auth_mechanisms=("LOGIN",))
    d = Driver(cfg, replies={Auth: Reply(334, "VXNlcm5hbWU6")})
    d.feed(b"EHLO x\r\nAUTH LOGIN\r\n")
    assert d.feed(b"*\r\n") == "501 5.7.0 Authentication aborted\r\n"


# ------------------------------------------------------------------ error limits

def test_hard_error_limit():
    d = Driver()
    out = d.feed(b"FOO\r\n" * 25)
    assert lines(out) == ["500 5.5.2 Error: command not recognized"] * 20 + \
        ["421 4.7.0 mx.example.com Error: too many errors"]
    assert d.of(ConnectionClosed) == [ConnectionClosed("too many errors")]
    assert d.conn.counters_text() == "unknown=0/20 commands=0/20"


def test_soft_error_limit_asks_for_sleep():
    cfg = ServerConfig(soft_error_limit=2, error_sleep_time=1.5)
    d = Driver(cfg)
    d.feed(b"FOO\r\n")
    assert d.conn.error_delay() == 0
    # The error that reaches the limit is answered at once; the next reply waits
    # (Postfix counts an error when the command is done).
    d.feed(b"FOO\r\nFOO\r\n")
    assert d.conn.error_delay() == 1.5
    # Past the limit every reply is slowed down, until mail is delivered.
    d.feed(b"NOOP\r\n")
    assert d.conn.error_delay() == 1.5
    d.feed(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\nx\r\n.\r\n")
    d.conn.error_delay()
    d.feed(b"NOOP\r\n")
    assert d.conn.error_delay() == 0


def test_quit_and_eof():
    d = Driver()
    assert d.feed(b"QUIT\r\nNOOP\r\n") == "221 2.0.0 Bye\r\n"
    assert d.of(ConnectionClosed) == [ConnectionClosed("quit")]
    d2 = Driver()
    d2.feed(b"EHLO x\r\n")
    d2.close()
    assert d2.of(ConnectionClosed) == [ConnectionClosed("lost")]
    assert d2.conn.where == "EHLO"


def test_rset_event_and_transaction_reset():
    d = Driver()
    out = d.feed(b"MAIL FROM:<a@b>\r\nRSET\r\nRCPT TO:<c@d>\r\n")
    assert lines(out) == ["250 2.1.0 Ok", "250 2.0.0 Ok", "503 5.5.1 Error: need MAIL command"]
    assert d.of(Rset) == [Rset()]


def test_vrfy_and_etrn_events():
    d = Driver(replies={Vrfy: Reply(550, "<x>: Recipient address rejected", "5.1.1")})
    assert d.feed(b"VRFY <x>\r\n") == "550 5.1.1 <x>: Recipient address rejected\r\n"
    assert d.of(Vrfy)[0].address == "x"
    d.feed(b"ETRN d.example\r\n")
    assert d.of(Etrn)[0].domain == "d.example"


def test_abort_during_data_counts_failed_data():
    d = Driver()
    start_data(d)
    d.conn.abort("timeout")
    assert d.conn.closed and d.conn.where == "DATA (0 bytes)"
    assert d.conn.counters_text() == "mail=1 rcpt=1 data=0/1 commands=2/3"


def test_counters_without_commands():
    d = Driver()
    d.close()
    assert d.conn.counters_text() == "commands=0/0"
    assert d.conn.where == "CONNECT"


@pytest.mark.parametrize("ehlo,group,flagged", [
    (True, b"NOOP\r\nNOOP\r\n", True), (True, b"RSET\r\nNOOP\r\n", False),
    (True, b"VRFY a\r\nNOOP\r\n", True), (True, b"HELO x\r\nNOOP\r\n", True),
    (True, b"ETRN x\r\nNOOP\r\n", False), (True, b"MAIL FROM:<a b>\r\nNOOP\r\n", False),
    (False, b"MAIL FROM:<a@b>\r\nNOOP\r\n", True), (False, b"RSET\r\nNOOP\r\n", True),
    (False, b"FOO\r\nNOOP\r\n", False), (True, b"FOO\r\nNOOP\r\n", False),
])
def test_improper_pipelining_as_postfix(ehlo, group, flagged):
    d = Driver()
    if ehlo:
        d.feed(b"EHLO x\r\n")
    d.feed(group)
    assert bool(d.of(Info)) == flagged


def test_bare_lf_reject_in_bdat():
    d = Driver(forbid_bare_newline="reject")
    out = d.feed(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nBDAT 4\r\na\r\r\nBDAT 3 LAST\r\n\nb\n")
    assert lines(out)[-2:] == ["250 2.0.0 Ok: 4 bytes",
                               "550 5.5.2 mx.example.com Error: bare <LF> received"]
    assert d.of(DataEnd)[0].bare_lf
    d2 = Driver(forbid_bare_newline="reject")
    out = d2.feed(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nBDAT 2\r\na\rBDAT 3 LAST\r\n\nb\r")
    assert lines(out)[-1] == "250 2.0.0 Ok"      # CR at the chunk end pairs with the next LF


def test_discarded_chunking_and_dsn():
    cfg = ServerConfig(discard_ehlo_keywords=frozenset({"CHUNKING", "DSN"}), error_sleep_time=0)
    d = Driver(cfg)
    out = d.feed(b"EHLO x\r\nMAIL FROM:<a@b> RET=FULL\r\nMAIL FROM:<a@b>\r\n"
                 b"RCPT TO:<c@d> NOTIFY=NEVER\r\nRCPT TO:<c@d>\r\nBDAT 3 LAST\r\nabc")
    assert lines(out)[-5:] == ["501 5.7.1 DSN support is disabled", "250 2.1.0 Ok",
                               "501 5.7.1 DSN support is disabled", "250 2.1.5 Ok",
                               "521 5.5.1 Error: command not implemented"]
    assert d.conn.closed


def test_junk_command_limit():
    cfg = ServerConfig(junk_command_limit=3, hard_error_limit=5, error_sleep_time=0)
    d = Driver(cfg)
    out = d.feed(b"NOOP\r\n" * 3 + b"RSET\r\nVRFY a\r\nETRN x\r\nNOOP\r\nNOOP\r\nNOOP\r\nNOOP\r\n")
    # the 4th junk command is the first error; ETRN's own 459 counts too
    assert lines(out)[-1] == "421 4.7.0 localhost.localdomain Error: too many errors"
