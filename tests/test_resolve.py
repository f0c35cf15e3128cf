"""Address classes and next-hop resolution (policy/resolve.py).

The expected classes and SMTP replies below were observed on a real Postfix
3.7.11 (Debian) instance configured like CFG (compatibility_level = 3.6,
mynetworks = 192.0.2.0/24 so that the loopback test client is "outside",
default smtpd_relay_restrictions ending in defer_unauth_destination,
local_recipient_maps empty).  The "reply" column is what that smtpd answered
to RCPT TO:<input>; "250" means accepted.
"""

from __future__ import annotations

import pytest

from postwell.config.main import Config
from postwell.policy import AddressResolver, OwnAddresses, ResolveFlag


class DictTable:
    """Stand-in for a postwell.tables Table (exact, lower-case keys)."""

    def __init__(self, data: dict[str, str]):
        self.data = {k.lower(): v for k, v in data.items()}

    def lookup(self, key: str):
        return self.data.get(key.lower())


BASE = {
    "myhostname": "mx.example.com",
    "mydomain": "example.com",
    "mydestination": "$myhostname, localhost.$mydomain, localhost, example.com",
    "mynetworks": "192.0.2.0/24",
    "inet_interfaces": "127.0.0.1",
    "inet_protocols": "ipv4",
    "relay_domains": "relay.test",
    "virtual_alias_domains": "valias.test",
    "virtual_mailbox_domains": "vmbox.test",
    "virtual_mailbox_maps": "texthash:/x/vmbox",
    "virtual_alias_maps": "texthash:/x/valias",
    "local_recipient_maps": "",
    "compatibility_level": "3.6",
}
TABLES = {
    "texthash:/x/vmbox": DictTable({"u@vmbox.test": "x"}),
    "texthash:/x/valias": DictTable({"a@valias.test": "u@vmbox.test"}),
}


def make(extra=None, tables=None):
    params = dict(BASE)
    params.update(extra or {})
    cfg = Config("/nonexistent", params, {}, [])
    own = OwnAddresses(cfg, system_addresses=lambda: ["127.0.0.1", "::1"])
    t = dict(TABLES)
    t.update(tables or {})
    return AddressResolver(cfg, tables=t, own_addresses=own)


# input, class, transport, nexthop, resolved recipient, routed, reference reply
OPEN_RELAY_TRICKS = [
    ("user@example.com", "local", "local", "mx.example.com", "user@example.com", False, "250"),
    ("user@other.org", "default", "smtp", "other.org", "user@other.org", False, "454 4.7.1"),
    ("user%other.org@example.com", "default", "smtp", "other.org", "user@other.org", False, "454 4.7.1"),
    ("@a.org:user@example.com", "local", "local", "mx.example.com", "user@example.com", False, "250"),
    ("@example.com:user@other.org", "default", "smtp", "other.org", "user@other.org", False, "454 4.7.1"),
    ("user@other.org@example.com", "default", "smtp", "other.org", "user@other.org", False, "454 4.7.1"),
    ("other.org!user@example.com", "default", "smtp", "other.org", "user@other.org", False, "454 4.7.1"),
    # "user@other.org"@example.com arrives in internal (unquoted) form:
    ("user@other.org@example.com", "default", "smtp", "other.org", "user@other.org", False, "454 4.7.1"),
    ("user@[127.0.0.1]", "local", "local", "mx.example.com", "user@[127.0.0.1]", False, "250"),
    ("user@[1.2.3.4]", "default", "smtp", "[1.2.3.4]", "user@[1.2.3.4]", False, "454 4.7.1"),
    ("user@[IPv6:::1]", "default", "smtp", "[IPv6:::1]", "user@[IPv6:::1]", False, "454 4.7.1"),
    ("user@example.com.", "local", "local", "mx.example.com", "user@example.com", False, "250"),
    ("USER@EXAMPLE.COM", "local", "local", "mx.example.com", "USER@EXAMPLE.COM", False, "250"),
    ("user@relay.test", "relay", "relay", "relay.test", "user@relay.test", False, "250"),
    ("u@vmbox.test", "virtual", "virtual", "vmbox.test", "u@vmbox.test", False, "250"),
    ("a@valias.test", "alias", "error", "5.1.1 User unknown in virtual alias table", "a@valias.test", False, "250"),
    ("user", "local", "local", "mx.example.com", "user@mx.example.com", False, "250"),
    ("user@sub.example.com", "default", "smtp", "sub.example.com", "user@sub.example.com", False, "454 4.7.1"),
    ("user%other.org@relay.test", "relay", "relay", "relay.test", "user%other.org@relay.test", True, "454 4.7.1"),
    ("a!b!user@example.com", "default", "smtp", "a", "b!user@a", True, "454 4.7.1"),
    ("user%a%b@example.com", "default", "smtp", "b", "user%a@b", True, "454 4.7.1"),
]


