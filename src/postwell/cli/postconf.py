"""postconf: show and edit main.cf / master.cf, as Postfix's postconf(1) does.

Supported: [-a] [-A] [-b [file]] [-c dir] [-d] [-e] [-f] [-F] [-h] [-H] [-l] [-m] [-M] [-n]
[-o name=value] [-p] [-P] [-t [file]] [-x] [-X] [-#] [-v] [name ...] and `postconf name=value` (implies -e).
Output matches Postfix: `name = value` with white space runs shown as one
space, sorted by name; warnings on stderr as `postconf: warning: ...`.
Exit status 0, or 1 after a fatal error (usage, unreadable or broken file).
"""

from __future__ import annotations

import getopt
import os
import sys

from postwell.config import registry
from postwell.config.defaults import DEFAULTS
from postwell.config.postfix_defaults import POSTFIX_DEFAULTS
from postwell.config.main import (RAW_PARAMETERS, Config, ConfigError, config_dir_from_env,
                                  iter_logical_lines, load_config, split_name_value)
from postwell.config.master import (MasterService, parse_master_cf, parse_master_line,
                                    read_master_text, split_nameval, unbrace)

PROG = "postconf"
LINE_LIMIT = 80
MASTER_COLUMNS = (0, 11, 17, 25, 33, 41, 49, 57)

# Postfix 3.7's usage line, word for word.
USAGE = ("usage: postconf [-a (server SASL types)] [-A (client SASL types)] [-b (bounce templates)] "
         "[-c config_dir] [-c param_class] [-d (parameter defaults)] [-e (edit configuration)] "
         "[-f (fold lines)] [-F (master.cf fields)] [-h (no names)] [-H (no values)] "
         "[-l (lock types)] [-m (map types)] [-M (master.cf)] [-n (non-default parameters)] "
         "[-o name=value (override parameter value)] [-p (main.cf, default)] "
         "[-P (master.cf parameters)] [-t (bounce templates)] "
         "[-T compile-version|run-version|public-key-algorithms] [-v (verbose)] "
         "[-x (expand parameter values)] [-X (exclude)] [-# (comment-out)] [name...]")
# The SASL back ends postwell has (smtpd_sasl_type; smtp_sasl_type).
SERVER_SASL_TYPES = ("cyrus", "dovecot")
CLIENT_SASL_TYPES = ("cyrus",)


class Fatal(Exception):
    pass


class _Out:
    def __init__(self, out, err):
        self.out, self.err = out, err

    def line(self, text: str) -> None:
        self.out.write(text + "\n")

    def warn(self, text: str) -> None:
        self.err.write(f"{PROG}: warning: {text}\n")


def _words(value: str) -> list[str]:
    return value.split()


def format_param(name: str | None, value: str | None, fold: bool = False) -> str:
    """`name = value` with white space collapsed; folded at 80 columns with -f."""
    words = _words(value) if value is not None else []
    if name is None:
        head, parts = "", words
    elif value is None:
        return name
    else:
        head, parts = f"{name} =", words
    if not fold:
        if not head:
            return " ".join(parts)
        return head + ("" if not parts else " " + " ".join(parts))
    lines, cur = [], head
    for w in parts:
        if not cur:
            cur = w
        elif len(cur) + 1 + len(w) > LINE_LIMIT and cur.strip():
            lines.append(cur)
            cur = "    " + w
        else:
            cur = cur + " " + w
    lines.append(cur)
    return "\n".join(lines)


# ---- reading the configuration -----------------------------------------------

def load(config_dir: str | None, *, defaults_only: bool = False) -> Config:
    """main.cf and master.cf as postconf reads them.  master.cf is parsed
    leniently (a malformed `-o` only breaks that service's daemon, as in
    Postfix); with defaults_only main.cf is not read at all: Postfix's
    `postconf -d` shows built-in defaults even when main.cf is missing or
    broken, and ignores main.cf's config_directory."""
    if defaults_only:
        directory = config_dir_from_env(config_dir)
        cfg = Config(directory, {}, {}, [], os.path.join(directory, "main.cf"))
    else:
        cfg = load_config(config_dir, read_master=False)
    text = read_master_text(cfg)
    if text is not None:
        cfg.services[:] = parse_master_cf(text, os.path.join(cfg.config_dir, "master.cf"),
                                          cfg.warnings.append, strict=False)
    return cfg


# ---- main.cf parameters ---------------------------------------------------

def _all_names(cfg: Config, defaults_only: bool) -> list[str]:
    per_service = set(registry.service_parameters(cfg.services))
    # Per-transport names other parts put in DEFAULTS as a fallback are shown
    # only when master.cf has that transport, as Postfix shows them.
    legacy = registry.legacy_parameters()
    names = {n for n in DEFAULTS
             if n in POSTFIX_DEFAULTS
             or not (registry.looks_per_service(n) or n in legacy)} | per_service
    if not defaults_only:
        names |= registry.user_defined_parameters(cfg)
    return sorted(names)


def _warn_undefined(cfg: Config, out: _Out) -> None:
    master_path = os.path.join(cfg.config_dir, "master.cf")
    # Values of raw parameters hold per-use macros ($home, $recipient...).
    sources = [(cfg.main_cf_path, v) for n, v in cfg.params.items() if n not in RAW_PARAMETERS]
    sources += [(master_path, v) for svc in cfg.services or ()
                for n, v in svc.overrides.items() if n not in RAW_PARAMETERS]
    legacy = registry.legacy_parameters()
    seen: set[tuple[str, str]] = set()
    for path, value in sources:
        syntax = macro_syntax_error(value)
        if syntax:
            # Postfix's scan of every value reports a malformed reference
            # without the file's name (mac_parse) and leaves the value there
            out.warn(syntax)
            continue
        for ref in sorted(registry.referenced_names(value)):
            if (path, ref) in seen or ref in cfg.params or ref in legacy \
                    or ref in DEFAULTS or cfg.default(ref) is not None:
                continue
            seen.add((path, ref))
            out.warn(f"{path}: undefined parameter: {ref}")


