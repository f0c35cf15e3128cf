"""The privileged half of local(8): everything that touches a user's files
or runs a user's command, as that user: Maildir work and .forward reads in the
root helper's own thread with the user's effective ids and groups (per-thread
credentials, see "thread identities" below), everything else in a process
that has become that user before it opens any path.

The expansion logic in local.py never opens a user path itself; it calls
:func:`run_as` with one of the ``op_*`` functions below.  The operation
runs in a child that dropped to the target uid/gid (setgroups, setgid,
setuid: the order matters, groups can only be changed while still root)
and sends a small JSON result back: in a root helper, a persistent user
worker of that identity (see WorkerPool below), else a child forked for the
call.  Postfix's local does the same with seteuid() inside one process; a
separate process per identity keeps a failure (or a hostile .forward) from
leaving the parent with the wrong identity.

When the process is not root it can only act as itself: an operation for
another uid is refused with a clear reason instead of being attempted.
"""

from __future__ import annotations

from postwell.delivery.pipe import quote_local as _pipe_quote_local

import asyncio
import concurrent.futures
import ctypes
import errno
import gc
import json
import os
import pickle
import queue
import re
import signal
import socket
import stat
import struct
import subprocess
import threading
import time

from .base import FileContent, QueueContent
# libc's sync_file_range(2) (or None) and its flag: the queue's commit rounds use them too.
from postwell.queue.store import _SYNC_FILE_RANGE_WRITE, _sync_file_range, dir_sync_group  # noqa: F401

from . import virtual as _virtual
from .virtual import Delivery, MailboxFull, deliver_maildir, deliver_mbox, deliver_one

# sysexits.h codes -> (dsn, text), as Postfix's sys_exits_detail().
SYSEXITS = {
    64: ("5.3.0", "command line usage error"),
    65: ("5.6.0", "data format error"),
    66: ("5.3.0", "cannot open input"),
    67: ("5.1.1", "user unknown"),
    68: ("5.1.2", "host name unknown"),
    69: ("5.3.0", "service unavailable"),
    70: ("5.3.0", "internal software error"),
    71: ("4.3.0", "system resource problem"),
    72: ("5.3.0", "critical OS file missing"),
    73: ("5.2.0", "can't create user output file"),
    74: ("5.3.0", "input/output error"),
    75: ("4.3.0", "temporary failure"),
    76: ("5.5.0", "remote error in protocol"),
    77: ("5.7.0", "permission denied"),
    78: ("5.3.5", "local configuration error"),
}

# Characters that make Postfix hand a command to /bin/sh -c instead of
# exec'ing it directly (exec_command.c): quoting, expansion, redirection...
SHELL_META = set("\"'`\\$;&()|<>*?[]{}~#=\n\r")
SHELL_BUILTINS = {"exec", "exit", "export", "read", "set", "test", "trap", "ulimit", "umask",
                  "unset", "wait", ".", ":", "cd", "eval", "shift", "source", "["}

MAX_READ = 1 << 20           # .forward / :include: files: bounded memory
OUTPUT_KEEP = 2048           # command output kept for the bounce text


class Identity:
    """Who an operation runs as (Postfix's USER_ATTR)."""

    __slots__ = ("uid", "gid", "name", "home", "shell", "groups")

    def __init__(self, uid, gid, name="", home="/", shell="/bin/sh", groups=None):
        self.uid, self.gid, self.name, self.home, self.shell = uid, gid, name, home, shell
        self.groups = groups if groups is not None else [gid]

    @classmethod
    def from_pwd(cls, pw) -> "Identity":
        return cls(pw.pw_uid, pw.pw_gid, pw.pw_name, pw.pw_dir, pw.pw_shell)

    def __repr__(self):
        return f"Identity({self.name or self.uid}:{self.gid})"


class NeedRoot(Exception):
    pass


def _drop(ident: Identity) -> None:
    # Groups first, then gid, then uid: after setuid() nothing else may change.
    os.setgroups(list(dict.fromkeys(ident.groups or [ident.gid])))
    os.setgid(ident.gid)
    os.setuid(ident.uid)
    if os.getuid() != ident.uid or os.geteuid() != ident.uid:
        raise OSError(errno.EPERM, "privilege drop failed")


def run_as(ident: Identity, func, *args):
    """Run ``func(*args)`` as ``ident``; returns its JSON-able result.

    Root: in a child that has dropped to ``ident`` -- one of the pool's
    persistent user workers when a pool is in use (see use_worker_pool) and
    the operation can go there, else one forked for this call.  Not root:
    only for our own uid (directly), else :class:`NeedRoot`.
    """
    if os.geteuid() != 0:
        if ident.uid != os.geteuid():
            raise NeedRoot(f"delivery as uid {ident.uid} requires root privileges")
        return func(*args)
    pool = _pool
    if pool is not None and _thread_identity_ok(func, args):
        return _run_in_thread(ident, func, *args)
    if pool is not None and getattr(func, "__name__", None) in WORKER_OPS:
        res = pool.run(ident, func.__name__, args)
        if res is not None:
            return res
    return _run_forked(ident, func, *args)


# ------------------------------------------------------ thread identities
#
# The Maildir case, which is most local mail, needs no process of its own:
# Linux keeps credentials per thread (the glibc wrappers make a change
# process-wide; the raw system calls do not), so the helper's thread that
# serves a delivery takes the user's groups, gid and effective uid for the
# file work and returns to root after it -- Postfix's local(8) does the same
# with seteuid() in its one-delivery-at-a-time process.  As with seteuid(),
# an effective uid other than 0 clears the thread's capabilities: the kernel
# checks permissions and quotas as for the user.  What stays with the user
# workers: mbox appends (fcntl locks do not exclude the threads of one
# process), commands (they run user code) and anything that is not a Maildir.
THREAD_IDENTITIES = True    # False: every file operation goes to a user worker (tests, A/B runs)
_SYSCALLS = {"x86_64": (116, 117, 119), "aarch64": (159, 147, 149)}   # setgroups, setresuid, setresgid
_THREAD_OPS = {"op_forward_lookup", "op_read_file"}
_MAILDIR_OPS = {"op_forward_or_mailbox": 3, "op_mailbox": 0, "op_file": 0}   # where the LocalCopy is
_libc_syscall = None


def _thread_creds_available() -> bool:
    global _libc_syscall
    if not THREAD_IDENTITIES:
        return False
    if _libc_syscall is None:
        nums = _SYSCALLS.get(os.uname().machine)
        if nums is None:
            _libc_syscall = False
        else:
            try:
                fn = ctypes.CDLL(None, use_errno=True).syscall
                fn.restype = ctypes.c_long
                _libc_syscall = (fn, nums)
            except (OSError, AttributeError):
                _libc_syscall = False
    return _libc_syscall is not False


def _thread_identity_ok(func, args) -> bool:
    name = getattr(func, "__name__", None)
    if name in _THREAD_OPS:
        return _thread_creds_available()
    if name == "op_maildir_batch":
        copies = args[3] if len(args) > 3 else ()
        if not copies or not all(getattr(c, "maildir", False) is True for c in copies):
            return False
        return _thread_creds_available()
    at = _MAILDIR_OPS.get(name)
    if at is None or len(args) <= at or getattr(args[at], "maildir", False) is not True:
        return False
    return _thread_creds_available()


# (groups, gid, uid) -> the system calls' ctypes arguments, in the order they
# run: built once per identity (issue 8: building them took longer than the
# three system calls).  Read-only once built, so threads share them.
_CRED_CALLS: dict[tuple, tuple] = {}
_CRED_CALLS_MAX = 256


