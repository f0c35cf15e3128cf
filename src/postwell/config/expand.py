"""Parameter expansion with Postfix's rules (postconf(5) and mac_expand).

Forms: $name, ${name}, $(name), $$ (a literal dollar),
${name?value} / ${name:value} (value when name is non-empty / empty),
${name?{value}:{value}} (Postfix 3.0), and the Postfix 3.6 expression
${{text} op {text} ? {true} : {false}} with op one of ==, !=, <, <=, >, >=
(numeric when both sides are all digits, else a string comparison) or
==level, !=level, <level, <=level, >level, >=level (compatibility levels).

Expansion is recursive: a looked-up value is expanded in turn, and so is the
chosen conditional text.  Nesting deeper than MAX_DEPTH is an error, which is
how a reference loop (a = $b, b = $a) is caught.
"""

from __future__ import annotations

import re
from typing import Callable

MAX_DEPTH = 100
_NAME = re.compile(r"[A-Za-z0-9_]+")


class ExpandError(ValueError):
    """A malformed reference or a reference loop (message as Postfix words it)."""


def expand(value: str, lookup: Callable[[str], str | None], depth: int = 0,
           undefined: Callable[[str], None] | None = None) -> str:
    """Expand `value`; `lookup(name)` returns the raw value or None when unknown.

    `undefined(name)` is called for each reference to an unknown name (postconf
    uses it for its "undefined parameter" warning); such references expand to "".
    """
    if "$" not in value:
        return value
    return _Expander(lookup, undefined).run(value, depth)


class _Expander:
    def __init__(self, lookup, undefined):
        self.lookup = lookup
        self.undefined = undefined
        # A name's value is fixed during one expansion: remembering results
        # keeps `a = $b$b, b = $c$c, ...` linear instead of exponential.
        self.memo: dict[str, str] = {}

    def run(self, text: str, depth: int) -> str:
        if depth > MAX_DEPTH + 1:
            raise ExpandError(f'unreasonable macro call nesting: "{text}"')
        out: list[str] = []
        i, n = 0, len(text)
        while i < n:
            j = text.find("$", i)
            if j < 0:
                out.append(text[i:])
                break
            out.append(text[i:j])
            i = j + 1
            if i >= n:
                raise ExpandError(f'empty macro name: "{text}"')
            c = text[i]
            if c == "$":
                out.append("$")
                i += 1
            elif c in "{(":
                close = _matching(text, i)
                if close < 0:
                    raise ExpandError(f'truncated macro reference: "{text}"')
                out.append(self._braced(text[i + 1:close], text, depth))
                i = close + 1
            else:
                m = _NAME.match(text, i)
                if not m:
                    raise ExpandError(f'empty macro name: "{text}"')
                out.append(self._value(m.group(), depth))
                i = m.end()
        return "".join(out)

    def _value(self, name: str, depth: int) -> str:
        raw = self.lookup(name)
        if raw is None:
            if self.undefined:
                self.undefined(name)
            return ""
        if name in self.memo:
            return self.memo[name]
        # mac_expand() counts lookups and gives up on the one after the
        # 101st, naming it (which of two names in a loop it blames matters)
        if depth > MAX_DEPTH:
            raise ExpandError(f'unreasonable macro call nesting: "{name}"')
        result = self.memo[name] = self.run(raw, depth + 1)
        return result

    def _braced(self, body: str, whole: str, depth: int) -> str:
        stripped = body.strip()
        if stripped.startswith("{"):
            return self._expression(stripped, depth)
        m = _NAME.match(stripped)
        if not m:
            raise ExpandError(f'empty macro name: "{whole}"')
        name = m.group()
        rest = stripped[m.end():].lstrip()
        if not rest:
            return self._value(name, depth)
        op, rest = rest[0], rest[1:].lstrip()
        if op not in "?:":
            raise ExpandError(f'unknown operator in macro reference: "{whole}"')
        if_true, if_false = _alternatives(rest, op)
        raw = self.lookup(name)
        if raw is None and self.undefined:
            self.undefined(name)
        defined = bool(raw)
        chosen = if_true if defined else if_false
        return self.run(chosen, depth + 1) if chosen else ""

    def _expression(self, body: str, depth: int) -> str:
        close = _matching(body, 0)
        if close < 0:
            raise ExpandError(f'truncated macro reference: "{body}"')
        left = self.run(body[1:close], depth + 1)
        rest = body[close + 1:].lstrip()
        m = re.match(r"[=!<>]+", rest)
        if not m or m.group() not in ("==", "!=", "<", "<=", ">=", ">"):
            # Postfix quotes the left operand without its opening brace
            raise ExpandError('"==" or "!="" or "<"" or "<="" or ">="" or ">" expected at: '
                              f'"...{body[1:close + 1]}>>>{rest}"')
        op, after_op = m.group(), rest[m.end():]
        suffix = re.match(r"[A-Za-z0-9_]*", after_op).group()
        if suffix and suffix != "level":
            raise ExpandError(f'bad operator suffix at: "...{op}>>>{suffix}"')
        level = bool(suffix)
        after_op = after_op[len(suffix):]
        rest = after_op.lstrip()
        if not rest.startswith("{"):
            raise ExpandError(f'"{{expression}}" expected at: '
                              f'"...{body[:close + 1]} {op}>>>{after_op}"')
        close = _matching(rest, 0)
        if close < 0:
            raise ExpandError(f'truncated macro reference: "{body}"')
        right = self.run(rest[1:close], depth + 1)
        rest = rest[close + 1:].lstrip()
        verdict = _compare(left, op, right, level)
        if not rest:
            return "true" if verdict else ""      # Postfix's value of a bare comparison
        if rest[0] not in "?:":
            raise ExpandError(f'"?" or ":" expected at: "...}}>>>{rest}"')
        if_true, if_false = _alternatives(rest[1:].lstrip(), rest[0])
        chosen = if_true if verdict else if_false
        return self.run(chosen, depth + 1) if chosen else ""


