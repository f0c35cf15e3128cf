"""Task H4: a malformed master.cf service as Postfix 3.7 handles it.

Postfix's master reads master.cf's fields and braces strictly (an error stops
it: at start "mail system startup failed", at a reload the master dies) but
leaves each daemon's command line to the daemon: a malformed `-o` (or an
unknown option) ends only that daemon, when the master starts it, with a
"fatal:" line, and the master throttles the service ("bad command startup").
postfix(1) and `postfix check` read master.cf with postconf, whose warnings go
to stderr once per postconf run of postfix-script.

Side-by-side parts run Debian's Postfix (by absolute path) on a twin
configuration and compare exit codes, stderr and log lines with instance
paths, pids and the version normalised; they are skipped without it.
"""

from __future__ import annotations

import os
import re
import socket
import time
from pathlib import Path

import pytest

import harness
from harness import PostwellInstance, ReferencePostfix, free_port, pid_alive, wait_for
from postwell.config.master import daemon_startup_error, parse_master_cf
from postwell.master import services as sv
from postwell.master.daemon import MasterError, load, postlog_entry_line

POSTLOG = "postlog   unix-dgram n  -       n       -       1       postlogd\n"


# ---------------------------------------------------------------- units

@pytest.mark.parametrize("args,expected", [
    # each observed as "postfix/pickup[pid]: fatal: ..." from Postfix 3.7's pickup
    ("-q", "invalid option: q"), ("-v -q", "invalid option: q"), ("-n", "invalid option: n"),
    ("-x", "invalid option: x"),
    ("-o {x y}", 'invalid "-o x y" option value: missing \'=\' after attribute name'),
    ("-o -v", 'invalid "-o -v" option value: missing \'=\' after attribute name'),
    ("-ofoo", 'invalid "-o foo" option value: missing \'=\' after attribute name'),
    ("-o =x", 'invalid "-o =x" option value: missing attribute name'),
    ("-o syslog_name=postfix/zz -o zz", 'invalid "-o zz" option value: missing \'=\' after '
                                        'attribute name'),
    ("-o { a = b } -o{c}", 'invalid "-o {c}" option value: missing \'=\' after attribute name'),
    ("-o", "invalid option: o"),
    # options end at the first other word (getopt's "+" mode); one is an error
    # when the daemon takes its first request
    ("junk", "unexpected command-line argument: junk"),
    ("-v junk -o a=b", "unexpected command-line argument: junk"),
    ("-- -q", "unexpected command-line argument: -q"),
    ("{a b}", "unexpected command-line argument: a b"),
    ("-v -o a=b -o { c = d e }", None), ("", None), ("-vv -Dn name -ozz=1", None),
])
def test_daemon_startup_error_in_postfix_words(args, expected):
    (svc,) = parse_master_cf(f"p unix n - n 60 1 pickup {args}\n", strict=True,
                             strict_options=False)
    assert daemon_startup_error(svc) == expected


@pytest.mark.parametrize("line,expected", [
    ("q unix n - n 300 1 qmgr a=b", "unexpected command-line argument: a=b"),
    # pipe and spawn read arguments of their own after the options
    ("m unix - n n - - pipe flags=F user=x argv=/bin/x -o", None),
    ("m unix - n n - - pipe -o foo flags=F user=x argv=/bin/x",
     'invalid "-o foo" option value: missing \'=\' after attribute name'),
    ("s unix - n n - - spawn user=x argv=/bin/x -q", None),
])
def test_daemon_arguments(line, expected):
    (svc,) = parse_master_cf(line + "\n", strict=True, strict_options=False)
    assert daemon_startup_error(svc) == expected


def _etc(tmp_path: Path, master: str) -> str:
    etc = tmp_path / "etc"
    etc.mkdir(exist_ok=True)
    (etc / "main.cf").write_text(f"queue_directory = {tmp_path}/q\n")
    (etc / "master.cf").write_text(master)
    return str(etc)


