"""regexp: (regexp_table(5), POSIX regular expressions) and pcre:
(pcre_table(5)) tables, both run on Python's re module.

Both match on octets, as Postfix does (no UTF mode): '.' matches one byte
of a UTF-8 character and case folding is ASCII-only.

regexp: patterns are POSIX ERE (BRE with the x flag toggled off) as glibc
reads them, translated to Python syntax: bracket expressions with
[:class:] and a literal backslash, \\< \\> word edges, '.' matching
newline unless m, '$' only at the very end, stacked repeats (a**), and
glibc's quirk that an escaped lower-case letter (\\d) never matches under
REG_ICASE. POSIX captures are leftmost-longest, Python's leftmost-first;
this only changes what $N holds (x(a|ab) on "xab"), so a rule with $N in
its result is re-matched with the `regex` package's POSIX mode when that
package is installed (else Python's captures are used). Rejected: a repeat
stacked on an interval (a{2}*).

pcre: PCRE syntax mostly is Python's. Translated: (?<name>..), \\k<name>,
\\g{N}, \\z, \\Z, \\h, \\cX, \\x{HH}, \\Q..\\E, [:class:] and [:^class:]
inside brackets, (?flags) in mid-pattern, look-behinds whose alternatives
differ in length, PCRE2's literal '{' when not a quantifier; \\K is dropped
(results use capture groups only); the U flag swaps quantifier greediness.
Rejected with a warning (the rule is skipped, as Postfix skips a rule that
does not compile): recursion ((?R), (?1)), backtracking verbs (*...),
\\p{..} properties, branch reset (?|..).
"""

from __future__ import annotations

import re

try:  # optional: POSIX leftmost-longest captures for regexp: $N results
    import regex as _regex
except ImportError:  # pragma: no cover - then Python's leftmost-first captures
    _regex = None

from .base import FileStamp, Table, TableError, logical_lines, read_source, strip_braces

_POSIX_CLASSES = {
    "alpha": "a-zA-Z", "digit": "0-9", "alnum": "a-zA-Z0-9", "upper": "A-Z",
    "lower": "a-z", "space": " \\t\\n\\r\\f\\v", "blank": " \\t",
    "punct": "!-/:-@\\[-`{-~", "print": " -~", "graph": "!-~",
    "cntrl": "\\x00-\\x1f\\x7f", "xdigit": "0-9A-Fa-f", "word": "a-zA-Z0-9_",
}


class PatternError(ValueError):
    pass


_UNMATCHED_BRACKET = "Unmatched [, [^, [:, [., or [="


def _bracket(pat: str, i: int, backslash_escapes: bool, newline_excluded: bool = False
             ) -> tuple[str, int]:
    """Translate a bracket expression starting at pat[i] == '['.
    Returns (python_text, index after the closing ']')."""
    n = len(pat)
    j = i + 1
    out = []
    negated = False
    neg_classes: list[str] = []   # PCRE [:^name:] members
    if j < n and pat[j] == "^":
        negated = True
        j += 1
    first = True
    while True:
        if j >= n:
            # glibc: a '[' or '[^' that ends the pattern is REG_BADPAT,
            # not REG_EBRACK (checked against postmap regexp:)
            raise PatternError("Invalid regular expression" if first else _UNMATCHED_BRACKET)
        c = pat[j]
        if c == "]" and not first:
            if negated and newline_excluded:
                out.append("\\n")  # REG_NEWLINE: a non-matching list never matches newline
            return _assemble_set("".join(out), negated, neg_classes), j + 1
        first = False
        if c == "[" and j + 1 < n and pat[j + 1] in ":=.":
            kind = pat[j + 1]
            end = pat.find(kind + "]", j + 2)
            if end < 0:
                raise PatternError(_UNMATCHED_BRACKET)
            name = pat[j + 2:end]
            if kind == ":" and backslash_escapes and name.startswith("^") \
                    and name[1:] in _POSIX_CLASSES:
                neg_classes.append(_POSIX_CLASSES[name[1:]])
            elif kind == ":":
                if name not in _POSIX_CLASSES:
                    raise PatternError(f"invalid character class [:{name}:]")
                out.append(_POSIX_CLASSES[name])
            else:
                if backslash_escapes:
                    raise PatternError("POSIX collating elements are not supported")
                out.append(re.escape(name))
            j = end + 2
            continue
        if c == "\\" and backslash_escapes:
            # PCRE: escapes work inside classes; pass the pair through
            if j + 1 >= n:
                raise PatternError("\\ at end of pattern")
            nxt = pat[j + 1]
            if nxt == "h":
                out.append(" \\t")
            elif nxt == "c" and j + 2 < n:
                out.append("\\x%02x" % (ord(pat[j + 2].upper()) ^ 0x40))
                j += 3
                continue
            elif nxt == "x" and j + 2 < n and pat[j + 2] == "{":
                end = pat.find("}", j + 3)
                if end < 0:
                    raise PatternError("missing } after \\x{")
                out.append("\\U%08x" % int(pat[j + 3:end], 16))
                j = end + 1
                continue
            else:
                out.append("\\" + nxt)
            j += 2
            continue
        if c in "\\[&~|":
            # literal in POSIX brackets; escaped for Python's set syntax
            out.append("\\" + c)
        else:
            out.append(c)
        j += 1


