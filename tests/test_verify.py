"""verify(8): address verification cache, service, probes and reject_unverified_*.

Reply texts follow Postfix 3.7's smtpd_check.c reject_unverified_address() and were
checked side by side against Debian's Postfix 3.7 (test_side_by_side_* below).
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time

import pytest

from postwell.config.main import Config
from postwell.log import NullLog
from postwell.policy import OwnAddresses, SessionState, SmtpdPolicy
from postwell.verify import (IN_PROGRESS, STATUS_BOUNCE, STATUS_DEFER, STATUS_OK, STATUS_TODO,
                             VERIFY_ATTRIBUTE, probe_kind, socket_path, status_name, wanted)
from postwell.verify.cache import (PROBE_TTL, MemoryStore, VerifyCache, make_entry, open_store,
                                   parse_entry)
from postwell.verify.client import VerifyClient, VerifyError
from postwell.verify.service import VerifyService, listen, probe_sender, run


def arun(coro, timeout=20):
    return asyncio.run(asyncio.wait_for(coro, timeout))


class Clock:
    def __init__(self, now=1_000_000.0):
        self.now = now

    def __call__(self):
        return self.now


# ---------------------------------------------------------------- cache rules

def test_entry_format_is_postfix_layout():
    assert make_entry(0, 0, 123, "250 2.1.5 Ok") == "0:0:123:250 2.1.5 Ok"
    assert parse_entry("2:0:5:host x said: 550 a:b") == (2, 0, 5, "host x said: 550 a:b")
    assert parse_entry("0:0:0:x") is None            # both stamps zero: never written
    assert parse_entry("7:1:1:x") is None
    assert parse_entry("garbage") is None


def test_unknown_address_probes_once_then_in_progress():
    clock = Clock()
    c = VerifyCache(MemoryStore(), clock=clock)
    assert c.query("a@x.test") == (STATUS_TODO, IN_PROGRESS, True)
    # The probe is noted: a second query within PROBE_TTL sends none.
    assert c.query("a@x.test") == (STATUS_TODO, IN_PROGRESS, False)
    clock.now += PROBE_TTL + 1
    assert c.query("a@x.test")[2] is True            # presumed lost: probe again


def test_update_then_refresh_and_expire():
    clock = Clock()
    c = VerifyCache(MemoryStore(), positive_refresh=100, positive_expire=1000,
                    negative_refresh=10, negative_expire=50, clock=clock)
    c.query("ok@x.test")
    c.update("ok@x.test", STATUS_OK, "250 2.1.5 Ok")
    assert c.query("ok@x.test") == (STATUS_OK, "250 2.1.5 Ok", False)
    clock.now += 101
    # Stale but not expired: the cached answer stands while a refresh probe goes out.
    assert c.query("ok@x.test") == (STATUS_OK, "250 2.1.5 Ok", True)
    clock.now += PROBE_TTL + 1000
    assert c.query("ok@x.test") == (STATUS_TODO, IN_PROGRESS, True)


def test_failure_never_clobbers_cached_success():
    c = VerifyCache(MemoryStore(), clock=Clock())
    c.update("u@x.test", STATUS_OK, "250 ok")
    c.update("u@x.test", STATUS_BOUNCE, "550 no")
    assert c.query("u@x.test")[:2] == (STATUS_OK, "250 ok")


def test_negative_result_cached_and_refreshed():
    clock = Clock()
    c = VerifyCache(MemoryStore(), negative_refresh=10, negative_expire=PROBE_TTL * 5, clock=clock)
    c.update("b@x.test", STATUS_BOUNCE, "unknown user")
    assert c.query("b@x.test") == (STATUS_BOUNCE, "unknown user", False)
    clock.now += PROBE_TTL + 11
    assert c.query("b@x.test") == (STATUS_BOUNCE, "unknown user", True)


def test_negative_cache_off_keeps_no_failures():
    store = MemoryStore()
    c = VerifyCache(store, negative_cache=False, clock=Clock())
    assert c.query("n@x.test")[2] is True
    assert store.data == {}                           # not even the pending probe
    c.update("n@x.test", STATUS_BOUNCE, "nope")
    assert store.data == {}
    c.update("n@x.test", STATUS_OK, "fine")
    assert c.query("n@x.test")[:2] == (STATUS_OK, "fine")


def test_colon_in_key_is_neutered():
    store = MemoryStore()
    c = VerifyCache(store, clock=Clock())
    c.update("u@[ipv6:2001:db8::1]", STATUS_OK, "ok")
    assert list(store.data) == ["u@[ipv6_2001_db8__1]"]


def test_bad_entry_is_warned_and_reprobed():
    log = NullLog()
    store = MemoryStore()
    store.put("x@y.test", "junk")
    c = VerifyCache(store, clock=Clock(), log=log)
    assert c.query("x@y.test") == (STATUS_TODO, IN_PROGRESS, True)
    assert "warning: bad address verify table entry: junk" in log.lines


def test_cleanup_drops_expired_keeps_pending():
    clock = Clock()
    c = VerifyCache(MemoryStore(), positive_expire=100, negative_expire=100, clock=clock)
    c.update("old@x.test", STATUS_OK, "ok")
    clock.now += 5000
    c.update("new@x.test", STATUS_BOUNCE, "no")
    c.query("pending@x.test")
    assert c.cleanup() == (2, 1)


def test_btree_store_round_trip_and_postmap_reads_it(tmp_path):
    pytest.importorskip("berkeleydb")
    path = str(tmp_path / "verify_cache")
    c = VerifyCache(open_store(f"btree:{path}"), clock=Clock())
    c.update("u@x.test", STATUS_OK, "250 2.1.5 Ok")
    c.close()
    again = VerifyCache(open_store(f"btree:{path}"), clock=Clock())
    assert again.query("u@x.test")[:2] == (STATUS_OK, "250 2.1.5 Ok")
    again.close()
    if os.path.exists("/usr/sbin/postmap"):
        import subprocess
        out = subprocess.run(["/usr/sbin/postmap", "-s", f"btree:{path}"], capture_output=True,
                             text=True, timeout=30)
        assert out.stdout.startswith("u@x.test\t0:0:"), out


def test_open_store_types():
    assert isinstance(open_store(""), MemoryStore)
    assert isinstance(open_store("internal:verify"), MemoryStore)
    from postwell.verify.cache import CacheOpenError
    with pytest.raises(CacheOpenError):
        open_store("regexp:/x")


def test_helpers():
    assert probe_kind({VERIFY_ATTRIBUTE: "mta"}) == "mta"
    assert probe_kind({}) is None and probe_kind(None) is None
    assert status_name(STATUS_OK) == "deliverable"
    assert status_name(STATUS_DEFER) == status_name(STATUS_BOUNCE) == "undeliverable"
    cfg = Config("/x", {"queue_directory": "/q"}, {}, [])
    assert socket_path(cfg) == "/q/private/verify"
    assert probe_sender(cfg) == "double-bounce"
    assert probe_sender(Config("/x", {"address_verify_sender": "<>"}, {}, [])) == ""
    assert not wanted(cfg)
    assert wanted(Config("/x", {"smtpd_recipient_restrictions": "reject_unverified_recipient"},
                         {}, []))


# ---------------------------------------------------------------- service + client

class FakeProber:
    def __init__(self):
        self.sent = []

    async def send(self, address):
        self.sent.append(address)
        return "ABC123"


def _service_round_trip(tmp_path, body):
    path = str(tmp_path / "verify.sock")
    prober = FakeProber()
    service = VerifyService(VerifyCache(MemoryStore(), clock=Clock()), prober, NullLog())

    async def main():
        sock = listen(path)
        stop = asyncio.Event()
        cfg = Config("/x", {"address_verify_cache_cleanup_interval": "0"}, {}, [])
        task = asyncio.create_task(run(cfg, service, sock, stop))
        try:
            return await body(VerifyClient(path, timeout=5), prober, service)
        finally:
            stop.set()
            await task

    return arun(main())


def test_service_query_probe_update(tmp_path):
    async def body(client, prober, service):
        assert await client.query("u@x.test") == (STATUS_TODO, IN_PROGRESS)
        await service.drain()
        assert prober.sent == ["u@x.test"]
        await client.update("u@x.test", STATUS_BOUNCE, "host h said: 550\tno")
        assert await client.query("u@x.test") == (STATUS_BOUNCE, "host h said: 550 no")
        assert prober.sent == ["u@x.test"]
        with pytest.raises(VerifyError):
            await client.update("u@x.test", STATUS_TODO, "x")   # not a result
        with pytest.raises(VerifyError):
            await client._ask("bogus")
    _service_round_trip(tmp_path, body)


def test_service_concurrent_queries_one_probe(tmp_path):
    async def body(client, prober, service):
        await asyncio.gather(*(client.query("c@x.test") for _ in range(20)))
        await service.drain()
        assert prober.sent == ["c@x.test"]
    _service_round_trip(tmp_path, body)


def test_client_without_service_fails_fast(tmp_path):
    client = VerifyClient(str(tmp_path / "nothing"), timeout=2)
    with pytest.raises(VerifyError):
        arun(client.query("a@b.test"))


def test_overlong_request_closes_stream(tmp_path):
    async def body(client, prober, service):
        with pytest.raises(VerifyError):
            await client.query("x" * 20000 + "@x.test")
        assert await client.query("ok@x.test") == (STATUS_TODO, IN_PROGRESS)
    _service_round_trip(tmp_path, body)


# ---------------------------------------------------------------- reject_unverified_*

class FakeVerify:
    """Stands in for the verify service: answers from a script per address."""

    def __init__(self, answers=None, fail=False):
        self.answers = {k: list(v) for k, v in (answers or {}).items()}
        self.fail = fail
        self.queries = []

    async def query(self, address):
        self.queries.append(address)
        if self.fail:
            raise VerifyError("connection refused")
        seq = self.answers.get(address) or [(STATUS_TODO, IN_PROGRESS)]
        return seq.pop(0) if len(seq) > 1 else seq[0]


BASE = {
    "myhostname": "mx.example.com", "mydomain": "example.com",
    "mydestination": "$myhostname, localhost.$mydomain, localhost",
    "mynetworks": "192.0.2.0/24", "inet_interfaces": "127.0.0.1", "inet_protocols": "ipv4",
    "relay_domains": "relay.test", "local_recipient_maps": "", "compatibility_level": "3.6",
    "address_verify_poll_delay": "1s",
    "smtpd_recipient_restrictions": "reject_unverified_recipient, reject_unauth_destination",
}


def policy(extra=None, verify=None, log=None):
    params = dict(BASE)
    params.update(extra or {})
    cfg = Config("/nonexistent", params, {}, [])
    own = OwnAddresses(cfg, system_addresses=lambda: ["127.0.0.1"])
    p = SmtpdPolicy(cfg, log or NullLog(), tables={}, own_addresses=own)
    p.engine.verify_client = verify or FakeVerify()
    p.engine.slept = []

    async def sleep(seconds):
        p.engine.slept.append(seconds)
    p.engine.sleep = sleep
    return p


def rcpt(p, recipient, sender="s@example.org"):
    s = SessionState(client_name="unknown", client_addr="127.0.0.1", client_port="40000",
                     helo_name="localhost", protocol="ESMTP", sender=sender)

    async def go():
        s.recipient = recipient
        return await p.on_rcpt(s)
    r = arun(go())
    return None if r is None else str(r)


def test_unverified_in_progress_after_polls():
    p = policy()
    assert rcpt(p, "u@relay.test") == ("450 4.1.1 <u@relay.test>: Recipient address rejected: "
                                       "unverified address: Address verification in progress")
    # address_verify_poll_count = 3 (not under stress): three queries, two sleeps.
    assert p.engine.verify_client.queries == ["u@relay.test"] * 3
    assert p.engine.slept == [1.0, 1.0]


def test_unverified_answer_arrives_while_polling():
    v = FakeVerify({"u@relay.test": [(STATUS_TODO, IN_PROGRESS), (STATUS_OK, "250 2.1.5 Ok")]})
    p = policy(verify=v)
    assert rcpt(p, "u@relay.test") is None
    assert v.queries == ["u@relay.test"] * 2


def test_undeliverable_uses_reject_code():
    why = ("host h.test[192.0.2.9] said: 550 5.1.1 <b@relay.test>: User unknown "
           "(in reply to RCPT TO command)")
    v = FakeVerify({"b@relay.test": [(STATUS_BOUNCE, why)]})
    # A 4XX reject code says "unverified", only a 5XX one "undeliverable" (smtpd_check.c).
    assert rcpt(policy(verify=v), "b@relay.test") == (
        f"450 4.1.1 <b@relay.test>: Recipient address rejected: unverified address: {why}")
    p = policy({"unverified_recipient_reject_code": "550"}, verify=v)
    assert rcpt(p, "b@relay.test") == (
        f"550 5.1.1 <b@relay.test>: Recipient address rejected: undeliverable address: {why}")


def test_deferred_and_reject_reason():
    v = FakeVerify({"d@relay.test": [(STATUS_DEFER, "connect to h.test: Connection refused")]})
    assert rcpt(policy(verify=v), "d@relay.test") == (
        "450 4.1.1 <d@relay.test>: Recipient address rejected: unverified address: "
        "connect to h.test: Connection refused")
    p = policy({"unverified_recipient_reject_reason": "Address lookup failed",
                "unverified_recipient_defer_code": "451"}, verify=v)
    assert rcpt(p, "d@relay.test") == (
        "451 4.1.1 <d@relay.test>: Recipient address rejected: unverified address: "
        "Address lookup failed")


def test_unverified_text_cut_at_250():
    v = FakeVerify({"d@relay.test": [(STATUS_DEFER, "x" * 400)]})
    r = rcpt(policy(verify=v), "d@relay.test")
    assert r.endswith("unverified address: " + "x" * 250)


def test_defer_if_permit_lets_a_later_reject_win():
    # reject_tempfail_action = defer_if_permit: a later hard reject is the answer.
    v = FakeVerify({"x@relay.test": [(STATUS_DEFER, "later")]})
    rules = {"smtpd_recipient_restrictions": "reject_unverified_recipient, reject"}
    assert rcpt(policy(rules, verify=v), "x@relay.test") == (
        "554 5.7.1 <x@relay.test>: Recipient address rejected: Access denied")
    p = policy(dict(rules, unverified_recipient_tempfail_action="defer"), verify=v)
    assert rcpt(p, "x@relay.test") == (
        "450 4.1.1 <x@relay.test>: Recipient address rejected: unverified address: later")


def test_service_failure():
    log = NullLog()
    p = policy(verify=FakeVerify(fail=True), log=log)
    assert rcpt(p, "u@relay.test") == (
        "450 4.1.1 <u@relay.test>: Recipient address rejected: address verification problem")
    assert "warning: verify service failure" in log.lines


def test_sender_verification():
    v = FakeVerify({"s@example.org": [(STATUS_BOUNCE, "unknown user: \"s\"")]})
    p = policy({"smtpd_recipient_restrictions": "permit_auth_destination, reject",
                "smtpd_sender_restrictions": "reject_unverified_sender"}, verify=v)
    assert rcpt(p, "u@relay.test") == (
        "450 4.1.7 <s@example.org>: Sender address rejected: unverified address: "
        "unknown user: \"s\"")
    # The null sender is never verified.
    assert rcpt(p, "u@relay.test", sender="") is None


def test_verified_address_passes():
    v = FakeVerify({"ok@relay.test": [(STATUS_OK, "250 2.1.5 Ok")]})
    assert rcpt(policy(verify=v), "ok@relay.test") is None


# ---------------------------------------------------------------- end to end

class RcptSink:
    """A tiny SMTP server on loopback: RCPT of a local part starting with "bad" gets
    550 5.1.1, "soft" 450 4.2.0, anything else 250; it records every command."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.commands: list[str] = []
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self):
        deadline = time.monotonic() + 120
        while not self._stop and time.monotonic() < deadline:
            try:
                conn, _ = self.sock.accept()
            except (socket.timeout, OSError):
                continue
            threading.Thread(target=self._session, args=(conn,), daemon=True).start()

    def _session(self, conn):
        conn.settimeout(10)
        f = conn.makefile("rb")
        try:
            conn.sendall(b"220 sink.test ESMTP\r\n")
            in_data = False
            for raw in f:
                line = raw.decode("latin-1").rstrip("\r\n")
                if in_data:
                    if line == ".":
                        in_data = False
                        conn.sendall(b"250 2.0.0 Ok: queued\r\n")
                    continue
                self.commands.append(line)
                verb = line[:4].upper()
                if verb == "EHLO":
                    conn.sendall(b"250-sink.test\r\n250-PIPELINING\r\n250 ENHANCEDSTATUSCODES\r\n")
                elif verb == "RCPT":
                    addr = line.partition("<")[2].partition(">")[0]
                    if addr.startswith("bad"):
                        conn.sendall(f"550 5.1.1 <{addr}>: User unknown\r\n".encode())
                    elif addr.startswith("soft"):
                        conn.sendall(f"450 4.2.0 <{addr}>: Mailbox busy\r\n".encode())
                    else:
                        conn.sendall(b"250 2.1.5 Ok\r\n")
                elif verb == "DATA":
                    in_data = True
                    conn.sendall(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                elif verb == "QUIT":
                    conn.sendall(b"221 2.0.0 Bye\r\n")
                    break
                else:
                    conn.sendall(b"250 2.0.0 Ok\r\n")
        except OSError:
            pass
        finally:
            conn.close()

    def close(self):
        self._stop = True
        self._thread.join(5)
        self.sock.close()


@pytest.fixture
def sink():
    s = RcptSink()
    yield s
    s.close()


def _verify_params(sink_port):
    return {
        "relay_domains": "remote.test",
        "transport_maps": f"inline:{{remote.test=smtp:[127.0.0.1]:{sink_port}}}",
        "smtpd_recipient_restrictions": "reject_unverified_recipient, permit_mynetworks, "
                                        "reject_unauth_destination",
        "address_verify_poll_delay": "1s",
        "address_verify_poll_count": "15",   # generous: the suite runs on a loaded machine
        "smtp_address_verify_target": "rcpt",
    }


_POSTWELL_MASTER = ("smtp      unix  -       -       n       -       -       smtp\n"
                    "verify    unix  -       -       n       -       1       verify\n")


def _rcpt_replies(port, rcpts, sender="s@client.test"):
    lines = ["EHLO client.test", f"MAIL FROM:<{sender}>"]
    lines += [f"RCPT TO:<{r}>" for r in rcpts]
    lines += ["QUIT"]
    replies = dialogue(port, lines, timeout=30)
    return [str(r) for r in replies[3:3 + len(rcpts)]]


from harness import dialogue, wait_for  # noqa: E402


def _probe_outcomes(inst, count, timeout=30):
    import re
    pat = re.compile(r"to=<([^>]*)>, relay=[^,]*, .*?dsn=([\d.]+), status=(\w+) \((.*)\)$", re.M)
    return wait_for(lambda: len(pat.findall(inst.log_text())) >= count and
                    sorted(pat.findall(inst.log_text())), timeout, 0.1, "probe results")


def test_end_to_end_recipient_verification(postwell_factory, sink):
    pw = postwell_factory(main_cf=dict(_verify_params(sink.port), max_idle="2s"))
    pw.master_cf = pw.default_master_cf() + _POSTWELL_MASTER
    pw.write_config()
    pw.start()
    replies = _rcpt_replies(pw.port, ["good@remote.test", "bad@remote.test"])
    bad = ("host 127.0.0.1[127.0.0.1] said: 550 5.1.1 <bad@remote.test>: User unknown "
           "(in reply to RCPT TO command)")
    assert replies == [
        "250 2.1.5 Ok",
        f"450 4.1.1 <bad@remote.test>: Recipient address rejected: unverified address: {bad}"]
    outcomes = _probe_outcomes(pw, 2)
    assert outcomes == [("bad@remote.test", "5.1.1", "undeliverable", bad),
                        ("good@remote.test", "2.1.5", "deliverable", "250 2.1.5 Ok")]
    # Probes stop at RCPT: the sink never saw DATA; nothing is left in the queue.
    assert not [c for c in sink.commands if c.upper() == "DATA"]
    assert "MAIL FROM:<double-bounce@example.test>" in sink.commands
    pw.wait_queue_empty(20)
    assert "bounce" not in pw.log_text().lower().replace("double-bounce", "")
    # The on-demand service leaves after max_idle; the next query starts another,
    # which finds the answers in the btree cache: no new probe.
    import re
    starts = re.compile(r"postfix/verify\[(\d+)\]: cache btree:\S+/verify_cache full cleanup: "
                        r"retained=(\d+)")
    first = starts.findall(pw.log_text())
    assert len(first) == 1
    time.sleep(4)
    before = len(sink.commands)
    assert _rcpt_replies(pw.port, ["good@remote.test"]) == ["250 2.1.5 Ok"]
    assert len(sink.commands) == before
    again = starts.findall(pw.log_text())
    assert len(again) == 2 and again[1][0] != again[0][0] and again[1][1] == "2"


_SENDERS = ["alice@virtual.test", "nobody@virtual.test", "root@mx.example.test",
            "nosuchuser@mx.example.test", "postmaster@mx.example.test", "staff+x@mx.example.test",
            "root+ext@mx.example.test", "s@remote.test", "bad1@remote.test"]


def _side_by_side_params(sink_port):
    p = _verify_params(sink_port)
    p.update({
        "smtpd_sender_restrictions": "reject_unverified_sender",
        "recipient_delimiter": "+",
        "alias_maps": "inline:{postmaster=root, {staff=root, nosuchuser, |/bin/true}}",
        "unverified_sender_reject_code": "550",
    })
    return p


def _status_lines(inst):
    import re
    pat = re.compile(r"postfix/(\w+)\[\d+\]: \w+: to=<([^>]*)>, (?:orig_to=<([^>]*)>, )?"
                     r"relay=([^,]*), .*?dsn=([\d.]+), status=(\w+) \((.*)\)$", re.M)
    return sorted(set(pat.findall(inst.log_text())))


def _run_verify_recipe(inst):
    out = []
    for sender in _SENDERS:
        r = dialogue(inst.port, ["EHLO client.test", f"MAIL FROM:<{sender}>",
                                 "RCPT TO:<good@remote.test>", "QUIT"], timeout=40)
        out.append((sender, [str(x) for x in r[2:4]]))
    # A sender in a local domain: a probe to an outside one would ask the
    # system resolver, whose speed decides whether the poll sees the answer.
    out.append(("rcpts", _rcpt_replies(inst.port, ["bad@remote.test", "soft@remote.test",
                                                   "good@remote.test", "postmaster", "nosuchuser",
                                                   "Root@MX.example.test"],
                                       "alice@virtual.test")))
    return out


def test_side_by_side_with_postfix(postwell_factory, reference_factory, sink):
    """The same recipe against Postfix 3.7 and postwell: replies, probe log lines."""
    from harness import start_side_by_side
    params = _side_by_side_params(sink.port)
    ref = reference_factory(params)
    pw = postwell_factory(main_cf=params)
    pw.master_cf = pw.default_master_cf() + _POSTWELL_MASTER + \
        "local     unix  -       n       n       -       -       local\n"
    pw.write_config()
    start_side_by_side(ref, pw)
    # The two MTAs are independent and each query waits a poll delay or more:
    # run the recipes at the same time.
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(2) as pool:
        want_f, got_f = pool.submit(_run_verify_recipe, ref), pool.submit(_run_verify_recipe, pw)
        want, got = want_f.result(timeout=300), got_f.result(timeout=300)
    for g, w in zip(got, want):
        assert g == w
    # Everything observable of the probes themselves.
    wait_for(lambda: len(_status_lines(pw)) >= len(_status_lines(ref)), 20, 0.1, "probe lines")
    assert _status_lines(pw) == _status_lines(ref)
    # Probes never leave a bounce behind.
    pw.wait_queue_empty(20)
    assert "bounce notification" not in pw.log_text()


# ---------------------------------------------------------------- smtp client engine, probe mode

def _client_events(c):
    from postwell.smtp.client import NEED_DATA
    out = []
    while (ev := c.next_event()) is not NEED_DATA:
        out.append(ev)
    return out


@pytest.mark.parametrize("ehlo", [b"250-mx.test\r\n250-PIPELINING\r\n250 ENHANCEDSTATUSCODES\r\n",
                                  b"250-mx.test\r\n250 ENHANCEDSTATUSCODES\r\n",
                                  b"250-mx.test\r\n250-PIPELINING\r\n250 CHUNKING\r\n"])
def test_engine_probe_stops_after_rcpt(ehlo):
    from postwell.smtp.client import (Envelope, RcptReply, Recipient, RsetDone, SmtpClient,
                                      TransactionFailed)
    c = SmtpClient("mx.example.test", use_chunking=True) if b"CHUNKING" in ehlo \
        else SmtpClient("mx.example.test")
    c.receive_data(b"220 mx.test ESMTP\r\n")
    c.data_to_send()
    c.receive_data(ehlo)
    _client_events(c)
    c.start_transaction(Envelope("double-bounce@example.test",
                                 (Recipient("a@x.test"), Recipient("b@x.test"))), probe=True)
    sent = c.data_to_send()
    if b"PIPELINING" in ehlo:
        assert sent == (b"MAIL FROM:<double-bounce@example.test>\r\nRCPT TO:<a@x.test>\r\n"
                        b"RCPT TO:<b@x.test>\r\n")
        c.receive_data(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n550 5.1.1 no\r\n")
    else:
        assert sent == b"MAIL FROM:<double-bounce@example.test>\r\n"
        c.receive_data(b"250 2.1.0 Ok\r\n")
        _client_events(c)
        assert c.data_to_send() == b"RCPT TO:<a@x.test>\r\n"
        c.receive_data(b"250 2.1.5 Ok\r\n")
        _client_events(c)
        assert c.data_to_send() == b"RCPT TO:<b@x.test>\r\n"
        c.receive_data(b"550 5.1.1 no\r\n")
    evs = _client_events(c)
    assert [e.reply.code for e in evs if isinstance(e, RcptReply)][-1] == 550
    failed = [e for e in evs if isinstance(e, TransactionFailed)]
    assert failed and failed[0].command == "RCPT TO"
    assert c.data_to_send() == b"RSET\r\n"          # never DATA, never BDAT
    c.receive_data(b"250 2.0.0 Ok\r\n")
    assert any(isinstance(e, RsetDone) for e in _client_events(c))
    assert c.usable


def test_pending_probe_limit():
    clock = Clock()
    prober = FakeProber()
    service = VerifyService(VerifyCache(MemoryStore(), clock=Clock()), prober, NullLog(),
                            pending_limit=2, clock=clock)

    async def go():
        for a in ("a@x.test", "b@x.test", "c@x.test"):
            assert service.request(f"query\t{a}") == f"ok\t{STATUS_TODO}\t{IN_PROGRESS}"
        await service.drain()
        assert prober.sent == ["a@x.test", "b@x.test"]     # c waits for room
        assert service.request(f"update\ta@x.test\t{STATUS_OK}\tok") == "ok"
        clock.now += PROBE_TTL + 1
        service.request("query\tc@x.test")
        await service.drain()
        assert prober.sent[-1] == "c@x.test"
        assert service.request("query") == "bad"
        assert service.request("update\ta@x.test\tx\ty") == "bad"
    arun(go())


def test_btree_store_is_locked_against_a_second_writer(tmp_path):
    pytest.importorskip("berkeleydb")
    from postwell.verify import cache as vcache
    path = str(tmp_path / "vc")
    first = open_store(f"btree:{path}")
    with pytest.raises(vcache.CacheOpenError):
        vcache._exclusive_lock(path + ".db", wait=0.2)
    first.close()
    second = open_store(f"btree:{path}")
    second.close()


# ---------------------------------------------------------------- sendmail -bv

def _report_blocks(inst, user="alice", timeout=30):
    """The status report's per-recipient text lines and DSN blocks, order-free."""
    msgs = inst.wait_maildir(user, 1, timeout)
    text = msgs[0].read_text()
    import re
    head, _, rest = text.partition("\n\n")
    subject = re.search(r"^Subject: (.*)$", head, re.M).group(1)
    notification = text.split("Content-Description: Notification", 1)[1].split("\n--", 1)[0]
    lines = re.sub(r"\n[ \t]+", " ", notification).split("\n")
    said = sorted(line for line in lines if line.startswith("<"))
    report = text.split("Content-Type: message/delivery-status", 1)[1].split("\n--", 1)[0]
    blocks = sorted(b.strip() for b in report.split("\n\n")[2:])
    tail = text.split("Content-Description: ", 3)[3].split("\n", 1)[0]
    return subject, said, blocks, tail


def test_sendmail_bv_side_by_side(postwell_factory, reference_factory, sink, tmp_path):
    import subprocess
    import sys
    from harness import start_side_by_side
    params = _verify_params(sink.port)
    params["smtpd_recipient_restrictions"] = "permit_mynetworks, reject"
    ref = reference_factory(params)
    pw = postwell_factory(main_cf=params)
    pw.master_cf = pw.default_master_cf() + _POSTWELL_MASTER + \
        "local     unix  -       n       n       -       -       local\n" \
        "pickup    unix  n       -       n       60      1       pickup\n"
    pw.write_config()
    start_side_by_side(ref, pw)
    rcpts = ["good@remote.test", "bad@remote.test", "bob@virtual.test", "nosuch@mx.example.test"]
    out_ref = subprocess.run(["/usr/sbin/sendmail", "-C", str(ref.config_dir), "-f",
                              "alice@virtual.test", "-bv", *rcpts], capture_output=True,
                             text=True, timeout=30, stdin=subprocess.DEVNULL)
    out_pw = subprocess.run([sys.executable, "-m", "postwell.cli.sendmail", "-C",
                             str(pw.config_dir), "-f", "alice@virtual.test", "-bv", *rcpts],
                            capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
                            env=dict(os.environ, MAIL_CONFIG=str(pw.config_dir)))
    assert (out_pw.returncode, out_pw.stdout) == (out_ref.returncode, out_ref.stdout) == (
        0, "Mail Delivery Status Report will be mailed to <alice@virtual.test>.\n")
    want = _report_blocks(ref)
    got = _report_blocks(pw)
    port = f":{sink.port}"
    assert got[0] == want[0] == "Mail Delivery Status Report"
    assert got[1] == want[1]
    assert got[2] == want[2]
    assert got[3] == want[3] == "Message Headers"
    assert port in " ".join(got[1])
    # The report's own delivery line follows its Maildir file: wait for it.
    for inst in (ref, pw):
        wait_for(lambda: "to=<alice@virtual.test>" in inst.log_text(), 20, 0.1, "report delivery")
    assert _status_lines(pw) == _status_lines(ref)
    assert not [c for c in sink.commands if c.upper() == "DATA"]
    # Nothing was delivered but the report.
    assert pw.maildir_messages("bob") == []


# ---------------------------------------------------------------- qmgr side, stand-ins

class _StubQmgr:
    """The few QueueManager members run_probe uses."""

    def __init__(self, results):
        self.results = results          # transport -> (status, dsn, reason)
        self.logged = []
        self.removed = []
        self.delivered = []
        self.log = NullLog()
        self.config = Config("/x", {}, {}, [])
        self._log_ids = {"Q1"}

    def clock(self):
        return 100.0

    def _command(self, transport):
        return {"mypipe": "pipe"}.get(transport, transport)

    def _limit(self, transport, what):
        return 50

    async def _deliver_chunk(self, qid, qm, sender, arrival, active, transport, nexthop, chunk,
                             attributes):
        from postwell.delivery.base import RecipientResult
        assert attributes[VERIFY_ATTRIBUTE] in ("mta", "user")
        self.delivered.append(transport)
        status, dsn, reason = self.results[transport]
        return [(1.0, RecipientResult(rc, status, dsn, reason, transport)) for _, rc in chunk]

    def _log_result(self, qid, res, arrival, active, handoff, service):
        self.logged.append((service, res.recipient.address, res.status, res.reason))

    async def _blocking(self, fn, *args):
        return fn(*args)

    @property
    def store(self):
        stub = self

        class Store:
            def remove(self, qid, sync=True):
                stub.removed.append(qid)
        return Store()


class _Updates:
    def __init__(self):
        self.calls = []

    async def update(self, address, status, text):
        self.calls.append((address, status, text))


def test_run_probe_reports_updates_and_removes():
    from postwell.delivery.base import Recipient, RecipientResult
    from postwell.verify.probe import run_probe
    q = _StubQmgr({"smtp": ("bounced", "5.1.1", "host h said: 550 no"),
                   "virtual": ("sent", "2.0.0", "delivers to maildir")})
    a = Recipient("a@remote.test", orig="A@remote.test")
    v = Recipient("v@virtual.test")
    p = Recipient("p@pipe.test")
    e = Recipient("e@x.test")
    groups = {("smtp", "x"): [("ra", a)], ("virtual", ""): [("rv", v)], ("mypipe", ""): [("rp", p)]}
    early = [("re", RecipientResult.deferred(e, "address resolver failure", "none", "4.3.0"))]
    updates = _Updates()
    arun(run_probe(q, "Q1", None, "double-bounce@x.test", 0.0, 0.0, groups, early,
                   {VERIFY_ATTRIBUTE: "mta"}, client=updates))
    assert sorted(q.delivered) == ["smtp", "virtual"]          # the pipe command never ran
    assert sorted(q.logged) == [
        ("mypipe", "p@pipe.test", "deliverable", "delivers to command: mypipe"),
        ("qmgr", "e@x.test", "undeliverable", "address resolver failure"),
        ("smtp", "a@remote.test", "undeliverable", "host h said: 550 no"),
        ("virtual", "v@virtual.test", "deliverable", "delivers to maildir")]
    # The original address is the key asked for; the final one only when it
    # differs other than in case (Postfix's verify_append).
    assert ("A@remote.test", STATUS_BOUNCE, "host h said: 550 no") in updates.calls
    assert ("a@remote.test", STATUS_BOUNCE, "host h said: 550 no") not in updates.calls
    assert ("e@x.test", STATUS_DEFER, "address resolver failure") in updates.calls
    assert q.removed == ["Q1"] and q._log_ids == set()


def test_user_probe_does_not_touch_the_cache():
    from postwell.delivery.base import Recipient
    from postwell.verify import probe as vprobe
    q = _StubQmgr({"virtual": ("sent", "2.0.0", "delivers to maildir")})
    reports = []

    async def fake_report(qmgr, qid, qm, sender, arrival, report):
        reports.append([(part.recipient.address, status) for _, part, status in report])
    updates = _Updates()
    orig = vprobe._mail_report
    vprobe._mail_report = fake_report
    try:
        arun(vprobe.run_probe(q, "Q1", None, "u@x.test", 0.0, 0.0,
                              {("virtual", ""): [("r", Recipient("v@virtual.test"))]}, [],
                              {VERIFY_ATTRIBUTE: "user"}, client=updates))
    finally:
        vprobe._mail_report = orig
    assert updates.calls == []
    assert reports == [[("v@virtual.test", STATUS_OK)]]
    assert q.removed == ["Q1"]


def test_colon_is_neutered_before_the_probe_too():
    # Postfix 3.7 side by side: MAIL FROM:<a:b@virtual.test> is probed as a_b@virtual.test
    # and answered 'unknown user: "a_b@virtual.test"'.
    prober = FakeProber()
    service = VerifyService(VerifyCache(MemoryStore(), clock=Clock()), prober, NullLog())

    async def go():
        service.request("query\ta:b@x.test")
        await service.drain()
        assert prober.sent == ["a_b@x.test"]
        service.request(f"update\ta_b@x.test\t{STATUS_BOUNCE}\tunknown user")
        assert service.request("query\ta:b@x.test") == f"ok\t{STATUS_BOUNCE}\tunknown user"
    arun(go())


def test_side_by_side_unreachable_next_hop(postwell_factory, reference_factory):
    """A next hop that refuses connections: both answer with the connect error and log
    dsn=4.4.1 status=undeliverable; the second probe meets the same answer."""
    import re
    from harness import start_side_by_side
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    closed = s.getsockname()[1]
    s.close()
    params = _verify_params(closed)
    ref = reference_factory(params)
    pw = postwell_factory(main_cf=params)
    pw.master_cf = pw.default_master_cf() + _POSTWELL_MASTER
    pw.write_config()
    start_side_by_side(ref, pw)

    def outcome(inst):
        replies = _rcpt_replies(inst.port, ["a@remote.test", "b@remote.test"])
        wait_for(lambda: len(_status_lines(inst)) >= 2, 20, 0.1, "probe lines")
        return replies, _status_lines(inst)
    want, got = outcome(ref), outcome(pw)
    assert got == want
    assert re.search(r"unverified address: connect to 127\.0\.0\.1\[127\.0\.0\.1\]:\d+: "
                     r"Connection refused$", got[0][1])


def test_prober_queues_a_flagged_probe(tmp_path):
    from postwell.queue import QueueStore
    from postwell.verify.service import Prober
    store = QueueStore(str(tmp_path / "q"))
    store.ensure_layout()
    cfg = Config(str(tmp_path), {"myhostname": "mx.example.test", "mydomain": "example.test",
                                 "myorigin": "$mydomain", "queue_directory": str(tmp_path / "q")},
                 {}, [])
    log = NullLog("cleanup")
    qid = arun(Prober(cfg, NullLog(), store=store, cleanup_log=log).send("user"))
    assert qid and store.scan("incoming") == [qid]
    qm = store.open(qid, "incoming", writable=False)
    try:
        assert qm.sender == "double-bounce@example.test"
        assert qm.attributes[VERIFY_ATTRIBUTE] == "mta"
        [r] = qm.recipients
        assert (r.address, r.orig) == ("user@example.test", "user")
        head = b"".join(qm.iter_content()).decode()
        assert head.startswith("Received: by mx.example.test (postwell)\n\tid " + qid + "; ")
        for name in ("Date: ", "Message-Id: <", "From: double-bounce@example.test"):
            assert "\n" + name in head
    finally:
        qm.close()
    assert any(f"{qid}: message-id=<" in line for line in log.lines)


@pytest.mark.parametrize("address, classes, want", [
    ("caf\u00e9@x.test", "sendmail, verify", "1"),     # Postfix's default classes name verify
    ("caf\u00e9@x.test", "sendmail", None),
    ("plain@x.test", "sendmail, verify", None),
])
def test_probe_for_utf8_address_asks_for_smtputf8(tmp_path, address, classes, want):
    """smtputf8_autodetect_classes "verify": a probe's UTF-8 recipient requests
    SMTPUTF8 as Postfix's post_mail() probe does."""
    from postwell.queue import QueueStore
    from postwell.verify.service import Prober
    store = QueueStore(str(tmp_path / "q"))
    store.ensure_layout()
    cfg = Config(str(tmp_path), {"queue_directory": str(tmp_path / "q"), "myhostname": "mx.x.test",
                                 "smtputf8_autodetect_classes": classes}, {}, [])
    qid = asyncio.run(Prober(cfg, NullLog("verify"), store=store,
                             cleanup_log=NullLog("cleanup")).send(address))
    assert qid
    with store.open(qid) as q:
        assert q.params.get("smtputf8") == want
