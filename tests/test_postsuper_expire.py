"""postsuper -e / -f (forced expiry, Postfix 3.5+) and the qmgr side of it.

Expected words and behaviour checked against Postfix 3.7 (postsuper -e/-f on
deferred and held mail, postqueue -p/-j afterwards, the qmgr's log and the
returned message):

    postsuper: ID: expired
    postsuper: ID: released from hold              (-f on a held message)
    postsuper: Force-expired: N messages
    postsuper: Released from hold: N messages      (-f)
    qmgr: ID: from=<S>, status=force-expired, returned to sender
    error: ID: to=<R>, relay=none, ..., dsn=4.7.0, status=deferred (message is administratively expired)
"""

from __future__ import annotations

import json
import os
import re
import stat
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from test_qmgr_notices import (T0, blocks, env, incoming_pass, lines, notices,  # noqa: E402,F401
                               queue, run)

from postwell.cli import postqueue, postsuper  # noqa: E402
from postwell.qmgr import expire  # noqa: E402
from postwell.queue import QueueStore  # noqa: E402


@pytest.fixture
def cli(tmp_path):
    qdir = tmp_path / "queue"
    etc = tmp_path / "etc"
    etc.mkdir()
    log = tmp_path / "maillog"
    (etc / "main.cf").write_text(f"queue_directory = {qdir}\nmaillog_file = {log}\n"
                                 "myhostname = mx.example.test\n")
    store = QueueStore(str(qdir))
    store.ensure_layout()
    return store, str(etc), log


def put(store, sender, rcpts, where="deferred"):
    m = store.create()
    m.set_sender(sender)
    for r in rcpts:
        m.add_recipient(r)
    m.write(b"Subject: t\n\nhello\n")
    m.commit()
    if where != "incoming":
        store.move(m.queue_id, "incoming", where)
    return m.queue_id


def marked(store, q, qid) -> bool:
    return bool(os.stat(store.path(q, qid)).st_mode & stat.S_IXGRP)


def postsuper_lines(log) -> list[str]:
    return [re.sub(r"^.*postfix/postsuper\[\d+\]: ", "", ln) for ln in log.read_text().splitlines()
            if "postfix/postsuper[" in ln]


# ------------------------------------------------------------------ postsuper

def test_expire_deferred_message(cli, capsys):
    store, etc, log = cli
    qid = put(store, "s@x.test", ["a@far.test"])
    store.set_next_attempt(qid, time.time() + 3600)
    assert postsuper.main(["-c", etc, "-e", qid]) == 0
    assert capsys.readouterr().err == (f"postsuper: {qid}: expired\n"
                                       "postsuper: Force-expired: 1 message\n")
    assert postsuper_lines(log) == [f"{qid}: expired", "Force-expired: 1 message"]
    # Handed to the qmgr now (postwell does not wait for the deferred run),
    # marked, and still a complete queue file.
    assert store.find(qid) == "incoming" and marked(store, "incoming", qid)
    assert store.scan("incoming") == [qid]
    with store.open(qid) as qm:
        assert expire.message_expired(qm)


def test_expire_again_counts_nothing(cli, capsys):
    store, etc, _ = cli
    qid = put(store, "s@x.test", ["a@far.test"], "hold")
    assert postsuper.main(["-c", etc, "-e", qid]) == 0
    capsys.readouterr()
    assert postsuper.main(["-c", etc, "-e", qid, "-e", "NOTANID!"]) == 0
    assert capsys.readouterr().err == ("postsuper: warning: invalid mail queue id: NOTANID!\n"
                                       "postsuper: Force-expired: 0 messages\n")


def test_expire_held_message_stays_held_until_f(cli, capsys):
    store, etc, log = cli
    held = put(store, "s@x.test", ["a@far.test"], "hold")
    other = put(store, "s@x.test", ["b@far.test"], "hold")
    assert postsuper.main(["-c", etc, "-e", held]) == 0
    assert capsys.readouterr().err == f"postsuper: {held}: expired\npostsuper: Force-expired: 1 message\n"
    assert store.find(held) == "hold" and marked(store, "hold", held)
    assert postsuper.main(["-c", etc, "-f", other]) == 0
    assert capsys.readouterr().err == (f"postsuper: {other}: expired\n"
                                       f"postsuper: {other}: released from hold\n"
                                       "postsuper: Force-expired: 1 message\n"
                                       "postsuper: Released from hold: 1 message\n")
    assert store.find(other) == "incoming" and marked(store, "incoming", other)
    # -f on an already expired held message only releases it.
    assert postsuper.main(["-c", etc, "-f", held]) == 0
    assert capsys.readouterr().err == (f"postsuper: {held}: released from hold\n"
                                       "postsuper: Force-expired: 0 messages\n"
                                       "postsuper: Released from hold: 1 message\n")
    assert postsuper_lines(log)[-3:] == [f"{held}: released from hold", "Force-expired: 0 messages",
                                         "Released from hold: 1 message"]


