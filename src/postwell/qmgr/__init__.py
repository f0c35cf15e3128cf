"""The queue manager.  ``serve(config)`` is the master's entry point for the
qmgr child; ``QueueManager`` is the scheduler itself (tests drive it directly)."""

from __future__ import annotations

import asyncio
import os
import signal
import time

from .manager import QueueManager  # noqa: F401

FATAL_EXIT_DELAY = 1.0     # msg_fatal() sleeps this long before exit(1)


def serve(config, stop_event=None) -> None:
    """Run the qmgr until SIGTERM (finish deliveries in flight, then return)."""
    from postwell.log import MailLog
    from postwell.queue import QueueStore

    log = MailLog.from_config(config, "qmgr")
    logs = {("qmgr", None): log}

    def agent_log(name, syslog_name=None):
        # A master.cf service with -o syslog_name=postfix/relay logs as
        # postfix/relay/smtp, as Postfix does.
        key = (name, syslog_name)
        if key not in logs:
            cfg = config.override({"syslog_name": syslog_name}) if syslog_name else config
            logs[key] = MailLog.from_config(cfg, name)
        return logs[key]

    _raise_fd_limit()

    async def main():
        import concurrent.futures
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        # Mailbox writes and queue fsyncs run here; enough threads that one slow
        # disk operation does not hold up every other delivery.
        loop.set_default_executor(concurrent.futures.ThreadPoolExecutor(
            max_workers=16, thread_name_prefix="qmgr-io"))
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        # SIGUSR1: "flush" (retry deferred mail now), as postqueue -f asks.
        store = QueueStore(config.get("queue_directory"))
        qm = QueueManager(config, store, log=log, resolver=None, agent_logs=agent_log,
                          bounce_log=agent_log("bounce"))
        loop.add_signal_handler(signal.SIGUSR1, qm.flush)
        fifo = os.path.join(config.get("queue_directory"), "public", "qmgr")
        await qm.run(fifo, stop, freeze_gc=True)
        return qm.fatal

    try:
        # uvloop's event loop costs less per callback and per thread hand-off.
        import uvloop
    except ImportError:
        fatal = asyncio.run(main())
    else:
        fatal = uvloop.run(main())
    if fatal:
        # Postfix's msg_fatal(): a second's pause (no tight restart loop), then
        # exit status 1, which the master logs; mail in active/ waits for the
        # next qmgr.
        time.sleep(FATAL_EXIT_DELAY)
        raise SystemExit(1)


def _raise_fd_limit() -> None:
    """Every message in delivery holds its queue file open; use the hard limit."""
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = hard if hard != resource.RLIM_INFINITY else 65536
        if soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, 65536), hard))
    except (ImportError, ValueError, OSError):
        pass
