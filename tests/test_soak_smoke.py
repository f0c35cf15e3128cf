"""Issue 7: the mixed-traffic soak in its ~20 s form (soak/mixed.py --quick).

The full form (`--minutes 30`) is a manual run; this one checks that the
driver, the sampler and the report work, and that a short burst of every kind
of traffic leaves no unexpected warning/error in the log.  Loopback only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import harness

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [
    pytest.mark.skipif(not os.access(harness.SMTP_SINK, os.X_OK), reason="smtp-sink missing"),
    pytest.mark.skipif(not os.access(harness.SMTP_SOURCE, os.X_OK), reason="smtp-source missing"),
    pytest.mark.skipif(not harness.is_root(), reason="postwell drops to a test mail_owner: needs root"),
]


def test_mixed_soak_quick(tmp_path):
    out = tmp_path / "soak.json"
    cp = subprocess.run([sys.executable, str(ROOT / "soak" / "mixed.py"), "--quick", "--seed", "3",
                         "--json", str(out)], capture_output=True, text=True, timeout=240,
                        stdin=subprocess.DEVNULL)
    assert cp.returncode == 0, cp.stdout[-4000:] + cp.stderr[-2000:]
    data = json.loads(out.read_text())
    assert {"master", "smtpd", "qmgr"} <= set(data["roles"])
    counts = data["counts"]
    assert counts["accepted (cleanup message-id)"] > 20
    assert counts["delivered (status=sent)"] > 20
    # The 4xx and 5xx sinks were reached: deferrals and bounces happened.
    assert counts["deferred (status=deferred)"] > 0
    assert counts["bounced (status=bounced)"] > 0
    assert counts["RCPT rejected (NOQUEUE)"] > 0
    assert data["client"].get("relay denied sessions", 0) > 0
    assert not [e for e in data["log"] if not e["expected"]]
    assert "soak: PASS" in cp.stdout
