"""Indexed tables (hash:, btree:, lmdb:) share one shape: a source file
"name" compiled by postmap into "name.db" / "name.lmdb". This module holds
what the formats have in common: Postfix's key conventions, the stale-index
warning, change detection and the atomic builder used by postmap/postalias.

Key conventions (checked against Debian's postmap 3.7): keys and values are
stored with a trailing NUL; keys are lower-cased at build time unless
postmap -f. Lookups try "key\\0" first, then "key" (tables written by other
programs), like Postfix's DICT_FLAG_TRY1NULL|TRY0NULL.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
import threading
import time

from .base import FileStamp, Table, TableError, TableLookupError

ENC = "utf-8"
ERRS = "surrogateescape"

# Postfix skips the "older than source" warning when the source changed in
# the last 100 seconds: an admin may be editing it right now.
STALE_GRACE = 100


def to_bytes(s: str) -> bytes:
    return s.encode(ENC, ERRS)


def to_str(b: bytes) -> str:
    return b.decode(ENC, ERRS)


class Store:
    """Backend interface; see dbfile.BdbStore and lmdbfile.LmdbStore."""

    suffix = ".db"

    def get(self, key: bytes) -> bytes | None: ...
    def items(self): ...
    def close(self) -> None: ...


class IndexedTable(Table):
    """A table read from name+suffix through a Store.

    One table object is shared by every thread of a process (get_table()),
    and local(8)'s helper looks up aliases on many threads at once.  A
    Berkeley DB handle opened without DB_THREAD hands every get() the same
    result buffer, so two concurrent lookups could return each other's
    values, or a mix of both (one alias delivered by another's expansion);
    the shared flock and the re-open after a postmap are per table as well.
    ``_use`` serialises every use of the store: a lookup is microseconds."""

    store_class: type = None  # set by subclasses
    reopens_itself = True

    def __init__(self, spec: str, name: str, warn=None, config=None, now=None):
        super().__init__(spec, name)
        self.path = name + self.store_class.suffix
        self.warn = warn
        self.store = None
        self._lock_fd = None
        self._use = threading.Lock()
        self._open_store()
        if warn is not None:
            self.check_stale(now)

    def _open_store(self) -> None:
        """Open under a shared flock: Debian's postmap holds an exclusive
        flock on the index while it rewrites it in place, and Postfix's
        readers take a shared one, so we never read a half-written file."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise TableError(f"open database {self.path}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            try:
                self.stamp = FileStamp(self.path)
                self.store = self.store_class.open_read(self.path)
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        except BaseException:
            os.close(fd)
            raise
        self._lock_fd = fd
        self._pid = os.getpid()
        # sticky choice between "key\0" and "key", as Postfix learns it
        self._nul_mode: bool | None = None

    def _reopen_if_changed(self) -> None:
        """Called with the shared lock held: a postmap that rewrote the
        file in place (same inode) leaves our handle's cache stale."""
        if self.stamp.changed():
            self._close_store()
            try:
                self._open_store()
            except TableError as e:
                raise TableLookupError(str(e)) from None
            fcntl.flock(self._lock_fd, fcntl.LOCK_SH)

    def _close_store(self) -> None:
        if self.store is not None:
            self.store.close()
            self.store = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def lookup(self, key: str):
        with self._use:
            return self._lookup_serialised(key)

    def _lookup_serialised(self, key: str):
        if self.store is not None and self._pid != os.getpid():
            # opened before a fork: the flock would be shared with the parent
            # (same open file description) and LMDB handles must not cross fork
            self.store = None
            try:
                os.close(self._lock_fd)  # the child's copy only
            except OSError:
                pass
            self._lock_fd = None
        if self.store is None:
            # closed, or a re-open failed (index deleted): try again, so the
            # table recovers once postmap has put a file back
            try:
                self._open_store()
            except TableError as e:
                raise TableLookupError(str(e)) from None
        fcntl.flock(self._lock_fd, fcntl.LOCK_SH)
        try:
            self._reopen_if_changed()
            return super().lookup(key)
        finally:
            if self._lock_fd is not None:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def check_stale(self, now=None) -> str | None:
        """Postfix's "database X is older than source file Y" warning text."""
        try:
            src = os.stat(self.name).st_mtime
            idx = os.stat(self.path).st_mtime
        except OSError:
            return None
        now = time.time() if now is None else now
        if src > idx and src < now - STALE_GRACE:
            msg = f"database {self.path} is older than source file {self.name}"
            if self.warn:
                self.warn(msg)
            return msg
        return None

    def _lookup(self, key: str):
        k = to_bytes(key)
        if self._nul_mode is not False:
            v = self._get(k + b"\0")
            if v is not None:
                self._nul_mode = True
                return to_str(v[:-1] if v.endswith(b"\0") else v)
        if self._nul_mode is not True:
            v = self._get(k)
            if v is not None:
                self._nul_mode = False
                return to_str(v[:-1] if v.endswith(b"\0") else v)
        return None

    def _get(self, k: bytes):
        try:
            return self.store.get(k)
        except TableError:
            raise
        except Exception as e:  # backend error: a temporary lookup failure
            raise TableLookupError(f"error reading {self.path}: {e}") from None

    def items(self):
        # read whole under the locks: a generator holding them across yields
        # would block every other thread's lookups while its caller works
        with self._use:
            fcntl.flock(self._lock_fd, fcntl.LOCK_SH)
            try:
                self._reopen_if_changed()
                pairs = list(self.store.items())
            finally:
                if self._lock_fd is not None:
                    fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
        for k, v in pairs:
            if k.endswith(b"\0"):
                k = k[:-1]
            if v.endswith(b"\0"):
                v = v[:-1]
            yield to_str(k), to_str(v)

    def changed(self) -> bool:
        return self.stamp.changed()

    def close(self):
        with self._use:
            self._close_store()

    def __del__(self):
        try:
            self._close_store()
        except Exception:
            pass


class Builder:
    """Atomic (re)build of name+suffix: write a temporary file in the same
    directory, fsync it, rename it over the old index, fsync the directory.
    A daemon that opens the table meanwhile sees the old or the new index,
    never half of one.

    ``dup``: what to do with a key already present - "warn" keeps the first
    entry (postmap's default), "replace" keeps the last (postmap -r),
    "ignore" keeps the first quietly (postmap -w). ``nul``: store keys and
    values with the trailing NUL (postmap -N, the Linux default) or not (-n).
    """

    def __init__(self, store_class, name: str, src_stat=None, copy_existing=False,
                 warn=None, dup="warn", label=None, nul=True, as_owner=True):
        self.store_class = store_class
        self.name = name
        self.path = name + store_class.suffix
        self.warn = warn
        self.dup = dup
        self.label = label or self.path
        self.nul = nul
        self.as_owner = as_owner  # False: postmap -o (keep root as the owner)
        d = os.path.dirname(self.path) or "."
        base = os.path.basename(self.path)
        try:
            fd, self.tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=".tmp", dir=d)
        except OSError as e:
            raise TableError(f"open database {self.path}: {e.strerror}") from None
        os.close(fd)
        os.unlink(self.tmp)  # the backend creates the file itself
        self.src_stat = src_stat
        self.writer = store_class.open_write(self.tmp)
        if copy_existing:
            old = store_class.open_read(self.path)
            try:
                for k, v in old.items():
                    self.writer.put(k, v)
            finally:
                old.close()

    def _k(self, key: str) -> bytes:
        k = to_bytes(key)
        return k + b"\0" if self.nul else k

    def _v(self, value: str) -> bytes:
        v = to_bytes(value)
        return v + b"\0" if self.nul else v

    def put(self, key: str, value: str, where=None) -> bool:
        """Store one entry; False when an existing key was kept."""
        k = self._k(key)
        if self.writer.get(k) is not None:
            if self.dup == "replace":
                self.writer.put(k, self._v(value))
                return True
            if self.dup == "warn" and self.warn:
                self.warn(f'{where or self.label}: duplicate entry: "{key}"')
            return False
        self.writer.put(k, self._v(value))
        return True

    def delete(self, key: str) -> bool:
        return self.writer.delete(self._k(key))

    def commit(self) -> None:
        self.writer.close()
        try:
            if self.src_stat is None:
                os.chmod(self.tmp, 0o644)  # postmap -p, or no source file
            else:
                os.chmod(self.tmp, self.src_stat.st_mode & 0o666)
                if os.geteuid() == 0 and self.as_owner:
                    # postmap run by root creates the index as the source's owner
                    os.chown(self.tmp, self.src_stat.st_uid, self.src_stat.st_gid)
            fd = os.open(self.tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(self.tmp, self.path)
            dfd = os.open(os.path.dirname(self.path) or ".", os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as e:
            self.abort()
            raise TableError(f"open database {self.path}: {e.strerror}") from None

    def abort(self) -> None:
        try:
            self.writer.close()
        except Exception:
            pass
        try:
            os.unlink(self.tmp)
        except OSError:
            pass
