"""Admin-tool parity sweep (task H7), side by side with Debian's Postfix 3.7:
the cases earlier sweeps did not reach, each run against the reference tool
(by absolute path) on one private configuration directory and against
postwell's tool on a twin (tests/test_cli_fuzz7.py make_pair: main.cf and
master.cf with extras, lookup tables, two maildrop messages per side).

Exit status, stdout and stderr must agree once directory paths and the
program path prefix are normalised; editing cases also compare the edited
file, then restore both sides.  Nothing is started: no listener, no network.

Postfix's msg_fatal() sleeps a second before it exits, so cases that change
nothing run side by side in a thread pool when the module's pair is built;
cases that edit a file run one after the other.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import test_cli_fuzz7 as f7
from test_cli_fuzz7 import Case

# The side-by-side tests need the reference (their fixture skips without it);
# the unit tests at the end do not.
pytestmark = [pytest.mark.postfix]

# id -> Case for the cases that change no file: run together, compared one by one.
POOLED: dict[str, Case] = {}


def _ident(case: Case) -> str:
    text = str(case)
    return text if len(text) < 120 else text[:110] + f"..#{abs(hash(text)) % 9999}"


def pooled(tool: str, rows, **kw) -> list[str]:
    ids = []
    for args in rows:
        case = Case(tool, list(args), **kw)
        POOLED[_ident(case)] = case
        ids.append(_ident(case))
    return ids


def edits(tool: str, rows, files=("master.cf",), **kw) -> list:
    return [pytest.param(Case(tool, list(args), edits=files, **kw), id=_ident(Case(tool, list(args))))
            for args in rows]


# Extra sources under etc/ on both sides (@R@ is the side's directory);
# bytes, so a source can hold text that is not UTF-8.
EXTRA_FILES = {
    "dup": b"a 1\nb 2\na 3\nA 4\n",
    "utf": "m\u00fcller@example.test ok\nkey \u00e9\n".encode("latin-1"),
    "frhs": b"k1 @R@/etc/rhs1\nk2 @R@/etc/nonexist\n",
    "rhs1": b"file content\nline2\n",
    "ali_bad": b"root admin\nfoo: \nbar:baz\n: x\nlist: a, b\n  c\nMiXed: y\n",
    "ali_dup": b"a: x\na: y\nA: z\n",
}


@pytest.fixture(scope="module")
def pair():
    for mark in f7.pytestmark:
        if mark.name == "skipif" and mark.args[0]:
            pytest.skip(mark.kwargs["reason"])
    from harness import test_base_dir
    base = Path(tempfile.mkdtemp(prefix="clisweep9-", dir=test_base_dir()))
    os.chmod(base, 0o755)
    try:
        dirs = f7.make_pair(base)
        for side in ("ref", "ours"):
            for name, data in EXTRA_FILES.items():
                with open(os.path.join(dirs[side], "etc", name), "wb") as f:
                    f.write(data.replace(b"@R@", dirs[side].encode()))
            f7._cool(dirs[side])
        yield dirs
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _fixed_ids(pair, side: str) -> list[str]:
    """The side's two fixed maildrop files, the one to a@example.test first."""
    drop = os.path.join(pair[side], "queue", "maildrop")

    def to_b(name: str) -> bool:
        with open(os.path.join(drop, name), "rb") as f:
            return b"a@example.test" not in f.read()
    return sorted(pair["fixed"][side], key=to_b)


def _one_side(pair, case: Case, side: str) -> dict:
    ids = _fixed_ids(pair, side)
    args = [a.replace("@ID0@", ids[0]).replace("@ID1@", ids[1]) for a in case.args]
    rc, out, err = f7.run_side(pair, side, case.tool, args, case.stdin)
    for k, qid in enumerate(ids):
        out, err = out.replace(qid, f"ID{k}"), err.replace(qid, f"ID{k}")
    # the two sides' messages were dropped moments apart
    out = re.sub(r"(?m)^((?:\s*\d+ )?message_arrival_time: ).*$", r"\1TIME", out)
    if case.queue:
        out = f7._mask_queue(out)
    if case.unordered:
        out = "".join(sorted(out.splitlines(True)))
    return {"rc": rc, "stdout": out, "stderr": err}


