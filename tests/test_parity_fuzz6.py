"""Differential SMTP fuzzing against the reference Postfix 3.7 (a sixth parity sweep).

A seeded generator makes odd SMTP sessions (3-12 commands: HELO/EHLO arguments, MAIL/RCPT
with valid and invalid ESMTP parameters, odd address forms, DATA/BDAT sequences, commands
in the wrong place, pipelined groups, case, blanks, NUL and 8-bit bytes); each session runs
on a Postfix and a postwell started with the same main.cf, and every reply and every
smtpd/cleanup log line is compared (method and helpers of test_parity_dialogues3.py).

DIALOGUES holds the differences the generator found, each minimised to its shortest
session and fixed in postwell (or, in XFAIL, a known difference with its reason);
test_fuzz_sessions_match_reference replays a bounded number of generated sessions and
allows only the differences ALLOWED names.
"""

from __future__ import annotations

import os
import random

import pytest

import harness
from harness import VIRTUAL_DOMAIN as VD
from test_parity_dialogues3 import _run, _texts
from test_parity_sweep import _table, parity_cases

pytestmark = pytest.mark.postfix

# ---------------------------------------------------------------- the generator



def _byte(b: int) -> str:
    """One raw byte >= 0x80 as harness.dialogue sends it (surrogateescape)."""
    return chr(0xDC00 + b)


HELO_ARGS = [
    "client.example.org", "client.example.org", "[127.0.0.1]", "[IPv6:::1]", "127.0.0.1",
    "a..b", "bad_host.example", "nodots", "x.example.", "-lead.example", "h" * 80 + ".example",
    "two words", "[1.2.3.4", "[300.1.1.1]", "", " ", "x" + _byte(0xE9) + ".example",
    "\u00fcml.example", "a\x00b.example", "CLIENT.EXAMPLE.ORG", "[IPv6:1::2::3]", "*",
    "<client.example.org>", "client.example.org\t",
]

SENDERS = [
    "<sender@example.org>", "<sender@example.org>", "<>", "<sender>", "<sender@example>",
    "<SENDER@EXAMPLE.ORG>", "<@relay.example:sender@example.org>",
    "<@a.example,@b.example:sender@example.org>", "sender@example.org", "<sender@example.org",
    "sender@example.org>", '<"quoted sender"@example.org>', '<"a\\"b"@example.org>',
    "<sender@[127.0.0.1]>", "<sender@[IPv6:::1]>", "<sender@example.org.>", "< >",
    "<sender@@example.org>", "<@example.org>", "<sender@>", "<a b@example.org>",
    "<sender%other@example.org>", "<sender!host@example.org>", "<" + "l" * 70 + "@example.org>",
    "<\u00fcser@example.org>", "<" + _byte(0xFF) + "x@example.org>", "<sender@example.org> junk",
    "<<sender@example.org>>", "<sender(comment)@example.org>", "<sender@exa mple.org>",
    "<postmaster>", "<MAILER-DAEMON>", "<sender@localhost>", "<sender@[1.2.3]>",
    "<\"\"@example.org>", "<.sender@example.org>", "<sender.@example.org>",
    "<sender@example..org>", "<sender@-x.example>", "<sender@x_y.example>",
]

RECIPIENTS = [
    f"<alice@{VD}>", f"<alice@{VD}>", f"<bob@{VD}>", f"<nobody@{VD}>", f"<ALICE@{VD.upper()}>",
    "<postmaster>", "<postmaster@mx.example.test>", "<x@localhost>", "<alice>",
    f"<@relay.example:alice@{VD}>", f"alice@{VD}", f"<alice@{VD}", f'<"alice"@{VD}>',
    f'<"al ice"@{VD}>', "<alice@[127.0.0.1]>", "<>", "< >", f"<alice@{VD}.>",
    f"<alice@@{VD}>", "<@>", f"<alice%other@{VD}>", "<x@example.org>", "<x@far.example>",
    f"<\u00fcser@{VD}>", f"<{_byte(0xE9)}@{VD}>", f"<alice@{VD}> junk", f"<carol@{VD}>",
    "<root@localhost>", f"<a b@{VD}>", "<x@[IPv6:::1]>", "<x@[1.2.3.4]>",
    f"<{'r' * 65}@{VD}>", f"<alice+ext@{VD}>", f"<<alice@{VD}>>",
]

