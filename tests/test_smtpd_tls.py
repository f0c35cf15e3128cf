"""STARTTLS (RFC 3207) and implicit TLS (smtpd_tls_wrappermode) in the asyncio smtpd.

Certificates are made at test time with openssl; clients are Python's ssl/smtplib,
`openssl s_client -starttls smtp` and swaks where installed.
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import shutil
import smtplib
import socket
import ssl
import subprocess
import time

import pytest

from test_smtpd import WAIT, Running

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    if not shutil.which("openssl"):
        pytest.skip("openssl not installed")
    d = tmp_path_factory.mktemp("cert")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                    str(d / "key.pem"), "-out", str(d / "cert.pem"), "-days", "2",
                    "-subj", "/CN=mx.example.test"], check=True, capture_output=True,
                   timeout=60)
    return str(d / "cert.pem"), str(d / "key.pem")


def tls_params(cert, level="may", **more):
    p = {"smtpd_tls_cert_file": cert[0], "smtpd_tls_key_file": cert[1],
         "smtpd_tls_security_level": level, "smtpd_tls_loglevel": "1",
         "smtpd_tls_received_header": "yes"}
    p.update(more)
    return p


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


def client_ctx() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


class Wire:
    """A line-level SMTP client that can switch to TLS mid-session."""

    def __init__(self, port: int, implicit: bool = False) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
        if implicit:
            self.sock = client_ctx().wrap_socket(self.sock)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

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
        self.send(line.encode() + b"\r\n")
        return self.reply()

    def starttls(self) -> None:
        assert self.cmd("STARTTLS") == (220, "2.0.0 Ready to start TLS")
        assert not self.buf
        self.sock = client_ctx().wrap_socket(self.sock)

    def pending(self, wait: float = 0.5) -> bytes:
        self.sock.settimeout(wait)
        try:
            return self.buf + self.sock.recv(65536)
        except (socket.timeout, ssl.SSLError):
            return self.buf
        finally:
            self.sock.settimeout(WAIT)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def test_starttls_smtplib_delivers_with_received_comment_and_log(servers, cert):
    r = servers(tls_params(cert))
    with smtplib.SMTP("127.0.0.1", r.port, timeout=WAIT) as s:
        code, text = s.ehlo("client.example")
        assert b"STARTTLS" in text
        s.starttls(context=client_ctx())
        code, text = s.ehlo("client.example")
        assert code == 250 and b"STARTTLS" not in text     # RFC 3207 4.2
        s.sendmail("a@example.org", ["b@mx.example.test"], b"Subject: t\r\n\r\nhi\r\n")
    qid = r.wait_log(r"client=unknown\[127\.0\.0\.1\]").split(":")[0]
    line = r.wait_log(r"TLS connection established")
    assert re.fullmatch(r"Anonymous TLS connection established from unknown\[127\.0\.0\.1\]: "
                        r"TLSv1\.[23] with cipher \S+ \(\d+/\d+ bits\).*", line), line
    r.wait_log(r"disconnect from .* ehlo=2 starttls=1 mail=1 rcpt=1 data=1 quit=1 commands=7")
    with r.store.open(qid, "incoming") as qm:
        content = b"".join(qm.iter_content()).decode()
    m = re.search(r"Received: from client\.example \(unknown \[127\.0\.0\.1\]\)\n"
                  r"\t\(using TLSv1\.[23] with cipher \S+ \(\d+/\d+ bits\).*?\)\n"
                  r"\t\(No client certificate requested\)\n"
                  r"\tby mx\.example\.test \(postwell\) with ESMTPS id " + qid, content, re.S)
    assert m, content[:600]


def test_received_comment_and_tls_log_only_when_asked(servers, cert):
    r = servers(tls_params(cert, smtpd_tls_loglevel="0", smtpd_tls_received_header="no"))
    with smtplib.SMTP("127.0.0.1", r.port, timeout=WAIT) as s:
        s.starttls(context=client_ctx())
        s.sendmail("a@example.org", ["b@mx.example.test"], b"Subject: t\r\n\r\nhi\r\n")
    qid = r.wait_log(r"client=").split(":")[0]
    r.wait_log("disconnect from")
    assert not any("TLS connection established" in x for x in r.lines())
    with r.store.open(qid, "incoming") as qm:
        content = b"".join(qm.iter_content()).decode()
    assert "(using TLS" not in content and "with ESMTPS id" in content


def test_encrypt_level_requires_starttls_first(servers, cert):
    r = servers(tls_params(cert, "encrypt"))
    w = Wire(r.port)
    try:
        assert w.reply()[0] == 220
        code, text = w.cmd("EHLO c.example")
        assert code == 250 and "STARTTLS" in text
        assert "AUTH" not in text
        # Postfix's answers, checked against 3.7 (HELO/EHLO/NOOP/QUIT/STARTTLS pass).
        for cmd, want in [("MAIL FROM:<a@example.org>", 530), ("RSET", 530), ("NOOP", 250),
                          ("VRFY a", 530), ("ETRN x", 530), ("AUTH PLAIN", 530),
                          ("HELO c.example", 250), ("FOO", 500), ("DATA", 530)]:
            code, text = w.cmd(cmd)
            assert code == want, (cmd, code, text)
            if code == 530:
                assert text == "5.7.0 Must issue a STARTTLS command first"
        w.starttls()
        assert w.cmd("EHLO c.example")[0] == 250
        assert w.cmd("MAIL FROM:<a@example.org>")[0] == 250
        assert w.cmd("QUIT")[0] == 221
    finally:
        w.close()
    r.wait_log(r"disconnect from .*helo=1 ehlo=2 starttls=1 auth=0/1 mail=1/2 data=0/1 rset=0/1 "
               r"noop=1 vrfy=0/1 etrn=0/1 quit=1 unknown=0/1 commands=7/14")


def test_legacy_enforce_tls_and_use_tls(servers, cert):
    r = servers({"smtpd_tls_cert_file": cert[0], "smtpd_tls_key_file": cert[1],
                 "smtpd_enforce_tls": "yes"})
    w = Wire(r.port)
    try:
        w.reply()
        assert "STARTTLS" in w.cmd("EHLO c")[1]
        assert w.cmd("MAIL FROM:<a@example.org>")[0] == 530
    finally:
        w.close()
    r2 = servers({"smtpd_tls_cert_file": cert[0], "smtpd_tls_key_file": cert[1],
                  "smtpd_use_tls": "yes"})
    w = Wire(r2.port)
    try:
        w.reply()
        assert "STARTTLS" in w.cmd("EHLO c")[1]
        assert w.cmd("MAIL FROM:<a@example.org>")[0] == 250
    finally:
        w.close()


def test_state_reset_after_tls_mail_needs_ehlo_again(servers, cert):
    r = servers(tls_params(cert))
    w = Wire(r.port)
    try:
        w.reply()
        w.cmd("EHLO c.example")
        w.starttls()
        assert w.cmd("STARTTLS") == (554, "5.5.1 Error: TLS already active")
        # Postfix 3.7 (checked) takes MAIL without a new EHLO; the old HELO name is gone.
        assert w.cmd("MAIL FROM:<a@example.org>")[0] == 250
        assert w.cmd("RCPT TO:<b@mx.example.test>")[0] == 250
        assert w.cmd("DATA")[0] == 354
        assert w.cmd("Subject: x\r\n\r\nhi\r\n.")[0] == 250
        code, text = w.cmd("EHLO c2.example")
        assert code == 250 and "STARTTLS" not in text
        assert w.cmd("MAIL FROM:<a@example.org>")[0] == 250
        assert w.cmd("STARTTLS")[0] == 554       # active beats "transaction" (Postfix)
    finally:
        w.close()
    qid = r.wait_log("client=").split(":")[0]
    with r.store.open(qid, "incoming") as qm:
        content = b"".join(qm.iter_content()).decode()
    # RFC 3207 4.2: the pre-TLS "EHLO c.example" is not used after the handshake.
    assert content.startswith("Received: from unknown (unknown [127.0.0.1])"), content[:200]


def test_pipelined_command_after_starttls_is_discarded(servers, cert):
    """CVE-2011-0411: plaintext sent with STARTTLS must not be run inside TLS."""
    r = servers(tls_params(cert))
    w = Wire(r.port)
    try:
        w.reply()
        w.cmd("EHLO c.example")
        w.send(b"STARTTLS\r\nRSET\r\n")
        assert w.reply() == (220, "2.0.0 Ready to start TLS")
        assert not w.buf
        w.sock = client_ctx().wrap_socket(w.sock)
        assert w.pending(0.5) == b""            # the RSET got no reply, in TLS or not
        code, text = w.cmd("EHLO again.example")
        assert code == 250 and text.startswith("mx.example.test")
        assert w.cmd("QUIT")[0] == 221
    finally:
        w.close()
    line = r.wait_log("disconnect from")
    assert "rset" not in line, line


def test_command_right_after_handshake_is_answered_in_tls(servers, cert):
    """The client's first encrypted bytes may arrive before start_tls() returns."""
    r = servers(tls_params(cert))
    for _ in range(5):
        w = Wire(r.port)
        try:
            w.reply()
            w.send(b"EHLO a\r\nSTARTTLS\r\n")
            w.reply()
            assert w.reply()[0] == 220
            w.sock = client_ctx().wrap_socket(w.sock, do_handshake_on_connect=False)
            w.sock.do_handshake()
            w.sock.sendall(b"EHLO b\r\nNOOP\r\n")
            assert w.reply()[0] == 250
            assert w.reply() == (250, "2.0.0 Ok")
        finally:
            w.close()


