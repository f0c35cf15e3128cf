"""A second parity sweep against the reference Postfix 3.7: the corners that
test_parity_smtpd.py does not reach.

Same method: one variant is one main.cf used by both MTAs; every session is replayed
on both and every reply line and every smtpd log line of the session is compared
(queue ids, pids and timestamps normalised).  Only the banner text is special: with
the default smtpd_banner it names mail_name, a deliberate difference
(docs/architecture.md), so there only its code counts; variants whose banner does
not mention $mail_name compare it word for word.
"""

from __future__ import annotations

import os
import re
import socket
import time

import pytest

import harness
from harness import VIRTUAL_DOMAIN as VD

pytestmark = pytest.mark.postfix

EHLO = "EHLO client.example.org"
MAIL = "MAIL FROM:<sender@example.org>"
RCPT = f"RCPT TO:<alice@{VD}>"
BOB = f"RCPT TO:<bob@{VD}>"
NOBODY = f"RCPT TO:<nobody@{VD}>"
MSG = ["From: <sender@example.org>", "Subject: sweep", "", "hello", "."]

VARIANTS = {
    "default": {},
    # Junk commands (NOOP, VRFY, ETRN, RSET) past smtpd_junk_command_limit count as errors.
    "errors": {"smtpd_junk_command_limit": "2", "smtpd_hard_error_limit": "4",
               "smtpd_soft_error_limit": "2", "smtpd_error_sleep_time": "0"},
    "discard": {"smtpd_discard_ehlo_keywords": "dsn, pipelining, chunking, 8bitmime, vrfy, "
                                               "smtputf8",
                "smtpd_null_access_lookup_key": "MAILER-DAEMON",
                "smtpd_sender_restrictions": "check_sender_access "
                                             "inline:{{MAILER-DAEMON=REJECT bounces refused}}"},
    "timeout": {"smtpd_timeout": "2s"},
    # 127.0.0.1 outside mynetworks, so the anvil limits apply to it.
    # Anvil's counts carry over from session to session: only rate_limits sends mail here,
    # and test_sweep_connection_count_limit only connects.
    "ratelimit": {"mynetworks": "192.0.2.0/24", "smtpd_client_connection_count_limit": "1",
                  "smtpd_client_message_rate_limit": "1",
                  "smtpd_client_recipient_rate_limit": "2"},
    "footer": {"smtpd_reject_footer": "\\c [a=$client_address n=${client_name} s=$server_name "
                                      "h=$helo_name f=$sender r=$recipient x=$code]\\n"
                                      "Contact postmaster@example.test"},
    "banner": {"smtpd_banner": "$myhostname says hello", "smtpd_helo_required": "yes",
               "message_size_limit": "0", "smtpd_recipient_limit": "3",
               "smtpd_recipient_overshoot_limit": "4", "smtpd_hard_error_limit": "6",
               "smtpd_error_sleep_time": "0"},
    "headers": {"header_size_limit": "1024", "message_size_limit": "3000",
                "smtpd_data_restrictions": "reject_multi_recipient_bounce",
                "smtpd_end_of_data_restrictions": "check_sender_access "
                                                  "inline:{{eod@example.org=REJECT no eod}}"},
    "noutf8": {"smtputf8_enable": "no", "disable_vrfy_command": "yes",
               "smtpd_discard_ehlo_keywords": "enhancedstatuscodes, etrn, size, bogus"},
}
# Variants whose banner text is compared too (it does not name mail_name).
_FULL_BANNER = {"banner"}

