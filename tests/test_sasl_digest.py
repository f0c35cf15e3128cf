"""DIGEST-MD5 (RFC 2831) in postwell's Cyrus-compatible SASL server.

The client below is written from RFC 2831; it is proven against the real
Cyrus library through a reference Postfix on the same sasldb (tests marked
``postfix``), so a pass on both sides proves the server too.  swaks (Perl
Authen::SASL) is a second, independent client.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import re
import shutil
import subprocess

import pytest

from postwell.sasl.base import Challenge, Failure, Success, parse_security_options
from postwell.sasl.local import LocalSaslServer
from postwell.sasl.mechanisms import (BADAUTH, BADPROT, GENERIC, BackendUnavailable,
                                      DigestMd5Exchange,
                                      PasswordBackend, _digest_fields)

pytestmark = pytest.mark.timeout(90)

HOST = "mx.example.test"


# ------------------------------------------------------------------ an RFC 2831 client

def parse_challenge(data: bytes) -> dict[str, str]:
    fields = _digest_fields(data.decode("utf-8"))
    assert fields is not None, data
    return fields


def _h(b: bytes) -> bytes:
    return hashlib.md5(b).digest()


def _hex(b: bytes) -> str:
    return hashlib.md5(b).hexdigest()


def digest_response(challenge: bytes, user: str, password: str, *, realm: str | None = "",
                    uri: str = f"smtp/{HOST}", cnonce: str = "OA6MHXh6VqTrRk",
                    authzid: str | None = None, nc: str = "00000001", qop: str = "auth",
                    nonce: str | None = None, charset: bool = True,
                    extra: str = "") -> tuple[bytes, str]:
    """(digest-response, the rspauth a genuine server must send).  ``realm``:
    "" = the challenge's realm, None = no realm directive (RFC 2831 2.1.2)."""
    ch = parse_challenge(challenge)
    if realm == "":
        realm = ch.get("realm", "")
    nonce = ch["nonce"] if nonce is None else nonce

    def enc(s: str) -> bytes:
        # RFC 2831 2.1.2.1: Latin-1 when every character fits, else UTF-8.
        try:
            return s.encode("iso-8859-1")
        except UnicodeEncodeError:
            return s.encode("utf-8")
    a1 = (_h(enc(user) + b":" + enc(realm or "") + b":" + enc(password))
          + f":{nonce}:{cnonce}".encode())
    if authzid:
        a1 += b":" + authzid.encode()
    ha1 = _hex(a1)

    def kd(a2: str) -> str:
        return _hex(f"{ha1}:{nonce}:{nc}:{cnonce}:{qop}:{_hex(a2.encode())}".encode())
    parts = [f'username="{user}"']
    if realm is not None:
        parts.append(f'realm="{realm}"')
    parts += [f'nonce="{nonce}"', f'cnonce="{cnonce}"', f"nc={nc}", f"qop={qop}",
              f'digest-uri="{uri}"', f"response={kd('AUTHENTICATE:' + uri)}"]
    if charset:
        parts.append("charset=utf-8")
    if authzid:
        parts.append(f'authzid="{authzid}"')
    text = ",".join(parts) + extra
    return text.encode("utf-8"), "rspauth=" + kd(":" + uri)


def test_client_matches_rfc2831_example():
    # RFC 2831 4: the IMAP example (its response and rspauth values).
    ch = (b'realm="elwood.innosoft.com",nonce="OA6MG9tEQGm2hh",qop="auth",'
          b'algorithm=md5-sess,charset=utf-8')
    resp, rspauth = digest_response(ch, "chris", "secret", uri="imap/elwood.innosoft.com",
                                    cnonce="OA6MHXh6VqTrRk")
    assert b"response=d388dad90d4bbd760a152321f2143af7" in resp
    assert rspauth == "rspauth=ea40f60335c427b5527b84dbabcdfffd"


# ------------------------------------------------------------------ the exchange itself

