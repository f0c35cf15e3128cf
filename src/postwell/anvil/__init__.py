"""anvil(8): machine-wide client connection counts and request rates.

Several smtpd worker processes share one listening socket, so a per-process
count lets one client hold N times smtpd_client_connection_count_limit.  As
in Postfix, one small service keeps the counts for the whole machine: the
master starts ``serve(config)`` (as $mail_owner), which listens on the unix
socket ``$queue_directory/private/anvil`` (mode 0600).

Wire format (postwell's own; both ends live in this package).  One request
per line, ``VERB SERVICE ADDR\\n``; replies come back in request order:

=============  ==========================================  ===================
verb           effect                                      reply
=============  ==========================================  ===================
connect        count += 1, connection rate += 1            ``ok COUNT RATE``
disconnect     count -= 1                                  (none)
message        message rate += 1                           ``ok RATE``
recipient      recipient rate += 1                         ``ok RATE``
newtls         new TLS session rate += 1                   ``ok RATE``
newtls_stat    (nothing)                                   ``ok RATE``
auth           AUTH rate += 1                              ``ok RATE``
lookup         (nothing)                                   ``ok COUNT RATE MSG RCPT NTLS AUTH``
=============  ==========================================  ===================

A malformed request gets ``error TEXT`` and the stream is closed.

Rates follow Postfix's anvil: all counters of one (service, address) share a
window that opens at the first event and lasts ``anvil_rate_time_unit``; the
first event after the window has passed opens a new one with every rate back
at zero.  An entry whose connection count is zero is forgotten one time unit
after it became idle, so memory is bounded by the live connections plus the
clients seen during the last time unit.  When a client stream (an smtpd
worker) goes away, the connections it registered and did not release are
released for it, so a killed worker cannot leave counts behind.

Every ``anvil_status_update_time`` and at exit the service logs the maxima
of the period (``statistics: max connection rate 3/60s for (smtp:1.2.3.4) at
Nov 29 07:30:00``) and resets them, as Postfix does.

The smtpd side: :class:`AnvilClient` keeps one persistent stream per worker
and pipelines requests (no lock step between sessions); :class:`SmtpdLimits`
holds the smtpd_client_*_limit checks with Postfix's reply and log texts; a
refusal is a :class:`LimitReply`, which names the parameter whose limit refused
(the smtpd's notify_classes bookkeeping needs to know, the reply texts do not
tell the connection count from the connection rate).  Any failure to reach
anvil means "no answer", never a rejection: the caller falls back to its
per-process count, as Postfix's smtpd goes on without limits when anvil is
down.
"""

from __future__ import annotations

import asyncio
import collections
import os
import select
import signal
import socket
import time
from dataclasses import dataclass

from postwell.fdutil import drain, unlink_if_ours
from postwell.smtp.reply import Reply

try:  # start-up warnings name set-but-ignored parameters; these are honoured here
    from postwell.config.registry import register_implemented as _register
except ImportError:  # pragma: no cover
    def _register(*names):
        pass
_register("anvil_rate_time_unit", "anvil_status_update_time",
          "smtpd_client_connection_rate_limit", "smtpd_client_message_rate_limit",
          "smtpd_client_recipient_rate_limit", "smtpd_client_new_tls_session_rate_limit",
          "smtpd_client_auth_rate_limit", "smtpd_client_connection_count_limit",
          "smtpd_client_event_limit_exceptions")

SOCKET_NAME = "private/anvil"
MAX_LINE = 512                 # a request line longer than this ends the stream
MAX_IDLE_ENTRIES = 200_000     # hard cap on zero-count entries (oldest dropped first)
CLIENT_TIMEOUT = 1.0           # seconds the smtpd waits for an answer before going on alone
RETRY_SECONDS = 1.0            # after a failed connect, go on alone this long
WARN_SECONDS = 60.0            # at most one "cannot reach anvil" warning per period
STARTUP_GRACE = 5.0            # a worker may start before anvil listens: no warning then

VERBS = ("connect", "disconnect", "message", "recipient", "newtls", "newtls_stat", "auth",
         "lookup")


