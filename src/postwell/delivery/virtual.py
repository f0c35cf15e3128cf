"""virtual(8): deliver to Maildir or mbox files under virtual_mailbox_base.

The mailbox path comes from virtual_mailbox_maps (a trailing "/" means
Maildir), ownership from virtual_uid_maps / virtual_gid_maps.  The file work
runs in user worker processes (local_exec.AsyncWorkerPool, one pool per
mailbox owner), never on the event loop: a worker has the mailbox owner's
uid/gid, so root never writes into a user-controlled directory (Postfix's
set_eugid() in virtual/maildir.c and mailbox.c), and deliveries queued behind
a busy worker go to it as one batch sharing one fsync of new/.  Big messages
(and mailboxes of root) are written by a thread instead.
"""

from __future__ import annotations

from postwell.delivery.pipe import quote_local as _pipe_quote_local

import asyncio
import concurrent.futures
import contextlib
import errno
import fcntl
import itertools
import os
import re
import socket
import threading
import time

from postwell.queue.store import sync_dir_grouped

from .base import DeliveryAgent, DeliveryRequest, MapList, RecipientResult, iter_lines, split_map_list

try:  # start-up warnings name set-but-ignored parameters; these are honoured here
    from postwell.config.registry import register_implemented as _register
except ImportError:  # pragma: no cover
    def _register(*names):
        pass
_register("virtual_mailbox_base", "virtual_mailbox_maps", "virtual_uid_maps", "virtual_gid_maps", "virtual_minimum_uid", "virtual_mailbox_limit", "virtual_mailbox_lock", "virtual_transport", "myhostname")

RELAY = "virtual"
_counter = itertools.count(1)


class MailboxFull(Exception):
    """Writing would pass virtual_mailbox_limit (Postfix gets EFBIG from RLIMIT_FSIZE)."""


class Delivery:
    """One recipient's delivery: everything the file-writing code needs."""

    # st_dev of the queue's file system, when the agent knows it (see maildir_name_ordered).
    queue_dev: int | None = None

    def __init__(self, *, path, maildir, uid, gid, sender, recipient, orig, limit, lock_methods,
                 hostname):
        self.path, self.maildir, self.uid, self.gid = path, maildir, uid, gid
        self.sender, self.recipient, self.orig = sender, recipient, orig
        self.limit, self.lock_methods, self.hostname = limit, lock_methods, hostname

    def headers(self) -> bytes:
        # Same order as Postfix's mail_copy(): Return-Path, X-Original-To, Delivered-To.
        out = [f"Return-Path: <{_quote_local(self.sender)}>\n"]
        # Both addresses in RFC 822 form (quote_822_local), as Postfix writes them:
        # X-Original-To: "a b"@example.org (checked against 3.7), and Delivered-To in
        # the recipient's own case, as virtual(8) 3.7 writes it (loop checks fold case).
        if self.orig:
            out.append(f"X-Original-To: {_quote_local(self.orig)}\n")
        out.append(f"Delivered-To: {_quote_local(self.recipient)}\n")
        return "".join(out).encode("utf-8", "surrogateescape")


