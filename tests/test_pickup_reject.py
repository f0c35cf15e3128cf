"""pickup: mail that cleanup refuses (header/body checks REJECT, message_size_limit)
goes back to its sender as Postfix's pickup does (CLEANUP_FLAG_BOUNCE), not to corrupt/.

Expected log lines and notice shape checked against Postfix 3.7 (sendmail -C with a
header_checks REJECT): cleanup's reject line, its message-id line, one
``to=<..>, relay=none, ..., status=bounced (reason)`` line per recipient, then the
bounce daemon's ``sender non-delivery notification: NEWID``; the notice returns the
headers only."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import harness  # noqa: E402

from postwell.log import NullLog  # noqa: E402
from postwell.pickup import Pickup  # noqa: E402
from postwell.queue import QueueStore  # noqa: E402
from test_pickup import cfg, pickup_root  # noqa: E402
from test_pickup import drop as pickup_drop  # noqa: E402

NOW = 1_800_000_000.0


@pytest.fixture
def inst(tmp_path):
    return pickup_root(
        tmp_path, "pkrej",
        "myhostname = mx.example.com\nmydomain = example.com\nmyorigin = example.com\n"
        "message_size_limit = 3000\n"
        "header_checks = regexp:{etc}/hc\nbody_checks = regexp:{etc}/bc\n",
        hc="/^Subject: bad/ REJECT go away\n/^Subject: plain/ REJECT\n",
        bc="/forbidden word/ REJECT 5.7.9 no such words\n")


def drop(inst, content: bytes, **env_kw) -> str:
    return pickup_drop(inst, content, NOW - 4, **env_kw)


def run(inst, clock=lambda: NOW):
    logs = {n: NullLog(n) for n in ("pickup", "cleanup", "bounce")}
    p = Pickup(cfg(inst), logs["pickup"], cleanup_log=logs["cleanup"], bounce_log=logs["bounce"],
               clock=clock)
    p.run_once()
    return logs


def queued_files(inst):
    """(queue id, queue file, content) of each message in incoming/."""
    store = QueueStore(str(inst / "queue"))
    out = []
    for qid in store.scan("incoming"):
        with store.open(qid) as qm:
            out.append((qid, qm, qm.read_content()))
    return out


def incoming(inst):
    return [(qid, qm.sender, [r.address for r in qm.recipients], content)
            for qid, qm, content in queued_files(inst)]


def assert_gone(inst):
    assert os.listdir(inst / "queue" / "maildrop") == []
    assert os.listdir(inst / "queue" / "corrupt") == []


def test_header_reject_bounces_to_sender(inst):
    drop(inst, b"Subject: bad thing\nFrom: alice@example.com\n\nhello\n",
         recipients=["bob", "carol@other.example"])
    logs = run(inst)
    assert_gone(inst)
    (nid, sender, rcpts, content), = incoming(inst)
    assert sender == "" and rcpts == ["alice@example.com"]
    cl = logs["cleanup"].lines
    qid = cl[0].split(":")[0]
    assert cl[0] == (f"{qid}: reject: header Subject: bad thing from local; from=<alice@example.com> "
                     f"to=<carol@other.example>: 5.7.1 go away")
    assert cl[1].startswith(f"{qid}: message-id=<") and cl[1].endswith(f".{qid}@mx.example.com>")
    assert cl[2] == (f"{qid}: to=<bob@example.com>, orig_to=<bob>, relay=none, delay=4, "
                     "delays=4/0/0/0, dsn=5.7.1, status=bounced (go away)")
    assert cl[3] == (f"{qid}: to=<carol@other.example>, relay=none, delay=4, delays=4/0/0/0, "
                     "dsn=5.7.1, status=bounced (go away)")
    assert logs["bounce"].lines == [f"{qid}: sender non-delivery notification: {nid}"]
    text = content.decode()
    assert "Subject: Undelivered Mail Returned to Sender" in text
    assert "<bob@example.com> (expanded from <bob>): go away" in text
    assert "<carol@other.example>: go away" in text
    assert "Status: 5.7.1" in text and "Diagnostic-Code: X-Postfix; go away" in text
    assert f"X-Postfix-Queue-ID: {qid}" in text
    assert "X-Postfix-Sender: rfc822; alice@example.com" in text
    assert "Content-Type: text/rfc822-headers" in text
    # The returned headers as cleanup would have stored them, body never.
    assert "Return-Path: <alice@example.com>\nReceived: by mx.example.com" in text
    assert f"\tid {qid}; " in text
    assert "Subject: bad thing\nFrom: alice@example.com\nMessage-Id: <" in text
    assert "\nDate: " in text and "hello" not in text
    assert [ln for ln in logs["pickup"].lines if "warning" in ln] == []


def test_default_reject_text(inst):
    drop(inst, b"Subject: plain\n\nx\n")
    logs = run(inst)
    assert_gone(inst)
    assert any(ln.endswith("dsn=5.7.1, status=bounced (message content rejected)")
               for ln in logs["cleanup"].lines)
    (_nid, _s, _r, content), = incoming(inst)
    assert b"<bob@example.org>: message content rejected" in content


def test_body_reject_keeps_message_id_and_code(inst):
    drop(inst, b"Subject: ok\nMessage-ID: <m1@x>\n\nline\nforbidden word here\n")
    logs = run(inst)
    assert_gone(inst)
    cl = logs["cleanup"].lines
    assert any("message-id=<m1@x>" in ln for ln in cl)
    qid = cl[0].split(":")[0]
    assert sum(ln.startswith(f"{qid}: message-id=") for ln in cl) == 1
    assert any(ln.endswith("dsn=5.7.9, status=bounced (no such words)") for ln in cl)
    (_nid, _s, _r, content), = incoming(inst)
    assert b"Message-ID: <m1@x>\n" in content and b"forbidden" not in content.split(b"rfc822-headers")[1]


def test_size_limit_bounces(inst):
    # Under the maildrop limit, over cleanup's (Received: header and envelope count).
    drop(inst, b"Subject: big\n\n" + b"y" * 70 + b"\n" + (b"x" * 70 + b"\n") * 40)
    logs = run(inst)
    assert_gone(inst)
    cl = logs["cleanup"].lines
    qid = cl[0].split(":")[0]
    assert f"warning: {qid}: queue file size limit exceeded" in cl
    assert (f"{qid}: to=<bob@example.org>, relay=none, delay=4, delays=4/0/0/0, dsn=5.3.4, "
            "status=bounced (message file too big)") in cl
    (nid, sender, rcpts, content), = incoming(inst)
    assert sender == "" and rcpts == ["alice@example.com"]
    assert b"Status: 5.3.4" in content and b"<bob@example.org>: message file too big" in content
    assert logs["bounce"].lines == [f"{qid}: sender non-delivery notification: {nid}"]


def test_null_sender_is_not_bounced(inst):
    drop(inst, b"Subject: bad one\n\nhello\n", sender="")
    logs = run(inst)
    assert_gone(inst)
    assert incoming(inst) == []
    assert any("status=bounced (go away)" in ln for ln in logs["cleanup"].lines)
    assert logs["bounce"].lines == []


def test_notify_never_gets_no_notice(inst):
    drop(inst, b"Subject: bad\n\nhello\n", notify="NEVER")
    logs = run(inst)
    assert_gone(inst)
    assert incoming(inst) == [] and logs["bounce"].lines == []
    assert any("status=bounced (go away)" in ln for ln in logs["cleanup"].lines)


def test_fullname_from_in_returned_headers(inst):
    drop(inst, b"Subject: bad\n\nhello\n", fullname="Alice Liddell")
    run(inst)
    (_nid, _s, _r, content), = incoming(inst)
    # Checked against Postfix 3.7: the added From: follows Message-Id and Date.
    assert b"\nDate: " in content
    # (The last Date: is the returned one: the notice's own follows its Received: by.)
    assert content.split(b"\nDate: ")[-1].split(b"\n", 2)[1] == b"From: Alice Liddell <alice@example.com>"


def test_returned_headers_rewritten_and_folded(inst):
    drop(inst, b"Subject: bad\nTo: bob,\n  carol\nFrom: alice\n\nhello\n")
    run(inst)
    (_nid, _s, _r, content), = incoming(inst)
    head = content.split(b"rfc822-headers")[1]
    assert b"To: bob@example.com,\n  carol@example.com\n" in head or b"To: bob@example.com, carol@example.com\n" in head
    assert b"From: alice@example.com\n" in head
    assert b"Original-Recipient: rfc822;bob@example.org" in content


def test_notice_failure_keeps_maildrop_file(inst, monkeypatch):
    name = drop(inst, b"Subject: bad\n\nhello\n")
    from postwell.cleanup import service as cleanup_service
    from postwell.smtp.reply import Reply
    real = cleanup_service.CleanupSession.finish_sync
    calls = []

    def fake(self):
        calls.append(self.queue_id)
        if len(calls) == 2:     # the notice: a temporary queue write error
            self.abort()
            return Reply(451, "Error: queue file write error", "4.3.0")
        return real(self)

    monkeypatch.setattr(cleanup_service.CleanupSession, "finish_sync", fake)
    logs = run(inst)
    assert os.listdir(inst / "queue" / "maildrop") == [name]
    assert incoming(inst) == [] and logs["bounce"].lines == []
    assert any("bounce message failure" in ln for ln in logs["pickup"].lines)
    monkeypatch.setattr(cleanup_service.CleanupSession, "finish_sync", real)
    logs = run(inst)
    assert_gone(inst)
    assert len(incoming(inst)) == 1 and len(logs["bounce"].lines) == 1


def test_notice_refused_moves_to_corrupt(inst, monkeypatch):
    name = drop(inst, b"Subject: bad\n\nhello\n")
    from postwell.cleanup import service as cleanup_service
    from postwell.smtp.reply import Reply
    real = cleanup_service.CleanupSession.finish_sync
    calls = []

    def fake(self):
        calls.append(1)
        if len(calls) == 2:
            self.abort()
            return Reply(552, "Error: message file too big", "5.3.4")
        return real(self)

    monkeypatch.setattr(cleanup_service.CleanupSession, "finish_sync", fake)
    run(inst)
    assert os.listdir(inst / "queue" / "maildrop") == []
    assert os.listdir(inst / "queue" / "corrupt") == ["maildrop." + name]
    assert incoming(inst) == []


def test_serve_logs_as_cleanup_and_bounce(inst):
    """The service itself: Postfix's program names in the maillog."""
    import signal

    from postwell.pickup import service as svc
    drop(inst, b"Subject: bad thing\n\nhello\n")
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            svc.serve(cfg(inst), wakeup=3600)
            code = 0
        finally:
            os._exit(code)
    try:
        harness.wait_for(lambda: os.listdir(inst / "queue" / "maildrop") == [] and incoming(inst),
                         10, what="bounce by the service")
        os.kill(pid, signal.SIGTERM)
        _p, status = os.waitpid(pid, 0)
        pid = None
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        if pid:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    assert os.listdir(inst / "queue" / "corrupt") == []
    log = (inst / "maillog").read_text()
    (nid, _s, _r, _c), = incoming(inst)
    lines = [ln.split("]: ", 1) for ln in log.splitlines() if "]: " in ln]
    tagged = [(head.rsplit(" ", 1)[-1].split("[")[0], text) for head, text in lines]
    qid = next(t.split(":")[0] for p, t in tagged if p == "postfix/pickup" and "uid=" in t)
    assert ("postfix/cleanup", f"{qid}: reject: header Subject: bad thing from local; "
            f"from=<alice@example.com> to=<bob@example.org>: 5.7.1 go away") in tagged
    assert any(p == "postfix/cleanup" and t.startswith(f"{qid}: to=<bob@example.org>, relay=none, ")
               and t.endswith("dsn=5.7.1, status=bounced (go away)") for p, t in tagged)
    assert ("postfix/bounce", f"{qid}: sender non-delivery notification: {nid}") in tagged
