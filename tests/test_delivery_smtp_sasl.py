"""smtp(8) SASL client authentication (RFC 4954; PLAIN RFC 4616, LOGIN)."""

import random

from postwell.delivery.smtp import SmtpDeliveryAgent
from postwell.dns import FakeResolver
from postwell.log import NullLog

from test_delivery_smtp import ScriptedServer, make_config, request, run, with_server

RELAY = "[127.0.0.1]:{port}"


def deliver(srv, **cfg):
    async def body(srv):
        nexthop = RELAY.format(port=srv.port)
        params = {"smtp_sasl_auth_enable": "yes",
                  "smtp_sasl_password_maps": f"inline:{{ {nexthop}=joe:s3cret:x }}",
                  "smtp_sasl_security_options": "noanonymous"}
        params.update(cfg)
        a = SmtpDeliveryAgent(make_config(**params), FakeResolver({}), NullLog("smtp"),
                              rng=random.Random(0), own_addresses=frozenset())
        res = await a.deliver(request(nexthop, ["a@x.test"]))
        await a.close_all()
        return res[0]
    return run(with_server(srv, body))


def test_plain_login_with_password_containing_colon():
    srv = ScriptedServer(auth={"joe": "s3cret:x"})
    res = deliver(srv)
    assert res.status == "sent"
    assert srv.logins == [("PLAIN", "joe", "s3cret:x")]
    assert srv.sessions[0][1].startswith("AUTH PLAIN ")
    assert srv.sessions[0][2].startswith("MAIL FROM:")


def test_login_mechanism():
    srv = ScriptedServer(auth={"joe": "s3cret:x"})
    srv.auth_line = "AUTH LOGIN"
    res = deliver(srv)
    assert res.status == "sent" and srv.logins == [("LOGIN", "joe", "s3cret:x")]


def test_auth_failure_soft_bounces():
    srv = ScriptedServer(auth={"joe": "other"})
    res = deliver(srv)
    assert (res.status, res.dsn) == ("deferred", "4.7.8")
    assert res.reason == ("SASL authentication failed; server 127.0.0.1[127.0.0.1] said: "
                          "535 5.7.8 Error: authentication failed: authentication failure")
    assert srv.messages == []


def test_auth_failure_hard_without_soft_bounce():
    srv = ScriptedServer(auth={"joe": "other"})
    res = deliver(srv, smtp_sasl_auth_soft_bounce="no")
    assert (res.status, res.dsn) == ("bounced", "5.7.8")


def test_default_security_options_forbid_plaintext_mechanisms():
    srv = ScriptedServer(auth={"joe": "s3cret:x"})
    res = deliver(srv, smtp_sasl_security_options="noplaintext, noanonymous")
    assert (res.status, res.dsn) == ("deferred", "4.7.0")
    assert res.reason == ("SASL authentication failed; cannot authenticate to server "
                          "127.0.0.1[127.0.0.1]: no mechanism available")


def test_no_password_entry_means_no_auth():
    srv = ScriptedServer(auth={"joe": "s3cret:x"})
    res = deliver(srv, smtp_sasl_password_maps="inline:{ [elsewhere]:587=a:b }")
    assert res.status == "sent" and srv.logins == []


def test_server_without_auth():
    srv = ScriptedServer()
    res = deliver(srv)
    assert res.status == "sent" and srv.logins == []


def test_sender_dependent_credentials():
    srv = ScriptedServer(auth={"sally": "pw"})
    res = deliver(srv, smtp_sender_dependent_authentication="yes",
                  smtp_sasl_password_maps="inline:{ @client.test=sally:pw }")
    assert res.status == "sent" and srv.logins == [("PLAIN", "sally", "pw")]


def test_sender_dependent_authentication_disables_caching():
    srv = ScriptedServer(auth={"sally": "pw"})

    async def body(srv):
        nexthop = RELAY.format(port=srv.port)
        cfg = make_config(smtp_sasl_auth_enable="yes", smtp_sasl_security_options="noanonymous",
                          smtp_sender_dependent_authentication="yes",
                          smtp_sasl_password_maps="inline:{ @client.test=sally:pw }")
        a = SmtpDeliveryAgent(cfg, FakeResolver({}), NullLog("smtp"), rng=random.Random(0),
                              own_addresses=frozenset())
        for _ in range(2):
            await a.deliver(request(nexthop, ["a@x.test"]))
        await a.close_all()
    run(with_server(srv, body))
    assert len(srv.sessions) == 2