def socket_path(config) -> str:
    return os.path.join(config.get("queue_directory"), SOCKET_NAME)


# --------------------------------------------------------------------------- counters

class _Entry:
    __slots__ = ("count", "rate", "mail", "rcpt", "ntls", "auth", "start")

    def __init__(self, now: float) -> None:
        self.count = self.rate = self.mail = self.rcpt = self.ntls = self.auth = 0
        self.start = now


class _Max:
    __slots__ = ("value", "ident", "when")

    def __init__(self) -> None:
        self.value, self.ident, self.when = 0, "", 0.0

    def update(self, value: int, ident: str, when: float) -> None:
        if value > self.value:
            self.value, self.ident, self.when = value, ident, when


_RATES = ("rate", "mail", "rcpt", "ntls", "auth")


class AnvilTable:
    """The counters, without any I/O (tests drive it with a fake clock).

    ``clock`` measures windows and expiry (monotonic); ``wall`` stamps the
    statistics lines."""

    def __init__(self, time_unit: float = 60.0, *, clock=time.monotonic, wall=time.time,
                 max_idle: int = MAX_IDLE_ENTRIES) -> None:
        self.time_unit = max(1.0, float(time_unit))
        self.clock = clock
        self.wall = wall
        self.max_idle = max_idle
        self.entries: dict[str, _Entry] = {}
        # ident -> time the entry may be dropped; insertion order = expiry order
        # because the clock never goes back and every idle period has the same length.
        self._idle: collections.OrderedDict[str, float] = collections.OrderedDict()
        self.maxima = {k: _Max() for k in ("rate", "count", "mail", "rcpt", "ntls", "auth")}
        self.max_cache = _Max()

    # --- internals
    def _expire(self, now: float) -> None:
        idle = self._idle
        while idle:
            ident, when = next(iter(idle.items()))
            if when > now and len(idle) <= self.max_idle:
                break
            idle.popitem(last=False)
            e = self.entries.get(ident)
            if e is not None and e.count == 0:
                del self.entries[ident]

    def _entry(self, ident: str, now: float) -> _Entry:
        self._expire(now)
        e = self.entries.get(ident)
        if e is None:
            e = self.entries[ident] = _Entry(now)
            self._idle[ident] = now + self.time_unit
            self.max_cache.update(len(self.entries), "", self.wall())
        elif e.start + self.time_unit < now:
            # Postfix: the window has passed; every rate starts again from here.
            e.rate = e.mail = e.rcpt = e.ntls = e.auth = 0
            e.start = now
        return e

    def _bump(self, ident: str, what: str) -> int:
        now = self.clock()
        e = self._entry(ident, now)
        value = getattr(e, what) + 1
        setattr(e, what, value)
        self.maxima[what].update(value, ident, self.wall())
        return value

    # --- requests
    def connect(self, ident: str) -> tuple[int, int]:
        rate = self._bump(ident, "rate")
        e = self.entries[ident]
        if e.count == 0:
            self._idle.pop(ident, None)
        e.count += 1
        self.maxima["count"].update(e.count, ident, self.wall())
        return e.count, rate

    def disconnect(self, ident: str) -> None:
        now = self.clock()
        self._expire(now)
        e = self.entries.get(ident)
        if e is None or e.count <= 0:
            return
        e.count -= 1
        if e.count == 0:
            self._idle.pop(ident, None)
            self._idle[ident] = now + self.time_unit

    def message(self, ident: str) -> int:
        return self._bump(ident, "mail")

    def recipient(self, ident: str) -> int:
        return self._bump(ident, "rcpt")

    def newtls(self, ident: str) -> int:
        return self._bump(ident, "ntls")

    def auth(self, ident: str) -> int:
        return self._bump(ident, "auth")

    def newtls_stat(self, ident: str) -> int:
        now = self.clock()
        self._expire(now)
        e = self.entries.get(ident)
        if e is None or e.start + self.time_unit < now:
            return 0
        return e.ntls

    def lookup(self, ident: str) -> tuple[int, int, int, int, int, int]:
        now = self.clock()
        self._expire(now)
        e = self.entries.get(ident)
        if e is None:
            return (0, 0, 0, 0, 0, 0)
        if e.start + self.time_unit < now:
            return (e.count, 0, 0, 0, 0, 0)
        return (e.count, e.rate, e.mail, e.rcpt, e.ntls, e.auth)

    def purge(self) -> None:
        self._expire(self.clock())

    # --- statistics
    def statistics(self) -> list[str]:
        """The statistics lines of the period (Postfix's wording), maxima reset."""
        unit = int(self.time_unit)
        out = []
        m = self.maxima
        stamp = lambda when: time.strftime("%b %d %H:%M:%S", time.localtime(when))  # noqa: E731
        for key, label in (("rate", "connection rate"), ("count", "connection count"),
                           ("mail", "message rate"), ("rcpt", "recipient rate"),
                           ("ntls", "newtls rate"), ("auth", "auth rate")):
            x = m[key]
            if x.value > 0:
                per = "" if key == "count" else f"/{unit}s"
                out.append(f"statistics: max {label} {x.value}{per} for ({x.ident}) "
                           f"at {stamp(x.when)}")
        if self.max_cache.value > 0:
            out.append(f"statistics: max cache size {self.max_cache.value} "
                       f"at {stamp(self.max_cache.when)}")
        self.maxima = {k: _Max() for k in m}
        self.max_cache = _Max()
        return out


