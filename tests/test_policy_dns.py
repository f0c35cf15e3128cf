"""DNS-based smtpd restrictions: DNSBL/RHSBL, permit_dnswl_client, reject_unknown_helo_hostname,
check_*_{mx,ns,a}_access and permit_mx_backup (policy/restrictions.py, policy/dnscheck.py).

Every query goes to a small name server on loopback (``StubDns`` below, answering
from a dict) through postwell_dns_servers; nothing asks DNS outside the machine.
Expected replies and log lines are the ones Postfix 3.7.11 gave for the same
configuration and zone (its resolver pointed at the same stub through a private
mount namespace; see test_reference_side_by_side).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import subprocess
import threading

import pytest

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from postwell.config.main import Config
from postwell.log import NullLog
from postwell.policy import OwnAddresses, SessionState, SmtpdPolicy
from postwell.policy.dnscheck import (SOFT, DnsChecker, DnsxlHit, TemplateError, expand_template,
                                      parse_reply_pattern, reply_matches, reverse_address_query)


class StubDns:
    """A UDP name server on loopback answering A/AAAA/TXT/MX/NS from a dict.

    ``zone`` maps (name, rtype) to a list of record texts (MX: "10 host."), or to
    "SERVFAIL".  A name that appears in any key exists (NODATA for other types);
    other names are NXDOMAIN.  ``queries`` records (name, rtype) as asked.
    """

    def __init__(self, zone: dict, host: str = "127.0.0.1", port: int = 0) -> None:
        self.zone = {(n.lower().rstrip("."), t.upper()): v for (n, t), v in zone.items()}
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, port))
        self.sock.settimeout(0.2)
        self.addr = self.sock.getsockname()
        self.queries: list[tuple[str, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def servers(self) -> str:
        return f"{self.addr[0]}:{self.addr[1]}"

    def _answer(self, wire: bytes) -> bytes | None:
        try:
            q = dns.message.from_wire(wire)
        except Exception:
            return None
        r = dns.message.make_response(q)
        r.flags |= dns.flags.AA
        if not q.question:
            r.set_rcode(dns.rcode.FORMERR)
            return r.to_wire()
        qn = q.question[0]
        name = qn.name.to_text(omit_final_dot=True).lower()
        rtype = dns.rdatatype.to_text(qn.rdtype)
        self.queries.append((name, rtype))
        value = self.zone.get((name, rtype))
        if value == "SERVFAIL":
            r.set_rcode(dns.rcode.SERVFAIL)
        elif value:
            r.answer.append(dns.rrset.from_text_list(qn.name, 60, "IN", rtype, list(value)))
        elif not any(n == name for n, _ in self.zone):
            r.set_rcode(dns.rcode.NXDOMAIN)
        # Records go out in the zone's order (dnspython shuffles them by default), so that
        # joined TXT texts are the same on every run.
        return r.to_wire(want_shuffle=False)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                wire, peer = self.sock.recvfrom(4096)
            except socket.timeout:
                continue
            except OSError:
                return
            out = self._answer(wire)
            if out is not None:
                self.sock.sendto(out, peer)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


# The zone: a DNSBL "bl.test", a DNSWL "wl.test", an RHSBL "dbl.test", host names
# for HELO and MX/NS/A access checks, and a backup-MX domain whose backup is us.
ZONE = {
    # 192.0.2.10 listed with a reason; .11 listed as 127.0.0.4 without TXT;
    # .12 listed twice with two TXT records.
    ("10.2.0.192.bl.test", "A"): ["127.0.0.2"],
    ("10.2.0.192.bl.test", "TXT"): ['"Listed, see https://bl.test/q?ip=192.0.2.10"'],
    ("11.2.0.192.bl.test", "A"): ["127.0.0.4"],
    ("12.2.0.192.bl.test", "A"): ["127.0.0.3", "127.0.0.10"],
    ("12.2.0.192.bl.test", "TXT"): ['"first"', '"second" " part"'],
    ("13.2.0.192.bl.test", "A"): "SERVFAIL",
    # 2001:db8::1 (nibble-reversed)
    ("1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.bl.test", "A"): ["127.0.0.2"],
    ("10.2.0.192.wl.test", "A"): ["127.0.9.1"],
    ("13.2.0.192.wl.test", "A"): "SERVFAIL",
    ("spammer.test.dbl.test", "A"): ["127.0.1.2"],
    ("nasty.test.dbl.test", "A"): ["127.0.1.2"],
    ("nasty.test.dbl.test", "TXT"): ['"ctl\\001 and \\195\\169 and $x"'],
    ("14.2.0.192.bl.test", "A"): ["127.0.0.2"],
    ("14.2.0.192.bl.test", "TXT"): ['"%s"' % (c * 200) for c in "abc"],
    ("spammer.test.dbl.test", "TXT"): ['"spam domain"'],
    ("badhelo.test.dbl.test", "A"): ["127.0.1.2"],
    # HELO names
    ("good.test", "A"): ["192.0.2.50"],
    ("v6only.test", "AAAA"): ["2001:db8::50"],
    ("mxonly.test", "MX"): ["10 mail.good.test."],
    ("nullmx.test", "MX"): ["0 ."],
    ("temp.test", "A"): "SERVFAIL",
    ("temp.test", "AAAA"): "SERVFAIL",
    ("temp.test", "MX"): "SERVFAIL",
    ("nodata.test", "TXT"): ['"exists"'],
    ("badhelo.test", "A"): ["192.0.2.51"],
    # MX/NS/A access
    ("spammer.test", "MX"): ["10 mx.blackhole.test."],
    ("spammer.test", "A"): ["192.0.2.60"],
    ("mx.blackhole.test", "A"): ["198.51.100.7"],
    ("ok-sender.test", "MX"): ["10 mail.good.test."],
    ("mail.good.test", "A"): ["192.0.2.52"],
    ("nsbad.test", "NS"): ["ns1.bulletproof.test."],
    ("sub.nsbad.test", "A"): ["192.0.2.53"],
    ("ns1.bulletproof.test", "A"): ["203.0.113.9"],
    ("client.good.test", "A"): ["192.0.2.20"],
    ("client.bad.test", "A"): ["198.51.100.99"],
    ("mxtemp.test", "MX"): "SERVFAIL",
    ("danglingmx.test", "MX"): ["10 nowhere.test."],
    # permit_mx_backup: us = mx.example.com (myhostname) or 127.0.0.1
    ("backup.test", "MX"): ["10 primary.other.test.", "20 mx.example.com."],
    ("backupaddr.test", "MX"): ["10 primary.other.test.", "20 backup-by-addr.test."],
    ("backup-by-addr.test", "A"): ["127.0.0.1"],
    ("primary.other.test", "A"): ["198.51.100.25"],
    ("primaryisus.test", "MX"): ["10 mx.example.com."],
    ("notus.test", "MX"): ["10 primary.other.test.", "20 other2.test."],
    ("other2.test", "A"): ["198.51.100.26"],
    ("backuptemp.test", "MX"): "SERVFAIL",
    ("danglingbackup.test", "MX"): ["10 primary.other.test.", "20 nowhere.test."],
    ("nons.test", "A"): ["192.0.2.70"],
    ("nstemp.test", "NS"): "SERVFAIL",
    ("mxhosttemp.test", "MX"): ["10 servfail-host.test."],
    ("servfail-host.test", "A"): "SERVFAIL",
    ("servfail-host.test", "AAAA"): "SERVFAIL",
}

BASE = {
    "myhostname": "mx.example.com",
    "mydomain": "example.com",
    "mydestination": "$myhostname, localhost.$mydomain, localhost, example.com",
    "mynetworks": "10.9.9.0/24",
    "inet_interfaces": "127.0.0.1",
    "inet_protocols": "ipv4",
    "relay_domains": "",
    "local_recipient_maps": "",
    "compatibility_level": "3.6",
    "smtpd_recipient_restrictions": "reject_unauth_destination",
    "smtpd_relay_restrictions": "",
}


class DictTable:
    def __init__(self, data):
        self.data = {k.lower(): v for k, v in data.items()}

    def lookup(self, key):
        return self.data.get(key.lower())


@pytest.fixture(scope="module")
def stub():
    s = StubDns(ZONE)
    yield s
    s.close()


def make_policy(stub, extra=None, tables=None):
    params = dict(BASE)
    params["postwell_dns_servers"] = stub.servers
    params.update(extra or {})
    cfg = Config("/nonexistent", params, {}, [])
    own = OwnAddresses(cfg, system_addresses=lambda: ["127.0.0.1"])
    log = NullLog()
    return SmtpdPolicy(cfg, log, tables=tables or {}, own_addresses=own), log


def session(**kw):
    s = SessionState(client_name="unknown", client_addr="192.0.2.99", client_port="40000",
                     helo_name="good.test", protocol="ESMTP", sender="s@example.org")
    for k, v in kw.items():
        setattr(s, k, v)
    return s


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


def rcpt(policy, recipient="u@example.com", **kw):
    """(reply text or None, the smtpd's reject log line or None) for one RCPT."""
    state = session(**kw)
    state.recipient = recipient
    reply = run(policy.on_rcpt(state))
    if reply is None:
        return None, None
    return str(reply), policy.reject_log_line(state, reply)


def warnings(log) -> list[str]:
    return [ln for ln in log.lines if "warning" in ln]


# ---------------------------------------------------------------------------
# Side-by-side scenarios: one configuration, each recipient mapped (by an access
# table) to the restriction under test, so one Postfix instance answers them all.

RCPT_CLASSES = {
    "rbl@example.com": "reject_rbl_client bl.test",
    "rblfilter-miss@example.com": "reject_rbl_client bl.test=127.0.0.[5..9]",
    "rblfilter-hit@example.com": "reject_rbl_client bl.test=127.0.0.[1;3..4]",
    "rblmaps@example.com": "reject_rbl_client bl.test=127.0.0.4",
    "rblmaps2@example.com": "reject_rbl_client bl.test=127.0.0.[1..3]",
    "rhsblsender@example.com": "reject_rhsbl_sender dbl.test",
    "rhsblhelo@example.com": "reject_rhsbl_helo dbl.test",
    "dnswl@example.com": "permit_dnswl_client wl.test, reject",
    "helo@example.com": "reject_unknown_helo_hostname",
    "rblwarn@example.com": "warn_if_reject reject_rbl_client bl.test",
    "helomx@example.com": "helomx",
    "clientmx@example.com": "clientmx",
    "clienta@example.com": "clienta",
    "sendermx@example.com": "sendermx",
    "senderns@example.com": "senderns",
    "senderns-name@example.com": "sendernsname",
    "sendera@example.com": "sendera",
}
# Access tables may not name tables themselves: those go through restriction classes.
CLASSES = {
    "clienta": "check_client_a_access texthash:/x/addr",
    "sendermx": "check_sender_mx_access texthash:/x/addr",
    "senderns": "check_sender_ns_access texthash:/x/addr",
    "sendernsname": "check_sender_ns_access texthash:/x/names",
    "sendera": "check_sender_a_access texthash:/x/addr",
    "helomx": "check_helo_mx_access texthash:/x/addr",
    "clientmx": "check_client_mx_access texthash:/x/addr",
}
ADDR_TABLE = {
    "198.51.100": "REJECT bad network",
    "198.51.100.7": "REJECT blackhole MX",
    "203.0.113.9": "550 5.7.1 bulletproof DNS",
    "192.0.2.60": "REJECT sender host address",
}
NAMES_TABLE = {"bulletproof.test": "REJECT hosted by bulletproof"}
RBL_REPLY_MAPS = {
    "bl.test=127.0.0.4": "$rbl_code 5.7.9 Custom: $rbl_domain lists [$rbl_what] ($client_address) "
                         "${rbl_reason?reason=$rbl_reason}${rbl_reason:no reason}, $rbl_class",
    "bl.test=127.0.0.[1..3]": "550 broken template $nosuchmacro",
}
SCENARIO_PARAMS = {
    "mydestination": "$myhostname, localhost.$mydomain, localhost, example.com",
    "smtpd_relay_restrictions": "",
    "smtpd_recipient_restrictions": "check_recipient_access texthash:/x/classes, "
                                    "permit_mx_backup, reject_unauth_destination",
    "rbl_reply_maps": "texthash:/x/rblreply",
    "smtpd_restriction_classes": " ".join(CLASSES),
    **CLASSES,
}

# (client address, client name, HELO, MAIL FROM, RCPT TO)
SCENARIOS = [
    ("192.0.2.10", "unknown", "good.test", "s@example.org", "rbl@example.com"),
    ("192.0.2.11", "unknown", "good.test", "s@example.org", "rbl@example.com"),
    ("192.0.2.12", "unknown", "good.test", "s@example.org", "rbl@example.com"),
    ("192.0.2.13", "unknown", "good.test", "s@example.org", "rbl@example.com"),
    ("192.0.2.99", "unknown", "good.test", "s@example.org", "rbl@example.com"),
    ("192.0.2.10", "unknown", "good.test", "s@example.org", "rblfilter-miss@example.com"),
    ("192.0.2.12", "unknown", "good.test", "s@example.org", "rblfilter-hit@example.com"),
    ("192.0.2.11", "unknown", "good.test", "s@example.org", "rblmaps@example.com"),
    ("192.0.2.10", "unknown", "good.test", "s@example.org", "rblmaps2@example.com"),
    ("192.0.2.99", "unknown", "good.test", "x@spammer.test", "rhsblsender@example.com"),
    ("192.0.2.99", "unknown", "badhelo.test", "s@example.org", "rhsblhelo@example.com"),
    ("192.0.2.10", "unknown", "good.test", "s@example.org", "dnswl@example.com"),
    ("192.0.2.13", "unknown", "good.test", "s@example.org", "dnswl@example.com"),
    ("192.0.2.99", "unknown", "good.test", "s@example.org", "dnswl@example.com"),
    ("192.0.2.99", "unknown", "nosuch.test", "s@example.org", "helo@example.com"),
    ("192.0.2.99", "unknown", "nodata.test", "s@example.org", "helo@example.com"),
    ("192.0.2.99", "unknown", "temp.test", "s@example.org", "helo@example.com"),
    ("192.0.2.99", "unknown", "v6only.test", "s@example.org", "helo@example.com"),
    ("192.0.2.99", "unknown", "mxonly.test", "s@example.org", "helo@example.com"),
    ("192.0.2.99", "unknown", "nullmx.test", "s@example.org", "helo@example.com"),
    ("192.0.2.99", "unknown", "[192.0.2.99]", "s@example.org", "helo@example.com"),
    ("192.0.2.99", "client.bad.test", "good.test", "s@example.org", "clienta@example.com"),
    ("192.0.2.99", "client.good.test", "good.test", "s@example.org", "clienta@example.com"),
    ("192.0.2.99", "unknown", "good.test", "x@spammer.test", "sendermx@example.com"),
    ("192.0.2.99", "unknown", "good.test", "x@ok-sender.test", "sendermx@example.com"),
    ("192.0.2.99", "unknown", "good.test", "x@mxtemp.test", "sendermx@example.com"),
    ("192.0.2.99", "unknown", "good.test", "x@danglingmx.test", "sendermx@example.com"),
    ("192.0.2.99", "unknown", "good.test", "x@[198.51.100.7]", "sendermx@example.com"),
    ("192.0.2.99", "unknown", "good.test", "x@sub.nsbad.test", "senderns@example.com"),
    ("192.0.2.99", "unknown", "good.test", "x@sub.nsbad.test", "senderns-name@example.com"),
    ("192.0.2.99", "unknown", "good.test", "x@spammer.test", "sendera@example.com"),
    ("192.0.2.99", "unknown", "good.test", "s@example.org", "u@backup.test"),
    ("192.0.2.99", "unknown", "good.test", "s@example.org", "u@backupaddr.test"),
    ("192.0.2.99", "unknown", "good.test", "s@example.org", "u@primaryisus.test"),
    ("192.0.2.99", "unknown", "good.test", "s@example.org", "u@notus.test"),
    ("192.0.2.99", "unknown", "good.test", "s@example.org", "u@backuptemp.test"),
    ("192.0.2.99", "unknown", "good.test", "s@example.org", "u@danglingbackup.test"),
    ("192.0.2.99", "unknown", "good.test", "s@example.org", "u@nxdomain.test"),
    ("192.0.2.99", "unknown", "good.test.", "s@example.org", "helo@example.com"),
    ("192.0.2.99", "unknown", "GOOD.TEST", "s@example.org", "helo@example.com"),
    ("192.0.2.99", "unknown", "bad..name", "s@example.org", "helo@example.com"),
    ("192.0.2.99", "unknown", "192.0.2.1", "s@example.org", "helo@example.com"),
    ("192.0.2.99", "unknown", "[1.2.3]", "s@example.org", "helo@example.com"),
    ("192.0.2.99", "unknown", "good.test", "x@SPAMMER.TEST", "rhsblsender@example.com"),
    ("192.0.2.99", "unknown", "good.test", "x@spammer.test.", "rhsblsender@example.com"),
    ("192.0.2.99", "unknown", "BADHELO.test", "s@example.org", "rhsblhelo@example.com"),
    ("192.0.2.99", "unknown", "good.test", "x@nons.test", "senderns@example.com"),
    ("192.0.2.99", "unknown", "good.test", "x@good.test", "senderns@example.com"),
    ("192.0.2.99", "unknown", "good.test", "x@nxdomain.test", "sendera@example.com"),
    ("192.0.2.99", "unknown", "good.test", "x@nxdomain.test", "sendermx@example.com"),
    ("192.0.2.99", "client.bad.test", "good.test", "s@example.org", "rbl@example.com"),
    ("192.0.2.10", "unknown", "good.test", "s@example.org", "rblwarn@example.com"),
    ("192.0.2.14", "unknown", "good.test", "s@example.org", "rbl@example.com"),
    ("192.0.2.99", "unknown", "good.test", "x@nasty.test", "rhsblsender@example.com"),
    ("192.0.2.99", "unknown", "[198.51.100.7]", "s@example.org", "helomx@example.com"),
    ("192.0.2.99", "unknown", "spammer.test", "s@example.org", "helomx@example.com"),
    ("192.0.2.99", "unknown", "good.test", "x@nstemp.test", "senderns@example.com"),
    ("192.0.2.99", "unknown", "good.test", "x@mxhosttemp.test", "sendermx@example.com"),
    ("192.0.2.99", "client.good.test", "good.test", "s@example.org", "clientmx@example.com"),
    ("192.0.2.99", "spammer.test", "good.test", "s@example.org", "clientmx@example.com"),
]

# What Postfix 3.7.11 answered to each of SCENARIOS (see test_reference_side_by_side): the
# RCPT reply (None: 250) and the smtpd's warning and NOQUEUE lines, in order.
REFERENCE = [
    ('554 5.7.1 Service unavailable; Client host [192.0.2.10] blocked using bl.test; Listed, see https://bl.test/q?ip=192.0.2.10',
     ['NOQUEUE: reject: RCPT from unknown[192.0.2.10]: 554 5.7.1 Service unavailable; Client host [192.0.2.10] blocked using bl.test; Listed, see https://bl.test/q?ip=192.0.2.10; from=<s@example.org> to=<rbl@example.com> proto=ESMTP helo=<good.test>']),
    ('554 5.7.1 Service unavailable; Client host [192.0.2.11] blocked using bl.test',
     ['NOQUEUE: reject: RCPT from unknown[192.0.2.11]: 554 5.7.1 Service unavailable; Client host [192.0.2.11] blocked using bl.test; from=<s@example.org> to=<rbl@example.com> proto=ESMTP helo=<good.test>']),
    ('554 5.7.1 Service unavailable; Client host [192.0.2.12] blocked using bl.test; first / second',
     ['NOQUEUE: reject: RCPT from unknown[192.0.2.12]: 554 5.7.1 Service unavailable; Client host [192.0.2.12] blocked using bl.test; first / second; from=<s@example.org> to=<rbl@example.com> proto=ESMTP helo=<good.test>']),
    (None,
     ['warning: 13.2.0.192.bl.test: RBL lookup error: Host or domain name not found. Name service error for name=13.2.0.192.bl.test type=A: Host not found, try again']),
    (None,
     []),
    (None,
     []),
    ('554 5.7.1 Service unavailable; Client host [192.0.2.12] blocked using bl.test; first / second',
     ['NOQUEUE: reject: RCPT from unknown[192.0.2.12]: 554 5.7.1 Service unavailable; Client host [192.0.2.12] blocked using bl.test; first / second; from=<s@example.org> to=<rblfilter-hit@example.com> proto=ESMTP helo=<good.test>']),
    ('554 5.7.9 Custom: bl.test lists [192.0.2.11] (192.0.2.11) no reason, Client host',
     ['NOQUEUE: reject: RCPT from unknown[192.0.2.11]: 554 5.7.9 Custom: bl.test lists [192.0.2.11] (192.0.2.11) no reason, Client host; from=<s@example.org> to=<rblmaps@example.com> proto=ESMTP helo=<good.test>']),
    ('554 5.7.1 Service unavailable; Client host [192.0.2.10] blocked using bl.test; Listed, see https://bl.test/q?ip=192.0.2.10',
     ['warning: unknown macro name "nosuchmacro" in expansion request', 'warning: rbl_reject_reply: bad rbl reply template for domain bl.test=127.0.0.[1..3]: 550 broken template $nosuchmacro', 'NOQUEUE: reject: RCPT from unknown[192.0.2.10]: 554 5.7.1 Service unavailable; Client host [192.0.2.10] blocked using bl.test; Listed, see https://bl.test/q?ip=192.0.2.10; from=<s@example.org> to=<rblmaps2@example.com> proto=ESMTP helo=<good.test>']),
    ('554 5.7.1 Service unavailable; Sender address [x@spammer.test] blocked using dbl.test; spam domain',
     ['NOQUEUE: reject: RCPT from unknown[192.0.2.99]: 554 5.7.1 Service unavailable; Sender address [x@spammer.test] blocked using dbl.test; spam domain; from=<x@spammer.test> to=<rhsblsender@example.com> proto=ESMTP helo=<good.test>']),
    ('554 5.7.1 Service unavailable; Helo command [badhelo.test] blocked using dbl.test',
     ['NOQUEUE: reject: RCPT from unknown[192.0.2.99]: 554 5.7.1 Service unavailable; Helo command [badhelo.test] blocked using dbl.test; from=<s@example.org> to=<rhsblhelo@example.com> proto=ESMTP helo=<badhelo.test>']),
    (None,
     []),
    ('450 4.7.1 <192.0.2.13>: Client host rejected: Service unavailable',
     ['warning: 13.2.0.192.wl.test: RBL lookup error: Host or domain name not found. Name service error for name=13.2.0.192.wl.test type=A: Host not found, try again', 'NOQUEUE: reject: RCPT from unknown[192.0.2.13]: 450 4.7.1 <192.0.2.13>: Client host rejected: Service unavailable; from=<s@example.org> to=<dnswl@example.com> proto=ESMTP helo=<good.test>']),
    ('554 5.7.1 <dnswl@example.com>: Recipient address rejected: Access denied',
     ['NOQUEUE: reject: RCPT from unknown[192.0.2.99]: 554 5.7.1 <dnswl@example.com>: Recipient address rejected: Access denied; from=<s@example.org> to=<dnswl@example.com> proto=ESMTP helo=<good.test>']),
    ('450 4.7.1 <nosuch.test>: Helo command rejected: Host not found',
     ['NOQUEUE: reject: RCPT from unknown[192.0.2.99]: 450 4.7.1 <nosuch.test>: Helo command rejected: Host not found; from=<s@example.org> to=<helo@example.com> proto=ESMTP helo=<nosuch.test>']),
    ('450 4.7.1 <nodata.test>: Helo command rejected: Host not found',
     ['NOQUEUE: reject: RCPT from unknown[192.0.2.99]: 450 4.7.1 <nodata.test>: Helo command rejected: Host not found; from=<s@example.org> to=<helo@example.com> proto=ESMTP helo=<nodata.test>']),
    ('450 4.7.1 <temp.test>: Helo command rejected: Host not found',
     ['NOQUEUE: reject: RCPT from unknown[192.0.2.99]: 450 4.7.1 <temp.test>: Helo command rejected: Host not found; from=<s@example.org> to=<helo@example.com> proto=ESMTP helo=<temp.test>']),
    (None,
     []),
    (None,
     []),
    (None,
     []),
    (None,
     []),
    ('554 5.7.1 <client.bad.test[192.0.2.99]>: Client host rejected: bad network',
     ['NOQUEUE: reject: RCPT from client.bad.test[192.0.2.99]: 554 5.7.1 <client.bad.test[192.0.2.99]>: Client host rejected: bad network; from=<s@example.org> to=<clienta@example.com> proto=ESMTP helo=<good.test>']),
    (None,
     []),
    ('554 5.7.1 <x@spammer.test>: Sender address rejected: blackhole MX',
     ['NOQUEUE: reject: RCPT from unknown[192.0.2.99]: 554 5.7.1 <x@spammer.test>: Sender address rejected: blackhole MX; from=<x@spammer.test> to=<sendermx@example.com> proto=ESMTP helo=<good.test>']),
    (None,
     []),
    (None,
     ['warning: Unable to look up MX host for mxtemp.test: Host not found, try again']),
    (None,
     ['warning: Unable to look up MX host nowhere.test for Sender address x@danglingmx.test: Name or service not known']),
    ('554 5.7.1 <x@[198.51.100.7]>: Sender address rejected: blackhole MX',
     ['NOQUEUE: reject: RCPT from unknown[192.0.2.99]: 554 5.7.1 <x@[198.51.100.7]>: Sender address rejected: blackhole MX; from=<x@[198.51.100.7]> to=<sendermx@example.com> proto=ESMTP helo=<good.test>']),
    ('550 5.7.1 <x@sub.nsbad.test>: Sender address rejected: bulletproof DNS',
     ['NOQUEUE: reject: RCPT from unknown[192.0.2.99]: 550 5.7.1 <x@sub.nsbad.test>: Sender address rejected: bulletproof DNS; from=<x@sub.nsbad.test> to=<senderns@example.com> proto=ESMTP helo=<good.test>']),
    ('554 5.7.1 <x@sub.nsbad.test>: Sender address rejected: hosted by bulletproof',
     ['NOQUEUE: reject: RCPT from unknown[192.0.2.99]: 554 5.7.1 <x@sub.nsbad.test>: Sender address rejected: hosted by bulletproof; from=<x@sub.nsbad.test> to=<senderns-name@example.com> proto=ESMTP helo=<good.test>']),
    ('554 5.7.1 <x@spammer.test>: Sender address rejected: sender host address',
     ['NOQUEUE: reject: RCPT from unknown[192.0.2.99]: 554 5.7.1 <x@spammer.test>: Sender address rejected: sender host address; from=<x@spammer.test> to=<sendera@example.com> proto=ESMTP helo=<good.test>']),
    (None,
     []),
    (None,
     []),
    ('554 5.7.1 <u@primaryisus.test>: Relay access denied',
     ['NOQUEUE: reject: RCPT from unknown[192.0.2.99]: 554 5.7.1 <u@primaryisus.test>: Relay access denied; from=<s@example.org> to=<u@primaryisus.test> proto=ESMTP helo=<good.test>']),
    ('554 5.7.1 <u@notus.test>: Relay access denied',
     ['NOQUEUE: reject: RCPT from unknown[192.0.2.99]: 554 5.7.1 <u@notus.test>: Relay access denied; from=<s@example.org> to=<u@notus.test> proto=ESMTP helo=<good.test>']),
    ('450 4.4.4 <u@backuptemp.test>: Recipient address rejected: Unable to look up mail exchanger information: Host not found, try again',
     ['NOQUEUE: reject: RCPT from unknown[192.0.2.99]: 450 4.4.4 <u@backuptemp.test>: Recipient address rejected: Unable to look up mail exchanger information: Host not found, try again; from=<s@example.org> to=<u@backuptemp.test> proto=ESMTP helo=<good.test>']),
    ('450 4.4.4 <u@danglingbackup.test>: Recipient address rejected: Unable to look up mail exchanger host nowhere.test: Name or service not known',
     ['NOQUEUE: reject: RCPT from unknown[192.0.2.99]: 450 4.4.4 <u@danglingbackup.test>: Recipient address rejected: Unable to look up mail exchanger host nowhere.test: Name or service not known; from=<s@example.org> to=<u@danglingbackup.test> proto=ESMTP helo=<good.test>']),
    ('554 5.7.1 <u@nxdomain.test>: Relay access denied',
     ['NOQUEUE: reject: RCPT from unknown[192.0.2.99]: 554 5.7.1 <u@nxdomain.test>: Relay access denied; from=<s@example.org> to=<u@nxdomain.test> proto=ESMTP helo=<good.test>']),
    ('450 4.7.1 <good.test.>: Helo command rejected: Host not found',
     ['NOQUEUE: reject: RCPT from unknown[192.0.2.99]: 450 4.7.1 <good.test.>: Helo command rejected: Host not found; from=<s@example.org> to=<helo@example.com> proto=ESMTP helo=<good.test.>']),
    (None,
     []),
    ('450 4.7.1 <bad..name>: Helo command rejected: Host not found',
     ['NOQUEUE: reject: RCPT from unknown[192.0.2.99]: 450 4.7.1 <bad..name>: Helo command rejected: Host not found; from=<s@example.org> to=<helo@example.com> proto=ESMTP helo=<bad..name>']),
    ('450 4.7.1 <192.0.2.1>: Helo command rejected: Host not found',
     ['NOQUEUE: reject: RCPT from unknown[192.0.2.99]: 450 4.7.1 <192.0.2.1>: Helo command rejected: Host not found; from=<s@example.org> to=<helo@example.com> proto=ESMTP helo=<192.0.2.1>']),
    ('501 5.5.2 <[1.2.3]>: Helo command rejected: invalid ip address',
     ['NOQUEUE: reject: RCPT from unknown[192.0.2.99]: 501 5.5.2 <[1.2.3]>: Helo command rejected: invalid ip address; from=<s@example.org> to=<helo@example.com> proto=ESMTP helo=<[1.2.3]>']),
    ('554 5.7.1 Service unavailable; Sender address [x@SPAMMER.TEST] blocked using dbl.test; spam domain',
     ['NOQUEUE: reject: RCPT from unknown[192.0.2.99]: 554 5.7.1 Service unavailable; Sender address [x@SPAMMER.TEST] blocked using dbl.test; spam domain; from=<x@SPAMMER.TEST> to=<rhsblsender@example.com> proto=ESMTP helo=<good.test>']),
    (None,
     []),
    ('554 5.7.1 Service unavailable; Helo command [BADHELO.test] blocked using dbl.test',
     ['NOQUEUE: reject: RCPT from unknown[192.0.2.99]: 554 5.7.1 Service unavailable; Helo command [BADHELO.test] blocked using dbl.test; from=<s@example.org> to=<rhsblhelo@example.com> proto=ESMTP helo=<BADHELO.test>']),
    (None,
     ['warning: Unable to look up NS host for x@nons.test: Host not found']),
    (None,
     ['warning: Unable to look up NS host for x@good.test: Host not found']),
    (None,
     []),
    (None,
     ['warning: Unable to look up MX host nxdomain.test for Sender address x@nxdomain.test: Name or service not known']),
    (None,
     []),
    (None,
     ['NOQUEUE: reject_warning: RCPT from unknown[192.0.2.10]: 554 5.7.1 Service unavailable; Client host [192.0.2.10] blocked using bl.test; Listed, see https://bl.test/q?ip=192.0.2.10; from=<s@example.org> to=<rblwarn@example.com> proto=ESMTP helo=<good.test>']),
    ('554 5.7.1 Service unavailable; Client host [192.0.2.14] blocked using bl.test; aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa / bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb / cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc',
     ['NOQUEUE: reject: RCPT from unknown[192.0.2.14]: 554 5.7.1 Service unavailable; Client host [192.0.2.14] blocked using bl.test; aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa / bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb / cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc; from=<s@example.org> to=<rbl@example.com> proto=ESMTP helo=<good.test>']),
    ('554 5.7.1 Service unavailable; Sender address [x@nasty.test] blocked using dbl.test; ctl  and    and $x',
     ['NOQUEUE: reject: RCPT from unknown[192.0.2.99]: 554 5.7.1 Service unavailable; Sender address [x@nasty.test] blocked using dbl.test; ctl  and    and $x; from=<x@nasty.test> to=<rhsblsender@example.com> proto=ESMTP helo=<good.test>']),
    ('554 5.7.1 <[198.51.100.7]>: Helo command rejected: blackhole MX',
     ['NOQUEUE: reject: RCPT from unknown[192.0.2.99]: 554 5.7.1 <[198.51.100.7]>: Helo command rejected: blackhole MX; from=<s@example.org> to=<helomx@example.com> proto=ESMTP helo=<[198.51.100.7]>']),
    ('554 5.7.1 <spammer.test>: Helo command rejected: blackhole MX',
     ['NOQUEUE: reject: RCPT from unknown[192.0.2.99]: 554 5.7.1 <spammer.test>: Helo command rejected: blackhole MX; from=<s@example.org> to=<helomx@example.com> proto=ESMTP helo=<spammer.test>']),
    (None,
     ['warning: Unable to look up NS host for nstemp.test: Host not found, try again']),
    (None,
     ['warning: Unable to look up MX host servfail-host.test for Sender address x@mxhosttemp.test: Temporary failure in name resolution']),
    (None,
     []),
    ('554 5.7.1 <spammer.test[192.0.2.99]>: Client host rejected: blackhole MX',
     ['NOQUEUE: reject: RCPT from spammer.test[192.0.2.99]: 554 5.7.1 <spammer.test[192.0.2.99]>: Client host rejected: blackhole MX; from=<s@example.org> to=<clientmx@example.com> proto=ESMTP helo=<good.test>']),
]


def scenario_tables():
    return {"texthash:/x/classes": DictTable(RCPT_CLASSES), "texthash:/x/addr": DictTable(ADDR_TABLE),
            "texthash:/x/names": DictTable(NAMES_TABLE),
            "texthash:/x/rblreply": DictTable(RBL_REPLY_MAPS)}


def run_scenario(stub, scenario):
    addr, name, helo, sender, recipient = scenario
    policy, log = make_policy(stub, SCENARIO_PARAMS, scenario_tables())
    reply, line = rcpt(policy, recipient, client_addr=addr, client_name=name, helo_name=helo,
                       sender=sender)
    return reply, warnings(log) + ([line] if line else [])


@pytest.mark.parametrize("index", range(len(SCENARIOS)),
                         ids=[f"{s[4].split('@')[0]}-{s[0]}-{s[2]}-{s[3]}" for s in SCENARIOS])
def test_same_replies_and_log_lines_as_postfix(stub, index):
    assert run_scenario(stub, SCENARIOS[index]) == REFERENCE[index]


# ---------------------------------------------------------------------------
# Details

def test_reverse_address_queries():
    assert reverse_address_query("192.0.2.10") == "10.2.0.192."
    # RFC 5782 2.4: 32 nibbles, least significant first.
    assert reverse_address_query("2001:db8::1") == "1." + "0." * 23 + "8.b.d.0.1.0.0.2."


def test_ipv6_client_is_looked_up_by_nibbles(stub):
    # Postfix 3.7 with inet_protocols = all (XCLIENT ADDR=IPV6:2001:db8::1) gave this reply and
    # "NOQUEUE: reject: RCPT from unknown[2001:db8::1]: 554 5.7.1 Service unavailable; ...".
    policy, log = make_policy(stub, {"smtpd_client_restrictions": "reject_rbl_client bl.test"})
    reply, line = rcpt(policy, client_addr="2001:db8::1")
    assert reply == "554 5.7.1 Service unavailable; Client host [2001:db8::1] blocked using bl.test"
    assert line.startswith("NOQUEUE: reject: RCPT from unknown[2001:db8::1]: 554 5.7.1 Service")


@pytest.mark.parametrize("pattern,addresses,match", [
    ("127.0.0.2", ["127.0.0.2"], True),
    ("127.0.0.2", ["127.0.0.3"], False),
    ("127.0.0.[2..11]", ["127.0.0.11"], True),
    ("127.0.0.[2..11]", ["127.0.0.12"], False),
    ("127.0.[0;1].[2;4..5]", ["127.0.1.5"], True),
    ("127.0.[0;1].[2;4..5]", ["127.0.1.3", "127.0.2.2"], False),
    ("127.[0..255].0.2", ["127.9.0.2"], True),
])
def test_reply_filters(pattern, addresses, match):
    assert reply_matches(parse_reply_pattern(pattern), addresses) is match


@pytest.mark.parametrize("bad", ["127.0.0", "127.0.0.2.1", "127.0.0.256", "127.0.0.[5..2]",
                                 "127.0.0.[2", "127.0.0.x", ""])
def test_bad_reply_filters(bad):
    with pytest.raises(ValueError):
        parse_reply_pattern(bad)


def test_bad_reply_filter_is_a_server_error(stub):
    policy, log = make_policy(stub, {"smtpd_client_restrictions": "reject_rbl_client bl.test=127.0.0"})
    reply, line = rcpt(policy, client_addr="192.0.2.10")
    assert reply == "451 4.3.5 Server configuration error"
    assert any("RBL reply error" in w for w in warnings(log))


def test_template_expansion():
    values = {"a": "A", "empty": "", "bad": "x\x80y"}
    look = values.get
    assert expand_template("$a ${a} $(a) $$ ${a?yes} ${empty?no}${empty:dflt} ${a:no}", look,
                           None) == "A A A $ yes dflt "
    assert expand_template("${a?{x $a}:{y}}|${empty?{x}:{y $a}}", look, None) == "x A|y A"
    # Values, not the template, go through the expansion filter.
    assert expand_template("é$bad", look, "xy") == "éx_y"
    for bad in ("$nosuch", "${nosuch}", "${a", "${a!x}"):
        with pytest.raises(TemplateError):
            expand_template(bad, look, None)


def test_rbl_reply_maps_and_macros(stub):
    tables = {"texthash:/x/rr": DictTable({
        "bl.test": "451 4.7.0 $rbl_class $rbl_what via $rbl_domain; $client_name|$helo_name|"
                   "$sender|$sender_name|$sender_domain|$recipient_domain|$rbl_txt"})}
    policy, log = make_policy(stub, {"smtpd_client_restrictions": "reject_rbl_client bl.test",
                                     "rbl_reply_maps": "texthash:/x/rr"}, tables)
    reply, _ = rcpt(policy, "r@example.com", client_addr="192.0.2.11", client_name="c.test",
                    sender="")
    assert reply == ("451 4.7.0 Client host 192.0.2.11 via bl.test; c.test|good.test|<>|<>||"
                     "example.com|")


def test_rbl_code_and_bad_reply_code(stub):
    tables = {"texthash:/x/rr": DictTable({"bl.test": "250 not a reject"})}
    policy, log = make_policy(stub, {"smtpd_client_restrictions": "reject_rbl_client bl.test",
                                     "maps_rbl_reject_code": "550"})
    assert rcpt(policy, client_addr="192.0.2.11")[0] == \
        "550 5.7.1 Service unavailable; Client host [192.0.2.11] blocked using bl.test"
    policy, log = make_policy(stub, {"smtpd_client_restrictions": "reject_rbl_client bl.test",
                                     "rbl_reply_maps": "texthash:/x/rr"}, tables)
    assert rcpt(policy, client_addr="192.0.2.11")[0] == "450 4.7.1 Service unavailable"
    assert "warning: rbl response code configuration error: 250 not a reject" in log.lines


def test_rbl_answers_are_cached_per_process(stub):
    policy, log = make_policy(stub, {"smtpd_client_restrictions": "reject_rbl_client bl.test"})
    before = stub.queries.count(("13.2.0.192.bl.test", "A"))
    for _ in range(3):
        assert rcpt(policy, client_addr="192.0.2.13")[0] is None
    assert stub.queries.count(("13.2.0.192.bl.test", "A")) == before + 1
    # The temporary failure is logged once, as Postfix logs it once per cached lookup.
    assert sum("RBL lookup error" in w for w in warnings(log)) == 1


def test_cache_expires_with_injected_clock(stub):
    now = [1000.0]
    from postwell.dns import DnsPythonResolver
    checker = DnsChecker(DnsPythonResolver([("127.0.0.1", stub.addr[1])]), clock=lambda: now[0],
                         cache_ttl=10)

    async def twice():
        a = await checker.dnsxl("10.2.0.192.bl.test")
        now[0] += 11
        b = await checker.dnsxl("10.2.0.192.bl.test")
        return a, b
    before = stub.queries.count(("10.2.0.192.bl.test", "A"))
    a, b = run(twice())
    assert isinstance(a, DnsxlHit) and a == b and a.addresses == ("127.0.0.2",)
    assert stub.queries.count(("10.2.0.192.bl.test", "A")) == before + 2


def test_concurrent_sessions_share_one_query(stub):
    from postwell.dns import DnsPythonResolver
    checker = DnsChecker(DnsPythonResolver([("127.0.0.1", stub.addr[1])]))
    before = stub.queries.count(("12.2.0.192.bl.test", "A"))

    async def many():
        return await asyncio.gather(*(checker.dnsxl("12.2.0.192.bl.test") for _ in range(5)))
    results = run(many())
    assert len(set(results)) == 1 and results[0].txt in ("first / second", "second / first")
    assert stub.queries.count(("12.2.0.192.bl.test", "A")) == before + 1


def test_soft_failure_is_soft(stub):
    from postwell.dns import DnsPythonResolver
    checker = DnsChecker(DnsPythonResolver([("127.0.0.1", stub.addr[1])]), log=NullLog())
    assert run(checker.dnsxl("13.2.0.192.bl.test")) == SOFT
    assert run(checker.dnsxl("99.2.0.192.bl.test")) is None


def test_rhsbl_skips_numeric_and_literal_domains(stub):
    policy, log = make_policy(stub, {"smtpd_sender_restrictions": "reject_rhsbl_sender dbl.test",
                                     "smtpd_helo_restrictions": "reject_rhsbl_helo dbl.test"})
    before = len(stub.queries)
    assert rcpt(policy, sender="x@[192.0.2.1]", helo_name="192.0.2.1")[0] is None
    assert rcpt(policy, sender="", helo_name="foo.123")[0] is None
    assert len(stub.queries) == before


def test_rhsbl_client_and_reverse_client(stub):
    policy, log = make_policy(stub, {
        "smtpd_client_restrictions": "reject_rhsbl_reverse_client dbl.test, "
                                     "reject_rhsbl_client dbl.test"})
    assert rcpt(policy, client_name="spammer.test")[0] == \
        "554 5.7.1 Service unavailable; Client host [spammer.test] blocked using dbl.test; spam domain"
    assert rcpt(policy, reverse_client_name="spammer.test")[0] == (
        "554 5.7.1 Service unavailable; Unverified Client host [spammer.test] blocked using "
        "dbl.test; spam domain")


def test_rhsbl_recipient(stub):
    policy, log = make_policy(stub, {
        "smtpd_recipient_restrictions": "reject_rhsbl_recipient dbl.test, reject_unauth_destination"})
    assert rcpt(policy, "who@spammer.test")[0] == (
        "554 5.7.1 Service unavailable; Recipient address [who@spammer.test] blocked using "
        "dbl.test; spam domain")


def test_permit_rhswl_client(stub):
    zone_policy, log = make_policy(stub, {
        "smtpd_client_restrictions": "permit_rhswl_client dbl.test, reject"})
    assert rcpt(zone_policy, client_name="spammer.test")[0] is None
    assert rcpt(zone_policy, client_name="client.good.test")[0] == \
        "554 5.7.1 <client.good.test[192.0.2.99]>: Client host rejected: Access denied"


def test_dnswl_never_permits_relaying(stub):
    policy, log = make_policy(stub, {
        "smtpd_recipient_restrictions": "permit_dnswl_client wl.test, reject_unauth_destination"})
    assert rcpt(policy, "u@elsewhere.test", client_addr="192.0.2.10")[0] == \
        "554 5.7.1 <u@elsewhere.test>: Relay access denied"


def test_missing_domain_argument(stub):
    policy, log = make_policy(stub, {"smtpd_client_restrictions": "reject_rbl_client"})
    assert rcpt(policy, client_addr="192.0.2.10")[0] is None
    assert "warning: restriction reject_rbl_client requires domain name argument" in log.lines


def test_unknown_helo_tempfail_action_defer(stub):
    policy, log = make_policy(stub, {"smtpd_helo_restrictions": "reject_unknown_helo_hostname",
                                     "unknown_helo_hostname_tempfail_action": "defer"})
    assert rcpt(policy, helo_name="temp.test")[0] == \
        "450 4.7.1 <temp.test>: Helo command rejected: Host not found"
    # defer_if_permit (the default): a later reject wins over the deferral.
    policy, log = make_policy(stub, {"smtpd_helo_restrictions": "reject_unknown_helo_hostname",
                                     "smtpd_sender_restrictions": "reject"})
    assert rcpt(policy, helo_name="temp.test")[0] == \
        "554 5.7.1 <s@example.org>: Sender address rejected: Access denied"


def test_unknown_helo_reject_code_and_legacy_name(stub):
    policy, log = make_policy(stub, {"smtpd_helo_restrictions": "reject_unknown_hostname",
                                     "unknown_hostname_reject_code": "550"})
    assert rcpt(policy, helo_name="nosuch.test")[0] == \
        "550 5.7.1 <nosuch.test>: Helo command rejected: Host not found"
    # Malformed names are not asked about: "not found" at once.
    before = len(stub.queries)
    assert rcpt(policy, helo_name="bad..name")[0] == \
        "550 5.7.1 <bad..name>: Helo command rejected: Host not found"
    assert len(stub.queries) == before


def test_server_access_ok_is_forbidden(stub):
    tables = {"texthash:/x/ok": DictTable({"198.51.100.7": "OK"})}
    policy, log = make_policy(stub, {"smtpd_sender_restrictions": "check_sender_mx_access texthash:/x/ok"},
                              tables)
    assert rcpt(policy, sender="x@spammer.test")[0] == "451 4.3.5 Server configuration error"
    assert "warning: restriction check_sender_mx_access returns OK for x@spammer.test" in log.lines


def test_helo_and_recipient_server_access(stub):
    tables = {"texthash:/x/a": DictTable(ADDR_TABLE), "texthash:/x/n": DictTable({
        "mx.blackhole.test": "REJECT MX by name"})}
    policy, log = make_policy(stub, {
        "smtpd_helo_restrictions": "check_helo_a_access texthash:/x/a",
        "smtpd_recipient_restrictions": "check_recipient_mx_access texthash:/x/n, "
                                        "reject_unauth_destination"}, tables)
    assert rcpt(policy, helo_name="client.bad.test")[0] == \
        "554 5.7.1 <client.bad.test>: Helo command rejected: bad network"
    assert rcpt(policy, "x@spammer.test")[0] == \
        "554 5.7.1 <x@spammer.test>: Recipient address rejected: MX by name"


def test_permit_mx_backup_networks(stub):
    allowed, log = make_policy(stub, {"smtpd_recipient_restrictions":
                                      "permit_mx_backup, reject_unauth_destination",
                                      "permit_mx_backup_networks": "198.51.100.0/24"})
    assert rcpt(allowed, "u@backup.test")[0] is None
    refused, log = make_policy(stub, {"smtpd_recipient_restrictions":
                                      "permit_mx_backup, reject_unauth_destination",
                                      "permit_mx_backup_networks": "203.0.113.0/24"})
    assert rcpt(refused, "u@backup.test")[0] == "554 5.7.1 <u@backup.test>: Relay access denied"


def test_no_dns_package_means_no_dns_restrictions(stub):
    policy, log = make_policy(stub, {"smtpd_helo_restrictions": "reject_unknown_helo_hostname"})
    policy.engine.dns_checker = None
    policy.engine._dns_checker_tried = True
    assert rcpt(policy, helo_name="nosuch.test")[0] is None


# ---------------------------------------------------------------------------
# The reference itself: the same scenarios against Postfix 3.7 whose resolver
# sees the stub (private mount namespace with a bind-mounted resolv.conf).

def test_reference_side_by_side(tmp_path):
    import harness
    if harness.reference_available() or shutil.which("unshare") is None:
        pytest.skip("needs the reference Postfix, root and unshare(1)")
    # A resolv.conf names port 53 only: the stub takes a fixed address of its own.
    with harness.machine_lock("policy-dns-reference"):
        _reference_side_by_side(tmp_path, "127.0.7.53")


def _reference_side_by_side(tmp_path, ns):
    import harness
    try:
        stub = StubDns(ZONE, host=ns, port=53)
    except OSError as e:
        pytest.skip(f"cannot bind {ns}:53: {e}")

    class Reference(harness.ReferencePostfix):
        def postfix(self, *args, timeout=60.0, check=False):
            if args[:1] != ("start",):
                return super().postfix(*args, timeout=timeout, check=check)
            resolv = self.root / "resolv.conf"
            resolv.write_text(f"nameserver {ns}\noptions attempts:1 timeout:1\n")
            script = ('mount --bind "$1" /etc/resolv.conf && grep -qx "nameserver $2" '
                      '/etc/resolv.conf && exec "$3" -c "$4" start')
            cmd = ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh",
                   str(resolv), ns, harness.POSTFIX_BIN, str(self.config_dir)]
            return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                  stdin=subprocess.DEVNULL, check=check)

    files = tmp_path / "maps"
    files.mkdir()
    paths = {}
    for name, table in (("classes", RCPT_CLASSES), ("addr", ADDR_TABLE), ("names", NAMES_TABLE),
                        ("rblreply", RBL_REPLY_MAPS)):
        (files / name).write_text("".join(f"{k} {v}\n" for k, v in table.items()))
        paths[f"/x/{name}"] = str(files / name)
    os.chmod(tmp_path, 0o755)
    os.chmod(files, 0o755)
    extra = {"myhostname": "mx.example.com", "mydomain": "example.com", "mynetworks": "10.9.9.0/24",
             "smtpd_authorized_xclient_hosts": "127.0.0.0/8", "disable_dns_lookups": "no"}
    for k, v in SCENARIO_PARAMS.items():
        for short, full in paths.items():
            v = v.replace(short, full)
        extra[k] = v
    ref = Reference(tmp_path, extra)
    try:
        ref.start()
        for index, (addr, name, helo, sender, recipient) in enumerate(SCENARIOS):
            start = len(ref.log_text())
            replies = harness.dialogue(ref.port, [
                "EHLO client.example", f"XCLIENT ADDR={addr} NAME={name}", f"EHLO {helo}",
                f"MAIL FROM:<{sender}>", f"RCPT TO:<{recipient}>", "QUIT"])
            got = str(replies[5])
            harness.wait_for(lambda: ref.log_text().count("disconnect from", start) >= 1, 10)
            lines = [re.sub(r"^.*?postfix/smtpd\[\d+\]: ", "", ln)
                     for ln in ref.log_text()[start:].splitlines()
                     if "postfix/smtpd" in ln and ("NOQUEUE" in ln or "warning" in ln)]
            expected_reply, expected_lines = REFERENCE[index]
            assert (None if got.startswith("250") else got, lines) == \
                (expected_reply, expected_lines), SCENARIOS[index]
    finally:
        ref.stop()
        stub.close()