def test_handshake_failure_logged_and_closed(servers, cert):
    r = servers(tls_params(cert))
    w = Wire(r.port)
    try:
        w.reply()
        w.cmd("EHLO c.example")
        assert w.cmd("STARTTLS")[0] == 220
        w.send(b"garbage garbage garbage\r\n")
        w.sock.settimeout(WAIT)
        rest = b""
        try:
            while True:
                chunk = w.sock.recv(4096)
                if not chunk:
                    break
                rest += chunk
        except OSError:
            pass
    finally:
        w.close()
    r.wait_log(r"SSL_accept error from unknown\[127\.0\.0\.1\]: -1")
    r.wait_log(r"warning: TLS library problem: error:")
    r.wait_log(r"lost connection after STARTTLS from unknown\[127\.0\.0\.1\]")
    r.wait_log(r"disconnect from unknown\[127\.0\.0\.1\] ehlo=1 starttls=0/1 commands=1/2")
    assert not any("Traceback" in x or "session error" in x for x in r.lines())
    # The server still works.
    with smtplib.SMTP("127.0.0.1", r.port, timeout=WAIT) as s:
        s.starttls(context=client_ctx())
        assert s.noop()[0] == 250


def test_client_gone_during_handshake(servers, cert):
    r = servers(tls_params(cert))
    w = Wire(r.port)
    w.reply()
    w.cmd("EHLO c.example")
    assert w.cmd("STARTTLS")[0] == 220
    w.close()
    r.wait_log(r"SSL_accept error from unknown\[127\.0\.0\.1\]: lost connection")
    r.wait_log(r"lost connection after STARTTLS")


