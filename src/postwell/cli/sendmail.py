"""sendmail(1), newaliases(1): Postfix's Sendmail-compatible interface.

Usage: sendmail [options] [recipient ...]

The message is read from standard input and written, as the invoking user,
into the maildrop (see :mod:`postwell.pickup` for the design and
:mod:`postwell.pickup.maildrop` for the file format); the pickup service
queues it.  Flags, messages and exit codes follow Postfix's sendmail:

* ``-t`` adds the recipients of the To:/Cc:/Bcc: headers (Resent-To:/-Cc:/
  -Bcc: when the message has any) to those on the command line;
* ``-i`` / ``-oi``: a line with a lone dot does not end the input (it does by
  default);
* ``-f``/``-r`` sender, ``-F`` full name, ``-N``/``-R``/``-V`` DSN options,
  ``-B 7BIT|8BITMIME``, ``-G`` (gateway: remote rewriting context);
* ``-bm`` (default), ``-bs`` (SMTP on stdin/stdout, mail goes through the
  maildrop too), ``-bv`` (see below), ``-bi``/``-I`` (newaliases), ``-bp``
  (mailq), ``-bd``/``-bl`` (postfix start), ``-bh``/``-bH`` (ignored),
  ``-q`` (flush), ``-qRsite``, ``-qIid``, ``-qINTERVAL`` (ignored);
* ``-oA``path (alias database), other ``-o`` options and ``-A -c -e -h -L -m
  -O -p -U -v -x -XV`` are accepted and ignored as Postfix ignores them;
  ``-n`` is refused.

Exit status: as Postfix 3.7's sendmail (checked), every fatal error exits
75 (EX_TEMPFAIL), whatever sysexits code the error carries internally.

``-bv`` queues the recipients as a user verification request, as Postfix's
does: the delivery agents report without delivering and the sender is mailed
a "Mail Delivery Status Report" (see postwell.verify).  Deliberate differences: a message
larger than message_size_limit is refused here ("message file too big",
nothing queued) instead of being bounced later.  ``-C`` and MAIL_CONFIG are
honoured without Postfix's alternate_config_directories check: sendmail has
no privilege a configuration file could abuse.  With ``-bs`` the reply to
the end of data is "250 2.0.0 Ok: queued as NAME", NAME being the maildrop
file name (Postfix gives its maildrop queue id; pickup assigns the queue id).
"""

from __future__ import annotations

import os
import pwd
import re
import signal
import sys
import time

EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65
EX_NOINPUT = 66
EX_NOUSER = 67
EX_UNAVAILABLE = 69
EX_SOFTWARE = 70
EX_OSERR = 71
EX_CANTCREAT = 73
EX_IOERR = 74
EX_TEMPFAIL = 75
EX_NOPERM = 77

MODE_ENQUEUE, MODE_NEWALIAS, MODE_MAILQ, MODE_DAEMON, MODE_USER, MODE_FLUSHQ, MODE_IGNORE = range(1, 8)

# Options with an argument, as in Postfix's GETOPT_LIST "A:B:C:F:GIL:N:O:R:UV:X:b:ce:f:h:imno:p:r:q:tvx".
OPTS_WITH_ARG = set("ABCFLNORVXbefhopqr")
OPTS_PLAIN = set("GIUcimntvx")

READ_CHUNK = 65536
PIECE_LIMIT = 65536            # a line longer than this is stored in pieces, never held whole
HEADER_COLLECT_LIMIT = 102400  # header_size_limit: longer headers are not parsed for -t


class Fatal(Exception):
    def __init__(self, status: int, text: str):
        super().__init__(text)
        self.status = status
        self.text = text


class Options:
    def __init__(self) -> None:
        self.mode = MODE_ENQUEUE
        self.config_dir: str | None = None
        self.sender: str | None = None
        self.full_name: str | None = None
        self.extract = False
        self.dot_ends = True               # Postfix's SM_FLAG_AEOF
        self.verify = False
        self.notify: str | None = None
        self.ret: str | None = None
        self.envid: str | None = None
        self.body: str | None = None
        self.rewrite = "local"
        self.alias_database: str | None = None
        self.qtime: str | None = None
        self.site_to_flush: str | None = None
        self.id_to_flush: str | None = None
        self.verbose = 0
        self.recipients: list[str] = []
        self.warnings: list[str] = []


# --------------------------------------------------------------------------- option parsing

def _notify_value(text: str) -> str | None:
    """-N: "never" or a comma list of success, failure, delay (RFC 3461 4.1)."""
    words = [w.strip().lower() for w in re.split(r"[,\s]+", text) if w.strip()]
    if not words:
        return None
    if words == ["never"]:
        return "NEVER"
    order = ("success", "failure", "delay")
    if any(w not in order for w in words):
        return None
    return ",".join(w.upper() for w in order if w in words)


