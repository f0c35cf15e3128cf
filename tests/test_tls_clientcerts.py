"""TLS client certificates on the server side (issue 5): smtpd_tls_ask_ccert /
smtpd_tls_req_ccert, fingerprints (smtpd_tls_fingerprint_digest), relay_clientcerts with
permit_tls_clientcerts / permit_tls_all_clientcerts, check_ccert_access, the log and
Received texts and the policy delegation attributes -- checked against Postfix 3.7.

Certificates are made at test time with openssl: a CA, a client certificate it signed, a
self-signed one (untrusted), an EC one, and a leaf under an intermediate CA (for
smtpd_tls_ccert_verifydepth).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import ssl
import subprocess

import pytest

from postwell.config import load_config
from postwell.policy.smtpd_policy import policy_tls_attributes, xtext
from postwell.policy.state import SessionState
from postwell.tls import (TlsConfigError, check_tls_config, client_cert_policy, fingerprint,
                          parse_certificate, server_context)

from test_smtpd import WAIT, Running

pytestmark = pytest.mark.timeout(120)

FP_RE = r"(?:[0-9A-F]{2}:){31}[0-9A-F]{2}"


def _openssl(*args: str, cwd=None) -> str:
    cp = subprocess.run(["openssl", *args], capture_output=True, text=True, timeout=60, cwd=cwd)
    assert cp.returncode == 0, cp.stderr
    return cp.stdout


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    if not shutil.which("openssl"):
        pytest.skip("openssl not installed")
    d = tmp_path_factory.mktemp("ccpki")
    os.chmod(d, 0o755)
    o = lambda *a: _openssl(*a, cwd=d)   # noqa: E731
    o("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
      "-days", "3", "-subj", "/CN=Test CA")
    o("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out",
      "server.pem", "-days", "3", "-subj", "/CN=mx.example.test")
    o("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "client.key", "-out", "client.csr",
      "-subj", "/CN=client.example.test")
    o("x509", "-req", "-in", "client.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
      "-CAcreateserial", "-out", "client.pem", "-days", "3")
    o("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "self.key", "-out", "self.pem",
      "-days", "3", "-subj", "/CN=selfsigned.example.test")
    o("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "ec.key")
    o("req", "-new", "-x509", "-key", "ec.key", "-out", "ec.pem", "-days", "3",
      "-subj", "/O=Example Org/CN=ec.example.test")
    # CA -> intermediate -> leaf (the leaf file carries the intermediate too).
    (d / "v3.cnf").write_text("[v3_ca]\nbasicConstraints=critical,CA:TRUE\n"
                              "keyUsage=critical,keyCertSign,cRLSign\n")
    o("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "inter.key", "-out", "inter.csr",
      "-subj", "/O=Intermediate Org")
    o("x509", "-req", "-in", "inter.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
      "-CAcreateserial", "-out", "inter.pem", "-days", "3", "-extfile", "v3.cnf",
      "-extensions", "v3_ca")
    o("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "leaf.key", "-out", "leaf.csr",
      "-subj", "/CN=leaf.example.test")
    o("x509", "-req", "-in", "leaf.csr", "-CA", "inter.pem", "-CAkey", "inter.key",
      "-CAcreateserial", "-out", "leaf-only.pem", "-days", "3")
    (d / "leaf.pem").write_text((d / "leaf-only.pem").read_text() + (d / "inter.pem").read_text())
    o("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "nocn.key", "-out",
      "nocn.pem", "-days", "3", "-subj", "/O=No CN Org")
    (d / "garbage.pem").write_text("not a certificate\n")
    for f in d.iterdir():
        os.chmod(f, 0o644)    # the reference Postfix reads them as its own user; test keys
    return d


def cert_prints(pki, name: str, digest: str = "sha256") -> tuple[str, str]:
    """(certificate, public key) fingerprints as openssl computes them."""
    path = str(pki / f"{name}.pem")
    out = _openssl("x509", "-in", path, "-noout", "-fingerprint", f"-{digest}")
    cert = out.strip().split("=", 1)[1]
    pub = subprocess.run(f"openssl x509 -in {path} -noout -pubkey | openssl pkey -pubin "
                         f"-outform DER | openssl dgst -{digest} -c", shell=True,
                         capture_output=True, text=True, timeout=60, check=True).stdout
    return cert, pub.strip().split("= ", 1)[1].upper()


def config(tmp_path, **params):
    etc = tmp_path / f"etc{len(list(tmp_path.glob('etc*')))}"
    etc.mkdir()
    (etc / "main.cf").write_text("compatibility_level = 3.6\n"
                                 + "".join(f"{k} = {v}\n" for k, v in params.items()))
    return load_config(str(etc))


def tls_params(pki, **more) -> dict:
    p = {"smtpd_tls_cert_file": str(pki / "server.pem"),
         "smtpd_tls_key_file": str(pki / "server.key"),
         "smtpd_tls_security_level": "may", "smtpd_tls_loglevel": "1",
         "smtpd_tls_received_header": "yes", "smtpd_tls_ask_ccert": "yes",
         "smtpd_tls_CAfile": str(pki / "ca.pem"),
         "mynetworks": "10.9.9.0/24"}
    p.update(more)
    return p


def client_ctx(pki=None, name: str | None = None, tls12: bool = False) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if tls12:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    if name:
        ctx.load_cert_chain(str(pki / f"{name}.pem"), str(pki / f"{name}.key"))
    return ctx


class Wire:
    """Line-level SMTP over loopback that can switch to TLS with a client certificate."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
        self.buf = b""

    def reply(self) -> tuple[int, str]:
        lines = []
        while True:
            while b"\r\n" not in self.buf:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise EOFError(f"closed after {lines!r}")
                self.buf += chunk
            line, self.buf = self.buf.split(b"\r\n", 1)
            text = line.decode()
            lines.append(text[4:])
            if text[3:4] == " ":
                return int(text[:3]), "\n".join(lines)

    def cmd(self, line: str) -> tuple[int, str]:
        self.sock.sendall(line.encode() + b"\r\n")
        return self.reply()

    def starttls(self, ctx: ssl.SSLContext) -> None:
        assert self.cmd("STARTTLS") == (220, "2.0.0 Ready to start TLS")
        self.sock = ctx.wrap_socket(self.sock)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def session(port: int, ctx: ssl.SSLContext | None, rcpt: str, data: bool = True,
            helo: str = "c.example") -> list[tuple[int, str]]:
    """EHLO, STARTTLS (with ctx's certificate), EHLO, MAIL, RCPT[, DATA], QUIT; the replies
    after the first EHLO, queue ids replaced."""
    w = Wire(port)
    out = []
    try:
        w.reply()
        w.cmd(f"EHLO {helo}")
        if ctx is not None:
            w.starttls(ctx)
        for line in (f"EHLO {helo}", "MAIL FROM:<a@example.org>", f"RCPT TO:<{rcpt}>"):
            code, text = w.cmd(line)
            out.append((code, text.split("\n")[0] if code == 250 and "\n" in text else text))
            if code >= 400:
                break
        if data and out[-1][0] == 250:
            out.append(w.cmd("DATA"))
            code, text = w.cmd("Subject: cc\r\n\r\nhi\r\n.")
            out.append((code, re.sub(r"queued as \w+", "queued as ID", text)))
        out.append(w.cmd("QUIT"))
    finally:
        w.close()
    return out


