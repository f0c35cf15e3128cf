"""Issue 8, local(8) Maildir throughput: several messages for one local
destination travel to the agent (and the root helper) as one batch
(qmgr _deliver_batched, LocalAgent.deliver_batch/expand_batch,
local_helper "batch" requests), and one user's Maildir copies are written as
one unit of work (local_exec.deliver_maildir_batch: every file fsync'd before
its link, one new/ fsync per batch, each message answered on its own)."""

from __future__ import annotations

import asyncio
import functools
import os
import re
import shutil
import stat
import tempfile
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from postwell.config.main import Config
from postwell.delivery import local as local_mod
from postwell.delivery import local_exec, local_helper
from postwell.delivery.base import DeliveryAgent, DeliveryRequest, Recipient, RecipientResult
from postwell.delivery.local import LocalAgent
from postwell.delivery.local_exec import LocalCopy, deliver_maildir_batch
from postwell.log import NullLog
from postwell.qmgr.manager import QueueManager
from postwell.queue import QueueStore
from test_local import Env

HOST = "mx.example.test"
USERS = ("pwlb9a", "pwlb9b")
MSG = b"From: a@remote.test\nSubject: batch\n\nline one\n"

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


def run(coro, timeout=20):
    return asyncio.run(asyncio.wait_for(coro, timeout))


# ------------------------------------------------------------------ the file work

@pytest.fixture
def box():
    base = Path(tempfile.mkdtemp(prefix="pw-lb9-"))
    os.chmod(base, 0o755)
    yield base
    shutil.rmtree(base, ignore_errors=True)


def copy_for(path: Path, rcpt="user@example.test", limit=0) -> LocalCopy:
    return LocalCopy(path=str(path) + "/", maildir=True, sender="sender@example.test",
                     recipient=rcpt, orig=rcpt, delivered=rcpt, limit=limit, lock_methods=[],
                     hostname="host", want_orig=True, want_delivered=True)


def content(data: bytes):
    return lambda: iter((data,))


def new_files(maildir: Path) -> list[Path]:
    return sorted((maildir / "new").iterdir()) if (maildir / "new").is_dir() else []


def test_batch_writes_every_copy_with_its_own_headers(box):
    copies = [copy_for(box / "Maildir", f"u{i}@example.test") for i in range(5)]
    answers = deliver_maildir_batch(copies, [content(MSG + b"n%d\n" % i) for i in range(5)])
    assert answers == [{"status": "sent", "dsn": "2.0.0", "reason": "delivered to maildir"}] * 5
    files = new_files(box / "Maildir")
    assert len(files) == 5
    bodies = sorted(p.read_bytes() for p in files)
    for i, body in enumerate(bodies):
        assert body.startswith(b"Return-Path: <sender@example.test>\nX-Original-To: u%d@" % i)
        assert body.endswith(MSG + b"n%d\n" % i)
    # Maildir names: unique, no leftovers in tmp/
    assert len({p.name for p in files}) == 5
    assert list((box / "Maildir" / "tmp").iterdir()) == []
    for p in files:
        assert re.fullmatch(r"\d+\.V[0-9a-f]+I[0-9a-f]+M\d+\.host", p.name)
        assert stat.S_IMODE(p.stat().st_mode) == 0o600


def test_one_failure_does_not_fail_the_others(box):
    (box / "blocked").write_text("a file where a Maildir should be")
    copies = [copy_for(box / "Maildir"), copy_for(box / "blocked"),
              copy_for(box / "Maildir", limit=10), copy_for(box / "Maildir")]
    answers = deliver_maildir_batch(copies, [content(MSG)] * 4)
    assert answers[0] == answers[3] == {"status": "sent", "dsn": "2.0.0",
                                        "reason": "delivered to maildir"}
    # the same answers the one-by-one path gives
    single = [local_exec.op_mailbox(c, "user", 0, False, None, content(MSG)) for c in copies[1:3]]
    assert answers[1] == single[0] and answers[1]["status"] == "deferred"
    assert "maildir delivery failed: create maildir file" in answers[1]["reason"]
    assert answers[2] == single[1] == {
        "status": "bounced", "dsn": "5.2.2",
        "reason": "maildir delivery failed: error writing message: File too large"}
    assert len(new_files(box / "Maildir")) == 2 + 0     # the two good copies of the batch
    # (the one-by-one comparison above bounced too: nothing more was written)


