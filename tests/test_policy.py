"""smtpd restrictions (policy/restrictions.py, policy/smtpd_policy.py).

Expected replies were observed on a real Postfix 3.7.11 smtpd (loopback
client outside mynetworks = 192.0.2.0/24, HELO "localhost", MAIL FROM
s@example.org) with the access tables written below; see test_resolve.py
for the base configuration.
"""

from __future__ import annotations

import asyncio

import pytest

from postwell.config.main import Config
from postwell.log import NullLog
from postwell.policy import OwnAddresses, PolicyConfigError, SessionState, SmtpdPolicy
from postwell.policy.matchlist import DomainList, HostList, StringList, interface_addresses
from postwell.policy.restrictions import access_keys, dsn_fix, format_whatsup


class DictTable:
    def __init__(self, data):
        self.data = {k.lower(): v for k, v in data.items()}
        self.keys_seen = []

    def lookup(self, key):
        self.keys_seen.append(key)
        return self.data.get(key.lower())


RCPT_ACCESS = DictTable({
    "rej@example.com": "REJECT",
    "rejt@example.com": "REJECT go away",
    "def@example.com": "DEFER",
    "c451@example.com": "451 4.2.0 busy",
    "c550@example.com": "550 5.1.1 nobody here",
    "c452@example.com": "452 5.3.0 mixed",
    "dip@example.com": "DEFER_IF_PERMIT",
    "unk@example.com": "bogus_restriction",
    "helo@example.com": "reject_non_fqdn_helo_hostname",
    "dom.example.com": "REJECT",
    "ok@other.org": "OK",
    "cls@example.com": "myclass",
    "disc@example.com": "DISCARD",
    "hold@example.com": "HOLD",
})
SENDER_ACCESS = DictTable({"bad@example.org": "REJECT", "<>": "DUNNO", "spam.example": "550 go away"})

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
    "smtpd_recipient_restrictions": "check_recipient_access hash:/x/rcpt, reject_non_fqdn_recipient",
    "smtpd_sender_restrictions": "check_sender_access hash:/x/sender, reject_non_fqdn_sender",
    "smtpd_restriction_classes": "myclass",
    "myclass": "reject_non_fqdn_helo_hostname, permit",
}
TABLES = {
    "texthash:/x/vmbox": DictTable({"u@vmbox.test": "x"}),
    "texthash:/x/valias": DictTable({"a@valias.test": "u@vmbox.test"}),
    "hash:/x/rcpt": RCPT_ACCESS,
    "hash:/x/sender": SENDER_ACCESS,
    "hash:/x/client": DictTable({"10.1.2": "REJECT", "bad.example": "REJECT client says no",
                                 "2001:db8": "REJECT v6"}),
    "hash:/x/helo": DictTable({"evil.example": "REJECT", "[10.0.0.1]": "REJECT literal"}),
    "hash:/x/users": DictTable({"alice": "x"}),
}


def make_policy(extra=None, tables=None, log=None):
    params = dict(BASE)
    params.update(extra or {})
    cfg = Config("/nonexistent", params, {}, [])
    own = OwnAddresses(cfg, system_addresses=lambda: ["127.0.0.1"])
    t = dict(TABLES)
    t.update(tables or {})
    return SmtpdPolicy(cfg, log or NullLog(), tables=t, own_addresses=own)


def session(**kw):
    s = SessionState(client_name="unknown", client_addr="127.0.0.1", client_port="40000",
                     helo_name="localhost", protocol="ESMTP", sender="s@example.org")
    for k, v in kw.items():
        setattr(s, k, v)
    return s


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 10))


async def rcpt(policy, state, recipient):
    state.recipient = recipient
    return await policy.on_rcpt(state)


def rcpt_reply(policy, recipient, **kw):
    r = run(rcpt(policy, session(**kw), recipient))
    return None if r is None else str(r)


# recipient -> exact reply observed from Postfix 3.7.11 (None = 250 accepted)
REFERENCE_RCPT = [
    ("rej@example.com", "554 5.7.1 <rej@example.com>: Recipient address rejected: Access denied"),
    ("rejt@example.com", "554 5.7.1 <rejt@example.com>: Recipient address rejected: go away"),
    ("def@example.com", "450 4.7.1 <def@example.com>: Recipient address rejected: Access denied"),
    ("c451@example.com", "451 4.2.0 <c451@example.com>: Recipient address rejected: busy"),
    ("c550@example.com", "550 5.1.1 <c550@example.com>: Recipient address rejected: nobody here"),
    ("c452@example.com", "452 4.3.0 <c452@example.com>: Recipient address rejected: mixed"),
    ("dip@example.com", "450 4.7.1 <dip@example.com>: Recipient address rejected: Service unavailable"),
    ("unk@example.com", "451 4.3.5 Server configuration error"),
    ("helo@example.com", "504 5.5.2 <localhost>: Helo command rejected: need fully-qualified hostname"),
    ("x@dom.example.com", "454 4.7.1 <x@dom.example.com>: Relay access denied"),
    ("x@sub.dom.example.com", "454 4.7.1 <x@sub.dom.example.com>: Relay access denied"),
    ("user", "504 5.5.2 <user>: Recipient address rejected: need fully-qualified address"),
    ("user@localhost", "504 5.5.2 <user@localhost>: Recipient address rejected: need fully-qualified address"),
    ("Rej@Example.COM", "554 5.7.1 <Rej@Example.COM>: Recipient address rejected: Access denied"),
    ("user@example.com", None),
    ("user@other.org", "454 4.7.1 <user@other.org>: Relay access denied"),
    ("user%other.org@example.com", "454 4.7.1 <user%other.org@example.com>: Relay access denied"),
    ("user@other.org@example.com", "454 4.7.1 <user@other.org@example.com>: Relay access denied"),
    ("other.org!user@example.com", "454 4.7.1 <other.org!user@example.com>: Relay access denied"),
    ("user@[127.0.0.1]", None),
    ("user@[1.2.3.4]", "454 4.7.1 <user@[1.2.3.4]>: Relay access denied"),
    ("user@relay.test", None),
    ("u@vmbox.test", None),
    ("x@vmbox.test", "550 5.1.1 <x@vmbox.test>: Recipient address rejected: User unknown in virtual mailbox table"),
    ("a@valias.test", None),
    ("b@valias.test", "550 5.1.1 <b@valias.test>: Recipient address rejected: User unknown in virtual alias table"),
    ("postmaster", None),
    ("ok@other.org", "454 4.7.1 <ok@other.org>: Relay access denied"),  # relay list runs first
]


