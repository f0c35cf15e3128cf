"""What every delivery agent shares: the request the qmgr hands over, the
per-recipient result it gets back, and lookup-map helpers.

An agent is an object with an async ``deliver(request)``; the qmgr runs it
in its own event loop and does all logging/bookkeeping with the results, so
an agent never touches the queue file state itself.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator


@dataclass
class Recipient:
    address: str
    orig: str | None = None          # original recipient (before alias/virtual rewriting)
    orcpt: str | None = None         # RFC 3461 ORCPT
    notify: str | None = None        # RFC 3461 NOTIFY
    nexthop_recipient: str | None = None   # the resolver's rewritten recipient, if it differs


@dataclass
class DeliveryRequest:
    queue_id: str
    sender: str
    recipients: list[Recipient]
    transport: str
    nexthop: str
    arrival_time: float
    # Returns a fresh iterator over the message content (headers + body,
    # LF-terminated lines) each time it is called.
    open_content: Callable[[], Iterable[bytes]]
    content_size: int = 0
    attributes: dict = field(default_factory=dict)
    # Set by the qmgr when it hands the request over (for delays=a/b/c/d).
    active_time: float = 0.0
    handoff_time: float = 0.0


class QueueContent:
    """``open_content`` for a message in a queue file that can also travel to
    another process: a root helper hands a user worker (local_exec) the
    file's descriptor and where the content lies, never a copy in memory."""

    def __init__(self, qm):
        self._qm = qm

    def __call__(self) -> Iterable[bytes]:
        return self._qm.iter_content()

    def descriptor(self) -> tuple[int, int, int]:
        """(fd, offset, size): a new read-only descriptor of the same file,
        which the caller closes; OSError when it cannot be had."""
        qm = self._qm
        fd = os.open(qm.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            known = getattr(qm, "stat", None)
            if known is not None and (st.st_dev, st.st_ino) != (known.st_dev, known.st_ino):
                raise OSError("queue file was replaced")
        except BaseException:
            os.close(fd)
            raise
        return fd, qm.header.content_offset, qm.header.content_size


class FileContent:
    """The other end of QueueContent.descriptor(): content read with pread."""

    def __init__(self, fd: int, offset: int, size: int, chunk: int = 65536):
        self.fd, self.offset, self.size, self.chunk = fd, offset, size, chunk

    def __call__(self) -> Iterator[bytes]:
        offset, remaining = self.offset, self.size
        while remaining > 0:
            data = os.pread(self.fd, min(self.chunk, remaining), offset)
            if not data:
                raise OSError("queue file content shorter than recorded")
            offset += len(data)
            remaining -= len(data)
            yield data


@dataclass
class RecipientResult:
    recipient: Recipient
    status: str                      # "sent" | "deferred" | "bounced"
    dsn: str                         # "2.0.0", "4.2.0", "5.1.1" ...
    reason: str                      # text in the parentheses of the log line
    relay: str = "none"
    conn_setup_done: float | None = None   # agents with a network connection set this
    done_time: float = field(default_factory=time.time)

    @classmethod
    def sent(cls, rcpt, reason, relay, dsn="2.0.0"):
        return cls(rcpt, "sent", dsn, reason, relay)

    @classmethod
    def deferred(cls, rcpt, reason, relay, dsn="4.0.0"):
        return cls(rcpt, "deferred", dsn, reason, relay)

    @classmethod
    def bounced(cls, rcpt, reason, relay, dsn="5.0.0"):
        return cls(rcpt, "bounced", dsn, reason, relay)


class DeliveryAgent:
    """Base class; ``name`` is the master.cf command / transport it serves."""

    name = "none"
    # How many messages (and bytes of content) for one destination the qmgr
    # may hand over in one deliver_batch() call; 1: one message per call.
    batch_limit = 1
    batch_bytes = 0
    batch_recipients = 0     # recipients of all its messages together (0: no bound)

    def __init__(self, config, log=None, clock=time.time):
        self.config = config
        self.log = log
        self.clock = clock

    async def deliver(self, request: DeliveryRequest) -> list[RecipientResult]:  # pragma: no cover
        raise NotImplementedError

    async def deliver_batch(self, requests: list[DeliveryRequest]) -> list[list[RecipientResult]]:
        """Several messages' requests as one delivery; each request's results,
        in order (an agent with batch_limit > 1 does them as one unit of work)."""
        return [await self.deliver(r) for r in requests]

    def close(self) -> None:
        pass


def open_map(spec: str, config=None):
    """Open one lookup table through postwell.tables (the tables owner's code)."""
    from postwell import tables
    return tables.open_table(spec, config)


def split_map_list(value: str) -> list[str]:
    """Split a table list on commas/white space, keeping "{...}" groups whole
    (inline:{a=b, c=d} is one table), as Postfix's mystrtokq() does."""
    out, cur, depth = [], [], 0
    for ch in value:
        if ch == "{":
            depth += 1
        elif ch == "}" and depth:
            depth -= 1
        if depth == 0 and (ch == "," or ch.isspace()):
            if cur:
                out.append("".join(cur))
                cur = []
            continue
        cur.append(ch)
    if cur:
        out.append("".join(cur))
    return out


class MapList:
    """A parameter's list of tables, searched in order (Postfix's maps_find)."""

    def __init__(self, specs: list[str], config=None, opener=open_map):
        self.specs = specs
        self.tables = [opener(s, config) for s in specs]

    def lookup(self, key: str) -> str | None:
        for t in self.tables:
            v = t.lookup(key)
            if v is not None:
                return v
        return None

    def __bool__(self) -> bool:
        return bool(self.tables)


def iter_lines(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Re-split content chunks into lines (each with its LF, the last maybe without)."""
    rest = b""
    for chunk in chunks:
        if not chunk:
            continue
        data = rest + chunk
        lines = data.split(b"\n")
        rest = lines.pop()
        for line in lines:
            yield line + b"\n"
    if rest:
        yield rest
