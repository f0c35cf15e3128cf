"""postmap(1): build, query, dump and edit Postfix lookup tables.

    postmap [-bfFhimnNoprsuUvw] [-c config_dir] [-d key] [-q key] [map_type:]file...

Messages and exit codes follow Postfix's postmap. The index is always
rebuilt atomically (temporary file + rename), so a daemon never opens a
half-written table. postalias shares this code (``mode="alias"``).
"""

from __future__ import annotations

import base64
import binascii
import getopt
import os
import re
import sys

from postwell.tables import TableError, fold_key, open_table, split_spec, utf8_from_config
from postwell.tables.text import files_base64, parse_source

INDEXED = ("hash", "btree", "lmdb")
USAGE = {
    "postmap": "usage: postmap [-bfFhimnNoprsuUvw] [-c config_dir] [-d key] [-q key] "
               "[map_type:]file...",
    "postalias": "usage: postalias [-Nfinoprsuvw] [-c config_dir] [-d key] [-q key] "
                 "[map_type:]file...",
}
OPTSTRING = {"postmap": "bc:d:fFhimnNopq:rsuUvw", "postalias": "c:d:fiNnopq:rsuvw"}


class Fatal(Exception):
    pass


def printable(text: str, utf8: bool = True) -> str:
    """What Postfix's msg(3) layer prints: every byte that is not printable
    ASCII becomes '?', except well-formed UTF-8 when SMTPUTF8 is on
    (util_utf8_enable follows smtputf8_enable)."""
    out = []
    for ch in text:
        o = ord(ch)
        if 0x20 <= o < 0x7f:
            out.append(ch)
        elif o >= 0x80 and utf8 and not 0xd800 <= o < 0xe000:
            out.append(ch)
        else:
            # a lone surrogate is one undecodable input byte; other
            # characters cost one '?' per byte of their UTF-8 form
            n = 1 if 0xd800 <= o < 0xe000 or o < 0x80 else len(ch.encode("utf-8"))
            out.append("?" * n)
    return "".join(out)


class _Ctx:
    def __init__(self, prog: str):
        self.prog = prog
        self.config = None
        self.fold = True
        self.dup = "warn"
        self.keep_perms = True
        self.nul = True
        self.nul_given = None   # -N/-n: lookups try only that form (Postfix's TRY1NULL/TRY0NULL)
        self.files = False      # -F: values are file names / base64 content
        self.as_owner = True
        self.utf8 = True
        self.no_utf8 = False

    def warn(self, text: str) -> None:
        print(f"{self.prog}: warning: {printable(text, self.utf8)}", file=sys.stderr)

    def default_type(self) -> str:
        if self.config is not None:
            try:
                return self.config.get("default_database_type") or "hash"
            except Exception:
                pass
        return "hash"

    def split(self, arg: str) -> tuple[str, str]:
        if ":" in arg and not arg.startswith("/"):
            try:
                return split_spec(arg)
            except TableError as e:
                raise Fatal(str(e)) from None
        return self.default_type(), arg


def _load_config(config_dir):
    from postwell.config import ConfigError, load_config
    try:
        return load_config(config_dir, read_master=False)
    except ConfigError as e:
        raise Fatal(str(e)) from None


def _open(ctx: _Ctx, typ: str, name: str):
    try:
        t = open_table(f"{typ}:{name}", ctx.config, warn=ctx.warn, fold=ctx.fold,
                       rhs_is_file=ctx.files)
    except TableError as e:
        raise Fatal(str(e)) from None
    if not ctx.fold:
        t.fold = False
    if ctx.nul_given is not None and hasattr(t, "_nul_mode"):
        t._nul_mode = ctx.nul_given     # an indexed table's key form, fixed instead of guessed
    t.utf8 = ctx.utf8
    return t


def _store_class(typ: str):
    from postwell.tables import _class_for
    cls = _class_for(typ, typ)
    return cls.store_class


# Every type Debian's Postfix 3.7 knows (built in or in dynamicmaps.cf), plus
# postwell's own: a known type that cannot be built is worded differently from
# one Postfix has never heard of.
POSTFIX_TYPES = frozenset((
    "btree", "cidr", "environ", "fail", "hash", "inline", "internal", "lmdb", "memcache",
    "nis", "pcre", "pipemap", "proxy", "randmap", "regexp", "socketmap", "static", "tcp",
    "texthash", "unionmap", "unix"))


