"""MIME part headers for messages that no content check looks into.

Postfix's cleanup always runs its MIME parser (unless disable_mime_input_processing
is set), and the parser writes every header it passes on, a multipart part's or a
message/rfc822 part's too, as "Name:" with the white space before the colon removed;
a Content-Transfer-Encoding of 8bit or binary anywhere makes the queue file's
extracted segment say ``encoding=8bit`` (both checked side by side with 3.7).
:class:`PartScanner` does that much and no more, for the content that
:class:`~postwell.cleanup.headers.BodyScanner` (the checks' scanner) does not see.

Cost: it is installed only after a primary header block whose Content-Type is
multipart (with a boundary) or message/rfc822, so a plain message never meets it.
Body text is passed on as it comes, chunk by chunk; only lines that start with
"--" (bytes.find, C level) are looked at, and only part header blocks are taken
line by line.  Memory: one part header (header_size_limit) and the boundary stack
(mime_nesting_limit levels).
"""

from __future__ import annotations

import re
from typing import Callable

# RFC 5322 2.2 field name, then the blanks Postfix's is_header() allows before ":".
_HEADER_RE = re.compile(rb"^([\x21-\x39\x3b-\x7e]+)[ \t]*:")
_PARAM_RE = re.compile(rb'[;\s]boundary\s*=\s*(?:"([^"]*)"|([^\s;]+))', re.I)
_TOKEN_RE = re.compile(rb"[ \t\n]*([^ \t\n;()]*)")

TEXT_PLAIN = (b"text", b"plain", None)
# Hyphens inside lines skipped one by one in a chunk before PartScanner looks for
# "\n-" instead (pays off from about this many on).
_SKIPS_BEFORE_PAIR_SEARCH = 8
MESSAGE_RFC822 = (b"message", b"rfc822", None)


def without_blanks_before_colon(line: bytes) -> bytes:
    """``Name : value`` as Postfix writes it: ``Name: value`` (RFC 5322 3.6.8 has no
    white space there; the obsolete syntax of RFC 5322 4.5 allowed it)."""
    m = _HEADER_RE.match(line)
    if m is None or m.end() - 1 == m.end(1):
        return line
    return line[:m.end(1)] + line[m.end() - 1:]


def content_type(raw: bytes) -> tuple[bytes, bytes, bytes | None]:
    """(type, subtype, boundary) of a Content-Type header (RFC 2045 5.1), lower case."""
    value = raw.split(b":", 1)[1] if b":" in raw else b""
    value = value.replace(b"\n", b" ")
    main = value.split(b";", 1)[0].strip().lower()
    typ, _, sub = main.partition(b"/")
    m = _PARAM_RE.search(value)
    boundary = None
    if m:
        boundary = m.group(1) if m.group(1) is not None else m.group(2)
    return typ.strip(), sub.strip(), boundary or None


def declares_8bit(raw: bytes) -> bool:
    """A Content-Transfer-Encoding header whose first token (RFC 2045 6.1) is 8bit or
    binary.  Cleanup decides with postfix_8bit_encoding(), which is stricter."""
    value = raw.split(b":", 1)[1] if b":" in raw else b""
    token = _TOKEN_RE.match(value).group(1).lower()
    return token in (b"8bit", b"binary")


def postfix_8bit_encoding(raw: bytes) -> bool:
    """A Content-Transfer-Encoding header that makes Postfix's cleanup record the
    message as 8-bit: the whole value after leading white space (folding included)
    is 8bit or binary, in any case; a trailing blank or a comment ("8bit (x)",
    "8bit ") does not count (3.7 side by side)."""
    value = raw.split(b":", 1)[1] if b":" in raw else b""
    if value.endswith(b"\n"):
        value = value[:-1]
    return value.lstrip(b" \t\n\r\v\f").lower() in (b"8bit", b"binary")


def structured(ctype: tuple[bytes, bytes, bytes | None]) -> bool:
    """Content with part headers to parse: multipart with a boundary, message/rfc822."""
    typ, sub, boundary = ctype
    return (typ == b"multipart" and boundary is not None) or (typ == b"message" and sub == b"rfc822")


