"""Lookup tables: every type, plus semantics compared with Debian's real
postmap (skipped when /usr/sbin/postmap is not installed)."""

import os
import subprocess
import time

import pytest

from postwell.tables import (
    TableError, TableLookupError, clear_cache, get_table, open_table, split_spec,
)
from postwell.tables.aliases import normalize_value, parse_aliases

POSTMAP = "/usr/sbin/postmap"
HAVE_POSTMAP = os.path.exists(POSTMAP) and os.access(POSTMAP, os.X_OK)
needs_postfix = pytest.mark.skipif(not HAVE_POSTMAP, reason="Debian postfix not installed")


@pytest.fixture
def cfdir(tmp_path):
    d = tmp_path / "etc"
    d.mkdir()
    (d / "main.cf").write_text("")
    # Postfix pauses ~2 s when main.cf changed in the last seconds: backdate it
    os.utime(d / "main.cf", (time.time() - 3600,) * 2)
    return d


def real_query(cfdir, spec, keys):
    """{key: value} and warnings from the real postmap -q - for keys."""
    r = subprocess.run([POSTMAP, "-c", str(cfdir), "-q", "-", spec],
                       input="\n".join(keys) + "\n", capture_output=True, text=True, timeout=30)
    found = {}
    for line in r.stdout.splitlines():
        k, _, v = line.partition("\t")
        found[k] = v
    warnings = [ln.split("warning: ", 1)[1] for ln in r.stderr.splitlines() if "warning: " in ln]
    return found, warnings


def compare(cfdir, spec, keys):
    ours_w = []
    t = open_table(spec, warn=ours_w.append)
    real, real_w = real_query(cfdir, spec, keys)
    diffs = {k: (t.lookup(k), real.get(k)) for k in keys if t.lookup(k) != real.get(k)}
    return diffs, ours_w, real_w


# --- spec parsing, simple types ------------------------------------------------

def test_split_spec_and_proxy():
    assert split_spec("hash:/etc/postfix/access") == ("hash", "/etc/postfix/access")
    assert split_spec("proxy:hash:/x") == ("hash", "/x")
    with pytest.raises(TableError, match='expecting "type:name" form'):
        split_spec("/etc/aliases")


def test_unsupported_type():
    with pytest.raises(TableError, match="unsupported dictionary type: foo"):
        open_table("foo:bar")


def test_inline():
    t = open_table("inline:{ A=b, { c = d e }, x={ y z } }")
    assert t.lookup("a") == "b"
    assert t.lookup("C") == "d e"
    assert t.lookup("x") == "{ y z }"  # Postfix keeps the braces of a value
    assert t.lookup("nope") is None
    with pytest.raises(TableError, match="missing '=' after attribute name"):
        open_table("inline:{a}")


def test_static():
    assert open_table("static:OK").lookup("anything") == "OK"
    assert open_table("static:{ text with spaces }").lookup("x") == "text with spaces"


def test_fail_and_environ(monkeypatch):
    with pytest.raises(TableLookupError, match="query error"):
        open_table("fail:x").lookup("a")
    monkeypatch.setenv("postwell_test_var", "v")
    assert open_table("environ:x").lookup("POSTWELL_TEST_VAR") == "v"  # folded


def test_unix_tables():
    import pwd
    root = pwd.getpwuid(0)
    t = open_table("unix:passwd.byname")
    assert t.lookup(root.pw_name.upper()).startswith(f"{root.pw_name}:")
    assert t.lookup("no-such-user-xyz") is None
    assert open_table("unix:group.byname").lookup("root").startswith("root:")
    with pytest.raises(TableError, match="unknown table"):
        open_table("unix:foo")


# --- texthash --------------------------------------------------------------------

def test_texthash_format(tmp_path):
    src = tmp_path / "t"
    src.write_text("Foo bar baz\n  cont\n# c\n\nKey2\tv2  \nnoval\nfoo dup\n  lead x\n")
    w = []
    t = open_table(f"texthash:{src}", warn=w.append)
    assert t.lookup("FOO") == "bar baz  cont"
    assert t.lookup("key2") == "v2"
    assert t.lookup("noval") is None
    assert any("expected format: key whitespace value -- ignoring this line" in x for x in w)
    assert any('duplicate entry: "foo"' in x for x in w)


