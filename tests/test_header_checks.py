"""header_checks / mime_header_checks / nested_header_checks / body_checks in cleanup.

The actions, their log lines and the MIME split were compared with Postfix 3.7
side by side (tests/test_parity_dialogues3.py has the SMTP dialogues; the split
below is what the reference logged for the same multipart message with an INFO
rule matching every line of each list).
"""

from __future__ import annotations

import asyncio

import pytest

from postwell.cleanup import Cleanup
from postwell.cleanup.headers import BodyScanner, ContentChecks, MessageChecks
from postwell.config.main import Config
from postwell.log import NullLog
from postwell.queue import QueueStore

T0 = 1_795_932_674.5
QID_ENV = "from unknown[127.0.0.1]; from=<s@example.test> to=<u@example.test> proto=ESMTP " \
          "helo=<client.example>"

HEADER_RULES = """\
/^Subject: reject-me/ REJECT
/^Subject: reject-text/ REJECT 5.7.9 go away
/^Subject: defer-me/ REJECT 4.7.1 later please
/^Subject: discard-me/ DISCARD gone
/^Subject: hold-me/ HOLD review
/^Subject: hold-too/ HOLD again
/^Subject: redirect-me/ REDIRECT bob@example.test
/^Subject: bcc-me/ BCC carol@example.test
/^Subject: filter-me/ FILTER smtp:[127.0.0.1]:10025
/^Subject: filter-bad/ FILTER nocolon
/^Subject: prepend-me/ PREPEND X-Flag: yes
/^Subject: prepend-bad/ PREPEND no header here
/^Subject: replace-me/ REPLACE Subject: replaced
/^Subject: ignore-me/ IGNORE
/^Subject: strip-me/ STRIP removed
/^Subject: warn-me/ WARN careful
/^Subject: unknown-me/ FROB it
/^Subject: folded\\s+second line/ WARN folded seen
/^X-Second-Reject:/ REJECT second
/^Message-ID: <drop@/ IGNORE
/^Received: .*by mx.example.test/ INFO received seen
/^X-Mailbox-Line: From spammer/ WARN mbox line
"""

MIME_RULES = """\
/^Content-Type: application\\/x-bad/ REJECT bad attachment
/^X-Part-Flag:/ WARN part header
/^Content-Disposition:.*evil/ REPLACE Content-Disposition: inline
"""

NESTED_RULES = """\
/^Subject: nested-bad/ REJECT nested
/^X-Nested:/ INFO nested header
"""

BODY_RULES = """\
/^body-reject/ REJECT body refused
/^body-discard/ DISCARD
/^body-replace/ REPLACE new body line
/^body-prepend/ PREPEND inserted line
/^body-ignore/ IGNORE
/^body-hold/ HOLD
/^body-warn/ WARN body watch
/^Content-Type: application\\/x-bad/ WARN seen as body
/^xxxx/ INFO chunk
/^late-line/ WARN late
"""


def make(tmp_path, params=None, rules=True):
    tables = {}
    for name, text in (("header_checks", HEADER_RULES), ("mime_header_checks", MIME_RULES),
                       ("nested_header_checks", NESTED_RULES), ("body_checks", BODY_RULES)):
        path = tmp_path / name
        path.write_text(text)
        tables[name] = f"regexp:{path}"
    p = {"myhostname": "mx.example.test", "mydestination": "mx.example.test"}
    if rules:
        p.update(tables)
    p.update(params or {})
    cfg = Config(str(tmp_path), p, {}, [])
    store = QueueStore(str(tmp_path / "q"), clock=lambda: T0)
    store.ensure_layout()
    log = NullLog("cleanup")
    return Cleanup(cfg, store, log), store, log


