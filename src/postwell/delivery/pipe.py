"""pipe(8): delivery to an external command named in master.cf.

    maildrop unix - n n - - pipe flags=DRhu user=vmail argv=/usr/bin/maildrop -d ${recipient}

The service's attributes (flags=, user=, argv=, directory=, chroot=, eol=,
null_sender=, size=) come from master.cf, never from a delivery request.
Each argv element is expanded on its own and handed to execve(): no shell
ever sees envelope data.  An element that names a per-recipient macro
(${recipient}, ${user}, ...) becomes one element per recipient, as in
Postfix; set <transport>_destination_recipient_limit = 1 for one command per
recipient.

The command runs as the user= account.  Only root can switch to it: a qmgr
that runs as mail_owner hands the request to the root pipe helper
(delivery.pipe_helper), which calls this same agent; a process that is not
root can only run commands as itself and defers anything else.
"""

from __future__ import annotations

import asyncio
import grp
import os
import pwd
import re
import signal
import subprocess
import threading
import time
from dataclasses import dataclass

from .base import DeliveryAgent, DeliveryRequest, RecipientResult

try:  # start-up warnings name set-but-ignored parameters; these are honoured here
    from postwell.config.registry import register_implemented as _register
except ImportError:  # pragma: no cover
    def _register(*names):
        pass
_register("command_time_limit", "*_time_limit", "export_environment", "recipient_delimiter")

FLAG_CHARS = "BDFORXhqu.>"
OUTPUT_KEEP = 4096          # command output kept for logs and bounces (Postfix's VSTREAM_BUFSIZE)
DEFAULT_PATH = "/usr/bin:/bin"   # pipe_command() resets PATH to _PATH_DEFPATH
HEADER_SCAN_LIMIT = 1 << 20      # Delivered-To loop check reads at most this much header

# Macros Postfix's pipe(8) knows; the per-recipient ones expand once per recipient.
RECIPIENT_MACROS = {"recipient", "original_recipient", "user", "extension", "mailbox", "domain"}
MESSAGE_MACROS = {"sender", "nexthop", "size", "queue_id", "client_address", "client_hostname",
                  "client_helo", "client_protocol", "client_port", "sasl_method", "sasl_username",
                  "sasl_sender"}

# Delivery request attribute names (as the queue stores them) behind the client macros.
_ATTRIBUTE_SOURCES = {
    "client_address": ("client_address",),
    "client_hostname": ("client_name", "client_hostname"),
    "client_helo": ("helo_name", "client_helo"),
    "client_protocol": ("protocol_name", "protocol", "client_protocol"),
    "client_port": ("client_port",),
    "sasl_method": ("sasl_method",),
    "sasl_username": ("sasl_username",),
    "sasl_sender": ("sasl_sender",),
}


class PipeConfigError(Exception):
    """A master.cf pipe entry Postfix's pipe(8) would die on (text after "fatal: ")."""


@dataclass
class PipeAttributes:
    flags: str
    user: str
    uid: int
    gid: int
    argv: list
    directory: str | None = None
    chroot: str | None = None
    eol: bytes = b"\n"
    null_sender: str = "MAILER-DAEMON"
    size_limit: int = 0


_ESCAPES = {"a": 7, "b": 8, "f": 12, "n": 10, "r": 13, "t": 9, "v": 11, "\\": 92}


def unescape(text: str) -> bytes:
    """C-style escapes of eol= (\\n, \\r, \\ddd octal...)."""
    out = bytearray()
    i = 0
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text):
            n = text[i + 1]
            if n in _ESCAPES:
                out.append(_ESCAPES[n])
                i += 2
                continue
            m = re.match(r"[0-7]{1,3}", text[i + 1:])
            if m:
                out.append(int(m.group(0), 8) & 0xFF)
                i += 1 + len(m.group(0))
                continue
            out.extend(n.encode())
            i += 2
            continue
        out.extend(c.encode("utf-8", "surrogateescape"))
        i += 1
    return bytes(out)


def _strip_daemon_options(args: list) -> list:
    """master.cf words after the command: leading daemon options (-o name=value, -v...)
    come before the pipe attributes."""
    i = 0
    while i < len(args) and args[i].startswith("-"):
        i += 2 if args[i] in ("-o", "-t") else 1
    return list(args[i:])


