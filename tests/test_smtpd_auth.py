"""SMTP AUTH (RFC 4954) in the asyncio smtpd: the built-in passwd file back end, Cyrus
sasldb made with Debian's saslpasswd2, swaks and smtplib as clients."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import shutil
import smtplib
import subprocess

import pytest

from test_smtpd import WAIT
from test_smtpd_tls import Wire, cert, client_ctx, servers, tls_params  # noqa: F401

pytestmark = pytest.mark.timeout(90)


def b64(text: str | bytes) -> str:
    return base64.b64encode(text.encode() if isinstance(text, str) else text).decode()


@pytest.fixture
def passwd(tmp_path):
    p = tmp_path / "sasl_passwd"
    p.write_text("alice@example.com:{PLAIN}secret\nbob@example.com:{PLAIN}hunter2\n")
    os.chmod(p, 0o600)
    return str(p)


def auth_params(cert, passwd, level="may", **more):
    p = tls_params(cert, level, smtpd_sasl_auth_enable="yes", smtpd_sasl_type="postwell",
                   smtpd_sasl_path=passwd)
    p.update(more)
    return p


def started(r, tls=True) -> Wire:
    w = Wire(r.port)
    w.reply()
    w.cmd("EHLO c.example")
    if tls:
        w.starttls()
        w.cmd("EHLO c.example")
    return w


@pytest.mark.parametrize("mech", ["PLAIN", "LOGIN", "CRAM-MD5"])
def test_smtplib_auth_after_starttls(servers, cert, passwd, mech):
    r = servers(auth_params(cert, passwd, smtpd_sasl_authenticated_header="yes"))
    with smtplib.SMTP("127.0.0.1", r.port, timeout=WAIT) as s:
        s.starttls(context=client_ctx())
        s.ehlo("c.example")
        assert mech in s.esmtp_features["auth"].split()
        s.user, s.password = "alice@example.com", "secret"
        code, text = s.auth(mech, getattr(s, "auth_" + mech.lower().replace("-", "_")))
        assert (code, text) == (235, b"2.7.0 Authentication successful")
        s.sendmail("alice@example.com", ["b@mx.example.test"], b"Subject: t\r\n\r\nhi\r\n")
    line = r.wait_log(r": client=")
    assert line.endswith(f"client=unknown[127.0.0.1], sasl_method={mech}, "
                         f"sasl_username=alice@example.com"), line
    qid = line.split(":")[0]
    with r.store.open(qid, "incoming") as qm:
        content = b"".join(qm.iter_content()).decode()
        attrs = qm.attributes
    assert "\t(Authenticated sender: alice@example.com)\n\tby mx.example.test (postwell) " \
           f"with ESMTPSA id {qid}" in content, content[:700]
    assert attrs.get("sasl_username") == "alice@example.com"
    assert attrs.get("sasl_method") == mech


def test_scram_sha_256(servers, cert, passwd):
    r = servers(auth_params(cert, passwd))
    w = started(r)
    try:
        cnonce = "rOprNGfwEbeRWgbNEkqO"
        first_bare = f"n=alice@example.com,r={cnonce}"
        code, text = w.cmd(f"AUTH SCRAM-SHA-256 {b64('n,,' + first_bare)}")
        assert code == 334
        server_first = base64.b64decode(text).decode()
        fields = dict(kv.split("=", 1) for kv in server_first.split(","))
        salt, iters = base64.b64decode(fields["s"]), int(fields["i"])
        salted = hashlib.pbkdf2_hmac("sha256", b"secret", salt, iters)
        ckey = hmac.new(salted, b"Client Key", "sha256").digest()
        stored = hashlib.sha256(ckey).digest()
        final_wo = f"c=biws,r={fields['r']}"
        auth_msg = f"{first_bare},{server_first},{final_wo}".encode()
        sig = hmac.new(stored, auth_msg, "sha256").digest()
        proof = bytes(a ^ b for a, b in zip(ckey, sig))
        code, text = w.cmd(b64(f"{final_wo},p={base64.b64encode(proof).decode()}"))
        if code == 334:        # server-final-message, then an empty response
            code, text = w.cmd("")
        assert (code, text) == (235, "2.7.0 Authentication successful")
    finally:
        w.close()


def test_auth_failures_and_replies(servers, cert, passwd):
    r = servers(auth_params(cert, passwd))
    w = started(r)
    try:
        code, text = w.cmd(f"AUTH PLAIN {b64(chr(0) + 'alice@example.com' + chr(0) + 'wrong')}")
        assert code == 535 and text.startswith("5.7.8 Error: authentication failed:"), text
        code, text = w.cmd(f"AUTH PLAIN {b64(chr(0) + 'nobody@example.com' + chr(0) + 'x')}")
        assert code == 535 and text.startswith("5.7.8 Error: authentication failed:"), text
        # An empty challenge is "334 " with its space (RFC 4954 4).
        w.send(b"AUTH PLAIN\r\n")
        assert w.sock.recv(100) == b"334 \r\n"
        assert w.cmd("*") == (501, "5.7.0 Authentication aborted")
        code, text = w.cmd("AUTH PLAIN !!!notbase64")
        assert code in (501, 535), text
        assert w.cmd("AUTH") == (501, "5.5.4 Syntax: AUTH mechanism")
        code, text = w.cmd("AUTH NOSUCH")
        assert code == 535 and "5.7.8" in text, text
        code, text = w.cmd("AUTH LOGIN")
        assert code == 334
        code, text = w.cmd("A" * 20000)             # over smtpd_sasl_response_limit
        assert (code, text) == (500, "5.5.6 SASL response limit exceeded")
        assert w.cmd(f"AUTH PLAIN {b64(chr(0) + 'alice@example.com' + chr(0) + 'secret')}") \
            == (235, "2.7.0 Authentication successful")
        assert w.cmd("AUTH PLAIN") == (503, "5.5.1 Error: already authenticated")
        assert w.cmd("QUIT")[0] == 221
    finally:
        w.close()
    r.wait_log(r"warning: unknown\[127\.0\.0\.1\]: SASL PLAIN authentication failed: .*"
               r"sasl_username=alice@example.com")
    r.wait_log(r"warning: unknown\[127\.0\.0\.1\]: SASL PLAIN authentication aborted")
    r.wait_log(r"disconnect from .* auth=1/9 quit=1")


def test_auth_in_transaction_refused(servers, cert, passwd):
    r = servers(auth_params(cert, passwd))
    w = started(r)
    try:
        assert w.cmd("MAIL FROM:<a@example.org>")[0] == 250
        assert w.cmd("AUTH PLAIN") == (503, "5.5.1 Error: MAIL transaction in progress")
    finally:
        w.close()


def test_tls_auth_only_hides_auth_before_tls(servers, cert, passwd):
    r = servers(auth_params(cert, passwd, smtpd_tls_auth_only="yes"))
    w = Wire(r.port)
    try:
        w.reply()
        code, text = w.cmd("EHLO c.example")
        assert "AUTH" not in text
        assert w.cmd("AUTH PLAIN") == (503, "5.5.1 Error: authentication not enabled")
        w.starttls()
        code, text = w.cmd("EHLO c.example")
        assert "\nAUTH PLAIN LOGIN" in text, text
    finally:
        w.close()


def test_auth_offered_in_plaintext_without_auth_only(servers, cert, passwd):
    r = servers(auth_params(cert, passwd, broken_sasl_auth_clients="yes"))
    w = Wire(r.port)
    try:
        w.reply()
        code, text = w.cmd("EHLO c.example")
        lines = text.split("\n")
        i = [n for n, x in enumerate(lines) if x.startswith("AUTH ")][0]
        assert lines[i + 1] == "AUTH=" + lines[i][5:]       # broken_sasl_auth_clients
        assert w.cmd(f"AUTH PLAIN {b64(chr(0) + 'bob@example.com' + chr(0) + 'hunter2')}")[0] \
            == 235
    finally:
        w.close()


def test_auth_disabled(servers, cert):
    r = servers(tls_params(cert))
    w = started(r)
    try:
        assert w.cmd("AUTH PLAIN") == (503, "5.5.1 Error: authentication not enabled")
    finally:
        w.close()


def test_failed_logins_count_towards_hard_error_limit(servers, cert, passwd):
    r = servers(auth_params(cert, passwd, smtpd_hard_error_limit="3"))
    w = started(r)
    try:
        bad = f"AUTH PLAIN {b64(chr(0) + 'alice@example.com' + chr(0) + 'nope')}"
        for _ in range(3):
            assert w.cmd(bad)[0] == 535
        code, text = w.cmd(bad)
        assert (code, text) == (421, "4.7.0 mx.example.test Error: too many errors")
    finally:
        w.close()
    r.wait_log("too many errors after AUTH")


def test_permit_sasl_authenticated_relays(servers, cert, passwd):
    r = servers(auth_params(cert, passwd, mynetworks="192.0.2.0/24",
                            smtpd_relay_restrictions="permit_sasl_authenticated, "
                                                     "reject_unauth_destination"))
    w = started(r)
    try:
        assert w.cmd("MAIL FROM:<alice@example.com>")[0] == 250
        code, text = w.cmd("RCPT TO:<someone@example.net>")
        assert (code, text) == (554, "5.7.1 <someone@example.net>: Relay access denied")
        w.cmd("RSET")
        assert w.cmd(f"AUTH PLAIN {b64(chr(0) + 'alice@example.com' + chr(0) + 'secret')}")[0] \
            == 235
        assert w.cmd("MAIL FROM:<alice@example.com>")[0] == 250
        assert w.cmd("RCPT TO:<someone@example.net>")[0] == 250
    finally:
        w.close()


# ---------------------------------------------------------------- sender login maps

@pytest.mark.parametrize("restriction,authed,sender,want", [
    ("reject_sender_login_mismatch", True, "alice@example.com", 250),
    ("reject_sender_login_mismatch", True, "boss@example.com", 553),
    ("reject_sender_login_mismatch", False, "boss@example.com", 553),
    ("reject_sender_login_mismatch", False, "free@example.com", 250),
    ("reject_sender_login_mismatch", True, "free@example.com", 553),
    ("reject_authenticated_sender_login_mismatch", False, "boss@example.com", 250),
    ("reject_authenticated_sender_login_mismatch", True, "boss@example.com", 553),
    ("reject_authenticated_sender_login_mismatch", True, "free@example.com", 553),
    ("reject_unauthenticated_sender_login_mismatch", True, "boss@example.com", 250),
    ("reject_unauthenticated_sender_login_mismatch", False, "boss@example.com", 553),
    ("reject_known_sender_login_mismatch", True, "free@example.com", 250),
    ("reject_known_sender_login_mismatch", True, "boss@example.com", 553),
])
def test_sender_login_maps(servers, cert, passwd, restriction, authed, sender, want):
    r = servers(auth_params(
        cert, passwd, smtpd_sender_login_maps="inline:{ alice@example.com=alice@example.com, "
                                               "boss@example.com=bob@example.com }",
        smtpd_sender_restrictions=restriction))
    w = started(r)
    try:
        if authed:
            assert w.cmd(f"AUTH PLAIN {b64(chr(0) + 'alice@example.com' + chr(0) + 'secret')}")[0] \
                == 235
        code, text = w.cmd(f"MAIL FROM:<{sender}>")
        assert w.cmd("RCPT TO:<x@mx.example.test>")[0] in (250, 553, 550, 554)
        if code == 250:
            # smtpd_delay_reject: the sender restriction answers at RCPT.
            code, text = w.cmd("RSET")
            w.cmd(f"MAIL FROM:<{sender}>")
            code, text = w.cmd("RCPT TO:<x@mx.example.test>")
        assert code == want, text
        if want == 553:
            assert text == f"5.7.1 <{sender}>: Sender address rejected: not " + (
                "owned by user alice@example.com" if authed else "logged in"), text
    finally:
        w.close()


# ---------------------------------------------------------------- swaks, Cyrus sasldb

def _saslpasswd2():
    return shutil.which("saslpasswd2") or (
        "/usr/sbin/saslpasswd2" if os.path.exists("/usr/sbin/saslpasswd2") else None)


@pytest.fixture
def sasldb(tmp_path):
    tool = _saslpasswd2()
    if not tool:
        pytest.skip("saslpasswd2 (sasl2-bin) not installed")
    d = tmp_path / "sasl2"
    d.mkdir()
    db = d / "sasldb2"
    subprocess.run([tool, "-c", "-p", "-f", str(db), "-u", "example.com", "alice"],
                   input=b"s3cret", check=True, timeout=30, capture_output=True)
    (d / "smtpd.conf").write_text(f"pwcheck_method: auxprop\nauxprop_plugin: sasldb\n"
                                  f"sasldb_path: {db}\nmech_list: PLAIN LOGIN CRAM-MD5\n")
    return str(d)


def swaks(port, *args):
    if not shutil.which("swaks"):
        pytest.skip("swaks not installed")
    cp = subprocess.run(["swaks", "--server", f"127.0.0.1:{port}", "--from", "alice@example.com",
                         "--to", "b@mx.example.test", "--timeout", "20", *args],
                        capture_output=True, timeout=60)
    return cp.returncode, cp.stdout.decode("latin-1")


@pytest.mark.parametrize("mech", ["PLAIN", "LOGIN", "CRAM-MD5"])
def test_swaks_cyrus_sasldb_submission(servers, cert, sasldb, mech):
    # smtpd_sasl_type = cyrus is the default.
    r = servers(tls_params(cert, "encrypt", smtpd_sasl_auth_enable="yes",
                           smtpd_tls_auth_only="yes", cyrus_sasl_config_path=sasldb,
                           smtpd_relay_restrictions="permit_sasl_authenticated, reject",
                           mynetworks="192.0.2.0/24"))
    rc, out = swaks(r.port, "--tls", "--auth", mech, "--auth-user", "alice@example.com",
                    "--auth-password", "s3cret", "--to", "x@example.net")
    assert rc == 0 and "<~  235 2.7.0 Authentication successful" in out, out[-2500:]
    assert "250 2.0.0 Ok: queued as" in out
    r.wait_log(rf"client=unknown\[127\.0\.0\.1\], sasl_method={mech}, "
               r"sasl_username=alice@example.com")
    for user, password in (("alice@example.com", "wrong"), ("nobody@example.com", "s3cret"),
                           ("alice@other.example", "s3cret")):
        rc, out = swaks(r.port, "--tls", "--auth", mech, "--auth-user", user,
                        "--auth-password", password)
        assert rc != 0 and "<~* 535 5.7.8 Error: authentication failed:" in out, out[-1500:]


def test_swaks_without_auth_cannot_relay(servers, cert, sasldb):
    r = servers(tls_params(cert, "encrypt", smtpd_sasl_auth_enable="yes",
                           cyrus_sasl_config_path=sasldb, mynetworks="192.0.2.0/24",
                           smtpd_relay_restrictions="permit_sasl_authenticated, reject"))
    rc, out = swaks(r.port, "--tls", "--to", "x@example.net")
    assert rc != 0 and re.search(r"<~\* +554 5\.7\.1 <x@example\.net>: Recipient address "
                                 r"rejected: Access denied",
                                 out), out[-1500:]


# ---------------------------------------------------------------- saslauthd, Dovecot

from test_sasl_daemons import dovecot, saslauthd  # noqa: E402,F401  (real daemons)


def test_cyrus_saslauthd_through_smtpd(servers, cert, saslauthd, tmp_path):
    mux, stub = saslauthd
    d = tmp_path / "sasl-saslauthd"
    d.mkdir()
    (d / "smtpd.conf").write_text(f"pwcheck_method: saslauthd\nsaslauthd_path: {mux}\n"
                                  "mech_list: PLAIN LOGIN CRAM-MD5\n")
    r = servers(tls_params(cert, smtpd_sasl_auth_enable="yes", cyrus_sasl_config_path=str(d),
                           smtpd_sasl_local_domain="mx.example.test"))
    w = started(r)
    try:
        code, text = w.cmd("EHLO c.example")
        assert "\nAUTH PLAIN LOGIN\n" in text, text         # saslauthd: no CRAM-MD5
        assert w.cmd(f"AUTH PLAIN {b64(chr(0) + 'alice' + chr(0) + 'bad')}")[0] == 535
        assert w.cmd("AUTH LOGIN") == (334, "VXNlcm5hbWU6")
        assert w.cmd(b64("alice")) == (334, "UGFzc3dvcmQ6")
        assert w.cmd(b64("secret")) == (235, "2.7.0 Authentication successful")
        w.cmd("MAIL FROM:<alice@mx.example.test>")
        assert w.cmd("RCPT TO:<b@mx.example.test>")[0] == 250
    finally:
        w.close()
    r.wait_log(r"client=unknown\[127\.0\.0\.1\], sasl_method=LOGIN, "
               r"sasl_username=alice@mx\.example\.test")


def test_dovecot_through_smtpd(servers, cert, dovecot):
    r = servers(tls_params(cert, smtpd_sasl_auth_enable="yes", smtpd_sasl_type="dovecot",
                           smtpd_sasl_path=str(dovecot)))
    with smtplib.SMTP("127.0.0.1", r.port, timeout=WAIT) as s:
        s.starttls(context=client_ctx())
        s.ehlo("c.example")
        assert s.esmtp_features["auth"].split() == ["PLAIN", "LOGIN", "CRAM-MD5", "SCRAM-SHA-256"]
        s.user, s.password = "alice@mx.example.test", "wrong"
        with pytest.raises(smtplib.SMTPAuthenticationError) as exc:
            s.auth("PLAIN", s.auth_plain)
        assert exc.value.smtp_code == 535
        s.user, s.password = "alice@mx.example.test", "secret"
        assert s.auth("CRAM-MD5", s.auth_cram_md5)[0] == 235
        s.sendmail("alice@mx.example.test", ["b@mx.example.test"], b"Subject: t\r\n\r\nx\r\n")
    r.wait_log(r"client=unknown\[127\.0\.0\.1\], sasl_method=CRAM-MD5, "
               r"sasl_username=alice@mx\.example\.test")


def test_sasl_exceptions_networks_hide_auth_only(servers, cert, passwd):
    r = servers(auth_params(cert, passwd, smtpd_sasl_exceptions_networks="127.0.0.0/8"))
    w = started(r)
    try:
        code, text = w.cmd("EHLO c.example")
        assert "AUTH" not in text
        # Postfix still takes AUTH from these clients; it only does not announce it.
        assert w.cmd(f"AUTH PLAIN {b64(chr(0) + 'alice@example.com' + chr(0) + 'secret')}")[0] \
            == 235
    finally:
        w.close()


# ---------------------------------------------------------------- side by side with Postfix

def _sasl_files(inst, tool) -> dict:
    from test_smtpd_tls import _tls_files
    params = _tls_files(inst.root)
    # Debian's Postfix reads $config_directory/sasl/smtpd.conf whatever
    # cyrus_sasl_config_path says: use that directory for both.
    d = inst.config_dir / "sasl"
    d.mkdir(exist_ok=True)
    db = d / "sasldb2"
    subprocess.run([tool, "-c", "-p", "-f", str(db), "-u", "example.com", "alice"],
                   input=b"s3cret", check=True, capture_output=True, timeout=30)
    (d / "smtpd.conf").write_text(f"pwcheck_method: auxprop\nauxprop_plugin: sasldb\n"
                                  f"sasldb_path: {db}\nmech_list: PLAIN LOGIN CRAM-MD5\n")
    for f in d.iterdir():
        os.chmod(f, 0o644)
    params.update({"smtpd_sasl_auth_enable": "yes", "cyrus_sasl_config_path": str(d),
                   "smtpd_tls_security_level": "may", "smtpd_error_sleep_time": "0",
                   "smtpd_sasl_authenticated_header": "yes", "mynetworks": "192.0.2.0/24",
                   "smtpd_relay_restrictions": "permit_sasl_authenticated, reject"})
    return params


def _auth_dialogue(port):
    w = Wire(port)
    out = []
    try:
        w.reply()
        w.cmd("EHLO c.example")
        w.starttls()
        steps = ["EHLO c.example",
                 f"AUTH PLAIN {b64(chr(0) + 'alice@example.com' + chr(0) + 'wrong')}",
                 f"AUTH PLAIN {b64(chr(0) + 'mallory@example.com' + chr(0) + 's3cret')}",
                 f"AUTH PLAIN {b64(chr(0) + 'alice@elsewhere.example' + chr(0) + 's3cret')}",
                 "AUTH LOGIN", "*", "AUTH", "AUTH PLAIN", "*", "AUTH PLAIN !!!notbase64",
                 "AUTH LOGIN", "!!!", "AUTH FOO", "AUTH PLAIN =", "AUTH CRAM-MD5", "*",
                 "AUTH LOGIN", b64("alice@example.com"), b64("bad"),
                 "MAIL FROM:<a@example.org>",
                 "RCPT TO:<x@example.net>", "RSET", "AUTH LOGIN", b64("alice@example.com"),
                 b64("s3cret"), "AUTH PLAIN", "MAIL FROM:<alice@example.com>",
                 "RCPT TO:<alice@virtual.test>", "DATA", "Subject: sasl\r\n\r\nhi\r\n.", "QUIT"]
        for cmd in steps:
            code, text = w.cmd(cmd)
            if cmd == "AUTH CRAM-MD5" and code == 334:
                text = "<random challenge>"
            out.append((cmd.split(" ")[0][:12], code,
                        re.sub(r"queued as \w+", "queued as ID", text)))
    finally:
        w.close()
    return out


@pytest.mark.postfix
def test_cyrus_auth_dialogue_matches_postfix(reference_factory, postwell_factory):
    import harness
    if harness.reference_available():
        pytest.skip(harness.reference_available())
    tool = _saslpasswd2()
    if not tool:
        pytest.skip("saslpasswd2 not installed")
    ref = reference_factory({}, name="saslref")
    pw = postwell_factory({}, name="saslpw")
    for inst in (ref, pw):
        inst.main_cf_extra = inst.main_cf = _sasl_files(inst, tool)
        inst.write_config()
        inst.start()
    want = _auth_dialogue(ref.port)
    got = _auth_dialogue(pw.port)
    assert got == want
    for inst in (ref, pw):
        inst.wait_log(r"disconnect from .* starttls=")

    def lines(inst):
        text = inst.log_text()
        keep = []
        for line in text.splitlines():
            m = re.search(r"(?:postfix|postwell)/smtpd\[\d+\]: (.*)", line)
            if m and ("SASL" in m.group(1) or "client=" in m.group(1)
                      or "disconnect" in m.group(1)):
                keep.append(re.sub(r"^[0-9A-F]+: ", "ID: ", m.group(1)))
        return [k for k in keep if "SASL authentication failure" not in k
                and "SASL authentication problem" not in k]
    assert lines(pw) == lines(ref)
    mine = pw.wait_maildir("alice", 1)[0].read_text()
    theirs = ref.wait_maildir("alice", 1)[0].read_text()

    def auth_line(text):
        return re.search(r"^\t\(Authenticated sender: .*\)$|with \w+ id", text, re.M).group(0)
    assert auth_line(mine) == auth_line(theirs)
    assert re.search(r"with ESMTPSA id", theirs) and re.search(r"with ESMTPSA id", mine)


def _login_dialogue(port):
    w = Wire(port)
    out = []
    try:
        w.reply()
        w.cmd("EHLO c.example")
        w.starttls()
        w.cmd("EHLO c.example")
        senders = ["boss@example.com", "free@example.com", "alice@example.com", "<>"]

        def round_():
            for s in senders:
                w.cmd(f"MAIL FROM:<{s.strip('<>')}>")
                out.append((s, *w.cmd("RCPT TO:<alice@virtual.test>")))
                w.cmd("RSET")
        round_()
        assert w.cmd(f"AUTH PLAIN {b64(chr(0) + 'alice@example.com' + chr(0) + 's3cret')}")[0] \
            == 235
        senders += ["ALICE@Example.COM", "alice+x@example.com"]
        round_()
        w.cmd("QUIT")
    finally:
        w.close()
    return out


@pytest.mark.postfix
@pytest.mark.parametrize("restriction", ["reject_sender_login_mismatch",
                                         "reject_known_sender_login_mismatch"])
def test_sender_login_mismatch_matches_postfix(reference_factory, postwell_factory, restriction):
    import harness
    if harness.reference_available():
        pytest.skip(harness.reference_available())
    tool = _saslpasswd2()
    if not tool:
        pytest.skip("saslpasswd2 not installed")
    ref = reference_factory({}, name="loginref")
    pw = postwell_factory({}, name="loginpw")
    for inst in (ref, pw):
        params = _sasl_files(inst, tool)
        params.pop("smtpd_relay_restrictions")
        params.update({"smtpd_sender_restrictions": restriction,
                       "smtpd_sender_login_maps": "inline:{ alice@example.com=alice@example.com, "
                                                  "boss@example.com=bob@example.com }"})
        inst.main_cf_extra = inst.main_cf = params
        inst.write_config()
        inst.start()
    want = _login_dialogue(ref.port)
    got = _login_dialogue(pw.port)
    assert got == want
