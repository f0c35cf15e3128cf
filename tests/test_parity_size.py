"""Postfix's message size, side by side with the reference Postfix 3.7.

The qmgr's ``size=`` and the ``--Size--`` column of ``postqueue -p`` are the
length of Postfix's queue-file content records (per line: a type byte, a
variable-length length, the text; long lines in pieces of line_length_limit,
cut differently in headers and in the body: see cleanup/recsize.py).  postwell
computes the same number while cleanup writes the content.  postwell runs with
mail_name = Postfix so the Received headers have the same length; the queue ids'
lengths are allowed for (each message names its id once, in Received).
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import pytest

import harness

pytestmark = pytest.mark.postfix

EHLO = "EHLO client.example.org"
MAIL = "MAIL FROM:<sender@example.org>"
RCPT = f"RCPT TO:<alice@{harness.VIRTUAL_DOMAIN}>"
HELD = f"bob@{harness.VIRTUAL_DOMAIN}"
CONF = {"smtpd_recipient_restrictions":
        f"check_recipient_access inline:{{{{{HELD}=HOLD held}}}}, permit_mynetworks, "
        "reject_unauth_destination",
        "header_size_limit": "1024"}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    reason = harness.reference_available()
    if reason:
        pytest.skip(reason)
    base = tmp_path_factory.mktemp("parity-size")
    ref = harness.ReferencePostfix(base, CONF)
    pw = harness.PostwellInstance(base, {**CONF, "mail_name": "Postfix"})
    try:
        with ThreadPoolExecutor(2) as pool:
            for done in [pool.submit(ref.start), pool.submit(pw.start)]:
                done.result()
        yield ref, pw
    finally:
        for inst in (ref, pw):
            inst.stop()
            inst.cleanup()


def _sized(inst, lines) -> tuple[str, int]:
    """Send one message; its queue id and the size the qmgr logged for it."""
    replies = harness.dialogue(inst.port, lines, timeout=10)
    qids = [m.group(1) for r in replies if (m := harness.QUEUED_RE.search(r.text))]
    assert qids, [str(r) for r in replies]
    m = inst.wait_log(rf"{qids[-1]}: from=<[^>]*>, size=(\d+), nrcpt=", 20)
    return qids[-1], int(m.group(1))


def _data(body: list[str]) -> list[str]:
    return [EHLO, MAIL, RCPT, "DATA", *body, ".", "QUIT"]


CASES = {
    "simple": ["From: <sender@example.org>", "Subject: s", "Message-ID: <s@example.org>", "",
               "hello"],
    # 127 bytes: one length byte; 128 and more: two.
    "lines_around_128": ["Subject: x", "", "a" * 127, "b" * 128, "c" * 129],
    # Body lines are cut at every full 2048 bytes: 2048 is 2048 + an empty piece.
    "body_lines_around_2048": ["Subject: x", "", "a" * 2047, "b" * 2048, "c" * 2049],
    "body_lines_multiple_2048": ["Subject: x", "", "a" * 4096, "b" * 4097, "c" * 5000, "end"],
    # Header lines are cut only when longer: 2048 is one piece, 4096 two.
    "header_lines_2048": ["X-A: " + "h" * 2043, "X-B: " + "h" * 4091, "X-C: " + "h" * 4092, "",
                          "body"],
    "header_continuations_2048": ["X-A: a", " " + "h" * 2047, " " + "k" * 1000, "", "body"],
    "header_folded": ["X-Long: a", *([" " + "f" * 70] * 12), " " + "g" * 200, "", "body"],
    # header_size_limit (1024 here) cuts the header first: only what is kept counts.
    "header_cut": ["Subject: " + "h" * 1500, "X-A: " + "i" * 900, "", "body"],
    # Past header_size_limit: cut at the last line boundary when that keeps more than
    # 90% of the limit, else inside the line at the limit; address headers are
    # rewritten (local client) before the cut.
    "header_cut_at_line_boundary": ["X-Many: a", *(["\tcont%05d %s" % (i, "c" * 60) for i in range(30)]),
                                    "", "body"],
    "header_cut_inside_line": ["X-Long: a", *(["\t" + "f" * 70] * 12), "\t" + "g" * 200, "", "body"],
    "header_cut_late_short_lines": ["X-Long: " + "a" * 1000, " " + "b" * 10, " " + "c" * 10, "",
                                    "body"],
    "address_header_rewritten_then_cut": ["To: " + ", ".join("u%d" % i for i in range(100)), "",
                                          "body"],
    "empty_body": ["Subject: x", ""],
    "no_empty_line": ["Subject: x"],
    "body_only": ["just body text"],
    "first_line_2048_not_header": ["b" * 2048, "x"],
    "no_content": [],
    "bare_cr": ["Subject: x\ry", "", "a\rb"],
    "eight_bit": ["Subject: \xe9t\xe9", "", "caf\xe9" * 100],
    "mbox_from_line": ["From someone Sat Jan  3 01:05:34 1996", "Subject: x", "", "b"],
    "bcc_removed": ["Bcc: secret@example.org", "Subject: x", "", "b"],
    "addresses_rewritten": ["To: alice", "Cc: bob", "Subject: x", "", "b"],
    "many_lines": ["Subject: x", "", *(["line of text " * 5] * 200)],
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_qmgr_size_matches_reference(pair, name):
    ref, pw = pair
    ref_id, want = _sized(ref, _data(CASES[name]))
    pw_id, got = _sized(pw, _data(CASES[name]))
    assert got - (len(pw_id) - len(ref_id)) == want


def test_bdat_size_matches_reference(pair):
    ref, pw = pair
    chunk = "Subject: b\r\n\r\n" + "z" * 2048 + "\r\n" + "y" * 4096 + "\r\n"
    lines = [EHLO, MAIL, RCPT, f"BDAT {len(chunk)} LAST\r\n{chunk}", "QUIT"]
    ref_id, want = _sized(ref, lines)
    pw_id, got = _sized(pw, lines)
    assert got - (len(pw_id) - len(ref_id)) == want


_LISTED = re.compile(r"^([0-9A-F]+)!\s+(\d+) ", re.M)


def test_postqueue_size_column_matches_reference(pair):
    """A held message: postqueue -p shows the same size as Postfix's."""
    ref, pw = pair
    lines = [EHLO, MAIL, f"RCPT TO:<{HELD}>", "DATA", "Subject: held", "", "x" * 300, "y" * 2048,
             ".", "QUIT"]
    sizes = []
    for inst in (ref, pw):
        replies = harness.dialogue(inst.port, lines, timeout=10)
        qid = next(m.group(1) for r in replies if (m := harness.QUEUED_RE.search(r.text)))

        def listed():
            out = inst.run("postqueue", "-p", timeout=30).stdout
            return dict(_LISTED.findall(out)).get(qid)
        sizes.append((qid, int(harness.wait_for(listed, 20, 0.1, f"{inst.kind}: {qid} in hold"))))
    (ref_id, want), (pw_id, got) = sizes
    assert got - (len(pw_id) - len(ref_id)) == want