# name: (variant, lines); a list item is one pipelined write (harness.dialogue).  A line
# ending in "\n" goes out as is (exact BDAT chunks).
DIALOGUES = {
    # ---- trailing white space, case, arguments where none are expected
    "trailing_spaces": ("default", ["EHLO a.example ", "NOOP ", "RSET  ", "HELP ", MAIL + " ",
                                    RCPT + "  ", "DATA ", "VRFY alice ", "QUIT "]),
    "data_with_argument": ("default", [EHLO, MAIL, RCPT, "DATA x", "DATA", *MSG, "QUIT"]),
    "mixed_case_verbs": ("default", ["eHlO a.example", "MaIl FrOm:<a@b.example>",
                                     f"rCpT tO:<alice@{VD}>", "NoOp", "rSeT", "qUiT"]),
    "blank_lines": ("default", ["", "   ", "\t", EHLO, "", " NOOP", "QUIT"]),
    "help_before_helo": ("default", ["HELP", "HELP DATA", "NOOP", "VRFY", "EXPN", "ETRN",
                                     "RSET", "QUIT"]),
    "quit_with_spaces": ("default", [EHLO, "QUIT   "]),
    "noop_flood": ("default", [EHLO, ["NOOP"] * 105, "VRFY alice", "QUIT"]),
    "empty_message": ("default", [EHLO, MAIL, RCPT, "DATA", ".", MAIL, RCPT, "DATA", "", ".",
                                  "QUIT"]),
    "helo_forms": ("default", ["HELO 1.2.3.4", "HELO x.example.", "EHLO " + "h" * 300,
                               "EHLO [1.2.3.4", "HELO \udce9t\udce9.example", "EHLO a.example b",
                               "QUIT"]),
    "mail_param_combos": ("default", [EHLO, MAIL + " BODY=8BITMIME SMTPUTF8 SIZE=100 RET=HDRS "
                                      "ENVID=abc", RCPT + " NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;"
                                      f"alice@{VD}", "RSET", MAIL + " SMTPUTF8 SMTPUTF8", "RSET",
                                      MAIL + " AUTH=<> AUTH=<>", "RSET",
                                      MAIL + " AUTH=<> AUTH=a+40b", "RSET",
                                      MAIL + " AUTH=a@b AUTH=<>", MAIL + " AUTH=a@b AUTH=c@d",
                                      "QUIT"]),
    # ---- VRFY / EXPN / ETRN forms
    "vrfy_forms": ("default", [EHLO, "VRFY <alice@virtual.test>", "VRFY postmaster",
                               "VRFY alice", "VRFY <>", "VRFY @", "VRFY <a@b> x",
                               "vrfy ALICE@VIRTUAL.TEST", "VRFY \"alice\"@virtual.test", "QUIT"]),
    "expn_forms": ("default", ["EXPN alice", EHLO, "EXPN <alice@virtual.test>", "EXPN a b",
                               "EXPN", "QUIT"]),
    # (fewer than smtpd_soft_error_limit errors a session: no error sleeps)
    "etrn_forms": ("default", [EHLO, "ETRN  ", "ETRN virtual.test", "ETRN mx.example.test",
                               "ETRN [127.0.0.1]", "ETRN x..y", "ETRN -x", "ETRN x.", "ETRN x_y",
                               "ETRN [IPv6:::1]", MAIL, "ETRN a b", "QUIT"]),
    "etrn_bad_domains": ("default", [EHLO, "ETRN 1.2.3.4", "ETRN 123", "ETRN @@x.example",
                                     "ETRN #", "ETRN [1.2.3]", "ETRN " + "a" * 64 + ".example",
                                     "ETRN x\u00e9.example", "QUIT"]),
    "vrfy_disabled_forms": ("noutf8", [EHLO, "VRFY", "VRFY alice", "EXPN alice", "QUIT"]),
    # ---- MAIL FROM corners
    "mail_null_sender": ("default", [EHLO, "MAIL FROM:<>", RCPT, "RSET", "MAIL FROM:<> SIZE=10",
                                     "RSET", "MAIL FROM: <>", "RSET", "mail from:<>", "RSET",
                                     "MAIL FROM:< >", "QUIT"]),
    "mail_spaces_in_brackets": ("default", [EHLO, "MAIL FROM:<a@b.example >", "RSET",
                                            "MAIL FROM:< a@b.example>", "RSET",
                                            "MAIL FROM:<a @b.example>", "RSET",
                                            "MAIL FROM:<a@b.example > SIZE=5", "RSET",
                                            "MAIL FROM:<\t>", RCPT + " ", "RCPT TO:< >",
                                            f"RCPT TO:< alice@{VD} >", "QUIT"]),
    "mail_missing_brackets": ("default", [EHLO, "MAIL FROM:sender@example.org", "RSET",
                                          "MAIL FROM: sender@example.org", "RSET",
                                          "MAIL FROM:sender@example.org SIZE=5", "RSET",
                                          "MAIL FROM:", "MAIL FROM:<", "MAIL FROM:>", "QUIT"]),
    "mail_source_routes": ("default", [EHLO, "MAIL FROM:<@a.example,@b.example:u@d.example>",
                                       RCPT, "RSET", "MAIL FROM:<@a.example:u@d.example>", "RSET",
                                       "MAIL FROM:<@:u@d.example>", "MAIL FROM:<@a.example>",
                                       "QUIT"]),
    "mail_literals": ("default", [EHLO, "MAIL FROM:<u@[127.0.0.1]>", "RSET",
                                  "MAIL FROM:<u@[IPv6:::1]>", "RSET", "MAIL FROM:<u@[IPv6:bogus]>",
                                  "RSET", "MAIL FROM:<u@[300.1.1.1]>", "RSET",
                                  'MAIL FROM:<"a b"@example.org>', "RSET",
                                  'MAIL FROM:<"a\\"b"@example.org>', "RSET",
                                  "MAIL FROM:<a.@example.org>", "QUIT"]),
    "mail_size_values": ("default", [EHLO, MAIL + " SIZE=0", "RSET", MAIL + " SIZE=-1",
                                     MAIL + " SIZE=1.5", MAIL + " SIZE=+5",
                                     MAIL + " SIZE=99999999999999999999999", "RSET",
                                     MAIL + " size=100", "QUIT"]),
    "mail_body_values": ("default", [EHLO, MAIL + " BODY=8BITMIME", "RSET", MAIL + " body=8bitmime",
                                     "RSET", MAIL + " BODY=7bit", "RSET", MAIL + " BODY=",
                                     MAIL + " BODY", "QUIT"]),
    "mail_dsn_corners": ("default", [EHLO, MAIL + " RET=HDRS", "RSET", MAIL + " ret=full", "RSET",
                                     MAIL + " RET=", MAIL + " ENVID=",
                                     MAIL + " ENVID=" + "e" * 600, "RSET",
                                     MAIL + " ENVID=a\u00e9", MAIL + " ENVID=a+7F",
                                     MAIL + " ENVID=a+2b=", "RSET", MAIL + " RET", "QUIT"]),
    "mail_unknown_params": ("default", [EHLO, MAIL + " X-FOO", MAIL + " =x", MAIL + " FOO=",
                                        MAIL + " SMTPUTF8=yes", MAIL + " AUTH=foo@bar.example",
                                        "RSET", MAIL + " AUTH=bad+zzxtext", "RSET",
                                        MAIL + "  SIZE=10", "QUIT"]),
    "mail_8bit_local_part": ("default", [EHLO, "MAIL FROM:<j\u00f6rg@example.org>", "RSET",
                                         "MAIL FROM:<j\udcf6rg@example.org> SMTPUTF8", "RSET",
                                         "MAIL FROM:<j\u00f6rg@b\u00fccher.example> SMTPUTF8",
                                         "RCPT TO:<\u00e9l\u00e8ve@virtual.test>", "QUIT"]),
    "mail_nul_byte": ("default", [EHLO, "MAIL FROM:<a\x00b@example.org>", "RSET",
                                  "RCPT TO:<a\x00b@virtual.test>", "QUIT"]),
    "mail_long_address": ("default", [EHLO, f"MAIL FROM:<{'s' * 300}@example.org>", "RSET",
                                      f"MAIL FROM:<{'s' * 2100}@example.org>", "RSET",
                                      f"MAIL FROM:<s@{'d' * 300}.example>", "QUIT"]),
    "mail_smtputf8_disabled": ("noutf8", [EHLO, MAIL + " SMTPUTF8", "RSET",
                                          "MAIL FROM:<j\u00f6rg@example.org>", "RSET",
                                          "MAIL FROM:<j\u00f6rg@example.org> SMTPUTF8", "QUIT"]),
    # ---- RCPT TO corners
    "rcpt_missing_brackets": ("default", [EHLO, MAIL, f"RCPT TO:alice@{VD}",
                                          f"RCPT TO: alice@{VD}", f"RCPT TO: <bob@{VD}>",
                                          "RCPT TO:<", "RCPT TO:>", "QUIT"]),
    "rcpt_unqualified": ("default", [EHLO, MAIL, "RCPT TO:<postmaster>", "RCPT TO:<POSTMASTER>",
                                     "RCPT TO:<alice>", "RCPT TO:<abuse>", "QUIT"]),
    "rcpt_source_routes": ("default", [EHLO, MAIL, f"RCPT TO:<@a.example,@b.example:alice@{VD}>",
                                       f"RCPT TO:<@x.example:bob@{VD}>",
                                       "RCPT TO:<@x.example:u@elsewhere.example>", "QUIT"]),
    "rcpt_literals": ("default", [EHLO, MAIL, "RCPT TO:<u@[127.0.0.1]>",
                                  "RCPT TO:<postmaster@[127.0.0.1]>", "RCPT TO:<u@[IPv6:::1]>",
                                  "RCPT TO:<u@[192.0.2.7]>", "RCPT TO:<u@[IPv6:2001:db8::1]>",
                                  "QUIT"]),
    "rcpt_quoted_and_odd": ("default", [EHLO, MAIL, f'RCPT TO:<"bob"@{VD}>',
                                        f'RCPT TO:<"b o b"@{VD}>', f"RCPT TO:<bob+ext@{VD}>",
                                        f"RCPT TO:<Bob@{VD}>", "RCPT TO:<u!v@mx.example.test>",
                                        "RCPT TO:<u%v@mx.example.test>", "QUIT"]),
    "rcpt_params_corners": ("default", [EHLO, MAIL, RCPT + " NOTIFY=", RCPT + " NOTIFY=bogus",
                                        RCPT + " NOTIFY=NEVER,SUCCESS", RCPT + " notify=success",
                                        RCPT + " ORCPT=", RCPT + " ORCPT=rfc822;a+zz",
                                        RCPT + " ORCPT=x-unknown;abc", RCPT + " ORCPT=rfc822;",
                                        RCPT + " ORCPT=;x", RCPT + " ORCPT=rfc822;a+2b\u00e9",
                                        RCPT + " ORCPT=rfc822;" + "o" * 600,
                                        RCPT + " NOTIFY=SUCCESS,,FAILURE", RCPT + " NOTIFY=,",
                                        RCPT + " NOTIFY=NEVER,NEVER", RCPT + " NOTIFY=NEVER,,x",
                                        RCPT + " FOO=bar", RCPT + " SIZE=10", "QUIT"]),
    "rcpt_null_sender_multi": ("headers", [EHLO, "MAIL FROM:<>", RCPT, BOB, "DATA", "QUIT"]),
    # ---- sequence and state
    "duplicate_mail": ("default", [EHLO, MAIL, MAIL, RCPT, MAIL, "RSET", MAIL, "QUIT"]),
    "rset_with_arguments": ("default", [EHLO, MAIL, RCPT, "RSET now", RCPT, "QUIT"]),
    "two_messages_one_session": ("default", [EHLO, MAIL, RCPT, "DATA", *MSG, MAIL, BOB, "DATA",
                                             *MSG, "RCPT TO:<carol@virtual.test>", "QUIT"]),
    "ehlo_after_rcpt": ("default", [EHLO, MAIL, RCPT, "EHLO again.example", "DATA", RCPT,
                                    "HELO h.example", "QUIT"]),
    "data_sequence": ("default", ["DATA", EHLO, "DATA", MAIL, "DATA", NOBODY, "DATA", "QUIT"]),
    # ---- BDAT corners
    "bdat_arguments": ("default", [EHLO, MAIL, RCPT, "BDAT", "BDAT x", "BDAT -1", "BDAT 1 2",
                                   "BDAT 4 last\r\nabc\n", "QUIT"]),
    "bdat_before_helo": ("default", ["BDAT 3\r\nab\n", "QUIT"]),
    "bdat_helo_session": ("default", ["HELO a.example", MAIL, RCPT, "BDAT 4 LAST\r\nab\r\n",
                                      "QUIT"]),
    "bdat_multi_chunk": ("default", [EHLO, MAIL, RCPT, "BDAT 10\r\nSubject: \n",
                                     "BDAT 7\r\nx\r\n\r\nb\n", "BDAT 0 LAST", MAIL, "QUIT"]),
    "bdat_then_mail": ("default", [EHLO, MAIL, RCPT, "BDAT 4\r\nab\r\n", MAIL, "RCPT TO:<a@b>",
                                   "EHLO x.example", "QUIT"]),
    "bdat_huge_size": ("default", [EHLO, MAIL, RCPT, "BDAT 99999999999999999999", "QUIT"]),
    "data_then_bdat": ("default", [EHLO, MAIL, RCPT, "DATA", *MSG, "BDAT 4 LAST\r\nabc\n",
                                   "QUIT"]),
    "bdat_byte_counts": ("default", [EHLO, MAIL, RCPT, "BDAT 4\r\nab\r\n", "BDAT 5\r\nabc\r\n",
                                     "BDAT 2\r\ny\n", "BDAT 4 LAST\r\ndefg\r\n", MAIL, RCPT,
                                     "BDAT 2052 LAST\r\n" + "x" * 2048 + "\r\n\r\n", MAIL, RCPT,
                                     "BDAT 2047\r\n" + "y" * 2046 + "\r\n",
                                     "BDAT 4 LAST\r\na\rb\n", "QUIT"]),
    "lost_after_bdat_last": ("default", [EHLO, MAIL, RCPT, "BDAT 4 LAST\r\nab\r\n"]),
    "lost_after_bdat_chunks": ("default", [EHLO, MAIL, RCPT, "BDAT 4\r\nab\r\n",
                                           "BDAT 3\r\nx\r\n"]),
    "lost_after_data_then_noop": ("default", [EHLO, MAIL, RCPT, "DATA", *MSG, "NOOP"]),
    "lost_in_bdat": ("default", [EHLO, MAIL, RCPT, "BDAT 100\r\nabc\n"]),
    "lost_in_long_data_line": ("default", [EHLO, MAIL, RCPT, "DATA", "x" * 5000]),
    "lost_after_rcpt": ("default", [EHLO, MAIL, RCPT]),
    "lost_before_helo": ("default", ["NOOP"]),
    "lost_after_data_end": ("default", [EHLO, MAIL, RCPT, "DATA", *MSG]),
    # ---- forbidden (non-SMTP) commands: the session ends
    "forbidden_get": ("default", ["GET / HTTP/1.0", "QUIT"]),
    "forbidden_post_after_ehlo": ("default", [EHLO, "POST /x HTTP/1.1", "QUIT"]),
    "forbidden_connect": ("default", ["CONNECT mx.example.test:25 HTTP/1.0", "QUIT"]),
    "forbidden_header": ("default", [EHLO, "Subject: hello", "QUIT"]),
    "forbidden_lowercase_get": ("default", ["get /", "QUIT"]),
    "forbidden_non_alpha": ("default", [EHLO, "1FOO", "QUIT"]),
    # ---- long lines
    "long_lines_limits": ("default", [EHLO, "NOOP " + "a" * 2043, "NOOP " + "b" * 2044,
                                      "RCPT " + "c" * 5000, "X" * 2048, "QUIT"]),
    "long_data_line": ("default", [EHLO, MAIL, RCPT, "DATA", "Subject: long", "", "x" * 5000,
                                   "y" * 2047, ".", "QUIT"]),
    # ---- junk commands and errors
    "junk_ehlo_counts": ("errors", ["EHLO a.example", "EHLO b.example", "HELO c.example", "NOOP",
                                  "NOOP", "QUIT"]),
    "junk_pipelined": ("errors", [EHLO, ["NOOP", "RSET", "VRFY x", "ETRN y", "NOOP", "NOOP",
                                       "QUIT"]]),
    "junk_mail_not_counted": ("errors", [EHLO, MAIL, "RSET", MAIL, "RSET", MAIL, "RSET", "NOOP",
                                       "QUIT"]),
    "errors_mixed": ("errors", [EHLO, "MAIL FROM:<a b>", "FOO", MAIL, NOBODY, "RCPT TO:<a b>",
                                "QUIT"]),
    "errors_mixed_two": ("errors", [EHLO, MAIL, NOBODY, "RCPT TO:bad address", "BDAT x",
                                    "QUIT"]),
    "errors_sequence": ("errors", [EHLO, "DATA", RCPT, "DATA", "VRFY <a b>", "QUIT"]),
    "errors_good_then_bad": ("errors", [EHLO, MAIL, RCPT, "DATA", *MSG, "FOO", "BAR", "BAZ",
                                        "QUX", "QUIT"]),
    "rate_limits": ("ratelimit", [EHLO, MAIL, RCPT, BOB, "RCPT TO:<carol@virtual.test>",
                                  "DATA", *MSG, MAIL, "RSET", "MAIL FROM:<>", "QUIT"]),
    # ---- discarded EHLO keywords, null sender lookup key, reject footer
    "discarded_keywords": ("discard", [EHLO, MAIL + " BODY=8BITMIME", "RSET",
                                       MAIL + " RET=FULL", RCPT + " NOTIFY=NEVER",
                                       "BDAT 4 LAST\r\nabc\n", "QUIT"]),
    "null_sender_lookup_key": ("discard", [EHLO, "MAIL FROM:<>", RCPT, "QUIT"]),
    "discarded_more_keywords": ("discard", [EHLO, "VRFY alice", "ETRN x.example",
                                                 MAIL + " SIZE=10", "FOO", RCPT, "RSET",
                                                 MAIL + " SMTPUTF8", "HELO h.example", "QUIT"]),
    "footer_rejects": ("footer", ["FOO", EHLO, "MAIL FROM:<a b>", MAIL, NOBODY, "ETRN", "QUIT"]),
    # ---- banner, helo required, size 0, recipient limits
    "banner_text": ("banner", ["NOOP", "HELO", "MAIL FROM:<>", "EHLO a.example", MAIL, "QUIT"]),
    "banner_vrfy_before_helo": ("banner", ["VRFY alice", "ETRN x", "EXPN y", "QUIT"]),
    "banner_recipient_limit": ("banner", ["EHLO a.example", MAIL, RCPT, BOB,
                                          "RCPT TO:<carol@virtual.test>",
                                          "RCPT TO:<sink@virtual.test>", NOBODY, NOBODY, NOBODY,
                                          "QUIT"]),
    "banner_size_zero": ("banner", ["EHLO a.example", MAIL + " SIZE=999999999999", RCPT, "QUIT"]),
    # ---- header_size_limit, message_size_limit, data/end-of-data restrictions
    "headers_long_header": ("headers", [EHLO, MAIL, RCPT, "DATA", "Subject: " + "h" * 1500,
                                        "X-A: " + "i" * 300, "", "body", ".", "QUIT"]),
    # header_size_limit cuts the header before Postfix's cleanup measures the queue file.
    "headers_cut_then_size": ("headers", [EHLO, MAIL, RCPT, "DATA", "Subject: " + "h" * 1500,
                                          "X-A: " + "i" * 900, "", "body", ".", "QUIT"]),
    "headers_folded_long": ("headers", [EHLO, MAIL, RCPT, "DATA", "X-Long: a",
                                        *([" " + "f" * 70] * 20), "", "body", ".", "QUIT"]),
    "headers_size_boundary": ("headers", [EHLO, MAIL + " SIZE=3000", "RSET", MAIL + " SIZE=3001",
                                          MAIL, RCPT, "DATA", "Subject: x", "",
                                          *(["z" * 98] * 31), ".", "QUIT"]),
    "headers_end_of_data_reject": ("headers", [EHLO, "MAIL FROM:<eod@example.org>", RCPT, "DATA",
                                               *MSG, "QUIT"]),
    "headers_bdat_end_of_data": ("headers", [EHLO, "MAIL FROM:<eod@example.org>", RCPT,
                                             "BDAT 5 LAST\r\nx\r\ny\n", "QUIT"]),
    "headers_null_sender_one_rcpt": ("headers", [EHLO, "MAIL FROM:<>", RCPT, "DATA", *MSG, "QUIT"]),
}