def parse_args(args: list[str], prog: str = "sendmail") -> Options:
    o = Options()
    if prog == "mailq":
        o.mode = MODE_MAILQ
    elif prog == "newaliases":
        o.mode = MODE_NEWALIAS
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "-q":   # not getopt compatible: -q alone flushes
            if o.mode == MODE_DAEMON:
                o.warnings.append("ignoring -q option in daemon mode")
            else:
                o.mode = MODE_FLUSHQ
            i += 1
            continue
        if arg == "--":
            i += 1
            break
        if not arg.startswith("-") or arg == "-":
            break           # getopt with "+": options end at the first operand
        if arg == "-XV":
            i += 1          # VERP: accepted, not implemented (no VERP delivery yet)
            continue
        j = 1
        while j < len(arg):
            c = arg[j]
            if c in OPTS_WITH_ARG:
                if j + 1 < len(arg):
                    val = arg[j + 1:]
                else:
                    i += 1
                    if i >= len(args):
                        raise Fatal(EX_USAGE, f"usage: {prog} [options]",) from _UsageHint(
                            f"{prog}: option requires an argument -- '{c}'", o)
                    val = args[i]
                _apply_arg(o, c, val)
                break
            if c not in OPTS_PLAIN:
                raise Fatal(EX_USAGE, f"usage: {prog} [options]") from _UsageHint(
                    f"{prog}: invalid option -- '{c}'", o)
            _apply_flag(o, c)
            j += 1
        i += 1
    o.recipients = args[i:]
    # Conflicting options (Postfix's checks, same words).
    if o.extract and o.mode != MODE_ENQUEUE:
        raise Fatal(EX_USAGE, "-t can be used only in delivery mode")
    if o.site_to_flush and o.mode != MODE_ENQUEUE:
        raise Fatal(EX_USAGE, "-qR can be used only in delivery mode")
    if o.id_to_flush and o.mode != MODE_ENQUEUE:
        raise Fatal(EX_USAGE, "-qI can be used only in delivery mode")
    if o.verify:
        if o.extract:
            raise Fatal(EX_USAGE, "-t option cannot be used with -bv")
        if o.notify:
            raise Fatal(EX_USAGE, "-N option cannot be used with -bv")
        if o.ret:
            raise Fatal(EX_USAGE, "-R option cannot be used with -bv")
        if o.verbose == 1:
            raise Fatal(EX_USAGE, "-v option cannot be used with -bv")
    return o


class _UsageHint(Exception):
    """getopt's own complaint, printed before the fatal usage line; options
    holds what was parsed before it (its warnings are said first)."""

    def __init__(self, text: str, options: Options | None = None):
        super().__init__(text)
        self.options = options


def getopt_complaints(args: list[str], prog: str = "sendmail") -> list[str]:
    """What glibc's getopt says during Postfix's first pass over the options
    (a pre-scan for -C and -v): every invalid option, not only the first."""
    out: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "-q" or arg == "-XV":
            i += 1
            continue
        if arg == "--" or not arg.startswith("-") or arg == "-":
            break
        j = 1
        while j < len(arg):
            c = arg[j]
            if c in OPTS_WITH_ARG:
                if j + 1 >= len(arg):
                    i += 1
                    if i >= len(args):
                        out.append(f"{prog}: option requires an argument -- '{c}'")
                break
            if c not in OPTS_PLAIN:
                out.append(f"{prog}: invalid option -- '{c}'")
            j += 1
        i += 1
    return out


def _apply_flag(o: Options, c: str) -> None:
    if c == "n":
        raise Fatal(EX_USAGE, "-n option not supported")
    if c == "G":
        o.rewrite = "remote"
    elif c == "I":
        o.mode = MODE_NEWALIAS
    elif c == "i":
        o.dot_ends = False
    elif c == "t":
        o.extract = True
    elif c == "v":
        o.verbose += 1
    # -U (initial submission), -c, -m, -x: ignored as in Postfix.


