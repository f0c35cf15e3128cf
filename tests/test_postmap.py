"""postmap / postalias CLI, and file compatibility with Debian's own
/usr/sbin/postmap and /usr/sbin/postalias in both directions."""

import io
import os
import subprocess
import sys
import time

import pytest

from postwell.cli import postalias, postmap
from postwell.tables import open_table

POSTMAP = "/usr/sbin/postmap"
POSTALIAS = "/usr/sbin/postalias"
needs_postfix = pytest.mark.skipif(
    not (os.access(POSTMAP, os.X_OK) and os.access(POSTALIAS, os.X_OK)),
    reason="Debian postfix not installed")


@pytest.fixture
def cf(tmp_path):
    (tmp_path / "main.cf").write_text("")
    # Postfix pauses ~2 s when main.cf changed in the last seconds: backdate it
    os.utime(tmp_path / "main.cf", (time.time() - 3600,) * 2)
    return tmp_path


def run_ours(prog, args, stdin=""):
    out = io.StringIO()
    err = io.StringIO()
    old = sys.stderr
    sys.stderr = err
    try:
        rc = postmap.run(args, prog, stdin=io.StringIO(stdin), stdout=out)
    finally:
        sys.stderr = old
    return rc, out.getvalue(), err.getvalue()


def run_real(tool, cf, args, stdin=""):
    r = subprocess.run([tool, "-c", str(cf), *args], input=stdin, capture_output=True,
                       text=True, timeout=30)
    return r.returncode, r.stdout, r.stderr


SOURCE = "Foo bar baz\n  cont\nKey2\tv2  \nnoval\nfoo dup\n# c\nuser@Example.COM OK\n"


# --- messages and exit codes ---------------------------------------------------

def test_usage_and_option_errors(cf):
    rc, _, err = run_ours("postmap", ["-c", str(cf)])
    assert rc == 1 and err.startswith("postmap: fatal: usage: postmap [-bfFhimnNoprsuUvw]")
    rc, _, err = run_ours("postmap", ["-c", str(cf), "-q", "a", "-s", "hash:x"])
    assert err == "postmap: fatal: specify only one of -s or -q or -d\n"
    rc, _, err = run_ours("postmap", ["-c", str(cf), "-q", "a", "-d", "b", "hash:x"])
    assert err == "postmap: fatal: specify only one of -s -q or -d\n"


def test_missing_source_and_table(cf):
    rc, _, err = run_ours("postmap", ["-c", str(cf), f"hash:{cf}/nope"])
    assert rc == 1 and err == f"postmap: fatal: open {cf}/nope: No such file or directory\n"
    rc, _, err = run_ours("postmap", ["-c", str(cf), "-q", "a", f"hash:{cf}/nope"])
    assert rc == 1 and err == f"postmap: fatal: open database {cf}/nope.db: No such file or directory\n"
    # Postfix opens the source before it looks at the type: a missing source
    # is reported first, whatever the type
    for typ in ("cidr", "texthash", "unknown"):
        rc, _, err = run_ours("postmap", ["-c", str(cf), f"{typ}:{cf}/x"])
        assert rc == 1 and err == f"postmap: fatal: open {cf}/x: No such file or directory\n"
    (cf / "x").write_text("a b\n")
    rc, _, err = run_ours("postmap", ["-c", str(cf), f"cidr:{cf}/x"])
    assert err == "postmap: fatal: unsupported dictionary type: cidr does not support bulk-mode creation.\n"


def test_missing_main_cf(tmp_path):
    rc, _, err = run_ours("postmap", ["-c", str(tmp_path), "-q", "a", "static:x"])
    assert rc == 1 and err == f"postmap: fatal: open {tmp_path}/main.cf: No such file or directory\n"


# --- build / query / dump / delete / incremental ----------------------------------

