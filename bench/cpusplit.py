#!/usr/bin/env python3
"""CPU per message of each postwell process for one smtp-source run.

Starts the same instance bench/run.py uses (relay to an smtp-sink, or a local
user's ~/Maildir/), sends N messages with /usr/sbin/smtp-source -s S, waits for
their delivery and prints, per process of the instance, the CPU milliseconds
(user and system) it spent per message, and what smtp-source and the sink
cost.  On a 2-core box this shows where the CPU of a message goes, which raw
rates (they move with the machine's load) do not.  Compare two trees by
running it with PYTHONPATH=TREE/src alternately.  Run as root.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402

harness = bench.harness


def _stat_fields(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat", "rb") as f:
        return f.read().decode("latin-1").rsplit(")", 1)[1].split()


def _user_sys(pid: int) -> tuple[float, float]:
    tick = os.sysconf("SC_CLK_TCK")
    f = _stat_fields(pid)
    return int(f[11]) / tick, int(f[12]) / tick


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, default=20, help="smtp-source -s (default 20)")
    ap.add_argument("--messages", type=int, default=4000, help="smtp-source -m (default 4000)")
    ap.add_argument("--size", type=int, default=4096, help="smtp-source -l (default 4096)")
    ap.add_argument("--mode", choices=("relay", "local", "virtual"), default="relay")
    ap.add_argument("--timeout", type=float, default=300.0, help="bound on the run, seconds")
    args = ap.parse_args(argv)
    problems = bench.check_tools()
    if problems:
        for p in problems:
            print(f"cpusplit: {p}", file=sys.stderr)
        return 2

    base = Path(tempfile.mkdtemp(prefix="postwell-cpusplit-"))
    sinks = {"postfix": harness.SmtpSink(backlog=1024), "postwell": harness.SmtpSink(backlog=1024)}
    users = bench.make_local_users(base) if args.mode == "local" else []
    _, pw = bench.make_instances(base, args.mode, sinks)
    sink = sinks["postwell"]
    pw.start()
    try:
        time.sleep(0.5)
        cpu0 = bench.tree_cpu(pw)
        us0 = {pid: _user_sys(pid) for pid in cpu0}
        # "other": the processes there before the run (smtpd workers, pickup);
        # "helper": one started by the run (a delivery helper or its worker).
        roles0 = {pid: bench.process_role(pw, pid, cpu0) for pid in cpu0}
        sink0 = sum(_user_sys(sink.proc.pid))
        kids0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        before = bench.delivered(pw, args.mode, sink)
        t0 = time.monotonic()
        res = harness.smtp_source(pw.port, sessions=args.sessions, messages=args.messages,
                                  size=args.size, recipient=bench.recipient(pw, args.mode),
                                  timeout=args.timeout)
        accept = time.monotonic() - t0
        harness.wait_for(lambda: bench.delivered(pw, args.mode, sink) >= before + args.messages,
                         args.timeout, 0.02, f"{args.messages} deliveries")
        e2e = time.monotonic() - t0
        cpu1 = bench.tree_cpu(pw)
        kids1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        n = args.messages
        print(f"mode={args.mode} sessions={args.sessions} messages={n} size={args.size}: "
              f"accept {n / accept:.0f}/s e2e {n / e2e:.0f}/s (smtp-source ok: {res.ok})")
        for pid, t in sorted(cpu1.items()):
            role = roles0.get(pid) or bench.process_role(pw, pid, cpu0)
            try:
                u1, s1 = _user_sys(pid)
            except OSError:
                continue
            u0, s0 = us0.get(pid, (0.0, 0.0))
            print(f"  pid {pid:<7} {role:<7} {(t - cpu0.get(pid, 0.0)) * 1000 / n:6.3f} ms/msg "
                  f"(user {(u1 - u0) * 1000 / n:.3f}, sys {(s1 - s0) * 1000 / n:.3f})")
        source = (kids1.ru_utime + kids1.ru_stime - kids0.ru_utime - kids0.ru_stime) * 1000 / n
        sink_ms = (sum(_user_sys(sink.proc.pid)) - sink0) * 1000 / n
        print(f"  smtp-source {source:.3f} ms/msg, smtp-sink {sink_ms:.3f} ms/msg; "
              f"CPU available {os.cpu_count() * e2e * 1000 / n:.3f} ms/msg")
    finally:
        pw.stop()
        pw.cleanup()
        for s in sinks.values():
            s.stop()
        if users:
            bench.remove_local_users(users)
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