def test_texthash_missing(tmp_path):
    with pytest.raises(TableError, match=r"open database .*/nope: No such file or directory"):
        open_table(f"texthash:{tmp_path}/nope")


# --- cidr ------------------------------------------------------------------------

CIDR = """\
192.168.1.1 OK
192.168.1.0/24 REJECT sub net
10.0.0.1/8 bad
010.1.2.3 octal
1.2.3.0/33 bad2
foo bar
1.1.1.1
[2001:db8::1] v6exact
2001:DB8::/32   V6NET
if 172.16.0.0/12 garbage
172.16.1.1 in-if
endif
if !10.0.0.0/8
if 10.20.0.0/16
10.20.1.1 never
endif
172.20.0.0/16 nested
endif
!8.8.8.8 notgoogle
[1.2.3.0/24] brnet
/8 b
1.2.3.4/ a
[1.2.3.4 d
if 9.9.9.9
"""
CIDR_KEYS = ["192.168.1.1", "192.168.1.5", "8.1.2.3", "10.1.2.3", "2001:db8::1", "2001:0db8::2",
             "[2001:db8::1]", "172.16.1.1", "172.20.1.1", "8.8.8.8", "1.1.1.1", "foo",
             "::ffff:192.168.1.1", "[192.168.1.1]", "192.168.001.001", "2001:db9::1",
             "1.2.3.5", "10.20.1.1", "::1", " 1.1.1.1", ""]


def test_cidr_semantics(tmp_path):
    f = tmp_path / "c.cidr"
    f.write_text(CIDR)
    w = []
    t = open_table(f"cidr:{f}", warn=w.append)
    assert t.lookup("192.168.1.1") == "OK"
    assert t.lookup("192.168.1.7") == "REJECT sub net"
    assert t.lookup("2001:db8::1") == "v6exact"
    assert t.lookup("2001:db8::5") == "V6NET"
    assert t.lookup("172.20.1.1") == "nested"
    assert t.lookup("8.8.8.8") is None
    assert t.lookup("2001:db9::1") is None  # "!8.8.8.8" matches IPv4 keys only
    assert t.lookup("not-an-address") is None
    assert any("non-null host address bits" in x for x in w)
    assert any("IF has no matching ENDIF" in x for x in w)


def test_cidr_inline():
    t = open_table("cidr:{ {192.168.0.0/16 REJECT}, {2001:db8::/32 V6} }")
    assert t.lookup("192.168.3.4") == "REJECT"
    assert t.lookup("2001:db8::9") == "V6"
    with pytest.raises(TableError, match="no '\\{' at start of text"):
        open_table("cidr:{1.2.3.4 a}")


@needs_postfix
def test_cidr_matches_real_postmap(tmp_path, cfdir):
    f = tmp_path / "c.cidr"
    f.write_text(CIDR)
    diffs, ours_w, real_w = compare(cfdir, f"cidr:{f}", CIDR_KEYS)
    assert diffs == {}
    assert ours_w == real_w


# --- regexp / pcre ---------------------------------------------------------------

REGEXP = r"""/^echo-(.*)$/ got $1 ${1}x $(1)y $$ z
/^case-ABC$/ ci
/^CS-abc$/i cs
/^(a|ab)(c|bcd)(d*)$/ longest:$1:$2:$3
/^opt(x)?(y)$/ opt:[$1]:[$2]
/^bre-a\(b\)c$/x bre:$1
/^cls-[[:digit:]]+$/ digits
/^wb-\<foo\>$/ wordb
/^esc-\d\w$/ esc
/^br-[]a]$/ brk
/^bs-[\]+$/ bslash
/^int-a{2}$/ interval
/^back-(a)\1$/ backref
%^pct$% pct
/^d\/e$/ slash
/^foo-(.*)$/ bad $foo
/^brace-(.*)$/ bad ${1
!/^neg-(.*)$/ neg $1
/^flag-(.*)$/q flagq
/unterminated
foo bar
/(a/ x
/[a/ y
/^zero(x)$/ $0
/^two(x)$/ $2
/^nores$/
if /^in-/
/^in-a$/ ina
endif
if /^in-/ junk
endif
if foo
endif
endif
!/@/ nolocal
if /^never/
/x/ y
"""
REGEXP_KEYS = ["echo-Hello", "case-abc", "CS-abc", "cs-abc", "abcd", "optxy", "opty", "bre-abc",
               "bre-a(b)c", "cls-123", "wb-foo", "esc-1a", "esc-da", "br-]", "bs-\\", "int-aa",
               "back-aa", "pct", "d/e", "foo-1", "brace-1", "neg-a", "in-a", "nores", "x@y", "X"]