def test_reject_maps_rbl_legacy(stub):
    policy, log = make_policy(stub, {"smtpd_client_restrictions": "reject_maps_rbl",
                                     "maps_rbl_domains": "none.test, bl.test"})
    assert rcpt(policy, client_addr="192.0.2.11")[0] == \
        "554 5.7.1 Service unavailable; Client host [192.0.2.11] blocked using bl.test"
    assert rcpt(policy, client_addr="192.0.2.11")[0] is not None
    assert sum("reject_maps_rbl" in w for w in warnings(log)) == 1


def test_postwell_smtpd_end_to_end(tmp_path):
    """The real smtpd (workers running as mail_owner) asks the stub and logs Postfix's line."""
    import harness
    zone = dict(ZONE)
    zone[("1.0.0.127.bl.test", "A")] = ["127.0.0.2"]
    zone[("1.0.0.127.bl.test", "TXT")] = ['"loopback is listed"']
    stub = StubDns(zone)
    inst = harness.PostwellInstance(tmp_path, {
        "mynetworks": "192.0.2.0/24",
        "postwell_dns_servers": stub.servers,
        "smtpd_helo_restrictions": "reject_unknown_helo_hostname",
        "smtpd_client_restrictions": "reject_rbl_client bl.test=127.0.0.[2..11]",
    })
    try:
        inst.start()
        replies = harness.dialogue(inst.port, ["EHLO nosuch.test", "MAIL FROM:<s@example.org>",
                                               "RCPT TO:<u@example.com>", "QUIT"])
        assert str(replies[3]) == ("554 5.7.1 Service unavailable; Client host [127.0.0.1] blocked "
                                   "using bl.test; loopback is listed")
        inst.wait_log(r"NOQUEUE: reject: RCPT from \S+\[127\.0\.0\.1\]: 554 5\.7\.1 Service "
                      r"unavailable; Client host \[127\.0\.0\.1\] blocked using bl\.test; loopback "
                      r"is listed; from=<s@example\.org> to=<u@example\.com> proto=ESMTP "
                      r"helo=<nosuch\.test>")
        assert ("1.0.0.127.bl.test", "A") in stub.queries
    finally:
        inst.stop()
        stub.close()


