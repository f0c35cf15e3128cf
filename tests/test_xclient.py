"""XCLIENT (Postfix's XCLIENT_README): the attribute rules (postwell.smtp.xclient), the
sans-IO engine, the asyncio smtpd, and dialogues side by side with Postfix 3.7.

Every reply text, limit and address form pinned here without a reference was first
checked against Postfix 3.7 (the side-by-side cases at the end replay them)."""

from __future__ import annotations

import socket
import threading

import pytest

import harness
from postwell.policy.state import SessionState
from postwell.smtp.reply import Reply
from postwell.smtp.server import Info, ServerConfig, Xclient
from postwell.smtp.xclient import (EHLO_KEYWORD, STATUS_OK, STATUS_PERM, STATUS_TEMP,
                                   apply_to_state, normalize_address, parse_xclient,
                                   restart_state)
from test_smtp_engine import Driver
from test_smtpd import WAIT, smtpd  # noqa: F401 - fixture

EHLO = "EHLO client.example.org"
MAIL = "MAIL FROM:<sender@example.org>"
FAR = "RCPT TO:<x@far.example>"
GREETING = Reply(220, "mx.example.test ESMTP postwell")


def items(arg: str, ipv6: bool = True) -> list[tuple]:
    req, error = parse_xclient(arg, ipv6)
    assert error is None, str(error)
    return [(i.attribute, i.value, i.status) for i in req.items]


def refusal(arg: str, ipv6: bool = False) -> str:
    _req, error = parse_xclient(arg, ipv6)
    assert error is not None
    return str(error)


# ---------------------------------------------------------------- attribute rules

@pytest.mark.parametrize("arg, want", [
    ("NAME=client.example.net ADDR=192.0.2.1",
     [("NAME", "client.example.net", STATUS_OK), ("ADDR", "192.0.2.1", STATUS_OK)]),
    ("name=a.example", [("NAME", "a.example", STATUS_OK)]),          # names in any case
    ("NAME=[tempunavail]", [("NAME", "unknown", STATUS_TEMP)]),
    ("NAME=[UNAVAILABLE] ADDR=[unavailable]",
     [("NAME", "unknown", STATUS_PERM), ("ADDR", "unknown", STATUS_OK)]),
    ("NAME=a+2Eb.example", [("NAME", "a.b.example", STATUS_OK)]),    # RFC 3461 4 xtext
    ("ADDR=+31.2.3.4", [("ADDR", "1.2.3.4", STATUS_OK)]),
    ("PORT=99999", [("PORT", "99999", STATUS_OK)]),                  # digits only are counted
    ("PORT=0 DESTPORT=[UNAVAILABLE]",
     [("PORT", "0", STATUS_OK), ("DESTPORT", "unknown", STATUS_OK)]),
    ("PROTO=esmtp", [("PROTO", "ESMTP", STATUS_OK)]),
    ("HELO=a<b>c+01d+20e", [("HELO", "a?b?c?d?e", STATUS_OK)]),      # neutered as HELO is
    ("HELO=[UNAVAILABLE]", [("HELO", None, STATUS_OK)]),
    ("LOGIN=a<b>+01c", [("LOGIN", "a<b>?c", STATUS_OK)]),            # printable, not neutered
    ("LOGIN=a+00b", [("LOGIN", "a", STATUS_OK)]),                    # a C string ends at NUL
    ("PROTO=SMTP+00x", [("PROTO", "SMTP", STATUS_OK)]),
    ("LOGIN=[UNAVAILABLE]", [("LOGIN", None, STATUS_OK)]),
    ("REVERSE_NAME=r.example NAME=n.example",
     [("REVERSE_NAME", "r.example", STATUS_OK), ("NAME", "n.example", STATUS_OK)]),
    ("DESTADDR=IPV6:2001:DB8::5 DESTPORT=587",
     [("DESTADDR", "2001:db8::5", STATUS_OK), ("DESTPORT", "587", STATUS_OK)]),
    ("NAME=a.example\tADDR=192.0.2.9",
     [("NAME", "a.example", STATUS_OK), ("ADDR", "192.0.2.9", STATUS_OK)]),
    ("HELO=" + "h" * 255, [("HELO", "h" * 255, STATUS_OK)]),
])
def test_parse_accepts(arg, want):
    assert items(arg) == want