def _assemble_set(members: str, negated: bool, neg_classes: list[str]) -> str:
    """A Python equivalent of a bracket expression; PCRE's negated POSIX
    classes ([[:^alpha:]]) have no set syntax in Python, so they become an
    alternation (or a look-ahead for a negated bracket)."""
    if not neg_classes:
        return f"[{'^' if negated else ''}{members}]"
    alts = [f"[^{c}]" for c in neg_classes]
    if not negated:
        if members:
            alts.insert(0, f"[{members}]")
        return "(?:" + "|".join(alts) + ")"
    # [^X[:^c:]] = every class c, minus X
    inner = "".join(f"(?=[{c}])" for c in neg_classes)
    return f"(?:{inner}{'(?![' + members + '])' if members else ''}[\\s\\S])"


def posix_to_python(pat: str, extended: bool, multiline: bool, icase: bool = False) -> str:
    """Translate a POSIX ERE (extended) or BRE to Python re syntax."""
    out: list[str] = []
    i, n = 0, len(pat)
    dollar = r"(?=\n)|\Z" if multiline else r"\Z"
    depth = 0
    while i < n:
        c = pat[i]
        if c == "[":
            text, i = _bracket(pat, i, backslash_escapes=False, newline_excluded=multiline)
            out.append(text)
            continue
        if c == "\\":
            if i + 1 >= n:
                raise PatternError("trailing backslash (\\)")
            d = pat[i + 1]
            i += 2
            if d.isdigit() and d != "0":
                out.append("\\" + d)
            elif d in "wWsSbB":
                out.append("\\" + d)
            elif d == "<":
                out.append(r"\b(?=\w)")
            elif d == ">":
                out.append(r"\b(?<=\w)")
            elif d == "`":
                out.append(r"\A")
            elif d == "'":
                out.append(r"\Z")
            elif icase and "a" <= d <= "z":
                # glibc quirk, kept for compatibility: under REG_ICASE an
                # escaped lower-case letter without special meaning (\d, \y)
                # matches nothing at all
                out.append("(?!)")
            elif not extended and d in "(){}|+?":
                # BRE: \( \) \{ \} are the operators (\| \+ \? are GNU extensions)
                if d == "(":
                    depth += 1
                    out.append("(")
                elif d == ")":
                    depth -= 1
                    out.append(")")
                else:
                    out.append(d)
            else:
                out.append(re.escape(d))
            continue
        if extended:
            if c == "(":
                if i + 1 < n and pat[i + 1] == "?":
                    raise PatternError("Invalid preceding regular expression")
                depth += 1
                out.append("(")
            elif c == ")":
                if depth == 0:
                    # glibc's POSIX ERE syntax takes an unmatched ')' as a
                    # literal (RE_UNMATCHED_RIGHT_PAREN_ORD); postmap agrees
                    out.append(r"\)")
                else:
                    depth -= 1
                    out.append(")")
            elif c == "$":
                out.append(f"(?:{dollar})")
            elif c == "{":
                m = re.match(r"\{(\d*)(,?)(\d*)\}", pat[i:])
                if not m:
                    raise PatternError("Unmatched \\{" if "}" not in pat[i:]
                                       else "Invalid content of \\{\\}")
                if out and (out[-1] in ("*", "+", "?") or out[-1].startswith("{")):
                    raise PatternError("stacked repetition (a*{2}) is not supported by postwell")
                out.append(m.group(0))
                i += m.end()
                continue
            elif c in "*+?":
                prev = out[-1] if out else ""
                if prev in ("", "(", "|", "^"):
                    # nothing to repeat: glibc's REG_BADRPT
                    raise PatternError("Invalid preceding regular expression")
                if prev in ("*", "+", "?"):
                    # stacked repeats (a**, a+?): POSIX has no lazy forms;
                    # the combination repeats like the wider of the two
                    out[-1] = prev if prev == c else "*"
                elif prev.startswith("{") and prev.endswith("}"):
                    raise PatternError("stacked repetition (a{2}*) is not supported by postwell")
                else:
                    out.append(c)
            elif c in "|}^.":
                out.append(c)
            else:
                out.append(re.escape(c))
        else:
            if c == "*" and (not out or out[-1] in ("(", "^")):
                out.append(r"\*")
            elif c == "^" and not out:
                out.append("^")
            elif c == "$" and i == n - 1:
                out.append(f"(?:{dollar})")
            elif c == ".":
                out.append(".")
            elif c == "*":
                out.append("*")
            else:
                out.append(re.escape(c))
        i += 1
    if depth > 0:
        raise PatternError("Unmatched ( or \\(")
    return "".join(out)