def test_file_fsyncs_before_links_and_one_new_dir_fsync(box, monkeypatch):
    """The Maildir spec's order for every file, and one directory fsync for
    the whole batch, after its last link and before any answer."""
    events = []
    real_fsync, real_name = os.fsync, local_exec._name_unnamed

    def fsync(fd):
        events.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else ("file", fd))
        real_fsync(fd)

    def name(fd, path):
        events.append(("link", fd))
        real_name(fd, path)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(local_exec, "_name_unnamed", name)
    monkeypatch.setattr(local_exec._virtual, "maildir_name_ordered", lambda *a: False)
    answers = deliver_maildir_batch([copy_for(box / "Maildir") for _ in range(4)],
                                    [content(MSG)] * 4)
    assert all(a["status"] == "sent" for a in answers)
    assert events.count("dir") == 1 and events[-1] == "dir"
    links = [e[1] for e in events if e[0] == "link"]
    assert len(links) == 4
    for fd in links:
        assert events.index(("file", fd)) < events.index(("link", fd))


def test_new_dir_fsync_failure_fails_the_batch_not_silently(box, monkeypatch):
    def broken(path, fsync, want=None):
        raise OSError(5, "Input/output error")
    monkeypatch.setattr(local_exec._virtual, "maildir_name_ordered", lambda *a: False)
    monkeypatch.setattr(local_exec.dir_sync_group(str(box / "Maildir" / "new")), "sync", broken)
    answers = deliver_maildir_batch([copy_for(box / "Maildir") for _ in range(3)],
                                    [content(MSG)] * 3)
    assert [a["status"] for a in answers] == ["deferred"] * 3
    assert all("Input/output error" in a["reason"] for a in answers)


def test_ordered_file_system_needs_no_new_dir_fsync(box, monkeypatch):
    events = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(stat.S_ISDIR(os.fstat(fd).st_mode)),
                                                 real_fsync(fd)))
    monkeypatch.setattr(local_exec._virtual, "maildir_name_ordered", lambda *a: True)
    copies = [copy_for(box / "Maildir") for _ in range(3)]
    for c in copies:
        c.queue_dev = os.stat(box).st_dev
    assert all(a["status"] == "sent" for a in deliver_maildir_batch(copies, [content(MSG)] * 3))
    assert events == [False, False, False]


def test_without_unnamed_files_the_named_path_is_used(box, monkeypatch):
    monkeypatch.setitem(local_exec._unnamed_state, "ok", False)
    answers = deliver_maildir_batch([copy_for(box / "Maildir") for _ in range(3)],
                                    [content(MSG)] * 3)
    assert all(a["status"] == "sent" for a in answers)
    assert len(new_files(box / "Maildir")) == 3


# ------------------------------------------------------------------ the agent

@pytest.fixture(scope="module")
def users():
    if os.geteuid() != 0 or not shutil.which("useradd"):
        pytest.skip("needs root and useradd")
    import harness
    with harness.real_users(USERS, "users-pwlb9", "pwlb9-homes-") as made:
        yield made


@pytest.fixture
def env(users):
    made = []

    def make(params=None, aliases=""):
        root = Path(tempfile.mkdtemp(prefix="pw-lb9-env-"))
        os.chmod(root, 0o755)
        made.append(root)
        return Env(root, users, {"home_mailbox": "Maildir/", **(params or {})}, aliases)
    yield make
    for root in made:
        shutil.rmtree(root, ignore_errors=True)
    for name in USERS:
        clean_home(users, name)


def clean_home(users, name):
    home = Path(users[name].pw_dir)
    for p in list(home.iterdir()):
        if p.name.startswith(".forward") or p.name == "Maildir":
            shutil.rmtree(p) if p.is_dir() else p.unlink()


def maildir_files(users, name) -> list[Path]:
    return new_files(Path(users[name].pw_dir) / "Maildir")


def requests_for(env, rcpts_per_message, content=MSG):
    """(requests, open queue files): one single-recipient request per message."""
    reqs, held = [], []
    for rcpt in rcpts_per_message:
        body = content(rcpt) if callable(content) else content
        qid = env.queue_message([rcpt], body)
        env.store.move(qid, "incoming", "active")
        qm = env.store.open(qid, "active")
        held.append(qm)
        reqs.append(DeliveryRequest(queue_id=qid, sender=qm.sender, recipients=[Recipient(rcpt)],
                                    transport="local", nexthop=HOST, arrival_time=qm.arrival_time,
                                    open_content=functools.partial(qm.iter_content),
                                    content_size=qm.content_size))
    return reqs, held


