"""`postfix check` (master.check): queue directory owners and modes, mail_owner
sanity, lookup tables that the (unprivileged) daemons could not open."""

from __future__ import annotations

import os
import pwd
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap

import pytest

import harness
from postwell.master.check import QUEUE_LAYOUT, run_check, table_specs

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="ownership checks need root")


def _owner() -> str:
    if not ROOT:
        return pwd.getpwuid(os.getuid()).pw_name
    from harness import ensure_test_user
    return ensure_test_user()


@pytest.fixture
def site():
    # Under /tmp with mode 755: mail_owner must be able to reach the tables.
    base = tempfile.mkdtemp(prefix="pwcheck-", dir="/tmp")
    os.chmod(base, 0o755)
    os.mkdir(os.path.join(base, "etc"))
    yield base
    shutil.rmtree(base, ignore_errors=True)


def write(site, main="", master="qmgr unix n - n 300 1 qmgr\n"):
    etc = os.path.join(site, "etc")
    with open(os.path.join(etc, "main.cf"), "w") as f:
        f.write(textwrap.dedent(f"""\
            queue_directory = {site}/queue
            data_directory = {site}/data
            maillog_file = {site}/maillog
            mail_owner = {_owner()}
            """) + textwrap.dedent(main))
    with open(os.path.join(etc, "master.cf"), "w") as f:
        f.write(master)
    return etc


def test_creates_missing_queue_directories(site):
    etc = write(site)
    fatal, warnings = run_check(etc)
    assert fatal is None, fatal
    assert not [w for w in warnings if "queue" in w], warnings
    owner = pwd.getpwnam(_owner())
    for name, (root_mode, user_mode, who) in QUEUE_LAYOUT.items():
        st = os.stat(os.path.join(site, "queue", name))
        assert stat.S_IMODE(st.st_mode) == (root_mode if ROOT else user_mode), name
        if ROOT:
            assert st.st_uid == (0 if who == "root" else owner.pw_uid), name
    # A second run finds everything in order.
    assert run_check(etc) == (None, [])


def test_group_or_other_access_is_reported(site):
    etc = write(site)
    run_check(etc)
    active = os.path.join(site, "queue", "active")
    os.chmod(active, 0o777)
    deferred = os.path.join(site, "queue", "deferred")
    os.chmod(deferred, 0o750)
    _, warnings = run_check(etc)
    assert f"group or other writable: {active}" in warnings
    assert f"group or other accessible: {deferred}" in warnings
    os.chmod(os.path.join(site, "queue"), 0o777)
    _, warnings = run_check(etc)
    assert f"group or other writable: {site}/queue/." in warnings


@needs_root
def test_wrong_owner_is_reported(site):
    etc = write(site)
    run_check(etc)
    incoming = os.path.join(site, "queue", "incoming")
    os.chown(incoming, 0, 0)
    pid = os.path.join(site, "queue", "pid")
    owner = pwd.getpwnam(_owner())
    os.chown(pid, owner.pw_uid, owner.pw_gid)
    os.makedirs(os.path.join(site, "data"), exist_ok=True)
    os.chown(os.path.join(site, "queue"), owner.pw_uid, -1)
    _, warnings = run_check(etc)
    assert f"not owned by {_owner()}: {incoming}" in warnings
    assert f"not owned by root: {pid}" in warnings
    assert f"not owned by {_owner()}: {site}/data/." in warnings
    assert f"not owned by root: {site}/queue/." in warnings


@needs_root
def test_root_mail_owner_is_fatal(site):
    etc = write(site, "mail_owner = root\n")
    fatal, _ = run_check(etc)
    assert fatal == f"file {etc}/main.cf: parameter mail_owner: user root has privileged user ID"


@needs_root
def test_unknown_mail_owner_is_fatal_as_root(site):
    etc = write(site, "mail_owner = no-such-user-here\n")
    fatal, _ = run_check(etc)
    assert fatal == (f"file {etc}/main.cf: parameter mail_owner: unknown user name value: "
                     "no-such-user-here")


