"""What every SASL back end shares: step results, security options, replies.

The smtpd glue sees only this module's types.  A back end (cyrus, dovecot,
postwell) is a :class:`SaslServer`; one AUTH command is one
:class:`SaslExchange`.  Results are frozen dataclasses so the glue can match
on them; :func:`step_reply` turns any of them into the exact Postfix reply.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field

from ..smtp.reply import Reply

# Postfix smtpd_sasl_response_limit default; a longer client line is refused
# before any back end sees it (bounded memory, DESIGN.md 4).
DEFAULT_RESPONSE_LIMIT = 12288


class SaslConfigError(Exception):
    """The SASL configuration cannot work (missing file, bad smtpd.conf...)."""


@dataclass(frozen=True)
class Challenge:
    """Send ``334 base64(data)`` and feed the client's next line to step()."""
    data: bytes

    @property
    def text(self) -> str:
        return base64.b64encode(self.data).decode("ascii")


def printable(text: str) -> str:
    """Postfix's printable(s, '?') for the names it logs and stores (sasl_username,
    sasl_method), with smtputf8_enable on: an ASCII control becomes '?'; a byte
    0xC2-0xFE followed by continuation bytes is kept with them (Postfix checks no
    more than that); any other non-ASCII byte becomes '?'.  Client bytes that are
    not UTF-8 travel in ``text`` as surrogate escapes."""
    if text.isascii():
        if text.isprintable():
            return text
        return "".join("?" if (ord(c) < 0x20 or ord(c) == 0x7F) else c for c in text)
    data = bytearray(text.encode("utf-8", "surrogateescape"))
    i, n = 0, len(data)
    while i < n:
        ch = data[i]
        if 0x20 <= ch < 0x7F:
            pass
        elif 0xC2 <= ch <= 0xFE and i + 1 < n and 0x80 <= data[i + 1] < 0xC0:
            while i + 1 < n and 0x80 <= data[i + 1] < 0xC0:
                i += 1
        else:
            data[i] = 0x3F
        i += 1
    return data.decode("utf-8", "surrogateescape")


def clip(text: str, limit: int = 100) -> str:
    """C's "%.100s": the first ``limit`` bytes, as the log line carries them."""
    if len(text) * 4 <= limit:
        return text
    return text.encode("utf-8", "surrogateescape")[:limit].decode("utf-8", "surrogateescape")


@dataclass(frozen=True)
class Success:
    """Authenticated.  ``username`` is what Postfix logs as sasl_username."""
    username: str
    authzid: str | None = None


@dataclass(frozen=True)
class Failure:
    """Authentication failed.

    ``reason`` is the back end's text as Postfix puts it after
    ``Error: authentication failed:``; ``temporary`` selects 454 instead of
    535 (RFC 4954 6).  ``username`` feeds the ``sasl_username=`` part of the
    warning (None prints ``(unavailable)``).  ``delay``: seconds the smtpd
    should wait before sending the reply (slows password guessing; the
    smtpd also counts the failure toward smtpd_hard_error_limit).
    ``code``/``enhanced`` override the reply for protocol errors such as an
    over-long response (500 5.5.6).  ``library_log``: what libsasl2 itself
    would have logged through Postfix's callback (``warning: SASL
    authentication failure: ...``), before the smtpd's own warning.
    """
    reason: str
    temporary: bool = False
    username: str | None = None
    delay: float = 0.0
    code: int | None = None
    enhanced: str | None = None
    library_log: tuple[str, ...] = ()


SaslStep = Challenge | Success | Failure


def step_reply(step: SaslStep) -> Reply:
    """The SMTP reply Postfix's smtpd_sasl_glue.c sends for this result."""
    if isinstance(step, Challenge):
        # RFC 4954 4: "334" SP [base64]; Postfix sends "334 " even when empty.
        return Reply(334, step.text, None)
    if isinstance(step, Success):
        return Reply(235, "Authentication successful", "2.7.0")
    reason = step.reason or "(reason unavailable)"
    if step.code is not None:
        return Reply(step.code, step.reason, step.enhanced)
    if step.temporary:
        return Reply(454, f"Temporary authentication failure: {reason}", "4.7.0")
    return Reply(535, f"Error: authentication failed: {reason}", "5.7.8")


def step_bytes(step: SaslStep, enhanced_status_codes: bool = True) -> bytes:
    """Wire bytes for a step.  Postfix sends ``334 `` with the space even for an
    empty challenge, which Reply.to_bytes() would trim."""
    if isinstance(step, Challenge):
        return b"334 " + step.text.encode("ascii") + b"\r\n"
    return step_reply(step).to_bytes(enhanced_status_codes)


