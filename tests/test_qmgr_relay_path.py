"""The relay hot path (issue 8): per-message costs of qmgr -> smtp(8) that do
not show in the protocol, kept from coming back.

- content conversion works on whole chunks (LF -> CRLF, dot-stuffing with
  bytes.replace) and gives exactly what the line-by-line way gives;
- a small message goes out in one write (content and the final ".");
- a small queue file is read once (the content comes with the open);
- the queue file is closed, after its removal, off the event loop;
- the per-stage timeouts follow the live settings.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import random
import threading
import time

from postwell.config.main import Config
from postwell.delivery.base import DeliveryAgent, DeliveryRequest, Recipient, RecipientResult
from postwell.delivery.smtp import SmtpDeliveryAgent, _Connection
from postwell.dns import FakeResolver, Target
from postwell.log import NullLog
from postwell.qmgr.manager import QueueManager
from postwell.queue import QueueStore
from postwell.smtp.client import Envelope, SmtpClient, State
from postwell.smtp.client import Recipient as EnvRecipient

T0 = 1_800_000_000.0
TIMEOUT = 30


# ------------------------------------------------------------ content conversion

def _convert_all(chunks, limit, bdat, fast):
    c = SmtpClient("client.test", line_length_limit=limit)
    c._bdat = bdat
    out = []
    for ch in chunks:
        out.append(c._convert(ch) if fast else c._convert_lines(ch.replace(b"\r", b"")))
    return b"".join(out), c._at_line_start, c._column


def test_whole_chunk_conversion_matches_line_by_line():
    rng = random.Random(8)
    pieces = [b"a", b"b", b".", b"\n", b"\r", b" ", b"..", b"\n.", b"x" * 7, b"\r\n"]
    for _ in range(5000):
        data = b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 60)))
        cuts = sorted(rng.randint(0, len(data)) for _ in range(rng.randint(0, 4)))
        chunks = [data[a:b] for a, b in zip([0] + cuts, cuts + [len(data)])]
        limit = rng.choice([0, 5, 8, 12, 998])
        bdat = rng.random() < 0.2
        fast = _convert_all(chunks, limit, bdat, True)
        slow = _convert_all(chunks, limit, bdat, False)
        assert fast == slow, (chunks, limit, bdat)


def test_dot_stuffing_across_chunk_boundaries():
    # RFC 5321 4.5.2: a line cut by a chunk boundary is stuffed only at its start.
    out, at_start, _ = _convert_all([b"a\n", b".b\nc", b".d\n.", b"\n"], 998, False, True)
    assert out == b"a\r\n..b\r\nc.d\r\n..\r\n"
    assert at_start


def test_long_lines_are_still_broken():
    out, _, _ = _convert_all([b"x" * 25 + b"\n"], 10, False, True)
    assert out == b"xxxxxxxxxx\r\n xxxxxxxxx\r\n xxxxxx\r\n"


# ------------------------------------------------------------ one write per message

class _Transport:
    def get_write_buffer_size(self):
        return 0


class _Writer:
    def __init__(self):
        self.writes = []
        self.transport = _Transport()

    def write(self, data):
        self.writes.append(bytes(data))

    async def drain(self):
        return None

    def close(self):
        pass


def _agent():
    cfg = Config("/nonexistent", {"myhostname": "client.test", "smtp_helo_name": "client.test",
                                  "inet_protocols": "ipv4"}, {}, [])
    return SmtpDeliveryAgent(cfg, FakeResolver({}), NullLog("smtp"), rng=random.Random(0),
                             own_addresses=frozenset())


def _ready_engine():
    engine = SmtpClient("client.test")
    engine.receive_data(b"220 mx.test ESMTP\r\n")
    engine.receive_data(b"250-mx.test\r\n250 PIPELINING\r\n")
    engine.data_to_send()
    engine.start_transaction(Envelope("s@client.test", (EnvRecipient("a@x.test"),)))
    engine.receive_data(b"250 ok\r\n250 ok\r\n354 go ahead\r\n")
    while engine.next_event() is not None and engine.state is not State.CONTENT:
        pass
    engine.data_to_send()
    assert engine.state is State.CONTENT
    return engine


def _request(chunks):
    return DeliveryRequest(queue_id="ABC", sender="s@client.test",
                           recipients=[Recipient("a@x.test")], transport="smtp",
                           nexthop="[127.0.0.1]:25", arrival_time=0.0,
                           open_content=lambda: iter(chunks),
                           content_size=sum(len(c) for c in chunks))


def test_small_message_goes_out_in_one_write():
    a = _agent()
    writer = _Writer()
    conn = _Connection(Target("mx.test", "127.0.0.1", 25), None, writer, _ready_engine(), 0.0)
    chunks = [b"Subject: t\n\n", b".dot\n", b"body\n" * 100]
    asyncio.run(asyncio.wait_for(a._send_content(conn, _request(chunks)), TIMEOUT))
    assert len(writer.writes) == 1
    assert writer.writes[0].startswith(b"Subject: t\r\n\r\n..dot\r\nbody\r\n")
    assert writer.writes[0].endswith(b"body\r\n.\r\n")


def test_big_message_goes_out_in_bounded_pieces(monkeypatch):
    from postwell.delivery import smtp as smtp_mod
    monkeypatch.setattr(smtp_mod, "CONTENT_FLUSH_SIZE", 1000)
    a = _agent()
    writer = _Writer()
    conn = _Connection(Target("mx.test", "127.0.0.1", 25), None, writer, _ready_engine(), 0.0)
    chunks = [b"y" * 99 + b"\n"] * 50
    asyncio.run(asyncio.wait_for(a._send_content(conn, _request(chunks)), TIMEOUT))
    assert len(writer.writes) > 1
    assert max(len(w) for w in writer.writes) <= 1000 + 101 + 3
    assert b"".join(writer.writes) == (b"y" * 99 + b"\r\n") * 50 + b".\r\n"


def test_stage_timeouts_follow_live_settings():
    a = _agent()
    a.settings.data_done_timeout = 7.0
    assert a._timeout_for(State.DONE) == 7.0
    a.settings.rcpt_timeout = 0.0
    assert a._timeout_for(State.RCPT) == 300.0
    assert a._timeout_for(State.READY) == a.settings.helo_timeout


# ------------------------------------------------------------ queue file read once

def _store(tmp_path):
    store = QueueStore(str(tmp_path / "queue"), clock=lambda: T0)
    store.ensure_layout()
    return store


def _queue(store, rcpts=("a@ok.test",), body=b"From: s@x.test\nSubject: t\n\nhello\n"):
    msg = store.create()
    msg.set_sender("s@x.test")
    for r in rcpts:
        msg.add_recipient(r)
    msg.write(body)
    msg.commit()
    return msg.queue_id


def test_small_file_content_comes_with_the_open(tmp_path, monkeypatch):
    store = _store(tmp_path)
    body = b"Subject: t\n\n" + b"line\n" * 500
    qid = _queue(store, body=body)
    qm = store.open(qid, "incoming")
    import os as os_mod
    reads = []
    real = os_mod.pread
    monkeypatch.setattr(os_mod, "pread", lambda *a: reads.append(a) or real(*a))
    assert b"".join(qm.iter_content(chunk=1000)) == body
    assert [len(c) for c in qm.iter_content(chunk=1000)][:2] == [1000, 1000]
    assert reads == []
    qm.close()
    try:
        list(qm.iter_content())
    except ValueError:
        pass
    else:
        raise AssertionError("content of a closed queue file")


def test_big_file_content_is_streamed(tmp_path):
    store = _store(tmp_path)
    body = b"Subject: t\n\n" + b"z" * 99 + b"\n" + b"line\n" * 20000
    qid = _queue(store, body=body)
    qm = store.open(qid, "incoming")
    try:
        assert getattr(qm, "_content", None) is None
        assert b"".join(qm.iter_content()) == body
    finally:
        qm.close()


# ------------------------------------------------------------ qmgr end of a message

class _Resolver:
    def resolve(self, address):
        from types import SimpleNamespace
        return SimpleNamespace(address_class="default", transport="okay",
                               nexthop=address.rsplit("@", 1)[-1], recipient=address)


class _OkAgent(DeliveryAgent):
    def __init__(self):
        pass

    async def deliver(self, req):
        return [RecipientResult.sent(r, "delivered", "okay") for r in req.recipients]


def _qmgr(tmp_path, store):
    cfg = Config(str(tmp_path), {"queue_directory": store.queue_directory,
                                 "myhostname": "mx.demo.test", "mydomain": "demo.test"}, {}, [])
    logs = {}

    def agent_log(name):
        return logs.setdefault(name, NullLog(name))
    qm = QueueManager(cfg, store, log=agent_log("qmgr"), clock=lambda: T0, resolver=_Resolver(),
                      agent_logs=agent_log, bounce_log=agent_log("bounce"),
                      agents={"okay": _OkAgent()})
    return qm, logs


def test_queue_file_closed_off_the_event_loop_after_removal(tmp_path, monkeypatch):
    from postwell.queue import store as store_mod
    store = _store(tmp_path)
    qid = _queue(store, rcpts=("a@ok.test", "b@ok.test"))
    closes = []
    real_close = store_mod.QueuedMessage.close

    def close(self):
        if self._fd is not None:
            closes.append((threading.current_thread() is threading.main_thread(),
                           store.find(self.queue_id)))
        real_close(self)
    monkeypatch.setattr(store_mod.QueuedMessage, "close", close)
    qm, logs = _qmgr(tmp_path, store)

    async def go():
        qm.scan_incoming()
        await qm.drain()
    asyncio.run(asyncio.wait_for(go(), TIMEOUT))
    assert store.find(qid) is None
    # Closed once, on the closer thread, after the file was gone.
    _wait(lambda: closes)
    assert closes == [(False, None)]
    lines = logs["okay"].lines + logs["qmgr"].lines
    assert sum("status=sent" in line for line in lines) == 2
    assert logs["qmgr"].lines[-1] == f"{qid}: removed"


def _wait(cond, timeout=5.0):
    """The closer thread works in the background: wait for it, bounded."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "closer thread never ran"
        time.sleep(0.005)


