"""content_filter and per-message FILTER: cleanup stamps the filter, the qmgr
sends every recipient through it, and the filter's re-injected copy (through a
listener with ``-o content_filter=``) is delivered normally.

Postfix facts followed here: smtpd and pickup (not bounce, local forwarding or
``sendmail -bs``) record main.cf content_filter; an access-map FILTER and then a
header_checks FILTER replace it, the last one winning (access(5),
header_checks(5)); the qmgr routes a filtered message to the filter's
transport and next hop without asking the address resolver, and a filter
without a next hop goes to $myhostname (qmgr_message_resolve).
"""

from __future__ import annotations

import asyncio
import re
import smtplib
import socket
import threading
from types import SimpleNamespace

import pytest

from postwell.cleanup import Cleanup
from postwell.cleanup.service import FILTER_ATTRIBUTE as CLEANUP_FILTER_ATTRIBUTE
from postwell.cleanup.service import REDIRECT_ATTRIBUTE as CLEANUP_REDIRECT_ATTRIBUTE
from postwell.config.main import Config
from postwell.delivery.base import DeliveryAgent, RecipientResult
from postwell.log import NullLog
from postwell.qmgr.filter import FILTER_ATTRIBUTE, REDIRECT_ATTRIBUTE, filter_route, message_filter
from postwell.qmgr.manager import QueueManager
from postwell.queue import QueueStore
from test_qmgr import queue_env

T0 = 1_795_932_674.5


# ---------------------------------------------------------------- routing decision

def test_filter_route_splits_at_the_first_colon():
    assert filter_route("smtp:[127.0.0.1]:10024", "mx.test") == ("smtp", "[127.0.0.1]:10024")
    assert filter_route("scan:127.0.0.1:10025", "mx.test") == ("scan", "127.0.0.1:10025")
    assert filter_route("lmtp:unix:/var/run/f.sock", "mx.test") == ("lmtp", "unix:/var/run/f.sock")
    assert filter_route("lmtp:inet:[::1]:24", "mx.test") == ("lmtp", "inet:[::1]:24")


def test_filter_without_nexthop_goes_to_myhostname():
    # Postfix: split_at(':') == 0 || *nexthop == 0 -> nexthop = $myhostname.
    assert filter_route("scan", "mx.test") == ("scan", "mx.test")
    assert filter_route("scan:", "mx.test") == ("scan", "mx.test")


def test_no_filter():
    assert filter_route(None, "mx.test") is None
    assert filter_route("", "mx.test") is None
    assert filter_route("  ", "mx.test") is None
    assert message_filter({}, "mx.test") is None
    assert message_filter(None, "mx.test") is None
    assert message_filter({"other": "x"}, "mx.test") is None
    assert message_filter({FILTER_ATTRIBUTE: "smtp:[127.0.0.1]:1"}, "h") == ("smtp", "[127.0.0.1]:1")


def test_qmgr_and_cleanup_agree_on_the_attribute():
    assert FILTER_ATTRIBUTE == CLEANUP_FILTER_ATTRIBUTE
    assert REDIRECT_ATTRIBUTE == CLEANUP_REDIRECT_ATTRIBUTE


def test_redirect_overrides_the_filter():
    # Postfix's qmgr_message_resolve: "Redirect overrides all else".
    attrs = {FILTER_ATTRIBUTE: "scan:[127.0.0.1]:10024", REDIRECT_ATTRIBUTE: "r@x.test"}
    assert message_filter(attrs, "h") is None


# ---------------------------------------------------------------- qmgr

class ForbiddenResolver:
    """A filtered message must not be resolved (transport_maps, relayhost, MX)."""

    def __init__(self):
        self.asked = []

    def resolve(self, address):
        self.asked.append(address)
        domain = address.rsplit("@", 1)[-1]
        return SimpleNamespace(address_class="virtual", transport="okay", nexthop=domain,
                               recipient="rewritten-" + address)


class RecordingAgent(DeliveryAgent):
    def __init__(self, name, result="sent"):
        self.name = name
        self.result = result
        self.calls = []

    async def deliver(self, req):
        self.calls.append((req.transport, req.nexthop,
                           [(r.address, getattr(r, "nexthop_recipient", None)) for r in req.recipients]))
        if self.result == "sent":
            return [RecipientResult.sent(r, "250 2.0.0 Ok: queued as F1", "127.0.0.1[127.0.0.1]:10024")
                    for r in req.recipients]
        return [RecipientResult.deferred(r, "connect to 127.0.0.1[127.0.0.1]:10024: Connection refused",
                                         "127.0.0.1[127.0.0.1]:10024", "4.4.1")
                for r in req.recipients]