def submit(c, data: bytes, rcpts=("u@example.test",), checks=True, chunk=None,
           received="Received: from client.example (unknown [127.0.0.1])\n"
                    "\tby mx.example.test (postwell) with ESMTP id X"):
    cs = c.open(rewrite_local=False, content_checks=checks)
    cs.set_sender("s@example.test")
    for r in rcpts:
        cs.add_recipient(r, orig=r)
    for k, v in (("log_message_origin", "unknown[127.0.0.1]"), ("protocol_name", "ESMTP"),
                 ("helo_name", "client.example")):
        cs.set_attribute(k, v)
    if received:
        cs.prepend_header(received)
    step = chunk or len(data) or 1
    for i in range(0, len(data), step):
        cs.write(data[i:i + step])
    reply = asyncio.run(asyncio.wait_for(cs.finish(), 20))
    return cs, reply


def msg(subject="plain", *body: str, extra: str = "") -> bytes:
    text = f"From: <s@example.test>\r\nMessage-ID: <m1@example.test>\r\n{extra}" \
           f"Subject: {subject}\r\n\r\n" + "".join(b + "\r\n" for b in (body or ("hello",)))
    return text.encode()


def stored(store, qid, queue="incoming"):
    with store.open(qid, queue) as q:
        return q.read_content().decode(), [(r.address, r.orig) for r in q.recipients
                                           if not r.done], dict(q.attributes)


def stored_all(store, qid, queue="incoming"):
    """Every recipient entry as (address, orig, done)."""
    with store.open(qid, queue) as q:
        return [(r.address, r.orig, r.done) for r in q.recipients]


def check_lines(log, qid):
    return [ln[len(qid) + 2:] for ln in log.lines if ln.startswith(qid + ": ")
            and not ln.startswith(qid + ": message-id=")]


# ---------------------------------------------------------------- actions

def test_reject_answers_550_and_queues_nothing(tmp_path):
    c, store, log = make(tmp_path)
    cs, reply = submit(c, msg("reject-me"))
    assert (reply.code, reply.enhanced, reply.text) == (550, "5.7.1", "message content rejected")
    assert store.scan("incoming") == []
    assert f"{cs.queue_id}: reject: header Subject: reject-me {QID_ENV}: 5.7.1 message content " \
           "rejected" in log.lines


def test_reject_text_and_enhanced_code(tmp_path):
    c, store, log = make(tmp_path)
    _, reply = submit(c, msg("reject-text"))
    assert (reply.code, reply.enhanced, reply.text) == (550, "5.7.9", "go away")


def test_reject_with_4xx_code_defers(tmp_path):
    c, store, log = make(tmp_path)
    cs, reply = submit(c, msg("defer-me"))
    assert (reply.code, reply.enhanced, reply.text) == (451, "4.7.1", "later please")
    assert store.scan("incoming") == []
    assert log.lines[-1].endswith(": 4.7.1 later please")


def test_reject_stops_reading_the_message(tmp_path):
    # Postfix's cleanup reads no record after a REJECT: the Message-ID after the
    # rejected header is never logged, a later matching header never checked.
    c, store, log = make(tmp_path)
    data = b"X-Second-Reject: 1\r\nMessage-ID: <late@x>\r\nSubject: warn-me\r\n\r\nbody-warn\r\n"
    cs, reply = submit(c, data, received=None)
    assert reply.code == 550 and reply.text == "second"
    assert check_lines(log, cs.queue_id) == [
        f"reject: header X-Second-Reject: 1 {QID_ENV}: 5.7.1 second"]
    assert not any("message-id" in ln for ln in log.lines)


def test_discard_answers_250_and_keeps_nothing(tmp_path):
    c, store, log = make(tmp_path)
    cs, reply = submit(c, msg("discard-me", "body-reject"))
    assert (reply.code, reply.text) == (250, f"Ok: queued as {cs.queue_id}")
    assert store.scan("incoming") == [] and store.scan("hold") == []
    assert check_lines(log, cs.queue_id)[-1] == f"discard: header Subject: discard-me {QID_ENV}: gone"


