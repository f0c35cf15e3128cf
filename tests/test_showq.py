"""showq(8): the queue listing served on public/showq for users who cannot
read the queue, and postqueue's use of it (direct read when privileged,
showq otherwise, Postfix's "mail system is down" when it is unreachable).

The service runs in a thread here (serve() with a stop event); the master
slot and an unprivileged user against a running instance are covered in
tests/test_issue3_tools_e2e.py and below (root only)."""

from __future__ import annotations

import io
import json
import os
import re
import socket
import stat
import struct
import sys
import threading
import time

import pytest

from postwell import showq
from postwell.cli import postqueue
from postwell.config import load_config
from postwell.queue import QueueStore

sys.path.insert(0, os.path.dirname(__file__))

T0 = 1_795_933_440.25
WAIT = 10.0


def put(store, sender, rcpts, body=b"x" * 100, queue="deferred"):
    m = store.create()
    m.set_sender(sender)
    for r in rcpts:
        m.add_recipient(r)
    m.write(body)
    m.commit()
    if queue != "incoming":
        store.move(m.queue_id, "incoming", queue)
    return m.queue_id


@pytest.fixture
def env(tmp_path):
    qdir = tmp_path / "queue"
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "main.cf").write_text(f"queue_directory = {qdir}\nmaillog_file = {tmp_path / 'maillog'}\n"
                                 "myhostname = mx.example.test\n")
    store = QueueStore(str(qdir), clock=lambda: T0)
    store.ensure_layout()
    return store, str(etc), tmp_path


class Running:
    """showq.serve() in a thread, stopped (and joined) at exit."""

    def __init__(self, config):
        self.config = config
        self.stop = threading.Event()
        self.errors = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        try:
            showq.serve(self.config, self.stop)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.errors.append(exc)

    def __enter__(self):
        self.thread.start()
        path = showq.socket_path(self.config)
        deadline = time.monotonic() + WAIT
        while not os.path.exists(path):
            assert time.monotonic() < deadline and not self.errors, self.errors
            time.sleep(0.01)
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(WAIT)
        assert not self.thread.is_alive()


def test_query_returns_what_a_direct_scan_sees(env):
    store, etc, _ = env
    cfg = load_config(etc)
    a = put(store, "s1@x.test", ["a@far.test", "b@far.test"])
    store.append_defer_log(a, "a@far.test", "4.4.1", "connect refused")
    put(store, "", ["c@far.test"], queue="hold")
    put(store, "s3@x.test", ["d@far.test"], queue="incoming")
    with Running(cfg):
        path = showq.socket_path(cfg)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o666
        assert stat.S_ISSOCK(os.stat(path).st_mode)
        got = list(showq.query(store.queue_directory, timeout=WAIT))
    assert got == list(postqueue.collect(store))
    assert [m["queue_name"] for m in got] == ["incoming", "deferred", "hold"]
    assert got[1]["recipients"][0] == {"address": "a@far.test", "delay_reason": "connect refused"}
    # The service removes its socket when it stops.
    assert not os.path.exists(path)


def test_postqueue_uses_showq_when_it_cannot_read_the_queue(env, monkeypatch):
    store, etc, _ = env
    cfg = load_config(etc)
    put(store, "s1@x.test", ["a@far.test"])
    put(store, "s2@x.test", ["b@far.test"], queue="hold")
    direct = io.StringIO()
    assert postqueue.show_queue(cfg, store, "p", direct) == 0
    monkeypatch.setattr(postqueue, "can_read_queue", lambda cfg, store: False)

    def no_direct(*a):
        raise AssertionError("read the queue directly")
    monkeypatch.setattr(postqueue, "collect", no_direct)
    with Running(cfg):
        for mode in ("p", "j"):
            out = io.StringIO()
            assert postqueue.show_queue(cfg, store, mode, out) == 0
            if mode == "p":
                assert out.getvalue() == direct.getvalue()
                assert out.getvalue().startswith(postqueue.HEADER + "\n")
            else:
                assert [json.loads(x)["queue_name"] for x in out.getvalue().splitlines()] == \
                    ["deferred", "hold"]


