"""Bounce/delay/success notice parity with Postfix 3.7, sixth sweep.

* every notice the qmgr posts starts with post_mail()'s
  "Received: by HOST (MAIL_NAME)\\n\\tid NOTICE-ID; DATE" header;
* the returned original (whole or headers) starts with "Return-Path: <sender>"
  (MAILER-DAEMON@$myhostname for the null sender), as bounce_original() writes it;
* a command's failure is typed x-unix in Diagnostic-Code: the output, else the
  sysexits text, "unknown mail system error N", or "internal software error"
  for a signal or the time limit; an enhanced status code opening the output
  decides the status and is the whole reason (checked against a reference
  Postfix: alias commands exiting 67, 70, 1, with and without output);
* the typed diagnostic travels from the agent's result through bounce/ID and
  defer/ID (diag_type, diag_text) into the notice;
* bounce_template_file problems are logged by the qmgr's bounce log.

The side-by-side part runs a reference Postfix and postwell with the same
aliases and compares the delivery-status blocks of the notices.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import json
import re
import subprocess
from types import SimpleNamespace

import pytest

import harness
from postwell.config.main import Config
from postwell.delivery.base import DeliveryAgent, RecipientResult
from postwell.delivery.local import Leaf, LocalAgent
from postwell.delivery.local_exec import LocalCopy, op_command
from postwell.dsn import DsnRecipient, FAILURE, render_notice
from postwell.dsn.notice import DELAY, command_diagnostic, diagnostic, mail_date
from postwell.dsn.submit import post_mail_received, post_notice
from postwell.log import NullLog
from postwell.qmgr.manager import QueueManager
from postwell.queue import QueueStore

T0 = 1_800_000_000.0
HOST = "mx.demo.test"


# ------------------------------------------------------------------ diagnostic()

@pytest.mark.parametrize("reason, typed, want", [
    # A typed diagnostic wins; one without text falls back to the reason.
    ("user unknown", ("x-unix", "user unknown"), "x-unix; user unknown"),
    ("no such user ", ("x-unix", "no such user "), "x-unix; no such user"),
    ("", ("x-unix", ""), "X-Postfix; (description unavailable)"),
    ("some text", ("x-unix", "  "), "X-Postfix; some text"),
    # Untyped: read from the reason as before.
    ("user unknown", None, "X-Postfix; user unknown"),
    ("", None, "X-Postfix; (description unavailable)"),
    ('Command died with status 1: "exit 1"', None, "x-unix; unknown mail system error 1"),
    ('Command died with signal 9: "kill -9 $$"', None, "x-unix; internal software error"),
    ('Command time limit exceeded: "sleep 5"', None, "x-unix; internal software error"),
    ('Command time limit exceeded: "x". Command output: out here ', None, "x-unix; out here"),
    ("user unknown. Command output: hi there ", None, "x-unix; hi there"),
])
def test_diagnostic_code(reason, typed, want):
    dtype, dtext = typed or (None, None)
    assert diagnostic(reason, dtype, dtext)[1] == want


def test_typed_diagnostic_keeps_remote_mta():
    remote, code = diagnostic("host mx.far.test[192.0.2.1] said: 550 5.1.1 no (in reply to RCPT TO "
                              "command)", "smtp", "550 5.1.1 no")
    assert (remote, code) == ("mx.far.test", "smtp; 550 5.1.1 no")


def test_command_diagnostic_only_for_bare_sysexits_texts():
    assert command_diagnostic("user unknown") == ("x-unix", "user unknown")
    assert command_diagnostic("internal software error") == ("x-unix", "internal software error")
    assert command_diagnostic("user unknown. Command output: x") is None
    assert command_diagnostic('unknown user: "x"') is None
    assert command_diagnostic("") is None


# ------------------------------------------------------------------ op_command()

def _copy() -> LocalCopy:
    return LocalCopy(path="", maildir=False, sender="s@x.test", recipient="r@y.test", orig="r@y.test",
                     delivered=None, limit=0, lock_methods="", hostname=HOST, want_orig=False,
                     want_delivered=False)


def _run(command: str, time_limit: float = 20.0) -> dict:
    return op_command(command, {"PATH": "/usr/bin:/bin"}, "/", time_limit, "", _copy(),
                      lambda: iter([b"Subject: t\n\nbody\n"]))


# (command, status, dsn, reason, x-unix text) as Postfix 3.7's local(8) gave them
# for the same alias commands (side by side, see the module docstring).
COMMANDS = [
    ("exit 67", "bounced", "5.1.1", "user unknown", "user unknown"),
    ("echo hi there; exit 67", "bounced", "5.1.1", "user unknown. Command output: hi there ",
     "hi there "),
    ("echo 5.1.1 no such user; exit 67", "bounced", "5.1.1", "no such user ", "no such user "),
    ("echo 5.2.2 box full; exit 1", "bounced", "5.2.2", "box full ", "box full "),
    ("echo 4.2.2 later; exit 67", "deferred", "4.2.2", "later ", "later "),
    ("echo 5.1.1 bad; exit 75", "bounced", "5.1.1", "bad ", "bad "),
    ("echo 2.0.0 fine; exit 1", "bounced", "5.0.0", "fine ", "fine "),
    ("echo 2.0.0 fine; exit 75", "bounced", "5.0.0", "fine ", "fine "),
    ("echo 5.1.1; exit 67", "bounced", "5.1.1", "", ""),
    ("echo 5.1.1: colon; exit 67", "bounced", "5.1.1", "user unknown. Command output: 5.1.1: colon ",
     "5.1.1: colon "),
    ("echo 5.5.5.5 odd; exit 67", "bounced", "5.1.1", "user unknown. Command output: 5.5.5.5 odd ",
     "5.5.5.5 odd "),
    ("echo 5.1.123 big; exit 1", "bounced", "5.1.123", "big ", "big "),
    ("echo 5.1234.1 big; exit 1", "bounced", "5.3.0",
     'Command died with status 1: "echo 5.1234.1 big; exit 1". Command output: 5.1234.1 big ',
     "5.1234.1 big "),
    ("exit 70", "bounced", "5.3.0", "internal software error", "internal software error"),
    ("exit 1", "bounced", "5.3.0", 'Command died with status 1: "exit 1"', "unknown mail system error 1"),
    ("exit 200", "bounced", "5.3.0", 'Command died with status 200: "exit 200"',
     "unknown mail system error 200"),
    ("kill -9 $$", "deferred", "4.3.0", 'Command died with signal 9: "kill -9 $$"',
     "internal software error"),
    ("echo 5.1.1 bad; kill -9 $$", "deferred", "4.3.0",
     'Command died with signal 9: "echo 5.1.1 bad; kill -9 $$". Command output: 5.1.1 bad ',
     "5.1.1 bad "),
]


@pytest.mark.parametrize("command, status, dsn, reason, text", COMMANDS,
                         ids=[c[0] for c in COMMANDS])
def test_command_result_carries_x_unix_diagnostic(command, status, dsn, reason, text):
    res = _run(command)
    assert (res["status"], res["dsn"], res["reason"]) == (status, dsn, reason)
    assert (res["diag_type"], res["diag_text"]) == ("x-unix", text)


def test_command_time_limit_diagnostic():
    res = _run("sleep 5", time_limit=0.3)
    assert (res["status"], res["dsn"], res["reason"]) == (
        "bounced", "5.3.0", 'Command time limit exceeded: "sleep 5"')
    assert (res["diag_type"], res["diag_text"]) == ("x-unix", "internal software error")
    res = _run("echo out here; sleep 5", time_limit=0.3)
    assert res["reason"] == 'Command time limit exceeded: "echo out here; sleep 5". Command output: out here '
    assert res["diag_text"] == "out here "


def test_command_success_has_no_diagnostic():
    res = _run("cat >/dev/null")
    assert res == {"status": "sent", "dsn": "2.0.0", "reason": "delivered to command: cat >/dev/null"}


# ------------------------------------------------------------------ local(8) carries it

def test_leaf_json_carries_the_diagnostic_and_reads_older_forms():
    leaf = Leaf("c@x", "c@x", "bounced", "5.1.1", "no such user ", diag_type="x-unix",
                diag_text="no such user ")
    wire = json.loads(json.dumps(leaf.to_json()))
    assert len(wire) == 11 and Leaf.from_json(wire) == leaf
    empty = Leaf("c@x", "c@x", "bounced", "5.1.1", "", diag_type="x-unix", diag_text="")
    assert Leaf.from_json(json.loads(json.dumps(empty.to_json()))) == empty
    both = Leaf("m@x", "", "bounced", "5.0.0", "fine ", via="list", trace=["delivered", "l@x", "l@x"],
                diag_type="x-unix", diag_text="fine ")
    assert Leaf.from_json(both.to_json()) == both
    # Without a diagnostic the older forms stay as they were: 7, 8 or 9 items.
    assert len(Leaf("a@x", "a@x").to_json()) == 7
    for old in (["a@x", "a@x", "sent", "2.0.0", "r", None, None],
                ["a@x", "a@x", "sent", "2.0.0", "r", None, None, "alias"],
                ["a@x", "a@x", "sent", "2.0.0", "r", None, None, "alias", ["expanded", "t@x", "t@x"]],
                ["a@x", "a@x", "bounced", "5.1.1", "r", None, None, None, None, "x-unix"]):
        got = Leaf.from_json(old)
        assert got.address == "a@x" and got.diag_type == (old[9] if len(old) > 9 else None)
    assert Leaf.from_json(["a@x", "a@x", "bounced", "5.1.1", "r", None, None, None, None,
                           "x-unix"]).diag_text == ""


class _CarryAgent(LocalAgent):
    """Its expansion is given (two commands of one alias, a mailbox)."""

    def expand_request(self, request):
        top = request.recipients[0].address
        return [[Leaf("u@x", top, "sent", "2.0.0", "delivered to mailbox", via="alias"),
                 Leaf(top, top, "bounced", "5.1.1", "no such user ", via="alias", diag_type="x-unix",
                      diag_text="no such user "),
                 Leaf(top, top, "deferred", "4.2.2", "later ", via="alias", diag_type="x-unix",
                      diag_text="later ")]]


def test_local_result_and_parts_carry_the_diagnostic(tmp_path):
    from postwell.delivery.base import DeliveryRequest, Recipient
    agent = _CarryAgent(_cfg(tmp_path), NullLog("local"), store=_store(tmp_path), helper_socket="")
    req = DeliveryRequest(queue_id="ABC", sender="s@x.test", recipients=[Recipient("t@x")],
                          transport="local", nexthop=HOST, arrival_time=0.0,
                          open_content=lambda: iter([ORIGINAL]))
    [res] = _arun(agent.deliver(req))
    # The aggregate is the deferred part (it decides), with that part's diagnostic.
    assert (res.status, res.dsn, res.diag_type, res.diag_text) == ("deferred", "4.2.2", "x-unix", "later ")
    assert [(p.status, getattr(p, "diag_type", None), getattr(p, "diag_text", None))
            for p in res.expanded] == [("sent", None, None), ("bounced", "x-unix", "no such user "),
                                       ("deferred", "x-unix", "later ")]


def test_local_command_result_keeps_and_warns(tmp_path):
    from postwell.delivery.base import DeliveryRequest
    from postwell.delivery.local import Branch, Expansion
    log = NullLog("local")
    agent = LocalAgent(_cfg(tmp_path), log, store=_store(tmp_path), helper_socket="")
    req = DeliveryRequest(queue_id="ABC", sender="s@x.test", recipients=[], transport="local",
                          nexthop=HOST, arrival_time=0.0, open_content=lambda: iter([ORIGINAL]))
    exp = Expansion(agent, req, set())
    exp._record(Branch("c@x", "c@x", "c@x"), _run("echo 5.1.1 no such user; exit 67"))
    assert [(l.dsn, l.diag_type, l.diag_text) for l in exp.leaves] == [("5.1.1", "x-unix", "no such user ")]
    assert log.lines == []
    # A 2.x code taken as a failure (5.0.0): logged as Postfix's bounce_append() does.
    exp._record(Branch("c@x", "c@x", "c@x"), _run("echo 2.0.0 fine; exit 1"))
    assert exp.leaves[-1].dsn == "5.0.0"
    assert log.lines == ['warning: bounce_append: ignoring dsn code "2.0.0"']


# ------------------------------------------------------------------ render_notice()

def _cfg(tmp_path, **params) -> Config:
    base = {"queue_directory": str(tmp_path / "queue"), "myhostname": HOST, "mydomain": "demo.test",
            "myorigin": "$mydomain"}
    base.update(params)
    return Config(str(tmp_path), base, {}, [])


ORIGINAL = b"From: s@x.test\nSubject: t\n\nhello\n"


def _render(cfg, sender="s@x.test", kind=FAILURE, original=ORIGINAL, rcpts=None, **kw) -> bytes:
    rcpts = rcpts or [DsnRecipient("r@y.test", "5.1.1", "user unknown",
                                   diag_type="x-unix", diag_text="user unknown")]
    return render_notice(cfg, kind=kind, queue_id="ABC123", sender=sender, arrival_time=T0,
                         now=T0, recipients=rcpts, original=lambda: iter([original]),
                         content_size=len(original), **kw)


def _third_part(data: bytes) -> bytes:
    return data.split(b"Content-Transfer-Encoding: 8bit\n\n")[-1]


def test_returned_message_starts_with_return_path(tmp_path):
    cfg = _cfg(tmp_path)
    full = _render(cfg)
    assert b"Content-Type: message/rfc822\n" in full
    assert _third_part(full).startswith(b"Return-Path: <s@x.test>\nFrom: s@x.test\nSubject: t\n\nhello\n")
    hdrs = _render(cfg, ret="HDRS")
    assert _third_part(hdrs) == b"Return-Path: <s@x.test>\nFrom: s@x.test\nSubject: t\n\n--" + \
        b"ABC123.1800000000/mx.demo.test--\n"
    delay = _render(cfg, kind=DELAY, rcpts=[DsnRecipient("r@y.test", "4.2.2", "later", "delayed")])
    assert _third_part(delay).startswith(b"Return-Path: <s@x.test>\nFrom: s@x.test\n")


def test_return_path_for_null_and_quoted_senders(tmp_path):
    cfg = _cfg(tmp_path)
    data = _render(cfg, sender="", to="postmaster", postmaster=True, full=True)
    assert b"X-Postfix-Sender: rfc822; MAILER-DAEMON@mx.demo.test\n" in data
    assert _third_part(data).startswith(b"Return-Path: <MAILER-DAEMON@mx.demo.test>\n")
    data = _render(cfg, sender="a b@x.test")
    assert b'X-Postfix-Sender: rfc822; "a b"@x.test\n' in data
    assert _third_part(data).startswith(b'Return-Path: <"a b"@x.test>\n')


def test_original_with_its_own_return_path_keeps_one(tmp_path):
    # pickup's replayed header block already names the sender.
    data = _render(_cfg(tmp_path), original=b"Return-Path: <s@x.test>\nSubject: t\n\nx\n")
    assert _third_part(data).count(b"Return-Path:") == 1


def test_empty_original_still_gets_return_path(tmp_path):
    data = _render(_cfg(tmp_path), original=b"")
    assert _third_part(data).startswith(b"Return-Path: <s@x.test>\n\n--ABC123.")


def test_typed_diagnostic_and_empty_reason_in_notice(tmp_path):
    data = _render(_cfg(tmp_path), rcpts=[
        DsnRecipient("a@y.test", "5.1.1", "user unknown", diag_type="x-unix", diag_text="user unknown"),
        DsnRecipient("b@y.test", "5.1.1", "", diag_type="x-unix", diag_text=""),
        DsnRecipient("c@y.test", "5.0.0", "user unknown")]).decode()
    assert "\n<a@y.test>: user unknown\n" in data
    assert "\n<b@y.test>: (description unavailable)\n" in data
    assert "Final-Recipient: rfc822; a@y.test\nAction: failed\nStatus: 5.1.1\n" \
           "Diagnostic-Code: x-unix; user unknown\n" in data
    assert "Final-Recipient: rfc822; b@y.test\nAction: failed\nStatus: 5.1.1\n" \
           "Diagnostic-Code: X-Postfix; (description unavailable)\n" in data
    assert "Status: 5.0.0\nDiagnostic-Code: X-Postfix; user unknown\n" in data


# ------------------------------------------------------------------ post_notice()

def _store(tmp_path) -> QueueStore:
    store = QueueStore(str(tmp_path / "queue"))
    store.ensure_layout()
    return store


def _queued(store, qid):
    qm = store.open(qid)
    try:
        return qm.sender, [r.address for r in qm.recipients], qm.read_content()
    finally:
        qm.close()


def test_post_mail_received_shape(tmp_path):
    cfg = _cfg(tmp_path)
    data = b"Date: Fri,  4 Dec 2026 18:03:00 +0000 (UTC)\nFrom: x\n\nbody\n"
    assert post_mail_received(cfg, "QID1", data) == (
        f"Received: by {HOST} (postwell)\n\tid QID1; Fri,  4 Dec 2026 18:03:00 +0000 (UTC)")
    cfg = _cfg(tmp_path, mail_name="Postfix")
    assert post_mail_received(cfg, "QID2", b"From: x\n\nDate: not this\n", now=T0) == (
        f"Received: by {HOST} (Postfix)\n\tid QID2; {mail_date(T0)}")


def test_post_notice_prepends_received(tmp_path):
    cfg = _cfg(tmp_path)
    store = _store(tmp_path)
    data = _render(cfg)
    qid = asyncio.run(asyncio.wait_for(post_notice(cfg, store, sender="", recipient="s@x.test",
                                                   data=data), 30))
    sender, rcpts, content = _queued(store, qid)
    assert (sender, rcpts) == ("", ["s@x.test"])
    head = content.decode().split("\n")
    date = mail_date(T0)
    assert head[:3] == [f"Received: by {HOST} (postwell)", f"\tid {qid}; {date}", f"Date: {date}"]
    assert content.count(b"Received:") == 1


def test_pickup_notice_starts_with_received(tmp_path):
    """pickup's notice for mail cleanup refused (header_checks REJECT) is
    posted as Postfix's bounce daemon posts it: post_mail()'s header first,
    naming the notice's own queue id and its Date."""
    import test_pickup_reject as pr
    inst = pr.pickup_root(tmp_path, "pkn6", "myhostname = mx.example.com\nmydomain = example.com\n"
                          "myorigin = example.com\nheader_checks = regexp:{etc}/hc\n",
                          hc="/^Subject: bad/ REJECT go away\n")
    pr.drop(inst, b"Subject: bad thing\nFrom: alice@example.com\n\nhello\n")
    pr.run(inst)
    (nid, sender, rcpts, content), = pr.incoming(inst)
    assert sender == "" and rcpts == ["alice@example.com"]
    head = content.decode().split("\n\n", 1)[0]
    m = re.match(r"Received: by mx\.example\.com \((\w+)\)\n\tid (\w+); (.*)\n", head)
    assert m and m.group(2) == nid, head
    assert f"\nDate: {m.group(3)}\n" in head
    assert head.count("Received: by mx.example.com") == 1