@pytest.mark.parametrize("recipient,expected", REFERENCE_RCPT)
def test_reference_rcpt_replies(recipient, expected):
    assert rcpt_reply(make_policy(), recipient) == expected


def test_unknown_restriction_logs_warning():
    log = NullLog()
    p = make_policy(log=log)
    rcpt_reply(p, "unk@example.com")
    assert 'warning: unknown smtpd restriction: "bogus_restriction"' in log.lines


def test_sender_rejects_at_rcpt_with_delay_reject():
    p = make_policy()
    s = session(sender="bad@example.org")
    assert run(p.on_mail(s)) is None          # delayed
    assert str(run(rcpt(p, s, "user@example.com"))) == \
        "554 5.7.1 <bad@example.org>: Sender address rejected: Access denied"
    s = session(sender="bad")
    assert str(run(rcpt(p, s, "user@example.com"))) == \
        "504 5.5.2 <bad>: Sender address rejected: need fully-qualified address"


def test_null_sender_uses_null_key_and_domain_lookup():
    p = make_policy()
    assert rcpt_reply(p, "user@example.com", sender="") is None
    assert rcpt_reply(p, "user@example.com", sender="x@spam.example") == \
        "550 5.7.1 <x@spam.example>: Sender address rejected: go away"
    assert rcpt_reply(p, "user@example.com", sender="x@sub.spam.example") == \
        "550 5.7.1 <x@sub.spam.example>: Sender address rejected: go away"


def test_delay_reject_no_checks_at_own_stage():
    p = make_policy({"smtpd_delay_reject": "no"})
    s = session(sender="bad@example.org")
    assert str(run(p.on_mail(s))) == "554 5.7.1 <bad@example.org>: Sender address rejected: Access denied"
    # and not again at RCPT time
    assert run(rcpt(p, session(sender="bad@example.org"), "user@example.com")) is None


def test_client_restrictions():
    p = make_policy({"smtpd_client_restrictions": "check_client_access hash:/x/client"})
    assert rcpt_reply(p, "user@example.com", client_addr="10.1.2.3") == \
        "554 5.7.1 <unknown[10.1.2.3]>: Client host rejected: Access denied"
    assert rcpt_reply(p, "user@example.com", client_name="mx.bad.example", client_addr="10.9.9.9") == \
        "554 5.7.1 <mx.bad.example[10.9.9.9]>: Client host rejected: client says no"
    assert rcpt_reply(p, "user@example.com", client_addr="2001:db8::5") == \
        "554 5.7.1 <unknown[2001:db8::5]>: Client host rejected: v6"
    assert rcpt_reply(p, "user@example.com", client_addr="10.1.3.3") is None
    pn = make_policy({"smtpd_client_restrictions": "check_client_access hash:/x/client",
                      "smtpd_delay_reject": "no"})
    assert str(run(pn.on_connect(session(client_addr="10.1.2.3")))) == \
        "554 5.7.1 <unknown[10.1.2.3]>: Client host rejected: Access denied"


def test_helo_restrictions():
    p = make_policy({"smtpd_helo_restrictions":
                     "check_helo_access hash:/x/helo, reject_invalid_helo_hostname, reject_non_fqdn_helo_hostname"})
    assert rcpt_reply(p, "user@example.com", helo_name="a.evil.example") == \
        "554 5.7.1 <a.evil.example>: Helo command rejected: Access denied"
    assert rcpt_reply(p, "user@example.com", helo_name="[10.0.0.1]") == \
        "554 5.7.1 <[10.0.0.1]>: Helo command rejected: literal"
    assert rcpt_reply(p, "user@example.com", helo_name="bad_name!") == \
        "501 5.5.2 <bad_name!>: Helo command rejected: Invalid name"
    assert rcpt_reply(p, "user@example.com", helo_name="[999.1.1.1]") == \
        "501 5.5.2 <[999.1.1.1]>: Helo command rejected: invalid ip address"
    assert rcpt_reply(p, "user@example.com", helo_name="host.example.net.") is None


def test_helo_required():
    p = make_policy({"smtpd_helo_required": "yes"})
    assert str(run(p.on_mail(session(helo_name=None)))) == "503 5.5.1 Error: send HELO/EHLO first"


def test_permit_mynetworks_allows_relay():
    p = make_policy()
    assert rcpt_reply(p, "user@other.org", client_addr="192.0.2.7") is None
    # but a routed address through us still goes nowhere it should not:
    assert rcpt_reply(p, "user@other.org", client_addr="198.51.100.1") is not None


def test_sasl_authenticated_relay():
    p = make_policy()
    assert rcpt_reply(p, "user@other.org", sasl_username="alice") is None


def test_reject_unauth_destination_code():
    p = make_policy({"smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination"})
    assert rcpt_reply(p, "user@other.org") == "554 5.7.1 <user@other.org>: Relay access denied"


def test_relay_and_recipient_both_empty_is_fatal():
    with pytest.raises(PolicyConfigError) as e:
        make_policy({"smtpd_relay_restrictions": "", "smtpd_recipient_restrictions": "permit_mynetworks"})
    assert str(e.value) == (
        "in parameter smtpd_relay_restrictions or smtpd_recipient_restrictions, specify at least one "
        "working instance of: reject_unauth_destination, defer_unauth_destination, reject, defer, "
        "defer_if_permit or check_relay_domains")
    # a restriction class that contains the required restriction is enough
    make_policy({"smtpd_relay_restrictions": "", "smtpd_restriction_classes": "c",
                 "c": "reject_unauth_destination", "smtpd_recipient_restrictions": "c"})


