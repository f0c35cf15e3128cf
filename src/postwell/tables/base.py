"""Shared pieces of every lookup table: the Table base class, TableError and
the parsing helpers that several table types use (Postfix's "{ ... }" syntax,
logical lines with whitespace continuation)."""

from __future__ import annotations

import os


class TableError(Exception):
    """A table that cannot be opened or searched.

    The message follows Postfix's wording (for example
    ``open database /etc/postfix/access.db: No such file or directory``) so
    that callers can log ``"warning: " + str(err)`` or ``"fatal: " + ...``.
    """


_ASCII_UPPER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def fold_key(key: str, utf8: bool = True) -> str:
    """Postfix's key folding: full Unicode case folding when SMTPUTF8 is
    enabled (smtputf8_enable = yes, the default from compatibility level 1),
    ASCII-only lower-casing otherwise. Checked against postmap 3.7."""
    if utf8:
        return key.casefold()
    return key.translate(_ASCII_UPPER)


def utf8_from_config(config) -> bool:
    if config is None:
        return True
    try:
        return config.get_bool("smtputf8_enable")
    except Exception:
        return True


class TableLookupError(TableError):
    """A lookup that failed (not "not found"): callers must treat it as a
    temporary error (Postfix's DICT_ERR_RETRY), e.g. 451 4.3.0 in smtpd."""


class Table:
    """A lookup table. Subclasses implement ``_lookup``.

    ``spec`` is the full "type:name" text; ``type`` and ``name`` its parts.
    ``fold`` says whether the table folds lookup keys to lower case (Postfix's
    DICT_FLAG_FOLD_FIX, on for every type postwell opens the way the daemons
    do).
    """

    type = ""
    fold = True
    reopens_itself = False  # True: follows a rebuilt file on its own (indexed tables)
    utf8 = True     # set by open_table() from smtputf8_enable; see fold_key()
    warn = None

    def __init__(self, spec: str, name: str):
        self.spec = spec
        self.name = name

    def lookup(self, key: str) -> str | None:
        if self.fold:
            key = fold_key(key, self.utf8)
        value = self._lookup(key)
        if value == "" and self.warn:
            # Postfix's dict layer reports this and still returns the value
            self.warn(f"table {self.spec}: key {key}: empty string result is not allowed")
            self.warn(f"table {self.spec} should return NO RESULT in case of NOT FOUND")
        return value

    def _lookup(self, key: str) -> str | None:  # pragma: no cover - abstract
        raise NotImplementedError

    def items(self):
        """Iterate (key, value) pairs in table order (postmap -s)."""
        raise TableError(f"table {self.spec}: sequence operation is not supported")

    def close(self) -> None:
        pass

    def changed(self) -> bool:
        """True when the file under the table changed since it was opened."""
        return False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.spec}>"


class FileStamp:
    """Identity of a file on disk (device, inode, size, mtime) to notice a
    rebuilt table: postmap renames a new file into place, which changes the
    inode, and an in-place rewrite changes the mtime or size."""

    def __init__(self, path: str):
        self.path = path
        self.stamp = self._get()

    def _get(self):
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def changed(self) -> bool:
        return self._get() != self.stamp


def strip_braces(text: str) -> tuple[str, bool]:
    """'{ text }' -> ('text', True); anything else is returned unchanged."""
    t = text.strip()
    if t.startswith("{") and t.endswith("}"):
        return t[1:-1].strip(), True
    return text, False


def split_braced_list(text: str, where: str) -> list[str]:
    """Split the body of 'type:{ a, b, { c d } }' into its elements.

    Separators are commas and white space outside braces; an element in
    braces keeps its inner white space (braces removed, outer space
    stripped). Raises TableError on unbalanced braces.
    """
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c in ", \t\r\n":
            i += 1
            continue
        if c == "{":
            depth, j = 1, i + 1
            while j < n and depth:
                if text[j] == "{":
                    depth += 1
                elif text[j] == "}":
                    depth -= 1
                j += 1
            if depth:
                raise TableError(f"{where}: missing '}}' in \"{text}\"")
            out.append(text[i + 1:j - 1].strip())
            i = j
            continue
        j = i
        while j < n and text[j] not in ", \t\r\n":
            if text[j] == "{":
                # "key={ value with spaces }" style: take up to the matching brace
                depth, j = 1, j + 1
                while j < n and depth:
                    if text[j] == "{":
                        depth += 1
                    elif text[j] == "}":
                        depth -= 1
                    j += 1
                if depth:
                    raise TableError(f"{where}: missing '}}' in \"{text}\"")
                continue
            if text[j] == "}":
                raise TableError(f"{where}: extra '}}' in \"{text}\"")
            j += 1
        out.append(text[i:j])
        i = j
    return out


def logical_lines(text: str, warn=None, path: str = ""):
    """Yield (line_number, logical_line) the way Postfix's readllines() does.

    Blank lines and lines whose first non-white character is '#' are
    skipped (they neither end nor join a logical line); a line starting
    with white space continues the previous one, joined as written (only
    the newline goes); trailing white space of the result is removed. A
    logical line may not start with white space: Postfix warns (once it has
    read the whole logical line) and skips it.
    """
    cur: list[str] | None = None
    start = 0
    bad: list[str] | None = None

    def report_bad():
        # Postfix reads the whole stray logical line (continuations joined)
        # before it complains, and quotes only its first 30 bytes ("%.30s...").
        raw = "".join(bad).rstrip().encode("utf-8", "surrogateescape")
        shown = raw[:30].decode("utf-8", "surrogateescape") + ("..." if len(raw) > 30 else "")
        warn(f'{path}: logical line must not start with whitespace: "{shown}"')

    for lineno, raw in enumerate(text.split("\n"), 1):
        line = raw  # like Postfix, only the newline goes (a CR stays, mid-line)
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if line[0] in " \t":
            if cur is not None:
                cur.append(line)
            elif bad is not None:
                bad.append(line)
            else:
                bad = [line]
            continue
        if bad is not None:
            if warn:
                report_bad()
            bad = None
        if cur is not None:
            yield start, "".join(cur).rstrip()
        cur, start = [line], lineno
    if bad is not None and warn:
        report_bad()
    if cur is not None:
        yield start, "".join(cur).rstrip()


def read_source(path: str, spec: str) -> str:
    """Read a table's source file; errors are Postfix-shaped."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise TableError(f"open {path}: {e.strerror}") from None
    return data.decode("utf-8", "surrogateescape")