# Sessions that end before their last command's reply can come (a chunk cut short).
_NO_LAST_REPLY = {"lost_in_bdat"}

# Differences we know of and have not fixed: name -> reason.  strict: a fix makes them fail.
XFAIL: dict[str, str] = {
}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    reason = harness.reference_available()
    if reason:
        pytest.skip(reason)
    started: dict[str, tuple] = {}
    made: list = []

    def get(variant: str):
        if variant not in started:
            base = tmp_path_factory.mktemp(f"sweep-{variant}")
            ref = harness.ReferencePostfix(base, VARIANTS[variant])
            made.append(ref)
            pw = harness.PostwellInstance(base, VARIANTS[variant])
            made.append(pw)
            # Both start (and later stop) side by side: the sweep's time is mostly that.
            harness.start_side_by_side(ref, pw)
            started[variant] = (ref, pw)
        return started[variant]

    yield get
    harness.stop_side_by_side(made)


_QID = re.compile(r"\b[0-9A-F]{10,12}\b")


def _reply_texts(replies, full_banner: bool) -> list[str]:
    head = str(replies[0]) if full_banner else str(replies[0].code)
    return [head] + [_QID.sub("QID", str(r)) for r in replies[1:]]


def _log_line(line: str) -> str:
    line = re.sub(r"^\w{3} [ \d]\d \d\d:\d\d:\d\d \S+ (postfix/\w+)\[\d+\]: ", r"\1: ", line)
    line = re.sub(r"\[127\.0\.0\.1\]:\d+", "[127.0.0.1]:PORT", line)
    line = re.sub(r"(for service 127\.0\.0\.1):\d+", r"\1:PORT", line)   # each its own port
    return _QID.sub("QID", line)


