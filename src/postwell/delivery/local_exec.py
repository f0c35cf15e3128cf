"""The privileged half of local(8): everything that touches a user's files
or runs a user's command, each in a forked child that has become that user
before it opens any path.

The expansion logic in local.py never opens a user path itself; it calls
:func:`run_as` with one of the ``op_*`` functions below.  A child is forked
per operation, drops to the target uid/gid (setgroups, setgid, setuid: the
order matters, groups can only be changed while still root), runs the
operation and sends a small JSON result back through a pipe.  Postfix's
local does the same with seteuid() inside one process; a child per
operation keeps a failure (or a hostile .forward) from leaving the parent
with the wrong identity.

When the process is not root it can only act as itself: an operation for
another uid is refused with a clear reason instead of being attempted.
"""

from __future__ import annotations

from postwell.delivery.pipe import quote_local as _pipe_quote_local

import errno
import json
import os
import re
import signal
import stat
import subprocess
import threading
import time

from .virtual import Delivery, MailboxFull, deliver_maildir, deliver_mbox

# sysexits.h codes -> (dsn, text), as Postfix's sys_exits_detail().
SYSEXITS = {
    64: ("5.3.0", "command line usage error"),
    65: ("5.6.0", "data format error"),
    66: ("5.3.0", "cannot open input"),
    67: ("5.1.1", "user unknown"),
    68: ("5.1.2", "host name unknown"),
    69: ("5.3.0", "service unavailable"),
    70: ("5.3.0", "internal software error"),
    71: ("4.3.0", "system resource problem"),
    72: ("5.3.0", "critical OS file missing"),
    73: ("5.2.0", "can't create user output file"),
    74: ("5.3.0", "input/output error"),
    75: ("4.3.0", "temporary failure"),
    76: ("5.5.0", "remote error in protocol"),
    77: ("5.7.0", "permission denied"),
    78: ("5.3.5", "local configuration error"),
}

# Characters that make Postfix hand a command to /bin/sh -c instead of
# exec'ing it directly (exec_command.c): quoting, expansion, redirection...
SHELL_META = set("\"'`\\$;&()|<>*?[]{}~#=\n\r")
SHELL_BUILTINS = {"exec", "exit", "export", "read", "set", "test", "trap", "ulimit", "umask",
                  "unset", "wait", ".", ":", "cd", "eval", "shift", "source", "["}

MAX_READ = 1 << 20           # .forward / :include: files: bounded memory
OUTPUT_KEEP = 2048           # command output kept for the bounce text


class Identity:
    """Who an operation runs as (Postfix's USER_ATTR)."""

    __slots__ = ("uid", "gid", "name", "home", "shell", "groups")

    def __init__(self, uid, gid, name="", home="/", shell="/bin/sh", groups=None):
        self.uid, self.gid, self.name, self.home, self.shell = uid, gid, name, home, shell
        self.groups = groups if groups is not None else [gid]

    @classmethod
    def from_pwd(cls, pw) -> "Identity":
        return cls(pw.pw_uid, pw.pw_gid, pw.pw_name, pw.pw_dir, pw.pw_shell)

    def __repr__(self):
        return f"Identity({self.name or self.uid}:{self.gid})"


class NeedRoot(Exception):
    pass


def _drop(ident: Identity) -> None:
    # Groups first, then gid, then uid: after setuid() nothing else may change.
    os.setgroups(list(dict.fromkeys(ident.groups or [ident.gid])))
    os.setgid(ident.gid)
    os.setuid(ident.uid)
    if os.getuid() != ident.uid or os.geteuid() != ident.uid:
        raise OSError(errno.EPERM, "privilege drop failed")


