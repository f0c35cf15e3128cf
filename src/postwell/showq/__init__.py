"""showq(8): the queue listing for users who cannot read the queue.

The queue directories belong to $mail_owner (mode 0700), so an ordinary
user's ``mailq`` cannot list them.  As in Postfix, a small service running as
$mail_owner does it for them on the unix socket
``$queue_directory/public/showq`` (mode 0666; the ``public`` directory is
0711, so the name is reachable but not listable), one request per connection.
As Postfix's showq it runs on demand: the master listens on the socket and
forks ``serve(config, sock=...)`` when a client connects; the child exits
after ``max_idle`` seconds without a request.

Wire format (postwell's own; both ends are in this package):

- the client sends one request line, ``show\\n`` (anything else is refused
  with an ``error`` frame);
- the server answers with frames, each ``4-byte big-endian length | payload``;
  a payload is a JSON object: ``{"message": {...}}`` per queued message (the
  fields of ``postqueue -j``), then ``{"end": N}`` with the message count, or
  ``{"error": "text"}``.  A zero-length frame is never sent.

Output is produced while the queue is scanned, in writes of about
``SEND_BUFFER`` bytes (many frames each), so neither side holds the whole
listing and a long listing costs few system calls; a frame is at most ``MAX_FRAME`` bytes (a
message with more recipients than fit is listed with the first ones and a
``truncated`` field).  The client gives up after ``CLIENT_TIMEOUT`` seconds of
silence, the server drops a client that does not read for ``SEND_TIMEOUT``.

Access follows ``authorized_mailq_users`` (Postfix 3.3+; default
``static:anyone``): the server learns the caller's uid from the socket
(SO_PEERCRED) and checks the user name against the list; root and
$mail_owner are always allowed.
"""

from __future__ import annotations

import os
import re
import pwd
import signal
import socket
import stat
import struct
import threading
import time

from postwell.queue import CorruptQueueFile, QueueStore
from postwell.fdutil import unlink_if_ours
from postwell.queue import format as qf

try:  # start-up warnings name set-but-ignored parameters; these are honoured here
    from postwell.config.registry import register_implemented as _register
except ImportError:  # pragma: no cover
    def _register(*names):
        pass
_register("authorized_mailq_users", "showq_service_name")

REQUEST = b"show\n"
MAX_REQUEST = 64
MAX_FRAME = 1 << 20            # bytes per message record
MAX_CLIENTS = 8                # connections served at once; more wait in the backlog
SEND_TIMEOUT = 30.0
CLIENT_TIMEOUT = 60.0
_LEN = struct.Struct(">I")
# showq lists the queues in this order (Postfix's showq.c queue_info[]:
# active before incoming, checked against 3.7).
SHOW_QUEUES = ("maildrop", "active", "incoming", "deferred", "hold")


class ShowqUnavailable(Exception):
    """The service cannot be reached (the mail system is down); the text is
    the reason, worded as the errno text Postfix puts in its message."""


class ShowqRefused(Exception):
    """The service answered with an error.  ``denied`` is set when the user
    is not in authorized_mailq_users: postqueue then prints the text as it
    is and exits EX_NOPERM (77), as Postfix does."""

    def __init__(self, text: str, denied: bool = False):
        super().__init__(text)
        self.denied = denied


def socket_path(config) -> str:
    name = config.get("showq_service_name") or "showq"
    return os.path.join(config.get("queue_directory"), "public", name)


# ---------------------------------------------------------------- framing

# One encoder for every frame (json.dumps with options builds one per call),
# made by the first frame: postqueue run by root imports this module for the
# scan alone and never frames anything.
_encode = None
SEND_BUFFER = 65536   # frames are sent in writes of about this size


def _frame(obj) -> bytes:
    global _encode
    if _encode is None:
        import json
        _encode = json.JSONEncoder(separators=(",", ":")).encode
    data = _encode(obj).encode("utf-8", "surrogateescape")
    return _LEN.pack(len(data)) + data


def message_frame(m: dict) -> bytes:
    """One message's frame, cut down to MAX_FRAME by dropping recipients."""
    data = _frame({"message": m})
    if len(data) <= MAX_FRAME:
        return data
    rcpts = list(m.get("recipients") or [])
    keep = len(rcpts)
    while keep > 0:
        keep //= 2
        cut = dict(m, recipients=rcpts[:keep], truncated=len(rcpts) - keep)
        data = _frame({"message": cut})
        if len(data) <= MAX_FRAME:
            return data
    return _frame({"message": dict(m, recipients=[], truncated=len(rcpts))})