def failure_log_text(namaddr: str, mechanism: str, failure: Failure) -> str:
    """The warning Postfix logs (MailLog.warning adds ``warning: ``)."""
    reason = failure.reason or "(reason unavailable)"
    # Postfix prints an empty name as is: only a missing one is "(unavailable)".
    user = printable(failure.username) if failure.username is not None else "(unavailable)"
    return (f"{namaddr}: SASL {clip(mechanism)} authentication failed: {reason}, "
            f"sasl_username={clip(user)}")


def aborted_log_text(namaddr: str, mechanism: str) -> str:
    return f"{namaddr}: SASL {mechanism} authentication aborted"


ABORTED_REPLY = Reply(501, "Authentication aborted", "5.7.0")
RESPONSE_LIMIT_FAILURE = Failure("SASL response limit exceeded", code=500, enhanced="5.5.6")


def decode_b64(text: str) -> bytes | None:
    """Strict RFC 4648 base64; ``=`` alone is the empty initial response
    (RFC 4954 4).  None when the text is not base64."""
    if text == "=":
        return b""
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        return None


# --- security options (smtpd_sasl_security_options) ---------------------------------------

SECURITY_OPTIONS = frozenset({"noanonymous", "noplaintext", "noactive", "nodictionary",
                              "mutual_auth", "forward_secrecy"})


def parse_security_options(value: str) -> frozenset[str]:
    """Postfix's option words; unknown words raise SaslConfigError."""
    words = frozenset(w for w in value.replace(",", " ").split() if w)
    bad = sorted(words - SECURITY_OPTIONS)
    if bad:
        raise SaslConfigError(f"unknown SASL security option: {bad[0]}")
    return words


@dataclass(frozen=True)
class MechanismInfo:
    """What a mechanism protects against, in Cyrus SASL's terms: a mechanism
    is offered only when it provides every required property."""
    name: str
    provides: frozenset[str] = field(default_factory=frozenset)


# Properties as the Cyrus plugins declare them (PLAIN/LOGIN send the password;
# CRAM-MD5 and DIGEST-MD5 resist passive sniffing but not dictionaries; SCRAM
# also resists active attacks and authenticates the server).
MECHANISM_PROPERTIES: dict[str, frozenset[str]] = {
    "PLAIN": frozenset({"noanonymous"}),
    "LOGIN": frozenset({"noanonymous"}),
    "CRAM-MD5": frozenset({"noanonymous", "noplaintext"}),
    "DIGEST-MD5": frozenset({"noanonymous", "noplaintext", "mutual_auth"}),
    **{f"SCRAM-SHA-{n}": frozenset({"noanonymous", "noplaintext", "noactive", "mutual_auth"})
       for n in (1, 224, 256, 384, 512)},
    "ANONYMOUS": frozenset({"noplaintext"}),
}


def allowed_by_options(provides: frozenset[str], required: frozenset[str]) -> bool:
    return required <= provides


def apply_mechanism_filter(names: list[str], filter_value: str) -> list[str]:
    """smtpd_sasl_mechanism_filter: a list of names, ``!name`` to drop one,
    ``static:rest``/``static:all`` (or any ``type:table`` matching all) to keep
    what is left.  First match wins, as with Postfix's string lists."""
    patterns = [w for w in filter_value.replace(",", " ").split() if w]
    if not patterns:
        return names
    kept = []
    for name in names:
        verdict = False
        for pat in patterns:
            neg = pat.startswith("!")
            p = pat[1:] if neg else pat
            if ":" in p or p.upper() == name.upper():
                verdict = not neg
                break
        if verdict:
            kept.append(name)
    return kept


class SaslExchange:
    """One AUTH dialogue.  Feed the client's lines; get SaslSteps back.

    ``await exchange.begin()`` processes the AUTH command's initial response
    (None when the client sent none).  While the result is a Challenge, send
    ``334``, read one line, and ``await exchange.step(line)``.  A line ``*`` is
    the client's cancel (RFC 4954 4): the smtpd engine answers it itself, the
    glue then calls ``exchange.abort()``.

    Responses may be given as ``str`` (the base64 text exactly as the client
    sent it: each back end decodes it itself because their error texts differ)
    or as ``bytes`` (already decoded).
    """

    mechanism: str = ""

    async def begin(self) -> SaslStep:  # pragma: no cover - interface
        raise NotImplementedError

    async def step(self, response: str | bytes) -> SaslStep:  # pragma: no cover
        raise NotImplementedError

    def abort(self) -> None:
        pass


class SaslServer:
    """A configured back end, shared by all sessions of one smtpd process."""

    type_name = ""

    def mechanisms(self, tls_active: bool = False) -> list[str]:  # pragma: no cover
        raise NotImplementedError

    def start(self, mechanism: str, initial_response: str | bytes | None = None, *,
              client_addr: str = "", client_port: str = "", local_addr: str = "",
              local_port: str = "", local_domain: str | None = None,
              tls_active: bool = False) -> SaslExchange:  # pragma: no cover
        raise NotImplementedError

    async def close(self) -> None:
        pass
