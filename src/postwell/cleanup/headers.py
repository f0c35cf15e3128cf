"""Streaming message content normalisation and header fix-ups (cleanup(8)'s core).

:class:`ContentProcessor` is fed the message as the SMTP server received it
(after dot-unstuffing, chunk boundaries anywhere) and emits queue-file content
through a sink callable.  Memory is bounded: the body is converted and passed
on chunk by chunk; in the header block only the start of an undecided line,
a header line starting past 90% of header_size_limit, and (for local clients)
one address header are held.  A logical header longer than
``header_size_limit`` bytes (folding newlines count) is cut the way Postfix
3.7 cuts it (checked against a real instance, tests/test_parity_size.py): at
the last line boundary within the limit when that keeps more than 90% of it,
otherwise at the limit itself, inside a line.

Line ends: CRLF and bare LF become LF.  A bare CR (not followed by LF) becomes
a space: RFC 5321 2.3.8 allows CR only as part of CRLF, and turning it into a
line break would let a crafted message change its own header/line structure
(smuggling), while deleting it would glue words together.
"""

from __future__ import annotations

import re
from typing import Callable

from ..tables.base import TableError
from .mime import TEXT_PLAIN, PartScanner, content_type, postfix_8bit_encoding, structured
from .mime import without_blanks_before_colon
from .recsize import RecordSize

# RFC 5322 2.2: field name = printable US-ASCII except colon; Postfix's
# is_header() also accepts white space between the name and the colon.
_HEADER_RE = re.compile(rb"^([\x21-\x39\x3b-\x7e]+)[ \t]*:")

_NAME_CHARS_RE = re.compile(rb"[\x21-\x39\x3b-\x7e]*")
_BLANKS_RE = re.compile(rb"[ \t]*")

_MBOX_FROM_RE = re.compile(rb">*From ")
_DEST_HEADERS = ("to", "cc", "resent-to", "resent-cc")
_DROPPED_HEADERS = frozenset({"bcc", "resent-bcc", "return-path", "content-length"})
_CAPTURE_LIMIT = 4096   # bytes of a Message-Id header kept for the log line
# Headers whose text is kept while they pass: the message-ids for the log line, the
# MIME ones for the structure of the body and the encoding.
_MIME_NAMES = frozenset({"content-type", "content-transfer-encoding"})
_CAPTURED = frozenset({"message-id", "resent-message-id"}) | _MIME_NAMES
_HOUT_FLUSH = 65536     # header output gathered before it is passed on
# One whole logical header, "Name:" with no blanks before the colon (RFC 5322 2.2,
# 2.2.3 folding): what _header_run() takes in one step.
_LOGICAL_RE = re.compile(rb"([\x21-\x39\x3b-\x7e]+):[^\n]*\n(?:[ \t][^\n]*\n)*")