@pytest.fixture(scope="module")
def pooled_outcomes(pair):
    # Each side of each case is its own task: most of the time is Postfix's
    # one-second pause in msg_fatal(), which overlaps freely.
    with ThreadPoolExecutor(max_workers=16) as pool:
        futures = {(ident, side): pool.submit(_one_side, pair, case, side)
                   for ident, case in POOLED.items() for side in ("ref", "ours")}
        return {ident: {side: futures[ident, side].result() for side in ("ref", "ours")}
                for ident in POOLED}


# Cases whose stderr lines Postfix prints in hash-table order (its scan of
# every parameter value): compared as a set of lines.
UNORDERED_STDERR: set[str] = set()


def same_pooled(pooled_outcomes, ident: str) -> None:
    got = pooled_outcomes[ident]
    if ident in UNORDERED_STDERR:
        got = {side: {**r, "stderr": sorted(r["stderr"].splitlines())} for side, r in got.items()}
    assert got["ours"] == got["ref"], ident


def _c(*args: str) -> list[str]:
    return ["-c", "@C@", *args]


# ---------------------------------------------------------------- postconf: master.cf patterns

# pcf_parse_service_pattern(): a part that is "*" matches anything, "*"
# inside a word is refused, empty parts vanish, missing parts are "*".
MASTER_SHOW = pooled("postconf", [_c(*a) for a in (
    ["-M", "*/unix"], ["-M", "*"], ["-M", "relay2/*"], ["-M", "rel*"], ["-M", ""],
    ["-M", "relay2//"], ["-F", "*/*/chroot"], ["-F", "*/unix"],
    ["-F", "*/*/wakeup", "relay2"], ["-F", "a/b/bogus", "x/y/z/w"],
    ["-P", "*/*/syslog_name"], ["-P", "*/unix"], ["-P", "pickup/unix/*"],
    ["-Px", "*/*/smtp_helo_name"],
)])


@pytest.mark.parametrize("ident", MASTER_SHOW)
def test_postconf_master_patterns_like_postfix(pooled_outcomes, ident):
    same_pooled(pooled_outcomes, ident)


# Edit requests refused before anything is written (Postfix checks every
# request first): pooled, with master.cf compared to its saved copy at the end.
MASTER_EDIT_REFUSED = pooled("postconf", [_c(*a) for a in (
    ["-Fe", "relay2/unix/*=y"], ["-Fe", "r/u/x*=b"], ["-Fe", "relay2/unix/chroot=y y"],
    ["-Pe", "relay2/unix/*=bar"], ["-M#", "rel*/unix"], ["-Me", "# relay2/unix=foo"],
    ["-Me", "x/unix=a\nb"], ["-PX", "relay2/unix/a", "a=b"],
)])


@pytest.mark.parametrize("ident", MASTER_EDIT_REFUSED)
def test_postconf_master_edit_refusals_like_postfix(pair, pooled_outcomes, ident):
    same_pooled(pooled_outcomes, ident)
    assert pooled_outcomes[ident]["ref"]["rc"] == 1
    for side in ("ref", "ours"):
        with open(os.path.join(pair[side], "etc", "master.cf")) as now, \
                open(os.path.join(pair[side], "master.cf.saved")) as saved:
            assert now.read() == saved.read(), side


@pytest.mark.parametrize("case", edits("postconf", [_c(*a) for a in (
    ["-MX", "*/unix"], ["-M#", "*/inet"], ["-Me", "*/unix=foo unix - - n - - smtp"],
    ["-Fe", "*/unix/chroot=y"], ["-Fe", "nosuch/unix/wakeup=zz"],
    ["-Pe", "*/unix/foo=bar"], ["-PX", "*/*/nosuch"], ["-Pe", "nosuch/unix/a=b"],
    ["-MX", "  relay2/unix  "],
)]))
def test_postconf_master_edit_patterns_like_postfix(pair, pooled_outcomes, case):
    f7.same(pair, case)


# main.cf edits: a repeated -e name warns, comment input is refused, -X
# drops leading blanks only, and options after the first name are names
# (Postfix's getopt stops there).
@pytest.mark.parametrize("case", edits("postconf", [_c(*a) for a in (
    ["-e", "a=1", "a=2"], ["-#", "#myhostname"], ["-X", " myhostname"], ["-X", "myhostname "],
    ["-e", "myhostname=$mydomain", "-x"],
)], files=("main.cf",)))
def test_postconf_main_edits_like_postfix(pair, pooled_outcomes, case):
    f7.same(pair, case)


# ---------------------------------------------------------------- postconf -T