def test_wrappermode_handshake_before_greeting(servers, cert):
    r = servers(tls_params(cert, "none", smtpd_tls_wrappermode="yes"))
    w = Wire(r.port, implicit=True)
    try:
        code, text = w.reply()
        assert code == 220 and "ESMTP" in text
        code, text = w.cmd("EHLO c.example")
        assert code == 250 and "STARTTLS" not in text
        assert w.cmd("STARTTLS") == (554, "5.5.1 Error: TLS already active")
        assert w.cmd("QUIT")[0] == 221
    finally:
        w.close()
    r.wait_log(r"Anonymous TLS connection established from unknown\[127\.0\.0\.1\]")
    with smtplib.SMTP_SSL("127.0.0.1", r.port, timeout=WAIT, context=client_ctx()) as s:
        s.sendmail("a@example.org", ["b@mx.example.test"], b"Subject: t\r\n\r\nhi\r\n")
    r.wait_log(r"disconnect from .* ehlo=1 mail=1 rcpt=1 data=1 quit=1 commands=5")


def test_wrappermode_plaintext_client_is_dropped(servers, cert):
    r = servers(tls_params(cert, "none", smtpd_tls_wrappermode="yes"))
    s = socket.create_connection(("127.0.0.1", r.port), timeout=WAIT)
    try:
        s.sendall(b"EHLO plain.example\r\n")
        data = b""
        try:
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
        except OSError:
            pass
        assert b"220" not in data and b"250" not in data
    finally:
        s.close()
    r.wait_log(r"SSL_accept error from unknown\[127\.0\.0\.1\]")
    r.wait_log(r"lost connection after CONNECT from unknown\[127\.0\.0\.1\]")


