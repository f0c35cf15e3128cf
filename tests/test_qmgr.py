"""Queue manager: scheduling, logging, backoff, expiry, bounces, crash resume (fake clock)."""

import asyncio
import os
import re
from types import SimpleNamespace

import pytest

from postwell.config.main import Config
from postwell.delivery.base import DeliveryAgent, RecipientResult
from postwell.log import NullLog
from postwell.qmgr.logfmt import delivery_line, format_delay
from postwell.qmgr.manager import QueueManager
from postwell.queue import QueueStore, notify_qmgr


class FakeClock:
    def __init__(self, t=1_800_000_000.0):
        self.t = t

    def __call__(self):
        return self.t


class Resolver:
    def resolve(self, address):
        domain = address.rsplit("@", 1)[-1]
        transport = {"ok.test": "okay", "tmp.test": "tmpfail", "bad.test": "error"}.get(domain, "okay")
        nexthop = "5.1.1 User unknown" if transport == "error" else domain
        return SimpleNamespace(address_class="virtual", transport=transport, nexthop=nexthop,
                               recipient=address)


class OkAgent(DeliveryAgent):
    name = "okay"

    def __init__(self):
        self.calls = []

    async def deliver(self, req):
        self.calls.append([r.address for r in req.recipients])
        return [RecipientResult.sent(r, "delivered to maildir", "virtual") for r in req.recipients]


class TmpAgent(DeliveryAgent):
    name = "tmpfail"

    async def deliver(self, req):
        return [RecipientResult.deferred(r, "mailbox busy", "virtual", "4.2.0") for r in req.recipients]


def queue_env(tmp_path):
    """The queue directory, a config naming it, the fake clock and a store using it."""
    qdir = tmp_path / "queue"
    params = {"queue_directory": str(qdir), "myhostname": "mx.demo.test"}
    cfg = Config(str(tmp_path), params, {}, [])
    clock = FakeClock()
    store = QueueStore(str(qdir), clock=clock)
    store.ensure_layout()
    return qdir, cfg, clock, store


@pytest.fixture
def env(tmp_path):
    qdir, cfg, clock, store = queue_env(tmp_path)
    logs = {}

    def agent_log(name):
        return logs.setdefault(name, NullLog(name))
    ok = OkAgent()
    qm_log = NullLog("qmgr")
    bounce_log = NullLog("bounce")
    return SimpleNamespace(cfg=cfg, store=store, clock=clock, logs=logs, ok=ok, qdir=str(qdir),
                           make=lambda **kw: QueueManager(cfg, store, log=qm_log, clock=clock,
                                                          resolver=Resolver(), bounce_log=bounce_log,
                                                          agents={"okay": ok, "tmpfail": TmpAgent(cfg)},
                                                          agent_logs=agent_log, **kw),
                           qm_log=qm_log, bounce_log=bounce_log)


def queue(store, sender, rcpts, body=b"Subject: t\n\nhello\n", queue_name="incoming"):
    msg = store.create()
    msg.set_sender(sender)
    for r in rcpts:
        if isinstance(r, tuple):
            msg.add_recipient(r[0], orig=r[1])
        else:
            msg.add_recipient(r)
    msg.write(body)
    msg.commit()
    if queue_name != "incoming":
        store.move(msg.queue_id, "incoming", queue_name)
    return msg.queue_id


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 10))


def test_format_delay_matches_postfix():
    cases = {0: "0", 0.004: "0", 0.005: "0.01", 0.05: "0.05", 0.123: "0.12", 0.999: "1",
             1.23: "1.2", 9.96: "10", 12.3: "12", 1155.2: "1155"}
    for value, text in cases.items():
        assert format_delay(value) == text, value



def test_format_delay_fast_path_equals_the_general_rule():
    """Delays under a second take a shortcut (five per delivery line): the same
    text as the general significant-digits rule for every value."""
    import random
    from postwell.qmgr import logfmt
    src = open(logfmt.__file__).read()
    marker = "    if seconds < 1.0 and sig_digits == 2 and max_decimals == 2:"
    assert marker in src
    ns: dict = {}
    exec(compile(src.replace(marker, "    if False:"), "general", "exec"), ns)
    rng = random.Random(8)
    values = [i * 7e-6 for i in range(143000)] + [rng.random() * 2 for _ in range(20000)]
    values += [0.00499999, 0.0049995, 0.0050001, 0.99499999, 0.995, 0.9999996, 1.0, -1.0]
    assert [v for v in values if format_delay(v) != ns["format_delay"](v)] == []