@pytest.fixture
def servers(tmp_path):
    made = []

    def make(extra=None, **kw):
        d = tmp_path / f"s{len(made)}"
        d.mkdir()
        r = Running(d, extra, **kw)
        made.append(r)
        return r

    yield make
    for r in made:
        r.stop()


def queued_content(r: Running) -> str:
    qid = r.wait_log(r"client=unknown\[127\.0\.0\.1\]").split(":")[0]
    r.wait_log("disconnect from")
    with r.store.open(qid, "incoming") as qm:
        return b"".join(qm.iter_content()).decode()


def tls_comment(content: str) -> str:
    """The Received header's lines between "Received: from" and "\\tby"."""
    m = re.search(r"^Received: from [^\n]*\n(.*?)\n\tby ", content, re.M | re.S)
    assert m, content[:800]
    return m.group(1)


# ---------------------------------------------------------------- certificates, fingerprints

def test_fingerprints_match_openssl(pki):
    for name in ("client", "self", "ec"):
        der = ssl.PEM_cert_to_DER_cert((pki / f"{name}.pem").read_text())
        subject, issuer, spki = parse_certificate(der)
        for digest in ("sha256", "md5", "sha1"):
            want = cert_prints(pki, name, digest)
            assert (fingerprint(der, digest), fingerprint(spki, digest)) == want
    der = ssl.PEM_cert_to_DER_cert((pki / "client.pem").read_text())
    assert parse_certificate(der)[:2] == ("client.example.test", "Test CA")
    der = ssl.PEM_cert_to_DER_cert((pki / "leaf-only.pem").read_text())
    # An issuer without a CN is named by its O, as Postfix's tls_issuer_CN() does.
    assert parse_certificate(der)[:2] == ("leaf.example.test", "Intermediate Org")


def test_parse_certificate_refuses_malformed_der(pki):
    der = ssl.PEM_cert_to_DER_cert((pki / "client.pem").read_text())
    for bad in (b"", b"\x30", der[:40], b"\x30\x84\xff\xff\xff\xff" + der[6:], b"\x1f" * 10):
        with pytest.raises((ValueError, IndexError)):
            parse_certificate(bad)


def test_parse_certificate_survives_mutations(pki):
    """Any damage is a ValueError/IndexError or a parse, never something else (the DER
    comes from the client)."""
    import random
    rnd = random.Random(5)
    good = [ssl.PEM_cert_to_DER_cert((pki / f"{n}.pem").read_text())
            for n in ("client", "ec", "leaf-only", "nocn")]
    for _ in range(3000):
        der = bytearray(rnd.choice(good))
        for _ in range(rnd.randint(1, 4)):
            i = rnd.randrange(len(der))
            der[i] = rnd.randrange(256)
        if rnd.random() < 0.3:
            der = der[:rnd.randrange(len(der))]
        try:
            subject, issuer, spki = parse_certificate(bytes(der))
        except (ValueError, IndexError):
            continue
        assert isinstance(subject, str) and isinstance(issuer, str) and len(spki) <= len(der)
        assert len(subject.encode()) < 256 and not any(ord(c) < 32 for c in subject + issuer)


