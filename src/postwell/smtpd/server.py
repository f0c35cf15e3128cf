"""The SMTP server process: asyncio glue around postwell.smtp.server.

API::

    preload(config, service) -> dict               # in the child, before the privilege drop
    serve(config, service, sockets, preloaded=None) -> None   # master's entry point (blocking)
    SmtpdServer(config, *, log=None, policy=None, cleanup=None, service_name="smtp")
        await srv.start(sockets)                   # listen on already-bound sockets
        await srv.drain(timeout)                   # stop accepting, let sessions finish
        srv.sessions                               # live SmtpdSession objects

This layer only moves bytes, calls the policy (``SmtpdPolicy.on_*``) and the
cleanup (``Cleanup.open()`` at the first accepted RCPT, ``write`` per chunk,
``finish`` before the 250), and writes Postfix-shaped log lines.  All protocol
decisions live in the sans-IO engine.

smtpd_client_connection_count_limit and the smtpd_client_*_rate_limit
parameters are machine-wide, counted by the anvil service (postwell.anvil)
for all workers; when anvil cannot answer, a per-process count stands in for
the connection count.  Clients matching smtpd_client_event_limit_exceptions
($mynetworks by default) are exempt.
"""

from __future__ import annotations

import asyncio
import gc
import ipaddress
import os
import re
import signal
import time

from postwell.smtp.reply import Reply
from postwell.smtp.server import (NEED_DATA, PAUSED, Auth, AuthAborted, AuthResponse, Bdat,
                                  BdatChunkEnd,
                                  ConnectionClosed, Data, DataChunk, DataEnd, Ehlo, Etrn, Helo,
                                  Info, Mail, Rcpt, Rejected, Rset, ServerConfig,
                                  ServerConnection, StartTls, Vrfy, Warning, Xclient)
from postwell.smtp.server import _address_token, parse_path
from postwell.smtp.xclient import apply_to_state, restart_state
from postwell.dsn.orcpt import decode_orcpt, fallback_orcpt, stored_orcpt
from postwell.policy.restrictions import log_address
from postwell.dsn.submit import (NoticeError, double_bounce_address, notify_classes,
                                 post_notice)

REPLY_WRITE_ERROR = Reply(451, "Error: queue file write error", "4.3.0")
REPLY_TOO_BIG = Reply(552, "Error: message file too big", "5.3.4")
REPLY_NO_SPACE = Reply(452, "Insufficient system storage", "4.3.1")
REPLY_TLS_UNAVAILABLE = Reply(454, "TLS not available due to local problem", "4.7.0")
REPLY_BAD_RECIPIENT = Reply(501, "Bad recipient address syntax", "5.1.3")
DRAIN_SECONDS = 50.0
# event_limit_reply(what) -> the SmtpdLimits attribute holding that rate limit.
_RATE_LIMIT_ATTR = {"mail": "mail_limit", "rcpt": "rcpt_limit", "auth": "auth_limit"}


# --------------------------------------------------------------------------- helpers

def table_specs(value: str | None) -> list[str]:
    """The type:name specs of a table list; inline:{...} keeps its blanks and commas."""
    out, depth, word = [], 0, ""
    for ch in value or "":
        if depth == 0 and (ch.isspace() or ch == ","):
            if word:
                out.append(word)
            word = ""
            continue
        depth += (ch == "{") - (ch == "}")
        word += ch
    if word:
        out.append(word)
    return out


class TableHookError(Exception):
    """A table behind an engine hook failed; each line of str() is one warning."""


def table_lookups(config=None, *, footer_specs=None, filter_specs=None) -> dict:
    """The engine's table hooks (ServerConfig.footer_lookup, .command_filter) for
    smtpd_reject_footer_maps and smtpd_command_filter, read from ``config`` unless the
    specs are given; only the configured ones.  Use:
    ``ServerConfig.from_config(config, **table_lookups(config))``.  The tables are
    opened at the first lookup (get_table: shared, re-opened when the file changes)."""
    from postwell.tables import get_table
    if footer_specs is None:
        footer_specs = table_specs(config.get("smtpd_reject_footer_maps")) \
            if config is not None else ()
    if filter_specs is None:
        filter_specs = table_specs(config.get("smtpd_command_filter")) \
            if config is not None else ()
    footer_specs, filter_specs = tuple(footer_specs), tuple(filter_specs)
    hooks: dict = {}

    def footer_lookup(reply_text: str) -> str | None:
        # The first table with an entry decides (the engine falls back to
        # smtpd_reject_footer when it fails).
        for spec in footer_specs:
            try:
                found = get_table(spec, config).lookup(reply_text)
            except Exception as exc:    # noqa: BLE001 - logged by the engine
                raise TableHookError(f"smtpd_reject_footer_maps: {spec}: lookup error: "
                                     f"{exc}") from None
            if found == "":
                # Postfix's maps_find(): an empty result is a configuration error, not
                # "not found" (the later tables are not asked; checked against 3.7).
                raise TableHookError(
                    f"smtpd_reject_footer_maps lookup of {reply_text} returns an empty "
                    "string result\nsmtpd_reject_footer_maps should return NO RESULT in "
                    "case of NOT FOUND")
            if found is not None:
                return found
        return None

    def command_filter(key: str) -> str | None:
        for spec in filter_specs:
            try:
                found = get_table(spec, config).lookup(key)
            except Exception as exc:    # noqa: BLE001 - logged by the engine
                raise TableHookError(f"{spec} lookup error for \"{key[:100]}\": {exc}") \
                    from None
            if found is not None:
                return found
        return None

    if footer_specs:
        hooks["footer_lookup"] = footer_lookup
    if filter_specs:
        hooks["command_filter"] = command_filter
    return hooks


_hosts_cache: dict[str, str] | None = None


def _etc_hosts() -> dict[str, str]:
    """Address -> first name from /etc/hosts (never DNS: loopback stays on the box)."""
    global _hosts_cache
    if _hosts_cache is None:
        table: dict[str, str] = {}
        try:
            with open("/etc/hosts", encoding="utf-8", errors="replace") as f:
                for line in f:
                    fields = line.split("#", 1)[0].split()
                    if len(fields) >= 2:
                        try:
                            key = str(ipaddress.ip_address(fields[0]))
                        except ValueError:
                            continue
                        table.setdefault(key, fields[1])
        except OSError:
            pass
        _hosts_cache = table
    return _hosts_cache


def client_hostname(addr: str, lookup: bool) -> str:
    """smtpd_peername_lookup: loopback clients are named from /etc/hosts; any other
    client is "unknown" (no DNS lookups leave this process)."""
    if not lookup:
        return "unknown"
    # Asked for every connection; the answer rests on /etc/hosts, read once, so keep it
    # per address instead of parsing the address again each time.
    name = _name_cache.get(addr)
    if name is None:
        name = _client_hostname(addr)
        if len(_name_cache) >= 4096:
            _name_cache.clear()
        _name_cache[addr] = name
    return name


_name_cache: dict[str, str] = {}


def _client_hostname(addr: str) -> str:
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return "unknown"
    if not ip.is_loopback:
        return "unknown"
    name = _etc_hosts().get(str(ip))
    if name is None and ip.version == 4:
        name = "localhost" if str(ip) == "127.0.0.1" else None
    return name or "unknown"


def _rfc_addr(addr: str) -> str:
    # RFC 5321 4.1.3: IPv6 address literals carry the "IPv6:" tag in the Received header.
    return f"IPv6:{addr}" if ":" in addr else addr


def _printable(text: str) -> str:
    # Postfix's printable(text, '?'): control characters become "?".
    return "".join(c if c >= " " and c != "\x7f" else "?" for c in text)


def wrap_transcript_line(text: str, length: int = 78, indent: int = 4) -> list[str]:
    """Postfix's line_wrap() as smtpd_chat_notify uses it: a line ends before the word
    that would take it past ``length`` (a longer word stays whole), trailing blanks
    dropped; the lines after the first are indented by ``indent``, as much narrower."""
    out: list[str] = []
    cur_indent, cur_len = 0, length
    n = len(text)
    start = 0
    word: int | None = 0
    while word is not None:
        space = word
        while space < n and text[space] not in " \t":
            space += 1
        if word > start and space - start > cur_len:
            out.append(" " * cur_indent + text[start:word].rstrip(" \t"))
            while word < n and text[word] in " \t":
                word += 1
            if start == 0:
                cur_indent += indent
                cur_len -= indent
            start = word
        word = space + 1 if space < n else None
    out.append(" " * cur_indent + text[start:].rstrip(" \t"))
    return out


# The replies at which Postfix's smtpd adds a class to the session's error_mask
# (smtpd.c, smtpd_sasl_proto.c; checked against 3.7): the engine decides these
# replies itself, so the classes are read back from the session transcript when a
# notify_classes notice may be due, instead of being noted on every command.
_PROTOCOL_REPLY = re.compile(
    rb"501 Syntax: [EH][EH]LO hostname"
    rb"|50[02] 5\.5\.2 Error: (?:command not recognized|bad syntax|bad UTF-8 syntax)"
    rb"|503 5\.5\.1 Error: (?:nested MAIL command|need MAIL command|need RCPT command"
    rb"|(?:MAIL|RCPT|DATA) after BDAT|MAIL transaction in progress"
    rb"|authentication not enabled|already authenticated)"
    rb"|501 5\.5\.4 Syntax: (?:MAIL FROM:|RCPT TO:|DATA|RSET|NOOP|VRFY |STARTTLS|AUTH "
    rb"|XCLIENT |XFORWARD )"
    rb"|5\d\d 5\.5\.4 Syntax: BDAT "
    rb"|501 5\.1\.[37] Bad (?:sender|recipient) address syntax"
    rb"|501 5\.5\.4 (?:Bad message size syntax|Bad RET parameter syntax"
    rb"|Bad ENVID parameter syntax|Error: Bad NOTIFY parameter syntax"
    rb"|Error: Bad ORCPT parameter syntax|Error: XVERP needs |Error: attribute=value expected"
    rb"|Error: attribute value too long|Bad X(?:CLIENT|FORWARD) attribute name: "
    rb"|Bad [A-Z_]+ syntax: )"
    rb"|501 5\.7\.1 DSN support is disabled"
    rb"|555 5\.5\.4 Unsupported option: "
    rb"|503 5\.5\.4 Error: multiple AUTH= options"
    rb"|50[24] 5\.5\.[14] (?:Error: command not implemented"
    rb"|Encryption required for requested authentication mechanism)"
    rb"|521 5\.5\.1 Error: command not implemented"
    rb"|554 5\.5\.1 Error: TLS already active"
    rb"|503 Error: MAIL transaction in progress|500 Syntax: ETRN |501 Error: invalid parameter syntax"
    rb"|421 4\.7\.0 \S+ Error: too many errors"
    rb"|550 5\.5\.2 \S+ Error: bare <LF> received")
_POLICY_REPLY = re.compile(
    rb"503 (?:5\.5\.1 )?Error: send HELO/EHLO first"
    rb"|502 5\.5\.1 VRFY command is disabled"
    rb"|550 5\.7\.0 Error: insufficient authorization"
    rb"|450 4\.7\.1 Error: too (?:much mail|many recipients) from "
    rb"|454 4\.7\.0 Error: too many new TLS sessions from "
    rb"|552 5\.3\.4 Message size exceeds (?:file system imposed|fixed) limit")
# End of data (smtpd.c data_cmd, by cleanup status) and the queue space check.
_BOUNCE_REPLY = re.compile(rb"552 5\.3\.4 Error: message file too big|554 5\.4\.0 Error: too many hops")
_RESOURCE_REPLY = re.compile(rb"451 4\.3\.0 Error: queue file write error"
                             rb"|452 4\.3\.1 Insufficient system storage")
_SOFTWARE_REPLY = re.compile(rb"451 4\.3\.0 Error: internal error"
                             rb"|454 4\.7\.0 TLS not available due to local problem")
_REPLY_CLASSES = (("protocol", _PROTOCOL_REPLY), ("policy", _POLICY_REPLY),
                  ("bounce", _BOUNCE_REPLY), ("resource", _RESOURCE_REPLY),
                  ("software", _SOFTWARE_REPLY))