TLS_INFO = pooled("postconf", [
    _c("-T", "run-version"), _c("-T", "public-key-algorithms"), _c("-T", "bogus"),
    _c("-T", "a", "-T", "b"), _c("-a", "-T", "run-version", "-m"),
    ["-c", "@R@/nonexist", "-T", "run-version"], _c("-T"),
])


# -C picks parameter classes for the listing (checked while options are
# parsed, the last -C wins); -d and -o exclude each other; "$$" is a dollar.
CLASSES = pooled("postconf", [_c(*a) for a in (
    ["-C", "user"], ["-C", "service", "-n"], ["-C", "builtin", "myparam"],
    ["-C", "bogus", "-d", "-n"], ["-C", ",user, ,", "-n"], ["-C", "user", "-C", "service", "-n"],
    ["-C", "all", "-n"], ["-C", "user", "-x"], ["-C"],
    ["-d", "-o", "myhostname=foo", "myhostname"], ["-d", "-o", "a=b", "-m"],
    ["myhostname", "-h"],
    ["-o", "myhostname=$$x", "-x", "myhostname"], ["-o", "a=$$$b", "-o", "b=1", "-x", "a"],
)]) + pooled("postconf", [_c("-C", "service")], unordered=True)
MACRO_ERRORS = pooled("postconf", [_c(*a) for a in (
    # mac_expand() warns with the reason and postconf dies in general words;
    # a loop is blamed on the lookup after the 101st
    ["-o", "a=$b", "-o", "b=$a", "-x", "a"], ["-o", "a=$b", "-o", "b=$a", "-x", "b"],
    # a malformed value draws a warning from the scan of every value
    ["-o", "foo=$", "-h", "mydomain"], ["-o", "foo=${x", "-h", "mydomain"],
)] + [_c("-o", f"relayhost={v}", "-xh", "relayhost") for v in (
    # Postfix 3.7's conditional and comparison forms, and their errors
    "${{1}=={2}?{y}:x}", "${{1} == {1}}", "${{1} == {2} :{no}}",
    "${{3.6} <level {3.10}?{y}:{n}}",
)] + [_c("-o", f"foo={v}", "-h", "mydomain") for v in (
    # a malformed user parameter only draws the scan's warning (a built-in
    # one is also evaluated at start-up, fatally, in hash-table order)
    "${mydomain?{y}x}", "${{1}=={1}?{y}:{n}x}", "${{1} == {2} x}",
    "${{12345}<>{2}?{a}:{b}}", "${{1}  ==   x}", "${{1}==levx {2}}",
)])
UNORDERED_STDERR.update(MACRO_ERRORS)


@pytest.mark.parametrize("ident", CLASSES + MACRO_ERRORS)
def test_postconf_classes_and_macros_like_postfix(pooled_outcomes, ident):
    same_pooled(pooled_outcomes, ident)


@pytest.mark.parametrize("ident", TLS_INFO)
def test_postconf_tls_info_like_postfix(pooled_outcomes, ident):
    same_pooled(pooled_outcomes, ident)


# ---------------------------------------------------------------- postmap / postalias

MAP_QUERIES = pooled("postmap", [_c(*a) for a in (
    # -b/-h/-m need "-q -" (checked once main.cf is read); a lone -m is ignored
    ["-b", "-q", "x", "hash:@R@/etc/map"], ["-h", "hash:@R@/etc/nonexist"], ["-q"],
    # -s lists the first table only, and without one fails quietly
    ["-s"], ["-s", "hash:@R@/etc/map", "cidr:@R@/etc/cidr"],
    ["-s", "hash:@R@/etc/nonexist", "cidr:@R@/etc/cidr"],
    ["-q", "a@example.test", "hash:@R@/etc/map", "hash:@R@/etc/nonexist"],
    # read-only types refuse a delete's read-write open
    ["-d", "x", "cidr:@R@/etc/cidr"], ["-d", "x", "inline:{a=b}"],
    # non-UTF-8 source lines are skipped with smtputf8_enable = yes
    ["-q", "key", "texthash:@R@/etc/utf"],
    # -F: a texthash value names files
    ["-F", "-q", "k1", "texthash:@R@/etc/frhs"], ["-f", "-q", "A", "texthash:@R@/etc/dup"],
)]) + pooled("postmap", [_c("-m", "-q", "-", "hash:@R@/etc/map")], stdin="a@example.test\n") \
    + pooled("postalias", [_c(*a) for a in (
        ["-s"], ["-q", "foo", "texthash:@R@/etc/ali_bad"], ["-q", "a", "texthash:@R@/etc/ali_dup"],
    )])


