"""smtpd session hot path (issue 8): the shortcuts taken for the common plain session
must give exactly what the general code gives -- same addresses, parameters, syntax
verdicts, replies and log lines."""

from __future__ import annotations

import random
import re

import pytest

import postwell.smtp.server as engine
from postwell.smtp.reply import Reply
from postwell.smtp.server import (NEED_DATA, DataChunk, DataEnd, ServerConfig, ServerConnection,
                                  _SyntaxError, domain_error, neuter_helo, parse_path)

from test_smtpd import codes, raw_session
from test_smtpd_tls import servers   # noqa: F401 - the fixture making Running smtpds

_NEVER = re.compile(r"(?!)")          # a pattern that matches nothing: forces the slow path

# Characters that make the envelope parsers take their different branches.
_PIECES = ["a", "b", "Z", "9", ".", "-", "_", "+", "@", "<", ">", " ", "\t", "\r", '"', "\\",
           "(", ")", ":", ",", ";", "[", "]", "=", "é", "\x00", "\x7f", "x@y.example",
           "<u@d.example>", "SIZE=100", "BODY=8BITMIME", "NOTIFY=NEVER", "IPv6:", "1.2.3.4"]


def _random_texts(seed: int, n: int):
    rnd = random.Random(seed)
    fixed = ["<a@b.example>", "  <a@b.example>", "<a@b.example> SIZE=1", "<a@b.example>\tX=1  Y",
             "<a@b.example>  ", "<a@b.example>x", "<a@b.example>\rX", "<a@b.example> \"q r\" s",
             "<>", "< a@b >", "<a@b.example", "a@b.example", "<<a@b.example>>", "<a@1.2.3.4>",
             "<a@[1.2.3.4]>", "<\"a b\"@c.example>", "<a\\@b@c.example>", "<a@b.example.>",
             "<a@-b.example>", "<a@b..example>", "<a@b_c.example>", "<a@123.456>",
             "<@r.example:a@b.example>", "<a@" + "x" * 64 + ".example>",
             "<a@" + ".".join(["abcdefgh"] * 40) + ">", "<a@b.example> \"", "<a@b.example>\t\t"]
    yield from fixed
    for _ in range(n):
        yield "".join(rnd.choice(_PIECES) for _ in range(rnd.randint(0, 12)))


def _outcome(fn, *args):
    try:
        return ("ok", fn(*args))
    except _SyntaxError:
        return ("syntax",)


@pytest.mark.parametrize("seed", range(3))
def test_parse_path_shortcut_equals_general_parser(seed, monkeypatch):
    texts = list(_random_texts(seed, 3000))
    fast = [(_outcome(parse_path, t, True), _outcome(parse_path, t, False)) for t in texts]
    monkeypatch.setattr(engine, "_FAST_PATH", _NEVER)
    slow = [(_outcome(parse_path, t, True), _outcome(parse_path, t, False)) for t in texts]
    for text, a, b in zip(texts, fast, slow):
        assert a == b, text
    # The shortcut was taken for the plain form, with and without parameters.
    assert fast[0] == (("ok", ("a@b.example", [])),) * 2
    assert fast[2][0] == ("ok", ("a@b.example", ["SIZE=1"]))


@pytest.mark.parametrize("seed", range(3))
def test_domain_check_shortcut_equals_general_check(seed, monkeypatch):
    rnd = random.Random(seed)
    alphabet = "ab9Z-_.é[]:"
    domains = ["b.example", "b.example.", "1.2.3.4", "1.2.3.4.", "123", "a", "a-", "-a",
               "a..b", ".a", "a_b", "x" * 63 + ".example", "x" * 64 + ".example",
               ".".join(["y" * 63] * 4), ".".join(["y" * 63] * 4) + ".", "", ".", "é.example",
               "[1.2.3.4]", "[IPv6:::1]", "9.example", "example.9"]
    domains += ["".join(rnd.choice(alphabet) for _ in range(rnd.randint(0, 10)))
                for _ in range(4000)]
    addrs = [f"u@{d}" for d in domains] + ["nodomain", "a@b@c.example"]
    fast = [(domain_error(a, False), domain_error(a, True)) for a in addrs]
    monkeypatch.setattr(engine, "_PLAIN_DOMAIN", _NEVER)
    slow = [(domain_error(a, False), domain_error(a, True)) for a in addrs]
    for addr, a, b in zip(addrs, fast, slow):
        assert a == b, addr