def macro_syntax_error(value: str) -> str | None:
    """Postfix's words for a malformed $name reference in value, or None."""
    if "$" not in value:
        return None
    from postwell.config.expand import ExpandError, expand
    try:
        # every name known, as "0" (a valid number and compatibility level):
        # only the text's own shape can fail
        expand(value, lambda _name: "0")
    except ExpandError as exc:
        msg = str(exc)
        return msg if is_macro_error(msg) else None
    return None


_MACRO_ERRORS = ("unreasonable macro call nesting: ", "truncated macro reference: ",
                 "empty macro name: ", "unknown operator in macro reference: ",
                 '"==" or "!="', '"?" or ":" expected at: ', '":" expected at: ',
                 'unexpected input at: ', '"{expression}" expected at: ',
                 "bad operator suffix at: ")


def is_macro_error(msg: str) -> bool:
    return msg.startswith(_MACRO_ERRORS)


def _warn_unused(cfg: Config, out: _Out, main_cf: bool = True) -> None:
    if main_cf:
        for name, value in registry.unused_parameters(cfg):
            out.warn(registry.unused_parameter_warning(cfg.main_cf_path, name, value))
    master_path = os.path.join(cfg.config_dir, "master.cf")
    for name, value in registry.unused_master_parameters(cfg):
        out.warn(registry.unused_parameter_warning(master_path, name, value))


def show_params(cfg: Config, names: list[str], opts: dict, out: _Out) -> None:
    defaults_only, nondefault = "-d" in opts, "-n" in opts
    known_user = registry.user_defined_parameters(cfg)

    legacy = registry.legacy_parameters()

    def known(name: str) -> bool:
        # A name in DEFAULTS always has a default: asking cfg.default() would
        # compute a machine-dependent one (an interface scan for mynetworks)
        # only to test it against None.
        if name in DEFAULTS:
            return True
        if defaults_only:
            return cfg.default(name) is not None
        return cfg.default(name) is not None or name in known_user or name in legacy

    def value_of(name: str) -> str:
        raw = cfg.default(name) if defaults_only else cfg.raw(name)
        raw = raw or ""
        if "-x" in opts and name not in RAW_PARAMETERS:
            base = Config(cfg.config_dir, {}, {}, cfg.services) if defaults_only else cfg
            raw = base.expand(raw)
        return raw

    if names:
        selected = []
        for name in names:
            if not known(name):
                out.warn(f"{name}: unknown parameter")
                continue
            if nondefault and not cfg.is_set(name):
                continue
            selected.append(name)
    elif nondefault:
        selected = sorted(n for n in cfg.params if known(n))
    else:
        selected = _all_names(cfg, defaults_only)
    classes = opts.get("-C")
    if classes is not None and not names:
        # -C picks from the listing only; named parameters are always shown
        wanted = parameter_classes(classes)
        if "all" not in wanted:
            per_service = set(registry.service_parameters(cfg.services))
            user = known_user - per_service

            def class_of(name: str) -> str:
                if name in per_service:
                    return "service"
                if name in user and name not in DEFAULTS and name not in legacy:
                    return "user"
                return "builtin"
            selected = [n for n in selected if class_of(n) in wanted]
    fold = "-f" in opts
    for name in selected:
        if "-H" in opts:
            out.line(name)
        elif "-h" in opts:
            out.line(format_param(None, value_of(name), fold))
        else:
            out.line(format_param(name, value_of(name), fold))


PARAMETER_CLASSES = ("builtin", "service", "user", "all")


def parameter_classes(text: str) -> set[str]:
    """-C's class list (Postfix splits it at blanks and commas)."""
    import re
    wanted = set()
    for word in re.split(r"[ \t\r\n,]+", text):
        if not word:
            continue
        if word not in PARAMETER_CLASSES:
            raise Fatal(f'unknown -C option value "{word}" in "{text}"')
        wanted.add(word)
    return wanted


# ---- editing main.cf ------------------------------------------------------

def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            return f.read()
    except FileNotFoundError:
        raise Fatal(f"open {path}: No such file or directory") from None
    except PermissionError:
        raise Fatal(f"open {path}: Permission denied") from None


