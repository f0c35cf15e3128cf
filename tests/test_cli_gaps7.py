"""The admin-tool gaps of task H3 and the differences tests/test_cli_fuzz7.py
found, minimised, side by side with Debian's Postfix 3.7; plus reference-free
unit tests of the pieces behind them (sendmail's RFC 822 address grouping,
the lenient master.cf reading postconf uses).

Side-by-side cases run the reference tool by absolute path on one private
configuration directory and postwell's on a twin (test_cli_fuzz7.make_pair);
only paths and the program path prefix are normalised.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest

from postwell.cli import tok822
from postwell.config import ConfigError
from postwell.config.master import parse_master_cf, parse_master_line, split_nameval

REF = "/usr/sbin"
REFERENCE_TOOLS = ("postconf", "postmap", "postalias", "sendmail", "postfix", "postqueue",
                   "postsuper", "postcat")


# ---------------------------------------------------------------- unit: tok822

@pytest.mark.parametrize("arg,expected", [
    ("bob@", ["bob@"]), ("a@b@", ["a@b@"]), ("@", ["@"]), ("c@.", ["c@."]),
    ("<>", [""]), ('""', [""]), ("(c)", [""]), (";", [""]), (",", [""]), ("", [""]), (" ", [""]),
    ("x <>", [""]), ("<> , <>", [""]), (":", [":"]), ("a:b;", ["b"]), ("g: a, b;", ["a", "b"]),
    ("x y", ["x", "y"]), ("a,,b", ["a", "b"]), ("a,", ["a"]), ("a ;", ["a"]), ("(c) a", ["a"]),
    ("<a@b", ["<a@b"]), ("a@b>", ["a@b"]), ("<<a>>", ["a>"]), ("<>a", ["a"]),
    ("@a:b@c", ["@a:b@c"]), ("<@x:a@b>", ["@x:a@b"]), ("Name <a@b>", ["a@b"]),
    ('"q"<x@y>', ["x@y"]), ("a b <c@d>", ["c@d"]), ("a@b (x) , c", ["a@b", "c"]),
    ('"a b"@c', ["a b@c"]), ('"a\\"b"@c', ['a"b@c']), ("[a\\]b]", ["[a]b]"]), ("\\\\x", ["\\x"]),
    ("a.b.@c", ["a.b.@c"]), ("a%b", ["a%b"]), ("a!b", ["a!b"]), ("ä@x", ["ä@x"]),
])
def test_sendmail_recipient_grouping(arg, expected):
    """What Postfix 3.7's sendmail writes for one command-line argument
    (each observed with postcat -e on its postdrop file)."""
    assert tok822.recipients(arg) == expected


@pytest.mark.parametrize("arg,expected", [
    ("a b", ("a", True)), ("a@", ("a@", False)), ("<>", ("", False)), ("", ("", False)),
    ("(x)", ("", False)), ("a, b", ("a", True)), ("@r:a@b", ("@r:a@b", False)),
    ("<a@b", ("<a@b", False)), ("S <s@x>", ("s@x", False)),
])
def test_sendmail_sender_grouping(arg, expected):
    assert tok822.sender(arg) == expected


def test_tok822_is_bounded_on_long_input():
    # one pass of the scanner and one of the grouping: no blow-up
    text = "a" * 5000 + " <" * 2000 + "b@c" + ">" * 2000
    assert tok822.addresses(text)


# ---------------------------------------------------------------- unit: master.cf

@pytest.mark.parametrize("text,expected", [
    ("a=b", ("a", "b")), (" a = b c ", ("a", "b c")), ("a=", ("a", "")),
    ("a", "missing '=' after attribute name"), ("a b = c", "missing '=' after attribute name"),
    ("=b", "missing attribute name"), ("", "missing attribute name"),
    ("  ", "missing attribute name"),
])
def test_split_nameval(text, expected):
    if isinstance(expected, tuple):
        assert split_nameval(text) == expected
    else:
        with pytest.raises(ValueError, match=re.escape(expected)):
            split_nameval(text)


def test_malformed_option_is_kept_by_the_lenient_parser():
    warnings: list[str] = []
    (svc,) = parse_master_cf("x unix - - n - - smtpd -o foo -o {c} -o =x -o a=b -o\n",
                             "master.cf", warnings.append, strict=False)
    assert svc.overrides == {"a": "b"}
    assert svc.option_errors == [
        'invalid "-o foo" option value: missing \'=\' after attribute name',
        'invalid "-o c" option value: missing \'=\' after attribute name',
        'invalid "-o =x" option value: missing attribute name']
    # postconf warns only about the braced one, in Postfix's words
    assert warnings == ["master.cf: missing '=' after attribute name: \"c\""]
    with pytest.raises(ConfigError, match="missing '=' after attribute name"):
        parse_master_line("x unix - - n - - smtpd -o foo")


def test_unprivileged_field_wording():
    with pytest.raises(ConfigError) as ei:
        parse_master_line("x unix n q n - - smtp")
    assert ei.value.msg == 'invalid unprivileged field "q" in "x unix n q n - - smtp"'


# ---------------------------------------------------------------- side by side

@pytest.fixture(scope="module")
def pair():
    if not all(os.access(f"{REF}/{t}", os.X_OK) for t in REFERENCE_TOOLS):
        pytest.skip("Debian postfix not installed")
    if os.geteuid() != 0:
        pytest.skip("the reference tools need root here")
    from harness import test_base_dir
    from test_cli_fuzz7 import make_pair
    base = Path(tempfile.mkdtemp(prefix="cligaps7-", dir=test_base_dir()))
    os.chmod(base, 0o755)
    try:
        dirs = make_pair(base)
        for side in ("ref", "ours"):
            # a configuration directory with a master.cf and no main.cf
            os.makedirs(os.path.join(dirs[side], "nomain"))
            shutil.copy(os.path.join(dirs[side], "etc", "master.cf"),
                        os.path.join(dirs[side], "nomain", "master.cf"))
            os.makedirs(os.path.join(dirs[side], "empty"))
        yield dirs
    finally:
        shutil.rmtree(base, ignore_errors=True)


@contextlib.contextmanager
def appended(pair, name: str, text: str):
    """Both sides' etc/NAME with TEXT appended, restored afterwards."""
    from test_cli_fuzz7 import _cool
    try:
        for side in ("ref", "ours"):
            with open(os.path.join(pair[side], "etc", name), "a") as f:
                f.write(text)
            _cool(pair[side])
        yield
    finally:
        for side in ("ref", "ours"):
            shutil.copy(os.path.join(pair[side], f"{name}.saved"),
                        os.path.join(pair[side], "etc", name))
            _cool(pair[side])