class Store(PasswordBackend):
    supports_secret = True

    def __init__(self, users: dict[tuple[str, str], str], down: bool = False) -> None:
        self.users = users
        self.down = down
        self.asked: list[tuple[str, str]] = []

    async def secret(self, ident):
        if self.down:
            raise BackendUnavailable("down")
        self.asked.append((ident.user, ident.realm))
        return self.users.get((ident.user, ident.realm))

    async def verify(self, ident, password):
        return await self.secret(ident) == password


USERS = {("alice", HOST): "s3cret", ("bob", "example.com"): "hunter2",
         ("jörg", HOST): "pässwörd", ("юзер", HOST): "пароль"}


def run(coro):
    return asyncio.run(coro)


def exchange(store=None, local_domain="", nonce=None, initial=None, **kw):
    ex = DigestMd5Exchange(store or Store(USERS), initial, local_domain=local_domain,
                           hostname=HOST, response_limit=12288, nonce=nonce)
    for k, v in kw.items():
        setattr(ex, k, v)
    return ex


def login(ex, user, password, **kw):
    """Run the dialogue; return the final step and whether rspauth was right."""
    async def go():
        ch = await ex.begin()
        assert isinstance(ch, Challenge)
        resp, rspauth = digest_response(ch.data, user, password, **kw)
        step = await ex.step(base64.b64encode(resp).decode())
        if not isinstance(step, Challenge):
            return step, None
        ok = step.data.decode() == rspauth
        return await ex.step(""), ok
    return run(go())


def test_challenge_shape():
    ex = exchange()
    ch = run(ex.begin())
    text = ch.data.decode()
    # As libsasl2 words it (nonce first); only qop "auth" (no security layers).
    assert re.fullmatch(r'nonce="[A-Za-z0-9+/]{43}=",realm="mx\.example\.test",qop="auth",'
                        r'charset=utf-8,algorithm=md5-sess', text), text
    assert run(exchange().begin()).data != ch.data          # a fresh nonce every time
    ch2 = run(exchange(local_domain="example.com").begin())
    assert parse_challenge(ch2.data)["realm"] == "example.com"


def test_success_with_mutual_authentication():
    step, rsp_ok = login(exchange(), "alice", "s3cret")
    assert step == Success("alice")
    assert rsp_ok is True


def test_user_at_realm_without_realm_directive():
    step, ok = login(exchange(), "alice@" + HOST, "s3cret", realm=None)
    assert step == Success("alice@" + HOST) and ok


def test_local_domain_is_reported_in_username():
    store = Store(USERS)
    step, ok = login(exchange(store, local_domain=HOST), "alice", "s3cret")
    assert step == Success("alice@" + HOST) and ok
    assert store.asked == [("alice", HOST)]


def test_other_realm_named_by_client():
    step, ok = login(exchange(), "bob", "hunter2", realm="example.com")
    assert step == Success("bob@example.com") and ok


@pytest.mark.parametrize("user,password", [("jörg", "pässwörd"), ("юзер", "пароль")])
def test_non_ascii_latin1_and_utf8(user, password):
    step, ok = login(exchange(), user, password)
    assert isinstance(step, Success) and ok


@pytest.mark.parametrize("change", [
    dict(password="wrong"), dict(user="nobody"), dict(realm="other.example"),
    dict(uri="imap/" + HOST), dict(nc="00000002"), dict(nonce="bm90IG91ciBub25jZQ=="),
    dict(authzid="bob@example.com"),
])
def test_failures_are_authentication_failure(change):
    kw = dict(user="alice", password="s3cret")
    kw.update(change)
    step, _ = login(exchange(), kw.pop("user"), kw.pop("password"), **kw)
    assert isinstance(step, Failure) and step.reason == BADAUTH and not step.temporary


@pytest.mark.parametrize("change", [
    dict(qop="auth-int"), dict(qop="auth-conf"), dict(user=""), dict(extra=",realm=x"),
    dict(extra=',digest-uri="smtp/x"'),
])
def test_failures_that_libsasl2_calls_generic(change):
    # SASL_FAIL: Postfix answers 454 4.7.0 (checked against Postfix + Cyrus).
    kw = dict(user="alice", password="s3cret")
    kw.update(change)
    step, _ = login(exchange(), kw.pop("user"), kw.pop("password"), **kw)
    assert isinstance(step, Failure) and step.reason == GENERIC and step.temporary


