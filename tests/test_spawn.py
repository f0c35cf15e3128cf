"""spawn(8) services in master.cf (postwell.spawn, master integration).

Expected texts were checked against a running Postfix 3.7 spawn(8): the
warnings for a failing command, the fatal attribute errors, the command's
environment, working directory and groups.
"""

from __future__ import annotations

import json
import os
import pwd
import socket
import sys
import time
from types import SimpleNamespace

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from harness import PostwellInstance, dialogue, free_port, is_root, wait_for  # noqa: E402

from postwell import spawn  # noqa: E402
from postwell.config import load_config  # noqa: E402
from postwell.log import NullLog  # noqa: E402
from postwell.master import services as sv  # noqa: E402

PY3 = "/usr/bin/python3"   # readable by every user, unlike a Python under /root


# ------------------------------------------------------------------ helpers

def pw(name, uid, gid):
    return SimpleNamespace(pw_name=name, pw_uid=uid, pw_gid=gid)


USERS = {"policyd": pw("policyd", 500, 500), "root": pw("root", 0, 0),
         "postfix": pw("postfix", 102, 105)}
GROUPS = {"daemon": SimpleNamespace(gr_gid=1), "root": SimpleNamespace(gr_gid=0),
          "postfix": SimpleNamespace(gr_gid=105)}


def parse(words, owner="postfix"):
    return spawn.parse_attributes(words.split(), mail_owner=owner,
                                  getpwnam=lambda n: USERS[n], getgrnam=lambda n: GROUPS[n])


def make_config(tmp_path, main="", master="x unix - n n - 0 spawn user=nobody argv=/bin/cat\n"):
    d = tmp_path / "etc"
    d.mkdir(exist_ok=True)
    (d / "main.cf").write_text(f"queue_directory = {tmp_path}/queue\n" + main)
    (d / "master.cf").write_text(master)
    return load_config(str(d))


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


# ------------------------------------------------------------------ attributes

def test_attributes_user_and_argv():
    a = parse("user=policyd argv=/usr/bin/policyd-spf -v  x")
    assert (a.user, a.uid, a.gid, a.argv) == ("policyd", 500, 500, ["/usr/bin/policyd-spf", "-v", "x"])


def test_attributes_group_and_daemon_options():
    a = parse("-o smtpd_foo=1 -v user=policyd:daemon argv=/bin/cat")
    assert (a.uid, a.gid) == (500, 1)


@pytest.mark.parametrize("words,error", [
    ("argv=/bin/cat", "missing user= attribute"),
    ("user=policyd", "missing argv= attribute"),
    ("user=policyd argv=", "missing argv= attribute"),
    ("user=nosuch argv=/bin/cat", "unknown user name: nosuch"),
    ("user=policyd:nosuch argv=/bin/cat", "unknown group name: nosuch"),
    ("user=policyd flags=R argv=/bin/cat", "unknown attribute name: flags=R"),
    ("user=root argv=/bin/cat", "request to deliver as root"),
    ("user=postfix argv=/bin/cat", "request to deliver as mail system owner"),
    ("user=policyd:root argv=/bin/cat", "request to use privileged group id 0"),
    ("user=policyd:postfix argv=/bin/cat", "request to use mail system owner group id 105"),
])
def test_attribute_errors_use_postfix_wording(words, error):
    with pytest.raises(spawn.SpawnConfigError) as exc:
        parse(words)
    assert str(exc.value) == error


def test_unprivileged_service_is_refused():
    svc = SimpleNamespace(name="pol", unpriv=True)
    assert spawn.service_check(svc) == "service pol requires privileged operation"
    assert spawn.service_check(SimpleNamespace(name="pol", unpriv=False)) is None


# ------------------------------------------------------------------ configuration