@pytest.fixture
def qenv(tmp_path):
    qdir, cfg, clock, store = queue_env(tmp_path)
    logs = {}
    resolver = ForbiddenResolver()
    okay, scan = RecordingAgent("okay"), RecordingAgent("scan")

    def make(scan_agent=None):
        return QueueManager(cfg, store, log=NullLog("qmgr"), clock=clock, resolver=resolver,
                            bounce_log=NullLog("bounce"),
                            agents={"okay": okay, "scan": scan_agent or scan},
                            agent_logs=lambda name: logs.setdefault(name, NullLog(name)))
    return SimpleNamespace(cfg=cfg, store=store, resolver=resolver, okay=okay, scan=scan,
                           logs=logs, make=make)


def _queue(store, rcpts, filt=None):
    msg = store.create()
    msg.set_sender("s@x.test")
    for r in rcpts:
        msg.add_recipient(r, orig=r)
    if filt is not None:
        msg.set_attribute(FILTER_ATTRIBUTE, filt)
    msg.write(b"Subject: t\n\nhello\n")
    msg.commit()
    return msg.queue_id


def _drain(qm):
    async def go():
        qm.scan_incoming()
        await qm.drain()
    asyncio.run(asyncio.wait_for(go(), 10))


def test_filtered_message_goes_to_the_filter_with_all_recipients(qenv):
    qid = _queue(qenv.store, ["a@one.test", "b@two.test", "c@three.test"], "scan:[127.0.0.1]:10024")
    _drain(qenv.make())
    assert qenv.resolver.asked == []
    assert qenv.okay.calls == []
    # One delivery, every recipient, unchanged (no resolver rewrite).
    assert qenv.scan.calls == [("scan", "[127.0.0.1]:10024",
                                [("a@one.test", "a@one.test"), ("b@two.test", "b@two.test"),
                                 ("c@three.test", "c@three.test")])]
    assert qenv.store.find(qid) is None
    lines = qenv.logs["scan"].lines
    assert len(lines) == 3
    assert re.fullmatch(rf"{qid}: to=<a@one\.test>, relay=127\.0\.0\.1\[127\.0\.0\.1\]:10024, "
                        r"delay=[\d.]+, delays=[\d./]+, dsn=2\.0\.0, status=sent "
                        r"\(250 2\.0\.0 Ok: queued as F1\)", lines[0])


def test_unfiltered_message_is_resolved_as_usual(qenv):
    _queue(qenv.store, ["a@one.test"])
    _drain(qenv.make())
    assert qenv.resolver.asked == ["a@one.test"]
    assert qenv.scan.calls == []
    # Without a filter the resolver's answer counts, address included: Postfix's
    # qmgr_message_resolve() replaces the recipient by the resolved one
    # (RECIPIENT_UPDATE), so the agent delivers to it and the log names it, with the
    # queued address as orig_to= (checked against 3.7: bob%virtual.test@mx.example.test
    # is delivered and logged as to=<bob@virtual.test>, orig_to=<bob%virtual.test@...>).
    assert qenv.okay.calls == [("okay", "one.test",
                                [("rewritten-a@one.test", "rewritten-a@one.test")])]
    line, = qenv.logs["okay"].lines
    assert "to=<rewritten-a@one.test>, orig_to=<a@one.test>, relay=" in line


def test_filter_without_nexthop_uses_myhostname(qenv):
    _queue(qenv.store, ["a@one.test"], "scan")
    _drain(qenv.make())
    assert qenv.scan.calls[0][:2] == ("scan", "mx.demo.test")


def test_filter_recipient_limit_still_applies(qenv):
    qenv.cfg.params["scan_destination_recipient_limit"] = "2"
    _queue(qenv.store, [f"r{i}@x.test" for i in range(5)], "scan:[127.0.0.1]:10024")
    _drain(qenv.make())
    assert [len(c[2]) for c in qenv.scan.calls] == [2, 2, 1]