def test_digest_uri_host_is_not_checked():
    # libsasl2 compares only the service part of digest-uri.
    step, ok = login(exchange(), "alice", "s3cret", uri="smtp/elsewhere.example")
    assert isinstance(step, Success) and ok


def test_authzid_same_as_user_is_fine():
    step, ok = login(exchange(), "alice", "s3cret", authzid="alice@" + HOST)
    assert isinstance(step, Success) and ok


def test_service_follows_configuration():
    step, _ = login(exchange(service="submission"), "alice", "s3cret")
    assert isinstance(step, Failure)
    step, ok = login(exchange(service="submission"), "alice", "s3cret",
                     uri="submission/" + HOST)
    assert isinstance(step, Success) and ok


@pytest.mark.parametrize("raw", [
    b"garbage", b"", b'username="alice', b"username", b"\xff\xfe",
    b'username="alice",nonce="x"', b"=" * 10, b"x" * 4096,
])
def test_malformed_responses(raw):
    ex = exchange()
    run(ex.begin())
    step = run(ex.step(base64.b64encode(raw).decode()))
    assert isinstance(step, Failure) and step.reason == BADAUTH


def test_over_long_response_is_a_protocol_error():
    # RFC 2831 2.1.2 bounds a digest-response to 4096 bytes.
    ex = exchange()
    run(ex.begin())
    step = run(ex.step(base64.b64encode(b"x" * 4097).decode()))
    assert isinstance(step, Failure) and step.reason == BADPROT


def test_not_base64_and_response_limit():
    ex = exchange()
    run(ex.begin())
    assert isinstance(run(ex.step("!!!!")), Failure)
    ex = exchange()
    run(ex.begin())
    step = run(ex.step("A" * 20000))
    assert isinstance(step, Failure) and step.code == 500


def test_data_after_rspauth_is_ignored():
    async def go():
        ex = exchange()
        ch = await ex.begin()
        resp, _ = digest_response(ch.data, "alice", "s3cret")
        assert isinstance(await ex.step(base64.b64encode(resp).decode()), Challenge)
        return await ex.step(base64.b64encode(b"more").decode())
    # libsasl2 takes any answer to rspauth as the acknowledgement.
    assert run(go()) == Success("alice")


def test_initial_response_gets_a_fresh_challenge():
    ex = exchange(initial=base64.b64encode(b'username="alice"').decode())
    assert isinstance(run(ex.begin()), Challenge)


def test_backend_down_is_temporary():
    step, _ = login(exchange(Store(USERS, down=True)), "alice", "s3cret")
    assert isinstance(step, Failure) and step.temporary


def test_parser_quoting():
    assert _digest_fields('a=b, C="x\\"y" ,d=""') == {"a": "b", "c": 'x"y', "d": ""}
    assert _digest_fields('a="x",a="y",b=1,b=2') == {"a": "y", "b": "2", "": "a b"}
    assert _digest_fields('a="unterminated') is None
    assert _digest_fields('a="x" junk') is None


# ------------------------------------------------------------------ offering it

def server(backend, mechs, opts="noanonymous", tls_opts=None):
    return LocalSaslServer(backend, mechs, security_options=parse_security_options(opts),
                           tls_security_options=parse_security_options(tls_opts or opts),
                           hostname=HOST)


def test_offered_only_with_a_plaintext_secret():
    from postwell.sasl.cyrus import SaslauthdBackend
    assert "DIGEST-MD5" in server(Store(USERS), ["DIGEST-MD5", "PLAIN"]).mechanisms()
    assert server(SaslauthdBackend("/nonexistent"), ["DIGEST-MD5", "PLAIN"]).mechanisms() \
        == ["PLAIN"]
    assert "DIGEST-MD5" not in server(Store(USERS), ["PLAIN"]).mechanisms()


