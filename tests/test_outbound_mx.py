"""Issue 4 end to end: MX selection through a real name server on loopback.

dnsmasq (Debian's dnsmasq-base) serves MX/A records for test domains on
127.0.5.53:53; the MX targets are SMTP peers on other loopback addresses that all
listen on one port, which both MTAs use as smtp_tcp_port (Postfix's default port
for MX hosts).  postwell asks the server through postwell_dns_servers; the
reference Postfix, which only reads /etc/resolv.conf, runs in its own mount
namespace where a bind-mounted resolv.conf names that server.  Nothing here asks
DNS outside the machine: dnsmasq has no upstream (no-resolv) and every test
domain lives under .test.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time

import pytest

import harness
from test_outbound_peers import PySink, bindable
from test_outbound_relay import outbound_postwell, send

DNSMASQ = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"
UNSHARE = shutil.which("unshare")
pytestmark = pytest.mark.skipif(not os.access(DNSMASQ, os.X_OK),
                                reason="dnsmasq not installed (dnsmasq-base)")

NS = "127.0.5.53"
MX1, MX2, DEAD, GREY = "127.0.5.2", "127.0.5.3", "127.0.5.4", "127.0.5.5"
PFX = "127.0.5.6"       # a reference Postfix as an MX target
ZONE = f"""
no-resolv
no-hosts
local=/test/
mx-host=pref.test,mx1.pref.test,10
mx-host=pref.test,mx2.pref.test,20
host-record=mx1.pref.test,{MX1}
host-record=mx2.pref.test,{MX2}
mx-host=dead.test,down.dead.test,10
mx-host=dead.test,mx2.pref.test,20
host-record=down.dead.test,{DEAD}
mx-host=grey.test,busy.grey.test,10
mx-host=grey.test,mx2.pref.test,20
host-record=busy.grey.test,{GREY}
host-record=nomx.test,{MX2}
mx-host=nullmx.test,.,0
mx-host=pfx.test,mx.pfx.test,10
host-record=mx.pfx.test,{PFX}
server=/broken.test/127.0.0.1#9
"""
SENDER = f"alice@{harness.VIRTUAL_DOMAIN}"


def start_dnsmasq(root, port: int):
    conf = root / "dnsmasq.conf"
    conf.write_text(f"port={port}\nlisten-address={NS}\nbind-interfaces\n" + ZONE)
    argv = [DNSMASQ, "-k", f"--conf-file={conf}", "--pid-file="]
    if os.geteuid() == 0:
        argv.append("--user=nobody")
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    import dns.message
    import dns.query
    deadline = time.monotonic() + 10
    while True:
        try:
            q = dns.message.make_query("pref.test", "MX")
            if dns.query.udp(q, NS, timeout=0.5, port=port).answer:
                return proc
        except Exception:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.skip(f"dnsmasq did not start: {proc.stderr.read()!r}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """(dns port, smtp port, {address: PySink}) for the whole module."""
    root = tmp_path_factory.mktemp("mxworld")
    dns_port = 53 if bindable(NS, 53) else harness.free_port()
    proc = start_dnsmasq(root, dns_port)
    sinks = {}
    try:
        for _ in range(20):
            port = harness.free_port()
            if all(bindable(a, port) for a in (MX1, MX2, DEAD, GREY, PFX)):
                break
        sinks[MX1] = PySink(host=MX1, port=port, name="mx1.pref.test").start()
        sinks[MX2] = PySink(host=MX2, port=port, name="mx2.pref.test").start()
        # RFC 5321 3.8: a 421 greeting means "try elsewhere"; DEAD has no listener at all.
        sinks[GREY] = PySink(host=GREY, port=port, name="busy.grey.test",
                             greeting="421 4.3.2 busy.grey.test Service not available").start()
        yield dns_port, port, sinks
    finally:
        for s in sinks.values():
            s.stop()
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()


def mx_params(dns_port: int, smtp_port: int) -> dict:
    return {"disable_dns_lookups": "no", "smtp_host_lookup": "dns",
            "postwell_dns_servers": f"{NS}:{dns_port}", "smtp_tcp_port": str(smtp_port),
            "queue_run_delay": "300s", "minimal_backoff_time": "300s",
            "maximal_backoff_time": "600s"}


class NamespacedReference(harness.ReferencePostfix):
    """A reference Postfix whose processes see a resolv.conf naming our dnsmasq
    (``nameserver``: a module with its own dnsmasq subclasses with its address)."""

    nameserver = NS

    def postfix(self, *args, timeout=60.0, check=False):
        if args[:1] != ("start",):
            return super().postfix(*args, timeout=timeout, check=check)
        resolv = self.root / "resolv.conf"
        resolv.write_text(f"nameserver {self.nameserver}\noptions attempts:1 timeout:1\n")
        # The mount must succeed before Postfix starts, or it would ask the real resolver.
        script = ('mount --bind "$1" /etc/resolv.conf && grep -qx "nameserver $2" /etc/resolv.conf '
                  '&& exec "$3" -c "$4" start')
        cmd = [UNSHARE, "-m", "--propagation", "private", "sh", "-c", script, "sh",
               str(resolv), self.nameserver, harness.POSTFIX_BIN, str(self.config_dir)]
        cp = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                            stdin=subprocess.DEVNULL)
        if check and cp.returncode != 0:
            raise AssertionError(f"namespaced postfix start failed: {cp.stderr}")
        return cp


def outcome(inst, rcpt: str, timeout: float = 30) -> str:
    """status/dsn/relay and reason of the first delivery line for ``rcpt``."""
    m = inst.wait_log(rf"to=<{re.escape(rcpt)}>, relay=(\S+), .*?dsn=(\S+), status=(\w+) (.*)$",
                      timeout)
    return f"{m.group(3)} dsn={m.group(2)} relay={m.group(1)} {m.group(4)}"


CASES = [
    # domain, expected status, relay, dsn, reason (postwell; the reference must agree)
    ("pref.test", "sent", f"mx1.pref.test[{MX1}]:{{port}}", "2.0.0", "(250 2.0.0 Ok: queued)"),
    ("dead.test", "sent", f"mx2.pref.test[{MX2}]:{{port}}", "2.0.0", "(250 2.0.0 Ok: queued)"),
    ("grey.test", "sent", f"mx2.pref.test[{MX2}]:{{port}}", "2.0.0", "(250 2.0.0 Ok: queued)"),
    ("nomx.test", "sent", f"nomx.test[{MX2}]:{{port}}", "2.0.0", "(250 2.0.0 Ok: queued)"),
    ("nullmx.test", "bounced", "none", "5.1.0",
     "(Domain nullmx.test does not accept mail (nullMX))"),
    ("nope.test", "bounced", "none", "5.4.4", "(Host or domain name not found. Name service "
     "error for name=nope.test type=A: Host not found)"),
    ("x.broken.test", "deferred", "none", "4.4.3", "(Host or domain name not found. Name "
     "service error for name=x.broken.test type=MX: Host not found, try again)"),
]


def run_cases(inst, tag: str):
    for domain, *_ in CASES:
        send(inst.port, [f"user-{tag}@{domain}"], harness.make_message(f"{tag}-{domain}"),
             sender=SENDER)
    return {d: outcome(inst, f"user-{tag}@{d}") for d, *_ in CASES}


def expected(port: int):
    return {d: f"{st} dsn={dsn} relay={relay.format(port=port)} {reason}"
            for d, st, relay, dsn, reason in CASES}


def test_mx_selection_fallbacks_and_dns_errors(world, postwell_factory):
    dns_port, port, sinks = world
    pw = outbound_postwell(postwell_factory, mx_params(dns_port, port)).start()
    got = run_cases(pw, "pw")
    want = expected(port)
    mismatches = {d: (got[d], want[d]) for d in want if got[d] != want[d]}
    assert not mismatches, mismatches
    # Each message reached exactly the right peer, once.
    ids = {a: s.message_ids() for a, s in sinks.items()}
    assert "<pw-pref.test@example.org>" in ids[MX1]
    for d in ("dead.test", "grey.test", "nomx.test"):
        assert ids[MX2].count(f"<pw-{d}@example.org>") == 1, ids
    # Bounces for null MX and NXDOMAIN come back to the sender; SERVFAIL stays queued.
    pw.wait_maildir("alice", 2, 20)
    q = pw.run("postqueue", "-p").stdout
    assert "x.broken.test" in q and "try again" in q, q


@pytest.mark.skipif(UNSHARE is None or os.geteuid() != 0, reason="needs unshare(1) and root")
@pytest.mark.skipif(harness.reference_available() is not None,
                    reason=str(harness.reference_available()))
def test_reference_postfix_agrees_on_mx_outcomes(world, tmp_path, postwell_factory):
    dns_port, port, _ = world
    if dns_port != 53:
        pytest.skip("port 53 on the test name server address is taken: "
                    "the reference's resolver cannot be pointed elsewhere")
    params = mx_params(dns_port, port)
    params.pop("postwell_dns_servers")
    ref = NamespacedReference(tmp_path, params, name="mxref")
    try:
        ref.start()
        got = run_cases(ref, "ref")
    finally:
        ref.stop()
        ref.cleanup()
    # Postfix 3.7 facts this pins: null MX is dsn=5.1.0 (not RFC 7505's 5.1.10), and
    # NXDOMAIN for the MX query is reported from the A lookup that follows it.
    assert got == expected(port), got


@pytest.mark.parametrize("relayhost,peer,relay", [
    ("pref.test", MX1, "mx1.pref.test[{ip}]:{port}"),          # MX lookup of the relayhost
    ("[mx2.pref.test]", MX2, "mx2.pref.test[{ip}]:{port}"),   # [] : A record only, no MX
    ("[nomx.test]", MX2, "nomx.test[{ip}]:{port}"),
])
def test_relayhost_forms_through_dns(world, postwell_factory, relayhost, peer, relay):
    dns_port, port, sinks = world
    pw = outbound_postwell(postwell_factory, {**mx_params(dns_port, port),
                                              "relayhost": relayhost}).start()
    tag = f"rh-{relayhost.strip('[]')}"
    send(pw.port, ["someone@elsewhere.test"], harness.make_message(tag), sender=SENDER)
    got = outcome(pw, "someone@elsewhere.test")
    assert got == f"sent dsn=2.0.0 relay={relay.format(ip=peer, port=port)} (250 2.0.0 Ok: queued)"
    assert f"<{tag}@example.org>" in sinks[peer].message_ids()


@pytest.mark.skipif(harness.reference_available() is not None,
                    reason=str(harness.reference_available()))
def test_delivery_to_a_reference_postfix_found_by_mx(world, reference_factory, postwell_factory):
    """The issue's "real Postfix as MX target": its smtpd on the MX address, port smtp_tcp_port."""
    dns_port, port, _ = world
    target = reference_factory(name="mxtarget")
    (target.config_dir / "vmailbox2").write_text("bob@pfx.test pfx.test/bob/\n")
    # Not in inet_interfaces: Postfix refuses an address no interface carries
    # (lo has 127.0.0.1/8 only), but master.cf may name any address to bind.
    target.main_cf_extra = {"virtual_mailbox_domains": "pfx.test",
                            "virtual_mailbox_maps": f"texthash:{target.config_dir}/vmailbox2"}
    target.master_cf_extra = f"{PFX}:{port} inet n - n - - smtpd\n"
    target.write_config()
    target.start()
    harness.wait_port(port, 15, host=PFX)
    pw = outbound_postwell(postwell_factory, mx_params(dns_port, port)).start()
    send(pw.port, ["bob@pfx.test"], harness.make_message("to-pfx"), sender=SENDER)
    m = pw.wait_log(r"to=<bob@pfx\.test>, relay=mx\.pfx\.test\[127\.0\.5\.6\]:%d, .*dsn=2\.0\.0, "
                    r"status=sent \(250 2\.0\.0 Ok: queued as (\w+)\)$" % port, 30)
    target.wait_log(rf"{m.group(1)}: to=<bob@pfx\.test>.*status=sent \(delivered to maildir\)", 20)
    path = target.mail_dir / "pfx.test" / "bob" / "new"
    files = harness.wait_for(lambda: path.is_dir() and list(path.iterdir()), 10, 0.1, "mailbox")
    assert harness.check_delivered(files[0]) == ("to-pfx", True)
