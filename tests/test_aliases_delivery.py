"""local(8): aliases, :include:, .forward, commands and files, forwarding."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest

from test_local import HOST, MSG, clean_home, env_factory, home, users, write_forward  # noqa: F401

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create users")


def parts(res):
    return [(p.recipient.address, p.recipient.orig, p.status, p.dsn, p.reason) for p in res.expanded]


def forwarded_file(env, new_id):
    qm = env.store.open(new_id)
    try:
        return qm.sender, [(r.address, r.orig) for r in qm.recipients], qm.read_content()
    finally:
        qm.close()


def test_root_aliased_to_local_user(env_factory, users):
    env = env_factory(aliases="root: pwtl1\npostmaster: root\n")
    [res] = env.deliver([f"root@{HOST}"])
    assert (res.status, res.reason) == ("sent", "delivered to mailbox")
    assert parts(res) == [(f"pwtl1@{HOST}", f"root@{HOST}", "sent", "2.0.0", "delivered to mailbox")]
    data = env.mbox("pwtl1")
    # frozen_delivered_to: Delivered-To keeps the recipient the delivery started with
    assert b"X-Original-To: root@mx.example.test\nDelivered-To: root@mx.example.test\n" in data
    assert not (env.spool / "root").exists()
    [res] = env.deliver([f"postmaster@{HOST}"])
    assert parts(res)[0][:3] == (f"pwtl1@{HOST}", f"postmaster@{HOST}", "sent")


def test_alias_to_remote_is_forwarded_as_new_queue_file(env_factory, users):
    env = env_factory(aliases="root: admin@remote.test\n")
    qids_before = set(env.store.scan("incoming"))
    [res] = env.deliver([f"root@{HOST}"], sender="s@remote.test")
    assert res.status == "sent"
    # Postfix logs the forward under the alias itself: to=<root@...> (forwarded as ID)
    [(addr, orig, status, dsn, reason)] = parts(res)
    assert (addr, orig, status, dsn) == (f"root@{HOST}", None, "sent", "2.0.0")
    assert res.reason == reason and reason.startswith("forwarded as ")
    new_id = reason.split()[-1]
    assert new_id in env.store.scan("incoming") and new_id not in qids_before
    sender, rcpts, content = forwarded_file(env, new_id)
    assert sender == "s@remote.test"
    assert rcpts == [("admin@remote.test", f"root@{HOST}")]
    head = content.split(b"\n")
    assert head[0] == b"Received: by mx.example.test (postwell)"
    assert head[1].startswith(b"\tid " + new_id.encode() + b"; ")
    assert head[2] == b"Delivered-To: root@mx.example.test"
    assert b"Subject: hello\n" in content


def test_list_alias_mixed_destinations(env_factory, users):
    env = env_factory(aliases="team: pwtl1, PWTL2, far@remote.test, other@remote.test\n")
    [res] = env.deliver([f"team@{HOST}"])
    got = parts(res)
    assert got[0] == (f"pwtl1@{HOST}", f"team@{HOST}", "sent", "2.0.0", "delivered to mailbox")
    # the address keeps its case (only lookups fold it), as in Postfix logs
    assert got[1] == (f"PWTL2@{HOST}", f"team@{HOST}", "sent", "2.0.0", "delivered to mailbox")
    # both remote addresses share one new queue file, logged once under the list
    assert len(got) == 3
    assert got[2][:3] == (f"team@{HOST}", None, "sent") and got[2][4].startswith("forwarded as ")
    _, rcpts, _ = forwarded_file(env, got[2][4].split()[-1])
    assert [r[0] for r in rcpts] == ["far@remote.test", "other@remote.test"]
    assert os.stat(env.spool / "pwtl2").st_uid == users["pwtl2"].pw_uid


def test_alias_loop_bounces_not_hangs(env_factory, users):
    env = env_factory(aliases="loopa: loopb\nloopb: loopa\n")
    [res] = env.deliver([f"loopa@{HOST}"])
    assert (res.status, res.dsn) == ("bounced", "5.4.6")
    # as Postfix 3.7: to=<loopb@...>, orig_to=<loopa@...> (alias database loop for loopb)
    assert res.reason == "alias database loop for loopb"
    assert parts(res)[0][:2] == (f"loopb@{HOST}", f"loopa@{HOST}")


def test_alias_listing_itself_means_the_user(env_factory, users):
    env = env_factory(aliases="pwtl1: pwtl1, pwtl2\n")
    [res] = env.deliver([f"pwtl1@{HOST}"])
    assert [p[0] for p in parts(res)] == [f"pwtl1@{HOST}", f"pwtl2@{HOST}"]
    assert all(p[2] == "sent" for p in parts(res))
    assert (env.spool / "pwtl1").exists() and (env.spool / "pwtl2").exists()


def test_alias_extension_and_duplicates(env_factory, users):
    env = env_factory(aliases="dup: pwtl1, pwtl1@mx.example.test, pwtl1\n")
    [res] = env.deliver([f"dup+tag@{HOST}"])
    assert len(parts(res)) == 1 and res.status == "sent"
    assert env.mbox("pwtl1").count(b"Return-Path:") == 1


def test_alias_command_as_default_privs_and_restrictions(env_factory, users, tmp_path):
    out = Path("/tmp") / f"pwt-cmd-{os.getpid()}.txt"    # nobody must be able to write it
    out.unlink(missing_ok=True)
    try:
        env = env_factory(aliases=f'cmd: "|/bin/sh -c \'id -u > {out}\'"\n')
        [res] = env.deliver([f"cmd@{HOST}"])
        assert res.status == "sent", res.reason
        assert res.reason == f"delivered to command: /bin/sh -c 'id -u > {out}'"
        assert out.read_text().strip() == "65534"      # root-owned aliases: default_privs (nobody)
        env = env_factory({"allow_mail_to_commands": "forward"}, aliases="cmd2: |/bin/true\n")
        [res] = env.deliver([f"cmd2@{HOST}"])
        assert (res.status, res.dsn, res.reason) == ("bounced", "5.7.1", "mail to command is restricted")
    finally:
        out.unlink(missing_ok=True)


def test_alias_file_destination(env_factory, users):
    env = env_factory(aliases="")
    target = env.root / "files"
    target.mkdir()
    os.chmod(target, 0o777)
    (env.root / "aliases").write_text(f"archive: {target}/archive.mbox\nnull: /dev/null\n")
    from postwell.tables.aliases import build_aliases
    build_aliases("hash", str(env.root / "aliases"))
    env.agent._aliases = None
    [res] = env.deliver([f"archive@{HOST}"])
    assert (res.status, res.reason) == ("sent", f"delivered to file: {target}/archive.mbox")
    f = target / "archive.mbox"
    assert os.stat(f).st_uid == 65534 and stat.S_IMODE(os.stat(f).st_mode) == 0o600
    data = f.read_bytes()
    assert data.startswith(b"From sender@remote.test  ") and b"\n>From the start\n" in data
    assert data.endswith(b"\n\n")
    [res] = env.deliver([f"null@{HOST}"])
    assert (res.status, res.reason) == ("sent", "delivered to file: /dev/null")


def test_include_file(env_factory, users):
    env = env_factory()
    inc = env.root / "members"
    inc.write_text("# members\npwtl3\nfriend@remote.test\n|/bin/true\n")
    os.chmod(inc, 0o644)
    (env.root / "aliases").write_text(f"club: :include:{inc}\n")
    from postwell.tables.aliases import build_aliases
    build_aliases("hash", str(env.root / "aliases"))
    env.agent._aliases = None
    [res] = env.deliver([f"club@{HOST}"])
    got = parts(res)
    # addresses from :include: files always go out as a new queue file (local(8))
    assert got[1][0] == f"club@{HOST}" and got[1][4].startswith("forwarded as ")
    _, rcpts, _ = forwarded_file(env, got[1][4].split()[-1])
    assert rcpts == [(f"pwtl3@{HOST}", f"club@{HOST}"), ("friend@remote.test", f"club@{HOST}")]
    # commands in include files need "include" in allow_mail_to_commands
    assert got[0] == (f"club@{HOST}", f"club@{HOST}", "bounced", "5.7.1", "mail to command is restricted")
    # a world-writable include file is refused
    os.chmod(inc, 0o666)
    [res] = env.deliver([f"club@{HOST}"])
    assert (res.status, res.dsn, res.reason) == ("bounced", "5.3.5", "mail system configuration error")
    assert any(f"file {inc} is world writable" in line for line in env.log.lines)


def test_missing_include_file(env_factory, users):
    env = env_factory(aliases=f"noinc: :include:{'/nonexistent/pwt-members'}\n")
    [res] = env.deliver([f"noinc@{HOST}"])
    # Postfix 3.7: a warning with the details, a generic bounce text
    assert (res.status, res.dsn, res.reason) == ("bounced", "5.3.5", "mail system configuration error")
    assert any("unable to lookup :include: file /nonexistent/pwt-members: No such file or directory"
               in line for line in env.log.lines)


def test_owner_alias_becomes_sender(env_factory, users):
    env = env_factory(aliases="biglist: pwtl1, x@remote.test\nowner-biglist: pwtl2\n")
    [res] = env.deliver([f"biglist@{HOST}"])
    got = parts(res)
    assert len(got) == 1 and got[0][4].startswith("forwarded as ")
    sender, rcpts, _ = forwarded_file(env, got[0][4].split()[-1])
    assert sender == f"owner-biglist@{HOST}"
    assert sorted(r[0] for r in rcpts) == [f"pwtl1@{HOST}", "x@remote.test"]


# ------------------------------------------------------------------ .forward

def test_forward_command_runs_as_user(env_factory, users):
    clean_home(users, "pwtl1")
    uidfile = home(users, "pwtl1") / "uid.txt"
    write_forward(users, "pwtl1", f'"|/bin/sh -c \'id -u > {uidfile}; echo $RECIPIENT >> {uidfile}\'"\n')
    env = env_factory()
    [res] = env.deliver([f"pwtl1@{HOST}"])
    assert res.status == "sent", res.reason
    assert res.reason.startswith("delivered to command: /bin/sh -c")
    lines = uidfile.read_text().split()
    assert lines == [str(users["pwtl1"].pw_uid), f"pwtl1@{HOST}"]
    assert os.stat(uidfile).st_uid == users["pwtl1"].pw_uid
    clean_home(users, "pwtl1")


def test_forward_backslash_self_and_remote(env_factory, users):
    clean_home(users, "pwtl1")
    write_forward(users, "pwtl1", "\\pwtl1, away@remote.test\n")
    env = env_factory()
    [res] = env.deliver([f"pwtl1@{HOST}"])
    got = parts(res)
    assert got[0] == (f"pwtl1@{HOST}", f"pwtl1@{HOST}", "sent", "2.0.0", "delivered to mailbox")
    assert got[1][0] == f"pwtl1@{HOST}" and got[1][4].startswith("forwarded as ")
    _, rcpts, content = forwarded_file(env, got[1][4].split()[-1])
    assert rcpts == [("away@remote.test", f"pwtl1@{HOST}")]
    assert b"\nDelivered-To: pwtl1@mx.example.test\n" in content
    clean_home(users, "pwtl1")


def test_forward_to_other_local_user_is_resubmitted(env_factory, users):
    clean_home(users, "pwtl1")
    write_forward(users, "pwtl1", "pwtl2\n")
    env = env_factory()
    [res] = env.deliver([f"pwtl1@{HOST}"])
    [(addr, orig, status, dsn, reason)] = parts(res)
    assert addr == f"pwtl1@{HOST}" and reason.startswith("forwarded as ")
    assert forwarded_file(env, reason.split()[-1])[1] == [(f"pwtl2@{HOST}", f"pwtl1@{HOST}")]
    assert not (env.spool / "pwtl1").exists()
    clean_home(users, "pwtl1")


def test_forward_file_and_unsafe_forward_ignored(env_factory, users):
    clean_home(users, "pwtl1")
    out = home(users, "pwtl1") / "mbox"
    write_forward(users, "pwtl1", f"{out}\n")
    env = env_factory()
    [res] = env.deliver([f"pwtl1@{HOST}"])
    assert (res.status, res.reason) == ("sent", f"delivered to file: {out}")
    assert os.stat(out).st_uid == users["pwtl1"].pw_uid
    # group/world writable .forward: Postfix ignores a world-writable one
    write_forward(users, "pwtl1", "elsewhere@remote.test\n", mode=0o666)
    [res] = env.deliver([f"pwtl1@{HOST}"])
    assert (res.status, res.reason) == ("sent", "delivered to mailbox")
    assert any("is world writable" in line for line in env.log.lines)
    clean_home(users, "pwtl1")


def test_forward_extension_file(env_factory, users):
    clean_home(users, "pwtl1")
    write_forward(users, "pwtl1", "ext@remote.test\n", fname=".forward+lists")
    env = env_factory()
    [res] = env.deliver([f"pwtl1+lists@{HOST}"])
    [(addr, _, _, _, reason)] = parts(res)
    assert reason.startswith("forwarded as ")
    assert forwarded_file(env, reason.split()[-1])[1][0][0] == "ext@remote.test"
    [res] = env.deliver([f"pwtl1+other@{HOST}"])
    assert res.reason == "delivered to mailbox"
    clean_home(users, "pwtl1")


def test_empty_forward_means_mailbox(env_factory, users):
    clean_home(users, "pwtl1")
    write_forward(users, "pwtl1", "\n# nothing\n")
    env = env_factory()
    [res] = env.deliver([f"pwtl1@{HOST}"])
    assert res.reason == "delivered to mailbox"
    clean_home(users, "pwtl1")


def test_luser_relay(env_factory, users):
    env = env_factory({"luser_relay": "catchall+$user@remote.test"})
    [res] = env.deliver([f"ghostpwt@{HOST}"])
    [(addr, orig, status, _, reason)] = parts(res)
    assert reason.startswith("forwarded as ")
    assert forwarded_file(env, reason.split()[-1])[1][0][0] == "catchall+ghostpwt@remote.test"


def test_alias_command_environment(env_factory, users):
    out = Path("/tmp") / f"pwt-env-{os.getpid()}.txt"
    out.unlink(missing_ok=True)
    try:
        env = env_factory(aliases=f'envc: "|/bin/sh -c \'env > {out}\'"\n')
        [res] = env.deliver([f"envc+x@{HOST}"])
        assert res.status == "sent", res.reason
        got = dict(line.split("=", 1) for line in out.read_text().splitlines() if "=" in line)
        # as Postfix 3.7: the bare recipient name, no HOME/SHELL for root's aliases
        assert got["USER"] == got["LOGNAME"] == "envc"
        assert got["EXTENSION"] == "x" and got["LOCAL"] == "envc+x"
        assert got["RECIPIENT"] == f"envc+x@{HOST}" and got["ORIGINAL_RECIPIENT"] == f"envc+x@{HOST}"
        assert got["PATH"] == "/usr/bin:/bin" and got["SENDER"] == "sender@remote.test"
        assert "HOME" not in got and "SHELL" not in got
        assert got["PWD"] == str(env.queue)
    finally:
        out.unlink(missing_ok=True)


def test_command_time_limit(env_factory, users):
    env = env_factory({"command_time_limit": "1s"}, aliases='slow: "|/bin/sleep 20"\n')
    t0 = time.monotonic()
    [res] = env.deliver([f"slow@{HOST}"])
    assert time.monotonic() - t0 < 10
    assert (res.status, res.dsn, res.reason) == ("bounced", "5.3.0",
                                                 'Command time limit exceeded: "/bin/sleep 20"')