MAIL_PARAMS = [
    "SIZE=100", "SIZE=0", "SIZE=99999999999", "SIZE=abc", "SIZE=", "SIZE", "SIZE=5000",
    "BODY=7BIT", "BODY=8BITMIME", "BODY=BINARYMIME", "BODY=bogus", "BODY=", "body=8bitmime",
    "SMTPUTF8", "SMTPUTF8=yes", "RET=FULL", "RET=HDRS", "RET=bogus", "RET=", "ENVID=abc",
    "ENVID=a+2Bb", "ENVID=a+zz", "ENVID=", "ENVID=" + "e" * 120, "AUTH=<>", "AUTH=a@b.example",
    "AUTH=a+2Bb", "AUTH=", "XFOO=bar", "XFOO", "NOTIFY=NEVER", "ORCPT=rfc822;x@y.example",
    "=x", "SIZE=10 SIZE=20", "RET=FULL RET=HDRS", "ENVID=a ENVID=b", "BODY=7BIT BODY=8BITMIME",
    "size=100", "Ret=hdrs", "\tSIZE=100", "SIZE=100\t",
]

RCPT_PARAMS = [
    "NOTIFY=NEVER", "NOTIFY=SUCCESS", "NOTIFY=SUCCESS,FAILURE,DELAY", "NOTIFY=NEVER,SUCCESS",
    "NOTIFY=bogus", "NOTIFY=", "NOTIFY=success", "NOTIFY=SUCCESS,SUCCESS",
    f"ORCPT=rfc822;alice@{VD}", "ORCPT=rfc822;a+2Bb@x.example", "ORCPT=bogus", "ORCPT=rfc822;",
    "ORCPT=utf-8;\u00fc@x.example", "ORCPT=utf-8;a\\x{FC}@x.example", "ORCPT=x-unknown;abc",
    "ORCPT=rfc822;a+zz", "XFOO=bar", "SIZE=100", "RET=FULL", "NOTIFY=NEVER NOTIFY=SUCCESS",
    f"ORCPT=rfc822;a@{VD} ORCPT=rfc822;b@{VD}", "notify=never", "ENVID=x",
]

MISC = [
    "RSET", "NOOP", "NOOP x y", "RSET x", "QUIT", "QUIT x", "HELP", "HELP MAIL", "VRFY alice",
    f"VRFY <alice@{VD}>", "VRFY", "VRFY nobody", f"VRFY <nobody@{VD}>", "EXPN alice", "EXPN",
    "ETRN", "ETRN virtual.test", "ETRN #x", "ETRN @x", "STARTTLS", "STARTTLS x", "AUTH PLAIN",
    "AUTH", "XCLIENT ADDR=1.2.3.4", "XFORWARD NAME=x", "FOO", "FOO bar", "", " ", "\t",
    "MAIL", "MAIL FROM", "MAIL FROM:", "MAIL TO:<a@b.example>", "RCPT", "RCPT TO", "RCPT TO:",
    "RCPT FROM:<a@b.example>", "DATA x", "BDAT", "BDAT x", "BDAT 0", "BDAT -1",
    "BDAT 0 LAST", "BDAT 0 last", "BDAT 0 LAST x", "SEND FROM:<a@b.example>", "TURN",
    "NOOP" + " x" * 300, "X" * 600, "NOOP\x00", "RS\x00ET", "NO" + _byte(0xC3) + "OP",
    "HELO", "EHLO", "rset", "Quit", "noop\t", "  NOOP", "NOOP  ", "GET / HTTP/1.0",
    "Host: x.example", "CONNECT x:25 HTTP/1.0", "POST / HTTP/1.1",
]


def _case(rng: random.Random, verb: str) -> str:
    r = rng.random()
    if r < 0.7:
        return verb
    if r < 0.85:
        return verb.lower()
    return "".join(c.upper() if rng.random() < 0.5 else c.lower() for c in verb)


def _blank(rng: random.Random) -> str:
    return rng.choice([" ", " ", "  ", "\t", " \t"])