def test_expire_all_in_named_queue_and_from_stdin(cli, capsys, monkeypatch):
    import io
    store, etc, _ = cli
    d1 = put(store, "s@x.test", ["a@far.test"])
    d2 = put(store, "s@x.test", ["b@far.test"])
    h = put(store, "s@x.test", ["c@far.test"], "hold")
    assert postsuper.main(["-c", etc, "-e", "ALL", "deferred"]) == 0
    # ALL: totals only, as for the other operations.
    assert capsys.readouterr().err == "postsuper: Force-expired: 2 messages\n"
    assert {store.find(d1), store.find(d2)} == {"incoming"} and not marked(store, "hold", h)
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{h}\n"))
    assert postsuper.main(["-c", etc, "-e", "-"]) == 0
    assert capsys.readouterr().err == f"postsuper: {h}: expired\npostsuper: Force-expired: 1 message\n"


def test_expire_with_delete_prints_both_totals(cli, capsys):
    store, etc, _ = cli
    qid = put(store, "s@x.test", ["a@far.test"])
    assert postsuper.main(["-c", etc, "-e", "ALL", "-d", "ABCDE12345"]) == 0
    # Postfix's order: Deleted, then Force-expired.
    assert capsys.readouterr().err == ("postsuper: Deleted: 0 messages\n"
                                       "postsuper: Force-expired: 1 message\n")
    assert marked(store, "incoming", qid)


def test_expire_wakes_the_qmgr(cli, capsys):
    store, etc, _ = cli
    fifo = store.path("public", "qmgr")
    os.mkfifo(fifo, 0o622)
    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        qid = put(store, "s@x.test", ["a@far.test"])
        assert postsuper.main(["-c", etc, "-e", qid]) == 0
        assert os.read(fd, 16)
    finally:
        os.close(fd)


def test_postqueue_shows_the_mark(cli, capsys):
    store, etc, _ = cli
    held = put(store, "s@x.test", ["a@far.test"], "hold")
    active = put(store, "s@x.test", ["b@far.test"], "active")
    plain = put(store, "s@x.test", ["c@far.test"])
    assert postsuper.main(["-c", etc, "-e", held, "-e", active]) == 0
    capsys.readouterr()
    assert postqueue.main(["-c", etc, "-p"]) == 0
    out = capsys.readouterr().out.split("\n")
    # Postfix 3.7: "#" after the queue mark, the size still right-aligned after it.
    assert [ln for ln in out if ln.startswith(held)][0].startswith(f"{held}!#     ")
    assert [ln for ln in out if ln.startswith(active)][0].startswith(f"{active}*#     ")
    assert [ln for ln in out if ln.startswith(plain)][0].startswith(f"{plain}  ")
    assert postqueue.main(["-c", etc, "-j"]) == 0
    got = {m["queue_id"]: m["forced_expire"] for m in map(json.loads, capsys.readouterr().out.splitlines())}
    assert got == {held: True, active: True, plain: False}


