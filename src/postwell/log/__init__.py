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

import os
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
                 clock=time.time) -> None:
        self.service = service
        self.syslog_name = syslog_name
        self.program = f"{syslog_name}/{service}" if service else syslog_name
        self.maillog_file = maillog_file
        self.hostname = (hostname or socket.gethostname()).split(".")[0]
        self.also_stderr = also_stderr
        self.clock = clock
        self._fd: int | None = None
        self._syslog = None
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
        return cls(service,
                   syslog_name=config.get("syslog_name") or "postfix",
                   maillog_file=config.get("maillog_file"),
                   hostname=config.get("myhostname"),
                   syslog_facility=config.get("syslog_facility") or "mail", **kw)

    def reopen(self) -> None:
        """Re-open maillog_file (after log rotation or a config reload)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = os.open(self.maillog_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    _stamp_second: int | None = None
    _stamp = ""

    def format_line(self, text: str) -> str:
        # The stamp has one-second resolution: format it once per second, not per line;
        # the "host program[pid]:" part changes only with the process.
        now = int(self.clock())
        if now != self._stamp_second:
            self._stamp = time.strftime("%b %d %H:%M:%S", time.localtime(now))
            self._stamp_second = now
        key = (_my_pid, self.hostname, self.program)
        if key != self._tag_key:
            self._tag = f" {self.hostname} {self.program}[{_my_pid}]: "
            self._tag_key = key
        return f"{self._stamp}{self._tag}{text}\n"

    _tag_key: tuple = ()
    _tag = ""

    def _emit(self, priority: int, text: str, label: str = "") -> None:
        # Never let control characters from the network break the line shape, and cut
        # each record where Postfix's logger does: the text after the severity label.
        text = label + sanitize(text[:LOG_RECORD_LIMIT])
        if self._fd is not None:
            line = self.format_line(text).encode("utf-8", "surrogateescape")
            try:
                os.write(self._fd, line)
            except OSError:
                pass
        elif self._syslog is not None:
            self._syslog.syslog(priority, text)
        if self.also_stderr:
            sys.stderr.write(f"{self.program}: {text}\n")

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


def sanitize(text: str) -> str:
    """Replace control characters (CR, LF, NUL...) as Postfix's printable() does."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else "?" for c in text)


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
            self.lines.append(label + sanitize(text))

    def reopen(self) -> None:
        pass

    def close(self) -> None:
        pass
