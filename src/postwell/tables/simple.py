"""Tables that need no file: inline:, static:, fail:, environ:."""

from __future__ import annotations

import os

from .base import fold_key, Table, TableError, TableLookupError, split_braced_list, strip_braces


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
            # like Postfix: the value keeps any braces, a later key wins
            self.data[fold_key(k.strip(), self.utf8)] = v.strip()

    def _lookup(self, key):
        return self.data.get(key)

    def items(self):
        return iter(self.data.items())


class StaticTable(Table):
    """static:value or static:{ text with spaces }: every key finds the value."""

    type = "static"

    def __init__(self, spec: str, name: str):
        super().__init__(spec, name)
        if name.startswith("{"):
            end = name.rfind("}")
            if end < 0:
                raise TableError(f"bad static:name syntax: missing '}}' in \"{name}\"")
            if end != len(name) - 1:
                raise TableError(f"bad static:name syntax: syntax error after '}}' in \"{name}\"")
            self.value = name[1:end].strip()
        else:
            self.value = name

    def _lookup(self, key):
        return self.value



class FailTable(Table):
    """fail:name: every lookup fails with an error (a temporary failure)."""

    type = "fail"

    def _lookup(self, key):
        raise TableLookupError(f"table {self.spec}: query error: Application error")

    def items(self):
        raise TableLookupError(f"table {self.spec}: sequence error: Application error")


class EnvironTable(Table):
    """environ:name: the process environment. Keys fold to lower case like
    Postfix's (so upper-case variables are found only with postmap -f)."""

    type = "environ"

    def _lookup(self, key):
        return os.environ.get(key)