_REJECT = [
    (re.compile(r"\(\?R\)|\(\?[+-]?\d+\)|\(\?&\w+\)|\(\?P>\w+\)"), "recursion is not supported"),
    (re.compile(r"\(\*[A-Z_]"), "backtracking control verbs are not supported"),
    (re.compile(r"\(\?\|"), "branch reset groups (?|...) are not supported"),
]


def _group_end(pat: str, i: int) -> int:
    """Index of the ')' closing the group that opens at pat[i]."""
    depth, j, n = 0, i, len(pat)
    while j < n:
        c = pat[j]
        if c == "\\":
            j += 2
            continue
        if c == "[":
            j += 1
            if j < n and pat[j] == "^":
                j += 1
            if j < n and pat[j] == "]":
                j += 1
            while j < n and pat[j] != "]":
                j += 2 if pat[j] == "\\" else 1
        elif c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
            if depth == 0:
                return j
        j += 1
    raise PatternError("missing closing parenthesis")


def _split_alternatives(body: str) -> list[str]:
    """Split a group body on its top-level '|'."""
    alts, depth, start, j, n = [], 0, 0, 0, len(body)
    while j < n:
        c = body[j]
        if c == "\\":
            j += 2
            continue
        if c == "[":
            j += 1
            if j < n and body[j] == "^":
                j += 1
            if j < n and body[j] == "]":
                j += 1
            while j < n and body[j] != "]":
                j += 2 if body[j] == "\\" else 1
        elif c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
        elif c == "|" and depth == 0:
            alts.append(body[start:j])
            start = j + 1
        j += 1
    alts.append(body[start:])
    return alts


