"""Tables that need no file: inline:, static:, fail:, environ:."""

from __future__ import annotations

import os

from .base import Table, TableError, TableLookupError, split_braced_list, strip_braces


class InlineTable(Table):
    """inline:{ key=value, { key = text with spaces } } (Postfix 3.0+).

    Keys fold to lower case like every Postfix table opened with
    DICT_FLAG_FOLD_FIX; values keep their case."""

    type = "inline"

    def __init__(self, spec: str, name: str):
        super().__init__(spec, name)
        body, braced = strip_braces(name)
        if not braced:
            raise TableError(f'bad syntax: "{spec}"; need "inline:{{name=value...}}"')
        self.data: dict[str, str] = {}
        for elem in split_braced_list(body, spec):
            if "=" not in elem:
                raise TableError(f'missing \'=\' after attribute name: "{spec}"; '
                                 f'need "inline:{{name=value...}}"')
            k, v = elem.split("=", 1)
            k, v = k.strip(), v.strip()
            inner, was = strip_braces(v)
            if was:
                v = inner
            self.data.setdefault(k.lower(), v)

    def _lookup(self, key):
        return self.data.get(key)

    def items(self):
        return iter(self.data.items())


class StaticTable(Table):
    """static:value or static:{ text with spaces }: every key finds the value."""

    type = "static"

    def __init__(self, spec: str, name: str):
        super().__init__(spec, name)
        inner, braced = strip_braces(name)
        self.value = inner if braced else name

    def _lookup(self, key):
        return self.value

    def items(self):
        raise TableError(f"table {self.spec}: sequential access is not supported")


class FailTable(Table):
    """fail:name: every lookup fails with an error (a temporary failure)."""

    type = "fail"

    def _lookup(self, key):
        raise TableLookupError(f"table {self.spec}: query error: Application error")


class EnvironTable(Table):
    """environ:name: the process environment. Keys fold to lower case like
    Postfix's (so upper-case variables are found only with postmap -f)."""

    type = "environ"

    def _lookup(self, key):
        return os.environ.get(key)

    def items(self):
        return iter(sorted(os.environ.items()))