def _flush_ignored(state, log) -> None:
    """The "restriction `x' after `reject' is ignored" warnings the restriction engine
    held back: Postfix logs them after the reject line (policy.restrictions
    _ignored_after)."""
    held = state.check.ignored
    for text in held:
        log.warning(text)
    held.clear()


def _note_concurrency_refusal(session) -> None:
    """Postfix's smtpd records a refusal for smtpd_client_connection_count_limit as a
    policy error (notify_classes), one for the connection rate limit not; the 421 text
    is the same, so the class cannot be read back from the transcript."""
    state = getattr(session, "state", None)
    if state is not None:
        state.error_classes.add("policy")


def transcript_error_classes(entries) -> set[str]:
    """The error classes Postfix would have noted for the replies among ``entries``
    (a ServerConnection transcript: command lines as str, replies as bytes)."""
    found: set[str] = set()
    for entry in entries:
        if type(entry) is not bytes or entry[:1] not in (b"4", b"5"):
            continue
        for name, pattern in _REPLY_CLASSES:
            if pattern.match(entry):
                found.add(name)
                break
    return found


# "<local@domain>" with nothing to unquote: the command tokenizer's word is the path.
_SIMPLE_PATH = re.compile(r"[ \t]*(<[^<>\"\\ \t]*>)(?![^ \t])")


def rcpt_orcpt(line: str, orcpt: str | None) -> str:
    """The DSN original recipient Postfix's smtpd records for a RCPT TO command
    (``line`` as the client sent it; ``orcpt``: the engine's reading of its ORCPT
    parameter, None without one).  Without ORCPT it is the address as written
    (dsn.orcpt.fallback_orcpt); with one, its address decoded as Postfix decodes
    that type (RFC 6533 for utf-8: the engine reads every type as xtext)."""
    if orcpt is not None:
        atype, _, addr = orcpt.partition(";")
        if addr.isascii() and atype.lower() != "utf-8":
            return stored_orcpt(orcpt)
    parts = line.strip(" \t").split(None, 1)
    rest = parts[1].strip(" \t")[3:] if len(parts) == 2 else ""
    if orcpt is None:
        m = _SIMPLE_PATH.match(rest)
        return fallback_orcpt(m.group(1) if m is not None else _address_token(rest)[0])
    try:
        params = parse_path(rest, null_ok=False)[1]
    except Exception:   # noqa: BLE001 - the engine took it: keep the engine's reading
        return stored_orcpt(orcpt)
    for param in params:
        key, eq, value = param.partition("=")
        if eq and key.upper() == "ORCPT":
            decoded = decode_orcpt(value)
            # None: Postfix answers 501 here; the engine took it, so keep its reading.
            return decoded if decoded is not None else stored_orcpt(orcpt)
    return stored_orcpt(orcpt)


def _mail_date(when: float) -> str:
    # Looked up once: a "from package import name" statement runs importlib's
    # _handle_fromlist() (Python code) every time, and this runs for every message.
    fn = _mail_date_fn
    if fn is None:
        fn = _load_mail_date()
    return fn(when)


_mail_date_fn = None


def _load_mail_date():
    global _mail_date_fn
    try:
        from postwell.cleanup import mail_date
    except ImportError:   # pragma: no cover - cleanup always ships with smtpd
        mail_date = _own_mail_date
    _mail_date_fn = mail_date
    return mail_date


def _own_mail_date(when: float) -> str:  # pragma: no cover - see _load_mail_date
    lt = time.localtime(when)
    off = lt.tm_gmtoff or 0
    sign = "+" if off >= 0 else "-"
    off = abs(off)
    # The day padded with a space, as Postfix's mail_date() ("Sun,  6 Dec").
    return (f"{time.strftime('%a', lt)}, {lt.tm_mday:2d} {time.strftime('%b %Y %H:%M:%S', lt)}"
            + f" {sign}{off // 3600:02d}{(off % 3600) // 60:02d} ({lt.tm_zone or 'UTC'})")


# Names every connection needs: still imported on first use, but once per process
# instead of an import statement per session (see _mail_date).
_state_class = None
_unavailable = None


def _session_state_class():
    global _state_class
    if _state_class is None:
        from postwell.policy.state import SessionState
        _state_class = SessionState
    return _state_class


class _PostMailCleanup:
    """The cleanup for a notice the smtpd writes: each message starts with the header
    Postfix's post_mail() gives all mail it makes itself, "Received: by HOST
    (MAIL_NAME)" then "id QID; DATE" (DATE as in the notice's Date header)."""

    def __init__(self, cleanup, hostname: str, mail_name: str, date: str):
        self._cleanup, self._by, self._date = cleanup, f"{hostname} ({mail_name})", date

    def open(self, *args, **kwargs):
        cs = self._cleanup.open(*args, **kwargs)
        cs.prepend_header(f"Received: by {self._by}\n\tid {cs.queue_id}; {self._date}")
        return cs


def _anvil_unavailable():
    global _unavailable
    if _unavailable is None:
        from postwell.anvil import UNAVAILABLE
        _unavailable = UNAVAILABLE
    return _unavailable


def _load_policy(config, log):
    try:
        from postwell.policy import SmtpdPolicy
    except ImportError:
        from postwell.policy.smtpd_policy import SmtpdPolicy
    return SmtpdPolicy(config, log)


def _load_cleanup(config, log):
    from postwell.cleanup import Cleanup
    from postwell.log import MailLog
    from postwell.queue import QueueStore
    store = QueueStore(config.get("queue_directory"))
    # In-process cleanup still logs as postfix/cleanup, where log tools look for it.
    try:
        # cleanup is its own service in Postfix: the smtpd's -o syslog_name (e.g.
        # postfix/submission) does not apply to it.
        base = config
        if "syslog_name" in getattr(config, "overrides", {}):
            base = type(config)(config.config_dir, config.params, {}, config.services)
        clog = MailLog.from_config(base, "cleanup") if isinstance(log, MailLog) and \
            type(log) is MailLog else log
    except (OSError, TypeError):
        clog = log
    return Cleanup(config, store, clog)


def _feed_buffered(proto, data: bytes) -> None:
    """Hand bytes to a BufferedProtocol (asyncio's and uvloop's SSLProtocol)."""
    view = memoryview(data)
    while view:
        buf = proto.get_buffer(len(view))
        n = min(len(buf), len(view))
        if not n:
            raise RuntimeError("protocol gave an empty buffer")
        buf[:n] = view[:n]
        proto.buffer_updated(n)
        view = view[n:]


def _log_tls_policy_warnings(srv) -> None:
    """Client-certificate setting warnings, once per context, at its first use (Postfix
    logs them when the smtpd process starts its TLS engine)."""
    try:
        from postwell.tls import client_cert_policy
        pol = client_cert_policy(srv.tls_context)
        if pol.warnings and not pol.warned:
            pol.warned = True
            for text in pol.warnings:
                srv.log.warning(text)
    except Exception:   # noqa: BLE001 - a warning must not cost the session
        pass


# Where OpenSSL 3.0 (Debian's build, as Postfix 3.7 links it) raises the handshake
# errors a server meets most, for Postfix's "TLS library problem" line: Python's
# SSLError keeps the reason but not the file and line of the error queue entry.
_SSL_ERROR_WHERE = {
    "WRONG_VERSION_NUMBER": "../ssl/record/ssl3_record.c:350",
    "HTTP_REQUEST": "../ssl/record/ssl3_record.c:341",
    "HTTPS_PROXY_REQUEST": "../ssl/record/ssl3_record.c:344",
    "LENGTH_TOO_SHORT": "../ssl/statem/statem_srvr.c:1456",
    "NO_SHARED_CIPHER": "../ssl/statem/statem_srvr.c:2226",
    "UNEXPECTED_MESSAGE": "../ssl/record/rec_layer_s3.c:1538",
}
_SSL_ALERT_WHERE = "../ssl/record/rec_layer_s3.c:1601"
# TLS alert numbers (RFC 8446 6, RFC 5246 7.2) by OpenSSL's reason name for a received alert.
_SSL_ALERTS = {
    "SSLV3_ALERT_UNEXPECTED_MESSAGE": 10, "SSLV3_ALERT_BAD_RECORD_MAC": 20,
    "TLSV1_ALERT_DECRYPTION_FAILED": 21, "TLSV1_ALERT_RECORD_OVERFLOW": 22,
    "SSLV3_ALERT_DECOMPRESSION_FAILURE": 30, "SSLV3_ALERT_HANDSHAKE_FAILURE": 40,
    "SSLV3_ALERT_NO_CERTIFICATE": 41, "SSLV3_ALERT_BAD_CERTIFICATE": 42,
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE": 43, "SSLV3_ALERT_CERTIFICATE_REVOKED": 44,
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": 45, "SSLV3_ALERT_CERTIFICATE_UNKNOWN": 46,
    "SSLV3_ALERT_ILLEGAL_PARAMETER": 47, "TLSV1_ALERT_UNKNOWN_CA": 48,
    "TLSV1_ALERT_ACCESS_DENIED": 49, "TLSV1_ALERT_DECODE_ERROR": 50,
    "TLSV1_ALERT_DECRYPT_ERROR": 51, "TLSV1_ALERT_EXPORT_RESTRICTION": 60,
    "TLSV1_ALERT_PROTOCOL_VERSION": 70, "TLSV1_ALERT_INSUFFICIENT_SECURITY": 71,
    "TLSV1_ALERT_INTERNAL_ERROR": 80, "TLSV1_ALERT_INAPPROPRIATE_FALLBACK": 86,
    "TLSV1_ALERT_USER_CANCELLED": 90, "TLSV1_ALERT_NO_RENEGOTIATION": 100,
    "TLSV13_ALERT_MISSING_EXTENSION": 109, "TLSV1_UNSUPPORTED_EXTENSION": 110,
    "TLSV1_CERTIFICATE_UNOBTAINABLE": 111, "TLSV1_UNRECOGNIZED_NAME": 112,
    "TLSV1_BAD_CERTIFICATE_STATUS_RESPONSE": 113, "TLSV1_BAD_CERTIFICATE_HASH_VALUE": 114,
    "TLSV1_ALERT_UNKNOWN_PSK_IDENTITY": 115, "TLSV13_ALERT_CERTIFICATE_REQUIRED": 116,
    "TLSV1_ALERT_NO_APPLICATION_PROTOCOL": 120,
}
_SSL_LIB_CODE = {"SSL": 20}


def ssl_error_text(library: str | None, reason: str | None) -> str:
    """OpenSSL 3's error line as Postfix logs it (ERR_print_errors_cb():
    "error:CODE:LIB routines::reason:file:line:data"), rebuilt from what
    Python's SSLError keeps."""
    lib = library or "SSL"
    name = reason or ""
    text = name.lower().replace("_", " ")
    code = None
    try:
        import _ssl
        lib_no = _SSL_LIB_CODE.get(lib)
        found = _ssl.err_names_to_codes.get(name)
        if found and (lib_no is None or found[0] == lib_no):
            code = (found[0] << 23) | found[1]      # OpenSSL 3 ERR_PACK()
    except Exception:   # noqa: BLE001 - the code is a detail
        pass
    if name in _SSL_ALERTS:
        # A received alert: reason SSL_AD_REASON_OFFSET + its number.
        code = (_SSL_LIB_CODE["SSL"] << 23) | (1000 + _SSL_ALERTS[name])
        where = f"{_SSL_ALERT_WHERE}:SSL alert number {_SSL_ALERTS[name]}:"
    elif name in _SSL_ERROR_WHERE:
        where = f"{_SSL_ERROR_WHERE[name]}:"
    else:
        where = ""
    head = f"error:{code:08X}" if code is not None else "error"
    return f"{head}:{lib} routines::{text}" + (f":{where}" if where else "")


def _handshake_failure(exc: BaseException) -> tuple[str, str | None]:
    """(what follows "SSL_accept error from host[addr]: ", the TLS library problem or None)
    in Postfix's words: "lost connection" when the peer went away, else "-1"."""
    import ssl
    if isinstance(exc, ssl.SSLError) and not isinstance(exc, (ssl.SSLEOFError,
                                                             ssl.SSLZeroReturnError)):
        if not exc.reason:
            return "-1", f"error:{exc.library or 'SSL'} routines::{exc}"
        return "-1", ssl_error_text(exc.library, exc.reason)
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return "timeout", None
    return "lost connection", None


