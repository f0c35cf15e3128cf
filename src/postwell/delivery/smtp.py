"""smtp(8): deliver over SMTP to the next hop (MX lookup or ``[host]:port``).

asyncio glue around the sans-IO engine :class:`postwell.smtp.client.SmtpClient`:
this module resolves the destination (postwell.dns), connects, applies Postfix's
per-stage timeouts, streams the queued content and turns replies into
per-recipient :class:`RecipientResult` objects worded as Postfix words them
(checked side by side against Postfix 3.7's smtp(8)).

Also here, per Postfix's parameters: STARTTLS (smtp_tls_security_level none /
may / encrypt / fingerprint / verify / secure, smtp_tls_policy_maps; "dane" acts
as "may" and "dane-only" as "verify" since there is no DNSSEC validation), SASL
PLAIN/LOGIN client authentication (smtp_sasl_*), and BDAT when
postwell_smtp_use_chunking = yes (a postwell extension; Postfix never sends BDAT).

LMTP (RFC 2033): a subclass with ``protocol = "lmtp"`` reads the lmtp_* parameters,
says LHLO, takes next hops "unix:path", "inet:host:port" or "[host]:port" without
MX lookups, and gets one final reply per recipient after the data.

Idle connections are cached per destination and reused by later deliver()
calls (smtp_connection_cache_*, smtp_connection_reuse_*).  Unlike Postfix, which
caches only when the qmgr reports a backlog, an idle connection is always kept
for smtp_connection_cache_time_limit.  A reused connection sets
``result.conn_use = N`` (Postfix logs ", conn_use=N" after relay=).

8-bit content to a server without 8BITMIME (RFC 6152 3): Postfix's default
(disable_mime_output_conversion = no) downgrades MIME parts that declare
Content-Transfer-Encoding 8bit/binary to quoted-printable and leaves everything
else alone (a message without MIME headers goes out unchanged, 8-bit or not).
:class:`MimeDowngrade` does the same, line by line; see ``eight_bit_action``.
"""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import errno
import hashlib
import hmac
import ipaddress
import os
import random
import re
import socket
import ssl
import sys
import time
from dataclasses import dataclass

from postwell.dns import (DestinationError, DnsPythonResolver, DnsThenNative, NativeResolver,
                          Target, families_from_inet_protocols, own_addresses_from_config,
                          parse_nexthop, relayhost_problem, resolve_destination)
from postwell.smtp.client import (NEED_DATA, AuthChallenge, AuthDone, ConnectionClosed, ContentWanted, Envelope, Greeting,
                                  HelloDone, IgnoredLine, MailReply, MessageDone, ProtocolError, TlsRefused,
                                  TlsWanted,
                                  RcptReply, Recipient, RecipientDone, Rejected, SmtpClient, State,
                                  TransactionFailed, has_long_line, needs_smtputf8, quote_address)
from postwell.smtp.reply import Reply

from .base import DeliveryAgent, RecipientResult

_SMTP_PARAMS = (
    "helo_name", "tcp_port", "connect_timeout", "helo_timeout", "mail_timeout", "rcpt_timeout",
    "data_init_timeout", "data_xfer_timeout", "data_done_timeout", "rset_timeout",
    "quit_timeout", "starttls_timeout", "mx_address_limit", "mx_session_limit",
    "never_send_ehlo", "always_send_ehlo", "skip_5xx_greeting", "skip_quit_response",
    "line_length_limit", "quote_rfc821_envelope", "connection_cache_on_demand",
    "connection_cache_destinations", "connection_cache_time_limit",
    "connection_reuse_time_limit", "connection_reuse_count_limit", "address_preference",
    "host_lookup", "dns_support_level", "discard_ehlo_keywords", "bind_address",
    "bind_address6", "bind_address_enforce", "tls_security_level", "tls_policy_maps",
    "tls_loglevel", "tls_CAfile", "tls_CApath", "tls_cert_file", "tls_key_file",
    "tls_fingerprint_digest", "tls_fingerprint_cert_match", "tls_verify_cert_match",
    "tls_secure_cert_match", "use_tls", "enforce_tls", "tls_enforce_peername",
    "sasl_auth_enable", "sasl_password_maps", "sasl_security_options",
    "sasl_tls_security_options", "sasl_mechanism_filter", "sasl_auth_soft_bounce",
    "sender_dependent_authentication", "randomize_addresses")


def _register_parameters() -> None:
    try:
        from postwell.config.registry import register_implemented
    except ImportError:     # pragma: no cover - older config part
        return
    register_implemented(*(f"smtp_{n}" for n in _SMTP_PARAMS), "disable_dns_lookups",
                         "disable_mime_output_conversion", "mime_nesting_limit",
                         "proxy_interfaces", "postwell_dns_servers",
                         "postwell_smtp_use_chunking")


_register_parameters()


def eight_bit_action(body_type: str | None, server_8bitmime: bool,
                     disable_mime_output_conversion: bool) -> str:
    """What Postfix decides for 8-bit content: "send" as is, or "convert" to 7-bit.

    Postfix converts for a server without 8BITMIME unless
    disable_mime_output_conversion.  Content known to be 7-bit is never touched;
    an unknown body type is run through the converter, which only changes parts
    that declare an 8-bit transfer encoding.
    """
    if body_type == "7BIT" or server_8bitmime or disable_mime_output_conversion:
        return "send"
    return "convert"


_CT_RE = re.compile(rb"^content-type:\s*([!-~]+?)\s*/\s*([!-~]+?)\s*(?:;|$)", re.I)
_BOUNDARY_RE = re.compile(rb';\s*boundary\s*=\s*(?:"([^"]{1,200})"|([^\s;]{1,200}))', re.I)
_CTE_RE = re.compile(rb"^content-transfer-encoding:\s*([A-Za-z0-9-]+)", re.I)
MIME_HEADER_LIMIT = 102400       # header bytes per entity we analyse (bounded memory)


class MimeDowngrade:
    """Convert 8-bit MIME parts to quoted-printable (RFC 2045 6.7), streaming.

    Fed LF-terminated content in arbitrary chunks; yields converted chunks.  A
    leaf part with Content-Transfer-Encoding 8bit/binary gets its body QP-encoded
    and that header replaced by "Content-Transfer-Encoding: quoted-printable" at
    the end of the part's headers (where Postfix puts it); a multipart or
    message part that claims 8bit/binary is relabelled 7bit.  Nesting follows
    mime_nesting_limit.
    """

    def __init__(self, nesting_limit: int = 100) -> None:
        self.nesting_limit = nesting_limit
        self.boundaries: list[bytes] = []     # open multipart boundaries, innermost last
        self.in_headers = True
        self.headers: list[bytes] = []        # logical header lines of the entity being read
        self.header_bytes = 0
        self.default_type = b"text"
        self.encode_body = False
        self.rest = b""

    def feed(self, chunk: bytes) -> bytes:
        data = self.rest + chunk
        lines = data.split(b"\n")
        self.rest = lines.pop()
        return b"".join(self._line(line) for line in lines)

    def close(self) -> bytes:
        out = self._line(self.rest, last=True) if self.rest else b""
        self.rest = b""
        if self.in_headers and self.headers:
            out += self._flush_headers()
        return out

    def _line(self, line: bytes, last: bool = False) -> bytes:
        nl = b"" if last else b"\n"
        if self.in_headers and self.boundaries and line.startswith(b"--") and self._boundary(line):
            # A part that ends inside its headers (a message/rfc822 part without
            # a body): the boundary still counts (RFC 2046 5.1.1).
            return self._flush_headers() + self._line(line, last)
        if self.in_headers:
            if line in (b"", b"\r"):
                return self._flush_headers() + line + nl
            if line[:1] in (b" ", b"\t") and self.headers:
                self.headers[-1] += b"\n" + line
            else:
                self.headers.append(line)
            self.header_bytes += len(line)
            if self.header_bytes > MIME_HEADER_LIMIT:
                # Give up analysing this entity: pass it through unchanged.
                out = b"\n".join(self.headers) + b"\n"
                self.headers, self.in_headers, self.encode_body = [], False, False
                return out
            return b""
        if line.startswith(b"--") and self.boundaries:
            stripped = line.rstrip(b" \t\r")
            for depth in range(len(self.boundaries) - 1, -1, -1):
                b = self.boundaries[depth]
                if stripped == b"--" + b:
                    del self.boundaries[depth + 1:]
                    self._start_entity(b"text")
                    return line + nl
                if stripped == b"--" + b + b"--":
                    del self.boundaries[depth:]
                    self.encode_body = False
                    return line + nl
        if self.encode_body:
            return _qp_line(line.rstrip(b"\r")) + nl
        return line + nl

    def _boundary(self, line: bytes) -> bool:
        stripped = line.rstrip(b" \t\r")
        return any(stripped in (b"--" + b, b"--" + b + b"--") for b in self.boundaries)

    def _start_entity(self, default_type: bytes) -> None:
        self.in_headers, self.headers, self.header_bytes = True, [], 0
        self.default_type, self.encode_body = default_type, False

    def _flush_headers(self) -> bytes:
        ctype, boundary, cte = self.default_type, None, None
        for h in self.headers:
            m = _CT_RE.match(h)
            if m:
                ctype = m.group(1).lower()
                bm = _BOUNDARY_RE.search(h)
                if bm:
                    boundary = bm.group(1) or bm.group(2)
            m = _CTE_RE.match(h)
            if m:
                cte = m.group(1).lower()
        eight = cte in (b"8bit", b"binary")
        composite = ctype in (b"multipart", b"message")
        out = []
        for h in self.headers:
            if eight and _CTE_RE.match(h):
                if composite:
                    out.append(b"Content-Transfer-Encoding: 7bit")
                continue
            out.append(h)
        if eight and not composite:
            out.append(b"Content-Transfer-Encoding: quoted-printable")
        self.headers, self.in_headers = [], False
        self.encode_body = eight and not composite
        nested = len(self.boundaries)
        if ctype == b"multipart" and boundary and nested < self.nesting_limit:
            self.boundaries.append(boundary)
        elif ctype == b"message" and nested < self.nesting_limit:
            # message/rfc822: its body is a whole message (RFC 2046 5.2.1), at the
            # top or inside a multipart, as Postfix's mime_state reads it.
            self._start_entity(b"text")
        return b"".join(h + b"\n" for h in out)


# Bytes a quoted-printable line keeps as they are (RFC 2045 6.7 rules 2 and 3), as
# Postfix's mime_state downgrade chooses them: printable ASCII but "=", and TAB.
_QP_KEEP = frozenset(c for c in range(256) if (32 <= c <= 126 and c != 61) or c == 9)
_QP_NEEDS = re.compile(rb"[^\t\x20-\x3c\x3e-\x7e]")
_QP_WIDTH = 73


def _qp_line(line: bytes) -> bytes:
    """One line to quoted-printable (RFC 2045 6.7), wrapped as Postfix wraps it:
    a soft line break ("=") once a line holds more than 72 characters, checked
    before each input byte, so an encoded triplet is never split; a trailing blank
    is encoded (rule 3).  Lines come back joined by LF."""
    if len(line) <= _QP_WIDTH and not _QP_NEEDS.search(line):
        if line[-1:] in (b" ", b"\t"):
            return line[:-1] + b"=%02X" % line[-1]
        return line
    out = []
    cur = bytearray()
    for ch in line:
        if len(cur) > _QP_WIDTH - 1:
            out.append(bytes(cur) + b"=")
            cur.clear()
        if ch in _QP_KEEP:
            cur.append(ch)
        else:
            cur += b"=%02X" % ch
    if cur and cur[-1] in (32, 9):
        cur[-1:] = b"=%02X" % cur[-1]
    out.append(bytes(cur))
    return b"\n".join(out)


def _env_recipient(r) -> Recipient:
    """A queued recipient as the engine sends it: the resolver's address,
    NOTIFY in Postfix's word order, ORCPT (stored, or the original address)."""
    notify = getattr(r, "notify", None)
    return Recipient(getattr(r, "nexthop_recipient", None) or r.address,
                     _notify_order(notify) if notify else notify,
                     getattr(r, "orcpt", None) or _orig_orcpt(r))