def atomic_write(path: str, text: str) -> None:
    """Write beside the file, fsync, then rename over it (keeps the file's mode)."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        st = os.stat(path)
        mode, owner = st.st_mode & 0o7777, (st.st_uid, st.st_gid)
    except FileNotFoundError:
        mode, owner = 0o644, None
    import tempfile
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", errors="surrogateescape") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        if owner is not None and owner != (os.geteuid(), os.getegid()):
            try:
                os.chown(tmp, *owner)
            except PermissionError:
                pass          # not root: the file becomes ours, as with Postfix
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def _logical_spans(text: str, path: str):
    """(first_index, last_index, line) for each logical line, 0-based physical lines."""
    for first, last, line in iter_logical_lines(text, path):
        yield first - 1, last - 1, line


def edit_main_cf(path: str, edits: dict[str, str | None], mode: str, out: _Out) -> None:
    """mode 'e': set (append when absent); 'X': remove; '#': comment out."""
    text = _read(path)
    lines = text.split("\n")
    trailing_newline = text.endswith("\n")
    if trailing_newline or not text:
        lines = lines[:-1]
    found: dict[str, int] = {}
    replaced: set[int] = set()
    result: list[str | None] = list(lines)
    for first, last, line in _logical_spans(text, path):
        try:
            name, _ = split_name_value(line, path, first + 1)
        except ConfigError:
            continue
        if name not in edits:
            continue
        found[name] = found.get(name, 0) + 1
        if found[name] == 2:
            out.warn(f'{path}: multiple entries for "{name}"')
        for k in range(first, last + 1):
            is_comment = not lines[k].strip() or lines[k].lstrip().startswith("#")
            if is_comment:
                continue          # comments inside a definition stay as they are
            if mode == "#":
                result[k] = "#" + lines[k]
            elif mode == "e" and k == first:
                result[k] = f"{name} = {edits[name]}"
                replaced.add(k)
            else:
                result[k] = None
    # Every line keeps its newline; an unterminated last line stays so
    # unless something is appended after it.
    kept = [(k, x) for k, x in enumerate(result) if x is not None]
    appended = [f"{n} = {v}" for n, v in edits.items() if mode == "e" and n not in found]
    pieces = [x + "\n" for _, x in kept] + [x + "\n" for x in appended]
    last_verbatim = kept and kept[-1][0] not in replaced
    if (kept and last_verbatim and not appended and not trailing_newline and text
            and kept[-1][0] == len(lines) - 1):
        pieces[-1] = pieces[-1][:-1]
    body = "".join(pieces)
    atomic_write(path, body)


def _parse_assignments(args: list[str], out: _Out | None = None) -> dict[str, str]:
    edits: dict[str, str] = {}
    for arg in args:
        if arg.lstrip().startswith("#"):
            raise Fatal("-e, -X, or -# accepts no comment input")
        try:
            name, value = split_name_value(arg, "", 0)
        except ConfigError as e:
            # Postfix quotes the argument from its first non-blank, trailing blanks included
            why, sep, _quoted = e.msg.partition(': "')
            raise Fatal(f'{why}: "{arg.lstrip()}"' if sep else e.msg) from None
        if name in edits and out is not None:
            out.warn(f"ignoring earlier request: '{name} = {edits[name]}'")
        edits[name] = value
    return edits


# ---- master.cf ------------------------------------------------------------

def format_master(svc: MasterService, fold: bool = False) -> str:
    line = ""
    for i, text in enumerate(svc.fields):
        col = MASTER_COLUMNS[i]
        if i and len(line) + 1 > col:
            line += " "
        else:
            line += " " * (col - len(line))
        line += text
    args = _master_args(svc)
    if not fold:
        return " ".join([line] + args) if args else line
    return _fold_args(line, args)


def _fold_args(line: str, args: list[str]) -> str:
    """Postfix starts a new line before each leading -o and after each -o
    pair; everything else wraps before column 80."""
    lines, cur = [], line
    in_options, after_pair = True, False
    k = 0
    while k < len(args):
        word = args[k]
        if in_options and word == "-o" and k + 1 < len(args):
            lines.append(cur)
            cur = "    -o " + args[k + 1]
            after_pair = True
            k += 2
            continue
        if in_options and not word.startswith("-"):
            in_options = False
        # Postfix measures a {braced} word without its braces.
        width = len(word) - 2 if word.startswith("{") and word.endswith("}") else len(word)
        if after_pair or len(cur) + 1 + width >= LINE_LIMIT:
            lines.append(cur)
            cur = "    " + word
        else:
            cur += " " + word
        after_pair = False
        k += 1
    lines.append(cur)
    return "\n".join(lines)


def _master_args(svc: MasterService) -> list[str]:
    """Arguments as postconf prints them.  Leading options are normalized
    (-o name=value, braced again only if it holds white space); the first
    non-option word loses its braces; later braced words are trimmed inside
    and keep their braces only when they hold white space."""
    argv = svc.argv
    out: list[str] = []
    in_options = True
    k = 0
    while k < len(argv):
        word = argv[k]
        if in_options:
            if word == "-o" and k + 1 < len(argv):
                pair = unbrace(argv[k + 1])
                try:
                    name, value = split_nameval(pair)
                    text = f"{name}={value}"
                except ValueError:
                    text = pair         # shown as written: Postfix does not use it
                out += ["-o", "{" + text + "}" if _has_space(text) else text]
                k += 2
                continue
            plain = unbrace(word)
            out.append(plain)
            if not plain.startswith("-"):
                in_options = False
        else:
            inner = unbrace(word)
            out.append("{" + inner + "}" if word.startswith("{") and _has_space(inner) else inner)
        k += 1
    return out


def _has_space(text: str) -> bool:
    return any(c.isspace() for c in text)


def _master_entries(config_dir: str, expand_with: Config | None = None):
    """(path, text, [(first, last, MasterService)]); with expand_with, the
    leading -o values are $-expanded for that service (postconf -x)."""
    path = os.path.join(config_dir, "master.cf")
    text = _read(path)
    entries = []
    for first, last, line in iter_logical_lines(text, path):
        svc = parse_master_line(line, path, first, strict=False)
        if expand_with is not None:
            svc = _expand_service(svc, expand_with)
        entries.append((first - 1, last - 1, svc))
    return path, text, entries


def _expand_service(svc: MasterService, cfg: Config) -> MasterService:
    import dataclasses
    scfg = cfg.override({"service_name": svc.name, **svc.overrides})
    argv, k = list(svc.argv), 0
    while k < len(argv) and argv[k].startswith("-"):
        if argv[k] == "-o" and k + 1 < len(argv):
            try:
                name, value = split_nameval(unbrace(argv[k + 1]))
            except ValueError:
                k += 2          # left as written, as Postfix does
                continue
            if name not in RAW_PARAMETERS:
                value = scfg.expand(value)
            argv[k + 1] = "{" + f"{name}={value}" + "}"
            k += 2
        else:
            k += 1
    overrides = {n: (v if n in RAW_PARAMETERS else scfg.expand(v))
                 for n, v in svc.overrides.items()}
    return dataclasses.replace(svc, argv=argv, overrides=overrides)


def service_pattern(text: str, fewest: int, most: int) -> list[str] | None:
    """A master.cf request "name[/type[/field]]" split as Postfix splits it
    (empty parts vanish, so "relay//" is "relay"); a part that is "*" matches
    anything, a "*" inside a word is refused (None), as is a leading "/".
    Missing trailing parts are wild cards."""
    if text.startswith("/"):
        return None
    parts = [p for p in text.split("/") if p]
    if not fewest <= len(parts) <= most:
        return None
    if any("*" in p and p != "*" for p in parts):
        return None
    return parts + ["*"] * (most - len(parts))


def _hits(pattern: str, value: str) -> bool:
    return pattern == "*" or pattern == value


def _service_hits(pattern: list[str], svc: MasterService) -> bool:
    return _hits(pattern[0], svc.name) and _hits(pattern[1], svc.type)


def _select(items, requests, matches, out: _Out):
    """Postfix's order: master.cf order outside, requests inside (so a request
    given twice prints twice); a request that matches nothing is warned about."""
    if not requests:
        return list(items)
    hit = [False] * len(requests)
    chosen = []
    for item in items:
        for i, req in enumerate(requests):
            if matches(item, req):
                hit[i] = True
                chosen.append(item)
    for i, (text, _) in enumerate(requests):
        if not hit[i]:
            out.warn(f'unmatched request: "{text}"')
    return chosen


def master_requests(flag: str, names: list[str]) -> list[tuple[str, list[str]]]:
    """-M, -F and -P requests parsed (fatal on the first bad one, in order)."""
    shape, most = {"-M": ("service_name[/type]", 2),
                   "-F": ("service_name[/type[/field]]", 3),
                   "-P": ("service_name[/type[/parameter]]", 3)}[flag]
    out = []
    for text in names:
        pattern = service_pattern(text, 1, most)
        if pattern is None:
            raise Fatal(f"{flag} option requires {shape}")
        if flag == "-F" and pattern[2] != "*" and pattern[2] not in MASTER_FIELD_NAMES:
            raise Fatal(f'invalid service attribute name: "{pattern[2]}"')
        out.append((text, pattern))
    return out


def show_master(config_dir: str, requests: list[str], opts: dict, out: _Out,
                cfg: Config | None = None) -> None:
    reqs = master_requests("-M", requests)
    _, _, entries = _master_entries(config_dir, cfg if "-x" in opts else None)
    fold = "-f" in opts
    for svc in _select([e[2] for e in entries], reqs,
                       lambda svc, req: _service_hits(req[1], svc), out):
        out.line(format_master(svc, fold))


MASTER_FIELD_NAMES = ("service", "type", "private", "unprivileged", "chroot", "wakeup",
                      "process_limit", "command")


def _print_rows(rows, opts: dict, out: _Out) -> None:
    for row in rows:
        key, value = row[0], row[1]
        args = row[2] if len(row) > 2 else None
        if "-H" in opts:
            out.line(key)
        elif args is not None and "-f" in opts:
            # the command field folds as master.cf's own -o options do
            out.line(_fold_args(value if "-h" in opts else f"{key} = {value}", args))
        elif args is not None:
            # the command field is printed as written, blanks inside braces kept
            command = " ".join([value] + args)
            out.line(command if "-h" in opts else f"{key} = {command}")
        elif "-h" in opts:
            out.line(format_param(None, value))
        else:
            out.line(format_param(key, value))


def _select_grouped(groups, requests, out: _Out):
    """Rows of master.cf entries in Postfix's order: entries outside, then the
    requests, then each entry's rows (a request given twice prints twice).
    A group is (service, rows); a row's last name part is what the request's
    third part picks, "*" taking every row."""
    if not requests:
        return [row for _, rows in groups for row in rows]
    hit = [False] * len(requests)
    chosen = []
    for svc, rows in groups:
        for i, (_, pattern) in enumerate(requests):
            if not _service_hits(pattern, svc):
                continue
            picked = [row for row in rows if _hits(pattern[2], row[0].rsplit("/", 1)[1])]
            if picked:
                hit[i] = True
                chosen.extend(picked)
    for i, (text, _) in enumerate(requests):
        if not hit[i]:
            out.warn(f'unmatched request: "{text}"')
    return chosen


def show_master_params(config_dir: str, requests: list[str], opts: dict, out: _Out,
                       cfg: Config | None = None) -> None:
    reqs = master_requests("-P", requests)
    _, _, entries = _master_entries(config_dir, cfg if "-x" in opts else None)
    groups = [(svc, [(f"{svc.name}/{svc.type}/{name}", value)
                     for name, value in sorted(svc.overrides.items())])
              for _, _, svc in entries]
    _print_rows(_select_grouped(groups, reqs, out), opts, out)


def show_master_fields(config_dir: str, requests: list[str], opts: dict, out: _Out,
                       cfg: Config | None = None) -> None:
    reqs = master_requests("-F", requests)
    _, _, entries = _master_entries(config_dir, cfg if "-x" in opts else None)
    groups = []
    for _, _, svc in entries:
        key = f"{svc.name}/{svc.type}"
        rows = [(f"{key}/{name}", value) for name, value in zip(MASTER_FIELD_NAMES, svc.fields[:7])]
        rows.append((f"{key}/command", svc.command, _master_args(svc)))
        groups.append((svc, rows))
    _print_rows(_select_grouped(groups, reqs, out), opts, out)


_EDIT_OPTS = "-Me, -Fe, -Pe, -X, or -#"


def master_edit_requests(kind: str, args: list[str], mode: str) -> list[tuple[str, list[str], str | None]]:
    """-M/-F/-P edit arguments as (raw text, pattern, value), checked in
    Postfix's order before anything is edited (kind is "M", "F" or "P",
    mode "e", "X" or "#")."""
    requests = []
    for raw in args:
        if "\n" in raw:
            raise Fatal(f"{_EDIT_OPTS} accept no multi-line input")
        text = raw.lstrip()
        if text.startswith("#"):
            raise Fatal(f"{_EDIT_OPTS} accept no comment input")
        value = None
        if mode == "e":
            try:
                text, value = split_nameval(text)
            except ValueError as exc:
                raise Fatal(f'{exc}: "{raw}"') from None
        elif "=" in text:
            raise Fatal("-X or -# requires names without value")
        # (Postfix's trimblanks() here finds the end but cuts nothing: trailing
        # blanks stay part of the type, which then matches no entry)
        if kind == "M":
            pattern = service_pattern(text, 2, 2)
            if pattern is None:
                raise Fatal("-Me, -MX or -M# requires service_name/type")
        elif kind == "F":
            pattern = service_pattern(text, 3, 3)
            if pattern is None:
                raise Fatal("-Fe or -FX requires service_name/type/field_name")
            if pattern[2] != "*" and pattern[2] not in MASTER_FIELD_NAMES:
                raise Fatal(f'invalid service attribute name: "{pattern[2]}"')
            if pattern[2] == "*":
                raise Fatal("-Fe does not accept wild-card field name")
            if value is not None and pattern[2] != "command" and _has_blank(value):
                raise Fatal("-Fe does not accept whitespace in non-command field")
        else:
            pattern = service_pattern(text, 3, 3)
            if pattern is None:
                raise Fatal("-Pe or -PX requires service_name/type/parameter")
            if pattern[2] == "*":
                raise Fatal("-Pe does not accept wild-card parameter name")
            if value is not None and _has_blank(value):
                raise Fatal("-Pe does not accept whitespace in parameter value")
        requests.append((raw, pattern, value))
    return requests


def _has_blank(text: str) -> bool:
    # master.cf's field separators (PCF_MASTER_BLANKS)
    return any(c in " \t\r\n" for c in text)


def edit_master(config_dir: str, args: list[str], mode: str, out: _Out) -> None:
    """-Me service/type=entry, -MX service/type, -M# service/type."""
    path, text, entries = _master_entries(config_dir)
    lines = text.split("\n")
    trailing = text.endswith("\n")
    if trailing:
        lines = lines[:-1]
    result: list[str | None] = list(lines)
    appended: list[str] = []
    for raw, pattern, entry in master_edit_requests("M", args, mode):
        new_svc = None
        if mode == "e":
            try:
                new_svc = parse_master_line(entry, path, 0, strict=False)
            except ConfigError as exc:
                # Postfix quotes the whole argument for a short entry.
                raise Fatal(f'bad field count: "{raw}"' if exc.msg == "bad field count"
                            else exc.msg) from None
        # Postfix 3.7 -Me replaces the entry named on the left and any entry
        # with the new entry's own service/type: the first one found takes
        # the new text, the others go.
        def wanted(svc: MasterService) -> bool:
            return _service_hits(pattern, svc) or (
                new_svc is not None and (svc.name, svc.type) == (new_svc.name, new_svc.type))
        hit = False
        for first, last, svc in entries:
            if not wanted(svc) or result[first] is None and mode != "#":
                continue
            placed = hit
            hit = True
            for k in range(first, last + 1):
                if result[k] is None:
                    continue
                if mode == "#":
                    if not lines[k].lstrip().startswith("#") and lines[k].strip():
                        result[k] = "#" + lines[k]
                elif mode == "e" and k == first and not placed:
                    result[k] = format_master(new_svc, fold=True)
                elif not lines[k].lstrip().startswith("#"):
                    result[k] = None
        if mode == "e" and not hit:
            appended.append(format_master(new_svc, fold=True))
    new = [x for x in result if x is not None] + appended
    atomic_write(path, "\n".join(new) + ("\n" if new else ""))


