"""postcat(1): show the contents of a queue file.

Usage: postcat [-behoqv] [-c config_dir] [files...]

``-q`` takes queue ids instead of file names and searches every queue
(incoming, active, deferred, hold, corrupt) plus the maildrop.  Output is
shaped as Postfix 3.7's: section markers ``*** ENVELOPE RECORDS label ***``,
``*** MESSAGE CONTENTS label ***``, ``*** HEADER EXTRACTED label ***`` and
``*** MESSAGE FILE END label ***`` (label ``queue/ID`` with ``-q``, else the
file name as given), envelope records as ``name: value`` with Postfix's
record names.  ``-o`` prefixes each record with its offset in the file;
postwell's file layout differs from Postfix's (envelope after the content),
so the numbers differ, but they point at the record in this file.
"""

from __future__ import annotations

import getopt
import os
import stat
import sys
import time

from postwell.queue import format as qf

PROG = "postcat"
USAGE = "usage: postcat [-b (body text)] [-c config_dir] [-d (decimal record type)] " \
        "[-e (envelope records)] [-h (header text)] [-q (access queue)] [-v] [file(s)...]"
# Postfix's postcat -q search order, then postwell's extra places.
SEARCH_QUEUES = ("incoming", "active", "deferred", "hold", "corrupt")
ENV, HEAD, BODY = 1, 2, 4
RET_CODES = {"FULL": "1", "HDRS": "2"}
BODY_ENCODING = {"7BIT": "7bit", "8BITMIME": "8bit", "BINARYMIME": "binary"}
# cleanup.service.SMTPUTF8_FLAGS_ATTRIBUTE and FULLNAME_ATTRIBUTE (not imported:
# postcat stays light).
SMTPUTF8_FLAGS = "postwell_smtputf8"
FULLNAME = "postwell_fullname"
# Attributes not listed with the others: the SMTPUTF8 flags are part of Postfix's size
# record (message_size), the encoding is in its extracted segment, the full name is
# a record of its own.
TRACE = "postwell_trace"   # sendmail -v (postwell.qmgr.notices): Postfix's trace_flags
_SHOWN_ELSEWHERE = frozenset({SMTPUTF8_FLAGS, "encoding", FULLNAME, TRACE})


class PostcatError(Exception):
    pass


class NotQueueFile(PostcatError):
    """Postfix warns and goes on with the next file."""


# Postfix's record types (rec_type.h) behind each line postcat shows, for -d.
RECORD_TYPES = {"message_size": "C", "message_arrival_time": "T", "create_time": "A",
                "named_attribute": "A", "sender_fullname": "F", "sender": "S",
                "original_recipient": "O", "recipient": "R", "done_recipient": "D",
                "MESSAGE CONTENTS": "M", "HEADER EXTRACTED": "X", "MESSAGE FILE END": "E"}
TEXT_RECORD = "N"


class Printer:
    def __init__(self, out, flags: int, offsets: bool, decimal: bool = False,
                 verbose: bool = False):
        self.out = out
        self.flags = flags
        self.offsets = offsets
        self.decimal = decimal      # -d: each record's type as a decimal number
        self.verbose = verbose      # -v: content records named as envelope ones are

    def line(self, offset: int | None, text: bytes | str, rtype: str | None = None) -> None:
        if isinstance(text, str):
            if rtype is None:
                rtype = RECORD_TYPES.get(text.partition(":")[0])
            text = text.encode("utf-8", "surrogateescape")
        if self.offsets and offset is not None:
            self.out.write(f"{offset:>9} ".encode())
        if self.decimal and rtype:
            self.out.write(f"{ord(rtype):3d} ".encode())
        self.out.write(text + b"\n")

    def marker(self, offset: int | None, what: str, label: str) -> None:
        # Postfix prints the section markers only when envelope records are shown.
        if self.flags & ENV:
            self.line(offset, f"*** {what} {label} ***", RECORD_TYPES[what])

    def content(self, chunks, base_offset: int) -> None:
        """Header lines with HEAD, the empty line and body with BODY.

        Streams: a line is written piece by piece as chunks arrive, so a huge
        message or a line without end never sits in memory.
        """
        in_body = False
        at_line_start = True
        shown = False
        offset = base_offset
        out = self.out
        for chunk in chunks:
            start, n = 0, len(chunk)
            while start < n:
                nl = chunk.find(b"\n", start)
                stop = nl if nl >= 0 else n
                if at_line_start:
                    if not in_body and nl == start:
                        in_body = True    # the separator line belongs to the body, as in Postfix
                    shown = bool(self.flags & (BODY if in_body else HEAD))
                    if shown and self.offsets:
                        out.write(f"{offset:>9} ".encode())
                    if shown and self.decimal:
                        out.write(f"{ord(TEXT_RECORD):3d} ".encode())
                    if shown and self.verbose:
                        out.write(b"regular_text: ")
                if shown:
                    out.write(chunk[start:stop])
                    if nl >= 0:
                        out.write(b"\n")
                offset += stop - start + (1 if nl >= 0 else 0)
                at_line_start = nl >= 0
                start = stop + 1 if nl >= 0 else n
        if not at_line_start and shown:
            out.write(b"\n")