def pcre_to_python(pat: str, ungreedy: bool = False) -> str:
    """Translate the PCRE features Python spells differently; raise
    PatternError for those it lacks."""
    for rx, why in _REJECT:
        if rx.search(pat):
            raise PatternError(why)
    out: list[str] = []
    i, n = 0, len(pat)
    # per open group: how many "(?flags:" wrappers were opened inside it
    stack: list[list] = [[0, ""]]
    while i < n:
        c = pat[i]
        if c == "\\":
            if i + 1 >= n:
                raise PatternError("\\ at end of pattern")
            d = pat[i + 1]
            if d == "Q":
                end = pat.find("\\E", i + 2)
                lit = pat[i + 2:] if end < 0 else pat[i + 2:end]
                out.append(re.escape(lit))
                i = n if end < 0 else end + 2
                continue
            if d == "E":
                i += 2
                continue
            if d == "z":
                out.append(r"\Z")
            elif d == "Z":
                out.append(r"(?=\n?\Z)")
            elif d == "h":
                out.append(r"[ \t]")
            elif d == "H":
                out.append(r"[^ \t]")
            elif d == "e":
                out.append(r"\x1b")
            elif d == "c" and i + 2 < n:
                out.append("\\x%02x" % (ord(pat[i + 2].upper()) ^ 0x40))
                i += 3
                continue
            elif d == "K":
                # \K only moves the start of the reported match; pcre_table
                # results use capture groups only, so it can be dropped
                pass
            elif d in "pPX":
                raise PatternError(f"\\{d} (Unicode properties) is not supported")
            elif d == "x" and i + 2 < n and pat[i + 2] == "{":
                end = pat.find("}", i + 3)
                if end < 0:
                    raise PatternError("missing } after \\x{")
                out.append("\\U%08x" % int(pat[i + 3:end], 16))
                i = end + 1
                continue
            elif d == "k" and i + 2 < n and pat[i + 2] in "<{'":
                close = {"<": ">", "{": "}", "'": "'"}[pat[i + 2]]
                end = pat.find(close, i + 3)
                if end < 0:
                    raise PatternError("syntax error in subpattern name (missing terminator)")
                out.append(f"(?P={pat[i + 3:end]})")
                i = end + 1
                continue
            elif d == "g":
                m = re.match(r"\\g(?:\{(-?\w+)\}|(\d+))", pat[i:])
                if not m:
                    raise PatternError("a numbered reference must not be zero")
                ref = m.group(1) or m.group(2)
                if ref.startswith("-"):
                    raise PatternError("relative back references are not supported")
                out.append(f"(?P={ref})" if not ref.isdigit() else f"(?:\\{ref})")
                i += m.end()
                continue
            else:
                out.append(pat[i:i + 2])
            i += 2
            continue
        if c == "[":
            text, i = _bracket(pat, i, backslash_escapes=True)
            out.append(text)
            continue
        if c == "(":
            if pat.startswith("(?<=", i) or pat.startswith("(?<!", i):
                end = _group_end(pat, i)
                alts = _split_alternatives(pat[i + 4:end])
                if len(alts) > 1:
                    # PCRE allows alternatives of different fixed lengths in
                    # a look-behind; Python wants one length: one look-behind
                    # per alternative
                    kind = pat[i + 3]
                    parts = [f"(?<{kind}{pcre_to_python(a)})" for a in alts]
                    out.append("(?:" + "|".join(parts) + ")" if kind == "=" else "".join(parts))
                    i = end + 1
                    continue
            if pat.startswith("(?<", i) and i + 3 < n and pat[i + 3] not in "=!":
                out.append("(?P<")
                i += 3
                stack.append([0, ""])
                continue
            if pat.startswith("(?'", i):
                end = pat.find("'", i + 3)
                if end < 0:
                    raise PatternError("syntax error in subpattern name (missing terminator)")
                out.append(f"(?P<{pat[i + 3:end]}>")
                i = end + 1
                stack.append([0, ""])
                continue
            m = re.match(r"\(\?([a-zA-Z]*)(?:-([a-zA-Z]*))?\)", pat[i:])
            if m and (m.group(1) or m.group(2)):
                on, off = m.group(1) or "", m.group(2) or ""
                bad = set(on + off) - set("imsx")
                if bad:
                    raise PatternError(f"unsupported inline option (?{''.join(sorted(bad))})")
                flags = on + ("-" + off if off else "")
                if not out and len(stack) == 1 and not off:
                    out.append(f"(?{on})")
                else:
                    # Python only takes global flags at the start: scope the
                    # flags to the rest of the enclosing group instead
                    out.append(f"(?{flags}:")
                    stack[-1][0] += 1
                    stack[-1][1] = flags
                i += m.end()
                continue
            stack.append([0, ""])
            out.append("(")
            i += 1
            continue
        if c == "|" and stack[-1][0]:
            # a (?flags) scope runs on into the next alternative
            flags = stack[-1][1]
            out.append(")" * stack[-1][0] + "|" + f"(?{flags}:")
            stack[-1][0] = 1
            i += 1
            continue
        if c == ")":
            if len(stack) > 1:
                opened = stack.pop()[0]
                out.append(")" * opened)
            out.append(")")
            i += 1
            continue
        if ungreedy and not (c == "?" and out and out[-1].endswith("(")):
            m = re.match(r"[*+?]|\{\d+(?:,\d*)?\}", pat[i:])
            if m:
                # PCRE2_UNGREEDY swaps lazy and greedy quantifiers
                out.append(m.group(0))
                i += m.end()
                if i < n and pat[i] == "?":
                    i += 1
                elif i < n and pat[i] == "+":
                    out.append("+")
                    i += 1
                else:
                    out.append("?")
                continue
        if c == "{" and not re.match(r"\{\d+(?:,\d*)?\}", pat[i:]):
            out.append("\\{")  # PCRE2: not a quantifier, so a literal brace
            i += 1
            continue
        out.append(c)
        i += 1
    out.append(")" * stack[0][0])
    return "".join(out)