def test_no_tls_level_none(servers, cert):
    r = servers({"smtpd_tls_cert_file": cert[0], "smtpd_tls_key_file": cert[1]})
    w = Wire(r.port)
    try:
        w.reply()
        assert "STARTTLS" not in w.cmd("EHLO c")[1]
        assert w.cmd("STARTTLS") == (502, "5.5.1 Error: command not implemented")
    finally:
        w.close()


def test_missing_certificate(servers, tmp_path):
    r = servers({"smtpd_tls_security_level": "may",
                 "smtpd_tls_cert_file": str(tmp_path / "nope.pem")})
    w = Wire(r.port)
    try:
        w.reply()
        assert "STARTTLS" not in w.cmd("EHLO c")[1]    # may: run without TLS
        assert w.cmd("MAIL FROM:<a@example.org>")[0] == 250
    finally:
        w.close()
    assert any("TLS disabled" in x for x in r.lines())
    r2 = servers({"smtpd_tls_security_level": "encrypt",
                  "smtpd_tls_cert_file": str(tmp_path / "nope.pem")})
    w = Wire(r2.port)
    try:
        w.reply()
        assert "STARTTLS" in w.cmd("EHLO c")[1]
        assert w.cmd("STARTTLS") == (454, "4.7.0 TLS not available due to local problem")
        assert w.cmd("MAIL FROM:<a@example.org>")[0] == 530   # never weaker than asked
    finally:
        w.close()


@pytest.mark.skipif(not shutil.which("openssl"), reason="openssl not installed")
def test_openssl_s_client_starttls(servers, cert):
    r = servers(tls_params(cert))
    cp = subprocess.run(["openssl", "s_client", "-starttls", "smtp", "-crlf", "-quiet",
                         "-connect", f"127.0.0.1:{r.port}"],
                        input=b"EHLO s-client.example\nNOOP\nQUIT\n", capture_output=True,
                        timeout=30)
    out = cp.stdout.decode("latin-1")
    assert "250-mx.example.test" in out and "250 2.0.0 Ok" in out and "221 2.0.0 Bye" in out, \
        (out, cp.stderr[-500:])
    r.wait_log(r"disconnect from .* ehlo=2 starttls=1 noop=1 quit=1 commands=5")


@pytest.mark.skipif(not shutil.which("swaks"), reason="swaks not installed")
def test_swaks_tls_delivers(servers, cert):
    r = servers(tls_params(cert, "encrypt"))
    cp = subprocess.run(["swaks", "--server", f"127.0.0.1:{r.port}", "--tls", "--from",
                         "a@example.org", "--to", "b@mx.example.test", "--ehlo", "swaks.example",
                         "--timeout", "20"], capture_output=True, timeout=60)
    out = cp.stdout.decode("latin-1")
    assert cp.returncode == 0 and "<~  250 2.0.0 Ok: queued as" in out, out[-2000:]


@pytest.mark.skipif(not shutil.which("swaks"), reason="swaks not installed")
def test_swaks_implicit_tls(servers, cert):
    r = servers(tls_params(cert, "none", smtpd_tls_wrappermode="yes"))
    cp = subprocess.run(["swaks", "--server", f"127.0.0.1:{r.port}", "--tlsc", "--from",
                         "a@example.org", "--to", "b@mx.example.test", "--timeout", "20"],
                        capture_output=True, timeout=60)
    out = cp.stdout.decode("latin-1")
    assert cp.returncode == 0 and "250 2.0.0 Ok: queued as" in out, out[-2000:]