def _orig_orcpt(rcpt) -> str | None:
    orig = getattr(rcpt, "orig", None)
    return f"rfc822;{quote_address(orig)}" if orig else None


def _rcpt_order(address: str) -> tuple:
    """Postfix's recipient sort key: addresses without a domain last, then the
    domain compared without case, then the whole address byte by byte (UTF-8
    byte order is code point order)."""
    local, at, domain = address.rpartition("@")
    if not at:
        return (1, "", address)
    return (0, domain.lower(), address)


# Postfix keeps a server reply's text up to line_length_limit (its default; smtp(8)
# reads it as var_line_limit) and logs non-printable characters as "?" (printable()).
_REPLY_TEXT_LIMIT = 2048
# (UTF-8 text stays, as smtputf8_enable = yes makes printable() keep it; bytes
# that were no UTF-8 were decoded to U+FFFD.)
_UNPRINTABLE = re.compile("[^\x20-\x7e\n\u0080-\ufffc\ufffe-\U0010ffff]")

_NOTIFY_WORDS = ("NEVER", "SUCCESS", "FAILURE", "DELAY")


def _notify_order(notify: str | None) -> str | None:
    """RFC 3461 4.1 NOTIFY words in Postfix's order (dsn_notify_str(): never,
    success, failure, delay), whatever order the submitter used."""
    if not notify:
        return notify
    words = {w.strip().upper() for w in notify.split(",")}
    known = [w for w in _NOTIFY_WORDS if w in words]
    return ",".join(known + sorted(words.difference(_NOTIFY_WORDS, {""}))) or notify


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def _name_matches(pattern: str, wanted: str) -> bool:
    pattern, wanted = pattern.lower().rstrip("."), wanted.lower().rstrip(".")
    if wanted.startswith("."):
        # Postfix "dot-nexthop": any subdomain of the next-hop domain.
        return pattern.endswith(wanted) and not pattern.startswith("*")
    if pattern.startswith("*."):
        # RFC 6125 6.4.3: the wildcard covers exactly one label.
        head, _, rest = wanted.partition(".")
        return bool(head) and rest == pattern[2:]
    return pattern == wanted


def _cert_matches(cert: dict | None, wanted: list[str]) -> bool:
    """RFC 6125 name check: subjectAltName DNS (or IP) names, else the subject CN."""
    if not cert:
        return False
    sans = [v for k, v in cert.get("subjectAltName", ()) if k in ("DNS", "IP Address")]
    if not sans:
        sans = [v for rdn in cert.get("subject", ()) for k, v in rdn if k == "commonName"]
    return any(_name_matches(p, w) for p in sans for w in wanted if w and w != ".")


def split_table_list(value: str) -> list[str]:
    """A list of table specs, split on commas/space outside {} (inline:{ a=b, c=d })."""
    out, cur, depth = [], [], 0
    for ch in value:
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth = max(depth - 1, 0)
        if depth == 0 and (ch == "," or ch.isspace()):
            if cur:
                out.append("".join(cur))
                cur = []
            continue
        cur.append(ch)
    if cur:
        out.append("".join(cur))
    return out


def tls_level_from_config(cfg, prefix: str = "smtp") -> str:
    """smtp_tls_security_level, or the legacy smtp_use_tls / smtp_enforce_tls."""
    level = cfg.get(f"{prefix}_tls_security_level").strip().lower()
    if not level:
        if cfg.get_bool(f"{prefix}_enforce_tls"):
            level = "verify" if cfg.get_bool(f"{prefix}_tls_enforce_peername") else "encrypt"
        elif cfg.get_bool(f"{prefix}_use_tls"):
            level = "may"
        else:
            level = "none"
    # No DNSSEC here: "dane" degrades to "may" (as Postfix does without usable
    # TLSA records); "dane-only" is held to certificate verification instead.
    return {"dane": "may"}.get(level, level)


# RFC 3463 code after a reply line's "ddd " or "ddd-" (and any blanks).
_LAST_LINE_DSN = re.compile(r"^(\d)\d\d[ -] *(([245])\.\d{1,3}\.\d{1,3})(?: |$)")


def _dsn_of(reply: Reply) -> str:
    # Postfix synthesises X.0.0 when the server gives no enhanced status code, and
    # 5.5.0 for a reply of an unexpected class (a 3xx to RCPT, say).
    raw = getattr(reply, "raw", "")
    if "\n" in raw:
        # smtp_chat_resp() reads the code of a multi-line reply from its last line
        # ("554-no service" then "554 5.3.2 go away": 5.3.2).
        m = _LAST_LINE_DSN.match(raw.rsplit("\n", 1)[1])
        if m and m.group(1) == m.group(3):
            return m.group(2)
    elif reply.enhanced:
        return reply.enhanced
    cls = reply.code // 100
    return f"{cls}.0.0" if cls in (2, 4, 5) else "5.5.0"


# ---------------------------------------------------------------- TLS log details
#
# Postfix ends its "TLS connection established" line with the key exchange and the
# server's signature ("key-exchange X25519 server-signature RSA-PSS (2048 bits)
# server-digest SHA256").  Python 3.11's ssl module does not expose these, so they
# are read from OpenSSL through ctypes, from the SSL handle of the ssl object.
# Finding that handle relies on CPython's PySSLSocket layout (ob_refcnt, ob_type,
# Socket, ssl, ctx); it is used only after the layout is proven on the object
# itself (the ctx slot must be our SSLContext, and OpenSSL must agree that the
# SSL belongs to that context's SSL_CTX).  Anything unexpected: no details.

_SSL_CTRL_GET_PEER_SIGNATURE_NID = 108      # OpenSSL ssl.h
_SSL_CTRL_GET_PEER_TMP_KEY = 109
_EVP_PKEY = {"RSA": 6, "DSA": 116, "DH": 28, "EC": 408, "RSA_PSS": 912, "X25519": 1034,
             "X448": 1035, "ED25519": 1087, "ED448": 1088}
_openssl = None


def _openssl_lib():
    global _openssl
    if _openssl is None:
        import _ssl
        # The _ssl module's own libssl/libcrypto: dlsym on its handle searches them.
        lib = ctypes.CDLL(_ssl.__file__)
        vp, ci = ctypes.c_void_p, ctypes.c_int
        for name, res, args in (
                ("SSL_ctrl", ctypes.c_long, [vp, ci, ctypes.c_long, vp]),
                ("SSL_get_SSL_CTX", vp, [vp]),
                ("SSL_get_peer_signature_type_nid", ci, [vp, ctypes.POINTER(ci)]),
                ("SSL_get1_peer_certificate", vp, [vp]),
                ("X509_get0_pubkey", vp, [vp]),
                ("X509_free", None, [vp]),
                ("EVP_PKEY_get_base_id", ci, [vp]),
                ("EVP_PKEY_get_bits", ci, [vp]),
                ("EVP_PKEY_get_group_name", ci, [vp, ctypes.c_char_p, ctypes.c_size_t, vp]),
                ("EVP_PKEY_free", None, [vp]),
                ("OBJ_nid2sn", ctypes.c_char_p, [ci])):
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = res, args
        _openssl = lib
    return _openssl


def _ssl_handle(sslobj):
    inner = getattr(sslobj, "_sslobj", None)
    context = getattr(sslobj, "context", None)
    if inner is None or context is None or sys.getsizeof(inner) < 40:
        return None
    word = ctypes.sizeof(ctypes.c_void_p)
    slots = (ctypes.c_void_p * 3).from_address(id(inner) + 2 * word)   # Socket, ssl, ctx
    if slots[2] != id(context) or not slots[1]:
        return None
    ssl_ctx = ctypes.c_void_p.from_address(id(context) + 2 * word).value
    lib = _openssl_lib()
    if not ssl_ctx or lib.SSL_get_SSL_CTX(slots[1]) != ssl_ctx:
        return None
    return slots[1]


def _group_name(lib, pkey) -> str:
    buf = ctypes.create_string_buffer(80)
    if lib.EVP_PKEY_get_group_name(pkey, buf, len(buf), None) != 1:
        return ""
    return buf.value.decode("ascii", "replace")


def tls_handshake_details(sslobj) -> str:
    """" key-exchange ... server-signature ... server-digest ..." as Postfix logs it, or ""."""
    try:
        handle = _ssl_handle(sslobj)
        if handle is None:
            return ""
        lib = _openssl_lib()
        out = ""
        tmp = ctypes.c_void_p()
        if lib.SSL_ctrl(handle, _SSL_CTRL_GET_PEER_TMP_KEY, 0, ctypes.byref(tmp)) and tmp.value:
            kind = lib.EVP_PKEY_get_base_id(tmp)
            if kind == _EVP_PKEY["DH"]:
                out += f" key-exchange DHE ({lib.EVP_PKEY_get_bits(tmp)} bits)"
            elif kind == _EVP_PKEY["EC"]:
                curve = _group_name(lib, tmp)
                out += " key-exchange ECDHE" + (f" ({curve})" if curve else "")
            else:
                name = lib.OBJ_nid2sn(kind)
                if name:
                    out += f" key-exchange {name.decode('ascii', 'replace')}"
            lib.EVP_PKEY_free(tmp)
        cert = lib.SSL_get1_peer_certificate(handle)
        if cert:
            try:
                key = lib.X509_get0_pubkey(cert)
                kind = lib.EVP_PKEY_get_base_id(key) if key else 0
                sig = ctypes.c_int(0)
                has_sig = lib.SSL_get_peer_signature_type_nid(handle, ctypes.byref(sig))
                name, detail = None, ""
                if kind in (_EVP_PKEY["RSA"], _EVP_PKEY["RSA_PSS"]):
                    name = "RSA-PSS" if (kind == _EVP_PKEY["RSA_PSS"] or
                                         (has_sig and sig.value == _EVP_PKEY["RSA_PSS"])) else "RSA"
                    detail = f" ({lib.EVP_PKEY_get_bits(key)} bits)"
                elif kind == _EVP_PKEY["EC"]:
                    curve = _group_name(lib, key)
                    name, detail = "ECDSA", (f" ({curve})" if curve else "")
                elif kind == _EVP_PKEY["ED25519"]:
                    name = "ED25519"
                elif kind == _EVP_PKEY["ED448"]:
                    name = "ED448"
                elif kind == _EVP_PKEY["DSA"]:
                    name, detail = "DSA", f" ({lib.EVP_PKEY_get_bits(key)} bits)"
                if name:
                    out += f" server-signature {name}{detail}"
                    digest = ctypes.c_int(0)
                    if lib.SSL_ctrl(handle, _SSL_CTRL_GET_PEER_SIGNATURE_NID, 0,
                                    ctypes.byref(digest)) and digest.value:
                        sn = lib.OBJ_nid2sn(digest.value)
                        if sn:
                            out += f" server-digest {sn.decode('ascii', 'replace')}"
            finally:
                lib.X509_free(cert)
        return out
    except Exception:        # noqa: BLE001 - details are a nicety, never a failure
        return ""


try:
    # Now, while the daemons still run as root: after the privilege drop the
    # library's directory may be unreadable (see postwell.dns.preload_dnspython).
    _openssl_lib()
except Exception:            # noqa: BLE001 - no details then
    pass


def _one_line(reply: Reply) -> str:
    return str(reply)     # ServerReply: every line with its code, joined by spaces


def _soft(dsn: str) -> str:
    return "4" + dsn[1:] if dsn.startswith("5") else dsn


_EHLO_WORDS = re.compile(r"[ \t=]+")
_EHLO_KEYWORD_EQ = re.compile(r"^([A-Za-z0-9][A-Za-z0-9-]*)=")