def test_filter_down_defers_the_message(qenv):
    qid = _queue(qenv.store, ["a@one.test", "b@two.test"], "scan:[127.0.0.1]:10024")
    _drain(qenv.make(RecordingAgent("scan", result="deferred")))
    assert qenv.store.scan("deferred") == [qid]
    assert qenv.resolver.asked == []
    lines = qenv.logs["scan"].lines
    assert len(lines) == 2 and all("dsn=4.4.1, status=deferred (connect to 127.0.0.1" in ln
                                   for ln in lines)


def test_bounce_from_the_filter_is_not_filtered(qenv):
    # Postfix's bounce daemon does not stamp content_filter: the notice goes to
    # the sender by the usual route, never back into the filter.
    qenv.cfg.params["content_filter"] = "scan:[127.0.0.1]:10024"

    class Refuse(RecordingAgent):
        async def deliver(self, req):
            return [RecipientResult.bounced(r, "host 127.0.0.1[127.0.0.1] said: 554 5.7.1 virus",
                                            "127.0.0.1[127.0.0.1]:10024", "5.7.1")
                    for r in req.recipients]
    qid = _queue(qenv.store, ["a@one.test"], "scan:[127.0.0.1]:10024")
    qm = qenv.make(Refuse("scan"))

    async def go():
        qm.scan_incoming()
        await qm.drain()
    asyncio.run(asyncio.wait_for(go(), 10))
    notices = [n for n in qenv.store.scan("incoming") if n != qid]
    assert len(notices) == 1
    with qenv.store.open(notices[0], "incoming") as q:
        assert q.sender == "" and [r.address for r in q.recipients] == ["s@x.test"]
        assert FILTER_ATTRIBUTE not in dict(q.attributes)


def test_unknown_filter_transport_defers(qenv):
    qid = _queue(qenv.store, ["a@one.test"], "nosuch:[127.0.0.1]:10024")
    _drain(qenv.make())
    assert qenv.store.scan("deferred") == [qid]
    assert any("status=deferred (mail transport unavailable)" in ln
               for lg in qenv.logs.values() for ln in lg.lines)


# ---------------------------------------------------------------- cleanup

def _cleanup(tmp_path, params=None, overrides=None, header_rules=None):
    p = {"myhostname": "mx.example.test", "mydestination": "mx.example.test"}
    if header_rules is not None:
        path = tmp_path / "header_checks"
        path.write_text(header_rules)
        p["header_checks"] = f"regexp:{path}"
    p.update(params or {})
    cfg = Config(str(tmp_path), p, dict(overrides or {}), [])
    store = QueueStore(str(tmp_path / "q"), clock=lambda: T0)
    store.ensure_layout()
    return Cleanup(cfg, store, NullLog("cleanup")), store


def _submit(c, store, subject="plain", checks=True, access_filter=None):
    cs = c.open(content_checks=checks)
    cs.set_sender("s@example.test")
    cs.add_recipient("u@example.test")
    if access_filter is not None:
        cs.set_filter(access_filter)
    cs.write(f"Subject: {subject}\r\n\r\nbody\r\n".encode())
    reply = asyncio.run(asyncio.wait_for(cs.finish(), 20))
    assert reply.code == 250, reply
    with store.open(cs.queue_id, "incoming") as q:
        return dict(q.attributes).get(FILTER_ATTRIBUTE)


def test_content_filter_is_stamped_on_received_mail(tmp_path):
    c, store = _cleanup(tmp_path, {"content_filter": "smtp:[127.0.0.1]:10024"})
    assert _submit(c, store) == "smtp:[127.0.0.1]:10024"


def test_content_filter_not_stamped_on_internal_mail(tmp_path):
    # Bounce notices, forwarded copies: Postfix's bounce and local do not record it.
    c, store = _cleanup(tmp_path, {"content_filter": "smtp:[127.0.0.1]:10024"})
    assert _submit(c, store, checks=False) is None


def test_empty_override_turns_the_filter_off(tmp_path):
    # The re-injection listener: master.cf -o content_filter=
    c, store = _cleanup(tmp_path, {"content_filter": "smtp:[127.0.0.1]:10024"},
                        overrides={"content_filter": ""})
    assert _submit(c, store) is None


def test_no_content_filter_by_default(tmp_path):
    c, store = _cleanup(tmp_path)
    assert _submit(c, store) is None


