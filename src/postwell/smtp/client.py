"""Sans-IO SMTP client engine (RFC 5321, with RFC 2920 PIPELINING, RFC 3030 CHUNKING,
RFC 6152 8BITMIME, RFC 6531 SMTPUTF8, RFC 3461 DSN, RFC 1870 SIZE).

The engine owns no socket and no clock.  The I/O layer (postwell.delivery.smtp)
moves bytes both ways and applies the per-stage timeouts::

    c = SmtpClient("mx.example.org")
    c.receive_data(server_bytes)          # b"" means the server closed
    ev = c.next_event()                   # an event, or NEED_DATA
    out = c.data_to_send()                # bytes to write now

Driving a transaction::

    Greeting -> (EHLO/HELO sent by the engine) -> HelloDone
    c.start_transaction(envelope)         # MAIL, RCPT..., DATA (one write with PIPELINING)
    MailReply, RcptReply * n, then ContentWanted (354 or BDAT) or TransactionFailed
    c.send_content(chunk) ... c.end_content()   # stored LF-terminated content
    MessageDone(reply)                    # final reply to "." / BDAT LAST
    c.start_transaction(...) again (connection reuse), or c.quit()

Before the first transaction, after HelloDone: ``c.starttls()`` -> TlsWanted (the
driver runs the TLS handshake, then ``c.tls_established()`` says EHLO again) or
TlsRefused; ``c.auth(mech, initial)`` -> AuthChallenge* (``c.auth_response()``)
-> AuthDone.  Lines that are not replies are skipped with an IgnoredLine event,
as Postfix skips them; a flood of them is a ProtocolError.

Every reply event carries ``command``: the Postfix "in reply to X command" label.

Content conversion (``send_content``): stored content is LF-terminated lines.
LF becomes CRLF; every CR is dropped (a stored CRLF thus stays one line end, and
a bare CR is never sent: RFC 5321 2.3.8 forbids it outside CRLF); lines that
start with "." are dot-stuffed (RFC 5321 4.5.2; not with BDAT, RFC 3030 2);
lines longer than ``line_length_limit`` are broken with CRLF SPACE, as Postfix's
smtp_line_length_limit does.
"""

from __future__ import annotations

import base64
import binascii
import enum
import functools
import re
from dataclasses import dataclass

from postwell.smtp.reply import Reply

# Reply lines longer than this are truncated (the rest of the line is dropped);
# replies with more lines than MAX_REPLY_LINES keep only the first ones.  Bounded
# memory whatever the server sends (DESIGN.md property 4).
MAX_REPLY_LINE = 2048
MAX_REPLY_LINES = 100
# Consecutive non-reply lines skipped before the server is declared broken.
MAX_GARBAGE_LINES = 100
# Unread server bytes we keep before declaring the server broken.
MAX_PENDING_INPUT = 1 << 20


class _Need(enum.Enum):
    NEED_DATA = "NEED_DATA"


NEED_DATA = _Need.NEED_DATA


class SmtpClientError(Exception):
    """The caller used the engine out of order (a bug in the driver)."""


# ---------------------------------------------------------------- envelope

@dataclass(frozen=True)
class Recipient:
    address: str
    notify: str | None = None     # "SUCCESS,FAILURE", "NEVER", ... (RFC 3461 4.1)
    orcpt: str | None = None      # "rfc822;user@example.com" or a bare address


@dataclass(frozen=True)
class Envelope:
    sender: str                   # "" is the null sender
    recipients: tuple[Recipient, ...]
    size: int | None = None       # content size estimate for SIZE= (RFC 1870)
    body_type: str | None = None  # "8BITMIME", "7BIT" or None (unknown)
    smtputf8: bool = False        # the client asked for SMTPUTF8 on submission
    ret: str | None = None        # "FULL" / "HDRS" (RFC 3461 4.3)
    envid: str | None = None      # RFC 3461 4.4, stored decoded


# ---------------------------------------------------------------- extensions

@dataclass(frozen=True)
class Extensions:
    """What the server's EHLO reply announced (RFC 5321 4.1.1.1)."""
    esmtp: bool = False
    keywords: frozenset[str] = frozenset()
    size: int | None = None       # SIZE value; 0 = no fixed limit; None = not announced
    auth: tuple[str, ...] = ()

    def has(self, keyword: str) -> bool:
        return keyword.upper() in self.keywords

    # Asked several times per message: keywords are stored upper-case.
    @property
    def pipelining(self) -> bool:
        return "PIPELINING" in self.keywords

    @property
    def eightbitmime(self) -> bool:
        return "8BITMIME" in self.keywords

    @property
    def smtputf8(self) -> bool:
        return "SMTPUTF8" in self.keywords

    @property
    def dsn(self) -> bool:
        return "DSN" in self.keywords

    @property
    def chunking(self) -> bool:
        return "CHUNKING" in self.keywords

    @property
    def starttls(self) -> bool:
        return "STARTTLS" in self.keywords

    @property
    def enhancedstatuscodes(self) -> bool:
        return "ENHANCEDSTATUSCODES" in self.keywords