def _octets(text: str) -> str:
    """UTF-8 text as one character per octet: Postfix runs regex(3) and
    PCRE on bytes (no UTF mode), so '.' matches one octet of 'é'."""
    return text.encode("utf-8", "surrogateescape").decode("latin-1")


def _unoctets(text: str) -> str:
    return text.encode("latin-1").decode("utf-8", "surrogateescape")


def _regex_flags(flags: int) -> int:
    """re flags -> the regex module's (their bit values differ)."""
    out = _regex.POSIX | _regex.ASCII
    for a, b in ((re.IGNORECASE, _regex.IGNORECASE), (re.MULTILINE, _regex.MULTILINE),
                 (re.DOTALL, _regex.DOTALL)):
        if flags & a:
            out |= b
    return out


class _Rule:
    __slots__ = ("rx", "negate", "result", "children", "lineno", "anchored", "posix_rx")

    def __init__(self, rx, negate, result, children, lineno, anchored=False):
        self.rx, self.negate, self.result = rx, negate, result
        self.children, self.lineno, self.anchored = children, lineno, anchored
        self.posix_rx = None

    def match(self, key):
        return self.rx.match(key) if self.anchored else self.rx.search(key)


_MACRO = re.compile(r"\$(?:\$|\{([^}]*)\}|\(([^)]*)\)|([A-Za-z0-9_]+)|)")


def parse_result(text: str):
    """Split a result into literal text and group numbers.

    Returns (parts, max_index) where parts is a list of str | int. Raises
    PatternError with Postfix's wording for bad macro syntax."""
    parts: list = []
    maxn = 0
    i = 0
    while True:
        j = text.find("$", i)
        if j < 0:
            parts.append(text[i:])
            break
        parts.append(text[i:j])
        rest = text[j + 1:]
        if rest.startswith("$"):
            parts.append("$")
            i = j + 2
            continue
        if rest[:1] in ("{", "("):
            close = "}" if rest[0] == "{" else ")"
            end = rest.find(close)
            if end < 0:
                raise PatternError(f'truncated macro reference: "{text}"', "macro")
            name = rest[1:end]
            i = j + 2 + end
        else:
            m = re.match(r"[A-Za-z0-9_]+", rest)
            if not m:
                raise PatternError(f'empty macro name: "{text}"', "macro")
            name = m.group(0)
            i = j + 1 + m.end()
        if not name:
            raise PatternError(f'empty macro name: "{text}"', "macro")
        if not name.isdigit():
            raise PatternError(f'non-numeric replacement index "{name}"', "index")
        if int(name) == 0:
            raise PatternError("0", "zero")
        parts.append(int(name))
        maxn = max(maxn, int(name))
    return [p for p in parts if p != ""], maxn


