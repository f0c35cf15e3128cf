"""Master supervision logic in-process: crash-loop throttling, restart of a
normal exit, service planning and listener binding (no daemonizing)."""

import os
import socket
import time
from types import SimpleNamespace

import pytest

from postwell.config.main import Config
from postwell.config.master import MasterService
from postwell.log import NullLog
from postwell.master import services as sv
from postwell.master.daemon import Master, Slot


def svc(name, type_, command, maxproc=None, overrides=None, line=1):
    return MasterService(name, type_, False, True, False, "-", maxproc, command, [], overrides or {}, line)


def make_master(tmp_path, behaviour):
    m = Master(str(tmp_path))
    m.config = Config(str(tmp_path), {"service_throttle_time": "60s"}, {}, [])
    m.log = NullLog("master")
    m._pipe_r, m._pipe_w = os.pipe()
    slot = Slot("qmgr", None, m.config, [], 1, key=("qmgr",))
    m.slots = [slot]

    def child_main(_slot):
        if behaviour == "crash":
            raise SystemExit(1)
        time.sleep(0.2)
    m._child_main = child_main
    return m, slot


def wait_reaped(m, timeout=5):
    deadline = time.monotonic() + timeout
    while m.children and time.monotonic() < deadline:
        m._reap()
        time.sleep(0.02)


def test_crash_at_startup_is_throttled(tmp_path):
    m, slot = make_master(tmp_path, "crash")
    m._start_missing()
    assert len(slot.children) == 1
    pid = next(iter(slot.children))
    wait_reaped(m)
    assert any(f"process /usr/lib/postfix/sbin/qmgr pid {pid} exit status 1" in l for l in m.log.lines)
    assert any("bad command startup -- throttling" in l for l in m.log.lines)
    assert slot.throttled_until > time.monotonic() + 50
    m._start_missing()
    assert not slot.children          # no crash loop: nothing forked while throttled
    slot.throttled_until = 0
    m._start_missing()
    wait_reaped(m)


def test_normal_exit_is_restarted_without_warning(tmp_path):
    m, slot = make_master(tmp_path, "ok")
    m._start_missing()
    wait_reaped(m)
    assert not [l for l in m.log.lines if "warning" in l]
    m._start_missing()
    assert len(slot.children) == 1
    wait_reaped(m)


def test_plan_maps_postfix_services():
    services = [svc("smtp", "inet", "smtpd"), svc("pickup", "unix", "pickup"),
                svc("cleanup", "unix", "cleanup"), svc("qmgr", "unix", "qmgr"),
                svc("tlsmgr", "unix", "tlsmgr"), svc("maildrop", "unix", "pipe"),
                svc("proxywrite", "unix", "proxymap"), svc("policy", "unix", "spawn"),
                svc("postlog", "unix-dgram", "postlogd"), svc("uucp", "unix", "pipe")]
    plan = sv.plan_services(services)
    assert [s.name for s in plan.smtpd] == ["smtp"]
    assert plan.qmgr.name == "qmgr"
    assert plan.pickup.name == "pickup"
    assert [s.name for s in plan.pipe] == ["maildrop", "uucp"]
    assert [s.name for s in plan.spawn] == ["policy"]
    assert plan.unsupported == []


STOCK_SERVICES = """\
smtp      inet  n       -       y       -       -       smtpd
pickup    unix  n       -       y       60      1       pickup
cleanup   unix  n       -       y       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       y       1000?   1       tlsmgr
rewrite   unix  -       -       y       -       -       trivial-rewrite
bounce    unix  -       -       y       -       0       bounce
defer     unix  -       -       y       -       0       bounce
trace     unix  -       -       y       -       0       bounce
verify    unix  -       -       y       -       1       verify
flush     unix  n       -       y       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       y       -       -       smtp
relay     unix  -       -       y       -       -       smtp
showq     unix  n       -       y       -       -       showq
error     unix  -       -       y       -       -       error
retry     unix  -       -       y       -       -       error
discard   unix  -       -       y       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       y       -       -       lmtp
anvil     unix  -       -       y       -       1       anvil
scache    unix  -       -       y       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
maildrop  unix  -       n       n       -       -       pipe
  flags=DRXhu user=vmail argv=/usr/bin/maildrop -d ${recipient}
uucp      unix  -       n       n       -       -       pipe
  flags=Fqhu user=uucp argv=uux -r -n -z -a$sender - $nexthop!rmail ($recipient)
"""


def test_stock_master_cf_draws_no_warning():
    from postwell.config.master import parse_master_cf
    plan = sv.plan_services(parse_master_cf(STOCK_SERVICES))
    assert plan.unsupported == []
    assert [s.name for s in plan.pipe] == ["maildrop", "uucp"] and plan.pickup is not None


def test_worker_count():
    cfg = Config("/tmp", {}, {}, [])
    assert sv.worker_count(svc("smtp", "inet", "smtpd", maxproc=1), cfg) == 1
    assert sv.worker_count(svc("smtp", "inet", "smtpd"), cfg) == min(100, os.cpu_count() or 1)
    assert sv.worker_count(svc("smtp", "inet", "smtpd", maxproc=0), cfg) >= 1