def parse_ehlo(reply: Reply, discard: frozenset[str] = frozenset()) -> Extensions:
    """Keywords from an EHLO reply; ``discard`` mimics smtp_discard_ehlo_keywords."""
    keywords: set[str] = set()
    size: int | None = None
    auth: list[str] = []
    for line in reply.text.split("\n")[1:]:
        parts = line.split()
        if not parts:
            continue
        word = parts[0].upper()
        # Old servers announce "AUTH=LOGIN PLAIN" (pre-RFC 4954 syntax).
        if word.startswith("AUTH="):
            auth.extend(p.upper() for p in [word[5:], *parts[1:]] if p)
            word = "AUTH"
        elif word == "AUTH":
            auth.extend(p.upper() for p in parts[1:])
        if word in discard:
            continue
        keywords.add(word)
        if word == "SIZE":
            if len(parts) > 1 and parts[1].isdigit():
                size = int(parts[1])
            else:
                size = 0
    return Extensions(True, frozenset(keywords), size, tuple(dict.fromkeys(auth)))


# ---------------------------------------------------------------- events

@dataclass(frozen=True)
class Event:
    pass


@dataclass(frozen=True)
class Greeting(Event):
    reply: Reply
    command: str = "initial greeting"


@dataclass(frozen=True)
class HelloDone(Event):
    """EHLO (or HELO) accepted; the connection is ready for MAIL."""
    reply: Reply
    extensions: Extensions
    command: str = "EHLO"


@dataclass(frozen=True)
class Rejected(Event):
    """Greeting, EHLO/HELO refused: the session cannot be used.

    ``stage`` is "greeting" or "helo"; Postfix words this "host X refused to talk to me".
    """
    reply: Reply
    stage: str
    command: str


@dataclass(frozen=True)
class TlsWanted(Event):
    """The server said 220 to STARTTLS: start the TLS handshake now, then call
    ``tls_established()`` (RFC 3207 4.2)."""
    reply: Reply
    command: str = "STARTTLS"


@dataclass(frozen=True)
class TlsRefused(Event):
    """The server refused STARTTLS; the connection is still usable in plain text."""
    reply: Reply
    command: str = "STARTTLS"


@dataclass(frozen=True)
class AuthChallenge(Event):
    """334 during AUTH (RFC 4954 4): answer with ``auth_response()``."""
    reply: Reply
    challenge: bytes          # base64-decoded server challenge
    command: str = "AUTH"


@dataclass(frozen=True)
class AuthDone(Event):
    """AUTH finished: ``ok`` for 235, else ``reply`` is the refusal."""
    reply: Reply
    ok: bool
    command: str = "AUTH"


@dataclass(frozen=True)
class MailReply(Event):
    reply: Reply
    command: str = "MAIL FROM"


@dataclass(frozen=True)
class RcptReply(Event):
    index: int
    recipient: Recipient
    reply: Reply
    command: str = "RCPT TO"


@dataclass(frozen=True)
class ContentWanted(Event):
    """Feed the content now (after 354, or at once with BDAT)."""
    reply: Reply | None      # the 354 reply; None with BDAT


@dataclass(frozen=True)
class TransactionFailed(Event):
    """MAIL, DATA or every RCPT was refused: no content is sent.

    ``reply``/``command`` are what the still-pending recipients should be told.
    The engine has queued RSET itself (the connection stays usable after RsetDone).
    """
    reply: Reply
    command: str
    # True when the server said 421 (RFC 5321 3.8: it is closing the channel):
    # no RSET was queued, the connection is finished, every recipient without a
    # final answer takes this reply.
    closing: bool = False


@dataclass(frozen=True)
class RecipientDone(Event):
    """LMTP only (RFC 2033 4.2): the final reply for one accepted recipient."""
    index: int
    recipient: Recipient
    reply: Reply
    command: str = "end of DATA"


@dataclass(frozen=True)
class MessageDone(Event):
    reply: Reply
    command: str = "end of DATA"


@dataclass(frozen=True)
class RsetDone(Event):
    reply: Reply
    command: str = "RSET"


@dataclass(frozen=True)
class QuitDone(Event):
    reply: Reply | None


@dataclass(frozen=True)
class ConnectionClosed(Event):
    """The server closed the connection; ``stage`` says while doing what."""
    stage: str


@dataclass(frozen=True)
class IgnoredLine(Event):
    """A line that is not an SMTP reply was skipped (Postfix: "non-ESMTP response")."""
    text: str
    pipelining: bool


@dataclass(frozen=True)
class ProtocolError(Event):
    """The server sent something that is not an SMTP reply."""
    stage: str
    detail: str


# ---------------------------------------------------------------- states

class State(enum.Enum):
    GREETING = "receiving the initial server greeting"
    HELLO = "performing the EHLO handshake"
    HELO = "performing the HELO handshake"
    AUTH = "performing the SASL authentication"
    STARTTLS = "performing the STARTTLS handshake"
    TLS = "performing the TLS handshake"
    READY = "idle"
    MAIL = "sending MAIL FROM"
    RCPT = "sending RCPT TO"
    DATA = "sending DATA command"
    CONTENT = "sending message body"
    DONE = "sending end of data -- message may be sent more than once"
    RSET = "sending final RSET"
    QUIT = "sending QUIT"
    CLOSED = "closed"
    ERROR = "error"

    # Members are singletons compared by identity: hash them the same way
    # (Enum's own __hash__ is a Python-level call, and states key the smtp
    # client's per-stage timeout table, looked up for every reply wait).
    __hash__ = object.__hash__


