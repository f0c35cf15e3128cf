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


class TexthashTable(Table):
    """texthash:/path - the postmap source file, read into memory at open.

    Duplicate keys keep the first entry and warn, as postmap does."""

    type = "texthash"

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
            key = fold_key(raw_key, self.utf8) if fold else raw_key
            if key in self.data:
                if warn:
                    # Postfix quotes the duplicate as the file spells it
                    warn(f'{name}, line {lineno}: duplicate entry: "{raw_key}"')
                continue
            self.data[key] = value

    def _lookup(self, key):
        return self.data.get(key)

    def items(self):
        return iter(self.data.items())

    def changed(self):
        return self.stamp.changed()


__all__ = ["parse_source", "TexthashTable", "read_source"]
