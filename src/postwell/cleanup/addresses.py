"""Address rewriting in the "local" context, for envelopes and message headers.

What Postfix's cleanup + trivial-rewrite do to addresses from local clients
(and to every envelope address), verified against Postfix 3.7:

* ``host!user`` becomes ``user@host`` (swap_bangpath = yes);
* ``user%domain`` becomes ``user@domain`` (allow_percent_hack = yes);
* an address without a domain gets ``@$myorigin`` (append_at_myorigin = yes);
* trailing dots of the domain are removed;
* the null address stays empty.

Headers (From, To, Cc, Sender, Reply-To, ...) are tokenised as RFC 5322 3.4
address lists.  When no address changes, the header is kept byte for byte;
when one does, the whole header is written again in Postfix's canonical
form: one space after a comma and a group's colon, before ``<`` and between
words; addresses joined without spaces; lines folded before an address that
would take the line to 70 characters or more (continuations start with a TAB).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

ADDRESS_HEADERS = frozenset({
    "from", "sender", "reply-to", "errors-to", "return-receipt-to", "disposition-notification-to",
    "resent-from", "resent-sender", "resent-reply-to",
    "to", "cc", "apparently-to", "resent-to", "resent-cc",
})

_SPECIALS = set('()<>@,;:\\".[]')
FOLD_WIDTH = 70


@dataclass
class Tok:
    kind: str            # "atom" "qstring" "comment" "domlit" "op" "addr" "startgrp"
    text: str = ""
    parts: list["Tok"] = field(default_factory=list)   # for "addr"

    @property
    def word(self) -> bool:
        return self.kind in ("atom", "qstring", "comment", "domlit", "addr")


def tokenize(text: str, limit: int = 10240) -> list[Tok]:
    """RFC 5322 3.2 lexical tokens (folding white space dropped)."""
    toks: list[Tok] = []
    i, n = 0, len(text)
    while i < n and len(toks) < limit:
        c = text[i]
        if c in " \t\r\n":
            i += 1
        elif c == "(":
            depth, j, buf = 1, i + 1, []
            while j < n and depth:
                ch = text[j]
                if ch == "\\" and j + 1 < n:
                    buf.append(text[j:j + 2])
                    j += 2
                    continue
                if ch == "(":
                    depth += 1
                elif ch == ")":
                    depth -= 1
                    if not depth:
                        break
                buf.append(ch)
                j += 1
            toks.append(Tok("comment", "".join(buf)))
            i = j + 1
        elif c == '"':
            j, buf = i + 1, []
            while j < n and text[j] != '"':
                if text[j] == "\\" and j + 1 < n:
                    buf.append(text[j:j + 2])
                    j += 2
                    continue
                buf.append(text[j])
                j += 1
            toks.append(Tok("qstring", "".join(buf)))
            i = j + 1
        elif c == "[":
            j = text.find("]", i + 1)
            j = n if j < 0 else j
            toks.append(Tok("domlit", text[i + 1:j]))
            i = j + 1
        elif c in _SPECIALS:
            toks.append(Tok("op", c))
            i += 1
        else:
            j = i
            while j < n and text[j] not in _SPECIALS and text[j] not in " \t\r\n":
                j += 1
            toks.append(Tok("atom", text[i:j]))
            i = j
    return toks


def _make_addr(tokens: list[Tok]) -> Tok:
    return Tok("addr", parts=[t for t in tokens if t.kind != "comment"])


def group_addresses(toks: list[Tok]) -> list[Tok]:
    """Group address tokens into ``addr`` nodes (route-addrs and addr-specs);
    phrases, comments and list punctuation stay at the top level."""
    out: list[Tok] = []
    unit: list[Tok] = []

    def flush_unit():
        if not unit:
            return
        if any(t.kind == "op" and t.text == "<" for t in unit):
            lt = next(k for k, t in enumerate(unit) if t.kind == "op" and t.text == "<")
            gt = next((k for k in range(lt + 1, len(unit)) if unit[k].kind == "op" and unit[k].text == ">"),
                      len(unit))
            out.extend(unit[:lt + 1])
            out.append(_make_addr(unit[lt + 1:gt]))
            out.extend(unit[gt:])
        else:
            addr_toks = [t for t in unit if t.kind != "comment"]
            placed = False
            for t in unit:
                if t.kind == "comment":
                    out.append(t)
                elif not placed:
                    out.append(_make_addr(addr_toks))
                    placed = True
        unit.clear()

    in_angle = False
    for t in toks:
        if t.kind == "op" and t.text == "<":
            in_angle = True
        elif t.kind == "op" and t.text == ">":
            in_angle = False
        if not in_angle and t.kind == "op" and t.text in (",", ";"):
            flush_unit()
            out.append(t)
        elif not in_angle and t.kind == "op" and t.text == ":":
            # RFC 5322 3.4 group: "display-name:" starts it; the phrase stays as is.
            out.extend(unit)
            unit.clear()
            out.append(Tok("startgrp", ":"))
        else:
            unit.append(t)
    flush_unit()
    return out


def _ext_token(t: Tok) -> str:
    if t.kind == "qstring":
        return f'"{t.text}"'
    if t.kind == "comment":
        return f"({t.text})"
    if t.kind == "domlit":
        return f"[{t.text}]"
    if t.kind == "addr":
        return "".join(_ext_token(p) for p in t.parts)
    return t.text


def externalize(tree: list[Tok]) -> str:
    """Postfix's header form, one address per line (folded later)."""
    out: list[str] = []
    for k, t in enumerate(tree):
        out.append(_ext_token(t))
        if t.kind == "op" and t.text == ",":
            out.append("\n")
            continue
        nxt = tree[k + 1] if k + 1 < len(tree) else None
        if nxt is None:
            continue
        if t.kind == "startgrp" or (nxt.kind == "op" and nxt.text == "<") or (t.word and nxt.word):
            out.append(" ")
    return "".join(out)


