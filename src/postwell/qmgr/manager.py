"""The queue manager: moves mail incoming -> active, schedules deliveries per
(transport, nexthop), retries with backoff, expires and bounces.

The queue on disk is the only shared state, so everything here can be
rebuilt after a crash by scanning active/ and incoming/ (a message in
active/ at start-up was being delivered when we died: schedule it again;
recipients already marked done in its envelope are not delivered twice).

Time: ``clock()`` (injectable) decides retry and expiry; sleeping uses the
event loop, so tests drive the scheduler with a fake clock and direct calls.

Notices (Postfix's bounce/defer/trace services, in-process): failures and
NOTIFY=SUCCESS deliveries go to bounce/ID (fsync'd before the recipients are
marked done), and at the end of each pass become one notice each through
cleanup (postwell.dsn).  defer/ID holds this pass's deferral reasons plus one
``delay_warning=sent`` entry once the single delay warning went out; it is
reset (marker kept) each time the message becomes active.

What the agents get and may give back, beyond docs/architecture.md:
``DeliveryRequest.attributes`` also holds the envelope parameters ``ret``,
``envid``, ``smtputf8`` ("1") and ``body`` (QueuedMessage.params); each
``Recipient`` carries ``orig``, ``orcpt`` and ``notify``.  A result may set
``conn_use`` (logged as ", conn_use=N" after relay=), ``dsn_action`` (the
RFC 3464 action of a success notice, None when the next hop owns it),
``expanded`` (local(8): one result per final destination, each logged and
bounce/defer-logged on its own; the top-level status decides the queue
recipient) and ``site_failure`` (force negative concurrency feedback).

Crash exactness: a delivered recipient's done mark (and the bounce log entry
before it) is written at once: on the event loop when no fsync is needed
(see below), else on dedicated threads (``state_executor``), never queued
behind deliveries or queue moves; and a message is not scheduled again while
its previous attempt is still settling (``_in_progress``).  So a kill -9
re-delivers only what was in flight at that moment.  A message whose last
recipients are done and that owes no notice is removed right after its
marks, which are then not fsync'd (see _record_and_finish).

Cost per message (issue 8): the common life of a new message (rename to
active/, open, done marks, removal) has no fsync and runs on the event loop,
as in Postfix's single-threaded qmgr: a thread hand-off (futex wake-ups, GIL
hand-over) cost more than these system calls.  Only the last close of a
removed file, which frees its blocks and may wait for the journal, goes to a
background thread (``close_later``).  Steps that fsync still go to threads;
those of messages that start or finish in one event-loop turn share one
hand-off (``_Batcher``).

defer_transports: after routing (resolver or content filter), recipients of
a listed transport go to the retry service ("4.3.2 deferred transport"),
unless the pass is a flush: a forced deferred-queue run (postqueue -f,
sendmail -q, SIGUSR1) or a message that postqueue -i/-s put back into
incoming/ (it still has its defer log).  See _defer_transports.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import inspect
import os
import threading
import time
from collections import defaultdict, deque
from functools import partial

from postwell.delivery import agent_class
from postwell.delivery.base import DeliveryRequest, Recipient, RecipientResult
from postwell.dsn import (
    DELAY, FAILURE, SUCCESS, DsnRecipient, NoticeError, double_bounce_address, is_double_bounce,
    notify_classes, post_notice, render_notice, wants,
)
from postwell.dsn.notice import command_diagnostic
from postwell.queue import HOLD_ATTRIBUTE
from postwell.verify import MTA_PROBE, VERIFY_ATTRIBUTE
from postwell.qmgr.notices import record_deferrals, records, send_record_report, wants_trace
from postwell.queue.format import SIZE_ATTRIBUTE
from postwell.queue import format as qformat

from .concurrency import Destination, parse_feedback
from .filter import message_filter
from .expire import (ADMIN_EXPIRED_DSN, ADMIN_EXPIRED_REASON, message_expired, mode_expired,
                     path_expired)
from .logfmt import delivery_line, log_address

try:  # start-up warnings name set-but-ignored parameters; these are honoured here
    from postwell.config.registry import register_implemented as _register
except ImportError:  # pragma: no cover
    def _register(*names):
        pass
_register("initial_destination_concurrency", "default_destination_concurrency_positive_feedback",
          "default_destination_concurrency_negative_feedback",
          "default_destination_concurrency_failed_cohort_limit",
          "*_initial_destination_concurrency", "*_destination_concurrency_positive_feedback",
          "*_destination_concurrency_negative_feedback",
          "*_destination_concurrency_failed_cohort_limit")
_register("minimal_backoff_time", "maximal_backoff_time", "queue_run_delay", "maximal_queue_lifetime", "bounce_queue_lifetime", "default_destination_concurrency_limit", "default_destination_recipient_limit", "default_process_limit", "delay_logging_resolution_limit", "qmgr_message_active_limit", "double_bounce_sender", "virtual_destination_concurrency_limit", "virtual_destination_recipient_limit", "delay_warning_time", "bounce_size_limit", "notify_classes", "bounce_notice_recipient", "2bounce_notice_recipient", "delay_notice_recipient")

SAFETY_SCAN_INTERVAL = 5.0     # seconds between incoming/ scans without a wake-up
WAKE_BATCH = 0.015             # seconds: wake-ups within this window share one incoming/ scan
OPEN_MESSAGE_LIMIT = 500       # messages being delivered at once (each holds its queue file open)
STATE_THREADS = 8              # threads that only make delivery outcomes durable
# Ids with a defer/ or bounce/ log kept in memory (see QueueManager._no_logs) up to
# this many; beyond it every message asks the file system again.
LOG_ID_LIMIT = 100_000

# Envelope parameters (QueuedMessage.params) the agents read among the
# request attributes: the smtp agent sends them on (RFC 3461 4.3/4.4, RFC 6531,
# RFC 6152), local(8) keeps them on a forwarded copy.
ENVELOPE_PARAMS = ("ret", "envid", "smtputf8", "body")
# Where a recipient of a deferred transport goes (QMGR_REDIRECT in Postfix's
# qmgr): the retry service's nexthop is the DSN status and the reason.
DEFERRED_TRANSPORT_ROUTE = ("retry", "4.3.2 deferred transport")
# Agents that reach a next hop over the network: only their deliveries give
# negative concurrency feedback (a destination where no server answered).
NETWORK_COMMANDS = frozenset({"smtp", "relay", "lmtp"})

_state_lock = threading.Lock()
_state_pool: concurrent.futures.ThreadPoolExecutor | None = None
_state_pid = 0


def state_executor() -> concurrent.futures.ThreadPoolExecutor:
    """Threads for done marks and bounce/defer log appends only.

    They must never wait behind deliveries (mailbox writes, pipe commands) or
    queue moves in the shared executor: the time between an agent's "sent" and
    the fsync'd done mark is the window in which a crash re-delivers the
    message, and a backlog must not stretch it to seconds.  One per process
    (a forked child makes its own)."""
    global _state_pool, _state_pid
    with _state_lock:
        if _state_pool is None or _state_pid != os.getpid():
            _state_pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=STATE_THREADS, thread_name_prefix="qmgr-state")
            _state_pid = os.getpid()
        return _state_pool


def _rcpt_fields(r) -> Recipient:
    if isinstance(r, str):
        return Recipient(r)
    return Recipient(getattr(r, "address", ""), getattr(r, "orig", None) or None,
                     getattr(r, "orcpt", None) or None, getattr(r, "notify", None) or None)


def _rcpt_done(r) -> bool:
    if isinstance(r, str):
        return False
    if hasattr(r, "done"):
        return bool(r.done)
    return getattr(r, "status", "-") in ("D", b"D", "done")


# Where the qmgr sends a recipient the address resolver flags as malformed.
_BAD_SYNTAX = ("error", "5.1.3 bad address syntax")


class FallbackResolver:
    """Used only while postwell.policy.AddressResolver is missing: virtual
    mailbox domains go to $virtual_transport, the rest is deferred."""

    def __init__(self, config):
        self.config = config
        self.domains = {d.lower() for d in config.get_list("virtual_mailbox_domains")
                        if ":" not in d}

    def resolve(self, address: str):
        from types import SimpleNamespace
        domain = address.rsplit("@", 1)[-1].lower() if "@" in address else ""
        if domain in self.domains:
            return SimpleNamespace(address_class="virtual", transport=self.config.get("virtual_transport"),
                                   nexthop=domain, recipient=address)
        return SimpleNamespace(address_class="default", transport="retry",
                               nexthop="4.3.0 mail transport unavailable", recipient=address)


def make_resolver(config):
    try:
        from postwell.policy import AddressResolver
    except ImportError:
        return FallbackResolver(config)
    return AddressResolver(config)


async def _let_the_waiter_go() -> None:
    """Issue 8: one loop turn so that the delivery request of whoever just got the
    destination's slot leaves before this delivery's bookkeeping (done marks,
    removal, log lines: 0.25-0.4 ms), which otherwise sat between one delivery's
    end and the next one's start.  A stop in this one turn must not drop the
    results of a delivery that took place (it would be made again after the
    restart): the caller settles them as without the yield."""
    try:
        await asyncio.sleep(0)
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()


class QueueManager:
    def __init__(self, config, store, *, log=None, clock=time.time, resolver=None,
                 agents: dict | None = None, bounce_log=None, agent_logs=None):
        self.config = config
        self.store = store
        self.clock = clock
        self.log = log or _null_log()
        self.bounce_log = bounce_log or self.log
        self.agent_logs = agent_logs            # callable(name) -> MailLog, or None
        self.resolver = resolver or make_resolver(config)
        self.queue_directory = config.get("queue_directory")
        self._agents: dict[str, object] = dict(agents or {})
        # (transport, destination) -> concurrency window; a destination is the
        # next hop, or the recipient when the transport's recipient limit is 1.
        self._destinations: dict[tuple[str, str], Destination] = {}
        # Messages queued for a batching agent's destination (_deliver_batched).
        self._batch_queues: dict = {}
        self._transport_settings: dict[str, dict] = {}
        self._process_sems: dict[str, asyncio.Semaphore | None] = {}
        self._in_progress: set[str] = set()
        self._open_sem = asyncio.Semaphore(OPEN_MESSAGE_LIMIT)
        self._sender_aware: dict[int, tuple[object, bool]] = {}
        self._probe_resolver = None     # see _resolver_for_probes
        self._tasks: set[asyncio.Task] = set()
        self._wake = asyncio.Event()
        self._stopping = False
        self.min_backoff = config.get_time("minimal_backoff_time")
        self.max_backoff = config.get_time("maximal_backoff_time")
        self.run_delay = config.get_time("queue_run_delay")
        self.lifetime = config.get_time("maximal_queue_lifetime", "d")
        self.bounce_lifetime = config.get_time("bounce_queue_lifetime", "d")
        self.active_limit = max(1, config.get_int("qmgr_message_active_limit") or 20000)
        self.max_decimals = config.get_int("delay_logging_resolution_limit")
        self.delay_warning = config.get_time("delay_warning_time", "h")
        self._cleanup = None
        self._double_bounce = double_bounce_address(config).lower()
        self.myhostname = config.get("myhostname") or "localhost"
        # defer_transports: master.cf service names whose mail waits for a
        # flush (postconf(5)); empty (the default) costs nothing per message.
        self.defer_transports = frozenset(config.get_list("defer_transports"))
        self.allow_min_user = config.get_bool("allow_min_user")
        # Ids that may have a defer/ or bounce/ log (issue 8): read at start-up by
        # run() and grown by every log this qmgr writes (nothing else creates
        # one; a new message's leftover logs are removed by create()), so a
        # message outside it is finished without looking for logs: no failing
        # open of bounce/ID and no failing unlinks.  None: unknown, always look.
        self._log_ids: set[str] | None = None
        # run()'s stop event: a fatal error ends the daemon (_transport_watchdog).
        # Driven without run() (tests), the qmgr stays and acts as its successor.
        self._fatal_stop: asyncio.Event | None = None
        self.fatal = False          # ended by a fatal error: the daemon exits 1

    # ---------------------------------------------------------------- agents
    def _service_for(self, transport: str):
        services = getattr(self.config, "services", None) or []
        # Asked several times per message; keyed on the list itself so a
        # caller that swaps the service list is never answered from stale data.
        cache = self.__dict__.get("_service_cache")
        if cache is None or cache[0] is not services or cache[1] != len(services):
            cache = self.__dict__["_service_cache"] = (services, len(services), {})
        if transport in cache[2]:
            return cache[2][transport]
        found = None
        for svc in services:
            if svc.name == transport and svc.type == "unix":
                found = svc
                break
        cache[2][transport] = found
        return found

    def agent(self, transport: str):
        if transport in self._agents:
            return self._agents[transport]
        svc = self._service_for(transport)
        command = svc.command if svc else transport
        if command == "error" and svc is not None and svc.name == "retry":
            # error(8) started as the "retry" service defers instead of
            # bouncing (Postfix's error.c checks its service name).
            cls = agent_class("retry")
        else:
            cls = agent_class(command)
        agent = None
        if cls is not None:
            cfg = self.config
            if svc is not None:
                # -o overrides, $service_name and $process_name, as the daemon would see them
                for_service = getattr(self.config, "for_service", None)
                cfg = for_service(svc) if for_service else \
                    (self.config.override(svc.overrides) if svc.overrides else self.config)
            log = self._transport_log(transport)
            try:
                agent = cls(cfg, log=log, clock=self.clock)
            except Exception as exc:
                (self.agent_logs(command) if self.agent_logs else self.log).fatal(str(exc))
                agent = None
        self._agents[transport] = agent
        return agent

    def _transport_log(self, transport: str):
        """The log of a transport's delivery agent, tagged as Postfix tags it:
        $syslog_name/<command> (postfix/smtp for the "relay" service), with the
        service's own -o syslog_name when it has one (postfix/relay/smtp)."""
        if not self.agent_logs:
            return self.log
        cache = self.__dict__.setdefault("_log_cache", {})
        got = cache.get(transport)
        if got is not None:
            return got
        svc = self._service_for(transport)
        name = svc.command if svc else transport
        syslog_name = None
        if svc is not None and "syslog_name" in (svc.overrides or {}):
            try:
                syslog_name = self.config.for_service(svc).get("syslog_name")
            except Exception:
                syslog_name = None
            if syslog_name == self.config.get("syslog_name"):
                syslog_name = None
        got = None
        if syslog_name:
            try:
                got = self.agent_logs(name, syslog_name=syslog_name)
            except TypeError:       # a name-only factory (tests)
                got = None
        if got is None:
            got = self.agent_logs(name)
        cache[transport] = got
        return got

    def _service_name(self, transport: str) -> str:
        svc = self._service_for(transport)
        return svc.name if svc else transport

    def _limit(self, transport: str, what: str) -> int:
        # Asked for every message: the configuration is fixed for this
        # process's life (a reload starts a new qmgr), so look it up once.
        cache = self.__dict__.setdefault("_limit_cache", {})
        got = cache.get((transport, what))
        if got is None:
            got = cache[(transport, what)] = self._lookup_limit(transport, what)
        return got

    def _lookup_limit(self, transport: str, what: str) -> int:
        for name in (f"{transport}_destination_{what}_limit", f"default_destination_{what}_limit"):
            if self.config.raw(name) is not None:
                try:
                    return max(1, self.config.get_int(name))
                except ValueError:
                    continue
        return 20 if what == "concurrency" else 50

    def _param(self, transport: str, name: str, default_name: str) -> str | None:
        """``transport_name`` when set or known, else ``default_name`` (Postfix's
        per-transport overrides of the scheduler parameters)."""
        for n in (f"{transport}_{name}", default_name):
            value = self.config.raw(n)
            if value is not None:
                return self.config.get(n)
        return None

    def _settings(self, transport: str) -> dict:
        got = self._transport_settings.get(transport)
        if got is not None:
            return got

        def number(name, default_name, fallback):
            try:
                return int((self._param(transport, name, default_name) or "").strip())
            except ValueError:
                return fallback

        def feedback(kind):
            text = self._param(transport, f"destination_concurrency_{kind}_feedback",
                               f"default_destination_concurrency_{kind}_feedback")
            try:
                return parse_feedback(text or "1")
            except ValueError as exc:
                self.log.warning(f"{transport}: {exc}; using 1")
                return (1.0, False)
        got = {
            "initial": number("initial_destination_concurrency", "initial_destination_concurrency", 5),
            "limit": number("destination_concurrency_limit",
                            "default_destination_concurrency_limit", 20),
            "cohorts": number("destination_concurrency_failed_cohort_limit",
                              "default_destination_concurrency_failed_cohort_limit", 1),
            "positive": feedback("positive"),
            "negative": feedback("negative"),
            "per_recipient": self._limit(transport, "recipient") == 1,
        }
        self._transport_settings[transport] = got
        return got

    def _destination(self, transport: str, nexthop: str, rcpts) -> tuple[tuple[str, str], Destination]:
        st = self._settings(transport)
        # postconf(5): "With a per-destination recipient limit > 1, a destination
        # is a domain, otherwise it is a recipient."
        name = rcpts[0].address if st["per_recipient"] and rcpts else nexthop
        key = (transport, name.lower())
        dest = self._destinations.get(key)
        if dest is None:
            dest = self._destinations[key] = Destination(
                initial=st["initial"], limit=st["limit"], positive=st["positive"],
                negative=st["negative"], cohort_limit=st["cohorts"])
        return key, dest

    def _forget_destination(self, key, dest: Destination) -> None:
        # Like Postfix's in-core queues, a destination lives while it has work
        # (or is dead): the table stays as small as the active queue.  Messages
        # queued for a batch are work too: the next of them to wait for a slot
        # must find the same window (see _deliver_batched).
        if dest.idle and dest.dead is None and self._destinations.get(key) is dest:
            bq = self._batch_queues.get(key)
            if bq is not None and bq.pending:
                return
            del self._destinations[key]

    def dead_destinations(self) -> dict[tuple[str, str], tuple[float, str, str]]:
        return {k: d.dead for k, d in self._destinations.items() if d.dead is not None}

    def _expire_dead(self, now: float) -> None:
        """Dead destinations whose backoff is over and that nobody waits for
        are dropped (Postfix's unthrottle timer), so the table cannot grow
        with destinations whose mail went away meanwhile."""
        for key, dest in list(self._destinations.items()):
            if dest.dead is not None and now >= dest.dead[0] and dest.idle:
                dest.resume()
                self._forget_destination(key, dest)

    def _resume_dead(self) -> None:
        """QMGR_REQ_FLUSH_DEAD: every dead destination gets another chance now."""
        for key, dest in list(self._destinations.items()):
            if dest.dead is not None:
                dest.resume()
                self._forget_destination(key, dest)

    def _process_sem(self, transport: str) -> asyncio.Semaphore | None:
        """master.cf maxproc of the transport's service ($default_process_limit
        when "-", no limit when 0): deliveries at once over that transport."""
        if transport in self._process_sems:
            return self._process_sems[transport]
        svc = self._service_for(transport)
        try:
            limit = svc.process_limit(self.config) if svc else self.config.get_int("default_process_limit")
        except Exception:
            limit = 100
        sem = asyncio.Semaphore(limit) if limit > 0 else None
        self._process_sems[transport] = sem
        return sem

    def _command(self, transport: str) -> str:
        svc = self._service_for(transport)
        return svc.command if svc else transport

    def _resolve(self, address: str, sender: str, probe: bool = False):
        resolver = self._resolver_for_probes() if probe else self.resolver
        got = self._sender_aware.get(id(resolver))
        if got is None or got[0] is not resolver:
            got = self._sender_aware[id(resolver)] = (resolver, _takes_sender(resolver))
        if got[1]:
            # sender_dependent_relayhost_maps and the like need the sender.
            return resolver.resolve(address, sender=sender)
        return resolver.resolve(address)

    def _resolver_for_probes(self):
        """Postfix's qmgr resolves verify(8) probes in trivial-rewrite's verify
        context: address_verify_relayhost, _transport_maps, _default_transport,
        _local_transport, _virtual_transport, _relay_transport and
        _sender_dependent_relayhost_maps in place of the usual parameters.
        With none of them set apart, that is the mail resolver itself."""
        if self._probe_resolver is None:
            from postwell.verify.probe import probe_routing
            try:
                overrides = probe_routing(self.config)
            except Exception as exc:   # noqa: BLE001 - a config without them routes as mail
                self.log.warning(f"address verification routing: {exc}")
                overrides = {}
            self._probe_resolver = make_resolver(self.config.override(overrides)) \
                if overrides else False
        return self._probe_resolver or self.resolver

    # ------------------------------------------------------------ queue ops
    def _path(self, queue_name: str, qid: str) -> str:
        return self.store.path(queue_name, qid)

    def _batched(self, executor_factory) -> "_Batcher":
        """The batcher for one executor (None: the loop's default one)."""
        batchers = self.__dict__.setdefault("_batchers", {})
        b = batchers.get(executor_factory)
        if b is None or b.loop is not asyncio.get_running_loop():
            b = batchers[executor_factory] = _Batcher(
                asyncio.get_running_loop(),
                executor_factory() if executor_factory is not None else None)
        return b

    async def _blocking(self, fn, *args):
        """fsync-heavy queue operations run off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    def wake(self) -> None:
        self._wake.set()

    def scan_incoming(self) -> list[str]:
        """Claim every complete message in incoming/; each moves to active/ when it starts."""
        return self._claim("incoming", None)

    def recover_active(self) -> list[str]:
        """At start-up: every message left in active/ is scheduled again."""
        return self._claim("active", lambda qid: True)

    def scan_deferred(self, force: bool = False) -> list[str]:
        """Claim deferred messages whose retry time (the file's mtime) has come;
        ``force`` (postqueue -f, postfix flush) takes them all."""
        now = self.clock()
        self._expire_dead(now)

        def due(qid):
            if force:
                return True
            try:
                if self.store.next_attempt(qid) <= now:
                    return True
            except OSError:
                return False
            # postsuper -e on a message that was being delivered: it went back
            # to deferred/ with a retry time, but it is to be returned now.
            return path_expired(self.store.path("deferred", qid))
        # A flush (postqueue -f, sendmail -q) also overrides defer_transports
        # for the messages it brings back (Postfix's QMGR_FLUSH_DFXP).
        return self._claim("deferred", due, flush=force)

    def _claim(self, queue_name: str, want, flush: bool = False) -> list[str]:
        started = []
        if len(self._in_progress) >= self.active_limit:
            return started
        # Messages in progress are left out before the scan's stat().
        for qid in self.store.scan(queue_name, skip=self._in_progress):
            if len(self._in_progress) >= self.active_limit:
                break
            if qid in self._in_progress or (want is not None and not want(qid)):
                continue
            started.append(qid)
            self._start(qid, queue_name, flush)
        return started

    def _start(self, qid: str, queue_name: str = "active", flush: bool = False) -> None:
        self._in_progress.add(qid)
        task = asyncio.get_running_loop().create_task(self._run_message(qid, queue_name, flush))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self) -> None:
        """Wait until every started message is finished (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def _run_message(self, qid: str, queue_name: str = "active", flush: bool = False) -> None:
        try:
            # Bounded number of open queue files (fds) however long the queue is.
            async with self._open_sem:
                # One hand-off to the I/O threads: move, open, defer log reset.
                if queue_name == "deferred":
                    # Each move out of deferred/ fsyncs directories: in parallel,
                    # so the file system groups them (a deferred-queue run).
                    got = await self._blocking(self._activate, qid, queue_name)
                elif queue_name == "incoming":
                    # New mail (issue 8): a rename without fsync and a read of a
                    # file still in the page cache, done right here as Postfix's
                    # single-threaded qmgr does.  A thread hand-off cost more CPU
                    # (futex and GIL ping-pong) than the file operations.
                    got = self._activate(qid, queue_name, inline=True)
                    if got is _HOLD:
                        await self._blocking(self._hold_active, qid)
                        return
                else:
                    got = await self._batched(None).submit(self._activate, qid, queue_name)
                if got is None:
                    return   # gone meanwhile (postsuper -d, another run)
                qm, warned, had_defer_log = got
                if isinstance(qm, BaseException):
                    self._corrupt(qid, qm)
                    return
                try:
                    if not flush and queue_name == "incoming" and had_defer_log:
                        # postqueue -i/-s (Postfix's flush(8)) hand a deferred
                        # message back through incoming/ with its defer log
                        # (new mail has none, postsuper -r drops it): that is
                        # a flush too (for defer_transports).
                        flush = True
                    await self._process(qid, qm, self.clock(), warned, flush=flush)
                finally:
                    # The last close of a removed file frees its blocks (ext4:
                    # truncate and orphan list, often a wait for the journal):
                    # a background thread does it, so the event loop never
                    # waits for it and no result comes back.
                    close_later(qm)
        except Exception as exc:
            # Never lose mail: the file stays queued and is retried later.
            self.log.warning(f"{qid}: delivery failed unexpectedly: {exc!r}")
            try:
                if os.path.exists(self._path("active", qid)):
                    self._defer_file(qid, self.clock() + self.min_backoff)
            except Exception:
                pass
        finally:
            self._in_progress.discard(qid)

    def _activate(self, qid: str, queue_name: str, inline: bool = False):
        """Blocking start of a pass: (queue file, delay-warning-sent), the
        open error in place of the file, or None when the file is gone.
        ``inline`` (on the event loop): a message to hold is not moved here
        (that move fsyncs directories) but reported as _HOLD."""
        if queue_name != "active":
            try:
                # incoming -> active needs no directory fsync: start-up scans
                # both, so a rename lost in a crash only means one more pass.
                self.store.move(qid, queue_name, "active", sync=(queue_name != "incoming"))
            except FileNotFoundError:
                return None
        try:
            qm = self.store.open(qid, "active")
        except Exception as exc:
            return exc, False, False
        if queue_name == "incoming" and qm.attributes.get(HOLD_ATTRIBUTE) == "1":
            # Cleanup put it on hold, but this scan (woken by another message) came
            # before cleanup's own move to hold/: hold it here, never deliver it.
            qm.close()
            if inline:
                return _HOLD
            self._hold_active(qid)
            return None
        try:
            # Postfix's qmgr_message_alloc() resets the defer log of every message
            # it activates, from incoming/ too: postqueue -i/-s hand a deferred
            # message back there with its log.  New mail has none (known without
            # a look while _log_ids holds).
            if queue_name == "incoming" and self._no_logs(qid):
                return qm, False, False
            st = getattr(qm, "stat", None)
            if queue_name == "incoming" and st is not None and mode_expired(st.st_mode):
                # postsuper -e: the return names each recipient's last deferral
                # reason (side by side with Postfix 3.7), so that log stays.
                return qm, False, False
            had, warned = self._reset_defer_log_state(qid)
        except BaseException:
            qm.close()
            raise
        return qm, warned, had

    def _hold_active(self, qid: str) -> None:
        try:
            self.store.move(qid, "active", "hold")
        except FileNotFoundError:
            pass

    # ------------------------------------------------------------ delivery
    async def process(self, qid: str) -> None:
        active_time = self.clock()
        try:
            qm = self.store.open(qid, "active")
        except Exception as exc:
            self._corrupt(qid, exc)
            return
        try:
            await self._process(qid, qm, active_time)
        finally:
            qm.close()

    def _corrupt(self, qid, exc) -> None:
        from postwell.queue import CorruptQueueFile, QueueFileNotFound
        if isinstance(exc, QueueFileNotFound):
            return  # removed meanwhile (postsuper -d)
        if isinstance(exc, CorruptQueueFile):
            # Postfix moves unreadable files aside rather than retrying forever.
            self.log.warning(f"{qid}: {exc}: moving to corrupt queue")
            try:
                self.store.move(qid, "active", "corrupt")
            except OSError:
                pass
            return
        raise exc

    async def _process(self, qid, qm, active_time, warned=None, flush=False) -> None:
        sender = qm.sender or ""
        all_rcpts = list(qm.recipients)
        arrival = float(getattr(qm, "arrival_time", active_time))
        # Postfix's size (its queue file's content records), stored by cleanup as the
        # postwell_size attribute; a file written without it shows the content length.
        size = (getattr(qm, "attributes", None) or {}).get(SIZE_ATTRIBUTE) or getattr(qm, "content_size", 0)
        # Postfix's qmgr line, logged each time a message enters the active queue.
        self.log.info(f"{qid}: from=<{log_address(sender)}>, size={size}, nrcpt={len(all_rcpts)} (queue active)")
        pending = [r for r in all_rcpts if not _rcpt_done(r)]
        # Just opened by _activate: the open's fstat is fresh enough for the
        # postsuper -e mark (it is looked at again after a deferral).
        st = getattr(qm, "stat", None) if warned is not None else None
        if mode_expired(st.st_mode) if st is not None else message_expired(qm):
            await self._force_expire(qid, qm, sender, arrival, active_time, pending)
            return

        groups: dict[tuple[str, str], list[tuple[object, Recipient]]] = defaultdict(list)
        early: list[tuple[object, RecipientResult]] = []
        attrs = getattr(qm, "attributes", None)
        probe = attrs.get(VERIFY_ATTRIBUTE) if attrs else None
        # verify(8)'s probes (not sendmail -bv's) take the address_verify_* routes.
        mta_probe = probe == MTA_PROBE
        # A content filter overrides the address resolver for every recipient,
        # except for probes of either kind (qmgr_message_resolve(): a trace-only
        # request bypasses the filter, as sendmail -bv's would otherwise reach it).
        route = None if probe else message_filter(attrs, self.myhostname)
        for r in pending:
            rc = _rcpt_fields(r)
            if route is not None:
                rc.nexthop_recipient = rc.address
                # qmgr_message_resolve(): the '-' rule holds with a content filter too
                groups[_BAD_SYNTAX if rc.address.startswith("-") and not self.allow_min_user
                       else route].append((r, rc))
                continue
            try:
                res = self._resolve(rc.address, sender, mta_probe)
            except Exception as exc:
                early.append((r, RecipientResult.deferred(rc, f"address resolver failure: {exc}",
                                                          "none", "4.3.0")))
                continue
            if getattr(res, "failed", False):
                # trivial-rewrite could not decide (e.g. a table lookup failed): try later.
                early.append((r, RecipientResult.deferred(rc, "address resolver failure",
                                                          "none", "4.3.0")))
                continue
            resolved = getattr(res, "recipient", None) or rc.address
            if resolved != rc.address:
                # qmgr_message_resolve()'s RECIPIENT_UPDATE: the resolved address (user%dom
                # undone, local domain stripped) is what is delivered, logged (to=, with
                # the queued address as orig_to=) and bounced, even to error(8).
                rc.orig = rc.orig or rc.address
                rc.address = resolved
            rc.nexthop_recipient = resolved
            if getattr(res, "error", False):
                # qmgr_resolve_one(): trivial-rewrite's error flag (a malformed domain,
                # a recipient starting with '-' under allow_min_user = no) -> error(8)
                groups[_BAD_SYNTAX].append((r, rc))
                continue
            groups[(res.transport, res.nexthop or "")].append((r, rc))
        if route is None and len(pending) > 1:
            # Postfix's qmgr_message_sort() after resolving: each delivery batch
            # (and so the bounce and trace logs, and the notices) in this order.
            # A content filter's batch stays in envelope order: the smtp/lmtp
            # client sorts its RCPT commands itself.
            for items in groups.values():
                if len(items) > 1:
                    items.sort(key=_item_sort_key)
        if self.defer_transports:
            groups = self._defer_transports(groups, flush)
        if getattr(qm, "attributes", None) and qm.attributes.get(VERIFY_ATTRIBUTE):
            # verify(8) probe: the agents only report; never a bounce or a retry.
            from postwell.verify.probe import run_probe
            await run_probe(self, qid, qm, sender, arrival, active_time, groups, early,
                            dict(qm.attributes))
            return
        # Transports whose daemon dies at start-up (see _hold_for_transport).
        stuck = {key[0] for key in groups if self._broken_transport(key[0])} if groups else ()
        if stuck:
            groups = {key: items for key, items in groups.items() if key[0] not in stuck}

        deferred: list[tuple[object, RecipientResult]] = []
        if warned is None:
            warned = await self._blocking(self._reset_defer_log, qid)
        # The agents read the DSN/SMTPUTF8/BODY envelope parameters among the attributes.
        attributes = dict(getattr(qm, "attributes", {}) or {})
        for k, v in (getattr(qm, "params", None) or {}).items():
            if k in ENVELOPE_PARAMS and v not in (None, ""):
                attributes[k] = v

        # A message whose recipients all go in one delivery (the common case)
        # is settled and, when nothing is left, removed in one hand-off.
        fused: list = []

        async def settle(pairs, handoff_default, service, last=False):
            # Durable first: bounce log entries (fsync'd) and done marks go out
            # in one batch on the state threads before anything else, so that a
            # crash re-delivers as little as possible and never loses a notice.
            # Then the log lines.
            done, bounce_entries, defer_entries, lines = [], [], [], []
            for r, handoff, res in pairs:
                # local(8) reports each final destination of an expanded
                # recipient (alias, .forward) as a part; the top-level status
                # decides the queue recipient's fate.
                parts = getattr(res, "expanded", None) or [res]
                for part in parts:
                    # A part with logged = False (local's "alias expanded" report for
                    # NOTIFY=SUCCESS) is recorded for the notices but gets no log line,
                    # as Postfix's trace_append().
                    if getattr(part, "logged", True):
                        lines.append((part, handoff or handoff_default))
                    # A recipient the qmgr resolved to another address is logged
                    # under that address, the queued one as its original: Postfix
                    # lists it so in defer/ID (postqueue -p, delay notices) too.
                    who = _final_identity(r, part) if part is res else _part_recipient(part)
                    if part.status == "deferred":
                        defer_entries.append((who, part))
                        continue
                    if part.status == "sent":
                        action = _success_action(part)
                        # sendmail -v reports every delivery (qmgr/notices.py)
                        if records(qm) or (action and wants(getattr(r, "notify", None), "SUCCESS")):
                            bounce_entries.append((r, who, part, action or "delivered",
                                                   f"delivery via {part.relay}: {part.reason}"))
                    else:
                        bounce_entries.append((r, who, part, "failed", part.reason))
                if res.status == "deferred":
                    deferred.append((r, res))
                else:
                    done.append(r)
            if last and not deferred and self._finish_now(qid, qm, done, bounce_entries,
                                                          defer_entries):
                fused.append(None)
            elif last and not deferred:
                fused.append(await self._batched(state_executor).submit(
                    self._record_and_finish, qid, qm, done, bounce_entries, defer_entries))
            else:
                await self._durable(self._record, qid, qm, done, bounce_entries, defer_entries)
            for part, handoff in lines:
                self._log_result(qid, part, arrival, active_time, handoff, service)

        if early:
            await settle([(r, active_time, res) for r, res in early], active_time, "qmgr")

        async def run_group(transport, nexthop, items, alone=False):
            limit = self._limit(transport, "recipient")
            for i in range(0, len(items), limit):
                chunk = items[i:i + limit]
                results = await self._deliver_chunk(qid, qm, sender, arrival, active_time,
                                                    transport, nexthop, chunk, attributes)
                # Fused only when no other delivery of this message can still
                # be writing done marks through the open queue file.
                await settle([(r, handoff, res) for (r, _), (handoff, res) in zip(chunk, results)],
                             active_time, transport, last=alone and i + limit >= len(items))

        if len(groups) == 1:
            (t, n), items = next(iter(groups.items()))
            await run_group(t, n, items, alone=not early and not stuck)
        elif groups:
            await asyncio.gather(*(run_group(t, n, items) for (t, n), items in groups.items()))

        if stuck:
            # Recipients of a transport whose daemon dies at start-up: Postfix's
            # qmgr waits for it with the message in the active queue (no log
            # line, no retry, no expiry) until the connect watchdog fires.
            self._hold_for_transport(qid, stuck)
            return
        # Postfix's qmgr_active_done(): expiry is judged after the attempt, on
        # the message's age now; the remaining recipients are returned with
        # the reason (and 4.x status) of this last deferral.
        lifetime = self.bounce_lifetime if sender == "" else self.lifetime
        # postsuper -e while this attempt was running: return what is left now.
        forced = bool(deferred) and message_expired(qm)
        if deferred and (forced or self.clock() - arrival >= lifetime):
            status = "force-expired" if forced else "expired"
            self.log.info(f"{qid}: from=<{log_address(sender)}>, status={status}, returned to sender")
            await self._durable(self._record, qid, qm, [r for r, _ in deferred],
                                [(r, _final_identity(r, res), res, "failed", res.reason)
                                 for r, res in deferred], [])
            deferred = []
        self._note_no_trace(qid, sender, pending)
        entries = None
        if fused and fused[0] is not _NOT_FINISHED:
            entries = fused[0]
            if entries is None:
                self.log.info(f"{qid}: removed")
                return
        elif not deferred:
            # The common end: one hand-off reads bounce/ID and, when it is
            # empty, removes the message.
            entries = await self._blocking(self._finish, qid, qm)
            if entries is None:
                self.log.info(f"{qid}: removed")
                return
        if deferred and records(qm):
            # sendmail -v: the first pass's deferrals join its report (qmgr/notices.py)
            await record_deferrals(self, qid, deferred)
        try:
            await self._send_notices(qid, qm, sender, arrival, entries)
            notices_pending = False
        except NoticeError:
            # bounce/ID stays; the message waits in deferred/ until the notice
            # can be queued (Postfix: a failed bounce defers the message).
            notices_pending = True
        if deferred or notices_pending:
            if (deferred and self.delay_warning > 0 and not warned
                    and self.clock() >= arrival + self.delay_warning):
                deferred.sort(key=lambda p: getattr(p[0], "index", 0))
                await self._send_delay_warning(qid, qm, sender, arrival, deferred)
            await self._blocking(self._defer_file, qid, self.clock() + self._backoff(arrival))
        else:
            # Every recipient is durably marked done: a crash can only bring
            # the file back to be removed again, so no directory fsync.
            await self._blocking(partial(self.store.remove, qid, sync=False))
            if self._log_ids is not None:
                self._log_ids.discard(qid)      # its logs went with it
            self.log.info(f"{qid}: removed")

    def _broken_transport(self, transport: str) -> bool:
        """True when the transport's master.cf service cannot start its daemon
        (a malformed -o and the like: master.daemon runs it as a child that
        logs the fatal line and exits 1, and the master throttles it)."""
        cache = self.__dict__.setdefault("_broken_cache", {})
        got = cache.get(transport)
        if got is None:
            svc = None if transport in self._agents else self._service_for(transport)
            got = False
            if svc is not None and getattr(svc, "argv", None):
                from postwell.config.master import daemon_startup_error
                try:
                    got = daemon_startup_error(svc) is not None
                except Exception:       # noqa: BLE001 - judged by the master, not here
                    got = False
            if svc is not None and not got:
                # A master.cf service whose command is no delivery agent (a typo, a
                # daemon that is not installed): Postfix's master fails to exec it
                # and throttles it, so its qmgr waits as for a daemon dying of its
                # -o (side by side with 3.7).  A transport without any master.cf
                # service is another case: "mail transport unavailable" at once.
                got = agent_class("retry" if svc.command == "error" and svc.name == "retry"
                                  else svc.command) is None
            cache[transport] = got
        return got

    def _hold_for_transport(self, qid: str, transports) -> None:
        """Postfix's qmgr connects to the transport's socket; the master's
        throttled listener never answers, so the message stays in the active
        queue, and after $daemon_timeout qmgr_transport_abort() ends the qmgr
        ("fatal: timeout connecting to transport: NAME"); the restarted qmgr
        picks the active queue up again.  Here: the message stays in active/
        untouched and the watchdog logs that line; the daemon (run()) then
        ends with exit status 1 once its deliveries in flight are done, and
        the master starts the next qmgr when it is triggered (master/daemon.py
        _qmgr_wait_for_trigger).  Driven without run(), this qmgr starts the
        held messages again itself, as the restarted one would."""
        if self.fatal or self._stopping:
            return          # ending: the next qmgr takes the message up
        held = self.__dict__.setdefault("_held", {})
        loop = asyncio.get_running_loop()
        for transport in transports:
            entry = held.get(transport)
            if entry is None:
                try:
                    timeout = self.config.get_time("daemon_timeout")
                except Exception:       # noqa: BLE001
                    timeout = 18000.0
                entry = held[transport] = (set(), loop.call_later(
                    max(timeout, 0.0), self._transport_watchdog, transport))
            entry[0].add(qid)

    def _transport_watchdog(self, transport: str) -> None:
        qids, _ = self.__dict__.get("_held", {}).pop(transport, (set(), None))
        if self.fatal:
            return
        self.log.fatal(f"timeout connecting to transport: {transport}")
        if self._stopping:
            return
        if self._fatal_stop is not None:
            # The daemon (run()) ends as Postfix's qmgr does: exit status 1, and the
            # master starts a new qmgr later, which takes active/ up again.  Our
            # agents run in this process, so what is in flight finishes first (its
            # done marks durable): nothing is delivered twice because of the exit.
            self.fatal = True
            self._stopping = True
            for _, timer in self.__dict__.pop("_held", {}).values():
                timer.cancel()       # one fatal line per qmgr, as Postfix's
            self._fatal_stop.set()
            return
        # A restart re-reads the configuration: a master.cf fixed meanwhile counts.
        self.__dict__.pop("_broken_cache", None)
        for qid in sorted(qids):
            if qid not in self._in_progress and os.path.exists(self._path("active", qid)):
                self._start(qid, "active")

    def _note_no_trace(self, qid, sender, rcpts) -> None:
        """Postfix's qmgr asks bounce(8) for a trace/success notice after each
        pass over a message with a NOTIFY=SUCCESS recipient; for mail from the
        null or the double-bounce sender bounce(8) logs that it sends none
        (RFC 3461 6.2: no notice about a notice), found trace entries or not."""
        if sender and sender.lower() != self._double_bounce:
            return
        if not any(wants(getattr(r, "notify", None), "SUCCESS") for r in rcpts
                   if getattr(r, "notify", None)):
            return
        kind = "single" if sender == "" else "double"
        self.bounce_log.info(f"{qid}: not sending trace/success notification "
                             f"for {kind}-bounce message")

    def _defer_transports(self, groups, flush):
        """Postfix's qmgr_message_resolve(): unless this pass is a flush, the
        recipients of a transport in defer_transports (also a content
        filter's) are redirected to the retry service with "4.3.2 deferred
        transport", so they are logged (relay=none, status=deferred) and
        retried like any other deferral.  ``flush``: a bool, or a callable
        asked once, only when some recipient's transport is deferred."""
        hit = [key for key in groups if key[0] in self.defer_transports]
        if not hit:
            return groups
        if callable(flush):
            try:
                flush = flush()
            except Exception:
                flush = False
        if flush:
            return groups
        out = defaultdict(list)
        for key, items in groups.items():
            if key[0] in self.defer_transports:
                out[DEFERRED_TRANSPORT_ROUTE].extend(items)
            else:
                out[key].extend(items)
        return out

    async def _force_expire(self, qid, qm, sender, arrival, active_time, pending) -> None:
        """postsuper -e/-f (see qmgr/expire.py): no delivery; every pending
        recipient is returned with the reason of its last deferral, or
        "message is administratively expired" (4.7.0, logged as a deferral
        by the error agent) when it has none, as Postfix 3.5+ does."""
        entries = await self._blocking(self.store.read_defer_log, qid)
        last = {}
        for e in entries:
            if e.get("delay_warning") or "recipient" not in e:
                continue
            last[(e.get("recipient", ""), e.get("orig_rcpt", ""))] = e
            last.setdefault((e.get("recipient", ""), None), e)
        expired = []
        route = message_filter(getattr(qm, "attributes", None), self.myhostname)
        for r in pending:
            rc = _rcpt_fields(r)
            queued = (rc.address, rc.orig or "")
            if route is None:
                # defer/ID names the address the resolver gave (see _process).
                self._as_resolved(rc, sender)
            # A log written before that rule named the queued address.
            e = last.get((rc.address, rc.orig or "")) or last.get((rc.address, None)) \
                or last.get(queued) or last.get((queued[0], None))
            if e is not None:
                res = RecipientResult.deferred(rc, e.get("reason", ""), "none",
                                               e.get("status") or "4.0.0")
                if e.get("diag_type"):
                    res.diag_type, res.diag_text = e["diag_type"], e.get("diag_text", "")
            else:
                res = RecipientResult.deferred(rc, ADMIN_EXPIRED_REASON, "none", ADMIN_EXPIRED_DSN)
                self._log_result(qid, res, arrival, active_time, self.clock(), "error")
            expired.append((r, res))
        if expired:
            self.log.info(f"{qid}: from=<{log_address(sender)}>, status=force-expired, returned to sender")
            await self._durable(self._record, qid, qm, [r for r, _ in expired],
                                [(r, _final_identity(r, res), res, "failed", res.reason)
                                 for r, res in expired], [])
        try:
            await self._send_notices(qid, qm, sender, arrival)
        except NoticeError:
            # Done marks are durable; the notice is retried from bounce/ID.
            await self._blocking(self._defer_file, qid, self.clock() + self.min_backoff)
            return
        await self._blocking(self.store.remove, qid)
        self.log.info(f"{qid}: removed")

    def _as_resolved(self, rc: Recipient, sender: str) -> Recipient:
        """``rc`` renamed to the address the resolver delivers to, the queued one
        kept as its original, as _process does; unchanged when resolving fails."""
        try:
            res = self._resolve(rc.address, sender)
        except Exception:
            return rc
        resolved = getattr(res, "recipient", None) or rc.address
        if resolved != rc.address and not getattr(res, "failed", False):
            rc.orig = rc.orig or rc.address
            rc.address = resolved
        return rc

    async def _durable(self, fn, *args):
        """Run a state write (done marks, bounce log) on the state threads."""
        return await asyncio.get_running_loop().run_in_executor(state_executor(), fn, *args)

    async def _deliver_chunk(self, qid, qm, sender, arrival, active_time, transport, nexthop, chunk,
                             attributes=None):
        rcpts = [rc for _, rc in chunk]
        key, dest = self._destination(transport, nexthop, rcpts)
        if dest.dead is not None and self.clock() >= dest.dead[0]:
            dest.resume()           # the backoff is over: try the destination again
        agent = self.agent(transport)
        if agent is not None and getattr(agent, "batch_limit", 1) > 1:
            attrs = attributes if attributes is not None else getattr(qm, "attributes", None)
            if not (attrs and attrs.get(VERIFY_ATTRIBUTE)):
                item = _BatchItem(qid, qm, chunk, partial(
                    self._request, qid, qm, sender, arrival, active_time, transport, nexthop,
                    rcpts, attributes), getattr(qm, "content_size", 0))
                return await self._deliver_batched(key, dest, agent, transport, item)
        try:
            if not await dest.acquire():
                # Postfix's dead-destination shortcut: no new connection attempt
                # until the retry time; the mail is deferred with the last reason.
                _, reason, dsn = dest.dead
                now = self.clock()
                return [(now, RecipientResult.deferred(rc, f"delivery temporarily suspended: {reason}",
                                                       "none", dsn)) for rc in rcpts]
        except BaseException:
            self._forget_destination(key, dest)
            raise
        handed_over = False
        try:
            agent = self.agent(transport)
            if agent is None:
                now = self.clock()
                return [(now, RecipientResult.deferred(rc, "mail transport unavailable", "none", "4.3.0"))
                        for rc in rcpts]
            sem = self._process_sem(transport)
            if sem is not None:
                await sem.acquire()
            hook = _CompletionHook(qm, chunk)
            try:
                handoff = self.clock()
                request = self._request(qid, qm, sender, arrival, active_time, transport, nexthop,
                                        rcpts, attributes, handoff)
                request.completed = hook
                failed_agent = False
                try:
                    results = await agent.deliver(request)
                except Exception as exc:
                    self.log.warning(f"{qid}: {transport} delivery agent failed: {exc!r}")
                    failed_agent = True
                    results = [RecipientResult.deferred(rc, "delivery temporarily suspended: "
                                                        "unexpected agent failure", "none", "4.3.0")
                               for rc in rcpts]
            finally:
                hook.close()
                if sem is not None:
                    # Some delivery may wait for this transport's process slot.
                    handed_over = sem.locked()
                    sem.release()
            if not failed_agent:
                self._feedback(transport, dest, results)
        finally:
            busy = dest.busy
            dest.release()
            handed_over = handed_over or dest.busy >= busy   # a waiter got the slot
            self._forget_destination(key, dest)
        if handed_over:
            await _let_the_waiter_go()
        by_rcpt = {id(res.recipient): res for res in results}
        out = []
        for rc in rcpts:
            res = by_rcpt.get(id(rc))
            if res is None:  # an agent that forgets a recipient must not lose it
                res = RecipientResult.deferred(rc, "delivery status unavailable", "none", "4.3.0")
            out.append((handoff, res))
        return out

    @staticmethod
    def _request(qid, qm, sender, arrival, active_time, transport, nexthop, rcpts, attributes,
                 handoff) -> DeliveryRequest:
        return DeliveryRequest(
            queue_id=qid, sender=sender, recipients=rcpts, transport=transport,
            nexthop=nexthop, arrival_time=arrival,
            open_content=lambda: qm.iter_content(),
            content_size=getattr(qm, "content_size", 0),
            attributes=dict(attributes if attributes is not None
                            else getattr(qm, "attributes", {}) or {}),
            active_time=active_time, handoff_time=handoff)

    async def _deliver_batched(self, key, dest: Destination, agent, transport, item) -> list:
        """_deliver_chunk() for an agent that takes several messages at once
        (``batch_limit`` > 1: local(8), issue 8).  Messages for one destination
        queue up behind a single one of them (the queue's *runner*) that waits
        for the destination's slot; whoever gets the slot takes every message
        queued by then (up to the agent's batch_limit, batch_bytes and
        batch_recipients; the first message always goes) to the
        agent as one delivery, which counts as one delivery in flight towards
        the destination's concurrency limit and one process of maxproc.  Each
        message still gets its own results, and the agent reports a message
        delivered only once its mailbox copy is durable."""
        queues = self._batch_queues
        bq = queues.get(key)
        if bq is None:
            bq = queues[key] = _BatchQueue()
        bq.pending.append(item)
        if bq.runner is None:
            bq.runner = item
        else:
            try:
                got = await item.wake
            except asyncio.CancelledError:
                if item.taken:
                    # Its delivery is under way: the results must be settled
                    # (a stop never cancels deliveries, but be exact anyway).
                    task = asyncio.current_task()
                    if task is not None:
                        task.uncancel()
                    got = await asyncio.shield(item.wake)
                else:
                    self._leave_batch_queue(key, bq, item)
                    raise
            if got is not _RUN:
                return got
        # The runner is always the first item queued: it takes itself along.
        try:
            ok = await dest.acquire()
        except BaseException:
            self._leave_batch_queue(key, bq, item)
            self._forget_destination(key, dest)
            raise
        taken, size, rcpts = [], 0, 0
        limit = max(1, agent.batch_limit)
        budget = getattr(agent, "batch_bytes", 0) or 0
        most = getattr(agent, "batch_recipients", 0) or 0
        while bq.pending and len(taken) < limit:
            nxt = bq.pending[0]
            if taken and ((budget and size + nxt.size > budget)
                          or (most and rcpts + len(nxt.chunk) > most)):
                break
            bq.pending.popleft()
            nxt.taken = True
            taken.append(nxt)
            size += nxt.size
            rcpts += len(nxt.chunk)
        bq.runner = None
        self._next_runner(key, bq)
        try:
            outcome = await self._run_batch(key, dest, agent, transport, taken, ok)
        except BaseException as exc:
            for other in taken:
                if other is not item and not other.wake.done():
                    if isinstance(exc, asyncio.CancelledError):
                        other.wake.cancel()
                    else:
                        other.wake.set_exception(exc)
            raise
        for other, results in zip(taken, outcome):
            if other is not item and not other.wake.done():
                other.wake.set_result(results)
        return outcome[taken.index(item)]

    def _next_runner(self, key, bq: "_BatchQueue") -> None:
        """The first queued message waits for the next slot for all of them."""
        if bq.runner is None and bq.pending:
            bq.runner = bq.pending[0]
            if not bq.runner.wake.done():
                bq.runner.wake.set_result(_RUN)
        elif not bq.pending and bq.runner is None:
            queues = self._batch_queues
            if queues.get(key) is bq:
                del queues[key]

    def _leave_batch_queue(self, key, bq: "_BatchQueue", item) -> None:
        try:
            bq.pending.remove(item)
        except ValueError:
            pass
        if bq.runner is item:
            bq.runner = None
        self._next_runner(key, bq)

    async def _run_batch(self, key, dest: Destination, agent, transport, taken, ok) -> list:
        """One batch through the agent with the destination slot held (``ok``;
        False: the destination is dead and every message is deferred)."""
        if not ok:
            _, reason, dsn = dest.dead
            now = self.clock()
            return [[(now, RecipientResult.deferred(rc, f"delivery temporarily suspended: {reason}",
                                                    "none", dsn)) for _, rc in it.chunk]
                    for it in taken]
        handed_over = False
        try:
            sem = self._process_sem(transport)
            if sem is not None:
                await sem.acquire()
            hooks = [_CompletionHook(it.qm, it.chunk) for it in taken]
            try:
                handoff = self.clock()
                requests = []
                for it, hook in zip(taken, hooks):
                    request = it.make_request(handoff)
                    request.completed = hook
                    requests.append(request)
                failed_agent = False
                try:
                    per_request = await agent.deliver_batch(requests)
                    if not isinstance(per_request, list) or len(per_request) != len(requests):
                        raise ValueError("results do not match the batch")
                except Exception as exc:
                    for it in taken:
                        self.log.warning(f"{it.qid}: {transport} delivery agent failed: {exc!r}")
                    failed_agent = True
                    per_request = [[RecipientResult.deferred(
                        rc, "delivery temporarily suspended: unexpected agent failure", "none",
                        "4.3.0") for _, rc in it.chunk] for it in taken]
            finally:
                for hook in hooks:
                    hook.close()
                if sem is not None:
                    handed_over = sem.locked()
                    sem.release()
            if not failed_agent:
                self._feedback(transport, dest, [r for results in per_request for r in results])
        finally:
            busy = dest.busy
            dest.release()
            handed_over = handed_over or dest.busy >= busy
            self._forget_destination(key, dest)
        if handed_over:
            await _let_the_waiter_go()
        out = []
        for it, results in zip(taken, per_request):
            by_rcpt = {id(res.recipient): res for res in results}
            mine = []
            for _, rc in it.chunk:
                res = by_rcpt.get(id(rc))
                if res is None:  # an agent that forgets a recipient must not lose it
                    res = RecipientResult.deferred(rc, "delivery status unavailable", "none",
                                                   "4.3.0")
                mine.append((handoff, res))
            out.append(mine)
        return out

    def _feedback(self, transport, dest: Destination, results) -> None:
        """Concurrency feedback (Postfix's qmgr_queue_throttle/unthrottle): a
        delivery where no server could be reached at all is negative feedback,
        anything else positive."""
        if self._command(transport) in NETWORK_COMMANDS and results and all(
                _site_failure(r) for r in results):
            first = results[0]
            reason = first.reason
            prefix = "delivery temporarily suspended: "
            if reason.startswith(prefix):
                reason = reason[len(prefix):]
            dest.failed(self.clock() + self.min_backoff, reason, first.dsn)
        else:
            dest.succeeded()

    def _log_result(self, qid, res: RecipientResult, arrival, active_time, handoff, service) -> None:
        rc = res.recipient
        # The to= line comes from the delivery agent's service (postfix/virtual[pid]).
        logger = self._transport_log(service)
        logger.info(delivery_line(qid, rc.address, rc.orig, res.relay, arrival=arrival,
                                  active=active_time, handoff=handoff,
                                  conn_setup=res.conn_setup_done, now=self.clock(), dsn=res.dsn,
                                  status=res.status, reason=res.reason,
                                  max_decimals=self.max_decimals,
                                  conn_use=getattr(res, "conn_use", None)))

    @staticmethod
    def _wanted_entries(bounce_entries) -> list:
        # RFC 3461 4.1: no failure notice unless NOTIFY (when given) asks for FAILURE.
        return [e for e in bounce_entries
                if e[3] != "failed" or wants(getattr(e[0], "notify", None), "FAILURE")]

    def _record(self, qid, qm, done, bounce_entries, defer_entries) -> None:
        """Blocking part of settling results (runs on the state threads).

        ``bounce_entries`` are (queue recipient, logged recipient, result,
        action, reason): failures and, for NOTIFY=SUCCESS, deliveries
        (Postfix's trace log); both live in bounce/ID until their notices are
        queued.  The logged recipient is the queue recipient itself or, for
        an expanded one, the final address with the original in orig."""
        wanted = self._wanted_entries(bounce_entries)
        if wanted or defer_entries:
            self._note_log(qid)
        for i, (_, who, res, action, reason) in enumerate(wanted):
            _append_reason(self.store, "bounce", qid, who, res.dsn, reason, action,
                           i == len(wanted) - 1, self._diagnostic_of(res),
                           relay=res.relay if action == "failed" and records(qm) else None)
        if done:
            qm.mark_done(done)
        for who, res in defer_entries:
            # Reasons only (unsynced): losing one costs nothing.
            _append_reason(self.store, "defer", qid, who, res.dsn, res.reason, "delayed",
                           False, self._diagnostic_of(res))

    def _diagnostic_of(self, res) -> tuple[str, str] | None:
        """(diag_type, diag_text) of a result for the bounce/defer log: as the
        agent typed it (a command's x-unix text), else for local(8) and pipe(8),
        whose only bare sysexits reasons come from commands, that text as x-unix
        (Postfix's pipe_command()); None: the notice reads the reason."""
        dtype = getattr(res, "diag_type", None)
        if dtype:
            return dtype, getattr(res, "diag_text", None) or ""
        if res.status != "sent" and res.relay != "none":
            found = command_diagnostic(res.reason)
            if found and self._command(res.relay) in ("local", "pipe"):
                return found
        return None

    def _record_and_finish(self, qid, qm, done, bounce_entries, defer_entries):
        """_record, then _finish: a message's last outcome and its removal in
        one trip to the state threads.

        When nothing is left to report (no bounce/trace entry, now or from an
        earlier pass), the file goes right after its done marks, so those are
        not fsync'd: a killed process leaves them in the page cache (no
        re-delivery), and an OS crash can only bring the message back for one
        more delivery, never lose it (Postfix never fsyncs its done marks).
        Otherwise the marks are durable before the file goes."""
        unsynced = False
        try:
            if done and not defer_entries and not self._wanted_entries(bounce_entries) \
                    and (self._no_logs(qid) or not self.store.read_bounce_log(qid)):
                qm.mark_done(done, sync=False)
                unsynced = True
                self._remove_done(qid, qm)
                return None
        except OSError:
            pass                     # the usual way below says what is wrong
        if unsynced:
            qm.sync_marks()          # the file stays after all: its marks must not
        self._record(qid, qm, done, bounce_entries, defer_entries)
        try:
            return self._finish(qid, qm)
        except OSError:
            return _NOT_FINISHED     # the caller logs the outcome, then tries the usual way

    def _finish_now(self, qid, qm, done, bounce_entries, defer_entries) -> bool:
        """The common end of a message, on the event loop (issue 8): every
        recipient delivered, nothing to report, so no fsync is needed (see
        _record_and_finish) and the done marks, the bounce/ID check and the
        removal are a few cheap system calls, cheaper here than a thread
        hand-off; Postfix's qmgr removes its files the same way.  False when
        the state threads must do it (any fsync, or an error here: they redo
        what is missing and make the marks durable)."""
        if not done or defer_entries or self._wanted_entries(bounce_entries):
            return False
        try:
            if not self._no_logs(qid) and self.store.read_bounce_log(qid):
                return False
            qm.mark_done(done, sync=False)
            # No close here: _run_message hands the file to the closer thread.
            self._remove_done(qid)
        except OSError:
            return False
        return True

    def _no_logs(self, qid: str) -> bool:
        """True when ``qid`` surely has neither a defer/ nor a bounce/ log."""
        ids = self._log_ids
        return ids is not None and qid not in ids

    def _note_log(self, qid: str) -> None:
        """Before this qmgr writes a defer/ or bounce/ log of ``qid``."""
        ids = self._log_ids
        if ids is not None:
            ids.add(qid)
            if len(ids) > LOG_ID_LIMIT:
                self._log_ids = None

    def _finish(self, qid, qm=None):
        """A message whose recipients are all durably done: removed, unless
        bounce/ID has entries (this or an earlier pass may have left some),
        which are returned for the notices."""
        entries = None if self._no_logs(qid) else self.store.read_bounce_log(qid)
        if entries:
            return entries
        self._remove_done(qid, qm)
        return None

    def _remove_done(self, qid, qm=None) -> None:
        # Every recipient is marked done: a crash can only bring the file
        # back to be removed again (or, for unsynced marks after an OS crash,
        # delivered once more), so no directory fsync.
        logs = not self._no_logs(qid)
        kw = {} if logs else {"logs": False}
        if not self.store.remove(qid, "active", sync=False, **kw):
            self.store.remove(qid, sync=False, **kw)     # moved meanwhile (postsuper)
        if logs and self._log_ids is not None:
            self._log_ids.discard(qid)
        if qm is not None:
            # The last close of an unlinked file frees its blocks (a journal
            # update): here on the I/O thread, not on the event loop.
            qm.close()

    def _reset_defer_log(self, qid: str) -> bool:
        """Start each attempt with a fresh defer log (Postfix removes it when
        the message becomes active), keeping only the "delay warning sent"
        marker.  Returns whether that warning was already sent."""
        return self._reset_defer_log_state(qid)[1]

    def _reset_defer_log_state(self, qid: str) -> tuple[bool, bool]:
        """_reset_defer_log: (there was a defer log, the warning was sent)."""
        path = self.store.path("defer", qid)
        try:
            with open(path, "rb") as f:
                entries = qformat.parse_log_entries(f.read(4 * 1024 * 1024))
        except FileNotFoundError:
            return False, False
        markers = [e for e in entries if e.get("delay_warning")]
        if not markers:
            _unlink(path)
            return True, False
        if len(markers) != len(entries):
            tmp = path + ".tmp"
            with open(tmp, "wb") as f:
                f.write(qformat.pack_log_entry(markers[0]))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)   # atomic: the marker is never lost in between
        return True, True

    def _mark_delay_warned(self, qid: str) -> None:
        """Durably record that the one delay warning went out (a free entry in
        defer/ID, which leaves the queue with the message)."""
        entry = {"delay_warning": "sent", "time": str(int(self.clock()))}
        self._note_log(qid)
        fd = os.open(self.store.path("defer", qid), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, qformat.pack_log_entry(entry))
            os.fsync(fd)
        finally:
            os.close(fd)

    def _backoff(self, arrival: float) -> float:
        # Postfix: the wait grows with the message's age (so it doubles per
        # attempt), clamped to [minimal_backoff_time, maximal_backoff_time].
        age = self.clock() - arrival
        return max(self.min_backoff, min(self.max_backoff, age))

    def _defer_file(self, qid: str, next_attempt: float) -> None:
        try:
            self.store.move(qid, "active", "deferred")
        except FileNotFoundError:
            # Deleted under us (postsuper -d) after this pass wrote its logs: they
            # go now, while the file is still open here (its inode, and so its
            # id, cannot be anyone else's yet).
            sweep = getattr(self.store, "remove_orphan_logs", None)
            if sweep is not None and not self._no_logs(qid) and sweep([qid]):
                if self._log_ids is not None:
                    self._log_ids.discard(qid)
            raise
        try:
            self.store.set_next_attempt(qid, next_attempt)
        except OSError as exc:
            self.log.warning(f"{qid}: set retry time: {exc}")

    # ------------------------------------------------------------ notices
    def _cleanup_service(self):
        if self._cleanup is None:
            from postwell.cleanup import Cleanup
            log = self.agent_logs("cleanup") if self.agent_logs else self.log
            self._cleanup = Cleanup(self.config, self.store, log)
        return self._cleanup

    async def _post(self, qid: str, label: str, sender: str, to: str, data: bytes,
                    critical: bool = True) -> bool:
        """Queue one notice; log ``ID: <label> notification: NEWID`` as
        Postfix's bounce daemon does.  A non-critical notice (postmaster
        copy, success report) that fails is only warned about."""
        try:
            new_id = await post_notice(self.config, self.store, sender=sender, recipient=to,
                                       data=data, cleanup=self._cleanup_service())
        except NoticeError as exc:
            self.log.warning(f"{qid}: cannot queue {label} notification: {exc}")
            if critical:
                raise
            return False
        if not new_id:
            self.log.warning(f"{qid}: {label} notification refused by cleanup: discarded")
            return False
        self.bounce_log.info(f"{qid}: {label} notification: {new_id}")
        self.wake()
        return True

    def _render(self, kind, qid, qm, sender, arrival, rcpts, to, postmaster=False, full=None):
        return render_notice(self.config, kind=kind, queue_id=qid, sender=sender,
                             arrival_time=arrival, recipients=rcpts,
                             original=lambda: qm.iter_content(),
                             content_size=getattr(qm, "content_size", 0), to=to,
                             ret=getattr(qm, "ret", None), envid=getattr(qm, "envid", None),
                             postmaster=postmaster, full=full, now=self.clock(),
                             # RFC 6533 3: a notice about SMTPUTF8 mail is a global one
                             smtputf8=bool(getattr(qm, "smtputf8", False)),
                             # bounce_template_file trouble, as Postfix's bounce(8) logs it
                             warn=self.bounce_log.warning)

    def _dsn_recipients(self, qm, entries) -> list[DsnRecipient]:
        by_key, by_orig = {}, {}
        for i, r in enumerate(getattr(qm, "recipients", []) or []):
            if not isinstance(r, str):
                by_key.setdefault((r.address, r.orig or ""), (i, r))
                # An expanded part's entry names the queue recipient as its original.
                by_orig.setdefault(r.orig or r.address, (i, r))
                by_orig.setdefault(r.address, (i, r))
        out, first = [], {}
        for e in entries:
            addr, orig = e.get("recipient", ""), e.get("orig_rcpt", "")
            i, r = by_key.get((addr, orig)) or by_orig.get(orig) or (len(by_key), None)
            # Keyed on the first logged address of the queue recipient (the resolved
            # one; an alias expansion's parts stay together in log order).
            key = first.setdefault(i, (_sort_key(addr), i)) if r is not None \
                else (_sort_key(addr), i)
            out.append((key, DsnRecipient(addr, e.get("status", "5.0.0"), e.get("reason", ""),
                                        e.get("action", "failed"), orig or None,
                                        getattr(r, "orcpt", None) or None,
                                        diag_type=e.get("diag_type") or None,
                                        diag_text=e.get("diag_text"))))
        # qmgr_message_sort() order (as one delivery batch logs them), whatever
        # order the parallel deliveries finished in.
        out.sort(key=lambda x: x[0])
        return [d for _, d in out]

    async def _send_notices(self, qid, qm, sender, arrival, entries=None) -> None:
        """Turn bounce/ID into notices (Postfix's bounce_notify_service and
        bounce_trace_service), then drop it.  The log stays when the main
        notice cannot be queued: the next pass over the message tries again.
        ``entries``: the log as already read by _finish."""
        if entries is None:
            entries = await self._blocking(self.store.read_bounce_log, qid)
        if not entries:
            return
        failed = self._dsn_recipients(qm, [e for e in entries if e.get("action", "failed") == "failed"])
        success = self._dsn_recipients(qm, [e for e in entries if e.get("action", "failed") != "failed"])
        classes = notify_classes(self.config)
        pm_sender = double_bounce_address(self.config)
        if failed:
            if is_double_bounce(self.config, sender):
                # A postmaster notice that failed: never a triple bounce.
                self.log.warning(f"{qid}: undeliverable postmaster notification discarded")
            elif sender == "":
                # A failed notice: a double bounce to the postmaster, with the
                # whole notice, only when notify_classes asks for it.
                if classes & {"bounce", "2bounce"}:
                    to = self.config.get("2bounce_notice_recipient")
                    data = self._render(FAILURE, qid, qm, sender, arrival, failed, to,
                                        postmaster=True, full=True)
                    await self._post(qid, "postmaster non-delivery", pm_sender, to, data)
            else:
                data = self._render(FAILURE, qid, qm, sender, arrival, failed, sender)
                if await self._post(qid, "sender non-delivery", "", sender, data) \
                        and "bounce" in classes:
                    to = self.config.get("bounce_notice_recipient")
                    data = self._render(FAILURE, qid, qm, sender, arrival, failed, to,
                                        postmaster=True, full=False)
                    await self._post(qid, "postmaster non-delivery", pm_sender, to, data,
                                     critical=False)
        # A notice about a notice is never sent (_note_no_trace logged it).
        if await send_record_report(self, qid, qm, sender, arrival, entries):
            pass    # sendmail -v: its report stands for the success notice
        elif success and sender and not is_double_bounce(self.config, sender):
            data = self._render(SUCCESS, qid, qm, sender, arrival, success, sender)
            await self._post(qid, "sender delivery status", "", sender, data, critical=False)
        await self._blocking(_unlink, self.store.path("bounce", qid))

    async def _send_delay_warning(self, qid, qm, sender, arrival, deferred) -> None:
        """One "Delayed Mail (still being retried)" notice per message, for
        recipients whose NOTIFY asks for DELAY (Postfix's bounce_warn_service)."""
        def rcpt(r, res):
            # Named as in defer/ID: the resolved address, "expanded from" the queued one.
            rc = _rcpt_fields(_final_identity(r, res))
            diag = self._diagnostic_of(res) or (None, None)
            return DsnRecipient(rc.address, res.dsn, res.reason, "delayed", rc.orig,
                                getattr(r, "orcpt", None) or None,
                                diag_type=diag[0], diag_text=diag[1])
        everyone = [rcpt(r, res) for r, res in deferred]
        asked = [rcpt(r, res) for r, res in deferred if wants(getattr(r, "notify", None), "DELAY")]
        classes = notify_classes(self.config)
        pm_sender = double_bounce_address(self.config)
        try:
            if is_double_bounce(self.config, sender):
                pass
            elif sender == "":
                if "2bounce" in classes:
                    to = self.config.get("2bounce_notice_recipient")
                    data = self._render(DELAY, qid, qm, sender, arrival, everyone, to,
                                        postmaster=True)
                    await self._post(qid, "postmaster delay", pm_sender, to, data)
            else:
                if asked:
                    data = self._render(DELAY, qid, qm, sender, arrival, asked, sender)
                    await self._post(qid, "sender delay", "", sender, data)
                if "delay" in classes:
                    to = self.config.get("delay_notice_recipient")
                    data = self._render(DELAY, qid, qm, sender, arrival, everyone, to,
                                        postmaster=True)
                    await self._post(qid, "postmaster delay", pm_sender, to, data, critical=False)
        except NoticeError:
            return      # not marked: the next deferral tries again
        await self._blocking(self._mark_delay_warned, qid)

    # kept for callers of the first draft
    async def _send_bounce(self, qid, qm, sender, arrival) -> None:
        await self._send_notices(qid, qm, sender, arrival)

    # ------------------------------------------------------------ main loop
    async def run(self, fifo_path: str | None = None, stop: asyncio.Event | None = None,
                  *, freeze_gc: bool = False) -> None:
        loop = asyncio.get_running_loop()
        stop = stop or asyncio.Event()
        self._fatal_stop = stop
        fd = None
        if fifo_path:
            fd = _open_fifo(fifo_path)
            if fd is not None:
                loop.add_reader(fd, self._on_fifo, fd)
        self._start_up_checks()
        self.recover_active()
        self.scan_incoming()
        self.scan_deferred()
        next_deferred = loop.time() + self.run_delay
        if freeze_gc:
            # Start-up objects (config, tables, modules) are never garbage:
            # keep the collector from walking them on every cycle.
            gc.freeze()
        last_scan = loop.time()
        try:
            while not stop.is_set():
                self._wake.clear()
                waiters = [loop.create_task(self._wake.wait()), loop.create_task(stop.wait())]
                timeout = min(SAFETY_SCAN_INTERVAL, max(0.0, next_deferred - loop.time()))
                await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                for w in waiters:
                    w.cancel()
                if stop.is_set():
                    break
                # Under load every commit pokes the FIFO: gather the wake-ups
                # of a short window into one scan of incoming/.
                delay = last_scan + WAKE_BATCH - loop.time()
                if delay > 0 and self._wake.is_set():
                    await asyncio.sleep(delay)
                    if stop.is_set():
                        break
                self._wake.clear()
                last_scan = loop.time()
                self.scan_incoming()
                if loop.time() >= next_deferred or self._flush_requested:
                    force, self._flush_requested = self._flush_requested, False
                    self.scan_deferred(force=force)
                    next_deferred = loop.time() + self.run_delay
        finally:
            # Ending (stop or fatal): a message held for a broken transport waits
            # for the next qmgr, with no fatal line from this one.
            self._stopping = True
            for _, timer in self.__dict__.pop("_held", {}).values():
                timer.cancel()
            if fd is not None:
                loop.remove_reader(fd)
                os.close(fd)
            # Deliveries in flight finish (bounded by the agents' own timeouts);
            # anything not finished stays in active/ and is resumed next start.
            # After a fatal error nobody is waiting for us to go (a stop has the
            # master's own deadline): every delivery in flight is let finish, so
            # the next qmgr never repeats one whose done mark was still due.
            while self._tasks:
                await asyncio.wait(list(self._tasks), timeout=None if self.fatal else 30)
                if not self.fatal:
                    break
            await self._close_agents()

    def _start_up_checks(self) -> None:
        """Before the first scan: misnamed queue files get names that match their
        inodes (QueueStore.rename_misnamed: what lets create() skip looking into
        the other queue directories), and the ids with side logs are read."""
        repair = getattr(self.store, "rename_misnamed", None)
        if repair is not None:
            try:
                for q, old, new in repair():
                    self.log.warning(f"{q}/{old}: file name does not match its inode number: "
                                     f"renamed to {new}")
            except OSError as exc:
                self.log.warning(f"queue file name check: {exc}")
        # Commits whose complete marker a crash took (queue/format.py: the marker
        # is not fsync'd): their data and header are durable and check out.
        # A removal (inode kept for reuse, QueueStore._retire) cut short by a crash:
        # an emptied, unmarked file under its old name.  Nothing to deliver.
        retired = getattr(self.store, "clear_retired", None)
        if retired is not None:
            try:
                retired()
            except OSError as exc:
                self.log.warning(f"queue file removal check: {exc}")
        recover = getattr(self.store, "recover_unmarked", None)
        if recover is not None:
            try:
                for qid in recover():
                    self.log.warning(f"{qid}: complete queue file without its complete marker "
                                     f"(system crash?): marked complete")
            except OSError as exc:
                self.log.warning(f"queue file marker check: {exc}")
        log_ids = getattr(self.store, "log_ids", None)
        try:
            self._log_ids = log_ids(LOG_ID_LIMIT) if log_ids is not None else None
        except OSError:
            self._log_ids = None
        # Logs whose message is in no queue (a crash, or a previous qmgr's log
        # of a message deleted under it): no qmgr writes logs now, so each is
        # surely stale.  Their ids then need no look when a message has them.
        sweep = getattr(self.store, "remove_orphan_logs", None)
        if self._log_ids and sweep is not None:
            try:
                gone = sweep(sorted(self._log_ids))
            except OSError as exc:
                self.log.warning(f"queue log check: {exc}")
            else:
                self._log_ids.difference_update(gone)
                self._log_ids = {n for n in self._log_ids if not n.endswith(".tmp")}

    async def _close_agents(self) -> None:
        """Say QUIT on cached SMTP/LMTP connections (bounded), close the rest."""
        for agent in {id(a): a for a in self._agents.values() if a is not None}.values():
            try:
                close_all = getattr(agent, "close_all", None)
                if close_all is not None:
                    await asyncio.wait_for(close_all(), 5)
                else:
                    agent.close()
            except Exception:
                pass

    _flush_requested = False

    def _on_fifo(self, fd: int) -> None:
        try:
            data = os.read(fd, 4096)
        except BlockingIOError:
            return
        except OSError:
            return
        # 'D' (scan deferred) and 'F' (flush) ask for a deferred-queue run that
        # ignores retry times (postqueue -f / postfix flush); 'A' and any other
        # byte mean "new mail in incoming".
        if b"F" in data or b"D" in data:
            self._resume_dead()   # QMGR_REQ_FLUSH_DEAD
            self._flush_requested = True
        self._wake.set()

    def flush(self) -> None:
        self._resume_dead()
        self._flush_requested = True
        self._wake.set()


def _open_fifo(path: str):
    try:
        if not os.path.exists(path):
            os.mkfifo(path, 0o622)
        # O_RDWR keeps the FIFO open for writing too, so we never see EOF storms.
        return os.open(path, os.O_RDWR | os.O_NONBLOCK)
    except OSError:
        return None


_closer_lock = threading.Lock()
_closer_queue = None
# After a wake-up the closer thread waits this long before it takes what is
# queued (issue 8): puts into a SimpleQueue nobody is blocked on cost no
# system call, so under load one futex wake-up and one GIL hand-over serve a
# batch of files rather than each message.  The files are already unlinked;
# holding them open a moment longer changes nothing on disk.
CLOSE_BATCH_DELAY = 0.05     # seconds


def _forget_closer() -> None:
    # A forked child has no closer thread (threads do not survive fork).
    global _closer_queue
    _closer_queue = None


os.register_at_fork(after_in_child=_forget_closer)


def close_later(qm) -> None:
    """Close a queue file on the closer thread (one per process, started on
    first use).  Fire and forget, in order: a failed close leaves nothing
    to retry or report."""
    global _closer_queue
    q = _closer_queue
    if q is None:
        with _closer_lock:
            if _closer_queue is None:
                import queue
                _closer_queue = queue.SimpleQueue()
                threading.Thread(target=_close_loop, args=(_closer_queue,), daemon=True,
                                 name="qmgr-close").start()
            q = _closer_queue
    q.put(qm)


def _close_loop(q) -> None:
    import queue
    while True:
        batch = [q.get()]
        time.sleep(CLOSE_BATCH_DELAY)
        try:
            while True:
                batch.append(q.get_nowait())
        except queue.Empty:
            pass
        for qm in batch:
            try:
                qm.close()
            except Exception:   # noqa: BLE001 - nothing to report, nothing to retry
                pass
        del batch, qm


class _Batcher:
    """Blocking jobs asked for in one event-loop turn go to the executor as
    one hand-off and come back with one wake-up.

    Under load many messages start (a scan claims several) or finish (one
    poll returns several replies) in the same turn; a thread-pool round trip
    each (a future, a lock, a wake-up of the loop) cost more than the short
    file operations themselves.  Jobs run in submission order on one thread;
    each gets its own result or exception.  A job whose waiter was cancelled
    still runs (it may already have moved a file); an opened queue file it
    returns is closed (see _drop_unclaimed)."""

    MAX_JOBS = 32      # a start-up backlog still spreads over several threads

    def __init__(self, loop, executor) -> None:
        self.loop = loop
        self.executor = executor
        self._jobs: list = []

    def submit(self, fn, *args) -> asyncio.Future:
        fut = self.loop.create_future()
        if not self._jobs:
            self.loop.call_soon(self._flush)
        self._jobs.append((fn, args, fut))
        if len(self._jobs) >= self.MAX_JOBS:
            self._flush()
        return fut

    def _flush(self) -> None:
        jobs, self._jobs = self._jobs, []
        if jobs:
            done = self.loop.run_in_executor(self.executor, _run_jobs, jobs)
            done.add_done_callback(partial(_hand_back, jobs))


def _run_jobs(jobs) -> list:
    out = []
    for fn, args, _ in jobs:
        try:
            out.append((True, fn(*args)))
        except BaseException as exc:   # noqa: BLE001 - each waiter gets its own error
            out.append((False, exc))
    return out


def _hand_back(jobs, done) -> None:
    if done.cancelled() or done.exception() is not None:
        # The executor itself failed (shut down): nothing ran, or not all of it.
        for _, _, fut in jobs:
            if not fut.done():
                if done.cancelled():
                    fut.cancel()
                else:
                    fut.set_exception(done.exception())
        return
    results = done.result()
    for i, (_, _, fut) in enumerate(jobs):
        ok, value = results[i]
        if fut.done():
            _drop_unclaimed(value)
        elif ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)


