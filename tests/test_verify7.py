"""verify(8) probes, seventh sweep: what Postfix 3.7 does that postwell did not.

* local(8) answers a probe for a user with a forward_path file "forward via file:
  PATH" (dotforward.c: a verify-only request is not expanded), before looking at the
  mailbox;
* probes of verify(8) (not sendmail -bv) are routed in trivial-rewrite's verify
  context: address_verify_relayhost, address_verify_transport_maps,
  address_verify_{default,local,virtual,relay}_transport and
  address_verify_sender_dependent_relayhost_maps stand in for the usual parameters;
* content filters are bypassed for probes of either kind (qmgr_message_resolve());
* sendmail -bv (a user probe) has local(8) expand aliases and .forward files and
  report each destination ("forwards to", "delivers to mailbox/command/file").

The side-by-side tests run the same recipe against a reference Postfix and postwell
and compare the RCPT replies and the probes' delivery log lines.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import re
import shutil
from types import SimpleNamespace

import pytest

import harness
from harness import dialogue, start_side_by_side, wait_for
from postwell.config.main import Config
from postwell.delivery.base import DeliveryRequest, Recipient
from postwell.delivery.local import LocalAgent
from postwell.log import NullLog
from postwell.qmgr.manager import QueueManager
from postwell.queue import QueueStore
from postwell.verify import MTA_PROBE, USER_PROBE, VERIFY_ATTRIBUTE
from postwell.verify.probe import PROBE_ROUTING, local_probe, probe_routing
from test_verify import RcptSink

HOST = "mx.example.test"


# ---------------------------------------------------------------- local(8) probes, unit level

def _probe_request(*addresses):
    return DeliveryRequest(queue_id="QID", sender="double-bounce@example.test",
                           recipients=[Recipient(a) for a in addresses], transport="local",
                           nexthop=HOST, arrival_time=0.0, open_content=lambda: iter([]),
                           content_size=0, attributes={VERIFY_ATTRIBUTE: MTA_PROBE})


@pytest.fixture
def me(tmp_path, monkeypatch):
    """A passwd entry "pwv7me" for the caller's own uid whose home is tmp_path."""
    home = tmp_path / "home"
    home.mkdir()
    entry = SimpleNamespace(pw_name="pwv7me", pw_uid=os.getuid(), pw_gid=os.getgid(),
                            pw_dir=str(home), pw_shell="/bin/sh")
    real = pwd.getpwnam

    def getpwnam(name):
        return entry if name == "pwv7me" else real(name)
    monkeypatch.setattr(pwd, "getpwnam", getpwnam)
    return entry


def _local(tmp_path, **params):
    p = {"myhostname": HOST, "mydestination": HOST, "alias_maps": "",
         "queue_directory": str(tmp_path / "q"), "recipient_delimiter": "+"}
    p.update(params)
    return LocalAgent(Config(str(tmp_path), p, {}, []), log=NullLog("local"))


def _answers(agent, *addresses):
    return [(r.status, r.dsn, r.reason) for r in local_probe(agent, _probe_request(*addresses))]


def test_probe_names_the_forward_file(tmp_path, me):
    agent = _local(tmp_path)
    assert _answers(agent, f"pwv7me@{HOST}") == [("sent", "2.0.0", "delivers to mailbox")]
    forward = os.path.join(me.pw_dir, ".forward")
    with open(forward, "w") as f:
        f.write("elsewhere@remote.test\n")
    # Not read: an empty, or a world-writable, file is named all the same (lstat only).
    assert _answers(agent, f"pwv7me@{HOST}") == [("sent", "2.0.0", f"forward via file: {forward}")]
    os.chmod(forward, 0o666)
    assert _answers(agent, f"pwv7me@{HOST}")[0][2] == f"forward via file: {forward}"