class VirtualAgent(DeliveryAgent):
    name = "virtual"

    def __init__(self, config, log=None, clock=time.time, opener=None):
        super().__init__(config, log, clock)
        kw = {"opener": opener} if opener else {}
        self.mailbox_maps = MapList(split_map_list(config.get("virtual_mailbox_maps")), config, **kw)
        self.uid_maps = MapList(split_map_list(config.get("virtual_uid_maps")), config, **kw)
        self.gid_maps = MapList(split_map_list(config.get("virtual_gid_maps")), config, **kw)
        self.base = config.get("virtual_mailbox_base")
        self.minimum_uid = config.get_int("virtual_minimum_uid")
        self.limit = config.get_int("virtual_mailbox_limit")
        self.lock_methods = [m.lower() for m in config.get_list("virtual_mailbox_lock")]
        # Maildir names carry the system host name (Postfix's get_hostname()), not $myhostname.
        self.hostname = socket.gethostname() or config.get("myhostname")
        # Postfix's mail_copy() writes X-Original-To only with enable_original_recipient
        # = yes (orig_to= is still logged either way, checked against 3.7).
        self.original_recipient = config.get_bool("enable_original_recipient")
        self._workers = None
        message_limit = config.get_int("message_size_limit")
        if self.limit and message_limit and self.limit < message_limit:
            # Same start-up refusal as Postfix's virtual(8).
            raise ValueError("configuration error: virtual_mailbox_limit is smaller than message_size_limit")

    # -- lookups -------------------------------------------------------
    @staticmethod
    def _find(maps: MapList, address: str) -> str | None:
        # Postfix's mail_addr_find(): the full address, then the @domain catch-all.
        value = maps.lookup(address)
        if value is None and "@" in address:
            value = maps.lookup("@" + address.rsplit("@", 1)[1])
        return value

    def plan(self, request: DeliveryRequest, rcpt) -> Delivery | RecipientResult:
        address = rcpt.address
        try:
            mailbox = self._find(self.mailbox_maps, address)
        except Exception as exc:  # table trouble is temporary, as in Postfix
            return RecipientResult.deferred(rcpt, f"table lookup failure: {exc}", RELAY, "4.3.0")
        if mailbox is None:
            # virtual(8): unknown user: "x@y"
            return RecipientResult.bounced(rcpt, f'unknown user: "{address.lower()}"', RELAY, "5.1.1")
        ids = []
        for maps, what in ((self.uid_maps, "uid"), (self.gid_maps, "gid")):
            try:
                raw = self._find(maps, address)
            except Exception as exc:
                return RecipientResult.deferred(rcpt, f"table lookup failure: {exc}", RELAY, "4.3.0")
            if raw is None:
                self._warn(f"recipient {address}: {what} not found in virtual_{what}_maps")
                return RecipientResult.deferred(rcpt, "mail system configuration error", RELAY, "4.3.0")
            try:
                ids.append(int(raw.strip()))
            except ValueError:
                self._warn(f"recipient {address}: bad {what} {raw} in virtual_{what}_maps")
                return RecipientResult.deferred(rcpt, "mail system configuration error", RELAY, "4.3.0")
        uid, gid = ids
        if uid < self.minimum_uid:
            self._warn(f"recipient {address}: bad uid {uid} in virtual_uid_maps")
            return RecipientResult.deferred(rcpt, "mail system configuration error", RELAY, "4.3.0")
        if not self.base or ".." in mailbox.split("/"):
            self._warn(f"recipient {address}: bad mailbox {mailbox!r}")
            return RecipientResult.deferred(rcpt, "mail system configuration error", RELAY, "4.3.0")
        path = os.path.join(self.base, mailbox.lstrip("/"))
        d = Delivery(path=path, maildir=mailbox.endswith("/"), uid=uid, gid=gid,
                     sender=request.sender, recipient=address,
                     orig=(rcpt.orig or address) if self.original_recipient else "",
                     limit=self.limit, lock_methods=self.lock_methods, hostname=self.hostname)
        d.queue_dev = self.queue_device
        return d

    @property
    def queue_device(self) -> int | None:
        """st_dev of the queue's file system (see maildir_name_ordered), once."""
        dev = self.__dict__.get("_queue_dev", False)
        if dev is False:
            try:
                dev = os.stat(self.config.get("queue_directory")).st_dev
            except (OSError, TypeError, ValueError, KeyError, AttributeError):
                dev = None
            self._queue_dev = dev
        return dev

    async def _deliver_via_helper(self, request, helper) -> list[RecipientResult]:
        """Unprivileged qmgr: the root helper writes as the mailbox owner."""
        if getattr(self, "_helper", None) is None:
            self._helper = helper.HelperClient(helper.HELPER_SOCKET)
        try:
            raw = await self._helper.deliver(request.queue_id, request.sender, request.nexthop,
                                             request.recipients)
        except (OSError, ConnectionError, ValueError) as exc:
            self._warn(f"virtual delivery helper: {exc}")
            raw = []
        out = []
        for i, rcpt in enumerate(request.recipients):
            if i < len(raw):
                status, dsn, reason = raw[i]
            else:
                status, dsn, reason = "deferred", "4.3.0", "mail system configuration error"
            r = RecipientResult(rcpt, status, dsn, reason, RELAY)
            r.done_time = self.clock()
            out.append(r)
        return out

    def _warn(self, text):
        if self.log:
            self.log.warning(text)

    # -- delivery --------------------------------------------------------
    def _own_plans(self, request: DeliveryRequest) -> list | None:
        """Plans for a request this unprivileged process may carry out itself:
        every mailbox belongs to our own uid/gid, so the root helper's child
        would run with the very identity we already have, minus a fork per
        message.  Anything else (another owner, a lookup problem, a bounce)
        goes to the helper, which decides and logs as before."""
        uid, gid = os.geteuid(), os.getegid()
        plans = []
        warn, self._warn = self._warn, lambda text: None   # the helper warns, not both of us
        try:
            for rcpt in request.recipients:
                plan = self.plan(request, rcpt)
                if isinstance(plan, RecipientResult) or plan.uid != uid or plan.gid != gid:
                    return None
                plans.append(plan)
        finally:
            self._warn = warn
        return plans

    async def deliver(self, request: DeliveryRequest) -> list[RecipientResult]:
        if request.attributes.get("postwell_verify"):
            # verify(8) probe: say where the mail would go, deliver nothing.
            from postwell.verify.probe import virtual_probe
            return virtual_probe(self, request)
        from . import helper
        plans = None
        if helper.HELPER_SOCKET and os.geteuid() != 0:
            plans = self._own_plans(request)
            if plans is None:
                return await self._deliver_via_helper(request, helper)
        results = []
        delivered_to = None
        for i, rcpt in enumerate(request.recipients):
            plan = plans[i] if plans is not None else self.plan(request, rcpt)
            if not isinstance(plan, RecipientResult):
                if delivered_to is None:
                    delivered_to = delivered_to_headers(request.open_content)
                if rcpt.address.lower() in delivered_to:
                    # virtual(8): our own Delivered-To is already there -> loop.
                    plan = RecipientResult.bounced(
                        rcpt, f"mail forwarding loop for {rcpt.address.lower()}", RELAY, "5.4.6")
            if isinstance(plan, RecipientResult):
                plan.done_time = self.clock()
                results.append(plan)
                continue
            status, dsn, reason = await self._write(plan, request)
            r = RecipientResult(rcpt, status, dsn, reason, RELAY)
            r.done_time = self.clock()
            results.append(r)
        return results

    async def _write(self, plan: Delivery, request: DeliveryRequest) -> tuple[str, str, str]:
        from . import local_exec
        pool = None
        if request.content_size <= local_exec.INLINE_MAX:
            if os.geteuid() != 0:
                # Our own mailboxes (see _own_plans): a worker process does the
                # file work, off this busy event loop's interpreter lock.
                pool = self._pool_for(None)
            elif plan.uid != 0 and local_exec._pool is not None:
                # The root helper: the owner's own workers, fed from this loop
                # (no thread per delivery) and batched like the qmgr's.
                pool = self._pool_for(local_exec.Identity(plan.uid, plan.gid))
        if pool is not None:
            data = b"".join(request.open_content())
            res = await pool.run("op_virtual_delivery", [plan, local_exec.InlineContent(data)])
            if res is not None:
                return _outcome(res)
        return await asyncio.get_running_loop().run_in_executor(
            file_executor(), deliver_as_owner, plan, request.open_content)

    MAX_OWNER_POOLS = 256

    def _pool_for(self, ident):
        """The AsyncWorkerPool for one mailbox owner (None: ourselves)."""
        from .local_exec import MAX_WORKERS, AsyncWorkerPool
        if ident is None:
            if self._workers is None:
                self._workers = AsyncWorkerPool()
            return self._workers
        pools = self.__dict__.setdefault("_owner_pools", {})
        key = (ident.uid, ident.gid)
        pool = pools.get(key)
        if pool is None:
            if sum(p._count for p in pools.values()) >= MAX_WORKERS:
                # Bounded processes: other owners' idle workers go first.
                for p in pools.values():
                    p.close()
            if len(pools) >= self.MAX_OWNER_POOLS:
                # Bounded memory: owners whose workers have all retired are forgotten.
                for k in [k for k, p in pools.items() if p._count == 0 and not p._queue]:
                    del pools[k]
            pool = pools[key] = AsyncWorkerPool(ident=ident)
        return pool

    def close(self) -> None:
        if self._workers is not None:
            self._workers.close()
            self._workers = None
        for pool in self.__dict__.pop("_owner_pools", {}).values():
            pool.close()


