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

import os
import re
import time
from dataclasses import dataclass
from typing import Callable, Iterable

# At module level: the master preloads postwell's modules (not postwell.cli's) before
# the qmgr drops privileges, and bounce(5) template parsing lives with postconf -t.
from postwell.cli import bounce_templates as _bt
from postwell.delivery.base import iter_lines
from postwell.policy.restrictions import log_address

from .orcpt import is_utf8_address as _utf8_address

FAILURE, DELAY, SUCCESS = "failure", "delay", "success"
VERIFY = "verify"        # sendmail -bv's "Mail Delivery Status Report" (verify_template)

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
    # "Protocol error: " (a reply out of place) still names the host (Postfix 3.7).
    r"^(?:Protocol error: )?host (?P<name>[^\s\[\]]+)\[(?P<addr>[^\]]*)\](?::\d+)? "
    r"(?:said|refused to talk to me|greeted me with): (?P<reply>.*?)"
    r"(?: \(in reply to [^()]*\))?$", re.S)
# A success report's "delivery via NAME[ADDR]:PORT: REPLY" (Postfix's trace text).
_REMOTE_SUCCESS = re.compile(
    r"^delivery via (?P<name>[^\s\[\]]+)\[(?P<addr>[^\]]*)\](?::\d+)?: (?P<reply>.*)$", re.S)


# pipe_command()'s failures (local |command, mailbox_command, pipe(8)): Postfix reports
# the command's output, or else a text for the exit status, as an x-unix diagnostic
# (checked side by side with Postfix 3.7: a sysexits status gives its sysexits text,
# another status "unknown mail system error N", a signal or the time limit EX_SOFTWARE's
# "internal software error").  The agent says so itself when it can (diag_type and
# diag_text of its result); these patterns read the same facts back from a logged reason
# for results that do not carry them.
SYSEXITS_TEXTS = frozenset((
    "command line usage error", "data format error", "cannot open input", "user unknown",
    "host name unknown", "service unavailable", "internal software error",
    "system resource problem", "critical OS file missing", "can't create user output file",
    "input/output error", "temporary failure", "remote error in protocol",
    "permission denied", "local configuration error"))
_SYSEXITS_TEXT = "|".join(re.escape(t) for t in sorted(SYSEXITS_TEXTS))
_EX_SOFTWARE_TEXT = "internal software error"
_COMMAND_FAILURE = re.compile(
    r'^(?:Command died with (?:status (?P<status>\d+)|(?P<signal>signal) \d+): ".*?"'
    r'|(?P<timeout>Command time limit exceeded): ".*?"'
    r"|(?P<sysexit>" + _SYSEXITS_TEXT + r")(?=\. Command output: ))"
    r"(?:\. Command output: (?P<output>.*))?$", re.S)


# mail_copy() (mailbox, /file, Maildir of local and virtual) reports its read and
# write errors with the EX_IOERR text as the x-unix diagnostic, whatever the errno.
_COPY_ERROR = re.compile(r"(?:^|[.:] )error (?:writing|reading) message: ")


@dataclass
class DsnRecipient:
    address: str
    status: str = "5.0.0"            # RFC 3463 enhanced status code
    reason: str = ""                 # the text as logged in status=... (...)
    action: str = "failed"           # RFC 3464 2.3.3: failed delayed delivered relayed expanded
    orig: str | None = None          # original recipient before rewriting
    orcpt: str | None = None         # RFC 3461 ORCPT as received ("rfc822;addr")
    remote_mta: str | None = None    # overrides what the reason says
    # RFC 3464 2.3.6 diagnostic as the delivery agent typed it (Postfix's bounce log
    # diag_type/diag_text: "x-unix" for commands and files); None: read from reason.
    diag_type: str | None = None
    diag_text: str | None = None


# Kept for callers of the first draft.
FailedRecipient = DsnRecipient


def _octets(text: str) -> int:
    if text.isascii():
        return len(text)
    try:
        return len(text.encode("utf-8", "surrogateescape"))
    except UnicodeEncodeError:
        return len(text.encode("utf-8", "surrogatepass"))


def wrap_line(text: str, length: int = WRAP_LENGTH, indent: int = WRAP_INDENT) -> list[str]:
    """Break at white space so no line is longer than ``length`` octets (indent
    included) unless one word is; continuation lines are indented.  Octets, not
    characters, as Postfix's line_wrap() counts them (UTF-8 text wraps earlier)."""
    out: list[str] = []
    words = text.split(" ")
    cur = ""
    cur_len = 0
    cur_indent = 0
    for w in words:
        w_len = _octets(w)
        if not cur:
            cur, cur_len = w, w_len
            continue
        if cur_len + 1 + w_len > length - cur_indent:
            out.append(" " * cur_indent + cur.rstrip())
            cur_indent = indent
            cur, cur_len = w, w_len
        else:
            cur += " " + w
            cur_len += 1 + w_len
    out.append(" " * cur_indent + cur.rstrip())
    return out


