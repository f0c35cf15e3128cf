"""Admin-tool parity leftovers, side by side with Debian's Postfix 3.7 where it
is installed: postfix(1) on a terminal and off one, `postfix check` and lookup
tables, postconf -b / -t / -m, and the size mailq shows for a maildrop message.

The reference runs by absolute path against one configuration directory and
postwell against a twin (tests/test_cli_parity.py builds the pair); only
directory paths are normalized.  A pty stands in for the admin's terminal.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from types import SimpleNamespace

import pytest

import harness
from postwell.cli import bounce_templates as bt
from postwell.cli import postconf, postfix as postfix_cli
from postwell.pickup.maildrop_size import postdrop_size

REF = "/usr/sbin"
TIMEOUT = 30
reference = pytest.mark.skipif(
    not all(os.access(f"{REF}/{t}", os.X_OK) for t in ("postfix", "postconf", "sendmail"))
    or os.geteuid() != 0, reason="Debian postfix not installed, or not root")


# ---------------------------------------------------------------- helpers

@pytest.fixture(scope="module")
def pair():
    import tempfile
    from pathlib import Path
    from harness import test_base_dir
    from test_cli_parity import _make_pair
    base = Path(tempfile.mkdtemp(prefix="clileft-", dir=test_base_dir()))
    os.chmod(base, 0o755)
    try:
        dirs = _make_pair(base)
        # Let postwell's check lay out its queue (owners as the daemons need),
        # so that both sides start from a clean `postfix check`.
        queue = os.path.join(dirs["ours"], "queue")
        shutil.rmtree(queue)
        os.mkdir(queue)
        os.chmod(queue, 0o755)
        assert _side(dirs, "ours", "postfix", ["-c", "@C@", "check"])[0] == 0
        yield dirs
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _argv(pair, side: str, tool: str, args: list[str]) -> list[str]:
    from test_cli_parity import _ours
    root = pair[side]
    args = [a.replace("@C@", f"{root}/etc").replace("@B@", pair["base"]).replace("@S@", side)
            for a in args]
    if side == "ref":
        return [f"/usr/bin/{tool}" if tool == "mailq" else f"{REF}/{tool}"] + args
    return _ours(tool) + args


def _env():
    return {k: v for k, v in os.environ.items() if k != "MAIL_CONFIG"}


def _norm(pair, side: str, text: str) -> str:
    text = text.replace(pair[side], "DIR").replace(pair["base"], "BASE")
    for twin in ("dup", "tpl"):
        text = text.replace(f"{twin}-{side}", f"{twin}-S")
    text = "".join(ln for ln in text.splitlines(True) if "/etc/postfix/main.cf" not in ln)
    return text.replace(f"{REF}/postconf", "postconf")


def _side(pair, side, tool, args, stdin=""):
    cp = subprocess.run(_argv(pair, side, tool, args), input=stdin, capture_output=True,
                        text=True, timeout=TIMEOUT, env=_env())
    return cp.returncode, _norm(pair, side, cp.stdout), _norm(pair, side, cp.stderr)


def same(pair, tool, *args, stdin=""):
    ref = _side(pair, "ref", tool, list(args), stdin)
    ours = _side(pair, "ours", tool, list(args), stdin)
    assert ours == ref, f"{tool} {' '.join(args)}"
    return ref


def same_on_tty(pair, tool, *args) -> str:
    ref = _norm(pair, "ref", harness.stderr_on_tty(_argv(pair, "ref", tool, list(args)), _env(), TIMEOUT))
    ours = _norm(pair, "ours", harness.stderr_on_tty(_argv(pair, "ours", tool, list(args)), _env(), TIMEOUT))
    assert ours == ref, f"{tool} {' '.join(args)}"
    return ref


def _script_log(pair, side: str) -> list[str]:
    with open(os.path.join(pair[side], "maillog")) as f:
        text = f.read()
    return [_norm(pair, side, m.group(1)) for m in
            re.finditer(r"(?m)^.* postfix/postfix-script\[\d+\]: (.*)$", text)]


# ---------------------------------------------------------------- postfix(1)

@reference
@pytest.mark.parametrize("args", [["status"], ["stop"], ["abort"], ["reload"], ["bogus"], []],
                         ids=repr)
def test_postfix_on_a_terminal_like_postfix(pair, args):
    out = same_on_tty(pair, "postfix", "-c", "@C@", *args)
    assert out.startswith("postfix/postfix-script: ")
    # Off a terminal: not a word (the maillog has them).
    assert same(pair, "postfix", "-c", "@C@", *args)[2] == ""


@reference
def test_postfix_check_warnings_like_postfix(pair):
    """check-warn's findings: maillog always, stderr only on a terminal, with
    find(1)'s path shapes; the missing aliases.db draws no word on either side."""
    for side in ("ref", "ours"):
        path = os.path.join(pair[side], "etc", "writable")
        with open(path, "w") as f:
            f.write("x\n")
        os.chmod(path, 0o666)
        assert not os.path.exists(os.path.join(pair[side], "etc", "aliases.db"))
    try:
        assert same(pair, "postfix", "-c", "@C@", "check") == (0, "", "")
        assert _script_log(pair, "ours")[-1:] == _script_log(pair, "ref")[-1:] == [
            "warning: group or other writable: DIR/etc/./writable"]
        out = same_on_tty(pair, "postfix", "-c", "@C@", "check")
        assert out == "postfix/postfix-script: warning: group or other writable: DIR/etc/./writable\n"
        assert "unavailable" not in open(os.path.join(pair["ours"], "maillog")).read()
    finally:
        for side in ("ref", "ours"):
            os.unlink(os.path.join(pair[side], "etc", "writable"))