def test_generic_restrictions():
    p = make_policy({"smtpd_recipient_restrictions": "reject"})
    assert rcpt_reply(p, "user@example.com") == \
        "554 5.7.1 <user@example.com>: Recipient address rejected: Access denied"
    p = make_policy({"smtpd_recipient_restrictions": "defer"})
    assert rcpt_reply(p, "user@example.com") == \
        "450 4.3.2 <user@example.com>: Recipient address rejected: Try again later"
    p = make_policy({"smtpd_recipient_restrictions": "defer_if_permit, permit"})
    assert rcpt_reply(p, "user@example.com") == \
        "450 4.7.0 <user@example.com>: Recipient address rejected: defer_if_permit requested"
    p = make_policy({"smtpd_recipient_restrictions": "defer_if_reject, reject"})
    assert rcpt_reply(p, "user@example.com") == \
        "450 4.7.0 <user@example.com>: Recipient address rejected: defer_if_reject requested"
    p = make_policy({"smtpd_recipient_restrictions": "defer_if_reject, permit"})
    assert rcpt_reply(p, "user@example.com") is None
    p = make_policy({"soft_bounce": "yes", "smtpd_recipient_restrictions": "reject"})
    assert rcpt_reply(p, "user@example.com") == \
        "454 4.7.1 <user@example.com>: Recipient address rejected: Access denied"


def test_warn_if_reject():
    log = NullLog()
    p = make_policy({"smtpd_recipient_restrictions": "warn_if_reject, reject, permit"}, log=log)
    assert rcpt_reply(p, "user@example.com") is None
    assert any("reject_warning: RCPT from unknown[127.0.0.1]: 554 5.7.1 <user@example.com>: "
               "Recipient address rejected: Access denied;" in line for line in log.lines)


def test_restriction_class_from_access_map():
    p = make_policy()
    assert rcpt_reply(p, "cls@example.com") == \
        "504 5.5.2 <localhost>: Helo command rejected: need fully-qualified hostname"
    assert rcpt_reply(p, "cls@example.com", helo_name="client.example.net") is None


def test_access_actions_discard_hold():
    p = make_policy()
    s = session()
    assert run(rcpt(p, s, "disc@example.com")) is None and s.discard
    s = session()
    assert run(rcpt(p, s, "hold@example.com")) is None and s.hold


def test_reject_unlisted_recipient_local():
    p = make_policy({"local_recipient_maps": "hash:/x/users"})
    assert rcpt_reply(p, "alice@example.com") is None
    assert rcpt_reply(p, "bob@example.com") == \
        "550 5.1.1 <bob@example.com>: Recipient address rejected: User unknown in local recipient table"
    p = make_policy({"local_recipient_maps": "hash:/x/users", "smtpd_reject_unlisted_recipient": "no"})
    assert rcpt_reply(p, "bob@example.com") is None


def test_reject_unlisted_sender():
    p = make_policy({"local_recipient_maps": "hash:/x/users",
                     "smtpd_sender_restrictions": "reject_unlisted_sender"})
    assert rcpt_reply(p, "alice@example.com", sender="nobody@example.com") == \
        "550 5.1.0 <nobody@example.com>: Sender address rejected: User unknown in local recipient table"


def test_data_and_eod_restrictions():
    p = make_policy({"smtpd_data_restrictions": "reject", "smtpd_end_of_data_restrictions": "defer"})
    s = session(recipient="user@example.com", recipient_count=1)
    assert str(run(p.on_data(s))) == "554 5.7.1 <DATA>: Data command rejected: Access denied"
    assert str(run(p.on_end_of_data(s))) == \
        "450 4.3.2 <END-OF-MESSAGE>: End-of-data rejected: Try again later"


def test_reject_multi_recipient_bounce():
    p = make_policy({"smtpd_data_restrictions": "reject_multi_recipient_bounce"})
    assert run(p.on_data(session(sender="", recipient_count=1))) is None
    assert str(run(p.on_data(session(sender="", recipient_count=2)))) == \
        "550 5.5.3 <DATA>: Data command rejected: Multi-recipient bounce"


def test_unknown_sender_domain_hook():
    async def lookup(domain):
        return {"nx.example": "notfound", "tmp.example": "retry"}.get(domain, "ok")
    params = dict(BASE)
    params["smtpd_sender_restrictions"] = "reject_unknown_sender_domain"
    cfg = Config("/nonexistent", params, {}, [])
    p = SmtpdPolicy(cfg, NullLog(), tables=TABLES, mailhost_lookup=lookup,
                    own_addresses=OwnAddresses(cfg, system_addresses=lambda: ["127.0.0.1"]))
    assert str(run(rcpt(p, session(sender="a@nx.example"), "user@example.com"))) == \
        "450 4.1.8 <a@nx.example>: Sender address rejected: Domain not found"
    assert str(run(rcpt(p, session(sender="a@tmp.example"), "user@example.com"))) == \
        "450 4.1.8 <a@tmp.example>: Sender address rejected: Domain not found"
    assert run(rcpt(p, session(sender="a@ok.example"), "user@example.com")) is None
    assert run(rcpt(p, session(sender="a@example.com"), "user@example.com")) is None  # local


def test_check_policy_service_falls_back_to_default_action():
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()                         # nothing listens there: connection refused
    log = NullLog()
    p = make_policy({"smtpd_recipient_restrictions": f"check_policy_service inet:127.0.0.1:{port}",
                     "smtpd_policy_service_retry_delay": "0s"}, log=log)
    assert rcpt_reply(p, "user@example.com") == \
        "451 4.3.5 <user@example.com>: Recipient address rejected: Server configuration problem"
    assert f"warning: connect to 127.0.0.1:{port}: Connection refused" in log.lines


