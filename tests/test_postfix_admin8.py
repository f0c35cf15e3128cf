"""postfix logrotate / set-permissions / upgrade-configuration (master/admin.py),
the maillog writer following a rotated file (log/__init__.py), and the same
commands side by side with the reference Postfix where they can be compared."""

from __future__ import annotations

import gzip
import io
import os
import pwd
import re
import stat
import time
from pathlib import Path

import pytest

from harness import PostwellInstance, ReferencePostfix, is_root, reference_available

from postwell.config import load_config
from postwell.log import MailLog
from postwell.master import admin

needs_root = pytest.mark.skipif(not is_root(), reason="needs root")

# ------------------------------------------------------------------ helpers


def _config(tmp_path: Path, extra: str = "") -> object:
    etc = tmp_path / "etc"
    etc.mkdir(exist_ok=True)
    (etc / "main.cf").write_text(
        f"queue_directory = {tmp_path}/queue\n"
        f"data_directory = {tmp_path}/data\n"
        f"maillog_file = {tmp_path}/maillog\n"
        f"maillog_file_prefixes = {tmp_path}\n"
        "inet_protocols = ipv4\n" + extra)
    if not (etc / "master.cf").exists():
        (etc / "master.cf").write_text("")
    return load_config(str(etc), read_master=False)


class _Said:
    """postfix(1)'s msg_fatal and postfix-script's $FATAL, recorded."""

    def __init__(self):
        self.lines: list[str] = []

    def fatal(self, text, config=None):
        self.lines.append(f"postfix: fatal: {text}")
        return 1

    def script_fatal(self, cfg, text):
        self.lines.append(f"postfix/postfix-script: fatal: {text}")
        return 1


def _rotate(cfg, args=("logrotate",), pid=None, when=None):
    said = _Said()
    slept = []
    rc = admin.logrotate(cfg, list(args), fatal=said.fatal, script_fatal=said.script_fatal,
                         running_pid=lambda c: pid, clock=(lambda: when) if when else time.time,
                         sleep=slept.append)
    return rc, said.lines, slept


def _strip(line: str) -> str:
    """A maillog line without its time stamp, host and pid."""
    return re.sub(r"^\w{3} [ \d]\d \d\d:\d\d:\d\d \S+ ([^\[]+)\[\d+\]", r"\1", line)


# ------------------------------------------------------------------ MailLog follows rotation


def test_maillog_follows_a_renamed_file(tmp_path):
    path = tmp_path / "maillog"
    log = MailLog("smtpd", maillog_file=str(path), hostname="mx")
    log.info("one")
    fd = log._fd
    os.rename(path, tmp_path / "maillog.1")
    path.write_text("")
    log.info("two")                   # same second as the last check: old file still
    log._checked = 0                  # the next second's first line looks again
    log.info("three")
    assert log._fd == fd              # same descriptor number (dup2): threads never see a gap
    assert "one" in (tmp_path / "maillog.1").read_text()
    assert "three" in path.read_text() and "three" not in (tmp_path / "maillog.1").read_text()
    log.close()


@needs_root
def test_maillog_root_never_recreates_a_lost_file(tmp_path):
    # A root-created log would shut the mail_owner daemons out of it.
    path = tmp_path / "maillog"
    log = MailLog("local", maillog_file=str(path), hostname="mx")
    os.rename(path, tmp_path / "old")
    log._checked = 0
    log.info("kept")
    assert not path.exists() and "kept" in (tmp_path / "old").read_text()
    log.close()


def test_maillog_master_and_dev_files_do_not_follow(tmp_path):
    path = tmp_path / "maillog"
    log = MailLog("master", maillog_file=str(path), hostname="mx")
    os.rename(path, tmp_path / "old")
    path.write_text("")
    log._checked = 0
    log.info("reload -- version x")   # Postfix's master line lands in the rotated file
    assert "reload" in (tmp_path / "old").read_text() and path.read_text() == ""
    log.close()
    assert MailLog("smtpd", maillog_file="/dev/stderr", hostname="mx")._follow is False