def test_helo_neutering_shortcut_equals_general_rule(monkeypatch):
    rnd = random.Random(7)
    names = ["mx.example", "[1.2.3.4]", "a b", "x<y>", 'q"', "a;b", "a@b", "a\\b", "(c)",
             "é.example", "\x7f", "\x00", "\ud800", "tab\there", "a:b", "~!#$%^&*"]
    names += ["".join(chr(rnd.choice([rnd.randint(0x20, 0x7e), rnd.randint(0, 0x1f),
                                      rnd.randint(0x7f, 0x2ff), 0xd800]))
                      for _ in range(rnd.randint(1, 8))) for _ in range(3000)]
    fast = [(neuter_helo(n, True), neuter_helo(n, False)) for n in names]
    monkeypatch.setattr(engine, "_NEUTER_ANY", re.compile(r"[\s\S]"))   # always the loop
    slow = [(neuter_helo(n, True), neuter_helo(n, False)) for n in names]
    assert fast == slow
    assert neuter_helo("mx.example") == "mx.example"


def test_header_like_lines_still_refused_without_the_regex_per_command():
    # smtpd_forbidden_commands' {{/^[^A-Z]/ Bogus}} and header-looking lines: the colon
    # test in front of the regex must not let one through.
    rnd = random.Random(3)
    pieces = ["Subject", ":", " ", "\t", "X-a", "MAIL", "FROM", "<a@b>", "\x0b", "é", "1", "\x1c"]
    for _ in range(5000):
        line = "".join(rnd.choice(pieces) for _ in range(rnd.randint(1, 6)))
        parts = line.strip(" \t").split(None, 1)
        if not parts:
            continue
        verb_u = parts[0].upper()
        regex = engine._HEADER_LIKE.match(line) is not None
        assert (":" in verb_u and regex) == regex, repr(line)


def _finals(out: bytes) -> list[str]:
    return [c for c in codes(out) if not c.endswith("-")]


def _dialogue(wire: bytes, config: ServerConfig | None = None):
    c = ServerConnection(config or ServerConfig(hostname="mx.example"))
    c.send_greeting(Reply(220, "mx.example ESMTP"))
    out, events = [c.data_to_send()], []
    c.receive_data(wire)
    while True:
        ev = c.next_event()
        if ev is NEED_DATA:
            out.append(c.data_to_send())
            if c.closed or not c.buffered:
                break
            continue
        events.append(ev)
        if getattr(ev, "needs_reply", False):
            c.send_reply(None)
    return b"".join(out), events, c


def test_plain_session_replies_and_counters():
    wire = (b"EHLO client.example\r\nMAIL FROM:<s@a.example> SIZE=10\r\n"
            b"RCPT TO:<r@b.example>\r\nDATA\r\nSubject: x\r\n\r\nbody\r\n.\r\nQUIT\r\n")
    out, events, c = _dialogue(wire)
    assert _finals(out) == ["220", "250", "250", "250", "354", "250", "221"]
    assert b"250 2.0.0 Ok\r\n" in out and out.endswith(b"221 2.0.0 Bye\r\n")
    mail = next(e for e in events if isinstance(e, engine.Mail))
    assert (mail.sender, mail.size) == ("s@a.example", 10)
    rcpt = next(e for e in events if isinstance(e, engine.Rcpt))
    assert rcpt.recipient == "r@b.example"
    assert b"".join(e.data for e in events if isinstance(e, DataChunk)) == b"Subject: x\r\n\r\nbody\r\n"
    end = next(e for e in events if isinstance(e, DataEnd))
    assert end.size == len(b"Subject: x\r\n\r\nbody\r\n") and not end.too_big
    assert c.counters_text() == "ehlo=1 mail=1 rcpt=1 data=1 quit=1 commands=5"
    # The pipelined group above was noticed, as Postfix does.
    assert c.pipelining_violation


def test_command_line_endings_and_empty_lines():
    # CRLF, bare LF (normalize), a CR before CRLF stays in the argument, empty lines are
    # errors that are not commands.
    out, _, c = _dialogue(b"NOOP\r\nNOOP\n\r\nNOOP \r\r\nQUIT\r\n")
    assert _finals(out) == ["220", "250", "250", "500", "250", "221"]
    assert c.counters_text() == "noop=3 quit=1 commands=4"


def test_header_line_as_command_is_refused():
    out, events, c = _dialogue(b"EHLO x\r\nSubject: hello\r\n")
    assert out.endswith(b"221 2.7.0 Error: I can break rules, too. Goodbye.\r\n")
    assert any(isinstance(e, engine.Warning) and "non-SMTP command" in e.text for e in events)
    assert c.closed