def test_per_record_deadline_cuts_off_slow_line(servers):
    r = servers({"smtpd_per_record_deadline": "yes", "smtpd_timeout": "2s"})
    s = socket.create_connection(("127.0.0.1", r.port), timeout=WAIT)
    try:
        s.recv(4096)
        start = time.monotonic()
        closed = False
        for ch in b"EHLO " + b"x" * 20:
            try:
                s.sendall(bytes([ch]))
            except OSError:
                closed = True
                break
            s.settimeout(0.5)
            try:
                data = s.recv(4096)
                if b"421" in data or not data:
                    closed = True
                    break
            except socket.timeout:
                pass
        elapsed = time.monotonic() - start
    finally:
        s.close()
    assert closed and elapsed < 6, elapsed
    r.wait_log(r"timeout after CONNECT from unknown\[127\.0\.0\.1\]")


def test_per_record_deadline_resets_per_line(servers):
    r = servers({"smtpd_per_record_deadline": "yes", "smtpd_timeout": "2s"})
    s = socket.create_connection(("127.0.0.1", r.port), timeout=WAIT)
    try:
        s.recv(4096)
        for _ in range(4):                    # each line well inside its own deadline
            time.sleep(0.8)
            s.sendall(b"NOOP\r\n")
            assert s.recv(4096).startswith(b"250")
    finally:
        s.close()


# ---------------------------------------------------------------- side by side with Postfix

def _tls_files(root) -> dict:
    files = root / "tlsfiles"
    files.mkdir(exist_ok=True)
    os.chmod(files, 0o755)
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                    str(files / "key.pem"), "-out", str(files / "cert.pem"), "-days", "2",
                    "-subj", "/CN=mx.example.test"], check=True, capture_output=True, timeout=60)
    for f in files.iterdir():
        os.chmod(f, 0o644)       # read by the daemons' unprivileged users; a test key
    return {"smtpd_tls_cert_file": str(files / "cert.pem"),
            "smtpd_tls_key_file": str(files / "key.pem"), "smtpd_tls_loglevel": "1",
            "smtpd_tls_received_header": "yes"}


def _tls_dialogue(port: int) -> list[tuple[int, str]]:
    w = Wire(port)
    w.sock.settimeout(30)   # past the soft error limit a ten-line EHLO waits ten seconds
    out = []
    try:
        w.reply()
        for cmd in ("EHLO c.example", "MAIL FROM:<a@example.org>", "RSET", "NOOP", "VRFY a",
                    "ETRN x", "AUTH PLAIN", "FOO", "HELO c.example", "STARTTLS x", "DATA",
                    "BDAT 1 LAST"):
            out.append(w.cmd(cmd))
        w.send(b"STARTTLS\r\nRSET\r\n")
        out.append(w.reply())
        w.sock = client_ctx().wrap_socket(w.sock)
        for cmd in ("MAIL FROM:<a@example.org>", "RCPT TO:<alice@virtual.test>", "STARTTLS",
                    "RSET", "EHLO c.example", "STARTTLS", "MAIL FROM:<a@example.org>",
                    "RCPT TO:<alice@virtual.test>", "DATA", "Subject: tls\r\n\r\nhi\r\n.",
                    "QUIT"):
            code, text = w.cmd(cmd)
            out.append((code, re.sub(r"queued as \w+", "queued as ID", text)))
    finally:
        w.close()
    return out


@pytest.mark.postfix
def test_encrypt_dialogue_matches_postfix(tmp_path, reference_factory, postwell_factory):
    import harness
    if harness.reference_available():
        pytest.skip(harness.reference_available())
    ref = reference_factory({}, name="tlsref")
    pw = postwell_factory({}, name="tlspw")
    for inst in (ref, pw):
        inst.main_cf_extra = inst.main_cf = dict(_tls_files(inst.root),
                                                 smtpd_tls_security_level="encrypt")
        inst.write_config()
        inst.start()
    # Both dialogues at once: past the soft error limit each reply waits
    # smtpd_error_sleep_time, ~7 s a side.
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        want_f, got_f = (pool.submit(_tls_dialogue, i.port) for i in (ref, pw))
        want, got = want_f.result(timeout=120), got_f.result(timeout=120)
    assert got == want
    ref_line = ref.wait_log(r"TLS connection established from .*").group(0)
    pw_line = pw.wait_log(r"TLS connection established from .*").group(0)
    assert pw_line == ref_line
    ref.wait_log(r"disconnect from .*")
    pw.wait_log(r"disconnect from .*")
    counters = [re.search(r"disconnect from \S+ (.*)", i.log_text()).group(1) for i in (ref, pw)]
    assert counters[1] == counters[0]
    mine = pw.wait_maildir("alice", 1)[0].read_text()
    theirs = ref.wait_maildir("alice", 1)[0].read_text()

    def received(text):
        m = re.search(r"^Received: from .*?\n\tby mx\.example\.test \((?:Postfix|postwell)\) "
                      r"with (\w+)", text, re.M | re.S)
        return re.sub(r"\((?:Postfix|postwell)\)", "", m.group(0))
    assert received(mine) == received(theirs)