def _known_type(typ: str) -> bool:
    from postwell.tables import _TYPES
    return typ in POSTFIX_TYPES or typ in _TYPES


def _require_indexed(typ: str, what: str = "bulk-mode creation"):
    if typ not in INDEXED:
        if _known_type(typ):
            raise Fatal(f"unsupported dictionary type: {typ} does not support {what}.")
        if what in ("bulk-mode creation", "incremental mode"):
            # Debian's Postfix points at the plugin package when a map is created.
            raise Fatal(f"unsupported dictionary type: {typ}. Is the postfix-{typ} package installed?")
        raise Fatal(f"unsupported dictionary type: {typ}")


def _require_creatable(typ: str) -> None:
    """The type check of a build, made (as Postfix's mkmap_open) only once the
    source is open: a missing source is reported first, whatever the type."""
    if typ != "fail":
        _require_indexed(typ)


def split_build(ctx: _Ctx, arg: str) -> tuple[str, str]:
    """A build's (and -i's) `type:name` as Postfix's postmap splits it: at the
    first colon, the type kept as typed and its form never checked; without a
    colon the default_database_type."""
    typ, sep, name = arg.partition(":")
    if not sep:
        return ctx.default_type(), arg
    return typ, name


def _read_source(name: str):
    try:
        # a bare descriptor: a directory opens as it does for Postfix (Python's
        # file objects refuse one)
        fd = os.open(name, os.O_RDONLY)
    except OSError as e:
        raise Fatal(f"open {name}: {e.strerror}") from None
    try:
        try:
            st = os.fstat(fd)
        except OSError as e:
            raise Fatal(f"fstat {name}: {e.strerror}") from None
        chunks = []
        while True:
            try:
                chunk = os.read(fd, 1 << 20)
            except OSError:
                # Postfix's line reader takes a read error (a directory's
                # EISDIR) for the end of the input
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(fd)
    return st, b"".join(chunks).decode("utf-8", "surrogateescape")


def _fail_build(ctx: _Ctx, name: str, text: str, where: str, alias: bool) -> None:
    """fail: accepts a build and refuses its first write, as Postfix's
    dict_fail; postalias always writes its "@" marker at the end."""
    if alias:
        from postwell.tables.aliases import parse_aliases
        entries = parse_aliases(text, ctx.warn, where, fold=ctx.fold, utf8=ctx.utf8)
    else:
        entries = parse_source(text, where, ctx.fold, ctx.warn, utf8=ctx.utf8)
    for lineno, key, _value in entries:
        if not alias:
            _alias_format_hint(ctx, key, where, lineno)
        raise Fatal(f"table fail:{name}: write error: Application error")
    if alias:
        raise Fatal(f"table fail:{name}: write error: Application error")


def build(ctx: _Ctx, typ: str, name: str, alias: bool) -> None:
    if typ == "proxy":
        # refused before anything is opened (-i words it as a type error)
        raise Fatal("can't create maps via the proxy service")
    st, text = _read_source(name)
    _require_creatable(typ)
    if typ == "fail":
        _fail_build(ctx, name, text, name, alias)
        return
    if not ctx.keep_perms:
        st = None
    try:
        if alias:
            from postwell.tables.aliases import build_aliases
            build_aliases(typ, name, config=ctx.config, warn=ctx.warn, dup=ctx.dup,
                          text=text, fold=ctx.fold, nul=ctx.nul, keep_perms=ctx.keep_perms,
                          utf8=ctx.utf8, as_owner=ctx.as_owner)
            return
        from postwell.tables.index import Builder
        store = _store_class(typ)
        label = f"lmdb:{name}" if typ == "lmdb" else name + store.suffix
        b = Builder(store, name, src_stat=st, warn=ctx.warn, dup=ctx.dup, label=label,
                    nul=ctx.nul, as_owner=ctx.as_owner)
        try:
            for lineno, key, value in parse_source(text, name, ctx.fold, ctx.warn,
                                                   utf8=ctx.utf8):
                _alias_format_hint(ctx, key, name, lineno)
                if ctx.files:
                    value = _files_base64(ctx, value, f"{name}, line {lineno}")
                    if value is None:
                        continue
                b.put(key, value)
            b.commit()
        except BaseException:
            b.abort()
            raise
    except TableError as e:
        raise Fatal(str(e)) from None