def _apply_arg(o: Options, c: str, val: str) -> None:
    if c == "B":
        if val == "8BITMIME":
            o.body = "8BITMIME"
        elif val == "7BIT":
            o.body = "7BIT"
        else:
            raise Fatal(EX_USAGE, "-B option needs 8BITMIME or 7BIT")
    elif c == "C":
        o.config_dir = os.path.dirname(val) if os.path.basename(val) == "main.cf" else val
    elif c == "F":
        o.full_name = val
    elif c == "N":
        n = _notify_value(val)
        if n is None:
            # Postfix's name_mask: the first unknown word is named, then the verdict.
            order = ("success", "failure", "delay", "never")
            unknown = [w for w in re.split(r"[,\s]+", val) if w and w.lower() not in order]
            if unknown:
                o.warnings.append(f'unknown DSN NOTIFY command value "{unknown[0]}" in "{val}"')
            o.warnings.append("bad -N option value -- ignored")
        else:
            o.notify = n
    elif c == "R":
        v = val.strip().lower()
        if v in ("full", "hdrs"):
            o.ret = v.upper()
        else:
            o.warnings.append("bad -R option value -- ignored")
    elif c == "V":
        if len(val) > 100:
            o.warnings.append("too long -V option value -- ignored")
        elif not val or not all(32 <= ord(ch) < 127 for ch in val):
            # Postfix allprint(): a space is printable, an empty string is not
            o.warnings.append("bad syntax in -V option value -- ignored")
        else:
            o.envid = val
    elif c == "X":
        if not val.startswith("V"):
            raise Fatal(EX_USAGE, f"unsupported: -{c}{val[:1]}")
    elif c == "b":
        b = val[:1]
        if b in ("d", "l"):
            if o.mode == MODE_FLUSHQ:
                o.warnings.append("ignoring -q option in daemon mode")
            o.mode = MODE_DAEMON
        elif b in ("h", "H"):
            o.mode = MODE_IGNORE
        elif b == "i":
            o.mode = MODE_NEWALIAS
        elif b == "m":
            o.mode = MODE_ENQUEUE
        elif b == "p":
            o.mode = MODE_MAILQ
        elif b == "s":
            o.mode = MODE_USER
        elif b == "v":
            o.verify = True
        else:
            raise Fatal(EX_USAGE, f"unsupported: -{c}{b}")
    elif c in ("f", "r"):
        o.sender = val
    elif c == "o":
        if val[:1] == "A":
            if len(val) == 1:
                raise Fatal(EX_USAGE, "-oA requires pathname")
            o.alias_database = val[1:]
        elif val[:1] == "i":
            o.dot_ends = False
        # -o7, -o8, -om and the rest: ignored, as Postfix does.
    elif c == "q":
        if val[:1].isdigit():
            o.qtime = val
        elif val[:1] == "R":
            o.site_to_flush = val[1:]
            if not o.site_to_flush:
                raise Fatal(EX_USAGE, "specify: -qRsitename")
        elif val[:1] == "I":
            o.id_to_flush = val[1:]
            if not o.id_to_flush:
                raise Fatal(EX_USAGE, "specify: -qIqueueid")
        else:
            raise Fatal(EX_USAGE, f"-q{val[:1]} is not implemented")
    # -A, -L, -O, -e, -h, -p: accepted and ignored.


# --------------------------------------------------------------------------- addresses

def parse_address_list(text: str) -> list[str]:
    """Addresses of an RFC 5322 3.4 address list, in internal (unquoted) form.
    Display names, comments and group syntax are dropped.

    As Postfix's tok822 parser, two words in a row with no "@", "." or
    comma between them start a new address: "a b" is two recipients (and
    "-f 'a b'" a malformed sender), "e@x (note) f@y" too."""
    from postwell.cleanup.addresses import group_addresses, tokenize
    out = []
    words = ("atom", "qstring", "domlit")
    for t in group_addresses(tokenize(text)):
        if t.kind != "addr":
            continue
        parts: list[str] = []
        prev_word = False
        for p in t.parts:
            if p.kind == "comment":
                continue
            is_word = p.kind in words
            if is_word and prev_word and parts:
                out.append("".join(parts))
                parts = []
            prev_word = is_word
            if p.kind == "qstring":
                parts.append(re.sub(r"\\(.)", r"\1", p.text))
            elif p.kind == "domlit":
                parts.append(f"[{p.text}]")
            else:
                parts.append(p.text)
        # A source route (RFC 5321 4.1.2 "@a,@b:user@c") keeps only the mailbox.
        addr = "".join(parts)
        if addr:
            out.append(addr)
    return out


def login_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        raise Fatal(EX_OSERR, f"no login name found for user ID {uid}") from None


def full_name_of(uid: int) -> str | None:
    """Postfix's fullname(): $NAME, else the GECOS field up to the first
    comma, with "&" standing for the capitalised login name."""
    name = os.environ.get("NAME")
    if name:
        return name
    try:
        pw = pwd.getpwuid(uid)
    except KeyError:
        return None
    gecos = pw.pw_gecos.split(",", 1)[0]
    if "&" in gecos:
        gecos = gecos.replace("&", pw.pw_name[:1].upper() + pw.pw_name[1:])
    return gecos or None


# --------------------------------------------------------------------------- reading the message

_HEADER_NAME_RE = re.compile(rb"^([\x21-\x39\x3b-\x7e]+)[ \t]*:")
_FROM_LINE_RE = re.compile(rb">*From ")
_CR_RUN_LF = re.compile(rb"\r+\n")


class TooBig(Exception):
    pass


class _WriteError(Exception):
    def __init__(self, error: OSError):
        super().__init__(str(error))
        self.error = error