@pytest.fixture
def helper_mode(monkeypatch):
    """The root helper's set-up: user workers, Maildir work in this thread as the user."""
    if not local_exec._thread_creds_available():
        pytest.skip("no per-thread credentials on this platform")
    pool = local_exec.WorkerPool()
    monkeypatch.setattr(local_exec, "_pool", pool)
    monkeypatch.setattr(local_exec, "THREAD_IDENTITIES", True)
    yield pool
    pool.close()


@pytest.fixture
def batch_spy(monkeypatch, helper_mode):
    calls = []
    real = local_mod.op_maildir_batch

    @functools.wraps(real)
    def spy(home, paths, uid, copies, contents):
        calls.append((uid, len(copies)))
        return real(home, paths, uid, copies, contents)
    monkeypatch.setattr(local_mod, "op_maildir_batch", spy)
    return calls


@root_only
def test_one_users_plain_maildir_mail_is_one_unit_of_work(env, users, batch_spy):
    e = env(aliases="list9: pwlb9b\n")
    a, b = users["pwlb9a"], users["pwlb9b"]
    rcpts = [f"pwlb9a@{HOST}", f"pwlb9b@{HOST}", f"pwlb9a@{HOST}", f"list9@{HOST}",
             f"nosuchuser9@{HOST}", f"pwlb9a@{HOST}"]
    reqs, held = requests_for(e, rcpts)
    try:
        results = run(e.agent.deliver_batch(reqs))
    finally:
        for qm in held:
            qm.close()
    assert len(results) == len(reqs) and all(len(r) == 1 for r in results)
    got = [(r[0].status, r[0].dsn, r[0].reason) for r in results]
    sent = ("sent", "2.0.0", "delivered to maildir")
    assert got == [sent, sent, sent, sent,
                   ("bounced", "5.1.1", 'unknown user: "nosuchuser9"'), sent]
    for r, req in zip(results, reqs):
        assert r[0].recipient is req.recipients[0]
        assert [p.recipient.address for p in r[0].expanded][0].startswith(
            req.recipients[0].address.split("@")[0] if "list9" not in req.recipients[0].address
            else "pwlb9b")
    # pwlb9a's three messages: one call as pwlb9a; pwlb9b's plain one a call of its own
    # (the alias to pwlb9b goes the usual way)
    assert sorted(batch_spy) == sorted([(a.pw_uid, 3), (b.pw_uid, 1)])
    files = maildir_files(users, "pwlb9a")
    assert len(files) == 3 and all(f.stat().st_uid == a.pw_uid for f in files)
    assert len(maildir_files(users, "pwlb9b")) == 2
    assert all(f.stat().st_uid == b.pw_uid for f in maildir_files(users, "pwlb9b"))
    # each file has its own message's headers (Delivered-To of its recipient)
    assert all(f.read_bytes().startswith(b"Return-Path: <sender@remote.test>\nX-Original-To: "
                                         b"pwlb9a@" + HOST.encode()) for f in files)


@root_only
def test_batch_results_match_one_by_one_delivery(env, users):
    """Whatever is in a batch, each message's results are those deliver() gives."""
    e = env(aliases="list9: pwlb9b\n")
    loop_body = f"Delivered-To: pwlb9a@{HOST}\n".encode() + MSG
    rcpts = [f"pwlb9a@{HOST}", f"pwlb9a@{HOST}", f"list9@{HOST}", f"nosuchuser9@{HOST}",
             f"pwlb9a+ext@{HOST}"]

    def body(rcpt, n=[0]):
        n[0] += 1
        return loop_body if n[0] == 2 else MSG

    def shape(results):
        return [[(p.recipient.address, p.recipient.orig, p.status, p.dsn, p.reason)
                 for p in r[0].expanded] for r in results]
    reqs, held = requests_for(e, rcpts, body)
    try:
        batched = shape(run(e.agent.deliver_batch(reqs)))
        single = shape([run(e.agent.deliver(r)) for r in reqs])
    finally:
        for qm in held:
            qm.close()
    assert batched == single
    assert batched[1][0][3:] == ("5.4.6", f"mail forwarding loop for pwlb9a@{HOST}")