def edit_master_fields(config_dir: str, args: list[str], out: _Out) -> None:
    """-Fe service/type/field=value: one of the eight fields of an entry (the
    command field takes the command and its arguments); the entry is written
    again in folded form."""
    path, text, entries = _master_entries(config_dir)
    lines = text.split("\n")
    if text.endswith("\n"):
        lines = lines[:-1]
    requests = master_edit_requests("F", args, "e")
    result: list[str | None] = list(lines)
    current = {idx: svc for idx, (_, _, svc) in enumerate(entries)}
    for arg, pattern, value in requests:
        field_name = pattern[2]
        hit = False
        for idx, (first, last, _) in enumerate(entries):
            svc = current[idx]
            if not _service_hits(pattern, entries[idx][2]):
                continue
            # checked only where it is used, as Postfix does
            _check_field(field_name, value)
            hit = True
            fields = list(svc.fields)
            argv = list(svc.argv)
            if field_name == "command":
                words = value.split()
                if not words:
                    # Postfix 3.7 crashes here, leaving master.cf as it was;
                    # an entry without a command would stop the master.
                    raise Fatal(f'bad field count: "{arg}"')
                fields[7], argv = (words[0] if words else ""), words[1:]
            else:
                fields[MASTER_FIELD_NAMES.index(field_name)] = value
            import dataclasses
            current[idx] = dataclasses.replace(svc, fields=tuple(fields), argv=argv)
            for k in range(first, last + 1):
                if not lines[k].lstrip().startswith("#"):
                    result[k] = None
            result[first] = format_master(current[idx], fold=True)
        if not hit:
            out.warn(f'unmatched service_name/type: "{arg}"')
    new = [x for x in result if x is not None]
    atomic_write(path, "\n".join(new) + ("\n" if new else ""))


