"""anvil(8) through running instances: the connection count is machine-wide
(whatever smtpd worker a connection lands on), the rate limits work, and the
replies and log lines match the reference Postfix."""

from __future__ import annotations

import re
import socket
import time

import pytest

import harness

COUNT = {
    "mynetworks": "192.0.2.0/24",          # 127.0.0.1 is a foreign client
    "smtpd_client_event_limit_exceptions": "",
    "smtpd_client_connection_count_limit": "3",
    "smtpd_timeout": "10s",
}
RATES = {
    "mynetworks": "192.0.2.0/24",
    "smtpd_client_event_limit_exceptions": "",
    "smtpd_client_connection_count_limit": "0",
    "smtpd_client_connection_rate_limit": "3",
    "smtpd_client_message_rate_limit": "1",
    "smtpd_client_recipient_rate_limit": "2",
    "smtpd_timeout": "10s",
    "anvil_status_update_time": "2s",
}
RCPT = f"alice@{harness.VIRTUAL_DOMAIN}"


def _pair(tmp_path_factory, params, name):
    reason = harness.reference_available()
    if reason:
        pytest.skip(reason)
    base = tmp_path_factory.mktemp(name)
    ref = harness.ReferencePostfix(base, params, name=f"{name}ref")
    pw = harness.PostwellInstance(base, params, name=f"{name}pw")
    return ref, pw


@pytest.fixture(scope="module")
def count_pair(tmp_path_factory):
    ref, pw = _pair(tmp_path_factory, COUNT, "anvilcount")
    try:
        ref.start()
        pw.start()
        yield ref, pw
    finally:
        for inst in (ref, pw):
            inst.stop()
            inst.cleanup()