def test_regexp_semantics(tmp_path):
    f = tmp_path / "r.re"
    f.write_text(REGEXP)
    w = []
    t = open_table(f"regexp:{f}", warn=w.append)
    assert t.lookup("echo-Hello") == "got Hello Hellox Helloy $ z"
    assert t.lookup("CASE-abc") == "ci"
    assert t.lookup("cs-abc") == "nolocal"
    assert t.lookup("opty") == "opt:[]:[y]"
    assert t.lookup("bre-abc") == "bre:b"
    assert t.lookup("esc-da") == "nolocal"  # glibc: escaped lower-case letter + REG_ICASE never matches
    assert t.lookup("nores") == ""
    assert t.lookup("x@y") is None
    assert 'regexp map %s, line 16: non-numeric replacement index "foo"' % f in w
    assert any("$number found in negative match" in x for x in w)


def test_regexp_inline():
    t = open_table("regexp:{ {/^a(.*)$/ got $1}, {!/@/ local} }")
    assert t.lookup("abc") == "got bc"
    assert t.lookup("zz") == "local"
    with pytest.raises(TableError, match="missing '}'"):
        open_table("regexp:{")
    with pytest.raises(TableError, match="no '\\{' at start of text"):
        open_table("regexp:{/a/ b}")


@needs_postfix
def test_regexp_matches_real_postmap(tmp_path, cfdir):
    f = tmp_path / "r.re"
    f.write_text(REGEXP)
    diffs, ours_w, real_w = compare(cfdir, f"regexp:{f}", REGEXP_KEYS)
    assert diffs == {}
    assert ours_w == real_w


PCRE = r"""/^echo-(.*)$/ got $1 ${1}x $$
/^d-\d+$/ digits
/^CASE$/ ci
/^CS$/i cs
/^lazy-(.*?)(b*)$/ lazy:$1:$2
/^ung-(a*)(a*)$/U ung:$1:$2
/^ug2-(a+?)(a*)$/U ug2:$1:$2
/^x - y $/x ext
/^nlD$/E nlD
/^anch/A anch
/^s.x$/s dotall
/^look-(?=a)a(?<!b)$/ look
/^named-(?<n>a+)\k<n>$/ named
/^atomic-(?>a+)b$/ atomic
/^poss-a++b$/ poss
/^K-a\Kb$/ keep
/^opt(x)?(y)$/ opt:[$1]:[$2]
/^u-\x{41}$/ hexu
/^q-\Qa.b\E$/ quote
/^pos-[[:alpha:]]+$/ posix
/^z-a\z/ zlow
/^cond-(a)?(?(1)b|c)$/ cond
/^comm-a(?#comment)b$/ comm
/^mid-a(?-i)b|c$/ mid
/^h-\h$/ hspace
/^g-(a)\g{1}$/ gref
/^zero(x)$/ $0
"""
PCRE_KEYS = ["echo-Hello", "d-12", "case", "CS", "cs", "lazy-abb", "ung-aa", "ug2-aaa", "x-y", "xy",
             "nlD", "anch-x", "xanch", "sax", "look-a", "named-aa", "atomic-aab", "poss-aab",
             "K-ab", "opty", "u-A", "q-a.b", "q-axb", "pos-abc", "z-a", "cond-ab", "cond-c",
             "comm-ab", "mid-aB", "mid-Ab", "mid-c", "MID-C", "h- ", "g-aa", "zerox"]


