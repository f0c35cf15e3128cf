#!/usr/bin/env python3
"""The non-throughput targets of issue 8, each measured once against postwell.

    sudo python3 bench/targets.py                 # all checks
    sudo python3 bench/targets.py startup idle    # some of them

Checks (name: what is measured -> target):
  startup   `postfix start` until the banner answers               -> < 1 s
  idle      PSS of the process tree holding N idle connections     -> < 300 MiB for 10,000
  big       RSS growth of every process while a 100 MB message
            is accepted                                            -> < 32 MiB
  postqueue `postqueue -p` over N deferred messages                -> < 2 s for 100,000
  fsync     one-writer write+fsync+rename rate of the queue's disk,
            and postwell's acceptance rate with -s 200 (group commit) -> accept >= 1.5x
Every check is bounded in time and count; loopback only.  See bench/README.md.
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

import harness  # noqa: E402

MiB = 1024 * 1024


def _rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _instance(base: Path, **main_cf) -> harness.PostwellInstance:
    params = {"default_process_limit": "200", **{k: str(v) for k, v in main_cf.items()}}
    return harness.PostwellInstance(base, params)


def check_startup(base: Path, args) -> tuple[bool, str]:
    inst = _instance(base)
    t0 = time.monotonic()
    inst.start()
    took = time.monotonic() - t0
    inst.stop()
    inst.cleanup()
    return took < 1.0, f"start to banner {took:.2f} s (target < 1 s)"


def check_idle(base: Path, args) -> tuple[bool, str]:
    n = args.idle
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < n + 100:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, n + 1000), hard))
    inst = _instance(base)
    inst.start()
    socks: list[socket.socket] = []
    try:
        deadline = time.monotonic() + 120
        for _ in range(n):
            if time.monotonic() > deadline:
                break
            s = socket.create_connection(("127.0.0.1", inst.port), timeout=10)
            socks.append(s)
        time.sleep(3)            # every session greeted and idle
        greeted = 0
        for s in socks[:20] + socks[-20:]:
            s.settimeout(10)
            try:
                greeted += s.recv(512).startswith(b"220")
            except OSError:
                pass
        pss = harness.pss_kib(inst.processes()) / 1024
    finally:
        for s in socks:
            s.close()
        inst.stop()
        inst.cleanup()
    ok = len(socks) == n and greeted == min(40, n) and pss < 300 * n / 10000
    return ok, (f"{len(socks)} idle connections ({greeted}/{min(40, n)} sampled got the banner): "
                f"PSS {pss:.1f} MiB (target < {300 * n / 10000:.0f} MiB)")


def check_big(base: Path, args) -> tuple[bool, str]:
    size = args.big * MiB
    inst = _instance(base, message_size_limit=size + MiB, virtual_mailbox_limit=0)
    inst.start()
    pids = inst.processes()
    start = {p: _rss_kib(p) for p in pids}
    peak = dict(start)
    done = threading.Event()

    def sample():
        while not done.is_set():
            for p in pids:
                peak[p] = max(peak[p], _rss_kib(p))
            done.wait(0.05)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        c = harness.SmtpConnection(inst.port, timeout=120)
        c.reply()
        for cmd in ("EHLO bench.example", "MAIL FROM:<big@example.org>",
                    f"RCPT TO:<sink@{harness.VIRTUAL_DOMAIN}>", "DATA"):
            c.send(cmd + "\r\n")
            c.reply()
        line = b"x" * 998 + b"\r\n"
        block = line * 1024
        c.send(b"Subject: big\r\n\r\n")
        for _ in range(size // len(block) + 1):
            c.send(block)
        c.send(b".\r\n")
        final = c.reply()
        c.close()
    finally:
        done.set()
        sampler.join(5)
        inst.stop()
        inst.cleanup()
    growth = max(peak[p] - start[p] for p in pids) / 1024
    ok = final is not None and final.code == 250 and growth < 32
    return ok, f"{args.big} MB message: {final}; largest RSS growth {growth:.1f} MiB (target < 32 MiB)"


def check_postqueue(base: Path, args) -> tuple[bool, str]:
    from postwell.queue import QueueStore
    n = args.queued
    inst = _instance(base)
    # Fill the queue directly (no fsync: this measures the listing, not the disk).
    store = QueueStore(str(inst.queue_dir), fsync=lambda fd: None)
    store.ensure_layout()
    for i in range(n):
        m = store.create()
        m.set_sender("sender@example.org")
        m.add_recipient(f"rcpt{i}@example.com")
        m.write(b"Subject: queued\n\nbody\n")
        m.commit()
        os.rename(store.path("incoming", m.queue_id), store.path("deferred", m.queue_id))
    for root, dirs, files in os.walk(inst.queue_dir):
        for name in dirs + files:
            os.chown(os.path.join(root, name), inst.uid, inst.gid)
    t0 = time.monotonic()
    cp = inst.run("postqueue", "-p", timeout=120)
    took = time.monotonic() - t0
    inst.cleanup()
    tail = cp.stdout.strip().splitlines()[-1:] or [cp.stderr.strip()]
    return cp.returncode == 0 and took < 2.0, f"postqueue -p over {n}: {took:.2f} s, {tail[0]} (target < 2 s)"


def disk_fsync_rate(directory: Path, seconds: float = 2.0) -> float:
    """One writer: write 4 KiB, fsync, rename -- what a naive queue does per message."""
    data = b"x" * 4096
    count = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        tmp = directory / f"t{count}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.write(fd, data)
        os.fsync(fd)
        os.close(fd)
        os.rename(tmp, directory / f"f{count}")
        count += 1
    for p in directory.iterdir():
        p.unlink()
    return count / seconds


def check_fsync(base: Path, args) -> tuple[bool, str]:
    inst = _instance(base)
    probe = inst.root / "fsync-probe"
    probe.mkdir(parents=True, exist_ok=True)
    rate = disk_fsync_rate(probe)
    inst.start()
    try:
        t0 = time.monotonic()
        res = harness.smtp_source(inst.port, sessions=200, messages=args.messages, size=4096,
                                  timeout=300)
        accept = args.messages / (time.monotonic() - t0) if res.ok else 0.0
    finally:
        inst.stop()
        inst.cleanup()
    return accept >= 1.5 * rate, (f"disk one-writer write+fsync+rename {rate:.0f}/s; accept -s 200 "
                                  f"{accept:.0f} msg/s = {accept / rate:.2f}x (target >= 1.5x)")


CHECKS = {"startup": check_startup, "idle": check_idle, "big": check_big,
          "postqueue": check_postqueue, "fsync": check_fsync}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checks", nargs="*", metavar="CHECK",
                    help=f"which checks: {', '.join(CHECKS)} (default: all)")
    ap.add_argument("--idle", type=int, default=10000, help="idle connections (default 10000)")
    ap.add_argument("--big", type=int, default=100, help="message size in MB (default 100)")
    ap.add_argument("--queued", type=int, default=100000, help="queued messages (default 100000)")
    ap.add_argument("--messages", type=int, default=5000, help="smtp-source -m for fsync (default 5000)")
    args = ap.parse_args(argv)
    unknown = [c for c in args.checks if c not in CHECKS]
    if unknown:
        ap.error(f"unknown check(s): {', '.join(unknown)}")
    if not harness.is_root():
        print("targets: must run as root (instances drop to the mail owner)", file=sys.stderr)
        return 2
    failed = 0
    for name in args.checks or list(CHECKS):
        base = Path(tempfile.mkdtemp(prefix=f"postwell-targets-{name}-"))
        try:
            ok, text = CHECKS[name](base, args)
        except Exception as exc:   # one broken check must not hide the others
            ok, text = False, f"error: {exc!r}"
        failed += not ok
        print(f"{name:>9}: {'ok  ' if ok else 'MISS'} {text}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