def same(pair, tool, *args, stdin="", edits=(), maildrop=False, queue=False, rebuild=()):
    from test_cli_fuzz7 import Case, outcome
    case = Case(tool, list(args), stdin=stdin, edits=tuple(edits), maildrop=maildrop, queue=queue,
                rebuild=tuple(rebuild))
    got = outcome(pair, case)
    assert got["ours"] == got["ref"], str(case)
    return got["ref"]


BAD_OPTIONS = ("x unix n - n - - smtpd -o foo\ny unix n - n - - smtpd -o\n"
               "z unix - - - - - smtpd -o =bar -o a=b -o { c } -o {d = e} -o {x y}\n")


@pytest.mark.parametrize("args", [
    ["-M"], ["-Mf", "x", "z"], ["-P"], ["-F", "z"], ["-Mx", "z"], ["mail_name"], ["-n"],
    ["-d", "mydomain"], ["-P", "z/unix/a"],
], ids=repr)
def test_postconf_accepts_malformed_o_like_postfix(pair, args):
    """Postfix's postconf shows a malformed -o as written (a braced one draws a
    warning); only the service's daemon would fail on it."""
    with appended(pair, "master.cf", BAD_OPTIONS):
        same(pair, "postconf", "-c", "@C@", *args)


@pytest.mark.parametrize("line", ["x unix n - n\n", "x unix n q n - - smtp\n",
                                  "x bogus n - n - - smtp\n", "# c\n\nx unix n\n  # mid\n  - n\n",
                                  # the quoted line keeps its blanks; a TAB shows as '?'
                                  "x  unix\tq - n - - smtp\n",
                                  "x fifo yes n z x -5 pipe -o {x y} flags=R\n  -o cont=1\n",
                                  "x pass y y z - 1 local -o a=b\n# comment\n  -o c=d\n",
                                  # field errors come before an unclosed brace
                                  "x pass y - z - 0 pipe -o {unclosed\n", "{x unix - - n - - smtp\n",
                                  "a/b inet y -o {unclosed -o a=b\n"], ids=repr)
