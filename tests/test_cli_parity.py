"""The admin tools side by side with Debian's Postfix 3.7: same stdout, same
stderr words, same exit status, for the common error and "mail system is
down" cases.

Each case runs the reference binary (by absolute path) against one isolated
configuration directory and postwell's installed command against a twin
directory; only the directory paths and the program path prefix are
normalized.  Nothing is started: no listener, no network.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import sys
import time

import pytest

REF = "/usr/sbin"
NEEDED = ("postqueue", "postsuper", "sendmail", "postcat", "postmap", "postalias", "postfix")
pytestmark = [
    pytest.mark.postfix,
    pytest.mark.skipif(not all(os.access(f"{REF}/{t}", os.X_OK) for t in NEEDED),
                       reason="Debian postfix not installed"),
    pytest.mark.skipif(os.geteuid() != 0, reason="the reference tools need root here"),
]
TIMEOUT = 30

# The installed console scripts sit beside the interpreter running the tests.
OUR_BIN = os.path.dirname(sys.executable)


def _ours(tool: str) -> list[str]:
    path = os.path.join(OUR_BIN, tool)
    if os.access(path, os.X_OK):
        return [path]
    mod = {"mailq": "postqueue", "newaliases": "sendmail"}.get(tool, tool)
    return [sys.executable, "-m", f"postwell.cli.{mod}"]


def _main_cf(root: str) -> str:
    # Both sides read the same text; paths differ only by the directory.
    return (f"compatibility_level = 3.6\n"
            f"queue_directory = {root}/queue\n"
            f"data_directory = {root}/data\n"
            f"maillog_file = {root}/maillog\n"
            f"maillog_file_prefixes = {root}\n"
            "mail_name = Postfix\n"
            "myhostname = mx.example.test\n"
            "mydomain = example.test\n"
            "inet_interfaces = loopback-only\n"
            f"alias_maps = hash:{root}/etc/aliases\n"
            f"alias_database = hash:{root}/etc/aliases\n")


@pytest.fixture(scope="module")
def pair():
    import tempfile
    from pathlib import Path
    from harness import test_base_dir
    # Outside pytest's 0700 basetemp: the postfix user must reach data/ and the maillog.
    base = Path(tempfile.mkdtemp(prefix="cliparity-", dir=test_base_dir()))
    os.chmod(base, 0o755)
    try:
        yield _make_pair(base)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _make_pair(base):
    postfix_uid = pwd.getpwnam("postfix").pw_uid
    dirs: dict[str, str] = {}
    for side in ("ref", "ours"):
        root = base / side
        (root / "etc").mkdir(parents=True)
        (root / "data").mkdir()
        (root / "queue").mkdir()
        os.chmod(root, 0o755)
        (root / "etc" / "main.cf").write_text(_main_cf(str(root)))
        (root / "etc" / "aliases").write_text("root: admin\npostmaster: root\n")
        # Services on a loopback port nobody uses; nothing is started anyway.
        (root / "etc" / "master.cf").write_text(
            "127.0.0.1:1 inet n - n - - smtpd\n"
            "pickup unix n - n 60 1 pickup\n"
            "qmgr unix n - n 300 1 qmgr\n"
            "showq unix n - n - - showq\n"
            "postlog unix-dgram n - n - 1 postlogd\n")
        log = root / "maillog"
        log.write_text("")
        os.chown(log, postfix_uid, -1)
        os.chown(root / "data", postfix_uid, -1)
        # Postfix pauses when main.cf changed in the last seconds.
        for f in ("main.cf", "master.cf"):
            os.utime(root / "etc" / f, (time.time() - 3600,) * 2)
        dirs[side] = str(root)
    cp = subprocess.run([f"{REF}/postfix", "-c", f"{dirs['ref']}/etc", "check"],
                        capture_output=True, text=True, timeout=TIMEOUT)
    assert cp.returncode == 0, (base / "ref" / "maillog").read_text()
    from postwell.queue import QueueStore
    QueueStore(f"{dirs['ours']}/queue").ensure_layout()
    (base / "empty").write_bytes(b"")
    (base / "junk").write_bytes(b"not a queue file\n")
    dirs["base"] = str(base)
    return dirs


def _norm(text: str, root: str, base: str) -> str:
    text = text.replace(root, "DIR").replace(base, "BASE").replace("noq-ref", "noq-S")
    text = text.replace("noq-ours", "noq-S")
    # postcat and postconf name themselves by argv[0] (the full path here).
    return text.replace(f"{REF}/postcat", "postcat").replace(f"{REF}/postconf", "postconf")


def _run(pair, side: str, tool: str, args: list[str], stdin: str = "") -> tuple[int, str, str]:
    root = pair[side]
    argv = [a.replace("@C@", f"{root}/etc").replace("@B@", pair["base"]).replace("@S@", side)
            for a in args]
    cmd = ([f"{REF}/{tool}"] if side == "ref" and tool not in ("mailq", "newaliases")
           else [f"/usr/bin/{tool}"] if side == "ref" else _ours(tool))
    env = {k: v for k, v in os.environ.items() if k != "MAIL_CONFIG"}
    cp = subprocess.run(cmd + argv, input=stdin, capture_output=True, text=True,
                        timeout=TIMEOUT, env=env)
    # The set-gid reference tools also read the machine's /etc/postfix/main.cf,
    # which other test runs edit (alternate_config_directories): not ours to compare.
    err = "".join(ln for ln in cp.stderr.splitlines(True) if "/etc/postfix/main.cf" not in ln)
    return cp.returncode, _norm(cp.stdout, root, pair["base"]), _norm(err, root, pair["base"])


def same(pair, tool: str, *args: str, stdin: str = ""):
    ref = _run(pair, "ref", tool, list(args), stdin)
    ours = _run(pair, "ours", tool, list(args), stdin)
    assert ours == ref, f"{tool} {' '.join(args)}"
    return ref


def _log_lines(pair, side: str, program: str) -> list[str]:
    """The maillog's lines of one program, without stamp, host and pid."""
    with open(os.path.join(pair[side], "maillog")) as f:
        text = f.read()
    out = []
    for line in text.splitlines():
        m = re.match(r"^\w{3} [ \d]\d \d\d:\d\d:\d\d \S+ ([^\[:]+)\[\d+\]: (.*)$", line)
        if m and m.group(1) == program:
            out.append(_norm(m.group(2), pair[side], pair["base"]))
    return out


