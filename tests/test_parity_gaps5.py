"""Parity gaps found in cleanup header handling, the smtpd's postmaster notice,
anvil after XCLIENT and postfix(1)'s up-front checks, each compared with Postfix
3.7 (side by side where an instance helps, pinned to its answers otherwise).

1. A header that header_checks drop (IGNORE, STRIP) or rename (REPLACE) does not
   count as present: a local client's message gets Postfix's Message-Id/Date/From.
2. REDIRECT: Postfix's qmgr redirects the first recipient only and counts all
   (nrcpt=N, one to= line); cleanup/virtual.py redirect_recipients() does that to
   the recipient list, called by cleanup/service.py _output_recipients.
3. A 421/521 from smtpd_end_of_data_restrictions: Postfix's cleanup still logs the
   message-id line (it has the content by then); so do we.
4. The smtpd's postmaster notice: Postfix's post_mail() "Received: by" header.
5. anvil: clients allowed XCLIENT are never counted; after XCLIENT the rates count
   the address it named.
6. mail_owner with uid 0: "user X has privileged user ID" (no ": 0").
7. postfix(1) dies of a bad global parameter before any command (mail_params_init).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import harness
from postwell.cleanup import Cleanup
from postwell.cleanup.virtual import redirect_recipients
from postwell.config.main import Config
from postwell.log import NullLog
from postwell.queue import QueueStore
from postwell.queue.format import Recipient
from test_parity_sweep import _log_since_disconnect, _quiesce

VD = harness.VIRTUAL_DOMAIN
T0 = 1_795_932_674.5


# ================================================================ unit level (no reference)

def _cleanup(tmp_path, rules: str | None, **params):
    p = {"myhostname": "mx.example.test", "mydestination": "mx.example.test"}
    if rules is not None:
        path = tmp_path / "header_checks"
        path.write_text(rules)
        p["header_checks"] = f"regexp:{path}"
    p.update(params)
    store = QueueStore(str(tmp_path / "q"), clock=lambda: T0)
    store.ensure_layout()
    log = NullLog("cleanup")
    return Cleanup(Config(str(tmp_path), p, {}, []), store, log), store, log


def _submit(c, data: bytes, local: bool = True):
    cs = c.open(rewrite_local=local, content_checks=True)
    cs.set_sender("s@example.test")
    cs.add_recipient("u@example.test", orig="u@example.test")
    cs.write(data)
    reply = asyncio.run(asyncio.wait_for(cs.finish(), 20))
    assert reply.code == 250, reply
    return cs


def _headers(store, qid) -> list[str]:
    with store.open(qid, "incoming") as q:
        text = q.read_content().decode()
    return [ln.split(":", 1)[0] for ln in text.split("\n\n", 1)[0].splitlines()
            if not ln[:1].isspace()]


DROP_RULES = """\
/^(Date|From|Message-ID|Received|Resent-[A-Za-z-]+):.*drop/ IGNORE
/^(Date|From|Message-ID):.*strip/ STRIP stripped
/^Message-ID:.*rename/ REPLACE X-Old-Message-ID: renamed
/^X-Make-Date:/ REPLACE Date: Mon, 1 Jan 2024 00:00:00 +0000
"""


@pytest.mark.parametrize("verb", ["drop", "strip"])
def test_headers_removed_by_checks_are_added_again(tmp_path, verb):
    c, store, log = _cleanup(tmp_path, DROP_RULES)
    cs = _submit(c, (f"Date: x {verb}\r\nFrom: <a@example.test> {verb}\r\n"
                     f"Message-ID: <m@example.test> {verb}\r\nSubject: s\r\n\r\nb\r\n").encode())
    assert _headers(store, cs.queue_id) == ["Subject", "Message-Id", "Date", "From"]
    # The generated id is the one logged, as Postfix's cleanup logs it.
    assert any(re.fullmatch(rf"{cs.queue_id}: message-id=<\d{{14}}\.{cs.queue_id}@mx\.example"
                            r"\.test>", ln) for ln in log.lines), log.lines


def test_header_renamed_by_replace_counts_under_its_new_name(tmp_path):
    c, store, _ = _cleanup(tmp_path, DROP_RULES)
    cs = _submit(c, b"From: <a@example.test>\r\nMessage-ID: <m@x> rename\r\n"
                    b"X-Make-Date: y\r\nSubject: s\r\n\r\nb\r\n")
    assert _headers(store, cs.queue_id) == ["From", "X-Old-Message-ID", "Date", "Subject",
                                            "Message-Id"]


def test_one_of_two_headers_dropped_keeps_the_other(tmp_path):
    c, store, _ = _cleanup(tmp_path, DROP_RULES)
    cs = _submit(c, b"Date: x drop\r\nDate: Tue, 2 Jan 2024 00:00:00 +0000\r\nFrom: <a@x>\r\n"
                    b"Message-ID: <m@x>\r\n\r\nb\r\n")
    assert _headers(store, cs.queue_id) == ["Date", "From", "Message-ID"]


def test_dropped_resent_headers_do_not_make_a_resent_message(tmp_path):
    # Postfix 3.7: no Resent-Message-Id/Date/From are added for them.
    c, store, _ = _cleanup(tmp_path, DROP_RULES)
    cs = _submit(c, b"Resent-From: <r@x> drop\r\nResent-Date: x drop\r\nFrom: <a@x>\r\n"
                    b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\nMessage-ID: <m@x>\r\n\r\nb\r\n")
    assert _headers(store, cs.queue_id) == ["From", "Date", "Message-ID"]


def test_dropped_received_headers_alone_reach_no_hop_limit(tmp_path):
    # Postfix 3.7 counts them, but compares the count only at a kept Received:.
    c, store, _ = _cleanup(tmp_path, DROP_RULES, hopcount_limit="3")
    data = b"".join(b"Received: from h%d drop\r\n" % i for i in range(5))
    cs = _submit(c, data + b"From: <a@x>\r\nDate: d\r\nMessage-ID: <m@x>\r\n\r\nb\r\n")
    assert _headers(store, cs.queue_id) == ["From", "Date", "Message-ID"]


def test_dropped_received_headers_count_at_a_kept_one(tmp_path):
    c, store, _ = _cleanup(tmp_path, DROP_RULES, hopcount_limit="3")
    cs = c.open(rewrite_local=True, content_checks=True)
    cs.set_sender("s@example.test")
    cs.add_recipient("u@example.test")
    cs.write(b"Received: a drop\r\nReceived: b drop\r\nReceived: kept\r\n\r\nb\r\n")
    reply = asyncio.run(asyncio.wait_for(cs.finish(), 20))
    assert (reply.code, reply.text) == (554, "Error: too many hops")


def test_remote_client_still_gets_no_headers(tmp_path):
    c, store, log = _cleanup(tmp_path, DROP_RULES)
    cs = _submit(c, b"Date: x drop\r\nMessage-ID: <m@x> drop\r\nSubject: s\r\n\r\nb\r\n",
                 local=False)
    assert _headers(store, cs.queue_id) == ["Subject"]
    assert f"{cs.queue_id}: message-id=<>" in log.lines


def test_without_checks_headers_still_count(tmp_path):
    c, store, _ = _cleanup(tmp_path, None)
    cs = _submit(c, b"Date: x\r\nFrom: <a@x>\r\nMessage-ID: <m@x>\r\n\r\nb\r\n")
    assert _headers(store, cs.queue_id) == ["Date", "From", "Message-ID"]


def test_redirect_recipients_delivers_the_first_and_finishes_the_rest():
    rcpts = [Recipient("alice@v.test", "alice@v.test"), Recipient("carol@v.test", "carol@v.test"),
             Recipient("sink@v.test", "sink@v.test", notify="NEVER")]
    redirect_recipients(rcpts, "bob@v.test")
    assert [(r.address, r.orig, r.done) for r in rcpts] == [
        ("bob@v.test", "alice@v.test", False), ("bob@v.test", "carol@v.test", True),
        ("bob@v.test", "sink@v.test", True)]
    assert rcpts[2].pack().startswith(b"D")


# ---------------------------------------------------------------- 5. anvil, unit level

class _AnvilClient:
    def __init__(self):
        self.calls = []

    async def connect(self, service, addr):
        self.calls.append(("connect", addr))
        return 9, 9, 1

    async def _one(self, verb, service, addr):
        self.calls.append((verb, addr))
        return 9

    def disconnect(self, service, addr, gen):
        self.calls.append(("disconnect", addr))


class _Session:
    def __init__(self, addr, allowed, client_addr=None):
        self.addr = addr
        self.namaddr = f"unknown[{client_addr or addr}]"
        self.conn = type("C", (), {"xclient_allowed": allowed})()
        self.state = type("S", (), {"client_name": "unknown",
                                    "client_addr": client_addr or addr})()


def _limits():
    from postwell.anvil import SmtpdLimits
    cfg = Config("/nonexistent", {"smtpd_client_message_rate_limit": "2",
                                  "smtpd_client_connection_rate_limit": "2"}, {}, [])
    client = _AnvilClient()
    log = NullLog("smtpd")
    return SmtpdLimits(cfg, log, service="smtp", hostname="mx.example.test",
                       client=client), client, log


def test_anvil_never_counts_a_client_allowed_xclient():
    lim, client, _ = _limits()
    s = _Session("127.0.0.1", allowed=True)
    assert asyncio.run(lim.connect(s)) is None
    assert asyncio.run(lim.mail(s)) is None
    lim.disconnect(s)
    assert client.calls == []


def test_anvil_rates_count_the_address_xclient_named():
    lim, client, log = _limits()
    # After XCLIENT the connection is the proxy's, the client the one it named (no
    # longer allowed XCLIENT itself).
    s = _Session("127.0.0.1", allowed=False, client_addr="192.0.2.50")
    reply = asyncio.run(lim.mail(s))
    assert str(reply) == "450 4.7.1 Error: too much mail from 192.0.2.50"
    assert client.calls == [("message", "192.0.2.50")]
    assert log.lines[-1] == ("warning: Message delivery request rate limit exceeded: 9 from "
                             "unknown[192.0.2.50] for service smtp")


# ---------------------------------------------------------------- 6. and 7. checks, unit level

def _params_cfg(tmp_path, **params):
    from postwell.config import load_config
    p = {"queue_directory": str(tmp_path / "q"), "data_directory": str(tmp_path / "d"),
         "myhostname": "mx.example.test", "inet_interfaces": "127.0.0.1",
         "inet_protocols": "ipv4", "mail_owner": harness.mail_owner_ids()[0]}
    p.update(params)
    (tmp_path / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in p.items()))
    (tmp_path / "master.cf").write_text("")
    return load_config(str(tmp_path))


# (parameters, Postfix 3.7's fatal text; {main_cf} is "file DIR/main.cf")
FATALS = {
    "nohost": ({"myhostname": ""}, "bad string length 0 < 1: myhostname = "),
    "badhost": ({"myhostname": "foo bar"},
                "{main_cf}: parameter myhostname: bad parameter value: foo bar"),
    "numhost": ({"myhostname": "1.2.3.4"},
                "{main_cf}: parameter myhostname: bad parameter value: 1.2.3.4"),
    "baddomain": ({"mydomain": "foo..bar"},
                  "{main_cf}: parameter mydomain: bad parameter value: foo..bar"),
    "num": ({"message_size_limit": "abc"}, "bad numerical configuration: message_size_limit = abc"),
    "num_unit": ({"default_process_limit": "10k"},
                 "bad numerical configuration: default_process_limit = 10k"),
    "num_min": ({"line_length_limit": "100"}, "invalid line_length_limit parameter value 100 < 512"),
    "num_max": ({"delay_logging_resolution_limit": "7"},
                "invalid delay_logging_resolution_limit parameter value 7 > 6"),
    "bool": ({"smtputf8_enable": "maybe"}, "bad boolean configuration: smtputf8_enable = maybe"),
    "time": ({"max_idle": "5x"}, "parameter max_idle: bad time value or unit: 5x"),
    "time_min": ({"daemon_timeout": "0"}, "invalid daemon_timeout: 0 (min 1)"),
    "time_max": ({"in_flow_delay": "11s"}, "invalid in_flow_delay: 11 (max 10)"),
    "protocols": ({"inet_protocols": "ipv4, bogus"},
                  'unknown inet_protocols value "bogus" in "ipv4, bogus"'),
    "compat": ({"compatibility_level": "abc"}, 'malformed compatibility level syntax: "abc"'),
    "facility": ({"syslog_facility": "bogus"},
                 "{main_cf}: parameter syslog_facility: unrecognized value: bogus"),
    "iface": ({"inet_interfaces": "127.0.0.1, 192.0.2.1"},
              "parameter inet_interfaces: no local interface found for 192.0.2.1"),
    "iface_loopback_range": ({"inet_interfaces": "127.0.0.2"},
                             "parameter inet_interfaces: no local interface found for 127.0.0.2"),
    "iface_wildcard": ({"inet_interfaces": "0.0.0.0"},
                       "parameter inet_interfaces: no local interface found for 0.0.0.0"),
    "iface_v6_on_v4": ({"inet_interfaces": "[::1]"},
                       "config variable inet_interfaces: host not found: [::1]"),
    "iface_all_in_list": ({"inet_interfaces": "all, 127.0.0.1"},
                          "config variable inet_interfaces: host not found: all"),
    "relayhost": ({"relayhost": "MX.example.test"},
                  "myhostname and relayhost parameter settings must not be identical: "
                  "mx.example.test"),
    "myorigin": ({"myorigin": "a.example, b.example"},
                 "myorigin parameter setting must not contain multiple values: a.example, "
                 "b.example"),
    "privs_root": ({"default_privs": "root"},
                   "{main_cf}: parameter default_privs: user root has privileged user ID"),
    "mail_name": ({"mail_name": ""}, "bad string length 0 < 1: mail_name = "),
}
# Accepted by Postfix 3.7 too.
ACCEPTED = {"neg_size": {"message_size_limit": "-5"}, "spaces": {"mime_nesting_limit": " 12 "},
            "bare_time": {"max_idle": "10"}, "upper_bool": {"soft_bounce": "YES"},
            "all": {"inet_interfaces": "all"}, "loopback": {"inet_interfaces": "loopback-only"},
            "iface_name": {"inet_interfaces": "localhost"},
            "short_host": {"myhostname": "foo"}, "compat_long": {"compatibility_level": "3.6.1"}}


@pytest.mark.parametrize("name", sorted(FATALS))
def test_parameter_fatal_texts(tmp_path, name):
    from postwell.master.check import parameter_fatal
    params, text = FATALS[name]
    warnings: list[str] = []
    got = parameter_fatal(_params_cfg(tmp_path, **params), warnings.append)
    assert got == text.format(main_cf=f"file {tmp_path}/main.cf")


@pytest.mark.parametrize("name", sorted(ACCEPTED))
def test_parameter_values_postfix_accepts(tmp_path, name):
    from postwell.master.check import parameter_fatal
    assert parameter_fatal(_params_cfg(tmp_path, **ACCEPTED[name])) is None


@pytest.mark.parametrize("host, warning", [
    ("foo bar", "valid_hostname: invalid character 32(decimal): foo bar"),
    ("-bad-.example", "valid_hostname: misplaced hyphen: -bad-.example"),
    ("foo..bar", "valid_hostname: misplaced delimiter: foo..bar"),
    ("123", "valid_hostname: numeric hostname: 123"),
    ("a" * 64 + ".example", "valid_hostname: hostname label too long: " + "a" * 64 + ".example..."),
])
def test_valid_hostname_warnings(host, warning):
    from postwell.master.check import valid_hostname
    said: list[str] = []
    assert not valid_hostname(host, said.append)
    assert said == [warning]
    assert valid_hostname("mx_1.example-2.test", said.append)


@pytest.mark.skipif(os.geteuid() != 0, reason="mail_owner checks apply to root")
def test_privileged_mail_owner_text(tmp_path):
    from postwell.master.check import parameter_fatal
    from postwell.master.daemon import MasterError, mail_owner_ids
    cfg = _params_cfg(tmp_path, mail_owner="root")
    want = f"file {tmp_path}/main.cf: parameter mail_owner: user root has privileged user ID"
    assert parameter_fatal(cfg) == want
    with pytest.raises(MasterError) as info:
        mail_owner_ids(cfg)
    assert str(info.value) == want


# ================================================================ side by side

HEADER_CHECKS = """\
/^(Date|From|Message-ID|Resent-From|Resent-Date|Received):.*drop/ IGNORE
/^X-Hop:/ REPLACE Received: from replaced
/^(Date|From|Message-ID):.*strip/ STRIP stripped
/^Message-ID:.*rename/ REPLACE X-Old-Message-ID: renamed
/^Subject: redirect-me/ REDIRECT bob@virtual.test
"""

CONTENT = {
    "header_checks": "regexp:{HDR}",
    "smtpd_end_of_data_restrictions": "check_sender_access inline:{"
                                      "{e421@example.org=421 4.7.0 go away}, "
                                      "{e521@example.org=521 5.7.0 bye now}}",
    "smtpd_recipient_restrictions": "check_recipient_access "
                                    "inline:{{rej@virtual.test=REJECT}}, permit",
    "notify_classes": "policy", "error_notice_recipient": f"carol@{VD}",
    "smtpd_error_sleep_time": "0", "mail_name": "Postfix", "hopcount_limit": "3",
}
ANVIL = {"smtpd_authorized_xclient_hosts": "127.0.0.0/8",
         "smtpd_client_event_limit_exceptions": "", "smtpd_client_message_rate_limit": "2",
         "smtpd_client_connection_rate_limit": "2", "smtpd_client_connection_count_limit": "1",
         "notify_classes": "", "mail_name": "Postfix"}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    reason = harness.reference_available()
    if reason:
        pytest.skip(reason)
    tables = harness.table_dir("gaps5-", {"header_checks": HEADER_CHECKS})
    hdr = tables / "header_checks"

    def params_for(variant: str) -> dict[str, str]:
        return {k: v.replace("{HDR}", str(hdr)) for k, v in
                (CONTENT if variant == "content" else ANVIL).items()}
    with harness.variant_pairs(tmp_path_factory, "gaps5", params_for) as get:
        yield get
    shutil.rmtree(tables, ignore_errors=True)


_QID = re.compile(r"\b[0-9A-F]{10,12}\b")


def _norm(line: str) -> str:
    line = re.sub(r"^\w{3} [ \d]\d \d\d:\d\d:\d\d \S+ (postfix/\w+)\[\d+\]: ", r"\1: ", line)
    line = re.sub(r"\[127\.0\.0\.1\]:\d+", "[127.0.0.1]:PORT", line)
    line = re.sub(r"for service 127\.0\.0\.1:\d+", "for service PORT", line)
    line = re.sub(r"<\d{14}\.[0-9A-F]+@", "<STAMP@", line)
    line = re.sub(r"delays?=[\d./]+", "delay=D", line)
    return _QID.sub("QID", line)


def _session(inst, lines, settle: float = 0.0, match: str = "postfix/(smtpd|cleanup)\\["):
    """Replies and this session's log lines (normalised), once its disconnect is logged
    (``settle`` seconds more for a separate cleanup's or the qmgr's lines)."""
    _quiesce(inst)
    before = os.path.getsize(inst.maillog)
    replies = harness.dialogue(inst.port, lines, timeout=15)
    _log_since_disconnect(inst, before)
    time.sleep(settle)
    with open(inst.maillog, "rb") as f:
        f.seek(before)
        text = f.read().decode("utf-8", "replace")
    texts = [re.sub(r"^(\d{3}) \S+ ESMTP .*$", r"\1 BANNER", str(r)) for r in replies]
    return [_QID.sub("QID", t) for t in texts], [_norm(ln) for ln in text.splitlines()
                                                  if re.search(match, ln)
                                                  and not harness.POSTFIX_CLOCK_WARNING.search(ln)]


MAIL = "MAIL FROM:<s@example.org>"
ALICE = f"RCPT TO:<alice@{VD}>"


def _new_messages(inst, user: str, seen: set) -> list[Path]:
    # Maildir names do not sort by arrival within one second: compare sets.
    return [p for p in inst.maildir_messages(user) if p not in seen]


def _delivered_headers(inst, user: str, seen: set) -> tuple[list[str], str]:
    [path] = harness.wait_for(lambda: _new_messages(inst, user, seen), 15, 0.05,
                              f"{inst.kind}: a new message for {user}")
    head = path.read_text().split("\n\n", 1)[0]
    keep = []
    for ln in head.splitlines():
        if ln.split(":", 1)[0] in ("Return-Path", "Delivered-To", "X-Original-To", "Received") \
                or ln[:1].isspace():
            continue
        ln = re.sub(r"<\d{14}\.[0-9A-F]+@", "<STAMP@", ln)
        ln = re.sub(r"^Date: \w{3}, .* \(UTC\)$", "Date: NOW", ln)
        keep.append(ln)
    return keep, head


GAP1_MESSAGES = {
    "dropped": ["Date: Mon, 1 Jan 2024 00:00:00 +0000 drop", "From: <a@example.org> drop",
                "Message-ID: <g1@example.org> drop", "Subject: one"],
    "stripped": ["Date: x strip", "From: <a@example.org> strip",
                 "Message-ID: <g2@example.org> strip", "Subject: two"],
    "renamed": ["Date: Mon, 1 Jan 2024 00:00:00 +0000", "From: <a@example.org>",
                "Message-ID: <g3@example.org> rename", "Subject: three"],
    "resent": ["Resent-From: <r@example.org> drop", "Resent-Date: x drop",
               "From: <a@example.org>", "Date: Mon, 1 Jan 2024 00:00:00 +0000",
               "Message-ID: <g4@example.org>", "Subject: four"],
}


@pytest.mark.xdist_group("gaps5-content")
@pytest.mark.parametrize("name", sorted(GAP1_MESSAGES))
def test_side_by_side_headers_dropped_by_checks(pairs, name):
    ref, pw = pairs("content")
    got = []
    for inst in (ref, pw):
        seen = set(inst.maildir_messages("alice"))
        replies, log = _session(inst, ["EHLO client.example.org", MAIL, ALICE, "DATA",
                                       *GAP1_MESSAGES[name], "", "body", ".", "QUIT"])
        headers, _ = _delivered_headers(inst, "alice", seen)
        got.append((replies, [ln for ln in log if "postfix/cleanup" in ln], headers))
    assert got[1] == got[0]


MID = "Message-ID: <hops@example.org>"
HOPS = {"dropped": [f"Received: from h{i} drop" for i in range(5)] + [MID],
        "dropped_then_kept": [f"Received: from h{i} drop" for i in range(3)]
        + ["Received: from kept", MID],
        "replaced": [f"X-Hop: {i}" for i in range(3)] + [MID],
        "kept": ["Received: from a", "Received: from b", MID],
        "kept_id_first": [MID, "Received: from a", "Received: from b"]}


@pytest.mark.xdist_group("gaps5-content")
@pytest.mark.parametrize("name", sorted(HOPS))
def test_side_by_side_hop_count_with_checks(pairs, name):
    ref, pw = pairs("content")
    got = []
    for inst in (ref, pw):
        got.append(_session(inst, ["EHLO client.example.org", MAIL, ALICE, "DATA", *HOPS[name],
                                   "", "body", ".", "QUIT"], settle=0.3))
    assert got[1] == got[0]


@pytest.mark.xdist_group("gaps5-content")
@pytest.mark.parametrize("sender", ["e421", "e521"])
def test_side_by_side_eod_hangup_logs_cleanup_message_id(pairs, sender):
    ref, pw = pairs("content")
    got = []
    for inst in (ref, pw):
        replies, log = _session(inst, ["EHLO client.example.org", f"MAIL FROM:<{sender}@example.org>",
                                       ALICE, "DATA", "Message-ID: <eod@example.org>",
                                       "Subject: x", "", "body", ".", "QUIT"], settle=0.5)
        # Postfix's cleanup is a process of its own: its line may follow the disconnect.
        got.append((replies, sorted(log)))
    assert got[1] == got[0]
    assert "postfix/cleanup: QID: message-id=<eod@example.org>" in got[0][1]


@pytest.mark.xdist_group("gaps5-content")
def test_side_by_side_postmaster_notice(pairs):
    ref, pw = pairs("content")
    texts = []
    for inst in (ref, pw):
        seen = set(inst.maildir_messages("carol"))
        _session(inst, ["EHLO client.example.org", MAIL, f"RCPT TO:<rej@{VD}>", "QUIT"])

        def notice():
            for path in _new_messages(inst, "carol", seen):
                text = path.read_text()
                if f"In:  RCPT TO:<rej@{VD}>" in text:
                    return text
            return None
        text = harness.wait_for(notice, 30, 0.1, f"{inst.kind} postmaster notice")
        text = text.split("\nReceived: by ", 1)[1]     # what the MTA itself wrote
        text = _QID.sub("QID", text)
        text = re.sub(r"\d\d:\d\d:\d\d", "T", text)
        text = re.sub(r"<\d{14}\.", "<STAMP.", text)
        texts.append(text)
    assert texts[1] == texts[0]
    assert texts[0].startswith(f"{harness.HOSTNAME} (Postfix)\n\tid QID; ")


@pytest.mark.xdist_group("gaps5-content")
def test_side_by_side_redirect_of_several_recipients(pairs):
    ref, pw = pairs("content")
    got = []
    for inst in (ref, pw):
        seen = set(inst.maildir_messages("bob"))
        _, log = _session(inst, ["EHLO client.example.org", MAIL, ALICE, f"RCPT TO:<carol@{VD}>",
                                 f"RCPT TO:<sink@{VD}>", "DATA", "Subject: redirect-me", "",
                                 "body", ".", "QUIT"], settle=1.5,
                          match=r"postfix/(cleanup|qmgr|virtual)\[")
        harness.wait_for(lambda: _new_messages(inst, "bob", seen), 15, 0.05, "bob's copy")
        got.append([re.sub(r"size=\d+", "size=N", ln) for ln in log if "removed" not in ln])
    assert got[1] == got[0]


@pytest.mark.xdist_group("gaps5-anvil")
def test_side_by_side_anvil_after_xclient(pairs):
    ref, pw = pairs("anvil")
    lines = ["EHLO x", "XCLIENT ADDR=192.0.2.50", "EHLO y"]
    for _ in range(3):
        lines += [MAIL, ALICE, "RSET"]
    got = []
    for inst in (ref, pw):
        got.append(_session(inst, lines + ["QUIT"], match=r"postfix/smtpd\["))
    assert got[1] == got[0]
    assert "450 4.7.1 Error: too much mail from 192.0.2.50" in got[0][0]


@pytest.mark.xdist_group("gaps5-anvil")
def test_side_by_side_anvil_exempts_xclient_hosts(pairs):
    ref, pw = pairs("anvil")
    lines = ["EHLO x"]
    for _ in range(3):
        lines += [MAIL, ALICE, "RSET"]
    got = []
    for inst in (ref, pw):
        # More connections and messages than the limits allow: none is counted.
        got.append([_session(inst, lines + ["QUIT"], match=r"postfix/smtpd\[")
                    for _ in range(3)])
    assert got[1] == got[0]
    assert not any(r.startswith(("421", "450")) for replies, _ in got[0] for r in replies)


BROKEN = {"owner_root": {"mail_owner": "root"}, "iface": {"inet_interfaces": "192.0.2.1"},
          "nohost": {"myhostname": ""}, "num": {"message_size_limit": "abc"},
          "badhost": {"myhostname": "foo bar"}, "time": {"max_idle": "5x"},
          "bool": {"disable_dns_lookups": "maybe"}}


@pytest.mark.parametrize("name", sorted(BROKEN))
@pytest.mark.parametrize("command", ["check", "start"])
def test_side_by_side_postfix_fatal_before_any_command(reference_factory, tmp_path, name,
                                                      command):
    ref = reference_factory(BROKEN[name])
    ref.cool_config()    # a just-written main.cf costs Postfix ~2 s of waiting
    pw = harness.PostwellInstance(tmp_path, BROKEN[name], name="pw")
    env = {k: v for k, v in os.environ.items() if k != "MAIL_CONFIG"}

    def run(cmd):
        # On a terminal postfix(1) says why; the exit status is the same either way.
        # Both runs at once: Postfix's fatal exit waits a second (msg_fatal's sleep).
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            tty = pool.submit(harness.stderr_on_tty, cmd, env=env, timeout=60)
            rc = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                                timeout=60).returncode
            text = tty.result()
        return rc, text.replace(str(ref.config_dir), "ETC").replace(str(pw.config_dir), "ETC")
    # Both sides at once.
    outs = harness.run_side_by_side(
        run, [harness.POSTFIX_BIN, "-c", str(ref.config_dir), command],
        [sys.executable, "-m", "postwell.cli.postfix", "-c", str(pw.config_dir), command])
    assert outs[1] == outs[0]
    assert outs[0][0] == 1
    assert outs[0][1].startswith("postfix: ") and "fatal: " in outs[0][1]
    # Nothing was started (the reference's pid file would name its master).
    assert ref.master_pid() is None and pw.master_pid() is None
