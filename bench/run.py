#!/usr/bin/env python3
"""Side-by-side throughput and memory benchmark: postwell against Debian's Postfix.

Both MTAs get the same main.cf (apart from paths and ports, see
tests/harness.py), are driven by /usr/sbin/smtp-source, and deliver either to
a virtual Maildir (default), to a local user's ~/Maildir/ or relay to an
smtp-sink.  Rounds interleave the
two MTAs so machine noise hits both alike.  Installs nothing; run as root (the
reference Postfix needs it).  See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import shutil
import socket
import stat
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

import harness  # noqa: E402

RELAY_DOMAIN = "relay.test"
# --mode local: one real user per MTA (so each round counts only its own
# deliveries), created for the run and removed afterwards.
LOCAL_USERS = {"postfix": "pwbpostfix", "postwell": "pwbpostwell"}
LOCAL_SERVICE = "local     unix  -       n       n       -       -       local\n"


@dataclass
class Sample:
    mta: str
    sessions: int
    messages: int
    size: int
    accept_rate: float       # messages/s until smtp-source finished (all 250s received)
    e2e_rate: float          # messages/s until the last one was delivered
    peak_pss_mib: float      # all processes of the instance, sampled during the round
    peak_procs: int
    source_ok: bool
    deliver_rate: float = 0.0   # --deliver-only: messages/s from release of the hold queue
    cpu_ms: float = 0.0         # --deliver-only: CPU ms per message of the instance's tree
    cpu_split: dict = field(default_factory=dict)   # --deliver-only: the same by process role


class Sampler(threading.Thread):
    """Peak PSS (sum over the instance's process tree) and process count."""

    def __init__(self, inst, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.inst, self.interval = inst, interval
        self.peak_pss = 0
        self.peak_procs = 0
        self._halt = threading.Event()

    def sample(self) -> None:
        pids = self.inst.processes()
        self.peak_procs = max(self.peak_procs, len(pids))
        self.peak_pss = max(self.peak_pss, harness.pss_kib(pids))

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join(5)
        self.sample()


def check_tools() -> list[str]:
    problems = []
    for tool in (harness.SMTP_SOURCE, harness.SMTP_SINK, harness.POSTFIX_BIN):
        if not os.access(tool, os.X_OK):
            problems.append(f"missing {tool} (Debian package postfix)")
    if not harness.is_root():
        problems.append("must run as root (the reference Postfix needs it)")
    try:
        import postwell.cli.postfix  # noqa: F401
    except ImportError as e:
        problems.append(f"postwell is not importable: {e}")
    return problems


def recipient(inst, mode: str) -> str:
    if mode == "relay":
        return f"sink@{RELAY_DOMAIN}"
    if mode == "local":
        return f"{LOCAL_USERS[inst.kind]}@{harness.HOSTNAME}"
    return f"sink@{harness.VIRTUAL_DOMAIN}"


def delivered(inst, mode: str, sink) -> int:
    if mode == "relay":
        return sink.count
    if mode == "local":
        maildir = Path(pwd.getpwnam(LOCAL_USERS[inst.kind]).pw_dir) / "Maildir"
    else:
        maildir = inst.maildir("sink")
    # Polled every 20 ms while the MTAs work: a bare count, no sorting.
    count = 0
    for sub in ("new", "cur"):
        try:
            count += len(os.listdir(maildir / sub))
        except FileNotFoundError:
            pass
    return count


def tree_cpu(inst) -> dict[int, float]:
    """CPU seconds (own and reaped children's) of each process of the instance."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for pid in inst.processes():
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                fields = f.read().decode("latin-1").rsplit(")", 1)[1].split()
        except OSError:
            continue
        # utime stime cutime cstime (proc(5) fields 14-17)
        out[pid] = sum(int(x) for x in fields[11:15]) / tick
    return out


def cpu_between(before: dict[int, float], after: dict[int, float]) -> float:
    return sum(t - before.get(pid, 0.0) for pid, t in after.items())


def process_role(inst, pid: int, before: dict[int, float]) -> str:
    """What a process of the instance is, for the CPU split of --deliver-only.

    Postfix's programs carry their names (qmgr, local, smtp, trivial-rewrite...).
    postwell's are all python3: the qmgr holds the public/qmgr FIFO open; a
    process that appeared once the held mail was released is a delivery
    helper (local/virtual/pipe, started on demand) or one of its user workers."""
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "gone"
    if isinstance(inst, harness.ReferencePostfix):
        return comm
    if pid == inst.master_pid():
        return "master"
    fifo = str(inst.queue_dir / "public" / "qmgr")
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        fds = []
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == fifo:
                return "qmgr"
        except OSError:
            continue
    return "helper" if pid not in before else "other"


def cpu_split(inst, before: dict[int, float], after: dict[int, float], roles: dict[int, str],
              messages: int) -> dict[str, float]:
    """CPU ms per message by process role (roles of processes that left count as "gone")."""
    out: dict[str, float] = {}
    for pid, t in after.items():
        role = roles.get(pid, "gone")
        out[role] = out.get(role, 0.0) + (t - before.get(pid, 0.0)) * 1000 / messages
    return {k: round(v, 3) for k, v in sorted(out.items(), key=lambda kv: -kv[1]) if v > 0}


def wake_qmgr(inst) -> None:
    """"Scan incoming": postwell's qmgr listens on a FIFO, Postfix's on a unix socket."""
    path = inst.queue_dir / "public" / "qmgr"
    if stat.S_ISFIFO(os.stat(path).st_mode):
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        try:
            os.write(fd, b"I")
        finally:
            os.close(fd)
    else:
        # Postfix's trigger protocol: connect, send the request byte, close.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(str(path))
            try:
                s.sendall(b"I")
            except BrokenPipeError:
                pass   # the qmgr may close as soon as it has read the byte


def deliver_only(inst, mode: str, sink, messages: int, before: int,
                 timeout: float) -> tuple[float, float, dict[str, float]]:
    """Release what the round put on hold; (messages/s, CPU ms per message,
    the same by process role) until the last one is delivered.  Only
    delivery is timed: no SMTP.

    The held files are renamed into incoming/ and the qmgr is poked, just as
    cleanup hands over fresh mail, so both MTAs run their normal incoming ->
    active -> delivered path (postsuper -H would route the mail through
    deferred/ instead)."""
    def settled():
        return len(inst.queue_files(("hold",))) + delivered(inst, mode, sink) - before >= messages
    harness.wait_for(settled, timeout, 0.05, f"{messages} messages on hold")
    held = inst.queue_files(("hold",))
    incoming = inst.queue_dir / "incoming"
    if isinstance(inst, harness.PostwellInstance):
        # postwell's cleanup marks a held message in its envelope (queue/format.py), so a
        # file renamed back into incoming/ would be held again: clear the mark first,
        # as postsuper -H does, before the clock starts.
        from postwell.queue.store import QueueStore
        store = QueueStore(str(inst.queue_dir))
        for path in held:
            qm = store.open(path.name, "hold", writable=True)
            try:
                qm.release_hold_mark()
            finally:
                qm.close()
    cpu0 = tree_cpu(inst)
    target = delivered(inst, mode, sink) + len(held)
    t0 = time.monotonic()
    for path in held:
        os.rename(path, incoming / path.name)
    wake_qmgr(inst)
    try:
        harness.wait_for(lambda: delivered(inst, mode, sink) >= target, timeout, 0.02,
                         "the released messages to be delivered")
    except TimeoutError:
        pass
    elapsed = time.monotonic() - t0
    got = delivered(inst, mode, sink) - (target - len(held))
    cpu1 = tree_cpu(inst)
    cpu = cpu_between(cpu0, cpu1)
    roles = {pid: process_role(inst, pid, cpu0) for pid in cpu1}
    split = cpu_split(inst, cpu0, cpu1, roles, got) if got else {}
    return got / elapsed, (cpu * 1000 / got) if got else float("nan"), split


def one_round(inst, mode: str, sink, sessions: int, messages: int, size: int,
              timeout: float, hold: bool = False) -> Sample:
    rcpt = recipient(inst, mode)
    before = delivered(inst, mode, sink)
    sampler = Sampler(inst)
    sampler.start()
    t0 = time.monotonic()
    res = harness.smtp_source(inst.port, sessions=sessions, messages=messages, size=size,
                              recipient=rcpt, timeout=timeout)
    accept_time = time.monotonic() - t0
    deliver_rate = cpu_ms = 0.0
    split: dict[str, float] = {}
    if hold and res.ok:
        deliver_rate, cpu_ms, split = deliver_only(inst, mode, sink, messages, before, timeout)
    try:
        harness.wait_for(lambda: delivered(inst, mode, sink) >= before + messages,
                         timeout, 0.02, f"{messages} deliveries")
    except TimeoutError:
        pass
    e2e_time = time.monotonic() - t0
    sampler.stop()
    got = delivered(inst, mode, sink) - before
    return Sample(inst.kind, sessions, messages, size,
                  accept_rate=(messages / accept_time) if res.ok else 0.0,
                  e2e_rate=got / e2e_time,
                  peak_pss_mib=sampler.peak_pss / 1024, peak_procs=sampler.peak_procs,
                  source_ok=res.ok, deliver_rate=deliver_rate, cpu_ms=cpu_ms,
                  cpu_split=split)


def make_instances(base: Path, mode: str, sinks: dict, hold: bool = False):
    extra_ref: dict[str, str] = {"default_process_limit": "200"}
    extra_pw: dict[str, str] = {"default_process_limit": "200"}
    if mode == "relay":
        extra_ref["relayhost"] = f"[127.0.0.1]:{sinks['postfix'].port}"
        extra_pw["relayhost"] = f"[127.0.0.1]:{sinks['postwell'].port}"
    for extra in (extra_ref, extra_pw):
        if mode == "local":
            extra["home_mailbox"] = "Maildir/"
        if hold:
            # Every message waits in the hold queue until the round releases it.
            extra["smtpd_recipient_restrictions"] = "check_recipient_access static:HOLD"
    ref = harness.ReferencePostfix(base, extra_ref)
    pw = harness.PostwellInstance(base, extra_pw)
    if mode == "local":
        pw.master_cf = pw.default_master_cf() + LOCAL_SERVICE
        pw.write_config()
    return ref, pw


def make_local_users(base: Path) -> list[str]:
    """The --mode local recipients: real users with a home directory each."""
    homes = base / "homes"
    homes.mkdir(mode=0o755)
    os.chmod(base, 0o755)
    made = []
    with harness.machine_lock("users-pwbench"):
        for name in LOCAL_USERS.values():
            subprocess.run(["userdel", "-r", name], capture_output=True, timeout=30)
            subprocess.run(["useradd", "-m", "-d", str(homes / name), "-s", "/usr/sbin/nologin", name],
                           check=True, capture_output=True, timeout=30)
            made.append(name)
    return made


def remove_local_users(names: list[str]) -> None:
    with harness.machine_lock("users-pwbench"):
        for name in names:
            subprocess.run(["userdel", "-r", name], capture_output=True, timeout=30)


def split_text(split: dict[str, float]) -> str:
    return " ".join(f"{role} {ms:.2f}" for role, ms in split.items())


def summarise(samples: list[Sample]) -> str:
    rows = []
    header = (f"{'sessions':>8} {'mta':>9} {'accept msg/s':>13} {'e2e msg/s':>10} "
              f"{'peak PSS MiB':>13} {'procs':>6}")
    rows.append(header)
    rows.append("-" * len(header))
    for sessions in sorted({s.sessions for s in samples}):
        med = {}
        for mta in ("postfix", "postwell"):
            group = [s for s in samples if s.sessions == sessions and s.mta == mta]
            if not group:
                continue
            med[mta] = (statistics.median(s.accept_rate for s in group),
                        statistics.median(s.e2e_rate for s in group),
                        max(s.peak_pss_mib for s in group),
                        max(s.peak_procs for s in group),
                        all(s.source_ok for s in group))
            a, e, p, n, ok = med[mta]
            rows.append(f"{sessions:>8} {mta:>9} {a:>13.1f} {e:>10.1f} {p:>13.1f} {n:>6}"
                        + ("" if ok else "  (smtp-source failed)"))
        if len(med) == 2:
            r = [w / f if f else float("nan") for w, f in zip(med["postwell"][:4], med["postfix"][:4])]
            rows.append(f"{sessions:>8} {'ratio':>9} {r[0]:>13.2f} {r[1]:>10.2f} {r[2]:>13.2f} "
                        f"{r[3]:>6.2f}   (postwell/Postfix)")
    if any(s.deliver_rate for s in samples):
        rows.append("")
        header = f"{'sessions':>8} {'mta':>9} {'deliver msg/s':>14} {'CPU ms/msg':>11}"
        rows += [header, "-" * len(header)]
        for sessions in sorted({s.sessions for s in samples}):
            med = {}
            for mta in ("postfix", "postwell"):
                group = [s for s in samples if s.sessions == sessions and s.mta == mta]
                if group:
                    med[mta] = (statistics.median(s.deliver_rate for s in group),
                                statistics.median(s.cpu_ms for s in group))
                    rows.append(f"{sessions:>8} {mta:>9} {med[mta][0]:>14.1f} {med[mta][1]:>11.2f}")
            if len(med) == 2:
                r = [w / f if f else float("nan") for w, f in zip(med["postwell"], med["postfix"])]
                rows.append(f"{sessions:>8} {'ratio':>9} {r[0]:>14.2f} {r[1]:>11.2f}   (postwell/Postfix)")
        rows.append("")
        rows.append("CPU ms/msg by process (median per role over the rounds):")
        for sessions in sorted({s.sessions for s in samples}):
            for mta in ("postfix", "postwell"):
                group = [s for s in samples if s.sessions == sessions and s.mta == mta]
                roles = {role for s in group for role in s.cpu_split}
                split = {role: statistics.median(s.cpu_split.get(role, 0.0) for s in group)
                         for role in roles}
                split = dict(sorted(split.items(), key=lambda kv: -kv[1]))
                if split:
                    rows.append(f"  -s {sessions} {mta}: {split_text(split)}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="small counts (a smoke run of a few seconds)")
    ap.add_argument("--sessions", type=int, nargs="+", default=None,
                    help="smtp-source -s values (default 20 200)")
    ap.add_argument("--messages", type=int, default=None, help="smtp-source -m (default 5000)")
    ap.add_argument("--size", type=int, default=4096, help="smtp-source -l (default 4096)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds per MTA (default 3)")
    ap.add_argument("--mode", choices=("virtual", "local", "relay"), default="virtual",
                    help="virtual: deliver to a virtual Maildir; local: to a local user's "
                         "~/Maildir/ (home_mailbox); relay: relay to an smtp-sink")
    ap.add_argument("--deliver-only", action="store_true",
                    help="hold every message at acceptance, then time the delivery of the "
                         "released queue alone (and its CPU per message); e2e then includes "
                         "the time on hold")
    ap.add_argument("--timeout", type=float, default=None, help="bound per round, seconds")
    ap.add_argument("--json", metavar="FILE", help="also write the samples as JSON")
    args = ap.parse_args(argv)

    sessions = args.sessions or ([4] if args.quick else [20, 200])
    messages = args.messages or (100 if args.quick else 5000)
    rounds = args.rounds or (1 if args.quick else 3)
    timeout = args.timeout or (60.0 if args.quick else 600.0)
    size = 1024 if args.quick and args.size == 4096 else args.size

    problems = check_tools()
    if problems:
        for p in problems:
            print(f"bench: {p}", file=sys.stderr)
        return 2

    base = Path(tempfile.mkdtemp(prefix="postwell-bench-"))
    sinks: dict = {}
    instances = []
    samples: list[Sample] = []
    users: list[str] = []
    try:
        if args.mode == "relay":
            sinks = {"postfix": harness.SmtpSink(backlog=1024), "postwell": harness.SmtpSink(backlog=1024)}
        if args.mode == "local":
            users = make_local_users(base)
        ref, pw = make_instances(base, args.mode, sinks, args.deliver_only)
        instances = [ref, pw]
        for inst in instances:
            inst.start()
        print(f"bench: mode={args.mode} messages={messages} size={size} rounds={rounds} "
              f"sessions={sessions}", flush=True)
        for rnd in range(rounds):
            for s in sessions:
                # Alternate who goes first so warm-up and noise do not favour one.
                order = instances if rnd % 2 == 0 else instances[::-1]
                for inst in order:
                    # A fresh start per round: processes a bigger round left idle
                    # (Postfix keeps smtpd processes for max_idle) must not count
                    # towards this round's PSS and process count.
                    inst.stop()
                    inst.start()
                    sample = one_round(inst, args.mode, sinks.get(inst.kind), s, messages,
                                       size, timeout, args.deliver_only)
                    samples.append(sample)
                    extra = (f"  deliver {sample.deliver_rate:8.1f}/s  CPU {sample.cpu_ms:5.2f} ms/msg"
                             f" ({split_text(sample.cpu_split)})"
                             if args.deliver_only else "")
                    print(f"bench: round {rnd + 1} {inst.kind:>8} -s {s:<4} "
                          f"accept {sample.accept_rate:8.1f}/s  e2e {sample.e2e_rate:8.1f}/s  "
                          f"PSS {sample.peak_pss_mib:7.1f} MiB  procs {sample.peak_procs}{extra}",
                          flush=True)
    finally:
        for inst in instances:
            inst.stop()
            inst.cleanup()
        for sink in sinks.values():
            sink.stop()
        if users:
            remove_local_users(users)
        shutil.rmtree(base, ignore_errors=True)

    print()
    print(summarise(samples))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(s) for s in samples], indent=1))
    return 0 if samples and all(s.source_ok for s in samples) else 1


if __name__ == "__main__":
    sys.exit(main())
