"""Delivery status notifications as RFC 3464 multipart/report messages.

One renderer for every kind Postfix's bounce daemon sends: non-delivery
("failure"), delay warnings ("delay") and success reports ("success"), each
either to the sender or as a postmaster copy.  The shape follows a real
Postfix 3.7 notice part for part (checked side by side, see
tests/test_dsn_reference.py):

1. ``text/plain`` "Notification": the bounce template text, then one
   ``<recipient>: reason`` paragraph per recipient, wrapped as Postfix wraps;
2. ``message/delivery-status`` "Delivery report" (RFC 3464 2.2, 2.3);
3. the original: ``message/rfc822`` (RET=FULL and no larger than
   bounce_size_limit) or ``text/rfc822-headers`` (RET=HDRS, too large, delay
   warnings, postmaster copies).

Per-message fields keep Postfix's ``X-Postfix-Queue-ID`` and
``X-Postfix-Sender`` extension fields (RFC 3464 2.4 allows "X-" fields):
log and bounce-parsing tools written for Postfix look for them, and the queue
id is the one in our logs too.

The notice is built in memory: its size is bounded by bounce_size_limit (the
full original is only attached when it is at most that big) plus the
original's header block, which cleanup already bounded by header_size_limit.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Callable, Iterable

from postwell.delivery.base import iter_lines

FAILURE, DELAY, SUCCESS = "failure", "delay", "success"

# Postfix's built-in templates (`postconf -t`): subject, postmaster subject, text.
_SIGNATURE = ["", "                   The mail system"]
TEMPLATES = {
    FAILURE: ("Undelivered Mail Returned to Sender", "Postmaster Copy: Undelivered Mail", [
        "This is the mail system at host $myhostname.",
        "",
        "I'm sorry to have to inform you that your message could not",
        "be delivered to one or more recipients. It's attached below.",
        "",
        "For further assistance, please send mail to postmaster.",
        "",
        "If you do so, please include this problem report. You can",
        "delete your own text from the attached returned message.",
    ] + _SIGNATURE),
    DELAY: ("Delayed Mail (still being retried)", "Postmaster Warning: Delayed Mail", [
        "This is the mail system at host $myhostname.",
        "",
        "####################################################################",
        "# THIS IS A WARNING ONLY.  YOU DO NOT NEED TO RESEND YOUR MESSAGE. #",
        "####################################################################",
        "",
        "Your message could not be delivered for more than $delay_warning_time_hours hour(s).",
        "It will be retried until it is $maximal_queue_lifetime_days day(s) old.",
        "",
        "For further assistance, please send mail to postmaster.",
        "",
        "If you do so, please include this problem report. You can",
        "delete your own text from the attached returned message.",
    ] + _SIGNATURE),
    SUCCESS: ("Successful Mail Delivery Report", "Successful Mail Delivery Report", [
        "This is the mail system at host $myhostname.",
        "",
        "Your message was successfully delivered to the destination(s)",
        "listed below. If the message was delivered to mailbox you will",
        "receive no further notifications. Otherwise you may still receive",
        "notifications of mail delivery errors from other systems.",
    ] + _SIGNATURE),
}

# Postfix's bounce daemon wraps long report lines at 79 columns with a
# 4-space continuation indent.
WRAP_LENGTH = 79
WRAP_INDENT = 4

# "host NAME[ADDR] said: REPLY (in reply to X command)" and friends, as the
# smtp/lmtp client words a server's reply.
_REMOTE_REPLY = re.compile(
    r"^host (?P<name>[^\s\[\]]+)\[(?P<addr>[^\]]*)\](?::\d+)? "
    r"(?:said|refused to talk to me|greeted me with): (?P<reply>.*?)"
    r"(?: \(in reply to [^()]*\))?$", re.S)
# A success report's "delivery via NAME[ADDR]:PORT: REPLY" (Postfix's trace text).
_REMOTE_SUCCESS = re.compile(
    r"^delivery via (?P<name>[^\s\[\]]+)\[(?P<addr>[^\]]*)\](?::\d+)?: (?P<reply>.*)$", re.S)


@dataclass
class DsnRecipient:
    address: str
    status: str = "5.0.0"            # RFC 3463 enhanced status code
    reason: str = ""                 # the text as logged in status=... (...)
    action: str = "failed"           # RFC 3464 2.3.3: failed delayed delivered relayed expanded
    orig: str | None = None          # original recipient before rewriting
    orcpt: str | None = None         # RFC 3461 ORCPT as received ("rfc822;addr")
    remote_mta: str | None = None    # overrides what the reason says


# Kept for callers of the first draft.
FailedRecipient = DsnRecipient


def wrap_line(text: str, length: int = WRAP_LENGTH, indent: int = WRAP_INDENT) -> list[str]:
    """Break at white space so no line is longer than ``length`` (indent
    included) unless one word is; continuation lines are indented."""
    out: list[str] = []
    words = text.split(" ")
    cur = ""
    cur_indent = 0
    for w in words:
        if not cur:
            cur = w
            continue
        if len(cur) + 1 + len(w) > length - cur_indent:
            out.append(" " * cur_indent + cur.rstrip())
            cur_indent = indent
            cur = w
        else:
            cur += " " + w
    out.append(" " * cur_indent + cur.rstrip())
    return out


def mail_date(when: float) -> str:
    """RFC 5322 3.3 date the way Postfix writes it (``+0000 (UTC)``)."""
    lt = time.localtime(when)
    off = lt.tm_gmtoff or 0
    sign = "+" if off >= 0 else "-"
    off = abs(off)
    zone = f"{sign}{off // 3600:02d}{(off % 3600) // 60:02d}"
    return f"{time.strftime('%a, %d %b %Y %H:%M:%S', lt)} {zone} ({lt.tm_zone or 'UTC'})"


def diagnostic(reason: str) -> tuple[str | None, str]:
    """(Remote-MTA host or None, Diagnostic-Code value) for a logged reason.

    A reply from a remote server is reported as ``smtp; <reply>`` with the
    server's name as Remote-MTA (RFC 3464 2.3.5, 2.3.6); anything else is
    our own text, typed ``X-Postfix`` as Postfix does."""
    m = _REMOTE_REPLY.match(reason) or _REMOTE_SUCCESS.match(reason)
    if m:
        return m.group("name"), f"smtp; {m.group('reply')}"
    return None, f"X-Postfix; {reason}"


def _quote_local(address: str) -> str:
    """RFC 5322 3.4.1: quote a local part that is not a dot-atom."""
    local, at, domain = address.rpartition("@")
    if not at:
        local, domain = address, ""
    specials = set('()<>@,;:\\".[] \t')
    if local and (any(not p for p in local.split(".")) or
                  any((c in specials and c != ".") or ord(c) < 33 for c in local)):
        local = '"' + local.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return f"{local}@{domain}" if at else local


def _original_recipient(r: DsnRecipient) -> str | None:
    # RFC 3464 2.3.1: only what the sender gave (ORCPT); Postfix's smtpd
    # records "rfc822;<RCPT TO address>" when the client sent none, and we
    # fall back to the original recipient the same way.
    if r.orcpt:
        if ";" in r.orcpt:
            return r.orcpt
        return f"rfc822; {r.orcpt}"
    if r.orig:
        return f"rfc822;{r.orig}"
    return None


def _header_block(chunks: Iterable[bytes]) -> Iterable[bytes]:
    for line in iter_lines(chunks):
        if line in (b"\n", b"\r\n"):
            return
        yield line if line.endswith(b"\n") else line + b"\n"


def render_notice(config, *, kind: str, queue_id: str, sender: str, arrival_time: float,
                  recipients: list[DsnRecipient], original: Callable[[], Iterable[bytes]],
                  content_size: int = 0, to: str | None = None, ret: str | None = None,
                  envid: str | None = None, postmaster: bool = False, full: bool | None = None,
                  now: float | None = None) -> bytes:
    """The notice as bytes with LF line ends, ready for cleanup.

    ``to`` is the notice's recipient (the sender unless a postmaster copy);
    ``full`` forces (True) or forbids (False) returning the whole original,
    otherwise RET and the kind decide; bounce_size_limit always applies.
    """
    now = time.time() if now is None else now
    hostname = config.get("myhostname")
    origin = config.get("myorigin") or hostname
    to = sender if to is None else to
    subject, pm_subject, text = TEMPLATES[kind]
    boundary = f"{queue_id}.{int(now)}/{hostname}"

    if full is None:
        # RET (RFC 3461 4.3) defaults differ as in Postfix: a failure returns
        # the message, a success report only its headers; delay warnings and
        # postmaster copies always carry headers only.
        if kind == FAILURE and not postmaster:
            full = (ret or "FULL").upper() != "HDRS"
        elif kind == SUCCESS:
            full = (ret or "").upper() == "FULL"
        else:
            full = False
    limit = _int(config, "bounce_size_limit", 50000)
    if full and content_size > limit:
        full = False     # Postfix: too large to return: headers only

    subst = {
        "myhostname": hostname,
        "delay_warning_time_hours": str(int(_time(config, "delay_warning_time", "h") // 3600)),
        "maximal_queue_lifetime_days": str(int(_time(config, "maximal_queue_lifetime", "d") // 86400)),
    }

    lines = [
        f"Date: {mail_date(now)}",
        f"From: Mail Delivery System <MAILER-DAEMON@{origin}>",
        f"Subject: {pm_subject if postmaster else subject}",
        f"To: {_quote_local(to)}",
        # RFC 3834 5: auto-replied for the sender, auto-generated for postmaster.
        f"Auto-Submitted: {'auto-generated' if postmaster else 'auto-replied'}",
        "MIME-Version: 1.0",
        "Content-Type: multipart/report; report-type=delivery-status;",   # RFC 6522
        f'\tboundary="{boundary}"',
        "Content-Transfer-Encoding: 8bit",
        "",
        "This is a MIME-encapsulated message.",
        "",
        f"--{boundary}",
        "Content-Description: Notification",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Transfer-Encoding: 8bit",
        "",
    ]
    if not postmaster:
        lines += [re.sub(r"\$(\w+)", lambda m: subst.get(m.group(1), m.group(0)), t) for t in text]
    for r in recipients:
        lines.append("")
        who = f"<{r.address}>"
        if r.orig and r.orig.lower() != r.address.lower():
            who += f" (expanded from <{r.orig}>)"
        lines += wrap_line(f"{who}: {r.reason}")
    lines += [
        "",
        f"--{boundary}",
        "Content-Description: Delivery report",
        "Content-Type: message/delivery-status",
        "",
        f"Reporting-MTA: dns; {hostname}",                      # RFC 3464 2.2.2
    ]
    if envid:
        lines.append(f"Original-Envelope-Id: {envid}")          # RFC 3464 2.2.1
    lines += [
        f"X-Postfix-Queue-ID: {queue_id}",
        f"X-Postfix-Sender: rfc822; {sender or 'MAILER-DAEMON@' + hostname}",
        f"Arrival-Date: {mail_date(arrival_time)}",              # RFC 3464 2.2.5
    ]
    retry_until = arrival_time + _time(config, "maximal_queue_lifetime", "d")
    for r in recipients:
        lines.append("")                                        # RFC 3464 2.1: blank line per block
        lines.append(f"Final-Recipient: rfc822; {r.address}")   # RFC 3464 2.3.2
        orcpt = _original_recipient(r)
        if orcpt:
            lines.append(f"Original-Recipient: {orcpt}")        # RFC 3464 2.3.1
        lines.append(f"Action: {r.action}")                     # RFC 3464 2.3.3
        lines.append(f"Status: {r.status}")                     # RFC 3464 2.3.4
        remote, code = diagnostic(r.reason)
        remote = r.remote_mta or remote
        if remote:
            lines.append(f"Remote-MTA: dns; {remote}")          # RFC 3464 2.3.5
        lines += wrap_line(f"Diagnostic-Code: {code}")          # RFC 3464 2.3.6
        if r.action == "delayed":
            lines.append(f"Will-Retry-Until: {mail_date(retry_until)}")  # RFC 3464 2.3.9
    prefix = "" if kind == SUCCESS else "Undelivered "
    lines += [
        "",
        f"--{boundary}",
        f"Content-Description: {prefix}{'Message' if full else 'Message Headers'}",
        f"Content-Type: {'message/rfc822' if full else 'text/rfc822-headers'}",  # RFC 6522 / 3462
        "Content-Transfer-Encoding: 8bit",
        "",
    ]
    out = bytearray(("\n".join(lines) + "\n").encode("utf-8", "surrogateescape"))
    if full:
        last = b"\n"
        for line in iter_lines(original()):
            out += line
            last = line
        if not last.endswith(b"\n"):
            out += b"\n"
    else:
        for line in _header_block(original()):
            out += line
    out += f"\n--{boundary}--\n".encode()
    return bytes(out)


def build_bounce(*, config, queue_id: str, sender: str, arrival_time: float,
                 recipients: list[DsnRecipient], original_content, notice_id: str = "",
                 now: float | None = None, ret: str | None = None, envid: str | None = None,
                 content_size: int = 0, **_ignored) -> bytes:
    """A non-delivery notice to the sender (first-draft entry point)."""
    return render_notice(config, kind=FAILURE, queue_id=queue_id, sender=sender,
                         arrival_time=arrival_time, recipients=recipients,
                         original=original_content, content_size=content_size, ret=ret,
                         envid=envid, now=now)


def _int(config, name: str, default: int) -> int:
    try:
        return config.get_int(name)
    except (ValueError, TypeError, KeyError):
        return default


def _time(config, name: str, unit: str) -> float:
    try:
        return config.get_time(name, unit)
    except Exception:
        return 0.0