@pytest.mark.parametrize("arg, want", [
    ("FOO=bar", "501 5.5.4 Bad XCLIENT attribute name: FOO"),
    ("foo=bar", "501 5.5.4 Bad XCLIENT attribute name: foo"),        # as the client wrote it
    ("=x", "501 5.5.4 Bad XCLIENT attribute name: "),
    ("NAME", "501 5.5.4 Error: attribute=value expected"),
    ("NAME=", "501 5.5.4 Error: attribute=value expected"),
    ("PORT=", "501 5.5.4 Error: attribute=value expected"),
    ("HELO=" + "h" * 256, "501 5.5.4 Error: attribute value too long"),
    ("HELO=" + "+41" * 100, "501 5.5.4 Error: attribute value too long"),   # before decoding
    ("FOO=" + "f" * 300, "501 5.5.4 Error: attribute value too long"),
    ("NAME=1.2.3.4", "501 5.5.4 Bad NAME syntax: 1.2.3.4"),
    ("name=bad!", "501 5.5.4 Bad NAME syntax: bad!"),
    ("NAME=a+01b", "501 5.5.4 Bad NAME syntax: a?b"),
    ("NAME=a+zzb+41", "501 5.5.4 Bad NAME syntax: a+zzb+41"),        # bad xtext: taken as is
    ("NAME=a+C3+A9b", "501 5.5.4 Bad NAME syntax: a\u00e9b"),
    ('NAME="a b"', '501 5.5.4 Bad NAME syntax: "a b"'),
    ("NAME=+00", "501 5.5.4 Bad NAME syntax: "),
    ("REVERSE_NAME=bad!", "501 5.5.4 Bad REVERSE_NAME syntax: bad!"),
    ("ADDR=bogus", "501 5.5.4 Bad ADDR syntax: bogus"),
    ("ADDR=[TEMPUNAVAIL]", "501 5.5.4 Bad ADDR syntax: [TEMPUNAVAIL]"),
    ("ADDR=IPV6:2001:db8::1", "501 5.5.4 Bad ADDR syntax: IPV6:2001:db8::1"),   # ipv4 only
    ("addr=IpV6:zz", "501 5.5.4 Bad ADDR syntax: IpV6:zz"),
    ("PORT=x", "501 5.5.4 Bad PORT syntax: x"),
    ("PORT=-1", "501 5.5.4 Bad PORT syntax: -1"),
    ("PORT=123456", "501 5.5.4 Bad PORT syntax: 123456"),
    ("PROTO=FOO", "501 5.5.4 Bad PROTO syntax: FOO"),
    ("PROTO=[UNAVAILABLE]", "501 5.5.4 Bad PROTO syntax: [UNAVAILABLE]"),
    ("DESTADDR=bogus", "501 5.5.4 Bad DESTADDR syntax: bogus"),
    ("DESTPORT=123456", "501 5.5.4 Bad DESTPORT syntax: 123456"),
])
def test_parse_refuses(arg, want):
    assert refusal(arg) == want


def test_parse_keeps_the_attributes_before_a_bad_one():
    # Postfix updates its session attribute by attribute and does not undo them.
    req, error = parse_xclient("NAME=a.example HELO=h.example ADDR=bogus PORT=1", False)
    assert str(error) == "501 5.5.4 Bad ADDR syntax: bogus"
    assert [(i.attribute, i.value) for i in req.items] == [("NAME", "a.example"),
                                                           ("HELO", "h.example")]


@pytest.mark.parametrize("value, ipv6, want", [
    ("192.0.2.1", False, "192.0.2.1"),
    ("01.2.3.4", False, "1.2.3.4"),
    ("001.002.003.004", False, "1.2.3.4"),
    ("010.2.3.4", False, "8.2.3.4"),           # a leading 0 is octal (inet_aton)
    ("08.2.3.4", False, None),
    ("0.0.0.0", False, "0.0.0.0"),
    ("0.1.2.3", False, None),
    ("1.2.3.256", False, None),
    ("255.255.255.255", False, "255.255.255.255"),
    ("1.2.3", False, None),
    ("1..2.3", False, None),
    ("1.2.3.4.", False, None),
    ("0x01020304", False, None),
    ("IPV6:2001:DB8::1", True, "2001:db8::1"),
    ("ipv6:2001:db8:0:0:0:0:0:1", True, "2001:db8::1"),
    ("IPV6:::", True, "::"),
    ("IPV6:::ffff:192.0.2.1", True, "192.0.2.1"),
    ("IPV6:::ffff:192.0.2.1", False, "192.0.2.1"),   # mapped: IPv4 whatever inet_protocols
    ("IPV6:2001:db8::1", False, None),
    ("2001:db8::1", True, None),               # IPv6 needs its prefix
    ("::ffff:192.0.2.9", True, None),
    ("IPV6:1.2.3.4", True, None),
    ("IPv6:fe80::1%eth0", True, None),
])
def test_normalize_address(value, ipv6, want):
    assert normalize_address(value, ipv6) == want


def test_state_takes_attributes_in_order():
    st = SessionState(client_name="unknown", client_addr="127.0.0.1", client_port="5000",
                      server_addr="127.0.0.1", server_port="25", helo_name="old.example",
                      protocol="ESMTP")
    req, _ = parse_xclient("REVERSE_NAME=r.example NAME=n.example ADDR=192.0.2.1 PORT=42 "
                           "DESTADDR=192.0.2.25 DESTPORT=2525 LOGIN=bob")
    apply_to_state(st, req, sasl_enabled=True)
    # NAME sets the reverse name too: the REVERSE_NAME before it is overwritten.
    assert (st.client_name, st.reverse_client_name, st.client_addr, st.client_port) == \
        ("n.example", "n.example", "192.0.2.1", "42")
    assert (st.server_addr, st.server_port) == ("192.0.2.25", "2525")
    assert (st.sasl_username, st.sasl_method) == ("bob", "XCLIENT")
    assert st.client_name_status == STATUS_OK
    restart_state(st, req)
    assert st.helo_name is None and st.protocol == "SMTP"       # not given: reset
    assert st.sasl_username == "bob"                             # given: kept

    req, _ = parse_xclient("NAME=x.example REVERSE_NAME=[TEMPUNAVAIL] HELO=h.example")
    apply_to_state(st, req, sasl_enabled=True)
    restart_state(st, req)
    assert (st.reverse_client_name, st.reverse_client_name_status) == ("unknown", STATUS_TEMP)
    assert st.helo_name == "h.example"
    assert st.sasl_username is None and st.sasl_method is None  # login not given: gone


def test_login_needs_sasl():
    st = SessionState()
    req, _ = parse_xclient("LOGIN=bob")
    apply_to_state(st, req, sasl_enabled=False)
    assert st.sasl_username is None


