"""The verify service: answers the smtpd's queries from the cache, queues
probes through cleanup and records the results the qmgr reports.

The master starts ``serve(config, sock=..., max_idle=...)`` on demand in a child
already running as mail_owner (Postfix: ``verify unix - - n - 1 verify``); one
process, one asyncio loop.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import stat
import time

from . import (IN_PROGRESS, MAX_LINE, MTA_PROBE, STATUS_BOUNCE, STATUS_DEFER, STATUS_OK,
               VERIFY_ATTRIBUTE, socket_path)
from postwell.fdutil import unlink_if_ours

from .cache import PROBE_TTL, CacheOpenError, MemoryStore, VerifyCache, open_store


def _clean(text: str) -> str:
    return text.replace("\t", " ").replace("\r", " ").replace("\n", " ")


def probe_sender(config) -> str:
    """address_verify_sender; empty or <> is the null sender (make_verify_sender_addr)."""
    sender = (config.get("address_verify_sender") or "").strip()
    return "" if sender in ("", "<>") else sender


class Prober:
    """Queues probe messages: sender address_verify_sender, one recipient, the
    verify flag, no content (a probe is never delivered, deferred or bounced)."""

    def __init__(self, config, log=None, *, store=None, cleanup_log=None) -> None:
        self.config = config
        self.log = log
        self._store = store
        self._cleanup = None
        self._cleanup_log = cleanup_log

    def _cleanup_service(self):
        if self._cleanup is None:
            from postwell.cleanup import Cleanup
            from postwell.queue import QueueStore
            store = self._store or QueueStore(self.config.get("queue_directory"))
            log = self._cleanup_log
            if log is None:
                from postwell.log import MailLog
                log = MailLog.from_config(self.config, "cleanup")
            self._cleanup = Cleanup(self.config, store, log)
        return self._cleanup

    async def send(self, address: str) -> str | None:
        """Queue one probe; its queue id, or None (logged) when it could not be."""
        try:
            # As Postfix's post_mail(): a local submission, so cleanup adds Date,
            # Message-Id and From, after our own Received line.
            cleanup = self._cleanup_service()
            cs = cleanup.open(rewrite_local=True)
            # smtputf8_autodetect_classes' default names "verify": a probe for a
            # UTF-8 address asks for SMTPUTF8 as Postfix's does.
            cs.autodetect_utf8 = cleanup.smtputf8_autodetect("verify")
        except Exception as exc:   # noqa: BLE001 - no probe now; the next query retries
            if self.log is not None:
                self.log.warning(f"cannot queue address verification probe for {address}: {exc}")
            return None
        try:
            cs.set_sender(probe_sender(self.config))
            # The address as asked is the original recipient: the result updates
            # that cache key even when cleanup qualifies or rewrites the address.
            cs.add_recipient(address, orig=address)
            cs.set_attribute(VERIFY_ATTRIBUTE, MTA_PROBE)
            from postwell.cleanup import mail_date
            cfg = self.config
            cs.prepend_header(f"Received: by {cfg.get('myhostname')} "
                              f"({cfg.get('mail_name') or 'postwell'})\n"
                              f"\tid {cs.queue_id}; {mail_date(cs.arrival_time)}")
        except BaseException:
            cs.abort()
            raise
        try:
            reply = await cs.finish()
        except Exception as exc:   # noqa: BLE001 - no probe now; the next query retries
            if self.log is not None:
                self.log.warning(f"cannot queue address verification probe for {address}: {exc}")
            return None
        if reply.code // 100 != 2:
            if self.log is not None:
                self.log.warning(f"address verification probe for {address} refused by cleanup: "
                                 f"{reply}")
            return None
        from postwell.cleanup.service import wake_qmgr
        wake_qmgr(self.config.get("queue_directory"))
        return cs.queue_id


class VerifyService:
    """The request side, without sockets (tests feed it lines)."""

    def __init__(self, cache: VerifyCache, prober, log=None, pending_limit: int = 5000,
                 clock=time.monotonic) -> None:
        self.cache = cache
        self.prober = prober
        self.log = log
        self.pending_limit = pending_limit
        self.clock = clock
        self._probing: set[str] = set()
        # Probes queued and not answered yet (address -> when), so that a flood of
        # unknown addresses cannot fill the queue (address_verify_pending_request_limit);
        # one unanswered after PROBE_TTL counts as lost.
        self._pending: dict[str, float] = {}
        self._tasks: set[asyncio.Task] = set()
        self.connections = 0
        self.last_activity = clock()

    def idle_for(self) -> float:
        """Seconds without a client or a probe being queued (0 while busy)."""
        if self.connections or self._tasks:
            return 0.0
        return self.clock() - self.last_activity

    def request(self, line: str) -> str:
        fields = line.rstrip("\n").split("\t")
        try:
            if fields[0] == "query" and len(fields) == 2 and fields[1]:
                return self._query(fields[1])
            if fields[0] == "update" and len(fields) == 4 and fields[1]:
                return self._update(fields[1], int(fields[2]), fields[3])
        except ValueError:
            pass
        except Exception as exc:   # noqa: BLE001 - a table problem: tell the client
            if self.log is not None:
                self.log.warning(f"address verification cache: {exc}")
            return "bad"
        if self.log is not None:
            self.log.warning(f'unrecognized request: "{_clean(fields[0])[:100]}", ignored')
        return "bad"

    def _room_for_probe(self) -> bool:
        if len(self._pending) < self.pending_limit:
            return True
        cutoff = self.clock() - PROBE_TTL
        for addr in [a for a, t in self._pending.items() if t < cutoff]:
            del self._pending[addr]
        return len(self._pending) < self.pending_limit

    def _query(self, address: str) -> str:
        # Postfix neuters ':' before it looks up or probes the address, so even
        # the probe goes to the changed address (the texts name it).
        address = VerifyCache.key(address)
        may = address not in self._probing and self._room_for_probe()
        status, text, probe = self.cache.query(address, may_probe=may)
        if probe:
            self._probing.add(address)
            self._pending[address] = self.clock()
            task = asyncio.get_running_loop().create_task(self._probe(address))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return f"ok\t{status}\t{_clean(text)}"

    async def _probe(self, address: str) -> None:
        try:
            await self.prober.send(address)
        except Exception as exc:   # noqa: BLE001 - the next query probes again
            if self.log is not None:
                self.log.warning(f"cannot queue address verification probe for {address}: {exc}")
        finally:
            self._probing.discard(address)

    def _update(self, address: str, status: int, text: str) -> str:
        address = VerifyCache.key(address)
        if status not in (STATUS_OK, STATUS_DEFER, STATUS_BOUNCE):
            if self.log is not None:
                self.log.warning(f"bad recipient status {status} for recipient {address}")
            return "bad"
        self.cache.update(address, status, text)
        self._pending.pop(address, None)
        return "ok"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.last_activity = self.clock()
        try:
            while True:
                try:
                    line = await reader.readuntil(b"\n")
                except asyncio.LimitOverrunError:
                    break
                except asyncio.IncompleteReadError:
                    break
                writer.write(self.request(line.decode("utf-8", "surrogateescape")).encode(
                    "utf-8", "surrogateescape") + b"\n")
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            self.connections -= 1
            self.last_activity = self.clock()
            writer.close()

    async def drain(self) -> None:
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


def open_cache(config, log=None, clock=None) -> VerifyCache:
    """The cache of address_verify_map; a map that cannot be opened falls back to
    memory with a warning (Postfix stops with a fatal error)."""
    spec = config.get("address_verify_map") or ""
    try:
        store = open_store(spec)
    except (CacheOpenError, ImportError) as exc:
        if log is not None:
            log.warning(f"{spec}: {exc}: keeping the address verification cache in memory")
        store = MemoryStore()
    kw = {"log": log}
    if clock is not None:
        kw["clock"] = clock
    return VerifyCache.from_config(config, store, **kw)


def listen(path: str) -> socket.socket:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        st = os.lstat(path)
        if stat.S_ISSOCK(st.st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    sock.listen(256)
    return sock


async def run(config, service: VerifyService, sock: socket.socket, stop: asyncio.Event,
              log=None, max_idle: float | None = None) -> None:
    """Serve until ``stop``; with ``max_idle``, also return after that long
    without a client (an on-demand child: the master forks a new one)."""
    server = await asyncio.start_unix_server(service.handle, sock=sock, limit=MAX_LINE)
    try:
        interval = config.get_time("address_verify_cache_cleanup_interval")
    except Exception:   # noqa: BLE001
        interval = 12 * 3600.0
    spec = config.get("address_verify_map") or "internal:verify"
    loop = asyncio.get_running_loop()
    # Postfix's first cleanup run starts with the service, then one per interval.
    next_cleanup = loop.time() if interval > 0 else None
    try:
        while not stop.is_set():
            waits = [1.0 if max_idle else 3600.0]
            if next_cleanup is not None:
                waits.append(max(0.0, next_cleanup - loop.time()))
            try:
                await asyncio.wait_for(stop.wait(), min(waits))
            except asyncio.TimeoutError:
                pass
            if next_cleanup is not None and loop.time() >= next_cleanup:
                kept, dropped = service.cache.cleanup()
                if log is not None:
                    log.info(f"cache {spec} full cleanup: retained={kept} dropped={dropped} entries")
                next_cleanup = loop.time() + interval
            if max_idle and service.idle_for() >= max_idle:
                break
    finally:
        server.close()
        await service.drain()


def serve(config, *, log=None, ready=None, sock: socket.socket | None = None,
          max_idle: float | None = None) -> None:
    """The verify service: call in a child of the master, already running as
    mail_owner.  Returns after SIGTERM, or, with ``sock`` (the master's listener:
    started on demand), after ``max_idle`` seconds without a client unless the
    cache lives in memory only (Postfix's verify then never leaves either)."""
    if log is None:
        from postwell.log import MailLog
        log = MailLog.from_config(config, "verify")
    path = socket_path(config)
    owned = sock is None
    if owned:
        # The socket first: after a reload, clients wait in its backlog while the
        # old process lets go of the cache file, rather than find no socket.
        sock = listen(path)
        ino = os.stat(path).st_ino
    else:
        sock.setblocking(False)
    if owned or not (config.get("address_verify_map") or "").strip():
        max_idle = None
    cache = open_cache(config, log)
    try:
        limit = max(1, config.get_int("address_verify_pending_request_limit"))
    except Exception:   # noqa: BLE001 - a bad value: Postfix's default
        limit = 5000
    target = (config.get("smtp_address_verify_target") or "rcpt").strip().lower()
    if target != "rcpt":
        log.warning(f"smtp_address_verify_target = {target} is not supported by postwell: "
                    "probes end after RCPT TO")
    service = VerifyService(cache, Prober(config, log), log, pending_limit=limit)

    async def main():
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: getattr(log, "reopen", lambda: None)())
        if ready is not None:
            ready()
        await run(config, service, sock, stop, log, max_idle=max_idle)

    try:
        asyncio.run(main())
    finally:
        if owned:
            unlink_if_ours(path, ino)
        cache.close()


__all__ = ["Prober", "VerifyService", "serve", "open_cache", "probe_sender", "IN_PROGRESS"]
