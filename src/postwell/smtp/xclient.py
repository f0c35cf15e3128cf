"""XCLIENT (Postfix's XCLIENT_README): a client listed in smtpd_authorized_xclient_hosts
overrides what the server believes about the SMTP client -- its name, address, port,
HELO name, protocol, SASL login and the server address it reached -- and the session
starts over at the greeting (220), so connection-level decisions are made again.

Sans-IO, no state of its own::

    req, error = parse_xclient(arg, ipv6_enabled)   # Postfix 3.7's checks, order and wording
    apply_to_state(state, req, sasl_enabled)         # a policy SessionState takes the values
    restart_state(state, req)                        # the greeting-stage reset after a 220

A command that fails at one attribute keeps the attributes before it (``req`` holds
them, ``error`` is the 501): Postfix updates its session as it goes and does not undo
them, nor start the session over.  Reply texts, limits and address forms were checked
against Postfix 3.7.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from .reply import Reply

ATTRIBUTES = ("NAME", "ADDR", "PROTO", "HELO", "REVERSE_NAME", "PORT", "LOGIN", "DESTADDR",
              "DESTPORT")
EHLO_KEYWORD = "XCLIENT " + " ".join(ATTRIBUTES)
UNKNOWN = "unknown"              # Postfix's CLIENT_NAME_UNKNOWN / CLIENT_ADDR_UNKNOWN / ...
SASL_METHOD = "XCLIENT"          # what a LOGIN= login logs as sasl_method=

# Hostname lookup status of NAME / REVERSE_NAME (Postfix's peer codes): "temp" makes
# reject_unknown_client_hostname answer 450 whatever unknown_client_reject_code says.
STATUS_OK, STATUS_TEMP, STATUS_PERM = "ok", "temp", "perm"

_REPLY_EXPECTED = Reply(501, "Error: attribute=value expected", "5.5.4")
_REPLY_TOO_LONG = Reply(501, "Error: attribute value too long", "5.5.4")
_VALUE_LIMIT = 255               # checked on the value as sent, before xtext decoding
_PORT_DIGITS = 5


@dataclass(frozen=True)
class Item:
    attribute: str              # one of ATTRIBUTES
    value: str | None           # normalised; None: HELO / LOGIN [UNAVAILABLE] (forgotten)
    status: str = STATUS_OK     # NAME / REVERSE_NAME lookup status


@dataclass(frozen=True)
class XclientRequest:
    """The attributes of one XCLIENT command, in the order given (a later one wins)."""
    items: tuple = ()

    def given(self, attribute: str) -> bool:
        return any(i.attribute == attribute for i in self.items)

    def renames_client(self) -> bool:
        """Whether Postfix builds the client's name[addr] for its log lines anew: only
        after NAME, ADDR or PORT (checked against 3.7), so a name left behind by a
        failed command shows only from the next such command on."""
        return any(i.attribute in ("NAME", "ADDR", "PORT") for i in self.items)

    def last(self, attribute: str) -> Item | None:
        found = None
        for item in self.items:
            if item.attribute == attribute:
                found = item
        return found


def _decode(raw: str) -> str:
    """The value as Postfix 3.7 keeps it: xtext-decoded when that works (clients before
    Postfix 2.3 sent plain text, which is kept as it is), cut at a NUL (it is a C
    string), then non-printable characters and broken UTF-8 shown as "?"."""
    data = raw.encode("utf-8", "surrogateescape")
    if b"+" in data:
        out = bytearray()
        i, n = 0, len(data)
        while i < n:
            ch = data[i]
            if ch == 0x2B:      # RFC 3461 4: "+" and two hex digits (Postfix: either case)
                hx = data[i + 1:i + 3]
                if len(hx) != 2 or not all(c in b"0123456789abcdefABCDEF" for c in hx):
                    out = bytearray(data)
                    break
                out.append(int(hx, 16))
                i += 3
            else:
                out.append(ch)
                i += 1
        data = bytes(out)
    data = data.split(b"\0", 1)[0]
    text = data.decode("utf-8", "replace")
    return "".join("?" if ord(c) < 0x20 or c == "\x7f" or c == "\ufffd" else c for c in text)


def _hostname(value: str) -> bool:
    from .server import _valid_hostname
    return _valid_hostname(value)


def _ipv4(text: str) -> str | None:
    """Postfix's valid_ipv4_hostaddr() and then getaddrinfo()'s numeric parse (inet_aton:
    a leading 0 means octal, so 010 is 8 and 08 is refused), in dotted-quad form."""
    parts = text.split(".")
    if len(parts) != 4 or not all(p.isdigit() and p.isascii() for p in parts):
        return None
    if any(int(p) > 255 for p in parts):
        return None
    if int(parts[0]) == 0 and text.strip("0."):
        return None                 # 0.0.0.0 passes, 0.1.2.3 does not
    octets = []
    for p in parts:
        if len(p) > 1 and p[0] == "0":
            if not all(c in "01234567" for c in p):
                return None
            octets.append(int(p, 8))
        else:
            octets.append(int(p))
    if any(o > 255 for o in octets):
        return None
    return ".".join(map(str, octets))


def normalize_address(value: str, ipv6_enabled: bool) -> str | None:
    """ADDR / DESTADDR: an IPv4 address, or an IPv6 address after "IPV6:" (any case);
    returned in the form Postfix logs (an IPv4-mapped IPv6 address as IPv4).  None when
    Postfix 3.7 refuses it (IPv6 also when inet_protocols has no IPv6)."""
    if value[:5].upper() == "IPV6:":
        body = value[5:]
        if "%" in body:             # a scope id is no mail host address
            return None
        try:
            ip = ipaddress.IPv6Address(body)
        except ValueError:
            return None
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ip) if ipv6_enabled else None
    return _ipv4(value)


def _port(value: str) -> bool:
    return value.isdigit() and value.isascii() and len(value) <= _PORT_DIGITS


def _check(attribute: str, value: str, ipv6_enabled: bool) -> Item | None:
    """One attribute's value -> Item, or None when its syntax is bad."""
    upper = value.upper()
    if attribute in ("NAME", "REVERSE_NAME"):
        if upper == "[UNAVAILABLE]":
            return Item(attribute, UNKNOWN, STATUS_PERM)
        if upper == "[TEMPUNAVAIL]":
            return Item(attribute, UNKNOWN, STATUS_TEMP)
        return Item(attribute, value) if _hostname(value) else None
    if attribute in ("ADDR", "DESTADDR"):
        if upper == "[UNAVAILABLE]":
            return Item(attribute, UNKNOWN)
        addr = normalize_address(value, ipv6_enabled)
        return Item(attribute, addr) if addr is not None else None
    if attribute in ("PORT", "DESTPORT"):
        if upper == "[UNAVAILABLE]":
            return Item(attribute, UNKNOWN)
        # Postfix 3.7 checks the number of digits only: 99999 passes.
        return Item(attribute, value) if _port(value) else None
    if attribute == "PROTO":
        return Item(attribute, upper) if upper in ("SMTP", "ESMTP") else None
    if attribute == "HELO":
        if upper == "[UNAVAILABLE]":
            return Item(attribute, None)
        # Neutered like a HELO argument, so it cannot break a Received: header.
        from .server import neuter_helo
        return Item(attribute, neuter_helo(value))
    if attribute == "LOGIN":
        return Item(attribute, None if upper == "[UNAVAILABLE]" else value)
    raise AssertionError(attribute)