def test_probe_forward_path_with_extension(tmp_path, me):
    agent = _local(tmp_path)
    plain = os.path.join(me.pw_dir, ".forward")
    ext = os.path.join(me.pw_dir, ".forward+lists")
    open(plain, "w").close()
    open(ext, "w").close()
    # forward_path = $home/.forward${recipient_delimiter}${extension}, $home/.forward
    assert _answers(agent, f"pwv7me+lists@{HOST}", f"pwv7me+other@{HOST}", f"pwv7me@{HOST}") == [
        ("sent", "2.0.0", f"forward via file: {ext}"),
        ("sent", "2.0.0", f"forward via file: {plain}"),
        ("sent", "2.0.0", f"forward via file: {plain}")]
    # An empty forward_path turns .forward files off.
    assert _answers(_local(tmp_path, forward_path=""), f"pwv7me@{HOST}")[0][2] == \
        "delivers to mailbox"


def test_probe_alias_wins_over_forward(tmp_path, me):
    open(os.path.join(me.pw_dir, ".forward"), "w").close()
    agent = _local(tmp_path, alias_maps="inline:{pwv7me=root}")
    assert _answers(agent, f"pwv7me@{HOST}") == [("sent", "2.0.0", "aliased to root")]
    agent = _local(tmp_path)
    assert _answers(agent, f"nosuchuser7@{HOST}") == [
        ("bounced", "5.1.1", 'unknown user: "nosuchuser7"')]


# ---------------------------------------------------------------- probe routing, unit level

def _cfg(tmp_path, **params):
    p = {"myhostname": HOST, "mydestination": HOST, "queue_directory": str(tmp_path / "q"),
         "relay_domains": "relay.test", "virtual_mailbox_domains": "virtual.test"}
    p.update(params)
    return Config(str(tmp_path), p, {}, [])


def test_probe_routing_lists_only_what_differs(tmp_path):
    assert probe_routing(_cfg(tmp_path)) == {}
    assert probe_routing(_cfg(tmp_path, relayhost="[192.0.2.1]")) == {}
    cfg = _cfg(tmp_path, relayhost="[192.0.2.1]", address_verify_relayhost="[192.0.2.9]:$port",
               port="2525", address_verify_default_transport="error:no probes")
    assert probe_routing(cfg) == {"relayhost": "[192.0.2.9]:2525",
                                  "default_transport": "error:no probes"}
    # Each override defaults to the parameter it stands in for (postconf -d).
    for override, regular in PROBE_ROUTING:
        assert cfg.default(override) == f"${regular}", override


@pytest.mark.parametrize("params, address, want", [
    ({"relayhost": "[192.0.2.1]", "address_verify_relayhost": "[192.0.2.9]"},
     "u@remote.test", (("smtp", "[192.0.2.1]"), ("smtp", "[192.0.2.9]"))),
    ({"address_verify_transport_maps": "inline:{remote.test=relay:[192.0.2.7]}"},
     "u@remote.test", (("smtp", "remote.test"), ("relay", "[192.0.2.7]"))),
    ({"address_verify_default_transport": "error"},
     "u@remote.test", (("smtp", "remote.test"), ("error", "remote.test"))),
    ({"address_verify_local_transport": "error:5.1.1 no probes here"},
     f"u@{HOST}", (("local", HOST), ("error", "5.1.1 no probes here"))),
    ({"address_verify_virtual_transport": "lmtp:[127.0.0.1]:24"},
     "u@virtual.test", (("virtual", "virtual.test"), ("lmtp", "[127.0.0.1]:24"))),
    ({"address_verify_relay_transport": "relay2"},
     "u@relay.test", (("relay", "relay.test"), ("relay2", "relay.test"))),
    ({"address_verify_sender_dependent_relayhost_maps": "inline:{s@example.test=[192.0.2.5]}"},
     "u@remote.test", (("smtp", "remote.test"), ("smtp", "[192.0.2.5]"))),
])
def test_qmgr_routes_probes_with_the_overrides(tmp_path, params, address, want):
    cfg = _cfg(tmp_path, **params)
    store = QueueStore(str(tmp_path / "q"))
    store.ensure_layout()
    qm = QueueManager(cfg, store, log=NullLog("qmgr"))
    mail = qm._resolve(address, "s@example.test")
    probe = qm._resolve(address, "s@example.test", True)
    assert ((mail.transport, mail.nexthop), (probe.transport, probe.nexthop)) == want


