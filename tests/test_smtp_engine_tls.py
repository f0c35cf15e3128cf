"""Engine-level STARTTLS / AUTH rules and the smuggling fixes (sans-IO, no sockets)."""

from __future__ import annotations

from postwell.smtp.reply import Reply
from postwell.smtp.server import (Auth, AuthAborted, AuthResponse, Ehlo, Helo, Mail, ServerConfig,
                                  _SyntaxError, extract_address, neuter_helo, split_args)

from test_smtp_engine import Driver, lines

import pytest


def test_tls_required_gate_matches_postfix_list():
    d = Driver(ServerConfig(hostname="h", starttls_offered=True, tls_required=True,
                            auth_mechanisms=("PLAIN",)))
    out = d.feed(b"EHLO x\r\n")
    assert "250-STARTTLS" in out
    for cmd in (b"MAIL FROM:<a@b>", b"RCPT TO:<a@b>", b"DATA", b"BDAT 1", b"RSET", b"VRFY a",
                b"ETRN a", b"AUTH PLAIN"):
        assert d.feed(cmd + b"\r\n") == "530 5.7.0 Must issue a STARTTLS command first\r\n", cmd
    assert d.feed(b"NOOP\r\n") == "250 2.0.0 Ok\r\n"
    assert d.feed(b"HELO x\r\n") == "250 h\r\n"
    assert d.feed(b"BOGUS\r\n") == "500 5.5.2 Error: command not recognized\r\n"
    assert d.feed(b"STARTTLS\r\n") == "220 2.0.0 Ready to start TLS\r\n"
    d.conn.tls_started()
    assert d.feed(b"MAIL FROM:<a@b>\r\n") == "250 2.1.0 Ok\r\n"
    assert "starttls=1" in d.conn.counters_text()


def test_starttls_counted_only_after_handshake():
    d = Driver(ServerConfig(starttls_offered=True))
    d.feed(b"EHLO x\r\n")
    assert d.feed(b"STARTTLS\r\n") == "220 2.0.0 Ready to start TLS\r\n"
    d.conn.abort("lost")
    assert d.conn.counters_text() == "ehlo=1 starttls=0/1 commands=1/2"


def test_auth_list_per_session_and_legacy_line():
    d = Driver(ServerConfig(hostname="h", auth_legacy=True))
    assert "AUTH" not in d.feed(b"EHLO x\r\n")
    assert d.feed(b"AUTH PLAIN\r\n") == "503 5.5.1 Error: authentication not enabled\r\n"
    d.conn.auth_mechanisms = ("PLAIN", "LOGIN")
    out = lines(d.feed(b"EHLO x\r\n"))
    i = out.index("250-AUTH PLAIN LOGIN")
    assert out[i + 1] == "250-AUTH=PLAIN LOGIN"
    d.conn.auth_advertised = False
    assert "AUTH" not in d.feed(b"EHLO x\r\n")


def test_auth_cancel_is_a_notice_and_an_error():
    d = Driver(ServerConfig(auth_mechanisms=("LOGIN",)), replies={Auth: Reply(334, "")})
    assert d.feed(b"AUTH LOGIN\r\n") == "334 \r\n"        # RFC 4954 4: "334" SP
    assert d.feed(b"*\r\n") == "501 5.7.0 Authentication aborted\r\n"
    assert len(d.of(AuthAborted)) == 1
    assert d.conn.error_count == 1
    assert "auth=0/1" in d.conn.counters_text()


def test_auth_response_may_exceed_line_length_up_to_sasl_limit():
    d = Driver(ServerConfig(auth_mechanisms=("PLAIN",), auth_response_limit=12288),
               replies={Auth: Reply(334, ""), AuthResponse: lambda ev: Reply(
                   500, f"len {len(ev.data)}", "5.5.6")})
    d.feed(b"AUTH PLAIN\r\n")
    assert d.feed(b"A" * 5000 + b"\r\n") == "500 5.5.6 len 5000\r\n"
    d.feed(b"AUTH PLAIN\r\n")
    # Longer than the limit: cut one past it, so the SASL layer sees "too long".
    assert d.feed(b"A" * 20000 + b"\r\n") == "500 5.5.6 len 12289\r\n"


def test_auth_without_helo_and_order_of_checks():
    d = Driver(ServerConfig(auth_mechanisms=("PLAIN",)),
               replies={Auth: Reply(235, "Authentication successful", "2.7.0")})
    assert d.feed(b"AUTH PLAIN AGEAYg==\r\n") == "235 2.7.0 Authentication successful\r\n"
    d.feed(b"MAIL FROM:<a@b>\r\n")
    assert d.feed(b"AUTH PLAIN\r\n") == "503 5.5.1 Error: MAIL transaction in progress\r\n"
    d.feed(b"RSET\r\n")
    assert d.feed(b"AUTH PLAIN\r\n") == "503 5.5.1 Error: already authenticated\r\n"


def test_tls_started_forgets_authentication():
    d = Driver(ServerConfig(auth_mechanisms=("PLAIN",), starttls_offered=True),
               replies={Auth: Reply(235, "Authentication successful", "2.7.0")})
    d.feed(b"AUTH PLAIN AGEAYg==\r\n")
    assert d.conn.authenticated
    d.feed(b"STARTTLS\r\n")
    d.conn.tls_started()
    assert not d.conn.authenticated


