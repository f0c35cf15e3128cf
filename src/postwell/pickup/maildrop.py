"""The maildrop file format (version 1): what sendmail writes and pickup reads.

A maildrop file is one submitted message, written by ``sendmail`` as the
submitting user into ``$queue_directory/maildrop``.  Layout::

    POSTWELL-MAILDROP 1\\n            magic and format version
    size 00000000000000001234\\n      content size: exactly 20 decimal digits
    <content>                        the message, LF line ends, size bytes
    <envelope lines>                 "name value\\n", see below
    end\\n                            last line; must end exactly at end of file

The content comes first so that sendmail can stream it straight from its
standard input and add what it learns while reading (recipients taken from
the headers with ``-t``) afterwards; the size field is written in place once
the content is complete (a fixed-width field, so the layout never moves).

Envelope lines (values are escaped: ``%`` and the bytes 0x00-0x1F, 0x7F as
``%XX``; other bytes are UTF-8 as given)::

    time <seconds since the epoch, decimal>      exactly once
    sender <address>                            exactly once (empty: null sender)
    rcpt <address>                              zero or more (empty: cleanup sends
                                                it to $empty_address_recipient)
    rcpt-notify <NOTIFY value>                  optional, right after its rcpt line
    rcpt-orcpt <type;address>                   optional, right after its rcpt line
                                                (both from sendmail -bs: RFC 3461)
    fullname <text>                             -F, or the user's GECOS name
    notify <NEVER | SUCCESS,FAILURE,DELAY subset>   -N (applies to every recipient)
    ret <FULL | HDRS>                           -R
    envid <text>                                -V
    body <7BIT | 8BITMIME>                      -B
    rewrite <local | remote>                    -G selects remote
    protocol <SMTP | ESMTP>                     sendmail -bs only
    helo <name>                                 sendmail -bs only
    verify <user>                               sendmail -bv only (a report, no delivery)
    trace <record>                              sendmail -v: deliver, then mail the sender
                                                a report of the first delivery attempt

Anything else (unknown names, repeated single-valued names, bad escapes, a
size that disagrees with the file, missing ``end``) makes the file corrupt.
The submitter is never taken from the file: it is the file's owner (st_uid).
"""

from __future__ import annotations

import errno
import os
import re
import time
from dataclasses import dataclass, field
from typing import Callable

MAGIC = b"POSTWELL-MAILDROP 1\n"
SIZE_PREFIX = b"size "
SIZE_DIGITS = 20
PREAMBLE_SIZE = len(MAGIC) + len(SIZE_PREFIX) + SIZE_DIGITS + 1
END_LINE = b"end\n"
# Readable by pickup (mail_owner), so by anyone who knows the full name: the name is
# the only secret (the 1733 directory cannot be listed by users), and mailq shows a
# short prefix of it instead (listed_id), never the name itself.
FILE_MODE = 0o644
MAX_ENVELOPE = 4 * 1024 * 1024   # bound on envelope bytes pickup is willing to parse
NAME_RE = re.compile(r"^[0-9a-f]{32}$")   # 128 random bits, hex
LISTED_ID_LEN = 10                        # hex digits of the name that mailq shows
TMP_PREFIX = ".tmp."
WRITE_BUFFER = 65536

SINGLE = ("time", "sender", "fullname", "notify", "ret", "envid", "body", "rewrite", "protocol", "helo",
          "verify", "trace")
MULTI = ("rcpt",)
PER_RCPT = ("rcpt-notify", "rcpt-orcpt")
_NOTIFY_WORDS = {"SUCCESS", "FAILURE", "DELAY"}


def listed_id(name: str) -> str:
    """The queue id mailq/postqueue -j show for a maildrop file: the first 40 bits
    of its name, upper case like a Postfix queue id.  Users may read the listing
    (through showq), and the full name would let any of them open another user's
    message; the 88 bits left out keep it unguessable.  Root's postcat -q and
    postsuper -d accept it (names_for_id)."""
    return name[:LISTED_ID_LEN].upper()


