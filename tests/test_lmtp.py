"""lmtp(8): the LMTP agent against a scripted LMTP server (RFC 2033) and,
when installed, Dovecot's LMTP server."""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import pytest

from postwell.config.main import Config
from postwell.delivery import agent_class
from postwell.delivery.base import DeliveryRequest, Recipient
from postwell.delivery.lmtp import LmtpDeliveryAgent
from postwell.dns import FakeResolver
from postwell.log import NullLog

MSG = b"From: a@remote.test\nSubject: lmtp\n\n.leading dot\nbody\n"
WAIT = 20.0


class LmtpServer:
    """A scripted LMTP server: LHLO only, one reply per accepted recipient
    after the final dot (RFC 2033 4.2)."""

    def __init__(self, *, rcpt=None, final=None, unix_path=None):
        self.rcpt = rcpt or {}        # address -> RCPT reply
        self.final = final or {}      # address -> reply after DATA
        self.unix_path = unix_path
        self.commands = []
        self.data = []
        self.port = None
        self.server = None

    async def start(self):
        if self.unix_path:
            self.server = await asyncio.start_unix_server(self.session, self.unix_path)
        else:
            self.server = await asyncio.start_server(self.session, "127.0.0.1", 0)
            self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self):
        self.server.close()
        await self.server.wait_closed()

    async def session(self, reader, writer):
        def say(line):
            writer.write(line.encode() + b"\r\n")
        say("220 lmtp.test LMTP ready")
        accepted = []
        try:
            while True:
                line = await asyncio.wait_for(reader.readline(), WAIT)
                if not line:
                    break
                cmd = line.decode().rstrip("\r\n")
                self.commands.append(cmd)
                verb = cmd.split(" ", 1)[0].upper()
                if verb == "LHLO":
                    say("250-lmtp.test")
                    say("250-PIPELINING")
                    say("250-ENHANCEDSTATUSCODES")
                    say("250 8BITMIME")
                elif verb in ("EHLO", "HELO"):
                    say("500 5.5.1 LMTP speaks LHLO")      # RFC 2033 4.1
                elif verb == "MAIL":
                    accepted = []
                    say("250 2.1.0 Ok")
                elif verb == "RCPT":
                    addr = cmd[cmd.index("<") + 1:cmd.rindex(">")]
                    reply = self.rcpt.get(addr, "250 2.1.5 Ok")
                    if reply.startswith("250"):
                        accepted.append(addr)
                    say(reply)
                elif verb == "DATA":
                    say("354 End data with <CR><LF>.<CR><LF>")
                    await writer.drain()
                    body = bytearray()
                    while True:
                        chunk = await asyncio.wait_for(reader.readline(), WAIT)
                        if not chunk or chunk == b".\r\n":
                            break
                        body += chunk
                    self.data.append(bytes(body))
                    for addr in accepted:
                        say(self.final.get(addr, f"250 2.0.0 <{addr}> Saved"))
                elif verb == "RSET":
                    say("250 2.0.0 Ok")
                elif verb == "QUIT":
                    say("221 2.0.0 Bye")
                    await writer.drain()
                    break
                else:
                    say("502 5.5.2 Unknown command")
                await writer.drain()
        except (asyncio.TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()


def make_config(tmp_path, **params):
    qdir = tmp_path / "queue"
    (qdir / "private").mkdir(parents=True, exist_ok=True)
    base = {"queue_directory": str(qdir), "myhostname": "client.test", "lmtp_lhlo_name": "client.test"}
    base.update(params)
    return Config(str(tmp_path), base, {}, [])


def request(nexthop, rcpts, content=MSG):
    return DeliveryRequest(queue_id="4ABC12345", sender="s@remote.test",
                           recipients=[Recipient(r) for r in rcpts], transport="lmtp",
                           nexthop=nexthop, arrival_time=time.time(),
                           open_content=lambda: iter([content]), content_size=len(content))


def agent(cfg):
    return LmtpDeliveryAgent(cfg, FakeResolver({}), NullLog("lmtp"), own_addresses=frozenset())


async def deliver(cfg, srv, nexthop, rcpts, content=MSG):
    await srv.start()
    a = agent(cfg)
    try:
        return await asyncio.wait_for(a.deliver(request(nexthop, rcpts, content)), WAIT)
    finally:
        await a.close_all()
        await srv.stop()


def test_registered_as_lmtp():
    assert agent_class("lmtp") is LmtpDeliveryAgent
    assert LmtpDeliveryAgent.name == LmtpDeliveryAgent.protocol == "lmtp"


def test_relative_unix_nexthop_lives_under_queue_directory(tmp_path):
    cfg = make_config(tmp_path)
    srv = LmtpServer(unix_path=str(tmp_path / "queue" / "private" / "dovecot-lmtp"),
                     rcpt={"gone@x.test": "550 5.1.1 <gone@x.test> User doesn't exist"},
                     final={"full@x.test": "452 4.2.2 <full@x.test> Quota exceeded"})
    res = asyncio.run(deliver(cfg, srv, "unix:private/dovecot-lmtp",
                              ["ok@x.test", "gone@x.test", "full@x.test"]))
    assert srv.commands[0] == "LHLO client.test"
    assert not any(c.upper().startswith(("EHLO", "HELO")) for c in srv.commands)
    assert [(r.status, r.dsn) for r in res] == [("sent", "2.0.0"), ("bounced", "5.1.1"),
                                                 ("deferred", "4.2.2")]
    assert res[0].relay == "client.test[private/dovecot-lmtp]"
    assert res[0].reason == "250 2.0.0 <ok@x.test> Saved"
    assert "452 4.2.2 <full@x.test> Quota exceeded (in reply to end of DATA command)" in res[2].reason


def test_inet_and_bracket_nexthops(tmp_path):
    cfg = make_config(tmp_path)
    for form in ("inet:127.0.0.1:{port}", "[127.0.0.1]:{port}"):
        srv = LmtpServer()

        async def body():
            await srv.start()
            a = agent(cfg)
            try:
                return await asyncio.wait_for(
                    a.deliver(request(form.format(port=srv.port), ["a@x.test", "b@x.test"])), WAIT)
            finally:
                await a.close_all()
                await srv.stop()
        res = asyncio.run(body())
        assert [r.status for r in res] == ["sent", "sent"], form
        assert res[0].relay == f"127.0.0.1[127.0.0.1]:{srv.port}"
        # RFC 5321 4.5.2 dot-stuffing also applies to LMTP DATA.
        assert b"\r\n..leading dot\r\n" in srv.data[0]


def test_refused_connection_defers(tmp_path):
    cfg = make_config(tmp_path)
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()

    async def body():
        a = agent(cfg)
        try:
            return await asyncio.wait_for(a.deliver(request(f"inet:127.0.0.1:{port}", ["a@x.test"])),
                                          WAIT)
        finally:
            await a.close_all()
    [res] = asyncio.run(body())
    assert res.status == "deferred" and res.dsn.startswith("4.")
    assert "Connection refused" in res.reason


# ------------------------------------------------------------ Dovecot

DOVECOT = shutil.which("dovecot") or "/usr/sbin/dovecot"


def _dovecot_lmtp_available() -> str | None:
    if os.geteuid() != 0:
        return "Dovecot's LMTP server needs root here"
    if not os.path.exists(DOVECOT):
        return "dovecot is not installed"
    for d in ("/usr/lib/dovecot", "/usr/libexec/dovecot"):
        if os.path.exists(os.path.join(d, "lmtp")):
            return None
    return "dovecot-lmtpd is not installed"


@pytest.mark.skipif(_dovecot_lmtp_available() is not None,
                    reason=str(_dovecot_lmtp_available()))
def test_against_dovecot_lmtp(tmp_path):
    from harness import ensure_test_user
    user = ensure_test_user()
    pw = pwd.getpwnam(user)
    base = tempfile.mkdtemp(prefix="pwlmtp-", dir="/tmp")
    os.chmod(base, 0o755)
    mail = os.path.join(base, "mail")
    os.mkdir(mail)
    os.chown(mail, pw.pw_uid, pw.pw_gid)
    run = os.path.join(base, "run")
    sock = os.path.join(base, "lmtp.sock")
    conf = os.path.join(base, "dovecot.conf")
    with open(conf, "w") as f:
        f.write(f"""\
base_dir = {run}
state_dir = {base}/state
log_path = {base}/dovecot.log
protocols = lmtp
ssl = no
default_internal_user = {user}
default_login_user = {user}
mail_location = maildir:{mail}/%n
userdb {{
  driver = static
  args = uid={pw.pw_uid} gid={pw.pw_gid} home={mail}/%n allow_all_users=yes
}}
passdb {{
  driver = static
  args = nopassword=y
}}
service lmtp {{
  unix_listener {sock} {{
    mode = 0666
  }}
}}
service anvil {{
  chroot =
}}
service stats {{
  unix_listener stats-reader {{
    mode = 0600
  }}
  unix_listener stats-writer {{
    mode = 0600
  }}
}}
""")
    proc = subprocess.Popen([DOVECOT, "-F", "-c", conf], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 15
        while not os.path.exists(sock):
            if proc.poll() is not None or time.monotonic() > deadline:
                out = proc.stdout.read().decode(errors="replace") if proc.poll() is not None else ""
                pytest.skip(f"dovecot did not start: {out[-500:]}")
            time.sleep(0.05)
        cfg = make_config(tmp_path)

        async def body():
            a = agent(cfg)
            try:
                return await asyncio.wait_for(
                    a.deliver(request(f"unix:{sock}", ["alice@x.test", "bob@x.test"])), WAIT)
            finally:
                await a.close_all()
        res = asyncio.run(body())
        assert [r.status for r in res] == ["sent", "sent"], [r.reason for r in res]
        assert all(r.dsn == "2.0.0" for r in res)
        assert res[0].relay == f"client.test[{sock}]"
        for who in ("alice", "bob"):
            new = os.path.join(mail, who, "new")
            files = os.listdir(new)
            assert len(files) == 1
            data = open(os.path.join(new, files[0]), "rb").read()
            assert b"Subject: lmtp" in data and b"\n.leading dot\n" in data
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        shutil.rmtree(base, ignore_errors=True)


def test_inet_without_port_uses_lmtp_tcp_port(tmp_path):
    srv = LmtpServer()

    async def body():
        await srv.start()
        cfg = make_config(tmp_path, lmtp_tcp_port=str(srv.port))
        a = agent(cfg)
        try:
            return await asyncio.wait_for(a.deliver(request("inet:127.0.0.1", ["a@x.test"])), WAIT)
        finally:
            await a.close_all()
            await srv.stop()
    [res] = asyncio.run(body())
    assert res.status == "sent" and res.relay == f"127.0.0.1[127.0.0.1]:{srv.port}"


def test_lmtp_through_the_master(tmp_path):
    """virtual_transport = lmtp:unix:private/NAME: the qmgr (as mail_owner when
    root) reaches a socket under $queue_directory, as with Dovecot."""
    import threading

    import harness
    inst = harness.PostwellInstance(tmp_path, main_cf={
        "transport_maps": "inline:{lmtp.test=lmtp:unix:private/test-lmtp}",
        "lmtp_lhlo_name": "client.test"})
    inst.master_cf = inst.default_master_cf() + "lmtp unix - - n - - lmtp\n"
    inst.write_config()
    private = inst.queue_dir / "private"
    private.mkdir(parents=True, exist_ok=True)
    srv = LmtpServer(unix_path=str(private / "test-lmtp"),
                     final={"full@lmtp.test": "452 4.2.2 <full@lmtp.test> Quota exceeded"})
    loop = asyncio.new_event_loop()
    ready = threading.Event()

    def serve():
        asyncio.set_event_loop(loop)
        loop.run_until_complete(srv.start())
        os.chmod(srv.unix_path, 0o666)
        ready.set()
        loop.run_forever()
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    assert ready.wait(WAIT)
    try:
        with inst:
            import smtplib
            with smtplib.SMTP("127.0.0.1", inst.port, timeout=WAIT) as s:
                s.sendmail("s@remote.test", ["ok@lmtp.test", "full@lmtp.test"],
                           "Subject: via lmtp\r\n\r\nhi\r\n")
            inst.wait_log(r"to=<ok@lmtp\.test>, relay=\S+\[private/test-lmtp\], .*dsn=2\.0\.0, "
                          r"status=sent \(250 2\.0\.0 <ok@lmtp\.test> Saved\)", timeout=30)
            inst.wait_log(r"to=<full@lmtp\.test>, .*dsn=4\.2\.2, status=deferred", timeout=30)
            assert srv.commands[0] == "LHLO client.test"
    finally:
        loop.call_soon_threadsafe(loop.stop)
        t.join(WAIT)