@pytest.mark.parametrize("addr,cls,transport,nexthop,rcpt,routed,reply", OPEN_RELAY_TRICKS)
def test_open_relay_tricks(addr, cls, transport, nexthop, rcpt, routed, reply):
    r = make().resolve(addr)
    assert (r.address_class, r.transport, r.nexthop, r.recipient, r.routed) == \
        (cls, transport, nexthop, rcpt, routed)
    # What the relay decision makes of it (permit_auth_destination).
    relay_ok = not r.routed and (r.is_final or r.address_class == "relay")
    assert relay_ok == (reply == "250")


def test_percent_hack_off_still_no_relay():
    r = make({"allow_percent_hack": "no"}).resolve("user%other.org@example.com")
    # Stays local but flagged routed: permit_auth_destination says DUNNO.
    assert r.address_class == "local" and r.routed
    assert r.recipient == "user%other.org@example.com"


def test_bangpath_off():
    r = make({"swap_bangpath": "no"}).resolve("other.org!user@example.com")
    assert r.address_class == "local" and r.routed


def test_empty_address_is_mailer_daemon():
    r = make().resolve("")
    assert r.recipient == "MAILER-DAEMON@mx.example.com" and r.address_class == "local"


def test_relayhost_and_transport_nexthop():
    r = make({"relayhost": "[smarthost.example.net]:587"}).resolve("x@other.org")
    assert (r.transport, r.nexthop) == ("smtp", "[smarthost.example.net]:587")
    # relayhost is not used for local or virtual classes
    assert make({"relayhost": "[s]"}).resolve("x@example.com").nexthop == "mx.example.com"
    # default_transport = smtp:[host]:25 overrides relayhost
    r = make({"relayhost": "[s]", "default_transport": "smtp:[gw]:25"}).resolve("x@other.org")
    assert (r.transport, r.nexthop) == ("smtp", "[gw]:25")


TRANSPORT = {
    "special@other.org": "smtp:[mail.special]:2525",
    "other.org": "relay:[gw.other.org]",
    ".sub.example.net": "lmtp:unix:/run/lmtp",
    "example.net": ":[kept-transport]",
    "bounce.test": "error:mail for bounce.test is not accepted",
    "discard.test": "discard:",
    "nohop.test": "smtp",
    "*": "smtp:[fallback]",
}


@pytest.mark.parametrize("addr,transport,nexthop", [
    ("special@other.org", "smtp", "[mail.special]:2525"),
    ("someone@other.org", "relay", "[gw.other.org]"),
    ("x@a.sub.example.net", "lmtp", "unix:/run/lmtp"),
    ("x@example.net", "smtp", "[kept-transport]"),
    ("x@bounce.test", "error", "mail for bounce.test is not accepted"),
    ("x@discard.test", "discard", "discard.test"),
    ("x@nohop.test", "smtp", "nohop.test"),
    ("x@elsewhere.org", "smtp", "[fallback]"),
    ("x@example.com", "smtp", "[fallback]"),      # '*' matches local domains too
])
def test_transport_maps(addr, transport, nexthop):
    r = make({"transport_maps": "hash:/x/transport"},
             {"hash:/x/transport": DictTable(TRANSPORT)}).resolve(addr)
    assert (r.transport, r.nexthop) == (transport, nexthop)


