"""anvil(8): counters (injected clock), the wire protocol, the pipelined client
and the smtpd limit texts.  No MTA instance here: see test_anvil_e2e.py."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import threading
import time

import pytest

from postwell.anvil import (UNAVAILABLE, AnvilClient, AnvilTable, SmtpdLimits, _ServerStream,
                            _bind, handle_line)
from postwell.log import NullLog


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def table(unit=60.0, **kw):
    clock = Clock()
    return AnvilTable(unit, clock=clock, wall=lambda: 1764401400.0, **kw), clock


# ---------------------------------------------------------------- counters

def test_connect_counts_and_rates():
    t, clock = table()
    assert t.connect("smtp:1.2.3.4") == (1, 1)
    assert t.connect("smtp:1.2.3.4") == (2, 2)
    t.disconnect("smtp:1.2.3.4")
    assert t.connect("smtp:1.2.3.4") == (2, 3)
    assert t.connect("smtp:5.6.7.8") == (1, 1)
    assert t.connect("submission:1.2.3.4") == (1, 1)   # per service, as Postfix's ident


def test_window_starts_at_first_event_and_resets_all_rates():
    t, clock = table(60)
    ident = "smtp:1.2.3.4"
    t.connect(ident)
    t.message(ident)
    t.recipient(ident)
    clock.t += 60            # start + unit is not yet < now: same window
    assert t.connect(ident) == (2, 2)
    assert t.message(ident) == 2
    clock.t += 0.5           # now past: a new window opens at this event
    assert t.connect(ident) == (3, 1)
    assert t.lookup(ident) == (3, 1, 0, 0, 0, 0)
    assert t.recipient(ident) == 1


def test_lookup_and_newtls_stat_do_not_count():
    t, clock = table()
    ident = "smtp:1.2.3.4"
    assert t.lookup(ident) == (0, 0, 0, 0, 0, 0)
    assert t.newtls_stat(ident) == 0
    assert ident not in t.entries
    t.newtls(ident)
    t.auth(ident)
    assert t.newtls_stat(ident) == 1
    assert t.lookup(ident) == (0, 0, 0, 0, 1, 1)
    clock.t += 61
    assert t.newtls_stat(ident) == 0


def test_idle_entries_expire_after_one_time_unit():
    t, clock = table(60)
    t.connect("smtp:a")
    t.message("smtp:b")                  # an entry without connections
    clock.t += 30
    t.disconnect("smtp:a")               # idle from now
    clock.t += 31
    t.purge()
    assert "smtp:b" not in t.entries     # idle since creation, 61 s ago
    assert "smtp:a" in t.entries         # idle 31 s only
    clock.t += 30
    t.purge()
    assert t.entries == {}


def test_busy_entry_never_expires_and_reuse_cancels_expiry():
    t, clock = table(60)
    t.connect("smtp:a")
    clock.t += 3600
    t.purge()
    assert t.lookup("smtp:a")[0] == 1
    t.disconnect("smtp:a")
    clock.t += 59
    t.connect("smtp:a")                  # back before expiry: no longer idle
    clock.t += 120
    t.purge()
    assert t.lookup("smtp:a")[0] == 1


def test_memory_bounded_under_address_flood():
    t, clock = table(60, max_idle=1000)
    for i in range(5000):
        ident = f"smtp:10.0.{i // 256}.{i % 256}"
        t.connect(ident)
        t.disconnect(ident)
    assert len(t.entries) <= 1001
    clock.t += 61
    t.purge()
    assert t.entries == {}


def test_disconnect_never_goes_negative():
    t, clock = table()
    t.disconnect("smtp:a")
    t.connect("smtp:a")
    t.disconnect("smtp:a")
    t.disconnect("smtp:a")
    assert t.connect("smtp:a")[0] == 1


def test_statistics_lines_as_postfix_and_reset():
    t, clock = table(60)
    for _ in range(3):
        t.connect("smtp:127.0.0.1")
    t.message("smtp:127.0.0.1")
    t.recipient("smtp:127.0.0.1")
    t.recipient("smtp:127.0.0.1")
    t.newtls("smtp:127.0.0.1")
    t.auth("smtp:127.0.0.1")
    lines = t.statistics()
    stamp = r"[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d"
    want = [
        r"statistics: max connection rate 3/60s for \(smtp:127\.0\.0\.1\) at " + stamp,
        r"statistics: max connection count 3 for \(smtp:127\.0\.0\.1\) at " + stamp,
        r"statistics: max message rate 1/60s for \(smtp:127\.0\.0\.1\) at " + stamp,
        r"statistics: max recipient rate 2/60s for \(smtp:127\.0\.0\.1\) at " + stamp,
        r"statistics: max newtls rate 1/60s for \(smtp:127\.0\.0\.1\) at " + stamp,
        r"statistics: max auth rate 1/60s for \(smtp:127\.0\.0\.1\) at " + stamp,
        r"statistics: max cache size 1 at " + stamp,
    ]
    assert len(lines) == len(want), lines
    for line, rx in zip(lines, want):
        assert re.fullmatch(rx, line), line
    assert t.statistics() == []


# ---------------------------------------------------------------- protocol

def test_handle_line_protocol():
    t, clock = table()
    held: dict = {}
    assert handle_line(t, b"connect smtp 1.2.3.4", held) == b"ok 1 1\n"
    assert handle_line(t, b"connect smtp 1.2.3.4", held) == b"ok 2 2\n"
    assert held == {"smtp:1.2.3.4": 2}
    assert handle_line(t, b"disconnect smtp 1.2.3.4", held) is None
    assert handle_line(t, b"message smtp 1.2.3.4", held) == b"ok 1\n"
    assert handle_line(t, b"recipient smtp 1.2.3.4", held) == b"ok 1\n"
    assert handle_line(t, b"newtls_stat smtp 1.2.3.4", held) == b"ok 0\n"
    assert handle_line(t, b"newtls smtp 1.2.3.4", held) == b"ok 1\n"
    assert handle_line(t, b"auth smtp 1.2.3.4", held) == b"ok 1\n"
    assert handle_line(t, b"lookup smtp 1.2.3.4", held) == b"ok 1 2 1 1 1 1\n"
    for bad in (b"", b"connect smtp", b"bogus smtp 1.2.3.4", b"connect a b c", b"connect \xff x"):
        with pytest.raises((ValueError, UnicodeError)):
            handle_line(t, bad, held)


def test_disconnect_only_releases_what_the_stream_registered():
    t, clock = table()
    a, b = {}, {}
    handle_line(t, b"connect smtp 1.2.3.4", a)
    handle_line(t, b"disconnect smtp 1.2.3.4", b)     # b never connected it
    assert t.lookup("smtp:1.2.3.4")[0] == 1


class _FakeTransport:
    def __init__(self):
        self.out = []
        self.closed = False

    def write(self, data):
        self.out.append(data)

    def close(self):
        self.closed = True


def test_server_stream_pipelining_split_lines_and_cleanup():
    t, clock = table()
    log = NullLog()
    s = _ServerStream(t, log)
    tr = _FakeTransport()
    s.connection_made(tr)
    s.data_received(b"connect smtp 1.2.3.4\nconnect smtp 1.2")
    s.data_received(b".3.4\ndisconnect smtp 1.2.3.4\nlookup smtp 1.2.3.4\n")
    assert b"".join(tr.out) == b"ok 1 1\nok 2 2\nok 1 2 0 0 0 0\n"
    # The worker dies holding one connection: anvil releases it.
    s.connection_lost(None)
    assert t.lookup("smtp:1.2.3.4")[0] == 0


def test_server_stream_rejects_garbage_and_long_lines():
    t, clock = table()
    log = NullLog()
    s = _ServerStream(t, log)
    tr = _FakeTransport()
    s.connection_made(tr)
    s.data_received(b"hello world\n")
    assert tr.closed and tr.out == [b"error bad request\n"]
    s2 = _ServerStream(t, log)
    tr2 = _FakeTransport()
    s2.connection_made(tr2)
    s2.data_received(b"x" * 600)
    assert tr2.closed


# ---------------------------------------------------------------- client <-> server

class _Server:
    """An anvil service on a temporary unix socket, in a thread with its own loop."""

    def __init__(self, path: str, clock=None) -> None:
        self.path = path
        self.table = AnvilTable(60, clock=clock or time.monotonic)
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.ready.wait(5)

    def _run(self):
        asyncio.set_event_loop(self.loop)
        sock = _bind(self.path)
        sock.setblocking(False)

        async def start():
            self.server = await self.loop.create_unix_server(
                lambda: _ServerStream(self.table, NullLog()), sock=sock)
        self.loop.run_until_complete(start())
        self.ready.set()
        self.loop.run_forever()

    def stop(self):
        def _close():
            self.server.close()
            for tr in list(getattr(self.server, "_transports", [])):
                tr.close()
            self.loop.stop()
        self.loop.call_soon_threadsafe(_close)
        self.thread.join(5)

    def lookup(self, ident):
        fut = asyncio.run_coroutine_threadsafe(self._lookup(ident), self.loop)
        return fut.result(5)

    async def _lookup(self, ident):
        return self.table.lookup(ident)


@pytest.fixture
def sockdir(tmp_path):
    d = tmp_path / "private"
    d.mkdir()
    return d


def _run(coro, timeout=10):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def test_bind_makes_0600_socket(sockdir):
    path = str(sockdir / "anvil")
    s = _bind(path)
    try:
        assert oct(os.stat(path).st_mode & 0o777) == "0o600"
        # A second bind (a new anvil after reload) replaces the name atomically.
        s2 = _bind(path)
        s2.close()
    finally:
        s.close()


def test_client_pipelines_many_requests_on_one_stream(sockdir):
    path = str(sockdir / "anvil")
    srv = _Server(path)
    try:
        async def main():
            c = AnvilClient(path, log=NullLog())
            got = await asyncio.gather(*(c.connect("smtp", "10.0.0.1") for _ in range(50)))
            assert sorted(g[0] for g in got) == list(range(1, 51))
            assert {g[2] for g in got} == {1}          # one stream for all
            assert c.generation == 1
            assert await c.message("smtp", "10.0.0.1") == 1
            assert await c.recipient("smtp", "10.0.0.1") == 1
            assert await c.auth("smtp", "10.0.0.1") == 1
            assert await c.newtls_stat("smtp", "10.0.0.1") == 0
            assert await c.newtls("smtp", "10.0.0.1") == 1
            for _ in range(20):
                c.disconnect("smtp", "10.0.0.1", 1)
            look = await c.lookup("smtp", "10.0.0.1")
            assert look == (30, 50, 1, 1, 1, 1)
            c.close()
        _run(main())
        # The closed stream's 30 remaining connections are released by anvil.
        deadline = time.monotonic() + 5
        while srv.lookup("smtp:10.0.0.1")[0] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert srv.lookup("smtp:10.0.0.1")[0] == 0
    finally:
        srv.stop()


def test_client_without_server_answers_none_quickly_and_warns_once(sockdir):
    path = str(sockdir / "anvil")
    log = NullLog()

    async def main():
        c = AnvilClient(path, log=log, retry=60, grace=0)
        t0 = time.monotonic()
        for _ in range(20):
            assert await c.connect("smtp", "10.0.0.1") is None
        assert time.monotonic() - t0 < 1
        assert await c.message("smtp", "10.0.0.1") is None
        c.disconnect("smtp", "10.0.0.1", 0)     # harmless
    _run(main())
    warnings = [ln for ln in log.lines if "anvil" in ln]
    assert len(warnings) == 1, log.lines


def test_client_reconnects_after_anvil_restart(sockdir):
    path = str(sockdir / "anvil")
    srv = _Server(path)

    async def main():
        nonlocal srv
        c = AnvilClient(path, log=NullLog(), retry=0)
        count, rate, gen = await c.connect("smtp", "10.0.0.2")
        assert (count, gen) == (1, 1)
        srv.stop()
        await asyncio.sleep(0.1)
        srv = _Server(path)
        # The first request may meet the dead stream; soon a new one answers.
        got = None
        for _ in range(50):
            got = await c.connect("smtp", "10.0.0.2")
            if got is not None:
                break
            await asyncio.sleep(0.02)
        assert got is not None and got[2] == 2 and got[0] == 1
        # The old session's disconnect must not reach the new anvil.
        c.disconnect("smtp", "10.0.0.2", gen)
        assert (await c.lookup("smtp", "10.0.0.2"))[0] == 1
        c.close()
    try:
        _run(main())
    finally:
        srv.stop()


def test_client_times_out_on_a_hung_anvil(sockdir):
    path = str(sockdir / "anvil")
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(path)
    lsock.listen(4)        # accepts (kernel backlog) but never answers
    try:
        async def main():
            c = AnvilClient(path, log=NullLog(), timeout=0.2, retry=60)
            t0 = time.monotonic()
            assert await c.connect("smtp", "10.0.0.3") is None
            assert time.monotonic() - t0 < 1.5
            assert await c.connect("smtp", "10.0.0.3") is None   # in back-off: at once
            assert time.monotonic() - t0 < 1.5
            c.close()
        _run(main())
    finally:
        lsock.close()


# ---------------------------------------------------------------- smtpd checks

class _Cfg:
    def __init__(self, **kw):
        self.values = kw

    def get_int(self, name):
        return int(self.values.get(name, "0"))

    def get(self, name):
        return self.values.get(name, "/nonexistent")


class _FakeClient:
    def __init__(self, answers=None):
        self.answers = answers or {}
        self.calls = []
        self.generation = 7

    async def connect(self, service, addr):
        self.calls.append(("connect", service, addr))
        a = self.answers.get("connect")
        return None if a is None else (*a, self.generation)

    def disconnect(self, service, addr, gen):
        self.calls.append(("disconnect", service, addr, gen))

    async def _one(self, verb, service, addr):
        self.calls.append((verb, service, addr))
        return self.answers.get(verb)

    def close(self):
        pass


class _Session:
    def __init__(self, addr="192.0.2.9", name="unknown"):
        self.addr = addr
        self.namaddr = f"{name}[{addr}]"

        class S:
            client_name = name
        self.state = S()


class _Exceptions:
    def __init__(self, addrs):
        self.addrs = addrs

    def match(self, name, addr):
        return addr in self.addrs


def _limits(answers=None, exceptions=None, **cfg):
    log = NullLog()
    client = _FakeClient(answers)
    lim = SmtpdLimits(_Cfg(**cfg), log, service="smtp", hostname="mx.example.org",
                      exceptions=exceptions, client=client)
    return lim, client, log


def test_from_config_none_when_every_limit_is_off():
    assert SmtpdLimits.from_config(_Cfg(), NullLog(), service="smtp", hostname="h") is None
    assert SmtpdLimits.from_config(_Cfg(smtpd_client_connection_count_limit="50"), NullLog(),
                                   service="smtp", hostname="h") is not None


def test_count_limit_reply_and_log_text():
    lim, client, log = _limits({"connect": (4, 4)}, smtpd_client_connection_count_limit="3")
    s = _Session()
    r = asyncio.run(lim.connect(s))
    assert (r.code, r.enhanced, r.text) == (421, "4.7.0",
                                            "mx.example.org Error: too many connections from "
                                            "192.0.2.9")
    assert log.lines[-1].endswith("warning: Connection concurrency limit exceeded: 4 from "
                                  "unknown[192.0.2.9] for service smtp"), log.lines
    lim.disconnect(s)
    lim.disconnect(s)                     # once only
    assert client.calls[-1] == ("disconnect", "smtp", "192.0.2.9", 7)
    assert sum(1 for c in client.calls if c[0] == "disconnect") == 1


def test_connection_rate_limit_reply_and_log_text():
    lim, client, log = _limits({"connect": (1, 3)}, smtpd_client_connection_count_limit="3",
                               smtpd_client_connection_rate_limit="2")
    r = asyncio.run(lim.connect(_Session()))
    assert r.code == 421 and r.text == "mx.example.org Error: too many connections from 192.0.2.9"
    assert log.lines[-1].endswith("warning: Connection rate limit exceeded: 3 from "
                                  "unknown[192.0.2.9] for service smtp")


def test_within_limits_unavailable_and_exempt():
    lim, client, log = _limits({"connect": (3, 3)}, smtpd_client_connection_count_limit="3",
                               smtpd_client_connection_rate_limit="3")
    assert asyncio.run(lim.connect(_Session())) is None
    lim, client, log = _limits({}, smtpd_client_connection_count_limit="3")
    assert asyncio.run(lim.connect(_Session())) is UNAVAILABLE
    lim, client, log = _limits({"connect": (9, 9)}, exceptions=_Exceptions({"192.0.2.9"}),
                               smtpd_client_connection_count_limit="3")
    s = _Session()
    assert asyncio.run(lim.connect(s)) is None
    lim.disconnect(s)
    assert client.calls == []            # exempt clients are not even counted


@pytest.mark.parametrize("method,verb,param,code,enh,text,logtext", [
    ("mail", "message", "smtpd_client_message_rate_limit", 450, "4.7.1",
     "Error: too much mail from 192.0.2.9",
     "Message delivery request rate limit exceeded: 3 from unknown[192.0.2.9] for service smtp"),
    ("rcpt", "recipient", "smtpd_client_recipient_rate_limit", 450, "4.7.1",
     "Error: too many recipients from 192.0.2.9",
     "Recipient address rate limit exceeded: 3 from unknown[192.0.2.9] for service smtp"),
    ("auth", "auth", "smtpd_client_auth_rate_limit", 450, "4.7.1",
     "Error: too many AUTH commands from 192.0.2.9",
     "AUTH command rate limit exceeded: 3 from unknown[192.0.2.9] for service smtp"),
    ("starttls", "newtls_stat", "smtpd_client_new_tls_session_rate_limit", 454, "4.7.0",
     "Error: too many new TLS sessions from unknown[192.0.2.9]",
     "Refusing STARTTLS request from unknown[192.0.2.9] for service smtp"),
])
def test_event_rate_limits(method, verb, param, code, enh, text, logtext):
    lim, client, log = _limits({verb: 3}, **{param: "2"})
    r = asyncio.run(getattr(lim, method)(_Session()))
    assert (r.code, r.enhanced, r.text) == (code, enh, text)
    assert log.lines[-1].endswith("warning: " + logtext), log.lines
    lim, client, log = _limits({verb: 2}, **{param: "2"})
    assert asyncio.run(getattr(lim, method)(_Session())) is None
    lim, client, log = _limits({verb: 99}, **{param: "0"})          # off: not asked
    assert asyncio.run(getattr(lim, method)(_Session())) is None
    assert client.calls == []
    lim, client, log = _limits({}, **{param: "2"})                  # anvil down: go on
    assert asyncio.run(getattr(lim, method)(_Session())) is None


def test_new_tls_session_after_handshake():
    lim, client, log = _limits({"newtls": 3}, smtpd_client_new_tls_session_rate_limit="2")
    r = asyncio.run(lim.tls_established(_Session(), reused=False))
    assert (r.code, r.enhanced, r.text) == (
        421, "4.7.0", "mx.example.org Error: too many new TLS sessions from unknown[192.0.2.9]")
    assert log.lines[-1].endswith("warning: New TLS session rate limit exceeded: 3 from "
                                  "unknown[192.0.2.9] for service smtp")
    lim, client, log = _limits({"newtls": 3}, smtpd_client_new_tls_session_rate_limit="2")
    assert asyncio.run(lim.tls_established(_Session(), reused=True)) is None
    assert client.calls == []            # a resumed session is not a new one


def test_client_quiet_while_anvil_starts(sockdir):
    log = NullLog()

    async def main():
        c = AnvilClient(str(sockdir / "anvil"), log=log, retry=0)
        assert await c.connect("smtp", "10.0.0.1") is None
    _run(main())
    assert log.lines == []