def _time(config, name: str, default: float) -> float:
    try:
        return config.get_time(name) if config.get(name) else default
    except Exception:
        return default


def _bool(config, name: str, default: bool = False) -> bool:
    # An empty value (Postfix's ${stress?...} defaults outside stress) is the default.
    try:
        value = (config.get(name) or "").strip().lower()
    except Exception:   # noqa: BLE001
        return default
    if value in ("yes", "true", "1", "on"):
        return True
    if value in ("no", "false", "0", "off"):
        return False
    return default


def _int(config, name: str, default: int) -> int:
    try:
        return config.get_int(name) if config.get(name) else default
    except ValueError:
        return default


# --------------------------------------------------------------------------- session

class _Wakeup:
    """asyncio.Event for the one coroutine that waits on it (the session task).

    data_received() sets it for every network read; asyncio.Event keeps a deque of
    waiters and looks the running loop up again for each wait, work this single-waiter
    flag does without."""

    __slots__ = ("_set", "_waiter", "_loop")

    def __init__(self, loop) -> None:
        self._set = False
        self._waiter = None
        self._loop = loop

    def set(self) -> None:
        if not self._set:
            self._set = True
            w = self._waiter
            if w is not None and not w.done():
                w.set_result(True)

    def clear(self) -> None:
        self._set = False

    def is_set(self) -> bool:
        return self._set

    async def wait(self) -> bool:
        if self._set:
            return True
        fut = self._waiter = self._loop.create_future()
        try:
            await fut
        finally:
            self._waiter = None
        return True


