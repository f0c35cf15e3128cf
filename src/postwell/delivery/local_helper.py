"""The privileged half of local(8), for a qmgr that runs as mail_owner.

The master (root) starts this helper, which stays root and listens on
``$queue_directory/private/local`` (chowned to mail_owner, mode 0600: only
the qmgr and root can connect).  The qmgr's LocalAgent sends "deliver these
recipients of queue file ID"; the helper opens the queue file itself, does
all lookups itself (aliases, passwd, .forward: a request can name neither a
path, a command nor a uid) and has each user operation done by a user
worker (local_exec.run_as) that became the user before touching anything.  Forwarded addresses come back
as pending forwards: the unprivileged qmgr side re-injects them through
cleanup, so new queue files are always owned by mail_owner.

Protocol (the same framing as the virtual helper; delivery.helper.HelperLinks
is the client): one JSON object per line each way, one request at a time on
a connection (each connection has its own thread here: helper.serve_unix_threaded).
  request:  {"id": N, "queue_id": "...", "sender": "...", "nexthop": "...",
             "recipients": [[address, orig], ...]}
  reply:    {"id": N, "results": [[leaf, ...] per recipient]}
            leaf = [address, orig, status, dsn, reason, forward_sender, delivered]
  batch:    {"id": N, "batch": [{"queue_id": ..., "sender": ..., "nexthop": ...,
             "recipients": [...]}, ...]}  (at most BATCH_MAX messages)
  reply:    {"id": N, "results": [[[leaf, ...] per recipient] per message]}
A batch is several messages the qmgr had waiting for one destination
(LocalAgent.deliver_batch); one user's Maildir copies among them are
written as one unit of work (LocalAgent.expand_batch).
"""

from __future__ import annotations

import contextlib
import os
import threading

SOCKET_NAME = "local"
MAX_CONCURRENT = 20        # requests in progress at once (the qmgr opens at most this many
                           # connections, one per delivery in progress)
MAX_CONNECTIONS = 64       # connections served at once (a reload's old and new qmgr overlap)
INLINE_CONTENT = 16 << 10  # messages up to this size reach the user worker in the request
BATCH_MAX = 64             # messages per batch request (the qmgr sends at most local.BATCH_LIMIT)

# Set by the master in the qmgr child when the helper runs.
HELPER_SOCKET: str | None = None


def socket_path(config) -> str:
    return os.path.join(config.get("queue_directory"), "private", SOCKET_NAME)


def handle_request(agent, store, req: dict) -> list:
    """One request -> per-recipient leaf lists (blocking; runs in a thread)."""
    with contextlib.ExitStack() as stack:
        request, failed = _open_request(store, req, stack)
        if request is None:
            return failed
        per_rcpt = agent.expand_request(request)
    return [[leaf.to_json() for leaf in leaves] for leaves in per_rcpt]


def _failed(rcpts, reason: str) -> list:
    return [[[r.address, r.orig or r.address, "deferred", "4.3.0", reason, None, None]]
            for r in rcpts]


def _open_request(store, req: dict, stack):
    """(DeliveryRequest, None) for one message of a request, the queue file
    held open by ``stack``; (None, results) when it cannot be opened."""
    from .base import DeliveryRequest, QueueContent
    from .helper import queue_request
    from .local_exec import InlineContent
    qid, rcpts = queue_request(req)
    try:
        qm = store.open(qid, "active", writable=False)
    except Exception as exc:
        return None, _failed(rcpts, f"cannot open queue file: {exc}")
    stack.callback(qm.close)
    content = QueueContent(qm)
    if qm.content_size <= INLINE_CONTENT:
        # Small mail is in memory already (the open read the file whole):
        # it goes to the user worker inside the request (local_exec.InlineContent).
        content = InlineContent(b"".join(qm.iter_content()))
    return DeliveryRequest(queue_id=qid, sender=str(req.get("sender", "")), recipients=rcpts,
                           transport=str(req.get("transport") or "local"),
                           nexthop=str(req.get("nexthop", "")), arrival_time=qm.arrival_time,
                           open_content=content, content_size=qm.content_size,
                           attributes=dict(getattr(qm, "attributes", {}) or {})), None


def handle_batch(agent, store, req: dict) -> list:
    """A batch request -> per message, per recipient leaf lists (blocking).
    Every queue file stays open until the batch is delivered: at most
    BATCH_MAX of them, their content bounded by the qmgr's batch size."""
    out: list = [None] * len(req["batch"])
    requests, where = [], []
    with contextlib.ExitStack() as stack:
        for n, one in enumerate(req["batch"]):
            try:
                request, failed = _open_request(store, one, stack)
            except (ValueError, KeyError, TypeError):
                # A message the request cannot name (no queue id): the others go on.
                request, failed = None, config_error(one)
            if request is None:
                out[n] = failed
            else:
                requests.append(request)
                where.append(n)
        if requests:
            for n, per_rcpt in zip(where, agent.expand_batch(requests)):
                # None: not attempted (the answer's size bound); the qmgr side
                # sends that message again on its own.
                out[n] = None if per_rcpt is None else \
                    [[leaf.to_json() for leaf in leaves] for leaves in per_rcpt]
    return out


def parse_request(req):
    """A single request or a batch (ValueError when malformed)."""
    from .helper import _parse_request
    if isinstance(req, dict) and "batch" in req:
        batch = req["batch"]
        if not isinstance(batch, list) or not 0 < len(batch) <= BATCH_MAX:
            raise ValueError("malformed batch")
        for one in batch:
            _parse_request(one)
        return req
    return _parse_request(req)


def serve(config, owner_uid: int | None = None, owner_gid: int | None = None) -> None:
    """Run the helper until SIGTERM (as root)."""
    from postwell.log import MailLog
    from postwell.queue import QueueStore

    from . import local_exec
    from .helper import serve_unix_threaded
    from .local import LocalAgent

    log = MailLog.from_config(config, "local")
    local_exec.use_worker_pool()
    local_exec.start_fsync_threads()
    # A batch holds its queue files and its Maildir files open together: up
    # to 2 x 32 descriptors for each of the MAX_CONCURRENT requests at once.
    from postwell.qmgr import _raise_fd_limit
    _raise_fd_limit()
    # Each request blocks on a user worker (and its fsyncs) in the thread of
    # its qmgr connection (serve_unix_threaded); at most this many at once.
    limit = threading.BoundedSemaphore(MAX_CONCURRENT)
    store = QueueStore(config.get("queue_directory"))
    try:
        agent = LocalAgent(config, log=log, store=store, helper_socket="")
    except Exception as exc:
        log.fatal(str(exc))
        agent = None

    def answer(req):
        with limit:
            try:
                if agent is None:
                    raise ValueError("mail system configuration error")
                if "batch" in req:
                    return handle_batch(agent, store, req)
                return handle_request(agent, store, req)
            except Exception as exc:
                log.warning(f"local helper: {exc}")
                if "batch" in req:
                    return [config_error(one) for one in req["batch"]]
                return config_error(req)

    serve_unix_threaded(socket_path(config), answer, log, owner_uid, owner_gid,
                        parse=parse_request, housekeeping=local_exec.retire_idle_workers,
                        max_connections=MAX_CONNECTIONS)


def config_error(req: dict) -> list:
    return [[[str(a), str(o or a), "deferred", "4.3.0", "mail system configuration error",
              None, None]] for a, o in req.get("recipients", [])]
