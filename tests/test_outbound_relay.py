"""Issue 4 end to end: a running postwell relays through a real Postfix ISP relay.

The relay is a reference Postfix that requires STARTTLS and SASL (Cyrus sasldb)
before it relays anything.  The same client settings are tried on a reference
Postfix acting as the client where Postfix's own behaviour is the question
(credentials over a plain-text connection).  Loopback only; every wait bounded.
"""

from __future__ import annotations

import os
import shutil
import smtplib
import subprocess

import pytest

import harness

SASLPASSWD2 = shutil.which("saslpasswd2") or "/usr/sbin/saslpasswd2"
OPENSSL = shutil.which("openssl")
pytestmark = [
    pytest.mark.postfix,
    pytest.mark.skipif(not os.access(SASLPASSWD2, os.X_OK), reason="saslpasswd2 (sasl2-bin) missing"),
    pytest.mark.skipif(OPENSSL is None, reason="openssl missing"),
    pytest.mark.skipif(harness.reference_available() is not None,
                       reason=str(harness.reference_available())),
]

REALM = "isp.test"
USER, PASSWORD = "alice", "s3cret-pw"
LOGIN = f"{USER}@{REALM}"
RELAYED = "relayed.test"          # mailbox domain of the relay (not local to the client)
OUT_MASTER = ("smtp      unix  -       -       n       -       -       smtp\n"
              "relay     unix  -       -       n       -       -       smtp\n")


def outbound_postwell(factory, main_cf: dict):
    """A postwell with the smtp/relay services in master.cf."""
    inst = factory(main_cf)
    inst.master_cf = inst.default_master_cf() + OUT_MASTER
    inst.write_config()
    return inst


def send(port: int, rcpts, msg: bytes, sender: str = f"alice@{harness.VIRTUAL_DOMAIN}"):
    with smtplib.SMTP("127.0.0.1", port, timeout=15) as s:
        return s.sendmail(sender, rcpts, msg)


def make_relay(reference_factory, *, tls: bool = True, auth_only: bool = True,
               key: str = "rsa"):
    """A reference Postfix that relays only for SASL-authenticated clients."""
    ref = reference_factory(name="isp")
    # Debian's Postfix reads $config_directory/sasl/smtpd.conf whatever
    # cyrus_sasl_config_path says (seen with strace); the parameter is set as well.
    d = ref.config_dir / "sasl"
    d.mkdir(parents=True)
    os.chmod(d, 0o755)
    db = d / "sasldb2"
    subprocess.run([SASLPASSWD2, "-f", str(db), "-c", "-p", "-u", REALM, USER],
                   input=PASSWORD, text=True, check=True, timeout=20, capture_output=True)
    os.chmod(db, 0o644)
    (d / "smtpd.conf").write_text(f"pwcheck_method: auxprop\nauxprop_plugin: sasldb\n"
                                  f"sasldb_path: {db}\nmech_list: PLAIN LOGIN\n")
    (ref.config_dir / "vmailbox2").write_text(f"bob@{RELAYED} {RELAYED}/bob/\n")
    extra = {
        "mynetworks": "127.0.0.254/32",     # the client is not trusted by address
        "virtual_mailbox_domains": RELAYED,
        "virtual_mailbox_maps": f"texthash:{ref.config_dir}/vmailbox2",
        "smtpd_sasl_auth_enable": "yes",
        "smtpd_sasl_type": "cyrus",
        "smtpd_sasl_path": "smtpd",
        "cyrus_sasl_config_path": str(d),
        "smtpd_sasl_security_options": "noanonymous",
        "smtpd_relay_restrictions": "permit_sasl_authenticated, reject",
        "smtpd_recipient_restrictions": "permit_sasl_authenticated, reject",
        "smtpd_tls_auth_only": "yes" if auth_only else "no",
    }
    if tls:
        newkey = ["-newkey", "rsa:2048"] if key == "rsa" else \
            ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]
        keyfile, cert = ref.root / "key.pem", ref.root / "cert.pem"
        subprocess.run([OPENSSL, "req", "-x509", *newkey, "-nodes", "-keyout",
                        str(keyfile), "-out", str(cert), "-days", "2", "-subj", "/CN=isp.test"],
                       check=True, timeout=60, capture_output=True)
        os.chmod(keyfile, 0o644)
        extra.update({"smtpd_tls_cert_file": str(cert), "smtpd_tls_key_file": str(keyfile),
                      "smtpd_tls_security_level": "may"})
    else:
        extra["smtpd_tls_security_level"] = "none"
    ref.main_cf_extra = extra
    ref.write_config()
    return ref.start()


