"""lmdb: tables, file format of Postfix's postfix-lmdb plugin: one file
"name.lmdb" (MDB_NOSUBDIR), no lock file (Postfix locks with fcntl itself),
keys and values with a trailing NUL like hash:."""

from __future__ import annotations

import errno
import os

from .base import TableError, TableLookupError
from .index import IndexedTable

try:
    import lmdb as _lmdb
except ImportError:  # pragma: no cover
    _lmdb = None

# Postfix's lmdb_map_size default; the builder grows it when the map fills.
DEFAULT_MAP_SIZE = 10485760


class LmdbStore:
    suffix = ".lmdb"

    # writes are committed in batches; on MDB_MAP_FULL the open batch is
    # replayed after the map grows (Postfix grows lmdb maps the same way)
    BATCH = 1000

    def __init__(self, env, path, writable=False):
        self.env = env
        self.path = path
        self.writable = writable
        self.txn = env.begin(write=True) if writable else None
        self.pending: list[tuple] = []

    @classmethod
    def open_read(cls, path: str):
        if _lmdb is None:
            raise TableError("unsupported dictionary type: lmdb")
        if not os.path.exists(path):
            raise TableError(f"open database {path}: {os.strerror(errno.ENOENT)}")
        try:
            env = _lmdb.open(path, subdir=False, readonly=True, lock=False,
                             max_dbs=0, map_size=DEFAULT_MAP_SIZE)
        except _lmdb.Error as e:
            raise TableError(f"open database {path}: {e}") from None
        return cls(env, path)

    @classmethod
    def open_write(cls, path: str, map_size=DEFAULT_MAP_SIZE):
        env = _lmdb.open(path, subdir=False, lock=False, map_size=map_size,
                         max_dbs=0, sync=True, metasync=True)
        return cls(env, path, writable=True)

    def _apply(self, op):
        if op[0] == "put":
            self.txn.put(op[1], op[2])
            return True
        return self.txn.delete(op[1])

    def _do(self, op):
        while True:
            try:
                result = self._apply(op)
                break
            except _lmdb.MapFullError:
                self.txn.abort()
                self.env.set_mapsize(self.env.info()["map_size"] * 2)
                self.txn = self.env.begin(write=True)
                for old in self.pending:
                    self._apply(old)
        self.pending.append(op)
        if len(self.pending) >= self.BATCH:
            self.txn.commit()
            self.txn = self.env.begin(write=True)
            self.pending = []
        return result

    def get(self, key: bytes):
        if self.writable:
            return self.txn.get(key)
        # a short read transaction per lookup: with lock=False a long-lived
        # snapshot could see pages that an in-place writer reuses
        try:
            with self.env.begin() as txn:
                return txn.get(key)
        except _lmdb.Error as e:
            raise TableLookupError(f"error reading {self.path}: {e}") from None

    def put(self, key: bytes, value: bytes):
        self._do(("put", key, value))

    def delete(self, key: bytes) -> bool:
        return self._do(("del", key))

    def items(self):
        if self.writable:
            txn, own = self.txn, False
        else:
            txn, own = self.env.begin(), True
        try:
            with txn.cursor() as cur:
                for k, v in cur:
                    yield bytes(k), bytes(v)
        finally:
            if own:
                txn.abort()

    def close(self):
        if self.env is None:
            return
        try:
            if self.writable:
                self.txn.commit()
                self.env.sync(True)
        finally:
            self.env.close()
            self.env = None


class LmdbTable(IndexedTable):
    type = "lmdb"
    store_class = LmdbStore