def test_terminal_decides_where_postfix_script_words_go(tmp_path, monkeypatch, capsys):
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "main.cf").write_text(f"queue_directory = {tmp_path}/queue\n"
                                 f"data_directory = {tmp_path}/data\n"
                                 f"maillog_file = {tmp_path}/maillog\n")
    (etc / "master.cf").write_text("")
    # postfix(1) exports MAIL_CONFIG for its helpers: set-then-delete makes monkeypatch
    # restore the variable's original state afterwards (the reference tools of later
    # tests in this worker read it).
    monkeypatch.setenv("MAIL_CONFIG", str(etc))
    monkeypatch.delenv("MAIL_CONFIG")
    assert postfix_cli.main(["-c", str(etc), "status"]) == 1
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(postfix_cli, "_stderr_is_tty", lambda: True)
    assert postfix_cli.main(["-c", str(etc), "stop"]) == 1
    assert capsys.readouterr().err == ("postfix/postfix-script: fatal: the Postfix mail system "
                                       "is not running\n")
    log = (tmp_path / "maillog").read_text()
    assert re.search(r"postfix/postfix-script\[\d+\]: the Postfix mail system is not running\n", log)
    assert re.search(r"postfix/postfix-script\[\d+\]: fatal: the Postfix mail system is not "
                     r"running\n", log)
    # postfix(1)'s own fatal: "postfix: fatal: ..." on the terminal, program "postfix" in the log.
    assert postfix_cli.main(["-c", str(tmp_path / "nonexistent"), "status"]) == 1
    assert capsys.readouterr().err.startswith("postfix: fatal: ")


def test_check_leaves_missing_tables_to_the_daemons(tmp_path):
    from postwell.master.check import check_tables
    from postwell.config import load_config
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "aliases").write_text("root: admin\n")
    (etc / "main.cf").write_text(
        f"alias_maps = hash:{etc}/aliases\nalias_database = hash:{etc}/aliases\n"
        f"transport_maps = hash:{etc}/transport, ldap:{etc}/ldap.cf\n")
    (etc / "master.cf").write_text("")
    assert check_tables(load_config(str(etc)), None) == [
        f"ldap:{etc}/ldap.cf is unavailable. unsupported dictionary type: ldap"]


# ---------------------------------------------------------------- postconf -b / -t