@root_only
def test_a_forward_file_sends_the_group_the_usual_way(env, users, batch_spy):
    e = env()
    fwd = Path(users["pwlb9a"].pw_dir) / ".forward"
    fwd.write_text("far@remote.test\n")
    os.chown(fwd, users["pwlb9a"].pw_uid, users["pwlb9a"].pw_gid)
    reqs, held = requests_for(e, [f"pwlb9a@{HOST}"] * 3)
    try:
        results = run(e.agent.deliver_batch(reqs))
    finally:
        for qm in held:
            qm.close()
    assert batch_spy == [(users["pwlb9a"].pw_uid, 3)]      # looked, found the .forward
    for r in results:
        assert r[0].status == "sent" and r[0].reason.startswith("forwarded as ")
    assert maildir_files(users, "pwlb9a") == []
    assert len(e.new_queue_files()) == 3


@root_only
def test_helper_batch_request(env, users):
    e = env()
    reqs, held = requests_for(e, [f"pwlb9a@{HOST}", f"pwlb9a@{HOST}"])
    for qm in held:
        qm.close()
    batch = {"id": 7, "batch": [
        {"queue_id": reqs[0].queue_id, "sender": "s@remote.test", "nexthop": HOST,
         "recipients": [[f"pwlb9a@{HOST}", None]]},
        {"queue_id": "ABCDEF1234", "sender": "s@remote.test", "nexthop": HOST,
         "recipients": [[f"pwlb9a@{HOST}", None]]},
        {"queue_id": reqs[1].queue_id, "sender": "s@remote.test", "nexthop": HOST,
         "recipients": [[f"pwlb9a@{HOST}", None]]}]}
    assert local_helper.parse_request(batch) is batch
    out = local_helper.handle_batch(e.agent, e.store, batch)
    assert len(out) == 3
    assert out[0][0][0][2:5] == ["sent", "2.0.0", "delivered to maildir"]
    assert out[2][0][0][2:5] == ["sent", "2.0.0", "delivered to maildir"]
    assert out[1][0][0][2] == "deferred" and out[1][0][0][4].startswith("cannot open queue file")
    assert len(maildir_files(users, "pwlb9a")) == 2


@pytest.mark.parametrize("bad", [
    {"batch": []}, {"batch": "x"}, {"batch": [{"queue_id": "A"}]},
    {"batch": [{"queue_id": "A", "recipients": []}] * (local_helper.BATCH_MAX + 1)}])
def test_helper_refuses_malformed_batches(bad):
    with pytest.raises(ValueError):
        local_helper.parse_request(bad)


@root_only
def test_agent_through_a_helper_socket_sends_one_batch_request(env, users, tmp_path, helper_mode):
    """LocalAgent(helper_socket=...) -> serve_unix_threaded -> handle_batch."""
    from postwell.delivery.helper import serve_unix_threaded
    e = env()
    helper_agent = LocalAgent(e.cfg, NullLog("local"), store=e.store, helper_socket="")
    seen = []

    def answer(req):
        seen.append(len(req.get("batch", [req])))
        if "batch" in req:
            return local_helper.handle_batch(helper_agent, e.store, req)
        return local_helper.handle_request(helper_agent, e.store, req)
    path = str(tmp_path / "local.sock")
    stop = threading.Event()
    t = threading.Thread(target=serve_unix_threaded, args=(path, answer, NullLog("local")),
                         kwargs={"parse": local_helper.parse_request, "stop": stop}, daemon=True)
    t.start()
    try:
        for _ in range(200):
            if os.path.exists(path):
                break
            threading.Event().wait(0.02)
        agent = LocalAgent(e.cfg, NullLog("local"), store=e.store, helper_socket=path)
        reqs, held = requests_for(e, [f"pwlb9a@{HOST}"] * 4 + [f"pwlb9b@{HOST}"])

        async def go():
            try:
                return await agent.deliver_batch(reqs)
            finally:
                agent.close()
        try:
            results = run(go())
        finally:
            for qm in held:
                qm.close()
    finally:
        stop.set()
        t.join(10)
    assert seen == [5]
    assert [r[0].reason for r in results] == ["delivered to maildir"] * 5
    assert len(maildir_files(users, "pwlb9a")) == 4


# ------------------------------------------------------------------ the qmgr

class Resolver:
    def resolve(self, address):
        return SimpleNamespace(address_class="local", transport="local", nexthop=HOST,
                               recipient=address)


