#!/usr/bin/env python3
"""N idle SMTP connections against one postwell; smtpd memory before and after.

DESIGN.md property 4: "10,000 idle connections cost little".  Opens N
connections (each reads its 220 banner, then stays silent), reads Rss and Pss
of every smtpd worker from /proc/PID/smaps_rollup before and after, checks a
new client is still served, then closes everything.

    python soak/idle_connections.py                 # 10,000 connections
    python soak/idle_connections.py --quick         # 1,000
"""

from __future__ import annotations

import argparse
import resource
import selectors
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import harness  # noqa: E402


def rollup(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                parts = line.split()
                if parts and parts[0] in ("Rss:", "Pss:"):
                    out[parts[0][:-1]] = int(parts[1])
    except OSError:
        pass
    return out


def smtpd_pids(inst) -> list[int]:
    pids = []
    for pid in inst.processes():
        if pid == inst.master_pid():
            continue
        try:
            with open(f"/proc/{pid}/status") as f:
                uid = int(f.read().split("\nUid:")[1].split()[0])
        except OSError:
            continue
        if uid == inst.uid:
            pids.append(pid)
    return pids


def raise_nofile(want: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < want:
        if hard != resource.RLIM_INFINITY and hard < want:
            if harness.is_root():
                hard = want
            else:
                want = hard
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(hard, want)))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def run(n: int, timeout: float = 120.0) -> dict:
    limit = raise_nofile(n + 500)
    tmp = tempfile.mkdtemp(prefix="idle-conns-")
    # The master (and so its smtpd children) inherits our raised limit.
    inst = harness.PostwellInstance(tmp, {"smtpd_timeout": "300s"}, name="idleconns")
    socks: list[socket.socket] = []
    try:
        inst.start()
        pids = smtpd_pids(inst)
        before = {p: rollup(p) for p in pids}
        sel = selectors.DefaultSelector()
        t0 = time.monotonic()
        refused = 0
        for _ in range(n):
            s = socket.socket()
            s.settimeout(10)
            try:
                s.connect(("127.0.0.1", inst.port))
            except OSError:
                refused += 1
                s.close()
                continue
            s.setblocking(False)
            socks.append(s)
            sel.register(s, selectors.EVENT_READ)
        banners = other = 0
        pending = len(socks)
        deadline = time.monotonic() + timeout
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
                else:
                    other += 1
                sel.unregister(key.fileobj)
                pending -= 1
        elapsed = time.monotonic() - t0
        time.sleep(1.0)
        after = {p: rollup(p) for p in pids}
        late = harness.dialogue(inst.port, ["EHLO late.example.org", "QUIT"], timeout=30)
        pss_b = sum(v.get("Pss", 0) for v in before.values())
        pss_a = sum(v.get("Pss", 0) for v in after.values())
        rss_b = sum(v.get("Rss", 0) for v in before.values())
        rss_a = sum(v.get("Rss", 0) for v in after.values())
        return {
            "connections": n, "nofile": limit, "banners": banners, "no_banner": pending,
            "other_reply": other, "refused": refused, "seconds": round(elapsed, 1),
            "smtpd_processes": len(pids),
            "pss_kib_before": pss_b, "pss_kib_after": pss_a,
            "rss_kib_before": rss_b, "rss_kib_after": rss_a,
            "pss_kib_per_connection": round((pss_a - pss_b) / max(1, banners), 2),
            "late_client": [r.code for r in late],
        }
    finally:
        for s in socks:
            s.close()
        inst.stop()
        inst.cleanup()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", "--connections", type=int, default=10000)
    ap.add_argument("--quick", action="store_true", help="1,000 connections")
    args = ap.parse_args(argv)
    n = 1000 if args.quick else args.connections
    res = run(n)
    print(" ".join(f"{k}={v}" for k, v in res.items()))
    ok = res["banners"] == n and res["late_client"] == [220, 250, 221]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