def test_post_notice_keeps_callers_own_received(tmp_path):
    """The smtpd's transcript notice prepends its own post_mail() header
    through a wrapping cleanup: no second one."""
    from postwell.cleanup import Cleanup
    cfg = _cfg(tmp_path)
    store = _store(tmp_path)

    class Wrapper:
        def __init__(self, inner):
            self.inner = inner

        def open(self, *a, **kw):
            cs = self.inner.open(*a, **kw)
            cs.prepend_header(f"Received: by {HOST} (postwell)\n\tid {cs.queue_id}; CALLER")
            return cs

    wrapped = Wrapper(Cleanup(cfg, store, NullLog("cleanup")))
    qid = asyncio.run(asyncio.wait_for(post_notice(
        cfg, None, sender="", recipient="postmaster@demo.test",
        data=b"Date: X\nSubject: t\n\nx\n", cleanup=wrapped), 30))
    content = _queued(store, qid)[2]
    assert content.count(b"Received:") == 1
    assert content.startswith(f"Received: by {HOST} (postwell)\n\tid {qid}; CALLER\n".encode())


# ------------------------------------------------------------------ through the qmgr

class FakeClock:
    def __init__(self, t=T0):
        self.t = t

    def __call__(self):
        return self.t


class Resolver:
    """domain -> transport; the next hop is the domain."""

    def resolve(self, address):
        domain = address.rsplit("@", 1)[-1]
        return SimpleNamespace(address_class="virtual", transport=domain.split(".")[0],
                               nexthop=domain, recipient=address)


