"""Sans-IO SMTP server engine (RFC 5321, 1870, 2920, 3030, 3207, 3461, 4954, 6152, 6531).

API (the asyncio glue in postwell.smtpd is the only caller; tests drive it directly)::

    cfg  = ServerConfig.from_config(config)          # or ServerConfig(hostname=..., ...)
    # Table lookups come in as plain callables (footer_lookup, command_filter), built by
    # the caller (postwell.smtpd.server.table_lookups): the engine itself does no I/O.
    cfg  = ServerConfig.from_config(config, **table_lookups(config))
    conn = ServerConnection(cfg, client="name[addr]")  # client is used in warning texts only
    conn.send_greeting(Reply(220, "mx ESMTP postwell"))  # or a 421/554 from on_connect
    conn.receive_data(data)      # bytes from the peer; b"" means the peer closed
    ev = conn.next_event()       # an Event, or NEED_DATA (feed more / flush replies),
                                 # or PAUSED (an event awaits its reply)
    conn.send_reply(reply)       # answer the pending event (ev.needs_reply); None = ev.default
    conn.reject_keeping_transaction(reply)  # DataEnd refused by the end-of-data restrictions
    conn.data_to_send() -> bytes # replies to write; call it when next_event() says NEED_DATA
    conn.error_delay() -> float  # seconds to sleep before writing (smtpd_soft_error_limit)
    conn.tls_started()           # after the TLS handshake (STARTTLS accepted with 220);
                                 # a failed handshake is conn.abort("lost")
    conn.tls_active = True       # wrapper mode (smtps): set before send_greeting()
    conn.auth_mechanisms = (...) # the EHLO AUTH list / accepted mechanisms for this session
                                 # (the glue changes it after TLS); () = AUTH not enabled
    conn.deny_access()           # on_connect refused: 503 to every command but QUIT
    conn.abort(reason)           # timeout etc.: close, counting a DATA/BDAT in progress
    conn.where                   # "CONNECT", "RCPT", "DATA (9 bytes)", ... for log lines
    conn.timeout_where()         # the same for "timeout after ..." (a BDAT chunk differs)
    conn.counters_text()         # "ehlo=1 mail=1 rcpt=0/1 quit=1 commands=3/4"
    conn.closed                  # no more input is read once True (after QUIT, 421, 521, EOF)
    conn.transcript = []         # keep the session history (command lines, reply bytes) for
                                 # the notify_classes notice; None (default) keeps nothing
    conn.pipelining_violation    # for reject_unauth_pipelining

Events (frozen dataclasses; those with needs_reply=True carry a `default` reply and must be
answered with send_reply() before the engine goes on): Helo, Ehlo, Mail, Rcpt, Data (default
354), Bdat (first chunk of a transaction, for smtpd_data_restrictions; default None = go on
silently), BdatChunkEnd (default "250 2.0.0 Ok: N bytes"), DataEnd (end of DATA / BDAT LAST:
finish the queue file, then reply), Vrfy, Etrn, StartTls, Auth (reply 334 to get an
AuthResponse), AuthResponse, Xclient (complete: default None, the glue answers 220 or a
connect-level reject); AuthAborted (notice: the client's "*", already answered 501).  Notices without a reply: DataChunk (content, dot-unstuffed,
CRLF lines; a long line may arrive in pieces), Rset, Warning / Info (log lines), Rejected (an
engine reject Postfix logs as "NOQUEUE: reject"), ConnectionClosed(reason).
Replies the engine decides itself (syntax, sequence, limits) never become events; their
counters and error accounting are kept here so the glue cannot get them wrong.

PIPELINING (RFC 2920): replies accumulate in the output buffer; the glue writes them only when
next_event() returns NEED_DATA, i.e. when every complete command already received has been
answered -- the same grouping Postfix does (flush when the input buffer is empty).

Memory: the input buffer never holds more than about line_length_limit bytes of an unfinished
line plus one network read; longer command lines are truncated (as Postfix does), longer data
lines are passed on in pieces.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass

from . import xclient as _xclient
from .reply import Reply

# --- sentinels ----------------------------------------------------------------------------


class _Sentinel:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


NEED_DATA = _Sentinel("NEED_DATA")
PAUSED = _Sentinel("PAUSED")


# --- events -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Event:
    needs_reply = False


@dataclass(frozen=True)
class Helo(Event):
    name: str
    default: Reply
    needs_reply = True


@dataclass(frozen=True)
class Ehlo(Event):
    name: str
    default: Reply
    needs_reply = True


@dataclass(frozen=True)
class Mail(Event):
    sender: str                     # "" for the null sender <>
    size: int | None = None
    body: str | None = None         # "7BIT" / "8BITMIME" / "BINARYMIME"
    smtputf8: bool = False
    ret: str | None = None          # "FULL" / "HDRS"
    envid: str | None = None        # decoded from xtext
    auth: str | None = None         # decoded AUTH= value
    # The AUTH= value as Postfix keeps it (still xtext, control characters as "?");
    # None for "<>" or none given.  Postfix's sasl_sender.
    sasl_sender: str | None = None
    default: Reply = Reply(250, "Ok", "2.1.0")
    needs_reply = True


@dataclass(frozen=True)
class Rcpt(Event):
    recipient: str
    notify: str | None = None       # "NEVER" or "SUCCESS,FAILURE,DELAY" subset
    orcpt: str | None = None        # "type;addr" as dsn.orcpt.decode_orcpt() reads it
    default: Reply = Reply(250, "Ok", "2.1.5")
    needs_reply = True


@dataclass(frozen=True)
class Data(Event):
    default: Reply = Reply(354, "End data with <CR><LF>.<CR><LF>")
    needs_reply = True


@dataclass(frozen=True)
class Bdat(Event):
    """First BDAT of a transaction: the place for smtpd_data_restrictions."""
    size: int
    last: bool
    default: Reply | None = None
    needs_reply = True


@dataclass(frozen=True)
class DataChunk(Event):
    data: bytes


@dataclass(frozen=True)
class BdatChunkEnd(Event):
    total: int
    default: Reply = Reply(250, "Ok", "2.0.0")
    needs_reply = True


@dataclass(frozen=True)
class DataEnd(Event):
    """End of message. too_big: message_size_limit was exceeded; bare_lf: a bare LF was seen
    with smtpd_forbid_bare_newline = reject. In both cases the content was discarded and
    `default` is the refusal."""
    size: int
    too_big: bool = False
    bdat: bool = False
    default: Reply = Reply(250, "Ok", "2.0.0")
    bare_lf: bool = False
    needs_reply = True


@dataclass(frozen=True)
class Rset(Event):
    pass


@dataclass(frozen=True)
class Vrfy(Event):
    address: str
    default: Reply = Reply(252, "", "2.0.0")
    needs_reply = True


@dataclass(frozen=True)
class Etrn(Event):
    domain: str
    default: Reply = Reply(459, "service unavailable")
    needs_reply = True


@dataclass(frozen=True)
class StartTls(Event):
    default: Reply = Reply(220, "Ready to start TLS", "2.0.0")
    needs_reply = True


@dataclass(frozen=True)
class Auth(Event):
    """AUTH mechanism [initial-response]; reply 334 to continue, 235 / 535 / 454 to end.
    ``mechanism`` is as the client typed it (back ends match it case-insensitively)."""
    mechanism: str
    initial_response: str | None = None
    default: Reply = Reply(535, "Error: authentication failed", "5.7.8")
    needs_reply = True


@dataclass(frozen=True)
class AuthResponse(Event):
    data: str
    default: Reply = Reply(535, "Error: authentication failed", "5.7.8")
    needs_reply = True


@dataclass(frozen=True)
class AuthAborted(Event):
    """The client cancelled an AUTH exchange with "*" (already answered 501 5.7.0)."""


@dataclass(frozen=True)
class Warning(Event):  # noqa: A001 - a log warning, not the builtin category
    text: str
    with_queue_id: bool = False     # the glue prefixes "ID: " (or "NOQUEUE: ")


@dataclass(frozen=True)
class Info(Event):
    """An informational log line ("improper command pipelining after ...")."""
    text: str


@dataclass(frozen=True)
class Rejected(Event):
    """An engine-decided reject Postfix logs as "NOQUEUE: reject: MAIL from ..."."""
    command: str
    reply: Reply
    sender: str | None = None
    text: str | None = None          # what the log line says instead of the reply


@dataclass(frozen=True)
class ConnectionClosed(Event):
    reason: str          # "quit", "lost", "too many errors", "bare newline", "bdat syntax",
                         # "hangup" (after a 421 or 521 reply: nothing more to log)


@dataclass(frozen=True)
class Xclient(Event):
    """XCLIENT from an authorized client (postwell.smtp.xclient): apply ``request`` to
    the session.  complete: answer 220 (the greeting anew) or a connection-level reject;
    else the command failed at a later attribute and ``default`` is its 501 (the ones
    before it still count, as in Postfix)."""
    request: object                  # xclient.XclientRequest
    complete: bool = True
    default: Reply | None = None
    needs_reply = True


# --- configuration ------------------------------------------------------------------------

# Postfix's ehlo_mask table order, used when it names discarded keywords.
_EHLO_MASK_ORDER = ("8BITMIME", "AUTH", "ETRN", "PIPELINING", "SIZE", "VERP", "VRFY", "XCLIENT",
                    "XFORWARD", "STARTTLS", "ENHANCEDSTATUSCODES", "DSN", "SMTPUTF8", "CHUNKING")
# The name Postfix 3.7 prints for the SMTPUTF8 bit (its table's first entry for it).
_EHLO_MASK_NAMES = {"SMTPUTF8": "EHLO_MASK_SMTPUTF8"}
EHLO_KEYWORDS_ORDER = ("PIPELINING", "SIZE", "VRFY", "ETRN", "STARTTLS", "AUTH", "XCLIENT",
                       "XFORWARD", "ENHANCEDSTATUSCODES", "8BITMIME", "DSN", "SMTPUTF8",
                       "CHUNKING")


@dataclass(frozen=True)
class ServerConfig:
    hostname: str = "localhost.localdomain"
    message_size_limit: int = 10240000
    line_length_limit: int = 2048
    recipient_limit: int = 1000
    recipient_overshoot_limit: int = 1000
    soft_error_limit: int = 10
    hard_error_limit: int = 20
    error_sleep_time: float = 1.0
    disable_vrfy: bool = False
    discard_ehlo_keywords: frozenset = frozenset()
    forbid_bare_newline: str = "normalize"      # "normalize" | "reject" | "no"
    bare_newline_reject_code: int = 550         # smtpd_forbid_bare_newline_reject_code
    forbid_unauth_pipelining: bool = False      # smtpd_forbid_unauth_pipelining
    starttls_offered: bool = False
    auth_mechanisms: tuple = ()                 # offered in EHLO when non-empty
    smtputf8_enable: bool = True
    junk_command_limit: int = 100
    forbidden_commands: frozenset = frozenset({"CONNECT", "GET", "POST"})
    forbid_non_alpha: bool = True               # Postfix's regexp:{{/^[^A-Z]/ Bogus}}
    tls_required: bool = False                  # smtpd_tls_security_level = encrypt
    auth_response_limit: int = 12288            # smtpd_sasl_response_limit
    auth_legacy: bool = False                   # broken_sasl_auth_clients: "AUTH=" too
    ipv6_enabled: bool = True                   # inet_protocols: XFORWARD ADDR may be IPv6
    strict_rfc821_envelopes: bool = False
    helo_required: bool = False                 # smtpd_helo_required (MAIL, AUTH, ETRN)
    reject_footer: str = ""                     # smtpd_reject_footer (a raw template)
    # Table lookups are the caller's (the smtpd builds these from smtpd_reject_footer_maps
    # and smtpd_command_filter), so the engine never touches a file.  A hook that raises
    # counts as "nothing found"; each line of str(exc) is logged as a warning.
    # footer_lookup(reply as str(Reply)) -> footer template, or None for smtpd_reject_footer
    footer_lookup: Callable[[str], str | None] | None = None
    # command_filter(line without leading blanks) -> replacement command line, or None
    command_filter: Callable[[str], str | None] | None = None
    resolve_numeric_domain: bool = False        # user@1.2.3.4 is user@[1.2.3.4]
    noop_commands: frozenset = frozenset()      # smtpd_noop_commands (upper case)

    def __post_init__(self) -> None:
        # EHLO replies made from this configuration, by the session's own settings
        # (ServerConnection._ehlo_reply); not a field, so no part of ==, hash or replace().
        object.__setattr__(self, "_ehlo_replies", {})

    @classmethod
    def from_config(cls, config, **overrides) -> "ServerConfig":
        def num(name, default):
            try:
                return config.get_int(name) if config.get(name) != "" else default
            except ValueError:
                return default

        def time_(name, default):
            try:
                return config.get_time(name) if config.get(name) != "" else default
            except (ValueError, Exception):
                return default

        bare = (config.get("smtpd_forbid_bare_newline") or "normalize").strip().lower()
        bare = {"yes": "normalize", "no": "no", "reject": "reject", "normalize": "normalize",
                "true": "normalize", "false": "no"}.get(bare, "normalize")
        kw = dict(
            hostname=config.get("myhostname") or "localhost.localdomain",
            message_size_limit=num("message_size_limit", 10240000),
            line_length_limit=max(num("line_length_limit", 2048), 512),
            recipient_limit=num("smtpd_recipient_limit", 1000),
            recipient_overshoot_limit=num("smtpd_recipient_overshoot_limit", 1000),
            soft_error_limit=num("smtpd_soft_error_limit", 10),
            hard_error_limit=num("smtpd_hard_error_limit", 20),
            error_sleep_time=time_("smtpd_error_sleep_time", 1.0),
            junk_command_limit=num("smtpd_junk_command_limit", 100),
            disable_vrfy=config.get_bool("disable_vrfy_command"),
            discard_ehlo_keywords=frozenset(
                k.upper() for k in config.get_list("smtpd_discard_ehlo_keywords")),
            forbid_bare_newline=bare,
            # Postfix refuses to start outside 500..599; a bad value keeps the default.
            bare_newline_reject_code=min(max(num("smtpd_forbid_bare_newline_reject_code", 550),
                                             500), 599),
            forbid_unauth_pipelining=(config.get("smtpd_forbid_unauth_pipelining")
                                      or "no").lower() == "yes",
            smtputf8_enable=(config.get("smtputf8_enable") or "yes").lower() != "no",
            strict_rfc821_envelopes=(config.get("strict_rfc821_envelopes") or "no").lower() == "yes",
            helo_required=(config.get("smtpd_helo_required") or "no").lower() == "yes",
            reject_footer=config.get("smtpd_reject_footer") or "",
            resolve_numeric_domain=(config.get("resolve_numeric_domain") or "no").lower() == "yes",
            noop_commands=frozenset(w.upper() for w in config.get_list("smtpd_noop_commands")),
        )
        if config.raw("smtpd_forbidden_commands") is not None:
            value = re.sub(r"\{\{.*?\}\}", "", config.get("smtpd_forbidden_commands"))
            words = [w for w in re.split(r"[\s,]+", value) if w]
            kw["forbidden_commands"] = frozenset(w.upper() for w in words if ":" not in w)
            # Only Postfix's stock pattern is understood among table entries.
            kw["forbid_non_alpha"] = any(":" in w for w in words)
        kw.update(overrides)
        return cls(**kw)


# --- address and parameter parsing --------------------------------------------------------

class _SyntaxError(Exception):
    pass


_XTEXT_RE = re.compile(r"\+([0-9A-F]{2})")


def decode_xtext(text: str) -> str:
    """RFC 3461 4: xtext; raises ValueError when malformed."""
    if not text:
        raise ValueError("empty xtext")
    for ch in text:
        if ord(ch) < 33 or ord(ch) > 126 or ch == "=":
            raise ValueError("bad xtext char")
    if re.search(r"\+(?![0-9A-F]{2})", text):
        raise ValueError("bad xtext escape")
    return _XTEXT_RE.sub(lambda m: chr(int(m.group(1), 16)), text)


_HOST_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")


def _valid_hostname(name: str) -> bool:
    """Postfix's valid_hostname(): ASCII labels of at most 63 characters, no leading
    or trailing hyphen or dot, at most 255 in all, not all-numeric."""
    if not name or len(name) > 255:
        return False
    labels = name.split(".")
    if not all(_HOST_LABEL.fullmatch(label) for label in labels):
        return False
    return not all(label.isdigit() for label in labels)


def _valid_address_literal(text: str) -> bool:
    """RFC 5321 4.1.3 address literal: [1.2.3.4] or [IPv6:...]."""
    if len(text) < 3 or text[0] != "[" or text[-1] != "]":
        return False
    inner = text[1:-1]
    try:
        if inner[:5].lower() == "ipv6:":
            ipaddress.IPv6Address(inner[5:])
        elif re.fullmatch(r"\d{1,3}(?:\.\d{1,3}){3}", inner):
            ipaddress.IPv4Address(inner)
        else:
            return False
    except ValueError:
        return False
    return True


_XFORWARD_ATTRS = ("NAME", "ADDR", "PROTO", "HELO", "SOURCE", "PORT", "IDENT")
_XFORWARD_CLIENT_ATTRS = frozenset(("NAME", "ADDR", "PROTO", "HELO", "PORT"))


def _xforward_value_ok(name: str, value: str, ipv6: bool = True) -> bool:
    """Postfix 3.7's checks of one XFORWARD value ("[UNAVAILABLE]" clears any; unlike
    XCLIENT, no "[TEMPUNAVAIL]" and no port range)."""
    if value.upper() == "[UNAVAILABLE]":
        return True
    if name == "NAME":
        return _valid_hostname(value)
    if name == "ADDR":
        addr = value[5:] if value[:5].upper() == "IPV6:" else value
        try:
            ip = ipaddress.ip_address(addr)
        except ValueError:
            return False
        # An IPv6 address only where inet_protocols enables IPv6 (checked: refused with
        # inet_protocols = ipv4, with or without the "IPV6:" prefix).
        return ip.version == 4 and addr == value or ip.version == 6 and ipv6
    if name == "PORT":
        return value.isdigit()
    if name == "SOURCE":
        return value.upper() in ("LOCAL", "REMOTE")
    # PROTO, HELO, IDENT: printable text (after xtext decoding "a+20b" is fine).
    return all(" " <= ch <= "~" for ch in value)


def unquote_xtext(text: str) -> str:
    """Postfix's xtext_unquote(): only "+XX" (either case) is checked; other bytes
    pass as they are (ORCPT takes them so, checked against 3.7)."""
    if "+" not in text:
        return text
    out = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "+":
            hx = text[i + 1:i + 3]
            if len(hx) != 2 or not all(c in "0123456789abcdefABCDEF" for c in hx):
                raise ValueError("bad xtext escape")
            out.append(chr(int(hx, 16)))
            i += 3
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def split_args(text: str) -> list[str]:
    """Split a command argument on blanks, keeping quoted strings whole (RFC 5321 4.1.2)."""
    args: list[str] = []
    cur: list[str] = []
    quoted = esc = False
    for ch in text:
        if esc:
            cur.append(ch)
            esc = False
        elif ch == "\\":
            cur.append(ch)
            esc = True
        elif ch == '"':
            quoted = not quoted
            cur.append(ch)
        elif ch in " \t\r" and not quoted:
            # Postfix's smtpd splits command arguments on CR as well, so a CR-glued
            # "parameter" is an unsupported option, never part of the address.
            if cur:
                args.append("".join(cur))
                cur = []
        else:
            cur.append(ch)
    if cur:
        args.append("".join(cur))
    return args


def _scan(text: str):
    """Yield (index, char, quoted) with backslash escapes and quoted strings tracked."""
    quoted = esc = False
    for i, ch in enumerate(text):
        if esc:
            esc = False
            yield i, ch, True
            continue
        if ch == "\\":
            esc = True
            yield i, ch, True
            continue
        if ch == '"':
            quoted = not quoted
            yield i, ch, True
            continue
        yield i, ch, quoted


_PLAIN_MAILBOX = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+@[A-Za-z0-9.-]+"
_PLAIN_PATH = re.compile(rf"<({_PLAIN_MAILBOX})>|({_PLAIN_MAILBOX})")
# A MAIL/RCPT argument made of such a path and, after blanks, the parameters.
_FAST_PATH = re.compile(rf"[ \t]*<({_PLAIN_MAILBOX})>(?:[ \t]+(.*))?", re.S)


def _open_quote(text: str) -> bool:
    quoted = esc = False
    for ch in text:
        if esc:
            esc = False
        elif ch == "\\":
            esc = True
        elif ch == '"':
            quoted = not quoted
    return quoted


def _drop_comments(text: str) -> str:
    # RFC 5322 3.2.2 comments, which Postfix's RFC 822 parser ignores in envelopes.
    out, depth = [], 0
    for _, ch, quoted in _scan(text):
        if not quoted and ch == "(":
            depth += 1
            continue
        if not quoted and ch == ")":
            if not depth:
                raise _SyntaxError      # a stray ")" (Postfix refuses it; an open "(" it lets run)
            depth -= 1
            continue
        if depth == 0:
            out.append(ch)
    return "".join(out)


def _unquoted_index(text: str, chars: str, last: bool = False) -> int:
    found = -1
    for i, ch, quoted in _scan(text):
        if not quoted and ch in chars:
            if not last:
                return i
            found = i
    return found


def _phrase_colon(text: str) -> int:
    """The last unquoted ':' outside an address literal: [IPv6:...] colons are part
    of the domain (RFC 5321 4.1.3), not a group phrase's end."""
    found = -1
    depth = 0
    for i, ch, quoted in _scan(text):
        if quoted:
            continue
        if ch == "[":
            depth += 1
        elif ch == "]" and depth:
            depth -= 1
        elif ch == ":" and not depth:
            found = i
    return found


