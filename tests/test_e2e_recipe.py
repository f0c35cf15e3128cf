"""End-to-end: the classic recipe, run against postwell and the reference Postfix.

Every recipe test is parametrised over both MTAs: the Postfix run proves the
test's expectations are Postfix's, the postwell run proves we match them.
The dialogue table sends the same raw SMTP sessions to both and compares reply
codes and enhanced status codes (banner texts, hostnames and queue ids differ
by design and are not compared).
"""

from __future__ import annotations

import os
import re
import shutil
import smtplib
import subprocess

import pytest

import harness
from harness import VIRTUAL_DOMAIN as VD

pytestmark = pytest.mark.postfix

SENDER = "sender@example.org"


@pytest.fixture(params=["postwell", "postfix"])
def mta(request, tmp_path):
    """A started instance of either MTA with the recipe main.cf."""
    if request.param == "postfix":
        reason = harness.reference_available()
        if reason:
            pytest.skip(reason)
        inst = harness.ReferencePostfix(tmp_path)
    else:
        inst = harness.PostwellInstance(tmp_path)
    try:
        inst.start()
        yield inst
    finally:
        inst.stop()
        inst.cleanup()


def _log_id_lines(inst, qid: str, rcpt: str, sender: str = SENDER):
    """The Postfix log trail of one delivered message, in order of appearance."""
    q = re.escape(qid)
    inst.wait_log(rf"postfix/\w+\[\d+\]: {q}: removed$", timeout=20)
    text = inst.log_text()
    patterns = [
        r"postfix/smtpd\[\d+\]: connect from unknown\[127\.0\.0\.1\]$",
        rf"postfix/smtpd\[\d+\]: {q}: client=unknown\[127\.0\.0\.1\]$",
        rf"postfix/\w+\[\d+\]: {q}: message-id=<[^>\s]+>$",
        rf"postfix/\w+\[\d+\]: {q}: from=<{re.escape(sender)}>, size=\d+, nrcpt=1 \(queue active\)$",
        rf"postfix/\w+\[\d+\]: {q}: to=<{re.escape(rcpt)}>, relay=virtual, delay=[\d.]+, "
        rf"delays=[\d.]+/[\d.]+/[\d.]+/[\d.]+, dsn=2\.0\.0, status=sent \(delivered to maildir\)$",
        rf"postfix/\w+\[\d+\]: {q}: removed$",
    ]
    positions = []
    for pat in patterns:
        m = re.search(pat, text, re.M)
        assert m, f"missing log line /{pat}/ in:\n{text[-4000:]}"
        positions.append(m.start())
    assert positions[1] < positions[3] < positions[4] < positions[5], "log lines out of order"
    return text


def test_recipe_smtplib_session(mta):
    before = len(mta.maildir_messages("alice"))
    msg = harness.make_message("recipe-1", recipient=f"alice@{VD}")
    s = smtplib.SMTP(timeout=15)
    code, banner = s.connect("127.0.0.1", mta.port)
    assert code == 220 and banner.decode().startswith("mx.example.test ESMTP")
    code, _ = s.ehlo("client.example.org")
    assert code == 250
    assert s.has_extn("pipelining") and s.has_extn("enhancedstatuscodes")
    assert s.has_extn("size") and s.has_extn("8bitmime")
    assert s.mail(SENDER) == (250, b"2.1.0 Ok")
    assert s.rcpt(f"alice@{VD}") == (250, b"2.1.5 Ok")
    code, text = s.data(msg)
    assert code == 250, text
    m = re.fullmatch(rb"2\.0\.0 Ok: queued as ([0-9A-Za-z]+)", text)
    assert m, text
    qid = m.group(1).decode()
    code, text = s.quit()
    assert (code, text) == (221, b"2.0.0 Bye")

    files = mta.wait_maildir("alice", before + 1, timeout=20)
    delivered = [f for f in files if harness.check_delivered(f) == ("recipe-1", True)]
    assert len(delivered) == 1
    raw = delivered[0].read_bytes()
    assert raw.startswith(b"Return-Path: <sender@example.org>\n") or b"\nReturn-Path:" not in raw
    head = raw.split(b"\n\n", 1)[0].decode()
    received = re.search(r"^Received: from client\.example\.org \(unknown \[127\.0\.0\.1\]\)\n"
                         r"\s+by mx\.example\.test \(\w+\) with ESMTP id " + qid +
                         r"\n\s+for <alice@virtual\.test>; \w{3}, +\d+ \w{3} \d{4} "
                         r"\d\d:\d\d:\d\d [+-]\d{4} \(\w+\)$", head, re.M)
    assert received, head
    assert re.search(r"^Delivered-To: alice@virtual\.test$", head, re.M), head
    assert b"\r\n" not in raw, "Maildir files use LF line ends"

    text = _log_id_lines(mta, qid, f"alice@{VD}")
    mta.wait_log(r"postfix/smtpd\[\d+\]: disconnect from unknown\[127\.0\.0\.1\] ehlo=1 mail=1 "
                 r"rcpt=1 data=1 quit=1 commands=5$")
    mta.stop()
    assert not mta.processes()


