"""master.cf parsing, in Postfix's model (master(5)).

Each logical line (same comment and continuation rules as main.cf) has eight
or more white-space separated fields:

    service type private unpriv chroot wakeup maxproc command [args...]

A field of "-" takes the default: private y, unpriv y, chroot n (Postfix 3.0
and later), wakeup 0, maxproc $default_process_limit.  Arguments may be
grouped with braces (Postfix 3.0): `-o { name = value with spaces }` or
`{ one argument with spaces }`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .main import ConfigError, iter_logical_lines

SERVICE_TYPES = ("inet", "unix", "unix-dgram", "fifo", "pass")

# Used when /etc/services lacks a name (minimal containers).
_PORT_FALLBACK = {"smtp": 25, "submission": 587, "smtps": 465, "submissions": 465,
                  "lmtp": 24, "urd": 465}


@dataclass
class MasterService:
    name: str            # service field as written ("smtp", "127.0.0.1:2525", "submission")
    type: str            # inet | unix | unix-dgram | fifo | pass
    private: bool
    unpriv: bool
    chroot: bool
    wakeup: str
    maxproc: int | None  # None = default_process_limit
    command: str         # "smtpd", "qmgr", ...
    args: list[str] = field(default_factory=list)
    overrides: dict[str, str] = field(default_factory=dict)   # -o name=value
    line: int = 0
    # The eight fields as written (postconf -M prints these), and the argument
    # words after the command, -o pairs included, in order.
    fields: tuple = ()
    argv: list[str] = field(default_factory=list)
    # Malformed -o words of a leniently parsed entry, in the words Postfix's
    # daemon dies with when it is started (postconf and postfix check accept
    # the entry; only the service itself cannot run).
    option_errors: list[str] = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"{self.name}/{self.type}"

    @property
    def wakeup_seconds(self) -> int:
        """Wake-up interval; a trailing '?' (wake only when used) is ignored."""
        text = self.wakeup.rstrip("?")
        return int(text) if text.isdigit() else 0

    def process_limit(self, config=None) -> int:
        if self.maxproc is not None:
            return self.maxproc
        if config is not None:
            return config.get_int("default_process_limit")
        return 100


def split_args(text: str, filename: str = "master.cf", lineno: int = 0,
               unclosed: list | None = None) -> list[str]:
    """Split on white space; a {...} group is one word (braces kept).  With
    `unclosed` (postconf's lenient reading) a '{' without its '}' takes the
    rest of the line as one word, noted as (word index, text) instead of
    being an error."""
    words: list[str] = []
    i, n = 0, len(text)
    while i < n:
        if text[i] in " \t\r\n":
            i += 1
            continue
        if text[i] == "{":
            level, j = 0, i
            while j < n:
                if text[j] == "{":
                    level += 1
                elif text[j] == "}":
                    level -= 1
                    if level == 0:
                        break
                j += 1
            if level:
                if unclosed is None:
                    raise ConfigError(f'missing \'}}\' in "{text[i:]}"', filename, lineno)
                rest = text[i:].rstrip()
                unclosed.append((len(words), rest))
                words.append(rest + "}")
                break
            words.append(text[i:j + 1])
            i = j + 1
            continue
        j = i
        while j < n and text[j] not in " \t\r\n":
            j += 1
        words.append(text[i:j])
        i = j
    return words


def unbrace(word: str) -> str:
    if word.startswith("{") and word.endswith("}"):
        return word[1:-1].strip()
    return word


def split_nameval(text: str) -> tuple[str, str]:
    """`name = value` as Postfix's daemons read an -o argument: the name ends at
    '=' or white space and only white space may follow it before the '='."""
    body = text.strip()
    if not body or body.startswith("="):
        raise ValueError("missing attribute name")
    end = 0
    while end < len(body) and body[end] != "=" and not body[end].isspace():
        end += 1
    rest = body[end:].lstrip()
    if not rest.startswith("="):
        raise ValueError("missing '=' after attribute name")
    return body[:end], rest[1:].strip()


def _yes_no(value: str, default: bool, what: str, line: str, filename: str, lineno: int) -> bool:
    if value == "-":
        return default
    if value in ("y", "n"):
        return value == "y"
    raise ConfigError(f'invalid {what} field "{value}" in "{line}"', filename, lineno)


def read_master_text(cfg) -> str | None:
    """$config_directory/master.cf's text; None, with Postfix's warning added to
    cfg.warnings, when it is missing (postconf and postfix(1) go on without it);
    ConfigError when it cannot be read."""
    import os
    path = os.path.join(cfg.config_dir, "master.cf")
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            return f.read()
    except FileNotFoundError:
        cfg.warnings.append(f"open {path}: No such file or directory")
        return None
    except PermissionError:
        raise ConfigError(f"open {path}: Permission denied") from None


def parse_master_cf(text: str, filename: str = "master.cf", warn=None, *,
                    strict: bool = True, strict_options: bool | None = None) -> list[MasterService]:
    services: list[MasterService] = []
    for first, _last, line in iter_logical_lines(text, filename, warn):
        services.append(parse_master_line(line, filename, first, strict=strict,
                                         warn=None if strict else warn,
                                         strict_options=strict_options))
    return services


def parse_master_line(line: str, filename: str = "master.cf", lineno: int = 0, *,
                      strict: bool = True, warn=None,
                      strict_options: bool | None = None) -> MasterService:
    """One logical master.cf line.  strict=False (postconf's view) keeps a
    malformed `-o word` as an argument and notes it in option_errors: Postfix
    only fails when that service's daemon parses its command line.
    strict_options (default: strict) decides that alone: the master's view is
    strict=True, strict_options=False (an unclosed '{' stops the master, a
    malformed -o only the one daemon)."""
    if strict_options is None:
        strict_options = strict
    # Field errors quote the logical line as read (continuations joined),
    # control characters shown as '?', as Postfix prints it.
    flat = "".join("?" if ord(c) < 32 or c == "\x7f" else c for c in line.rstrip())
    unclosed: list | None = None if strict else []
    words = split_args(line, filename, lineno, unclosed)
    if len(words) < 8:
        raise ConfigError("bad field count", filename, lineno)
    name, stype, private, unpriv, chroot, wakeup, maxproc, command = words[:8]
    if stype not in SERVICE_TYPES:
        raise ConfigError(f'invalid type field "{stype}" in "{flat}"', filename, lineno)
    priv = _yes_no(private, True, "private", flat, filename, lineno)
    unpr = _yes_no(unpriv, True, "unprivileged", flat, filename, lineno)
    chrt = _yes_no(chroot, False, "chroot", flat, filename, lineno)
    if wakeup == "-":
        wake = "0"
    elif re.fullmatch(r"\d+\??", wakeup):
        wake = wakeup
    else:
        raise ConfigError(f'invalid wakeup field "{wakeup}" in "{flat}"', filename, lineno)
    if maxproc == "-":
        limit = None
    elif maxproc.isdigit():
        limit = int(maxproc)
    else:
        raise ConfigError(f'invalid process_limit field "{maxproc}" in "{flat}"', filename, lineno)
    argv = words[8:]
    # postconf warns about an unclosed '{' when it reaches that word
    brace_warnings = {index - 8: text for index, text in unclosed or () if index >= 8}

    def said(k: int) -> None:
        if warn is not None and k in brace_warnings:
            warn(f"master.cf: missing '}}' in \"{brace_warnings.pop(k)}\"")
    overrides: dict[str, str] = {}
    args: list[str] = []
    option_errors: list[str] = []
    k = 0
    in_options = True       # only leading daemon options carry -o (as postconf reads them)
    while k < len(argv):
        word = argv[k]
        if not word.startswith("-"):
            in_options = False
        said(k)
        if in_options and word == "-o" and k + 1 < len(argv):
            said(k + 1)
            pair = unbrace(argv[k + 1])
            try:
                pname, pvalue = split_nameval(pair)
            except ValueError as exc:
                if strict_options:
                    raise ConfigError(f'{exc}: "{pair}"', filename, lineno) from None
                option_errors.append(f'invalid "-o {pair}" option value: {exc}')
                # postconf warns only about a braced pair (a bare word is kept silently)
                if warn is not None and argv[k + 1].startswith("{"):
                    warn(f'master.cf: {exc}: "{pair}"')
                args += ["-o", pair]
                k += 2
                continue
            overrides[pname] = pvalue
            args += ["-o", f"{pname}={pvalue}"]
            k += 2
            continue
        args.append(unbrace(word))
        k += 1
    return MasterService(name=name, type=stype, private=priv, unpriv=unpr, chroot=chrt,
                         wakeup=wake, maxproc=limit, command=command, args=args,
                         overrides=overrides, line=lineno,
                         fields=(name, stype, private, unpriv, chroot, wakeup, maxproc, command),
                         argv=argv, option_errors=option_errors)


# Letters the command-line parser of Postfix's daemon skeletons knows (Postfix
# 3.7 single/multi/event/trigger servers); the ones followed by ':' take a value.
_DAEMON_GETOPT = "cdDi:lm:n:o:s:St:uvVz"


# Daemons whose command line goes on with arguments of their own after the
# options (pipe(8) and spawn(8): flags=, user=, argv= ...).
_DAEMONS_WITH_ARGUMENTS = ("pipe", "spawn")


def daemon_startup_error(svc: MasterService) -> str | None:
    """What the service's daemon dies of ("fatal: ...") while it reads its
    command line, or None.  The arguments are read as getopt(3) in Postfix's
    "+" mode does: options until the first word that is not one; the first
    bad one ends the daemon.  A word after the options is an error too, for
    all daemons but pipe and spawn (Postfix's daemons say so when they get
    their first request: at once for a woken one, at the first client of one
    started per connection)."""
    words = svc.argv or []
    takes_arguments = svc.command.rsplit("/", 1)[-1] in _DAEMONS_WITH_ARGUMENTS

    def after_options(rest: list[str]) -> str | None:
        if rest and not takes_arguments:
            return f"unexpected command-line argument: {unbrace(rest[0])}"
        return None

    k = 0
    while k < len(words):
        word = words[k]
        if word == "--":
            return after_options(words[k + 1:])
        if not word.startswith("-") or word == "-":
            return after_options(words[k:])
        pos = 1
        while pos < len(word):
            letter = word[pos]
            at = _DAEMON_GETOPT.find(letter)
            if letter == ":" or at < 0:
                return f"invalid option: {letter}"
            if _DAEMON_GETOPT[at + 1:at + 2] != ":":
                pos += 1
                continue
            if pos + 1 < len(word):
                pair = word[pos + 1:]          # -oname=value: as written
            elif k + 1 < len(words):
                k += 1
                # the master hands the daemon a {...} word without its braces
                pair = unbrace(words[k])
            else:
                return f"invalid option: {letter}"
            if letter == "o":
                try:
                    split_nameval(pair)
                except ValueError as exc:
                    return f'invalid "-o {pair}" option value: {exc}'
            break
        k += 1
    return None


def service_port(port: str) -> int:
    """A port number or /etc/services name (tcp) as a number."""
    if port.isdigit():
        value = int(port)
        if 0 < value < 65536:
            return value
        raise ValueError(f"bad port number: {port}")
    try:
        import socket
        return socket.getservbyname(port, "tcp")
    except OSError:
        if port in _PORT_FALLBACK:
            return _PORT_FALLBACK[port]
        raise ValueError(f"unknown service: {port}/tcp") from None


def listen_address(service: MasterService | str) -> tuple[str | None, int]:
    """(host, port) for an inet service; host None means every inet_interfaces address.

    Forms: "smtp", "2525", "host:port", "127.0.0.1:smtp", "[::1]:2525".
    """
    name = service.name if isinstance(service, MasterService) else service
    filename = "master.cf"
    lineno = service.line if isinstance(service, MasterService) else None
    try:
        if name.startswith("["):
            end = name.find("]")
            if end < 0 or name[end + 1:end + 2] != ":":
                raise ValueError(f"bad address in service name: {name}")
            return name[1:end], service_port(name[end + 2:])
        host, sep, port = name.rpartition(":")
        if not sep:
            return None, service_port(name)
        if ":" in host:           # bare IPv6 without brackets is ambiguous
            raise ValueError(f"IPv6 address in service name must be in []: {name}")
        return (host or None), service_port(port)
    except ValueError as e:
        raise ConfigError(str(e), filename, lineno) from None


def find_service(services: list[MasterService], name: str, stype: str | None = None):
    for svc in services:
        if svc.name == name and (stype is None or svc.type == stype):
            return svc
    return None