def test_master_reads_fields_strictly_and_options_leniently(tmp_path):
    etc = _etc(tmp_path, "smtp inet n - n - - smtpd -o foo -o a=b\n")
    (svc,) = load(etc).services
    assert svc.overrides == {"a": "b"}
    assert daemon_startup_error(svc).startswith('invalid "-o foo" option value')
    etc = _etc(tmp_path, "a unix - - n - - smtp\nx unix - - n - - smtp -o {foo\n")
    with pytest.raises(MasterError) as ei:
        load(etc)
    assert str(ei.value) == f"{etc}/master.cf: line 2: missing '}}' in \"{{foo\""
    assert ei.value.line == 2
    # postfix check's (postconf's) reading
    assert [s.name for s in load(etc, lenient=True).services] == ["a", "x"]


def test_duplicate_entries_keep_the_last():
    services = parse_master_cf(
        "127.0.0.1:2525 inet n - n - - smtpd\nx unix - - n - - smtp\nx unix n - n - - smtp\n"
        "127.0.0.1:2525 inet n - n - - smtpd -o a=b\nsmtp inet n - n - - smtpd\n"
        "25 inet n - n - - smtpd -o c=d\nx unix - - n - - lmtp\n")
    kept, warnings = sv.drop_duplicates(services)
    assert [(s.name, s.command, s.overrides) for s in kept] == [
        ("x", "smtp", {}), ("127.0.0.1:2525", "smtpd", {"a": "b"}), ("25", "smtpd", {"c": "d"}),
        ("x", "lmtp", {})]
    assert warnings == [
        'duplicate master.cf entry for service "127.0.0.1:2525" ([127.0.0.1]:2525) -- using the '
        'last entry',
        'duplicate master.cf entry for service "25" (25) -- using the last entry',
        'duplicate master.cf entry for service "x" (private/x) -- using the last entry']


@pytest.mark.parametrize("name,expected", [
    # Postfix 3.7 master's words (logged with "FILE: line N: " when marked True)
    ("127.0.0.1:nosuchsvc", ("127.0.0.1:nosuchsvc: Servname not supported for ai_socktype", False)),
    ("1.2.3.4.5:25", ('valid hostname or network address required in "1.2.3.4.5:25"', True)),
    ("[::1:2525", ('missing "]" in "[::1:2525"', True)),
    ("::1:2525", ("bad hostname or network address: ::1:2525", True)),
    ("127.0.0.1:0", None), ("[::1]:2525", None), ("smtp", None), ("localhost:2525", None),
])
def test_inet_address_errors_in_postfix_words(name, expected):
    (svc,) = parse_master_cf(f"{name} inet n - n - - smtpd\n")
    assert sv.inet_address_error(svc) == expected


@pytest.mark.parametrize("line,expected", [
    # Postfix 3.7 master's words as it reads master.cf (after "FILE: line N: ")
    ("127.0.0.1:2525 inet y - n - - smtpd", "inet service cannot be private"),
    ("127.0.0.1:2525 inet - - n - - smtpd", "inet service cannot be private"),
    ("127.0.0.1: inet n - n - - smtpd", 'missing service information in "127.0.0.1:"'),
    ("[::1] inet n - n - - smtpd", 'missing service information in "[::1]"'),
    ("1.2.3.4.5:25 inet y - n - - smtpd",
     'valid hostname or network address required in "1.2.3.4.5:25"'),
    ("127.0.0.1:nosuchsvc inet n - n - - smtpd", None),     # found when it listens
    ("smtp inet n - n - - smtpd", None),
])
def test_inet_entry_errors_in_postfix_words(line, expected):
    (svc,) = parse_master_cf(line + "\n")
    assert sv.inet_entry_error(svc) == expected


def test_postlog_entry_line(tmp_path):
    assert postlog_entry_line(_etc(tmp_path, "a unix - - n - - smtp\n" + POSTLOG)) == 2
    assert postlog_entry_line(_etc(tmp_path, "a unix - - n - - smtp\n")) is None


def test_reload_bind_waits_for_an_address_the_old_workers_release():
    import threading
    from postwell.master.daemon import _bind_waiting
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen(1)
    port = held.getsockname()[1]

    def bind():
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            s.close()
            raise
        return s
    with pytest.raises(OSError):
        _bind_waiting(bind, 0)
    threading.Timer(0.2, held.close).start()
    _bind_waiting(bind, 5).close()