class HeaderRecipients:
    """Collects To/Cc/Bcc (and Resent-) addresses from the primary header block for -t."""

    def __init__(self) -> None:
        self.recipients: list[str] = []
        self.resent_recipients: list[str] = []
        self.resent = False
        self._name: str | None = None
        self._value = bytearray()
        self._truncated = False
        self.in_headers = True
        self._first = True

    def line(self, line: bytes, complete: bool) -> None:
        """One content line without its LF; complete=False for a piece of a long line."""
        if not self.in_headers:
            return
        first, self._first = self._first, False
        if line[:1] in (b" ", b"\t") and not first:
            self._add(line)
            return
        m = _HEADER_NAME_RE.match(line)
        if line == b"" or not m or first and line[:1] in (b" ", b"\t"):
            self._flush()
            self.in_headers = False
            return
        self._flush()
        self._name = m.group(1).decode("ascii").lower()
        self._add(line[m.end():])

    def piece(self, data: bytes) -> None:
        """More of the current (long) line."""
        if self.in_headers and self._name is not None:
            self._add(data)

    def _add(self, data: bytes) -> None:
        if len(self._value) + len(data) > HEADER_COLLECT_LIMIT:
            self._truncated = True
            return
        self._value += b" " + data if self._value else data

    def _flush(self) -> None:
        name, self._name = self._name, None
        value = bytes(self._value)
        self._value.clear()
        if name is None:
            return
        if name in ("resent-to", "resent-cc", "resent-bcc"):
            self.resent = True
            self.resent_recipients.extend(parse_address_list(value.decode("utf-8", "surrogateescape")))
        elif name in ("to", "cc", "bcc") and not self.resent:
            self.recipients.extend(parse_address_list(value.decode("utf-8", "surrogateescape")))

    def finish(self) -> list[str]:
        if self.in_headers:
            self._flush()
            self.in_headers = False
        return self.resent_recipients if self.resent else self.recipients


def copy_message(infd: int, sink, *, dot_ends: bool, headers: HeaderRecipients | None = None,
                 fix_line_endings: str = "always", size_limit: int = 0) -> int:
    """Stream the message from ``infd`` to ``sink(bytes)``: line ends become
    LF, leading mbox "From " lines are dropped, a lone "." ends the input
    when ``dot_ends``.  Memory stays bounded: a line longer than PIECE_LIMIT
    is passed on in pieces.  Returns the number of bytes written; raises
    TooBig past ``size_limit`` and OSError on a read error."""
    written = 0
    pending = bytearray()
    in_piece = False          # the current line has been passed on in part already
    skip_from = True
    strip_cr = {"always": True, "never": False}.get(fix_line_endings)   # None: strict, decide on line 1

    def emit(data: bytes) -> None:
        nonlocal written
        written += len(data)
        if size_limit and written > size_limit:
            raise TooBig()
        sink(data)

    while True:
        chunk = os.read(infd, READ_CHUNK)
        eof = not chunk
        pending += chunk
        if (not skip_from and not in_piece and strip_cr is not None
                and (headers is None or not headers.in_headers)):
            # Body fast path: whole lines in one go (no per-line Python work).
            last = pending.rfind(b"\n")
            if last >= 0:
                block = bytes(pending[:last + 1])
                if strip_cr and b"\r\n" in block:
                    block = (_CR_RUN_LF.sub(b"\n", block) if b"\r\r\n" in block
                             else block.replace(b"\r\n", b"\n"))
                if not (dot_ends and (block.startswith(b".\n") or b"\n.\n" in block)):
                    del pending[:last + 1]
                    emit(block)
        while True:
            nl = pending.find(b"\n")
            if nl < 0:
                if eof and pending:
                    nl = len(pending)        # a last line without LF: stored with one
                elif len(pending) > PIECE_LIMIT:
                    # Keep a possible CR run for the next look; pass the rest on.
                    cut = len(pending) - 1 if pending.endswith(b"\r") else len(pending)
                    piece = bytes(pending[:cut])
                    del pending[:cut]
                    if headers is not None:
                        if not in_piece:
                            headers.line(piece, complete=False)
                        else:
                            headers.piece(piece)
                    skip_from = False
                    in_piece = True
                    emit(piece)
                    continue
                else:
                    break
            line = bytes(pending[:nl])
            del pending[:nl + 1]
            if strip_cr is None:
                strip_cr = line.endswith(b"\r")
            if strip_cr:
                line = line.rstrip(b"\r")
            if skip_from and not in_piece:
                if _FROM_LINE_RE.match(line):
                    continue
                skip_from = False
            if dot_ends and not in_piece and line == b".":
                return written
            if headers is not None:
                if in_piece:
                    headers.piece(line)
                else:
                    headers.line(line, complete=True)
            in_piece = False
            emit(line + b"\n")
            if eof and not pending:
                break
        if eof:
            return written


# --------------------------------------------------------------------------- the command

