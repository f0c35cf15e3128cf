#!/usr/bin/env python3
"""Soak run (issue 7): mixed traffic against one postwell for a fixed time.

One postwell instance with virtual mailboxes and three SMTP relay
destinations (transport_maps), each a local /usr/sbin/smtp-sink:

    ok.test     -> sink that accepts everything        (status=sent)
    soft.test   -> sink that answers RCPT with 4xx     (status=deferred, later bounced)
    hard.test   -> sink that answers RCPT with 5xx     (status=bounced)

Traffic, bounded in rate and time, picked at random (``--seed``): smtp-source
batches, smtplib single- and multi-recipient sessions, pipelined raw sessions
(RFC 2920), occasional 1-5 MB messages, rejected recipients, relay attempts
from a client outside mynetworks (127.0.0.2), aborted sessions (RSET, drop
after RCPT, drop mid-DATA), idle connections that the server times out,
``sendmail`` submissions and ``postqueue -p`` / ``postqueue -f`` runs.

Every ``--interval`` seconds each process of the instance is sampled (RSS and
PSS from /proc/PID/smaps_rollup, open fds, threads) and grouped by role.  At
the end: a table per role (first/last/max, least-squares slope after warm-up),
message counts from the log, and every warning/error/fatal/panic log line
grouped by text, marked expected or unexpected.  Exit status 1 when RSS grows
faster than ``--max-rss-slope`` KiB/min after warm-up, a long-lived process
holds more fds when quiet at the end than when quiet after warm-up, or an
unexpected log line appears.

    python soak/mixed.py --minutes 30          # the issue-7 soak
    python soak/mixed.py --quick               # ~20 s smoke form (tests/test_soak_smoke.py)

Loopback only; every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import shutil
import smtplib
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import harness  # noqa: E402

VD = harness.VIRTUAL_DOMAIN
SENDERS = (f"alice@{VD}", f"bob@{VD}")          # local senders: bounces stay on the machine
FOREIGN_ADDR = "127.0.0.2"                       # loopback, but outside mynetworks
OUT_MASTER = ("smtp      unix  -       -       n       -       -       smtp\n"
              "relay     unix  -       -       n       -       -       smtp\n"
              "pickup    unix  n       -       n       60      1       pickup\n"
              "retry     unix  -       -       n       -       -       error\n")

# Log lines that the traffic provokes on purpose.  Anything else with
# warning:/error:/fatal:/panic: counts as unexpected.
EXPECTED = [
    (re.compile(r"timeout after"), "idle clients timed out"),
    (re.compile(r"lost connection after"), "sessions dropped on purpose"),
    (re.compile(r"Relay access denied"), "relay attempts from 127.0.0.2"),
    (re.compile(r"User unknown"), "rejected recipients"),
    (re.compile(r"hostname .* does not resolve|address not listed for hostname"),
     "smtpd_peername_lookup / loopback names"),
    (re.compile(r"soft\.test|hard\.test"), "4xx/5xx sinks"),
]
ALARM_RE = re.compile(r"\b(warning|error|fatal|panic):")
QID = r"[0-9A-Za-z]+"


# ------------------------------------------------------------------ sampling

def _socket_names(queue_dir: Path, port: int) -> dict[str, str]:
    """Listening socket inode -> service name: queue_dir/private/X, public/X, the SMTP port.

    postwell's children are forked from the master without a new argv, so a
    child is known by the listening socket of its master.cf service it keeps.
    """
    names: dict[str, str] = {}
    prefix = str(queue_dir) + "/"
    with contextlib.suppress(OSError):
        with open("/proc/net/unix") as f:
            next(f)
            for line in f:
                parts = line.split()
                if len(parts) >= 8 and parts[7].startswith(prefix):
                    # private/anvil.PID style names: the service is the part before the dot
                    names[parts[6]] = Path(parts[7]).name.split(".")[0]
    want = f":{port:04X}"
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            with open(table) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    # state 0A = LISTEN
                    if len(parts) >= 10 and parts[1].endswith(want) and parts[3] == "0A":
                        names[parts[9]] = "smtpd"
    return names


def role_of(pid: int, master_pid: int | None, sockets: dict[str, str],
            log_roles: dict[int, str]) -> str | None:
    if pid == master_pid:
        return "master"
    found = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    name = sockets.get(link[8:-1])
                    if name:
                        found.add(name)
    if len(found) == 1:
        return found.pop()
    if found:
        return "+".join(sorted(found))
    return log_roles.get(pid)


def parent_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode("latin-1")
        return int(stat[stat.rfind(")") + 2:].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def proc_stats(pid: int) -> dict | None:
    out = {"rss": 0, "pss": 0, "fds": 0, "threads": 0}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Rss:"):
                    out["rss"] = int(line.split()[1])
                elif line.startswith("Pss:"):
                    out["pss"] = int(line.split()[1])
        out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Threads:"):
                    out["threads"] = int(line.split()[1])
    except OSError:
        return None
    return out


def resting_levels(samples: list[dict], warm_min: float) -> dict:
    """Per pid, the sample with the fewest fds after warm-up: the samples are
    taken under load, so the minimum is the nearest to a resting level."""
    base: dict = {}
    for s in samples:
        if s["t"] < warm_min:
            continue
        for pid, st in s["pids"].items():
            cur = base.get(pid)
            if cur is None or st["fds"] < cur["fds"]:
                base[pid] = dict(st)
    return base


def at_rest(now: dict, base: dict, slack: int) -> bool:
    """No long-lived process holds more fds than at its resting level."""
    return all(st["fds"] - base[pid]["fds"] <= slack
               for pid, st in now.items() if pid in base)


class Sampler:
    def __init__(self, inst, log_roles: dict[int, str]) -> None:
        self.inst = inst
        self.log_roles = log_roles
        self.samples: list[dict] = []      # {"t": minutes, "roles": {role: {...}}, "pids": {...}}
        self.roles_seen: dict[int, str] = {}
        self.t0 = time.monotonic()

    def snapshot(self) -> dict:
        master = self.inst.master_pid()
        pids = self.inst.processes()
        per_pid = {}
        sockets = _socket_names(self.inst.queue_dir, self.inst.port)
        for pid in pids:
            st = proc_stats(pid)
            if st is None:
                continue
            role = self.roles_seen.get(pid) or role_of(pid, master, sockets, self.log_roles)
            if role:
                self.roles_seen[pid] = role
            else:
                # A helper's per-delivery child (forked, short-lived): named after its parent.
                parent = self.roles_seen.get(parent_of(pid) or -1)
                role = f"{parent}-child" if parent and parent != "master" else "?"
            st["role"] = role
            per_pid[pid] = st
        return {"t": (time.monotonic() - self.t0) / 60.0, "roles": self.group(per_pid),
                "pids": per_pid}

    @staticmethod
    def group(per_pid: dict) -> dict:
        roles: dict[str, dict] = {}
        for pid, st in per_pid.items():
            r = roles.setdefault(st["role"], {"n": 0, "rss": 0, "pss": 0, "fds": 0,
                                              "threads": 0, "rss_max1": 0, "fds_max1": 0})
            r["n"] += 1
            for k in ("rss", "pss", "fds", "threads"):
                r[k] += st[k]
            r["rss_max1"] = max(r["rss_max1"], st["rss"])
            r["fds_max1"] = max(r["fds_max1"], st["fds"])
        return roles

    def regroup(self) -> None:
        """Relabel early samples: a process that was still starting when first
        seen (no socket, no log line yet) got its role later."""
        for s in self.samples:
            for pid, st in s["pids"].items():
                st["role"] = self.roles_seen.get(pid, st["role"])
            s["roles"] = self.group(s["pids"])

    def sample(self) -> dict:
        s = self.snapshot()
        self.samples.append(s)
        return s


def fd_summary(pid: int) -> str:
    """What a process holds open, grouped (socket kinds, files), for a leak report."""
    kinds: Counter = Counter()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                kinds[re.sub(r"\[\d+\]", "", link)] += 1
    return ", ".join(f"{k} x{n}" for k, n in kinds.most_common(12)) or "?"


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (x, y) points; 0 with fewer than 3."""
    if len(points) < 3:
        return 0.0
    n = len(points)
    mx = sum(p[0] for p in points) / n
    my = sum(p[1] for p in points) / n
    sxx = sum((p[0] - mx) ** 2 for p in points)
    if sxx == 0:
        return 0.0
    return sum((p[0] - mx) * (p[1] - my) for p in points) / sxx