def parse_attributes(args: list, *, mail_owner: str | None = None,
                     getpwnam=pwd.getpwnam, getgrnam=grp.getgrnam) -> PipeAttributes:
    """Parse a pipe service's master.cf attributes; PipeConfigError with
    Postfix's wording when pipe(8) would refuse to run.  ``mail_owner``:
    the account a command must never run as (checked when given)."""
    flags = ""
    user = group = None
    uid = gid = -1
    argv = None
    kw: dict = {}
    words = _strip_daemon_options(args)
    for k, word in enumerate(words):
        low = word.lower()
        if low.startswith("flags="):
            for ch in word[6:]:
                if ch not in FLAG_CHARS:
                    raise PipeConfigError(f"unknown flag: {ch} (ignored)")
                if ch not in flags:
                    flags += ch
        elif low.startswith("user="):
            user, _, group = word[5:].partition(":")
            try:
                pw = getpwnam(user)
            except KeyError:
                raise PipeConfigError(f"get_service_attr: unknown username: {user}") from None
            uid, gid = pw.pw_uid, pw.pw_gid
            if group:
                try:
                    gid = getgrnam(group).gr_gid
                except KeyError:
                    raise PipeConfigError(f"get_service_attr: unknown group: {group}") from None
        elif low.startswith("directory="):
            kw["directory"] = word[10:]
        elif low.startswith("chroot="):
            kw["chroot"] = word[7:]
        elif low.startswith("eol="):
            kw["eol"] = unescape(word[4:])
        elif low.startswith("null_sender="):
            kw["null_sender"] = word[12:]
        elif low.startswith("size="):
            text = word[5:]
            if not text.isdigit():
                raise PipeConfigError(f"get_service_attr: bad size= value: {text}")
            kw["size_limit"] = int(text)
        elif low.startswith("argv="):
            # argv= is the last attribute: everything after it is the command.
            argv = [word[5:], *words[k + 1:]]
            break
        else:
            raise PipeConfigError(f"unknown attribute name: {word}")
    if user is None:
        raise PipeConfigError("missing user= command-line attribute")
    if argv is None or not argv[0]:
        raise PipeConfigError("missing argv= command-line attribute")
    if uid == 0:
        raise PipeConfigError("user= command-line attribute specifies root privileges")
    if mail_owner:
        try:
            owner = getpwnam(mail_owner)
        except KeyError:
            owner = None
        if owner is not None and uid == owner.pw_uid:
            raise PipeConfigError(f"user= command-line attribute specifies mail system owner "
                                  f"{mail_owner}")
        if gid == 0:
            raise PipeConfigError("user= command-line attribute specifies privileged group id 0")
        if owner is not None and gid == owner.pw_gid:
            raise PipeConfigError(f"user= command-line attribute specifies mail system owner "
                                  f"{mail_owner} group id {gid}")
    elif gid == 0:
        raise PipeConfigError("user= command-line attribute specifies privileged group id 0")
    return PipeAttributes(flags=flags, user=user, uid=uid, gid=gid, argv=argv, **kw)


# ------------------------------------------------------------ macro expansion

_MACRO = re.compile(r"\$(?:\$|\{([^{}]*)\}|\(([^()]*)\)|([A-Za-z0-9_]+))")


def _macro_parts(spec: str) -> tuple[str, str | None, str | None]:
    """"name", "name?text" or "name:text" -> (name, op, text)."""
    m = re.match(r"\s*([A-Za-z0-9_]+)\s*(?:([?:])(.*))?$", spec, re.S)
    if not m:
        return spec, None, None
    return m.group(1), m.group(2), m.group(3)


def macro_names(word: str) -> list[str]:
    names = []
    for m in _MACRO.finditer(word):
        spec = m.group(1) if m.group(1) is not None else m.group(2) if m.group(2) is not None \
            else m.group(3)
        if spec is None:
            continue   # "$$"
        names.append(_macro_parts(spec)[0])
    return names