class ScriptedAgent(DeliveryAgent):
    """Answers every recipient with one result: (status, dsn, reason, relay[, diag])."""

    def __init__(self, status, dsn, reason, relay, diag=None):
        self.answer = (status, dsn, reason, relay)
        self.diag = diag
        self.calls = 0

    async def deliver(self, req):
        self.calls += 1
        out = []
        for r in req.recipients:
            res = RecipientResult(r, *self.answer)
            if self.diag:
                res.diag_type, res.diag_text = self.diag
            out.append(res)
        return out


@pytest.fixture
def env(tmp_path):
    cfg = _cfg(tmp_path)
    clock = FakeClock()
    store = QueueStore(str(tmp_path / "queue"), clock=clock)
    store.ensure_layout()
    logs = {}

    def agent_log(name):
        return logs.setdefault(name, NullLog(name))

    agents = {
        # local(8) with a typed diagnostic (what local.py is to pass on) ...
        "typed": ScriptedAgent("bounced", "5.1.1", "no such user ", "local", ("x-unix", "no such user ")),
        # ... and without one: a bare sysexits text from local/pipe is a command's.
        "local": ScriptedAgent("bounced", "5.1.1", "user unknown", "local"),
        "pipe": ScriptedAgent("bounced", "5.3.0", "internal software error", "pipe"),
        # the same words from error(8) stay X-Postfix.
        "error": ScriptedAgent("bounced", "5.1.1", "user unknown", "none"),
        "later": ScriptedAgent("deferred", "4.2.2", "later ", "local", ("x-unix", "later ")),
        "tmp67": ScriptedAgent("deferred", "4.3.0", "temporary failure", "local"),
    }

    def make():
        return QueueManager(cfg, store, log=agent_log("qmgr"), clock=clock, resolver=Resolver(),
                            bounce_log=agent_log("bounce"), agent_logs=agent_log, agents=agents)
    return SimpleNamespace(cfg=cfg, store=store, clock=clock, logs=logs, make=make, agents=agents)