class SmtpdSession(asyncio.Protocol):
    # Where the transcript's replies start to count for notify_classes: Postfix forgets
    # a session's errors once it has queued a message (smtpd.c data_cmd).
    _errors_from = 0
    # XCLIENT LOGIN= with SASL off: logged in the client= line only (see _xclient).
    _xclient_login: str | None = None

    def __init__(self, server: "SmtpdServer") -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.conn: ServerConnection | None = None
        self.state = None
        self.cs = None                      # the open cleanup session
        self._loop = asyncio.get_running_loop()
        self._data_ready = _Wakeup(self._loop)
        self._wait_timer: asyncio.TimerHandle | None = None
        self._wait_deadline = 0.0
        self._waiting = False
        self._timed_out = False
        self._can_write = asyncio.Event()
        self._can_write.set()
        self._lost = False
        self._paused = False
        self._task: asyncio.Task | None = None
        self._mail: Mail | None = None
        self._received_for: str | None = None
        self.addr = ""
        self.namaddr = "unknown[unknown]"
        self.finished = asyncio.Event()
        self._upgrading = False             # inside loop.start_tls()
        # smtpd_tls_wrappermode: bytes read before start_tls() took over (the ClientHello);
        # uvloop starts reading right after connection_made(), whatever it was told.
        self._raw_phase = server.wrapper_mode
        self._raw_tls: list[bytes] = []
        self._tls_early: list[bytes] = []   # decrypted bytes that beat start_tls()'s return
        self.ssl_object = None
        self.auth = None                    # postwell.sasl.session.SmtpdAuth, made on demand
        self._deadline: float | None = None  # smtpd_per_record_deadline
        self._abort_reason: str | None = None  # "Session aborted, reason: ..." of the notice

    # --- asyncio.Protocol ---------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport
        if self.server.wrapper_mode:
            # smtpd_tls_wrappermode: the ClientHello must reach the SSL layer, so read
            # nothing until start_tls() takes over the transport (it resumes reading).
            transport.pause_reading()
        self._task = self._loop.create_task(self._run())

    def data_received(self, data: bytes) -> None:
        if self._raw_phase:
            self._raw_tls.append(data)
            self.transport.pause_reading()
            return
        if self._upgrading:
            # The SSL layer may hand over the first decrypted bytes before start_tls()
            # returns: keep them for after tls_started(), never for the plaintext engine.
            self._tls_early.append(data)
            return
        if self.conn is None:
            self._early = getattr(self, "_early", b"") + data
            if len(self._early) > 65536:
                self.transport.pause_reading()
                self._paused = True
            return
        self.conn.receive_data(data)
        ready = self._data_ready
        if ready._waiter is not None and not ready._set and not self._woken:
            # Counted until its task runs: replies wait for the sessions still to run
            # in this pass of the loop (see _reply_out).
            self._woken = True
            self.server._woken += 1
        ready.set()
        # Bounded memory: stop reading while the engine holds more than it may need.
        if self.conn.buffered > self.server.read_bound and not self._paused:
            self.transport.pause_reading()
            self._paused = True

    def eof_received(self):
        # Keep the transport open: replies to commands sent before a half-close still go out.
        self._lost = True
        self._data_ready.set()
        # (The SSL layer cannot half-close; asyncio warns if asked to.)
        return None if self.ssl_object is not None or self._upgrading else True

    def connection_lost(self, exc) -> None:
        self._lost = True
        self._data_ready.set()
        self._can_write.set()

    def pause_writing(self) -> None:
        self._can_write.clear()
        # Replies are written at the end of the turn, when the session may already wait
        # for input: wake it, so it waits for the client to read instead (bounded
        # output, and smtpd_timeout runs against the write as before).
        self._data_ready.set()

    def resume_writing(self) -> None:
        self._can_write.set()

    # --- the session --------------------------------------------------------------
    async def _run(self) -> None:
        srv = self.server
        try:
            await self._session()
        except Exception as exc:   # never let one session take the process down
            srv.log.warning(f"{self.namaddr}: session error: {exc!r}")
        finally:
            if self._wait_timer is not None:
                self._wait_timer.cancel()
                self._wait_timer = None
            self._abort_transaction()
            if self.transport is not None:
                self._send_now(b"")
                self.transport.close()
            if self.conn is not None:
                if self.conn.transcript:
                    await self._last_chat_reset()
                srv.log.info(f"disconnect from {self.namaddr} {self.conn.counters_text()}")
            srv._session_done(self)
            self.finished.set()

    async def _session(self) -> None:
        srv = self.server
        peer = self.transport.get_extra_info("peername") or ("", 0)
        sock = self.transport.get_extra_info("sockname") or ("", 0)
        addr = str(peer[0])
        if addr.startswith("::ffff:"):
            addr = addr[7:]
        self.addr = addr
        name = client_hostname(addr, srv.peername_lookup)
        port_logging = srv.client_port_logging
        # smtpd_client_port_logging: every "name[addr]" of the session gains ":port".
        self.namaddr = f"{name}[{addr}]:{peer[1]}" if port_logging else f"{name}[{addr}]"
        srv.log.info(f"connect from {self.namaddr}")
        state = srv.new_state(name, addr, str(peer[1]), str(sock[0]), str(sock[1]))
        state.port_logging = port_logging
        self.state = state
        bare = srv.server_config.forbid_bare_newline
        if bare != "no" and srv.bare_newline_exempt(name, addr):
            bare = "no"
        self.conn = conn = ServerConnection(srv.server_config, client=self.namaddr,
                                            forbid_bare_newline=bare)
        if srv.has_ehlo_discard_maps:
            conn.config = srv.ehlo_discard_config(addr)
        conn.client_port = state.client_port
        check = getattr(getattr(srv.policy, "resolver", None), "syntax_error", None)
        if check is not None:
            conn.address_check = check
        if srv.notify_mask:
            conn.transcript = []
        early = getattr(self, "_early", b"")
        if early:
            conn.receive_data(early)
            self._early = b""
        if self._paused:
            self._paused = False
            self.transport.resume_reading()
        conn.auth_mechanisms = srv.offered_mechanisms(False)
        conn.xforward_allowed = srv.xforward_authorized(name, addr)
        conn.xclient_allowed = srv.xclient_authorized(name, addr)
        if srv.sasl is not None and srv.sasl_exception(name, addr):
            # smtpd_sasl_exceptions_networks: AUTH is not announced (but still works).
            conn.auth_advertised = False
        if srv.wrapper_mode:
            # Implicit TLS (smtps/submissions, RFC 8314 3.3): the handshake comes first.
            if srv.tls_context is None:
                srv.log.warning(f"{self.namaddr}: TLS not available: cannot serve "
                                "smtpd_tls_wrappermode; closing")
                conn.abort("lost")
                return
            if not await self._start_tls():
                conn.abort("lost")
                srv.log.info(f"lost connection after CONNECT from {self.namaddr}")
                return
            conn.tls_active = True
            self._after_tls()
            if not await self._tls_rate_check():
                return

        reply = await srv.connection_limit_reply(self)
        if reply is not None:
            conn.send_greeting(reply)
            await self._flush()
            return
        if srv.draining:
            conn.send_greeting(Reply(421, f"{srv.hostname} Service shutting down, closing "
                                          "transmission channel", "4.3.2"))
            await self._flush()
            return
        reply = await self._policy("on_connect", state)
        if reply is not None:
            # As Postfix (smtpd_delay_reject = no): the reject is the greeting, then every
            # command but QUIT is refused.
            self._log_reject(reply)
            conn.deny_access()
            conn.send_greeting(reply)
        else:
            conn.send_greeting(Reply(220, srv.banner))
        # The greeting goes out as every reply below does (_reply_out); a refusing
        # greeting (421/554) is flushed with the hang-up that follows it.
        self._reply_out(conn.data_to_send())

        while True:
            ev = conn.next_event()
            if ev is NEED_DATA:
                # Clear before any await: bytes arriving while we flush must wake us.
                self._data_ready.clear()
                delay = conn.error_delay()
                if delay > 0 or not self._can_write.is_set():
                    if not await self._flush(delay):
                        return
                else:
                    # The usual turn (no error delay, no back-pressure) writes the
                    # replies without a coroutine of its own: this runs for every read.
                    self._reply_out(conn.data_to_send())
                if self._paused:
                    self._paused = False
                    self.transport.resume_reading()
                if not await self._wait_input():
                    return
                continue
            if ev is PAUSED:   # every event is answered before we ask again
                raise RuntimeError("engine paused without a pending event")
            if type(ev) is DataChunk:
                # The content, one or more events per message: written here, without a
                # coroutine and the walk through _handle()'s event types.  A DISCARDed
                # transaction's content is read and dropped, never passed to cleanup:
                # Postfix logs no "message-id=" for it (checked against 3.7).
                if self.cs is not None and not getattr(self.state, "discard", False):
                    self.cs.write(ev.data)
                continue
            if isinstance(ev, ConnectionClosed):
                self._log_close(ev)
                if srv.limits is not None:
                    # Tell anvil before the last reply leaves: the client's next
                    # connection must not find this one still counted.
                    await srv.limits.disconnect_settled(self)
                if conn.transcript:
                    # The postmaster notice is queued before the last reply leaves, so
                    # a client that saw "221" finds no queue file still being written.
                    await self._last_chat_reset()
                await self._flush()
                return
            await self._handle(ev)

    async def _wait_input(self) -> bool:
        """Wait for bytes; False on timeout (after the 421) or when the peer went away."""
        conn = self.conn
        if self._lost:
            conn.receive_data(b"")
            return True
        timeout = self.server.timeout
        if self.server.per_record_deadline:
            # smtpd_per_record_deadline: smtpd_timeout bounds a whole request line, not
            # each read, so a client trickling bytes is cut off (Postfix's slowloris fix).
            now = self._loop.time()
            if self._deadline is None or conn.buffered < getattr(self, "_buffered_mark", 0) \
                    or conn.buffered == 0:
                self._deadline = now + timeout
            timeout = max(0.0, self._deadline - now)
        ready = self._data_ready
        if not ready._set:
            # _Wakeup.wait() bounded by ``timeout``, written out here: this runs for
            # every read, and each coroutine level costs a frame on the way in and out.
            # One timer per session, moved on only when it fires, instead of the task
            # and timer that wait_for() makes for every read.
            loop = self._loop
            deadline = self._wait_deadline = loop.time() + timeout
            timer = self._wait_timer
            if timer is None or timer.when() > deadline:
                if timer is not None:
                    timer.cancel()
                self._wait_timer = loop.call_at(deadline, self._on_wait_timer)
            self._timed_out = False
            self._waiting = True
            fut = ready._waiter = loop.create_future()
            try:
                await fut
            finally:
                self._waiting = False
                ready._waiter = None
                if self._woken:
                    self._woken = False
                    self.server._woken -= 1
            if self._timed_out:
                self._abort_reason = "timeout"
                self.server.log.info(f"timeout after {conn.timeout_where()} from {self.namaddr}")
                conn.abort("timeout")
                self._send_now(Reply(421, f"{self.server.hostname} Error: timeout "
                                          "exceeded", "4.4.2").to_bytes())
                return False
        self._buffered_mark = conn.buffered
        if self._lost:
            conn.receive_data(b"")
        return True

    # Replies of the sessions that run in one pass of the event loop leave together,
    # written by the last of them (or at the end of the pass): the clients are woken
    # in one burst instead of once between every two sessions' Python work.
    # _send_now() is for writes that must keep their place against a close, a TLS
    # handshake or a 421, and takes the held bytes first.
    _out: bytes | None = None
    _woken = False          # counted in SmtpdServer._woken (data arrived, task not run)

    def _reply_out(self, data: bytes) -> None:
        srv = self.server
        if srv._woken:
            # More sessions that got input run later in this pass: write with them.
            if data:
                self._send_later(data)
            return
        if srv._out_sessions:
            srv._write_out()
        if data and not self.transport.is_closing():
            self.transport.write(data)

    def _send_later(self, data: bytes) -> None:
        out = self._out
        if out is None:
            self._out = data
            self.server._output_waiting(self)
        else:
            self._out = out + data

    def _send_now(self, data: bytes) -> None:
        out = self._out
        if out is not None:
            self._out = None
            data = out + data
        if data and not self.transport.is_closing():
            self.transport.write(data)

    def _on_wait_timer(self) -> None:
        self._wait_timer = None
        if not self._waiting:
            return                  # the next wait arms it again
        loop = self._loop
        if loop.time() < self._wait_deadline:
            self._wait_timer = loop.call_at(self._wait_deadline, self._on_wait_timer)
            return
        self._timed_out = True
        self._data_ready.set()

    async def _flush(self, delay: float | None = None) -> bool:
        conn = self.conn
        if delay is None:
            delay = conn.error_delay()
        if delay > 0:
            await asyncio.sleep(delay)
        self._send_now(conn.data_to_send())
        if not self._can_write.is_set():
            # A client that does not read its replies must not make us buffer without bound.
            try:
                await asyncio.wait_for(self._can_write.wait(), self.server.timeout)
            except asyncio.TimeoutError:
                self.server.log.info(f"timeout after {conn.where} from {self.namaddr}")
                return False
        return True

    def _log_close(self, ev: ConnectionClosed) -> None:
        where = self.conn.where
        if ev.reason == "lost":
            self._abort_reason = "lost connection"
            # Postfix does not log a client that hangs up right after its message.
            if where != "END-OF-MESSAGE":
                self.server.log.info(f"lost connection after {where} from {self.namaddr}")
        elif ev.reason == "too many errors":
            self._abort_reason = "too many errors"
            self.server.log.info(f"too many errors after {where} from {self.namaddr}")

    async def _flush_history(self) -> None:
        # Postfix flushes its history at EHLO, RSET and end of DATA once it is long.
        transcript = self.conn.transcript
        if transcript is not None and len(transcript) > self.server.history_threshold:
            await self._chat_reset(self.server.history_threshold)

    async def _last_chat_reset(self) -> None:
        try:
            await self._chat_reset(0)
        except Exception as exc:   # noqa: BLE001 - a notice never ends a session badly
            self.server.log.warning(f"postmaster notify: {exc!r}")

    async def _chat_reset(self, threshold: int) -> None:
        """Postfix's chat_reset(): a history longer than ``threshold`` entries is dropped,
        first mailed to the postmaster when the session had errors of a class in
        notify_classes (Postfix's smtpd_chat_notify)."""
        transcript, state = self.conn.transcript, self.state
        if not transcript or len(transcript) <= threshold:
            return
        classes = state.error_classes if state is not None else set()
        try:
            # Also when the policy engine noted a class already: a "bounce" among
            # them picks the notice's recipient.
            classes |= transcript_error_classes(transcript[self._errors_from:])
            if classes & self.server.notify_mask:
                await self._notify_postmaster(transcript, classes)
        finally:
            classes.clear()
            transcript.clear()
            self._errors_from = 0

    async def _notify_postmaster(self, transcript: list, classes: set) -> None:
        srv = self.server
        cfg = srv.config
        # A "bounce" class error goes to bounce_notice_recipient, others to
        # error_notice_recipient (Postfix: error_mask & MAIL_ERROR_BOUNCE).
        rcpt = (cfg.get("bounce_notice_recipient") if "bounce" in classes
                else cfg.get("error_notice_recipient")) or "postmaster"
        date = _mail_date(srv.clock())
        lines = [f"Date: {date}",
                 f"From: Mail Delivery System <MAILER-DAEMON@{srv.hostname}>",
                 f"To: Postmaster <{cfg.get('error_notice_recipient') or 'postmaster'}>",
                 f"Subject: {srv.mail_name} SMTP server: errors from {self.namaddr}",
                 "", "Transcript of session follows.", ""]
        for entry in transcript:
            if isinstance(entry, bytes):
                texts = ["Out: " + ln for ln in
                         entry.decode("utf-8", "replace").split("\r\n") if ln]
            else:
                texts = ["In:  " + entry]
            for text in texts:
                # Untrusted text: printable, and each output line starts with a space.
                lines.extend(" " + ln for ln in wrap_transcript_line(_printable(text)))
        lines.append("")
        if self._abort_reason:
            lines.append(f"Session aborted, reason: {self._abort_reason}")
        lines += ["", "For other details, see the local mail logfile"]
        data = ("\n".join(lines) + "\n").encode("utf-8", "replace")
        try:
            await post_notice(cfg, None, sender=double_bounce_address(cfg), recipient=rcpt,
                              data=data, cleanup=_PostMailCleanup(srv.cleanup, srv.hostname,
                                                                  srv.mail_name, date))
        except NoticeError:
            pass        # junk mail: Postfix ignores a failed post_mail_fclose() too

    def _log_reject(self, reply: Reply, text: str | None = None) -> None:
        pol = self.server.policy
        if text is None and hasattr(pol, "reject_log_line"):
            line = pol.reject_log_line(self.state, reply)
        else:
            st = self.state
            line = (f"{st.queue_id or 'NOQUEUE'}: reject: {st.where} from {self.namaddr}: "
                    f"{text if text is not None else reply};"
                    + (f" from=<{st.sender}>" if st.sender is not None else "")
                    + (f" to=<{st.recipient}>" if st.recipient is not None else "")
                    + f" proto={st.protocol}"
                    + (f" helo=<{st.helo_name}>" if st.helo_name is not None else ""))
        self.server.log.info(line)
        if self.state is not None and self.state.check.ignored:
            _flush_ignored(self.state, self.server.log)

    def _drop_queue_file(self) -> None:
        if self.cs is not None:
            try:
                self.cs.abort()
            except Exception:
                pass
            self.cs = None

    def _abort_transaction(self) -> None:
        self._drop_queue_file()
        self._mail = None
        self._received_for = None
        if self.state is not None:
            self.state.reset_transaction()
            self.state.sasl_sender = None

    async def _policy(self, name: str, *args) -> Reply | None:
        """Call SmtpdPolicy.<name>; a failure inside it defers instead of dropping the client."""
        try:
            reply = await getattr(self.server.policy, name)(*args)
            state = self.state
            if reply is None and state is not None and state.check.ignored:
                _flush_ignored(state, self.server.log)
            return reply
        except Exception as exc:
            self.server.log.warning(f"{self.namaddr}: {name}: {exc!r}")
            if self.state is not None:
                self.state.error_classes.add("software")    # for notify_classes
            return Reply(451, "Server configuration error", "4.3.5")

    # --- one handler per event ----------------------------------------------------
    async def _handle(self, ev) -> None:
        conn, state, srv = self.conn, self.state, self.server
        if isinstance(ev, DataChunk):
            # A DISCARDed transaction's content is read and dropped, never passed to
            # cleanup: Postfix logs no "message-id=" for it (checked against 3.7).
            if self.cs is not None and not getattr(state, "discard", False):
                self.cs.write(ev.data)
            return
        if isinstance(ev, Warning):
            text = ev.text
            if ev.with_queue_id:
                text = f"{state.queue_id or 'NOQUEUE'}: {text}"
            srv.log.warning(text)
            return
        if isinstance(ev, Info):
            state.pipelining_violation = conn.pipelining_violation
            srv.log.info(ev.text)
            return
        if isinstance(ev, Rejected):
            saved = state.where, state.sender
            state.where = ev.command
            if ev.sender is not None:
                state.sender = ev.sender
            self._log_reject(ev.reply, ev.text)
            state.where, state.sender = saved
            return
        if isinstance(ev, Rset):
            self._abort_transaction()
            await self._flush_history()
            return
        if isinstance(ev, (Helo, Ehlo)):
            self._abort_transaction()
            old = (state.helo_name, state.protocol)
            state.helo_name = ev.name
            # The checks (and their reject, warn and reject_warning lines) see the new
            # name with the protocol of before the command: Postfix's ehlo_cmd sets
            # ESMTP only once they passed.
            reply = await self._policy("on_helo", state,
                                       "EHLO" if isinstance(ev, Ehlo) else "HELO")
            if reply is not None:
                self._log_reject(reply)
                state.helo_name, state.protocol = old
            else:
                # HELO after EHLO leaves the protocol ESMTP (Postfix's helo_cmd never
                # downgrades it; 3.7, side by side).
                state.protocol = ("ESMTP" if isinstance(ev, Ehlo) or state.protocol == "ESMTP"
                                  else "SMTP")
                await self._flush_history()
            conn.send_reply(reply)
            return
        if isinstance(ev, Mail):
            reply = await srv.event_limit_reply(self, "mail")
            if reply is not None:
                conn.send_reply(reply)
                return
            if not srv.queue_space_ok(ev.size or 0):
                # Postfix's smtpd_check_size(): before any restriction, no reject log line.
                conn.send_reply(REPLY_NO_SPACE)
                return
            state.sender = ev.sender
            state.smtputf8 = ev.smtputf8
            state.message_size = ev.size or 0
            # Postfix 3.7 keeps AUTH= (printable, as sent) with SASL off too: its client=
            # line shows it (side by side).
            state.sasl_sender = ev.sasl_sender
            reply = await self._policy("on_mail", state)
            if reply is not None:
                state.sasl_sender = None
                # Sequence errors (HELO required) are not restriction rejects: no log line.
                if not any(reply is r for r in getattr(srv.policy, "unlogged_replies", ())):
                    self._log_reject(reply)
                state.sender = None
            else:
                self._mail = ev
                if not srv.delay_open and self.cs is None and not self._open_queue_file():
                    # smtpd_delay_open_until_valid_rcpt = no: the file is opened at MAIL.
                    state.sender = None
                    self._mail = None
                    reply = REPLY_WRITE_ERROR
            conn.send_reply(reply)
            return
        if isinstance(ev, Rcpt):
            await self._rcpt(ev)
            return
        if isinstance(ev, (Data, Bdat)):
            # Postfix logs "reject: BDAT from ..." when the first chunk is refused.
            reply = await self._policy("on_data", state, *(("BDAT",) if isinstance(ev, Bdat) else ()))
            if reply is not None:
                self._log_reject(reply)
                conn.send_reply(reply)
                return
            if self.cs is None:   # cannot happen: RCPT opened it; be safe anyway
                conn.send_reply(REPLY_WRITE_ERROR)
                return
            # Access-map PREPEND headers go first, then our Received: (Postfix's order).
            for header in getattr(state, "prepend", None) or []:
                self.cs.prepend_header(header)
            self.cs.prepend_header(self._received_header(isinstance(ev, Bdat)))
            conn.send_reply(None)
            return
        if isinstance(ev, BdatChunkEnd):
            conn.send_reply(None)
            return
        if isinstance(ev, DataEnd):
            transcript = conn.transcript
            before = len(transcript) if transcript is not None else 0
            await self._end_of_data(ev)
            if transcript is not None:
                # The reply is in the transcript unless that is full (then nothing is
                # forgiven: better a notice too many than one lost).
                last = transcript[-1] if len(transcript) > before else None
                if type(last) is bytes and last[:1] == b"2":
                    # Queued: Postfix clears the session's error_mask (smtpd.c data_cmd).
                    state.error_classes.clear()
                    self._errors_from = len(transcript)
                if len(transcript) > srv.history_threshold:
                    await self._chat_reset(srv.history_threshold)
            return
        if isinstance(ev, Vrfy):
            if self._bad_address(ev.address, "VRFY", 0, REPLY_BAD_RECIPIENT):
                return
            hook = getattr(srv.policy, "on_vrfy", None)
            saved = state.where, state.recipient
            reply = await self._policy("on_vrfy", state, ev.address) if hook is not None else None
            if reply is not None:
                self._log_reject(reply)
            state.where, state.recipient = saved
            conn.send_reply(reply)
            return
        if isinstance(ev, Etrn):
            # smtpd_etrn_restrictions, then fast_flush_domains (Postfix's etrn_cmd()).
            reply = None
            if hasattr(srv.policy, "on_etrn"):
                reply = await self._policy("on_etrn", state, ev.domain)
                if reply is not None:
                    self._log_reject(reply)
            if reply is None and hasattr(srv.policy, "etrn_flush"):
                reply = srv.policy.etrn_flush(state, ev.domain)
            elif reply is None:
                srv.log.warning(f"reject: ETRN {ev.domain[:100]}... from {self.namaddr}")
            conn.send_reply(reply)
            return
        if isinstance(ev, StartTls):
            await self._starttls()
            return
        if isinstance(ev, (Auth, AuthResponse)):
            auth = self._auth()
            if auth is None:
                conn.send_reply(Reply(503, "Error: authentication not enabled", "5.5.1"))
                return
            if isinstance(ev, Auth):
                reply = await srv.event_limit_reply(self, "auth")
                if reply is not None:
                    conn.send_reply(reply)
                    return
            try:
                if isinstance(ev, Auth):
                    reply = await auth.start(ev.mechanism, ev.initial_response,
                                             tls_active=conn.tls_active)
                else:
                    reply = await auth.respond(ev.data)
            except Exception as exc:   # a back end that broke: temporary, never a crash
                srv.log.warning(f"{self.namaddr}: SASL {auth.mechanism} authentication "
                                f"problem: {exc}")
                reply = Reply(454, "Temporary authentication failure: internal error", "4.7.0")
            if reply.code == 235:
                state.sasl_username = auth.username
                state.sasl_method = auth.method
            conn.send_reply(reply)
            return
        if isinstance(ev, Xclient):
            await self._xclient(ev)
            return
        if isinstance(ev, AuthAborted):
            if self.auth is not None:
                self.auth.aborted()
            return
        raise RuntimeError(f"unhandled event {ev!r}")

    # --- TLS (RFC 3207) and AUTH (RFC 4954) --------------------------------------
    async def _starttls(self) -> None:
        conn, srv = self.conn, self.server
        if srv.tls_context is None:
            # smtpd_tls_security_level asks for TLS but the certificate did not load.
            conn.send_reply(REPLY_TLS_UNAVAILABLE)
            return
        reply = await srv.event_limit_reply(self, "starttls")   # new-session rate used up
        if reply is not None:
            conn.send_reply(reply)
            return
        conn.send_reply(None)                       # 220 2.0.0 Ready to start TLS
        # Stop reading before the 220 leaves: the client's ClientHello must wait in the
        # socket for the SSL layer; plaintext already read was dropped by the engine
        # (RFC 3207 4.2, CVE-2011-0411).
        self.transport.pause_reading()
        conn.error_delay()
        self._send_now(conn.data_to_send())
        if not await self._start_tls():
            conn.abort("lost")                      # "lost connection after STARTTLS"
            return
        if not await self._tls_rate_check(log_tls=True):
            return                                  # as Postfix: starttls=0/1
        conn.tls_started()
        state = self.state
        # RFC 3207 4.2: forget what the client said before TLS.  The protocol name
        # stays: Postfix logs proto=ESMTP (and writes ESMTPS) after EHLO, STARTTLS
        # and then HELO or no greeting at all (3.7, side by side).
        self._abort_transaction()
        state.helo_name = None
        state.sasl_username = state.sasl_method = None
        self._after_tls()
        if self._ccert_refused():
            await self._refuse_ccert(wait_command=True)

    def _ccert_refused(self) -> str | None:
        """smtpd_tls_req_ccert (level encrypt): why this session's certificate is not
        good enough, or None."""
        from postwell.tls import client_cert_policy
        if self.ssl_object is None or not client_cert_policy(self.ssl_object.context).require:
            return None
        cert = getattr(self, "_ccert", None)
        if cert is None:
            return "No client certificate presented"
        return None if cert.trusted else "Client certificate not trusted"

    async def _refuse_ccert(self, wait_command: bool) -> None:
        """Postfix's answer to a missing or untrusted required client certificate: log,
        read the client's next command (after STARTTLS), answer it with 421 and close.
        RFC 3207 4.1 lets a server refuse a session whose TLS is not good enough (it
        suggests 554 to every command; Postfix's 421 and close is what clients know)."""
        srv, conn = self.server, self.conn
        why = self._ccert_refused()
        srv.log.info(f"NOQUEUE: abort: TLS from {self.namaddr}: {why}")
        if wait_command and not conn.buffered and not self._lost:
            self._data_ready.clear()
            if not await self._wait_input():
                return                              # timed out: logged and answered
        if self._lost:
            conn.abort("lost")                      # "lost connection after STARTTLS"
            return
        if self.transport is not None:
            self._send_now(Reply(421, f"{srv.hostname} Error: {why}", "4.7.1").to_bytes())
        conn.abort("tls client certificate")

    def _tls_trust(self) -> str:
        cert = getattr(self, "_ccert", None)
        return cert.trust if cert is not None else "Anonymous"

    async def _tls_rate_check(self, log_tls: bool = False) -> bool:
        """smtpd_client_new_tls_session_rate_limit after a full handshake: over the
        limit, a 421 inside TLS and the session ends.  False when it ended.  Wrapper
        mode (log_tls False) also ends here when a required client certificate is
        missing or untrusted: the 421 is the greeting."""
        srv = self.server
        if not log_tls and self._ccert_refused():
            await self._refuse_ccert(wait_command=False)
            return False
        reused = bool(self.ssl_object is not None and self.ssl_object.session_reused)
        if srv.limits is None or not srv.limits.ntls_limit or reused:
            return True
        if log_tls and srv.tls_loglevel >= 1 and self.ssl_object is not None:
            # The handshake is logged before the check, as Postfix does.
            try:
                from postwell.tls import server_log_text
                srv.log.info(server_log_text(self.namaddr, self.ssl_object, self._tls_trust()))
                self._tls_logged = True
            except Exception:   # noqa: BLE001
                pass
        reply = await srv.event_limit_reply(self, "tls_established", reused)
        if reply is None:
            return True
        if self.transport is not None:
            self._send_now(reply.to_bytes())
        self.conn.abort("tls rate limit")
        return False

    async def _start_tls(self) -> bool:
        """Handshake on the current transport; False (logged as Postfix) when it fails."""
        srv = self.server
        loop = asyncio.get_running_loop()
        self._ccert = None
        _log_tls_policy_warnings(srv)
        self._upgrading = True
        self._tls_early = []
        raw, self._raw_tls, self._raw_phase = b"".join(self._raw_tls), [], False
        try:
            coro = loop.start_tls(self.transport, self, srv.tls_context, server_side=True,
                                  ssl_handshake_timeout=srv.starttls_timeout)
            if raw:
                task = loop.create_task(coro)
                # One turn: start_tls() has installed its SSL protocol but not yet
                # started it; bytes given now wait in its input BIO for the handshake.
                await asyncio.sleep(0)
                proto = self.transport.get_protocol()
                if proto is not self and hasattr(proto, "buffer_updated"):
                    _feed_buffered(proto, raw)
                new = await task
            else:
                new = await coro
        except Exception as exc:   # noqa: BLE001 - any handshake failure ends the session
            self._upgrading = False
            self._tls_early = []
            # Only texts: formatting the traceback trips a CPython 3.11.7 compile() bug.
            why, library = _handshake_failure(exc)
            srv.log.info(f"SSL_accept error from {self.namaddr}: {why}")
            if library:
                srv.log.warning(f"TLS library problem: {library}")
            return False
        if new is None:
            self._upgrading = False
            srv.log.info(f"SSL_accept error from {self.namaddr}: lost connection")
            return False
        self.transport = new
        self._paused = False
        self.ssl_object = new.get_extra_info("ssl_object")
        self._note_client_certificate()
        return True

    def _note_client_certificate(self) -> None:
        """Read the client's certificate once per handshake (fingerprints, trust)."""
        srv = self.server
        try:
            from postwell.tls import client_cert_policy, client_certificate
            if self.ssl_object is None:
                return
            self._ccert = cert = client_certificate(self.ssl_object)
            if srv.tls_loglevel >= 2 and cert is not None:
                srv.log.info(f"{self.namaddr}: subject_CN={cert.subject_cn}, "
                             f"issuer={cert.issuer_cn}, fingerprint={cert.fingerprint}, "
                             f"pkey_fingerprint={cert.pkey_fingerprint}")
            if (cert is not None and not cert.trusted
                    and client_cert_policy(self.ssl_object.context).require):
                srv.log.info(f"certificate verification failed for {self.namaddr}: "
                             f"{cert.verify_error}")
        except Exception as exc:   # noqa: BLE001 - a certificate we cannot read is no certificate
            self._ccert = None
            srv.log.warning(f"{self.namaddr}: TLS client certificate: {exc}")

    def _after_tls(self) -> None:
        """The session is encrypted: log, note it for the policy, feed held input."""
        srv, conn, state = self.server, self.conn, self.state
        ssl_obj = self.ssl_object
        if ssl_obj is not None:
            try:
                state.encryption_protocol = ssl_obj.version()
                name, _proto, bits = ssl_obj.cipher() or ("", "", 0)
                state.encryption_cipher = name
                state.encryption_keysize = bits or 0
                cert = getattr(self, "_ccert", None)
                state.ccert_subject = cert.subject_cn if cert else ""
                state.ccert_issuer = cert.issuer_cn if cert else ""
                state.ccert_fingerprint = cert.fingerprint if cert else ""
                state.ccert_pubkey_fingerprint = cert.pkey_fingerprint if cert else ""
                state.ccert_trusted = bool(cert and cert.trusted)
                state.tls_peer_cert_fingerprint = cert.fingerprint if cert else None
                if srv.tls_loglevel >= 1 and not getattr(self, "_tls_logged", False):
                    from postwell.tls import server_log_text
                    srv.log.info(server_log_text(self.namaddr, ssl_obj, self._tls_trust()))
            except Exception as exc:   # noqa: BLE001 - logging must not end the session
                srv.log.warning(f"{self.namaddr}: TLS session details: {exc}")
        conn.auth_mechanisms = srv.offered_mechanisms(True)
        self._upgrading = False
        early, self._tls_early = b"".join(self._tls_early), []
        if early:
            conn.receive_data(early)
        self._data_ready.set()

    async def _xclient(self, ev: Xclient) -> None:
        """XCLIENT (XCLIENT_README): the overrides become the session's.  A complete
        command starts the session over at the greeting, with the connection-level
        checks (and smtpd_authorized_xclient_hosts) for the client it now names."""
        srv, state, conn = self.server, self.state, self.conn
        # The reject lines and replies keep the old name[addr] until the command is done.
        state.shown_namaddr = self.namaddr
        apply_to_state(state, ev.request, srv.sasl is not None)
        if srv.sasl is None:
            # With SASL off Postfix still takes LOGIN= (smtpd_sasl_auth_extern): its
            # client= line names it, though no restriction sees it.
            for item in ev.request.items:
                if item.attribute == "LOGIN" and item.value is not None:
                    self._xclient_login = item.value
            if ev.complete and not any(i.attribute == "LOGIN" and i.value is not None
                                       for i in ev.request.items):
                self._xclient_login = None
        if not ev.complete:
            conn.send_reply(None)       # the bad attribute's 501; the ones before it stay
            return
        self._abort_transaction()
        restart_state(state, ev.request)
        if ev.request.renames_client():
            state.shown_namaddr = None
            self.namaddr = conn.client = state.shown_namaddr = state.namaddr
        conn.client_port = state.client_port
        if conn.transcript:
            # Postfix's xclient_cmd() ends the session's history here (chat_reset(0)):
            # a notice for the errors so far, under the name XCLIENT gave.
            await self._last_chat_reset()
        self.auth = None                # a later AUTH speaks for the client named now
        conn.xclient_allowed = srv.xclient_authorized(state.client_name, state.client_addr)
        if srv.has_ehlo_discard_maps:
            conn.config = srv.ehlo_discard_config(state.client_addr)
        if srv.sasl is not None:
            conn.auth_advertised = not srv.sasl_exception(state.client_name, state.client_addr)
        # The client restrictions run again for the client named now; their log lines
        # (reject, warn, hold, ...) say "XCLIENT from" as Postfix's do.
        reply = await self._policy("on_connect", state, "XCLIENT")
        if reply is not None:
            state.where = "XCLIENT"
            self._log_reject(reply)
        conn.send_reply(reply if reply is not None else Reply(220, srv.banner))

    def _xforward_log(self) -> str:
        """What Postfix adds to the "client=" line for XFORWARD attributes."""
        xf = getattr(self.conn, "xforward", None) or {}
        out = ""
        if xf.get("IDENT"):
            out += f", orig_queue_id={xf['IDENT']}"
        if xf.get("ADDR"):
            addr = xf["ADDR"]
            addr = addr[5:] if addr[:5].upper() == "IPV6:" else addr
            out += f", orig_client={xf.get('NAME') or 'unknown'}[{addr}]"
        elif xf.get("NAME"):
            out += f", orig_client={xf['NAME']}"
        elif getattr(self.conn, "xforward_client", False):
            # PORT, PROTO or HELO alone, or an [UNAVAILABLE] address (Postfix 3.7).
            out += ", orig_client=unknown"
        return out

    def _auth(self):
        srv = self.server
        if srv.sasl is None:
            return None
        if self.auth is None:
            from postwell.sasl.session import SmtpdAuth
            st = self.state
            self.auth = SmtpdAuth(srv.sasl, srv.log, namaddr=self.namaddr,
                                  client_addr=st.client_addr, client_port=st.client_port,
                                  local_addr=st.server_addr, local_port=st.server_port,
                                  local_domain=srv.sasl_local_domain)
        return self.auth

    def _bad_address(self, address: str, command: str, skip: int, reply: Reply) -> bool:
        """Postfix's extract_addr() -> smtpd_check_addr() for VRFY (the engine asks
        conn.address_check for MAIL and RCPT): an address trivial-rewrite flags as
        malformed (allow_min_user's '-', a bad domain left once the local ones are
        stripped) is refused with 501 and a warning naming it as the client sent it.
        True when refused (the reply is sent)."""
        check = self.conn.address_check
        # The engine checks the domain of MAIL and RCPT addresses, not of VRFY's.
        if check is None or not address or not check(address, False):
            return False
        # The command is still pending, so the engine's line is this command's.
        parts = self.conn._line_text.strip(" \t").split(None, 1)
        token = _address_token(parts[1].strip(" \t")[skip:] if len(parts) == 2 else "")[0]
        self.server.log.warning(f"Illegal address syntax from {self.namaddr} in {command} "
                                f"command: {token}")
        self.conn.send_reply(reply)
        return True

    def _open_queue_file(self) -> bool:
        """The queue file and id of this transaction, and the "client=" line: at the first
        accepted RCPT (smtpd_delay_open_until_valid_rcpt = yes) or at MAIL (no)."""
        state, srv = self.state, self.server
        try:
            cs = srv.cleanup.open(rewrite_local=srv.rewrite_local(
                                      state.client_addr, state.client_name,
                                      state.sasl_username is not None),
                                  content_checks=True)
        except Exception as exc:
            srv.log.warning(f"queue file create error: {exc}")
            return False
        self.cs = cs
        state.queue_id = cs.queue_id
        sasl_username, sasl_method = state.sasl_username, state.sasl_method
        if sasl_username is None and self._xclient_login is not None:
            sasl_username, sasl_method = self._xclient_login, "XCLIENT"
        if sasl_username is not None:
            # Postfix's form, which log tools parse.
            srv.log.info(f"{cs.queue_id}: client={self.namaddr}, "
                         f"sasl_method={sasl_method}, "
                         f"sasl_username={sasl_username}"
                         + (f", sasl_sender={state.sasl_sender}"
                            if state.sasl_sender is not None else "") + self._xforward_log())
        elif state.sasl_sender is not None:
            # MAIL FROM AUTH= without a login ("AUTH=" logs an empty value).
            srv.log.info(f"{cs.queue_id}: client={self.namaddr}, "
                         f"sasl_sender={state.sasl_sender}" + self._xforward_log())
        else:
            srv.log.info(f"{cs.queue_id}: client={self.namaddr}" + self._xforward_log())
        mail = self._mail
        cs.set_sender(state.sender or "", ret=mail.ret if mail else None,
                      envid=mail.envid if mail else None,
                      smtputf8=bool(mail and mail.smtputf8),
                      body_type=mail.body if mail else None)
        for key, value in (("client_name", state.client_name),
                           ("reverse_client_name", state.reverse_client_name),
                           ("client_address", state.client_addr),
                           ("client_port", state.client_port),
                           ("server_address", state.server_addr),
                           ("server_port", state.server_port),
                           ("helo_name", state.helo_name),
                           ("protocol_name", state.protocol),
                           ("sasl_method", sasl_method),
                           ("sasl_username", sasl_username),
                           ("sasl_sender", state.sasl_sender),
                           ("log_message_origin", self.namaddr)):
            if value:
                cs.set_attribute(key, value)
        if state.sasl_sender == "":
            # "MAIL FROM:<...> AUTH=": Postfix's smtpd passes the empty value on and
            # its cleanup drops it with this warning (3.7, side by side).
            cs.cleanup.log.warning(f'{cs.queue_id}: spurious null attribute value for '
                                   f'"sasl_sender" -- ignored')
        return True

    async def _rcpt(self, ev: Rcpt) -> None:
        conn, state, srv = self.conn, self.state, self.server
        line = conn._line_text       # this command's, as sent: the engine waits for our reply
        reply = await srv.event_limit_reply(self, "rcpt")
        if reply is not None:
            conn.send_reply(reply)
            return
        # Postfix's smtpd_check_rcpt() names the address only while it checks it; the
        # session keeps its first accepted recipient, which the DATA and end-of-data
        # restrictions (and their log lines) see when it is the only one.
        first = state.recipient if state.recipient_count else None
        state.recipient = ev.recipient
        reply = await self._policy("on_rcpt", state)
        if reply is not None:
            self._log_reject(reply)
            state.recipient = first
            conn.send_reply(reply)
            return
        if self.cs is None and not self._open_queue_file():
            state.recipient = first
            conn.send_reply(REPLY_WRITE_ERROR)
            return
        self.cs.add_recipient(ev.recipient, orig=ev.recipient, orcpt=rcpt_orcpt(line, ev.orcpt),
                              notify=ev.notify)
        state.recipient_count += 1
        self._received_for = ev.recipient if state.recipient_count == 1 else None
        if first is not None:
            state.recipient = first
        conn.send_reply(None)

    def _received_header(self, bdat: bool) -> str:
        st, srv = self.state, self.server
        helo = st.helo_name if st.helo_name is not None else st.client_name
        proto = st.protocol or "SMTP"
        esmtp = proto == "ESMTP"
        if self._mail is not None and self._mail.smtputf8:
            proto = "UTF8SMTP"                  # RFC 6531 3.7.3, after HELO too
        if esmtp:
            # RFC 3848 (RFC 6531 3.7.3 for UTF8SMTP): S for TLS, A for AUTH, only in an
            # EHLO session, as Postfix 3.7 ("with SMTP" after HELO, STARTTLS, HELO).
            proto += ("S" if self.ssl_object is not None else "") + \
                ("A" if st.sasl_username else "")
        head = f"Received: from {helo} ({st.client_name} [{_rfc_addr(st.client_addr)}])\n"
        if self.ssl_object is not None and srv.tls_received_header:
            try:
                from postwell.tls import received_header_tls_text
                head += "\t" + received_header_tls_text(self.ssl_object, srv.tls_ask_ccert,
                                                        getattr(self, "_ccert", None)) + "\n"
            except Exception as exc:   # noqa: BLE001 - the header must still be written
                srv.log.warning(f"{self.namaddr}: TLS header text: {exc}")
        if st.sasl_username and srv.sasl_authenticated_header:
            from postwell.sasl.base import printable
            head += f"\t(Authenticated sender: {printable(st.sasl_username)})\n"
        head += f"\tby {srv.hostname} ({srv.mail_name}) with {proto} id {st.queue_id}"
        date = _mail_date(srv.clock())
        if self._received_for is not None and st.recipient_count == 1:
            # RFC 5321 4.4: a Path; the local part quoted where it needs it, as
            # Postfix's quote_822_local() writes it (<"a b"@example.org>).
            return head + f"\n\tfor <{log_address(self._received_for)}>; {date}"
        return head + f";\n\t{date}"

    async def _end_of_data(self, ev: DataEnd) -> None:
        conn, state, srv = self.conn, self.state, self.server
        cs = self.cs
        state.where = "END-OF-MESSAGE"
        keep = False
        try:
            if cs is None:
                conn.send_reply(REPLY_WRITE_ERROR)
                return
            if ev.too_big:
                srv.log.warning(f"{cs.queue_id}: queue file size limit exceeded")
                conn.send_reply(REPLY_TOO_BIG)
                return
            if ev.bare_lf:
                self._log_reject(ev.default, "bare <LF> received")
                conn.send_reply(ev.default)
                return
            # A policy request at END-OF-MESSAGE carries the size received (Postfix's
            # act_size); before that, the MAIL SIZE= value.
            state.act_size = ev.size
            try:
                reply = await self._policy("on_end_of_data", state)
            finally:
                state.act_size = 0
            if reply is not None:
                self._log_reject(reply)
                # Postfix 3.7 drops the queue file but keeps the envelope (sender,
                # recipients, their count, even the queue id for the log) until
                # RSET/HELO/EHLO; a later RCPT opens a new queue file.  A DATA without
                # one finds no queue file: 451 (Postfix's smtpd crashes there).
                keep = True
                self._drop_queue_file()
                conn.reject_keeping_transaction(reply)
                return
            if getattr(state, "discard", False):
                # DISCARD: the client is told "queued" and the message is dropped (Postfix).
                cs.abort()
                self.cs = None
                reply = Reply(250, f"Ok: queued as {cs.queue_id}", "2.0.0")
                if ev.bdat:
                    reply = Reply(250, f"Ok: {ev.size} bytes queued as {cs.queue_id}", "2.0.0")
                conn.send_reply(reply)
                return
            if getattr(state, "hold", False) and hasattr(cs, "set_hold"):
                cs.set_hold()       # HOLD from an access map: queued into hold/, not delivered
            # FILTER, REDIRECT and BCC from an access map act on the message as in Postfix
            # (cleanup's header/body checks may still replace the filter or the redirect).
            if state.filter and hasattr(cs, "set_filter"):
                cs.set_filter(state.filter)
            if state.redirect and hasattr(cs, "set_redirect"):
                cs.set_redirect(state.redirect)
            if state.bcc and hasattr(cs, "add_bcc"):
                for address in state.bcc:
                    cs.add_bcc(address)
            try:
                reply = await cs.finish()
            except Exception as exc:
                srv.log.warning(f"{cs.queue_id}: {exc}")
                reply = REPLY_WRITE_ERROR
            self.cs = None          # finished: committed or already discarded by cleanup
            if reply.code >= 400 and not transcript_error_classes((reply.to_bytes(),)):
                # A refusal of cleanup's own (header/body checks REJECT, a deferral):
                # Postfix's data_cmd notes a policy error (the others by their text).
                state.error_classes.add("policy")
            if ev.bdat and reply.code == 250:
                # Postfix words the last BDAT reply "Ok: N bytes queued as ID".
                reply = Reply(250, f"Ok: {ev.size} bytes queued as {cs.queue_id}", "2.0.0")
            conn.send_reply(reply)
        finally:
            if not keep:
                self._abort_transaction()


