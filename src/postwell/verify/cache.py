"""The address verification cache (Postfix's verify(8) records and rules).

Each address maps to ``status:probed:updated:text``: the recipient status (0 OK,
1 DEFER, 2 BOUNCE, 3 TODO), the time an outstanding probe was sent (0: none), the
time of the last result (0: none yet) and the reason text.  Stored in
address_verify_map (btree/hash: Berkeley DB as Postfix's; lmdb; an empty value keeps
the cache in memory, as Postfix's ``internal:verify``).
"""

from __future__ import annotations

import errno
import os
import time

from . import IN_PROGRESS, STATUS_BOUNCE, STATUS_DEFER, STATUS_OK, STATUS_TODO

# Postfix's PROBE_TTL: an outstanding probe older than this counts as lost.
PROBE_TTL = 1000
_STATUSES = (STATUS_OK, STATUS_DEFER, STATUS_BOUNCE, STATUS_TODO)


class CacheOpenError(Exception):
    pass


class MemoryStore:
    def __init__(self) -> None:
        self.data: dict[str, str] = {}

    def get(self, key: str) -> str | None:
        return self.data.get(key)

    def put(self, key: str, value: str) -> None:
        self.data[key] = value

    def delete(self, key: str) -> None:
        self.data.pop(key, None)

    def keys(self) -> list[str]:
        return list(self.data)

    def close(self) -> None:
        pass


def _exclusive_lock(path: str, wait: float = 10.0) -> int:
    import fcntl
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                raise CacheOpenError(f"open database {path}: locked by another process") from None
            time.sleep(0.05)


class BdbStore:
    """A Berkeley DB file written as Postfix's dict_db writes it: keys and values
    with their terminating null byte, each update synced (DICT_FLAG_SYNC_UPDATE)."""

    def __init__(self, path: str, kind: str) -> None:
        from berkeleydb import db
        self._db = db
        self.path = path
        h = db.DB()
        try:
            h.open(path, None, db.DB_BTREE if kind == "btree" else db.DB_HASH, db.DB_CREATE)
        except db.DBError as exc:
            code = exc.args[0] if exc.args and isinstance(exc.args[0], int) else errno.EIO
            raise CacheOpenError(f"open database {path}: "
                                 f"{os.strerror(code) if code > 0 else exc}") from None
        self.h = h
        # One writer at a time (Postfix's DICT_FLAG_OPEN_LOCK): after a reload the
        # old verify process may still be closing the file.
        try:
            self._lock_fd = _exclusive_lock(path)
        except CacheOpenError:
            h.close()
            raise

    def get(self, key: str) -> str | None:
        k = key.encode("utf-8", "surrogateescape")
        v = self.h.get(k + b"\0")
        if v is None:
            v = self.h.get(k)
        if v is None:
            return None
        return v.rstrip(b"\0").decode("utf-8", "surrogateescape")

    def put(self, key: str, value: str) -> None:
        self.h.put(key.encode("utf-8", "surrogateescape") + b"\0",
                   value.encode("utf-8", "surrogateescape") + b"\0")
        self.h.sync()

    def delete(self, key: str) -> None:
        k = key.encode("utf-8", "surrogateescape")
        for variant in (k + b"\0", k):
            try:
                self.h.delete(variant)
            except self._db.DBNotFoundError:
                pass
        self.h.sync()

    def keys(self) -> list[str]:
        out = []
        cur = self.h.cursor()
        try:
            rec = cur.first()
            while rec is not None:
                out.append(rec[0].rstrip(b"\0").decode("utf-8", "surrogateescape"))
                rec = cur.next()
        finally:
            cur.close()
        return out

    def close(self) -> None:
        if self.h is not None:
            try:
                self.h.sync()
            finally:
                self.h.close()
                self.h = None
                os.close(self._lock_fd)


class LmdbStore:
    def __init__(self, path: str) -> None:
        import lmdb
        try:
            self.env = lmdb.open(path, subdir=False, lock=True, map_size=16 << 20)
        except lmdb.Error as exc:
            raise CacheOpenError(f"open database {path}: {exc}") from None

    def get(self, key: str) -> str | None:
        with self.env.begin() as txn:
            v = txn.get(key.encode("utf-8", "surrogateescape") + b"\0")
        return None if v is None else v.rstrip(b"\0").decode("utf-8", "surrogateescape")

    def put(self, key: str, value: str) -> None:
        with self.env.begin(write=True) as txn:
            txn.put(key.encode("utf-8", "surrogateescape") + b"\0",
                    value.encode("utf-8", "surrogateescape") + b"\0")

    def delete(self, key: str) -> None:
        with self.env.begin(write=True) as txn:
            txn.delete(key.encode("utf-8", "surrogateescape") + b"\0")

    def keys(self) -> list[str]:
        with self.env.begin() as txn:
            return [k.rstrip(b"\0").decode("utf-8", "surrogateescape") for k, _ in txn.cursor()]

    def close(self) -> None:
        self.env.close()