def test_hold_lands_in_hold_queue_logged_once(tmp_path):
    c, store, log = make(tmp_path)
    data = msg("hold-me", "body-hold", extra="X-Other: x\r\n")
    data = data.replace(b"X-Other: x", b"Subject: hold-too")
    cs, reply = submit(c, data)
    assert reply.code == 250
    assert store.scan("incoming") == [] and store.scan("hold") == [cs.queue_id]
    content, rcpts, attrs = stored(store, cs.queue_id, "hold")
    assert "body-hold" in content and attrs.get("postwell_hold") == "1"
    holds = [ln for ln in check_lines(log, cs.queue_id) if ln.startswith("hold:")]
    assert holds == [f"hold: header Subject: hold-too {QID_ENV}: again"]


def test_redirect_replaces_every_recipient(tmp_path):
    c, store, log = make(tmp_path)
    cs, reply = submit(c, msg("redirect-me", "body-reject"), received=None,
                       rcpts=("a@example.test", "b@example.test"))
    # REDIRECT turns the checks off: the body line that would reject is not checked.
    assert reply.code == 250
    # As Postfix: both recipients are written (nrcpt=2), the first goes to the target
    # with its original as orig_to, the second is finished without a delivery.
    assert stored_all(store, cs.queue_id) == [("bob@example.test", "a@example.test", False),
                                              ("bob@example.test", "b@example.test", True)]
    assert check_lines(log, cs.queue_id) == [
        "redirect: header Subject: redirect-me from unknown[127.0.0.1]; from=<s@example.test> "
        "to=<b@example.test> proto=ESMTP helo=<client.example>: bob@example.test"]


def test_bcc_adds_a_recipient(tmp_path):
    c, store, log = make(tmp_path)
    cs, reply = submit(c, msg("bcc-me"))
    _, rcpts, _ = stored(store, cs.queue_id)
    assert [r[0] for r in rcpts] == ["u@example.test", "carol@example.test"]


def test_filter_is_recorded_in_the_envelope(tmp_path):
    c, store, log = make(tmp_path)
    cs, reply = submit(c, msg("filter-me"))
    _, _, attrs = stored(store, cs.queue_id)
    assert attrs["postwell_filter"] == "smtp:[127.0.0.1]:10025"
    cs, reply = submit(c, msg("filter-bad"))
    _, _, attrs = stored(store, cs.queue_id)
    assert "postwell_filter" not in attrs
    assert "warning: bad FILTER command nocolon in header_checks -- need transport:destination" \
        in log.lines


def test_prepend_replace_ignore_strip_change_the_headers(tmp_path):
    c, store, log = make(tmp_path)
    for subject, want in (("prepend-me", "X-Flag: yes\nSubject: prepend-me\n"),
                          ("replace-me", "Subject: replaced\n"),
                          ("ignore-me", "Message-ID: <m1@example.test>\n\n"),
                          ("strip-me", "Message-ID: <m1@example.test>\n\n")):
        cs, reply = submit(c, msg(subject), received=None)
        content, _, _ = stored(store, cs.queue_id)
        assert want in content, subject
        assert content.endswith("\nhello\n")
    assert any(ln.endswith(f"strip: header Subject: strip-me {QID_ENV}: removed")
               for ln in log.lines)
    assert not any("ignore-me" in ln for ln in log.lines)


def test_bad_prepend_text_is_a_warning(tmp_path):
    c, store, log = make(tmp_path)
    cs, reply = submit(c, msg("prepend-bad"), received=None)
    assert "no header here" not in stored(store, cs.queue_id)[0]
    assert 'warning: bad PREPEND header text "no header here" in header_checks ' \
           'map -- need "headername: headervalue"' in log.lines


def test_ignored_message_id_is_not_logged(tmp_path):
    c, store, log = make(tmp_path)
    cs, _ = submit(c, b"Message-ID: <drop@x>\r\nSubject: s\r\n\r\nb\r\n", received=None)
    assert f"{cs.queue_id}: message-id=<>" in log.lines
    assert "drop@" not in stored(store, cs.queue_id)[0]


