"""postqueue / postsuper against a queue built in a temporary directory.

Expected shapes come from Postfix 3.7's postqueue -p / -j and postsuper output.
"""

from __future__ import annotations

import json
import os
import time

import pytest

from postwell.cli import postqueue, postsuper
from postwell.queue import QueueStore


@pytest.fixture
def env(tmp_path):
    qdir = tmp_path / "queue"
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "main.cf").write_text(f"queue_directory = {qdir}\nmaillog_file = {tmp_path / 'maillog'}\n"
                                 "myhostname = mx.example.test\n")
    store = QueueStore(str(qdir), clock=lambda: 1_795_933_440.25)
    store.ensure_layout()
    return store, str(etc), tmp_path


def put(store, sender, rcpts, body=b"x" * 279, queue="deferred"):
    m = store.create()
    m.set_sender(sender)
    for r in rcpts:
        m.add_recipient(r)
    m.write(body)
    m.commit()
    if queue != "incoming":
        store.move(m.queue_id, "incoming", queue)
    return m.queue_id


LONG = "connect to mx.long.test[192.0.2.1]:25: Connection timed out after a very long wait indeed"


def test_postqueue_p_layout(env, capsys):
    # Postfix's showq_compat.c: the defer log's order, a reason line at each change.
    store, etc, _ = env
    qid = put(store, "s@x.test", ["a@long.test", "b@short.test", "c@long.test", "d@x.test"])
    with store.open(qid) as q:
        q.mark_done(["d@x.test"])
    store.append_defer_log(qid, "a@long.test", "4.4.1", LONG)
    store.append_defer_log(qid, "b@short.test", "4.4.2", "short")
    store.append_defer_log(qid, "c@long.test", "4.4.1", LONG)
    assert postqueue.main(["-c", etc, "-p"]) == 0
    out = capsys.readouterr().out
    stamp = time.strftime("%a %b %d %H:%M:%S", time.localtime(1_795_933_440))
    assert out == (
        "-Queue ID-  --Size-- ----Arrival Time---- -Sender/Recipient-------\n"
        f"{qid:<11}     279 {stamp}  s@x.test\n"
        f"({LONG})\n"
        + " " * 41 + "a@long.test\n"
        + " " * 71 + "(short)\n"
        + " " * 41 + "b@short.test\n"
        + f"({LONG})\n"
        + " " * 41 + "c@long.test\n"
        "\n"
        "-- 0 Kbytes in 1 Request.\n")