def test_postqueue_empty_queue_through_showq(env, monkeypatch):
    store, etc, _ = env
    cfg = load_config(etc)
    monkeypatch.setattr(postqueue, "can_read_queue", lambda cfg, store: False)
    with Running(cfg):
        out = io.StringIO()
        assert postqueue.show_queue(cfg, store, "p", out) == 0
    assert out.getvalue() == "Mail queue is empty\n"


def test_mail_system_down(env, monkeypatch, capsys):
    store, etc, _ = env
    monkeypatch.setattr(postqueue, "can_read_queue", lambda cfg, store: False)
    put(store, "s1@x.test", ["a@far.test"])
    assert postqueue.main(["-c", etc, "-p"]) == 69
    out, err = capsys.readouterr()
    # Postfix 3.7's words (postqueue.c show_queue: "the $mail_name showq service") and EX_UNAVAILABLE.
    assert out == ""
    assert err == ("postqueue: fatal: Queue report unavailable - mail system is down "
                   "(Connect to the postwell showq service: No such file or directory)\n")
    # A stale socket nobody listens on: the same answer.
    s = socket.socket(socket.AF_UNIX)
    s.bind(os.path.join(store.queue_directory, "public", "showq"))
    s.close()
    assert postqueue.main(["-c", etc, "-j"]) == 69
    assert "mail system is down (Connect to the postwell showq service: Connection refused)" \
        in capsys.readouterr().err


def test_privileged_caller_reads_directly(env, monkeypatch, capsys):
    store, etc, _ = env
    qid = put(store, "s1@x.test", ["a@far.test"])
    # No showq running: the owner of the queue does not need it.
    assert postqueue.can_read_queue(load_config(etc), store)
    assert postqueue.main(["-c", etc, "-p"]) == 0
    assert capsys.readouterr().out.split("\n")[1].startswith(qid)


def test_many_messages_stream(env):
    store, etc, _ = env
    cfg = load_config(etc)
    ids = {put(store, f"s{i}@x.test", [f"r{i}@far.test"]) for i in range(150)}
    with Running(cfg):
        got = [m["queue_id"] for m in showq.query(store.queue_directory, timeout=WAIT)]
    assert len(got) == 150 and set(got) == ids


def test_several_clients_at_once(env):
    store, etc, _ = env
    cfg = load_config(etc)
    for i in range(5):
        put(store, f"s{i}@x.test", [f"r{i}@far.test"])
    results = []
    with Running(cfg):
        threads = [threading.Thread(target=lambda: results.append(
            len(list(showq.query(store.queue_directory, timeout=WAIT))))) for _ in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT * 2)
    assert results == [5] * 12


def _raw(path, request: bytes):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(WAIT)
    s.connect(path)
    s.sendall(request)
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    s.close()
    (n,) = struct.unpack(">I", data[:4])
    return json.loads(data[4:4 + n]), data[4 + n:]


def test_unknown_request_and_silent_client(env, monkeypatch):
    store, etc, _ = env
    cfg = load_config(etc)
    monkeypatch.setattr(showq, "SEND_TIMEOUT", 0.5)
    with Running(cfg):
        path = showq.socket_path(cfg)
        obj, rest = _raw(path, b"delete everything\n")
        assert obj == {"error": "unknown request"} and rest == b""
        # A client that connects and says nothing is dropped after SEND_TIMEOUT.
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(WAIT)
        s.connect(path)
        t0 = time.monotonic()
        assert s.recv(100) == b""
        assert time.monotonic() - t0 < WAIT
        s.close()
        # ... and the service still answers.
        obj, _ = _raw(path, showq.REQUEST)
        assert obj == {"end": 0}


def test_refusal_is_reported(env, monkeypatch, capsys):
    import pwd
    store, etc, _ = env
    put(store, "s1@x.test", ["a@far.test"])
    monkeypatch.setattr(postqueue, "can_read_queue", lambda cfg, store: False)
    monkeypatch.setattr(showq, "authorized", lambda cfg, uid: False)
    with Running(load_config(etc)):
        assert postqueue.main(["-c", etc, "-p"]) == 77     # EX_NOPERM, as Postfix
    out, err = capsys.readouterr()
    me = pwd.getpwuid(os.geteuid()).pw_name
    assert out == "" and err == (f"postqueue: fatal: User {me}({os.geteuid()}) is not allowed "
                                 "to view the mail queue\n")