class BatchAgent(DeliveryAgent):
    """A stand-in for local(8): records its batches; the first one waits
    until the test lets it go, so the others queue up behind it."""
    name = "local"
    batch_limit = 3
    batch_bytes = 1 << 20

    def __init__(self):
        self.batches = []
        self.in_flight = self.most = 0
        self.per_dest = {}
        self.gate = None

    async def deliver(self, request):
        return (await self.deliver_batch([request]))[0]

    async def deliver_batch(self, requests):
        self.batches.append([r.queue_id for r in requests])
        dests = {r.recipients[0].address for r in requests}
        assert len(dests) == 1          # one destination per batch
        dest = dests.pop()
        self.in_flight += 1
        self.per_dest[dest] = self.per_dest.get(dest, 0) + 1
        self.most = max(self.most, self.per_dest[dest])
        try:
            if self.gate is not None:
                await self.gate.wait()
            out = []
            for r in requests:
                rc = r.recipients[0]
                if rc.address.startswith("fail"):
                    out.append([RecipientResult.deferred(rc, "mailbox busy", "local", "4.2.0")])
                else:
                    out.append([RecipientResult.sent(rc, "delivered to maildir", "local")])
            return out
        finally:
            self.in_flight -= 1
            self.per_dest[dest] -= 1


def qmgr_env(tmp_path, params=None):
    qdir = tmp_path / "queue"
    p = {"queue_directory": str(qdir), "myhostname": HOST, **(params or {})}
    cfg = Config(str(tmp_path), p, {}, [])
    store = QueueStore(str(qdir))
    store.ensure_layout()
    logs = {}
    agent = BatchAgent()
    qm = QueueManager(cfg, store, log=NullLog("qmgr"), resolver=Resolver(),
                      agents={"local": agent}, agent_logs=lambda n: logs.setdefault(n, NullLog(n)))
    return SimpleNamespace(store=store, agent=agent, qm=qm, logs=logs)


def queue(store, rcpt, body=b"Subject: t\n\nhello\n"):
    msg = store.create()
    msg.set_sender("s@remote.test")
    msg.add_recipient(rcpt)
    msg.write(body)
    msg.commit()
    return msg.queue_id


def test_qmgr_batches_what_waits_for_one_destination(tmp_path):
    q = qmgr_env(tmp_path, {"local_destination_concurrency_limit": "1"})
    ids = [queue(q.store, f"pwlb9a@{HOST}") for _ in range(7)]

    async def go():
        q.agent.gate = asyncio.Event()
        q.qm.scan_incoming()
        for _ in range(50):
            await asyncio.sleep(0)
        q.agent.gate.set()
        await q.qm.drain()
    run(go())
    sizes = [len(b) for b in q.agent.batches]
    # the first alone (nothing waited yet), then batches of at most batch_limit
    assert sizes[0] == 1 and max(sizes) == 3 and sum(sizes) == 7
    assert sorted(x for b in q.agent.batches for x in b) == sorted(ids)
    assert q.agent.most == 1            # a batch is one delivery in flight
    assert q.store.scan("active") == [] and q.store.scan("incoming") == []
    # nothing left behind: no destination window, no batch queue
    assert q.qm._destinations == {} and not q.qm.__dict__.get("_batch_queues")
    lines = q.logs["local"].lines
    assert len(lines) == 7
    for qid in ids:
        [line] = [x for x in lines if x.startswith(qid + ":")]
        assert re.fullmatch(rf"{qid}: to=<pwlb9a@{HOST}>, relay=local, delay=[\d.]+, "
                            r"delays=[\d.]+/[\d.]+/[\d.]+/[\d.]+, dsn=2\.0\.0, "
                            r"status=sent \(delivered to maildir\)", line), line


def test_qmgr_batch_concurrency_and_per_message_results(tmp_path):
    q = qmgr_env(tmp_path, {"local_destination_concurrency_limit": "2"})
    ids = [queue(q.store, f"{'fail' if i % 3 == 0 else 'ok'}{i}@{HOST}") for i in range(3)]
    ids += [queue(q.store, f"pwlb9a@{HOST}") for _ in range(8)]

    async def go():
        q.agent.gate = asyncio.Event()
        q.qm.scan_incoming()
        for _ in range(50):
            await asyncio.sleep(0)
        q.agent.gate.set()
        await q.qm.drain()
    run(go())
    # each recipient is its own destination (local_destination_recipient_limit = 1)
    assert q.agent.most == 2            # batches in flight per destination: the limit
    same = [b for b in q.agent.batches if len(b) > 1]
    assert same and all(x in ids[3:] for b in same for x in b)
    assert sorted(q.store.scan("deferred")) == [ids[0]]
    assert q.store.scan("active") == []
    assert any("status=deferred (mailbox busy)" in x and x.startswith(ids[0])
               for x in q.logs["local"].lines)


