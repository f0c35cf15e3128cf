"""Ninth parity sweep against the reference Postfix 3.7: the SMTP families the earlier
sweeps did not reach.  Sender-specified routing against relay_domains and the relay/local
recipient tables; the sender login maps without SASL; ETRN with fast_flush_domains and
smtpd_etrn_restrictions; message_size_limit and data restrictions with BDAT;
smtpd_forbid_bare_newline_reject_code; smtpd_forbid_unauth_pipelining;
smtpd_log_access_permit_actions; smtpd_client_port_logging;
smtpd_discard_ehlo_keyword_address_maps; smtpd_reject_footer_maps; smtpd_command_filter;
smtpd_noop_commands; smtpd_delay_open_until_valid_rcpt = no; resolve_numeric_domain;
strict_rfc821_envelopes; command-line shapes (separators, bare CR/LF, odd verbs).

Method of test_parity_sweep.py: one variant is one main.cf used by both MTAs; each
session is replayed on both and every reply (queue ids normalised) and every smtpd log
line of the session is compared.  One pair of instances per variant, started on
first use and shared by the module.

Left out on purpose: Postfix 3.7.11's smtpd dies of SIGSEGV on RCPT after a BDAT that
smtpd_data_restrictions refused with several recipients (and its log lines after such a
reject carry a stale to=<first recipient>); postwell does not copy that.
"""

from __future__ import annotations

import re

import pytest

import harness
from harness import HOSTNAME as HN
from harness import VIRTUAL_DOMAIN as VD
from test_parity_sweep import _reply_texts, _table, parity_cases
from test_parity_sweep import _run as _sweep_run

pytestmark = pytest.mark.postfix

EHLO = "EHLO client.example.org"
MAIL = "MAIL FROM:<sender@example.org>"
RCPT = f"RCPT TO:<alice@{VD}>"
MSG = ["From: <sender@example.org>", "Subject: sweep9", "", "hello", "."]

# Replies stay quick and the error counters never end a session early.
_QUIET = {"smtpd_error_sleep_time": "0", "smtpd_soft_error_limit": "100",
          "smtpd_hard_error_limit": "100", "notify_classes": ""}