# ---------------------------------------------------------------- side by side

_STAMP = re.compile(r"^\w{3} [ \d]\d \d\d:\d\d:\d\d \S+ ")


def _norm(inst, text: str) -> str:
    text = text.replace(str(inst.root), "R")
    text = re.sub(r"\[\d+\]", "[N]", text)
    text = re.sub(r"pid \d+", "pid N", text)
    text = re.sub(r"PID: \d+", "PID: N", text)
    for name in ("port2", "port"):
        if getattr(inst, name, None):
            text = text.replace(f":{getattr(inst, name)}", f":{name.upper()}")
    return re.sub(r"version [\w.]+,", "version V,", text)


def _log(inst, since: int = 0) -> list[str]:
    return [_norm(inst, _STAMP.sub("", line)) for line in inst.log_text().splitlines()[since:]]


def _run(inst, *args):
    cp = inst.cli(*args) if isinstance(inst, PostwellInstance) else inst.postfix(*args)
    return cp.returncode, _norm(inst, cp.stderr)


def _pair(tmp_path, extra_first: str = "", replace_pickup: str = ""):
    """A postwell and (when it can run here) a reference Postfix, not started,
    whose master.cf both begin with extra_first (same line numbers) and end
    with the postlog entry.  "{port2}" in extra_first is a port of each side's
    own (two instances must not share a listener)."""
    ours = PostwellInstance(tmp_path, name="ours")
    ours.port2 = free_port()
    (ours.config_dir / "master.cf").write_text(
        extra_first.replace("{port2}", str(ours.port2)) + ours.default_master_cf()
        + replace_pickup + POSTLOG)
    if harness.reference_available():
        return ours, None
    ref = ReferencePostfix(tmp_path, name="ref")
    ref.port2 = free_port()
    text = (ref.config_dir / "master.cf").read_text()
    if replace_pickup:
        text = re.sub(r"(?m)^pickup .*\n", replace_pickup, text)
    text = text.replace(POSTLOG, "")
    (ref.config_dir / "master.cf").write_text(
        extra_first.replace("{port2}", str(ref.port2)) + text + POSTLOG)
    ref.cool_config()
    return ours, ref


def _start(inst) -> None:
    """Start without the harness's extra `postfix check` (start runs one)."""
    if isinstance(inst, PostwellInstance):
        inst.start()
        return
    inst.postfix("start", check=True)
    inst.running = True
    harness.wait_banner(inst.port, 30)


def _stop(*insts) -> None:
    for inst in insts:
        if inst is not None:
            inst.stop()
            inst.cleanup()


DAMAGE = ("x unix n - n\n", "x bogus - - n - - smtp\n", "x unix - - n 5x - smtp\n",
          "x unix - - n - 1a smtp\n")


def test_damage_postconf_stops_every_command_like_postfix(tmp_path):
    """Field damage stops postfix-script at its first postconf run, whatever
    the command: postconf's fatal words on stderr, "cannot execute" logged.
    (Each of Postfix's fatal errors sleeps a second: the reference runs in
    parallel.)"""
    from concurrent.futures import ThreadPoolExecutor
    pairs = [_pair(tmp_path / str(n), extra_first=line) for n, line in enumerate(DAMAGE)]
    commands = ("start", "reload")        # (status, check: tests/test_cli_gaps7.py)
    try:
        with ThreadPoolExecutor(12) as pool:
            runs = {(n, inst.kind, c): pool.submit(_run, inst, c)
                    for n, pair in enumerate(pairs) for inst in pair if inst is not None
                    for c in commands}
            got = {key: future.result(60) for key, future in runs.items()}
        for n, (ours, ref) in enumerate(pairs):
            for command in commands:
                rc, err = got[n, "postwell", command]
                assert rc == 1 and err.startswith("/usr/sbin/postconf: fatal: ")
                assert err.count("\n") == 1
                if ref is not None:
                    assert got[n, "postwell", command] == got[n, "postfix", command], command
            for inst in (ours, ref):
                if inst is not None:
                    assert _log(inst) == ["postfix/postfix-script[N]: fatal: cannot execute "
                                          "/usr/sbin/postconf!"] * len(commands)
    finally:
        _stop(*(inst for pair in pairs for inst in pair))