def _cred_calls(groups, gid: int, uid: int) -> tuple:
    key = (tuple(groups), gid, uid)
    calls = _CRED_CALLS.get(key)
    if calls is None:
        _, (n_setgroups, n_setresuid, n_setresgid) = _libc_syscall
        keep = ctypes.c_long(-1)
        arr = (ctypes.c_uint * max(len(groups), 1))(*groups)
        calls = ((n_setgroups, ctypes.c_long(len(groups)), arr),
                 (n_setresgid, keep, ctypes.c_long(gid), keep),
                 (n_setresuid, keep, ctypes.c_long(uid), keep))
        if uid == 0:
            calls = calls[::-1]
        if len(_CRED_CALLS) >= _CRED_CALLS_MAX:
            _CRED_CALLS.clear()
        _CRED_CALLS[key] = calls
    return calls


def _set_thread_creds(groups, gid: int, uid: int) -> None:
    """Groups, then gid, then uid (the first two need root's capabilities);
    back to root (uid 0) in the reverse order."""
    fn = _libc_syscall[0]
    for call in _cred_calls(groups, gid, uid):
        if fn(*call) != 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))


# The credentials a helper thread returns to: read once per thread (they
# are the process's own, which a root helper never changes).
_root_creds = threading.local()


def _run_in_thread(ident: Identity, func, *args):
    """``func(*args)`` in this thread as ``ident`` (effective ids and groups), then
    back to root; an answer as a worker gives it."""
    if not _thread_creds_available():
        raise NeedRoot("no per-thread credentials here")
    home = getattr(_root_creds, "value", None)
    if home is None:
        home = _root_creds.value = (os.getgroups(), os.getegid())
    root_groups, root_gid = home
    try:
        if ident.uid != 0 or ident.gid != 0:
            _set_thread_creds(list(dict.fromkeys(ident.groups or [ident.gid])), ident.gid, ident.uid)
            if os.geteuid() != ident.uid or os.getegid() != ident.gid:
                raise OSError(errno.EPERM, "privilege change failed")
        res = func(*args)
    except BaseException as exc:  # as a worker answers: a reason, never a hang
        res = {"error": f"{type(exc).__name__}: {exc}"}
    finally:
        try:
            _set_thread_creds(root_groups, root_gid, 0)
            ok = os.geteuid() == 0 and os.getegid() == root_gid
        except BaseException:   # noqa: BLE001
            ok = False
        if not ok:
            # A root helper must never go on with a user's identity.
            os.write(2, b"local helper: cannot return to root credentials\n")
            os._exit(70)
    return res


def _run_forked(ident: Identity, func, *args):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 0
        try:
            os.close(r)
            if ident.uid != 0 or ident.gid != 0:
                _drop(ident)
            res = func(*args)
        except BaseException as exc:  # the parent gets a reason, never a hang
            res = {"error": f"{type(exc).__name__}: {exc}"}
        try:
            data = json.dumps(res).encode()
            view = memoryview(data)
            while view:
                view = view[os.write(w, view):]
        except BaseException:
            code = 1
        os._exit(code)
    os.close(w)
    chunks = []
    with os.fdopen(r, "rb") as f:
        while True:
            b = f.read(65536)
            if not b:
                break
            chunks.append(b)
    _reap(pid)
    try:
        res = json.loads(b"".join(chunks))
    except ValueError:
        return {"error": "delivery child died unexpectedly"}
    return res


# ------------------------------------------------------------ user workers
#
# A fork per operation costs more than the delivery itself.  A root helper
# therefore keeps, per identity (uid, gid, groups), a few worker processes
# that dropped to that identity once, right after their fork, and then run
# file operations for it only: least privilege as before -- a worker never
# holds more rights than the user whose files it writes -- without a fork
# per message.  Commands (|command, mailbox_command) keep their own child:
# they change the working directory and run user code.
#
# Parent -> worker: a length-prefixed pickle (operation name, arguments) in
# one sendmsg, content as the queue file's descriptor (SCM_RIGHTS) or, for
# small mail the parent already holds, inside the frame.  Worker -> parent: a
# length-prefixed JSON answer of bounded size; the root side never unpickles
# what a user-owned process wrote.

WORKER_OPS = {"op_forward_lookup", "op_forward_or_mailbox", "op_read_file", "op_mailbox", "op_file",
              "op_virtual_delivery"}
WORKERS_PER_IDENTITY = 8      # parallel operations (and fsyncs) for one user
MAX_WORKERS = 64              # every identity together
WORKER_REUSE = 60.0           # seconds: an older idle worker is retired, not reused
WORKER_LIFETIME_IDLE = 600.0  # seconds: a worker nobody talks to exits by itself
MAX_ANSWER = 4 << 20          # an answer frame (a .forward text is at most MAX_READ)
_FRAME = struct.Struct("!I")
_CONTENT = "\0content"       # stands for the content argument in a pickled request
_INLINE = "\0inline"         # ... or carries it, when it is small and already in memory
_BATCH = "\0batch"           # operation name of a frame that carries several operations
BATCH_MAX = 32               # operations per frame
BATCH_BYTES = 1 << 20        # inline content per frame (bounded memory on both sides)
BATCH_THREADS = 8            # operations of one batch in progress at once, in a worker
INLINE_MAX = 256 << 10

_pool: "WorkerPool | None" = None


def use_worker_pool(enable: bool = True) -> None:
    """Root helpers call this once: run_as then reuses user workers."""
    global _pool
    if enable and _pool is None:
        _pool = WorkerPool()
    elif not enable and _pool is not None:
        _pool.close()
        _pool = None


def retire_idle_workers() -> None:
    pool = _pool
    if pool is not None:
        pool.retire_idle()


def op_virtual_delivery(d, open_content) -> list:
    """virtual(8)'s file work as the mailbox owner: [status, dsn, reason]."""
    return list(deliver_one(d, open_content))


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        got = sock.recv(n - len(buf))
        if not got:
            raise EOFError
        buf += got
    return bytes(buf)


def _unwire(arg, content_fd):
    if isinstance(arg, tuple) and arg[:1] == (_CONTENT,):
        return FileContent(content_fd, *arg[1:])
    if isinstance(arg, tuple) and arg[:1] == (_INLINE,):
        data = arg[1]
        return lambda: iter((data,))
    return arg


def _run_batch(funcs, items) -> list:
    """Several operations of one request frame, in order; their answers as a list.

    The Maildir renames of the whole batch share one fsync per new/ directory,
    done after the last operation and before any answer leaves: a delivery is
    still reported only once its name is durable, but N messages into one
    Maildir cost one directory fsync instead of N."""
    from postwell.queue.store import fsync_dir

    from . import virtual

    def one(item):
        name, args = item
        dirs: list[str] = []
        virtual.defer_dir_syncs(dirs)
        try:
            return funcs[name](*[_unwire(a, None) for a in args]), dirs
        except BaseException as exc:
            return {"error": f"{type(exc).__name__}: {exc}"}, dirs
        finally:
            virtual.defer_dir_syncs(None)

    # Maildir deliveries run side by side: their file fsyncs reach the file
    # system together and share journal commits, where one after the other
    # each would wait for a commit of its own.  Anything else (mbox appends
    # above all: fcntl locks do not exclude threads of one process) runs
    # here, one after the other.
    side = [i for i, item in enumerate(items) if _maildir_op(item)] if len(items) > 1 else []
    running = {i: _batch_threads().submit(one, items[i]) for i in side}
    done = [None] * len(items)
    for i, item in enumerate(items):
        if i not in running:
            done[i] = one(item)
    for i, fut in running.items():
        done[i] = fut.result()
    out = [res for res, _ in done]
    synced_by: dict[str, list[int]] = {}
    for i, (_, dirs) in enumerate(done):
        for d in dirs:
            synced_by.setdefault(d, []).append(i)
    for d, users in synced_by.items():
        try:
            fsync_dir(d)
        except OSError as exc:
            # The name may not be durable: none of these may count as delivered.
            for i in users:
                out[i] = _dir_sync_failed(out[i], d, exc)
    return out