def client_params(relay_port: int, passwd: str, **extra) -> dict:
    p = {
        "relayhost": f"[127.0.0.1]:{relay_port}",
        "smtp_sasl_auth_enable": "yes",
        "smtp_sasl_password_maps": f"hash:{passwd}",
        "smtp_sasl_security_options": "noanonymous",
        "smtp_tls_security_level": "encrypt",
        "smtp_tls_loglevel": "1",
    }
    p.update(extra)
    return p


def write_passwd(inst, relay_port: int, postmap) -> str:
    path = inst.config_dir / "sasl_passwd"
    path.write_text(f"[127.0.0.1]:{relay_port} {LOGIN}:{PASSWORD}\n")
    postmap(f"hash:{path}")
    os.chmod(path, 0o600)
    return str(path)


def test_relayhost_with_starttls_and_sasl_reaches_the_isp_mailbox(postwell_factory,
                                                                 reference_factory):
    relay = make_relay(reference_factory)
    pw = outbound_postwell(postwell_factory, {})
    passwd = write_passwd(pw, relay.port, lambda t: pw.run("postmap", t, check=True))
    pw.main_cf = client_params(relay.port, passwd)
    pw.write_config()
    pw.start()
    msg = harness.make_message("relay-sasl-1", recipient=f"bob@{RELAYED}")
    send(pw.port, [f"bob@{RELAYED}"], msg)

    m = pw.wait_log(r"to=<bob@relayed\.test>, relay=127\.0\.0\.1\[127\.0\.0\.1\]:%d, .*"
                    r"dsn=2\.0\.0, status=sent \(250 2\.0\.0 Ok: queued as (\w+)\)" % relay.port,
                    timeout=30)
    log = pw.log_text()
    assert (f"Untrusted TLS connection established to 127.0.0.1[127.0.0.1]:{relay.port}: "
            "TLSv1.3 with cipher ") in log
    path = relay.mail_dir / RELAYED / "bob"
    files = harness.wait_for(lambda: [p for sub in ("new", "cur") if (path / sub).is_dir()
                                      for p in (path / sub).iterdir()], 20, 0.1,
                             "the relayed message in the ISP mailbox")
    assert len(files) == 1, files
    assert harness.check_delivered(files[0]) == ("relay-sasl-1", True)
    # The relay saw an authenticated, encrypted client and queued under the id we logged.
    rlog = relay.log_text()
    assert f"{m.group(1)}: client=" in rlog and f"sasl_method=PLAIN, sasl_username={LOGIN}" in rlog
    assert password_never_logged(log)


def password_never_logged(log: str) -> bool:
    import base64
    plain = base64.b64encode(f"\0{LOGIN}\0{PASSWORD}".encode()).decode()
    return PASSWORD not in log and plain not in log


def test_wrong_password_defers_with_the_relays_reply(postwell_factory, reference_factory):
    relay = make_relay(reference_factory)
    pw = outbound_postwell(postwell_factory, {})
    path = pw.config_dir / "sasl_passwd"
    path.write_text(f"[127.0.0.1]:{relay.port} {LOGIN}:wrong\n")
    pw.run("postmap", f"hash:{path}", check=True)
    pw.main_cf = client_params(relay.port, str(path))
    pw.write_config()
    pw.start()
    send(pw.port, [f"bob@{RELAYED}"], harness.make_message("relay-badpw"))
    # Postfix 3.7: "SASL authentication failed; server 127.0.0.1[127.0.0.1] said: 535 5.7.8
    # Error: authentication failed: ..." and the message stays queued (4.7.8 after soft-bounce?)
    line = pw.wait_log(r"to=<bob@relayed\.test>.*status=(deferred|bounced) \(.*\)$", timeout=30)
    assert "status=deferred" in line.group(0), line.group(0)
    assert (f"SASL authentication failed; server 127.0.0.1[127.0.0.1] said: 535 5.7.8 "
            "Error: authentication failed") in line.group(0)
    assert password_never_logged(pw.log_text())


