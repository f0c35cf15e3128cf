"""The on-disk queue: creating, committing, reading, moving and removing queue files.

See :mod:`postwell.queue.format` for the file format, the id format and the
fsync rules this module follows.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import os
import queue
import random
import stat
import threading
import time
import zlib
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

if TYPE_CHECKING:            # annotations only; imported where used (CLI start-up)
    import asyncio
    import concurrent.futures

from . import format as qf
from .format import CorruptQueueFile, Envelope, Recipient

QUEUE_NAMES = ("incoming", "active", "deferred", "hold", "corrupt")
LOG_NAMES = ("defer", "bounce")
# spare/: emptied files of removed messages, whose inodes create() takes again
# (QueueStore.remove(sync=False) and _claim_spare: issue 9).
SPARE_DIR = "spare"
ALL_DIRS = QUEUE_NAMES + ("maildrop",) + LOG_NAMES + ("public", "pid", SPARE_DIR)
SPARE_LIMIT = 1024        # spare files kept at most (about: counted by each remover)
SPARE_MAX_SIZE = 262144   # bigger files are unlinked as before
_spare_clock = time.monotonic   # paces the spare/ listings (tests step it)

COMPLETE_MODE = 0o700     # owner execute bit = "complete" (Postfix's marker)
# Envelope attribute of a message that cleanup put on hold: whoever finds it in
# incoming/ first (cleanup after its commit, or a qmgr scan that raced it) moves it
# to hold/ instead of delivering it.
HOLD_ATTRIBUTE = "postwell_hold"
INCOMPLETE_MODE = 0o600
STALE_AGE = 3600.0        # seconds; an incomplete incoming file older than this is garbage
WRITE_BUFFER = 65536
SMALL_FILE = 16384        # queue files read whole when opened


class QueueWriteError(Exception):
    """A queue file could not be written durably; the partial file has been removed."""

    def __init__(self, msg: str, errno_: int | None = None):
        super().__init__(msg)
        self.errno = errno_


class QueueNoSpaceError(QueueWriteError):
    """ENOSPC / EDQUOT while writing."""


class QueueIOError(QueueWriteError):
    """EIO or another I/O error while writing."""


class QueueFileNotFound(LookupError):
    pass


def _write_error(exc: OSError, what: str) -> QueueWriteError:
    cls = QueueNoSpaceError if exc.errno in (errno.ENOSPC, errno.EDQUOT) else QueueIOError
    return cls(f"{what}: {os.strerror(exc.errno) if exc.errno else exc}", exc.errno)


def fsync_dir(path: str, fsync: Callable[[int], None] = os.fsync) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fsync(fd)
    finally:
        os.close(fd)


class DirSyncGroup:
    """Group commit for one directory's fsync.

    A caller needs a directory fsync that *starts* after its own change
    (link, rename, unlink) was made.  While one fsync is running, everyone
    who arrives waits for it to end and then shares the next one: with N
    sessions committing at once the directory is synced about twice per
    round instead of N times, and nobody returns before an fsync that
    covers its change has completed (so no 250 before its name is durable).
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._started = 0          # generations begun
        self._done = 0             # generations finished (in order: one runs at a time)
        self._running = False
        self._errors: dict[int, BaseException] = {}

    def ticket(self) -> int:
        """The first generation that starts after now: taken right after a
        change, it lets the caller wait a moment (for others' changes) and
        still join any fsync that began meanwhile, which covers its change."""
        with self._cond:
            return self._started + 1

    def sync(self, path: str, fsync: Callable[[int], None], want: int | None = None) -> None:
        with self._cond:
            if want is None:
                want = self._started + 1   # the first generation that starts after our change
            while self._done < want:
                if self._running:
                    self._cond.wait()
                    continue
                self._running = True
                self._started += 1
                gen = self._started
                error: BaseException | None = None
                self._cond.release()
                try:
                    fsync_dir(path, fsync)
                except BaseException as exc:   # every waiter of this generation must see it
                    error = exc
                finally:
                    self._cond.acquire()
                    self._running = False
                    self._done = gen
                    if error is not None:
                        self._errors[gen] = error
                        for old in [g for g in self._errors if g < gen - 1000]:
                            del self._errors[old]
                    self._cond.notify_all()
            error = self._errors.get(want)
        if error is not None:
            raise error


_dir_groups_lock = threading.Lock()
_dir_groups: dict[str, DirSyncGroup] = {}


def _forget_groups_after_fork() -> None:
    # A lock held by another thread at fork() would never be released in the child.
    global _dir_groups_lock, _dir_groups, _syncers, _batchers
    _dir_groups_lock = threading.Lock()
    _dir_groups = {}
    _syncers = {}      # their threads do not exist in the child
    _batchers = {}


os.register_at_fork(after_in_child=_forget_groups_after_fork)


def dir_sync_group(path: str) -> DirSyncGroup:
    group = _dir_groups.get(path)
    if group is None:
        with _dir_groups_lock:
            group = _dir_groups.setdefault(path, DirSyncGroup())
    return group


def sync_dir_grouped(path: str, fsync: Callable[[int], None] = os.fsync,
                     want: int | None = None) -> None:
    """fsync_dir() shared with the other threads of this process (see
    DirSyncGroup); ``want``: a ticket() taken right after the change."""
    dir_sync_group(path).sync(path, fsync, want)


class DirSyncer:
    """Group commit for a busy directory without a waiting thread per caller.

    ``request()`` returns a future that completes when an fsync of the
    directory that started after the request has completed (or fails with its
    error).  One thread per directory takes every request made so far, syncs
    once, answers them all and starts over; it ends after IDLE seconds
    without requests and comes back with the next one.
    """

    IDLE = 5.0

    def __init__(self, path: str, fsync: Callable[[int], None]) -> None:
        self.path = path
        self.fsync = fsync
        self._cond = threading.Condition()
        self._pending: list[concurrent.futures.Future] = []
        self._running = False

    def request(self) -> concurrent.futures.Future:
        import concurrent.futures
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            self._pending.append(fut)
            if self._running:
                self._cond.notify()
            else:
                self._running = True
                threading.Thread(target=self._run, name="qdirsync", daemon=True).start()
        return fut

    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._pending:
                    self._cond.wait(self.IDLE)
                    if not self._pending:
                        self._running = False
                        return
                batch, self._pending = self._pending, []
            try:
                fsync_dir(self.path, self.fsync)
            except BaseException as exc:
                for fut in batch:
                    fut.set_exception(exc)
            else:
                for fut in batch:
                    fut.set_result(None)


_syncers: dict[tuple, DirSyncer] = {}


def dir_syncer(path: str, fsync: Callable[[int], None] = os.fsync) -> DirSyncer:
    key = (path, fsync)
    syncer = _syncers.get(key)
    if syncer is None:
        with _dir_groups_lock:
            syncer = _syncers.setdefault(key, DirSyncer(path, fsync))
    return syncer


_executor_lock = threading.Lock()
_executor: concurrent.futures.ThreadPoolExecutor | None = None
_executor_pid = 0


def commit_executor() -> concurrent.futures.ThreadPoolExecutor:
    """A process-wide pool for commit fsyncs.

    Sized well above the core count: the threads mostly wait in fsync(), and
    many fsyncs in flight at once let the file system fold them into one
    journal commit (group commit).
    """
    global _executor, _executor_pid
    with _executor_lock:
        if _executor is None or _executor_pid != os.getpid():
            import concurrent.futures
            _executor = concurrent.futures.ThreadPoolExecutor(max_workers=64, thread_name_prefix="qcommit")
            _executor_pid = os.getpid()
        return _executor