def test_parse_never_raises():
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    words = st.sampled_from(["NAME", "ADDR", "PORT", "PROTO", "HELO", "LOGIN", "REVERSE_NAME",
                             "DESTADDR", "DESTPORT", "name", "X", ""])
    values = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40) | \
        st.sampled_from(["[UNAVAILABLE]", "[tempunavail]", "IPV6:::1", "+00", "+zz", "1.2.3.4"])
    item = st.tuples(words, st.sampled_from(["=", "", "=="]), values).map("".join)

    @hypothesis.given(st.lists(item, max_size=6).map(" ".join), st.booleans())
    def check(arg, ipv6):
        req, error = parse_xclient(arg, ipv6)
        assert error is None or error.code == 501
        state = SessionState()
        apply_to_state(state, req, True)
        restart_state(state, req)
    check()


# ---------------------------------------------------------------- the engine

def _driver(reply=GREETING, **cfg):
    def answer(ev):
        if not ev.complete:
            return None
        return reply(ev) if callable(reply) else reply
    d = Driver(ServerConfig(hostname="mx.example.test", error_sleep_time=0, **cfg),
               replies={Xclient: answer})
    return d


def test_engine_unauthorized_by_default():
    d = _driver()
    assert EHLO_KEYWORD not in d.feed(b"EHLO a\r\n")
    assert d.feed(b"XCLIENT NAME=x\r\n") == "550 5.7.0 Error: insufficient authorization\r\n"
    assert d.feed(b"XCLIENT\r\n") == "501 5.5.4 Syntax: XCLIENT attribute=value...\r\n"
    d.feed(b"MAIL FROM:<a@b.example>\r\n")
    # A transaction is checked first, for XFORWARD too (both checked against 3.7).
    for line in (b"XCLIENT NAME=x", b"XCLIENT", b"XFORWARD NAME=x", b"XFORWARD"):
        assert d.feed(line + b"\r\n") == "503 5.5.1 Error: MAIL transaction in progress\r\n"
    assert not any(isinstance(e, Xclient) for e in d.events)


def test_engine_ehlo_keyword_order():
    d = _driver(auth_mechanisms=("PLAIN",))
    d.conn.xclient_allowed = d.conn.xforward_allowed = True
    lines = d.feed(b"EHLO a\r\n").splitlines()
    assert lines[5:8] == ["250-AUTH PLAIN", "250-" + EHLO_KEYWORD,
                          "250-XFORWARD NAME ADDR PROTO HELO SOURCE PORT IDENT"]
    assert EHLO_KEYWORD == "XCLIENT NAME ADDR PROTO HELO REVERSE_NAME PORT LOGIN DESTADDR DESTPORT"


def test_engine_restarts_the_session():
    d = _driver()
    d.conn.xclient_allowed = True
    d.feed(b"EHLO a\r\n")
    assert d.conn.helo_name == "a" and d.conn.esmtp
    assert d.feed(b"XCLIENT NAME=x.example ADDR=192.0.2.1\r\n") == str(GREETING) + "\r\n"
    ev = [e for e in d.events if isinstance(e, Xclient)][-1]
    assert ev.complete and ev.default is None
    assert d.conn.helo_name is None and not d.conn.esmtp
    d.feed(b"XCLIENT HELO=h.example PROTO=ESMTP LOGIN=bob\r\n")
    assert d.conn.helo_name == "h.example" and d.conn.esmtp and d.conn.authenticated
    d.feed(b"XCLIENT NAME=y.example\r\n")
    assert d.conn.helo_name is None and not d.conn.authenticated
    # Even a successful XCLIENT counts as failed (Postfix never returns to its command
    # loop after it), and none counts as an error.
    assert d.conn.counters_text() == "ehlo=1 xclient=0/3 commands=1/4"
    assert d.conn.error_count == 0


def test_engine_partial_failure_keeps_earlier_attributes():
    d = _driver()
    d.conn.xclient_allowed = True
    d.feed(b"EHLO a\r\n")
    assert d.feed(b"XCLIENT HELO=h.example FOO=1\r\n") == \
        "501 5.5.4 Bad XCLIENT attribute name: FOO\r\n"
    ev = [e for e in d.events if isinstance(e, Xclient)][-1]
    assert not ev.complete and ev.request.given("HELO")
    assert d.conn.helo_name == "h.example" and d.conn.esmtp     # no restart
    assert d.conn.error_count == 1
    assert d.feed(b"XCLIENT FOO=1\r\n") == "501 5.5.4 Bad XCLIENT attribute name: FOO\r\n"
    assert len([e for e in d.events if isinstance(e, Xclient)]) == 1   # nothing to apply


def test_engine_pipelining_line_names_the_new_client():
    d = _driver()
    d.conn.xclient_allowed = True
    d.feed(b"EHLO a\r\n")

    def rename(ev):
        d.conn.client = "x.example[127.0.0.1]"      # what the glue does before replying
        return GREETING
    d.replies[Xclient] = rename
    out = d.feed(b"XCLIENT NAME=x.example\r\nEHLO b\r\n")
    assert out.startswith(str(GREETING) + "\r\n250-mx.example.test")
    infos = [e.text for e in d.events if isinstance(e, Info)]
    assert infos == ["improper command pipelining after XCLIENT from x.example[127.0.0.1]: "
                     "EHLO b\\r\\n"]


def test_engine_connect_reject_after_xclient():
    reject = Reply(554, "<unknown[192.0.2.66]>: Client host rejected: go away", "5.7.1")
    d = _driver(reply=reject)
    d.conn.xclient_allowed = True
    d.feed(b"EHLO a\r\n")
    assert d.feed(b"XCLIENT ADDR=192.0.2.66\r\n") == str(reject) + "\r\n"
    d.conn.client = "unknown[192.0.2.66]"
    assert d.feed(b"EHLO a\r\n") == "503 5.7.0 Error: access denied for unknown[192.0.2.66]\r\n"
    assert d.feed(b"QUIT\r\n") == "221 2.0.0 Bye\r\n"


