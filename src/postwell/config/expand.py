"""$name, ${name}, ${name?value}, ${name:value} expansion (postconf(5))."""

from __future__ import annotations

import re

_REF = re.compile(r"\$(?:([A-Za-z0-9_]+)|\{([A-Za-z0-9_]+)(?:([?:])((?:[^{}]|\{[^{}]*\})*))?\}|\(([A-Za-z0-9_]+)\))")


def expand(value: str, lookup, depth: int = 0) -> str:
    if depth > 100:
        raise ValueError("parameter expansion too deep (recursion?)")
    if "$" not in value:
        return value

    def sub(m: re.Match) -> str:
        name = m.group(1) or m.group(2) or m.group(5)
        raw = lookup(name)
        if m.group(3):
            alt = m.group(4) or ""
            if alt.startswith("{") and alt.endswith("}"):
                alt = alt[1:-1]
            defined = bool(raw)
            if m.group(3) == "?":
                return expand(alt, lookup, depth + 1) if defined else ""
            return "" if defined else expand(alt, lookup, depth + 1)
        if raw is None:
            return ""
        return expand(raw, lookup, depth + 1)

    return _REF.sub(sub, value)
