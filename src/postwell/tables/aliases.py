"""aliases(5): parsing, and the indexed build shared by postalias and
newaliases.

Format: "name: value, value" per logical line (white space at the start of a
line continues the previous one); the name may be quoted ("a b": x); values
are RFC 822 address lists and, as postalias does, are re-written in a
canonical spacing (", " between list members, no space around '.', '@',
':'); ":include:/file", "|command" and "/file" are kept as text for local(8).
"""

from __future__ import annotations

import os
import re
import socket
import time

from .base import TableError, fold_key, logical_lines, utf8_from_config
from .text import not_utf8

_SPECIALS = set("<>@,;:.")
_NEEDS_QUOTE = set('()<>@,;:\\".[]')


def _tokens(text: str):
    """RFC 822-ish tokens: (kind, text) with kind in word/special/comment."""
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c.isspace():
            i += 1
            continue
        if c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            yield "word", text[i:min(j, n)] + '"'
            i = j + 1
            continue
        if c == "(":
            depth, j = 1, i + 1
            while j < n and depth:
                if text[j] == "\\":
                    j += 2
                    continue
                depth += {"(": 1, ")": -1}.get(text[j], 0)
                j += 1
            body = text[i:j]
            if depth:
                body += ")" * depth
            yield "comment", body
            i = j
            continue
        if c == "[":
            j = text.find("]", i + 1)
            j = n if j < 0 else j + 1
            yield "literal", text[i:j] + ("" if text[i:j].endswith("]") else "]")
            i = j
            continue
        if c in _SPECIALS:
            yield "special", c
            i += 1
            continue
        buf = []
        while i < n and not text[i].isspace() and text[i] not in _SPECIALS and text[i] not in '"([':
            if text[i] == "\\" and i + 1 < n:
                # backslash quotes one character; postalias drops the backslash
                buf.append(text[i + 1])
                i += 2
                continue
            buf.append(text[i])
            i += 1
        word = "".join(buf)
        if any(ch in _NEEDS_QUOTE or ch.isspace() or ord(ch) < 32 for ch in word):
            # only a backslash escape can put these into an atom: postalias
            # writes such a word back as a quoted string
            word = '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'
        yield "word", word


def normalize_value(text: str) -> str:
    """Re-write an alias value the way postalias stores it."""
    out: list[str] = []
    prev = None  # kind of the previous token in this list member
    for kind, tok in _tokens(text):
        if kind == "special" and tok == ",":
            out.append(", ")
            prev = None
            continue
        if prev is not None:
            spaced = (kind in ("word", "comment") and prev in ("word", "comment", "literal")) or \
                     (kind == "special" and tok == "<" and prev in ("word", "comment")) or \
                     (kind == "comment" and prev == "special" and tok and out and out[-1] == ">")
            if spaced:
                out.append(" ")
        out.append(tok)
        prev = kind
    return "".join(out)


def _split_name(line: str):
    """'name: value' -> (name, value) or None. The name may be quoted."""
    if line.startswith('"'):
        j = 1
        buf = []
        while j < len(line) and line[j] != '"':
            if line[j] == "\\" and j + 1 < len(line):
                buf.append(line[j + 1])
                j += 2
                continue
            buf.append(line[j])
            j += 1
        if j >= len(line):
            return None
        rest = line[j + 1:].lstrip()
        if not rest.startswith(":"):
            return None
        return "".join(buf), rest[1:]
    colon = line.find(":")
    if colon <= 0:
        return None
    name = line[:colon].strip()
    # a backslash quotes the next character and is itself dropped
    name = re.sub(r"\\(.)", r"\1", name)
    return name, line[colon + 1:]


def parse_aliases(text: str, warn=None, path: str = "aliases", fold: bool = True,
                  utf8: bool = True):
    """Parse aliases(5) text into [(lineno, name, value)] in file order.

    Names are lower-cased; values are normalized like postalias stores
    them. Malformed lines draw Postfix's "need name:value pair" warning.
    """
    entries = []
    for lineno, line in logical_lines(text, warn, path):
        if utf8 and not_utf8(line):
            if warn:
                warn(f'{path}, line {lineno}: non-UTF-8 input "{line}" -- ignoring this line')
            continue
        got = _split_name(line)
        value = normalize_value(got[1]) if got else ""
        if got is None or not got[0] or not value.strip():
            if warn:
                warn(f"{path}, line {lineno}: need name:value pair")
            continue
        if "@" in got[0]:
            if warn:
                warn(f"{path}, line {lineno}: name must be local")
            continue
        entries.append((lineno, fold_key(got[0], utf8) if fold else got[0], value))
    return entries


def build_aliases(typ: str, path: str, config=None, warn=None, dup="warn",
                  fold=True, text: str | None = None, nul=True, keep_perms=True,
                  utf8: bool | None = None, as_owner: bool = True) -> int:
    """Compile an aliases source file into path.db / path.lmdb atomically.
    Returns the number of entries stored."""
    from .index import Builder
    from . import _class_for

    store = _class_for(typ, f"{typ}:{path}").store_class
    try:
        st = os.stat(path)
        if text is None:
            with open(path, "rb") as f:
                text = f.read().decode("utf-8", "surrogateescape")
    except OSError as e:
        raise TableError(f"open {path}: {e.strerror}") from None
    label = f"lmdb:{path}" if typ == "lmdb" else path + store.suffix
    b = Builder(store, path, src_stat=st if keep_perms else None, warn=warn, dup=dup,
                label=label, nul=nul, as_owner=as_owner)
    count = 0
    try:
        if utf8 is None:
            utf8 = utf8_from_config(config)
        for lineno, name, value in parse_aliases(text, warn, path, fold=fold, utf8=utf8):
            if b.put(name, value):
                count += 1
        # Sendmail compatibility markers that postalias writes: "@" tells
        # sendmail the database is complete; the YP_ keys have no NUL.
        b.put("@", "@")
        host = config.get("myhostname") if config is not None else socket.getfqdn()
        b.writer.put(b"YP_LAST_MODIFIED", str(int(time.time())).encode())
        b.writer.put(b"YP_MASTER_NAME", host.encode())
        b.commit()
    except BaseException:
        b.abort()
        raise
    return count


def newaliases_build(config, warn=None) -> int:
    """Build every indexed entry of $alias_database (sendmail -bi,
    newaliases). Returns 0, or raises TableError on the first failure."""
    from . import split_spec

    default_type = config.get("default_database_type") if config is not None else "hash"
    specs = config.get_list("alias_database") if config is not None else ["hash:/etc/aliases"]
    for spec in specs:
        if ":" in spec:
            typ, name = split_spec(spec)
        else:
            typ, name = default_type, spec
        if typ not in ("hash", "btree", "lmdb"):
            # texthash/inline/... need no index: nothing to build
            continue
        build_aliases(typ, name, config=config, warn=warn)
    return 0
