"""defer_transports: the qmgr holds back mail for the listed transports
("deferred transport", dsn 4.3.2, through the retry service) until a flush
(postqueue -f / sendmail -q, or postqueue -i/-s), which delivers it anyway.

Facts checked against Postfix 3.7 with defer_transports = smtp and a relayhost
on a closed loopback port:
  postfix/error[..]: ID: to=<bob@remote.example>, relay=none, delay=0.04,
      delays=0.02/0.01/0/0.01, dsn=4.3.2, status=deferred (deferred transport)
then after postqueue -f (and also -i ID, -s site) the smtp client is tried.
"""

import asyncio
import os
import re
import smtplib
from types import SimpleNamespace

import pytest

import harness
from postwell.config.master import MasterService
from postwell.delivery.base import DeliveryAgent, RecipientResult
from postwell.delivery.simple import RetryAgent
from postwell.log import NullLog
from postwell.qmgr.filter import FILTER_ATTRIBUTE
from postwell.qmgr.manager import QueueManager
from test_qmgr import queue_env

DEFERRED_LINE = (r"{qid}: to=<{rcpt}>, relay=none, delay=[\d.]+, delays=[\d./]+, "
                 r"dsn=4\.3\.2, status=deferred \(deferred transport\)")


class Resolver:
    """remote.test -> smtp, local.test -> okay, relay.test -> relay."""

    def resolve(self, address):
        domain = address.rsplit("@", 1)[-1]
        transport = {"remote.test": "smtp", "relay.test": "relay"}.get(domain, "okay")
        return SimpleNamespace(address_class="default", transport=transport, nexthop=domain,
                               recipient=address)


class Recording(DeliveryAgent):
    def __init__(self, name):
        self.name = name
        self.calls = []

    async def deliver(self, req):
        self.calls.append((req.transport, req.nexthop, [r.address for r in req.recipients]))
        return [RecipientResult.sent(r, "250 2.0.0 Ok", "mx[192.0.2.1]:25") for r in req.recipients]


@pytest.fixture
def env(tmp_path):
    qdir, cfg, clock, store = queue_env(tmp_path)
    logs = {}
    agents = {"smtp": Recording("smtp"), "relay": Recording("relay"), "okay": Recording("okay"),
              "scan": Recording("scan")}

    def make(**params_):
        cfg.params.update(params_)
        return QueueManager(cfg, store, log=NullLog("qmgr"), clock=clock, resolver=Resolver(),
                            bounce_log=NullLog("bounce"), agents=dict(agents),
                            agent_logs=lambda name: logs.setdefault(name, NullLog(name)))
    return SimpleNamespace(cfg=cfg, store=store, clock=clock, logs=logs, agents=agents, make=make)


def _queue(store, rcpts, filt=None):
    msg = store.create()
    msg.set_sender("s@x.test")
    for r in rcpts:
        msg.add_recipient(r)
    if filt is not None:
        msg.set_attribute(FILTER_ATTRIBUTE, filt)
    msg.write(b"Subject: t\n\nhello\n")
    msg.commit()
    return msg.queue_id


def _run(coro):
    return asyncio.run(asyncio.wait_for(coro, 10))


def _incoming(qm):
    async def go():
        got = qm.scan_incoming()
        await qm.drain()
        return got
    return _run(go())


def _deferred(qm, force=False):
    async def go():
        got = qm.scan_deferred(force=force)
        await qm.drain()
        return got
    return _run(go())


def test_default_is_empty():
    from postwell.config.defaults import DEFAULTS
    assert DEFAULTS["defer_transports"] == ""


def test_listed_transport_is_deferred_with_postfix_line(env):
    qm = env.make(defer_transports="smtp")
    qid = _queue(env.store, ["bob@remote.test"])
    assert _incoming(qm) == [qid]
    assert env.agents["smtp"].calls == []
    assert env.store.find(qid) == "deferred"
    # Through the retry service: logged as that agent logs (postfix/retry here,
    # postfix/error when master.cf runs retry with the error command).
    [line] = env.logs["retry"].lines
    assert re.fullmatch(DEFERRED_LINE.format(qid=qid, rcpt=re.escape("bob@remote.test")), line)
    [entry] = env.store.read_defer_log(qid)
    assert (entry["recipient"], entry["status"], entry["reason"]) == \
        ("bob@remote.test", "4.3.2", "deferred transport")
    # An ordinary deferral: first retry after minimal_backoff_time.
    assert env.store.next_attempt(qid) == pytest.approx(env.clock.t + 300)


def test_other_transports_are_delivered_at_once(env):
    qm = env.make(defer_transports="smtp")
    qid = _queue(env.store, ["bob@remote.test", "ann@local.test", "cy@relay.test"])
    _incoming(qm)
    assert env.agents["okay"].calls == [("okay", "local.test", ["ann@local.test"])]
    assert env.agents["relay"].calls == [("relay", "relay.test", ["cy@relay.test"])]
    assert env.agents["smtp"].calls == []
    qf = env.store.open(qid, "deferred")
    try:
        assert [r.address for r in qf.pending_recipients] == ["bob@remote.test"]
    finally:
        qf.close()


