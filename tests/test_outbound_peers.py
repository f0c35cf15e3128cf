"""Scripted SMTP peers for the outbound end-to-end tests (loopback only).

:class:`PySink` is a small asyncio SMTP server in a background thread that
records every session and transaction (envelope, Message-Id, raw content) so a
test can prove that nothing was lost and nothing arrived twice.  Its replies
can be scripted per recipient, and it can sleep per message to act as a slow
relay.  Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import re
import socket
import threading
import time
from dataclasses import dataclass, field

MSGID_RE = re.compile(rb"^message-id:\s*(<[^>\r\n]*>)", re.I | re.M)


@dataclass
class Transaction:
    session: int
    mail_from: str
    mail_params: str
    rcpts: list[str]
    data: bytes = b""

    @property
    def message_id(self) -> str | None:
        head = self.data.split(b"\r\n\r\n", 1)[0]
        m = MSGID_RE.search(head)
        return m.group(1).decode("latin-1") if m else None


@dataclass
class PySink:
    """An SMTP sink on ``host:port``; start() binds, stop() closes everything.

    ``rcpt_reply(addr)`` returns the reply line for RCPT TO (default 250);
    ``data_delay`` seconds are slept before the 250 after the final dot.
    ``keywords`` are the EHLO keywords after the greeting line.
    """
    host: str = "127.0.0.1"
    port: int = 0
    name: str = "pysink.test"
    data_delay: float = 0.0
    keywords: tuple = ("PIPELINING", "SIZE 104857600", "8BITMIME", "ENHANCEDSTATUSCODES",
                       "SMTPUTF8", "DSN")
    rcpt_reply: object = None
    greeting: str | None = None
    sessions: int = 0
    transactions: list = field(default_factory=list)
    peers: list = field(default_factory=list)       # client addresses, one per session
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> "PySink":
        self._ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise TimeoutError("PySink did not start")
        if self._error:
            raise self._error
        return self

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._server = self._loop.run_until_complete(
                asyncio.start_server(self._session, self.host, self.port, backlog=512,
                                     reuse_address=True))
            self.port = self._server.sockets[0].getsockname()[1]
        except BaseException as e:      # reported to start()
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        self._loop.run_forever()
        self._server.close()
        # Sessions still open (the client's cached connection) end here, not at GC.
        tasks = asyncio.all_tasks(self._loop)
        for t in tasks:
            t.cancel()
        self._loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        self._loop.run_until_complete(self._server.wait_closed())
        self._loop.close()

    def stop(self) -> None:
        if getattr(self, "_loop", None) and self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # ---- queries (thread-safe)
    def message_ids(self) -> list[str]:
        with self._lock:
            return [t.message_id for t in self.transactions]

    def wait_transactions(self, n: int, timeout: float) -> list[Transaction]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if len(self.transactions) >= n:
                    return list(self.transactions)
            time.sleep(0.05)
        raise TimeoutError(f"PySink got {len(self.transactions)} transactions, wanted {n}")

    # ---- the server
    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with self._lock:
            self.sessions += 1
            sid = self.sessions
            peer = writer.get_extra_info("peername")
            self.peers.append(peer[0] if peer else None)

        async def say(text: str) -> None:
            writer.write(text.encode() + b"\r\n")
            await writer.drain()

        cur: Transaction | None = None
        try:
            await say(self.greeting or f"220 {self.name} ESMTP")
            while True:
                line = await asyncio.wait_for(reader.readline(), 60)
                if not line:
                    return
                cmd = line.decode("utf-8", "replace").rstrip("\r\n")
                verb = cmd[:4].upper()
                if verb == "EHLO":
                    lines = [self.name, *self.keywords]
                    await say("\r\n".join(f"250{'-' if i < len(lines) - 1 else ' '}{x}"
                                          for i, x in enumerate(lines)))
                elif verb == "HELO":
                    await say(f"250 {self.name}")
                elif verb == "MAIL":
                    m = re.match(r"MAIL FROM:\s*<([^>]*)>\s*(.*)", cmd, re.I)
                    cur = Transaction(sid, m.group(1) if m else "", m.group(2) if m else "", [])
                    await say("250 2.1.0 Ok")
                elif verb == "RCPT":
                    m = re.match(r"RCPT TO:\s*<([^>]*)>", cmd, re.I)
                    addr = m.group(1) if m else ""
                    reply = self.rcpt_reply(addr) if self.rcpt_reply else None
                    reply = reply or "250 2.1.5 Ok"
                    if reply.startswith("2") and cur is not None:
                        cur.rcpts.append(addr)
                    await say(reply)
                elif verb == "DATA":
                    if cur is None or not cur.rcpts:
                        await say("554 5.5.1 Error: no valid recipients")
                        continue
                    await say("354 End data with <CR><LF>.<CR><LF>")
                    chunks = []
                    size = 0
                    while True:
                        ln = await asyncio.wait_for(reader.readline(), 60)
                        if not ln:
                            return
                        if ln in (b".\r\n", b".\n"):
                            break
                        if ln.startswith(b"."):
                            ln = ln[1:]          # RFC 5321 4.5.2
                        size += len(ln)
                        if size < 4_000_000:
                            chunks.append(ln)
                    cur.data = b"".join(chunks)
                    if self.data_delay:
                        await asyncio.sleep(self.data_delay)
                    with self._lock:
                        self.transactions.append(cur)
                    cur = None
                    await say("250 2.0.0 Ok: queued")
                elif verb == "RSET":
                    cur = None
                    await say("250 2.0.0 Ok")
                elif verb == "NOOP":
                    await say("250 2.0.0 Ok")
                elif verb == "QUIT":
                    await say("221 2.0.0 Bye")
                    return
                else:
                    await say("502 5.5.2 Error: command not recognized")
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()


def bindable(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def test_pysink_records_a_pipelined_transaction():
    """The peer itself: pipelined commands, dot-unstuffing, Message-Id capture."""
    import smtplib
    with PySink(rcpt_reply=lambda a: "550 5.1.1 no" if a.startswith("bad") else None) as sink:
        with smtplib.SMTP("127.0.0.1", sink.port, timeout=10) as s:
            refused = s.sendmail("a@x.test", ["ok@y.test", "bad@y.test"],
                                 b"Message-Id: <m1@x.test>\r\n\r\n.dot\r\n")
        assert list(refused) == ["bad@y.test"]
        t, = sink.wait_transactions(1, 10)
        assert (t.message_id, t.rcpts, t.data.endswith(b".dot\r\n")) == ("<m1@x.test>", ["ok@y.test"], True)
        assert sink.sessions == 1