def test_server_context_asks_and_accepts_untrusted(tmp_path, pki):
    ctx = server_context(config(tmp_path, **tls_params(pki)))
    pol = client_cert_policy(ctx)
    assert pol.ask and not pol.require and pol.untrusted_ok and pol.digest == "sha256"
    assert ctx.verify_mode == ssl.CERT_OPTIONAL
    # Without a CA file Postfix still asks; every certificate is then untrusted.
    params = tls_params(pki)
    del params["smtpd_tls_CAfile"]
    assert client_cert_policy(server_context(config(tmp_path, **params))).ask
    ctx = server_context(config(tmp_path, **tls_params(pki, smtpd_tls_ask_ccert="no")))
    assert not client_cert_policy(ctx).ask and ctx.verify_mode == ssl.CERT_NONE


def test_fingerprint_digest_default_follows_compatibility_level(tmp_path, pki):
    ctx = server_context(config(tmp_path, **tls_params(pki)))
    assert client_cert_policy(ctx).digest == "sha256"
    etc = tmp_path / "old"
    etc.mkdir()
    (etc / "main.cf").write_text("compatibility_level = 2\n" + "".join(
        f"{k} = {v}\n" for k, v in tls_params(pki).items()))
    assert client_cert_policy(server_context(load_config(str(etc)))).digest == "md5"
    with pytest.raises(TlsConfigError, match='Digest algorithm "nosuch" not found'):
        server_context(config(tmp_path, **tls_params(pki, smtpd_tls_fingerprint_digest="nosuch")))


def test_req_ccert_needs_encrypt(tmp_path, pki):
    ctx = server_context(config(tmp_path, **tls_params(pki, smtpd_tls_req_ccert="yes")))
    pol = client_cert_policy(ctx)
    assert not pol.require and pol.warnings == ["Can't require client certs unless TLS is required"]
    ctx = server_context(config(tmp_path, **tls_params(pki, smtpd_tls_req_ccert="yes",
                                                       smtpd_tls_ask_ccert="no",
                                                       smtpd_tls_security_level="encrypt")))
    pol = client_cert_policy(ctx)
    assert pol.require and pol.ask and not pol.warnings


def test_check_tls_config_reports_ccert_problems(tmp_path, pki):
    assert check_tls_config(config(tmp_path, **tls_params(pki))) == []
    bad = check_tls_config(config(tmp_path, **tls_params(
        pki, smtpd_tls_CAfile=str(pki / "garbage.pem"))))
    assert [p for p in bad if "garbage.pem" in p] == [
        f'cannot load Certification Authority data, CAfile="{pki}/garbage.pem": '
        'no certificate or crl found'], bad
    missing = check_tls_config(config(tmp_path, **tls_params(
        pki, smtpd_tls_CAfile=str(pki / "missing.pem"))))
    assert [p for p in missing if "missing.pem" in p] == [
        f'cannot load Certification Authority data, CAfile="{pki}/missing.pem": '
        'No such file or directory'], missing
    req = check_tls_config(config(tmp_path, **tls_params(pki, smtpd_tls_req_ccert="yes")))
    assert any("Can't require client certs unless TLS is required" in p for p in req), req
    dig = check_tls_config(config(tmp_path, **tls_params(pki, smtpd_tls_fingerprint_digest="x")))
    assert any('Digest algorithm "x" not found' in p for p in dig), dig


def test_fallback_when_the_callback_cannot_be_installed(tmp_path, pki, monkeypatch):
    import postwell.tls.introspect as intro
    monkeypatch.setattr(intro, "accept_any_client_certificate", lambda *a, **k: "no ctypes here")
    ctx = server_context(config(tmp_path, **tls_params(pki)))
    pol = client_cert_policy(ctx)
    assert not pol.untrusted_ok and ctx.verify_mode == ssl.CERT_OPTIONAL
    assert len(pol.warnings) == 1 and "no ctypes here" in pol.warnings[0]
    params = tls_params(pki)
    del params["smtpd_tls_CAfile"]
    ctx = server_context(config(tmp_path, **params))
    assert not client_cert_policy(ctx).ask and ctx.verify_mode == ssl.CERT_NONE


def test_policy_attributes():
    st = SessionState()
    assert dict(policy_tls_attributes(st)) == {
        "ccert_subject": "", "ccert_issuer": "", "ccert_fingerprint": "",
        "ccert_pubkey_fingerprint": "", "encryption_protocol": "", "encryption_cipher": "",
        "encryption_keysize": "0"}
    st.encryption_protocol, st.encryption_cipher, st.encryption_keysize = "TLSv1.3", "X", 256
    st.ccert_subject, st.ccert_issuer = "client.example.test", "Test CA h1"
    st.ccert_fingerprint, st.ccert_pubkey_fingerprint = "AA:BB", "CC:DD"
    # Untrusted: Postfix sends the fingerprints but no names.
    got = dict(policy_tls_attributes(st))
    assert got["ccert_subject"] == got["ccert_issuer"] == ""
    assert got["ccert_fingerprint"] == "AA:BB" and got["ccert_pubkey_fingerprint"] == "CC:DD"
    st.ccert_trusted = True
    got = policy_tls_attributes(st)
    assert got[:2] == [("ccert_subject", "client.example.test"), ("ccert_issuer", "Test+20CA+20h1")]
    assert got[-1] == ("encryption_keysize", "256")
    assert xtext("a+b=c\té") == "a+2Bb=c+09+C3+A9"


