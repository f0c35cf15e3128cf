"""pipe(8): master.cf attributes, argv expansion, message copy flags, command
outcomes (texts checked against Postfix 3.7's pipe(8) logs) and the agent."""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import tempfile

import pytest

from postwell.config.main import Config
from postwell.config.master import parse_master_cf
from postwell.delivery import agent_class
from postwell.delivery.base import DeliveryRequest, Recipient
from postwell.delivery.pipe import (PipeAgent, PipeConfigError, command_environment,
                                    delivered_to_loop, expand_argv, message_stream,
                                    parse_attributes, printable_output, quote_local, run_command,
                                    split_extension, unescape)
from postwell.log import NullLog

MSG = b"Subject: hi\nDelivered-To: old@x.test\n\nFrom me\n.dot\nlast"


class _Pw:
    def __init__(self, uid, gid):
        self.pw_uid, self.pw_gid = uid, gid


class _Gr:
    def __init__(self, gid):
        self.gr_gid = gid


USERS = {"vmail": _Pw(5000, 5000), "root": _Pw(0, 0), "postfix": _Pw(100, 101),
         "wheelish": _Pw(6000, 0)}
GROUPS = {"mail": _Gr(8), "postfix": _Gr(101)}


def attrs(text: str, owner=None):
    return parse_attributes(text.split(), mail_owner=owner, getpwnam=USERS.__getitem__,
                            getgrnam=GROUPS.__getitem__)


def request(rcpts, sender="s@x.test", nexthop="NH.Test", content=MSG, attributes=None, **kw):
    rcpts = [r if isinstance(r, Recipient) else Recipient(r) for r in rcpts]
    return DeliveryRequest(queue_id="4ABC12345", sender=sender, recipients=rcpts,
                           transport=kw.pop("transport", "maildrop"), nexthop=nexthop,
                           arrival_time=0.0, open_content=lambda: iter([content]),
                           content_size=len(content), attributes=attributes or {}, **kw)


# ------------------------------------------------------------ attributes

def test_debian_maildrop_entry():
    a = attrs("flags=DRXhu user=vmail argv=/usr/bin/maildrop -d ${recipient}")
    assert a.flags == "DRXhu" and (a.uid, a.gid) == (5000, 5000)
    assert a.argv == ["/usr/bin/maildrop", "-d", "${recipient}"]
    assert a.eol == b"\n" and a.null_sender == "MAILER-DAEMON" and a.size_limit == 0


def test_attributes_options_and_group():
    a = attrs("-o syslog_name=x -v flags=F. user=vmail:mail directory=/var/tmp eol=\\r\\n "
              "null_sender= size=1000 argv=/bin/cmd a")
    assert a.gid == 8 and a.directory == "/var/tmp" and a.eol == b"\r\n"
    assert a.null_sender == "" and a.size_limit == 1000 and a.argv == ["/bin/cmd", "a"]


@pytest.mark.parametrize("text, error", [
    ("flags=Z user=vmail argv=/bin/x", "unknown flag: Z (ignored)"),
    ("user=vmail bogus=1 argv=/bin/x", "unknown attribute name: bogus=1"),
    ("argv=/bin/x", "missing user= command-line attribute"),
    ("user=vmail", "missing argv= command-line attribute"),
    ("user=root argv=/bin/x", "user= command-line attribute specifies root privileges"),
    ("user=nobody-here argv=/bin/x", "get_service_attr: unknown username: nobody-here"),
    ("user=vmail:nogroup argv=/bin/x", "get_service_attr: unknown group: nogroup"),
    ("user=wheelish argv=/bin/x", "user= command-line attribute specifies privileged group id 0"),
    ("user=vmail size=big argv=/bin/x", "get_service_attr: bad size= value: big"),
])
def test_attribute_errors(text, error):
    with pytest.raises(PipeConfigError) as exc:
        attrs(text)
    assert str(exc.value) == error