class _Frames:
    """Frames from the socket, read in large pieces (not two reads per frame)."""

    RECV = 262144

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = b""
        self.pos = 0

    def _fill(self, need: int) -> None:
        # Keep the unread tail and append until ``need`` bytes are available.
        parts = [self.buf[self.pos:]]
        have = len(parts[0])
        while have < need:
            chunk = self.sock.recv(max(self.RECV, need - have))
            if not chunk:
                raise EOFError("connection closed by the showq service")
            parts.append(chunk)
            have += len(chunk)
        self.buf = b"".join(parts)
        self.pos = 0

    def next(self) -> bytes:
        if len(self.buf) - self.pos < _LEN.size:
            self._fill(_LEN.size)
        (n,) = _LEN.unpack_from(self.buf, self.pos)
        if n == 0 or n > MAX_FRAME:
            raise ShowqRefused(f"bad record length {n} from the showq service")
        start = self.pos + _LEN.size
        if len(self.buf) - start < n:
            self.pos = start
            self._fill(n)
            start = 0
        self.pos = start + n
        return self.buf[start:start + n]


# ---------------------------------------------------------------- client

def query(queue_directory: str, *, path: str | None = None, timeout: float = CLIENT_TIMEOUT):
    """Yield the queued messages (dicts as for ``postqueue -j``) from showq.

    Raises ShowqUnavailable when the socket cannot be reached (before the
    first message is yielded) and ShowqRefused when the service says no."""
    import json
    path = path or os.path.join(queue_directory, "public", "showq")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(path)
        except OSError as exc:
            raise ShowqUnavailable(exc.strerror or str(exc)) from None
        try:
            sock.sendall(REQUEST)
        except OSError as exc:
            raise ShowqUnavailable(exc.strerror or str(exc)) from None
        frames = _Frames(sock)
        while True:
            try:
                obj = json.loads(frames.next().decode("utf-8", "surrogateescape"))
            except (EOFError, socket.timeout, OSError, ValueError) as exc:
                raise ShowqRefused(f"showq service: {exc}") from None
            if "message" in obj:
                yield obj["message"]
            elif "end" in obj:
                return
            else:
                raise ShowqRefused(str(obj.get("error") or "malformed reply from the showq service"),
                                   bool(obj.get("denied")))
    finally:
        sock.close()


# ---------------------------------------------------------------- server

def _peer_uid(conn: socket.socket) -> int | None:
    try:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _pid, uid, _gid = struct.unpack("3i", creds)
        return uid
    except (OSError, AttributeError):
        return None


def authorized(config, uid: int | None) -> bool:
    """authorized_mailq_users for the connecting uid (root and ourselves always)."""
    if uid is None:
        return False
    if uid == 0 or uid == os.geteuid():
        return True
    spec = (config.get("authorized_mailq_users") or "static:anyone").strip()
    if spec == "static:anyone":
        return True
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = str(uid)
    try:
        # Postfix matches the login name as a string list (names, type:table, !name).
        from postwell.policy.matchlist import StringList
        return bool(StringList("authorized_mailq_users", spec, config).match(name))
    except Exception:   # a broken table: refuse, as Postfix does on a lookup error
        return False


# ---------------------------------------------------------------- the scan
# Shared by this service and by postqueue run as root or $mail_owner, so both
# paths list exactly the same records.