def _queue(store, sender, rcpts, kind, filter_=None):
    m = store.create()
    m.set_sender(sender)
    if kind:
        m.set_attribute(VERIFY_ATTRIBUTE, kind)
    if filter_:
        m.set_attribute("postwell_filter", filter_)
    for r in rcpts:
        m.add_recipient(r)
    m.write(b"Subject: probe\n\n")
    m.commit()
    return m.queue_id


def test_only_verify_service_probes_take_probe_routes(tmp_path):
    """A verify(8) probe goes where address_verify_relayhost says; sendmail -bv
    (USER_PROBE) and mail take the relayhost, as Postfix's qmgr_resolve_one()."""
    cfg = _cfg(tmp_path, relayhost="[192.0.2.1]", address_verify_relayhost="[192.0.2.9]")
    store = QueueStore(str(tmp_path / "q"))
    store.ensure_layout()
    seen = {}

    class Agent:
        async def deliver(self, request):
            from postwell.delivery.base import RecipientResult
            seen[request.queue_id] = request.nexthop
            return [RecipientResult.sent(rc, "ok", "test") if request.attributes.get(
                VERIFY_ATTRIBUTE) else RecipientResult.deferred(rc, "later", "none", "4.0.0")
                for rc in request.recipients]

    class Verify:
        async def update(self, *a):
            pass

    qm = QueueManager(cfg, store, log=NullLog("qmgr"), agents={"smtp": Agent()})
    qm.verify_client = Verify()
    ids = {kind: _queue(store, "s@example.test", ["u@remote.test"], kind)
           for kind in (MTA_PROBE, USER_PROBE, None)}

    async def run():
        for qid in ids.values():
            store.move(qid, "incoming", "active")
            await qm.process(qid)
    asyncio.run(asyncio.wait_for(run(), 30))
    assert {k: seen[q] for k, q in ids.items()} == {
        MTA_PROBE: "[192.0.2.9]", USER_PROBE: "[192.0.2.1]", None: "[192.0.2.1]"}


# ---------------------------------------------------------------- side by side with Postfix 3.7

USERS7 = ("pwv7a", "pwv7b", "pwv7c")
# myorigin is example.test, not a local domain: bare names are forwarded there.
FORWARD = f"pwv7b, pwv7b@{HOST}, someone@remote.test, \\pwv7a, |/bin/true, /dev/null\n"


@pytest.fixture(scope="module")
def users():
    if os.geteuid() != 0 or not shutil.which("useradd"):
        pytest.skip("needs root and useradd")
    with harness.real_users(USERS7, "users-pwv7", "pwv7-homes-") as made:
        # pwv7a forwards (a plain and an extension file), pwv7b has none, pwv7c's
        # home is private: local(8) looks as the user.
        for name, files in (("pwv7a", (".forward", ".forward+list")), ("pwv7c", (".forward",))):
            pw = made[name]
            for fname in files:
                path = os.path.join(pw.pw_dir, fname)
                with open(path, "w") as f:
                    f.write(FORWARD if fname == ".forward" else "pwv7b\n")
                os.chown(path, pw.pw_uid, pw.pw_gid)
        os.chmod(made["pwv7c"].pw_dir, 0o700)
        yield made


@pytest.fixture
def sink():
    s = RcptSink()
    yield s
    s.close()


_MASTER = ("smtp      unix  -       -       n       -       -       smtp\n"
           "verify    unix  -       -       n       -       1       verify\n"
           "local     unix  -       n       n       -       -       local\n")