class _PostfixClient(SmtpClient):
    """The engine as Postfix's smtp_loop() drives it: a 421 to MAIL, RCPT, DATA,
    the end of data or RSET is one more 4xx reply.  Postfix goes on with what the
    protocol state calls for (the next pipelined reply, RSET, QUIT) and learns that
    the server hung up (RFC 5321 3.8) from the end of file that follows, so the
    recipients still waiting for a reply get "lost connection ... while sending
    RCPT TO", and the peer sees the same commands from both MTAs."""

    _ORDINARY_421 = frozenset({"mail", "rcpt", "data", "dot", "rset"})
    # SMTPUTF8 (RFC 6531 3.4) goes after the DSN parameters in Postfix's MAIL FROM.
    _UTF8_BEFORE_DSN = re.compile(r" SMTPUTF8(?= ENVID=| RET=)")

    def _send(self, line: str) -> None:
        if line.startswith("MAIL FROM:") and " SMTPUTF8 " in line:
            hits = list(self._UTF8_BEFORE_DSN.finditer(line))
            if hits:
                m = hits[-1]
                line = line[:m.start()] + line[m.end():] + " SMTPUTF8"
        super()._send(line)

    def _on_greeting(self, reply: Reply) -> None:
        if reply.code // 100 == 2 and reply.code != 220:
            reply = dataclasses.replace(reply, code=220)    # smtp_helo(): any 2xx will do
        super()._on_greeting(reply)

    def _on_data(self, reply: Reply, index: int) -> None:
        if reply.code // 100 == 3 and reply.code != 354:
            reply = dataclasses.replace(reply, code=354)    # smtp_loop(): any 3xx goes ahead
        super()._on_data(reply, index)

    def _on_ehlo(self, reply: Reply, index: int) -> None:
        if reply.code // 100 == 2 and "=" in reply.text:
            # smtp_helo(): a keyword ends at "=" too ("SIZE=1000", RFC 4954's
            # pre-standard "AUTH=LOGIN"), its parameters follow.
            text = "\n".join(_EHLO_KEYWORD_EQ.sub(r"\1 ", ln) if n else ln
                             for n, ln in enumerate(reply.text.split("\n")))
            reply = dataclasses.replace(reply, text=text)
        super()._on_ehlo(reply, index)

    def _on_reply(self, reply: Reply) -> None:
        if (reply.code == 421 and self._expect and self.state is not State.GREETING
                and self._expect[0][0] in self._ORDINARY_421):
            what, index = self._expect.pop(0)
            self._unusable = True          # never cached after this
            getattr(self, "_on_" + what)(reply, index)
            return
        super()._on_reply(reply)


@dataclass(frozen=True)
class UnixTarget(Target):
    """An LMTP server on a UNIX-domain socket; Postfix logs it as host[path]."""
    path: str = ""

    @property
    def relay(self) -> str:
        return f"{self.host}[{self.ip}]"

    @property
    def namaddr(self) -> str:
        return f"{self.host}[{self.ip}]"


# Converted content queued before it is written out (one write per message
# up to this size).
CONTENT_FLUSH_SIZE = 1 << 18

# Postfix's per-stage smtp_*_timeout for each engine state.
_STAGE_TIMEOUTS = {
    State.GREETING: "helo_timeout", State.HELLO: "helo_timeout", State.HELO: "helo_timeout",
    State.MAIL: "mail_timeout", State.RCPT: "rcpt_timeout", State.DATA: "data_init_timeout",
    State.CONTENT: "data_xfer_timeout", State.DONE: "data_done_timeout",
    State.RSET: "rset_timeout", State.QUIT: "quit_timeout",
    State.STARTTLS: "starttls_timeout", State.TLS: "starttls_timeout",
}


class _SessionFailure(Exception):
    """The session with one server failed; try the next one (site failure)."""

    def __init__(self, dsn: str, reason: str, *, permanent: bool = False,
                 relay: str = "none") -> None:
        super().__init__(reason)
        self.dsn, self.reason, self.permanent, self.relay = dsn, reason, permanent, relay
        self.before_mail = False
        self.tls_fallback = False
        self.conn_setup_done: float | None = None


class _ResumingContext(ssl.SSLContext):
    """An SSLContext whose next client connection offers a cached session.

    asyncio's start_tls() has no parameter for an ssl.SSLSession, but every TLS
    object it creates comes from wrap_bio(), one loop turn after the call.  The
    agent sets `pending` under a lock just before start_tls() and clears it once
    wrap_bio() has taken it (see SmtpDeliveryAgent._start_tls_with_session), so a
    session reaches exactly the connection it was looked up for.
    """

    pending: "ssl.SSLSession | None" = None
    taken: "asyncio.Event | None" = None

    def wrap_bio(self, incoming, outgoing, server_side=False, server_hostname=None,
                 session=None):
        if session is None and not server_side:
            session, self.pending = self.pending, None
            if self.taken is not None:
                self.taken.set()
        try:
            return super().wrap_bio(incoming, outgoing, server_side, server_hostname, session)
        except ValueError:  # a session of another context: just do a full handshake
            return super().wrap_bio(incoming, outgoing, server_side, server_hostname)


class TlsSessionCache:
    """smtp_tls_session_cache_database: TLS sessions of this delivery agent,
    offered again to the same server (same TLS level, next hop, address and
    port), so a repeat connection needs no full handshake.

    Postfix keeps them in a file shared by every smtp(8) process through
    tlsmgr(8).  Python's ssl cannot serialise a session, and all of postwell's
    outbound connections are made by the one queue manager process, so the
    cache is in that process's memory: lost on restart, shared by every
    delivery.  Entries expire after smtp_tls_session_cache_timeout (or the
    session's own lifetime when shorter); the count is bounded.
    """

    def __init__(self, timeout: float, clock=time.monotonic, limit: int = 1000) -> None:
        self.timeout = timeout
        self.clock = clock
        self.limit = limit
        self._entries: dict[tuple, tuple[ssl.SSLSession, float]] = {}

    def get(self, key: tuple) -> ssl.SSLSession | None:
        hit = self._entries.get(key)
        if hit is None:
            return None
        session, expires = hit
        if self.clock() >= expires:
            del self._entries[key]
            return None
        return session

    def put(self, key: tuple, session: ssl.SSLSession | None) -> None:
        if session is None or not (session.has_ticket or session.id):
            return
        lifetime = self.timeout
        if session.timeout:
            lifetime = min(lifetime, float(session.timeout))
        if lifetime <= 0:
            return
        self._entries.pop(key, None)
        while len(self._entries) >= self.limit:   # oldest first (dicts keep insertion order)
            del self._entries[next(iter(self._entries))]
        self._entries[key] = (session, self.clock() + lifetime)

    def drop(self, key: tuple) -> None:
        self._entries.pop(key, None)

    def __len__(self) -> int:
        return len(self._entries)