class Sendmail:
    def __init__(self, prog: str, opts: Options, config, log) -> None:
        self.prog = prog
        self.o = opts
        self.config = config
        self.log = log
        self.uid = os.getuid()
        self.queue_directory = config.get("queue_directory")

    # -- messages ----------------------------------------------------------------
    def warn(self, text: str) -> None:
        sys.stderr.write(f"{self.prog}: warning: {text}\n")
        self._log("warning", text)

    def _log(self, kind: str, text: str) -> None:
        if self.log is None:
            return
        try:
            getattr(self.log, kind)(text)
        except Exception:
            pass

    def ident(self, sender: str) -> str:
        return f"{sender}({self.uid})"

    # -- modes -------------------------------------------------------------------
    def run(self) -> int:
        o = self.o
        for w in o.warnings:
            self.warn(w)
        if not os.path.isdir(self.queue_directory):
            raise Fatal(EX_UNAVAILABLE, f"chdir {self.queue_directory}: No such file or directory")
        if o.qtime and o.mode != MODE_DAEMON:
            return EX_OK
        if o.mode == MODE_ENQUEUE:
            if o.site_to_flush:
                if o.recipients:
                    raise Fatal(EX_USAGE, "flush site requires no recipient")
                return self._postqueue(["-s", o.site_to_flush])
            if o.id_to_flush:
                if o.recipients:
                    raise Fatal(EX_USAGE, "flush queue_id requires no recipient")
                return self._postqueue(["-i", o.id_to_flush])
            if o.verify:
                return self.verify()
            return self.enqueue()
        if o.mode == MODE_MAILQ:
            if o.recipients:
                raise Fatal(EX_USAGE, "display queue mode requires no recipient")
            return self._postqueue(["-p"])
        if o.mode == MODE_FLUSHQ:
            if o.recipients:
                raise Fatal(EX_USAGE, "flush queue mode requires no recipient")
            # Postfix's sendmail -q runs "postqueue -f": its words and status.
            return self._postqueue(["-f"])
        if o.mode == MODE_DAEMON:
            if o.recipients:
                raise Fatal(EX_USAGE, "daemon mode requires no recipient")
            from postwell.cli import postfix as postfix_cli
            return postfix_cli.main(["-c", self.config.config_dir, "start"]) or 0
        if o.mode == MODE_NEWALIAS:
            if o.recipients:
                raise Fatal(EX_USAGE, "alias initialization mode requires no recipient")
            return newaliases(self.config, o.alias_database)
        if o.mode == MODE_USER:
            if o.recipients:
                raise Fatal(EX_USAGE, "stand-alone mode requires no recipient")
            self.check_submit_acl()
            return run_smtp(self)
        return EX_OK

    def _postqueue(self, args: list[str]) -> int:
        from postwell.cli import postqueue
        return postqueue.main(["-c", self.config.config_dir] + args)

    def check_submit_acl(self) -> None:
        from postwell.pickup import submit_denied
        err = submit_denied(self.config, self.uid)
        if err:
            raise Fatal(EX_NOPERM, f"User {err}({self.uid}) is not allowed to submit mail")

    def sender_address(self) -> str:
        o = self.o
        if o.sender is None:
            return login_name(self.uid)
        # Postfix's sendmail keeps what its RFC 822 parser groups as the first
        # address, however malformed ("a@" stays "a@"), and no route is dropped.
        from postwell.cli import tok822
        address, malformed = tok822.sender(o.sender)
        if malformed:
            self.warn(f"-f option specified malformed sender: {o.sender}")
        return address

    def command_line_recipients(self) -> list[str]:
        from postwell.cli import tok822
        out = []
        for arg in self.o.recipients:
            out.extend(tok822.recipients(arg))
        # An empty recipient stays empty, as in Postfix's postdrop file: cleanup
        # sends it to $empty_address_recipient with no original recipient (no
        # orig_to= in the log).
        return out

    def empty_address_recipient(self) -> str:
        try:
            return self.config.get("empty_address_recipient") or "MAILER-DAEMON"
        except Exception:
            return "MAILER-DAEMON"

    def open_maildrop(self, sender: str):
        from postwell.pickup import MaildropWriter
        writer = MaildropWriter(os.path.join(self.queue_directory, "maildrop"))
        try:
            writer.open()
        except OSError as exc:
            fname = os.path.basename(exc.filename) if isinstance(exc.filename, str) else ".tmp"
            raise Fatal(EX_TEMPFAIL, f"{self.ident(sender)}: mail_queue_enter: create file "
                                     f"maildrop/{fname}: {exc.strerror}") from None
        return writer

    def envelope(self, sender: str, recipients: list[str]):
        from postwell.pickup import MaildropEnvelope
        o = self.o
        # -F "" is written as an empty full name, as Postfix's postdrop record.
        full = o.full_name if o.full_name is not None else (full_name_of(self.uid) or None)
        # One -v (Postfix's DEL_REQ_FLAG_RECORD): deliver and mail the sender a
        # report of the first attempt; more than one only makes Postfix verbose.
        return MaildropEnvelope(sender=sender, recipients=recipients, submit_time=time.time(),
                                fullname=full, notify=o.notify, ret=o.ret, envid=o.envid,
                                body=o.body, rewrite=o.rewrite,
                                trace="record" if o.verbose == 1 and not o.verify else None)

    def size_limit(self) -> int:
        try:
            return self.config.get_int("message_size_limit")
        except (ValueError, TypeError):
            return 0

    def enqueue(self) -> int:
        o = self.o
        self.check_submit_acl()
        sender = self.sender_address()
        who = self.ident(sender)
        recipients = self.command_line_recipients()
        writer = self.open_maildrop(sender)
        try:
            headers = HeaderRecipients() if o.extract else None
            limit = self.size_limit()
            def sink(data: bytes) -> None:
                try:
                    writer.write(data)
                except OSError as exc:
                    raise _WriteError(exc) from None

            try:
                copy_message(0, sink, dot_ends=o.dot_ends, headers=headers,
                             fix_line_endings=self.config.get("sendmail_fix_line_endings") or "always",
                             size_limit=max(0, limit - ENVELOPE_ALLOWANCE) if limit else 0)
            except TooBig:
                self.too_big_warnings()
                raise Fatal(EX_UNAVAILABLE, f"{who}: message file too big") from None
            except _WriteError as exc:
                raise Fatal(EX_TEMPFAIL, f"{who}: error writing queue file: {exc.error.strerror}") from None
            except OSError as exc:
                if exc.errno is None:
                    raise
                raise Fatal(EX_DATAERR, f"{who}: error reading input: {exc.strerror}") from None
            if headers is not None:
                recipients.extend(headers.finish())
            if not recipients:
                raise Fatal(EX_USAGE, f"{who}: No recipient addresses found in message header"
                            if o.extract else
                            f"{who}: Recipient addresses must be specified on"
                            " the command line or via the -t option")
            env = self.envelope(sender, recipients)
            # message_size_limit covers the envelope too (Postfix: "including
            # envelope information"); pickup refuses what does not fit.
            if limit and writer.content_size + len(env.pack()) + ENVELOPE_ALLOWANCE > limit:
                self.too_big_warnings()
                raise Fatal(EX_UNAVAILABLE, f"{who}: message file too big")
            try:
                writer.finish(env)
            except OSError as exc:
                raise Fatal(EX_TEMPFAIL, f"{who}: error writing queue file: {exc.strerror}") from None
        except BaseException:
            writer.abort()
            raise
        _wake_pickup(self.queue_directory)
        if env.trace == "record":
            sys.stdout.write(f"Mail Delivery Status Report will be mailed to <{sender}>.\n")
            sys.stdout.flush()
        return EX_OK

    def too_big_warnings(self) -> None:
        """What Postfix 3.7 prints before "message file too big": its postdrop hits
        the file size limit (message_size_limit) and sendmail sees it fail."""
        text = f"uid={self.uid}: File too large"
        sys.stderr.write(f"postdrop: warning: {text}\n")
        try:
            from postwell.log import MailLog
            MailLog.from_config(self.config, "postdrop").warning(text)
        except Exception:
            pass      # maillog_file belongs to mail_owner: stderr has to do
        self.warn("mail_stream_cleanup: close error")

    def verify(self) -> int:
        """-bv as Postfix's: no message is read; the recipients go to the queue as a
        user verification request (delivery agents report, nothing is delivered)
        and the sender gets a "Mail Delivery Status Report"."""
        self.check_submit_acl()
        sender = self.sender_address()
        who = self.ident(sender)
        recipients = self.command_line_recipients()
        if not recipients:
            raise Fatal(EX_USAGE, f"{who}: Recipient addresses must be specified on"
                                  " the command line or via the -t option")
        writer = self.open_maildrop(sender)
        try:
            # What Postfix's sendmail writes instead of a message in this mode.
            head = [f"From: {sender}", "Subject: probe", "To:"]
            for i, rcpt in enumerate(recipients):
                head.append(f"\t{rcpt}{',' if i < len(recipients) - 1 else ''}")
            text = "\n".join(head[:2]) + "\n" + head[2] + "\n".join(head[3:]) + "\n"
            env = self.envelope(sender, recipients)
            env.verify = "user"
            try:
                writer.write(text.encode("utf-8", "surrogateescape"))
                writer.finish(env)
            except OSError as exc:
                raise Fatal(EX_TEMPFAIL, f"{who}: error writing queue file: {exc.strerror}") from None
        except BaseException:
            writer.abort()
            raise
        _wake_pickup(self.queue_directory)
        sys.stdout.write(f"Mail Delivery Status Report will be mailed to <{sender}>.\n")
        sys.stdout.flush()
        return EX_OK