# ---------------------------------------------------------------- sessions

def test_log_and_received_texts(servers, pki):
    r = servers(tls_params(pki))
    expected = {
        "client": ("Trusted", "client-signature RSA-PSS (2048 bits) client-digest SHA256",
                   '(Client CN "client.example.test", Issuer "Test CA" (verified OK))'),
        "self": ("Untrusted", "client-signature RSA-PSS (2048 bits) client-digest SHA256",
                 '(Client CN "selfsigned.example.test", Issuer "selfsigned.example.test" '
                 '(not verified))'),
        "ec": ("Untrusted", "client-signature ECDSA (prime256v1) client-digest SHA256",
               '(Client CN "ec.example.test", Issuer "ec.example.test" (not verified))'),
        None: ("Anonymous", None, "(Client did not present a certificate)"),
    }
    for name, (trust, client_sig, comment) in expected.items():
        r.log.lines.clear()
        assert session(r.port, client_ctx(pki, name), "b@mx.example.test")[-2][0] == 250
        line = r.wait_log(r"TLS connection established from")
        assert line.startswith(f"{trust} TLS connection established from unknown[127.0.0.1]: "
                               "TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits) "
                               "key-exchange X25519 server-signature RSA-PSS (2048 bits) "
                               "server-digest SHA256"), line
        assert line.endswith(f"SHA256 {client_sig}" if client_sig else "server-digest SHA256")
        lines = tls_comment(queued_content(r)).split("\n")
        assert lines[-1] == "\t" + comment
        if client_sig:
            assert lines[-2] == f"\t {client_sig})"


def test_tls12_has_no_signature_details(servers, pki):
    r = servers(tls_params(pki))
    assert session(r.port, client_ctx(pki, "self", tls12=True), "b@mx.example.test")[-2][0] == 250
    line = r.wait_log(r"TLS connection established from")
    assert line == ("Untrusted TLS connection established from unknown[127.0.0.1]: TLSv1.2 with "
                    "cipher ECDHE-RSA-AES256-GCM-SHA384 (256/256 bits)")


def test_without_ca_file_every_certificate_is_untrusted(servers, pki):
    """Checked against Postfix 3.7 (TLS 1.2, no smtpd_tls_CAfile)."""
    params = tls_params(pki)
    del params["smtpd_tls_CAfile"]
    r = servers(params)
    assert session(r.port, client_ctx(pki, "client", tls12=True),
                   "b@mx.example.test")[-2][0] == 250
    assert r.wait_log("TLS connection established") == (
        "Untrusted TLS connection established from unknown[127.0.0.1]: TLSv1.2 with cipher "
        "ECDHE-RSA-AES256-GCM-SHA384 (256/256 bits)")
    assert tls_comment(queued_content(r)) == (
        "\t(using TLSv1.2 with cipher ECDHE-RSA-AES256-GCM-SHA384 (256/256 bits))\n"
        '\t(Client CN "client.example.test", Issuer "Test CA" (not verified))')


def test_loglevel_2_logs_the_fingerprints(servers, pki):
    r = servers(tls_params(pki, smtpd_tls_loglevel="2"))
    session(r.port, client_ctx(pki, "client"), "b@mx.example.test", data=False)
    fp, pk = cert_prints(pki, "client")
    r.wait_log(re.escape(f"unknown[127.0.0.1]: subject_CN=client.example.test, issuer=Test CA, "
                         f"fingerprint={fp}, pkey_fingerprint={pk}"))


def test_permit_tls_clientcerts_relays_listed_certificates(servers, pki, tmp_path):
    self_fp, _ = cert_prints(pki, "self")
    _, ec_pk = cert_prints(pki, "ec")
    table = tmp_path / "relay_ccerts"
    # Key case does not matter (Postfix folds fixed-string table keys).
    table.write_text(f"{self_fp.lower()} self\n{ec_pk} ec-by-public-key\n")
    r = servers(tls_params(pki, relay_clientcerts=f"texthash:{table}",
                           smtpd_relay_restrictions="permit_tls_clientcerts, "
                                                    "reject_unauth_destination"))
    denied = (554, "5.7.1 <x@far.example>: Relay access denied")
    # Untrusted but listed: relayed (Postfix checks the fingerprint, not the CA).
    assert session(r.port, client_ctx(pki, "self"), "x@far.example")[-2][0] == 250
    assert session(r.port, client_ctx(pki, "ec"), "x@far.example")[-2][0] == 250
    # Trusted but not listed: permit_tls_clientcerts wants a listed fingerprint.
    assert session(r.port, client_ctx(pki, "client"), "x@far.example")[2] == denied
    assert session(r.port, client_ctx(pki), "x@far.example")[2] == denied
    assert session(r.port, None, "x@far.example")[2] == denied
    assert not [x for x in r.lines() if "warning" in x]