def test_expire_mark_helpers(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(b"x")
    os.chmod(p, 0o700)
    assert not expire.path_expired(str(p))
    expire.mark_expired(str(p))
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o710 and expire.path_expired(str(p))
    expire.mark_expired(str(p))      # idempotent
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o710
    with pytest.raises(FileNotFoundError):
        expire.mark_expired(str(tmp_path / "gone"))
    assert not expire.path_expired(str(tmp_path / "gone"))


# ------------------------------------------------------------------ qmgr

def _expire_now(store, qid):
    q = store.find(qid)
    expire.mark_expired(store.path(q, qid))
    if q == "deferred":
        store.move(qid, "deferred", "incoming")


def test_deferred_message_returned_with_its_delay_reason(env):
    qid = queue(env.store, "s@x.test", ["t@tmp.test", "u@tmp.test"])
    qm = env.make()
    run(incoming_pass(qm))
    assert env.store.find(qid) == "deferred" and len(env.tmp.attempts) == 1
    env.clock.t = T0 + 60          # long before maximal_queue_lifetime
    _expire_now(env.store, qid)
    run(incoming_pass(qm))
    # No delivery attempt; returned at once, with the last deferral's reason.
    assert len(env.tmp.attempts) == 1
    assert env.store.find(qid) is None
    qlog = lines(env, "qmgr")
    assert f"{qid}: from=<s@x.test>, status=force-expired, returned to sender" in qlog
    assert qlog[-1] == f"{qid}: removed"
    # Postfix logs no new to= line for recipients that have a delay reason.
    assert not [ln for ln in lines(env, "error") + lines(env, "tmpfail") if "administratively" in ln]
    [n] = notices(env)
    assert n.sender == "" and n.rcpts == ["s@x.test"]
    assert n.msg["Subject"] == "Undelivered Mail Returned to Sender"
    recips = blocks(n.msg)[1:]
    assert [(b["Final-Recipient"], b["Action"], b["Status"]) for b in recips] == [
        ("rfc822; t@tmp.test", "failed", "4.2.0"), ("rfc822; u@tmp.test", "failed", "4.2.0")]
    assert recips[0]["Diagnostic-Code"] == "X-Postfix; mailbox busy (attempt 1)"
    assert [ln for ln in lines(env, "bounce") if "sender non-delivery notification" in ln] == [
        f"{qid}: sender non-delivery notification: {n.qid}"]


def test_never_tried_message_is_administratively_expired(env):
    qid = queue(env.store, "s@x.test", ["t@ok.test"])
    expire.mark_expired(env.store.path("incoming", qid))
    qm = env.make()
    run(incoming_pass(qm))
    assert env.store.find(qid) is None
    # Logged as the error agent's deferral, as Postfix does.
    [line] = [ln for ln in lines(env, "error") if ln.startswith(f"{qid}: to=<t@ok.test>")]
    assert line.startswith(f"{qid}: to=<t@ok.test>, relay=none, delay=")
    assert line.endswith(", dsn=4.7.0, status=deferred (message is administratively expired)")
    assert f"{qid}: from=<s@x.test>, status=force-expired, returned to sender" in lines(env, "qmgr")
    [n] = notices(env)
    b = blocks(n.msg)[1]
    assert (b["Action"], b["Status"]) == ("failed", "4.7.0")
    assert b["Diagnostic-Code"] == "X-Postfix; message is administratively expired"
    # Nothing was delivered.
    assert not [ln for ln in lines(env, "okay") if "status=sent" in ln]


def test_expired_bounce_message_is_not_bounced_again(env):
    """A force-expired notice (null sender) goes to the postmaster only if
    notify_classes asks (default: no): nothing is returned to <>."""
    qid = queue(env.store, "", ["t@tmp.test"])
    expire.mark_expired(env.store.path("incoming", qid))
    run(incoming_pass(env.make()))
    assert env.store.find(qid) is None
    assert f"{qid}: from=<>, status=force-expired, returned to sender" in lines(env, "qmgr")
    assert notices(env) == []


def test_deferred_scan_takes_an_expired_message_before_its_retry_time(env):
    qid = queue(env.store, "s@x.test", ["t@tmp.test"])
    qm = env.make()
    run(incoming_pass(qm))
    assert env.store.next_attempt(qid) > env.clock.t
    # Marked while it sat in deferred/ (e.g. it was active when postsuper ran).
    expire.mark_expired(env.store.path("deferred", qid))

    async def go():
        started = qm.scan_deferred()
        await qm.drain()
        return started
    assert run(go()) == [qid]
    assert env.store.find(qid) is None and len(env.tmp.attempts) == 1


# ------------------------------------------------------------------ end to end

def _e2e():
    from test_issue3_local_e2e import HOSTNAME, queued_id
    from test_issue3_tools_e2e import closed_port, relay_params, wait_deferred
    return HOSTNAME, queued_id, closed_port, relay_params, wait_deferred


if os.geteuid() == 0:
    from test_issue3_local_e2e import e2e_users, site  # noqa: E402,F401 (fixtures)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create real users")
def test_postsuper_e_returns_mail_through_running_instance(site, e2e_users):
    HOSTNAME, queued_id, closed_port, relay_params, wait_deferred = _e2e()
    s = site(relay_params(closed_port()))
    held = queued_id(s.smtp(["h@far.test"], sender=f"pwe2@{HOSTNAME}"))
    qid = queued_id(s.smtp(["z@far.test", "y@far.test"], sender=f"pwe1@{HOSTNAME}"))
    wait_deferred(s, qid)
    wait_deferred(s, held)
    assert s.inst.run("postsuper", "-h", held).returncode == 0
    cp = s.inst.run("postsuper", "-e", qid, "-f", held)
    assert cp.returncode == 0, cp.stderr
    assert cp.stderr == (f"postsuper: {qid}: expired\n"
                         f"postsuper: {held}: expired\n"
                         f"postsuper: {held}: released from hold\n"
                         "postsuper: Force-expired: 2 messages\n"
                         "postsuper: Released from hold: 1 message\n")
    # The retry time is an hour away: the sender still gets the bounce now.
    bounce = s.wait_mbox("pwe1").decode()
    assert "Subject: Undelivered Mail Returned to Sender" in bounce
    assert f"X-Postfix-Queue-ID: {qid}" in bounce
    assert "Final-Recipient: rfc822; z@far.test" in bounce and "Status: 4.4.1" in bounce
    assert "Connection refused" in bounce
    s.wait_log(rf"postfix/postsuper\[\d+\]: {qid}: expired$")
    s.wait_log(rf"postfix/postsuper\[\d+\]: Force-expired: 2 messages$")
    s.wait_log(rf"postfix/qmgr\[\d+\]: {qid}: from=<pwe1@{HOSTNAME}>, status=force-expired, "
               "returned to sender$")
    s.wait_log(rf"postfix/bounce\[\d+\]: {qid}: sender non-delivery notification: \w+$")
    s.wait_log(rf"postfix/qmgr\[\d+\]: {qid}: removed$")
    # The held one was released and returned too.
    other = s.wait_mbox("pwe2").decode()
    assert f"X-Postfix-Queue-ID: {held}" in other
    s.wait_log(rf"postfix/qmgr\[\d+\]: {held}: from=<pwe2@{HOSTNAME}>, status=force-expired, "
               "returned to sender$")
    assert QueueStore(str(s.inst.queue_dir)).find(qid) is None


def test_expired_during_an_attempt_is_returned_after_it(env):
    """postsuper -e on an active message: the attempt in flight finishes, and
    what it left undelivered is returned at once instead of being deferred."""
    from postwell.delivery.base import DeliveryAgent, RecipientResult

    qid = queue(env.store, "s@x.test", ["t@slow.test"])

    class MarkingAgent(DeliveryAgent):
        def __init__(self):
            pass

        async def deliver(self, req):
            expire.mark_expired(env.store.path("active", req.queue_id))
            return [RecipientResult.deferred(r, "try later", "none", "4.4.2") for r in req.recipients]
    qm = env.make()
    qm._agents["tmpfail"] = MarkingAgent()

    class R:
        def resolve(self, address):
            from types import SimpleNamespace
            return SimpleNamespace(address_class="virtual", transport="tmpfail", nexthop="slow.test",
                                   recipient=address)
    qm.resolver = R()
    run(incoming_pass(qm))
    assert env.store.find(qid) is None
    assert f"{qid}: from=<s@x.test>, status=force-expired, returned to sender" in lines(env, "qmgr")
    [n] = notices(env)
    b = blocks(n.msg)[1]
    assert (b["Status"], b["Diagnostic-Code"]) == ("4.4.2", "X-Postfix; try later")


def test_mixed_operations_in_postfix_order(cli, capsys):
    """Postfix 3.7: postsuper -r A -e B -h C -H D prints requeued, expired,
    placed on hold, released from hold, then the totals in the same order;
    -f on a message that is not held still prints the (zero) release total."""
    store, etc, _ = cli
    a, b, c = (put(store, "s@x.test", [f"{n}@far.test"]) for n in "abc")
    d = put(store, "s@x.test", ["d@far.test"], "hold")
    assert postsuper.main(["-c", etc, "-r", a, "-e", b, "-h", c, "-H", d]) == 0
    assert capsys.readouterr().err == (
        f"postsuper: {a}: requeued\n"
        f"postsuper: {b}: expired\n"
        f"postsuper: {c}: placed on hold\n"
        f"postsuper: {d}: released from hold\n"
        "postsuper: Requeued: 1 message\n"
        "postsuper: Force-expired: 1 message\n"
        "postsuper: Placed on hold: 1 message\n"
        "postsuper: Released from hold: 1 message\n")
    # (-r sent a to maildrop/ for pickup, as Postfix's requeue does: a new message.)
    assert os.path.exists(store.path("maildrop", a))
    e = put(store, "s@x.test", ["e@far.test"])
    assert postsuper.main(["-c", etc, "-f", e]) == 0
    assert capsys.readouterr().err == (f"postsuper: {e}: expired\n"
                                       "postsuper: Force-expired: 1 message\n"
                                       "postsuper: Released from hold: 0 messages\n")
    # Not in the named queue: nothing happens.
    assert postsuper.main(["-c", etc, "-e", c, "incoming"]) == 0
    assert capsys.readouterr().err == "postsuper: Force-expired: 0 messages\n"
    assert not marked(store, "hold", c)
