"""check_policy_service (policy/delegation.py): SMTP access policy delegation.

Expected requests, replies and warnings were recorded from a real Postfix 3.7.11 smtpd
talking to the recording policy server below (same dialogues, loopback only); the last
test repeats that comparison live, side by side.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time

import pytest

import harness
from postwell.log import NullLog
from postwell.policy import delegation
from postwell.policy.delegation import (REQUEST_ORDER, PolicyClients, PolicySpecError,
                                        encode_request, parse_service, request_attributes)
from test_policy import make_policy, rcpt, run, session

WAIT = 10.0


class PolicyServer:
    """A threaded policy server on loopback (or a unix socket) that records every request.

    ``answer(request_dict)`` returns the bytes to send, ``None`` to say nothing (hang until
    the client gives up); bytes ending in ``b"CLOSE"`` are sent without it, then the
    connection is closed.
    """

    def __init__(self, answer=None, unix_path: str | None = None):
        if unix_path:
            self.sock = socket.socket(socket.AF_UNIX)
            self.sock.bind(unix_path)
            os.chmod(unix_path, 0o666)
            self.port = None
        else:
            self.sock = socket.socket()
            self.sock.bind(("127.0.0.1", 0))
            self.port = self.sock.getsockname()[1]
        self.sock.listen(64)
        self.sock.settimeout(0.2)
        self.answer = answer or (lambda req: b"action=DUNNO\n\n")
        self.requests: list[list[tuple[str, str]]] = []
        self.connections = 0
        self.open_now = self.max_open = 0
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    @property
    def spec(self) -> str:
        return f"inet:127.0.0.1:{self.port}"

    def _accept(self):
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            self.connections += 1
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self.threads.append(t)
            t.start()

    def _serve(self, conn):
        self.open_now += 1
        self.max_open = max(self.max_open, self.open_now)
        conn.settimeout(0.2)
        buf = b""
        try:
            while not self.stopping.is_set():
                while b"\n\n" not in buf:
                    try:
                        chunk = conn.recv(65536)
                    except (TimeoutError, socket.timeout):
                        if self.stopping.is_set():
                            return
                        continue
                    if not chunk:
                        return
                    buf += chunk
                raw, buf = buf.split(b"\n\n", 1)
                req = [tuple(line.split("=", 1)) for line in raw.decode().split("\n")]
                self.requests.append(req)
                out = self.answer(dict(req))
                if out is None:
                    # Say nothing until the client hangs up (or the test ends).
                    deadline = time.monotonic() + WAIT
                    while not self.stopping.is_set() and time.monotonic() < deadline:
                        try:
                            if not conn.recv(65536):
                                return
                        except (TimeoutError, socket.timeout):
                            continue
                    return
                if out.endswith(b"CLOSE"):
                    conn.sendall(out[:-5])
                    return
                conn.sendall(out)
        except OSError:
            pass
        finally:
            self.open_now -= 1
            conn.close()

    def close(self):
        self.stopping.set()
        self.sock.close()
        for t in self.threads:
            t.join(2)


@pytest.fixture
def server():
    made = []

    def make(answer=None, **kw):
        s = PolicyServer(answer, **kw)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def policy_for(spec, extra=None, log=None):
    params = {"smtpd_recipient_restrictions": f"check_policy_service {spec}, reject_unauth_destination"}
    params.update(extra or {})
    return make_policy(params, log=log or NullLog())


def no_retry_sleep(p):
    """Record the retry delays instead of sleeping them."""
    delays = []

    async def fake(seconds):
        delays.append(seconds)

    p.engine.policy_sleep = fake
    return delays


def warnings(log):
    return [line for line in log.lines if line.startswith("warning:")]


# -- the request ----------------------------------------------------------------

def test_request_has_postfix_attributes_in_order(server):
    srv = server()
    p = policy_for(srv.spec)
    st = session(server_addr="127.0.0.1", server_port="25", message_size=100,
                 sasl_method="PLAIN", sasl_username="u1")
    assert run(rcpt(p, st, "user@example.com")) is None
    (req,) = srv.requests
    assert tuple(name for name, _ in req) == REQUEST_ORDER
    got = dict(req)
    assert got["request"] == "smtpd_access_policy"
    assert (got["protocol_state"], got["protocol_name"]) == ("RCPT", "ESMTP")
    assert (got["client_address"], got["client_name"], got["client_port"]) == \
        ("127.0.0.1", "unknown", "40000")
    assert (got["server_address"], got["server_port"]) == ("127.0.0.1", "25")
    assert (got["helo_name"], got["sender"], got["recipient"]) == \
        ("localhost", "s@example.org", "user@example.com")
    # Postfix counts recipients only after RCPT (DATA, END-OF-MESSAGE).
    assert (got["recipient_count"], got["size"], got["queue_id"]) == ("0", "100", "")
    assert (got["sasl_method"], got["sasl_username"], got["sasl_sender"]) == ("PLAIN", "u1", "")
    assert got["encryption_keysize"] == "0" and got["ccert_subject"] == ""
    assert got["policy_context"] == "" and got["stress"] == "" and got["etrn_domain"] == ""


def test_request_at_each_stage():
    st = session(sender=None, helo_name=None, protocol="SMTP")
    st.where = "CONNECT"
    got = dict(request_attributes(st))
    assert (got["protocol_state"], got["helo_name"], got["sender"], got["instance"]) == \
        ("CONNECT", "", "", "")
    st.helo_name, st.protocol, st.where = "client.example", "ESMTP", "EHLO"
    # The HELO/EHLO checks run before Postfix records the new protocol.
    assert dict(request_attributes(st))["protocol_name"] == "SMTP"
    st.sender, st.where = "s@example.org", "MAIL"
    assert dict(request_attributes(st))["instance"] == ""   # set once MAIL is accepted
    st.where, st.recipient = "RCPT", "a@example.com"
    first = dict(request_attributes(st))["instance"]
    assert first.count(".") == 3 and first.endswith(".0")
    st.recipient_count, st.recipient, st.where = 2, None, "BDAT"
    got = dict(request_attributes(st))
    assert (got["protocol_state"], got["recipient_count"], got["recipient"], got["instance"]) == \
        ("DATA", "2", "", first)
    st.where = "END-OF-MESSAGE"
    assert dict(request_attributes(st))["instance"] == first
    st.act_size = 21          # what the smtpd received, once it says so
    assert dict(request_attributes(st))["size"] == "21"
    st.where, st.policy_protocol_state = "RCPT", "VRFY"
    assert dict(request_attributes(st))["protocol_state"] == "VRFY"
    del st.policy_protocol_state
    st.reset_transaction()
    st.sender, st.where = "s@example.org", "RCPT"
    second = dict(request_attributes(st))["instance"]
    assert second != first and second.endswith(".1")


def test_request_encoding_cannot_be_forged():
    assert encode_request([("a", "1"), ("b", "x\nrecipient=evil")]) == b"a=1\nb=x recipient=evil\n\n"


# -- the reply: any access(5) action ------------------------------------------------

ACTIONS = {
    "rej": (b"action=REJECT go away\n\n",
            "554 5.7.1 <rej@example.com>: Recipient address rejected: go away"),
    "c550": (b"action=550 5.1.1 no such\n\n",
             "550 5.1.1 <c550@example.com>: Recipient address rejected: no such"),
    "c450": (b"action=450 try later\n\n",
             "450 4.7.1 <c450@example.com>: Recipient address rejected: try later"),
    "dip": (b"action=DEFER_IF_PERMIT later\n\n",
            "450 4.7.1 <dip@example.com>: Recipient address rejected: later"),
    "ok": (b"action=OK\n\n", None),
    "extra": (b"foo=bar\naction=REJECT extra\n\n",
              "554 5.7.1 <extra@example.com>: Recipient address rejected: extra"),
    "dup": (b"action=OK\naction=REJECT dup\n\n", None),
    "eqval": (b"action=REJECT a=b\n\n", "554 5.7.1 <eqval@example.com>: Recipient address rejected: a=b"),
    "nul": (b"action=REJECT a\x00b\n\n", "554 5.7.1 <nul@example.com>: Recipient address rejected: a"),
    "lower": (b"action=reject lower\n\n",
              "554 5.7.1 <lower@example.com>: Recipient address rejected: lower"),
    "tab": (b"action=REJECT\ttabbed\n\n",
            "554 5.7.1 <tab@example.com>: Recipient address rejected: tabbed"),
    "lead": (b"action= REJECT lead\n\n",
             "554 5.7.1 <lead@example.com>: Recipient address rejected: Access denied"),
    "long": (b"action=REJECT " + b"x" * 5000 + b"\n\n",
             "554 5.7.1 <long@example.com>: Recipient address rejected: " + "x" * 5000),
}


@pytest.mark.parametrize("user", sorted(ACTIONS))
def test_actions_apply_like_an_access_table(server, user):
    srv = server(lambda req: ACTIONS[req["recipient"].split("@")[0]][0])
    # "reject" after the policy: only an OK (or a reject) of the policy avoids it.
    p = make_policy({"smtpd_recipient_restrictions": f"check_policy_service {srv.spec}, "
                                                     "permit_auth_destination, reject"})
    want = ACTIONS[user][1]
    got = run(rcpt(p, session(), f"{user}@example.com"))
    assert (None if got is None else str(got)) == want


def test_dunno_goes_on_and_each_check_asks_again(server):
    srv = server()
    p = make_policy({"smtpd_recipient_restrictions":
                     f"check_policy_service {srv.spec}, check_policy_service {srv.spec}, reject"})
    assert str(run(rcpt(p, session(), "u@example.com"))) == \
        "554 5.7.1 <u@example.com>: Recipient address rejected: Access denied"
    # No cache: Postfix 3.7 sends an identical request twice (observed).
    assert len(srv.requests) == 2 and srv.requests[0] == srv.requests[1]


def test_side_effect_actions(server):
    answers = {"hold": b"action=HOLD\n\n", "prep": b"action=PREPEND X-Policy: yes\n\n",
               "warn": b"action=WARN careful\n\n", "empty": b"action=\n\n"}
    srv = server(lambda req: answers[req["recipient"].split("@")[0]])
    log = NullLog()
    p = policy_for(srv.spec, log=log)
    st = session()
    assert run(rcpt(p, st, "hold@example.com")) is None and st.hold
    assert any(line == "NOQUEUE: hold: RCPT from unknown[127.0.0.1]: <hold@example.com>: Recipient "
               "address triggers HOLD action; from=<s@example.org> to=<hold@example.com> "
               "proto=ESMTP helo=<localhost>" for line in log.lines)
    st = session()
    assert run(rcpt(p, st, "prep@example.com")) is None and st.prepend == ["X-Policy: yes"]
    assert run(rcpt(p, session(), "warn@example.com")) is None
    assert any(line.startswith("NOQUEUE: warn: RCPT from unknown[127.0.0.1]: careful;")
               for line in log.lines)
    assert run(rcpt(p, session(), "empty@example.com")) is None
    assert f"warning: access table {srv.spec} entry  has empty value" in log.lines


# -- failures: Postfix's warnings, then the default action ---------------------------

DEFAULT_REPLY = "451 4.3.5 <u@example.com>: Recipient address rejected: Server configuration problem"


def test_unreachable_server_uses_default_action():
    port = harness.free_port()
    log = NullLog()
    p = policy_for(f"inet:127.0.0.1:{port}", log=log)
    delays = no_retry_sleep(p)
    assert str(run(rcpt(p, session(), "u@example.com"))) == DEFAULT_REPLY
    name = f"127.0.0.1:{port}"
    assert warnings(log) == [f"warning: connect to {name}: Connection refused",
                             f"warning: problem talking to server {name}: Connection refused"] * 2
    assert delays == [1.0]      # try_limit 2, retry_delay 1s


@pytest.mark.parametrize("reply,first_try,last_try", [
    (b"hello world\n\n", ["missing attribute action in input from {n}"],
     ["missing attribute action in input from {n}", "problem talking to server {n}: Application error"]),
    (b"action = REJECT x\n\n", ["missing attribute action in input from {n}"],
     ["missing attribute action in input from {n}", "problem talking to server {n}: Application error"]),
    (b"CLOSE", [], ["problem talking to server {n}: Application error"]),
    (b"action\n\n", ["missing value for string attribute action from {n}"],
     ["missing value for string attribute action from {n}",
      "problem talking to server {n}: Application error"]),
    (b"action=OK\nCLOSE", ["premature end-of-input on {n} while reading input attribute name"],
     ["premature end-of-input on {n} while reading input attribute name",
      "problem talking to server {n}: Application error"]),
])
def test_bad_replies_use_default_action(server, reply, first_try, last_try):
    srv = server(lambda req: reply)
    log = NullLog()
    p = policy_for(srv.spec, log=log)
    delays = no_retry_sleep(p)
    assert str(run(rcpt(p, session(), "u@example.com"))) == DEFAULT_REPLY
    n = srv.spec[5:]
    assert warnings(log) == ["warning: " + w.format(n=n) for w in first_try + last_try]
    assert len(srv.requests) == 2 and delays == [1.0]


def test_silent_server_times_out(server):
    srv = server(lambda req: None if req["recipient"].startswith("hang") else b"action=REJECT a\r\n\r\n")
    log = NullLog()
    spec = f"{{ {srv.spec}, timeout=1s, try_limit=1 }}"
    p = policy_for(spec, log=log)
    t0 = time.monotonic()
    assert str(run(rcpt(p, session(), "hang@example.com"))) == \
        "451 4.3.5 <hang@example.com>: Recipient address rejected: Server configuration problem"
    assert time.monotonic() - t0 < 5
    n = srv.spec[5:]
    assert warnings(log) == [f"warning: problem talking to server {n}: Connection timed out"]
    log.lines.clear()
    # CR LF is not a line end: the reply never ends (as with Postfix).
    run(rcpt(p, session(), "crlf@example.com"))
    assert warnings(log) == [f"warning: timeout on {n} while reading input attribute name",
                             f"warning: problem talking to server {n}: Connection timed out"]


def test_hostile_replies_are_bounded(server):
    answers = {"huge": b"action=REJECT " + b"x" * (delegation.MAX_REPLY_LINE + 10) + b"\n\n",
               "many": b"".join(b"a%d=b\n" % i for i in range(delegation.MAX_REPLY_ATTRIBUTES + 1))
               + b"action=OK\n\n"}
    srv = server(lambda req: answers[req["recipient"].split("@")[0]])
    log = NullLog()
    p = policy_for(f"{{ {srv.spec}, try_limit=1 }}", log=log)
    for user in ("huge", "many"):
        assert str(run(rcpt(p, session(), f"{user}@example.com"))).startswith("451 4.3.5 ")
    n = srv.spec[5:]
    assert warnings(log) == [
        f"warning: input attribute from {n} exceeds {delegation.MAX_REPLY_LINE} bytes",
        f"warning: problem talking to server {n}: Application error",
        f"warning: too many attributes in input from {n}",
        f"warning: problem talking to server {n}: Application error"]


def test_hung_server_does_not_block_other_sessions(server):
    srv = server(lambda req: None if req["recipient"].startswith("hang") else b"action=OK\n\n")
    p = policy_for(f"{{ {srv.spec}, timeout=2s, try_limit=1 }}")

    async def both():
        done = {}

        async def one(user):
            reply = await rcpt(p, session(), f"{user}@example.com")
            done[user] = (time.monotonic(), reply)

        t0 = time.monotonic()
        await asyncio.gather(one("hang"), one("fast"))
        return t0, done

    t0, done = run(both())
    assert done["fast"][1] is None and done["fast"][0] - t0 < 1.0
    assert str(done["hang"][1]).startswith("451 4.3.5 ") and done["hang"][0] - t0 >= 1.9


def test_requests_in_flight_are_capped(server, monkeypatch):
    monkeypatch.setattr(delegation, "MAX_BUSY_CONNECTIONS", 2)

    def slow(req):
        time.sleep(0.2)
        return b"action=OK\n\n"

    srv = server(slow)
    p = policy_for(srv.spec)

    async def many():
        return await asyncio.gather(*(rcpt(p, session(), f"u{i}@example.com") for i in range(6)))

    assert run(many()) == [None] * 6
    assert len(srv.requests) == 6 and srv.max_open <= 2 and srv.connections == 2


# -- per-service settings and the default action --------------------------------------

def test_per_service_settings():
    cfg = make_policy().config
    s = parse_service("{ inet:127.0.0.1:9998, timeout=10s, max_idle=1m, max_ttl=1h, request_limit=5, "
                      "try_limit=3, retry_delay=2s, { default_action = DEFER_IF_PERMIT dead service }, "
                      "policy_context=ctx1 }", cfg)
    assert (s.kind, s.name, s.host, s.port) == ("inet", "127.0.0.1:9998", "127.0.0.1", 9998)
    assert (s.timeout, s.max_idle, s.max_ttl, s.request_limit, s.try_limit, s.retry_delay) == \
        (10, 60, 3600, 5, 3, 2)
    assert (s.default_action, s.policy_context) == ("DEFER_IF_PERMIT dead service", "ctx1")
    s = parse_service("inet:[::1]:9998", cfg)
    assert (s.host, s.port, s.timeout, s.try_limit, s.default_action) == \
        ("::1", 9998, 100, 2, "451 4.3.5 Server configuration problem")
    for bad in ("{ inet:127.0.0.1:1, dead }", "{ inet:127.0.0.1:1, bogus=1 }", "tcp:127.0.0.1:1",
                "inet:127.0.0.1", "{ inet:127.0.0.1:1, timeout=0 }", "{ inet:127.0.0.1:1, try_limit=0 }"):
        with pytest.raises(PolicySpecError):
            parse_service(bad, cfg)


def test_bad_service_is_a_server_error():
    log = NullLog()
    p = policy_for("{ inet:127.0.0.1:9998, dead }", log=log)
    # Postfix refuses to start; a running postwell answers as for any configuration error.
    assert str(run(rcpt(p, session(), "u@example.com"))) == "451 4.3.5 Server configuration error"
    assert any("missing '=' after attribute name" in line for line in warnings(log))


def test_global_settings_and_policy_context(server):
    srv = server()
    port = harness.free_port()
    log = NullLog()
    p = make_policy({
        "smtpd_policy_service_policy_context": "global",
        "smtpd_policy_service_default_action": "DUNNO",
        "smtpd_policy_service_try_limit": "1",
        "smtpd_recipient_restrictions": f"check_policy_service {{ {srv.spec}, policy_context=mine }}, "
                                        f"check_policy_service inet:127.0.0.1:{port}, "
                                        f"check_policy_service {srv.spec}, reject"}, log=log)
    no_retry_sleep(p)
    assert str(run(rcpt(p, session(), "u@example.com"))).startswith("554 5.7.1 ")
    assert [dict(r)["policy_context"] for r in srv.requests] == ["mine", "global"]
    assert len(warnings(log)) == 2   # one try only; DUNNO went on to the next check


def test_default_action_defer_if_permit(server):
    port = harness.free_port()
    p = policy_for(f"{{ inet:127.0.0.1:{port}, {{ default_action = DEFER_IF_PERMIT dead service }}, "
                   "try_limit=1 }")
    # Observed on Postfix: the deferral wins over the later permit.
    assert str(run(rcpt(p, session(), "u@example.com"))) == \
        "450 4.7.1 <u@example.com>: Recipient address rejected: dead service"


def test_default_action_calling_a_dead_service_gets_builtin_default():
    port = harness.free_port()
    log = NullLog()
    p = make_policy({
        "smtpd_restriction_classes": "fallback",
        "fallback": f"check_policy_service inet:127.0.0.1:{port}",
        "smtpd_policy_service_default_action": "fallback",
        "smtpd_policy_service_try_limit": "1",
        "smtpd_recipient_restrictions": f"check_policy_service inet:127.0.0.1:{port}, permit"}, log=log)
    assert str(run(rcpt(p, session(), "u@example.com"))) == DEFAULT_REPLY
    assert len(warnings(log)) == 4


# -- connections ----------------------------------------------------------------------

def test_connection_reuse_and_request_limit(server):
    srv = server()
    p = policy_for(srv.spec)

    async def many(n):
        for i in range(n):
            assert await rcpt(p, session(), f"u{i}@example.com") is None

    run(many(5))
    assert (len(srv.requests), srv.connections) == (5, 1)
    srv2 = server()
    p = policy_for(f"{{ {srv2.spec}, request_limit=2 }}")
    run(many(5))
    assert (len(srv2.requests), srv2.connections) == (5, 3)


def test_max_idle_and_max_ttl(server):
    srv = server()
    p = policy_for(f"{{ {srv.spec}, max_idle=10s, max_ttl=30s }}")
    client = PolicyClients.of(p.engine).get(f"{{ {srv.spec}, max_idle=10s, max_ttl=30s }}")
    now = [1000.0]
    client.clock = lambda: now[0]

    async def scenario():
        async def ask():
            assert await rcpt(p, session(), "u@example.com") is None
        await ask()
        now[0] += 9          # idle < max_idle: reused
        await ask()
        now[0] += 10         # idle >= max_idle: a new connection
        await ask()
        for _ in range(4):   # keeps being used, but lives at most max_ttl
            now[0] += 8
            await ask()
    run(scenario())
    assert (len(srv.requests), srv.connections) == (7, 3)


def test_idle_connection_closed_by_server_is_replaced(server):
    # The server answers, then closes the connection (a restart, its own idle limit).
    srv = server(lambda req: b"action=DUNNO\n\nCLOSE")
    log = NullLog()
    p = policy_for(srv.spec, log=log)
    delays = no_retry_sleep(p)

    async def scenario():
        for user in ("a1", "a2", "a3"):
            assert await rcpt(p, session(), f"{user}@example.com") is None
            await asyncio.sleep(0.05)

    run(scenario())
    # No failed try, no retry delay, no warning: the dead connection was noticed while idle.
    assert (len(srv.requests), srv.connections, delays, warnings(log)) == (3, 3, [], [])


def test_unix_socket_under_queue_directory(server, tmp_path):
    (tmp_path / "private").mkdir()
    srv = server(lambda req: b"action=REJECT unix says no\n\n", unix_path=str(tmp_path / "private/policy"))
    log = NullLog()
    p = policy_for("unix:private/policy", {"queue_directory": str(tmp_path)}, log=log)
    assert str(run(rcpt(p, session(), "u@example.com"))) == \
        "554 5.7.1 <u@example.com>: Recipient address rejected: unix says no"
    assert srv.connections == 1
    p = policy_for("unix:private/nothing", {"queue_directory": str(tmp_path)}, log=log)
    no_retry_sleep(p)
    log.lines.clear()
    assert str(run(rcpt(p, session(), "u@example.com"))) == DEFAULT_REPLY
    # ENOENT is reported as "problem talking" only on the last try (as Postfix).
    assert warnings(log) == ["warning: connect to private/nothing: No such file or directory"] * 2 + \
        ["warning: problem talking to server private/nothing: No such file or directory"]


# -- side by side with the reference Postfix ------------------------------------------

# Values that differ between any two instances (ports, ids, time stamps, versions).
INSTANCE_VALUES = ("client_port", "server_port", "queue_id", "instance")


def _stage_config(spec):
    check = f"check_policy_service {spec}"
    return {"smtpd_delay_reject": "no", "smtpd_client_restrictions": check,
            "smtpd_helo_restrictions": check, "smtpd_sender_restrictions": check,
            "smtpd_recipient_restrictions": f"{check}, permit_mynetworks, reject_unauth_destination",
            "smtpd_data_restrictions": check, "smtpd_end_of_data_restrictions": check}


def _comparable(requests):
    out = []
    for req in requests:
        row = []
        for name, value in req:
            if name in INSTANCE_VALUES:
                value = bool(value)
            row.append((name, value))
        out.append(row)
    return out


def test_requests_match_reference_postfix(server, postwell_factory, reference_factory):
    V = harness.VIRTUAL_DOMAIN
    script = ["EHLO client.example", "MAIL FROM:<s@example.org> SIZE=100", f"RCPT TO:<alice@{V}>",
              f"RCPT TO:<bob@{V}>", "DATA", "Subject: x", "", "hello", ".", "QUIT"]
    answers = {f"bob@{V}": b"action=PREPEND X-Policy: seen\n\n"}
    recorded = {}
    for kind, factory in (("postfix", reference_factory), ("postwell", postwell_factory)):
        srv = server(lambda req: answers.get(req.get("recipient"), b"action=DUNNO\n\n"))
        inst = factory(_stage_config(srv.spec)).start()
        srv.requests.clear()          # the start-up probe's CONNECT
        replies = harness.dialogue(inst.port, script, timeout=20)
        assert [r.code for r in replies] == [220, 250, 250, 250, 250, 354, 250, 221], (kind, replies)
        harness.wait_for(lambda: len(srv.requests) >= 7, 10, what="policy requests")
        recorded[kind] = srv.requests[:]
        inst.stop()
    want, got = _comparable(recorded["postfix"]), _comparable(recorded["postwell"])
    assert [dict(r)["protocol_state"] for r in got] == [dict(r)["protocol_state"] for r in want]
    for w, g in zip(want, got):
        assert g == w
    # One instance value per message, kept from RCPT to END-OF-MESSAGE.
    assert len({dict(r)["instance"] for r in recorded["postwell"][3:]}) == 1


def _stage_answer(req):
    """REJECT chosen by what the request carries, to see each stage's reply shape."""
    state, sender = req.get("protocol_state"), req.get("sender")
    if state == "EHLO" and req.get("helo_name") == "bad.example":
        return b"action=REJECT no helo for you\n\n"
    if state == "MAIL" and sender == "bad@example.org":
        return b"action=550 5.7.0 bad sender\n\n"
    if state == "RCPT" and req.get("recipient", "").startswith("rej@"):
        return b"action=DEFER_IF_PERMIT come back\n\n"
    if state == "DATA" and sender == "datarej@example.org":
        return b"action=REJECT no data\n\n"
    if state == "END-OF-MESSAGE" and sender == "":
        return b"action=450 4.7.2 not now\n\n"
    return b"action=DUNNO\n\n"


