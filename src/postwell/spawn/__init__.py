"""spawn(8): run an external command for each connection to a master.cf service.

The Postfix equivalent of inetd, classically used to run a policy server:

    policyd-spf  unix  -  n  n  -  0  spawn  user=policyd-spf argv=/usr/bin/policyd-spf

The master binds the service's socket ($queue_directory/private/NAME, or
public/NAME when the private column says n; HOST:PORT for inet) and starts one
supervisor per spawn service (this module's ``serve``).  The supervisor stays
root, like pipe(8): for every accepted connection it starts the command with
standard input, output and error connected to the client socket, as the
user= account (its uid, that user's or the named group's gid, no
supplementary groups), in a session of its own, in $queue_directory, with the
environment Postfix gives external commands (export_environment, PATH reset),
and kills the session when ${NAME}_time_limit (default $command_time_limit)
runs out.

The service's process limit (maxproc) bounds how many commands run at once;
further clients wait in the listen queue, as they wait for a free spawn
process in Postfix.  maxproc 0 means no limit.

Messages follow Postfix 3.7's spawn(8) word for word (checked against a
running Postfix): "command X exit status N", "command X killed by signal N",
"X: process id N: command time limit exceeded", and the fatal attribute
errors ("missing user= attribute", "request to deliver as root", ...).
"""

from __future__ import annotations

import errno
import grp
import os
import pwd
import select
import signal
import socket
import stat
import subprocess
import time
from dataclasses import dataclass

try:  # the start-up warning must not call these ignored
    from postwell.config.registry import register_implemented as _register
except ImportError:  # pragma: no cover
    def _register(*names):
        pass
_register("command_time_limit", "*_time_limit", "export_environment", "import_environment",
          "default_process_limit", "service_throttle_time")

DEFAULT_PATH = "/usr/bin:/bin"      # Postfix resets PATH to _PATH_DEFPATH for commands
SOCKET_MODE = 0o666                 # as Postfix's master: the directory mode guards private/
# On stop/reload the commands in progress may finish their conversation (their
# clients, smtpd workers, are draining too), but the master SIGKILLs a child
# after its own 60s drain: the rest is cut short before that, so no command
# outlives the service as an orphan.
DRAIN_SECONDS = 50.0
STOP_GRACE_SECONDS = 5.0            # after SIGTERM, before SIGKILL
UNLIMITED = 1 << 30


class SpawnConfigError(Exception):
    """An attribute problem; the text is what Postfix's spawn logs after "fatal: "."""


@dataclass
class SpawnAttributes:
    user: str
    uid: int
    gid: int
    argv: list


def _strip_daemon_options(args: list) -> list:
    """Generic daemon options (-o name=value, -v, ...) come before the attributes."""
    i = 0
    while i < len(args) and args[i].startswith("-"):
        i += 2 if args[i] in ("-o", "-t") else 1
    return list(args[i:])


def parse_attributes(args: list, *, mail_owner: str | None = None,
                     getpwnam=pwd.getpwnam, getgrnam=grp.getgrnam) -> SpawnAttributes:
    """The user= and argv= attributes of a spawn service.

    ``mail_owner``: the account a command must never run as (checked when
    given: only a root master can run commands as another user at all)."""
    user = None
    uid = gid = -1
    argv = None
    words = _strip_daemon_options(args)
    for k, word in enumerate(words):
        if word.startswith("user="):
            user, _, group = word[5:].partition(":")
            try:
                pw = getpwnam(user)
            except KeyError:
                raise SpawnConfigError(f"unknown user name: {user}") from None
            uid, gid = pw.pw_uid, pw.pw_gid
            if group:
                try:
                    gid = getgrnam(group).gr_gid
                except KeyError:
                    raise SpawnConfigError(f"unknown group name: {group}") from None
        elif word.startswith("argv="):
            # The last attribute: every word after it belongs to the command, unexpanded.
            argv = [word[5:], *words[k + 1:]]
            break
        else:
            raise SpawnConfigError(f"unknown attribute name: {word}")
    if user is None:
        raise SpawnConfigError("missing user= attribute")
    if argv is None or not argv[0]:
        raise SpawnConfigError("missing argv= attribute")
    if uid == 0:
        raise SpawnConfigError("request to deliver as root")
    owner = None
    if mail_owner:
        try:
            owner = getpwnam(mail_owner)
        except KeyError:
            owner = None
    if owner is not None and uid == owner.pw_uid:
        raise SpawnConfigError("request to deliver as mail system owner")
    if gid == 0:
        raise SpawnConfigError("request to use privileged group id 0")
    if owner is not None and gid == owner.pw_gid:
        raise SpawnConfigError(f"request to use mail system owner group id {gid}")
    return SpawnAttributes(user=user, uid=uid, gid=gid, argv=argv)


def service_check(svc) -> str | None:
    """Postfix's spawn refuses to run in an unprivileged (unpriv=y) service."""
    if getattr(svc, "unpriv", False):
        return f"service {svc.name} requires privileged operation"
    return None