# --------------------------------------------------------------------------- the service

def handle_line(table: AnvilTable, line: bytes, held: dict) -> bytes | None:
    """One request; ``held`` is the stream's ident -> connections it registered.
    Returns the reply (None for disconnect); raises ValueError for a bad line."""
    parts = line.split()
    if len(parts) != 3:
        raise ValueError("bad request")
    verb, service, addr = (p.decode("ascii", "strict") for p in parts)
    ident = f"{service}:{addr}"
    if verb == "connect":
        count, rate = table.connect(ident)
        held[ident] = held.get(ident, 0) + 1
        return b"ok %d %d\n" % (count, rate)
    if verb == "disconnect":
        n = held.get(ident, 0)
        if n > 0:   # only what this stream registered: a confused client cannot go below
            table.disconnect(ident)
            if n == 1:
                del held[ident]
            else:
                held[ident] = n - 1
        return None
    if verb == "lookup":
        return b"ok %d %d %d %d %d %d\n" % table.lookup(ident)
    fn = {"message": table.message, "recipient": table.recipient, "newtls": table.newtls,
          "newtls_stat": table.newtls_stat, "auth": table.auth}.get(verb)
    if fn is None:
        raise ValueError(f"unrecognized request: {verb}")
    return b"ok %d\n" % fn(ident)


class _ServerStream(asyncio.Protocol):
    def __init__(self, table: AnvilTable, log) -> None:
        self.table = table
        self.log = log
        self.buf = b""
        self.held: dict[str, int] = {}
        self.transport = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data
        out = []
        while True:
            nl = buf.find(b"\n")
            if nl < 0:
                break
            line, buf = buf[:nl], buf[nl + 1:]
            try:
                reply = handle_line(self.table, line, self.held)
            except (ValueError, UnicodeError) as exc:
                self.log.warning(f"{exc}: \"{line[:100].decode('ascii', 'replace')}\", "
                                 "closing stream")
                out.append(b"error bad request\n")
                self.transport.write(b"".join(out))
                self.transport.close()
                self.buf = b""
                return
            if reply is not None:
                out.append(reply)
        if len(buf) > MAX_LINE:
            self.log.warning("request line too long, closing stream")
            self.transport.close()
            buf = b""
        self.buf = buf
        if out:
            self.transport.write(b"".join(out))

    def connection_lost(self, exc) -> None:
        # The worker went away (exit, crash, restart): release what it still held.
        for ident, n in self.held.items():
            for _ in range(n):
                self.table.disconnect(ident)
        self.held = {}


def _bind(path: str) -> socket.socket:
    """Bind under a temporary name and rename into place, so a client never
    sees a missing socket while an old anvil is replaced (reload)."""
    return _listen(path)[0]