def test_table_failure_is_server_error():
    class Broken:
        def lookup(self, key):
            raise OSError("gone")
    p = make_policy({"smtpd_recipient_restrictions": "check_recipient_access hash:/x/broken"},
                    {"hash:/x/broken": Broken()})
    assert rcpt_reply(p, "user@example.com") == \
        "451 4.3.5 <user@example.com>: Recipient address rejected: Server configuration error"


def test_access_key_order():
    assert access_keys("user+ext@sub.example.com", "+", True) == [
        ("user+ext@sub.example.com", False), ("user@sub.example.com", True),
        ("sub.example.com", True), ("example.com", True), ("com", True),
        ("user+ext@", True), ("user@", True)]
    assert [k for k, _ in access_keys("u@a.b", "", False)] == ["u@a.b", "a.b", ".b", "u@"]


def test_dsn_fix():
    # Postfix 3.7.11 observed (sender/recipient): 5.1.0->5.1.0/5.1.0, 5.1.1->5.1.7/5.1.1,
    # 5.1.2->5.1.8/5.1.2, 5.1.3..4->5.1.7/same, 5.1.5->5.1.0/5.1.5, 5.1.6->5.1.7/5.1.6,
    # 5.1.7->5.1.7/5.1.3, 5.1.8->5.1.8/5.1.2, 5.1.9 and 5.1.10 -> 5.1.0/5.1.0
    observed = {"0": ("0", "0"), "1": ("7", "1"), "2": ("8", "2"), "3": ("7", "3"), "4": ("7", "4"),
                "5": ("0", "5"), "6": ("7", "6"), "7": ("7", "3"), "8": ("8", "2"), "9": ("0", "0"),
                "10": ("0", "0")}
    for micro, (snd, rcp) in observed.items():
        assert dsn_fix("5.1." + micro, "Sender address")[4:] == snd
        assert dsn_fix("5.1." + micro, "Recipient address")[4:] == rcp
    assert dsn_fix("5.1.1", "Sender address") == "4.1.7"
    assert dsn_fix("5.1.1", "Recipient address") == "4.1.1"
    assert dsn_fix("5.1.1", "Client host") == "4.0.0"
    assert dsn_fix("5.7.1", "Client host") == "5.7.1"


def test_reject_log_line_shape():
    s = session(recipient="x@other.org", where="RCPT")
    from postwell.smtp.reply import Reply
    line = format_whatsup(s, "reject", str(Reply(454, "<x@other.org>: Relay access denied", "4.7.1")))
    assert line == ("NOQUEUE: reject: RCPT from unknown[127.0.0.1]: 454 4.7.1 <x@other.org>: "
                    "Relay access denied; from=<s@example.org> to=<x@other.org> proto=ESMTP helo=<localhost>")


# ---------------------------------------------------------------------------
# match lists

def test_mynetworks_list(tmp_path):
    inc = tmp_path / "nets"
    inc.write_text("# comment\n!10.9.0.0/16\n10.0.0.0/8\n")
    hl = HostList("mynetworks", f"127.0.0.0/8 [::1]/128, [2001:db8::]/32 !10.9.9.9 {inc} trusted.example",
                  None, parent=True)
    assert hl.match("unknown", "127.0.0.5")
    assert hl.match("unknown", "::1")
    assert hl.match("unknown", "2001:db8::1:2")
    assert hl.match("unknown", "10.1.2.3")
    assert not hl.match("unknown", "10.9.9.9")
    assert not hl.match("unknown", "10.9.1.1")      # negated in the include file
    assert not hl.match("unknown", "192.168.1.1")
    assert hl.match("mail.trusted.example", "198.51.100.1")
    assert hl.match("unknown", "::ffff:127.0.0.1")  # IPv4-mapped compares as IPv4


def test_mynetworks_table():
    hl = HostList("mynetworks", "cidr:/x/nets", None,
                  tables={"cidr:/x/nets": DictTable({"198.51.100.7": "ok"})})
    assert hl.match("unknown", "198.51.100.7") and not hl.match("unknown", "198.51.100.8")


def test_domain_lists():
    parent = DomainList("relay_domains", "example.org, .dot.example, hash:/x/d", None, parent=True,
                        tables={"hash:/x/d": DictTable({"tab.example": "x"})})
    assert parent.match("example.org") and parent.match("a.b.example.org")
    assert parent.match("x.tab.example") and parent.match("tab.example")
    assert parent.match("EXAMPLE.ORG.")
    assert not parent.match("notexample.org")
    flat = DomainList("relay_domains", "example.org, .dot.example, hash:/x/d", None, parent=False,
                      tables={"hash:/x/d": DictTable({".tab.example": "x"})})
    assert flat.match("example.org") and not flat.match("a.example.org")
    assert flat.match("a.dot.example") and not flat.match("dot.example")
    assert flat.match("x.tab.example")
    neg = DomainList("relay_domains", "!bad.example.org example.org", None, parent=True)
    assert neg.match("good.example.org") and not neg.match("bad.example.org")
    exact = StringList("mydestination", "example.com localhost", None)
    assert exact.match("EXAMPLE.com") and not exact.match("sub.example.com")


def test_interface_addresses():
    sysaddr = lambda: ["127.0.0.1", "192.0.2.2", "::1", "2001:db8::2"]  # noqa: E731
    assert interface_addresses("all", "all", sysaddr) == ["127.0.0.1", "192.0.2.2", "::1", "2001:db8::2"]
    assert interface_addresses("all", "ipv4", sysaddr) == ["127.0.0.1", "192.0.2.2"]
    assert interface_addresses("loopback-only", "all", sysaddr) == ["127.0.0.1", "::1"]
    assert interface_addresses("192.0.2.2, [::1]", "all", sysaddr) == ["192.0.2.2", "::1"]


def test_permit_inet_interfaces():
    p = make_policy({"smtpd_relay_restrictions": "permit_inet_interfaces, reject_unauth_destination"})
    assert rcpt_reply(p, "user@other.org", client_addr="127.0.0.1") is None
    assert rcpt_reply(p, "user@other.org", client_addr="127.0.0.2") == \
        "554 5.7.1 <user@other.org>: Relay access denied"