class PartScanner:
    """The message body, its part header blocks normalised; everything else as is."""

    def __init__(self, out: Callable[[bytes], None], ctype, nesting_limit: int,
                 header_limit: int, on_8bit: Callable[[], None], separator: bool = False,
                 on_utf8: Callable[[], None] | None = None):
        """``separator``: the body starts with the empty line that ended the primary
        header block (it belongs to no part header block)."""
        self._sink = out
        self._buf = bytearray()           # output gathered during one feed()
        self._separator = separator
        self.nesting_limit = nesting_limit
        self.header_limit = max(header_limit, 1)
        self.on_8bit = on_8bit
        # Called when a part header written is not ASCII (Postfix's
        # SMTPUTF8_FLAG_HEADER); None: nobody asks, nothing is scanned.
        self.on_utf8 = on_utf8
        self.boundaries: list[bytes] = []
        self._digest: list[bool] = [False]
        self._longest = 0                 # longest boundary: what a candidate line needs
        self.in_headers = False
        self._block_ctype = None          # the Content-Type of the header block being read
        self._digest_part = False         # that block is a multipart/digest part's
        self._line = bytearray()          # header mode: the unfinished physical line
        self._hdr: bytes | None = None    # header mode: the logical header's first line
        self._more: list | None = None    # its lines when it is folded
        self._hlen = 0                    # its length so far
        self._cand: bytearray | None = None   # body mode: start of a line that may be a boundary
        self._mid = False                 # body mode: inside a line that is no boundary
        self._enter(ctype)

    # -- structure (RFC 2046 5.1, 5.2.1) -----------------------------------------------
    def _enter(self, ctype) -> None:
        """A header block ended with ``ctype``: what its body holds."""
        typ, sub, boundary = ctype
        if len(self.boundaries) >= self.nesting_limit:
            return
        if typ == b"multipart" and boundary:
            self.boundaries.append(boundary)
            self._digest.append(sub == b"digest")
            self._longest = max(self._longest, len(boundary))
        elif typ == b"message" and sub == b"rfc822":
            self._start_block(False)

    def _start_block(self, digest_part: bool) -> None:
        self.in_headers = True
        self._block_ctype = None
        self._digest_part = digest_part

    def _boundary(self, line: bytes) -> None:
        """A line starting with "--": a boundary of some open level, or body."""
        for level in range(len(self.boundaries) - 1, -1, -1):
            b = self.boundaries[level]
            if line.startswith(b, 2):
                del self.boundaries[level + 1:]
                del self._digest[level + 2:]
                if line[2 + len(b):4 + len(b)] == b"--":
                    self.boundaries.pop()
                    self._digest.pop()
                else:
                    self._start_block(self._digest[-1])
                return

    # -- input ---------------------------------------------------------------------
    def out(self, data: bytes) -> None:
        self._buf += data

    def _flush(self) -> None:
        if self._buf:
            data = bytes(self._buf)
            self._buf.clear()
            self._sink(data)

    def feed(self, data: bytes) -> None:
        pos, n = 0, len(data)
        if self._separator and n:
            self._separator = False
            if data[:1] == b"\n":
                self.out(b"\n")
                pos = 1
        if pos == 0 and not self.in_headers and not self.boundaries:
            # Nothing left to find (a message/rfc822 body, an epilogue): as it comes.
            self._flush()
            self._sink(data)
            return
        while pos < n:
            pos = self._headers(data, pos) if self.in_headers else self._body(data, pos)
        self._flush()

    def _body(self, data: bytes, pos: int) -> int:
        """Body text up to the next boundary line (passed on unchanged); returns where
        the part header block after that boundary starts, or the end of ``data``."""
        n = len(data)
        # One piece per feed() (the queue file write and its size count cost a call
        # each): body text is gathered with the header text around it.
        out = self.out
        if not self.boundaries:
            out(data[pos:] if pos else data)
            return n
        start = pos
        if self._cand is not None:
            # The line the last chunk ended in started with "-": read on to its end.
            nl = data.find(b"\n", pos)
            end = n if nl < 0 else nl
            room = self._longest + 4 - len(self._cand)
            if room > 0:
                self._cand += data[pos:min(end, pos + room)]
            if nl < 0:
                out(data[start:] if start else data)
                return n
            line = bytes(self._cand)
            self._cand = None
            pos = nl + 1
            if line.startswith(b"--"):
                self._boundary(line)
                if self.in_headers:
                    out(data[start:pos])
                    return pos
        elif self._mid:
            nl = data.find(b"\n", pos)
            if nl < 0:
                out(data[start:] if start else data)
                return n
            pos = nl + 1
            self._mid = False
        find = data.find
        skipped = 0
        while pos < n:
            # The next line that starts with "-".  One-byte find() is memchr (a
            # two-byte pattern such as "\n-" is many times slower), and a line with
            # a "-" inside is skipped whole.
            if skipped < _SKIPS_BEFORE_PAIR_SEARCH:
                c = find(b"-", pos)
                if c < 0:
                    self._mid = data[-1] != 10
                    break
                if c != pos and data[c - 1] != 10:
                    skipped += 1
                    nl = find(b"\n", c)
                    if nl < 0:
                        self._mid = True
                        break
                    pos = nl + 1
                    continue
            elif data[pos] == 45:
                c = pos
            else:
                # Text full of hyphens inside lines (HTML, CSS): one C-level search
                # for a line start with "-" costs less than a step per hyphen.
                c = find(b"\n-", pos)
                if c < 0:
                    self._mid = data[-1] != 10
                    break
                c += 1
            nl = find(b"\n", c)
            if nl < 0:
                self._cand = bytearray(data[c:c + self._longest + 4])
                break
            pos = nl + 1
            if data[c + 1] == 45:     # "--"
                self._boundary(data[c:nl])
                if self.in_headers:
                    out(data[start:pos])
                    return pos
        out(data[start:] if start else data)
        return n

    def _headers(self, data: bytes, pos: int) -> int:
        """Lines of a part header block; returns where its body starts (or the end)."""
        n = len(data)
        match = _HEADER_RE.match
        out = self._buf
        while pos < n:
            nl = data.find(b"\n", pos)
            if nl < 0:
                self._line += data[pos:]
                if len(self._line) > self.header_limit:
                    # No header line is that long: the block has ended, and the rest
                    # of this line is body.
                    line = bytes(self._line)
                    self._line.clear()
                    self._end_block()
                    self.in_headers = False
                    out += line
                    self._mid = True
                return n
            if self._line:
                self._line += data[pos:nl]
                line = bytes(self._line)
                self._line.clear()
            else:
                line = data[pos:nl]
            pos = nl + 1
            first = line[:1]
            if first == b" " or first == b"\t":
                if self._hdr is not None:
                    # RFC 5322 2.2.3 folding.
                    self._add(line)
                    continue
                m = None
            else:
                m = match(line)
            if self._hdr is not None:
                self._end_header()
            if m is None:
                # An empty line, or one that is no header: the block ends, the body begins.
                self._end_block()
                out += line
                out += b"\n"
                if line[:2] == b"--" and self.boundaries:
                    self._boundary(line)
                return pos
            if m.end() - 1 != m.end(1):
                line = line[:m.end(1)] + line[m.end() - 1:]
            self._hdr = line
            self._hlen = len(line)
        return n

    def _end_block(self) -> None:
        if self._hdr is not None:
            self._end_header()
        self.in_headers = False
        ctype = self._block_ctype
        if ctype is None:
            # RFC 2046 5.1.5: a multipart/digest part is message/rfc822 by default.
            ctype = MESSAGE_RFC822 if self._digest_part else TEXT_PLAIN
        self._block_ctype = None
        self._enter(ctype)

    def _add(self, line: bytes) -> None:
        """A continuation line of the logical header; past header_size_limit the
        header is passed on as it comes (its start already said what it is)."""
        if self._more is None:
            self._more = [self._hdr]
        if self._hlen <= self.header_limit:
            self._more.append(line)
            self._hlen += len(line) + 1
            if self._hlen > self.header_limit:
                raw = b"\n".join(self._more)
                self._note(raw)
                if self.on_utf8 is not None and not raw.isascii():
                    self.on_utf8()
                self._buf += raw
                self._buf += b"\n"
                self._more = []
        else:
            if self.on_utf8 is not None and not line.isascii():
                self.on_utf8()
            self._buf += line
            self._buf += b"\n"

    def _end_header(self) -> None:
        more = self._more
        if more is None:
            raw = self._hdr
        elif self._hlen > self.header_limit:
            raw = None          # passed on already
        else:
            raw = b"\n".join(more)
        self._hdr = self._more = None
        if raw is not None:
            if raw[:1] in b"cC":
                self._note(raw)
            if self.on_utf8 is not None and not raw.isascii():
                self.on_utf8()
            self._buf += raw
            self._buf += b"\n"

    def close(self) -> None:
        """End of the message: a part header still open is written out, its last line
        given the newline the message ends with anyway (the caller adds one)."""
        if self.in_headers:
            if self._line:
                line = bytes(self._line)
                self._line.clear()
                self._headers(line + b"\n", 0)
            if self._hdr is not None:
                self._end_header()
        self._cand = None
        self._flush()

    def _note(self, raw: bytes) -> None:
        """What the MIME structure and the encoding learn from a part header."""
        low = raw[:26].lower()
        if low.startswith(b"content-type:"):
            self._block_ctype = content_type(raw)
        elif low.startswith(b"content-transfer-encoding:"):
            if postfix_8bit_encoding(raw):
                self.on_8bit()