def test_engine_xclient_is_not_junk():
    d = _driver(junk_command_limit=1, hard_error_limit=3)
    d.conn.xclient_allowed = True
    out = d.feed(b"EHLO a\r\n" + b"XCLIENT NAME=a.example\r\n" * 5 + b"NOOP\r\n")
    assert out.count("220 ") == 5 and out.endswith("250 2.0.0 Ok\r\n")


# ---------------------------------------------------------------- the smtpd (glue)

XC = {"smtpd_authorized_xclient_hosts": "127.0.0.0/8"}


def _dialogue(r, lines):
    return [str(x) for x in harness.dialogue(r.port, lines, timeout=WAIT)]


def test_smtpd_overrides_client_for_restrictions_and_logs(smtpd):
    r = smtpd(XC)
    got = _dialogue(r, [EHLO, "XCLIENT NAME=x.example ADDR=192.0.2.1", EHLO, MAIL, FAR,
                        "RCPT TO:<postmaster@mx.example.test>", "DATA",
                        "Subject: t", "", "hi", ".", "QUIT"])
    assert got[2] == "220 mx.example.test ESMTP postwell"
    assert EHLO_KEYWORD in got[1] and EHLO_KEYWORD not in got[3]    # 192.0.2.1: not listed
    assert got[5] == "454 4.7.1 <x@far.example>: Relay access denied"
    assert got[6] == "250 2.1.5 Ok"
    r.wait_log("disconnect from")
    lines = r.lines()
    assert "connect from unknown[127.0.0.1]" in lines
    assert any(ln.startswith("NOQUEUE: reject: RCPT from x.example[192.0.2.1]: 454 4.7.1 "
                             "<x@far.example>: Relay access denied;") and ln.endswith(
        "proto=ESMTP helo=<client.example.org>") for ln in lines), lines
    assert any(ln.endswith(": client=x.example[192.0.2.1]") for ln in lines), lines
    assert lines[-1] == ("disconnect from x.example[192.0.2.1] ehlo=2 xclient=0/1 mail=1 "
                         "rcpt=1/2 data=1 quit=1 commands=6/8")
    qid = r.queued()[0]
    qm = r.store.open(qid)
    text = b"".join(qm.iter_content()).decode()
    assert text.startswith("Received: from client.example.org (x.example [192.0.2.1])\n")
    assert qm.attributes.get("client_address") == "192.0.2.1"
    assert qm.attributes.get("client_name") == "x.example"


def test_smtpd_not_authorized_by_default(smtpd):
    r = smtpd()
    got = _dialogue(r, [EHLO, "XCLIENT ADDR=192.0.2.1", "QUIT"])
    assert "XCLIENT" not in got[1]
    assert got[2] == "550 5.7.0 Error: insufficient authorization"


def test_smtpd_login_counts_as_sasl_login(smtpd, tmp_path):
    passwd = tmp_path / "sasl_passwd"
    passwd.write_text("alice@example.com:{PLAIN}secret\n")
    r = smtpd({**XC, "mynetworks": "192.0.2.0/24", "smtpd_sasl_auth_enable": "yes",
               "smtpd_sasl_type": "postwell", "smtpd_sasl_path": str(passwd)})
    got = _dialogue(r, [EHLO, "XCLIENT LOGIN=bob ADDR=198.51.100.9", EHLO,
                        "AUTH PLAIN AGFsaWNlQGV4YW1wbGUuY29tAHNlY3JldA==", MAIL, FAR, "RSET",
                        "XCLIENT NAME=x.example", "QUIT"])
    assert got[2].startswith("220 ") and got[5] == "250 2.1.0 Ok"
    assert got[4] == "503 5.5.1 Error: already authenticated"
    assert got[6] == "250 2.1.5 Ok"                  # permit_sasl_authenticated
    # 198.51.100.9 is not authorized for XCLIENT any more.
    assert got[8] == "550 5.7.0 Error: insufficient authorization"
    r.wait_log("disconnect from")
    assert any(ln.endswith(": client=unknown[198.51.100.9], sasl_method=XCLIENT, "
                           "sasl_username=bob") for ln in r.lines()), r.lines()


def test_smtpd_connect_level_reject_after_xclient(smtpd):
    r = smtpd({**XC, "smtpd_delay_reject": "no", "smtpd_client_restrictions":
               "check_client_access inline:{{192.0.2.66=REJECT go away}}"})
    got = _dialogue(r, [EHLO, "XCLIENT ADDR=192.0.2.66", EHLO, "QUIT"])
    assert got[2] == "554 5.7.1 <unknown[192.0.2.66]>: Client host rejected: go away"
    assert got[3] == "503 5.7.0 Error: access denied for unknown[192.0.2.66]"
    assert got[4] == "221 2.0.0 Bye"
    line = r.wait_log("reject: XCLIENT")
    assert line == ("NOQUEUE: reject: XCLIENT from unknown[192.0.2.66]: 554 5.7.1 "
                    "<unknown[192.0.2.66]>: Client host rejected: go away; proto=SMTP")