def test_list_syntax_commas_and_spaces(env):
    qm = env.make(defer_transports="relay, smtp")
    _queue(env.store, ["bob@remote.test", "cy@relay.test", "ann@local.test"])
    _incoming(qm)
    assert env.agents["smtp"].calls == [] and env.agents["relay"].calls == []
    assert len(env.agents["okay"].calls) == 1
    assert len(env.logs["retry"].lines) == 2


def test_periodic_retry_still_deferred_flush_delivers(env):
    qm = env.make(defer_transports="smtp")
    qid = _queue(env.store, ["bob@remote.test"])
    _incoming(qm)
    env.clock.t += 300
    # The retry time came, but no flush: deferred again, same reason.
    assert _deferred(qm) == [qid]
    assert env.agents["smtp"].calls == []
    assert len(env.logs["retry"].lines) == 2 and env.store.find(qid) == "deferred"
    # postqueue -f / sendmail -q: the flush overrides defer_transports.
    assert _deferred(qm, force=True) == [qid]
    assert env.agents["smtp"].calls == [("smtp", "remote.test", ["bob@remote.test"])]
    assert env.store.find(qid) is None


def test_fifo_flush_request_overrides(env):
    qm = env.make(defer_transports="smtp")
    qid = _queue(env.store, ["bob@remote.test"])
    _incoming(qm)

    async def go():
        stop = asyncio.Event()
        fifo = os.path.join(env.store.queue_directory, "public", "qmgr")
        task = asyncio.get_running_loop().create_task(qm.run(fifo, stop))
        await asyncio.sleep(0.05)
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.write(fd, b"F")
        os.close(fd)
        for _ in range(200):
            if env.agents["smtp"].calls:
                break
            await asyncio.sleep(0.01)
        stop.set()
        await task
    _run(go())
    assert env.agents["smtp"].calls == [("smtp", "remote.test", ["bob@remote.test"])]
    assert env.store.find(qid) is None


def test_new_mail_after_a_flush_is_deferred_again(env):
    qm = env.make(defer_transports="smtp")
    _queue(env.store, ["bob@remote.test"])
    _incoming(qm)
    _deferred(qm, force=True)
    assert len(env.agents["smtp"].calls) == 1
    qid2 = _queue(env.store, ["carol@remote.test"])
    _incoming(qm)
    assert len(env.agents["smtp"].calls) == 1 and env.store.find(qid2) == "deferred"


def test_postqueue_i_style_requeue_overrides(env):
    # postqueue -i/-s move a deferred message back to incoming/ (Postfix's
    # flush(8)); its defer log marks it as a flushed message, not new mail.
    qm = env.make(defer_transports="smtp")
    qid = _queue(env.store, ["bob@remote.test"])
    _incoming(qm)
    env.store.move(qid, "deferred", "incoming")
    assert _incoming(qm) == [qid]
    assert env.agents["smtp"].calls == [("smtp", "remote.test", ["bob@remote.test"])]
    assert env.store.find(qid) is None


def test_postsuper_r_style_requeue_stays_deferred(env):
    # postsuper -r drops the defer log: the message is new mail again.
    qm = env.make(defer_transports="smtp")
    qid = _queue(env.store, ["bob@remote.test"])
    _incoming(qm)
    env.store.move(qid, "deferred", "incoming")
    os.unlink(env.store.path("defer", qid))
    _incoming(qm)
    assert env.agents["smtp"].calls == [] and env.store.find(qid) == "deferred"


def test_content_filter_transport_is_deferred(env):
    # Postfix checks defer_transports after the filter override.
    qm = env.make(defer_transports="scan")
    qid = _queue(env.store, ["ann@local.test", "bob@remote.test"], filt="scan:[127.0.0.1]:10024")
    _incoming(qm)
    assert env.agents["scan"].calls == [] and env.agents["okay"].calls == []
    assert len(env.logs["retry"].lines) == 2
    _deferred(qm, force=True)
    assert env.agents["scan"].calls == [
        ("scan", "[127.0.0.1]:10024", ["ann@local.test", "bob@remote.test"])]
    assert env.store.find(qid) is None


def test_content_filter_unlisted_transport_not_deferred(env):
    # The filtered message never goes to smtp: defer_transports=smtp does not hold it.
    qm = env.make(defer_transports="smtp")
    qid = _queue(env.store, ["bob@remote.test"], filt="scan:[127.0.0.1]:10024")
    _incoming(qm)
    assert env.agents["scan"].calls == [("scan", "[127.0.0.1]:10024", ["bob@remote.test"])]
    assert env.store.find(qid) is None


def test_empty_setting_delivers_and_never_stats_defer_log(env, monkeypatch):
    qm = env.make()
    assert qm.defer_transports == frozenset()
    seen = []
    real = os.path.exists
    monkeypatch.setattr(os.path, "exists", lambda p: seen.append(p) or real(p))
    _queue(env.store, ["bob@remote.test"])
    _incoming(qm)
    assert len(env.agents["smtp"].calls) == 1
    assert not any(os.sep + "defer" + os.sep in p for p in seen)