@pytest.mark.parametrize("opts,offered", [
    ("noanonymous", True), ("noanonymous, noplaintext", True), ("mutual_auth", True),
    ("noactive", False), ("nodictionary", False), ("forward_secrecy", False),
])
def test_security_options(opts, offered):
    srv = server(Store(USERS), ["DIGEST-MD5"], opts)
    assert ("DIGEST-MD5" in srv.mechanisms()) is offered
    ex = srv.start("DIGEST-MD5")
    assert isinstance(run(ex.begin()), Challenge) is offered


def test_default_mech_list_has_digest_md5_in_cyrus_order():
    from postwell.sasl.cyrus import CyrusSettings
    assert CyrusSettings({}, None).mech_list == [
        "SCRAM-SHA-512", "SCRAM-SHA-384", "SCRAM-SHA-256", "SCRAM-SHA-224", "SCRAM-SHA-1",
        "DIGEST-MD5", "CRAM-MD5", "PLAIN", "LOGIN"]


# ------------------------------------------------------------------ end to end

def saslpasswd2():
    return shutil.which("saslpasswd2") or (
        "/usr/sbin/saslpasswd2" if os.path.exists("/usr/sbin/saslpasswd2") else None)


def make_sasldb(d, users=(("alice", HOST, "s3cret"),), mech_list="DIGEST-MD5 CRAM-MD5 PLAIN LOGIN"):
    """smtpd.conf + sasldb2 in directory ``d``, users made by Debian's saslpasswd2."""
    tool = saslpasswd2()
    if not tool:
        pytest.skip("saslpasswd2 (sasl2-bin) not installed")
    d.mkdir(parents=True, exist_ok=True)
    db = d / "sasldb2"
    for user, realm, password in users:
        subprocess.run([tool, "-c", "-p", "-f", str(db), "-u", realm, user],
                       input=password.encode(), check=True, capture_output=True, timeout=30)
    conf = f"pwcheck_method: auxprop\nauxprop_plugin: sasldb\nsasldb_path: {db}\n"
    if mech_list:
        conf += f"mech_list: {mech_list}\n"
    (d / "smtpd.conf").write_text(conf)
    os.chmod(d, 0o755)
    for f in d.iterdir():
        os.chmod(f, 0o644)
    return d


def wire_digest(w, user, password, **kw):
    """AUTH DIGEST-MD5 over a test_smtpd_tls.Wire; list of (code, text) with
    the random challenge replaced, and whether rspauth was right."""
    out = []
    code, text = w.cmd("AUTH DIGEST-MD5")
    out.append((code, "<challenge>" if code == 334 else text))
    if code != 334:
        return out, None
    resp, rspauth = digest_response(base64.b64decode(text), user, password, **kw)
    code, text = w.cmd(base64.b64encode(resp).decode())
    ok = None
    if code == 334:
        ok = base64.b64decode(text).decode() == rspauth
        out.append((code, "<rspauth>" if ok else text))
        code, text = w.cmd("")
    out.append((code, text))
    return out, ok


def test_smtpd_digest_md5_with_saslpasswd2_db(tmp_path):
    from test_smtpd import Running
    from test_smtpd_tls import Wire
    d = make_sasldb(tmp_path / "sasl")
    (tmp_path / "srv").mkdir()
    r = Running(tmp_path / "srv", {"smtpd_sasl_auth_enable": "yes",
                                   "cyrus_sasl_config_path": str(d)})
    try:
        w = Wire(r.port)
        try:
            w.reply()
            code, text = w.cmd("EHLO c.example")
            assert "\nAUTH DIGEST-MD5 CRAM-MD5 PLAIN LOGIN\n" in text + "\n", text
            steps, ok = wire_digest(w, "alice", "wrong")
            assert steps[-1] == (535, "5.7.8 Error: authentication failed: authentication failure")
            steps, ok = wire_digest(w, "alice", "s3cret")
            assert ok and steps[-1] == (235, "2.7.0 Authentication successful")
            w.cmd("MAIL FROM:<alice@mx.example.test>")
            assert w.cmd("RCPT TO:<b@mx.example.test>")[0] == 250
        finally:
            w.close()
        r.wait_log(r"client=unknown\[127\.0\.0\.1\], sasl_method=DIGEST-MD5, "
                   r"sasl_username=alice$")
        r.wait_log(r"warning: unknown\[127\.0\.0\.1\]: SASL DIGEST-MD5 authentication failed: "
                   r"authentication failure, sasl_username=alice")
    finally:
        r.stop()