# States in which received bytes wait unparsed (a tuple: Enum hashing is a
# Python-level call, identity comparison is not).
_NO_PARSE = (State.ERROR, State.TLS)

# What Postfix calls the command in "(in reply to X command)".
_EXPECT_LABEL = {
    "greeting": "initial greeting", "ehlo": "EHLO", "helo": "HELO", "mail": "MAIL FROM",
    "rcpt": "RCPT TO", "data": "DATA", "dot": "end of DATA", "bdat": "end of DATA",
    "bdat_mid": "end of DATA", "lmtp_dot": "end of DATA", "lmtp_bdat": "end of DATA",
    "rset": "RSET", "quit": "QUIT", "dot_abort": "end of DATA",
    "starttls": "STARTTLS", "auth": "AUTH",
}

# The engine's handler of each expected reply ("mail" -> _on_mail), named
# once rather than concatenated per reply.
_HANDLERS = {what: "_on_" + what for what in _EXPECT_LABEL}

_REPLY_LINE = re.compile(rb"^([2-5][0-9][0-9])([ -]|$)")
_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?: |$)")
# One-line replies as sent -> their parsed form (replies are immutable).  A
# server says the same few lines again and again ("250 2.1.0 Ok", "354 End
# data..."): parsing each costs several regex matches and decodes, four
# times per message (issue 8).  Bounded: cleared when full.
_REPLY_CACHE: dict[bytes, "ServerReply"] = {}
_REPLY_CACHE_SIZE = 256

_ATOM_OK = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\x80-\U0010ffff]+(\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\x80-\U0010ffff]+)*$")


def quote_address(address: str) -> str:
    """RFC 5321 4.1.2: quote a local part that is not a dot-atom (smtp_quote_rfc821_envelope)."""
    if not address:
        return address
    local, at, domain = address.rpartition("@")
    if not at:
        local, domain = address, ""
    if _ATOM_OK.match(local) or (local.startswith('"') and local.endswith('"') and len(local) > 1):
        return address
    quoted = '"' + local.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return quoted + ("@" + domain if at else "")


# A line that starts with "." in LF-terminated content (dot-stuffing needed).
# Most mail has none: this search is cheaper than a replace that finds nothing.
_LINE_DOT = re.compile(rb"\n\.")

# The same senders and recipients come back message after message (issue 8):
# remember their quoted form rather than match each again (bounded).
_quoted = functools.lru_cache(maxsize=1024)(quote_address)

_XTEXT_PLAIN = re.compile(r"[!-*,-<>-~]*")     # xchar without "+" and "=": kept as is


def xtext(value: str) -> str:
    """RFC 3461 4: xtext encoding for ENVID and ORCPT."""
    if _XTEXT_PLAIN.fullmatch(value):
        return value         # the common case: an address needs no encoding
    out = []
    for ch in value.encode("utf-8", "surrogateescape"):
        if 33 <= ch <= 126 and ch not in (ord("+"), ord("=")):
            out.append(chr(ch))
        else:
            out.append(f"+{ch:02X}")
    return "".join(out)


def uxtext(value: str) -> str:
    """RFC 6533 3 utf-8-addr-xtext: a character other than QCHAR (printable ASCII
    less "+", "=" and "\\") as \\x{HEX} of its code point, upper case, as Postfix
    writes a utf-8 ORCPT."""
    if _XTEXT_PLAIN.fullmatch(value) and "\\" not in value:
        return value
    out = []
    for ch in value:
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:      # an undecodable byte: no code point to give
            code -= 0xDC00
        if 33 <= code <= 126 and ch not in "+=\\":
            out.append(ch)
        else:
            out.append(f"\\x{{{code:02X}}}")
    return "".join(out)


def _orcpt_param(orcpt: str) -> str:
    addr_type, sep, addr = orcpt.partition(";")
    if not sep or not addr_type or "@" in addr_type:
        addr_type, addr = "rfc822", orcpt
    if addr_type.lower() == "utf-8":
        return f"{addr_type};{uxtext(addr)}"       # RFC 6533 3
    return f"{addr_type};{xtext(addr)}"


@functools.lru_cache(maxsize=1024)
def _rcpt_command(address: str, notify: str | None, orcpt: str | None, dsn: bool,
                  quote: bool) -> str:
    """The RCPT TO command line.  Remembered (bounded): the same recipients
    come back message after message, and the ORCPT encoding is the costly part
    (issue 8)."""
    line = f"RCPT TO:<{_quoted(address) if quote else address}>"
    if dsn:
        # RFC 3461 4.2: without a stored ORCPT, Postfix sends the original
        # recipient (quoted as in the envelope); ORCPT comes before NOTIFY.
        line += f" ORCPT={_orcpt_param(orcpt or 'rfc822;' + quote_address(address))}"
        if notify:
            line += f" NOTIFY={notify.upper()}"    # RFC 3461 4.1
    return line


def _is_ascii(s: str) -> bool:
    return s.isascii()