# -M and -P read master.cf as the daemons do; mydomain and -d mydomain were seen to
# agree with them on every line here (kept out of the default run for time).
@pytest.mark.parametrize("args", [["-M"], ["-P"]], ids=repr)
def test_postconf_broken_master_cf_like_postfix(pair, line, args):
    with appended(pair, "master.cf", line):
        same(pair, "postconf", "-c", "@C@", *args)


@pytest.mark.parametrize("line", [
    "x unix - - n - - smtp -o {unclosed\n", "x unix - - n - - smtp -o a=b {unclosed -o c=d\n",
    "x unix - - n - - smtp\n  -o {unclosed\n  -o c=d\n",
    "x unix - - n - - smtp -o {a} {b\n", "x unix - - n - - smtp -o { a  b } {c  d}\n",
], ids=repr)
@pytest.mark.parametrize("args", [["-M"], ["-Mf"], ["-P"], ["-F", "x/unix/command"],
                                  ["-Fh", "x/unix/command"]], ids=repr)
def test_postconf_unclosed_braces_like_postfix(pair, line, args):
    """An unclosed '{' in the arguments is a warning for postconf (the word
    runs to the end of the line), said when postconf reaches it."""
    with appended(pair, "master.cf", line):
        same(pair, "postconf", "-c", "@C@", *args)


@pytest.mark.parametrize("tool,args", [
    ("postqueue", ["-c", "@C@", "-p"]), ("postsuper", ["-c", "@C@", "-d", "ABCDEF", "deferred"]),
    ("postcat", ["-c", "@C@", "-q", "ABCDEF"]), ("postmap", ["-c", "@C@", "-q", "UPPER", "hash:@C@/map"]),
], ids=repr)
def test_tools_without_master_cf_need_like_postfix(pair, tool, args):
    """A master.cf postconf cannot parse stops nothing but postconf and postfix(1)."""
    with appended(pair, "master.cf", "x unix n - n\n"):
        same(pair, tool, *args, queue=tool == "postqueue")


@pytest.mark.parametrize("command", ["status", "check", "bogus"])
def test_postfix_with_broken_master_cf_like_postfix(pair, command):
    """postfix-script's first postconf fails: postconf's words on stderr,
    "cannot execute .../postconf!" in the maillog, exit 1."""
    from test_cli_parity import _log_lines
    with appended(pair, "master.cf", "x unix n - n\n"):
        got = same(pair, "postfix", "-c", "@C@", command)
    assert got["rc"] == 1 and "bad field count" in got["stderr"]
    last = {side: _log_lines(pair, side, "postfix/postfix-script")[-1:] for side in ("ref", "ours")}
    assert last["ours"] == last["ref"] and last["ref"][0].startswith("fatal: cannot execute ")


@pytest.mark.parametrize("args", [
    ["-d", "myhostname", "config_directory", "queue_directory", "mydomain"],
    ["-dx", "myorigin"], ["-dh", "config_directory"], ["-n"], ["mydomain"],
], ids=repr)
def test_postconf_d_ignores_main_cf_like_postfix(pair, args):
    """postconf -d shows built-in defaults: a broken main.cf and its values
    (and its config_directory) do not matter; without -d the error is fatal."""
    with appended(pair, "main.cf", "garbage line\nmyhostname = a\nmyhostname = b\n"):
        same(pair, "postconf", "-c", "@C@", *args)


@pytest.mark.parametrize("args", [
    ["-c", "@R@/nomain", "-d", "mydomain"], ["-c", "@R@/nomain", "mydomain"],
    ["-c", "@R@/empty", "-d", "mydomain"], ["-c", "@R@/empty", "-n"],
    ["-c", "@R@/nosuchdir", "-d", "myorigin"],
], ids=repr)
def test_postconf_d_without_files_like_postfix(pair, args):
    same(pair, "postconf", *args)


