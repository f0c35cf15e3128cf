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
    # Postfix 3.7's words (postqueue.c show_queue) and EX_UNAVAILABLE.
    assert out == ""
    assert err == ("postqueue: fatal: Queue report unavailable - mail system is down "
                   "(Connect to the public showq service: No such file or directory)\n")
    # A stale socket nobody listens on: the same answer.
    s = socket.socket(socket.AF_UNIX)
    s.bind(os.path.join(store.queue_directory, "public", "showq"))
    s.close()
    assert postqueue.main(["-c", etc, "-j"]) == 69
    assert "mail system is down (Connect to the public showq service: Connection refused)" \
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
    assert (rc, err) == (0, b"")
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
