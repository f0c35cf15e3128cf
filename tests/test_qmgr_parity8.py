"""qmgr parity items checked side by side with Postfix 3.7 (H7):

- notices about SMTPUTF8 mail are RFC 6533 global notices;
- NOTIFY=SUCCESS of null-sender (or double-bounce) mail: bounce(8)'s "not
  sending trace/success notification for single-bounce message", no notice;
- qmgr_message_sort(): recipients by domain (without case), then address
  byte-wise, in delivery batches and notices;
- qmgr_message_alloc() resets the defer log of a message from incoming/ too
  (postqueue -i/-s hand a deferred message back there with its log);
- a transport whose master.cf service cannot start its daemon (malformed -o):
  the mail waits in the active queue, nothing logged, until the connect
  watchdog ($daemon_timeout) logs "fatal: timeout connecting to transport".
"""

import asyncio
from types import SimpleNamespace

import pytest

from postwell.config.main import Config
from postwell.config.master import MasterService
from postwell.delivery.base import DeliveryAgent, RecipientResult
from postwell.log import NullLog
from postwell.qmgr.manager import QueueManager
from postwell.queue import QueueStore
from postwell.queue import format as qformat


class FakeClock:
    def __init__(self, t=1_800_000_000.0):
        self.t = t

    def __call__(self):
        return self.t


class Resolver:
    ROUTES = {"bad.test": "error", "tmp.test": "tmpfail", "broken.test": "xyz"}

    def resolve(self, address):
        domain = address.rsplit("@", 1)[-1].lower()
        transport = self.ROUTES.get(domain, "okay")
        # one next hop for "okay": a single delivery batch shows the order
        nexthop = {"error": "5.1.1 User unknown", "okay": "relay.test"}.get(transport, domain)
        return SimpleNamespace(address_class="virtual", transport=transport, nexthop=nexthop,
                               recipient=address)


class OkAgent(DeliveryAgent):
    def __init__(self):
        self.calls = []

    async def deliver(self, req):
        self.calls.append([r.address for r in req.recipients])
        return [RecipientResult.sent(r, "delivered to maildir", "virtual") for r in req.recipients]


class TmpAgent(DeliveryAgent):
    def __init__(self):
        self.calls = 0

    async def deliver(self, req):
        self.calls += 1
        return [RecipientResult.deferred(r, "mailbox busy", "virtual", "4.2.0")
                for r in req.recipients]


@pytest.fixture
def env(tmp_path):
    qdir = tmp_path / "queue"
    cfg = Config(str(tmp_path), {"queue_directory": str(qdir), "myhostname": "mx.demo.test"},
                 {}, [])
    clock = FakeClock()
    store = QueueStore(str(qdir), clock=clock)
    store.ensure_layout()
    logs = {}
    ok, tmp = OkAgent(), TmpAgent()
    qm_log, bounce_log = NullLog("qmgr"), NullLog("bounce")

    def make():
        return QueueManager(cfg, store, log=qm_log, clock=clock, resolver=Resolver(),
                            bounce_log=bounce_log, agents={"okay": ok, "tmpfail": tmp},
                            agent_logs=lambda name: logs.setdefault(name, NullLog(name)))
    return SimpleNamespace(cfg=cfg, store=store, clock=clock, logs=logs, ok=ok, tmp=tmp,
                           make=make, qm_log=qm_log, bounce_log=bounce_log)


def queue(store, sender, rcpts, smtputf8=False, body=b"Subject: t\n\nhello\n"):
    msg = store.create()
    msg.set_sender(sender, smtputf8=smtputf8)
    for r in rcpts:
        address, _, notify = r.partition(" NOTIFY=")
        msg.add_recipient(address, notify=notify or None)
    msg.write(body)
    msg.commit()
    return msg.queue_id


def run(coro, timeout=10):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def incoming_pass(qm):
    async def go():
        qm.scan_incoming()
        await qm.drain()
    run(go())