@needs_postfix
def test_pcre_matches_real_postmap(tmp_path, cfdir):
    f = tmp_path / "p.pcre"
    f.write_text(PCRE)
    diffs, ours_w, real_w = compare(cfdir, f"pcre:{f}", PCRE_KEYS)
    assert diffs == {}
    assert ours_w == real_w


def test_pcre_rejects_recursion(tmp_path):
    f = tmp_path / "p.pcre"
    f.write_text("/^(\\((?:[^()]|(?1))*\\))$/ r\n/^ok$/ fine\n")
    w = []
    t = open_table(f"pcre:{f}", warn=w.append)
    assert t.lookup("ok") == "fine"
    assert any("recursion is not supported" in x for x in w)


# --- hash / btree / lmdb ------------------------------------------------------------

def _build(typ, src, text):
    from postwell.cli.postmap import main
    src.write_text(text)
    (src.parent / "main.cf").exists() or (src.parent / "main.cf").write_text("")
    assert main(["-c", str(src.parent), f"{typ}:{src}"]) == 0


@pytest.mark.parametrize("typ", ["hash", "btree", "lmdb"])
def test_indexed_roundtrip(tmp_path, typ):
    src = tmp_path / "map"
    _build(typ, src, "Foo bar baz\nkey2 v2\n")
    t = open_table(f"{typ}:{src}")
    assert t.lookup("FOO") == "bar baz"
    assert t.lookup("key2") == "v2"
    assert t.lookup("none") is None
    assert sorted(t.items()) == [("foo", "bar baz"), ("key2", "v2")]
    t.close()


@pytest.mark.parametrize("typ,suffix", [("hash", ".db"), ("btree", ".db"), ("lmdb", ".lmdb")])
def test_indexed_missing(tmp_path, typ, suffix):
    with pytest.raises(TableError) as e:
        open_table(f"{typ}:{tmp_path}/nope")
    assert str(e.value) == f"open database {tmp_path}/nope{suffix}: No such file or directory"


def test_hash_wrong_format(tmp_path):
    src = tmp_path / "map"
    _build("btree", src, "a b\n")
    with pytest.raises(TableError, match=r"map\.db: Invalid argument"):
        open_table(f"hash:{src}")


def test_stale_index_warning(tmp_path):
    from postwell.tables.dbfile import HashTable
    src = tmp_path / "map"
    _build("hash", src, "a b\n")
    now = time.time()
    os.utime(f"{src}.db", (now - 600, now - 600))
    os.utime(src, (now - 300, now - 300))
    w = []
    HashTable(f"hash:{src}", str(src), warn=w.append, now=now).close()
    assert w == [f"database {src}.db is older than source file {src}"]
    # an edit in the last 100 seconds is not reported yet (Postfix's grace)
    os.utime(src, (now - 50, now - 50))
    w.clear()
    HashTable(f"hash:{src}", str(src), warn=w.append, now=now).close()
    assert w == []


def test_get_table_reopens_after_rebuild(tmp_path):
    clear_cache()
    src = tmp_path / "map"
    _build("hash", src, "a one\n")
    t1 = get_table(f"hash:{src}")
    assert t1.lookup("a") == "one"
    assert get_table(f"hash:{src}") is t1
    _build("hash", src, "a two\n")
    t2 = get_table(f"hash:{src}")
    # an indexed table follows the rebuilt file itself: same object, new data
    assert t2 is t1 and t2.lookup("a") == "two"
    clear_cache()


def test_get_table_texthash_reopen(tmp_path):
    clear_cache()
    src = tmp_path / "t"
    src.write_text("a one\n")
    assert get_table(f"texthash:{src}").lookup("a") == "one"
    src.write_text("a two, longer\n")
    assert get_table(f"texthash:{src}").lookup("a") == "two, longer"
    clear_cache()


