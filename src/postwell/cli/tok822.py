"""Command-line addresses as Postfix's sendmail(1) reads them (its tok822 parser).

sendmail hands each -f and recipient argument to Postfix's RFC 822 token
parser and keeps what that parser groups as addresses, in internal form
(quotes and backslashes removed, comments and display names dropped).  The
parser never rejects anything; it groups what it understands and leaves the
rest beside the addresses, so odd arguments give odd but predictable results
that cleanup and the resolver judge later ("bob@" stays "bob@" and bounces
with 5.1.3 bad address syntax; "<a@b" stays "<a@b").  This module copies that
grouping so a maildrop file holds the same envelope as Postfix's postdrop
file.  Verified side by side with Postfix 3.7 (tests/test_cli_gaps7.py).

The grouping runs right to left over the token list: a word after a word
starts a new address, ',' ends one, '<...>' is an address on its own (the
words before it are a display name), 'name: ... ;' is a group, comments move
out of the way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# RFC 822 specials plus the operators Postfix adds ('%', '!' for old routing
# forms, '|' for aliases); a backslash is never an operator on its own.
_OPERATORS = set('|%!()<>@,;:".[]')
_WORDS = ("atom", "qstring", "domlit")
_BLANKS = " \t\r\n"

DO_WORD, DO_GROUP = 1, 2


@dataclass
class Token:
    kind: str                       # atom qstring domlit comment addr startgrp, or the operator
    text: str = ""
    children: list["Token"] = field(default_factory=list)


def _collect(text: str, i: int, stop) -> tuple[str, int]:
    """Characters from i until stop(c) (a backslash quotes the next one);
    white space inside becomes one blank each."""
    out = []
    n = len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 1
            if i >= n:
                break
            c = text[i]
        elif stop(c):
            break
        out.append(" " if c in _BLANKS else c)
        i += 1
    return "".join(out), i


def _comment(text: str, i: int) -> tuple[str, int]:
    """A (possibly nested) comment kept in its external form; i is past '('."""
    out, level, n = ["("], 1, len(text)
    while i < n:
        c = text[i]
        out.append(c)
        i += 1
        if c == "(":
            level += 1
        elif c == ")":
            level -= 1
            if level == 0:
                break
        elif c == "\\":
            if i >= n:
                break
            out.append(text[i])
            i += 1
    return "".join(out), i


def scan(text: str) -> list[Token]:
    tokens: list[Token] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c in _BLANKS:
            i += 1
        elif c == "(":
            body, i = _comment(text, i + 1)
            tokens.append(Token("comment", body))
        elif c in '["':
            close = "]" if c == "[" else '"'
            body, i = _collect(text, i + 1, lambda ch, close=close: ch == close)
            if i < n:
                i += 1          # the closing bracket or quote
            tokens.append(Token("domlit" if c == "[" else "qstring", body))
        elif c in _OPERATORS:
            tokens.append(Token(c))
            i += 1
        else:
            body, i = _collect(text, i, lambda ch: ch in _BLANKS or ch in _OPERATORS)
            tokens.append(Token("atom", body))
    return tokens


def _group(items: list[Token], left: int, right: int, comma: bool) -> int:
    """Put items strictly between left and right under one address node,
    optionally preceded by a ',' that resynchronises the list; returns the
    index just after left (what was there before, or the ',')."""
    first = left + 1
    if first < right:
        node = Token("addr", children=items[first:right])
        items[first:right] = [Token(","), node] if comma else [node]
    return first


def parse(text: str) -> list[Token]:
    """The top-level token list with addresses grouped into "addr" nodes."""
    items = scan(text)
    if not items:
        return items
    state = DO_WORD
    right = len(items)              # the right-hand sentinel
    i = len(items) - 1              # -1 is the left-hand sentinel
    while i >= 0:
        kind = items[i].kind
        if kind == "comment":
            # moved to the right boundary, outside whatever gets grouped next
            tok = items.pop(i)
            right -= 1
            items.insert(right, tok)
            i -= 1
            continue
        if kind == ";":
            _group(items, i, right, True)
            right = i
            state = DO_GROUP | DO_WORD
        elif kind == ":" and state & DO_GROUP:
            items[i].kind = "startgrp"
            _group(items, i, right, False)
            while i >= 0 and items[i].kind != ",":
                i -= 1
            right = i           # the ',' is looked at next, or the list is done
            continue
        elif kind == ">":
            _group(items, i, right, True)
            right = i
            while i >= 0 and items[i].kind != "<":
                if items[i].kind == "comment":
                    tok = items.pop(i)
                    right -= 1
                    items.insert(right, tok)
                i -= 1
            _group(items, i, right, False)
            # the display name before '<' stays outside any address
            while i >= 0 and items[i].kind not in (">", ";", ",", ":"):
                i -= 1
            right = i
            state |= DO_WORD
            continue
        elif kind in _WORDS:
            if not state & DO_WORD:
                _group(items, i, right, True)
                right = i + 1
            state &= ~DO_WORD
        elif kind == ",":
            _group(items, i, right, False)
            right = i
            state |= DO_WORD
        else:
            state |= DO_WORD
        i -= 1
    _group(items, -1, right, False)
    return items


def internalize(tokens: list[Token]) -> str:
    """The tokens of one address, unquoted: Postfix adds no blanks inside an
    address node."""
    out = []
    for tok in tokens:
        if tok.kind == "addr":
            out.append(internalize(tok.children))
        elif tok.kind in ("atom", "qstring", "comment"):
            out.append(tok.text)
        elif tok.kind == "domlit":
            out.append(f"[{tok.text}]")
        elif tok.kind == "startgrp":
            out.append(":")
        else:
            out.append(tok.kind)
    return "".join(out)


def addresses(text: str) -> list[str]:
    """Every address sendmail takes from one argument, in internal form."""
    return [internalize(t.children) for t in parse(text) if t.kind == "addr"]


def recipients(text: str) -> list[str]:
    """Recipients of one command-line argument: an argument in which the parser
    finds no address ("", "<>", "(comment)", ";") still gives one empty
    recipient, as Postfix's sendmail writes one."""
    return addresses(text) or [""]


def sender(text: str) -> tuple[str, bool]:
    """(-f address, malformed): the first address (empty when there is none),
    and whether the argument held more than one."""
    found = addresses(text)
    return (found[0] if found else ""), len(found) > 1