def _load_sync_file_range():
    """libc's sync_file_range(2), or None: a hint that starts writeback early."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_sync_file_range = _load_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2


class CommitBatcher:
    """Group commit of finished queue files in one directory, for event loops.

    Every file handed over since the last round is made durable in one round
    by one thread: start writeback of all of them, fsync each, set the
    complete marker on each, then one fsync of the directory.  Started
    together, the writebacks land in one journal transaction, so the round
    costs about two journal commits however many sessions reached
    end-of-data meanwhile; each file still gets its own fsync before its
    marker (the commit order of queue/format.py).

    Cost per message (issue 8): every system call of the thread gives up the
    GIL and must win it back from a busy event loop (futex ping-pong, two
    context switches), so the thread makes only the calls the commit order
    needs: no open/close of the directory per round (the creator's directory
    descriptor, which the name was linked through, is fsync'd), no close of
    the files (their event loop closes them when it takes the answer), and
    one wake-up per batch: only a submit that finds the thread idle wakes it.
    The waiters of one event loop are answered with one hand-off per round.

    The round owns each fd from ``submit()`` until the answer; a failed file
    is unlinked by the thread, so a cancelled waiter can never race the round.
    """

    IDLE = 5.0

    def __init__(self, directory: str, fsync: Callable[[int], None]) -> None:
        self.directory = directory
        self.fsync = fsync
        self._lock = threading.Lock()
        self._pending: list = []
        self._running = False     # a thread exists (it may be idle)
        self._idle = False        # ... and waits for a token
        # A token per wake-up: SimpleQueue's put/get cost far less than a Condition.
        self._tokens: queue.SimpleQueue = queue.SimpleQueue()
        self._held: dict[asyncio.AbstractEventLoop, list] = {}   # submit_soon(), per loop
        self.rounds = 0           # for tests and benchmarks
        self.wakeups = 0

    def submit_soon(self, fd: int, path: str, loop: asyncio.AbstractEventLoop,
                    fut: asyncio.Future, dir_fd: int | None = None, owner=None) -> None:
        """submit() at the end of this event-loop turn, together with every other file
        of the turn: one hand-over to the thread instead of one per file.

        ``dir_fd``: the directory the file's name was linked in (fsync'd by the
        round instead of opening ``directory``); ``owner`` keeps whatever owns
        that descriptor alive until the answer."""
        held = self._held.get(loop)
        if held is None:
            held = self._held[loop] = []
            loop.call_soon(self._release, loop)
        held.append((fd, path, loop, fut, dir_fd, owner))

    def _release(self, loop: asyncio.AbstractEventLoop) -> None:
        held = self._held.pop(loop, None)
        if held:
            self.submit_many(held)

    def submit(self, fd: int, path: str, loop: asyncio.AbstractEventLoop,
               fut: asyncio.Future, dir_fd: int | None = None, owner=None) -> None:
        self.submit_many([(fd, path, loop, fut, dir_fd, owner)])

    def submit_many(self, items: list) -> None:
        with self._lock:
            self._pending.extend(items)
            if not self._running:
                self._running = True
                start = True
            else:
                start = False
                if self._idle:
                    # Only the first submit after the thread went idle wakes it; the
                    # ones during a round are picked up when the round ends.
                    self._idle = False
                    self._tokens.put(None)
                    self.wakeups += 1
        if start:
            threading.Thread(target=self._run, name="qcommit", daemon=True).start()

    def _run(self) -> None:
        tokens = self._tokens
        while True:
            with self._lock:
                batch, self._pending = self._pending, []
                if not batch:
                    self._idle = True
            if not batch:
                try:
                    tokens.get(timeout=self.IDLE)
                except queue.Empty:
                    with self._lock:
                        if self._idle and not self._pending:
                            self._idle = self._running = False
                            return
                continue
            errors = self._round(batch)
            self._answer(batch, errors)

    def _round(self, batch: list) -> list[BaseException | None]:
        """Make every file durable; the error of each (None when it is safe to say 250)."""
        fds = [item[0] for item in batch]
        errors: list[BaseException | None] = [None] * len(fds)
        fsync = self.fsync
        if _sync_file_range is not None and len(fds) > 1:
            for fd in fds:
                _sync_file_range(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)   # a hint: errors show in fsync
        for i, fd in enumerate(fds):
            try:
                fsync(fd)
            except BaseException as exc:
                errors[i] = exc
        for i, fd in enumerate(fds):
            if errors[i] is None:
                try:
                    # The marker goes on only after the data is durable; it is not
                    # fsync'd itself (queue/format.py, QueueStore.recover_unmarked).
                    os.fchmod(fd, COMPLETE_MODE)
                except BaseException as exc:
                    errors[i] = exc
        # Every name was linked before its submit(): one fsync of each directory
        # (normally one descriptor for the whole batch) covers them all.
        dirs: dict = {}
        for item in batch:
            dirs.setdefault(item[4], None)
        for dfd in dirs:
            try:
                if dfd is None:
                    fsync_dir(self.directory, fsync)
                else:
                    fsync(dfd)
            except BaseException as exc:
                dirs[dfd] = exc
        for i, item in enumerate(batch):
            if errors[i] is None and dirs[item[4]] is not None:
                errors[i] = dirs[item[4]]
        return errors

    def _answer(self, batch, errors) -> None:
        per_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for item, err in zip(batch, errors):
            if err is not None:
                try:
                    os.unlink(item[1])
                except OSError:
                    pass
            per_loop.setdefault(item[2], []).append((item[3], err, item[0]))
        self.rounds += 1
        for loop, results in per_loop.items():
            try:
                loop.call_soon_threadsafe(_resolve_commits, results)
            except RuntimeError:
                # The loop is closed: nobody waits any more; the files are ours to close.
                for _, _, fd in results:
                    try:
                        os.close(fd)
                    except OSError:
                        pass


def _resolve_commits(results) -> None:
    for fut, err, fd in results:
        try:
            os.close(fd)
        except OSError:
            pass
        if fut.done():
            continue        # the waiter was cancelled
        if err is None:
            fut.set_result(None)
        else:
            fut.set_exception(err)


_batchers: dict[tuple, CommitBatcher] = {}


def commit_batcher(directory: str, fsync: Callable[[int], None] = os.fsync) -> CommitBatcher:
    key = (directory, fsync)
    batcher = _batchers.get(key)
    if batcher is None:
        with _dir_groups_lock:
            batcher = _batchers.setdefault(key, CommitBatcher(directory, fsync))
    return batcher


QMGR_SCAN_INCOMING = b"I"   # Postfix's QMGR_REQ_SCAN_INCOMING
QMGR_FLUSH = b"F"           # QMGR_REQ_FLUSH_DEAD: retry deferred mail now (postqueue -f)


def notify_qmgr(queue_directory: str, request: bytes = QMGR_SCAN_INCOMING) -> None:
    """Wake the queue manager: one byte into public/qmgr, never blocking.

    A lost wake-up costs only the qmgr's periodic scan, so every failure to
    deliver the byte (no reader, FIFO full, no FIFO) is ignored.
    """
    path = os.path.join(queue_directory, "public", "qmgr")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:
        return   # ENXIO: no reader; ENOENT: no FIFO; EACCES: wrong user
    try:
        os.write(fd, request)
    except OSError:
        pass                 # EAGAIN: FIFO full, the qmgr is awake anyway
    finally:
        os.close(fd)


_pid = os.getpid()


def _reset_pid() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_reset_pid)

# (pid, queue directory, descriptor) of the qmgr FIFO kept open by wake_qmgr_kept().
_kept_fifo: tuple[int, str, int] | None = None


def wake_qmgr_kept(queue_directory: str, request: bytes = QMGR_SCAN_INCOMING) -> None:
    """notify_qmgr() through a FIFO descriptor kept open between calls (issue 8:
    the smtpd wakes the qmgr every loop turn under load, and an open and a close
    per wake-up were two system calls more than the write).

    A qmgr that went away shows as EPIPE (nobody reads the FIFO any more): the
    FIFO is then opened again by name, so a restarted qmgr, or a FIFO made anew,
    is found at the next wake-up; as with notify_qmgr(), nothing ever blocks
    and a lost wake-up only costs the qmgr's periodic scan."""
    global _kept_fifo
    kept = _kept_fifo
    if kept is not None and kept[0] == _pid and kept[1] == queue_directory:
        try:
            os.write(kept[2], request)
            return
        except BlockingIOError:
            return               # FIFO full: the qmgr is awake anyway
        except OSError:
            pass                 # EPIPE: no reader now; try the name again
    if kept is not None:
        _kept_fifo = None
        if kept[0] == _pid:      # an inherited number may be someone else's by now
            try:
                os.close(kept[2])
            except OSError:
                pass
    path = os.path.join(queue_directory, "public", "qmgr")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return       # ENXIO: no reader; ENOENT: no FIFO; EACCES: wrong user
    try:
        os.write(fd, request)
    except BlockingIOError:
        pass
    except OSError:
        os.close(fd)
        return
    _kept_fifo = (_pid, queue_directory, fd)