def test_stage_replies_and_bdat_match_reference_postfix(server, postwell_factory, reference_factory):
    V = harness.VIRTUAL_DOMAIN
    script = ["EHLO bad.example", "EHLO client.example",
              "MAIL FROM:<bad@example.org>", "MAIL FROM:<s@example.org>", f"RCPT TO:<rej@{V}>",
              f"RCPT TO:<alice@{V}>", "RSET",
              "MAIL FROM:<datarej@example.org>", f"RCPT TO:<alice@{V}>", "DATA", "RSET",
              "MAIL FROM:<>", f"RCPT TO:<bob@{V}>", "BDAT 7 LAST\r\nhello\r\n", "QUIT"]
    recorded, replies = {}, {}
    for kind, factory in (("postfix", reference_factory), ("postwell", postwell_factory)):
        srv = server(_stage_answer)
        inst = factory(_stage_config(srv.spec)).start()
        srv.requests.clear()
        replies[kind] = [str(r) for r in harness.dialogue(inst.port, script, timeout=20)[2:]]
        harness.wait_for(lambda: any(dict(r)["protocol_state"] == "END-OF-MESSAGE"
                                     for r in srv.requests), 10, what="policy requests")
        recorded[kind] = srv.requests[:]
        inst.stop()
    assert replies["postwell"] == replies["postfix"]
    want, got = _comparable(recorded["postfix"]), _comparable(recorded["postwell"])
    assert [dict(r)["protocol_state"] for r in got] == [dict(r)["protocol_state"] for r in want]
    for w, g in zip(want, got):
        assert g == w
    # A new transaction, a new instance (its sequence number counts up).
    for kind in recorded:
        instances = [dict(r)["instance"] for r in recorded[kind] if dict(r)["instance"]]
        assert len(set(instances)) == 3 and instances[-1].endswith(".2"), kind


