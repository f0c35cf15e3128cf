"""Address resolution parity with Postfix 3.7: host lookup failures and allow_min_user.

Unit tests pin the pieces (the native resolver's getaddrinfo() errors and their
wording in dns/mx.py, dns,native, trivial-rewrite's leading-'-' rule, the qmgr's
error-flag routing); a side-by-side module then runs the same mail through postwell
and a reference Postfix:

* smtp(8)/lmtp(8) next hops that cannot be looked up, with smtp_host_lookup =
  native, disable_dns_lookups = yes, dns,native and dns, for ``host``, ``[host]``,
  MX lists and ``relayhost = [host]``: the delivery lines (status, dsn, reason),
  the smtp warnings and postqueue -j's delay reasons must be the same;
* recipients whose local part starts with '-' (allow_min_user = no, then yes after
  a reload), by SMTP and by sendmail, to a virtual, a local and a remote domain,
  a sender starting with '-' and a malformed domain: the MAIL/RCPT replies, smtpd
  warnings, delivery lines and the bounce notices' per-recipient texts.

What postwell still does differently (smtpd, smtp(8) and qmgr code outside this
module's scope) is a strict xfail naming the cause and the fix.

Both MTAs run in a private mount namespace whose /etc/resolv.conf names a dnsmasq
on loopback (no upstream) and whose /etc/hosts is ours, so getaddrinfo() and DNS
answers are the same for both and nothing is asked outside the machine.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import harness
from postwell.config.main import Config
from postwell.dns import (DestinationError, DnsTempFail, DnsThenNative, FakeResolver,
                          NativeResolver, NoSuchDomain, relayhost_problem, resolve_destination)
from postwell.policy import AddressResolver, OwnAddresses, ResolveFlag


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 5))


# ------------------------------------------------------------------ native resolver

def _gai(table: dict):
    """A getaddrinfo stand-in: host -> list of addresses, or an EAI_* code to raise."""
    calls = []

    async def getaddrinfo(host, port, *, family=0, type=0):
        calls.append((host, family))
        v = table.get(host, socket.EAI_NONAME)
        if isinstance(v, int):
            raise socket.gaierror(v, {socket.EAI_NONAME: "Name or service not known",
                                      socket.EAI_AGAIN: "Temporary failure in name resolution",
                                      socket.EAI_NODATA: "No address associated with hostname",
                                      socket.EAI_FAIL: "Non-recoverable failure in name resolution",
                                      socket.EAI_MEMORY: "Memory allocation failure",
                                      }.get(v, "Unknown error"))
        out = []
        for ip in v:
            fam = socket.AF_INET6 if ":" in ip else socket.AF_INET
            if family in (socket.AF_UNSPEC, fam):
                out.append((fam, socket.SOCK_STREAM, 6, "", (ip, 0)))
        if not out:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return out
    getaddrinfo.calls = calls
    return getaddrinfo


HOSTS = {"ok.test": ["192.0.2.1", "2001:db8::1"], "v6.test": ["2001:db8::6"],
         "again.test": socket.EAI_AGAIN, "nodata.test": socket.EAI_NODATA,
         "fail.test": socket.EAI_FAIL, "mem.test": socket.EAI_MEMORY}


def native(table=HOSTS):
    return NativeResolver(getaddrinfo=_gai(table))


def test_native_resolver_asks_getaddrinfo_once_per_host_as_postfix():
    # Postfix's hostname_to_sockaddr(): one call, AF_UNSPEC unless inet_protocols
    # names one family.
    r = native()
    assert run(r.addresses("ok.test", ("ipv4", "ipv6"))) == ["192.0.2.1", "2001:db8::1"]
    assert run(r.addresses("ok.test", ("ipv4",))) == ["192.0.2.1"]
    assert r._getaddrinfo.calls == [("ok.test", socket.AF_UNSPEC), ("ok.test", socket.AF_INET)]


@pytest.mark.parametrize("host,cls,code,text", [
    ("nosuch.test", NoSuchDomain, socket.EAI_NONAME, "Name or service not known"),
    ("nodata.test", NoSuchDomain, socket.EAI_NODATA, "No address associated with hostname"),
    ("again.test", DnsTempFail, socket.EAI_AGAIN, "Temporary failure in name resolution"),
    ("v6.test", NoSuchDomain, socket.EAI_NONAME, "Name or service not known"),
])
def test_native_resolver_errors_carry_the_getaddrinfo_text(host, cls, code, text):
    with pytest.raises(cls) as e:
        run(native().addresses(host, ("ipv4",)))
    assert (e.value.gai_code, e.value.gai_text) == (code, text)


# smtp_addr.c: "unable to look up host %s: %s" with 5.4.4 for EAI_NONAME, 4.4.4 for
# EAI_AGAIN, 4.3.0 for EAI_MEMORY/EAI_SYSTEM and 5.3.0 for the rest, EAI_NODATA included
# (Debian's build does not see it: the reference says 5.3.0, test_lookup_failure_...).
@pytest.mark.parametrize("host,dsn,text", [
    ("nosuch.test", "5.4.4", "Name or service not known"),
    ("nodata.test", "5.3.0", "No address associated with hostname"),
    ("again.test", "4.4.4", "Temporary failure in name resolution"),
    ("mem.test", "4.3.0", "Memory allocation failure"),
    ("fail.test", "5.3.0", "Non-recoverable failure in name resolution"),
])
def test_native_lookup_failure_wording(host, dsn, text):
    with pytest.raises(DestinationError) as e:
        run(resolve_destination(FakeResolver({}), f"[{host}]", rng=random.Random(0),
                                families=("ipv4",), address_resolver=native(),
                                dns_enabled=False))
    assert (e.value.dsn, e.value.reason) == (dsn, f"unable to look up host {host}: {text}")


def test_native_lookup_after_nxdomain_mx():
    # smtp_host_lookup = native with DNS on: the MX query says NXDOMAIN, the
    # implicit MX is then looked up natively (the case of test_parity_delivery5).
    with pytest.raises(DestinationError) as e:
        run(resolve_destination(FakeResolver({}), "nosuchhost.invalid", rng=random.Random(0),
                                families=("ipv4",), address_resolver=native()))
    assert (e.value.dsn, e.value.reason) == (
        "5.4.4", "unable to look up host nosuchhost.invalid: Name or service not known")


def test_soft_error_dominates_and_last_text_wins():
    # smtp_addr.c keeps one reason buffer: each failing MX host overwrites the text;
    # a soft status once seen stays soft ("4.4.4" for a later EAI_NONAME).
    dns = FakeResolver({("mixed.test", "MX"): [(10, "again.test"), (20, "gone.test")]})
    with pytest.raises(DestinationError) as e:
        run(resolve_destination(dns, "mixed.test", rng=random.Random(0), families=("ipv4",),
                                address_resolver=native()))
    assert (e.value.dsn, e.value.reason) == (
        "4.4.4", "unable to look up host gone.test: Name or service not known")
    # The same with DNS lookups: the text of the last host, the status soft.
    dns = FakeResolver({("mixed.test", "MX"): [(10, "tmp.test"), (20, "gone.test")],
                        ("tmp.test", "A"): "SERVFAIL"})
    with pytest.raises(DestinationError) as e:
        run(resolve_destination(dns, "mixed.test", rng=random.Random(0), families=("ipv4",)))
    assert (e.value.dsn, e.value.reason) == (
        "4.4.4", "Host or domain name not found. Name service error for name=gone.test "
        "type=A: Host not found")



def test_dns_then_native_asks_getaddrinfo_only_after_dns_said_no():
    # smtp_host_lookup = dns, native (smtp_addr.c smtp_addr_one): NXDOMAIN or NODATA
    # from DNS -> getaddrinfo(); a DNS failure to answer is final.
    dns = FakeResolver({("indns.test", "A"): ["192.0.2.7"], ("nodata.test", "MX"): [],
                        ("tmp.test", "A"): "SERVFAIL"})
    gai = _gai({"hostsfile.test": ["192.0.2.8"], "nodata.test": ["192.0.2.9"]})
    r = DnsThenNative(dns, NativeResolver(getaddrinfo=gai))
    assert run(r.addresses("indns.test", ("ipv4",))) == ["192.0.2.7"]
    assert run(r.addresses("hostsfile.test", ("ipv4",))) == ["192.0.2.8"]
    assert run(r.addresses("nodata.test", ("ipv4",))) == ["192.0.2.9"]
    with pytest.raises(DnsTempFail) as e:
        run(r.addresses("tmp.test", ("ipv4",)))
    assert e.value.gai_code is None
    assert [h for h, _ in gai.calls] == ["hostsfile.test", "nodata.test"]
    with pytest.raises(DestinationError) as e:
        run(resolve_destination(dns, "nowhere.test", rng=random.Random(0), families=("ipv4",),
                                address_resolver=r))
    assert (e.value.dsn, e.value.reason) == (
        "5.4.4", "unable to look up host nowhere.test: Name or service not known")


def test_no_valid_mx_address_warning():
    warned = []
    dns = FakeResolver({("mx.test", "MX"): [(10, "gone.test")], ("nomx.test", "A"): []})
    with pytest.raises(DestinationError):
        run(resolve_destination(dns, "mx.test", rng=random.Random(0), warn=warned.append))
    with pytest.raises(DestinationError):      # no MX records at all: no warning
        run(resolve_destination(dns, "nomx.test", rng=random.Random(0), warn=warned.append))
    assert warned == ["no MX host for mx.test has a valid address record"]




# ------------------------------------------------------------------ smtp(8) agent

def _smtp_agent(protocol="smtp", resolver=None, gai=None, **params):
    from postwell.delivery.lmtp import LmtpDeliveryAgent
    from postwell.delivery.smtp import SmtpDeliveryAgent
    from postwell.log import NullLog
    base = {"myhostname": "client.test", "inet_protocols": "ipv4"}
    base.update(params)
    cls = LmtpDeliveryAgent if protocol == "lmtp" else SmtpDeliveryAgent
    a = cls(Config("/nonexistent", base, {}, []), resolver or FakeResolver({}), NullLog(protocol),
            rng=random.Random(0), own_addresses=frozenset())
    if gai is not None:
        a._native = NativeResolver(getaddrinfo=gai)
    return a


def _deliver(agent, nexthop, rcpt="u@far.test", transport="smtp"):
    from postwell.delivery.base import DeliveryRequest, Recipient
    req = DeliveryRequest(queue_id="ABC", sender="s@client.test", recipients=[Recipient(rcpt)],
                          transport=transport, nexthop=nexthop, arrival_time=0.0,
                          open_content=lambda: iter([b"Subject: t\n\nhi\n"]), content_size=12)
    [res] = run(agent.deliver(req))
    return res.status, res.dsn, res.reason


@pytest.mark.parametrize("lookup, disabled, native, both", [
    ("dns", "no", False, False),
    ("native", "no", True, False),
    ("dns, native", "no", False, True),
    ("native,dns", "no", False, True),
    ("dns, native", "yes", True, False),     # disable_dns_lookups: native alone
])
def test_smtp_host_lookup_words(lookup, disabled, native, both):
    from postwell.delivery.smtp import _Settings
    cfg = Config("/nonexistent", {"smtp_host_lookup": lookup, "disable_dns_lookups": disabled}, {}, [])
    s = _Settings.from_config(cfg)
    assert (s.native_hosts, s.dns_then_native) == (native, both)
    agent = _smtp_agent(smtp_host_lookup=lookup, disable_dns_lookups=disabled)
    r = agent._address_resolver()
    assert type(r).__name__ == ("DnsThenNative" if both else "NativeResolver" if native else "NoneType")


def test_smtp_dns_native_reports_getaddrinfo_after_nxdomain():
    dns = FakeResolver({("far.test", "MX"): [(10, "mx.far.test")]})
    gai = _gai({})
    agent = _smtp_agent(resolver=dns, gai=gai, smtp_host_lookup="dns, native")
    assert _deliver(agent, "far.test") == (
        "bounced", "5.4.4", "unable to look up host mx.far.test: Name or service not known")
    assert [h for h, _ in gai.calls] == ["mx.far.test"]
    # DNS alone: its own wording, getaddrinfo never asked.
    gai = _gai({})
    agent = _smtp_agent(resolver=dns, gai=gai, smtp_host_lookup="dns")
    status, dsn, reason = _deliver(agent, "far.test")
    assert (status, dsn) == ("bounced", "5.4.4") and reason.startswith("Host or domain name not found")
    assert gai.calls == []


def test_smtp_dns_native_finds_a_hosts_file_name():
    # The address getaddrinfo() gives is dialled (routed to a closed loopback port).
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    dns = FakeResolver({("far.test", "MX"): [(10, "mx.far.test")]})
    agent = _smtp_agent(resolver=dns, gai=_gai({"mx.far.test": ["192.0.2.8"]}),
                        smtp_host_lookup="dns, native", smtp_connect_timeout="2s")
    agent.route = lambda ip, p: ("127.0.0.1", port)
    status, dsn, reason = _deliver(agent, "far.test")
    assert (status, dsn) == ("deferred", "4.4.1")
    assert reason.startswith("connect to mx.far.test[192.0.2.8]:25: "), reason


def test_smtp_relayhost_hard_failure_is_deferred_with_a_warning():
    dns = FakeResolver({})
    agent = _smtp_agent(resolver=dns, relayhost="[nosuch.invalid]")
    assert _deliver(agent, "[nosuch.invalid]") == (
        "deferred", "4.3.5", "Host or domain name not found. Name service error for "
        "name=nosuch.invalid type=A: Host not found")
    assert agent.log.lines == ["warning: relayhost configuration problem"]
    # Another next hop, or a soft failure: as before.
    agent = _smtp_agent(resolver=dns, relayhost="[nosuch.invalid]")
    assert _deliver(agent, "nosuch.invalid")[:2] == ("bounced", "5.4.4")
    agent = _smtp_agent(resolver=FakeResolver({("tmp.test", "A"): "SERVFAIL"}), relayhost="[tmp.test]")
    assert _deliver(agent, "[tmp.test]")[:2] == ("deferred", "4.4.3")
    assert agent.log.lines == []


def test_lmtp_has_no_relayhost_rule():
    agent = _smtp_agent("lmtp", resolver=FakeResolver({}), relayhost="[nosuch.invalid]")
    status, dsn, _ = _deliver(agent, "[nosuch.invalid]", transport="lmtp")
    assert (status, dsn) == ("bounced", "5.4.4") and agent.log.lines == []


def test_smtp_logs_no_valid_mx_address_warning():
    dns = FakeResolver({("far.test", "MX"): [(10, "gone.test")]})
    agent = _smtp_agent(resolver=dns)
    assert _deliver(agent, "far.test")[:2] == ("bounced", "5.4.4")
    assert agent.log.lines == ["warning: no MX host for far.test has a valid address record"]


def test_relayhost_problem_defers_hard_failures_of_the_relayhost():
    hard = DestinationError("5.4.4", "unable to look up host nosuch.invalid: Name or service not known")
    err, warning = relayhost_problem(hard, "[nosuch.invalid]", "[nosuch.invalid]")
    assert (err.dsn, err.reason, err.permanent) == ("4.3.5", hard.reason, False)
    assert warning == "relayhost configuration problem"
    assert relayhost_problem(hard, "nosuch.invalid", "[nosuch.invalid]") is None
    assert relayhost_problem(DestinationError("4.4.4", "x"), "[r]", "[r]") is None
    assert relayhost_problem(hard, "[r]", "") is None


# ------------------------------------------------------------------ allow_min_user (units)

RESOLVER_PARAMS = {
    "myhostname": "mx.example.test", "mydomain": "example.test", "myorigin": "$mydomain",
    "mydestination": "$myhostname, localhost", "virtual_mailbox_domains": "virtual.test",
    "inet_interfaces": "127.0.0.1", "inet_protocols": "ipv4", "relayhost": "",
}


def _resolver(**extra):
    cfg = Config("/nonexistent", dict(RESOLVER_PARAMS, **extra), {}, [])
    return AddressResolver(cfg, tables={}, own_addresses=OwnAddresses(
        cfg, system_addresses=lambda: ["127.0.0.1"]))


@pytest.mark.parametrize("address,cls,recipient", [
    ("-bob@mx.example.test", "local", "-bob@mx.example.test"),
    ("-bob", "default", "-bob@example.test"),        # @$myorigin appended first
    ("-bob@virtual.test", "virtual", "-bob@virtual.test"),
    ("-bob@remote.test", "default", "-bob@remote.test"),
    # resolve.c looks at the resolved address: the local domain stripped, % undone
    ("-bob%virtual.test@mx.example.test", "virtual", "-bob@virtual.test"),
])
def test_leading_dash_sets_the_error_flag_and_keeps_the_class(address, cls, recipient):
    r = _resolver().resolve(address)
    assert (r.address_class, r.recipient, r.error) == (cls, recipient, True)
    assert r.flags & int(ResolveFlag.FLAG_ERROR)
    r = _resolver(allow_min_user="yes").resolve(address)
    assert (r.address_class, r.recipient, r.error) == (cls, recipient, False)


@pytest.mark.parametrize("address", ["bob-@virtual.test", "b-ob@remote.test",
                                     "bob%-x.test@remote.test"])
def test_dash_elsewhere_is_no_error(address):
    assert not _resolver().resolve(address).error


class _Agent:
    """A stand-in delivery agent that records what it was given."""

    def __init__(self):
        self.calls = []

    async def deliver(self, req):
        from postwell.delivery.base import RecipientResult
        self.calls.append((req.transport, req.nexthop, [r.address for r in req.recipients]))
        return [RecipientResult.sent(r, "delivered to maildir", req.transport)
                for r in req.recipients]


def _qmgr_run(tmp_path, rcpts, attributes=None, **params):
    from postwell.log import NullLog
    from postwell.qmgr.manager import QueueManager
    from postwell.queue import QueueStore
    qdir = tmp_path / "queue"
    cfg = Config(str(tmp_path), dict(RESOLVER_PARAMS, queue_directory=str(qdir), **params), {}, [])
    store = QueueStore(str(qdir))
    store.ensure_layout()
    msg = store.create()
    msg.set_sender("")            # no notice to follow
    for k, v in (attributes or {}).items():
        msg.set_attribute(k, v)
    for r in rcpts:
        msg.add_recipient(r)
    msg.write(b"Subject: t\n\nhello\n")
    msg.commit()
    logs: dict = {}
    agent = _Agent()
    qm = QueueManager(cfg, store, log=NullLog("qmgr"), resolver=_resolver(**params),
                      agents={"virtual": agent, "okay": agent},
                      agent_logs=lambda n: logs.setdefault(n, NullLog(n)))

    async def go():
        qm.scan_incoming()
        await qm.drain()
    run(go())
    lines = [ln.split(": ", 1)[1] for name, log in sorted(logs.items()) for ln in log.lines]
    return agent.calls, [re.sub(r"delay=.*?, dsn", "dsn", ln) for ln in lines]


def test_qmgr_bounces_dash_recipient_as_bad_syntax(tmp_path):
    # qmgr_resolve_one(): trivial-rewrite's error flag -> error:5.1.3 bad address syntax
    calls, lines = _qmgr_run(tmp_path, ["-bob@virtual.test", "bob@virtual.test"])
    assert calls == [("virtual", "virtual.test", ["bob@virtual.test"])]
    assert "to=<-bob@virtual.test>, relay=none, dsn=5.1.3, status=bounced (bad address syntax)" \
        in lines


def test_qmgr_delivers_dash_recipient_with_allow_min_user(tmp_path):
    calls, _ = _qmgr_run(tmp_path, ["-bob@virtual.test"], allow_min_user="yes")
    assert calls == [("virtual", "virtual.test", ["-bob@virtual.test"])]


def test_qmgr_bounces_dash_recipient_despite_a_content_filter(tmp_path):
    # qmgr_message_resolve() applies the '-' rule after the filter has chosen the route.
    calls, lines = _qmgr_run(tmp_path, ["-bob@virtual.test", "bob@virtual.test"],
                             {"postwell_filter": "okay:[127.0.0.1]:10025"})
    assert calls == [("okay", "[127.0.0.1]:10025", ["bob@virtual.test"])]
    assert "to=<-bob@virtual.test>, relay=none, dsn=5.1.3, status=bounced (bad address syntax)" \
        in lines


@pytest.mark.parametrize("address", [
    "-bob@virtual.test", "-bob", "bob@virtual.test", "bob-@virtual.test", "b-ob",
    "-bob%virtual.test@mx.example.test", "bob%-x.test@mx.example.test",
    "bob%-x.test@remote.test", "bob%bad..domain@mx.example.test", "bob%virtual.test@mx.example.test",
    "a@-b@mx.example.test", "x!-y@mx.example.test", "-a!b@mx.example.test",
])
@pytest.mark.parametrize("amu", ["no", "yes"])
def test_smtpd_syntax_check_agrees_with_the_resolver(address, amu):
    # The smtpd's per-command check skips the resolver when no routing operator can
    # change the local part; it must still say what resolve() says.
    r = _resolver(allow_min_user=amu)
    assert r.syntax_error(address) == r.syntax_error(address, False) == r.resolve(address).error


def test_smtpd_syntax_check_without_domain_check_sees_bad_domains():
    # VRFY: the smtp engine has not looked at the domain.
    r = _resolver()
    assert r.syntax_error("bob@bad..domain", False) and not r.syntax_error("bob@bad..domain")


def test_qmgr_delivers_the_resolved_address(tmp_path):
    # qmgr_message_resolve() RECIPIENT_UPDATE: delivered and logged as the resolved
    # address, the queued one as orig_to= (checked against 3.7 side by side below).
    calls, lines = _qmgr_run(tmp_path, ["bob%virtual.test@mx.example.test"])
    assert calls == [("virtual", "virtual.test", ["bob@virtual.test"])]
    assert any(ln.startswith("to=<bob@virtual.test>, orig_to=<bob%virtual.test@mx.example.test>, "
                             "relay=virtual") for ln in lines), lines
    calls, lines = _qmgr_run(tmp_path / "2", ["-bob%virtual.test@mx.example.test"])
    assert calls == []
    assert "to=<-bob@virtual.test>, orig_to=<-bob%virtual.test@mx.example.test>, relay=none, " \
        "dsn=5.1.3, status=bounced (bad address syntax)" in lines


# ------------------------------------------------------------------ side by side

DNSMASQ = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"
UNSHARE = shutil.which("unshare")
NS = "127.0.61.53"
ETC_HOSTS = ("127.0.0.1 localhost\n"
             "127.0.0.1 peerhost.test\n"
             "2001:db8::1 v6only.test\n")
ZONE = """\
no-resolv
no-hosts
local=/test/
local=/invalid/
server=/broken.test/127.0.0.1#{servfail_port}
host-record=v6dns.test,2001:db8::2
mx-host=mixed.test,down.broken.test,10
mx-host=mixed.test,gone.test,20
mx-host=viahosts.test,peerhost.test,10
"""
SENDER = f"alice@{harness.VIRTUAL_DOMAIN}"
TIMEOUT = 30
EXTRA_SERVICES = (
    "nodns     unix  -       -       n       -       -       smtp\n"
    "  -o disable_dns_lookups=yes\n"
    "dnsnat    unix  -       -       n       -       -       smtp\n"
    "  -o smtp_host_lookup=dns,native\n"
    "dnsonly   unix  -       -       n       -       -       smtp\n"
    "  -o smtp_host_lookup=dns\n"
    "lmtpnat   unix  -       -       n       -       -       lmtp\n"
    "  -o lmtp_host_lookup=native\n")
POSTWELL_SERVICES = (
    "smtp      unix  -       -       n       -       -       smtp\n"
    "local     unix  -       n       n       -       -       local\n"
    "lmtp      unix  -       -       n       -       -       lmtp\n"
    "pickup    unix  n       -       n       60      1       pickup\n")

# Next hops that fail to resolve: test domain -> transport:nexthop ("" = relayhost).
LOOKUP_CASES = {
    # native addresses after a DNS MX query (NXDOMAIN): test_parity_delivery5's case
    "native-host": "smtp:nosuchhost.invalid",
    "native-nodns": "nodns:nosuchhost.invalid",           # disable_dns_lookups = yes
    "native-literal": "smtp:[nosuchhost.invalid]",
    "native-relayhost": "",                               # relayhost = [nosuch.invalid]
    "native-again": "smtp:[x.broken.test]",               # EAI_AGAIN: deferred
    "native-nodata": "smtp:[v6dns.test]",                 # EAI_NODATA (AAAA only)
    "native-hosts-v6": "smtp:[v6only.test]",              # /etc/hosts: IPv6 only
    "native-mx-servfail": "smtp:x.broken.test",           # the MX query fails: DNS words it
    "native-mx-mixed": "smtp:mixed.test",                 # MX hosts: EAI_AGAIN, then EAI_NONAME
    "dns-nxdomain": "dnsonly:nope.test",
    "dns-mx-mixed": "dnsonly:mixed.test",                 # SERVFAIL, then NXDOMAIN
    "dnsnat-nxdomain": "dnsnat:nope.test",                # DNS says no, then getaddrinfo
    "dnsnat-servfail": "dnsnat:[x.broken.test]",          # DNS fails: no native lookup
    "native-mx-loop": "smtp:viahosts.test",               # MX host in /etc/hosts: us
    "native-case": "smtp:[NoSuchHost.Invalid]",           # the name as written
    "dns-case": "dnsonly:NoPe.Test",
    "mx-servfail-case": "smtp:X.Broken.Test",
    "lmtp-dns": "lmtp:inet:nosuchhost.invalid",           # lmtp_host_lookup = dns
    "lmtp-native": "lmtpnat:inet:nosuchhost.invalid",
}
# dns,native finds a name in /etc/hosts after DNS said NXDOMAIN.
HOSTS_FILE_CASE = "dnsnat-hosts-file"


def _bindable(ip: str, port: int) -> bool:
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        with socket.socket(socket.AF_INET, kind) as s:
            try:
                s.bind((ip, port))
            except OSError:
                return False
    return True


def _namespaced(root: Path, argv: list[str]) -> list[str]:
    """argv run with our resolv.conf and hosts bind-mounted over /etc's, in a
    private mount namespace every daemon the command starts inherits."""
    script = ('mount --bind "$1" /etc/resolv.conf && mount --bind "$2" /etc/hosts '
              '&& grep -qx "nameserver $3" /etc/resolv.conf && shift 3 && exec "$@"')
    return [UNSHARE, "-m", "--propagation", "private", "sh", "-c", script, "sh",
            str(root / "resolv.conf"), str(root / "hosts"), NS, *argv]


def _write_namespace_files(root: Path) -> None:
    (root / "resolv.conf").write_text(f"nameserver {NS}\noptions attempts:1 timeout:1\n")
    (root / "hosts").write_text(ETC_HOSTS)


class NsReference(harness.ReferencePostfix):
    def postfix(self, *args, timeout=60.0, check=False):
        if args[:1] != ("start",):
            return super().postfix(*args, timeout=timeout, check=check)
        _write_namespace_files(self.root)
        cmd = _namespaced(self.root, [harness.POSTFIX_BIN, "-c", str(self.config_dir), "start"])
        cp = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                            stdin=subprocess.DEVNULL)
        if check and cp.returncode != 0:
            raise AssertionError(f"namespaced postfix start failed: {cp.stderr}")
        return cp


class NsPostwell(harness.PostwellInstance):
    def run(self, tool, *args, timeout=60.0, check=False, input=None):
        if tool != "postfix" or args[:1] != ("start",):
            return super().run(tool, *args, timeout=timeout, check=check, input=input)
        _write_namespace_files(self.root)
        cmd = _namespaced(self.root, [sys.executable, "-m", "postwell.cli.postfix", "-c",
                                      str(self.config_dir), "start"])
        env = dict(os.environ, MAIL_CONFIG=str(self.config_dir))
        cp = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                            stdin=subprocess.DEVNULL)
        if check and cp.returncode != 0:
            raise AssertionError(f"namespaced postwell start failed: {cp.stdout}{cp.stderr}")
        return cp


class ServfailServer:
    """The broken.test name server: SERVFAIL to every query, at once.  An upstream
    that never answers gives the same SERVFAIL-class failure to both MTAs, but only
    after every resolver's retry timeouts (~5 s per case and MTA)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        import dns.message
        import dns.rcode
        while not self.done.is_set():
            try:
                data, peer = self.sock.recvfrom(4096)
                reply = dns.message.make_response(dns.message.from_wire(data))
            except (OSError, ValueError, Exception):  # noqa: BLE001 - timeout or junk
                continue
            reply.set_rcode(dns.rcode.SERVFAIL)
            try:
                self.sock.sendto(reply.to_wire(), peer)
            except OSError:
                pass

    def close(self) -> None:
        self.done.set()
        self.thread.join(5)
        self.sock.close()