def test_postqueue_status_chars_and_null_sender(env, capsys):
    store, etc, _ = env
    a = put(store, "", ["x@y.test"], queue="active")
    h = put(store, "s@x.test", ["x@y.test"], body=b"y" * 3000, queue="hold")
    assert postqueue.main(["-c", etc, "-p"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith(f"{a + '*':<11} ") and lines[1].endswith("  MAILER-DAEMON")
    assert lines[4].startswith(f"{h + '!':<11}    3000 ")    # Postfix 3.7: mark glued to the id
    assert lines[-1] == "-- 3 Kbytes in 2 Requests."


def test_postqueue_empty(env, capsys):
    _, etc, _ = env
    assert postqueue.mailq_main(["-c", etc]) == 0
    assert capsys.readouterr().out == "Mail queue is empty\n"


def test_postqueue_j(env, capsys):
    store, etc, _ = env
    qid = put(store, "s@x.test", ["a@long.test", "b@x.test"])
    store.append_defer_log(qid, "a@long.test", "4.4.1", "short")
    assert postqueue.main(["-c", etc, "-j"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec == {"queue_name": "deferred", "queue_id": qid, "arrival_time": 1795933440,
                   "message_size": 279, "forced_expire": False, "sender": "s@x.test",
                   "recipients": [{"address": "a@long.test", "delay_reason": "short"},
                                  {"address": "b@x.test"}]}


def test_postqueue_i_and_f(env):
    store, etc, _ = env
    qid = put(store, "s@x.test", ["a@x.test"])
    fifo = store.path("public", "qmgr")
    os.mkfifo(fifo, 0o622)
    rfd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        assert postqueue.main(["-c", etc, "-i", qid]) == 0
        assert store.find(qid) == "incoming"
        assert postqueue.main(["-c", etc, "-i", "NOSUCHID1"]) == 0
        assert postqueue.main(["-c", etc, "-f"]) == 0
        assert os.read(rfd, 10) == b"IF"
    finally:
        os.close(rfd)


def test_postsuper_hold_release_requeue_delete(env, capsys):
    store, etc, tmp = env
    q1 = put(store, "s@x.test", ["a@x.test"])
    q2 = put(store, "s@x.test", ["a@x.test"], queue="incoming")
    assert postsuper.main(["-c", etc, "-h", q1]) == 0
    assert store.find(q1) == "hold"
    assert capsys.readouterr().err == f"postsuper: {q1}: placed on hold\npostsuper: Placed on hold: 1 message\n"
    assert postsuper.main(["-c", etc, "-H", "ALL"]) == 0
    assert store.find(q1) == "deferred"
    assert capsys.readouterr().err == "postsuper: Released from hold: 1 message\n"
    store.append_defer_log(q1, "a@x.test", "4.0.0", "x")
    assert postsuper.main(["-c", etc, "-r", q1]) == 0
    # Postfix's requeue: to maildrop/, for pickup to send through cleanup again.
    assert store.find(q1) is None and os.path.exists(store.path("maildrop", q1))
    # The defer log stays, as Postfix's postsuper -r leaves it (checked side by side in
    # test_parity_gaps6): mailq lists the waiting file with its reasons.
    assert [e["reason"] for e in store.read_defer_log(q1)] == ["x"]
    assert capsys.readouterr().err == f"postsuper: {q1}: requeued\npostsuper: Requeued: 1 message\n"
    assert postsuper.main(["-c", etc, "-d", "bad/id", "-d", q2]) == 0
    assert capsys.readouterr().err == ("postsuper: warning: invalid mail queue id: bad/id\n"
                                       f"postsuper: {q2}: removed\npostsuper: Deleted: 1 message\n")
    q3 = put(store, "s@x.test", ["a@x.test"], queue="incoming")
    assert postsuper.main(["-c", etc, "-d", "ALL", "deferred"]) == 0
    assert store.find(q3) == "incoming"                 # not in the named queue
    assert capsys.readouterr().err == "postsuper: Deleted: 0 messages\n"
    assert postsuper.main(["-c", etc, "-d", "ALL"]) == 0
    assert store.find(q3) is None
    assert f"{q2}: removed" in (tmp / "maillog").read_text()


def test_postsuper_stdin_ids(env, capsys, monkeypatch):
    import io
    store, etc, _ = env
    ids = [put(store, "s@x.test", ["a@x.test"]) for _ in range(3)]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(ids[:2]) + "\n"))
    assert postsuper.main(["-c", etc, "-d", "-"]) == 0
    assert capsys.readouterr().err.endswith("postsuper: Deleted: 2 messages\n")
    assert store.scan("deferred") == [ids[2]]


def test_postsuper_usage_and_relative_config(env, capsys):
    _, etc, _ = env
    assert postsuper.main(["-x"]) == 1
    assert "invalid option -- 'x'" in capsys.readouterr().err
    assert postsuper.main(["-c", "relative/etc", "-d", "ALL"]) == 1
    assert capsys.readouterr().err == "postsuper: fatal: -c requires absolute pathname\n"


def test_postsuper_purge_and_structure(env, capsys):
    store, etc, _ = env
    stale = store.create()
    old = time.time() - 7200
    os.utime(store.path("incoming", stale.queue_id), (old, old))
    open(store.path("deferred", "junk.txt"), "w").close()
    assert postsuper.main(["-c", etc]) == 0
    assert not os.path.exists(store.path("incoming", stale.queue_id))
    assert os.path.exists(store.path("corrupt", "junk.txt"))
    stale.abort()