def test_cancelled_session_frees_its_connection(server):
    srv = server(lambda req: None)
    p = policy_for(srv.spec)
    client = PolicyClients.of(p.engine).get(srv.spec)

    async def scenario():
        task = asyncio.ensure_future(rcpt(p, session(), "u@example.com"))
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return client._busy, len(client._idle)

    assert run(scenario()) == (0, 0)
    harness.wait_for(lambda: srv.open_now == 0, 5, what="the policy connection to close")


def test_action_with_leading_blank_is_a_restriction_list(server):
    srv = server(lambda req: b"action= REJECT lead\n\n")
    log = NullLog()
    p = policy_for(srv.spec, log=log)
    assert str(run(rcpt(p, session(), "u@example.com"))) == \
        "554 5.7.1 <u@example.com>: Recipient address rejected: Access denied"
    assert warnings(log) == ["warning: restriction `lead' after `reject' is ignored"]


def _smtpd_lines(inst):
    out = []
    for line in inst.log_text().splitlines():
        head, sep, text = line.partition("postfix/smtpd[")
        if sep and ("warning:" in text or "reject:" in text):
            out.append(text.split("]: ", 1)[1])
    return out


def test_failure_logs_match_reference_postfix(server, postwell_factory, reference_factory):
    """A dead service and a server that answers garbage: same replies, same log lines."""
    dead = harness.free_port()
    V = harness.VIRTUAL_DOMAIN
    script = ["EHLO client.example", "MAIL FROM:<s@example.org>", f"RCPT TO:<dead@{V}>",
              f"RCPT TO:<garbage@{V}>", f"RCPT TO:<empty@{V}>", "QUIT"]
    answers = {"garbage": b"hello world\n\n", "empty": b"action=\n\n"}
    got = {}
    for kind, factory in (("postfix", reference_factory), ("postwell", postwell_factory)):
        srv = server(lambda req: answers.get(req.get("recipient", "").split("@")[0], b"action=DUNNO\n\n"))
        conf = {"smtpd_restriction_classes": "deadclass",
                "deadclass": f"check_policy_service inet:127.0.0.1:{dead}",
                "smtpd_recipient_restrictions":
                    f"check_recipient_access inline:{{dead@{V}=deadclass}}, "
                    f"check_policy_service {{ {srv.spec}, timeout=5s }}, "
                    "permit_mynetworks, reject_unauth_destination"}
        inst = factory(conf).start()
        replies = [str(r) for r in harness.dialogue(inst.port, script, timeout=30)[2:]]
        harness.wait_for(lambda: sum("reject:" in line for line in _smtpd_lines(inst)) >= 3, 10,
                         what="the reject log lines")
        lines = [line.replace(srv.spec[5:], "POLICY") for line in _smtpd_lines(inst)]
        got[kind] = (replies, lines)
        inst.stop()
    assert got["postwell"][0] == got["postfix"][0]
    assert got["postwell"][1] == got["postfix"][1]