def test_helo_answers_are_cached_but_not_failures(stub):
    policy, log = make_policy(stub, {"smtpd_helo_restrictions": "reject_unknown_helo_hostname"})
    before = stub.queries.count(("mxonly.test", "A")), stub.queries.count(("temp.test", "A"))
    for _ in range(3):
        assert rcpt(policy, helo_name="mxonly.test")[0] is None
        assert rcpt(policy, helo_name="temp.test")[0] is not None
    assert stub.queries.count(("mxonly.test", "A")) == before[0] + 1
    assert stub.queries.count(("temp.test", "A")) == before[1] + 3


# Template macros, each in all four forms; Postfix 3.7's answers (unknown names
# make the template bad: one warning per lookup, then the default reply).
MACRO_NAMES = ["client", "client_address", "client_name", "reverse_client_name", "helo_name",
               "server_address", "server_port", "sender", "sender_name", "sender_domain",
               "recipient", "recipient_name", "recipient_domain", "rbl_txt", "queue_id", "instance"]
MACRO_REFERENCE = [
    ('m-client@example.com',
     '550 5.7.1 client=unknown[192.0.2.10]|set||yes', []),
    ('m-client_address@example.com',
     '550 5.7.1 client_address=192.0.2.10|set||yes', []),
    ('m-client_name@example.com',
     '550 5.7.1 client_name=unknown|set||yes', []),
    ('m-reverse_client_name@example.com',
     '550 5.7.1 reverse_client_name=unknown|set||yes', []),
    ('m-helo_name@example.com',
     '550 5.7.1 helo_name=good.test|set||yes', []),
    ('m-server_address@example.com',
     '554 5.7.1 Service unavailable; Client host [192.0.2.10] blocked using bl.test; Listed, see https://bl.test/q?ip=192.0.2.10', ['warning: unknown macro name "server_address" in expansion request', 'warning: unknown macro name "server_address" in expansion request', 'warning: unknown macro name "server_address" in expansion request', 'warning: unknown macro name "server_address" in expansion request', 'warning: rbl_reject_reply: bad rbl reply template for domain bl.test=[127].0.0.2: 550 5.7.1 server_address=$server_address|${server_address?set}|${server_address:unset}|${server_address?{yes}:{no}}']),
    ('m-server_port@example.com',
     '554 5.7.1 Service unavailable; Client host [192.0.2.10] blocked using bl.test; Listed, see https://bl.test/q?ip=192.0.2.10', ['warning: unknown macro name "server_port" in expansion request', 'warning: unknown macro name "server_port" in expansion request', 'warning: unknown macro name "server_port" in expansion request', 'warning: unknown macro name "server_port" in expansion request', 'warning: rbl_reject_reply: bad rbl reply template for domain bl.test=127.0.[0].[2]: 550 5.7.1 server_port=$server_port|${server_port?set}|${server_port:unset}|${server_port?{yes}:{no}}']),
    ('m-sender@example.com',
     '550 5.7.1 sender=s@example.org|set||yes', []),
    ('m-sender_name@example.com',
     '550 5.7.1 sender_name=s|set||yes', []),
    ('m-sender_domain@example.com',
     '550 5.7.1 sender_domain=example.org|set||yes', []),
    ('m-recipient@example.com',
     '550 5.7.1 recipient=m-recipient@example.com|set||yes', []),
    ('m-recipient_name@example.com',
     '550 5.7.1 recipient_name=m-recipient_name|set||yes', []),
    ('m-recipient_domain@example.com',
     '550 5.7.1 recipient_domain=example.com|set||yes', []),
    ('m-rbl_txt@example.com',
     '550 5.7.1 rbl_txt=Listed, see https://bl.test/q?ip=192.0.2.10|set||yes', []),
    ('m-queue_id@example.com',
     '554 5.7.1 Service unavailable; Client host [192.0.2.10] blocked using bl.test; Listed, see https://bl.test/q?ip=192.0.2.10', ['warning: unknown macro name "queue_id" in expansion request', 'warning: unknown macro name "queue_id" in expansion request', 'warning: unknown macro name "queue_id" in expansion request', 'warning: unknown macro name "queue_id" in expansion request', 'warning: rbl_reject_reply: bad rbl reply template for domain bl.test=127.[0].[0].[2]: 550 5.7.1 queue_id=$queue_id|${queue_id?set}|${queue_id:unset}|${queue_id?{yes}:{no}}']),
    ('m-instance@example.com',
     '554 5.7.1 Service unavailable; Client host [192.0.2.10] blocked using bl.test; Listed, see https://bl.test/q?ip=192.0.2.10', ['warning: unknown macro name "instance" in expansion request', 'warning: unknown macro name "instance" in expansion request', 'warning: unknown macro name "instance" in expansion request', 'warning: unknown macro name "instance" in expansion request', 'warning: rbl_reject_reply: bad rbl reply template for domain bl.test=[127].[0].[0].[2]: 550 5.7.1 instance=$instance|${instance?set}|${instance:unset}|${instance?{yes}:{no}}']),
    ('braces@example.com',
     '550 5.7.1 R=Listed, see https://bl.test/q?ip=192.0.2.10 $ bl.test bl.testx', []),
]