def test_content_filter_is_expanded(tmp_path):
    c, store = _cleanup(tmp_path, {"content_filter": "scan:[127.0.0.1]:$scan_port",
                                   "scan_port": "10030"})
    assert _submit(c, store) == "scan:[127.0.0.1]:10030"


def test_no_header_body_checks_keeps_content_filter(tmp_path):
    # receive_override_options has no option for content_filter (only -o content_filter=).
    c, store = _cleanup(tmp_path, {"content_filter": "smtp:[127.0.0.1]:10024",
                                   "receive_override_options": "no_header_body_checks"})
    assert _submit(c, store) == "smtp:[127.0.0.1]:10024"


RULES = "/^Subject: filter-me/ FILTER scan:[127.0.0.1]:10099\n"


def test_access_filter_overrides_content_filter(tmp_path):
    c, store = _cleanup(tmp_path, {"content_filter": "smtp:[127.0.0.1]:10024"})
    assert _submit(c, store, access_filter="other:[127.0.0.1]:10026") == "other:[127.0.0.1]:10026"


def test_access_filter_applies_without_content_checks(tmp_path):
    c, store = _cleanup(tmp_path)
    assert _submit(c, store, checks=False, access_filter="other:x") == "other:x"


def test_header_filter_overrides_access_filter_and_content_filter(tmp_path):
    c, store = _cleanup(tmp_path, {"content_filter": "smtp:[127.0.0.1]:10024"}, header_rules=RULES)
    assert _submit(c, store, "filter-me", access_filter="other:[127.0.0.1]:10026") == \
        "scan:[127.0.0.1]:10099"
    # No match: the access-map FILTER stays, then content_filter.
    assert _submit(c, store, "plain", access_filter="other:[127.0.0.1]:10026") == \
        "other:[127.0.0.1]:10026"
    assert _submit(c, store, "plain") == "smtp:[127.0.0.1]:10024"


def test_redirected_message_is_marked(tmp_path):
    c, store = _cleanup(tmp_path, {"content_filter": "smtp:[127.0.0.1]:10024"})
    cs = c.open(content_checks=True)
    cs.set_sender("s@example.test")
    cs.add_recipient("u@example.test")
    cs.set_redirect("r@example.test")
    cs.write(b"Subject: s\r\n\r\nb\r\n")
    assert asyncio.run(asyncio.wait_for(cs.finish(), 20)).code == 250
    with store.open(cs.queue_id, "incoming") as q:
        attrs = dict(q.attributes)
    # Both records stay, as in Postfix's queue file; the qmgr lets the redirect win.
    assert attrs[FILTER_ATTRIBUTE] == "smtp:[127.0.0.1]:10024"
    assert attrs[REDIRECT_ATTRIBUTE] == "r@example.test"
    assert message_filter(attrs, "h") is None


def test_header_filter_off_with_no_header_body_checks(tmp_path):
    # The usual re-injection listener also sets no_header_body_checks, so a
    # header_checks FILTER cannot loop.
    c, store = _cleanup(tmp_path, header_rules=RULES,
                        overrides={"content_filter": "",
                                   "receive_override_options": "no_header_body_checks"})
    assert _submit(c, store, "filter-me") is None


# ---------------------------------------------------------------- end to end

harness = pytest.importorskip("harness")