@pytest.mark.parametrize("args", [
    # -Me: the named entry and any entry of the new service/type are replaced
    ["-Me", "pickup/unix=qmgr unix - - n - 2 smtp"], ["-Me", "showq/unix=pickup unix - - n - 2 smtp"],
    ["-Me", "nosuch/unix=new unix - - n - 2 smtp"], ["-Me", "nosuch/unix=relay2 unix - - n - - smtp -o foo"],
    ["-Me", "pickup/unix=pickup unix - - n - 2 smtp", "pickup/unix=pickup unix - - n - 3 smtp"],
    ["-Me", "x/unix= "], ["-Me", "=x unix - - n - - smtp"], ["-Me", "pickup=x unix - - n - - smtp"],
    ["-Me", "pickup/unix"], ["-Me", "x/unix=x bogus - - n - - smtp"],
    ["-Me", "x/unix/z=x unix - - n - - smtp"], ["-M", "pickup/unix=x unix - - n - - smtp"],
    ["-MX", "pickup"], ["-MX", "/unix"], ["-M#", "a/b/c"], ["-MX", "pickup/"], ["-MX", "a/b=c"],
    # -Pe / -PX
    ["-PX", "/unix"], ["-PX", "a/b"], ["-Pe", "a/b/c"], ["-PX", "a/b/c=d"],
    ["-Pe", "a/b/c=x", "y"], ["-Pe", "pickup/unix/c=x  y"], ["-P", "pickup/unix/a=b"],
    ["-PX", "127.0.0.1:2/inet/syslog_name"], ["-Pe", "127.0.0.1:2/inet/x=y"],
    # -Fe
    ["-Fe", "pickup/unix/wakeup=30"], ["-Fe", "pickup/unix/bogus=1"], ["-Fe", "nosuch/unix/chroot=y"],
    ["-Fe", "pickup/unix/chroot=x"], ["-Fe", "pickup/unix/service=newname"],
    ["-Fe", "pickup/unix/type=inet"], ["-Fe", "pickup/unix/private=-"], ["-Fe", "a/b=c"],
    ["-Fe", "pickup/unix/unprivileged=q"], ["-Fe", "pickup/unix/command=a  b -o x=y"],
    ["-Fe", "127.0.0.1:2/inet/wakeup=5"], ["-F", "pickup/unix/wakeup=5"], ["-F", "-e", "a"],
], ids=repr)
def test_postconf_master_edits_like_postfix(pair, args):
    same(pair, "postconf", "-c", "@C@", *args, edits=("master.cf",))


@pytest.mark.parametrize("args", [
    ["-F", "a/b/c/d"], ["-P", "a/b/c/d"], ["-M", "a/b/c"], ["-P", "/unix"], ["-M", "pickup/"],
    ["-F", "pickup/unix/bogus"], ["-F", "pickup/unix/command", "pickup/unix/nope"],
    ["-F", "-h", "error/unix", "pickup/unix/bogus_field"],
    ["-F", "-f"], ["-F", "-fh", "relay2/unix/command"], ["-F", "pickup", "pickup/unix/wakeup"],
    ["-P", "relay2", "relay2/unix/smtp_helo_name"], ["-F", "-h", "127.0.0.1:2/inet/command"],
], ids=repr)
def test_postconf_master_requests_like_postfix(pair, args):
    same(pair, "postconf", "-c", "@C@", *args)


@pytest.mark.parametrize("args", [
    ["-X", "-H", "myhostname"], ["-X", "-h", "myhostname"], ["-X", "-x", "myhostname"],
    ["-X", "-f", "myhostname"], ["-#", "-H", "myhostname"], ["-e", "-f", "myhostname"],
    ["-e", "-o", "a=b", "myhostname"], ["-f", "-h", "-X", "myhostname"], ["-e", "-h", "-x", "x=y"],
    ["-h", "-H", "-e", "x=y"], ["-H", "-x", "-X", "myhostname"], ["-d", "-x", "-X", "myhostname"],
    ["-X", "-n", "a=b"], ["-X", "a=b"], ["-X", "relayhost", "a=b"], ["myparam=1", "relayhost"],
    ["relayhost", "myparam=1"], ["-o", "novalue", "relayhost"], ["-o", "=x", "relayhost"],
    ["-H", "-o", "novalue", "-a"], ["-o", "a=b", "-o", "c=d", "-n", "mydomain"],
    ["zz=1", "aa=2"], ["-l", "-h", "x=y"], ["-a", "x=y"], ["-e", "=trailing  ", "myparam=x"],
    ["-e", "a b = c"], ["-e", " x"],
], ids=repr)
def test_postconf_option_checks_like_postfix(pair, args):
    same(pair, "postconf", "-c", "@C@", *args, edits=("main.cf",))