def _tail(rng: random.Random, line: str) -> str:
    r = rng.random()
    if r < 0.08:
        return line + _blank(rng)
    if r < 0.1:
        return line + "\x00"
    return line


def helo(rng: random.Random) -> str:
    verb = _case(rng, rng.choice(["EHLO", "EHLO", "HELO"]))
    arg = rng.choice(HELO_ARGS) if rng.random() < 0.45 else "client.example.org"
    return _tail(rng, f"{verb} {arg}" if arg else verb)


def _params(rng: random.Random, pool: list[str], chance: float) -> str:
    out = []
    while rng.random() < chance and len(out) < 4:
        out.append(rng.choice(pool))
        chance *= 0.5
    return "".join(" " + p for p in out)


def _colon(rng: random.Random, keyword: str) -> str:
    r = rng.random()
    if r < 0.85:
        return f"{keyword}:"
    return rng.choice([f"{keyword}: ", f"{keyword} :", f"{keyword}:\t", keyword.lower() + ":",
                       f"{keyword}:  "])


def mail(rng: random.Random) -> str:
    sender = rng.choice(SENDERS) if rng.random() < 0.4 else "<sender@example.org>"
    return _tail(rng, f"{_case(rng, 'MAIL')} {_colon(rng, 'FROM')}{sender}"
                      + _params(rng, MAIL_PARAMS, 0.3))


def rcpt(rng: random.Random) -> str:
    to = rng.choice(RECIPIENTS) if rng.random() < 0.45 else rng.choice(
        [f"<alice@{VD}>", f"<bob@{VD}>", f"<carol@{VD}>"])
    return _tail(rng, f"{_case(rng, 'RCPT')} {_colon(rng, 'TO')}{to}"
                      + _params(rng, RCPT_PARAMS, 0.3))


def body(rng: random.Random, serial: int) -> list[str]:
    lines = ["From: <sender@example.org>", f"Message-ID: <fuzz{serial}@example.org>",
             "Subject: fuzz", ""]
    for _ in range(rng.randint(0, 4)):
        lines.append(rng.choice([
            "hello", "", "..dot stuffed", ". leading dot", "x" * 1200, "y" * 5000,
            "8bit " + _byte(0xE9) + _byte(0xE8), "nul\x00inside", "tab\tinside",
            "bare lf\n", "Subject: late header", "\u00fcnicode body",
            "z" * 2100, "bare\rcr",
        ]))
    if rng.random() < 0.1:
        lines.insert(rng.randint(0, 3), rng.choice([
            "X-Long: " + "h" * 1500, "Received: from x by y", "bogus header line",
            "To: <alice@virtual.test>", "X-8bit: " + _byte(0xFC),
        ]))
    lines.append(".")
    return lines


def bdat(rng: random.Random, serial: int) -> list[str]:
    """One or two BDAT chunks, each sent whole with its bytes (never short)."""
    text = (f"Message-ID: <fuzz{serial}@example.org>\r\nSubject: bdat\r\n\r\n"
            + rng.choice(["hello\r\n", "bare\nlf\n", "x\r\n.\r\n", "", "8bit "
                          + _byte(0xE9) + "\r\n"]))
    data = text.encode("utf-8", "surrogateescape")
    out = []
    if rng.random() < 0.4 and len(data) > 4:
        cut = rng.randint(1, len(data) - 1)
        first, data = data[:cut], data[cut:]
        out.append(_bdat_line(f"{_case(rng, 'BDAT')} {len(first)}", first))
    last = rng.choice([" LAST", " LAST", " last", "", " LAST x", "  LAST"])
    size = len(data)
    if rng.random() < 0.1:
        size = max(0, size - rng.randint(1, 3))        # leftover bytes become commands
    out.append(_bdat_line(f"{_case(rng, 'BDAT')} {size}{last}", data))
    return out


def _bdat_line(command: str, data: bytes) -> str:
    return (command + "\r\n").encode().decode("utf-8", "surrogateescape") + \
        data.decode("utf-8", "surrogateescape") + ("" if data.endswith(b"\n") else "\r\n")