def _check_field(field_name: str, value: str) -> None:
    """A new field value must parse as master.cf's field would (Postfix quotes
    the value as the line)."""
    sample = ["x", "unix", "-", "-", "-", "-", "-", "cmd"]
    if field_name in ("service", "command"):
        return
    sample[MASTER_FIELD_NAMES.index(field_name)] = value
    try:
        parse_master_line(" ".join(sample), "master.cf", 0, strict=False)
    except ConfigError as exc:
        raise Fatal(exc.msg.replace(f'in "{" ".join(sample)}"', f'in "{value}"')) from None


def edit_master_params(config_dir: str, args: list[str], mode: str, out: _Out) -> None:
    """-Pe service/type/name=value and -PX service/type/name: edit -o options
    of one entry; the entry is rewritten in place in folded form."""
    path, text, entries = _master_entries(config_dir)
    lines = text.split("\n")
    trailing = text.endswith("\n")
    if trailing:
        lines = lines[:-1]
    changes: dict[int, list[tuple[str, str | None]]] = {}
    # Postfix checks every argument before it edits anything.
    for raw, pattern, value in master_edit_requests("P", args, mode):
        hit = False
        for idx, (_, _, svc) in enumerate(entries):
            if _service_hits(pattern, svc):
                hit = True
                changes.setdefault(idx, []).append((pattern[2], value))
        if not hit:
            out.warn(f'unmatched service_name/type: "{raw}"')
    result: list[str | None] = list(lines)
    for idx, edits in changes.items():
        first, last, svc = entries[idx]
        words = _master_args(svc)
        opts_part, rest, k = [], [], 0
        while k < len(words) and words[k].startswith("-"):
            if words[k] == "-o" and k + 1 < len(words):
                opts_part.append(("-o", unbrace(words[k + 1])))
                k += 2
            else:
                opts_part.append((words[k], None))
                k += 1
        rest = words[k:]
        for name, value in edits:
            idxs = [i for i, (f, pair) in enumerate(opts_part)
                    if f == "-o" and pair.partition("=")[0] == name]
            if value is None:
                opts_part = [x for i, x in enumerate(opts_part) if i not in idxs]
            elif idxs:
                opts_part[idxs[0]] = ("-o", f"{name}={value}")
            else:
                opts_part.append(("-o", f"{name}={value}"))
        argv: list[str] = []
        for flag, pair in opts_part:
            # a pair with white space in it stays one word only inside braces
            if pair is not None and _has_space(pair):
                pair = "{" + pair + "}"
            argv += [flag] + ([pair] if pair is not None else [])
        argv += ["{" + w + "}" if any(c.isspace() for c in w) else w for w in rest]
        new_svc = parse_master_line(" ".join(list(svc.fields) + argv), path, first + 1,
                                    strict=False)
        for k in range(first, last + 1):
            if not lines[k].lstrip().startswith("#"):
                result[k] = None
        result[first] = format_master(new_svc, fold=True)
    new = [x for x in result if x is not None]
    atomic_write(path, "\n".join(new) + ("\n" if new else ""))