_STATUS = re.compile(r"postfix/(\w+)\[\d+\]: \w+: to=<([^>]*)>, (?:orig_to=<([^>]*)>, )?"
                     r"relay=([^,]*), .*?dsn=([\d.]+), status=(\w+) \((.*)\)$", re.M)


def _status_lines(inst):
    return sorted(set(_STATUS.findall(inst.log_text())))


def _rcpts(inst, rcpts):
    lines = ["EHLO client.test", "MAIL FROM:<s@client.test>"]
    lines += [f"RCPT TO:<{r}>" for r in rcpts] + ["QUIT"]
    return [str(r) for r in dialogue(inst.port, lines, timeout=60)[3:3 + len(rcpts)]]


def _pair(reference_factory, postwell_factory, params):
    ref = reference_factory(params)
    pw = postwell_factory(main_cf=params)
    pw.master_cf = pw.default_master_cf() + _MASTER
    pw.write_config()
    start_side_by_side(ref, pw)
    return ref, pw


def _compare(ref, pw, rcpts):
    want = _rcpts(ref, rcpts)
    got = _rcpts(pw, rcpts)
    assert got == want
    wait_for(lambda: len(_status_lines(pw)) >= len(_status_lines(ref)), 30, 0.1, "probe lines")
    assert _status_lines(pw) == _status_lines(ref)
    return want


_VERIFY = {
    "smtpd_recipient_restrictions": "reject_unverified_recipient, permit_mynetworks, "
                                    "reject_unauth_destination",
    "address_verify_poll_delay": "1s",
    "address_verify_poll_count": "20",
    "recipient_delimiter": "+",
}


def test_local_probes_side_by_side(users, reference_factory, postwell_factory):
    ref, pw = _pair(reference_factory, postwell_factory, dict(_VERIFY))
    want = _compare(ref, pw, [f"pwv7a@{HOST}", f"pwv7a+list@{HOST}", f"pwv7a+x@{HOST}",
                              f"pwv7b@{HOST}", f"nosuchuser7@{HOST}"])
    assert want[:4] == ["250 2.1.5 Ok"] * 4
    lines = {(to, reason) for _, to, _, _, _, _, reason in _status_lines(ref)}
    assert (f"pwv7a@{HOST}", f"forward via file: {users['pwv7a'].pw_dir}/.forward") in lines
    assert (f"pwv7a+list@{HOST}", f"forward via file: {users['pwv7a'].pw_dir}/.forward+list") \
        in lines


def test_local_probe_command_maps_and_luser_relay_side_by_side(users, reference_factory,
                                                               postwell_factory):
    params = dict(_VERIFY, luser_relay="luser+$user@remote.test", local_recipient_maps="",
                  mailbox_command_maps="inline:{pwv7b=/bin/cat}",
                  relayhost=f"[127.0.0.1]:{harness.free_port()}")
    ref, pw = _pair(reference_factory, postwell_factory, params)
    _compare(ref, pw, [f"pwv7b@{HOST}", f"nosuchuser7@{HOST}"])
    lines = {(to, orig, reason) for _, to, orig, _, _, _, reason in _status_lines(ref)}
    assert lines == {(f"pwv7b@{HOST}", "", "delivers to command: /bin/cat"),
                     ("luser+nosuchuser7@remote.test", f"nosuchuser7@{HOST}",
                      "forwards to luser+nosuchuser7@remote.test")}


@pytest.mark.xfail(strict=True, reason="the qmgr answers local(8) probes itself, as "
                   "$mail_owner: it cannot look into a home directory only its owner may "
                   "enter; the root local helper's protocol carries no probe flag")
def test_forward_in_private_home_side_by_side(users, reference_factory, postwell_factory):
    ref, pw = _pair(reference_factory, postwell_factory, dict(_VERIFY))
    _compare(ref, pw, [f"pwv7c@{HOST}"])


