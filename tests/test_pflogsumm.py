"""Debian's pflogsumm over a maillog written by a running postwell.

One instance receives, delivers, forwards, bounces, defers and rejects a
known set of messages; pflogsumm's "Grand Totals" must count each of them.
A log line whose shape drifts from Postfix's makes a count go wrong here.
The same traffic through the reference Postfix gives the same numbers.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from harness import HOSTNAME, ReferencePostfix, dialogue, free_port, wait_for  # noqa: E402
from test_issue3_local_e2e import TIMEOUT, e2e_users, site  # noqa: E402,F401
from test_sendmail import run as run_sendmail  # noqa: E402

PFLOGSUMM = "/usr/sbin/pflogsumm"

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create real users"),
    pytest.mark.skipif(not os.path.exists(PFLOGSUMM), reason="Debian's pflogsumm is not installed"),
]

# What the traffic below must add up to.
EXPECTED = {"received": 4, "delivered": 3, "forwarded": 1, "deferred": 1, "bounced": 1, "rejected": 1}


def aliases_text() -> str:
    return ("postmaster: root\nroot: pwe1\n"
            "away: someone@far.test\n"
            'runit: "|/bin/true"\n')


def traffic_params(relay_port: int) -> dict:
    return {
        "relayhost": f"[127.0.0.1]:{relay_port}",     # nothing listens: remote mail is deferred
        "allow_mail_to_commands": "forward",          # the |command alias bounces
        "minimal_backoff_time": "1h", "maximal_backoff_time": "2h", "queue_run_delay": "1h",
    }


def grand_totals(report: str) -> dict[str, int]:
    """The message counts of pflogsumm's "Grand Totals" section."""
    section = report.split("Grand Totals", 1)[1].split("Per-Day", 1)[0]
    counts = {}
    for word in ("received", "delivered", "forwarded", "deferred", "bounced", "rejected"):
        m = re.search(rf"^\s*(\d+)\s+{word}\b", section, re.M)
        assert m, f"no '{word}' count in:\n{section}"
        counts[word] = int(m.group(1))
    return counts


def comparable(report: str) -> str:
    """The parts of a report that must agree between two MTAs given the same traffic:
    the totals (byte counts aside: header wording differs) and the deferral,
    bounce and reject details (the refused port aside)."""
    totals = report.split("Grand Totals", 1)[1].split("Per-Hour", 1)[0]
    details = report.split("message deferral detail", 1)[1].split("Master daemon messages", 1)[0]
    text = "\n".join(ln for ln in (totals + details).splitlines() if "bytes" not in ln)
    return re.sub(r"\]:\d+", "]:PORT", text)


def run_pflogsumm(maillog: Path) -> str:
    cp = subprocess.run([PFLOGSUMM, str(maillog)], capture_output=True, text=True, timeout=60)
    assert cp.returncode == 0, cp.stderr
    return cp.stdout


def smtp_message(port: int, sender: str, rcpts: list[str]) -> list:
    lines = ["EHLO client.test", f"MAIL FROM:<{sender}>"] + [f"RCPT TO:<{r}>" for r in rcpts]
    lines += ["DATA", "Subject: pflogsumm", "", "hello", ".", "QUIT"]
    return dialogue(port, lines, timeout=TIMEOUT)


def send_traffic(port: int, submit) -> None:
    """The fixed traffic: 4 received (3 SMTP, 1 sendmail), 1 rejected."""
    # delivered to a mailbox
    assert smtp_message(port, "sender@remote.test", [f"pwe1@{HOSTNAME}"])[-2].code == 250
    # forwarded by an alias to a remote address, which is then deferred
    assert smtp_message(port, "sender@remote.test", [f"away@{HOSTNAME}"])[-2].code == 250
    # bounced (mail to command is restricted); the notice to the local sender is delivered
    assert smtp_message(port, f"pwe2@{HOSTNAME}", [f"runit@{HOSTNAME}"])[-2].code == 250
    # rejected at RCPT: no such user
    replies = dialogue(port, ["EHLO client.test", "MAIL FROM:<sender@remote.test>",
                              f"RCPT TO:<nosuchpwe@{HOSTNAME}>", "QUIT"], timeout=TIMEOUT)
    assert replies[3].code == 550
    # a local submission through sendmail, delivered
    submit(["-f", f"pwe1@{HOSTNAME}", f"pwe3@{HOSTNAME}"], b"Subject: cron\n\nreport\n")