def _quiesce(inst) -> None:
    def idle():
        text = inst.log_text()
        return text.count("]: connect from ") == text.count("]: disconnect from ")
    harness.wait_for(idle, 10, 0.05, f"{inst.kind} to log its earlier disconnects")


def _log_since_disconnect(inst, before: int) -> str:
    """The maillog from offset ``before`` once it holds the session's smtpd disconnect line."""
    def grab():
        with open(inst.maillog, "rb") as f:
            f.seek(before)
            text = f.read().decode("utf-8", "replace")
        return text if re.search(r"postfix/smtpd\[\d+\]: disconnect from [^\n]*\n", text) else None
    return harness.wait_for(grab, 10, 0.05, f"{inst.kind} disconnect line")


def _run(inst, lines, wait: float = 10, talk=harness.dialogue):
    """One session: (replies, the smtpd log lines it produced).  ``talk(port, lines,
    timeout=)`` plays the client (harness.dialogue, or one that speaks TLS)."""
    _quiesce(inst)
    before = os.path.getsize(inst.maillog)
    replies = talk(inst.port, lines, timeout=wait)

    text = _log_since_disconnect(inst, before)
    logged = [_log_line(ln) for ln in text.splitlines() if "postfix/smtpd[" in ln]
    return replies, logged


def _table(a: list, b: list) -> str:
    rows = []
    for x, y in zip(a + [None] * len(b), b + [None] * len(a)):
        if x is None and y is None:
            continue
        rows.append(f"   {x!r}" if x == y else f"!! postfix  {x!r}\n   postwell {y!r}")
    return "\n".join(rows)