def test_qmgr_dead_agent_defers_the_whole_batch_per_message(tmp_path):
    q = qmgr_env(tmp_path, {"local_destination_concurrency_limit": "1"})

    async def broken(requests):
        raise RuntimeError("boom")
    q.agent.deliver_batch = broken
    ids = [queue(q.store, f"pwlb9a@{HOST}") for _ in range(4)]
    run(q.qm.drain() if False else _scan_and_drain(q.qm))
    assert sorted(q.store.scan("deferred")) == sorted(ids)
    assert sum("delivery temporarily suspended: unexpected agent failure" in x
               for x in q.logs["local"].lines) == 4


async def _scan_and_drain(qm):
    qm.scan_incoming()
    await qm.drain()


@root_only
def test_a_big_batch_answer_leaves_the_rest_for_one_by_one(env, users, monkeypatch, helper_mode):
    """The helper's answer stays bounded: past BATCH_LEAVES results the rest
    of the batch is not touched (None), and deliver_batch delivers those
    messages on their own -- every message once."""
    e = env(aliases="big9: pwlb9a, pwlb9b\n")
    monkeypatch.setattr(local_mod, "BATCH_LEAVES", 3)
    rcpts = [f"pwlb9a@{HOST}", f"big9@{HOST}", f"big9@{HOST}", f"pwlb9b@{HOST}", f"big9@{HOST}"]
    reqs, held = requests_for(e, rcpts)
    try:
        raw = e.agent.expand_batch(reqs)
        assert raw[0] is not None and raw[3] is not None and raw[1] is not None
        assert raw[2] is None and raw[4] is None
        for qm in held:
            qm.close()
        # the same through deliver_batch: the left-over messages are delivered on their own
        reqs, held = requests_for(e, rcpts)
        results = run(e.agent.deliver_batch(reqs))
    finally:
        for qm in held:
            qm.close()
    assert [sorted((p.recipient.address, p.status) for p in r[0].expanded) for r in results] == [
        [(f"pwlb9a@{HOST}", "sent")],
        [(f"pwlb9a@{HOST}", "sent"), (f"pwlb9b@{HOST}", "sent")],
        [(f"pwlb9a@{HOST}", "sent"), (f"pwlb9b@{HOST}", "sent")],
        [(f"pwlb9b@{HOST}", "sent")],
        [(f"pwlb9a@{HOST}", "sent"), (f"pwlb9b@{HOST}", "sent")]]
    # first round: 1 + 1 (plain) + 1 alias expanded = 3 deliveries each; second: 4 + 4
    assert len(maildir_files(users, "pwlb9a")) == 2 + 4
    assert len(maildir_files(users, "pwlb9b")) == 2 + 4


def test_helper_side_none_means_not_attempted(monkeypatch):
    """An answer with null for a message -> None (sent again on its own);
    an answer of the wrong length -> every message deferred."""
    agent = LocalAgent(Config("/tmp", {"queue_directory": "/nonexistent"}, {}, []), NullLog("local"),
                       helper_socket="/nonexistent")
    reqs = [DeliveryRequest(queue_id=f"ABC{i}", sender="", recipients=[Recipient(f"u{i}@x")],
                            transport="local", nexthop="x", arrival_time=0.0,
                            open_content=lambda: iter(())) for i in range(2)]

    class Links:
        path = "/nonexistent"

        def __init__(self, answer):
            self.answer = answer

        async def call(self, fields):
            assert len(fields["batch"]) == 2
            return self.answer
    agent._helper = Links([None, [[["u1@x", "u1@x", "sent", "2.0.0", "delivered to maildir",
                                    None, None]]]])
    got = run(agent._expand_batch_via_helper(reqs, "/nonexistent"))
    assert got[0] is None and got[1][0][0].reason == "delivered to maildir"
    agent._helper = Links([None])
    got = run(agent._expand_batch_via_helper(reqs, "/nonexistent"))
    assert [g[0][0].status for g in got] == ["deferred", "deferred"]
    assert got[0][0][0].reason == "mail system configuration error"


