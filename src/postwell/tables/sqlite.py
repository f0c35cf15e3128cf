"""sqlite: tables (sqlite_table(5)) on Python's sqlite3 module.

The table name is a configuration file in main.cf syntax (or, for a name
not starting with '/' or '.', parameters "name_dbpath", "name_query", ... in
main.cf). Parameters: dbpath, query (or the legacy select_field, table,
where_field, additional_conditions), result_format, domain, expansion_limit.

query expansions: %% %s %u %d %S %U %D %1..%9 (values SQL-quoted). %d and
%1..%9 suppress the query when the key has no (or too short a) domain.
result_format: %s %u %d of each result value; %S %U %D %1..%9 of the key.
Rows are joined with ",". The database is opened read-only: postwell never
writes to it.
"""

from __future__ import annotations

import sqlite3

from .base import Table, TableError, TableLookupError, logical_lines, read_source


def _parse_cf(text: str) -> dict[str, str]:
    params = {}
    for _lineno, line in logical_lines(text):
        name, eq, value = line.partition("=")
        if eq:
            params[name.strip()] = value.strip()
    return params


def _quote(s: str) -> str:
    return s.replace("'", "''")


class _Suppress(Exception):
    """The key lacks a part a template needs: no query, no result."""


def _key_parts(key: str):
    if "@" in key:
        user, _, domain = key.rpartition("@")
        return user, domain
    return key, None


def _expand(template: str, key: str, value: str | None, sql: bool) -> str:
    kuser, kdomain = _key_parts(key)
    if value is not None:
        vuser, vdomain = _key_parts(value)
    out = []
    i, n = 0, len(template)
    while i < n:
        c = template[i]
        if c != "%" or i + 1 >= n:
            out.append(c)
            i += 1
            continue
        d = template[i + 1]
        i += 2
        if d == "%":
            out.append("%")
            continue
        if d.isdigit() and d != "0":
            if kdomain is None:
                raise _Suppress()
            labels = kdomain.split(".")
            idx = int(d)
            if idx > len(labels):
                raise _Suppress()
            part = labels[-idx]
        elif value is not None and d in "sud":
            part = {"s": value, "u": vuser, "d": vdomain}[d]
            if part is None:
                raise _Suppress()
        elif d in "sS":
            part = key
        elif d in "uU":
            part = kuser
        elif d in "dD":
            if kdomain is None:
                raise _Suppress()
            part = kdomain
        else:
            raise TableError(f"invalid %-expansion \"%{d}\" in \"{template}\"")
        out.append(_quote(part) if sql else part)
    return "".join(out)


class SqliteTable(Table):
    type = "sqlite"
    fold = True

    def __init__(self, spec: str, name: str, config=None):
        super().__init__(spec, name)
        if name.startswith(("/", ".")):
            params = _parse_cf(read_source(name, spec))
        else:
            params = {}
            for p in ("dbpath", "query", "result_format", "domain", "expansion_limit",
                      "select_field", "table", "where_field", "additional_conditions"):
                if config is not None and config.is_set(f"{name}_{p}"):
                    params[p] = config.get(f"{name}_{p}")
        self.dbpath = params.get("dbpath")
        if not self.dbpath:
            raise TableError(f"{spec}: dbpath parameter is required")
        query = params.get("query")
        if not query:
            sel, tab, where = (params.get("select_field"), params.get("table"),
                               params.get("where_field"))
            if not (sel and tab and where):
                raise TableError(f"{spec}: missing \"query\" parameter")
            query = f"SELECT {sel} FROM {tab} WHERE {where} = '%s' " + \
                params.get("additional_conditions", "")
        self.query = query
        self.result_format = params.get("result_format", "%s")
        try:
            self.limit = int(params.get("expansion_limit", "0") or 0)
        except ValueError:
            raise TableError(f"{spec}: bad expansion_limit") from None
        self.domains = [d.lower() for d in params.get("domain", "").replace(",", " ").split()]
        self._domain_tables: dict[str, Table] = {}
        self.config = config
        try:
            self.db = sqlite3.connect(f"file:{self.dbpath}?mode=ro", uri=True,
                                      check_same_thread=False)
        except sqlite3.Error as e:
            raise TableError(f"open database {self.dbpath}: {e}") from None

    def _domain_ok(self, key: str) -> bool:
        user, domain = _key_parts(key)
        if domain is None or not user or not domain:
            return False
        for entry in self.domains:
            if ":" in entry and not entry.startswith("/"):
                from . import get_table
                if get_table(entry, self.config).lookup(domain) is not None:
                    return True
            elif entry.startswith("/"):
                try:
                    words = read_source(entry, entry).lower().split()
                except TableError:
                    continue
                if domain in words:
                    return True
            elif entry == domain:
                return True
        return False

    def _lookup(self, key: str):
        if self.domains and not self._domain_ok(key):
            return None
        try:
            sql = _expand(self.query, key, None, sql=True)
        except _Suppress:
            return None
        try:
            rows = self.db.execute(sql).fetchall()
        except sqlite3.Error as e:
            raise TableLookupError(f"{self.spec}: query failed: {e}") from None
        results = []
        for row in rows:
            if not row or row[0] is None or row[0] == "":
                continue
            try:
                results.append(_expand(self.result_format, key, str(row[0]), sql=False))
            except _Suppress:
                continue
            if self.limit and len(results) > self.limit:
                raise TableLookupError(f"{self.spec}: Expansion limit exceeded for key: '{key}'")
        return ",".join(results) if results else None

    def close(self):
        self.db.close()
