"""The SMTP client's cache of parsed one-line replies (issue 8): a server
repeats the same few reply lines, so each is parsed once; the cache never
changes what a reply means and stays bounded."""

from __future__ import annotations

from postwell.smtp import client as client_mod
from postwell.smtp.client import (NEED_DATA, ContentWanted, Envelope, MessageDone, Recipient,
                                  SmtpClient, TransactionFailed, parse_reply_lines)


def _ready(ext=b"250-sink\r\n250-PIPELINING\r\n250 ENHANCEDSTATUSCODES\r\n"):
    c = SmtpClient("client.test")
    c.receive_data(b"220 sink ESMTP\r\n")
    c.receive_data(ext)
    while c.next_event() is not NEED_DATA:
        pass
    c.data_to_send()
    return c


def _events(c):
    out = []
    while (ev := c.next_event()) is not NEED_DATA:
        out.append(ev)
    return out


def _transaction(c, replies, final):
    c.start_transaction(Envelope("s@x.test", (Recipient("r@y.test", None, None),), 10,
                                 None, False, None, None))
    c.data_to_send()
    c.receive_data(replies)
    evs = _events(c)
    if any(isinstance(e, ContentWanted) for e in evs):
        c.send_content(b"Subject: t\n\nhi\n")
        c.end_content()
        c.data_to_send()
        c.receive_data(final)
        evs += _events(c)
    return evs


def test_repeated_replies_mean_the_same_as_fresh_ones():
    client_mod._REPLY_CACHE.clear()
    c = _ready()
    first = _transaction(c, b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 go\r\n", b"250 2.0.0 Ok\r\n")
    again = _transaction(c, b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 go\r\n", b"250 2.0.0 Ok\r\n")
    assert [type(e) for e in first] == [type(e) for e in again]
    done = [e for e in again if isinstance(e, MessageDone)][0]
    assert done.reply == parse_reply_lines([b"250 2.0.0 Ok"])
    assert done.reply.enhanced == "2.0.0" and done.reply.text == "Ok"
    assert b"250 2.0.0 Ok" in client_mod._REPLY_CACHE


def test_a_cached_line_inside_a_multiline_reply_is_only_its_last_line():
    client_mod._REPLY_CACHE.clear()
    c = _ready()
    _transaction(c, b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 go\r\n", b"250 2.0.0 Ok\r\n")
    # "250 2.0.0 Ok" is cached; here it ends a two-line reply.
    evs = _transaction(c, b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 go\r\n",
                       b"250-2.0.0 first\r\n250 2.0.0 Ok\r\n")
    done = [e for e in evs if isinstance(e, MessageDone)][0]
    assert done.reply.text == "first\nOk"
    assert str(done.reply) == "250-2.0.0 first 250 2.0.0 Ok"


def test_cached_refusal_still_fails_the_transaction():
    client_mod._REPLY_CACHE.clear()
    for _ in range(2):
        c = _ready()
        evs = _transaction(c, b"550 5.1.1 no\r\n503 5.5.1 nested\r\n554 5.5.1 no valid rcpt\r\n",
                           b"")
        failed = [e for e in evs if isinstance(e, TransactionFailed)]
        assert failed and failed[0].reply.code == 550 and failed[0].command == "MAIL FROM"


def test_cache_is_bounded_and_skips_long_lines(monkeypatch):
    client_mod._REPLY_CACHE.clear()
    monkeypatch.setattr(client_mod, "_REPLY_CACHE_SIZE", 8)
    c = _ready()
    for n in range(50):
        c.reset()
        c.data_to_send()
        c.receive_data(b"250 2.0.0 reset %d\r\n" % n)
        _events(c)
        assert len(client_mod._REPLY_CACHE) <= 8
    c.reset()
    c.data_to_send()
    long = b"250 2.0.0 " + b"x" * 600
    c.receive_data(long + b"\r\n")
    _events(c)
    assert long not in client_mod._REPLY_CACHE
