"""Crash runs, quick form: five kill -9 of the whole postwell under SMTP load.

The long form (50+ kills, seeded) is soak/crash_runs.py; this test runs the
same code with ``--quick`` settings so a regression in the 250-after-fsync
rule or in crash recovery shows up in the default suite.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

import harness

pytestmark = [pytest.mark.slow]

SOAK = Path(__file__).resolve().parent.parent / "soak" / "crash_runs.py"


def _crash_runs():
    spec = importlib.util.spec_from_file_location("crash_runs", SOAK)
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("crash_runs", mod)   # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.timeout(240)
def test_quick_crash_runs_lose_nothing(tmp_path):
    if not harness.is_root():
        pytest.skip("kill -9 of a privilege-dropping MTA needs root")
    s = _crash_runs().run(kills=5, seed=20261129, sessions=6, max_delay=0.6,
                          workdir=str(tmp_path), verbose=False)
    print(s.line())
    assert s.kills == 5
    assert s.accepted > 0, s.refused_samples
    assert not s.lost, f"{s.line()}\nlost: {s.lost[:20]}"
    assert not s.partial, f"{s.line()}\npartial deliveries: {s.partial[:20]}"
    assert not s.wrong_queue_id, f"{s.line()}\n250 queue id not in Received: {s.wrong_queue_id[:10]}"
    assert not s.never_sent, f"{s.line()}\ndelivered but never sent: {s.never_sent[:10]}"
    assert not s.queue_left, f"{s.line()}\nstill queued: {s.queue_left[:10]}"
    assert not s.corrupt, s.line()
    assert s.refused == 0, s.refused_samples
    # A kill may re-deliver what it caught in flight, so a message can have one copy
    # per kill it lived through; two copies made with no kill between them are a bug.
    assert not s.same_epoch_duplicates, (
        f"{s.line()}\nduplicated without a crash: {s.same_epoch_duplicates[:10]}")


def test_crash_runs_script_has_quick_mode():
    mod = _crash_runs()
    assert callable(mod.main) and callable(mod.run)
