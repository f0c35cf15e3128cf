"""The submission recipe through the real master: per-service -o overrides, STARTTLS
required on submission only, AUTH against Cyrus sasldb (saslpasswd2), implicit TLS."""

from __future__ import annotations

import os
import re
import shutil
import socket
import ssl
import subprocess

import pytest

import harness
from harness import VIRTUAL_DOMAIN as VD

pytestmark = pytest.mark.timeout(120)

RECIPE = ("smtpd -o syslog_name=postfix/submission -o smtpd_tls_security_level=encrypt "
          "-o smtpd_sasl_auth_enable=yes -o smtpd_tls_auth_only=yes "
          "-o smtpd_client_restrictions=permit_sasl_authenticated,reject "
          "-o smtpd_relay_restrictions=permit_sasl_authenticated,reject")
LEGACY = ("smtpd -o syslog_name=postfix/submission -o smtpd_enforce_tls=yes "
          "-o smtpd_sasl_auth_enable=yes -o smtpd_tls_auth_only=yes "
          "-o smtpd_client_restrictions=permit_sasl_authenticated,reject "
          "-o smtpd_relay_restrictions=permit_sasl_authenticated,reject")
SMTPS = ("smtpd -o syslog_name=postfix/smtps -o smtpd_tls_wrappermode=yes "
         "-o smtpd_sasl_auth_enable=yes "
         "-o smtpd_client_restrictions=permit_sasl_authenticated,reject "
         "-o smtpd_relay_restrictions=permit_sasl_authenticated,reject")


@pytest.fixture(scope="module")
def inst(tmp_path_factory):
    for tool in ("openssl", "swaks"):
        if not shutil.which(tool):
            pytest.skip(f"{tool} not installed")
    saslpasswd2 = shutil.which("saslpasswd2") or "/usr/sbin/saslpasswd2"
    if not os.path.exists(saslpasswd2):
        pytest.skip("saslpasswd2 not installed")
    base = tmp_path_factory.mktemp("submission")
    ports = {"smtp": harness.free_port(), "submission": harness.free_port(),
             "legacy": harness.free_port(), "smtps": harness.free_port()}
    master = (f"127.0.0.1:{ports['smtp']} inet n - n - - smtpd\n"
              f"127.0.0.1:{ports['submission']} inet n - n - - {RECIPE}\n"
              f"127.0.0.1:{ports['legacy']} inet n - n - - {LEGACY}\n"
              f"127.0.0.1:{ports['smtps']} inet n - n - - {SMTPS}\n"
              "qmgr      unix  n       -       n       300     1       qmgr\n"
              "virtual   unix  -       n       n       -       -       virtual\n"
              "smtp      unix  -       -       n       -       -       smtp\n"
              "error     unix  -       -       n       -       -       error\n")
    pw = harness.PostwellInstance(base, {}, master, port=ports["smtp"], name="subm")
    # Under the instance root: the smtpd reads these as mail_owner.
    files = pw.root / "files"
    files.mkdir()
    os.chmod(files, 0o755)
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                    str(files / "key.pem"), "-out", str(files / "cert.pem"), "-days", "2",
                    "-subj", f"/CN={harness.HOSTNAME}"], check=True, capture_output=True,
                   timeout=60)
    db = files / "sasldb2"
    subprocess.run([saslpasswd2, "-c", "-p", "-f", str(db), "-u", "example.com", "alice"],
                   input=b"s3cret", check=True, capture_output=True, timeout=30)
    (files / "smtpd.conf").write_text(f"pwcheck_method: auxprop\nauxprop_plugin: sasldb\n"
                                      f"sasldb_path: {db}\nmech_list: PLAIN LOGIN CRAM-MD5\n")
    for f in files.iterdir():
        os.chmod(f, 0o644)                      # a test key: world-readable is fine
    pw.main_cf = {"smtpd_tls_cert_file": str(files / "cert.pem"),
                  "smtpd_tls_key_file": str(files / "key.pem"),
                  "smtpd_use_tls": "yes",           # port 25: opportunistic (legacy form)
                  "cyrus_sasl_config_path": str(files),
                  "smtpd_tls_loglevel": "1",
                  "mynetworks": "192.0.2.0/24",     # 127.0.0.1 is a stranger here
                  "smtpd_error_sleep_time": "0"}
    pw.write_config()
    pw.ports = ports
    try:
        pw.start()
        for p in ports.values():
            harness.wait_port(p)
        yield pw
    finally:
        pw.stop()
        pw.cleanup()


def swaks(port, *args):
    cp = subprocess.run(["swaks", "--server", f"127.0.0.1:{port}", "--from", "alice@example.com",
                         "--timeout", "20", "--ehlo", "client.example", *args],
                        capture_output=True, timeout=60)
    return cp.returncode, cp.stdout.decode("latin-1")