def test_authorized_mailq_users(env):
    _, etc, _ = env
    cfg = load_config(etc)
    other = 65533   # not us, not root
    assert showq.authorized(cfg, 0) and showq.authorized(cfg, os.geteuid())
    assert showq.authorized(cfg, other)                   # default static:anyone
    assert not showq.authorized(cfg, None)
    only = cfg.override({"authorized_mailq_users": "someone-else"})
    assert not only.get("authorized_mailq_users") == "static:anyone"
    assert not showq.authorized(only, other)
    assert showq.authorized(only, 0)


def test_oversized_record_is_cut_to_the_frame_limit(monkeypatch):
    monkeypatch.setattr(showq, "MAX_FRAME", 2000)
    m = {"queue_id": "ABC", "recipients": [{"address": f"user{i}@example.test"} for i in range(500)]}
    frame = showq.message_frame(m)
    assert len(frame) <= 2000
    got = json.loads(frame[4:])["message"]
    assert 0 < len(got["recipients"]) < 500 and got["truncated"] == 500 - len(got["recipients"])
    small = {"queue_id": "ABC", "recipients": [{"address": "a@b"}]}
    assert json.loads(showq.message_frame(small)[4:]) == {"message": small}


def test_name_replaced_right_after_binding_is_not_removed(env, monkeypatch):
    # The worst timing of a reload: the newer showq renames its socket over the name
    # before the older one has even looked at it.  The older one must know its own
    # socket by what it bound, not by what the name points to by then.
    store, etc, _ = env
    cfg = load_config(etc)
    path = showq.socket_path(cfg)
    stop = threading.Event()
    real = showq.listen

    def listen_then_replaced(p):
        got = real(p)
        newer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        newer.bind(p + ".newer")
        os.rename(p + ".newer", p)
        stop.set()
        return got
    monkeypatch.setattr(showq, "listen", listen_then_replaced)
    t = threading.Thread(target=showq.serve, args=(cfg, stop), daemon=True)
    t.start()
    t.join(WAIT)
    assert not t.is_alive()
    assert stat.S_ISSOCK(os.lstat(path).st_mode)     # the newer socket is still there
    os.unlink(path)


def test_a_replaced_socket_is_left_to_its_new_owner(env):
    """After a reload the new showq binds the name while the old one drains:
    the old one must not remove the new socket when it exits."""
    store, etc, _ = env
    cfg = load_config(etc)
    path = showq.socket_path(cfg)
    old = Running(cfg).__enter__()
    first = os.stat(path).st_ino
    new = Running(cfg)
    # The new service replaces the name atomically.
    new.thread.start()
    deadline = time.monotonic() + WAIT
    while os.stat(path).st_ino == first:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    old.__exit__(None, None, None)
    assert os.path.exists(path)
    assert list(showq.query(store.queue_directory, timeout=WAIT)) == []
    new.__exit__(None, None, None)
    assert not os.path.exists(path)


