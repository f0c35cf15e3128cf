"""virtual(8) delivery agent: Maildir, mbox, limits, lookups."""

import asyncio
import os
import pathlib
import re
import socket
import shutil
import stat
import tempfile
import time

import pytest

from postwell.config.main import Config
from postwell.delivery.base import DeliveryRequest, Recipient
from postwell.delivery.virtual import VirtualAgent
from postwell.log import NullLog

MSG = b"Subject: hi\nFrom: a@x.test\n\nline one\nFrom the start\n>From quoted\nlast"


UID = os.getuid() if os.getuid() >= 100 else 65534
GID = os.getgid() if os.getuid() >= 100 else 65534


@pytest.fixture
def tmp_path():
    # The mailbox owner (nobody when the tests run as root) must reach the files.
    d = tempfile.mkdtemp(prefix="pw-virtual-")
    os.chmod(d, 0o755)
    os.mkdir(os.path.join(d, "mail"), 0o755)
    if os.getuid() == 0:
        os.chown(os.path.join(d, "mail"), UID, GID)
    yield pathlib.Path(d)
    shutil.rmtree(d, ignore_errors=True)


def make_agent(tmp_path, **extra):
    params = {
        "myhostname": "mx.demo.test",
        "virtual_mailbox_base": str(tmp_path / "mail"),
        "virtual_mailbox_maps": "inline:{alice@demo.test=demo.test/alice/, bob@demo.test=demo.test/bob, @catch.test=catch/}",
        "virtual_uid_maps": f"static:{UID}",
        "virtual_gid_maps": f"static:{GID}",
    }
    params.update(extra)
    cfg = Config(str(tmp_path), params, {}, [])
    return VirtualAgent(cfg, NullLog("virtual"))


def request(rcpts, content=MSG, sender="sender@x.test"):
    return DeliveryRequest(queue_id="ABCDE1", sender=sender, recipients=[Recipient(r) for r in rcpts],
                           transport="virtual", nexthop="demo.test", arrival_time=0.0,
                           open_content=lambda: iter([content[:7], content[7:]]), content_size=len(content))


def run(agent, req):
    return asyncio.run(agent.deliver(req))


def test_maildir_delivery(tmp_path):
    agent = make_agent(tmp_path)
    [res] = run(agent, request(["alice@demo.test"]))
    assert (res.status, res.dsn, res.reason, res.relay) == ("sent", "2.0.0", "delivered to maildir", "virtual")
    md = tmp_path / "mail" / "demo.test" / "alice"
    assert sorted(os.listdir(md)) == ["cur", "new", "tmp"]
    assert os.listdir(md / "tmp") == []
    [name] = os.listdir(md / "new")
    assert re.fullmatch(r"\d+\.V[0-9a-f]+I[0-9a-f]+M\d+\." + re.escape(socket.gethostname()), name)
    path = md / "new" / name
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    data = path.read_bytes()
    assert data.startswith(b"Return-Path: <sender@x.test>\nX-Original-To: alice@demo.test\n"
                           b"Delivered-To: alice@demo.test\nSubject: hi\n")
    assert b"\nFrom the start\n" in data           # no quoting in Maildir
    assert data.endswith(b">From quoted\nlast")


def test_two_maildir_deliveries_unique_names(tmp_path):
    agent = make_agent(tmp_path)
    run(agent, request(["alice@demo.test"]))
    run(agent, request(["alice@demo.test"]))
    assert len(os.listdir(tmp_path / "mail" / "demo.test" / "alice" / "new")) == 2


def test_mbox_delivery_quoting_and_append(tmp_path):
    agent = make_agent(tmp_path)
    run(agent, request(["bob@demo.test"]))
    [res] = run(agent, request(["bob@demo.test"], sender=""))
    assert res.reason == "delivered to mailbox"
    data = (tmp_path / "mail" / "demo.test" / "bob").read_bytes()
    msgs = data.split(b"\nFrom ")
    assert data.startswith(b"From sender@x.test  ")
    assert len(msgs) == 2 and msgs[1].startswith(b"MAILER-DAEMON  ")
    assert b"\n>From the start\n" in data and b"\n>>From quoted\n" not in data
    assert b"\nlast\n\n" in data                      # message end + blank separator line
    assert b"Return-Path: <>\n" in data
    assert not os.path.exists(str(tmp_path / "mail" / "demo.test" / "bob.lock"))