def _drop_colon_blanks(text: str) -> str:
    """Unquoted blanks next to an unquoted ':' removed (a quoted string is kept).
    Linear: a long line of blanks costs no more than its length."""
    chars = list(_scan(text))
    blank = [not q and ch in " \t" for _, ch, q in chars]
    colon = [not q and ch == ":" for _, ch, q in chars]
    near = [False] * len(chars)         # the nearest non-blank on either side is a ':'
    last = False
    for n in range(len(chars)):
        if blank[n]:
            near[n] = last
        else:
            last = colon[n]
    last = False
    for n in range(len(chars) - 1, -1, -1):
        if blank[n]:
            near[n] = near[n] or last
        else:
            last = colon[n]
    return "".join(ch for n, (_, ch, _q) in enumerate(chars) if not (blank[n] and near[n]))


def _bad_phrase(text: str) -> bool:
    """What may stand before "<address>" inside the path: a display-name-like phrase
    (atoms, quoted strings, even "a@b" or a source route), which Postfix's RFC 822
    parser skips; a group colon or a second address is refused (3.7, side by side)."""
    if text.startswith("@"):
        colon = _unquoted_index(text, ":")
        if colon >= 0:
            text = text[colon + 1:]
    return _unquoted_index(text, ":;,<>") >= 0


def extract_address(token: str, null_ok: bool) -> str:
    """One envelope address token -> address, with Postfix's tolerance.

    RFC 5321 4.1.2 Path, plus what Postfix (strict_rfc821_envelopes = no) lets
    through: no angle brackets, doubled or stray brackets, RFC 822 comments,
    source routes (RFC 5321 Appendix C) are dropped.
    """
    m = _PLAIN_PATH.fullmatch(token)
    if m:
        return m.group(1) or m.group(2)    # the common case, without the slow scanner
    s = token
    if _open_quote(s):
        raise _SyntaxError              # unbalanced quote
    if len(s) >= 2 and s[0] == "<" and s[-1] == ">":
        s = s[1:-1]
    s = _drop_comments(s)
    lt = _unquoted_index(s, "<")
    if lt >= 0:
        gt = _unquoted_index(s[lt:], ">")
        if gt < 0 or _bad_phrase(s[:lt]) or s[lt + gt + 1:].strip(">"):
            raise _SyntaxError
        s = s[lt + 1:lt + gt]
    s = "".join(ch for _, ch, quoted in _scan(s) if quoted or ch != ">")
    if s.startswith("@"):
        # RFC 5321 Appendix C source route: dropped.  Without a ":" it is no route but
        # an empty local part: Postfix takes "<@example.org>" as ""@example.org and
        # "<@@x>" as "@"@x (3.7, side by side).
        colon = _unquoted_index(s, ":")
        if colon >= 0:
            s = s[colon + 1:]
    if _unquoted_index(s, ",;<") >= 0:
        raise _SyntaxError              # more than one address, or junk
    if _phrase_colon(s) >= 0:
        # Postfix keeps a colon that does not end a source route as part of the
        # local part ("<a:b@x>" is a:b@x, checked against 3.7), and its tokenizer
        # drops the blanks next to it ("<a : b@x>" is a:b@x as well).
        s = _drop_colon_blanks(s)
    if s in ("", '""'):
        if not null_ok:
            raise _SyntaxError
        return ""
    for _, ch, quoted in _scan(s):
        if ord(ch) < 32 or ch == "\x7f" or (not quoted and ch in " \t"):
            raise _SyntaxError
    at = _unquoted_index(s, "@", last=True)
    if at >= 0:
        domain = s[at + 1:]
        if not domain:
            raise _SyntaxError          # an empty local part passes (Postfix)
        if _unquoted_index(domain, "[]") >= 0 and not (
                domain.startswith("[") and domain.endswith("]")
                and _unquoted_index(domain[1:-1], "[]") < 0):
            raise _SyntaxError          # RFC 5321 4.1.3 address literal
    elif _unquoted_index(s, "[]") >= 0 and not (s.startswith("[") and s.endswith("]")):
        raise _SyntaxError
    return s


