"""The postwell queue file format (authoritative description).

Every message in the queue is one file, named by its queue id, in exactly one
of the queue directories (incoming, active, deferred, hold, corrupt).  All
queue directories must live on one file system: ids are unique only there and
moves between directories are rename(2).

Queue ids
---------
Postfix's short id form: five upper-case hex digits of the microseconds part
of the creation time (0..F423F, zero-padded) followed by the queue file's
inode number in upper-case hex, e.g. ``4F1A2B3C7D``.  The file is first created
under a temporary name (``incoming/tmp.<pid>.<n>``; never a valid id because
ids are upper-case hex only), fstat()ed for its inode, then link()ed to its id
name and the temporary name unlinked.

Spare files (issue 8): a message removed as finished (``remove(sync=False)``,
the qmgr's path) is not unlinked but renamed to ``spare/<id>`` and truncated
to zero, so its inode stays allocated (at most ``SPARE_LIMIT`` such files, about
1024; a file over ``SPARE_MAX_SIZE``, 256 KiB, is unlinked as before, so the qmgr's
event loop never empties a big one).  create() first tries to take one: rename(2) from spare/ to its
temporary name in incoming/ (only one process can win a name), then it must be
a regular file owned by the creator with a link count of 1 (a second name, as
a crash can bring back the removed one, would show the new message under the
old id too; such a file is only dropped), and it is truncated (which also
stamps its mtime now) and set to mode 0600 before it is link()ed to its id.
spare/ is no queue directory: scans never see its files, and a crash between
the steps leaves at most a temporary that purge_stale() removes.  Why: on ext4
without a journal every inode allocation steps over each inode freed in the
last minutes, one by one; with a delivered message freeing one per message
that walk was the single largest system-time cost of accepting mail.  A queue
directory without spare/ (made by an older version) keeps plain unlink/create.

Why this is unique: while a queue file exists its inode number is not reused
on that file system, so no other live queue file can carry the same inode
suffix.  Inodes are reused after a file is removed; a new file may then get
the same inode *and* the same microsecond value as a message that left the
queue long ago.  That repeats an id in the logs over time (as in Postfix) but
never clashes on disk.  The on-disk clash that can still happen needs a file
whose name does not carry its own inode number (a queue restored from a
backup, files copied in).  In incoming/ it is caught by link(2), which refuses
to replace an existing name (EEXIST): the creator then takes the next
microsecond value and tries again.  The other queue directories are not
looked into at each creation (issue 8); instead the qmgr, when it starts,
renames every queue file whose name does not match its inode to one that does
(``QueueStore.rename_misnamed``, as Postfix's ``postsuper -s``), with its
defer/bounce logs.  A new message never inherits a leftover defer/bounce log
of its id: create() removes any.

File layout
-----------
All integers are unsigned little-endian.  Text is UTF-8 (with
surrogateescape for bytes that are not UTF-8).

``header`` (64 bytes at offset 0)::

    0   4  magic  b"PWQ1"
    4   4  header length (64)
    8   8  arrival time, microseconds since the epoch
    16  8  content offset (always 64)
    24  8  content size in bytes
    32  8  envelope offset (= 64 + content size)
    40  8  envelope size in bytes
    48  8  total file size (= envelope offset + envelope size)
    56  4  CRC-32 of bytes 0..55
    60  4  CRC-32 of bytes 64..end (content and envelope) as committed, before
           any in-place change; read only to recover a file whose complete
           marker a crash lost (see "Completeness and durability")

While the message is being written the header is 64 zero bytes; the real
header is written with pwrite() at commit, before the data fsync.

``content`` follows: the message exactly as it will be delivered (header block,
empty line, body), LF line ends, no transparency dots.  It is streamed to
disk and never held in memory.

``envelope`` follows the content: a sequence of records, each
``type (1 byte) | length (4 bytes) | payload``.  Record types:

    ``S``  sender address (may be empty: the null sender ``<>``)
    ``P``  envelope parameter ``name NUL value``: ``ret`` (FULL/HDRS),
           ``envid`` (xtext-decoded), ``smtputf8`` (``1``), ``body``
           (7BIT/8BITMIME/BINARYMIME)
    ``A``  free attribute ``name NUL value`` (client_name, client_address,
           helo_name, protocol, sasl_method, sasl_username, log_ident,
           rewrite_context, ``postwell_size`` = Postfix's message size:
           what its queue file's content records take, logged as qmgr
           ``size=`` and shown by postqueue -p; files without it fall back
           to the content size; see cleanup/recsize.py, ...)
    ``R``  recipient: ``status (1 byte) | address NUL orig NUL orcpt NUL notify``.
           status is ``b"-"`` (pending) or ``b"D"`` (done: delivered, bounced
           or otherwise finished - the notice has been queued).  It is
           rewritten in place (one pwrite of one byte, then fsync) so a crash
           after some recipients were delivered re-delivers only the others.
    ``E``  end of envelope, empty payload; must be the last record.

Completeness and durability
---------------------------
A queue file is a message only when all of these hold:

1. its mode has the owner-execute bit (0700), set with fchmod() after the
   data fsync (the marker Postfix uses); ``scan()`` and the qmgr ignore
   files without it;
2. the header magic and CRC are valid and its sizes agree with the file size;
3. the envelope parses to an ``E`` record that ends exactly at the end of the
   file, with exactly one ``S`` record.

Commit order: write content; append envelope; pwrite header; fsync(file);
fchmod(0700); fsync(directory).  Only then does ``commit()`` return and may
the SMTP server say 250.  Any error on the way removes the file and raises
``QueueWriteError``.

The marker itself is not fsync'd (a second fsync per message, issue 8): the
data, envelope and header are durable before the 250, the mode change may
not be.  A crash can therefore leave a committed file without its marker.
The qmgr recovers such files when it starts (``QueueStore.recover_unmarked``):
a file in incoming/ without the marker whose header is valid, whose size
matches it and whose bytes 64..end match the header's body CRC was written
to the end and its header filled in -- its commit had reached the fsync -- so
it is marked complete and delivered.  If its session never got the 250 (the
crash came during that fsync), the client sends the message again: at worst
it is delivered twice, never lost.  Anything else stays incomplete and is
purged after an hour as before.  The body CRC is read for nothing else: the
queue manager's in-place changes (recipient status, hold mark) come later
and only to marked files.  A move between directories is
rename() followed by fsync of the destination directory, then of the source.

The deferred queue keeps the time of the next delivery attempt in the file's
mtime (as Postfix does); rename() keeps mtimes.

Side logs (``defer/ID`` and ``bounce/ID``) hold one entry per recipient
attempt: ``name=value`` lines (``recipient``, ``orig_rcpt``, ``status``,
``action``, ``reason``, ``time``) ending with an empty line.  Values escape
``\\`` as ``\\\\`` and newline as ``\\n``.  Only the qmgr creates side logs (others
only remove them); it reads which ids have one when it starts and notes each
one it writes, so a message without any is removed without looking for them
(``QueueStore.remove(logs=False)``).
"""