def test_master_plans_showq_with_and_without_master_cf_entry(tmp_path):
    from postwell.config.main import Config
    from postwell.config.master import parse_master_cf
    from postwell.log import NullLog
    from postwell.master import services as sv
    from postwell.master.daemon import Master
    m = Master(str(tmp_path))
    m.log = NullLog("master")
    with_entry = Config(str(tmp_path), {}, {}, parse_master_cf(
        "qmgr unix n - n 300 1 qmgr\n"
        "showq unix n - n - - showq -o syslog_name=postfix/sq\n"))
    plan = sv.plan_services(with_entry.services)
    assert plan.showq is not None and plan.showq.name == "showq" and not plan.unsupported
    slots = m._make_slots(with_entry, {}, warn=True)
    [slot] = [s for s in slots if s.kind == "showq"]
    assert slot.command == "showq" and slot.config.get("syslog_name") == "postfix/sq"
    assert not [ln for ln in m.log.lines if "warning" in ln]
    without = Config(str(tmp_path), {}, {}, parse_master_cf("qmgr unix n - n 300 1 qmgr\n"))
    assert [s.kind for s in m._make_slots(without, {}, warn=True)].count("showq") == 1


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run as another user")
def test_running_instance_answers_unprivileged_mailq(postwell):
    """A user who cannot read the queue runs ``python -m postwell.cli.postqueue -p``
    against a running instance and gets the listing through showq."""
    import pwd
    import subprocess
    nobody = pwd.getpwnam("nobody")
    import postwell as pkg
    store = QueueStore(str(postwell.queue_dir))
    qid = put(store, "s1@x.test", ["a@far.test"], queue="hold")
    os.chown(store.path("hold", qid), postwell.uid, postwell.gid)   # as cleanup would have made it
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(pkg.__file__)))

    def as_nobody():
        os.setgroups([])
        os.setgid(nobody.pw_gid)
        os.setuid(nobody.pw_uid)

    def run(python, *args):
        return subprocess.run([python, *args], capture_output=True, text=True, timeout=60,
                              preexec_fn=as_nobody, env=env, cwd="/")
    # An interpreter the user may run (the test's own may live in a private home).
    for python in (sys.executable, "/usr/bin/python3"):
        try:
            if run(python, "-c", "import postwell.cli.postqueue").returncode == 0:
                break
        except OSError:
            continue
    else:
        pytest.skip("no Python interpreter usable by nobody")
    cp = run(python, "-m", "postwell.cli.postqueue", "-p", "-c", str(postwell.config_dir))
    assert cp.returncode == 0, cp.stderr
    lines = cp.stdout.split("\n")
    assert lines[0] == postqueue.HEADER and lines[1].startswith(qid + "!")
    assert "s1@x.test" in lines[1] and lines[-2] == "-- 0 Kbytes in 1 Request."


if os.geteuid() == 0:
    from test_issue3_local_e2e import e2e_users, site  # noqa: E402,F401 (fixtures)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create real users")
def test_unprivileged_listing_matches_roots(site, e2e_users):
    """Every queue (maildrop too) as a user sees it through showq is what root
    sees reading the queue itself; sendmail -bp and postqueue -j likewise."""
    from test_issue3_local_e2e import queued_id
    from test_issue3_tools_e2e import closed_port, relay_params, run_as, wait_deferred
    from test_sendmail import run as run_sendmail
    s = site(relay_params(closed_port()), pickup=False)
    d = queued_id(s.smtp(["a@far.test", "b@far.test"], sender="s1@remote.test"))
    h = queued_id(s.smtp(["c@far.test"], sender=""))
    wait_deferred(s, d)
    wait_deferred(s, h)
    assert s.inst.run("postsuper", "-h", h).returncode == 0
    rc, _, err = run_sendmail(["-C", str(s.inst.config_dir), "x@far.test"], b"Subject: md\n\nhi\n",
                              user="pwe2")
    # No pickup service here: Postfix's postdrop warns about the missing trigger.
    assert (rc, err) == (0, b"postdrop: warning: unable to look up public/pickup: No such file or directory\n")
    conf = str(s.inst.config_dir)
    for args in (["-p"], ["-j"]):
        rc, mine, err = run_as("pwe1", postqueue.main, ["-c", conf, *args])
        assert (rc, err) == (0, "")
        root = io.StringIO()
        cfg = load_config(conf)
        assert postqueue.show_queue(cfg, QueueStore(cfg.get("queue_directory")), args[0][1], root) == 0
        assert mine == root.getvalue()
    listed = [json.loads(x) for x in mine.splitlines()]
    assert [m["queue_name"] for m in listed] == ["maildrop", "deferred", "hold"]
    assert listed[1]["queue_id"] == d and listed[2]["queue_id"] == h
    from postwell.cli import sendmail
    rc, out, err = run_as("pwe3", sendmail.main, ["-C", conf, "-bp"])
    assert rc == 0 and out.startswith(postqueue.HEADER + "\n") and "-- 0 Kbytes in 3 Requests." in out


# ------------------------------------------------- the fast listing (issue 8)
# The listing reads queue files with its own lean parser (queue/format.py
# read_listing, listing_envelope, defer_reasons) and renders in chunks.  The
# oracles below are the straightforward versions built on the store's full
# parser; the fast code must list and refuse exactly what they do, byte for byte.