def test_delivery_line_shape():
    line = delivery_line("4F1A2B3C", "alice@demo.test", "info@demo.test", "virtual", arrival=100.0,
                         active=100.05, handoff=100.06, conn_setup=None, now=100.11, dsn="2.0.0",
                         status="sent", reason="delivered to maildir")
    assert line == ("4F1A2B3C: to=<alice@demo.test>, orig_to=<info@demo.test>, relay=virtual, "
                    "delay=0.11, delays=0.05/0.01/0/0.05, dsn=2.0.0, status=sent (delivered to maildir)")


def test_incoming_delivered_and_removed(env):
    qid = queue(env.store, "s@x.test", ["a@ok.test", ("b@ok.test", "alias@ok.test")])
    qm = env.make()

    async def go():
        assert qm.scan_incoming() == [qid]
        await qm.drain()
    run(go())
    assert env.store.scan("incoming") == [] and env.store.scan("active") == []
    assert env.qm_log.lines[0] == f"{qid}: from=<s@x.test>, size=18, nrcpt=2 (queue active)"
    assert env.qm_log.lines[-1] == f"{qid}: removed"
    lines = env.logs["okay"].lines
    assert re.fullmatch(rf"{qid}: to=<a@ok.test>, relay=virtual, delay=0, delays=0/0/0/0, "
                        r"dsn=2.0.0, status=sent \(delivered to maildir\)", lines[0])
    assert f"to=<b@ok.test>, orig_to=<alias@ok.test>," in lines[1]
    assert env.ok.calls == [["a@ok.test", "b@ok.test"]]


def test_recipient_limit_splits_batches(env):
    env.cfg.params["okay_destination_recipient_limit"] = "2"
    qid = queue(env.store, "s@x.test", [f"r{i}@ok.test" for i in range(5)])
    qm = env.make()

    async def go():
        qm.scan_incoming()
        await qm.drain()
    run(go())
    assert [len(c) for c in env.ok.calls] == [2, 2, 1]
    assert env.store.find(qid) is None


def test_bounce_creates_notice_and_null_sender_not_bounced(env):
    qid = queue(env.store, "s@x.test", ["u@bad.test", "a@ok.test"])
    qm = env.make()

    async def go():
        qm.scan_incoming()
        await qm.drain()
    run(go())
    assert any("to=<u@bad.test>" in l and "dsn=5.1.1, status=bounced (User unknown)" in l
               for l in env.logs["error"].lines)
    [notice] = env.store.scan("incoming")
    assert env.bounce_log.lines == [f"{qid}: sender non-delivery notification: {notice}"]
    n = env.store.open(notice)
    assert n.sender == "" and [r.address for r in n.recipients] == ["s@x.test"]
    text = n.read_content().decode()
    assert "multipart/report; report-type=delivery-status" in text
    assert "Final-Recipient: rfc822; u@bad.test" in text and "Status: 5.1.1" in text
    # RET absent = FULL: the whole (small) message comes back, as Postfix does.
    assert "Content-Type: message/rfc822" in text and "Subject: t" in text
    n.close()
    # The notice itself bounces: no notice about a notice.
    env.store.remove(notice)
    qid2 = queue(env.store, "", ["u@bad.test"])

    async def go2():
        qm.scan_incoming()
        await qm.drain()
    run(go2())
    assert env.store.scan("incoming") == [] and env.store.find(qid2) is None


