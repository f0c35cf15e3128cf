"""SASL back ends that talk to daemons: a real saslauthd and a real Dovecot
(started here in temp directories, skipped when not installed), plus a
scripted Dovecot stand-in for the failure paths a real server rarely shows."""

from __future__ import annotations

import asyncio
import base64
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from postwell.config import load_config
from postwell.sasl import Challenge, Success, check_sasl_config, server_for_config, step_reply
from postwell.sasl.cyrus import SaslauthdBackend
from postwell.sasl.mechanisms import BackendUnavailable, Identity

HOST = "mx.example.test"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def wait_for_path(path, proc, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path):
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.05)
    return False


def _dovecot_answers(path, timeout: float) -> bool:
    """A full auth-client handshake (VERSION ... DONE) within timeout."""
    import socket
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(max(0.1, deadline - time.monotonic()))
                s.connect(str(path))
                s.sendall(f"VERSION\t1\t2\nCPID\t{os.getpid()}\n".encode())
                buf = b""
                while b"\nDONE\n" not in b"\n" + buf:
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    buf += chunk
                else:
                    return True
        except OSError:
            pass
        time.sleep(0.1)
    return False


def stop(proc):
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def main_cf(tmp_path, **params):
    etc = tmp_path / "etc"
    etc.mkdir(exist_ok=True)
    import getpass
    lines = [f"myhostname = {HOST}", f"queue_directory = {tmp_path / 'q'}",
             "smtpd_sasl_auth_enable = yes", f"mail_owner = {getpass.getuser()}"]
    lines += [f"{k} = {v}" for k, v in params.items()]
    (etc / "main.cf").write_text("\n".join(lines) + "\n")
    return load_config(str(etc))


async def dialogue(server, mech, initial, *responses, **kw):
    if hasattr(server, "prepare"):
        await server.prepare()
    ex = server.start(mech, initial, **kw)
    step = await ex.begin()
    steps = [step]
    for r in responses:
        if not isinstance(step, Challenge):
            break
        step = await ex.step(r)
        steps.append(step)
    await server.close()
    return steps


# --- saslauthd -----------------------------------------------------------------------------

class ImapStub:
    """Enough IMAP for saslauthd's rimap driver: greeting, LOGIN, tagged answer."""

    def __init__(self, users: dict[str, str]) -> None:
        self.users = users
        self.logins: list[bytes] = []
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.stopping = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while not self.stopping:
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            with conn:
                conn.settimeout(5)
                conn.sendall(b"* OK stub\r\n")
                try:
                    line = conn.makefile("rb").readline(4096)
                except OSError:
                    continue
                self.logins.append(line)
                parts = line.rstrip(b"\r\n").split(b" ")
                ok = (len(parts) == 4 and
                      self.users.get(parts[2].strip(b'"').decode()) == parts[3].strip(b'"').decode())
                conn.sendall(parts[0] + (b" OK done\r\n" if ok else b" NO denied\r\n"))

    def close(self):
        self.stopping = True
        self.thread.join(5)
        self.sock.close()