def test_mail_owner_refused():
    with pytest.raises(PipeConfigError, match="specifies mail system owner postfix$"):
        attrs("user=postfix argv=/bin/x", owner="postfix")
    with pytest.raises(PipeConfigError, match="mail system owner postfix group id 101"):
        attrs("user=vmail:postfix argv=/bin/x", owner="postfix")


def test_unescape():
    assert unescape("\\r\\n") == b"\r\n"
    assert unescape("\\101\\\\x") == b"A\\x"


# ------------------------------------------------------------ argv expansion

def test_recipient_argument_repeats_per_recipient():
    # Postfix: "-x${recipient}y" becomes one argument per recipient.
    a = parse_attributes(["flags=R", "user=vmail", "argv=/bin/ok", "-x${recipient}y", "${user}",
                          "a b"], getpwnam=USERS.__getitem__)
    argv = expand_argv(a.argv, request(["a@multi.test", "b+q@multi.test"]), a, rcpt_delim="+")
    assert argv == ["/bin/ok", "-xa@multi.testy", "-xb+q@multi.testy", "a", "b", "a b"]


def test_fold_flags_and_parts():
    a = attrs("flags=hu user=vmail argv=/bin/x ${recipient} ${sender} ${extension} ${nexthop} "
              "${domain} ${mailbox} ${original_recipient}")
    rc = Recipient("User+Ext@OK.TEST", orig="Orig@Example.TEST")
    argv = expand_argv(a.argv, request([rc], sender="Snd+x@Ex.test"), a, rcpt_delim="+")
    assert argv == ["/bin/x", "user+ext@ok.test", "Snd+x@Ex.test", "ext", "nh.test", "ok.test",
                    "user+ext", "orig@example.test"]


def test_h_only_and_u_only():
    a = attrs("flags=h user=vmail argv=/bin/x ${recipient}")
    assert expand_argv(a.argv, request(["Ab@CD"]), a)[1:] == ["Ab@cd"]
    a = attrs("flags=u user=vmail argv=/bin/x ${recipient}")
    assert expand_argv(a.argv, request(["Ab@CD"]), a)[1:] == ["ab@CD"]


def test_quote_flag_and_null_sender():
    a = attrs("flags=q null_sender= user=vmail argv=/bin/x ${sender} ${recipient} ${user} "
              "${mailbox} $$x ${size} ${queue_id} ${client_address} ${client_helo}")
    req = request(['a b@quote.test'], sender="", attributes={"client_address": "127.0.0.1",
                                                              "helo_name": "[127.0.0.1]"})
    argv = expand_argv(a.argv, req, a)
    # Checked against Postfix 3.7: q quotes whole addresses only, never $user/$mailbox.
    assert argv == ["/bin/x", "", '"a b"@quote.test', "a b", "a b", "$x", str(len(MSG)),
                    "4ABC12345", "127.0.0.1", "[127.0.0.1]"]


def test_default_null_sender_and_conditional_macro():
    a = attrs("user=vmail argv=/bin/x ${sender} ${extension?+ext} ${extension:none}")
    assert expand_argv(a.argv, request(["u@d"], sender=""), a) == \
        ["/bin/x", "MAILER-DAEMON", "", "none"]


def test_blank_user_drops_argument():
    # +bulletin@host: the $user argument is left out for that recipient (cyrus).
    a = attrs("user=vmail argv=/bin/x -u${user}")
    assert expand_argv(a.argv, request(["+board@h", "joe@h"]), a, rcpt_delim="+") == ["/bin/x", "-ujoe"]


def test_unknown_macro_is_configuration_error():
    a = attrs("user=vmail argv=/bin/x ${recipent}")
    seen = []
    assert expand_argv(a.argv, request(["u@d"]), a, warn=seen.append) is None
    assert seen == ["recipent"]