def _perl_has_authen_sasl() -> bool:
    cp = subprocess.run(["perl", "-MAuthen::SASL", "-MDigest::HMAC_MD5", "-e", "1"],
                        capture_output=True, timeout=30)
    return cp.returncode == 0


def test_swaks_digest_md5(tmp_path):
    """An independent client: swaks through Perl's Authen::SASL (Debian
    package libauthen-sasl-perl)."""
    from test_smtpd import Running
    if not shutil.which("swaks") or not _perl_has_authen_sasl():
        pytest.skip("swaks with Authen::SASL (libauthen-sasl-perl) not installed")
    d = make_sasldb(tmp_path / "sasl")
    (tmp_path / "srv").mkdir()
    r = Running(tmp_path / "srv", {"smtpd_sasl_auth_enable": "yes",
                                   "cyrus_sasl_config_path": str(d)})
    try:
        def swaks(user, password):
            cp = subprocess.run(["swaks", "--server", f"127.0.0.1:{r.port}", "--from",
                                 "alice@mx.example.test", "--to", "b@mx.example.test",
                                 "--timeout", "20", "--auth", "DIGEST-MD5", "--auth-user", user,
                                 "--auth-password", password], capture_output=True, timeout=60)
            return cp.returncode, cp.stdout.decode("latin-1")
        rc, out = swaks("alice", "s3cret")
        assert rc == 0 and re.search(r"<[-~]  235 2\.7\.0 Authentication successful", out), \
            out[-2500:]
        r.wait_log(r"sasl_method=DIGEST-MD5, sasl_username=alice$")
        rc, out = swaks("alice", "nope")
        assert rc != 0 and "535 5.7.8 Error: authentication failed: authentication failure" \
            in out, out[-2500:]
    finally:
        r.stop()


# ------------------------------------------------------------------ beside Postfix + libsasl2

def digest_case(port, *, raw: bytes | None = None, initial: str | None = None,
                after: str = "", user: str = "alice", password: str = "s3cret", **kw):
    """One session with one DIGEST-MD5 dialogue, altered as asked; the
    random parts of the replies are replaced."""
    from test_smtpd_tls import Wire
    w = Wire(port)
    out = []
    try:
        w.reply()
        w.cmd("EHLO c.example")
        code, text = w.cmd("AUTH DIGEST-MD5" + (f" {initial}" if initial else ""))
        out.append((code, "<challenge>" if code == 334 else text))
        if code == 334:
            resp, rspauth = digest_response(base64.b64decode(text), user, password, **kw)
            code, text = w.cmd(base64.b64encode(raw if raw is not None else resp).decode())
            if code == 334:
                out.append((code, "<rspauth ok>" if base64.b64decode(text).decode() == rspauth
                            else text))
                code, text = w.cmd(after)
            out.append((code, text))
        out.append(w.cmd("QUIT"))
    finally:
        w.close()
    return out