def test_defer_backoff_and_expiry(env):
    qid = queue(env.store, "s@x.test", ["a@ok.test", "t@tmp.test"])
    qm = env.make()
    t0 = env.clock.t

    async def step():
        await qm.drain()

    async def first():
        qm.scan_incoming()
        await qm.drain()
    run(first())
    # a@ok.test done, t@tmp.test deferred: file in deferred/, next try after minimal_backoff_time.
    assert env.store.scan("deferred") == [qid]
    assert env.store.next_attempt(qid) == pytest.approx(t0 + 300)
    assert "status=deferred (mailbox busy)" in env.logs["virtual"].lines[-1] if "virtual" in env.logs else True
    defer = env.store.read_defer_log(qid)
    assert defer[-1]["recipient"] == "t@tmp.test" and defer[-1]["reason"] == "mailbox busy"

    async def scan():
        started = qm.scan_deferred()
        await qm.drain()
        return started
    env.clock.t = t0 + 299
    assert run(scan()) == []
    env.clock.t = t0 + 300
    assert run(scan()) == [qid]
    assert env.ok.calls == [["a@ok.test"]]      # done recipients are not delivered again
    # second deferral: age 300s -> 300s; then age 600 -> 600s; capped at 4000s.
    assert env.store.next_attempt(qid) == pytest.approx(t0 + 600)
    env.clock.t = t0 + 600
    run(scan())
    assert env.store.next_attempt(qid) == pytest.approx(t0 + 1200)
    env.clock.t = t0 + 90000
    run(scan())
    assert env.store.next_attempt(qid) == pytest.approx(t0 + 94000)
    # After maximal_queue_lifetime (5d): bounced, "expired, returned to sender", removed.
    env.clock.t = t0 + 5 * 86400 + 1
    run(scan())
    assert env.store.find(qid) is None
    assert f"{qid}: from=<s@x.test>, status=expired, returned to sender" in env.qm_log.lines
    assert env.qm_log.lines[-1] == f"{qid}: removed"
    [notice] = env.store.scan("incoming")
    n = env.store.open(notice)
    text = n.read_content().decode()
    n.close()
    assert "Final-Recipient: rfc822; t@tmp.test" in text and "a@ok.test" not in text.split("Final-Recipient")[1]


def test_crash_resume_active(env):
    qid = queue(env.store, "s@x.test", ["a@ok.test"], queue_name="active")
    # An incomplete file (no owner-execute marker) in active/ must never be delivered.
    bogus = os.path.join(env.qdir, "active", "ABCDEF12")
    with open(bogus, "wb") as f:
        f.write(b"\0" * 64)
    os.chmod(bogus, 0o600)
    qm = env.make()

    async def go():
        assert qm.recover_active() == [qid]
        await qm.drain()
    run(go())
    assert env.ok.calls == [["a@ok.test"]]
    assert env.store.find(qid) is None and os.path.exists(bogus)


def test_fifo_wakeup_run_loop(env):
    qm = env.make()

    async def go():
        stop = asyncio.Event()
        fifo = os.path.join(env.qdir, "public", "qmgr")
        task = asyncio.create_task(qm.run(fifo, stop))
        await asyncio.sleep(0.05)
        qid = queue(env.store, "s@x.test", ["a@ok.test"])
        notify_qmgr(env.qdir)
        for _ in range(200):
            if env.store.find(qid) is None:
                break
            await asyncio.sleep(0.01)
        stop.set()
        await task
        return qid
    qid = run(go())
    assert env.store.find(qid) is None
    assert env.ok.calls == [["a@ok.test"]]


def test_unknown_transport_defers(env):
    class R:
        def resolve(self, a):
            return SimpleNamespace(address_class="x", transport="nosuch", nexthop="x", recipient=a)
    qid = queue(env.store, "s@x.test", ["a@ok.test"])
    qm = env.make()
    qm.resolver = R()

    async def go():
        qm.scan_incoming()
        await qm.drain()
    run(go())
    assert env.store.scan("deferred") == [qid]
    assert any("dsn=4.3.0, status=deferred (mail transport unavailable)" in l
               for lg in env.logs.values() for l in lg.lines)


def test_crash_after_bounce_logged_still_sends_notice(env):
    # Died after the bounce was recorded and the recipient marked done, before the notice.
    qid = queue(env.store, "s@x.test", ["u@bad.test"], queue_name="active")
    env.store.append_bounce_log(qid, "u@bad.test", "5.1.1", "User unknown")
    qmsg = env.store.open(qid, "active")
    qmsg.mark_done(["u@bad.test"])
    qmsg.close()
    qm = env.make()

    async def go():
        qm.recover_active()
        await qm.drain()
    run(go())
    assert env.store.find(qid) is None
    [notice] = env.store.scan("incoming")
    n = env.store.open(notice)
    assert "Final-Recipient: rfc822; u@bad.test" in n.read_content().decode()
    n.close()