_NEUTER = frozenset(' <>()\\";@')
# Any character neuter_helo() would change: printable ASCII outside _NEUTER passes as is.
_NEUTER_ANY = re.compile(r'[^!-~]|[<>()\\";@]')


def neuter_helo(name: str, utf8: bool = True) -> str:
    """The HELO/EHLO argument as Postfix keeps it for logs, policy and the Received
    header: printable(name, '?') and then its NEUTER_CHARACTERS ' <>()\\";@' -> '?',
    so a client cannot break out of "Received: from NAME (...)" or a log field."""
    if _NEUTER_ANY.search(name) is None:
        return name             # the usual host name: one C scan instead of a loop
    out = []
    for ch in name:
        o = ord(ch)
        if (0x20 <= o < 0x7F and ch not in _NEUTER) or (utf8 and o >= 0xA0
                                                         and not 0xD800 <= o < 0xE000):
            out.append(ch)
        else:
            out.append("?")
    return "".join(out)


# Postfix's escape() (util/escape.c): printable ASCII stays (a backslash doubled), the
# usual control characters get their C names, any other byte its three octal digits.
_C_ESCAPE = str.maketrans({
    **{b: f"\\{b:03o}" for b in range(256) if not 0x20 <= b < 0x7F},
    7: "\\a", 8: "\\b", 9: "\\t", 10: "\\n", 11: "\\v", 12: "\\f", 13: "\\r",
    92: "\\\\"})


def c_escape(data: bytes) -> str:
    """Bytes as Postfix's escape() shows them in a log line ("\\r\\n", "\\351")."""
    return data.decode("latin-1").translate(_C_ESCAPE)


def _valid_ipv4(text: str) -> bool:
    parts = text.split(".")
    return len(parts) == 4 and all(p.isdigit() and len(p) <= 3 and int(p) <= 255 for p in parts)


_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_PLAIN_DOMAIN = re.compile(rf"(?:{_LABEL}\.)*{_LABEL}\.?")


def domain_error(address: str, smtputf8: bool, numeric_ok: bool = False) -> bool:
    """True when the domain of an (internal-form) address is one Postfix's resolver
    flags as an error, which smtpd answers as address syntax (501 5.1.7 / 5.1.3):
    a bare IP address, a name that is not a valid host name (RFC 1035 2.3.1 labels,
    "_" allowed, not all numeric), a bad [literal] (RFC 5321 4.1.3), or non-ASCII
    without SMTPUTF8 (RFC 6531 3.3). Checked against Postfix 3.7.  ``numeric_ok``:
    resolve_numeric_domain = yes, a bare IPv4 address stands for its [literal]."""
    at = address.rfind("@")
    if at < 0:
        return False
    domain = address[at + 1:]
    if _PLAIN_DOMAIN.fullmatch(domain) is not None:
        # The usual case, decided in C: valid ASCII labels; still an error when too
        # long or all numeric (a bare IP address).
        name = domain[:-1] if domain.endswith(".") else domain
        if numeric_ok and _valid_ipv4(domain):
            return False
        return len(name) > 255 or name.replace(".", "").isdigit()
    if domain.startswith("["):
        inner = domain[1:-1] if domain.endswith("]") else ""
        if inner[:5].lower() == "ipv6:":
            import ipaddress
            try:
                ipaddress.IPv6Address(inner[5:])
                return False
            except ValueError:
                return True
        return not _valid_ipv4(inner)
    if not smtputf8 and not domain.isascii():
        return True
    if domain.endswith("."):
        domain = domain[:-1]             # "example.net." is the same name
    if not domain or len(domain) > 255:
        return True
    numeric = True
    for label in domain.split("."):
        if not label or len(label) > 63 or label[0] == "-" or label[-1] == "-":
            return True
        for ch in label:
            if not (ch.isascii() and (ch.isalnum() or ch in "-_")) and ch.isascii():
                return True
            if not ch.isdigit():
                numeric = False
    return numeric


def internalize(address: str) -> str:
    """RFC 5321 quoted form -> Postfix's internal (unquoted) form: quotes and backslash
    escapes go ("a b"@c -> a b@c). Queue files, logs and replies use this form."""
    out = []
    quoted = esc = False
    for ch in address:
        if esc:
            out.append(ch)
            esc = False
        elif ch == "\\":
            esc = True
        elif ch == '"':
            quoted = not quoted
        else:
            out.append(ch)
    return "".join(out)


def _address_token(text: str) -> tuple[str, bool]:
    """The address word as Postfix's command tokenizer cuts it: blanks end it except
    inside <...> or "..." (nesting and backslashes counted).  Also says whether it ends
    inside such a pair: Postfix refuses that with 501 before its address parser runs,
    so no "Illegal address syntax" warning is logged for it."""
    s = text.lstrip(" \t")
    i, n = 0, len(s)
    while i < n:
        c = s[i]
        i += 1
        if c in " \t":
            return s[:i - 1], False
        if c not in "<\"":
            continue
        wanted = [">" if c == "<" else '"']
        while wanted:
            if i >= n:
                return s, True
            c = s[i]
            i += 1
            if c == "\\":
                if i >= n:
                    return s, True
                i += 1
            elif c == wanted[-1]:
                wanted.pop()
            elif c == '"':
                wanted.append('"')
            elif c == "<" and wanted[-1] == ">":
                wanted.append(">")
    return s, False


def _unbalanced_token(text: str) -> bool:
    return _address_token(text)[1]


def _strict_821_ok(token: str) -> bool:
    """strict_rfc821_envelopes = yes: only "<" path ">" (RFC 5321 4.1.2), no comments
    or phrases (a source route passes, as in Postfix 3.7)."""
    if len(token) < 2 or token[0] != "<" or token[-1] != ">":
        return False
    while len(token) >= 2 and token[0] == "<" and token[-1] == ">":
        token = token[1:-1]             # "<<a@b>>": brackets alone are no phrase (3.7)
    return _unquoted_index(token, "<>()") < 0


_RFC822_SPECIALS = frozenset('()<>@,;:\\".[]')


def _squeeze_blanks(token: str) -> str:
    """Drop unquoted blanks at the ends and next to RFC 822 specials; keep the ones
    between two words, which the address check then refuses (as Postfix's does).
    A token with a control character (CR, LF, NUL...) is left as it is: the address
    check refuses it whole, and no blank next to it may be squeezed into a header
    line's shape ("<a\rX-Injected: b@c>")."""
    if any(c < " " and c != "\t" for c in token):
        return token
    out: list[str] = []
    quoted = esc = blank = False
    for ch in token:
        if esc:
            out.append(ch)
            esc = False
            continue
        if not quoted and ch in " \t":
            blank = True
            continue
        if blank:
            if out and out[-1] not in _RFC822_SPECIALS and ch not in _RFC822_SPECIALS:
                out.append(" ")
            blank = False
        if ch == "\\":
            esc = True
        elif ch == '"':
            quoted = not quoted
        out.append(ch)
    return "".join(out)


def parse_path(text: str, null_ok: bool) -> tuple[str, list[str]]:
    """"<addr> params" -> (address, [params]); raises _SyntaxError for a bad address."""
    m = _FAST_PATH.fullmatch(text)
    if m is not None:
        # "<local@domain>" with no quote, backslash or blank inside: the scanners below
        # would cut the same token and change nothing in it (one C match per command
        # instead of three Python loops over the address).
        rest = m.group(2)
        return m.group(1), (split_args(rest) if rest else [])
    s = text.lstrip(" \t")
    if s[:1] == "<":
        # RFC 5321 4.1.2 allows no blanks in a Path, but Postfix's tokenizer keeps "<...>"
        # whole and its RFC 822 parser drops blanks next to specials: "< a@b >" and "< >"
        # (the null sender) pass there (checked against 3.7).
        token, unbalanced = _address_token(s)
        if not unbalanced and (" " in token or "\t" in token):
            return (internalize(extract_address(_squeeze_blanks(token), null_ok)),
                    split_args(s[len(token):]))
    args = split_args(text)
    if not args:
        raise _SyntaxError
    return internalize(extract_address(args[0], null_ok)), args[1:]


# --- the connection -----------------------------------------------------------------------

# Session states. A transaction is "in mail" once MAIL was accepted.
S_GREETING = "greeting"      # greeting not sent yet
S_CMD = "command"            # reading commands
S_DATA = "data"              # reading DATA content
S_BDAT = "bdat"              # reading a BDAT chunk
S_AUTH = "auth"              # reading an AUTH continuation line
S_TLS = "tls"                # STARTTLS accepted, waiting for tls_started()
S_CLOSED = "closed"

# Counter names in the order Postfix prints them in the disconnect line.
_COUNTER_ORDER = ("helo", "ehlo", "xclient", "xforward", "starttls", "auth", "mail", "rcpt", "data", "bdat", "rset",
                  "noop", "vrfy", "etrn", "quit", "unknown")

REPLY_DSN_DISABLED = Reply(501, "DSN support is disabled", "5.7.1")
REPLY_FILE_TOO_BIG = Reply(552, "Error: message file too big", "5.3.4")
# Frozen and equal every time: one object instead of one per message.
_REPLY_QUEUED_OK = Reply(250, "Ok", "2.0.0")
_REPLY_NOOP_OK = Reply(250, "Ok", "2.0.0")
_REPLY_BYE = Reply(221, "Bye", "2.0.0")
_DATA_EVENT = Data()
_FOOTER_MACRO = re.compile(r"\$(?:\{(\w+)\}|(\w+))")
# Names Postfix's smtpd expands (empty when unset) besides those _with_footer fills in.
_FOOTER_KNOWN = frozenset({"recipient", "recipient_domain", "sender_domain", "localtime",
                           "reverse_client_name", "sasl_method", "sasl_sender", "sasl_username"})
_HEADER_LIKE = re.compile(r"[!-9;-~]+:")
# RFC 2920 3.1: commands that can only be the last of a pipelined group.
_JUNK_COMMANDS = frozenset({"NOOP", "VRFY", "ETRN", "RSET"})
# XCLIENT too: Postfix 3.7 gives it the pre-TLS flag (a proxy in front may speak it first).
_PRE_TLS = frozenset({"HELO", "EHLO", "STARTTLS", "NOOP", "QUIT", "XCLIENT"})
# XCLIENT ends a group too (Postfix 3.7 logs "improper command pipelining after XCLIENT").
# STARTTLS ends a group too, but Postfix looks only once it knows TLS is offered
# (_cmd_starttls).
_LAST_IN_GROUP = frozenset({"HELO", "EHLO", "DATA", "VRFY", "NOOP", "QUIT", "XCLIENT"})


_REPLY_BYTES: dict = {}   # Reply -> its wire form (bounded; see _queue_reply)
# Entries of ServerConnection.transcript kept at most (bounded memory; Postfix flushes
# its history at EHLO/RSET/end of DATA past smtpd_history_flush_threshold).
TRANSCRIPT_LIMIT = 500


# A DATA line the fast path cannot pass on as it is: LF "." (RFC 5321 4.5.2 transparency,
# or the terminator) or an LF without its CR.  One C-level scan instead of four.
_DATA_SPECIAL = re.compile(rb"\n(?:\.|(?<!\r\n))")


def _may_have_long_line(chunk: bytes, limit: int) -> bool:
    """False when no LF-separated piece of ``chunk`` is longer than ``limit``.  A piece
    of limit+1 bytes or more holds a whole aligned block of (limit+1)//2 bytes without
    LF, so a few find() calls stand in for splitting every message into lines."""
    step = (limit + 1) // 2
    find = chunk.find
    for start in range(0, len(chunk) - step + 1, step):
        if find(b"\n", start, start + step) < 0:
            return True
    return False