# The qmgr notice tests' helpers: queue a message, run a coroutine bounded, one
# incoming/ pass.
from test_qmgr_notices import incoming_pass as _pass, queue as _queue, run as _arun  # noqa: E402


def _notices(env, exclude=()):
    out = []
    for qid in env.store.scan("incoming"):
        if qid in exclude:
            continue
        sender, rcpts, content = _queued(env.store, qid)
        out.append(SimpleNamespace(qid=qid, sender=sender, rcpts=rcpts, content=content,
                                   msg=email.message_from_bytes(content, policy=email.policy.compat32)))
    return out


def _codes(msg) -> dict[str, str]:
    return {b["Final-Recipient"].split("; ")[1]: b["Diagnostic-Code"]
            for b in msg.get_payload()[1].get_payload()[1:]}


def test_qmgr_notice_carries_typed_and_command_diagnostics(env):
    qid = _queue(env.store, "s@x.test", ["a@typed.test", "b@local.test", "c@pipe.test",
                                         "d@error.test"])
    _arun(_pass(env.make()))
    [n] = _notices(env)
    assert _codes(n.msg) == {"a@typed.test": "x-unix; no such user",
                             "b@local.test": "x-unix; user unknown",
                             "c@pipe.test": "x-unix; internal software error",
                             "d@error.test": "X-Postfix; user unknown"}
    assert env.store.find(qid) is None
    # post_mail()'s header first, naming the notice's own id and its Date.
    head = n.content.decode().split("\n", 3)
    assert head[0] == f"Received: by {HOST} (postwell)"
    assert head[1] == f"\tid {n.qid}; {mail_date(T0)}" and head[2] == f"Date: {mail_date(T0)}"
    assert _third_part(n.content).startswith(b"Return-Path: <s@x.test>\nFrom: s@x.test\n")