from postwell.queue import format as qf  # noqa: E402


def oracle_collect(store):
    for qname in showq.SHOW_QUEUES:
        if qname == "maildrop":
            yield from showq.collect_maildrop(store)
            continue
        for qid in store.scan(qname):
            try:
                qm = store.open(qid, qname, writable=False)
            except Exception:
                continue
            with qm:
                expired = bool(os.fstat(qm._fd).st_mode & stat.S_IXGRP)
                reasons = {e.get("recipient", ""): e.get("reason", "") for e in store.read_defer_log(qid)}
                rcpts = []
                for r in qm.pending_recipients:
                    item = {"address": r.address}
                    if r.address in reasons:
                        item["delay_reason"] = reasons[r.address]
                    rcpts.append(item)
                yield {"queue_name": qname, "queue_id": qid, "arrival_time": int(qm.arrival_time),
                       "message_size": qm.content_size, "forced_expire": expired,
                       "sender": qm.sender or "MAILER-DAEMON", "recipients": rcpts}


def oracle_listing(messages) -> str:
    out, count, total = [], 0, 0
    for m in messages:
        if not count:
            out.append(postqueue.HEADER)
        count += 1
        total += m["message_size"]
        stamp = time.strftime("%a %b %d %H:%M:%S", time.localtime(m["arrival_time"]))
        id_mark = (m["queue_id"] + postqueue.STATUS_CHAR.get(m["queue_name"], "")
                   + ("#" if m.get("forced_expire") else ""))
        out.append(f"{id_mark:<11}{m['message_size']:>8} {stamp:<20} {m['sender']}")
        last = ""
        for r in m["recipients"]:
            reason = r.get("delay_reason", "")
            if reason != last:
                out.append(f"{'(' + (reason or 'reason unavailable') + ')':>78}")
            last = reason
            out.append(f"{'':41}{r['address']}")
        out.append("")
    if not count:
        return "Mail queue is empty\n"
    return "\n".join(out) + f"\n-- {total // 1024} Kbytes in {count} Request{'' if count == 1 else 's'}.\n"


def varied_queue(store):
    """Messages of every shape the listing meets; returns their ids."""
    ids = []
    ids.append(put(store, "s1@x.test", ["a@far.test", "b@far.test", "c@far.test"]))
    store.append_defer_log(ids[-1], "a@far.test", "4.4.1", "connect refused")
    store.append_defer_log(ids[-1], "c@far.test", "4.4.1", "connect refused")
    store.append_defer_log(ids[-1], "a@far.test", "4.4.2", "line one\nline two \\ backslash")
    ids.append(put(store, "", ["bounce@far.test"], queue="hold"))
    ids.append(put(store, "big@x.test", ["r@far.test"], body=b"x" * 70000))       # envelope past the first read
    m = store.create()
    m.set_sender("many@x.test", ret="HDRS", envid="e1")
    m.set_attribute("client_name", "mx.example.test")
    for i in range(300):                                                         # envelope > 4096 bytes
        m.add_recipient(f"user{i}@far.test", orig=f"o{i}@far.test", orcpt=f"rfc822;o{i}@far.test",
                        notify="FAILURE")
    m.write(b"Subject: many\n\nbody\n")
    m.commit()
    store.move(m.queue_id, "incoming", "active")
    ids.append(m.queue_id)
    ids.append(put(store, "s\udcff8bit@x.test", ["caf\u00e9@far.test", "r\udce9@far.test"]))   # bytes not UTF-8
    done = put(store, "s2@x.test", ["x1@far.test", "x2@far.test"], queue="incoming")
    with store.open(done) as q:
        q.mark_done(["x1@far.test"])
    ids.append(done)
    finished = put(store, "s4@x.test", ["y@far.test"], queue="active")               # nothing pending
    with store.open(finished) as q:
        q.mark_done(["y@far.test"])
    ids.append(finished)
    held = put(store, "s3@x.test", ["h@far.test"], queue="hold")
    store.append_defer_log(held, "h@far.test", "4.4.1", "deferred before the hold")
    os.chmod(store.path("hold", held), 0o710)                                    # postsuper -e mark
    ids.append(held)
    return ids