def test_expiry_returns_deferred_transport_mail(env):
    qm = env.make(defer_transports="smtp", maximal_queue_lifetime="1d", bounce_queue_lifetime="1d")
    qid = _queue(env.store, ["bob@remote.test"])
    _incoming(qm)
    env.clock.t += 86400 + 1
    _deferred(qm)
    assert env.store.find(qid) is None
    text = _notice_text(env.store)
    assert "Status: 4.3.2" in text and "deferred transport" in text


def _notice_text(store) -> str:
    """The content of the one notice waiting in incoming/."""
    [notice] = store.scan("incoming")
    n = store.open(notice)
    try:
        return n.read_content().decode()
    finally:
        n.close()


def test_delay_warning_for_deferred_transport(env):
    qm = env.make(defer_transports="smtp", delay_warning_time="4h")
    qid = _queue(env.store, ["bob@remote.test"])
    _incoming(qm)
    assert env.store.scan("incoming") == []
    env.clock.t += 4 * 3600 + 1
    _deferred(qm)
    assert env.store.find(qid) == "deferred"
    text = _notice_text(env.store)
    assert "Action: delayed" in text and "deferred transport" in text


def test_retry_service_with_error_command_defers(env):
    # Postfix's master.cf: "retry unix - - n - - error": error(8) run as
    # "retry" defers; its lines are tagged postfix/error.
    env.cfg.services.append(MasterService("retry", "unix", False, True, False, "-", None,
                                          "error"))
    agents = {"smtp": env.agents["smtp"], "okay": env.agents["okay"]}
    qm = QueueManager(env.cfg, env.store, log=NullLog("qmgr"), clock=env.clock,
                      resolver=Resolver(), bounce_log=NullLog("bounce"), agents=agents,
                      agent_logs=lambda name: env.logs.setdefault(name, NullLog(name)))
    env.cfg.params["defer_transports"] = "smtp"
    qm.defer_transports = frozenset(["smtp"])
    qid = _queue(env.store, ["bob@remote.test"])
    _incoming(qm)
    assert isinstance(qm.agent("retry"), RetryAgent)
    assert env.store.find(qid) == "deferred"
    [line] = env.logs["error"].lines
    assert re.fullmatch(DEFERRED_LINE.format(qid=qid, rcpt=re.escape("bob@remote.test")), line)


# ---------------------------------------------------------------- end to end
_E2E_DEFERRED = (r"postfix/error\[\d+\]: (\w+): to=<{rcpt}>, relay=none, "
                 r"delay=[\d.]+, delays=[\d./]+, dsn=4\.3\.2, "
                 r"status=deferred \(deferred transport\)$")


@pytest.mark.timeout(120)
@pytest.mark.skipif(not harness.is_root(), reason="drops privileges: needs root")
def test_end_to_end_deferred_until_postqueue_i_and_f(tmp_path):
    sink = harness.SmtpSink()
    inst = harness.PostwellInstance(tmp_path, name="defer-xports")
    try:
        inst.main_cf = {"relayhost": f"[127.0.0.1]:{sink.port}", "defer_transports": "smtp"}
        inst.master_cf = inst.default_master_cf() + (
            "smtp      unix  -       -       n       -       -       smtp\n"
            "retry     unix  -       -       n       -       -       error\n")
        inst.write_config()
        inst.start()
        qids = {}
        for user in ("bob", "carol"):
            rcpt = f"{user}@remote.example"
            with smtplib.SMTP("127.0.0.1", inst.port, timeout=20) as s:
                s.sendmail("s@remote.example", [rcpt], b"Subject: held\r\n\r\nbody\r\n")
            qids[user] = inst.wait_log(_E2E_DEFERRED.format(rcpt=re.escape(rcpt)), 30).group(1)
        assert sink.count == 0
        # postqueue -p right-aligns the short reason exactly as Postfix 3.7 does.
        listing = inst.run("postqueue", "-p", check=True, timeout=30).stdout.splitlines()
        assert listing.count(" " * 58 + "(deferred transport)") == 2
        # postqueue -i (Postfix's flush(8)) delivers one message despite defer_transports.
        inst.run("postqueue", "-i", qids["bob"], check=True, timeout=30)
        sink.wait_count(1, timeout=30)
        inst.wait_log(rf"postfix/smtp\[\d+\]: {qids['bob']}: to=<bob@remote\.example>, "
                      rf"relay=127\.0\.0\.1\[127\.0\.0\.1\]:{sink.port}, .*status=sent", timeout=30)
        assert sink.count == 1
        # postqueue -f: everything else.
        inst.run("postqueue", "-f", check=True, timeout=30)
        sink.wait_count(2, timeout=30)
        inst.wait_log(rf"postfix/smtp\[\d+\]: {qids['carol']}: to=<carol@remote\.example>, "
                      rf"relay=127\.0\.0\.1\[127\.0\.0\.1\]:{sink.port}, .*status=sent", timeout=30)
        inst.wait_log(rf"{qids['carol']}: removed", timeout=30)
    finally:
        inst.stop()
        sink.stop()
