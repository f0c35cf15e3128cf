"""Issue 4 end to end: deferrals, retries and bounces against real peers.

smtp-sink(1) with its soft/hard reject options produces the 4xx and 5xx
answers; a running postwell relays to it, and the bounce (an RFC 3464 DSN)
comes back to the sender's virtual mailbox on the same instance, where the
email package parses it.  Loopback only; every wait bounded.
"""

from __future__ import annotations

import email
import email.policy
import os
import re
import subprocess
import sys
import time

import pytest

import harness
from test_outbound_peers import PySink
from test_outbound_relay import outbound_postwell, send

pytestmark = [pytest.mark.postfix,
              pytest.mark.skipif(not os.access(harness.SMTP_SINK, os.X_OK),
                                 reason="smtp-sink not installed")]

SENDER = f"alice@{harness.VIRTUAL_DOMAIN}"
# Long waits between queue runs, so only "postqueue -f" can explain a quick retry.
SLOW_RETRY = {"queue_run_delay": "300s", "minimal_backoff_time": "300s",
              "maximal_backoff_time": "600s"}


def relay_to(factory, port: int, **extra):
    params = {"relayhost": f"[127.0.0.1]:{port}", **extra}
    return outbound_postwell(factory, params).start()


def parse_dsn(path):
    """(the whole message, {field: value} of the per-recipient part, the report part)."""
    msg = email.message_from_bytes(path.read_bytes(), policy=email.policy.compat32)
    assert msg.get_content_type() == "multipart/report", msg.get_content_type()
    assert msg.get_param("report-type") == "delivery-status"
    parts = msg.get_payload()
    report = next(p for p in parts if p.get_content_type() == "message/delivery-status")
    blocks = report.get_payload()         # the per-message block, then one per recipient
    per_rcpt = [dict(b.items()) for b in blocks[1:]]
    return msg, per_rcpt, dict(blocks[0].items())


@pytest.mark.parametrize("flush", [("postqueue", "-f"), ("sendmail", "-q")])
def test_soft_reject_defers_shows_in_postqueue_and_flush_retries(postwell_factory, flush):
    soft = harness.SmtpSink(extra=["-r", "RCPT"])
    port = soft.port
    try:
        pw = relay_to(postwell_factory, port, **SLOW_RETRY)
        send(pw.port, ["x@remote.test"], harness.make_message("soft-1"))
        line = pw.wait_log(r"to=<x@remote\.test>.*status=deferred .*$", 30).group(0)
        assert (f"relay=127.0.0.1[127.0.0.1]:{port}, " in line and "dsn=4.3.0, " in line
                and line.endswith(f"status=deferred (host 127.0.0.1[127.0.0.1] said: 450 4.3.0 "
                                  "Error: command failed (in reply to RCPT TO command))")), line
        harness.wait_for(lambda: pw.queue_files(("deferred",)), 10, 0.1, "a deferred queue file")
        q = pw.run("postqueue", "-p", check=True).stdout
        assert re.search(r"^\w+\s+\d+ \w{3} \w{3}\s+\d+ \d\d:\d\d:\d\d  alice@virtual\.test$", q,
                         re.M), q
        assert ("(host 127.0.0.1[127.0.0.1] said: 450 4.3.0 Error: command failed "
                "(in reply to RCPT TO command))") in q, q
        assert "x@remote.test" in q
    finally:
        soft.stop()
    good = harness.SmtpSink(port=port)
    try:
        t0 = time.monotonic()
        if flush[0] == "sendmail":
            # Not pw.run(): it passes "-c DIR", which sendmail ignores as an option
            # and then takes DIR and -q for recipients; -C names the configuration.
            cp = subprocess.run([sys.executable, "-m", "postwell.cli.sendmail", "-C",
                                 str(pw.config_dir), "-q"], capture_output=True, text=True,
                                timeout=30, stdin=subprocess.DEVNULL)
            assert cp.returncode == 0, cp.stderr
        else:
            pw.run(*flush, check=True)
        pw.wait_log(r"to=<x@remote\.test>.*status=sent \(250 2\.0\.0 Ok\)$", 20)
        assert time.monotonic() - t0 < 20          # not the 300 s queue run
        assert good.wait_count(1, 10) == 1
        pw.wait_queue_empty(10)
        assert "Mail queue is empty" in pw.run("postqueue", "-p").stdout
    finally:
        good.stop()


