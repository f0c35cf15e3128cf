"""local(8) DSN parity for aliases, lists and .forward (Postfix local/alias.c,
dotforward.c, forward.c; RFC 3461 5.2.7).

* An alias or .forward passes NOTIFY on without SUCCESS (SUCCESS alone becomes
  NEVER) and keeps ORCPT; a mailing list (owner- alias) drops ORCPT and the
  original recipient.  A forwarded copy's envelope carries what is left; the
  message's ENVID and RET stay (Postfix 3.7 keeps them for a list's copy too).
* For a NOTIFY=SUCCESS recipient the top-level alias or .forward itself is
  reported, "alias expanded" (action expanded, or delivered for a list), as an
  unlogged part; its members and the "forwarded as" line are not reported.

No system users are needed: the destinations are remote (forwarded) or the
.forward lookup is a stand-in.  The qmgr side of the unlogged part is a
stand-in too (``settle`` below), following the contract the report describes.
"""

from __future__ import annotations

import asyncio
import pwd
import shutil
import tempfile
from pathlib import Path

import pytest

from postwell.cleanup import Cleanup
from postwell.config.main import Config
from postwell.delivery import local as local_mod
from postwell.delivery.base import DeliveryRequest, Recipient
from postwell.delivery.local import (
    TRACE, Expansion, Leaf, LocalAgent, dsn_for_leaves, strip_success, wants_success,
)
from postwell.dsn.submit import wants
from postwell.log import NullLog
from postwell.queue import QueueStore
from postwell.tables.aliases import build_aliases

HOST = "mx.example.test"
MSG = b"From: a@remote.test\nSubject: dsn\n\nbody\n"
ALIASES = (
    "team: a@far.test, b@far.test\n"
    "list: c@far.test, d@far.test\n"
    "owner-list: admin@far.test\n"
    "outer: team, e@far.test\n"
    "biglist: list, f@far.test\n"
    "owner-biglist: admin@far.test\n"
    "comma: ,\n"
    'quotedempty: ""\n'
    "incl-empty: :include:/nonexistent-pw/empty.list\n"
)


class Env:
    def __init__(self, root: Path):
        self.root = root
        self.queue = root / "queue"
        alias_file = root / "aliases"
        alias_file.write_text(ALIASES)
        build_aliases("hash", str(alias_file))
        params = {"myhostname": HOST, "mydomain": "example.test",
                  "mydestination": f"{HOST}, localhost", "alias_maps": f"hash:{alias_file}",
                  "mail_spool_directory": str(root / "spool"), "queue_directory": str(self.queue),
                  "recipient_delimiter": "+"}
        self.cfg = Config(str(root), params, {}, [])
        self.store = QueueStore(str(self.queue))
        self.store.ensure_layout()
        self.agent = LocalAgent(self.cfg, NullLog("local"), store=self.store, helper_socket="")

    def deliver(self, rcpts: list[Recipient], attributes=None, sender="s@remote.test"):
        cleanup = Cleanup(self.cfg, self.store, NullLog("cleanup"))
        cs = cleanup.open(rewrite_local=False)
        cs.set_sender(sender)
        for r in rcpts:
            cs.add_recipient(r.address, orcpt=r.orcpt, notify=r.notify)
        cs.write(MSG)
        assert asyncio.run(cs.finish()).code == 250
        qid = cs.queue_id
        qm = self.store.open(qid)
        try:
            req = DeliveryRequest(queue_id=qid, sender=sender, recipients=rcpts, transport="local",
                                  nexthop=HOST, arrival_time=qm.arrival_time,
                                  open_content=lambda: qm.iter_content(),
                                  content_size=qm.content_size, attributes=dict(attributes or {}))
            return qid, asyncio.run(asyncio.wait_for(self.agent.deliver(req), 30))
        finally:
            qm.close()

    def copy(self, exclude):
        """The one forwarded copy: (queue file, its recipients)."""
        new = [q for q in self.store.scan("incoming") if q not in exclude]
        assert len(new) == 1, new
        qm = self.store.open(new[0], "incoming")
        try:
            return qm, list(qm.recipients)
        finally:
            qm.close()


