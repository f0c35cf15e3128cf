"""The privileged half of pipe(8), for a qmgr that runs as mail_owner.

Only root can start a command as a master.cf pipe service's user=.  When
the master runs as root and master.cf defines a pipe service, it starts this
helper (still root) listening on ``$queue_directory/private/pipe`` (owned by
mail_owner, mode 0600: only the qmgr and root can connect).  The qmgr's
PipeAgent sends "deliver these recipients of queue file ID through
transport T"; the helper reads the queue file itself and takes the command,
the user and the flags from its own copy of master.cf (a request can name
neither), then runs the command in a child that has become user= before
exec.

Protocol: one JSON object per line each way (as delivery.helper).
  request:  {"id": N, "queue_id": "...", "transport": "...", "nexthop": "...",
             "recipients": [[address, orig], ...]}
  reply:    {"id": N, "results": [[status, dsn, reason], ...]}
"""

from __future__ import annotations

import asyncio
import json
import os
import signal

SOCKET_NAME = "pipe"
MAX_REQUEST = 1 << 20      # bytes per request line (bounded memory)
MAX_CONCURRENT = 50        # commands running at once (pipe.MAX_COMMANDS threads)

# Set by the master in the qmgr child when the helper runs.
HELPER_SOCKET: str | None = None


def socket_path(config) -> str:
    return os.path.join(config.get("queue_directory"), "private", SOCKET_NAME)


def handle_request(agent, store, req: dict) -> list:
    """One request -> [[status, dsn, reason], ...] (blocking; runs in a thread)."""
    from postwell.queue import is_queue_id

    from .base import DeliveryRequest, Recipient
    from .pipe import find_pipe_service
    qid = str(req["queue_id"])
    if not is_queue_id(qid):
        raise ValueError("bad queue id")
    transport = str(req.get("transport") or "")
    rcpts = [Recipient(str(a), str(o) if o else None) for a, o in req["recipients"]]
    if not rcpts:
        return []
    if find_pipe_service(agent.config, transport) is None:
        # Only services the administrator defined as pipe in master.cf run here.
        return [["deferred", "4.3.0", "mail transport unavailable"] for _ in rcpts]
    try:
        qm = store.open(qid, "active", writable=False)
    except Exception as exc:
        return [["deferred", "4.3.0", f"cannot open queue file: {exc}"] for _ in rcpts]
    try:
        request = DeliveryRequest(queue_id=qid, sender=qm.sender, recipients=rcpts,
                                  transport=transport, nexthop=str(req.get("nexthop", "")),
                                  arrival_time=qm.arrival_time,
                                  open_content=lambda: qm.iter_content(),
                                  content_size=qm.content_size,
                                  attributes=dict(getattr(qm, "attributes", {}) or {}))
        status, dsn, reason = agent.deliver_blocking(request)
    finally:
        qm.close()
    return [[status, dsn, reason] for _ in rcpts]


def serve(config, owner_uid: int | None = None, owner_gid: int | None = None) -> None:
    """Run the helper until SIGTERM (as root)."""
    from postwell.log import MailLog
    from postwell.queue import QueueStore

    from .pipe import PipeAgent, command_executor

    log = MailLog.from_config(config, "pipe")
    limit = asyncio.Semaphore(MAX_CONCURRENT)
    store = QueueStore(config.get("queue_directory"))
    path = socket_path(config)
    agent = PipeAgent(config, log=log, helper_socket="")
    connections = set()

    async def handle(reader, writer):
        tasks = set()
        connections.add(reader)

        async def one(req):
            async with limit:
                try:
                    results = await asyncio.get_running_loop().run_in_executor(
                        command_executor(), handle_request, agent, store, req)
                except Exception as exc:
                    log.warning(f"pipe helper: {exc}")
                    results = [["deferred", "4.3.0", "mail system configuration error"]
                               for _ in req.get("recipients", [])]
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
                    if not isinstance(req, dict) or not isinstance(req.get("recipients"), list):
                        raise ValueError("malformed")
                except ValueError as exc:
                    log.warning(f"malformed request from qmgr: {exc}")
                    break
                t = asyncio.get_running_loop().create_task(one(req))
                tasks.add(t)
                t.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.wait(list(tasks), timeout=3600)
        finally:
            connections.discard(reader)
            writer.close()

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
        # Stop reading new requests; commands in flight still finish and answer.
        for reader in list(connections):
            reader.feed_eof()
        pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        if pending:
            await asyncio.wait(pending, timeout=60)

    asyncio.run(main())


class PipeHelperClient:
    """The qmgr's side: one connection, requests matched to replies by id."""

    def __init__(self, path: str):
        self.path = path
        self._reader = self._writer = None
        self._lock = asyncio.Lock()
        self._next = 0
        self._waiters: dict[int, asyncio.Future] = {}

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
        asyncio.get_running_loop().create_task(self._read_replies(self._reader))

    async def _read_replies(self, reader):
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
                    fut.set_exception(ConnectionError(f"pipe helper: {exc or 'connection closed'}"))
            self._waiters.clear()
            self._writer = None

    async def deliver(self, request) -> list:
        async with self._lock:
            if self._writer is None or self._writer.is_closing():
                await self._connect()
            self._next += 1
            rid = self._next
            fut = asyncio.get_running_loop().create_future()
            self._waiters[rid] = fut
            req = {"id": rid, "queue_id": request.queue_id, "transport": request.transport,
                   "nexthop": request.nexthop,
                   "recipients": [[r.address, r.orig] for r in request.recipients]}
            self._writer.write(json.dumps(req).encode() + b"\n")
            await self._writer.drain()
        return await fut
