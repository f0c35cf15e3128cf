"""maillog_file empty: lines go to syslog(3) with the program name and facility Postfix uses."""

import syslog

from postwell.log import MailLog


def test_syslog_destination(monkeypatch):
    calls = []
    monkeypatch.setattr(syslog, "openlog", lambda ident, opt, fac: calls.append(("open", ident, opt, fac)))
    monkeypatch.setattr(syslog, "syslog", lambda prio, text: calls.append(("log", prio, text)))
    log = MailLog("smtpd", syslog_name="postfix", maillog_file="", syslog_facility="mail")
    log.info("connect from localhost[127.0.0.1]")
    log.warning("bad\r\nthing")
    assert calls[0] == ("open", "postfix/smtpd", syslog.LOG_PID, syslog.LOG_MAIL)
    assert calls[1] == ("log", 6, "connect from localhost[127.0.0.1]")
    # Control characters from the network never split a syslog record.
    assert calls[2] == ("log", 4, "warning: bad??thing")


def test_maillog_file_record_cut_at_2000_characters(tmp_path):
    path = tmp_path / "maillog"
    log = MailLog("smtpd", maillog_file=str(path), hostname="mx.example.test")
    log.info("x" * 5000)
    log.close()
    line = path.read_text()
    assert line.endswith("x" * 2000 + "\n") and "x" * 2001 not in line
    assert " mx postfix/smtpd[" in line


def test_record_limit_counts_the_text_after_the_severity_label(tmp_path):
    # Postfix 3.7 logs a 1998-character warning whole: the 2000-character cut
    # applies to the text, "warning: " comes on top of it.
    path = tmp_path / "maillog"
    log = MailLog("smtpd", maillog_file=str(path), hostname="mx.example.test")
    log.warning("w" * 1998)
    log.error("e" * 5000)
    log.close()
    first, second = path.read_text().splitlines()
    assert first.endswith(": warning: " + "w" * 1998)
    assert second.endswith(": error: " + "e" * 2000)