def session(rng: random.Random, serial: int = 0) -> list:
    """3-12 commands; a list item is one pipelined write."""
    want = rng.randint(3, 12)
    out: list = []
    n = 0
    if rng.random() < 0.85:
        out.append(helo(rng))
        n += 1
    while n < want:
        n += 1
        r = rng.random()
        if r < 0.2:
            out.append(mail(rng))
        elif r < 0.42:
            out.append(rcpt(rng))
        elif r < 0.52:
            out.append(_case(rng, "DATA") + (rng.choice(["", "", "", " ", " x"])))
            out.extend(body(rng, serial))
        elif r < 0.58:
            out.extend(bdat(rng, serial))
        elif r < 0.68:
            group = [mail(rng)] + [rcpt(rng) for _ in range(rng.randint(1, 3))]
            if rng.random() < 0.6:
                group.append("DATA")
                out.append(group)
                out.append(body(rng, serial))
            else:
                if rng.random() < 0.3:
                    group.append(rng.choice(MISC))
                out.append(group)
        elif r < 0.74:
            out.append(helo(rng))
        else:
            out.append(_tail(rng, rng.choice(MISC)))
    if rng.random() < 0.7:
        out.append(_case(rng, "QUIT"))
    return out


def sessions(seed: int, count: int) -> list[list]:
    rng = random.Random(seed)
    return [session(rng, seed * 100000 + i) for i in range(count)]


# ---------------------------------------------------------------- variants

_QUIET = {"smtpd_error_sleep_time": "0", "notify_classes": "",
          # Relayed mail never leaves the machine: the qmgr's work is not compared.
          "default_transport": "discard",
          # 127.0.0.1 would be exempt as part of $mynetworks: see XFAIL _BARE_LF_REASON.
          "smtpd_forbid_bare_newline_exclusions": ""}
VARIANTS = {
    # The harness's relay control: 127.0.0.1 is in mynetworks.
    "default": dict(_QUIET),
    # ... with smtpd_forbid_bare_newline_exclusions as Postfix ships it ($mynetworks).
    "lfexempt": {k: v for k, v in _QUIET.items() if k != "smtpd_forbid_bare_newline_exclusions"},
    "strict": {**_QUIET, "smtpd_helo_required": "yes", "strict_rfc821_envelopes": "yes",
               "mynetworks": "192.0.2.0/24"},
    "limits": {**_QUIET, "smtpd_recipient_limit": "2", "message_size_limit": "3000",
               # Soft and hard limit together: no error sleeps (their timing is
               # test_parity_sweep's business), yet sessions end at the hard limit.
               "smtpd_hard_error_limit": "6", "smtpd_soft_error_limit": "6"},
}

MAIL = "MAIL FROM:<a@b.example>"
RCPT = f"RCPT TO:<alice@{VD}>"
NOBODY = f"RCPT TO:<nobody@{VD}>"


def _msg(*body: str) -> list[str]:
    return ["Message-ID: <fuzz6@example.org>", "", *body, "."]