def expand_word(word: str, values: dict) -> str:
    """Replace $name, ${name}, $(name) and $$ in one argv element; the values
    are inserted literally (no recursive expansion: addresses may hold "$")."""
    def sub(m):
        if m.group(0) == "$$":
            return "$"
        spec = m.group(1) if m.group(1) is not None else m.group(2) if m.group(2) is not None \
            else m.group(3)
        name, op, text = _macro_parts(spec)
        value = values.get(name, "")
        if op == "?":
            return text.strip() if value else ""
        if op == ":":
            return value if value else text.strip()
        return value
    return _MACRO.sub(sub, word)


_ATOM_SPECIALS = set('()<>@,;:\\".[] \t')


def quote_local(address: str) -> str:
    """RFC 822 quoting of an address localpart (flag q); the domain is kept."""
    local, at, domain = address.rpartition("@")
    if not at:
        local, domain = address, ""
    words = local.split(".")
    plain = local and all(w and not any(c in _ATOM_SPECIALS or ord(c) < 32 or ord(c) == 127
                                        for c in w) for w in words)
    if not plain and local:
        local = '"' + local.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return local + (at + domain if at else "")


def _fold(address: str, flags: str) -> str:
    h, u = "h" in flags, "u" in flags
    if not (h or u):
        return address
    local, at, domain = address.rpartition("@")
    if not at:
        # No domain: "u" lowercases everything (Postfix's morph_recipient).
        return address.lower() if u else address
    if h and u:
        return address.lower()
    if h:
        return f"{local}@{domain.lower()}"
    return f"{local.lower()}@{domain}"


def morph(address: str, flags: str) -> str:
    """A command-line address per the q, h and u flags."""
    if "q" in flags:
        address = quote_local(address)
    return _fold(address, flags)


def split_extension(localpart: str, delimiters: str, double_bounce: str = "double-bounce") \
        -> tuple[str, str | None]:
    """(user, extension) as Postfix's split_addr(): never for postmaster,
    MAILER-DAEMON or the double-bounce user; owner-xxx and xxx-request stay
    whole when "-" is a delimiter."""
    if not delimiters:
        return localpart, None
    low = localpart.lower()
    if low in ("postmaster", "mailer-daemon", (double_bounce or "").lower()):
        return localpart, None
    if "-" in delimiters and (low.startswith("owner-") or low.endswith("-request")):
        return localpart, None
    for i, ch in enumerate(localpart):
        if ch in delimiters:
            return localpart[:i], localpart[i + 1:]
    return localpart, None


def expand_argv(template: list, request: DeliveryRequest, attrs: PipeAttributes, *,
                rcpt_delim: str = "", double_bounce: str = "double-bounce",
                warn=None) -> list[str] | None:
    """The command's argv for one delivery request, or None when it names an
    unknown macro (a configuration error: the mail is deferred)."""
    flags = attrs.flags
    sender = request.sender or attrs.null_sender
    if sender and "q" in flags:
        sender = quote_local(sender)   # a non-empty null_sender text is quoted too
    values = {
        "sender": sender,
        "nexthop": request.nexthop.lower() if "h" in flags else request.nexthop,
        "size": str(request.content_size),
        "queue_id": request.queue_id,
    }
    attributes = request.attributes or {}
    for name, sources in _ATTRIBUTE_SOURCES.items():
        values[name] = next((str(attributes[s]) for s in sources if attributes.get(s)), "")
    fold_only = "".join(c for c in flags if c in "hu")
    out = []
    for word in template:
        names = macro_names(word)
        unknown = [n for n in names if n not in RECIPIENT_MACROS and n not in MESSAGE_MACROS]
        if unknown:
            if warn:
                warn(unknown[0])
            return None
        if not any(n in RECIPIENT_MACROS for n in names):
            out.append(expand_word(word, values))
            continue
        for rc in request.recipients:
            per = dict(values)
            per["recipient"] = morph(rc.address, flags)
            per["original_recipient"] = morph(rc.orig or rc.address, flags)
            folded = _fold(rc.address, fold_only)
            local, at, domain = folded.rpartition("@")
            if not at:
                local, domain = folded, ""
            user, ext = split_extension(local, rcpt_delim, double_bounce)
            if "user" in names and not user:
                continue   # +bulletin@host: the argument is left out (cyrus global mailboxes)
            per["user"] = user
            per["extension"] = ext or ""
            per["mailbox"] = local
            per["domain"] = domain
            out.append(expand_word(word, per))
    return out