def test_unknown_action_warns_and_keeps_the_header(tmp_path):
    c, store, log = make(tmp_path)
    cs, reply = submit(c, msg("unknown-me"))
    assert reply.code == 250 and "Subject: unknown-me" in stored(store, cs.queue_id)[0]
    assert "warning: unknown command in header_checks map: FROB it" in log.lines


def test_folded_header_is_one_string_with_newlines(tmp_path):
    c, store, log = make(tmp_path)
    cs, _ = submit(c, b"Subject: folded\r\n\tsecond line\r\n\r\nb\r\n", received=None, chunk=3)
    assert check_lines(log, cs.queue_id) == [
        # The logger prints the folding newline and tab as "??", as Postfix's does.
        f"warning: header Subject: folded??second line {QID_ENV}: folded seen"]


def test_mbox_from_line_is_checked_as_x_mailbox_line(tmp_path):
    c, store, log = make(tmp_path)
    cs, _ = submit(c, b"From spammer@x Mon Jan 1 00:00:00 2024\r\nSubject: s\r\n\r\nb\r\n",
                   received=None)
    assert check_lines(log, cs.queue_id) == [
        f"warning: header X-Mailbox-Line: From spammer@x Mon Jan 1 00:00:00 2024 {QID_ENV}: "
        "mbox line"]
    assert stored(store, cs.queue_id)[0] == \
        "X-Mailbox-Line: From spammer@x Mon Jan 1 00:00:00 2024\nSubject: s\n\nb\n"


def test_the_receiving_servers_received_header_is_checked(tmp_path):
    c, store, log = make(tmp_path)
    cs, _ = submit(c, msg())
    assert check_lines(log, cs.queue_id)[0].startswith("info: header Received: from client.example")


def test_body_actions_change_the_body(tmp_path):
    c, store, log = make(tmp_path)
    cs, reply = submit(c, msg("b", "one", "body-replace x", "body-prepend y", "body-ignore z",
                              "body-warn w", "last"), received=None, chunk=5)
    content, _, _ = stored(store, cs.queue_id)
    assert content.split("\n\n", 1)[1] == \
        "one\nnew body line\ninserted line\nbody-prepend y\nbody-warn w\nlast\n"
    assert [ln.split(":")[0] for ln in check_lines(log, cs.queue_id)] == \
        ["replace", "prepend", "warning"]


def test_body_reject(tmp_path):
    c, store, log = make(tmp_path)
    cs, reply = submit(c, msg("b", "ok", "body-reject now"))
    assert (reply.code, reply.text) == (550, "body refused")
    assert check_lines(log, cs.queue_id)[-1] == \
        f"reject: body body-reject now {QID_ENV}: 5.7.1 body refused"


def test_last_line_without_newline_is_checked(tmp_path):
    c, store, log = make(tmp_path)
    cs, reply = submit(c, b"Subject: s\r\n\r\nbody-discard", received=None)
    assert reply.code == 250 and store.scan("incoming") == []


def test_body_checks_size_limit(tmp_path):
    c, store, log = make(tmp_path, {"body_checks_size_limit": "100"})
    filler = ["f" * 60, "g" * 60]
    cs, reply = submit(c, msg("b", *filler, "late-line"), received=None)
    assert reply.code == 250 and check_lines(log, cs.queue_id) == []
    c, store, log = make(tmp_path / "x" if (tmp_path / "x").mkdir() is None else tmp_path)
    cs, reply = submit(c, msg("b", *filler, "late-line"), received=None)
    assert check_lines(log, cs.queue_id)[0].startswith("warning: body late-line")