# name: (variant, lines); each found by the generator, minimised, fixed in postwell.
DIALOGUES = {
    # A zero-size BDAT without LAST is refused before any state check (no MAIL, no RCPT,
    # a refused sequence) and puts the session in the discarding state.
    "null_bdat_without_mail": ("default", ["EHLO x", "BDAT 0", MAIL, "RSET", MAIL, "QUIT"]),
    "null_bdat_without_rcpt": ("default", ["EHLO x", MAIL, "BDAT 0", "BDAT 1 LAST\r\nx", MAIL,
                                           "QUIT"]),
    "null_bdat_repeated": ("default", ["EHLO x", MAIL, RCPT, "BDAT 0", "BDAT 0", "BDAT 0 LAST",
                                       "QUIT"]),
    "null_bdat_after_refused_chunk": ("default", ["EHLO x", "BDAT 5\r\nxxxxx", "BDAT 0",
                                                  "RSET", "QUIT"]),
    "null_bdat_after_size_refusal": ("default", ["EHLO x", MAIL + " SIZE=999999999999",
                                                 "BDAT 00", "QUIT"]),
    # The end of a refused BDAT sequence resets the transaction: no from= in a later
    # VRFY line, and the next MAIL gets a queue file of its own.
    "vrfy_after_refused_bdat_sequence": ("default", ["EHLO x", MAIL, "BDAT 3\r\nabc",
                                                     "BDAT 1 LAST\r\nx", f"VRFY nobody@{VD}",
                                                     MAIL, "QUIT"]),
    "mail_after_oversized_bdat_sequence": ("limits", [
        "EHLO x", MAIL, RCPT, "BDAT 3100\r\n" + "x" * 3098, "BDAT 1 LAST\r\nx",
        "MAIL FROM:<other@b.example>", NOBODY, f"RCPT TO:<bob@{VD}>", "DATA", _msg("x"),
        "QUIT"]),
    # Log lines show client bytes through Postfix's escape(): C escapes, octal for the
    # rest, a backslash doubled.
    "pipelining_line_escaped": ("default", ["EHLO x", ["NOOP", "NOOP \u00fc\\\\ \x01\t\x7f"],
                                            "QUIT"]),
    "pipelining_after_bdat_8bit": ("default", ["BDAT 30 LAST x\r\nrg>\r\nSubject: bdat\r\n\r\n"
                                               "8bit " + _byte(0xE9) + "\r\n"]),
    "non_smtp_command_escaped": ("default", ["POST / x\\y\t\x01\x7f\x1b", "QUIT"]),
    "non_smtp_header_escaped": ("default", ["From: \u00fc\t\x02\\\\", "QUIT"]),
    "non_smtp_command_cut_after_escaping": ("default", ["POST /" + "\x01" * 40 + "abc"]),
    # A NUL does not hide the rest of the line: the non-SMTP warning shows it, and the
    # UTF-8 check covers it.
    "non_smtp_command_with_nul": ("default", ["CONNECT x:25 HTTP/1.0\x00", "QUIT"]),
    "bad_utf8_after_nul": ("default", ["NOOP\x00" + _byte(0xE9), "From: a\x00" + _byte(0xE9)
                                       + "b", "NOOP\x00\u00fc", "QUIT"]),
    # smtpd_hard_error_limit: the 421 follows the error that reached it, before the
    # next command is read.
    "hard_error_limit_421_at_once": ("limits", ["EHLO x", "FOO", "FOO", "FOO", "FOO", MAIL,
                                                NOBODY, "RCPT TO:<x@>", "NOOP"]),
    # AUTH= without SASL: kept and logged in the client= line; an empty value draws
    # cleanup's warning.
    "mail_auth_without_sasl": ("default", ["EHLO x", MAIL + " AUTH=a+2Bb", RCPT, "RSET",
                                           MAIL + " AUTH=", RCPT, "RSET", MAIL + " AUTH=<>",
                                           RCPT, "QUIT"]),
    # A MAIL refused after its AUTH= was read keeps that value until RSET/EHLO: the
    # next MAIL inherits it, or draws "multiple AUTH= options" with one of its own.
    "mail_auth_kept_from_refused_mail": ("default", [
        "EHLO x", MAIL + " AUTH=a+2Bb XFOO", MAIL + " AUTH=c", MAIL, RCPT, "RSET",
        MAIL + " AUTH=x AUTH=y", "EHLO y", MAIL, RCPT, "QUIT"]),
    # SIZE over message_size_limit is checked after every parameter.
    "size_limit_after_other_parameters": ("default", [
        "EHLO x", MAIL + " SIZE=99999999999 XFOO", MAIL + " SIZE=99999999999 RET=x",
        MAIL + " SIZE=99999999999 ENVID=a+zz", MAIL + " XFOO SIZE=99999999999",
        MAIL + " SIZE=99999999999", MAIL + " SIZE=10", "QUIT"]),
    # "<@domain>" is an empty local part (logged ""@domain), not a bad source route.
    "empty_local_part": ("default", [
        "EHLO x", "MAIL FROM:<@example.org>", NOBODY, f"RCPT TO:<@{VD}>", f"RCPT TO:<@@{VD}>",
        f'RCPT TO:<""@{VD}>', "RSET", 'MAIL FROM:<""@example.org>', NOBODY, "RSET",
        "MAIL FROM:@example.org", NOBODY, "RSET", "MAIL FROM:<@@x.example>", NOBODY, "RSET",
        'MAIL FROM:<@x.example:""@example.org>', NOBODY, "QUIT"]),
    # A phrase before "<address>" inside the path is skipped, as RFC 822 display names.
    "phrase_before_bracketed_address": ("default", [
        "EHLO x", 'MAIL FROM:<"a b" <c@example.org>>', f"RCPT TO:<nobody <nobody@{VD}>>",
        "RSET", "MAIL FROM:<a@x.example <b@example.org>>", f"RCPT TO:<x <@{VD}>>", "RSET",
        "MAIL FROM:<x <>>", NOBODY, "RSET", "MAIL FROM:<@x.example:a <b@example.org>>",
        NOBODY, "RSET", "MAIL FROM:<a.b <c@example.org>>", "RSET",
        "MAIL FROM:<@route:<a@example.org>>", "RSET", "MAIL FROM:<a: <b@example.org>>",
        "MAIL FROM:<<a@example.org> x>", "MAIL FROM:<a <b@example.org> <c@example.org>>",
        "QUIT"]),
    # A client exempt from smtpd_forbid_bare_newline (mynetworks): Postfix ends the
    # data at any "." line, LF or CRLF, after a bare LF too (XFAIL: deliberate).
    "exempt_client_dot_after_bare_lf": ("lfexempt", ["EHLO x", MAIL, RCPT, "DATA",
                                                     _msg("bare lf\n"), "QUIT"]),
    # Not exempt (normalize): a bare LF ends a content line, CRLF.CRLF the data.
    "bare_lf_in_data_not_exempt": ("default", ["EHLO x", MAIL, RCPT, "DATA",
                                               _msg("bare lf\n", "after"), "QUIT"]),
    # HELO after EHLO keeps the protocol ESMTP: pipelining stays allowed, and the log
    # lines say proto=ESMTP.
    "helo_after_ehlo_stays_esmtp": ("default", [
        "EHLO x", "HELO x", [MAIL, RCPT, NOBODY], "RSET", "HELO y", ["RSET", "NOOP"],
        "QUIT"]),
    "pipelining_helo_only": ("default", ["HELO x", [MAIL, RCPT], "QUIT"]),
    # STARTTLS without TLS offered (or with an argument) ends no group in ESMTP.
    "pipelined_starttls_not_offered": ("default", ["EHLO x", ["STARTTLS", "NOOP"],
                                                   ["STARTTLS x", "NOOP"], "QUIT"]),
    "pipelined_starttls_not_offered_helo": ("default", ["HELO x", ["STARTTLS", "NOOP"],
                                                        "QUIT"]),
    # smtpd_helo_required comes before MAIL's syntax checks, and before AUTH's.
    "helo_required_before_mail_syntax": ("strict", [
        "MAIL FROM", "MAIL FROM:", "MAIL FROM:<sender@exa mple.org>", "MAIL from:<sender@>",
        MAIL + " SIZE=", MAIL + " SIZE=99999999999 XFOO", "AUTH", "AUTH PLAIN", "EHLO x",
        "AUTH", "QUIT"]),
    # strict_rfc821_envelopes: no empty local part; nested brackets are no phrase.
    "strict_envelopes_local_part": ("strict", [
        "EHLO x", "MAIL FROM:<@example.org>", 'MAIL FROM:<""@example.org>',
        "MAIL FROM:<<a@example.org>>", f"RCPT TO:<<nobody@{VD}>>", f"RCPT TO:<@{VD}>",
        f'RCPT TO:<""@{VD}>', f"RCPT TO:<a <b@{VD}>>", "MAIL FROM:<x <>>",
        "QUIT"]),
}

