"""The qmgr end to end: a running postwell relays through relayhost to a real
/usr/sbin/smtp-sink (200 messages: all delivered once, connections reused and
logged with conn_use=N), and transport_maps reach the other agents (lmtp to
smtp-sink -L, discard, error)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections import Counter

import pytest

import harness
from harness import PostwellInstance, SmtpSink, dialogue, smtp_source, wait_for

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not harness.is_root(), reason="drops privileges: needs root")]

MESSAGES = 200

MASTER_CF_EXTRA = (
    "pickup    unix  n       -       n       60      1       pickup\n"
    "smtp      unix  -       -       n       -       -       smtp\n"
    "relay     unix  -       -       n       -       -       smtp\n"
    "        -o syslog_name=postfix/$service_name\n"
    "lmtp      unix  -       -       n       -       -       lmtp\n"
    "mypipe    unix  -       n       n       -       -       pipe user=nobody "
    "argv=/bin/sh -c { cat >/dev/null }\n"
)


def _sent_lines(log: str, service: str, relay_port: int) -> list[tuple[str, str]]:
    pat = re.compile(rf"postfix/{service}\[\d+\]: (\w+): to=<([^>]*)>, "
                     rf"relay=127\.0\.0\.1\[127\.0\.0\.1\]:{relay_port}(?:, conn_use=\d+)?, "
                     r"delay=[\d.]+, delays=[\d./]+, dsn=2\.\d+\.\d+, status=sent \(")
    return pat.findall(log)


@pytest.mark.timeout(240)
def test_relayhost_to_smtp_sink_200_messages_once_each(tmp_path):
    sink = SmtpSink()
    lsink = SmtpSink(extra=["-L"])
    inst = PostwellInstance(tmp_path, name="qmgr-e2e")
    try:
        tmap = inst.config_dir / "transport"
        tmap.write_text(f"lmtp.test lmtp:inet:127.0.0.1:{lsink.port}\n"
                        "pipe.test mypipe:\n"
                        "discard.test discard:silently\n"
                        "error.test error:5.7.1 mail for this domain is refused\n")
        inst.main_cf = {"relayhost": f"[127.0.0.1]:{sink.port}",
                        "transport_maps": f"texthash:{tmap}", "relay_domains": "relay.test"}
        inst.master_cf = inst.default_master_cf() + MASTER_CF_EXTRA
        inst.write_config()
        inst.start()
        t0 = time.monotonic()
        res = smtp_source(inst.port, sessions=4, messages=MESSAGES, size=1024,
                          recipient="user@remote.example", timeout=120)
        assert res.ok, (res.stdout, res.stderr)
        others = ("a@lmtp.test", "b@discard.test", "d@pipe.test", "e@relay.test",
                  f"alice@{harness.VIRTUAL_DOMAIN}")
        for rcpt in others:
            replies = dialogue(inst.port, ["EHLO client.test", "MAIL FROM:<s@remote.example>",
                                           f"RCPT TO:<{rcpt}>", "DATA",
                                           "Subject: route\r\n\r\nhello\r\n.", "QUIT"])
            assert replies[-2].code == 250, [str(r) for r in replies]
        # smtpd refuses an error: destination at RCPT time (as Postfix does), so
        # this one comes in through sendmail/pickup.
        _sendmail(inst, "c@error.test")
        sink.wait_count(MESSAGES, timeout=90)
        lsink.wait_count(1, timeout=30)
        inst.wait_log(r"postfix/error\[\d+\]: \w+: to=<c@error\.test>", timeout=30)
        inst.wait_maildir("alice", 1, timeout=30)
        inst.wait_queue_empty(timeout=60)
        elapsed = time.monotonic() - t0
        time.sleep(0.5)           # anything delivered twice would show up by now
        # + 2: e@relay.test (relay transport, relayhost) and the bounce for
        # c@error.test going back to s@remote.example
        assert sink.count == MESSAGES + 2, f"sink got {sink.count}, expected {MESSAGES + 2}"
        assert lsink.count == 1

        log = inst.log_text()
        sent = [x for x in _sent_lines(log, "smtp", sink.port) if x[1] == "user@remote.example"]
        bounce = [x for x in _sent_lines(log, "smtp", sink.port) if x[1] == "s@remote.example"]
        assert len(bounce) == 1, bounce
        ids = Counter(qid for qid, _ in sent)
        assert len(sent) == MESSAGES and len(ids) == MESSAGES, \
            (len(sent), [q for q, n in ids.items() if n > 1][:5])
        # Every message the smtpd accepted (qmgr's "from=" line) was sent exactly once.
        relayed = {qid for qid in re.findall(r"postfix/qmgr\[\d+\]: (\w+): from=<[^>]*>, size=\d+, "
                                             r"nrcpt=1 \(queue active\)", log)}
        assert set(ids) <= relayed
        # Connections were reused and Postfix's conn_use=N says so, right after relay=.
        reused = re.findall(rf"relay=127\.0\.0\.1\[127\.0\.0\.1\]:{sink.port}, conn_use=(\d+), delay=",
                            log)
        assert reused and all(int(n) >= 2 for n in reused), reused[:5]
        assert "delivery failed unexpectedly" not in log
        # The other transports, each through its agent and log service name.
        assert re.search(rf"postfix/lmtp\[\d+\]: \w+: to=<a@lmtp\.test>, "
                         rf"relay=127\.0\.0\.1\[127\.0\.0\.1\]:{lsink.port}, .*status=sent", log)
        assert re.search(r"postfix/discard\[\d+\]: \w+: to=<b@discard\.test>, relay=none, .*"
                         r"status=sent \(silently\)", log)
        # Tagged as Postfix does: $syslog_name/<command>, the relay service with its
        # own syslog_name; the pipe service "mypipe" as postfix/pipe.
        assert re.search(rf"postfix/relay/smtp\[\d+\]: \w+: to=<e@relay\.test>, "
                         rf"relay=127\.0\.0\.1\[127\.0\.0\.1\]:{sink.port}, .*status=sent", log)
        assert re.search(r"postfix/pipe\[\d+\]: \w+: to=<d@pipe\.test>, relay=mypipe, .*"
                         r"status=sent \(delivered via mypipe service\)", log)
        assert re.search(r"postfix/virtual\[\d+\]: \w+: to=<alice@virtual\.test>, relay=virtual, .*"
                         r"status=sent \(delivered to maildir\)", log)
        assert re.search(r"postfix/error\[\d+\]: \w+: to=<c@error\.test>, relay=none, .*"
                         r"dsn=5\.7\.1, status=bounced \(mail for this domain is refused\)", log)
        print(f"{MESSAGES} relayed in {elapsed:.1f}s, {len(reused)} over reused connections")
    finally:
        inst.stop()
        inst.cleanup()
        sink.stop()
        lsink.stop()


def _sendmail(inst, rcpt: str) -> None:
    cmd = [sys.executable, "-m", "postwell.cli.sendmail", "-C", str(inst.config_dir),
           "-f", "s@remote.example", rcpt]
    cp = subprocess.run(cmd, input=b"Subject: route\n\nhello\n", capture_output=True, timeout=30,
                        env=dict(os.environ, MAIL_CONFIG=str(inst.config_dir)))
    assert cp.returncode == 0, (cp.stdout, cp.stderr)


def test_default_transport_error_disables_outbound_mail(tmp_path):
    inst = PostwellInstance(tmp_path, {"default_transport": "error:mail disabled"},
                            name="qmgr-e2e-off")
    try:
        inst.master_cf = inst.default_master_cf() + MASTER_CF_EXTRA
        inst.write_config()
        inst.start()
        _sendmail(inst, "user@remote.example")
        inst.wait_log(r"postfix/error\[\d+\]: \w+: to=<user@remote\.example>, relay=none, .*"
                      r"dsn=5\.0\.0, status=bounced \(mail disabled\)", timeout=30)
        # The bounce goes back to the sender's (remote) domain: also "mail disabled".
        wait_for(lambda: len(re.findall(r"status=bounced \(mail disabled\)", inst.log_text())) >= 2,
                 30, 0.1, "the bounce to bounce too")
    finally:
        inst.stop()
        inst.cleanup()