def test_bind_loopback_backlog_and_addresses():
    cfg = Config("/tmp", {"inet_interfaces": "loopback-only", "inet_protocols": "ipv4"}, {}, [])
    addrs = sv.bind_addresses(svc("2525", "inet", "smtpd"), cfg)
    assert addrs == [(socket.AF_INET, "127.0.0.1", 2525)]
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    socks = sv.bind_service(svc(f"127.0.0.1:{port}", "inet", "smtpd"), cfg)
    try:
        assert len(socks) == 1
        assert socks[0].getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)
        with pytest.raises(OSError, match=f"bind 127.0.0.1 port {port}: Address already in use"):
            sv.bind_service(svc(f"127.0.0.1:{port}", "inet", "smtpd"), cfg)
    finally:
        for x in socks:
            x.close()
    all_cfg = Config("/tmp", {"inet_interfaces": "all", "inet_protocols": "ipv4"}, {}, [])
    assert sv.bind_addresses(svc("smtp", "inet", "smtpd"), all_cfg) == [(socket.AF_INET, "0.0.0.0", 25)]


def _config_dir(tmp_path, main_extra=""):
    (tmp_path / "main.cf").write_text(
        f"queue_directory = {tmp_path}/queue\ndata_directory = {tmp_path}/data\n"
        f"maillog_file = {tmp_path}/maillog\n" + main_extra)
    (tmp_path / "master.cf").write_text("127.0.0.1:2525 inet n - n - - smtpd\n")
    return str(tmp_path)


@pytest.mark.skipif(os.geteuid() != 0, reason="mail_owner checks apply to root")
def test_check_refuses_root_mail_owner(tmp_path):
    from postwell.master.check import run_check
    fatal, _ = run_check(_config_dir(tmp_path, "mail_owner = root\n"))
    assert fatal and "parameter mail_owner: user root has privileged user ID" in fatal
    fatal, _ = run_check(_config_dir(tmp_path, "mail_owner = no-such-user-here\n"))
    assert fatal and "unknown user name value: no-such-user-here" in fatal


def test_check_relative_queue_directory_is_fatal(tmp_path):
    from postwell.master.check import run_check
    d = _config_dir(tmp_path, "queue_directory = relative/queue\nmail_owner = nobody\n")
    fatal, _ = run_check(d)
    assert fatal and "queue_directory" in fatal


def test_startup_parameter_warnings_are_not_noisy():
    """Stock Debian main.cf settings and per-transport agent parameters draw
    no warning; a parameter nothing honours still does."""
    import subprocess
    import sys
    code = r'''
import json, sys
from postwell.config.main import Config
from postwell.config.master import parse_master_cf
from postwell.master.daemon import unimplemented_parameter_names
params = {"biff": "no", "readme_directory": "no", "html_directory": "/usr/share/doc/postfix/html",
          "setgid_group": "postdrop", "smtp_tls_session_cache_database": "btree:x",
          "maildrop_destination_recipient_limit": "1", "lmtp_lhlo_name": "me.test",
          "lmtp_destination_recipient_limit": "5", "maildrop_time_limit": "60s",
          "command_time_limit": "100s", "postscreen_dnsbl_sites": "zen.example"}
services = parse_master_cf("maildrop unix - n n - - pipe user=vmail argv=/bin/true\n"
                           "lmtp unix - - n - - lmtp\n")
print(json.dumps(unimplemented_parameter_names(Config("/tmp", params, {}, services))))
'''
    # A fresh interpreter: nothing imported yet, as in the master at start.
    cp = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert cp.returncode == 0, cp.stderr
    import json
    assert json.loads(cp.stdout) == ["postscreen_dnsbl_sites"]


def test_pipe_helper_and_pickup_slots(tmp_path):
    from postwell.config.master import parse_master_cf
    m = Master(str(tmp_path))
    m.log = NullLog("master")
    m.owner = (1234, 1234, "pwowner")     # as if root: privileged helpers are planned
    with_pipe = Config(str(tmp_path), {}, {}, parse_master_cf(
        "pickup unix n - n 60 1 pickup\n"
        "maildrop unix - n n - - pipe flags=DRhu user=vmail argv=/bin/true\n"))
    kinds = [s.kind for s in m._make_slots(with_pipe, {}, warn=True)]
    assert kinds == ["anvil", "helper", "localhelper", "pipehelper", "qmgr", "pickup", "showq"]
    assert not [line for line in m.log.lines if "warning" in line]
    without = Config(str(tmp_path), {}, {}, parse_master_cf("qmgr unix n - n 300 1 qmgr\n"))
    assert "pipehelper" not in [s.kind for s in m._make_slots(without, {}, warn=True)]
    m.owner = None                         # not root: the qmgr runs commands itself
    assert "pipehelper" not in [s.kind for s in m._make_slots(with_pipe, {}, warn=True)]