# unionmap / pipemap / randmap (tables/composite.py); randmap with one value
# answers deterministically.
COMPOSITE = pooled("postmap", [_c(*a) for a in (
    ["-q", "x", "unionmap:foo"], ["-q", "x", "unionmap:{inline:{x=1}, inline:{x=2} inline:{y=3}}"],
    ["-q", "x", "pipemap:{inline:{x=y},inline:{z=w}}"], ["-q", "x", "randmap:{a}"],
    ["-q", "x", "randmap:{}"], ["-s", "unionmap:{inline:{x=1}}"],
    ["-q", "a@example.test", "pipemap:{hash:@R@/etc/map, inline:{ok1=z}}"],
)]) + pooled("postmap", [_c("-q", "-", "unionmap:{inline:{x=1}, inline:{y=2}}")], stdin="x\ny\nz\n")


@pytest.mark.parametrize("ident", COMPOSITE)
def test_composite_tables_like_postfix(pooled_outcomes, ident):
    same_pooled(pooled_outcomes, ident)


@pytest.mark.parametrize("ident", MAP_QUERIES)
def test_map_tools_like_postfix(pooled_outcomes, ident):
    same_pooled(pooled_outcomes, ident)


def _dump(pair, side, tool, spec):
    rc, out, err = f7.run_side(pair, side, tool, ["-c", "@C@", "-s", spec])
    return rc, sorted(out.splitlines()), err


@pytest.mark.parametrize("tool, args", [
    ("postmap", ["hash:@R@/etc/utf"]), ("postalias", ["hash:@R@/etc/utf"]),
    ("postalias", ["-w", "lmdb:@R@/etc/ali_dup"]),
], ids=repr)
def test_map_builds_like_postfix(pair, pooled_outcomes, tool, args):
    got = f7.outcome(pair, Case(tool, ["-c", "@C@", *args]))
    assert got["ours"] == got["ref"]
    spec = args[-1]
    assert _dump(pair, "ours", tool, spec) == _dump(pair, "ref", tool, spec)


def test_lmdb_delete_creates_the_database_like_postfix(pair, pooled_outcomes):
    got = f7.outcome(pair, Case("postmap", ["-c", "@C@", "-d", "x", "lmdb:@R@/etc/fresh"]))
    assert got["ours"] == got["ref"] and got["ref"]["rc"] == 1
    for side in ("ref", "ours"):
        path = os.path.join(pair[side], "etc", "fresh.lmdb")
        assert os.path.exists(path), side
        os.unlink(path)


# ---------------------------------------------------------------- postfix(1)

# getopt's "c:Dv": an unknown flag before the command stops postfix(1) before
# main.cf is read (the usage line only on a terminal); after it, postfix-script
# calls it an unknown command.
POSTFIX_OPTIONS = pooled("postfix", [_c(*a) for a in (
    ["-x", "status"], ["-vx", "status"], ["-vc"], ["--", "-x"],
)])


@pytest.mark.parametrize("ident", POSTFIX_OPTIONS)
def test_postfix_options_like_postfix(pooled_outcomes, ident):
    same_pooled(pooled_outcomes, ident)


def test_postfix_bad_option_on_a_terminal_like_postfix(pair):
    import harness
    got = {}
    for side in ("ref", "ours"):
        cmd = ["/usr/sbin/postfix"] if side == "ref" else f7._ours("postfix")
        got[side] = harness.stderr_on_tty(cmd + ["-c", f"{pair[side]}/etc", "-x", "status"])
    assert got["ours"] == got["ref"] == ("postfix: invalid option -- 'x'\n"
                                         "postfix: fatal: usage: postfix [-c config_dir] [-Dv] command\n")


def test_logrotate_says_postconf_warnings_like_postfix(pair, pooled_outcomes):
    """postfix-script reads maillog_file, its compressor and suffix with one
    `postconf -h` each: main.cf's warnings reach stderr three times."""
    import pwd
    try:
        got = f7.outcome(pair, Case("postfix", _c("logrotate")))
        assert got["ours"] == got["ref"]
        assert got["ref"]["stderr"].count("undefined parameter: nosuch_param") == 3
    finally:
        uid = pwd.getpwnam("postfix").pw_uid
        for side in ("ref", "ours"):
            for name in os.listdir(pair[side]):
                if name.startswith("maillog."):
                    os.unlink(os.path.join(pair[side], name))
            log = os.path.join(pair[side], "maillog")
            open(log, "a").close()
            os.chown(log, uid, -1)