# Observed on Postfix 3.7.11 with
#   smtpd_client_restrictions = check_client_access inline:{127.0.0.2=REJECT,
#     {127.0.0.3=REJECT 5.1.1 client text}, 127.0.3=DEFER, 127.0.0.4=defer_if_permit,
#     {127.0.0.6=warn_if_reject reject}, 127.0.0.7=defer_if_reject, {127.0.0.8=450 5.7.0 mixed}}
#   smtpd_helo_restrictions = check_helo_access inline:{evil.example=REJECT},
#     reject_invalid_helo_hostname, reject_non_fqdn_helo_hostname
#   smtpd_data_restrictions = reject_multi_recipient_bounce
CLIENT_TABLE = DictTable({"127.0.0.2": "REJECT", "127.0.0.3": "REJECT 5.1.1 client text",
                          "127.0.3": "DEFER", "127.0.0.4": "defer_if_permit",
                          "127.0.0.6": "warn_if_reject reject", "127.0.0.7": "defer_if_reject",
                          "127.0.0.8": "450 5.7.0 mixed"})
HELO_TABLE = DictTable({"evil.example": "REJECT"})
SCENARIO = {
    "smtpd_client_restrictions": "check_client_access hash:/x/c2",
    "smtpd_helo_restrictions": "check_helo_access hash:/x/h2, reject_invalid_helo_hostname, "
                               "reject_non_fqdn_helo_hostname",
    "smtpd_data_restrictions": "reject_multi_recipient_bounce",
    "smtpd_recipient_restrictions": "",
}


@pytest.mark.parametrize("src,expected", [
    ("127.0.0.2", "554 5.7.1 <unknown[127.0.0.2]>: Client host rejected: Access denied"),
    ("127.0.0.3", "554 5.0.0 <unknown[127.0.0.3]>: Client host rejected: client text"),
    ("127.0.3.9", "450 4.7.1 <unknown[127.0.3.9]>: Client host rejected: Access denied"),
    ("127.0.0.4", "450 4.7.1 <unknown[127.0.0.4]>: Client host rejected: Service unavailable"),
    ("127.0.0.6", None),
    ("127.0.0.7", None),
    ("127.0.0.8", "450 4.7.0 <unknown[127.0.0.8]>: Client host rejected: mixed"),
])
def test_reference_client_access(src, expected):
    log = NullLog()
    p = make_policy(SCENARIO, {"hash:/x/c2": CLIENT_TABLE, "hash:/x/h2": HELO_TABLE}, log=log)
    assert rcpt_reply(p, "user@example.com", client_addr=src, helo_name="client.example.net") == expected
    if src == "127.0.0.6":
        assert ("NOQUEUE: reject_warning: RCPT from unknown[127.0.0.6]: 554 5.7.1 <unknown[127.0.0.6]>: "
                "Client host rejected: Access denied; from=<s@example.org> to=<user@example.com> "
                "proto=ESMTP helo=<client.example.net>") in log.lines


@pytest.mark.parametrize("helo,expected", [
    ("a.evil.example", "554 5.7.1 <a.evil.example>: Helo command rejected: Access denied"),
    ("bad_name!", "501 5.5.2 <bad_name!>: Helo command rejected: Invalid name"),
    ("[999.1.1.1]", "501 5.5.2 <[999.1.1.1]>: Helo command rejected: invalid ip address"),
    ("[10.0.0.1]", None),
    ("localhost", "504 5.5.2 <localhost>: Helo command rejected: need fully-qualified hostname"),
    ("host.example.net.", None),
    ("1.2.3.4", "504 5.5.2 <1.2.3.4>: Helo command rejected: need fully-qualified hostname"),
    ("a..b", "501 5.5.2 <a..b>: Helo command rejected: Invalid name"),
])
def test_reference_helo(helo, expected):
    p = make_policy(SCENARIO, {"hash:/x/c2": CLIENT_TABLE, "hash:/x/h2": HELO_TABLE})
    assert rcpt_reply(p, "user@example.com", client_addr="127.0.0.9", helo_name=helo) == expected


# Observed on Postfix 3.7.11 with
#   local_recipient_maps = proxy:unix:passwd.byname $alias_maps   (root exists)
#   alias_maps = texthash:.../aliases (postmaster: root), recipient_delimiter = +
#   relay_recipient_maps = inline:{ok@relay.test=x}, smtpd_reject_unlisted_sender = yes
#   smtpd_relay_restrictions = check_recipient_access inline:{other.org=OK, a=OK, b=OK},
#                              permit_mynetworks, reject_unauth_destination
#   smtpd_sender_restrictions = check_sender_access inline:{spam.example=REJECT, john@=REJECT,
#                              {x@example.org=550 5.1.1 nope}}
MAPS_SCENARIO = {
    "local_recipient_maps": "proxy:unix:passwd.byname $alias_maps",
    "alias_maps": "texthash:/x/aliases",
    "recipient_delimiter": "+",
    "relay_recipient_maps": "hash:/x/relayrcpt",
    "smtpd_reject_unlisted_sender": "yes",
    "smtpd_relay_restrictions": "check_recipient_access hash:/x/okdom, permit_mynetworks, "
                                "reject_unauth_destination",
    "smtpd_recipient_restrictions": "",
    "smtpd_sender_restrictions": "check_sender_access hash:/x/snd",
}
MAPS_TABLES = {
    "proxy:unix:passwd.byname": DictTable({"root": "x"}),
    "texthash:/x/aliases": DictTable({"postmaster": "root"}),
    "hash:/x/relayrcpt": DictTable({"ok@relay.test": "x"}),
    "hash:/x/okdom": DictTable({"other.org": "OK", "a": "OK", "b": "OK"}),
    "hash:/x/snd": DictTable({"spam.example": "REJECT", "john@": "REJECT", "x@example.org": "550 5.1.1 nope"}),
}