def collect_maildrop(store: QueueStore):
    """Messages that sendmail dropped and pickup has not taken yet.

    They have no queue id: the listing shows a short prefix of the file's random
    name (``listed_id``: the full name would let any user read the file), which
    root's ``postcat -q`` and ``postsuper -d`` accept, and the size of the file
    Postfix's postdrop would have written (``postdrop_size``), as Postfix's mailq
    shows.  Unreadable or half-written files are skipped, as showq does.
    """
    mdir = store.path("maildrop")
    try:
        names = sorted(os.listdir(mdir))
    except OSError:
        return
    if not names:
        return   # the usual case: mailq then starts without loading pickup
    from postwell.pickup.maildrop import NAME_RE, MaildropFormatError, listed_id, read_maildrop
    from postwell.pickup.maildrop_size import postdrop_size
    for name in names:
        if not NAME_RE.match(name):
            continue   # temporaries (.tmp.*) and strays
        try:
            fd = os.open(os.path.join(mdir, name), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                continue
            drop = read_maildrop(fd, st.st_size)
            env = drop.envelope
            size = postdrop_size(env, drop.iter_content())
        except (OSError, MaildropFormatError):
            continue
        finally:
            os.close(fd)
        yield {
            "queue_name": "maildrop",
            "queue_id": listed_id(name),
            "arrival_time": int(env.submit_time or st.st_mtime),
            "message_size": size,
            "forced_expire": False,
            "sender": listed_address(env.sender or "MAILER-DAEMON"),
            "recipients": [{"address": listed_address(r)} for r in env.recipients],
        }


def collect_requeued(store: QueueStore):
    """Queue files that ``postsuper -r`` moved into maildrop/ and pickup has not
    sent through cleanup yet: Postfix's showq lists them from maildrop/ under their
    queue id, with the delay reasons of their defer log (checked against 3.7)."""
    try:
        owner = os.stat(store.path("maildrop")).st_uid   # the mail owner's directory
    except OSError:
        return
    yield from _collect_queue(store, "maildrop", owner)


# The listing opens every queue file, so per file it does the least: one
# open relative to the queue directory, one fstat (type, the complete marker,
# the postsuper -e mark and the size the header must agree with), one pread
# for a small message, close.  The store's scan() would stat each file first
# and QueuedMessage would build the whole envelope; neither is needed here.
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
# A listing must not write: without O_NOATIME (relatime) the first read of
# each new queue file updates its atime, dirtying 100,000 inodes for one mailq.
# The kernel allows it to the file's owner ($mail_owner) and root only.
_NOATIME = getattr(os, "O_NOATIME", 0)
# postwell.qmgr.expire.EXPIRE_BIT; not imported from there because importing
# the qmgr package costs mailq more start-up time than the whole listing of
# a small queue (tests/test_showq.py checks the two agree).
_EXPIRE_BIT = stat.S_IXGRP
_MAX_LOG = 4 * 1024 * 1024     # as QueueStore._read_log: a larger defer log is read in part


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except (FileNotFoundError, NotADirectoryError):
        return []


_NO_REASON = "(description unavailable)"   # bounce_log_read()'s stand-in


def _read_reasons(dir_fd: int, queue_id: str) -> list[tuple[str, str]]:
    """The (recipient, delay reason) entries of defer/ID in their order (none
    when it went away)."""
    try:
        try:
            fd = os.open(queue_id, _OPEN_FLAGS | _NOATIME, dir_fd=dir_fd)
        except PermissionError:
            if not _NOATIME:
                raise
            fd = os.open(queue_id, _OPEN_FLAGS, dir_fd=dir_fd)
    except OSError:
        return []
    try:
        data = os.read(fd, 65536)   # one read for any usual log
        if len(data) == 65536:
            parts, left = [data], _MAX_LOG - len(data)
            while left > 0:
                chunk = os.read(fd, min(left, 1 << 20))
                if not chunk:
                    break
                parts.append(chunk)
                left -= len(chunk)
            data = b"".join(parts)
    except OSError:
        return []
    finally:
        os.close(fd)
    # Postfix's showq reads the log with bounce_log_read(), whose split_nameval()
    # trims blanks around a value: a command's output ending in a blank is listed
    # as "(busy now)", not "(busy now )"; an entry without a reason (none, empty,
    # blanks) has "(description unavailable)" (checked against 3.7).  Entries
    # without a recipient (the delay-warning marker) are not listed.
    return [(e["recipient"], e.get("reason", "").strip() or _NO_REASON)
            for e in qf.parse_log_entries(data) if e.get("recipient")]


# Postfix's showq remembers this many defer-log recipients (duplicate_filter_limit's
# default) to leave out of the queue file's list.
DUP_FILTER_LIMIT = 1000
# An address whose local part is an RFC 5322 dot-atom (3.2.3), with printable text
# only: listed as it is, the usual case.
# 8-bit text counts as atom text (QUOTE_FLAG_8BITCLEAN).
_ATEXT = r'[^\x00-\x20()<>@,;:\\".\[\]\x7f]+'
_PLAIN = re.compile(rf'{_ATEXT}(?:\.{_ATEXT})*(?:@[^@\x00-\x1f\x7f]*)?\Z').match
_DOT_ATOM = re.compile(rf'{_ATEXT}(?:\.{_ATEXT})*\Z').match
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f]")


def listed_address(address: str) -> str:
    """An address as Postfix's showq lists it: quote_822_local() (a local part that
    is not a dot-atom in quotes, '"' and '\\' escaped), control characters
    shown as '?' (printable())."""
    if _PLAIN(address):
        return address
    local, at, domain = address.rpartition("@")
    if not at:
        local, domain = address, ""
    if not _DOT_ATOM(local):
        local = '"' + local.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return _UNPRINTABLE.sub("?", local + (at + domain if at else ""))


