"""The qmgr's notice logic with a fake clock: the whole retry schedule, one
delay warning, exactly one bounce at expiry, double bounces, postmaster
copies, success reports and NOTIFY/RET handling.  Notices are read back from
the queue (they enter it through cleanup) and parsed with the email package."""

import asyncio
import email
import email.policy
import os
from types import SimpleNamespace

import pytest

from postwell.config.main import Config
from postwell.delivery.base import DeliveryAgent, RecipientResult
from postwell.log import NullLog
from postwell.qmgr.manager import QueueManager
from postwell.queue import QueueStore, notify_qmgr

T0 = 1_800_000_000.0


class FakeClock:
    def __init__(self, t=T0):
        self.t = t

    def __call__(self):
        return self.t


class Resolver:
    def resolve(self, address):
        domain = address.rsplit("@", 1)[-1]
        transport = {"ok.test": "okay", "tmp.test": "tmpfail", "bad.test": "error",
                     "relay.test": "relayer", "dsn.test": "dsnaware"}.get(domain, "okay")
        nexthop = "5.1.1 User unknown" if transport == "error" else domain
        return SimpleNamespace(address_class="virtual", transport=transport, nexthop=nexthop,
                               recipient=address)


class OkAgent(DeliveryAgent):
    def __init__(self, relay="virtual", dsn_action="unset"):
        self.relay, self.dsn_action = relay, dsn_action

    async def deliver(self, req):
        out = []
        for r in req.recipients:
            res = RecipientResult.sent(r, "delivered to maildir" if self.relay == "virtual"
                                       else "250 2.0.0 Ok: queued as 9F", self.relay)
            if self.dsn_action != "unset":
                res.dsn_action = self.dsn_action
            out.append(res)
        return out


class TmpAgent(DeliveryAgent):
    def __init__(self, clock):
        self.clock = clock
        self.attempts = []

    async def deliver(self, req):
        self.attempts.append(self.clock())
        n = len(self.attempts)
        return [RecipientResult.deferred(r, f"mailbox busy (attempt {n})", "virtual", "4.2.0")
                for r in req.recipients]


@pytest.fixture
def env(tmp_path):
    qdir = tmp_path / "queue"
    params = {"queue_directory": str(qdir), "myhostname": "mx.demo.test", "mydomain": "demo.test",
              "myorigin": "$mydomain"}
    cfg = Config(str(tmp_path), params, {}, [])
    clock = FakeClock()
    store = QueueStore(str(qdir), clock=clock)
    store.ensure_layout()
    logs = {}
    tmp = TmpAgent(clock)

    def agent_log(name):
        return logs.setdefault(name, NullLog(name))

    def make():
        return QueueManager(cfg, store, log=agent_log("qmgr"), clock=clock, resolver=Resolver(),
                            bounce_log=agent_log("bounce"), agent_logs=agent_log,
                            agents={"okay": OkAgent(), "tmpfail": tmp,
                                    "relayer": OkAgent("mx.relay.test[192.0.2.9]:25"),
                                    "dsnaware": OkAgent("mx.dsn.test[192.0.2.8]:25", None)})
    return SimpleNamespace(cfg=cfg, store=store, clock=clock, logs=logs, tmp=tmp, make=make,
                           qdir=str(qdir))


def queue(store, sender, rcpts, body=b"From: s@x.test\nSubject: t\n\nhello\n", ret=None, envid=None):
    msg = store.create()
    msg.set_sender(sender, ret=ret, envid=envid)
    for r in rcpts:
        if isinstance(r, tuple):
            msg.add_recipient(r[0], notify=r[1], orcpt=r[2] if len(r) > 2 else None)
        else:
            msg.add_recipient(r)
    msg.write(body)
    msg.commit()
    return msg.queue_id


def run(coro, timeout=60):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def incoming_pass(qm):
    qm.scan_incoming()
    await qm.drain()


def notices(env, exclude=()):
    """Every message in incoming/ (the notices), parsed: (sender, rcpts, Message)."""
    out = []
    for qid in env.store.scan("incoming"):
        if qid in exclude:
            continue
        n = env.store.open(qid)
        try:
            msg = email.message_from_bytes(n.read_content(), policy=email.policy.compat32)
            out.append(SimpleNamespace(qid=qid, sender=n.sender,
                                       rcpts=[r.address for r in n.recipients], msg=msg))
        finally:
            n.close()
    return out


def blocks(msg):
    return msg.get_payload()[1].get_payload()


def lines(env, name):
    return env.logs[name].lines if name in env.logs else []


# ------------------------------------------------------------------ schedule