def parity_cases(dialogues: dict, xfail: dict, group: str) -> list:
    """pytest params (name, variant, lines) of a dialogue table: one xdist group per
    variant (pytest-xdist --dist loadgroup), so each pair of instances starts once;
    the names in ``xfail`` are strict xfails with their reason."""
    def marks(name: str, variant: str) -> list:
        out = [pytest.mark.xdist_group(f"{group}-{variant}")]
        if name in xfail:
            out.append(pytest.mark.xfail(reason=xfail[name], strict=True))
        return out
    return [pytest.param(n, *dialogues[n], id=n, marks=marks(n, dialogues[n][0]))
            for n in dialogues]


_CASES = parity_cases(DIALOGUES, XFAIL, "sweep")


@pytest.mark.parametrize("name, variant, lines", _CASES)
def test_sweep_session_matches_reference(pairs, name, variant, lines):
    ref, pw = pairs(variant)
    wait = 1.0 if name in _NO_LAST_REPLY else 10
    (want_r, want_log), (got_r, got_log) = harness.run_side_by_side(_run, ref, pw, lines, wait)
    assert len(want_r) >= 1, "the reference did not answer"
    full = variant in _FULL_BANNER
    want_t, got_t = _reply_texts(want_r, full), _reply_texts(got_r, full)
    assert got_t == want_t, f"replies differ in {name!r}:\n{_table(want_t, got_t)}"
    assert got_log == want_log, f"smtpd log differs in {name!r}:\n{_table(want_log, got_log)}"