# ---------------------------------------------------------------- postcat

POSTCAT = pooled("postcat", [_c(*a) for a in (
    ["-q", "@ID0@", "@ID1@"], ["-qeh", "@ID0@"],
    # -d: each record's type as a decimal number; -v names the text records
    ["-qd", "@ID0@"], ["-qdh", "@ID1@"],
    # -s takes an offset
    ["-s", "x5", "-q", "@ID0@"], ["-qs"], ["-e", "@R@/queue/maildrop/@ID0@"],
)])


@pytest.mark.parametrize("ident", POSTCAT)
def test_postcat_like_postfix(pooled_outcomes, ident):
    same_pooled(pooled_outcomes, ident)


def test_postcat_verbose_names_text_records(pair, pooled_outcomes):
    """-v: the same records, text ones as "regular_text: ..." (stderr carries
    Postfix's verbose start-up lines, which name this machine's interfaces)."""
    got = {side: _one_side(pair, Case("postcat", _c("-qv", "@ID0@")), side) for side in ("ref", "ours")}
    assert got["ours"]["stdout"] == got["ref"]["stdout"]
    assert "regular_text: Subject: q\n" in got["ours"]["stdout"]


# ---------------------------------------------------------------- sendmail

SENDMAIL = [
    (["-V", "", "a@example.test"], "Subject: x\n\nbody\n"),
    (["-V", "x" * 101, "a@example.test"], "Subject: x\n\nbody\n"),
    (["-bv", "-B", "8BITMIME", "-V", "idx", "a@example.test"], ""),
    (["-t", "e@example.test"], "To: a@example.test\nSubject: x\n\nbody\n"),
    (["-N", "delay,failure", "-R", "hdrs", "-V", "envid1", "a@example.test"], "x\n"),
]


@pytest.mark.parametrize("args, stdin", SENDMAIL, ids=[repr(a) for a, _ in SENDMAIL])
def test_sendmail_like_postfix(pair, pooled_outcomes, args, stdin):
    f7.same(pair, Case("sendmail", ["-C", "@C@", *args], stdin=stdin, maildrop=True))


# ---------------------------------------------------------------- postsuper on maildrop files

def _queue_state(pair, side: str, names: dict) -> dict:
    out = {}
    for q in ("maildrop", "incoming", "active", "deferred", "hold", "corrupt"):
        found = []
        for _root, _dirs, files in os.walk(os.path.join(pair[side], "queue", q)):
            found += [names.get(f, "OTHER") for f in files]
        if found:
            out[q] = sorted(found)
    return out


def _postsuper_log(pair, side: str, skip: int) -> list[str]:
    import re
    with open(os.path.join(pair[side], "maillog")) as f:
        lines = f.read().splitlines()[skip:]
    return [m.group(1) for m in (re.match(r".* postfix/postsuper\[\d+\]: (.*)$", ln) for ln in lines) if m]


@pytest.mark.parametrize("args, stdin", [
    # Postfix's default queues for -d start with maildrop
    (["-d", "@N0@"], ""), (["-d", "-"], "@N0@\n@N1@\n"), (["-d", "@N0@", "-h", "@N1@"], ""),
    (["-d", "ALL"], ""),
], ids=repr)
def test_postsuper_on_maildrop_like_postfix(pair, pooled_outcomes, args, stdin):
    got = {}
    for side in ("ref", "ours"):
        drop = os.path.join(pair[side], "queue", "maildrop")
        names = {n: f"ID{k}" for k, n in enumerate(_fixed_ids(pair, side))}
        for k, rcpt in enumerate(("x@example.test", "y@example.test")):
            before = set(os.listdir(drop))
            rc, _, err = f7.run_side(pair, side, "sendmail", ["-C", "@C@", rcpt], "Subject: s\n\nx\n")
            assert rc == 0, err
            names[(set(os.listdir(drop)) - before).pop()] = f"N{k}"
        new = {v: k for k, v in names.items()}
        with open(os.path.join(pair[side], "maillog")) as f:
            skip = len(f.read().splitlines())
        run_args = [a.replace("@N0@", new["N0"]).replace("@N1@", new["N1"]) for a in args]
        rc, out, err = f7.run_side(pair, side, "postsuper", ["-c", "@C@", *run_args],
                                   stdin.replace("@N0@", new["N0"]).replace("@N1@", new["N1"]))
        for name, tag in names.items():
            err = err.replace(name, tag)
        got[side] = (rc, out, err, [ln.replace(new["N0"], "N0").replace(new["N1"], "N1")
                                    for ln in _postsuper_log(pair, side, skip)],
                     _queue_state(pair, side, names))
        for name in list(new.values()):
            if name not in pair["fixed"][side] and os.path.exists(os.path.join(drop, name)):
                os.unlink(os.path.join(drop, name))
    assert got["ours"] == got["ref"]