def _expire_waiter(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_exception(asyncio.TimeoutError())


class _Stream(asyncio.Protocol):
    """A client connection's transport and read buffer in one object, used
    as both ``conn.reader`` and ``conn.writer`` (the subset of
    StreamReader/StreamWriter this module uses).

    Why not asyncio streams (issue 8): every reply wait went through
    StreamReader.read under ``asyncio.timeout`` (a Timeout object, a
    reschedule and a cancel-scope per read, four reads per message), and
    every write through StreamWriter.drain; here a wait is one future (the
    connection's one watchdog timer enforces the stage timeout), and a write
    that the socket takes at once needs no await at all."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._eof = False
        self._lost = False
        self._exception: BaseException | None = None
        self._waiter: asyncio.Future | None = None
        self._paused = False
        self._drain_waiter: asyncio.Future | None = None
        # One watchdog timer per connection rather than one timer per reply
        # wait (issue 8: two waits per message, each a call_later and a
        # cancel): a wait sets its deadline; the armed timer, when it fires
        # early, re-arms itself for the current deadline.
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._deadline: float | None = None
        self._over_ssl = False

    # ---------------------------------------------------------- protocol
    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        self._wake()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        # As StreamReaderProtocol: keep a plain socket half-open (we may still
        # say QUIT); an SSL transport cannot be kept open.
        return not self._over_ssl

    def connection_lost(self, exc) -> None:
        self._eof = self._lost = True
        t = self._timer
        if t is not None:
            self._timer = None
            t.cancel()
        if exc is not None:
            self._exception = exc
        self._wake()
        d = self._drain_waiter
        if d is not None:
            self._drain_waiter = None
            if not d.done():
                d.set_exception(exc or ConnectionResetError("Connection lost"))

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        d = self._drain_waiter
        if d is not None:
            self._drain_waiter = None
            if not d.done():
                d.set_result(None)

    def _wake(self) -> None:
        w = self._waiter
        if w is not None:
            self._waiter = None
            if not w.done():
                w.set_result(None)

    # ---------------------------------------------------------- reading
    def at_eof(self) -> bool:
        return self._eof and not self._buffer

    def data_wait(self, timeout: float | None) -> asyncio.Future | None:
        """None when take() has something to give now; else a future that is
        done when it has, or fails with TimeoutError after ``timeout``.

        A plain future rather than a coroutine: the reply wait is the hottest
        await of a delivery, and awaiting a future directly resumes one frame
        fewer per reply (issue 8)."""
        if self._buffer or self._eof:
            return None
        loop = self._loop
        w = self._waiter = loop.create_future()
        if timeout:
            deadline = self._deadline = loop.time() + timeout
            t = self._timer
            if t is None or self._timer_at > deadline:
                if t is not None:
                    t.cancel()
                self._timer_at = deadline
                self._timer = loop.call_at(deadline, self._watchdog)
        else:
            self._deadline = None
        return w

    def _watchdog(self) -> None:
        self._timer = None
        deadline = self._deadline
        w = self._waiter
        if deadline is None or w is None or w.done():
            return          # no wait with a deadline now: the next one re-arms
        if deadline > self._loop.time():
            self._timer_at = deadline
            self._timer = self._loop.call_at(deadline, self._watchdog)
            return
        _expire_waiter(w)

    def end_wait(self) -> None:
        """After the future of data_wait() is done (or its waiter cancelled)."""
        self._waiter = None
        self._deadline = None

    def take(self) -> bytes:
        """What the server sent so far; b"" at end of file; the connection's
        error once the buffer is empty."""
        if self._buffer:
            data = bytes(self._buffer)
            self._buffer.clear()
            return data
        if self._exception is not None:
            raise self._exception
        return b""

    async def read_some(self, timeout: float | None) -> bytes:
        """take(), waiting up to ``timeout`` for something to come."""
        w = self.data_wait(timeout)
        if w is not None:
            try:
                await w
            finally:
                self.end_wait()
        return self.take()

    async def read(self, n: int = -1) -> bytes:
        return await self.read_some(None)

    # ---------------------------------------------------------- writing
    def write(self, data) -> None:
        self.transport.write(data)

    def check(self) -> None:
        """A lost connection shows up here at the next write (StreamWriter.drain's
        report), before we wait for a reply that cannot come."""
        if self._lost:
            raise self._exception or ConnectionResetError("Connection lost")

    async def drain(self) -> None:
        self.check()
        if self._paused:
            d = self._drain_waiter = self._loop.create_future()
            await d

    def get_extra_info(self, name, default=None):
        return self.transport.get_extra_info(name, default) if self.transport else default

    def is_closing(self) -> bool:
        return self.transport is None or self.transport.is_closing()

    def close(self) -> None:
        t = self._timer
        if t is not None:
            self._timer = None
            t.cancel()
        if self.transport is not None:
            self.transport.close()

    async def start_tls(self, sslcontext, *, server_hostname=None) -> None:
        """STARTTLS (RFC 3207): the TLS layer takes over this transport and
        hands its plaintext to this same protocol."""
        await self.drain()
        transport = await self._loop.start_tls(self.transport, self, sslcontext,
                                               server_hostname=server_hostname)
        self.transport = transport
        self._over_ssl = True


class _Connection:
    """One TCP connection and its engine."""

    def __init__(self, target: Target, reader, writer, engine: SmtpClient, created: float) -> None:
        self.target = target
        self.reader, self.writer = reader, writer
        self.engine = engine
        self.created = created
        self.uses = 0
        self.idle_handle: asyncio.TimerHandle | None = None
        self.idle_since: float | None = None    # loop time it went into the cache
        self.closed = False
        self.queue_id = ""      # the message being delivered (for warnings)
        self.tls_cache_key: tuple | None = None   # where to save this TLS session
        self.quit_sent = False      # no QUIT to send at the end: it went out already
                                    # (pipelined), or Postfix would close without one
        self.dot_aborted = False    # a lone "." ended a transaction without recipients
        self.junk: list[str] = []   # lines that were no reply, before the next reply
        self.read_reply: tuple = (None, None)   # the engine's last reply, as Postfix reads it

    @property
    def namaddr(self) -> str:
        return self.target.namaddr

    @property
    def relay(self) -> str:
        # Asked for every message on a reused connection: format it once.
        got = self.__dict__.get("_relay")
        if got is None:
            got = self.__dict__["_relay"] = self.target.relay
        return got

    async def flush(self, timeout: float) -> None:
        # Asked before every read (several times per message): most of the
        # time there is nothing to send, so do not even copy the buffer.
        if self.engine.pending_output and self.write_pending():
            await self.drain(timeout)

    def write_pending(self) -> bool:
        """Hand what the engine queued to the transport; True when the caller
        must still await drain() (the socket is full, or a foreign writer)."""
        data = self.engine.data_to_send()
        if not data:
            return False
        if data == b".\r\n" and self.engine.state is not State.DONE:
            # The engine's answer to a 354 after no recipient was accepted.
            self.dot_aborted = True
        return self.send_raw(data)

    def send_raw(self, data: bytes) -> bool:
        """write_pending() for bytes of our own (a pipelined QUIT)."""
        w = self.writer
        w.write(data)
        check = getattr(w, "check", None)
        if check is None:
            return True
        check()             # a lost connection is reported now, as drain() would
        return w._paused    # noqa: SLF001 - our own _Stream

    async def drain(self, timeout: float) -> None:
        if self.writer.transport.get_write_buffer_size():
            # The socket did not take it all: wait, bounded, for room.
            async with asyncio.timeout(timeout):
                await self.writer.drain()
        else:
            # Nothing buffered, so drain() cannot block: it only reports a
            # lost connection.  No timer needed (asyncio.wait_for would
            # cost a task per call, several per message).
            await self.writer.drain()

    async def next_event(self, timeout: float):
        engine = self.engine
        while True:
            ev = engine.next_event()
            if ev is not NEED_DATA:
                return ev
            # Replies can make the engine queue commands (HELO fallback, RSET...).
            if engine.pending_output and self.write_pending():
                await self.drain(timeout)
            read_some = getattr(self.reader, "read_some", None)
            if read_some is not None:
                data = await read_some(timeout)
            else:
                async with asyncio.timeout(timeout):
                    data = await self.reader.read(65536)
            engine.receive_data(data)

    def abort(self) -> None:
        self.closed = True
        if self.idle_handle is not None:
            self.idle_handle.cancel()
            self.idle_handle = None
        try:
            self.writer.close()
        except Exception:
            pass

    async def quit(self, timeout: float) -> None:
        if self.closed:
            return
        if self.quit_sent:
            self.abort()
            return
        try:
            self.engine.quit()
            await self.flush(timeout)
        except (OSError, asyncio.TimeoutError):
            pass
        finally:
            self.abort()


@dataclass
class _Settings:
    helo_name: str
    port: int
    connect_timeout: float
    helo_timeout: float
    mail_timeout: float
    rcpt_timeout: float
    data_init_timeout: float
    data_xfer_timeout: float
    data_done_timeout: float
    rset_timeout: float
    quit_timeout: float
    mx_address_limit: int
    mx_session_limit: int
    never_send_ehlo: bool
    skip_5xx_greeting: bool
    skip_quit_response: bool
    line_length_limit: int
    quote_envelope: bool
    use_chunking: bool
    cache_on_demand: bool
    cache_destinations: list[str]
    cache_time_limit: float
    reuse_time_limit: float
    reuse_count_limit: int
    families: tuple[str, ...]
    address_preference: str
    dns_enabled: bool
    native_hosts: bool
    myhostname: str
    disable_mime_output_conversion: bool
    discard_ehlo_keywords: frozenset[str]
    randomize_addresses: bool
    bind_address: str
    bind_address6: str
    bind_address_enforce: bool
    tls_level: str
    tls_policy_maps: list[str]
    tls_loglevel: int
    starttls_timeout: float
    sasl_enable: bool
    sasl_password_maps: list[str]
    sasl_security_options: list[str]
    sasl_tls_security_options: list[str]
    sasl_mechanism_filter: list[str]
    sasl_auth_soft_bounce: bool
    sasl_sender_dependent: bool
    # smtp_host_lookup = dns, native (either order): getaddrinfo() after DNS
    # found no address (Postfix's smtp_addr_one()).
    dns_then_native: bool = False

    @classmethod
    def from_config(cls, cfg, prefix: str = "smtp") -> "_Settings":
        def known(name):
            # lmtp(8) lacks some smtp_* names (never_send_ehlo...): those read as unset.
            return cfg.raw(f"{prefix}_{name}") is not None

        def g(name):
            return cfg.get(f"{prefix}_{name}") if known(name) else ""

        def t(name):
            return cfg.get_time(f"{prefix}_{name}") if known(name) else 0.0

        def b(name):
            return cfg.get_bool(f"{prefix}_{name}") if known(name) else False

        def i(name):
            v = g(name).strip()
            return int(v) if v.isdigit() else 0

        lookup = {w.lower() for w in cfg.get_list(f"{prefix}_host_lookup")}
        no_dns = (cfg.get_bool("disable_dns_lookups")
                  or (g("dns_support_level") or "").lower() == "disabled")
        port_text = g("tcp_port") or prefix
        if port_text.isdigit():
            port = int(port_text)
        else:
            try:
                port = socket.getservbyname(port_text, "tcp")
            except OSError:
                port = 25
        return cls(
            helo_name=(g("lhlo_name") if prefix == "lmtp" else g("helo_name"))
            or cfg.get("myhostname") or socket.getfqdn(),
            port=port,
            connect_timeout=t("connect_timeout"),
            helo_timeout=t("lhlo_timeout" if prefix == "lmtp" else "helo_timeout"),
            mail_timeout=t("mail_timeout"), rcpt_timeout=t("rcpt_timeout"),
            data_init_timeout=t("data_init_timeout"), data_xfer_timeout=t("data_xfer_timeout"),
            data_done_timeout=t("data_done_timeout"), rset_timeout=t("rset_timeout"),
            quit_timeout=t("quit_timeout"),
            mx_address_limit=i("mx_address_limit"), mx_session_limit=i("mx_session_limit"),
            never_send_ehlo=b("never_send_ehlo"), skip_5xx_greeting=b("skip_5xx_greeting"),
            skip_quit_response=b("skip_quit_response"),
            line_length_limit=i("line_length_limit"),
            quote_envelope=b("quote_rfc821_envelope"),
            use_chunking=cfg.get_bool("postwell_smtp_use_chunking"),
            cache_on_demand=b("connection_cache_on_demand"),
            cache_destinations=cfg.get_list(f"{prefix}_connection_cache_destinations"),
            cache_time_limit=t("connection_cache_time_limit"),
            reuse_time_limit=t("connection_reuse_time_limit"),
            reuse_count_limit=i("connection_reuse_count_limit"),
            families=families_from_inet_protocols(cfg.get("inet_protocols")),
            address_preference=(g("address_preference") or "any").lower(),
            dns_enabled=not cfg.get_bool("disable_dns_lookups")
            and (g("dns_support_level") or "").lower() != "disabled",
            native_hosts=no_dns or ("native" in lookup and "dns" not in lookup),
            dns_then_native=not no_dns and {"dns", "native"} <= lookup,
            myhostname=cfg.get("myhostname"),
            disable_mime_output_conversion=cfg.get_bool("disable_mime_output_conversion"),
            discard_ehlo_keywords=frozenset(
                w.upper() for w in split_table_list(
                    g("discard_lhlo_keywords" if prefix == "lmtp" else "discard_ehlo_keywords"))),
            randomize_addresses=b("randomize_addresses"),
            bind_address=g("bind_address").strip(),
            bind_address6=g("bind_address6").strip(),
            bind_address_enforce=b("bind_address_enforce"),
            tls_level=tls_level_from_config(cfg, prefix),
            tls_policy_maps=split_table_list(g("tls_policy_maps")),
            tls_loglevel=i("tls_loglevel"),
            starttls_timeout=t("starttls_timeout"),
            sasl_enable=b("sasl_auth_enable"),
            sasl_password_maps=split_table_list(g("sasl_password_maps")),
            sasl_security_options=[w.lower() for w in
                                   cfg.get_list(f"{prefix}_sasl_security_options")],
            sasl_tls_security_options=[w.lower() for w in
                                       cfg.get_list(f"{prefix}_sasl_tls_security_options")],
            sasl_mechanism_filter=[w.upper() for w in
                                   cfg.get_list(f"{prefix}_sasl_mechanism_filter")],
            sasl_auth_soft_bounce=b("sasl_auth_soft_bounce"),
            sasl_sender_dependent=b("sender_dependent_authentication"),
        )


class SmtpDeliveryAgent(DeliveryAgent):
    """The smtp(8) delivery agent (also serves the "relay" transport)."""

    name = "smtp"
    protocol = "smtp"       # "lmtp": LHLO, per-recipient final replies, no MX lookups

    def __init__(self, config, resolver=None, log=None, *, clock=time.time,
                 monotonic=time.monotonic, rng: random.Random | None = None,
                 own_addresses: frozenset[str] | None = None) -> None:
        self.config = config
        self.log = log
        self.clock = clock
        self.monotonic = monotonic
        self.settings = _Settings.from_config(config, self.protocol)
        self.resolver = resolver if resolver is not None else DnsPythonResolver.from_config(config)
        self.rng = rng or random.Random()
        self._own = own_addresses
        self._native = NativeResolver()
        self._tasks: set[asyncio.Task] = set()
        self._tls_contexts: dict[str, ssl.SSLContext] = {}
        self._tls_sessions: TlsSessionCache | None | bool = False   # False: not set up yet
        self._tls_start_lock: asyncio.Lock | None = None
        self._sasl_maps = None
        self._tls_policy_maps = None
        # destination key -> idle connections (LIFO)
        self._cache: dict[str, list[_Connection]] = {}
        self._cache_keys: dict[tuple, str] = {}     # (transport, nexthop) -> key
        # (ip, port) -> (ip, port) actually dialled: lets tests send "port 25" of
        # several MX hosts to scripted servers on loopback ports.  None: as given.
        self.route = None

    # ------------------------------------------------------------ helpers

    @property
    def own_addresses(self) -> frozenset[str]:
        if self._own is None:
            self._own = own_addresses_from_config(self.config)
        return self._own

    def _info(self, text: str) -> None:
        if self.log is not None:
            self.log.info(text)

    def _warning(self, text: str) -> None:
        if self.log is not None:
            self.log.warning(text)

    def _address_resolver(self):
        """Who answers the A/AAAA questions (smtp_host_lookup); None: the MX resolver."""
        if self.settings.dns_then_native:
            return DnsThenNative(self.resolver, self._native)
        return self._native if self.settings.native_hosts else None

    def _timeout_for(self, state: State) -> float:
        # Called several times per message: a fixed table of setting names,
        # read from the live settings (tests change them).
        return getattr(self.settings, _STAGE_TIMEOUTS.get(state, "helo_timeout")) or 300.0

    @staticmethod
    def _envelope(request) -> Envelope:
        attrs = getattr(request, "attributes", None) or {}
        listed = request.recipients
        # One recipient is the common case: no generator for it (issue 8).
        rcpts = ((_env_recipient(listed[0]),) if len(listed) == 1
                 else tuple(map(_env_recipient, listed)))
        body = attrs.get("body") or attrs.get("body_type")
        if attrs.get("encoding") == "8bit":
            # Cleanup found a Content-Transfer-Encoding of 8bit/binary: Postfix's
            # smtp client then says BODY=8BITMIME whatever the client's BODY= was.
            body = "8BITMIME"
        # SIZE= and "message size N exceeds size limit" give Postfix's message size
        # (the qmgr's size=), which cleanup recorded; older files: the content length.
        try:
            size = int(attrs.get("postwell_size") or 0)
        except ValueError:
            size = 0
        utf8 = attrs.get("smtputf8")
        return Envelope(request.sender, rcpts,
                        size or getattr(request, "content_size", None) or 0,
                        body.upper() if body else None,
                        bool(utf8) and str(utf8).lower() in ("1", "yes", "true"),
                        attrs.get("ret") or None, attrs.get("envid") or None)

    @staticmethod
    def _content_chunks(request):
        opener = getattr(request, "open_content", None)
        if opener is not None:
            return opener()
        return request.iter_content()

    # ------------------------------------------------------------ cache

    def _cache_key(self, request) -> str:
        transport, nexthop = getattr(request, "transport", "smtp"), request.nexthop
        try:
            return self._cache_keys[transport, nexthop]
        except KeyError:
            key = f"{transport}:{nexthop}".lower()
            if len(self._cache_keys) >= 1000:      # bounded: many destinations
                self._cache_keys.clear()
            self._cache_keys[transport, nexthop] = key
            return key

    def _caching_wanted(self, request) -> bool:
        s = self.settings
        if s.sasl_enable and s.sasl_sender_dependent:
            # postconf(5): sender-dependent authentication disables connection
            # caching, so that every sender's mail goes with its own credentials.
            return False
        return s.cache_on_demand or request.nexthop in s.cache_destinations

    def _take_cached(self, key: str) -> _Connection | None:
        conns = self._cache.get(key)
        while conns:
            conn = conns.pop()
            # Its idle timer stays armed (see _put_cached): it finds the
            # connection busy and lets it be.
            conn.idle_since = None
            if conn.closed or conn.reader.at_eof() or not self._reusable(conn):
                self._background(conn.quit(self.settings.quit_timeout))
                continue
            return conn
        return None

    def _reusable(self, conn: _Connection) -> bool:
        if conn.closed or not conn.engine.usable:
            return False
        return self._reuse_left(conn)

    def _reuse_left(self, conn: _Connection) -> bool:
        """Within smtp_connection_reuse_time_limit and _count_limit (Postfix's
        THIS_SESSION_IS_EXPIRED, the other way round)."""
        s = self.settings
        if s.reuse_time_limit and self.monotonic() - conn.created >= s.reuse_time_limit:
            return False
        # "With a reuse count limit of N, a connection is used up to N+1 times."
        if s.reuse_count_limit and conn.uses > s.reuse_count_limit:
            return False
        return True

    def _put_cached(self, key: str, conn: _Connection) -> None:
        self._cache.setdefault(key, []).append(conn)
        # The stream's loop is the running one (get_running_loop() costs a getpid()).
        reader = conn.reader
        loop = reader._loop if isinstance(reader, _Stream) else asyncio.get_running_loop()
        conn.idle_since = loop.time()
        if conn.idle_handle is not None:
            # Issue 8: a connection goes back to the cache after every message;
            # rather than a new timer each time (and a cancel at each take),
            # the one armed at the first put checks, when it fires, how long
            # the connection has really been idle, and waits on if needed.
            return
        limit = max(self.settings.cache_time_limit, 0.0)

        def expire():
            conn.idle_handle = None
            if conn.closed or conn.idle_since is None:
                return              # busy: the next _put_cached arms a new timer
            left = conn.idle_since + limit - loop.time()
            if left > 0:
                conn.idle_handle = loop.call_later(left, expire)
                return
            conns = self._cache.get(key, [])
            if conn in conns:
                conns.remove(conn)
            self._background(conn.quit(self.settings.quit_timeout))

        conn.idle_handle = loop.call_later(limit, expire)

    def _background(self, coro) -> None:
        # Keep a reference: the loop holds tasks only weakly.
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close_all(self) -> None:
        """QUIT every cached connection (qmgr shutdown)."""
        conns = [c for cs in self._cache.values() for c in cs]
        self._cache.clear()
        for c in conns:
            await c.quit(self.settings.quit_timeout)
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=self.settings.quit_timeout or 1)

    def close(self) -> None:
        for cs in self._cache.values():
            for c in cs:
                c.abort()
        self._cache.clear()

    # ------------------------------------------------------------ delivery

    async def deliver(self, request) -> list[RecipientResult]:
        recipients = list(request.recipients)
        if not recipients:
            return []
        queue_id = getattr(request, "queue_id", "") or ""
        if not (request.nexthop or "").strip():
            # No explicit next hop: the recipient domain, as trivial-rewrite would say.
            request.nexthop = recipients[0].address.rpartition("@")[2] or "localhost"
        results: dict[int, RecipientResult] = {}
        # RCPT TO order: Postfix's qmgr hands recipients over sorted
        # (qmgr_message_sort: domain without case, then the address byte-wise).
        pending = list(range(len(recipients)))
        if len(recipients) > 1:
            pending.sort(key=lambda i: _rcpt_order(recipients[i].address))
        key = self._cache_key(request)
        last: _SessionFailure | None = None

        def left() -> list[int]:
            return [i for i in pending if i not in results]

        # 1. A cached connection to the same destination first.
        conn = self._take_cached(key)
        if conn is not None:
            conn.queue_id = queue_id
            try:
                soft = await self._transaction(conn, request, recipients, pending, results,
                                               final=False)
            except _SessionFailure as f:
                conn.abort()
                if not f.before_mail:
                    last = f
            else:
                last = soft or last
                self._finish_connection(key, request, conn)
            pending = left()
            if not pending:
                return [results[i] for i in range(len(recipients))]

        # 2. Fresh connections along the MX list (RFC 5321 5.1).
        try:
            nexthop = request.nexthop
            targets = None
            if self.protocol == "lmtp":
                nexthop, targets = self._lmtp_nexthop(nexthop)
            targets = targets or await resolve_destination(
                self.resolver, nexthop, rng=self.rng, families=self.settings.families,
                own_addresses=self.own_addresses, address_limit=self.settings.mx_address_limit,
                address_preference=self.settings.address_preference,
                default_port=self.settings.port, dns_enabled=self.settings.dns_enabled,
                address_resolver=self._address_resolver(),
                randomize=self.settings.randomize_addresses, warn=self._warning)
        except DestinationError as e:
            if self.protocol == "smtp":
                # smtp_connect.c: a hard failure of $relayhost is a configuration
                # problem; the mail waits (4.3.5) instead of bouncing.
                problem = relayhost_problem(e, request.nexthop, self.config.get("relayhost") or "")
                if problem is not None:
                    e, warning = problem
                    self._warning(warning)
            status = "bounced" if e.permanent else "deferred"
            for i in pending:
                results[i] = RecipientResult(recipients[i], status, e.dsn, e.reason, "none")
            return [results[i] for i in range(len(recipients))]

        session_limit = self.settings.mx_session_limit
        sessions = 0
        utf8_memo: list[bool] = []

        def needs_utf8() -> bool:
            if not utf8_memo:
                utf8_memo.append(self._requires_smtputf8(request))
            return utf8_memo[0]
        nexthop_host = parse_nexthop(request.nexthop).host
        policy_level, tls_match = self._tls_policy(request.nexthop)
        if policy_level is None:
            policy_level = self.settings.tls_level
        work = [(t, policy_level) for t in targets]
        while work:
            target, tls_level = work.pop(0)
            last_target = not work
            try:
                conn = await self._connect(target)
            except _SessionFailure as f:
                last = f
                if not last_target:
                    self._info(f.reason)    # Postfix logs these without the queue id
                continue
            conn.queue_id = queue_id
            try:
                await self._handshake(conn, best=target.best, nexthop=nexthop_host,
                                      tls_level=tls_level, tls_match=tls_match,
                                      utf8=needs_utf8)
                if self.settings.sasl_enable:
                    await self._authenticate(conn, request)
                sessions += 1
                final = last_target or bool(session_limit and sessions >= session_limit)
                soft = await self._transaction(conn, request, recipients, pending, results,
                                               final=final)
            except _SessionFailure as f:
                last = f
                if not conn.closed:
                    await conn.quit(self.settings.quit_timeout)
                conn.abort()
                pending = left()
                if f.tls_fallback and tls_level == "may":
                    # Opportunistic TLS failed: same server again in plain text.
                    self._info(f"{queue_id}: {f.reason}; retrying {target.relay} without TLS")
                    work.insert(0, (target, "none"))
                    continue
                if f.permanent:
                    for i in pending:
                        results[i] = RecipientResult(recipients[i], "bounced", f.dsn, f.reason,
                                                     f.relay)
                    pending = []
                    break
                if not last_target and pending:
                    self._info(f"{queue_id}: {f.reason}" if queue_id else f.reason)
                if session_limit and sessions >= session_limit:
                    break
                continue
            last = soft or last
            self._finish_connection(key, request, conn)
            pending = left()
            if not pending or final:
                break

        for i in left():
            if last is None:
                last = _SessionFailure("4.4.1", "delivery temporarily suspended: no server to try")
            results[i] = RecipientResult(recipients[i], "deferred", _soft(last.dsn), last.reason,
                                         last.relay)
            if last.conn_setup_done is not None:
                results[i].conn_setup_done = last.conn_setup_done
        return [results[i] for i in range(len(recipients))]

    def _lmtp_nexthop(self, nexthop: str) -> tuple[str, list[Target] | None]:
        """LMTP next hops (lmtp(8)): unix:/path (a relative path lives under the queue
        directory), inet:host:port, [host]:port or host; never an MX lookup.
        Returns the nexthop to resolve, or the UNIX-domain target itself."""
        hop = nexthop.strip()
        if hop.lower().startswith("unix:"):
            shown = hop[5:]
            path = shown if shown.startswith("/") else \
                os.path.join(self.config.get("queue_directory"), shown)
            return hop, [UnixTarget(self.settings.myhostname or "localhost", shown, 0, path=path)]
        if hop.lower().startswith("inet:"):
            hop = hop[5:]
        if not hop.startswith("["):
            host, sep, port = hop.partition(":")
            hop = f"[{host}]" + (f":{port}" if sep else "")
        return hop, None

    def _finish_connection(self, key: str, request, conn: _Connection) -> None:
        if self._caching_wanted(request) and self._reusable(conn):
            self._put_cached(key, conn)
        else:
            self._background(conn.quit(self.settings.quit_timeout))

    async def _open(self, target: Target):
        s = self.settings
        timeout = s.connect_timeout or None      # lmtp_connect_timeout = 0: no limit
        loop = asyncio.get_running_loop()

        def stream():
            return _Stream(loop)

        async def opened(connecting):
            _, proto = await asyncio.wait_for(connecting, timeout)
            return proto, proto          # reader and writer in one (see _Stream)
        if isinstance(target, UnixTarget):
            return await opened(loop.create_unix_connection(stream, target.path))
        ip, port = (target.ip, target.port) if self.route is None else self.route(target.ip, target.port)

        def connect(**kw):
            return opened(loop.create_connection(stream, ip, port, **kw))
        bind = s.bind_address6 if ":" in target.ip else s.bind_address
        if bind:
            try:
                return await connect(local_addr=(bind, 0))
            except OSError as e:
                if e.errno != errno.EADDRNOTAVAIL or s.bind_address_enforce:
                    raise
                # smtp_bind_address_enforce = no: warn and connect from any address.
                self._warning(f"smtp_connect_addr: bind {bind}: {os.strerror(e.errno)}")
        return await connect()

    async def _connect(self, target: Target) -> _Connection:
        s = self.settings
        # Postfix: "connect to host[private/dovecot-lmtp]: ..." for UNIX sockets.
        where = (f"connect to {target.namaddr}" if isinstance(target, UnixTarget)
                 else f"connect to {target.namaddr}:{target.port}")
        try:
            reader, writer = await self._open(target)
        except asyncio.TimeoutError:
            raise _SessionFailure("4.4.1", f"{where}: Connection timed out") from None
        except OSError as e:
            # No session yet: Postfix logs relay=none for connect failures.
            text = os.strerror(e.errno) if e.errno else str(e)
            raise _SessionFailure("4.4.1", f"{where}: {text}") from None
        engine_class = SmtpClient if self.protocol == "lmtp" else _PostfixClient
        engine = engine_class(s.helo_name, never_send_ehlo=s.never_send_ehlo,
                            use_chunking=s.use_chunking, line_length_limit=s.line_length_limit,
                            quote_envelope=s.quote_envelope, skip_quit_response=s.skip_quit_response,
                            discard_ehlo_keywords=s.discard_ehlo_keywords,
                            lmtp=self.protocol == "lmtp")
        return _Connection(target, reader, writer, engine, self.monotonic())

    @staticmethod
    def _fail(dsn: str, reason: str, target: Target, **kw) -> _SessionFailure:
        fallback = kw.pop("tls_fallback", False)
        f = _SessionFailure(dsn, reason, relay=target.relay, **kw)
        f.tls_fallback = fallback
        return f

    async def _event(self, conn: _Connection):
        """Next engine event, with the stage's timeout; I/O trouble becomes a site failure."""
        engine = conn.engine
        while True:
            try:
                if engine.pending_output and conn.write_pending():
                    await conn.drain(self._timeout_for(engine.state))
                ev = engine.next_event()
                if ev is NEED_DATA:
                    timeout = self._timeout_for(engine.state)    # flush() leaves the state as is
                    stream = conn.reader
                    if isinstance(stream, _Stream):
                        # _Connection.next_event() inlined for our own stream: each
                        # reply wait resumes two coroutine frames fewer (issue 8).
                        while ev is NEED_DATA:
                            # Replies can make the engine queue commands (HELO fallback, RSET...).
                            if engine.pending_output and conn.write_pending():
                                await conn.drain(timeout)
                            w = stream.data_wait(timeout)
                            if w is not None:
                                try:
                                    await w
                                finally:
                                    stream.end_wait()
                            engine.receive_data(stream.take())
                            ev = engine.next_event()
                    else:
                        ev = await conn.next_event(timeout)
            except asyncio.TimeoutError:
                conn.abort()
                raise self._fail("4.4.2", f"conversation with {conn.namaddr} timed out while "
                                 f"{conn.engine.stage}", conn.target) from None
            except OSError:
                conn.abort()
                raise self._fail("4.4.2", f"lost connection with {conn.namaddr} while "
                                 f"{conn.engine.stage}", conn.target) from None
            ev = self._vet(conn, ev)
            if ev is not None:
                return ev

    def _ready(self, conn: _Connection):
        """The engine's next event when it is already at hand (nothing to send
        first, nothing to wait for), vetted as _event() vets it; None means
        await _event().  Issue 8: the MAIL, RCPT and DATA replies come in one
        read, so two of a message's four events are taken without a coroutine."""
        engine = conn.engine
        if engine.pending_output:
            return None
        ev = engine.next_event()
        if ev is NEED_DATA:
            return None
        return self._vet(conn, ev)

    def _vet(self, conn: _Connection, ev):
        """An engine event as Postfix's smtp(8) takes it: a closed connection or
        a malformed reply is a site failure; a line that is no reply is kept
        for the reply that follows (None: read on); a reply's text is what
        smtp_chat_resp() keeps of it."""
        if isinstance(ev, ConnectionClosed):
            conn.abort()
            raise self._fail("4.4.2", f"lost connection with {conn.namaddr} while {ev.stage}",
                             conn.target)
        if isinstance(ev, IgnoredLine):
            if ev.pipelining:
                qid = f"{conn.queue_id}: " if conn.queue_id else ""
                self._warning(f"{qid}non-ESMTP response from {conn.target.relay}: {ev.text}")
                self._warning("to prevent loss of mail, turn off command pipelining for "
                              f"{conn.target.ip} with the smtp_discard_ehlo_keyword_address_maps "
                              "parameter")
            if len(conn.junk) < 20:
                # smtp_chat_resp(): such a line is read as one more line of the
                # reply that follows, and quoted with it.
                conn.junk.append(ev.text)
            return None
        reply = getattr(ev, "reply", None)
        raw = getattr(reply, "raw", None)
        if raw and (conn.junk or "\n" in raw or len(raw) >= _REPLY_TEXT_LIMIT
                    or not (raw.isascii() and raw.isprintable())):
            if reply is conn.read_reply[0]:
                # The engine hands a reply on again (TransactionFailed after the
                # RCPT refusals): Postfix read it once.
                ev = dataclasses.replace(ev, reply=conn.read_reply[1])
            else:
                ev = self._as_postfix_reads(conn, ev, reply, raw)
                conn.read_reply = (reply, ev.reply)
        elif conn.junk:
            conn.junk = []
        if isinstance(ev, ProtocolError):
            conn.abort()
            self._warning(f"{conn.namaddr}: {ev.detail}")
            raise self._fail("4.5.0", f"conversation with {conn.namaddr} failed while {ev.stage}: "
                             "malformed server reply", conn.target)
        return ev

    def _as_postfix_reads(self, conn: _Connection, ev, reply, raw: str):
        """The reply's text as Postfix's smtp_chat_resp() keeps it for logs and
        notices: lines that were no reply first, lines kept only while the text
        is shorter than line_length_limit (2048), characters that are not
        printable (ASCII controls, TAB, undecodable bytes) as "?"; with
        Postfix's warnings for over-long lines and replies."""
        lines = [*conn.junk, *raw.split("\n")]
        conn.junk = []
        where = f"{conn.target.namaddr}:{conn.target.port}"
        kept: list[str] = []
        size = 0
        for line in lines:
            if len(line) >= _REPLY_TEXT_LIMIT:       # the engine cut it there
                self._warning(f"{where}: response longer than {_REPLY_TEXT_LIMIT}: "
                              f"{line[:30]}...")
            if size < _REPLY_TEXT_LIMIT:
                size += len(line) + (1 if kept else 0)
                kept.append(line)
        text = "\n".join(kept)
        if len(kept) < len(lines):
            self._warning(f"{where}: multi-line response longer than {_REPLY_TEXT_LIMIT} "
                          f"{text[:30]}...")
        text = _UNPRINTABLE.sub("?", text)
        if text == raw:
            return ev
        return dataclasses.replace(ev, reply=dataclasses.replace(reply, raw=text))

    def _requires_smtputf8(self, request) -> bool:
        """RFC 6531 3.2: mail submitted with SMTPUTF8 whose envelope or header is
        UTF-8 can only go to a server with SMTPUTF8 (asked once per delivery)."""
        env = self._envelope(request)
        return env.smtputf8 and (needs_smtputf8(env) or self._content_has_utf8(request))

    async def _handshake(self, conn: _Connection, best: bool, nexthop: str,
                         tls_level: str = "none", tls_match: list[str] | None = None,
                         utf8=None) -> None:
        s = self.settings
        # Postfix detects loops only on the SMTP port (smtp_connect.c).
        loop_detect = conn.target.port == 25 and self.protocol == "smtp"
        while True:
            ev = await self._event(conn)
            if isinstance(ev, Greeting):
                first = ev.reply.text.split("\n")[0].split(" ", 1)[0]
                if ev.reply.code == 220 and loop_detect and self._is_myself(first):
                    self._warning(f"host {conn.target.relay} greeted me with my own hostname "
                                  f"{s.myhostname}")
                continue
            if isinstance(ev, Rejected):
                dsn = _dsn_of(ev.reply)
                reason = f"host {conn.namaddr} refused to talk to me: {_one_line(ev.reply)}"
                permanent = ev.reply.code // 100 == 5 and not (
                    ev.stage == "greeting" and s.skip_5xx_greeting)
                raise self._fail(dsn if permanent else _soft(dsn), reason, conn.target,
                                 permanent=permanent)
            if isinstance(ev, HelloDone):
                for line in ev.reply.text.split("\n")[1:]:
                    words = _EHLO_WORDS.split(line.strip(), 2)
                    if len(words) > 1 and words[0].upper() == "SIZE" and not words[1].isdigit():
                        self._warning(f'bad EHLO SIZE limit "{words[1]}" from '
                                      f"{conn.namaddr}:{conn.target.port}")
                ext = conn.engine.extensions
                if (utf8 is not None and self.protocol == "smtp" and not ext.smtputf8
                        and utf8()):
                    # smtp_helo() (Postfix's "Fix 20140706"): right after EHLO, before
                    # STARTTLS or AUTH; the message bounces, the session says QUIT.
                    raise self._fail("5.6.7", "SMTPUTF8 is required, but was not offered "
                                     f"by host {conn.namaddr}", conn.target, permanent=True)
                if ext.smtputf8 and not ext.eightbitmime:
                    # Postfix's smtp_helo(): a server that takes UTF-8 mail takes 8-bit
                    # mail too (RFC 6531 3.1 needs 8BITMIME), whatever it announced.
                    self._info(f"host {conn.namaddr} offers SMTPUTF8 support, but not 8BITMIME")
                    conn.engine.extensions = dataclasses.replace(
                        ext, keywords=ext.keywords | {"8BITMIME"})
                if conn.tls_cache_key is not None:
                    # By the reply to the EHLO after STARTTLS the server's TLS 1.3
                    # session tickets have arrived: the session is resumable now.
                    self._save_tls_session(conn)
                first = ev.reply.text.split("\n")[0].split(" ", 1)[0]
                if loop_detect and self._is_myself(first):
                    self._warning(f"host {conn.target.relay} replied to HELO/EHLO with my own "
                                  f"hostname {s.myhostname}")
                    raise self._loop(conn, best, nexthop)
                if tls_level == "none" or conn.engine.tls:
                    return
                if conn.engine.extensions.starttls:
                    conn.engine.starttls()
                    continue
                if tls_level != "may":
                    # Never fall back to plain text when TLS is mandatory.
                    raise self._fail("4.7.4", "TLS is required, but was not offered by host "
                                     f"{conn.namaddr}", conn.target)
                return
            if isinstance(ev, TlsRefused):
                if tls_level != "may" or not conn.engine.usable:
                    raise self._fail(_soft(_dsn_of(ev.reply)) if ev.reply.code != 421 else "4.7.0",
                                     f"TLS is required, but host {conn.namaddr} refused to start "
                                     f"TLS: {_one_line(ev.reply)}" if tls_level != "may" else
                                     f"host {conn.namaddr} refused to talk to me: "
                                     f"{_one_line(ev.reply)}", conn.target)
                return          # RFC 3207 4: go on without TLS
            if isinstance(ev, TlsWanted):
                await self._start_tls(conn, tls_level, nexthop, tls_match)
                conn.engine.tls_established()
                continue

    async def _start_tls(self, conn: _Connection, level: str, nexthop: str,
                         match: list[str] | None = None) -> None:
        """The TLS handshake after 220 to STARTTLS (RFC 3207), per smtp_tls_security_level."""
        s = self.settings
        if conn.reader._buffer:    # noqa: SLF001 - plaintext read ahead after the 220
            raise self._fail("4.7.5", "Cannot start TLS: handshake failure", conn.target,
                             tls_fallback=level == "may")
        ctx = self._tls_context(level)
        server_name = None if _is_ip(conn.target.host) else conn.target.host
        cache = self._tls_session_cache()
        key = None
        if cache is not None:
            key = (level, nexthop, conn.target.host, conn.target.ip, conn.target.port,
                   tuple(match or ()), id(ctx))
        try:
            await asyncio.wait_for(
                self._start_tls_with_session(conn, ctx, server_name,
                                             cache.get(key) if cache is not None else None),
                s.starttls_timeout or 300.0)
        except (ssl.SSLError, OSError, asyncio.TimeoutError, ConnectionError) as e:
            conn.abort()
            if cache is not None:
                cache.drop(key)     # never offer a session that a failed handshake used
            self._info(f"SSL_connect error to {conn.target.relay}: {e}")
            raise self._fail("4.7.5", "Cannot start TLS: handshake failure", conn.target,
                             tls_fallback=level == "may") from None
        sslobj = conn.writer.get_extra_info("ssl_object")
        if cache is not None:
            conn.tls_cache_key = key
            if sslobj.session_reused and s.tls_loglevel >= 2:
                self._info(f"{conn.target.relay}: Reusing old session")
        trust = "Untrusted"
        if level in ("verify", "secure", "dane-only"):
            if match is None:
                param = f"{self.protocol}_tls_secure_cert_match" if level == "secure" else \
                    f"{self.protocol}_tls_verify_cert_match"
                match = self.config.get_list(param) or ["hostname"]
            names = []
            for m in match:
                m = m.lower()
                names.append({"hostname": conn.target.host, "nexthop": nexthop,
                              "dot-nexthop": "." + nexthop}.get(m, m))
            if not _cert_matches(sslobj.getpeercert(), names):
                conn.abort()
                conn.tls_cache_key = None
                raise self._fail("4.7.5", "Server certificate not verified", conn.target)
            trust = "Verified"
        elif level == "fingerprint":
            der = sslobj.getpeercert(binary_form=True) or b""
            algo = (self.config.get(f"{self.protocol}_tls_fingerprint_digest") or "sha256").lower()
            digest = hashlib.new(algo, der).hexdigest().upper()
            wanted = {w.replace(":", "").upper() for w in
                      (match or self.config.get_list(f"{self.protocol}_tls_fingerprint_cert_match"))}
            if digest not in wanted:
                conn.abort()
                conn.tls_cache_key = None
                raise self._fail("4.7.5", "Server certificate not verified", conn.target)
            trust = "Verified"
        if s.tls_loglevel >= 1:
            cipher = sslobj.cipher() or ("", "", 0)
            self._info(f"{trust} TLS connection established to {conn.target.relay}: "
                       f"{sslobj.version()} with cipher {cipher[0]} ({cipher[2]}/{cipher[2]} bits)"
                       f"{tls_handshake_details(sslobj)}")

    def _tls_policy(self, nexthop: str) -> tuple[str | None, list[str] | None]:
        """smtp_tls_policy_maps: the next hop as written, then (for a bare domain)
        its parent domains with a leading dot.  Returns (level, match) or (None, None)."""
        specs = self.settings.tls_policy_maps
        if not specs:
            return None, None
        if self._tls_policy_maps is None:
            from .base import MapList
            try:
                self._tls_policy_maps = MapList(specs, self.config)
            except Exception as e:
                self._warning(f"smtp_tls_policy_maps: {e}")
                return "encrypt", None      # fail safe: never downgrade to plain text
        keys = [nexthop]
        bare = nexthop
        if bare.lower().startswith(("smtp:", "relay:")):
            bare = bare.split(":", 1)[1]
            keys.append(bare)
        if not bare.startswith("[") and ":" not in bare:
            labels = bare.split(".")
            keys += ["." + ".".join(labels[i:]) for i in range(1, len(labels))]
        for key in keys:
            try:
                value = self._tls_policy_maps.lookup(key)
            except Exception as e:
                self._warning(f"smtp_tls_policy_maps lookup for {key}: {e}")
                return "encrypt", None
            if value is None:
                continue
            words = value.split()
            if not words:
                continue
            level = {"dane": "may"}.get(words[0].lower(), words[0].lower())
            match = None
            for w in words[1:]:
                name, _, val = w.partition("=")
                if name.lower() == "match":
                    match = [m for m in val.replace("|", ":").split(":") if m] \
                        if level != "fingerprint" else [m for m in val.split("|") if m]
            return level, match
        return None, None

    def _sasl_credentials(self, conn: _Connection, request) -> tuple[str, str] | None:
        """smtp_sasl_password_maps: sender (when sender-dependent), the remote host
        name, then the next-hop destination as written ("[relay]:587")."""
        s = self.settings
        if self._sasl_maps is None:
            from .base import MapList
            try:
                self._sasl_maps = MapList(s.sasl_password_maps, self.config)
            except Exception as e:      # a broken table must defer, not crash the agent
                raise self._fail("4.3.0", f"smtp_sasl_password_maps: {e}", conn.target) from None
        keys = []
        sender = request.sender or ""
        if s.sasl_sender_dependent and sender:
            keys += [sender, "@" + sender.rpartition("@")[2]]
        keys += [conn.target.host, request.nexthop]
        for key in keys:
            try:
                value = self._sasl_maps.lookup(key)
            except Exception as e:      # a broken table must defer, not crash the agent
                raise self._fail("4.3.0", f"smtp_sasl_password_maps lookup error: {e}",
                                 conn.target) from None
            if value is not None:
                user, _, password = value.partition(":")
                return user, password
        return None

    def _sasl_mechanisms(self, conn: _Connection) -> list[str]:
        s = self.settings
        options = s.sasl_tls_security_options if conn.engine.tls else s.sasl_security_options
        offered = list(conn.engine.extensions.auth)
        if s.sasl_mechanism_filter:
            offered = [m for m in offered if m in s.sasl_mechanism_filter]
        # Cyrus SASL's choice among what postwell speaks: CRAM-MD5 (no password
        # on the wire) before the plaintext ones.
        usable = [m for m in ("CRAM-MD5", "PLAIN", "LOGIN") if m in offered]
        if "noplaintext" in options:
            usable = [m for m in usable if m not in ("PLAIN", "LOGIN")]
        if "nodictionary" in options:
            usable = [m for m in usable if m != "CRAM-MD5"]   # RFC 2195 4
        return usable

    async def _authenticate(self, conn: _Connection, request) -> None:
        """SASL client authentication (RFC 4954) with CRAM-MD5, PLAIN or LOGIN."""
        s = self.settings
        if not conn.engine.extensions.auth or conn.engine.authenticated:
            return
        creds = self._sasl_credentials(conn, request)
        if creds is None:
            return               # Postfix: no entry, no AUTH
        mechs = self._sasl_mechanisms(conn)
        if not mechs:
            raise self._fail("4.7.0", "SASL authentication failed; cannot authenticate to server "
                             f"{conn.namaddr}: no mechanism available", conn.target)
        user, password = (c.encode("utf-8") for c in creds)
        cram = None
        if mechs[0] == "CRAM-MD5":
            conn.engine.auth("CRAM-MD5")
            answers = []
            cram = (user, password)
        elif mechs[0] == "PLAIN":
            conn.engine.auth("PLAIN", b"\0" + user + b"\0" + password)   # RFC 4616 2
            answers = []
        else:
            conn.engine.auth("LOGIN")
            answers = [user, password]
        while True:
            ev = await self._event(conn)
            if isinstance(ev, AuthChallenge):
                if cram is not None:
                    # RFC 2195 2: the user name, a space, the keyed MD5 of the challenge
                    digest = hmac.new(cram[1], ev.challenge, hashlib.md5).hexdigest()
                    conn.engine.auth_response(cram[0] + b" " + digest.encode("ascii"))
                    cram = None
                    continue
                conn.engine.auth_response(answers.pop(0) if answers else None)
                continue
            if isinstance(ev, AuthDone):
                if ev.ok:
                    return
                dsn = _dsn_of(ev.reply)
                if s.sasl_auth_soft_bounce:
                    dsn = _soft(dsn)
                # smtp_sasl_authenticate() quotes the reply as printable() leaves
                # it: the line breaks of a multi-line reply become "?".
                text = getattr(ev.reply, "raw", "") or _one_line(ev.reply)
                raise self._fail(dsn, f"SASL authentication failed; server {conn.namaddr} said: "
                                 f"{text.replace(chr(10), '?')}", conn.target,
                                 permanent=dsn.startswith("5"))

    def _tls_session_cache(self) -> TlsSessionCache | None:
        """The session cache when smtp_tls_session_cache_database is set (any
        value: postwell keeps the sessions in memory, see TlsSessionCache)."""
        if self._tls_sessions is False:
            cache = None
            try:
                if self.config.get(f"{self.protocol}_tls_session_cache_database").strip():
                    timeout = self.config.get_time(f"{self.protocol}_tls_session_cache_timeout")
                    if timeout > 0:
                        cache = TlsSessionCache(timeout, clock=self.monotonic)
            except Exception as e:  # noqa: BLE001 - a bad value: warn once, no cache
                self._warning(f"{self.protocol}_tls_session_cache: {e}")
            self._tls_sessions = cache
        return self._tls_sessions

    async def _start_tls_with_session(self, conn: _Connection, ctx: ssl.SSLContext,
                                      server_name: str | None,
                                      session: ssl.SSLSession | None) -> None:
        if not isinstance(ctx, _ResumingContext) or self._tls_session_cache() is None:
            await conn.writer.start_tls(ctx, server_hostname=server_name)
            return
        # Held only until the new SSL object exists (one loop turn), not for the
        # handshake: concurrent handshakes stay concurrent.
        if self._tls_start_lock is None:
            self._tls_start_lock = asyncio.Lock()
        async with self._tls_start_lock:
            ctx.pending, ctx.taken = session, asyncio.Event()
            task = asyncio.ensure_future(conn.writer.start_tls(ctx, server_hostname=server_name))
            taken = asyncio.ensure_future(ctx.taken.wait())
            try:
                await asyncio.wait({task, taken}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                taken.cancel()
                ctx.pending, ctx.taken = None, None
                if not task.done() and asyncio.current_task().cancelling():
                    task.cancel()
        await task

    def _save_tls_session(self, conn: _Connection) -> None:
        key, conn.tls_cache_key = conn.tls_cache_key, None
        cache = self._tls_session_cache()
        if cache is None or key is None:
            return
        sslobj = conn.writer.get_extra_info("ssl_object")
        if sslobj is None:
            return
        try:
            cache.put(key, sslobj.session)
        except (ValueError, ssl.SSLError):
            pass

    def _tls_context(self, level: str) -> ssl.SSLContext:
        cached = self._tls_contexts.get(level)
        if cached is not None:
            return cached
        cfg = self.config
        p = self.protocol           # lmtp(8) reads lmtp_tls_*, smtp(8) smtp_tls_*
        ctx = _ResumingContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False      # names are matched per level in _start_tls
        if level in ("verify", "secure", "dane-only"):
            ctx.verify_mode = ssl.CERT_REQUIRED
            cafile = cfg.get(f"{p}_tls_CAfile") or None
            capath = cfg.get(f"{p}_tls_CApath") or None
            if cafile or capath:
                ctx.load_verify_locations(cafile=cafile, capath=capath)
            else:
                ctx.load_default_certs()
        else:
            ctx.verify_mode = ssl.CERT_NONE  # opportunistic/encrypt: no authentication
        cert = cfg.get(f"{p}_tls_cert_file")
        if cert:
            ctx.load_cert_chain(cert, cfg.get(f"{p}_tls_key_file") or cert)
        self._tls_contexts[level] = ctx
        return ctx

    def _is_myself(self, name: str) -> bool:
        return bool(name) and name.lower() == (self.settings.myhostname or "").lower()

    def _assume_final(self) -> bool:
        try:
            return self.config.get_bool("lmtp_assume_final")
        except Exception:
            return False

    def _loop(self, conn: _Connection, best: bool, nexthop: str) -> _SessionFailure:
        # Postfix bounces when the looping host is the best MX, else defers.
        dsn = "5.4.6" if best else "4.4.6"
        return self._fail(dsn, f"mail for {nexthop} loops back to myself", conn.target,
                          permanent=best)

    async def _transaction(self, conn: _Connection, request, recipients, pending: list[int],
                           results: dict[int, RecipientResult], *,
                           final: bool) -> "_SessionFailure | None":
        """One MAIL transaction for the ``pending`` recipients.

        Final answers go into ``results``; a recipient with a soft (4xx) answer on a
        non-final server stays out of ``results`` (RFC 5321 5.1: the next MX host may
        take it) and the last such answer is returned.  I/O trouble raises
        :class:`_SessionFailure` (``before_mail`` set when nothing was committed yet).
        """
        full = self._envelope(request)
        n = len(full.recipients)
        if len(pending) == n and (pending[0] == 0 if n == 1 else pending == list(range(n))):
            envelope = full         # pending holds every index in order
        else:
            envelope = Envelope(full.sender, tuple(full.recipients[i] for i in pending),
                                full.size, full.body_type, full.smtputf8, full.ret, full.envid)
        ext = conn.engine.extensions
        relay = conn.relay
        conn.uses += 1
        conn_use = conn.uses if conn.uses > 1 else None
        setup_done = self.clock()
        soft: _SessionFailure | None = None

        # Who reports a success (RFC 3461 5.2.2/6.2): a next hop that announced DSN
        # got our NOTIFY and owns the notice (None); otherwise we "relayed" it, or,
        # to an LMTP server taken as final (lmtp_assume_final), "delivered" it.
        if ext.dsn:
            success_action = None
        elif self.protocol == "lmtp" and self._assume_final():
            success_action = "delivered"
        else:
            success_action = "relayed"

        def result(i, status, dsn, reason):
            r = RecipientResult(recipients[i], status, dsn, reason, relay)
            r.conn_setup_done = setup_done
            if conn_use:
                r.conn_use = conn_use
            if status == "sent":
                r.dsn_action = success_action
            results[i] = r

        # smtp_proto.c: a session that will not be cached says QUIT right behind
        # the "." when the server pipelines (RFC 2920 3.1), and after a lone "."
        # that ended a transaction without recipients it says QUIT, not RSET.
        keep = self._caching_wanted(request) and self._reuse_left(conn)
        quit_after_dot = (not keep and ext.pipelining and self.protocol == "smtp"
                          and not self.settings.use_chunking)

        # Checks before MAIL FROM that fail the message, not the server.  Postfix
        # then closes a session it will not cache without a QUIT (smtp_xfer()
        # returns before its protocol loop, the only place that says QUIT).
        # smtp_helo() checks SMTPUTF8 (and says QUIT), smtp_xfer() the size after.
        if envelope.smtputf8 and not ext.smtputf8 and (
                needs_smtputf8(envelope) or self._content_has_utf8(request)):
            for i in pending:        # RFC 6531 3.2
                result(i, "bounced", "5.6.7", "SMTPUTF8 is required, but was not offered by host "
                       f"{conn.namaddr}")
            return None
        if ext.size and envelope.size and envelope.size > ext.size:
            for i in pending:        # RFC 1870 6.1
                result(i, "bounced", "5.3.4", f"message size {envelope.size} exceeds size limit "
                       f"{ext.size} of server {conn.namaddr}")
            conn.quit_sent = not keep and self.protocol == "smtp"
            return None
        downgrade = eight_bit_action(envelope.body_type, ext.eightbitmime,
                                     self.settings.disable_mime_output_conversion) == "convert"
        if downgrade and envelope.size is not None:
            # Postfix announces no SIZE= when it may convert the content to 7 bits
            # (the converted size is not known before it is sent; RFC 1870 6).
            envelope = dataclasses.replace(envelope, size=None)

        # verify(8) probe: the RCPT replies are the answer; no DATA.
        probe = bool(request.attributes.get("postwell_verify"))
        conn.dot_aborted = False
        conn.engine.start_transaction(envelope, probe=probe)
        accepted: list[int] = []
        rcpt_replies: dict[int, Reply] = {}
        got_mail = False

        def said(reply: Reply, command: str) -> str:
            return f"host {conn.namaddr} said: {_one_line(reply)} (in reply to {command} command)"

        def refuse(i, reply: Reply, command: str):
            nonlocal soft
            dsn, text = _dsn_of(reply), said(reply, command)
            if dsn[0] not in "45":
                # smtp_trouble.c vsmtp_fill_dsn(): a failure reply of another class
                # (DATA answered 250) is a protocol error; the notice still
                # quotes the server's reply as its diagnostic.
                dsn, text = "5.5.0", "Protocol error: " + text
                result(i, "bounced", dsn, text)
                results[i].diag_type, results[i].diag_text = "smtp", _one_line(reply)
            elif dsn[0] != "4":
                result(i, "bounced", dsn, text)
            elif final:
                result(i, "deferred", dsn, text)
            else:
                soft = self._fail(dsn, text, conn.target)
                soft.conn_setup_done = setup_done

        try:
            while True:
                ev = self._ready(conn)
                if ev is None:
                    ev = await self._event(conn)
                if isinstance(ev, MailReply):
                    got_mail = True
                    if ev.reply.code // 100 != 2:
                        # Postfix fails every recipient at once (smtp_mesg_fail), even
                        # when the pipelined replies after it never come.
                        for i in pending:
                            if i not in results:
                                refuse(i, ev.reply, ev.command)
                elif isinstance(ev, RcptReply):
                    i = pending[ev.index]
                    if ev.reply.code // 100 == 2:
                        accepted.append(i)
                        rcpt_replies[i] = ev.reply
                    else:
                        refuse(i, ev.reply, ev.command)
                elif isinstance(ev, TransactionFailed) and ev.closing:
                    for i in pending:
                        if i not in results:
                            refuse(i, ev.reply, ev.command)
                    conn.abort()
                    return soft
                elif isinstance(ev, TransactionFailed):
                    if probe and ev.command == "RCPT TO":
                        for i in accepted:
                            result(i, "sent", _dsn_of(rcpt_replies[i]), _one_line(rcpt_replies[i]))
                    if ev.command != "RCPT TO":
                        for i in (accepted if ev.command == "DATA" else pending):
                            if i not in results:
                                refuse(i, ev.reply, ev.command)
                    if conn.dot_aborted and not keep:
                        conn.engine.data_to_send()      # the RSET: QUIT follows instead
                        return soft
                    if quit_after_dot:
                        # smtp_loop(): a session that is not kept pipelines QUIT
                        # right behind the RSET (RFC 2920 3.1).
                        conn.quit_sent = True
                        try:
                            if conn.send_raw(conn.engine.data_to_send() + b"QUIT\r\n"):
                                await conn.drain(self._timeout_for(conn.engine.state))
                        except (OSError, asyncio.TimeoutError):
                            conn.abort()
                            return soft
                    # The engine sent RSET; its reply keeps the connection reusable.
                    try:
                        await self._event(conn)
                    except _SessionFailure:
                        conn.abort()
                    return soft
                elif isinstance(ev, ContentWanted):
                    await self._send_content(conn, request, downgrade, quit_after_dot)
                elif isinstance(ev, RecipientDone):
                    # LMTP (RFC 2033 4.2): this recipient's own final reply.
                    i = pending[ev.index]
                    if ev.reply.code // 100 == 2:
                        result(i, "sent", _dsn_of(ev.reply), _one_line(ev.reply))
                    else:
                        refuse(i, ev.reply, ev.command)
                elif isinstance(ev, MessageDone) and conn.engine.lmtp:
                    return soft
                elif isinstance(ev, MessageDone):
                    for i in accepted:
                        if ev.reply.code // 100 == 2:
                            result(i, "sent", _dsn_of(ev.reply), _one_line(ev.reply))
                        else:
                            refuse(i, ev.reply, ev.command)
                    return soft
        except _SessionFailure as f:
            f.before_mail = not got_mail
            f.conn_setup_done = setup_done
            raise

    def _content_has_utf8(self, request) -> bool:
        """cleanup's SMTPUTF8 header (2) or sender (4) flag, as Postfix's smtp(8)
        reads them from the queue file (a UTF-8 MIME part header counts too).
        cleanup writes ``postwell_smtputf8`` only when a flag is raised; without it
        the primary header is read, which also covers files from before the flag
        (only for mail that requested SMTPUTF8, so rarely)."""
        flags = (getattr(request, "attributes", None) or {}).get("postwell_smtputf8")
        if flags:
            try:
                return bool(int(flags) & 6)
            except ValueError:
                pass
        return self._header_has_utf8(request)

    def _header_has_utf8(self, request) -> bool:
        """Does the message header hold non-ASCII text?

        Mail submitted with SMTPUTF8 whose header is UTF-8 cannot be downgraded
        for a server without SMTPUTF8: Postfix (cleanup's header flag, then
        smtp(8)) bounces it with 5.6.7 like a UTF-8 address; an 8-bit body alone
        does not count.  Only the header is read (at most header_size_limit).
        """
        limit = self.config.get_int("header_size_limit") or 102400
        seen = b""
        chunks = self._content_chunks(request)
        try:
            for chunk in chunks:
                seen += chunk
                end = seen.find(b"\n\n")
                if seen.startswith((b"\n", b"\r\n")):
                    return False
                if end < 0:
                    end = seen.find(b"\n\r\n")
                if end >= 0:
                    seen = seen[:end]
                    break
                if len(seen) > limit:
                    seen = seen[:limit]
                    break
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()
        return any(b >= 0x80 for b in seen)

    async def _send_content(self, conn: _Connection, request, downgrade: bool = False,
                            quit_after: bool = False) -> None:
        timeout = self.settings.data_xfer_timeout or 180.0
        mime = MimeDowngrade(self.config.get_int("mime_nesting_limit") or 100) if downgrade else None
        # smtp_text_out(): the first line the engine breaks for smtp_line_length_limit
        # is logged once per message.
        limit = self.settings.line_length_limit if self.protocol == "smtp" else 0
        column = 0
        try:
            for chunk in self._content_chunks(request):
                if conn.engine.state is not State.CONTENT:
                    return       # the engine gave up (a broken reply): _event reports it
                data = mime.feed(chunk) if mime else chunk
                if limit and data:
                    first = data.find(b"\n")
                    if column + (len(data) if first < 0 else first) > limit or (
                            first >= 0 and has_long_line(data, first + 1, limit + 1)):
                        self._info(f"{conn.queue_id}: breaking line > {limit} bytes "
                                   "with <CR><LF>SPACE")
                        limit = 0
                    else:
                        last = data.rfind(b"\n")
                        column = column + len(data) if last < 0 else len(data) - last - 1
                conn.engine.send_content(data)
                # A small message goes out with its final "." in one write;
                # a big one in bounded pieces (DESIGN.md property 4).
                if conn.engine.pending_output >= CONTENT_FLUSH_SIZE:
                    await conn.flush(timeout)
            if conn.engine.state is not State.CONTENT:
                return
            if mime:
                conn.engine.send_content(mime.close())
            conn.engine.end_content()
            if quit_after:
                conn.quit_sent = True
                if conn.send_raw(conn.engine.data_to_send() + b"QUIT\r\n"):
                    await conn.drain(timeout)
            else:
                await conn.flush(timeout)
        except asyncio.TimeoutError:
            conn.abort()
            raise self._fail("4.4.2", f"conversation with {conn.namaddr} timed out while "
                             "sending message body", conn.target) from None
        except OSError:
            if await self._read_early_reply(conn):
                return
            conn.abort()
            raise self._fail("4.4.2", f"lost connection with {conn.namaddr} while "
                             "sending message body", conn.target) from None

    @staticmethod
    async def _read_early_reply(conn: _Connection, timeout: float = 2.0) -> bool:
        """After a failed write of the body: did the server say why before it hung up?

        A server that rejects mid-message (smtp-sink -A) answers and closes; the
        write then fails, but its reply is in the socket buffer.  Read what is
        there (bounded in time) and let the engine take it as the final reply.
        """
        # A failed write sets an exception on the StreamReader, and read() then
        # raises it before handing out what was buffered: take the buffer first
        # (a private attribute of asyncio.StreamReader; absent means nothing kept).
        buffered = getattr(conn.reader, "_buffer", None)
        if buffered:
            data = bytes(buffered)
            buffered.clear()
            conn.engine.receive_data(data)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            while loop.time() < deadline:
                data = await asyncio.wait_for(conn.reader.read(65536),
                                              max(deadline - loop.time(), 0.01))
                if not data:
                    break
                conn.engine.receive_data(data)
        except (OSError, asyncio.TimeoutError):
            pass
        return conn.engine.take_early_reply()
