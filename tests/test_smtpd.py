"""The asyncio smtpd over loopback TCP, with the real policy, cleanup and queue."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import threading
import time

import pytest

from postwell.config import load_config
from postwell.log import NullLog
from postwell.smtpd import SmtpdServer, client_hostname

WAIT = 10.0


class Running:
    """One SmtpdServer on its own event loop thread, bound to 127.0.0.1:<free port>."""

    def __init__(self, tmp_path, extra: dict | None = None, family=socket.AF_INET, **server_kw):
        etc = tmp_path / "etc"
        etc.mkdir(exist_ok=True)
        queue = tmp_path / "queue"
        params = {
            "queue_directory": str(queue),
            "myhostname": "mx.example.test",
            "mydomain": "example.test",
            "mydestination": "$myhostname, localhost",
            "mynetworks": "127.0.0.0/8",
            "smtpd_peername_lookup": "no",
            "smtpd_error_sleep_time": "0",
            "compatibility_level": "3.6",
            "alias_maps": "",
            "local_recipient_maps": "",
        }
        params.update(extra or {})
        (etc / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in params.items()))
        self.config = load_config(str(etc))
        from postwell.cleanup import Cleanup
        from postwell.queue import QueueStore
        self.store = QueueStore(str(queue))
        self.store.ensure_layout()
        self.log = NullLog("smtpd")
        if "cleanup" not in server_kw:
            server_kw["cleanup"] = Cleanup(self.config, self.store, self.log)
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("::1" if family == socket.AF_INET6 else "127.0.0.1", 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        self.loop = asyncio.new_event_loop()
        self.server = None
        ready = threading.Event()

        def run():
            asyncio.set_event_loop(self.loop)

            async def main():
                self.server = SmtpdServer(self.config, log=self.log, **server_kw)
                await self.server.start([self.sock])
                ready.set()

            self.loop.run_until_complete(main())
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert ready.wait(WAIT)

    def stop(self, drain: float = 2.0):
        fut = asyncio.run_coroutine_threadsafe(self.server.drain(drain), self.loop)
        fut.result(WAIT)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(WAIT)

    def lines(self) -> list[str]:
        return list(self.log.lines)

    def wait_log(self, pattern: str, timeout: float = WAIT) -> str:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for line in self.lines():
                if re.search(pattern, line):
                    return line
            time.sleep(0.02)
        raise AssertionError(f"no log line matches {pattern!r}: {self.lines()}")

    def queued(self) -> list[str]:
        return self.store.scan("incoming")


@pytest.fixture
def smtpd(tmp_path):
    made = []

    def make(extra=None, **kw):
        r = Running(tmp_path / f"s{len(made)}", extra, **kw)
        made.append(r)
        return r

    (tmp_path / "s0").mkdir()
    for i in range(1, 4):
        (tmp_path / f"s{i}").mkdir()
    yield make
    for r in made:
        r.stop()


def raw_session(port: int, chunks: list[bytes], wait: float = 0.3, end_wait: float = 1.0) -> bytes:
    """Send each chunk, collecting what comes back; stop at EOF."""
    s = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
    out = bytearray()
    try:
        s.settimeout(WAIT)
        out += s.recv(4096)
        for i, c in enumerate(chunks):
            try:
                s.sendall(c)
            except OSError:
                break
            deadline = time.monotonic() + (end_wait if i == len(chunks) - 1 else wait)
            while time.monotonic() < deadline:
                s.settimeout(max(0.01, deadline - time.monotonic()))
                try:
                    d = s.recv(65536)
                except socket.timeout:
                    break
                except ConnectionResetError:
                    d = b""
                if not d:
                    return bytes(out)
                out += d
    finally:
        s.close()
    return bytes(out)


def codes(data: bytes) -> list[str]:
    return [l[:3] + ("-" if l[3:4] == "-" else "") for l in data.decode().split("\r\n") if l]


# ------------------------------------------------------------------------------------------

def test_happy_path_smtplib(smtpd):
    r = smtpd()
    with smtplib.SMTP("127.0.0.1", r.port, timeout=WAIT) as c:
        code, banner = c.ehlo("client.example.test")
        assert code == 250
        assert b"PIPELINING" in banner and b"CHUNKING" in banner
        refused = c.sendmail("alice@example.org", ["bob@mx.example.test"],
                             b"Subject: hi\r\n\r\n.leading dot\r\nbody\r\n")
        assert refused == {}
        code, resp = c.noop()
        assert code == 250
    line = r.wait_log(r"disconnect from")
    assert line == ("disconnect from unknown[127.0.0.1] ehlo=1 mail=1 rcpt=1 data=1 "
                    "noop=1 quit=1 commands=6")
    lines = r.lines()
    assert lines[0] == "connect from unknown[127.0.0.1]"
    m = re.fullmatch(r"([0-9A-F]+): client=unknown\[127\.0\.0\.1\]", lines[1])
    assert m, lines
    qid = m.group(1)
    assert r.queued() == [qid]
    qm = r.store.open(qid, "incoming")
    content = qm.read_content().decode()
    assert content.startswith(
        "Received: from client.example.test (unknown [127.0.0.1])\n"
        f"\tby mx.example.test (postwell) with ESMTP id {qid}\n"
        "\tfor <bob@mx.example.test>; ")
    assert "\n.leading dot\n" in content   # dot-unstuffed once
    assert qm.sender == "alice@example.org"


def test_queued_reply_after_commit(smtpd):
    r = smtpd()
    out = raw_session(r.port, [b"EHLO x\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@mx.example.test>\r\n"
                               b"DATA\r\n", b"Subject: x\r\n\r\nhello\r\n.\r\n", b"QUIT\r\n"])
    m = re.search(rb"250 2\.0\.0 Ok: queued as ([0-9A-F]+)\r\n", out)
    assert m, out
    assert r.queued() == [m.group(1).decode()]


def test_relay_denied_noqueue(smtpd):
    r = smtpd({"mynetworks": "10.9.9.0/24"})
    out = raw_session(r.port, [b"EHLO helo.example\r\n", b"MAIL FROM:<a@b.example>\r\n",
                               b"RCPT TO:<x@elsewhere.example>\r\n", b"QUIT\r\n"])
    assert b"454 4.7.1 <x@elsewhere.example>: Relay access denied\r\n" in out
    r.wait_log("disconnect from")
    lines = r.lines()
    assert ("NOQUEUE: reject: RCPT from unknown[127.0.0.1]: 454 4.7.1 <x@elsewhere.example>: "
            "Relay access denied; from=<a@b.example> to=<x@elsewhere.example> proto=ESMTP "
            "helo=<helo.example>") in lines
    assert not any("client=" in l for l in lines)
    assert lines[-1] == "disconnect from unknown[127.0.0.1] ehlo=1 mail=1 rcpt=0/1 quit=1 commands=3/4"
    assert r.queued() == []


def test_pipelining_group(smtpd):
    r = smtpd()
    out = raw_session(r.port, [b"EHLO x\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<u@mx.example.test>\r\n"
                               b"RCPT TO:<v@mx.example.test>\r\nDATA\r\n",
                               b"hi\r\n.\r\nQUIT\r\n"])
    assert codes(out)[-7:] == ["250", "250", "250", "250", "354", "250", "221"]
    qid = r.queued()[0]
    content = r.store.open(qid, "incoming").read_content().decode()
    # Two recipients: no "for" clause; the date gets its own line (as Postfix 3.7).
    assert re.match(rf"Received: from x \(unknown \[127\.0\.0\.1\]\)\n\tby mx\.example\.test "
                    rf"\(postwell\) with ESMTP id {qid};\n\t\w\w\w, ", content), content


def test_smuggling_never_second_message(smtpd):
    r = smtpd()
    payload = (b"EHLO x\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<u@mx.example.test>\r\nDATA\r\n"
               b"Subject: one\r\n\r\nfirst\n.\nMAIL FROM:<evil@b.example>\r\n"
               b"RCPT TO:<v@mx.example.test>\r\nDATA\r\nsmuggled\r\n"
               b"x\r.\rMAIL FROM:<e2@x>\r\n"
               b"y\r\n.\nMAIL FROM:<e3@x>\r\n"
               b".\r\n")
    out = raw_session(r.port, [payload, b"QUIT\r\n"])
    assert codes(out)[-5:] == ["250", "250", "354", "250", "221"], out
    assert len(r.queued()) == 1
    content = r.store.open(r.queued()[0], "incoming").read_content()
    assert b"MAIL FROM:<evil@b.example>" in content   # stayed content


def test_bdat(smtpd):
    r = smtpd()
    out = raw_session(r.port, [b"EHLO x\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<u@mx.example.test>\r\n"
                               b"BDAT 10\r\nSubject: xBDAT 8 LAST\r\n\r\nbody\r\n", b"QUIT\r\n"])
    assert b"250 2.0.0 Ok: 10 bytes\r\n" in out
    assert re.search(rb"250 2\.0\.0 Ok: 18 bytes queued as [0-9A-F]+\r\n", out), out
    content = r.store.open(r.queued()[0], "incoming").read_content()
    assert b"Subject: x\n" in content and content.endswith(b"\n\nbody\n")


def test_size_limit_data(smtpd):
    r = smtpd({"message_size_limit": "20000"})
    body = (b"x" * 998 + b"\r\n") * 40
    out = raw_session(r.port, [b"EHLO x\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<u@mx.example.test>\r\n"
                               b"DATA\r\n", body + b".\r\n", b"QUIT\r\n"])
    assert b"552 5.3.4 Error: message file too big\r\n" in out
    assert out.endswith(b"221 2.0.0 Bye\r\n")
    assert r.queued() == []
    assert any(re.fullmatch(r"warning: [0-9A-F]+: queue file size limit exceeded", l)
               for l in r.lines()), r.lines()


def test_size_param_refused(smtpd):
    r = smtpd({"message_size_limit": "20000"})
    out = raw_session(r.port, [b"EHLO x\r\n", b"MAIL FROM:<a@b.example> SIZE=20001\r\n", b"QUIT\r\n"])
    assert b"250-SIZE 20000\r\n" in out
    assert b"552 5.3.4 Message size exceeds fixed limit\r\n" in out


def test_timeout(smtpd):
    r = smtpd({"smtpd_timeout": "1s"})
    s = socket.create_connection(("127.0.0.1", r.port), timeout=WAIT)
    try:
        s.recv(1024)
        s.sendall(b"EHLO x\r\nMAIL FROM:<a@b.example>\r\n")
        data = b""
        while not data.endswith(b"Error: timeout exceeded\r\n"):
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        assert data.endswith(b"421 4.4.2 mx.example.test Error: timeout exceeded\r\n"), data
        assert s.recv(1024) == b""
    finally:
        s.close()
    r.wait_log(r"^timeout after MAIL from unknown\[127\.0\.0\.1\]$")
    r.wait_log(r"^disconnect from unknown\[127\.0\.0\.1\] ehlo=1 mail=1 commands=2$")


def test_lost_connection_during_data(smtpd):
    r = smtpd()
    s = socket.create_connection(("127.0.0.1", r.port), timeout=WAIT)
    s.recv(1024)
    s.sendall(b"EHLO x\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<u@mx.example.test>\r\nDATA\r\npartial\r\n")
    time.sleep(0.3)
    s.close()
    r.wait_log(r"^lost connection after DATA \(9 bytes\) from unknown\[127\.0\.0\.1\]$")
    r.wait_log(r"^disconnect from unknown\[127\.0\.0\.1\] ehlo=1 mail=1 rcpt=1 data=0/1 commands=3/4$")
    assert r.queued() == []


def test_too_many_errors(smtpd):
    r = smtpd()
    out = raw_session(r.port, [b"FOO\r\n" * 25], end_wait=3.0)
    assert codes(out).count("500") == 20
    assert out.endswith(b"421 4.7.0 mx.example.test Error: too many errors\r\n")
    r.wait_log(r"^too many errors after UNKNOWN from unknown\[127\.0\.0\.1\]$|"
               r"^too many errors after CONNECT from")
    r.wait_log(r"^disconnect from unknown\[127\.0\.0\.1\] unknown=0/20 commands=0/20$")


def test_huge_line_bounded(smtpd):
    r = smtpd()
    s = socket.create_connection(("127.0.0.1", r.port), timeout=WAIT)
    try:
        s.recv(1024)
        chunk = b"A" * 65536
        for _ in range(160):          # 10 MB without a newline
            s.sendall(chunk)
        s.sendall(b"\r\nNOOP\r\n")
        data = b""
        while data.count(b"\r\n") < 2:
            d = s.recv(4096)
            if not d:
                break
            data += d
        assert data == b"500 5.5.2 Error: command not recognized\r\n250 2.0.0 Ok\r\n"
        for sess in r.server.sessions:
            assert sess.conn.buffered <= r.server.read_bound
    finally:
        s.close()
    r.wait_log(r"request longer than 2048")


def test_connection_limit(smtpd):
    r = smtpd({"smtpd_client_connection_count_limit": "2", "mynetworks": "10.0.0.0/8"})
    socks = [socket.create_connection(("127.0.0.1", r.port), timeout=WAIT) for _ in range(3)]
    try:
        greetings = [s.recv(1024) for s in socks]
        assert greetings[0].startswith(b"220 ") and greetings[1].startswith(b"220 ")
        assert greetings[2] == b"421 4.7.0 mx.example.test Error: too many connections from 127.0.0.1\r\n"
    finally:
        for s in socks:
            s.close()
    r.wait_log(r"warning: Connection concurrency limit exceeded: 3 from unknown\[127\.0\.0\.1\] "
               r"for service smtp")


def test_connection_limit_mynetworks_exempt(smtpd):
    r = smtpd({"smtpd_client_connection_count_limit": "1"})
    socks = [socket.create_connection(("127.0.0.1", r.port), timeout=WAIT) for _ in range(2)]
    try:
        assert all(s.recv(1024).startswith(b"220 ") for s in socks)
    finally:
        for s in socks:
            s.close()


def test_bare_newline_reject(smtpd):
    r = smtpd({"smtpd_forbid_bare_newline": "reject", "smtpd_forbid_bare_newline_exclusions": ""})
    out = raw_session(r.port, [b"EHLO x\r\n", b"MAIL FROM:<a@b.example>\r\nRCPT TO:<u@mx.example.test>\r\n"
                               b"DATA\r\n", b"line\nmore\r\n.\r\n", b"QUIT\r\n"])
    assert out.endswith(b"550 5.5.2 mx.example.test Error: bare <LF> received\r\n221 2.0.0 Bye\r\n")
    assert r.queued() == []
    r.wait_log(r"^[0-9A-F]+: reject: END-OF-MESSAGE from unknown\[127\.0\.0\.1\]: bare <LF> received; "
               r"from=<a@b\.example> to=<u@mx\.example\.test> proto=ESMTP helo=<x>$")
    r.wait_log(r"ehlo=1 mail=1 rcpt=1 data=0/1 quit=1 commands=4/5$")


def test_drain_finishes_session(smtpd):
    r = smtpd()
    c = smtplib.SMTP("127.0.0.1", r.port, timeout=WAIT)
    c.ehlo("x")
    fut = asyncio.run_coroutine_threadsafe(r.server.drain(5.0), r.loop)
    time.sleep(0.2)
    # no new connections once draining (this process's listening socket is closed)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", r.port), timeout=1)
    assert c.sendmail("a@b.example", ["u@mx.example.test"], b"Subject: x\r\n\r\nx\r\n") == {}
    c.quit()
    fut.result(WAIT)
    assert len(r.queued()) == 1


def test_peername_lookup_loopback():
    assert client_hostname("10.1.2.3", True) == "unknown"
    assert client_hostname("127.0.0.1", False) == "unknown"
    assert client_hostname("127.0.0.1", True) != ""


@pytest.mark.skipif(not shutil.which("swaks"), reason="swaks not installed")
def test_swaks(smtpd):
    r = smtpd()
    p = subprocess.run(["swaks", "--server", "127.0.0.1", "--port", str(r.port), "--from", "a@b.example",
                        "--to", "u@mx.example.test", "--pipeline", "--timeout", "10"],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stdout + p.stderr
    assert re.search(r"<-  250 2\.0\.0 Ok: queued as [0-9A-F]+", p.stdout), p.stdout
    assert len(r.queued()) == 1


def test_serve_in_child_process_sigterm_drain(tmp_path):
    """The master's entry point: serve() in a forked child, SIGTERM drains and returns."""
    etc = tmp_path / "etc"
    etc.mkdir()
    queue = tmp_path / "queue"
    maillog = tmp_path / "maillog"
    (etc / "main.cf").write_text(
        f"queue_directory = {queue}\nmaillog_file = {maillog}\nmyhostname = mx.example.test\n"
        "mynetworks = 127.0.0.0/8\nsmtpd_peername_lookup = yes\ncompatibility_level = 3.6\n"
        "mydestination = $myhostname\nalias_maps =\nlocal_recipient_maps =\n")
    from postwell.queue import QueueStore
    QueueStore(str(queue)).ensure_layout()
    config = load_config(str(etc))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    port = sock.getsockname()[1]
    pid = os.fork()
    if pid == 0:   # child
        code = 1
        try:
            from postwell.smtpd import serve
            serve(config, None, [sock], drain_seconds=3.0)
            code = 0
        finally:
            os._exit(code)
    sock.close()
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=WAIT) as c:
            c.ehlo("x")
            assert c.sendmail("a@b.example", ["u@mx.example.test"], b"Subject: s\r\n\r\nhi\r\n") == {}
        os.kill(pid, signal.SIGTERM)
        end = time.monotonic() + WAIT
        status = None
        while time.monotonic() < end:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.05)
        else:
            raise AssertionError("smtpd did not stop on SIGTERM")
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        pid = 0
    finally:
        if pid:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    text = maillog.read_text()
    name = client_hostname("127.0.0.1", True)
    assert f"postfix/smtpd[" in text
    assert f": connect from {name}[127.0.0.1]\n" in text
    assert f"disconnect from {name}[127.0.0.1] ehlo=1 mail=1 rcpt=1 data=1 quit=1 commands=5\n" in text
    assert len(QueueStore(str(queue)).scan("incoming")) == 1