@pytest.mark.parametrize("typ", ["hash", "btree", "lmdb"])
def test_build_query_dump(cf, typ):
    src = cf / "m"
    src.write_text(SOURCE)
    rc, _, err = run_ours("postmap", ["-c", str(cf), f"{typ}:{src}"])
    assert rc == 0
    assert "line 4: expected format: key whitespace value" in err
    assert 'duplicate entry: "foo"' in err
    rc, out, _ = run_ours("postmap", ["-c", str(cf), "-q", "FOO", f"{typ}:{src}"])
    assert (rc, out) == (0, "bar baz  cont\n")
    rc, out, _ = run_ours("postmap", ["-c", str(cf), "-q", "nope", f"{typ}:{src}"])
    assert (rc, out) == (1, "")
    rc, out, _ = run_ours("postmap", ["-c", str(cf), "-q", "-", f"{typ}:{src}"],
                          stdin="foo\nzz\nkey2\n")
    assert (rc, out) == (0, "foo\tbar baz  cont\nkey2\tv2\n")
    rc, out, _ = run_ours("postmap", ["-c", str(cf), "-s", f"{typ}:{src}"])
    assert sorted(out.splitlines()) == ["foo\tbar baz  cont", "key2\tv2", "user@example.com\tOK"]


def test_fold_flag(cf):
    src = cf / "m"
    src.write_text("Foo bar\nfoo baz\n")
    assert run_ours("postmap", ["-c", str(cf), "-f", f"hash:{src}"])[0] == 0
    assert run_ours("postmap", ["-c", str(cf), "-f", "-q", "Foo", f"hash:{src}"])[1] == "bar\n"
    assert run_ours("postmap", ["-c", str(cf), "-f", "-q", "foo", f"hash:{src}"])[1] == "baz\n"


def test_replace_and_quiet_duplicates(cf):
    src = cf / "m"
    src.write_text("a one\na two\n")
    rc, _, err = run_ours("postmap", ["-c", str(cf), "-r", f"hash:{src}"])
    assert err == "" and open_table(f"hash:{src}").lookup("a") == "two"
    rc, _, err = run_ours("postmap", ["-c", str(cf), "-w", f"hash:{src}"])
    assert err == "" and open_table(f"hash:{src}").lookup("a") == "one"


def test_delete_and_incremental(cf):
    src = cf / "m"
    src.write_text("a A\nb B\n")
    run_ours("postmap", ["-c", str(cf), f"hash:{src}"])
    assert run_ours("postmap", ["-c", str(cf), "-d", "A", f"hash:{src}"])[0] == 0
    assert run_ours("postmap", ["-c", str(cf), "-d", "a", f"hash:{src}"])[0] == 1
    rc, _, _ = run_ours("postmap", ["-c", str(cf), "-i", f"hash:{src}"], stdin="c C\nD dd\n")
    assert rc == 0
    t = open_table(f"hash:{src}")
    assert dict(t.items()) == {"b": "B", "c": "C", "d": "dd"}
    # -i creates a missing index
    rc, _, _ = run_ours("postmap", ["-c", str(cf), "-i", f"lmdb:{cf}/newi"], stdin="x y\n")
    assert rc == 0 and open_table(f"lmdb:{cf}/newi").lookup("x") == "y"


def test_build_is_atomic_rename(cf):
    """The index is replaced by rename: an open reader keeps its old file and
    no temporary file is left behind."""
    src = cf / "m"
    src.write_text("a one\n")
    run_ours("postmap", ["-c", str(cf), f"hash:{src}"])
    ino1 = os.stat(f"{src}.db").st_ino
    old = open_table(f"hash:{src}")
    src.write_text("a two\n")
    run_ours("postmap", ["-c", str(cf), f"hash:{src}"])
    assert os.stat(f"{src}.db").st_ino != ino1
    assert old.changed()
    assert old.lookup("a") == "two"  # an open table follows the rebuilt file
    assert open_table(f"hash:{src}").lookup("a") == "two"
    assert sorted(os.listdir(cf)) == ["m", "m.db", "main.cf"]


