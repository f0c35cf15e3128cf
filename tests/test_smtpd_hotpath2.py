"""smtpd hot path, part 2 (issue 8): replies leave at the end of the event-loop turn,
every session's together.  What must not change: a log line that precedes a reply in
Postfix is in the maillog before the client sees that reply; a session's bytes keep
their order whatever path writes them (a close, STARTTLS, a 421); a client that does
not read its replies still cannot make the server buffer without bound."""

from __future__ import annotations

import asyncio
import re
import smtplib
import socket
import threading
import time

from postwell.smtpd.server import SmtpdServer, SmtpdSession

from test_smtpd import WAIT, codes, raw_session, smtpd   # noqa: F401 - fixture


def _recv_reply(sock: socket.socket, buf: bytearray) -> bytes:
    """One complete (possibly multi-line) reply, within WAIT seconds."""
    deadline = time.monotonic() + WAIT
    while True:
        m = re.search(rb"(?:^|\r\n)(\d{3} [^\r\n]*\r\n)", bytes(buf))
        if m:
            end = m.end()
            reply = bytes(buf[:end])
            del buf[:end]
            return reply
        left = deadline - time.monotonic()
        assert left > 0, f"no reply within {WAIT}s: {bytes(buf)!r}"
        sock.settimeout(left)
        data = sock.recv(65536)
        assert data, f"connection closed, have {bytes(buf)!r}"
        buf += data


def test_log_line_is_in_the_log_before_its_reply_reaches_the_client(smtpd):
    # Postfix's smtpd logs synchronously, then replies: a reader of the maillog who has
    # just seen the reply finds the line (the parity tests rely on it).
    r = smtpd({"mynetworks": "10.9.9.0/24"})
    s = socket.create_connection(("127.0.0.1", r.port), timeout=WAIT)
    buf = bytearray()
    try:
        assert _recv_reply(s, buf).startswith(b"220 ")
        assert r.lines()[-1] == "connect from unknown[127.0.0.1]"
        s.sendall(b"EHLO client.example\r\n")
        assert _recv_reply(s, buf).startswith(b"250-mx.example.test")
        s.sendall(b"MAIL FROM:<a@example.org>\r\n")
        assert _recv_reply(s, buf) == b"250 2.1.0 Ok\r\n"
        s.sendall(b"RCPT TO:<b@mx.example.test>\r\n")
        assert _recv_reply(s, buf) == b"250 2.1.5 Ok\r\n"
        assert re.fullmatch(r"[0-9A-F]+: client=unknown\[127\.0\.0\.1\]", r.lines()[-1])
        s.sendall(b"RCPT TO:<x@elsewhere.example>\r\n")
        assert _recv_reply(s, buf).startswith(b"454 4.7.1 <x@elsewhere.example>")
        assert "reject: RCPT from unknown[127.0.0.1]: 454 4.7.1" in r.lines()[-1]
        s.sendall(b"DATA\r\n")
        assert _recv_reply(s, buf).startswith(b"354 ")
        s.sendall(b"Message-ID: <m1@example.org>\r\n\r\nbody\r\n.\r\n")
        reply = _recv_reply(s, buf)
        m = re.fullmatch(rb"250 2\.0\.0 Ok: queued as ([0-9A-F]+)\r\n", reply)
        assert m, reply
        assert f"{m.group(1).decode()}: message-id=<m1@example.org>" in r.lines()
        s.sendall(b"QUIT\r\n")
        assert _recv_reply(s, buf) == b"221 2.0.0 Bye\r\n"
    finally:
        s.close()
    r.wait_log("disconnect from")