def test_split_extension_special_names():
    assert split_extension("joe+x+y", "+") == ("joe", "x+y")
    assert split_extension("joe-x", "+-") == ("joe", "x")
    assert split_extension("owner-list", "-") == ("owner-list", None)
    assert split_extension("list-request", "-") == ("list-request", None)
    assert split_extension("MAILER-DAEMON", "-") == ("MAILER-DAEMON", None)
    assert split_extension("double-bounce", "-") == ("double-bounce", None)
    assert split_extension("joe+x", "") == ("joe+x", None)


def test_quote_local():
    assert quote_local("a b@d") == '"a b"@d'
    assert quote_local('a"b@d') == '"a\\"b"@d'
    assert quote_local("first.last@d") == "first.last@d"
    assert quote_local("a..b@d") == '"a..b"@d'


def test_expansion_never_reaches_a_shell(tmp_path):
    a = attrs("user=vmail argv=/bin/echo ${recipient}")
    evil = "$(touch x)`id`;rm -rf /@d"
    argv = expand_argv(a.argv, request([evil]), a)
    assert argv == ["/bin/echo", evil]


# ------------------------------------------------------------ message copy

def copy(flags, content=MSG, chunks=None, eol=b"\n", sender="s@x", orig="o@x", rcpt="r@x"):
    parts = chunks if chunks is not None else [content]
    return b"".join(message_stream(iter(parts), flags=flags, eol=eol, sender=sender, orig=orig,
                                   delivered=rcpt, now=0))


def test_copy_plain_adds_final_newline():
    assert copy("") == MSG + b"\n"
    assert copy("", content=b"a\n") == b"a\n"


def test_copy_headers_in_mail_copy_order():
    out = copy("FRODB", sender="")
    lines = out.split(b"\n")
    assert lines[0].startswith(b"From MAILER-DAEMON  ")
    assert lines[1:4] == [b"Return-Path: <>", b"X-Original-To: o@x", b"Delivered-To: r@x"]
    assert out.endswith(b"last\n\n")


def test_copy_quoting_and_eol():
    out = copy(">.", eol=b"\r\n")
    assert out == (b"Subject: hi\r\nDelivered-To: old@x.test\r\n\r\n>From me\r\n..dot\r\nlast\r\n")


def test_copy_quoting_across_chunk_boundaries():
    whole = copy(">.")
    for size in (1, 2, 3, 4, 5, 7):
        chunks = [MSG[i:i + size] for i in range(0, len(MSG), size)]
        assert copy(">.", chunks=chunks) == whole, size
    assert copy(".", content=b"x\n.") == b"x\n..\n"
    assert copy(">", content=b"Fro") == b"Fro\n"


def test_delivered_to_loop_only_in_header():
    assert delivered_to_loop(iter([MSG]), "OLD@x.test")
    assert not delivered_to_loop(iter([MSG]), "new@x.test")
    assert not delivered_to_loop(iter([b"Subject: x\n\nDelivered-To: a@b\n"]), "a@b")


# ------------------------------------------------------------ running commands

def run(argv, content=b"hello\n", time_limit=20.0, cwd=None):
    return run_command(argv, iter([content]), uid=None, gid=None, env={"PATH": "/usr/bin:/bin"},
                       cwd=cwd, chroot=None, time_limit=time_limit)


def sh(script):
    return ["/bin/sh", "-c", script]


def test_success_and_output():
    status, dsn, reason, output = run(sh("cat >/dev/null; echo hello world"))
    assert (status, dsn) == ("sent", "2.0.0") and output == "hello world "


def test_sysexits_permission_denied_with_output():
    # Postfix 3.7: status=bounced (permission denied. Command output: no way )
    assert run(sh("cat >/dev/null; echo no way; exit 77"))[:3] == \
        ("bounced", "5.7.0", "permission denied. Command output: no way ")


def test_tempfail_defers():
    assert run(sh("exit 75"))[:3] == ("deferred", "4.3.0", "temporary failure")


def test_enhanced_status_in_output_wins():
    assert run(sh("echo 4.2.2 mailbox full; exit 1"))[:3] == ("deferred", "4.2.2", "mailbox full ")