def test_retry_schedule_delay_warning_and_single_bounce_at_expiry(env):
    """Defaults: minimal_backoff_time 300s, maximal_backoff_time 4000s,
    queue_run_delay 300s, maximal_queue_lifetime 5d; delay_warning_time 4h."""
    env.cfg.params["delay_warning_time"] = "4h"
    qid = queue(env.store, "s@x.test", ["t@tmp.test"])
    qm = env.make()
    scan_times = []

    async def go():
        await incoming_pass(qm)
        t = T0
        # The qmgr looks at deferred/ every queue_run_delay; a message is due
        # when its retry time (file mtime) has come.
        while env.store.find(qid) is not None and t < T0 + 6 * 86400:
            t += 300
            env.clock.t = t
            if qm.scan_deferred():
                scan_times.append(t)
            await qm.drain()
    run(go())
    attempts = [a - T0 for a in env.tmp.attempts]
    gaps = [b - a for a, b in zip(attempts, attempts[1:])]
    # Postfix: next retry = now + min(max(age, minimal_backoff), maximal_backoff),
    # so the wait doubles with the message's age until it is capped.
    assert gaps[:5] == [300, 300, 600, 1200, 2400]
    assert all(4000 <= g < 4300 for g in gaps[5:]), gaps
    assert gaps == sorted(gaps)
    # Expired on the first attempt at or past 5 days: one bounce, then removed.
    assert attempts[-1] >= 5 * 86400 > attempts[-2]
    assert env.store.find(qid) is None
    qlog = lines(env, "qmgr")
    assert qlog.count(f"{qid}: from=<s@x.test>, status=expired, returned to sender") == 1
    assert qlog[-1] == f"{qid}: removed"
    blog = lines(env, "bounce")
    delay_lines = [l for l in blog if "sender delay notification" in l]
    bounce_lines = [l for l in blog if "sender non-delivery notification" in l]
    assert len(delay_lines) == 1 and len(bounce_lines) == 1
    got = {n.msg["Subject"]: n for n in notices(env)}
    assert set(got) == {"Delayed Mail (still being retried)", "Undelivered Mail Returned to Sender"}
    delay = got["Delayed Mail (still being retried)"]
    assert delay.sender == "" and delay.rcpts == ["s@x.test"]
    assert delay_lines[0] == f"{qid}: sender delay notification: {delay.qid}"
    assert blocks(delay.msg)[1]["Action"] == "delayed"
    # The warning went out on the first deferral at or past 4h of age.
    warned_at = next(a for a in attempts if a >= 4 * 3600)
    assert email.utils.parsedate_to_datetime(delay.msg["Date"]).timestamp() == T0 + warned_at
    bounce = got["Undelivered Mail Returned to Sender"]
    b = blocks(bounce.msg)[1]
    # Returned with the last deferral's reason and its 4.x status, as Postfix does.
    assert b["Action"] == "failed" and b["Status"] == "4.2.0"
    assert b["Diagnostic-Code"] == f"X-Postfix; mailbox busy (attempt {len(attempts)})"


def test_delay_warning_sent_once_across_restarts(env):
    env.cfg.params["delay_warning_time"] = "1h"
    qid = queue(env.store, "s@x.test", ["t@tmp.test"])
    run(incoming_pass(env.make()))
    for hours in (2, 3, 4):
        env.clock.t = T0 + hours * 3600
        qm = env.make()          # a fresh qmgr: the flag must come from disk

        async def go():
            qm.scan_deferred(force=True)
            await qm.drain()
        run(go())
    assert len(env.tmp.attempts) == 4
    assert sum("sender delay notification" in l for l in lines(env, "bounce")) == 1
    assert env.store.scan("deferred") == [qid]
    # Only the marker survives between attempts; the reasons are the last run's.
    defer = env.store.read_defer_log(qid)
    assert [e.get("delay_warning") for e in defer].count("sent") == 1
    assert [e["reason"] for e in defer if "recipient" in e] == ["mailbox busy (attempt 4)"]


def test_no_delay_warning_when_off_or_not_asked(env):
    queue(env.store, "s@x.test", ["t@tmp.test"])                      # delay_warning_time = 0h
    env.cfg.params["maximal_queue_lifetime"] = "30d"
    run(incoming_pass(env.make()))
    env.clock.t = T0 + 10 * 86400
    qm = env.make()

    async def go():
        qm.scan_deferred(force=True)
        await qm.drain()
    run(go())
    assert notices(env) == []
    env.cfg.params["delay_warning_time"] = "1h"
    qid = queue(env.store, "s@x.test", [("t@tmp.test", "FAILURE")])
    run(incoming_pass(env.make()))
    env.clock.t += 7200
    run(go())
    assert notices(env) == [] and env.store.find(qid)