@pytest.mark.parametrize("raw,want", [
    ("a;b|`id`$(id)", "a?b|`id`$?id?"),
    ("x)\tX-Injected: tab", "x??X-Injected:?tab"),
    ("<root@evil>", "?root?evil?"),
    ('a"b\\c', "a?b?c"),
    ("[1.2.3.4]\rX", "[1.2.3.4]?X"),
    ("mx.example.org", "mx.example.org"),
    ("h\u00e9llo.example", "h\u00e9llo.example"),
])
def test_neuter_helo(raw, want):
    assert neuter_helo(raw) == want


def test_helo_event_carries_neutered_name():
    d = Driver()
    d.feed(b"HELO a;b\r\n")
    d.feed(b"EHLO <x@y>\r\n")
    assert d.of(Helo)[0].name == "a?b"
    assert d.of(Ehlo)[0].name == "?x?y?"


def test_split_args_on_cr_and_ipv6_literal():
    assert split_args("<a@b>\rX-Injected: x") == ["<a@b>", "X-Injected:", "x"]
    assert extract_address("<alice@[IPv6:::1]>", False) == "alice@[IPv6:::1]"
    assert extract_address("<alice@[IPv6:2001:db8::1]>", False) == "alice@[IPv6:2001:db8::1]"
    assert extract_address("<@a.example:alice@b.example>", False) == "alice@b.example"
    with pytest.raises(_SyntaxError):
        extract_address("<alice@[IPv6:::1>", False)
    d = Driver()
    d.feed(b"EHLO x\r\nMAIL FROM:<a@b>\r\n")
    assert d.feed(b"RCPT TO:<c@d>\rX-Injected: rcpt\r\n") == \
        "555 5.5.4 Unsupported option: X-Injected:\r\n"


# Postfix 3.7's answers (trivial-rewrite flags these domains as errors; smtpd says syntax).
@pytest.mark.parametrize("rcpt,bad", [
    ("a@127.0.0.1", True), ("a@ex\u00e4mple.net", True), ("a@ex_ample.net", False),
    ("a@example..net", True), ("a@example.net.", False), ("a@1.2.3", True), ("a@-x.com", True),
    ("a@x-.com", True), ("a@" + "x" * 64 + ".com", True), ("a@[999.1.1.1]", True),
    ("a@[IPv6:zz]", True), ("a@[1.2.3]", True), ("a@[text]", True), ("a@.example.net", True),
    ("a@example.123", False), ("a@123", True), ("a@x.-y.com", True), ("\u00e4@example.net", False),
    ("a@[IPv6:::1]", False), ("a@[192.0.2.1]", False), ("a@ex%ample.net", True),
    ("a@exa+mple.net", True), ("postmaster", False),
])
def test_resolver_domain_errors_are_syntax_errors(rcpt, bad):
    d = Driver()
    d.feed(b"EHLO x\r\nMAIL FROM:<s@example.org>\r\n")
    out = d.feed(f"RCPT TO:<{rcpt}>\r\n".encode())
    assert out == ("501 5.1.3 Bad recipient address syntax\r\n" if bad else "250 2.1.5 Ok\r\n")


def test_sender_domain_errors_and_smtputf8():
    d = Driver()
    d.feed(b"EHLO x\r\n")
    assert d.feed(b"MAIL FROM:<s@127.0.0.1>\r\n") == "501 5.1.7 Bad sender address syntax\r\n"
    assert d.feed("MAIL FROM:<s@ex\u00e4mple.org>\r\n".encode()) == \
        "501 5.1.7 Bad sender address syntax\r\n"
    assert d.feed("MAIL FROM:<s@ex\u00e4mple.org> SMTPUTF8\r\n".encode()) == "250 2.1.0 Ok\r\n"
    assert d.feed("RCPT TO:<a@ex\u00e4mple.net>\r\n".encode()) == "250 2.1.5 Ok\r\n"


def test_mail_auth_parameter_as_postfix():
    d = Driver()
    d.feed(b"EHLO x\r\n")
    assert d.feed(b"MAIL FROM:<a@b.example> AUTH=x AUTH=y\r\n") == \
        "503 5.5.4 Error: multiple AUTH= options\r\n"
    # The refused MAIL's first AUTH= stays until RSET (Postfix 3.7, test_parity_fuzz6).
    assert d.feed(b"MAIL FROM:<a@b.example> AUTH=z\r\n") == \
        "503 5.5.4 Error: multiple AUTH= options\r\n"
    d.feed(b"RSET\r\n")
    assert d.feed(b"MAIL FROM:<a@b.example> AUTH=bad+zz\r\n") == "250 2.1.0 Ok\r\n"
    assert d.of(Mail)[-1].auth is None
    d.feed(b"RSET\r\n")
    assert d.feed(b"MAIL FROM:<a@b.example> AUTH=foo+2Bbar\r\n") == "250 2.1.0 Ok\r\n"
    assert d.of(Mail)[-1].auth == "foo+bar"


def test_starttls_not_offered_beats_transaction():
    d = Driver()
    d.feed(b"EHLO x\r\nMAIL FROM:<a@b.example>\r\n")
    assert d.feed(b"STARTTLS\r\n") == "502 5.5.1 Error: command not implemented\r\n"