def test_permit_tls_all_clientcerts_needs_trust(servers, pki):
    self_fp, _ = cert_prints(pki, "self")
    r = servers(tls_params(pki, relay_clientcerts=f"inline:{{ {self_fp}=yes }}",
                           smtpd_relay_restrictions="permit_tls_all_clientcerts, "
                                                    "reject_unauth_destination"))
    denied = (554, "5.7.1 <x@far.example>: Relay access denied")
    assert session(r.port, client_ctx(pki, "client"), "x@far.example")[-2][0] == 250
    # Untrusted: falls back to relay_clientcerts, as Postfix's permit_tls_clientcerts() does.
    assert session(r.port, client_ctx(pki, "self"), "x@far.example")[-2][0] == 250
    assert session(r.port, client_ctx(pki, "ec"), "x@far.example")[2] == denied


def test_verifydepth_limits_trust(servers, pki):
    deep = servers(tls_params(pki, smtpd_tls_ccert_verifydepth="1"))
    ok = servers(tls_params(pki))
    for r, trust in ((deep, "Untrusted"), (ok, "Trusted")):
        session(r.port, client_ctx(pki, "leaf"), "b@mx.example.test", data=False)
        assert r.wait_log("TLS connection established").startswith(trust)


def test_check_ccert_access(servers, pki, tmp_path):
    self_fp, self_pk = cert_prints(pki, "self")
    _, ec_pk = cert_prints(pki, "ec")
    table = tmp_path / "ccert_access"
    table.write_text(f"{self_fp} REJECT bad self\n{ec_pk} 450 4.7.9 try later\n")
    r = servers(tls_params(pki, smtpd_client_restrictions=f"check_ccert_access texthash:{table}"))
    assert session(r.port, client_ctx(pki, "self"), "b@mx.example.test")[2] == \
        (554, "5.7.1 <selfsigned.example.test>: Client certificate rejected: bad self")
    r.wait_log(r"NOQUEUE: reject: RCPT from unknown\[127\.0\.0\.1\]: 554 5\.7\.1 "
               r"<selfsigned\.example\.test>: Client certificate rejected: bad self; "
               r"from=<a@example\.org> to=<b@mx\.example\.test> proto=ESMTP helo=<c\.example>")
    assert session(r.port, client_ctx(pki, "ec"), "b@mx.example.test")[2] == \
        (450, "4.7.9 <ec.example.test>: Client certificate rejected: try later")
    assert session(r.port, client_ctx(pki, "client"), "b@mx.example.test")[-2][0] == 250
    assert session(r.port, None, "b@mx.example.test")[-2][0] == 250
    # An explicit search order: the public key only (the certificate entry no longer matches).
    spec = f"{{ texthash:{table}, {{ search_order = pubkey_fingerprint }} }}"
    r2 = servers(tls_params(pki, smtpd_helo_restrictions=f"check_ccert_access {spec}"))
    assert session(r2.port, client_ctx(pki, "self"), "b@mx.example.test")[-2][0] == 250
    assert session(r2.port, client_ctx(pki, "ec"), "b@mx.example.test")[2][0] == 450


def test_certificate_without_cn(servers, pki):
    """Checked against Postfix 3.7: an empty CN in the reject and the Received header;
    the issuer is named by its O."""
    nocn_fp, _ = cert_prints(pki, "nocn")
    r = servers(tls_params(pki, smtpd_recipient_restrictions=(
        f"check_ccert_access inline:{{ {{ {nocn_fp} = REJECT nocn }} }}")))
    assert session(r.port, client_ctx(pki, "nocn"), "b@mx.example.test")[2] == \
        (554, "5.7.1 <>: Client certificate rejected: nocn")
    r2 = servers(tls_params(pki))
    assert session(r2.port, client_ctx(pki, "nocn"), "b@mx.example.test")[-2][0] == 250
    assert tls_comment(queued_content(r2)).endswith(
        '\n\t(Client CN "", Issuer "No CN Org" (not verified))')


def test_check_ccert_access_actions_and_bad_argument(servers, pki):
    self_fp, _ = cert_prints(pki, "self")
    r = servers(tls_params(pki, smtpd_relay_restrictions=(
        f"check_ccert_access inline:{{ {self_fp}=OK }}, reject_unauth_destination")))
    assert session(r.port, client_ctx(pki, "self"), "x@far.example")[-2][0] == 250
    assert session(r.port, client_ctx(pki, "client"), "x@far.example")[2][0] == 554
    bad = servers(tls_params(pki, smtpd_recipient_restrictions=(
        "check_ccert_access { nosuchsyntax }, reject_unauth_destination")))
    assert session(bad.port, client_ctx(pki, "self"), "b@mx.example.test")[2] == \
        (451, "4.3.5 Server configuration error")


