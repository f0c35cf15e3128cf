"""Issue 4 end to end: a flood of mail through a relayhost that accepts slowly.

smtp-source pushes N messages into a running postwell whose relayhost is a
PySink that sleeps a little before each 250.  The sink records every Message-Id:
nothing may be lost, nothing delivered twice, and connection reuse must show as
far fewer sessions than messages.  Bounded in count and time; N comes from
POSTWELL_FLOOD_MESSAGES (default 5000).
"""

from __future__ import annotations

import os
import re
import time

import pytest

import harness
from test_outbound_peers import PySink
from test_outbound_relay import outbound_postwell, send

N = int(os.environ.get("POSTWELL_FLOOD_MESSAGES", "5000"))
pytestmark = [pytest.mark.postfix, pytest.mark.slow,
              pytest.mark.skipif(not os.access(harness.SMTP_SOURCE, os.X_OK),
                                 reason="smtp-source not installed")]


def test_flood_to_a_slow_relayhost_loses_nothing_and_reuses_connections(postwell_factory):
    with PySink(data_delay=0.002) as sink:
        pw = outbound_postwell(postwell_factory, {"relayhost": f"[127.0.0.1]:{sink.port}"})
        pw.start()
        t0 = time.monotonic()
        src = harness.smtp_source(pw.port, sessions=10, messages=N, size=600,
                                  recipient="x@remote.test", timeout=150)
        assert src.ok, src.stderr
        accepted = time.monotonic() - t0
        sink.wait_transactions(N, 150)
        pw.wait_queue_empty(60)
        elapsed = time.monotonic() - t0
        time.sleep(0.5)              # a duplicate would arrive now
        ids = sink.message_ids()
        sessions = sink.sessions
    log = pw.log_text()
    sent = len(re.findall(r"to=<x@remote\.test>, relay=127\.0\.0\.1\[127\.0\.0\.1\]:\d+, "
                          r"(?:conn_use=\d+, )?delay=.*status=sent", log))
    conn_uses = [int(x) for x in re.findall(r"conn_use=(\d+)", log)]
    print(f"\nflood: messages={N} sessions={sessions} accepted_in={accepted:.1f}s "
          f"elapsed={elapsed:.1f}s conn_use_max={max(conn_uses, default=0)}")
    assert None not in ids
    assert len(ids) == N, f"peer got {len(ids)} of {N}"
    assert len(set(ids)) == N, f"{N - len(set(ids))} duplicates"
    assert sent == N
    assert sessions <= N // 20, f"{sessions} sessions for {N} messages: no reuse?"
    assert "status=deferred" not in log and "status=bounced" not in log


def test_conn_use_is_logged_on_a_reused_connection(postwell_factory):
    """Postfix: '... relay=127.0.0.1[127.0.0.1]:PORT, conn_use=2, delay=...'."""
    with PySink() as sink:
        pw = outbound_postwell(postwell_factory, {"relayhost": f"[127.0.0.1]:{sink.port}"})
        pw.start()
        for i in range(3):
            send(pw.port, ["x@remote.test"], harness.make_message(f"reuse-{i}"))
            sink.wait_transactions(i + 1, 20)     # one at a time: the cached one is idle
        pw.wait_queue_empty(20)
        assert sink.sessions == 1
        log = pw.log_text()
    assert re.search(rf"to=<x@remote\.test>, relay=127\.0\.0\.1\[127\.0\.0\.1\]:{sink.port}, "
                     r"conn_use=2, delay=", log), log