from __future__ import annotations

import os
import re
import struct
import zlib
from dataclasses import dataclass, field

MAGIC = b"PWQ1"
HEADER_SIZE = 64
HEADER_STRUCT = struct.Struct("<4sIQQQQQQII")   # 64 bytes
REC_HEAD = struct.Struct("<cI")                  # type, payload length
MAX_RECORD = 16 * 1024 * 1024                     # sanity bound for one envelope record

REC_SENDER = b"S"
REC_PARAM = b"P"
REC_ATTR = b"A"
REC_RCPT = b"R"
REC_END = b"E"

STATUS_PENDING = b"-"
STATUS_DONE = b"D"

QUEUE_ID_RE = re.compile(r"^[0-9A-F]{6,}$")      # 5 hex microseconds + >=1 hex inode digit


class CorruptQueueFile(Exception):
    """The file is not a complete, well-formed queue file; ``reason`` says why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def make_queue_id(microseconds: int, inode: int) -> str:
    return f"{microseconds % 1000000:05X}{inode:X}"


def is_queue_id(name: str) -> bool:
    return bool(QUEUE_ID_RE.match(name))


def encode_text(value: str | None) -> bytes:
    return (value or "").encode("utf-8", "surrogateescape")


def decode_text(value: bytes) -> str:
    return value.decode("utf-8", "surrogateescape")


def pack_header(arrival_us: int, content_size: int, envelope_size: int, body_crc: int = 0) -> bytes:
    env_off = HEADER_SIZE + content_size
    body = HEADER_STRUCT.pack(MAGIC, HEADER_SIZE, arrival_us, HEADER_SIZE, content_size,
                              env_off, envelope_size, env_off + envelope_size, 0, 0)
    crc = zlib.crc32(body[:56])
    return body[:56] + struct.pack("<II", crc, body_crc & 0xFFFFFFFF)


def header_body_crc(data: bytes) -> int:
    """The body CRC field of a packed header (bytes 60..63)."""
    return struct.unpack_from("<I", data, 60)[0]


@dataclass
class Header:
    arrival_us: int
    content_offset: int
    content_size: int
    envelope_offset: int
    envelope_size: int
    file_size: int


def unpack_header(data: bytes, actual_size: int) -> Header:
    if len(data) < HEADER_SIZE:
        raise CorruptQueueFile(f"truncated header ({len(data)} of {HEADER_SIZE} bytes)")
    (magic, hlen, arrival, c_off, c_size, e_off, e_size, f_size, crc, _r) = HEADER_STRUCT.unpack(data[:HEADER_SIZE])
    if magic != MAGIC:
        raise CorruptQueueFile("bad magic (file never committed or not a queue file)")
    if zlib.crc32(data[:56]) != crc:
        raise CorruptQueueFile("header checksum mismatch")
    if hlen != HEADER_SIZE or c_off != HEADER_SIZE or e_off != c_off + c_size or f_size != e_off + e_size:
        raise CorruptQueueFile("inconsistent header offsets")
    if actual_size != f_size:
        raise CorruptQueueFile(f"file size {actual_size} differs from recorded size {f_size} (truncated?)")
    return Header(arrival, c_off, c_size, e_off, e_size, f_size)


def pack_record(rtype: bytes, payload: bytes) -> bytes:
    return REC_HEAD.pack(rtype, len(payload)) + payload


def pack_pair(name: str, value: str) -> bytes:
    # The first NUL separates name from value: a NUL in the name would move it.
    return encode_text(name).split(b"\0", 1)[0] + b"\0" + encode_text(value)


@dataclass
class Recipient:
    address: str
    orig: str | None = None
    orcpt: str | None = None
    notify: str | None = None
    done: bool = False
    index: int = 0
    status_offset: int = -1   # absolute file offset of the status byte (-1: not on disk)

    def pack(self) -> bytes:
        fields = [self.address, self.orig or "", self.orcpt or "", self.notify or ""]
        # The fields are NUL-separated, and a NUL can arrive inside one (ORCPT=rfc822;a+00b
        # is valid xtext).  Postfix keeps C strings, so the value ends at the NUL there;
        # the same here keeps the record parseable.
        return (STATUS_DONE if self.done else STATUS_PENDING) + b"\0".join(
            encode_text(f).split(b"\0", 1)[0] for f in fields)


@dataclass
class Envelope:
    sender: str = ""
    params: dict[str, str] = field(default_factory=dict)
    attributes: dict[str, str] = field(default_factory=dict)
    recipients: list[Recipient] = field(default_factory=list)

    def pack(self) -> bytes:
        out = [pack_record(REC_SENDER, encode_text(self.sender))]
        for k, v in self.params.items():
            out.append(pack_record(REC_PARAM, pack_pair(k, v)))
        for k, v in self.attributes.items():
            out.append(pack_record(REC_ATTR, pack_pair(k, v)))
        for r in self.recipients:
            out.append(pack_record(REC_RCPT, r.pack()))
        out.append(pack_record(REC_END, b""))
        return b"".join(out)


def _cut(text: str) -> str:
    # A field ends at its first NUL, as a C string would (see Recipient.pack).
    return text.split("\0", 1)[0] if "\0" in text else text


def pack_envelope_checked(env: "Envelope") -> tuple[bytes, list[int], str | None]:
    """``env.pack()``, the offsets (in those bytes) of each recipient's status byte,
    and the reason parse_envelope() would refuse the result (None: it parses).

    The commit must never mark complete a file the reader would call corrupt; this
    answers that from the values while packing, instead of parsing the bytes again
    (tests/test_cleanup_hotpath.py holds it to parse_envelope's verdicts)."""
    head = REC_HEAD.pack
    hsize = REC_HEAD.size
    limit = MAX_RECORD
    problem = None
    sender = env.sender.encode("utf-8", "surrogateescape") if env.sender else b""
    parts = [head(REC_SENDER, len(sender)), sender]
    pos = hsize + len(sender)
    if pos - hsize > limit:
        problem = "truncated envelope record"
    for rtype, pairs in ((REC_PARAM, env.params), (REC_ATTR, env.attributes)):
        for k, v in pairs.items():
            # One encode of "name NUL value", the name cut at a NUL as pack_pair cuts it
            # (a NUL byte comes only from a NUL character: surrogateescape gives 0x80..).
            if "\0" in k:
                k = _cut(k)
            payload = f"{k}\0{v or ''}".encode("utf-8", "surrogateescape")
            n = len(payload)
            if n > limit and problem is None:
                problem = "truncated envelope record"
            parts += (head(rtype, n), payload)
            pos += hsize + n
    offsets = []
    for r in env.recipients:
        addr = _cut(r.address or "")
        payload = (f"{'D' if r.done else '-'}{addr}\0{_cut(r.orig or '')}\0"
                   f"{_cut(r.orcpt or '')}\0{_cut(r.notify or '')}").encode("utf-8", "surrogateescape")
        n = len(payload)
        if problem is None:
            if n > limit:
                problem = "truncated envelope record"
            elif not addr:
                problem = "malformed recipient record"
        parts += (head(REC_RCPT, n), payload)
        pos += hsize
        offsets.append(pos)
        pos += n
    parts.append(head(REC_END, 0))
    return b"".join(parts), offsets, problem


def attribute_value_offset(data: bytes, name: str, value: str) -> int | None:
    """Offset in ``data`` (envelope bytes) of the value of the ``A`` record that is
    exactly ``name`` = ``value``, or None.  Walks the records, so a look-alike inside
    another record's payload never matches."""
    want = pack_pair(name, value)
    pos, n = 0, len(data)
    while n - pos >= REC_HEAD.size:
        rtype, length = REC_HEAD.unpack_from(data, pos)
        pos += REC_HEAD.size
        if length > MAX_RECORD or pos + length > n or rtype == REC_END:
            return None
        if rtype == REC_ATTR and data[pos:pos + length] == want:
            return pos + length - len(encode_text(value))
        pos += length
    return None


def parse_envelope(data: bytes, base_offset: int) -> Envelope:
    """Parse envelope records; ``base_offset`` is where ``data`` starts in the file."""
    # Every queue file the qmgr takes in is parsed here: the loop keeps its names
    # local and tests the usual record (an attribute) first.
    env = Envelope()
    params, attributes, recipients = env.params, env.attributes, env.recipients
    unpack = REC_HEAD.unpack_from
    hsize = REC_HEAD.size
    limit = MAX_RECORD
    pos = 0
    seen_sender = False
    ended = False
    n = len(data)
    while pos < n:
        if n - pos < hsize:
            raise CorruptQueueFile("truncated envelope record header")
        rtype, length = unpack(data, pos)
        pos += hsize
        end = pos + length
        if length > limit or end > n:
            raise CorruptQueueFile("truncated envelope record")
        if rtype == REC_ATTR or rtype == REC_PARAM:
            name, sep, value = data[pos:end].partition(b"\0")
            if not sep:
                raise CorruptQueueFile("malformed attribute record")
            (attributes if rtype == REC_ATTR else params)[
                name.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        elif rtype == REC_RCPT:
            status = data[pos:pos + 1] if length else b""
            if status != STATUS_PENDING and status != STATUS_DONE:
                raise CorruptQueueFile("malformed recipient status")
            fields = data[pos + 1:end].split(b"\0")
            if len(fields) != 4 or not fields[0]:
                raise CorruptQueueFile("malformed recipient record")
            addr, orig, orcpt, notify = fields
            recipients.append(Recipient(
                addr.decode("utf-8", "surrogateescape"),
                orig.decode("utf-8", "surrogateescape") if orig else None,
                orcpt.decode("utf-8", "surrogateescape") if orcpt else None,
                notify.decode("utf-8", "surrogateescape") if notify else None,
                status == STATUS_DONE, len(recipients), base_offset + pos))
        elif rtype == REC_SENDER:
            if seen_sender:
                raise CorruptQueueFile("duplicate sender record")
            env.sender = data[pos:end].decode("utf-8", "surrogateescape")
            seen_sender = True
        elif rtype == REC_END:
            if length != 0:
                raise CorruptQueueFile("malformed end record")
            ended = True
            if end != n:
                raise CorruptQueueFile("data after end record")
            break
        else:
            raise CorruptQueueFile(f"unknown record type {rtype!r}")
        pos = end
    if not ended:
        raise CorruptQueueFile("missing end record (truncated envelope)")
    if not seen_sender:
        raise CorruptQueueFile("no sender record")
    return env


# Side log (defer/ID, bounce/ID) entries.

def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")


def _unesc(value: str) -> str:
    out = []
    i = 0
    while i < len(value):
        c = value[i]
        if c == "\\" and i + 1 < len(value):
            nxt = value[i + 1]
            out.append({"n": "\n", "r": "\r", "\\": "\\"}.get(nxt, nxt))
            i += 2
            continue
        out.append(c)
        i += 1
    return "".join(out)


def pack_log_entry(entry: dict[str, str]) -> bytes:
    return "".join(f"{k}={_esc(str(v))}\n" for k, v in entry.items()).encode("utf-8", "surrogateescape") + b"\n"


def parse_log_entries(data: bytes) -> list[dict[str, str]]:
    entries: list[dict[str, str]] = []
    cur: dict[str, str] = {}
    for line in data.decode("utf-8", "surrogateescape").split("\n"):
        if not line:
            if cur:
                entries.append(cur)
                cur = {}
            continue
        k, _, v = line.partition("=")
        cur[k] = _unesc(v)
    # A final entry without its terminating blank line was cut by a crash: drop it.
    return entries


# Read-only fast paths for the queue listing (mailq / postqueue -p / showq).
# They accept and refuse exactly the files that unpack_header + parse_envelope
# do, but build no Envelope/Recipient objects: a listing of 100,000 messages
# spends its time in this code, once per file.

LISTING_READ = 4096   # one pread covers header and envelope of a small message


def read_listing(fd: int, actual_size: int) -> tuple[int, int, str, list[str]]:
    """``(arrival_us, size, sender, pending recipient addresses)`` of the open
    queue file ``fd`` whose fstat size is ``actual_size``; size is Postfix's
    (``SIZE_ATTRIBUTE``), or the content size in a file without it.

    Raises CorruptQueueFile for anything the full parser would refuse."""
    first = os.pread(fd, actual_size if actual_size < LISTING_READ else LISTING_READ, 0)
    if len(first) < HEADER_SIZE:
        raise CorruptQueueFile(f"truncated header ({len(first)} of {HEADER_SIZE} bytes)")
    (magic, hlen, arrival, c_off, c_size, e_off, e_size, f_size, crc, _r) = HEADER_STRUCT.unpack_from(first)
    if magic != MAGIC:
        raise CorruptQueueFile("bad magic (file never committed or not a queue file)")
    if zlib.crc32(first[:56]) != crc:
        raise CorruptQueueFile("header checksum mismatch")
    if hlen != HEADER_SIZE or c_off != HEADER_SIZE or e_off != c_off + c_size or f_size != e_off + e_size:
        raise CorruptQueueFile("inconsistent header offsets")
    if actual_size != f_size:
        raise CorruptQueueFile(f"file size {actual_size} differs from recorded size {f_size} (truncated?)")
    if f_size <= len(first):
        env = first[e_off:]
    else:
        # A bigger message: skip its content, read only the envelope.
        parts, off, left = [], e_off, e_size
        while left > 0:
            chunk = os.pread(fd, min(left, 1 << 20), off)
            if not chunk:
                break
            parts.append(chunk)
            off += len(chunk)
            left -= len(chunk)
        env = parts[0] if len(parts) == 1 else b"".join(parts)
    if len(env) != e_size:
        raise CorruptQueueFile("truncated envelope")
    sender, rcpts = listing_envelope(env)
    return arrival, stored_size(env, c_size), sender, rcpts


# The envelope attribute with Postfix's message size (what its queue file's content
# records take), written by cleanup (cleanup/recsize.py) and shown as qmgr size= and
# by postqueue -p; a file without it shows its content size.
SIZE_ATTRIBUTE = "postwell_size"
_SIZE_PREFIX = SIZE_ATTRIBUTE.encode() + b"\0"


def stored_size(env: bytes, default: int) -> int:
    """The size attribute of an envelope listing_envelope() accepted (records are
    whole), else ``default``; attributes precede the recipients, so the walk stops
    at the first recipient."""
    pos, n = 0, len(env)
    unpack, head = REC_HEAD.unpack_from, REC_HEAD.size
    while n - pos >= head:
        rtype, length = unpack(env, pos)
        pos += head
        if rtype == REC_ATTR and env.startswith(_SIZE_PREFIX, pos):
            value = env[pos + len(_SIZE_PREFIX):pos + length]
            return int(value) if value.isdigit() else default
        if rtype == REC_RCPT or rtype == REC_END:
            break
        pos += length
    return default


def listing_envelope(data: bytes) -> tuple[str, list[str]]:
    """The sender and the pending recipients' addresses of an envelope,
    with parse_envelope's checks (same refusals, no per-record objects)."""
    sender = None
    rcpts: list[str] = []
    pos = 0
    n = len(data)
    unpack = REC_HEAD.unpack_from
    find = data.find
    while pos < n:
        if n - pos < 5:
            raise CorruptQueueFile("truncated envelope record header")
        rtype, length = unpack(data, pos)
        pos += 5
        end = pos + length
        if end > n or length > MAX_RECORD:
            raise CorruptQueueFile("truncated envelope record")
        # Most frequent first: attributes, then recipients.
        if rtype == b"A" or rtype == b"P":
            if find(b"\0", pos, end) < 0:
                raise CorruptQueueFile("malformed attribute record")
        elif rtype == b"R":
            # status | address NUL orig NUL orcpt NUL notify: exactly 3 NULs, non-empty address
            status = data[pos] if length else 0
            if status != 45 and status != 68:     # b"-" pending, b"D" done
                raise CorruptQueueFile("malformed recipient status")
            nul = find(b"\0", pos + 1, end)
            if nul <= pos + 1 or data.count(b"\0", nul, end) != 3:
                raise CorruptQueueFile("malformed recipient record")
            if status == 45:
                rcpts.append(data[pos + 1:nul].decode("utf-8", "surrogateescape"))
        elif rtype == b"S":
            if sender is not None:
                raise CorruptQueueFile("duplicate sender record")
            sender = data[pos:end].decode("utf-8", "surrogateescape")
        elif rtype == b"E":
            if length != 0:
                raise CorruptQueueFile("malformed end record")
            if end != n:
                raise CorruptQueueFile("data after end record")
            if sender is None:
                raise CorruptQueueFile("no sender record")
            return sender, rcpts
        else:
            raise CorruptQueueFile(f"unknown record type {rtype!r}")
        pos = end
    raise CorruptQueueFile("missing end record (truncated envelope)")


def defer_reasons(data: bytes) -> dict[str, str]:
    """recipient -> reason of a defer/bounce log, the last entry per
    recipient winning; the same entries parse_log_entries keeps."""
    reasons: dict[str, str] = {}
    rcpt = reason = ""
    started = False
    for line in data.split(b"\n"):
        if not line:
            if started:
                reasons[rcpt] = reason
                rcpt = reason = ""
                started = False
            continue
        started = True
        if line.startswith(b"re"):
            k, _, v = line.partition(b"=")
            if k == b"recipient" or k == b"reason":
                text = v.decode("utf-8", "surrogateescape")
                if "\\" in text:
                    text = _unesc(text)
                if k == b"recipient":
                    rcpt = text
                else:
                    reason = text
    return reasons