def test_probe_routing_side_by_side(reference_factory, postwell_factory, sink):
    """Mail would go to a closed port (relayhost); the probes go to the sink
    (address_verify_relayhost) or, for one domain, to error(8)
    (address_verify_transport_maps), and the answers come from there."""
    closed = harness.free_port()
    params = dict(_VERIFY, relayhost=f"[127.0.0.1]:{closed}",
                  address_verify_relayhost=f"[127.0.0.1]:{sink.port}",
                  address_verify_transport_maps="inline:{{nowhere.test=error:5.1.2 no probes "
                                                "for this domain}}",
                  smtp_address_verify_target="rcpt")
    ref, pw = _pair(reference_factory, postwell_factory, params)
    want = _compare(ref, pw, ["good@remote.test", "bad@remote.test", "u@nowhere.test"])
    assert want[0] == "250 2.1.5 Ok" and want[1].startswith("450 4.1.1 ")
    assert "u@nowhere.test" in want[2] and "no probes for this domain" in want[2]


def test_probes_bypass_the_content_filter(tmp_path):
    """qmgr_message_resolve(): a trace-only request (sendmail -bv through pickup
    carries main.cf's content_filter) is resolved, not sent to the filter."""
    cfg = _cfg(tmp_path, relayhost="[192.0.2.1]")
    store = QueueStore(str(tmp_path / "q"))
    store.ensure_layout()
    seen = {}

    class Agent:
        def __init__(self, name):
            self.name = name

        async def deliver(self, request):
            from postwell.delivery.base import RecipientResult
            seen[request.queue_id] = (self.name, request.nexthop)
            return [RecipientResult.sent(rc, "ok", self.name) for rc in request.recipients]

    class Verify:
        async def update(self, *a):
            pass

    qm = QueueManager(cfg, store, log=NullLog("qmgr"),
                      agents={"smtp": Agent("smtp"), "scan": Agent("scan")})
    qm.verify_client = Verify()
    ids = {kind: _queue(store, "s@example.test", ["u@remote.test"], kind,
                        "scan:[127.0.0.1]:10025") for kind in (MTA_PROBE, USER_PROBE, None)}

    async def run():
        for qid in ids.values():
            store.move(qid, "incoming", "active")
            await qm.process(qid)
    asyncio.run(asyncio.wait_for(run(), 30))
    assert {k: seen[q] for k, q in ids.items()} == {
        MTA_PROBE: ("smtp", "[192.0.2.1]"), USER_PROBE: ("smtp", "[192.0.2.1]"),
        None: ("scan", "[127.0.0.1]:10025")}


def test_sendmail_bv_expands_aliases_and_forward_files(users, reference_factory,
                                                        postwell_factory):
    """sendmail -bv (not verify(8)): local(8) expands aliases and .forward files and
    reports each destination, as Postfix 3.7's report and log lines show."""
    import subprocess
    import sys
    from test_verify import _report_blocks
    params = dict(_VERIFY, smtpd_recipient_restrictions="permit_mynetworks, reject",
                  alias_maps="inline:{{list7=pwv7a, pwv7b@mx.example.test, |/bin/false}}",
                  relayhost=f"[127.0.0.1]:{harness.free_port()}")
    ref = reference_factory(params)
    pw = postwell_factory(main_cf=params)
    pw.master_cf = pw.default_master_cf() + _MASTER + \
        "pickup    unix  n       -       n       60      1       pickup\n"
    pw.write_config()
    start_side_by_side(ref, pw)
    rcpts = [f"pwv7a@{HOST}", f"list7@{HOST}", f"pwv7b@{HOST}"]
    for inst in (ref, pw):
        cmd = ["/usr/sbin/sendmail"] if inst is ref else [sys.executable, "-m",
                                                          "postwell.cli.sendmail"]
        out = subprocess.run(cmd + ["-C", str(inst.config_dir), "-f", "alice@virtual.test",
                                    "-bv", *rcpts], capture_output=True, text=True, timeout=30,
                             stdin=subprocess.DEVNULL,
                             env=dict(os.environ, MAIL_CONFIG=str(inst.config_dir)))
        assert out.returncode == 0, out.stderr
    want = _report_blocks(ref, timeout=40)
    got = _report_blocks(pw, timeout=40)
    assert got[1] == want[1]
    assert got[2] == want[2]
    said = " ".join(want[1])
    for text in ("forwards to pwv7b@example.test", "delivers to command: /bin/true",
                 "delivers to file: /dev/null", "delivers to mailbox"):
        assert text in said, said
    for inst in (ref, pw):
        wait_for(lambda inst=inst: "to=<alice@virtual.test>" in inst.log_text(), 20, 0.1,
                 "report delivery")
    assert _status_lines(pw) == _status_lines(ref)