# --------------------------------------------------------------------------- server

class SmtpdServer:
    def __init__(self, config, *, log=None, policy=None, cleanup=None, service_name: str = "smtp",
                 clock=time.time, preloaded: dict | None = None) -> None:
        from postwell.log import MailLog
        self.config = config
        self._preloaded = preloaded or {}
        self.service_name = service_name
        self.log = log if log is not None else MailLog.from_config(config, "smtpd")
        self.policy = policy if policy is not None else _load_policy(config, self.log)
        self.cleanup = cleanup if cleanup is not None else _load_cleanup(config, self.log)
        self.clock = clock
        self._setup_tls_and_sasl(config)
        self.server_config = ServerConfig.from_config(config, **self._engine_overrides(config))
        self.hostname = config.get("myhostname") or "localhost"
        self.mail_name = config.get("mail_name") or "postwell"
        # notify_classes: the error classes whose sessions are mailed to the postmaster.
        self.notify_mask = notify_classes(config)
        self.history_threshold = _int(config, "smtpd_history_flush_threshold", 100)
        self.banner = config.get("smtpd_banner") or f"{self.hostname} ESMTP {self.mail_name}"
        self.timeout = _time(config, "smtpd_timeout", 300.0)
        self.peername_lookup = (config.get("smtpd_peername_lookup") or "yes").lower() != "no"
        self.connection_limit = _int(config, "smtpd_client_connection_count_limit", 50)
        self.read_bound = 4 * self.server_config.line_length_limit + 256 * 1024
        self.sessions: set[SmtpdSession] = set()
        self._out_sessions: list[SmtpdSession] = []
        self._out_scheduled = False
        self._woken = 0         # sessions woken by input whose task has not run yet
        self._per_ip: dict[str, int] = {}
        self._servers: list[asyncio.base_events.Server] = []
        self.draining = False
        self._limit_exceptions = self._host_list("smtpd_client_event_limit_exceptions",
                                                 "$mynetworks")
        self._bare_exclusions = self._host_list("smtpd_forbid_bare_newline_exclusions",
                                                "$mynetworks")
        # Only address patterns are remembered per client: a table may change under us.
        self._bare_cache: dict[tuple[str, str], bool] | None = None
        entries = getattr(self._bare_exclusions, "entries", None)
        try:
            from postwell.policy.matchlist import is_table_spec
            if entries is not None and not any(is_table_spec(e.lstrip("!")) for e in entries):
                self._bare_cache = {}
        except ImportError:
            pass
        self._own = None
        self._rewrite_cache: dict[str, bool] = {}
        # local_header_rewrite_clients: which clients' headers are rewritten as local
        # (unqualified addresses get @$myorigin, missing Date/Message-Id/From added).
        self._rewrite_rules = [w for w in re.split(r"[\s,]+", config.get(
            "local_header_rewrite_clients") or "") if w]
        self._rewrite_mynetworks = self._host_list("mynetworks", "$mynetworks") \
            if "permit_mynetworks" in self._rewrite_rules else None
        for rule in self._rewrite_rules:
            if rule not in ("permit_inet_interfaces", "permit_mynetworks",
                            "permit_sasl_authenticated", "static:all"):
                self.log.warning(f"local_header_rewrite_clients: {rule} is not supported by "
                                 "postwell and never matches")
        self.limits = None        # anvil(8): machine-wide counts and rates
        try:
            from postwell.anvil import SmtpdLimits
            self.limits = SmtpdLimits.from_config(config, self.log, service=service_name,
                                                  hostname=self.hostname,
                                                  exceptions=self._limit_exceptions)
        except Exception as exc:   # noqa: BLE001 - no anvil: the per-process count remains
            self.log.warning(f"anvil client: {exc!r}")

    def _setup_tls_and_sasl(self, config) -> None:
        """TLS context and SASL server for this service (its -o overrides applied)."""
        from postwell.tls import TlsConfigError, server_context, server_security_level
        self.wrapper_mode = _bool(config, "smtpd_tls_wrappermode")
        try:
            self.tls_level = server_security_level(config)
        except TlsConfigError as exc:
            self.log.warning(str(exc))
            self.tls_level = "encrypt"          # an unknown level: never weaker
        if self.wrapper_mode and self.tls_level == "none":
            self.tls_level = "may"
        self.tls_context = None
        if self.tls_level != "none" or self.wrapper_mode:
            try:
                if "tls_context" in self._preloaded:
                    # Loaded by preload() before the privilege drop (keys often root-only).
                    pre = self._preloaded["tls_context"]
                    if isinstance(pre, TlsConfigError):
                        raise pre
                    self.tls_context = pre
                else:
                    self.tls_context = server_context(config)
            except TlsConfigError as exc:
                # As Postfix: level may runs without STARTTLS, encrypt refuses mail (454).
                self.log.warning(f"TLS library problem: {exc}; TLS disabled")
        self.tls_loglevel = _int(config, "smtpd_tls_loglevel", 0)
        self.tls_received_header = _bool(config, "smtpd_tls_received_header")
        self.tls_ask_ccert = _bool(config, "smtpd_tls_ask_ccert")
        # Mandatory TLS implies AUTH only over TLS: Postfix 3.7 offers no AUTH before
        # STARTTLS at level encrypt, whatever smtpd_tls_auth_only says (checked).
        self.tls_auth_only = _bool(config, "smtpd_tls_auth_only") or self.tls_level == "encrypt"
        self.starttls_timeout = _time(config, "smtpd_starttls_timeout", 300.0)
        self.per_record_deadline = _bool(config, "smtpd_per_record_deadline")
        self.sasl = None
        self._sasl_exceptions = False          # built on first use
        self._xforward_hosts = False           # built on first use
        self._xclient_hosts = False            # built on first use
        self.sasl_local_domain = config.get("smtpd_sasl_local_domain") or None
        self.sasl_authenticated_header = _bool(config, "smtpd_sasl_authenticated_header")
        try:
            from postwell.sasl import SaslConfigError, server_for_config
            try:
                self.sasl = server_for_config(config)
            except SaslConfigError as exc:
                # Postfix's smtpd stops here (fatal); we keep serving mail without AUTH.
                self.log.warning(f"SASL: {exc}; AUTH disabled")
        except ImportError:   # pragma: no cover
            pass
        try:
            self.queue_minfree = config.get_size("queue_minfree") if config.get("queue_minfree") \
                else 0
        except Exception:   # noqa: BLE001
            self.queue_minfree = 0
        try:
            self.message_size_limit = config.get_size("message_size_limit")
        except Exception:   # noqa: BLE001
            self.message_size_limit = 10240000

    def _engine_overrides(self, config) -> dict:
        try:
            limit = max(1, _int(config, "smtpd_sasl_response_limit", 12288))
        except Exception:   # noqa: BLE001
            limit = 12288
        return dict(
            starttls_offered=(self.tls_level != "none" and not self.wrapper_mode
                              and (self.tls_context is not None or self.tls_level == "encrypt")),
            tls_required=self.tls_level == "encrypt" and not self.wrapper_mode,
            auth_response_limit=limit,
            auth_legacy=_bool(config, "broken_sasl_auth_clients"),
            ipv6_enabled=any(w in ("ipv6", "all") for w in
                             (config.get("inet_protocols") or "all").lower()
                             .replace(",", " ").split()),
            # The engine does no I/O: table lookups reach it as plain callables.
            **table_lookups(config),
        )

    def xclient_authorized(self, name: str, addr: str) -> bool:
        """smtpd_authorized_xclient_hosts (empty by default: nobody); asked again after
        each XCLIENT, for the client it named."""
        if self._xclient_hosts is False:
            value = self.config.get("smtpd_authorized_xclient_hosts")
            self._xclient_hosts = (self._host_list("smtpd_authorized_xclient_hosts", "")
                                   if value else None)
        try:
            return bool(self._xclient_hosts and self._xclient_hosts.match(name, addr))
        except Exception:   # noqa: BLE001 - a broken list authorizes nobody
            return False

    def xforward_authorized(self, name: str, addr: str) -> bool:
        """smtpd_authorized_xforward_hosts (empty by default: nobody)."""
        if self._xforward_hosts is False:
            value = self.config.get("smtpd_authorized_xforward_hosts")
            self._xforward_hosts = (self._host_list("smtpd_authorized_xforward_hosts", "")
                                    if value else None)
        try:
            return bool(self._xforward_hosts and self._xforward_hosts.match(name, addr))
        except Exception:   # noqa: BLE001 - a broken list authorizes nobody
            return False

    def sasl_exception(self, name: str, addr: str) -> bool:
        if self._sasl_exceptions is False:
            value = self.config.get("smtpd_sasl_exceptions_networks")
            self._sasl_exceptions = (self._host_list("smtpd_sasl_exceptions_networks", "")
                                     if value else None)
        try:
            return bool(self._sasl_exceptions and self._sasl_exceptions.match(name, addr))
        except Exception:   # noqa: BLE001 - a broken list: announce AUTH as usual
            return False

    def offered_mechanisms(self, tls_active: bool) -> tuple:
        """The EHLO AUTH list for a session (none before TLS with smtpd_tls_auth_only)."""
        if self.sasl is None or (self.tls_auth_only and not tls_active):
            return ()
        try:
            return tuple(self.sasl.mechanisms(tls_active))
        except Exception as exc:   # noqa: BLE001 - e.g. Dovecot went away
            self.log.warning(f"SASL: cannot list mechanisms: {exc}")
            return ()

    def queue_space_ok(self, size: int) -> bool:
        """Postfix's smtpd_check_queue(): free space >= max(queue_minfree, 1.5 *
        message_size_limit); ``size`` (the client's SIZE) does not count."""
        # Postfix's smtpd_check_queue(): queue_minfree and 1.5 x message_size_limit; the
        # SIZE a client announces is not weighed against free space (checked against 3.7).
        need = max(self.queue_minfree, int(1.5 * self.message_size_limit))
        now = self.monotonic()
        free = self._space_free
        if free is None or now - self._space_when >= 1.0 or free < 2 * need:
            # One statvfs(2) per second at most while space is plentiful (a MAIL per
            # message otherwise); near the limit every MAIL looks again.
            store = getattr(self.cleanup, "store", None)
            directory = getattr(store, "queue_directory", None) or \
                self.config.get("queue_directory")
            try:
                sv = os.statvfs(directory)
            except (OSError, TypeError):
                return True
            free = sv.f_bavail * sv.f_frsize
            self._space_free, self._space_when = free, now
        if free < need:
            self.log.warning(f"not enough free space in mail queue: {free} bytes < "
                             f"1.5*message size limit")
            return False
        return True

    _space_free: int | None = None     # queue_space_ok()'s last statvfs answer
    _space_when = 0.0
    monotonic = staticmethod(time.monotonic)   # queue_space_ok()'s clock (tests replace it)

    def _host_list(self, param: str, default: str):
        try:
            from postwell.policy.matchlist import HostList
            value = self.config.get(param) if self.config.raw(param) is not None \
                else self.config.expand(default)
            return HostList(param, value, self.config)
        except Exception:
            return None

    # per-session helpers
    _ehlo_discard: tuple | None = None

    @property
    def has_ehlo_discard_maps(self) -> bool:
        if self._ehlo_discard is None:
            from postwell.policy.restrictions import parse_restrictions
            specs = parse_restrictions(
                self.config.get("smtpd_discard_ehlo_keyword_address_maps") or "")
            self._ehlo_discard = (specs, {})
        return bool(self._ehlo_discard[0])

    def ehlo_discard_config(self, addr: str):
        """smtpd_discard_ehlo_keyword_address_maps: the engine configuration for a client
        (looked up by address, at connect and after XCLIENT, as Postfix does): a listed
        client's keywords replace smtpd_discard_ehlo_keywords for the whole session."""
        import dataclasses
        from postwell.tables import get_table
        if not self.has_ehlo_discard_maps:
            return self.server_config
        specs, made = self._ehlo_discard
        words = None
        for spec in specs:
            try:
                words = get_table(spec, self.config).lookup(addr)
            except Exception as exc:    # a failing table: the main.cf list applies
                self.log.warning(f"smtpd_discard_ehlo_keyword_address_maps lookup error "
                                 f"for {addr}: {exc}")
                return self.server_config
            if words is not None:
                break
        if words is None:
            return self.server_config
        keys = frozenset(w.upper() for w in re.split(r"[\s,]+", words) if w)
        cfg = made.get(keys)
        if cfg is None:
            if len(made) >= 64:
                made.clear()
            cfg = made[keys] = dataclasses.replace(self.server_config, discard_ehlo_keywords=keys)
        return cfg

    _port_logging: bool | None = None
    _delay_open: bool | None = None

    @property
    def delay_open(self) -> bool:
        if self._delay_open is None:
            value = self.config.get("smtpd_delay_open_until_valid_rcpt") or "yes"
            self._delay_open = value.strip().lower() != "no"
        return self._delay_open

    @property
    def client_port_logging(self) -> bool:
        if self._port_logging is None:
            self._port_logging = self.config.get_bool("smtpd_client_port_logging")
        return self._port_logging

    def new_state(self, name, addr, port, server_addr, server_port):
        SessionState = _session_state_class()
        state = SessionState(client_name=name, client_addr=addr, client_port=port,
                             peer_addr=addr, reverse_client_name=name,
                             server_addr=server_addr, server_port=server_port)
        state.check.hold_ignored = True     # _log_reject writes them after the reject
        return state

    def bare_newline_exempt(self, name: str, addr: str) -> bool:
        # Asked once per connection; the answer for a client only changes with the
        # configuration (a reload starts new processes), so remember the recent ones.
        if self._bare_cache is None:
            return self._bare_exempt_now(name, addr)
        key = (name, addr)
        cache = self._bare_cache
        hit = cache.get(key)
        if hit is not None:
            return hit
        try:
            exempt = bool(self._bare_exclusions and self._bare_exclusions.match(name, addr))
        except Exception:
            return False      # a lookup failure is not remembered
        if len(cache) >= 4096:
            cache.clear()
        cache[key] = exempt
        return exempt

    def _bare_exempt_now(self, name: str, addr: str) -> bool:
        try:
            return bool(self._bare_exclusions and self._bare_exclusions.match(name, addr))
        except Exception:
            return False

    def rewrite_local(self, addr: str, name: str = "", sasl: bool = False) -> bool:
        """Postfix's local_header_rewrite_clients, asked at every first RCPT: the first
        entry that matches makes the client local.  Address-only answers (the default
        permit_inet_interfaces, permit_mynetworks with address patterns, static:all)
        are remembered per client address."""
        rules = self._rewrite_rules
        if rules == ["permit_inet_interfaces"]:
            cache = self._rewrite_cache
            hit = cache.get(addr)
            if hit is None:
                hit = self._inet_interface(addr)
                if len(cache) >= 4096:
                    cache.clear()
                cache[addr] = hit
            return hit
        for rule in rules:
            if rule == "permit_inet_interfaces":
                if self._inet_interface(addr):
                    return True
            elif rule == "permit_mynetworks":
                try:
                    if self._rewrite_mynetworks and self._rewrite_mynetworks.match(name, addr):
                        return True
                except Exception:   # noqa: BLE001 - a table failure: not local
                    pass
            elif rule == "permit_sasl_authenticated":
                if sasl:
                    return True
            elif rule == "static:all":
                return True
        return False

    def _inet_interface(self, addr: str) -> bool:
        # permit_inet_interfaces (Postfix's default): loopback or an address of this host.
        try:
            if ipaddress.ip_address(addr).is_loopback:
                return True
        except ValueError:
            return False
        try:
            if self._own is None:
                from postwell.policy.matchlist import OwnAddresses
                self._own = OwnAddresses(self.config)
            return bool(self._own.is_own(addr))
        except Exception:
            return False

    def count_for(self, addr: str) -> int:
        return self._per_ip.get(addr, 0)

    def too_many_connections(self, session: SmtpdSession) -> bool:
        addr = session.addr
        self._per_ip[addr] = self._per_ip.get(addr, 0) + 1
        session._counted = True
        if not self.connection_limit or self._per_ip[addr] <= self.connection_limit:
            return False
        try:
            name = session.state.client_name
            if self._limit_exceptions and self._limit_exceptions.match(name, addr):
                return False
        except Exception:
            pass
        return True

    async def connection_limit_reply(self, session: SmtpdSession) -> Reply | None:
        """anvil's machine-wide count and rate; the per-process count when anvil
        cannot answer (an anvil failure never refuses a client by itself)."""
        local = self.too_many_connections(session)
        if self.limits is not None:
            UNAVAILABLE = _anvil_unavailable()
            try:
                got = await self.limits.connect(session)
            except Exception as exc:   # noqa: BLE001
                self.log.warning(f"anvil: {exc!r}")
                got = UNAVAILABLE
            if got is not UNAVAILABLE:
                if got is not None:
                    if getattr(got, "limit", None) == "smtpd_client_connection_count_limit":
                        _note_concurrency_refusal(session)
                    # Released (and counted by anvil) before the 421 leaves, so the
                    # client's next attempt sees the count without this refused session.
                    await self.limits.disconnect_settled(session)
                return got
        if not local:
            return None
        _note_concurrency_refusal(session)
        self.log.warning(f"Connection concurrency limit exceeded: {self.count_for(session.addr)} "
                         f"from {session.namaddr} for service {self.service_name}")
        return Reply(421, f"{self.hostname} Error: too many connections from {session.addr}",
                     "4.7.0")

    async def event_limit_reply(self, session: SmtpdSession, what: str, *args) -> Reply | None:
        """smtpd_client_{message,recipient,auth,new_tls_session}_rate_limit (anvil)."""
        limits = self.limits
        if limits is None:
            return None
        if getattr(limits, _RATE_LIMIT_ATTR.get(what, ""), None) == 0:
            # That rate limit is off (the default): anvil is not asked, so neither are
            # the two coroutines that would find that out at every MAIL and RCPT.
            return None
        try:
            return await getattr(self.limits, what)(session, *args)
        except Exception as exc:   # noqa: BLE001 - never refuse a client for our failure
            self.log.warning(f"anvil: {exc!r}")
            return None

    def _output_waiting(self, session: SmtpdSession) -> None:
        if not self._out_scheduled:
            # The safety net: held replies leave at the latest at the end of the pass
            # (a woken session may wait for something else instead of answering).
            self._out_scheduled = True
            session._loop.call_soon(self._write_out_soon)
        self._out_sessions.append(session)

    def _write_out_soon(self) -> None:
        self._out_scheduled = False
        self._write_out()

    def _write_out(self) -> None:
        """Write the held replies back to back, in the order they were made."""
        waiting, self._out_sessions = self._out_sessions, []
        for session in waiting:
            data = session._out
            if data is not None:
                session._out = None
                transport = session.transport
                if not transport.is_closing():
                    transport.write(data)

    def _session_done(self, session: SmtpdSession) -> None:
        self.sessions.discard(session)
        if self.limits is not None:
            self.limits.disconnect(session)
        if getattr(session, "_counted", False):
            n = self._per_ip.get(session.addr, 1) - 1
            if n <= 0:
                self._per_ip.pop(session.addr, None)
            else:
                self._per_ip[session.addr] = n

    def _factory(self) -> SmtpdSession:
        s = SmtpdSession(self)
        self.sessions.add(s)
        return s

    async def start(self, sockets) -> None:
        loop = asyncio.get_running_loop()
        if self.sasl is not None and hasattr(self.sasl, "prepare"):
            try:
                await self.sasl.prepare()     # Dovecot: connect and read the MECH list
            except Exception as exc:   # noqa: BLE001 - retried at the next AUTH
                self.log.warning(f"SASL: {exc}")
        for sock in sockets:
            sock.setblocking(False)
            # create_server() listens again; keep the master's large backlog.
            srv = await loop.create_server(self._factory, sock=sock, backlog=4096)
            self._servers.append(srv)

    async def drain(self, timeout: float = DRAIN_SECONDS) -> None:
        """Stop accepting; give live sessions `timeout` seconds, then cut them."""
        self.draining = True
        for srv in self._servers:
            srv.close()
        sessions = [s.finished.wait() for s in list(self.sessions)]
        if sessions:
            try:
                await asyncio.wait_for(asyncio.gather(*sessions), timeout)
            except asyncio.TimeoutError:
                for s in list(self.sessions):
                    if s.transport is not None:
                        s.transport.abort()
                await asyncio.sleep(0)
        if self.limits is not None:
            self.limits.close()     # anvil releases whatever this worker still held
        if self.sasl is not None:
            # Dovecot's reader task must end inside this loop, not at interpreter exit.
            try:
                await self.sasl.close()
                await asyncio.sleep(0)
                await asyncio.sleep(0)
            except Exception as exc:   # noqa: BLE001
                self.log.warning(f"SASL: close: {exc}")