_DELIVERED_TO = re.compile(rb"^delivered-to:(.*)$", re.I | re.M)


def delivered_to_headers(open_content, limit: int = 1 << 20) -> set[str]:
    """Lower-cased Delivered-To values in the header section (bounded read)."""
    buf = bytearray()
    end = -1
    for chunk in open_content():
        search_from = max(0, len(buf) - 2)
        buf += chunk
        if buf[:1] == b"\n" or buf[:2] == b"\r\n":
            end = 0
            break
        ends = [i + 1 for i in (buf.find(b"\n\n", search_from), buf.find(b"\n\r\n", search_from))
                if i >= 0]
        if ends:
            end = min(ends)
            break
        if len(buf) > limit:
            break
    header = bytes(buf[:end]) if end >= 0 else bytes(buf)
    if len(header) > limit:
        # Only lines that end within the limit count.
        header = header[:header.rfind(b"\n", 0, limit) + 1]
    return {m.group(1).strip().decode("utf-8", "replace").lower()
            for m in _DELIVERED_TO.finditer(header)}


MAILDIR_THREADS = 32
_file_executor: concurrent.futures.ThreadPoolExecutor | None = None
_file_executor_lock = threading.Lock()


def file_executor() -> concurrent.futures.ThreadPoolExecutor:
    """Threads for mailbox writes.  A delivery spends most of its time waiting
    on fsync; with threads of their own, concurrent deliveries' fsyncs overlap
    (the journal commits them together) instead of queueing behind the few
    threads of the event loop's default executor, which the qmgr also uses."""
    global _file_executor
    if _file_executor is None:
        with _file_executor_lock:
            if _file_executor is None:
                _file_executor = concurrent.futures.ThreadPoolExecutor(
                    MAILDIR_THREADS, thread_name_prefix="mailbox")
    return _file_executor