class ContentProcessor:
    """Header-block state machine plus line-end normalisation.

    Header lines are passed on as they arrive; the undecided start of a
    line (until it is known to be a header, a continuation or the first body
    line) is buffered, at most ``header_size_limit`` bytes: a line with no
    colon within that is body.
    """

    # Starting state (instances overwrite what changes).
    in_header = True
    header_truncated = False
    resent = False
    hops = 0                    # Received: headers as received (before header_checks)
    _hops_over = False          # a kept Received: header found hops at hopcount_limit
    _hlen = 0                   # offset in the current header (folding newlines count)
    _hstarted = False           # bytes of the current header were passed on
    _new_line = True            # the next bytes start a physical line
    _hdr_active = False
    _hcut = False               # header_size_limit reached: drop the rest
    _lstart = 0                 # offset of the current physical line
    _lsent = False              # bytes of the current line were passed on
    _held: bytearray | None = None      # a late line, kept only if it ends in time
    _pending_cr = False
    _passing = False            # current line decided (header/continuation): stream it
    _in_blanks = False          # undecided line: past the name, in blanks before ":"
    _first_client_line = False
    _cur_name: str | None = None
    _capture: bytearray | None = None
    _suppress = False
    _hbuf: bytearray | None = None      # an address header held for rewriting
    _hname_len = 0
    _rec_room = 0               # bytes left in the current input record (held header)
    _rec_take = False           # that record goes into the held header
    _body_needs_lf = False
    _checks = None              # per-message header/body checks (MessageChecks), when configured
    _scanner = None             # the body's line scanner for body_checks / MIME part headers
    mime_8bit = False           # a Content-Transfer-Encoding said 8bit or binary
    ctype = TEXT_PLAIN          # the primary Content-Type as received
    utf8_header = False         # a header as written (after the checks) is not ASCII
    _utf8_track = False

    def __init__(self, sink: Callable[[bytes], None], *, header_size_limit: int = 102400,
                 hopcount_limit: int = 50, line_length_limit: int = 2048,
                 on_header_end: Callable[["ContentProcessor"], list[bytes]] | None = None,
                 on_message_id: Callable[[str, bool], None] | None = None,
                 header_rewriter: Callable[[bytes, int], bytes | None] | None = None,
                 rewrite_names: frozenset[str] = frozenset(),
                 checks: "MessageChecks | None" = None, mime: bool = True,
                 mime_nesting_limit: int = 100, track_utf8: bool = False):
        self.sink = sink
        self.header_size_limit = max(header_size_limit, 1)
        self.line_length_limit = max(line_length_limit, 1)
        self.hopcount_limit = hopcount_limit
        self.on_header_end = on_header_end
        self.on_message_id = on_message_id
        self.header_rewriter = header_rewriter
        self.rewrite_names = rewrite_names
        self.mime = mime                # disable_mime_input_processing = no
        self.mime_nesting_limit = mime_nesting_limit
        # Only the mutable state is made here; the scalar starting values are the
        # class attributes below (one message = one instance: fewer stores each).
        self.headers_seen: set[str] = set()
        self._line = bytearray()        # undecided start of the current header-block line
        self._hout = bytearray()        # header output not yet passed on
        # Postfix's size of what went to the sink (its queue file's content records).
        self.records = RecordSize(self.line_length_limit)
        if checks is not None:
            # Decided once per message: with checks every header is held whole (they
            # see the logical header); without them the hot path stays as it was.
            self._checks = checks
        if track_utf8:
            # Postfix's SMTPUTF8_FLAG_HEADER: raised by any header its cleanup writes
            # through its header output routine (client and MIME part headers after
            # header_checks, PREPEND text, the smtpd's Received:), not by the
            # Message-Id/Date/From cleanup adds (3.7 side by side).  Any byte
            # over 0x7F counts, valid UTF-8 or not.  One isascii() per header block.
            self._utf8_track = True

    # -- line-end normalisation ------------------------------------------------
    def feed(self, data: bytes) -> None:
        if self._pending_cr:
            data = b"\r" + data
            self._pending_cr = False
        if data.endswith(b"\r"):
            self._pending_cr = True
            data = data[:-1]
        if b"\r" in data:
            # CRLF first, then every CR left over is bare (see module docstring).
            data = data.replace(b"\r\n", b"\n")
            if b"\r" in data:
                data = data.replace(b"\r", b" ")
        if data:
            self._feed_lf(data)

    def prepend_received(self, data: bytes) -> None:
        """The receiving server's own ``Received:`` header (LF-terminated lines; the
        continuation lines start with white space).  Known to be one well-formed
        header, it skips the line-by-line classification feed() would give it."""
        if not self.in_header or self._line or self._passing or self._pending_cr \
                or not data.startswith(b"Received:") or b"\r" in data \
                or not data.endswith(b"\n") or len(data) > self.header_size_limit \
                or "received" in self.rewrite_names or self._checks is not None:
            self.feed(data)
            return
        self._finish_header()
        self._start_header()
        self._cur_name = "received"
        self.hops += 1
        self._note_header("received")
        self._capture = None
        self._suppress = False
        # Within header_size_limit, so kept whole; the newline that ends it is
        # written when the next header starts, as for any header.
        self._hlen = len(data) - 1
        self._hstarted = True
        self._out_header(data[:-1])

    def finish(self) -> None:
        """End of data: flush partial state (a final line without LF gets one)."""
        if self._pending_cr:
            self._pending_cr = False
            self._feed_lf(b" ")
        if self.in_header:
            if self._passing:
                self._emit_header_bytes(b"\n")
                self._passing = False
            elif self._line:
                self._decide(complete=True)
            if self.in_header:
                self._end_of_header(None)
        # The body ends with LF: delivery agents and the SMTP client rely on whole lines.
        elif self._scanner is None:
            if self._body_needs_lf:
                self._body(b"\n")
        scanner = self._scanner
        if scanner is not None:
            scanner.close()
            if type(scanner) is PartScanner and self._body_needs_lf:
                scanner._sink(b"\n")

    def _body(self, data: bytes) -> None:
        if data:
            self.sink(data)
            self.records.body(data)
            self._body_needs_lf = not data.endswith(b"\n")

    def _header_out(self, data: bytes) -> None:
        # Header output is gathered and passed on in one piece per header block (or
        # _HOUT_FLUSH bytes): one sink call and one size count instead of a few per line.
        hout = self._hout
        hout += data
        if len(hout) >= _HOUT_FLUSH:
            self._flush_headers()

    def _flush_headers(self) -> None:
        hout = self._hout
        if hout:
            if self._utf8_track and self.in_header and not self.utf8_header \
                    and not hout.isascii():
                self.utf8_header = True
            data = bytes(hout)
            hout.clear()
            self.sink(data)
            # Header lines are sized by Postfix's header rule (recsize.py); the body's differs.
            self.records.header(data)

    # -- header block ----------------------------------------------------------
    def _feed_lf(self, data: bytes) -> None:
        pos = 0
        n = len(data)
        while self.in_header and pos < n:
            nl = data.find(b"\n", pos)
            if self._passing:
                end = n if nl < 0 else nl + 1
                self._emit_header_bytes(data[pos:end])
                pos = end
                if nl >= 0:
                    self._passing = False
                continue
            if nl == pos and not self._line:
                # The empty line that ends the header block: it goes out with the body
                # that follows in this chunk, one sink call and one size count for both.
                self._first_client_line = False
                self._end_of_header(None)
                break
            if nl >= 0 and not self._line and nl - pos <= self.header_size_limit:
                # The usual case: a whole line in this chunk, nothing held before it.
                if self._checks is None:
                    # Whole headers in one step while they need no line-by-line care.
                    end = self._header_run(data, pos)
                    if end != pos:
                        pos = end
                        continue
                line = data[pos:nl]
                pos = nl + 1
                self._classify(line, True)
                continue
            end = n if nl < 0 else nl
            room = self.header_size_limit - len(self._line)
            take = min(end - pos, max(room, 0))
            piece = data[pos:pos + take]
            self._line += piece
            pos += take
            complete = nl >= 0 and pos == nl
            if complete:
                pos += 1
            elif pos < end or len(self._line) >= self.header_size_limit:
                pass            # over the look-ahead bound: decide now
            elif self._line[:1] not in (b" ", b"\t") and self._may_become_header(piece):
                continue        # could still become "Name:", wait for more input
            self._decide(complete=complete)
        if pos < n:
            self._body(data[pos:])

    def _header_run(self, data: bytes, pos: int) -> int:
        """Whole logical headers from ``pos`` (a line start, nothing held, no checks),
        with what the line-by-line path (_classify, _finish_header) would do for
        each, in one loop: the same output, the same state after.  A header is taken
        only when the line after it is in ``data`` and does not continue it, and
        when it is within header_size_limit (and, for one to rewrite, within
        line_length_limit: one input record).  Returns the position after the
        last header taken (``pos`` when none was).  Why: most of a message's
        headers need nothing but to be passed on, and a call per line (or two)
        was cleanup's largest cost for a typical message."""
        n = len(data)
        limit = self.header_size_limit
        match = _LOGICAL_RE.match
        names = self.rewrite_names if self.header_rewriter is not None else ()
        seen = self.headers_seen
        hout = self._hout
        span = pos              # start of the text not yet copied to the output
        begun = False
        name = ""
        while True:
            m = match(data, pos)
            if m is None:
                break
            end = m.end()
            if end >= n or data[end] in (32, 9) or end - pos - 1 > limit:
                break
            name = m.group(1).decode("ascii").lower()
            rewrite = name in names
            if rewrite and (end - pos - 1 > self.line_length_limit or name in _CAPTURED
                            or name in _DROPPED_HEADERS):
                # Too long for one input record, or a name the line path treats
                # in two ways at once: left to it.
                break
            if not begun:
                begun = True
                # The header before this one is complete now.  Any first client line
                # that is a header is an ordinary one (no mbox From, no white space).
                self._first_client_line = False
                self._finish_header()
            seen.add(name)
            if name == "received":
                self.hops += 1
                if 0 < self.hopcount_limit <= self.hops:
                    self._hops_over = True
            elif name.startswith("resent-"):
                self.resent = True
            if rewrite:
                new = self.header_rewriter(data[pos:end - 1], m.end(1) - pos)
                if new is not None:
                    # Written as _finish_header writes a rewritten header (cut when
                    # too long); unchanged, it is written as received (as there).
                    hout += data[span:pos]
                    span = end
                    self._cur_name, self._capture, self._suppress = name, None, False
                    self._hcut, self._held = False, None
                    if 0 < len(new) <= limit and b"\n" not in new:
                        hout += new
                        hout += b"\n"
                    else:
                        self._hlen, self._hstarted, self._new_line = 0, False, True
                        self._cut_out(new)
                        if self._held and not self._hcut:
                            self._line_out(bytes(self._held))
                        self._held = None
                        if self._hstarted:
                            self._out_header(b"\n")
            elif name in _CAPTURED:
                cap = data[pos:min(end, pos + _CAPTURE_LIMIT)]
                if name in _MIME_NAMES:
                    self._mime_header(cap)
                elif self.on_message_id and not self._hops_over:
                    value = cap[_HEADER_RE.match(cap).end():]
                    # As _finish_header logs it.
                    text = value.decode("utf-8", "surrogateescape").lstrip(" \t").rstrip("\n")
                    self.on_message_id(text, name.startswith("resent-"))
            elif name in _DROPPED_HEADERS:
                hout += data[span:pos]
                span = end
            pos = end
            if pos - span + len(hout) >= _HOUT_FLUSH:
                # As the line path: header output passed on in bounded pieces.
                hout += data[span:pos]
                span = pos
                self._flush_headers()
        if begun:
            hout += data[span:pos]
            self._cur_name, self._capture, self._suppress = name, None, False
            if len(hout) >= _HOUT_FLUSH:
                self._flush_headers()
        return pos

    def _may_become_header(self, piece: bytes) -> bool:
        """Incremental check that the line so far is ``name-chars [blanks]``: only
        the new piece is scanned, so a long line fed byte by byte stays linear."""
        if not self._in_blanks:
            n = _NAME_CHARS_RE.match(piece).end()
            if n == len(piece):
                return True
            self._in_blanks = True
            piece = piece[n:]
        return _BLANKS_RE.match(piece).end() == len(piece)

    def begin_client_data(self) -> None:
        """The next line is the first one the client sent (after the server's
        own Received: header), which Postfix treats specially."""
        self._first_client_line = True

    def _decide(self, complete: bool) -> None:
        """Classify the buffered line start; stream it (and the rest of its line)."""
        line = bytes(self._line)
        self._line.clear()
        self._in_blanks = False
        self._classify(line, complete)

    def _classify(self, line: bytes, complete: bool) -> None:
        first = line[:1]
        client_first, self._first_client_line = self._first_client_line, False
        if client_first and _MBOX_FROM_RE.match(line):
            # An mbox "From " line: Postfix keeps it as a header.
            self._finish_header()
            self._start_header()
            line = b"X-Mailbox-Line: " + line
            self._cur_name = "x-mailbox-line"
            self.headers_seen.add(self._cur_name)
            self._capture = None
            self._suppress = False
            if self._checks is not None:
                # header_checks see it as the header it became (checked against 3.7).
                self._hbuf = bytearray()
                self._hname_len = 14
            self._emit_header_bytes(line + (b"\n" if complete else b""))
            self._passing = not complete
            return
        m = None
        if first in (b" ", b"\t") and self._cur_name is not None and not client_first:
            kind = "cont"     # RFC 5322 2.2.3 folding
        else:
            # A first client line that starts with white space must not continue
            # the server's Received: header: Postfix starts the body there.
            m = _HEADER_RE.match(line)
            kind = "header" if m and first not in (b" ", b"\t") else "end"
        if kind == "end":
            # Empty line or a line that is no header: the header block has ended.
            self._end_of_header(line if complete else None, partial=None if complete else line)
            return
        if kind == "header":
            if m.end() - 1 != m.end(1):
                # Postfix writes "Name:" with the white space before the colon
                # removed, for every client (RFC 5322 3.6.8 allows none there;
                # checked side by side with 3.7).
                line = line[:m.end(1)] + line[m.end() - 1:]
                m = _HEADER_RE.match(line)
            self._finish_header()
            self._start_header()
            name = m.group(1).decode("ascii").lower()
            self._cur_name = name
            if name == "received":
                self.hops += 1
            if self._checks is None:
                self._note_header(name)
            self._capture = bytearray() if name in _CAPTURED else None
            # Postfix removes these for every client (checked against 3.7).
            self._suppress = name in _DROPPED_HEADERS
            if (self.header_rewriter is not None and name in self.rewrite_names
                    and not self._suppress) or self._checks is not None:
                self._hbuf = bytearray()
                self._hname_len = m.end(1)
        if complete:
            hbuf = self._hbuf
            if hbuf is None:
                if not self._hcut:
                    # A whole line that ends within header_size_limit is kept whole: skip
                    # _cut_out's piecewise bookkeeping (it gives the same result).
                    start = self._hlen + 1 if self._hstarted else 0
                    end = start + len(line)
                    if end <= self.header_size_limit:
                        self._hlen = end
                        if self._hstarted:
                            line = b"\n" + line
                        self._hstarted = True
                        self._out_header(line)
                        return
            elif 0 < len(line) <= self.line_length_limit and len(hbuf) < self.header_size_limit:
                # An address header's whole line that is one input record, taken while
                # the buffer is short: what _hold_raw does, without its record loop.
                if self._hstarted:
                    hbuf += b"\n"
                hbuf += line
                self._hstarted = True
                self._new_line = True
                return
        self._emit_header_bytes(line + (b"\n" if complete else b""))
        self._passing = not complete

    def _note_header(self, name: str) -> None:
        """A header that stays in the message: it counts as present (no Date/From/
        Message-Id is added for it) and as a Resent- header.  With header_checks
        this waits for their verdict: a header they drop (IGNORE, STRIP) or rename
        (REPLACE) does not count under its old name (Postfix's cleanup records a
        header as seen only after the checks).  Hops are counted apart, on every
        Received: header as received, and compared with hopcount_limit when a
        Received: header is kept (Postfix 3.7: dropped ones count, a header
        REPLACE'd into a Received: does not; checked side by side)."""
        self.headers_seen.add(name)
        if name == "received":
            limit = self.hopcount_limit
            if 0 < limit <= self.hops:
                self._hops_over = True
        if name.startswith("resent-"):
            self.resent = True

    def _start_header(self) -> None:
        self._hlen = 0
        self._hstarted = False
        self._new_line = True
        self._hdr_active = True
        self._hcut = False
        self._held = None

    def _emit_header_bytes(self, data: bytes) -> None:
        """Bytes of the current header (a "\n" ends a physical line)."""
        if self._hbuf is not None:
            self._hold_raw(data)
        else:
            self._cut_out(data)

    def _hold_raw(self, data: bytes) -> None:
        """An address header to rewrite: Postfix rewrites the text its header
        buffer took (whole input records of at most line_length_limit bytes,
        while the buffer is shorter than header_size_limit) and cuts the
        result, so the text is held uncut, within that bound."""
        buf, limit, piece = self._hbuf, self.header_size_limit, self.line_length_limit
        pos, n = 0, len(data)
        while pos < n:
            nl = data.find(b"\n", pos)
            end = n if nl < 0 else nl
            if self._new_line:
                self._new_line = False
                self._rec_room = 0
                self._lsent = False
            while pos < end:
                if self._rec_room == 0:
                    self._rec_room = piece
                    self._rec_take = len(buf) < limit
                take = min(self._rec_room, end - pos)
                if self._rec_take:
                    if not self._lsent:
                        self._lsent = True
                        if self._hstarted:
                            buf += b"\n"
                        self._hstarted = True
                    buf += data[pos:pos + take]
                self._rec_room -= take
                pos += take
            if nl < 0:
                break
            self._new_line = True
            pos = nl + 1

    def _cut_out(self, data: bytes) -> None:
        """Pass header bytes on, kept or cut as Postfix 3.7's cleanup cuts a header
        longer than header_size_limit (checked against a real instance): whole
        lines are kept while they end within the limit; the first line that does
        not is dropped with the rest of the header when it starts past 90% of the
        limit (a cut at a line boundary), and otherwise cut at the limit itself."""
        limit = self.header_size_limit
        pos, n = 0, len(data)
        while pos < n:
            nl = data.find(b"\n", pos)
            end = n if nl < 0 else nl
            if self._new_line:
                self._new_line = False
                # The folding newline counts: the line starts after it.
                self._lstart = self._hlen + 1 if self._hstarted else 0
                self._hlen = self._lstart
                self._lsent = False
                # A line starting that late is kept only whole: hold it until it ends.
                self._held = bytearray() if self._lstart > 0.9 * limit else None
            if not self._hcut:
                piece = data[pos:end]
                if self._hlen + len(piece) > limit:
                    self._hcut = True
                    self.header_truncated = True
                    if self._held is None:
                        self._line_out(piece[:limit - self._hlen])
                    self._held = None
                else:
                    self._hlen += len(piece)
                    if self._held is None:
                        if piece or nl >= 0:
                            self._line_out(piece)
                    else:
                        self._held += piece
                        if nl >= 0:
                            self._line_out(bytes(self._held))
                            self._held = None
            if nl < 0:
                break
            self._new_line = True
            pos = nl + 1

    def _line_out(self, piece: bytes) -> None:
        """Pass on kept bytes of the current physical line; its first ones carry
        the folding newline that joins it to the line before."""
        if not self._lsent:
            self._lsent = True
            if self._hstarted:
                piece = b"\n" + piece
            self._hstarted = True
        self._out_header(piece)

    def _out_header(self, data: bytes) -> None:
        if self._capture is not None and len(self._capture) < _CAPTURE_LIMIT:
            self._capture += data[:_CAPTURE_LIMIT - len(self._capture)]
        if self._suppress:
            return
        hout = self._hout
        hout += data
        if len(hout) >= _HOUT_FLUSH:
            self._flush_headers()

    def _finish_header(self) -> None:
        if self._hdr_active:
            self._hdr_active = False
            if self._hbuf is not None:
                raw = bytes(self._hbuf)
                self._hbuf = None
                rewrite = True
                if self._cur_name in _MIME_NAMES:
                    # The MIME parser reads the header as received, before the checks;
                    # the encoding is what the checks leave (below).
                    self._mime_header(raw, self._checks is None)
                    self._capture = None
                if self._checks is not None:
                    raw = self._check_header(raw)
                    if raw is not None:
                        self._note_header(self._cur_name or "")
                        if self._cur_name == "content-transfer-encoding" \
                                and postfix_8bit_encoding(raw):
                            # Postfix's cleanup takes encoding=8bit from the header it
                            # writes: after an IGNORE nothing, after a REPLACE the new
                            # text (3.7 side by side).
                            self.mime_8bit = True
                    rewrite = (raw is not None and self.header_rewriter is not None
                               and self._cur_name in self.rewrite_names and not self._suppress)
                new = self.header_rewriter(raw, self._hname_len) if raw and rewrite else None
                text = raw if new is None else new
                self._hcut, self._held = False, None
                if text is None:
                    # Dropped by IGNORE/STRIP: nothing of it is written or logged.
                    self._hstarted, self._capture = False, None
                elif 0 < len(text) <= self.header_size_limit and b"\n" not in text:
                    # One line within the limit is kept whole (as _cut_out would keep it).
                    self._hlen, self._hstarted, self._new_line, self._lsent = len(text), True, False, True
                    self._out_header(text)
                else:
                    # Cut after the rewrite, as Postfix's cleanup_out_header does.
                    self._hlen, self._hstarted, self._new_line = 0, False, True
                    self._cut_out(text)
            if self._held and not self._hcut:
                # A late line the header ended in without its newline.
                self._line_out(bytes(self._held))
            self._held = None
            if self._hstarted:
                self._out_header(b"\n")
        cap, name = self._capture, self._cur_name
        self._capture = None
        if cap is not None and name in _MIME_NAMES:
            self._mime_header(bytes(cap))
            return
        if cap is None or not self.on_message_id or self._hops_over:
            # Past the hop limit Postfix's cleanup reads on but logs no message-id.
            return
        m = _HEADER_RE.match(cap)
        value = bytes(cap[m.end():]) if m else b""
        # As Postfix logs it: leading white space skipped, folding newlines kept
        # (the logger prints them as "?").
        text = value.decode("utf-8", "surrogateescape").lstrip(" \t").rstrip("\n")
        self.on_message_id(text, bool(name and name.startswith("resent-")))

    def _mime_header(self, raw: bytes, encoding: bool = True) -> None:
        if raw[:13].lower() == b"content-type:":
            if self.mime:
                self.ctype = content_type(raw)
        elif encoding and postfix_8bit_encoding(raw):
            # A primary header's encoding counts even with disable_mime_input_processing
            # (Postfix's header callback sees the primary headers; 3.7 side by side).
            self.mime_8bit = True

    def _note_8bit(self) -> None:
        self.mime_8bit = True

    def _note_utf8(self) -> None:
        self.utf8_header = True

    def _check_header(self, raw: bytes) -> bytes | None:
        """header_checks on one held logical header: the text to write (the same
        object when unchanged), or None when it is dropped.  A PREPEND'ed header goes
        out at once, before this one; a REPLACE'd header is treated under its new name."""
        result = self._checks.header(raw, self._header_out)
        if result is raw or result is None:
            return result
        m = _HEADER_RE.match(result)
        name = m.group(1).decode("ascii").lower() if m else ""
        self._cur_name = name
        self._hname_len = m.end(1) if m else 0
        self._suppress = name in _DROPPED_HEADERS
        self._capture = bytearray() if name in ("message-id", "resent-message-id") else None
        return result

    def _end_of_header(self, line: bytes | None, partial: bytes | None = None) -> None:
        self._finish_header()
        if self._utf8_track and not self.utf8_header and not self._hout.isascii():
            # Before the headers cleanup adds: those never count.
            self.utf8_header = True
        self.in_header = False
        if self.on_header_end:
            for extra in self.on_header_end(self):
                self._header_out(extra + b"\n")
        if self._checks is not None:
            # body_checks and the MIME part headers see the body line by line.
            scanner = self._checks.body_scanner(self._body, self.line_length_limit,
                                                self.header_size_limit)
            if scanner is not None:
                scanner.on_8bit = self._note_8bit
                if self._utf8_track:
                    scanner.on_utf8 = self._note_utf8
                # The empty line that ended the primary header block starts the body: it
                # does not end a top-level message/rfc822's header block.
                scanner.separator = line is None and not partial
                self._scanner = scanner
                self._body = scanner.feed
        if self._scanner is None and self.ctype is not TEXT_PLAIN and self.mime \
                and structured(self.ctype):
            # Part headers to write as Postfix's MIME parser writes them; a plain
            # message never gets here.
            scanner = PartScanner(self._body, self.ctype, self.mime_nesting_limit,
                                  self.header_size_limit, self._note_8bit,
                                  separator=line is None and not partial,
                                  on_utf8=self._note_utf8 if self._utf8_track else None)
            self._scanner = scanner
            self._body = scanner.feed
        first = line if line is not None else partial
        if first:
            # Postfix separates the header block from a body that started without
            # the empty line, so the body line is never read as a header.
            self._header_out(b"\n")
        self._flush_headers()
        if line is not None:
            self._body(line + b"\n")
        elif partial:
            self._body(partial)

    @property
    def too_many_hops(self) -> bool:
        return self._hops_over

    def seen(self, name: str) -> bool:
        return name.lower() in self.headers_seen

    def has_destination(self, resent: bool = False) -> bool:
        # Postfix's VISIBLE_RCPT: To, Cc, Resent-To, Resent-Cc whatever the resent
        # state; a Bcc (removed) does not count (checked side by side with 3.7).
        seen = self.headers_seen
        return any(h in seen for h in _DEST_HEADERS)