# ------------------------------------------------------------ message copy

def message_stream(chunks, *, flags: str, eol: bytes, sender: str, orig: str, delivered: str,
                   now: float | None = None):
    """The bytes the command reads (Postfix's mail_copy()): optional From_ line,
    Return-Path, X-Original-To and Delivered-To, then the message with each
    line ended by ``eol``; '>'/'.' quoting per the > and . flags; flag B
    appends a blank line.  Streams: memory stays bounded for any input."""
    head = []
    if "F" in flags:
        stamp = time.asctime(time.localtime(now if now is not None else time.time()))
        head.append(f"From {quote_local(sender) if sender else 'MAILER-DAEMON'}  {stamp}")
    if "R" in flags:
        head.append(f"Return-Path: <{quote_local(sender) if sender else ''}>")
    if "O" in flags and orig:
        head.append(f"X-Original-To: {quote_local(orig)}")
    if "D" in flags and delivered:
        head.append(f"Delivered-To: {quote_local(delivered)}")
    if head:
        yield b"".join(h.encode("utf-8", "surrogateescape") + eol for h in head)
    quote_from, dot = ">" in flags, "." in flags
    if not quote_from and not dot and eol == b"\n":
        last = b"\n"
        for chunk in chunks:
            if chunk:
                last = chunk[-1:]
                yield chunk
        if last != b"\n":
            yield b"\n"
    else:
        yield from _transform(chunks, quote_from, dot, eol)
    if "B" in flags:
        yield eol


def _transform(chunks, quote_from: bool, dot: bool, eol: bytes):
    pending = b""       # the start of a line too short yet to decide on quoting
    bol = True
    for chunk in chunks:
        data = pending + chunk if pending else chunk
        pending = b""
        out = bytearray()
        i, n = 0, len(data)
        while i < n:
            if bol:
                head = data[i:i + 5]
                if len(head) < 5 and b"\n" not in head:
                    pending = data[i:]
                    break
                if quote_from and head == b"From ":
                    out += b">"
                if dot and head[:1] == b".":
                    out += b"."
                bol = False
            j = data.find(b"\n", i)
            if j < 0:
                out += data[i:]
                i = n
            else:
                out += data[i:j]
                out += eol
                i = j + 1
                bol = True
        if out:
            yield bytes(out)
    if pending:
        prefix = b"." if dot and pending[:1] == b"." else b""
        yield prefix + pending + eol
    elif not bol:
        yield eol


def delivered_to_loop(chunks, address: str) -> bool:
    """Does the header already carry "Delivered-To: address" (case-blind)?"""
    want = address.strip().lower()
    seen = 0
    rest = b""
    for chunk in chunks:
        seen += len(chunk)
        data = rest + chunk
        lines = data.split(b"\n")
        rest = lines.pop()
        for line in lines:
            if not line.strip():
                return False            # end of the header section
            if line[:13].lower() == b"delivered-to:":
                value = line[13:].decode("utf-8", "replace").strip().lower()
                if value == want:
                    return True
        if seen > HEADER_SCAN_LIMIT or len(rest) > HEADER_SCAN_LIMIT:
            return False
    return False


# ------------------------------------------------------------ running the command

def printable_output(data: bytes) -> str:
    """Tabs and newlines become spaces, other unprintable characters "_"
    (Postfix: translit + printable)."""
    text = data.decode("utf-8", "replace")
    return "".join(" " if c in "\t\n" else c if c.isprintable() and c != "\ufffd" else "_"
                   for c in text)


def command_environment(export: list[str], environ=None) -> dict:
    environ = os.environ if environ is None else environ
    env = {"PATH": DEFAULT_PATH}
    for item in export:
        name, eq, value = item.partition("=")
        if eq:
            env[name] = value
        elif name in environ:
            env[name] = environ[name]
    return env


def _result(dsn: str, reason: str) -> tuple[str, str, str]:
    return ("sent" if dsn[0] == "2" else "deferred" if dsn[0] == "4" else "bounced"), dsn, reason


class Outcome(tuple):
    """A result tuple ((status, dsn, reason[, output])) that also carries the
    command's typed diagnostic (RFC 3464 2.3.6), Postfix's dsb_unix(): the
    notice's "Diagnostic-Code: x-unix; TEXT".  Unpacks as the plain tuple."""

    diag_type: str | None = None
    diag_text: str | None = None