def test_quoted_and_spaced_paths_still_take_the_general_parser():
    out, events, _ = _dialogue(b'EHLO x\r\nMAIL FROM:< s@a.example >\r\n'
                               b'RCPT TO:<"a b"@b.example> NOTIFY=NEVER\r\nRSET\r\n'
                               b'MAIL FROM:<>\r\nRCPT TO:<r@[1.2.3.4]>\r\nQUIT\r\n')
    assert _finals(out) == ["220", "250", "250", "250", "250", "250", "250", "221"]
    got = [(type(e).__name__, getattr(e, "sender", getattr(e, "recipient", None)))
           for e in events if isinstance(e, (engine.Mail, engine.Rcpt))]
    assert got == [("Mail", "s@a.example"), ("Rcpt", "a b@b.example"), ("Mail", ""),
                   ("Rcpt", "r@[1.2.3.4]")]


def test_numeric_domain_refused_on_the_shortcut():
    out, events, _ = _dialogue(b"EHLO x\r\nMAIL FROM:<s@1.2.3.4>\r\nQUIT\r\n")
    assert b"501 5.1.7 Bad sender address syntax\r\n" in out
    assert any(isinstance(e, engine.Warning) and "Illegal address syntax" in e.text
               for e in events)


def test_plain_session_through_the_server(servers):
    # The whole glue: greeting, EHLO, MAIL, RCPT, DATA content written inline, the
    # queued reply, QUIT, and the disconnect counters.
    r = servers()
    out = raw_session(r.port, [b"EHLO client.example\r\n", b"MAIL FROM:<s@a.example>\r\n",
                               b"RCPT TO:<u@mx.example.test>\r\n", b"DATA\r\n",
                               b"Subject: hi\r\n\r\n" + b"line\r\n" * 200 + b".\r\n",
                               b"QUIT\r\n"])
    assert codes(out)[-5:] == ["250", "250", "354", "250", "221"], out
    assert b"250 2.0.0 Ok: queued as " in out
    line = r.wait_log("disconnect from")
    assert line.endswith("ehlo=1 mail=1 rcpt=1 data=1 quit=1 commands=5"), line
    assert len(r.queued()) == 1


def test_rate_limits_that_are_off_do_not_ask_anvil(servers):
    # smtpd_client_message_rate_limit = 0 etc.: no anvil round trip (nor the coroutines
    # that would find out) at each MAIL and RCPT; a limit that is on is still asked.
    import asyncio

    srv = servers().server
    asked = []

    class Limits:
        mail_limit = 0
        rcpt_limit = 3
        auth_limit = 0

        async def mail(self, session):
            asked.append("mail")

        async def rcpt(self, session):
            asked.append("rcpt")
            return Reply(450, "Error: too many recipients from 127.0.0.1", "4.7.1")

        async def starttls(self, session):
            asked.append("starttls")

    saved = srv.limits
    srv.limits = Limits()
    try:
        run = asyncio.new_event_loop().run_until_complete
        assert run(srv.event_limit_reply(None, "mail")) is None
        assert run(srv.event_limit_reply(None, "auth")) is None
        assert run(srv.event_limit_reply(None, "rcpt")).code == 450
        assert run(srv.event_limit_reply(None, "starttls")) is None
    finally:
        srv.limits = saved
    assert asked == ["rcpt", "starttls"]


def test_received_header_date_comes_from_cleanup():
    import postwell.smtpd.server as glue
    from postwell.cleanup import mail_date

    assert glue._mail_date(86400.0) == mail_date(86400.0)
    assert glue._mail_date(86400.0) == mail_date(86400.0)      # the remembered function


def test_long_line_precheck_never_misses_a_long_line():
    rnd = random.Random(11)
    for _ in range(20000):
        limit = rnd.choice([1, 2, 3, 5, 8, 16, 64, 512])
        parts = [b"x" * rnd.randint(0, 3 * limit) for _ in range(rnd.randint(1, 6))]
        chunk = b"\n".join(parts)
        if max(map(len, chunk.split(b"\n"))) > limit:
            assert engine._may_have_long_line(chunk, limit), (chunk, limit)


def test_long_data_lines_counted_as_before():
    # A 5000-byte line in the bulk path: Postfix counts 2 more per full record of
    # line_length_limit (5006 for it, checked against 3.7) -- the pre-check must let
    # the exact count run, and short lines must leave the size alone.
    wire = (b"EHLO x\r\nMAIL FROM:<s@a.example>\r\nRCPT TO:<r@b.example>\r\nDATA\r\n"
            + b"y" * 5000 + b"\r\n" + b"short\r\n" * 600 + b".\r\nQUIT\r\n")
    _, events, _ = _dialogue(wire)
    end = next(e for e in events if isinstance(e, DataEnd))
    assert end.size == 5002 + 4 + 7 * 600
