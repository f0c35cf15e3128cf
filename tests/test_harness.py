"""The harness itself: reference Postfix fixture, raw dialogues, smtp-source/sink.

These run against Debian's Postfix only, so everyone can rely on the fixtures
before postwell's own parts exist.
"""

from __future__ import annotations

import re
import smtplib

import pytest

import harness

pytestmark = pytest.mark.postfix

# Postfix's maillog_file line: "Mon dd hh:mm:ss host program[pid]: text" (no year,
# no sub-seconds, host = first label of myhostname).  postwell.log writes the same.
# libpostfix-util formats the stamp with strftime "%b %d %H:%M:%S" (zero-padded day).
LOG_LINE = re.compile(r"^[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d mx postfix/[\w-]+\[\d+\]: \S.*$")


def test_free_port_is_bindable():
    import socket
    port = harness.free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_reference_postfix_delivers_to_virtual_maildir(reference_postfix):
    ref = reference_postfix
    before = len(ref.maildir_messages("bob"))
    msg = harness.make_message("harness-1", recipient=f"bob@{harness.VIRTUAL_DOMAIN}")
    with smtplib.SMTP("127.0.0.1", ref.port, timeout=10) as s:
        code, banner = s.docmd("NOOP")
        assert code == 250
        s.ehlo("client.example.org")
        s.sendmail("sender@example.org", [f"bob@{harness.VIRTUAL_DOMAIN}"], msg)
    files = ref.wait_maildir("bob", before + 1)
    test_id, intact = harness.check_delivered(files[-1])
    assert (test_id, intact) == ("harness-1", True)
    m = ref.wait_log(r"postfix/virtual\[\d+\]: (\w+): to=<bob@virtual\.test>, relay=virtual, "
                     r"delay=[\d.]+, delays=[\d./]+, dsn=2\.0\.0, status=sent \(delivered to maildir\)")
    ref.wait_log(rf"postfix/qmgr\[\d+\]: {m.group(1)}: removed")


def test_reference_log_line_shape(reference_postfix):
    reference_postfix.wait_log(r"postfix/master\[\d+\]: daemon started")
    lines = [ln for ln in reference_postfix.log_text().splitlines() if ln]
    assert lines and all(LOG_LINE.match(ln) for ln in lines), lines[:5]


def test_postwell_log_format_matches_reference_shape(tmp_path):
    from postwell.log import MailLog
    log = MailLog("smtpd", maillog_file=str(tmp_path / "log"), hostname="mx.example.test",
                  clock=lambda: 1_700_000_000.0)
    log.info("connect from unknown[127.0.0.1]")
    log.close()
    line = (tmp_path / "log").read_text().rstrip("\n")
    assert LOG_LINE.match(line), line


def test_dialogue_reads_multiline_and_enhanced_codes(reference_postfix):
    replies = harness.dialogue(reference_postfix.port, [
        "EHLO client.example.org", "MAIL FROM:<a@example.org>",
        f"RCPT TO:<nobody@{harness.VIRTUAL_DOMAIN}>", "QUIT"])
    assert harness.normalise(replies) == [
        (220, None), (250, None), (250, "2.1.0"), (550, "5.1.1"), (221, "2.0.0")]
    assert "PIPELINING" in replies[1].lines
    assert replies[3].text.endswith("User unknown in virtual mailbox table")


def test_dialogue_pipelined_data(reference_postfix):
    msg = ["Subject: pipelined", "", "body", "..leading dot", "."]
    replies = harness.dialogue(reference_postfix.port, [
        "EHLO client.example.org", "MAIL FROM:<a@example.org>",
        f"RCPT TO:<carol@{harness.VIRTUAL_DOMAIN}>", "DATA", *msg, "QUIT"], pipelined=True)
    codes = [r.code for r in replies]
    assert codes == [220, 250, 250, 250, 354, 250, 221], [str(r) for r in replies]
    assert harness.QUEUED_RE.search(replies[5].text)


def test_smtp_source_and_sink():
    with harness.smtp_sink() as sink:
        res = harness.smtp_source(sink.port, sessions=2, messages=10, size=1000, timeout=30)
        assert res.ok, res.stderr
        assert sink.wait_count(10, timeout=10) == 10


def test_smtp_source_into_reference(reference_postfix):
    before = len(reference_postfix.maildir_messages("sink"))
    res = harness.smtp_source(reference_postfix.port, sessions=4, messages=20, size=2000,
                              timeout=60)
    assert res.ok, res.stderr
    reference_postfix.wait_maildir("sink", before + 20, timeout=30)


def test_reference_factory_foreign_client_is_denied(reference_factory):
    ref = reference_factory({"mynetworks": "192.0.2.0/24"}).start()
    replies = harness.dialogue(ref.port, [
        "HELO client.example.org", "MAIL FROM:<a@example.org>",
        "RCPT TO:<x@elsewhere.example>", "QUIT"])
    assert harness.normalise(replies)[3] == (454, "4.7.1")
    assert "Relay access denied" in replies[3].text
    ref.wait_log(r"NOQUEUE: reject: RCPT from unknown\[127\.0\.0\.1\]: 454 4\.7\.1 "
                 r"<x@elsewhere\.example>: Relay access denied;")
    ref.stop()
    assert not ref.processes()


def test_smtp_source_counter():
    with harness.smtp_sink() as sink:
        res = harness.smtp_source(sink.port, sessions=1, messages=7, size=200, extra=["-c"],
                                  timeout=30)
        assert res.ok and res.count == 7, (res.stdout, res.stderr)


def test_postwell_instance_start_stop_leaves_nothing(postwell_factory):
    pw = postwell_factory().start()
    pids = pw.processes()
    assert pids, "postwell started but its master pid file names no live process"
    banner = harness.wait_banner(pw.port)
    assert banner.startswith("220 mx.example.test ESMTP")
    pw.stop()
    assert not any(harness.pid_alive(p) for p in pids)
    assert not harness.port_accepts(pw.port)


def test_kill9_then_restart(postwell_factory):
    pw = postwell_factory().start()
    killed = pw.kill9()
    harness.wait_for(lambda: not any(harness.pid_alive(p) for p in killed), 10, 0.05, "kill")
    assert not harness.port_accepts(pw.port)
    pw.start()
    assert harness.normalise(harness.dialogue(pw.port, ["HELO x.example.org", "QUIT"])) == [
        (220, None), (250, None), (221, "2.0.0")]


def test_reference_setgid_tools_accept_the_instance(reference_postfix):
    """The default main.cf lists the instance in alternate_config_directories."""
    cp = reference_postfix.run("postqueue", "-p", timeout=30)
    assert cp.returncode == 0, cp.stderr
    assert "Mail queue is empty" in cp.stdout or cp.stdout.strip() == "" or "Queue ID" in cp.stdout