def _maildir_op(item) -> bool:
    name, args = item
    return name == "op_virtual_delivery" and bool(args) and getattr(args[0], "maildir", False) is True


_batch_pool: concurrent.futures.ThreadPoolExecutor | None = None


def _batch_threads() -> concurrent.futures.ThreadPoolExecutor:
    """A worker's threads for batches (made in the worker, after its fork)."""
    global _batch_pool
    if _batch_pool is None:
        _batch_pool = concurrent.futures.ThreadPoolExecutor(BATCH_THREADS,
                                                            thread_name_prefix="batch")
    return _batch_pool


def _forget_batch_threads() -> None:
    # The pool's threads do not exist in a forked child: it makes its own.
    global _batch_pool
    _batch_pool = None


os.register_at_fork(after_in_child=_forget_batch_threads)


def _dir_sync_failed(res, path: str, exc: OSError):
    """The answer an operation would have given had its own new/ fsync failed."""
    if isinstance(res, list) and len(res) == 3:
        if res[0] != "sent":
            return res
        from .virtual import _errno_dsn, _status
        dsn = _errno_dsn(exc, "4.2.0")
        return [_status(dsn), dsn, f"maildir delivery failed: {exc.strerror}: {path}"]
    return {"error": f"{type(exc).__name__}: {exc}"}


def _die_with_parent(parent: int) -> None:  # pragma: no cover - child
    """A worker must not outlive the process that hands it work: a qmgr or
    helper killed mid-delivery must not have its deliveries finished behind
    its back (they would be done again after the restart)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:
        os._exit(0)


def _worker_main(sock: socket.socket, ident: Identity, parent: int) -> None:  # pragma: no cover - child
    """The worker's life: as ``ident``, answer requests until EOF or idle."""
    # The heap inherited from the parent stays shared (copy-on-write) only as
    # long as nothing writes to it: keep the collector off those objects.
    gc.freeze()
    keep = sock.fileno()
    # Nothing of the helper stays open here: no queue files of other
    # messages, no listening socket, no other worker's channel.
    os.closerange(3, keep)
    os.closerange(keep + 1, max(os.sysconf("SC_OPEN_MAX"), keep + 1))
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    try:
        signal.set_wakeup_fd(-1)
    except (ValueError, OSError):
        pass
    if os.geteuid() == 0 and (ident.uid != 0 or ident.gid != 0):
        _drop(ident)
    # After the drop: a change of credentials clears the parent-death signal.
    _die_with_parent(parent)
    # The idle limit as the kernel's receive timeout (recv then fails with
    # EAGAIN, an OSError): settimeout() would make Python poll() before every
    # recv and send, three extra system calls per delivery.
    sock.settimeout(None)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                    struct.pack("@ll", int(WORKER_LIFETIME_IDLE), 0))
    funcs = {name: globals()[name] for name in WORKER_OPS}
    while True:
        try:
            head, fds, _flags, _addr = socket.recv_fds(sock, _FRAME.size, 1)
            if not head:
                return
            head += _recv_exact(sock, _FRAME.size - len(head))
            name, args = pickle.loads(_recv_exact(sock, _FRAME.unpack(head)[0]))
        except (EOFError, OSError, socket.timeout):
            return
        content_fd = fds[0] if fds else None
        try:
            if name == _BATCH:
                res = _run_batch(funcs, args)
            else:
                args = [_unwire(a, content_fd) for a in args]
                res = funcs[name](*args)
        except BaseException as exc:  # the parent gets a reason, never a hang
            res = {"error": f"{type(exc).__name__}: {exc}"}
        finally:
            for fd in fds:
                os.close(fd)
        data = json.dumps(res).encode()
        try:
            sock.sendall(_FRAME.pack(len(data)) + data)
        except OSError:
            return


class UserWorker:
    """The root side of one worker process."""

    def __init__(self, ident: Identity):
        self.key = _identity_key(ident)
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        me = os.getpid()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            try:
                parent.close()
                _worker_main(child, ident, me)
            finally:
                os._exit(0)
        child.close()
        self.pid, self.sock = pid, parent
        self.idle_since = time.monotonic()

    def call(self, name: str, args: list, content_fd: int | None):
        """The operation's answer; EOFError/OSError/ValueError when the worker
        failed (it is then unusable)."""
        payload = pickle.dumps((name, args), protocol=pickle.HIGHEST_PROTOCOL)
        frame = _FRAME.pack(len(payload)) + payload
        # The whole frame and the descriptor in one sendmsg: sent as two, the
        # worker woke for the header, found no payload and slept again -- two
        # wake-ups (and context switches) per delivery instead of one.
        sent = socket.send_fds(self.sock, [frame], [content_fd] if content_fd is not None else [])
        if sent < len(frame):
            self.sock.sendall(memoryview(frame)[sent:])
        size = _FRAME.unpack(_recv_exact(self.sock, _FRAME.size))[0]
        if size > MAX_ANSWER:
            raise ValueError("worker answer too large")
        return json.loads(_recv_exact(self.sock, size))

    def close(self) -> None:
        try:
            # shutdown, not only close: a forked command child may hold a copy
            # of this socket, and the worker must see EOF now, not when it exits.
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        # EOF ends the worker at once: it is idle whenever we close it.
        _reap(self.pid)