def test_lmdb_grows_map(tmp_path, monkeypatch):
    from postwell.tables import lmdbfile
    monkeypatch.setattr(lmdbfile, "DEFAULT_MAP_SIZE", 64 * 1024)
    src = tmp_path / "big"
    _build("lmdb", src, "".join(f"key{i} {'v' * 200}{i}\n" for i in range(3000)))
    t = open_table(f"lmdb:{src}")
    assert t.lookup("key2999") == "v" * 200 + "2999"
    t.close()


# --- aliases --------------------------------------------------------------------------

def test_parse_aliases():
    w = []
    text = ('# c\npostmaster: root\nRoot:   admin,  other@example.com\n"foo bar": x\n\t, y\n'
            'list: :include:/etc/postfix/list.txt\npipe: "|/usr/bin/prog arg"\nnoval:\n'
            'nocolon value\na3: a . b @ c\na6: /var/mail/file, \\user\n')
    got = {n: v for _, n, v in parse_aliases(text, warn=w.append, path="al")}
    assert got == {
        "postmaster": "root", "root": "admin, other@example.com", "foo bar": "x, y",
        "list": ":include:/etc/postfix/list.txt", "pipe": '"|/usr/bin/prog arg"',
        "a3": "a.b@c", "a6": "/var/mail/file, user",
    }
    assert w == ["al, line 8: need name:value pair", "al, line 9: need name:value pair"]


def test_normalize_value():
    assert normalize_value(" Foo Bar <a@b>,,x") == "Foo Bar <a@b>, , x"
    assert normalize_value("x@ex.com (Real Name)") == "x@ex.com (Real Name)"
    assert normalize_value('"unterminated') == '"unterminated"'


REGEXP2 = '/^r1-[a-c]+$/ r1\n/^r2-[^a-c]+$/ r2\n/^r3-a{2,}$/ r3\n/^r4-a{,2}$/ r4\n/^r5-x{$/ r5\n/^r6-(|a)b$/ r6\n/^r7-()b$/ r7\n/^r8-*a$/ r8\n/^r9-a**$/ r9\n/^r10-a|^r10b$/ r10\n/^r11-[.]$/ r11\n/^r12-[a-]$/ r12\n/^r13-[[:upper:]]$/ r13\n/^r14-[[:space:]]$/ r14\n/r15-$x/ r15\n/^r16-a^b/ r16\n/^r17-\\(x\\)$/ r17\n/^r18-a\\{2\\}$/x r18\n/^r19-a\\{2\\}$/ r19\n/^r20-a+$/x r20\n/^r21-a\\+$/x r21\n/^r22-(a)(b)(c)(d)(e)(f)(g)(h)(i)(j)$/ $10\n/^r23-[\\w]$/ r23\n/^r24-[a\\]]$/ r24\n/^R25-UP$/ r25\n/^r26-.$/ r26\n/^r27-[é]$/ r27\n/^r28-\\.$/i r28\n/^r29-a.c$/m r29\n/^r30-[[.a.]]$/ r30\n/^r31-[[=b=]]$/ r31\n/^r32-\\bx$/ r32\n/^r33-a?$/ r33\n/^r34-a|b$/ r34\n'
REGEXP2_KEYS = ['r1-abc', 'r1-abd', 'r2-def', 'r2-a', 'r3-aaa', 'r3-a', 'r4-', 'r4-aa', 'r4-a{,2}', 'r5-x{', 'r6-b', 'r6-ab', 'r7-b', 'r8-a', 'r8-*a', 'r9-aaa', 'r9-', 'r10-a', 'r10b', 'r11-.', 'r11-x', 'r12--', 'r12-a', 'r13-A', 'r13-a', 'r14-x', 'r15-x', 'r16-a^b', 'r17-x', 'r17-(x)', 'r18-aa', 'r18-a{2}', 'r19-aa', 'r19-a{2}', 'r20-aaa', 'r21-a+', 'r21-aa', 'r22-abcdefghij', 'r23-w', 'r23-\\', 'r23-a', 'r24-]', 'r24-a', 'r25-up', 'r26-é', 'r27-é', 'r28-.', 'r29-abc', 'r30-a', 'r31-b', 'r32-x', 'r33-A', 'r34-x', 'b']