# Alterations of one dialogue, each run against both servers.
DIGEST_CASES = [
    {}, {"password": "wrong"}, {"user": "nobody"}, {"uri": "imap/" + HOST},
    {"uri": "smtp/elsewhere.example"}, {"uri": "smtp"}, {"nc": "00000002"},
    {"qop": "auth-int"}, {"qop": "auth-conf"}, {"nonce": "bm90IG91ciBub25jZQ=="},
    {"authzid": "alice"}, {"authzid": "bob@example.com"}, {"charset": False},
    {"raw": b"garbage"}, {"raw": b""}, {"raw": b'username="alice",nonce="x"'},
    {"raw": b'username="alice'}, {"after": base64.b64encode(b"more").decode()},
    {"after": "*"}, {"initial": base64.b64encode(b'username="alice"').decode()},
    {"initial": "="}, {"cnonce": "x" * 100},
    {"extra": ",maxbuf=65536"}, {"extra": ",cipher=rc4"}, {"extra": ",unknown=1"},
    {"qop": "bogus"}, {"nc": "1"}, {"nc": "zz"}, {"nc": "00000000"},
    {"raw": b'username="alice",realm="mx.example.test"'}, {"user": ""},
    {"extra": ",algorithm=md5"}, {"extra": ",algorithm=md5-sess"},
    {"extra": ",charset=iso-8859-1"}, {"extra": ",x=" + "y" * 5000},
    {"extra": ',digest-uri="smtp/again"'}, {"extra": ",realm=other"},
    {"raw": b'username=alice,response=x,nonce=y,cnonce=z,nc=00000001,digest-uri="smtp/x"'},
    {"charset": False, "extra": ",charset=iso-8859-1"}, {"extra": ",username=bob"},
    {"extra": ",nonce=x"}, {"extra": ",cnonce=x"}, {"extra": ",nc=00000001"},
    {"extra": ",qop=auth"}, {"extra": ",response=x"}, {"extra": ",unknown=1,unknown=2"},
    {"extra": ",authzid=alice,authzid=alice"}, {"extra": ",maxbuf=1,maxbuf=2"},
    {"raw": b"a" * 4096}, {"raw": b"a" * 4097}, {"user": "ALICE"},
    {"uri": "SMTP/" + HOST}, {"qop": "AUTH"}, {"nc": "1"}, {"nc": "0001x"},
    {"raw": b'username="alice",nonce="x",cnonce="y",nc=1,digest-uri="smtp/x",response=1'},
    # RFC 2831 2.1.2.1: Latin-1 names are hashed in Latin-1, others in UTF-8.
    {"user": "jörg", "password": "pässwörd"}, {"user": "юзер", "password": "пароль"},
    {"user": "jörg", "password": "passwörd"},
]


@pytest.mark.postfix
def test_digest_md5_dialogues_match_postfix(reference_factory, postwell_factory):
    from test_sasl_realm import pair, smtpd_lines
    import harness
    ref, pw = pair(reference_factory, postwell_factory, "digest", "")
    cases = DIGEST_CASES
    bad, success = [], []
    for case in cases:
        want = digest_case(ref.port, **case)
        got = digest_case(pw.port, **case)
        if got != want:
            bad.append((case, got, want))
        if (235, "2.7.0 Authentication successful") in want:
            success.append(case)
    assert not bad, "\n".join(map(str, bad))
    # The dialogue really works (not merely fails the same way on both).
    for case in ({}, {"user": "jörg", "password": "pässwörd"},
                 {"user": "юзер", "password": "пароль"}, {"uri": "smtp/elsewhere.example"}):
        assert case in success, case
    assert {"password": "wrong"} not in success
    harness.wait_for(lambda: len(smtpd_lines(pw)) >= len(smtpd_lines(ref)) > 0, 10,
                     what="log lines")
    import difflib
    assert smtpd_lines(pw) == smtpd_lines(ref), "\n".join(
        difflib.unified_diff(smtpd_lines(ref), smtpd_lines(pw), lineterm=""))


# ------------------------------------------------------------------ libsasl2's own client