# ---------------------------------------------------------------- postqueue

@pytest.mark.parametrize("args", [
    ["-p"], ["-j"], ["-f"], ["-i", "ABCDEF123"], ["-i", "abc/def"], ["-i", "x" * 300],
    ["-s", "example.com"], ["-s", ""], ["-s", "bad..domain"], ["-x"], [], ["-i"],
    ["-p", "-f"], ["-p", "extra"], ["-j", "-j"],
], ids=repr)
def test_postqueue_like_postfix(pair, args):
    same(pair, "postqueue", "-c", "@C@", *args)


def test_postqueue_missing_config_like_postfix(pair):
    same(pair, "postqueue", "-c", "@B@/nonexistent", "-p")


# ---------------------------------------------------------------- postsuper

@pytest.mark.parametrize("args", [
    ["-d", "ALL"], ["-d", "ABCDEF"], ["-d", "abc/def"], ["-h", "ALL"], ["-H", "ALL"],
    ["-r", "ALL"], ["-e", "ALL"], ["-f", "ALL"], ["-d", "ALL", "deferred"],
    ["-d", "ALL", "nosuchq"], ["-d"], ["-x"], ["-s"], ["-p"], ["-d", "ABC", "-h", "DEF"],
    ["-c", "relative", "-d", "ALL"],
], ids=repr)
def test_postsuper_like_postfix(pair, args):
    same(pair, "postsuper", "-c", "@C@", *args)


def test_postsuper_stdin_ids_like_postfix(pair):
    same(pair, "postsuper", "-c", "@C@", "-d", "-", stdin="ABCDEF\nabc/def\n\n")


def test_postsuper_logs_like_postfix(pair):
    same(pair, "postsuper", "-c", "@C@", "-h", "no.such")
    ref, ours = _log_lines(pair, "ref", "postfix/postsuper"), _log_lines(pair, "ours", "postfix/postsuper")
    assert ours[-2:] == ref[-2:] == ["warning: invalid mail queue id: no.such", "Placed on hold: 0 messages"]


# ---------------------------------------------------------------- sendmail / mailq

@pytest.mark.parametrize("args", [
    ["-q"], ["-bv"], ["-bs", "a@b"], ["-bp", "a@b"], ["-x"], ["-B", "foo", "a@b"],
    ["-qX"], ["-qR"], ["-qI"], ["-bi", "extra"], ["-t"],
    ["-N", "success,bogus", "a@example.test"], ["-N", "a,b", "a@example.test"],
    ["-N", "never,success", "a@example.test"], ["-R", "most", "a@example.test"],
], ids=repr)
def test_sendmail_like_postfix(pair, args):
    same(pair, "sendmail", "-C", "@C@", *args, stdin="Subject: parity\n\nbody\n")