def test_qmgr_batch_bytes_bound(tmp_path):
    q = qmgr_env(tmp_path, {"local_destination_concurrency_limit": "1"})
    q.agent.batch_limit, q.agent.batch_bytes = 10, 3000
    big = b"Subject: t\n\n" + b"x" * 1400 + b"\n"
    ids = [queue(q.store, f"pwlb9a@{HOST}", big) for _ in range(6)]

    async def go():
        q.agent.gate = asyncio.Event()
        q.qm.scan_incoming()
        for _ in range(50):
            await asyncio.sleep(0)
        q.agent.gate.set()
        await q.qm.drain()
    run(go())
    # ~1.4 KB each: two fit in 3000 bytes, a third does not
    assert [len(b) for b in q.agent.batches] == [1, 2, 2, 1]
    assert q.store.scan("active") == [] and len(q.logs["local"].lines) == 6
    assert sorted(x for b in q.agent.batches for x in b) == sorted(ids)


def test_qmgr_cancelled_waiter_leaves_the_queue(tmp_path):
    """A message that gives up while queued (its task cancelled) leaves the
    batch queue; whoever is next waits for the slot for the others."""
    q = qmgr_env(tmp_path, {"local_destination_concurrency_limit": "1"})
    ids = [queue(q.store, f"pwlb9a@{HOST}") for _ in range(4)]

    async def go():
        q.agent.gate = asyncio.Event()
        q.qm.scan_incoming()
        for _ in range(50):
            await asyncio.sleep(0)
        [bq] = q.qm._batch_queues.values()
        assert len(bq.pending) == 3 and bq.runner is bq.pending[0]
        # cancel the task of the runner (waiting for the slot) and of one follower
        victims = {bq.pending[0].qid, bq.pending[2].qid}
        for task in list(q.qm._tasks):
            coro = task.get_coro()
            if coro.cr_frame is not None and coro.cr_frame.f_locals.get("qid") in victims:
                task.cancel()
        for _ in range(20):
            await asyncio.sleep(0)
        assert len(bq.pending) == 1 and bq.runner is bq.pending[0]
        q.agent.gate.set()
        await q.qm.drain()
        return victims
    victims = run(go())
    delivered = [x for b in q.agent.batches for x in b]
    assert sorted(delivered) == sorted(set(ids) - victims)
    assert not q.qm.__dict__.get("_batch_queues")


def test_qmgr_keeps_the_window_while_messages_are_queued(tmp_path):
    """A destination with messages queued for a batch is never forgotten,
    even when a delivery ends before the next waiter asked for the slot:
    they must all count against one concurrency window."""
    q = qmgr_env(tmp_path, {"local_destination_concurrency_limit": "1"})
    q.agent.batch_limit = 2
    seen = []
    real = q.agent.deliver_batch

    async def watch(requests):
        seen.append(q.qm._destinations.get(("local", f"pwlb9a@{HOST}")))
        if len(seen) == 1:
            await gate.wait()              # the others queue up meanwhile
        return await real(requests)        # the later ones end without waiting
    q.agent.deliver_batch = watch
    for _ in range(5):
        queue(q.store, f"pwlb9a@{HOST}")

    async def go():
        nonlocal gate
        gate = asyncio.Event()
        q.qm.scan_incoming()
        for _ in range(50):
            await asyncio.sleep(0)
        gate.set()
        await q.qm.drain()
    gate = None
    run(go())
    assert len(seen) == 3 and seen[0] is not None and all(d is seen[0] for d in seen)
    assert q.qm._destinations == {}


@root_only
def test_alias_table_failure_in_a_batch_is_one_deferral_and_one_warning(env, users, monkeypatch):
    e = env()
    import postwell.tables as tables

    def broken(spec, config=None):
        raise OSError(5, "Input/output error")
    monkeypatch.setattr(tables, "get_table", broken)
    reqs, held = requests_for(e, [f"pwlb9a@{HOST}"] * 3)
    try:
        results = run(e.agent.deliver_batch(reqs))
    finally:
        for qm in held:
            qm.close()
    assert [(r[0].status, r[0].dsn, r[0].reason) for r in results] == [
        ("deferred", "4.3.0", "alias database unavailable")] * 3
    warnings = [x for x in e.log.lines if "Input/output error" in x]
    assert len(warnings) == 3, e.log.lines
    assert maildir_files(users, "pwlb9a") == []