# ---------------------------------------------------------------- header/body checks
# The actions of header_checks / body_checks (Postfix header_checks(5)), as pinned
# against Postfix 3.7 side by side (tests/test_parity_dialogues3.py).  Kept out of
# ContentProcessor's hot path: the caller asks once per logical header and once per
# body line, and only when a checks table is configured.

# Postfix's header classes: which list checks a header.
PRIMARY, MULTIPART, NESTED = 0, 1, 2
# Headers Postfix flags HDR_OPT_MIME: mime_header_checks see them wherever they are.
_MIME_HEADERS = frozenset({"content-description", "content-disposition", "content-id",
                           "content-transfer-encoding", "content-type", "mime-version"})
MIME_NESTING_LIMIT = 100   # Postfix's mime_nesting_limit default


class ContentStop(Exception):
    """A REJECT or DISCARD: Postfix's cleanup reads no further content records."""


_CHECK_DSN = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?: |$)")
# Actions that act and log "<verb>: <class> <text> from ...".
_LOGGED_ACTIONS = frozenset({"reject", "warn", "info", "hold", "discard", "filter", "redirect",
                             "bcc", "prepend", "replace", "strip"})
_SILENT_ACTIONS = frozenset({"ignore", "dunno", "ok"})


class CheckVerdict:
    """One table answer: ``action`` is the lower-case verb ("reject", "hold", ...),
    ``arg`` the text after it.  For "reject" ``reply`` is (code, dsn, text) as
    cleanup hands it to smtpd ("550 5.7.1 message content rejected")."""

    __slots__ = ("action", "arg", "reply", "what", "content")

    def __init__(self, action: str, arg: str, what: str, content: str):
        self.action = action
        self.arg = arg
        self.what = what
        self.content = content
        self.reply: tuple[int, str, str] | None = None
        if action == "reject":
            text = arg or "message content rejected"
            m = _CHECK_DSN.match(text)
            if m is None:
                dsn = "5.7.1"
            elif m.group(1) != "5":
                # "REJECT 4.x.x text" defers: Postfix's cleanup answers 451 (RFC 3463 class 4).
                dsn, text = "4." + m.group(2) + "." + m.group(3), text[m.end():]
            else:
                # The enhanced code's class follows the 5XX reply (RFC 3463).
                dsn, text = "5." + m.group(2) + "." + m.group(3), text[m.end():]
            self.reply = (451 if dsn[0] == "4" else 550, dsn, text or "message content rejected")

    def log_text(self, queue_id: str, client: str, sender: str, recipient: str | None,
                 proto: str | None, helo: str | None) -> str:
        """cleanup's line for this action: "QID: hold: header Subject: x from
        unknown[192.0.2.1]; from=<a@b> to=<c@d> proto=ESMTP helo=<h>: text"."""
        verb = "warning" if self.action == "warn" else self.action
        line = f"{queue_id}: {verb}: {self.what} {self.content[:200]} from {client};"
        line += f" from=<{sender}>"
        if recipient is not None:
            line += f" to=<{recipient}>"
        if proto:
            line += f" proto={proto}"
        if helo:
            line += f" helo=<{helo}>"
        extra = f"{self.reply[1]} {self.reply[2]}" if self.reply else self.arg
        return line + (f": {extra}" if extra else "")