@pytest.fixture
def utc(monkeypatch):
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_fast_collect_matches_the_full_parser(env, utc):
    store, _, _ = env
    varied_queue(store)
    got = list(showq.collect(store))
    assert got == list(oracle_collect(store))
    assert [m["queue_name"] for m in got] == ["active", "active", "incoming", "deferred", "deferred",
                                               "deferred", "hold", "hold"]
    assert [] in [m["recipients"] for m in got]
    text = postqueue.format_listing(got)
    assert text == oracle_listing(got)
    # The same bytes in any chunking, and through the -j path.
    for chunk in (1, 2, 3, 1000):
        assert "".join(postqueue.iter_listing(iter(got), chunk=chunk)) == text
        assert "".join(postqueue.iter_json(iter(got), chunk=chunk)) == "".join(
            json.dumps(m) + "\n" for m in got)
    assert "(line one\nline two \\ backslash)" in text
    assert postqueue.format_listing([]) == "Mail queue is empty\n"


def test_fast_collect_skips_what_is_not_a_message(env):
    store, _, _ = env
    good = put(store, "s@x.test", ["a@far.test"])
    d = store.path("deferred")
    # No complete marker (being written, or a crash before the fchmod).
    half = put(store, "s@x.test", ["b@far.test"])
    os.chmod(os.path.join(d, half), 0o600)
    # A symlink, a FIFO (must not block the listing) and a directory, named like ids.
    os.symlink(os.path.join(d, good), os.path.join(d, "ABCDEF1"))
    os.mkfifo(os.path.join(d, "ABCDEF2"), 0o700)
    os.mkdir(os.path.join(d, "ABCDEF3"), 0o700)
    # Names that are not ids, and a truncated file.
    with open(os.path.join(d, "notanid"), "wb") as f:
        f.write(b"x")
    cut = put(store, "s@x.test", ["c@far.test"])
    with open(os.path.join(d, cut), "r+b") as f:
        f.truncate(os.path.getsize(os.path.join(d, cut)) - 1)
    # A defer log for a message that is gone.
    store.append_defer_log("ABCDEF9", "z@far.test", "4.4.1", "gone")
    got = list(showq.collect(store))
    assert [m["queue_id"] for m in got] == [good]
    assert got == list(oracle_collect(store))


def test_expire_bit_is_postsupers():
    from postwell.qmgr.expire import EXPIRE_BIT
    assert showq._EXPIRE_BIT == EXPIRE_BIT


def _envelope(records):
    return b"".join(qf.pack_record(t, p) for t, p in records)


def test_listing_envelope_refuses_what_parse_envelope_refuses():
    import random
    rng = random.Random(8)
    base = [(b"S", b"s@x.test"), (b"P", b"ret\0HDRS"), (b"A", b"client_name\0mx"),
            (b"R", b"-a@far.test\0\0\0"), (b"R", b"Db@far.test\0o\0rfc822;b\0NEVER"),
            (b"R", b"-c@far.test\0\0\0"), (b"E", b"")]
    valid = _envelope(base)

    def both(data):
        try:
            env = qf.parse_envelope(data, 0)
            want = (env.sender, [r.address for r in env.recipients if not r.done])
        except qf.CorruptQueueFile:
            want = "corrupt"
        try:
            got = qf.listing_envelope(data)
        except qf.CorruptQueueFile:
            got = "corrupt"
        assert got == want, data
        return got

    assert both(valid) == ("s@x.test", ["a@far.test", "c@far.test"])
    cases = [
        b"", valid[:-1], valid + b"x", _envelope(base[:-1]),
        _envelope([(b"E", b"")]), _envelope([(b"S", b"a"), (b"S", b"b"), (b"E", b"")]),
        _envelope([(b"S", b""), (b"R", b""), (b"E", b"")]),
        _envelope([(b"S", b""), (b"R", b"-"), (b"E", b"")]),
        _envelope([(b"S", b""), (b"R", b"-\0\0\0"), (b"E", b"")]),
        _envelope([(b"S", b""), (b"R", b"xa\0\0\0"), (b"E", b"")]),
        _envelope([(b"S", b""), (b"R", b"-a\0\0\0\0"), (b"E", b"")]),
        _envelope([(b"S", b""), (b"R", b"-a\0\0"), (b"E", b"")]),
        _envelope([(b"S", b""), (b"A", b"noseparator"), (b"E", b"")]),
        _envelope([(b"S", b""), (b"Q", b"x\0y"), (b"E", b"")]),
        _envelope([(b"S", b""), (b"E", b"x")]),
        _envelope([(b"S", b""), (b"E", b""), (b"E", b"")]),
        _envelope([(b"S", b"")]) + b"R\xff\xff\xff\x7f",
    ]
    for c in cases:
        both(c)
    # Random damage to a valid envelope: flipped bytes, cuts, splices.
    for _ in range(3000):
        data = bytearray(valid)
        for _ in range(rng.randint(1, 3)):
            op = rng.randrange(3)
            if op == 0 and data:
                data[rng.randrange(len(data))] = rng.choice(b"\0-DSRPAEQ\x01\xffa")
            elif op == 1 and data:
                at = rng.randrange(len(data))
                del data[at:at + rng.randint(1, 8)]
            else:
                at = rng.randrange(len(data) + 1)
                data[at:at] = bytes(rng.choice(b"\0-RSE") for _ in range(rng.randint(1, 4)))
        both(bytes(data))