# ---------------------------------------------------------------- concurrent sessions

def _greeting(sock: socket.socket) -> str:
    buf = b""
    while not re.search(rb"(?:^|\n)\d{3} [^\n]*\n", buf):
        try:
            chunk = sock.recv(4096)
        except ConnectionResetError:
            break
        if not chunk:
            break
        buf += chunk
    return buf.decode("utf-8", "replace")


def _second_connection(inst) -> tuple[str, list[str]]:
    """With one session open, a second one from the same client: its greeting and the
    smtpd log lines of both sessions."""
    _quiesce(inst)
    before = os.path.getsize(inst.maillog)
    with socket.create_connection(("127.0.0.1", inst.port), timeout=10) as first:
        first.settimeout(10)
        _greeting(first)
        with socket.create_connection(("127.0.0.1", inst.port), timeout=10) as second:
            second.settimeout(10)
            answer = _greeting(second)
            if answer.startswith("220"):
                second.sendall(b"QUIT\r\n")
                _greeting(second)
        first.sendall(b"QUIT\r\n")
        _greeting(first)

    def grab():
        with open(inst.maillog, "rb") as f:
            f.seek(before)
            text = f.read().decode("utf-8", "replace")
        done = len(re.findall(r"postfix/smtpd\[\d+\]: disconnect from [^\n]*\n", text))
        return text if done >= 2 else None
    text = harness.wait_for(grab, 10, 0.05, f"{inst.kind} disconnect lines")
    port = re.compile(rf"\b127\.0\.0\.1:{inst.port}\b")
    logged = sorted(port.sub("127.0.0.1:PORT", _log_line(ln)) for ln in text.splitlines()
                    if "postfix/smtpd[" in ln)
    return _QID.sub("QID", answer).strip(), logged