def run_as(ident: Identity, func, *args):
    """Run ``func(*args)`` as ``ident``; returns its JSON-able result.

    Root: in a forked child that has dropped to ``ident``.  Not root: only
    for our own uid (directly), else :class:`NeedRoot`.
    """
    if os.geteuid() != 0:
        if ident.uid != os.geteuid():
            raise NeedRoot(f"delivery as uid {ident.uid} requires root privileges")
        return func(*args)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 0
        try:
            os.close(r)
            if ident.uid != 0 or ident.gid != 0:
                _drop(ident)
            res = func(*args)
        except BaseException as exc:  # the parent gets a reason, never a hang
            res = {"error": f"{type(exc).__name__}: {exc}"}
        try:
            data = json.dumps(res).encode()
            view = memoryview(data)
            while view:
                view = view[os.write(w, view):]
        except BaseException:
            code = 1
        os._exit(code)
    os.close(w)
    chunks = []
    with os.fdopen(r, "rb") as f:
        while True:
            b = f.read(65536)
            if not b:
                break
            chunks.append(b)
    _reap(pid)
    try:
        res = json.loads(b"".join(chunks))
    except ValueError:
        return {"error": "delivery child died unexpectedly"}
    return res


def _reap(pid: int) -> None:
    while True:
        try:
            os.waitpid(pid, 0)
            return
        except ChildProcessError:
            return
        except InterruptedError:
            continue


# ------------------------------------------------------------------ reading

def op_read_file(path: str, uid: int, checks: str) -> dict:
    """Read a .forward (checks="forward") or :include: (checks="include") file.

    Returns {"missing": True}, {"warn": text} (ignored file), {"bounce": text}
    or {"text": content, "owner": uid}.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return {"missing": True}
    except OSError as exc:
        if checks == "forward":
            return {"missing": True, "warn": f"cannot access file {path}: {exc.strerror}"}
        return {"defer": f"unable to lookup :include: file {path}: {exc.strerror}"}
    if checks == "forward":
        # local(8): ignore files that are not regular, owned by someone other than
        # the user or root, or world writable.
        if not stat.S_ISREG(st.st_mode):
            return {"warn": f"file {path} is not a regular file"}
        if st.st_uid not in (0, uid):
            return {"warn": f"file {path} has bad owner uid {st.st_uid}"}
        if st.st_mode & 0o002:
            return {"warn": f"file {path} is world writable"}
    else:
        if not stat.S_ISREG(st.st_mode):
            return {"bounce": f"file {path} is not a regular file"}
        if st.st_mode & 0o002:
            return {"bounce": f"file {path} is world writable"}
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        if checks == "forward":
            return {"warn": f"cannot open file {path}: {exc.strerror}"}
        return {"defer": f"cannot open include file {path}: {exc.strerror}"}
    try:
        fst = os.fstat(fd)
        if (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino):
            return {"warn": f"file {path} changed while opening"}
        data = os.read(fd, MAX_READ)
    finally:
        os.close(fd)
    return {"text": data.decode("utf-8", "surrogateescape"), "owner": st.st_uid}


def op_forward_lookup(home: str, paths: list[str], uid: int) -> dict:
    """As the user: check the home directory, then read the first existing
    forward_path file.  {"home_error": text} | {} (none) | op_read_file's
    answer plus "path"."""
    try:
        os.stat(home)
    except OSError as exc:
        return {"home_error": exc.strerror}
    for path in paths:
        res = op_read_file(path, uid, "forward")
        if res.get("missing"):
            continue   # lstat failed, whatever the reason: try the next name (dotforward.c)
        res["path"] = path
        return res
    return {}


# ------------------------------------------------------------------ writing

class LocalCopy(Delivery):
    """Delivery description with the header choices of local(8)'s mail_copy()."""

    def __init__(self, *, path, maildir, sender, recipient, orig, delivered, limit,
                 lock_methods, hostname, want_orig, want_delivered, want_return=True):
        super().__init__(path=path, maildir=maildir, uid=-1, gid=-1, sender=sender,
                         recipient=recipient, orig=orig, limit=limit, lock_methods=lock_methods,
                         hostname=hostname)
        self.delivered = delivered
        self.want_orig, self.want_delivered, self.want_return = want_orig, want_delivered, want_return

    def headers(self) -> bytes:
        # mail_copy() order: Return-Path, X-Original-To, Delivered-To.
        out = []
        if self.want_return:
            out.append(f"Return-Path: <{_quote_local(self.sender)}>\n")
        if self.want_orig and self.orig:
            out.append(f"X-Original-To: {self.orig}\n")
        if self.want_delivered and self.delivered:
            # As given (Postfix 3.7 does not fold it); loop checks compare case-blind.
            out.append(f"Delivered-To: {self.delivered}\n")
        return "".join(out).encode("utf-8", "surrogateescape")