def names_for_id(maildrop_dir: str, queue_id: str) -> list[str]:
    """The maildrop file names a queue id given to postcat/postsuper stands for:
    the full name itself, a queue file that ``postsuper -r`` put there under its
    queue id (as Postfix's), or every file whose listed_id() it is."""
    if NAME_RE.match(queue_id):
        return [queue_id]
    from postwell.queue.format import is_queue_id
    requeued = []
    if is_queue_id(queue_id) and os.path.isfile(os.path.join(maildrop_dir, queue_id)):
        requeued = [queue_id]
    if len(queue_id) != LISTED_ID_LEN or not re.fullmatch(r"[0-9A-Fa-f]+", queue_id):
        return requeued
    prefix = queue_id.lower()
    try:
        names = os.listdir(maildrop_dir)
    except OSError:
        return requeued
    return requeued + sorted(n for n in names if n.startswith(prefix) and NAME_RE.match(n))


class MaildropFormatError(Exception):
    """The file is not a well-formed maildrop file; ``reason`` says why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class MaildropEnvelope:
    sender: str = ""
    recipients: list[str] = field(default_factory=list)
    rcpt_notify: dict[int, str] = field(default_factory=dict)   # recipient index -> NOTIFY
    rcpt_orcpt: dict[int, str] = field(default_factory=dict)    # recipient index -> ORCPT
    submit_time: float = 0.0
    fullname: str | None = None
    notify: str | None = None
    ret: str | None = None
    envid: str | None = None
    body: str | None = None
    rewrite: str = "local"
    protocol: str | None = None
    helo: str | None = None
    verify: str | None = None      # "user": sendmail -bv, a report instead of delivery
    trace: str | None = None       # "record": sendmail -v, a report after delivery

    def pack(self) -> bytes:
        lines = [_line("time", f"{self.submit_time:.6f}"), _line("sender", self.sender)]
        for name in ("fullname", "notify", "ret", "envid", "body"):
            value = getattr(self, name)
            if value is not None:
                lines.append(_line(name, value))
        lines.append(_line("rewrite", self.rewrite))
        for name in ("protocol", "helo", "verify", "trace"):
            value = getattr(self, name)
            if value is not None:
                lines.append(_line(name, value))
        for i, r in enumerate(self.recipients):
            lines.append(_line("rcpt", r))
            if i in self.rcpt_notify:
                lines.append(_line("rcpt-notify", self.rcpt_notify[i]))
            if i in self.rcpt_orcpt:
                lines.append(_line("rcpt-orcpt", self.rcpt_orcpt[i]))
        lines.append(END_LINE)
        return b"".join(lines)


def escape(value: str) -> bytes:
    raw = value.encode("utf-8", "surrogateescape")
    out = bytearray()
    for b in raw:
        if b == 0x25 or b < 0x20 or b == 0x7F:
            out += b"%%%02X" % b
        else:
            out.append(b)
    return bytes(out)


_ESC_RE = re.compile(rb"%([0-9A-F]{2})")


def unescape(raw: bytes) -> str:
    if re.search(rb"[\x00-\x1f\x7f]", raw):
        raise MaildropFormatError("unescaped control character in envelope")
    pos = 0
    out = bytearray()
    while True:
        i = raw.find(b"%", pos)
        if i < 0:
            out += raw[pos:]
            break
        m = _ESC_RE.match(raw, i)
        if not m:
            raise MaildropFormatError("bad escape in envelope")
        out += raw[pos:i]
        out.append(int(m.group(1), 16))
        pos = m.end()
    return bytes(out).decode("utf-8", "surrogateescape")


def _line(name: str, value: str) -> bytes:
    return name.encode() + b" " + escape(value) + b"\n"


def _check_values(env: MaildropEnvelope) -> None:
    for notify in [env.notify, *env.rcpt_notify.values()]:
        if notify is None:
            continue
        words = notify.split(",")
        if not (notify == "NEVER" or (all(w in _NOTIFY_WORDS for w in words)
                                       and len(set(words)) == len(words))):
            raise MaildropFormatError(f"bad notify value {notify!r}")
    if env.ret is not None and env.ret not in ("FULL", "HDRS"):
        raise MaildropFormatError(f"bad ret value {env.ret!r}")
    if env.body is not None and env.body not in ("7BIT", "8BITMIME"):
        raise MaildropFormatError(f"bad body value {env.body!r}")
    if env.rewrite not in ("local", "remote"):
        raise MaildropFormatError(f"bad rewrite value {env.rewrite!r}")
    if env.verify is not None and env.verify != "user":
        raise MaildropFormatError(f"bad verify value {env.verify!r}")
    if env.trace is not None and env.trace != "record":
        raise MaildropFormatError(f"bad trace value {env.trace!r}")
    if env.protocol is not None and env.protocol not in ("SMTP", "ESMTP"):
        raise MaildropFormatError(f"bad protocol value {env.protocol!r}")


def parse_envelope(data: bytes) -> MaildropEnvelope:
    """Parse the envelope lines (everything after the content, ``end`` included)."""
    if not data.endswith(END_LINE):
        raise MaildropFormatError("missing end line (truncated file?)")
    body = data[:-len(END_LINE)]
    lines = body.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    elif body:
        raise MaildropFormatError("envelope does not end in a newline")
    env = MaildropEnvelope()
    seen: set[str] = set()
    last_rcpt_fields: set[str] = set()
    for raw in lines:
        name_b, sep, value_b = raw.partition(b" ")
        name = name_b.decode("ascii", "replace")
        if not sep:
            raise MaildropFormatError(f"malformed envelope line {raw[:40]!r}")
        value = unescape(value_b)
        if name in SINGLE:
            if name in seen:
                raise MaildropFormatError(f"duplicate {name} line")
            seen.add(name)
            if name == "time":
                if not re.fullmatch(r"\d{1,12}(\.\d{1,9})?", value):
                    raise MaildropFormatError("bad time value")
                env.submit_time = float(value)
            else:
                setattr(env, name, value)
        elif name in MULTI:
            env.recipients.append(value)
            last_rcpt_fields = set()
        elif name in PER_RCPT:
            if not env.recipients or name in last_rcpt_fields:
                raise MaildropFormatError(f"misplaced {name} line")
            last_rcpt_fields.add(name)
            target = env.rcpt_notify if name == "rcpt-notify" else env.rcpt_orcpt
            target[len(env.recipients) - 1] = value
        else:
            raise MaildropFormatError(f"unknown envelope line {name!r}")
    for required in ("time", "sender"):
        if required not in seen:
            raise MaildropFormatError(f"no {required} line")
    _check_values(env)
    return env


@dataclass
class MaildropFile:
    """A maildrop file opened for reading: envelope parsed, content not read."""
    fd: int
    envelope: MaildropEnvelope
    content_offset: int
    content_size: int

    def iter_content(self, chunk: int = 65536):
        offset, remaining = self.content_offset, self.content_size
        while remaining > 0:
            data = os.pread(self.fd, min(chunk, remaining), offset)
            if not data:
                raise MaildropFormatError("content shorter than recorded")
            offset += len(data)
            remaining -= len(data)
            yield data


def read_maildrop(fd: int, file_size: int, max_envelope: int = MAX_ENVELOPE) -> MaildropFile:
    """Validate the preamble and envelope of an open maildrop file."""
    head = os.pread(fd, PREAMBLE_SIZE, 0)
    if len(head) < PREAMBLE_SIZE or not head.startswith(MAGIC):
        raise MaildropFormatError("bad magic (not a maildrop file or unknown version)")
    size_line = head[len(MAGIC):]
    digits = size_line[len(SIZE_PREFIX):len(SIZE_PREFIX) + SIZE_DIGITS]
    if not size_line.startswith(SIZE_PREFIX) or not digits.isdigit() or size_line[-1:] != b"\n":
        raise MaildropFormatError("malformed size line")
    size = int(digits)
    env_off = PREAMBLE_SIZE + size
    env_size = file_size - env_off
    if env_size < len(END_LINE):
        raise MaildropFormatError("file shorter than its recorded content size")
    if env_size > max_envelope:
        raise MaildropFormatError("envelope too large")
    data = b""
    while len(data) < env_size:
        part = os.pread(fd, env_size - len(data), env_off + len(data))
        if not part:
            raise MaildropFormatError("file changed size while reading")
        data += part
    return MaildropFile(fd, parse_envelope(data), PREAMBLE_SIZE, size)


def new_name() -> str:
    return os.urandom(16).hex()


class MaildropWriter:
    """Writes one maildrop file: temporary name, content, envelope, fsync, rename.

    Runs as the submitting user; raises OSError on any failure (the temporary
    file is removed by abort(), which callers run on every error path).
    """

    def __init__(self, maildrop_dir: str, *, fsync: Callable[[int], None] = os.fsync,
                 clock: Callable[[], float] = time.time):
        self.dir = maildrop_dir
        self._fsync = fsync
        self.clock = clock
        self.tmp_path: str | None = None
        self.final_name: str | None = None
        self.content_size = 0
        self._fd: int | None = None
        self._buf = bytearray()

    def open(self) -> None:
        for _ in range(10):
            path = os.path.join(self.dir, TMP_PREFIX + new_name())
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                             FILE_MODE)
            except FileExistsError:
                continue
            break
        else:
            raise OSError(errno.EEXIST, "cannot find a free maildrop file name")
        self._fd = fd
        self.tmp_path = path
        try:
            os.fchmod(fd, FILE_MODE)   # the umask must not hide the file from pickup
            self._write_all(MAGIC + SIZE_PREFIX + b"0" * SIZE_DIGITS + b"\n")
        except OSError:
            self.abort()
            raise

    def _write_all(self, data) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]

    def write(self, data: bytes) -> None:
        self._buf += data
        self.content_size += len(data)
        if len(self._buf) >= WRITE_BUFFER:
            self._write_all(self._buf)
            self._buf.clear()

    def finish(self, envelope: MaildropEnvelope) -> str:
        """Make the file complete and durable under its final name; returns that name."""
        if self._fd is None:
            raise OSError(errno.EBADF, "maildrop file is not open")
        if not envelope.submit_time:
            envelope.submit_time = self.clock()
        self._buf += envelope.pack()
        self._write_all(self._buf)
        self._buf.clear()
        size_field = b"%020d" % self.content_size
        os.pwrite(self._fd, size_field, len(MAGIC) + len(SIZE_PREFIX))
        self._fsync(self._fd)
        os.close(self._fd)
        self._fd = None
        for _ in range(10):
            name = new_name()
            final = os.path.join(self.dir, name)
            if not os.path.lexists(final):
                break
        os.rename(self.tmp_path, final)
        self.tmp_path = None
        self.final_name = name
        # The rename is what makes the message visible to pickup: make it durable.
        self._sync_directory(final)
        return name

    def _sync_directory(self, final: str) -> None:
        try:
            dfd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
        except PermissionError:
            # maildrop is 1733: a submitting user may not open (read) it, so
            # fsync(dir) is out of reach; syncfs() of the file system holding
            # the file commits the new directory entry just as well.
            ffd = os.open(final, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                _syncfs(ffd)
            finally:
                os.close(ffd)
            return
        try:
            self._fsync(dfd)
        finally:
            os.close(dfd)

    def abort(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None
        if self.tmp_path is not None:
            try:
                os.unlink(self.tmp_path)
            except OSError:
                pass
            self.tmp_path = None


def _syncfs(fd: int) -> None:
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.syncfs(fd) == 0:
            return
    except (OSError, AttributeError):
        pass
    os.sync()


def poke_pickup(queue_directory: str) -> None:
    """Wake pickup through public/pickup; never blocks, ignores every error
    (a lost wake-up costs at most pickup's periodic scan)."""
    path = os.path.join(queue_directory, "public", "pickup")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.write(fd, b"W")
    except OSError:
        pass
    finally:
        os.close(fd)