def test_flush_request_through_fifo_retries_now(env):
    qid = queue(env.store, "s@x.test", ["t@tmp.test"])
    qm = env.make()

    async def go():
        await incoming_pass(qm)
        assert len(env.tmp.attempts) == 1
        stop = asyncio.Event()
        task = asyncio.create_task(qm.run(os.path.join(env.qdir, "public", "qmgr"), stop))
        await asyncio.sleep(0.05)
        assert len(env.tmp.attempts) == 1          # not due before minimal_backoff_time
        notify_qmgr(env.qdir, b"F")                # postqueue -f
        for _ in range(300):
            if len(env.tmp.attempts) >= 2:
                break
            await asyncio.sleep(0.01)
        stop.set()
        await task
    run(go())
    assert len(env.tmp.attempts) == 2
    assert env.store.scan("deferred") == [qid]


# ------------------------------------------------------------------ bounces

def test_bounce_carries_envid_orcpt_and_full_message(env):
    qid = queue(env.store, "s@x.test", [("u@bad.test", "FAILURE", "rfc822;orig@bad.test"), "a@ok.test"],
                envid="env-42")
    run(incoming_pass(env.make()))
    [n] = notices(env)
    assert lines(env, "bounce") == [f"{qid}: sender non-delivery notification: {n.qid}"]
    assert n.sender == "" and n.rcpts == ["s@x.test"]
    m = n.msg
    assert m["From"] == "Mail Delivery System <MAILER-DAEMON@demo.test>"
    assert m["To"] == "s@x.test" and m["Auto-Submitted"] == "auto-replied"
    # cleanup added the Message-Id, in Postfix's shape, and logged it.
    assert m["Message-Id"].endswith(f".{n.qid}@mx.demo.test>")
    assert f"{n.qid}: message-id={m['Message-Id']}" in lines(env, "cleanup")
    per_msg, rcpt = blocks(m)
    assert per_msg["Original-Envelope-Id"] == "env-42" and per_msg["X-Postfix-Queue-ID"] == qid
    assert rcpt["Original-Recipient"] == "rfc822;orig@bad.test"
    assert rcpt["Final-Recipient"] == "rfc822; u@bad.test" and rcpt["Status"] == "5.1.1"
    assert m.get_payload()[2].get_content_type() == "message/rfc822"


def test_ret_hdrs_and_bounce_size_limit(env):
    queue(env.store, "s@x.test", ["u@bad.test"], ret="HDRS")
    run(incoming_pass(env.make()))
    [n] = notices(env)
    assert n.msg.get_payload()[2].get_content_type() == "text/rfc822-headers"
    env.store.remove(n.qid)
    env.cfg.params["bounce_size_limit"] = "1000"
    big = b"From: s@x.test\nSubject: big\n\n" + b"y" * 70 * 20 + b"\n"
    queue(env.store, "s@x.test", ["u@bad.test"], body=big, ret="FULL")
    run(incoming_pass(env.make()))
    [n] = notices(env)
    part = n.msg.get_payload()[2]
    assert part.get_content_type() == "text/rfc822-headers"
    assert part["Content-Description"] == "Undelivered Message Headers"
    assert "Subject: big" in part.get_payload() and "yyyy" not in n.msg.as_string()


def test_notify_never_and_delay_only_suppress_failure_notice(env):
    queue(env.store, "s@x.test", [("u@bad.test", "NEVER"), ("v@bad.test", "DELAY"),
                                  ("w@bad.test", "SUCCESS")])
    run(incoming_pass(env.make()))
    assert notices(env) == [] and lines(env, "bounce") == []
    assert sum("status=bounced" in l for l in lines(env, "error")) == 3


def test_postmaster_copy_when_bounce_in_notify_classes(env):
    env.cfg.params["notify_classes"] = "bounce, resource, software"
    qid = queue(env.store, "s@x.test", ["u@bad.test"])
    run(incoming_pass(env.make()))
    got = {n.msg["Subject"]: n for n in notices(env)}
    pm = got["Postmaster Copy: Undelivered Mail"]
    assert pm.sender == "double-bounce@mx.demo.test" and pm.rcpts == ["postmaster@demo.test"]
    assert pm.msg["Auto-Submitted"] == "auto-generated"
    assert pm.msg.get_payload()[2].get_content_type() == "text/rfc822-headers"
    assert lines(env, "bounce") == [
        f"{qid}: sender non-delivery notification: {got['Undelivered Mail Returned to Sender'].qid}",
        f"{qid}: postmaster non-delivery notification: {pm.qid}"]


# ------------------------------------------------------------------ never bounce a bounce