class ContentChecks:
    """header_checks / body_checks decisions.  ``header_lookup`` / ``body_lookup``
    take the logical header (folded lines joined by newlines) or one body line and
    return the table's answer (regexp/pcre substitutions done) or None.  ``warn``
    gets warnings without a queue id ("unknown command in header_checks map: X",
    Postfix logs the header as untouched then)."""

    def __init__(self, header_lookup: Callable[[str], str | None] | None = None,
                 body_lookup: Callable[[str], str | None] | None = None,
                 warn: Callable[[str], None] | None = None,
                 header_map: str = "header_checks", body_map: str = "body_checks",
                 mime_lookup: Callable[[str], str | None] | None = None,
                 nested_lookup: Callable[[str], str | None] | None = None,
                 body_size_limit: int = 51200, mime: bool = True,
                 nesting_limit: int = MIME_NESTING_LIMIT):
        self.header_lookup = header_lookup
        self.body_lookup = body_lookup
        self.mime_lookup = mime_lookup
        self.nested_lookup = nested_lookup
        self.warn = warn or (lambda text: None)
        self.header_map = header_map
        self.body_map = body_map
        self.body_size_limit = body_size_limit
        self.mime = mime     # disable_mime_input_processing = no
        self.nesting_limit = nesting_limit
        # lookup and map name per header class (MIME_HDR_PRIMARY/MULTIPART/NESTED)
        self.classes = {PRIMARY: (header_lookup, header_map),
                        MULTIPART: (mime_lookup, "mime_header_checks"),
                        NESTED: (nested_lookup, "nested_header_checks")}

    def _decide(self, answer: str | None, what: str, content: str,
                map_name: str, warn: Callable[[str], None] | None = None) -> CheckVerdict | None:
        if answer is None:
            return None
        verb, _, arg = answer.strip().partition(" ")
        action = verb.lower()
        arg = arg.strip()
        if action in _SILENT_ACTIONS:
            return CheckVerdict(action, arg, what, content) if action == "ignore" else None
        warn = warn or self.warn
        if action == "reject" and arg[:2] == "2.":
            # Postfix turns a success code into a deferral, with this warning.
            warn(f"bad DSN action in {arg} -- need 4.x.x or 5.x.x")
        if action not in _LOGGED_ACTIONS:
            # Postfix 3.7 has no DEFER and no "4NN/5NN text" here: both are unknown.
            warn(f"unknown command in {map_name} map: {answer.strip()}")
            return None
        return CheckVerdict(action, arg, what, content)

    def header(self, text: str, what: str = "header") -> CheckVerdict | None:
        if self.header_lookup is None:
            return None
        return self._decide(self.header_lookup(text), what, text, self.header_map)

    def body(self, line: str, warn: Callable[[str], None] | None = None) -> CheckVerdict | None:
        if self.body_lookup is None:
            return None
        return self._decide(self.body_lookup(line), "body", line, self.body_map, warn)

    def header_of_class(self, text: str, header_class: int,
                        warn: Callable[[str], None] | None = None) -> CheckVerdict | None:
        lookup, map_name = self.classes[header_class]
        if lookup is None:
            return None
        return self._decide(lookup(text), "header", text, map_name, warn)

    @classmethod
    def from_config(cls, config, warn: Callable[[str], None] | None = None,
                    open_table=None) -> "ContentChecks | None":
        """The checks main.cf asks for (header_checks, mime_header_checks and
        nested_header_checks, both $header_checks by default, body_checks: each a
        list of tables, the first answer wins), or None when none is set, so the
        caller skips the per-line work entirely."""
        if open_table is None:
            from postwell.tables import open_table
        opened: dict[str, object] = {}
        lookups = []
        for name in ("header_checks", "body_checks", "mime_header_checks",
                     "nested_header_checks"):
            specs = config.get_list(name)
            tables = []
            for spec in specs:
                # One instance per table, however many of the four lists name it.
                if spec not in opened:
                    opened[spec] = open_table(spec, config, warn)
                tables.append(opened[spec])

            def lookup(key: str, tables=tables) -> str | None:
                # Postfix's maps_find() answers nothing for an empty key (an empty line).
                if not key:
                    return None
                for table in tables:
                    answer = table.lookup(key)
                    if answer is not None:
                        return answer
                return None
            lookups.append(lookup if tables else None)
        if lookups == [None, None, None, None]:
            return None
        limit = config.get("body_checks_size_limit") if config.is_set("body_checks_size_limit") \
            else "51200"
        return cls(lookups[0], lookups[1], warn, mime_lookup=lookups[2],
                   nested_lookup=lookups[3], body_size_limit=int(limit or 0),
                   mime=not config.get_bool("disable_mime_input_processing")
                   if config.is_set("disable_mime_input_processing") else True,
                   nesting_limit=config.get_int("mime_nesting_limit")
                   if config.is_set("mime_nesting_limit") else MIME_NESTING_LIMIT)


