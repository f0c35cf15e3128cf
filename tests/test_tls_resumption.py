"""TLS session resumption both ways.

- smtp client: smtp_tls_session_cache_database makes the delivery agent offer the
  session of its last connection to the same server again (Postfix logs
  "HOST[ADDR]:PORT: Reusing old session" at smtp_tls_loglevel 2).
- smtpd: every worker of a service shares the session-ticket keys (the master
  builds the TLS context before forking them), so a client resumes on any worker.
"""

from __future__ import annotations

import random
import re
import shutil
import socket
import ssl
import subprocess

import pytest

from postwell.delivery.smtp import SmtpDeliveryAgent, TlsSessionCache
from postwell.dns import FakeResolver
from postwell.log import NullLog

from harness import PostwellInstance, ReferencePostfix, reference_available, wait_for
from test_delivery_smtp import ScriptedServer, make_config, request, run, with_server

pytestmark = [pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl missing"),
              pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    d = tmp_path_factory.mktemp("resume-cert")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(d / "key.pem"),
                    "-out", str(d / "cert.pem"), "-days", "2", "-subj", "/CN=mx.resume.test"],
                   check=True, capture_output=True, timeout=60)
    os_paths = str(d / "cert.pem"), str(d / "key.pem")
    for p in os_paths:
        (d / p).chmod(0o644)
    return os_paths


def server_ctx(cert, tls12=False):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(*cert)
    if tls12:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    return ctx


# ---------------------------------------------------------------- the cache itself

class FakeSession:
    def __init__(self, timeout=7200, ticket=True):
        self.timeout, self.has_ticket, self.id = timeout, ticket, b"x" if ticket else b""


def test_cache_expires_by_timeout_and_session_lifetime():
    now = [1000.0]
    c = TlsSessionCache(3600, clock=lambda: now[0])
    a, b = FakeSession(7200), FakeSession(60)
    c.put(("a",), a)
    c.put(("b",), b)
    assert c.get(("a",)) is a and c.get(("b",)) is b
    now[0] += 61                          # b's own lifetime is shorter than the timeout
    assert c.get(("b",)) is None and c.get(("a",)) is a
    now[0] += 3600
    assert c.get(("a",)) is None and len(c) == 0


def test_cache_is_bounded_and_skips_unresumable_sessions():
    c = TlsSessionCache(3600, clock=lambda: 0.0, limit=3)
    for i in range(5):
        c.put((i,), FakeSession())
    assert len(c) == 3 and c.get((0,)) is None and c.get((4,)) is not None
    c.put(("none",), None)
    c.put(("empty",), FakeSession(ticket=False))
    assert c.get(("none",)) is None and c.get(("empty",)) is None


# ---------------------------------------------------------------- client side

def deliver_n(srv, n, log, **cfg):
    async def body(srv):
        a = SmtpDeliveryAgent(make_config(smtp_connection_cache_on_demand="no", **cfg),
                              FakeResolver({}), log, rng=random.Random(0),
                              own_addresses=frozenset())
        out = []
        for _ in range(n):
            res = await a.deliver(request(f"[127.0.0.1]:{srv.port}", ["a@resume.test"]))
            out.append(res[0].status)
            await a.close_all()           # a new connection for every message
        return out
    return run(with_server(srv, body))


@pytest.mark.parametrize("tls12", [False, True], ids=["tls13", "tls12"])
def test_client_reuses_session_when_cache_database_set(cert, tls12):
    srv = ScriptedServer(tls=server_ctx(cert, tls12))
    log = NullLog("smtp")
    statuses = deliver_n(srv, 3, log, smtp_tls_security_level="encrypt", smtp_tls_loglevel=2,
                         smtp_tls_session_cache_database="btree:/nonexistent/smtp_scache")
    assert statuses == ["sent"] * 3 and srv.tls_sessions == [True] * 3
    reused = [ln for ln in log.lines if ln.endswith(": Reusing old session")]
    assert len(reused) == 2, log.lines
    assert re.fullmatch(r"127\.0\.0\.1\[127\.0\.0\.1\]:\d+: Reusing old session", reused[0])
    # Each connection still logs its TLS summary, as Postfix does.
    assert sum("TLS connection established to" in ln for ln in log.lines) == 3


def test_client_no_reuse_without_cache_database(cert):
    srv = ScriptedServer(tls=server_ctx(cert))
    log = NullLog("smtp")
    statuses = deliver_n(srv, 2, log, smtp_tls_security_level="encrypt", smtp_tls_loglevel=2)
    assert statuses == ["sent"] * 2
    assert not any("Reusing old session" in ln for ln in log.lines)


def test_client_cache_timeout_zero_disables(cert):
    srv = ScriptedServer(tls=server_ctx(cert))
    log = NullLog("smtp")
    deliver_n(srv, 2, log, smtp_tls_security_level="encrypt", smtp_tls_loglevel=2,
              smtp_tls_session_cache_database="btree:x", smtp_tls_session_cache_timeout="0")
    assert not any("Reusing old session" in ln for ln in log.lines)


