"""Fuzz the sans-IO engine: it never raises and never buffers beyond its bound."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from postwell.smtp.reply import Reply
from postwell.smtp.server import NEED_DATA, PAUSED, ConnectionClosed, ServerConfig, ServerConnection

CFG = ServerConfig(hostname="mx", line_length_limit=512, message_size_limit=4096,
                   starttls_offered=True, auth_mechanisms=("PLAIN",), error_sleep_time=0)

TOKENS = [b"EHLO x\r\n", b"HELO y\r\n", b"MAIL FROM:<a@b>\r\n", b"MAIL FROM:<>\r\n",
          b"RCPT TO:<c@d>\r\n", b"DATA\r\n", b"BDAT 3\r\n", b"BDAT 2 LAST\r\n", b"BDAT 0 LAST\r\n",
          b"RSET\r\n", b"NOOP\r\n", b"QUIT\r\n", b"VRFY a\r\n", b"ETRN d\r\n", b"STARTTLS\r\n",
          b"AUTH PLAIN\r\n", b"*\r\n", b".\r\n", b"\r\n.\r\n", b"\n.\n", b"\r.\r", b"..\r\n",
          b"\x00", b"\n", b"\r", b"x" * 700, b"abc", b"BDAT 99999999\r\n", b"BDAT x\r\n"]


def run(chunks, replies):
    c = ServerConnection(CFG, client="unknown[127.0.0.1]")
    c.send_greeting(Reply(220, "mx"))
    i = 0
    bound = CFG.line_length_limit + max((len(x) for x in chunks), default=0)
    for ch in chunks + [b""]:
        c.receive_data(ch)
        for _ in range(10000):
            ev = c.next_event()
            assert c.buffered <= bound
            if ev is NEED_DATA or isinstance(ev, ConnectionClosed):
                break
            assert ev is not PAUSED
            if ev.needs_reply:
                r = replies[i % len(replies)]
                i += 1
                c.send_reply(r)
        else:
            raise AssertionError("engine loops")
        c.data_to_send()
        if c.closed:
            break


REPLIES = st.lists(st.sampled_from([None, Reply(250, "Ok", "2.0.0"), Reply(554, "no", "5.7.1"),
                                    Reply(451, "later", "4.3.0"), Reply(334, ""), Reply(220, "go")]),
                   min_size=1, max_size=5)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(TOKENS), max_size=40), REPLIES)
def test_token_soup(chunks, replies):
    run(chunks, replies)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=20), REPLIES)
def test_random_bytes(chunks, replies):
    run([b"EHLO x\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n"] + chunks, replies)
    run(chunks, replies)