def test_close_later_closes_on_one_background_thread():
    from postwell.qmgr.manager import close_later
    seen = []
    done = threading.Event()

    class _File:
        def __init__(self, n):
            self.n = n

        def close(self):
            seen.append((self.n, threading.current_thread().name))
            if self.n == 2:
                done.set()

    class _Broken:
        def close(self):
            raise OSError("EIO")
    for f in (_File(0), _Broken(), _File(1), _File(2)):
        close_later(f)
    assert done.wait(5)
    # In order, one thread, and a failing close does not stop the others.
    assert [n for n, _ in seen] == [0, 1, 2]
    assert {name for _, name in seen} == {"qmgr-close"}


def test_close_later_works_in_a_forked_child():
    """The qmgr runs in a forked child of the master: the closer thread of
    the parent does not exist there, so the child starts its own."""
    import os
    from postwell.qmgr.manager import close_later
    close_later(_Closeable())                 # the parent's thread exists now
    pid = os.fork()
    if pid == 0:
        done = threading.Event()
        f = _Closeable(done)
        close_later(f)
        os._exit(0 if done.wait(5) and f.thread == "qmgr-close" else 1)
    deadline = time.monotonic() + 10
    while True:
        got, status = os.waitpid(pid, os.WNOHANG)
        if got:
            break
        assert time.monotonic() < deadline, "child did not finish"
        time.sleep(0.01)
    assert os.waitstatus_to_exitcode(status) == 0