def _wake_pickup(queue_directory: str) -> None:
    """Postfix's postdrop wakes pickup with mail_trigger(), which warns when
    the trigger does not exist (the mail system was never started); the
    message stays in the maildrop either way."""
    from postwell.pickup import poke_pickup
    try:
        os.stat(os.path.join(queue_directory, "public", "pickup"))
    except FileNotFoundError as exc:
        sys.stderr.write(f"postdrop: warning: unable to look up public/pickup: "
                         f"{os.strerror(exc.errno or 2)}\n")
        return
    except OSError:
        pass                  # not for this user to see (postwell has no set-gid postdrop)
    poke_pickup(queue_directory)


# Room kept under message_size_limit for what pickup adds (Received: header,
# envelope), so a message accepted here is not refused by cleanup later.
ENVELOPE_ALLOWANCE = 1024


# --------------------------------------------------------------------------- sendmail -bs

class _CrlfToLf:
    """Streams SMTP data lines (CRLF) into stored form (LF); a CR that ends a
    chunk waits for the next one."""

    def __init__(self, sink) -> None:
        self.sink = sink
        self._cr = False

    def feed(self, data: bytes) -> None:
        if self._cr:
            data = b"\r" + data
            self._cr = False
        if data.endswith(b"\r"):
            data = data[:-1]
            self._cr = True
        if data:
            self.sink(data.replace(b"\r\n", b"\n"))

    def close(self) -> None:
        if self._cr:
            self.sink(b"\r")
            self._cr = False