def test_socket_path_private_public_absolute(tmp_path):
    cfg = make_config(tmp_path, master=(
        "a unix - n n - 0 spawn user=nobody argv=/bin/cat\n"
        "b unix n n n - 0 spawn user=nobody argv=/bin/cat\n"
        "/run/c unix - n n - 0 spawn user=nobody argv=/bin/cat\n"))
    a, b, c = cfg.services
    q = f"{tmp_path}/queue"
    assert spawn.socket_path(cfg, a) == f"{q}/private/a"
    assert spawn.socket_path(cfg, b) == f"{q}/public/b"
    assert spawn.socket_path(cfg, c) == "/run/c"


def test_time_limit_per_service_then_command_time_limit(tmp_path):
    cfg = make_config(tmp_path, main="policyd-spf_time_limit = 3600\n")
    assert spawn.time_limit(cfg, "policyd-spf") == 3600
    assert spawn.time_limit(cfg, "other") == 1000      # $command_time_limit default
    cfg = make_config(tmp_path, main="command_time_limit = 20s\n")
    assert spawn.time_limit(cfg, "other") == 20


def test_process_limit(tmp_path):
    cfg = make_config(tmp_path, master=(
        "a unix - n n - 0 spawn user=nobody argv=/bin/cat\n"
        "b unix - n n - 3 spawn user=nobody argv=/bin/cat\n"
        "c unix - n n - - spawn user=nobody argv=/bin/cat\n"))
    a, b, c = cfg.services
    assert spawn.process_limit(a, cfg) == spawn.UNLIMITED
    assert spawn.process_limit(b, cfg) == 3
    assert spawn.process_limit(c, cfg) == 100           # $default_process_limit


def test_environment_is_export_environment_of_imported(tmp_path):
    cfg = make_config(tmp_path)
    env = spawn.command_environment(cfg, {"TZ": "UTC", "HOME": "/root", "SECRET": "x",
                                          "LANG": "de_DE.UTF-8", "MAIL_CONFIG": "/etc/pf"})
    # LANG=C in import_environment wins over the caller's LANG, as in Postfix.
    assert env == {"TZ": "UTC", "MAIL_CONFIG": "/etc/pf", "LANG": "C", "PATH": "/usr/bin:/bin"}
    env = spawn.command_environment(cfg, {})
    assert env["MAIL_CONFIG"] == cfg.config_dir and "TZ" not in env


def test_plan_and_registry(tmp_path):
    cfg = make_config(tmp_path, main="pol_time_limit = 3600\n", master=(
        "pol unix - n n - 0 spawn user=nobody argv=/bin/cat\n"
        "127.0.0.1:10099 inet n n n - 0 spawn user=nobody argv=/bin/cat\n"
        "f fifo - n n - 0 spawn user=nobody argv=/bin/cat\n"))
    plan = sv.plan_services(cfg.services)
    assert [s.name for s in plan.spawn] == ["pol", "127.0.0.1:10099"]
    assert [(s.name, why) for s, why in plan.unsupported] == [
        ("f", "spawn on a fifo socket is not implemented")]
    from postwell.config.registry import unimplemented_parameters, unused_parameters
    assert "pol_time_limit" not in unimplemented_parameters(cfg)
    assert unused_parameters(cfg) == []


def test_bind_unix_replaces_stale_socket_only(tmp_path):
    path = str(tmp_path / "private" / "pol")
    s1 = spawn.bind_unix(path, None)
    s1.close()                       # a stale socket file from a dead master
    s2 = spawn.bind_unix(path, None)
    try:
        assert oct(os.stat(path).st_mode & 0o777) == oct(spawn.SOCKET_MODE)
    finally:
        s2.close()
    other = tmp_path / "private" / "file"
    other.write_text("x")
    with pytest.raises(OSError):
        spawn.bind_unix(str(other), None)
    assert other.read_text() == "x"


# ------------------------------------------------------------------ the supervisor, in process

