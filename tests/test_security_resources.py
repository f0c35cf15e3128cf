"""Resource exhaustion: idle floods, slow clients, huge lines, limits (DESIGN.md property 4).

Every limit is compared with the reference Postfix configured the same way;
memory is read from /proc (smaps_rollup PSS, VmHWM) of postwell's smtpd
processes.  The 10,000-connection version is soak/idle_connections.py.
"""

from __future__ import annotations

import resource
import selectors
import socket
import threading
import time

import pytest

import harness
from harness import VIRTUAL_DOMAIN as VD

pytestmark = pytest.mark.postfix

LIMITS = {
    "mynetworks": "192.0.2.0/24",          # 127.0.0.1 is a foreign client: no limit exceptions
    "smtpd_timeout": "3s",
    "smtpd_recipient_limit": "3",
    "smtpd_hard_error_limit": "3",
    "smtpd_soft_error_limit": "2",
    "smtpd_error_sleep_time": "0",
    "smtpd_client_connection_count_limit": "3",
}


def smtpd_pids(inst) -> list[int]:
    out = []
    for pid in inst.processes():
        try:
            with open(f"/proc/{pid}/status") as f:
                status = f.read()
        except OSError:
            continue
        # The workers run as mail_owner; the master and the local helper stay root.
        uid = int(status.split("\nUid:")[1].split()[0])
        if uid == inst.uid and pid != inst.master_pid():
            out.append(pid)
    return out