def _alias_markers(ctx: _Ctx, b) -> None:
    """postalias -i writes sendmail's markers as a full build does ("@", and
    the YP_ keys without NUL), replacing earlier ones quietly."""
    import socket
    import time
    host = ctx.config.get("myhostname") if ctx.config is not None else socket.getfqdn()
    for key, value in ((b._k("@"), b._v("@")),
                       (b"YP_LAST_MODIFIED", str(int(time.time())).encode()),
                       (b"YP_MASTER_NAME", host.encode())):
        b.writer.put(key, value)


def _alias_format_hint(ctx: _Ctx, key: str, where: str, lineno: int) -> None:
    # postmap's hint for an aliases(5) file given to postmap by mistake
    if key.endswith(":"):
        ctx.warn(f'{where}, line {lineno}: record is in "key: value" format; '
                 "is this an alias file?")


def _files_base64(ctx: _Ctx, value: str, where: str) -> str | None:
    """postmap -F: the value's files, base64-encoded; None (warned) when one
    cannot be read."""
    encoded, why = files_base64(value)
    if encoded is None:
        ctx.warn(f"{where}: {why}: skipping this entry")
    return encoded


def _show(ctx: _Ctx, value: str) -> str:
    if not ctx.files:
        return value
    try:
        return base64.b64decode(value, validate=True).decode("utf-8", "surrogateescape")
    except (ValueError, binascii.Error):
        return value


def incremental(ctx: _Ctx, typ: str, name: str, alias: bool, stdin) -> None:
    """-i: add entries from stdin to the existing index (created if absent)."""
    _require_creatable(typ)     # Postfix words -i like a build
    if typ == "fail":
        _fail_build(ctx, name, stdin.read(), "stdin", alias)
        return
    from postwell.tables.index import Builder
    store = _store_class(typ)
    path = name + store.suffix
    exists = os.path.exists(path)
    st = None
    try:
        st = os.stat(path) if exists else (os.stat(name) if os.path.exists(name) else None)
    except OSError:
        st = None
    text = stdin.read()
    try:
        b = Builder(store, name, src_stat=st if ctx.keep_perms else None,
                    copy_existing=exists, warn=ctx.warn, dup=ctx.dup, nul=ctx.nul,
                    as_owner=ctx.as_owner,
                    label=f"lmdb:{name}" if typ == "lmdb" else path)
        try:
            if alias:
                from postwell.tables.aliases import parse_aliases
                for _lineno, key, value in parse_aliases(text, ctx.warn, "stdin", fold=ctx.fold,
                                                         utf8=ctx.utf8):
                    b.put(key, value)
                _alias_markers(ctx, b)
            else:
                for lineno, key, value in parse_source(text, "stdin", ctx.fold, ctx.warn,
                                                       utf8=ctx.utf8):
                    _alias_format_hint(ctx, key, "stdin", lineno)
                    if ctx.files:
                        value = _files_base64(ctx, value, f"stdin, line {lineno}")
                        if value is None:
                            continue
                    b.put(key, value)
            b.commit()
        except BaseException:
            b.abort()
            raise
    except TableError as e:
        raise Fatal(str(e)) from None