def notices(store):
    out = []
    for qid in store.scan("incoming"):
        n = store.open(qid)
        try:
            out.append((n.sender, [r.address for r in n.recipients],
                        b"".join(n.iter_content()).decode("utf-8", "replace")))
        finally:
            n.close()
    return out


# ------------------------------------------------------------------ 1. SMTPUTF8 notices

@pytest.mark.parametrize("smtputf8", [True, False])
def test_bounce_of_smtputf8_mail_is_a_global_notice(env, smtputf8):
    queue(env.store, "s@x.test", ["\u00fcu@bad.test"], smtputf8=smtputf8)
    incoming_pass(env.make())
    [(sender, to, text)] = notices(env.store)
    assert (sender, to) == ("", ["s@x.test"])
    # RFC 6533 3: the report and the returned message are typed as global ones
    assert ("message/global-delivery-status" in text) is smtputf8
    assert ("Content-Type: message/global\n" in text) is smtputf8
    assert ("message/delivery-status" in text) is not smtputf8


def test_success_notice_of_smtputf8_mail_is_global(env):
    queue(env.store, "s@x.test", ["a@ok.test NOTIFY=SUCCESS"], smtputf8=True)
    incoming_pass(env.make())
    [(_, _, text)] = notices(env.store)
    assert "message/global-delivery-status" in text
    assert "message/global-headers" in text       # a success report: headers only


# ------------------------------------------------------------------ 2. null sender SUCCESS

def test_null_sender_notify_success_logs_and_sends_nothing(env):
    qid = queue(env.store, "", ["a@ok.test NOTIFY=SUCCESS"])
    incoming_pass(env.make())
    assert env.bounce_log.lines == [
        f"{qid}: not sending trace/success notification for single-bounce message"]
    assert notices(env.store) == []
    assert env.store.find(qid) is None
    assert env.qm_log.lines[-1] == f"{qid}: removed"


def test_double_bounce_sender_notify_success(env):
    qid = queue(env.store, "double-bounce@mx.demo.test", ["a@ok.test NOTIFY=SUCCESS"])
    incoming_pass(env.make())
    assert env.bounce_log.lines == [
        f"{qid}: not sending trace/success notification for double-bounce message"]
    assert notices(env.store) == []


def test_null_sender_line_also_when_the_next_hop_took_dsn_duty(env):
    # Postfix's qmgr asks bounce(8) whenever a recipient has NOTIFY=SUCCESS; the
    # sender check comes before the look for a trace file (seen side by side
    # with a DSN-capable peer that took over NOTIFY).
    class Relayed(DeliveryAgent):
        async def deliver(self, req):
            out = []
            for r in req.recipients:
                res = RecipientResult.sent(r, "250 2.0.0 Ok", "peer[127.0.0.1]:25")
                res.dsn_action = None
                out.append(res)
            return out
    qid = queue(env.store, "", ["a@ok.test NOTIFY=SUCCESS", "b@ok.test"])
    qm = env.make()
    qm._agents["okay"] = Relayed(env.cfg)
    incoming_pass(qm)
    assert env.bounce_log.lines == [
        f"{qid}: not sending trace/success notification for single-bounce message"]


def test_null_sender_without_notify_success_logs_nothing(env):
    queue(env.store, "", ["a@ok.test", "b@ok.test NOTIFY=FAILURE"])
    incoming_pass(env.make())
    assert env.bounce_log.lines == []


def test_null_sender_success_line_each_pass(env):
    # qmgr_active_done_2_generic() flushes the trace after every pass, a
    # deferred one too.
    qid = queue(env.store, "", ["a@tmp.test NOTIFY=SUCCESS"])
    incoming_pass(env.make())
    assert env.store.find(qid) == "deferred"
    assert env.bounce_log.lines == [
        f"{qid}: not sending trace/success notification for single-bounce message"]


def test_ordinary_sender_still_gets_its_success_notice(env):
    qid = queue(env.store, "s@x.test", ["a@ok.test NOTIFY=SUCCESS"])
    incoming_pass(env.make())
    [(sender, to, text)] = notices(env.store)
    assert (sender, to) == ("", ["s@x.test"])
    assert "Successful Mail Delivery Report" in text
    assert env.bounce_log.lines[0].startswith(f"{qid}: sender delivery status notification: ")