def server_for(tmp_path, argv, *, limit="0", main="", clock=None):
    (tmp_path / "queue").mkdir(exist_ok=True)
    cfg = make_config(tmp_path, main=main,
                      master=f"t unix - n n - {limit} spawn user=nobody argv={argv}\n")
    svc = cfg.services[0]
    lsock = spawn.bind_unix(spawn.socket_path(cfg, svc), None)
    log = NullLog("spawn")
    # euid 1000: no user switch, so the test needs no readable-by-nobody files.
    srv = spawn.SpawnServer(cfg, svc, [lsock], log=log, clock=clock or time.monotonic,
                            euid=lambda: 1000)
    return srv, log, spawn.socket_path(cfg, svc)


def log_texts(log):
    return list(log.lines)


def drive(srv, until, timeout=10.0):
    """Run the supervisor's loop body until ``until()`` holds (bounded)."""
    import select
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        ready, _, _ = select.select(srv.listening(), [], [], min(0.05, srv.next_timeout()))
        srv.reap()
        srv.accept_ready(ready)
        srv.reap()
        if until():
            return
    raise TimeoutError("supervisor condition")


def connect(path, data=b""):
    c = socket.socket(socket.AF_UNIX)
    c.settimeout(10)
    c.connect(path)
    if data:
        c.sendall(data)
    return c


def test_not_root_says_so_once(tmp_path):
    srv, log, _ = server_for(tmp_path, "/bin/cat")
    me = pwd.getpwuid(os.getuid()).pw_name
    text = "\n".join(log_texts(log))
    assert f"service t: not running as root: command /bin/cat runs as user {me}, not as nobody" in text
    srv.stop()


def test_command_gets_the_connection_and_exit_status_is_logged(tmp_path):
    script = tmp_path / "echo.sh"
    script.write_text("#!/bin/sh\nread x\necho \"got $x in $(pwd)\"\necho err >&2\nexit 3\n")
    script.chmod(0o755)
    srv, log, path = server_for(tmp_path, script)
    c = connect(path, b"hello\n")
    drive(srv, lambda: not srv.running and any("exit status" in t for t in log_texts(log)))
    data = b""
    while True:
        chunk = c.recv(4096)
        if not chunk:
            break
        data += chunk
    c.close()
    assert data == f"got hello in {tmp_path}/queue\nerr\n".encode()
    assert any(t.endswith(f"command {script} exit status 3") for t in log_texts(log))
    srv.stop()


def test_signal_is_logged(tmp_path):
    srv, log, path = server_for(tmp_path, "/bin/sh -c {kill -ABRT $$}")
    c = connect(path)
    drive(srv, lambda: any("killed by signal" in t for t in log_texts(log)))
    c.close()
    assert any(t.endswith("command /bin/sh killed by signal 6") for t in log_texts(log))
    srv.stop()


def test_time_limit_kills_the_session(tmp_path):
    clock = FakeClock()
    srv, log, path = server_for(tmp_path, "/bin/sh -c {sleep 60 & sleep 60}", main="t_time_limit = 30s\n",
                                clock=clock)
    assert srv.time_limit == 30
    c = connect(path)
    drive(srv, lambda: srv.running)
    pid = srv.running[0].proc.pid
    srv.reap()
    assert srv.running and not any("time limit" in t for t in log_texts(log))
    clock.now += 31
    drive(srv, lambda: not srv.running)
    texts = log_texts(log)
    assert any(t.endswith(f"/bin/sh: process id {pid}: command time limit exceeded")
               for t in texts), texts
    assert not any("killed by signal" in t for t in texts)   # Postfix reports the limit only
    # The background sleep died too (a zombie at most, if nobody reaps orphans here).
    wait_for(lambda: not live_in_group(pid), 10, 0.05, "process group to die")
    c.close()
    srv.stop()


def live_in_group(pgid):
    live = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            live.append(int(entry))
    return live