def _listed_recipients(entries: list[tuple[str, str]], rcpts: list[str]) -> list[dict]:
    """A message's recipients with their delay reasons from defer/ID.

    The list is Postfix's showq's (showq_report(), showq_reasons()): every log
    entry in log order, then, without a reason, the pending recipients it did
    not name (those an interrupted attempt did not reach, or whose address the
    log names in another form: bob%remote@here delivered as bob@remote, an
    alias expanded by local(8)).  A log that names a pending recipient twice
    and nothing else has outlived an attempt (Postfix starts each one with an
    empty log): each recipient is then listed once, in queue order, with its
    last reason."""
    pending = set(rcpts)
    logged = [a for a, _ in entries]
    if len(set(logged)) < len(logged) and all(a in pending for a in logged):
        last = dict(entries)
        out = []
        for a in rcpts:
            why = last.get(a)
            out.append({"address": listed_address(a), "delay_reason": why} if why
                       else {"address": listed_address(a)})
        return out
    out, named = [], set()
    for a, why in entries:
        a = listed_address(a)
        if len(named) < DUP_FILTER_LIMIT:
            named.add(a)
        out.append({"address": a, "delay_reason": why} if why else {"address": a})
    for a in rcpts:
        a = listed_address(a)
        if a not in named:
            out.append({"address": a})
    return out


