"""Code that runs on several threads of one process at once, sharing objects.

local(8)'s root helper serves each qmgr connection on a thread of its own
with one LocalAgent and one set of shared tables; an unprivileged qmgr runs
local(8) expansions on its executor threads and virtual(8) writes big mail on
its mailbox threads.  Each test here hammers one shared object from several
threads and checks that every thread got its own result (the first ones
failed before their fix):

- mbox appends: fcntl locks belong to the process, so two threads appended
  into each other's message, and a failed append's undo cut another thread's
  message short (virtual.deliver_mbox, also local(8)'s mailbox and /file);
- a command's working directory was entered with chdir() by the calling
  thread, which moves the whole process (local._command_in_dir);
- LocalAgent's parts made on first use (alias maps, resolver) were made once
  per racing thread, each logging its start-up warnings;
- guards: every other table type, get_table()'s cache, and the alias
  lookups of a trace expansion (the CI case, end to end) under threads.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time

import pytest

from postwell.config.main import Config
from postwell.delivery import local as local_mod
from postwell.delivery.base import DeliveryRequest, Recipient
from postwell.delivery.local import AliasMaps, LocalAgent
from postwell.delivery.local_exec import LocalCopy, op_file
from postwell.delivery.virtual import Delivery, deliver_mbox
from postwell.log import NullLog
from postwell.tables import clear_cache, get_table, open_table

from test_tables import _build

HOST = "mx.example.test"
JOIN = 60          # seconds: the most any thread of these tests may take


def _run_threads(target, n: int) -> list:
    """``target(i)`` on n threads started together; their exceptions."""
    errors: list = []
    start = threading.Barrier(n)

    def run(i):
        try:
            start.wait(JOIN)
            target(i)
        except BaseException as exc:   # noqa: BLE001 - reported by the caller
            errors.append(repr(exc))
    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(JOIN)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    return errors


# ------------------------------------------------------------------ mbox

LINES = 4000       # ~330 KB per message: several 64 KiB writes each


def _body(i: int) -> bytes:
    line = (f"line of message {i} " + "y" * 60 + "\n").encode()
    return b"Subject: m%d\n\n" % i + line * LINES


def _chunks(data: bytes):
    """Content in 64 KiB pieces, with a pause after each: the other threads
    get their turn in the middle of a message, as a slow disk gives it."""
    def gen():
        for j in range(0, len(data), 65536):
            yield data[j:j + 65536]
            time.sleep(0.002)
    return gen


def _messages(path) -> dict[int, int]:
    """message number -> its line count, for each message of an mbox; a
    message holding lines of two others counts as -1."""
    with open(path, "rb") as f:
        data = f.read()
    out = {}
    for part in data.split(b"\n\nFrom "):
        ids = [int(line.split()[3]) for line in part.split(b"\n")
               if line.startswith(b"line of message ")]
        if not ids:
            continue
        if len(set(ids)) != 1:
            out[-len(out) - 1] = -1
            continue
        out[ids[0]] = len(ids)
    return out


def _virtual_copy(path, locks) -> Delivery:
    return Delivery(path=str(path), maildir=False, uid=0, gid=0, sender="s@remote.test",
                    recipient="r@example.test", orig="", limit=0, lock_methods=locks,
                    hostname="host")


@pytest.mark.parametrize("locks", [["fcntl"], ["fcntl", "dotlock"]])
def test_mbox_appends_of_threads_take_turns(tmp_path, locks):
    """virtual(8)'s mailbox threads (an unprivileged qmgr's big mail): whole
    messages, one after the other, whatever the lock methods."""
    box = tmp_path / "box"
    errors = _run_threads(lambda i: deliver_mbox(_virtual_copy(box, locks), _chunks(_body(i))), 6)
    assert errors == []
    assert _messages(box) == {i: LINES for i in range(6)}


def test_local_file_destination_appends_take_turns(tmp_path):
    """local(8)'s /file destinations lock with fcntl only (no dotlock): the
    threads of an unprivileged qmgr appending to one file take turns."""
    box = tmp_path / "file"

    def one(i):
        copy = LocalCopy(path=str(box), maildir=False, sender="s@remote.test",
                         recipient=f"r{i}@example.test", orig="", delivered="", limit=0,
                         lock_methods=["fcntl"], hostname="host", want_orig=False,
                         want_delivered=False)
        res = op_file(copy, _chunks(_body(i)))
        assert res["status"] == "sent", res
    assert _run_threads(one, 6) == []
    assert _messages(box) == {i: LINES for i in range(6)}


def test_a_failed_append_undoes_only_itself(tmp_path):
    """A failed append truncates the mailbox to where it started: with two
    threads at once that cut off the message the other one appended."""
    box = tmp_path / "box"
    second_writing = threading.Event()
    errors = []

    def failing():
        yield b"Subject: broken\n\nline of message 0 " + b"z" * 60 + b"\n"
        # Give the other thread every chance to append meanwhile (it cannot
        # with the fix: the wait then times out), then fail.
        second_writing.wait(0.5)
        time.sleep(0.05)
        raise OSError(5, "Input/output error")

    def first():
        try:
            deliver_mbox(_virtual_copy(box, ["fcntl"]), failing)
        except OSError as exc:
            errors.append(exc.errno)

    def second_content():
        second_writing.set()
        return iter([_body(1)])

    t1 = threading.Thread(target=first, daemon=True)
    t1.start()
    deadline = time.monotonic() + 10
    while not box.exists() or box.stat().st_size == 0:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    t2 = threading.Thread(target=lambda: deliver_mbox(_virtual_copy(box, ["fcntl"]),
                                                      second_content), daemon=True)
    t2.start()
    t1.join(JOIN)
    t2.join(JOIN)
    assert not t1.is_alive() and not t2.is_alive()
    assert errors == [5]
    assert _messages(box) == {1: LINES}


def test_mailbox_turns_are_forgotten_when_unused(tmp_path):
    """Bounded memory: one entry per mailbox only while a thread is at it."""
    from postwell.delivery import virtual
    for i in range(20):
        deliver_mbox(_virtual_copy(tmp_path / f"box{i}", ["fcntl"]), _chunks(_body(i)[:200]))
    assert not [k for k in virtual._mailbox_turns if k.startswith(str(tmp_path))]


# ------------------------------------------------------------------ commands

def _command_copy() -> LocalCopy:
    return LocalCopy(path="", maildir=False, sender="s@remote.test", recipient="r@example.test",
                     orig="", delivered="", limit=0, lock_methods=[], hostname="host",
                     want_orig=False, want_delivered=False)


def test_command_directory_check_leaves_the_process_where_it_was(tmp_path):
    """An unprivileged qmgr runs this on an executor thread: a chdir() there
    moved every thread of the qmgr (the working directory is per process)."""
    here = os.getcwd()
    work = tmp_path / "work"
    work.mkdir()
    out = tmp_path / "out"
    env = {"PATH": "/usr/bin:/bin"}
    seen = {}

    def run():
        seen["res"] = local_mod._command_in_dir(f"/bin/sh -c 'pwd > {out}'", env, str(work), 30,
                                                "", _command_copy(), lambda: iter([b"x\n"]),
                                                True)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(JOIN)
    assert seen["res"]["status"] == "sent", seen
    assert os.getcwd() == here
    # ... while the command itself still runs in the directory.
    assert out.read_text().strip() == str(work)


@pytest.mark.parametrize("kind, text", [("missing", "No such file or directory"),
                                        ("file", "Not a directory")])
def test_unreachable_command_directory_is_reported_as_chdir_would(tmp_path, kind, text):
    path = tmp_path / "dir"
    if kind == "file":
        path.write_text("")
    env = {"PATH": "/usr/bin:/bin"}
    res = local_mod._command_in_dir("true", env, str(path), 30, "", _command_copy(),
                                    lambda: iter([b"x\n"]), True)
    assert res == {"status": "deferred", "dsn": "4.3.0",
                   "reason": f"mail system configuration error: cannot change directory to "
                             f"{path}: {text}"}
    # Not strict (no command_execution_directory): the command runs in / instead.
    res = local_mod._command_in_dir("true", env, str(path), 30, "", _command_copy(),
                                    lambda: iter([b"x\n"]), False)
    assert res["status"] == "sent", res


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to be another user")
def test_command_directory_the_user_cannot_enter(tmp_path):
    """In the user's forked child: the check is made with the user's rights."""
    from postwell.delivery.local_exec import Identity, run_as
    path = tmp_path / "private"
    path.mkdir(mode=0o700)
    os.chmod(tmp_path, 0o755)
    env = {"PATH": "/usr/bin:/bin"}
    res = run_as(Identity(65534, 65534, "nobody"), local_mod._command_in_dir, "true", env,
                 str(path), 30, "", _command_copy(), lambda: iter([b"x\n"]), True)
    assert res["status"] == "deferred"
    assert res["reason"].endswith(f"cannot change directory to {path}: Permission denied")


# ------------------------------------------------------------------ the agent's lazy parts

def _agent(tmp_path, params=None) -> LocalAgent:
    p = {"myhostname": HOST, "mydomain": "example.test", "mydestination": HOST,
         "queue_directory": str(tmp_path / "queue"), "message_size_limit": "10240000",
         "alias_maps": f"regexp:{tmp_path}/re, texthash:{tmp_path}/aliases"}
    p.update(params or {})
    (tmp_path / "aliases").write_text("a1: b1\n")
    return LocalAgent(Config(str(tmp_path), p, {}, []), NullLog("local"), helper_socket="")


def test_agent_parts_are_made_once_for_racing_threads(tmp_path, monkeypatch):
    agent = _agent(tmp_path)
    real = AliasMaps.__init__

    def slow(self, *a, **kw):
        time.sleep(0.05)     # widens the window in which another thread asks too
        real(self, *a, **kw)
    monkeypatch.setattr(AliasMaps, "__init__", slow)
    got = []
    assert _run_threads(lambda i: got.append(agent.aliases), 8) == []
    assert len({id(x) for x in got}) == 1
    assert agent.log.lines == [f"warning: invalid alias map type: regexp:{tmp_path}/re"]
    # The resolver and mailbox_command_maps likewise.
    got = []
    assert _run_threads(lambda i: got.append(agent.resolver), 8) == []
    assert len({id(x) for x in got}) == 1


# ------------------------------------------------------------------ tables

N_KEYS = 120
VALUES = {f"key{i}": f"value {i} " + "x" * (i % 37 + 1) for i in range(N_KEYS)}


def _hammer(table, keys, expect, threads=6, lookups=600) -> list:
    wrong = []

    def run(seed):
        for n in range(lookups):
            k = keys[(seed * 7 + n * 13) % len(keys)]
            v = table.lookup(k)
            if v != expect(k):
                wrong.append((k, v))
                return
    assert _run_threads(run, threads) == []
    return wrong


def _pattern_source(kind: str) -> str:
    if kind == "cidr":
        return "".join(f"10.0.{i}.0/24 {VALUES[f'key{i}']}\n" for i in range(N_KEYS))
    if kind == "regexp-groups":
        # $N substitutions: regexp re-matches in POSIX mode (the regex module).
        return "/^(key)([0-9]+)$/ $2 value of $1$2\n"
    return "".join(f"/^key{i}$/ {VALUES[f'key{i}']}\n" for i in range(N_KEYS))


@pytest.mark.parametrize("typ", ["regexp", "regexp-groups", "pcre", "cidr", "texthash",
                                 "inline", "sqlite", "static", "unix"])
def test_other_table_types_answer_each_thread(tmp_path, typ):
    """What the indexed tables needed a lock for, the others must not."""
    src = tmp_path / "map"
    keys, expect = list(VALUES), VALUES.get
    if typ in ("regexp", "regexp-groups", "pcre", "cidr"):
        src.write_text(_pattern_source(typ))
        spec = f"{typ.split('-')[0]}:{src}"
        if typ == "regexp-groups":
            expect = (lambda k: f"{k[3:]} value of {k}")
        if typ == "cidr":
            keys = [f"10.0.{i}.9" for i in range(N_KEYS)]
            expect = (lambda k: VALUES[f"key{k.split('.')[2]}"])
    elif typ == "texthash":
        src.write_text("".join(f"{k} {v}\n" for k, v in VALUES.items()))
        spec = f"texthash:{src}"
    elif typ == "inline":
        spec = "inline:{" + ", ".join(f"{{{k}={v}}}" for k, v in VALUES.items()) + "}"
    elif typ == "sqlite":
        db = tmp_path / "db.sqlite"
        with sqlite3.connect(db) as c:
            c.execute("create table t (k text, v text)")
            c.executemany("insert into t values (?, ?)", VALUES.items())
        c.close()
        src.write_text(f"dbpath = {db}\nquery = select v from t where k = '%s'\n")
        spec = f"sqlite:{src}"
    elif typ == "static":
        spec, expect = "static:{same for all}", (lambda k: "same for all")
    else:
        import pwd
        names = sorted({p.pw_name for p in pwd.getpwall()})[:40]
        spec, keys = "unix:passwd.byname", names
        expect = (lambda k: ":".join(str(x) for x in pwd.getpwnam(k)[:7]))
    table = open_table(spec)
    try:
        assert _hammer(table, keys, expect) == []
    finally:
        table.close()


def test_get_table_opens_a_table_once_for_racing_threads(tmp_path):
    src = tmp_path / "map"
    _build("hash", src, "".join(f"{k} {v}\n" for k, v in VALUES.items()))
    clear_cache()
    try:
        got = []
        assert _run_threads(lambda i: got.append(get_table(f"hash:{src}")), 8) == []
        assert len({id(t) for t in got}) == 1
        assert _hammer(got[0], list(VALUES), VALUES.get) == []
    finally:
        clear_cache()


def test_slow_open_holds_up_no_other_table(tmp_path, monkeypatch):
    """A thread re-reading a big changed texthash (or opening any table) must
    not make the other threads wait for tables already open."""
    from postwell.tables import text
    fast, slow = tmp_path / "fast", tmp_path / "slow"
    fast.write_text("a b\n")
    slow.write_text("c d\n")
    inside, release = threading.Event(), threading.Event()
    real = text.TexthashTable.__init__

    def opening(self, spec, name, warn=None):
        if name == str(slow):
            inside.set()
            release.wait(JOIN)
        real(self, spec, name, warn)
    monkeypatch.setattr(text.TexthashTable, "__init__", opening)
    clear_cache()
    try:
        table = get_table(f"texthash:{fast}")
        opener = threading.Thread(target=get_table, args=(f"texthash:{slow}",), daemon=True)
        opener.start()
        assert inside.wait(JOIN)
        got = []
        reader = threading.Thread(target=lambda: got.append(get_table(f"texthash:{fast}")),
                                  daemon=True)
        reader.start()
        reader.join(5)
        waited = reader.is_alive()
        release.set()
        opener.join(JOIN)
        reader.join(JOIN)
        assert not waited, "get_table() of an open table waited for another table's open"
        assert got == [table]
    finally:
        release.set()
        clear_cache()


def test_rebuilt_table_is_reopened_while_threads_look_up(tmp_path):
    """postmap renames a new index into place while lookups run: each answer
    is the old or the new value, never an error or another key's value."""
    src = tmp_path / "map"
    _build("hash", src, "".join(f"{k} {v}\n" for k, v in VALUES.items()))
    new = {k: v + " new" for k, v in VALUES.items()}
    clear_cache()
    try:
        table = get_table(f"hash:{src}")
        stop = threading.Event()
        wrong = []

        def look(seed):
            n = 0
            while not stop.is_set() and n < 20000:
                k = f"key{(seed * 7 + n * 13) % N_KEYS}"
                v = table.lookup(k)
                if v not in (VALUES[k], new[k]):
                    wrong.append((k, v))
                    return
                n += 1
        threads = [threading.Thread(target=look, args=(i,), daemon=True) for i in range(4)]
        for t in threads:
            t.start()
        for _ in range(5):
            _build("hash", src, "".join(f"{k} {v}\n" for k, v in new.items()))
            time.sleep(0.02)
        stop.set()
        for t in threads:
            t.join(JOIN)
        assert wrong == []
        assert table.lookup("key5") == new["key5"]
    finally:
        clear_cache()


