"""The log trail of accepted messages, side by side with the reference Postfix 3.7.

For one message received over SMTP and delivered to a virtual mailbox, every line
(connect, client=, message-id=, from=/size=/nrcpt=, to=/relay=/delay=/dsn=/status=,
removed, disconnect) must have Postfix's shape, field order and spacing.  Lines are
compared per program in order of appearance (smtpd's disconnect and qmgr's from= race
each other in both MTAs); queue ids, delays and the date stamp of a generated
Message-ID are normalised.
"""

from __future__ import annotations

import os
import re

import pytest

import harness
from postwell.config.defaults import DEFAULTS
from harness import VIRTUAL_DOMAIN as VD

pytestmark = pytest.mark.postfix

EHLO = "EHLO client.example.org"
MAIL = "MAIL FROM:<sender@example.org>"
RCPT = f"RCPT TO:<alice@{VD}>"
MSG = ["From: <sender@example.org>", "Subject: trail", "Message-ID: <trail@example.org>", "",
       "hello", "."]

CONF = {"smtpd_recipient_restrictions":
        "check_recipient_access inline:{{disc@virtual.test=DISCARD gone}, "
        "{hold@virtual.test=HOLD held}}, permit_mynetworks, reject_unauth_destination",
        "virtual_alias_domains": "alias.test",
        "virtual_alias_maps": "inline:{{a@alias.test=alice@virtual.test}, "
                              "{both@alias.test=alice@virtual.test,bob@virtual.test}, {b2@alias.test=bob@virtual.test}}"}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    reason = harness.reference_available()
    if reason:
        pytest.skip(reason)
    base = tmp_path_factory.mktemp("parity-logs")
    ref = harness.ReferencePostfix(base, CONF)
    pw = harness.PostwellInstance(base, CONF)
    try:
        ref.start()
        pw.start()
        yield ref, pw
    finally:
        for inst in (ref, pw):
            inst.stop()
            inst.cleanup()


_PREFIX = re.compile(r"^\w{3} [ \d]\d \d\d:\d\d:\d\d \S+ postfix/(\w+)\[\d+\]: (.*)$")


def _normalise(text: str, size: bool) -> str:
    text = re.sub(r"\b[0-9A-F]{10,12}\b", "QID", text)
    text = re.sub(r"<\d{14}\.QID@", "<STAMP.QID@", text)
    text = re.sub(r"delay=[\d.]+, delays=[\d.]+/[\d.]+/[\d.]+/[\d.]+",
                  "delay=D, delays=D/D/D/D", text)
    if not size:
        text = re.sub(r"size=\d+", "size=N", text)
    return text


def _quiesce(inst) -> None:
    def idle():
        text = inst.log_text()
        return text.count("]: connect from ") == text.count("]: disconnect from ")
    harness.wait_for(idle, 10, 0.05, f"{inst.kind} to log its earlier disconnects")


def _trail(inst, lines, done: str, size: bool = False, qids_out: list | None = None) -> dict[str, list[str]]:
    """Run a session; once `done` (a regex, QID = this message's id) is logged, return
    the session's lines grouped by program (the queue ids go to `qids_out`)."""
    _quiesce(inst)
    before = os.path.getsize(inst.maillog)
    replies = harness.dialogue(inst.port, lines, timeout=10)
    qids = [m.group(1) for r in replies if (m := harness.QUEUED_RE.search(r.text))]
    assert qids, [str(r) for r in replies]
    if qids_out is not None:
        qids_out.extend(qids)
    pattern = re.compile(done.replace("QID", re.escape(qids[-1])), re.M)

    def grab():
        with open(inst.maillog, "rb") as f:
            f.seek(before)
            text = f.read().decode("utf-8", "replace")
        if pattern.search(text) and re.search(r"postfix/smtpd\[\d+\]: disconnect from [^\n]*\n", text):
            return text
        return None
    text = harness.wait_for(grab, 20, 0.05, f"{inst.kind}: /{done}/")
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        m = _PREFIX.match(line)
        if m and not harness.POSTFIX_CLOCK_WARNING.search(line):
            out.setdefault(m.group(1), []).append(_normalise(m.group(2), size))
    return out


