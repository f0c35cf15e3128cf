"""Indexed tables shared by many threads of one process.

get_table() hands every thread the same table object, and local(8)'s root
helper expands aliases on a thread per delivery.  A Berkeley DB handle opened
without DB_THREAD returns every get() in one shared buffer: two concurrent
lookups got each other's values or a mix of both, and one alias was delivered
by another's expansion (seen in CI as `to=<"|exit 75"@example.test>,
orig_to=<clater@...>`).  IndexedTable serialises the use of its store."""

from __future__ import annotations

import os
import subprocess
import threading

import pytest

from postwell.tables import clear_cache, get_table

from test_tables import _build

POSTALIAS = "/usr/sbin/postalias"

# values of many lengths: a shorter value read into a longer one's buffer shows
VALUES = {f"key{i}": f'"|echo value {i} ' + "x" * (i % 41) + '"' for i in range(160)}
THREADS, LOOKUPS = 8, 1500


def _hammer(table, keys) -> list:
    wrong, errors = [], []

    def run(seed):
        try:
            for n in range(LOOKUPS):
                k = keys[(seed * 7 + n * 13) % len(keys)]
                v = table.lookup(k)
                if v != VALUES[k]:
                    wrong.append((k, v))
                    return
        except Exception as exc:   # pragma: no cover - reported below
            errors.append(repr(exc))
    threads = [threading.Thread(target=run, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors
    return wrong


@pytest.mark.parametrize("typ", ["hash", "btree", "lmdb"])
def test_concurrent_lookups_get_their_own_values(tmp_path, typ):
    src = tmp_path / "map"
    _build(typ, src, "".join(f"{k} {v}\n" for k, v in VALUES.items()))
    clear_cache()
    try:
        table = get_table(f"{typ}:{src}")
        assert _hammer(table, list(VALUES)) == []
    finally:
        clear_cache()


@pytest.mark.skipif(not os.access(POSTALIAS, os.X_OK), reason="Debian postfix not installed")
def test_concurrent_alias_lookups_in_a_postalias_database(tmp_path):
    """The CI case: a hash: alias database written by the real postalias."""
    src = tmp_path / "aliases"
    src.write_text("".join(f"{k}: {v}\n" for k, v in VALUES.items()))
    subprocess.run([POSTALIAS, str(src)], check=True, capture_output=True, timeout=30)
    clear_cache()
    try:
        table = get_table(f"hash:{src}")
        assert _hammer(table, list(VALUES)) == []
    finally:
        clear_cache()


def test_items_while_other_threads_look_up(tmp_path):
    """items() reads the whole table under the lock and then yields: a caller
    pausing between items does not hold up lookups on other threads."""
    src = tmp_path / "map"
    _build("hash", src, "".join(f"{k} {v}\n" for k, v in VALUES.items()))
    clear_cache()
    try:
        table = get_table(f"hash:{src}")
        it = table.items()
        first = next(it)
        assert first[0] in VALUES
        done = threading.Event()
        t = threading.Thread(target=lambda: (table.lookup("key3"), done.set()))
        t.start()
        assert done.wait(10), "a lookup waited for an unfinished items() iteration"
        assert dict([first, *it]) == {k.lower(): v for k, v in VALUES.items()}
    finally:
        clear_cache()