def needs_smtputf8(envelope: Envelope) -> bool:
    """True when SMTPUTF8 was requested and an envelope address is not ASCII: such
    mail cannot go to a server without SMTPUTF8 (RFC 6531 3.2; Postfix bounces 5.6.7)."""
    if not envelope.smtputf8:
        return False
    return not (_is_ascii(envelope.sender) and all(_is_ascii(r.address) for r in envelope.recipients))


@dataclass(frozen=True)
class ServerReply(Reply):
    """A Reply that also keeps the lines as the server sent them (``raw``).

    Postfix quotes a server's reply in log lines and bounces with every line's
    code, joined by spaces: "550-5.1.1 first 550 5.1.1 second".
    """
    raw: str = ""

    def __str__(self) -> str:
        return self.raw.replace("\n", " ") if self.raw else super().__str__()


def parse_reply_lines(lines: list[bytes]) -> ServerReply:
    """Build a reply from raw reply lines (without CRLF); code from the last line
    (as Postfix does; RFC 5321 4.2.1 wants them all equal)."""
    code = int(lines[-1][:3])
    texts = [ln[4:].decode("utf-8", "replace") for ln in lines]
    enhanced = None
    m = _ENHANCED.match(texts[0]) if texts else None
    # RFC 2034 3: the enhanced code leads every line and its class matches the reply's.
    if m and m.group(1) == str(code)[0]:
        enhanced = f"{m.group(1)}.{m.group(2)}.{m.group(3)}"
        stripped = []
        for t in texts:
            mm = _ENHANCED.match(t)
            stripped.append(t[mm.end():] if mm and mm.group(0).strip() == enhanced else t)
        texts = stripped
    raw = "\n".join(ln.decode("utf-8", "replace") for ln in lines)
    return ServerReply(code, "\n".join(texts), enhanced, raw)


def has_long_line(data: bytes, start: int, limit: int) -> bool:
    """Is there a line (a run of bytes without LF, the last one maybe not
    LF-terminated) of ``limit`` bytes or more in ``data[start:]``?

    Jumps to the last LF of each ``limit``-byte window, so a chunk of short
    lines costs a few rfind calls rather than a split into one object per
    line (issue 8: asked for every chunk of every message)."""
    end = len(data)
    while end - start >= limit:
        nl = data.rfind(b"\n", start, start + limit)
        if nl < 0:
            return True          # ``limit`` bytes without a line end
        start = nl + 1
    return False


