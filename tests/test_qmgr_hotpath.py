"""qmgr + smtp(8) per-message costs (issue 8), kept from coming back and
kept correct:

- the smtp client talks through its own asyncio Protocol (_Stream): replies
  are read without a Timeout object per read, writes need no await when the
  socket takes them; timeouts, end of file and lost connections still show;
- a cached connection keeps one idle timer across reuses, which still closes
  it after smtp_connection_cache_time_limit of real idleness and never while
  it is busy;
- the closer thread takes queued files in batches;
- logged addresses are remembered (same text as policy's log_address);
- the long-line check of content conversion gives the split-based answer.
"""

from __future__ import annotations

import asyncio
import queue
import random
import threading

import pytest

from postwell.config.main import Config
from postwell.delivery.base import DeliveryRequest, Recipient
from postwell.delivery.smtp import SmtpDeliveryAgent, _Stream
from postwell.dns import FakeResolver
from postwell.log import NullLog
from postwell.qmgr import logfmt
from postwell.qmgr import manager as manager_mod
from postwell.policy.restrictions import log_address as policy_log_address
from postwell.smtp.client import has_long_line

TIMEOUT = 30


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, TIMEOUT))


# ------------------------------------------------------------ a loopback SMTP server

class Sink:
    """Answers EHLO with PIPELINING, 250 to MAIL/RCPT, 354 to DATA and
    250 to the end of data; counts sessions, messages and QUITs."""

    def __init__(self, *, close_after_greeting=False):
        self.sessions = 0
        self.messages = 0
        self.quits = 0
        self.closed = 0
        self.close_after_greeting = close_after_greeting
        self.server = None

    async def start(self):
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self):
        self.server.close()
        await self.server.wait_closed()

    async def _serve(self, reader, writer):
        self.sessions += 1
        writer.write(b"220 sink.test ESMTP\r\n")
        try:
            if self.close_after_greeting:
                return
            in_data = False
            while True:
                line = await asyncio.wait_for(reader.readline(), TIMEOUT)
                if not line:
                    break
                if in_data:
                    if line == b".\r\n":
                        in_data = False
                        self.messages += 1
                        writer.write(b"250 2.0.0 Ok: queued as SINK\r\n")
                    continue
                verb = line[:4].upper()
                if verb == b"EHLO":
                    writer.write(b"250-sink.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
                elif verb == b"DATA":
                    in_data = True
                    writer.write(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                elif verb == b"QUIT":
                    self.quits += 1
                    writer.write(b"221 2.0.0 Bye\r\n")
                    break
                else:
                    writer.write(b"250 2.1.0 Ok\r\n")
        finally:
            self.closed += 1
            writer.close()


def make_config(**params):
    base = {"myhostname": "client.test", "smtp_helo_name": "client.test",
            "inet_protocols": "ipv4"}
    base.update({k: str(v) for k, v in params.items()})
    return Config("/nonexistent", base, {}, [])


def agent(**params):
    return SmtpDeliveryAgent(make_config(**params), FakeResolver({}), NullLog("smtp"),
                             rng=random.Random(0), own_addresses=frozenset())


def request(port, rcpt="a@x.test", qid="ABC"):
    content = b"Subject: t\n\n.dot\nhello\n"
    return DeliveryRequest(queue_id=qid, sender="s@client.test", recipients=[Recipient(rcpt)],
                           transport="smtp", nexthop=f"[127.0.0.1]:{port}", arrival_time=0.0,
                           open_content=lambda: iter([content]), content_size=len(content))


async def wait_until(cond, timeout=5.0):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        assert loop.time() < deadline, "condition never came true"
        await asyncio.sleep(0.01)


# ------------------------------------------------------------ _Stream

async def _pair():
    """A _Stream connected to a loopback server; returns (stream, server writer)."""
    loop = asyncio.get_running_loop()
    accepted = loop.create_future()

    async def serve(reader, writer):
        accepted.set_result((reader, writer))
    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    _, stream = await loop.create_connection(lambda: _Stream(loop), "127.0.0.1", port)
    reader, writer = await asyncio.wait_for(accepted, TIMEOUT)
    return stream, reader, writer, server


def test_stream_reads_what_came_and_times_out_when_nothing_does():
    async def go():
        stream, reader, writer, server = await _pair()
        try:
            writer.write(b"220 hi\r\n")
            assert await stream.read_some(TIMEOUT) == b"220 hi\r\n"
            with pytest.raises(asyncio.TimeoutError):
                await stream.read_some(0.05)
            assert stream._waiter is None          # noqa: SLF001 - nothing left behind
            stream.write(b"EHLO x\r\n")
            stream.check()                         # connection alive: no error
            assert await asyncio.wait_for(reader.readline(), TIMEOUT) == b"EHLO x\r\n"
            # End of file: what was sent before it first, then b"".
            writer.write(b"221 bye\r\n")
            writer.close()
            got = b""
            while True:
                data = await stream.read_some(TIMEOUT)
                if not data:
                    break
                got += data
            assert got == b"221 bye\r\n"
            assert stream.at_eof()
        finally:
            stream.close()
            server.close()
            await server.wait_closed()
    run(go())


def test_stream_reports_a_lost_connection():
    async def go():
        stream, reader, writer, server = await _pair()
        try:
            writer.transport.abort()
            try:
                assert await stream.read_some(TIMEOUT) == b""    # end of file
            except ConnectionResetError:
                pass                                            # or a reset
            # Writing to a peer that is gone: the reset shows at the next
            # write's check, as StreamWriter.drain() reported it.
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 5
            while not stream._lost:                  # noqa: SLF001
                assert loop.time() < deadline
                stream.write(b"RSET\r\n")
                await asyncio.sleep(0.01)
            with pytest.raises(OSError):
                stream.check()
            with pytest.raises(OSError):
                await stream.drain()
        finally:
            stream.close()
            server.close()
            await server.wait_closed()
    run(go())


def test_stream_wakes_a_waiting_reader_on_connection_loss():
    async def go():
        stream, reader, writer, server = await _pair()
        try:
            waiting = asyncio.ensure_future(stream.read_some(TIMEOUT))
            await asyncio.sleep(0)
            writer.close()
            assert await asyncio.wait_for(waiting, TIMEOUT) == b""
        finally:
            stream.close()
            server.close()
            await server.wait_closed()
    run(go())


# ------------------------------------------------------------ the agent on _Stream

def test_delivery_goes_through_the_protocol_and_reuses_the_connection():
    async def go():
        sink = await Sink().start()
        a = agent(smtp_connection_cache_time_limit="30s")
        try:
            first = await a.deliver(request(sink.port, "a@x.test", "Q1"))
            conn = a._cache[f"smtp:[127.0.0.1]:{sink.port}"][0]
            assert isinstance(conn.writer, _Stream) and conn.reader is conn.writer
            handle = conn.idle_handle
            second = await a.deliver(request(sink.port, "b@x.test", "Q2"))
            third = await a.deliver(request(sink.port, "c@x.test", "Q3"))
            # One idle timer for the connection's whole stay in the cache.
            assert conn.idle_handle is handle
        finally:
            await a.close_all()
            await sink.stop()
        return sink, first, second, third
    sink, first, second, third = run(go())
    assert [r[0].status for r in (first, second, third)] == ["sent"] * 3
    assert first[0].reason == "250 2.0.0 Ok: queued as SINK"
    assert getattr(first[0], "conn_use", None) is None
    assert (second[0].conn_use, third[0].conn_use) == (2, 3)
    assert sink.sessions == 1 and sink.messages == 3 and sink.quits == 1


def test_server_that_hangs_up_is_a_lost_connection():
    async def go():
        sink = await Sink(close_after_greeting=True).start()
        a = agent()
        try:
            return await a.deliver(request(sink.port))
        finally:
            a.close()
            await sink.stop()
    res = run(go())
    assert res[0].status == "deferred"
    assert res[0].reason.startswith("lost connection with 127.0.0.1[127.0.0.1] while ")


def test_silent_server_times_out_at_the_stage_timeout():
    async def go():
        async def mute(reader, writer):
            await asyncio.sleep(TIMEOUT)
        server = await asyncio.start_server(mute, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        a = agent(smtp_helo_timeout="1s")
        a.settings.helo_timeout = 0.1            # the greeting wait: no real second
        try:
            return await a.deliver(request(port))
        finally:
            a.close()
            server.close()
    res = run(go())
    assert res[0].status == "deferred"
    assert res[0].reason == ("conversation with 127.0.0.1[127.0.0.1] timed out while "
                             "receiving the initial server greeting")


def _fire(handle):
    """Run a loop timer's callback now (the test's clock is the idle_since stamp)."""
    callback, args = handle._callback, handle._args   # noqa: SLF001 - asyncio's TimerHandle
    handle.cancel()
    callback(*args)


def test_idle_timer_checks_real_idleness_and_spares_busy_connections():
    async def go():
        sink = await Sink().start()
        a = agent(smtp_connection_cache_time_limit="30s")
        key = f"smtp:[127.0.0.1]:{sink.port}"
        try:
            await a.deliver(request(sink.port))
            conn = a._cache[key][0]
            # Fired while the connection was put back recently: waits on.
            first = conn.idle_handle
            _fire(first)
            assert conn.idle_handle is not None and conn.idle_handle is not first
            assert a._cache[key] == [conn] and not conn.closed
            # Fired while a delivery holds it: left alone, no timer.
            assert a._take_cached(key) is conn
            _fire(conn.idle_handle)
            assert conn.idle_handle is None and not conn.closed
            # Back in the cache: a new timer; idle long enough: QUIT.
            a._put_cached(key, conn)
            assert conn.idle_handle is not None
            conn.idle_since -= 31
            _fire(conn.idle_handle)
            assert a._cache[key] == []
            await wait_until(lambda: sink.quits == 1)
        finally:
            await a.close_all()
            await sink.stop()
    # asyncio's own loop, whose timer handles _fire() can run.
    with asyncio.Runner(loop_factory=asyncio.SelectorEventLoop) as runner:
        runner.run(asyncio.wait_for(go(), TIMEOUT))


def test_zero_cache_time_closes_at_once():
    async def go():
        sink = await Sink().start()
        a = agent(smtp_connection_cache_time_limit="0s")
        try:
            await a.deliver(request(sink.port))
            await wait_until(lambda: sink.quits == 1)
        finally:
            await a.close_all()
            await sink.stop()
        return sink
    assert run(go()).sessions == 1


# ------------------------------------------------------------ closer thread

def test_closer_takes_queued_files_in_one_batch(monkeypatch):
    monkeypatch.setattr(manager_mod, "CLOSE_BATCH_DELAY", 0)
    closed = []

    class File:
        def __init__(self, n):
            self.n = n

        def close(self):
            closed.append(self.n)
            if self.n == 2:
                raise OSError("EIO")         # one failure does not stop the rest

    class Stop(Exception):
        pass

    class Q:
        """A queue with 5 files, then the end of the test."""
        def __init__(self):
            self.q = queue.SimpleQueue()
            for i in range(5):
                self.q.put(File(i))
            self.gets = 0

        def get(self):
            self.gets += 1
            if self.gets > 1:
                raise Stop
            return self.q.get_nowait()

        def get_nowait(self):
            return self.q.get_nowait()
    q = Q()
    with pytest.raises(Stop):
        manager_mod._close_loop(q)
    assert closed == [0, 1, 2, 3, 4]
    assert q.gets == 2                        # one blocking get for all five


def test_close_later_still_closes_everything_on_the_thread():
    done = threading.Event()
    seen = []

    class File:
        def __init__(self, n):
            self.n = n

        def close(self):
            seen.append((self.n, threading.current_thread().name))
            if self.n == 9:
                done.set()
    for i in range(10):
        manager_mod.close_later(File(i))
    assert done.wait(5)
    assert [n for n, _ in seen] == list(range(10))
    assert {name for _, name in seen} == {"qmgr-close"}


# ------------------------------------------------------------ log lines

@pytest.mark.parametrize("address", [
    "user@example.com", "", "a.b@x.test", "with space@x.test", '"quoted"@x.test',
    "a..b@x.test", ".lead@x.test", "MAILER-DAEMON", "weird\\slash@x.test", "x@y@z",
])
def test_remembered_log_address_matches_policy(address):
    assert logfmt.log_address(address) == policy_log_address(address)
    assert logfmt.log_address(address) == policy_log_address(address)   # from the memo


def test_log_address_memo_is_bounded():
    for i in range(2100):
        assert logfmt.log_address(f"u{i}@x.test") == f"u{i}@x.test"
    assert logfmt.log_address.cache_info().currsize <= 1024


def test_delivery_line_unchanged():
    line = logfmt.delivery_line("4AB12", "a b@x.test", "Orig@x.test", "mx[1.2.3.4]:25",
                                arrival=100.0, active=100.5, handoff=100.51,
                                conn_setup=100.6, now=101.234, dsn="2.0.0", status="sent",
                                reason="250 2.0.0 Ok", conn_use=3)
    assert line == ('4AB12: to=<"a b"@x.test>, orig_to=<Orig@x.test>, relay=mx[1.2.3.4]:25, '
                    "conn_use=3, delay=1.2, delays=0.5/0.01/0.09/0.63, dsn=2.0.0, "
                    "status=sent (250 2.0.0 Ok)")


# ------------------------------------------------------------ long-line check

def test_long_line_check_matches_split():
    rng = random.Random(8)
    for _ in range(20000):
        data = bytes(rng.choice(b"ab\n") for _ in range(rng.randint(0, 50)))
        start = rng.randint(0, len(data))
        limit = rng.randint(1, 14)
        want = max(map(len, data[start:].split(b"\n"))) >= limit
        assert has_long_line(data, start, limit) == want, (data, start, limit)