def run_smtp(sm: "Sendmail", infd: int = 0, outfd: int = 1) -> int:
    """sendmail -bs: an SMTP session on stdin/stdout driven by the sans-IO
    server engine; each accepted message goes into the maildrop like any
    other submission.  The client is "localhost[127.0.0.1]", as Postfix's
    stand-alone smtpd calls a client that is not on a socket."""
    from postwell.cleanup.service import mail_date
    from postwell.pickup import MaildropEnvelope
    from postwell.smtp import server as eng
    from postwell.smtp.reply import Reply
    from postwell.smtpd.server import rcpt_orcpt, table_lookups

    cfg = sm.config
    limit = sm.size_limit()
    conn = eng.ServerConnection(eng.ServerConfig.from_config(cfg, starttls_offered=False, auth_mechanisms=(),
                                                             **table_lookups(cfg)),
                                client="localhost[127.0.0.1]")
    banner = cfg.get("smtpd_banner") or f"{cfg.get('myhostname')} ESMTP {cfg.get('mail_name')}"
    conn.send_greeting(Reply(220, banner))
    hostname = cfg.get("myhostname") or "localhost"
    mail_name = cfg.get("mail_name") or "postwell"
    state = {"mail": None, "rcpts": [], "writer": None, "conv": None}
    write_error = Reply(451, "Error: queue file write error", "4.3.0")

    def drop_writer() -> None:
        w = state["writer"]
        if w is not None:
            w.abort()
        state["writer"] = None
        state["conv"] = None

    def reset() -> None:
        drop_writer()
        state["mail"] = None
        state["rcpts"] = []

    def start_data() -> Reply | None:
        mail = state["mail"]
        try:
            w = sm.open_maildrop(mail.sender)
        except Fatal as f:
            sm.warn(f.text)
            return write_error
        state["writer"] = w
        state["conv"] = _CrlfToLf(w.write)
        helo = conn.helo_name or "localhost"
        proto = "ESMTP" if conn.esmtp else "SMTP"
        w.write((f"Received: from {helo} (localhost [127.0.0.1])\n"
                 f"\tby {hostname} ({mail_name}) with {proto};\n"
                 f"\t{mail_date(time.time())}\n").encode("utf-8", "surrogateescape"))
        return None

    def end_data(ev) -> Reply:
        w, conv = state["writer"], state["conv"]
        if w is None:
            return write_error
        if ev.too_big or (limit and w.content_size > max(0, limit - ENVELOPE_ALLOWANCE)):
            drop_writer()
            return Reply(552, "Error: message file too big", "5.3.4")
        conv.close()
        mail = state["mail"]
        rcpts = state["rcpts"]
        env = MaildropEnvelope(sender=mail.sender, recipients=[r.recipient for r, _ in rcpts],
                               submit_time=time.time(), notify=None, ret=mail.ret, envid=mail.envid,
                               body=mail.body if mail.body in ("7BIT", "8BITMIME") else None,
                               protocol="ESMTP" if conn.esmtp else "SMTP", helo=conn.helo_name,
                               rcpt_notify={i: r.notify for i, (r, _) in enumerate(rcpts)
                                            if r.notify},
                               # the usual "rfc822;" + the recipient is implied (pickup)
                               rcpt_orcpt={i: o for i, (r, o) in enumerate(rcpts)
                                           if o and o != f"rfc822;{r.recipient}"})
        try:
            name = w.finish(env)
        except OSError as exc:
            sm.warn(f"{sm.ident(mail.sender)}: error writing queue file: {exc.strerror}")
            drop_writer()
            return write_error
        state["writer"] = None
        _wake_pickup(sm.queue_directory)
        # Postfix answers with its maildrop queue id; ours is the maildrop file
        # name (postqueue -p lists it and postcat -q reads it until pickup runs).
        return Reply(250, f"Ok: queued as {name}", "2.0.0")

    def flush() -> None:
        out = conn.data_to_send()
        while out:
            n = os.write(outfd, out)
            out = out[n:]

    try:
        while True:
            ev = conn.next_event()
            if ev is eng.NEED_DATA:
                flush()
                if conn.closed:
                    break
                try:
                    data = os.read(infd, READ_CHUNK)
                except OSError:
                    data = b""
                conn.receive_data(data)
                continue
            if ev is eng.PAUSED:
                raise RuntimeError("SMTP engine paused without a pending event")
            if isinstance(ev, eng.ConnectionClosed):
                break
            if isinstance(ev, eng.Mail):
                reset()
                state["mail"] = ev
                conn.send_reply(None)
            elif isinstance(ev, eng.Rcpt):
                # RFC 3461 5.2.1: as Postfix's smtpd (which -bs runs), a recipient
                # without ORCPT gets "rfc822;" + the address as typed; the engine
                # still holds this command's line.
                state["rcpts"].append((ev, rcpt_orcpt(conn._line_text, ev.orcpt)))
                conn.send_reply(None)
            elif isinstance(ev, (eng.Data, eng.Bdat)):
                reply = start_data()
                if reply is not None:
                    conn.send_reply(reply)
                else:
                    conn.send_reply(None)
            elif isinstance(ev, eng.DataChunk):
                if state["conv"] is not None:
                    state["conv"].feed(ev.data)
            elif isinstance(ev, eng.DataEnd):
                reply = end_data(ev)
                state["mail"] = None
                state["rcpts"] = []
                conn.send_reply(reply)
            elif isinstance(ev, (eng.Rset, eng.Helo, eng.Ehlo)):
                reset()
                if ev.needs_reply:
                    conn.send_reply(None)
            elif isinstance(ev, (eng.Warning, eng.Info)):
                sm._log("warning" if isinstance(ev, eng.Warning) else "info", ev.text)
            elif isinstance(ev, eng.Etrn):
                # Postfix's smtpd in "sendmail -bs" mode refuses ETRN after its syntax
                # checks, with this warning and a reply without an enhanced code.
                sm._log("warning", 'do not use ETRN in "sendmail -bs" mode')
                conn.send_reply(Reply(458, "Unable to queue messages"))
            elif getattr(ev, "needs_reply", False):
                if isinstance(ev, (eng.StartTls, eng.Auth, eng.AuthResponse)):
                    conn.send_reply(Reply(502, "Error: command not implemented", "5.5.1"))
                else:
                    conn.send_reply(None)
        flush()
    except BrokenPipeError:
        pass
    finally:
        reset()
    return EX_OK


