"""hash: and btree: tables in Berkeley DB format (Debian Postfix's own),
through the berkeleydb package, so postwell and /usr/sbin/postmap read each
other's files."""

from __future__ import annotations

import errno
import os

from .base import TableError
from .index import IndexedTable

try:
    from berkeleydb import db as _db
except ImportError:  # pragma: no cover - the dependency is declared
    _db = None


def _err(path: str, e: Exception) -> TableError:
    code = e.args[0] if e.args and isinstance(e.args[0], int) else None
    if code is not None and code > 0:
        text = os.strerror(code)
    elif isinstance(e, getattr(_db, "DBInvalidArgError", ())) or code == -30969:
        text = os.strerror(errno.EINVAL)
    else:
        text = str(e.args[1]) if len(e.args) > 1 else str(e)
    return TableError(f"open database {path}: {text}")


class BdbStore:
    suffix = ".db"
    dbtype = "hash"
    # Berkeley DB meta page magic at offset 12, either byte order
    MAGIC = ((0x061561).to_bytes(4, "little"), (0x061561).to_bytes(4, "big"))

    def __init__(self, handle, path):
        self.h = handle
        self.path = path

    @classmethod
    def _kind(cls):
        return _db.DB_HASH if cls.dbtype == "hash" else _db.DB_BTREE

    @classmethod
    def open_read(cls, path: str):
        if _db is None:
            raise TableError("unsupported dictionary type: " + cls.dbtype)
        if not os.path.exists(path):
            # check first: libdb prints its own noise for a missing file
            raise TableError(f"open database {path}: {os.strerror(errno.ENOENT)}")
        # Check the meta page magic ourselves: libdb prints to stderr when
        # asked to open a btree file as hash or vice versa.
        try:
            with open(path, "rb") as f:
                head = f.read(16)
        except OSError as e:
            raise TableError(f"open database {path}: {e.strerror}") from None
        if len(head) < 16 or head[12:16] not in cls.MAGIC:
            raise TableError(f"open database {path}: {os.strerror(errno.EINVAL)}")
        h = _db.DB()
        try:
            h.open(path, None, cls._kind(), _db.DB_RDONLY)
        except _db.DBError as e:
            try:
                h.close()
            except Exception:
                pass
            raise _err(path, e) from None
        return cls(h, path)

    @classmethod
    def open_write(cls, path: str):
        h = _db.DB()
        try:
            h.open(path, None, cls._kind(), _db.DB_CREATE | _db.DB_EXCL)
        except _db.DBError as e:
            raise _err(path, e) from None
        return cls(h, path)

    def get(self, key: bytes):
        return self.h.get(key)

    def put(self, key: bytes, value: bytes):
        self.h.put(key, value)

    def delete(self, key: bytes) -> bool:
        try:
            self.h.delete(key)
            return True
        except _db.DBNotFoundError:
            return False

    def items(self):
        cur = self.h.cursor()
        try:
            rec = cur.first()
            while rec is not None:
                yield rec
                rec = cur.next()
        finally:
            cur.close()

    def close(self):
        if self.h is not None:
            try:
                self.h.sync()
            except Exception:
                pass
            self.h.close()
            self.h = None


class BtreeStore(BdbStore):
    dbtype = "btree"
    MAGIC = ((0x053162).to_bytes(4, "little"), (0x053162).to_bytes(4, "big"))


class HashTable(IndexedTable):
    type = "hash"
    store_class = BdbStore


class BtreeTable(IndexedTable):
    type = "btree"
    store_class = BtreeStore