def mail_date(when: float) -> str:
    """RFC 5322 3.3 date the way Postfix's mail_date() writes it: the day of the
    month padded with a space (``Fri,  4 Dec 2026``, seen in Postfix 3.7's
    Will-Retry-Until), ``+0000 (UTC)``."""
    lt = time.localtime(when)
    off = lt.tm_gmtoff or 0
    sign = "+" if off >= 0 else "-"
    off = abs(off)
    zone = f"{sign}{off // 3600:02d}{(off % 3600) // 60:02d}"
    day = time.strftime("%a", lt)
    rest = time.strftime("%b %Y %H:%M:%S", lt)
    return f"{day}, {lt.tm_mday:2d} {rest} {zone} ({lt.tm_zone or 'UTC'})"


def diagnostic(reason: str, diag_type: str | None = None,
               diag_text: str | None = None) -> tuple[str | None, str | None]:
    """(Remote-MTA host or None, Diagnostic-Code value) for a logged reason.

    A reply from a remote server is reported as ``smtp; <reply>`` with the
    server's name as Remote-MTA (RFC 3464 2.3.5, 2.3.6).  A diagnostic the
    agent typed itself (``diag_type``) is used as given; one with no text falls
    back to the reason, as Postfix's bounce daemon does.  Anything else is our
    own text, typed ``X-Postfix`` as Postfix does."""
    m = _REMOTE_REPLY.match(reason) or _REMOTE_SUCCESS.match(reason)
    remote = m.group("name") if m else None
    if diag_type:
        text = (diag_text or "").strip()
        if text:
            return remote, f"{diag_type}; {text}"
        return remote, f"X-Postfix; {reason.strip() or _NO_REASON}"
    if m:
        return remote, f"smtp; {m.group('reply')}"
    if _COPY_ERROR.search(reason):
        return None, "x-unix; input/output error"
    m = _COMMAND_FAILURE.match(reason)
    if m:
        text = (m.group("output") or m.group("sysexit") or "").strip()
        if not text:
            # sys_exits_detail() names an exit status outside sysexits.h this way.
            text = (f"unknown mail system error {m.group('status')}" if m.group("status")
                    else _EX_SOFTWARE_TEXT)
        return None, f"x-unix; {text}"
    return None, f"X-Postfix; {reason.strip() or _NO_REASON}"


def command_diagnostic(reason: str) -> tuple[str, str] | None:
    """(diag_type, diag_text) for a reason a command's result gives as a bare
    sysexits text ("user unknown": exit 67 without output), which only the
    agent that ran the command can tell from the same words of another
    agent; None for any other reason."""
    text = reason.strip()
    return ("x-unix", text) if text in SYSEXITS_TEXTS else None


# What Postfix's bounce_log_read() shows for an empty reason.
_NO_REASON = "(description unavailable)"


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


def _original_recipient(r: DsnRecipient, smtputf8: bool = False) -> str | None:
    # RFC 3464 2.3.1: only what the sender gave (ORCPT); Postfix's smtpd
    # records "rfc822;<RCPT TO address as written>" when the client sent none,
    # and we fall back to the original recipient the same way.
    if r.orcpt:
        if ";" in r.orcpt:
            return r.orcpt
        return f"rfc822; {r.orcpt}"
    if r.orig:
        # Postfix's bounce daemon types a recipient without a dsn_orig_rcpt record
        # with a blank ("rfc822; addr"), but its cleanup gives every smtpd, pickup
        # and local(8) recipient one ("rfc822;addr"), which is what this stands in
        # for (3.7 side by side: sendmail, -t, alias owners, delay warnings).
        if smtputf8 and _utf8_address(r.orig):
            return f"utf-8; {r.orig}"
        return f"rfc822;{r.orig}"
    return None


def _address_type(address: str, smtputf8: bool) -> str:
    # RFC 6533 3: "utf-8" only for a message that came with SMTPUTF8 (as Postfix's
    # bounce daemon: never for an address that is ASCII or not UTF-8).
    return "utf-8" if smtputf8 and _utf8_address(address) else "rfc822"


def _header_block(chunks: Iterable[bytes]) -> Iterable[bytes]:
    for line in iter_lines(chunks):
        if line in (b"\n", b"\r\n"):
            return
        yield line if line.endswith(b"\n") else line + b"\n"


# bounce_template_file, parsed once per file version (Postfix's bounce daemon
# reads it when it starts; a long-lived qmgr notices an edit by the file's
# mtime/size/inode, bounded to a handful of entries).
_TEMPLATE_CACHE: dict[tuple, dict] = {}
_TEMPLATE_CACHE_MAX = 8
_TEMPLATE_NAMES = {FAILURE: "failure_template", DELAY: "delay_template", SUCCESS: "success_template",
                   VERIFY: "verify_template"}


