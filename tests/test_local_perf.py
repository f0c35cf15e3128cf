"""local(8) delivery path (issue 8): the root helper serves each qmgr
connection on a thread of its own (delivery.helper.serve_unix_threaded) and
the qmgr keeps one connection per delivery in progress (HelperLinks), so a
delivery crosses no thread hand-off inside the helper.

Everything here runs on loopback unix sockets in a private directory; every
wait is bounded."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import stat
import tempfile
import threading
import time

import pytest

from postwell.delivery.base import Recipient
from postwell.delivery.helper import HelperLinks, serve_unix_threaded
from postwell.log import NullLog

WAIT = 10.0


@pytest.fixture
def sockdir():
    # A short path: unix socket names are limited to 108 bytes.
    d = tempfile.mkdtemp(prefix="pwlp-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


class Server:
    """serve_unix_threaded() in a thread, stopped through its event."""

    def __init__(self, path, answer, **kw):
        self.path, self.log, self.stop = path, NullLog("local"), threading.Event()
        self.tidied = 0

        def tidy():
            self.tidied += 1
        kw.setdefault("housekeeping", tidy)
        self.thread = threading.Thread(
            target=serve_unix_threaded, args=(path, answer, self.log),
            kwargs=dict(stop=self.stop, **kw), daemon=True)
        self.thread.start()
        deadline = time.monotonic() + WAIT
        while not os.path.exists(path):
            assert time.monotonic() < deadline, "socket did not appear"
            time.sleep(0.01)

    def close(self, timeout=WAIT):
        self.stop.set()
        try:
            connect(self.path).close()     # wakes accept() now, not after its 1 s timeout
        except OSError:
            pass
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "server did not stop"


def connect(path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(WAIT)
    s.connect(path)
    return s


def request(s, rid, qid="4ABC12345", rcpts=(("a@example.test", None),)):
    s.sendall(json.dumps({"id": rid, "queue_id": qid, "sender": "",
                          "recipients": [list(r) for r in rcpts]}).encode() + b"\n")


def reply(s) -> dict:
    buf = b""
    while not buf.endswith(b"\n"):
        got = s.recv(65536)
        assert got, "connection closed before the reply"
        buf += got
    return json.loads(buf)


def closed(s) -> bool:
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True


# ------------------------------------------------------------ the helper side

def test_each_connection_is_answered_on_its_own_thread(sockdir):
    """Two deliveries in flight (local_destination_concurrency_limit = 2):
    the second is answered while the first still waits, and a connection's
    requests are all answered by the thread that reads them (no hand-off)."""
    gate = threading.Event()
    seen = []

    def answer(req):
        seen.append((req["id"], threading.get_ident(), threading.current_thread().name))
        if req["queue_id"] == "4ABC00001":
            return [["waited" if gate.wait(WAIT) else "timeout"]]
        gate.set()
        return [["quick"]]
    srv = Server(os.path.join(sockdir, "local"), answer)
    try:
        a, b = connect(srv.path), connect(srv.path)
        request(a, 1, "4ABC00001")
        request(b, 2, "4ABC00002")
        assert reply(b) == {"id": 2, "results": [["quick"]]}
        assert reply(a) == {"id": 1, "results": [["waited"]]}
        request(a, 3, "4ABC00003")
        assert reply(a) == {"id": 3, "results": [["quick"]]}
        threads = {rid: ident for rid, ident, _ in seen}
        assert threads[1] == threads[3] != threads[2]
        assert {name for *_, name in seen} == {"helper-conn"}
        a.close()
        b.close()
    finally:
        srv.close()


def test_socket_is_private(sockdir):
    srv = Server(os.path.join(sockdir, "local"), lambda req: [])
    try:
        assert stat.S_IMODE(os.stat(srv.path).st_mode) == 0o600
    finally:
        srv.close()
    assert srv.tidied >= 1          # housekeeping runs once more at the end


def test_malformed_request_ends_only_that_connection(sockdir):
    srv = Server(os.path.join(sockdir, "local"), lambda req: [["sent"]])
    try:
        bad, good = connect(srv.path), connect(srv.path)
        bad.sendall(b"this is not json\n")
        assert closed(bad)
        assert any(l.startswith("warning: malformed request from qmgr") for l in srv.log.lines)
        bad2 = connect(srv.path)
        bad2.sendall(b'{"id": 1, "queue_id": "4ABC12345"}\n')     # no recipients list
        assert closed(bad2)
        request(good, 7)
        assert reply(good) == {"id": 7, "results": [["sent"]]}
    finally:
        srv.close()


def test_overlong_request_line_ends_the_connection(sockdir):
    """Bounded memory: a line past the limit is never buffered whole."""
    srv = Server(os.path.join(sockdir, "local"), lambda req: [["sent"]], limit=1024)
    try:
        s = connect(srv.path)
        try:
            s.sendall(b"x" * 200_000)
        except (BrokenPipeError, ConnectionResetError):
            pass
        assert closed(s)
        t = connect(srv.path)
        request(t, 1)
        assert reply(t)["results"] == [["sent"]]
    finally:
        srv.close()


def test_stop_answers_the_request_in_progress_then_exits(sockdir):
    started, release = threading.Event(), threading.Event()

    def answer(req):
        started.set()
        release.wait(WAIT)
        return [["sent", "2.0.0", "delivered to maildir"]]
    srv = Server(os.path.join(sockdir, "local"), answer)
    s = connect(srv.path)
    request(s, 1)
    assert started.wait(WAIT)
    srv.stop.set()
    time.sleep(0.2)
    release.set()
    # Stopping never loses an answer: the delivery may already be on disk.
    assert reply(s) == {"id": 1, "results": [["sent", "2.0.0", "delivered to maildir"]]}
    assert closed(s)             # and no further request is read
    srv.close()


def test_connections_beyond_the_limit_wait_for_a_free_thread(sockdir):
    srv = Server(os.path.join(sockdir, "local"), lambda req: [["sent"]], max_connections=1)
    try:
        first = connect(srv.path)
        request(first, 1)
        assert reply(first)["id"] == 1
        second = connect(srv.path)          # queued in the listen backlog
        request(second, 2)
        second.settimeout(0.5)
        with pytest.raises(socket.timeout):
            second.recv(1)
        first.close()
        second.settimeout(WAIT)
        assert reply(second) == {"id": 2, "results": [["sent"]]}
    finally:
        srv.close()


# ------------------------------------------------------------ the qmgr side

def _rcpts(n=1):
    return [Recipient(f"u{i}@example.test") for i in range(n)]


def test_links_one_connection_per_request_in_progress(sockdir):
    """At most ``size`` connections; a request beyond waits for a free one,
    and a finished request's connection is reused."""
    lock = threading.Lock()
    running = {"now": 0, "max": 0}
    threads = set()

    def answer(req):
        with lock:
            running["now"] += 1
            running["max"] = max(running["max"], running["now"])
            threads.add(threading.get_ident())
        time.sleep(0.05)
        with lock:
            running["now"] -= 1
        return [["sent", req["queue_id"]]]
    srv = Server(os.path.join(sockdir, "local"), answer)

    async def main():
        links = HelperLinks(srv.path, size=2)
        got = await asyncio.wait_for(asyncio.gather(
            *(links.deliver(f"4ABC0000{i}", "", "h", _rcpts()) for i in range(6))), WAIT)
        # sequential requests afterwards reuse an idle connection
        more = await asyncio.wait_for(links.deliver("4ABC00009", "", "h", _rcpts()), WAIT)
        links.close()
        return got, more
    try:
        got, more = asyncio.run(main())
    finally:
        srv.close()
    assert [r[0][1] for r in got] == [f"4ABC0000{i}" for i in range(6)]
    assert more == [["sent", "4ABC00009"]]
    assert running["max"] == 2
    assert len(threads) == 2