def test_recipe_swaks(mta):
    swaks = shutil.which("swaks")
    if not swaks:
        pytest.skip("swaks is not installed")
    before = len(mta.maildir_messages("bob"))
    cp = subprocess.run([swaks, "--server", f"127.0.0.1:{mta.port}", "--helo", "swaks.example.org",
                         "--from", SENDER, "--to", f"bob@{VD}", "--header", "Subject: swaks",
                         "--timeout", "15", "--pipeline"],
                        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    m = re.search(r"<[-~]\s+250 2\.0\.0 Ok: queued as ([0-9A-Za-z]+)", cp.stdout)
    assert m, cp.stdout
    mta.wait_maildir("bob", before + 1, timeout=20)
    _log_id_lines(mta, m.group(1), f"bob@{VD}")


def test_recipe_smtp_source(mta):
    before = len(mta.maildir_messages("sink"))
    res = harness.smtp_source(mta.port, sessions=5, messages=50, size=3000,
                              extra=["-c"], timeout=60)
    assert res.ok, res.stdout + res.stderr
    mta.wait_maildir("sink", before + 50, timeout=60)
    mta.wait_queue_empty(timeout=30)
    assert len(mta.maildir_messages("sink")) == before + 50
    text = mta.log_text()
    assert len(re.findall(r"to=<sink@virtual\.test>, relay=virtual, .*status=sent", text)) >= 50


def test_recipe_multiple_recipients_one_transaction(mta):
    users = ["alice", "bob", "carol"]
    before = {u: len(mta.maildir_messages(u)) for u in users}
    msg = harness.make_message("multi-1")
    with smtplib.SMTP("127.0.0.1", mta.port, timeout=15) as s:
        refused = s.sendmail(SENDER, [f"{u}@{VD}" for u in users], msg)
    assert refused == {}
    for u in users:
        files = mta.wait_maildir(u, before[u] + 1, timeout=20)
        assert harness.check_delivered(files[-1]) == ("multi-1", True) or any(
            harness.check_delivered(f) == ("multi-1", True) for f in files)
    mta.wait_log(r": from=<sender@example\.org>, size=\d+, nrcpt=3 \(queue active\)$")


# ------------------------------------------------------------------ side by side

VARIANTS = {
    "default": {},
    # A "foreign" client: 127.0.0.1 is outside mynetworks, so relaying is refused.
    "foreign": {"mynetworks": "192.0.2.0/24"},
    "limits": {"message_size_limit": "4000", "smtpd_recipient_limit": "2"},
}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """Started (reference, postwell) pairs per main.cf variant, built on first use."""
    reason = harness.reference_available()
    if reason:
        pytest.skip(reason)
    started: dict[str, tuple] = {}
    made: list = []

    def get(variant: str):
        if variant not in started:
            base = tmp_path_factory.mktemp(f"pair-{variant}")
            ref = harness.ReferencePostfix(base, VARIANTS[variant])
            made.append(ref)
            pw = harness.PostwellInstance(base, VARIANTS[variant])
            made.append(pw)
            harness.start_side_by_side(ref, pw)
            started[variant] = (ref, pw)
        return started[variant]

    yield get
    harness.stop_side_by_side(made)


EHLO = "EHLO client.example.org"
MAIL = "MAIL FROM:<sender@example.org>"
RCPT = f"RCPT TO:<alice@{VD}>"
MSG = ["From: <sender@example.org>", "Subject: dialogue", "", "hello", "..dot stuffed", "."]
BIG = 90 * "x"

# name: (variant, lines, pipelined)
DIALOGUES = {
    "helo_quit": ("default", ["HELO client.example.org", "QUIT"], False),
    "ehlo_quit": ("default", [EHLO, "QUIT"], False),
    "lowercase_commands": ("default", ["ehlo client.example.org", "mail from:<sender@example.org>",
                                       f"rcpt to:<alice@{VD}>", "rset", "quit"], False),
    "noop_rset_before_helo": ("default", ["NOOP", "RSET", "QUIT"], False),
    "mail_before_helo": ("default", [MAIL, "QUIT"], False),
    "rcpt_before_mail": ("default", [EHLO, RCPT, "QUIT"], False),
    "data_before_mail": ("default", [EHLO, "DATA", "QUIT"], False),
    "data_before_rcpt": ("default", [EHLO, MAIL, "DATA", "QUIT"], False),
    "nested_mail": ("default", [EHLO, MAIL, MAIL, "QUIT"], False),
    "unknown_command": ("default", [EHLO, "FOO bar", "QUIT"], False),
    "empty_command": ("default", [EHLO, "", "QUIT"], False),
    "helo_no_argument": ("default", ["HELO", "EHLO", "QUIT"], False),
    "mail_bad_syntax": ("default", [EHLO, "MAIL FROM:bogus address", "MAIL TO:<a@b>", "QUIT"], False),
    "mail_null_sender": ("default", [EHLO, "MAIL FROM:<>", RCPT, "RSET", "QUIT"], False),
    "mail_space_after_colon": ("default", [EHLO, "MAIL FROM: <sender@example.org>", "QUIT"], False),
    "mail_unknown_parameter": ("default", [EHLO, MAIL + " FOO=bar", "QUIT"], False),
    "mail_size_too_big": ("default", [EHLO, MAIL + " SIZE=999999999", "QUIT"], False),
    "mail_body_params": ("default", [EHLO, MAIL + " BODY=8BITMIME", "RSET",
                                     MAIL + " BODY=BOGUS", "QUIT"], False),
    "rcpt_bad_syntax": ("default", [EHLO, MAIL, "RCPT TO:<<>>", "RCPT TO:", "RCPT FROM:<a@b>",
                                    "QUIT"], False),
    "rcpt_unknown_virtual_user": ("default", [EHLO, MAIL, f"RCPT TO:<nobody@{VD}>", "QUIT"], False),
    "rcpt_relay_from_mynetworks": ("default", [EHLO, MAIL, "RCPT TO:<x@elsewhere.example>",
                                               "QUIT"], False),
    "rcpt_dsn_parameters": ("default", [EHLO, MAIL + " RET=HDRS ENVID=abc",
                                        RCPT + " NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;alice@virtual.test",
                                        "QUIT"], False),
    "full_transaction": ("default", [EHLO, MAIL, RCPT, "DATA", *MSG, "QUIT"], False),
    "two_transactions": ("default", [EHLO, MAIL, RCPT, "DATA", *MSG, MAIL,
                                     f"RCPT TO:<bob@{VD}>", "DATA", *MSG, "QUIT"], False),
    "rset_drops_transaction": ("default", [EHLO, MAIL, RCPT, "RSET", RCPT, "DATA", "QUIT"], False),
    "data_with_no_valid_rcpt": ("default", [EHLO, MAIL, f"RCPT TO:<nobody@{VD}>", "DATA",
                                            "QUIT"], False),
    "vrfy_expn_help": ("default", [EHLO, f"VRFY alice@{VD}", f"VRFY nobody@{VD}", "EXPN staff",
                                   "HELP", "QUIT"], False),
    "etrn": ("default", [EHLO, "ETRN", "QUIT"], False),
    "starttls_auth_unavailable": ("default", [EHLO, "STARTTLS", "AUTH PLAIN AGFAAGI=", "QUIT"],
                                  False),
    "command_too_long": ("default", [EHLO, "NOOP " + "y" * 5000, "QUIT"], False),
    "bare_lf_in_data": ("default", [EHLO, MAIL, RCPT, "DATA",
                                    "Subject: bare lf\n", "line one\nline two\r\n", ".", "QUIT"],
                        False),
    "pipelined_transaction": ("default", [EHLO, [MAIL, RCPT, f"RCPT TO:<nobody@{VD}>", "DATA"],
                                          [*MSG, "QUIT"]], False),
    "pipelined_data_refused": ("default", [EHLO, [MAIL, f"RCPT TO:<nobody@{VD}>", "DATA",
                                                  "Subject: x", "", "body", ".", "QUIT"]], False),
    "pipelined_rset_noop": ("default", [EHLO, [MAIL, RCPT, "RSET", "NOOP", MAIL, "QUIT"]], False),
    "bdat_last": ("default", [EHLO, MAIL, RCPT, "BDAT 22 LAST\r\nSubject: bdat\r\n\r\nhi!\r\n",
                              "QUIT"], False),
    "bdat_two_chunks": ("default", [EHLO, MAIL, RCPT, "BDAT 15\r\nSubject: bdat\r\n",
                                    "BDAT 7 LAST\r\n\r\nhi!\r\n", "QUIT"], False),
    "bdat_without_rcpt": ("default", [EHLO, MAIL, "BDAT 5 LAST\r\nhi!\r\n", "QUIT"], False),
    "empty_message": ("default", [EHLO, MAIL, RCPT, "DATA", ".", "QUIT"], False),
    "helo_twice_then_mail": ("default", ["HELO a.example.org", EHLO, "HELO b.example.org", MAIL,
                                         "QUIT"], False),
    "xclient_xforward_unauthorised": ("default", [EHLO, "XCLIENT ADDR=192.0.2.1",
                                                  "XFORWARD ADDR=192.0.2.1", "QUIT"], False),
    "mail_rcpt_without_brackets": ("default", [EHLO, "MAIL FROM:sender@example.org",
                                               f"RCPT TO:alice@{VD}", "QUIT"], False),
    "rcpt_source_route_and_case": ("default", [EHLO, MAIL, f"RCPT TO:<@relay.example:alice@{VD}>",
                                               "RCPT TO:<ALICE@VIRTUAL.TEST>", "QUIT"], False),
    "rcpt_null_and_bare_postmaster": ("default", [EHLO, MAIL, "RCPT TO:<>", "RCPT TO:<postmaster>",
                                                  "QUIT"], False),
    "rcpt_address_too_long": ("default", [EHLO, MAIL, f"RCPT TO:<{'a' * 600}@{VD}>", "QUIT"], False),
    "rcpt_bad_dsn_parameters": ("default", [EHLO, MAIL, RCPT + " NOTIFY=BOGUS",
                                            RCPT + " ORCPT=bogus", RCPT + " FOO=1", "QUIT"], False),
    "mail_bad_size_and_auth": ("default", [EHLO, MAIL + " SIZE=abc", MAIL + " AUTH=<>", "QUIT"], False),
    "mail_smtputf8": ("default", [EHLO, "MAIL FROM:<s\u00fc@example.org> SMTPUTF8", RCPT, "QUIT"], False),
    "ehlo_resets_transaction": ("default", [EHLO, MAIL, EHLO, RCPT, "QUIT"], False),
    "commands_with_stray_arguments": ("default", [EHLO, "NOOP hello", "RSET now", MAIL, RCPT,
                                                  "DATA now", "QUIT now"], False),
    "vrfy_without_argument": ("default", [EHLO, "VRFY", "VRFY <alice@virtual.test>", "QUIT"], False),
    "etrn_domain": ("default", [EHLO, "ETRN example.test", "ETRN @example.test", "QUIT"], False),
    "bdat_bad_size": ("default", [EHLO, MAIL, RCPT, "BDAT abc", "QUIT"], False),
    "data_after_bdat_chunk": ("default", [EHLO, MAIL, RCPT, "BDAT 4\r\nab\r\n", "DATA", "QUIT"], False),
    "foreign_address_tricks": ("foreign", [EHLO, MAIL, "RCPT TO:<x%elsewhere.example@mx.example.test>",
                                           "RCPT TO:<elsewhere.example!x@mx.example.test>",
                                           'RCPT TO:<"x@elsewhere.example"@mx.example.test>',
                                           "RCPT TO:<x@elsewhere.example.>", "QUIT"], False),
    "foreign_ip_literals": ("foreign", [EHLO, MAIL, "RCPT TO:<postmaster@[127.0.0.1]>",
                                        "RCPT TO:<x@[10.0.0.1]>", "RCPT TO:<@mx.example.test:x@elsewhere.example>",
                                        "QUIT"], False),
    "foreign_relay_denied": ("foreign", [EHLO, MAIL, "RCPT TO:<x@elsewhere.example>",
                                         "RCPT TO:<x@[192.0.2.1]>", RCPT, "QUIT"], False),
    "foreign_local_domain_ok": ("foreign", [EHLO, MAIL, "RCPT TO:<postmaster@mx.example.test>",
                                            f"RCPT TO:<nobody@{VD}>", "QUIT"], False),
    "foreign_only_denied_then_data": ("foreign", [EHLO, MAIL, "RCPT TO:<x@elsewhere.example>",
                                                  "DATA", "QUIT"], False),
    "limits_size_declared": ("limits", [EHLO, MAIL + " SIZE=4001", MAIL + " SIZE=4000", "QUIT"],
                             False),
    "limits_size_in_data": ("limits", [EHLO, MAIL, RCPT, "DATA", "Subject: big", "",
                                       *([BIG] * 60), ".", "QUIT"], False),
    "limits_recipients": ("limits", [EHLO, MAIL, RCPT, f"RCPT TO:<bob@{VD}>",
                                     f"RCPT TO:<carol@{VD}>", "QUIT"], False),
}


@pytest.mark.parametrize("name", sorted(DIALOGUES))
def test_dialogue_matches_reference(pairs, name):
    variant, lines, pipelined = DIALOGUES[name]
    ref, pw = pairs(variant)
    expected = harness.dialogue(ref.port, lines, pipelined=pipelined, timeout=10)
    got = harness.dialogue(pw.port, lines, pipelined=pipelined, timeout=10)
    exp_n, got_n = harness.normalise(expected), harness.normalise(got)
    assert len(expected) > 1, "the reference did not answer: " + "\n".join(map(str, expected))
    if got_n != exp_n:
        table = "\n".join(f"{'  ' if a == b else '!!'} postfix {a}  postwell {b}"
                          for a, b in zip(exp_n + [None] * len(got_n), got_n + [None] * len(exp_n))
                          if a or b)
        full = ("\n--- postfix:\n" + "\n".join(map(str, expected)) +
                "\n--- postwell:\n" + "\n".join(map(str, got)))
        pytest.fail(f"dialogue {name!r} differs:\n{table}{full}")


def _strip_prefix(line: str) -> str:
    """A log line without timestamp, host, program pid and queue id."""
    line = re.sub(r"^\w{3} [ \d]\d \d\d:\d\d:\d\d \S+ (postfix/\w+)\[\d+\]: ", r"\1: ", line)
    return re.sub(r"\b[0-9A-F]{8,12}\b|\b[0-9A-Za-z]{12,}\b", "QID", line)


@pytest.mark.parametrize("variant, lines, pattern", [
    ("foreign", [EHLO, MAIL, "RCPT TO:<x@elsewhere.example>", "QUIT"], r"NOQUEUE: reject: RCPT"),
    ("default", [EHLO, MAIL, f"RCPT TO:<nobody@{VD}>", "QUIT"], r"NOQUEUE: reject: RCPT"),
    ("limits", [EHLO, MAIL + " SIZE=5000", "QUIT"], r"NOQUEUE: reject: MAIL"),
])
def test_reject_log_line_matches_reference(pairs, variant, lines, pattern):
    """pflogsumm-style tools parse reject lines: the shape must be Postfix's, word for word."""
    ref, pw = pairs(variant)
    found = {}
    for inst in (ref, pw):
        before = len(inst.log_text())
        harness.dialogue(inst.port, lines)
        inst.wait_log(r"disconnect from unknown\[127\.0\.0\.1\]", timeout=10)
        m = harness.wait_for(lambda: re.search(rf"^.*{pattern}.*$", inst.log_text()[before:], re.M),
                             10, 0.05, f"{pattern} in the {inst.kind} log")
        found[inst.kind] = _strip_prefix(m.group(0))
    assert found["postwell"] == found["postfix"]


def test_pflogsumm_counts(mta):
    """pflogsumm, the classic Postfix log summariser, reads our log as it reads Postfix's."""
    pflogsumm = shutil.which("pflogsumm") or shutil.which("pflogsumm", path="/usr/sbin")
    if not pflogsumm:
        pytest.skip("pflogsumm is not installed")
    res = harness.smtp_source(mta.port, sessions=2, messages=20, size=1000, timeout=60)
    assert res.ok, res.stderr
    harness.dialogue(mta.port, [EHLO, MAIL, f"RCPT TO:<nobody@{VD}>", "QUIT"])
    mta.wait_maildir("sink", 20, timeout=30)
    mta.wait_queue_empty(timeout=30)
    mta.wait_log(r"NOQUEUE: reject: RCPT")
    cp = subprocess.run([pflogsumm, "--smtpd_stats", str(mta.maillog)], capture_output=True,
                        text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert cp.returncode == 0, cp.stderr

    def count(label):
        m = re.search(rf"^\s*(\d+)\s+{label}\s*$", cp.stdout, re.M)
        return int(m.group(1)) if m else None
    assert (count("received"), count("delivered"), count("rejected \\(\\d+%\\)")) == (20, 20, 1), \
        cp.stdout[:3000]
    assert re.search(r"^\s*\d+\s+connections\s*$", cp.stdout, re.M), cp.stdout[:3000]


def test_ehlo_keywords_match_reference(pairs):
    ref, pw = pairs("default")
    got = {}
    for inst in (ref, pw):
        replies = harness.dialogue(inst.port, [EHLO, "QUIT"])
        got[inst.kind] = replies[1].lines[1:]
    assert got["postwell"] == got["postfix"]


def _normalise_delivered(data: bytes, qid: str) -> bytes:
    data = data.replace(qid.encode(), b"QUEUEID")
    data = re.sub(rb"\((?:Postfix|postwell)\)", b"(MTA)", data)
    data = re.sub(rb"\w{3}, +\d+ \w{3} \d{4} \d\d:\d\d:\d\d [+-]\d{4} \(\w+\)", b"DATE", data)
    return re.sub(rb"<\d{14}\.QUEUEID@", b"<STAMP.QUEUEID@", data)


def test_delivered_message_matches_reference(pairs):
    """Same DATA in, same Maildir file out: header fix-ups, dot-unstuffing, long lines."""
    ref, pw = pairs("default")
    data = ["Subject: same-bytes", "X-Long: " + "h" * 100, "", "..leading dot", "...two dots",
            "tab\there", "bare\rcr", "x" * 3000, "", "line after long", "."]
    files = {}
    for inst in (ref, pw):
        replies = harness.dialogue(inst.port, [EHLO, MAIL, f"RCPT TO:<carol@{VD}>", "DATA",
                                               *data, "QUIT"])
        m = harness.QUEUED_RE.search(replies[-2].text)
        assert m, [str(r) for r in replies]

        def mine():
            return [f for f in inst.maildir_messages("carol")
                    if m.group(1).encode() in f.read_bytes()]
        found = harness.wait_for(mine, 20, 0.05, f"{inst.kind} delivery to carol")
        files[inst.kind] = _normalise_delivered(found[0].read_bytes(), m.group(1))
    assert files["postwell"].decode("latin-1") == files["postfix"].decode("latin-1")


def _quiesce(inst) -> None:
    """Wait until every earlier session (the start-up banner probe included) has logged
    its disconnect line, so that it cannot be mistaken for the next session's."""
    def idle():
        text = inst.log_text()
        return text.count("]: connect from ") == text.count("]: disconnect from ")
    harness.wait_for(idle, 10, 0.05, f"{inst.kind} to log its earlier disconnects")


def _session_log(inst, lines, pipelined=False) -> str:
    """Run one dialogue and return the smtpd log lines it produced (prefix stripped)."""
    _quiesce(inst)
    before = os.path.getsize(inst.maillog) if inst.maillog.exists() else 0
    harness.dialogue(inst.port, lines, pipelined=pipelined, timeout=10)

    def grab():
        with open(inst.maillog, "rb") as f:
            f.seek(before)
            text = f.read().decode("utf-8", "replace")
        return text if re.search(r"postfix/smtpd\[\d+\]: disconnect from [^\n]*\n", text) else None
    return harness.wait_for(grab, 10, 0.05, f"{inst.kind} disconnect line")


@pytest.mark.parametrize("name", sorted(DIALOGUES))
def test_disconnect_log_matches_reference(pairs, name):
    """The per-command counters in "disconnect from ... commands=N/M" (pflogsumm and
    fail2ban-style tools read them) and the NOQUEUE reject lines match Postfix's."""
    variant, lines, pipelined = DIALOGUES[name]
    ref, pw = pairs(variant)
    shapes = {}
    for inst in (ref, pw):
        text = _session_log(inst, lines, pipelined)
        keep = [_strip_prefix(ln) for ln in text.splitlines()
                if re.search(r"postfix/smtpd\[\d+\]: (disconnect from|NOQUEUE: )", ln)]
        shapes[inst.kind] = keep
    assert shapes["postwell"] == shapes["postfix"]


def test_console_script_start_status_stop(tmp_path):
    """The installed `postwell` script drives an instance like `postfix -c DIR` does."""
    script = shutil.which("postwell")
    if not script:
        pytest.skip("the postwell console script is not installed (pip install -e .)")
    inst = harness.PostwellInstance(tmp_path)
    try:
        def run(*args):
            return subprocess.run([script, "-c", str(inst.config_dir), *args], capture_output=True,
                                  text=True, timeout=60, stdin=subprocess.DEVNULL)
        cp = run("start")
        assert cp.returncode == 0, cp.stdout + cp.stderr
        inst.running = True
        harness.wait_banner(inst.port)
        assert run("status").returncode == 0
        pids = inst.processes()
        cp = run("stop")
        assert cp.returncode == 0, cp.stdout + cp.stderr
        harness.wait_for(lambda: not any(harness.pid_alive(p) for p in pids), 15, 0.05,
                         "postwell to stop")
        inst.running = False
        assert run("status").returncode != 0
    finally:
        inst.stop()
        inst.cleanup()


def test_recipe_large_message_intact(mta):
    """A 5 MB message (under the default 10240000 message_size_limit) arrives whole."""
    before = len(mta.maildir_messages("carol"))
    msg = harness.make_message("large-1", size=5_000_000, recipient=f"carol@{VD}")
    with smtplib.SMTP("127.0.0.1", mta.port, timeout=60) as s:
        assert s.sendmail(SENDER, [f"carol@{VD}"], msg) == {}
    files = mta.wait_maildir("carol", before + 1, timeout=60)
    assert ("large-1", True) in [harness.check_delivered(f) for f in files]