def _outcome(items, diag_text: str | None = None) -> Outcome:
    out = Outcome(items)
    if diag_text is not None:
        out.diag_type, out.diag_text = "x-unix", diag_text
    return out


def _command_failure(dsn: str, reason: str, output: str, diag_text: str) -> Outcome:
    return _outcome((*_result(dsn, reason), output), diag_text)


def run_command(argv: list[str], stream, *, uid: int | None, gid: int | None, env: dict,
                cwd: str | None, chroot: str | None, time_limit: float,
                note=None) -> tuple[str, str, str, str]:
    """Run ``argv`` (as uid/gid when given: needs root), feed it ``stream``,
    and map the outcome as Postfix's pipe_command(); returns
    (status, dsn, reason, output) where reason is the failure text, as an
    Outcome whose diag_type/diag_text are set for a command's failure."""
    from .local_exec import EX_SOFTWARE_TEXT, SYSEXITS
    command = argv[0]
    kw: dict = {}
    if chroot:
        def enter():   # chroot first, then the user, then directory= (pipe(8) order)
            os.chroot(chroot)
            os.chdir("/")
            if gid is not None:
                os.setgroups([gid])
                os.setgid(gid)
            if uid is not None:
                os.setuid(uid)
            if cwd:
                os.chdir(cwd)
        kw["preexec_fn"] = enter
    else:
        if uid is not None:
            kw.update(user=uid, group=gid, extra_groups=[gid])
        kw["cwd"] = cwd or None
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, env=env, close_fds=True,
                                start_new_session=True, **kw)
    except subprocess.SubprocessError as exc:
        return (*_result("4.3.0", f"Delivery failed: {exc}"), "")
    except OSError as exc:
        # Postfix's child reports a failed execvp() on its output and exits
        # EX_TEMPFAIL ("temporary failure. Command output: ...").
        what = f"chdir {cwd}" if cwd and exc.filename == cwd else f"execvp {command}"
        output = f"pipe: fatal: pipe_command: {what}: {exc.strerror} "
        if note:
            note("fatal", f"pipe_command: {what}: {exc.strerror}")
        return _command_failure("4.3.0", f"temporary failure. Command output: {output}", output,
                                output)
    kept = bytearray()

    def drain():
        while True:
            b = proc.stdout.read(4096)
            if not b:
                return
            if len(kept) < OUTPUT_KEEP:
                kept.extend(b[:OUTPUT_KEEP - len(kept)])

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    timed_out = threading.Event()

    def kill():
        timed_out.set()
        try:
            os.killpg(proc.pid, signal.SIGKILL)   # the command and its offspring
        except OSError:
            pass

    timer = threading.Timer(max(0.0, time_limit), kill)
    timer.daemon = True
    timer.start()
    write_error = None
    try:
        try:
            for data in stream:
                proc.stdin.write(data)
            proc.stdin.close()
        except BrokenPipeError:
            pass   # a command may stop reading early: its exit status decides
        except (OSError, ValueError) as exc:
            write_error = exc
        status = proc.wait()
    finally:
        timer.cancel()
        try:
            proc.stdin.close()
        except (OSError, ValueError):
            pass
    reader.join(5)
    output = printable_output(bytes(kept))
    suffix = f". Command output: {output}" if output else ""
    # Postfix's pipe_command(): a failure's x-unix diagnostic is the command's
    # output, else the text for how it ended (as local_exec.op_command).
    if timed_out.is_set():
        if note:
            note("warning", "pipe_command_read: read time limit exceeded")
        return _command_failure("5.3.0", f"Command time limit exceeded: \"{command}\"{suffix}",
                                output, output or EX_SOFTWARE_TEXT)
    if status < 0:
        return _command_failure("4.3.0", f"Command died with signal {-status}: \"{command}\"{suffix}",
                                output, output or EX_SOFTWARE_TEXT)
    if status == 0:
        if write_error is not None:
            why = getattr(write_error, "strerror", None) or write_error
            return _outcome((*_result("4.3.0", f"Command failed: {why}: \"{command}\""), output))
        return _outcome(("sent", "2.0.0", "", output))
    # An enhanced status code opening the output (RFC 3463, then white space or
    # nothing) wins over the exit status and is the whole reason; a success
    # code counts as a plain failure (5.0.0), as Postfix's bounce_append()
    # ignores it.
    m = _OUTPUT_DSN.match(output)
    if m:
        dsn = m.group(1) if not m.group(1).startswith("2") else "5.0.0"
        if dsn != m.group(1) and note:
            note("warning", f"bounce_append: ignoring dsn code \"{m.group(1)}\"")
        return _command_failure(dsn, m.group(2), output, m.group(2))
    if status in SYSEXITS:
        dsn, text = SYSEXITS[status]
        return _command_failure(dsn, text + suffix, output, output or text)
    return _command_failure("5.3.0", f"Command died with status {status}: \"{command}\"{suffix}",
                            output, output or f"unknown mail system error {status}")


