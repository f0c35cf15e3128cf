"""The master daemon: binds the listeners, forks and supervises the smtpd
workers and the qmgr, handles stop (SIGTERM), abort (SIGQUIT) and reload
(SIGHUP).  Signals only write into a self-pipe; all work happens in one
select() loop, so no handler ever runs in the middle of bookkeeping.
"""

from __future__ import annotations

import errno
import fcntl
import gc
import os
import pwd
import select
import signal
import stat
import time
from dataclasses import dataclass, field

from postwell import spawn as spawn_service   # top level: the master preloads it before forking

from . import services as sv
from .startup import (  # noqa: F401 - part of this module's API
    MasterError, load, master_cf_wording, pid_path, read_running_pid,
)

try:  # start-up warnings name set-but-ignored parameters; these are honoured here
    from postwell.config.registry import register_implemented as _register
except ImportError:  # pragma: no cover
    def _register(*names):
        pass
_register("queue_directory", "data_directory", "maillog_file", "mail_owner", "process_id_directory", "service_throttle_time", "daemon_directory", "syslog_name", "syslog_facility", "mail_version", "inet_interfaces", "inet_protocols", "default_process_limit", "import_environment")

# The qmgr's scheduler reads these for every transport by name (qmgr.manager._limit).
_register("*_destination_recipient_limit", "*_destination_concurrency_limit")

# Parameters that only tell Postfix's own installation tools where things are,
# or only tune a cache: postwell behaves correctly without them, so setting
# them (stock Debian main.cf does) draws no start-up warning.
QUIET_PARAMETERS = frozenset({
    "readme_directory", "html_directory", "manpage_directory", "sample_directory",
    "sendmail_path", "newaliases_path", "mailq_path", "setgid_group", "meta_directory",
    "shlib_directory", "command_directory", "config_directory",
    "smtp_tls_session_cache_database", "smtpd_tls_session_cache_database",
    "lmtp_tls_session_cache_database", "smtp_tls_session_cache_timeout",
    "smtpd_tls_session_cache_timeout",
})
# Settings equal to what postwell does anyway.
QUIET_VALUES = {"biff": ("no",)}

STOP_DRAIN_SECONDS = 60.0      # smtpd sessions get this long to finish on stop
BAD_STARTUP_SECONDS = 1.0      # a child dying sooner than this throttles its service
FATAL_EXIT_DELAY = 1.0         # Postfix's msg_fatal() sleeps this long before exit(1)


