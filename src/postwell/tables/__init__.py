"""postwell.tables - Postfix lookup tables.

Public API (docs/architecture.md):

    open_table(spec, config=None, warn=None) -> Table   # a new, private instance
    get_table(spec, config=None, warn=None, surrogate=False) -> Table
                                        # shared per process, re-opened when the
                                        # file under it changes; surrogate=True:
                                        # never raises, see SurrogateTable
    Table.lookup(key) -> str | None; Table.items(); Table.close()
    TableError                                          # open/lookup failure, Postfix wording
    TableLookupError(TableError)                        # lookup failed: a temporary error
    parse_aliases(text) / newaliases_build(config)      # aliases(5)

Supported types: hash btree lmdb texthash inline static regexp pcre cidr
unix (passwd.byname, group.byname) sqlite fail environ unionmap pipemap
randmap, and the proxy: prefix
(stripped: postwell has no proxymap; the table is opened in-process).
``warn`` receives warning texts (bad table lines, stale index) without the
"warning: " prefix; default: dropped.
"""

from __future__ import annotations

import importlib
import threading

from .base import Table, TableError, TableLookupError, fold_key, utf8_from_config  # noqa: F401

# type -> "module:Class"; modules load on first use so a missing optional
# package (lmdb, berkeleydb) only breaks the type that needs it.
_TYPES = {
    "inline": "simple:InlineTable",
    "static": "simple:StaticTable",
    "fail": "simple:FailTable",
    "environ": "simple:EnvironTable",
    "texthash": "text:TexthashTable",
    "cidr": "cidr:CidrTable",
    "regexp": "regexp:RegexpTable",
    "pcre": "regexp:PcreTable",
    "hash": "dbfile:HashTable",
    "btree": "dbfile:BtreeTable",
    "lmdb": "lmdbfile:LmdbTable",
    "unix": "unix:UnixTable",
    "sqlite": "sqlite:SqliteTable",
    "unionmap": "composite:UnionTable",
    "pipemap": "composite:PipeTable",
    "randmap": "composite:RandTable",
}

# types whose constructor takes warn=
_WANTS_WARN = {"texthash", "cidr", "regexp", "pcre", "hash", "btree", "lmdb", "unionmap", "pipemap"}
# types that need the config (default_database_type etc.)
_WANTS_CONFIG = {"hash", "btree", "lmdb", "sqlite", "unionmap", "pipemap"}


def table_types() -> list[str]:
    """What `postconf -m` would list for postwell."""
    return sorted(_TYPES)


def split_spec(spec: str) -> tuple[str, str]:
    """'type:name' -> (type, name); proxy: prefixes are removed."""
    spec = spec.strip()
    while spec.startswith("proxy:"):
        spec = spec[len("proxy:"):]
    typ, sep, name = spec.partition(":")
    if not sep or not typ or not name or "{" in typ or "/" in typ:
        raise TableError(f'open dictionary: expecting "type:name" form instead of "{spec}"')
    return typ.lower(), name


def _class_for(typ: str, spec: str):
    target = _TYPES.get(typ)
    if target is None:
        raise TableError(f"unsupported dictionary type: {typ}")
    modname, clsname = target.split(":")
    try:
        mod = importlib.import_module(f"{__name__}.{modname}")
    except ImportError as e:
        raise TableError(f"unsupported dictionary type: {typ} ({e})") from None
    return getattr(mod, clsname)


def open_table(spec: str, config=None, warn=None, fold: bool = True,
               rhs_is_file: bool = False) -> Table:
    """Open a table. Raises TableError with Postfix's wording on failure.
    ``fold=False`` is postmap -f: no key folding, also while a texthash
    source is loaded; ``rhs_is_file`` is postmap -F (a texthash source's
    values name files whose contents are the values)."""
    typ, name = split_spec(spec)
    cls = _class_for(typ, spec)
    kwargs = {}
    if typ in _WANTS_WARN:
        kwargs["warn"] = warn
    if typ in _WANTS_CONFIG:
        kwargs["config"] = config
    # utf8 must be known while the constructor folds keys (texthash, inline)
    table = cls.__new__(cls)
    table.utf8 = utf8_from_config(config)
    if not fold:
        table.fold = False
    if rhs_is_file:
        table.rhs_is_file = True
    table.__init__(f"{typ}:{name}", name, **kwargs)
    if warn is not None:
        table.warn = warn
    return table


class SurrogateTable(Table):
    """Stands in for a table that failed to open, as Postfix's surrogate
    dictionary does: every lookup is an error (a temporary failure for the
    caller), and the open error was logged once as
    "TYPE:NAME is unavailable. REASON". get_table() retries the real open
    when the file under it changes (it appears, or is rebuilt)."""

    fold = False

    def __init__(self, spec: str, name: str, reason: str, watch: str | None):
        super().__init__(spec, name)
        self.reason = reason
        from .base import FileStamp
        self.stamp = FileStamp(watch) if watch else None

    def _lookup(self, key):
        raise TableLookupError(f'{self.spec} lookup error for "{key}"')

    def changed(self):
        return self.stamp.changed() if self.stamp else False


_SUFFIX = {"hash": ".db", "btree": ".db", "lmdb": ".lmdb"}


def _watch_path(typ: str, name: str) -> str | None:
    if typ in _SUFFIX:
        return name + _SUFFIX[typ]
    if name.startswith("/") and typ in ("texthash", "cidr", "regexp", "pcre"):
        return name
    return None


_cache: dict[str, Table] = {}
_cache_lock = threading.Lock()


def get_table(spec: str, config=None, warn=None, surrogate: bool = False) -> Table:
    """A per-process shared table: open once, re-open when the file changed.

    Postfix daemons exit when a table they use changes on disk and the
    master starts fresh ones; postwell's long-lived workers re-open instead.
    The check is a stat() per call, which is cheap next to a lookup.

    surrogate=True: a table that cannot be opened does not raise; ``warn``
    gets "TYPE:NAME is unavailable. REASON" and the returned SurrogateTable
    fails every lookup with TableLookupError (smtpd answers 451 4.3.0), as
    Postfix daemons behave.
    """
    # keyed by spec alone: per-service config copies (master.cf -o) must
    # share one open table, and a table's contents do not depend on config
    key = spec.strip()
    # The common case without the lock (a dict read is atomic): a thread
    # re-reading a big changed texthash or regexp file under the lock must
    # not hold up every other thread's lookups in other tables meanwhile.
    table = _cache.get(key)
    if table is not None and (table.reopens_itself or not table.changed()):
        return table
    with _cache_lock:
        # Another thread may have opened or re-opened it while we waited.
        table = _cache.get(key)
        if table is not None and (table.reopens_itself or not table.changed()):
            return table
        try:
            new = open_table(spec, config, warn)
        except TableError as e:
            if not surrogate:
                raise
            typ, name = split_spec(spec)
            if warn is not None:
                warn(f"{typ}:{name} is unavailable. {e}")
            new = SurrogateTable(f"{typ}:{name}", name, str(e), _watch_path(typ, name))
        # the replaced table is not closed: a caller may still hold it; it is
        # released when the last reference goes
        _cache[key] = new
        return new


def clear_cache() -> None:
    """Close every shared table (on reload, or between tests)."""
    with _cache_lock:
        for t in _cache.values():
            try:
                t.close()
            except Exception:
                pass
        _cache.clear()


def parse_aliases(text: str, warn=None, path: str = "aliases"):
    from .aliases import parse_aliases as _p
    return _p(text, warn=warn, path=path)


def newaliases_build(config, warn=None) -> int:
    from .aliases import newaliases_build as _n
    return _n(config, warn=warn)