TEMPLATE_FILES = {
    "custom": ("# comment\n\nfailure_template = <<EOF\nsubject: Hi there\n\n"
               "line $myhostname ${mydomain} $(myorigin) $$x $mail_name\n"
               "$delay_warning_time_minutes $maximal_queue_lifetime_weeks "
               "$maximal_queue_lifetime_hours\nEOF\n\n"
               "success_template = <<END\nCharset: utf-8\nFrom: Me <me@example.test>\n"
               "Subject: ok\n\ncaf\u00e9 $myhostname\nEND\n"),
    "inapplicable": "verify_template = <<EOF\nPostmaster-Subject: pm\n\nx\nEOF\n",
    "unknown_label": "failure_template = <<EOF\nX-Foo: bar\n\ntext\nEOF\n",
    "eight_bit": "delay_template = <<EOF\n\ncaf\u00e9\nEOF\n",
    "non_ascii_label": "failure_template = <<EOF\nSubject: caf\u00e9\n\nx\nEOF\n",
    "no_labels": "verify_template = <<EOF\ntext only\nEOF\n",
    "bogus_name": "failure_template = <<EOF\n\nx\nEOF\n\nbogus_template = <<EOF\nx\nEOF\n",
    "junk": "junk line\n",
    "undefined": "failure_template = <<EOF\n\nok $myhostname then $no_such_param here\nEOF\n",
}


@pytest.fixture(scope="module")
def template_files(pair):
    for name, text in TEMPLATE_FILES.items():
        with open(os.path.join(pair["base"], f"{name}.cf"), "w", encoding="utf-8") as f:
            f.write(text)
    return pair


@reference
@pytest.mark.parametrize("args", [["-t"], ["-b"], ["-b", "-t"], ["-t", "-m"], ["-b", "-d", "-h"],
                                  ["-t", "-o", "x=y"], ["-a", "-o", "x=y"], ["-t", "a", "b"],
                                  ["-b", "@B@/nonexistent.cf"]], ids=repr)
def test_postconf_templates_like_postfix(pair, args):
    same(pair, "postconf", "-c", "@C@", *args)


@reference
@pytest.mark.parametrize("name", sorted(TEMPLATE_FILES))
@pytest.mark.parametrize("flag", ["-t", "-b"])
def test_postconf_template_file_like_postfix(template_files, name, flag):
    if name == "bogus_name" and flag == "-t":
        # Postfix's -t repeats the unknown-name warning a varying number of
        # times (it re-reads the file per template); postwell says it once.
        args = ["-c", "@C@", flag, f"@B@/{name}.cf"]
        ref = _side(template_files, "ref", "postconf", args)
        ours = _side(template_files, "ours", "postconf", args)
        assert ours[:2] == ref[:2] and ours[2] == ref[2].splitlines(True)[0]
        return
    same(template_files, "postconf", "-c", "@C@", flag, f"@B@/{name}.cf")


@reference
@pytest.mark.parametrize("flag", ["-t", "-b"])
def test_postconf_bounce_template_file_parameter_like_postfix(template_files, flag):
    from test_cli_parity import _main_cf
    for side in ("ref", "ours"):
        etc = os.path.join(template_files["base"], f"tpl-{side}")
        os.makedirs(etc, exist_ok=True)
        with open(os.path.join(etc, "main.cf"), "w") as f:
            f.write(_main_cf(template_files[side]) +
                    f"bounce_template_file = {template_files['base']}/custom.cf\n"
                    "delay_warning_time = 4h\n")
        shutil.copy(os.path.join(template_files[side], "etc", "master.cf"), etc)
    out = same(template_files, "postconf", "-c", "@B@/tpl-@S@", flag)[1]
    assert ("Subject: Hi there" if flag == "-t" else "line mx.example.test") in out


def test_builtin_templates_are_the_notices_texts():
    from postwell.dsn.notice import FAILURE, SUCCESS, TEMPLATES
    t = bt.builtin_templates()
    assert t["failure_template"].subject == TEMPLATES[FAILURE][0]
    assert list(t["failure_template"].text) == TEMPLATES[FAILURE][2]
    assert t["success_template"].postmaster_subject is None
    assert list(t["success_template"].text) == TEMPLATES[SUCCESS][2]
    assert list(bt.NAMES) == list(t)