def test_links_skip_a_connection_the_helper_closed(sockdir):
    """A helper restart closes the idle connections: the next request opens a
    new one instead of failing on the dead one."""
    path = os.path.join(sockdir, "local")
    srv = Server(path, lambda req: [["one"]])

    async def first(links):
        return await asyncio.wait_for(links.deliver("4ABC00001", "", "h", _rcpts()), WAIT)

    async def main():
        links = HelperLinks(path, size=2)
        assert await first(links) == [["one"]]
        srv.close()
        srv2 = Server(path, lambda req: [["two"]])
        try:
            await asyncio.sleep(0.05)      # the EOF reaches the idle connection
            return await first(links), srv2
        finally:
            srv2.close()
    got, _ = asyncio.run(main())
    assert got == [["two"]]


def _fake_helper(path, handler):
    """A one-connection-at-a-time helper stand-in with a scripted reply."""
    lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lst.bind(path)
    lst.listen(8)
    lst.settimeout(WAIT)

    def run():
        try:
            while True:
                conn, _ = lst.accept()
                with conn:
                    conn.settimeout(WAIT)
                    buf = b""
                    while True:
                        while b"\n" not in buf:
                            got = conn.recv(65536)
                            if not got:
                                break
                            buf += got
                        if b"\n" not in buf:
                            break
                        line, buf = buf.split(b"\n", 1)
                        if not handler(conn, json.loads(line)):
                            break
        except OSError:
            pass
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return lst


def test_links_reject_a_reply_to_another_request(sockdir):
    path = os.path.join(sockdir, "fake")

    def wrong_id(conn, req):
        conn.sendall(json.dumps({"id": req["id"] + 100, "results": [["sent"]]}).encode() + b"\n")
        return True
    lst = _fake_helper(path, wrong_id)

    async def main():
        links = HelperLinks(path, size=1)
        with pytest.raises(ConnectionError):
            await asyncio.wait_for(links.deliver("4ABC00001", "", "h", _rcpts()), WAIT)
        assert links._open == 0 and not links._idle      # the link was dropped
    try:
        asyncio.run(main())
    finally:
        lst.close()