def test_ask_ccert_no_warns_and_is_dunno(servers, pki):
    self_fp, _ = cert_prints(pki, "self")
    r = servers(tls_params(pki, smtpd_tls_ask_ccert="no",
                           relay_clientcerts=f"inline:{{ {self_fp}=yes }}",
                           smtpd_relay_restrictions="permit_tls_clientcerts, "
                                                    "check_ccert_access inline:{ x=REJECT }, "
                                                    "reject_unauth_destination"))
    assert session(r.port, client_ctx(pki, "self"), "x@far.example")[2][0] == 554
    r.wait_log('warning: permit_tls_clientcerts is requested, but "smtpd_tls_ask_ccert = no"')
    r.wait_log('warning: check_ccert_access is requested, but "smtpd_tls_ask_ccert = no"')
    # Not asked, so not sent: the session is anonymous.
    r.wait_log(r"Anonymous TLS connection established")


def test_req_ccert_refuses_missing_and_untrusted(servers, pki):
    r = servers(tls_params(pki, smtpd_tls_security_level="encrypt", smtpd_tls_req_ccert="yes",
                           smtpd_tls_ask_ccert="no"))
    for name, why in ((None, "No client certificate presented"),
                      ("self", "Client certificate not trusted")):
        r.log.lines.clear()
        w = Wire(r.port)
        try:
            w.reply()
            w.cmd("EHLO c.example")
            w.starttls(client_ctx(pki, name))
            # Postfix logs the abort, reads the next command, answers it with 421, closes.
            r.wait_log(f"NOQUEUE: abort: TLS from unknown\\[127\\.0\\.0\\.1\\]: {why}")
            assert w.cmd("EHLO c.example") == (421, f"4.7.1 mx.example.test Error: {why}")
            with pytest.raises((EOFError, OSError)):
                w.reply()
        finally:
            w.close()
        r.wait_log(r"disconnect from unknown\[127\.0\.0\.1\] ehlo=1 starttls=1 commands=2$")
        if name == "self":
            lines = r.lines()
            failed = [i for i, x in enumerate(lines) if x.startswith(
                "certificate verification failed for unknown[127.0.0.1]: self-signed certificate")]
            untrusted = [i for i, x in enumerate(lines) if x.startswith("Untrusted TLS")]
            assert failed and untrusted and failed[0] < untrusted[0], lines
    assert session(r.port, client_ctx(pki, "client"), "b@mx.example.test")[-2][0] == 250


def test_req_ccert_client_that_hangs_up(servers, pki):
    r = servers(tls_params(pki, smtpd_tls_security_level="encrypt", smtpd_tls_req_ccert="yes"))
    w = Wire(r.port)
    w.reply()
    w.cmd("EHLO c.example")
    w.starttls(client_ctx(pki))
    r.wait_log("NOQUEUE: abort: TLS from")
    w.close()
    r.wait_log(r"lost connection after STARTTLS from unknown\[127\.0\.0\.1\]")
    r.wait_log(r"disconnect from unknown\[127\.0\.0\.1\] ehlo=1 starttls=1 commands=2$")


def test_req_ccert_silent_client_times_out(servers, pki):
    r = servers(tls_params(pki, smtpd_tls_security_level="encrypt", smtpd_tls_req_ccert="yes",
                           smtpd_timeout="1s"))
    w = Wire(r.port)
    try:
        w.reply()
        w.cmd("EHLO c.example")
        w.starttls(client_ctx(pki))
        # As Postfix: the abort is logged at once, the timeout after smtpd_timeout.
        r.wait_log("NOQUEUE: abort: TLS from unknown\\[127\\.0\\.0\\.1\\]: No client")
        assert w.reply() == (421, "4.4.2 mx.example.test Error: timeout exceeded")
    finally:
        w.close()
    r.wait_log(r"timeout after STARTTLS from unknown\[127\.0\.0\.1\]")


def test_req_ccert_with_wrappermode(servers, pki):
    r = servers(tls_params(pki, smtpd_tls_security_level="encrypt", smtpd_tls_req_ccert="yes",
                           smtpd_tls_wrappermode="yes"))
    sock = client_ctx(pki, "self").wrap_socket(
        socket.create_connection(("127.0.0.1", r.port), timeout=WAIT))
    try:
        data = sock.recv(4096)
    finally:
        sock.close()
    # Postfix 3.7 sends its 220 greeting after this 421 before it closes; a client stops
    # at the 421, so postwell sends only that.
    assert data == b"421 4.7.1 mx.example.test Error: Client certificate not trusted\r\n"
    r.wait_log("NOQUEUE: abort: TLS from")
    r.wait_log(r"disconnect from unknown\[127\.0\.0\.1\] commands=0/0$")
    sock = client_ctx(pki, "client").wrap_socket(
        socket.create_connection(("127.0.0.1", r.port), timeout=WAIT))
    try:
        assert sock.recv(4096).startswith(b"220 ")
    finally:
        sock.close()


def test_policy_state_after_starttls(servers, pki):
    """The session state the restrictions see (and a policy service would be sent)."""
    seen = []

    class Spy:
        def __getattr__(self, name):
            return getattr(self.inner, name)

        async def on_rcpt(self, state):
            seen.append(dict(policy_tls_attributes(state)))
            return await self.inner.on_rcpt(state)

    r = servers(tls_params(pki))
    spy = Spy()
    spy.inner = r.server.policy
    r.server.policy = spy
    session(r.port, client_ctx(pki, "client"), "b@mx.example.test", data=False)
    session(r.port, client_ctx(pki, "self"), "b@mx.example.test", data=False)
    fp, pk = cert_prints(pki, "client")
    assert seen[0]["ccert_subject"] == "client.example.test"
    assert seen[0]["ccert_issuer"] == "Test+20CA"
    assert (seen[0]["ccert_fingerprint"], seen[0]["ccert_pubkey_fingerprint"]) == (fp, pk)
    assert seen[1]["ccert_subject"] == "" and re.fullmatch(FP_RE, seen[1]["ccert_fingerprint"])