class IncomingMessage:
    """A queue file being written in incoming/.  Not thread-safe; one writer."""

    def __init__(self, store: "QueueStore", queue_id: str, fd: int, arrival: float,
                 dir_fd: int | None = None):
        self.store = store
        self._dir_fd = dir_fd              # incoming/, as the name was linked in it
        self.queue_id = queue_id
        self.path = store.path("incoming", queue_id)
        self.arrival_time = arrival
        self.envelope = Envelope()
        self.content_size = 0
        self._fd: int | None = fd
        # The header's place, zeros ("not committed") until commit() fills it in: a
        # message that fits the buffer goes to disk in one write, header included.
        self._buf = bytearray(qf.HEADER_SIZE)
        self._flushed = 0                  # bytes written to the file so far
        self._crc = 0                      # of the content so far (the header's body CRC)
        self._envelope: bytes | None = None
        self._status_offsets: list[int] = []
        self._env_problem: str | None = None
        self._error: QueueWriteError | None = None
        self.committed = False
        self.aborted = False

    # -- envelope -------------------------------------------------------
    @property
    def sender(self) -> str:
        return self.envelope.sender

    @property
    def recipients(self) -> list[Recipient]:
        return self.envelope.recipients

    def set_sender(self, sender: str, ret: str | None = None, envid: str | None = None,
                   smtputf8: bool = False, body_type: str | None = None) -> None:
        self._envelope = None
        self.envelope.sender = sender or ""
        params = self.envelope.params
        for k, v in (("ret", ret), ("envid", envid), ("body", body_type)):
            if v:
                params[k] = v
            else:
                params.pop(k, None)
        if smtputf8:
            params["smtputf8"] = "1"
        else:
            params.pop("smtputf8", None)

    def add_recipient(self, address: str, orig: str | None = None, orcpt: str | None = None,
                      notify: str | None = None) -> Recipient:
        self._envelope = None
        r = Recipient(address, orig, orcpt, notify, index=len(self.envelope.recipients))
        self.envelope.recipients.append(r)
        return r

    def clear_recipients(self) -> None:
        self._envelope = None
        self.envelope.recipients = []

    def set_attribute(self, name: str, value: str | None) -> None:
        self._envelope = None
        if value is None:
            self.envelope.attributes.pop(name, None)
        else:
            self.envelope.attributes[name] = str(value)

    # -- content --------------------------------------------------------
    @property
    def failed(self) -> QueueWriteError | None:
        return self._error

    def write(self, data: bytes) -> None:
        """Append content.  Raises QueueWriteError on the first failure (sticky)."""
        if self._error is not None:
            raise self._error
        if self._fd is None:
            raise QueueWriteError("queue file is closed")
        self._buf += data
        self.content_size += len(data)
        self._crc = zlib.crc32(data, self._crc)
        if len(self._buf) >= WRITE_BUFFER:
            self._flush()

    def _flush(self) -> None:
        view = memoryview(self._buf)
        try:
            while view:
                n = self.store._write(self._fd, view)
                if n <= 0:
                    raise OSError(errno.EIO, "short write")
                view = view[n:]
        except OSError as exc:
            self._error = _write_error(exc, f"{self.queue_id}: write queue file")
            view.release()
            raise self._error
        view.release()
        self._flushed += len(self._buf)
        self._buf.clear()

    # -- commit ---------------------------------------------------------
    def commit(self) -> None:
        """Make the message durable; on return it is safe to say 250."""
        if self.committed:
            return
        self._commit_file()
        try:
            self._sync_incoming()
        except QueueWriteError:
            self._discard()
            raise
        self._close_committed()

    def packed_envelope(self) -> bytes:
        """The envelope records as commit() will store them (cached until the next
        set_sender/add_recipient/clear_recipients/set_attribute: callers that size
        the message before the commit pay for the packing once)."""
        env = self._envelope
        if env is None:
            env, self._status_offsets, self._env_problem = qf.pack_envelope_checked(self.envelope)
            self._envelope = env
        return env

    def _write_all(self) -> None:
        """Content, envelope and header on the file (not yet durable, not yet
        marked complete).  On failure the file is discarded."""
        if self._fd is None:
            raise QueueWriteError("queue file is closed")
        try:
            if self._error is not None:
                raise self._error
            env = self.packed_envelope()
            env_off = qf.HEADER_SIZE + self.content_size
            # Checked before anything is marked complete: a file the reader would
            # call corrupt must never follow a 250 (it would be lost, not delivered).
            if self._env_problem is not None:
                raise QueueWriteError(f"{self.queue_id}: envelope not storable: {self._env_problem}")
            try:
                # Offsets of recipient status bytes are known only now.
                header = qf.pack_header(int(self.arrival_time * 1_000_000), self.content_size, len(env),
                                        zlib.crc32(env, self._crc))
                if self._flushed == 0:
                    self._buf[:qf.HEADER_SIZE] = header     # one write for the whole file
                    self._buf += env
                    self._flush()
                else:
                    self._buf += env
                    self._flush()
                    if os.pwrite(self._fd, header, 0) != len(header):
                        raise OSError(errno.EIO, "short header write")
            except OSError as exc:
                raise _write_error(exc, f"{self.queue_id}: commit queue file")
            # Record where status bytes live, for callers that keep the object.
            for mine, at in zip(self.envelope.recipients, self._status_offsets):
                mine.status_offset = env_off + at
        except QueueWriteError:
            self._discard()
            raise

    def _commit_file(self) -> None:
        """Everything but the directory: content, envelope, header, fsync,
        complete marker (not fsync'd: QueueStore.recover_unmarked puts back one a
        crash took).  On failure the file is discarded."""
        self._write_all()
        try:
            self.store._fsync(self._fd)
            os.fchmod(self._fd, COMPLETE_MODE)
        except OSError as exc:
            self._discard()
            raise _write_error(exc, f"{self.queue_id}: commit queue file")

    def _sync_incoming(self) -> None:
        """Make the file's name durable.  The name was linked in create(), so
        any incoming/ fsync that starts from now on covers it."""
        try:
            sync_dir_grouped(self.store.path("incoming"), self.store._fsync)
        except OSError as exc:
            raise _write_error(exc, f"{self.queue_id}: commit queue file")

    def _close_committed(self) -> None:
        os.close(self._fd)
        self._fd = None
        self.committed = True

    async def commit_async(self) -> None:
        """commit() without blocking the event loop: the file is written here (page
        cache only), and the fsyncs, the complete marker and the directory fsync
        are done by the directory's CommitBatcher together with every other file
        that reached this point meanwhile (group commit).  Returns once all of
        them are durable; raises QueueWriteError (file removed) otherwise."""
        if self.committed:
            return
        if self.aborted:
            raise QueueWriteError(f"{self.queue_id}: queue file is closed")
        self._write_all()                  # discards the file itself on failure
        import asyncio
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        fd, self._fd = self._fd, None      # the batcher owns it (and has it closed) from now on
        store = self.store
        commit_batcher(store.path("incoming"), store._fsync).submit_soon(
            fd, self.path, loop, fut, self._dir_fd, store)
        try:
            await fut
        except OSError as exc:
            self.aborted = True            # the batcher removed the file
            raise _write_error(exc, f"{self.queue_id}: commit queue file")
        except asyncio.CancelledError:
            # The round still runs; abort() removes whatever it leaves.
            raise
        except BaseException:
            self.aborted = True
            raise
        self.committed = True

    def abort(self) -> None:
        """Throw the message away (rejected, size limit, client gone)."""
        if self.committed or self.aborted:
            return
        self._discard()

    def _discard(self) -> None:
        self.aborted = True
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None
        try:
            os.unlink(self.path)
        except OSError:
            pass

    def __del__(self):  # a dropped, uncommitted message must not leak its fd
        if getattr(self, "_fd", None) is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass


class QueuedMessage:
    """A committed message opened for reading (and per-recipient done marking)."""

    def __init__(self, store: "QueueStore", queue_id: str, queue_name: str, writable: bool = True):
        self.store = store
        self.queue_id = queue_id
        self.queue_name = queue_name
        self.path = store.path(queue_name, queue_id)
        fd = None
        if writable:
            try:
                fd = os.open(self.path, os.O_RDWR)
            except PermissionError:
                fd = None
        if fd is None:
            fd = os.open(self.path, os.O_RDONLY)   # FileNotFoundError propagates
        self._fd: int | None = fd
        try:
            self._load()
        except BaseException:
            self.close()
            raise

    def _load(self) -> None:
        st = os.fstat(self._fd)
        if not stat.S_ISREG(st.st_mode):
            raise CorruptQueueFile("not a regular file")
        if not st.st_mode & stat.S_IXUSR:
            raise CorruptQueueFile("incomplete queue file (no complete marker)")
        self.stat = st
        self._content: bytes | None = None
        if st.st_size <= SMALL_FILE:
            # Header and envelope in one read (a queue listing opens every file).
            whole = os.pread(self._fd, st.st_size, 0)
            h = qf.unpack_header(whole[:qf.HEADER_SIZE], st.st_size)
            env_data = whole[h.envelope_offset:h.envelope_offset + h.envelope_size]
            if h.content_offset + h.content_size <= len(whole):
                # The content came with that read: a delivery (done off the
                # opener's thread) need not read the file again.
                self._content = whole[h.content_offset:h.content_offset + h.content_size]
        else:
            h = qf.unpack_header(os.pread(self._fd, qf.HEADER_SIZE, 0), st.st_size)
            env_data = self._pread_all(h.envelope_size, h.envelope_offset)
        self.header = h
        if len(env_data) != h.envelope_size:
            raise CorruptQueueFile("truncated envelope")
        self.envelope = qf.parse_envelope(env_data, h.envelope_offset)
        self.arrival_time = h.arrival_us / 1_000_000
        self.content_size = h.content_size

    def _pread_all(self, size: int, offset: int) -> bytes:
        parts = []
        while size > 0:
            chunk = os.pread(self._fd, min(size, 1 << 20), offset)
            if not chunk:
                break
            parts.append(chunk)
            size -= len(chunk)
            offset += len(chunk)
        return b"".join(parts)

    # -- envelope accessors ----------------------------------------------
    @property
    def sender(self) -> str:
        return self.envelope.sender

    @property
    def recipients(self) -> list[Recipient]:
        return self.envelope.recipients

    @property
    def pending_recipients(self) -> list[Recipient]:
        return [r for r in self.envelope.recipients if not r.done]

    @property
    def attributes(self) -> dict[str, str]:
        return self.envelope.attributes

    @property
    def params(self) -> dict[str, str]:
        return self.envelope.params

    @property
    def ret(self) -> str | None:
        return self.envelope.params.get("ret")

    @property
    def envid(self) -> str | None:
        return self.envelope.params.get("envid")

    @property
    def smtputf8(self) -> bool:
        return self.envelope.params.get("smtputf8") == "1"

    @property
    def body_type(self) -> str | None:
        return self.envelope.params.get("body")

    # -- content ----------------------------------------------------------
    def iter_content(self, chunk: int = 65536) -> Iterator[bytes]:
        """Yield the message content in chunks: through this object's fd, or from
        the read that opened a small file."""
        offset = self.header.content_offset
        remaining = self.header.content_size
        content = getattr(self, "_content", None)
        if content is not None and remaining:
            if self._fd is None:
                raise ValueError("queue file closed")
            for start in range(0, remaining, chunk):
                yield content[start:start + chunk]
            return
        while remaining > 0:
            if self._fd is None:
                raise ValueError("queue file closed")
            data = os.pread(self._fd, min(chunk, remaining), offset)
            if not data:
                raise CorruptQueueFile("content shorter than recorded")
            offset += len(data)
            remaining -= len(data)
            yield data

    def read_content(self) -> bytes:
        """Whole content in memory: tests and small messages only."""
        return b"".join(self.iter_content())

    # -- per-recipient state ----------------------------------------------
    def mark_done(self, recipients: Iterable[Recipient | str | int], *, sync: bool = True) -> None:
        """Mark recipients finished, in place, durably (one fsync for the batch).

        Accepts Recipient objects from ``.recipients``, indexes, or addresses
        (an address marks every pending recipient with that address).

        ``sync=False`` leaves the marks to the kernel (they survive a killed
        process, not a lost machine): only for a message that is removed right
        after, where an OS crash can at worst bring it back for one more
        delivery, as with Postfix, whose done marks are never fsync'd.
        """
        targets: list[Recipient] = []
        for item in recipients:
            if isinstance(item, Recipient):
                found = [r for r in self.envelope.recipients if r.status_offset == item.status_offset]
            elif isinstance(item, int):
                found = [self.envelope.recipients[item]]
            else:
                found = [r for r in self.envelope.recipients if r.address == item]
            targets.extend(found)
        if self._fd is None:
            raise ValueError("queue file closed")
        changed = False
        for r in targets:
            if r.done:
                continue
            if os.pwrite(self._fd, qf.STATUS_DONE, r.status_offset) != 1:
                raise OSError(errno.EIO, "short write")
            r.done = True
            changed = True
        if changed and sync:
            # Status bytes are overwritten in place (size and blocks unchanged), so
            # fdatasync() makes them durable without a metadata journal commit.
            self.store._datasync(self._fd)

    def release_hold_mark(self) -> bool:
        """Turn the cleanup's hold mark (HOLD_ATTRIBUTE = "1") into "0", in place and
        durably, so a message released from hold/ is not held again when it passes
        through incoming/.  False when there was no mark."""
        if self._fd is None:
            raise ValueError("queue file closed")
        h = self.header
        data = os.pread(self._fd, h.envelope_size, h.envelope_offset)
        at = qf.attribute_value_offset(data, HOLD_ATTRIBUTE, "1")
        if at is None:
            return False
        if os.pwrite(self._fd, b"0", h.envelope_offset + at) != 1:
            raise OSError(errno.EIO, "short write")
        self.store._datasync(self._fd)
        self.envelope.attributes[HOLD_ATTRIBUTE] = "0"
        return True

    def sync_marks(self) -> None:
        """Make done marks written with ``mark_done(sync=False)`` durable."""
        if self._fd is None:
            raise ValueError("queue file closed")
        self.store._datasync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass


class QueueStore:
    """The queue directory.  Safe to use from several processes at once."""

    def __init__(self, queue_directory: str, *, queue_minfree: int = 0, message_size_limit: int = 0,
                 clock: Callable[[], float] = time.time,
                 fsync: Callable[[int], None] = os.fsync,
                 write: Callable[[int, memoryview], int] = os.write):
        self.queue_directory = queue_directory
        self.queue_minfree = queue_minfree
        self.message_size_limit = message_size_limit
        self.clock = clock
        self._fsync = fsync
        # An injected fsync (tests, fault injection) stands in for fdatasync too.
        self._datasync = os.fdatasync if fsync is os.fsync else fsync
        self._write = write
        self._tmp_counter = itertools.count()
        self._dirs: dict[str, str] = {}

    @classmethod
    def from_config(cls, config, **kw) -> "QueueStore":
        return cls(config.get("queue_directory"),
                   queue_minfree=config.get_size("queue_minfree") if config.raw("queue_minfree") is not None else 0,
                   message_size_limit=config.get_size("message_size_limit"), **kw)

    def path(self, queue_name: str, queue_id: str | None = None) -> str:
        # Called several times per message: the directory part is joined once.
        dirs = self._dirs
        if dirs.get("") != self.queue_directory:
            dirs.clear()
            dirs[""] = self.queue_directory
        d = dirs.get(queue_name)
        if d is None:
            d = dirs[queue_name] = os.path.join(self.queue_directory, queue_name)
        if queue_id is None:
            return d
        return f"{d}/{queue_id}"

    # -- layout --------------------------------------------------------------
    def ensure_layout(self, uid: int | None = None, gid: int | None = None) -> None:
        """Create the queue directories (idempotent) with Postfix's modes."""
        os.makedirs(self.queue_directory, exist_ok=True)
        root = os.geteuid() == 0
        for name in ALL_DIRS:
            p = self.path(name)
            if name == "maildrop":
                # World-writable, sticky, not listable: users drop mail through
                # sendmail but can neither find nor read others' (see pickup/).
                mode = 0o1733 if root else 0o700
            elif name == "public":
                mode = 0o711
            elif name == "pid":
                mode = 0o755
            else:
                mode = 0o700
            try:
                os.mkdir(p, mode)
            except FileExistsError:
                pass
            os.chmod(p, mode)   # mkdir's mode is filtered by the umask
            if root and uid is not None:
                # pid/ stays root's as in Postfix; maildrop/public are group postdrop there.
                if name != "pid":
                    os.chown(p, uid, gid if gid is not None and name not in ("maildrop", "public") else -1)
        fsync_dir(self.queue_directory, self._fsync)

    # -- creating --------------------------------------------------------------
    def _microseconds(self, previous: int | None) -> int:
        """The microsecond part of now; after a clash, a value different from the last one
        (the real clock has moved on by the next try; an injected frozen clock is stepped)."""
        t = self.clock()
        us = int((t - int(t)) * 1_000_000) % 1_000_000
        if previous is not None and us == previous:
            us = (previous + 1) % 1_000_000
        return us

    def create(self) -> IncomingMessage:
        """Create a queue file in incoming/ and give it its id."""
        # Every name below is looked up relative to incoming/, kept open between
        # messages: each full path would be walked again, and an open/close per
        # message is two system calls more.  The commit fsyncs that same
        # descriptor, so the directory made durable is the one the name is in.
        top = self._top
        fresh = top is None or self._top_path != self.queue_directory or self._top_pid != _pid
        if fresh:
            self._open_top()
        try:
            return self._create_in(self._top, self._incoming)
        except QueueWriteError as exc:
            # A queue directory removed and made again since it was opened: the old
            # descriptor names a dead directory.  Once more with a fresh one.
            if fresh or exc.errno != errno.ENOENT:
                raise
            self._open_top()
            return self._create_in(self._top, self._incoming)

    _top: int | None = None
    _incoming: int | None = None
    _top_path: str | None = None
    _top_pid = 0
    _old_tops: list | None = None
    _spare_fd: int | None = None
    _spares: list | tuple = ()    # names seen in spare/ not yet tried (this process)
    _spares_listed = -1e9         # _spare_clock() of the last empty listing
    _spares_taken = -1e9          # ... and of the last non-empty one
    _spare_count = -1             # removers: spare/ entries as last counted (+ added since)
    _spare_counted = 0            # ... and how many were added since that count
    _spare_recounted = -1e9       # _spare_clock() of that count

    def _open_top(self) -> int:
        try:
            top = os.open(self.queue_directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise _write_error(exc, "create queue file")
        try:
            inc = os.open("incoming", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=top)
        except OSError as exc:
            os.close(top)
            raise _write_error(exc, "create queue file")
        try:
            spare = os.open(SPARE_DIR, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=top)
        except OSError:
            spare = None         # a queue made before spare/ existed: no reuse
        old, old_inc, old_spare, old_pid = self._top, self._incoming, self._spare_fd, self._top_pid
        self._top, self._incoming, self._top_path, self._top_pid = top, inc, self.queue_directory, _pid
        self._spare_fd, self._spares = spare, []
        if old is not None and old_pid == _pid:
            # Another thread may still be creating through them, and a commit round
            # may still fsync the old incoming/: closed with the store.
            if self._old_tops is None:
                self._old_tops = []
            self._old_tops.extend(fd for fd in (old, old_inc, old_spare) if fd is not None)
        return top

    def __del__(self):
        # A descriptor inherited through fork() is left alone: the child may have
        # closed its descriptors since, and the number may now be someone else's.
        try:
            if self._top_pid != _pid:
                return
            for fd in [self._top, self._incoming, self._spare_fd] + (self._old_tops or []):
                if fd is not None:
                    os.close(fd)
        except Exception:   # noqa: BLE001 - at interpreter exit the module may be gone
            pass

    def _create_in(self, top: int, inc: int) -> IncomingMessage:
        tmp = f"tmp.{_pid}.{next(self._tmp_counter)}"
        inc_path = self.path("incoming")
        tmp_path = f"{inc_path}/{tmp}"    # the same file: a tmp name is never reused
        claimed = self._claim_spare(inc, tmp) if self._spare_fd is not None else None
        if claimed is not None:
            fd, ino = claimed
        else:
            try:
                fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, INCOMPLETE_MODE,
                             dir_fd=inc)
            except OSError as exc:
                raise _write_error(exc, "create queue file")
        try:
            if claimed is None:
                # The header's zeros ("not committed") are written with the content.
                st = os.fstat(fd)
                ino = st.st_ino
                if stat.S_IMODE(st.st_mode) != INCOMPLETE_MODE:
                    # Only a umask masking owner bits changes the mode open() asked for:
                    # the usual case costs no fchmod.
                    os.fchmod(fd, INCOMPLETE_MODE)
            us = None
            for _attempt in range(1000):
                us = self._microseconds(us)
                qid = qf.make_queue_id(us, ino)
                # No look into the other queue directories first (issue 8: four
                # failing lstat() a message): while this file lives no other file on
                # this file system has its inode, so only a file whose name does not
                # match its inode can clash there, and the qmgr renames such files
                # when it starts (QueueStore.misnamed); link() refuses to replace a
                # name in incoming/ itself.
                try:
                    os.link(tmp_path, f"{inc_path}/{qid}")   # never replaces an existing name
                except FileExistsError:
                    continue
                break
            else:
                raise OSError(errno.EEXIST, "cannot find a free queue id")
            os.unlink(tmp, dir_fd=inc)
            # Leftover side logs of an earlier message with this id are not ours.
            # Such orphans do arise while we run (a log postsuper -r kept, left
            # behind when pickup has re-queued the file and freed its inode; a log
            # the qmgr wrote for a message postsuper -d deleted meanwhile, if it
            # dies before taking it back; unsynced unlinks an OS crash undid), so
            # the qmgr's start-up sweep (remove_orphan_logs) cannot stand in for
            # these two unlinks.
            for log in LOG_NAMES:
                try:
                    os.unlink(f"{log}/{qid}", dir_fd=top)
                except OSError:
                    pass
        except OSError as exc:
            os.close(fd)
            try:
                os.unlink(tmp, dir_fd=inc)
            except OSError:
                pass
            raise _write_error(exc, "create queue file")
        return IncomingMessage(self, qid, fd, self.clock(), inc)

    # -- inode reuse (issue 9) ----------------------------------------------------
    # Making a file costs the file system an inode allocation, and ext4 without a
    # journal (the benchmark machine's) skips every inode freed in the last minutes
    # one by one on its way to a free one: with the qmgr freeing one per delivered
    # message, that walk was the smtpd's largest single cost (~280 us of system time
    # a message).  So a message removed as finished (sync=False) leaves its inode in
    # spare/, emptied, and create() takes it back: rename into incoming/ under a
    # temporary name (atomic: of two processes only one gets it), check it is a plain
    # file of ours with no other name, empty it, mark it incomplete, then the usual
    # link to its id.  A file in spare/ is in no queue directory, so no scan takes it
    # for mail; a crash leaves at worst a temporary that purge_stale() removes.
    #
    # The remover does not fsync the queue directory it renamed the file out of.  A
    # system crash could then bring the old name back, now pointing at the next
    # message's content (ext4 without a journal keeps recently freed inodes unused for
    # exactly this reason).  So before a creator takes anything from a listing of
    # spare/, it fsyncs the queue directories (only active/ is normally dirty; a
    # clean directory's fsync writes nothing): every name in the listing left its
    # queue directory before the listing, so the old names are durably gone before
    # the inodes carry new mail.  A non-empty listing is made at most every 50 ms,
    # so that costs a few directory fsyncs a second, not one per message.

    def _claim_spare(self, inc: int, tmp: str) -> tuple[int, int] | None:
        """(fd, inode) of a spare file renamed to ``tmp`` in incoming/, or None."""
        spare = self._spare_fd
        names = self._spares
        misses = 0
        for _attempt in range(6):
            if not names:
                now = _spare_clock()
                if now - self._spares_listed < 0.25 or now - self._spares_taken < 0.05:
                    return None      # spare/ was empty a moment ago: no listing per message
                try:
                    names = os.listdir(spare)
                except OSError:
                    return None
                if not names:
                    self._spares_listed = now
                    return None
                self._spares_taken = now
                if not self._sync_sources():
                    return None
                # Every smtpd worker lists the same names: each starts its walk at
                # its own random place, so that two rarely reach for the same one.
                if len(names) > 1:
                    at = random.randrange(len(names))
                    names = names[at:] + names[:at]
                self._spares = names
            try:
                name = names.pop()
            except IndexError:
                continue             # another thread emptied the list
            try:
                os.rename(name, tmp, src_dir_fd=spare, dst_dir_fd=inc)
                misses = 0
            except FileNotFoundError:
                # Another process took it; twice in a row: our walk has reached the
                # names it took, so look again.
                misses += 1
                if misses >= 2:
                    names.clear()
                continue
            except OSError:
                return None
            fd = None
            try:
                fd = os.open(tmp, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW, dir_fd=inc)
                st = os.fstat(fd)
                # Only a plain file of this user with no other name: a second name (a
                # crash can bring back the removed one) would show the new message.
                if (stat.S_ISREG(st.st_mode) and st.st_nlink == 1
                        and st.st_uid == os.geteuid()):
                    # Always: it also stamps mtime now, as a new file's.  purge_stale()
                    # takes an incomplete file older than an hour for a dead one, and a
                    # small message reaches the disk only at its commit.
                    os.ftruncate(fd, 0)
                    if stat.S_IMODE(st.st_mode) != INCOMPLETE_MODE:
                        os.fchmod(fd, INCOMPLETE_MODE)   # not complete until committed
                    return fd, st.st_ino
            except OSError:
                pass
            if fd is not None:
                os.close(fd)
            try:
                os.unlink(tmp, dir_fd=inc)
            except IsADirectoryError:
                try:
                    os.rmdir(tmp, dir_fd=inc)     # not ours to keep either (if empty)
                except OSError:
                    pass
            except OSError:
                pass
        return None

    def _sync_sources(self) -> bool:
        """fsync every queue directory a spare can have left (see above)."""
        top = self._top
        try:
            for name in QUEUE_NAMES:
                fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=top)
                try:
                    self._fsync(fd)
                finally:
                    os.close(fd)
        except OSError:
            return False         # no reuse now: a fresh file costs only time
        return True

    def _retire(self, path: str, queue_id: str) -> bool:
        """Move a finished message's file to spare/, emptied; False when it is
        not kept (no spare/, spare/ full, an error): then the caller unlinks it."""
        count = self._spare_count
        if count < 0 or self._spare_counted >= 256 or count >= SPARE_LIMIT:
            # Count again now and then (the creators take files out meanwhile); at
            # the limit at most once a second.
            now = _spare_clock()
            if count >= SPARE_LIMIT and now - self._spare_recounted < 1.0:
                return False
            self._spare_recounted = now
            try:
                count = self._spare_count = len(os.listdir(self.path(SPARE_DIR)))
            except OSError:
                self._spare_count = SPARE_LIMIT
                return False
            self._spare_counted = 0
            if count >= SPARE_LIMIT:
                return False
        try:
            # The qmgr removes on its event loop: emptying a big file (its cached
            # pages, its extents) is left to the last close, off the loop, as before.
            st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode) or st.st_size > SPARE_MAX_SIZE:
                return False
            # Emptied while it still has its queue name, which no one else uses: once
            # in spare/ a creator may take it at any moment, and a truncate by name
            # there could land on the next message's content (the name is looked up,
            # then the inode truncated: a taker can slip in between).  Unmarked
            # first, so a crash between the steps leaves an incomplete file the
            # qmgr ignores (and purge_stale() removes), not an empty "corrupt" one.
            os.chmod(path, INCOMPLETE_MODE)
            os.truncate(path, 0)     # its blocks are free now, as unlink's would be
        except OSError:
            return False
        try:
            os.rename(path, self.path(SPARE_DIR, queue_id))
        except OSError:
            return False
        self._spare_count += 1
        self._spare_counted += 1
        return True

    def space_ok(self, size_hint: int = 0) -> bool:
        """Enough free space to accept a message of ``size_hint`` bytes?

        Postfix: reject when free space < max(queue_minfree, 1.5 * message_size_limit)
        plus the announced size (SIZE=).
        """
        try:
            sv = os.statvfs(self.queue_directory)
        except OSError:
            return True
        free = sv.f_bavail * sv.f_frsize
        need = max(self.queue_minfree, int(1.5 * self.message_size_limit)) + max(0, size_hint)
        return free >= need

    # -- reading -----------------------------------------------------------------
    def find(self, queue_id: str) -> str | None:
        """The queue name holding ``queue_id``, or None."""
        if not qf.is_queue_id(queue_id):
            return None
        for q in ("active", "incoming", "deferred", "hold", "corrupt"):
            if os.path.exists(self.path(q, queue_id)):
                return q
        return None

    def open(self, queue_id: str, queue_name: str | None = None, writable: bool = True) -> QueuedMessage:
        """Open a committed message; raises QueueFileNotFound or CorruptQueueFile."""
        names = [queue_name] if queue_name else ["active", "incoming", "deferred", "hold", "corrupt"]
        for q in names:
            try:
                return QueuedMessage(self, queue_id, q, writable=writable)
            except FileNotFoundError:
                continue
        raise QueueFileNotFound(queue_id)

    def scan(self, queue_name: str, skip: "set[str] | frozenset[str]" = frozenset()) -> list[str]:
        """Ids of complete files in a queue directory (temporaries and incomplete files skipped).

        ``skip``: ids the caller already has (the qmgr's messages in progress);
        they are left out before the stat, which is most of a scan's cost."""
        out = []
        try:
            it = os.scandir(self.path(queue_name))
        except FileNotFoundError:
            return out
        with it:
            for e in it:
                if e.name in skip or not qf.is_queue_id(e.name):
                    continue
                try:
                    st = e.stat(follow_symlinks=False)
                except OSError:
                    continue
                if stat.S_ISREG(st.st_mode) and st.st_mode & stat.S_IXUSR:
                    out.append(e.name)
        return sorted(out)

    # -- state changes --------------------------------------------------------
    def move(self, queue_id: str, src: str, dst: str, *, sync: bool = True) -> None:
        """Rename between queue directories, durably (destination dir, then source dir).

        ``sync=False`` skips the directory fsyncs where either outcome of a crash
        is fine, e.g. incoming -> active: start-up scans both, so the message is
        found in one of them (at worst it is tried once more)."""
        if src == dst:
            return
        os.rename(self.path(src, queue_id), self.path(dst, queue_id))
        if sync:
            sync_dir_grouped(self.path(dst), self._fsync)
            sync_dir_grouped(self.path(src), self._fsync)

    _retire_ok = True      # remove(sync=False) keeps inodes in spare/ (False: plain unlink)

    def remove(self, queue_id: str, queue_name: str | None = None, *, sync: bool = True,
               logs: bool = True) -> bool:
        """Remove a message and its side logs.  True when a queue file was removed.

        ``sync=False`` skips the directory fsync: right for a message whose
        recipients are all marked done (durably), which a crash could only
        bring back to be removed again, never delivered twice.  Such a file
        (up to SPARE_MAX_SIZE) goes to spare/, emptied, for create() to reuse.
        ``logs=False``: the caller knows the message has no defer/bounce log
        (the qmgr, which alone writes them, see log_ids()): two failing
        unlinks fewer."""
        removed = False
        if logs:
            # The logs go first: a process dying between the two steps leaves a
            # message without its logs (it was finished or deleted anyway), never a
            # log without its message, which a later message given the same id
            # (same inode, through spare/ or the file system, and same microsecond)
            # would take for its own.
            for log in LOG_NAMES:
                try:
                    os.unlink(self.path(log, queue_id))
                except FileNotFoundError:
                    pass
        names = [queue_name] if queue_name else list(QUEUE_NAMES)
        for q in names:
            path = self.path(q, queue_id)
            if not sync and self._retire_ok:
                # A finished message: its inode is kept for the next create() (see
                # _claim_spare); a file that is not there fails below as before.
                if self._retire(path, queue_id):
                    removed = True
                    break
            try:
                os.unlink(path)
            except FileNotFoundError:
                continue
            if sync:
                sync_dir_grouped(self.path(q), self._fsync)
            removed = True
            break
        return removed

    def remove_orphan_logs(self, queue_ids: Iterable[str]) -> list[str]:
        """Remove the defer/ and bounce/ logs of those ids whose queue file is in
        no queue (maildrop/ counts: postsuper -r keeps the log for mailq while the
        file waits there), and a reset's leftover ``ID.tmp``.  Returns the ids
        whose logs went.  For the qmgr alone (the only writer of logs): at its
        start-up, and for a message deleted under it.

        A file seen in none of the directories is looked for once more: a move
        between two queues (postsuper -h/-H) may pass behind a single walk."""
        gone = []
        places = QUEUE_NAMES + ("maildrop",)
        queue_ids = list(queue_ids)
        present: set[str] = set()
        if len(queue_ids) > 8:
            # One listing per directory beats a look per id in every one of them.
            for q in places:
                try:
                    present.update(os.listdir(self.path(q)))
                except FileNotFoundError:
                    pass

        def queued(qid):
            return any(os.path.lexists(self.path(q, qid)) for q in places)

        for name in queue_ids:
            if name.endswith(".tmp") and qf.is_queue_id(name[:-4]):
                try:
                    os.unlink(self.path("defer", name))
                except OSError:
                    pass
                continue
            if not qf.is_queue_id(name) or name in present or queued(name) or queued(name):
                continue
            for log in LOG_NAMES:
                try:
                    os.unlink(self.path(log, name))
                except FileNotFoundError:
                    pass
            gone.append(name)
        return gone

    def log_ids(self, limit: int) -> set[str] | None:
        """Ids that have a defer/ or bounce/ log now; None when there are more
        than ``limit`` (the caller then asks the file system each time)."""
        out: set[str] = set()
        for log in LOG_NAMES:
            try:
                it = os.scandir(self.path(log))
            except FileNotFoundError:
                continue
            with it:
                for e in it:
                    out.add(e.name)
                    if len(out) > limit:
                        return None
        return out

    def rename_misnamed(self) -> list[tuple[str, str, str]]:
        """Give each queue file whose name does not carry its own inode number
        (a queue restored from a backup, files copied in) a name that does, as
        Postfix's postsuper -s does; its side logs follow it.  Returns
        (queue, old id, new id) per renamed file.

        Such a file is the only kind a new message's id can clash with outside
        incoming/ (no two live files share an inode), so create() checks nothing
        but incoming/ once the qmgr has run this at start-up."""
        done = []
        for q in QUEUE_NAMES:
            for e in self._id_entries(q):
                try:
                    want = int(e.name[5:], 16)
                    if e.inode() == want:
                        continue            # the usual case: no system call
                    st = e.stat(follow_symlinks=False)
                except (OSError, ValueError):
                    continue
                if st.st_ino == want or not stat.S_ISREG(st.st_mode):
                    continue
                us = int(e.name[:5], 16)
                new = None
                for _attempt in range(1000):
                    cand = qf.make_queue_id(us, st.st_ino)
                    try:
                        os.link(e.path, self.path(q, cand))    # never replaces a name
                    except FileExistsError:
                        try:
                            same = os.lstat(self.path(q, cand)).st_ino == st.st_ino
                        except OSError:
                            same = False
                        if same:            # linked before a crash: finish that rename
                            new = cand
                            break
                        us = (us + 1) % 1_000_000
                        continue
                    except OSError:
                        break
                    new = cand
                    break
                if new is None:
                    continue
                try:
                    os.unlink(e.path)
                except OSError:
                    pass
                for log in LOG_NAMES:
                    try:
                        os.rename(self.path(log, e.name), self.path(log, new))
                    except OSError:
                        pass
                done.append((q, e.name, new))
        if done:
            for q in {q for q, _, _ in done}:
                fsync_dir(self.path(q), self._fsync)
            for log in LOG_NAMES:
                fsync_dir(self.path(log), self._fsync)
        return done

    def set_next_attempt(self, queue_id: str, when: float, queue_name: str = "deferred") -> None:
        """Record the next delivery attempt time in the file's mtime (Postfix's way)."""
        p = self.path(queue_name, queue_id)
        st = os.stat(p)
        os.utime(p, (st.st_atime, when))

    def next_attempt(self, queue_id: str, queue_name: str = "deferred") -> float:
        return os.stat(self.path(queue_name, queue_id)).st_mtime

    def _id_entries(self, queue_name: str) -> list:
        """The directory entries named as queue ids in a queue ([] without it)."""
        try:
            it = os.scandir(self.path(queue_name))
        except FileNotFoundError:
            return []
        with it:
            return [e for e in it if qf.is_queue_id(e.name)]

    def clear_retired(self) -> list[str]:
        """Remove what a remover dying inside ``_retire()`` left: an unmarked, empty
        file under a queue id in active/, deferred/ or hold/ (no message is ever
        empty: a committed file has at least its header; files are made only in
        incoming/).  The qmgr calls this when it starts.  Returns "queue/id"."""
        gone = []
        for q in ("active", "deferred", "hold"):
            for e in self._id_entries(q):
                try:
                    st = e.stat(follow_symlinks=False)
                    if stat.S_ISREG(st.st_mode) and st.st_size == 0 \
                            and not st.st_mode & stat.S_IXUSR:
                        os.unlink(e.path)
                        gone.append(f"{q}/{e.name}")
                except OSError:
                    continue
        return gone

    def recover_unmarked(self) -> list[str]:
        """Mark complete the files in incoming/ whose commit reached its fsync but
        whose marker a crash lost (queue/format.py, "Completeness and
        durability"): a valid header, the recorded size, and bytes 64..end that
        match the header's body CRC.  The qmgr calls this when it starts; what
        does not qualify is left to purge_stale().  Returns the ids marked."""
        marked = []
        try:
            it = os.scandir(self.path("incoming"))
        except FileNotFoundError:
            return marked
        with it:
            entries = [e for e in it if qf.is_queue_id(e.name)]
        for e in entries:
            try:
                st = e.stat(follow_symlinks=False)
                if not stat.S_ISREG(st.st_mode) or st.st_mode & stat.S_IXUSR or st.st_size < qf.HEADER_SIZE:
                    continue
                fd = os.open(e.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                head = os.pread(fd, qf.HEADER_SIZE, 0)
                try:
                    qf.unpack_header(head, st.st_size)
                except qf.CorruptQueueFile:
                    continue    # never got its header: the commit did not get that far
                crc, offset = 0, qf.HEADER_SIZE
                while offset < st.st_size:
                    chunk = os.pread(fd, min(st.st_size - offset, 1 << 20), offset)
                    if not chunk:
                        break
                    crc = zlib.crc32(chunk, crc)
                    offset += len(chunk)
                if offset != st.st_size or crc != qf.header_body_crc(head):
                    continue
                # The marker on a durable file, as a commit leaves it, and durable.
                self._fsync(fd)
                os.fchmod(fd, COMPLETE_MODE)
                self._fsync(fd)
                marked.append(e.name)
            except OSError:
                continue
            finally:
                os.close(fd)
        return marked

    def purge_stale(self, max_age: float = STALE_AGE) -> list[str]:
        """Remove incomplete incoming files (and temporaries) older than ``max_age``."""
        removed = []
        now = self.clock()
        try:
            it = os.scandir(self.path("incoming"))
        except FileNotFoundError:
            return removed
        with it:
            for e in it:
                try:
                    st = e.stat(follow_symlinks=False)
                except OSError:
                    continue
                if not stat.S_ISREG(st.st_mode):
                    continue
                complete = qf.is_queue_id(e.name) and st.st_mode & stat.S_IXUSR
                if complete or now - st.st_mtime < max_age:
                    continue
                try:
                    os.unlink(e.path)
                    removed.append(e.name)
                except OSError:
                    pass
        if removed:
            fsync_dir(self.path("incoming"), self._fsync)
        return removed

    # -- side logs ---------------------------------------------------------------
    def _append_log(self, kind: str, queue_id: str, entry: dict[str, str], sync: bool) -> None:
        data = qf.pack_log_entry(entry)
        fd = os.open(self.path(kind, queue_id), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, data)   # one write: concurrent appenders never interleave an entry
            if sync:
                self._fsync(fd)
        finally:
            os.close(fd)

    def append_defer_log(self, queue_id: str, recipient: Recipient | str, dsn: str, reason: str,
                         *, action: str = "delayed", sync: bool = True) -> None:
        self._append_log("defer", queue_id, self._log_entry(recipient, dsn, reason, action), sync)

    def append_bounce_log(self, queue_id: str, recipient: Recipient | str, dsn: str, reason: str,
                          *, action: str = "failed", sync: bool = True) -> None:
        self._append_log("bounce", queue_id, self._log_entry(recipient, dsn, reason, action), sync)

    def _log_entry(self, recipient, dsn, reason, action) -> dict[str, str]:
        if isinstance(recipient, Recipient):
            addr, orig = recipient.address, recipient.orig or ""
        else:
            addr, orig = recipient, ""
        return {"recipient": addr, "orig_rcpt": orig, "status": dsn, "action": action,
                "reason": reason, "time": str(int(self.clock()))}

    def read_defer_log(self, queue_id: str) -> list[dict[str, str]]:
        return self._read_log("defer", queue_id)

    def read_bounce_log(self, queue_id: str) -> list[dict[str, str]]:
        return self._read_log("bounce", queue_id)

    def _read_log(self, kind: str, queue_id: str) -> list[dict[str, str]]:
        try:
            fd = os.open(self.path(kind, queue_id), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return []       # the usual case: no deferral (or bounce) recorded
        try:
            parts, left = [], 4 * 1024 * 1024
            while left > 0:
                chunk = os.read(fd, min(left, 1 << 20))
                if not chunk:
                    break
                parts.append(chunk)
                left -= len(chunk)
        finally:
            os.close(fd)
        return qf.parse_log_entries(b"".join(parts))