def _mbox_dsn(err: OSError, default: str) -> str:
    # Postfix's mbox_dsn(): lock trouble and ESTALE are temporary, a full
    # disk too; quota errors are "mailbox full".
    if err.errno in (errno.EAGAIN, errno.ESTALE):
        return "4.2.0"
    if err.errno == errno.ENOSPC:
        return "4.3.0"
    if err.errno in (errno.EDQUOT, errno.EFBIG):
        return "5.2.2"
    return default


def _result(dsn: str, reason: str) -> dict:
    status = "sent" if dsn.startswith("2") else "bounced" if dsn.startswith("5") else "deferred"
    return {"status": status, "dsn": dsn, "reason": reason}


def op_mailbox(d: LocalCopy, user: str, uid: int, strict_owner: bool, chown_to, open_content) -> dict:
    """Mailbox delivery: mbox file or Maildir (path ending in "/")."""
    if d.maildir:
        try:
            deliver_maildir(d, open_content)
        except MailboxFull:
            return _result("5.2.2", "maildir delivery failed: error writing message: File too large")
        except OSError as exc:
            return _result(_mbox_dsn(exc, "4.2.0"),
                           f"maildir delivery failed: create maildir file {exc.filename or d.path}: "
                           f"{exc.strerror}")
        return _result("2.0.0", "delivered to maildir")
    prefix = f"cannot update mailbox {d.path} for user {user}. "
    try:
        try:
            st = os.lstat(d.path)
        except FileNotFoundError:
            st = None
            if chown_to is not None:
                # Root-only spool: create the file as root and hand it to the user.
                fd = os.open(d.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
                os.fchown(fd, *chown_to)
                os.close(fd)
        if st is not None:
            if stat.S_ISLNK(st.st_mode) or not stat.S_ISREG(st.st_mode):
                return _result("5.2.0", prefix + f"destination {d.path} is not a regular file")
            if strict_owner and st.st_uid != uid:
                # strict_mailbox_ownership: somebody else's file is never appended to.
                return _result("4.2.0", prefix + f"destination {d.path} is not owned by recipient")
        deliver_mbox(d, open_content)
    except MailboxFull:
        return _result("5.2.2", prefix + "error writing message: File too large")
    except OSError as exc:
        what = "unable to lock for exclusive access" if exc.errno == errno.EAGAIN else \
            f"cannot open file: {exc.strerror}" if exc.filename else f"error writing message: {exc.strerror}"
        if exc.errno == errno.EAGAIN:
            what += f": {exc.strerror}"
        return _result(_mbox_dsn(exc, "5.2.0"), prefix + what)
    return _result("2.0.0", "delivered to mailbox")


def op_file(d: LocalCopy, open_content) -> dict:
    """/file/name destination: mbox-style append (or Maildir for a trailing "/")."""
    if d.maildir:
        try:
            deliver_maildir(d, open_content)
        except MailboxFull:
            return _result("5.2.2", "maildir delivery failed: error writing message: File too large")
        except OSError as exc:
            return _result(_mbox_dsn(exc, "5.2.0"),
                           f"maildir delivery failed: create maildir file {exc.filename or d.path}: "
                           f"{exc.strerror}")
        return _result("2.0.0", "delivered to maildir")
    prefix = f"cannot append message to file {d.path}: "
    try:
        st = os.stat(d.path)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        return _result(_mbox_dsn(exc, "5.2.0"), prefix + f"cannot open file: {exc.strerror}")
    if st is not None and stat.S_ISCHR(st.st_mode):
        # /dev/null and friends: written through, nothing to lock or truncate.
        try:
            fd = os.open(d.path, os.O_WRONLY)
            try:
                for chunk in open_content():
                    os.write(fd, chunk)
            finally:
                os.close(fd)
        except OSError as exc:
            return _result(_mbox_dsn(exc, "5.2.0"), prefix + f"error writing message: {exc.strerror}")
        return _result("2.0.0", f"delivered to file: {d.path}")
    if st is not None and not stat.S_ISREG(st.st_mode):
        return _result("5.2.0", prefix + f"destination {d.path} is not a regular file")
    try:
        deliver_mbox(d, open_content)
    except MailboxFull:
        return _result("5.2.2", prefix + "error writing message: File too large")
    except OSError as exc:
        return _result(_mbox_dsn(exc, "5.2.0"), prefix + f"cannot open file: {exc.strerror}")
    return _result("2.0.0", f"delivered to file: {d.path}")


def command_argv(command: str, shell: str = "") -> list[str]:
    """Postfix's exec_command(): exec directly unless the command needs a shell."""
    if shell:   # local_command_shell, e.g. "/some/where/smrsh -c": used for every command
        return [*shell.split(), command]
    words = command.split()
    if not words or any(c in SHELL_META for c in command) or words[0] in SHELL_BUILTINS:
        return ["/bin/sh", "-c", command]
    return words


def _printable(data: bytes) -> str:
    # Line breaks and tabs become spaces (so "text\n" ends in a blank, as in
    # Postfix's log), anything else unprintable becomes "_".
    text = data.decode("utf-8", "replace")
    return "".join(c if c.isprintable() else " " if c in "\n\t\r" else "_" for c in text)


def op_command(command: str, env: dict, cwd: str, time_limit: float, shell: str, copy: LocalCopy,
               open_content) -> dict:
    """Pipe the message into ``command``; map its exit status per sysexits.

    Envelope data only reaches the command through ``env``: the command
    line is the administrator's or user's own text, never mixed with it.
    """
    argv = command_argv(command, shell)
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, env=env, cwd=cwd, close_fds=True,
                                start_new_session=True)
    except OSError as exc:
        return _result("4.3.0", f"Command failed: {exc.strerror}: \"{command}\"")
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
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass

    timer = threading.Timer(time_limit, kill)
    timer.daemon = True
    timer.start()
    try:
        # From_ line and delivery headers, then the message; no >From quoting
        # and no trailing blank line for commands (local(8) EXTERNAL COMMAND DELIVERY).
        sender = copy.sender or "MAILER-DAEMON"
        head = f"From {sender}  {time.asctime()}\n".encode("utf-8", "surrogateescape") + copy.headers()
        try:
            proc.stdin.write(head)
            for chunk in open_content():
                proc.stdin.write(chunk)
            proc.stdin.close()
        except (BrokenPipeError, ValueError, OSError):
            pass   # a command may stop reading early; its exit status decides
        status = proc.wait()
    finally:
        timer.cancel()
    reader.join(5)
    output = _printable(bytes(kept))
    suffix = f". Command output: {output}" if output else ""
    if timed_out.is_set():
        return _result("5.3.0", f"Command time limit exceeded: \"{command}\"{suffix}")
    if status == 0:
        return _result("2.0.0", f"delivered to command: {command}")
    if status < 0:
        return _result("4.3.0", f"Command died with signal {-status}: \"{command}\"{suffix}")
    # An enhanced status code at the start of the output wins over the exit status.
    m = re.match(r"([245])\.(\d{1,3})\.(\d{1,3})\b\s*(.*)", output)
    if m and m.group(1) != "2":
        dsn = f"{m.group(1)}.{m.group(2)}.{m.group(3)}"
        text = m.group(4) or SYSEXITS.get(status, ("", "unknown"))[1]
        return _result(dsn, text)
    if status in SYSEXITS:
        dsn, text = SYSEXITS[status]
        return _result(dsn, text + suffix)
    return _result("5.3.0", f"Command died with status {status}: \"{command}\"{suffix}")


def _quote_local(address: str) -> str:
    """Return-Path carries the sender in RFC 822 form, as Postfix's mail_copy() writes it."""
    return _pipe_quote_local(address) if address else address