# ------------------------------------------------------------------ traffic

class Traffic:
    """The client side: one action at a time per worker, rate-bounded."""

    def __init__(self, inst, rng: random.Random, quick: bool, smtpd_timeout: int) -> None:
        self.inst, self.rng, self.quick = inst, rng, quick
        self.smtpd_timeout = smtpd_timeout
        self.port = inst.port
        self.stats: Counter = Counter()
        self.client_errors: Counter = Counter()
        self.lock = threading.Lock()
        self.seq = 0
        self.last_big = 0.0

    def note(self, key: str, n: int = 1) -> None:
        with self.lock:
            self.stats[key] += n

    def fail(self, what: str, exc) -> None:
        with self.lock:
            self.client_errors[f"{what}: {type(exc).__name__}: {str(exc)[:120]}"] += 1

    def next_id(self) -> str:
        with self.lock:
            self.seq += 1
            return f"soak{self.seq}"

    # --- individual actions (each bounded by socket/subprocess timeouts)
    def smtp_source_batch(self) -> None:
        dest = self.rng.choice([f"sink@{VD}", "sink@ok.test"])
        extra = ["-c"]
        if dest.endswith("ok.test") and self.rng.random() < 0.5:
            extra += ["-r", str(self.rng.randint(2, 5))]   # 1sink@ok.test, 2sink@ok.test...
        n = self.rng.randint(3, 10)
        res = harness.smtp_source(self.port, sessions=2, messages=n,
                                  size=self.rng.choice([300, 2000, 20000]), extra=extra,
                                  sender=self.rng.choice(SENDERS), recipient=dest, timeout=60)
        if res.ok:
            self.note("smtp-source messages", n)
        else:
            self.fail("smtp-source", RuntimeError(f"rc={res.returncode} {res.stderr.strip()[:100]}"))

    def smtplib_send(self, rcpts: list[str], size: int = 800, expect_refused: int = 0) -> None:
        tid = self.next_id()
        msg = harness.make_message(tid, size, sender=SENDERS[0], recipient=rcpts[0])
        try:
            with smtplib.SMTP("127.0.0.1", self.port, timeout=60) as s:
                s.ehlo("client.example.test")
                refused = s.sendmail(self.rng.choice(SENDERS), rcpts, msg)
            if len(refused) != expect_refused:
                self.fail("smtplib", RuntimeError(f"refused {sorted(refused)}"))
            self.note("smtplib messages")
        except smtplib.SMTPRecipientsRefused as e:
            if expect_refused < len(rcpts):
                self.fail("smtplib", e)
        except (OSError, smtplib.SMTPException) as e:
            self.fail("smtplib", e)

    def single(self) -> None:
        self.smtplib_send([f"{self.rng.choice(harness.MAILBOX_USERS)}@{VD}"])

    def multi(self) -> None:
        rcpts = [f"alice@{VD}", f"bob@{VD}", "x@ok.test"]
        extra = self.rng.sample(["y@soft.test", "z@hard.test", f"carol@{VD}"], 2)
        rcpts += extra
        bad = 0
        if self.rng.random() < 0.5:
            rcpts.append(f"nobody{self.rng.randint(1, 9)}@{VD}")   # 550 5.1.1 user unknown
            bad = 1
        self.rng.shuffle(rcpts)
        self.smtplib_send(rcpts, size=self.rng.choice([500, 5000]), expect_refused=bad)

    def big(self) -> None:
        size = self.rng.randint(1, 5) * 1024 * 1024 - 4096
        self.smtplib_send([f"carol@{VD}"], size=size)
        self.note("big messages")

    def raw(self, lines: list[bytes], src: str | None = None, wait_close: float = 0.0) -> bytes:
        """Send raw bytes groups, reading what comes back; bounded by timeouts."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.settimeout(20)
        got = b""
        try:
            if src:
                sock.bind((src, 0))
            sock.connect(("127.0.0.1", self.port))
            got += sock.recv(4096)
            for chunk in lines:
                sock.sendall(chunk)
                time.sleep(0.05)
                with contextlib.suppress(socket.timeout):
                    sock.settimeout(2)
                    got += sock.recv(65536)
            if wait_close:
                sock.settimeout(wait_close)
                end = time.monotonic() + wait_close
                while time.monotonic() < end:
                    data = sock.recv(4096)
                    if not data:
                        break
                    got += data
        except OSError as e:
            if not isinstance(e, socket.timeout):
                self.fail("raw", e)
        finally:
            sock.close()
        return got

    def pipelined(self) -> None:
        tid = self.next_id()
        body = harness.make_message(tid, 1500, recipient=f"bob@{VD}")
        body = body.replace(b"\r\n.", b"\r\n..")
        # RFC 2920: MAIL, RCPTs and DATA in one write; the message after the 354.
        head = (b"EHLO pipe.example.test\r\nMAIL FROM:<alice@virtual.test>\r\n"
                b"RCPT TO:<bob@virtual.test>\r\nRCPT TO:<nobody@virtual.test>\r\n"
                b"RCPT TO:<x@ok.test>\r\nDATA\r\n")
        got = self.raw([head, body + b".\r\n", b"QUIT\r\n"])
        if b"250 2.0.0" in got:
            self.note("pipelined messages")
        else:
            self.fail("pipelined", RuntimeError(got[-200:].decode("latin-1")))

    def relay_denied(self) -> None:
        # RFC 5321 3.6.2: an open relay is what this must not be; 127.0.0.2 is
        # outside mynetworks so a non-local recipient is refused.
        got = self.raw([b"EHLO foreign.example.test\r\n", b"MAIL FROM:<spam@foreign.test>\r\n",
                        b"RCPT TO:<victim@elsewhere.test>\r\n", b"RCPT TO:<x@ok.test>\r\n",
                        b"QUIT\r\n"], src=FOREIGN_ADDR)
        if b"Relay access denied" in got:
            self.note("relay denied sessions")
        elif got:
            self.fail("relay-denied", RuntimeError("no relay denial: " + got[-200:].decode("latin-1")))

    def aborted(self) -> None:
        kind = self.rng.choice(["rset", "drop-rcpt", "drop-data", "quit-in-data"])
        pre = [b"EHLO abort.example.test\r\n", b"MAIL FROM:<alice@virtual.test>\r\n",
               b"RCPT TO:<bob@virtual.test>\r\n"]
        if kind == "rset":
            self.raw(pre + [b"RSET\r\n", b"QUIT\r\n"])
        elif kind == "drop-rcpt":
            self.raw(pre)
        elif kind == "drop-data":
            self.raw(pre + [b"DATA\r\n", b"Subject: cut\r\n\r\nhalf a mess"])
        else:
            # QUIT inside DATA is message text; then the connection drops.
            self.raw(pre + [b"DATA\r\n", b"Subject: q\r\n\r\nline\r\nQUIT\r\n"])
        self.note(f"aborted ({kind})")

    def idle(self) -> None:
        """Connect, read the banner, say nothing: the server must time us out."""
        got = self.raw([], wait_close=self.smtpd_timeout + 15)
        self.note("idle connections")
        if b"421" not in got:
            self.fail("idle", RuntimeError("no 421 timeout reply: " + got[-120:].decode("latin-1")))

    def sendmail(self) -> None:
        tid = self.next_id()
        msg = (f"From: alice@{VD}\nTo: bob@{VD}\nSubject: sendmail {tid}\n\nbody {tid}\n"
               ".\nmore\n")
        try:
            cp = self.inst.run("sendmail", "-i", "-f", f"alice@{VD}", f"bob@{VD}", "x@ok.test",
                               input=msg, timeout=60)
            if cp.returncode == 0:
                self.note("sendmail submissions")
            else:
                self.fail("sendmail", RuntimeError(f"rc={cp.returncode} {cp.stderr.strip()[:100]}"))
        except subprocess.TimeoutExpired as e:
            self.fail("sendmail", e)

    def postqueue(self) -> None:
        flag = self.rng.choice(["-p", "-f"])
        try:
            cp = self.inst.run("postqueue", flag, timeout=60)
            if cp.returncode == 0:
                self.note(f"postqueue {flag}")
            else:
                self.fail(f"postqueue {flag}",
                          RuntimeError(f"rc={cp.returncode} {cp.stderr.strip()[:100]}"))
        except subprocess.TimeoutExpired as e:
            self.fail(f"postqueue {flag}", e)

    ACTIONS = [("smtp_source_batch", 12), ("single", 20), ("multi", 14), ("pipelined", 10),
               ("relay_denied", 6), ("aborted", 10), ("sendmail", 6), ("postqueue", 4)]

    def pick(self) -> str:
        if time.monotonic() - self.last_big > (15 if self.quick else 60) and self.rng.random() < 0.3:
            self.last_big = time.monotonic()
            return "big"
        names, weights = zip(*self.ACTIONS)
        return self.rng.choices(names, weights)[0]

    def run(self, stop: threading.Event, pace: float) -> None:
        """A worker: actions until ``stop``, at most one per ``pace`` seconds."""
        while not stop.is_set():
            t = time.monotonic()
            name = self.pick()
            try:
                getattr(self, name)()
            except Exception as e:   # a client bug must not end the soak silently
                self.fail(name, e)
            self.note("actions")
            stop.wait(max(0.0, pace - (time.monotonic() - t)) + self.rng.random() * pace)

    def idler(self, stop: threading.Event, every: float) -> None:
        while not stop.is_set():
            self.idle()
            stop.wait(every)


# ------------------------------------------------------------------ log

class LogReader:
    def __init__(self, path: Path) -> None:
        self.path, self.offset = path, 0
        self.alarms: Counter = Counter()
        self.counts: Counter = Counter()
        self.accepted: set[str] = set()
        self.roles: dict[int, str] = {}     # pid -> service name from "postfix/NAME[PID]:"

    def poll(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return
        cut = data.rfind(b"\n") + 1
        self.offset += cut
        for raw in data[:cut].decode("utf-8", "replace").splitlines():
            self.line(raw)

    def line(self, ln: str) -> None:
        m = re.search(r" [\w.-]+/([\w-]+)\[(\d+)\]:", ln)
        if m:
            self.roles.setdefault(int(m.group(2)), m.group(1))
        m = re.search(rf"/cleanup\[\d+\]: ({QID}): message-id=", ln)
        if m:
            self.accepted.add(m.group(1))
        m = re.search(r"status=(sent|deferred|bounced|expired)", ln)
        if m:
            self.counts[m.group(1)] += 1
        if re.search(r"NOQUEUE: reject: RCPT", ln):
            self.counts["rejected rcpt"] += 1
        if "removed" in ln and re.search(rf"/qmgr\[\d+\]: {QID}: removed", ln):
            self.counts["removed"] += 1
        m = ALARM_RE.search(ln)
        if m:
            text = ln[m.start():]
            # Group by text: queue ids, pids, ports and numbers vary.
            text = re.sub(r"\[\d+\]", "[N]", text)
            text = re.sub(r"\b[0-9A-F]{6,}\b", "QID", text)
            text = re.sub(r"\d+", "N", text)
            self.alarms[text[:220]] += 1


def classify(text: str) -> str | None:
    for rx, why in EXPECTED:
        if rx.search(text):
            return why
    return None


# ------------------------------------------------------------------ run

def build_instance(base: Path, sinks: dict, smtpd_timeout: int):
    transport = "".join(f"{dom} smtp:[127.0.0.1]:{sink.port}\n" for dom, sink in sinks.items())
    main_cf = {
        "mynetworks": "127.0.0.1/32",
        "transport_maps": "texthash:$config_directory/transport",
        "smtpd_timeout": f"{smtpd_timeout}s",
        # Anything without a transport entry bounces here instead of leaving the machine.
        "default_transport": "error:soak run delivers nowhere else",
        "maximal_queue_lifetime": "2m",
        "bounce_queue_lifetime": "2m",
        "queue_run_delay": "10s",
        "minimal_backoff_time": "10s",
        "maximal_backoff_time": "30s",
        "default_process_limit": "50",
        "message_size_limit": "10240000",
    }
    inst = harness.PostwellInstance(base, main_cf, name="soak")
    inst.master_cf = inst.default_master_cf() + OUT_MASTER
    inst.write_config()
    (inst.config_dir / "transport").write_text(transport)
    return inst


def prune_maildirs(inst) -> int:
    """Delete delivered Maildir files (counted) so a long run's disk use stays flat."""
    n = 0
    for user in harness.MAILBOX_USERS:
        for p in inst.maildir_messages(user):
            with contextlib.suppress(OSError):
                p.unlink()
                n += 1
    return n