def deliver_as_owner(d: Delivery, open_content) -> tuple[str, str, str]:
    """Deliver with the mailbox owner's privileges; returns (status, dsn, reason)."""
    if os.geteuid() != 0 or d.uid == 0:
        return deliver_one(d, open_content)
    # Root: the file work runs in a child that is the mailbox owner (a
    # persistent user worker in the root helper, see local_exec.run_as).
    from .local_exec import Identity, op_virtual_delivery, run_as
    return _outcome(run_as(Identity(d.uid, d.gid), op_virtual_delivery, d, open_content))


def _outcome(res) -> tuple[str, str, str]:
    """(status, dsn, reason) from a worker's or forked child's answer."""
    if isinstance(res, list) and len(res) == 3:
        status, dsn, reason = res
        return str(status), str(dsn), str(reason)
    error = res.get("error") if isinstance(res, dict) else None
    if not error or error == "delivery child died unexpectedly":
        return "deferred", "4.3.0", "delivery child died unexpectedly"
    return "deferred", "4.3.0", f"delivery child: {error}"


def _errno_dsn(err: OSError, default: str) -> str:
    # Postfix's mbox_dsn(): quota-like errors are "mailbox full", others keep the default.
    if err.errno in (errno.EDQUOT, errno.EFBIG, errno.ENOSPC):
        return "5.2.2" if err.errno != errno.ENOSPC else "4.3.0"
    return default