def test_maxproc_bounds_running_commands(tmp_path):
    srv, log, path = server_for(tmp_path, "/bin/cat", limit="2")
    conns = [connect(path) for _ in range(3)]
    drive(srv, lambda: len(srv.running) == 2)
    time.sleep(0.2)
    drive(srv, lambda: True)
    assert len(srv.running) == 2 and srv.listening() == []
    conns[0].close()                     # cat sees EOF and exits: the third client gets its turn
    drive(srv, lambda: len(srv.running) == 2 and _third_started(srv, conns))
    for c in conns:
        c.close()
    srv.stop()
    assert not srv.running


def _third_started(srv, conns):
    try:
        conns[2].sendall(b"ping\n")
        conns[2].settimeout(0.05)
        return conns[2].recv(10) == b"ping\n"
    except (socket.timeout, OSError):
        return False


def test_bad_attributes_are_fatal_per_connection_and_throttle(tmp_path):
    clock = FakeClock()
    (tmp_path / "queue").mkdir()
    cfg = make_config(tmp_path, master="t unix - n n - 0 spawn argv=/bin/cat\n")
    svc = cfg.services[0]
    lsock = spawn.bind_unix(spawn.socket_path(cfg, svc), None)
    log = NullLog("spawn")
    srv = spawn.SpawnServer(cfg, svc, [lsock], log=log, clock=clock, euid=lambda: 1000)
    c = connect(spawn.socket_path(cfg, svc))
    drive(srv, lambda: any("missing user=" in t for t in log_texts(log)))
    assert c.recv(10) == b""
    assert srv.listening() == []                 # throttled for service_throttle_time
    clock.now += 61
    assert srv.listening() == srv.sockets
    c.close()
    srv.stop()


def test_unprivileged_service_fails_at_connection(tmp_path):
    (tmp_path / "queue").mkdir()
    cfg = make_config(tmp_path, master="t unix - - n - 0 spawn user=nobody argv=/bin/cat\n")
    svc = cfg.services[0]
    lsock = spawn.bind_unix(spawn.socket_path(cfg, svc), None)
    log = NullLog("spawn")
    srv = spawn.SpawnServer(cfg, svc, [lsock], log=log, euid=lambda: 1000)
    c = connect(spawn.socket_path(cfg, svc))
    drive(srv, lambda: log_texts(log)[-1:] == ["fatal: service t requires privileged operation"])
    c.close()
    srv.stop()


def test_stop_ends_running_commands_quietly(tmp_path):
    srv, log, path = server_for(tmp_path, "/bin/cat")
    c = connect(path)
    drive(srv, lambda: srv.running)
    pid = srv.running[0].proc.pid
    srv.stop()
    assert not srv.running and srv.listening() == []
    assert not any("killed by signal" in t for t in log_texts(log))
    wait_for(lambda: not live_in_group(pid), 10, 0.05, "command to end")
    with pytest.raises(OSError):
        connect(path)                                      # the listener is closed
    c.close()


def test_exec_failure_is_logged(tmp_path):
    srv, log, path = server_for(tmp_path, str(tmp_path / "missing"))
    c = connect(path)
    drive(srv, lambda: any("execvp" in t for t in log_texts(log)))
    texts = log_texts(log)
    assert any(t.endswith(f"spawn_comand: execvp {tmp_path}/missing: No such file or directory")
               for t in texts)
    assert any(t.endswith(f"command {tmp_path}/missing exit status 1") for t in texts)
    c.close()
    srv.stop()


# ------------------------------------------------------------------ end to end

POLICY = """#!/usr/bin/python3
# A tiny SMTP access policy server (Postfix SMTPD_POLICY_README protocol).
import os, sys
attrs = {}
for line in sys.stdin:
    line = line.rstrip("\\n")
    if line:
        k, _, v = line.partition("=")
        attrs[k] = v
        continue
    who = "%d:%d:%s" % (os.getuid(), os.getgid(), os.getcwd())
    if attrs.get("recipient", "").startswith("blocked@"):
        sys.stdout.write("action=REJECT 5.7.1 spawned policy says no (%s)\\n\\n" % who)
    else:
        sys.stdout.write("action=DUNNO\\n\\n")
    sys.stdout.flush()
    attrs = {}
"""