def test_sendmail_address_lists_like_postfix(pair):
    """Postfix's tok822: words in a row are separate addresses ("a b" is two),
    a multi-address -f is malformed and its first address is the sender."""
    _empty_maildrops(pair)
    msg = 'To: g h, "i j"@x\nCc: k@x (c) l@y\n\nbody\n'
    same(pair, "sendmail", "-C", "@C@", "-t", "-f", "a b", "c d", "e@x (note) f@y", stdin=msg)
    envelopes = []
    for side in ("ref", "ours"):
        drop = os.path.join(pair[side], "queue", "maildrop")
        (name,) = os.listdir(drop)
        _, out, _ = _run(pair, side, "postcat", ["-c", "@C@", "-e", os.path.join(drop, name)])
        envelopes.append([ln for ln in out.splitlines() if ln.startswith(("sender:", "recipient:"))])
    _empty_maildrops(pair)
    assert envelopes[1] == envelopes[0] == [
        "sender: a", "recipient: c", "recipient: d", "recipient: e@x", "recipient: f@y",
        "recipient: g", "recipient: h", "recipient: i j@x", "recipient: k@x", "recipient: l@y"]


def test_postsuper_deletes_maildrop_like_postfix(pair):
    _empty_maildrops(pair)
    for _ in range(2):
        same(pair, "sendmail", "-C", "@C@", "a@example.test", stdin="x\n")
    assert same(pair, "postsuper", "-c", "@C@", "-h", "ALL", "maildrop")[2] == "postsuper: Placed on hold: 0 messages\n"
    assert same(pair, "postsuper", "-c", "@C@", "-d", "ALL", "maildrop")[2] == "postsuper: Deleted: 2 messages\n"
    for side in ("ref", "ours"):
        assert os.listdir(os.path.join(pair[side], "queue", "maildrop")) == []


def _empty_maildrops(pair):
    for side in ("ref", "ours"):
        drop = os.path.join(pair[side], "queue", "maildrop")
        for name in os.listdir(drop):
            os.unlink(os.path.join(drop, name))


@pytest.mark.parametrize("args", [[], ["extra"], ["-q"], ["-x"], ["-bp"]], ids=repr)
def test_mailq_is_sendmail_like_postfix(pair, args):
    _empty_maildrops(pair)
    same(pair, "mailq", "-C", "@C@", *args)


def _time_record_length(path: str, ours: bool) -> int:
    """Length of the "sec usec" time record Postfix writes (or would write) for a
    maildrop file: its usec has no leading zeros, so it is 1 to 6 digits."""
    with open(path, "rb") as f:
        data = f.read()
    if not ours:
        assert data[:1] == b"T"
        return data[1]
    sec, frac = re.search(rb"\ntime (\d+)\.(\d+)\n", data).groups()
    return len(sec) + 1 + len(str(int(frac)))


def test_mailq_maildrop_entry_like_postfix(pair):
    """Postfix lists a maildrop message with its postdrop file's size; postwell
    computes that size from its own maildrop file; the id is a prefix of the
    file's 128-bit name (the full name would let users read the file)."""
    _empty_maildrops(pair)
    same(pair, "sendmail", "-C", "@C@", "-f", "s@example.test", "-N", "success,delay", "-V", "env1",
         "a@example.test", "b@example.test", stdin="Subject: x\n\nbody\n" + "y" * 3000 + "\n")
    try:
        ref = _run(pair, "ref", "mailq", ["-C", "@C@"])
        ours = _run(pair, "ours", "mailq", ["-C", "@C@"])
        # The two submissions may fall in different seconds: the stamp is masked too.
        strip = lambda text: re.sub(r"(?m)^[0-9A-Fa-f]{6,32} +\d+ +\w{3} \w{3} [ \d]\d \d\d:\d\d:\d\d",  # noqa: E731
                                    "ID SIZE STAMP", text)
        assert strip(ours[1]) == strip(ref[1])
        assert ours[0] == ref[0] and ours[2] == ref[2]
        # The sizes differ only by the submission times' microsecond digits.
        paths = {}
        for side in ("ref", "ours"):
            drop = os.path.join(pair[side], "queue", "maildrop")
            (name,) = os.listdir(drop)
            paths[side] = os.path.join(drop, name)
        size = lambda out: int(out.splitlines()[1].split()[1])  # noqa: E731
        assert size(ref[1]) == os.path.getsize(paths["ref"])
        assert size(ours[1]) == (size(ref[1]) - _time_record_length(paths["ref"], False)
                                 + _time_record_length(paths["ours"], True))
    finally:
        _empty_maildrops(pair)