def test_qmgr_batch_recipients_bound(tmp_path):
    """local_destination_recipient_limit > 1: a destination is the domain, a
    message carries several recipients, and a batch stops at the agent's
    batch_recipients (the first message always goes)."""
    q = qmgr_env(tmp_path, {"local_destination_concurrency_limit": "1",
                            "local_destination_recipient_limit": "10"})
    q.agent.batch_recipients = 5
    multi = []
    for n in (3, 2, 2, 6, 1):
        msg = q.store.create()
        msg.set_sender("s@remote.test")
        for i in range(n):
            msg.add_recipient(f"pwlb9a+{i}@{HOST}")
        msg.write(b"Subject: t\n\nhello\n")
        msg.commit()
        multi.append(msg.queue_id)

    async def deliver_batch(requests):
        q.agent.batches.append([r.queue_id for r in requests])
        if len(q.agent.batches) == 1:
            await q.agent.gate.wait()
        return [[RecipientResult.sent(rc, "delivered to maildir", "local") for rc in r.recipients]
                for r in requests]
    q.agent.deliver_batch = deliver_batch

    async def go():
        q.agent.gate = asyncio.Event()
        q.qm.scan_incoming()
        for _ in range(50):
            await asyncio.sleep(0)
        q.agent.gate.set()
        await q.qm.drain()
    run(go())
    sizes = {qid: n for qid, n in zip(multi, (3, 2, 2, 6, 1))}
    per_batch = [sum(sizes[x] for x in b) for b in q.agent.batches]
    assert sorted(x for b in q.agent.batches for x in b) == sorted(multi)
    assert all(n <= 5 or len(b) == 1 for n, b in zip(per_batch, q.agent.batches))
    assert any(len(b) > 1 for b in q.agent.batches)
    assert len(q.logs["local"].lines) == 14


@root_only
def test_one_messages_unexpected_failure_stays_its_own(env, users, monkeypatch):
    e = env(aliases="list9: pwlb9b\n")
    reqs, held = requests_for(e, [f"pwlb9a@{HOST}", f"list9@{HOST}", f"pwlb9a@{HOST}"])
    real = local_mod.Expansion.alias

    def alias(self, b, name, unmatched):
        if name == "list9":
            raise RuntimeError("surprise")
        return real(self, b, name, unmatched)
    monkeypatch.setattr(local_mod.Expansion, "alias", alias)
    try:
        results = run(e.agent.deliver_batch(reqs))
    finally:
        for qm in held:
            qm.close()
    assert [(r[0].status, r[0].reason) for r in results] == [
        ("sent", "delivered to maildir"), ("deferred", "mail system configuration error"),
        ("sent", "delivered to maildir")]
    assert any("surprise" in x for x in e.log.lines)
    assert len(maildir_files(users, "pwlb9a")) == 2


@root_only
def test_helper_batch_with_a_bad_queue_id(env, users):
    e = env()
    reqs, held = requests_for(e, [f"pwlb9a@{HOST}"])
    for qm in held:
        qm.close()
    batch = {"batch": [{"queue_id": "../../etc", "recipients": [[f"pwlb9a@{HOST}", None]]},
                       {"queue_id": reqs[0].queue_id, "sender": "", "nexthop": HOST,
                        "recipients": [[f"pwlb9a@{HOST}", None]]}]}
    out = local_helper.handle_batch(e.agent, e.store, batch)
    assert out[0][0][0][2:5] == ["deferred", "4.3.0", "mail system configuration error"]
    assert out[1][0][0][2:5] == ["sent", "2.0.0", "delivered to maildir"]


def test_fsync_threads_are_all_started_by_their_creator(monkeypatch):
    """A thread takes its creator's credentials: the pool's threads are all
    made at once (the root helper does it at start-up, as root), never later
    inside a delivery acting as a user."""
    monkeypatch.setattr(local_exec, "_fsync_pool", None)
    local_exec.start_fsync_threads()
    pool = local_exec._fsync_pool
    try:
        assert len(pool._threads) == local_exec.FSYNC_THREADS
        before = set(pool._threads)
        fds = [os.open("/", os.O_RDONLY) for _ in range(20)]
        try:
            assert local_exec._fsync_all(fds) == [None] * 20
        finally:
            for fd in fds:
                os.close(fd)
        assert set(pool._threads) == before
    finally:
        pool.shutdown(wait=False)