def _expand(parts, m) -> str:
    if m is None:
        return "".join(parts)
    out = []
    for p in parts:
        if isinstance(p, int):
            out.append(_unoctets(m.group(p) or ""))
        else:
            out.append(p)
    return "".join(out)


class RegexpTable(Table):
    """regexp: table; see the module docstring for the dialect."""

    type = "regexp"
    fold = False
    label = "regexp map"
    FLAGS = "ixm"
    DEFAULT_FLAGS = "ix"
    OBSOLETE = ""
    SKIP_DELIM = "skipping this rule"
    OUT_OF_RANGE = "out-of-range"

    def __init__(self, spec: str, name: str, warn=None):
        super().__init__(spec, name)
        self.warn = warn or (lambda msg: None)
        inner, braced = strip_braces(name)
        if name.lstrip().startswith("{") and not braced:
            raise TableError(f"{self.type} map: missing '}}' in \"{name}\"")
        if braced:
            lines = []
            for elem in _split_rules(inner, spec, self.label):
                lines.append(elem)
            text, self.stamp = "\n".join(lines) + "\n", None
        else:
            self.stamp = FileStamp(name)
            text = read_source(name, spec)
        self.rules = self._parse(text)

    # -- parsing ---------------------------------------------------------
    def _where(self, lineno):
        return f"{self.label} {self.name}, line {lineno}"

    def _get_pattern(self, text: str, lineno: int, compile: bool = True):
        """Parse '[!]<d>pattern<d>flags' at the start of text.
        Returns (regex, negate, anchored, rest) or None after a warning;
        with compile=False (pattern, flags, negate, rest), uncompiled."""
        negate = False
        p = text
        if p.startswith("!"):
            negate = True
            p = p[1:].lstrip()
        if not p:
            self.warn(f"{self._where(lineno)}: no regexp delimiter: skipping this rule")
            return None
        delim = p[0]
        i = 1
        buf = []
        while i < len(p) and p[i] != delim:
            if p[i] == "\\" and i + 1 < len(p):
                if p[i + 1] == delim:
                    buf.append(delim if delim not in ".*+?()[]{}|^$\\" else "\\" + delim)
                    i += 2
                    continue
                buf.append(p[i:i + 2])
                i += 2
                continue
            buf.append(p[i])
            i += 1
        if i >= len(p):
            self.warn(f'{self._where(lineno)}: no closing regexp delimiter "{delim}": '
                      f'{self.SKIP_DELIM}')
            return None
        pattern = "".join(buf)
        i += 1
        flags = set(self.DEFAULT_FLAGS)
        while i < len(p) and not p[i].isspace():
            f = p[i]
            if f in self.OBSOLETE:
                self.warn(f'{self._where(lineno)}: ignoring obsolete regexp option "{f}"')
            elif f in self.FLAGS:
                flags ^= {f}
            else:
                self.warn(f'{self._where(lineno)}: unknown regexp option "{f}": skipping this rule')
                return None
            i += 1
        if not compile:
            return pattern, flags, negate, p[i:].strip()
        got = self._compile_rule(pattern, flags, lineno)
        if got is None:
            return None
        return got[0], negate, got[1], p[i:].strip()

    def _compile_rule(self, pattern, flags, lineno):
        try:
            return self._compile(_octets(pattern), flags)
        except (PatternError, re.error, ValueError, OverflowError) as e:
            self.warn(f"{self._where(lineno)}: {self._compile_error(pattern, e)}")
            return None

    def _compile(self, pattern, flags):
        multiline = "m" in flags
        py = posix_to_python(pattern, extended="x" in flags, multiline=multiline,
                             icase="i" in flags)
        f = re.ASCII
        if "i" in flags:
            f |= re.IGNORECASE
        if multiline:
            f |= re.MULTILINE
        else:
            f |= re.DOTALL
        return re.compile(py, f), False

    def _compile_error(self, pattern, e):
        return getattr(e, "msg", None) or str(e)

    def _parse(self, text: str):
        top: list[_Rule] = []
        stack: list[tuple[list[_Rule], int]] = [(top, 0)]
        for lineno, line in logical_lines(text, self.warn, self.name):
            low = line.lower()
            if low.startswith("endif") and (len(line) == 5 or not line[5].isalnum()):
                if len(stack) == 1:
                    self.warn(f"{self._where(lineno)}: ignoring ENDIF without matching IF")
                else:
                    if line[5:].strip():
                        self.warn(f"{self._where(lineno)}: ignoring extra text after ENDIF")
                    stack.pop()
                continue
            if low.startswith("if") and len(line) > 2 and not line[2].isalnum():
                got = self._get_pattern(line[2:].lstrip(), lineno)
                if got is None:
                    # like Postfix: a broken IF opens no block (its ENDIF
                    # then draws "without matching IF")
                    continue
                rx, negate, anchored, rest = got
                if rest:
                    self.warn(f'{self._where(lineno)}: ignoring extra text after IF statement: "{rest}"')
                    self.warn(f"{self._where(lineno)}: do not prepend whitespace to statements "
                              f"between IF and ENDIF")
                rule = _Rule(rx, negate, None, [], lineno, anchored)
                stack[-1][0].append(rule)
                stack.append((rule.children, lineno))
                continue
            if line[0].isalnum():
                self.warn(f"{self._where(lineno)}: ignoring unrecognized request")
                continue
            # Postfix checks the replacement text before it compiles the
            # pattern: a rule bad in both draws only the replacement warning
            got = self._get_pattern(line, lineno, compile=False)
            if got is None:
                continue
            pattern, flags, negate, rest = got
            if not rest:
                self.warn(f"{self._where(lineno)}: no replacement text: using empty string")
            try:
                parts, maxn = parse_result(rest)
            except PatternError as e:
                if e.args[1:] == ("macro",):
                    self.warn(f"{e.args[0]}")
                elif e.args[1:] == ("zero",):
                    self.warn(f'{self._where(lineno)}: {self.OUT_OF_RANGE} replacement index "0"')
                else:
                    self.warn(f"{self._where(lineno)}: {e.args[0]}")
                self.warn(f"{self._where(lineno)}: bad replacement syntax: skipping this rule")
                continue
            if maxn and negate:
                self.warn(f"{self._where(lineno)}: $number found in negative match "
                          f"replacement text: skipping this rule")
                continue
            compiled = self._compile_rule(pattern, flags, lineno)
            if compiled is None:
                continue
            rx, anchored = compiled
            if maxn > rx.groups:
                self.warn(f'{self._where(lineno)}: out of range replacement index "{maxn}": '
                          f"skipping this rule")
                continue
            rule = _Rule(rx, negate, parts, None, lineno, anchored)
            if maxn and self.type == "regexp" and _regex is not None:
                # whether a rule matches does not depend on leftmost-longest
                # versus leftmost-first, but what $N captures does: re-match
                # in POSIX mode only to fill in the substitutions
                try:
                    rule.posix_rx = _regex.compile(rx.pattern, _regex_flags(rx.flags))
                except Exception:
                    rule.posix_rx = None
            stack[-1][0].append(rule)
        # every IF still open is reported, innermost first, as Postfix does
        for _rules, if_line in reversed(stack[1:]):
            self.warn(f"{self._where(if_line)}: IF has no matching ENDIF")
        return top

    # -- lookup ----------------------------------------------------------
    def _lookup(self, key: str):
        return self._search(self.rules, _octets(key))

    def _search(self, rules, key):
        for r in rules:
            m = r.match(key)
            if r.negate:
                if m is not None:
                    continue
                m = None
            elif m is None:
                continue
            if r.children is None:
                if m is not None and r.posix_rx is not None:
                    m = r.posix_rx.search(key) or m
                return _expand(r.result, m)
            found = self._search(r.children, key)
            if found is not None:
                return found
        return None

    def changed(self):
        return self.stamp.changed() if self.stamp else False