def test_failed_notice_is_dropped_by_default(env):
    qid = queue(env.store, "", ["u@bad.test"])
    run(incoming_pass(env.make()))
    assert env.store.find(qid) is None and notices(env) == []
    assert not os.path.exists(env.store.path("bounce", qid))
    assert lines(env, "bounce") == []


def test_failed_notice_goes_to_postmaster_as_double_bounce(env):
    env.cfg.params["notify_classes"] = "2bounce"
    qid = queue(env.store, "", ["u@bad.test"])
    run(incoming_pass(env.make()))
    [n] = notices(env)
    assert n.sender == "double-bounce@mx.demo.test" and n.rcpts == ["postmaster@demo.test"]
    assert n.msg["Subject"] == "Postmaster Copy: Undelivered Mail"
    assert blocks(n.msg)[0]["X-Postfix-Sender"] == "rfc822; MAILER-DAEMON@mx.demo.test"
    assert n.msg.get_payload()[2].get_content_type() == "message/rfc822"   # whole notice
    assert lines(env, "bounce") == [f"{qid}: postmaster non-delivery notification: {n.qid}"]
    # ... and when that double bounce fails too, it is discarded: no triple bounce.
    env.store.remove(n.qid)
    qid2 = queue(env.store, "double-bounce@mx.demo.test", ["u@bad.test"])
    run(incoming_pass(env.make()))
    assert notices(env) == [] and env.store.find(qid2) is None
    assert f"warning: {qid2}: undeliverable postmaster notification discarded" in lines(env, "qmgr")


def test_null_sender_expires_after_bounce_queue_lifetime(env):
    env.cfg.params["bounce_queue_lifetime"] = "1d"
    qid = queue(env.store, "", ["t@tmp.test"])
    run(incoming_pass(env.make()))
    env.clock.t = T0 + 86400
    qm = env.make()

    async def go():
        qm.scan_deferred()
        await qm.drain()
    run(go())
    assert env.store.find(qid) is None
    assert f"{qid}: from=<>, status=expired, returned to sender" in lines(env, "qmgr")
    assert notices(env) == []


# ------------------------------------------------------------------ success

def test_success_reports(env):
    qid = queue(env.store, "s@x.test", [("a@ok.test", "SUCCESS"), ("b@relay.test", "SUCCESS,FAILURE"),
                                        ("c@dsn.test", "SUCCESS"), ("d@ok.test", "FAILURE"), "e@ok.test"])
    run(incoming_pass(env.make()))
    [n] = notices(env)
    assert lines(env, "bounce") == [f"{qid}: sender delivery status notification: {n.qid}"]
    assert n.msg["Subject"] == "Successful Mail Delivery Report" and n.rcpts == ["s@x.test"]
    rcpts = blocks(n.msg)[1:]
    assert [(b["Final-Recipient"], b["Action"], b["Status"]) for b in rcpts] == [
        ("rfc822; a@ok.test", "delivered", "2.0.0"), ("rfc822; b@relay.test", "relayed", "2.0.0")]
    assert rcpts[0]["Diagnostic-Code"] == "X-Postfix; delivery via virtual: delivered to maildir"
    text = n.msg.get_payload()[0].get_payload()
    assert "<a@ok.test>: delivery via virtual: delivered to maildir" in text
    assert n.msg.get_payload()[2]["Content-Description"] == "Message Headers"


def test_no_success_report_for_null_sender(env):
    queue(env.store, "", [("a@ok.test", "SUCCESS")])
    run(incoming_pass(env.make()))
    assert notices(env) == []


def test_notice_queue_failure_keeps_bounce_log_and_retries(env, monkeypatch):
    from postwell.dsn import NoticeError
    import postwell.qmgr.manager as manager
    real = manager.post_notice
    calls = []

    async def failing(*a, **kw):
        calls.append(1)
        raise NoticeError("451 4.3.0 Error: queue file write error")
    monkeypatch.setattr(manager, "post_notice", failing)
    qid = queue(env.store, "s@x.test", ["u@bad.test"])
    run(incoming_pass(env.make()))
    assert calls and env.store.read_bounce_log(qid)
    assert env.store.scan("deferred") == [qid]          # kept, not lost
    monkeypatch.setattr(manager, "post_notice", real)
    qm = env.make()

    async def go():
        qm.scan_deferred(force=True)
        await qm.drain()
    run(go())
    [n] = notices(env)
    assert env.store.find(qid) is None
    assert blocks(n.msg)[1]["Final-Recipient"] == "rfc822; u@bad.test"
    assert lines(env, "error").count(lines(env, "error")[0]) == 1   # delivered (bounced) once
    assert not any("unexpectedly" in l for l in lines(env, "qmgr"))