@pytest.mark.parametrize("tool,args,stdin", [
    ("postmap", ["-i", "hash:@C@/scratch"], "novalue\nk v\nk: v\n"),
    ("postalias", ["-i", "hash:@C@/scratch"], "k v\nk2 v2\n"),
    ("postmap", ["-i", "static:fixed"], "k v\n"), ("postalias", ["-i", "texthash:@C@/aliases"], "k v\n"),
    ("postmap", ["-i", "regexp:@C@/scratch"], "k v\n"),
    ("postmap", ["hash:@C@/aliases"], ""), ("postmap", ["-n", "-q", "a@example.test", "hash:@C@/map"], ""),
    ("postmap", ["-N", "-q", "a@example.test", "lmdb:@C@/map"], ""),
    ("postmap", ["-n", "-q", "-", "lmdb:@C@/map"], "a@example.test\nexample.test\n"),
    ("postmap", ["-q", "", "lmdb:@C@/map"], ""), ("postmap", ["-f", "-q", "-", "lmdb:@C@/map"], "\n"),
], ids=repr)
def test_map_tools_like_postfix(pair, tool, args, stdin):
    rebuild = ("hash:aliases",) if args[-1] == "hash:@C@/aliases" else ()
    try:
        same(pair, tool, "-c", "@C@", *args, stdin=stdin, rebuild=rebuild)
    finally:
        for side in ("ref", "ours"):
            for name in os.listdir(os.path.join(pair[side], "etc")):
                if name.startswith("scratch"):
                    os.unlink(os.path.join(pair[side], "etc", name))


SENDMAIL_ARGS = [
    ["--", "bob@", "a@b@", "@", "c@.", "<>", '""', "x y", "<a@b", "a@b>", "@a:b@c", "a,,b", "(c)",
     ";", ":", "a:b;", '"a b"@c', "\\\\x", ""],
    ["-f", "a b", "x@y"], ["-f", "a@", "x@y"], ["-f", "<>", "x@y"], ["-f", "", "x@y"],
    ["-f", "a, b", "x@y"], ["-f", "@r:a@b", "x@y"], ["-f", "<a@b", "x@y"],
    ["-F", "", "x@y"], ["-N", "never", "--", '""'],
    ["-f", "S <s@x>", "-F", "Full Name", "-N", "delay,success", "-R", "hdrs", "-V", "envid1",
     "-B", "8BITMIME", "a@b", "c@d"],
    ["-N", "", "-dash@x", "a@b@c"], ["-bm", "-dash@x"], ["-N", "bogus", "-y", "-z"], ["-Q", "-R"],
    ["-R"],
]


@pytest.mark.parametrize("args", SENDMAIL_ARGS, ids=repr)
def test_sendmail_envelope_like_postfix(pair, args):
    """Exit status, stderr and the envelope each side's postcat shows for the
    maildrop file (an empty recipient is written as $empty_address_recipient)."""
    same(pair, "sendmail", "-C", "@C@", *args, stdin="Subject: t\n\nbody\n", maildrop=True)


@pytest.mark.parametrize("kind", ["hash", "lmdb"])
def test_postalias_incremental_writes_markers_like_postfix(pair, kind):
    """postalias -i adds sendmail's "@" and the YP_ keys, as a full build does."""
    try:
        same(pair, "postalias", "-c", "@C@", "-i", f"{kind}:@C@/scratch", stdin="k v\n")
        same(pair, "postalias", "-c", "@C@", "-s", f"{kind}:@C@/scratch")
        same(pair, "postalias", "-c", "@C@", "-i", f"{kind}:@C@/scratch", stdin="k: v\n")
        same(pair, "postmap", "-c", "@C@", "-s", f"{kind}:@C@/scratch")
    finally:
        for side in ("ref", "ours"):
            for name in os.listdir(os.path.join(pair[side], "etc")):
                if name.startswith("scratch"):
                    os.unlink(os.path.join(pair[side], "etc", name))