def test_long_body_line_checked_in_line_length_limit_records(tmp_path):
    c, store, log = make(tmp_path, {"line_length_limit": "10"})
    cs, reply = submit(c, msg("b", "a" * 10 + "xxxx more"), received=None)
    assert check_lines(log, cs.queue_id) == [f"info: body xxxx more {QID_ENV}: chunk"]
    assert stored(store, cs.queue_id)[0].endswith("\n" + "a" * 10 + "xxxx more\n")


MULTIPART = (
    "From: <s@example.test>\r\nSubject: mime\r\nMIME-Version: 1.0\r\n"
    "Content-Type: multipart/mixed;\r\n\tboundary=\"BB\"\r\n\r\n"
    "preamble\r\n--BB\r\nContent-Type: text/plain\r\nX-Part-Flag: 1\r\n\r\nbody-warn one\r\n"
    "--BB\r\nContent-Type: message/rfc822\r\n\r\nSubject: nested\r\nX-Nested: yes\r\n\r\n"
    "nested body\r\n--BB\r\nContent-Type: text/plain\r\n"
    "Content-Disposition: attachment; evil\r\n\r\nx\r\n--BB--\r\nepilogue\r\n")


def test_mime_split(tmp_path):
    c, store, log = make(tmp_path)
    cs, reply = submit(c, MULTIPART.encode(), received=None, chunk=7)
    assert reply.code == 250
    assert [ln.split(f" {QID_ENV}")[0] for ln in check_lines(log, cs.queue_id)] == [
        "warning: header X-Part-Flag: 1",
        "warning: body body-warn one",
        "info: header X-Nested: yes",
        "replace: header Content-Disposition: attachment; evil",
    ]
    content = stored(store, cs.queue_id)[0]
    assert "Content-Disposition: inline\n\nx\n--BB--\nepilogue\n" in content


def test_mime_part_header_reject_and_nested_reject(tmp_path):
    c, store, log = make(tmp_path)
    data = MULTIPART.replace("X-Part-Flag: 1", "Content-Type: application/x-bad")
    cs, reply = submit(c, data.encode(), received=None)
    assert (reply.code, reply.text) == (550, "bad attachment")
    data = MULTIPART.replace("Subject: nested", "Subject: nested-bad")
    cs, reply = submit(c, data.encode(), received=None)
    assert (reply.code, reply.text) == (550, "nested")


def test_disable_mime_input_processing_makes_parts_body(tmp_path):
    c, store, log = make(tmp_path, {"disable_mime_input_processing": "yes"})
    data = MULTIPART.replace("X-Part-Flag: 1", "Content-Type: application/x-bad")
    cs, reply = submit(c, data.encode(), received=None)
    assert reply.code == 250
    lines = check_lines(log, cs.queue_id)
    assert lines[0].startswith("warning: body Content-Type: application/x-bad")
    assert not any("X-Nested" in ln for ln in lines)


def test_mime_header_checks_default_to_header_checks(tmp_path):
    (tmp_path / "h").write_text("/^X-Part-Flag:/ REJECT from header_checks\n")
    cfg = Config(str(tmp_path), {"header_checks": f"regexp:{tmp_path / 'h'}"}, {}, [])
    store = QueueStore(str(tmp_path / "q"), clock=lambda: T0)
    store.ensure_layout()
    c = Cleanup(cfg, store, NullLog("cleanup"))
    cs, reply = submit(c, MULTIPART.encode(), received=None)
    assert (reply.code, reply.text) == (550, "from header_checks")


# ---------------------------------------------------------------- when checks apply

def test_no_checks_for_internal_mail(tmp_path):
    c, store, log = make(tmp_path)
    cs, reply = submit(c, msg("reject-me"), checks=False)
    assert reply.code == 250 and cs.proc._checks is None


def test_receive_override_options_turns_checks_off(tmp_path):
    c, store, log = make(tmp_path, {"receive_override_options": "no_unknown_recipient_checks, "
                                                                "no_header_body_checks"})
    cs, reply = submit(c, msg("reject-me", "body-reject"))
    assert reply.code == 250 and c.content_checks() is None