# ---------------------------------------------------------------- sendmail -bv, unit level

def _user_probe(*addresses):
    req = _probe_request(*addresses)
    req.attributes = {VERIFY_ATTRIBUTE: USER_PROBE}
    return req


def _trace(agent, *addresses):
    results = asyncio.run(asyncio.wait_for(agent.deliver(_user_probe(*addresses)), 30))
    return [[(p.recipient.address, p.status, p.reason) for p in r.expanded] for r in results]


@pytest.fixture
def unprivileged(monkeypatch):
    """run_as() as in a qmgr that is not root (uid 12345)."""
    from postwell.delivery import local_exec
    monkeypatch.setattr(local_exec.os, "geteuid", lambda: 12345)


def test_user_probe_reports_each_destination(tmp_path, me):
    inc = tmp_path / "list.inc"
    inc.write_text("a@remote.test\n# comment\nb@remote.test\n")
    with open(os.path.join(me.pw_dir, ".forward"), "w") as f:
        f.write(f"c@remote.test, \\pwv7me, |/bin/true, {tmp_path}/box\n")
    agent = _local(tmp_path, alias_maps=f"inline:{{{{list=:include:{inc}}}}}",
                   mail_spool_directory=f"{tmp_path}/spool")
    assert _trace(agent, f"list@{HOST}", f"pwv7me@{HOST}") == [
        [("a@remote.test", "sent", "forwards to a@remote.test"),
         ("b@remote.test", "sent", "forwards to b@remote.test")],
        [("c@remote.test", "sent", "forwards to c@remote.test"),
         (f"pwv7me@{HOST}", "sent", "delivers to mailbox"),
         (f"pwv7me@{HOST}", "sent", "delivers to command: /bin/true"),
         (f"pwv7me@{HOST}", "sent", f"delivers to file: {tmp_path}/box")]]
    # Nothing was written or run.
    assert not (tmp_path / "box").exists() and not (tmp_path / "spool").exists()


def test_user_probe_unprivileged_reads_no_users_include(tmp_path, me, unprivileged,
                                                        monkeypatch):
    """A qmgr that is not root reads a user's .forward and root's :include: files
    with its own rights, never an :include: a user names (that needs the user's)."""
    inc = tmp_path / "list.inc"
    inc.write_text("a@remote.test\n")
    me.pw_uid = 4242            # someone else than the (pretended) qmgr
    with open(os.path.join(me.pw_dir, ".forward"), "w") as f:
        f.write(f"c@remote.test, :include:{inc}\n")
    agent = _local(tmp_path, alias_maps=f"inline:{{{{list=:include:{inc}}}}}")
    [root_list, user] = _trace(agent, f"list@{HOST}", f"pwv7me@{HOST}")
    assert root_list == [("a@remote.test", "sent", "forwards to a@remote.test")]
    assert user[0] == ("c@remote.test", "sent", "forwards to c@remote.test")
    assert user[1][1] == "deferred" and "root privileges" in user[1][2]