@pytest.fixture
def spawn_instance(tmp_path):
    if not os.access(PY3, os.X_OK):
        pytest.skip(f"{PY3} is needed for a script any user can run")
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user nobody")
    # The commands run as nobody (spawn refuses root and mail_owner).
    inst = PostwellInstance(tmp_path, main_cf={
        "smtpd_recipient_restrictions":
            "check_policy_service unix:private/policy, permit_mynetworks, reject_unauth_destination",
        "policy_time_limit": "3600",
        "hang_time_limit": "2s",
    })
    bindir = inst.root / "bin"
    bindir.mkdir()
    os.chmod(bindir, 0o755)
    scripts = {"policy": POLICY,
               "hang": "#!/bin/sh\nsleep 60\n",
               "crash": "#!/bin/sh\nread x\nexit 7\n"}
    for name, text in scripts.items():
        (bindir / name).write_text(text)
        os.chmod(bindir / name, 0o755)
    echo_port = free_port()
    inst.master_cf = inst.default_master_cf() + "".join(
        f"{name} unix - n n - 0 spawn user=nobody argv={bindir}/{name}\n" for name in scripts) + (
        f"127.0.0.1:{echo_port} inet n n n - 2 spawn user=nobody argv=/bin/cat\n")
    inst.echo_port = echo_port
    inst.write_config()
    inst.start()
    try:
        yield inst, nobody
    finally:
        inst.stop()


def test_e2e_policy_reject_time_limit_and_crash(spawn_instance):
    inst, nobody = spawn_instance
    replies = dialogue(inst.port, ["EHLO client.example", "MAIL FROM:<a@example.org>",
                                   "RCPT TO:<someone@example.net>",
                                   "RCPT TO:<blocked@example.net>", "QUIT"])
    assert replies[3].code == 250, [str(r) for r in replies]   # DUNNO, then permit_mynetworks
    rcpt = replies[4]
    assert rcpt.code == 554, [str(r) for r in replies]
    assert "spawned policy says no" in rcpt.text
    if is_root():
        assert f"({nobody.pw_uid}:{nobody.pw_gid}:{inst.queue_dir})" in rcpt.text
    log = inst.log_text()
    assert "not implemented" not in log or "command spawn" not in log
    assert "policy_time_limit" not in log                 # honoured: no start-up warning

    sock = os.path.join(inst.queue_dir, "private")
    if is_root():
        st = os.stat(os.path.join(sock, "policy"))
        assert (st.st_uid, st.st_mode & 0o777) == (inst.uid, 0o666)
    hang = connect(os.path.join(sock, "hang"))
    m = inst.wait_log(r"postfix/spawn\[\d+\]: warning: \S+/bin/hang: process id (\d+): "
                      r"command time limit exceeded", timeout=15)
    hang.settimeout(10)
    assert hang.recv(10) == b""                           # the command is gone, the socket closed
    hang.close()
    wait_for(lambda: not os.path.exists(f"/proc/{m.group(1)}"), 10, 0.05, "hung command to die")

    crash = connect(os.path.join(sock, "crash"), b"x\n")
    inst.wait_log(r"postfix/spawn\[\d+\]: warning: command \S+/bin/crash exit status 7", timeout=10)
    crash.close()


def echo(conn, data=b"ping\n"):
    conn.sendall(data)
    got = b""
    while len(got) < len(data):
        chunk = conn.recv(100)
        if not chunk:
            break
        got += chunk
    return got


