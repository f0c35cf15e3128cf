"""TLS contexts from Postfix parameters, config checks, Postfix-shaped texts,
and STARTTLS over asyncio Protocols (stdlib loop and uvloop)."""

from __future__ import annotations

import asyncio
import re
import shutil
import ssl
import subprocess

import pytest

from postwell.config import load_config
from postwell.tls import (TlsConfigError, check_tls_config, cipher_list, client_context,
                          parse_protocols, received_header_tls_text, server_context,
                          server_log_text, server_security_level, tls_log_text)

HOST = "mx.example.test"
V = ssl.TLSVersion

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI needed")


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, timeout=60,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, a server cert signed by it for mx.example.test, a self-signed
    cert, and an unrelated key: made now, never committed."""
    d = tmp_path_factory.mktemp("pki")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
            "-days", "2", "-subj", "/CN=Test CA", cwd=d)
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
            "-subj", f"/CN={HOST}", cwd=d)
    (d / "ext.cnf").write_text(f"subjectAltName=DNS:{HOST}\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "server.pem", "-days", "2", "-extfile", "ext.cnf", cwd=d)
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", "self.key", "-out", "self.pem", "-days", "2", "-subj", f"/CN={HOST}", cwd=d)
    openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048",
            "-out", "other.key", cwd=d)
    (d / "combined.pem").write_text((d / "server.key").read_text() + (d / "server.pem").read_text())
    return d


def config(tmp_path, **params):
    etc = tmp_path / "etc"
    etc.mkdir(exist_ok=True)
    lines = [f"myhostname = {HOST}"] + [f"{k} = {v}" for k, v in params.items()]
    (etc / "main.cf").write_text("\n".join(lines) + "\n")
    return load_config(str(etc))


# --- parameters ------------------------------------------------------------------------------

def test_parse_protocols():
    assert parse_protocols(">=TLSv1.2") == (V.TLSv1_2, V.TLSv1_3)
    assert parse_protocols(">=TLSv1, <=TLSv1.2") == (V.TLSv1, V.TLSv1_2)
    assert parse_protocols("!SSLv2, !SSLv3") == (V.TLSv1, V.TLSv1_3)
    assert parse_protocols("!SSLv2:!SSLv3:!TLSv1:!TLSv1.1") == (V.TLSv1_2, V.TLSv1_3)
    assert parse_protocols("TLSv1.3") == (V.TLSv1_3, V.TLSv1_3)
    assert parse_protocols("") == (V.TLSv1, V.TLSv1_3)
    with pytest.raises(TlsConfigError):
        parse_protocols(">=TLSv9")
    with pytest.raises(TlsConfigError):
        parse_protocols("<=SSLv3")


def test_cipher_list(tmp_path):
    cfg = config(tmp_path)
    assert cipher_list(cfg, "medium", []) == "aNULL:-aNULL:HIGH:MEDIUM:+RC4:@STRENGTH"
    assert cipher_list(cfg, "high", ["RC4", "aNULL"]) == "aNULL:-aNULL:HIGH:@STRENGTH:!RC4:!aNULL"
    with pytest.raises(TlsConfigError):
        cipher_list(cfg, "ultra", [])


def test_security_level_and_legacy_parameters(tmp_path):
    assert server_security_level(config(tmp_path)) == "none"
    assert server_security_level(config(tmp_path, smtpd_use_tls="yes")) == "may"
    assert server_security_level(config(tmp_path, smtpd_use_tls="yes",
                                        smtpd_enforce_tls="yes")) == "encrypt"
    assert server_security_level(config(tmp_path, smtpd_tls_security_level="may",
                                        smtpd_enforce_tls="yes")) == "may"
    with pytest.raises(TlsConfigError):
        server_security_level(config(tmp_path, smtpd_tls_security_level="verify"))


def test_defaults_are_tls12_or_newer(tmp_path):
    cfg = config(tmp_path)
    assert parse_protocols(cfg.get("smtpd_tls_protocols"))[0] == V.TLSv1_2
    assert parse_protocols(cfg.get("smtp_tls_mandatory_protocols"))[0] == V.TLSv1_2


# --- server context --------------------------------------------------------------------------

def test_server_context_levels(tmp_path, pki):
    assert server_context(config(tmp_path)) is None
    assert server_context(config(tmp_path, smtpd_tls_security_level="none",
                                 smtpd_tls_cert_file=pki / "server.pem")) is None
    ctx = server_context(config(tmp_path, smtpd_tls_security_level="may",
                                smtpd_tls_cert_file=pki / "server.pem",
                                smtpd_tls_key_file=pki / "server.key"))
    assert isinstance(ctx, ssl.SSLContext)
    assert ctx.minimum_version == V.TLSv1_2 and ctx.verify_mode == ssl.CERT_NONE
    # "may" uses smtpd_tls_protocols, "encrypt" the mandatory ones.
    common = dict(smtpd_tls_cert_file=pki / "server.pem", smtpd_tls_key_file=pki / "server.key",
                  smtpd_tls_protocols=">=TLSv1.3", smtpd_tls_mandatory_protocols="TLSv1.2")
    assert server_context(config(tmp_path, smtpd_tls_security_level="may", **common)
                          ).minimum_version == V.TLSv1_3
    ctx = server_context(config(tmp_path, smtpd_tls_security_level="encrypt", **common))
    assert (ctx.minimum_version, ctx.maximum_version) == (V.TLSv1_2, V.TLSv1_2)


def test_server_context_chain_files_and_tickets(tmp_path, pki):
    ctx = server_context(config(tmp_path, smtpd_tls_security_level="may",
                                smtpd_tls_chain_files=pki / "combined.pem",
                                smtpd_tls_session_cache_timeout="0"))
    assert ctx.options & ssl.OP_NO_TICKET and ctx.num_tickets == 0
    ctx = server_context(config(tmp_path, smtpd_use_tls="yes",
                                smtpd_tls_cert_file=pki / "combined.pem"))
    assert not ctx.options & ssl.OP_NO_TICKET


def test_server_context_client_certs(tmp_path, pki):
    base = dict(smtpd_tls_security_level="may", smtpd_tls_cert_file=pki / "server.pem",
                smtpd_tls_key_file=pki / "server.key")
    ctx = server_context(config(tmp_path, smtpd_tls_ask_ccert="yes",
                                smtpd_tls_CAfile=pki / "ca.pem", **base))
    assert ctx.verify_mode == ssl.CERT_OPTIONAL


def test_check_tls_config_errors(tmp_path, pki):
    assert check_tls_config(config(tmp_path)) == []
    ok = config(tmp_path, smtpd_tls_security_level="may", smtpd_tls_cert_file=pki / "server.pem",
                smtpd_tls_key_file=pki / "server.key")
    assert check_tls_config(ok) == []
    missing = config(tmp_path, smtpd_tls_security_level="may",
                     smtpd_tls_cert_file=tmp_path / "nope.pem")
    assert check_tls_config(missing) == [
        f"TLS certificate/key file {tmp_path / 'nope.pem'}: No such file or directory"]
    mismatch = config(tmp_path, smtpd_tls_security_level="may",
                      smtpd_tls_cert_file=pki / "server.pem", smtpd_tls_key_file=pki / "other.key")
    assert check_tls_config(mismatch) == [
        f"private key {pki / 'other.key'} does not match public key in certificate "
        f"{pki / 'server.pem'}"]
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    junk = config(tmp_path, smtpd_tls_security_level="may", smtpd_tls_cert_file=tmp_path / "junk.pem")
    assert check_tls_config(junk) == [
        f"cannot load certificate from {tmp_path / 'junk.pem'}: no PEM certificate found"]
    nokey = config(tmp_path, smtpd_tls_security_level="may", smtpd_tls_cert_file=pki / "server.pem")
    assert check_tls_config(nokey) == [
        f"cannot load private key from {pki / 'server.pem'}: no PEM private key found"]
    openssl("pkey", "-in", "server.key", "-aes256", "-passout", "pass:x", "-out",
            str(tmp_path / "enc.key"), cwd=pki)
    enc = config(tmp_path, smtpd_tls_security_level="may", smtpd_tls_cert_file=pki / "server.pem",
                 smtpd_tls_key_file=tmp_path / "enc.key")
    assert check_tls_config(enc) == [f"cannot load private key from {tmp_path / 'enc.key'}: "
                                     "the key is encrypted (a passphrase is not supported)"]
    nocert = config(tmp_path, smtpd_tls_security_level="encrypt")
    assert "no server certificate" in check_tls_config(nocert)[0]
    badproto = config(tmp_path, smtpd_tls_security_level="may", smtpd_tls_protocols=">=TLSv4",
                      smtpd_tls_cert_file=pki / "server.pem", smtpd_tls_key_file=pki / "server.key")
    assert any("unknown protocol" in p for p in check_tls_config(badproto))
    with pytest.raises(TlsConfigError):
        server_context(mismatch)


# --- client context --------------------------------------------------------------------------

def test_client_context_levels(tmp_path, pki):
    cfg = config(tmp_path, smtp_tls_CAfile=pki / "ca.pem")
    assert client_context(cfg, "none") is None
    assert client_context(config(tmp_path)) is None           # default level: none
    may = client_context(cfg, "may")
    assert may.verify_mode == ssl.CERT_NONE and not may.check_hostname
    ver = client_context(cfg, "verify", servername=HOST)
    assert ver.verify_mode == ssl.CERT_REQUIRED and ver.check_hostname
    with pytest.raises(TlsConfigError):
        client_context(cfg, "bogus")


# --- handshakes ------------------------------------------------------------------------------

class StartTlsServer(asyncio.Protocol):
    """A minimal smtpd-like Protocol: answers STARTTLS with 220 and upgrades
    the transport with loop.start_tls, as the smtpd glue will."""

    def __init__(self, ctx, done: asyncio.Future):
        self.ctx = ctx
        self.done = done
        self.buf = b""
        self.tls = False
        self.upgrading = False
        self.early: list[bytes] = []

    def connection_made(self, transport):
        self.transport = transport
        transport.write(b"220 mx ESMTP\r\n")

    def data_received(self, data):
        if self.upgrading:
            # The SSL layer can deliver the first decrypted bytes before
            # start_tls() has returned the new transport: hold them.
            self.early.append(data)
            return
        self.buf += data
        while b"\r\n" in self.buf:
            line, self.buf = self.buf.split(b"\r\n", 1)
            if line == b"STARTTLS" and not self.tls:
                self.transport.write(b"220 2.0.0 Ready to start TLS\r\n")
                # RFC 3207 4.2: nothing sent before the handshake may be used after it.
                self.buf = b""
                self.upgrading = True
                asyncio.ensure_future(self.upgrade())
                return
            if line == b"QUIT":
                self.transport.write(b"221 2.0.0 Bye\r\n")
                ssl_obj = self.transport.get_extra_info("ssl_object")
                if not self.done.done():
                    self.done.set_result(ssl_obj)
                self.transport.close()

    async def upgrade(self):
        loop = asyncio.get_running_loop()
        self.transport.pause_reading()
        try:
            tls_transport = await loop.start_tls(self.transport, self, self.ctx, server_side=True, ssl_handshake_timeout=10)
        except (ssl.SSLError, OSError) as e:
            # Kept as a value: an unretrieved Future exception would be logged
            # with a traceback, and formatting that trips a CPython 3.11.7 bug
            # (later compile() calls fail with "AST constructor recursion
            # depth mismatch").
            if not self.done.done():
                self.done.set_result(e)
            return
        self.transport = tls_transport
        self.tls = True
        self.upgrading = False
        early, self.early = b"".join(self.early), []
        if early:
            self.data_received(early)


async def starttls_session(server_ctx, client_ctx, server_hostname=None, ask_ccert=False):
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    srv = await loop.create_server(lambda: StartTlsServer(server_ctx, done), "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert (await reader.readline()).startswith(b"220 ")
        writer.write(b"STARTTLS\r\n")
        assert await reader.readline() == b"220 2.0.0 Ready to start TLS\r\n"
        await writer.start_tls(client_ctx, server_hostname=server_hostname)
        client_ssl = writer.get_extra_info("ssl_object")
        writer.write(b"QUIT\r\n")
        assert await reader.readline() == b"221 2.0.0 Bye\r\n"
        server_ssl = await asyncio.wait_for(done, 10)
        client_text = tls_log_text("Trusted", HOST, "127.0.0.1", port, client_ssl)
        if isinstance(server_ssl, Exception):
            raise server_ssl
        server_texts = (received_header_tls_text(server_ssl, client_cert_requested=ask_ccert),
                        server_log_text("unknown[127.0.0.1]", server_ssl))
        writer.close()
        return server_texts, client_text
    finally:
        srv.close()


def run_loop(coro_factory, use_uvloop=False):
    if use_uvloop:
        uvloop = pytest.importorskip("uvloop")
        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(asyncio.wait_for(coro_factory(), 20))
    finally:
        loop.close()


TLS13_RECEIVED = re.compile(
    r"^\(using TLSv1\.3 with cipher TLS_[A-Z0-9_]+ \((\d+)/\1 bits\)\n"
    r"\t key-exchange X25519 server-signature RSA-PSS \(2048 bits\) server-digest SHA256\)\n"
    r"\t\(No client certificate requested\)$")


@pytest.mark.parametrize("use_uvloop", [False, True], ids=["asyncio", "uvloop"])
def test_starttls_with_protocol_and_texts(tmp_path, pki, use_uvloop):
    sctx = server_context(config(tmp_path, smtpd_tls_security_level="may",
                                 smtpd_tls_cert_file=pki / "server.pem",
                                 smtpd_tls_key_file=pki / "server.key"))
    cctx = client_context(config(tmp_path, smtp_tls_CAfile=pki / "ca.pem"), "verify",
                          servername=HOST)
    (received, log), client_log = run_loop(lambda: starttls_session(sctx, cctx, HOST), use_uvloop)
    # The shape Postfix 3.7 writes (checked against the reference instance).
    assert TLS13_RECEIVED.match(received), received
    assert re.match(r"^Anonymous TLS connection established from unknown\[127\.0\.0\.1\]: "
                    r"TLSv1\.3 with cipher TLS_\w+ \((\d+)/\1 bits\) key-exchange X25519 "
                    r"server-signature RSA-PSS \(2048 bits\) server-digest SHA256$", log), log
    assert re.match(rf"^Trusted TLS connection established to {re.escape(HOST)}\[127\.0\.0\.1\]:"
                    r"\d+: TLSv1\.3 with cipher TLS_\w+ \(\d+/\d+ bits\) key-exchange X25519 "
                    r"server-signature RSA-PSS \(2048 bits\) server-digest SHA256$", client_log)


def test_tls12_received_text_has_no_key_exchange(tmp_path, pki):
    sctx = server_context(config(tmp_path, smtpd_tls_security_level="may",
                                 smtpd_tls_cert_file=pki / "server.pem",
                                 smtpd_tls_key_file=pki / "server.key"))
    cctx = client_context(config(tmp_path, smtp_tls_protocols="TLSv1.2"), "may")
    (received, log), _ = run_loop(lambda: starttls_session(sctx, cctx))
    assert received == ("(using TLSv1.2 with cipher ECDHE-RSA-AES256-GCM-SHA384 (256/256 bits))\n"
                        "\t(No client certificate requested)")
    assert log == ("Anonymous TLS connection established from unknown[127.0.0.1]: "
                   "TLSv1.2 with cipher ECDHE-RSA-AES256-GCM-SHA384 (256/256 bits)")


def test_ec_certificate_signature_text(tmp_path, pki):
    sctx = server_context(config(tmp_path, smtpd_tls_security_level="may",
                                 smtpd_tls_cert_file=pki / "self.pem",
                                 smtpd_tls_key_file=pki / "self.key"))
    cctx = client_context(config(tmp_path), "encrypt")
    (received, _), _ = run_loop(lambda: starttls_session(sctx, cctx))
    # Postfix 3.7 names the curve of an EC key, not its size (checked against the
    # reference: "server-signature ECDSA (prime256v1) server-digest SHA256").
    assert "server-signature ECDSA (prime256v1) server-digest SHA256" in received


def test_verify_level_rejects_unknown_ca(tmp_path, pki):
    sctx = server_context(config(tmp_path, smtpd_tls_security_level="may",
                                 smtpd_tls_cert_file=pki / "self.pem",
                                 smtpd_tls_key_file=pki / "self.key"))
    cctx = client_context(config(tmp_path, smtp_tls_CAfile=pki / "ca.pem"), "secure",
                          servername=HOST)
    with pytest.raises(ssl.SSLCertVerificationError):
        run_loop(lambda: starttls_session(sctx, cctx, HOST))


def test_protocol_mismatch_fails_handshake(tmp_path, pki):
    sctx = server_context(config(tmp_path, smtpd_tls_security_level="may",
                                 smtpd_tls_protocols="TLSv1.3",
                                 smtpd_tls_cert_file=pki / "server.pem",
                                 smtpd_tls_key_file=pki / "server.key"))
    cctx = client_context(config(tmp_path, smtp_tls_protocols="<=TLSv1.2"), "may")
    with pytest.raises((ssl.SSLError, ConnectionError, asyncio.TimeoutError)):
        run_loop(lambda: starttls_session(sctx, cctx))


def resumed(sctx, cctx) -> bool:
    import socket
    import threading
    lsock = socket.create_server(("127.0.0.1", 0))
    lsock.settimeout(10)
    port = lsock.getsockname()[1]

    def serve():
        for _ in range(2):
            conn, _ = lsock.accept()
            with sctx.wrap_socket(conn, server_side=True) as s:
                s.settimeout(10)
                s.sendall(b"hi")
                s.recv(10)
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        session = None
        reused = []
        for _ in range(2):
            raw = socket.create_connection(("127.0.0.1", port), timeout=10)
            with cctx.wrap_socket(raw, session=session) as c:
                assert c.recv(2) == b"hi"
                reused.append(c.session_reused)
                session = c.session
                c.sendall(b"x")
        t.join(10)
        return reused[1]
    finally:
        lsock.close()


def test_session_resumption_and_cache_timeout_zero(tmp_path, pki):
    base = dict(smtpd_tls_security_level="may", smtpd_tls_cert_file=pki / "server.pem",
                smtpd_tls_key_file=pki / "server.key")
    cctx = client_context(config(tmp_path), "may")
    assert resumed(server_context(config(tmp_path, **base)), cctx) is True
    assert resumed(server_context(config(tmp_path, smtpd_tls_session_cache_timeout="0s", **base)),
                   cctx) is False


def test_client_certificate_texts(tmp_path, pki):
    sctx = server_context(config(tmp_path, smtpd_tls_security_level="may", smtpd_tls_ask_ccert="yes",
                                 smtpd_tls_CAfile=pki / "ca.pem",
                                 smtpd_tls_cert_file=pki / "server.pem",
                                 smtpd_tls_key_file=pki / "server.key"))
    with_cert = client_context(config(tmp_path, smtp_tls_cert_file=pki / "server.pem",
                                      smtp_tls_key_file=pki / "server.key"), "may")
    (received, log), _ = run_loop(lambda: starttls_session(sctx, with_cert, ask_ccert=True))
    assert received.endswith('\n\t(Client CN "mx.example.test", Issuer "Test CA" (verified OK))')
    assert log.startswith("Trusted TLS connection established from unknown[127.0.0.1]: TLSv1.3")
    without = client_context(config(tmp_path), "may")
    (received, log), _ = run_loop(lambda: starttls_session(sctx, without, ask_ccert=True))
    assert received.endswith("\n\t(Client did not present a certificate)")
    assert log.startswith("Anonymous TLS connection")
