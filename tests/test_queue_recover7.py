"""One fsync per committed queue file (issue 8): the complete marker is set after
the data fsync and not fsync'd itself; QueueStore.recover_unmarked puts back a
marker a crash took, and only on a file whose header and body CRC check out
(queue/format.py, "Completeness and durability")."""

from __future__ import annotations

import os
import stat

import pytest

from postwell.queue import QueueStore
from postwell.queue import format as qf
from postwell.queue.store import COMPLETE_MODE, INCOMPLETE_MODE

from test_qmgr_perf import make_env, queue
from test_queue_hotpath import Agent, _run


def _committed(store, body=b"Subject: x\n\nbody\n", rcpts=("a@x.test",)):
    m = store.create()
    m.set_sender("s@x.test")
    for r in rcpts:
        m.add_recipient(r)
    m.write(body)
    m.commit()
    return m.queue_id


def _lose_marker(store, qid):
    os.chmod(store.path("incoming", qid), INCOMPLETE_MODE)


@pytest.fixture
def store(tmp_path):
    s = QueueStore(str(tmp_path / "q"))
    s.ensure_layout()
    return s


def test_header_carries_the_crc_of_everything_after_it(store):
    qid = _committed(store, body=b"Subject: crc\n\n" + b"x" * 100_000 + b"\n")
    data = open(store.path("incoming", qid), "rb").read()
    import zlib
    assert qf.header_body_crc(data[:64]) == zlib.crc32(data[64:])


@pytest.mark.parametrize("size", [10, 70_000, 300_000])
def test_a_lost_marker_is_put_back_and_the_message_reads_whole(store, size):
    body = b"Subject: big\n\n" + b"y" * size + b"\n"
    qid = _committed(store, body=body, rcpts=("a@x.test", "b@x.test"))
    _lose_marker(store, qid)
    assert store.scan("incoming") == []
    assert store.recover_unmarked() == [qid]
    assert stat.S_IMODE(os.stat(store.path("incoming", qid)).st_mode) == COMPLETE_MODE
    assert store.scan("incoming") == [qid]
    with store.open(qid) as q:
        assert [r.address for r in q.recipients] == ["a@x.test", "b@x.test"]
        assert b"".join(q.iter_content()) == body
    assert store.recover_unmarked() == []      # marked files are not looked at again


def test_an_unfinished_file_is_not_recovered(store):
    # Content written, never committed: the header is still zeros.
    m = store.create()
    m.set_sender("s@x.test")
    m.add_recipient("a@x.test")
    m.write(b"Subject: x\n\n" + b"z" * 200_000)
    assert store.recover_unmarked() == []
    m.abort()


@pytest.mark.parametrize("damage", ["flip_content", "flip_envelope", "truncate", "append", "zero_crc"])
def test_a_damaged_file_is_not_recovered(store, damage):
    """What a crash during the commit's fsync can leave on disk: blocks that never
    got their data (stale or zero), a size that disagrees."""
    qid = _committed(store, body=b"Subject: x\n\n" + b"w" * 9000 + b"\n")
    path = store.path("incoming", qid)
    data = bytearray(open(path, "rb").read())
    if damage == "flip_content":
        data[5000] ^= 0x20
    elif damage == "flip_envelope":
        data[-3] ^= 0x01
    elif damage == "truncate":
        data = data[:-10]
    elif damage == "append":
        data += b"\0" * 4096
    else:
        data[60:64] = b"\0\0\0\0"                # as a file of the old format
    with open(path, "wb") as f:
        f.write(data)
    _lose_marker(store, qid)
    assert store.recover_unmarked() == []
    assert store.scan("incoming") == []


def test_the_queue_manager_recovers_at_start_up_and_delivers(tmp_path):
    env = make_env(tmp_path, QueueStore, Agent())
    qid = queue(env.store, "s@x.test", ["a@ok.test"])
    _lose_marker(env.store, qid)

    async def go():
        env.qm._start_up_checks()
        env.qm.scan_incoming()
        await env.qm.drain()
    _run(go())
    assert env.store.find(qid) is None, "delivered and removed"
    text = "\n".join(env.logs["qmgr"].lines)
    assert f"{qid}: complete queue file without its complete marker" in text
    assert f"{qid}: removed" in text