def _prepare_logfile(cfg, owner) -> None:
    """maillog_file exists, and (when the children run as mail_owner) is theirs:
    they append to it themselves.  OSError when it cannot be made."""
    logfile = cfg.get("maillog_file")
    if logfile and not logfile.startswith("/dev/"):
        fd = os.open(logfile, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.close(fd)
        if owner:
            os.chown(logfile, owner[0], owner[1])


def mail_owner_ids(config) -> tuple[int, int, str] | None:
    """(uid, gid, name) to run children as, or None when not root (run as ourselves)."""
    name = config.get("mail_owner")
    if os.geteuid() != 0:
        return None
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        raise MasterError(f"file {config.config_dir}/main.cf: parameter mail_owner: "
                          f"unknown user name value: {name}") from None
    if pw.pw_uid == 0:
        raise MasterError(f"file {config.config_dir}/main.cf: parameter mail_owner: "
                          f"user {name} has privileged user ID")
    return pw.pw_uid, pw.pw_gid, name


@dataclass(eq=False)
class Child:
    pid: int
    slot: "Slot"
    started: float
    retired: bool = False    # told to drain after a reload: never restarted


@dataclass(eq=False)
class Slot:
    kind: str                   # "smtpd" | "qmgr" | "pickup" | "showq" | "helper" | ...
    svc: object                 # MasterService (or None for an implicit qmgr)
    config: object
    sockets: list = field(default_factory=list)
    nproc: int = 1
    children: set = field(default_factory=set)
    throttled_until: float = 0.0
    blocked_by: set = field(default_factory=set)   # old pids that must exit first (qmgr)
    key: tuple = ()
    preloaded: dict | None = None   # smtpd: what preload() read as root (the TLS context)
    # On demand (showq, the root helpers, pickup): no process while nobody
    # asks.  The master owns the listening socket (pickup: the FIFO) and its
    # name (listen_path, inode listen_ino) and forks a child when a client
    # connects (pickup: when the FIFO is poked); the child leaves after max_idle.
    on_demand: bool = False
    listen_path: str | None = None
    listen_ino: int = 0
    # What the service's daemon dies of at start (a malformed master.cf -o:
    # Postfix's master starts, only this daemon fails).  Such a slot runs no
    # worker of its own: a child that logs the daemon's fatal line and exits 1
    # is forked whenever Postfix's master would start the daemon (a client
    # waiting on its listener, or at once for a resident service), and the
    # master throttles the service as it does any that fails at start-up.
    startup_error: str | None = None

    @property
    def command(self) -> str:
        if self.svc is not None:
            return self.svc.command
        return {"helper": "virtual", "localhelper": "local", "pipehelper": "pipe",
                "showq": "showq"}.get(self.kind, "qmgr")


class Master:
    def __init__(self, config_dir: str, *, ready_fd: int | None = None, log_stderr: bool = False):
        self.config_dir = config_dir
        self.ready_fd = ready_fd
        self.log_stderr = log_stderr
        self.slots: list[Slot] = []
        self.children: dict[int, Child] = {}
        self.stopping = False
        self.aborting = False
        self._pipe_r = self._pipe_w = -1
        self._pid_fd = None
        self.owner = None
        self._warned: set = set()
        self._maildrop_due = 0.0       # next look into maildrop/ for an on-demand pickup
        self._interfaces: str | None = None   # inet_interfaces as at start (kept by reloads)

    # ---------------------------------------------------------------- start
    def run(self) -> int:
        try:
            try:
                self._startup()
            except MasterError:
                raise
            except OSError as exc:
                raise MasterError(f"{exc.filename + ': ' if exc.filename else ''}"
                                  f"{exc.strerror or exc}") from None
            except Exception as exc:
                raise MasterError(f"start-up failed: {exc!r}") from None
        except MasterError as exc:
            self._log_fatal(exc)
            self._ready(f"fatal: {exc}")
            self._cleanup()
            return 1
        self._ready("ok")
        try:
            self._loop()
        except MasterError as exc:
            # A reload that read a configuration the master cannot run: Postfix's
            # master dies of it (its children go when they see it gone).
            self._log_fatal(exc)
            return 1
        finally:
            self._cleanup()
        return 0

    def _log_fatal(self, exc: MasterError) -> None:
        """The master's last words.  Postfix's master with a maillog_file logs
        through its postlog service: a fatal error about a master.cf entry
        reaches the maillog only when that entry comes before the postlog
        entry (the master has not taken over the service's socket yet), else
        it is lost with the master; postwell says it through syslog then."""
        cfg = getattr(self, "config", None)
        if cfg is None:
            try:
                from postwell.config import load_config
                cfg = load_config(self.config_dir, read_master=False)
            except Exception:   # noqa: BLE001 - postfix(1) has reported it already
                cfg = None
        log = getattr(self, "log", None)
        if cfg is not None and exc.line is not None:
            postlog = postlog_entry_line(cfg.config_dir)
            if postlog is not None and postlog < exc.line:
                _syslog_fatal(cfg, str(exc))
                return
            if log is None:
                try:
                    from postwell.log import MailLog
                    log = MailLog.from_config(cfg, "master", also_stderr=self.log_stderr)
                except OSError:
                    log = None
        if log is not None:
            log.fatal(str(exc))
        else:
            _syslog_fatal(cfg, str(exc))

    def _ready(self, text: str) -> None:
        if self.ready_fd is not None:
            try:
                os.write(self.ready_fd, (text + "\n").encode())
            except OSError:
                pass
            try:
                os.close(self.ready_fd)
            except OSError:
                pass
            self.ready_fd = None

    def _startup(self) -> None:
        from postwell.log import MailLog
        from postwell.queue import QueueStore
        # First, before any thread of this process allocates: the limit is read
        # when the first extra arena is made, and the children inherit it.
        limit_malloc_arenas()
        cfg = load(self.config_dir)
        self.config = cfg
        self.owner = mail_owner_ids(cfg)
        self._prepare_dirs(cfg)
        try:
            self.log = MailLog.from_config(cfg, "master", also_stderr=self.log_stderr)
        except OSError as exc:
            raise MasterError(f"open {cfg.get('maillog_file')}: {exc.strerror}") from None
        store = QueueStore(cfg.get("queue_directory"))
        try:
            store.ensure_layout(*(self.owner[:2] if self.owner else (None, None)))
        except TypeError:
            store.ensure_layout()
        except OSError as exc:
            raise MasterError(f"queue directory {cfg.get('queue_directory')}: {exc.strerror}") from None
        try:   # unix sockets of postwell's own helpers (Postfix's private/)
            os.makedirs(os.path.join(cfg.get("queue_directory"), "private"), 0o700, exist_ok=True)
        except OSError:
            pass
        self._chown_queue(cfg)
        self._lock_pid(cfg)
        self._drop_duplicate_services(cfg)
        self._interfaces = cfg.get("inet_interfaces")
        self.slots = self._make_slots(cfg, {}, warn=True)
        self._listen_on_demand(self.slots, {})
        # Before forking (children may not be able to read the library once
        # unprivileged) and before the warning (parts register what they honour).
        preload_modules()
        preload_for_config(cfg)
        self._warn_unimplemented_parameters(cfg)
        self._pipe_r, self._pipe_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self._pipe_w)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGCHLD,
                    signal.SIGUSR1):
            signal.signal(sig, lambda *_: None)   # the wakeup fd carries the signal number
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        self.log.info(f"daemon started -- version {cfg.get('mail_version')}, "
                      f"configuration {cfg.config_dir}")
        self._start_missing()

    def _prepare_dirs(self, cfg) -> None:
        qdir = cfg.get("queue_directory")
        for d in (qdir, cfg.get("data_directory")):
            if d:
                try:
                    os.makedirs(d, 0o755, exist_ok=True)
                except OSError as exc:
                    raise MasterError(f"mkdir {d}: {exc.strerror}") from None
        try:
            _prepare_logfile(cfg, self.owner)
        except OSError as exc:
            raise MasterError(f"open logfile {cfg.get('maillog_file')}: {exc.strerror}") from None

    def _chown_queue(self, cfg) -> None:
        if not self.owner:
            return
        uid, gid, _ = self.owner
        qdir = cfg.get("queue_directory")
        data = cfg.get("data_directory")
        paths = [data] if data else []
        for name in ("incoming", "active", "deferred", "hold", "corrupt", "maildrop", "defer",
                     "bounce", "public", "flush", "saved", "trace", "private"):
            p = os.path.join(qdir, name)
            if os.path.isdir(p):
                paths.append(p)
        for p in paths:
            try:
                st = os.stat(p)
                if st.st_uid != uid:
                    os.chown(p, uid, gid)
            except OSError:
                pass

    def _lock_pid(self, cfg) -> None:
        path = pid_path(cfg)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            # flock: held by this open file only, released when the master dies.
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise MasterError("the Postfix mail system is already running") from None
        os.ftruncate(fd, 0)
        # Postfix's format: the pid right-aligned in 32 columns, then a newline.
        os.pwrite(fd, f"{os.getpid():>32}\n".encode(), 0)
        os.fsync(fd)
        self._pid_fd = fd
        self._pid_file = path

    def _bind_config(self, scfg):
        """The configuration a listener is bound with: inet_interfaces as at start."""
        if self._interfaces is not None and scfg.get("inet_interfaces") != self._interfaces:
            return scfg.override({"inet_interfaces": self._interfaces})
        return scfg

    def _release_unwanted_listeners(self, cfg, old_sockets: dict) -> None:
        """Before a reload binds anything: listeners the new configuration does
        not keep are closed and their workers told to drain now, so a new
        listener on an overlapping address (127.0.0.1:25 -> 0.0.0.0:25) can bind
        once they have let go."""
        plan = sv.plan_services(cfg.services or [])
        wanted = set()
        for services, key_of in ((plan.smtpd, sv.bind_key), (plan.spawn, spawn_service.bind_key)):
            for svc in services:
                scfg = self._bind_config(cfg.override(svc.overrides) if svc.overrides else cfg)
                try:
                    wanted.add(key_of(svc, scfg))
                except Exception:   # noqa: BLE001 - _make_slots reports it
                    pass
        for slot in self.slots:
            if slot.key in old_sockets and slot.key not in wanted:
                for s in old_sockets.pop(slot.key):
                    s.close()
                for pid in slot.children:
                    try:
                        os.kill(pid, signal.SIGTERM)
                    except ProcessLookupError:
                        pass

    def _drop_duplicate_services(self, cfg) -> None:
        kept, warnings = sv.drop_duplicates(cfg.services or [])
        for text in warnings:
            self.log.warning(text)
        cfg.services[:] = kept

    def _warn_unimplemented_parameters(self, cfg) -> None:
        for name in unimplemented_parameter_names(cfg):
            self.log.warning(f"{cfg.config_dir}/main.cf: parameter {name} is not implemented "
                             "by postwell and is ignored")

    def _make_slots(self, cfg, old_sockets: dict, warn: bool, busy_wait: float = 0.0) -> list[Slot]:
        """busy_wait (a reload): how long a new listener may wait for an address
        the old configuration's draining workers still hold."""
        from postwell.config import ConfigError
        plan = sv.plan_services(cfg.services or [])
        if warn:
            for svc, why in plan.unsupported:
                if (svc.name, svc.type, svc.command) in self._warned:
                    continue   # once per service, not again at every reload
                self._warned.add((svc.name, svc.type, svc.command))
                self.log.warning(f"master.cf line {svc.line}: service {svc.name} ({svc.type}) "
                                 f"command {svc.command}: {why}; service ignored")
        slots = []
        fresh = []   # sockets bound by this call: closed again if the plan fails
        master_path = os.path.join(cfg.config_dir, "master.cf")
        for svc in plan.smtpd:
            scfg = cfg.override(svc.overrides) if svc.overrides else cfg
            problem = sv.inet_address_error(svc)
            if problem is not None:
                for s in fresh:
                    s.close()
                text, located = problem
                raise MasterError(f"{master_path}: line {svc.line}: {text}" if located else text,
                                  svc.line)
            bcfg = self._bind_config(scfg)
            key = sv.bind_key(svc, bcfg)
            socks = old_sockets.pop(key, None)
            if socks is None:
                try:
                    socks = _bind_waiting(lambda: sv.bind_service(svc, bcfg), busy_wait)
                except (OSError, ConfigError) as exc:
                    for s in fresh:
                        s.close()
                    if isinstance(exc, ConfigError):
                        raise MasterError(f"{master_path}: line {svc.line}: bad hostname or "
                                          f"network address: {svc.name}", svc.line) from None
                    raise MasterError(exc.strerror or str(exc), svc.line) from None
                fresh.extend(socks)
            slots.append(Slot("smtpd", svc, scfg, socks, sv.worker_count(svc, scfg), key=key))
        for svc in plan.spawn:
            # spawn(8): one supervisor per service; it bounds the commands by maxproc itself.
            scfg = cfg.override(svc.overrides) if svc.overrides else cfg
            bcfg = self._bind_config(scfg)
            key = spawn_service.bind_key(svc, bcfg)
            socks = old_sockets.pop(key, None)
            if socks is None:
                try:
                    socks = _bind_waiting(lambda: spawn_service.bind(svc, bcfg, self.owner),
                                          busy_wait)
                except OSError as exc:
                    for s in fresh:
                        s.close()
                    raise MasterError(exc.strerror or str(exc), svc.line) from None
                fresh.extend(socks)
            slots.append(Slot("spawn", svc, scfg, socks, 1, key=key))
        if self.owner:
            # Root: the privileged half of virtual(8) writes mailboxes as their owners.
            vsvc = next((s for s in cfg.services or [] if s.name == "virtual" and s.type == "unix"), None)
            vcfg = cfg.override(vsvc.overrides) if vsvc is not None and vsvc.overrides else cfg
            # On demand, as Postfix's master runs virtual(8): a relay-only
            # system never delivers here and so carries no such process.
            slots.append(Slot("helper", vsvc, vcfg, [], 0, key=("virtual-helper",),
                              on_demand=True))
            # ... and of local(8): it switches to each recipient user per delivery.
            lsvc = next((s for s in cfg.services or [] if s.name == "local" and s.type == "unix"), None)
            lcfg = cfg.override(lsvc.overrides) if lsvc is not None and lsvc.overrides else cfg
            slots.append(Slot("localhelper", lsvc, lcfg, [], 0, key=("local-helper",),
                              on_demand=True))
            if plan.pipe:
                # ... and of pipe(8): commands run as each service's user=.  The
                # helper reads master.cf itself (per-service overrides included).
                slots.append(Slot("pipehelper", None, cfg, [], 0, key=("pipe-helper",),
                                  on_demand=True))
        qsvc = plan.qmgr
        qcfg = cfg.override(qsvc.overrides) if qsvc is not None and qsvc.overrides else cfg
        slots.append(Slot("qmgr", qsvc, qcfg, [], 1, key=("qmgr",)))
        if plan.pickup is not None:
            psvc = plan.pickup
            pcfg = cfg.override(psvc.overrides) if psvc.overrides else cfg
            # A fifo service as in Postfix: the master keeps public/pickup
            # open and forks pickup when sendmail pokes it (_check_maildrop
            # stands in for Postfix's wakeup timer) -- unless a wakeup shorter
            # than max_idle keeps it resident, as it does Postfix's pickup.
            od = pickup_on_demand(psvc, pcfg)
            slots.append(Slot("pickup", psvc, pcfg, [], 0 if od else 1, key=("pickup",),
                              on_demand=od))
        # showq(8) answers mailq for users who cannot read the queue.  Postfix's
        # stock master.cf always has it, so it is offered without an entry too;
        # started on demand (see _listen_on_demand).
        ssvc = plan.showq
        scfg = cfg.override(ssvc.overrides) if ssvc is not None and ssvc.overrides else cfg
        slots.append(Slot("showq", ssvc, scfg, [], 0, key=("showq",), on_demand=True))
        # anvil(8): machine-wide per-client counts for all smtpd workers (Postfix's
        # stock master.cf has it).  On demand, as Postfix's master runs it: the
        # master owns private/anvil and forks anvil when an smtpd first asks about
        # a client outside smtpd_client_event_limit_exceptions, so a quiet system,
        # or one whose clients are all exempt ($mynetworks), carries no such
        # process (issue 8: the tree's memory).  It leaves when no smtpd has been
        # connected for max_idle (at least one anvil_rate_time_unit).
        asvc = next((s for s in cfg.services or [] if s.command == "anvil" and s.type == "unix"), None)
        acfg = cfg.override(asvc.overrides) if asvc is not None and asvc.overrides else cfg
        if asvc is None:   # stock line "anvil unix - - n - 1 anvil" (names it in the log)
            from postwell.config.master import MasterService
            asvc = MasterService("anvil", "unix", True, True, False, "0", 1, "anvil")
        slots.insert(0, Slot("anvil", asvc, acfg, [], 0, key=("anvil",), on_demand=True))
        # verify(8) for reject_unverified_*: on demand, as showq (the master owns
        # private/verify and forks the service when an smtpd or the qmgr connects);
        # offered when master.cf has it, or main.cf asks for it without the line.
        from postwell import verify
        vsvc = next((s for s in cfg.services or [] if s.command == "verify" and s.type == "unix"),
                    None)
        if vsvc is not None or verify.wanted(cfg):
            vcfg = cfg.override(vsvc.overrides) if vsvc is not None and vsvc.overrides else cfg
            if vsvc is None:   # stock line "verify unix - - n - 1 verify"
                from postwell.config.master import MasterService
                vsvc = MasterService("verify", "unix", True, True, False, "0", 1, "verify")
            slots.append(Slot("verify", vsvc, vcfg, [], 0, key=("verify",), on_demand=True))
        from postwell.config.master import daemon_startup_error
        for slot in slots:
            if slot.svc is not None and slot.kind != "pipehelper":
                slot.startup_error = daemon_startup_error(slot.svc)
            if slot.startup_error and slot.kind in ("smtpd", "spawn"):
                # Postfix starts these per connection: the master keeps the
                # listener and the doomed daemon is tried when a client waits.
                slot.nproc = 0
            elif slot.startup_error and slot.kind == "anvil":
                # Postfix's anvil runs only once an smtpd asks it about a client
                # outside smtpd_client_event_limit_exceptions.  A broken one is
                # not started at all and gets no listener: the smtpds fall back
                # to their per-process counts (with a warning each).
                slot.nproc = 0
                slot.on_demand = False
        return slots

    # ------------------------------------------------------------ children
    def _smtpd_preload(self, slot: Slot) -> dict:
        """The smtpd's TLS context, read here as root before any worker is forked.

        Built once per distinct TLS configuration and inherited by every worker, so
        all workers (and the workers started after a reload that did not change the
        TLS settings or files) share one set of session-ticket keys: a client that
        resumes a session may land on any worker.  This is what Postfix's tlsmgr
        provides; Python's ssl module has no call to set ticket keys, but a context
        created before fork() carries the same keys into every child.
        """
        from postwell import smtpd
        key = smtpd.preload_key(slot.config, slot.svc)
        cache = self.__dict__.setdefault("_tls_preloads", {})
        hit = cache.get(key)
        if hit is None:
            hit = cache[key] = smtpd.preload(slot.config, slot.svc)
        return hit

    def _forget_stale_preloads(self) -> None:
        live = {id(s.preloaded) for s in self.slots if s.preloaded is not None}
        cache = self.__dict__.get("_tls_preloads", {})
        for key in [k for k, v in cache.items() if id(v) not in live]:
            del cache[key]

    def _spawn(self, slot: Slot) -> None:
        self.master_pid = os.getpid()
        if slot.kind == "qmgr":
            self._qmgr_started(slot)
        if slot.kind == "smtpd" and slot.preloaded is None and not slot.startup_error:
            slot.preloaded = self._smtpd_preload(slot)
        # What the master allocated since the last freeze (a reloaded
        # configuration, TLS contexts) is shared with this child too: keep the
        # child's collector off it, or its first full pass copies those pages.
        # Collected first (cheap: frozen objects are not walked) so no garbage
        # cycle is kept for good.
        gc.collect()
        gc.freeze()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            code = 1
            try:
                self._child_main(slot)
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException as exc:
                try:
                    from postwell.log import MailLog
                    MailLog.from_config(slot.config, slot.command).fatal(f"{exc!r}")
                except Exception:
                    pass
            finally:
                os._exit(code)
        child = Child(pid, slot, time.monotonic())
        self.children[pid] = child
        slot.children.add(pid)

    def _child_main(self, slot: Slot) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGCHLD,
                    signal.SIGUSR1, signal.SIGPIPE):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)   # reloads are the master's job
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        signal.set_wakeup_fd(-1)
        for fd in (self._pipe_r, self._pipe_w):
            os.close(fd)
        if self._pid_fd is not None:
            os.close(self._pid_fd)
        mine = {s.fileno() for s in slot.sockets}
        for other in self.slots + list(self._retired_slots()):
            for s in other.sockets:
                if s.fileno() not in mine and s.fileno() >= 0:
                    s.close()
        master_pid = self.master_pid   # not getppid(): the master may already be gone
        if slot.startup_error:
            _die_with_master(master_pid)
            self._daemon_dies(slot)
        if slot.kind in HELPER_KINDS:
            # The master's listener (on demand): served until max_idle passes
            # with no qmgr connection open.
            self._adopt_helper_listener(slot)
        if slot.kind == "helper":
            _die_with_master(master_pid)
            from postwell.delivery import helper
            # Stays root by design: it forks per delivery and each child becomes
            # the mailbox owner before opening anything.
            helper.serve(slot.config, self.owner[0], self.owner[1])
            return
        if slot.kind == "localhelper":
            _die_with_master(master_pid)
            from postwell.delivery import local_helper
            # Stays root by design, like local(8): every user operation runs in a
            # forked child that drops to the recipient's uid/gid first.
            local_helper.serve(slot.config, self.owner[0], self.owner[1])
            return
        if slot.kind == "spawn":
            _die_with_master(master_pid)
            # Stays root by design, like spawn(8): each command becomes user= before exec.
            spawn_service.serve(slot.config, slot.svc, slot.sockets, self.owner)
            return
        if slot.kind == "pipehelper":
            _die_with_master(master_pid)
            from postwell.delivery import pipe_helper
            # Stays root by design, like pipe(8): each command runs in a child
            # that becomes the service's user= before exec.
            pipe_helper.serve(slot.config, self.owner[0], self.owner[1])
            return
        # The smtpd's TLS context was built by the master before the fork (see
        # _smtpd_preload): every worker shares its session-ticket keys.
        preloaded = slot.preloaded
        drop_privileges(self.owner)
        # After the uid change: the kernel clears the parent-death signal on it.
        _die_with_master(master_pid)
        if slot.kind == "smtpd":
            from postwell import smtpd
            smtpd.serve(slot.config, slot.svc, slot.sockets, preloaded=preloaded)
        elif slot.kind == "pickup":
            from postwell.pickup import service as pickup
            if slot.on_demand and slot.sockets:
                pickup.serve(slot.config, fifo_fd=slot.sockets[0].fileno(),
                             max_idle=max_idle(slot.config))
            else:
                pickup.serve(slot.config)
        elif slot.kind == "anvil":
            from postwell import anvil
            if slot.on_demand and slot.sockets:
                anvil.serve(slot.config, sock=slot.sockets[0], max_idle=max_idle(slot.config))
            else:
                anvil.serve(slot.config)
        elif slot.kind == "verify":
            from postwell.verify import service as verify_service
            if slot.on_demand and slot.sockets:
                verify_service.serve(slot.config, sock=slot.sockets[0],
                                     max_idle=max_idle(slot.config))
            else:
                verify_service.serve(slot.config)
        elif slot.kind == "showq":
            from postwell import showq
            showq.serve(slot.config, sock=slot.sockets[0], max_idle=max_idle(slot.config))
        else:
            from postwell import qmgr
            if self.owner:
                from postwell.delivery import helper
                helper.HELPER_SOCKET = helper.socket_path(slot.config)
                # The helpers leave max_idle after the qmgr's last link to them
                # closes: links idle for half of that are not worth keeping.
                helper.LINK_IDLE = min(helper.LINK_IDLE, max_idle(slot.config) / 2)
                from postwell.delivery import local_helper
                local_helper.HELPER_SOCKET = local_helper.socket_path(slot.config)
                if any(s.kind == "pipehelper" for s in self.slots):
                    from postwell.delivery import pipe_helper
                    pipe_helper.HELPER_SOCKET = pipe_helper.socket_path(slot.config)
            qmgr.serve(slot.config)

    def _daemon_dies(self, slot) -> None:
        """The daemon's end when its command line is bad: Postfix's daemon logs
        the fatal line under the master's syslog_name and its own program name
        (the service's -o syslog_name is not in effect yet), then msg_fatal()
        waits a second before it exits 1."""
        from postwell.log import MailLog
        try:
            log = MailLog.from_config(self.config, os.path.basename(slot.command))
            log.fatal(slot.startup_error)
            log.close()
        except Exception:   # noqa: BLE001 - the exit status still tells the master
            pass
        time.sleep(FATAL_EXIT_DELAY)
        raise SystemExit(1)

    def _adopt_helper_listener(self, slot) -> None:
        if not (slot.on_demand and slot.sockets):
            return
        from postwell.delivery import helper
        helper.adopt_listener(_on_demand_path(slot), slot.sockets[0], max_idle(slot.config))

    def _listen_on_demand(self, slots, old: dict) -> None:
        """Listen for the on-demand services (showq, the root helpers, pickup's
        FIFO) in the master, reusing a listener of the previous configuration
        with the same name (a reload then loses no waiting client); listeners
        nobody took over are closed."""
        for slot in slots:
            if not slot.on_demand:
                continue
            path = _on_demand_path(slot)
            prev = old.pop(path, None)
            if prev is not None:
                slot.sockets, slot.listen_path, slot.listen_ino = prev.sockets, path, prev.listen_ino
                prev.listen_path = None   # the name now belongs to the new slot
                if slot.kind in HELPER_KINDS and self.owner:
                    try:   # mail_owner may have changed with the reload
                        os.chown(path, self.owner[0], self.owner[1])
                    except OSError:
                        pass
                continue
            try:
                sock, ino = self._on_demand_listen(slot, path)
            except OSError as exc:
                name = slot.svc.name if slot.svc is not None else slot.command
                if slot.kind == "showq":
                    # Not fatal: only mailq for unprivileged users is missing.
                    self.log.warning(f"{path}: {exc.strerror or exc}; service {name} is not available")
                    continue
                # Mail depends on these: the child then listens by itself, as
                # before on-demand start-up existed.
                self.log.warning(f"{path}: {exc.strerror or exc}; service {name} "
                                 "runs without the master's listener")
                slot.on_demand, slot.nproc = False, 1
                continue
            slot.sockets, slot.listen_path, slot.listen_ino = [sock], path, ino
        for prev in old.values():
            self._close_listener(prev)
            for s in prev.sockets:
                s.close()

    def _on_demand_listen(self, slot, path):
        if slot.kind == "showq":
            from postwell import showq
            sock, ino = showq.listen(path)
        elif slot.kind == "pickup":
            return _open_pickup_fifo(slot.config, self.owner, self.log)
        elif slot.kind in ("verify", "anvil"):
            # Owned by mail_owner, mode 0600: the smtpd and the qmgr connect as that user.
            from postwell.delivery import helper
            owner = self.owner or (None, None)
            sock, ino = helper.listen(path, owner[0], owner[1], backlog=256)
        else:
            from postwell.delivery import helper
            owner = self.owner or (None, None)
            sock, ino = helper.listen(path, owner[0], owner[1])
        sock.setblocking(False)
        return sock, ino

    def _close_listener(self, slot) -> None:
        """Remove an on-demand service's name, unless something else replaced it."""
        path, slot.listen_path = slot.listen_path, None
        if path is None or slot.kind == "pickup":
            return     # public/pickup stays: sendmail pokes it even while we are down
        if slot.kind == "showq" and self.stopping:
            # Postfix's master leaves public/showq when it stops: while it is
            # down, postqueue/mailq find a socket nobody listens on and say
            # "Connection refused" (not "No such file or directory"); the next
            # start binds over it (showq.listen).
            return
        try:
            if os.stat(path).st_ino == slot.listen_ino:
                os.unlink(path)
        except OSError:
            pass

    def _check_maildrop(self) -> None:
        """Postfix's master wakes pickup every `wakeup` seconds; here the
        master itself looks into maildrop/ that often (and whenever a pickup
        has exited) and starts pickup only when a file waits there, so a
        lost poke costs at most one interval and an idle system no process."""
        now = time.monotonic()
        if now < self._maildrop_due or self.stopping:
            return
        slot = next((s for s in self.slots if s.kind == "pickup" and s.on_demand), None)
        if slot is None:
            self._maildrop_due = now + 60.0
            return
        from postwell.pickup.service import _wakeup_interval
        self._maildrop_due = now + _wakeup_interval(slot.config)
        slot.blocked_by = {p for p in slot.blocked_by if p in self.children}
        if slot.children or slot.blocked_by or slot.throttled_until > now:
            return     # running, or a look again when it exits (_reap)
        if maildrop_waiting(slot.config.get("queue_directory")):
            self._spawn(slot)

    def _on_demand_watch(self) -> dict:
        """fd -> slot for the on-demand listeners whose service has no process
        now; a running child accepts by itself, a throttled service waits."""
        if self.stopping:
            return {}
        now = time.monotonic()
        out = {}
        for slot in self.slots:
            watched = slot.on_demand or (slot.startup_error and slot.nproc == 0)
            if watched and not slot.children and slot.throttled_until <= now:
                # After a reload the old pickup must exit first (one file, one queue id).
                slot.blocked_by = {p for p in slot.blocked_by if p in self.children}
                if slot.blocked_by:
                    continue
                for s in slot.sockets:
                    if s.fileno() >= 0:
                        out[s.fileno()] = slot
            elif (slot.kind == "qmgr" and self._qmgr_waiting and self._qmgr_fifo is not None
                  and not slot.children and self._qmgr_fifo.fileno() >= 0):
                slot.blocked_by = {p for p in slot.blocked_by if p in self.children}
                if not slot.blocked_by:
                    out[self._qmgr_fifo.fileno()] = slot
        return out

    def _retired_slots(self):
        return {c.slot for c in self.children.values() if c.retired and c.slot not in self.slots}

    def _start_missing(self) -> None:
        if self.stopping:
            return
        now = time.monotonic()
        due = []
        for slot in self.slots:
            if slot.throttled_until > now:
                continue
            slot.blocked_by = {p for p in slot.blocked_by if p in self.children}
            if slot.blocked_by:
                continue
            if len(slot.children) < slot.nproc:
                due.append(slot)
        # Everything the master builds for its children (the smtpd's TLS
        # context) is built before the first fork: a page the master writes
        # after a fork is copied, and the earlier children's view of it stops
        # being shared with the later ones.
        for slot in due:
            if slot.kind == "smtpd" and slot.preloaded is None:
                slot.preloaded = self._smtpd_preload(slot)
        for slot in due:
            while len(slot.children) < slot.nproc:
                self._spawn(slot)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            child = self.children.pop(pid, None)
            if child is None:
                continue
            child.slot.children.discard(pid)
            if child.slot.kind == "pickup" and os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
                # A file dropped as it left (or after a reload's old pickup
                # stopped mid-scan) is not left for a whole wakeup interval.
                # (One that crashed is tried again at the next interval or poke.)
                self._maildrop_due = 0.0
            if self.stopping or child.retired:
                continue
            path = f"{self.config.get('daemon_directory') or '/usr/lib/postfix/sbin'}/{child.slot.command}"
            if os.WIFSIGNALED(status):
                self.log.warning(f"process {path} pid {pid} killed by signal {os.WTERMSIG(status)}")
                bad = True
            else:
                code = os.WEXITSTATUS(status)
                bad = code != 0
                if bad:
                    self.log.warning(f"process {path} pid {pid} exit status {code}")
            if bad and (child.slot.startup_error
                        or time.monotonic() - child.started < BAD_STARTUP_SECONDS):
                # Postfix: a service that keeps dying at start-up is throttled,
                # so a crash loop costs one fork per service_throttle_time.
                self.log.warning(f"{path}: bad command startup -- throttling")
                child.slot.throttled_until = time.monotonic() + self.config.get_time("service_throttle_time")
            elif bad and child.slot.kind == "qmgr":
                self._qmgr_wait_for_trigger(child.slot)

    # A qmgr that died (its fatal "timeout connecting to transport", a crash):
    # Postfix's master starts the next one only when the qmgr service is
    # triggered -- a poke of public/qmgr (new mail, a flush) or the service's
    # own wakeup timer (master.cf, 300 s in the stock line) -- not at once.
    # Meanwhile the master holds that FIFO open: pokes are kept in it for the
    # next qmgr, and the first one starts it.  Mail waits in its queue.
    _qmgr_fifo = None           # _Fifo of public/qmgr once a qmgr has died
    _qmgr_waiting = False       # a dead qmgr waits for a trigger
    _qmgr_epoch: float | None = None   # the wakeup timer's phase: the first qmgr start

    def _qmgr_wait_for_trigger(self, slot) -> None:
        now = time.monotonic()
        wake = _qmgr_wakeup(slot.svc)
        epoch = self._qmgr_epoch if self._qmgr_epoch is not None else now
        until = epoch + (int((now - epoch) // wake) + 1) * wake if wake > 0 else float("inf")
        slot.throttled_until = max(slot.throttled_until, until)
        self._qmgr_waiting = True
        self._qmgr_hold_fifo(slot)

    def _qmgr_hold_fifo(self, slot) -> None:
        """Hold public/qmgr open (never read here) from the first qmgr on, so a
        poke made while a dying qmgr no longer reads (its last deliveries) is
        still there when it has gone: it starts the next one at once."""
        if self._qmgr_fifo is not None:
            return
        path = os.path.join(slot.config.get("queue_directory"), "public", "qmgr")
        try:
            fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return      # not made yet (the qmgr makes it): the next death tries again
        try:
            if stat.S_ISFIFO(os.fstat(fd).st_mode):
                self._qmgr_fifo = _Fifo(fd)
                return
        except OSError:
            pass
        os.close(fd)

    def _qmgr_started(self, slot) -> None:
        if self._qmgr_epoch is None:
            self._qmgr_epoch = time.monotonic()
        self._qmgr_hold_fifo(slot)
        if self._qmgr_waiting:
            # Started by its trigger or its timer: a later death waits anew.
            self._qmgr_waiting = False
            slot.throttled_until = 0.0

    # ------------------------------------------------------------ main loop
    def _loop(self) -> None:
        deadline = None
        while True:
            timeout = 1.0
            if deadline is not None:
                timeout = max(0.0, min(timeout, deadline - time.monotonic()))
            demand = self._on_demand_watch()
            try:
                ready, _, _ = select.select([self._pipe_r, *demand], [], [], timeout)
            except InterruptedError:
                ready = []
            sigs = b""
            if self._pipe_r in ready:
                try:
                    sigs = os.read(self._pipe_r, 512)
                except BlockingIOError:
                    pass
            for signum in sigs:
                if signum in (signal.SIGTERM, signal.SIGINT) and not self.stopping:
                    self.log.info(f"terminating on signal {signum}")
                    self.stopping = True
                    deadline = time.monotonic() + STOP_DRAIN_SECONDS
                    self._signal_children(signal.SIGTERM)
                    for slot in self.slots:
                        if slot.on_demand:
                            self._close_listener(slot)
                        for s in slot.sockets:
                            s.close()
                elif signum == signal.SIGQUIT:
                    self.log.info(f"terminating on signal {signum}")
                    self.stopping = True
                    self._signal_children(signal.SIGKILL)
                    deadline = time.monotonic() + 5
                elif signum == signal.SIGHUP and not self.stopping:
                    self._reload()
                elif signum == signal.SIGUSR1:
                    self._flush()
            self._reap()
            if not self.stopping:
                for fd in ready:
                    slot = demand.get(fd)
                    if slot is not None and slot in self.slots and not slot.children:
                        self._spawn(slot)   # a client waits in the backlog; the child accepts it
            if self.stopping:
                if not self.children:
                    return
                if deadline is not None and time.monotonic() >= deadline:
                    self._signal_children(signal.SIGKILL)
                    deadline = time.monotonic() + 5
                continue
            self._start_missing()
            self._check_maildrop()

    def _signal_children(self, sig) -> None:
        for pid in list(self.children):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def _flush(self) -> None:
        for c in self.children.values():
            if c.slot.kind == "qmgr" and not c.retired:
                try:
                    os.kill(c.pid, signal.SIGUSR1)
                except ProcessLookupError:
                    pass
        if self._qmgr_waiting and self._qmgr_fifo is not None:
            # A dead qmgr: the flush request (postqueue -f's "F") starts the next
            # one, which reads it, as Postfix's trigger would.
            try:
                os.write(self._qmgr_fifo.fileno(), b"F")
            except OSError:
                pass

    def _reload(self) -> None:
        """SIGHUP.  As Postfix's master: "reload" is logged, then the files are
        read again; what would stop a start (an unclosed '{' in master.cf, a bad
        inet address, a port that cannot be bound) ends the master with a fatal
        error (MasterError out of the loop), while a malformed -o only ends that
        service's daemon when it is started."""
        self.log.info(f"reload -- version {self.config.get('mail_version')}, "
                      f"configuration {self.config.config_dir}")
        cfg = load(self.config_dir)
        owner = mail_owner_ids(cfg)
        if self._interfaces is not None and cfg.get("inet_interfaces") != self._interfaces:
            # As Postfix's master: listeners stay on the addresses it started with.
            for svc in cfg.services or []:
                if svc.type == "inet":
                    self.log.warning(f"service {svc.name}: ignoring inet_interfaces change")
                    self.log.warning("to change inet_interfaces, stop and start Postfix")
        self._drop_duplicate_services(cfg)
        old_sockets = {s.key: s.sockets for s in self.slots if s.kind in ("smtpd", "spawn")}
        old_listeners = {s.listen_path: s for s in self.slots if s.on_demand and s.sockets}
        self._release_unwanted_listeners(cfg, old_sockets)
        new_slots = self._make_slots(cfg, old_sockets, warn=True, busy_wait=2.0)
        # A throttled service stays throttled across the reload, as in Postfix
        # (a broken daemon is not retried at once for the client still waiting).
        throttled = {(s.kind, s.key): s.throttled_until for s in self.slots}
        for slot in new_slots:
            slot.throttled_until = throttled.get((slot.kind, slot.key), 0.0)
        self.config, self.owner = cfg, owner
        try:
            from postwell.log import MailLog
            # A maillog rotated away meanwhile is created again here, as root: hand
            # it to mail_owner as at start, or the children could not append.
            _prepare_logfile(cfg, owner)
            new_log = MailLog.from_config(cfg, "master", also_stderr=self.log_stderr)
            self.log.close()
            self.log = new_log
        except OSError as exc:
            self.log.warning(f"open logfile {cfg.get('maillog_file')}: {exc.strerror}")
        old_qmgr = set()
        old_pickup = set()
        for slot in self.slots:
            for pid in slot.children:
                child = self.children.get(pid)
                if child:
                    child.retired = True
                    if slot.kind == "qmgr":
                        old_qmgr.add(pid)
                    elif slot.kind == "pickup":
                        old_pickup.add(pid)
                    try:
                        os.kill(pid, signal.SIGTERM)   # drain: sessions in progress finish
                    except ProcessLookupError:
                        pass
        # Listeners no new service wants are closed here; draining children keep their copies.
        for socks in old_sockets.values():
            for s in socks:
                s.close()
        for slot in new_slots:
            if slot.kind == "qmgr":
                # Two queue managers must never deliver the same file: wait for the old one.
                slot.blocked_by = old_qmgr
            elif slot.kind == "pickup":
                # Nor two pickups queue the same maildrop file twice.
                slot.blocked_by = old_pickup
        self._listen_on_demand(new_slots, old_listeners)
        self.slots = new_slots
        preload_for_config(cfg)
        self._start_missing()
        self._forget_stale_preloads()

    def _cleanup(self) -> None:
        for slot in self.slots:
            if slot.on_demand:
                self._close_listener(slot)
            for s in slot.sockets:
                try:
                    s.close()
                except OSError:
                    pass
        if self._pid_fd is not None:
            try:
                os.unlink(self._pid_file)
            except OSError:
                pass
            os.close(self._pid_fd)
            self._pid_fd = None
        try:
            signal.set_wakeup_fd(-1)
        except ValueError:
            pass


HELPER_KINDS = ("helper", "localhelper", "pipehelper")


def _bind_waiting(bind, wait: float):
    """bind(), retried for up to `wait` seconds while the address is in use."""
    deadline = time.monotonic() + wait
    while True:
        try:
            return bind()
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE or time.monotonic() >= deadline:
                raise
        time.sleep(0.05)


def postlog_entry_line(config_dir: str) -> int | None:
    """Line of master.cf's postlog service (unix-dgram, postlogd), if any."""
    from postwell.config.master import parse_master_cf
    path = os.path.join(config_dir, "master.cf")
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            services = parse_master_cf(f.read(), path, None, strict=False)
    except Exception:   # noqa: BLE001 - unreadable: no postlog entry known
        return None
    return next((s.line for s in services
                 if s.type == "unix-dgram" and os.path.basename(s.command) == "postlogd"), None)


def _syslog_fatal(config, text: str) -> None:
    """A fatal line of the master through syslog (Postfix's master says why it
    could not start, or died at a reload, there, not in maillog_file)."""
    from postwell.log import MailLog
    try:
        name = (config.get("syslog_name") if config is not None else "") or "postfix"
        facility = (config.get("syslog_facility") if config is not None else "") or "mail"
        log = MailLog("master", syslog_name=name, syslog_facility=facility)
        log.fatal(text)
        log.close()
    except Exception:   # noqa: BLE001 - nothing left to tell
        pass


def max_idle(config) -> float:
    """An on-demand child's max_idle (Postfix's default when unreadable)."""
    try:
        idle = config.get_time("max_idle")
    except Exception:   # noqa: BLE001 - a bad value: Postfix's default
        idle = 100.0
    return max(1.0, idle)


def _qmgr_wakeup(svc) -> float:
    """The qmgr service's master.cf wakeup time (300 when there is no line,
    as the stock one); 0: none, only a trigger starts it."""
    raw = str(getattr(svc, "wakeup", None) or "300") if svc is not None else "300"
    try:
        return max(0.0, float(raw.rstrip("?").replace("-", "0") or 0))
    except ValueError:
        return 300.0


def pickup_on_demand(svc, config) -> bool:
    """Postfix's master wakes pickup every `wakeup` seconds (master.cf, 60 in
    the stock line), and a wakeup shorter than max_idle keeps it running for
    good; without one (`-`/0) or with a longer one it leaves after max_idle
    and the next poke starts it again.  postwell does the same: on demand only
    then, since the first message after a quiet spell waits for a fork and
    pickup's start-up (milliseconds of CPU, far more on a loaded machine)."""
    try:
        wake = float(str(getattr(svc, "wakeup", None) or 0).rstrip("?") or 0)
    except ValueError:
        wake = 0.0
    return not 0 < wake < max_idle(config)


def _on_demand_path(slot) -> str:
    qdir = slot.config.get("queue_directory")
    if slot.kind == "showq":
        from postwell import showq
        return showq.socket_path(slot.config)
    if slot.kind == "pickup":
        return os.path.join(qdir, "public", "pickup")
    if slot.kind == "verify":
        from postwell import verify
        return verify.socket_path(slot.config)
    if slot.kind == "anvil":
        from postwell import anvil
        return anvil.socket_path(slot.config)
    from postwell.delivery import helper, local_helper, pipe_helper
    module = {"helper": helper, "localhelper": local_helper, "pipehelper": pipe_helper}[slot.kind]
    return module.socket_path(slot.config)


class _Fifo:
    """pickup's FIFO held open by the master, looking like a listening
    socket to the loop (fileno, close)."""

    def __init__(self, fd: int):
        self.fd = fd

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass


def _open_pickup_fifo(config, owner, log):
    """Make public/pickup (and maildrop/) as pickup would, owned by mail_owner
    (Postfix's 0622 postfix-owned FIFO), and keep it open: O_RDWR so it never
    reads as EOF and a poke never fails for lack of a reader, O_NONBLOCK
    (shared with the pickup child, which drains it)."""
    from postwell.pickup.service import prepare_public
    path = prepare_public(config.get("queue_directory"), log)
    if owner:
        os.chown(path, owner[0], owner[1])
    fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISFIFO(st.st_mode):
            raise OSError(errno.EINVAL, "not a FIFO")
    except OSError:
        os.close(fd)
        raise
    return _Fifo(fd), st.st_ino


def maildrop_waiting(queue_directory: str) -> bool:
    """Whether maildrop/ holds a complete file (sendmail's temporaries start with a dot)."""
    try:
        with os.scandir(os.path.join(queue_directory, "maildrop")) as it:
            for entry in it:
                if not entry.name.startswith("."):
                    return True
    except OSError:
        pass
    return False


# Standard modules the children import lazily.  A child runs as mail_owner and
# may not be able to read the interpreter's library (e.g. a Python installed in
# a private home directory), so the master imports them before forking.
# Only what some child can use: every page imported here is in the tree's PSS
# once (shared by all children), so nothing goes in "just in case"
# (concurrent.futures.process alone brings multiprocessing, about 1 MiB;
# uuid and mimetypes are used by no part; no part builds or formats MIME
# messages with the email package: email.policy, .generator, .mime.*, and
# secrets, gettext, dbm, shlex, glob were another 0.75 MiB).  Codecs
# (encodings.*) and concurrent.futures.thread load by name at run time, out
# of reach of tests/test_memory9.py's scan of function-level imports.
_PRELOAD_STDLIB = (
    "asyncio", "concurrent.futures", "email", "email.utils", "email.parser",
    "email.message", "email.header", "ssl", "json", "hashlib", "hmac",
    "base64", "binascii", "ipaddress", "encodings.idna", "encodings.utf_8", "encodings.ascii",
    "encodings.latin_1", "stringprep", "unicodedata", "random", "socket", "selectors",
    "fcntl", "struct", "zlib", "datetime", "calendar", "locale", "sqlite3",
    "textwrap", "urllib.parse", "quopri", "syslog", "pwd", "grp", "resource",
    "concurrent.futures.thread", "queue", "threading", "logging",
    "traceback", "linecache", "tokenize", "email.feedparser", "email.charset",
    "email.base64mime", "email.quoprimime", "email.encoders", "email.iterators",
    "dns.resolver", "dns.asyncresolver",
    "lmdb", "berkeleydb", "uvloop", "signal", "errno", "stat", "tempfile", "fnmatch", "re",
)

# Imported by an smtpd only to check a SASL password stored as an argon2 or
# bcrypt hash (sasl/passwords.py): preloaded when some smtpd offers AUTH.
_PRELOAD_SASL = ("argon2", "argon2.exceptions", "bcrypt")


def preload_for_config(cfg) -> None:
    """What this configuration's children may import beyond preload_modules()
    (called at start and at every reload, before forking)."""
    import importlib
    if not sasl_offered(cfg):
        return
    for name in _PRELOAD_SASL:
        try:
            importlib.import_module(name)
        except Exception:   # noqa: BLE001 - not installed: the scheme says so when used
            pass


def sasl_offered(cfg) -> bool:
    """Whether some smtpd service has smtpd_sasl_auth_enable on (main.cf, or
    the service's -o); main.cf alone when master.cf names no smtpd."""
    def enabled(c) -> bool:
        try:
            return c.get_bool("smtpd_sasl_auth_enable")
        except Exception:   # noqa: BLE001 - a bad value: the smtpd reports it
            return False
    smtpds = [svc for svc in cfg.services or [] if svc.command == "smtpd"]
    if not smtpds:
        return enabled(cfg)
    for svc in smtpds:
        try:
            if enabled(cfg.override(svc.overrides) if svc.overrides else cfg):
                return True
        except Exception:   # noqa: BLE001 - its smtpd will not start either
            continue
    return False


def unimplemented_parameter_names(cfg) -> list[str]:
    """Parameters set in main.cf/master.cf that postwell ignores, minus the
    harmless ones.  Every delivery agent module is imported first: agents
    register what they honour when their module loads."""
    try:
        from postwell.config.registry import unimplemented_parameters
    except ImportError:
        return []
    import importlib
    try:
        from postwell.delivery import AGENTS
    except ImportError:
        AGENTS = {}
    for target in set(AGENTS.values()):
        try:
            importlib.import_module(target.partition(":")[0])
        except Exception:
            pass
    try:
        names = unimplemented_parameters(cfg)
    except Exception:
        return []
    out = []
    for name in names:
        if name in QUIET_PARAMETERS:
            continue
        quiet = QUIET_VALUES.get(name)
        if quiet is not None:
            try:
                if cfg.get(name).strip().lower() in quiet:
                    continue
            except Exception:
                pass
        out.append(name)
    return out


def preload_modules() -> None:
    import importlib
    import pkgutil
    for name in _PRELOAD_STDLIB:
        try:
            importlib.import_module(name)
        except Exception:
            pass
    import postwell
    for info in pkgutil.walk_packages(postwell.__path__, "postwell."):
        if info.name.startswith(("postwell.cli", "postwell.demo")) or ".tests" in info.name:
            continue
        try:
            importlib.import_module(info.name)
        except Exception:
            pass   # a part that does not import simply is not used
    # Everything imported so far is shared by the forked children: keep the collector
    # from touching (and so copying) those pages in each child.
    import gc
    gc.collect()
    gc.freeze()
    # Compiling a module whose .pyc is missing or stale (PYTHONDONTWRITEBYTECODE,
    # an unwritable tree) leaves megabytes of freed parse trees in the heap;
    # every child would inherit them as resident pages.
    release_free_heap()


# glibc mallopt(3) parameter number (malloc.h).
_M_ARENA_MAX = -8
# Arenas per process.  glibc gives every thread that allocates its own arena
# (up to 8 per core), each with its own resident pages; Python threads allocate
# while holding the GIL, so they gain nothing from the extra arenas.
MALLOC_ARENAS = 2


def _libc():
    import ctypes
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> bool:
    """Cap glibc's malloc arenas in this process and in the children it forks
    (MALLOC_ARENA_MAX in the environment wins: glibc read it at start).
    False where there is no glibc mallopt."""
    if os.environ.get("MALLOC_ARENA_MAX"):
        return False
    libc = _libc()
    fn = getattr(libc, "mallopt", None)
    if fn is None:
        return False
    try:
        return fn(_M_ARENA_MAX, arenas) == 1
    except Exception:   # noqa: BLE001 - an optimisation only
        return False


def release_free_heap() -> bool:
    """Give the heap's free pages back to the kernel (glibc malloc_trim(3))."""
    libc = _libc()
    fn = getattr(libc, "malloc_trim", None)
    if fn is None:
        return False
    try:
        fn(0)
    except Exception:   # noqa: BLE001 - an optimisation only
        return False
    return True


def _die_with_master(master_pid: int) -> None:
    """A child must not outlive a killed master (it would keep the listening
    sockets and make the next start fail): ask for SIGTERM when the parent dies
    (Linux PR_SET_PDEATHSIG), then make sure it has not died already."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)   # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != master_pid:
        raise SystemExit(0)


def drop_privileges(owner) -> None:
    """As root: become mail_owner for good (groups first, then gid, then uid)."""
    if owner is None:
        if os.geteuid() == 0:
            raise SystemExit("refusing to run a child process as root")
        return
    uid, gid, _ = owner
    os.setgroups([gid])
    os.setgid(gid)
    os.setuid(uid)
    if os.geteuid() == 0 or os.getuid() == 0:
        raise SystemExit("failed to drop root privileges")
