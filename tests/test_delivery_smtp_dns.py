"""smtp(8) end to end with real DNS: dnsmasq on loopback serves the MX records.

Needs the Debian package dnsmasq-base; the resolver asks 127.0.0.1 only.
"""

import random

from postwell.delivery.smtp import SmtpDeliveryAgent
from postwell.log import NullLog

from test_delivery_smtp import ScriptedServer, make_config, request, run, with_server
from test_dns_dnsmasq import DNSMASQ, nameserver, pytestmark  # noqa: F401 - fixture, skip mark


def test_mx_lookup_then_delivery(nameserver):
    srv = ScriptedServer()

    async def body(srv):
        a = SmtpDeliveryAgent(make_config(), nameserver, NullLog("smtp"), rng=random.Random(0),
                              own_addresses=frozenset())
        res = await a.deliver(request(f"example.test:{srv.port}", ["a@example.test"]))
        await a.close_all()
        return res[0]
    res = run(with_server(srv, body))
    # MX 10 mx1.example.test -> 127.0.0.1, where the scripted server listens.
    assert res.status == "sent" and res.relay == f"mx1.example.test[127.0.0.1]:{srv.port}"


def test_null_mx_and_nxdomain_via_dns(nameserver):
    async def body():
        a = SmtpDeliveryAgent(make_config(), nameserver, NullLog("smtp"), rng=random.Random(0),
                              own_addresses=frozenset())
        out = [(await a.deliver(request(d, [f"a@{d}"])))[0] for d in ("nullmx.test", "nope.test")]
        await a.close_all()
        return out
    null, nx = run(body())
    assert (null.status, null.dsn) == ("bounced", "5.1.0")
    assert (nx.status, nx.dsn) == ("bounced", "5.4.4")
    assert nx.reason == ("Host or domain name not found. Name service error for name=nope.test "
                         "type=A: Host not found")  # as Postfix 3.7 logs it