def wait_traffic_done(log_text, timeout: float = TIMEOUT) -> None:
    def done():
        text = log_text()
        return (len(re.findall(r"status=sent \(delivered to mailbox\)", text)) >= 3
                and "status=deferred" in text and "status=bounced" in text
                and re.search(r"status=sent \(forwarded as", text))
    try:
        wait_for(done, timeout, 0.1, "the traffic to be delivered, deferred and bounced")
    except TimeoutError:
        raise AssertionError(log_text()[-4000:]) from None


def test_pflogsumm_counts_postwell_log(site, e2e_users):
    s = site(traffic_params(free_port()), aliases=aliases_text())

    def submit(args, data):
        rc, _, err = run_sendmail(["-C", str(s.inst.config_dir), *args], data, user="pwe1")
        assert (rc, err) == (0, b"")
    send_traffic(s.inst.port, submit)
    wait_traffic_done(s.inst.log_text)
    report = run_pflogsumm(s.inst.maillog)
    assert grand_totals(report) == EXPECTED, report
    # pflogsumm parses the per-message size from the qmgr lines: bytes received is not zero.
    assert re.search(r"^\s*[1-9]\d*k?\s+bytes received", report, re.M), report


def test_pflogsumm_same_report_as_reference_postfix(site, tmp_path, e2e_users):
    """The reference Postfix, given the same configuration and traffic, counts the same."""
    from harness import reference_available
    if reference_available():
        pytest.skip(reference_available())
    relay_port = free_port()
    s = site(traffic_params(relay_port), aliases=aliases_text())

    def submit_postwell(args, data):
        rc, _, err = run_sendmail(["-C", str(s.inst.config_dir), *args], data, user="pwe1")
        assert (rc, err) == (0, b"")
    send_traffic(s.inst.port, submit_postwell)
    wait_traffic_done(s.inst.log_text)
    ours = run_pflogsumm(s.inst.maillog)
    ref = ReferencePostfix(tmp_path, name="pflog-ref")
    spool = ref.root / "spool"
    spool.mkdir()
    os.chown(spool, 0, 8)
    os.chmod(spool, 0o2775)
    aliases = ref.config_dir / "aliases"
    aliases.write_text(aliases_text())
    params = {"myorigin": "$myhostname", "mydestination": "$myhostname, localhost",
              "local_transport": "local", "alias_maps": f"hash:{aliases}",
              "alias_database": f"hash:{aliases}",
              "local_recipient_maps": "proxy:unix:passwd.byname $alias_maps",
              "mail_spool_directory": str(spool), "recipient_delimiter": "+"}
    params.update(traffic_params(relay_port))
    ref.main_cf_extra = params
    ref.write_config()
    cp = subprocess.run(["/usr/sbin/postalias", str(aliases)], capture_output=True, text=True, timeout=30)
    assert cp.returncode == 0, cp.stderr
    try:
        ref.start()

        def submit(args, data):
            pw = e2e_users["pwe1"]
            cp = subprocess.run(["/usr/sbin/sendmail", "-C", str(ref.config_dir), *args], input=data,
                                capture_output=True, timeout=30, user=pw.pw_uid, group=pw.pw_gid,
                                extra_groups=[], cwd="/")
            assert (cp.returncode, cp.stderr) == (0, b"")
        send_traffic(ref.port, submit)
        wait_traffic_done(ref.log_text)
        report = run_pflogsumm(ref.maillog)
        assert grand_totals(report) == EXPECTED, report
        assert comparable(ours) == comparable(report), f"postwell:\n{ours}\nPostfix:\n{report}"
    finally:
        ref.stop()
        ref.cleanup()