def test_swaks_as_xclient_client(smtpd):
    """A real XCLIENT client: swaks sends EHLO, XCLIENT, then EHLO again on the 220."""
    import shutil
    import subprocess
    if shutil.which("swaks") is None:
        pytest.skip("swaks not installed")
    r = smtpd(XC)
    cp = subprocess.run(["swaks", "--server", f"127.0.0.1:{r.port}", "--helo", "c.example",
                         "--from", "s@example.org", "--to", "postmaster@mx.example.test",
                         "--xclient-addr", "192.0.2.1", "--xclient-name", "x.example",
                         "--xclient-helo", "h.example", "--xclient-proto", "ESMTP"],
                        capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert cp.returncode == 0, cp.stdout[-2000:] + cp.stderr[-500:]
    assert "<-  220 mx.example.test ESMTP postwell\n -> EHLO c.example" in cp.stdout
    r.wait_log("disconnect from")
    assert r.lines()[-1] == ("disconnect from x.example[192.0.2.1] ehlo=2 xclient=0/1 mail=1 "
                             "rcpt=1 data=1 quit=1 commands=6/7")


class _PolicyServer:
    """A stand-in policy service (Postfix's smtpd_access_policy protocol) that keeps
    every request and answers DUNNO."""

    def __init__(self):
        self.requests: list[dict] = []
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(WAIT)
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        conn.settimeout(WAIT)
        with conn, conn.makefile("rwb") as f:
            cur: dict = {}
            while True:
                try:
                    line = f.readline()
                except OSError:
                    return
                if not line:
                    return
                line = line.decode().rstrip("\n")
                if line:
                    k, _, v = line.partition("=")
                    cur[k] = v
                    continue
                self.requests.append(cur)
                cur = {}
                f.write(b"action=DUNNO\n\n")
                f.flush()

    def close(self):
        self.sock.close()
        self.thread.join(WAIT)


def test_smtpd_policy_delegation_sees_overrides(smtpd):
    pol = _PolicyServer()
    try:
        r = smtpd({**XC, "inet_protocols": "all", "smtpd_recipient_restrictions":
                   f"check_policy_service inet:127.0.0.1:{pol.port}, permit_mynetworks, "
                   "reject_unauth_destination"})
        got = _dialogue(r, [EHLO, "XCLIENT DESTADDR=IPV6:2001:db8::25 DESTPORT=2525",
                            "XCLIENT NAME=x.example ADDR=IPV6:2001:DB8::7 PORT=4242 "
                            "HELO=h+20x.example PROTO=ESMTP REVERSE_NAME=[TEMPUNAVAIL]", MAIL,
                            "RCPT TO:<postmaster@mx.example.test>", "QUIT"])
        assert got[-2] == "250 2.1.5 Ok"
    finally:
        pol.close()
    req = pol.requests[-1]
    # Postfix 3.7 sent the same values (checked with a recording policy server).
    assert {k: req.get(k) for k in ("client_address", "client_name", "reverse_client_name",
                                    "client_port", "helo_name", "protocol_name",
                                    "server_address", "server_port")} == {
        "client_address": "2001:db8::7", "client_name": "x.example",
        "reverse_client_name": "unknown", "client_port": "4242", "helo_name": "h?x.example",
        "protocol_name": "ESMTP", "server_address": "2001:db8::25", "server_port": "2525"}


# ---------------------------------------------------------------- side by side with Postfix 3.7

MSG = ["Subject: x", "", "hi", "."]
NOBODY = "RCPT TO:<nobody@virtual.test>"
RCPT = "RCPT TO:<alice@virtual.test>"

# Variants: (main.cf params, with the Cyrus sasldb and TLS files of test_smtpd_auth).
VARIANTS = {
    "xc": ({"smtpd_authorized_xclient_hosts": "127.0.0.0/8",
            "smtpd_authorized_xforward_hosts": "127.0.0.0/8", "smtpd_error_sleep_time": "0"},
           False),
    "xc6": ({"smtpd_authorized_xclient_hosts": "127.0.0.0/8", "inet_protocols": "all",
             "smtpd_error_sleep_time": "0", "smtpd_client_restrictions":
             "check_reverse_client_hostname_access inline:{{bad.example=REJECT bad rev}}"},
            False),
    "xcconn": ({"smtpd_authorized_xclient_hosts": "127.0.0.0/8", "smtpd_delay_reject": "no",
                "smtpd_error_sleep_time": "0", "unknown_client_reject_code": "551",
                "smtpd_client_restrictions":
                "check_reverse_client_hostname_access inline:{{bad.example=REJECT bad rev}}, "
                "check_client_access inline:{{192.0.2.66=REJECT go away}, {127.0.0.1=OK}}, "
                "reject_unknown_client_hostname"}, False),
    "xcsasl": ({"smtpd_authorized_xclient_hosts": "127.0.0.0/8", "smtpd_tls_auth_only": "no"},
               True),
    "xcerr": ({"smtpd_authorized_xclient_hosts": "127.0.0.0/8", "smtpd_tls_auth_only": "no",
               "smtpd_hard_error_limit": "3", "smtpd_soft_error_limit": "1",
               "smtpd_junk_command_limit": "1"}, True),
    "xcexc": ({"smtpd_authorized_xclient_hosts": "127.0.0.0/8", "smtpd_tls_auth_only": "no",
               "smtpd_sasl_exceptions_networks": "127.0.0.0/8", "smtpd_helo_required": "yes"},
              True),
    "xcdiscard": ({"smtpd_authorized_xclient_hosts": "127.0.0.0/8",
                   "smtpd_discard_ehlo_keywords": "xclient"}, False),
    "xcenc": ({"smtpd_authorized_xclient_hosts": "127.0.0.0/8",
               "smtpd_tls_security_level": "encrypt"}, True),
}

DIALOGUES = {
    "forms_names": ("xc", [EHLO, "XCLIENT NAME=", "XCLIENT name=a.example", "XCLIENT NAME=1.2.3.4",
                           "XCLIENT NAME=bad_name!", "XCLIENT NAME=a+2Eb.example",
                           "XCLIENT NAME=a+zz", "XCLIENT NAME=[tempunavail]",
                           "XCLIENT ADDR=[TEMPUNAVAIL]", "XCLIENT ADDR=2001:db8::1",
                           "XCLIENT ADDR=IPV6:2001:db8::1", "XCLIENT ADDR=ipv6:bogus",
                           "XCLIENT ADDR=[unavailable]", "QUIT"]),
    "forms_ports": ("xc", [EHLO, "XCLIENT PORT=x", "XCLIENT PORT=-1", "XCLIENT PORT=",
                           "XCLIENT PORT=[UNAVAILABLE]", "XCLIENT PORT=65536", "XCLIENT PORT=0",
                           "XCLIENT PORT=123456", "XCLIENT PROTO=smtp", "XCLIENT PROTO=esmtp",
                           "XCLIENT PROTO=[UNAVAILABLE]", "XCLIENT DESTPORT=99999",
                           "XCLIENT DESTPORT=123456", "XCLIENT DESTADDR=[UNAVAILABLE]",
                           "XCLIENT DESTADDR=IPV6:::1", "QUIT"]),
    "forms_helo_login": ("xc", [EHLO, "XCLIENT HELO=" + "h" * 256, "XCLIENT HELO=" + "h" * 255,
                                "XCLIENT HELO=a<b>c", "XCLIENT HELO=[UNAVAILABLE]",
                                "XCLIENT HELO=a+20b", "XCLIENT LOGIN=[UNAVAILABLE]",
                                "XCLIENT LOGIN=x", "XCLIENT DESTADDR=bogus",
                                "XCLIENT DESTADDR=192.0.2.5", "XCLIENT DESTPORT=x",
                                "XCLIENT DESTPORT=587", "QUIT"]),
    "forms_names2": ("xc", [EHLO, "XCLIENT REVERSE_NAME=r.example",
                            "XCLIENT REVERSE_NAME=[TEMPUNAVAIL]", "XCLIENT REVERSE_NAME=bad!",
                            "XCLIENT NAME=a.example ADDR=bogus", "XCLIENT NAME=a.example FOO=1",
                            "XCLIENT NAME=" + "n" * 300, "XCLIENT FOO=" + "f" * 300, "XCLIENT =x",
                            "XCLIENT NAME=a.example NAME=b.example", "QUIT"]),
    "forms_text": ("xc", [EHLO, "XCLIENT foo=bar", "XCLIENT name=bad!", "xclient Name=bad!",
                          "XCLIENT addr=IpV6:zz", "XCLIENT NAME=a+C3+A9b", 'XCLIENT NAME="a b"',
                          "XCLIENT HELO=<x>", "XCLIENT NAME=a.example\tADDR=bogus",
                          "XCLIENT NAME=+00", "XCLIENT NAME=a+zzb+41", "XCLIENT NAME=a+01b",
                          "XCLIENT LOGIN=a+00b", "XCLIENT PROTO=SMTP+00x",
                          "XCLIENT HELO=" + "+41" * 100, "QUIT"]),
    "in_transaction": ("xc", [MAIL, "XCLIENT", "XCLIENT NAME=x.example", RCPT, "RSET",
                              "XCLIENT HELO=h.example", MAIL, RCPT, "QUIT"]),
    "reauthorize": ("xc", ["XCLIENT NAME=x.example ADDR=127.0.0.2", EHLO,
                           "XCLIENT ADDR=192.0.2.7", "XCLIENT ADDR=127.0.0.1", EHLO,
                           "XCLIENT", "XCLIENT FOO", "XCLIENT NAME=bad!", MAIL,
                           "XCLIENT NAME=x", "QUIT"]),
    "message": ("xc", [EHLO, "XCLIENT NAME=x.example ADDR=127.0.0.9 PORT=1234 HELO=hh.example "
                             "PROTO=ESMTP", MAIL, RCPT, "DATA", *MSG,
                       "XCLIENT NAME=y.example", MAIL, RCPT, "DATA", *MSG, "QUIT"]),
    "partial_then_success": ("xc", [EHLO, "XCLIENT NAME=a.example ADDR=bogus", "XCLIENT PORT=1",
                                    MAIL, NOBODY, "QUIT"]),
    "partial_only": ("xc", [EHLO, "XCLIENT NAME=a.example ADDR=bogus", "QUIT"]),
    "partial_addr": ("xc", [EHLO, "XCLIENT NAME=a.example ADDR=192.0.2.50 PORT=x", MAIL, FAR,
                            "QUIT"]),
    # Postfix builds name[addr] for its log lines anew only after NAME, ADDR or PORT.
    **{f"stale_name_{i}": ("xc", [EHLO, "XCLIENT NAME=a.example ADDR=bogus", *more, "QUIT"])
       for i, more in enumerate([["XCLIENT NAME=bad!", "XCLIENT PORT=1"], ["XCLIENT LOGIN=x"],
                                 ["XCLIENT PROTO=SMTP"], ["XCLIENT HELO=x"],
                                 ["XCLIENT REVERSE_NAME=r.example"], ["XCLIENT DESTADDR=192.0.2.1"],
                                 ["XCLIENT DESTPORT=25"], ["XCLIENT NAME=+00", "XCLIENT PORT=1"]])},
    "pipelined_after": ("xc", [EHLO, ["XCLIENT NAME=x.example", "EHLO a.example"], "QUIT"]),
    "pipelined_before": ("xc", [["EHLO a.example", "XCLIENT NAME=x.example", "NOOP"], "QUIT"]),
    "pipelined_without_ehlo": ("xc", [EHLO, "XCLIENT NAME=x.example", [MAIL, RCPT], "QUIT"]),
    "pipelined_proto_esmtp": ("xc", [EHLO, "XCLIENT NAME=x.example PROTO=ESMTP", [MAIL, RCPT],
                                     "QUIT"]),
    "discarded_keyword": ("xcdiscard", [EHLO, "XCLIENT NAME=a.example", EHLO, "QUIT"]),
    "long_line": ("xcdiscard", [EHLO, "XCLIENT NAME=a.example HELO=" + "h" * 2100, "QUIT"]),
    "reject_lines": ("xc", [EHLO, "XCLIENT NAME=x.example ADDR=192.0.2.1", MAIL, FAR, "QUIT"]),
    "reject_lines_helo": ("xc", [EHLO, "XCLIENT ADDR=192.0.2.1 HELO=h.example PROTO=ESMTP",
                                 MAIL, FAR, "QUIT"]),
    "reject_lines_neuter": ("xc", [EHLO, "XCLIENT ADDR=192.0.2.1 HELO=a<b>c+01d+20e", MAIL, FAR,
                                   "QUIT"]),
    "reject_lines_proto": ("xc", ["HELO x.example", "XCLIENT ADDR=192.0.2.1 PROTO=esmtp", MAIL,
                                  FAR, EHLO, MAIL, FAR, "QUIT"]),
    "lost_after": ("xc", [EHLO, "XCLIENT NAME=x.example"]),
    "lost_after_helo": ("xc", [EHLO, "XCLIENT NAME=x.example", "HELO a"]),
    "xforward_alongside": ("xc", [EHLO, "XCLIENT NAME=x.example ADDR=192.0.2.3", EHLO,
                                  "XFORWARD NAME=y.example ADDR=192.0.2.4", MAIL, RCPT, "QUIT"]),
    **{f"addr_{i}": ("xc", [EHLO, f"XCLIENT ADDR={a}", MAIL, FAR, "QUIT"]) for i, a in enumerate(
        ["010.2.3.4", "08.2.3.4", "0.1.2.3", "0.0.0.0", "1.2.3.256", "255.255.255.255",
         "IPV6:::ffff:192.0.2.1", "001.002.003.004", "1..2.3", "+31.2.3.4"])},
    **{f"addr6_{i}": ("xc6", [EHLO, f"XCLIENT ADDR={a}", MAIL, FAR, "QUIT"]) for i, a in enumerate(
        ["IPV6:2001:DB8::1", "2001:db8::1", "IPV6:::ffff:192.0.2.1", "1.2.3", "01.2.3.4",
         "IPV6:1.2.3.4", "ipv6:2001:db8:0:0:0:0:0:1", "IPv6:fe80::1%eth0", "1.2.3.4.",
         "0x01020304", "::ffff:192.0.2.9", "IPV6:::"])},
    "reverse_after_name": ("xc6", [EHLO, "XCLIENT NAME=fine.example REVERSE_NAME=bad.example",
                                   "HELO x", MAIL, RCPT, "QUIT"]),
    "reverse_alone": ("xc6", [EHLO, "XCLIENT REVERSE_NAME=bad.example", "HELO x", MAIL, RCPT,
                              "QUIT"]),
    "reverse_then_name": ("xc6", [EHLO, "XCLIENT REVERSE_NAME=bad.example",
                                  "XCLIENT NAME=fine.example", "HELO x", MAIL, RCPT, "QUIT"]),
    "reverse_same_command": ("xc6", [EHLO, "XCLIENT REVERSE_NAME=bad.example NAME=fine.example",
                                     "HELO x", MAIL, RCPT, "QUIT"]),
    "destaddr6": ("xc6", [EHLO, "XCLIENT DESTADDR=IPV6:2001:DB8::5 DESTPORT=587",
                          "XCLIENT DESTADDR=2001:db8::6", "QUIT"]),
    "connect_reject": ("xcconn", [EHLO, "XCLIENT ADDR=192.0.2.66", EHLO, MAIL,
                                  "XCLIENT ADDR=127.0.0.1", "NOOP", "QUIT"]),
    "connect_ok": ("xcconn", [EHLO, "XCLIENT ADDR=192.0.2.67 NAME=ok.example", "HELO x", MAIL,
                              RCPT, "QUIT"]),
    "connect_unknown_name": ("xcconn", [EHLO, "XCLIENT NAME=[UNAVAILABLE] ADDR=192.0.2.69",
                                        "HELO x", "QUIT"]),
    "connect_tempunavail_name": ("xcconn", [EHLO, "XCLIENT NAME=[TEMPUNAVAIL] ADDR=192.0.2.68",
                                            "HELO x", "QUIT"]),
    "login_relays": ("xcsasl", [EHLO, "XCLIENT LOGIN=alice@example.com ADDR=198.51.100.9", EHLO,
                                MAIL, FAR, "DATA", *MSG,
                                "AUTH PLAIN AGFsaWNlQGV4YW1wbGUuY29tAHMzY3JldA==", "QUIT"]),
    "login_reset": ("xcsasl", [EHLO, "XCLIENT LOGIN=bob+40example.com",
                               "XCLIENT NAME=x.example", MAIL, FAR, "RSET", "XCLIENT LOGIN=bob",
                               "XCLIENT LOGIN=[UNAVAILABLE]", MAIL, FAR, "QUIT"]),
    "login_auth_then_xclient": ("xcsasl", [EHLO, "AUTH PLAIN AGFsaWNlQGV4YW1wbGUuY29tAHMzY3JldA==",
                                           "XCLIENT ADDR=198.51.100.7", MAIL, FAR, "QUIT"]),
    "login_replaces_auth": ("xcsasl", [EHLO, "AUTH PLAIN AGFsaWNlQGV4YW1wbGUuY29tAHMzY3JldA==",
                                       "XCLIENT LOGIN=carol ADDR=198.51.100.7",
                                       "MAIL FROM:<sender@example.org> AUTH=<carol@x>", FAR,
                                       "QUIT"]),
    "login_printable": ("xcsasl", [EHLO, "XCLIENT LOGIN=a<b>+01c", MAIL, FAR, "QUIT"]),
    "xforward_unauthorized_in_transaction": ("xcsasl", [EHLO, MAIL, "XFORWARD NAME=x",
                                                        "XFORWARD", "QUIT"]),
    "xforward_authorized_in_transaction": ("xc", [EHLO, MAIL, "XFORWARD NAME=x", "XFORWARD",
                                                  "RSET", "XFORWARD", "QUIT"]),
    "errors_not_counted": ("xcerr", [EHLO, "FOO", "BAR", "XCLIENT NAME=a.example", "BAZ", "QUX",
                                     "NOOP", "QUIT"]),
    "not_junk": ("xcerr", [EHLO] + ["XCLIENT NAME=a.example"] * 5 + ["NOOP", "QUIT"]),
    "tls_stays": ("xcerr", [EHLO, "STARTTLS", EHLO, "XCLIENT NAME=x.example", EHLO, "STARTTLS",
                            MAIL, RCPT, "QUIT"]),
    "sasl_exceptions_again": ("xcexc", [EHLO, "XCLIENT ADDR=192.0.2.5", EHLO, "QUIT"]),
    "helo_required_again": ("xcexc", [EHLO, "XCLIENT NAME=x.example", MAIL, "HELO a",
                                      "XCLIENT HELO=b.example", MAIL, "QUIT"]),
    "before_starttls": ("xcenc", [EHLO, "XCLIENT NAME=a.example", "XCLIENT", MAIL, "QUIT"]),
}

XFAIL: dict[str, str] = {}


def _config(inst, variant: str, tool) -> dict:
    extra, sasl = VARIANTS[variant]
    params = {}
    if sasl:
        from test_smtpd_auth import _sasl_files
        params = _sasl_files(inst, tool)
        params.pop("smtpd_relay_restrictions")
    params.update(extra)
    return params


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    from test_parity_dialogues2 import variant_pairs
    yield from variant_pairs(tmp_path_factory, "xclient", VARIANTS, _config)


def _cases():
    from test_parity_sweep import parity_cases
    return parity_cases(DIALOGUES, XFAIL, "xclient")


@pytest.mark.postfix
@pytest.mark.parametrize("name, variant, lines", _cases())
def test_dialogue_matches_reference(pairs, name, variant, lines):
    from test_parity_dialogues2 import _run, _texts
    from test_parity_sweep import _table
    ref, pw = pairs(variant)
    (want_r, want_log), (got_r, got_log) = harness.run_side_by_side(_run, ref, pw, lines)
    assert len(want_r) >= 1, "the reference did not answer"
    # The greeting after XCLIENT names mail_name, a deliberate difference (_texts keeps
    # its code only).
    want_t, got_t = _texts(want_r), _texts(got_r)
    assert got_t == want_t, f"replies differ in {name!r}:\n{_table(want_t, got_t)}"
    assert got_log == want_log, f"smtpd log differs in {name!r}:\n{_table(want_log, got_log)}"


# ---------------------------------------------------------------- DNS restrictions, end to end

def test_dns_restrictions_see_the_xclient_client(tmp_path):
    """test_policy_dns's scenarios, whose replies and log lines were recorded from Postfix
    3.7 driven by XCLIENT ADDR/NAME, replayed the same way against a postwell instance:
    the overridden address, name and HELO reach reject_rbl_client, check_*_mx_access,
    reject_unknown_helo_hostname... and the reject lines."""
    import os
    import re

    from test_policy_dns import (ADDR_TABLE, NAMES_TABLE, RBL_REPLY_MAPS, RCPT_CLASSES,
                                 REFERENCE, SCENARIO_PARAMS, SCENARIOS, ZONE, StubDns)
    stub = StubDns(ZONE)
    inst = harness.PostwellInstance(tmp_path, {})
    files = inst.root / "maps"        # the workers (mail_owner) read them after start-up
    files.mkdir()
    paths = {}
    for name, table in (("classes", RCPT_CLASSES), ("addr", ADDR_TABLE), ("names", NAMES_TABLE),
                        ("rblreply", RBL_REPLY_MAPS)):
        (files / name).write_text("".join(f"{k} {v}\n" for k, v in table.items()))
        paths[f"/x/{name}"] = str(files / name)
    os.chmod(files, 0o755)
    extra = {"myhostname": "mx.example.com", "mydomain": "example.com",
             "mynetworks": "10.9.9.0/24", "smtpd_authorized_xclient_hosts": "127.0.0.0/8",
             "disable_dns_lookups": "no", "postwell_dns_servers": stub.servers}
    for k, v in SCENARIO_PARAMS.items():
        for short, full in paths.items():
            v = v.replace(short, full)
        extra[k] = v
    inst.main_cf = extra
    inst.write_config()
    failures = []
    try:
        inst.start()
        for index, (addr, name, helo, sender, recipient) in enumerate(SCENARIOS):
            start = len(inst.log_text())
            replies = harness.dialogue(inst.port, [
                "EHLO client.example", f"XCLIENT ADDR={addr} NAME={name}", f"EHLO {helo}",
                f"MAIL FROM:<{sender}>", f"RCPT TO:<{recipient}>", "QUIT"], timeout=WAIT)
            got = str(replies[5])
            harness.wait_for(lambda: inst.log_text().count("disconnect from", start) >= 1, WAIT)
            lines = [re.sub(r"^.*?postfix/smtpd\[\d+\]: ", "", ln)
                     for ln in inst.log_text()[start:].splitlines()
                     if "postfix/smtpd" in ln and ("NOQUEUE" in ln or "warning" in ln)]
            if (None if got.startswith("250") else got, lines) != REFERENCE[index]:
                failures.append((SCENARIOS[index], got, lines, REFERENCE[index]))
    finally:
        inst.stop()
        stub.close()
    assert not failures, "\n".join(map(repr, failures))
