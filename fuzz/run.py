#!/usr/bin/env python3
"""Long fuzz runs over fuzz/targets.py.

    python fuzz/run.py --all --runs 1000000            # every target, a seeded mutation fuzzer
    python fuzz/run.py smtp_engine --atheris --runs 1000000   # coverage-guided (pip install atheris)
    python fuzz/run.py --all --quick                   # 2,000 inputs per target (test suite)

The built-in engine needs nothing beyond the standard library: random byte
strings, splices from a per-target dictionary and mutations of earlier
inputs, all from one seed, so a failure is reproducible with --seed.
Crashing inputs are written to fuzz/crashes/<target>-<sha1>.bin; replay one
with ``--replay FILE``.  Exit status 1 when any input failed.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

DICTS = {
    "main_cf": [b"$", b"${", b"$(", b"}", b")", b"{", b"=", b"\n", b"\n ", b"\n\t", b"#", b"myhostname",
                b"mydomain", b"message_size_limit", b"smtpd_timeout", b"x", b"a", b"b", b"${x?y}",
                b"${x:y}", b"${x?{a}:{b}}", b"$x$y", b"10s", b"1d", b"yes", b"no", b"-1", b"\xff",
                b"a = $b\nb = $a\n", b"x = ${x}\n", b" = \n", b"\\"],
    "master_cf": [b"smtp", b"inet", b"unix", b"fifo", b"pass", b"n", b"y", b"-", b"0", b"100", b"?",
                  b"smtpd", b"qmgr", b"-o", b"{", b"}", b"{ a = b }", b"127.0.0.1:25", b"[::1]:25",
                  b"\n", b"\n  ", b"#", b" ", b"=", b"0?", b"60?", b"unix-dgram", b"9999999999"],
    "addresses": [b"<", b">", b"@", b"\"", b"\\", b":", b",", b";", b"(", b")", b"[", b"]", b"%", b"!",
                  b".", b"IPv6:", b"::1", b"a", b"example.org", b" ", b"\t", b"\r", b"\n", b"\x00",
                  b"SIZE=1", b"<>", b"@a,@b:c@d", b"\xff"],
    "cleanup_headers": [b"\r\n", b"\n", b"\r", b"Received: x\r\n", b"From: a@b\r\n", b"To: c\r\n",
                        b"Message-Id: <a@b>\r\n", b"Subject: ", b" folded\r\n", b"\tx\r\n", b":",
                        b"\r\n\r\n", b"Resent-From: x\r\n", b"Bcc: y\r\n", b"x" * 300, b"\x00", b"."],
}


def _mutate(rng: random.Random, data: bytes, words: list[bytes]) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        op = rng.randrange(6)
        pos = rng.randint(0, len(buf))
        if op == 0 and buf:
            buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
        elif op == 1:
            buf[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif op == 2 and buf:
            end = min(len(buf), pos + rng.randint(1, 32))
            del buf[pos:end]
        elif op == 3 and words:
            buf[pos:pos] = rng.choice(words)
        elif op == 4 and buf:
            src = rng.randrange(len(buf))
            piece = buf[src:src + rng.randint(1, 64)]
            buf[pos:pos] = piece * rng.randint(1, 4)
        elif op == 5:
            buf[pos:pos] = rng.choice((b"\r\n", b"\n", b"\r", b"\x00", b"\xff"))
    return bytes(buf[:8192])


def builtin(name: str, fn, runs: int, seed: int, out: Path, verbose: bool) -> dict:
    rng = random.Random(f"{seed}:{name}")
    words = DICTS.get(name, [])
    if name.startswith("smtp_engine"):
        from targets import SMTP_DICT
        words = SMTP_DICT
    pool: list[bytes] = [b"", b"\x00" * 16]
    crashes: dict[str, bytes] = {}
    failures = 0
    t0 = time.monotonic()
    for i in range(runs):
        r = rng.random()
        if r < 0.25 or not pool:
            data = bytes(rng.randrange(256) for _ in range(rng.randint(0, 512)))
        elif r < 0.5 and words:
            data = bytes(rng.randrange(256) for _ in range(8)) + b"".join(
                rng.choice(words) for _ in range(rng.randint(1, 40)))
        else:
            data = _mutate(rng, rng.choice(pool), words)
        try:
            fn(data)
        except Exception as exc:   # noqa: BLE001 - the contract violation we look for
            failures += 1
            tb = traceback.extract_tb(exc.__traceback__)[-1]
            key = f"{type(exc).__name__}@{Path(tb.filename).name}:{tb.lineno}"
            if key not in crashes:
                crashes[key] = data
                out.mkdir(parents=True, exist_ok=True)
                path = out / f"{name}-{hashlib.sha1(data).hexdigest()[:12]}.bin"
                path.write_bytes(data)
                if verbose:
                    print(f"  {name}: {key}: {exc!r:.200} -> {path}", flush=True)
        if len(pool) < 4096 and rng.random() < 0.02:
            pool.append(data)
        if verbose and i and i % 100000 == 0:
            print(f"  {name}: {i} inputs, {failures} failures, {time.monotonic() - t0:.0f}s",
                  flush=True)
    return {"target": name, "inputs": runs, "failures": failures, "unique": len(crashes),
            "seconds": round(time.monotonic() - t0, 1), "kinds": sorted(crashes)}


def with_atheris(name: str, runs: int, seed: int) -> int:
    import atheris
    import targets
    # postwell is usually an editable install, whose import hook atheris's
    # instrument_imports() does not see: instrument every loaded function instead.
    atheris.instrument_all()
    fn = targets.TARGETS[name]
    atheris.Setup([sys.argv[0], f"-runs={runs}", f"-seed={seed}", "-max_len=4096",
                   f"-artifact_prefix={HERE / 'crashes'}/{name}-"], fn)
    (HERE / "crashes").mkdir(exist_ok=True)
    atheris.Fuzz()
    return 0


TARGET_NAMES = ("smtp_engine", "smtp_engine_tokens", "main_cf", "master_cf", "queue_file",
                "addresses", "cleanup_headers")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("targets", nargs="*", help=f"any of {', '.join(TARGET_NAMES)}")
    ap.add_argument("--all", action="store_true")
    ap.add_argument("--runs", type=int, default=1_000_000, help="inputs per target")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="2,000 inputs per target")
    ap.add_argument("--atheris", action="store_true", help="coverage-guided, one target")
    ap.add_argument("--replay", type=Path, help="run one saved input through the target(s)")
    ap.add_argument("--crash-dir", type=Path, default=HERE / "crashes")
    ap.add_argument("-q", "--quiet", action="store_true")
    args = ap.parse_args(argv)
    names = list(TARGET_NAMES) if args.all or not args.targets else args.targets
    if args.atheris and not args.replay:
        if len(names) != 1:
            ap.error("--atheris runs one target")
        # Imported only under atheris's instrumentation, so postwell's code gets coverage.
        return with_atheris(names[0], args.runs, args.seed)
    import targets
    assert set(TARGET_NAMES) == set(targets.TARGETS)
    if args.replay:
        for n in names:
            targets.TARGETS[n](args.replay.read_bytes())
        return 0
    runs = 2000 if args.quick else args.runs
    bad = 0
    for n in names:
        res = builtin(n, targets.TARGETS[n], runs, args.seed, args.crash_dir, not args.quiet)
        print(" ".join(f"{k}={v}" for k, v in res.items()), flush=True)
        bad += res["failures"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