class MessageChecks:
    """header_checks / body_checks for one message (Postfix cleanup_act()): asked
    by :class:`ContentProcessor` once per logical header and, through
    :meth:`body_scanner`, once per body line.  It logs each action and keeps what
    the message's end must do (reject, discard, hold, filter, redirect, bcc)."""

    def __init__(self, checks: ContentChecks, log_line: Callable[["CheckVerdict"], None],
                 warn: Callable[[str], None]):
        self.checks = checks
        self.log_line = log_line
        self.warn = warn
        self.reject: CheckVerdict | None = None
        self.discard = False
        self.hold = False
        self.filter: str | None = None
        self.redirect: str | None = None
        self.bcc: list[str] = []
        self.filtering = True   # REDIRECT (and REJECT/DISCARD) turn further checks off
        self.lookup_failed = False
        self.queue_id = ""
        self._ctype: tuple[bytes, bytes, bytes | None] = (b"text", b"plain", None)

    # -- decisions ------------------------------------------------------------
    def header(self, raw: bytes, out_header: Callable[[bytes], None],
               header_class: int = PRIMARY) -> bytes | None:
        """One primary header: the text to keep (``raw`` itself when unchanged) or
        None when it is dropped.  ``out_header`` writes a PREPEND'ed header."""
        m = _HEADER_RE.match(raw)
        name = m.group(1).decode("ascii", "replace").lower() if m else ""
        if name == "content-type" and header_class == PRIMARY:
            # The MIME structure follows the header as received, whatever the checks
            # do to it (Postfix's mime_state parses it before cleanup sees it).
            self._ctype = content_type(raw)
        return self._header(raw, name, out_header, header_class)

    def _header(self, raw: bytes, name: str, out: Callable[[bytes], None],
                header_class: int) -> bytes | None:
        if not self.filtering:
            return raw
        if name in _MIME_HEADERS:
            header_class = MULTIPART
        text = raw.decode("utf-8", "surrogateescape")
        map_name = self.checks.classes[header_class][1]
        try:
            verdict = self.checks.header_of_class(text, header_class, self.warn)
        except TableError:
            self._failed(map_name)
        if verdict is None:
            return raw
        return self._act(verdict, raw, out, map_name)

    def _failed(self, map_name: str) -> None:
        # A table that cannot answer: defer the message, never let it through unchecked.
        self.lookup_failed = True
        self.filtering = False
        self.warn(f"{self.queue_id}: {map_name} map lookup problem -- "
                  "message not accepted, try again later")
        raise ContentStop()

    def body_line(self, line: bytes, out: Callable[[bytes], None]) -> bytes | None:
        try:
            verdict = self.checks.body(line.decode("utf-8", "surrogateescape"), self.warn)
        except TableError:
            self._failed(self.checks.body_map)
        if verdict is None:
            return line
        return self._act(verdict, line, out, None)

    def _act(self, v: CheckVerdict, raw: bytes, out: Callable[[bytes], None],
             header_map: str | None) -> bytes | None:
        """Postfix's cleanup_act(): ``header_map`` names the list for a header,
        None for a body line."""
        action, arg = v.action, v.arg
        map_name = header_map or self.checks.body_map
        if action == "reject":
            self.reject = v
            self.filtering = False
            self.log_line(v)
            raise ContentStop()
        if action in ("warn", "info"):
            self.log_line(v)
        elif action == "filter":
            if not arg:
                self.warn(f"missing FILTER command argument in {map_name} map")
            elif ":" not in arg:
                self.warn(f"bad FILTER command {arg} in {map_name} -- need transport:destination")
            else:
                self.filter = arg
                self.log_line(v)
        elif action == "discard":
            self.log_line(v)
            self.discard = True
            self.filtering = False
            raise ContentStop()
        elif action == "hold":
            if not self.hold:
                self.log_line(v)
                self.hold = True
        elif action == "prepend":
            text = arg.encode("utf-8", "surrogateescape")
            if not arg:
                self.warn(f"PREPEND action without text in {map_name} map")
            elif header_map and not _HEADER_RE.match(text):
                self.warn(f'bad PREPEND header text "{arg}" in {map_name} map -- '
                          f'need "headername: headervalue"')
            else:
                self.log_line(v)
                out(text + b"\n")
        elif action == "replace":
            text = arg.encode("utf-8", "surrogateescape")
            if not arg:
                self.warn(f"REPLACE action without text in {map_name} map")
            elif header_map and not _HEADER_RE.match(text):
                self.warn(f'bad REPLACE header text "{arg}" in {map_name} map -- '
                          f'need "headername: headervalue"')
            else:
                self.log_line(v)
                return text
        elif action == "redirect":
            if "@" not in arg:
                self.warn(f'bad REDIRECT target "{arg}" in {map_name} map -- need user@domain')
            else:
                self.redirect = arg
                self.log_line(v)
                self.filtering = False
        elif action == "bcc":
            if "@" not in arg:
                self.warn(f'bad BCC address "{arg}" in {map_name} map -- need user@domain')
            else:
                self.bcc.append(arg)
                self.log_line(v)
        elif action == "strip":
            self.log_line(v)
            return None
        elif action == "ignore":
            return None
        return raw

    # -- the body -------------------------------------------------------------
    def body_scanner(self, out: Callable[[bytes], None], line_limit: int,
                     header_limit: int) -> "BodyScanner | None":
        """The body's line scanner, or None when no check can see the body: no
        body_checks and no MIME structure (multipart or message/rfc822) to parse."""
        if not self.filtering:
            return None
        checks = self.checks
        typ, sub, boundary = self._ctype
        structured = checks.mime and (checks.mime_lookup is not None
                                      or checks.nested_lookup is not None) and bool(
            (typ == b"multipart" and boundary) or (typ == b"message" and sub == b"rfc822"))
        if checks.body_lookup is None and not structured:
            return None
        return BodyScanner(self, out, line_limit, header_limit, self._ctype)