# One variant per main.cf; families that do not disturb each other share one (each
# pair of instances costs seconds to start).
VARIANTS = {
    "default": {},
    # Routing: 127.0.0.1 is outside mynetworks, relay.example is a relay domain with a
    # recipient table, the local domain has a local recipient table.  Also: ETRN
    # (fast_flush_domains from relay_domains, smtpd_etrn_restrictions), the sender login
    # maps without SASL, and smtpd_log_access_permit_actions as a list of names.
    "routing": {**_QUIET, "mynetworks": "192.0.2.0/24",
                "relay_domains": "relay.example, .sub.relay.example",
                "relay_recipient_maps": "inline:{{ok@relay.example=x},"
                                        " {u%far.example@relay.example=x},"
                                        " {far.example!u@relay.example=x}}",
                "local_recipient_maps": "inline:{{alice=x}, {postmaster=x}}",
                "unknown_local_recipient_reject_code": "450",
                "smtpd_restriction_classes": "c_any, c_known, c_unauth, c_auth, c_unknown",
                "c_unknown": "reject_unknown_client_hostname, reject_unknown_reverse_client_hostname",
                "unknown_client_reject_code": "554",
                "smtpd_etrn_restrictions":
                    "check_etrn_access inline:{{bad.relay.example=REJECT}, "
                    "{txt.relay.example=REJECT no flush for you}, "
                    "{dip.relay.example=DEFER_IF_PERMIT},"
                    "{ok.example=OK}, {num.relay.example=521 5.7.1 go away},"
                    "{hold.relay.example=HOLD}, {disc.relay.example=DISCARD},"
                    "{pre.relay.example=PREPEND X-A: b},"
                    "{warn.relay.example=WARN etrn seen},"
                    "{unk.relay.example=c_unknown},"
                    "{filt.relay.example=FILTER smtp:x.example}}, permit",
                "c_any": "reject_sender_login_mismatch",
                "c_known": "reject_known_sender_login_mismatch",
                "c_unauth": "reject_unauthenticated_sender_login_mismatch",
                "c_auth": "reject_authenticated_sender_login_mismatch",
                "smtpd_sender_login_maps": "inline:{{a@example.org=alice}, {k@example.org=alice}, "
                                           "{u@example.org=alice}, {t@example.org=alice}}",
                "smtpd_sender_restrictions":
                    "check_sender_access inline:{{a@example.org=c_any}, {na@example.org=c_any}, "
                    "{k@example.org=c_known}, {nk@example.org=c_known}, "
                    "{u@example.org=c_unauth}, {nu@example.org=c_unauth}, "
                    "{t@example.org=c_auth}, {nt@example.org=c_auth}, {<>=c_any}}, "
                    "reject_unlisted_sender",
                "smtpd_reject_unlisted_sender": "yes",
                "smtpd_log_access_permit_actions": "OK, permit_auth_destination, permit",
                "smtpd_recipient_restrictions":
                    "check_recipient_access inline:{{ok@virtual.test=OK},"
                    "{perm@virtual.test=permit}, {num@virtual.test=200 numeric}}, "
                    "permit_auth_destination, reject"},
    # message_size_limit, data-stage restrictions; smtpd_forbid_bare_newline = reject with
    # its reply code (3.7.11; 521 also ends the session).
    "size": {**_QUIET, "message_size_limit": "1000",
             "smtpd_data_restrictions": "reject_unauth_pipelining, reject_multi_recipient_bounce",
             "smtpd_forbid_bare_newline": "reject", "smtpd_forbid_bare_newline_exclusions": "",
             "smtpd_forbid_bare_newline_reject_code": "521"},
    # smtpd_log_access_permit_actions: "permit" lines for the actions it names.
    "permitlog": {**_QUIET, "smtpd_log_access_permit_actions": "static:all",
                  "smtpd_helo_restrictions": "check_helo_access inline:{{ok.example=OK}}",
                  "smtpd_sender_restrictions":
                      "check_sender_access inline:{{ok@example.org=OK}, {p@example.org=permit},"
                      "{d@example.org=DEFER_IF_PERMIT}}",
                  "smtpd_recipient_restrictions":
                      "check_recipient_access inline:{{ok@virtual.test=OK},"
                      "{num@virtual.test=250 2.0.0 fine}, {perm@virtual.test=permit},"
                      "{disc@virtual.test=DISCARD}, {rel@virtual.test=relay whatever},"
                      "{low@virtual.test=ok}, {stamp@virtual.test=1234567890}}, "
                      "permit_mynetworks, reject"},
    # smtpd_forbid_unauth_pipelining (3.7.11), and strict_rfc821_envelopes.
    "nopipe": {**_QUIET, "smtpd_forbid_unauth_pipelining": "yes",
               "strict_rfc821_envelopes": "yes", "allow_untrusted_routing": "yes",
               "smtpd_noop_commands": "xyzzy, Help, ETRN", "smtpd_junk_command_limit": "3",
               "smtpd_delay_open_until_valid_rcpt": "no",
               "smtpd_soft_error_limit": "2",
               "smtpd_command_filter":
                   "pcre:{{/^NOOP x/ RSET}, {/^MAIL FROM:<cf@example.org> BODY=bogus/ "
                   "MAIL FROM:<cf@example.org>}, {/^rcpt to:<cf@virtual.test>/i "
                   "RCPT TO:<alice@virtual.test>}, {/^NOOP long/ NOOP " + "y" * 150 + "},"
                   "{/^VRFY bob/ VRFY carol}}"},
    # Session-wide settings: smtpd_client_port_logging (name[addr]:port, the port of
    # 127.0.0.1 normalised away), smtpd_discard_ehlo_keyword_address_maps (looked up at
    # connect and after XCLIENT), smtpd_reject_footer_maps (searched with the whole reply,
    # smtpd_reject_footer the fallback).
    "session": {**_QUIET, "smtpd_client_port_logging": "yes",
                "smtpd_authorized_xclient_hosts": "127.0.0.0/8",
                # XCLIENT answers with the banner: keep mail_name out of it.
                "smtpd_banner": "$myhostname ESMTP",
                "smtpd_client_restrictions": "check_client_access "
                                             "inline:{{127.0.0.1=WARN client seen}}",
                "smtpd_discard_ehlo_keywords": "etrn",
                "smtpd_discard_ehlo_keyword_address_maps":
                    "cidr:{{127.0.0.1/32 pipelining, dsn, chunking}, "
                    "{192.0.2.1/32 silent-discard, size, vrfy}, {192.0.2.2/32 8bitmime x-foo}}",
                "smtpd_reject_footer": "general footer for $client_address $client_name",
                "smtpd_reject_footer_maps":
                    "pcre:{{/^550 5\\.1\\.1 </ \\c (user unknown: see the FAQ)},"
                    "{/^501 / syntax footer}}"},
}
VARIANTS["routing_open"] = {**VARIANTS["routing"], "allow_untrusted_routing": "yes",
                            "swap_bangpath": "no", "allow_percent_hack": "no",
                            "show_user_unknown_table_name": "no",
                            "resolve_dequoted_address": "no", "resolve_numeric_domain": "yes"}