def override_warnings(main_cf_path: str, with_syntax: bool = False) -> list[str]:
    """Postfix's mail_conf_read() words for a parameter set twice in main.cf
    (common when settings are appended to a stock file): the later line wins.
    with_syntax: also the stray-line warnings, in file order among them."""
    from postwell.config.main import iter_logical_lines, split_name_value
    out: list[str] = []
    try:
        with open(main_cf_path, encoding="utf-8", errors="surrogateescape") as f:
            text = f.read()
        seen: dict[str, str] = {}
        for first, _last, line in iter_logical_lines(text, main_cf_path,
                                                     out.append if with_syntax else None):
            name, value = split_name_value(line, main_cf_path, first)
            if name in seen:
                out.append(f"{main_cf_path}, line {first}: overriding earlier entry: "
                           f"{name}={seen[name]}")
            seen[name] = value
    except (OSError, ConfigError):
        return []          # the loader reports it in its own words
    return out


def _with_overrides(cfg: Config) -> list[str]:
    # mail_conf_read() warns while it reads, so syntax and override warnings
    # interleave in file order; the loader's own copies are not repeated
    first = override_warnings(cfg.main_cf_path, with_syntax=True)
    rest = list(cfg.warnings)
    for w in first:
        if w in rest:
            rest.remove(w)
    return first + rest


# ---- -m, -b, -t -------------------------------------------------------------

