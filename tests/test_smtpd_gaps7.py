"""What the seventh differential sweep (test_parity_fuzz7.py) found, pinned without a
reference Postfix: libsasl2's view of AUTH fields (any bytes, C strings, 1024-byte
limits), Postfix's printable() and "%.100s" in the SASL warning, the recipient the
DATA/end-of-data checks see, HELO checks and their protocol, XFORWARD's orig_client=,
the order of "is ignored" warnings, a refused command after an XCLIENT reject, and the
notify_classes record of a connection-count 421.

Each behaviour was first seen side by side with Postfix 3.7 (the dialogues in
test_parity_fuzz7.py replay them there)."""

from __future__ import annotations

import asyncio
import base64
import socket
import time

import pytest

from postwell.sasl.base import Failure, clip, failure_log_text, printable
from test_smtpd import WAIT, raw_session, smtpd  # noqa: F401 - fixture

USER = "alice@example.com"


def b64(data: bytes | str) -> str:
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogateescape")
    return base64.b64encode(data).decode()


def _raw(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


# ---------------------------------------------------------------- printable() and %.100s

@pytest.mark.parametrize("raw, want", [
    (b"alice@example.com", b"alice@example.com"),
    (b"a\tb\x7fc\x00", b"a?b?c?"),
    (b"\xc3\xa9t\xc3\xa9", b"\xc3\xa9t\xc3\xa9"),            # UTF-8 kept
    (b"4\xe3\x8f", b"4\xe3\x8f"),                              # lead + one continuation kept
    (b"a\xe3\x8f\x8f\x8fb", b"a\xe3\x8f\x8f\x8fb"),            # Postfix checks no more
    (b"\xe9lice", b"?lice"),                                   # lone lead byte
    (b"a\xc3\xa9\xe9b\xff", b"a\xc3\xa9?b?"),
    (b"\x80x", b"?x"),                                          # stray continuation byte
    (b"\xc1\x81", b"?\x81".replace(b"\x81", b"?")),             # 0xC1 is never a lead byte
])
def test_printable_as_postfix(raw, want):
    assert printable(_raw(raw)).encode("utf-8", "surrogateescape") == want


def test_clip_counts_bytes():
    assert clip("z" * 300) == "z" * 100
    assert clip("\u00e9" * 120).encode("utf-8") == ("\u00e9" * 50).encode("utf-8")
    assert clip("short") == "short"
    # A cut inside a character keeps the byte, as C's "%.100s" does.
    assert clip("x" + "\u00e9" * 60).encode("utf-8", "surrogateescape") == \
        ("x" + "\u00e9" * 60).encode("utf-8")[:100]


def test_failure_warning_names_printable_clipped_user():
    line = failure_log_text("h[1.2.3.4]", "LOGIN", Failure("authentication failure",
                                                           username=_raw(b"\xe9" + b"z" * 200)))
    assert line == ("h[1.2.3.4]: SASL LOGIN authentication failed: authentication failure, "
                    "sasl_username=?" + "z" * 99)
    assert failure_log_text("h", "PLAIN", Failure("x")).endswith("sasl_username=(unavailable)")


# ---------------------------------------------------------------- libsasl2's view of fields

def _auth(*steps):
    """Run AUTH steps against a Cyrus-like store (alice@example.com / s3cret):
    (replies, log lines)."""
    from postwell.sasl.local import LocalSaslServer
    from postwell.sasl.mechanisms import PasswordBackend
    from postwell.sasl.session import SmtpdAuth

    class Store(PasswordBackend):
        supports_secret = True
        cyrus_library = True

        async def verify(self, ident, password):
            password.encode("utf-8")        # as a real store: bytes that are not UTF-8 fail
            return (ident.user, ident.realm, password) == ("alice", "example.com", "s3cret")

        async def secret(self, ident):
            ident.user.encode("utf-8")
            return "s3cret" if (ident.user, ident.realm) == ("alice", "example.com") else None

    class Log:
        def __init__(self):
            self.lines = []

        def warning(self, text):
            self.lines.append(text)

        info = warning

    log = Log()
    server = LocalSaslServer(Store(), ["PLAIN", "LOGIN", "CRAM-MD5"], security_options=frozenset(),
                             tls_security_options=frozenset())

    async def go():
        auth = SmtpdAuth(server, log, namaddr="unknown[127.0.0.1]")
        out = []
        for mech, initial, *responses in steps:
            out.append(str(await auth.start(mech, initial)))
            for r in responses:
                out.append(str(await auth.respond(r)))
        return out
    return asyncio.run(asyncio.wait_for(go(), 10)), log.lines


OK = "235 2.7.0 Authentication successful"
BAD = "535 5.7.8 Error: authentication failed: authentication failure"
BADPROT = "535 5.7.8 Error: authentication failed: bad protocol / cancel"
TEMP = "454 4.7.0 Temporary authentication failure: generic failure"


def test_login_name_and_password_are_c_strings():
    replies, _ = _auth(("LOGIN", None, b64(f"{USER}\0junk"), b64("s3cret")),
                       ("LOGIN", None, b64(USER), b64("s3cret\0junk")))
    assert replies == ["334 VXNlcm5hbWU6", "334 UGFzc3dvcmQ6", OK] * 2


def test_login_nul_name_is_all_whitespace():
    replies, lines = _auth(("LOGIN", None, b64("\0"), b64("s3cret")),
                           ("LOGIN", None, "", b64("s3cret")))
    assert replies[2] == TEMP and replies[5] == TEMP
    # A name made of a NUL is "", an empty response names nobody.
    assert lines == [
        "SASL authentication failure: All-whitespace username.",
        "unknown[127.0.0.1]: SASL LOGIN authentication failed: generic failure, sasl_username=",
        "SASL authentication failure: All-whitespace username.",
        "unknown[127.0.0.1]: SASL LOGIN authentication failed: generic failure, "
        "sasl_username=(unavailable)"]


def test_binary_fields_are_checked_not_refused():
    replies, lines = _auth(("LOGIN", None, b64(b"\xe9lice@example.com"), b64("s3cret")),
                           ("LOGIN", None, b64(USER), b64(b"s3cr\xe9t")),
                           ("PLAIN", b64(b"\0\xe9lice@example.com\0s3cret")),
                           ("PLAIN", b64(f"\0{USER}\0".encode() + b"s3cr\xe9t")),
                           ("CRAM-MD5", None, b64(b"\xe9lice@example.com 0123")),
                           ("CRAM-MD5", None, b64(f"{USER} ".encode() + b"\xe9" * 32)))
    assert [r for r in replies if not r.startswith("334")] == [BAD] * 6
    assert lines[0] == ("unknown[127.0.0.1]: SASL LOGIN authentication failed: "
                        "authentication failure, sasl_username=?lice@example.com")
    assert lines[-3] == ("unknown[127.0.0.1]: SASL CRAM-MD5 authentication failed: "
                         "authentication failure, sasl_username=?lice@example.com")
    assert lines[-2] == "SASL authentication failure: incorrect digest response"


def test_login_password_response_failures_name_nobody():
    _, lines = _auth(("LOGIN", None, b64(USER), "x"), ("LOGIN", None, b64(USER), "%%%%"))
    assert lines == [
        "unknown[127.0.0.1]: SASL LOGIN authentication failed: another step is needed in "
        "authentication, sasl_username=(unavailable)",
        "unknown[127.0.0.1]: SASL LOGIN authentication failed: bad protocol / cancel, "
        "sasl_username=(unavailable)"]


def test_cram_md5_name_is_a_c_string():
    replies, lines = _auth(("CRAM-MD5", None, b64(f"{USER}\0 0123")))
    assert replies[-1] == BAD
    assert lines == ["SASL authentication failure: incorrect digest response",
                     "unknown[127.0.0.1]: SASL CRAM-MD5 authentication failed: authentication "
                     "failure, sasl_username=alice@example.com"]


def test_libsasl2_length_limits():
    at_limit, _ = _auth(("PLAIN", b64("\0" + "x" * 1024 + "\0s3cret")),
                        ("LOGIN", None, b64("x" * 1024), b64("p" * 1024)))
    assert [r for r in at_limit if not r.startswith("334")] == [BAD, BAD]
    replies, lines = _auth(("PLAIN", b64("\0" + "x" * 1025 + "\0s3cret")),
                           ("LOGIN", None, b64("x" * 1025)),
                           ("LOGIN", None, b64("nobody@example.com"), b64("p" * 1025)),
                           ("CRAM-MD5", None, b64("x" * 1020 + " 0123")),
                           ("PLAIN", b64("y" * 1025 + f"\0{USER}\0s3cret")),
                           ("PLAIN", b64("y" * 1025 + f"\0{USER}\0wrong")))
    assert [r for r in replies if not r.startswith("334")] == [
        "535 5.7.8 Error: authentication failed: overflowed buffer", BADPROT, BADPROT, BADPROT,
        "535 5.7.8 Error: authentication failed: overflowed buffer", BAD]
    assert lines == [
        "unknown[127.0.0.1]: SASL PLAIN authentication failed: overflowed buffer, "
        "sasl_username=(unavailable)",
        "SASL authentication failure: username too long (>1024 characters)",
        "unknown[127.0.0.1]: SASL LOGIN authentication failed: bad protocol / cancel, "
        "sasl_username=(unavailable)",
        "SASL authentication failure: clientinlen is > 1024 characters in LOGIN plugin",
        "unknown[127.0.0.1]: SASL LOGIN authentication failed: bad protocol / cancel, "
        "sasl_username=(unavailable)",
        "SASL authentication failure: CRAM-MD5 input longer than 1024 bytes",
        "unknown[127.0.0.1]: SASL CRAM-MD5 authentication failed: bad protocol / cancel, "
        "sasl_username=(unavailable)",
        # The requested identity is canonicalised after the password.
        "unknown[127.0.0.1]: SASL PLAIN authentication failed: overflowed buffer, "
        "sasl_username=" + "y" * 100,
        "SASL authentication failure: Password verification failed",
        "unknown[127.0.0.1]: SASL PLAIN authentication failed: authentication failure, "
        "sasl_username=alice@example.com"]


# ---------------------------------------------------------------- the smtpd, in process

def _session(port: int, lines: list[str]) -> list[str]:
    data = raw_session(port, [(ln + "\r\n").encode() for ln in lines])
    return data.decode("utf-8", "replace").splitlines()


def _inline(pairs: dict[str, str]) -> str:
    return "inline:{ " + ", ".join(f"{{{k}={v}}}" for k, v in pairs.items()) + " }"


def test_data_checks_see_the_first_accepted_recipient(smtpd):
    table = _inline({"far.example": "REJECT far away", "rej@example.test": "REJECT rej"})
    s = smtpd({"mynetworks": "192.0.2.0/24",
               "smtpd_recipient_restrictions": f"check_recipient_access {table}, "
                                               "reject_unauth_destination",
               "smtpd_data_restrictions": f"check_recipient_access {table}"})
    out = _session(s.port, ["EHLO c.example", "MAIL FROM:<a@example.org>",
                            "RCPT TO:<ok@mx.example.test>", "RCPT TO:<rej@example.test>",
                            "RCPT TO:<x@far.example>", "DATA", "Subject: x", "", "x", ".",
                            "QUIT"])
    assert any(ln.startswith("354") for ln in out), out
    assert any(ln.startswith("250 2.0.0 Ok: queued") for ln in out), out


def test_xforward_client_attribute_alone_logs_orig_client(smtpd):
    s = smtpd({"smtpd_authorized_xforward_hosts": "127.0.0.0/8"})
    _session(s.port, ["EHLO c.example", "XFORWARD HELO=h.example", "MAIL FROM:<a@example.org>",
                      "RCPT TO:<u@mx.example.test>", "RSET", "XFORWARD SOURCE=LOCAL IDENT=q",
                      "MAIL FROM:<a@example.org>", "RCPT TO:<u@mx.example.test>", "QUIT"])
    s.wait_log(r"disconnect from")
    clients = [ln for ln in s.lines() if ": client=" in ln]
    assert clients[0].endswith("client=unknown[127.0.0.1], orig_client=unknown"), clients
    assert clients[1].endswith("client=unknown[127.0.0.1], orig_queue_id=q"), clients


def test_helo_checks_name_the_command_with_the_old_protocol(smtpd):
    s = smtpd({"smtpd_delay_reject": "no",
               "smtpd_helo_restrictions": "check_helo_access " + _inline({"w.example": "WARN w"})})
    _session(s.port, ["EHLO w.example", "EHLO w.example", "HELO w.example", "QUIT"])
    s.wait_log(r"disconnect from")
    warns = [ln.split(": ", 1)[1] for ln in s.lines() if " warn: " in ln]
    assert [w.split(" from ")[0] + " " + w.split("; ")[1] for w in warns] == [
        "warn: EHLO proto=SMTP helo=<w.example>", "warn: EHLO proto=ESMTP helo=<w.example>",
        "warn: HELO proto=ESMTP helo=<w.example>"]


def test_ignored_restriction_warning_follows_the_reject_line(smtpd):
    s = smtpd({"smtpd_recipient_restrictions": "reject, permit"})
    _session(s.port, ["EHLO c.example", "MAIL FROM:<a@example.org>", "RCPT TO:<u@mx.example.test>",
                      "QUIT"])
    s.wait_log(r"disconnect from")
    lines = s.lines()
    reject = next(i for i, ln in enumerate(lines) if "reject: RCPT from" in ln)
    assert "restriction `permit' after `reject' is ignored" in lines[reject + 1]


def test_refused_command_after_xclient_reject_keeps_the_state(smtpd):
    s = smtpd({"smtpd_authorized_xclient_hosts": "127.0.0.0/8", "smtpd_delay_reject": "no",
               "smtpd_client_restrictions": "check_client_access " +
               _inline({"192.0.2.1": "REJECT"})})
    out = _session(s.port, ["EHLO c.example", "XCLIENT ADDR=192.0.2.1", "MAIL FROM:<a@b.example>",
                            "RSET"])
    assert out[-1].startswith("503 5.7.0 Error: access denied"), out
    s.wait_log(r"lost connection after XCLIENT from unknown\[192\.0\.2\.1\]")


def test_concurrency_421_is_a_policy_error(smtpd):
    """With anvil away the per-process count refuses the session; notify_classes =
    policy then mails the postmaster its transcript (Postfix records a concurrency
    refusal as a policy error, a rate refusal not)."""
    s = smtpd({"smtpd_client_connection_count_limit": "1", "notify_classes": "policy",
               "mynetworks": "192.0.2.0/24"})
    with socket.create_connection(("127.0.0.1", s.port), timeout=WAIT) as first:
        first.settimeout(WAIT)
        assert first.recv(512).startswith(b"220")
        with socket.create_connection(("127.0.0.1", s.port), timeout=WAIT) as second:
            second.settimeout(WAIT)
            assert second.recv(512).startswith(b"421 4.7.0 ")
        s.wait_log(r"warning: Connection concurrency limit exceeded")
        deadline = time.monotonic() + WAIT
        while not s.queued() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(s.queued()) == 1, s.lines()
        first.sendall(b"QUIT\r\n")


def test_xclient_login_without_sasl_is_logged_only(smtpd):
    s = smtpd({"smtpd_authorized_xclient_hosts": "127.0.0.0/8", "mynetworks": "192.0.2.0/24",
               "smtpd_relay_restrictions": "permit_sasl_authenticated, reject_unauth_destination"})
    out = _session(s.port, ["EHLO c.example", "XCLIENT LOGIN=alice", "MAIL FROM:<a@example.org>",
                            "RCPT TO:<u@far.example>", "RCPT TO:<u@mx.example.test>", "RSET",
                            "XCLIENT NAME=ok.example", "MAIL FROM:<a@example.org>",
                            "RCPT TO:<u@mx.example.test>", "QUIT"])
    assert any(ln.startswith("554 5.7.1 <u@far.example>") for ln in out), out
    s.wait_log(r"disconnect from")
    clients = [ln for ln in s.lines() if ": client=" in ln]
    assert clients[0].endswith(", sasl_method=XCLIENT, sasl_username=alice"), clients
    assert clients[1].endswith("client=ok.example[127.0.0.1]"), clients


def test_engine_bad_xforward_name_as_sent():
    from test_smtp_engine import Driver
    from postwell.smtp.server import ServerConfig
    d = Driver(ServerConfig(hostname="mx.example.test", error_sleep_time=0))
    d.conn.xforward_allowed = True
    assert d.feed(b"xforward foo=1\r\n") == "501 5.5.4 Bad XFORWARD attribute name: foo\r\n"
    d.feed(b"XFORWARD HELO=h.example\r\n")
    assert d.conn.xforward_client and d.conn.xforward == {"HELO": "h.example"}
    d.feed(b"RSET\r\n")
    assert not d.conn.xforward_client


def test_engine_counts_an_interrupted_auth():
    from test_smtp_engine import Driver
    from postwell.smtp.reply import Reply
    from postwell.smtp.server import Auth, ServerConfig
    d = Driver(ServerConfig(hostname="mx.example.test", error_sleep_time=0,
                            auth_mechanisms=("PLAIN",)),
               replies={Auth: Reply(334, "", None)})
    d.conn.auth_mechanisms = ("PLAIN",)
    d.feed(b"EHLO a\r\n")
    assert d.feed(b"AUTH PLAIN\r\n").startswith("334")
    d.close()
    assert "auth=0/1" in d.conn.counters_text()


def test_initial_response_decoded_before_the_mechanism():
    replies, lines = _auth(("FOO", "YQ"), ("FOO", "ab=c"), ("PLAIN", "YQ"))
    assert replies == ["535 5.7.8 Error: authentication failed: another step is needed in "
                       "authentication", BADPROT,
                       "535 5.7.8 Error: authentication failed: another step is needed in "
                       "authentication"]
    assert not any("Couldn't find mech" in ln for ln in lines)


def test_class_loop_through_a_table_names_the_entry():
    from test_policy import DictTable, make_policy, run, session

    class Log:
        def __init__(self):
            self.lines = []

        def info(self, text):
            self.lines.append(text)

        warning = info

    log = Log()
    policy = make_policy({"smtpd_delay_reject": "no", "smtpd_restriction_classes": "rclass",
                          "rclass": "check_sender_access hash:/x/s",
                          "smtpd_sender_restrictions": "rclass"},
                         tables={"hash:/x/s": DictTable({"loop@example.org": "rclass"})}, log=log)
    state = session(sender="loop@example.org")
    reply = run(policy.on_mail(state))
    assert str(reply).startswith("451 4.3.5 ")
    assert "access table hash:/x/s entry rclass causes unreasonable recursion" in log.lines


def test_permit_inet_interfaces_sees_the_connection(smtpd):
    s = smtpd({"smtpd_authorized_xclient_hosts": "127.0.0.0/8", "inet_interfaces": "127.0.0.1",
               "smtpd_client_restrictions": "permit_inet_interfaces, check_client_access "
               + _inline({"192.0.2.1": "REJECT"})})
    out = _session(s.port, ["EHLO c.example", "XCLIENT ADDR=192.0.2.1", "MAIL FROM:<a@example.org>",
                            "RCPT TO:<u@mx.example.test>", "QUIT"])
    assert any(ln.startswith("250 2.1.5") for ln in out), out


def test_xclient_unavailable_name_keeps_the_reverse_name():
    from postwell.policy.state import SessionState
    from postwell.smtp.xclient import apply_to_state, parse_xclient
    st = SessionState()
    for arg in ("REVERSE_NAME=rev.example", "NAME=[TEMPUNAVAIL]", "NAME=[UNAVAILABLE]"):
        req, _ = parse_xclient(arg, True)
        apply_to_state(st, req, sasl_enabled=False)
    assert (st.client_name, st.reverse_client_name) == ("unknown", "rev.example")
    req, _ = parse_xclient("NAME=real.example", True)
    apply_to_state(st, req, sasl_enabled=False)
    assert st.reverse_client_name == "real.example"