class AsyncWorkerPool:
    """User workers for an unprivileged event loop that writes its own
    mailboxes (the qmgr delivering virtual mail owned by mail_owner).

    The file work runs in these processes rather than in threads of the
    loop's process: a thread returning from fsync() waits for the busy
    loop to hand over the interpreter lock, several times per delivery,
    while a worker only costs the loop one request and one answer.  Content
    travels inline, so only messages already in memory and small go here.

    Requests that arrive while every worker is busy wait in a queue, and a
    worker that comes free takes all of them (up to BATCH_MAX / BATCH_BYTES)
    in one frame: one round trip and one fsync of each new/ directory for the
    batch instead of one per message.  With batching, a worker per core is
    enough to keep the disk busy; more would only add processes."""

    def __init__(self, size: int | None = None, ident: Identity | None = None):
        self.size = size if size is not None else max(2, min(4, os.cpu_count() or 2))
        # Whose files the workers write: ourselves, or (a root helper) one mailbox owner.
        self.ident = ident
        self._idle: list[UserWorker] = []
        self._count = 0
        self._queue: list[tuple[str, list, int, asyncio.Future]] = []
        self._timer: asyncio.TimerHandle | None = None

    async def run(self, name: str, args) -> dict | list | None:
        """The operation's answer, or None when it cannot go to a worker."""
        wire = []
        size = 0
        for a in args:
            if isinstance(a, InlineContent):
                if len(a.data) > INLINE_MAX:
                    return None
                size += len(a.data)
                a = (_INLINE, a.data)
            elif callable(a):
                return None
            wire.append(a)
        fut = asyncio.get_running_loop().create_future()
        self._queue.append((name, wire, size, fut))
        self._dispatch()
        # A caller that gives up leaves its request queued: _take skips it.
        return await fut

    def _take(self) -> list:
        """The next batch off the queue (requests whose caller left are dropped)."""
        batch, size = [], 0
        while self._queue and len(batch) < BATCH_MAX:
            item = self._queue[0]
            if item[3].done():
                self._queue.pop(0)
                continue
            if batch and size + item[2] > BATCH_BYTES:
                break
            self._queue.pop(0)
            batch.append(item)
            size += item[2]
        return batch

    def _dispatch(self) -> None:
        """Hand queued requests to idle workers, starting workers up to size."""
        loop = asyncio.get_running_loop()
        while self._queue:
            worker = self._idle_worker()
            if worker is None:
                if self._count >= self.size:
                    return
                self._count += 1
                try:
                    worker = UserWorker(self.ident or Identity(os.geteuid(), os.getegid()))
                    worker.sock.setblocking(False)
                except BaseException as exc:
                    self._count -= 1
                    for *_, fut in self._take():
                        if not fut.done():
                            fut.set_exception(exc)
                    continue
            batch = self._take()
            if not batch:
                self._release(worker)
                return
            loop.create_task(self._serve(worker, batch))

    def _idle_worker(self) -> UserWorker | None:
        now = time.monotonic()
        while self._idle and now - self._idle[0].idle_since >= WORKER_REUSE:
            self._count -= 1
            self._idle.pop(0).close()        # oldest first
        return self._idle.pop() if self._idle else None

    async def _serve(self, worker: UserWorker, batch: list) -> None:
        loop = asyncio.get_running_loop()
        try:
            if len(batch) == 1:
                name, wire, _, _ = batch[0]
                frame = (name, wire)
            else:
                frame = (_BATCH, [(name, wire) for name, wire, _, _ in batch])
            payload = pickle.dumps(frame, protocol=pickle.HIGHEST_PROTOCOL)
            await loop.sock_sendall(worker.sock, _FRAME.pack(len(payload)) + payload)
            size = _FRAME.unpack(await _arecv_exact(loop, worker.sock, _FRAME.size))[0]
            if size > MAX_ANSWER:
                raise ValueError("worker answer too large")
            res = json.loads(await _arecv_exact(loop, worker.sock, size))
            if len(batch) == 1:
                res = [res]
            elif isinstance(res, dict):
                res = [res] * len(batch)         # the batch as a whole failed
            if not isinstance(res, list) or len(res) != len(batch):
                raise ValueError("worker answer does not match the batch")
        except (EOFError, OSError, ValueError):
            self._count -= 1
            worker.close()
            res = [{"error": "delivery child died unexpectedly"}] * len(batch)
        except BaseException:
            self._count -= 1
            worker.close()                   # cancelled mid-request: its answer is unusable
            for *_, fut in batch:
                if not fut.done():
                    fut.cancel()
            raise
        else:
            self._release(worker)
        for (*_, fut), answer in zip(batch, res):
            if not fut.done():
                fut.set_result(answer)
        self._dispatch()

    def _release(self, worker: UserWorker) -> None:
        worker.idle_since = time.monotonic()
        self._idle.append(worker)
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(WORKER_REUSE, self._retire_idle)

    def _retire_idle(self) -> None:
        """After a burst, the workers go once they have been idle a while."""
        self._timer = None
        now = time.monotonic()
        old = [w for w in self._idle if now - w.idle_since >= WORKER_REUSE]
        for w in old:
            self._idle.remove(w)
            self._count -= 1
            w.close()
        if self._idle:
            self._timer = asyncio.get_running_loop().call_later(WORKER_REUSE, self._retire_idle)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        workers, self._idle = self._idle, []
        self._count -= len(workers)
        for w in workers:
            w.close()


class InlineContent:
    """Message content already in memory, as an open_content that an
    AsyncWorkerPool request can carry."""

    def __init__(self, data: bytes):
        self.data = data

    def __call__(self):
        return iter((self.data,))


