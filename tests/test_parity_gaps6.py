"""Parity gaps in the smtpd's postmaster notice, cleanup's check log lines and the
queue tools, each compared with Postfix 3.7 (side by side where an instance helps,
pinned to its answers otherwise).

1. notify_classes: the replies at which Postfix's smtpd notes a protocol error
   (unknown command, bad syntax, out-of-order commands, bare <LF>, too many errors),
   a policy error the engine or cleanup decides (VRFY disabled, XCLIENT not
   authorized, HELO required, SIZE over the limit, header_checks REJECT) or a bounce
   error (message too big: the notice goes to bounce_notice_recipient) make the
   session's "errors from" notice; a queued message makes Postfix forget the errors
   before it.
2. cleanup's header/body checks lines name the sender and the latest recipient in
   external form (a local part that is no dot-atom quoted), over SMTP and from
   sendmail ("from local;").
3. mailq / postqueue -p -j list a message that postsuper -r put into maildrop/,
   under its queue id, while it waits for pickup.
4. postsuper -r leaves the message's defer log (its delay reasons stay listed).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time

import pytest

import harness
from postwell.smtpd.server import transcript_error_classes

VD = harness.VIRTUAL_DOMAIN
EHLO = "EHLO client.example.org"
MAIL = "MAIL FROM:<s@example.org>"
ALICE = f"RCPT TO:<alice@{VD}>"
MSG = ["DATA", "Subject: gaps6", "", "body", "."]


# ================================================================ 1. unit level

@pytest.mark.parametrize("reply, classes", [
    (b"500 5.5.2 Error: command not recognized\r\n", {"protocol"}),
    (b"500 5.5.2 Error: bad syntax\r\n", {"protocol"}),
    (b"501 Syntax: HELO hostname\r\n", {"protocol"}),
    (b"503 5.5.1 Error: need MAIL command\r\n", {"protocol"}),
    (b"503 5.5.1 Error: need RCPT command\r\n", {"protocol"}),
    (b"501 5.1.7 Bad sender address syntax\r\n", {"protocol"}),
    (b"555 5.5.4 Unsupported option: FOO=bar\r\n", {"protocol"}),
    (b"502 5.5.1 Error: command not implemented\r\n", {"protocol"}),
    (b"503 5.5.1 Error: authentication not enabled\r\n", {"protocol"}),
    (b"500 Syntax: ETRN domain\r\n", {"protocol"}),
    (b"501 5.5.4 Bad ADDR syntax: x\r\n", {"protocol"}),
    (b"521 5.5.4 Syntax: BDAT count [LAST]\r\n", {"protocol"}),
    (b"421 4.7.0 mx.example.test Error: too many errors\r\n", {"protocol"}),
    (b"550 5.5.2 mx.example.test Error: bare <LF> received\r\n", {"protocol"}),
    # smtpd_reject_footer does not hide the reply.
    (b"501 5.5.4 Syntax: RSET\r\n501 5.5.4 see footer\r\n", {"protocol"}),
    (b"502 5.5.1 VRFY command is disabled\r\n", {"policy"}),
    (b"550 5.7.0 Error: insufficient authorization\r\n", {"policy"}),
    (b"503 5.5.1 Error: send HELO/EHLO first\r\n", {"policy"}),
    (b"503 Error: send HELO/EHLO first\r\n", {"policy"}),
    (b"552 5.3.4 Message size exceeds fixed limit\r\n", {"policy"}),
    # End of data: cleanup's status picks the class (Postfix's data_cmd).
    (b"552 5.3.4 Error: message file too big\r\n", {"bounce"}),
    (b"554 5.4.0 Error: too many hops\r\n", {"bounce"}),
    (b"451 4.3.0 Error: queue file write error\r\n", {"resource"}),
    (b"452 4.3.1 Insufficient system storage\r\n", {"resource"}),
    (b"454 4.7.0 TLS not available due to local problem\r\n", {"software"}),
    # Not errors Postfix notes: restriction rejects are noted by the policy engine,
    # "no valid recipients" follows a reject, SASL failures are the client's.
    (b"554 5.5.1 Error: no valid recipients\r\n", set()),
    (b"554 5.7.1 <x@y>: Recipient address rejected: Access denied\r\n", set()),
    (b"535 5.7.8 Error: authentication failed: x\r\n", set()),
    (b"501 5.7.0 Authentication aborted\r\n", set()),
    (b"503 5.7.0 Error: access denied for x[1.2.3.4]\r\n", set()),
    (b"250 2.0.0 Ok\r\n", set()),
])
def test_reply_classes(reply, classes):
    assert transcript_error_classes([reply]) == classes


def test_command_lines_are_not_replies():
    # A client may type anything; only the server's replies count.
    assert transcript_error_classes(["500 5.5.2 Error: bad syntax", b"250 2.0.0 Ok\r\n"]) == set()


# ================================================================ side by side

PROTOCOL = {"notify_classes": "protocol", "error_notice_recipient": f"carol@{VD}",
            "smtpd_error_sleep_time": "0", "smtpd_soft_error_limit": "100",
            "smtpd_hard_error_limit": "3", "mail_name": "Postfix",
            "smtpd_recipient_restrictions": f"check_recipient_access "
                                            f"inline:{{{{rej@{VD}=REJECT}}}}, permit"}
POLICY = {**PROTOCOL, "notify_classes": "policy", "disable_vrfy_command": "yes",
          "smtpd_helo_required": "yes", "smtpd_authorized_xclient_hosts": "",
          "message_size_limit": "2000"}
NOTICE_CHECKS = ("/^Subject: reject/ REJECT rejected here\n/^Subject: plainrej/ REJECT\n"
                 "/^Subject: defer/ REJECT 4.7.1 try later\n")
BARELF = {**PROTOCOL, "smtpd_forbid_bare_newline": "reject",
          "smtpd_forbid_bare_newline_exclusions": ""}
# A "bounce" class notice goes to bounce_notice_recipient.
BOUNCE = {**PROTOCOL, "notify_classes": "bounce", "message_size_limit": "2000",
          "bounce_notice_recipient": f"carol@{VD}", "error_notice_recipient": f"bob@{VD}"}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    reason = harness.reference_available()
    if reason:
        pytest.skip(reason)
    variants = {"protocol": PROTOCOL, "policy": POLICY, "bounce": BOUNCE, "barelf": BARELF,
                "xclient": {**PROTOCOL, "smtpd_authorized_xclient_hosts": "127.0.0.0/8"}}
    tables = harness.table_dir("gaps6n-", {"hc": NOTICE_CHECKS})

    def params(variant: str) -> dict:
        return {**variants[variant], "header_checks": f"regexp:{tables}/hc"}
    with harness.variant_pairs(tmp_path_factory, "gaps6", params) as get:
        yield get
    shutil.rmtree(tables, ignore_errors=True)


def _mark(name: str) -> str:
    return f"NOOP mark-{name}"


# Each dialogue starts with its marker, so a notice names the session it is about.
PROTOCOL_DIALOGUES = {
    "unknown": [EHLO, "FOO", "QUIT"],
    "helo_noarg": ["HELO", "QUIT"],
    "mail_syntax": [EHLO, "MAIL FROM:<a b@c>", "QUIT"],
    "rcpt_first": [EHLO, ALICE, "QUIT"],
    "data_first": [EHLO, "DATA", "QUIT"],
    "empty_line": [EHLO, "", "QUIT"],
    "starttls_off": [EHLO, "STARTTLS", "QUIT"],
    "auth_off": [EHLO, "AUTH PLAIN", "QUIT"],
    "vrfy_noarg": [EHLO, "VRFY", "QUIT"],
    "etrn_noarg": [EHLO, "ETRN", "QUIT"],
    "mail_option": [EHLO, MAIL + " FOO=bar", "QUIT"],
    "nested_mail": [EHLO, MAIL, MAIL, "QUIT"],
    "bad_notify": [EHLO, MAIL, ALICE + " NOTIFY=BOGUS", "QUIT"],
    "xclient_noarg": [EHLO, "XCLIENT", "QUIT"],
    "no_quit": [EHLO, "FOO"],
    # A policy error only: not a protocol one...
    "policy_only": [EHLO, MAIL, f"RCPT TO:<rej@{VD}>", "DATA", "QUIT"],
    "xclient_unauthorized": [EHLO, "XCLIENT ADDR=192.0.2.1", "QUIT"],
    # ...until the error limit is reached: the 421 is.
    "too_many_errors": [EHLO, MAIL] + [f"RCPT TO:<rej@{VD}>"] * 3 + ["NOOP", "QUIT"],
    # Errors before a queued message are forgiven; after it they count.
    "then_queued": [EHLO, "FOO", MAIL, ALICE, *MSG, "QUIT"],
    "queued_then": [EHLO, MAIL, ALICE, *MSG, "FOO", "QUIT"],
}
POLICY_DIALOGUES = {
    "vrfy_disabled": [EHLO, "VRFY alice", "QUIT"],
    "xclient_unauthorized": [EHLO, "XCLIENT ADDR=192.0.2.1", "QUIT"],
    "helo_required": [MAIL, "QUIT"],
    "etrn_before_helo": ["ETRN example.org", "QUIT"],
    "rcpt_reject": [EHLO, MAIL, f"RCPT TO:<rej@{VD}>", "QUIT"],
    "reject_then_queued": [EHLO, MAIL, f"RCPT TO:<rej@{VD}>", ALICE, *MSG, "QUIT"],
    "protocol_only": [EHLO, "FOO", "QUIT"],
    "size_over_limit": [EHLO, MAIL + " SIZE=5000", "QUIT"],
    "too_big": [EHLO, MAIL, ALICE, "DATA", *["x" * 70] * 40, ".", "QUIT"],
    # cleanup's refusals: a policy error.
    "hc_reject": [EHLO, MAIL, ALICE, "DATA", "Subject: reject me", "", "b", ".", "QUIT"],
    "hc_plain_reject": [EHLO, MAIL, ALICE, "DATA", "Subject: plainrej", "", "b", ".", "QUIT"],
    "hc_defer": [EHLO, MAIL, ALICE, "DATA", "Subject: defer me", "", "b", ".", "QUIT"],
}
BIG = [EHLO, MAIL, ALICE, "DATA", *["x" * 70] * 40, ".", "QUIT"]
BOUNCE_DIALOGUES = {"too_big": BIG, "size_over_limit": [EHLO, MAIL + " SIZE=5000", "QUIT"],
                    "unknown": [EHLO, "FOO", "QUIT"],
                    "hc_reject": POLICY_DIALOGUES["hc_reject"]}
# The session after the others whose notice says that theirs had time to arrive.
BARELF_DIALOGUES = {"command": [EHLO, "NOOP\n", "QUIT"],
                    "data": [EHLO, MAIL, ALICE, "DATA", "Subject: x\n", "", "b", ".", "QUIT"]}
SENTINEL = {"protocol": [EHLO, "FOO", "QUIT"], "policy": [EHLO, "VRFY x", "QUIT"],
            "bounce": BIG, "barelf": [EHLO, "FOO", "QUIT"]}


def _notices(inst, seen: set) -> list[str]:
    return [p.read_text() for p in inst.maildir_messages("carol") if p not in seen]


def _notified(inst, dialogues: dict, variant: str) -> dict[str, bool]:
    seen = set(inst.maildir_messages("carol"))
    for name, lines in dialogues.items():
        first = 1 if lines[0].startswith(("EHLO", "HELO")) else 0
        harness.dialogue(inst.port, lines[:first] + [_mark(name)] + lines[first:], timeout=15)
    harness.dialogue(inst.port, [_mark("sentinel")] + SENTINEL[variant], timeout=15)
    harness.wait_for(lambda: any(_mark("sentinel") in t for t in _notices(inst, seen)), 30, 0.1,
                     f"{inst.kind}: the sentinel's notice")
    time.sleep(0.5)     # a notice posted just before the sentinel's may land just after
    texts = _notices(inst, seen)
    return {name: any(f"In:  {_mark(name)}\n" in t for t in texts) for name in dialogues}


@pytest.mark.xdist_group("gaps6-notice")
@pytest.mark.parametrize("variant, dialogues", [("protocol", PROTOCOL_DIALOGUES),
                                                ("policy", POLICY_DIALOGUES),
                                                ("bounce", BOUNCE_DIALOGUES),
                                                ("barelf", BARELF_DIALOGUES)])
def test_side_by_side_which_sessions_notify(pairs, variant, dialogues):
    ref, pw = pairs(variant)
    want, got = _notified(ref, dialogues, variant), _notified(pw, dialogues, variant)
    assert got == want
    # The reference's answers, so that a broken reference cannot pass unnoticed.
    if variant in ("protocol", "policy"):
        assert want["xclient_unauthorized"] is (variant == "policy")
    if variant == "protocol":
        assert want["unknown"] and want["too_many_errors"] and want["queued_then"]
        assert not want["then_queued"] and not want["policy_only"]
    elif variant == "policy":
        assert want["vrfy_disabled"] and not want["reject_then_queued"]
        assert want["size_over_limit"] and not want["too_big"]
        assert want["hc_reject"] and want["hc_plain_reject"] and want["hc_defer"]
    elif variant == "bounce":
        assert want == {"too_big": True, "size_over_limit": False, "unknown": False,
                        "hc_reject": False}
    else:
        assert want == {"command": True, "data": True}


_QID = re.compile(r"\b[0-9A-F]{10,12}\b")


@pytest.mark.xdist_group("gaps6-notice")
@pytest.mark.parametrize("variant, name, lines", [
    ("protocol", "syntax", [EHLO, "FOO", "MAIL FROM:<a b@c>", "QUIT"]),
    ("protocol", "aborted", [EHLO, "FOO", "RSET x", "DATA", "NOOP"]),
    ("protocol", "lost", [EHLO, "FOO"]),
    ("protocol", "pipelined", [EHLO, ["FOO", "MAIL FROM:<>", "RCPT TO:<x y@z>", "QUIT"]]),
    ("bounce", "too_big", BIG),
    ("policy", "vrfy", [EHLO, "VRFY alice", "QUIT"]),
    ("policy", "content", POLICY_DIALOGUES["hc_reject"]),
    # XCLIENT ends the history: the notice is about the session up to it.
    ("xclient", "xclient", [EHLO, "FOO", "XCLIENT NAME=h.example.org ADDR=192.0.2.7",
                            "EHLO again.example.org", "QUIT"]),
])
def test_side_by_side_notice_text(pairs, variant, name, lines):
    ref, pw = pairs(variant)
    texts = []
    for inst in (ref, pw):
        seen = set(inst.maildir_messages("carol"))
        mark = _mark(f"text-{name}")
        harness.dialogue(inst.port, [lines[0], mark] + lines[1:], timeout=15)

        def notice():
            return next((t for t in _notices(inst, seen) if mark in t), None)
        text = harness.wait_for(notice, 30, 0.1, f"{inst.kind} postmaster notice")
        text = text.split("\nReceived: by ", 1)[1]     # what the MTA itself wrote
        text = _QID.sub("QID", text)
        text = re.sub(r"\d\d:\d\d:\d\d", "T", text)
        text = re.sub(r"<\d{14}\.", "<STAMP.", text)
        texts.append(text)
    assert texts[1] == texts[0]
    client = r"h\.example\.org\[192\.0\.2\.7\]" if name == "xclient" else r"\S+\[127\.0\.0\.1\]"
    assert re.search(rf"^Subject: Postfix SMTP server: errors from {client}$", texts[0], re.M)


# ================================================================ 2. cleanup's check log lines
# Postfix 3.7's cleanup names the sender and the latest recipient in external form:
# a local part that is no dot-atom is quoted, as in the SMTP command.

T0 = 1_795_932_674.5
CHECKS = "/^Subject: reject/ REJECT rejected here\n/^Subject: warn/ WARN warned here\n" \
         "/^Subject: hold/ HOLD held here\n/^Subject: prepend/ PREPEND X-Added: yes\n"


def _cleanup(tmp_path):
    from postwell.cleanup import Cleanup
    from postwell.config.main import Config
    from postwell.log import NullLog
    from postwell.queue import QueueStore
    (tmp_path / "hc").write_text(CHECKS)
    (tmp_path / "bc").write_text("/^bodywarn/ WARN body warned\n")
    params = {"myhostname": "mx.example.test", "mydestination": "mx.example.test",
              "header_checks": f"regexp:{tmp_path}/hc", "body_checks": f"regexp:{tmp_path}/bc"}
    store = QueueStore(str(tmp_path / "q"), clock=lambda: T0)
    store.ensure_layout()
    log = NullLog("cleanup")
    return Cleanup(Config(str(tmp_path), params, {}, []), store, log), log


def _checked(tmp_path, sender, recipients, subject, smtp=True, body=b"b"):
    import asyncio
    c, log = _cleanup(tmp_path)
    cs = c.open(rewrite_local=not smtp, content_checks=True)
    cs.set_sender(sender)
    for r in recipients:
        cs.add_recipient(r, orig=r)
    if smtp:
        for k, v in {"log_message_origin": "unknown[192.0.2.1]", "protocol_name": "ESMTP",
                     "helo_name": "c.example.org"}.items():
            cs.set_attribute(k, v)
    cs.write(f"Subject: {subject}\r\n\r\n".encode() + body + b"\r\n")
    asyncio.run(asyncio.wait_for(cs.finish(), 20))
    return [ln.split(": ", 1)[1] for ln in log.lines if ln.split(": ", 2)[1] in
            ("reject", "warning", "hold", "prepend")]


@pytest.mark.parametrize("sender, recipients, want_from, want_to", [
    ("s x@example.org", ["a b@example.net"], '"s x"@example.org', '"a b"@example.net'),
    ("", ["alice@virtual.test"], "", "alice@virtual.test"),
    ("s@example.org", ["alice@virtual.test", "x.y@virtual.test", "a..b@virtual.test"],
     "s@example.org", '"a..b"@virtual.test'),
])
@pytest.mark.parametrize("verb, text", [("reject", "5.7.1 rejected here"),
                                        ("warning", "warned here"), ("hold", "held here"),
                                        ("prepend", "X-Added: yes")])
def test_check_log_line_addresses(tmp_path, sender, recipients, want_from, want_to, verb, text):
    subject = {"warning": "warn"}.get(verb, verb) + " me"
    [line] = _checked(tmp_path, sender, recipients, subject)
    assert line == (f"{verb}: header Subject: {subject} from unknown[192.0.2.1]; "
                    f"from=<{want_from}> to=<{want_to}> proto=ESMTP helo=<c.example.org>: {text}")


def test_check_log_line_body_and_local_submission(tmp_path):
    [line] = _checked(tmp_path, "s x@example.org", ["a b@example.net"], "plain", smtp=False,
                      body=b"bodywarn here")
    # No client attributes (pickup sets log_message_origin "local"): no proto= or helo=.
    assert line == ('warning: body bodywarn here from unknown; from=<"s x"@example.org> '
                    'to=<"a b"@example.net>: body warned')


# ---------------------------------------------------------------- 2. side by side

PICKUP = "pickup    unix  n       -       n       60      1       pickup\n"


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """``get(name, params, pickup)`` -> (reference, postwell), started once.  With
    pickup False postwell runs none and the reference's wakes once an hour: a
    requeued file then stays in maildrop/ on both sides."""
    reason = harness.reference_available()
    if reason:
        pytest.skip(reason)
    started: dict = {}
    insts: list = []
    tables = harness.table_dir("gaps6-", {"hc": CHECKS})

    def get(name: str, params: dict, pickup: bool):
        if name not in started:
            base = tmp_path_factory.mktemp(f"gaps6-{name}")
            params = {**params, **({"header_checks": f"regexp:{tables}/hc"} if pickup else {})}
            ref = harness.ReferencePostfix(base, params)
            pw = harness.PostwellInstance(base, params)
            if pickup:
                pw.master_cf = pw.default_master_cf() + PICKUP
                pw.write_config()
            else:
                path = ref.config_dir / "master.cf"
                path.write_text(path.read_text().replace(PICKUP, PICKUP.replace(" 60 ", " 3600 ")))
                assert " 3600 " in path.read_text()
            insts.extend([ref, pw])
            harness.start_side_by_side(ref, pw)
            started[name] = (ref, pw)
        return started[name]
    try:
        yield get
    finally:
        harness.stop_side_by_side(insts)
        shutil.rmtree(tables, ignore_errors=True)


BASE = {"notify_classes": "", "mail_name": "Postfix", "smtpd_error_sleep_time": "0"}


def _norm(line: str) -> str:
    line = re.sub(r"^\w{3} [ \d]\d \d\d:\d\d:\d\d \S+ (postfix/\w+)\[\d+\]: ", r"\1: ", line)
    line = re.sub(r"delays?=[\d./]+", "delay=D", line)
    return _QID.sub("QID", line)


def _check_lines(inst, before: int, want: int) -> list[str]:
    def lines():
        with open(inst.maillog, "rb") as f:
            f.seek(before)
            text = f.read().decode("utf-8", "replace")
        got = [_norm(ln) for ln in text.splitlines() if "postfix/cleanup" in ln
               and re.search(r"]: [0-9A-F]+: (reject|warning|hold): ", ln)]
        return got if len(got) >= want else None
    return harness.wait_for(lines, 30, 0.1, f"{inst.kind}: cleanup's check lines")


@pytest.mark.xdist_group("gaps6-content")
def test_side_by_side_check_lines_quote_addresses(made):
    from test_parity_sweep import _quiesce
    ref, pw = made("content", BASE, True)
    got = []
    for inst in (ref, pw):
        _quiesce(inst)
        before = os.path.getsize(inst.maillog)
        harness.dialogue(inst.port, [EHLO, 'MAIL FROM:<"s x"@example.org>',
                                     'RCPT TO:<"a b"@example.net>', ALICE,
                                     'RCPT TO:<"c..d"@example.net>', "DATA",
                                     "Message-ID: <g6@example.org>", "Subject: reject me", "",
                                     "body", ".", "QUIT"], timeout=15)
        # sendmail(1): "from local", no proto= or helo=.
        if inst.kind == "postfix":
            cmd = ["/usr/sbin/sendmail", "-C", str(inst.config_dir)]
        else:
            cmd = [sys.executable, "-m", "postwell.cli.sendmail", "-C", str(inst.config_dir)]
        subprocess.run(cmd + ["-f", "s.t@example.org", '"e f"@example.net'], timeout=30,
                       input=b"Message-ID: <g6b@example.org>\nSubject: hold me\n\nbody\n",
                       env=dict(os.environ, MAIL_CONFIG=str(inst.config_dir)), check=True)
        got.append(_check_lines(inst, before, 2))
    assert got[1] == got[0]
    assert got[0] == [
        'postfix/cleanup: QID: reject: header Subject: reject me from unknown[127.0.0.1]; '
        'from=<"s x"@example.org> to=<"c..d"@example.net> proto=ESMTP '
        'helo=<client.example.org>: 5.7.1 rejected here',
        'postfix/cleanup: QID: hold: header Subject: hold me from local; '
        'from=<s.t@example.org> to=<"e f"@example.net>: held here']


# ================================================================ 3 + 4. postsuper -r
# Postfix 3.7 leaves a requeued message's defer log, and its mailq lists the queue
# file while it waits in maildrop/ for pickup: same id, size and delay reasons.

@pytest.mark.xdist_group("gaps6-queue")
def test_side_by_side_requeued_message_listed_from_maildrop(made):
    ref, pw = made("queue", {**BASE, "defer_transports": "smtp"}, False)
    got = []
    for inst in (ref, pw):
        replies = harness.dialogue(inst.port, [EHLO, MAIL, "RCPT TO:<bob@example.net>", *MSG,
                                               "QUIT"], timeout=15)
        qid = replies[-2].text.split()[-1]
        # Postfix hashes deferred/ and defer/ into subdirectories.
        harness.wait_for(lambda: any((inst.queue_dir / "deferred").rglob(qid))
                         and any((inst.queue_dir / "defer").rglob(qid)),
                         30, 0.1, f"{inst.kind}: deferred with a defer log")
        cp = inst.run("postsuper", "-r", qid, timeout=30)
        assert cp.returncode == 0, cp.stderr
        in_maildrop = [p.name for p in (inst.queue_dir / "maildrop").rglob("*") if p.is_file()]
        defer_log = [p.name for p in (inst.queue_dir / "defer").rglob("*") if p.is_file()]
        listing = inst.run("postqueue", "-j", timeout=30).stdout
        text = inst.run("postqueue", "-p", timeout=30).stdout
        got.append((in_maildrop == [qid], defer_log == [qid],
                    re.sub(r"\d+, ", "N, ", listing.replace(qid, "QID")),
                    re.sub(r"\w{3} \w{3} [ \d]\d \d\d:\d\d:\d\d", "DATE", text.replace(qid, "QID"))))
    assert got[1] == got[0]
    assert got[0][:2] == (True, True)
    assert '"queue_name": "maildrop"' in got[0][2] and "deferred transport" in got[0][2]


# ---------------------------------------------------------------- 3 + 4. unit level

@pytest.fixture
def qroot(tmp_path):
    from test_pickup import pickup_root
    return pickup_root(tmp_path, "gaps6q", "myhostname = mx.example.test\n")


def _requeued(qroot, capsys):
    from postwell.cli import postsuper
    from postwell.queue import QueueStore
    store = QueueStore(str(qroot / "queue"))
    m = store.create()
    m.set_sender("s@example.org")
    m.add_recipient("bob@example.net")
    m.write(b"Subject: x\n\nbody\n")
    m.commit()
    qid = m.queue_id
    store.move(qid, "incoming", "deferred")
    store.append_defer_log(qid, "bob@example.net", "4.3.2", "deferred transport")
    assert postsuper.main(["-c", str(qroot / "etc"), "-r", qid]) == 0
    capsys.readouterr()
    return store, qid


def test_requeue_keeps_the_defer_log(qroot, capsys):
    store, qid = _requeued(qroot, capsys)
    assert os.listdir(store.path("maildrop")) == [qid]
    assert os.path.exists(store.path("defer", qid))


def test_requeued_file_is_listed_from_maildrop(qroot, capsys):
    from postwell import showq
    store, qid = _requeued(qroot, capsys)
    [m] = list(showq.collect(store))
    assert (m["queue_name"], m["queue_id"], m["sender"]) == ("maildrop", qid, "s@example.org")
    assert m["recipients"] == [{"address": "bob@example.net",
                                "delay_reason": "deferred transport"}]


@pytest.mark.parametrize("change", ["world_readable", "other_owner", "two_links"])
def test_maildrop_lookalike_is_not_listed(qroot, capsys, change):
    # maildrop/ takes anyone's files: only what pickup would requeue is listed.
    from postwell import showq
    store, qid = _requeued(qroot, capsys)
    path = store.path("maildrop", qid)
    if change == "world_readable":
        os.chmod(path, 0o744)
    elif change == "other_owner":
        if not harness.is_root():
            pytest.skip("chown needs root")
        os.chown(path, 65534, -1)
    else:
        os.link(path, str(qroot / "queue" / "extra-link"))
    assert list(showq.collect(store)) == []