class BodyScanner:
    """The message body as Postfix's mime_state sees it: body lines (in records of
    at most line_length_limit bytes) go to body_checks while their part's body is
    within body_checks_size_limit; the header blocks of multipart parts go to
    mime_header_checks and those of message/rfc822 parts to nested_header_checks
    (RFC 2046 5.1, 5.2.1).  With disable_mime_input_processing all of it is body.
    Memory: one record and one part header (header_size_limit) at most, plus the
    boundary stack (mime_nesting_limit levels)."""

    on_8bit: Callable[[], None] | None = None   # a part's CTE said 8bit or binary
    on_utf8: Callable[[], None] | None = None   # a part header written is not ASCII
    separator = False           # the first record is the primary header block's empty line

    def __init__(self, run: MessageChecks, out: Callable[[bytes], None], line_limit: int,
                 header_limit: int, ctype: tuple[bytes, bytes, bytes | None]):
        self.run = run
        self.out = out
        self.line_limit = max(line_limit, 1)
        self.header_limit = header_limit
        self.mime = run.checks.mime
        self.size_limit = run.checks.body_size_limit
        self.nesting_limit = run.checks.nesting_limit
        self._line = bytearray()      # the current record, not yet ended
        self._cont = False            # the current record continues a longer line
        self._buf = bytearray()       # output gathered per feed() call
        self.offset = 0               # bytes of the current part's body seen
        self.boundaries: list[bytes] = []
        self._digest: list[bool] = [False]   # per level: multipart/digest
        self.in_headers = False       # in a part's header block
        self.header_class = MULTIPART
        self._hdr: bytearray | None = None    # the logical part header being read
        self._block_ctype: tuple | None = None
        self._enter(ctype)

    def _enter(self, ctype) -> None:
        """A header block ended; ``ctype`` is its Content-Type: what follows."""
        self.offset = 0
        if not self.mime:
            return
        typ, sub, boundary = ctype
        if len(self.boundaries) >= self.nesting_limit:
            return
        if typ == b"multipart" and boundary:
            self.boundaries.append(boundary)
            self._digest.append(sub == b"digest")
        elif typ == b"message" and sub == b"rfc822":
            self.in_headers = True
            self.header_class = NESTED
            self._block_ctype = None

    # -- input ------------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        pos, n = 0, len(data)
        line = self._line
        limit = self.line_limit
        try:
            while pos < n:
                nl = data.find(b"\n", pos)
                end = n if nl < 0 else nl
                room = limit - len(line)
                if end - pos > room:
                    # A record full before its line ends (Postfix's REC_TYPE_CONT).
                    line += data[pos:pos + room]
                    pos += room
                    rec = bytes(line)
                    line.clear()
                    self._record(rec, False)
                    continue
                line += data[pos:end]
                if nl < 0:
                    break
                pos = nl + 1
                rec = bytes(line)
                line.clear()
                self._record(rec, True)
        finally:
            self._flush()

    def close(self) -> None:
        """End of the message: the last line (given an LF), then any part header
        still open."""
        try:
            if self._line or self._cont:
                rec = bytes(self._line)
                self._line.clear()
                self._record(rec, True)
            self._end_part_header()
        finally:
            self._flush()

    def _flush(self) -> None:
        if self._buf:
            data = bytes(self._buf)
            self._buf.clear()
            self.out(data)

    def _emit(self, data: bytes) -> None:
        self._buf += data

    # -- records ------------------------------------------------------------------
    def _record(self, rec: bytes, ends: bool) -> None:
        if self.separator:
            self.separator = False
            if not rec and ends:
                self._body_record(rec, ends)
                return
        starts = not self._cont
        self._cont = not ends
        if self.in_headers:
            if self._header_record(rec, ends, starts):
                return
        elif starts and self.boundaries and rec[:2] == b"--":
            self._boundary(rec)
        self._body_record(rec, ends)

    def _boundary(self, rec: bytes) -> None:
        # RFC 2046 5.1.1: "--" boundary starts a part, "--" boundary "--" closes the
        # multipart; an outer boundary also closes the levels inside it.
        for level in range(len(self.boundaries) - 1, -1, -1):
            b = self.boundaries[level]
            if rec.startswith(b, 2):
                del self.boundaries[level + 1:]
                del self._digest[level + 2:]
                self.offset = 0
                if rec[2 + len(b):4 + len(b)] == b"--":
                    self.boundaries.pop()
                    self._digest.pop()
                else:
                    self.in_headers = True
                    self.header_class = MULTIPART
                    self._block_ctype = None
                return

    def _body_record(self, rec: bytes, ends: bool) -> None:
        tail = b"\n" if ends else b""
        run = self.run
        checked = rec and run.filtering and run.checks.body_lookup is not None and \
            (self.size_limit <= 0 or self.offset < self.size_limit)
        self.offset += len(rec) + 1
        if checked:
            result = run.body_line(rec, self._emit)
            if result is None:
                return
            rec = result
        self._emit(rec + tail)

    # -- part header blocks ----------------------------------------------------------
    def _header_record(self, rec: bytes, ends: bool, starts: bool) -> bool:
        """A record in a part's header block; False when it is body after all."""
        if not starts:
            if self._hdr is not None:
                self._hdr_add(rec, newline=False)
                return True
        elif rec[:1] in (b" ", b"\t") and self._hdr is not None:
            self._hdr_add(rec, newline=True)
            return True
        self._end_part_header()
        if starts and rec[:1] not in (b" ", b"\t") and _HEADER_RE.match(rec):
            self._hdr = bytearray()
            self._hdr_add(rec, newline=False)
            return True
        # An empty line (or a line that is no header) ends the block.
        self._end_block()
        if not rec and ends:
            # The empty line counts in the part's body offset, as the primary one does
            # (body_checks_size_limit, checked against 3.7).
            self.offset += 1
            self._emit(b"\n")
            return True
        if starts and self.boundaries and rec[:2] == b"--":
            self._boundary(rec)
        return False

    def _hdr_add(self, rec: bytes, newline: bool) -> None:
        hdr = self._hdr
        if len(hdr) < self.header_limit:
            if newline:
                hdr += b"\n"
            hdr += rec[:self.header_limit - len(hdr)]

    def _end_part_header(self) -> None:
        hdr = self._hdr
        if hdr is None:
            return
        self._hdr = None
        # Written "Name:" as Postfix's MIME parser writes every part header; the
        # checks see it so (mime.py).
        raw = without_blanks_before_colon(bytes(hdr))
        m = _HEADER_RE.match(raw)
        name = m.group(1).decode("ascii", "replace").lower() if m else ""
        if name == "content-type":
            self._block_ctype = content_type(raw)   # as received, see MessageChecks.header
        on_utf8 = self.on_utf8
        emit = self._emit if on_utf8 is None else self._emit_part_header
        result = self.run._header(raw, name, emit, self.header_class)
        if result is not None:
            if result is not raw:
                m = _HEADER_RE.match(result)
                name = m.group(1).decode("ascii", "replace").lower() if m else ""
            # The encoding follows the header as written, after mime_header_checks
            # (IGNORE drops it, REPLACE can make one; 3.7 side by side).
            if name == "content-transfer-encoding" and self.on_8bit is not None \
                    and postfix_8bit_encoding(result):
                self.on_8bit()
            emit(result + b"\n")

    def _emit_part_header(self, data: bytes) -> None:
        if not data.isascii():
            self.on_utf8()
        self._buf += data

    def _end_block(self) -> None:
        self._end_part_header()
        self.in_headers = False
        ctype = self._block_ctype
        if ctype is None:
            # RFC 2046 5.1.5: a multipart/digest part defaults to message/rfc822.
            digest = self.header_class == MULTIPART and self._digest[-1]
            ctype = (b"message", b"rfc822", None) if digest else (b"text", b"plain", None)
        self._block_ctype = None
        self._enter(ctype)