class ServerConnection:
    def __init__(self, config: ServerConfig | None = None, client: str = "unknown[unknown]",
                 forbid_bare_newline: str | None = None) -> None:
        self.config = config or ServerConfig()
        self.client = client
        self.bare_newline = forbid_bare_newline or self.config.forbid_bare_newline
        self.state = S_GREETING
        self.where = "CONNECT"
        self.closed = False
        self.tls_active = False
        self.authenticated = False
        # Per session: the glue offers other mechanisms once TLS is up (RFC 4954 4).
        self.auth_mechanisms: tuple = tuple(self.config.auth_mechanisms)
        self.auth_advertised = True           # False: smtpd_sasl_exceptions_networks match
        # smtpd_authorized_xforward_hosts matched (the glue sets it): XFORWARD works.
        self.xforward_allowed = False
        # smtpd_authorized_xclient_hosts matched (the glue sets it, again after XCLIENT).
        self.xclient_allowed = False
        self.helo_name: str | None = None
        self.client_port = ""                 # for smtpd_reject_footer's $client_port
        # Postfix's session history for the notify_classes notice: command lines (str)
        # and replies (wire bytes) in order.  None: not kept (the glue sets a list).
        self.transcript: list | None = None
        # The resolver's verdict on a MAIL/RCPT address (Postfix's smtpd_check_addr():
        # allow_min_user's '-', a malformed domain behind a local one), asked with the
        # syntax checks, before any parameter; None: not asked (sendmail -bs).
        self.address_check: Callable[[str], bool] | None = None
        self._line_text = ""                  # the command line being handled, as sent
        self.esmtp = False
        self._inbuf = bytearray()
        self._eof = False
        self._out: list[bytes] = []
        self._events: list[Event] = []
        self._pending: Event | None = None   # event awaiting send_reply
        self._pending_cmd: str | None = None  # counter name of the pending command
        self._delay = 0.0
        self.error_count = 0
        self._attempts: dict[str, int] = {}
        self._successes: dict[str, int] = {}
        self._reset_transaction()
        # DATA/BDAT reader state
        self._discard_line = False            # skipping the rest of an over-long command line
        self._bdat_remaining = 0
        self._bdat_last = False
        self._bdat_discard = False            # chunk is read and thrown away
        self._bdat_active = False             # a BDAT sequence is open (Postfix's "after BDAT")
        self._bdat_error: Reply | None = None  # repeated to later chunks of a refused sequence
        self._bdat_skip_reply = False
        self._bdat_late: Reply | None = None   # error reply owed once the chunk is skipped
        self._bdat_tail = b"\n"
        self._long_line: bytes | None = None
        self._bare_lf = False
        self._junk = 0
        self._access_denied = False
        self.pipelining_violation = False     # for reject_unauth_pipelining
        self._datapart: list[bytes] = []
        self._line_start = True
        self._data_line = 0                   # bytes of an over-long DATA line passed on
        self._data_partial = 0                # what _data_size counted of them so far
        self._prev_crlf = True

    # ----- public API --------------------------------------------------------------------

    def send_greeting(self, reply: Reply) -> None:
        self._queue_reply(reply)
        if reply.code >= 400 and not self._access_denied:
            # RFC 5321 3.1: a 554/421 greeting; we answer nothing more and close.
            self._close("greeting rejected")
        else:
            self.state = S_CMD

    def deny_access(self) -> None:
        """The client was refused at connect time (call before send_greeting(reject)): the
        reject is the greeting, then every command but QUIT gets 503 (Postfix)."""
        self._access_denied = True

    def receive_data(self, data: bytes) -> None:
        if not data:
            self._eof = True
            return
        if self.closed or self.state == S_TLS:
            # RFC 3207 4 / CVE-2011-0411: plaintext after STARTTLS must never be executed.
            return
        self._inbuf += data

    def next_event(self):
        if self._events:
            return self._events.pop(0)
        if self._pending is not None:
            return PAUSED
        while not self.closed and self._pending is None and not self._events:
            if not self._step():
                break
        if self._events:
            return self._events.pop(0)
        if self._pending is not None:
            return PAUSED
        if self._eof and not self.closed:
            self.abort("lost")
            return self._events.pop(0)
        return NEED_DATA

    def send_reply(self, reply: Reply | None = None) -> None:
        ev = self._pending
        if ev is None:
            raise RuntimeError("send_reply() without a pending event")
        self._pending = None
        if reply is None:
            reply = ev.default
        self._on_reply(ev, reply)

    def accept(self) -> None:
        self.send_reply(None)

    def reject_keeping_transaction(self, reply: Reply) -> None:
        """Answer the pending DataEnd with a reject that leaves the envelope in place:
        Postfix 3.7 answers an smtpd_end_of_data_restrictions reject without resetting
        the transaction, so MAIL stays "nested" until RSET/HELO/EHLO and recipients
        may be added (checked against 3.7)."""
        if not isinstance(self._pending, DataEnd):
            raise RuntimeError("reject_keeping_transaction() without a pending DataEnd")
        kept = (self.sender, self._mail_smtputf8, self.recipients, self.rcpt_attempts,
                self._declared_size, self.xforward, self.xforward_client)
        self.send_reply(reply)
        (self.sender, self._mail_smtputf8, self.recipients, self.rcpt_attempts,
         self._declared_size, self.xforward, self.xforward_client) = kept

    def data_to_send(self) -> bytes:
        out = b"".join(self._out)
        self._out.clear()
        return out

    def error_delay(self) -> float:
        d, self._delay = self._delay, 0.0
        return d

    def abort(self, reason: str) -> None:
        """End the session from outside (EOF, timeout): a DATA, BDAT or AUTH exchange
        being read counts as a failed attempt, as in Postfix's "data=0/1"."""
        if self.closed:
            return
        if self.state == S_DATA:
            self._count("data", False)
        elif self.state == S_BDAT:
            self._count("bdat", False)
        elif self.state == S_TLS:
            self._count("starttls", False)
        elif self.state == S_AUTH:
            # An exchange left waiting for the client's response failed (auth=0/1).
            self._count("auth", False)
        self._close(reason)

    def tls_started(self) -> None:
        # RFC 3207 4.2: forget everything learnt before TLS, including HELO.
        if self.state == S_TLS:
            self._count("starttls", True)
        self.tls_active = True
        self._inbuf.clear()
        self.helo_name = None
        self.esmtp = False
        self.authenticated = False
        self._reset_transaction()
        self.state = S_CMD

    def counters_text(self) -> str:
        parts = []
        total_ok = total = 0
        for name in _COUNTER_ORDER:
            n = self._attempts.get(name, 0)
            if not n:
                continue
            ok = self._successes.get(name, 0)
            parts.append(f"{name}={ok}" if ok == n else f"{name}={ok}/{n}")
            total += n
            total_ok += ok
        # Postfix prints "commands=0/0" for a session without any command.
        parts.append(f"commands={total_ok}" if total_ok == total and total
                     else f"commands={total_ok}/{total}")
        return " ".join(parts)

    @property
    def where(self) -> str:
        """The "after ..." part of Postfix's lost-connection / timeout log lines."""
        if self.state == S_DATA:
            return f"DATA ({self._data_count()} bytes)"
        if self.state == S_BDAT:
            # A refused chunk is skipped, not received: Postfix says just "BDAT" then.
            return "BDAT" if self._bdat_discard else f"BDAT ({self._bdat_total} bytes)"
        return self._where

    @where.setter
    def where(self, value: str) -> None:
        self._where = value

    def timeout_where(self) -> str:
        """``where`` for the "timeout after ..." log line.  A BDAT chunk cut short by
        the timeout is logged by Postfix 3.7 as the count of the chunks before it plus
        the length of its 421 reply's text (checked against 3.7: "BDAT (49 bytes)" with
        myhostname mx.example.test, whatever part of the chunk came)."""
        if self.state == S_BDAT and not self._bdat_discard:
            text = f"421 4.4.2 {self.config.hostname} Error: timeout exceeded"
            return f"BDAT ({self._act_chunk_start + len(text)} bytes)"
        return self.where

    @property
    def _smtputf8_offered(self) -> bool:
        c = self.config
        return c.smtputf8_enable and "SMTPUTF8" not in c.discard_ehlo_keywords

    @property
    def _dsn_disabled(self) -> bool:
        # smtpd_discard_ehlo_keywords = dsn also refuses the DSN parameters (Postfix).
        return "DSN" in self.config.discard_ehlo_keywords

    @property
    def in_transaction(self) -> bool:
        return self.sender is not None

    @property
    def buffered(self) -> int:
        return len(self._inbuf)

    # ----- internals: replies and accounting ----------------------------------------------

    def _reset_transaction(self) -> None:
        # XFORWARD attributes describe one message: Postfix forgets them with it.
        self.xforward: dict[str, str] = {}
        # Whether XFORWARD named any client attribute, "[UNAVAILABLE]" included: Postfix
        # then logs orig_client= (its SMTPD_STATE_XFORWARD_CLIENT_MASK flags).
        self.xforward_client = False
        self.sender: str | None = None
        self._mail_smtputf8 = False
        self.recipients: list[str] = []
        self.rcpt_attempts = 0
        self._declared_size = 0
        # MAIL FROM's AUTH= value, kept from a MAIL refused after it was parsed until the
        # transaction is reset, as Postfix's state->sasl_sender (3.7, side by side).
        self._sticky_sasl_sender: str | None = None
        self._data_size = 0
        self._too_big = False
        self._bdat_active = False
        self._bdat_total = 0
        self._bdat_started = False
        self._bdat_discard = False
        self._bdat_error = None
        self._bdat_tail = b"\n"
        self._bare_lf = False
        self._act_size = 0            # Postfix's count for "Ok: N bytes queued as"
        self._act_line = 0            # bytes of the line not yet ended by LF
        self._act_cr = False          # that line's last byte is CR
        self._act_chunk_start = 0     # _act_size before the BDAT chunk being read

    def _count_act(self, chunk: bytes) -> None:
        """Postfix's BDAT byte count (its act_size): each line's text plus 2 for the line
        end, a bare LF as CRLF, and a line of line_length_limit or more once more per
        record it fills (checked against 3.7).  Line-level work only for long lines."""
        parts = chunk.split(b"\n")
        tail = parts.pop()
        if parts:
            limit = self.config.line_length_limit
            crlf = chunk.count(b"\r\n")
            if not parts[0] and self._act_line and self._act_cr:
                crlf += 1             # a CRLF split across two chunks
            self._act_size += self._act_line + sum(map(len, parts)) - crlf + 2 * len(parts)
            if self._act_line + len(parts[0]) >= limit or max(map(len, parts)) >= limit:
                first = True
                for part in parts:
                    n = len(part) + (self._act_line if first else 0)
                    if part.endswith(b"\r") or (first and not part and self._act_cr):
                        n -= 1
                    self._act_size += 2 * (n // limit)
                    first = False
            self._act_line = 0
            self._act_cr = False
        if tail:
            self._act_line += len(tail)
            self._act_cr = tail.endswith(b"\r")

    def _queue_reply(self, reply: Reply) -> None:
        # smtpd_soft_error_limit: once that many errors were made, every reply is slowed
        # down (the glue sleeps), by smtpd_error_sleep_time per reply line, as Postfix's
        # smtpd_chat_reply() sleeps per line.  A command's own error is counted after its
        # reply went out (Postfix counts when the command handler returns), so the error
        # that reaches the limit is answered at once (checked against 3.7).
        code = reply.code
        if code >= 400:
            if code == 421 or code == 521:
                # RFC 5321 3.8 / 4.2.2 (521, RFC 7504): the server closes the channel
                # after these.  Like Postfix's hang-up flag: the command being handled
                # finishes, then the next step ends the session instead of reading on
                # (an instance attribute, so ordinary steps pay nothing for it).
                self._step = self._hang_up
            if self.config.reject_footer or self.config.footer_lookup is not None:
                reply = self._with_footer(reply)
        if self.error_count >= self.config.soft_error_limit:
            self._delay += self.config.error_sleep_time * (reply.text.count("\n") + 1)
        # Most replies repeat ("250 2.1.0 Ok", "354 ..."): a dict hit is cheaper than
        # formatting the lines again for every command.
        if type(reply) is Reply:
            data = _REPLY_BYTES.get(reply)
            if data is None:
                data = reply.to_bytes()
                if len(_REPLY_BYTES) >= 512:
                    _REPLY_BYTES.clear()     # unique replies ("queued as ID") must not pile up
                _REPLY_BYTES[reply] = data
        else:
            data = reply.to_bytes()
        self._out.append(data)
        t = self.transcript
        if t is not None and len(t) < TRANSCRIPT_LIMIT:
            t.append(data)

    def _footer_template(self, reply: Reply) -> str:
        """smtpd_reject_footer_maps, searched with the whole reply ("550 5.1.1 <a@b>:
        ..."); no entry (or an empty one) leaves smtpd_reject_footer."""
        try:
            found = self.config.footer_lookup(str(reply))
        except Exception as exc:    # a failing table: the plain footer, and warnings
            for text in str(exc).split("\n"):
                self._warn(text)
            return self.config.reject_footer
        # An empty entry stops the search (the hook's) and leaves the plain footer.
        return found if found is not None and found.strip() else self.config.reject_footer

    def _with_footer(self, reply: Reply) -> Reply:
        template = (self._footer_template(reply) if self.config.footer_lookup is not None
                    else self.config.reject_footer)
        if not template:
            return reply
        client = self.client
        if not client.endswith("]"):
            client = client.rpartition(":")[0]     # smtpd_client_port_logging's ":port"
        name, _, addr = client.rpartition("[")
        values = {"client_address": addr.rstrip("]"), "client_name": name,
                  "client_port": self.client_port, "server_name": self.config.hostname,
                  "helo_name": self.helo_name or "", "sender": self.sender or ""}

        def expand(m: re.Match) -> str:
            key = m.group(1) or m.group(2)
            if key not in values and key not in _FOOTER_KNOWN:
                self._warn(f'unknown macro name "{key}" in expansion request')
            return values.get(key, "")
        text = _FOOTER_MACRO.sub(expand, template)
        if text.startswith("\\c"):
            return Reply(reply.code, reply.text + text[2:].replace("\\n", "\n"), reply.enhanced)
        return Reply(reply.code, reply.text + "\n" + text.replace("\\n", "\n"), reply.enhanced)

    def _count(self, name: str, ok: bool) -> None:
        self._attempts[name] = self._attempts.get(name, 0) + 1
        if ok:
            self._successes[name] = self._successes.get(name, 0) + 1

    def _error(self, name: str, reply: Reply) -> None:
        """An engine-decided error reply to command `name`."""
        self._count(name, False)
        self._queue_reply(reply)
        self.error_count += 1

    def _ok(self, name: str, reply: Reply) -> None:
        self._count(name, True)
        self._queue_reply(reply)

    def _ask(self, name: str, ev: Event) -> None:
        self._pending = ev
        self._pending_cmd = name
        self._events.append(ev)

    def _warn(self, text: str, with_queue_id: bool = False) -> None:
        self._events.append(Warning(text, with_queue_id))

    def _close(self, reason: str) -> None:
        self._where = self.where
        self.closed = True
        self.state = S_CLOSED
        self._inbuf.clear()
        self._events.append(ConnectionClosed(reason))

    def _on_reply(self, ev: Event, reply: Reply | None) -> None:
        name = self._pending_cmd
        ok = reply is None or reply.code < 400
        if isinstance(ev, (Helo, Ehlo)):
            self._count(name, ok)
            self._queue_reply(reply)
            if not ok:
                self.error_count += 1
            if ok:
                self.helo_name = ev.name
                # HELO after EHLO keeps the protocol ESMTP: Postfix never downgrades
                # it (logs say proto=ESMTP, pipelining stays allowed; 3.7 side by side).
                self.esmtp = self.esmtp or isinstance(ev, Ehlo)
                self._reset_transaction()
        elif isinstance(ev, Mail):
            self._count(name, ok)
            self._queue_reply(reply)
            if not ok:
                self.error_count += 1
            if ok:
                self.sender = ev.sender
                self._mail_smtputf8 = bool(ev.smtputf8)
        elif isinstance(ev, Rcpt):
            self._count(name, ok)
            self._queue_reply(reply)
            if not ok:
                self.error_count += 1
            if ok:
                self.recipients.append(ev.recipient)
        elif isinstance(ev, Data):
            self._queue_reply(reply)
            if reply.code == 354:
                self.state = S_DATA
                self.where = "DATA"
                self._line_start = True
                self._prev_crlf = True
                self._data_size = 0
                self._data_line = self._data_partial = 0
                self._too_big = False
                self._bare_lf = False
                self._datapart = []
            else:
                self._count("data", False)
                self.error_count += 1
        elif isinstance(ev, Bdat):
            if ok and reply is not None:
                self._queue_reply(reply)
            if ok:
                self._bdat_started = True
                self._bdat_discard = False
            else:
                # Answered (and counted) once the refused chunk has been skipped, as
                # Postfix does.
                self._bdat_late = reply
                self._bdat_discard = True
                self._bdat_error = reply
                self._bdat_skip_reply = True
            self.state = S_BDAT
            self.where = "BDAT"
        elif isinstance(ev, BdatChunkEnd):
            self._count("bdat", ok)
            self._queue_reply(reply)
            if not ok:
                self.error_count += 1
            self.where = f"BDAT ({self._bdat_total} bytes)"
        elif isinstance(ev, DataEnd):
            cmd = "bdat" if ev.bdat else "data"
            self._count(cmd, ok)
            if ok:
                self.error_count = 0   # the limits count errors "without delivering mail"
                self._junk = 0
            self._queue_reply(reply)
            if not ok:
                self.error_count += 1
            self._reset_transaction()
            self.where = "END-OF-MESSAGE"
        elif isinstance(ev, (Vrfy, Etrn)):
            self._count(name, ok)
            self._queue_reply(reply)
            if not ok:
                self.error_count += 1
        elif isinstance(ev, StartTls):
            if reply.code != 220:
                # A 220 counts once the handshake is done (Postfix: starttls=0/1 on failure).
                self._count("starttls", False)
            self._queue_reply(reply)
            if reply.code == 220:
                # RFC 3207 4 / CVE-2011-0411: drop whatever was pipelined after STARTTLS.
                self._inbuf.clear()
                self.state = S_TLS
            else:
                self.error_count += 1
        elif isinstance(ev, Xclient):
            self._xclient_done(ev, reply)
        elif isinstance(ev, (Auth, AuthResponse)):
            self._queue_reply(reply)
            if reply.code == 334:
                self.state = S_AUTH
                return
            self.state = S_CMD
            self._count("auth", ok)
            if ok:
                self.authenticated = True
            else:
                self.error_count += 1

    # ----- internals: input processing ----------------------------------------------------

    def _hang_up(self) -> bool:
        """_step() once a 421 or 521 reply went out: no more input is read."""
        if not self.closed:
            self._close("hangup")
        return False

    def _step(self) -> bool:
        """Process some input; False when more data is needed."""
        if self.state == S_CMD or self.state == S_AUTH:
            return self._read_command()
        if self.state == S_DATA:
            return self._read_data()
        if self.state == S_BDAT:
            return self._read_bdat()
        return False

    def _take_line(self) -> bytes | None:
        """One command line without its ending; over-long lines are truncated (Postfix)."""
        limit = warn_at = self.config.line_length_limit
        if self.state == S_AUTH:
            # One past smtpd_sasl_response_limit: a truncated response still reads as
            # too long to the SASL layer (500 5.5.6), memory stays bounded.  The
            # warning names the configured limit, as Postfix's does.
            limit = max(limit, self.config.auth_response_limit + 1)
            warn_at = max(self.config.line_length_limit, self.config.auth_response_limit)
        buf = self._inbuf
        while True:
            i = buf.find(b"\n")
            if self._discard_line:
                if i < 0:
                    buf.clear()
                    return None
                del buf[:i + 1]
                self._discard_line = False
                line = self._long_line
                self._long_line = None
                return line
            if i < 0:
                # A lone CR at the limit may still be half of the line's CRLF.
                if len(buf) > limit or (len(buf) == limit and buf[-1:] != b"\r"):
                    line = bytes(buf[:limit])
                    self._long_line = line
                    self._discard_line = True
                    self._warn(f"{self.client}: request longer than {warn_at}: "
                               f"{line[:30].decode('utf-8', 'replace')}...")
                    buf.clear()
                    continue
                return None
            # One copy of the line, without its CR, instead of a copy and a slice.
            bare_lf = not (i and buf[i - 1] == 0x0D)
            line = bytes(buf[:i]) if bare_lf else bytes(buf[:i - 1])
            del buf[:i + 1]
            if len(line) >= warn_at:
                self._warn(f"{self.client}: request longer than {warn_at}: "
                           f"{line[:30].decode('utf-8', 'replace')}...")
                line = line[:limit]
            if bare_lf and self.bare_newline == "reject":
                self._bare_lf_reject()
                return None
            return line

    def _bare_lf_reply(self) -> Reply:
        return Reply(self.config.bare_newline_reject_code,
                     f"{self.config.hostname} Error: bare <LF> received", "5.5.2")

    def _bare_lf_reject(self) -> None:
        # smtpd_forbid_bare_newline = reject, in a command: Postfix 3.7.11 answers 550 and
        # hangs up, logging "NOQUEUE: reject: <where> from ...: bare <LF> received".
        self._events.append(Rejected(self._where, self._bare_lf_reply(), None,
                                     "bare <LF> received"))
        self._queue_reply(self._bare_lf_reply())
        self.error_count += 1
        self._close("bare newline")

    def _read_command(self) -> bool:
        if self.error_count >= self.config.hard_error_limit and self.state == S_CMD:
            # Postfix checks smtpd_hard_error_limit before it reads the next command:
            # the 421 follows the error that reached the limit at once (3.7, side by side).
            self._queue_reply(Reply(421, f"{self.config.hostname} Error: too many errors", "4.7.0"))
            self._close("too many errors")
            return False
        line = self._take_line()
        if line is None:
            return False
        raw = line
        nul = line.find(b"\x00")
        if nul >= 0:
            line = line[:nul]        # Postfix reads commands as C strings: NUL ends the line
        t = self.transcript
        if self.config.smtputf8_enable and self.state != S_AUTH:
            try:
                text = line.decode("utf-8")
                if nul >= 0:
                    raw[nul:].decode("utf-8")   # Postfix checks past a NUL too (3.7)
            except UnicodeDecodeError:
                if t is not None and len(t) < TRANSCRIPT_LIMIT:
                    t.append(line.decode("utf-8", "replace"))
                # RFC 6531 3.3; not counted as a command, as Postfix does.
                self._queue_reply(Reply(500, "Error: bad UTF-8 syntax", "5.5.2"))
                self.error_count += 1
                return True
        else:
            text = line.decode("utf-8", "surrogateescape")
        if t is not None and len(t) < TRANSCRIPT_LIMIT:
            t.append(text)
        if self.state == S_AUTH:
            self.state = S_CMD
            if text == "*":
                # RFC 4954 4: the client cancels the exchange.
                self._error("auth", Reply(501, "Authentication aborted", "5.7.0"))
                self._events.append(AuthAborted())
                return True
            self._pending = AuthResponse(text)
            self._pending_cmd = "auth"
            self._events.append(self._pending)
            return True
        if self.error_count >= self.config.hard_error_limit:
            if t and t[-1] is text:
                t.pop()              # Postfix hangs up before reading this line
            self._queue_reply(Reply(421, f"{self.config.hostname} Error: too many errors", "4.7.0"))
            self._close("too many errors")
            return False
        if self.config.command_filter:
            text = self._filter_command(text)
        parts = text.strip(" \t").split(None, 1)
        if not parts:
            # An empty line is an error but no command: Postfix leaves it out of the
            # "disconnect ... commands=" counters (checked against 3.7).
            self._queue_reply(Reply(500, "Error: bad syntax", "5.5.2"))
            self.error_count += 1
            return True
        verb = parts[0]
        arg = parts[1] if len(parts) == 2 else ""
        verb_u = verb.upper()
        if self.config.noop_commands and verb_u in self.config.noop_commands:
            # smtpd_noop_commands: "250 Ok" without syntax checks, state or counters,
            # but still junk (Postfix's smtpd_proto(), ahead of its command table).
            self._queue_reply(_REPLY_NOOP_OK)
            self._junk += 1
            if self._junk > self.config.junk_command_limit:
                self.error_count += 1
            return True
        if self._forbidden(verb_u, text):
            # smtpd_forbidden_commands: HTTP proxies, mail headers sent as commands.
            # The whole line, NUL and what follows included, escaped and then cut at
            # 100 characters (Postfix 3.7, side by side).
            shown = c_escape(bytes(raw))[:100]
            self._warn(f"non-SMTP command from {self.client}: {shown}")
            self._count("unknown", False)
            self._queue_reply(Reply(221, "Error: I can break rules, too. Goodbye.", "2.7.0"))
            self._close("non-SMTP command")
            return False
        handler = _COMMANDS.get(verb_u)
        if (self.config.tls_required and not self.tls_active and handler is not None
                and verb_u not in _PRE_TLS and not self._access_denied):
            # RFC 3207 4: with mandatory TLS only these commands work before STARTTLS
            # (Postfix's list; counted as failed attempts, as Postfix does).
            self.where = verb_u
            self._error(verb_u.lower(), Reply(530, "Must issue a STARTTLS command first", "5.7.0"))
            return True
        if self._access_denied and verb_u != "QUIT":
            # RFC 5321 3.1: after a refusing greeting, everything but QUIT gets 503.
            # A refused command is no state of the session: "lost connection after"
            # still names the command that was refused (CONNECT, XCLIENT), as Postfix.
            self._error(verb.lower() if handler is not None else "unknown",
                        Reply(503, f"Error: access denied for {self.client}", "5.7.0"))
            return True
        if handler is None:
            # Postfix's "too many errors after UNKNOWN" / "lost connection after UNKNOWN".
            self.where = "UNKNOWN"
            self._error("unknown", Reply(500, "Error: command not recognized", "5.5.2"))
            return True
        self._where = verb_u                # the ``where`` setter, without the call
        if (self._inbuf and not self.pipelining_violation
                and (verb_u in _LAST_IN_GROUP or not self.esmtp)):
            # RFC 2920 3.1: these commands end a group, and without EHLO there is no
            # PIPELINING at all; more input means the client did not wait for our reply.
            # Postfix logs it once per session (same command set, checked against 3.7).
            self._log_pipelining(verb_u)
            if self.config.forbid_unauth_pipelining:
                # smtpd_forbid_unauth_pipelining (3.7.11): the command does not run; the
                # client hears why and the session ends (a smuggling defence).
                self._count(verb_u.lower(), False)
                self._queue_reply(Reply(554, "Error: SMTP protocol synchronization", "5.5.0"))
                self._close("hangup")
                return True
        self._line_text = text
        handler(self, arg.strip(" \t"))
        if verb_u in _JUNK_COMMANDS:
            # smtpd_junk_command_limit: past it, each junk command counts as an error.
            self._junk += 1
            if self._junk > self.config.junk_command_limit:
                self.error_count += 1
        return True

    def _filter_command(self, text: str) -> str:
        """smtpd_command_filter: the line, leading blanks skipped, is the lookup key; a
        result replaces the whole command (Postfix logs the swap, both cut at 100)."""
        try:
            found = self.config.command_filter(text.lstrip(" \t"))
        except Exception as exc:    # a failing table: the command as sent
            for line in str(exc).split("\n"):
                self._warn(line)
            return text
        if found is None:
            return text
        self._events.append(Info(f"{self.client}: replacing command \"{text[:100]}\" "
                                 f"with \"{found[:100]}\""))
        return found

    def _log_pipelining(self, verb_u: str) -> None:
        self.pipelining_violation = True
        rest = c_escape(bytes(self._inbuf[:100]))
        self._events.append(Info(f"improper command pipelining after {verb_u} from "
                                 f"{self.client}: {rest}"))

    # ----- commands (one handler each; the sequence rules live in these guards) -----------

    def _forbidden(self, verb_u: str, line: str) -> bool:
        c = self.config
        if verb_u in c.forbidden_commands:
            return True
        if c.forbid_non_alpha and not ("A" <= verb_u[0] <= "Z"):
            return True
        # A header-like line ("Subject: x") has its colon inside the first word, so a
        # verb without one can skip the regex that every command line would pay for.
        return ":" in verb_u and _HEADER_LIKE.match(line) is not None

    def _cmd_helo(self, arg: str, ehlo: bool = False) -> None:
        name = "ehlo" if ehlo else "helo"
        if not arg:
            # Postfix sends this one without an enhanced code.
            self._error(name, Reply(501, f"Syntax: {name.upper()} hostname"))
            return
        arg = neuter_helo(arg, self.config.smtputf8_enable)
        if ehlo:
            discard = self.config.discard_ehlo_keywords
            # Postfix stays silent when ENHANCEDSTATUSCODES is among them (3.7's ehlo_cmd).
            if discard and not discard & {"SILENT-DISCARD", "ENHANCEDSTATUSCODES"}:
                names = [_EHLO_MASK_NAMES.get(k, k) for k in _EHLO_MASK_ORDER if k in discard]
                if names:
                    self._events.append(Info(f"discarding EHLO keywords: {' '.join(names)}"))
            self._ask(name, Ehlo(arg, self._ehlo_reply()))
        else:
            self._ask(name, Helo(arg, Reply(250, self.config.hostname)))

    def _cmd_ehlo(self, arg: str) -> None:
        self._cmd_helo(arg, ehlo=True)

    def _ehlo_reply(self) -> Reply:
        # The same few replies every session: made once per configuration and session
        # settings (a bounded cache; an unhashable mechanism list is just not cached).
        key = (self.tls_active, self.auth_mechanisms, self.auth_advertised,
               self.xclient_allowed, self.xforward_allowed)
        made = self.config._ehlo_replies
        try:
            reply = made.get(key)
        except TypeError:
            return self._make_ehlo_reply()
        if reply is None:
            reply = self._make_ehlo_reply()
            if len(made) < 64:
                made[key] = reply
        return reply

    def _make_ehlo_reply(self) -> Reply:
        c = self.config
        lines = [c.hostname]
        offered = {
            "PIPELINING": "PIPELINING",
            "SIZE": f"SIZE {c.message_size_limit}" if c.message_size_limit else "SIZE",
            "VRFY": None if c.disable_vrfy else "VRFY",
            "ETRN": "ETRN",
            "STARTTLS": "STARTTLS" if c.starttls_offered and not self.tls_active else None,
            # broken_sasl_auth_clients: Outlook Express 4 / MS Exchange 5.0 want "AUTH=".
            "AUTH": (("AUTH " + " ".join(self.auth_mechanisms)
                      + ("\nAUTH=" + " ".join(self.auth_mechanisms) if c.auth_legacy else ""))
                     if self.auth_mechanisms and self.auth_advertised else None),
            "ENHANCEDSTATUSCODES": "ENHANCEDSTATUSCODES",
            "8BITMIME": "8BITMIME",
            "DSN": "DSN",
            "SMTPUTF8": "SMTPUTF8" if c.smtputf8_enable else None,
            "CHUNKING": "CHUNKING",
            "XCLIENT": _xclient.EHLO_KEYWORD if self.xclient_allowed else None,
            "XFORWARD": ("XFORWARD " + " ".join(_XFORWARD_ATTRS)) if self.xforward_allowed
                        else None,
        }
        for kw in EHLO_KEYWORDS_ORDER:
            line = offered[kw]
            if line and kw not in c.discard_ehlo_keywords:
                lines.append(line)
        return Reply(250, "\n".join(lines))

    def _cmd_mail(self, arg: str) -> None:
        if self.config.helo_required and self.helo_name is None:
            # smtpd_helo_required comes before any syntax check (Postfix's mail_cmd; 3.7).
            self._error("mail", Reply(503, "Error: send HELO/EHLO first", "5.5.1"))
            return
        if self.in_transaction:
            self._error("mail", Reply(503, "Error: nested MAIL command", "5.5.1"))
            return
        if self._bdat_active:
            self._error("mail", Reply(503, "Error: MAIL after BDAT", "5.5.1"))
            return
        if arg[:5].upper() != "FROM:":
            self._error("mail", Reply(501, "Syntax: MAIL FROM:<address>", "5.5.4"))
            return
        rest = arg[5:]
        if not rest.strip():
            self._error("mail", Reply(501, "Syntax: MAIL FROM:<address>", "5.5.4"))
            return
        try:
            sender, params = parse_path(rest, null_ok=True)
            if self.config.strict_rfc821_envelopes and (
                    sender.startswith("@") or not _strict_821_ok(_address_token(rest)[0])):
                raise _SyntaxError      # "<@x>", '<""@x>' too: no local part (Postfix)
            utf8 = self._smtputf8_offered and any(p.upper() == "SMTPUTF8" for p in params)
            if sender and (domain_error(sender, utf8, self.config.resolve_numeric_domain) or (
                    self.address_check is not None and self.address_check(sender))):
                raise _SyntaxError
        except _SyntaxError:
            token, unbalanced = _address_token(rest)
            if not unbalanced:
                self._warn(f"Illegal address syntax from {self.client} in MAIL command: {token}")
            self._error("mail", Reply(501, "Bad sender address syntax", "5.1.7"))
            return
        kw: dict = {"_sender": sender}
        if self._sticky_sasl_sender is not None:
            kw["_auth_seen"] = True
            kw["sasl_sender"] = self._sticky_sasl_sender
        for p in params:
            key, eq, val = p.partition("=")
            k = key.upper()
            bad = self._mail_param(k, eq, val, kw, p)
            if bad is not None:
                self._error("mail", bad)
                return
        del kw["_sender"]
        kw.pop("_auth_seen", None)
        limit = self.config.message_size_limit
        if limit and self._declared_size > limit:
            # RFC 1870 6. Postfix keeps a refused MAIL's SIZE until RSET/EHLO/end of
            # message, so a retry without SIZE is refused again (checked against 3.7).
            reply = Reply(552, "Message size exceeds fixed limit", "5.3.4")
            self._events.append(Rejected("MAIL", reply, sender))
            self._error("mail", reply)
            return
        self._ask("mail", Mail(sender, **kw))

    def _mail_param(self, k, eq, val, kw, raw) -> Reply | None:
        unsupported = Reply(555, f"Unsupported option: {raw}", "5.5.4")
        if k in ("RET", "ENVID") and eq and self._dsn_disabled:
            return REPLY_DSN_DISABLED
        if k == "SIZE" and eq:
            # RFC 1870 6
            if not re.fullmatch(r"[0-9]+", val):
                return Reply(501, "Bad message size syntax", "5.5.4")
            if int(val) > 0x7FFFFFFFFFFFFFFF:
                return Reply(552, "Message size exceeds file system imposed limit", "5.3.4")
            # The limit is checked after every parameter is parsed (below): a bad one
            # later on the line is answered first (Postfix 3.7, side by side).
            self._declared_size = int(val)
            kw["size"] = int(val)
        elif k == "BODY" and eq:
            # RFC 6152 2 (8BITMIME); BINARYMIME (RFC 3030 3) only with BDAT, which we do not
            # advertise for binary content, so refuse it like Postfix.
            if val.upper() not in ("7BIT", "8BITMIME"):
                return unsupported
            kw["body"] = val.upper()
        elif k == "SMTPUTF8" and not eq and self._smtputf8_offered:
            kw["smtputf8"] = True     # RFC 6531 3.4
        elif k == "RET" and eq:
            # RFC 3461 4.3
            if val.upper() not in ("FULL", "HDRS") or "ret" in kw:
                return Reply(501, "Bad RET parameter syntax", "5.5.4")
            kw["ret"] = val.upper()
        elif k == "ENVID" and eq:
            # RFC 3461 4.4
            try:
                if "envid" in kw:
                    raise ValueError
                # Postfix: xtext_unquote() then allprint() of the C string.
                envid = unquote_xtext(val).split("\0", 1)[0]
                if not envid or not all(" " <= ch <= "~" for ch in envid):
                    raise ValueError
                kw["envid"] = envid
            except ValueError:
                return Reply(501, "Bad ENVID parameter syntax", "5.5.4")
        elif k == "AUTH" and eq:
            # RFC 4954 5: accepted and (unless trusted) ignored; Postfix refuses a second
            # one, with or without AUTH enabled (checked against 3.7).
            if "_auth_seen" in kw:
                return Reply(503, "Error: multiple AUTH= options", "5.5.4")
            if val != "<>":
                kw["_auth_seen"] = True
                kw["sasl_sender"] = "".join("?" if ord(ch) < 0x20 or ord(ch) == 0x7F else ch
                                            for ch in val)
                self._sticky_sasl_sender = kw["sasl_sender"]
            try:
                kw["auth"] = decode_xtext(val)
            except ValueError:
                kw["auth"] = None
        else:
            return unsupported
        return None

    def _cmd_rcpt(self, arg: str) -> None:
        if not self.in_transaction:
            self._error("rcpt", Reply(503, "Error: need MAIL command", "5.5.1"))
            return
        if self._bdat_active:
            self._error("rcpt", Reply(503, "Error: RCPT after BDAT", "5.5.1"))
            return
        if arg[:3].upper() != "TO:" or not arg[3:].strip():
            self._error("rcpt", Reply(501, "Syntax: RCPT TO:<address>", "5.5.4"))
            return
        rest = arg[3:]
        try:
            rcpt, params = parse_path(rest, null_ok=False)
            if self.config.strict_rfc821_envelopes and (
                    rcpt.startswith("@") or not _strict_821_ok(_address_token(rest)[0])):
                raise _SyntaxError
            if domain_error(rcpt, self._mail_smtputf8, self.config.resolve_numeric_domain) or (
                    self.address_check is not None and self.address_check(rcpt)):
                raise _SyntaxError
        except _SyntaxError:
            token, unbalanced = _address_token(rest)
            if not unbalanced:
                self._warn(f"Illegal address syntax from {self.client} in RCPT command: {token}")
            self._error("rcpt", Reply(501, "Bad recipient address syntax", "5.1.3"))
            return
        kw: dict = {}
        for p in params:
            key, eq, val = p.partition("=")
            k = key.upper()
            if k in ("NOTIFY", "ORCPT") and eq and self._dsn_disabled:
                self._error("rcpt", REPLY_DSN_DISABLED)
                return
            if k == "NOTIFY" and eq and "notify" not in kw:
                # RFC 3461 4.1: NEVER alone, or any of SUCCESS, FAILURE, DELAY
                items = list(dict.fromkeys(i for i in val.upper().split(",") if i))
                if (not items or any(i not in ("NEVER", "SUCCESS", "FAILURE", "DELAY") for i in items)
                        or ("NEVER" in items and len(items) > 1)):
                    bad = [i for i in val.split(",") if i and i.upper() not in
                           ("NEVER", "SUCCESS", "FAILURE", "DELAY")]
                    if bad:
                        self._warn(f'unknown DSN NOTIFY command value "{bad[0]}" in "{val}"')
                    self._error("rcpt", Reply(501, "Error: Bad NOTIFY parameter syntax", "5.5.4"))
                    return
                kw["notify"] = ",".join(items)
            elif k == "NOTIFY" and eq:
                self._error("rcpt", Reply(501, "Error: Bad NOTIFY parameter syntax", "5.5.4"))
                return
            elif k == "ORCPT" and eq:
                # RFC 3461 4.2: addr-type ";" xtext; RFC 6533 3: the utf-8 type's
                # \x{HEX} escapes instead (decode_orcpt keeps Postfix 3.7's rules).
                # Imported here: the dsn package pulls in policy and queue, which the
                # engine must not need (importing it stays cheap and free of tables).
                from ..dsn.orcpt import decode_orcpt
                decoded = None if "orcpt" in kw else decode_orcpt(val)
                if decoded is None:
                    self._error("rcpt", Reply(501, "Error: Bad ORCPT parameter syntax", "5.5.4"))
                    return
                kw["orcpt"] = decoded
            else:
                self._error("rcpt", Reply(555, f"Unsupported option: {p}", "5.5.4"))
                return
        self.rcpt_attempts += 1
        c = self.config
        if c.recipient_limit and len(self.recipients) >= c.recipient_limit:
            # RFC 5321 4.5.3.1.10: 452 makes the client retry the rest later. Only the
            # overshoot beyond smtpd_recipient_overshoot_limit counts as a client error.
            reply = Reply(452, "Error: too many recipients", "4.5.3")
            # Postfix counts a 452 within the overshoot allowance as a successful RCPT and
            # one beyond it as a failed one, which is also a client error (verified on 3.7).
            overshoot = self.rcpt_attempts > c.recipient_limit + c.recipient_overshoot_limit
            self._count("rcpt", not overshoot)
            self._queue_reply(reply)
            if overshoot:
                self.error_count += 1
            return
        self._ask("rcpt", Rcpt(rcpt, **kw))

    def _cmd_data(self, arg: str) -> None:
        if self._bdat_active:
            self._error("data", Reply(503, "Error: DATA after BDAT", "5.5.1"))
            return
        if not self.recipients:
            if not self.in_transaction:
                self._error("data", Reply(503, "Error: need RCPT command", "5.5.1"))
            else:
                self._error("data", Reply(554, "Error: no valid recipients", "5.5.1"))
            return
        if arg:
            self._error("data", Reply(501, "Syntax: DATA", "5.5.4"))
            return
        self._ask("data", _DATA_EVENT)

    def _cmd_bdat(self, arg: str) -> None:
        # RFC 3030 2: BDAT chunk-size [LAST]
        parts = arg.split()
        if "CHUNKING" in self.config.discard_ehlo_keywords:
            # The chunk that follows cannot be skipped safely: refuse and hang up (Postfix).
            self._error("bdat", Reply(521, "Error: command not implemented", "5.5.1"))
            self._close("bdat disabled")
            return
        if (not parts or len(parts) > 2 or not parts[0].isdigit() or len(parts[0]) > 15
                or (len(parts) == 2 and parts[1].upper() != "LAST")):
            # The chunk boundary is lost: Postfix closes the session.
            line = self._line_text or f"BDAT {arg}"
            self._warn(f"malformed BDAT command syntax from {self.client}: {line[:100]}", True)
            self._error("bdat", Reply(521, "Syntax: BDAT count [LAST]", "5.5.4"))
            self._close("bdat syntax")
            return
        size = int(parts[0])
        last = len(parts) == 2
        self._bdat_remaining = size
        self._bdat_last = last
        self._bdat_cur = size
        self._bdat_skip_reply = False
        if size == 0 and not last:
            # RFC 3030 2 allows it, but an empty non-final chunk is useless: Postfix refuses
            # it and discards the rest of the sequence. Checked before the transaction state
            # and before an earlier chunk's error, with or without MAIL (against 3.7).
            self._warn(f"null BDAT request from {self.client}", True)
            reply = Reply(551, "Null BDAT request", "5.7.1")
            self._bdat_active = True
            self._bdat_late = reply
            self._bdat_discard = True
            self._bdat_error = reply
            self._bdat_skip_reply = True
            self.state = S_BDAT
            return
        if self._bdat_discard:
            # RFC 3030 2: every BDAT gets a reply; the rest of a failed sequence is thrown
            # away, whatever else is wrong (Postfix checks this right after a null chunk).
            self._bdat_active = not last
            self._bdat_late = Reply(551, f"Discarded {size} bytes after earlier error", "5.0.0")
            self._bdat_skip_reply = True
            self.state = S_BDAT
            return
        if not self.recipients:
            self._bdat_active = True
            reply = (Reply(503, "Error: need RCPT command", "5.5.1") if not self.in_transaction
                     else Reply(554, "Error: no valid recipients", "5.5.1"))
            self._bdat_late = reply
            self._bdat_discard = True
            self._bdat_error = reply
            self._bdat_skip_reply = True
            if last:
                self._bdat_active = False
            self.state = S_BDAT
            return
        self._bdat_active = True
        limit = self.config.message_size_limit
        if limit and self._bdat_total + size > limit:
            # Refuse before reading: the chunk is skipped, later chunks get the same answer.
            self._warn(f"BDAT request from {self.client} exceeds message size limit", True)
            reply = Reply(552, "Chunk exceeds message size limit", "5.3.4")
            self._bdat_late = reply
            self._bdat_discard = True
            self._bdat_error = reply
            self._bdat_skip_reply = True
            if last:
                self._bdat_active = False
            self.state = S_BDAT
            return
        self._act_chunk_start = self._act_size if self._bdat_started else 0
        if not self._bdat_started:
            self._data_size = 0
            self._too_big = False
            self._bdat_total = 0
            self._act_size = self._act_line = 0
            self._act_cr = False
            self._pending_cmd = "bdat"
            self._ask("bdat", Bdat(size, last))
            return
        self.state = S_BDAT

    def _cmd_rset(self, arg: str) -> None:
        if arg:
            self._error("rset", Reply(501, "Syntax: RSET", "5.5.4"))
            return
        self._reset_transaction()
        self._ok("rset", _REPLY_NOOP_OK)
        self._events.append(Rset())

    def _cmd_noop(self, arg: str) -> None:
        self._ok("noop", _REPLY_NOOP_OK)

    def _cmd_quit(self, arg: str) -> None:
        self._ok("quit", _REPLY_BYE)
        self._close("quit")

    def _cmd_vrfy(self, arg: str) -> None:
        if self.config.disable_vrfy:
            self._error("vrfy", Reply(502, "VRFY command is disabled", "5.5.1"))
            return
        if not arg:
            self._error("vrfy", Reply(501, "Syntax: VRFY address [SMTPUTF8]", "5.5.4"))
            return
        args = split_args(arg)
        try:
            if len(args) > 2 or (len(args) == 2 and args[1].upper() != "SMTPUTF8"):
                raise _SyntaxError
            addr = internalize(extract_address(args[0], null_ok=False))
        except _SyntaxError:
            self._warn(f"Illegal address syntax from {self.client} in VRFY command: {arg}")
            self._error("vrfy", Reply(501, "Bad recipient address syntax", "5.1.3"))
            return
        # Postfix echoes the argument as the client wrote it.
        self._ask("vrfy", Vrfy(addr, Reply(252, args[0], "2.0.0")))

    def _cmd_etrn(self, arg: str) -> None:
        # Postfix's etrn_cmd() order; its ETRN replies carry no enhanced code.
        if self.config.helo_required and self.helo_name is None:
            self._error("etrn", Reply(503, "Error: send HELO/EHLO first"))
            return
        if self.in_transaction:
            self._error("etrn", Reply(503, "Error: MAIL transaction in progress"))
            return
        if not arg or len(arg.split()) != 1:
            self._error("etrn", Reply(500, "Syntax: ETRN domain"))
            return
        # RFC 1985 5.2: "@domain" and "#queue" forms name the same domain for us (one
        # prefix character only, as Postfix strips it).
        domain = arg[1:] if arg[0] in "@#" else arg
        if not (_valid_hostname(domain) or _valid_address_literal(domain)):
            self._error("etrn", Reply(501, "Error: invalid parameter syntax"))
            return
        self._ask("etrn", Etrn(domain, Reply(459, f"<{domain}>: service unavailable")))

    def _refused_x(self, name: str, arg: str, allowed: bool) -> bool:
        """XCLIENT's and XFORWARD's first checks, in Postfix 3.7's order: a transaction
        in progress, no attribute at all, a client not authorized (checked)."""
        cmd = name.lower()
        if self.in_transaction:
            self._error(cmd, Reply(503, "Error: MAIL transaction in progress", "5.5.1"))
        elif not arg:
            self._error(cmd, Reply(501, f"Syntax: {name} attribute=value...", "5.5.4"))
        elif not allowed:
            self._error(cmd, Reply(550, "Error: insufficient authorization", "5.7.0"))
        else:
            return False
        return True

    def _cmd_xclient(self, arg: str) -> None:
        # Postfix's XCLIENT (XCLIENT_README); the attribute rules live in smtp/xclient.py.
        if self._refused_x("XCLIENT", arg, self.xclient_allowed):
            return
        request, error = _xclient.parse_xclient(arg, self.config.ipv6_enabled)
        if error is not None and not request.items:
            self._error("xclient", error)
            return
        # Postfix's "improper command pipelining after XCLIENT" line names the client as
        # the command left it: hold the line until the reply.
        ev = self._events[-1] if self._events else None
        self._xclient_info = None
        if isinstance(ev, Info) and ev.text.startswith("improper command pipelining after "):
            self._xclient_info = (self._events.pop().text, self.client)
        self._ask("xclient", Xclient(request, error is None, error))

    def _xclient_done(self, ev: Xclient, reply: Reply) -> None:
        # Postfix counts even a successful XCLIENT as failed (xclient=0/1): it jumps back
        # to the greeting and never returns to its command loop.  No error is counted.
        self._count("xclient", False)
        if reply is None:                # the glue normally words the greeting itself
            reply = Reply(220, f"{self.config.hostname} ESMTP")
        req = ev.request
        helo, proto, login = req.last("HELO"), req.last("PROTO"), req.last("LOGIN")
        if ev.complete:
            self._reset_transaction()
            self.helo_name = helo.value if helo else None
            self.esmtp = bool(proto and proto.value == "ESMTP")
            self.authenticated = bool(login and login.value is not None)
            if reply.code >= 400:
                # A connection-level reject of the new client is its greeting: from now
                # on only QUIT works (XCLIENT_README: "other" reply codes).
                self._access_denied = True
        else:
            # The attributes before the bad one stay, without a new greeting (Postfix).
            if helo:
                self.helo_name = helo.value
            if proto:
                self.esmtp = proto.value == "ESMTP"
            if login:
                self.authenticated = login.value is not None
        self._queue_reply(reply)
        if not ev.complete:
            self.error_count += 1
        held, self._xclient_info = self._xclient_info, None
        if held is not None:
            text, old = held
            rest = text.split(f" from {old}: ", 1)[-1]
            self._events.append(Info(f"improper command pipelining after XCLIENT from "
                                     f"{self.client}: {rest}"))

    def _ok_xforward(self) -> None:
        self._ok("xforward", Reply(250, "Ok", "2.0.0"))

    def _cmd_xforward(self, arg: str) -> None:
        # Postfix's XFORWARD (XFORWARD_README): a content filter passes on what it was told
        # about the original client.  The order of checks is Postfix 3.7's.
        if self._refused_x("XFORWARD", arg, self.xforward_allowed):
            return
        got: dict[str, str] = {}
        for item in arg.split():
            name, eq, value = item.partition("=")
            if not eq or not value:
                self._error("xforward", Reply(501, "Error: attribute=value expected", "5.5.4"))
                return
            if len(value) > 255:
                self._error("xforward", Reply(501, "Error: attribute value too long", "5.5.4"))
                return
            sent, name = name, name.upper()
            if name not in _XFORWARD_ATTRS:
                # The name as the client wrote it (Postfix 3.7).
                self._error("xforward", Reply(501, f"Bad XFORWARD attribute name: {sent}",
                                              "5.5.4"))
                return
            value = unquote_xtext(value)
            if not _xforward_value_ok(name, value, self.config.ipv6_enabled):
                self._error("xforward", Reply(501, f"Bad {name} syntax: {value}", "5.5.4"))
                return
            got[name] = value
        for name, value in got.items():
            if value.upper() == "[UNAVAILABLE]" and name == "NAME":
                self.xforward[name] = "unknown"     # Postfix logs it so (orig_client=unknown)
            elif value.upper() == "[UNAVAILABLE]":
                self.xforward.pop(name, None)
            else:
                self.xforward[name] = value
            if name in _XFORWARD_CLIENT_ATTRS:
                self.xforward_client = True
        self._ok_xforward()

    def _cmd_starttls(self, arg: str) -> None:
        if arg:
            self._error("starttls", Reply(501, "Syntax: STARTTLS", "5.5.4"))
            return
        # Postfix's order (checked against 3.7): already active (also in wrapper mode),
        # then not offered.  A MAIL transaction in progress is no obstacle: the
        # handshake discards it (RFC 3207 4.2), as Postfix 3.7 does.
        if self.tls_active:
            self._error("starttls", Reply(554, "Error: TLS already active", "5.5.1"))
            return
        if not self.config.starttls_offered or "STARTTLS" in self.config.discard_ehlo_keywords:
            self._error("starttls", Reply(502, "Error: command not implemented", "5.5.1"))
            return
        if self._inbuf and not self.pipelining_violation:
            # RFC 3207 4.2 / RFC 2920 3.1: after the "not offered" and syntax answers,
            # which Postfix 3.7 gives without this line (side by side).
            self._log_pipelining("STARTTLS")
        self._ask("starttls", StartTls())

    def _cmd_auth(self, arg: str) -> None:
        if self.config.helo_required and self.helo_name is None:
            # Before "authentication not enabled" too (Postfix 3.7, side by side).
            self._error("auth", Reply(503, "Error: send HELO/EHLO first", "5.5.1"))
            return
        if not self.auth_mechanisms or "AUTH" in self.config.discard_ehlo_keywords:
            # Also before TLS with smtpd_tls_auth_only (the glue offers nothing then).
            self._error("auth", Reply(503, "Error: authentication not enabled", "5.5.1"))
            return
        # No HELO needed: Postfix 3.7 answers AUTH before HELO/EHLO (checked).
        if self.in_transaction:
            self._error("auth", Reply(503, "Error: MAIL transaction in progress", "5.5.1"))
            return
        if self.authenticated:
            self._error("auth", Reply(503, "Error: already authenticated", "5.5.1"))
            return
        parts = arg.split()
        if not parts or len(parts) > 2:
            self._error("auth", Reply(501, "Syntax: AUTH mechanism", "5.5.4"))
            return
        # The name as typed: Postfix logs and keeps it so ("SASL plain authentication ...").
        self._ask("auth", Auth(parts[0], parts[1] if len(parts) == 2 else None))

    # ----- DATA content ------------------------------------------------------------------

    def _emit_content(self, piece: bytes) -> None:
        if self._too_big:
            return
        self._data_size += len(piece)
        limit = self.config.message_size_limit
        if limit and self._data_size > limit:
            # Keep reading to the end, pass nothing more on (Postfix: 552 5.3.4 at the end).
            self._too_big = True
            return
        self._datapart.append(piece)

    def _data_count(self) -> int:
        """Postfix's act_size while DATA is read: whole lines as _count_records() counts
        them; of a line not yet ended, only its full line_length_limit records, each
        plus 2 (checked against 3.7: 4100 for 5000 bytes without a line end, 0 for
        2047 bytes and a CR that may start the CRLF)."""
        limit = self.config.line_length_limit
        partial = self._data_line + len(self._inbuf)
        if self._inbuf[-1:] == b"\r":
            partial -= 1
        return self._data_size - self._data_partial + (limit + 2) * (partial // limit)

    def _count_records(self, length: int) -> None:
        """Postfix's smtpd reads DATA in records of at most line_length_limit bytes and
        counts 2 for the line end of each (its act_size, in "lost connection after DATA
        (N bytes)" and the size limit): a line of ``length`` bytes (as received, before
        dot-unstuffing, without its line end) counts 2 more per full record (checked
        against 3.7: 5006 for a 5000-byte line)."""
        extra = 2 * (length // self.config.line_length_limit)
        if extra:
            self._data_size += extra
            limit = self.config.message_size_limit
            if limit and self._data_size > limit:
                self._too_big = True

    def _flush_content(self) -> None:
        if self._datapart:
            self._events.append(DataChunk(b"".join(self._datapart)))
            self._datapart = []

    def _read_data(self) -> bool:
        """RFC 5321 4.1.1.4 / 4.5.2: lines, dot-unstuffing, end only on CRLF.CRLF."""
        buf = self._inbuf
        limit = self.config.line_length_limit
        pos = 0
        n = len(buf)
        ended = False
        if self._line_start and n and buf[0] != 0x2E:
            # Fast path: whole CRLF lines, none starting with "." (RFC 5321 4.5.2: nothing
            # to unstuff) and no bare LF, go on in one piece, up to CRLF "." CRLF if there.
            # Anything else takes the line-by-line loop below, which has the same result.
            # One scan finds the first line that needs the loop (a bare LF, a leading
            # ".") or the terminator; all lines before it are plain CRLF lines.
            end = buf.rfind(b"\n") + 1
            t = -1
            m = _DATA_SPECIAL.search(buf, 0, end) if end else None
            if m is not None:
                t = m.start() - 1           # the CR of CRLF "." CRLF, if it is one
                if t >= 0 and buf[t] == 0x0D and buf[t + 2:t + 5] == b".\r\n":
                    end = t + 2
                else:
                    end, t = 0, -1          # the loop below takes it all
            size_limit = self.config.message_size_limit
            if end > 0 and not (size_limit and self._data_size + end > size_limit):
                chunk = bytes(buf[:end])
                self._emit_content(chunk)
                if end > limit and _may_have_long_line(chunk, limit):
                    lines = chunk.split(b"\n")
                    if max(map(len, lines)) > limit:   # CRLF lines: a length counts the CR
                        for line_ in lines:
                            if len(line_) > limit:
                                self._count_records(len(line_) - 1)
                self._prev_crlf = True
                pos = end
                if t >= 0:
                    pos = t + 5
                    ended = True
        while not ended and pos < n:
            i = buf.find(b"\n", pos)
            if i < 0:
                rest = n - pos
                if rest > limit:
                    # Pass an over-long line on in pieces; keep a trailing CR, it may pair
                    # with the next LF.
                    end = n - 1 if buf[n - 1] == 0x0D else n
                    self._data_line += end - pos
                    piece = bytes(buf[pos:end])
                    if self._line_start and piece.startswith(b"."):
                        piece = piece[1:]
                    counted = self._data_size
                    self._emit_content(piece)
                    self._data_partial += self._data_size - counted
                    self._line_start = False
                    pos = end
                break
            start = pos
            line = buf[pos:i + 1]
            pos = i + 1
            crlf = len(line) >= 2 and line[-2] == 0x0D
            if not crlf and self.bare_newline == "reject" and not self._bare_lf:
                # Read on to the end of the message, then refuse it (Postfix 3.7.11).
                self._bare_lf = True
                self._too_big = True            # stop passing content on
            if self._line_start:
                body = line[:-2] if crlf else line[:-1]
                if body == b".":
                    if crlf and self._prev_crlf:
                        ended = True
                        break
                    # A lone "." that is not CRLF "." CRLF ends nothing and, as in Postfix
                    # (normalize), leaves no line behind.
                    self._line_start = True
                    self._prev_crlf = crlf
                    continue
                if line.startswith(b"."):
                    line = line[1:]   # RFC 5321 4.5.2 transparency
            content = bytes(line) if crlf else bytes(line[:-1]) + b"\r\n"
            self._emit_content(content)
            whole = self._data_line + i + 1 - start - (2 if crlf else 1)
            if whole >= limit:
                self._count_records(whole)
            self._data_line = self._data_partial = 0
            self._line_start = True
            # RFC 5321 4.1.1.4: the terminator is CRLF "." CRLF; a "." after a bare LF is
            # content, so no second message can be smuggled past a lenient peer.
            self._prev_crlf = crlf
        del buf[:pos]
        self._flush_content()
        if ended:
            self.state = S_CMD
            self.where = "END-OF-MESSAGE"
            if self._bare_lf:
                self._ask("data", DataEnd(self._data_size, False, False, self._bare_lf_reply(),
                                          bare_lf=True))
                return True
            self._ask("data", DataEnd(self._data_size, self._too_big, False,
                                      self._end_reply()))
            return True
        return False

    def _end_reply(self) -> Reply:
        if self._too_big:
            return REPLY_FILE_TOO_BIG
        return _REPLY_QUEUED_OK

    def _has_bare_lf(self, chunk: bytes) -> bool:
        prev_cr = self._bdat_tail == b"\r"
        i = chunk.find(b"\n")
        while i >= 0:
            if not (chunk[i - 1:i] == b"\r" if i else prev_cr):
                return True
            i = chunk.find(b"\n", i + 1)
        return False

    def _read_bdat(self) -> bool:
        buf = self._inbuf
        if self._bdat_remaining:
            take = min(self._bdat_remaining, len(buf))
            if take == 0:
                return False
            if not self._bdat_discard:
                chunk = bytes(buf[:take])
                if self.bare_newline == "reject" and not self._bare_lf and self._has_bare_lf(chunk):
                    self._bare_lf = True
                    self._too_big = True        # stop passing content on; refuse at LAST
                self._datapart = []
                self._emit_content(chunk)
                self._flush_content()
                self._bdat_tail = chunk[-1:]
                self._count_act(chunk)
            self._bdat_total += take
            self._bdat_remaining -= take
            del buf[:take]
            if self._bdat_remaining:
                return bool(self._events)
        self.state = S_CMD
        if self._bdat_skip_reply:
            # The error was already answered, or is answered now that the chunk is gone:
            # Postfix reads (skips) a refused chunk before it replies (checked against 3.7).
            self._bdat_skip_reply = False
            if self._bdat_late is not None:
                late, self._bdat_late = self._bdat_late, None
                self._error("bdat", late)
            if self._bdat_last:
                self._bdat_active = False
                self._bdat_discard = False
                self._reset_transaction()
                # The refused sequence's end resets the transaction, as Postfix's
                # mail_reset() (3.7: VRFY logs no from= after it): the glue drops the
                # sender and any queue file the way it does at RSET.
                self._events.append(Rset())
            return True
        if self._bdat_last and self._bare_lf:
            self._ask("bdat", DataEnd(self._bdat_total, False, True, self._bare_lf_reply(),
                                      bare_lf=True))
            return True
        if self._bdat_last:
            total = self._act_size
            if self._bdat_tail != b"\n":
                # An unterminated last line gets its CRLF, as Postfix does (and counts it).
                self._datapart = []
                self._emit_content(b"\r\n")
                self._flush_content()
                n = self._act_line
                total += n + 2 * (n // self.config.line_length_limit + 1)
            self._ask("bdat", DataEnd(total, self._too_big, True, self._end_reply()))
            return True
        self._ask("bdat", BdatChunkEnd(self._bdat_total,
                                       Reply(250, f"Ok: {self._bdat_cur} bytes", "2.0.0")))
        return True


_COMMANDS = {
    "HELO": ServerConnection._cmd_helo,
    "EHLO": ServerConnection._cmd_ehlo,
    "MAIL": ServerConnection._cmd_mail,
    "RCPT": ServerConnection._cmd_rcpt,
    "DATA": ServerConnection._cmd_data,
    "BDAT": ServerConnection._cmd_bdat,
    "RSET": ServerConnection._cmd_rset,
    "NOOP": ServerConnection._cmd_noop,
    "QUIT": ServerConnection._cmd_quit,
    "VRFY": ServerConnection._cmd_vrfy,
    "ETRN": ServerConnection._cmd_etrn,
    "STARTTLS": ServerConnection._cmd_starttls,
    "XCLIENT": ServerConnection._cmd_xclient,
    "XFORWARD": ServerConnection._cmd_xforward,
    "AUTH": ServerConnection._cmd_auth,
}