@pytest.fixture
def saslauthd(tmp_path):
    binary = shutil.which("saslauthd") or ("/usr/sbin/saslauthd"
                                           if os.path.exists("/usr/sbin/saslauthd") else None)
    if binary is None:
        pytest.skip("saslauthd (Debian package sasl2-bin) not installed")
    stub = ImapStub({"alice": "secret"})
    rundir = tmp_path / "saslauthd"
    rundir.mkdir()
    proc = subprocess.Popen([binary, "-a", "rimap", "-O", f"127.0.0.1/{stub.port}",
                             "-m", str(rundir), "-n", "1", "-d"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            # saslauthd signals its whole process group on exit.
                            start_new_session=True)
    try:
        if not wait_for_path(rundir / "mux", proc):
            pytest.skip("saslauthd did not start here")
        yield rundir / "mux", stub
    finally:
        stop(proc)
        stub.close()


def test_saslauthd_protocol_against_real_daemon(saslauthd):
    mux, stub = saslauthd
    backend = SaslauthdBackend(str(mux), "smtp")
    ident = Identity("alice", HOST, f"alice@{HOST}")
    assert run(backend.verify(ident, "secret")) is True
    assert run(backend.verify(ident, "wrong")) is False
    assert b'LOGIN "alice" "secret"' in stub.logins[0]


def test_cyrus_saslauthd_config(saslauthd, tmp_path):
    mux, _ = saslauthd
    sasldir = tmp_path / "sasl"
    sasldir.mkdir()
    (sasldir / "smtpd.conf").write_text(
        f"pwcheck_method: saslauthd\nsaslauthd_path: {mux}\nmech_list: PLAIN LOGIN CRAM-MD5\n")
    cfg = main_cf(tmp_path, cyrus_sasl_config_path=sasldir, smtpd_sasl_local_domain=HOST)
    assert check_sasl_config(cfg) == []
    server = server_for_config(cfg)
    # saslauthd checks clear-text passwords only: no CRAM-MD5.
    assert server.mechanisms() == ["PLAIN", "LOGIN"]
    assert run(dialogue(server, "PLAIN", b64(b"\0alice\0secret"))) == [Success(f"alice@{HOST}")]
    steps = run(dialogue(server, "LOGIN", None, b64(b"alice"), b64(b"bad")))
    assert str(step_reply(steps[-1])) == "535 5.7.8 Error: authentication failed: authentication failure"


def test_saslauthd_down_is_temporary(tmp_path):
    backend = SaslauthdBackend(str(tmp_path / "nothing" / "mux"), "smtp")
    with pytest.raises(BackendUnavailable):
        run(backend.verify(Identity("a", "b", "a@b"), "x"))
    sasldir = tmp_path / "sasl"
    sasldir.mkdir()
    (sasldir / "smtpd.conf").write_text(f"pwcheck_method: saslauthd\n"
                                        f"saslauthd_path: {tmp_path}/nothing/mux\n")
    cfg = main_cf(tmp_path, cyrus_sasl_config_path=sasldir)
    assert "does not exist" in check_sasl_config(cfg)[0]
    steps = run(dialogue(server_for_config(cfg), "PLAIN", b64(b"\0alice\0secret")))
    assert str(step_reply(steps[0])) == "454 4.7.0 Temporary authentication failure: generic failure"


# --- Dovecot (real) -------------------------------------------------------------------------

@pytest.fixture
def dovecot(tmp_path):
    binary = shutil.which("dovecot") or ("/usr/sbin/dovecot"
                                         if os.path.exists("/usr/sbin/dovecot") else None)
    if binary is None:
        pytest.skip("Dovecot (Debian package dovecot-core) not installed")
    if os.geteuid() != 0:
        pytest.skip("the Dovecot fixture runs as root")
    # Dovecot puts a dozen unix sockets in base_dir (anvil-auth-penalty, ...): a deep
    # pytest tmp_path (long test name, xdist worker dir) pushes some past the 108-byte
    # limit of a socket path, and the auth service never answers.  Keep it short.
    import tempfile
    d = Path(tempfile.mkdtemp(prefix="pwdv-", dir="/tmp"))
    request_cleanup = d
    for sub in ("run", "state"):
        (d / sub).mkdir(parents=True)
    d.chmod(0o755)
    (d / "users").write_text(f"alice@{HOST}:{{PLAIN}}secret\n"
                             "bob:{SHA512-CRYPT}" + _sha512("pw2") + "\n")
    (d / "dovecot.conf").write_text(f"""
protocols =
base_dir = {d}/run
state_dir = {d}/state
log_path = {d}/dovecot.log
ssl = no
auth_mechanisms = plain login cram-md5 scram-sha-256
disable_plaintext_auth = no
auth_failure_delay = 0
default_internal_user = root
default_login_user = root
default_internal_group = root
passdb {{
  driver = passwd-file
  args = scheme=PLAIN {d}/users
}}
userdb {{
  driver = static
  args = uid=root gid=root home={d}
}}
service auth {{
  unix_listener auth-client {{
    mode = 0666
  }}
  user = root
}}
""")
    proc = subprocess.Popen([binary, "-F", "-c", str(d / "dovecot.conf")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        if not wait_for_path(d / "run" / "auth-client", proc):
            pytest.skip("Dovecot did not start here")
        # The socket exists before the auth process answers: on a loaded machine the
        # first handshake can take seconds, longer than the client's connect timeout.
        assert _dovecot_answers(d / "run" / "auth-client", 30.0), "Dovecot auth never answered"
        yield d / "run" / "auth-client"
    finally:
        stop(proc)
        shutil.rmtree(request_cleanup, ignore_errors=True)


def _sha512(pw):
    from postwell.sasl.passwords import sha_crypt
    return sha_crypt(pw.encode(), "$6$abcdefghijklmnop")


def test_dovecot_real(dovecot, tmp_path):
    cfg = main_cf(tmp_path, smtpd_sasl_type="dovecot", smtpd_sasl_path=str(dovecot))
    assert check_sasl_config(cfg) == []
    server = server_for_config(cfg)

    async def go():
        await server.prepare()
        assert server.mechanisms() == ["PLAIN", "LOGIN", "CRAM-MD5", "SCRAM-SHA-256"]
        assert server.mechanisms(True) == server.mechanisms()
        out = []
        for mech, ir, rest in [
            ("PLAIN", b64(f"\0alice@{HOST}\0secret".encode()), []),
            ("PLAIN", b64(b"\0bob\0pw2"), []),
            ("LOGIN", None, [b64(b"bob"), b64(b"pw2")]),
            ("PLAIN", b64(b"\0bob\0nope"), []),
            ("PLAIN", "!!!!", []),
            ("FOO", None, []),
        ]:
            ex = server.start(mech, ir)
            step = await ex.begin()
            for r in rest:
                step = await ex.step(r)
            out.append(step)
        # Two exchanges at once on the one connection.
        a = server.start("LOGIN", None)
        b = server.start("LOGIN", None)
        await asyncio.gather(a.begin(), b.begin())
        await asyncio.gather(a.step(b64(b"bob")), b.step(b64(b"bob")))
        ra, rb = await asyncio.gather(a.step(b64(b"pw2")), b.step(b64(b"bad")))
        await server.close()
        return out, ra, rb

    out, ra, rb = run(go())
    assert out[0] == Success(f"alice@{HOST}")
    assert out[1] == Success("bob")
    assert out[2] == Success("bob")
    assert str(step_reply(out[3])) == "535 5.7.8 Error: authentication failed: (reason unavailable)"
    assert out[3].username == "bob"
    assert out[4].reason == "Invalid base64 data in initial response"
    assert out[5].reason == "Invalid authentication mechanism"
    assert ra == Success("bob") and ra != rb and rb.username == "bob"


def test_dovecot_noplaintext_filters_on_mech_flags(dovecot, tmp_path):
    cfg = main_cf(tmp_path, smtpd_sasl_type="dovecot", smtpd_sasl_path=str(dovecot),
                  smtpd_sasl_security_options="noanonymous, noplaintext",
                  smtpd_sasl_tls_security_options="noanonymous")
    server = server_for_config(cfg)

    async def go():
        await server.prepare()
        r = server.mechanisms(False), server.mechanisms(True)
        await server.close()
        return r
    plain, tls = run(go())
    assert plain == ["CRAM-MD5", "SCRAM-SHA-256"]
    assert tls[:2] == ["PLAIN", "LOGIN"]


# --- Dovecot (scripted stand-in) -------------------------------------------------------------

class FakeDovecot:
    """Speaks the server side of the auth protocol from a script."""

    def __init__(self, path, on_auth):
        self.path = str(path)
        self.on_auth = on_auth
        self.lines: list[str] = []

    async def handle(self, reader, writer):
        writer.write(b"VERSION\t1\t2\nMECH\tPLAIN\tplaintext\nMECH\tLOGIN\tplaintext\n"
                     b"MECH\tSECRET\tprivate\nMECH\tANONYMOUS\tanonymous\n"
                     b"SPID\t1\nCUID\t1\nCOOKIE\tx\nDONE\n")
        while True:
            line = await reader.readline()
            if not line:
                break
            text = line.decode().rstrip("\n")
            self.lines.append(text)
            if text.startswith(("AUTH\t", "CONT\t")):
                reply = self.on_auth(text)
                if reply is None:
                    writer.close()
                    return
                writer.write(reply.encode())


def test_dovecot_stand_in_temp_failure_and_connection_loss(tmp_path):
    sock = tmp_path / "auth"

    def on_auth(text):
        fields = text.split("\t")
        if fields[0] == "AUTH" and fields[2] == "LOGIN":
            return f"CONT\t{fields[1]}\t{b64(b'Username:')}\n"
        if fields[0] == "CONT":
            return None                       # drop the connection mid-exchange
        return f"FAIL\t{fields[1]}\treason=Try again\tuser=alice\ttemp\n"

    fake = FakeDovecot(sock, on_auth)
    cfg = main_cf(tmp_path, smtpd_sasl_type="dovecot", smtpd_sasl_path=str(sock))

    async def go():
        srv = await asyncio.start_unix_server(fake.handle, path=str(sock))
        server = server_for_config(cfg)
        await server.prepare()
        mechs = server.mechanisms()
        ex = server.start("PLAIN", b64(b"\0alice\0x"), client_addr="192.0.2.1",
                          local_addr="127.0.0.1", tls_active=True)
        first = await ex.begin()
        ex = server.start("LOGIN", None)
        ch = await ex.begin()
        lost = await ex.step(b64(b"alice"))
        # The next exchange reconnects by itself.
        ex = server.start("PLAIN", b64(b"\0alice\0x"))
        again = await ex.begin()
        await server.close()
        srv.close()
        return mechs, first, ch, lost, again

    mechs, first, ch, lost, again = run(go())
    assert mechs == ["PLAIN", "LOGIN"]           # private and anonymous are not offered
    assert str(step_reply(first)) == "454 4.7.0 Temporary authentication failure: Try again"
    auth = next(line for line in fake.lines if line.startswith("AUTH"))
    assert "\tservice=smtp\tnologin\tlip=127.0.0.1\trip=192.0.2.1\tsecured\tresp=" in auth
    assert ch == Challenge(b"Username:")
    assert str(step_reply(lost)) == ("454 4.7.0 Temporary authentication failure: "
                                     "Connection lost to authentication server")
    assert again.temporary and again.reason == "Try again"


def test_dovecot_socket_missing(tmp_path):
    cfg = main_cf(tmp_path, smtpd_sasl_type="dovecot")
    problems = check_sasl_config(cfg)
    # Postfix's rule: a relative smtpd_sasl_path is under queue_directory.
    assert problems == [f"Dovecot auth socket {tmp_path / 'q' / 'smtpd'} does not exist "
                        "(is Dovecot running?)"]
    server = server_for_config(cfg)
    steps = run(dialogue(server, "PLAIN", b64(b"\0a\0b")))
    assert steps[0].temporary and steps[0].reason == "Connection lost to authentication server"


def test_dovecot_exchange_never_continues_on_a_new_connection(tmp_path):
    sock = tmp_path / "auth"
    drop = b64(b"\0drop\0x")

    def on_auth(text):
        fields = text.split("\t")
        if fields[0] == "AUTH" and fields[2] == "LOGIN":
            return f"CONT\t{fields[1]}\t{b64(b'Username:')}\n"
        if fields[0] == "AUTH" and f"resp={drop}" in fields:
            return None
        return f"FAIL\t{fields[1]}\tuser=x\n"

    fake = FakeDovecot(sock, on_auth)
    cfg = main_cf(tmp_path, smtpd_sasl_type="dovecot", smtpd_sasl_path=str(sock))

    async def go():
        srv = await asyncio.start_unix_server(fake.handle, path=str(sock))
        server = server_for_config(cfg)
        a = server.start("LOGIN", None)
        first = await a.begin()
        lost = await server.start("PLAIN", drop).begin()       # the server hangs up
        other = await server.start("PLAIN", b64(b"\0x\0y")).begin()   # reconnects
        late = await a.step(b64(b"alice"))
        await server.close()
        srv.close()
        return first, lost, other, late

    first, lost, other, late = run(go())
    assert first == Challenge(b"Username:")
    assert lost.temporary and other.reason == "" and not other.temporary
    assert late.temporary and late.reason == "Connection lost to authentication server"
    assert not any(line.startswith("CONT") for line in fake.lines)