def test_client_session_not_offered_to_another_server(cert):
    """The key includes the next hop and port: a second server gets a full handshake."""
    srv1, srv2 = ScriptedServer(tls=server_ctx(cert)), ScriptedServer(tls=server_ctx(cert))
    log = NullLog("smtp")

    async def body():
        await srv1.start()
        await srv2.start()
        try:
            a = SmtpDeliveryAgent(make_config(smtp_connection_cache_on_demand="no",
                                              smtp_tls_security_level="encrypt",
                                              smtp_tls_loglevel=2,
                                              smtp_tls_session_cache_database="btree:x"),
                                  FakeResolver({}), log, rng=random.Random(0),
                                  own_addresses=frozenset())
            for srv in (srv1, srv2):
                res = await a.deliver(request(f"[127.0.0.1]:{srv.port}", ["a@resume.test"]))
                assert res[0].status == "sent"
                await a.close_all()
        finally:
            await srv1.stop()
            await srv2.stop()
    run(body())
    assert not any("Reusing old session" in ln for ln in log.lines)


# ---------------------------------------------------------------- server side

def starttls_session(port, ctx, session=None):
    """EHLO, STARTTLS, EHLO again over TLS; returns (session, reused)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        f = raw.makefile("rb")

        def reply():
            while True:
                line = f.readline()
                assert line, "connection closed"
                if line[3:4] == b" ":
                    return line
        reply()
        raw.sendall(b"EHLO client.resume.test\r\n")
        reply()
        raw.sendall(b"STARTTLS\r\n")
        assert reply().startswith(b"220")
        tls = ctx.wrap_socket(raw, session=session)
        tf = tls.makefile("rb")
        tls.sendall(b"EHLO client.resume.test\r\n")
        while True:        # the TLS 1.3 tickets come before the EHLO reply
            line = tf.readline()
            if line[3:4] == b" ":
                break
        out = tls.session, tls.session_reused
        tls.sendall(b"QUIT\r\n")
        tf.readline()
        return out


def smtpd_pids_with_tls(inst):
    return set(re.findall(r"postfix/smtpd\[(\d+)\]: Anonymous TLS connection established",
                          inst.log_text()))


def test_smtpd_workers_share_ticket_keys(tmp_path, cert):
    inst = PostwellInstance(tmp_path, {
        "smtpd_tls_cert_file": cert[0], "smtpd_tls_key_file": cert[1],
        "smtpd_tls_security_level": "may", "smtpd_tls_loglevel": "1"})
    with inst:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        session, reused = starttls_session(inst.port, ctx)
        assert not reused
        results = []
        # Until two different workers have served TLS sessions (bounded).
        for _ in range(60):
            _s, reused = starttls_session(inst.port, ctx, session)
            results.append(reused)
            if len(results) >= 6 and len(smtpd_pids_with_tls(inst)) >= 2:
                break
        pids = smtpd_pids_with_tls(inst)
        if len(pids) < 2:
            pytest.skip("the kernel handed every connection to one worker")
        assert all(results), results


def test_smtpd_reload_without_tls_change_keeps_sessions(tmp_path, cert):
    inst = PostwellInstance(tmp_path, {
        "smtpd_tls_cert_file": cert[0], "smtpd_tls_key_file": cert[1],
        "smtpd_tls_security_level": "may"})
    with inst:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        session, _ = starttls_session(inst.port, ctx)
        inst.reload()
        wait_for(lambda: inst.log_text().count("reload --") >= 1, 10, what="reload")
        _s, reused = starttls_session(inst.port, ctx, session)
        assert reused


SMTP_SERVICE = "smtp      unix  -       -       n       -       -       smtp\n"
TLS_CLIENT = {"smtp_tls_security_level": "encrypt", "smtp_tls_loglevel": "2",
              "smtp_tls_session_cache_database": "btree:${data_directory}/smtp_scache",
              "smtp_connection_cache_on_demand": "no"}


def tls_server(cert):
    return {"smtpd_tls_cert_file": cert[0], "smtpd_tls_key_file": cert[1],
            "smtpd_tls_security_level": "may", "smtpd_tls_loglevel": "1",
            "relay_domains": "", "default_transport": "discard"}


def send_spaced(client, n):
    """n messages through `client`, each delivered before the next is sent, so every
    delivery opens its own connection."""
    import smtplib
    for i in range(n):
        with smtplib.SMTP("127.0.0.1", client.port, timeout=10) as s:
            s.sendmail("a@client.test", ["u@relay.test"], f"Subject: {i}\r\n\r\nhi\r\n")
        wait_for(lambda: client.log_text().count("status=sent") > i, 30,
                 what=f"delivery {i + 1}")


def test_postwell_client_resumes_with_real_postfix(tmp_path, cert):
    if reference_available():
        pytest.skip(reference_available())
    ref = ReferencePostfix(tmp_path / "ref", tls_server(cert))
    with ref:
        pw = PostwellInstance(tmp_path / "pw", {"relayhost": f"[127.0.0.1]:{ref.port}",
                                                 **TLS_CLIENT})
        pw.master_cf = pw.default_master_cf() + SMTP_SERVICE
        pw.write_config()
        with pw:
            send_spaced(pw, 3)
            log = pw.log_text()
    assert log.count("TLS connection established to 127.0.0.1[127.0.0.1]") == 3, log
    assert len(re.findall(r"postfix/smtp\[\d+\]: 127\.0\.0\.1\[127\.0\.0\.1\]:\d+: "
                          r"Reusing old session", log)) == 2, log


def test_real_postfix_client_resumes_with_postwell_smtpd(tmp_path, cert):
    if reference_available():
        pytest.skip(reference_available())
    pw = PostwellInstance(tmp_path / "pw", tls_server(cert))
    with pw:
        ref = ReferencePostfix(tmp_path / "ref", {"relayhost": f"[127.0.0.1]:{pw.port}",
                                                   **TLS_CLIENT})
        with ref:
            send_spaced(ref, 3)
            log = ref.log_text()
    assert len(re.findall(r"Reusing old session", log)) == 2, log