# ------------------------------------------------------------------ queue files

def _record_offsets(path: str, h) -> dict:
    """File offsets of the envelope records: S -> offset, ("A"|"P", name) -> offset.

    Only record headers and names are read (values are skipped), so a large
    envelope costs little memory.
    """
    offsets: dict = {}
    with open(path, "rb") as f:
        pos, end = h.envelope_offset, h.file_size
        while pos + qf.REC_HEAD.size <= end:
            f.seek(pos)
            rtype, length = qf.REC_HEAD.unpack(f.read(qf.REC_HEAD.size))
            if rtype == qf.REC_SENDER:
                offsets["S"] = pos
            elif rtype in (qf.REC_ATTR, qf.REC_PARAM):
                name = f.read(min(length, 256)).split(b"\0", 1)[0]
                offsets.setdefault((rtype.decode(), qf.decode_text(name)), pos)
            elif rtype == qf.REC_END:
                break
            pos += qf.REC_HEAD.size + length
    return offsets


def _envelope_lines(qm, path: str) -> list[tuple[int | None, str]]:
    env = qm.envelope
    h = qm.header
    try:
        where = _record_offsets(path, h)
    except (OSError, ValueError):
        where = {}
    at = h.envelope_offset
    rcpt_count = len(env.recipients)
    smtputf8 = (1 if env.params.get("smtputf8") == "1" else 0) | _smtputf8_flags(env.attributes)
    sizes = (h.content_size, h.content_offset, rcpt_count, 0, h.content_size, smtputf8)
    # The sizes and times live in the fixed header at offset 0.
    lines: list[tuple[int | None, str]] = [
        (0, "message_size: " + " ".join(f"{n:>15}" for n in sizes)),
        (0, f"message_arrival_time: {time.asctime(time.localtime(qm.arrival_time))}"),
        (0, f"create_time: {time.asctime(time.localtime(qm.arrival_time))}"),
    ]
    for name, value in env.attributes.items():
        if name in _SHOWN_ELSEWHERE:
            continue
        lines.append((where.get(("A", name), at), f"named_attribute: {name}={value}"))
    # The DSN parameters with the record names of Postfix's queue file, before the
    # sender; the BODY= encoding after it, as Postfix's smtpd writes them.
    body = None
    # Postfix's smtpd sends ENVID before RET.
    for name, value in sorted(env.params.items(), key=lambda kv: kv[0] == "ret"):
        off = where.get(("P", name), at)
        if name == "ret":
            lines.append((off, f"named_attribute: ret_flags={RET_CODES.get(value, value)}"))
        elif name == "envid":
            lines.append((off, f"named_attribute: envelope_id={value}"))
        elif name == "body":
            body = (off, f"named_attribute: encoding={BODY_ENCODING.get(value, value)}")
        elif name != "smtputf8":
            lines.append((off, f"named_attribute: {name}={value}"))
    fullname = env.attributes.get(FULLNAME)
    if fullname is not None:
        lines.append((where.get(("A", FULLNAME), at), f"sender_fullname: {fullname}"))
    lines.append((where.get("S", at), f"sender: {env.sender}"))
    if env.attributes.get(TRACE) == "1":
        # DEL_REQ_FLAG_RECORD, where Postfix's cleanup writes it: after the sender
        lines.append((where.get(("A", TRACE), at), "named_attribute: trace_flags=1024"))
    if body is not None:
        lines.append(body)
    for r in env.recipients:
        rec = r.status_offset - qf.REC_HEAD.size if r.status_offset >= 0 else None
        # Postfix's cleanup writes NOTIFY (its bit mask) before the ORCPT.
        if r.notify:
            lines.append((rec, f"named_attribute: notify_flags={notify_flags(r.notify)}"))
        if r.orcpt:
            lines.append((rec, f"named_attribute: dsn_orig_rcpt={r.orcpt}"))
        lines.append((rec, f"original_recipient: {r.orig or r.address}"))
        lines.append((rec, f"{'done_recipient' if r.done else 'recipient'}: {r.address}"))
    return lines