def test_bounce_log_entries_keep_the_diagnostic(env, monkeypatch):
    """The notice may be posted on a later pass: bounce/ID is its only source."""
    from postwell.qmgr import manager
    seen = {}
    real = manager.QueueManager._send_notices

    async def hold(self, qid, qm, sender, arrival, entries=None):
        seen["entries"] = await self._blocking(self.store.read_bounce_log, qid)
        return await real(self, qid, qm, sender, arrival, entries)
    monkeypatch.setattr(manager.QueueManager, "_send_notices", hold)
    _queue(env.store, "s@x.test", ["a@typed.test", "d@error.test"])
    _arun(_pass(env.make()))
    by_rcpt = {e["recipient"]: e for e in seen["entries"]}
    assert (by_rcpt["a@typed.test"]["diag_type"], by_rcpt["a@typed.test"]["diag_text"]) == \
        ("x-unix", "no such user ")
    assert "diag_type" not in by_rcpt["d@error.test"]


def test_delay_warning_and_expiry_keep_the_diagnostic(env):
    env.cfg.params.update({"delay_warning_time": "1h", "maximal_queue_lifetime": "2h",
                           "minimal_backoff_time": "300s", "maximal_backoff_time": "600s"})
    qid = _queue(env.store, "s@x.test", ["a@later.test", "b@tmp67.test"])
    qm = env.make()

    async def go():
        await _pass(qm)
        t = T0
        while env.store.find(qid) is not None and t < T0 + 4 * 3600:
            t += 300
            env.clock.t = t
            qm.scan_deferred()
            await qm.drain()
    _arun(go())
    assert env.store.find(qid) is None
    got = {n.msg["Subject"]: n for n in _notices(env)}
    delay = got["Delayed Mail (still being retried)"]
    assert _codes(delay.msg) == {"a@later.test": "x-unix; later",
                                 "b@tmp67.test": "x-unix; temporary failure"}
    assert delay.content.startswith(f"Received: by {HOST} (postwell)\n\tid {delay.qid}; ".encode())
    bounce = got["Undelivered Mail Returned to Sender"]
    assert _codes(bounce.msg) == {"a@later.test": "x-unix; later",
                                  "b@tmp67.test": "x-unix; temporary failure"}


