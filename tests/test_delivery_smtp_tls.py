"""smtp(8) STARTTLS (RFC 3207) per smtp_tls_security_level, against a scripted server.

Certificates are made at test time with the openssl command (skipped without it).
"""

import asyncio
import random
import shutil
import ssl
import subprocess

import pytest

from postwell.delivery.smtp import SmtpDeliveryAgent, _cert_matches, tls_level_from_config
from postwell.dns import FakeResolver
from postwell.log import NullLog

from test_delivery_smtp import ScriptedServer, make_config, request, run, with_server

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl missing")


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def sh(*args):
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=30)
    sh("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
       "-subj", "/CN=postwell test CA")
    sh("req", *ec, "-keyout", "srv.key", "-out", "srv.csr", "-subj", "/CN=mx.tls.test")
    (d / "ext").write_text("subjectAltName=DNS:mx.tls.test\n")
    sh("x509", "-req", "-in", "srv.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
       "-CAcreateserial", "-out", "srv.pem", "-days", "2", "-extfile", "ext")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(d / "srv.pem", d / "srv.key")
    return {"ca": str(d / "ca.pem"), "server": ctx}


ZONE = {("tls.test", "MX"): [(10, "mx.tls.test")], ("mx.tls.test", "A"): ["127.0.0.1"],
        ("other.test", "MX"): [(10, "mx.other.test")], ("mx.other.test", "A"): ["127.0.0.1"]}


def deliver(srv, nexthop, log=None, **cfg):
    async def body(srv):
        a = SmtpDeliveryAgent(make_config(**cfg), FakeResolver(ZONE), log or NullLog("smtp"),
                              rng=random.Random(0), own_addresses=frozenset())
        res = await a.deliver(request(nexthop.format(port=srv.port), ["a@tls.test"]))
        await a.close_all()
        return res[0]
    return run(with_server(srv, body))


def test_may_uses_starttls_and_logs(pki):
    srv = ScriptedServer(tls=pki["server"])
    log = NullLog("smtp")
    res = deliver(srv, "[127.0.0.1]:{port}", log, smtp_tls_security_level="may",
                  smtp_tls_loglevel=1)
    assert res.status == "sent" and srv.tls_sessions == [True]
    # RFC 3207 4.2: EHLO again after the handshake.
    assert srv.sessions[0][:3] == ["EHLO client.test", "STARTTLS", "EHLO client.test"]
    assert any(line.startswith(f"Untrusted TLS connection established to 127.0.0.1[127.0.0.1]:"
                               f"{srv.port}: TLSv1.") for line in log.lines)


def test_none_never_starts_tls(pki):
    srv = ScriptedServer(tls=pki["server"])
    res = deliver(srv, "[127.0.0.1]:{port}")
    assert res.status == "sent" and srv.tls_sessions == [False]
    assert "STARTTLS" not in srv.sessions[0]


def test_may_without_starttls_goes_plain():
    srv = ScriptedServer()
    res = deliver(srv, "[127.0.0.1]:{port}", smtp_tls_security_level="may")
    assert res.status == "sent"


def test_encrypt_requires_starttls():
    srv = ScriptedServer()
    res = deliver(srv, "[127.0.0.1]:{port}", smtp_tls_security_level="encrypt")
    assert (res.status, res.dsn) == ("deferred", "4.7.4")
    assert res.reason == "TLS is required, but was not offered by host 127.0.0.1[127.0.0.1]"
    assert srv.messages == []


def test_encrypt_refused_starttls(pki):
    srv = ScriptedServer(tls=pki["server"], replies={"STARTTLS": "454 4.7.0 TLS not available"})
    res = deliver(srv, "[127.0.0.1]:{port}", smtp_tls_security_level="encrypt")
    assert (res.status, res.dsn) == ("deferred", "4.7.0")
    assert res.reason == ("TLS is required, but host 127.0.0.1[127.0.0.1] refused to start TLS: "
                          "454 4.7.0 TLS not available")


def test_may_refused_starttls_goes_plain(pki):
    srv = ScriptedServer(tls=pki["server"], replies={"STARTTLS": "454 4.7.0 TLS not available"})
    res = deliver(srv, "[127.0.0.1]:{port}", smtp_tls_security_level="may")
    assert res.status == "sent"


