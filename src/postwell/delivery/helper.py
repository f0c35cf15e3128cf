"""The privileged half of virtual(8).

The qmgr runs as mail_owner, but a virtual mailbox must be written with the
uid/gid from virtual_uid_maps / virtual_gid_maps.  When the master runs as
root it listens on ``$queue_directory/private/virtual`` (owned by mail_owner,
mode 0600: only the qmgr and root can connect) and starts this helper (still
root) on demand, when the qmgr connects; the helper serves the master's
socket and leaves after max_idle with no qmgr link open, and the qmgr closes
links idle for LINK_IDLE.  The same holds for the local and pipe helpers
(listen(), adopt_listener()).  The qmgr sends "deliver these recipients of
queue file ID"; the helper does its own table lookups (a request cannot name
a path or a uid) and has the file work done by a user worker (local_exec):
a child that switched to the mailbox owner before touching any file and
serves only that owner's deliveries.

serve_unix() and answer_requests() are the socket server and the request
reader that the virtual, local and pipe helpers share.

Protocol: one JSON object per line each way.
  request:  {"id": N, "queue_id": "...", "sender": "...", "nexthop": "...",
             "recipients": [[address, orig], ...]}
  reply:    {"id": N, "results": [[status, dsn, reason], ...]}
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import threading
import time

SOCKET_NAME = "virtual"
MAX_REQUEST = 1 << 20      # bytes per request line (bounded memory)

# Set by the master in the qmgr child when a helper is running.
HELPER_SOCKET: str | None = None

# The qmgr side closes a helper connection unused this long.  The helpers run
# on demand (the master owns their sockets and forks one when the qmgr
# connects) and leave after max_idle with no connection open: closing from
# the client side means a helper never hangs up on a request already in
# flight towards it.
LINK_IDLE = 10.0

# Listening sockets the master handed to this child: path -> (socket, max_idle).
_ADOPTED: dict[str, tuple] = {}


def listen(path: str, owner_uid: int | None = None, owner_gid: int | None = None,
           backlog: int = 128) -> tuple[socket.socket, int]:
    """Bind a helper's socket under private/ (mode 0600, handed to the qmgr's
    owner) for the master; returns the socket and its inode.  Bound, owned
    and listening under a temporary name, then renamed: the qmgr never meets
    the name before it may connect, and the inode (kept across the rename)
    tells the master on exit whether the name is still its own."""
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    temp = f"{path}.{os.getpid()}"
    try:
        try:
            os.unlink(temp)
        except FileNotFoundError:
            pass
        old = os.umask(0o177)
        try:
            try:
                sock.bind(temp)
            except OSError:
                temp = path      # the longer name does not fit a socket address
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
                sock.bind(temp)
        finally:
            os.umask(old)
        if owner_uid is not None:
            os.chown(temp, owner_uid, owner_gid if owner_gid is not None else -1)
        sock.listen(backlog)
        ino = os.stat(temp).st_ino
        if temp != path:
            os.rename(temp, path)
    except BaseException:
        sock.close()
        raise
    return sock, ino


def adopt_listener(path: str, sock: socket.socket, max_idle: float | None) -> None:
    """In a helper child of the master: serve ``path`` on the master's
    listening socket ``sock`` (instead of binding the name) and return after
    ``max_idle`` seconds without any qmgr connection."""
    _ADOPTED[path] = (sock, max_idle)


def _adopted(path: str, sock, max_idle):
    if sock is None:
        sock, idle = _ADOPTED.pop(path, (None, None))
        if max_idle is None:
            max_idle = idle
    return sock, max_idle


def socket_path(config) -> str:
    return os.path.join(config.get("queue_directory"), "private", SOCKET_NAME)


def serve(config, owner_uid: int | None = None, owner_gid: int | None = None) -> None:
    """Run the helper until SIGTERM (as root)."""
    from postwell.log import MailLog
    from postwell.queue import QueueStore

    from . import local_exec
    from .base import DeliveryRequest, QueueContent
    from .virtual import VirtualAgent

    log = MailLog.from_config(config, "virtual")
    local_exec.use_worker_pool()
    limit = asyncio.Semaphore(100)   # deliveries at once
    store = QueueStore(config.get("queue_directory"))

    def parse(req):
        return queue_request(_parse_request(req))

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            agent = VirtualAgent(config, log=log)
        except Exception as exc:
            log.fatal(str(exc))
            agent = None

        async def answer(req, parsed):
            qid, rcpts = parsed
            async with limit:
                return await deliver(agent, qid, str(req.get("sender", "")),
                                     str(req.get("nexthop", "")), rcpts)

        try:
            await answer_requests(reader, writer, answer, log, parse=parse, wait=300)
        finally:
            if agent is not None:
                agent.close()      # this connection's user workers

    async def deliver(agent, qid, sender, nexthop, rcpts):
        if agent is None:
            return [["deferred", "4.3.0", "mail system configuration error"] for _ in rcpts]
        try:
            qm = store.open(qid, "active", writable=False)
        except Exception as exc:
            return [["deferred", "4.3.0", f"cannot open queue file: {exc}"] for _ in rcpts]
        try:
            request = DeliveryRequest(queue_id=qid, sender=sender, recipients=rcpts,
                                      transport="virtual", nexthop=nexthop,
                                      arrival_time=qm.arrival_time,
                                      open_content=QueueContent(qm),
                                      content_size=qm.content_size)
            results = await agent.deliver(request)
        finally:
            qm.close()
        by_id = {id(r.recipient): r for r in results}
        out = []
        for rc in rcpts:
            r = by_id.get(id(rc))
            out.append([r.status, r.dsn, r.reason] if r else
                       ["deferred", "4.3.0", "delivery status unavailable"])
        return out

    serve_unix(socket_path(config), handle, owner_uid, owner_gid,
               housekeeping=local_exec.retire_idle_workers)


def queue_request(req: dict) -> tuple:
    """A request's queue id and recipients; ValueError when it names no
    queue file (a request can never name a path)."""
    from postwell.queue import is_queue_id

    from .base import Recipient
    qid = str(req["queue_id"])
    if not is_queue_id(qid):
        raise ValueError("bad queue id")
    return qid, [Recipient(str(a), str(o) if o else None) for a, o in req["recipients"]]


def _parse_request(req):
    if not isinstance(req, dict) or not isinstance(req.get("recipients"), list):
        raise ValueError("malformed")
    return req


async def answer_requests(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, answer, log,
                          *, parse=None, wait: float = 3600.0) -> None:
    """The helpers' side of one qmgr connection: requests are read line by
    line and answered concurrently (``await answer(req, parse(req))`` gives
    the results), each reply as one line carrying the request's id.  A
    malformed request ends the connection: the qmgr side is broken, and
    guessing what it meant could deliver to the wrong place."""
    parse = parse or _parse_request
    tasks = set()

    async def one(req, parsed):
        results = await answer(req, parsed)
        # one write() per reply line: replies of concurrent requests never interleave
        writer.write(json.dumps({"id": req.get("id"), "results": results}).encode() + b"\n")
        await writer.drain()

    try:
        while True:
            try:
                line = await reader.readuntil(b"\n")
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                break
            try:
                req = json.loads(line)
                parsed = parse(req)
            except (ValueError, KeyError, TypeError) as exc:
                log.warning(f"malformed request from qmgr: {exc}")
                break
            t = asyncio.get_running_loop().create_task(one(req, parsed))
            tasks.add(t)
            t.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.wait(list(tasks), timeout=wait)
    finally:
        writer.close()


def serve_unix(path: str, handle, owner_uid: int | None = None, owner_gid: int | None = None,
               *, limit: int = MAX_REQUEST, drain: float = 60.0, housekeeping=None,
               every: float = 30.0, sock: socket.socket | None = None,
               max_idle: float | None = None) -> None:
    """Serve ``handle(reader, writer)`` on the unix socket ``path`` until
    SIGTERM or SIGINT.

    The socket is created mode 0600 (umask) and then handed to the qmgr's
    owner, so only the qmgr and root can connect.  On stop no new request is
    read, but deliveries in flight finish (their results reach the qmgr) for
    up to ``drain`` seconds before we exit.  ``housekeeping()``, if given,
    runs in a thread every ``every`` seconds and once at the end.

    With ``sock`` (or a listener the master handed over, adopt_listener())
    the name is the master's: it is neither bound nor removed here, and the
    service also returns once no connection has been open for ``max_idle``
    seconds; a qmgr connecting after that waits in the master's backlog until
    the master starts the next helper."""
    sock, max_idle = _adopted(path, sock, max_idle)
    connections = set()
    # Counted in the protocol (at accept), not in the handler task (which
    # starts a loop turn later), so the idle check never misses a connection
    # already taken from the backlog.
    open_links = set()
    last = [time.monotonic()]

    async def tidy(stop):
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), every)
            except asyncio.TimeoutError:
                await loop.run_in_executor(None, housekeeping)

    async def tracked(reader, writer):
        connections.add(reader)
        try:
            await handle(reader, writer)
        finally:
            connections.discard(reader)

    async def main():
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)

        class Protocol(asyncio.StreamReaderProtocol):
            def connection_made(self, transport):
                open_links.add(self)
                last[0] = time.monotonic()
                super().connection_made(transport)

            def connection_lost(self, exc):
                open_links.discard(self)
                last[0] = time.monotonic()
                super().connection_lost(exc)

        def factory():
            return Protocol(asyncio.StreamReader(limit=limit), tracked)

        if sock is None:
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            old = os.umask(0o177)
            try:
                server = await loop.create_unix_server(factory, path)
            finally:
                os.umask(old)
            if owner_uid is not None:
                os.chown(path, owner_uid, owner_gid if owner_gid is not None else -1)
        else:
            server = await loop.create_unix_server(factory, sock=sock)

        def idle_check():
            if stop.is_set():
                return
            left = max_idle - (time.monotonic() - last[0])
            if open_links or left > 0:
                loop.call_later(max(left, 0.0) if not open_links else max_idle, idle_check)
                return
            # Closed here, in the same callback as the check: nothing can be
            # accepted between the two.  What waits in the backlog stays for
            # the master's next helper.
            server.close()
            stop.set()

        if sock is not None and max_idle is not None:
            loop.call_later(max_idle, idle_check)
        tidying = loop.create_task(tidy(stop)) if housekeeping is not None else None
        await stop.wait()
        server.close()
        for reader in list(connections):
            reader.feed_eof()
        pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        if pending:
            await asyncio.wait(pending, timeout=drain)
        if tidying is not None:
            await loop.run_in_executor(None, housekeeping)

    asyncio.run(main())


def _read_line(conn: socket.socket, buf: bytearray, limit: int) -> bytes | None:
    """The next LF-terminated line from ``conn`` (None: EOF, or a line longer
    than ``limit``, which ends the connection as StreamReader would)."""
    while True:
        end = buf.find(b"\n")
        if end >= 0:
            line = bytes(buf[:end + 1])
            del buf[:end + 1]
            return line
        if len(buf) > limit:
            return None
        data = conn.recv(65536)
        if not data:
            return None
        buf += data


def serve_unix_threaded(path: str, answer, log, owner_uid: int | None = None,
                        owner_gid: int | None = None, *, parse=None, limit: int = MAX_REQUEST,
                        drain: float = 60.0, housekeeping=None, every: float = 30.0,
                        max_connections: int = 64, stop: threading.Event | None = None,
                        sock: socket.socket | None = None, max_idle: float | None = None) -> None:
    """serve_unix() for a helper whose every request blocks on a user worker
    (local(8)): each qmgr connection gets a thread of its own that reads a
    request, answers it (``answer(req)`` gives the results) and writes the
    reply itself.  The qmgr keeps one connection per delivery in progress, so
    a delivery crosses no thread inside the helper: an event loop handing
    each request to a pool thread and taking the answer back costs two
    wake-ups per message, which at local(8)'s two deliveries in flight per
    recipient were a good part of every delivery's latency.

    Same contract as serve_unix(): socket mode 0600 handed to the qmgr's
    owner; on SIGTERM/SIGINT no new request is read, requests in progress
    finish and are answered for up to ``drain`` seconds.  At most
    ``max_connections`` are served at once (more wait in the listen backlog).
    ``stop``, if given, is the event that ends the service (tests; signals
    are only caught when this runs in the main thread).  ``sock`` and
    ``max_idle`` (or adopt_listener()) as for serve_unix(): the master's
    listener, and a return once no connection has been open for that long."""
    sock, max_idle = _adopted(path, sock, max_idle)
    parse = parse or _parse_request
    stop = stop if stop is not None else threading.Event()
    lock = threading.Condition()
    live: dict[socket.socket, threading.Thread] = {}

    def connection(conn: socket.socket) -> None:
        buf = bytearray()
        try:
            while not stop.is_set():
                line = _read_line(conn, buf, limit)
                if line is None:
                    break
                try:
                    req = json.loads(line)
                    parse(req)
                except (ValueError, KeyError, TypeError) as exc:
                    # As answer_requests(): guessing could deliver to the wrong place.
                    log.warning(f"malformed request from qmgr: {exc}")
                    break
                results = answer(req)
                conn.sendall(json.dumps({"id": req.get("id"), "results": results}).encode()
                             + b"\n")
        except OSError:
            pass
        finally:
            with lock:
                live.pop(conn, None)
                lock.notify_all()
            conn.close()

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    if sock is None:
        # Bound and handed to the qmgr's owner under a temporary name, then renamed:
        # a qmgr never meets the socket before it listens or before it may connect.
        try:
            os.unlink(path)
        except (FileNotFoundError, NotADirectoryError):
            pass
        listener, _ = listen(path, owner_uid, owner_gid)
    else:
        listener = sock
    # A short accept timeout is how a signal that arrived between two
    # checks is noticed; it costs a wake-up a second when idle.
    listener.settimeout(1.0)
    next_tidy = time.monotonic() + every
    last = time.monotonic()    # the last connection opened or closed
    try:
        while not stop.is_set():
            if housekeeping is not None and time.monotonic() >= next_tidy:
                housekeeping()
                next_tidy = time.monotonic() + every
            with lock:
                while len(live) >= max_connections and not stop.is_set():
                    lock.wait(1.0)
                if live:
                    last = time.monotonic()
                elif max_idle is not None and time.monotonic() - last >= max_idle:
                    # Accepts happen only in this thread: no connection is
                    # taken between this check and the exit; the backlog is
                    # the master's, for the next helper.
                    break
            if stop.is_set():
                break
            try:
                conn, _ = listener.accept()
            except (socket.timeout, InterruptedError, BlockingIOError):
                continue
            except OSError:
                if stop.is_set():
                    break
                raise
            conn.settimeout(None)
            t = threading.Thread(target=connection, args=(conn,), daemon=True,
                                 name="helper-conn")
            with lock:
                live[conn] = t
            t.start()
    finally:
        listener.close()     # our copy only when it is the master's
        with lock:
            conns = list(live.items())
        for conn, _ in conns:
            try:
                # The reader sees EOF; a request in progress is still answered.
                conn.shutdown(socket.SHUT_RD)
            except OSError:
                pass
        deadline = time.monotonic() + drain
        for _, t in conns:
            t.join(max(0.0, deadline - time.monotonic()))
        if housekeeping is not None:
            housekeeping()


class HelperLinks:
    """The qmgr's side for serve_unix_threaded(): one connection per request
    in progress (at most ``size``; more wait for a free one), idle connections
    kept for the next request and closed after ``link_idle`` seconds unused
    (so the on-demand helper can leave).  Errors come out as ConnectionError."""

    label = "local helper"

    def __init__(self, path: str, size: int = 20, link_idle: float | None = None):
        self.path, self.size = path, size
        self.link_idle = LINK_IDLE if link_idle is None else link_idle
        self._idle: list[tuple] = []       # (reader, writer, monotonic time put back)
        self._open = 0
        self._waiters: list[asyncio.Future] = []
        self._next = 0
        self._reaper = None

    async def _get(self) -> tuple:
        while True:
            while self._idle:
                link = self._idle.pop()[:2]    # the most recently used: the oldest age out
                if not link[0].at_eof() and not link[1].is_closing():
                    return link
                # The helper went away (restart): never write into a dead link.
                self._open -= 1
                link[1].close()
            if self._open < self.size:
                self._open += 1
                try:
                    return await self._connect()
                except BaseException:
                    self._open -= 1
                    self._wake()
                    raise
            fut = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            try:
                await fut
            except BaseException:
                if fut in self._waiters:
                    self._waiters.remove(fut)
                elif fut.done() and not fut.cancelled():
                    self._wake()     # pass the turn on
                raise

    async def _connect(self) -> tuple:
        # The helper may be (re)starting: a few short retries before giving up.
        for attempt in range(10):
            try:
                return await asyncio.open_unix_connection(self.path, limit=MAX_REQUEST)
            except (FileNotFoundError, ConnectionRefusedError):
                if attempt == 9:
                    raise
                await asyncio.sleep(0.3)

    def _wake(self) -> None:
        while self._waiters:
            fut = self._waiters.pop(0)
            if not fut.done():
                fut.set_result(None)
                return

    def _put(self, link: tuple | None) -> None:
        if link is None:
            self._open -= 1
        else:
            self._idle.append((*link, time.monotonic()))
            if self._reaper is None:
                self._reaper = asyncio.get_running_loop().call_later(self.link_idle,
                                                                     self._reap_idle)
        self._wake()

    def _reap_idle(self) -> None:
        self._reaper = None
        cutoff = time.monotonic() - self.link_idle
        while self._idle and self._idle[0][2] <= cutoff:
            _, writer, _ = self._idle.pop(0)
            self._open -= 1
            writer.close()
        if self._idle:
            self._reaper = asyncio.get_running_loop().call_later(
                max(0.0, self._idle[0][2] - cutoff), self._reap_idle)

    async def call(self, fields: dict) -> list:
        link = await self._get()
        self._next += 1
        rid = self._next
        ok = False
        try:
            reader, writer = link
            writer.write(json.dumps({"id": rid, **fields}).encode() + b"\n")
            try:
                line = await reader.readuntil(b"\n")
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
                raise ConnectionError(f"{self.label}: {exc or 'connection closed'}") from None
            msg = json.loads(line)
            if msg.get("id") != rid:
                raise ConnectionError(f"{self.label}: reply for another request")
            ok = True
            return msg.get("results") or []
        finally:
            if not ok:
                # A failed or abandoned request: its reply must never be read
                # as the answer to a later one.
                link[1].close()
            self._put(link if ok else None)

    async def deliver(self, queue_id, sender, nexthop, recipients) -> list:
        return await self.call({"queue_id": queue_id, "sender": sender, "nexthop": nexthop,
                                "recipients": [[r.address, r.orig] for r in recipients]})

    def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            self._reaper = None
        for _, writer, _ in self._idle:
            writer.close()
        self._open -= len(self._idle)
        self._idle = []


class HelperClient:
    """The qmgr's side: one connection, requests matched to replies by id;
    closed after ``link_idle`` seconds without a request in flight (so the
    on-demand helper can leave) and opened again by the next request."""

    label = "virtual helper"

    def __init__(self, path: str, link_idle: float | None = None):
        self.path = path
        self.link_idle = LINK_IDLE if link_idle is None else link_idle
        self._reader = self._writer = None
        self._lock = asyncio.Lock()
        self._next = 0
        self._waiters: dict[int, asyncio.Future] = {}
        self._reader_task = None
        self._last = 0.0
        self._idle_timer = None

    async def _connect(self):
        # The helper may be (re)starting: a few short retries before giving up.
        for attempt in range(10):
            try:
                self._reader, self._writer = await asyncio.open_unix_connection(
                    self.path, limit=MAX_REQUEST)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if attempt == 9:
                    raise
                await asyncio.sleep(0.3)
        # Each connection has its own waiters: a reader task of a connection
        # that is gone must never fail (or clear) the requests of the next one.
        self._waiters = {}
        self._reader_task = asyncio.get_running_loop().create_task(
            self._read_replies(self._reader, self._writer, self._waiters))

    async def _read_replies(self, reader=None, writer=None, waiters=None):
        reader = reader or self._reader
        waiters = self._waiters if waiters is None else waiters
        try:
            while True:
                line = await reader.readuntil(b"\n")
                msg = json.loads(line)
                fut = waiters.pop(msg.get("id"), None)
                if fut is not None and not fut.done():
                    fut.set_result(msg.get("results") or [])
                if not waiters:
                    self._arm_idle()
        except Exception as exc:
            for fut in waiters.values():
                if not fut.done():
                    fut.set_exception(ConnectionError(f"{self.label}: {exc or 'connection closed'}"))
            waiters.clear()
            if writer is None or self._writer is writer:
                self._writer = None

    def _arm_idle(self) -> None:
        self._last = time.monotonic()
        if self._idle_timer is None:
            self._idle_timer = asyncio.get_running_loop().call_later(self.link_idle,
                                                                     self._close_idle)

    def _close_idle(self) -> None:
        self._idle_timer = None
        if self._writer is None:
            return
        left = self._last + self.link_idle - time.monotonic()
        if self._waiters or self._lock.locked() or left > 0:
            self._idle_timer = asyncio.get_running_loop().call_later(
                max(left, 0.05), self._close_idle)
            return
        # Nothing in flight and nobody sending: the helper sees EOF and may leave.
        writer, self._writer = self._writer, None
        writer.close()

    async def call(self, fields: dict) -> list:
        """Send one request (``fields`` plus its id); the helper's results."""
        async with self._lock:
            if self._writer is None or self._writer.is_closing():
                await self._connect()
            self._next += 1
            rid = self._next
            fut = asyncio.get_running_loop().create_future()
            self._waiters[rid] = fut
            self._last = time.monotonic()
            self._writer.write(json.dumps({"id": rid, **fields}).encode() + b"\n")
            await self._writer.drain()
        return await fut

    async def deliver(self, queue_id, sender, nexthop, recipients) -> list:
        return await self.call({"queue_id": queue_id, "sender": sender, "nexthop": nexthop,
                                "recipients": [[r.address, r.orig] for r in recipients]})