# Differences known and not fixed: name -> reason (strict xfails: a fix makes them fail).
# Both cleanups measure the whole queue file (envelope records too) against
# message_size_limit (tests/test_size_limit7.py); a generated message within a few
# bytes of the limit may still fall on either side: each side's queue id, client
# port and arrival time have their own lengths.
_SIZE_REASON = ("a message within a few bytes of message_size_limit: the queue ids, "
                "ports and arrival stamps of the two sides differ in length")
DIALOGUES["size_limit_counts_envelope"] = ("limits", ["EHLO x", MAIL, RCPT, "DATA",
                                                      _msg("z" * 2200), "QUIT"])
_BARE_LF_REASON = ("deliberate (test_parity_smtpd XFAIL bare_lf_end_of_data_from_mynetworks, "
                   "test_smtpd.py test_smuggling_never_second_message): postwell requires "
                   "CRLF.CRLF from every client, Postfix not from "
                   "smtpd_forbid_bare_newline_exclusions ($mynetworks); such a client "
                   "waits for the end of data until smtpd_timeout")
XFAIL = {"exempt_client_dot_after_bare_lf": _BARE_LF_REASON}

_CASES = parity_cases(DIALOGUES, XFAIL, "fuzz6")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    reason = harness.reference_available()
    if reason:
        pytest.skip(reason)
    with harness.variant_pairs(tmp_path_factory, "fuzz6", lambda v: VARIANTS[v]) as get:
        yield get


