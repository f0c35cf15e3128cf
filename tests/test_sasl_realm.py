"""Cyrus realm rules end to end (issue 6), side by side with Postfix 3.7 + libsasl2.

One sasldb made by Debian's saslpasswd2 serves a reference Postfix and a
postwell instance; the same logins go to both, through PLAIN, LOGIN,
CRAM-MD5 and DIGEST-MD5, and the replies and the ``client=... sasl_username=``
log lines must be the same.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re

import pytest

from postwell.sasl.mechanisms import canonical_identity
from test_sasl_digest import HOST, digest_response, make_sasldb

pytestmark = pytest.mark.timeout(120)

USERS = (("alice", HOST, "s3cret"), ("bob", "example.com", "hunter2"),
         ("jörg", HOST, "pässwörd"), ("юзер", HOST, "пароль"))
MECHS = ("PLAIN", "LOGIN", "CRAM-MD5", "DIGEST-MD5")


def b64(data: str | bytes) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def test_canonical_identity_rules():
    # A bare name takes smtpd_sasl_local_domain, else the server name (but
    # Postfix then reports it bare); user@realm names its own realm.
    def t(*a):
        i = canonical_identity(*a)
        return i.user, i.realm, i.reported
    assert t("alice", HOST, "h") == ("alice", HOST, f"alice@{HOST}")
    assert t("alice", "", HOST) == ("alice", HOST, "alice")
    assert t("bob@example.com", HOST, "h") == ("bob", "example.com", "bob@example.com")
    assert t("a@b@c", "", "h") == ("a@b", "c", "a@b@c")


def auth(w, mech: str, login: str, password: str, realm: str | None = "") -> list:
    """One AUTH dialogue; challenges replaced by placeholders."""
    if mech == "PLAIN":
        return [w.cmd(f"AUTH PLAIN {b64(chr(0) + login + chr(0) + password)}")]
    if mech == "LOGIN":
        return [w.cmd("AUTH LOGIN"), w.cmd(b64(login)), w.cmd(b64(password))]
    code, text = w.cmd(f"AUTH {mech}")
    out = [(code, "<challenge>" if code == 334 else text)]
    if code != 334:
        return out
    challenge = base64.b64decode(text)
    if mech == "CRAM-MD5":
        digest = hmac.new(password.encode(), challenge, hashlib.md5).hexdigest()
        out.append(w.cmd(b64(f"{login} {digest}")))
        return out
    resp, rspauth = digest_response(challenge, login, password, realm=realm)
    code, text = w.cmd(b64(resp))
    if code == 334:
        out.append((code, "<rspauth ok>" if base64.b64decode(text).decode() == rspauth
                    else text))
        code, text = w.cmd("")
    out.append((code, text))
    return out


def session(port, mech, login, password, realm=""):
    from test_smtpd_tls import Wire
    w = Wire(port)
    try:
        w.reply()
        w.cmd("EHLO c.example")
        steps = auth(w, mech, login, password, realm)
        if steps[-1][0] == 235:
            steps.append(w.cmd("MAIL FROM:<a@example.org>"))
            steps.append(w.cmd("RCPT TO:<alice@virtual.test>"))
        w.cmd("QUIT")
        return steps
    finally:
        w.close()


def smtpd_lines(inst) -> list[str]:
    keep = []
    for line in inst.log_text().splitlines():
        m = re.search(r"(?:postfix|postwell)/smtpd\[\d+\]: (.*)", line)
        if m and ("SASL" in m.group(1) or "client=" in m.group(1)):
            text = re.sub(r"^[0-9A-F]+: ", "ID: ", m.group(1))
            # libsasl2's own syslog chatter has no postwell counterpart.
            if "SASL authentication failure" in text or "SASL authentication problem" in text:
                continue
            keep.append(text)
    return keep


def pair(reference_factory, postwell_factory, name, local_domain, mech_list=" ".join(MECHS),
         **params):
    import harness
    if harness.reference_available():
        pytest.skip(harness.reference_available())
    ref = reference_factory({}, name=f"{name}ref")
    pw = postwell_factory({}, name=f"{name}pw")
    # Debian's Postfix reads $config_directory/sasl/smtpd.conf; postwell's
    # smtpd.conf points at the very same sasldb file.
    d = make_sasldb(ref.config_dir / "sasl", USERS, mech_list)
    d2 = pw.config_dir / "sasl"
    d2.mkdir(parents=True, exist_ok=True)
    (d2 / "smtpd.conf").write_text((d / "smtpd.conf").read_text())
    os.chmod(d2 / "smtpd.conf", 0o644)
    for inst, sasl_dir in ((ref, d), (pw, d2)):
        cfg = {"smtpd_sasl_auth_enable": "yes", "cyrus_sasl_config_path": str(sasl_dir),
               "smtpd_sasl_local_domain": local_domain, "smtpd_error_sleep_time": "0",
               "smtpd_relay_restrictions": "permit_sasl_authenticated, reject",
               "mynetworks": "192.0.2.0/24", **params}
        inst.main_cf_extra = inst.main_cf = cfg
        inst.write_config()
        inst.start()
    return ref, pw


def compare(ref, pw, cases) -> list:
    """Run every case on both; return the cases that authenticated."""
    ok = []
    for case in cases:
        want = session(ref.port, *case)
        got = session(pw.port, *case)
        assert got == want, case
        if (235, "2.7.0 Authentication successful") in want:
            ok.append(case)
    for inst in (ref, pw):
        inst.wait_log(r"disconnect from .*", timeout=10)
    # Both logs hold every line once the last session is logged.
    import harness
    harness.wait_for(lambda: len(smtpd_lines(pw)) >= len(smtpd_lines(ref)) > 0, 10,
                     what="log lines")
    assert smtpd_lines(pw) == smtpd_lines(ref)
    return ok


@pytest.mark.postfix
@pytest.mark.parametrize("local_domain", [HOST, "", "example.com"])
def test_realm_rules_match_postfix(reference_factory, postwell_factory, local_domain):
    ref, pw = pair(reference_factory, postwell_factory, "realm", local_domain)
    cases = []
    for mech in MECHS:
        cases += [
            (mech, "alice", "s3cret"),                    # bare: local domain or myhostname
            (mech, f"alice@{HOST}", "s3cret"),
            (mech, "alice@example.com", "s3cret"),        # wrong realm: 535
            (mech, "bob", "hunter2"),                     # bob lives in another realm
            (mech, "bob@example.com", "hunter2"),
            (mech, "alice", "wrong"),
            (mech, f"jörg@{HOST}", "pässwörd"),
        ]
    # DIGEST-MD5 carries the realm in its own directive.
    cases += [("DIGEST-MD5", "alice", "s3cret", None),
              ("DIGEST-MD5", f"alice@{HOST}", "s3cret", None),
              ("DIGEST-MD5", "bob", "hunter2", "example.com"),
              ("DIGEST-MD5", "alice", "s3cret", "example.com"),
              ("DIGEST-MD5", "bob@example.com", "hunter2", None),
              ("DIGEST-MD5", "bob@example.com", "hunter2", "example.com"),
              ("DIGEST-MD5", f"alice@{HOST}", "s3cret", "example.com")]
    ok = compare(ref, pw, cases)
    # The issue 6 rules, as libsasl2 applies them.
    for mech in MECHS:
        assert (mech, f"alice@{HOST}", "s3cret") in ok
        assert (mech, f"jörg@{HOST}", "pässwörd") in ok
        assert (mech, "bob@example.com", "hunter2") in ok
        assert (mech, "alice@example.com", "s3cret") not in ok
        assert ((mech, "alice", "s3cret") in ok) == (local_domain in (HOST, ""))
        assert ((mech, "bob", "hunter2") in ok) == (local_domain == "example.com")


@pytest.mark.postfix
@pytest.mark.parametrize("options", ["noanonymous, noplaintext", "mutual_auth", "noactive"])
def test_ehlo_offers_same_mechanisms(reference_factory, postwell_factory, options):
    from test_smtpd_tls import Wire
    ref, pw = pair(reference_factory, postwell_factory, "ehlo", HOST,
                   mech_list="PLAIN DIGEST-MD5 LOGIN CRAM-MD5 SCRAM-SHA-1",
                   smtpd_sasl_security_options=options)
    lines = []
    for inst in (ref, pw):
        w = Wire(inst.port)
        try:
            w.reply()
            lines.append([x for x in w.cmd("EHLO c.example")[1].split("\n")
                          if x.startswith("AUTH")])
        finally:
            w.close()
    assert lines[0] == lines[1], lines
    # libsasl2 marks DIGEST-MD5 noplaintext, noanonymous and mutual_auth, not noactive.
    assert ("DIGEST-MD5" in " ".join(lines[0])) == (options != "noactive"), lines