@pytest.mark.xdist_group("sweep-ratelimit")
def test_sweep_connection_count_limit(pairs):
    """smtpd_client_connection_count_limit: the session over the limit is turned away
    with Postfix's 421 and warning."""
    ref, pw = pairs("ratelimit")
    want = _second_connection(ref)
    got = _second_connection(pw)
    assert got[0] == want[0]
    assert got[1] == want[1], _table(want[1], got[1])


# ---------------------------------------------------------------- smtpd_timeout

TIMEOUTS = {
    "after_ehlo": [EHLO],
    "in_data": [EHLO, MAIL, RCPT, "DATA", "Subject: x", ""],
    "in_bdat_chunk": [EHLO, MAIL, RCPT, "BDAT 10\r\nabc\n"],
}


def _until_closed(inst, lines: list[str]) -> tuple[list[str], list[str]]:
    """Send the lines (each in its own write), then wait for the server to give up;
    every reply line and the session's smtpd log lines."""
    _quiesce(inst)
    before = os.path.getsize(inst.maillog)
    with socket.create_connection(("127.0.0.1", inst.port), timeout=10) as sock:
        sock.settimeout(10)
        got = _greeting(sock).encode()
        for line in lines:
            # A line ending in "\n" is sent as is (a BDAT chunk cut short).
            sock.sendall((line if line.endswith("\n") else line + "\r\n").encode())
            time.sleep(0.05)
        while True:
            try:
                chunk = sock.recv(65536)
            except (ConnectionResetError, socket.timeout):
                break
            if not chunk:
                break
            got += chunk

    text = _log_since_disconnect(inst, before)
    replies = [_QID.sub("QID", ln) for ln in got.decode("utf-8", "replace").splitlines()[1:]]
    return replies, [_log_line(ln) for ln in text.splitlines() if "postfix/smtpd[" in ln]


_TIMEOUT_XFAIL: dict[str, str] = {
}


@pytest.mark.xdist_group("sweep-timeout")
@pytest.mark.parametrize("name", [
    pytest.param(n, id=n, marks=[pytest.mark.xfail(reason=_TIMEOUT_XFAIL[n], strict=True)]
                 if n in _TIMEOUT_XFAIL else []) for n in sorted(TIMEOUTS)])
def test_sweep_timeout_matches_reference(pairs, name):
    ref, pw = pairs("timeout")
    want = _until_closed(ref, TIMEOUTS[name])
    got = _until_closed(pw, TIMEOUTS[name])
    assert got[0] == want[0], _table(want[0], got[0])
    assert got[1] == want[1], _table(want[1], got[1])


# ---------------------------------------------------------------- engine pins (no reference)
# The behaviours above, pinned on the sans-IO engine so they hold where no Postfix runs.

def _driver(**cfg):
    from test_smtp_engine import Driver
    from postwell.smtp.server import ServerConfig
    return Driver(ServerConfig(hostname="mx.example.test", error_sleep_time=0, **cfg))


def _bdat_sizes(*chunks: bytes) -> tuple[list[str], int]:
    from postwell.smtp.server import DataEnd
    d = _driver()
    d.feed(b"EHLO a.example\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\n")
    replies = []
    for i, chunk in enumerate(chunks):
        last = " LAST" if i == len(chunks) - 1 else ""
        replies.append(d.feed(b"BDAT %d%s\r\n" % (len(chunk), last.encode()) + chunk))
    return replies, d.of(DataEnd)[0].size


def test_engine_bdat_chunk_replies_and_final_count():
    replies, size = _bdat_sizes(b"ab\r\n", b"abc\r\n", b"x\r\n", b"y\n", b"defg")
    assert replies[:4] == ["250 2.0.0 Ok: 4 bytes\r\n", "250 2.0.0 Ok: 5 bytes\r\n",
                           "250 2.0.0 Ok: 3 bytes\r\n", "250 2.0.0 Ok: 2 bytes\r\n"]
    assert size == 21           # bare LF and the unterminated last line count as CRLF
    assert _bdat_sizes(b"x" * 5000 + b"\r\n")[1] == 5006      # 2048-byte records
    assert _bdat_sizes(b"x" * 2048 + b"\r\n")[1] == 2052
    assert _bdat_sizes(b"x" * 2047 + b"\r\n")[1] == 2049
    assert _bdat_sizes(b"x" * 2046, b"abcd\r\n")[1] == 2054
    assert _bdat_sizes(b"ab\r", b"\ncd\r\n")[1] == 8          # CRLF split across chunks


def _data_where(data: bytes, piece: int | None = None) -> str:
    d = _driver()
    d.feed(b"EHLO a.example\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\n")
    step = piece or len(data)
    for i in range(0, len(data), step):
        d.feed(data[i:i + step])
    return d.conn.where