def delete(ctx: _Ctx, typ: str, name: str, keys: list[str]) -> bool:
    if typ == "fail":
        raise Fatal(f"table fail:{name}: delete error: Application error")
    if typ in ("static", "environ"):
        # these two open read-write and refuse the delete itself
        raise Fatal(f"table {typ}:{name}: delete operation is not supported")
    if typ == "internal":
        return False    # a fresh in-memory table: the key is simply not there
    if typ not in INDEXED and _known_type(typ) and typ != "memcache":
        # the read-only types refuse the read-write open Postfix asks for
        raise Fatal(f"{typ}:{name} map requires O_RDONLY access mode")
    _require_indexed(typ, "delete")
    from postwell.tables.index import Builder
    store = _store_class(typ)
    path = name + store.suffix
    if not os.path.exists(path):
        if typ == "lmdb":
            # Postfix's LMDB open creates the database it is asked to delete from
            b = Builder(store, name, src_stat=None, warn=ctx.warn, as_owner=ctx.as_owner,
                        label=f"lmdb:{name}")
            try:
                b.commit()
            except TableError as e:
                raise Fatal(str(e)) from None
            return False
        raise Fatal(f"open database {path}: No such file or directory")
    found = False
    try:
        st = os.stat(path)
        b = Builder(store, name, src_stat=st, copy_existing=True, warn=ctx.warn)
        try:
            for key in keys:
                k = fold_key(key, ctx.utf8) if ctx.fold else key
                # delete both spellings: with and without the trailing NUL
                hit = b.writer.delete(k.encode("utf-8", "surrogateescape") + b"\0")
                hit = b.writer.delete(k.encode("utf-8", "surrogateescape")) or hit
                found = found or hit
            b.commit()
        except BaseException:
            b.abort()
            raise
    except TableError as e:
        raise Fatal(str(e)) from None
    return found


def _lookup(ctx, table, key):
    try:
        return table.lookup(key)
    except TableError as e:
        msg = str(e)
        m = re.fullmatch(r"error reading [^:]+\.lmdb: (?:mdb_\w+: )?(.*)", msg, re.S)
        if m:
            # Postfix's dict_lmdb words a failed read with the table's name
            raise Fatal(f"error reading {table.spec}: {m.group(1)}") from None
        if not msg.startswith("table "):
            msg = f"table {table.spec}: query error: {msg}"
        raise Fatal(msg) from None


_BOUNDARY = re.compile(r'boundary\s*=\s*(?:"([^"]*)"|([^\s;]+))', re.I)


def message_items(lines, headers: bool, body: bool, mime: bool):
    """What postmap -h/-b/-m query for a message on stdin: logical headers
    (folded lines joined with their newlines, as header_checks sees them)
    and body lines one by one. With -m, the headers of MIME parts count as
    headers; without it they are body lines."""
    state = "header"
    hdr: list[str] = []
    boundaries: list[str] = []
    part_boundary = None

    def flush():
        nonlocal part_boundary
        if not hdr:
            return []
        text = "\n".join(hdr)
        hdr.clear()
        if mime and text[:13].lower() == "content-type:" and "multipart" in text.lower():
            m = _BOUNDARY.search(text)
            if m:
                part_boundary = m.group(1) or m.group(2)
        return [text] if headers else []

    for raw in lines:
        line = raw.rstrip("\n").rstrip("\r")
        if state == "header":
            if line[:1] in (" ", "\t") and hdr:
                hdr.append(line)
                continue
            yield from flush()
            if line == "":
                state = "body"
                if part_boundary:
                    boundaries.append(part_boundary)
                    part_boundary = None
                continue
            hdr.append(line)
            continue
        if mime and line.startswith("--"):
            for i in range(len(boundaries) - 1, -1, -1):
                b = boundaries[i]
                if line == "--" + b + "--":
                    del boundaries[i:]
                    break
                if line == "--" + b:
                    del boundaries[i + 1:]
                    state = "header"
                    break
            if body:
                yield line
            continue
        if body and line:
            yield line
    yield from flush()


def query(ctx: _Ctx, specs, key: str, stdin, stdout, msg=None, sep="\t") -> int:
    # Like Postfix, a table is opened only when a lookup first reaches it:
    # a key found in an earlier table never trips over a later, broken one
    tables: list = [None] * len(specs)

    def search(k):
        for i, s in enumerate(specs):
            if tables[i] is None:
                tables[i] = _open(ctx, *ctx.split(s))
            v = _lookup(ctx, tables[i], k)
            if v is not None:
                return v
        return None

    try:
        if key == "-" and msg is not None:
            found = False
            for item in message_items(stdin, *msg):
                v = search(item)
                if v is not None:
                    stdout.write(f"{item}\t{v}\n")
                    found = True
            return 0 if found else 1
        if key != "-":
            v = search(key)
            if v is not None:
                stdout.write(_show(ctx, v) + "\n")
                return 0
            return 1
        found = False
        for line in stdin:
            # an empty line is a key too (postmap's vstring_get_nonl)
            k = line[:-1] if line.endswith("\n") else line
            v = search(k)
            if v is not None:
                stdout.write(f"{k}{sep}{_show(ctx, v)}\n")
                found = True
        return 0 if found else 1
    finally:
        for t in tables:
            if t is not None:
                t.close()