# ---------------------------------------------------------------- unit tests (no reference needed)

@pytest.mark.parametrize("text, fewest, most, expected", [
    ("relay", 1, 2, ["relay", "*"]), ("relay//", 1, 2, ["relay", "*"]), ("*/unix", 1, 2, ["*", "unix"]),
    ("rel*", 1, 2, None), ("/unix", 1, 2, None), ("", 1, 2, None), ("a/b/c", 1, 2, None),
    ("a/b/c", 3, 3, ["a", "b", "c"]), ("a/b", 3, 3, None), ("a/b/*", 1, 3, ["a", "b", "*"]),
])
def test_service_pattern(text, fewest, most, expected):
    from postwell.cli.postconf import service_pattern
    assert service_pattern(text, fewest, most) == expected


@pytest.mark.parametrize("value, expected", [
    ("${{1} == {1}}", "true"), ("${{1} == {2}}", ""), ("${{1} == {2} :{no}}", "no"),
    ("${{1} == {1} :{no}}", ""), ("${{1}=={2}?{y}:x}", "x"), ("${{1} == {1} ?x}", "x"),
    ("${a?{y}:x}", "y"), ("${nosuch:{y}}", "y"), ("$$a", "$a"),
])
def test_expression_forms(value, expected):
    from postwell.config.expand import expand
    assert expand(value, {"a": "1"}.get) == expected


@pytest.mark.parametrize("value, message", [
    ("${a?{y}x}", '":" expected at: "...y}>>>x"'),
    ("${{1}=={1}?{y}:{nnn}  x}", 'unexpected input at: "...nnn}>>>x"'),
    ("${nosuch:{y}:{z}}", 'unexpected input at: "...y}>>>:{z}"'),
    ("${{1} == {2} x}", '"?" or ":" expected at: "...}>>>x"'),
    ("${{1}==levx {2}}", 'bad operator suffix at: "...==>>>levx"'),
    ("${{1}  ==   x}", '"{expression}" expected at: "...{1} ==>>>   x"'),
])
def test_expression_errors(value, message):
    from postwell.config.expand import ExpandError, expand
    with pytest.raises(ExpandError) as ei:
        expand(value, {"a": "1"}.get)
    assert str(ei.value) == message


def test_reference_loop_blames_the_lookup_after_the_101st():
    from postwell.config.expand import ExpandError, expand
    table = {"a": "$b", "b": "$a"}
    for start, blamed in (("a", "a"), ("b", "b")):
        with pytest.raises(ExpandError) as ei:
            expand(table[start], table.get)
        assert str(ei.value) == f'unreasonable macro call nesting: "{blamed}"'


def test_composite_tables_unit():
    from postwell.tables import TableError, open_table
    assert open_table("unionmap:{inline:{x=1}, inline:{X=2}}").lookup("X") == "1,2"
    assert open_table("pipemap:{inline:{x=y}, inline:{y=z}}").lookup("x") == "z"
    assert open_table("pipemap:{inline:{x=y}, inline:{q=z}}").lookup("x") is None
    assert open_table("randmap:{a, b}").lookup("any") in ("a", "b")
    with pytest.raises(TableError, match=r'need "unionmap:\{type:name...\}"'):
        open_table("unionmap:{}")


def test_not_utf8_lines_are_skipped(tmp_path):
    from postwell.tables.text import parse_source
    warnings = []
    text = b"m\xfcller ok\nkey value\n".decode("utf-8", "surrogateescape")
    got = list(parse_source(text, "src", warn=warnings.append))
    assert [(k, v) for _, k, v in got] == [("key", "value")]
    assert warnings and "non-UTF-8 input" in warnings[0]
    assert [k for _, k, _ in parse_source(text, "src", utf8=False)] == ["m\udcfcller", "key"]