def test_transport_maps_do_not_override_virtual_alias_class():
    r = make({"transport_maps": "hash:/x/t"}, {"hash:/x/t": DictTable({"*": "smtp:[x]"})}).resolve("b@valias.test")
    assert r.transport == "error"


def test_relocated():
    r = make({"relocated_maps": "hash:/x/rel"},
             {"hash:/x/rel": DictTable({"old@example.com": "new@example.org"})}).resolve("old@example.com")
    # Postfix 3.7's resolve.c puts the status in the next hop ("550 5.1.6" at RCPT,
    # dsn=5.1.6 from error(8); checked side by side in test_resolve_parity6).
    assert (r.transport, r.nexthop) == ("error", "5.1.6 User has moved to new@example.org")


def test_sender_dependent_relayhost():
    res = make({"sender_dependent_relayhost_maps": "hash:/x/sdr", "relayhost": "[default]"},
               {"hash:/x/sdr": DictTable({"@corp.example": "[corp-relay]:587"})})
    assert res.resolve("x@other.org", sender="boss@corp.example").nexthop == "[corp-relay]:587"
    assert res.resolve("x@other.org", sender="a@b.example").nexthop == "[default]"


def test_invalid_domain_flags_error():
    assert make().resolve("user@bad_domain..org").flags & ResolveFlag.FLAG_ERROR


def test_table_failure_is_fail_flag():
    class Broken:
        def lookup(self, key):
            raise OSError("boom")
    r = make({"relay_domains": "hash:/x/broken"}, {"hash:/x/broken": Broken()}).resolve("x@other.org")
    assert r.failed


def test_recipient_known():
    res = make({"local_recipient_maps": "hash:/x/users", "relay_recipient_maps": "hash:/x/rr"},
               {"hash:/x/users": DictTable({"alice": "x"}),
                "hash:/x/rr": DictTable({"@relay.test": "x"})})
    assert res.recipient_known(res.resolve("alice@example.com")) == (True, None)
    assert res.recipient_known(res.resolve("bob@example.com")) == (False, "local recipient table")
    assert res.recipient_known(res.resolve("postmaster@example.com")) == (True, None)
    assert res.recipient_known(res.resolve("u@vmbox.test")) == (True, None)
    assert res.recipient_known(res.resolve("x@vmbox.test")) == (False, "virtual mailbox table")
    assert res.recipient_known(res.resolve("a@valias.test")) == (True, None)
    assert res.recipient_known(res.resolve("b@valias.test")) == (False, "virtual alias table")
    assert res.recipient_known(res.resolve("any@relay.test")) == (True, None)
    assert res.recipient_known(res.resolve("x@other.org")) == (True, None)


def test_recipient_delimiter_lookup():
    res = make({"local_recipient_maps": "hash:/x/users", "recipient_delimiter": "+"},
               {"hash:/x/users": DictTable({"alice": "x"})})
    assert res.recipient_known(res.resolve("alice+tag@example.com")) == (True, None)


@pytest.mark.parametrize("external,internal", [
    ('"user@other.org"@example.com', "user@other.org@example.com"),
    ('"a b"@example.com', "a b@example.com"),
    ('"a\\"b"@example.com', 'a"b@example.com'),
    ("plain@example.com", "plain@example.com"),
])
def test_external_quoted_forms_are_internalised(external, internal):
    from postwell.policy.resolve import to_internal
    assert to_internal(external) == internal
    res = make()
    assert res.resolve(external) == res.resolve(internal)


def test_quoted_relay_trick_in_external_form_is_refused():
    r = make().resolve('"user@other.org"@example.com')
    assert r.address_class == "default" and r.domain == "other.org"