async def _arecv_exact(loop, sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        got = await loop.sock_recv(sock, n - len(buf))
        if not got:
            raise EOFError
        buf += got
    return bytes(buf)


def _identity_key(ident: Identity) -> tuple:
    return ident.uid, ident.gid, tuple(dict.fromkeys(ident.groups or [ident.gid]))


class WorkerPool:
    """User workers by identity, for the threads of one root helper."""

    def __init__(self, per_identity: int = WORKERS_PER_IDENTITY, limit: int = MAX_WORKERS,
                 reuse: float = WORKER_REUSE, clock=time.monotonic):
        self.per_identity, self.limit, self.reuse, self.clock = per_identity, limit, reuse, clock
        self._cond = threading.Condition()
        self._idle: dict[tuple, list[UserWorker]] = {}
        self._count: dict[tuple, int] = {}     # live workers (idle or busy) per identity
        self._total = 0
        self._spawns: queue.SimpleQueue | None = None

    def _spawn(self, ident: Identity) -> UserWorker:
        """Fork a worker from one thread that lives as long as the process:
        the kernel's parent-death signal follows the forking thread, and the
        threads that ask for workers may come and go."""
        with self._cond:
            if self._spawns is None:
                self._spawns = queue.SimpleQueue()
                threading.Thread(target=self._spawner, args=(self._spawns,), daemon=True,
                                 name="worker-spawner").start()
        done: concurrent.futures.Future = concurrent.futures.Future()
        self._spawns.put((ident, done))
        return done.result()

    @staticmethod
    def _spawner(requests: queue.SimpleQueue) -> None:
        while True:
            ident, done = requests.get()
            try:
                done.set_result(UserWorker(ident))
            except BaseException as exc:
                done.set_exception(exc)

    def run(self, ident: Identity, name: str, args) -> dict | list | None:
        """Run operation ``name`` in a worker; None when it cannot go there
        (the caller forks instead).  A worker that fails answers with the
        same reason a dead forked child would give."""
        content_fd = None
        wire = []
        for a in args:
            if isinstance(a, QueueContent):
                if content_fd is not None:
                    os.close(content_fd)
                    return None
                try:
                    content_fd, offset, size = a.descriptor()
                except (OSError, AttributeError):
                    return None
                a = (_CONTENT, offset, size)
            elif isinstance(a, InlineContent) and len(a.data) <= INLINE_MAX:
                # A small message the helper already holds (the queue file's
                # open read it whole) travels in the request frame: no
                # descriptor to open, pass and close, no pread in the worker.
                a = (_INLINE, a.data)
            elif callable(a):
                # Some other content source: only a forked child can use it.
                if content_fd is not None:
                    os.close(content_fd)
                return None
            wire.append(a)
        try:
            worker = self._acquire(ident)
            try:
                res = worker.call(name, wire, content_fd)
            except (EOFError, OSError, ValueError):
                self._discard(worker)
                return {"error": "delivery child died unexpectedly"}
            self._release(worker)
            return res
        finally:
            if content_fd is not None:
                os.close(content_fd)

    def _acquire(self, ident: Identity) -> UserWorker:
        key = _identity_key(ident)
        stale = []
        with self._cond:
            while True:
                stale += self._prune()
                idle = self._idle.get(key)
                if idle:
                    worker = idle.pop()
                    break
                if self._count.get(key, 0) < self.per_identity:
                    if self._total >= self.limit:
                        victim = self._oldest_idle()
                        if victim is not None:
                            self._forget(victim)
                            stale.append(victim)
                    if self._total < self.limit:
                        self._count[key] = self._count.get(key, 0) + 1
                        self._total += 1
                        worker = None
                        break
                self._cond.wait(1.0)
        for old in stale:
            old.close()
        if worker is None:
            try:
                worker = self._spawn(ident)
            except BaseException:
                with self._cond:
                    self._count[key] -= 1
                    self._total -= 1
                    self._cond.notify_all()
                raise
        return worker

    def _release(self, worker: UserWorker) -> None:
        worker.idle_since = self.clock()
        with self._cond:
            self._idle.setdefault(worker.key, []).append(worker)
            self._cond.notify_all()

    def _discard(self, worker: UserWorker) -> None:
        with self._cond:
            self._count[worker.key] -= 1
            self._total -= 1
            self._cond.notify_all()
        worker.close()

    def _forget(self, worker: UserWorker) -> None:
        """(lock held) Take an idle worker out of the books."""
        self._idle[worker.key].remove(worker)
        self._count[worker.key] -= 1
        self._total -= 1

    def _prune(self) -> list[UserWorker]:
        """(lock held) Idle workers too old to reuse: out of the books, to close."""
        now = self.clock()
        old = [w for ws in self._idle.values() for w in ws if now - w.idle_since >= self.reuse]
        for w in old:
            self._forget(w)
        return old

    def _oldest_idle(self) -> UserWorker | None:
        workers = [w for ws in self._idle.values() for w in ws]
        return min(workers, key=lambda w: w.idle_since) if workers else None

    def retire_idle(self) -> None:
        """Close the workers idle for too long (the helper calls this now and
        then, so an idle system keeps no user processes around)."""
        with self._cond:
            old = self._prune()
        for w in old:
            w.close()

    def close(self) -> None:
        with self._cond:
            workers = [w for ws in self._idle.values() for w in ws]
            for w in workers:
                self._forget(w)
        for w in workers:
            w.close()


def _reap(pid: int) -> None:
    while True:
        try:
            os.waitpid(pid, 0)
            return
        except ChildProcessError:
            return
        except InterruptedError:
            continue


# ------------------------------------------------------------------ reading

def op_read_file(path: str, uid: int, checks: str) -> dict:
    """Read a .forward (checks="forward") or :include: (checks="include") file.

    Returns {"missing": True}, {"warn": text} (ignored file), {"bounce": text}
    or {"text": content, "owner": uid}.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return {"missing": True}
    except OSError as exc:
        if checks == "forward":
            return {"missing": True, "warn": f"cannot access file {path}: {exc.strerror}"}
        return {"defer": f"unable to lookup :include: file {path}: {exc.strerror}"}
    if checks == "forward":
        # local(8): ignore files that are not regular, owned by someone other than
        # the user or root, or world writable.
        if not stat.S_ISREG(st.st_mode):
            return {"warn": f"file {path} is not a regular file"}
        if st.st_uid not in (0, uid):
            return {"warn": f"file {path} has bad owner uid {st.st_uid}"}
        if st.st_mode & 0o002:
            return {"warn": f"file {path} is world writable"}
    else:
        if not stat.S_ISREG(st.st_mode):
            return {"bounce": f"file {path} is not a regular file"}
        if st.st_mode & 0o002:
            return {"bounce": f"file {path} is world writable"}
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        if checks == "forward":
            return {"warn": f"cannot open file {path}: {exc.strerror}"}
        return {"defer": f"cannot open include file {path}: {exc.strerror}"}
    try:
        fst = os.fstat(fd)
        if (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino):
            return {"warn": f"file {path} changed while opening"}
        data = os.read(fd, MAX_READ)
    finally:
        os.close(fd)
    return {"text": data.decode("utf-8", "surrogateescape"), "owner": st.st_uid}


def op_forward_lookup(home: str, paths: list[str], uid: int) -> dict:
    """As the user: check the home directory, then read the first existing
    forward_path file.  {"home_error": text} | {} (none) | op_read_file's
    answer plus "path"."""
    try:
        os.stat(home)
    except OSError as exc:
        return {"home_error": exc.strerror}
    for path in paths:
        res = op_read_file(path, uid, "forward")
        if res.get("missing"):
            continue   # lstat failed, whatever the reason: try the next name (dotforward.c)
        res["path"] = path
        return res
    return {}


def op_forward_or_mailbox(home: str, paths: list[str], uid: int, *mailbox) -> dict:
    """op_forward_lookup; when the user has no forward file, also the mailbox
    delivery local(8) does next (op_mailbox's arguments), its answer under
    "mailbox".  Saves the second worker round trip of the common case."""
    res = op_forward_lookup(home, paths, uid)
    if res:
        return res
    try:
        return {"mailbox": op_mailbox(*mailbox)}
    except Exception as exc:   # as a failed op_mailbox call would answer
        return {"mailbox": {"error": f"{type(exc).__name__}: {exc}"}}


# ------------------------------------------------------------------ writing

class LocalCopy(Delivery):
    """Delivery description with the header choices of local(8)'s mail_copy()."""

    def __init__(self, *, path, maildir, sender, recipient, orig, delivered, limit,
                 lock_methods, hostname, want_orig, want_delivered, want_return=True):
        super().__init__(path=path, maildir=maildir, uid=-1, gid=-1, sender=sender,
                         recipient=recipient, orig=orig, limit=limit, lock_methods=lock_methods,
                         hostname=hostname)
        self.delivered = delivered
        self.want_orig, self.want_delivered, self.want_return = want_orig, want_delivered, want_return

    def headers(self) -> bytes:
        # mail_copy() order: Return-Path, X-Original-To, Delivered-To.
        out = []
        if self.want_return:
            out.append(f"Return-Path: <{_quote_local(self.sender)}>\n")
        if self.want_orig and self.orig:
            out.append(f"X-Original-To: {self.orig}\n")
        if self.want_delivered and self.delivered:
            # As given (Postfix 3.7 does not fold it); loop checks compare case-blind.
            out.append(f"Delivered-To: {self.delivered}\n")
        return "".join(out).encode("utf-8", "surrogateescape")


# ------------------------------------------------------- unnamed Maildir files
#
# Issue 8: a Maildir file is written as an unnamed file (O_TMPFILE, opened in
# tmp/), fsync'd, and only then linked into new/ under its final name.  The
# durability order is the Maildir spec's (data on disk before the name in
# new/ exists, new/ synced before "delivered"), but no name is made in tmp/
# and removed again by a rename: one directory update fewer, and on ext4
# without a journal the file's fsync no longer writes tmp/ synchronously
# (a new directory entry makes fsync sync the parent too).  A crash before
# the link leaves nothing behind (the kernel frees the unnamed inode).
# Where the kernel or file system cannot do it, deliver_maildir() (the named
# tmp/ file) is used, decided once per process.
_AT_FDCWD = -100
_AT_EMPTY_PATH = 0x1000
_O_TMPFILE = getattr(os, "O_TMPFILE", 0)
_unnamed_state: dict = {"ok": None, "linkat": None}


def _linkat():
    fn = _unnamed_state["linkat"]
    if fn is None:
        try:
            fn = ctypes.CDLL(None, use_errno=True).linkat
            fn.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_int)
            fn.restype = ctypes.c_int
        except (OSError, AttributeError):
            fn = False
        _unnamed_state["linkat"] = fn
    return fn


class _CannotName(Exception):
    """The unnamed file cannot be linked here: use named tmp/ files."""


def _name_unnamed(fd: int, path: str) -> None:
    """Link the unnamed file ``fd`` to ``path`` (never replacing a name).

    linkat(fd, "", AT_EMPTY_PATH) is allowed to the file's opener since Linux
    6.10 (before, only with CAP_DAC_READ_SEARCH, which a thread acting as the
    user does not have); /proc/thread-self/fd/N is the older way."""
    fn = _linkat()
    if fn:
        if fn(fd, b"", _AT_FDCWD, os.fsencode(path), _AT_EMPTY_PATH) == 0:
            return
        err = ctypes.get_errno()
        if err != errno.ENOENT or not os.path.isdir(os.path.dirname(path)):
            if err in (errno.EINVAL, errno.EPERM, errno.ENOSYS):
                raise _CannotName(os.strerror(err))
            raise OSError(err, os.strerror(err), path)
        # ENOENT with new/ in place: the kernel refuses AT_EMPTY_PATH to us.
    try:
        os.link(f"/proc/thread-self/fd/{fd}", path, follow_symlinks=True)
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno == errno.ENOENT and not os.path.isdir(os.path.dirname(path)):
            raise
        raise _CannotName(exc.strerror) from None


# Deliveries into one new/ at the same time share its fsync (issue 8: local(8)
# runs two deliveries per recipient at once, which otherwise rarely meet in
# DirSyncGroup): one that has linked its file waits up to NEW_SYNC_LINGER for
# the others still writing into the same new/, then one fsync that started
# after every link covers them all.  Nothing is reported before that fsync.
NEW_SYNC_LINGER = 0.005     # seconds
_writers_lock = threading.Condition()
_writers: dict[str, int] = {}   # new/ -> deliveries between open and link


def _forget_writers() -> None:
    # A lock another thread held at fork() would never be released in the child.
    global _writers_lock, _writers
    _writers_lock = threading.Condition()
    _writers = {}


os.register_at_fork(after_in_child=_forget_writers)


def _writing(newdir: str, delta: int) -> None:
    with _writers_lock:
        n = _writers.get(newdir, 0) + delta
        if n > 0:
            _writers[newdir] = n
        else:
            _writers.pop(newdir, None)
        if delta < 0:
            _writers_lock.notify_all()


def _sync_new(newdir: str) -> None:
    """fsync new/ after this thread's link, shared with the deliveries that
    are about to link into it (see NEW_SYNC_LINGER)."""
    group = dir_sync_group(newdir)
    ticket = group.ticket()
    with _writers_lock:
        if _writers.get(newdir):
            deadline = time.monotonic() + NEW_SYNC_LINGER
            while _writers.get(newdir):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                _writers_lock.wait(left)
    group.sync(newdir, os.fsync, ticket)


def deliver_maildir_unnamed(d: Delivery, open_content) -> None:
    """deliver_maildir() with the message written as an unnamed file (see
    above): the same file names, headers, size limit and durability."""
    if _unnamed_state["ok"] is False or not _O_TMPFILE:
        deliver_maildir(d, open_content)
        return
    tmpdir, newdir = os.path.join(d.path, "tmp"), os.path.join(d.path, "new")
    now = time.time()
    sec, usec = int(now), int((now % 1) * 1_000_000)
    _writing(newdir, 1)
    writing = True
    try:
        try:
            fd = os.open(tmpdir, _O_TMPFILE | os.O_WRONLY, 0o600)
        except FileNotFoundError:
            # As deliver_maildir(): the directories are made only when missing.
            for sub in ("tmp", "new", "cur"):
                os.makedirs(os.path.join(d.path, sub), mode=0o700, exist_ok=True)
            fd = os.open(tmpdir, _O_TMPFILE | os.O_WRONLY, 0o600)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise
            _unnamed_state["ok"] = False        # no O_TMPFILE on this kernel or file system
            fd = None
        if fd is None:
            _writing(newdir, -1)
            writing = False
            deliver_maildir(d, open_content)
            return
        try:
            st = os.fstat(fd)
            _virtual.write_message(fd, d, open_content)
            # The Maildir spec's order: the data is on disk before the file has a name.
            os.fsync(fd)
            _link_into_new(fd, d, newdir, st, sec, usec)
        except _CannotName:
            os.close(fd)
            _unnamed_state["ok"] = False
            _writing(newdir, -1)
            writing = False
            deliver_maildir(d, open_content)
            return
        except BaseException:
            os.close(fd)            # unnamed: nothing to clean up
            raise
        # Linked: no longer one that others' new/ fsync should wait for.
        _writing(newdir, -1)
        writing = False
    finally:
        if writing:
            _writing(newdir, -1)
    _unnamed_state["ok"] = True
    try:
        _virtual.sync_new_dir(d, st.st_dev, newdir, _sync_new)
    finally:
        os.close(fd)



def _link_into_new(fd: int, d, newdir: str, st, sec: int, usec: int) -> None:
    """Give an unnamed, fsync'd Maildir file its name in new/ (made if missing)."""
    host = d.hostname.replace("/", "\\057").replace(":", "\\072")
    # Device and inode make the name unique in new/ while the file lives.
    newfile = os.path.join(newdir, f"{sec}.V{st.st_dev:x}I{st.st_ino:x}M{usec}.{host}")
    try:
        _name_unnamed(fd, newfile)
    except FileNotFoundError:
        os.makedirs(newdir, mode=0o700, exist_ok=True)
        _name_unnamed(fd, newfile)

# The files of a batch are fsync'd side by side: the file system and the
# block layer merge concurrent journal commits and cache flushes, where one
# fsync after the other waits for a flush each (measured on ext4: 32 files
# in ~5 ms instead of 20-60 ms under load).  The threads only fsync
# descriptors the user's thread opened: they never look up a path.
FSYNC_THREADS = 8
FSYNC_SIDE_BY_SIDE = 3       # fewer files: one after the other (a hand-off costs more)
_fsync_pool: concurrent.futures.ThreadPoolExecutor | None = None
_fsync_pool_lock = threading.Lock()


def _fsync_threads() -> concurrent.futures.ThreadPoolExecutor:
    global _fsync_pool
    if _fsync_pool is None:
        with _fsync_pool_lock:
            if _fsync_pool is None:
                pool = concurrent.futures.ThreadPoolExecutor(FSYNC_THREADS,
                                                             thread_name_prefix="fsync")
                # Every thread is started now, by its creator: a new thread takes
                # its creator's credentials, and one started later on demand
                # could be born inside a delivery that acts as a user.
                ready = threading.Barrier(FSYNC_THREADS + 1)
                for _ in range(FSYNC_THREADS):
                    pool.submit(ready.wait, 10)
                ready.wait(10)
                _fsync_pool = pool
    return _fsync_pool


def start_fsync_threads() -> None:
    """The root helper calls this at start-up, as root (see _fsync_threads)."""
    _fsync_threads()


def _forget_fsync_threads() -> None:
    # The pool's threads (and a lock one of them held) do not exist in a forked child.
    global _fsync_pool, _fsync_pool_lock
    _fsync_pool = None
    _fsync_pool_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_fsync_threads)