class FilterServer:
    """A loopback SMTP content filter: records each message, re-injects it to
    ``reinject_port`` and answers 250 only after the re-injection was accepted
    (as amavisd and the FILTER_README simple filter do)."""

    def __init__(self, reinject_port: int):
        self.reinject_port = reinject_port
        self.received: list[tuple[str, list[str], bytes]] = []
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.5)
        self.port = self.sock.getsockname()[1]
        self.stopping = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def close(self):
        self.stopping = True
        self.thread.join(10)
        self.sock.close()

    def _serve(self):
        while not self.stopping:
            try:
                conn, _ = self.sock.accept()
            except (socket.timeout, OSError):
                continue
            # One thread per connection: an idle cached connection must not
            # hold up the next delivery.
            threading.Thread(target=self._connection, args=(conn,), daemon=True).start()

    def _connection(self, conn):
        with conn:
            conn.settimeout(20)
            try:
                self._session(conn.makefile("rb"), conn)
            except (OSError, ValueError):
                pass

    def _session(self, rf, conn):
        def send(text):
            conn.sendall(text.encode() + b"\r\n")
        send("220 filter.test ESMTP")
        sender, rcpts = "", []
        while True:
            line = rf.readline(4096)
            if not line:
                return
            cmd = line.decode("ascii", "replace").rstrip("\r\n")
            verb = cmd[:4].upper()
            if verb in ("EHLO", "HELO"):
                send("250-filter.test\r\n250 8BITMIME" if verb == "EHLO" else "250 filter.test")
            elif verb == "MAIL":
                sender, rcpts = re.search(r"<([^>]*)>", cmd).group(1), []
                send("250 2.1.0 Ok")
            elif verb == "RCPT":
                rcpts.append(re.search(r"<([^>]*)>", cmd).group(1))
                send("250 2.1.5 Ok")
            elif verb == "DATA":
                send("354 End data with <CR><LF>.<CR><LF>")
                data = bytearray()
                while True:
                    ln = rf.readline(65536)
                    if not ln or ln in (b".\r\n", b".\n"):
                        break
                    data += ln[1:] if ln.startswith(b".") else ln
                self.received.append((sender, list(rcpts), bytes(data)))
                try:
                    with smtplib.SMTP("127.0.0.1", self.reinject_port, timeout=20) as s:
                        s.sendmail(sender, rcpts, b"X-Filtered: yes\r\n" + bytes(data))
                    send("250 2.0.0 Ok: filtered and re-injected")
                except (OSError, smtplib.SMTPException) as exc:
                    send(f"451 4.3.0 re-injection failed: {type(exc).__name__}")
            elif verb == "RSET":
                send("250 2.0.0 Ok")
            elif verb == "QUIT":
                send("221 2.0.0 Bye")
                return
            else:
                send("502 5.5.2 Error: command not recognized")


@pytest.mark.timeout(120)
@pytest.mark.skipif(not harness.is_root(), reason="drops privileges: needs root")
def test_content_filter_end_to_end(tmp_path):
    reinject_port = harness.free_port()
    filt = FilterServer(reinject_port)
    inst = harness.PostwellInstance(tmp_path, name="content-filter")
    try:
        rules = inst.config_dir / "header_checks"
        # relayhost would send smtp mail elsewhere: the filter's next hop wins.
        inst.main_cf = {"content_filter": f"smtp:[127.0.0.1]:{filt.port}",
                        "header_checks": f"regexp:{rules}",
                        "relayhost": f"[127.0.0.1]:{harness.free_port()}"}
        inst.master_cf = inst.default_master_cf() + (
            "pickup    unix  n       -       n       60      1       pickup\n"
            "smtp      unix  -       -       n       -       -       smtp\n"
            "scan      unix  -       -       n       -       -       smtp\n"
            f"127.0.0.1:{reinject_port} inet n - n - - smtpd\n"
            "    -o content_filter=\n"
            "    -o receive_override_options=no_header_body_checks\n")
        inst.write_config()
        rules.write_text(f"/^Subject: per-message/ FILTER scan:[127.0.0.1]:{filt.port}\n")
        inst.start()
        harness.wait_port(reinject_port, 15)
        alice, bob = (f"{u}@{harness.VIRTUAL_DOMAIN}" for u in ("alice", "bob"))
        with smtplib.SMTP("127.0.0.1", inst.port, timeout=20) as s:
            s.sendmail("s@remote.example", [alice, bob],
                       b"Subject: hello filter\r\nMessage-ID: <cf1@remote.example>\r\n\r\nbody one\r\n")
        a = inst.wait_maildir("alice", 1, timeout=30)
        b = inst.wait_maildir("bob", 1, timeout=30)
        # The filter saw the message once, with both recipients, in one delivery.
        assert len(filt.received) == 1
        sender, rcpts, data = filt.received[0]
        assert (sender, sorted(rcpts)) == ("s@remote.example", sorted([alice, bob]))
        assert b"body one" in data
        # The re-injected copy was delivered normally (not filtered again).
        for path in (a[0], b[0]):
            text = path.read_bytes()
            assert b"X-Filtered: yes" in text and b"body one" in text
        log = inst.log_text()
        sent = re.findall(rf"postfix/smtp\[\d+\]: (\w+): to=<([^>]+)>, "
                          rf"relay=127\.0\.0\.1\[127\.0\.0\.1\]:{filt.port}(?:, conn_use=\d+)?, "
                          r"delay=[\d.]+, delays=[\d./]+, dsn=2\.0\.0, status=sent "
                          r"\(250 2\.0\.0 Ok: filtered and re-injected\)", log)
        assert sorted(r for _, r in sent) == sorted([alice, bob]) and len({q for q, _ in sent}) == 1
        assert re.search(rf"postfix/virtual\[\d+\]: \w+: to=<{re.escape(alice)}>, relay=virtual, "
                         r".*status=sent \(delivered to maildir\)", log)
        assert len(filt.received) == 1

        # header_checks FILTER for one message: its own transport, same filter host.
        with smtplib.SMTP("127.0.0.1", inst.port, timeout=20) as s:
            s.sendmail("s@remote.example", [alice],
                       b"Subject: per-message filter\r\n\r\nbody two\r\n")
        inst.wait_maildir("alice", 2, timeout=30)
        assert len(filt.received) == 2 and b"body two" in filt.received[1][2]
        m = inst.wait_log(r"postfix/cleanup\[\d+\]: (\w+): filter: header Subject: per-message "
                          rf"filter from .*: scan:\[127\.0\.0\.1\]:{filt.port}$", timeout=10)
        # The agent logs under its program name (postfix/smtp), not the service's.
        inst.wait_log(rf"postfix/smtp\[\d+\]: {m.group(1)}: to=<{re.escape(alice)}>, "
                      rf"relay=127\.0\.0\.1\[127\.0\.0\.1\]:{filt.port}, .*status=sent "
                      r"\(250 2\.0\.0 Ok: filtered and re-injected\)", timeout=10)

        # Local submission (sendmail -> maildrop -> pickup) is filtered too.
        cp = inst.run("sendmail", "-f", "local@example.test", "-i", alice,
                      input="Subject: from sendmail\n\nbody three\n", timeout=30)
        assert cp.returncode == 0, cp.stderr
        inst.wait_maildir("alice", 3, timeout=30)
        assert len(filt.received) == 3 and b"body three" in filt.received[2][2]
        assert filt.received[2][:2] == ("local@example.test", [alice])
        inst.wait_queue_empty(30)
    finally:
        inst.stop()
        inst.cleanup()
        filt.close()