def _drop_unclaimed(value) -> None:
    """A job's result nobody waits for any more (its task was cancelled):
    an opened queue file is closed; the file itself stays where the job left
    it (active/), which start-up recovery handles."""
    qm = value[0] if isinstance(value, tuple) and value else value
    close = getattr(qm, "close", None)
    if close is not None:
        try:
            close()
        except OSError:
            pass


_RUN = object()     # a queued batch item's wake-up: "wait for the slot for the queue"


class _BatchItem:
    """One message's chunk queued for a batch (_deliver_batched)."""

    __slots__ = ("qid", "qm", "chunk", "make_request", "size", "wake", "taken")

    def __init__(self, qid, qm, chunk, make_request, size) -> None:
        self.qid, self.qm, self.chunk, self.make_request = qid, qm, chunk, make_request
        self.size = size or 0
        self.wake = asyncio.get_running_loop().create_future()
        self.taken = False


class _BatchQueue:
    """The messages waiting for one destination's slot, and which of them
    (the first) waits for it on behalf of all."""

    __slots__ = ("pending", "runner")

    def __init__(self) -> None:
        self.pending: deque = deque()
        self.runner: _BatchItem | None = None


class _CompletionHook:
    """``request.completed(recipient)``: Postfix's deliver_completed().

    An agent that has just delivered a recipient for good (the mailbox file
    is in place) may call this right away, from whatever thread did the
    delivery, instead of leaving the done mark to the qmgr's event loop after
    deliver() returns: the mark is then written (and fsync'd) microseconds
    after the delivery, so a kill -9 in between is all but impossible and a
    message is delivered at most twice however often the system is killed.
    A recipient whose NOTIFY asks for SUCCESS is left to the normal path, so
    the trace entry for its notice is durable before it is marked done.
    Calls after deliver() returned are ignored."""

    def __init__(self, qm, chunk) -> None:
        self._qm = qm
        self._by_rc = {id(rc): r for r, rc in chunk}
        self._lock = threading.Lock()
        self._open = True

    def __call__(self, recipient) -> bool:
        r = self._by_rc.get(id(recipient))
        if r is None or isinstance(r, str) or wants_trace(self._qm, r):
            return False
        with self._lock:
            if not self._open:
                return False
            self._qm.mark_done([r])
        return True

    def close(self) -> None:
        with self._lock:
            self._open = False