def test_encrypt_accepts_any_certificate(pki):
    srv = ScriptedServer(tls=pki["server"])
    res = deliver(srv, "other.test:{port}", smtp_tls_security_level="encrypt")
    assert res.status == "sent" and srv.tls_sessions == [True]


def test_verify_checks_chain_and_mx_name(pki):
    srv = ScriptedServer(tls=pki["server"])
    res = deliver(srv, "tls.test:{port}", smtp_tls_security_level="verify",
                  smtp_tls_CAfile=pki["ca"])
    assert res.status == "sent"
    srv = ScriptedServer(tls=pki["server"])
    res = deliver(srv, "other.test:{port}", smtp_tls_security_level="verify",
                  smtp_tls_CAfile=pki["ca"])
    assert (res.status, res.dsn, res.reason) == ("deferred", "4.7.5",
                                                 "Server certificate not verified")
    assert srv.messages == []


def test_verify_rejects_unknown_ca(pki):
    srv = ScriptedServer(tls=pki["server"])
    cafile = pki["ca"].replace("ca.pem", "srv.pem")    # not the issuer
    res = deliver(srv, "tls.test:{port}", smtp_tls_security_level="verify", smtp_tls_CAfile=cafile)
    assert (res.status, res.dsn) == ("deferred", "4.7.5")
    assert res.reason == "Cannot start TLS: handshake failure"
    assert srv.messages == []


def test_secure_matches_dot_nexthop(pki):
    srv = ScriptedServer(tls=pki["server"])
    res = deliver(srv, "tls.test:{port}", smtp_tls_security_level="secure",
                  smtp_tls_CAfile=pki["ca"])
    assert res.status == "sent"


def test_may_handshake_failure_retries_in_plain_text():
    srv = ScriptedServer(broken_tls=True)
    res = deliver(srv, "[127.0.0.1]:{port}", smtp_tls_security_level="may")
    assert res.status == "sent"
    assert len(srv.sessions) == 2 and "STARTTLS" not in srv.sessions[1]


def test_encrypt_handshake_failure_defers():
    srv = ScriptedServer(broken_tls=True)
    res = deliver(srv, "[127.0.0.1]:{port}", smtp_tls_security_level="encrypt")
    assert (res.status, res.dsn) == ("deferred", "4.7.5")
    assert res.reason == "Cannot start TLS: handshake failure"


def test_levels_from_config():
    assert tls_level_from_config(make_config()) == "none"
    assert tls_level_from_config(make_config(smtp_use_tls="yes")) == "may"
    assert tls_level_from_config(make_config(smtp_enforce_tls="yes")) == "verify"
    assert tls_level_from_config(make_config(smtp_enforce_tls="yes",
                                             smtp_tls_enforce_peername="no")) == "encrypt"
    assert tls_level_from_config(make_config(smtp_tls_security_level="dane")) == "may"


def test_certificate_name_matching():
    cert = {"subjectAltName": (("DNS", "*.example.com"), ("DNS", "mx.example.org"))}
    assert _cert_matches(cert, ["a.example.com"])
    assert not _cert_matches(cert, ["a.b.example.com"])
    assert not _cert_matches(cert, ["example.com"])
    assert _cert_matches(cert, ["example.org", ".example.org"])
    assert not _cert_matches({"subject": ((("commonName", "x.test"),),)}, ["y.test"])
    assert _cert_matches({"subject": ((("commonName", "x.test"),),)}, ["x.test"])


def test_policy_map_overrides_global_level():
    srv = ScriptedServer()

    async def body(srv):
        nexthop = f"[127.0.0.1]:{srv.port}"
        cfg = make_config(smtp_tls_policy_maps=f"inline:{{ {nexthop}=encrypt }}")
        a = SmtpDeliveryAgent(cfg, FakeResolver(ZONE), NullLog("smtp"), rng=random.Random(0),
                              own_addresses=frozenset())
        r = await a.deliver(request(nexthop, ["a@tls.test"]))
        await a.close_all()
        return r[0]
    res = run(with_server(srv, body))
    assert (res.status, res.dsn) == ("deferred", "4.7.4")