class SampleClient:
    """Debian's sasl-sample-client (sasl2-bin): the real libsasl2 client side.
    It speaks "S: <base64>" / "C: <base64>" lines and asks for the password
    on its terminal, so it runs on a pty; every read is bounded in time."""

    def __init__(self, user: str, password: str, host: str = HOST) -> None:
        import pty
        tool = shutil.which("sasl-sample-client")
        if not tool:
            pytest.skip("sasl-sample-client (sasl2-bin) not installed")
        self.password = password
        self.pid, self.fd = pty.fork()
        if self.pid == 0:            # pragma: no cover - child
            os.execv(tool, [tool, "-m", "DIGEST-MD5", "-s", "smtp", "-n", host,
                            "-a", user, "-u", user])
        self.seen = ""

    def _read_until(self, pattern: str, timeout: float = 10.0) -> re.Match:
        import select
        import time
        end = time.monotonic() + timeout
        while True:
            m = re.search(pattern, self.seen)
            if m:
                self.seen = self.seen[m.end():]
                return m
            left = end - time.monotonic()
            assert left > 0, f"sasl-sample-client: no {pattern!r} in {self.seen!r}"
            ready, _, _ = select.select([self.fd], [], [], min(left, 0.5))
            if ready:
                try:
                    chunk = os.read(self.fd, 4096)
                except OSError:
                    chunk = b""
                assert chunk, f"sasl-sample-client ended: {self.seen!r}"
                self.seen += chunk.decode("utf-8", "replace")

    def server_says(self, data: bytes) -> None:
        os.write(self.fd, b"S: " + base64.b64encode(data) + b"\n")

    def client_says(self) -> bytes:
        while True:
            m = self._read_until(r"(Password: )|C: ([A-Za-z0-9+/=]*)\r?\n")
            if m.group(1):
                os.write(self.fd, self.password.encode() + b"\n")
                continue
            return base64.b64decode(m.group(2))

    def close(self) -> None:
        import signal
        try:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        except OSError:
            pass
        os.close(self.fd)


def sample_client_login(port: int, user: str, password: str) -> tuple[list, str]:
    from test_smtpd_tls import Wire
    client = SampleClient(user, password)
    w = Wire(port)
    steps = []
    try:
        client.server_says(b"DIGEST-MD5")                 # the "mechanism list"
        assert client.client_says() == b"DIGEST-MD5"
        w.reply()
        w.cmd("EHLO c.example")
        code, text = w.cmd("AUTH DIGEST-MD5")
        steps.append(code)
        client.server_says(base64.b64decode(text))
        code, text = w.cmd(base64.b64encode(client.client_says()).decode())
        steps.append(code)
        if code == 334:
            # libsasl2 checks rspauth here; it fails loudly on a wrong one.
            client.server_says(base64.b64decode(text))
            said = client._read_until(r"Negotiation complete|Performing SASL negotiation: [^\r\n]*"
                                      ).group(0)
            steps.append(w.cmd("")[0])
            return steps, said
        return steps, ""
    finally:
        w.close()
        client.close()


def test_libsasl2_client_against_postwell(tmp_path):
    from test_smtpd import Running
    d = make_sasldb(tmp_path / "sasl")
    (tmp_path / "srv").mkdir()
    r = Running(tmp_path / "srv", {"smtpd_sasl_auth_enable": "yes",
                                   "cyrus_sasl_config_path": str(d)})
    try:
        steps, said = sample_client_login(r.port, "alice", "s3cret")
        assert steps == [334, 334, 235] and said == "Negotiation complete", said
        steps, _ = sample_client_login(r.port, "alice", "wrong")
        assert steps == [334, 535]
    finally:
        r.stop()


@pytest.mark.postfix
def test_libsasl2_client_against_both(reference_factory, postwell_factory):
    from test_sasl_realm import pair
    ref, pw = pair(reference_factory, postwell_factory, "sample", "")
    for user, password in (("alice", "s3cret"), (f"alice@{HOST}", "s3cret"), ("alice", "bad"),
                           ("bob@example.com", "hunter2")):
        want = sample_client_login(ref.port, user, password)
        got = sample_client_login(pw.port, user, password)
        assert got == want, (user, password)


@pytest.mark.postfix
def test_smtpd_sasl_service_names_the_digest_uri(reference_factory, postwell_factory):
    # Postfix hands smtpd_sasl_service to libsasl2 as the service name.
    from test_sasl_realm import pair
    ref, pw = pair(reference_factory, postwell_factory, "service", "",
                   smtpd_sasl_service="submission")
    for case in ({}, {"uri": "submission/" + HOST}, {"uri": "SUBMISSION/x"}):
        want = digest_case(ref.port, **case)
        assert digest_case(pw.port, **case) == want, case
    assert want[-2][0] == 235