def _collect_queue(store: QueueStore, qname: str, owner: int | None = None):
    """``owner``: list only files of this uid that others cannot read, with one
    link (maildrop/, which anyone may write into: pickup's rule for a requeued file)."""
    qdir = store.path(qname)
    match = qf.QUEUE_ID_RE.match
    names = sorted(n for n in _listdir(qdir) if match(n))
    if not names:
        return
    # defer/ is listed after the queue directory: a message that reached this
    # queue after a deferral already had its defer log when the queue was listed.
    # Only logs that exist are opened (most messages outside deferred/ have none).
    logged = set(_listdir(store.path("defer")))
    try:
        qfd = os.open(qdir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    dfd = -1
    if logged:
        try:
            dfd = os.open(store.path("defer"), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            logged = set()
    opn, fstat, close, read_listing = os.open, os.fstat, os.close, qf.read_listing
    S_ISREG, complete = stat.S_ISREG, stat.S_IXUSR
    flags = _OPEN_FLAGS | _NOATIME
    try:
        for qid in names:
            try:
                fd = opn(qid, flags, dir_fd=qfd)
            except PermissionError:
                if not flags & _NOATIME:
                    continue
                flags = _OPEN_FLAGS    # not the files' owner: read them the plain way
                try:
                    fd = opn(qid, flags, dir_fd=qfd)
                except OSError:
                    continue
            except OSError:
                continue   # delivered or moved while we looked
            try:
                st = fstat(fd)
                mode = st.st_mode
                if not S_ISREG(mode) or not mode & complete:
                    continue   # not (yet) a message: no complete marker
                if owner is not None and (st.st_uid != owner or mode & stat.S_IROTH
                                          or st.st_nlink != 1):
                    continue   # a user's look-alike: pickup sets it aside
                arrival_us, size, sender, rcpts = read_listing(fd, st.st_size)
            except (CorruptQueueFile, OSError):
                continue
            finally:
                close(fd)
            if qid in logged:
                items = _listed_recipients(_read_reasons(dfd, qid), rcpts)
            else:
                items = [{"address": listed_address(a)} for a in rcpts]
            yield {
                "queue_name": qname,
                "queue_id": qid,
                "arrival_time": int(arrival_us / 1_000_000),
                "message_size": size,
                "forced_expire": bool(mode & _EXPIRE_BIT),
                "sender": listed_address(sender or "MAILER-DAEMON"),
                "recipients": items,
            }
    finally:
        os.close(qfd)
        if dfd >= 0:
            os.close(dfd)


def collect(store: QueueStore):
    """Yield one dict per queued message (the fields of ``postqueue -j``)."""
    for qname in SHOW_QUEUES:
        if qname == "maildrop":
            yield from collect_maildrop(store)
            yield from collect_requeued(store)
        else:
            yield from _collect_queue(store, qname)


def _messages(queue_directory: str):
    return collect(QueueStore(queue_directory))


def handle(conn: socket.socket, config, log=None) -> None:
    """Serve one connection: read the request, stream the listing."""
    conn.settimeout(SEND_TIMEOUT)
    try:
        req = b""
        while not req.endswith(b"\n") and len(req) < MAX_REQUEST:
            chunk = conn.recv(MAX_REQUEST - len(req))
            if not chunk:
                break
            req += chunk
        if req != REQUEST:
            conn.sendall(_frame({"error": "unknown request"}))
            return
        uid = _peer_uid(conn)
        if not authorized(config, uid):
            try:
                name = pwd.getpwuid(uid).pw_name
            except (KeyError, TypeError):
                name = "unknown"
            # Postfix's postqueue wording (it checks the list itself, set-gid).
            conn.sendall(_frame({"error": f"User {name}({uid}) is not allowed to view the mail queue",
                                 "denied": True}))
            return
        count = 0
        buf: list[bytes] = []
        size = 0
        for m in _messages(config.get("queue_directory")):
            frame = message_frame(m)
            buf.append(frame)
            size += len(frame)
            count += 1
            if size >= SEND_BUFFER:
                conn.sendall(b"".join(buf))
                buf.clear()
                size = 0
        buf.append(_frame({"end": count}))
        conn.sendall(b"".join(buf))
    except (OSError, socket.timeout):
        pass   # the client went away or stopped reading: nothing to clean up
    except Exception as exc:   # a bug must not kill the service, only this request
        if log is not None:
            log.warning(f"request failed: {exc!r}")
        try:
            conn.sendall(_frame({"error": "internal error"}))
        except OSError:
            pass
    finally:
        try:
            conn.close()
        except OSError:
            pass


def listen(path: str) -> tuple[socket.socket, int]:
    """Bind the public socket (mode 0666), replacing a stale one; the socket and
    the inode of the file it bound.  The inode is taken before the rename (it
    survives it), not from ``path`` afterwards: a newer
    showq (a reload) may replace the name at any moment, and the older one must
    not remove the newer one's socket on exit."""
    # Whatever is left at the name (the socket of a stopped master, which
    # Postfix leaves in place, or a stray plain file) is replaced by the
    # rename below, as Postfix's unix_listen() unlinks it before bind();
    # only a directory there makes the rename fail.
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    tmp = f"{path}.{os.getpid()}"
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    sock.bind(tmp)
    # Any local user may ask; authorisation is per request (SO_PEERCRED).
    os.chmod(tmp, 0o666)
    sock.listen(64)        # before the rename: a client that sees the name can connect
    ino = os.stat(tmp).st_ino
    os.rename(tmp, path)   # atomic: clients never see a half-set-up socket
    return sock, ino


def serve(config, stop_event: threading.Event | None = None, *,
          sock: socket.socket | None = None, max_idle: float | None = None,
          clock=time.monotonic) -> None:
    """The master's entry point: answer showq requests until SIGTERM.

    With ``sock`` the service runs on demand, as Postfix's master runs showq:
    the master owns the listening socket (and its name) and forks this child
    when a client connects; the child returns once no request has come for
    ``max_idle`` seconds, so a quiet system carries no showq process.  Without
    it the service binds the name itself (tests, tools)."""
    from postwell.log import MailLog
    log = MailLog.from_config(config, "showq")
    path = socket_path(config)
    owned = sock is None
    if owned:
        sock, ino = listen(path)
    stop = stop_event or threading.Event()
    if stop_event is None:
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())
    sock.settimeout(0.5)
    slots = threading.BoundedSemaphore(MAX_CLIENTS)
    workers: set[threading.Thread] = set()
    last = clock()

    def run(conn):
        try:
            handle(conn, config, log)
        finally:
            slots.release()

    try:
        while not stop.is_set():
            if max_idle is not None:
                workers = {w for w in workers if w.is_alive()}
                if workers:
                    last = clock()
                elif clock() - last >= max_idle:
                    break   # idle: the master starts a new one at the next request
            if not slots.acquire(timeout=0.5):
                continue
            try:
                conn, _ = sock.accept()
            except (socket.timeout, InterruptedError, BlockingIOError):
                slots.release()
                continue
            except OSError as exc:
                slots.release()
                log.warning(f"accept: {exc.strerror or exc}")
                stop.wait(1.0)
                continue
            last = clock()
            t = threading.Thread(target=run, args=(conn,), daemon=True, name="showq")
            workers = {w for w in workers if w.is_alive()}
            workers.add(t)
            t.start()
    finally:
        if owned:
            sock.close()
            unlink_if_ours(path, ino)
        for w in list(workers):
            w.join(SEND_TIMEOUT)