def run_client_pair(postwell_factory, reference_factory, relay, client_extra: dict):
    """The same relayhost/SASL client settings on postwell and on a reference Postfix.

    Returns the delivery log line of each for one message to bob@relayed.test.
    """
    pw = outbound_postwell(postwell_factory, {})
    ref = reference_factory(name="client")

    def one(inst):
        if inst is ref:
            postmap = lambda t: subprocess.run(["/usr/sbin/postmap", t], check=True,  # noqa: E731
                                               timeout=30)
        else:
            postmap = lambda t: pw.run("postmap", t, check=True)  # noqa: E731
        passwd = write_passwd(inst, relay.port, postmap)
        params = client_params(relay.port, passwd, **client_extra)
        if inst is ref:
            ref.main_cf_extra = params
        else:
            pw.main_cf = params
        inst.write_config()
        inst.start()
        send(inst.port, [f"bob@{RELAYED}"], harness.make_message(f"pair-{inst.kind}"))
        return inst.wait_log(r"to=<bob@relayed\.test>.*status=\w+ .*$", 30).group(0)
    # Both clients at once (the relay serves both): most of it is start-up and waiting.
    lines = dict(zip(("postwell", "postfix"), harness.run_side_by_side(one, pw, ref)))
    return lines, pw, ref


@pytest.mark.parametrize("options,status", [
    ("noplaintext, noanonymous", "deferred"),
    ("noanonymous", "sent"),
])
def test_auth_over_plaintext_follows_smtp_sasl_security_options(postwell_factory,
                                                                reference_factory,
                                                                options, status):
    """A relay offering AUTH without STARTTLS, client at smtp_tls_security_level = may.

    With smtp_sasl_security_options = noanonymous Postfix does send the password
    in the clear (that is what the option allows); with noplaintext it does not,
    and the mail is deferred.  postwell must do what the reference does in both.
    """
    relay = make_relay(reference_factory, tls=False, auth_only=False)
    lines, pw, ref = run_client_pair(postwell_factory, reference_factory, relay, {
        "smtp_tls_security_level": "may", "smtp_sasl_security_options": options})
    for kind, line in lines.items():
        assert f"status={status}" in line, (kind, line)
    if status == "deferred":
        # Postfix 3.7: "SASL authentication failed; cannot authenticate to server
        # 127.0.0.1[127.0.0.1]: no mechanism available".
        assert ("cannot authenticate to server 127.0.0.1[127.0.0.1]: no mechanism available"
                in lines["postfix"]), lines
        assert lines["postwell"].split("status=")[1] == lines["postfix"].split("status=")[1]
        assert "sasl_username" not in relay.log_text()
    else:
        assert relay.log_text().count(f"sasl_method=PLAIN, sasl_username={LOGIN}") == 2


def test_encrypt_level_never_talks_to_a_relay_without_starttls(postwell_factory,
                                                               reference_factory):
    """smtp_tls_security_level = encrypt and a relay without TLS: no AUTH, no mail;
    the wording is the reference's."""
    relay = make_relay(reference_factory, tls=False, auth_only=False)
    lines, pw, ref = run_client_pair(postwell_factory, reference_factory, relay, {})
    for kind, line in lines.items():
        assert "status=deferred" in line, (kind, line)
    assert lines["postwell"].split("dsn=")[1] == lines["postfix"].split("dsn=")[1], lines
    assert "sasl_username" not in relay.log_text()


@pytest.mark.parametrize("key", ["rsa", "ec"])
def test_tls_and_delivery_lines_match_the_reference_client(postwell_factory, reference_factory,
                                                           key):
    """The whole "TLS connection established" line, key exchange and server signature
    included, is the reference's: "... TLSv1.3 with cipher TLS_AES_256_GCM_SHA384
    (256/256 bits) key-exchange X25519 server-signature RSA-PSS (2048 bits)
    server-digest SHA256"."""
    relay = make_relay(reference_factory, key=key)
    lines, pw, ref = run_client_pair(postwell_factory, reference_factory, relay, {})
    for kind, line in lines.items():
        assert "status=sent (250 2.0.0 Ok: queued as " in line, (kind, line)
    tls = {inst.kind: inst.wait_log(r"Untrusted TLS connection established to .*$", 5).group(0)
           for inst in (pw, ref)}
    assert tls["postwell"] == tls["postfix"], tls
    assert " server-signature " in tls["postwell"]
