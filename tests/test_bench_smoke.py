"""bench/run.py --quick runs end to end and prints its comparison table."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import harness

pytestmark = pytest.mark.postfix

BENCH = Path(__file__).resolve().parent.parent / "bench" / "run.py"


@pytest.mark.timeout(180)
def test_bench_quick():
    reason = harness.reference_available()
    if reason:
        pytest.skip(reason)
    cp = subprocess.run([sys.executable, str(BENCH), "--quick"], capture_output=True, text=True,
                        timeout=170, stdin=subprocess.DEVNULL)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    assert re.search(r"^\s+4\s+postfix\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+\d+$", cp.stdout, re.M), cp.stdout
    assert re.search(r"^\s+4\s+postwell\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+\d+$", cp.stdout, re.M), cp.stdout
    assert re.search(r"^\s+4\s+ratio\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+\(postwell/Postfix\)$",
                     cp.stdout, re.M), cp.stdout


@pytest.mark.timeout(180)
def test_bench_quick_deliver_only_releases_postwell_hold():
    # The held messages carry postwell's hold mark: released into incoming/ without
    # clearing it they would go straight back to hold/ and nothing would be delivered.
    reason = harness.reference_available()
    if reason:
        pytest.skip(reason)
    cp = subprocess.run([sys.executable, str(BENCH), "--quick", "--deliver-only", "--mode", "virtual"],
                        capture_output=True, text=True, timeout=170, stdin=subprocess.DEVNULL)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    rates = dict(re.findall(r"^\s+4\s+(postfix|postwell)\s+([\d.]+)\s+[\d.na]+$", cp.stdout, re.M))
    assert set(rates) == {"postfix", "postwell"}, cp.stdout
    assert float(rates["postwell"]) > 0 and float(rates["postfix"]) > 0, cp.stdout