def extracted_lines(env) -> list[str]:
    """Postfix's extracted segment as postwell knows it: the message's encoding,
    cleanup's 8bit verdict on the content or else what BODY= said."""
    value = env.attributes.get("encoding")
    if not value:
        body = env.params.get("body")
        value = BODY_ENCODING.get(body, body) if body else None
    return [f"named_attribute: encoding={value}"] if value else []


def _smtputf8_flags(attributes) -> int:
    """Postfix's SMTPUTF8 header and sender flags (2 and 4), which cleanup keeps
    in an attribute of its own."""
    try:
        return int(attributes.get(SMTPUTF8_FLAGS) or 0) & 6
    except ValueError:
        return 0


def show_queue_file(path: str, label: str, p: Printer) -> None:
    from postwell.queue.store import QueuedMessage
    directory, name = os.path.split(path)
    store = _PathStore(directory)
    try:
        qm = QueuedMessage(store, name, "", writable=False)
    except qf.CorruptQueueFile:
        raise NotQueueFile(label) from None
    try:
        if p.flags & ENV:
            p.line(None, f"*** ENVELOPE RECORDS {label} ***")
            for offset, text in _envelope_lines(qm, path):
                p.line(offset, text)
        p.marker(qm.header.content_offset, "MESSAGE CONTENTS", label)
        if p.flags & (HEAD | BODY):
            p.content(qm.iter_content(), qm.header.content_offset)
        end = qm.header.envelope_offset
        p.marker(end, "HEADER EXTRACTED", label)
        if p.flags & ENV:
            for text in extracted_lines(qm.envelope):
                p.line(end, text)
        p.marker(qm.header.file_size, "MESSAGE FILE END", label)
    finally:
        qm.close()


class _PathStore:
    """The little of QueueStore that QueuedMessage needs, for a file anywhere."""

    def __init__(self, directory: str):
        self.directory = directory

    def path(self, queue_name: str, queue_id: str) -> str:
        return os.path.join(self.directory, queue_id)


# ------------------------------------------------------------------ maildrop files

def show_maildrop_file(path: str, label: str, p: Printer) -> None:
    from postwell.pickup.maildrop import MaildropFormatError, read_maildrop
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        st = os.fstat(fd)
        try:
            mf = read_maildrop(fd, st.st_size)
        except MaildropFormatError:
            raise NotQueueFile(label) from None
        env = mf.envelope
        end_of_content = mf.content_offset + mf.content_size
        if p.flags & ENV:
            p.line(None, f"*** ENVELOPE RECORDS {label} ***")
            p.line(end_of_content, f"message_arrival_time: {time.asctime(time.localtime(env.submit_time))}")
            # In the order and with the attribute names of Postfix's postdrop file.
            if env.envid is not None:
                p.line(end_of_content, f"named_attribute: envelope_id={env.envid}")
            if env.ret is not None:
                p.line(end_of_content, f"named_attribute: ret_flags={RET_CODES.get(env.ret, env.ret)}")
            p.line(end_of_content, f"named_attribute: rewrite_context={env.rewrite}")
            if env.fullname is not None:
                p.line(end_of_content, f"sender_fullname: {env.fullname}")
            p.line(end_of_content, f"sender: {env.sender}")
            if env.body is not None:
                p.line(end_of_content,
                       f"named_attribute: encoding={BODY_ENCODING.get(env.body, env.body)}")
            if env.verify == "user":
                # Postfix's DEL_REQ_FLAG_USR_VRFY, as its sendmail -bv records it
                p.line(end_of_content, "named_attribute: trace_flags=512")
            if env.trace == "record":
                # DEL_REQ_FLAG_RECORD, as Postfix's sendmail -v records it
                p.line(end_of_content, "named_attribute: trace_flags=1024")
            for i, r in enumerate(env.recipients):
                if i in env.rcpt_orcpt:
                    p.line(end_of_content, f"named_attribute: dsn_orig_rcpt={env.rcpt_orcpt[i]}")
                notify = env.rcpt_notify.get(i, env.notify)
                if notify is not None:
                    p.line(end_of_content, f"named_attribute: notify_flags={notify_flags(notify)}")
                p.line(end_of_content, f"recipient: {r}")
        p.marker(mf.content_offset, "MESSAGE CONTENTS", label)
        if p.flags & (HEAD | BODY):
            p.content(mf.iter_content(), mf.content_offset)
        p.marker(end_of_content, "HEADER EXTRACTED", label)
        p.marker(st.st_size, "MESSAGE FILE END", label)
    finally:
        os.close(fd)


