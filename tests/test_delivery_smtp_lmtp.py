"""The smtp(8) driver in LMTP mode (RFC 2033), as lmtp(8) would use it."""

import random

from postwell.delivery.smtp import SmtpDeliveryAgent
from postwell.dns import FakeResolver
from postwell.log import NullLog

from test_delivery_smtp import ScriptedServer, make_config, request, run, with_server


class LmtpAgent(SmtpDeliveryAgent):
    name = "lmtp"
    protocol = "lmtp"


def agent(**cfg):
    return LmtpAgent(make_config(**cfg), FakeResolver({}), NullLog("lmtp"), rng=random.Random(0),
                     own_addresses=frozenset())


def test_lmtp_over_unix_socket_per_recipient_replies(tmp_path):
    sock = tmp_path / "lmtp.sock"
    srv = ScriptedServer(unix_path=str(sock), ehlo=("PIPELINING", "ENHANCEDSTATUSCODES"),
                         rcpt={"gone@x.test": "550 5.1.1 <gone@x.test> User doesn't exist"},
                         lmtp_final={"full@x.test": "452 4.2.2 <full@x.test> Quota exceeded"})

    async def body(srv):
        a = agent()
        res = await a.deliver(request(f"unix:{sock}", ["ok@x.test", "gone@x.test", "full@x.test"]))
        await a.close_all()
        return res
    res = run(with_server(srv, body))
    assert srv.sessions[0][0] == "LHLO client.test"
    assert [r.status for r in res] == ["sent", "bounced", "deferred"]
    assert res[0].reason == "250 2.0.0 <ok@x.test> Saved"
    assert res[0].relay == f"client.test[{sock}]"
    assert res[2].reason == (f"host client.test[{sock}] said: 452 4.2.2 <full@x.test> Quota "
                             "exceeded (in reply to end of DATA command)")


def test_lmtp_inet_without_mx_lookup():
    srv = ScriptedServer(lmtp_final={})

    async def body(srv):
        resolver = FakeResolver({("127.0.0.1", "MX"): "SERVFAIL"})
        a = LmtpAgent(make_config(), resolver, NullLog("lmtp"), own_addresses=frozenset())
        res = await a.deliver(request(f"inet:127.0.0.1:{srv.port}", ["a@x.test"]))
        await a.close_all()
        return res
    res = run(with_server(srv, body))
    assert res[0].status == "sent" and res[0].relay == f"127.0.0.1[127.0.0.1]:{srv.port}"


def test_lmtp_missing_socket(tmp_path):
    a = agent()
    res = run(a.deliver(request(f"unix:{tmp_path}/nope", ["a@x.test"])))
    assert (res[0].status, res[0].dsn) == ("deferred", "4.4.1")
    assert res[0].reason == f"connect to client.test[{tmp_path}/nope]: No such file or directory"