@pytest.mark.parametrize("typ", ["hash", "lmdb"])
def test_trace_expansions_on_threads_report_their_own_alias(tmp_path, typ):
    """The CI case end to end: one LocalAgent, expansions on many threads at
    once (as in the root helper), each reports the alias it looked up."""
    from postwell.tables.aliases import build_aliases
    aliases = tmp_path / "aliases"
    aliases.write_text("".join(f"al{i}: |/bin/echo {i} {'x' * (i % 41 + 1)}\n" for i in range(100)))
    build_aliases(typ, str(aliases))
    clear_cache()
    try:
        agent = _agent(tmp_path, {"alias_maps": f"{typ}:{aliases}"})
        wrong = []

        def run(seed):
            for n in range(150):
                i = (seed * 11 + n * 7) % 100
                rc = Recipient(f"al{i}@{HOST}")
                req = DeliveryRequest(queue_id="ABC", sender="s@remote.test", recipients=[rc],
                                      transport="local", nexthop=HOST, arrival_time=0.0,
                                      open_content=lambda: iter([b"\n"]),
                                      attributes={"postwell_verify": "mta"})
                (res,) = agent.probe(req)
                reasons = [p.reason for p in res.expanded]
                if reasons != [f"aliased to |/bin/echo {i} {'x' * (i % 41 + 1)}"]:
                    wrong.append((i, reasons))
                    return
        assert _run_threads(run, 6) == []
        assert wrong == []
    finally:
        clear_cache()