class _Closeable:
    def __init__(self, done=None):
        self.done, self.thread = done, None

    def close(self):
        self.thread = threading.current_thread().name
        if self.done is not None:
            self.done.set()


def test_several_destinations_are_not_fused(tmp_path):
    """Two next hops settle in parallel: the removal waits for both."""
    store = _store(tmp_path)
    qid = _queue(store, rcpts=("a@one.test", "b@two.test"))
    qm, logs = _qmgr(tmp_path, store)

    async def go():
        qm.scan_incoming()
        await qm.drain()
    asyncio.run(asyncio.wait_for(go(), TIMEOUT))
    assert store.find(qid) is None
    assert sum("status=sent" in line for line in logs["okay"].lines) == 2
    assert logs["qmgr"].lines[-1] == f"{qid}: removed"


def _counting_store(tmp_path):
    import os as os_mod
    syncs = []

    def fsync(fd):
        syncs.append(fd)
        os_mod.fsync(fd)
    store = QueueStore(str(tmp_path / "queue"), clock=lambda: T0, fsync=fsync)
    store.ensure_layout()
    return store, syncs


def test_done_marks_of_a_removed_message_are_not_fsynced(tmp_path):
    """The file goes right after its marks: a killed qmgr leaves them in the
    page cache, so nothing is delivered twice; no fsync is spent on them."""
    store, syncs = _counting_store(tmp_path)
    qid = _queue(store, rcpts=("a@ok.test",))
    qm, logs = _qmgr(tmp_path, store)
    syncs.clear()

    async def go():
        qm.scan_incoming()
        await qm.drain()
    asyncio.run(asyncio.wait_for(go(), TIMEOUT))
    assert store.find(qid) is None
    assert syncs == []
    assert logs["qmgr"].lines[-1] == f"{qid}: removed"


def test_done_marks_are_written_before_the_removal(tmp_path, monkeypatch):
    store, _ = _counting_store(tmp_path)
    qid = _queue(store, rcpts=("a@ok.test", "b@ok.test"))
    seen = []
    real_remove = QueueStore.remove

    def remove(self, queue_id, queue_name=None, *, sync=True):
        path = self.path("active", queue_id)
        try:
            m = _done_flags(path)
            seen.append(m)
        except FileNotFoundError:
            pass
        return real_remove(self, queue_id, queue_name, sync=sync)
    monkeypatch.setattr(QueueStore, "remove", remove)
    qm, _ = _qmgr(tmp_path, store)

    async def go():
        qm.scan_incoming()
        await qm.drain()
    asyncio.run(asyncio.wait_for(go(), TIMEOUT))
    assert store.find(qid) is None
    assert seen == [[True, True]]