def test_nothing_configured_keeps_the_plain_path(tmp_path):
    c, store, log = make(tmp_path, rules=False)
    cs, reply = submit(c, msg("reject-me"))
    assert reply.code == 250 and c.content_checks() is None
    assert cs.proc._checks is None and cs.proc._scanner is None


def test_tables_opened_once_per_process(tmp_path):
    opened = []

    def opener(spec, config, warn):
        opened.append(spec)

        class T:
            def lookup(self, key):
                return None
        return T()
    cfg = Config(str(tmp_path), {"header_checks": "regexp:/a", "body_checks": "regexp:/a"}, {}, [])
    checks = ContentChecks.from_config(cfg, open_table=opener)
    assert opened == ["regexp:/a"] and checks.mime_lookup is not None


@pytest.mark.parametrize("chunk", [1, 2, 5, 64])
def test_chunking_does_not_change_the_result(tmp_path, chunk):
    c, store, log = make(tmp_path)
    whole_cs, _ = submit(c, MULTIPART.encode(), received=None)
    part_cs, _ = submit(c, MULTIPART.encode(), received=None, chunk=chunk)
    assert stored(store, whole_cs.queue_id)[0] == stored(store, part_cs.queue_id)[0]
    assert check_lines(log, whole_cs.queue_id) == check_lines(log, part_cs.queue_id)


def test_scanner_memory_is_bounded(tmp_path):
    # A part header that never ends keeps at most header_size_limit bytes.
    checks = ContentChecks(lambda t: None, lambda t: None, mime_lookup=lambda t: None,
                           nested_lookup=lambda t: None)
    run = MessageChecks(checks, lambda v: None, lambda t: None)
    out = []
    scanner = BodyScanner(run, out.append, 100, 1000, (b"multipart", b"mixed", b"B"))
    scanner.feed(b"--B\nX-Long: a\n")
    for _ in range(200):
        scanner.feed(b" " + b"y" * 99 + b"\n")
    assert len(scanner._hdr) <= 1000 and len(scanner._line) < 100
    scanner.close()


def test_table_failure_defers_the_message(tmp_path):
    from postwell.tables.base import TableLookupError
    c, store, log = make(tmp_path, rules=False)

    def broken(key):
        raise TableLookupError("regexp:/x: lookup failed")
    c._checks, c._checks_loaded = ContentChecks(broken, None), True
    cs, reply = submit(c, msg())
    assert (reply.code, reply.enhanced) == (451, "4.3.0") and store.scan("incoming") == []
    assert f"warning: {cs.queue_id}: header_checks map lookup problem -- message not accepted, " \
           "try again later" in log.lines


def test_log_lines_held_until_the_end_of_a_small_message(tmp_path):
    # They follow whatever the smtpd logs at end of data (Postfix's stream buffer).
    c, store, log = make(tmp_path)
    cs = c.open(content_checks=True)
    cs.set_sender("s@example.test")
    cs.add_recipient("u@example.test")
    cs.write(msg("warn-me"))
    assert log.lines == []
    cs.abort()
    assert [ln.split(": ")[1] for ln in log.lines] == ["message-id=<m1@example.test>", "warning"]
    cs = c.open(content_checks=True)
    cs.set_sender("s@example.test")
    cs.add_recipient("u@example.test")
    cs.write(msg("warn-me", *["y" * 100] * 50))
    assert any("message-id=" in ln for ln in log.lines[2:])
    cs.abort()


# ---------------------------------------------------------------- side by side

ALL_LINES = {"header_checks": "/^/ INFO hdr\n", "mime_header_checks": "/^/ INFO mime\n",
             "nested_header_checks": "/^/ INFO nest\n", "body_checks": "/^/ INFO body\n"}