def test_policy_lookup_keys_and_values():
    a = SmtpDeliveryAgent(make_config(smtp_tls_policy_maps=(
        "inline:{ {.example.com=verify match=hostname:nexthop}, example.com=secure, "
        "[relay.test]:587=encrypt, {fp.test=fingerprint match=AB:CD|EF:01}, dane.test=dane }")),
        FakeResolver({}), NullLog("smtp"), own_addresses=frozenset())
    assert a._tls_policy("example.com") == ("secure", None)
    assert a._tls_policy("mx.sub.example.com") == ("verify", ["hostname", "nexthop"])
    assert a._tls_policy("[relay.test]:587") == ("encrypt", None)
    assert a._tls_policy("[relay.test]") == (None, None)
    assert a._tls_policy("fp.test") == ("fingerprint", ["AB:CD", "EF:01"])
    assert a._tls_policy("dane.test") == ("may", None)
    assert a._tls_policy("other.test") == (None, None)


def test_fingerprint_level(pki, tmp_path):
    import hashlib
    der = ssl.PEM_cert_to_DER_cert(open(pki["ca"].replace("ca.pem", "srv.pem")).read())
    fp = ":".join(f"{b:02X}" for b in hashlib.sha256(der).digest())
    srv = ScriptedServer(tls=pki["server"])
    res = deliver(srv, "[127.0.0.1]:{port}", smtp_tls_security_level="fingerprint",
                  smtp_tls_fingerprint_digest="sha256", smtp_tls_fingerprint_cert_match=fp)
    assert res.status == "sent"
    srv = ScriptedServer(tls=pki["server"])
    res = deliver(srv, "[127.0.0.1]:{port}", smtp_tls_security_level="fingerprint",
                  smtp_tls_fingerprint_digest="sha256", smtp_tls_fingerprint_cert_match="00:11")
    assert (res.status, res.reason) == ("deferred", "Server certificate not verified")


def deliver_lmtp(srv, nexthop, **cfg):
    from postwell.delivery.lmtp import LmtpDeliveryAgent

    async def body(srv):
        a = LmtpDeliveryAgent(make_config(lmtp_lhlo_name="client.test", **cfg), FakeResolver(ZONE),
                              NullLog("lmtp"), rng=random.Random(0), own_addresses=frozenset())
        res = await a.deliver(request(nexthop.format(port=srv.port), ["a@tls.test"]))
        await a.close_all()
        return res[0]
    return run(with_server(srv, body))


def test_lmtp_reads_lmtp_tls_names_not_smtp_ones(pki):
    # lmtp(8) takes its TLS settings from the lmtp_tls_* names; the smtp_tls_* ones
    # (here deliberately wrong) belong to smtp(8).
    import hashlib
    der = ssl.PEM_cert_to_DER_cert(open(pki["ca"].replace("ca.pem", "srv.pem")).read())
    fp = ":".join(f"{b:02X}" for b in hashlib.sha256(der).digest())
    wrong_ca = pki["ca"].replace("ca.pem", "srv.pem")
    srv = ScriptedServer(tls=pki["server"], lmtp_final={})
    res = deliver_lmtp(srv, "inet:127.0.0.1:{port}", lmtp_tls_security_level="fingerprint",
                       lmtp_tls_fingerprint_digest="sha256", lmtp_tls_fingerprint_cert_match=fp,
                       smtp_tls_fingerprint_digest="md5", smtp_tls_fingerprint_cert_match="00:11")
    assert res.status == "sent", res.reason
    assert srv.sessions[0][:2] == ["LHLO client.test", "STARTTLS"]
    srv = ScriptedServer(tls=pki["server"], lmtp_final={})
    res = deliver_lmtp(srv, "inet:127.0.0.1:{port}", lmtp_tls_security_level="secure",
                       lmtp_tls_CAfile=pki["ca"], lmtp_tls_secure_cert_match="mx.tls.test",
                       smtp_tls_CAfile=wrong_ca, smtp_tls_secure_cert_match="nowhere.test")
    assert res.status == "sent", res.reason
    # And the lmtp_ names do refuse: a CA that did not issue the certificate.
    srv = ScriptedServer(tls=pki["server"], lmtp_final={})
    res = deliver_lmtp(srv, "inet:127.0.0.1:{port}", lmtp_tls_security_level="secure",
                       lmtp_tls_CAfile=wrong_ca, lmtp_tls_secure_cert_match="mx.tls.test",
                       smtp_tls_CAfile=pki["ca"])
    assert (res.status, res.dsn) == ("deferred", "4.7.5")