def test_unclosed_brace_stops_the_master_not_check_like_postfix(tmp_path):
    """postconf only warns (once per postfix-script postconf run: 21 for check
    and start); check passes; the master dies of it at start, logged in the
    maillog because the entry comes before the postlog service."""
    ours, ref = _pair(tmp_path, extra_first="x unix - - n - - smtp -o {a} {b\n")
    warned = ('/usr/sbin/postconf: warning: master.cf: missing \'=\' after attribute name: "a"\n'
              '/usr/sbin/postconf: warning: master.cf: missing \'}\' in "{b"\n')

    def steps(inst):
        check = _run(inst, "check")
        mark = len(inst.log_text().splitlines())
        return check, _run(inst, "start"), _log(inst, mark), _run(inst, "status")

    try:
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(steps, inst) for inst in (ours, ref) if inst is not None]
            for future in futures:
                assert future.result(120) == ((0, warned * 21), (1, warned * 21), [
                    "postfix/postfix-script[N]: starting the Postfix mail system",
                    "postfix/master[N]: fatal: R/etc/master.cf: line 1: missing '}' in \"{b\"",
                    "postfix/postfix-script[N]: fatal: mail system startup failed"], (1, warned))
    finally:
        _stop(ours, ref)


def test_missing_master_cf_like_postfix(tmp_path):
    """postconf warns at each run; check-fatal stops after post-install's runs
    (start adds "integrity check failed")."""
    ours, ref = _pair(tmp_path)
    warned = "/usr/sbin/postconf: warning: open R/etc/master.cf: No such file or directory\n"

    def steps(inst):
        os.unlink(inst.config_dir / "master.cf")
        return _run(inst, "start"), _log(inst)

    try:
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(steps, inst) for inst in (ours, ref) if inst is not None]
            for future in futures:
                assert future.result(120) == (
                    (1, warned * 19), ["postfix/postfix-script[N]: fatal: no R/etc/master.cf file found",
                                       "postfix/postfix-script[N]: fatal: Postfix integrity check failed!"])
    finally:
        _stop(ours, ref)


