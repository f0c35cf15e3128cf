"""The privileged half of local(8), for a qmgr that runs as mail_owner.

The master (root) starts this helper, which stays root and listens on
``$queue_directory/private/local`` (chowned to mail_owner, mode 0600: only
the qmgr and root can connect).  The qmgr's LocalAgent sends "deliver these
recipients of queue file ID"; the helper opens the queue file itself, does
all lookups itself (aliases, passwd, .forward: a request can name neither a
path, a command nor a uid) and forks one child per user operation that
becomes the user before touching anything.  Forwarded addresses come back
as pending forwards: the unprivileged qmgr side re-injects them through
cleanup, so new queue files are always owned by mail_owner.

Protocol (the same framing as the virtual helper; delivery.helper.HelperClient
is the client): one JSON object per line each way.
  request:  {"id": N, "queue_id": "...", "sender": "...", "nexthop": "...",
             "recipients": [[address, orig], ...]}
  reply:    {"id": N, "results": [[leaf, ...] per recipient]}
            leaf = [address, orig, status, dsn, reason, forward_sender, delivered]
"""

from __future__ import annotations

import asyncio
import json
import os
import signal

SOCKET_NAME = "local"
MAX_REQUEST = 1 << 20

# Set by the master in the qmgr child when the helper runs.
HELPER_SOCKET: str | None = None


def socket_path(config) -> str:
    return os.path.join(config.get("queue_directory"), "private", SOCKET_NAME)


def handle_request(agent, store, req: dict) -> list:
    """One request -> per-recipient leaf lists (blocking; runs in a thread)."""
    from postwell.queue import is_queue_id

    from .base import DeliveryRequest, Recipient
    qid = str(req["queue_id"])
    if not is_queue_id(qid):
        raise ValueError("bad queue id")
    rcpts = [Recipient(str(a), str(o) if o else None) for a, o in req["recipients"]]
    try:
        qm = store.open(qid, "active", writable=False)
    except Exception as exc:
        return [[[r.address, r.orig or r.address, "deferred", "4.3.0",
                  f"cannot open queue file: {exc}", None, None]] for r in rcpts]
    try:
        request = DeliveryRequest(queue_id=qid, sender=str(req.get("sender", "")), recipients=rcpts,
                                  transport=str(req.get("transport") or "local"),
                                  nexthop=str(req.get("nexthop", "")), arrival_time=qm.arrival_time,
                                  open_content=lambda: qm.iter_content(),
                                  content_size=qm.content_size,
                                  attributes=dict(getattr(qm, "attributes", {}) or {}))
        per_rcpt = agent.expand_request(request)
    finally:
        qm.close()
    return [[leaf.to_json() for leaf in leaves] for leaves in per_rcpt]


def serve(config, owner_uid: int | None = None, owner_gid: int | None = None) -> None:
    """Run the helper until SIGTERM (as root)."""
    from postwell.log import MailLog
    from postwell.queue import QueueStore

    from .local import LocalAgent

    log = MailLog.from_config(config, "local")
    limit = asyncio.Semaphore(20)
    store = QueueStore(config.get("queue_directory"))
    path = socket_path(config)
    try:
        agent = LocalAgent(config, log=log, store=store, helper_socket="")
    except Exception as exc:
        log.fatal(str(exc))
        agent = None

    connections = set()

    async def handle(reader, writer):
        tasks = set()
        connections.add(reader)

        async def one(req):
            async with limit:
                try:
                    if agent is None:
                        raise ValueError("mail system configuration error")
                    results = await asyncio.get_running_loop().run_in_executor(
                        None, handle_request, agent, store, req)
                except Exception as exc:
                    log.warning(f"local helper: {exc}")
                    results = [[[str(a), str(o or a), "deferred", "4.3.0",
                                 "mail system configuration error", None, None]]
                               for a, o in req.get("recipients", [])]
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
        # Stop reading new requests; deliveries in flight still finish and answer.
        for reader in list(connections):
            reader.feed_eof()
        pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        if pending:
            await asyncio.wait(pending, timeout=60)

    asyncio.run(main())