def parse_xclient(arg: str, ipv6_enabled: bool = True) -> tuple[XclientRequest, Reply | None]:
    """Check the attribute=value list of an authorized client's XCLIENT command.

    Returns the attributes accepted (all of them, or those before the bad one) and the
    501 reply for the first bad one (None when all are good).  The caller has already
    refused an empty argument, a client not authorized and a transaction in progress,
    in that order (Postfix 3.7's)."""
    from .server import split_args
    items: list[Item] = []
    for word in split_args(arg):
        name, eq, raw = word.partition("=")
        if not eq or not raw:
            return XclientRequest(tuple(items)), _REPLY_EXPECTED
        if len(raw) > _VALUE_LIMIT:
            return XclientRequest(tuple(items)), _REPLY_TOO_LONG
        value = _decode(raw)
        attribute = name.upper()
        if attribute not in ATTRIBUTES:
            # Named as the client wrote it.
            return XclientRequest(tuple(items)), Reply(
                501, f"Bad XCLIENT attribute name: {name}", "5.5.4")
        item = _check(attribute, value, ipv6_enabled)
        if item is None:
            return XclientRequest(tuple(items)), Reply(
                501, f"Bad {attribute} syntax: {value}", "5.5.4")
        items.append(item)
    return XclientRequest(tuple(items)), None


def apply_to_state(state, req: XclientRequest, sasl_enabled: bool) -> None:
    """Put the attributes into a SessionState, one by one as Postfix does: a NAME that
    is a name sets the reverse name too (a REVERSE_NAME after it wins), LOGIN counts only with
    smtpd_sasl_auth_enable (then permit_sasl_authenticated sees it)."""
    for item in req.items:
        a, v = item.attribute, item.value
        if a == "NAME":
            state.client_name = v
            state.client_name_status = item.status
            if item.status == STATUS_OK:
                # Only a real name stands for the reverse name too: [UNAVAILABLE] and
                # [TEMPUNAVAIL] leave it as it was (Postfix 3.7, side by side).
                state.reverse_client_name = v
                state.reverse_client_name_status = item.status
        elif a == "REVERSE_NAME":
            state.reverse_client_name = v
            state.reverse_client_name_status = item.status
        elif a == "ADDR":
            state.client_addr = v
        elif a == "PORT":
            state.client_port = v
        elif a == "PROTO":
            state.protocol = v
        elif a == "HELO":
            state.helo_name = v
        elif a == "LOGIN":
            if sasl_enabled:
                state.sasl_username = v
                state.sasl_method = SASL_METHOD if v is not None else None
        elif a == "DESTADDR":
            state.server_addr = v
        elif a == "DESTPORT":
            state.server_port = v


def restart_state(state, req: XclientRequest) -> None:
    """The greeting-stage reset after a successful XCLIENT: HELO, protocol and SASL
    login are forgotten unless this command set them (XCLIENT_README: "must not reset
    attributes that were received with the last XCLIENT command"); TLS stays."""
    state.reset_transaction()
    state.sasl_sender = None
    if not req.given("HELO"):
        state.helo_name = None
    if not req.given("PROTO"):
        state.protocol = "SMTP"
    if not req.given("LOGIN"):
        state.sasl_username = state.sasl_method = None