def _compare(ref, pw, lines):
    (want_r, want_log), (got_r, got_log) = harness.run_side_by_side(_run, ref, pw, lines)
    return (_texts(want_r), want_log), (_texts(got_r), got_log)


@pytest.mark.parametrize("name, variant, lines", _CASES)
def test_dialogue_matches_reference(pairs, name, variant, lines):
    ref, pw = pairs(variant)
    (want_t, want_log), (got_t, got_log) = _compare(ref, pw, lines)
    assert len(want_t) >= 1, "the reference did not answer"
    assert got_t == want_t, f"replies differ in {name!r}:\n{_table(want_t, got_t)}"
    assert got_log == want_log, f"log differs in {name!r}:\n{_table(want_log, got_log)}"


# ---------------------------------------------------------------- generated sessions

def _size_threshold(variant, want, got, lines=()) -> bool:
    """A message near message_size_limit (see _SIZE_REASON), and what the two log
    around a file found too big."""
    if variant != "limits":
        return False
    marks = ("Error: message file too big", "queue file size limit exceeded",
             "mail_stream_cleanup: close error")
    return any(m in x for side in (want, got) for part in side for x in part for m in marks)


def _reset_race(variant, want, got, lines=()) -> bool:
    """Both servers send their last reply (421, 521, a 221 to a non-SMTP command) and
    close with the client's next command unread; the client's kernel may then drop
    that reply on the TCP reset.  Which side loses it is luck, the logs agree."""
    (want_r, want_log), (got_r, got_log) = want, got
    if want_log != got_log:
        return False
    short, long_ = sorted((want_r, got_r), key=len)
    return (len(long_) == len(short) + 1 and long_[:-1] == short
            and long_[-1][:3] in ("421", "521", "221"))


# Differences the generated sessions may show: (test, reason).  Anything else fails.
ALLOWED = [(_size_threshold, _SIZE_REASON),
           (_reset_race, "a closing reply lost to the TCP reset (timing, not behaviour)")]

FUZZ_SEED = 6
# per variant (FUZZ6_SESSIONS scales it up; 50 ran clean when the fuzzer was written)
FUZZ_SESSIONS = int(os.environ.get("FUZZ6_SESSIONS", "25"))


def _crashed(ref, before: int) -> bool:
    """Postfix 3.7.11's smtpd dies (SIGSEGV) on some null-BDAT sequences; its master
    logs it and the session's lines end early.  Such a session proves nothing."""
    with open(ref.maillog, "rb") as f:
        f.seek(before)
        return b" killed by signal " in f.read()


@pytest.mark.parametrize("variant", ["default", "strict", "limits"])
def test_fuzz_sessions_match_reference(pairs, variant):
    ref, pw = pairs(variant)
    seed = FUZZ_SEED * 10 + ["default", "strict", "limits"].index(variant)
    failures = []
    for i, lines in enumerate(sessions(seed, FUZZ_SESSIONS)):
        before = os.path.getsize(ref.maillog)
        want, got = _compare(ref, pw, lines)
        if want == got or _crashed(ref, before):
            continue
        if any(test(variant, want, got, lines) for test, _ in ALLOWED):
            continue
        failures.append(f"session {i}: {lines!r}\n-- replies\n{_table(want[0], got[0])}"
                        f"\n-- log\n{_table(want[1], got[1])}")
    assert not failures, f"{len(failures)} session(s) differ:\n" + "\n\n".join(failures[:3])
