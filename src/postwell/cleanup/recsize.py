"""Postfix's message size: what its queue file's content records would take.

Postfix logs ``size=`` (qmgr) and shows the ``--Size--`` column of
``postqueue -p`` from the first field of its queue file's size record, the
length of the message content segment.  That segment holds one record per
line: a type byte, the payload length as a 7-bit variable-length integer
(low bits first, high bit set on all but the last byte), and the line without
its newline.  A line longer than ``line_length_limit`` is stored as pieces of
that length (continuation records) plus a final piece.  Checked against
Postfix 3.7 (tests/test_cleanup_recsize.py):

* header lines (cleanup writes them from its header buffer) are cut when
  longer than the limit: 2048 bytes is one record, 4096 is 2048 + 2048;
* body lines (passed on as smtpd read them) are cut at every full limit: a
  2048-byte line is 2048 + an empty record, 4096 is 2048 + 2048 + empty.

postwell's content is the same text with LF line ends, so the size follows from
the line lengths alone.  Counting is done on whole chunks: one bytes.split()
and one max() over the line lengths (both C-level); a Python loop runs only
over a chunk that holds a line long enough to cost more than two bytes of
overhead.
"""

from __future__ import annotations

from ..queue.format import SIZE_ATTRIBUTE  # noqa: F401  (where cleanup stores the size)


def _vlen(n: int) -> int:
    """Bytes of Postfix's variable-length record length for a payload of n bytes."""
    k = 1
    while n >= 128:
        n >>= 7
        k += 1
    return k


class RecordSize:
    """Accumulates the content records' size as LF-terminated output streams by.

    ``header(data)`` / ``body(data)`` take the output in any chunking (a line
    may span calls, but a header line never continues as body); ``total`` is
    the size once the last line has ended (``close()`` counts an unended one)."""

    __slots__ = ("total", "_open", "_limit", "_piece", "_short")

    def __init__(self, line_length_limit: int = 2048):
        limit = line_length_limit if line_length_limit > 0 else 1
        self.total = 0
        self._open = 0          # bytes of the line not yet ended by a newline
        self._limit = limit
        self._piece = 1 + _vlen(limit) + limit
        # A line shorter than this costs its length + 2 (type, one length byte):
        # only longer ones need a closer look.
        self._short = limit if limit < 128 else 128

    def _cost(self, length: int, header: bool) -> int:
        limit = self._limit
        if header:
            if length <= limit:
                return 1 + _vlen(length) + length
            pieces, rest = divmod(length - 1, limit)
            rest += 1
        else:
            pieces, rest = divmod(length, limit)
        return pieces * self._piece + 1 + _vlen(rest) + rest

    def header(self, data: bytes) -> None:
        self._add(data, True)

    def body(self, data: bytes) -> None:
        self._add(data, False)

    def _add(self, data: bytes, header: bool) -> None:
        if b"\n" not in data:
            self._open += len(data)
            return
        lines = data.split(b"\n")
        ended = len(lines) - 1
        carried = self._open
        tail = len(lines[-1])
        self._open = tail
        # Every ended line as a short one: its text plus a type and a length byte.
        total = carried + len(data) - tail - ended + 2 * ended
        # The rare long line is priced exactly; max() over the lengths is one C-level
        # pass, so the usual chunk of short lines costs no Python loop.
        short = self._short
        if max(map(len, lines)) >= short or carried + len(lines[0]) >= short:
            cost = self._cost
            for i in range(ended):
                n = len(lines[i]) + (carried if i == 0 else 0)
                if n >= short:
                    total += cost(n, header) - n - 2
        self.total += total

    def stored(self) -> int:
        """The size so far, the unended line counted by its bytes only (for the
        streaming size check, which must bound the file, not price it exactly)."""
        return self.total + self._open

    def close(self) -> int:
        """The size, counting a last line without a newline as a record."""
        if self._open:
            self.total += self._cost(self._open, False)
            self._open = 0
        return self.total


# ---------------------------------------------------------------- the whole queue file
# Postfix's cleanup holds its queue file to message_size_limit (a file size limit on
# the process: the write that would pass it fails with EFBIG), so what is measured is
# the whole file: the envelope records before the content, the content records, the
# extracted segment after them.  Their shapes, read off Postfix 3.7 queue files
# (tests/test_size_limit7.py compares sizes with a running reference):
#
#   C  the size record: six "%15ld" fields, 95 bytes of payload
#   T  "SECONDS MICROSECONDS" of the arrival time (no padding)
#   A  name=value attributes (create_time, log_ident, rewrite_context, DSN, client...)
#   F  the full name (pickup only), S the sender
#   per recipient: [A notify_flags=N] [A dsn_orig_rcpt=TYPE;ADDR] O original, R final
#   M  the start of the content, its records, X the extracted segment's start,
#   [A encoding=7bit|8bit], [L content filter], E the end.

SIZE_RECORD = 1 + 1 + 95
EMPTY_RECORD = 2

# RFC 3461 4.1 NOTIFY keywords as Postfix's dsn_notify mask writes them.
NOTIFY_BITS = {"NEVER": 1, "SUCCESS": 2, "FAILURE": 4, "DELAY": 8}


def text_length(text: str) -> int:
    """Bytes of a record's text (UTF-8; bytes that are not kept by surrogateescape)."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogateescape"))


def record(length: int) -> int:
    """Bytes of one record with ``length`` bytes of payload."""
    if length < 128:
        return length + 2
    return 1 + _vlen(length) + length


def attribute(name: str, value: str) -> int:
    """Bytes of an ``A`` record ``name=value``."""
    return record(len(name) + 1 + text_length(value))


def notify_mask(notify: str) -> int:
    mask = 0
    for word in notify.upper().split(","):
        mask |= NOTIFY_BITS.get(word.strip(), 0)
    return mask