def test_other_status_bounces():
    assert run(sh("exit 3"))[:3] == ("bounced", "5.3.0", 'Command died with status 3: "/bin/sh"')


def test_signal_defers():
    assert run(sh("kill -9 $$"))[:3] == ("deferred", "4.3.0", 'Command died with signal 9: "/bin/sh"')


def test_time_limit_bounces_and_kills_offspring():
    status, dsn, reason, _ = run(sh("sleep 30 & sleep 30"), time_limit=0.5)
    assert (status, dsn, reason) == ("bounced", "5.3.0", 'Command time limit exceeded: "/bin/sh"')


def test_missing_command_defers_like_postfix():
    assert run(["/nonexistent/cmd", "x"])[:3] == (
        "deferred", "4.3.0", "temporary failure. Command output: pipe: fatal: pipe_command: "
        "execvp /nonexistent/cmd: No such file or directory ")


def test_command_that_stops_reading_is_judged_by_exit_status():
    big = b"x" * 200 + b"\n"
    status, *_ = run(sh("exit 0"), content=big * 5000)
    assert status == "sent"


def test_output_is_bounded_and_printable():
    status, dsn, reason, output = run(sh("head -c 100000 /dev/zero; printf 'a\\tb\\rc'; exit 64"))
    assert status == "bounced" and len(output) == 4096 and set(output) == {"_"}
    assert printable_output(b"a\tb\nc\rd\x00") == "a b c_d_"


def test_environment_is_clean():
    env = command_environment(["TZ", "LANG", "X=1"], {"TZ": "UTC", "SECRET": "s"})
    assert env == {"PATH": "/usr/bin:/bin", "TZ": "UTC", "X": "1"}


# ------------------------------------------------------------ the agent

def make_config(tmp_path, master_cf: str, **params):
    qdir = tmp_path / "queue"
    qdir.mkdir(exist_ok=True)
    base = {"queue_directory": str(qdir), "mail_owner": "nobody", "recipient_delimiter": "+"}
    base.update(params)
    return Config(str(tmp_path), base, {}, parse_master_cf(master_cf))


def test_agent_registered():
    assert agent_class("pipe") is PipeAgent


@pytest.fixture
def shared_dir():
    d = tempfile.mkdtemp(prefix="pwpipe-", dir="/tmp")
    os.chmod(d, 0o777)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _test_user():
    from harness import ensure_test_user
    return ensure_test_user()


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
def test_agent_runs_command_as_user(tmp_path, shared_dir):
    user = _test_user()
    out = os.path.join(shared_dir, "out")
    cfg = make_config(tmp_path, "maildrop unix - n n - - pipe flags=DRhu user=" + user +
                      " argv=/bin/sh -c { id -u >" + out + ".uid; cat >" + out + " } x ${recipient}\n")
    log = NullLog("pipe")
    agent = PipeAgent(cfg, log=log)
    res = asyncio.run(asyncio.wait_for(agent.deliver(request(["Joe@Example.TEST"])), 30))
    assert [(r.status, r.dsn, r.reason, r.relay) for r in res] == \
        [("sent", "2.0.0", "delivered via maildrop service", "maildrop")]
    assert open(out + ".uid").read().strip() == str(pwd.getpwnam(user).pw_uid)
    data = open(out, "rb").read()
    assert data.startswith(b"Return-Path: <s@x.test>\nDelivered-To: Joe@Example.TEST\nSubject: hi\n")
    assert os.stat(out).st_uid == pwd.getpwnam(user).pw_uid


def test_agent_refuses_other_user_when_not_root(tmp_path):
    cfg = make_config(tmp_path, "maildrop unix - n n - - pipe user=root2 argv=/bin/true\n")
    agent = PipeAgent(cfg, log=NullLog("pipe"), euid=lambda: 4242)
    agent._attrs["maildrop"] = parse_attributes(["user=vmail", "argv=/bin/true"],
                                                getpwnam=USERS.__getitem__)
    [res] = asyncio.run(agent.deliver(request(["a@b"])))
    assert (res.status, res.dsn) == ("deferred", "4.3.0")
    assert res.reason == "pipe service maildrop: running a command as user vmail requires root privileges"