def test_hard_reject_bounces_with_a_dsn_to_the_sender(postwell_factory):
    reply = "550 5.1.1 <x@remote.test>: Recipient address rejected: User unknown"
    with harness.SmtpSink(extra=["-f", "RCPT", "-B", reply]) as sink:
        pw = relay_to(postwell_factory, sink.port)
        send(pw.port, ["x@remote.test"], harness.make_message("hard-1"))
        line = pw.wait_log(r"(\w+): to=<x@remote\.test>.*status=bounced .*$", 30)
        qid = line.group(1)
        assert line.group(0).endswith(
            f"dsn=5.1.1, status=bounced (host 127.0.0.1[127.0.0.1] said: {reply} "
            "(in reply to RCPT TO command))"), line.group(0)
        ndn = pw.wait_log(rf"{qid}: sender non-delivery notification: (\w+)", 10).group(1)
        box, = pw.wait_maildir("alice", 1, 20)
    msg, rcpts, head = parse_dsn(box)
    assert msg["From"].startswith("MAILER-DAEMON@") or "MAILER-DAEMON" in msg["From"]
    assert re.search(r"^Return-Path: <>", box.read_text("utf-8", "replace"), re.M)
    assert head["Reporting-MTA"] == f"dns; {harness.HOSTNAME}"
    assert "Arrival-Date" in head
    r, = rcpts
    assert r["Final-Recipient"] == "rfc822; x@remote.test"
    assert r["Action"] == "failed"
    assert r["Status"] == "5.1.1"
    assert r["Remote-MTA"] == "dns; 127.0.0.1"
    assert r["Diagnostic-Code"].split() == f"smtp; {reply}".split()
    assert pw.wait_log(rf"{ndn}: to=<{SENDER}>.*status=sent", 10)
    pw.wait_queue_empty(20)


def test_one_of_three_recipients_refused_in_one_transaction(postwell_factory):
    """Per-recipient results: 550 for one RCPT does not fail the other two."""
    bad = "550 5.1.1 <carol@remote.test>: Recipient address rejected: User unknown"
    with PySink(rcpt_reply=lambda a: bad if a.startswith("carol@") else None) as sink:
        pw = relay_to(postwell_factory, sink.port)
        rcpts = ["amy@remote.test", "carol@remote.test", "dan@remote.test"]
        send(pw.port, rcpts, harness.make_message("three-1"))
        t, = sink.wait_transactions(1, 30)
        assert t.rcpts == ["amy@remote.test", "dan@remote.test"]
        assert t.message_id == "<three-1@example.org>"
        for r in ("amy", "dan"):
            pw.wait_log(rf"to=<{r}@remote\.test>.*status=sent \(250 2\.0\.0 Ok: queued\)$", 20)
        pw.wait_log(r"to=<carol@remote\.test>.*dsn=5\.1\.1, status=bounced \(host 127\.0\.0\.1"
                    r"\[127\.0\.0\.1\] said: 550 5\.1\.1 .* \(in reply to RCPT TO command\)\)$", 20)
        box, = pw.wait_maildir("alice", 1, 20)
        time.sleep(0.5)               # a second notice would show up here
        assert len(pw.maildir_messages("alice")) == 1
        assert len(re.findall(r"sender non-delivery notification", pw.log_text())) == 1
        assert sink.sessions == 1     # one connection, one transaction
    _, per_rcpt, _ = parse_dsn(box)
    assert [r["Final-Recipient"] for r in per_rcpt] == ["rfc822; carol@remote.test"]
    assert per_rcpt[0]["Status"] == "5.1.1"


class Tarpit:
    """Accepts connections and never says a word (a dead-slow destination)."""

    def __init__(self):
        import socket
        import threading
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(256)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.conns = []
        self.running = True
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        while self.running:
            try:
                c, _ = self.sock.accept()
            except OSError:
                continue
            self.conns.append(c)

    def close(self):
        self.running = False
        self.thread.join(5)
        for c in self.conns:
            c.close()
        self.sock.close()


def test_a_dead_destination_does_not_starve_a_healthy_one(postwell_factory):
    """Postfix's per-destination concurrency (initial_destination_concurrency,
    default_destination_concurrency_limit): mail for a destination whose server
    hangs after connect must not hold up mail for everyone else."""
    pit = Tarpit()
    try:
        with PySink() as good:
            pw = outbound_postwell(postwell_factory, {
                "transport_maps": "texthash:$config_directory/transport"})
            (pw.config_dir / "transport").write_text(
                f"dead.test smtp:[127.0.0.1]:{pit.port}\ngood.test smtp:[127.0.0.1]:{good.port}\n")
            pw.start()
            with __import__("smtplib").SMTP("127.0.0.1", pw.port, timeout=15) as s:
                for i in range(60):
                    s.sendmail(SENDER, [f"u{i}@dead.test"], harness.make_message(f"dead-{i}"))
                for i in range(10):
                    s.sendmail(SENDER, [f"u{i}@good.test"], harness.make_message(f"good-{i}"))
            t0 = time.monotonic()
            good.wait_transactions(10, 20)
            took = time.monotonic() - t0
            parallel = len(pit.conns)
    finally:                       # hung sessions end here, before the instance stops
        pit.close()
    print(f"\ndead destination: {parallel} parallel sessions; healthy mail took {took:.1f}s")
    assert parallel <= 20          # default_destination_concurrency_limit