def open_store(spec: str):
    """address_verify_map -> a store; empty: memory.  Raises CacheOpenError."""
    spec = (spec or "").strip()
    if not spec:
        return MemoryStore()
    while spec.startswith("proxy:"):
        spec = spec[len("proxy:"):]
    typ, sep, name = spec.partition(":")
    typ = typ.lower()
    if not sep or not name:
        raise CacheOpenError(f'open dictionary: expecting "type:name" form instead of "{spec}"')
    if typ in ("btree", "hash"):
        return BdbStore(name + ".db", typ)
    if typ == "lmdb":
        return LmdbStore(name + ".lmdb")
    if typ == "internal":
        return MemoryStore()
    raise CacheOpenError(f"unsupported dictionary type for address_verify_map: {typ}")


def make_entry(status: int, probed: int, updated: int, text: str) -> str:
    return f"{status}:{probed}:{updated}:{text}"


def parse_entry(raw: str) -> tuple[int, int, int, str] | None:
    parts = raw.split(":", 3)
    if len(parts) != 4 or not all(p.isdigit() for p in parts[:3]):
        return None
    status, probed, updated = int(parts[0]), int(parts[1]), int(parts[2])
    # Records with both time stamps zero are never written: something is broken.
    if status not in _STATUSES or not (probed or updated):
        return None
    return status, probed, updated, parts[3]


class VerifyCache:
    """Postfix verify(8)'s query/update rules over a store.  ``clock`` gives
    seconds (tests inject one)."""

    def __init__(self, store, *, positive_expire: float = 31 * 86400,
                 positive_refresh: float = 7 * 86400, negative_expire: float = 3 * 86400,
                 negative_refresh: float = 3 * 3600, negative_cache: bool = True,
                 clock=time.time, log=None) -> None:
        self.store = store
        self.pos_exp, self.pos_try = positive_expire, positive_refresh
        self.neg_exp, self.neg_try = negative_expire, negative_refresh
        self.negative_cache = negative_cache
        self.clock = clock
        self.log = log

    @classmethod
    def from_config(cls, config, store, *, clock=time.time, log=None) -> "VerifyCache":
        def t(name, fallback):
            try:
                return config.get_time(name)
            except Exception:   # noqa: BLE001 - a bad value: Postfix's default
                return fallback
        try:
            neg = config.get_bool("address_verify_negative_cache")
        except Exception:   # noqa: BLE001
            neg = True
        return cls(store, positive_expire=t("address_verify_positive_expire_time", 31 * 86400),
                   positive_refresh=t("address_verify_positive_refresh_time", 7 * 86400),
                   negative_expire=t("address_verify_negative_expire_time", 3 * 86400),
                   negative_refresh=t("address_verify_negative_refresh_time", 3 * 3600),
                   negative_cache=neg, clock=clock, log=log)

    @staticmethod
    def key(address: str) -> str:
        # Postfix neuters ':' (IPv6 address literals) in the key.
        return address.replace(":", "_")

    def _expired(self, status: int, updated: int, now: int) -> bool:
        if status == STATUS_OK:
            return updated + self.pos_exp < now
        return updated + self.neg_exp < now

    def _refresh_needed(self, status: int, updated: int, now: int) -> bool:
        if status == STATUS_OK:
            return updated + self.pos_try < now
        return updated + self.neg_try < now

    def _read(self, key: str) -> tuple[str | None, tuple | None]:
        raw = self.store.get(key)
        if raw is None:
            return None, None
        entry = parse_entry(raw)
        if entry is None and self.log is not None:
            self.log.warning(f"bad address verify table entry: {raw[:100]}")
        return raw, entry

    def query(self, address: str, may_probe: bool = True) -> tuple[int, str, bool]:
        """(status, text, probe): what to answer and whether to send a probe now.
        When a probe is due, the record notes it (so one probe goes out per
        PROBE_TTL however many clients ask); ``may_probe=False``: the caller
        cannot send one now, so nothing is noted."""
        now = int(self.clock())
        key = self.key(address)
        raw, entry = self._read(key)
        if entry is not None:
            status, probed, updated, text = entry
        if entry is None or (now - probed > PROBE_TTL and self._expired(status, updated, now)):
            status, probed, updated, text = STATUS_TODO, 0, 0, IN_PROGRESS
            if raw is not None and not self.negative_cache:
                self.store.delete(key)
        probe = may_probe and now - probed > PROBE_TTL and self._refresh_needed(status, updated, now)
        if probe and (updated or self.negative_cache):
            self.store.put(key, make_entry(status, now, updated, text))
        return status, text, probe

    def update(self, address: str, status: int, text: str) -> None:
        """A probe's result.  A failure never replaces a cached success before it
        expires (the address is probed again on the next query)."""
        key = self.key(address)
        if status != STATUS_OK and not self.negative_cache:
            return      # address_verify_negative_cache = no (verify_append)
        if status != STATUS_OK:
            _, entry = self._read(key)
            if entry is not None and entry[0] == STATUS_OK:
                return
        self.store.put(key, make_entry(status, 0, int(self.clock()), text))

    def cleanup(self) -> tuple[int, int]:
        """Drop expired records without a probe in flight: (retained, dropped)."""
        now = int(self.clock())
        kept = dropped = 0
        for key in self.store.keys():
            raw, entry = self._read(key)
            if raw is None:
                continue
            if entry is not None and (now - entry[1] < PROBE_TTL
                                      or not self._expired(entry[0], entry[2], now)):
                kept += 1
            else:
                self.store.delete(key)
                dropped += 1
        return kept, dropped

    def close(self) -> None:
        self.store.close()