def test_resumed_session_keeps_the_certificate_status(servers, pki):
    r = servers(tls_params(pki))
    for name, trust in (("self", "Untrusted"), ("client", "Trusted")):
        ctx, saved = client_ctx(pki, name), None
        for _ in range(2):
            r.log.lines.clear()
            w = Wire(r.port)
            try:
                w.reply()
                w.cmd("EHLO c.example")
                assert w.cmd("STARTTLS")[0] == 220
                w.sock = ctx.wrap_socket(w.sock, session=saved)
                assert w.cmd("EHLO c.example")[0] == 250    # the ticket arrives with it
                reused = w.sock.session_reused
                saved = w.sock.session
                w.cmd("QUIT")
            finally:
                w.close()
            assert r.wait_log("TLS connection established").startswith(trust)
        assert reused


def test_warnings_logged_once_at_first_tls_use(servers, pki):
    r = servers(tls_params(pki, smtpd_tls_req_ccert="yes"))
    for _ in range(2):
        assert session(r.port, client_ctx(pki), "b@mx.example.test", data=False)[-1][0] == 221
    assert [x for x in r.lines() if "warning" in x] == [
        "warning: Can't require client certs unless TLS is required"]


def test_fallback_session_without_the_callback(servers, pki, monkeypatch):
    """Where ctypes cannot help: one warning, trusted certificates still work, an
    untrusted one fails the handshake (never a crash)."""
    import postwell.tls.introspect as intro
    monkeypatch.setattr(intro, "accept_any_client_certificate", lambda *a, **k: "test says no")
    r = servers(tls_params(pki))
    assert session(r.port, client_ctx(pki, "client"), "b@mx.example.test")[-2][0] == 250
    assert r.wait_log("TLS connection established").startswith("Trusted")
    with pytest.raises((ssl.SSLError, OSError, EOFError)):
        session(r.port, client_ctx(pki, "self"), "b@mx.example.test")
    r.wait_log(r"SSL_accept error from unknown\[127\.0\.0\.1\]")
    assert session(r.port, client_ctx(pki), "b@mx.example.test")[-2][0] == 250
    warnings = [x for x in r.lines() if "warning: smtpd_tls_ask_ccert" in x]
    assert len(warnings) == 1 and "test says no" in warnings[0]


@pytest.mark.skipif(not shutil.which("swaks"), reason="swaks not installed")
def test_swaks_relays_with_its_certificate(servers, pki, tmp_path):
    self_fp, _ = cert_prints(pki, "self")
    r = servers(tls_params(pki, relay_clientcerts=f"inline:{{ {self_fp}=swaks }}",
                           smtpd_relay_restrictions="permit_tls_clientcerts, "
                                                    "reject_unauth_destination"))

    def swaks(*cert: str) -> str:
        cp = subprocess.run(["swaks", "--server", f"127.0.0.1:{r.port}", "--tls", "--from",
                             "a@example.org", "--to", "x@far.example", "--timeout", "20", *cert],
                            capture_output=True, timeout=60)
        return cp.stdout.decode("latin-1")

    out = swaks("--tls-cert", str(pki / "self.pem"), "--tls-key", str(pki / "self.key"))
    assert "<~  250 2.0.0 Ok: queued as" in out, out[-2000:]
    out = swaks("--tls-cert", str(pki / "client.pem"), "--tls-key", str(pki / "client.key"))
    assert "<~* 554 5.7.1 <x@far.example>: Relay access denied" in out, out[-2000:]


@pytest.mark.skipif(not shutil.which("openssl"), reason="openssl not installed")
def test_openssl_s_client_sees_the_ca_names(servers, pki):
    """Postfix sends the names of the CAs in smtpd_tls_CAfile with its certificate request."""
    r = servers(tls_params(pki))
    cp = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{r.port}",
                         "-starttls", "smtp", "-cert", str(pki / "self.pem"), "-key",
                         str(pki / "self.key")], input=b"QUIT\r\n", capture_output=True,
                        timeout=30)
    out = cp.stdout.decode("latin-1")
    assert "Acceptable client certificate CA names\nCN = Test CA\n" in out, out[-3000:]


def test_on_uvloop(tmp_path, pki, monkeypatch):
    uvloop = pytest.importorskip("uvloop")
    with monkeypatch.context() as m:
        m.setattr("asyncio.new_event_loop", uvloop.new_event_loop)
        r = Running(tmp_path, tls_params(pki))
    try:
        assert session(r.port, client_ctx(pki, "self"), "b@mx.example.test")[-2][0] == 250
        assert r.wait_log("TLS connection established").startswith("Untrusted")
        assert "(not verified))" in tls_comment(queued_content(r))
    finally:
        r.stop()