def _takes_sender(resolver) -> bool:
    """Whether ``resolver.resolve`` accepts ``sender=`` (AddressResolver does;
    simple stand-ins may not)."""
    try:
        params = inspect.signature(resolver.resolve).parameters
    except (TypeError, ValueError, AttributeError):
        return False
    return "sender" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _append_reason(store, kind, qid, who, dsn, reason, action, sync, diag,
                   relay=None) -> None:
    """One bounce/ID or defer/ID entry; a typed diagnostic travels in it as
    Postfix's bounce log carries it (diag_type, diag_text)."""
    if (diag or relay) and hasattr(store, "_log_entry") and hasattr(store, "_append_log"):
        entry = store._log_entry(who, dsn, reason, action)
        if diag:
            entry["diag_type"], entry["diag_text"] = diag
        if relay:
            entry["trace_relay"] = relay    # sendmail -v's report (qmgr/notices.py)
        store._append_log(kind, qid, entry, sync)
    elif kind == "bounce":
        store.append_bounce_log(qid, who, dsn, reason, action=action, sync=sync)
    else:
        store.append_defer_log(qid, who, dsn, reason, action=action, sync=sync)


def _final_identity(r, res):
    """Who a notice names for queue recipient ``r``: ``r`` itself, or when the qmgr
    resolved it to another address (RECIPIENT_UPDATE) that address, with the queued
    one as the original (Final-Recipient / "expanded from", as Postfix's)."""
    if res.recipient.address == getattr(r, "address", r):
        return r
    return _part_recipient(res)