# ---------------------------------------------------------------- postcat

@pytest.mark.parametrize("args", [
    ["-q", "abc/def"], ["-q", "ABCDEF1234"], ["-q"], ["-x"], ["@B@/empty"], ["@B@/junk"],
    ["@B@/nonexistent"], [],
], ids=repr)
def test_postcat_like_postfix(pair, args):
    same(pair, "postcat", "-c", "@C@", *args)


@pytest.mark.parametrize("tool,args", [
    ("postqueue", ["-c", "@B@/noq-@S@", "-p"]), ("postqueue", ["-c", "@B@/noq-@S@", "-f"]),
    ("postsuper", ["-c", "@B@/noq-@S@", "-d", "ALL"]), ("postcat", ["-c", "@B@/noq-@S@", "-q", "ABCDEF"]),
    ("postcat", ["-c", "@B@/noq-@S@", "-q"]), ("mailq", ["-C", "@B@/noq-@S@"]),
    ("sendmail", ["-C", "@B@/noq-@S@", "a@example.test"]),
], ids=repr)
def test_missing_queue_directory_like_postfix(pair, tool, args):
    for side in ("ref", "ours"):
        etc = os.path.join(pair["base"], f"noq-{side}")
        if not os.path.isdir(etc):
            os.mkdir(etc)
            with open(os.path.join(etc, "main.cf"), "w") as f:
                f.write(_main_cf(pair[side]).replace(f"{pair[side]}/queue", f"{pair[side]}/noqueue"))
            os.utime(os.path.join(etc, "main.cf"), (time.time() - 3600,) * 2)
    ref = _run(pair, "ref", tool, args, "x\n")
    ours = _run(pair, "ours", tool, args, "x\n")
    assert ours == ref


# ---------------------------------------------------------------- postmap / postalias

@pytest.mark.parametrize("tool,args", [
    ("postmap", ["bogus:@B@/junk"]), ("postmap", ["-i", "bogus:@B@/junk"]),
    ("postmap", ["-q", "x", "bogus:@B@/junk"]), ("postmap", ["-d", "x", "bogus:@B@/junk"]),
    ("postalias", ["bogus:@B@/junk"]), ("postalias", ["-q", "x", "hash:@B@/nosuch"]),
], ids=repr)
def test_map_tools_like_postfix(pair, tool, args):
    same(pair, tool, "-c", "@C@", *args)


# ---------------------------------------------------------------- postconf

@pytest.mark.parametrize("args", [
    ["-a"], ["-A"], ["-a", "-A"], ["-a", "-n"], ["-A", "-d"], ["-a", "-x", "-h"], ["-m", "-f", "-h"],
    ["-l", "-e", "-d"], ["-M", "-p"], ["-P", "-p"], ["-o"], ["-q"], ["-l"], ["nosuch"],
    ["-e"], ["-e", "junk"], ["-X"], ["-M", "nosuch"],
], ids=repr)
def test_postconf_like_postfix(pair, args):
    same(pair, "postconf", "-c", "@C@", *args)


# ---------------------------------------------------------------- postfix(1)

@pytest.mark.parametrize("args", [["status"], ["stop"], ["reload"], ["abort"], ["bogus"], []], ids=repr)
def test_postfix_status_and_log_like_postfix(pair, args):
    """Nothing runs: exit status and the postfix-script maillog line agree."""
    ref = _run(pair, "ref", "postfix", ["-c", "@C@", *args])
    ours = _run(pair, "ours", "postfix", ["-c", "@C@", *args])
    assert ours == ref
    last = lambda side: _log_lines(pair, side, "postfix/postfix-script")[-1:]  # noqa: E731
    assert last("ours") == last("ref")


def test_postfix_flush_down_like_postfix(pair):
    # postfix-script runs postqueue -f: its words and EX_UNAVAILABLE.
    same(pair, "postfix", "-c", "@C@", "flush")


@pytest.mark.parametrize("args", [["status"], ["stop"], ["bogus"], ["check"]], ids=repr)
def test_postfix_quiet_on_non_terminal_stderr(pair, args):
    # postfix(1) and postfix-script (postlog) write to stderr only when it is a terminal.
    assert same(pair, "postfix", "-c", "@C@", *args)[2] == ""