def test_postsuper_expire_reads_diagnostic_from_defer_log(env):
    from postwell.qmgr.expire import mark_expired
    qid = _queue(env.store, "s@x.test", ["a@later.test"])
    qm = env.make()
    _arun(_pass(qm))
    assert env.store.find(qid) == "deferred"
    # postsuper -e: marked, put back in incoming/; returned with the last deferral.
    mark_expired(env.store.path("deferred", qid))
    env.store.move(qid, "deferred", "incoming")
    env.clock.t += 60
    _arun(_pass(qm))
    assert env.store.find(qid) is None
    [n] = _notices(env)
    assert n.msg["Subject"] == "Undelivered Mail Returned to Sender"
    assert _codes(n.msg) == {"a@later.test": "x-unix; later"}


def test_template_file_problems_are_logged_by_bounce(env, tmp_path):
    env.cfg.params["bounce_template_file"] = str(tmp_path / "missing.cf")
    _queue(env.store, "s@x.test", ["d@error.test"])
    _arun(_pass(env.make()))
    [n] = _notices(env)
    assert n.msg["Subject"] == "Undelivered Mail Returned to Sender"
    warnings = [l for l in env.logs["bounce"].lines if l.startswith("warning: ")]
    assert warnings == [f"warning: open {tmp_path / 'missing.cf'}: No such file or directory "
                        "-- using the built-in templates"]


