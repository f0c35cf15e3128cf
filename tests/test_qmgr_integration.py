"""The qmgr with the real delivery agents: conn_use in the log line, DSN
envelope parameters handed to smtp(8), who owns a success notice, local(8)
expansions logged per final destination, done marks that never wait behind
deliveries, transports reachable through the resolver, and Postfix's
per-destination slow start (fake clock)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import email
import email.policy
import os
import re
import threading
from types import SimpleNamespace

import pytest

from postwell.config.main import Config
from postwell.delivery import AGENTS, agent_class
from postwell.delivery.base import DeliveryAgent, Recipient, RecipientResult
from postwell.log import NullLog
from postwell.qmgr.concurrency import Destination, parse_feedback
from postwell.qmgr.logfmt import delivery_line
from postwell.qmgr.manager import QueueManager
from postwell.queue import QueueFileNotFound, QueueStore
from test_delivery_smtp import ScriptedServer, agent as smtp_agent, make_config
from test_local import HOST as LOCAL_HOST, env_factory, users  # noqa: F401

T0 = 1_800_000_000.0
TIMEOUT = 30


class FakeClock:
    def __init__(self, t=T0):
        self.t = t

    def __call__(self):
        return self.t


class _Agent(DeliveryAgent):
    """A stand-in agent that needs no configuration."""

    def __init__(self, *args, **kw):
        pass


class Resolver:
    """domain -> (transport, nexthop); anything else goes to "okay"."""

    def __init__(self, table=None):
        self.table = table or {}

    def resolve(self, address):
        domain = address.rsplit("@", 1)[-1]
        transport, nexthop = self.table.get(domain, ("okay", domain))
        return SimpleNamespace(address_class="default", transport=transport, nexthop=nexthop,
                               recipient=address)


class OkAgent(_Agent):
    def __init__(self):
        self.calls = []

    async def deliver(self, req):
        self.calls.append(req)
        return [RecipientResult.sent(r, "delivered to maildir", "virtual") for r in req.recipients]


def make_env(tmp_path, params=None, table=None, agents=None):
    qdir = tmp_path / "queue"
    p = {"queue_directory": str(qdir), "myhostname": "mx.demo.test", "mydomain": "demo.test",
         "myorigin": "$mydomain"}
    p.update(params or {})
    cfg = Config(str(tmp_path), p, {}, [])
    clock = FakeClock()
    store = QueueStore(str(qdir), clock=clock)
    store.ensure_layout()
    logs = {}

    def agent_log(name):
        return logs.setdefault(name, NullLog(name))
    ok = OkAgent()
    all_agents = {"okay": ok}
    all_agents.update(agents or {})

    def make(agents=None, **kw):
        chosen = dict(all_agents)
        chosen.update(agents or {})
        return QueueManager(cfg, store, log=agent_log("qmgr"), clock=clock,
                            resolver=Resolver(table), bounce_log=agent_log("bounce"),
                            agent_logs=agent_log, agents=chosen, **kw)
    return SimpleNamespace(cfg=cfg, store=store, clock=clock, logs=logs, ok=ok, make=make,
                           lines=lambda name: logs.setdefault(name, NullLog(name)).lines)


def queue(store, sender, rcpts, body=b"From: s@x.test\nSubject: t\n\nhello\n", queue_name="incoming",
          **params):
    """rcpts: addresses or dicts of add_recipient() keywords."""
    msg = store.create()
    msg.set_sender(sender, **params)
    for r in rcpts:
        if isinstance(r, dict):
            msg.add_recipient(**r)
        else:
            msg.add_recipient(r)
    msg.write(body)
    msg.commit()
    if queue_name != "incoming":
        store.move(msg.queue_id, "incoming", queue_name)
    return msg.queue_id


def run(coro, timeout=TIMEOUT):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def notices(store, exclude=()):
    out = []
    for qid in store.scan("incoming"):
        if qid in exclude:
            continue
        n = store.open(qid)
        try:
            msg = email.message_from_bytes(n.read_content(), policy=email.policy.compat32)
            out.append(SimpleNamespace(qid=qid, sender=n.sender,
                                       rcpts=[r.address for r in n.recipients], msg=msg))
        finally:
            n.close()
    return out


def dsn_report(msg) -> str:
    for part in msg.walk():
        if part.get_content_type() == "message/delivery-status":
            return part.as_string()
    raise AssertionError("no message/delivery-status part")


# ------------------------------------------------------------------ 1. conn_use

def test_delivery_line_conn_use_shape():
    line = delivery_line("3F2A1B", "a@b.test", None, "h.test[192.0.2.1]:25", arrival=0.0,
                         active=0.1, handoff=0.2, conn_setup=0.2, now=0.5, dsn="2.0.0",
                         status="sent", reason="250 2.0.0 Ok", conn_use=2)
    assert line == ("3F2A1B: to=<a@b.test>, relay=h.test[192.0.2.1]:25, conn_use=2, delay=0.5, "
                    "delays=0.1/0.1/0/0.3, dsn=2.0.0, status=sent (250 2.0.0 Ok)")
    # A first use is never shown (Postfix prints conn_use only for reuse).
    for use in (None, 1):
        line = delivery_line("3F2A1B", "a@b.test", None, "h[1.2.3.4]:25", arrival=0, active=0,
                             handoff=0, conn_setup=0, now=0, dsn="2.0.0", status="sent",
                             reason="ok", conn_use=use)
        assert "conn_use" not in line


def _smtp_env(tmp_path, port, **params):
    cfg_params = {"smtp_helo_name": "client.test", "inet_protocols": "ipv4"}
    cfg_params.update(params)
    env = make_env(tmp_path, cfg_params, table={"far.test": ("smtp", f"[127.0.0.1]:{port}")})
    env.smtp = smtp_agent(make_config(**params))
    return env


def test_smtp_conn_use_dsn_parameters_and_no_success_notice_with_dsn(tmp_path):
    """A DSN-capable next hop: RET/ENVID/BODY on MAIL, ORCPT/NOTIFY on RCPT,
    the second message over the cached connection logs conn_use=2, and the
    next hop (not we) owns the success report."""
    srv = ScriptedServer()   # EHLO: PIPELINING SIZE 8BITMIME DSN ENHANCEDSTATUSCODES

    async def go():
        await srv.start()
        try:
            env = _smtp_env(tmp_path, srv.port)
            qids = []
            for i in (1, 2):
                qids.append(queue(env.store, "s@x.test",
                                  [dict(address=f"a{i}@far.test", orig=f"orig{i}@far.test",
                                        orcpt=f"rfc822;list{i}@far.test",
                                        notify="SUCCESS,FAILURE")],
                                  ret="HDRS", envid=f"ENV{i}", body_type="8BITMIME",
                                  queue_name="active"))
            qm = env.make(agents={"smtp": env.smtp})
            for qid in qids:          # one after the other: the second reuses the connection
                await qm.process(qid)
            env.smtp.close()
            return env, qids
        finally:
            await srv.stop()
    env, (q1, q2) = run(go())
    assert len(srv.sessions) == 1, srv.sessions
    cmds = srv.sessions[0]
    assert "MAIL FROM:<s@x.test> SIZE=33 BODY=8BITMIME ENVID=ENV1 RET=HDRS" in cmds, cmds
    assert "RCPT TO:<a1@far.test> ORCPT=rfc822;list1@far.test NOTIFY=SUCCESS,FAILURE" in cmds, cmds
    assert "MAIL FROM:<s@x.test> SIZE=33 BODY=8BITMIME ENVID=ENV2 RET=HDRS" in cmds, cmds
    lines = env.lines("smtp")
    relay = rf"127\.0\.0\.1\[127\.0\.0\.1\]:{srv.port}"
    assert any(re.fullmatch(rf"{q1}: to=<a1@far\.test>, orig_to=<orig1@far\.test>, relay={relay}, "
                            r"delay=[\d.]+, delays=[\d./]+, dsn=2\.0\.0, "
                            r"status=sent \(250 2\.0\.0 Ok: queued as Q1\)", l) for l in lines), lines
    assert any(re.fullmatch(rf"{q2}: to=<a2@far\.test>, orig_to=<orig2@far\.test>, relay={relay}, "
                            r"conn_use=2, delay=[\d.]+, delays=[\d./]+, dsn=2\.0\.0, "
                            r"status=sent \(250 2\.0\.0 Ok: queued as Q2\)", l) for l in lines), lines
    # RFC 3461 5.2.2: the DSN-capable server got NOTIFY=SUCCESS; no notice from us.
    assert env.store.scan("incoming") == [] and env.store.scan("deferred") == []
    assert env.store.find(q1) is None and env.store.find(q2) is None


def test_success_notice_relayed_when_next_hop_lacks_dsn(tmp_path):
    srv = ScriptedServer(ehlo=("PIPELINING", "SIZE 10240000", "8BITMIME", "ENHANCEDSTATUSCODES"))

    async def go():
        await srv.start()
        try:
            env = _smtp_env(tmp_path, srv.port)
            qid = queue(env.store, "s@x.test",
                        [dict(address="a@far.test", notify="SUCCESS"), dict(address="b@far.test")],
                        envid="E-7", queue_name="active")
            qm = env.make(agents={"smtp": env.smtp})
            await qm.process(qid)
            env.smtp.close()
            return env, qid
        finally:
            await srv.stop()
    env, qid = run(go())
    cmds = srv.sessions[0]
    # No DSN extension: neither ENVID nor NOTIFY/ORCPT go out (RFC 3461 4).
    assert "MAIL FROM:<s@x.test> SIZE=33" in cmds and "RCPT TO:<a@far.test>" in cmds, cmds
    got = notices(env.store)
    assert len(got) == 1, got
    n = got[0]
    assert n.sender == "" and n.rcpts == ["s@x.test"]
    report = dsn_report(n.msg)
    assert "Final-Recipient: rfc822; a@far.test" in report
    assert "Action: relayed" in report and "b@far.test" not in report
    assert "Original-Envelope-Id: E-7" in report
    assert any(f"{qid}: sender delivery status notification: {n.qid}" in l
               for l in env.lines("bounce"))


def test_smtp_agent_dsn_action_per_server(tmp_path):
    """The agent side: None with DSN, "relayed" without; LMTP without DSN is
    "delivered" only with lmtp_assume_final = yes."""
    from postwell.delivery.base import DeliveryRequest
    from postwell.delivery.lmtp import LmtpDeliveryAgent
    from postwell.dns import FakeResolver
    import random

    def req(port):
        return DeliveryRequest(queue_id="Q", sender="s@x.test", recipients=[Recipient("a@far.test")],
                               transport="smtp", nexthop=f"[127.0.0.1]:{port}", arrival_time=0.0,
                               open_content=lambda: iter([b"Subject: t\n\nx\n"]), content_size=15)

    async def one(server, agent):
        await server.start()
        try:
            res = await agent.deliver(req(server.port))
            agent.close()
            return res[0]
        finally:
            await server.stop()
    with_dsn = run(one(ScriptedServer(), smtp_agent()))
    without = run(one(ScriptedServer(ehlo=("PIPELINING",)), smtp_agent()))
    assert with_dsn.status == "sent" and with_dsn.dsn_action is None
    assert without.status == "sent" and without.dsn_action == "relayed"
    for final, action in (("no", "relayed"), ("yes", "delivered")):
        lmtp = LmtpDeliveryAgent(make_config(lmtp_assume_final=final, lmtp_lhlo_name="client.test"),
                                 FakeResolver({}), NullLog("lmtp"), rng=random.Random(0),
                                 own_addresses=frozenset())
        res = run(one(ScriptedServer(ehlo=("PIPELINING",), lmtp_final={}), lmtp))
        assert res.status == "sent" and res.dsn_action == action, (final, res)


def test_envelope_params_reach_every_agent_as_attributes(tmp_path):
    env = make_env(tmp_path)
    queue(env.store, "s@x.test", [dict(address="a@ok.test", orig="o@ok.test",
                                       orcpt="rfc822;o@ok.test", notify="DELAY")],
          ret="FULL", envid="ID+2B1", smtputf8=True, body_type="8BITMIME")
    qm = env.make()

    async def go():
        qm.scan_incoming()
        await qm.drain()
    run(go())
    (req,) = env.ok.calls
    assert {k: req.attributes.get(k) for k in ("ret", "envid", "smtputf8", "body")} == \
        {"ret": "FULL", "envid": "ID+2B1", "smtputf8": "1", "body": "8BITMIME"}
    (rc,) = req.recipients
    assert (rc.address, rc.orig, rc.orcpt, rc.notify) == \
        ("a@ok.test", "o@ok.test", "rfc822;o@ok.test", "DELAY")


# ------------------------------------------------------------------ 3. local(8) expansions

class ExpandingAgent(_Agent):
    """Stands in for local(8): each recipient expands per ``plan``
    (address -> [(final, status, dsn, reason)])."""

    def __init__(self, plan):
        self.plan = plan

    async def deliver(self, req):
        out = []
        for rc in req.recipients:
            parts = []
            for final, status, dsn, reason in self.plan[rc.address]:
                who = Recipient(final, orig=rc.orig or rc.address, orcpt=rc.orcpt, notify=rc.notify)
                parts.append(RecipientResult(who, status, dsn, reason, "local"))
            pick = next((p for p in parts if p.status == "deferred"), None) \
                or next((p for p in parts if p.status == "bounced"), None) or parts[0]
            res = RecipientResult(rc, pick.status, pick.dsn, pick.reason, "local")
            res.expanded = parts
            out.append(res)
        return out


def test_expanded_results_logged_and_bounced_per_part(tmp_path):
    plan = {
        "root@mx.demo.test": [("pwtl1@mx.demo.test", "sent", "2.0.0", "delivered to mailbox")],
        "team@mx.demo.test": [
            ("pwtl1@mx.demo.test", "sent", "2.0.0", "delivered to mailbox"),
            ("nobody@mx.demo.test", "bounced", "5.1.1", "unknown user: \"nobody\""),
        ],
    }
    env = make_env(tmp_path, table={"mx.demo.test": ("local", "mx.demo.test")},
                   agents={"local": ExpandingAgent(plan)})
    qid = queue(env.store, "s@x.test", ["root@mx.demo.test", "team@mx.demo.test"])
    qm = env.make()

    async def go():
        qm.scan_incoming()
        await qm.drain()
    run(go(), )
    lines = [l for l in env.lines("local") if l.startswith(qid)]
    shape = r"delay=[\d.]+, delays=[\d./]+, dsn={}, status={} \({}\)"
    want = [
        (r"to=<pwtl1@mx\.demo\.test>, orig_to=<root@mx\.demo\.test>, relay=local, ",
         ("2\\.0\\.0", "sent", "delivered to mailbox")),
        (r"to=<pwtl1@mx\.demo\.test>, orig_to=<team@mx\.demo\.test>, relay=local, ",
         ("2\\.0\\.0", "sent", "delivered to mailbox")),
        (r"to=<nobody@mx\.demo\.test>, orig_to=<team@mx\.demo\.test>, relay=local, ",
         ("5\\.1\\.1", "bounced", 'unknown user: "nobody"')),
    ]
    assert len(lines) == 3, lines
    for (head, fields), line in zip(want, lines):
        assert re.fullmatch(rf"{qid}: " + head + shape.format(*fields), line), line
    # Both queue recipients are finished (the top-level status decides); the
    # bounce names the final address, expanded from the original one.
    assert env.store.find(qid) is None
    (n,) = notices(env.store)
    report = dsn_report(n.msg)
    assert "Final-Recipient: rfc822; nobody@mx.demo.test" in report
    assert "<nobody@mx.demo.test> (expanded from <team@mx.demo.test>): unknown user:" \
        in n.msg.as_string()
    assert "pwtl1" not in report


def test_expanded_deferred_part_defers_the_queue_recipient(tmp_path):
    plan = {"list@mx.demo.test": [
        ("u1@mx.demo.test", "sent", "2.0.0", "delivered to mailbox"),
        ("u2@mx.demo.test", "deferred", "4.2.0", "cannot update mailbox /var/mail/u2"),
    ]}
    env = make_env(tmp_path, table={"mx.demo.test": ("local", "mx.demo.test")},
                   agents={"local": ExpandingAgent(plan)})
    qid = queue(env.store, "s@x.test", ["list@mx.demo.test"])
    qm = env.make()

    async def go():
        qm.scan_incoming()
        await qm.drain()
    run(go())
    assert env.store.scan("deferred") == [qid]
    entries = env.store.read_defer_log(qid)
    assert [(e["recipient"], e["orig_rcpt"], e["status"]) for e in entries] == \
        [("u2@mx.demo.test", "list@mx.demo.test", "4.2.0")]
    qmsg = env.store.open(qid, "deferred")
    try:
        assert [r.done for r in qmsg.recipients] == [False]
    finally:
        qmsg.close()
    assert any("to=<u2@mx.demo.test>, orig_to=<list@mx.demo.test>, relay=local" in l
               and "status=deferred" in l for l in env.lines("local"))


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create users")


@needs_root
def test_real_local_agent_alias_logs_orig_to(env_factory, users):  # noqa: F811
    """With aliases ``root: pwtl1`` Postfix logs to=<pwtl1@host>, orig_to=<root@host>."""
    from postwell.policy.resolve import AddressResolver
    env = env_factory(aliases="root: pwtl1\n")
    qid = env.queue_message([f"root@{LOCAL_HOST}"])
    env.store.move(qid, "incoming", "active")
    logs = {}
    qmgr = QueueManager(env.cfg, env.store, log=NullLog("qmgr"), resolver=AddressResolver(env.cfg),
                        agent_logs=lambda n: logs.setdefault(n, NullLog(n)),
                        bounce_log=NullLog("bounce"))
    run(qmgr.process(qid), 60)
    lines = logs["local"].lines
    host = re.escape(LOCAL_HOST)
    assert any(re.fullmatch(rf"{qid}: to=<pwtl1@{host}>, orig_to=<root@{host}>, relay=local, "
                            r"delay=[\d.]+, delays=[\d./]+, dsn=2\.0\.0, "
                            r"status=sent \(delivered to mailbox\)", l) for l in lines), lines
    assert env.store.find(qid) is None


# ------------------------------------------------------------------ 5. crash exactness

def test_done_mark_does_not_wait_behind_blocked_io(tmp_path):
    """Every shared I/O thread is busy (mailbox writes of other deliveries):
    the done mark of a delivered recipient is still made durable at once."""
    release = threading.Event()
    seen = {}

    class Agent(_Agent):
        async def deliver(self, req):
            loop = asyncio.get_running_loop()
            # Occupy every thread of the shared executor, as a delivery backlog does.
            seen["blockers"] = [loop.run_in_executor(None, release.wait, 20) for _ in range(4)]
            await asyncio.sleep(0)
            return [RecipientResult.sent(r, "delivered to maildir", "virtual") for r in req.recipients]

    env = make_env(tmp_path, agents={"okay": Agent()})
    qid = queue(env.store, "s@x.test", ["a@ok.test"], queue_name="active")
    qm = env.make()

    def done_on_disk():
        # Removed (on the state threads, right after its last done mark) is done too.
        try:
            m = env.store.open(qid, "active", writable=False)
        except QueueFileNotFound:
            return [True]
        try:
            return [r.done for r in m.recipients]
        finally:
            m.close()

    async def go():
        loop = asyncio.get_running_loop()
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=4)
        loop.set_default_executor(pool)
        task = loop.create_task(qm.process(qid))
        try:
            for _ in range(400):
                await asyncio.sleep(0.005)
                if "blockers" in seen and done_on_disk() == [True] and \
                        any("status=sent" in l for l in env.lines("okay")):
                    break
            seen["done_while_blocked"] = done_on_disk()
            seen["log_while_blocked"] = list(env.lines("okay"))
        finally:
            release.set()
        await task
        pool.shutdown(wait=False)
    run(go())
    assert seen["done_while_blocked"] == [True]
    assert any("status=sent" in l for l in seen["log_while_blocked"])
    assert env.store.find(qid) is None


def test_completion_hook_marks_done_from_the_delivering_thread(tmp_path):
    """request.completed(rcpt) (Postfix's deliver_completed) marks a delivered
    recipient on disk at once, before deliver() even returns; a NOTIFY=SUCCESS
    recipient waits for its trace entry; late calls are ignored."""
    seen = {}
    release = threading.Event()

    class Agent(_Agent):
        async def deliver(self, req):
            def work():
                for rc in req.recipients:
                    seen.setdefault("hook", []).append(req.completed(rc))
                release.wait(10)
            await asyncio.get_running_loop().run_in_executor(None, work)
            seen["req"] = req
            return [RecipientResult.sent(r, "delivered to maildir", "virtual") for r in req.recipients]

    env = make_env(tmp_path, agents={"okay": Agent()})
    qid = queue(env.store, "s@x.test", ["a@ok.test", dict(address="b@ok.test", notify="SUCCESS")],
                queue_name="active")
    qm = env.make()

    def done_on_disk():
        m = env.store.open(qid, "active", writable=False)
        try:
            return [r.done for r in m.recipients]
        finally:
            m.close()

    async def go():
        task = asyncio.get_running_loop().create_task(qm.process(qid))
        try:
            for _ in range(400):
                await asyncio.sleep(0.005)
                if len(seen.get("hook", [])) == 2:
                    break
            seen["disk"] = done_on_disk()       # the agent has not returned yet
        finally:
            release.set()
        await task
        seen["late"] = seen["req"].completed(seen["req"].recipients[0])
    run(go())
    assert seen["hook"] == [True, False] and seen["late"] is False
    assert seen["disk"] == [True, False]
    assert env.store.find(qid) is None
    (n,) = notices(env.store)                   # b's success notice still went out
    assert "Action: delivered" in dsn_report(n.msg) and "b@ok.test" in dsn_report(n.msg)


def test_message_in_delivery_is_not_scheduled_again(tmp_path):
    class Slow(_Agent):
        def __init__(self):
            self.calls = 0
            self.gate = None

        async def deliver(self, req):
            self.calls += 1
            await self.gate.wait()
            return [RecipientResult.sent(r, "ok", "virtual") for r in req.recipients]
    slow = Slow()
    env = make_env(tmp_path, agents={"okay": slow})
    qid = queue(env.store, "s@x.test", ["a@ok.test"])
    qm = env.make()

    async def go():
        slow.gate = asyncio.Event()
        assert qm.scan_incoming() == [qid]
        for _ in range(100):
            await asyncio.sleep(0.005)
            if slow.calls:
                break
        # The wake-up scans and a start-up style recovery find it in active/: not again.
        assert qm.scan_incoming() == [] and qm.recover_active() == []
        assert qm.scan_deferred(force=True) == []
        slow.gate.set()
        await qm.drain()
    run(go())
    assert slow.calls == 1 and env.store.find(qid) is None


# ------------------------------------------------------------------ 6. transports

def test_every_agent_reachable_through_transport_maps(tmp_path):
    """transport_maps / relayhost / default_transport pick each agent by its
    master.cf command name, with the nexthop the agent needs."""
    from postwell.policy.resolve import AddressResolver
    tmap = tmp_path / "transport"
    tmap.write_text("example.com smtp:[127.0.0.1]:2526\n"
                    "relay.test relay:[127.0.0.1]:2527\n"
                    "lmtp.test lmtp:unix:private/dovecot-lmtp\n"
                    "pipe.test pipe:\n"
                    "discard.test discard:silently\n"
                    "error.test error:5.1.1 no such user\n"
                    "retry.test retry:4.3.2 try again later\n"
                    "virtual.test virtual:\n"
                    "local.test local:\n")
    cfg = Config(str(tmp_path), {
        "myhostname": "mx.demo.test", "mydomain": "demo.test", "mydestination": "mx.demo.test",
        "transport_maps": f"texthash:{tmap}", "relayhost": "[127.0.0.1]:2599",
        "relay_domains": "relay.test", "queue_directory": str(tmp_path / "q"),
    }, {}, [])
    r = AddressResolver(cfg)
    got = {d: (x.transport, x.nexthop) for d in
           ("example.com", "relay.test", "lmtp.test", "pipe.test", "discard.test", "error.test",
            "retry.test", "virtual.test", "local.test", "elsewhere.test")
           for x in [r.resolve(f"u@{d}")]}
    assert got["example.com"] == ("smtp", "[127.0.0.1]:2526")
    assert got["relay.test"] == ("relay", "[127.0.0.1]:2527")
    assert got["lmtp.test"] == ("lmtp", "unix:private/dovecot-lmtp")
    assert got["error.test"] == ("error", "5.1.1 no such user")
    assert got["retry.test"] == ("retry", "4.3.2 try again later")
    assert got["discard.test"] == ("discard", "silently")
    assert got["elsewhere.test"] == ("smtp", "[127.0.0.1]:2599")       # relayhost
    for d in ("pipe", "virtual", "local"):
        assert got[f"{d}.test"][0] == d
    # Each transport name maps to its agent (master.cf command = name here).
    for name in AGENTS:
        assert agent_class(name) is not None, name
    disabled = AddressResolver(Config(str(tmp_path), {
        "myhostname": "mx.demo.test", "mydestination": "mx.demo.test",
        "default_transport": "error:mail disabled"}, {}, []))
    x = disabled.resolve("u@far.example")
    assert (x.transport, x.nexthop) == ("error", "mail disabled")


def test_error_retry_discard_through_the_qmgr(tmp_path):
    table = {"error.test": ("error", "5.1.1 no such user"),
             "retry.test": ("retry", "4.3.2 try again later"),
             "discard.test": ("discard", "silently"),
             "off.test": ("error", "mail disabled")}
    env = make_env(tmp_path, table=table)
    qm = env.make(agents={})
    qm._agents.pop("okay")
    qid = queue(env.store, "s@x.test", ["a@error.test", "b@retry.test", "c@discard.test",
                                        "d@off.test"])

    async def go():
        qm.scan_incoming()
        await qm.drain()
    run(go())
    assert any(re.search(r"to=<a@error\.test>, relay=none, .*dsn=5\.1\.1, status=bounced "
                         r"\(no such user\)", l) for l in env.lines("error"))
    assert any(re.search(r"to=<d@off\.test>, relay=none, .*dsn=5\.0\.0, status=bounced "
                         r"\(mail disabled\)", l) for l in env.lines("error"))
    assert any(re.search(r"to=<b@retry\.test>, relay=none, .*dsn=4\.3\.2, status=deferred "
                         r"\(try again later\)", l) for l in env.lines("retry"))
    assert any(re.search(r"to=<c@discard\.test>, relay=none, .*status=sent \(silently\)", l)
               for l in env.lines("discard"))
    assert env.store.scan("deferred") == [qid]


# ------------------------------------------------------------------ 7. slow start

def test_parse_feedback_forms():
    assert parse_feedback("1") == (1.0, False)
    assert parse_feedback("1/4") == (0.25, False)
    assert parse_feedback("1 / concurrency") == (1.0, True)
    for bad in ("2", "x", "1/0", "-1"):
        with pytest.raises(ValueError):
            parse_feedback(bad)


def test_window_grows_with_success_and_stops_at_limit():
    d = Destination(initial=5, limit=8)
    assert d.window == 5
    d.busy = 5
    for want in (6, 7, 8, 8):
        d.succeeded()
        assert d.window == want
    # 1/concurrency: one step per window's worth of successes.
    d = Destination(initial=5, limit=20, positive=(1.0, True))
    d.busy = 5
    for _ in range(4):
        d.succeeded()
    assert d.window == 5
    d.succeeded()
    assert d.window == 6
    # An unused window does not grow past busy + initial.
    d = Destination(initial=5, limit=20)
    for _ in range(10):
        d.succeeded()
    assert d.window == 5


def test_failures_shrink_window_then_declare_dead():
    d = Destination(initial=5, limit=20)
    assert d.failed(100.0, "connect refused", "4.4.1") is False and d.window == 4
    assert d.failed(100.0, "connect refused", "4.4.1") is False and d.window == 3
    assert d.failed(100.0, "connect refused", "4.4.1") is False and d.window == 2
    # 1/5 + 1/4 + 1/3 + 1/2 >= 1 failed pseudo-cohort: dead.
    assert d.failed(100.0, "connect refused", "4.4.1") is True
    assert d.dead == (100.0, "connect refused", "4.4.1")
    d.resume()
    assert d.dead is None and d.window == 5
    # A success in between resets the cohort count.
    d = Destination(initial=2, limit=20)
    d.failed(1, "x", "4.4.1")
    d.succeeded()
    assert d.fail_cohorts == 0 and d.dead is None
    # failed_cohort_limit 0: never dead, the window stays >= 1.
    d = Destination(initial=3, limit=20, cohort_limit=0)
    for _ in range(10):
        assert d.failed(1, "x", "4.4.1") is False
    assert d.window == 1 and d.dead is None


def test_slow_start_ramp_through_the_qmgr(tmp_path):
    state = {"now": 0, "peak": 0, "first_batch": None, "done": 0}

    class Agent(_Agent):
        async def deliver(self, req):
            state["now"] += 1
            state["peak"] = max(state["peak"], state["now"])
            await asyncio.sleep(0.01)
            if state["first_batch"] is None:
                state["first_batch"] = state["peak"]
            state["now"] -= 1
            return [RecipientResult.sent(r, "ok", "h[192.0.2.1]:25") for r in req.recipients]
    env = make_env(tmp_path, {"smtp_destination_concurrency_limit": "12"},
                   table={"far.test": ("smtp", "far.test")}, agents={"smtp": Agent()})
    for i in range(60):
        queue(env.store, "s@x.test", [f"u{i}@far.test"])
    qm = env.make()

    async def go():
        qm.scan_incoming()
        await qm.drain()
    run(go())
    assert state["first_batch"] == 5          # initial_destination_concurrency
    assert 5 < state["peak"] <= 12            # grew, never past the limit
    assert env.store.scan("incoming") == [] and env.store.scan("deferred") == []
    assert qm._destinations == {}             # nothing left behind for an idle destination


def test_dead_destination_defers_waiters_and_keeps_slots_free(tmp_path):
    calls = {"dead": 0, "live": 0, "live_while_dead_busy": 0}
    dead_busy = {"n": 0, "peak": 0}

    class Refusing(_Agent):
        async def deliver(self, req):
            calls["dead"] += 1
            dead_busy["n"] += 1
            dead_busy["peak"] = max(dead_busy["peak"], dead_busy["n"])
            await asyncio.sleep(0.05)            # a connect timeout, shortened
            dead_busy["n"] -= 1
            return [RecipientResult.deferred(r, "connect to mx.dead.test[192.0.2.1]:25: "
                                             "Connection timed out", "none", "4.4.1")
                    for r in req.recipients]

    class Live(_Agent):
        async def deliver(self, req):
            calls["live"] += 1
            if dead_busy["n"]:
                calls["live_while_dead_busy"] += 1
            return [RecipientResult.sent(r, "ok", "mx.live.test[192.0.2.2]:25")
                    for r in req.recipients]
    env = make_env(tmp_path, {"default_process_limit": "8", "minimal_backoff_time": "300s"},
                   table={"dead.test": ("smtp", "dead.test"), "live.test": ("smtp", "live.test")},
                   agents={"smtp": None})
    dead_q = [queue(env.store, "s@x.test", [f"d{i}@dead.test"]) for i in range(30)]
    live_q = [queue(env.store, "s@x.test", [f"l{i}@live.test"]) for i in range(10)]
    qm = env.make()

    class Router(_Agent):
        def __init__(self):
            self.dead, self.live = Refusing(), Live()

        async def deliver(self, req):
            return await (self.dead if req.nexthop == "dead.test" else self.live).deliver(req)
    qm._agents["smtp"] = Router()

    async def go():
        qm.scan_incoming()
        await qm.drain()
    run(go())
    # Only the initial window ever tried the dead destination; everyone else
    # waiting for it was deferred at once, and the live one was never starved.
    assert calls["dead"] == 5 and dead_busy["peak"] == 5
    assert calls["live"] == 10 and calls["live_while_dead_busy"] >= 1
    assert sorted(env.store.scan("deferred")) == sorted(dead_q)
    suspended = [l for l in env.lines("smtp") if "status=deferred (delivery temporarily suspended: "
                 "connect to mx.dead.test[192.0.2.1]:25: Connection timed out)" in l]
    assert len(suspended) == 25
    assert all(env.store.find(q) is None for q in live_q)
    dead = qm.dead_destinations()
    assert list(dead) == [("smtp", "dead.test")] and dead[("smtp", "dead.test")][0] == T0 + 300

    # Fake clock: before the backoff is over, still suspended without a try;
    # after it, the destination gets a fresh window.
    async def retry(advance):
        env.clock.t += advance
        assert qm.scan_deferred(force=True)
        await qm.drain()
    before = calls["dead"]
    run(retry(299))
    assert calls["dead"] == before
    run(retry(2))
    assert calls["dead"] == before + 5


def test_per_recipient_destination_when_recipient_limit_is_one(tmp_path):
    state = {"now": {}, "peak": {}}

    class Agent(_Agent):
        async def deliver(self, req):
            (rc,) = req.recipients
            state["now"][rc.address] = state["now"].get(rc.address, 0) + 1
            state["peak"][rc.address] = max(state["peak"].get(rc.address, 0),
                                            state["now"][rc.address])
            await asyncio.sleep(0.01)
            state["now"][rc.address] -= 1
            return [RecipientResult.sent(rc, "delivered to mailbox", "local")]
    # local(8): destination_recipient_limit 1, concurrency limit 2 (Postfix defaults)
    env = make_env(tmp_path, table={"mx.demo.test": ("local", "mx.demo.test")},
                   agents={"local": Agent()})
    for i in range(6):
        queue(env.store, "s@x.test", ["a@mx.demo.test", "b@mx.demo.test", "c@mx.demo.test"])
    qm = env.make()

    async def go():
        qm.scan_incoming()
        await qm.drain()
    run(go())
    assert state["peak"] == {"a@mx.demo.test": 2, "b@mx.demo.test": 2, "c@mx.demo.test": 2}


def test_flush_revives_dead_destinations(tmp_path):
    calls = []

    class Refused(_Agent):
        async def deliver(self, req):
            calls.append(req.queue_id)
            return [RecipientResult.deferred(r, "connect to mx.far.test[192.0.2.1]:25: "
                                             "Connection refused", "none", "4.4.1")
                    for r in req.recipients]
    env = make_env(tmp_path, {"smtp_initial_destination_concurrency": "1"},
                   table={"far.test": ("smtp", "far.test")}, agents={"smtp": Refused()})
    queue(env.store, "s@x.test", ["a@far.test"])
    qm = env.make()

    async def go():
        qm.scan_incoming()
        await qm.drain()
        assert list(qm.dead_destinations()) == [("smtp", "far.test")]
        qm.flush()                      # postqueue -f: QMGR_REQ_FLUSH_DEAD
        assert qm.dead_destinations() == {}
        assert qm.scan_deferred(force=True)
        await qm.drain()
    run(go())
    assert len(calls) == 2              # tried again at once, no waiting for the backoff


def test_resolver_gets_the_sender_when_it_takes_one(tmp_path):
    seen = []

    class SenderAware(Resolver):
        def resolve(self, address, sender=None):
            seen.append((address, sender))
            return super().resolve(address)
    env = make_env(tmp_path)
    queue(env.store, "owner@list.test", ["a@ok.test"])
    qm = env.make()
    qm.resolver = SenderAware()        # sender_dependent_relayhost_maps need the sender

    async def go():
        qm.scan_incoming()
        await qm.drain()
    run(go())
    assert seen == [("a@ok.test", "owner@list.test")]