REMOVED = r"postfix/qmgr\[\d+\]: QID: removed$"
TRAILS = {
    "one_recipient": [EHLO, MAIL, RCPT, "DATA", *MSG, "QUIT"],
    "two_recipients_helo_no_message_id": ["HELO client.example.org", MAIL, RCPT,
                                          f"RCPT TO:<bob@{VD}>", "DATA", "Subject: x", "",
                                          "body", ".", "QUIT"],
    "null_sender": [EHLO, "MAIL FROM:<>", RCPT, "DATA", *MSG, "QUIT"],
    "bdat": [EHLO, MAIL, RCPT, "BDAT 22 LAST\r\nSubject: bdat\r\n\r\nhi!\r\n", "QUIT"],
    "virtual_alias_orig_to": [EHLO, MAIL, "RCPT TO:<a@alias.test>", "RCPT TO:<b2@alias.test>",
                              "DATA", *MSG, "QUIT"],
    "two_messages_one_session": [EHLO, MAIL, RCPT, "DATA", *MSG, MAIL, f"RCPT TO:<carol@{VD}>",
                                 "DATA", *MSG, "QUIT"],
}


@pytest.mark.parametrize("name", sorted(TRAILS))
def test_delivery_trail_matches_reference(pair, name):
    ref, pw = pair
    want = _trail(ref, TRAILS[name], REMOVED)
    got = _trail(pw, TRAILS[name], REMOVED)
    assert got == want


def test_discard_logs_no_message_id(pair):
    """A DISCARDed message: the discard line, client=, no cleanup/qmgr lines at all."""
    ref, pw = pair
    lines = [EHLO, MAIL, "RCPT TO:<disc@virtual.test>", RCPT, "DATA", *MSG, "QUIT"]
    done = r"postfix/smtpd\[\d+\]: disconnect from "
    want = _trail(ref, lines, done)
    got = _trail(pw, lines, done)
    assert got == want
    assert set(got) == {"smtpd"}


def test_hold_message_is_parked(pair):
    ref, pw = pair
    lines = [EHLO, MAIL, "RCPT TO:<hold@virtual.test>", RCPT, "DATA", *MSG, "QUIT"]
    done = r"postfix/cleanup\[\d+\]: QID: message-id="
    for inst in (ref, pw):
        _trail(inst, lines, done)
        harness.wait_for(lambda: list((inst.queue_dir / "hold").rglob("*")), 10, 0.05,
                         f"{inst.kind}: a file in the hold queue")


def test_size_field_matches_reference(pair):
    """size= is Postfix's queue-file content size (per line: a type byte, the length
    bytes, the text).  The two messages differ only in their Received header's
    mail_name and queue id, whose lengths are allowed for."""
    ref, pw = pair
    ref_ids, pw_ids = [], []
    want = _trail(ref, TRAILS["one_recipient"], REMOVED, size=True, qids_out=ref_ids)
    got = _trail(pw, TRAILS["one_recipient"], REMOVED, size=True, qids_out=pw_ids)
    ref_size = int(re.search(r"size=(\d+)", want["qmgr"][0]).group(1))
    pw_size = int(re.search(r"size=(\d+)", got["qmgr"][0]).group(1))
    names = len(DEFAULTS["mail_name"]) - len("Postfix")
    assert pw_size - names - (len(pw_ids[0]) - len(ref_ids[0])) == ref_size
    assert [re.sub(r"size=\d+", "size=N", x) for x in got["qmgr"]] == \
        [re.sub(r"size=\d+", "size=N", x) for x in want["qmgr"]]


def test_quoted_sender_logged_external(pair):
    ref, pw = pair
    lines = [EHLO, 'MAIL FROM:<"a b"@example.org>', RCPT, "DATA", *MSG, "QUIT"]
    want = _trail(ref, lines, REMOVED)
    got = _trail(pw, lines, REMOVED)
    assert got == want


def test_alias_duplicates_kept_per_original_recipient(pair):
    ref, pw = pair
    lines = [EHLO, MAIL, "RCPT TO:<a@alias.test>", "RCPT TO:<both@alias.test>", "DATA", *MSG, "QUIT"]
    want = _trail(ref, lines, REMOVED)
    got = _trail(pw, lines, REMOVED)
    assert got == want