class PcreTable(RegexpTable):
    """pcre: table on Python's re; see the module docstring."""

    type = "pcre"
    label = "pcre map"
    FLAGS = "imsxAEU"
    DEFAULT_FLAGS = "i"
    OBSOLETE = "X"
    SKIP_DELIM = "ignoring this rule"
    OUT_OF_RANGE = "out of range"

    def _compile(self, pattern, flags):
        py = pcre_to_python(pattern, ungreedy="U" in flags)
        if "E" in flags and "m" not in flags:
            # PCRE_DOLLAR_ENDONLY: '$' only at the very end, not before a final newline
            py = _dollar_endonly(py)
        f = re.ASCII
        if "i" in flags:
            f |= re.IGNORECASE
        if "m" in flags:
            f |= re.MULTILINE
        if "s" in flags:
            f |= re.DOTALL
        if "x" in flags:
            f |= re.VERBOSE
        return re.compile(py, f), "A" in flags

    def _compile_error(self, pattern, e):
        pos = getattr(e, "pos", None)
        msg = getattr(e, "msg", None) or str(e)
        pos, msg = _pcre2_error(pattern, pos, msg)
        if pos is not None:
            return f"error in regex at offset {pos}: {msg}"
        return f"error in regex: {msg}"


def _pcre2_error(pattern: str, pos, msg: str):
    """Python re's complaint -> the text and offset PCRE2 (Postfix 3.7's
    pcre: tables) reports for the same mistake; both checked against
    postmap. PCRE2 reports an unterminated construct at the pattern's end."""
    end = len(pattern.encode("utf-8", "surrogateescape"))
    if msg.startswith("missing ), unterminated subpattern"):
        return end, "missing closing parenthesis"
    if msg.startswith("Unmatched [") or msg.startswith("unterminated character set") \
            or (msg == "Invalid regular expression" and pattern.endswith(("[", "[^"))):
        return end, "missing terminating ] for character class"
    if msg.startswith("nothing to repeat") or msg.startswith("multiple repeat"):
        return pos, "quantifier does not follow a repeatable item"
    if msg.startswith("unbalanced parenthesis"):
        return pos, "unmatched closing parenthesis"
    if msg.startswith("min repeat greater than max repeat") and pos is not None:
        close = pattern.find("}", pos)
        return (close if close >= 0 else pos), "numbers out of order in {} quantifier"
    if msg.startswith("bad character range") and pos is not None:
        return pos + 2, "range out of order in character class"
    if msg.startswith("missing >, unterminated name"):
        return pos, "syntax error in subpattern name (missing terminator?)"
    if msg.startswith("bad character in group name") and pos is not None \
            and pattern[pos:pos + 1].isdigit():
        return pos, "subpattern name must start with a non-digit"
    return pos, msg