def test_failed_build_keeps_old_index(cf, monkeypatch):
    from postwell.tables import index
    src = cf / "m"
    src.write_text("a one\n")
    run_ours("postmap", ["-c", str(cf), f"hash:{src}"])
    src.write_text("a two\n")

    def boom(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(index.os, "rename", boom)
    rc, _, err = run_ours("postmap", ["-c", str(cf), f"hash:{src}"])
    assert rc == 1 and "No space left on device" in err
    monkeypatch.undo()
    assert open_table(f"hash:{src}").lookup("a") == "one"
    assert sorted(os.listdir(cf)) == ["m", "m.db", "main.cf"]


def test_mode_follows_source(cf):
    src = cf / "m"
    src.write_text("a b\n")
    os.chmod(src, 0o640)
    run_ours("postmap", ["-c", str(cf), f"hash:{src}"])
    assert os.stat(f"{src}.db").st_mode & 0o777 == 0o640


def test_query_pattern_tables(cf):
    rc, out, _ = run_ours("postmap", ["-c", str(cf), "-q", "10.1.2.3", "cidr:{ {10.0.0.0/8 net10} }"])
    assert (rc, out) == (0, "net10\n")
    rc, out, err = run_ours("postmap", ["-c", str(cf), "-q", "x", "fail:x"])
    assert rc == 1 and err == "postmap: fatal: table fail:x: query error: Application error\n"


# --- compatibility with the real postmap/postalias ----------------------------------

@needs_postfix
@pytest.mark.parametrize("typ", ["hash", "btree", "lmdb"])
def test_real_reads_ours(cf, typ):
    src = cf / "m"
    src.write_text(SOURCE)
    assert run_ours("postmap", ["-c", str(cf), f"{typ}:{src}"])[0] == 0
    for key, want in [("foo", "bar baz  cont\n"), ("FOO", "bar baz  cont\n"),
                      ("key2", "v2\n"), ("user@example.com", "OK\n")]:
        rc, out, err = run_real(POSTMAP, cf, ["-q", key, f"{typ}:{src}"])
        assert (rc, out) == (0, want), err
    assert run_real(POSTMAP, cf, ["-q", "nope", f"{typ}:{src}"])[0] == 1
    ours = run_ours("postmap", ["-c", str(cf), "-s", f"{typ}:{src}"])[1]
    real = run_real(POSTMAP, cf, ["-s", f"{typ}:{src}"])[1]
    assert sorted(ours.splitlines()) == sorted(real.splitlines())


@needs_postfix
@pytest.mark.parametrize("typ", ["hash", "btree", "lmdb"])
def test_ours_reads_real(cf, typ):
    src = cf / "m"
    src.write_text(SOURCE)
    rc, _, real_err = run_real(POSTMAP, cf, [f"{typ}:{src}"])
    assert rc == 0
    t = open_table(f"{typ}:{src}")
    assert t.lookup("FOO") == "bar baz  cont"
    assert t.lookup("key2") == "v2"
    assert t.lookup("user@example.com") == "OK"
    t.close()
    # same warnings as the real build, apart from the program name
    _, _, our_err = run_ours("postmap", ["-c", str(cf), f"{typ}:{src}"])
    assert our_err == real_err


@needs_postfix
def test_real_delete_on_our_table(cf):
    src = cf / "m"
    src.write_text("a A\nb B\n")
    run_ours("postmap", ["-c", str(cf), f"hash:{src}"])
    assert run_real(POSTMAP, cf, ["-d", "a", f"hash:{src}"])[0] == 0
    assert open_table(f"hash:{src}").lookup("a") is None
    assert run_real(POSTMAP, cf, ["-q", "b", f"hash:{src}"])[1] == "B\n"


ALIASES = ('# c\npostmaster: root\nRoot:   admin,  other@example.com\n"foo bar": x\n\t, y\n'
           'list: :include:/etc/postfix/list.txt\npipe: "|/usr/bin/prog arg"\nnoval:\n'
           'nocolon value\ndup: a\ndup: b\na3: a . b @ c\na4: , x ,\na8: user@[1.2.3.4] , ( c )\n')


@needs_postfix
@pytest.mark.parametrize("typ", ["hash", "lmdb"])
def test_postalias_compatible(cf, typ):
    ours_src, real_src = cf / "ours", cf / "real"
    ours_src.write_text(ALIASES)
    real_src.write_text(ALIASES)
    rc, _, our_err = run_ours("postalias", ["-c", str(cf), f"{typ}:{ours_src}"])
    assert rc == 0
    rc, _, real_err = run_real(POSTALIAS, cf, [f"{typ}:{real_src}"])
    assert rc == 0
    assert our_err.replace(str(ours_src), "F") == real_err.replace(str(real_src), "F")

    def dump(text):
        return sorted(ln for ln in text.splitlines() if not ln.startswith("YP_"))
    real_dump_of_ours = run_real(POSTALIAS, cf, ["-s", f"{typ}:{ours_src}"])[1]
    real_dump_of_real = run_real(POSTALIAS, cf, ["-s", f"{typ}:{real_src}"])[1]
    assert dump(real_dump_of_ours) == dump(real_dump_of_real)
    our_dump_of_real = run_ours("postalias", ["-c", str(cf), "-s", f"{typ}:{real_src}"])[1]
    assert dump(our_dump_of_real) == dump(real_dump_of_real)
    assert run_real(POSTALIAS, cf, ["-q", "foo bar", f"{typ}:{ours_src}"])[1] == "x, y\n"
    keys = "root\nfoo bar\nzz\nlist\n"
    assert run_ours("postalias", ["-c", str(cf), "-q", "-", f"{typ}:{real_src}"], stdin=keys)[:2] \
        == run_real(POSTALIAS, cf, ["-q", "-", f"{typ}:{real_src}"], stdin=keys)[:2]


def test_postalias_main_and_newaliases(cf):
    from postwell.config import load_config
    from postwell.tables import newaliases_build
    al = cf / "aliases"
    al.write_text("postmaster: root\n")
    assert postalias.main(["-c", str(cf), f"hash:{al}"]) == 0
    assert open_table(f"hash:{al}").lookup("postmaster") == "root"
    (cf / "main.cf").write_text(f"alias_database = hash:{al}, lmdb:{al}, texthash:{al}\n")
    al.write_text("postmaster: admin\n")
    assert newaliases_build(load_config(str(cf), read_master=False)) == 0
    assert open_table(f"hash:{al}").lookup("postmaster") == "admin"
    assert open_table(f"lmdb:{al}").lookup("postmaster") == "admin"
    assert open_table(f"hash:{al}").lookup("@") == "@"


def test_module_entry_point(cf):
    src = cf / "m"
    src.write_text("a b\n")
    r = subprocess.run([sys.executable, "-m", "postwell.cli.postmap", "-c", str(cf), f"hash:{src}"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "postwell.cli.postmap", "-c", str(cf), "-q", "a",
                        f"hash:{src}"], capture_output=True, text=True, timeout=60)
    assert r.stdout == "b\n"


MESSAGE = ("Subject: hello\nX-Multi: a\n b\nContent-Type: multipart/mixed; boundary=\"b\"\n\n"
           "preamble\n--b\nContent-Type: text/plain\n\nbody line\n--b--\nepilogue\n")
HEADER_RE = ("/^Subject: (.*)/ SUBJ $1\n/^X-Multi:/ MULTI\n/^body/ BODY\n/^--b/ BOUND\n"
             "/^Content-Type: text/ CT\n/^epi/ EPI\n")


@needs_postfix
@pytest.mark.parametrize("flags", ["-hq", "-bq", "-hmq", "-bmq", "-bhq", "-bhmq"])
def test_header_body_query_like_real(cf, flags):
    f = cf / "h.re"
    f.write_text(HEADER_RE)
    ours = run_ours("postmap", ["-c", str(cf), flags, "-", f"regexp:{f}"], stdin=MESSAGE)
    real = run_real(POSTMAP, cf, [flags, "-", f"regexp:{f}"], stdin=MESSAGE)
    assert ours[:2] == real[:2]


@needs_postfix
@pytest.mark.parametrize("level", ["0", "3.6"])
def test_utf8_key_folding_like_real(tmp_path, level):
    """ASCII-only folding without SMTPUTF8 (compatibility_level 0), full case
    folding with it, in both our build and the real postmap's."""
    (tmp_path / "main.cf").write_text(f"compatibility_level = {level}\n")
    os.utime(tmp_path / "main.cf", (time.time() - 3600,) * 2)
    ours, real = tmp_path / "ours", tmp_path / "real"
    for f in (ours, real):
        f.write_text("Üml x\nÀB y\n")
    assert run_ours("postmap", ["-c", str(tmp_path), f"hash:{ours}"])[0] == 0
    assert run_real(POSTMAP, tmp_path, [f"hash:{real}"])[0] == 0
    for key in ["Üml", "üml", "ÜML", "àb", "Àb"]:
        want = run_real(POSTMAP, tmp_path, ["-q", key, f"hash:{real}"])[:2]
        assert run_real(POSTMAP, tmp_path, ["-q", key, f"hash:{ours}"])[:2] == want
        assert run_ours("postmap", ["-c", str(tmp_path), "-q", key, f"hash:{real}"])[:2] == want


@needs_postfix
def test_open_table_follows_in_place_rewrite_by_real_postmap(cf):
    """Debian's postmap rewrites hash files in place under an exclusive
    flock; an open table notices (stat under the shared lock) and re-opens."""
    src = cf / "m"
    src.write_text("a one\n")
    assert run_real(POSTMAP, cf, [f"hash:{src}"])[0] == 0
    t = open_table(f"hash:{src}")
    assert t.lookup("a") == "one"
    src.write_text("a two\n" + "".join(f"k{i} v{i}\n" for i in range(500)))
    assert run_real(POSTMAP, cf, [f"hash:{src}"])[0] == 0
    assert t.lookup("a") == "two"
    assert t.lookup("k499") == "v499"
    t.close()


ALIASES_EDGE = 'MAILER-DAEMON: postmaster\n"quote\\"d": a\n"with space"  :  b\nna\\me: c\nuser@dom: d\npipe2: "|/bin/x a, b", other\ninc: :include: /etc/x list\n# comment between\n  cont-after-comment\nsp:   lots    of   spaces\nang: <a@b>, "Name" <c@d>\ngrp: group: a, b;\nsemi: a;b\ntabbed\t: e\nemptyq: ""\npar: (comment only)\ncrlf: x\nat: @\ndot: .\nlong: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa@bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb.com\nbs: \\\\x, "\\\\y"\nesc: a\\,b\nq2: "a@b"@c\ncolon2: a:b:c\nip: user@[IPv6:::1]\ncrlf2: y\r\n'


@needs_postfix
def test_postalias_edge_cases_like_real(cf):
    ours_src, real_src = cf / "ours", cf / "real"
    ours_src.write_text(ALIASES_EDGE)
    real_src.write_text(ALIASES_EDGE)
    our_err = run_ours("postalias", ["-c", str(cf), f"hash:{ours_src}"])[2]
    real_err = run_real(POSTALIAS, cf, [f"hash:{real_src}"])[2]
    assert our_err.replace(str(ours_src), "F") == real_err.replace(str(real_src), "F")

    def dump(path):
        out = run_real(POSTALIAS, cf, ["-s", f"hash:{path}"])[1]
        return sorted(ln for ln in out.splitlines() if not ln.startswith("YP_"))
    assert dump(ours_src) == dump(real_src)


SOURCE_EDGE = 'k1 v1 # not a comment\nk2\tv2\r\nK3 v3\n"quoted key" v\nk4    \n#c\n k5 cont-without-start\nk6 a\n\n  b\n# x\n\tc\nk7 x\r\n  y\r\nk9 \\\nk10 a\\\n  b\n"quoted key" v\n"a b"c v2\n"unterminated v3\n"esc \\" q" v4\n""  v5\nx"y z" v6\n'


@needs_postfix
@pytest.mark.parametrize("typ", ["hash", "lmdb"])
def test_postmap_source_edge_cases_like_real(cf, typ):
    """Quoted keys, CR inside continued lines, '#' inside a value, lines
    that start with white space, unbalanced quotes."""
    ours_src, real_src = cf / "ours", cf / "real"
    ours_src.write_bytes(SOURCE_EDGE.encode())
    real_src.write_bytes(SOURCE_EDGE.encode())
    our_err = run_ours("postmap", ["-c", str(cf), f"{typ}:{ours_src}"])[2]
    real_err = run_real(POSTMAP, cf, [f"{typ}:{real_src}"])[2]
    assert our_err.replace(str(ours_src), "F") == real_err.replace(str(real_src), "F")

    def dump(path):
        return sorted(run_real(POSTMAP, cf, ["-s", f"{typ}:{path}"])[1].split("\n"))
    assert dump(ours_src) == dump(real_src)
    assert run_ours("postmap", ["-c", str(cf), "-q", '"quoted key"', f"{typ}:{real_src}"])[1] == "v\n"


@needs_postfix
def test_files_option_like_real(cf):
    """-F: values name files whose contents are stored base64-encoded."""
    (cf / "f1").write_text("one\n")
    (cf / "f2").write_text("two")
    text = f"k {cf}/f1, {cf}/f2\nk2 {cf}/f1\nk3 {cf}/missing\n"
    ours_src, real_src = cf / "ours", cf / "real"
    ours_src.write_text(text)
    real_src.write_text(text)
    our_err = run_ours("postmap", ["-c", str(cf), "-F", f"hash:{ours_src}"])[2]
    real_err = run_real(POSTMAP, cf, ["-F", f"hash:{real_src}"])[2]
    assert our_err.replace(str(ours_src), "F") == real_err.replace(str(real_src), "F")
    assert run_real(POSTMAP, cf, ["-q", "k", f"hash:{ours_src}"])[1] == "b25lCgp0d28=\n"
    assert run_ours("postmap", ["-c", str(cf), "-Fq", "k", f"hash:{real_src}"])[1] == "one\n\ntwo\n"
    assert sorted(run_ours("postmap", ["-c", str(cf), "-Fs", f"hash:{real_src}"])[1].split("\n")) \
        == sorted(run_real(POSTMAP, cf, ["-Fs", f"hash:{real_src}"])[1].split("\n"))


@needs_postfix
def test_multiline_header_regexp_like_real(cf):
    """The m flag (REG_NEWLINE) on folded headers: '.', '[^x]', '^', '$'."""
    f = cf / "nl.re"
    f.write_text("/^X-A: a[^x] b$/m ml\n/^X-B: a[^x] b$/ nml\n/^X-C: a. b$/m dotml\n"
                 "/^X-D: a. b$/ dot\n/^X-E: a$/m endml\n/^ b$/m begml\n")
    msg = "X-A: a\n b\nX-B: a\n b\nX-C: a\n b\nX-D: a\n b\nX-E: a\n b\n\n"
    ours = run_ours("postmap", ["-c", str(cf), "-hq", "-", f"regexp:{f}"], stdin=msg)
    real = run_real(POSTMAP, cf, ["-hq", "-", f"regexp:{f}"], stdin=msg)
    assert ours[:2] == real[:2]
