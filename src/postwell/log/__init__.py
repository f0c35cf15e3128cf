"""Postfix-shaped logging.

Every process logs through one :class:`MailLog`.  A line looks exactly as
Postfix's postlogd / syslog writes it, so pflogsumm-style tools parse it::

    Nov 29 06:11:14 mx postfix/smtpd[4242]: connect from localhost[127.0.0.1]

The program part is ``$syslog_name/<service>`` (syslog_name defaults to
``postfix`` for log-tool compatibility; see docs/architecture.md).

Destinations: ``maillog_file`` when set (opened O_APPEND; each line is one
write(2) so concurrent processes never interleave inside a line), otherwise
syslog facility ``$syslog_facility``.  ``/dev/stdout`` and ``/dev/stderr``
work too, as with Postfix.
"""

from __future__ import annotations

import codecs
import os
import re
import socket
import sys
import time
from typing import TextIO

LOG_RECORD_LIMIT = 2000   # characters of one log record's text, as Postfix's msg_vprintf

_SYSLOG_FACILITIES = {
    "mail": 2 << 3, "daemon": 3 << 3, "user": 1 << 3, "auth": 4 << 3,
    **{f"local{i}": (16 + i) << 3 for i in range(8)},
}


class MailLog:
    """A process's logger.  Cheap to create; not shared across fork()."""

    def __init__(self, service: str = "postwell", *, syslog_name: str = "postfix",
                 maillog_file: str = "", hostname: str | None = None,
                 syslog_facility: str = "mail", also_stderr: bool = False,
                 clock=time.time, utf8: bool = True) -> None:
        self.service = service
        self.utf8 = utf8
        self.syslog_name = syslog_name
        self.program = f"{syslog_name}/{service}" if service else syslog_name
        self.maillog_file = maillog_file
        self.hostname = (hostname or socket.gethostname()).split(".")[0]
        self.also_stderr = also_stderr
        self.clock = clock
        self._fd: int | None = None
        self._syslog = None
        # Follow a rotated maillog_file (postfix logrotate renames it): the master
        # re-opens its own log at the reload logrotate sends, so its "reload" line
        # stays in the rotated file as Postfix's does; /dev/stdout is never rotated.
        self._follow = bool(maillog_file) and not maillog_file.startswith("/dev/") \
            and service != "master"
        self._checked = 0
        self._facility = _SYSLOG_FACILITIES.get(syslog_facility, 2 << 3)
        if maillog_file:
            self._fd = os.open(maillog_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        else:
            import syslog
            self._syslog = syslog
            syslog.openlog(self.program, syslog.LOG_PID, self._facility)

    @classmethod
    def from_config(cls, config, service: str, **kw) -> "MailLog":
        """Build from a :class:`postwell.config.Config`."""
        kw.setdefault("utf8", _utf8_enabled(config))
        return cls(service,
                   syslog_name=config.get("syslog_name") or "postfix",
                   maillog_file=config.get("maillog_file"),
                   hostname=config.get("myhostname"),
                   syslog_facility=config.get("syslog_facility") or "mail", **kw)

    def reopen(self) -> None:
        """Re-open maillog_file (after log rotation or a config reload); the old
        file stays in use when the path cannot be opened."""
        if self._fd is not None:
            try:
                self._replace_fd(os.O_WRONLY | os.O_APPEND | os.O_CREAT)
            except OSError:
                pass

    def _replace_fd(self, flags: int) -> None:
        # dup2 swaps the file under the same descriptor number in one step: a
        # thread writing meanwhile reaches the old or the new file, never a
        # closed (or re-used) descriptor.
        new = os.open(self.maillog_file, flags | os.O_CLOEXEC, 0o644)
        try:
            os.dup2(new, self._fd, inheritable=False)
        finally:
            os.close(new)

    def _follow_rotation(self) -> None:
        """Once a second: has maillog_file been renamed away (postfix logrotate)?
        Then write to the file now at that path.  A lost path is created again
        only by an unprivileged process: a root-owned log would lock the
        mail_owner daemons out (postfix logrotate creates it with their owner)."""
        fd = self._fd
        if fd is None:
            return
        try:
            st = os.stat(self.maillog_file)
        except FileNotFoundError:
            st = None
        except OSError:
            return
        try:
            if st is not None:
                mine = os.fstat(fd)
                if (st.st_ino, st.st_dev) == (mine.st_ino, mine.st_dev):
                    return
                self._replace_fd(os.O_WRONLY | os.O_APPEND)
            elif os.geteuid() != 0:
                self._replace_fd(os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        except OSError:
            pass    # keep writing where we were; tried again in a second

    # (second, its text) and ((pid, host, program), its tag): each a single
    # attribute, read once per line, so a thread never pairs one second's key
    # with another second's text (two attributes could be seen half-updated).
    _stamp: tuple = (None, "")
    _tag: tuple = ((), "")
    _follow = False
    _checked = 0

    def format_line(self, text: str) -> str:
        # The stamp has one-second resolution: format it once per second, not per line;
        # the "host program[pid]:" part changes only with the process.
        now = int(self.clock())
        stamp = self._stamp
        if stamp[0] != now:
            stamp = self._stamp = (now, time.strftime("%b %d %H:%M:%S", time.localtime(now)))
        key = (_my_pid, self.hostname, self.program)
        tag = self._tag
        if tag[0] != key:
            tag = self._tag = (key, f" {self.hostname} {self.program}[{_my_pid}]: ")
        return f"{stamp[1]}{tag[1]}{text}\n"

    def _emit(self, priority: int, text: str, label: str = "") -> None:
        # Never let control characters from the network break the line shape, and cut
        # each record where Postfix's logger does: the text after the severity label.
        text = label + sanitize(text[:LOG_RECORD_LIMIT], self.utf8)
        if self._fd is not None:
            if self._follow:
                # the wall clock, not an injected one: rotation happens in real time
                now = int(time.time())
                if now != self._checked:
                    self._checked = now
                    self._follow_rotation()
            line = self.format_line(text).encode("utf-8", "surrogateescape")
            try:
                os.write(self._fd, line)
            except OSError:
                pass
        elif self._syslog is not None:
            try:
                self._syslog.syslog(priority, text)
            except UnicodeEncodeError:
                # Python's syslog() takes UTF-8 text only: a client's raw bytes that
                # printable() keeps (a lead byte with its continuation bytes) cannot
                # pass as they are, so they go as U+FFFD.
                self._syslog.syslog(priority, text.encode("utf-8", "surrogateescape")
                                    .decode("utf-8", "replace"))
        if self.also_stderr:
            sys.stderr.write(f"{self.program}: {text}\n")

    utf8 = True     # smtputf8_enable: what sanitize() keeps of non-ASCII text

    def info(self, text: str) -> None:
        self._emit(6, text)

    def warning(self, text: str) -> None:
        self._emit(4, text, "warning: ")

    def error(self, text: str) -> None:
        self._emit(3, text, "error: ")

    def fatal(self, text: str) -> None:
        self._emit(2, text, "fatal: ")

    def panic(self, text: str) -> None:
        self._emit(0, text, "panic: ")

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


# os.getpid() is a system call; log lines need it often (reset in every forked child).
_my_pid = os.getpid()


def _reset_pid() -> None:
    global _my_pid
    _my_pid = os.getpid()


os.register_at_fork(after_in_child=_reset_pid)


def _utf8_enabled(config) -> bool:
    try:
        return config.get_bool("smtputf8_enable")
    except Exception:   # noqa: BLE001 - a bad value: Postfix's default since level 1
        return True


def _raw_bytes(exc: UnicodeEncodeError):
    """Encode error handler: a client's undecodable byte (surrogate escape) as that
    byte, any other lone surrogate as its UTF-8 form, so every string has bytes."""
    out = bytearray()
    for ch in exc.object[exc.start:exc.end]:
        o = ord(ch)
        out += bytes((o - 0xDC00,)) if 0xDC80 <= o <= 0xDCFF else ch.encode("utf-8",
                                                                           "surrogatepass")
    return bytes(out), exc.end


codecs.register_error("postwell.rawbytes", _raw_bytes)

_ASCII_CONTROLS = {**{i: "?" for i in range(0x20)}, 0x7F: "?"}
# Postfix 3.7's printable() with util_utf8_enable (smtputf8_enable = yes): a byte
# 0xC2-0xFE followed by continuation bytes is kept with all of them, whether or not
# the sequence is valid UTF-8 (over-long, surrogate, beyond U+10FFFF, too short);
# any other byte outside printable ASCII becomes '?'.  Checked against 3.7.
_UTF8_RUN_OR_BAD = re.compile(rb"[\xc2-\xfe][\x80-\xbf]+|([^\x20-\x7e])")
_NOT_PRINTABLE_ASCII = re.compile(rb"[^\x20-\x7e]")


def _utf8_run_or_mark(m: re.Match) -> bytes:
    return b"?" if m.group(1) is not None else m.group(0)


def sanitize(text: str, utf8: bool = True) -> str:
    """Postfix's printable(text, '?'), applied to every log record: ASCII controls
    become '?'; with ``utf8`` (smtputf8_enable = yes) text in UTF-8 shape stays as
    it is, else each byte >= 0x80 becomes '?'.  Bytes a client sent that were no
    UTF-8 travel in ``text`` as surrogate escapes and are judged as those bytes."""
    if text.isascii():
        if text.isprintable():
            return text
        return text.translate(_ASCII_CONTROLS)
    data = text.encode("utf-8", "postwell.rawbytes")
    if utf8:
        data = _UTF8_RUN_OR_BAD.sub(_utf8_run_or_mark, data)
    else:
        data = _NOT_PRINTABLE_ASCII.sub(b"?", data)
    return data.decode("utf-8", "surrogateescape")


_null: MailLog | None = None


class NullLog(MailLog):
    """A logger that drops everything (unit tests) or keeps lines in memory."""

    def __init__(self, service: str = "test", keep: bool = True) -> None:  # noqa: D401
        self.service = service
        self.program = f"postfix/{service}"
        self.lines: list[str] = []
        self.keep = keep
        self.also_stderr = False
        self._fd = None
        self._syslog = None

    def _emit(self, priority: int, text: str, label: str = "") -> None:
        if self.keep:
            self.lines.append(label + sanitize(text, self.utf8))

    def reopen(self) -> None:
        pass

    def close(self) -> None:
        pass