@pytest.mark.parametrize("recipient,expected", [
    ("root@example.com", None),
    ("nosuch@example.com",
     "550 5.1.1 <nosuch@example.com>: Recipient address rejected: User unknown in local recipient table"),
    ("postmaster@example.com", None),
    ("Root@Example.com", None),
    ("root+x@example.com", None),
    ("nosuch+root@example.com",
     "550 5.1.1 <nosuch+root@example.com>: Recipient address rejected: User unknown in local recipient table"),
    ("ok@relay.test", None),
    ("x@relay.test", "550 5.1.1 <x@relay.test>: Recipient address rejected: User unknown in relay recipient table"),
    ("user@other.org", None),
    ("a!b!user@example.com", "554 5.7.1 <a!b!user@example.com>: Relay access denied"),
    ("user@other.org@example.com", None),
    ("user%b@a", "554 5.7.1 <user%b@a>: Relay access denied"),
    ("MAILER-DAEMON@example.com", None),
    ("double-bounce@example.com", None),
    ("root@[127.0.0.1]", None),
    ("x@[127.0.0.1]", "550 5.1.1 <x@[127.0.0.1]>: Recipient address rejected: User unknown in local recipient table"),
    ("x@vmbox.test", "550 5.1.1 <x@vmbox.test>: Recipient address rejected: User unknown in virtual mailbox table"),
    ("b@valias.test", "550 5.1.1 <b@valias.test>: Recipient address rejected: User unknown in virtual alias table"),
])
def test_reference_recipient_maps(recipient, expected):
    p = make_policy(MAPS_SCENARIO, MAPS_TABLES)
    assert rcpt_reply(p, recipient) == expected


@pytest.mark.parametrize("sender,expected", [
    ("nosuch@example.com",
     "550 5.1.0 <nosuch@example.com>: Sender address rejected: User unknown in local recipient table"),
    ("x@mx.spam.example", "554 5.7.1 <x@mx.spam.example>: Sender address rejected: Access denied"),
    ("john@example.net", "554 5.7.1 <john@example.net>: Sender address rejected: Access denied"),
    ("x@example.org", "550 5.1.7 <x@example.org>: Sender address rejected: nope"),
    ("root@example.com", None),
])
def test_reference_sender_maps(sender, expected):
    p = make_policy(MAPS_SCENARIO, MAPS_TABLES)
    assert rcpt_reply(p, "root@example.com", sender=sender) == expected


def test_reference_data_and_eod():
    # Postfix 3.7.11: smtpd_data_restrictions = defer_if_reject, reject
    p = make_policy({"smtpd_data_restrictions": "defer_if_reject, reject"})
    assert str(run(p.on_data(session(recipient="root@example.com", recipient_count=1)))) == \
        "450 4.7.0 <DATA>: Data command rejected: defer_if_reject requested"
    # smtpd_end_of_data_restrictions = check_sender_access inline:{{s@example.org=REJECT eod no}}
    p = make_policy({"smtpd_end_of_data_restrictions": "check_sender_access hash:/x/eod"},
                    {"hash:/x/eod": DictTable({"s@example.org": "REJECT eod no"})})
    assert str(run(p.on_end_of_data(session(recipient="root@example.com", recipient_count=1)))) == \
        "554 5.7.1 <s@example.org>: Sender address rejected: eod no"
    # a table that cannot be searched (Postfix: "lookup error")
    class Broken:
        def lookup(self, key):
            raise OSError("unavailable")
    p = make_policy({"smtpd_end_of_data_restrictions": "check_sender_access hash:/x/broken"},
                    {"hash:/x/broken": Broken()})
    s = session(recipient="root@example.com", recipient_count=2)
    assert str(run(p.on_end_of_data(s))) == \
        "451 4.3.5 <s@example.org>: Sender address rejected: Server configuration error"
    assert s.recipient == "root@example.com"       # restored after the check


def test_bare_table_uses_list_default_access_check():
    p = make_policy({"smtpd_client_restrictions": "hash:/x/c2"}, {"hash:/x/c2": CLIENT_TABLE})
    assert rcpt_reply(p, "user@example.com", client_addr="127.0.0.2") == \
        "554 5.7.1 <unknown[127.0.0.2]>: Client host rejected: Access denied"
    p = make_policy({"smtpd_data_restrictions": "hash:/x/c2"}, {"hash:/x/c2": CLIENT_TABLE})
    assert str(run(p.on_data(session(recipient_count=1)))) == "451 4.3.5 Server configuration error"


def test_defer_if_permit_then_reject_rejects():
    # Postfix 3.7.11: smtpd_recipient_restrictions = defer_if_permit,
    #   check_recipient_access inline:{r@example.com=REJECT}, permit
    p = make_policy({"smtpd_recipient_restrictions":
                     "defer_if_permit, check_recipient_access hash:/x/r, permit"},
                    {"hash:/x/r": DictTable({"r@example.com": "REJECT"})})
    assert rcpt_reply(p, "r@example.com") == "554 5.7.1 <r@example.com>: Recipient address rejected: Access denied"
    assert rcpt_reply(p, "root@example.com") == \
        "450 4.7.0 <root@example.com>: Recipient address rejected: defer_if_permit requested"


