#!/usr/bin/env python3
"""Crash runs: kill -9 the whole postwell, over and over, under SMTP load.

DESIGN.md property 1: once a client saw "250 ... queued as ID" the message is
delivered exactly once, or twice when a kill hit it in flight; never lost,
never delivered in part.  The load is N Python SMTP clients that record the
queue id of every 250 and put a SHA-256 of the body in each message; the
kills land at moments drawn from a seeded RNG, some in the middle of the load
(before/while/after the final dot, during a queue move or a delivery) and
some after the load paused (while the qmgr works off the backlog).  After the
last restart the queue must drain and every delivered file is checked.

    python soak/crash_runs.py --kills 50 --seed 7       # the full run
    python soak/crash_runs.py --quick                   # ~5 kills, for the test suite

Runs as root (the harness drops the MTA to its test mail_owner); loopback only.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import json
import random
import re
import smtplib
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import harness  # noqa: E402
from harness import VIRTUAL_DOMAIN  # noqa: E402

RCPT = f"sink@{VIRTUAL_DOMAIN}"


class Load:
    """SMTP clients that keep sending while ``sending`` is set and reconnect after a kill."""

    def __init__(self, port: int, sessions: int, size: int, rng: random.Random,
                 budget: int) -> None:
        self.port = port
        self.size = size
        self.lock = threading.Lock()
        self.counter = 0
        self.budget = budget                 # messages at most, over the whole run
        self.accepted: dict[str, str] = {}   # test id -> queue id of the 250
        self.unsure: set[str] = set()        # sent (part of) it, no reply: may or may not arrive
        self.refused: dict[str, str] = {}    # got a 4xx/5xx reply
        self.sending = threading.Event()
        self.stop = threading.Event()
        self.idle = [threading.Event() for _ in range(sessions)]
        # Each thread gets its own RNG: sizes vary without sharing state across threads.
        self.threads = [threading.Thread(target=self._session_loop, daemon=True,
                                         args=(i, random.Random(rng.random())))
                        for i in range(sessions)]

    def _next_id(self) -> str | None:
        with self.lock:
            if self.counter >= self.budget:
                return None
            self.counter += 1
            return f"crash{self.counter:06d}"

    def _session_loop(self, index: int, rng: random.Random) -> None:
        idle = self.idle[index]
        while not self.stop.is_set():
            if not self.sending.is_set():
                idle.set()
                self.sending.wait(0.1)
                continue
            idle.clear()
            try:
                s = smtplib.SMTP("127.0.0.1", self.port, timeout=10)
            except OSError:
                time.sleep(0.05)
                continue
            current = None
            try:
                s.ehlo("load.example.org")
                while self.sending.is_set() and not self.stop.is_set():
                    current = self._next_id()
                    if current is None:
                        self.sending.clear()
                        break
                    s.mail("load@example.org")
                    code, text = s.rcpt(RCPT)
                    if code != 250:
                        with self.lock:
                            self.refused[current] = f"RCPT {code} {text!r}"
                        current = None
                        s.rset()
                        continue
                    size = rng.choice((self.size, self.size, self.size * 20))
                    code, text = s.data(harness.make_message(current, size, recipient=RCPT))
                    m = harness.QUEUED_RE.search(text.decode("latin-1"))
                    with self.lock:
                        if code == 250 and m:
                            self.accepted[current] = m.group(1)
                        else:
                            self.refused[current] = f"DATA {code} {text!r}"
                    current = None
                with contextlib.suppress(OSError, smtplib.SMTPException):
                    s.quit()
            except (OSError, smtplib.SMTPException):
                if current is not None:
                    with self.lock:
                        self.unsure.add(current)
            finally:
                s.close()

    def start(self) -> None:
        self.sending.set()
        for t in self.threads:
            t.start()

    def pause(self, timeout: float = 20.0) -> None:
        self.sending.clear()
        harness.wait_for(lambda: all(e.is_set() for e in self.idle), timeout, 0.02,
                         "load sessions to go idle")

    def finish(self) -> None:
        self.sending.clear()
        self.stop.set()
        for t in self.threads:
            t.join(30)


@dataclass
class Summary:
    seed: int
    kills: int
    phases: dict = field(default_factory=dict)
    sent: int = 0
    accepted: int = 0
    unsure: int = 0
    refused: int = 0
    delivered_files: int = 0
    duplicates: int = 0
    lost: list = field(default_factory=list)
    partial: list = field(default_factory=list)
    more_than_twice: list = field(default_factory=list)
    # Two copies delivered with no kill between them: a duplicate no crash explains.
    same_epoch_duplicates: list = field(default_factory=list)
    kill_times: list = field(default_factory=list)
    wrong_queue_id: list = field(default_factory=list)
    never_sent: list = field(default_factory=list)
    unsure_delivered: int = 0
    queue_left: list = field(default_factory=list)      # complete files still queued
    incomplete_left: int = 0                              # never-acknowledged partial files
    corrupt: int = 0
    refused_samples: list = field(default_factory=list)
    elapsed: float = 0.0
    drain_seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not (self.lost or self.partial or self.same_epoch_duplicates or self.wrong_queue_id
                    or self.never_sent or self.queue_left or self.corrupt)

    def line(self) -> str:
        return (f"seed={self.seed} kills={self.kills} phases={self.phases} sent={self.sent} "
                f"accepted={self.accepted} unsure={self.unsure} refused={self.refused} "
                f"delivered_files={self.delivered_files} duplicates={self.duplicates} "
                f"lost={len(self.lost)} partial={len(self.partial)} "
                f">2copies={len(self.more_than_twice)} "
                f"same_epoch_dup={len(self.same_epoch_duplicates)} wrong_qid={len(self.wrong_queue_id)} "
                f"never_sent={len(self.never_sent)} queue_left={len(self.queue_left)} "
                f"incomplete_left={self.incomplete_left} corrupt={self.corrupt} "
                f"drain={self.drain_seconds:.1f}s elapsed={self.elapsed:.1f}s")


def _wait_dead(pids: list[int]) -> None:
    harness.wait_for(lambda: not any(harness.pid_alive(p) for p in pids), 15, 0.02,
                     "killed processes to vanish")


def run(kills: int = 50, seed: int = 1, sessions: int = 8, size: int = 1500,
        max_delay: float = 1.5, budget: int = 100000, workdir: str | None = None,
        main_cf: dict | None = None, verbose: bool = True, mta_kind: str = "postwell") -> Summary:
    rng = random.Random(seed)
    t_start = time.monotonic()
    tmp = Path(workdir or tempfile.mkdtemp(prefix="crash-runs-"))
    if mta_kind == "postfix":
        # The same schedule against Debian's Postfix: the baseline for duplicates.
        mta = harness.ReferencePostfix(tmp, dict(main_cf or {}, default_process_limit="100"),
                                       name="crashruns-ref")
    else:
        mta = harness.PostwellInstance(tmp, main_cf, name="crashruns")
    summary = Summary(seed=seed, kills=0)
    load = None
    try:
        mta.start()
        load = Load(mta.port, sessions, size, rng, budget)
        load.start()
        for k in range(kills):
            # Most kills hit the live load; some hit the qmgr alone, working off the backlog.
            phase = rng.choice(("load", "load", "load", "backlog"))
            delay = rng.uniform(0.02, max_delay)
            if phase == "backlog":
                time.sleep(delay)
                load.pause()
                time.sleep(rng.uniform(0.0, 0.3))
            else:
                load.sending.set()
                time.sleep(delay)
            killed = mta.kill9()
            # After the SIGKILLs: a copy written before this moment belongs to the old run.
            summary.kill_times.append(time.time())
            if not killed:
                raise RuntimeError(f"kill {k}: no process to kill; log:\n{mta.log_text()[-2000:]}")
            summary.kills += 1
            summary.phases[phase] = summary.phases.get(phase, 0) + 1
            _wait_dead(killed)
            if verbose:
                print(f"kill {k + 1}/{kills}: {phase} after {delay:.2f}s, "
                      f"accepted so far {len(load.accepted)}", flush=True)
            mta.start()
            load.sending.set()
        time.sleep(rng.uniform(0.2, 0.5))
        load.finish()

        t0 = time.monotonic()

        def drained():
            if mta.queue_files(("active", "deferred")) or harness_complete(mta, "incoming"):
                return False
            got = {harness.check_delivered(p)[0] for p in mta.maildir_messages("sink")}
            return set(load.accepted) <= got
        with contextlib.suppress(TimeoutError):
            harness.wait_for(drained, 180, 0.25, "the queue to drain")
        time.sleep(1.0)   # a delivery in flight finishes, so its duplicate is counted
        summary.drain_seconds = time.monotonic() - t0
        _analyse(mta, load, summary)
    finally:
        if load is not None:
            load.finish()
        mta.stop()
        if summary.ok:
            mta.cleanup()
    summary.elapsed = time.monotonic() - t_start
    return summary


def harness_complete(mta, queue_name: str) -> list[Path]:
    """Complete (owner-execute bit set) queue files: real messages, not crash debris."""
    d = mta.queue_dir / queue_name
    # rglob: Postfix hashes some queues into subdirectories.
    return [p for p in d.rglob("*") if p.is_file() and p.stat().st_mode & 0o100] if d.is_dir() else []


def _analyse(mta, load: Load, s: Summary) -> None:
    copies: dict[str | None, list[Path]] = {}
    for path in mta.maildir_messages("sink"):
        test_id, intact = harness.check_delivered(path)
        if not intact:
            s.partial.append(path.name)
        copies.setdefault(test_id, []).append(path)
    s.sent = load.counter
    s.accepted = len(load.accepted)
    s.unsure = len(load.unsure)
    s.refused = len(load.refused)
    s.refused_samples = list(load.refused.items())[:5]
    s.delivered_files = sum(map(len, copies.values()))
    s.lost = sorted(i for i in load.accepted if i not in copies)
    s.duplicates = sum(1 for i, p in copies.items() if len(p) == 2)
    s.more_than_twice = sorted(str(i) for i, p in copies.items() if len(p) > 2)
    # Each kill may re-deliver what it caught in flight: one extra copy per kill at
    # most.  The Maildir file's mtime says between which two kills a copy was made.
    kills = sorted(s.kill_times)
    for test_id, paths in copies.items():
        if len(paths) < 2:
            continue
        epochs = [bisect.bisect_left(kills, p.stat().st_mtime) for p in paths]
        if len(set(epochs)) != len(epochs):
            s.same_epoch_duplicates.append(
                f"{test_id} (copies at {sorted(round(p.stat().st_mtime, 3) for p in paths)}, "
                f"kills at {[round(k, 3) for k in kills]})")
    for test_id, qid in load.accepted.items():
        if test_id in copies and not any(
                re.search(rb"\bid " + qid.encode() + rb"\b", p.read_bytes()) for p in copies[test_id]):
            s.wrong_queue_id.append((test_id, qid))
    s.never_sent = sorted(str(i) for i in set(copies) - set(load.accepted) - load.unsure)
    s.unsure_delivered = len(set(copies) & load.unsure)
    for q in ("incoming", "active", "deferred", "hold"):
        s.queue_left += [f"{q}/{p.name}" for p in harness_complete(mta, q)]
    inc = mta.queue_dir / "incoming"
    s.incomplete_left = sum(1 for p in inc.rglob("*") if p.is_file()) - len(harness_complete(mta, "incoming")) \
        if inc.is_dir() else 0
    corrupt = mta.queue_dir / "corrupt"
    s.corrupt = sum(1 for p in corrupt.rglob("*") if p.is_file()) if corrupt.is_dir() else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=50)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--sessions", type=int, default=8)
    ap.add_argument("--size", type=int, default=1500)
    ap.add_argument("--max-delay", type=float, default=1.5,
                    help="longest gap between a restart and the next kill (seconds)")
    ap.add_argument("--quick", action="store_true", help="5 kills, short gaps")
    ap.add_argument("--json", action="store_true", help="print the summary as JSON")
    ap.add_argument("--mta", choices=("postwell", "postfix"), default="postwell",
                    help="postfix: the same run against the reference Postfix (baseline)")
    args = ap.parse_args(argv)
    if args.quick:
        args.kills, args.max_delay = 5, 0.6
    s = run(args.kills, args.seed, args.sessions, args.size, args.max_delay, mta_kind=args.mta)
    print(json.dumps(asdict(s), default=str, indent=1) if args.json else s.line())
    if not s.ok:
        print(f"FAILED: lost {s.lost[:10]} partial {s.partial[:10]} "
              f"duplicates without a kill between {s.same_epoch_duplicates[:10]} "
              f"wrong qid {s.wrong_queue_id[:5]} never sent {s.never_sent[:5]} "
              f"left {s.queue_left[:10]} corrupt {s.corrupt}")
    return 0 if s.ok else 1


if __name__ == "__main__":
    sys.exit(main())