def test_template_macros_as_postfix(stub):
    classes, replies = {}, {}
    for i, m in enumerate(MACRO_NAMES):
        spec = f"bl.test=127.0.0.[{';'.join(['2'] * (i + 1))}]"    # one reply-map key each
        classes[f"m-{m}@example.com"] = f"reject_rbl_client {spec}"
        replies[spec] = f"550 5.7.1 {m}=${m}|${{{m}?set}}|${{{m}:unset}}|${{{m}?{{yes}}:{{no}}}}"
    classes["braces@example.com"] = "reject_rbl_client bl.test=127.0.0.[1..2]"
    replies["bl.test=127.0.0.[1..2]"] = ("550 5.7.1 ${rbl_reason ? {R=$rbl_reason} : {none}} $$ "
                                         "$(rbl_domain) ${rbl_domain}x")
    tables = {"texthash:/x/classes": DictTable(classes), "texthash:/x/rblreply": DictTable(replies)}
    expected = dict((r, (reply, w)) for r, reply, w in MACRO_REFERENCE)
    for recipient in [f"m-{m}@example.com" for m in MACRO_NAMES] + ["braces@example.com"]:
        if recipient not in expected:
            continue
        policy, log = make_policy(stub, {**SCENARIO_PARAMS, "smtpd_restriction_classes": ""},
                                  tables)
        reply, _ = rcpt(policy, recipient, client_addr="192.0.2.10")
        want_reply, want_warnings = expected[recipient]
        # Postfix's map keys differ (one per macro); the template text is the same.
        got_warnings = [re.sub(r"for domain \S+:", "for domain X:", w) for w in warnings(log)]
        want_warnings = [re.sub(r"^warning: |for domain \S+:", lambda m: "for domain X:"
                                if m.group(0).startswith("for") else "warning: ", w)
                         for w in want_warnings]
        assert (reply, got_warnings) == (want_reply, want_warnings), recipient