def test_zero_result_template_conversion_is_logged_per_notice(env):
    # Postfix 3.7, delay_warning_time = 2s: bounce(8) logs these three lines with
    # every delay notice ("[built-in]" names the template source).
    env.cfg.params.update({"delay_warning_time": "2s"})
    qid = _queue(env.store, "s@x.test", ["a@later.test"])
    qm = env.make()

    async def go():
        await _pass(qm)
        env.clock.t += 600
        qm.scan_deferred(force=True)
        await qm.drain()
    _arun(go())
    assert env.store.find(qid) is not None
    warnings = [l for l in env.logs["bounce"].lines if l.startswith("warning: ")]
    assert warnings == [
        'warning: [built-in]: zero result in delay template conversion of parameter '
        '"delay_warning_time_hours"',
        'warning: please reduce time unit "hours" of "delay_warning_time_hours" in delay template',
        "warning: for instructions see the bounce(5) manual"]


# ------------------------------------------------------------------ side by side

pytestmark_ref = [
    pytest.mark.postfix,
    pytest.mark.skipif(harness.reference_available() is not None,
                       reason=str(harness.reference_available())),
]

ALIASES6 = {
    "cnouser": '"|exit 67"',
    "csoftware": '"|exit 70"',
    "cquiet": '"|exit 1"',
    "coutput": '"|echo hi there; exit 67"',
    "cempty": '"|echo 5.1.1; exit 67"',
    "cdsn": '"|echo 5.1.1 no such user; exit 67"',
    "csuccess": '"|echo 2.0.0 fine; exit 1"',
    "ctempfail": '"|exit 75"',          # deferred: a delay notice
    # deferred with a typed diagnostic: an enhanced status code, a signal
    "clater": '"|echo 4.2.2 later; exit 1"',
    "csignal": '"|echo out; kill -9 $$"',
}
# Each MTA's notices are keyed by the Final-Recipient's local part.
SUCCESS_RCPT = "bob@virtual.test NOTIFY=SUCCESS"


def _pair_notices(tmp_path_factory):
    base = tmp_path_factory.mktemp("notice6")
    extra = {"alias_maps": "hash:$config_directory/aliases",
             "alias_database": "hash:$config_directory/aliases",
             # one delay notice soon (Postfix logs its zero-result template warning)
             "delay_warning_time": "2s"}
    ref = harness.ReferencePostfix(base, dict(extra), name="pf-notice6")
    pw = harness.PostwellInstance(base, dict(extra), name="pw-notice6")
    pw.master_cf = pw.default_master_cf() + "local     unix  -       n       n       -       -       local\n"
    pw.write_config()
    out = {}
    try:
        for inst in (ref, pw):
            (inst.config_dir / "aliases").write_text("".join(f"{k}: {v}\n" for k, v in ALIASES6.items()))
            subprocess.run(["/usr/sbin/postalias", str(inst.config_dir / "aliases")], check=True,
                           capture_output=True, timeout=30)
        harness.start_side_by_side(ref, pw)
        for inst in (ref, pw):
            rcpts = [f"<{alias}@{harness.HOSTNAME}>" for alias in ALIASES6]
            rcpts.append("<{}> {}".format(*SUCCESS_RCPT.split()))
            for rcpt in rcpts:
                replies = harness.dialogue(inst.port, [
                    "EHLO c.test", "MAIL FROM:<alice@virtual.test>", f"RCPT TO:{rcpt}", "DATA",
                    "Subject: six", "", "body", ".", "QUIT"], timeout=10)
                assert [r.code for r in replies][:6] == [220, 250, 250, 250, 354, 250], replies
        wanted = {*ALIASES6, SUCCESS_RCPT.split("@")[0]}
        for inst in (ref, pw):
            def notices(inst=inst):
                got = {}
                for p in inst.maildir_messages("alice"):
                    raw = p.read_bytes()
                    msg = email.message_from_bytes(raw, policy=email.policy.compat32)
                    [block] = msg.get_payload()[1].get_payload()[1:]
                    rcpt = block["Final-Recipient"].split("; ")[1].split("@")[0]
                    got.setdefault(rcpt, []).append(
                        SimpleNamespace(raw=raw, msg=msg, block=dict(block.items())))
                return got
            try:
                # Wait for every recipient's notice, not for a count of files: a
                # message deferred once more under load adds a delay notice of its own.
                harness.wait_for(lambda: wanted <= set(notices()), 60, 0.1,
                                 f"{inst.kind}: a notice for each of {sorted(wanted)}")
            except TimeoutError:
                raise AssertionError(
                    f"{inst.kind}: notices for {sorted(notices())}, wanted {sorted(wanted)}; log:\n"
                    + "\n".join(l for l in inst.log_text().splitlines()
                                if "status=" in l or "warning" in l or "error" in l)) from None
            out[inst.kind] = notices()
    finally:
        harness.stop_side_by_side([ref, pw])
    return out