def notice_templates(config, warn: Callable[[str], None] | None = None) -> tuple[dict, str]:
    """(templates by name, source) as bounce(5) defines them: bounce_template_file
    replaces the built-in templates one by one.  A file that cannot be read or
    parsed leaves the built-in ones in force (Postfix's bounce daemon would stop
    with a fatal error, deferring every notice; a notice with the standard text
    is the safer way to keep senders informed), with a warning."""
    path = (config.get("bounce_template_file") or "").strip() if config is not None else ""
    if not path:
        return _bt.builtin_templates(), "built-in"
    try:
        st = os.stat(path)
        key = (path, st.st_mtime_ns, st.st_size, st.st_ino)
    except OSError:
        key = (path, None, None, None)
    hit = _TEMPLATE_CACHE.get(key)
    if hit is not None:
        return hit, path
    problems: list[str] = []
    try:
        templates = _bt.read_template_file(path, problems.append)
    except _bt.TemplateError as exc:
        problems.append(f"{exc} -- using the built-in templates")
        templates = _bt.builtin_templates()
    if warn is not None:
        for text in problems:
            warn(text)
    if len(_TEMPLATE_CACHE) >= _TEMPLATE_CACHE_MAX:
        _TEMPLATE_CACHE.clear()
    _TEMPLATE_CACHE[key] = templates
    return templates, path


def _template_text(config, kind: str, warn) -> tuple[object, list[str]]:
    """The template for ``kind`` and its text with $name expanded (bounce(5));
    an expression that names no parameter falls back to the built-in text."""
    templates, source = notice_templates(config, warn)
    t = templates[_TEMPLATE_NAMES[kind]]
    builtin = _bt.builtin_templates()[_TEMPLATE_NAMES[kind]]
    # Postfix's bounce(8) names a template's origin in its warnings: the file
    # it came from, or "[built-in]".
    if t == builtin:
        source = _BUILTIN_ORIGIN
    try:
        return t, _bt.expand_text(t, config, source, warn or (lambda _: None))
    except _bt.TemplateError as exc:
        if warn is not None:
            warn(f"{exc} -- using the built-in template")
        return builtin, _bt.expand_text(builtin, config, _BUILTIN_ORIGIN)


_BUILTIN_ORIGIN = "[built-in]"


def _qualified_sender(label: str, origin: str) -> str:
    """The template's From: with its bare address qualified as cleanup's local
    rewriting would (``MAILER-DAEMON`` -> ``MAILER-DAEMON@$myorigin``)."""
    m = re.search(r"<([^<>]*)>", label)
    if m:
        addr = m.group(1)
        if addr and "@" not in addr:
            return f"{label[:m.start()]}<{addr}@{origin}>{label[m.end():]}"
        return label
    if label and "@" not in label and " " not in label.strip():
        return f"{label.strip()}@{origin}"
    return label


def _mime_charset(charset: str) -> str:
    # Postfix 3.7 (SMTPUTF8 on) labels a us-ascii template's text utf-8: the
    # recipient reasons that follow it may be UTF-8 (checked side by side).
    return "utf-8" if charset.lower() == "us-ascii" else charset