def test_agent_as_same_user_when_not_root(tmp_path):
    # A non-root agent (euid faked) whose user= is itself runs the command directly.
    cfg = make_config(tmp_path, "p unix - n n - - pipe user=me argv=/bin/sh -c "
                      "{ cat >/dev/null; echo done }\n")
    agent = PipeAgent(cfg, log=NullLog("pipe"), euid=lambda: 4321)
    agent._attrs["p"] = parse_attributes(cfg.services[0].args, getpwnam=lambda n: _Pw(4321, 4321))
    [res] = asyncio.run(agent.deliver(request(["a@b"], transport="p")))
    assert (res.status, res.reason) == ("sent", "delivered via p service (done)")


def test_agent_d_flag_needs_single_recipient(tmp_path):
    cfg = make_config(tmp_path, "md unix - n n - - pipe flags=D user=vmail argv=/bin/true\n")
    log = NullLog("pipe")
    agent = PipeAgent(cfg, log=log, euid=lambda: 5000)
    agent._attrs["md"] = attrs("flags=D user=vmail argv=/bin/true")
    res = asyncio.run(agent.deliver(request(["a@b", "c@d"], transport="md")))
    assert [(r.status, r.dsn, r.reason) for r in res] == \
        [("deferred", "4.3.5", "mail system configuration error")] * 2
    assert "warning: pipe flag `D' requires md_destination_recipient_limit = 1" in log.lines


def test_agent_loop_and_size(tmp_path):
    cfg = make_config(tmp_path, "md unix - n n - - pipe flags=D user=vmail argv=/bin/true\n")
    agent = PipeAgent(cfg, log=NullLog("pipe"), euid=lambda: 5000)
    agent._attrs["md"] = attrs("flags=D user=vmail argv=/bin/true")
    [res] = asyncio.run(agent.deliver(request(["Old@X.test"], transport="md")))
    assert (res.status, res.dsn, res.reason) == ("bounced", "5.4.6", "mail forwarding loop for Old@X.test")
    agent._attrs["md"] = attrs("size=10 user=vmail argv=/bin/true")
    [res] = asyncio.run(agent.deliver(request(["a@b"], transport="md")))
    assert (res.status, res.dsn, res.reason) == ("bounced", "5.2.3", "message too large")


def test_agent_bad_entry_defers_and_logs_fatal(tmp_path):
    cfg = make_config(tmp_path, "md unix - n n - - pipe flags=D argv=/bin/true\n")
    log = NullLog("pipe")
    [res] = asyncio.run(PipeAgent(cfg, log=log).deliver(request(["a@b"], transport="md")))
    assert (res.status, res.dsn, res.reason) == ("deferred", "4.3.0", "unknown mail transport error")
    assert "fatal: missing user= command-line attribute" in log.lines


def test_agent_unknown_macro_warns(tmp_path):
    cfg = make_config(tmp_path, "md unix - n n - - pipe user=x argv=/bin/true ${bogus}\n")
    log = NullLog("pipe")
    agent = PipeAgent(cfg, log=log, euid=lambda: 4321)
    agent._attrs["md"] = parse_attributes(cfg.services[0].args, getpwnam=lambda n: _Pw(4321, 1))
    [res] = asyncio.run(agent.deliver(request(["a@b"], transport="md")))
    assert (res.status, res.dsn) == ("deferred", "4.3.5")
    assert f'warning: file {tmp_path}/master.cf: service md: unknown macro name: "bogus"' in log.lines


def test_time_limit_parameter(tmp_path):
    cfg = make_config(tmp_path, "md unix - n n - - pipe user=x argv=/bin/true\n",
                      md_time_limit="7s", command_time_limit="100s")
    agent = PipeAgent(cfg)
    assert agent.time_limit("md") == 7.0
    assert agent.time_limit("other") == 100.0