class SmtpClient:
    """One SMTP client connection, from greeting to QUIT."""

    def __init__(self, helo_name: str, *, never_send_ehlo: bool = False,
                 use_chunking: bool = False, line_length_limit: int = 998,
                 quote_envelope: bool = True, skip_quit_response: bool = True,
                 discard_ehlo_keywords: frozenset[str] = frozenset(),
                 chunk_size: int = 65536, lmtp: bool = False) -> None:
        self.helo_name = helo_name
        self.lmtp = lmtp                   # RFC 2033: LHLO, one final reply per recipient
        self.hello_verb = "LHLO" if lmtp else "EHLO"
        self.never_send_ehlo = never_send_ehlo
        self.use_chunking = use_chunking
        self.line_length_limit = line_length_limit
        self.quote_envelope = quote_envelope
        self.skip_quit_response = skip_quit_response
        self.discard_ehlo_keywords = frozenset(k.upper() for k in discard_ehlo_keywords)
        self.chunk_size = chunk_size
        self.state = State.GREETING
        self.extensions = Extensions()
        self.transactions = 0              # completed MAIL transactions on this connection
        self._in = bytearray()
        self._out = bytearray()
        self._events: list[Event] = []
        self._lines: list[bytes] = []      # lines of the reply being read
        self._discarding = False           # inside an over-long reply line
        self._closed = False
        # Replies we wait for, in order (RFC 2920 3.1: replies come in command order).
        self._expect: list[tuple[str, int]] = []
        self._envelope: Envelope | None = None
        self._accepted = 0
        self._failure: tuple[Reply, str] | None = None
        self._bdat = False
        self._probe = False
        self._at_line_start = True
        self._column = 0
        self._bdat_buf = bytearray()
        self._unusable = False
        # A reply that came while we were still sending the message body.
        self._early_reply: Reply | None = None
        self._early_used = False
        self._partial_line: bytes | None = None
        self._garbage = 0
        self.tls = False
        self.authenticated = False

    # ------------------------------------------------------------ I/O side

    def receive_data(self, data: bytes) -> None:
        if not data:
            self._closed = True
        else:
            if len(self._in) + len(data) > MAX_PENDING_INPUT:
                self._protocol_error("server sent too much data")
                return
            self._in += data
        self._parse()

    def next_event(self):
        if self._events:
            return self._events.pop(0)
        return NEED_DATA

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    @property
    def pending_output(self) -> int:
        """Bytes queued for the server that data_to_send() has not taken yet."""
        return len(self._out)

    @property
    def stage(self) -> str:
        """What we were doing, in Postfix's words ("while sending RCPT TO")."""
        return self.state.value

    @property
    def usable(self) -> bool:
        """The connection is idle and may carry another transaction (connection cache)."""
        return (self.state is State.READY and not self._closed and not self._expect
                and not self._unusable)

    # ------------------------------------------------------------ commands

    def _send(self, line: str) -> None:
        self._out += line.encode("utf-8", "surrogateescape") + b"\r\n"

    def _addr(self, address: str) -> str:
        if not self.quote_envelope:
            return address
        return _quoted(address)

    def starttls(self) -> None:
        """STARTTLS (RFC 3207); only after HelloDone and when the server offers it."""
        if not self.usable or not self.extensions.starttls or self.tls:
            raise SmtpClientError(f"starttls in state {self.state.name}")
        self._send("STARTTLS")
        self._expect.append(("starttls", -1))
        self.state = State.STARTTLS

    def tls_established(self) -> None:
        """The TLS layer is up: forget what the server said and say EHLO again
        (RFC 3207 4.2)."""
        if self.state is not State.TLS:
            raise SmtpClientError(f"tls_established in state {self.state.name}")
        self.tls = True
        self.extensions = Extensions()
        self._send(f"{self.hello_verb} {self.helo_name}")
        self._expect.append(("ehlo", -1))
        self.state = State.HELLO

    def auth(self, mechanism: str, initial_response: bytes | None = None) -> None:
        """AUTH (RFC 4954 4); an empty initial response is sent as "="."""
        if not self.usable or self.authenticated:
            raise SmtpClientError(f"auth in state {self.state.name}")
        line = f"AUTH {mechanism.upper()}"
        if initial_response is not None:
            line += " " + (base64.b64encode(initial_response).decode() or "=")
        self._send(line)
        self._expect.append(("auth", -1))
        self.state = State.AUTH

    def auth_response(self, data: bytes | None) -> None:
        """Answer a 334 challenge; None cancels the exchange ("*", RFC 4954 4)."""
        if self.state is not State.AUTH or self._expect:
            raise SmtpClientError(f"auth_response in state {self.state.name}")
        self._send("*" if data is None else base64.b64encode(data).decode())
        self._expect.append(("auth", -1))

    def _on_auth(self, reply: Reply, _i: int) -> None:
        if reply.code == 334:
            try:
                challenge = base64.b64decode(reply.text.split("\n")[0].strip(), validate=True)
            except (ValueError, binascii.Error):
                challenge = b""
            self._events.append(AuthChallenge(reply, challenge))
            return
        self.state = State.READY
        ok = reply.code == 235
        self.authenticated = ok
        if reply.code == 421:
            self._unusable = True
        self._events.append(AuthDone(reply, ok))

    def _on_starttls(self, reply: Reply, _i: int) -> None:
        if reply.code == 220:
            # Bytes that arrived with the 220 were sent before TLS: never let them
            # pass as protected replies (CVE-2011-0411, the client side).
            self._in.clear()
            self._lines = []
            self.state = State.TLS
            self._events.append(TlsWanted(reply))
        else:
            self.state = State.READY
            if reply.code == 421:
                self._unusable = True
            self._events.append(TlsRefused(reply))

    def start_transaction(self, envelope: Envelope, probe: bool = False) -> None:
        """``probe``: an address verification probe (Postfix's
        smtp_address_verify_target = rcpt): MAIL and RCPT only, then RSET; the
        RCPT replies are the answer and the transaction ends as TransactionFailed
        "RCPT TO"."""
        if not self.usable:
            raise SmtpClientError(f"start_transaction in state {self.state.name}")
        if not envelope.recipients:
            raise SmtpClientError("no recipients")
        ext = self.extensions
        self._envelope = envelope
        self._accepted = 0
        self._accepted_idx: list[int] = []
        self._failure = None
        self._early_reply = None
        self._early_used = False
        self._bdat = self.use_chunking and ext.chunking
        self._probe = probe
        line = f"MAIL FROM:<{self._addr(envelope.sender)}>"
        if ext.size is not None and envelope.size is not None:
            line += f" SIZE={envelope.size}"            # RFC 1870 6
        if ext.eightbitmime and envelope.body_type in ("8BITMIME", "7BIT"):
            line += f" BODY={envelope.body_type}"        # RFC 6152 2
        if ext.smtputf8 and envelope.smtputf8:
            line += " SMTPUTF8"                          # RFC 6531 3.4 (as requested)
        if ext.dsn:                                      # Postfix's order: ENVID, RET
            if envelope.envid:
                line += f" ENVID={xtext(envelope.envid)}"  # RFC 3461 4.4
            if envelope.ret:
                line += f" RET={envelope.ret.upper()}"   # RFC 3461 4.3
        self._send(line)
        self._expect = [("mail", -1)]
        self.state = State.MAIL
        if ext.pipelining:
            # RFC 2920 3.1: MAIL, every RCPT and DATA go out in one write; DATA
            # is the last command of the group.  BDAT waits for the RCPT replies.
            for i in range(len(envelope.recipients)):
                self._queue_rcpt(i)
            if not self._bdat and not probe:
                self._send("DATA")
                self._expect.append(("data", -1))

    def _queue_rcpt(self, i: int) -> None:
        r = self._envelope.recipients[i]
        self._send(_rcpt_command(r.address, r.notify, r.orcpt, self.extensions.dsn,
                                 self.quote_envelope))
        self._expect.append(("rcpt", i))

    def send_content(self, chunk: bytes) -> None:
        """Queue stored content (LF-terminated lines, any chunking)."""
        if self.state is not State.CONTENT:
            raise SmtpClientError(f"send_content in state {self.state.name}")
        if not chunk:
            return
        data = self._convert(chunk)
        if self._bdat:
            self._bdat_buf += data
            while len(self._bdat_buf) >= self.chunk_size:
                piece = bytes(self._bdat_buf[:self.chunk_size])
                del self._bdat_buf[:self.chunk_size]
                self._out += b"BDAT %d\r\n" % len(piece) + piece   # RFC 3030 2
                self._expect.append(("bdat_mid", -1))
        else:
            self._out += data

    def end_content(self) -> None:
        if self.state is not State.CONTENT:
            raise SmtpClientError(f"end_content in state {self.state.name}")
        tail = b"" if self._at_line_start else b"\r\n"   # the last line always ends in CRLF
        self._at_line_start, self._column = True, 0
        if self._bdat:
            piece = bytes(self._bdat_buf) + tail
            self._bdat_buf.clear()
            self._out += b"BDAT %d LAST\r\n" % len(piece) + piece
            final = "bdat"
        else:
            self._out += tail + b".\r\n"                 # RFC 5321 4.1.1.4
            final = "dot"
        if self._early_reply is not None and not self.lmtp and final == "dot":
            # The server answered before our "." (smtp-sink -A, or a server that
            # gives up mid-message): as Postfix does, that reply is the answer to
            # the end of DATA.  Whatever it says later cannot be matched to a
            # command any more, so the connection is not reused.
            reply, self._early_reply = self._early_reply, None
            self._early_used = True
            self._unusable = True
            self.state = State.DONE
            self._on_dot(reply, -1)
            return
        if self.lmtp:
            # RFC 2033 4.2: one reply per accepted recipient, in RCPT order.
            self._expect += [("lmtp_" + final, i) for i in self._accepted_idx]
        else:
            self._expect.append((final, -1))
        self.state = State.DONE

    def take_early_reply(self) -> bool:
        """The body could not be sent in full, but the server had already answered.

        Postfix reads that reply and reports it as the answer to the end of DATA
        ("550 ... (in reply to end of DATA command)") rather than a lost
        connection.  Returns False when there is no such reply.
        """
        if self._early_used:
            return True          # end_content() already took it; MessageDone is queued
        if self._early_reply is None or self.state is not State.CONTENT:
            return False
        reply, self._early_reply = self._early_reply, None
        self._early_used = True
        self._unusable = True
        self._expect.clear()
        self.state = State.DONE
        self._on_dot(reply, -1)
        return True

    def reset(self) -> None:
        """RSET (RFC 5321 4.1.1.5): abandon the current transaction, keep the connection."""
        if self.state in (State.CLOSED, State.ERROR, State.QUIT):
            raise SmtpClientError("reset on a closed connection")
        self._send("RSET")
        self._expect.append(("rset", -1))
        self.state = State.RSET

    def quit(self) -> None:
        """QUIT (RFC 5321 4.1.1.10).  With skip_quit_response, QuitDone comes at once."""
        if self.state in (State.CLOSED, State.ERROR):
            self.state = State.CLOSED
            return
        self._send("QUIT")
        self.state = State.QUIT
        if self.skip_quit_response:
            self._expect.clear()
            self._events.append(QuitDone(None))
            self.state = State.CLOSED
        else:
            self._expect.append(("quit", -1))

    # ------------------------------------------------------------ content

    def _convert(self, chunk: bytes) -> bytes:
        if b"\r" in chunk:
            chunk = chunk.replace(b"\r", b"")
        stuff = not self._bdat
        limit = self.line_length_limit
        if limit:
            # Lines that may need breaking go the line-by-line way; one spare
            # column covers a dot that stuffing adds.
            first = chunk.find(b"\n")
            if self._column + (len(chunk) if first < 0 else first) + 1 > limit or (
                    first >= 0 and has_long_line(chunk, first + 1, limit)):
                return self._convert_lines(chunk)
        # Whole-chunk conversion: LF -> CRLF, then dot-stuffing (RFC 5321 4.5.2)
        # of every line start at once; a line cut by the chunk boundary
        # continues from the engine's state.
        out = chunk.replace(b"\n", b"\r\n")
        first_stuffed = False
        if stuff:
            if self._at_line_start and out[:1] == b".":
                out = b"." + out
                first_stuffed = True
            if _LINE_DOT.search(chunk) is not None:
                out = out.replace(b"\r\n.", b"\r\n..")
        last = chunk.rfind(b"\n")
        if last < 0:
            if chunk:
                self._column += len(chunk) + first_stuffed
                self._at_line_start = False
        elif last == len(chunk) - 1:
            self._at_line_start, self._column = True, 0
        else:
            self._column = len(chunk) - last - 1 + (stuff and chunk[last + 1:last + 2] == b".")
            self._at_line_start = False
        return out

    def _convert_lines(self, chunk: bytes) -> bytes:
        lines = chunk.split(b"\n")
        out = bytearray()
        stuff = not self._bdat
        limit = self.line_length_limit
        last = len(lines) - 1
        for n, line in enumerate(lines):
            if line:
                if self._at_line_start and stuff and line[:1] == b".":
                    out += b"."                                # RFC 5321 4.5.2
                    self._column += 1
                if limit and self._column + len(line) > limit:
                    # smtp_line_length_limit: break with CRLF SPACE.
                    pos = 0
                    while self._column + (len(line) - pos) > limit:
                        take = max(limit - self._column, 0)
                        out += line[pos:pos + take] + b"\r\n "
                        pos += take
                        self._column = 1
                    line = line[pos:]
                out += line
                self._column += len(line)
                self._at_line_start = False
            if n != last:
                out += b"\r\n"
                self._at_line_start, self._column = True, 0
        return bytes(out)

    # ------------------------------------------------------------ replies

    def _protocol_error(self, detail: str) -> None:
        if self.state is not State.ERROR:
            self._events.append(ProtocolError(self.state.value, detail))
            self.state = State.ERROR
        self._expect.clear()
        self._in.clear()

    def _parse(self) -> None:
        buf = self._in
        if buf and self.state not in _NO_PARSE:
            # Lines are cut from one immutable copy and the buffer is trimmed
            # once at the end (issue 8: a pipelined MAIL/RCPT/DATA answer is
            # three lines in one read; slicing and trimming the bytearray per
            # line cost more than the replies' handling).  A handler that ends
            # parsing (STARTTLS 220, a protocol error) empties the buffer
            # itself: what followed is dropped, never parsed later.
            data = bytes(buf)
            end = len(data)
            pos = 0
            cache = _REPLY_CACHE
            while self.state not in _NO_PARSE:
                nl = data.find(b"\n", pos)
                if nl < 0:
                    if end - pos > MAX_REPLY_LINE:
                        # Keep the head of an over-long line, drop the rest up to its LF.
                        if not self._discarding:
                            self._lines_add(data[pos:pos + MAX_REPLY_LINE], partial=True)
                        self._discarding = True
                        pos = end
                    break
                start, pos = pos, nl + 1
                if self._discarding:
                    self._discarding = False
                    self._lines_finish_partial()
                    continue
                line = data[start:min(nl, start + MAX_REPLY_LINE)].rstrip(b"\r")
                if not self._lines:
                    reply = cache.get(line)
                    if reply is not None:       # a complete one-line reply seen before
                        self._garbage = 0
                        self._on_reply(reply)
                        continue
                self._lines_add(line, partial=False)
            if len(buf) == end:              # not emptied by a handler
                if pos == end:
                    buf.clear()
                elif pos:
                    del buf[:pos]
        if self._closed and self.state not in (State.ERROR, State.CLOSED):
            stage = self.state.value
            self.state = State.CLOSED
            self._expect.clear()
            self._events.append(ConnectionClosed(stage))

    def _lines_add(self, line: bytes, partial: bool) -> None:
        if not _REPLY_LINE.match(line):
            # Postfix skips lines that are not replies (smtp_chat.c), warning when
            # pipelining, since a skipped line may shift later replies.  We do the
            # same, but only so many times before calling the server broken.
            self._garbage += 1
            if self._garbage > MAX_GARBAGE_LINES:
                self._protocol_error("too many malformed reply lines")
                return
            self._events.append(IgnoredLine(line[:100].decode("utf-8", "replace"),
                                            self.extensions.pipelining))
            return
        self._garbage = 0
        if partial:
            self._partial_line = line
            return
        self._collect(line)

    def _lines_finish_partial(self) -> None:
        line, self._partial_line = self._partial_line, None
        if line is not None:
            self._collect(line)

    def _collect(self, line: bytes) -> None:
        if len(self._lines) < MAX_REPLY_LINES:
            self._lines.append(line)
        if line[3:4] == b"-":
            return
        reply = parse_reply_lines(self._lines)
        if len(self._lines) == 1 and len(line) <= 512:
            if len(_REPLY_CACHE) >= _REPLY_CACHE_SIZE:
                _REPLY_CACHE.clear()
            _REPLY_CACHE[line] = reply
        self._lines = []
        self._on_reply(reply)

    def _on_reply(self, reply: Reply) -> None:
        if self.state is State.GREETING:
            self._on_greeting(reply)
            return
        if not self._expect:
            if (self.state is State.CONTENT and not self._bdat and not self.lmtp
                    and self._early_reply is None):
                self._early_reply = reply       # kept for end_content()
                return
            self._protocol_error(f"unexpected reply: {reply}")
            return
        what, index = self._expect.pop(0)
        if reply.code == 421 and what not in ("quit", "ehlo", "helo", "starttls", "auth"):
            # RFC 5321 3.8: 421 means the server closes the channel; replies to the
            # rest of a pipelined group will never come.
            self._expect.clear()
            self._unusable = True
            self._envelope = None
            self.state = State.READY
            self._events.append(TransactionFailed(reply, _EXPECT_LABEL[what], closing=True))
            return
        getattr(self, _HANDLERS[what])(reply, index)

    def _on_greeting(self, reply: Reply) -> None:
        self._events.append(Greeting(reply))
        if reply.code != 220:            # RFC 5321 3.1: 554 means "no service"
            self._events.append(Rejected(reply, "greeting", "initial greeting"))
            self.state = State.READY     # the driver QUITs
            self._unusable = True
            return
        if self.never_send_ehlo and not self.lmtp:
            self._send_helo()
        else:
            self._send(f"{self.hello_verb} {self.helo_name}")
            self._expect.append(("ehlo", -1))
            self.state = State.HELLO

    def _send_helo(self) -> None:
        self._send(f"HELO {self.helo_name}")
        self._expect.append(("helo", -1))
        self.state = State.HELO

    def _on_ehlo(self, reply: Reply, _i: int) -> None:
        if reply.code // 100 == 2:
            self.extensions = parse_ehlo(reply, self.discard_ehlo_keywords)
            self.state = State.READY
            self._events.append(HelloDone(reply, self.extensions, self.hello_verb))
        elif reply.code == 421 or self.lmtp:
            # LMTP has no HELO to fall back to (RFC 2033 4.1).
            self.state = State.READY
            self._unusable = True
            self._events.append(Rejected(reply, "helo", self.hello_verb))
        else:
            # RFC 5321 3.2: a server that does not know EHLO gets HELO.
            self._send_helo()

    def _on_helo(self, reply: Reply, _i: int) -> None:
        self.state = State.READY
        if reply.code // 100 == 2:
            self.extensions = Extensions()
            self._events.append(HelloDone(reply, self.extensions, "HELO"))
        else:
            self._unusable = True
            self._events.append(Rejected(reply, "helo", "HELO"))

    def _on_mail(self, reply: Reply, _i: int) -> None:
        self._events.append(MailReply(reply))
        if reply.code // 100 != 2:
            self._failure = (reply, "MAIL FROM")
            if not self.extensions.pipelining:
                self._fail_transaction()
            return
        self.state = State.RCPT
        if not self.extensions.pipelining:
            self._queue_rcpt(0)

    def _on_rcpt(self, reply: Reply, i: int) -> None:
        env = self._envelope
        if self._failure is not None:
            # MAIL was refused: RCPT replies (503s) mean nothing (RFC 2920 3.1).
            if not self._expect:          # no pipelined DATA (BDAT) to wait for
                self._fail_transaction()
            return
        if reply.code // 100 == 2:
            self._accepted += 1
            self._accepted_idx.append(i)
        self._events.append(RcptReply(i, env.recipients[i], reply))
        last = i == len(env.recipients) - 1
        if not self.extensions.pipelining and not last:
            self._queue_rcpt(i + 1)
            return
        if last:
            if self._accepted == 0 or self._probe:
                # No valid recipient: no DATA (or ignore its reply when pipelined).
                self._failure = (reply, "RCPT TO")
                if not self._expect:
                    self._fail_transaction()
                return
            if self._bdat:
                self.state = State.CONTENT
                self._at_line_start, self._column = True, 0
                self._events.append(ContentWanted(None))
            elif not self.extensions.pipelining:
                self._send("DATA")
                self._expect.append(("data", -1))
                self.state = State.DATA
            else:
                self.state = State.DATA

    def _on_data(self, reply: Reply, _i: int) -> None:
        if self._failure is not None:
            if reply.code == 354:
                # A server that says 354 with no recipient accepted: end the empty
                # message at once; its reply is ignored (Postfix does the same).
                self._out += b".\r\n"
                self._expect.append(("dot_abort", -1))
                return
            self._fail_transaction()
            return
        if reply.code == 354:
            self.state = State.CONTENT
            self._at_line_start, self._column = True, 0
            self._events.append(ContentWanted(reply))
        else:
            self._failure = (reply, "DATA")
            self._fail_transaction()

    def _on_dot_abort(self, reply: Reply, _i: int) -> None:
        self._fail_transaction()

    def _fail_transaction(self) -> None:
        reply, command = self._failure
        self._events.append(TransactionFailed(reply, command))
        self._envelope = None
        self.reset()

    def _on_bdat_mid(self, reply: Reply, _i: int) -> None:
        if reply.code // 100 != 2 and self._failure is None:
            self._failure = (reply, "end of DATA")

    def _on_bdat(self, reply: Reply, _i: int) -> None:
        if self._failure is not None:
            reply = self._failure[0]
        self._on_dot(reply, _i)

    def _on_lmtp_bdat(self, reply: Reply, i: int) -> None:
        if self._failure is not None:
            reply = self._failure[0]
        self._on_lmtp_dot(reply, i)

    def _on_lmtp_dot(self, reply: Reply, i: int) -> None:
        self._events.append(RecipientDone(i, self._envelope.recipients[i], reply))
        if not self._expect:
            self._on_dot(reply, -1)

    def _on_dot(self, reply: Reply, _i: int) -> None:
        self.state = State.READY
        self._envelope = None
        self._failure = None
        self.transactions += 1
        self._events.append(MessageDone(reply))

    def _on_rset(self, reply: Reply, _i: int) -> None:
        self.state = State.READY
        self._events.append(RsetDone(reply))
        if reply.code // 100 != 2:
            # A server that refuses RSET cannot be trusted with another transaction.
            self._unusable = True

    def _on_quit(self, reply: Reply, _i: int) -> None:
        self.state = State.CLOSED
        self._events.append(QuitDone(reply))
