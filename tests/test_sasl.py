"""SASL mechanisms, replies, security options, and the postwell/cyrus back ends."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import os
import shutil
import subprocess

import pytest

from postwell.config import load_config
from postwell.sasl import (Challenge, Failure, Success, check_sasl_config, failure_log_text,
                           server_for_config, step_bytes, step_reply)
from postwell.sasl.base import apply_mechanism_filter, parse_security_options, SaslConfigError
from postwell.sasl.local import LocalSaslServer
from postwell.sasl.mechanisms import (BackendUnavailable, PasswordBackend,
                                      canonical_identity)

HOST = "mx.example.test"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


class DictBackend(PasswordBackend):
    """In-memory clear-text store keyed by user@realm."""
    supports_secret = True

    def __init__(self, users: dict[str, str], broken: bool = False) -> None:
        self.users = users
        self.broken = broken
        self.seen: list[tuple[str, str]] = []

    async def secret(self, ident):
        if self.broken:
            raise BackendUnavailable("down")
        self.seen.append((ident.user, ident.realm))
        return self.users.get(f"{ident.user}@{ident.realm}")

    async def verify(self, ident, password):
        return await self.secret(ident) == password


def local_server(users=None, *, mechs=("PLAIN", "LOGIN", "CRAM-MD5", "SCRAM-SHA-256", "SCRAM-SHA-1"),
                 opts="noanonymous", tls_opts=None, local_domain=HOST, **kw):
    backend = kw.pop("backend", None) or DictBackend(users or {f"alice@{HOST}": "secret"})
    return LocalSaslServer(backend, list(mechs), security_options=parse_security_options(opts),
                           tls_security_options=parse_security_options(tls_opts or opts),
                           hostname=HOST, local_domain=local_domain, **kw)


async def dialogue(server, mech, initial, *responses, tls=False):
    ex = server.start(mech, initial, client_addr="127.0.0.1", tls_active=tls)
    step = await ex.begin()
    steps = [step]
    for r in responses:
        if not isinstance(step, Challenge):
            break
        step = await ex.step(r)
        steps.append(step)
    return steps


# --- replies ------------------------------------------------------------------------------

def test_step_replies_match_postfix():
    assert str(step_reply(Success("alice"))) == "235 2.7.0 Authentication successful"
    assert str(step_reply(Failure("authentication failure"))) == \
        "535 5.7.8 Error: authentication failed: authentication failure"
    assert str(step_reply(Failure(""))) == \
        "535 5.7.8 Error: authentication failed: (reason unavailable)"
    assert str(step_reply(Failure("generic failure", temporary=True))) == \
        "454 4.7.0 Temporary authentication failure: generic failure"
    r = step_reply(Challenge(b"Username:"))
    assert (r.code, r.text, r.enhanced) == (334, "VXNlcm5hbWU6", None)
    # Postfix sends "334 " with its space for an empty challenge.
    assert step_bytes(Challenge(b"")) == b"334 \r\n"
    assert step_bytes(Challenge(b"Password:")) == b"334 UGFzc3dvcmQ6\r\n"
    assert step_bytes(Success("a")) == b"235 2.7.0 Authentication successful\r\n"


def test_failure_log_text():
    f = Failure("authentication failure", username="alice@mx.example.test")
    assert failure_log_text("unknown[127.0.0.1]", "LOGIN", f) == (
        "unknown[127.0.0.1]: SASL LOGIN authentication failed: authentication failure, "
        "sasl_username=alice@mx.example.test")
    assert failure_log_text("h[1.2.3.4]", "PLAIN", Failure("x")).endswith("sasl_username=(unavailable)")


# --- PLAIN / LOGIN ------------------------------------------------------------------------

def test_plain_success_reports_user_at_local_domain():
    steps = run(dialogue(local_server(), "PLAIN", b64(b"\0alice\0secret")))
    assert steps == [Success(f"alice@{HOST}")]
    steps = run(dialogue(local_server(), "PLAIN", b64(f"\0alice@{HOST}\0secret".encode())))
    assert steps == [Success(f"alice@{HOST}")]


def test_plain_without_local_domain_uses_hostname_realm_and_bare_name():
    backend = DictBackend({f"alice@{HOST}": "secret"})
    server = local_server(backend=backend, local_domain="")
    assert run(dialogue(server, "PLAIN", b64(b"\0alice\0secret"))) == [Success("alice")]
    assert backend.seen[-1] == ("alice", HOST)


def test_plain_failures_use_cyrus_texts():
    s = local_server()
    assert run(dialogue(s, "PLAIN", b64(b"\0alice\0wrong")))[0].reason == "authentication failure"
    assert run(dialogue(s, "PLAIN", b64(b"\0nobody\0x")))[0].reason == "authentication failure"
    assert run(dialogue(s, "PLAIN", "!!!!"))[0].reason == "bad protocol / cancel"
    assert run(dialogue(s, "PLAIN", b64(b"alicesecret")))[0].reason == "bad protocol / cancel"
    # Cyrus's decoder calls a length that is no multiple of 4 "incomplete".
    assert run(dialogue(s, "PLAIN", "="))[0].reason == "another step is needed in authentication"
    f = run(dialogue(s, "PLAIN", b64(b"\0alice\0wrong")))[0]
    assert f.username == f"alice@{HOST}" and not f.temporary


def test_empty_names_are_temporary_failures_as_in_cyrus():
    s = local_server()
    f = run(dialogue(s, "PLAIN", b64(b"\0\0secret")))[0]
    assert str(step_reply(f)) == "454 4.7.0 Temporary authentication failure: generic failure"
    steps = run(dialogue(s, "LOGIN", None, "", ""))
    assert steps[1] == Challenge(b"Password:")
    assert str(step_reply(steps[2])) == "454 4.7.0 Temporary authentication failure: generic failure"
    assert run(dialogue(s, "PLAIN", None, ""))[-1].reason == "bad protocol / cancel"
    assert run(dialogue(s, "PLAIN", b64(b"\0alice\0secret\0x")))[0].reason == "bad protocol / cancel"
    assert run(dialogue(s, "CRAM-MD5", b64(b"alice 0123")))[0].reason == "bad protocol / cancel"
    assert run(dialogue(s, "plain", b64(b"alice@mx.example.test\0alice\0secret"))) == \
        [Success(f"alice@{HOST}")]


def test_plain_authzid_must_match():
    s = local_server()
    f = run(dialogue(s, "PLAIN", b64(b"bob\0alice\0secret")))[0]
    assert (f.reason, f.username) == ("authentication failure", f"bob@{HOST}")
    assert run(dialogue(s, "PLAIN", b64(b"alice\0alice\0secret"))) == [Success(f"alice@{HOST}")]


def test_plain_without_initial_response_gets_empty_challenge():
    steps = run(dialogue(local_server(), "PLAIN", None, b64(b"\0alice\0secret")))
    assert steps == [Challenge(b""), Success(f"alice@{HOST}")]
    assert str(step_reply(steps[0])).startswith("334")


def test_login_prompts_and_initial_username():
    s = local_server()
    steps = run(dialogue(s, "LOGIN", None, b64(b"alice"), b64(b"secret")))
    assert steps == [Challenge(b"Username:"), Challenge(b"Password:"), Success(f"alice@{HOST}")]
    steps = run(dialogue(s, "LOGIN", b64(b"alice"), b64(b"secret")))
    assert steps == [Challenge(b"Password:"), Success(f"alice@{HOST}")]
    steps = run(dialogue(s, "LOGIN", None, b64(b"alice"), b64(b"nope")))
    assert steps[-1].reason == "authentication failure"


def test_username_made_printable():
    s = local_server(backend=DictBackend({"a\tb@x.test": "pw"}))
    assert run(dialogue(s, "PLAIN", b64(b"\0a\tb@x.test\0pw"))) == [Success("a?b@x.test")]


def test_decoded_bytes_are_accepted_too():
    s = local_server()
    assert run(dialogue(s, "PLAIN", b"\0alice\0secret")) == [Success(f"alice@{HOST}")]


def test_unknown_mechanism():
    f = run(dialogue(local_server(), "FOO", None))[0]
    assert f.reason == "no mechanism available"


def test_backend_down_is_temporary():
    s = local_server(backend=DictBackend({}, broken=True))
    f = run(dialogue(s, "PLAIN", b64(b"\0alice\0secret")))[0]
    assert f.temporary and f.reason == "generic failure"
    assert str(step_reply(f)) == "454 4.7.0 Temporary authentication failure: generic failure"


def test_response_limit():
    s = local_server(response_limit=100)
    f = run(dialogue(s, "PLAIN", "A" * 104))[0]
    assert str(step_reply(f)) == "500 5.5.6 SASL response limit exceeded"


# --- CRAM-MD5 / SCRAM ---------------------------------------------------------------------

def test_cram_md5():
    s = local_server()
    ex = s.start("CRAM-MD5", None)
    ch = run(ex.begin())
    assert isinstance(ch, Challenge) and ch.data.startswith(b"<") and ch.data.endswith(f"@{HOST}>".encode())
    digest = hmac.new(b"secret", ch.data, hashlib.md5).hexdigest()
    assert run(ex.step(b64(b"alice " + digest.encode()))) == Success(f"alice@{HOST}")
    ex = s.start("CRAM-MD5", None)
    run(ex.begin())
    assert run(ex.step(b64(b"alice " + b"0" * 32))).reason == "authentication failure"


def scram_client(server, mech, user, password, *, tamper=False):
    name = mech[len("SCRAM-"):].replace("-", "").lower()
    cnonce = "rOprNGfwEbeRWgbNEkqO"
    bare = f"n={user},r={cnonce}"

    async def go():
        ex = server.start(mech, b64(("n,," + bare).encode()))
        sf = await ex.begin()
        if not isinstance(sf, Challenge):
            return [sf]
        fields = dict(f.split("=", 1) for f in sf.data.decode().split(","))
        assert fields["r"].startswith(cnonce)
        salted = hashlib.pbkdf2_hmac(name, password.encode(), base64.b64decode(fields["s"]),
                                     int(fields["i"]))
        ck = hmac.new(salted, b"Client Key", name).digest()
        sk = hashlib.new(name, ck).digest()
        final_wo = f"c={b64(b'n,,')},r={fields['r']}"
        am = f"{bare},{sf.data.decode()},{final_wo}".encode()
        sig = hmac.new(sk, am, name).digest()
        proof = bytes(a ^ b for a, b in zip(ck, sig))
        if tamper:
            proof = bytes([proof[0] ^ 1]) + proof[1:]
        v = await ex.step(b64(f"{final_wo},p={b64(proof)}".encode()))
        if not isinstance(v, Challenge):
            return [sf, v]
        server_key = hmac.new(salted, b"Server Key", name).digest()
        assert v.data.decode() == "v=" + b64(hmac.new(server_key, am, name).digest())
        return [sf, v, await ex.step("")]
    return run(go())


@pytest.mark.parametrize("mech", ["SCRAM-SHA-256", "SCRAM-SHA-1", "SCRAM-SHA-512",
                                  "SCRAM-SHA-384", "SCRAM-SHA-224"])
def test_scram(mech):
    s = local_server(mechs=[mech])
    assert scram_client(s, mech, "alice", "secret")[-1] == Success(f"alice@{HOST}")
    assert scram_client(s, mech, "alice", "wrong")[-1].reason == "authentication failure"
    assert scram_client(s, mech, "alice", "secret", tamper=True)[-1].reason == "authentication failure"
    # As libsasl2: an unknown user fails at the client-first message.
    assert scram_client(s, mech, "nobody", "x") == [Failure("authentication failure",
                                                            username=f"nobody@{HOST}")]


def test_scram_rejects_channel_binding_request():
    s = local_server()
    f = run(dialogue(s, "SCRAM-SHA-256", b64(b"p=tls-unique,,n=alice,r=abc")))[0]
    assert f.reason == "bad protocol / cancel"


# --- security options / filter ------------------------------------------------------------

def test_security_options_filter_mechanisms():
    assert local_server().mechanisms() == ["PLAIN", "LOGIN", "CRAM-MD5", "SCRAM-SHA-256",
                                           "SCRAM-SHA-1"]
    s = local_server(opts="noanonymous, noplaintext", tls_opts="noanonymous")
    assert s.mechanisms(False) == ["CRAM-MD5", "SCRAM-SHA-256", "SCRAM-SHA-1"]
    assert "PLAIN" in s.mechanisms(True)
    assert local_server(opts="noactive").mechanisms() == ["SCRAM-SHA-256", "SCRAM-SHA-1"]
    assert local_server(opts="nodictionary").mechanisms() == []
    assert local_server(opts="mutual_auth").mechanisms() == ["SCRAM-SHA-256", "SCRAM-SHA-1"]
    # A mechanism not offered cannot be used either.
    # libsasl2's answer for a known mechanism the options forbid (checked
    # against Postfix 3.7 with Cyrus and smtpd_sasl_security_options=noplaintext).
    s = local_server(opts="noplaintext")
    assert run(dialogue(s, "PLAIN", b64(b"\0alice\0secret")))[0].reason == \
        "encryption needed to use mechanism"
    assert run(dialogue(s, "LOGIN", None))[0].reason == "encryption needed to use mechanism"
    with pytest.raises(SaslConfigError):
        parse_security_options("noanonymous, bogus")


def test_mechanism_filter():
    names = ["PLAIN", "LOGIN", "CRAM-MD5", "EXTERNAL"]
    assert apply_mechanism_filter(names, "!external, static:rest") == ["PLAIN", "LOGIN", "CRAM-MD5"]
    assert apply_mechanism_filter(names, "plain, login") == ["PLAIN", "LOGIN"]
    assert apply_mechanism_filter(names, "") == names


def test_hashed_store_offers_plain_and_login_only():
    backend = DictBackend({})
    backend.supports_secret = False
    assert local_server(backend=backend).mechanisms() == ["PLAIN", "LOGIN"]


def test_canonical_identity():
    i = canonical_identity("a@b.test", "x.test", HOST)
    assert (i.user, i.realm, i.reported) == ("a", "b.test", "a@b.test")
    assert canonical_identity("a", "x.test", HOST).reported == "a@x.test"
    i = canonical_identity("a", "", HOST)
    assert (i.user, i.realm, i.reported) == ("a", HOST, "a")


# --- configuration: postwell built-in ------------------------------------------------------

def write_main_cf(tmp_path, **params):
    import getpass
    etc = tmp_path / "etc"
    etc.mkdir(exist_ok=True)
    lines = [f"myhostname = {HOST}", f"queue_directory = {tmp_path / 'q'}",
             f"mail_owner = {params.pop('mail_owner', getpass.getuser())}"]
    lines += [f"{k} = {v}" for k, v in params.items()]
    (etc / "main.cf").write_text("\n".join(lines) + "\n")
    return load_config(str(etc))


def test_auth_disabled_gives_no_server(tmp_path):
    cfg = write_main_cf(tmp_path)
    assert server_for_config(cfg) is None
    assert check_sasl_config(cfg) == []


def test_postwell_passwd_file(tmp_path):
    from postwell.cli.saslpasswd import main as saslpasswd
    pwfile = tmp_path / "etc" / "sasl_passwd"
    cfg = write_main_cf(tmp_path, smtpd_sasl_auth_enable="yes", smtpd_sasl_type="postwell",
                        smtpd_sasl_local_domain=HOST)
    assert any("No such file" in p for p in check_sasl_config(cfg))
    import io
    import sys
    old = sys.stdin
    try:
        sys.stdin = io.StringIO("secret\n")
        assert saslpasswd(["-f", str(pwfile), "-p", "-u", HOST, "-s", "SHA512-CRYPT", "alice"]) == 0
        sys.stdin = io.StringIO("pw2\n")
        assert saslpasswd(["-f", str(pwfile), "-p", "-s", "SHA256-CRYPT", "bob@other.test"]) == 0
    finally:
        sys.stdin = old
    assert oct(pwfile.stat().st_mode & 0o777) == "0o640"
    assert check_sasl_config(cfg) == []
    if os.geteuid() == 0:
        # The smtpd reads the file as mail_owner, after dropping root.
        cfg_nobody = write_main_cf(tmp_path, smtpd_sasl_auth_enable="yes",
                                   smtpd_sasl_type="postwell", mail_owner="nobody")
        assert check_sasl_config(cfg_nobody) == [
            f"{pwfile}: mail_owner nobody cannot read it (smtpd runs as nobody; "
            "add nobody to group of the file or change its mode)"]
        cfg = write_main_cf(tmp_path, smtpd_sasl_auth_enable="yes", smtpd_sasl_type="postwell",
                            smtpd_sasl_local_domain=HOST)
    server = server_for_config(cfg)
    assert server.mechanisms() == ["PLAIN", "LOGIN"]
    assert run(dialogue(server, "PLAIN", b64(b"\0alice\0secret"))) == [Success(f"alice@{HOST}")]
    assert run(dialogue(server, "LOGIN", b64(b"bob@other.test"), b64(b"pw2")))[-1] == \
        Success("bob@other.test")
    f = run(dialogue(server, "PLAIN", b64(b"\0alice\0bad")))[0]
    assert f.reason == "authentication failure" and f.delay > 0
    # Deleting takes effect without a restart.
    assert saslpasswd(["-f", str(pwfile), "-d", "alice@" + HOST]) == 0
    assert run(dialogue(server, "PLAIN", b64(b"\0alice\0secret")))[0].reason == "authentication failure"
    pwfile.write_text(pwfile.read_text() + "carol:{NOPE}zzz\nbroken line\n")
    problems = check_sasl_config(cfg)
    assert any("unknown password scheme NOPE" in p for p in problems)
    assert any("line 3" in p for p in problems)


def test_postwell_plain_entries_allow_cram(tmp_path):
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "users").write_text(f"alice@{HOST}:{{PLAIN}}secret\n")
    cfg = write_main_cf(tmp_path, smtpd_sasl_auth_enable="yes", smtpd_sasl_type="postwell",
                        smtpd_sasl_path="users", smtpd_sasl_local_domain=HOST)
    server = server_for_config(cfg)
    assert "CRAM-MD5" in server.mechanisms()
    assert scram_client(server, "SCRAM-SHA-256", "alice", "secret")[-1] == Success(f"alice@{HOST}")


def test_unknown_sasl_type(tmp_path):
    cfg = write_main_cf(tmp_path, smtpd_sasl_auth_enable="yes", smtpd_sasl_type="bogus")
    assert check_sasl_config(cfg) == ["unsupported SASL server implementation: bogus"]
    with pytest.raises(SaslConfigError):
        server_for_config(cfg)


# --- configuration: cyrus with a real sasldb2 ----------------------------------------------

needs_saslpasswd2 = pytest.mark.skipif(shutil.which("saslpasswd2") is None,
                                       reason="sasl2-bin (saslpasswd2) not installed")


def saslpasswd2(db, user, realm, password):
    subprocess.run(["saslpasswd2", "-f", str(db), "-u", realm, "-c", "-p", user],
                   input=password.encode(), check=True, timeout=20)


def cyrus_config(tmp_path, conf_text, **params):
    sasldir = tmp_path / "sasl"
    sasldir.mkdir(exist_ok=True)
    if conf_text is not None:
        (sasldir / "smtpd.conf").write_text(conf_text)
    return write_main_cf(tmp_path, smtpd_sasl_auth_enable="yes",
                         cyrus_sasl_config_path=str(sasldir), **params)


@needs_saslpasswd2
def test_cyrus_sasldb_made_by_saslpasswd2(tmp_path):
    db = tmp_path / "sasldb2"
    saslpasswd2(db, "alice", HOST, "secret")
    saslpasswd2(db, "bob", "other.test", "pw2")
    cfg = cyrus_config(tmp_path, f"pwcheck_method: auxprop\nauxprop_plugin: sasldb\n"
                                 f"sasldb_path: {db}\nmech_list: plain login cram-md5 "
                                 "scram-sha-256 digest-md5\n",
                       smtpd_sasl_local_domain=HOST)
    assert check_sasl_config(cfg) == []
    server = server_for_config(cfg)
    assert server.mechanisms() == ["PLAIN", "LOGIN", "CRAM-MD5", "SCRAM-SHA-256", "DIGEST-MD5"]
    assert run(dialogue(server, "PLAIN", b64(b"\0alice\0secret"))) == [Success(f"alice@{HOST}")]
    assert run(dialogue(server, "PLAIN", b64(b"\0bob@other.test\0pw2"))) == [Success("bob@other.test")]
    assert run(dialogue(server, "PLAIN", b64(b"\0bob\0pw2")))[0].reason == "authentication failure"
    assert scram_client(server, "SCRAM-SHA-256", "alice", "secret")[-1] == Success(f"alice@{HOST}")
    ex = server.start("CRAM-MD5", None)
    ch = run(ex.begin())
    digest = hmac.new(b"pw2", ch.data, hashlib.md5).hexdigest()
    assert run(ex.step(b64(f"bob@other.test {digest}".encode()))) == Success("bob@other.test")
    # A user added later is seen without a restart, as with libsasl2.
    saslpasswd2(db, "carol", HOST, "pw3")
    assert run(dialogue(server, "PLAIN", b64(b"\0carol\0pw3"))) == [Success(f"carol@{HOST}")]


def test_cyrus_default_mech_list_order(tmp_path):
    (tmp_path / "sasldb2").write_bytes(b"")
    cfg = cyrus_config(tmp_path, f"sasldb_path: {tmp_path}/sasldb2\n")
    assert server_for_config(cfg).mechanisms() == [
        "SCRAM-SHA-512", "SCRAM-SHA-384", "SCRAM-SHA-256", "SCRAM-SHA-224", "SCRAM-SHA-1",
        "DIGEST-MD5", "CRAM-MD5", "PLAIN", "LOGIN"]


def test_cyrus_config_errors(tmp_path):
    cfg = cyrus_config(tmp_path, f"pwcheck_method: auxprop\nsasldb_path: {tmp_path}/missing\n")
    problems = check_sasl_config(cfg)
    assert len(problems) == 1 and "missing does not exist" in problems[0]
    cfg = cyrus_config(tmp_path, "pwcheck_method: ldap\n")
    assert "unsupported pwcheck_method \"ldap\"" in check_sasl_config(cfg)[0]
    cfg = cyrus_config(tmp_path, "auxprop_plugin: sql\n")
    assert "unsupported auxprop_plugin" in check_sasl_config(cfg)[0]
    cfg = cyrus_config(tmp_path, "this is not a conf line\n")
    assert "line 1" in check_sasl_config(cfg)[0]
    bad = tmp_path / "notadb"
    bad.write_text("garbage" * 100)
    cfg = cyrus_config(tmp_path, f"sasldb_path: {bad}\n")
    assert "cannot read Cyrus SASL sasldb file" in check_sasl_config(cfg)[0]


@needs_saslpasswd2
def test_cyrus_unreadable_sasldb(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root reads everything")
    db = tmp_path / "sasldb2"
    saslpasswd2(db, "alice", HOST, "secret")
    db.chmod(0)
    cfg = cyrus_config(tmp_path, f"sasldb_path: {db}\n")
    assert check_sasl_config(cfg)


# --- with the sans-IO SMTP engine, as the smtpd glue will drive it -------------------------

def test_engine_auth_dialogue():
    from postwell.smtp.reply import Reply
    from postwell.smtp.server import (NEED_DATA, Auth, AuthResponse, Ehlo, ServerConfig,
                                      ServerConnection)
    server = local_server()

    async def session(lines):
        conn = ServerConnection(ServerConfig(hostname=HOST,
                                             auth_mechanisms=tuple(server.mechanisms())),
                                client="unknown[127.0.0.1]")
        conn.send_greeting(Reply(220, f"{HOST} ESMTP postwell"))
        out = b""
        exchange = None
        for line in lines:
            conn.receive_data(line + b"\r\n")
            while True:
                ev = conn.next_event()
                if ev is NEED_DATA:
                    break
                if isinstance(ev, Ehlo):
                    conn.send_reply(None)
                elif isinstance(ev, Auth):
                    exchange = server.start(ev.mechanism, ev.initial_response,
                                            client_addr="127.0.0.1")
                    step = await exchange.begin()
                    conn.send_reply(step_reply(step))
                elif isinstance(ev, AuthResponse):
                    step = await exchange.step(ev.data)
                    conn.send_reply(step_reply(step))
            out += conn.data_to_send()
        return out.decode()

    text = run(session([b"EHLO c", b"AUTH LOGIN", b64(b"alice").encode(),
                        b64(b"secret").encode()]))
    assert "250-AUTH PLAIN LOGIN CRAM-MD5 SCRAM-SHA-256 SCRAM-SHA-1\r\n" in text
    assert text.endswith("334 VXNlcm5hbWU6\r\n334 UGFzc3dvcmQ6\r\n"
                         "235 2.7.0 Authentication successful\r\n")
    text = run(session([b"EHLO c", b"AUTH PLAIN", b"*"]))
    assert text.endswith("501 5.7.0 Authentication aborted\r\n")
    text = run(session([b"EHLO c", b"AUTH PLAIN " + b64(b"\0alice\0bad").encode()]))
    assert text.endswith("535 5.7.8 Error: authentication failed: authentication failure\r\n")


def test_smtpd_auth_session_logs_and_delays():
    from postwell.log import NullLog
    from postwell.sasl.session import SmtpdAuth
    slept = []

    async def fake_sleep(t):
        slept.append(t)

    backend = DictBackend({f"alice@{HOST}": "secret"})
    backend.failure_delay = 1.0
    log = NullLog()
    auth = SmtpdAuth(local_server(backend=backend), log, namaddr="unknown[127.0.0.1]",
                     client_addr="127.0.0.1", sleep=fake_sleep)

    async def go():
        r1 = await auth.start("plain", b64(b"\0alice\0bad"))
        r2 = await auth.start("LOGIN", None)
        auth.aborted()
        r3 = await auth.start("LOGIN", None)
        r4 = await auth.respond(b64(b"alice"))
        r5 = await auth.respond(b64(b"secret"))
        return r1, r2, r3, r4, r5

    r1, r2, r3, r4, r5 = run(go())
    assert str(r1) == "535 5.7.8 Error: authentication failed: authentication failure"
    assert slept == [1.0] and auth.failures == 1
    assert (r2.code, r3.code, r4.code) == (334, 334, 334)
    assert str(r5) == "235 2.7.0 Authentication successful"
    assert (auth.username, auth.method) == (f"alice@{HOST}", "LOGIN")
    text = "\n".join(log.lines)
    # The mechanism as the client typed it, as Postfix 3.7 logs it.
    assert ("unknown[127.0.0.1]: SASL plain authentication failed: authentication failure, "
            f"sasl_username=alice@{HOST}") in text
    assert "unknown[127.0.0.1]: SASL LOGIN authentication aborted" in text