def test_silent_client_cut_off_by_starttls_timeout(servers, cert):
    r = servers(tls_params(cert, "none", smtpd_tls_wrappermode="yes",
                           smtpd_starttls_timeout="1s"))
    s = socket.create_connection(("127.0.0.1", r.port), timeout=WAIT)
    start = time.monotonic()
    try:
        s.settimeout(WAIT)
        assert s.recv(100) == b""
    except ConnectionResetError:
        pass
    finally:
        s.close()
    assert time.monotonic() - start < 5
    r.wait_log(r"SSL_accept error from unknown\[127\.0\.0\.1\]")
    r.wait_log(r"lost connection after CONNECT from unknown\[127\.0\.0\.1\]")
    assert not any("Traceback" in x for x in r.lines())


# ---------------------------------------------------------------- the same on uvloop

@pytest.fixture
def uv_servers(tmp_path, monkeypatch):
    """Servers on uvloop, which the master uses in production when it is installed."""
    uvloop = pytest.importorskip("uvloop")
    made = []

    def make(extra=None, **kw):
        d = tmp_path / f"uv{len(made)}"
        d.mkdir()
        with monkeypatch.context() as m:
            m.setattr("asyncio.new_event_loop", uvloop.new_event_loop)
            r = Running(d, extra, **kw)
        made.append(r)
        return r

    yield make
    for r in made:
        r.stop()


@pytest.mark.parametrize("test", [test_pipelined_command_after_starttls_is_discarded,
                                  test_command_right_after_handshake_is_answered_in_tls,
                                  test_handshake_failure_logged_and_closed,
                                  test_wrappermode_handshake_before_greeting,
                                  test_wrappermode_plaintext_client_is_dropped,
                                  test_starttls_smtplib_delivers_with_received_comment_and_log])
def test_on_uvloop(uv_servers, cert, test):
    test(uv_servers, cert)


def test_preloaded_tls_context_survives_unreadable_key(servers, cert, tmp_path):
    """The master calls preload() as root; the worker then runs as mail_owner and may not
    read the key any more (Postfix's pre-jail init)."""
    import shutil as sh
    from postwell.config import load_config
    from postwell.smtpd import preload
    d = tmp_path / "pre"
    d.mkdir()
    sh.copy(cert[0], d / "c.pem")
    sh.copy(cert[1], d / "k.pem")
    etc = tmp_path / "pre-etc"
    etc.mkdir()
    (etc / "main.cf").write_text(f"smtpd_tls_cert_file = {d / 'c.pem'}\n"
                                 f"smtpd_tls_key_file = {d / 'k.pem'}\n")

    class Svc:
        name = "submission"
        overrides = {"smtpd_tls_security_level": "encrypt"}
    pre = preload(load_config(str(etc)), Svc())
    assert isinstance(pre["tls_context"], ssl.SSLContext)
    (d / "k.pem").unlink()
    r = servers(tls_params(cert, "encrypt", smtpd_tls_key_file=str(d / "k.pem"),
                           smtpd_tls_cert_file=str(d / "c.pem")), preloaded=pre)
    with smtplib.SMTP("127.0.0.1", r.port, timeout=WAIT) as s:
        s.starttls(context=client_ctx())
        assert s.ehlo("c")[0] == 250
    bad = preload(load_config(str(etc)), Svc())
    assert "tls_context" in bad and not isinstance(bad["tls_context"], ssl.SSLContext)