@pytest.fixture
def env():
    root = Path(tempfile.mkdtemp(prefix="pw-ldsn6-"))
    try:
        yield Env(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def rcpt(name: str, notify=None, orcpt=None) -> Recipient:
    addr = f"{name}@{HOST}"
    return Recipient(addr, orig=addr, orcpt=orcpt, notify=notify)


def settle(top: Recipient, res):
    """What the qmgr makes of one result: (log lines, success entries), as
    manager.py settle() with the hook: every part is logged unless
    ``logged`` is False; a sent part is a success entry when the queue
    recipient asked for SUCCESS and the part's dsn_action is not None."""
    lines, entries = [], []
    for part in getattr(res, "expanded", None) or [res]:
        if getattr(part, "logged", True):
            lines.append((part.recipient.address, part.status, part.reason))
        action = getattr(part, "dsn_action", "delivered")
        if part.status == "sent" and action and wants(top.notify, "SUCCESS"):
            entries.append((part.recipient.address, part.recipient.orig, action, part.reason))
    return lines, entries


# ------------------------------------------------------------------ NOTIFY arithmetic

@pytest.mark.parametrize("given,passed", [
    (None, None), ("", ""), ("SUCCESS", "NEVER"), ("SUCCESS,FAILURE", "FAILURE"),
    ("FAILURE,SUCCESS,DELAY", "FAILURE,DELAY"), ("success", "NEVER"), ("NEVER", "NEVER"),
    ("FAILURE", "FAILURE"), ("DELAY", "DELAY"),
])
def test_strip_success(given, passed):
    assert strip_success(given) == passed


def test_wants_success():
    assert wants_success("SUCCESS") and wants_success("failure, success")
    assert not wants_success(None) and not wants_success("FAILURE,DELAY")
    assert not wants_success("NEVER")


# ------------------------------------------------------------------ wire format

def test_leaf_json_keeps_seven_items_unless_dsn_fields_are_set():
    plain = Leaf("a@x", "a@x", "sent", "2.0.0", "delivered to mailbox")
    assert len(plain.to_json()) == 7
    assert Leaf.from_json(plain.to_json()) == plain
    below = Leaf("a@x", "", "pending", "4.3.0", "forward pending", "owner-l@x", "l@x", via="list")
    assert len(below.to_json()) == 8 and Leaf.from_json(below.to_json()) == below
    traced = Leaf("m@y", "", "sent", "2.0.0", "forwarded as X", via="list",
                  trace=["delivered", "l@x", "l@x"])
    assert Leaf.from_json(traced.to_json()) == traced
    # An older helper's seven items still read.
    assert Leaf.from_json(["a@x", "a@x", "sent", "2.0.0", "r", None, None]).via is None


def test_dsn_for_leaves_per_position():
    def leaves():
        return [Leaf("u@x", "t@x", "sent", "2.0.0", "delivered to mailbox"),
                Leaf("m@x", "t@x", "sent", "2.0.0", "delivered to mailbox", via="alias",
                     trace=["expanded", "t@x", "t@x"]),
                Leaf("n@y", "", "pending", "4.3.0", "forward pending", "owner-t@x", "t@x",
                     via="list"),
                Leaf("t@x", "t@x", TRACE, "2.0.0", "alias expanded", trace=["expanded", "t@x", "t@x"])]
    rc = Recipient("t@x", orig="t@x", orcpt="rfc822;Who@else.test", notify="SUCCESS,FAILURE")
    out = dsn_for_leaves(rc, leaves())
    assert [(l.notify, l.orcpt) for l in out] == [
        ("SUCCESS,FAILURE", "rfc822;Who@else.test"), ("FAILURE", "rfc822;Who@else.test"),
        ("FAILURE", None), ("SUCCESS,FAILURE", "rfc822;Who@else.test")]
    assert [l.trace is not None for l in out] == [False, True, False, True]
    # No SUCCESS asked for: no "alias expanded" report, the leaf of its own goes.
    for notify in (None, "FAILURE", "NEVER"):
        left = dsn_for_leaves(Recipient("t@x", notify=notify), leaves())
        assert [(l.address, l.trace) for l in left] == [("u@x", None), ("m@x", None), ("n@y", None)]


# ------------------------------------------------------------------ expansion

def expansion(env) -> Expansion:
    req = DeliveryRequest(queue_id="ABC", sender="s@remote.test", recipients=[], transport="local",
                          nexthop=HOST, arrival_time=0.0, open_content=lambda: iter([MSG]))
    return Expansion(env.agent, req, set())


def traces(leaves):
    return [l.trace for l in leaves if l.trace]


def test_alias_reports_itself_once_and_marks_members(env):
    leaves = expansion(env).run(rcpt("outer"))
    # Only the top-level alias: "team" inside "outer" is a member, already without SUCCESS;
    # the report rides on the last leaf, no leaf is added.
    assert traces(leaves) == [["expanded", f"outer@{HOST}", f"outer@{HOST}"]]
    assert leaves[-1].trace and all(l.status == "pending" for l in leaves)
    assert {l.address for l in leaves} == {"a@far.test", "b@far.test", "e@far.test"}
    assert all(l.via == "alias" for l in leaves)


def test_list_reports_delivered_and_resets_orcpt(env):
    leaves = expansion(env).run(rcpt("biglist"))
    assert traces(leaves) == [["delivered", f"biglist@{HOST}", f"biglist@{HOST}"]]
    # "list" inside "biglist": still a list (ORCPT stays dropped), its own owner as sender.
    assert {(l.address, l.via, l.orig) for l in leaves} == {
        ("c@far.test", "list", ""), ("d@far.test", "list", ""), ("f@far.test", "list", "")}
    assert {l.forward_sender for l in leaves} == {f"owner-list@{HOST}", f"owner-biglist@{HOST}"}


def test_alias_that_leaves_nothing_still_reports(env, monkeypatch):
    # An :include: file without addresses (a stand-in read): Postfix counts the
    # alias expanded all the same.
    e = expansion(env)
    monkeypatch.setattr(e, "_call", lambda ident, func, *a: {"text": "# nobody yet\n", "owner": 0})
    leaves = e.run(rcpt("incl-empty"))
    assert [(l.address, l.status, l.trace) for l in leaves] == [
        (f"incl-empty@{HOST}", TRACE, ["expanded", f"incl-empty@{HOST}", f"incl-empty@{HOST}"])]


def fake_forward(monkeypatch, env, text: str, defer: bool = False):
    """A user 'fwdu' whose .forward holds ``text`` (no system user needed)."""
    pw = pwd.struct_passwd(("fwdu", "x", 54321, 54321, "", "/nonexistent-fwdu", "/bin/sh"))
    real = pwd.getpwnam
    monkeypatch.setattr(local_mod.pwd, "getpwnam",
                        lambda name: pw if name == "fwdu" else real(name))
    monkeypatch.setattr(Expansion, "_mailbox_next", lambda self, *a: None)

    def call(self, ident, func, *args):
        assert func is local_mod.op_forward_lookup
        return {"path": "/nonexistent-fwdu/.forward", "text": text}
    monkeypatch.setattr(Expansion, "_call", call)
    if defer:
        def forward(self, b, target):
            self.leaf(b.child(address=target), "4.4.1", "stand-in deferral")
        monkeypatch.setattr(Expansion, "forward", forward)


def test_dotforward_reports_expanded(env, monkeypatch):
    fake_forward(monkeypatch, env, "x@far.test, y@far.test\n")
    leaves = expansion(env).run(rcpt("fwdu"))
    assert traces(leaves) == [["expanded", f"fwdu@{HOST}", f"fwdu@{HOST}"]]
    assert {(l.address, l.via) for l in leaves} == {("x@far.test", "alias"), ("y@far.test", "alias")}


def test_dotforward_with_a_deferral_is_not_reported(env, monkeypatch):
    # dotforward.c: the "alias expanded" trace only when nothing was deferred.
    fake_forward(monkeypatch, env, "x@far.test\n", defer=True)
    leaves = expansion(env).run(rcpt("fwdu"))
    assert [(l.status, l.trace) for l in leaves] == [("deferred", None)]


def test_alias_listing_nobody_defers(env):
    # "comma: ," (postalias takes it): Postfix warns and defers, never drops the mail.
    leaves = expansion(env).run(rcpt("comma", notify="SUCCESS"))
    assert [(l.address, l.status, l.dsn, l.reason, l.trace) for l in leaves] == [
        (f"comma@{HOST}", "deferred", "4.3.0", "alias database unavailable", None)]
    assert any("no recipient in alias lookup result for comma" in l for l in env.agent.log.lines)


def test_quoted_empty_destination_is_the_null_address(env):
    # "" resolves to MAILER-DAEMON, whose missing alias means: discarded (Postfix 3.7).
    leaves = expansion(env).run(rcpt("quotedempty"))
    assert [(l.address, l.orig, l.status, l.reason) for l in leaves] == [
        (f"MAILER-DAEMON@{HOST}", f"quotedempty@{HOST}", "sent", "discarded")]


# ------------------------------------------------------------------ the forwarded copy

def test_forwarded_copy_carries_notify_without_success_and_orcpt(env):
    top = rcpt("team", notify="SUCCESS,FAILURE", orcpt="rfc822;Who@else.test")
    qid, _ = env.deliver([top], attributes={"envid": "env-1", "ret": "HDRS"})
    qm, rcpts = env.copy({qid})
    assert {(r.address, r.notify, r.orcpt, r.orig) for r in rcpts} == {
        ("a@far.test", "FAILURE", "rfc822;Who@else.test", f"team@{HOST}"),
        ("b@far.test", "FAILURE", "rfc822;Who@else.test", f"team@{HOST}")}
    assert (qm.envid, qm.ret) == ("env-1", "HDRS")


def test_forwarded_list_copy_success_only_becomes_never(env):
    # The case behind the parity sweep's list_notify_success: Postfix sends no
    # bounce for a member of a list when the sender asked for SUCCESS only.
    top = rcpt("list", notify="SUCCESS")
    qid, _ = env.deliver([top], attributes={"envid": "env-2", "ret": "FULL"})
    qm, rcpts = env.copy({qid})
    assert qm.sender == f"owner-list@{HOST}"
    # No ORCPT reaches cleanup below a list; Postfix's cleanup then records
    # "rfc822;" + the member's address (postcat -e, checked side by side).
    assert {(r.address, r.notify, r.orcpt or None, r.orig or "") for r in rcpts} == {
        ("c@far.test", "NEVER", "rfc822;c@far.test", ""),
        ("d@far.test", "NEVER", "rfc822;d@far.test", "")}
    # Postfix 3.7 keeps ENVID and RET for the list's copy (checked side by side).
    assert (qm.envid, qm.ret) == ("env-2", "FULL")


def test_forwarded_copy_without_notify_has_none(env):
    qid, _ = env.deliver([rcpt("team")])
    _, rcpts = env.copy({qid})
    assert {r.notify or None for r in rcpts} == {None}


# ------------------------------------------------------------------ what the qmgr gets

def test_success_reports_the_alias_not_the_forward(env):
    top = rcpt("team", notify="SUCCESS")
    _, (res,) = env.deliver([top])
    lines, entries = settle(top, res)
    assert len(lines) == 1 and lines[0][0] == top.address
    assert lines[0][2].startswith("forwarded as ")
    assert entries == [(top.address, top.orig, "expanded", "alias expanded")]


def test_success_for_a_list_is_delivered(env):
    top = rcpt("list", notify="SUCCESS,FAILURE")
    _, (res,) = env.deliver([top])
    _, entries = settle(top, res)
    assert entries == [(top.address, top.orig, "delivered", "alias expanded")]


def test_no_success_asked_no_unlogged_part(env):
    top = rcpt("team", notify="FAILURE")
    _, (res,) = env.deliver([top])
    assert all(getattr(p, "logged", True) for p in res.expanded)
    assert settle(top, res)[1] == []


def test_in_run_members_are_not_reported(env):
    """Members delivered in the same run (here: stand-in mailbox deliveries)
    lose their success report; the alias has it."""
    class Stub(LocalAgent):
        def expand_request(self, request):
            top = request.recipients[0]
            return [[Leaf("m1@x", top.address, "sent", "2.0.0", "delivered to mailbox", via="alias"),
                     Leaf("m2@x", top.address, "bounced", "5.1.1", "unknown user", via="alias",
                          trace=["expanded", top.address, top.address])]]
    agent = Stub(env.cfg, NullLog("local"), store=env.store, helper_socket="")
    top = rcpt("team", notify="SUCCESS,FAILURE")
    req = DeliveryRequest(queue_id="ABC", sender="s@x", recipients=[top], transport="local",
                          nexthop=HOST, arrival_time=0.0, open_content=lambda: iter([MSG]))
    (res,) = asyncio.run(asyncio.wait_for(agent.deliver(req), 30))
    lines, entries = settle(top, res)
    assert [l[0] for l in lines] == ["m1@x", "m2@x"]
    assert entries == [(top.address, top.orig, "expanded", "alias expanded")]
    assert res.status == "bounced"