# --------------------------------------------------------------------------- entry point

def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
        return uvloop.new_event_loop()
    except ImportError:
        return asyncio.new_event_loop()


def _service_config(config, service):
    if service is not None and getattr(service, "overrides", None):
        return config.override(dict(service.overrides)) if isinstance(service.overrides, dict) \
            else config.override(dict(o.split("=", 1) for o in service.overrides if "=" in o))
    return config


def preload(config, service) -> dict:
    """What the smtpd must read while still root (Postfix's pre-jail init): the TLS
    certificate and key, often readable by root only. The master calls it before
    forking the workers (so they share the session-ticket keys) and passes the
    result to serve(..., preloaded=)."""
    from postwell.tls import TlsConfigError, server_context
    out: dict = {}
    try:
        out["tls_context"] = server_context(_service_config(config, service))
    except TlsConfigError as exc:
        out["tls_context"] = exc
    except Exception:   # noqa: BLE001 - e.g. a bad level: SmtpdServer reports it then
        pass
    return out


_TLS_FILE_PARAMS = ("cert_file", "key_file", "chain_files", "dcert_file", "dkey_file",
                    "eccert_file", "eckey_file", "CAfile", "CApath", "dh1024_param_file",
                    "dh512_param_file")


def preload_key(config, service) -> tuple:
    """Identifies what preload() would build: every TLS parameter of the service and
    the identity (inode, size, mtime) of every file they name, so a reload that
    changes neither keeps the same context (and its session-ticket keys)."""
    from postwell.config.postfix_defaults import POSTFIX_DEFAULTS as _pf
    cfg = _service_config(config, service)
    names = sorted(n for n in _pf if n.startswith(("smtpd_tls_", "tls_"))
                   or n in ("smtpd_use_tls", "smtpd_enforce_tls"))
    values = []
    for n in names:
        try:
            values.append((n, cfg.get(n)))
        except Exception:  # noqa: BLE001 - a broken value: preload() reports it
            values.append((n, None))
    files = []
    for suffix in _TLS_FILE_PARAMS:
        try:
            raw = cfg.get("smtpd_tls_" + suffix)
        except Exception:  # noqa: BLE001
            continue
        for path in raw.replace(",", " ").split():
            try:
                st = os.stat(path)
                files.append((path, st.st_ino, st.st_size, st.st_mtime_ns))
            except OSError:
                files.append((path, None))
    return tuple(values), tuple(files)