def test_defer_reasons_match_the_log_parser():
    import random
    rng = random.Random(3)

    def both(data):
        want = {}
        for e in qf.parse_log_entries(data):
            want[e.get("recipient", "")] = e.get("reason", "")
        assert qf.defer_reasons(data) == want, data

    entry = qf.pack_log_entry({"recipient": "a@far.test", "orig_rcpt": "", "status": "4.4.1",
                               "action": "delayed", "reason": "x\\y\nz\r", "time": "1"})
    other = qf.pack_log_entry({"recipient": "b@far.test", "reason": "second"})
    for data in (b"", entry, entry + other, entry[:-1], entry[:-2], entry + entry.replace(b"x", b"q"),
                 b"\n\n" + entry, b"reason=no recipient\n\n", b"recipient=r\n\n", b"recipient\n\n",
                 b"recipient=a=b\nreason=c=d\n\n", b"reason=\xff\xfe\nrecipient=\xc3\xa9\n\n",
                 b"recipient=a\nrecipient=b\nreason=1\nreason=2\n\n", b"junk\n\n", b"re\n\n"):
        both(data)
    alphabet = b"recipient=reason\\n\n\xff"
    for _ in range(2000):
        data = bytearray(entry + other)
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(len(data))
            if rng.random() < 0.5:
                data[at] = rng.choice(alphabet)
            else:
                del data[at]
        both(bytes(data))


def test_read_listing_matches_queued_message(env):
    store, _, _ = env
    for qid in varied_queue(store):
        qname = store.find(qid)
        fd = os.open(store.path(qname, qid), os.O_RDONLY)
        try:
            arrival, size, sender, rcpts = qf.read_listing(fd, os.fstat(fd).st_size)
        finally:
            os.close(fd)
        with store.open(qid, qname, writable=False) as qm:
            assert (arrival, size, sender, rcpts) == (
                qm.header.arrival_us, qm.content_size, qm.sender, [r.address for r in qm.pending_recipients])
    # A header that disagrees with the file size is refused, as by the store.
    fd = os.open(store.path(store.find(qid), qid), os.O_RDONLY)
    try:
        with pytest.raises(qf.CorruptQueueFile):
            qf.read_listing(fd, os.fstat(fd).st_size + 1)
    finally:
        os.close(fd)


@pytest.mark.skipif(not hasattr(os, "O_NOATIME"), reason="O_NOATIME is Linux only")
def test_listing_leaves_atimes_alone(env):
    """mailq reads every queue file and defer log: it must not dirty their
    inodes (relatime would update an atime older than the mtime)."""
    store, _, _ = env
    qid = put(store, "s@x.test", ["a@far.test"])
    store.append_defer_log(qid, "a@far.test", "4.4.1", "refused")
    paths = [store.path("deferred", qid), store.path("defer", qid)]
    for p in paths:
        st = os.stat(p)
        os.utime(p, ns=(st.st_mtime_ns - 10**9, st.st_mtime_ns))
    before = [os.stat(p).st_atime_ns for p in paths]
    got = list(showq.collect(store))
    assert got[0]["recipients"] == [{"address": "a@far.test", "delay_reason": "refused"}]
    assert [os.stat(p).st_atime_ns for p in paths] == before