def _status(dsn: str) -> str:
    return "bounced" if dsn.startswith("5") else "deferred"


def deliver_one(d: Delivery, open_content) -> tuple[str, str, str]:
    if d.maildir:
        try:
            deliver_maildir(d, open_content)
        except MailboxFull:
            return "bounced", "5.2.2", "maildir delivery failed: error writing message: File too large"
        except OSError as exc:
            dsn = _errno_dsn(exc, "4.2.0")
            return _status(dsn), dsn, f"maildir delivery failed: {exc.strerror}: {exc.filename or d.path}"
        return "sent", "2.0.0", "delivered to maildir"
    try:
        deliver_mbox(d, open_content)
    except MailboxFull:
        return ("bounced", "5.2.2",
                f"cannot update mailbox {d.path} for user {d.recipient}. "
                "error writing message: File too large")
    except OSError as exc:
        dsn = _errno_dsn(exc, "4.2.0")
        return (_status(dsn), dsn,
                f"cannot update mailbox {d.path} for user {d.recipient}. {exc.strerror}")
    return "sent", "2.0.0", "delivered to mailbox"


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_limited(fd: int, data: bytes, written: int, limit: int) -> int:
    if limit and written + len(data) > limit:
        raise MailboxFull()
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]
    return written + len(data)


# Per thread, set only while a user worker runs one operation of a batch
# (local_exec._run_batch).
_batch_state = threading.local()


def defer_dir_syncs(into: list | None) -> None:
    """Worker batches: collect the calling thread's new/ directories to
    fsync in ``into`` instead of syncing each one at once (None: back to
    syncing at once)."""
    _batch_state.dirs = into


def write_message(fd: int, d: "Delivery", open_content) -> int:
    """The delivery headers and the queued content into ``fd``; the bytes written.
    The per-file limit is virtual_mailbox_limit (postconf(5): "an individual ...
    maildir file").  The queue's content is already LF lines: its chunks are
    copied as they come, the delivery headers in the same write as the first."""
    pending = d.headers()
    written = 0
    for chunk in open_content():
        if pending:
            chunk, pending = pending + chunk, b""
        written = _write_limited(fd, chunk, written, d.limit)
    if pending:
        written = _write_limited(fd, pending, written, d.limit)
    return written


def sync_new_dir(d: "Delivery", dev: int, newdir: str, sync) -> None:
    """Make the new/ entry durable before "delivered": nothing when the queue
    file's later removal cannot reach the disk before the link (see
    maildir_name_ordered: no new/ fsync, as Postfix's local(8)); in a worker's
    batch its caller fsyncs new/ once for the whole batch before any of it is
    reported; else ``sync(newdir)``."""
    if maildir_name_ordered(getattr(d, "queue_dev", None), dev):
        return
    deferred = getattr(_batch_state, "dirs", None)
    if deferred is not None:
        deferred.append(newdir)
    else:
        sync(newdir)