def _part_recipient(part) -> qformat.Recipient:
    """The bounce/defer log identity of one expanded part: its final address,
    with the queue recipient's address as the original."""
    rc = part.recipient
    return qformat.Recipient(rc.address, getattr(rc, "orig", None) or None,
                             getattr(rc, "orcpt", None) or None, getattr(rc, "notify", None) or None)


def _site_failure(res) -> bool:
    """No server of the destination could be reached (no connection set up,
    no relay to name): Postfix's negative concurrency feedback.  An agent may
    say so itself with ``res.site_failure``."""
    explicit = getattr(res, "site_failure", None)
    if explicit is not None:
        return bool(explicit)
    return res.status == "deferred" and res.conn_setup_done is None and res.relay == "none"


def _sort_key(address: str) -> tuple:
    # qmgr_message_sort(): no domain last, then the domain without case, then
    # the whole address byte-wise (UTF-8 byte order is code point order).
    _, at, domain = address.rpartition("@")
    return (0, domain.lower(), address) if at else (1, "", address)


def _item_sort_key(item) -> tuple:
    # (queue recipient, resolved Recipient): the resolved address decides, as
    # Postfix's resolver rewrites rcpt->address before its second sort.
    return _sort_key(item[1].address)


def _wants_failure_notice(r) -> bool:
    return wants(getattr(r, "notify", None), "FAILURE")


_UNSET = object()
_HOLD = object()
_NOT_FINISHED = object()


def _success_action(res) -> str | None:
    """RFC 3464 2.3.3 action for a delivered recipient with NOTIFY=SUCCESS.

    An agent may say so itself with ``res.dsn_action`` ("delivered",
    "relayed", "expanded", or None when the next hop took over DSN duties,
    e.g. an SMTP server that accepted NOTIFY, RFC 3461 5.2.2).  Otherwise a
    hand-off to a remote host ("name[addr]:port") is "relayed" and any local
    delivery is "delivered"."""
    action = getattr(res, "dsn_action", _UNSET)
    if action is not _UNSET:
        return action or None
    return "relayed" if "[" in (res.relay or "") else "delivered"


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _null_log():
    from postwell.log import NullLog
    return NullLog("qmgr", keep=False)