# Postfix's DSN NOTIFY bits (dsn_mask.h), as postdrop files carry them.
_NOTIFY_BITS = {"NEVER": 1, "SUCCESS": 2, "FAILURE": 4, "DELAY": 8}


def notify_flags(value: str) -> int:
    return sum(_NOTIFY_BITS.get(w.strip().upper(), 0) for w in value.split(","))


def is_maildrop_file(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(len(qf.MAGIC))
            if head == qf.MAGIC:
                # A queue file: the maildrop format (and the pickup package
                # behind it) need not be loaded to tell.
                return False
            from postwell.pickup.maildrop import MAGIC
            return head + f.read(max(0, len(MAGIC) - len(head))) == MAGIC
    except OSError:
        return False


def show(path: str, label: str, p: Printer) -> None:
    if is_maildrop_file(path):
        show_maildrop_file(path, label, p)
    else:
        show_queue_file(path, label, p)


def find_queued(queue_directory: str, queue_id: str) -> tuple[str, str] | None:
    """(path, "queue/ID") of a queued message or maildrop file, or None."""
    if "/" in queue_id or queue_id in ("", ".", ".."):
        return None
    for q in SEARCH_QUEUES + ("maildrop",):
        path = os.path.join(queue_directory, q, queue_id)
        if q == "maildrop":
            # mailq lists a maildrop file under a prefix of its name (listed_id).
            from postwell.pickup.maildrop import names_for_id
            found = names_for_id(os.path.join(queue_directory, q), queue_id)
            if not found:
                continue
            path = os.path.join(queue_directory, q, found[0])
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode):
            return path, f"{q}/{queue_id}"
    return None


# Postfix's postcat looks at the first byte: one of its envelope record
# types (REC_TYPE_ENVELOPE) and it reads records, else "not a valid queue file".
_ENVELOPE_TYPES = frozenset(b"/<>ACDFIKLMORSTVWcino")