def report(args, sampler: Sampler, log: LogReader, traffic: Traffic, warm_min: float,
           quiet_base: dict, quiet_end: dict, delivered_files: int, elapsed: float) -> tuple[str, dict, list[str]]:
    lines: list[str] = []
    failures: list[str] = []
    data: dict = {"minutes": round(elapsed / 60, 2), "seed": args.seed, "roles": {}}
    roles = sorted({r for s in sampler.samples for r in s["roles"]})
    lines.append(f"soak: {elapsed / 60:.1f} min, {len(sampler.samples)} samples, "
                 f"warm-up {warm_min:.1f} min, seed {args.seed}")
    lines.append("")
    hdr = (f"{'role':<9} {'procs':>5} {'RSS KiB first/last/max':>26} {'PSS KiB first/last/max':>26} "
           f"{'RSS slope':>10} {'fds f/l/max':>12} {'fd slope':>9} {'thr max':>7}")
    lines.append(hdr + "   (per process: largest of the role; slopes per minute after warm-up)")
    lines.append("-" * len(hdr))
    for role in roles:
        ser = [(s["t"], s["roles"][role]) for s in sampler.samples if role in s["roles"]]
        # The largest process of the role: a per-process figure that does not
        # jump when the master starts or retires a worker.
        rss = [(t, r["rss_max1"]) for t, r in ser]
        pss = [(t, r["pss"] // max(1, r["n"])) for t, r in ser]
        fds = [(t, r["fds_max1"]) for t, r in ser]
        after = [p for p in rss if p[0] >= warm_min]
        fd_after = [p for p in fds if p[0] >= warm_min]
        rs, fs = slope(after), slope(fd_after)
        nmax = max(r["n"] for _, r in ser)
        thr = max(r["threads"] // max(1, r["n"]) for _, r in ser)
        lines.append(f"{role:<9} {nmax:>5} {rss[0][1]:>8}/{rss[-1][1]:>8}/{max(v for _, v in rss):>8} "
                     f"{pss[0][1]:>8}/{pss[-1][1]:>8}/{max(v for _, v in pss):>8} "
                     f"{rs:>+10.1f} {fds[0][1]:>3}/{fds[-1][1]:>3}/{max(v for _, v in fds):>4} "
                     f"{fs:>+9.2f} {thr:>7}")
        data["roles"][role] = {"procs_max": nmax, "rss_first": rss[0][1], "rss_last": rss[-1][1],
                               "rss_max": max(v for _, v in rss), "pss_first": pss[0][1],
                               "pss_last": pss[-1][1], "rss_slope_kib_min": round(rs, 1),
                               "fds_first": fds[0][1], "fds_last": fds[-1][1],
                               "fds_max": max(v for _, v in fds), "fd_slope_per_min": round(fs, 3),
                               "threads_max": thr, "samples": len(ser)}
        span = (after[-1][0] - after[0][0]) if len(after) >= 2 else 0
        if len(after) >= 5 and span >= 1.0 and rs > args.max_rss_slope:
            failures.append(f"{role}: RSS slope {rs:+.1f} KiB/min after warm-up "
                            f"(limit {args.max_rss_slope})")
    # Long-lived processes: fds at rest, after warm-up against the end.
    lines.append("")
    lines.append("fds at rest (long-lived processes, after warm-up -> end):")
    for pid, st in sorted(quiet_end.items()):
        b = quiet_base.get(pid)
        if not b:
            continue
        grew = st["fds"] - b["fds"]
        mark = "" if grew <= args.fd_slack else "   <-- grew"
        lines.append(f"  {st['role']:<9} pid {pid:<7} fds {b['fds']:>4} -> {st['fds']:>4}   "
                     f"RSS {b['rss']:>7} -> {st['rss']:>7} KiB{mark}")
        if grew > args.fd_slack:
            failures.append(f"{st['role']} pid {pid}: {b['fds']} -> {st['fds']} fds at rest")
            lines.append("      open now: " + fd_summary(pid))
    lines.append("")
    c = log.counts
    counts = {"accepted (cleanup message-id)": len(log.accepted), "delivered (status=sent)": c["sent"],
              "deferred (status=deferred)": c["deferred"], "bounced (status=bounced)": c["bounced"],
              "expired": c["expired"], "RCPT rejected (NOQUEUE)": c["rejected rcpt"],
              "removed from queue": c["removed"], "Maildir files delivered": delivered_files,
              "left in queue": len(sampler.inst.queue_files())}
    lines.append("messages: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    lines.append("client actions: " + ", ".join(f"{k} {v}" for k, v in sorted(traffic.stats.items())))
    data["counts"] = counts
    data["client"] = dict(traffic.stats)
    lines.append("")
    lines.append("log warnings/errors (grouped):")
    data["log"] = []
    if not log.alarms:
        lines.append("  none")
    for text, n in log.alarms.most_common():
        why = classify(text)
        tag = f"expected: {why}" if why else "UNEXPECTED"
        lines.append(f"  {n:>6}  [{tag}]  {text}")
        data["log"].append({"count": n, "text": text, "expected": bool(why)})
        if not why:
            failures.append(f"unexpected log line x{n}: {text[:120]}")
    if traffic.client_errors:
        lines.append("")
        lines.append("client-side surprises (informational; the machine is shared):")
        for text, n in traffic.client_errors.most_common(20):
            lines.append(f"  {n:>6}  {text}")
        data["client_errors"] = dict(traffic.client_errors)
    data["failures"] = failures
    return "\n".join(lines), data, failures


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=30.0, help="traffic duration (default 30)")
    ap.add_argument("--quick", action="store_true", help="~20 s smoke form")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    ap.add_argument("--interval", type=float, default=None, help="seconds between samples")
    ap.add_argument("--workers", type=int, default=3, help="concurrent client workers")
    ap.add_argument("--pace", type=float, default=None, help="min seconds per action per worker")
    ap.add_argument("--max-rss-slope", type=float, default=200.0, help="KiB/min after warm-up")
    ap.add_argument("--fd-slack", type=int, default=2, help="fds a process may gain at rest")
    args = ap.parse_args(argv)

    duration = 20.0 if args.quick else args.minutes * 60.0
    interval = args.interval or (2.0 if args.quick else 10.0)
    pace = args.pace or (0.3 if args.quick else 0.5)
    smtpd_timeout = 5 if args.quick else 20
    warm = min(duration * 0.25, 300.0)
    rng = random.Random(args.seed)

    for tool in (harness.SMTP_SOURCE, harness.SMTP_SINK):
        if not os.access(tool, os.X_OK):
            print(f"soak: missing {tool} (Debian package postfix)", file=sys.stderr)
            return 2

    base = Path(tempfile.mkdtemp(prefix="postwell-soak-"))
    harness.make_traversable(base)
    sinks: dict = {}
    inst = None
    stop = threading.Event()
    threads: list[threading.Thread] = []
    delivered_files = 0
    t_start = time.monotonic()
    try:
        sinks = {"ok.test": harness.SmtpSink(backlog=256),
                 "soft.test": harness.SmtpSink(extra=["-r", "RCPT"]),
                 "hard.test": harness.SmtpSink(extra=["-f", "RCPT"])}
        inst = build_instance(base, sinks, smtpd_timeout)
        inst.start()
        log = LogReader(inst.maillog)
        sampler = Sampler(inst, log.roles)
        traffic = Traffic(inst, rng, args.quick, smtpd_timeout)
        sampler.sample()
        print(f"soak: postwell on 127.0.0.1:{inst.port}, {duration / 60:.1f} min, "
              f"root {inst.root}", flush=True)
        for i in range(args.workers):
            threads.append(threading.Thread(target=traffic.run, args=(stop, pace), daemon=True))
        threads.append(threading.Thread(target=traffic.idler,
                                        args=(stop, 3 if args.quick else 20), daemon=True))
        for th in threads:
            th.start()
        deadline = t_start + duration
        next_print = time.monotonic() + 60
        while time.monotonic() < deadline:
            time.sleep(min(interval, max(0.0, deadline - time.monotonic())))
            log.poll()
            s = sampler.sample()
            delivered_files += prune_maildirs(inst)
            if time.monotonic() >= next_print:
                next_print += 60
                tot = sum(r["rss"] for r in s["roles"].values())
                print(f"soak: t={s['t']:.1f} min procs={sum(r['n'] for r in s['roles'].values())} "
                      f"RSS total {tot} KiB, accepted {len(log.accepted)}, "
                      f"sent {log.counts['sent']}", flush=True)
        stop.set()
        for th in threads:
            th.join(smtpd_timeout + 90)
        # At rest: clients gone, idle sessions timed out, queue runs settled, and
        # the qmgr's links to the on-demand delivery helpers closed (idle 10 s).
        # Polled rather than slept: the run ends as soon as every long-lived
        # process is back to its resting fd count, and a real leak still fails
        # after the longest of those timeouts.
        rest_base = resting_levels(sampler.samples, warm / 60)
        settle_by = time.monotonic() + max(smtpd_timeout, 12) + 5
        calm = 0
        while time.monotonic() < settle_by and calm < 2:
            time.sleep(1.0)
            now = sampler.snapshot()["pids"]
            calm = calm + 1 if at_rest(now, rest_base, args.fd_slack) else 0
        log.poll()
        end = sampler.sample()
        delivered_files += prune_maildirs(inst)
        elapsed = time.monotonic() - t_start
        rest_base = {pid: st for pid, st in rest_base.items() if pid in end["pids"]}
        sampler.regroup()
        text, data, failures = report(args, sampler, log, traffic, warm / 60, rest_base,
                                      end["pids"], delivered_files, elapsed)
        print()
        print(text)
        if args.json:
            data["samples"] = [{"t": round(s["t"], 3), "roles": s["roles"]} for s in sampler.samples]
            Path(args.json).write_text(json.dumps(data, indent=1))
        print()
        if failures:
            print("soak: FAIL")
            for f in failures:
                print(f"  - {f}")
            return 1
        print("soak: PASS")
        return 0
    finally:
        stop.set()
        if inst is not None:
            inst.stop()
            if not os.environ.get("POSTWELL_KEEP_TEST_DIRS"):
                inst.cleanup()
        for sink in sinks.values():
            sink.stop()
        if not os.environ.get("POSTWELL_KEEP_TEST_DIRS"):
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