@pytest.mark.parametrize("piece", [None, 7, 1000, 2048, 2049])
def test_engine_data_count_in_line_records(piece):
    # Postfix 3.7's "lost connection after DATA (N bytes)": each line's bytes plus 2 per
    # record of at most line_length_limit bytes as received (before dot-unstuffing).
    x = b"x"
    for data, want in [(x * 5000 + b"\r\n", 5006), (x * 2047 + b"\r\n", 2049),
                       (x * 2048 + b"\r\n", 2052), (x * 4096 + b"\r\n", 4102),
                       (x * 4095 + b"\r\n", 4099), (x * 2048 + b"\n", 2052),
                       (b"." + x * 2048 + b"\r\n", 2052), (b"." + x * 2047 + b"\r\n", 2051),
                       (x * 2047 + b"\r" + b"y" * 10 + b"\r\n", 2062),
                       (b"a\r\n" + x * 3000 + b"\r\nbb\r\n", 3011)]:
        assert _data_where(data, piece) == f"DATA ({want} bytes)", (len(data), piece)
    # A line not ended yet (the client went away in it): only its full records count.
    for data, want in [(x * 5000, 4100), (x * 3000, 2050), (x * 2048, 2050), (x * 2047, 0),
                       (x * 2047 + b"\r", 0), (b"abc\r\n" + x * 3000, 2055),
                       (b"abc\r\n" + x * 100, 5)]:
        assert _data_where(data, piece) == f"DATA ({want} bytes)", (len(data), piece)


def test_engine_bdat_timeout_count():
    # Postfix 3.7: the chunks before the one cut short plus the length of the 421 text
    # ("421 4.4.2 mx.example.test Error: timeout exceeded" = 49; 65 with a 16-byte longer
    # myhostname), whatever part of the chunk came.
    d = _driver()
    d.feed(b"EHLO a.example\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\n")
    d.feed(b"BDAT 10\r\nabc\n")
    assert d.conn.timeout_where() == "BDAT (49 bytes)"
    assert d.conn.where == "BDAT (4 bytes)"          # the lost-connection count is unchanged
    d = _driver()
    d.feed(b"EHLO a.example\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\n")
    d.feed(b"BDAT 4\r\nabc\n", b"BDAT 10\r\nab\n")
    assert d.conn.timeout_where() == "BDAT (54 bytes)"
    d.feed(b"cdefghi")
    assert d.conn.timeout_where() == d.conn.where    # between chunks: as any command


def test_engine_etrn_checks():
    d = _driver(helo_required=True)
    assert d.feed(b"ETRN x.example\r\n") == "503 Error: send HELO/EHLO first\r\n"
    d.feed(b"EHLO a.example\r\n")
    assert d.feed(b"ETRN x..y\r\n") == "501 Error: invalid parameter syntax\r\n"
    assert d.feed(b"ETRN 1.2.3.4\r\n") == "501 Error: invalid parameter syntax\r\n"
    assert d.feed(b"ETRN @@x.example\r\n") == "501 Error: invalid parameter syntax\r\n"
    d.feed(b"MAIL FROM:<a@b.example>\r\n")
    assert d.feed(b"ETRN a b\r\n") == "503 Error: MAIL transaction in progress\r\n"


def test_engine_reject_footer():
    from postwell.smtp.server import Warning
    d = _driver(reject_footer="\\c (at $client_address, ${server_name}$bogus)\\nsee www")
    assert d.feed(b"FOO\r\n") == ("500-5.5.2 Error: command not recognized (at 127.0.0.1, "
                                  "mx.example.test)\r\n500 5.5.2 see www\r\n")
    assert [w.text for w in d.of(Warning)] == ['unknown macro name "bogus" in expansion request']
    assert d.feed(b"NOOP\r\n") == "250 2.0.0 Ok\r\n"


def test_engine_address_blanks_and_dsn_values():
    from postwell.smtp.server import Mail, Rcpt, _SyntaxError, parse_path
    assert parse_path("< a@b.example >", True) == ("a@b.example", [])
    assert parse_path("< > SIZE=5", True) == ("", ["SIZE=5"])
    assert parse_path("<a @b.example>", True) == ("a@b.example", [])
    with pytest.raises(_SyntaxError):
        parse_path("<a b@c.example>", True)
    d = _driver()
    d.feed(b"EHLO a.example\r\n")
    assert d.feed(b"MAIL FROM:<a@b.example> ENVID=a+7F\r\n").startswith("501 5.5.4 Bad ENVID")
    assert d.feed(b"MAIL FROM:<a@b.example> ENVID=" + b"e" * 600 + b"\r\n") == "250 2.1.0 Ok\r\n"
    assert d.feed(b"RCPT TO:<c@d.example> ORCPT=rfc822;a+2bb\r\n") == "250 2.1.5 Ok\r\n"
    assert d.of(Mail)[0].envid == "e" * 600 and d.of(Rcpt)[0].orcpt == "rfc822;a+b"
    assert d.feed(b"MAIL FROM:<x@y.example> SIZE=99999999999999999999\r\n").startswith("503")
    d.feed(b"RSET\r\n")
    assert d.feed(b"MAIL FROM:<x@y.example> SIZE=99999999999999999999\r\n") == \
        "552 5.3.4 Message size exceeds file system imposed limit\r\n"