def test_catch_all_and_unknown_user(tmp_path):
    agent = make_agent(tmp_path)
    r1, r2 = run(agent, request(["any@catch.test", "nobody@demo.test"]))
    assert r1.status == "sent"
    assert (r2.status, r2.dsn, r2.reason) == ("bounced", "5.1.1", 'unknown user: "nobody@demo.test"')


def test_maildir_limit_bounces(tmp_path):
    agent = make_agent(tmp_path, virtual_mailbox_limit="100", message_size_limit="50")
    [res] = run(agent, request(["alice@demo.test"], content=b"Subject: x\n\n" + b"y" * 200 + b"\n"))
    assert (res.status, res.dsn) == ("bounced", "5.2.2")
    assert res.reason == "maildir delivery failed: error writing message: File too large"
    md = tmp_path / "mail" / "demo.test" / "alice"
    assert os.listdir(md / "new") == [] and os.listdir(md / "tmp") == []


def test_mbox_limit_keeps_old_content(tmp_path):
    agent = make_agent(tmp_path, virtual_mailbox_limit="400", message_size_limit="50")
    run(agent, request(["bob@demo.test"]))
    before = (tmp_path / "mail" / "demo.test" / "bob").read_bytes()
    [res] = run(agent, request(["bob@demo.test"], content=b"Subject: x\n\n" + b"y" * 300 + b"\n"))
    assert (res.status, res.dsn) == ("bounced", "5.2.2")
    assert res.reason.startswith("cannot update mailbox ") and res.reason.endswith(
        "for user bob@demo.test. error writing message: File too large")
    assert (tmp_path / "mail" / "demo.test" / "bob").read_bytes() == before


def test_low_uid_defers(tmp_path):
    agent = make_agent(tmp_path, virtual_uid_maps="static:5")
    [res] = run(agent, request(["alice@demo.test"]))
    assert (res.status, res.dsn, res.reason) == ("deferred", "4.3.0", "mail system configuration error")
    assert any("bad uid 5" in l for l in agent.log.lines)


def test_orig_recipient_header(tmp_path):
    agent = make_agent(tmp_path)
    req = request([])
    req.recipients = [Recipient("alice@demo.test", orig="info@demo.test")]
    run(agent, req)
    md = tmp_path / "mail" / "demo.test" / "alice" / "new"
    data = (md / os.listdir(md)[0]).read_bytes()
    assert b"X-Original-To: info@demo.test\nDelivered-To: alice@demo.test\n" in data


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch uid")
def test_root_delivers_as_mailbox_owner(tmp_path):
    base = tmp_path / "mail"
    agent = make_agent(tmp_path, virtual_uid_maps="static:65534", virtual_gid_maps="static:65534")
    [res] = run(agent, request(["alice@demo.test"]))
    assert res.status == "sent", res.reason
    md = base / "demo.test" / "alice" / "new"
    st = os.stat(md / os.listdir(md)[0])
    assert (st.st_uid, st.st_gid) == (65534, 65534)


def test_delivered_to_loop_bounces(tmp_path):
    agent = make_agent(tmp_path)
    content = b"Delivered-To: Alice@demo.test\nSubject: loop\n\nbody\n"
    [res] = run(agent, request(["alice@demo.test"], content=content))
    assert (res.status, res.dsn, res.reason) == ("bounced", "5.4.6", "mail forwarding loop for alice@demo.test")


def test_limit_below_message_size_limit_refuses(tmp_path):
    with pytest.raises(ValueError, match="virtual_mailbox_limit is smaller than message_size_limit"):
        make_agent(tmp_path, virtual_mailbox_limit="1000")


def test_mbox_stale_dotlock_is_broken(tmp_path):
    agent = make_agent(tmp_path)
    d = tmp_path / "mail" / "demo.test"
    d.mkdir(parents=True)
    if os.getuid() == 0:
        os.chown(d, UID, GID)
    lock = d / "bob.lock"
    lock.write_text("")
    old = time.time() - 1000
    os.utime(lock, (old, old))
    [res] = run(agent, request(["bob@demo.test"]))
    assert res.status == "sent", res.reason
    assert not lock.exists()


def test_mbox_refuses_symlink(tmp_path):
    agent = make_agent(tmp_path)
    d = tmp_path / "mail" / "demo.test"
    d.mkdir(parents=True)
    target = tmp_path / "elsewhere"
    target.write_text("")
    os.symlink(target, d / "bob")
    if os.getuid() == 0:
        os.chown(d, UID, GID)
        os.lchown(d / "bob", UID, GID)
    [res] = run(agent, request(["bob@demo.test"]))
    assert res.status == "deferred"
    assert target.read_text() == ""