def test_localtime_and_server_name_macros(stub):
    tables = {"texthash:/x/rr": DictTable({"bl.test": "550 5.7.1 $server_name at $localtime"})}
    policy, log = make_policy(stub, {"smtpd_client_restrictions": "reject_rbl_client bl.test",
                                     "rbl_reply_maps": "texthash:/x/rr"}, tables)
    reply, _ = rcpt(policy, client_addr="192.0.2.11")
    assert re.fullmatch(r"550 5\.7\.1 mx\.example\.com at [A-Z][a-z]{2} \d\d \d\d:\d\d:\d\d", reply)


def test_a_session_hanging_up_does_not_cancel_a_shared_query():
    class SlowResolver:
        calls = 0

        async def lookup(self, name, rtype):
            SlowResolver.calls += 1
            await asyncio.sleep(0.1)
            return ["127.0.0.2"] if rtype == "A" else []

    checker = DnsChecker(SlowResolver())

    async def scenario():
        first = asyncio.ensure_future(checker.dnsxl("10.2.0.192.x.test"))
        second = asyncio.ensure_future(checker.dnsxl("10.2.0.192.x.test"))
        await asyncio.sleep(0.02)
        first.cancel()
        result = await second
        return first.cancelled(), result
    cancelled, result = run(scenario())
    assert cancelled and result == DnsxlHit(("127.0.0.2",), None)
    assert SlowResolver.calls == 2            # one A and one TXT query, shared
    assert run(checker.dnsxl("10.2.0.192.x.test")) == result and SlowResolver.calls == 2