DIALOGUES = {
    # ---- command line shapes: separators, bare CR/LF, odd bytes in the verb
    "cmd_separators": ("default", [EHLO, "MAIL\tFROM:<a@example.org>", "RSET",
                                   "MAIL FROM :<a@example.org>", "MAIL  FROM:<a@example.org>",
                                   "MAIL FROM:<a@example.org>\t", "RSET", "MAIL FROM:\t<a@example.org>",
                                   "RSET", "RCPT TO :<alice@virtual.test>", "NOOP\tx", "QUIT"]),
    "cmd_bare_lf": ("default", [EHLO, "NOOP\n", "MAIL FROM:<a@example.org>\n",
                                "RCPT TO:<alice@virtual.test>\n", "RSET\n", "QUIT"]),
    "cmd_bare_cr": ("default", [EHLO, "NOOP\rNOOP", "MAIL FROM:<a@exa\rmple.org>", "RSET",
                                "HELO a\rb", "QUIT"]),
    "cmd_odd_verbs": ("default", [EHLO, "NO\x00OP", "N\u00f6OP", "NOOP\x7f", "MAIL",
                                  "MAIL FROM", "MAIL TO:<a@example.org>", "RCPT FROM:<a@b.example>",
                                  "\x01", "QUIT"]),
    "cmd_helo_forms": ("default", ["HELO", "EHLO", "HELO  a.example  ", "EHLO [127.0.0.1]",
                                   "HELO [IPv6:::1]", "EHLO -a.example", "EHLO a_b.example",
                                   "HELO 300.1.1.1", "EHLO a.example.", "EHLO .", "QUIT"]),
    # ---- message_size_limit with BDAT and DATA, data-stage restrictions with BDAT
    "size_bdat_over": ("size", [EHLO, MAIL, RCPT, "BDAT 1200 LAST\r\n" + "x" * 1198 + "\r\n",
                                MAIL, RCPT, "BDAT 600\r\n" + "y" * 598 + "\r\n",
                                "BDAT 600 LAST\r\n" + "z" * 598 + "\r\n", "NOOP", "QUIT"]),
    "size_bdat_declared": ("size", [EHLO, MAIL + " SIZE=1001", MAIL + " SIZE=1000", RCPT,
                                    "BDAT 1000 LAST\r\n" + "a" * 998 + "\r\n", "QUIT"]),
    "size_data_over": ("size", [EHLO, MAIL, RCPT, "DATA", "Subject: big", "", *(["b" * 98] * 12),
                                ".", "NOOP", "QUIT"]),
    "size_null_sender_multi_bdat": ("size", [EHLO, "MAIL FROM:<>", RCPT, f"RCPT TO:<bob@{VD}>",
                                             "BDAT 6 LAST\r\nab\r\n\r\n", "QUIT"]),
    "size_unauth_pipelining_data": ("size", [EHLO, [MAIL, RCPT, "DATA"], *MSG, "QUIT"]),
    "size_unauth_pipelining_helo": ("size", [["HELO a.example", MAIL, RCPT, "DATA"], *MSG, "QUIT"]),
    "size_unauth_pipelining_bdat": ("size", ["HELO a.example", [MAIL, RCPT,
                                             "BDAT 4 LAST\r\nab\r\n"], "QUIT"]),
    # ---- smtpd_forbid_bare_newline = reject: the configured code, in commands and data
    "barenl_command": ("size", [EHLO, "NOOP\n", "QUIT"]),
    "barenl_data": ("size", [EHLO, MAIL, RCPT, "DATA", "Subject: x\n", "", "body", ".", "QUIT"]),
    "barenl_bdat": ("size", [EHLO, MAIL, RCPT, "BDAT 5 LAST\r\nab\ncd\n", "QUIT"]),
    # ---- smtpd_log_access_permit_actions
    "permitlog_stages": ("permitlog", ["EHLO ok.example", "MAIL FROM:<ok@example.org>",
                                       "RCPT TO:<ok@virtual.test>", "RCPT TO:<num@virtual.test>",
                                       "RCPT TO:<perm@virtual.test>", RCPT, "RSET",
                                       "MAIL FROM:<p@example.org>", RCPT, "RSET",
                                       "MAIL FROM:<d@example.org>", RCPT, "RSET", EHLO, MAIL,
                                       RCPT, "RCPT TO:<x@far.example>", "VRFY alice@virtual.test",
                                       "QUIT"]),
    "permitlog_table_values": ("permitlog", [EHLO, MAIL, "RCPT TO:<rel@virtual.test>",
                                             "RCPT TO:<low@virtual.test>",
                                             "RCPT TO:<stamp@virtual.test>",
                                             "RCPT TO:<disc@virtual.test>", "QUIT"]),
    "permitlist_actions": ("routing", [EHLO, MAIL, "RCPT TO:<ok@virtual.test>",
                                          "RCPT TO:<perm@virtual.test>", "RCPT TO:<num@virtual.test>",
                                          RCPT, "RCPT TO:<x@far.example>", "QUIT"]),
    # ---- smtpd_client_port_logging
    "portlog_session": ("session", [EHLO, MAIL, f"RCPT TO:<nobody@{VD}>", RCPT, "DATA", *MSG,
                                    "FOO", "ETRN x.example", "QUIT"]),
    "portlog_lost": ("session", [EHLO, MAIL, RCPT]),
    "portlog_xclient": ("session", [EHLO, "XCLIENT ADDR=192.0.2.1 PORT=1234", EHLO, MAIL,
                                    f"RCPT TO:<nobody@{VD}>", "XCLIENT ADDR=192.0.2.2", EHLO,
                                    MAIL, RCPT, "FOO", "QUIT"]),
    # ---- smtpd_forbid_unauth_pipelining
    "nopipe_helo": ("nopipe", [["HELO a.example", MAIL], RCPT, "QUIT"]),
    "nopipe_before_helo": ("nopipe", [["NOOP", "NOOP"], "QUIT"]),
    "nopipe_ehlo_ok": ("nopipe", [[EHLO, MAIL, RCPT, "DATA"], *MSG, "QUIT"]),
    "nopipe_data_tail": ("nopipe", ["HELO a.example", MAIL, RCPT, "DATA",
                                    ["Subject: x", "", "body", ".", "NOOP"], "QUIT"]),
    "nopipe_quit": ("nopipe", ["HELO a.example", ["NOOP", "QUIT"]]),
    "nopipe_mid_transaction": ("nopipe", ["HELO a.example", MAIL, [RCPT, "RSET"], "QUIT"]),
    "nopipe_ehlo_group_tail": ("nopipe", [EHLO, [MAIL, RCPT, "NOOP", "RSET"], "QUIT"]),
    "nopipe_vrfy": ("nopipe", [EHLO, ["VRFY alice", "NOOP"], "QUIT"]),
    # ---- smtpd_discard_ehlo_keyword_address_maps
    "ehlomaps_client": ("session", [EHLO, MAIL + " RET=FULL", MAIL + " BODY=8BITMIME", RCPT,
                                     "BDAT 4 LAST\r\nab\r\n", "ETRN x.example", "QUIT"]),
    "ehlomaps_xclient_silent": ("session", [EHLO, "XCLIENT ADDR=192.0.2.1", EHLO,
                                             MAIL + " SIZE=10", "VRFY alice", "QUIT"]),
    "ehlomaps_xclient_unknown_word": ("session", [EHLO, "XCLIENT ADDR=192.0.2.2", EHLO,
                                                   MAIL + " BODY=8BITMIME", "QUIT"]),
    "ehlomaps_xclient_unlisted": ("session", [EHLO, "XCLIENT ADDR=192.0.2.4", EHLO,
                                               MAIL + " RET=FULL", "QUIT"]),
    "ehlomaps_helo": ("session", ["HELO a.example", MAIL + " RET=FULL", "QUIT"]),
    # ---- smtpd_reject_footer_maps
    "footermaps_replies": ("session", [EHLO, "FOO", "MAIL FROM:<a b>", MAIL,
                                          f"RCPT TO:<nobody@{VD}>", "RCPT TO:<x@far.example>",
                                          "ETRN x.example", "QUIT"]),
    # ---- smtpd_noop_commands (and smtpd_junk_command_limit with them)
    "noop_commands": ("nopipe", ["XYZZY a b", "xyzzy", "HELP", "ETRN x..y", EHLO,
                                 "xyzzy", "NOOP", "QUIT"]),
    "noop_commands_junk_limit": ("nopipe", [EHLO, *(["xyzzy"] * 104), "NOOP", "QUIT"]),
    # ---- smtpd_delay_open_until_valid_rcpt = no: the queue file (and id) at MAIL
    "open_at_mail": ("nopipe", [EHLO, MAIL, "RSET", MAIL, f"RCPT TO:<nobody@{VD}>", "RSET",
                                "MAIL FROM:<>", RCPT, "DATA", *MSG, MAIL, "DATA", "QUIT"]),
    "open_at_mail_lost": ("nopipe", [EHLO, MAIL]),
    "open_at_mail_rejected": ("nopipe", [EHLO, "MAIL FROM:<a b>", MAIL + " SIZE=99999999999",
                                         MAIL + " AUTH=<>", "HELO again.example", "QUIT"]),
    # ---- smtpd_command_filter
    "command_filter": ("nopipe", [EHLO, "MAIL FROM:<cf@example.org> BODY=bogus",
                                  "RCPT TO:<cf@virtual.test>", "NOOP x", " NOOP x", "NOOP long",
                                  "VRFY bob", "QUIT"]),
    # ---- strict_rfc821_envelopes
    "strict_addresses": ("nopipe", [EHLO, "MAIL FROM:a@example.org", "MAIL FROM: <a@example.org>",
                                    "RSET", "MAIL FROM:<a@example.org> ", "RSET",
                                    "MAIL FROM:<a b@example.org>", 'MAIL FROM:<"a b"@example.org>',
                                    "RSET", "MAIL FROM:<@x.example:a@example.org>", "RSET",
                                    "MAIL FROM:<a@example.org> SIZE=10", "RCPT TO:alice@virtual.test",
                                    "RCPT TO:<@x.example:alice@virtual.test>", "RCPT TO:<alice>",
                                    "RCPT TO:<alice@virtual.test> x", "RCPT TO:<alice@virtual.test >",
                                    "RCPT TO:<a.@virtual.test>", "RCPT TO:<.a@virtual.test>",
                                    "RCPT TO:<a..b@virtual.test>", "RCPT TO:<a@virtual..test>",
                                    "RCPT TO:<a@[1.2.3.4]>", "RCPT TO:<a@>", "RCPT TO:<@virtual.test>",
                                    "QUIT"]),
    "bdat_sequence_errors": ("default", [EHLO, "BDAT 3\r\nab\n", "BDAT 0 LAST", MAIL,
                                         "BDAT 0 LAST", RCPT, "BDAT 3\r\nab\n", "DATA",
                                         "BDAT 0 LAST", "RSET", MAIL, RCPT, "BDAT 0 LAST",
                                         "QUIT"]),
    "bdat_after_rejected_rcpt": ("default", [EHLO, MAIL, f"RCPT TO:<nobody@{VD}>",
                                             "BDAT 4 LAST\r\nab\r\n", "NOOP", "QUIT"]),
    "mail_params_twice": ("default", [EHLO, MAIL + " BODY=BINARYMIME", "RSET",
                                      MAIL + " RET=FULL RET=HDRS", "RSET",
                                      MAIL + " ENVID=a ENVID=b", "RSET", MAIL + " SIZE=1 SIZE=2",
                                      "RSET", MAIL + " BODY=7BIT BODY=8BITMIME", "RSET",
                                      MAIL + " SMTPUTF8 BODY=8BITMIME", RCPT + " NOTIFY=NEVER NOTIFY=SUCCESS",
                                      RCPT + " ORCPT=rfc822;a@b ORCPT=rfc822;c@d",
                                      RCPT + " NOTIFY=DELAY ORCPT=rfc822;x@y", "QUIT"]),
    "mail_xverp": ("default", [EHLO, MAIL + " XVERP", RCPT, "RSET", MAIL + " XVERP=+=", "RSET",
                               MAIL + " XVERP=ab", "RSET", MAIL + " xverp", "RSET",
                               "MAIL FROM:<> XVERP", "QUIT"]),
    "numeric_domains": ("default", [EHLO, "MAIL FROM:<a@192.0.2.1>", MAIL, "RCPT TO:<u@127.0.0.1>",
                                    "RCPT TO:<postmaster@127.0.0.1>", "RCPT TO:<u@192.0.2.9>",
                                    "RCPT TO:<u@1.2.3>", "RCPT TO:<u@[127.0.0.1]>", "QUIT"]),
    "numeric_domains_open": ("routing_open", [EHLO, "MAIL FROM:<a@192.0.2.1>",
                                              "RCPT TO:<u@127.0.0.1>", "RCPT TO:<u@192.0.2.9>",
                                              "RCPT TO:<u@1.2.3>", "RCPT TO:<u@300.1.1.1>",
                                              "RCPT TO:<u%127.0.0.1@" + HN + ">",
                                              "RCPT TO:<alice@127.0.0.1>", "VRFY u@127.0.0.1",
                                              "QUIT"]),
    "lax_addresses": ("default", [EHLO, "MAIL FROM:<a b@example.org>", "MAIL FROM:<a@example.org> x",
                                  "MAIL FROM:a@example.org SIZE=10", "RSET",
                                  "MAIL FROM:<a@example.org>", "RCPT TO:<a.@virtual.test>",
                                  "RCPT TO:<.a@virtual.test>", "RCPT TO:<a..b@virtual.test>",
                                  "RCPT TO:<a@virtual..test>", "RCPT TO:<a@>", "RCPT TO:<@virtual.test>",
                                  "RCPT TO:<alice@virtual.test.>", "RCPT TO:<alice@@virtual.test>",
                                  "RCPT TO:<alice@virtual.test@virtual.test>", "QUIT"]),
    # ---- sender-specified routing against relay_domains and the recipient tables
    "routing_relay_tables": ("routing", [EHLO, MAIL, "RCPT TO:<ok@relay.example>",
                                         "RCPT TO:<no@relay.example>", "RCPT TO:<u@far.example>",
                                         f"RCPT TO:<alice@{HN}>", f"RCPT TO:<bob@{HN}>",
                                         "RCPT TO:<bob@localhost>", "RCPT TO:<postmaster>",
                                         "QUIT"]),
    "routing_percent_bang": ("routing", [EHLO, MAIL, "RCPT TO:<u%far.example@relay.example>",
                                         "RCPT TO:<far.example!u@relay.example>",
                                         "RCPT TO:<u@far.example@relay.example>",
                                         'RCPT TO:<"u@far.example"@relay.example>',
                                         "RCPT TO:<u%relay.example@" + HN + ">",
                                         "RCPT TO:<relay.example!ok@" + HN + ">",
                                         "RCPT TO:<ok%relay.example@" + HN + ">",
                                         "RCPT TO:<far.example!u@" + HN + ">",
                                         "RCPT TO:<u%far.example@" + HN + ">", "QUIT"]),
    "routing_open_percent_bang": ("routing_open", [
        EHLO, MAIL, "RCPT TO:<u%far.example@relay.example>",
        "RCPT TO:<far.example!u@relay.example>", 'RCPT TO:<"u@far.example"@relay.example>',
        "RCPT TO:<u%relay.example@" + HN + ">", "RCPT TO:<relay.example!ok@" + HN + ">",
        "RCPT TO:<far.example!u@" + HN + ">", "RCPT TO:<u%far.example@" + HN + ">",
        "RCPT TO:<no@relay.example>", f"RCPT TO:<bob@{HN}>", "QUIT"]),
    # ---- ETRN with fast_flush_domains and smtpd_etrn_restrictions
    "etrn_domains": ("routing", [EHLO, "ETRN relay.example", "ETRN RELAY.EXAMPLE", "ETRN x.relay.example",
                              "ETRN sub.relay.example", "ETRN a.sub.relay.example",
                              "ETRN far.example", f"ETRN {HN}", "ETRN #relay.example",
                              "ETRN @relay.example", "ETRN [127.0.0.1]", "QUIT"]),
    # (a 521 ends the session: it comes last)
    "etrn_access": ("routing", [EHLO, "ETRN bad.relay.example", "ETRN txt.relay.example",
                             "ETRN dip.relay.example", "ETRN ok.example", "ETRN relay.example",
                             "ETRN Bad.Relay.Example.", "ETRN num.relay.example", "QUIT"]),
    "etrn_side_effects": ("routing", [EHLO, "ETRN hold.relay.example", "ETRN disc.relay.example",
                                   "ETRN pre.relay.example", "ETRN warn.relay.example",
                                   "ETRN filt.relay.example", MAIL, RCPT, "QUIT"]),
    "etrn_before_helo_and_in_mail": ("routing", ["ETRN relay.example", "HELO h.example",
                                              "ETRN relay.example", MAIL, "ETRN relay.example",
                                              "RSET", "ETRN", "QUIT"]),
    "etrn_unknown_client_class": ("routing", [EHLO, "ETRN unk.relay.example", "ETRN far.example",
                                              "QUIT"]),
    # ---- smtpd_sender_login_maps, client not logged in
    "login_owned": ("routing", [EHLO, "MAIL FROM:<a@example.org>", RCPT, "RSET",
                              "MAIL FROM:<k@example.org>", RCPT, "RSET",
                              "MAIL FROM:<u@example.org>", RCPT, "RSET",
                              "MAIL FROM:<t@example.org>", RCPT, "QUIT"]),
    "login_unowned": ("routing", [EHLO, "MAIL FROM:<na@example.org>", RCPT, "RSET",
                                "MAIL FROM:<nk@example.org>", RCPT, "RSET",
                                "MAIL FROM:<nu@example.org>", RCPT, "RSET",
                                "MAIL FROM:<nt@example.org>", RCPT, "RSET",
                                "MAIL FROM:<>", RCPT, "QUIT"]),
    "login_unlisted_sender": ("routing", [EHLO, f"MAIL FROM:<nobody@{VD}>", RCPT, "RSET",
                                        f"MAIL FROM:<alice@{VD}>", RCPT, "RSET",
                                        f"MAIL FROM:<nobody@{HN}>", RCPT, "QUIT"]),
}