@needs_postfix
@pytest.mark.parametrize("typ", ["regexp", "pcre"])
def test_more_patterns_match_real_postmap(tmp_path, cfdir, typ):
    f = tmp_path / "r2"
    f.write_text(REGEXP2)
    diffs, ours_w, real_w = compare(cfdir, f"{typ}:{f}", REGEXP2_KEYS)
    assert diffs == {}
    if typ == "regexp":
        assert ours_w == real_w


def test_surrogate_for_missing_table(tmp_path):
    clear_cache()
    w = []
    spec = f"hash:{tmp_path}/access"
    t = get_table(spec, warn=w.append, surrogate=True)
    assert w == [f"{spec} is unavailable. open database {tmp_path}/access.db: "
                 f"No such file or directory"]
    with pytest.raises(TableLookupError, match=f'{spec} lookup error for "a@b"'):
        t.lookup("a@b")
    assert get_table(spec, surrogate=True) is t
    # once the index appears, the real table replaces the surrogate
    _build("hash", tmp_path / "access", "a@b OK\n")
    assert get_table(spec, surrogate=True).lookup("a@b") == "OK"
    with pytest.raises(TableError):
        get_table(f"hash:{tmp_path}/other")
    clear_cache()


TEXTHASH = "Foo bar baz\n  cont\nKey2\tv2  \nnoval\nfoo dup\n  # x\n\nuser@Example.COM OK\n  lead x\n"


@needs_postfix
def test_texthash_matches_real_postmap(tmp_path, cfdir):
    f = tmp_path / "th"
    f.write_text(TEXTHASH)
    keys = ["foo", "FOO", "key2", "noval", "user@example.com", "USER@EXAMPLE.COM", "lead"]
    diffs, ours_w, real_w = compare(cfdir, f"texthash:{f}", keys)
    assert diffs == {}
    assert sorted(ours_w) == sorted(set(real_w))


@needs_postfix
@pytest.mark.parametrize("spec", ["inline:{a=b,c=d}", "inline:{ {a = b c}, d=e }", "inline:{a=b=c}",
                                  "inline:{a={b c}}", "inline:{A=1,a=2}", "static:{a b}",
                                  "static:OK", "cidr:{ {10.0.0.0/8 ten}, {!10.0.0.0/8 other} }",
                                  "regexp:{ {/^(a)(.*)$/ $2$1}, {!/x/ nox} }",
                                  "pcre:{ {/^(?<n>a)(.*)$/ $2$1}, {/x/ x} }"])
def test_inline_specs_match_real_postmap(cfdir, spec):
    keys = ["a", "A", "c", "d", "abc", "x", "10.1.2.3", "11.1.1.1"]
    diffs, _, _ = compare(cfdir, spec, keys)
    assert diffs == {}


def test_sqlite_table(tmp_path):
    import sqlite3
    db = tmp_path / "v.sqlite"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE alias (address TEXT, goto TEXT)")
    con.executemany("INSERT INTO alias VALUES (?, ?)", [
        ("a@example.com", "x@dest.org"), ("a@example.com", "y@dest.org"),
        ("it's@example.com", "quoted@dest.org"), ("example.com", "domain-row")])
    con.commit()
    con.close()
    cf = tmp_path / "alias.cf"
    cf.write_text(f"dbpath = {db}\nquery = SELECT goto FROM alias\n  WHERE address = '%s'\n")
    t = open_table(f"sqlite:{cf}")
    assert t.lookup("A@Example.COM") == "x@dest.org,y@dest.org"
    assert t.lookup("it's@example.com") == "quoted@dest.org"   # %s is SQL-quoted
    assert t.lookup("nobody@example.com") is None
    cf.write_text(f"dbpath = {db}\nquery = SELECT goto FROM alias WHERE address = '%u@%d'\n"
                  "result_format = %u+%1\ndomain = example.com\nexpansion_limit = 1\n")
    t = open_table(f"sqlite:{cf}")
    with pytest.raises(TableLookupError, match="Expansion limit exceeded"):
        t.lookup("a@example.com")
    assert t.lookup("it's@example.com") == "quoted+com"
    assert t.lookup("example.com") is None            # not user@domain: no query
    assert t.lookup("a@other.example") is None        # domain not listed
    with pytest.raises(TableError, match="dbpath"):
        cf.write_text("query = SELECT 1\n")
        open_table(f"sqlite:{cf}")