def dump(ctx: _Ctx, specs, stdout, alias: bool) -> int:
    for s in specs:
        t = _open(ctx, *ctx.split(s))
        try:
            sep = ":\t" if alias else "\t"
            for k, v in t.items():
                stdout.write(f"{k}{sep}{_show(ctx, v)}\n")
        except TableError as e:
            msg = str(e)
            raise Fatal(msg if msg.startswith("table ") else f"table {t.spec}: {msg}") from None
        finally:
            t.close()
    return 0


def run(argv, prog: str, stdin=None, stdout=None) -> int:
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    ctx = _Ctx(prog)
    alias = prog == "postalias"
    try:
        try:
            opts, args = getopt.getopt(argv, OPTSTRING[prog])
        except getopt.GetoptError as e:
            # glibc getopt's words
            what = "option requires an argument" if "requires argument" in e.msg else "invalid option"
            print(f"{prog}: {what} -- '{e.opt}'", file=sys.stderr)
            raise Fatal(USAGE[prog]) from None
        config_dir = None
        mode = None
        qkey = None
        dkeys: list[str] = []
        incr = False
        hflag = bflag = mflag = False
        for o, a in opts:
            if o == "-c":
                config_dir = a
            elif o == "-d":
                if mode not in (None, "d"):
                    raise Fatal("specify only one of -s -q or -d")
                mode = "d"
                dkeys.append(a)
            elif o == "-q":
                if mode is not None:
                    raise Fatal("specify only one of -s -q or -d")
                mode, qkey = "q", a
            elif o == "-s":
                if mode is not None:
                    raise Fatal("specify only one of -s or -q or -d")
                mode = "s"
            elif o == "-f":
                ctx.fold = False
            elif o == "-i":
                incr = True
            elif o == "-r":
                ctx.dup = "replace"
            elif o == "-w":
                ctx.dup = "ignore"
            elif o == "-p":
                ctx.keep_perms = False
            elif o == "-h":
                hflag = True
            elif o == "-b":
                bflag = True
            elif o == "-m":
                mflag = True
            elif o == "-F":
                ctx.files = True
            elif o == "-o":
                ctx.as_owner = False
            elif o == "-u":
                ctx.no_utf8 = True
            elif o == "-N":
                ctx.nul = ctx.nul_given = True
            elif o == "-n":
                ctx.nul = ctx.nul_given = False
            # -U, -v:
            # accepted and ignored. Lookups try "key\0" and "key" both.
        if not args and mode != "s":
            raise Fatal(USAGE[prog])
        ctx.config = _load_config(config_dir)
        ctx.utf8 = utf8_from_config(ctx.config) and not ctx.no_utf8
        if (hflag or bflag or mflag) and qkey != "-":
            raise Fatal('specify -b -h or -m only with "-q -"')
        if mflag and not (hflag or bflag):
            print(f"{prog}: warning: ignoring -m option without -b or -h", file=sys.stderr)
        if mode == "q":
            msg = (hflag, bflag, mflag) if (hflag or bflag) else None
            return query(ctx, args, qkey, stdin, stdout, msg, ":\t" if alias else "\t")
        if mode == "s":
            # Postfix lists the first table only; with none it just fails
            return dump(ctx, args[:1], stdout, alias) if args else 1
        if mode == "d":
            keys = dkeys
            if dkeys == ["-"]:
                keys = [ln.rstrip("\n") for ln in stdin if ln.strip()]
            found = False
            for a in args:
                typ, name = ctx.split(a)
                found = delete(ctx, typ, name, keys) or found
            return 0 if found else 1
        for a in args:
            typ, name = split_build(ctx, a)
            if incr:
                incremental(ctx, typ, name, alias, stdin)
            else:
                build(ctx, typ, name, alias)
        return 0
    except Fatal as e:
        print(f"{prog}: fatal: {printable(str(e), ctx.utf8)}", file=sys.stderr)
        return 1


def main(argv=None) -> int:
    return run(sys.argv[1:] if argv is None else list(argv), "postmap")


if __name__ == "__main__":
    sys.exit(main())
