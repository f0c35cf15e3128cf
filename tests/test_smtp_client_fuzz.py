"""Fuzz the sans-IO client engine: whatever the server sends, it never raises,
never buffers beyond its bounds, and content conversion does not depend on chunking."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from postwell.smtp.client import (MAX_PENDING_INPUT, MAX_REPLY_LINE, NEED_DATA, AuthChallenge,
                                  ContentWanted, Envelope, HelloDone, MessageDone, Recipient,
                                  SmtpClient, TlsWanted, TransactionFailed)

REPLIES = [b"220 mx ESMTP\r\n", b"250-mx\r\n", b"250-PIPELINING\r\n", b"250-CHUNKING\r\n",
           b"250-STARTTLS\r\n", b"250-AUTH PLAIN\r\n", b"250 DSN\r\n", b"250 ok\r\n",
           b"250 2.1.5 ok\r\n", b"550 5.1.1 no\r\n", b"450 4.2.0 later\r\n", b"354 go\r\n",
           b"421 4.3.2 bye\r\n", b"334 \r\n", b"235 2.7.0 ok\r\n", b"221 bye\r\n",
           b"garbage\r\n", b"\r\n", b"\n", b"\r", b"\x00\xff", b"2", b"25", b"250",
           b"x" * 3000, b"999 odd\r\n", b"250-", b"550-5.1.1 a\r\n"]

ENV = Envelope("s@x", (Recipient("a@x"), Recipient("b@x", notify="NEVER")), size=10)


def drive(chunks, use_chunking, lmtp=False):
    c = SmtpClient("me", use_chunking=use_chunking, chunk_size=16, lmtp=lmtp)
    started = False
    for ch in chunks + [b""]:
        c.receive_data(ch)
        assert len(c._in) <= MAX_PENDING_INPUT
        for _ in range(1000):
            ev = c.next_event()
            if ev is NEED_DATA:
                break
            if isinstance(ev, HelloDone) and c.usable and not started:
                started = True
                c.start_transaction(ENV)
            elif isinstance(ev, ContentWanted):
                c.send_content(b"Subject: x\n\n.line\n")
                c.end_content()
            elif isinstance(ev, AuthChallenge):
                c.auth_response(None)
            elif isinstance(ev, TlsWanted):
                c.tls_established()
            elif isinstance(ev, (MessageDone, TransactionFailed)):
                pass
            if hasattr(ev, "reply") and ev.reply is not None:
                assert all(len(line) <= MAX_REPLY_LINE for line in ev.reply.text.split("\n"))
        c.data_to_send()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(REPLIES) | st.binary(max_size=40), max_size=40), st.booleans(),
       st.booleans())
def test_engine_never_raises(chunks, use_chunking, lmtp):
    drive(chunks, use_chunking, lmtp)


def convert(content: bytes, cuts: list[int], limit: int = 20) -> bytes:
    c = SmtpClient("me", line_length_limit=limit)
    c.receive_data(b"220 mx\r\n")
    c.receive_data(b"250 mx\r\n")
    c.start_transaction(Envelope("s@x", (Recipient("a@x"),)))
    for r in (b"250 ok\r\n", b"250 ok\r\n", b"354 go\r\n"):
        c.receive_data(r)
    while c.next_event() is not NEED_DATA:
        pass
    c.data_to_send()
    pos = 0
    for cut in sorted(set(cuts)):
        c.send_content(content[pos:cut])
        pos = cut
    c.send_content(content[pos:])
    c.end_content()
    return c.data_to_send()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200).map(lambda b: b.replace(b"\x00", b".")),
       st.lists(st.integers(0, 200), max_size=10))
def test_content_conversion_independent_of_chunking(content, cuts):
    out = convert(content, [c for c in cuts if c <= len(content)])
    assert out == convert(content, [])
    body = out[:-3]                                 # strip the final ".\r\n"
    assert out.endswith(b"\r\n.\r\n") or out == b".\r\n"
    assert b"\r" not in body.replace(b"\r\n", b"")  # no bare CR ever
    assert b"\n" not in body.replace(b"\r\n", b"")  # no bare LF ever
    for line in body.split(b"\r\n")[:-1]:
        assert len(line) <= 20


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.lists(st.integers(0, 200), max_size=10))
def test_dot_stuffing_round_trips(content, cuts):
    # Without line breaking, undoing RFC 5321 4.5.2 transparency gives the stored
    # content back, minus CRs, with a final LF.
    out = convert(content, [c for c in cuts if c <= len(content)], limit=0)
    assert out.endswith(b".\r\n")
    lines = out[:-3].split(b"\r\n")[:-1]
    # A stuffed line never starts with a lone dot, so "." alone cannot end the data early.
    assert all(line.startswith(b"..") for line in lines if line.startswith(b"."))
    unstuffed = [line[1:] if line.startswith(b".") else line for line in lines]
    expected = content.replace(b"\r", b"")
    if expected and not expected.endswith(b"\n"):
        expected += b"\n"
    assert b"".join(line + b"\n" for line in unstuffed) == expected