_OUTPUT_DSN = re.compile(r"([245]\.\d{1,3}\.\d{1,3})(?:\s+|$)(.*)", re.S)


# ------------------------------------------------------------ the agent

def _with_diag(res: RecipientResult, diag_type: str | None, diag_text: str | None) -> RecipientResult:
    if diag_type:
        # The qmgr's bounce/defer log keeps it for the notice (_diagnostic_of).
        res.diag_type, res.diag_text = diag_type, diag_text or ""
    return res


MAX_COMMANDS = 50        # commands running at once per process
_executor = None


def command_executor():
    """Threads that wait for commands: their own pool, so slow commands (up
    to command_time_limit each) never starve the default executor, which the
    qmgr uses for its fsync'd queue operations."""
    global _executor
    if _executor is None:
        from concurrent.futures import ThreadPoolExecutor
        _executor = ThreadPoolExecutor(max_workers=MAX_COMMANDS, thread_name_prefix="pipe")
    return _executor


def find_pipe_service(config, transport: str):
    for svc in getattr(config, "services", None) or []:
        if svc.name == transport and svc.type == "unix" and svc.command == "pipe":
            return svc
    return None


class PipeAgent(DeliveryAgent):
    """Delivers through the master.cf pipe service named by the request's transport."""

    name = "pipe"

    def __init__(self, config, log=None, clock=time.time, *, helper_socket: str | None = None,
                 euid=os.geteuid):
        super().__init__(config, log, clock)
        self.helper_socket = helper_socket     # None: the master's choice; "": never
        self.euid = euid
        self._helper = None
        self._attrs: dict = {}

    # -- configuration
    def _service_config(self, svc):
        return self.config.override(svc.overrides) if svc.overrides else self.config

    def attributes(self, transport: str) -> tuple[object, PipeAttributes]:
        svc = find_pipe_service(self.config, transport)
        if svc is None:
            raise PipeConfigError(f"no pipe service {transport} in master.cf")
        cached = self._attrs.get(transport)
        if cached is None:
            root = self.euid() == 0
            owner = self.config.get("mail_owner") if root else None
            cached = self._attrs[transport] = parse_attributes(svc.args, mail_owner=owner)
        return svc, cached

    def time_limit(self, transport: str, cfg=None) -> float:
        cfg = cfg or self.config
        name = f"{transport}_time_limit"
        try:
            if cfg.raw(name) is not None:
                return cfg.get_time(name)
        except (ValueError, KeyError):
            pass
        try:
            return cfg.get_time("command_time_limit")
        except (ValueError, KeyError):
            return 1000.0

    def _note(self, level: str, text: str) -> None:
        if self.log is not None:
            getattr(self.log, level)(text)

    def _warn(self, text: str) -> None:
        if self.log is not None:
            self.log.warning(text)

    # -- delivery
    def _helper_path(self) -> str | None:
        if self.helper_socket is not None:
            return self.helper_socket or None
        if self.euid() == 0:
            return None
        from . import pipe_helper
        return pipe_helper.HELPER_SOCKET

    async def deliver(self, request: DeliveryRequest) -> list[RecipientResult]:
        service = request.transport
        path = self._helper_path()
        if path:
            return await self._via_helper(path, request)
        outcome = await asyncio.get_running_loop().run_in_executor(command_executor(),
                                                                   self.deliver_blocking, request)
        status, dsn, reason = outcome
        return [_with_diag(RecipientResult(rc, status, dsn, reason, service),
                           getattr(outcome, "diag_type", None), getattr(outcome, "diag_text", None))
                for rc in request.recipients]

    async def _via_helper(self, path: str, request) -> list[RecipientResult]:
        from .pipe_helper import PipeHelperClient
        if self._helper is None or self._helper.path != path:
            self._helper = PipeHelperClient(path)
        try:
            rows = await self._helper.deliver(request)
        except (OSError, ConnectionError, ValueError) as exc:
            self._warn(f"pipe helper: {exc}")
            rows = []
        out = []
        for i, rc in enumerate(request.recipients):
            row = rows[i] if i < len(rows) else None
            if not row:
                # As Postfix's qmgr when the delivery agent cannot be reached.
                out.append(RecipientResult(rc, "deferred", "4.3.0", "mail transport unavailable",
                                           request.transport))
            else:
                # [status, dsn, reason] or, from a helper that passes the typed
                # diagnostic on, [status, dsn, reason, diag_type, diag_text].
                diag = (row[3], row[4]) if len(row) >= 5 and row[3] else (None, None)
                out.append(_with_diag(RecipientResult(rc, str(row[0]), str(row[1]), str(row[2]),
                                                      request.transport),
                                      *(None if x is None else str(x) for x in diag)))
        return out

    def deliver_blocking(self, request: DeliveryRequest) -> tuple[str, str, str]:
        """One delivery request -> (status, dsn, reason) shared by all its
        recipients: an Outcome, whose diag_type/diag_text a command's failure sets."""
        service = request.transport
        try:
            svc, attrs = self.attributes(service)
        except PipeConfigError as exc:
            if self.log is not None:
                self.log.fatal(str(exc))
            # Postfix's pipe(8) dies on these; the qmgr then defers the mail.
            return _result("4.3.0", "unknown mail transport error")
        cfg = self._service_config(svc)
        rcpts = request.recipients
        for flag, what in (("D", "D"), ("O", "O")):
            if flag in attrs.flags and len(rcpts) > 1:
                self._warn(f"pipe flag `{what}' requires {service}_destination_recipient_limit = 1")
                return _result("4.3.5", "mail system configuration error")
        if attrs.size_limit and request.content_size > attrs.size_limit:
            return _result("5.2.3", "message too large")
        if "D" in attrs.flags and delivered_to_loop(request.open_content(), rcpts[0].address):
            return _result("5.4.6", f"mail forwarding loop for {rcpts[0].address}")
        euid = self.euid()
        if euid != 0 and attrs.uid != euid:
            # Only root can become user=; refusing beats running as the wrong user.
            return _result("4.3.0", f"pipe service {service}: running a command as user "
                                    f"{attrs.user} requires root privileges")

        def unknown(name):
            self._warn(f"file {self.config.config_dir}/master.cf: service {service}: "
                       f"unknown macro name: \"{name}\"")
        argv = expand_argv(attrs.argv, request, attrs, rcpt_delim=cfg.get("recipient_delimiter"),
                           double_bounce=cfg.get("double_bounce_sender"), warn=unknown)
        if argv is None or not argv or not argv[0]:
            return _result("4.3.5", "mail system configuration error")
        sender = request.sender or attrs.null_sender
        stream = message_stream(request.open_content(), flags=attrs.flags, eol=attrs.eol,
                                sender=sender, orig=rcpts[0].orig or rcpts[0].address,
                                delivered=rcpts[0].address, now=self.clock())
        env = command_environment(cfg.get_list("export_environment"))
        ran = run_command(
            argv, stream, uid=attrs.uid if euid == 0 else None,
            gid=attrs.gid if euid == 0 else None, env=env,
            cwd=attrs.directory or cfg.get("queue_directory") or None, chroot=attrs.chroot,
            time_limit=self.time_limit(service, cfg), note=self._note)
        status, dsn, reason, output = ran
        if status == "sent":
            # Postfix 3.0+: some command output is reported after success too.
            output = output.strip()
            reason = f"delivered via {service} service" + (f" ({output})" if output else "")
        return _outcome((status, dsn, reason), getattr(ran, "diag_text", None))