def _dollar_endonly(py: str) -> str:
    out, i, in_class = [], 0, False
    while i < len(py):
        c = py[i]
        if c == "\\":
            out.append(py[i:i + 2])
            i += 2
            continue
        if c == "[":
            in_class = True
        elif c == "]":
            in_class = False
        elif c == "$" and not in_class:
            out.append(r"\Z")
            i += 1
            continue
        out.append(c)
        i += 1
    return "".join(out)


def _split_rules(body: str, spec: str, label: str) -> list[str]:
    """Rules of an inline pattern table: 'type:{ {rule}, {rule} }'."""
    typ = label.split()[0]
    rules = []
    i, n = 0, len(body)
    while i < n:
        c = body[i]
        if c in ", \t\r\n":
            i += 1
            continue
        if c != "{":
            j = i
            while j < n and body[j] not in ", \t\r\n":
                j += 1
            raise TableError(f"{typ} map: no '{{' at start of text in \"{body[i:j]}\"")
        depth, j = 1, i + 1
        while j < n and depth:
            if body[j] == "{":
                depth += 1
            elif body[j] == "}":
                depth -= 1
            j += 1
        if depth:
            raise TableError(f"{typ} map: missing '}}' in \"{body[i:]}\"")
        rules.append(body[i + 1:j - 1].strip())
        i = j
    return rules