def test_e2e_inet_service_survives_reload(spawn_instance):
    inst, _ = spawn_instance
    first = socket.create_connection(("127.0.0.1", inst.echo_port), timeout=10)
    assert echo(first) == b"ping\n"
    inst.cli("reload", check=True)
    inst.wait_log(r"postfix/master\[\d+\]: reload -- version", timeout=10)
    # The conversation in progress goes on (its supervisor drains) and the
    # listener, kept across the reload, takes new clients at once.
    assert echo(first, b"still\n") == b"still\n"
    second = socket.create_connection(("127.0.0.1", inst.echo_port), timeout=10)
    assert echo(second) == b"ping\n"
    first.close()
    second.close()
    assert "spawn" not in "".join(l for l in inst.log_text().splitlines(True) if "warning" in l)


# ------------------------------------------------------------------ side by side with Postfix

VIEW = """#!/usr/bin/python3
# What a spawned command sees, with the instance's own paths made generic.
import json, os, sys
etc, queue = sys.argv[1], sys.argv[2]
env = {k: v.replace(etc, "<etc>") for k, v in os.environ.items() if k != "LC_CTYPE"}
sys.stderr.write("to stderr\\n")
sys.stderr.flush()
print(json.dumps({"env": env, "cwd": os.getcwd().replace(queue, "<queue>"), "args": sys.argv[3:],
                  "ids": [os.getuid(), os.geteuid(), os.getgid(), os.getegid(), os.getgroups()],
                  "fds": sorted(os.listdir("/proc/self/fd")), "sid": os.getsid(0) == os.getpid()}))
"""


def _read_all(conn):
    out = b""
    while True:
        chunk = conn.recv(65536)
        if not chunk:
            return out
        out += chunk


def test_same_as_postfix_spawn(tmp_path):
    from harness import ReferencePostfix, reference_available
    reason = reference_available()
    if reason:
        pytest.skip(reason)
    if not os.access(PY3, os.X_OK):
        pytest.skip(f"{PY3} is needed for a script any user can run")
    pwd.getpwnam("nobody")
    results = {}
    for kind in ("postfix", "postwell"):
        ref = kind == "postfix"
        cls = ReferencePostfix if ref else PostwellInstance
        inst = cls(tmp_path / kind, name=kind)
        bindir = inst.root / "bin"
        bindir.mkdir()
        os.chmod(bindir, 0o755)
        (bindir / "view").write_text(VIEW)
        (bindir / "crash").write_text("#!/bin/sh\nread x\nexit 5\n")
        for name in ("view", "crash"):
            os.chmod(bindir / name, 0o755)
        services = (f"view unix - n n - 0 spawn user=nobody:daemon argv={bindir}/view "
                    f"{inst.config_dir} {inst.queue_dir} a {{b c}}\n"
                    f"crash unix - n n - 0 spawn user=nobody argv={bindir}/crash\n"
                    f"root unix - n n - 0 spawn user=root argv={bindir}/crash\n")
        if ref:
            inst.master_cf_extra = services
        else:
            inst.master_cf = inst.default_master_cf() + services
        inst.write_config()
        inst.start()
        try:
            private = os.path.join(inst.queue_dir, "private")
            with connect(os.path.join(private, "view")) as c:
                out = _read_all(c).decode()
            with connect(os.path.join(private, "crash"), b"x\n") as c:
                c.recv(10)
            inst.wait_log(r"spawn\[\d+\]: warning: command \S+/crash exit status 5")
            with connect(os.path.join(private, "root")) as c:
                try:
                    c.recv(10)
                except ConnectionResetError:
                    pass
            inst.wait_log(r"spawn\[\d+\]: fatal: request to deliver as root")
            st = os.stat(os.path.join(private, "view"))
            results[kind] = (out.split("\n", 1)[0], json.loads(out.split("\n", 1)[1]),
                             oct(st.st_mode & 0o777))
        finally:
            inst.stop()
    assert results["postwell"] == results["postfix"]
    assert results["postwell"][0] == "to stderr"
