"""Streaming message content normalisation and header fix-ups (cleanup(8)'s core).

:class:`ContentProcessor` is fed the message as the SMTP server received it
(after dot-unstuffing, chunk boundaries anywhere) and emits queue-file content
through a sink callable.  Memory is bounded: the body is converted and passed
on chunk by chunk; in the header block only the start of an undecided line,
one line_length_limit piece, and (for local clients) one address header are
held.  A logical header is cut at ``header_size_limit`` bytes the way Postfix
3.7 cuts it (checked against a real instance): lines are taken in pieces of
at most line_length_limit bytes, the folding newline counts, and a piece
that would take the header past the limit is dropped.

Line ends: CRLF and bare LF become LF.  A bare CR (not followed by LF) becomes
a space: RFC 5321 2.3.8 allows CR only as part of CRLF, and turning it into a
line break would let a crafted message change its own header/line structure
(smuggling), while deleting it would glue words together.
"""

from __future__ import annotations

import re
from typing import Callable

# RFC 5322 2.2: field name = printable US-ASCII except colon; Postfix's
# is_header() also accepts white space between the name and the colon.
_HEADER_RE = re.compile(rb"^([\x21-\x39\x3b-\x7e]+)[ \t]*:")

_NAME_CHARS_RE = re.compile(rb"[\x21-\x39\x3b-\x7e]*")
_BLANKS_RE = re.compile(rb"[ \t]*")

_MBOX_FROM_RE = re.compile(rb">*From ")
_DEST_HEADERS = ("to", "cc", "bcc")
_DROPPED_HEADERS = frozenset({"bcc", "resent-bcc", "return-path", "content-length"})
_CAPTURE_LIMIT = 4096   # bytes of a Message-Id header kept for the log line


