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
import os

from .helper import HelperClient

SOCKET_NAME = "pipe"
MAX_CONCURRENT = 50        # commands running at once (pipe.MAX_COMMANDS threads)

# Set by the master in the qmgr child when the helper runs.
HELPER_SOCKET: str | None = None


def socket_path(config) -> str:
    return os.path.join(config.get("queue_directory"), "private", SOCKET_NAME)


def handle_request(agent, store, req: dict) -> list:
    """One request -> [[status, dsn, reason, diag_type, diag_text], ...] (blocking;
    runs in a thread)."""
    from .base import DeliveryRequest
    from .helper import queue_request
    from .pipe import find_pipe_service
    qid, rcpts = queue_request(req)
    transport = str(req.get("transport") or "")
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
        out = agent.deliver_blocking(request)
    finally:
        qm.close()
    status, dsn, reason = out
    # The command's diagnostic (x-unix, its output) goes back too: the notice's
    # Diagnostic-Code cannot be told from the reason text alone.
    row = [status, dsn, reason, getattr(out, "diag_type", None), getattr(out, "diag_text", None)]
    return [list(row) for _ in rcpts]


def serve(config, owner_uid: int | None = None, owner_gid: int | None = None) -> None:
    """Run the helper until SIGTERM (as root)."""
    from postwell.log import MailLog
    from postwell.queue import QueueStore

    from .helper import answer_requests, serve_unix
    from .pipe import PipeAgent, command_executor

    log = MailLog.from_config(config, "pipe")
    limit = asyncio.Semaphore(MAX_CONCURRENT)
    store = QueueStore(config.get("queue_directory"))
    agent = PipeAgent(config, log=log, helper_socket="")

    async def answer(req, _parsed):
        async with limit:
            try:
                return await asyncio.get_running_loop().run_in_executor(
                    command_executor(), handle_request, agent, store, req)
            except Exception as exc:
                log.warning(f"pipe helper: {exc}")
                return [["deferred", "4.3.0", "mail system configuration error"]
                        for _ in req.get("recipients", [])]

    async def handle(reader, writer):
        await answer_requests(reader, writer, answer, log)

    serve_unix(socket_path(config), handle, owner_uid, owner_gid)


class PipeHelperClient(HelperClient):
    """The qmgr's side: one connection, requests matched to replies by id."""

    label = "pipe helper"

    async def deliver(self, request) -> list:
        return await self.call({"queue_id": request.queue_id, "transport": request.transport,
                                "nexthop": request.nexthop,
                                "recipients": [[r.address, r.orig] for r in request.recipients]})