def test_flush_forces_deferred_retry(env):
    qid = queue(env.store, "s@x.test", ["t@tmp.test"])
    qm = env.make()

    async def go():
        qm.scan_incoming()
        await qm.drain()
        assert qm.scan_deferred() == []            # not due yet
        assert qm.scan_deferred(force=True) == [qid]
        await qm.drain()
    run(go())
    assert env.store.scan("deferred") == [qid]
    assert sum("(queue active)" in l for l in env.qm_log.lines) == 2


def test_concurrency_limit_per_destination(env):
    env.cfg.params["okay_destination_concurrency_limit"] = "2"
    # > 1: the destination is the domain (with 1 it would be each recipient, postconf(5))
    env.cfg.params["okay_destination_recipient_limit"] = "2"
    state = {"now": 0, "peak": 0}

    class SlowAgent(DeliveryAgent):
        async def deliver(self, req):
            state["now"] += 1
            state["peak"] = max(state["peak"], state["now"])
            await asyncio.sleep(0.01)
            state["now"] -= 1
            return [RecipientResult.sent(r, "ok", "virtual") for r in req.recipients]
    for i in range(3):
        queue(env.store, "s@x.test", [f"r{j}@ok.test" for j in range(3)])
    qm = env.make()
    qm._agents["okay"] = SlowAgent(env.cfg)

    async def go():
        qm.scan_incoming()
        await qm.drain()
    run(go())
    assert state["peak"] == 2
    assert env.store.scan("incoming") == [] and env.store.scan("active") == []


def test_notify_never_suppresses_notice(env):
    msg = env.store.create()
    msg.set_sender("s@x.test")
    msg.add_recipient("u@bad.test", notify="NEVER")
    msg.add_recipient("v@bad.test", notify="SUCCESS")
    msg.write(b"Subject: t\n\nx\n")
    msg.commit()
    qm = env.make()

    async def go():
        qm.scan_incoming()
        await qm.drain()
    run(go())
    assert env.store.find(msg.queue_id) is None
    assert env.store.scan("incoming") == []       # no notice at all
    assert sum("status=bounced" in l for l in env.logs["error"].lines) == 2


def test_dead_destination_is_not_retried_until_backoff(env):
    calls = []

    class Refused(DeliveryAgent):
        async def deliver(self, req):
            calls.append(req.queue_id)
            return [RecipientResult.deferred(r, "connect to mx.far.test[192.0.2.1]:25: Connection refused",
                                             "none", "4.4.1") for r in req.recipients]

    class R:
        def resolve(self, a):
            return SimpleNamespace(address_class="default", transport="smtp", nexthop="far.test",
                                   recipient=a)
    # Window 1: one failed delivery is a whole failed pseudo-cohort, and
    # default_destination_concurrency_failed_cohort_limit = 1 declares the
    # destination dead (with the initial window of 5 it takes more failures).
    env.cfg.params["smtp_initial_destination_concurrency"] = "1"
    q1 = queue(env.store, "s@x.test", ["a@far.test"])
    qm = env.make()
    qm.resolver = R()
    qm._agents["smtp"] = Refused(env.cfg)

    async def go():
        qm.scan_incoming()
        await qm.drain()
        queue(env.store, "s@x.test", ["b@far.test"])
        qm.scan_incoming()
        await qm.drain()
    run(go())
    assert calls == [q1]
    assert any("status=deferred (delivery temporarily suspended: connect to mx.far.test[192.0.2.1]:25: "
               "Connection refused)" in l for l in env.logs["smtp"].lines)
    assert len(env.store.scan("deferred")) == 2


def test_corrupt_file_moved_aside(env):
    qid = queue(env.store, "s@x.test", ["a@ok.test"], queue_name="active")
    path = env.store.path("active", qid)
    with open(path, "r+b") as f:     # break the header CRC, keep the "complete" mode bit
        f.seek(8)
        f.write(b"\xff\xff\xff\xff")
    qm = env.make()

    async def go():
        qm.recover_active()
        await qm.drain()
    run(go())
    assert env.store.scan("corrupt") == [qid]
    assert env.ok.calls == []
    assert any("moving to corrupt queue" in l for l in env.qm_log.lines)


def _held_by_cleanup(store):
    """A committed message in incoming/ carrying cleanup's hold mark."""
    from postwell.queue import HOLD_ATTRIBUTE
    msg = store.create()
    msg.set_sender("s@x.test")
    msg.add_recipient("a@ok.test")
    msg.set_attribute(HOLD_ATTRIBUTE, "1")
    msg.write(b"Subject: held\n\nhello\n")
    msg.commit()
    return msg


