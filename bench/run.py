#!/usr/bin/env python3
"""Side-by-side throughput and memory benchmark: postwell against Debian's Postfix.

Both MTAs get the same main.cf (apart from paths and ports, see
tests/harness.py), are driven by /usr/sbin/smtp-source, and deliver either to
a virtual Maildir (default) or relay to an smtp-sink.  Rounds interleave the
two MTAs so machine noise hits both alike.  Installs nothing; run as root (the
reference Postfix needs it).  See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

import harness  # noqa: E402

RELAY_DOMAIN = "relay.test"


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


def delivered(inst, mode: str, sink) -> int:
    if mode == "relay":
        return sink.count
    return len(inst.maildir_messages("sink"))


def one_round(inst, mode: str, sink, sessions: int, messages: int, size: int,
              timeout: float) -> Sample:
    rcpt = f"sink@{RELAY_DOMAIN}" if mode == "relay" else f"sink@{harness.VIRTUAL_DOMAIN}"
    before = delivered(inst, mode, sink)
    sampler = Sampler(inst)
    sampler.start()
    t0 = time.monotonic()
    res = harness.smtp_source(inst.port, sessions=sessions, messages=messages, size=size,
                              recipient=rcpt, timeout=timeout)
    accept_time = time.monotonic() - t0
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
                  source_ok=res.ok)


def make_instances(base: Path, mode: str, sinks: dict):
    extra_ref: dict[str, str] = {"default_process_limit": "200"}
    extra_pw: dict[str, str] = {"default_process_limit": "200"}
    if mode == "relay":
        extra_ref["relayhost"] = f"[127.0.0.1]:{sinks['postfix'].port}"
        extra_pw["relayhost"] = f"[127.0.0.1]:{sinks['postwell'].port}"
    ref = harness.ReferencePostfix(base, extra_ref)
    pw = harness.PostwellInstance(base, extra_pw)
    return ref, pw


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
    ap.add_argument("--mode", choices=("virtual", "relay"), default="virtual",
                    help="virtual: deliver to Maildir; relay: relay to an smtp-sink")
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
    try:
        if args.mode == "relay":
            sinks = {"postfix": harness.SmtpSink(backlog=1024), "postwell": harness.SmtpSink(backlog=1024)}
        ref, pw = make_instances(base, args.mode, sinks)
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
                    sample = one_round(inst, args.mode, sinks.get(inst.kind), s, messages,
                                       size, timeout)
                    samples.append(sample)
                    print(f"bench: round {rnd + 1} {inst.kind:>8} -s {s:<4} "
                          f"accept {sample.accept_rate:8.1f}/s  e2e {sample.e2e_rate:8.1f}/s  "
                          f"PSS {sample.peak_pss_mib:7.1f} MiB  procs {sample.peak_procs}",
                          flush=True)
    finally:
        for inst in instances:
            inst.stop()
            inst.cleanup()
        for sink in sinks.values():
            sink.stop()
        shutil.rmtree(base, ignore_errors=True)

    print()
    print(summarise(samples))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(s) for s in samples], indent=1))
    return 0 if samples and all(s.source_ok for s in samples) else 1


if __name__ == "__main__":
    sys.exit(main())