def test_maillog_reopen_keeps_old_file_when_path_unusable(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    log = MailLog("anvil", maillog_file=str(d / "maillog"), hostname="mx")
    os.rename(d, tmp_path / "gone")
    log.reopen()                      # the directory is gone: O_CREAT fails, no exception
    log.info("still here")
    assert "still here" in (tmp_path / "gone" / "maillog").read_text()
    log.close()


# ------------------------------------------------------------------ logrotate


def test_logrotate_renames_and_compresses(tmp_path):
    cfg = _config(tmp_path)
    (tmp_path / "maillog").write_text("a line\n")
    when = time.mktime((2026, 1, 2, 3, 4, 5, 0, 0, -1))
    rc, said, slept = _rotate(cfg, when=when)
    assert (rc, said, slept) == (0, [], [admin.ROTATE_SETTLE_SECONDS])
    gz = tmp_path / "maillog.20260102-030405.gz"
    assert gzip.decompress(gz.read_bytes()) == b"a line\n"
    # nothing running: no new file until something logs (as Postfix)
    assert not (tmp_path / "maillog").exists()


def test_logrotate_custom_suffix_and_compressor(tmp_path):
    cfg = _config(tmp_path, "maillog_file_rotate_suffix = %Y\nmaillog_file_compressor = true\n")
    (tmp_path / "maillog").write_text("x\n")
    rc, said, _ = _rotate(cfg, when=time.mktime((2031, 6, 1, 0, 0, 0, 0, 0, -1)))
    assert rc == 0 and said == [] and (tmp_path / "maillog.2031").read_text() == "x\n"


@needs_root
def test_logrotate_running_system_gets_a_new_file_and_a_hup(tmp_path):
    import signal
    cfg = _config(tmp_path, "mail_owner = postfix\n")
    (tmp_path / "maillog").write_text("x\n")
    got = []
    old = signal.signal(signal.SIGHUP, lambda *a: got.append(a[0]))
    try:
        rc, said, _ = _rotate(cfg, pid=os.getpid())
    finally:
        signal.signal(signal.SIGHUP, old)
    assert rc == 0 and said == [] and got == [signal.SIGHUP]
    st = (tmp_path / "maillog").stat()
    assert st.st_uid == pwd.getpwnam("postfix").pw_uid and stat.S_IMODE(st.st_mode) == 0o644


@pytest.mark.parametrize("extra,args,expected", [
    ("", ("logrotate", "x"), "postfix/postfix-script: fatal: usage postfix logrotate (no arguments)"),
    ("maillog_file =\n", ("logrotate",),
     "postfix/postfix-script: fatal: empty 'maillog_file' parameter value - "
     "logfile rotation failed"),
    ("maillog_file = /dev/stdout\nmaillog_file_prefixes = /dev/stdout\n", ("logrotate",),
     "postfix/postfix-script: fatal: not rotating '/dev/stdout'"),
    ("maillog_file_prefixes = /var\n", ("logrotate",),
     "postfix: fatal: maillog_file value '{root}/maillog' does not match any prefix in "
     "maillog_file_prefixes"),
    ("maillog_file_prefixes = /var, {ROOT}\n", ("logrotate",),
     "postfix: fatal: maillog_file value '{root}/maillog' does not match any prefix in "
     "maillog_file_prefixes"),    # case-sensitive prefixes
    ("maillog_file_compressor =\n", ("logrotate",),
     "postfix: fatal: bad string length 0 < 1: maillog_file_compressor = "),
    ("maillog_file_rotate_suffix =\n", ("logrotate",),
     "postfix: fatal: bad string length 0 < 1: maillog_file_rotate_suffix = "),
])
def test_logrotate_refusals(tmp_path, extra, args, expected):
    extra = extra.replace("{ROOT}", str(tmp_path).upper())
    cfg = _config(tmp_path, extra)
    (tmp_path / "maillog").write_text("x\n")
    rc, said, _ = _rotate(cfg, args)
    assert rc == 1 and said == [expected.replace("{root}", str(tmp_path))]
    assert (tmp_path / "maillog").read_text() == "x\n"


def test_logrotate_failures_quote_the_tools(tmp_path):
    cfg = _config(tmp_path)
    rc, said, _ = _rotate(cfg)
    log = f"{tmp_path}/maillog"
    assert rc == 1 and said == [f"postfix/postfix-script: fatal: logfile '{log}' rotation failed: "
                                f"mv: cannot stat '{log}': No such file or directory"]
    for comp, words in (("no-such-compressor", "no-such-compressor: not found"),
                        ("/etc/passwd", "/etc/passwd: Permission denied"), ("false", None)):
        cfg = _config(tmp_path, f"maillog_file_compressor = {comp}\n")
        (tmp_path / "maillog").write_text("x\n")
        rc, said, _ = _rotate(cfg)
        tail = f"/usr/lib/postfix/sbin/postfix-script: 7: {words}" if words else ""
        assert rc == 1 and said == [f"postfix/postfix-script: fatal: logfile '{log}' "
                                    f"rotation failed: {tail}"]


# ------------------------------------------------------------------ set-permissions


def _post_install(cfg, *args):
    out, err = io.StringIO(), io.StringIO()
    rc = admin.post_install(cfg, list(args), out=out, err=err)
    return rc, out.getvalue(), err.getvalue()


@needs_root
def test_set_permissions_fixes_the_queue(tmp_path):
    from postwell.queue import QueueStore
    pf = pwd.getpwnam("postfix")
    cfg = _config(tmp_path, "mail_owner = postfix\n")
    q = tmp_path / "queue"
    QueueStore(str(q)).ensure_layout(pf.pw_uid, pf.pw_gid)
    (tmp_path / "maillog").write_text("")
    os.chmod(q / "incoming", 0o777)
    os.chown(q / "active", 0, 0)
    os.chmod(q / "maildrop", 0o755)
    os.rmdir(q / "hold")
    (q / "deferred" / "A").mkdir()
    f = q / "deferred" / "A" / "1234ABC"
    f.write_text("x")
    os.chmod(f, 0o700)                       # "complete": the mode is queue state
    drop = q / "maildrop" / "userfile"
    drop.write_text("x")
    os.chown(drop, 65534, 65534)             # a submitter's file keeps its owner
    (tmp_path / "data").mkdir()
    outside = tmp_path / "outside"
    outside.mkdir(mode=0o755)
    os.symlink(outside, q / "deferred" / "link")    # never followed by root
    rc, out, err = _post_install(cfg, "set-permissions")
    assert (rc, out, err) == (0, "", "")

    def mode(p):
        st = os.stat(p)
        return st.st_uid, stat.S_IMODE(st.st_mode)
    assert mode(q / "incoming") == (pf.pw_uid, 0o700)
    assert mode(q / "active") == (pf.pw_uid, 0o700)
    assert mode(q / "hold") == (pf.pw_uid, 0o700)       # created again
    assert mode(q / "maildrop") == (pf.pw_uid, 0o1733)
    assert mode(q / "public") == (pf.pw_uid, 0o711)
    assert mode(q / "pid") == (0, 0o755)
    assert mode(q / "deferred" / "A") == (pf.pw_uid, 0o700)
    assert mode(f) == (pf.pw_uid, 0o700)
    assert mode(drop)[0] == 65534
    assert mode(outside) == (0, 0o755)
    assert mode(tmp_path / "data") == (pf.pw_uid, 0o700)
    assert os.stat(tmp_path / "maillog").st_uid == pf.pw_uid


@needs_root
def test_set_permissions_name_value_is_saved(tmp_path):
    cfg = _config(tmp_path, "mail_owner = postfix\n")
    rc, out, err = _post_install(cfg, "set-permissions", "mail_owner=postwelltest"
                                 if _user("postwelltest") else "mail_owner=nobody")
    assert rc == 0, err
    who = load_config(cfg.config_dir, read_master=False).get("mail_owner")
    assert who in ("postwelltest", "nobody")
    assert os.stat(tmp_path / "queue" / "incoming").st_uid == pwd.getpwnam(who).pw_uid


def _user(name):
    try:
        return pwd.getpwnam(name)
    except KeyError:
        return None


def test_post_install_argument_errors(tmp_path):
    cfg = _config(tmp_path)
    prog = "/usr/lib/postfix/sbin/post-install"
    rc, out, err = _post_install(cfg, "set-permissions", "a b")
    assert (rc, out, err) == (1, f"{prog}: Error: argument contains whitespace: 'a b'\n", "")
    rc, out, err = _post_install(cfg, "set-permissions", "bogus")
    assert rc == 1 and out == "" and err.startswith(f"{prog}: Error: Usage: {prog} [name=value] "
                                                    "command\n    create-missing ")
    assert not (tmp_path / "queue").exists()


@needs_root
def test_set_permissions_unknown_owner(tmp_path):
    cfg = _config(tmp_path)
    rc, out, err = _post_install(cfg, "set-permissions", "mail_owner=no-such-user-h10")
    assert rc == 1 and "invalid user: 'no-such-user-h10'" in err


# ------------------------------------------------------------------ upgrade-configuration

STOCK_MASTER_CF = Path("/etc/postfix/master.cf")


def test_upgrade_configuration_up_to_date_is_silent(tmp_path):
    if not STOCK_MASTER_CF.is_file():
        pytest.skip("no stock master.cf")
    cfg = _config(tmp_path)
    master = Path(cfg.config_dir) / "master.cf"
    master.write_text(STOCK_MASTER_CF.read_text())
    before = (master.read_text(), (Path(cfg.config_dir) / "main.cf").read_text())
    assert _post_install(cfg, "upgrade-configuration") == (0, "", "")
    assert (master.read_text(), (Path(cfg.config_dir) / "main.cf").read_text()) == before


def test_upgrade_configuration_adds_missing_entries(tmp_path):
    cfg = _config(tmp_path, "hash_queue_names = incoming\n")
    main_cf = Path(cfg.config_dir) / "main.cf"
    main_cf.write_text(main_cf.read_text().replace("inet_protocols = ipv4\n", ""))
    master = Path(cfg.config_dir) / "master.cf"
    master.write_text("smtp inet n - n - - smtpd\n")
    cfg = load_config(cfg.config_dir, read_master=False)
    rc, out, err = _post_install(cfg, "upgrade-configuration")
    assert rc == 0 and err == ""
    lines = out.splitlines()
    assert lines[0] == f"Editing {master}, adding missing entry for relay service"
    assert "fixing main.cf hash_queue_names for missing defer deferred" in lines
    assert lines[-1].endswith("adding missing entry for postlog unix-domain datagram service")
    assert any("COMPATIBILITY: editing" in line for line in lines)
    again = load_config(cfg.config_dir, read_master=False)
    assert again.get("inet_protocols") == "ipv4"
    assert "postlog   unix-dgram n  -       n       -       1       postlogd\n" in master.read_text()
    assert _post_install(again, "upgrade-configuration") == (0, "", "")


# ------------------------------------------------------------------ side by side


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    if not is_root() or reference_available():
        pytest.skip(reference_available() or "needs root")
    base = tmp_path_factory.mktemp("admin8")
    ref = ReferencePostfix(base)
    pw = PostwellInstance(base, main_cf={"maillog_file_prefixes": "/"})
    ref.cool_config()
    ref.postfix("check")
    return ref, pw


def _ref_and_pw(pair, *args):
    ref, pw = pair
    r = ref.postfix(*args)
    p = pw.cli(*args)
    return r, p


def _last_line(inst) -> str:
    lines = inst.log_text().splitlines()
    return _strip(lines[-1]) if lines else ""


@pytest.mark.parametrize("args", [("logrotate", "now"), ("set-permissions", "bogus"),
                                  ("upgrade-configuration", "a b")])
def test_side_by_side_refusals(pair, args):
    ref, pw = pair
    r, p = _ref_and_pw(pair, *args)
    assert (p.returncode, p.stdout, p.stderr) == (r.returncode, r.stdout, r.stderr)
    if args[0] == "logrotate":
        assert _last_line(pw) == _last_line(ref) == (
            "postfix/postfix-script: fatal: usage postfix logrotate (no arguments)")


def test_side_by_side_upgrade_configuration(pair):
    ref, pw = pair
    # the same master.cf for both: the harness's reference services
    (pw.config_dir / "master.cf").write_text((ref.config_dir / "master.cf").read_text())
    r, p = _ref_and_pw(pair, "upgrade-configuration")
    norm = (lambda s, inst: s.replace(str(inst.config_dir), "ETC"))
    assert p.returncode == r.returncode == 0
    assert norm(p.stdout, pw) == norm(r.stdout, ref) and r.stdout   # four commented entries
    assert (pw.config_dir / "master.cf").read_text() == (ref.config_dir / "master.cf").read_text()
    r, p = _ref_and_pw(pair, "upgrade-configuration")
    assert (p.returncode, p.stdout, p.stderr) == (r.returncode, r.stdout, r.stderr) == (0, "", "")


def test_side_by_side_logrotate_stopped(pair):
    ref, pw = pair
    for inst in pair:
        inst.maillog.write_text("old\n")
    r, p = _ref_and_pw(pair, "logrotate")
    assert (p.returncode, p.stdout, p.stderr) == (r.returncode, r.stdout, r.stderr) == (0, "", "")
    for inst in pair:
        assert not inst.maillog.exists()
        (gz,) = inst.root.glob("maillog.*.gz")
        assert re.fullmatch(r"maillog\.\d{8}-\d{6}\.gz", gz.name)
        assert gzip.decompress(gz.read_bytes()) == b"old\n"
        gz.unlink()


def test_postwell_logrotate_running(tmp_path):
    if not is_root():
        pytest.skip("needs root")
    pw = PostwellInstance(tmp_path)
    with (pw.config_dir / "main.cf").open("a") as f:
        f.write(f"maillog_file_prefixes = {pw.root}\n")
    pw.start()
    import socket
    try:
        # a session open across the rotation: its draining smtpd follows the new file
        early = socket.create_connection(("127.0.0.1", pw.port), 5)
        early.settimeout(5)
        early.recv(512)
        pw.wait_log(r"postfix/smtpd\[\d+\]: connect from", timeout=5)
        cp = pw.cli("logrotate")
        assert (cp.returncode, cp.stdout, cp.stderr) == (0, "", "")
        (gz,) = pw.root.glob("maillog.*.gz")
        old = gzip.decompress(gz.read_bytes()).decode()
        # as Postfix: the master's reload line is the rotated file's last
        assert re.search(r"postfix/master\[\d+\]: reload -- version \S+, configuration ", old)
        assert old.splitlines()[-1].split(": ", 1)[1].startswith("reload -- ")
        early.sendall(b"QUIT\r\n")
        early.recv(512)
        early.close()
        pid = re.findall(r"postfix/smtpd\[(\d+)\]: connect from", old)[-1]
        pw.wait_log(rf"postfix/smtpd\[{pid}\]: disconnect from", timeout=5)
        with socket.create_connection(("127.0.0.1", pw.port), 5) as s:
            s.settimeout(5)
            s.recv(512)
            s.sendall(b"QUIT\r\n")
            s.recv(512)
        pw.wait_log(r"postfix/smtpd\[(?!" + pid + r"\])\d+\]: disconnect from", timeout=5)
        assert os.stat(pw.maillog).st_uid == pw.uid
    finally:
        pw.stop()



def test_reload_after_an_outside_rotation_hands_the_new_file_to_mail_owner(tmp_path):
    """logrotate(8)-style rotation (rename, then `postfix reload`): the master,
    as root, creates the new maillog at the reload; it must be the children's,
    as at start, or their lines are lost."""
    if not is_root():
        pytest.skip("needs root")
    pw = PostwellInstance(tmp_path)
    pw.start()
    import socket
    try:
        os.rename(pw.maillog, str(pw.maillog) + ".1")
        pw.cli("reload", check=True)
        # the reload line goes to the old file (as Postfix's), then the new one is made
        rotated = Path(str(pw.maillog) + ".1")
        deadline = time.monotonic() + 10
        def owner():
            try:
                return os.stat(pw.maillog).st_uid
            except FileNotFoundError:
                return None
        while "reload -- " not in rotated.read_text() or owner() != pw.uid:
            assert time.monotonic() < deadline, (owner(), rotated.read_text()[-2000:])
            time.sleep(0.05)
        with socket.create_connection(("127.0.0.1", pw.port), 5) as s:
            s.settimeout(5)
            s.recv(512)
            s.sendall(b"QUIT\r\n")
            s.recv(512)
        pw.wait_log(r"postfix/smtpd\[\d+\]: disconnect from", timeout=10)
    finally:
        pw.stop()

_OLD_STYLE = {
    "verify": "verify    unix  -       -       n       -       0       verify",
    "proxywrite": "proxywrite unix -       -       n       -       -       proxymap",
    "tlsmgr": "tlsmgr    fifo  -       -       n       300   1       tlsmgr",
    "pickup": "pickup    fifo  n       n       n       60      1       pickup",
    "cleanup": "cleanup   unix  -       -       n       -       0       cleanup",
    "flush": "flush     unix  y       -       n       1000?   0       flush",
}


def test_side_by_side_upgrade_configuration_edits(pair):
    """An old master.cf: Postfix's ed(1) edits and what ed prints."""
    ref, pw = pair
    lines = []
    for line in (ref.config_dir / "master.cf").read_text().splitlines():
        name = line.split(" ", 1)[0]
        lines.append(_OLD_STYLE.get(name, line))
    lines += ["#smtp      inet  n       -       n       -       1       postscreen",
              "#smtpd     pass  -       -       n       -       -       smtpd",
              "#dnsblog   unix  -       -       n       -       0       dnsblog",
              "#tlsproxy  unix  -       -       n       -       0       tlsproxy"]
    for inst in pair:
        (inst.config_dir / "master.cf").write_text("\n".join(lines) + "\n")
    r, p = _ref_and_pw(pair, "upgrade-configuration")
    assert p.returncode == r.returncode == 0
    assert p.stdout.replace(str(pw.config_dir), "ETC") == r.stdout.replace(str(ref.config_dir), "ETC")
    assert "setting verify process limit to 1" in r.stdout
    assert (pw.config_dir / "master.cf").read_text() == (ref.config_dir / "master.cf").read_text()


@pytest.mark.parametrize("compressor", ["no-such-gzip"])
def test_side_by_side_logrotate_compressor_failure(pair, compressor):
    ref, pw = pair
    saved = {}
    for inst in pair:
        main_cf = inst.config_dir / "main.cf"
        saved[inst] = main_cf.read_text()
        main_cf.write_text(saved[inst] + f"maillog_file_compressor = {compressor}\n")
        inst.maillog.write_text("old\n")
    ref.cool_config()
    try:
        r, p = _ref_and_pw(pair, "logrotate")
        assert (p.returncode, p.stdout, p.stderr) == (r.returncode, r.stdout, r.stderr)
        assert r.returncode == 1
        lines = [_last_line(inst).replace(str(inst.root), "ROOT") for inst in pair]
        assert lines[0] == lines[1]
        assert lines[0].startswith("postfix/postfix-script: fatal: logfile 'ROOT/maillog' "
                                   "rotation failed: ")
        for inst in pair:
            (rotated,) = inst.root.glob("maillog.2*")
            assert rotated.read_text() == "old\n"
            rotated.unlink()
    finally:
        for inst in pair:
            (inst.config_dir / "main.cf").write_text(saved[inst])
        ref.cool_config()