# ------------------------------------------------------------------ the root helper, end to end

SYSEXITS_TEXT = {64: "command line usage error", 65: "data format error", 66: "cannot open input",
                 67: "user unknown", 68: "host name unknown", 69: "service unavailable",
                 70: "internal software error", 71: "system resource problem",
                 72: "critical OS file missing", 73: "can't create user output file",
                 74: "input/output error", 75: "temporary failure", 76: "remote error in protocol",
                 77: "permission denied", 78: "local configuration error"}


@pytest.mark.skipif(os.geteuid() != 0, reason="the helper runs commands as default_privs")
def test_helper_threads_answer_each_request_with_its_own_aliases(tmp_path):
    """serve_unix_threaded() with local_helper's request handling, several qmgr
    connections at once: every reply is the expansion of its own request's
    alias (each alias a command with its own exit status, values of many
    lengths), never another connection's -- the CI case, through the helper."""
    import json
    import socket

    from postwell.delivery import helper, local_helper
    from postwell.queue import QueueStore
    from postwell.tables.aliases import build_aliases

    aliases = tmp_path / "aliases"
    codes = {i: 64 + i % 15 for i in range(45)}
    aliases.write_text("".join(f"al{i}: \"|/bin/sh -c 'exit {c}' pad{'x' * (i % 23)}\"\n"
                              for i, c in codes.items()))
    build_aliases("hash", str(aliases))
    store = QueueStore(str(tmp_path / "queue"))
    store.ensure_layout()
    msg = store.create()
    msg.set_sender("s@remote.test")
    msg.add_recipient(f"al0@{HOST}")
    msg.write(b"Subject: x\n\nbody\n")
    msg.commit()
    store.move(msg.queue_id, "incoming", "active")
    clear_cache()
    agent = _agent(tmp_path, {"alias_maps": f"hash:{aliases}", "command_time_limit": "30s"})
    log = NullLog("local")
    path = str(tmp_path / "queue" / "private" / "local")
    stop = threading.Event()
    server = threading.Thread(
        target=helper.serve_unix_threaded,
        args=(path, lambda req: local_helper.handle_request(agent, store, req), log),
        kwargs={"stop": stop, "drain": 10.0}, daemon=True)
    server.start()
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(path):
            assert time.monotonic() < deadline, "helper socket did not appear"
            time.sleep(0.01)
        wrong = []

        def connection(seed):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(JOIN)
                s.connect(path)
                f = s.makefile("rb")
                for n in range(6):
                    i = (seed * 7 + n * 11) % len(codes)
                    s.sendall(json.dumps({"id": n, "queue_id": msg.queue_id, "sender": "s@remote.test",
                                          "nexthop": HOST,
                                          "recipients": [[f"al{i}@{HOST}", None]]}).encode() + b"\n")
                    reply = json.loads(f.readline())
                    leaves = reply["results"][0]
                    got = [(leaf[2], leaf[4]) for leaf in leaves]
                    status = "deferred" if codes[i] in (71, 75) else "bounced"
                    if reply["id"] != n or got != [(status, SYSEXITS_TEXT[codes[i]])]:
                        wrong.append((seed, i, reply))
                        return
        assert _run_threads(connection, 6) == []
        assert wrong == []
    finally:
        stop.set()
        server.join(JOIN)
        clear_cache()
    assert not server.is_alive()


def test_machine_default_computed_by_racing_threads(monkeypatch):
    """Config's myhostname/mydomain recursion guard was one set for all threads:
    a second thread computing mydomain at the same moment took the recursion
    fallback "localdomain", and the cache could keep it."""
    from postwell.config import machine
    real = machine.default_mydomain

    def slow(host):
        time.sleep(0.05)
        return real(host)
    monkeypatch.setattr(machine, "default_mydomain", slow)
    cfg = Config("/nonexistent", {"myhostname": "mx.example.com"}, {}, [])
    out, start = [], threading.Barrier(4)

    def run():
        start.wait(10)
        out.append(cfg.get("mydomain"))
    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert out == ["example.com"] * 4
    assert cfg.get("mydomain") == "example.com"
    # the guard still ends a real recursion
    loop = Config("/nonexistent", {"myhostname": "$mydomain"}, {}, [])
    assert loop.get("mydomain") == "localdomain"