def test_template_expansion_rules():
    cfg = SimpleNamespace(
        get=lambda n: {"myhostname": "mx.test", "mail_name": "Postfix"}.get(n, ""),
        is_set=lambda n: n in ("myhostname", "mail_name"),
        default=lambda n: None,
        get_time=lambda n, unit: {"delay_warning_time": 7200.0,
                                  "maximal_queue_lifetime": 5 * 86400.0}[n])
    t = bt.BounceTemplate("delay_template", "us-ascii", "x", "s", None, (
        "$myhostname ${mail_name} $$ $delay_warning_time_minutes $maximal_queue_lifetime_weeks",))
    warnings = []
    assert bt.expand_text(t, cfg, "F", warnings.append) == ["mx.test Postfix $ 120 0"]
    assert warnings == [
        'F: zero result in delay template conversion of parameter "maximal_queue_lifetime_weeks"',
        'please reduce time unit "weeks" of "maximal_queue_lifetime_weeks" in delay template',
        "for instructions see the bounce(5) manual"]
    bad = bt.BounceTemplate("failure_template", "us-ascii", "x", "s", None, ("a $nope b",))
    with pytest.raises(bt.TemplateError, match=r"^F: undefined \$name in failure template: a \$nope b$"):
        bt.expand_text(bad, cfg, "F")


def test_map_types_are_postfixs_where_supported():
    from postwell.tables import table_types
    types = postconf.map_types()
    assert types == sorted(types)
    assert set(types) <= set(postconf.POSTFIX_MAP_TYPES) | set(postconf.EXTRA_MAP_TYPES)
    assert {"hash", "lmdb", "regexp", "pcre", "cidr", "proxy"} <= set(types)
    assert set(types) - {"proxy"} <= set(table_types())


@reference
def test_postconf_m_like_postfix_where_supported(pair):
    ref = _side(pair, "ref", "postconf", ["-m"])[1].split()
    ours = _side(pair, "ours", "postconf", ["-m"])[1].split()
    assert [t for t in ours if t not in postconf.EXTRA_MAP_TYPES] == \
        [t for t in ref if t in ours]


# ---------------------------------------------------------------- mailq and the maildrop

def _env_of(**kw):
    base = dict(sender="s@x", recipients=["a@x"], submit_time=1795960000.5, fullname="root",
                notify=None, ret=None, envid=None, body=None, rewrite="local")
    base.update(kw)
    return SimpleNamespace(**base)


def test_postdrop_size_records():
    # T "1795960000 500000" (17), A rewrite_context=local (21), F root, S s@x, R a@x, M X E.
    fixed = (2 + 17) + (2 + 21) + (2 + 4) + (2 + 3) + (2 + 3) + 3 * 2
    assert postdrop_size(_env_of(), [b""]) == fixed
    assert postdrop_size(_env_of(), [b"ab\n", b"\n"]) == fixed + (2 + 2) + 2
    # A 200-byte line takes a two-byte length; cut at the line limit into L + N.
    assert postdrop_size(_env_of(), [b"x" * 200 + b"\n"]) == fixed + 3 + 200
    assert postdrop_size(_env_of(), [b"x" * 150 + b"\n"], line_limit=100) == fixed + 102 + 52
    # Exactly the limit: an L record, then an empty N for the newline.
    assert postdrop_size(_env_of(), [b"x" * 100, b"\n"], line_limit=100) == fixed + 102 + 2
    # An unterminated last line ends at end of file.
    assert postdrop_size(_env_of(), [b"x" * 100], line_limit=100) == fixed + 102
    assert postdrop_size(_env_of(), [b"abc"]) == fixed + 5
    # -N repeats notify_flags before each recipient; -R/-V/-B add one attribute each.
    two = _env_of(recipients=["a@x", "b@x"], notify="SUCCESS,DELAY", ret="HDRS", envid="e1",
                  body="8BITMIME")
    assert postdrop_size(two, []) == fixed + 5 + 2 * (2 + 15) + (2 + 11) + (2 + 14) + (2 + 13)


def _time_record_length(path: str, ours: bool) -> int:
    with open(path, "rb") as f:
        data = f.read()
    if not ours:
        return data[1]
    sec, frac = re.search(rb"\ntime (\d+)\.(\d+)\n", data).groups()
    return len(sec) + 1 + len(str(int(frac)))


def _empty_maildrops(pair):
    for side in ("ref", "ours"):
        drop = os.path.join(pair[side], "queue", "maildrop")
        for name in os.listdir(drop):
            os.unlink(os.path.join(drop, name))