def _start_dnsmasq(root: Path, servfail_port: int) -> subprocess.Popen:
    conf = root / "dnsmasq.conf"
    conf.write_text(f"port=53\nlisten-address={NS}\nbind-interfaces\n"
                    + ZONE.format(servfail_port=servfail_port))
    proc = subprocess.Popen([DNSMASQ, "-k", f"--conf-file={conf}", "--pid-file=", "--user=nobody"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    import dns.message
    import dns.query
    deadline = time.monotonic() + 10
    while True:
        try:
            q = dns.message.make_query("mixed.test", "MX")
            if dns.query.udp(q, NS, timeout=0.5).answer:
                return proc
        except Exception:  # noqa: BLE001 - not up yet
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.skip(f"dnsmasq did not start: {proc.stderr.read()!r}")
        time.sleep(0.1)


class Pair:
    def __init__(self, base: Path) -> None:
        self.hosts_port = harness.free_port()      # nothing listens: "Connection refused"
        table = [f"{d}.test {hop}\n" for d, hop in LOOKUP_CASES.items() if hop]
        table.append(f"{HOSTS_FILE_CASE}.test dnsnat:[peerhost.test]:{self.hosts_port}\n")
        params = {
            "disable_dns_lookups": "no", "smtp_host_lookup": "native",
            "relayhost": "[nosuch.invalid]",
            "transport_maps": "texthash:$config_directory/transport",
            "relocated_maps": "texthash:$config_directory/relocated",
            "queue_run_delay": "1h", "minimal_backoff_time": "1h", "maximal_backoff_time": "2h",
            "smtp_connect_timeout": "5s",
        }
        self.ref = NsReference(base, params, name="pf-rs6", master_cf_extra=EXTRA_SERVICES)
        self.pw = NsPostwell(base, dict(params, postwell_dns_servers=f"{NS}:53"), name="pw-rs6")
        self.pw.master_cf = self.pw.default_master_cf() + POSTWELL_SERVICES + EXTRA_SERVICES
        self.params = params
        for inst in (self.ref, self.pw):
            inst.write_config()
            (inst.config_dir / "transport").write_text("".join(table))
            (inst.config_dir / "relocated").write_text(f"moved@{harness.VIRTUAL_DOMAIN} "
                                                       "new@example.org\n")
            with open(inst.config_dir / "vmailbox", "a") as f:
                f.write(f"-bob@{harness.VIRTUAL_DOMAIN} {harness.VIRTUAL_DOMAIN}/-bob/\n")
        harness.start_side_by_side(self.ref, self.pw)
        self.phase = "no"
        self.results: dict = {}

    def set_allow_min_user(self, value: str) -> None:
        if self.phase == value:
            return
        for inst in (self.ref, self.pw):
            extra = dict(self.params, allow_min_user=value)
            if inst is self.ref:
                inst.main_cf_extra = extra
            else:
                inst.main_cf = dict(extra, postwell_dns_servers=f"{NS}:53")
            before = inst.log_text().count("reload")
            inst.write_config()
            with open(inst.config_dir / "vmailbox", "a") as f:
                f.write(f"-bob@{harness.VIRTUAL_DOMAIN} {harness.VIRTUAL_DOMAIN}/-bob/\n")
            inst.reload()
            harness.wait_for(lambda: inst.log_text().count("reload") > before, 15, 0.05,
                             f"{inst.kind} reload")
        for inst in (self.ref, self.pw):
            harness.wait_banner(inst.port, 15)
        time.sleep(1.0)
        self.phase = value

    def stop(self) -> None:
        harness.stop_side_by_side([self.ref, self.pw])


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    if harness.reference_available():
        pytest.skip(harness.reference_available())
    if UNSHARE is None or os.geteuid() != 0 or not os.access(DNSMASQ, os.X_OK):
        pytest.skip("needs root, unshare(1) and dnsmasq")
    if not _bindable(NS, 53):
        pytest.skip(f"{NS}:53 is taken")
    base = tmp_path_factory.mktemp("resolve6")
    servfail = ServfailServer()
    dnsmasq = _start_dnsmasq(base, servfail.port)
    p = None
    try:
        p = Pair(base)
        yield p
    finally:
        if p is not None:
            p.stop()
        dnsmasq.terminate()
        try:
            dnsmasq.wait(5)
        except subprocess.TimeoutExpired:
            dnsmasq.kill()
        servfail.close()


# ------------------------------------------------------------------ helpers

_PREFIX = re.compile(r"^\w{3} [ \d]\d \d\d:\d\d:\d\d \S+ postfix/([\w-]+)\[\d+\]: (.*)$")


def _norm(text: str) -> str:
    text = re.sub(r"delay=[\d.]+, delays=[\d.]+/[\d.]+/[\d.]+/[\d.]+", "delay=D, delays=D", text)
    text = re.sub(r"size=\d+", "size=N", text)
    return re.sub(r"\b[0-9A-F]{10,12}\b", "QID", text)


def _log_entries(inst, before: int = 0) -> list[tuple[str, str]]:
    with open(inst.maillog, "rb") as f:
        f.seek(before)
        text = f.read().decode("utf-8", "replace")
    return [(m.group(1), m.group(2)) for ln in text.splitlines() if (m := _PREFIX.match(ln))]


def _notices(inst) -> dict[str, list[str]]:
    """Bounce notices in alice's mailbox, by the Subject of the message they return:
    the per-recipient lines of the first part and the delivery-status fields."""
    out = {}
    for path in inst.maildir_messages("alice"):
        msg = email.message_from_bytes(path.read_bytes(), policy=email.policy.compat32)
        if msg.get_content_type() != "multipart/report":
            continue
        parts = msg.get_payload()
        human = parts[0].get_payload(decode=True).decode("utf-8", "replace")
        rcpt_lines = [ln for ln in human.splitlines() if ln.startswith("<") or ln.startswith("    ")]
        status = []
        for block in parts[1].get_payload():
            for k in ("Final-Recipient", "Original-Recipient", "Action", "Status",
                      "Remote-MTA", "Diagnostic-Code"):
                if block.get(k):
                    status.append(f"{k}: {' '.join(block.get(k).split())}")
        original = parts[2].get_payload()
        inner = original[0] if isinstance(original, list) else email.message_from_string(original)
        out[str(inner.get("Subject"))] = rcpt_lines + status
    return out


def _wait_notices(inst, subjects: list[str]) -> dict[str, list[str]]:
    try:
        return harness.wait_for(lambda: (n := _notices(inst)) and all(s in n for s in subjects)
                                and n, TIMEOUT, 0.2, f"{inst.kind} notices for {subjects}")
    except TimeoutError:
        raise AssertionError(f"{inst.kind}: notices {sorted(_notices(inst))}, wanted {subjects}:\n"
                             + "\n".join(inst.log_text().splitlines()[-30:])) from None


def _dump(name: str, got: dict) -> None:
    if os.environ.get("PARITY_DUMP"):
        print(f"\n== {name}\n  postfix : {got['postfix']}\n  postwell: {got['postwell']}")


def _qid(replies: list[str]) -> str | None:
    m = harness.QUEUED_RE.search(replies[-1]) if replies else None
    return m.group(1) if m else None


def _line_for(inst, before: int, qid: str) -> str:
    def find():
        for prog, text in _log_entries(inst, before):
            if text.startswith(f"{qid}: to=") and "status=" in text:
                return f"{prog}: {_norm(text)}"
        return None
    try:
        return harness.wait_for(find, TIMEOUT, 0.1, f"{inst.kind} delivery line of {qid}")
    except TimeoutError:
        raise AssertionError(f"{inst.kind}: no delivery line for {qid}:\n" +
                             "\n".join(inst.log_text().splitlines()[-30:])) from None


def _send_smtp(inst, mail_from: str, rcpt: str, subject: str) -> dict:
    """One transaction (QUIT after a refused MAIL or RCPT): the replies, the smtpd's
    warning and reject lines, the delivery line and the qmgr's from= line."""
    before = os.path.getsize(inst.maillog)
    conn = harness.SmtpConnection(inst.port, timeout=TIMEOUT)
    replies = []
    try:
        conn.reply()
        for cmd in ("EHLO client.test", f"MAIL FROM:<{mail_from}>", f"RCPT TO:<{rcpt}>", "DATA"):
            conn.send(cmd + "\r\n")
            r = conn.reply()
            if cmd.startswith("EHLO"):
                continue
            replies.append(str(r))
            if r is None or r.code >= 400:
                break
        else:
            conn.send(f"Subject: {subject}\r\nMessage-ID: <{subject}@client.test>\r\n\r\n"
                      "hello\r\n.\r\n")
            replies.append(str(conn.reply()))
        conn.send("QUIT\r\n")
        conn.reply()
    finally:
        conn.close()
    qid = _qid(replies)
    got = {"replies": [_norm(r) for r in replies]}
    if qid:
        got["line"] = _line_for(inst, before, qid)
        got["qmgr"] = [_norm(t) for p, t in _log_entries(inst, before)
                       if p == "qmgr" and t.startswith(f"{qid}: from=")][:1]
    harness.wait_for(lambda: any(p == "smtpd" and t.startswith("disconnect from")
                                 for p, t in _log_entries(inst, before)),
                     TIMEOUT, 0.05, f"{inst.kind} disconnect")
    got["smtpd"] = [_norm(t) for p, t in _log_entries(inst, before)
                    if p == "smtpd" and ("warning:" in t or "reject:" in t)]
    return got


def _send_sendmail(inst, args: list[str], subject: str) -> dict:
    before = os.path.getsize(inst.maillog)
    body = f"Subject: {subject}\nMessage-ID: <{subject}@client.test>\n\nhello\n"
    if inst.kind == "postfix":
        cmd = ["/usr/sbin/sendmail", "-C", str(inst.config_dir), *args]
    else:
        cmd = [sys.executable, "-m", "postwell.cli.sendmail", "-C", str(inst.config_dir), *args]
    cp = subprocess.run(cmd, input=body, capture_output=True, text=True, timeout=TIMEOUT,
                        env=dict(os.environ, MAIL_CONFIG=str(inst.config_dir)))
    got = {"sendmail": (cp.returncode, cp.stdout, cp.stderr)}

    def pickup_id():
        for prog, text in _log_entries(inst, before):
            if prog == "pickup" and ": uid=" in text:
                return text.split(":", 1)[0]
        return None
    qid = harness.wait_for(pickup_id, TIMEOUT, 0.1, f"{inst.kind} pickup line")
    got["line"] = _line_for(inst, before, qid)
    return got


def _lookup_case(pair, name: str) -> dict:
    key = ("lookup", name)
    if key not in pair.results:
        got = {}
        for inst in (pair.ref, pair.pw):
            got[inst.kind] = _send_smtp(inst, SENDER, f"u@{name}.test", f"rs6-{name}")
        _dump(name, got)
        pair.results[key] = got
    return pair.results[key]


def _case_ids(cases, xfail=None):
    xfail = xfail or {}
    return [pytest.param(n, id=n, marks=[pytest.mark.xfail(reason=xfail[n], strict=True)]
                         if n in xfail else []) for n in cases]


# Lookup cases postwell still gets wrong: name -> strict xfail reason (none left:
# smtp(8)'s relayhost rule, dns,native and its warnings are fixed).
LOOKUP_XFAIL: dict[str, str] = {}


@pytest.mark.parametrize("name", _case_ids(LOOKUP_CASES, LOOKUP_XFAIL))
def test_lookup_failure_matches_reference(pair, name):
    got = _lookup_case(pair, name)
    assert got["postwell"] == got["postfix"]


def test_native_wording_pinned(pair):
    """The reference's own words, so a change of the reference shows up here."""
    got = _lookup_case(pair, "native-host")["postfix"]["line"]
    assert got.endswith("dsn=5.4.4, status=bounced (unable to look up host nosuchhost.invalid: "
                        "Name or service not known)"), got
    got = _lookup_case(pair, "native-relayhost")["postfix"]["line"]
    assert got.endswith("dsn=4.3.5, status=deferred (unable to look up host nosuch.invalid: "
                        "Name or service not known)"), got
    got = _lookup_case(pair, "native-again")["postfix"]["line"]
    assert got.endswith("dsn=4.4.4, status=deferred (unable to look up host x.broken.test: "
                        "Temporary failure in name resolution)"), got


def test_dns_native_finds_hosts_file_name_as_reference(pair):
    got = _lookup_case(pair, HOSTS_FILE_CASE)
    assert got["postwell"] == got["postfix"]


def test_smtp_warnings_match_reference(pair):
    for name in LOOKUP_CASES:
        _lookup_case(pair, name)
    warn = {}
    for inst in (pair.ref, pair.pw):
        warn[inst.kind] = sorted({_norm(t) for p, t in _log_entries(inst)
                                  if p in ("smtp", "nodns", "dnsnat", "dnsonly")
                                  and t.startswith("warning:")})
    assert warn["postwell"] == warn["postfix"]


# ------------------------------------------------------------------ allow_min_user

V, L = harness.VIRTUAL_DOMAIN, harness.HOSTNAME
MIN_CASES = {
    # name -> (MAIL FROM, RCPT TO)
    "virtual": (SENDER, f"-bob@{V}"),
    "local": (SENDER, f"-bob@{L}"),
    "remote": (SENDER, "-bob@remote.test"),
    "percent": (SENDER, f"-bob%{V}@{L}"),
    "sender": (f"-alice@{V}", f"bob@{V}"),
}
SENDMAIL_CASES = {
    "sendmail": ["-f", SENDER, "--", f"-bob@{V}"],
    # trivial-rewrite's other error: a malformed domain, same bounce
    "sendmail-bad-domain": ["-f", SENDER, "--", "bob@bad..domain.test"],
}


def _min_case(pair, phase: str, name: str) -> dict:
    key = ("min", phase, name)
    if key not in pair.results:
        pair.set_allow_min_user(phase)
        got = {}
        subject = f"rs6-min-{phase}-{name}"
        for inst in (pair.ref, pair.pw):
            if name in SENDMAIL_CASES:
                got[inst.kind] = _send_sendmail(inst, SENDMAIL_CASES[name], subject)
            else:
                got[inst.kind] = _send_smtp(inst, *MIN_CASES[name], subject)
        _dump(f"{phase}/{name}", got)
        pair.results[key] = got
    return pair.results[key]


MIN_XFAIL = {
}


def _min_params():
    out = []
    for phase in ("no", "yes"):             # one reload between the phases
        for name in [*MIN_CASES, *SENDMAIL_CASES]:
            reason = MIN_XFAIL.get((name, phase))
            out.append(pytest.param(name, phase, id=f"{name}-{phase}", marks=[
                pytest.mark.xfail(reason=reason, strict=True)] if reason else []))
    return out


@pytest.mark.parametrize("name,phase", _min_params())
def test_allow_min_user_matches_reference(pair, phase, name):
    got = _min_case(pair, phase, name)
    assert got["postwell"] == got["postfix"]


@pytest.mark.parametrize("phase", ["no", "yes"])
def test_allow_min_user_notices_match_reference(pair, phase):
    bounced = []
    for name in [*MIN_CASES, *SENDMAIL_CASES]:
        got = _min_case(pair, phase, name)
        if "status=bounced" in got["postfix"].get("line", ""):
            bounced.append(f"rs6-min-{phase}-{name}")
    assert bounced or phase == "yes"
    notices = {}
    for inst in (pair.ref, pair.pw):
        n = _wait_notices(inst, bounced)
        notices[inst.kind] = {s: n[s] for s in bounced}
    _dump(f"notices {phase}", notices)
    assert notices["postwell"] == notices["postfix"]


def test_deferred_lookup_reasons_listed_as_reference(pair):
    """postqueue -j: the delay reasons of the lookup failures left in the queue."""
    import json
    for name in LOOKUP_CASES:
        _lookup_case(pair, name)
    wanted = {f"u@{n}.test" for n in LOOKUP_CASES if n not in LOOKUP_XFAIL}
    out = {}
    for inst in (pair.ref, pair.pw):
        reasons = {}
        for line in inst.run("postqueue", "-j").stdout.splitlines():
            for r in json.loads(line).get("recipients", []):
                if r.get("address") in wanted:
                    reasons[r["address"]] = r.get("delay_reason")
        out[inst.kind] = reasons
    assert len(out["postfix"]) >= 5, out
    assert out["postwell"] == out["postfix"]


def test_relocated_matches_reference(pair):
    """relocated_maps: the RCPT reply over SMTP, the bounce of a sendmail copy."""
    got = {}
    for inst in (pair.ref, pair.pw):
        got[inst.kind] = {
            "smtp": _send_smtp(inst, SENDER, f"moved@{V}", "rs6-relocated-smtp"),
            "sendmail": _send_sendmail(inst, ["-f", SENDER, "--", f"moved@{V}"],
                                       "rs6-relocated-sendmail")}
    _dump("relocated", got)
    assert got["postwell"] == got["postfix"]


# ------------------------------------------------------------------ smtpd_check_addr()

# Addresses whose resolution has trivial-rewrite's error flag only once the local
# domain is stripped or the '-' rule applies: Postfix's smtpd refuses them at MAIL,
# RCPT and VRFY (extract_addr() -> smtpd_check_addr()), whatever the restrictions.
ADDR_RCPTS = [f"<-bob@{V}>", f"<bob%-x.test@{L}>", f"<bob%bad..domain@{L}>", "<-bob>",
              f'<"-bob"@{V}>', f"-bob@{V}", f"<@a.test:-bob@{V}>", f"<-bob%{V}@{L}>",
              f"<bob%-x.test@remote.test>", f"<bob-@{V}>", f"<bob%{V}@{L}>",
              f'<"a@-b"@{L}>', f"<-x!bob@{L}>", f"<x!-bob@{L}>", f"<a%b%-c@{L}>",
              f"<bob@@{L}>",                  # resolve_null_domain = no: "bob@" is malformed
              f"<moved@{V}>", f"<bob@{V}>"]
ADDR_SENDERS = [f"<-alice@{V}>", f"<alice%bad..d@{L}>", "<-x>", f"<alice%{V}@{L}>"]
ADDR_VRFY = [f"-bob@{V}", f"<-bob@{V}>", "bob@bad..domain", f"bob%-x@{L}", "<-bob> SMTPUTF8",
             f"bob@{V}"]


def _addr_session(inst) -> dict:
    """Sessions of fewer than smtpd_soft_error_limit (10) errors each: no error sleeps."""
    before = os.path.getsize(inst.maillog)
    mail = [x for s in ADDR_SENDERS[:-1] for x in (f"MAIL FROM:{s}", "RSET")]
    mail.append(f"MAIL FROM:{ADDR_SENDERS[-1]}")
    half = len(ADDR_RCPTS) // 2
    sessions = [mail + [f"RCPT TO:{r}" for r in ADDR_RCPTS[:half]],
                mail[-1:] + [f"RCPT TO:{r}" for r in ADDR_RCPTS[half:]],
                [f"VRFY {a}" for a in ADDR_VRFY]]
    replies = []
    for lines in sessions:
        replies += [_norm(str(r)) for r in harness.dialogue(
            inst.port, ["EHLO client.test", *lines, "QUIT"], timeout=TIMEOUT)[2:]]

    def closed():
        return [t for p, t in _log_entries(inst, before)
                if p == "smtpd" and t.startswith("disconnect from")]
    harness.wait_for(lambda: len(closed()) == len(sessions), TIMEOUT, 0.05,
                     f"{inst.kind} disconnect")
    return {"replies": replies, "disconnect": closed(),
            "smtpd": [_norm(t) for p, t in _log_entries(inst, before)
                      if p == "smtpd" and ("warning:" in t or "reject:" in t)]}


@pytest.mark.parametrize("phase", ["no", "yes"])
def test_address_syntax_refusals_match_reference(pair, phase):
    """The MAIL/RCPT/VRFY replies, the smtpd's warnings and reject lines and the
    disconnect line's counters for addresses the resolver flags."""
    pair.set_allow_min_user(phase)
    got = dict(zip(("postfix", "postwell"), harness.run_side_by_side(_addr_session, pair.ref,
                                                                     pair.pw)))
    _dump(f"address syntax {phase}", got)
    assert got["postwell"] == got["postfix"]
    refused = [r for r in got["postfix"]["replies"] if r.startswith("501 5.1.")]
    assert len(refused) == (21 if phase == "no" else 9), got["postfix"]["replies"]


def test_address_refused_before_parameters_as_reference(pair):
    pair.set_allow_min_user("no")
    lines = ["EHLO client.test", f"MAIL FROM:<-alice@{V}> FOO=BAR", f"MAIL FROM:<{SENDER}>",
             f"RCPT TO:<-bob@{V}> NOTIFY=BOGUS", f"RCPT TO:<-bob@{V}> FOO=BAR", "QUIT"]
    got = [[str(r) for r in harness.dialogue(inst.port, lines, timeout=TIMEOUT)[2:]]
           for inst in (pair.ref, pair.pw)]
    assert got[1] == got[0]


# Recipients the qmgr resolves to another address (RECIPIENT_UPDATE): delivered to,
# logged and bounced as the resolved address, the queued one as orig_to=/"expanded from".
PERCENT_CASES = {
    "percent-unknown": ["-f", SENDER, "--", f"nobody%{V}@{L}"],
    "percent-known": ["-f", SENDER, "--", f"bob%{V}@{L}"],
    "percent-dash": ["-f", SENDER, "--", f"-bob%{V}@{L}"],
    "percent-bad-domain": ["-f", SENDER, "--", f"bob%bad..domain@{L}"],
}


@pytest.mark.parametrize("name", list(PERCENT_CASES))
def test_resolved_recipient_delivered_as_reference(pair, name):
    pair.set_allow_min_user("no")
    key = ("percent", name)
    if key not in pair.results:
        got = {}
        for inst in (pair.ref, pair.pw):
            got[inst.kind] = _send_sendmail(inst, PERCENT_CASES[name], f"rs6-{name}")
        _dump(name, got)
        pair.results[key] = got
    got = pair.results[key]
    assert got["postwell"] == got["postfix"]
    assert "orig_to=<" in got["postfix"]["line"]
    if "status=bounced" in got["postfix"]["line"]:
        notices = {inst.kind: _wait_notices(inst, [f"rs6-{name}"])[f"rs6-{name}"]
                   for inst in (pair.ref, pair.pw)}
        _dump(f"notice {name}", notices)
        assert notices["postwell"] == notices["postfix"]
