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