@reference
@pytest.mark.parametrize("args,message", [
    (["a@example.test"], "Subject: x\n\nbody\n"),
    (["-N", "success,delay", "-R", "hdrs", "-V", "envid123", "-B", "8BITMIME", "-F", "Full Name",
      "a@example.test", "c@x"], "To: t@x\nSubject: s\n\nline\n"),
    (["-t"], "To: t@x, u@y\nSubject: s\n\nline\n"),
    (["-f", "<>", "a@x", "b@y"], "x"),
    (["b@x"], "x" * 5000 + "\n" + "y" * 2048 + "\n" + "z" * 10 + "\n"),
    (["-G", "a@x"], ""),
], ids=["plain", "dsn", "-t", "null-sender", "long-lines", "empty"])
def test_maildrop_size_like_postfix(pair, args, message):
    """The size Postfix's mailq shows for a maildrop message (its postdrop
    file's), computed from postwell's maildrop file."""
    _empty_maildrops(pair)
    try:
        paths = {}
        for side in ("ref", "ours"):
            cp = subprocess.run(_argv(pair, side, "sendmail", ["-C", "@C@", *args]),
                                input=message, capture_output=True, text=True,
                                timeout=TIMEOUT, env=_env())
            assert cp.returncode == 0, cp.stderr
            drop = os.path.join(pair[side], "queue", "maildrop")
            (name,) = os.listdir(drop)
            paths[side] = os.path.join(drop, name)
        from postwell.pickup.maildrop import read_maildrop
        fd = os.open(paths["ours"], os.O_RDONLY)
        try:
            drop = read_maildrop(fd, os.fstat(fd).st_size)
            size = postdrop_size(drop.envelope, drop.iter_content())
        finally:
            os.close(fd)
        # Equal but for the microsecond digits of the two submission times.
        assert size == (os.path.getsize(paths["ref"]) - _time_record_length(paths["ref"], False)
                        + _time_record_length(paths["ours"], True))
    finally:
        _empty_maildrops(pair)


# ---------------------------------------------------------------- a parameter set twice

@pytest.fixture(scope="module")
def dup_pair(pair):
    """main.cf with a setting appended over the stock one (an everyday edit)."""
    from test_cli_parity import _main_cf
    for side in ("ref", "ours"):
        etc = os.path.join(pair["base"], f"dup-{side}")
        os.makedirs(etc, exist_ok=True)
        with open(os.path.join(etc, "main.cf"), "w") as f:
            f.write(_main_cf(pair[side]) + "myhostname = other.example.test\n")
        shutil.copy(os.path.join(pair[side], "etc", "master.cf"), etc)
        past = time.time() - 3600      # Postfix pauses after a fresh main.cf edit
        os.utime(os.path.join(etc, "main.cf"), (past, past))
    return pair


@reference
@pytest.mark.parametrize("args", [[], ["-n"], ["-d", "myhostname"], ["-M"], ["-m"], ["-t"], ["-a"],
                                  ["-P"], ["-x", "myhostname"], ["-h", "myhostname"],
                                  ["-o", "a=b", "myhostname"]], ids=repr)
def test_postconf_overriding_entry_like_postfix(dup_pair, args):
    # The warnings and status; the listings themselves are compared elsewhere
    # (postwell's defaults and map types differ where documented).
    argv = ["-c", "@B@/dup-@S@", *args]
    ref = _side(dup_pair, "ref", "postconf", argv)
    ours = _side(dup_pair, "ours", "postconf", argv)
    assert (ours[0], ours[2]) == (ref[0], ref[2])
    if "-d" not in args and "-a" not in args:
        assert "overriding earlier entry: myhostname=mx.example.test" in ours[2]


@reference
@pytest.mark.parametrize("args", [["status"], ["stop"], ["bogus"]], ids=repr)
def test_postfix_overriding_entry_on_a_terminal_like_postfix(dup_pair, args):
    out = same_on_tty(dup_pair, "postfix", "-c", "@B@/dup-@S@", *args)
    assert out.startswith("postfix: warning: BASE/dup-")
    assert "postfix/postlog: warning: BASE/dup-" in out