def test_held_message_found_in_incoming_is_held_not_delivered(env):
    """Cleanup commits a HOLD message in incoming/ and then moves it to hold/; a qmgr
    scan woken by another message in between must hold it, never deliver it."""
    msg = _held_by_cleanup(env.store)
    other = queue(env.store, "s@x.test", ["b@ok.test"])
    qm = env.make()

    async def go():
        assert sorted(qm.scan_incoming()) == sorted([msg.queue_id, other])
        await qm.drain()
    run(go())
    assert env.ok.calls == [["b@ok.test"]]
    assert env.store.scan("hold") == [msg.queue_id]
    assert env.store.scan("incoming") == [] and env.store.scan("active") == []


def test_cleanup_hold_tolerates_the_qmgr_moving_first(tmp_path):
    """The other order: the qmgr moved it to hold/ first; cleanup's own move finds
    nothing and says nothing."""
    from postwell.cleanup.service import Cleanup
    from postwell.queue import HOLD_ATTRIBUTE
    store = QueueStore(str(tmp_path / "q"))
    store.ensure_layout()
    cfg = Config(str(tmp_path), {"queue_directory": str(tmp_path / "q"),
                                 "myhostname": "mx.demo.test"}, {}, [])
    log = NullLog("cleanup")
    cs = Cleanup(cfg, store, log).open()
    cs.set_sender("s@x.test")
    cs.add_recipient("a@ok.test")
    cs.set_hold()
    assert cs.msg.envelope.attributes[HOLD_ATTRIBUTE] == "1"
    real_move = store.move

    def racing_move(qid, src, dst, **kw):
        real_move(qid, src, dst, **kw)      # the qmgr got there first...
        return real_move(qid, src, dst, **kw)   # ...so cleanup's own rename fails
    store.move = racing_move
    reply = cs.finish_sync()
    assert reply.code == 250
    assert store.scan("hold") == [cs.queue_id]
    assert not any("cannot move to hold" in ln for ln in log.lines)


# postsuper -r sends the file through maildrop/ and pickup (a new message, as Postfix's
# requeue): tests/test_tools_parity5.py test_requeue_from_hold_is_not_held_again.
@pytest.mark.parametrize("op", ["H", "f"])
def test_released_from_hold_is_delivered_not_held_again(env, op):
    """postsuper -H / -r / -f take a cleanup-held message out of hold/: its hold mark
    is cleared in place, so meeting it in incoming/ later does not hold it again."""
    from postwell.cli import postsuper
    from postwell.queue import HOLD_ATTRIBUTE
    msg = _held_by_cleanup(env.store)
    qid = msg.queue_id
    env.store.move(qid, "incoming", "hold")
    if op == "f":
        postsuper._expire(env.store, "f", qid, "hold", lambda text: None)
    else:
        assert postsuper._apply(env.store, op, qid, "hold")
    where = [q for q in ("incoming", "deferred", "hold") if qid in env.store.scan(q)]
    assert where and where != ["hold"]
    qm = env.store.open(qid, where[0])
    assert qm.attributes[HOLD_ATTRIBUTE] == "0"
    qm.close()
    if where[0] == "deferred":
        env.store.move(qid, "deferred", "incoming")
    qmgr = env.make()

    async def go():
        qmgr.scan_incoming()
        await qmgr.drain()
    run(go())
    assert env.store.scan("hold") == []
    if op != "f":       # -f also expires it: returned to the sender instead
        assert env.ok.calls == [["a@ok.test"]]


def test_attribute_value_offset_walks_records():
    from postwell.queue import format as qf
    env = qf.Envelope(sender="s@x")
    env.attributes["helo_name"] = "postwell_hold\x001"      # a look-alike inside a value
    env.attributes["postwell_hold"] = "1"
    data = env.pack() if hasattr(env, "pack") else None
    if data is None:
        pytest.skip("Envelope has no pack()")
    at = qf.attribute_value_offset(data, "postwell_hold", "1")
    assert at is not None and data[at:at + 1] == b"1"
    assert data[at - len(b"postwell_hold\x00"):at] == b"postwell_hold\x00"
    # the look-alike record comes first and is not the one found
    assert data.find(b"postwell_hold\x001") < at - len(b"postwell_hold\x00")
    assert qf.attribute_value_offset(data, "postwell_hold", "0") is None