def test_access_prepend_and_discard(smtpd):
    r = smtpd({"smtpd_data_restrictions": "check_client_access inline:{{ 127.0.0.1 = PREPEND X-Seen: yes }}"})
    with smtplib.SMTP("127.0.0.1", r.port, timeout=WAIT) as c:
        c.sendmail("a@b.example", ["u@mx.example.test"], b"Subject: s\r\n\r\nhi\r\n")
    qid = r.queued()[0]
    content = r.store.open(qid, "incoming").read_content().decode()
    assert content.startswith("X-Seen: yes\nReceived: from "), content

    r2 = smtpd({"smtpd_end_of_data_restrictions": "check_client_access static:DISCARD"})
    with smtplib.SMTP("127.0.0.1", r2.port, timeout=WAIT) as c:
        code, resp = c.ehlo("x")
        c.mail("a@b.example")
        c.rcpt("u@mx.example.test")
        code, resp = c.data(b"Subject: s\r\n\r\nhi\r\n")
        assert code == 250 and resp.startswith(b"2.0.0 Ok: queued as "), resp
    assert r2.queued() == []


def test_size_param_reject_logged(smtpd):
    r = smtpd({"message_size_limit": "20000"})
    raw_session(r.port, [b"EHLO x\r\n", b"MAIL FROM:<a@b.example> SIZE=20001\r\n", b"QUIT\r\n"])
    r.wait_log(r"^NOQUEUE: reject: MAIL from unknown\[127\.0\.0\.1\]: 552 5\.3\.4 Message size "
               r"exceeds fixed limit; from=<a@b\.example> proto=ESMTP helo=<x>$")