def _fsync_or_error(fd: int) -> OSError | None:
    try:
        os.fsync(fd)
    except OSError as exc:
        return exc
    return None


def _fsync_each(fds: list[int]) -> list:
    return [_fsync_or_error(fd) for fd in fds]


def _fsync_all(fds: list[int]) -> list:
    """fsync every descriptor, in up to FSYNC_THREADS threads side by side
    (this one among them); the OSError of each that failed, else None, in
    order."""
    if len(fds) < FSYNC_SIDE_BY_SIDE:
        return _fsync_each(fds)
    shares = [fds[k::FSYNC_THREADS] for k in range(min(FSYNC_THREADS, len(fds)))]
    pool = _fsync_threads()
    others = [pool.submit(_fsync_each, share) for share in shares[1:]]
    answers = [_fsync_each(shares[0])] + [f.result() for f in others]
    out: list = [None] * len(fds)
    for k, share_answers in enumerate(answers):
        out[k::FSYNC_THREADS] = share_answers
    return out


def _open_unnamed(d: Delivery) -> int | None:
    """An unnamed file in ``d``'s tmp/ (directories made when missing, as
    deliver_maildir_unnamed); None where the kernel or file system has no
    O_TMPFILE."""
    if _unnamed_state["ok"] is False or not _O_TMPFILE:
        return None
    tmpdir = os.path.join(d.path, "tmp")
    try:
        return os.open(tmpdir, _O_TMPFILE | os.O_WRONLY, 0o600)
    except FileNotFoundError:
        for sub in ("tmp", "new", "cur"):
            os.makedirs(os.path.join(d.path, sub), mode=0o700, exist_ok=True)
        return os.open(tmpdir, _O_TMPFILE | os.O_WRONLY, 0o600)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            raise
        _unnamed_state["ok"] = False
        return None