def test_indexed_table_survives_deleted_index(tmp_path):
    src = tmp_path / "map"
    _build("hash", src, "a one\n")
    t = open_table(f"hash:{src}")
    os.unlink(f"{src}.db")
    with pytest.raises(TableLookupError, match="No such file or directory"):
        t.lookup("a")
    _build("hash", src, "a two\n")
    assert t.lookup("a") == "two"


PCRE_HEADER_CHECKS = '/^Subject:.*\\b(viagra|cialis)\\b/ REJECT spam $1\n/^Received: from .*\\[((\\d{1,3}\\.){3}\\d{1,3})\\]/ PREPEND X-Src: $1\n/^From:.*@(?!example\\.com>?$)/ WARN foreign\n/^Content-(Disposition|Type).*name\\s*=\\s*"?(.*(\\.|=2E)(exe|vbs|scr))"?\\s*$/x REJECT att $4\n/(?i)^X-Mailer: .*bulk/ DISCARD\n/^X-Look:\\s+(?<=:\\s)(\\S+)$/ look $1\n/^X-Lb:\\s(?<=a|bc)x/ lb\n/^X-Neg:[[:^alpha:]]+$/ negclass\n/^X-Oct:\\101$/ oct\n/^X-Ctl:\\cA$/ ctl\n/^X-Hex:\\x41\\x{42}$/ hex\n/^X-Uni:\\N{U+41}$/ uni\n/^X-Alt:(?|(a)|(b))$/ reset $1\n/^X-Dollar:a$/ dollar\n'
PCRE_HEADER_KEYS = ["Subject: buy VIAGRA now", "Received: from x ([1.2.3.4])",
                    "Received: from x [10.0.0.1]", "From: a@example.com", "From: a@other.com",
                    'Content-Type: text/plain; name="x.exe"', "Content-Type: text/plain; name=x.scr",
                    "X-Mailer: Bulk mailer", "X-Look: word", "X-Lb: bcx", "X-Lb: ax", "X-Neg:123",
                    "X-Neg:a1", "X-Oct:A", "X-Ctl:\x01", "X-Hex:AB", "X-Dollar:a"]


@needs_postfix
def test_pcre_header_checks_match_real_postmap(tmp_path, cfdir):
    f = tmp_path / "hc.pcre"
    f.write_text(PCRE_HEADER_CHECKS)
    diffs, _, _ = compare(cfdir, f"pcre:{f}", PCRE_HEADER_KEYS)
    assert diffs == {}


LONGEST = "/^x(a|ab)/ got:$1\n/^y(a*)(a|b)*/ y:$1:$2\n/^z(a|ab)(b*)/ z:$1:$2\n/^w(.*)(b|bc)/ w:$1:$2\n"


@needs_postfix
@pytest.mark.skipif(__import__("importlib").util.find_spec("regex") is None,
                    reason="regex module not installed")
def test_regexp_leftmost_longest_captures_like_real(tmp_path, cfdir):
    f = tmp_path / "ll.re"
    f.write_text(LONGEST)
    diffs, _, _ = compare(cfdir, f"regexp:{f}", ["xab", "XAB", "yaab", "zabb", "wabcbc"])
    assert diffs == {}
    assert open_table(f"regexp:{f}").lookup("xab") == "got:ab"


def test_indexed_table_reopens_after_fork(tmp_path):
    src = tmp_path / "map"
    _build("lmdb", src, "a one\n")
    t = open_table(f"lmdb:{src}")
    assert t.lookup("a") == "one"
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: must get its own handles
        try:
            os.write(w, (t.lookup("a") or "none").encode())
        finally:
            os._exit(0)
    os.close(w)
    got = os.read(r, 100).decode()
    os.close(r)
    os.waitpid(pid, 0)
    assert got == "one"
    assert t.lookup("a") == "one"