def render_notice(config, *, kind: str, queue_id: str, sender: str, arrival_time: float,
                  recipients: list[DsnRecipient], original: Callable[[], Iterable[bytes]],
                  content_size: int = 0, to: str | None = None, ret: str | None = None,
                  envid: str | None = None, postmaster: bool = False, full: bool | None = None,
                  now: float | None = None, warn: Callable[[str], None] | None = None,
                  smtputf8: bool = False) -> bytes:
    """The notice as bytes with LF line ends, ready for cleanup.

    ``to`` is the notice's recipient (the sender unless a postmaster copy);
    ``full`` forces (True) or forbids (False) returning the whole original,
    otherwise RET and the kind decide; bounce_size_limit always applies.
    ``smtputf8``: the original came with MAIL FROM ... SMTPUTF8 (RFC 6533: the
    report is message/global-delivery-status, the original message/global or
    message/global-headers, non-ASCII addresses typed "utf-8"; Postfix 3.7).
    """
    now = time.time() if now is None else now
    hostname = config.get("myhostname")
    origin = config.get("myorigin") or hostname
    to = sender if to is None else to
    template, text = _template_text(config, kind, warn)
    subject = template.subject
    pm_subject = template.postmaster_subject or subject
    boundary = f"{queue_id}.{int(now)}/{hostname}"
    # The original's sender as Postfix's bounce daemon names it (X-Postfix-Sender,
    # Return-Path): RFC 5322 quoted, the null sender as MAILER-DAEMON@$myhostname.
    return_path = _quote_local(sender) if sender else f"MAILER-DAEMON@{hostname}"

    if full is None:
        # RET (RFC 3461 4.3) only matters for a failure, whose default is the whole
        # message; success reports, delay warnings and postmaster copies carry the
        # headers only, RET=FULL or not (Postfix 3.7 side by side).
        if kind == FAILURE and not postmaster:
            full = (ret or "FULL").upper() != "HDRS"
        else:
            full = False
    limit = _int(config, "bounce_size_limit", 50000)
    if full and content_size > limit:
        full = False     # Postfix: too large to return: headers only

    lines = [
        f"Date: {mail_date(now)}",
        f"From: {_qualified_sender(template.sender, origin)}",
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
        f"Content-Type: text/plain; charset={_mime_charset(template.charset)}",
        "Content-Transfer-Encoding: 8bit",
        "",
    ]
    if not postmaster:
        lines += text
    for r in recipients:
        lines.append("")
        # Addresses in external form, a local part that needs it quoted (Postfix
        # 3.7 side by side); Original-Recipient keeps the form it was given in.
        who = f"<{log_address(r.address)}>"
        if r.orig and r.orig.lower() != r.address.lower():
            who += f" (expanded from <{log_address(r.orig)}>)"
        lines += wrap_line(f"{who}: {r.reason.strip() or _NO_REASON}")
    lines += [
        "",
        f"--{boundary}",
        "Content-Description: Delivery report",
    ]
    if smtputf8:
        lines += ["Content-Type: message/global-delivery-status",      # RFC 6533 6.1
                  "Content-Transfer-Encoding: 8bit"]
    else:
        lines.append("Content-Type: message/delivery-status")
    lines += [
        "",
        f"Reporting-MTA: dns; {hostname}",                      # RFC 3464 2.2.2
    ]
    if envid:
        lines.append(f"Original-Envelope-Id: {envid}")          # RFC 3464 2.2.1
    lines += [
        f"X-Postfix-Queue-ID: {queue_id}",
        f"X-Postfix-Sender: {_address_type(return_path, smtputf8)}; {return_path}",
        f"Arrival-Date: {mail_date(arrival_time)}",              # RFC 3464 2.2.5
    ]
    retry_until = arrival_time + _time(config, "maximal_queue_lifetime", "d")
    for r in recipients:
        lines.append("")                                        # RFC 3464 2.1: blank line per block
        final = log_address(r.address)
        lines.append(f"Final-Recipient: {_address_type(final, smtputf8)}; {final}")  # RFC 3464 2.3.2
        orcpt = _original_recipient(r, smtputf8)
        if orcpt:
            lines.append(f"Original-Recipient: {orcpt}")        # RFC 3464 2.3.1
        lines.append(f"Action: {r.action}")                     # RFC 3464 2.3.3
        lines.append(f"Status: {r.status}")                     # RFC 3464 2.3.4
        remote, code = diagnostic(r.reason, r.diag_type, r.diag_text)
        remote = r.remote_mta or remote
        if remote:
            lines.append(f"Remote-MTA: dns; {remote}")          # RFC 3464 2.3.5
        if code is not None:
            lines += wrap_line(f"Diagnostic-Code: {code}")      # RFC 3464 2.3.6
        if r.action == "delayed" and kind != VERIFY:
            # (Postfix's trace report, sendmail -v's, names no retry limit)
            lines.append(f"Will-Retry-Until: {mail_date(retry_until)}")  # RFC 3464 2.3.9
    prefix = "" if kind in (SUCCESS, VERIFY) else "Undelivered "
    lines += [
        "",
        f"--{boundary}",
        f"Content-Description: {prefix}{'Message' if full else 'Message Headers'}",
        # RFC 6522 / 3462; RFC 6532 3.7 and RFC 6533 6.3-6.4 for SMTPUTF8 mail.
        "Content-Type: " + (("message/global" if full else "message/global-headers") if smtputf8
                            else ("message/rfc822" if full else "text/rfc822-headers")),
        "Content-Transfer-Encoding: 8bit",
        "",
    ]
    out = bytearray(("\n".join(lines) + "\n").encode("utf-8", "surrogateescape"))
    # Cleanup drops Return-Path: from queued mail; Postfix's bounce daemon gives
    # the returned copy (whole or headers) one naming the original's sender.  An
    # original that already starts with one (pickup's replayed header block) keeps it.
    top = f"Return-Path: <{return_path}>\n".encode("utf-8", "surrogateescape")
    source = iter_lines(original()) if full else _header_block(original())
    last = b"\n"
    for line in source:
        if top is not None:
            if line[:12].lower() != b"return-path:":
                out += top
            top = None
        out += line
        last = line
    if top is not None:
        out += top
    if not last.endswith(b"\n"):
        out += b"\n"
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
