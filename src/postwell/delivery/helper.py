"""The privileged half of virtual(8).

The qmgr runs as mail_owner, but a virtual mailbox must be written with the
uid/gid from virtual_uid_maps / virtual_gid_maps.  When the master runs as
root it starts this helper (still root) listening on
``$queue_directory/private/virtual`` (owned by mail_owner, mode 0600: only the
qmgr and root can connect).  The qmgr sends "deliver these recipients of
queue file ID"; the helper does its own table lookups (a request cannot name
a path or a uid) and forks one child per mailbox that switches to the
mailbox owner before touching any file.

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

SOCKET_NAME = "virtual"
MAX_REQUEST = 1 << 20      # bytes per request line (bounded memory)

# Set by the master in the qmgr child when a helper is running.
HELPER_SOCKET: str | None = None


def socket_path(config) -> str:
    return os.path.join(config.get("queue_directory"), "private", SOCKET_NAME)


def serve(config, owner_uid: int | None = None, owner_gid: int | None = None) -> None:
    """Run the helper until SIGTERM (as root)."""
    from postwell.log import MailLog
    from postwell.queue import QueueStore, is_queue_id

    from .base import DeliveryRequest, Recipient
    from .virtual import VirtualAgent

    log = MailLog.from_config(config, "virtual")
    limit = asyncio.Semaphore(100)   # deliveries (forked children) at once
    store = QueueStore(config.get("queue_directory"))
    path = socket_path(config)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            agent = VirtualAgent(config, log=log)
        except Exception as exc:
            log.fatal(str(exc))
            agent = None
        tasks = set()

        async def one(req, qid, rcpts):
            async with limit:
                results = await deliver(agent, qid, str(req.get("sender", "")),
                                        str(req.get("nexthop", "")), rcpts)
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
                    qid = str(req["queue_id"])
                    if not is_queue_id(qid):
                        raise ValueError("bad queue id")
                    rcpts = [Recipient(str(a), str(o) if o else None) for a, o in req["recipients"]]
                except (ValueError, KeyError, TypeError) as exc:
                    log.warning(f"malformed request from qmgr: {exc}")
                    break
                t = asyncio.get_running_loop().create_task(one(req, qid, rcpts))
                tasks.add(t)
                t.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.wait(list(tasks), timeout=300)
        finally:
            writer.close()

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
                                      open_content=lambda: qm.iter_content(),
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

    async def main():
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        old = os.umask(0o177)
        try:
            server = await asyncio.start_unix_server(handle, path, limit=MAX_REQUEST)
        finally:
            os.umask(old)
        if owner_uid is not None:
            os.chown(path, owner_uid, owner_gid if owner_gid is not None else -1)
        await stop.wait()
        server.close()
        # Deliveries in flight finish (their results reach the qmgr) before we exit.
        pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        if pending:
            await asyncio.wait(pending, timeout=60)

    asyncio.run(main())


class HelperClient:
    """The qmgr's side: one connection, requests matched to replies by id."""

    def __init__(self, path: str):
        self.path = path
        self._reader = self._writer = None
        self._lock = asyncio.Lock()
        self._next = 0
        self._waiters: dict[int, asyncio.Future] = {}
        self._reader_task = None

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
        self._reader_task = asyncio.get_running_loop().create_task(self._read_replies())

    async def _read_replies(self):
        reader = self._reader
        try:
            while True:
                line = await reader.readuntil(b"\n")
                msg = json.loads(line)
                fut = self._waiters.pop(msg.get("id"), None)
                if fut is not None and not fut.done():
                    fut.set_result(msg.get("results") or [])
        except Exception as exc:
            for fut in self._waiters.values():
                if not fut.done():
                    fut.set_exception(ConnectionError(f"virtual helper: {exc or 'connection closed'}"))
            self._waiters.clear()
            self._writer = None

    async def deliver(self, queue_id, sender, nexthop, recipients) -> list:
        async with self._lock:
            if self._writer is None or self._writer.is_closing():
                await self._connect()
            self._next += 1
            rid = self._next
            fut = asyncio.get_running_loop().create_future()
            self._waiters[rid] = fut
            req = {"id": rid, "queue_id": queue_id, "sender": sender, "nexthop": nexthop,
                   "recipients": [[r.address, r.orig] for r in recipients]}
            self._writer.write(json.dumps(req).encode() + b"\n")
            await self._writer.drain()
        return await fut