def test_non_smtp_command_logged(smtpd):
    r = smtpd()
    out = raw_session(r.port, [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"])
    assert out.endswith(b"221 2.7.0 Error: I can break rules, too. Goodbye.\r\n")
    r.wait_log(r"^warning: non-SMTP command from unknown\[127\.0\.0\.1\]: GET / HTTP/1\.1$")
    r.wait_log(r"^disconnect from unknown\[127\.0\.0\.1\] unknown=0/1 commands=0/1$")


def _have_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _have_ipv6(), reason="no IPv6 loopback")
def test_ipv6_client(tmp_path):
    r = Running(tmp_path, {"mynetworks": "[::1]/128"}, family=socket.AF_INET6)
    try:
        with smtplib.SMTP("::1", r.port, timeout=WAIT) as c:
            c.ehlo("v6.example")
            assert c.sendmail("a@b.example", ["x@far.example"], b"Subject: v6\r\n\r\nhi\r\n") == {}
        content = r.store.open(r.queued()[0], "incoming").read_content().decode()
        assert content.startswith("Received: from v6.example (unknown [IPv6:::1])\n")
        r.wait_log(r"^connect from unknown\[::1\]$")
    finally:
        r.stop()


def test_half_close_still_answered(smtpd):
    r = smtpd()
    s = socket.create_connection(("127.0.0.1", r.port), timeout=WAIT)
    try:
        s.sendall(b"EHLO x\r\nMAIL FROM:<a@b.example>\r\nQUIT\r\n")
        s.shutdown(socket.SHUT_WR)
        data = b""
        while True:
            d = s.recv(4096)
            if not d:
                break
            data += d
    finally:
        s.close()
    assert data.endswith(b"250 2.1.0 Ok\r\n221 2.0.0 Bye\r\n"), data


class _BrokenPolicy:
    async def on_connect(self, state, where="CONNECT"):
        return None

    async def on_helo(self, state):
        return None

    async def on_mail(self, state):
        raise RuntimeError("table went away")


def test_policy_failure_defers(smtpd):
    r = smtpd(policy=_BrokenPolicy())
    out = raw_session(r.port, [b"EHLO x\r\n", b"MAIL FROM:<a@b.example>\r\n", b"QUIT\r\n"])
    assert b"451 4.3.5 Server configuration error\r\n" in out
    assert out.endswith(b"221 2.0.0 Bye\r\n")
