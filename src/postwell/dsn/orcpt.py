"""The DSN original recipient (RFC 3461 ORCPT) as Postfix 3.7's smtpd records it.

API::

    decode_orcpt(value) -> str | None      # ORCPT=value -> "type;address"; None: 501
    fallback_orcpt(path_token) -> str      # no ORCPT: "rfc822;" + the RCPT TO address as sent
    stored_orcpt(orcpt) -> str             # what the queue file keeps of "type;address"
    implied_orcpt(orcpt, orig) -> str|None # a stored ORCPT, or what a missing one meant

Addresses are text with a client's undecodable bytes as surrogate escapes, as the
smtpd reads commands; decoded bytes come back in that form too.
"""

from __future__ import annotations

_HEX = "0123456789abcdefABCDEF"
# Postfix's cleanup reads the attribute record with split_nameval(), which drops
# trailing white space (ISSPACE) from the value.
_TRAILING_SPACE = " \t\r\n\v\f"


def _xtext_bytes(text: str) -> bytes | None:
    # RFC 3461 4: "+" and two hex digits (Postfix's xtext_unquote() takes either case
    # and checks nothing else: other bytes pass as they are).
    raw = text.encode("utf-8", "surrogateescape")
    if b"+" not in raw:
        return raw
    out = bytearray()
    i, n = 0, len(raw)
    while i < n:
        ch = raw[i]
        if ch == 0x2B:
            hx = raw[i + 1:i + 3].decode("latin-1")
            if len(hx) != 2 or hx[0] not in _HEX or hx[1] not in _HEX:
                return None
            out.append(int(hx, 16))
            i += 3
        else:
            out.append(ch)
            i += 1
    return bytes(out)


def _utf8_form(code: int) -> bytes:
    """UTF-8 bit patterns for any code point up to U+10FFFF, surrogates included (as
    Postfix's uxtext_unquote() writes them; Python's encoder refuses those)."""
    if code < 0x80:
        return bytes((code,))
    if code < 0x800:
        return bytes((0xC0 | code >> 6, 0x80 | code & 0x3F))
    if code < 0x10000:
        return bytes((0xE0 | code >> 12, 0x80 | code >> 6 & 0x3F, 0x80 | code & 0x3F))
    return bytes((0xF0 | code >> 18, 0x80 | code >> 12 & 0x3F, 0x80 | code >> 6 & 0x3F,
                  0x80 | code & 0x3F))


def _uxtext_bytes(text: str) -> bytes | None:
    # RFC 6533 3: utf-8-addr-xtext / utf-8-addr-unitext, "\x{HEX}" for one code point.
    # As Postfix 3.7: any number of hex digits while the value stays within U+10FFFF,
    # "\x{}" is U+0000, a backslash not followed by "x{" is itself, "+" is no escape.
    raw = text.encode("utf-8", "surrogateescape")
    if b"\\x{" not in raw:
        return raw
    out = bytearray()
    pos = 0
    while True:
        start = raw.find(b"\\x{", pos)
        if start < 0:
            out += raw[pos:]
            return bytes(out)
        out += raw[pos:start]
        end = raw.find(b"}", start + 3)
        if end < 0:
            return None
        code = 0
        for ch in raw[start + 3:end]:
            if chr(ch) not in _HEX:
                return None
            code = code * 16 + int(chr(ch), 16)
            if code > 0x10FFFF:
                return None
        out += _utf8_form(code)
        pos = end + 1


def stored_orcpt(orcpt: str) -> str:
    """The queue file's form of "type;address": cut at a NUL (Postfix's records are
    C strings; a NUL would also end the field in postwell's recipient record) and
    without trailing white space."""
    nul = orcpt.find("\0")
    if nul >= 0:
        orcpt = orcpt[:nul]
    return orcpt.rstrip(_TRAILING_SPACE)


def decode_orcpt(value: str) -> str | None:
    """``ORCPT=value`` (RFC 3461 4.2) as Postfix 3.7's smtpd keeps it: the address
    type as sent, ";", the address decoded (``utf-8``, any case: RFC 6533 \\x{HEX};
    any other type: xtext), in stored_orcpt() form.  None where Postfix refuses the
    parameter (501 5.5.4 Error: Bad ORCPT parameter syntax): no ";", an empty type,
    a malformed escape."""
    atype, semi, coded = value.partition(";")
    if not semi or not atype:
        return None
    if atype.lower() == "utf-8":
        raw = _uxtext_bytes(coded)
    else:
        raw = _xtext_bytes(coded)
    if raw is None:
        return None
    return stored_orcpt(f"{atype};{raw.decode('utf-8', 'surrogateescape')}")


def fallback_orcpt(path_token: str) -> str:
    """RFC 3461 5.2.1: without ORCPT Postfix's smtpd makes one from the RCPT TO
    address exactly as the client wrote it (its command tokenizer's word: quotes,
    backslashes and a source route kept), less one pair of angle brackets:
    ``<"dan@remote"@here>`` -> ``rfc822;"dan@remote"@here``."""
    if len(path_token) >= 2 and path_token[0] == "<" and path_token[-1] == ">":
        path_token = path_token[1:-1]
    return stored_orcpt("rfc822;" + path_token)


def implied_orcpt(orcpt: str | None, orig: str | None) -> str | None:
    """The ORCPT of a queue file recipient: the stored one, else (a file written
    before cleanup stored every one, or a "sendmail -bs" maildrop file, which
    leaves the usual one out) "rfc822;" + the original recipient; None without
    either."""
    if orcpt:
        return orcpt
    return f"rfc822;{orig}" if orig else None


def is_utf8_address(address: str) -> bool:
    """Postfix's IS_UTF8_ADDRESS (allascii() and valid_utf8_string()): not ASCII,
    and valid UTF-8 (client bytes that were not UTF-8 travel as surrogate escapes)."""
    if address.isascii():
        return False
    try:
        address.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