XFAIL: dict[str, str] = {}

_CASES = parity_cases(DIALOGUES, XFAIL, "sweep9")


# smtpd_client_port_logging shows the client's port; XCLIENT without PORT= keeps the
# connection's own, which differs between the two MTAs.
_PORT = re.compile(r"(\[[0-9.]+\]):\d+")


def _run(inst, lines, wait):
    replies, logged = _sweep_run(inst, lines, wait)
    return replies, [_PORT.sub(r"\1:PORT", line) for line in logged]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    reason = harness.reference_available()
    if reason:
        pytest.skip(reason)
    with harness.variant_pairs(tmp_path_factory, "sweep9", lambda v: VARIANTS[v]) as get:
        yield get


@pytest.mark.parametrize("name, variant, lines", _CASES)
def test_sweep9_session_matches_reference(pairs, name, variant, lines):
    ref, pw = pairs(variant)
    (want_r, want_log), (got_r, got_log) = harness.run_side_by_side(_run, ref, pw, lines, 10)
    assert len(want_r) >= 1, "the reference did not answer"
    want_t, got_t = _reply_texts(want_r, False), _reply_texts(got_r, False)
    assert got_t == want_t, f"replies differ in {name!r}:\n{_table(want_t, got_t)}"
    assert got_log == want_log, f"smtpd log differs in {name!r}:\n{_table(want_log, got_log)}"