def _done_flags(path):
    """Done flags of a queue file as the disk (page cache) has them now."""
    import os as os_mod
    from postwell.queue import format as qf
    with open(path, "rb") as f:
        whole = f.read()
    h = qf.unpack_header(whole[:qf.HEADER_SIZE], os_mod.path.getsize(path))
    env = qf.parse_envelope(whole[h.envelope_offset:h.envelope_offset + h.envelope_size],
                            h.envelope_offset)
    return [bool(r.done) for r in env.recipients]


def test_trace_entries_keep_the_marks_durable(tmp_path):
    """NOTIFY=SUCCESS: the success notice is owed, so the marks and the trace
    entry are fsync'd before anything else happens to the message."""
    store, syncs = _counting_store(tmp_path)
    msg = store.create()
    msg.set_sender("s@x.test")
    msg.add_recipient("a@ok.test", notify="SUCCESS")
    msg.write(b"From: s@x.test\nSubject: t\n\nhello\n")
    msg.commit()
    qm, logs = _qmgr(tmp_path, store)
    syncs.clear()

    async def go():
        qm.scan_incoming()
        await qm.drain()
    asyncio.run(asyncio.wait_for(go(), TIMEOUT))
    assert store.find(msg.queue_id) is None
    assert len(syncs) >= 2       # bounce/ID entry, then the done mark
    assert any("sender delivery status notification" in line for line in logs["bounce"].lines)


class _CountingExecutor(concurrent.futures.ThreadPoolExecutor):
    def __init__(self):
        super().__init__(max_workers=2)
        self.calls = 0

    def submit(self, fn, *args, **kw):
        self.calls += 1
        return super().submit(fn, *args, **kw)


def test_messages_of_one_scan_need_no_handoff(tmp_path, monkeypatch):
    from postwell.qmgr import manager as manager_mod
    store = _store(tmp_path)
    ids = [_queue(store, rcpts=(f"r{n}@ok.test",)) for n in range(5)]
    pool, state_pool = _CountingExecutor(), _CountingExecutor()
    monkeypatch.setattr(manager_mod, "state_executor", lambda: state_pool)
    qm, logs = _qmgr(tmp_path, store)

    async def go():
        asyncio.get_running_loop().set_default_executor(pool)
        assert len(qm.scan_incoming()) == 5
        await qm.drain()
    asyncio.run(asyncio.wait_for(go(), TIMEOUT))
    pool.shutdown()
    state_pool.shutdown()
    assert all(store.find(q) is None for q in ids)
    assert sorted(line.split(":")[0] for line in logs["qmgr"].lines
                  if line.endswith("removed")) == sorted(ids)
    # Moves to active/, opens, done marks and removals without fsync stay on
    # the event loop: no thread hand-off at all.
    assert pool.calls == 0
    assert state_pool.calls == 0


def test_batched_job_errors_reach_their_own_waiter():
    from postwell.qmgr.manager import _Batcher

    def boom(x):
        raise OSError(5, f"bad {x}")

    async def go():
        b = _Batcher(asyncio.get_running_loop(), None)
        futs = [b.submit(lambda x: x * 2, 1), b.submit(boom, 2), b.submit(lambda: "ok")]
        return await asyncio.gather(*futs, return_exceptions=True)
    got = asyncio.run(asyncio.wait_for(go(), TIMEOUT))
    assert got[0] == 2 and got[2] == "ok"
    assert isinstance(got[1], OSError) and "bad 2" in str(got[1])


def test_batched_open_file_is_closed_when_its_waiter_is_gone():
    from postwell.qmgr.manager import _Batcher
    closed = []

    class FakeQm:
        def close(self):
            closed.append(1)

    async def go():
        b = _Batcher(asyncio.get_running_loop(), None)
        fut = b.submit(lambda: (FakeQm(), False))
        fut.cancel()
        await asyncio.sleep(0.2)
        for _ in range(100):
            if closed:
                break
            await asyncio.sleep(0.02)
    asyncio.run(asyncio.wait_for(go(), TIMEOUT))
    assert closed == [1]


def test_a_big_batch_is_split():
    from postwell.qmgr.manager import _Batcher
    pool = _CountingExecutor()

    async def go():
        b = _Batcher(asyncio.get_running_loop(), pool)
        futs = [b.submit(lambda n=n: n) for n in range(_Batcher.MAX_JOBS * 2 + 1)]
        return await asyncio.gather(*futs)
    got = asyncio.run(asyncio.wait_for(go(), TIMEOUT))
    pool.shutdown()
    assert got == list(range(_Batcher.MAX_JOBS * 2 + 1))
    assert pool.calls == 3