def socket_path(config, svc) -> str:
    """Where a unix-domain spawn service listens (master(5): private/ or public/)."""
    if svc.name.startswith("/"):
        return svc.name
    sub = "private" if svc.private else "public"
    return os.path.join(config.get("queue_directory"), sub, svc.name)


def bind_unix(path: str, owner: tuple | None, backlog: int = 100) -> socket.socket:
    """Listen on ``path``; a stale socket left by an earlier master is replaced
    (the pid-file lock guarantees no other master owns it)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(errno.EADDRINUSE, f"bind {path}: {os.strerror(errno.EADDRINUSE)}")
        os.unlink(path)
    os.makedirs(os.path.dirname(path), 0o755, exist_ok=True)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.bind(path)
        os.chmod(path, SOCKET_MODE)
        if owner:
            os.chown(path, owner[0], owner[1])
        s.listen(backlog)
    except OSError as exc:
        s.close()
        raise OSError(exc.errno, f"bind {path}: {exc.strerror}") from None
    s.set_inheritable(True)
    return s


def bind(svc, config, owner: tuple | None) -> list[socket.socket]:
    """The listening sockets of one spawn service (unix or inet)."""
    if svc.type == "inet":
        from postwell.master import services as sv
        return sv.bind_service(svc, config)
    return [bind_unix(socket_path(config, svc), owner)]


def bind_key(svc, config) -> tuple:
    """What identifies the listener across reloads (same key: keep the socket)."""
    if svc.type == "inet":
        from postwell.master import services as sv
        return ("spawn", "inet") + sv.bind_key(svc, config)
    return ("spawn", "unix", socket_path(config, svc))


def time_limit(config, name: str) -> float:
    """${name}_time_limit, else $command_time_limit (spawn(8))."""
    per = f"{name}_time_limit"
    try:
        if config.raw(per) is not None:
            return float(config.get_time(per))
    except (ValueError, KeyError):
        pass
    try:
        return float(config.get_time("command_time_limit"))
    except (ValueError, KeyError):
        return 1000.0


def process_limit(svc, config) -> int:
    """maxproc: "-" is $default_process_limit, 0 is no limit."""
    limit = svc.maxproc
    if limit is None:
        try:
            limit = config.get_int("default_process_limit")
        except (ValueError, KeyError):
            limit = 100
    return UNLIMITED if limit <= 0 else limit


def command_environment(config, environ=None) -> dict:
    """What the command sees: Postfix's master keeps only import_environment
    (name or name=value), and external commands get export_environment of
    that plus PATH reset to the system default."""
    environ = os.environ if environ is None else environ
    imported: dict = {}
    for item in config.get_list("import_environment"):
        name, eq, value = item.partition("=")
        if eq:
            imported[name] = value
        elif name in environ:
            imported[name] = environ[name]
    # postfix(1) always hands the master its configuration directory.
    imported.setdefault("MAIL_CONFIG", str(getattr(config, "config_dir", "") or "/etc/postfix"))
    env = {}
    for item in config.get_list("export_environment"):
        name, eq, value = item.partition("=")
        if eq:
            env[name] = value
        elif name in imported:
            env[name] = imported[name]
    env["PATH"] = DEFAULT_PATH
    return env


@dataclass(eq=False)
class _Running:
    proc: subprocess.Popen
    deadline: float
    timed_out: bool = False
    stopped: bool = False       # killed by our own shutdown: not worth a warning


class SpawnServer:
    """One spawn service: accept, start a command per connection, reap, enforce limits."""

    def __init__(self, config, svc, sockets, *, log, clock=time.monotonic, euid=os.geteuid,
                 environ=None):
        self.config = config
        self.svc = svc
        self.sockets = list(sockets)
        self.log = log
        self.clock = clock
        self.root = euid() == 0
        self.limit = process_limit(svc, config)
        self.time_limit = time_limit(config, svc.name)
        self.env = command_environment(config, environ)
        self.cwd = config.get("queue_directory") or "/"
        self.running: list[_Running] = []
        self.throttled_until = 0.0
        self.throttle = 60.0
        try:
            self.throttle = float(config.get_time("service_throttle_time"))
        except (ValueError, KeyError):
            pass
        self.stopping = False
        self.error = service_check(svc)
        self.attrs = None
        if self.error is None:
            try:
                owner_name = config.get("mail_owner") if self.root else None
                self.attrs = parse_attributes(svc.args, mail_owner=owner_name)
            except SpawnConfigError as exc:
                self.error = str(exc)
        if self.attrs is not None and not self.root:
            # The demo: no root, so no user switch; say so once instead of failing.
            me = pwd.getpwuid(os.getuid()).pw_name
            self.log.warning(f"service {svc.name}: not running as root: command "
                             f"{self.attrs.argv[0]} runs as user {me}, not as {self.attrs.user}")
        for s in self.sockets:
            s.setblocking(False)

    # -- one connection
    def start_command(self, conn: socket.socket) -> None:
        a = self.attrs
        kw = {}
        if self.root:
            kw = {"user": a.uid, "group": a.gid, "extra_groups": [a.gid]}   # as Postfix's set_ugid()
        try:
            conn.setblocking(True)
            proc = subprocess.Popen(
                a.argv, stdin=conn.fileno(), stdout=conn.fileno(), stderr=conn.fileno(),
                env=self.env, cwd=self.cwd, close_fds=True,
                # Own session: the time limit kills the command and whatever it started.
                start_new_session=True, restore_signals=True, **kw)
        except OSError as exc:
            # Postfix's child logs this (its wording, typo included) and exits 1.
            self.log.fatal(f"spawn_comand: execvp {a.argv[0]}: {exc.strerror or exc}")
            self.log.warning(f"command {a.argv[0]} exit status 1")
            return
        finally:
            conn.close()
        self.running.append(_Running(proc, self.clock() + self.time_limit))

    def accept_ready(self, ready) -> None:
        for s in ready:
            while len(self.running) < self.limit and not self.stopping:
                try:
                    conn, _ = s.accept()
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as exc:
                    if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                        continue
                    if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                        # The connection stays queued; pause instead of spinning on it.
                        self.log.warning(f"accept connection: {exc.strerror}")
                        self.throttled_until = self.clock() + 1.0
                        return
                    raise
                if self.error is not None:
                    # Postfix's spawn process dies with this and the master throttles it.
                    self.log.fatal(self.error)
                    conn.close()
                    self.throttled_until = self.clock() + self.throttle
                    return
                self.start_command(conn)

    def reap(self) -> None:
        now = self.clock()
        still = []
        for r in self.running:
            code = r.proc.poll()
            if code is None:
                if now >= r.deadline and not r.timed_out:
                    self.log.warning(f"{self.attrs.argv[0]}: process id {r.proc.pid}: "
                                     "command time limit exceeded")
                    r.timed_out = True
                    _kill_session(r.proc.pid, signal.SIGKILL)
                still.append(r)
                continue
            if r.timed_out or r.stopped:
                continue     # Postfix reports the time limit only
            if code < 0:
                self.log.warning(f"command {self.attrs.argv[0]} killed by signal {-code}")
            elif code != 0:
                self.log.warning(f"command {self.attrs.argv[0]} exit status {code}")
        self.running = still

    def next_timeout(self) -> float:
        now = self.clock()
        t = 1.0
        for r in self.running:
            if not r.timed_out:
                t = min(t, r.deadline - now)
        if self.throttled_until > now:
            t = min(t, self.throttled_until - now)
        return max(0.0, t)

    def listening(self) -> list:
        if self.stopping or len(self.running) >= self.limit or self.throttled_until > self.clock():
            return []
        return self.sockets

    def begin_stop(self) -> None:
        """Accept no more connections (a reload's new supervisor owns the listeners now)."""
        self.stopping = True
        for s in self.sockets:
            try:
                s.close()
            except OSError:
                pass

    def stop(self, sleep=time.sleep) -> None:
        """End the commands still running: SIGTERM, a short grace, then SIGKILL."""
        self.begin_stop()
        for r in self.running:
            r.stopped = True
            _kill_session(r.proc.pid, signal.SIGTERM)
        end = time.monotonic() + STOP_GRACE_SECONDS
        while self.running and time.monotonic() < end:
            self.reap()
            if self.running:
                sleep(0.05)
        for r in self.running:
            _kill_session(r.proc.pid, signal.SIGKILL)
            try:
                r.proc.wait(timeout=STOP_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                pass
        self.running = []


def _kill_session(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def serve(config, svc, sockets, owner: tuple | None = None) -> None:
    """The supervisor of one spawn service, until SIGTERM (started by the master,
    still root when the master is).  ``owner`` (mail_owner's uid, gid, name) is
    accepted for symmetry with the other root helpers: the sockets are already
    bound and owned by it."""
    from postwell.log import MailLog
    log = MailLog.from_config(config, "spawn")
    server = SpawnServer(config, svc, sockets, log=log)
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    for sig in (signal.SIGTERM, signal.SIGCHLD):
        signal.signal(sig, lambda *_: None)    # the wakeup fd carries the signal number
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    drain_until = None
    try:
        while drain_until is None or (server.running and time.monotonic() < drain_until):
            timeout = server.next_timeout()
            if drain_until is not None:
                timeout = max(0.0, min(timeout, drain_until - time.monotonic()))
            try:
                ready, _, _ = select.select([wake_r, *server.listening()], [], [], timeout)
            except InterruptedError:
                ready = []
            if wake_r in ready:
                try:
                    sigs = os.read(wake_r, 512)
                except BlockingIOError:
                    sigs = b""
                if signal.SIGTERM in sigs and drain_until is None:
                    # Conversations in progress may end by themselves (EOF from the client).
                    server.begin_stop()
                    drain_until = time.monotonic() + DRAIN_SECONDS
                    ready = []
            server.reap()
            server.accept_ready([s for s in ready if s is not wake_r])
            server.reap()
    finally:
        server.stop()
        signal.set_wakeup_fd(-1)
        log.close()