# Postfix 3.7's `postconf -m` (Debian, with its dynamic map plugins) minus the
# types postwell cannot open; "proxy" stays: postwell accepts the proxy:
# prefix and opens the table in-process.
POSTFIX_MAP_TYPES = ("btree", "cidr", "environ", "fail", "hash", "inline", "internal", "lmdb",
                     "memcache", "nis", "pcre", "pipemap", "proxy", "randmap", "regexp",
                     "socketmap", "static", "tcp", "texthash", "unionmap", "unix")
# Types postwell has beyond that list: sqlite is Postfix's too (Debian ships it
# as the postfix-sqlite plugin, listed by postconf -m once installed).
EXTRA_MAP_TYPES = ("sqlite",)


def map_types() -> list[str]:
    try:
        from postwell.tables import table_types
        have = set(table_types()) | {"proxy"}
    except ImportError:
        return []
    return sorted(t for t in have if t in POSTFIX_MAP_TYPES or t in EXTRA_MAP_TYPES)


def show_bounce_templates(config_dir: str | None, names: list[str], *, expand: bool,
                          out: _Out) -> int:
    """postconf -t / -b [template_file]: bounce(5) templates, as is or expanded."""
    from . import bounce_templates as bt
    if len(names) > 1:
        raise Fatal("options -b and -t require at most one template file")
    cfg = load(config_dir)
    for warning in _with_overrides(cfg):
        out.warn(warning)
    # The template code reports under the bounce daemon's name, as Postfix's does.
    warn = lambda text: out.err.write(f"{bt.PROG}: warning: {text}\n")  # noqa: E731
    try:
        text = bt.render(cfg, expand=expand, path=names[0] if names else None, warn=warn)
    except bt.TemplateError as exc:
        out.err.write(f"{bt.PROG}: fatal: {exc}\n")
        return 1
    out.out.write(text)
    return 0


def show_tls_info(mode: str, out: _Out) -> int:
    """postconf -T: the TLS library postwell runs with (Python's ssl module is
    built and run against the same OpenSSL, so both versions are the one
    loaded), and the key types the TLS code can load."""
    import ssl
    if mode in ("compile-version", "run-version"):
        out.line(ssl.OPENSSL_VERSION)
    elif mode == "public-key-algorithms":
        for name in ("dsa", "ecdsa", "rsa"):
            out.line(name)
    else:
        out.err.write(f"{PROG}: warning: unknown 'postconf -T' mode: {mode}\n")
        return 1
    return 0


# ---- entry point ----------------------------------------------------------

def main(argv: list[str] | None = None, stdout=None, stderr=None) -> int:
    out = _Out(stdout or sys.stdout, stderr or sys.stderr)
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        # Postfix's GETOPT stops at the first non-option ("+"): a later "-x"
        # is a parameter name
        opts_list, names = getopt.getopt(args, "aAbc:C:defFhHlmMno:pPtT:vxX#")
    except getopt.GetoptError as e:
        # glibc getopt's words.
        if "requires argument" in e.msg:
            out.err.write(f"{PROG}: option requires an argument -- '{e.opt}'\n")
        else:
            out.err.write(f"{PROG}: invalid option -- '{e.opt}'\n")
        out.err.write(f"{PROG}: fatal: {USAGE}\n")
        return 1
    opts: dict[str, str] = {}
    overrides: dict[str, str] = {}
    for flag, value in opts_list:
        if flag == "-o":
            overrides[value] = value         # checked after the option combinations
        if flag == "-C":
            try:
                parameter_classes(value)     # checked as it is parsed, as Postfix does
            except Fatal as exc:
                out.err.write(f"{PROG}: fatal: {exc}\n")
                return 1
        if flag == "-T" and flag in opts:
            out.err.write(f"{PROG}: fatal: At most one -T <mode> option may be specified\n")
            return 1
        opts[flag] = value
    try:
        return _run(opts, names, overrides, out)
    except Fatal as e:
        out.err.write(f"{PROG}: fatal: {e}\n")
        return 1
    except ConfigError as e:
        if is_macro_error(e.msg):
            # mac_expand() warns with the reason, its caller dies in general words
            out.err.write(f"{PROG}: warning: {e.msg}\n{PROG}: fatal: macro processing error\n")
            return 1
        out.err.write(f"{PROG}: fatal: {postfix_wording(e)}\n")
        return 1
    except BrokenPipeError:
        return 1


def postfix_wording(e: ConfigError) -> str:
    """Postfix words master.cf errors its own way: the field count error as
    'file F: line N: ...', field errors without a location (the text quotes
    the line)."""
    if e.file and os.path.basename(e.file) == "master.cf" and e.line:
        if e.msg == "bad field count":
            return f"file {e.file}: line {e.line}: {e.msg}"
        if e.msg.startswith("invalid "):
            return e.msg
    return str(e)


_FLAG_ORDER = "aAbdefFhHlmMnopPtTxX#"
# Checked in this order; the message names every flag of the first set
# that has more than one (Postfix 3.7's incompatible-option table).
_EXCLUSIVE_GROUPS = ({"-a", "-A", "-b", "-F", "-l", "-m", "-M", "-p", "-P", "-t", "-T"},
                     {"-d", "-e", "-n", "-X", "-#"}, {"-d", "-o"}, {"-e", "-f", "-X", "-#"},
                     {"-e", "-x", "-X", "-#"}, {"-e", "-o", "-X", "-#"},
                     {"-e", "-h", "-H", "-X", "-#"})
_NOT_WITH = {"-M": ("-n", "-d", "-h", "-H"), "-P": ("-n", "-d", "-#"),
             "-F": ("-n", "-d", "-X", "-#")}