def deliver_maildir_batch(copies: list, contents: list) -> list[dict]:
    """Several Maildir deliveries as one unit of work (issue 8, local(8)
    batches): every file is written unnamed, the writeback of all of them
    is started before the first fsync waits (so one journal commit tends to
    cover them all), each is fsync'd and only then linked into new/, and
    each new/ directory that needs it is fsync'd once for the batch, after
    its last link.  The answers are op_mailbox's, one per copy, each on its
    own: a copy that fails never fails the others, and no copy is answered
    "delivered" before its file and its name in new/ are durable."""
    out: list = [None] * len(copies)
    live: list[list] = []     # [index, fd, stat] of the files still on their way
    single: list[int] = []    # delivered one by one (no unnamed files here)
    try:
        for i, (d, content) in enumerate(zip(copies, contents)):
            try:
                fd = _open_unnamed(d)
            except OSError as exc:
                out[i] = _maildir_failed(d, exc)
                continue
            if fd is None:
                single.append(i)
                continue
            try:
                st = os.fstat(fd)
                _virtual.write_message(fd, d, content)
            except (MailboxFull, OSError) as exc:
                os.close(fd)        # unnamed: nothing to clean up
                out[i] = _maildir_failed(d, exc)
                continue
            live.append([i, fd, st])
        if _sync_file_range is not None and len(live) > 1:
            for _, fd, _ in live:
                _sync_file_range(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)
        # The Maildir spec's order: the data is on disk before the file has a name.
        synced = _fsync_all([fd for _, fd, _ in live])
        now = time.time()
        sec, usec = int(now), int((now % 1) * 1_000_000)
        need_sync: dict[str, list[int]] = {}
        for entry, error in zip(live, synced):
            i, fd, st = entry
            d = copies[i]
            try:
                if error is not None:
                    raise error
                newdir = os.path.join(d.path, "new")
                _link_into_new(fd, d, newdir, st, sec, usec)
            except _CannotName:
                _unnamed_state["ok"] = False
                single.append(i)
                continue
            except OSError as exc:
                out[i] = _maildir_failed(d, exc)
                continue
            _unnamed_state["ok"] = True
            if _virtual.maildir_name_ordered(getattr(d, "queue_dev", None), st.st_dev):
                out[i] = _result("2.0.0", MAILDIR_DELIVERED)
            else:
                need_sync.setdefault(newdir, []).append(i)
        for newdir, members in need_sync.items():
            # One fsync that starts after the batch's last link into new/ (and
            # is shared with deliveries of other threads, see DirSyncGroup).
            group = dir_sync_group(newdir)
            try:
                group.sync(newdir, os.fsync, group.ticket())
            except OSError as exc:
                # The names may not be durable: none of these is delivered (a
                # retry may deliver twice, never lose).
                for i in members:
                    out[i] = _maildir_failed(copies[i], exc)
                continue
            for i in members:
                out[i] = _result("2.0.0", MAILDIR_DELIVERED)
    finally:
        for _, fd, _ in live:
            os.close(fd)
    for i in sorted(single):
        # The named tmp/ file and rename, one message at a time.
        try:
            deliver_maildir_unnamed(copies[i], contents[i])
            out[i] = _result("2.0.0", MAILDIR_DELIVERED)
        except (MailboxFull, OSError) as exc:
            out[i] = _maildir_failed(copies[i], exc)
    return out


def op_maildir_batch(home: str, paths: list[str], uid: int, copies: list, contents: list) -> dict:
    """As the user: op_forward_or_mailbox for several messages to the same
    user's Maildir.  The home directory and .forward are checked once; with
    no forward file every copy is delivered (deliver_maildir_batch) and the
    answers come back under "mailbox", one per copy, else op_forward_lookup's
    answer (the caller then expands those messages one by one)."""
    res = op_forward_lookup(home, paths, uid)
    if res:
        return res
    return {"mailbox": deliver_maildir_batch(copies, contents)}


def _mbox_dsn(err: OSError, default: str) -> str:
    # Postfix's mbox_dsn(): lock trouble and ESTALE are temporary, a full
    # disk too; quota errors are "mailbox full".
    if err.errno in (errno.EAGAIN, errno.ESTALE):
        return "4.2.0"
    if err.errno == errno.ENOSPC:
        return "4.3.0"
    if err.errno in (errno.EDQUOT, errno.EFBIG):
        return "5.2.2"
    return default


def _result(dsn: str, reason: str) -> dict:
    status = "sent" if dsn.startswith("2") else "bounced" if dsn.startswith("5") else "deferred"
    return {"status": status, "dsn": dsn, "reason": reason}


def _maildir_failed(d: LocalCopy, exc: BaseException) -> dict:
    """op_mailbox's answer for a Maildir delivery that raised ``exc``."""
    if isinstance(exc, MailboxFull):
        return _result("5.2.2", "maildir delivery failed: error writing message: File too large")
    return _result(_mbox_dsn(exc, "4.2.0"),
                   f"maildir delivery failed: create maildir file {exc.filename or d.path}: "
                   f"{exc.strerror}")


MAILDIR_DELIVERED = "delivered to maildir"