def deliver_maildir(d: Delivery, open_content) -> None:
    """Maildir delivery (the Maildir spec): write under tmp/, fsync, rename
    into new/, fsync new/.  Returns only when both the file and its name in
    new/ are on disk."""
    tmpdir, newdir, curdir = (os.path.join(d.path, x) for x in ("tmp", "new", "cur"))

    def make_dirs():
        for sub in (tmpdir, newdir, curdir):
            os.makedirs(sub, mode=0o700, exist_ok=True)
    now = time.time()
    sec, usec = int(now), int((now % 1) * 1_000_000)
    host = d.hostname.replace("/", "\\057").replace(":", "\\072")
    # Unique within the process too: several deliveries may run at once in the qmgr.
    tmpfile = os.path.join(tmpdir, f"{sec}.P{os.getpid()}Q{next(_counter)}.{host}")
    # As Postfix's maildir.c: the directories are made only when missing (the
    # create or the rename says ENOENT), not checked on every delivery.
    try:
        fd = os.open(tmpfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileNotFoundError:
        make_dirs()
        fd = os.open(tmpfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    placed = False
    try:
        st = os.fstat(fd)
        write_message(fd, d, open_content)
        os.fsync(fd)
        # The name carries the file's device and inode: unique in new/ for as
        # long as the file exists, so the rename never replaces a message.
        newfile = os.path.join(newdir, f"{sec}.V{st.st_dev:x}I{st.st_ino:x}M{usec}.{host}")
        try:
            os.rename(tmpfile, newfile)
        except FileNotFoundError:
            if not os.path.exists(tmpfile):
                raise
            make_dirs()
            os.rename(tmpfile, newfile)
        placed = True
        # Deliveries running at once into one Maildir share the new/ fsync
        # (group commit); each still returns only after one that covers its rename.
        sync_new_dir(d, st.st_dev, newdir, sync_dir_grouped)
    finally:
        os.close(fd)
        if not placed:
            try:
                os.unlink(tmpfile)
            except OSError:
                pass


# st_dev -> whether that file system writes metadata changes in order.
_ordered_devices: dict[int, bool] = {}


def maildir_name_ordered(queue_dev: int | None, maildir_dev: int) -> bool:
    """True when a Maildir rename needs no fsync of new/ to be safe.

    Postfix's local(8) fsyncs the message file and links it into new/
    without syncing the directory; its qmgr then removes the queue file,
    also unsynced.  Where the Maildir and the queue share one file system
    whose metadata changes are committed in order (a journal: ext3/ext4
    with one, xfs), the removal -- made after the rename -- is never on
    disk without the rename, so a crash can at worst bring the queue file
    back (one duplicate), never lose the message.  Anywhere else (another
    file system, ext4 without a journal, btrfs, NFS, unknown) new/ is
    fsync'd before the delivery is reported, as before."""
    if queue_dev is None or queue_dev != maildir_dev:
        return False
    known = _ordered_devices.get(maildir_dev)
    if known is None:
        try:
            known = metadata_in_order(maildir_dev)
        except Exception:        # whatever the trouble, the new/ fsync is the safe answer
            known = False
        _ordered_devices[maildir_dev] = known
    return known


def metadata_in_order(dev: int, proc: str = "/proc", sys: str = "/sys") -> bool:
    """Does the file system on ``dev`` commit metadata changes in order?
    Read from /proc/self/mountinfo (file system type) and, for ext3/ext4,
    whether it has a journal (/sys/fs/ext4/NAME/journal_task, or
    /proc/fs/jbd2/NAME-8 on kernels without that file)."""
    # Bytes, not text: a user worker cannot import a codec after dropping privileges.
    wanted = f"{os.major(dev)}:{os.minor(dev)}".encode()
    fstype = None
    with open(os.path.join(proc, "self", "mountinfo"), "rb") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 2 and fields[2] == wanted and b"-" in fields[3:]:
                fstype = fields[fields.index(b"-", 3) + 1].decode("utf-8", "replace")
                break
    if fstype == "xfs":
        return True
    if fstype not in ("ext3", "ext4"):
        return False
    name = os.path.basename(os.path.realpath(os.path.join(sys, "dev", "block", wanted.decode())))
    try:
        with open(os.path.join(sys, "fs", "ext4", name, "journal_task"), "rb") as f:
            return f.read().strip() not in (b"", b"<none>")
    except FileNotFoundError:
        return os.path.isdir(os.path.join(proc, "fs", "jbd2", f"{name}-8"))


def _dotlock(path: str, tries: int = 10):
    lock = path + ".lock"
    for i in range(tries):
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.close(fd)
            return lock
        except FileExistsError:
            try:  # a lock older than 500s is stale (Postfix's stale_lock_time default)
                if time.time() - os.stat(lock).st_mtime > 500:
                    os.unlink(lock)
                    continue
            except OSError:
                pass
            time.sleep(0.05 * (i + 1))
    raise OSError(errno.EAGAIN, "unable to lock for exclusive access", lock)


# Mailboxes being appended to by a thread of this process: path -> [lock, users].
# fcntl locks belong to the process, so they never keep out its other
# threads, and a second thread cannot take a dotlock this process holds
# (it would sleep and retry, then defer); Postfix's agents deliver one
# message at a time per process and need neither.  Entries go when unused.
_mailbox_turns: dict[str, list] = {}
_mailbox_turns_lock = threading.Lock()


def _forget_mailbox_turns() -> None:
    # A lock some other thread held at fork() would stay held in the child.
    global _mailbox_turns, _mailbox_turns_lock
    _mailbox_turns, _mailbox_turns_lock = {}, threading.Lock()


os.register_at_fork(after_in_child=_forget_mailbox_turns)


@contextlib.contextmanager
def _mailbox_turn(path: str):
    """This thread's turn at one mailbox among the threads of this process."""
    key = os.path.normpath(path)
    with _mailbox_turns_lock:
        entry = _mailbox_turns.get(key)
        if entry is None:
            entry = _mailbox_turns[key] = [threading.Lock(), 0]
        entry[1] += 1
    try:
        with entry[0]:
            yield
    finally:
        with _mailbox_turns_lock:
            entry[1] -= 1
            if not entry[1] and _mailbox_turns.get(key) is entry:
                del _mailbox_turns[key]


def deliver_mbox(d: Delivery, open_content) -> None:
    """mbox delivery: From_ line, >From quoting, blank line; locked, fsync'd;
    a failed write is undone by truncating to the old size.  Threads of one
    process take turns (_mailbox_turn): without that two big messages were
    written into each other, and one's undo could cut off the other."""
    with _mailbox_turn(d.path):
        _deliver_mbox(d, open_content)


def _deliver_mbox(d: Delivery, open_content) -> None:
    parent = os.path.dirname(d.path)
    if parent:
        os.makedirs(parent, mode=0o700, exist_ok=True)
    lockfile = _dotlock(d.path) if "dotlock" in d.lock_methods else None
    try:
        fd = os.open(d.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
        try:
            if "fcntl" in d.lock_methods:
                fcntl.lockf(fd, fcntl.LOCK_EX)
            st = os.fstat(fd)
            if not (st.st_mode & 0o170000 == 0o100000):
                raise OSError(errno.EPERM, "destination is not a regular file", d.path)
            start = st.st_size
            try:
                sender = d.sender or "MAILER-DAEMON"
                from_line = f"From {sender}  {time.asctime()}\n".encode("utf-8", "surrogateescape")
                written = _write_limited(fd, from_line + d.headers(), start, d.limit)
                buf = bytearray()
                for line in iter_lines(open_content()):
                    if line.startswith(b"From "):
                        buf += b">"  # mboxo quoting, as Postfix's MAIL_COPY_QUOTE
                    buf += line
                    if len(buf) >= 65536:
                        written = _write_limited(fd, bytes(buf), written, d.limit)
                        buf.clear()
                if buf and not buf.endswith(b"\n"):
                    buf += b"\n"
                buf += b"\n"
                written = _write_limited(fd, bytes(buf), written, d.limit)
                os.fsync(fd)
            except BaseException:
                os.ftruncate(fd, start)
                raise
        finally:
            os.close(fd)
    finally:
        if lockfile:
            try:
                os.unlink(lockfile)
            except OSError:
                pass


def _quote_local(address: str) -> str:
    """Return-Path carries the sender in RFC 822 form, as Postfix's mail_copy() writes it."""
    return _pipe_quote_local(address) if address else address