def _matching(text: str, open_at: int) -> int:
    """Index of the bracket closing the one at open_at, or -1."""
    opener = text[open_at]
    closer = "}" if opener == "{" else ")"
    level = 0
    for k in range(open_at, len(text)):
        ch = text[k]
        if ch == opener:
            level += 1
        elif ch == closer:
            level -= 1
            if level == 0:
                return k
    return -1


def _unbrace(text: str) -> str:
    text = text.strip()
    if text.startswith("{") and _matching(text, 0) == len(text) - 1:
        return text[1:-1]
    return text


def _alternatives(rest: str, op: str) -> tuple[str, str]:
    """Split the text after ? or : into (if_defined, if_undefined).

    Unbraced, the rest is the one value as written.  Braced, "?{a}" may be
    followed by ":{b}" or ":b" and nothing else, ":{b}" by nothing at all;
    anything else is Postfix's "expected"/"unexpected input" error, quoting
    the end of the last braced text."""
    if not rest.startswith("{"):
        return (rest, "") if op == "?" else ("", rest)
    close = _matching(rest, 0)
    if close < 0:
        raise ExpandError(f'truncated macro reference: "{rest}"')
    first, tail = rest[1:close], rest[close + 1:].lstrip()
    context = rest[1:close + 1]
    second = ""
    if tail:
        if op != "?":
            raise ExpandError(f'unexpected input at: "...{context}>>>{tail}"')
        if not tail.startswith(":"):
            raise ExpandError(f'":" expected at: "...{context}>>>{tail}"')
        tail = tail[1:].lstrip()
        if tail.startswith("{"):
            close = _matching(tail, 0)
            if close < 0:
                raise ExpandError(f'truncated macro reference: "{tail}"')
            second, after = tail[1:close], tail[close + 1:].lstrip()
            if after:
                context = tail[1:close + 1]
                raise ExpandError(f'unexpected input at: "...{context}>>>{after}"')
        else:
            second = tail
    return (first, second) if op == "?" else (second, first)


def _level(text: str) -> tuple[int, ...]:
    parts = text.strip().split(".")
    try:
        nums = [int(p) for p in parts]
    except ValueError:
        raise ExpandError(f'bad compatibility level: "{text}"') from None
    while len(nums) < 3:
        nums.append(0)
    return tuple(nums)


def _compare(left: str, op: str, right: str, level: bool) -> bool:
    if level:
        a, b = _level(left), _level(right)
    elif op in ("==", "!="):
        a, b = left, right
    elif left.isdigit() and right.isdigit():
        a, b = int(left), int(right)
    else:
        a, b = left, right
    return {"==": a == b, "!=": a != b, "<": a < b, "<=": a <= b,
            ">": a > b, ">=": a >= b}[op]