# Listing modes that take none of the parameter-display or edit flags.
for _mode in ("-a", "-A", "-b", "-l", "-m", "-t", "-T"):
    _NOT_WITH[_mode] = ("-d", "-e", "-f", "-h", "-H", "-n", "-o", "-x", "-X", "-#")


def _check_flags(opts: dict) -> None:
    """Postfix's sanity checks on option combinations, with its wording."""
    def order(flag: str) -> int:
        return _FLAG_ORDER.index(flag[1])
    if "-b" in opts and "-t" in opts:
        raise Fatal("specify one of -b and -t")
    for group in _EXCLUSIVE_GROUPS:
        given = sorted((f for f in group if f in opts), key=order)
        if len(given) > 1:
            raise Fatal(f"specify one of {' '.join(given)}")
    for mode, bad in _NOT_WITH.items():
        if mode in opts:
            # Postfix names every offending flag at once.
            found = sorted((f for f in bad if f in opts), key=order)
            if found:
                raise Fatal(f"with option {mode}, do not specify {' '.join(found)}")


def _run(opts: dict, names: list[str], overrides: dict, out: _Out) -> int:
    config_dir = config_dir_from_env(opts.get("-c"))
    if names and "=" in names[0] and not any(f in opts for f in ("-a", "-A", "-b", "-l", "-m", "-t", "-T")):
        opts.setdefault("-e", "")       # a first name=value argument means -e
    _check_flags(opts)
    parsed: dict[str, str] = {}
    for text in overrides:
        try:
            name, value = split_nameval(text)
        except ValueError as exc:
            raise Fatal(f"invalid parameter override: {text}: {exc}") from None
        parsed[name] = value
    overrides = parsed
    if (("-X" in opts or "-#" in opts) and any("=" in n for n in names)
            and not any(f in opts for f in ("-M", "-F", "-P"))):
        # master.cf edits check this per request, in their own words
        raise Fatal("-X or -# requires parameter names without value")
    edit_modes = [m for m in ("-e", "-X", "-#") if m in opts]
    if edit_modes and not names:
        raise Fatal("-e requires name=value argument" if edit_modes[0] == "-e"
                    else "missing service argument")
    main_cf = os.path.join(config_dir, "main.cf")

    cfg = None
    if not edit_modes and ("-M" in opts or "-P" in opts or "-F" in opts):
        _read(os.path.join(config_dir, "master.cf"))
        cfg = load(config_dir if "-c" in opts else None)
        for warning in _with_overrides(cfg):
            out.warn(warning)
        _warn_undefined(cfg, out)
        _warn_unused(cfg, out, main_cf=False)
    # Request shapes are checked once the files are read (after their warnings).
    for flag in ("-M", "-F", "-P"):
        if flag in opts and not edit_modes:
            master_requests(flag, names)
    if "-M" in opts:
        if edit_modes:
            if not names:
                raise Fatal(f"{edit_modes[0]} requires service/type argument")
            edit_master(config_dir, names, edit_modes[0][1], out)
            return 0
        show_master(config_dir, names, opts, out, cfg)
        return 0
    if "-P" in opts:
        if edit_modes:
            if not names:
                raise Fatal(f"-P{edit_modes[0][1]} requires service/type/parameter argument")
            edit_master_params(config_dir, names, edit_modes[0][1], out)
            return 0
        show_master_params(config_dir, names, opts, out, cfg)
        return 0
    if "-F" in opts:
        if edit_modes:
            edit_master_fields(config_dir, names, out)
            return 0
        show_master_fields(config_dir, names, opts, out, cfg)
        return 0
    if "-m" in opts:
        for warning in override_warnings(main_cf, with_syntax=True):
            out.warn(warning)
        for name in map_types():
            out.line(name)
        return 0
    if "-b" in opts or "-t" in opts:
        return show_bounce_templates(config_dir if "-c" in opts else None, names,
                                     expand="-b" in opts, out=out)
    if "-T" in opts:
        return show_tls_info(opts["-T"], out)
    if "-a" in opts or "-A" in opts:
        for name in SERVER_SASL_TYPES if "-a" in opts else CLIENT_SASL_TYPES:
            out.line(name)
        return 0
    if "-l" in opts:
        for name in ("flock", "fcntl", "dotlock"):
            out.line(name)
        return 0
    if edit_modes:
        mode = edit_modes[0][1]
        if mode == "e":
            if not names:
                raise Fatal("-e requires name=value argument")
            edits = _parse_assignments(names, out)
        else:
            if not names:
                raise Fatal(f"{edit_modes[0]} requires parameter name argument")
            if any(n.lstrip().startswith("#") for n in names):
                raise Fatal("-e, -X, or -# accepts no comment input")
            # leading blanks go; trailing ones stay part of the name (and
            # then match nothing), as Postfix's edit code leaves them
            edits = {n.lstrip(): None for n in names}
        edit_main_cf(main_cf, edits, mode, out)
        return 0

    cfg = load(config_dir if "-c" in opts else None, defaults_only="-d" in opts)
    # Postfix's postconf -d does not read main.cf.
    for warning in cfg.warnings if "-d" in opts else _with_overrides(cfg):
        out.warn(warning)
    if overrides:
        cfg = Config(cfg.config_dir, {**cfg.params, **overrides}, {}, cfg.services,
                     cfg.main_cf_path, cfg.param_lines, cfg.warnings)
    if "-d" not in opts:
        _warn_undefined(cfg, out)
    show_params(cfg, names, opts, out)
    if "-d" not in opts:
        _warn_unused(cfg, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