# Postfix 3.7.11, default smtpd_relay_restrictions, the MAPS_SCENARIO recipient
# tables.  The left column is the RCPT TO address as the client sent it; the
# policy sees the smtpd's internal (unquoted) form in the second column.
QUOTED_AND_ROUTED = [
    ('"user%other.org"@example.com', "user%other.org@example.com",
     "454 4.7.1 <user%other.org@example.com>: Relay access denied"),
    ('"user!x"@example.com', "user!x@example.com", "454 4.7.1 <user!x@example.com>: Relay access denied"),
    ('"other.org!user"@example.com', "other.org!user@example.com",
     "454 4.7.1 <other.org!user@example.com>: Relay access denied"),
    ('"user"@other.org', "user@other.org", "454 4.7.1 <user@other.org>: Relay access denied"),
    ('"a b"@example.com', "a b@example.com",
     "550 5.1.1 <a b@example.com>: Recipient address rejected: User unknown in local recipient table"),
    ('"@other.org:u"@example.com', "@other.org:u@example.com",
     "550 5.1.1 <@other.org:u@example.com>: Recipient address rejected: User unknown in local recipient table"),
    ("user@[IPv6:::1]", "user@[IPv6:::1]", "454 4.7.1 <user@[IPv6:::1]>: Relay access denied"),
    ("user@[127.0.0.1].", "user@[127.0.0.1].",
     "550 5.1.1 <user@[127.0.0.1].>: Recipient address rejected: User unknown in local recipient table"),
    ("user@EXAMPLE.com.", "user@EXAMPLE.com.",
     "550 5.1.1 <user@EXAMPLE.com.>: Recipient address rejected: User unknown in local recipient table"),
    ("user%other.org%example.com@example.com", "user%other.org%example.com@example.com",
     "454 4.7.1 <user%other.org%example.com@example.com>: Relay access denied"),
    ("user%example.com@example.com", "user%example.com@example.com",
     "550 5.1.1 <user%example.com@example.com>: Recipient address rejected: User unknown in local recipient table"),
    ("example.com!user@example.com", "example.com!user@example.com",
     "550 5.1.1 <example.com!user@example.com>: Recipient address rejected: User unknown in local recipient table"),
    ("user@mx.example.com", "user@mx.example.com",
     "550 5.1.1 <user@mx.example.com>: Recipient address rejected: User unknown in local recipient table"),
    ('""@example.com', "@example.com", None),
    ("user@[127.0.0.2]", "user@[127.0.0.2]", "454 4.7.1 <user@[127.0.0.2]>: Relay access denied"),
    ('"root"@example.com', "root@example.com", None),
    ("root@example.com@example.com", "root@example.com@example.com", None),
    ("root%example.com", "root%example.com", None),
    ("other.org!root", "other.org!root", "454 4.7.1 <other.org!root>: Relay access denied"),
    ("u@relay.test@example.com", "u@relay.test@example.com",
     "550 5.1.1 <u@relay.test@example.com>: Recipient address rejected: User unknown in relay recipient table"),
]


@pytest.mark.parametrize("sent,internal,expected", QUOTED_AND_ROUTED)
def test_reference_quoted_and_routed(sent, internal, expected):
    sc = {k: v for k, v in MAPS_SCENARIO.items()
          if k not in ("smtpd_relay_restrictions", "smtpd_sender_restrictions")}
    p = make_policy(sc, MAPS_TABLES)
    assert rcpt_reply(p, internal) == expected


def test_reference_delay_reject_no():
    # Postfix 3.7.11 with smtpd_delay_reject = no, smtpd_helo_required = yes,
    # smtpd_client_restrictions = check_client_access inline:{127.0.0.2=REJECT},
    # smtpd_helo_restrictions = reject_non_fqdn_helo_hostname:
    #   banner replaced by "554 5.7.1 <unknown[127.0.0.2]>: Client host rejected: Access denied",
    #   logged "NOQUEUE: reject: CONNECT from unknown[127.0.0.2]: 554 ...; proto=SMTP"
    #   (the smtpd then answers every command but QUIT with
    #   "503 5.7.0 Error: access denied for unknown[127.0.0.2]");
    #   "HELO localhost" -> 504 5.5.2 <localhost>: Helo command rejected: need fully-qualified hostname
    #   MAIL before HELO -> 503 5.5.1 Error: send HELO/EHLO first
    extra = {"smtpd_delay_reject": "no", "smtpd_helo_required": "yes",
             "smtpd_client_restrictions": "check_client_access hash:/x/c2",
             "smtpd_helo_restrictions": "reject_non_fqdn_helo_hostname"}
    p = make_policy(extra, {"hash:/x/c2": CLIENT_TABLE})
    s = SessionState(client_addr="127.0.0.2")
    reply = run(p.on_connect(s))
    assert str(reply) == "554 5.7.1 <unknown[127.0.0.2]>: Client host rejected: Access denied"
    assert p.reject_log_line(s, reply) == (
        "NOQUEUE: reject: CONNECT from unknown[127.0.0.2]: 554 5.7.1 <unknown[127.0.0.2]>: "
        "Client host rejected: Access denied; proto=SMTP")
    s = SessionState(client_addr="127.0.0.1", helo_name="localhost")
    assert run(p.on_connect(s)) is None
    assert str(run(p.on_helo(s))) == "504 5.5.2 <localhost>: Helo command rejected: need fully-qualified hostname"
    s = SessionState(client_addr="127.0.0.1", sender="s@example.org")
    assert str(run(p.on_mail(s))) == "503 5.5.1 Error: send HELO/EHLO first"


# Postfix 3.7.11, smtpd_helo_restrictions = reject_invalid_helo_hostname, reject_non_fqdn_helo_hostname
@pytest.mark.parametrize("helo,expected", [
    ("bad_name.example", None),
    ("-a.example", "501 5.5.2 <-a.example>: Helo command rejected: Invalid name"),
    ("a-.example", "501 5.5.2 <a-.example>: Helo command rejected: Invalid name"),
    ("a.123", None),
    ("123.example", None),
    ("a.b.c.d.1", None),
    ("x" * 64 + ".example", f"501 5.5.2 <{'x' * 64}.example>: Helo command rejected: Invalid name"),
    ("[1.2.3.4]", None),
    ("[IPv6:::1]", None),
    ("[ipv6:::1]", None),
    ("[::1]", "501 5.5.2 <[::1]>: Helo command rejected: invalid ip address"),
    ("1.2.3.4.", "504 5.5.2 <1.2.3.4.>: Helo command rejected: need fully-qualified hostname"),
    ("a.example..", "501 5.5.2 <a.example..>: Helo command rejected: Invalid name"),
    (".a.example", "501 5.5.2 <.a.example>: Helo command rejected: Invalid name"),
])
def test_reference_helo_syntax(helo, expected):
    p = make_policy({"smtpd_helo_restrictions": "reject_invalid_helo_hostname, reject_non_fqdn_helo_hostname"})
    assert rcpt_reply(p, "root@example.com", helo_name=helo) == expected