class ContentProcessor:
    """Header-block state machine plus line-end normalisation.

    Header lines are passed on as they arrive; the undecided start of a
    line (until it is known to be a header, a continuation or the first body
    line) is buffered, at most ``header_size_limit`` bytes: a line with no
    colon within that is body.
    """

    def __init__(self, sink: Callable[[bytes], None], *, header_size_limit: int = 102400,
                 hopcount_limit: int = 50, line_length_limit: int = 2048,
                 on_header_end: Callable[["ContentProcessor"], list[bytes]] | None = None,
                 on_message_id: Callable[[str, bool], None] | None = None,
                 header_rewriter: Callable[[bytes, int], bytes | None] | None = None,
                 rewrite_names: frozenset[str] = frozenset()):
        self.sink = sink
        self.header_size_limit = max(header_size_limit, 1)
        self.line_length_limit = max(line_length_limit, 1)
        self._piece = bytearray()       # current line_length_limit piece of a header line
        self._hlen = 0                  # bytes kept of the current header (Postfix's count)
        self._hstarted = False          # a piece of the current header was kept
        self._new_line = True           # the next piece starts a physical line
        self._hdr_active = False
        self.header_truncated = False
        self.hopcount_limit = hopcount_limit
        self.on_header_end = on_header_end
        self.on_message_id = on_message_id
        self.header_rewriter = header_rewriter
        self.rewrite_names = rewrite_names
        self.in_header = True
        self.headers_seen: set[str] = set()
        self.resent = False
        self.hops = 0
        self._pending_cr = False
        self._line = bytearray()        # undecided start of the current header-block line
        self._passing = False           # current line decided (header/continuation): stream it
        self._in_blanks = False         # undecided line: past the name, in blanks before ":"
        self._first_client_line = False
        self._cur_name: str | None = None
        self._capture: bytearray | None = None
        self._suppress = False
        self._hbuf: bytearray | None = None     # an address header held for rewriting
        self._hname_len = 0
        self._body_needs_lf = False

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
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b" ")
        if data:
            self._feed_lf(data)

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
        elif self._body_needs_lf:
            self.sink(b"\n")
            self._body_needs_lf = False

    def _body(self, data: bytes) -> None:
        if data:
            self.sink(data)
            self._body_needs_lf = not data.endswith(b"\n")

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
            self._emit_header_bytes(line + (b"\n" if complete else b""))
            self._passing = not complete
            return
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
            self._finish_header()
            self._start_header()
            m = _HEADER_RE.match(line)
            name = m.group(1).decode("ascii").lower()
            self._cur_name = name
            self.headers_seen.add(name)
            if name == "received":
                self.hops += 1
            if name.startswith("resent-"):
                self.resent = True
            self._capture = bytearray() if name in ("message-id", "resent-message-id") else None
            # Postfix removes these for every client (checked against 3.7).
            self._suppress = name in _DROPPED_HEADERS
            if self.header_rewriter is not None and name in self.rewrite_names and not self._suppress:
                self._hbuf = bytearray()
                self._hname_len = m.end(1)
        self._emit_header_bytes(line + (b"\n" if complete else b""))
        self._passing = not complete

    def _start_header(self) -> None:
        self._piece.clear()
        self._hlen = 0
        self._hstarted = False
        self._new_line = True
        self._hdr_active = True

    def _emit_header_bytes(self, data: bytes) -> None:
        """Bytes of the current header (a "\n" ends a physical line), cut into
        line_length_limit pieces, each kept or dropped by the size rule."""
        pos, n = 0, len(data)
        limit = self.line_length_limit
        while pos < n:
            nl = data.find(b"\n", pos)
            end = n if nl < 0 else nl
            while pos < end:
                take = min(limit - len(self._piece), end - pos)
                self._piece += data[pos:pos + take]
                pos += take
                if len(self._piece) >= limit:
                    self._flush_piece()
            if nl >= 0:
                if self._piece or self._new_line:
                    self._flush_piece()
                self._new_line = True
                pos = nl + 1

    def _flush_piece(self) -> None:
        piece = bytes(self._piece)
        self._piece.clear()
        joins_line = self._new_line and self._hstarted
        cost = len(piece) + (1 if joins_line else 0)
        self._new_line = False
        if self._hstarted and self._hlen + cost > self.header_size_limit:
            self.header_truncated = True      # Postfix drops what does not fit
            return
        self._hlen += cost
        self._hstarted = True
        self._out_header((b"\n" if joins_line else b"") + piece)

    def _out_header(self, data: bytes) -> None:
        if self._capture is not None and len(self._capture) < _CAPTURE_LIMIT:
            self._capture += data[:_CAPTURE_LIMIT - len(self._capture)]
        if self._suppress:
            return
        if self._hbuf is not None:
            if len(self._hbuf) + len(data) <= self.header_size_limit:
                self._hbuf += data
                return
            # Too big to hold: pass it on unchanged, as it came.
            self.sink(bytes(self._hbuf))
            self._hbuf = None
        self.sink(data)

    def _finish_header(self) -> None:
        if self._hdr_active:
            self._hdr_active = False
            if self._piece:
                self._flush_piece()
            if self._hstarted:
                self._out_header(b"\n")
        if self._hbuf is not None:
            raw = bytes(self._hbuf)
            self._hbuf = None
            body = raw[:-1] if raw.endswith(b"\n") else raw
            new = self.header_rewriter(body, self._hname_len)
            self.sink(raw if new is None else new + b"\n")
        cap, name = self._capture, self._cur_name
        self._capture = None
        if cap is None or not self.on_message_id:
            return
        m = _HEADER_RE.match(cap)
        value = bytes(cap[m.end():]) if m else b""
        # As Postfix logs it: leading white space skipped, folding newlines kept
        # (the logger prints them as "?").
        text = value.decode("utf-8", "surrogateescape").lstrip(" \t").rstrip("\n")
        self.on_message_id(text, bool(name and name.startswith("resent-")))

    def _end_of_header(self, line: bytes | None, partial: bytes | None = None) -> None:
        self._finish_header()
        self.in_header = False
        if self.on_header_end:
            for extra in self.on_header_end(self):
                self.sink(extra + b"\n")
        first = line if line is not None else partial
        if first:
            # Postfix separates the header block from a body that started without
            # the empty line, so the body line is never read as a header.
            self.sink(b"\n")
        if line is not None:
            self._body(line + b"\n")
        elif partial:
            self._body(partial)

    @property
    def too_many_hops(self) -> bool:
        return self.hops >= self.hopcount_limit if self.hopcount_limit > 0 else False

    def seen(self, name: str) -> bool:
        return name.lower() in self.headers_seen

    def has_destination(self, resent: bool) -> bool:
        prefix = "resent-" if resent else ""
        return any((prefix + h) in self.headers_seen for h in _DEST_HEADERS)
