"""The "key whitespace value" source format shared by texthash: and postmap,
and the texthash: table that reads it directly without an index."""

from __future__ import annotations

from .base import fold_key, FileStamp, Table, TableError, logical_lines, read_source


def parse_source(text: str, path: str, fold: bool = True, warn=None, skip_note: str = "",
                 utf8: bool = True):
    """Yield (key, value) from postmap's input format.

    A logical line is "key whitespace value"; the value keeps its inner
    white space. Lines without a value draw Postfix's warning and are
    skipped. ``fold`` lower-cases keys like postmap does without -f.
    """
    for lineno, line in logical_lines(text, warn, path):
        if utf8 and not_utf8(line):
            if warn:
                warn(f'{path}, line {lineno}: non-UTF-8 input "{line}" -- ignoring this line')
            continue
        # the key ends at white space outside double quotes; the quotes stay
        # part of the key ("a b" is a key with a space), \ escapes inside them
        i, n, quoted = 0, len(line), False
        while i < n and (quoted or not line[i].isspace()):
            if line[i] == '"':
                quoted = not quoted
            elif line[i] == "\\" and quoted and i + 1 < n:
                i += 1
            i += 1
        if quoted:
            if warn:
                warn(f"{path}, line {lineno}: unbalanced '\"' in '{line}' -- ignoring this line")
            continue
        key, value = line[:i], line[i:].strip()
        if not value:
            if warn:
                warn(f"{path}, line {lineno}: expected format: key whitespace value{skip_note}")
            continue
        if fold:
            key = fold_key(key, utf8)
        yield lineno, key, value


def files_base64(value: str) -> tuple[str | None, str]:
    """The -F form of a value that names files (comma/space separated): their
    contents, newline-joined, base64-encoded (tls_server_sni_maps and the
    like); (None, reason) when one cannot be read."""
    import base64
    chunks = []
    for fname in value.replace(",", " ").split():
        try:
            with open(fname, "rb") as f:
                chunks.append(f.read())
        except OSError as e:
            return None, f"open {fname}: {e.strerror}"
    return base64.b64encode(b"\n".join(chunks)).decode("ascii"), ""


def not_utf8(line: str) -> bool:
    """A line read with surrogateescape that held bytes which are not UTF-8
    (Postfix skips such lines when smtputf8_enable is on)."""
    return not line.isascii() and any("\udc80" <= c <= "\udcff" for c in line)


class TexthashTable(Table):
    """texthash:/path - the postmap source file, read into memory at open.

    Duplicate keys keep the first entry and warn, as postmap does."""

    type = "texthash"
    rhs_is_file = False       # postmap -F: values name files (set before __init__)

    def __init__(self, spec: str, name: str, warn=None):
        super().__init__(spec, name)
        try:
            self.stamp = FileStamp(name)
            with open(name, "rb") as f:
                text = f.read().decode("utf-8", "surrogateescape")
        except OSError as e:
            raise TableError(f"open database {name}: {e.strerror}") from None
        self.data: dict[str, str] = {}
        # postmap -f opens the table with fold off (set before __init__ by
        # open_table): keys are then kept and matched as written
        fold = self.fold
        for lineno, raw_key, value in parse_source(text, name, False, warn,
                                                   " -- ignoring this line", self.utf8):
            if warn and raw_key.endswith(":"):
                # dict_thash's hint, as postmap gives it for an aliases(5) file
                warn(f'{name}, line {lineno}: record is in "key: value" format; '
                     "is this an alias file?")
            key = fold_key(raw_key, self.utf8) if fold else raw_key
            if key in self.data:
                if warn:
                    # Postfix quotes the duplicate as the file spells it
                    warn(f'{name}, line {lineno}: duplicate entry: "{raw_key}"')
                continue
            if self.rhs_is_file:
                value, why = files_base64(value)
                if value is None:
                    if warn:
                        warn(f"{name}, line {lineno}: {why}: skipping this entry")
                    continue
            self.data[key] = value

    def _lookup(self, key):
        return self.data.get(key)

    def items(self):
        return iter(self.data.items())

    def changed(self):
        return self.stamp.changed()


__all__ = ["parse_source", "not_utf8", "files_base64", "TexthashTable", "read_source"]