def status_kib(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def open_idle(port: int, n: int, timeout: float = 30.0) -> tuple[list[socket.socket], int]:
    """n connections that read their banner and then say nothing; (sockets, 220 count)."""
    socks, banners = [], 0
    sel = selectors.DefaultSelector()
    deadline = time.monotonic() + timeout
    for _ in range(n):
        s = socket.socket()
        s.settimeout(5)
        s.connect(("127.0.0.1", port))
        s.setblocking(False)
        socks.append(s)
        sel.register(s, selectors.EVENT_READ)
    pending = len(socks)
    while pending and time.monotonic() < deadline:
        for key, _ in sel.select(timeout=1.0):
            try:
                data = key.fileobj.recv(512)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if data.startswith(b"220"):
                banners += 1
            sel.unregister(key.fileobj)
            pending -= 1
    sel.close()
    return socks, banners


def _raise_nofile(want: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < want:
        target = want if hard == resource.RLIM_INFINITY else min(want, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < want:
        pytest.skip(f"RLIMIT_NOFILE below {want}")


@pytest.mark.timeout(90)
def test_1000_idle_connections_cost_little(postwell_factory):
    n = 1000
    _raise_nofile(n + 200)
    inst = postwell_factory({"smtpd_timeout": "60s"}, name="idle").start()
    pids = smtpd_pids(inst)
    assert pids
    before = harness.pss_kib(pids)
    t0 = time.monotonic()
    socks, banners = open_idle(inst.port, n)
    elapsed = time.monotonic() - t0
    try:
        time.sleep(0.5)
        after = harness.pss_kib(pids)
        per_conn = (after - before) / n
        print(f"{n} idle connections: banners {banners} in {elapsed:.1f}s, smtpd PSS "
              f"{before} KiB -> {after} KiB ({per_conn:.1f} KiB per connection)")
        assert banners == n
        assert per_conn < 48, f"{per_conn:.1f} KiB per idle connection"
        # The server still answers a new client promptly.
        r = harness.dialogue(inst.port, ["EHLO late.example.org", "QUIT"], timeout=10)
        assert [x.code for x in r] == [220, 250, 221]
    finally:
        for s in socks:
            s.close()


@pytest.fixture(scope="module")
def limits_pair(tmp_path_factory):
    reason = harness.reference_available()
    if reason:
        pytest.skip(reason)
    base = tmp_path_factory.mktemp("limits")
    ref = harness.ReferencePostfix(base, LIMITS, name="limitsref")
    pw = harness.PostwellInstance(base, LIMITS, name="limitspw")
    try:
        ref.start()
        pw.start()
        yield ref, pw
    finally:
        for inst in (ref, pw):
            inst.stop()
            inst.cleanup()


def _cut_off(port: int, trickle: bytes, per_byte: float, limit: float) -> tuple[float, bytes]:
    """Seconds until the server closed on us (``limit`` if it did not), and what it said."""
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        s.recv(4096)
        t0 = time.monotonic()
        got = b""
        i = 0
        while time.monotonic() - t0 < limit:
            if trickle:
                try:
                    s.send(trickle[i % len(trickle):i % len(trickle) + 1])
                except OSError:
                    return time.monotonic() - t0, got
                i += 1
            s.settimeout(per_byte)
            try:
                chunk = s.recv(4096)
                if not chunk:
                    return time.monotonic() - t0, got
                got += chunk
            except socket.timeout:
                pass
            except OSError:
                return time.monotonic() - t0, got
        return limit, got
    finally:
        s.close()


def _both(pair, fn):
    ref, pw = pair
    out = {}
    ts = [threading.Thread(target=lambda i=i: out.__setitem__(i.kind, fn(i)), daemon=True)
          for i in (ref, pw)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    return out["postfix"], out["postwell"]


@pytest.mark.timeout(60)
def test_silent_client_cut_off_at_smtpd_timeout(limits_pair):
    ref_t, pw_t = _both(limits_pair, lambda i: _cut_off(i.port, b"", 0.05, 10))
    print(f"silent client cut off: postfix {ref_t[0]:.2f}s, postwell {pw_t[0]:.2f}s")
    assert 2.5 <= pw_t[0] <= 5, pw_t
    assert pw_t[1] == b"421 4.4.2 mx.example.test Error: timeout exceeded\r\n"
    assert ref_t[1] == pw_t[1]


@pytest.mark.timeout(60)
def test_slowloris_cut_off_by_default(limits_pair):
    """postwell's default smtpd_per_record_deadline = yes (a documented difference: Postfix
    turns it on only under stress) bounds a whole request line by smtpd_timeout, so a byte
    per second is cut off; Postfix 3.7 with its default keeps such a session."""
    ref_t, pw_t = _both(limits_pair, lambda i: _cut_off(i.port, b"EHLO " + b"x" * 64, 1.0, 7))
    print(f"1 byte/s, default: postfix {ref_t[0]:.1f}s, postwell {pw_t[0]:.1f}s")
    assert ref_t[0] >= 7
    assert pw_t[0] < 5, f"postwell still connected after {pw_t[0]:.1f}s"
    assert pw_t[1] == b"421 4.4.2 mx.example.test Error: timeout exceeded\r\n"


@pytest.mark.timeout(60)
def test_slowloris_cut_off_with_per_record_deadline(tmp_path, reference_factory, postwell_factory):
    cfg = dict(LIMITS, smtpd_per_record_deadline="yes")
    pair = (reference_factory(cfg, name="prdref").start(),
            postwell_factory(cfg, name="prdpw").start())
    ref_t, pw_t = _both(pair, lambda i: _cut_off(i.port, b"EHLO " + b"x" * 64, 1.0, 8))
    print(f"1 byte/s, per-record deadline: postfix {ref_t[0]:.1f}s, postwell {pw_t[0]:.1f}s")
    assert ref_t[0] < 5
    assert pw_t[0] < 5, f"postwell still connected after {pw_t[0]:.1f}s"
    assert pw_t[1] == ref_t[1]


def _flood_line(port: int, size: int, tail: bytes = b"\r\n") -> list[str]:
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    try:
        s.recv(4096)
        s.sendall(b"EHLO big.example.org\r\n")
        time.sleep(0.2)
        s.recv(65536)
        block = b"x" * 65536
        sent = 0
        while sent < size:
            s.sendall(block)
            sent += len(block)
        s.sendall(tail + b"QUIT\r\n")
        s.settimeout(15)
        out = b""
        while b"\r\n221 " not in b"\r\n" + out:
            chunk = s.recv(65536)
            if not chunk:
                break
            out += chunk
        return [ln[:9] for ln in out.decode("latin-1").split("\r\n") if ln]
    finally:
        s.close()


@pytest.mark.timeout(120)
def test_20mb_line_without_crlf_memory_bounded(limits_pair):
    ref, pw = limits_pair
    pids = smtpd_pids(pw)
    hwm_before = {p: status_kib(p, "VmHWM") for p in pids}
    rss_before = max(status_kib(p, "VmRSS") for p in pids)
    got = _flood_line(pw.port, 20 * 1024 * 1024)
    hwm_after = {p: status_kib(p, "VmHWM") for p in pids}
    growth = max(hwm_after[p] - hwm_before[p] for p in pids)
    print(f"20 MB line: smtpd RSS before {rss_before} KiB, peak growth {growth} KiB; replies {got}")
    assert growth < 16 * 1024, f"smtpd peak RSS grew {growth} KiB on a 20 MB line"
    want = _flood_line(ref.port, 20 * 1024 * 1024)
    assert got == want


@pytest.mark.parametrize("line", [
    "MAIL FROM:<" + "a" * 5000 + "@example.org>",
    f"RCPT TO:<{'b' * 3000}@{VD}>",
    "HELO " + "h" * 4000,
    "NOOP " + "n" * 100000,
])
def test_overlong_command_lines_answered_as_postfix(limits_pair, line):
    ref, pw = limits_pair
    lines = ["EHLO long.example.org", "MAIL FROM:<s@example.org>" if line.startswith("RCPT") else
             "NOOP", line, "QUIT"]
    want = harness.dialogue(ref.port, lines)
    got = harness.dialogue(pw.port, lines)
    assert harness.normalise(got) == harness.normalise(want), (
        f"postfix {[str(r)[:80] for r in want]}\npostwell {[str(r)[:80] for r in got]}")


def test_too_many_recipients(limits_pair):
    ref, pw = limits_pair
    lines = ["EHLO many.example.org", "MAIL FROM:<s@example.org>"] + \
        [f"RCPT TO:<{u}@{VD}>" for u in ("alice", "bob", "carol", "sink", "alice")] + ["QUIT"]
    want = harness.dialogue(ref.port, lines)
    got = harness.dialogue(pw.port, lines)
    assert harness.normalise(got) == harness.normalise(want)
    assert (got[6].code, got[6].enhanced) == (452, "4.5.3"), str(got[6])
    assert got[6].text == "4.5.3 Error: too many recipients"


def test_too_many_errors(limits_pair):
    ref, pw = limits_pair
    lines = ["EHLO err.example.org"] + ["BOGUS"] * 6 + ["QUIT"]
    want = harness.dialogue(ref.port, lines)
    got = harness.dialogue(pw.port, lines)
    assert harness.normalise(got) == harness.normalise(want), (
        f"postfix {[str(r) for r in want]}\npostwell {[str(r) for r in got]}")
    assert got[-1].code == 421


def _flood(port: int, n: int) -> list[int]:
    socks, codes = [], []
    try:
        for _ in range(n):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            socks.append(s)
            s.settimeout(5)
            try:
                codes.append(int(s.recv(512)[:3] or 0))
            except (OSError, ValueError):
                codes.append(0)
    finally:
        for s in socks:
            s.close()
    return codes


def test_connection_flood_from_one_ip(limits_pair):
    ref, pw = limits_pair
    time.sleep(0.5)    # sessions of earlier tests have gone (anvil counts them)
    want = _flood(ref.port, 8)
    got = _flood(pw.port, 8)
    print(f"8 connections, limit 3: postfix {want}, postwell {got}")
    assert want.count(220) == 3
    assert got.count(421) >= 1, got
    # The limit is counted per smtpd process in postwell (documented): with N workers
    # a client may hold up to N times the limit, never more.
    workers = len(smtpd_pids(pw)) or 1
    assert 3 <= got.count(220) <= 3 * workers, got


def test_connection_flood_limit_machine_wide_as_postfix(limits_pair):
    ref, pw = limits_pair
    time.sleep(0.5)
    assert _flood(pw.port, 8) == _flood(ref.port, 8)


@pytest.mark.timeout(120)
def test_100mb_message_streams_with_bounded_memory(postwell_factory):
    """DESIGN.md property 4: a 100 MB message goes to disk in pieces; neither the
    smtpd nor the qmgr (which delivers it) holds it in memory."""
    size = 100 * 1024 * 1024
    inst = postwell_factory({"message_size_limit": str(size + 10 * 1024 * 1024),
                             "virtual_mailbox_limit": "0"}, name="bigmsg").start()
    pids = smtpd_pids(inst)
    hwm_before = {p: status_kib(p, "VmHWM") for p in pids}
    line = b"y" * 998 + b"\r\n"
    s = socket.create_connection(("127.0.0.1", inst.port), timeout=60)
    try:
        s.recv(4096)
        s.sendall(b"EHLO big.example.org\r\nMAIL FROM:<s@example.org>\r\n"
                  b"RCPT TO:<alice@" + VD.encode() + b">\r\nDATA\r\n")
        buf = b""
        while b"354 " not in buf:
            chunk = s.recv(4096)
            assert chunk, buf
            buf += chunk
        s.sendall(b"Subject: big\r\n\r\n")
        block = line * 1024
        blocks = size // len(block)
        for _ in range(blocks):
            s.sendall(block)
        s.sendall(b".\r\nQUIT\r\n")
        buf = b""
        s.settimeout(60)
        while b"221 " not in buf:
            chunk = s.recv(4096)
            if not chunk:
                break
            buf += chunk
    finally:
        s.close()
    assert b"250 2.0.0 Ok: queued as" in buf, buf
    [path] = inst.wait_maildir("alice", 1, timeout=90)
    # Maildir files have LF line ends: one byte less per line than sent.
    assert path.stat().st_size >= blocks * 1024 * (len(line) - 1)
    growth = {p: status_kib(p, "VmHWM") - hwm_before[p] for p in pids}
    print(f"100 MB message: peak RSS growth per mail_owner process {growth} KiB")
    assert max(growth.values()) < 32 * 1024, growth
