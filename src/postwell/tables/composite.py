"""Tables made of other tables (Postfix 3.0+): unionmap:, pipemap:, randmap:.

unionmap:{t1, t2, ...} joins every table's result with commas; pipemap:{t1,
t2, ...} feeds each result to the next table as its key; randmap:{v1, v2, ...}
answers any key with one of its values, chosen at random.  Each component
table folds its own keys as it would alone; the composite adds nothing.
"""

from __future__ import annotations

import random

from .base import Table, TableError, split_braced_list, strip_braces


def _components(spec: str, name: str, typ: str, what: str) -> list[str]:
    body, braced = strip_braces(name)
    items = split_braced_list(body, spec) if braced else []
    if not items:
        raise TableError(f'bad syntax: "{spec}"; need "{typ}:{{{what}...}}"')
    return items


class _Composite(Table):
    fold = False      # the component tables fold for themselves

    def __init__(self, spec: str, name: str, warn=None, config=None):
        super().__init__(spec, name)
        from . import open_table
        self.tables = []
        try:
            for item in _components(spec, name, self.type, "type:name"):
                self.tables.append(open_table(item, config, warn=warn))
        except TableError:
            self.close()
            raise

    def close(self) -> None:
        for t in self.tables:
            t.close()

    def changed(self) -> bool:
        return any(t.changed() for t in self.tables)


class UnionTable(_Composite):
    type = "unionmap"

    def _lookup(self, key):
        found = [v for v in (t.lookup(key) for t in self.tables) if v is not None]
        return ",".join(found) if found else None


class PipeTable(_Composite):
    type = "pipemap"

    def _lookup(self, key):
        for t in self.tables:
            key = t.lookup(key)
            if key is None:
                return None
        return key


class RandTable(Table):
    type = "randmap"
    fold = False

    def __init__(self, spec: str, name: str):
        super().__init__(spec, name)
        self.values = _components(spec, name, self.type, "value")
        self._random = random.Random()

    def _lookup(self, key):
        return self._random.choice(self.values)