def serve(config, service, sockets, *, drain_seconds: float = DRAIN_SECONDS,
          preloaded: dict | None = None) -> None:
    """Run one smtpd worker until SIGTERM, then drain and return."""
    # Everything inherited from the master stays out of the cyclic GC from now on:
    # its passes would otherwise write to (and so unshare) the forked pages.
    gc.freeze()
    config = _service_config(config, service)
    name = getattr(service, "name", None) or "smtp"
    loop = _new_loop()
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(_main(config, name, sockets, drain_seconds, preloaded))
    finally:
        loop.close()


async def _main(config, service_name: str, sockets, drain_seconds: float,
                preloaded: dict | None = None) -> None:
    from postwell.log import MailLog
    try:
        server = SmtpdServer(config, service_name=service_name, preloaded=preloaded)
    except Exception as exc:
        # E.g. a relay-unsafe restriction list: refuse to run, as Postfix's smtpd does.
        MailLog.from_config(config, "smtpd").fatal(str(exc))
        raise SystemExit(1) from None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    if hasattr(server.log, "reopen"):
        # SIGHUP: re-open maillog_file (log rotation); reloads are the master's job.
        loop.add_signal_handler(signal.SIGHUP, server.log.reopen)
    await server.start(sockets)
    await stop.wait()
    await server.drain(drain_seconds)