def test_many_concurrent_sessions_each_get_their_own_replies_in_order(smtpd):
    r = smtpd()
    results: dict[int, object] = {}

    def client(n: int) -> None:
        try:
            with smtplib.SMTP("127.0.0.1", r.port, timeout=WAIT) as c:
                c.ehlo(f"c{n}.example")
                refused = c.sendmail(f"s{n}@example.org", [f"r{n}@mx.example.test"],
                                     f"Subject: {n}\r\n\r\nbody {n}\r\n".encode())
                results[n] = (refused, c.noop()[0])
        except Exception as exc:   # noqa: BLE001 - reported by the assertion below
            results[n] = exc

    threads = [threading.Thread(target=client, args=(n,)) for n in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(3 * WAIT)
    assert results == {n: ({}, 250) for n in range(16)}
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline and \
            sum("disconnect from" in line for line in r.lines()) < 16:
        time.sleep(0.02)
    queued = r.queued()
    assert len(queued) == 16
    senders = sorted(r.store.open(q, "incoming").sender for q in queued)
    assert senders == sorted(f"s{n}@example.org" for n in range(16))

    async def bookkeeping():
        return r.server._woken, r.server._out_sessions, len(r.server.sessions)

    # Every woken session was counted out again, nothing is left held.
    assert asyncio.run_coroutine_threadsafe(bookkeeping(), r.loop).result(WAIT) == (0, [], 0)


def test_pipelined_groups_keep_their_order_up_to_the_close(smtpd):
    r = smtpd()
    out = raw_session(r.port, [
        b"EHLO x\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@mx.example.test>\r\n"
        b"RCPT TO:<c@mx.example.test>\r\nDATA\r\n",
        b"Subject: x\r\n\r\nhello\r\n.\r\nNOOP\r\nRSET\r\nQUIT\r\n"])
    assert codes(out) == ["220", "250-", "250-", "250-", "250-", "250-", "250-", "250-",
                          "250-", "250-", "250", "250", "250", "250", "354", "250", "250",
                          "250", "221"]
    assert out.endswith(b"250 2.0.0 Ok\r\n250 2.0.0 Ok\r\n221 2.0.0 Bye\r\n")


def test_reply_of_the_last_turn_precedes_the_hang_up_after_eof(smtpd):
    # The client's last command and its EOF arrive together: the NOOP's reply (held for
    # the end of the turn) still goes out before the connection is closed.
    r = smtpd()
    s = socket.create_connection(("127.0.0.1", r.port), timeout=WAIT)
    buf = bytearray()
    try:
        assert _recv_reply(s, buf).startswith(b"220 ")
        s.sendall(b"HELO x\r\nNOOP\r\n")
        s.shutdown(socket.SHUT_WR)
        data = bytes(buf)
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            s.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    finally:
        s.close()
    assert data == b"250 mx.example.test\r\n250 2.0.0 Ok\r\n"
    assert r.wait_log("lost connection after NOOP from unknown\\[127.0.0.1\\]")
    assert r.wait_log("disconnect from").endswith("helo=1 noop=1 commands=2")


def test_client_that_never_reads_replies_cannot_grow_the_output_without_bound(smtpd):
    r = smtpd({"smtpd_junk_command_limit": "1000000", "smtpd_timeout": "30s"})
    s = socket.create_connection(("127.0.0.1", r.port), timeout=WAIT)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.recv(4096)                                   # the greeting
        s.setblocking(False)
        chunk = b"NOOP\r\n" * 10000
        sent = 0
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline and sent < 20_000_000:
            try:
                sent += s.send(chunk)
            except BlockingIOError:
                time.sleep(0.05)                       # the server stopped reading: full
        assert sent < 20_000_000, "the server read everything without writing"

        async def held():
            return [x.transport.get_write_buffer_size() + len(getattr(x, "_out", None) or b"")
                    for x in r.server.sessions]

        sizes = asyncio.run_coroutine_threadsafe(held(), r.loop).result(WAIT)
        # Only the replies to what the read bound let in (plus one network read: under
        # 1 MB of NOOP replies) wait in user space; the rest of the input stays unread.
        assert sizes and max(sizes) < 3 * 1024 * 1024, sizes
    finally:
        s.close()


class _Transport:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closing = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def is_closing(self) -> bool:
        return self.closing


class _Server:
    wrapper_mode = False

    def __init__(self) -> None:
        self._out_sessions: list = []
        self._out_scheduled = False
        self._woken = 0

    # The real reply writer, on a server stand-in without sockets.
    _output_waiting = SmtpdServer._output_waiting
    _write_out_soon = SmtpdServer._write_out_soon
    _write_out = SmtpdServer._write_out


def test_held_reply_goes_first_when_a_write_must_keep_its_place():
    async def main():
        srv = _Server()
        a, b = SmtpdSession(srv), SmtpdSession(srv)
        a.transport, b.transport = _Transport(), _Transport()
        a._send_later(b"250 one\r\n")
        b._send_later(b"250 b\r\n")
        a._send_later(b"250 two\r\n")          # same turn: joined to what a holds
        a._send_now(b"421 bye\r\n")            # e.g. the timeout reply or a TLS 220
        assert a.transport.written == [b"250 one\r\n250 two\r\n421 bye\r\n"]
        assert b.transport.written == []        # b's reply waits for the end of the turn
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert a.transport.written == [b"250 one\r\n250 two\r\n421 bye\r\n"]
        assert b.transport.written == [b"250 b\r\n"]
        # A transport closed meanwhile gets nothing more.
        b._send_later(b"250 late\r\n")
        b.transport.closing = True
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert b.transport.written == [b"250 b\r\n"] and b._out is None
        # One end-of-turn callback per turn, however many sessions wrote.
        calls = []
        srv._write_out = lambda: calls.append(1) or _Server._write_out(srv)
        for x in (a, b):
            x.transport = _Transport()
            x._send_later(b"x")
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert calls == [1]

    asyncio.run(main())


def test_replies_wait_only_for_sessions_still_to_run_in_this_pass():
    async def main():
        srv = _Server()
        a, b, c = SmtpdSession(srv), SmtpdSession(srv), SmtpdSession(srv)
        for x in (a, b, c):
            x.transport = _Transport()
        srv._woken = 2                          # two more sessions got input this pass
        a._reply_out(b"250 a\r\n")
        srv._woken = 1
        b._reply_out(b"250 b\r\n")
        assert a.transport.written == b.transport.written == []
        srv._woken = 0                          # c is the last: it writes them all
        c._reply_out(b"250 c\r\n")
        assert [x.transport.written for x in (a, b, c)] == [[b"250 a\r\n"], [b"250 b\r\n"],
                                                            [b"250 c\r\n"]]
        # Alone in its pass (one client, or a reply after the queue-file commit): no
        # waiting at all, as before.
        a._reply_out(b"250 again\r\n")
        assert a.transport.written[-1] == b"250 again\r\n" and srv._out_sessions == []
        # A woken session that answers nothing: the held replies leave at the end of
        # the pass anyway.
        srv._woken = 1
        b._reply_out(b"354 go on\r\n")
        srv._woken = 0
        assert b.transport.written == [b"250 b\r\n"]
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert b.transport.written == [b"250 b\r\n", b"354 go on\r\n"]

    asyncio.run(main())

