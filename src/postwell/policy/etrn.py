"""ETRN (RFC 1985) for the smtpd: which sites fast_flush_domains lets a client flush,
and the flush itself.

Postfix hands the site to its flush(8) daemon, which keeps a log of deferred queue
ids per site.  postwell has no such daemon: the deferred queue is scanned for
messages with a pending recipient in the site's domain, and those become due now
and go back to incoming/ (what ``postqueue -s`` does), then the qmgr is woken.
"""

from __future__ import annotations

import asyncio
import time

from postwell.queue import CorruptQueueFile, QueueFileNotFound, QueueStore, notify_qmgr

from .matchlist import DomainList

# flush_send_site()'s answers, as the smtpd turns them into replies.
FLUSH_OK = "ok"          # 250 Queuing started
FLUSH_DENY = "deny"      # 459 <site>: service unavailable
FLUSH_FAIL = "fail"      # 458 Unable to queue messages


class FastFlush:
    def __init__(self, config) -> None:
        self.config = config
        self._domains: DomainList | None = None
        self._busy = False

    def _list(self) -> DomainList:
        if self._domains is None:
            self._domains = DomainList("fast_flush_domains", self.config.get("fast_flush_domains"),
                                       self.config)
        return self._domains

    def check(self, site: str) -> str:
        """FLUSH_OK when the site may be flushed, else why not."""
        try:
            return FLUSH_OK if self._list().match(site) else FLUSH_DENY
        except Exception:   # a table in fast_flush_domains that fails: no answer, no flush
            return FLUSH_FAIL

    def start(self, site: str) -> None:
        """Flush in a worker thread; the client has its 250 already (RFC 1985 4: the
        server starts delivery and answers at once).  One flush at a time per process:
        a client repeating ETRN gains nothing by it."""
        if self._busy:
            return
        self._busy = True
        loop = asyncio.get_running_loop()
        done = loop.run_in_executor(None, flush_site, self.config.get("queue_directory"), site)
        done.add_done_callback(self._finished)

    def _finished(self, fut) -> None:
        self._busy = False
        fut.exception()     # retrieved: a failed scan costs only the periodic retry


def flush_site(queue_directory: str, site: str, now: float | None = None) -> list[str]:
    """Make deferred mail with a pending recipient at ``site`` due now; the ids moved."""
    store = QueueStore(queue_directory)
    site = site.lower().rstrip(".")
    moved = []
    for qid in store.scan("deferred"):
        try:
            with store.open(qid, "deferred", writable=False) as qm:
                wanted = any(r.address.rpartition("@")[2].lower().rstrip(".") == site
                             for r in qm.pending_recipients if "@" in r.address)
            if not wanted:
                continue
            store.set_next_attempt(qid, time.time() if now is None else now)
            store.move(qid, "deferred", "incoming")
        except (QueueFileNotFound, CorruptQueueFile, FileNotFoundError):
            continue
        moved.append(qid)
    if moved:
        notify_qmgr(queue_directory)
    return moved