def _listen(path: str) -> tuple[socket.socket, int]:
    """_bind(), plus the inode of the name it bound, taken before the rename:
    at exit the name is removed only while it is still ours (a reload's newer
    anvil may have replaced it)."""
    tmp = f"{path}.{os.getpid()}"
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)   # 0600: only $mail_owner's processes may talk to anvil
    try:
        s.bind(tmp)
    finally:
        os.umask(old)
    os.chmod(tmp, 0o600)
    s.listen(256)
    ino = os.stat(tmp).st_ino
    os.rename(tmp, path)
    return s, ino


class _PollTransport:
    """The little of an asyncio transport that _ServerStream uses, over a
    non-blocking unix stream served by the poll loop in serve().

    Replies normally leave in the same call; a client that stops reading gets
    its replies buffered up to MAX_PENDING bytes, then it is dropped (its
    connections are released like those of a worker that went away)."""

    MAX_PENDING = 1 << 20

    def __init__(self, conn: socket.socket, poller) -> None:
        self.conn = conn
        self.poller = poller
        self.out = b""
        self.closing = False
        self.closed = False

    def write(self, data: bytes) -> None:
        if self.closing:
            return
        if not self.out:
            try:
                sent = self.conn.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self.close()
                return
            data = data[sent:]
            if not data:
                return
        self.out += data
        if len(self.out) > self.MAX_PENDING:
            self.out = b""
            self.close()
            return
        self.poller.modify(self.conn, select.POLLIN | select.POLLOUT)

    def flush(self) -> None:
        try:
            sent = self.conn.send(self.out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.out = b""
            self.close()
            return
        self.out = self.out[sent:]
        if not self.out:
            if self.closing:
                self.close()
            else:
                self.poller.modify(self.conn, select.POLLIN)

    def close(self) -> None:
        self.closing = True
        if self.out or self.closed:
            return   # after the last reply has left (flush)
        self.closed = True
        try:
            self.poller.unregister(self.conn)
        except (KeyError, ValueError):
            pass
        self.conn.close()

    def is_closing(self) -> bool:
        return self.closing


def serve(config, *, log=None, ready=None, sock=None, max_idle=None) -> None:
    """The anvil service: call in a child of the master, already running as
    mail_owner.  Returns after SIGTERM (logging the statistics first).

    sock: the master's listener on private/anvil (on demand, as Postfix's
    master starts anvil); it stays the master's, so its name is left in place.
    max_idle: with sock, also return once no smtpd has been connected for that
    long, but never sooner than one anvil_rate_time_unit (Postfix's anvil: not
    before the sampling interval ends), so no rate window is cut short.

    A plain poll(2) loop, not an event loop: anvil answers one short line per
    request from a handful of smtpd workers, and every page an event loop
    touches at start-up is a page this process no longer shares with the
    master (issue 8: the process tree's memory)."""
    if log is None:
        from postwell.log import MailLog
        log = MailLog.from_config(config, "anvil")
    try:
        unit = config.get_time("anvil_rate_time_unit")
    except Exception:   # noqa: BLE001
        unit = 60.0
    table = AnvilTable(unit)
    try:
        interval = config.get_time("anvil_status_update_time")
    except Exception:   # noqa: BLE001 - a bad value: Postfix's default
        interval = 600.0
    interval = max(1.0, interval)
    path = socket_path(config)
    owned = sock is None
    if owned:
        sock, ino = _listen(path)
        max_idle = None
    else:
        ino = None
        max_idle = None if max_idle is None else max(float(max_idle), table.time_unit)
    sock.setblocking(False)
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signals: list[int] = []

    def on_signal(signum, frame):
        signals.append(signum)

    old = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    old_fd = signal.set_wakeup_fd(wake_w)
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    poller.register(wake_r, select.POLLIN)
    streams: dict[int, tuple[_ServerStream, _PollTransport]] = {}
    lfd = sock.fileno()
    if ready is not None:
        ready()
    next_dump = time.monotonic() + interval
    idle_since = time.monotonic()   # since when no smtpd is connected
    stopping = False
    try:
        while not stopping:
            wait = max(0.0, min(next_dump - time.monotonic(), table.time_unit))
            if max_idle is not None and not streams:
                left = idle_since + max_idle - time.monotonic()
                if left <= 0:
                    if not select.select([sock], [], [], 0)[0]:
                        break
                    left = 0.0   # an smtpd just connected: serve it rather than leave
                wait = min(wait, left)
            try:
                events = poller.poll(wait * 1000)
            except InterruptedError:
                events = []
            for fd, ev in events:
                if fd == lfd:
                    _accept(sock, poller, streams, table, log)
                elif fd == wake_r:
                    drain(wake_r)
                else:
                    pair = streams.get(fd)
                    if pair is not None:
                        _service(fd, ev, pair, streams)
            if streams:
                idle_since = time.monotonic()
            while signals:
                signum = signals.pop()
                if signum == signal.SIGHUP:
                    if hasattr(log, "reopen"):
                        log.reopen()
                else:
                    stopping = True
            table.purge()
            if time.monotonic() >= next_dump:
                for line in table.statistics():
                    log.info(line)
                next_dump = time.monotonic() + interval
    finally:
        signal.set_wakeup_fd(old_fd)
        for sig, handler in old.items():
            signal.signal(sig, handler)
        for stream, transport in list(streams.values()):
            transport.out = b""
            transport.close()
            stream.connection_lost(None)
        if owned:
            unlink_if_ours(path, ino)
        sock.close()
        for fd in (wake_r, wake_w):
            os.close(fd)
        for line in table.statistics():
            log.info(line)


def _accept(sock, poller, streams, table, log) -> None:
    for _ in range(64):
        try:
            conn, _ = sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.warning(f"accept: {exc.strerror or exc}")
            return
        conn.setblocking(False)
        transport = _PollTransport(conn, poller)
        stream = _ServerStream(table, log)
        stream.connection_made(transport)
        poller.register(conn, select.POLLIN)
        streams[conn.fileno()] = (stream, transport)


def _service(fd: int, ev: int, pair, streams) -> None:
    stream, transport = pair
    if ev & select.POLLOUT and transport.out:
        transport.flush()
    if ev & (select.POLLIN | select.POLLHUP | select.POLLERR) and not transport.closing:
        try:
            data = transport.conn.recv(65536)
        except (BlockingIOError, InterruptedError):
            data = None
        except OSError:
            data = b""
        if data:
            stream.data_received(data)
        elif data is not None:
            transport.out = b""   # the worker is gone: nobody reads the rest
            transport.close()
    elif ev & (select.POLLHUP | select.POLLERR) and transport.closing:
        transport.out = b""
        transport.close()
    if transport.closed:
        del streams[fd]
        # Released at once: the worker is gone (exit, crash, restart) or was
        # dropped for a bad request.
        stream.connection_lost(None)


# --------------------------------------------------------------------------- the client

class _ClientStream(asyncio.Protocol):
    def __init__(self, owner: "AnvilClient") -> None:
        self.owner = owner
        self.buf = b""
        self.pending: collections.deque = collections.deque()
        self.transport = None
        self.lost = False

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data
        while True:
            nl = buf.find(b"\n")
            if nl < 0:
                break
            line, buf = buf[:nl], buf[nl + 1:]
            if not self.pending:
                self.owner._broken(self, "unexpected reply")
                return
            fut = self.pending.popleft()
            if not fut.done():
                fut.set_result(line)
        if len(buf) > MAX_LINE:
            self.owner._broken(self, "reply too long")
            return
        self.buf = buf

    def connection_lost(self, exc) -> None:
        self.lost = True
        self.owner._broken(self, None)

    def fail_all(self) -> None:
        while self.pending:
            fut = self.pending.popleft()
            if not fut.done():
                fut.set_result(None)


class AnvilClient:
    """One persistent, pipelined stream from an smtpd worker to anvil.

    Every method returns None when anvil cannot answer (not running, timed
    out, stream broken); the caller then goes on without it."""

    def __init__(self, path: str, *, log=None, timeout: float = CLIENT_TIMEOUT,
                 retry: float = RETRY_SECONDS, clock=time.monotonic,
                 grace: float = STARTUP_GRACE) -> None:
        self.path = path
        self.log = log
        self.timeout = timeout
        self.retry = retry
        self.clock = clock
        self.stream: _ClientStream | None = None
        self.generation = 0           # bumps with every new stream
        self._connecting: asyncio.Future | None = None
        self._retry_at = 0.0
        self._warned_at = -1e18
        self._quiet_until = clock() + grace

    def _warn(self, text: str) -> None:
        now = self.clock()
        if now < self._quiet_until:
            return
        if self.log is not None and now - self._warned_at >= WARN_SECONDS:
            self._warned_at = now
            self.log.warning(text)

    def _broken(self, stream: _ClientStream, why: str | None) -> None:
        if why is not None:
            self._warn(f"{self.path}: {why}; going on without anvil")
        if self.stream is stream:
            self.stream = None
        if stream.transport is not None and not stream.transport.is_closing():
            stream.transport.close()
        stream.fail_all()

    async def _stream(self) -> _ClientStream | None:
        s = self.stream
        if s is not None and not s.lost:
            return s
        if self._connecting is not None:
            # Another session is connecting: share its result.
            return await asyncio.shield(self._connecting)
        if self.clock() < self._retry_at:
            return None
        loop = asyncio.get_running_loop()
        self._connecting = fut = loop.create_future()
        result = None
        try:
            _, proto = await asyncio.wait_for(
                loop.create_unix_connection(lambda: _ClientStream(self), self.path),
                self.timeout)
            self.stream = result = proto
            self.generation += 1
        except (OSError, asyncio.TimeoutError) as exc:
            self._retry_at = self.clock() + self.retry
            why = getattr(exc, "strerror", None) or "timeout"
            self._warn(f"connect to {SOCKET_NAME}: {why}; going on without anvil")
        finally:
            self._connecting = None
            fut.set_result(result)
        return result

    async def request(self, verb: str, service: str, addr: str) -> list[int] | None:
        s = await self._stream()
        if s is None:
            return None
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        s.pending.append(fut)
        s.transport.write(f"{verb} {service} {addr}\n".encode("ascii", "replace"))
        timer = loop.call_later(self.timeout, self._timed_out, s, fut)
        try:
            line = await fut
        finally:
            timer.cancel()
        if line is None:
            return None
        parts = line.split()
        if not parts or parts[0] != b"ok":
            self._broken(s, f"request failed: {line[:80]!r}")
            return None
        try:
            return [int(p) for p in parts[1:]]
        except ValueError:
            self._broken(s, "malformed reply")
            return None

    def _timed_out(self, stream: _ClientStream, fut) -> None:
        if not fut.done():
            # A hung anvil must not hold sessions: drop the stream; answers in
            # flight are lost, which anvil's own clean-up of the stream balances.
            self._broken(stream, "timeout")
            self._retry_at = self.clock() + self.retry

    # --- requests
    async def connect(self, service: str, addr: str) -> tuple[int, int, int] | None:
        """(count, rate, generation); pass the generation back to disconnect()."""
        r = await self.request("connect", service, addr)
        if r is None or len(r) != 2:
            return None
        return r[0], r[1], self.generation

    def disconnect(self, service: str, addr: str, generation: int) -> None:
        """Fire and forget.  A connection registered on an earlier stream was
        already released by anvil when that stream closed."""
        s = self.stream
        if s is None or s.lost or generation != self.generation:
            return
        s.transport.write(f"disconnect {service} {addr}\n".encode("ascii", "replace"))

    async def _one(self, verb: str, service: str, addr: str) -> int | None:
        r = await self.request(verb, service, addr)
        return r[0] if r and len(r) == 1 else None

    async def message(self, service: str, addr: str) -> int | None:
        return await self._one("message", service, addr)

    async def recipient(self, service: str, addr: str) -> int | None:
        return await self._one("recipient", service, addr)

    async def newtls(self, service: str, addr: str) -> int | None:
        return await self._one("newtls", service, addr)

    async def newtls_stat(self, service: str, addr: str) -> int | None:
        return await self._one("newtls_stat", service, addr)

    async def auth(self, service: str, addr: str) -> int | None:
        return await self._one("auth", service, addr)

    async def lookup(self, service: str, addr: str) -> tuple | None:
        r = await self.request("lookup", service, addr)
        return tuple(r) if r and len(r) == 6 else None

    def close(self) -> None:
        s, self.stream = self.stream, None
        if s is not None:
            if s.transport is not None:
                s.transport.close()
            s.fail_all()


# --------------------------------------------------------------------------- smtpd checks

UNAVAILABLE = object()   # connect(): anvil gave no answer, use the per-process count


@dataclass(frozen=True)
class LimitReply(Reply):
    """A refusal by one of SmtpdLimits' checks; ``limit`` is the parameter whose
    limit refused (``smtpd_client_connection_count_limit``, ...)."""
    limit: str = ""


COUNT_LIMIT = "smtpd_client_connection_count_limit"
CONN_RATE_LIMIT = "smtpd_client_connection_rate_limit"
MAIL_RATE_LIMIT = "smtpd_client_message_rate_limit"
RCPT_RATE_LIMIT = "smtpd_client_recipient_rate_limit"
NEWTLS_RATE_LIMIT = "smtpd_client_new_tls_session_rate_limit"
AUTH_RATE_LIMIT = "smtpd_client_auth_rate_limit"


def _int(config, name: str) -> int:
    try:
        return max(0, config.get_int(name))
    except Exception:   # noqa: BLE001 - a bad number: the limit is off, as 0
        return 0


class SmtpdLimits:
    """smtpd_client_*_limit checks for one smtpd service, Postfix's texts.

    ``exceptions`` is a host list with ``match(name, addr)``
    (smtpd_client_event_limit_exceptions); matching clients are not counted."""

    def __init__(self, config, log, *, service: str, hostname: str, exceptions=None,
                 client: AnvilClient | None = None) -> None:
        self.log = log
        self.service = service
        self.hostname = hostname
        self.exceptions = exceptions
        self.count_limit = _int(config, "smtpd_client_connection_count_limit")
        self.conn_rate_limit = _int(config, "smtpd_client_connection_rate_limit")
        self.mail_limit = _int(config, "smtpd_client_message_rate_limit")
        self.rcpt_limit = _int(config, "smtpd_client_recipient_rate_limit")
        self.ntls_limit = _int(config, "smtpd_client_new_tls_session_rate_limit")
        self.auth_limit = _int(config, "smtpd_client_auth_rate_limit")
        self.client = client or AnvilClient(socket_path(config), log=log)

    @classmethod
    def from_config(cls, config, log, **kw) -> "SmtpdLimits | None":
        """None when every limit is off (Postfix then does not talk to anvil)."""
        names = ("smtpd_client_connection_count_limit", "smtpd_client_connection_rate_limit",
                 "smtpd_client_message_rate_limit", "smtpd_client_recipient_rate_limit",
                 "smtpd_client_new_tls_session_rate_limit", "smtpd_client_auth_rate_limit")
        if not any(_int(config, n) for n in names):
            return None
        return cls(config, log, **kw)

    def exempt(self, name: str, addr: str) -> bool:
        try:
            return bool(self.exceptions is not None and self.exceptions.match(name, addr))
        except Exception:   # noqa: BLE001 - a broken list: count as usual
            return False

    @staticmethod
    def _xclient_host(session) -> bool:
        """A client smtpd_authorized_xclient_hosts allows (asked again after each
        XCLIENT for the client it names) is never counted, as in Postfix's smtpd: a
        proxy speaks for many clients, and its connect and disconnect events could
        not name the same address."""
        conn = getattr(session, "conn", None)
        return bool(getattr(conn, "xclient_allowed", False))

    async def connect(self, session):
        """At connect time: a 421 LimitReply, None (go on) or UNAVAILABLE.  Remembers
        on the session what disconnect() needs."""
        addr, namaddr = session.addr, session.namaddr
        name = getattr(session.state, "client_name", "unknown")
        if self._xclient_host(session) or self.exempt(name, addr):
            session.anvil_generation = None
            return None
        got = await self.client.connect(self.service, addr)
        if got is None:
            session.anvil_generation = None
            return UNAVAILABLE
        count, rate, session.anvil_generation = got
        if self.count_limit and count > self.count_limit:
            self.log.warning(f"Connection concurrency limit exceeded: {count} from {namaddr} "
                             f"for service {self.service}")
            return LimitReply(421, f"{self.hostname} Error: too many connections from {addr}",
                              "4.7.0", COUNT_LIMIT)
        if self.conn_rate_limit and rate > self.conn_rate_limit:
            self.log.warning(f"Connection rate limit exceeded: {rate} from {namaddr} "
                             f"for service {self.service}")
            return LimitReply(421, f"{self.hostname} Error: too many connections from {addr}",
                              "4.7.0", CONN_RATE_LIMIT)
        return None

    def disconnect(self, session) -> None:
        gen = getattr(session, "anvil_generation", None)
        if gen is not None:
            session.anvil_generation = None
            self.client.disconnect(self.service, session.addr, gen)

    async def disconnect_settled(self, session) -> None:
        """disconnect(), and return once anvil has counted it (as Postfix's synchronous
        anvil client): the client's next connection may reach another worker, whose
        "connect" anvil could otherwise read first and count this one still open.  A
        request on the same stream after the disconnect is answered only after it."""
        if getattr(session, "anvil_generation", None) is None:
            return
        self.disconnect(session)
        await self.client.request("lookup", self.service, session.addr)

    @staticmethod
    def client_addr(session) -> str:
        """The address the rates count: the client XCLIENT named, if any (Postfix's
        state->addr); the connection count stays with the real peer."""
        return getattr(session.state, "client_addr", None) or session.addr

    async def _rate(self, session, limit: int, verb: str) -> int | None:
        if not limit or self._xclient_host(session):
            return None
        name = getattr(session.state, "client_name", "unknown")
        addr = self.client_addr(session)
        if self.exempt(name, addr):
            return None
        rate = await self.client._one(verb, self.service, addr)
        return rate if rate is not None and rate > limit else None

    async def mail(self, session):
        rate = await self._rate(session, self.mail_limit, "message")
        if rate is None:
            return None
        self.log.warning(f"Message delivery request rate limit exceeded: {rate} from "
                         f"{session.namaddr} for service {self.service}")
        return LimitReply(450, f"Error: too much mail from {self.client_addr(session)}", "4.7.1",
                          MAIL_RATE_LIMIT)

    async def rcpt(self, session):
        rate = await self._rate(session, self.rcpt_limit, "recipient")
        if rate is None:
            return None
        self.log.warning(f"Recipient address rate limit exceeded: {rate} from "
                         f"{session.namaddr} for service {self.service}")
        return LimitReply(450, f"Error: too many recipients from {self.client_addr(session)}",
                          "4.7.1", RCPT_RATE_LIMIT)

    async def auth(self, session):
        rate = await self._rate(session, self.auth_limit, "auth")
        if rate is None:
            return None
        self.log.warning(f"AUTH command rate limit exceeded: {rate} from "
                         f"{session.namaddr} for service {self.service}")
        return LimitReply(450, f"Error: too many AUTH commands from {self.client_addr(session)}",
                          "4.7.1", AUTH_RATE_LIMIT)

    async def starttls(self, session):
        """Before the 220 to STARTTLS: refuse when the new-session rate is used up."""
        rate = await self._rate(session, self.ntls_limit, "newtls_stat")
        if rate is None:
            return None
        self.log.warning(f"Refusing STARTTLS request from {session.namaddr} for service "
                         f"{self.service}")
        return LimitReply(454, f"Error: too many new TLS sessions from {session.namaddr}",
                          "4.7.0", NEWTLS_RATE_LIMIT)

    async def tls_established(self, session, reused: bool):
        """After a handshake: a new (not resumed) session counts; over the limit the
        session ends with this 421."""
        if reused:
            return None
        rate = await self._rate(session, self.ntls_limit, "newtls")
        if rate is None:
            return None
        self.log.warning(f"New TLS session rate limit exceeded: {rate} from "
                         f"{session.namaddr} for service {self.service}")
        return LimitReply(421, f"{self.hostname} Error: too many new TLS sessions from "
                               f"{session.namaddr}", "4.7.0", NEWTLS_RATE_LIMIT)

    def close(self) -> None:
        self.client.close()