def _filter_lines(log: str, port: int) -> list[str]:
    """The delivery lines to the filter, with what differs between runs masked."""
    out = []
    for m in re.finditer(rf"postfix/(\w+)\[\d+\]: \w+: (to=<[^>]+>, relay=127\.0\.0\.1\[127\.0\.0\.1\]"
                         rf":{port}.*)$", log, re.M):
        line = re.sub(r"delay=[\d.]+, delays=[\d./]+", "delay=D, delays=D", m.group(2))
        line = re.sub(r", conn_use=\d+", "", line)
        line = re.sub(r"queued as \w+", "queued as Q", line)
        out.append(f"{m.group(1)}: {line}")
    return sorted(out)


@pytest.mark.timeout(120)
@pytest.mark.skipif(not harness.is_root(), reason="drops privileges: needs root")
def test_filter_delivery_lines_match_postfix(tmp_path):
    if harness.reference_available() is not None:
        pytest.skip(harness.reference_available())
    sink = harness.SmtpSink()
    alice, bob = (f"{u}@{harness.VIRTUAL_DOMAIN}" for u in ("alice", "bob"))
    rules = tmp_path / "header_checks"
    rules.parent.mkdir(parents=True, exist_ok=True)
    dead = harness.free_port()
    rules.write_text(f"/^Subject: redirect-me/ REDIRECT bob@{harness.VIRTUAL_DOMAIN}\n"
                     f"/^Subject: dead-filter/ FILTER smtp:[127.0.0.1]:{dead}\n")
    harness.make_traversable(rules.parent)
    params = {"content_filter": f"smtp:[127.0.0.1]:{sink.port}", "header_checks": f"regexp:{rules}"}
    ref = harness.ReferencePostfix(tmp_path / "ref", params)
    pw = harness.PostwellInstance(tmp_path / "pw", params)
    pw.master_cf = pw.default_master_cf() + "smtp      unix  -       -       n       -       -       smtp\n"
    pw.write_config()
    try:
        harness.start_side_by_side(ref, pw)
        for inst in (ref, pw):
            with smtplib.SMTP("127.0.0.1", inst.port, timeout=20) as s:
                try:
                    s.sendmail("s@remote.example", [alice, bob], b"Subject: f\r\n\r\nbody\r\n")
                except smtplib.SMTPException as e:
                    raise AssertionError(f"{inst.kind}: {e}\n{inst.log_text()[-3000:]}") from None
        sink.wait_count(2, timeout=30)
        for inst in (ref, pw):
            harness.wait_for(lambda: len(_filter_lines(inst.log_text(), sink.port)) == 2, 30, 0.05,
                             f"{inst.kind} delivery lines")
        got, want = _filter_lines(pw.log_text(), sink.port), _filter_lines(ref.log_text(), sink.port)
        assert got == want
        assert want[0].startswith(f"smtp: to=<{alice}>, relay=127.0.0.1[127.0.0.1]:{sink.port}, ")
        # Nothing reached a mailbox: the filter (a sink) kept the mail.
        assert not pw.maildir_messages("alice") and not ref.maildir_messages("alice")
        # A REDIRECT overrides the filter (Postfix's qmgr): delivered straight to bob.
        for inst in (ref, pw):
            with smtplib.SMTP("127.0.0.1", inst.port, timeout=20) as s:
                s.sendmail("s@remote.example", [alice], b"Subject: redirect-me\r\n\r\nbody\r\n")
        for inst in (ref, pw):
            inst.wait_maildir("bob", 1, timeout=30)
            inst.wait_log(rf"postfix/virtual\[\d+\]: \w+: to=<bob@{harness.VIRTUAL_DOMAIN}>, "
                          rf"orig_to=<{re.escape(alice)}>, relay=virtual, ", timeout=10)
        assert sink.count == 2
        # A filter that does not answer: the message is deferred, as Postfix logs it.
        for inst in (ref, pw):
            with smtplib.SMTP("127.0.0.1", inst.port, timeout=20) as s:
                s.sendmail("s@remote.example", [alice], b"Subject: dead-filter\r\n\r\nbody\r\n")
        pattern = rf"postfix/smtp\[\d+\]: \w+: (to=<{re.escape(alice)}>, relay=none, .*status=deferred.*)$"
        got, want = (re.sub(r"delay=[\d.]+, delays=[\d./]+", "D", inst.wait_log(pattern, 30).group(1))
                     for inst in (pw, ref))
        assert got == want
        assert f"connect to 127.0.0.1[127.0.0.1]:{dead}: Connection refused" in want
    finally:
        harness.stop_side_by_side([ref, pw])
        sink.stop()