def test_reference_vrfy():
    # Postfix 3.7.11 (MAPS_SCENARIO tables, default relay restrictions):
    #   VRFY root@example.com -> 252 2.0.0 root@example.com
    #   VRFY nosuch@example.com -> 550 5.1.1 <nosuch@example.com>: Recipient address rejected: ...
    #   VRFY user@other.org -> 454 4.7.1 <user@other.org>: Relay access denied
    #   log: "NOQUEUE: reject: VRFY from unknown[127.0.0.1]: 454 4.7.1 <user@other.org>: Relay access
    #         denied; to=<user@other.org> proto=ESMTP helo=<client.example.net>"
    sc = {k: v for k, v in MAPS_SCENARIO.items()
          if k not in ("smtpd_relay_restrictions", "smtpd_sender_restrictions")}
    p = make_policy(sc, MAPS_TABLES)
    s = session(sender=None, helo_name="client.example.net")
    assert run(p.on_vrfy(s, "root@example.com")) is None
    assert s.recipient is None
    r = run(p.on_vrfy(s, "nosuch@example.com"))
    assert str(r) == ("550 5.1.1 <nosuch@example.com>: Recipient address rejected: "
                      "User unknown in local recipient table")
    r = run(p.on_vrfy(s, "user@other.org"))
    assert p.reject_log_line(s, r) == (
        "NOQUEUE: reject: VRFY from unknown[127.0.0.1]: 454 4.7.1 <user@other.org>: Relay access denied; "
        "to=<user@other.org> proto=ESMTP helo=<client.example.net>")


def test_bad_mynetworks_is_config_error():
    with pytest.raises(PolicyConfigError):
        make_policy({"mynetworks": "10.0.0.0/40"})


@pytest.mark.parametrize("restriction,src,expected", [
    # Postfix 3.7.11, smtpd_peername_lookup = no (client name "unknown")
    ("reject_unknown_client_hostname", "127.0.0.1",
     "450 4.7.25 Client host rejected: cannot find your hostname, [127.0.0.1]"),
    ("reject_unknown_reverse_client_hostname", "127.0.0.1",
     "450 4.7.1 Client host rejected: cannot find your reverse hostname, [127.0.0.1]"),
    ("sleep 1, reject_unauth_pipelining, permit_inet_interfaces, reject", "127.0.0.1", None),
    ("permit_inet_interfaces, reject", "127.0.0.5",
     "554 5.7.1 <unknown[127.0.0.5]>: Client host rejected: Access denied"),
])
def test_reference_client_restrictions(restriction, src, expected):
    p = make_policy({"smtpd_client_restrictions": restriction})
    assert rcpt_reply(p, "user@example.com", client_addr=src) == expected


def test_self_referencing_class_is_bounded():
    log = NullLog()
    p = make_policy({"smtpd_restriction_classes": "loop", "loop": "loop",
                     "smtpd_recipient_restrictions": "loop"}, log=log)
    assert rcpt_reply(p, "user@example.com") == "451 4.3.5 Server configuration error"
    assert any("unreasonable recursion" in line for line in log.lines)
    p = make_policy({"smtpd_recipient_restrictions": "check_recipient_access hash:/x/self"},
                    {"hash:/x/self": DictTable({"example.com": "check_recipient_access hash:/x/self"})})
    assert rcpt_reply(p, "user@example.com") == "451 4.3.5 Server configuration error"


def test_mailhost_lookup_adapter():
    from postwell.dns import FakeResolver
    from postwell.policy.dnscheck import mailhost_lookup
    fake = FakeResolver({("mx.example", "MX"): [(10, "mail.mx.example")],
                         ("a-only.example", "A"): ["192.0.2.1"],
                         ("nullmx.example", "MX"): [(0, ".")],
                         ("nodata.example", "TXT"): ["x"],
                         ("fail.example", "MX"): "SERVFAIL", ("fail.example", "A"): "SERVFAIL",
                         ("fail.example", "AAAA"): "SERVFAIL"})
    look = mailhost_lookup(fake)
    got = {d: run(look(d)) for d in ("mx.example", "a-only.example", "nullmx.example", "nodata.example",
                                     "fail.example", "nx.example")}
    assert got == {"mx.example": "ok", "a-only.example": "ok", "nullmx.example": "nullmx",
                   "nodata.example": "notfound", "fail.example": "retry", "nx.example": "notfound"}


def test_unknown_recipient_domain_nullmx():
    async def lookup(domain):
        return "nullmx"
    params = dict(BASE)
    params.update({"smtpd_recipient_restrictions": "reject_unknown_recipient_domain",
                   "smtpd_relay_restrictions": "permit"})
    params["smtpd_recipient_restrictions"] += ", reject_unauth_destination"
    cfg = Config("/nonexistent", params, {}, [])
    p = SmtpdPolicy(cfg, NullLog(), tables=TABLES, mailhost_lookup=lookup,
                    own_addresses=OwnAddresses(cfg, system_addresses=lambda: ["127.0.0.1"]))
    assert str(run(rcpt(p, session(), "x@other.org"))) == \
        "556 5.1.10 <x@other.org>: Recipient address rejected: Domain other.org does not accept mail (nullMX)"


def test_relay_before_recipient_order():
    extra = {"smtpd_relay_restrictions": "reject_unauth_destination",
             "smtpd_recipient_restrictions": "check_recipient_access hash:/x/o"}
    t = {"hash:/x/o": DictTable({"x@other.org": "REJECT custom"})}
    p = make_policy(extra, t)
    assert rcpt_reply(p, "x@other.org") == "554 5.7.1 <x@other.org>: Relay access denied"
    p = make_policy(dict(extra, smtpd_relay_before_recipient_restrictions="no"), t)
    assert rcpt_reply(p, "x@other.org") == "554 5.7.1 <x@other.org>: Recipient address rejected: custom"