def _foreign_file_verdict(path: str, label: str) -> str | None:
    """For a file that is neither a queue nor a maildrop file: the warning
    Postfix's record reader would give on its first record, when that record
    is cut short (then postcat stops with "record read error"); None when
    Postfix would just say "input is not a valid queue file"."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096 + 8)
    except OSError:
        return None
    if not head or head[0] not in _ENVELOPE_TYPES:
        return None
    rtype, length, shift, pos = head[0], 0, 0, 1
    while True:
        if shift >= 32:
            return f"{label}: too many length bits, record type {rtype}"
        if pos >= len(head):
            return f"{label}: unexpected EOF reading length, record type {rtype}"
        byte = head[pos]
        pos += 1
        length |= (byte & 0x7F) << shift
        if not byte & 0x80:
            break
        shift += 7
    if pos + length > len(head) and pos + length > os.path.getsize(path):
        return f"{label}: unexpected EOF in data, record type {rtype} length {length}"
    return None


def _not_queue_file(path: str, label: str) -> int:
    """The words and status for a file postcat cannot show."""
    sys.stdout.flush()
    why = _foreign_file_verdict(path, label)
    if why is None:
        sys.stderr.write(f"{PROG}: warning: {label}: input is not a valid queue file\n")
        return 0
    sys.stderr.write(f"{PROG}: warning: {why}\n{PROG}: fatal: record read error\n")
    return 1


def _show_stdin(p: Printer) -> int:
    """No file names: the queue file comes on standard input (label "stdin").

    It is copied to a private temporary file first, since reading needs
    random access (a pipe has none); the copy streams, so size is no issue.
    """
    import shutil
    import tempfile
    with tempfile.TemporaryDirectory(prefix="postcat.") as tmp:
        path = os.path.join(tmp, "stdin")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o700)
        with os.fdopen(fd, "wb") as f:
            shutil.copyfileobj(sys.stdin.buffer, f, 65536)
        os.chmod(path, 0o700)     # the complete-file mark queue files carry
        if os.path.getsize(path) == 0:
            return 0          # Postfix: empty input, no records, no complaint
        try:
            show(path, "stdin", p)
        except NotQueueFile:
            p.out.flush()
            return _not_queue_file(path, "stdin")
    p.out.flush()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        opts, args = getopt.getopt(argv, "bc:dehoqrs:v")
    except getopt.GetoptError as exc:
        # glibc getopt's words, then the usage line.
        if "requires argument" in exc.msg:
            sys.stderr.write(f"{PROG}: option requires an argument -- '{exc.opt}'\n")
        else:
            sys.stderr.write(f"{PROG}: invalid option -- '{exc.opt}'\n")
        sys.stderr.write(f"{PROG}: fatal: {USAGE}\n")
        return 1
    config_dir = os.environ.get("MAIL_CONFIG")
    flags = 0
    offsets = by_id = decimal = verbose = False
    for o, v in opts:
        if o == "-c":
            config_dir = v
        elif o == "-d":
            decimal = True
        elif o == "-v":
            verbose = True
        elif o == "-s":
            # Postfix 3.7 takes a start offset; postwell's file layout is its
            # own, so only the argument is checked
            if not v.isdigit():
                sys.stderr.write(f"{PROG}: fatal: bad offset: {v}\n")
                return 1
        elif o == "-b":
            flags |= BODY
        elif o == "-e":
            flags |= ENV
        elif o == "-h":
            flags |= HEAD
        elif o == "-o":
            offsets = True
        elif o == "-q":
            by_id = True
    if not flags:
        flags = ENV | HEAD | BODY
    out = sys.stdout.buffer
    p = Printer(out, flags, offsets, decimal, verbose)
    targets: list[tuple[str, str]] = []
    if by_id and args:
        # Postfix: -q without ids reads standard input, as without -q.
        from postwell.config import load_config
        try:
            cfg = load_config(config_dir, read_master=False)
        except Exception as exc:
            sys.stderr.write(f"{PROG}: fatal: {exc}\n")
            return 1
        qdir = cfg.get("queue_directory")
        if args and not os.path.isdir(qdir):
            # Postfix changes to the queue directory first.
            sys.stderr.write(f"{PROG}: fatal: chdir {qdir}: No such file or directory\n")
            return 1
        for qid in args:
            # Postfix's mail_queue_id_ok(): letters, digits, "_"; never a path.
            if not (0 < len(qid) <= 255 and qid.isascii() and all(c.isalnum() or c == "_" for c in qid)):
                out.flush()
                sys.stderr.write(f"{PROG}: fatal: bad mail queue ID: {qid}\n")
                return 1
            found = find_queued(qdir, qid)
            if found is None:
                out.flush()
                sys.stderr.write(f"{PROG}: fatal: open queue file {qid}: No such file or directory\n")
                return 1
            targets.append(found)
    elif args:
        targets = [(a, a) for a in args]
    else:
        return _show_stdin(p)
    for path, label in targets:
        try:
            if os.path.isfile(path) and os.path.getsize(path) == 0:
                continue      # Postfix: an empty file has no records and no complaint
            show(path, label, p)
        except NotQueueFile:
            out.flush()
            if _not_queue_file(path, label):
                return 1
        except FileNotFoundError:
            out.flush()
            sys.stderr.write(f"{PROG}: fatal: open {label}: No such file or directory\n")
            return 1
        except PermissionError:
            out.flush()
            sys.stderr.write(f"{PROG}: fatal: open {label}: Permission denied\n")
            return 1
        except PostcatError as exc:
            out.flush()
            sys.stderr.write(f"{PROG}: fatal: {exc}\n")
            return 1
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