def test_files_of_another_owner_are_still_listed(env, monkeypatch):
    """O_NOATIME is refused (EPERM) to a reader who does not own the files:
    the listing then opens them the plain way."""
    store, _, _ = env
    qid = put(store, "s@x.test", ["a@far.test"])
    store.append_defer_log(qid, "a@far.test", "4.4.1", "refused")
    real_open = os.open
    tried = []

    def picky_open(path, flags, *a, **kw):
        if flags & showq._NOATIME:
            tried.append(path)
            raise PermissionError(1, "Operation not permitted")
        return real_open(path, flags, *a, **kw)
    monkeypatch.setattr(showq, "_NOATIME", os.O_NONBLOCK << 8 if not showq._NOATIME else showq._NOATIME)
    monkeypatch.setattr(os, "open", picky_open)
    got = list(showq.collect(store))
    monkeypatch.undo()
    assert [m["queue_id"] for m in got] == [qid] and tried
    assert got[0]["recipients"] == [{"address": "a@far.test", "delay_reason": "refused"}]


def test_frames_survive_any_split():
    """The client reads frames in large pieces: frames cut anywhere by the
    stream (one byte at a time, or larger than one read) come out whole."""
    import random
    rng = random.Random(5)
    objs = [{"message": {"queue_id": f"A{i}", "recipients": [{"address": "x" * rng.randrange(0, 3000)}]}}
            for i in range(60)] + [{"end": 60}]
    wire = b"".join(showq._frame(o) for o in objs)
    a, b = socket.socketpair()
    b.settimeout(WAIT)

    def send():
        pos = 0
        while pos < len(wire):
            n = rng.choice([1, 2, 3, 5, 4096, 70000])
            a.sendall(wire[pos:pos + n])
            pos += n
        a.close()
    t = threading.Thread(target=send)
    t.start()
    frames = showq._Frames(b)
    frames.RECV = 1000   # smaller than some frames
    got = [json.loads(frames.next()) for _ in objs]
    with pytest.raises(EOFError):
        frames.next()
    t.join(WAIT)
    b.close()
    assert got == objs


def test_listing_in_many_writes(env, monkeypatch):
    store, etc, _ = env
    cfg = load_config(etc)
    for i in range(40):
        put(store, f"s{i}@x.test", [f"r{i}@far.test", f"q{i}@far.test"])
    monkeypatch.setattr(showq, "SEND_BUFFER", 300)
    with Running(cfg):
        got = list(showq.query(store.queue_directory, timeout=WAIT))
    assert got == list(showq.collect(store)) and len(got) == 40


def test_size_attribute_is_cleanups():
    from postwell.cleanup.recsize import SIZE_ATTRIBUTE
    assert SIZE_ATTRIBUTE == qf.SIZE_ATTRIBUTE


def test_listing_shows_postfix_size(env):
    """The size column is Postfix's (cleanup's postwell_size attribute); a file written
    without it (an older postwell) shows its content length; so does a bad value."""
    store, _, _ = env

    def put_sized(value, body=b"x" * 100):
        m = store.create()
        m.set_sender("s@x.test")
        m.set_attribute("client_name", "c")
        if value is not None:
            m.set_attribute("postwell_size", value)
        m.set_attribute("postwell_hold", "0")
        m.add_recipient("a@far.test")
        m.write(body)
        m.commit()
        store.move(m.queue_id, "incoming", "deferred")
        return m.queue_id
    sized, plain, bad = put_sized("311"), put_sized(None), put_sized("3x1")
    big = put_sized("70007", body=(b"y" * 99 + b"\n") * 700)     # envelope past the first read
    got = {m["queue_id"]: m["message_size"] for m in showq.collect(store)}
    assert got == {sized: 311, plain: 100, bad: 100, big: 70007}
    text = postqueue.format_listing(list(showq.collect(store)))
    assert re.search(rf"^{sized}\s+311 ", text, re.M)