# ------------------------------------------------------------------ 3. recipient order

def test_recipients_delivered_in_qmgr_sort_order(env):
    queue(env.store, "s@x.test", ["u3@ok.test", "u1@ok.test", "U2@ok.test", "b@A.ok.test",
                                  "a@b.ok.test", "nodomain"])
    incoming_pass(env.make())
    # domain without case first, then the whole address byte-wise; no domain last
    assert len(env.ok.calls) == 1
    assert env.ok.calls[0] == ["b@A.ok.test", "a@b.ok.test", "U2@ok.test", "u1@ok.test", "u3@ok.test",
                     "nodomain"]


def test_notice_lists_recipients_in_sort_order(env):
    queue(env.store, "s@x.test", ["u3@bad.test", "u1@bad.test", "z@a.bad.test"])
    Resolver.ROUTES["a.bad.test"] = "error"
    try:
        incoming_pass(env.make())
    finally:
        del Resolver.ROUTES["a.bad.test"]
    [(_, _, text)] = notices(env.store)
    human = text.split("The mail system", 1)[1]
    assert human.index("<u1@bad.test>") < human.index("<u3@bad.test>")
    finals = [ln for ln in text.splitlines() if ln.startswith("Final-Recipient:")]
    # "@a.bad.test" sorts before "@bad.test" (strcasecmp of the domains)
    assert finals == ["Final-Recipient: rfc822; z@a.bad.test",
                      "Final-Recipient: rfc822; u1@bad.test",
                      "Final-Recipient: rfc822; u3@bad.test"]


# ------------------------------------------------------------------ 4. defer log from incoming

def _defer_entries(store, qid):
    with open(store.path("defer", qid), "rb") as f:
        return [e for e in qformat.parse_log_entries(f.read()) if not e.get("delay_warning")]


def test_defer_log_reset_when_a_deferred_message_comes_back_through_incoming(env):
    qid = queue(env.store, "s@x.test", ["a@tmp.test"])
    qm = env.make()
    incoming_pass(qm)
    assert env.store.find(qid) == "deferred"
    assert len(_defer_entries(env.store, qid)) == 1
    # postqueue -i/-s (flush(8)): deferred/ -> incoming/, the defer log stays
    env.store.move(qid, "deferred", "incoming")
    incoming_pass(qm)
    assert env.tmp.calls == 2
    assert len(_defer_entries(env.store, qid)) == 1      # this attempt's reason only
    # a fresh qmgr (no idea which ids have logs) does the same
    env.store.move(qid, "deferred", "incoming")
    qm2 = env.make()
    incoming_pass(qm2)
    assert len(_defer_entries(env.store, qid)) == 1


def test_delay_warning_marker_survives_the_incoming_reset(env):
    env.cfg.params["delay_warning_time"] = "1h"
    qid = queue(env.store, "s@x.test", ["a@tmp.test"])
    qm = env.make()
    qm.delay_warning = 3600
    env.clock.t += 7200
    incoming_pass(qm)
    assert [s for s, _, t in notices(env.store) if "Delayed Mail" in t]
    first = set(env.store.scan("incoming"))
    for n in first:
        env.store.remove(n, "incoming")
    env.store.move(qid, "deferred", "incoming")
    incoming_pass(qm)
    assert notices(env.store) == []                       # one delay warning per message


# ------------------------------------------------------------------ 5. broken transport

def _broken_service(cfg):
    # "xyz unix - - n - - smtp -o smtp_helo_name": the daemon dies of the -o
    cfg.services.append(MasterService("xyz", "unix", False, True, False, "-", None, "smtp",
                                      argv=["-o", "smtp_helo_name"]))