def fold(header: str) -> str:
    """Join the one-address lines while the line stays under FOLD_WIDTH."""
    lines = header.split("\n")
    out = [lines[0]]
    if not header.isascii():
        # Postfix counts bytes: a UTF-8 (or raw 8-bit) name folds sooner.
        def width(text: str) -> int:
            return len(text.encode("utf-8", "surrogateescape"))
    else:
        width = len
    for line in lines[1:]:
        if width(out[-1]) + 1 + width(line) < FOLD_WIDTH:
            out[-1] = out[-1] + " " + line
        else:
            out.append(line)
    return "\n\t".join(out)


def rewrite_local(address: str, myorigin: str, *, swap_bangpath: bool = True,
                  percent_hack: bool = True) -> str:
    """trivial-rewrite's local context for one address (external or internal form)."""
    if not address:
        return address
    local, at, domain = address.rpartition("@")
    if not at:
        local, domain = address, ""
        if swap_bangpath and "!" in local and not local.startswith('"'):
            host, _, user = local.partition("!")
            if host and user:
                local, domain, at = user, host, "@"
        if not at and percent_hack and "%" in local and not local.startswith('"'):
            user, _, host = local.rpartition("%")
            if user and host:
                local, domain, at = user, host, "@"
    if not at:
        domain = myorigin
    elif not domain:
        # "bob@": trivial-rewrite appends @$myorigin only to an address without any
        # "@"; this one stays as written, and the queue manager bounces it (5.1.3).
        return address
    domain = domain.rstrip(".")
    return f"{local}@{domain}" if domain else local


# RFC 5322 3.2.3 atext, without "%" and "!" (those addresses take the full path).
_ATEXT = r"[A-Za-z0-9#$&'*+/=?^_`{|}~-]+"
_PLAIN_ADDR = rf"{_ATEXT}(?:\.{_ATEXT})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*"
# RFC 5322 3.2.4 quoted-string as tokenize() reads it (a backslash takes any one
# character): a display name such as "Doe, John" holds no address to rewrite.
_QSTRING = r'"(?:[^"\\]|\\[\s\S])*"'
# Words of the phrase: an atom needs white space (or a quote) after it, so no text
# splits into words in two ways (no backtracking blow-up on input that fails).
_PLAIN_ITEM = rf"(?:{_PLAIN_ADDR}|(?:{_ATEXT}(?:[ \t\r\n]+|(?=\"))|{_QSTRING}[ \t\r\n]*)*<{_PLAIN_ADDR}>)"
# A list of already-qualified addresses (the usual From:/To:) that the local
# rewrite leaves unchanged: every address has a domain without a trailing dot.
_UNCHANGED_RE = re.compile(rf"[ \t\r\n]*{_PLAIN_ITEM}(?:[ \t\r\n]*,[ \t\r\n]*{_PLAIN_ITEM})*[ \t\r\n]*")


def rewrite_header_value(value: str, myorigin: str,
                         mapper: Callable[[str], str] | None = None) -> str | None:
    """New header value (after the "Name:") or None when nothing changed.
    ``mapper``: canonical mapping and masquerading after the local rewrite."""
    if mapper is None and _UNCHANGED_RE.fullmatch(value):
        return None
    tree = group_addresses(tokenize(value))
    changed = False
    for t in tree:
        if t.kind != "addr" or not t.parts:
            continue
        old = _ext_token(t)
        new = rewrite_local(old, myorigin)
        if mapper is not None:
            new = mapper(new)
        if new != old:
            changed = True
            t.parts = tokenize(new)
    if not changed:
        return None
    return externalize(tree)


def rewrite_header(raw: bytes, name_len: int, myorigin: str,
                   mapper: Callable[[str, str], str] | None = None) -> bytes | None:
    """Rewrite one whole header (``raw`` without its final newline).

    ``name_len`` is the length of the field name as written; the name keeps
    its spelling.  Returns None when no address changed.
    """
    colon = raw.find(b":", name_len)
    if colon < 0:
        return None
    text = raw[colon + 1:].decode("utf-8", "surrogateescape")
    name = raw[:name_len].decode("utf-8", "surrogateescape")
    lname = name.lower()
    new = rewrite_header_value(text, myorigin,
                               None if mapper is None else (lambda a: mapper(a, lname)))
    if new is None:
        return None
    return fold(f"{name}: {new}").encode("utf-8", "surrogateescape")