def newaliases(config, alias_database: str | None = None) -> int:
    """Build every indexed alias_database entry with the tables package's
    builder.  Postfix execs postalias for this, so diagnostics carry the
    "postalias:" prefix and a failure exits 1, as there."""
    if alias_database is not None:
        config = config.override({"alias_database": alias_database})
    if not (config.get("alias_database") or "").strip():
        return EX_OK

    def warn(text: str) -> None:
        sys.stderr.write(f"postalias: warning: {text}\n")

    from postwell import tables
    try:
        tables.newaliases_build(config, warn=warn)
    except Exception as exc:
        sys.stderr.write(f"postalias: fatal: {exc}\n")
        return 1
    return EX_OK


def _open_log(config):
    from postwell.log import MailLog
    try:
        return MailLog.from_config(config, "sendmail")
    except OSError:
        return None   # maillog_file belongs to mail_owner: stderr has to do


def main(argv: list[str] | None = None, *, prog: str | None = None) -> int:
    if prog is None:
        prog = os.path.basename(sys.argv[0] or "sendmail") or "sendmail"
        if prog not in ("sendmail", "mailq", "newaliases"):
            prog = "sendmail"
    args = sys.argv[1:] if argv is None else argv
    os.umask(0o022)
    _standard_fds_open()
    log = None
    previous = {sig: signal.signal(sig, _interrupted) for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            opts = parse_args(args, prog)
        except Fatal as f:
            hint = f.__cause__
            if isinstance(hint, _UsageHint):
                # Postfix runs getopt twice: the pre-scan complains about every
                # bad option, the real pass stops at the first one.
                said = getopt_complaints(args, prog)
                said += [f"{prog}: warning: {w}" for w in (hint.options.warnings
                                                          if hint.options else ())]
                sys.stderr.write("".join(f"{line}\n" for line in said + [str(hint)]))
            raise
        from postwell.config import load_config
        try:
            # main.cf only: a master.cf problem is the daemon's business, not a submitter's.
            config = load_config(opts.config_dir or os.environ.get("MAIL_CONFIG") or None, read_master=False)
        except Exception as exc:
            raise Fatal(EX_UNAVAILABLE, str(exc)) from None
        log = _open_log(config)
        return Sendmail(prog, opts, config, log).run()
    except Fatal as f:
        sys.stderr.write(f"{prog}: fatal: {f.text}\n")
        if log is not None:
            try:
                log.fatal(f.text)
            except Exception:
                pass
        # Postfix 3.7's sendmail exits EX_TEMPFAIL after every fatal error
        # (its run-time error handler exits before the status is used); the
        # intended status stays in f.status for callers of the library code.
        return EX_TEMPFAIL
    except (KeyboardInterrupt, _Interrupted):
        # The writer's abort() already removed any partial maildrop file.
        return EX_TEMPFAIL
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class _Interrupted(BaseException):
    """A terminating signal: unwinds through the maildrop writer's cleanup."""


def _interrupted(signum, frame):
    raise _Interrupted(signum)


def _standard_fds_open() -> None:
    """As Postfix: a closed stdin/stdout/stderr becomes /dev/null, so that no
    file we open later lands on descriptor 0, 1 or 2."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            nfd = os.open(os.devnull, os.O_RDWR)
            if nfd != fd:
                os.dup2(nfd, fd)
                os.close(nfd)


def newaliases_main(argv: list[str] | None = None) -> int:
    return main(argv, prog="newaliases")


if __name__ == "__main__":
    sys.exit(main())