def ehlo_lines(port: int) -> list[str]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        f = s.makefile("rb")
        f.readline()
        s.sendall(b"EHLO client.example\r\n")
        out = []
        while True:
            line = f.readline().decode().rstrip("\r\n")
            out.append(line[4:])
            if line[3:4] == " ":
                break
        s.sendall(b"MAIL FROM:<alice@example.com>\r\n")
        out.append(f.readline().decode().rstrip("\r\n"))
        s.sendall(b"QUIT\r\n")
        return out


def test_port25_does_not_require_tls_submission_does(inst):
    plain = ehlo_lines(inst.ports["smtp"])
    assert "STARTTLS" in plain and not any(x.startswith("AUTH") for x in plain)
    assert plain[-1] == "250 2.1.0 Ok"
    for svc in ("submission", "legacy"):
        sub = ehlo_lines(inst.ports[svc])
        assert "STARTTLS" in sub
        assert not any(x.startswith("AUTH") for x in sub)       # smtpd_tls_auth_only
        assert sub[-1] == "530 5.7.0 Must issue a STARTTLS command first", (svc, sub)


@pytest.mark.parametrize("svc", ["submission", "legacy"])
@pytest.mark.parametrize("mech", ["PLAIN", "LOGIN", "CRAM-MD5"])
def test_relay_after_auth_accepted(inst, svc, mech):
    rc, out = swaks(inst.ports[svc], "--tls", "--auth", mech, "--auth-user",
                    "alice@example.com", "--auth-password", "s3cret", "--to",
                    "someone@example.net")
    assert rc == 0, out[-2500:]
    assert "<~  235 2.7.0 Authentication successful" in out
    assert re.search(r"<~  250 2\.0\.0 Ok: queued as [0-9A-F]+", out), out[-1500:]
    inst.wait_log(rf"postfix/submission/smtpd\[\d+\]: [0-9A-F]+: client=\S+\[127\.0\.0\.1\], "
                  rf"sasl_method={mech}, sasl_username=alice@example\.com")


def test_relay_without_auth_rejected(inst):
    rc, out = swaks(inst.ports["submission"], "--tls", "--to", "someone@example.net")
    assert rc != 0
    assert re.search(r"<~\* 554 5\.7\.1 <unknown\[127\.0\.0\.1\]>: Client host rejected: "
                     r"Access denied", out), out[-1500:]
    # And port 25 still refuses to relay for a stranger.
    rc, out = swaks(inst.ports["smtp"], "--to", "someone@example.net")
    assert rc != 0 and "Relay access denied" in out, out[-1500:]


def test_wrong_password_on_submission(inst):
    for user, password in (("alice@example.com", "nope"), ("mallory@example.com", "s3cret"),
                           ("alice@elsewhere.example", "s3cret")):
        rc, out = swaks(inst.ports["submission"], "--tls", "--auth", "PLAIN", "--auth-user",
                        user, "--auth-password", password, "--to", "someone@example.net")
        assert rc != 0 and "<~* 535 5.7.8 Error: authentication failed:" in out, out[-1500:]
    inst.wait_log(r"postfix/submission/smtpd\[\d+\]: warning: \S+\[127\.0\.0\.1\]: SASL PLAIN "
                  r"authentication failed")


def test_submission_delivers_locally_with_auth(inst):
    rc, out = swaks(inst.ports["submission"], "--tls", "--auth", "PLAIN", "--auth-user",
                    "alice@example.com", "--auth-password", "s3cret", "--to", f"bob@{VD}",
                    "--header", "Subject: submitted")
    assert rc == 0, out[-1500:]
    msgs = inst.wait_maildir("bob", 1, timeout=30)
    head = msgs[0].read_bytes().split(b"\n\n", 1)[0].decode()
    assert re.search(r"with ESMTPSA id [0-9A-F]+", head), head


def test_smtps_implicit_tls_with_auth(inst):
    rc, out = swaks(inst.ports["smtps"], "--tlsc", "--auth", "LOGIN", "--auth-user",
                    "alice@example.com", "--auth-password", "s3cret", "--to",
                    "someone@example.net")
    assert rc == 0 and "<~  235 2.7.0 Authentication successful" in out, out[-2500:]
    inst.wait_log(r"postfix/smtps/smtpd\[\d+\]: Anonymous TLS connection established from")
    # A plaintext client on the smtps port gets nothing and is dropped.
    with socket.create_connection(("127.0.0.1", inst.ports["smtps"]), timeout=10) as s:
        s.sendall(b"EHLO plain\r\n")
        s.settimeout(10)
        try:
            data = s.recv(100)
        except (socket.timeout, ConnectionResetError):
            data = b""
        assert not data.startswith(b"220")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", inst.ports["smtps"]), timeout=10) as raw:
        with ctx.wrap_socket(raw) as s:
            assert s.recv(100).startswith(b"220 ")