MIME_DIALOGUE = [
    "EHLO client.example.org", "MAIL FROM:<sender@example.org>", "RCPT TO:<alice@virtual.test>",
    "RCPT TO:<bob@virtual.test>", "DATA",
    "From: <sender@example.org>", "Message-ID: <m1@example.org>", "Subject: mime test",
    "MIME-Version: 1.0", "Content-Type: multipart/mixed;", "\tboundary=\"BB\"", "",
    "preamble line", "--BB", "Content-Type: text/plain", "X-Part: one", "", "part one body", "",
    "--BB", "Content-Type: message/rfc822", "", "Subject: nested subj", "X-Nested: yes",
    "Content-Type: multipart/alternative; boundary=CC", "", "nested pre", "--CC",
    "Content-Type: text/html", "", "<p>html</p>", "--CC--", "nested epi", "--BB",
    "Content-Type: text/plain", "", "a" * 60, "b" * 60, "late line", "--BB--", "epilogue line",
    ".", "QUIT"]


@pytest.mark.postfix
def test_mime_split_and_size_limit_match_the_reference(tmp_path):
    import harness
    from test_parity_dialogues3 import _run, _texts
    reason = harness.reference_available()
    if reason:
        pytest.skip(reason)
    tables = harness.table_dir("hc-tables-", ALL_LINES)
    # The last part's "late line" starts at offset 123 (its empty line counts): unchecked.
    params = {"body_checks_size_limit": "123"}
    for name in ALL_LINES:
        params[name] = f"regexp:{tables / name}"
    ref = harness.ReferencePostfix(tmp_path / "ref", params)
    pw = harness.PostwellInstance(tmp_path / "pw", params)
    try:
        harness.start_side_by_side(ref, pw)
        want_r, want_log = _run(ref, MIME_DIALOGUE)
        got_r, got_log = _run(pw, MIME_DIALOGUE)
    finally:
        harness.stop_side_by_side([ref, pw])

    def norm(lines):
        # The Received header names each program and its clock.
        return [ln.replace("(Postfix)", "(MTA)").replace("(postwell)", "(MTA)")
                for ln in lines if "header Received:" not in ln]
    assert _texts(got_r) == _texts(want_r)
    assert norm(got_log) == norm(want_log)
    assert not any("info: body late line" in ln for ln in want_log)
    assert any("info: body " + "b" * 60 in ln for ln in want_log)


def test_access_map_actions_through_the_session_api(tmp_path):
    # What the smtpd hands over for REDIRECT / BCC / FILTER from its access maps.
    c, store, log = make(tmp_path, rules=False)
    cs = c.open()
    cs.set_sender("s@example.test")
    cs.add_recipient("u@example.test")
    cs.set_redirect("r@example.test")
    cs.add_bcc("b@example.test")
    cs.set_filter("smtp:[127.0.0.1]:10026")
    cs.write(b"Subject: s\r\n\r\nb\r\n")
    reply = asyncio.run(asyncio.wait_for(cs.finish(), 20))
    _, rcpts, attrs = stored(store, cs.queue_id)
    assert reply.code == 250 and attrs["postwell_filter"] == "smtp:[127.0.0.1]:10026"
    # The BCC recipient is redirected too; only the first entry is delivered.
    assert rcpts == [("r@example.test", "u@example.test")]
    assert stored_all(store, cs.queue_id) == [("r@example.test", "u@example.test", False),
                                              ("r@example.test", "b@example.test", True)]


def test_header_check_redirect_wins_over_the_access_map(tmp_path):
    c, store, log = make(tmp_path)
    cs = c.open(content_checks=True)
    cs.set_sender("s@example.test")
    cs.add_recipient("u@example.test")
    cs.set_redirect("r@example.test")
    cs.write(msg("redirect-me"))
    asyncio.run(asyncio.wait_for(cs.finish(), 20))
    assert stored(store, cs.queue_id)[1] == [("bob@example.test", "u@example.test")]