def test_links_connection_closed_mid_request_is_a_connection_error(sockdir):
    path = os.path.join(sockdir, "fake")
    lst = _fake_helper(path, lambda conn, req: False)      # hang up without a reply

    async def main():
        links = HelperLinks(path, size=1)
        with pytest.raises(ConnectionError):
            await asyncio.wait_for(links.deliver("4ABC00001", "", "h", _rcpts()), WAIT)
    try:
        asyncio.run(main())
    finally:
        lst.close()


def test_links_abandoned_request_never_answers_a_later_one(sockdir):
    """A cancelled request's late reply must not be read as the answer to the
    next request: its connection is closed, the next one gets a new one."""
    release = threading.Event()

    def answer(req):
        if req["queue_id"] == "4ABC00001":
            release.wait(WAIT)
            return [["late"]]
        return [["fresh"]]
    srv = Server(os.path.join(sockdir, "local"), answer)

    async def main():
        links = HelperLinks(srv.path, size=1)
        slow = asyncio.ensure_future(links.deliver("4ABC00001", "", "h", _rcpts()))
        await asyncio.sleep(0.1)
        slow.cancel()
        with pytest.raises(asyncio.CancelledError):
            await slow
        release.set()
        return await asyncio.wait_for(links.deliver("4ABC00002", "", "h", _rcpts()), WAIT)
    try:
        assert asyncio.run(main()) == [["fresh"]]
    finally:
        srv.close()


def test_links_waiter_cancelled_passes_its_turn_on(sockdir):
    """size=1: of two waiters, the first is cancelled; the second still runs."""
    release = threading.Event()

    def answer(req):
        if req["queue_id"] == "4ABC00001":
            release.wait(WAIT)
        return [[req["queue_id"]]]
    srv = Server(os.path.join(sockdir, "local"), answer)

    async def main():
        links = HelperLinks(srv.path, size=1)
        busy = asyncio.ensure_future(links.deliver("4ABC00001", "", "h", _rcpts()))
        await asyncio.sleep(0.05)
        gone = asyncio.ensure_future(links.deliver("4ABC00002", "", "h", _rcpts()))
        kept = asyncio.ensure_future(links.deliver("4ABC00003", "", "h", _rcpts()))
        await asyncio.sleep(0.05)
        gone.cancel()
        release.set()
        return await asyncio.wait_for(asyncio.gather(busy, kept), WAIT)
    try:
        assert asyncio.run(main()) == [[["4ABC00001"]], [["4ABC00003"]]]
    finally:
        srv.close()


# ------------------------------------------------------------ LocalAgent through the links

def _agent(tmp, sock):
    from postwell.config.main import Config
    from postwell.delivery.local import LocalAgent
    params = {"myhostname": "mx.example.test", "mydestination": "mx.example.test",
              "alias_maps": "", "queue_directory": os.path.join(tmp, "q")}
    return LocalAgent(Config(tmp, params, {}, []), NullLog("local"), helper_socket=sock)


def _request(qid, address):
    from postwell.delivery.base import DeliveryRequest
    return DeliveryRequest(queue_id=qid, sender="s@remote.test", recipients=[Recipient(address)],
                           transport="local", nexthop="mx.example.test", arrival_time=0,
                           open_content=lambda: iter((b"Subject: x\n\nbody\n",)), content_size=17)


def test_agent_results_come_back_per_request(sockdir):
    """Two deliveries in flight through the links: each gets its own leaves
    (the qmgr logs status=sent (delivered to maildir) from them)."""
    def answer(req):
        (address, orig), = req["recipients"]
        time.sleep(0.05 if req["queue_id"].endswith("1") else 0)
        return [[[address, orig or address, "sent", "2.0.0", "delivered to maildir", None, None]]]
    srv = Server(os.path.join(sockdir, "local"), answer)
    agent = _agent(sockdir, srv.path)

    async def main():
        try:
            return await asyncio.wait_for(asyncio.gather(
                agent.deliver(_request("4ABC00001", "u1@mx.example.test")),
                agent.deliver(_request("4ABC00002", "u2@mx.example.test"))), WAIT)
        finally:
            agent.close()
    try:
        [r1], [r2] = asyncio.run(main())
    finally:
        srv.close()
    assert (r1.recipient.address, r1.status, r1.reason) == ("u1@mx.example.test", "sent",
                                                           "delivered to maildir")
    assert (r2.recipient.address, r2.status, r2.dsn) == ("u2@mx.example.test", "sent", "2.0.0")
    assert [p.recipient.address for p in r1.expanded] == ["u1@mx.example.test"]


def test_agent_defers_when_the_helper_hangs_up(sockdir):
    path = os.path.join(sockdir, "fake")
    lst = _fake_helper(path, lambda conn, req: False)
    agent = _agent(sockdir, path)

    async def main():
        try:
            return await asyncio.wait_for(agent.deliver(_request("4ABC00001", "u1@mx.example.test")),
                                          WAIT)
        finally:
            agent.close()
    try:
        [res] = asyncio.run(main())
    finally:
        lst.close()
    assert (res.status, res.dsn, res.reason) == ("deferred", "4.3.0", "mail system configuration error")
    assert any("local delivery helper:" in l for l in agent.log.lines)