def test_helper_runs_only_master_cf_pipe_services(tmp_path):
    """A request (from the unprivileged qmgr) cannot name a command, a user or
    a service that master.cf does not define as pipe."""
    from postwell.delivery.pipe_helper import handle_request
    cfg = make_config(tmp_path, "maildrop unix - n n - - pipe user=vmail argv=/bin/true\n"
                      "local unix - n n - - local\n")
    agent = PipeAgent(cfg, helper_socket="")
    for transport in ("local", "nonexistent", ""):
        got = handle_request(agent, None, {"queue_id": "4ABC12345", "transport": transport,
                                           "recipients": [["a@b", None]]})
        assert got == [["deferred", "4.3.0", "mail transport unavailable"]]
    with pytest.raises(ValueError):
        handle_request(agent, None, {"queue_id": "../../etc/passwd", "transport": "maildrop",
                                     "recipients": [["a@b", None]]})


def test_qmgr_side_uses_helper_when_not_root(tmp_path, monkeypatch):
    from postwell.delivery import pipe_helper
    cfg = make_config(tmp_path, "maildrop unix - n n - - pipe user=vmail argv=/bin/true\n")
    monkeypatch.setattr(pipe_helper, "HELPER_SOCKET", str(tmp_path / "nonexistent-socket"))
    agent = PipeAgent(cfg, log=NullLog("pipe"), euid=lambda: 100)
    assert agent._helper_path() == str(tmp_path / "nonexistent-socket")
    assert PipeAgent(cfg, euid=lambda: 0)._helper_path() is None
    assert PipeAgent(cfg, helper_socket="", euid=lambda: 100)._helper_path() is None


def test_unreachable_helper_defers(tmp_path, monkeypatch):
    monkeypatch.setattr(asyncio, "sleep", _no_sleep)
    cfg = make_config(tmp_path, "maildrop unix - n n - - pipe user=vmail argv=/bin/true\n")
    log = NullLog("pipe")
    agent = PipeAgent(cfg, log=log, helper_socket=str(tmp_path / "missing"), euid=lambda: 100)
    [res] = asyncio.run(asyncio.wait_for(agent.deliver(request(["a@b"])), 20))
    assert (res.status, res.dsn, res.reason) == ("deferred", "4.3.0", "mail transport unavailable")
    assert any("pipe helper" in line for line in log.lines)


_real_sleep = asyncio.sleep


async def _no_sleep(delay, *a, **kw):
    await _real_sleep(0)


def test_working_directory(tmp_path):
    # directory= when given, else $queue_directory (pipe(8)).
    cfg = make_config(tmp_path, "a unix - n n - - pipe user=me argv=/bin/sh -c { cat >/dev/null; pwd }\n"
                      f"b unix - n n - - pipe user=me directory={tmp_path} argv=/bin/sh -c "
                      "{ cat >/dev/null; pwd }\n")
    agent = PipeAgent(cfg, log=NullLog("pipe"), euid=lambda: 4321)
    for svc in cfg.services:
        agent._attrs[svc.name] = parse_attributes(svc.args, getpwnam=lambda n: _Pw(4321, 4321))
    [a] = asyncio.run(agent.deliver(request(["x@y"], transport="a")))
    [b] = asyncio.run(agent.deliver(request(["x@y"], transport="b")))
    assert a.reason == f"delivered via a service ({tmp_path}/queue)"
    assert b.reason == f"delivered via b service ({tmp_path})"


def test_time_limit_while_command_ignores_input():
    # The write side blocks on a full pipe; the time limit still ends it.
    big = (b"y" * 1000 + b"\n") * 2000
    status, dsn, reason, _ = run(sh("sleep 30"), content=big, time_limit=0.5)
    assert (status, dsn) == ("bounced", "5.3.0") and reason.startswith("Command time limit exceeded")