@pytest.mark.timeout(120)
@pytest.mark.skipif(not harness.is_root(), reason="drops privileges: needs root")
def test_access_map_redirect_and_bcc_act_on_the_message(tmp_path):
    """check_*_access REDIRECT and BCC are not just logged: the smtpd hands them to
    cleanup, which rewrites the recipients (REDIRECT) or adds one (BCC), as Postfix."""
    vd = harness.VIRTUAL_DOMAIN
    inst = harness.PostwellInstance(tmp_path, name="access-actions")
    try:
        inst.main_cf = {
            "smtpd_recipient_restrictions":
                f"check_recipient_access inline:{{{{alice@{vd} = REDIRECT bob@{vd}}}}}, "
                "permit_mynetworks, reject_unauth_destination",
            "smtpd_sender_restrictions":
                f"check_sender_access inline:{{{{copy@remote.example = BCC alice@{vd}}}}}"}
        inst.write_config()
        inst.start()
        with smtplib.SMTP("127.0.0.1", inst.port, timeout=20) as s:
            s.sendmail("s@remote.example", [f"alice@{vd}"], b"Subject: redirected\r\n\r\none\r\n")
        got = inst.wait_maildir("bob", 1, timeout=30)
        assert b"Subject: redirected" in got[0].read_bytes()
        with smtplib.SMTP("127.0.0.1", inst.port, timeout=20) as s:
            s.sendmail("copy@remote.example", [f"bob@{vd}"], b"Subject: copied\r\n\r\ntwo\r\n")
        inst.wait_maildir("bob", 2, timeout=30)
        got = inst.wait_maildir("alice", 1, timeout=30)
        assert b"Subject: copied" in got[0].read_bytes()
        inst.wait_queue_empty(30)
        # The redirected message reached bob only.
        assert len(inst.wait_maildir("alice", 1, timeout=5)) == 1
    finally:
        inst.stop()
        inst.cleanup()