def _anvil_lookup(pw, service: str, addr: str = "127.0.0.1") -> tuple[int, ...]:
    """Ask postwell's anvil directly (the test runs as root, the socket is 0600)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    try:
        s.connect(str(pw.queue_dir / "private" / "anvil"))
        s.sendall(f"lookup {service} {addr}\n".encode())
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(256)
            if not chunk:
                break
            buf += chunk
    finally:
        s.close()
    parts = buf.split()
    assert parts and parts[0] == b"ok", buf
    return tuple(int(x) for x in parts[1:])


def _service(inst) -> str:
    return f"127.0.0.1:{inst.port}"


def _wait_idle(pw, timeout=10.0):
    harness.wait_for(lambda: _anvil_lookup(pw, _service(pw))[0] == 0, timeout,
                     what="anvil connection count back to 0")


def _wait_disconnects(inst, n, timeout=10.0):
    harness.wait_for(lambda: inst.log_text().count(" disconnect from ") >= n, timeout,
                     what=f"{n} disconnect lines")


def _flood(port: int, n: int) -> tuple[list[str], list[socket.socket]]:
    """Open n connections, keep them open; the first line each one got."""
    socks, firsts = [], []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        socks.append(s)
        s.settimeout(5)
        buf = b""
        try:
            while b"\r\n" not in buf:
                chunk = s.recv(512)
                if not chunk:
                    break
                buf += chunk
        except OSError:
            pass
        firsts.append(buf.split(b"\r\n")[0].decode("latin-1"))
    return firsts, socks


def _close(socks):
    for s in socks:
        s.close()


def _smtpd_pid_of(inst, line_rx: str) -> list[int]:
    return [int(m) for m in re.findall(r"postfix/smtpd\[(\d+)\]: " + line_rx, inst.log_text())]


def _norm(text: str, inst) -> str:
    text = re.sub(r"^220 .*", "220 banner", text)     # mail_name differs by design
    return text.replace(str(inst.port), "PORT")


def test_anvil_runs_as_mail_owner_with_private_socket(count_pair):
    ref, pw = count_pair
    path = pw.queue_dir / "private" / "anvil"
    st = path.stat()
    assert oct(st.st_mode & 0o777) == "0o600"
    assert st.st_uid == pw.uid


def test_count_limit_is_machine_wide(count_pair):
    ref, pw = count_pair
    _wait_idle(pw)
    workers = set()
    rounds = 0
    # The kernel decides which worker accepts; repeat (bounded) until both of
    # the workers have taken part, checking the limit every time.
    while rounds < 6:
        rounds += 1
        before = len(_smtpd_pid_of(pw, "connect from "))
        firsts, socks = _flood(pw.port, 8)
        try:
            codes = [f[:3] for f in firsts]
            assert codes.count("220") == 3, firsts
            assert codes.count("421") == 5, firsts
            for f in firsts:
                if f.startswith("421"):
                    assert f == (f"421 4.7.0 {harness.HOSTNAME} Error: too many connections "
                                 "from 127.0.0.1"), f
            # The refused sessions' disconnects follow their 421s: 3 remain.
            harness.wait_for(lambda: _anvil_lookup(pw, _service(pw))[0] == 3, 10,
                             what="anvil count 3")
        finally:
            _close(socks)
        harness.wait_for(lambda: len(_smtpd_pid_of(pw, "connect from ")) >= before + 8, 10,
                         what="connect lines")
        workers |= set(_smtpd_pid_of(pw, "connect from ")[before:])
        _wait_idle(pw)
        if len(workers) > 1:
            break
    print(f"rounds {rounds}, workers that served: {sorted(workers)}")
    import os
    if (os.cpu_count() or 1) >= 2:      # one worker per core (docs/architecture.md)
        assert len(workers) > 1, "all connections landed on one worker every time"


def test_count_limit_reply_and_log_as_postfix(count_pair):
    ref, pw = count_pair
    _wait_idle(pw)
    results = {}
    for inst in (ref, pw):
        time.sleep(0.3)
        pattern = r"postfix/smtpd\[\d+\]: (warning: Connection concurrency limit .*)"
        before = len(re.findall(pattern, inst.log_text()))
        firsts, socks = _flood(inst.port, 5)
        _close(socks)
        # One warning per refused connection; the last may still be on its way.
        refused = sum("too many connections" in f for f in firsts)
        harness.wait_for(lambda: len(re.findall(pattern, inst.log_text())) - before >= refused,
                         10, what="one warning per refused connection")
        warns = re.findall(pattern, inst.log_text())
        results[inst.kind] = ([_norm(f, inst) for f in firsts],
                              [_norm(w, inst) for w in warns[-2:]])
    print(results)
    assert results["postwell"][0] == results["postfix"][0]
    assert results["postwell"][1] == results["postfix"][1]
    assert results["postfix"][1] == [
        "warning: Connection concurrency limit exceeded: 4 from unknown[127.0.0.1] "
        "for service 127.0.0.1:PORT",
        "warning: Connection concurrency limit exceeded: 4 from unknown[127.0.0.1] "
        "for service 127.0.0.1:PORT"]


def test_killed_worker_releases_its_connections(count_pair):
    """A worker that dies holding sessions must not leave counts in anvil."""
    ref, pw = count_pair
    time.sleep(1.2)    # a worker dying younger than 1 s would throttle the service
    _wait_idle(pw)
    firsts, socks = _flood(pw.port, 3)
    try:
        assert [f[:3] for f in firsts] == ["220"] * 3
        pids = set(_smtpd_pid_of(pw, "connect from ")[-3:])
        import os
        import signal
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        _wait_idle(pw)
    finally:
        _close(socks)
    # The master restarts the workers; the limit still holds at 3.
    harness.wait_banner(pw.port, 15)
    _wait_idle(pw)
    firsts, socks = _flood(pw.port, 4)
    _close(socks)
    assert [f[:3] for f in firsts] == ["220", "220", "220", "421"]


# ---------------------------------------------------------------- rates

@pytest.fixture(scope="module")
def rates_pair(tmp_path_factory):
    ref, pw = _pair(tmp_path_factory, RATES, "anvilrate")
    try:
        ref.start()
        pw.start()
        yield ref, pw
    finally:
        for inst in (ref, pw):
            inst.stop()
            inst.cleanup()


def _rate_dialogue(inst) -> list[str]:
    """Within one anvil time unit: one session with 2 MAILs and 3 RCPTs, then
    sessions until the connection rate runs out."""
    out = []
    r = harness.dialogue(inst.port, ["EHLO client.example.org", "MAIL FROM:<a@example.org>",
                                     f"RCPT TO:<{RCPT}>", f"RCPT TO:<{RCPT}>",
                                     f"RCPT TO:<{RCPT}>", "RSET", "MAIL FROM:<b@example.org>",
                                     "QUIT"], timeout=10)
    out += ["220 banner" if x.code == 220 else
            "250 ehlo" if x.code == 250 and "\n" in x.text else f"{x.code} {x.text}"
            for x in r]
    for _ in range(3):
        r = harness.dialogue(inst.port, ["QUIT"], timeout=10)
        out.append(f"{r[0].code} {r[0].text}" if r[0].code != 220 else "220 banner")
    return out


def test_rate_limits_as_postfix(rates_pair):
    ref, pw = rates_pair
    got = {}
    logs = {}
    for inst in (ref, pw):
        got[inst.kind] = _rate_dialogue(inst)
        _wait_disconnects(inst, 4)
        # Each refused connection logs its warning; the last may still be on its way.
        refused = sum("too many connections" in r for r in got[inst.kind])
        harness.wait_for(lambda: inst.log_text().count("Connection rate limit exceeded") >= refused,
                         10, what="one warning per refused connection")
        logs[inst.kind] = [_norm(w, inst) for w in re.findall(
            r"postfix/smtpd\[\d+\]: (warning: .*rate limit exceeded.*)", inst.log_text())]
    print(got, logs)
    assert got["postwell"] == got["postfix"]
    assert logs["postwell"] == logs["postfix"]
    host = harness.HOSTNAME
    assert got["postfix"] == [
        "220 banner", "250 ehlo", "250 2.1.0 Ok", "250 2.1.5 Ok", "250 2.1.5 Ok",
        "450 4.7.1 Error: too many recipients from 127.0.0.1", "250 2.0.0 Ok",
        "450 4.7.1 Error: too much mail from 127.0.0.1", "221 2.0.0 Bye",
        # start()'s banner probe was connection 1 of the time unit, the session above 2.
        "220 banner",
        f"421 4.7.0 {host} Error: too many connections from 127.0.0.1",
        f"421 4.7.0 {host} Error: too many connections from 127.0.0.1"]


def _statistics(inst) -> dict[str, int]:
    """The largest value of each anvil statistics line, time stamps and ports aside."""
    out: dict[str, int] = {}
    for m in re.finditer(r"postfix/anvil\[\d+\]: statistics: max ([a-z ]+?) (\d+)(/\d+s)? "
                         r"(?:for \((.*?)\) )?at [A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d$",
                         inst.log_text(), re.M):
        key = f"{m.group(1)}{m.group(3) or ''} {_norm(m.group(4) or '', inst)}"
        out[key] = max(out.get(key, 0), int(m.group(2)))
    return out


def test_statistics_log_as_postfix(rates_pair):
    """anvil_status_update_time = 2s: the periodic statistics lines match."""
    ref, pw = rates_pair
    for inst in (ref, pw):
        if not _smtpd_pid_of(inst, "disconnect from "):
            _rate_dialogue(inst)
    for inst in (ref, pw):
        harness.wait_for(lambda: _statistics(inst).get("connection rate/60s 127.0.0.1:PORT:127.0.0.1",
                                                       0) >= 5, 10, what="statistics lines")
    got, want = _statistics(pw), _statistics(ref)
    print(got, want)
    assert got == want
    assert want["message rate/60s 127.0.0.1:PORT:127.0.0.1"] == 2


# ---------------------------------------------------------------- new TLS sessions

@pytest.fixture(scope="module")
def tls_pair(tmp_path_factory):
    import shutil
    import subprocess
    if not shutil.which("openssl"):
        pytest.skip("openssl not installed")
    d = tmp_path_factory.mktemp("anviltlscert")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                    str(d / "key.pem"), "-out", str(d / "cert.pem"), "-days", "2",
                    "-subj", f"/CN={harness.HOSTNAME}"], check=True, capture_output=True,
                   timeout=60)
    harness.make_traversable(d)
    for f in ("key.pem", "cert.pem"):
        (d / f).chmod(0o644)
    params = {
        "mynetworks": "192.0.2.0/24",
        "smtpd_client_event_limit_exceptions": "",
        "smtpd_client_new_tls_session_rate_limit": "1",
        "smtpd_tls_security_level": "may",
        "smtpd_tls_loglevel": "1",
        "smtpd_tls_cert_file": str(d / "cert.pem"),
        "smtpd_tls_key_file": str(d / "key.pem"),
        "smtpd_timeout": "10s",
    }
    ref, pw = _pair(tmp_path_factory, params, "anviltls")
    try:
        ref.start()
        pw.start()
        yield ref, pw
    finally:
        for inst in (ref, pw):
            inst.stop()
            inst.cleanup()


def _tls_session(port: int) -> list[str]:
    """EHLO, STARTTLS, (handshake, EHLO, QUIT): the replies, "EOF" when cut."""
    import ssl
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    out = []
    f = sock.makefile("rb")

    def reply(stream):
        lines = []
        while True:
            line = stream.readline()
            if not line:
                return "EOF"
            lines.append(line.decode().rstrip("\r\n"))
            if line[3:4] == b" ":
                return lines[-1] if lines[0][:3] != "250" else "250 ehlo"
    try:
        reply(f)
        sock.sendall(b"EHLO client.example.org\r\n")
        out.append(reply(f))
        sock.sendall(b"STARTTLS\r\n")
        r = reply(f)
        out.append(r)
        if not r.startswith("220"):
            return out
        tls = ctx.wrap_socket(sock)
        tf = tls.makefile("rb")
        # Postfix may end the session right after the handshake (421 inside TLS).
        tls.sendall(b"EHLO client.example.org\r\n")
        r = reply(tf)
        out.append(r)
        if r.startswith("250"):
            tls.sendall(b"QUIT\r\n")
            out.append(reply(tf))
        tls.close()
    except (OSError, EOFError) as exc:
        out.append(f"error {exc.__class__.__name__}")
    finally:
        sock.close()
    return out


def test_new_tls_session_rate_as_postfix(tls_pair):
    ref, pw = tls_pair
    got, logs = {}, {}
    for inst in (ref, pw):
        got[inst.kind] = [_tls_session(inst.port) for _ in range(3)]
        _wait_disconnects(inst, 4)          # start()'s probe, then our 3
        logs[inst.kind] = [_norm(w, inst) for w in re.findall(
            r"postfix/smtpd\[\d+\]: (warning: .*(?:TLS session rate|STARTTLS request).*)",
            inst.log_text())]
    print(got, logs)
    assert got["postwell"] == got["postfix"]
    assert logs["postwell"] == logs["postfix"]
    ends = {inst.kind: re.findall(r"postfix/smtpd\[\d+\]: ((?:disconnect|lost connection) .*)",
                                  inst.log_text())[-4:] for inst in (ref, pw)}
    print(ends)
    # Sessions end in two workers: the order of their lines is the scheduler's.
    assert sorted(ends["postwell"]) == sorted(ends["postfix"])
    # The refused session's handshake is logged too, before the warning.
    tls = {inst.kind: re.findall(r"smtpd\[\d+\]: (\w+) TLS connection established|"
                                 r"(New TLS session rate)", inst.log_text()) for inst in (ref, pw)}
    assert [bool(a) for a, b in tls["postwell"]] == [bool(a) for a, b in tls["postfix"]]


# ---------------------------------------------------------------- restarts

def _anvil_pid(pw) -> int | None:
    """The running anvil: the master's child that holds private/anvil's
    listener (the master owns the name and starts anvil on demand)."""
    import os
    path = str(pw.queue_dir / "private" / "anvil")
    inodes = set()
    with open("/proc/net/unix") as f:
        for line in f:
            fields = line.split()
            # the name as bound (a temporary one renamed into place) and listening
            if len(fields) >= 8 and fields[-1].startswith(path) and fields[3] == "00010000":
                inodes.add(fields[6])
    master = pw.master_pid()
    for pid in pw.processes():
        if pid == master:
            continue
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:[") and link[8:-1] in inodes:
                return pid
    return None


def _limit_holds(pw):
    _wait_idle(pw)
    firsts, socks = _flood(pw.port, 6)
    _close(socks)
    assert [f[:3] for f in firsts] == ["220"] * 3 + ["421"] * 3, firsts


def _process_age(pid: int) -> float:
    import os
    with open(f"/proc/{pid}/stat", "rb") as f:
        start_ticks = int(f.read().rsplit(b")", 1)[1].split()[19])
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


def test_anvil_killed_is_restarted_and_limit_holds_again(count_pair):
    import os
    import signal
    ref, pw = count_pair
    _wait_idle(pw)   # a question to anvil starts it if it is not running (on demand)
    old = harness.wait_for(lambda: _anvil_pid(pw), 10, what="anvil")
    # A child that dies within the master's BAD_STARTUP_SECONDS of its start is
    # throttled (Postfix's "bad command startup"): kill an anvil that is older.
    harness.wait_for(lambda: _process_age(old) > 1.5, 10, what="anvil older than 1.5 s")
    os.kill(old, signal.SIGKILL)
    pw.wait_log(rf"postfix/master\[\d+\]: warning: process \S+/anvil pid {old} killed by signal 9")
    # While anvil was away the workers went on alone (never refusing for that);
    # after their retry pause their next question starts a new anvil.
    r = harness.dialogue(pw.port, ["QUIT"], timeout=10)
    assert r[0].code == 220
    time.sleep(1.5)
    _limit_holds(pw)
    assert _anvil_pid(pw) not in (None, old)


def test_limit_holds_after_reload(count_pair):
    ref, pw = count_pair
    _wait_idle(pw)
    old = harness.wait_for(lambda: _anvil_pid(pw), 10, what="anvil")
    pw.reload()
    harness.wait_for(lambda: not harness.pid_alive(old), 15, what="the old anvil gone")
    harness.wait_banner(pw.port, 15)
    time.sleep(1.5)
    _limit_holds(pw)   # the new workers' questions start the new anvil
    assert _anvil_pid(pw) not in (None, old)


# ---------------------------------------------------------------- AUTH

def test_auth_rate_as_postfix(tmp_path_factory):
    """smtpd_client_auth_rate_limit = 1: the second AUTH in the time unit is refused.
    Postfix uses Cyrus SASL (sasldb), postwell its own passwd file back end."""
    import os
    import subprocess
    if harness.reference_available():
        pytest.skip(harness.reference_available())
    if not os.path.exists("/usr/sbin/saslpasswd2"):
        pytest.skip("saslpasswd2 not installed")
    base = tmp_path_factory.mktemp("anvilauth")
    sasl = base / "sasl"
    sasl.mkdir()
    harness.make_traversable(sasl)
    db = sasl / "sasldb2"
    subprocess.run(["/usr/sbin/saslpasswd2", "-p", "-c", "-f", str(db), "-u", "example.org",
                    "alice"], input=b"secret", check=True, timeout=30, capture_output=True)
    os.chmod(db, 0o644)
    (sasl / "smtpd.conf").write_text(f"pwcheck_method: auxprop\nauxprop_plugin: sasldb\n"
                                     f"sasldb_path: {db}\nmech_list: PLAIN LOGIN\n")
    passwd = sasl / "pwfile"
    passwd.write_text("alice@example.org:{PLAIN}secret\n")
    os.chmod(passwd, 0o644)
    common = {"mynetworks": "192.0.2.0/24", "smtpd_client_event_limit_exceptions": "",
              "smtpd_client_auth_rate_limit": "1", "smtpd_sasl_auth_enable": "yes",
              "smtpd_timeout": "10s"}
    ref = harness.ReferencePostfix(base, {**common, "smtpd_sasl_type": "cyrus",
                                          "cyrus_sasl_config_path": str(sasl)}, name="authref")
    pw = harness.PostwellInstance(base, {**common, "smtpd_sasl_type": "postwell",
                                         "smtpd_sasl_path": str(passwd)}, name="authpw")
    bad = "AUTH PLAIN " + __import__("base64").b64encode(b"\0alice@example.org\0wrong").decode()
    try:
        got, logs = {}, {}
        for inst in (ref, pw):
            inst.start()
            r = harness.dialogue(inst.port, ["EHLO client.example.org", bad, bad, "QUIT"],
                                 timeout=15)
            # The first AUTH's own answer (535, or 454 when Cyrus cannot read its
            # sasldb) is the SASL back end's business: compare from the refused one on.
            got[inst.kind] = [f"{x.code} {x.text}" for x in r[3:]]
            _wait_disconnects(inst, 2)
            logs[inst.kind] = [_norm(w, inst) for w in re.findall(
                r"postfix/smtpd\[\d+\]: (warning: AUTH command rate .*)", inst.log_text())]
        print(got, logs)
        assert got["postwell"] == got["postfix"] == [
            "450 4.7.1 Error: too many AUTH commands from 127.0.0.1", "221 2.0.0 Bye"]
        assert logs["postwell"] == logs["postfix"] != []
    finally:
        for inst in (ref, pw):
            inst.stop()
            inst.cleanup()