# ---------------------------------------------------------------- pins (no reference)
# The behaviours above, pinned where no Postfix runs: on the sans-IO engine and on the
# policy with in-memory tables.

def table_lookups(**specs):
    # The smtpd builds the engine's table hooks (the engine itself does no I/O).
    from postwell.smtpd.server import table_lookups as build
    return build(**specs)


def _driver(**cfg):
    from test_smtp_engine import Driver
    from postwell.smtp.server import ServerConfig
    return Driver(ServerConfig(hostname="mx.example.test", error_sleep_time=0, **cfg))


def test_engine_bare_newline_reject_code():
    d = _driver(forbid_bare_newline="reject", bare_newline_reject_code=521)
    d.feed(b"EHLO a.example\r\n")
    assert d.feed(b"NOOP\n") == "521 5.5.2 mx.example.test Error: bare <LF> received\r\n"
    assert d.conn.closed


def test_engine_forbid_unauth_pipelining():
    from postwell.smtp.server import Info
    d = _driver(forbid_unauth_pipelining=True)
    out = d.feed(b"HELO a.example\r\nMAIL FROM:<a@b.example>\r\n")
    assert out == "554 5.5.0 Error: SMTP protocol synchronization\r\n"
    assert d.conn.closed and "helo=0/1" in d.conn.counters_text()
    assert [e.text for e in d.of(Info)] == [
        "improper command pipelining after HELO from unknown[127.0.0.1]: "
        "MAIL FROM:<a@b.example>\\r\\n"]
    # After EHLO (PIPELINING offered) a group is fine; only its last command may not
    # have more behind it.
    d = _driver(forbid_unauth_pipelining=True)
    d.feed(b"EHLO a.example\r\n")
    assert d.feed(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\n").count("250") == 2
    assert d.feed(b"NOOP\r\nRSET\r\n").startswith("554 5.5.0")


def test_engine_noop_commands_and_command_filter(tmp_path):
    from postwell.smtp.server import Info
    d = _driver(noop_commands=frozenset({"XYZZY", "ETRN"}))
    assert d.feed(b"xyzzy whatever\r\n") == "250 2.0.0 Ok\r\n"
    assert d.feed(b"ETRN x..y\r\n") == "250 2.0.0 Ok\r\n"
    assert "xyzzy" not in d.conn.counters_text() and "etrn" not in d.conn.counters_text()
    table = tmp_path / "filter"
    table.write_text("/^NOOP x/ RSET\n")
    d = _driver(**table_lookups(filter_specs=(f"regexp:{table}",)))
    d.feed(b"EHLO a.example\r\n")
    assert d.feed(b" NOOP x\r\n") == "250 2.0.0 Ok\r\n"
    assert "rset=1" in d.conn.counters_text()
    assert [e.text for e in d.of(Info)][-1] == \
        'unknown[127.0.0.1]: replacing command " NOOP x" with "RSET"'


def test_engine_reject_footer_maps(tmp_path):
    table = tmp_path / "footer"
    table.write_text("/^500 / \\c (see the FAQ)\n/^501 /\n")
    d = _driver(reject_footer="plain", **table_lookups(footer_specs=(f"regexp:{table}",)))
    assert d.feed(b"FOO\r\n") == "500 5.5.2 Error: command not recognized (see the FAQ)\r\n"
    assert d.feed(b"HELO\r\n") == "501-Syntax: HELO hostname\r\n501 plain\r\n"


def test_engine_numeric_domain():
    from postwell.smtp.server import domain_error
    assert domain_error("u@127.0.0.1", False)
    assert not domain_error("u@127.0.0.1", False, numeric_ok=True)
    assert domain_error("u@1.2.3", False, numeric_ok=True)
    assert domain_error("u@300.1.1.1", False, numeric_ok=True)


def _policy(extra=None, log=None):
    from test_policy import make_policy
    return make_policy(extra, log=log)


def _run_policy(coro):
    import asyncio
    return asyncio.run(asyncio.wait_for(coro, 10))


def test_policy_etrn_restrictions_and_fast_flush():
    from postwell.log import NullLog
    from test_policy import session
    log = NullLog()
    pol = _policy({"relay_domains": "relay.example", "fast_flush_domains": "$relay_domains",
                   "smtpd_etrn_restrictions": "check_etrn_access inline:{{bad.example=REJECT},"
                                              "{hold.example=HOLD}}, permit"}, log)
    s = session(sender=None)
    reply = _run_policy(pol.on_etrn(s, "bad.example"))
    assert str(reply) == "554 5.7.1 <bad.example>: Etrn command rejected: Access denied"
    assert s.where == "ETRN" and s.etrn_name is None
    assert _run_policy(pol.on_etrn(s, "hold.example")) is None
    assert log.lines[-1].endswith("action HOLD is unavailable in smtpd_etrn_restrictions")
    assert str(pol.etrn_flush(s, "far.example")) == "459 <far.example>: service unavailable"
    assert log.lines[-1].endswith("reject: ETRN far.example... from unknown[127.0.0.1]")


def test_fast_flush_moves_the_site_deferred_mail(tmp_path):
    from postwell.policy.etrn import flush_site
    from postwell.queue import QueueStore
    store = QueueStore(str(tmp_path))
    store.ensure_layout()
    ids = {}
    for rcpt in ("u@relay.example", "u@other.example"):
        msg = store.create()
        msg.set_sender("s@example.org")
        msg.add_recipient(rcpt)
        msg.write(b"Subject: x\n\nbody\n")
        msg.commit()
        store.move(msg.queue_id, "incoming", "deferred")
        ids[rcpt] = msg.queue_id
    assert flush_site(str(tmp_path), "Relay.Example.") == [ids["u@relay.example"]]
    assert store.find(ids["u@relay.example"]) == "incoming"
    assert store.find(ids["u@other.example"]) == "deferred"


def test_policy_permit_logging_and_login_maps_without_sasl():
    from postwell.log import NullLog
    from test_policy import session
    log = NullLog()
    pol = _policy({"smtpd_log_access_permit_actions": "static:all", "mynetworks": "127.0.0.0/8",
                   "smtpd_relay_restrictions": "",
                   "smtpd_sender_login_maps": "inline:{{s@example.org=alice}}",
                   "smtpd_recipient_restrictions": "reject_sender_login_mismatch, "
                                                   "permit_mynetworks, reject"}, log)
    s = session(recipient="r@example.org")
    assert _run_policy(pol.on_rcpt(s)) is None
    assert log.lines[-3:] == [
        "warning: restriction `reject_authenticated_sender_login_mismatch' ignored: no SASL "
        "support",
        "warning: restriction `reject_unauthenticated_sender_login_mismatch' ignored: no SASL "
        "support",
        "NOQUEUE: permit: RCPT from unknown[127.0.0.1]: action=permit_mynetworks for Client "
        "host=unknown[127.0.0.1] ; from=<s@example.org> to=<r@example.org> proto=ESMTP "
        "helo=<localhost>"]


def test_state_port_logging():
    from postwell.policy.state import SessionState
    s = SessionState(client_name="unknown", client_addr="192.0.2.1", client_port="1234")
    assert s.namaddr == "unknown[192.0.2.1]"
    s.port_logging = True
    assert s.namaddr == "unknown[192.0.2.1]:1234"


@pytest.mark.parametrize("action, want", [
    ("defer_if_permit", "554 5.7.1 <a@tmp.example>: Sender address rejected: Access denied"),
    ("defer", "450 4.1.8 <a@tmp.example>: Sender address rejected: Domain not found")])
def test_policy_unknown_address_tempfail_action(action, want):
    # A DNS temporary failure with unknown_address_tempfail_action = defer answers at once;
    # with defer_if_permit a later reject still wins (Postfix's DEFER_IF_PERMIT2).
    from postwell.config.main import Config
    from postwell.log import NullLog
    from postwell.policy.matchlist import OwnAddresses
    from postwell.policy.smtpd_policy import SmtpdPolicy
    from test_policy import BASE, TABLES, session

    async def lookup(domain):
        return "retry"
    params = dict(BASE, smtpd_sender_restrictions="reject_unknown_sender_domain, reject",
                  reject_tempfail_action=action)
    cfg = Config("/nonexistent", params, {}, [])
    pol = SmtpdPolicy(cfg, NullLog(), tables=TABLES, mailhost_lookup=lookup,
                      own_addresses=OwnAddresses(cfg, system_addresses=lambda: ["127.0.0.1"]))
    s = session(sender="a@tmp.example", recipient="user@example.com")
    assert str(_run_policy(pol.on_rcpt(s))) == want