def _banner(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.settimeout(5)
        return s.recv(100)


def _daemon_lines(lines: list[str]) -> list[str]:
    keep = (": fatal: ", " exit status ", "bad command startup", "duplicate master.cf")
    return sorted(line for line in lines if any(k in line for k in keep))


def test_broken_daemons_and_reloads_like_postfix(tmp_path):
    """A second smtpd and the pickup with a malformed -o: the master starts,
    the good smtpd answers, a client of the broken one is connected but never
    greeted, each broken daemon logs its fatal line once and is throttled.  A
    reload that adds another -o error (and changes inet_interfaces: ignored,
    with a warning per inet service) keeps the master; one that adds an
    unclosed '{' after the postlog entry ends it without a maillog word."""
    ours, ref = _pair(tmp_path,
                      extra_first="127.0.0.1:{port2} inet n - n - - smtpd -o smtpd_banner=x -o foo\n",
                      replace_pickup="pickup    unix  n       -       n       60      1       "
                                     "pickup -o =x\n")
    sides = [inst for inst in (ours, ref) if inst is not None]

    def steps(inst) -> dict:
        """One side's run (the two sides run at once: most of it is waiting)."""
        got = {"check": _run(inst, "check") if inst is ours else (0, "")}
        _start(inst)
        got["banner"] = _banner(inst.port)[:4]
        # A client of the broken smtpd: connected (the kernel's backlog), never greeted.
        with socket.create_connection(("127.0.0.1", inst.port2), timeout=5) as client:
            time.sleep(1.5)
            client.setblocking(False)
            try:
                got["greeted"] = client.recv(100)
            except BlockingIOError:
                got["greeted"] = None
        inst.wait_log(r"smtpd: bad command startup -- throttling", 10)
        inst.wait_log(r"pickup: bad command startup -- throttling", 10)
        got["start"] = _daemon_lines(_log(inst))
        for step, line in (("option", "y unix - - n - - smtp -o bar\n"),
                           ("brace", "z unix - - n - - smtp -o {zz\n")):
            pid = inst.master_pid()
            mark = len(inst.log_text().splitlines())
            with open(inst.config_dir / "master.cf", "a") as f:
                f.write(line)
            main_cf = inst.config_dir / "main.cf"
            main_cf.write_text(main_cf.read_text().replace("inet_interfaces = 127.0.0.1\n",
                                                           "inet_interfaces = loopback-only\n"))
            if isinstance(inst, ReferencePostfix):
                inst.cool_config()
            rc_err = _run(inst, "reload")
            if step == "brace":
                wait_for(lambda: not pid_alive(pid), 10, 0.05, "the master to die")
            else:
                time.sleep(1.5)
            alive = pid_alive(pid)
            status = _run(inst, "status")[0]
            # (the reference's postfix-script logs through its postlogd)
            inst.wait_log(r"postfix-script\[\d+\]: the Postfix mail system is (not )?running", 10)
            # (throttled services stay so: no daemon is retried at the reload)
            got[step] = (rc_err, alive, status, _log(inst, mark))
        return got

    try:
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(2) as pool:
            futures = {inst.kind: pool.submit(steps, inst) for inst in sides}
            got = {kind: future.result(120) for kind, future in futures.items()}
        assert got["postwell"]["check"] == (0, "")
        assert got["postwell"]["banner"] == b"220 " and got["postwell"]["greeted"] is None
        assert got["postwell"]["start"] == [
            "postfix/master[N]: warning: /usr/lib/postfix/sbin/pickup: bad command startup -- "
            "throttling",
            "postfix/master[N]: warning: /usr/lib/postfix/sbin/smtpd: bad command startup -- "
            "throttling",
            "postfix/master[N]: warning: process /usr/lib/postfix/sbin/pickup pid N exit status 1",
            "postfix/master[N]: warning: process /usr/lib/postfix/sbin/smtpd pid N exit status 1",
            "postfix/pickup[N]: fatal: invalid \"-o =x\" option value: missing attribute name",
            "postfix/smtpd[N]: fatal: invalid \"-o foo\" option value: missing '=' after "
            "attribute name"]
        assert got["postwell"]["option"] == ((0, ""), True, 0, [
            "postfix/postfix-script[N]: refreshing the Postfix mail system",
            "postfix/master[N]: reload -- version V, configuration R/etc",
            "postfix/master[N]: warning: service 127.0.0.1:PORT2: ignoring inet_interfaces change",
            "postfix/master[N]: warning: to change inet_interfaces, stop and start Postfix",
            "postfix/master[N]: warning: service 127.0.0.1:PORT: ignoring inet_interfaces change",
            "postfix/master[N]: warning: to change inet_interfaces, stop and start Postfix",
            "postfix/postfix-script[N]: the Postfix mail system is running: PID: N"])
        assert got["postwell"]["brace"] == (
            (0, "/usr/sbin/postconf: warning: master.cf: missing '}' in \"{zz\"\n"
                "/usr/sbin/postconf: warning: master.cf: missing '=' after attribute name: "
                "\"zz\"\n"), False, 1, [
                "postfix/postfix-script[N]: refreshing the Postfix mail system",
                "postfix/master[N]: reload -- version V, configuration R/etc",
                "postfix/postfix-script[N]: the Postfix mail system is not running"])
        if ref is not None:
            # The dying reference master's warnings before its fatal (inet_interfaces
            # change, per inet service) go to postlogd, which the master's death ends:
            # some runs log them, some not.  postwell's master logs none there.
            rc_err, alive, status, lines = got["postfix"]["brace"]
            got["postfix"]["brace"] = (rc_err, alive, status, [
                ln for ln in lines if "inet_interfaces" not in ln])
            assert got["postwell"] == got["postfix"]
    finally:
        _stop(ours, ref)