def test_broken_transport_holds_the_message_in_active(env):
    _broken_service(env.cfg)
    env.cfg.params["daemon_timeout"] = "18000s"
    qid = queue(env.store, "s@x.test", ["a@ok.test", "b@broken.test", "c@broken.test"])
    qm = env.make()
    incoming_pass(qm)
    # the other transport's recipient is delivered (and marked done) ...
    assert env.ok.calls == [["a@ok.test"]]
    # ... while the message waits in the active queue, nothing said about it
    assert env.store.find(qid) == "active"
    assert env.qm_log.lines == [f"{qid}: from=<s@x.test>, size=18, nrcpt=3 (queue active)"]
    assert "xyz" not in env.logs and "smtp" not in env.logs
    assert not env.store.scan("incoming")                 # no notice
    msg = env.store.open(qid, "active")
    try:
        assert [r.address for r in msg.recipients if not r.done] == ["b@broken.test",
                                                                     "c@broken.test"]
    finally:
        msg.close()


def test_broken_transport_watchdog_logs_fatal_and_tries_again(env):
    _broken_service(env.cfg)
    env.cfg.params["daemon_timeout"] = "1s"
    qid = queue(env.store, "s@x.test", ["b@broken.test"])
    qm = env.make()

    async def go():
        qm.scan_incoming()
        await qm.drain()
        for _ in range(100):
            if "fatal: timeout connecting to transport: xyz" in env.qm_log.lines:
                break
            await asyncio.sleep(0.05)
        await qm.drain()
    run(go())
    assert "fatal: timeout connecting to transport: xyz" in env.qm_log.lines
    # as the restarted qmgr: the message is taken up again, and waits again
    assert env.qm_log.lines.count(f"{qid}: from=<s@x.test>, size=18, nrcpt=1 (queue active)") == 2
    assert env.store.find(qid) == "active"


def test_sound_service_of_the_same_command_still_delivers(env):
    env.cfg.services.append(MasterService("okay", "unix", False, True, False, "-", None, "smtp",
                                          argv=["-o", "smtp_helo_name=mx.demo.test"]))
    qid = queue(env.store, "s@x.test", ["a@ok.test"])
    incoming_pass(env.make())
    assert env.store.find(qid) is None and env.ok.calls == [["a@ok.test"]]


# ------------------------------------------------------------------ side by side with Postfix 3.7

try:
    import harness
    from test_smtp_client_fuzz7 import Message, Script, differences, pair, run_case  # noqa: F401
except Exception:     # noqa: BLE001 - no reference tooling: the side-by-side cases skip
    harness = None

SIDE_BY_SIDE = {
    # a success report of SMTPUTF8 mail: global, headers only
    "utf8_success": (Script(features=("8BITMIME", "SMTPUTF8")),
                     Message(("u1 NOTIFY=SUCCESS",), "BODY=8BITMIME SMTPUTF8",
                             eight_bit="mime")),
    # a bounce of SMTPUTF8 mail whose recipients are ASCII
    "utf8_bounce_ascii": (Script(features=("8BITMIME", "SMTPUTF8"),
                                 rcpt=(("550 5.1.1 no",), ("550 5.1.1 nope",))),
                          Message(("u2", "u1"), "SMTPUTF8")),
    # sorted: the notice lists U1 before u0 before u9 (byte-wise)
    "sorted_notice": (Script(rcpt=(("550 5.1.1 a",), ("550 5.1.1 b",), ("550 5.1.1 c",))),
                      Message(("u9", "U1", "u0"))),
    # null sender with NOTIFY=SUCCESS, the peer without DSN (a trace entry exists)
    "null_sender_success_no_dsn": (Script(features=("8BITMIME",)),
                                   Message(("u1 NOTIFY=SUCCESS", "u2"), sender="")),
}


@pytest.mark.postfix
@pytest.mark.skipif(harness is None or harness.reference_available() is not None,
                    reason="no reference Postfix")
@pytest.mark.parametrize("name", sorted(SIDE_BY_SIDE))
def test_side_by_side(pair, name):   # noqa: F811 - the fixture imported above
    script, msg = SIDE_BY_SIDE[name]
    got = run_case(pair, script, msg, "h7-" + name.replace("_", "-"))
    problems = differences(got)
    assert not problems, "\n\n".join(problems)