@pytest.fixture(scope="module")
def pair_notices(tmp_path_factory):
    if harness.reference_available() is not None:
        pytest.skip(str(harness.reference_available()))
    return _pair_notices(tmp_path_factory)


def _case(name):
    return pytest.param(name, id=name, marks=list(pytestmark_ref))


def _pair(notices, name):
    """The two MTAs' notices for one recipient, of the same kind (Action).  A message
    deferred once more under load may add a delay notice beside its failure notice."""
    wants, gots = notices["postfix"][name], notices["postwell"][name]
    return next(((w, g) for w in wants for g in gots
                 if w.block.get("Action") == g.block.get("Action")), (wants[0], gots[0]))


@pytest.mark.parametrize("name", [_case(n) for n in [*ALIASES6, "bob"]])
def test_command_notice_status_block_matches_reference(pair_notices, name):
    want, got = _pair(pair_notices, name)

    def undated(block):
        return {k: "DATE" if k == "Will-Retry-Until" else v for k, v in block.items()}
    assert undated(got.block) == undated(want.block)
    want_text = want.msg.get_payload()[0].get_payload()
    got_text = got.msg.get_payload()[0].get_payload()
    assert got_text == want_text


def _normalized(raw: bytes) -> str:
    """The notice as delivered, without what differs from run to run or by name:
    queue ids, dates, the MIME boundary's time stamp, mail_name."""
    text = raw.decode("utf-8", "replace")
    text = re.sub(r"\b[0-9A-F]{10,12}\b", "QID", text)
    text = re.sub(r"[A-Z][a-z]{2}, [ \d]\d [A-Z][a-z]{2} \d{4} \d\d:\d\d:\d\d [+-]\d{4} \(\w+\)",
                  "DATE", text)
    text = re.sub(r"\.\d{9,10}/", ".T/", text)
    text = re.sub(r"<\d{14}\.QID@", "<TS.QID@", text)
    return re.sub(r"\((Postfix|postwell)\)", "(NAME)", text)


@pytest.mark.parametrize("name", [pytest.param(n, id=n, marks=pytestmark_ref)
                                  for n in ("cnouser", "cquiet", "coutput", "ctempfail", "bob")])
def test_whole_notice_matches_reference(pair_notices, name):
    """Failure, delay and success notices, byte for byte but for ids, dates and names."""
    want, got = _pair(pair_notices, name)
    assert _normalized(got.raw) == _normalized(want.raw)


@pytest.mark.parametrize("name", [pytest.param("cnouser", marks=pytestmark_ref)])
def test_notice_received_and_return_path_match_reference(pair_notices, name):
    def shape(n):
        head = n.raw.split(b"\nDate: ", 1)[0].decode()
        head = head[head.index("Received: by "):]
        head = re.sub(r"\((Postfix|postwell)\)", "(NAME)", head)
        head = re.sub(r"id [0-9A-F]+; .*", "id QID; DATE", head)
        inner = n.msg.get_payload()[2].get_payload()[0]
        return head, inner.items()[0]
    want, got = _pair(pair_notices, name)
    assert shape(got) == shape(want) == ("Received: by mx.example.test (NAME)\n\tid QID; DATE",
                                         ("Return-Path", "<alice@virtual.test>"))
    # The Received date is the notice's Date.
    for n in (want, got):
        m = re.search(rb"\tid [0-9A-F]+; (.*)\nDate: (.*)\n", n.raw)
        assert m and m.group(1) == m.group(2)