def test_only_tables_postfix_could_open_are_reported(site):
    """Postfix's check opens no table: missing files (aliases.db before
    newaliases, a transport.db never built) are left to the daemons' own
    warnings.  A type postwell lacks is reported, in Postfix's words."""
    with open(os.path.join(site, "etc", "ok"), "w") as f:
        f.write("a b\n")
    etc = write(site, f"""\
        transport_maps = hash:{site}/etc/transport
        virtual_alias_maps = texthash:{site}/etc/ok, inline:{{x=y, z=w}}
        smtpd_recipient_restrictions = permit_mynetworks,
            check_recipient_access texthash:{site}/etc/access,
            check_policy_service unix:private/policy, reject_unauth_destination
        header_checks = regexp:{site}/etc/header_checks
        relay_domains = example.test, texthash:{site}/etc/relay
        alias_maps = hash:{site}/etc/aliases, nis:mail.aliases
        alias_database = hash:{site}/etc/aliases
        """)
    with open(os.path.join(site, "etc", "aliases"), "w") as f:
        f.write("root: admin\n")          # no aliases.db: newaliases never ran
    fatal, warnings = run_check(etc)
    assert fatal is None
    tables = [w for w in warnings if "unavailable" in w]
    assert tables == ["nis:mail.aliases is unavailable. unsupported dictionary type: nis"]
    assert not any("policy" in w or "/etc/ok" in w or "inline" in w for w in warnings)


@needs_root
def test_table_unreadable_by_mail_owner(site):
    path = os.path.join(site, "etc", "secret")
    with open(path, "w") as f:
        f.write("a b\n")
    os.chmod(path, 0o600)        # root can read it; the daemons (mail_owner) cannot
    etc = write(site, f"virtual_alias_maps = texthash:{path}\n")
    _, warnings = run_check(etc)
    assert f"texthash:{path} is unavailable. open database {path}: Permission denied" in warnings


def test_table_specs_only_explicit_settings(site):
    from postwell.config import load_config
    etc = write(site, "mynetworks = 127.0.0.0/8 [::1]/128 cidr:/x/nets\n")
    specs = table_specs(load_config(etc))
    assert specs == ["cidr:/x/nets"]     # default alias_maps (nis:...) is not checked


@needs_root
def test_pipe_service_as_root_is_reported(site):
    etc = write(site, master="qmgr unix n - n 300 1 qmgr\n"
                "bad unix - n n - - pipe user=root argv=/bin/true\n"
                "unused unix - n n - - pipe user=no-such-vmail argv=/bin/true\n")
    _, warnings = run_check(etc)
    assert (f"{etc}/master.cf: line 2: service bad: user= command-line attribute specifies "
            "root privileges") in warnings
    assert not any("no-such-vmail" in w for w in warnings)


def test_cli_exit_status(site):
    etc = write(site, "queue_directory = relative/path\n")
    cp = subprocess.run([sys.executable, "-m", "postwell.cli.postfix", "-c", etc, "check"],
                        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert cp.returncode == 1
    # As Postfix's postfix(1): stderr only on a terminal; the maillog has it.
    assert cp.stderr == ""
    with open(os.path.join(site, "maillog")) as f:
        assert re.search(r" postfix\[\d+\]: fatal: .*parameter queue_directory: value must be an "
                         r"absolute path: relative/path$", f.read(), re.M)
    err = harness.stderr_on_tty([sys.executable, "-m", "postwell.cli.postfix", "-c", etc, "check"])
    assert "postfix: fatal: " in err and "value must be an absolute path: relative/path" in err
    etc = write(site)
    cp = subprocess.run([sys.executable, "-m", "postwell.cli.postfix", "-c", etc, "check"],
                        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert cp.returncode == 0, cp.stderr


def test_configuration_files(site):
    etc = write(site)
    os.chmod(os.path.join(etc, "main.cf"), 0o666)
    _, warnings = run_check(etc)
    assert f"group or other writable: {etc}/./main.cf" in warnings
    os.chmod(os.path.join(etc, "main.cf"), 0o644)
    if ROOT:
        owner = pwd.getpwnam(_owner())
        os.chown(os.path.join(etc, "master.cf"), owner.pw_uid, -1)
        _, warnings = run_check(etc)
        assert warnings == [f"not owned by root: {etc}/./master.cf"]