# ---------------------------------------------------------------- side by side with Postfix

def _instance_pki(inst, pki, relay_fps: list[str], access: str) -> dict:
    """Copy the test PKI under the instance (pytest's tmp dirs are closed to the daemons'
    users) and write its tables; the main.cf settings both MTAs share."""
    d = inst.root / "pki"
    d.mkdir(exist_ok=True)
    os.chmod(d, 0o755)
    for name in ("server.pem", "server.key", "ca.pem"):
        shutil.copy(pki / name, d / name)
    (d / "relay_ccerts").write_text("".join(f"{fp} ok\n" for fp in relay_fps))
    (d / "ccert_access").write_text(access)
    for f in d.iterdir():
        os.chmod(f, 0o644)
    return {"smtpd_tls_cert_file": str(d / "server.pem"),
            "smtpd_tls_key_file": str(d / "server.key"),
            "smtpd_tls_CAfile": str(d / "ca.pem"),
            "smtpd_tls_security_level": "may", "smtpd_tls_ask_ccert": "yes",
            "smtpd_tls_loglevel": "1", "smtpd_tls_received_header": "yes",
            "mynetworks": "10.9.9.0/24",
            "relay_clientcerts": f"texthash:{d}/relay_ccerts",
            "smtpd_relay_restrictions": "permit_tls_clientcerts, reject_unauth_destination",
            "smtpd_recipient_restrictions": f"check_ccert_access texthash:{d}/ccert_access"}


def _log_lines(inst, pattern: str) -> list[str]:
    out = []
    for line in inst.log_text().splitlines():
        m = re.search(r"postfix/smtpd\[\d+\]: (.*)", line)
        if m and re.search(pattern, m.group(1)):
            out.append(re.sub(r"\b[0-9A-F]{10,12}\b", "ID", m.group(1)))
    return out


@pytest.mark.postfix
def test_relay_by_certificate_matches_postfix(pki, reference_factory, postwell_factory):
    self_fp, _ = cert_prints(pki, "self")
    _, ec_pk = cert_prints(pki, "ec")
    client_fp, _ = cert_prints(pki, "client")
    access = f"{ec_pk} REJECT ec refused\n{client_fp} DUNNO\n"
    ref = reference_factory({}, name="ccref")
    pw = postwell_factory({}, name="ccpw")
    for inst in (ref, pw):
        params = _instance_pki(inst, pki, [self_fp], access)
        inst.main_cf_extra = inst.main_cf = params
        inst.write_config()
        inst.start()
    names = ("client", "self", "ec", None)
    replies = {}
    for inst in (ref, pw):
        replies[inst.kind] = [
            session(inst.port, client_ctx(pki, name), rcpt, data=data)
            for name in names
            for rcpt, data in (("x@far.example", False), ("alice@virtual.test", True))]
    assert replies["postwell"] == replies["postfix"]
    for inst in (ref, pw):
        inst.wait_maildir("alice", 3)
        inst.wait_log(r"(?s)(disconnect from .*){9}")   # + the start-up probe
    pattern = r"TLS connection established|NOQUEUE|abort|certificate"
    assert _log_lines(pw, pattern) == _log_lines(ref, pattern)
    comments = [sorted(tls_comment(m.read_text()) for m in inst.wait_maildir("alice", 3))
                for inst in (ref, pw)]
    assert comments[1] == comments[0]
    counters = [_log_lines(inst, "^disconnect from") for inst in (ref, pw)]
    assert counters[1] == counters[0]


def _req_dialogue(port: int, ctx) -> list:
    w = Wire(port)
    out = []
    try:
        w.reply()
        w.cmd("EHLO c.example")
        w.starttls(ctx)
        for line in ("EHLO c.example", "MAIL FROM:<a@example.org>", "QUIT"):
            try:
                code, text = w.cmd(line)
            except (EOFError, OSError) as exc:
                out.append(type(exc).__name__)
                break
            out.append((code, text.split("\n")[0]))
    finally:
        w.close()
    return out


@pytest.mark.postfix
def test_required_certificate_matches_postfix(pki, reference_factory, postwell_factory):
    ref = reference_factory({}, name="ccreqref")
    pw = postwell_factory({}, name="ccreqpw")
    for inst in (ref, pw):
        params = _instance_pki(inst, pki, [], "")
        params.update(smtpd_tls_security_level="encrypt", smtpd_tls_req_ccert="yes",
                      smtpd_tls_ask_ccert="no", smtpd_recipient_restrictions="")
        inst.main_cf_extra = inst.main_cf = params
        inst.write_config()
        inst.start()
    got = {inst.kind: [_req_dialogue(inst.port, client_ctx(pki, name))
                       for name in (None, "self", "client")] for inst in (ref, pw)}
    assert got["postwell"] == got["postfix"]
    assert got["postfix"][0][0] == (421, "4.7.1 mx.example.test Error: No client certificate "
                                         "presented")
    for inst in (ref, pw):
        inst.wait_log(r"(?s)(disconnect from .*){4}")   # + the start-up probe
    pattern = r"TLS connection established|NOQUEUE|abort|certificate|^disconnect"
    assert _log_lines(pw, pattern) == _log_lines(ref, pattern)
