"""smtpd_soft_error_limit / smtpd_error_sleep_time: when the reply delay starts and how
long it is, as measured against Postfix 3.7 (one reply at a time, soft limit 3, sleep
1 s: the fourth error reply is the first delayed one; every reply line of a delayed
multi-line reply sleeps once, so a ten-line EHLO waits ten seconds)."""

from __future__ import annotations

import pytest

from postwell.smtp.reply import Reply
from postwell.smtp.server import NEED_DATA, ServerConfig, ServerConnection

CFG = ServerConfig(hostname="mx.example.com", soft_error_limit=3, error_sleep_time=1.0)


def _delays(lines: list[bytes], replies=None) -> list[tuple[int, float]]:
    """(reply code, delay before it) per command line, fed one at a time."""
    conn = ServerConnection(CFG, client="unknown[127.0.0.1]")
    conn.send_greeting(Reply(220, "mx.example.com ESMTP"))
    conn.data_to_send()
    out = []
    for line in lines:
        conn.receive_data(line + b"\r\n")
        while True:
            ev = conn.next_event()
            if ev is NEED_DATA:
                break
            if ev.needs_reply:
                conn.send_reply((replies or {}).get(type(ev).__name__))
        data = conn.data_to_send()
        out.append((int(data[:3]), conn.error_delay()))
    return out


@pytest.mark.parametrize("cmd", [b"FOO", b"MAIL FROM:", b"RCPT TO:<a@b>", b"DATA",
                                 b"STARTTLS x", b"VRFY", b""])
def test_the_error_reaching_the_limit_is_answered_at_once(cmd):
    got = _delays([b"EHLO c"] + [cmd] * 5)
    assert [d for _, d in got] == [0, 0, 0, 0, 1.0, 1.0]


def test_a_multi_line_reply_sleeps_once_per_line():
    got = _delays([b"EHLO c", b"FOO", b"FOO", b"FOO", b"EHLO c", b"NOOP"])
    assert got[0] == (250, 0)
    assert _ehlo_line_count() > 5
    assert got[4] == (250, pytest.approx(1.0 * _ehlo_line_count()))
    assert got[5] == (250, 1.0)


def _ehlo_line_count() -> int:
    conn = ServerConnection(CFG, client="unknown[127.0.0.1]")
    conn.send_greeting(Reply(220, "mx.example.com ESMTP"))
    conn.data_to_send()
    conn.receive_data(b"EHLO c\r\n")
    while conn.next_event() is not NEED_DATA:
        conn.send_reply(None)
    return conn.data_to_send().count(b"\r\n")


def test_a_refused_recipient_counts_after_its_reply():
    rej = Reply(554, "<x@y>: Relay access denied", "5.7.1")
    got = _delays([b"EHLO c", b"MAIL FROM:<a@b>"] + [b"RCPT TO:<x@y>"] * 4,
                  replies={"Rcpt": rej})
    assert [d for _, d in got] == [0, 0, 0, 0, 0, 1.0]