def op_mailbox(d: LocalCopy, user: str, uid: int, strict_owner: bool, chown_to, open_content) -> dict:
    """Mailbox delivery: mbox file or Maildir (path ending in "/")."""
    if d.maildir:
        try:
            deliver_maildir_unnamed(d, open_content)
        except (MailboxFull, OSError) as exc:
            return _maildir_failed(d, exc)
        return _result("2.0.0", MAILDIR_DELIVERED)
    prefix = f"cannot update mailbox {d.path} for user {user}. "
    try:
        try:
            st = os.lstat(d.path)
        except FileNotFoundError:
            st = None
            if chown_to is not None:
                # Root-only spool: create the file as root and hand it to the user.
                fd = os.open(d.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
                os.fchown(fd, *chown_to)
                os.close(fd)
        if st is not None:
            if stat.S_ISLNK(st.st_mode) or not stat.S_ISREG(st.st_mode):
                return _result("5.2.0", prefix + f"destination {d.path} is not a regular file")
            if strict_owner and st.st_uid != uid:
                # strict_mailbox_ownership: somebody else's file is never appended to.
                return _result("4.2.0", prefix + f"destination {d.path} is not owned by recipient")
        deliver_mbox(d, open_content)
    except MailboxFull:
        return _result("5.2.2", prefix + "error writing message: File too large")
    except OSError as exc:
        what = "unable to lock for exclusive access" if exc.errno == errno.EAGAIN else \
            f"cannot open file: {exc.strerror}" if exc.filename else f"error writing message: {exc.strerror}"
        if exc.errno == errno.EAGAIN:
            what += f": {exc.strerror}"
        return _result(_mbox_dsn(exc, "5.2.0"), prefix + what)
    return _result("2.0.0", "delivered to mailbox")


def op_file(d: LocalCopy, open_content) -> dict:
    """/file/name destination: mbox-style append (or Maildir for a trailing "/")."""
    if d.maildir:
        try:
            deliver_maildir_unnamed(d, open_content)
        except MailboxFull:
            return _result("5.2.2", "maildir delivery failed: error writing message: File too large")
        except OSError as exc:
            return _result(_mbox_dsn(exc, "5.2.0"),
                           f"maildir delivery failed: create maildir file {exc.filename or d.path}: "
                           f"{exc.strerror}")
        return _result("2.0.0", "delivered to maildir")
    prefix = f"cannot append message to file {d.path}: "
    try:
        st = os.stat(d.path)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        return _result(_mbox_dsn(exc, "5.2.0"), prefix + f"cannot open file: {exc.strerror}")
    if st is not None and stat.S_ISCHR(st.st_mode):
        # /dev/null and friends: written through, nothing to lock or truncate.
        try:
            fd = os.open(d.path, os.O_WRONLY)
            try:
                for chunk in open_content():
                    os.write(fd, chunk)
            finally:
                os.close(fd)
        except OSError as exc:
            return _result(_mbox_dsn(exc, "5.2.0"), prefix + f"error writing message: {exc.strerror}")
        return _result("2.0.0", f"delivered to file: {d.path}")
    if st is not None and not stat.S_ISREG(st.st_mode):
        return _result("5.2.0", prefix + f"destination {d.path} is not a regular file")
    if st is None:
        # Postfix's safe_open() creates a missing file with O_EXCL and never its
        # directories (deliver_mbox would make them, as virtual(8) does).
        try:
            os.stat(os.path.dirname(d.path) or "/")
        except OSError as exc:
            return _result(_mbox_dsn(exc, "5.2.0"),
                           prefix + f"cannot create file exclusively: {exc.strerror}")
    try:
        deliver_mbox(d, open_content)
    except MailboxFull:
        return _result("5.2.2", prefix + "error writing message: File too large")
    except OSError as exc:
        how = "cannot open file" if st is not None else "cannot create file exclusively"
        return _result(_mbox_dsn(exc, "5.2.0"), prefix + f"{how}: {exc.strerror}")
    return _result("2.0.0", f"delivered to file: {d.path}")


def command_argv(command: str, shell: str = "") -> list[str]:
    """Postfix's exec_command(): exec directly unless the command needs a shell."""
    if shell:   # local_command_shell, e.g. "/some/where/smrsh -c": used for every command
        return [*shell.split(), command]
    words = command.split()
    if not words or any(c in SHELL_META for c in command) or words[0] in SHELL_BUILTINS:
        return ["/bin/sh", "-c", command]
    return words


def _printable(data: bytes) -> str:
    # Line breaks and tabs become spaces (so "text\n" ends in a blank, as in
    # Postfix's log), anything else unprintable becomes "_".
    text = data.decode("utf-8", "replace")
    return "".join(c if c.isprintable() else " " if c in "\n\t\r" else "_" for c in text)


def op_command(command: str, env: dict, cwd: str, time_limit: float, shell: str, copy: LocalCopy,
               open_content) -> dict:
    """Pipe the message into ``command``; map its exit status per sysexits.

    Envelope data only reaches the command through ``env``: the command
    line is the administrator's or user's own text, never mixed with it.
    """
    argv = command_argv(command, shell)
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, env=env, cwd=cwd, close_fds=True,
                                start_new_session=True)
    except OSError as exc:
        return _result("4.3.0", f"Command failed: {exc.strerror}: \"{command}\"")
    kept = bytearray()

    def drain():
        while True:
            b = proc.stdout.read(4096)
            if not b:
                return
            if len(kept) < OUTPUT_KEEP:
                kept.extend(b[:OUTPUT_KEEP - len(kept)])

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    timed_out = threading.Event()

    def kill():
        timed_out.set()
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass

    timer = threading.Timer(time_limit, kill)
    timer.daemon = True
    timer.start()
    try:
        # From_ line and delivery headers, then the message; no >From quoting
        # and no trailing blank line for commands (local(8) EXTERNAL COMMAND DELIVERY).
        sender = copy.sender or "MAILER-DAEMON"
        head = f"From {sender}  {time.asctime()}\n".encode("utf-8", "surrogateescape") + copy.headers()
        try:
            proc.stdin.write(head)
            for chunk in open_content():
                proc.stdin.write(chunk)
            proc.stdin.close()
        except (BrokenPipeError, ValueError, OSError):
            pass   # a command may stop reading early; its exit status decides
        status = proc.wait()
    finally:
        timer.cancel()
    reader.join(5)
    output = _printable(bytes(kept))
    suffix = f". Command output: {output}" if output else ""
    # Postfix's pipe_command(): the x-unix diagnostic is the command's output, else
    # the text for how it ended (side by side with Postfix 3.7).
    if timed_out.is_set():
        return _command_failure("5.3.0", f"Command time limit exceeded: \"{command}\"{suffix}",
                                output or EX_SOFTWARE_TEXT)
    if status == 0:
        return _result("2.0.0", f"delivered to command: {command}")
    if status < 0:
        return _command_failure("4.3.0", f"Command died with signal {-status}: \"{command}\"{suffix}",
                                output or EX_SOFTWARE_TEXT)
    # An enhanced status code opening the output (RFC 3463, followed by white
    # space or nothing) wins over the exit status: its class decides bounce or
    # retry, and a success code counts as a plain failure (5.0.0), as Postfix's
    # bounce_append() ignores it.  The text after it is the whole reason.
    m = _OUTPUT_DSN.match(output)
    if m:
        if m.group(1).startswith("2"):
            res = _command_failure("5.0.0", m.group(2), m.group(2))
            res["ignored_dsn"] = m.group(1)     # logged as Postfix's bounce_append warning
            return res
        return _command_failure(m.group(1), m.group(2), m.group(2))
    if status in SYSEXITS:
        dsn, text = SYSEXITS[status]
        return _command_failure(dsn, text + suffix, output or text)
    return _command_failure("5.3.0", f"Command died with status {status}: \"{command}\"{suffix}",
                            output or f"unknown mail system error {status}")


EX_SOFTWARE_TEXT = SYSEXITS[70][1]
_OUTPUT_DSN = re.compile(r"([245]\.\d{1,3}\.\d{1,3})(?:\s+|$)(.*)", re.S)


def _command_failure(dsn: str, reason: str, diag_text: str) -> dict:
    """A command's result with its RFC 3464 2.3.6 diagnostic typed x-unix (Postfix's
    dsb_unix()); the delivery agent hands diag_type/diag_text on with the result."""
    res = _result(dsn, reason)
    res["diag_type"], res["diag_text"] = "x-unix", diag_text
    return res


def _quote_local(address: str) -> str:
    """Return-Path carries the sender in RFC 822 form, as Postfix's mail_copy() writes it."""
    return _pipe_quote_local(address) if address else address
